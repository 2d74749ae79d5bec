"""CPU-mirror copy: a device payload into page-locked host memory, in one pass, from the SMs.

With ``cpu_mirror=True`` every write to a GPU stream also lands in the stream's CPU payload,
shared pages that the writer's handle registers with ``cudaHostRegister``. This kernel makes
that copy: it reads the device slot and stores straight into the pinned pages through their
mapped device pointer (zero-copy), one element-wise pass with no staging buffer, on the
current CUDA stream when :func:`mirror_copy` is called (the writer's stream: the C++ write
path calls it through the op ``shmem::mirror_copy``, registered in torch_shmem/ops.py).
The write path uses it with ``TORCH_SHMEM_MIRROR=kernel``; by default it takes the copy
engine (one DMA), which was faster on an H200 at every size measured (``python -m bench
--gpu`` times both; docs/benchmarks.md).

Dtypes: the kernel never sees the payload's dtype. Both tensors are viewed as bytes and
copied as ``WORD``-byte integers, ``WORD`` the widest of 8/4/2/1 that divides the byte
count and both addresses. That is dtype-agnostic (bool, every int/uint width, float16,
bfloat16, float32/64, complex64/128 alike) and byte-exact: NaN payloads, signalling NaNs,
negative zeros and non-0/1 bool bytes are copied as they are, since no float register
ever holds them. ``WORD`` is at least ``min(itemsize, 8)`` for any aligned tensor.

Tiling: the first ``n_body`` words (a multiple of 16) are spread over programs of
``BLOCK`` words (16 KiB each); the last ``n_words - n_body`` (< 16) words are copied by
program 0 with a second masked load/store. Keeping the main bound a multiple of 16 lets
Triton prove that each thread's mask is constant over 16 words, so the body uses 128-bit
loads and stores for any payload size (a mask against an odd bound would make them
scalar).

Throughput: bytes moved = 2 * nbytes (read + write); GB/s = 2 * nbytes / t / 1e9
(device-to-host over PCIe the write side is the limit: nbytes / t is the number to
compare with the link).
"""

from __future__ import annotations

import os

import torch

from . import _util

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ["mirror_copy", "triton_available"]

triton_available = _util.triton_available

_BLOCK_BYTES = 16384  # bytes per program: 128 threads x 16 B x 8 vector ops
_TAIL = 16  # words; the body bound is rounded down to a multiple of this
_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}

if triton is not None:
    _TL_WORDS = {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.int8}

    @triton.jit
    def _mirror_copy_kernel(src_ptr, dst_ptr, n_body, n_words, WORD: tl.constexpr, BLOCK: tl.constexpr,
                            TAIL: tl.constexpr):
        # src_ptr/dst_ptr point to bytes; the launcher checked that both addresses are WORD-aligned,
        # so reinterpreting them as WORD-wide integers is legal and copies every bit as it is.
        src = src_ptr.to(tl.pointer_type(WORD))
        dst = dst_ptr.to(tl.pointer_type(WORD))
        pid = tl.program_id(0)
        # int64 offsets: payloads can exceed 2**31 words.
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_body  # n_body % 16 == 0: the mask is constant per 16 words -> vector access
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)
        # Tail (< TAIL words): program 0 only; scalar, but at most 15 words.
        toffs = tl.full((TAIL,), 0, tl.int64) + n_body + tl.arange(0, TAIL)
        tmask = (toffs < n_words) & (pid == 0)
        tl.store(dst + toffs, tl.load(src + toffs, mask=tmask), mask=tmask)


def _check(src, dst) -> None:
    for what, t in (("src", src), ("dst", dst)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"torch_shmem: mirror_copy: {what} must be a torch.Tensor, got {type(t).__name__}")
    if src.dtype != dst.dtype:
        raise ValueError(f"torch_shmem: mirror_copy: dtype mismatch: src is {src.dtype}, dst is {dst.dtype}")
    if src.shape != dst.shape:
        raise ValueError(
            f"torch_shmem: mirror_copy: shape mismatch: src is {tuple(src.shape)}, dst is {tuple(dst.shape)}"
        )
    for what, t in (("src", src), ("dst", dst)):
        if not t.is_contiguous():
            raise ValueError(
                f"torch_shmem: mirror_copy: {what} must be contiguous, got shape {tuple(t.shape)} "
                f"with strides {t.stride()} (call .contiguous() first)"
            )


def _word_size(nbytes: int, *addresses: int) -> int:
    for w in (8, 4, 2, 1):
        if nbytes % w == 0 and all(a % w == 0 for a in addresses):
            return w
    return 1


def _overlap(src, dst, nbytes) -> bool:
    if src.device != dst.device:  # distinct address spaces (a mapped host page is never a device page)
        return False
    a, b = src.data_ptr(), dst.data_ptr()
    return a < b + nbytes and b < a + nbytes


