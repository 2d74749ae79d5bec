"""write() of a value in another dtype: the "checked" rule, casting="unsafe" and NumPy's rules
(docs/api.md, "Writing another dtype")."""

import re

import numpy as np
import pytest

import torch_shmem

pytestmark = pytest.mark.cpu


@pytest.mark.parametrize("value", [
    np.array([7, 3]),                       # int64, NumPy's default integer
    np.array([7, 3], np.int16),
    np.array([7.0, 3.0]),                   # float64 holding integers
    [7, 3],                                 # a list of Python ints
    np.array([7 + 0j, 3 + 0j]),             # complex with no imaginary part
    np.array([True, False]),
], ids=["int64", "int16", "float64", "list", "complex128", "bool"])
def test_write_accepts_values_that_fit_the_stream_dtype(name, value):
    s = torch_shmem.create(name, shape=(2,), dtype=np.uint8)
    s.write(value)
    assert s.read().tolist() == np.asarray(value).real.astype(int).tolist()
    assert s.read().dtype == np.uint8 and s.count == 1


def test_write_into_float_streams_rounds_and_refuses_overflow(name):
    s = torch_shmem.create(name, shape=(3,), dtype=np.float32)
    s.write(np.array([0.1, 1 / 3, -2.5]))    # float64: rounded to nearest, as NumPy does
    np.testing.assert_array_equal(s.read(), np.array([0.1, 1 / 3, -2.5], np.float32))
    s.write(np.array([2**40, -1, 3]))        # int64
    assert s.read().tolist() == [2**40, -1, 3]
    s.write(np.array([np.inf, np.nan, -np.inf]))  # not finite: kept as they are
    assert np.isposinf(s.read()[0]) and np.isnan(s.read()[1])
    with pytest.raises(ValueError, match=rf"{name}.*float64 values into this float32 stream.*"
                                         r"1e\+300 at index \(1,\) overflows float32"):
        s.write(np.array([1.0, 1e300, 2.0]))
    h = torch_shmem.create(name + "-h", shape=(2,), dtype=np.float16)
    try:
        with pytest.raises(ValueError, match=r"70000 at index \(1,\) overflows float16"):
            h.write(np.array([1, 70000]))
    finally:
        h.unlink()


@pytest.mark.parametrize("dtype,value,bad,index", [
    (np.uint8, np.array([7, 300]), "300", "(1,)"),
    (np.uint8, np.array([-1, 3]), "-1", "(0,)"),
    (np.uint8, np.array([1.0, 2.5]), "2.5", "(1,)"),
    (np.uint8, np.array([np.nan, 1.0]), "nan", "(0,)"),
    (np.uint8, [3, 256], "256", "(1,)"),
    (np.int8, np.array([3, 128], np.int16), "128", "(1,)"),   # same kind, out of range
    (np.int32, np.array([1, 2**31]), "2147483648", "(1,)"),
    (np.uint64, np.array([-1, 0]), "-1", "(0,)"),
    (np.int64, np.array([2**64 - 1, 0], np.uint64), "18446744073709551615", "(0,)"),
    (np.int64, np.array([2.0**63, 0.0]), r"9\.223372036854776e\+18", "(0,)"),
    (np.bool_, np.array([0, 2]), "2", "(1,)"),
    (np.int16, np.array([1 + 2j, 0]), r"\(1\+2j\)", "(0,)"),
], ids=["overflow", "negative", "fraction", "nan", "list", "int16-int8", "int32", "uint64",
        "uint64-int64", "float-int64", "bool", "complex"])
def test_write_refuses_values_the_cast_would_change(name, dtype, value, bad, index):
    s = torch_shmem.create(name, shape=(2,), dtype=dtype)
    s.write(np.zeros(2, dtype), frame_id=5)
    with pytest.raises(ValueError, match=rf"stream '{name}': writing \w+ values into this "
                                         rf"{np.dtype(dtype)} stream would change them: {bad} at "
                                         rf"index {re.escape(index)} .*casting='unsafe'"):
        s.write(value)
    assert s.count == 1 and s.frame_id == 5  # nothing was published
    assert s.read().tolist() == [0, 0]


