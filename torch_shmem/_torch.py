"""Loads the torch op library (torch.ops.shmem) once torch is imported.

Reached three ways: ``import torch_shmem`` when torch is already imported,
``import torch_shmem.ops``, and torch's own plugin autoload (the
``torch.backends`` entry point), so that ``torch.ops.shmem.*`` exists after
``import torch`` in any order. Never imported by the NumPy path.
"""

from __future__ import annotations

_loaded = False


def load_ops() -> None:
    """Import the native op library and register its fake kernels (idempotent)."""
    global _loaded
    if _loaded:
        return
    import torch  # noqa: F401  (the extension links libtorch)

    from . import _C  # noqa: F401  (static TORCH_LIBRARY registrations)
    from . import ops  # noqa: F401  (fake kernels)

    _loaded = True

