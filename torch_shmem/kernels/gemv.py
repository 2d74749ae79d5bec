"""GEMV: ``y = A @ x`` for a row-major matrix read in place (e.g. from a GPU stream's allocation).

A GEMV moves ``m*n`` matrix elements for ``2*m*n`` flops, so it is bound by memory
bandwidth and the kernel is built to stream ``A`` once at full width:

- each program owns ``BLOCK_M`` consecutive rows and walks the columns in ``BLOCK_N``
  chunks; every chunk is a ``BLOCK_M x BLOCK_N`` tile loaded with 128-bit vector loads
  (rows are contiguous; when ``n % 16 == 0`` Triton proves the row starts and masks are
  16-element aligned);
- products are accumulated element-wise into a ``BLOCK_M x BLOCK_N`` fp32 register tile
  and reduced across columns once, after the loop (no shuffles inside the loop, no atomics,
  no second pass); fp16/bf16 inputs are widened to fp32 before the multiply;
- ``A`` is loaded with ``evict_first`` (streamed once) and ``x`` with ``evict_last`` (every
  program re-reads it; it stays in L2);
- the tile shape and warp count are autotuned per ``(m, n)`` (the kernel is idempotent, so
  the autotuner's repeated launches are harmless). Under the Triton interpreter one fixed
  small config is used instead (autotuning there would only cost time).

``TORCH_SHMEM_GEMV_CONFIGS=N`` (read once, when this module is imported) autotunes over
only the first ``N`` of the configs below (``N=1``: no autotuning, the first config
always). With a cold Triton cache every config of every shape is compiled and timed, which
a short GPU check (.ci/gpu) cannot afford; unset (the default) means all of them. A value
that is not a positive integer is ignored with a warning.

Performance formulas (``t`` in seconds):

- GFLOP/s = ``2 * m * n / t / 1e9``
- GB/s    = ``(m * n + n + m) * itemsize / t / 1e9`` (A, x and y each moved once;
  ``itemsize`` of A)

Target: >= 80% of HBM bandwidth at 10000 x 10000 float32 on an H100. Parallelism is
``cdiv(m, BLOCK_M)`` programs; very short matrices (m of a few hundred rows with a huge n)
leave SMs idle, which a split-n variant would fix (not needed for the square case).
"""

from __future__ import annotations

import os
import warnings

import torch

from . import _util

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["gemv", "triton_available"]

triton_available = _util.triton_available

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CONFIGS_ENV = "TORCH_SHMEM_GEMV_CONFIGS"


def _config_limit() -> int | None:
    """``$TORCH_SHMEM_GEMV_CONFIGS`` as a positive int, or None (all configs)."""
    raw = os.environ.get(CONFIGS_ENV, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        warnings.warn(f"torch_shmem: gemv: ignoring {CONFIGS_ENV}={raw!r} (not a positive integer); "
                      "autotuning over every config", RuntimeWarning, stacklevel=2)
        return None
    return n


_CONFIG_LIMIT = _config_limit()  # read once, at import

# One fixed config under the interpreter (CPU tensors): few programs, few loop trips.
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=128)

if triton is not None:

    @triton.jit
    def _gemv_kernel(a_ptr, x_ptr, y_ptr, m, n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: m * n can exceed 2**31
        row_mask = rows < m
        a_rows = a_ptr + rows[:, None] * n  # contiguous row-major: the row stride is n
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_mask = cols < n
            x = tl.load(x_ptr + cols, mask=col_mask, other=0.0, eviction_policy="evict_last")
            a = tl.load(a_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0,
                        eviction_policy="evict_first")
            acc += a.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)

    _ALL_CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in (
            (4, 1024, 4, 2),
            (8, 512, 4, 2),
            (16, 256, 4, 2),
            (16, 512, 8, 2),
            (32, 256, 8, 2),
            (8, 1024, 8, 3),
            (32, 128, 4, 3),
            (64, 128, 8, 2),
        )
    ]
    _CONFIGS = _ALL_CONFIGS[:_CONFIG_LIMIT]  # every config unless $TORCH_SHMEM_GEMV_CONFIGS says fewer
    # Built separately from _gemv_kernel so that the interpreter path can launch the plain kernel.
    _gemv_kernel_autotuned = triton.autotune(configs=_CONFIGS, key=["m", "n"])(_gemv_kernel)


