"""Typed wrappers over ``torch.ops.shmem`` (thin: no policy).

A stream is addressed by a :class:`Stream`: a small record holding the
stream *token* (a private int64[4] CPU tensor that the data ops declare as
mutated, so ``torch.compile`` keeps every publish and read, in order) and the
stream's geometry (so allocating reads have a fake kernel).

Control functions (:func:`create`, :func:`open`, :func:`close`,
:func:`unlink`) run eagerly only (a graph break under ``torch.compile``, without
importing the compiler for eager use); data functions
(:func:`publish`, :func:`read`, :func:`read_into`, :func:`wait_read_into`,
:func:`count`) trace into ``torch.compile(fullgraph=True)`` graphs without a
break. Streams are the same ones the NumPy API uses: a tensor published here
is read by ``torch_shmem.open(name).read()`` in any process, and vice versa.
See docs/ops.md.
"""

from __future__ import annotations

import builtins
import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch

import torch_shmem_autoload as _loader

from . import _C  # noqa: F401  (registers torch.ops.shmem)
from . import _core

_loader.load()  # the Python kernels: fake kernels, shmem::mirror_copy (idempotent)

__all__ = [
    "Stream",
    "close",
    "count",
    "create",
    "create_gpu",
    "cursor",
    "cursor_release",
    "open",
    "publish",
    "read",
    "read_into",
    "read_next",
    "slot_view",
    "unlink",
    "wait_device",
    "wait_read_into",
]

# header dtype code -> torch dtype, keyed by the codes of the native dtype
# table (csrc/core/dtypes.h, exported as _core.DTYPES by name); bfloat16 is
# for GPU streams only.
_DTYPES = {code: getattr(torch, dtype_name) for dtype_name, code in _core.DTYPES.items()}


@dataclass(frozen=True)
class Stream:
    """An opened stream for the torch ops.

    ``token`` is the int64[4] CPU tensor ``[handle, generation_lo,
    generation_hi, last_count]``; ``last_count`` is the count of the
    publication this token last published or read.
    """

    token: torch.Tensor
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def last_count(self) -> int:
        return int(self.token[3])


_F = TypeVar("_F", bound=Callable[..., Any])
# torch's own lazy form of torch.compiler.disable: a function of a module that
# torch.compile skips, which imports torch._dynamo on its first call.
_disable_dynamo = getattr(torch, "_disable_dynamo", None) or torch.compiler.disable


