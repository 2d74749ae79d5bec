"""Dtype codes stored in a stream's header (stable; never renumber)."""

from __future__ import annotations

import numpy as np

_CODES = {
    np.dtype(np.bool_): 1,
    np.dtype(np.int8): 2,
    np.dtype(np.uint8): 3,
    np.dtype(np.int16): 4,
    np.dtype(np.uint16): 5,
    np.dtype(np.int32): 6,
    np.dtype(np.uint32): 7,
    np.dtype(np.int64): 8,
    np.dtype(np.uint64): 9,
    np.dtype(np.float16): 10,
    np.dtype(np.float32): 11,
    np.dtype(np.float64): 12,
    np.dtype(np.complex64): 13,
    np.dtype(np.complex128): 14,
}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}

SUPPORTED_DTYPES = frozenset(_CODES)


def normalize_dtype(dtype, *, name: str) -> np.dtype:
    """Return the native-order NumPy dtype for ``dtype`` or raise.

    Accepts NumPy dtypes, scalar types and strings (``"float32"``, ``"<f4"``).
    """
    try:
        normalized = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"torch_shmem: stream {name!r}: {dtype!r} is not a dtype") from exc
    if not normalized.isnative:
        raise ValueError(
            f"torch_shmem: stream {name!r}: dtype {dtype!r} is not in native byte order"
        )
    if normalized not in _CODES:
        supported = ", ".join(sorted(str(d) for d in _CODES))
        raise ValueError(
            f"torch_shmem: stream {name!r}: unsupported dtype {normalized}; "
            f"supported: {supported}"
        )
    return normalized


def dtype_code(dtype: np.dtype) -> int:
    return _CODES[dtype]


def code_dtype(code: int) -> np.dtype:
    return _DTYPES[code]