def _check(A, x, out):
    for what, t in (("A", A), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"torch_shmem: gemv: {what} must be a torch.Tensor, got {type(t).__name__}")
    if A.dim() != 2:
        raise ValueError(f"torch_shmem: gemv: A must be 2-d (m, n), got shape {tuple(A.shape)}")
    if x.dim() != 1:
        raise ValueError(f"torch_shmem: gemv: x must be 1-d (n,), got shape {tuple(x.shape)}")
    m, n = A.shape
    if x.shape[0] != n:
        raise ValueError(f"torch_shmem: gemv: A is {m} x {n}, so x must have {n} elements, got {x.shape[0]}")
    if A.dtype not in _DTYPES:
        raise ValueError(f"torch_shmem: gemv: A must be float32, float16 or bfloat16, got {A.dtype}")
    if x.dtype != A.dtype:
        raise ValueError(f"torch_shmem: gemv: x must have A's dtype {A.dtype}, got {x.dtype}")
    if not A.is_contiguous():
        raise ValueError(
            f"torch_shmem: gemv: A must be contiguous (row-major), got strides {A.stride()} for shape "
            f"{tuple(A.shape)}"
        )
    if not x.is_contiguous():
        raise ValueError(f"torch_shmem: gemv: x must be contiguous, got stride {x.stride()}")
    if x.device != A.device:
        raise ValueError(f"torch_shmem: gemv: x is on {x.device}, A on {A.device}")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"torch_shmem: gemv: out must be a torch.Tensor, got {type(out).__name__}")
        if tuple(out.shape) != (m,):
            raise ValueError(f"torch_shmem: gemv: out must have shape ({m},), got {tuple(out.shape)}")
        if out.dtype not in (A.dtype, torch.float32):
            allowed = " or ".join(sorted({str(A.dtype), str(torch.float32)}))
            raise ValueError(f"torch_shmem: gemv: out must be {allowed}, got {out.dtype}")
        if not out.is_contiguous():
            raise ValueError(f"torch_shmem: gemv: out must be contiguous, got stride {out.stride()}")
        if out.device != A.device:
            raise ValueError(f"torch_shmem: gemv: out is on {out.device}, A on {A.device}")


def select_backend(A: torch.Tensor, x: torch.Tensor, backend: str | None = None) -> str:
    """The path :func:`gemv` takes: ``"triton"`` or ``"torch"`` (``"triton"`` raises when it cannot run)."""
    return _util.choose_path("gemv", backend, {"A": A, "x": x}, allow_pinned_host=False)


def gemv(A: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None, *,
         backend: str | None = None) -> torch.Tensor:
    """``y = A @ x`` with fp32 accumulation; returns ``out`` (allocated when None).

    ``A``: (m, n), contiguous (row-major), float32/float16/bfloat16, read in place.
    ``x``: (n,), contiguous, A's dtype, on A's device.
    ``out``: (m,), contiguous, A's dtype (the default, as ``torch.mv``) or float32.

    Performance: GFLOP/s = ``2*m*n / t / 1e9``; GB/s = ``(m*n + n + m) * itemsize / t / 1e9``
    (see the module docstring for the tiling). The first call per ``(m, n)`` on a GPU
    autotunes (a second or so), later calls reuse the chosen config. Runs on the current
    CUDA stream.

    ``backend``: ``"auto"`` (default; ``$TORCH_SHMEM_KERNEL_BACKEND`` when None) runs the
    Triton kernel for CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``) and
    ``torch.mv`` otherwise; ``"triton"`` forces the kernel (``RuntimeError`` if it cannot
    run); ``"torch"`` forces ``torch.mv``.

    Raises ``TypeError`` for non-tensors and ``ValueError`` for wrong shapes, dtypes,
    devices or non-contiguous inputs.
    """
    _check(A, x, out)
    path = select_backend(A, x, backend)
    m, n = A.shape
    if out is None:
        out = torch.empty(m, dtype=A.dtype, device=A.device)
    if path == "torch":
        if out.dtype == A.dtype:
            torch.mv(A, x, out=out)
        else:  # fp32 result of half inputs
            out.copy_(torch.mv(A.float(), x.float()))
        return out
    if m == 0:
        return out
    if n == 0:
        return out.zero_()
    if _util.interpreted():
        grid = (triton.cdiv(m, _INTERPRETER_CONFIG["BLOCK_M"]),)
        _gemv_kernel[grid](A, x, out, m, n, **_INTERPRETER_CONFIG)
        return out
    grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]),)  # noqa: E731
    with torch.cuda.device(A.device):
        _gemv_kernel_autotuned[grid](A, x, out, m, n)
    return out


def _bench(m: int = 10000, n: int = 10000, dtype: torch.dtype = torch.float32) -> None:
    """Print GB/s and GFLOP/s of the kernel and of torch.mv (``python -m torch_shmem.kernels.gemv``)."""
    from triton.testing import do_bench

    A = torch.randn(m, n, device="cuda", dtype=dtype)
    x = torch.randn(n, device="cuda", dtype=dtype)
    out = torch.empty(m, device="cuda", dtype=dtype)
    gemv(A, x, out)  # autotune outside the timing
    nbytes = (m * n + n + m) * A.element_size()
    for name, fn in (("triton gemv", lambda: gemv(A, x, out)), ("torch.mv", lambda: torch.mv(A, x, out=out))):
        ms = do_bench(fn, warmup=50, rep=500)
        t = ms * 1e-3
        print(f"{name:12s} {m}x{n} {dtype}: {ms * 1e3:8.1f} us  {nbytes / t / 1e9:7.1f} GB/s "
              f"[(m*n+n+m)*itemsize/t]  {2 * m * n / t / 1e9:7.1f} GFLOP/s [2*m*n/t]")
    best = _gemv_kernel_autotuned.best_config if hasattr(_gemv_kernel_autotuned, "best_config") else None
    print(f"autotuned config: {best}")


if __name__ == "__main__":
    _bench()
