"""Facts the native module defines once and Python reads: the dtype table."""

import numpy as np
import pytest

import torch_shmem
from torch_shmem import _core, _dtypes

pytestmark = pytest.mark.cpu

# The header codes are part of the on-disk layout: a renumbered code would
# make every existing stream read as another dtype.
STABLE_CODES = {
    "bool": 1, "int8": 2, "uint8": 3, "int16": 4, "uint16": 5, "int32": 6,
    "uint32": 7, "int64": 8, "uint64": 9, "float16": 10, "float32": 11,
    "float64": 12, "complex64": 13, "complex128": 14, "bfloat16": 15,
}


def test_dtype_codes_are_stable():
    assert _core.DTYPES == STABLE_CODES
    assert list(_core.DTYPES.values()) == sorted(_core.DTYPES.values())


def test_numpy_table_comes_from_the_native_one():
    expected = {np.dtype(n): c for n, c in STABLE_CODES.items() if n != "bfloat16"}
    assert _dtypes._CODES == expected
    assert _dtypes.SUPPORTED_DTYPES == frozenset(expected)
    for dtype, code in expected.items():
        assert _dtypes.dtype_code(dtype) == code
        assert _dtypes.code_dtype(code) == dtype


def test_every_numpy_dtype_round_trips_through_a_stream(name):
    for dtype in sorted(_dtypes.SUPPORTED_DTYPES, key=str):
        s = torch_shmem.create(f"{name}-{dtype}", shape=(3,), dtype=dtype)
        try:
            value = np.arange(3).astype(dtype)
            s.write(value)
            out = s.read()
            assert out.dtype == dtype
            np.testing.assert_array_equal(out, value)
        finally:
            s.unlink()
            s.close()


def test_torch_table_is_keyed_by_the_native_codes():
    torch = pytest.importorskip("torch")
    from torch_shmem import ops

    assert ops._DTYPES == {c: getattr(torch, n) for n, c in STABLE_CODES.items()}


def test_handle_results_have_named_fields(name):
    s = torch_shmem.create(name, shape=(2, 3), dtype="float32")
    try:
        s.write(np.ones((2, 3), np.float32), frame_id=7)
        s.read()
        h = s._h
        info, state, stats = h.info(), h.state(), h.read_stats()
        assert isinstance(info, _core.Info) and isinstance(info, tuple) and len(info) == 8
        assert (info.dtype_code, info.shape, info.nbytes) == (_core.DTYPES["float32"], (2, 3), 24)
        assert info.flags == info[3] and info.instance_id == info[5] and len(info.instance_id) == 16
        assert isinstance(state, _core.State) and len(state) == 8
        assert (state.seq, state.frame_id, state.broken, state.unlinked) == (2, 7, 0, 0)
        assert state.write_time_ns == state[1] > 0
        assert isinstance(stats, _core.ReadStats) and len(stats) == 6
        assert (stats.last_read_count, stats.missed_writes, stats.last_count) == (1, 0, 1)
        assert stats.last_frame_id == 7
        # still plain tuples for index- and unpacking-based callers
        seq, _, frame_id, broken = state[:4]
        assert (seq, frame_id, broken) == (2, 7, 0)
    finally:
        s.unlink()
        s.close()
