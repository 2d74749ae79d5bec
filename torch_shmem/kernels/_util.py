"""Policy shared by the kernel launchers: is Triton usable, is it interpreted, which path runs.

The Triton kernels are built when their module is imported: ``triton.jit`` returns an
interpreted function when ``TRITON_INTERPRET=1`` is set at that moment and a compiled
(CUDA) kernel otherwise. ``_PROBE`` is decorated the same way, so :func:`interpreted`
answers for the kernels of this package, whatever the environment says later.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # CPU-only torch wheels ship without triton: the torch paths still work
    triton = None

BACKENDS = ("auto", "triton", "torch")
# Default for calls that pass backend=None; read at call time so tests can force a path.
BACKEND_ENV = "TORCH_SHMEM_KERNEL_BACKEND"

if triton is not None:

    @triton.jit
    def _PROBE():
        pass

    _INTERPRETED = type(_PROBE).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


def interpreted() -> bool:
    """True when this package's Triton kernels run under the Triton interpreter (CPU tensors)."""
    return _INTERPRETED


def triton_available() -> bool:
    """True when the Triton kernels can run here.

    That is: triton imports, and either the kernels were built for the interpreter
    (``TRITON_INTERPRET=1`` before ``torch_shmem.kernels`` was first imported) or a
    CUDA device is present. When False, every launcher takes its torch fallback
    (``backend="auto"``) or raises (``backend="triton"``).
    """
    if triton is None:
        return False
    return _INTERPRETED or torch.cuda.is_available()


def resolve_backend(op: str, backend: str | None) -> str:
    """``backend`` if given, else ``$TORCH_SHMEM_KERNEL_BACKEND``, else ``"auto"``; validated."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or "auto"
    if backend not in BACKENDS:
        raise ValueError(
            f"torch_shmem: {op}: backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}"
        )
    return backend


def choose_path(op: str, backend: str | None, tensors: dict[str, torch.Tensor], *,
                allow_pinned_host: bool) -> str:
    """The path ``op`` takes for ``tensors``: ``"triton"`` or ``"torch"``.

    ``"auto"`` (see :func:`resolve_backend`) takes the Triton kernel when it can reach
    every tensor (:func:`why_not_triton`) and the torch fallback otherwise; an explicit
    ``"triton"`` raises ``RuntimeError`` naming why it cannot run.
    """
    backend = resolve_backend(op, backend)
    if backend == "torch":
        return "torch"
    reason = why_not_triton(tensors, allow_pinned_host=allow_pinned_host)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise RuntimeError(f"torch_shmem: {op}: the Triton kernel cannot run: {reason}")
    return "torch"


def why_not_triton(tensors: dict[str, torch.Tensor], *, allow_pinned_host: bool) -> str | None:
    """Why the Triton path cannot take these tensors (None when it can).

    Compiled kernels need device-accessible memory: CUDA tensors on one device, or
    (``allow_pinned_host``) page-locked host memory, which the kernel reaches through
    its mapped device pointer (pinned with ``pin_memory()`` or registered with
    ``cudaHostRegister``; Triton's launcher translates the host address). The
    interpreter takes CPU tensors (and copies CUDA ones through the host).
    """
    if triton is None:
        return "triton is not installed"
    if _INTERPRETED:
        return None
    cuda = {t.device for t in tensors.values() if t.device.type == "cuda"}
    if not cuda:
        return "no CUDA tensor (the kernels are compiled for CUDA; set TRITON_INTERPRET=1 to run them on the CPU)"
    if len(cuda) > 1:
        return f"tensors are on several devices ({', '.join(sorted(map(str, cuda)))})"
    for name, t in tensors.items():
        if t.device.type == "cuda":
            continue
        if t.device.type != "cpu":
            return f"{name} is on {t.device}"
        if not allow_pinned_host:
            return f"{name} is on the CPU (expected {next(iter(cuda))})"
        if not t.is_pinned():
            return f"{name} is in pageable host memory (pin it or register it with cudaHostRegister)"
    return None


def device_of(tensors) -> torch.device | None:
    """The CUDA device the launch belongs to (None when every tensor is on the host)."""
    for t in tensors:
        if t.device.type == "cuda":
            return t.device
    return None