def select_backend(src: torch.Tensor, dst: torch.Tensor, backend: str | None = None) -> str:
    """The path :func:`mirror_copy` takes for these tensors: ``"triton"`` or ``"torch"``.

    ``"auto"``: the Triton kernel when it can reach both tensors (see module docstring),
    the torch fallback otherwise. ``"triton"`` raises ``RuntimeError`` when it cannot.
    """
    return _util.choose_path("mirror_copy", backend, {"src": src, "dst": dst}, allow_pinned_host=True)


def mirror_copy(src: torch.Tensor, dst: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Copy ``src`` into ``dst`` byte for byte and return ``dst``.

    Both must be contiguous, of one dtype and one shape (0-d and empty included).
    ``dst`` is typically the CPU mirror of a GPU stream: host memory that is page-locked
    (``cudaHostRegister``/``pin_memory``), which the Triton kernel writes through its
    device pointer. The copy is enqueued on the current CUDA stream of the tensors'
    device and is asynchronous like any kernel: synchronize (or record an event) before
    the host reads ``dst``.

    ``backend``: ``"auto"`` (default; ``$TORCH_SHMEM_KERNEL_BACKEND`` when None) runs the
    Triton kernel when src or dst is on CUDA and the other is on the same device or in
    page-locked host memory, or when the kernels are interpreted (``TRITON_INTERPRET=1``,
    CPU tensors), and torch's copy otherwise (``dst.copy_(src)`` on byte views, so it is
    byte-exact too); ``"triton"`` forces the kernel (``RuntimeError`` if it cannot run);
    ``"torch"`` forces torch's copy.

    Raises ``TypeError`` for non-tensors and ``ValueError`` for a dtype/shape mismatch,
    a non-contiguous tensor, partially overlapping src/dst or an unknown backend.
    """
    _check(src, dst)
    nbytes = src.numel() * src.element_size()
    path = select_backend(src, dst, backend)
    if nbytes == 0:
        return dst
    if _overlap(src, dst, nbytes):
        if src.data_ptr() == dst.data_ptr():
            return dst  # the same memory: nothing to do
        raise ValueError("torch_shmem: mirror_copy: src and dst overlap partially")
    if path == "torch":
        # Through byte views: dst.copy_(src) would normalize bool bytes other than 0/1 (and a
        # dtype-converting copy is never wanted here); the same memcpy otherwise.
        dst.reshape(-1).view(torch.uint8).copy_(src.reshape(-1).view(torch.uint8))
        return dst
    _launch(src, dst, nbytes)
    return dst


launches = 0  # Triton kernel launches of this process (tests and the GPU check count them)


def _launch(src: torch.Tensor, dst: torch.Tensor, nbytes: int, *, count: bool = True) -> None:
    global launches
    if count:
        launches += 1
    # Contiguous, so these are views: flat, then bytes (view(dtype) rejects 0-d tensors).
    src_b = src.reshape(-1).view(torch.uint8)
    dst_b = dst.reshape(-1).view(torch.uint8)
    word = _word_size(nbytes, src_b.data_ptr(), dst_b.data_ptr())
    n_words = nbytes // word
    n_body = n_words - n_words % _TAIL
    block = _BLOCK_BYTES // word
    grid = lambda META: (max(triton.cdiv(n_body, META["BLOCK"]), 1),)  # noqa: E731
    device = _util.device_of((src, dst))
    if device is None:  # interpreter on host tensors
        _mirror_copy_kernel[grid](src_b, dst_b, n_body, n_words, WORD=_TL_WORDS[word], BLOCK=block, TAIL=_TAIL)
        return
    with torch.cuda.device(device):
        _mirror_copy_kernel[grid](src_b, dst_b, n_body, n_words, WORD=_TL_WORDS[word], BLOCK=block, TAIL=_TAIL,
                                  num_warps=4)


def warm_up(nbytes: int, device: torch.device) -> None:
    """Compile the kernel that :func:`mirror_copy` will launch for an aligned ``nbytes`` copy
    from ``device`` into page-locked host memory, on small buffers of the same kind.

    Triton specializes on the word size and on whether the integer arguments are 1 or
    multiples of 16; the buffers here reproduce those of an ``nbytes`` copy between
    16-byte-aligned addresses (device allocations, page-aligned stream payloads). No-op
    when the kernel cannot run (then :func:`mirror_copy` takes torch's copy anyway).
    """
    if nbytes <= 0 or device.type != "cuda" or triton is None or not triton_available():
        return
    if os.environ.get("TORCH_SHMEM_MIRROR") != "kernel":  # the write path takes the copy engine
        return
    word = _word_size(nbytes, 0)
    n_words = nbytes // word
    small = n_words if n_words <= 1 else 32 + n_words % _TAIL
    key = (device.index, word, small)
    if key in _warmed:  # compiled and loaded on that device already
        return
    src = torch.zeros(small * word, dtype=torch.uint8, device=device)
    dst = torch.empty(small * word, dtype=torch.uint8, pin_memory=True)
    with torch.cuda.device(device):
        if select_backend(src, dst) == "triton":
            _launch(src, dst, small * word, count=False)  # not a mirror copy: not in `launches`
        torch.cuda.current_stream(device).synchronize()
    _warmed.add(key)


_warmed: set = set()  # (device index, word size, small length) already compiled by warm_up
