"""torch_shmem: named shared-memory streams of NumPy arrays and tensors.

A drop-in for the pyshmem 1.4 API (``import torch_shmem as pyshmem``).
Importing this package and using CPU streams never imports torch.
"""

from ._admin import list_streams, purge, stat
from ._follow import Follower, follow
from ._stream import (
    Cursor,
    InconsistentStreamError,
    Publication,
    SharedMemory,
    StaleStreamError,
    StreamReplacedError,
    StreamUnlinkedError,
    create,
    gpu_available,
    locked_many,
    open,
    stream,
    unlink,
    unlink_quiet,
)

__version__ = "0.1.0"


def version(distribution_name: str | None = None) -> str:
    """The version of an installed distribution; torch_shmem's own without an argument.

    pyshmem 1.4 exports ``importlib.metadata.version`` under this name
    (``pyshmem.version("pyshmem")``); this is the same lookup, except that
    ``version()`` and ``version("torch_shmem")`` return :data:`__version__`
    (the code imported, installed or not). Raises
    ``importlib.metadata.PackageNotFoundError`` for a distribution that is
    not installed.
    """
    if distribution_name is None or distribution_name.replace("-", "_").lower() == "torch_shmem":
        return __version__
    from importlib.metadata import version as _version

    return _version(distribution_name)


import sys as _sys

if "torch" in _sys.modules:  # torch users get torch.ops.shmem at once
    from torch_shmem_autoload import autoload as _autoload

    _autoload()
del _sys

__all__ = [
    "Cursor",
    "Follower",
    "InconsistentStreamError",
    "Publication",
    "SharedMemory",
    "StaleStreamError",
    "StreamReplacedError",
    "StreamUnlinkedError",
    "__version__",
    "create",
    "follow",
    "gpu_available",
    "list_streams",
    "locked_many",
    "open",
    "purge",
    "stat",
    "stream",
    "unlink",
    "unlink_quiet",
    "version",
]
# GPU_SUPPORTED_DTYPES is left out of __all__ so that a star import does not
# import torch.


def __getattr__(name: str):
    # PEP 562: computed (importing torch) on first access, never at import.
    if name == "GPU_SUPPORTED_DTYPES":
        from ._stream import gpu_supported_dtypes

        return gpu_supported_dtypes()
    if name == "PackageNotFoundError":  # pyshmem 1.4 exports it beside version()
        from importlib.metadata import PackageNotFoundError

        return PackageNotFoundError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
