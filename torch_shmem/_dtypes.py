"""Dtype codes stored in a stream's header, as the native table defines them
(csrc/core/dtypes.h, exported as ``_core.DTYPES``)."""

from __future__ import annotations

import numpy as np

from . import _core


def _numpy_codes() -> dict:
    """{NumPy dtype: header code} for the dtypes of the native table that NumPy has."""
    codes = {}
    for dtype_name, code in _core.DTYPES.items():
        try:
            codes[np.dtype(dtype_name)] = code
        except TypeError:  # bfloat16: GPU streams only
            continue
    return codes


_CODES = _numpy_codes()
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
