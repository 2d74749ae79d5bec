"""Loads torch.ops.shmem: torch's extension-autoload entry point for torch_shmem.

A top-level module on purpose. torch calls :func:`autoload` during every
``import torch`` (the ``torch.backends`` entry point), so that
``torch.ops.shmem.*`` exists after ``import torch`` in any order; it must
therefore cost next to nothing, and a problem anywhere in torch_shmem must
turn into a warning here, never into a failed ``import torch``.

What it does, in about 2 ms: load the native op library ``torch_shmem._C``
by file (its static ``TORCH_LIBRARY(shmem)`` registrations) without
importing the torch_shmem package, and register the op library's Python
kernels (below): the fake kernels that let torch.compile trace the data ops,
and the Python implementation of ``shmem::mirror_copy``. Nothing here
imports torch._dynamo, triton or the NumPy API; they load when used.
``torch_shmem.ops`` and ``import torch_shmem`` (with torch imported) call
:func:`load` too, so ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` only defers it.
"""

from __future__ import annotations

import sys

_IMPL = None  # the torch.library.Library holding the Python kernels (kept alive)
mirror_copy_calls = 0  # calls of the mirror_copy implementation in this process (tests, bench)


def autoload() -> None:
    """torch's entry point: :func:`load`, with any failure turned into a warning."""
    try:
        load()
    except Exception as exc:  # pragma: no cover - depends on the install
        import warnings

        warnings.warn(
            f"torch_shmem: torch.ops.shmem is unavailable ({exc!r}); "
            "rebuild with pip install --no-build-isolation -e .",
            RuntimeWarning,
            stacklevel=2,
        )


def load() -> None:
    """Load the op library and register its Python kernels (idempotent)."""
    if _IMPL is not None:
        return
    _load_library()
    _register_python_kernels()


def _load_library() -> None:
    if "torch_shmem._C" in sys.modules:
        return
    import importlib

    if "torch_shmem" in sys.modules:  # the package is imported (or importing): the usual way
        importlib.import_module("torch_shmem._C")
        return
    # Not the package: its __init__ (the NumPy API) would cost more than the
    # library. torch.ops.load_library dlopens the extension file; a later
    # ``import torch_shmem._C`` gets the same, already loaded, library.
    import importlib.machinery
    import importlib.util

    import torch

    package = importlib.util.find_spec("torch_shmem")
    found = None
    if package is not None and package.submodule_search_locations:
        found = importlib.machinery.PathFinder.find_spec(
            "torch_shmem._C", list(package.submodule_search_locations))
    if found is None or not found.origin:
        raise ImportError("torch_shmem._C (the op library) is not built")
    torch.ops.load_library(found.origin)


# ------------------------------------------------------------ Python kernels
# shmem::mirror_copy is declared in C++ and implemented here, so that the
# write path of mirrored GPU streams (C++, csrc/cuda/gpu_stream.cu) reaches
# the Triton kernel through the dispatcher. torch_shmem.kernels (triton) is
# imported on the first call.
def _mirror_copy_impl(src, dst) -> None:
    global mirror_copy_calls
    from torch_shmem.kernels import mirror_copy

    mirror_copy_calls += 1
    mirror_copy(src, dst)


# Fake kernels: shapes, dtypes and devices of the data ops' results, for
# torch.compile (the control ops run eagerly only). docs/ops.md lists the ops.
def _publish_fake(stream, src, frame_id=None):
    return None


def _read_into_fake(stream, out):
    return None


def _read_fake(stream, shape, dtype, device="cpu"):
    import torch

    return torch.empty(shape, dtype=dtype, device=torch.device(device))


def _wait_read_into_fake(stream, out, timeout=-1.0):
    return None


def _wait_device_fake(stream, count):
    return None


def _count_fake(stream):
    import torch

    return torch.empty((), dtype=torch.int64)


def _mirror_copy_fake(src, dst):
    return None


def _read_next_fake(stream, cursor, out, timeout=-1.0):
    import torch

    return torch.empty((4,), dtype=torch.int64)


def _register_python_kernels() -> None:
    global _IMPL
    import torch

    impl = torch.library.Library("shmem", "IMPL")
    for key in ("CPU", "CUDA"):
        impl.impl("mirror_copy", _mirror_copy_impl, key)
    for op, fake in (("publish", _publish_fake), ("read_into", _read_into_fake),
                     ("read", _read_fake), ("wait_read_into", _wait_read_into_fake),
                     ("wait_device", _wait_device_fake), ("count", _count_fake),
                     ("mirror_copy", _mirror_copy_fake), ("read_next", _read_next_fake)):
        torch.library.register_fake(f"shmem::{op}", fake, lib=impl)
    _IMPL = impl
