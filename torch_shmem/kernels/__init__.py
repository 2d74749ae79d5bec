"""Triton kernels for GPU streams: the CPU-mirror copy and a GEMV.

Importing this subpackage imports torch (and triton when installed); ``import torch_shmem``
never imports it. Each launcher checks its inputs, runs the Triton kernel when it can
(CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before the first import)
and otherwise falls back to torch; ``backend=`` (or ``$TORCH_SHMEM_KERNEL_BACKEND``) forces
``"triton"`` or ``"torch"``.
"""

from ._util import interpreted, triton_available
from .gemv import gemv
from .mirror import mirror_copy

__all__ = ["gemv", "interpreted", "mirror_copy", "triton_available"]
