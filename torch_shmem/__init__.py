"""torch_shmem: named shared-memory streams of NumPy arrays and tensors.

A drop-in for the pyshmem 1.4 API (``import torch_shmem as pyshmem``).
Importing this package and using CPU streams never imports torch.
"""

from ._stream import (
    InconsistentStreamError,
    SharedMemory,
    StaleStreamError,
    create,
    gpu_available,
    open,
    unlink,
)

__version__ = "0.1.0"

import sys as _sys

if "torch" in _sys.modules:  # torch users get torch.ops.shmem at once
    from . import _torch as _torch_hook

    _torch_hook.autoload()
del _sys

__all__ = [
    "InconsistentStreamError",
    "SharedMemory",
    "StaleStreamError",
    "__version__",
    "create",
    "gpu_available",
    "open",
    "unlink",
]