@pytest.mark.parametrize("layout", ["contiguous", "fortran"])
def test_large_value_checked_before_it_is_cast_into_the_payload(name, layout):
    # above the direct-cast size: checked slice by slice, then cast straight into the payload
    s = torch_shmem.create(name, shape=(300, 400), dtype=np.uint8)
    value = np.arange(300 * 400).reshape(300, 400) % 256
    if layout == "fortran":
        value = np.asfortranarray(value)
    s.write(value)
    np.testing.assert_array_equal(s.read(), value)
    value[250, 17] = 256  # far past the first checked slice
    with pytest.raises(ValueError, match=r"256 at index \(250, 17\) is not representable in uint8"):
        s.write(value)
    assert s.count == 1 and s.read()[250, 17] == (250 * 400 + 17) % 256  # payload untouched


def test_write_casting_unsafe_converts_like_pyshmem(name):
    s = torch_shmem.create(name, shape=(4,), dtype=np.uint8)
    value = np.array([300, -1, 2.7, 255.0])
    with np.errstate(all="ignore"):
        s.write(value, casting="unsafe")
        assert s.read().tolist() == np.asarray(value).astype(np.uint8).tolist() == [44, 255, 2, 255]
    big = torch_shmem.create(name + "-big", shape=(300, 400), dtype=np.uint8)
    try:
        value = np.full((300, 400), 300)
        big.write(value, casting="unsafe")   # large: cast straight into the payload
        assert (big.read() == 44).all()
        with big.locked():
            big.write_locked(np.full((300, 400), 257), casting="unsafe")
        assert (big.read() == 1).all()
    finally:
        big.unlink()


def test_write_casting_numpy_rules_and_bad_names(name):
    s = torch_shmem.create(name, shape=(2,), dtype=np.float32)
    s.write(np.array([1.5, 2.5]), casting="same_kind")
    with pytest.raises(ValueError, match=rf"{name}.*expected dtype float32, got float64 \(not a 'safe' cast\)"):
        s.write(np.array([1.5, 2.5]), casting="safe")
    with pytest.raises(ValueError, match="not a 'no' cast"):
        s.write(np.array([1, 2], np.int16), casting="no")
    s.write(np.array([1, 2], np.int16), casting="safe")
    s.write(np.array([3, 4], np.float32), casting="no")   # the stream's own dtype
    for value in (np.array([1.0, 2.0]), np.array([1, 2], np.float32)):
        with pytest.raises(ValueError, match=rf"{name}.*casting must be one of 'checked', 'unsafe'"):
            s.write(value, casting="bogus")
    assert s.count == 3 and s.read().tolist() == [3, 4]


@pytest.mark.parametrize("dtype,value", [
    (np.uint64, np.array([0, 2**63 - 1])),            # int64 into a wider-range unsigned
    (np.uint8, np.array([0, 255])),
    (np.int8, np.array([-128, 127])),                 # int64 into a narrower signed
    (np.uint16, np.array([0, 65535], np.uint64)),
    (np.int32, np.array([-2**31, 2**31 - 1])),
    (np.int64, np.array([0, 2**63 - 1], np.uint64)),
    (np.bool_, np.array([1, 0])),
    (np.uint8, np.array([255.0, -0.0])),
], ids=["int64-uint64", "int64-uint8", "int64-int8", "uint64-uint16", "int64-int32",
        "uint64-int64", "int64-bool", "float64-uint8"])
def test_integer_bounds_are_accepted(name, dtype, value):
    s = torch_shmem.create(name, shape=(2,), dtype=dtype)
    s.write(value)
    assert s.read().tolist() == value.astype(dtype).tolist()
    assert s.read().astype(object).tolist() == [int(v) for v in value.tolist()]


@pytest.mark.parametrize("dtype,value,bad", [
    (np.int8, np.array([0, -129]), "-129"),
    (np.int8, np.array([128, 0]), "128"),
    (np.uint16, np.array([0, 65536], np.uint64), "65536"),
    (np.int32, np.array([2**31, 0], np.uint64), "2147483648"),
    (np.uint8, np.array([0, -1], np.int8), "-1"),
], ids=["below-int8", "above-int8", "above-uint16", "uint64-int32", "int8-uint8"])
def test_integer_bounds_plus_one_are_refused(name, dtype, value, bad):
    s = torch_shmem.create(name, shape=(2,), dtype=dtype)
    with pytest.raises(ValueError, match=rf"would change them: {bad} at index"):
        s.write(value)
    assert s.count == 0