def _eager_only(fn: _F) -> _F:
    """``torch.compiler.disable`` for a control function, without importing torch._dynamo.

    ``torch.compiler.disable`` imports torch._dynamo, the compiler, when it
    decorates (most of a second on top of ``import torch``; bench section 6);
    this module is imported by torch users of torch_shmem who may never compile. An eager call runs ``fn`` directly; a call that
    torch.compile traces goes through ``torch._disable_dynamo``, which the
    compiler skips: a graph break, or an error under ``fullgraph=True``.
    """
    skipped = _disable_dynamo(fn)

    @functools.wraps(fn)
    def eager_only(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return skipped(*args, **kwargs)
        return fn(*args, **kwargs)

    return eager_only  # type: ignore[return-value]


def _gpu_unavailable(name: str, exc: BaseException | None = None) -> None:
    """Raise the NumPy API's clear RuntimeError when GPU streams cannot work in this process."""
    from ._gpu import require  # the one check of both APIs (imports this module: not at top)

    if exc is None:
        require(name)
        return
    try:
        require(name)
    except RuntimeError as clear:
        raise clear from exc


def _wrap(token: torch.Tensor) -> Stream:
    name, shape, code, device = torch.ops.shmem.info(token)
    dev = torch.device("cpu") if device < 0 else torch.device("cuda", device)
    return Stream(token, name, tuple(shape), _DTYPES[code], dev)


@_eager_only
def create(name: str, shape: Sequence[int], dtype: torch.dtype = torch.float32, *, mode: int = 0o600) -> Stream:
    """Create a CPU stream (same semantics as ``torch_shmem.create``)."""
    return _wrap(torch.ops.shmem.create(name, list(shape), dtype, mode))


@_eager_only
def create_gpu(
    name: str,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    device: int | str | torch.device = 0,
    nslots: int = 3,
    cpu_mirror: bool = False,
    mode: int = 0o600,
    notify: bool = False,
    ring_policy: int = -1,
) -> Stream:
    """Create a GPU stream: ``nslots`` payload slots in one CUDA IPC allocation.

    ``notify`` is recorded in the header as ``torch_shmem.create(...,
    notify=True)`` records it (every wait parks on a futex either way).
    ``ring_policy`` >= 0 (0 overwrite, 1 block, 2 drop_newest) makes a GPU
    ring of ``nslots`` publications: :func:`cursor`, :func:`read_next` (the
    copy is queued on the current CUDA stream; the host does not wait) and
    :func:`publish` (docs/gpu.md, "GPU rings").

    See docs/gpu.md for the slot protocol and the guarantees of each mode.
    Raises RuntimeError naming the stream and the reason when GPU streams
    cannot work in this process (no usable CUDA device, no CUDA half built),
    as ``torch_shmem.create(..., gpu_device=...)`` does.
    """
    _gpu_unavailable(name)
    index = torch.device(device if not isinstance(device, int) else f"cuda:{device}").index or 0
    stream = _wrap(torch.ops.shmem.create_gpu(name, list(shape), dtype, index, nslots, cpu_mirror, mode,
                                                   bool(notify), int(ring_policy)))
    if cpu_mirror:
        _warm_up_mirror(stream)
    return stream


@_eager_only
def open(name: str, *, readonly: bool = False, device: int | None = None) -> Stream:  # noqa: A001
    """Attach to an existing stream (created by either API).

    A GPU stream is mapped on ``device`` (default: the device it was created
    on, matched by uuid). Opening a GPU stream where GPU streams cannot
    work raises the same RuntimeError as :func:`create_gpu`.
    """
    try:
        token = torch.ops.shmem.open(name, readonly, -1 if device is None else int(device))
    except RuntimeError as exc:
        if isinstance(name, str) and _is_device_stream(name):
            _gpu_unavailable(name, exc)
        raise
    stream = _wrap(token)
    if stream.device.type == "cuda" and not readonly and _is_mirrored(name):
        _warm_up_mirror(stream)
    return stream


@_eager_only
def close(stream: Stream) -> None:
    """Forget the stream in this process; blocked waits on it raise. Idempotent."""
    torch.ops.shmem.close(stream.token)


@_eager_only
def unlink(name: str) -> bool:
    """Destroy the named stream; False if it did not exist."""
    return torch.ops.shmem.unlink(name)


def publish(stream: Stream, src: torch.Tensor, frame_id: int | None = None) -> None:
    """Copy ``src`` (the stream's shape and dtype, any layout) in and publish it.

    Takes the cross-process write lock for the copy; records the new count in
    ``stream.token[3]``. ``frame_id`` (uint64) is stamped with the write; in
    compiled code prefer None (each distinct constant specializes the graph).
    For a GPU stream ``src`` may be on its device (device-to-device copy) or on
    the CPU (upload).
    """
    if frame_id is not None:
        frame_id = int(frame_id)
        if not 0 <= frame_id < 1 << 64:
            raise ValueError(f"torch_shmem: stream {stream.name!r}: frame_id must be in [0, 2**64)")
        if frame_id >= 1 << 63:
            frame_id -= 1 << 64  # the schema carries the uint64 bit pattern as int64
    torch.ops.shmem.publish(stream.token, src, frame_id)


def read_into(stream: Stream, out: torch.Tensor) -> torch.Tensor:
    """Copy the latest completed write into ``out`` (contiguous); returns ``out``.

    Never blocks a writer (seqlock); falls back to the lock if the writer keeps
    overwriting. Records the snapshot's count in ``stream.token[3]``.
    """
    torch.ops.shmem.read_into(stream.token, out)
    return out


def read(stream: Stream) -> torch.Tensor:
    """Return a new tensor holding the latest completed write."""
    return torch.ops.shmem.read(stream.token, builtins.list(stream.shape), stream.dtype, str(stream.device))


def wait_read_into(stream: Stream, out: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
    """Block until a publication newer than ``stream.last_count``, then read it into ``out``.

    Level-triggered: if a newer publication already exists it returns at once,
    so a loop of ``wait_read_into`` sees every publication it can keep up with
    and never deadlocks a request/reply exchange. Raises RuntimeError after
    ``timeout`` seconds (None: wait forever) or if the stream is closed;
    ``torch_shmem.StreamUnlinkedError`` / ``StreamReplacedError`` (RuntimeError
    subclasses) at once when the stream is unlinked or re-created and nothing
    newer than ``last_count`` exists. Ctrl-C interrupts it (main thread).
    """
    torch.ops.shmem.wait_read_into(stream.token, out, -1.0 if timeout is None else float(timeout))
    return out


@_eager_only
def cursor(stream: Stream, name: str) -> int:
    """Attach the ring cursor ``name`` for this process; returns its index for :func:`read_next`.

    As :meth:`torch_shmem.SharedMemory.cursor` (a new name starts at the
    current count, an earlier consumer's name resumes; RuntimeError when a
    live process holds it, all 32 are held, or the stream is not a ring).
    """
    return torch.ops.shmem.cursor(stream.token, str(name))


@_eager_only
def cursor_release(stream: Stream, cursor: int) -> None:
    """Release a cursor this process holds (it keeps its name and position)."""
    torch.ops.shmem.cursor_release(stream.token, int(cursor))


def read_next(stream: Stream, cursor: int, out: torch.Tensor, timeout: float | None = None) -> torch.Tensor:
    """The ring cursor's next publication into ``out``; returns int64[4] ``(count, missed, frame_id, write_time_ns)``.

    ``missed``: publications skipped because they were overwritten before
    the cursor got to them; ``frame_id`` is the uint64 bit pattern as int64.
    Blocks until one exists (None: forever); RuntimeError after ``timeout``
    or when the stream is closed; StreamUnlinkedError when it is unlinked
    with nothing left. Records the count in ``stream.token[3]``. ``out``:
    contiguous tensor of the stream's shape and dtype, on the CPU (GPU rings:
    or the stream's device). On a GPU ring the copy into ``out`` and the
    cursor's device counter are queued on the current CUDA stream and the
    call returns without waiting for them (work queued after it on that CUDA
    stream sees the publication); the writer reuses the slot only after the
    counter passes, on the device.
    """
    return torch.ops.shmem.read_next(stream.token, int(cursor), out,
                                     -1.0 if timeout is None else float(timeout))


@_eager_only
def wait_device(stream: Stream, count: int) -> None:
    """Make the current CUDA stream wait, on the device, for publication ``count`` (GPU streams).

    The host returns at once; work queued afterwards on the current CUDA stream
    of the stream's device starts only when publication ``count`` is complete in
    its slot, which :func:`slot_view` returns. Uses ``cuStreamWaitValue64``
    (fetched from the driver at run time), or a one-thread polling kernel where
    the driver lacks stream memory operations (or ``TORCH_SHMEM_DEVICE_WAIT=poll``).
    Nothing times out on the device: queue it only for a count the writer will
    reach. A read of this stream queued on the parked CUDA stream (``read``,
    ``read_into``, ``wait_read_into``) first waits on the host for publication
    ``count`` (with its timeout, without the stream lock); a publish from the
    parked CUDA stream that could not run before the wait resolves is refused.

    Eager only (``torch.compiler.disable``): the wait orders the CUDA stream
    against work that does not name the stream token (kernels on a
    :func:`slot_view`), which a compiled graph could otherwise move across it;
    inside ``torch.compile`` the call is a graph break. On simulated device
    memory (tests) the calling thread stands for the CUDA stream. Raises
    ValueError for a CPU stream or a count < 1.
    """
    torch.ops.shmem.wait_device(stream.token, int(count))


@_eager_only
def slot_view(stream: Stream, count: int) -> torch.Tensor:
    """The device slot that publication ``count`` of a GPU stream goes to (a view, eager only).

    After :func:`wait_device` it holds publication ``count`` until the writer
    begins publication ``count + nslots``; no consistency check is made, so a
    consumer that can fall that far behind should use :func:`read_into`.
    """
    if int(count) < 1:
        raise ValueError(f"torch_shmem: stream {stream.name!r}: expected a count >= 1, got {count}")
    return torch.ops.shmem.live_view(stream.token, int(count))


def count(stream: Stream) -> torch.Tensor:
    """The stream's publication count, as a 0-d int64 CPU tensor."""
    return torch.ops.shmem.count(stream.token)


# ---------------------------------------------------------------- CPU-mirror copy
# shmem::mirror_copy and the fake kernels of the data ops are registered by
# torch_shmem_autoload (loaded with torch itself, so they exist for a program
# that only imported torch).
def __getattr__(name: str) -> Any:
    if name == "mirror_copy_calls":  # calls of the mirror_copy implementation (tests, bench)
        return _loader.mirror_copy_calls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_device_stream(name: str) -> bool:
    """Whether ``name`` is a GPU stream on real device memory (False when it cannot be told)."""
    from . import _core

    try:
        h = _core.open(name, True)
    except Exception:  # missing, foreign, not ours: the op's own error stands
        return False
    try:
        flags = h.info()[3]
    finally:
        h.close(1.0)
    return bool(flags & _core.FLAG_GPU) and not flags & _core.FLAG_SIM_DEVICE


def _is_mirrored(name: str) -> bool:
    from . import _core

    h = _core.open(name, True)
    try:
        return bool(h.info()[3] & _core.FLAG_CPU_MIRROR)
    finally:
        h.close(1.0)


def _warm_up_mirror(stream: Stream) -> None:
    """Import and compile the mirror kernel before the first write needs it.

    The first write of a mirrored stream would otherwise import triton and JIT-compile
    the kernel inside its host window (with the lock held, readers waiting).
    """
    from .kernels import mirror

    nbytes = stream.dtype.itemsize
    for d in stream.shape:
        nbytes *= d
    mirror.warm_up(nbytes, stream.device)
