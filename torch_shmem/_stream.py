"""Streams: the pyshmem-compatible API over the native core.

This module owns policy (argument checking, dtype casting, friendly error
messages, per-handle lock bookkeeping); the native ``_core`` module only moves
bytes, blocks and maps errors. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import operator
import os
import sys
import threading
import time
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from . import _cleanup, _core, _proc
from ._labels import state_label
from ._dtypes import SUPPORTED_DTYPES, code_dtype, dtype_code, normalize_dtype
from ._publication import Publication

InconsistentStreamError = _core.InconsistentStreamError
# Defined in the native module, which raises them from blocked waits:
#   StaleStreamError(RuntimeError)      the handle's stream was unlinked
#   +- StreamUnlinkedError              ... and nothing holds the name now
#   +- StreamReplacedError              ... and the name holds a new generation
StaleStreamError = _core.StaleStreamError
StreamUnlinkedError = _core.StreamUnlinkedError
StreamReplacedError = _core.StreamReplacedError

__all__ = [
    "InconsistentStreamError",
    "Publication",
    "SharedMemory",
    "StaleStreamError",
    "StreamReplacedError",
    "StreamUnlinkedError",
    "create",
    "gpu_available",
    "locked_many",
    "open",
    "stream",
    "unlink",
    "unlink_quiet",
]

_U64_MAX = 2**64 - 1
_get_ident = threading.get_ident


# Above this size a value that is not already in the payload's dtype and
# layout is cast/copied straight into the payload under the lock instead of
# through a temporary (one pass over the data instead of two).
_DIRECT_CAST_BYTES = 64 * 1024
# Payload slots of a new CPU stream when create() is given no slots=: AUTO_SLOTS
# for payloads up to AUTO_SLOTS_MAX_BYTES, one payload above (N copies of a
# large payload cost more memory than a reader that waits costs time). See
# docs/design.md, "Slotted CPU streams", for the measurements behind both.
AUTO_SLOTS = 3
AUTO_SLOTS_MAX_BYTES = 64 * 1024 * 1024
_SHM_DIR = "/dev/shm"
# Ring policies (create(ring=N, policy=...)), in header code order (csrc/core/ring.h).
RING_POLICIES = ("overwrite", "block", "drop_newest")

# write(casting=...): "checked" (the default rule, see _checked_cast), NumPy's
# "unsafe" (pyshmem's conversion: wrap-around, truncation), and NumPy's
# stricter table-based names.
_CASTINGS = ("checked", "unsafe", "same_kind", "safe", "equiv", "no")
# Elements per slice of the value check of a large value that is then cast
# straight into the payload: the slice and its converted copy stay in cache,
# so the check reads the value once more and allocates nothing large.
_CHECK_SLICE = 1 << 15


def gpu_available() -> bool:
    """Return whether GPU streams (``gpu_device="cuda:N"``) can work in this process.

    True when torch is installed with a visible CUDA device and torch_shmem
    was built with its CUDA half. Imports torch when it is installed (the
    only function of the NumPy path that does); False without torch.
    """
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    try:
        from . import _gpu
    except Exception:  # a broken torch install must not break torch_shmem
        return False
    return _gpu.availability()[0]


@functools.lru_cache(maxsize=None)
def gpu_supported_dtypes() -> frozenset:
    """The NumPy dtypes GPU streams accept: those with a torch equivalent.

    Imports torch, so it is only called on first access of
    ``torch_shmem.GPU_SUPPORTED_DTYPES`` (module ``__getattr__``); empty when
    torch is not installed or fails to import.
    """
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return frozenset()
    try:
        import torch
    except Exception:  # a broken torch install must not break torch_shmem
        return frozenset()
    return frozenset(d for d in SUPPORTED_DTYPES if isinstance(getattr(torch, d.name, None), torch.dtype))


def _wants_gpu(gpu_device: Any) -> bool:
    return gpu_device is not None and gpu_device is not False


def _gpu_module(name: str):
    """torch_shmem._gpu (it imports torch) for a GPU stream named ``name``.

    RuntimeError naming the stream, instead of an import error, when torch
    is not installed or this build of torch_shmem has no torch ops.
    """
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise RuntimeError(
            f"torch_shmem: stream {name!r}: GPU streams are unavailable: GPU streams need "
            "torch with CUDA, and torch is not installed (the NumPy-only install serves CPU streams)"
        )
    try:
        from . import _gpu
    except ImportError as exc:
        if exc.name != f"{__package__}._C":
            raise
        raise RuntimeError(
            f"torch_shmem: stream {name!r}: GPU streams are unavailable: torch_shmem was built "
            "without torch (no torch_shmem._C); rebuild it with torch installed: "
            "pip install --no-build-isolation ."
        ) from None
    return _gpu


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"torch_shmem: stream name must be a str, got {type(name).__name__}")
    _core.os_name(name)  # raises ValueError for empty, '/', control chars, too long
    return name


def _normalize_shape(shape: Any, name: str) -> tuple[int, ...]:
    if shape is None:
        raise TypeError(f"torch_shmem: stream {name!r}: shape is required")
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError as exc:
        raise TypeError(
            f"torch_shmem: stream {name!r}: shape must be a sequence of ints, got {shape!r}"
        ) from exc
    if any(d < 0 for d in dims):
        raise ValueError(f"torch_shmem: stream {name!r}: shape dimensions must be >= 0, got {dims}")
    if any(d >= 2**63 for d in dims):  # the header stores int64 dimensions
        raise ValueError(f"torch_shmem: stream {name!r}: shape dimensions must be < 2**63, got {dims}")
    if len(dims) > _core.MAX_DIMS:
        raise ValueError(
            f"torch_shmem: stream {name!r}: shape has {len(dims)} dimensions; "
            f"the limit is {_core.MAX_DIMS}"
        )
    return dims


def _check_casting(casting: Any, name: str) -> str:
    if casting not in _CASTINGS:
        raise ValueError(
            f"torch_shmem: stream {name!r}: casting must be one of "
            f"{', '.join(map(repr, _CASTINGS))}, got {casting!r}"
        )
    return casting


@functools.lru_cache(maxsize=None)
def _int_bounds(dst: np.dtype) -> tuple[int, int]:
    if dst.kind == "b":
        return 0, 1
    info = np.iinfo(dst)
    return int(info.min), int(info.max)


def _in_range(source: np.ndarray, dst: np.dtype) -> bool:
    """Whether every integer of 1-d ``source`` fits integer (or bool) dtype ``dst``.

    One reduction where it can: an unsigned source needs only its maximum;
    a signed one into a narrower unsigned (or bool) dtype only the maximum
    of its unsigned view (a negative value becomes larger than the bound),
    into an unsigned dtype at least as wide only its minimum. Signed into
    signed needs both.
    """
    lo, hi = _int_bounds(dst)
    if source.dtype.kind == "u":
        return int(source.max()) <= hi
    if source.dtype.kind == "b":
        return hi >= 1
    if lo == 0:
        size = source.dtype.itemsize
        if hi < 1 << (8 * size - 1):  # a negative value viewed as unsigned exceeds hi
            return int(source.view(np.dtype(f"u{size}")).max()) <= hi
        return int(source.min()) >= 0  # every non-negative value of the source fits
    return lo <= int(source.min()) and int(source.max()) <= hi


def _convert_into(source: np.ndarray, out: np.ndarray) -> tuple[int, str]:
    """Convert 1-d ``source`` into ``out`` (another dtype) under the "checked" rule.

    Returns (index of the first value the conversion changes, why), or (-1, "").
    Floats into floats or complex: rounding is accepted and the overflow
    flag of the cast itself tells an overflow to inf (no extra pass).
    Floats into integers or bool: the exact round trip, compared in one
    pass; both sides are promoted to float64, where a truncated, saturated
    or NaN-derived integer never equals its source.
    """
    dst = out.dtype
    if dst.kind in "fc":
        try:
            with np.errstate(over="raise", invalid="ignore"):
                np.copyto(out, source, casting="unsafe")
            return -1, ""
        except FloatingPointError:
            with np.errstate(all="ignore"):
                np.copyto(out, source, casting="unsafe")
            bad = np.isinf(out) & np.isfinite(source)
            return int(np.argmax(bad)), f"overflows {dst}"
    with np.errstate(all="ignore"):
        np.copyto(out, source, casting="unsafe")
    bad = out != source
    if bad.any():
        return int(np.argmax(bad)), f"is not representable in {dst}"
    return -1, ""


def _checked_cast(array: np.ndarray, dst: np.dtype, name: str, keep: bool) -> np.ndarray | None:
    """Convert ``array`` to ``dst`` under the "checked" rule, or raise ValueError.

    The rule (docs/api.md, "Writing another dtype"): to a bool or integer
    stream every value must convert exactly (it converts back to itself);
    to a float or complex stream values round to the nearest representable
    one, but a finite value that would overflow to inf is refused; a
    complex value written into a real stream must have a zero imaginary
    part. Returns the converted array (C layout) when ``keep``; otherwise
    only checks, at the price of one more read of ``array`` and nothing
    large allocated (integers by a range check, other casts slice by slice
    into one cache-sized buffer), and returns None, for a caller that casts
    it into the payload afterwards.
    """
    flat = array.reshape(-1)  # C order: a view unless the layout needs a copy
    source = flat

    def refuse(index: int, why: str) -> None:
        at = tuple(int(i) for i in np.unravel_index(index, array.shape))
        raise ValueError(
            f"torch_shmem: stream {name!r}: writing {array.dtype} values into this {dst} "
            f"stream would change them: {flat[index].item()!r} at index {at} {why}; "
            "convert the value first, or pass casting='unsafe' for NumPy's unsafe cast "
            "(wrap-around and truncation, as pyshmem did)"
        )

    if flat.dtype.kind == "c" and dst.kind != "c":
        imag = flat.imag != 0
        if imag.any():
            refuse(int(np.argmax(imag)), "has a nonzero imaginary part")
        source = flat.real
    if source.dtype.kind in "biu" and dst.kind in "biu":  # integers: a range check
        if source.size and not _in_range(source, dst):
            lo, hi = _int_bounds(dst)
            refuse(int(np.argmax((source < lo) | (source > hi))), f"is not representable in {dst}")
        return source.astype(dst).reshape(array.shape) if keep else None
    n = source.size
    if keep:
        out = np.empty(n, dst)
        bad, why = _convert_into(source, out)
        if bad >= 0:
            refuse(bad, why)
        return out.reshape(array.shape)
    buf = np.empty(min(n, _CHECK_SLICE), dst)
    for start in range(0, n, _CHECK_SLICE):
        part = source[start : start + _CHECK_SLICE]
        bad, why = _convert_into(part, buf[: part.size])
        if bad >= 0:
            refuse(start + bad, why)
    return None


class StreamHeader(NamedTuple):
    """A stream's publication state, read from its header in one step
    (:meth:`SharedMemory.header`)."""

    count: int  # completed publications
    write_time: float  # of the latest, seconds since the epoch (0.0: never written)
    frame_id: int  # stamped by the latest write that passed one (0 before)
    state: str  # "ok", "writing" or "inconsistent", as stat() says it
    unlinked: bool  # the stream was unlinked (it lives on for the handles open on it)
    lock_owner: int | None  # pid holding the write lock
    waiters: int  # threads parked on the stream's futex


class _LockScope:
    """Context manager returned by :meth:`SharedMemory.locked`."""

    __slots__ = ("_shm", "_timeout")

    def __init__(self, shm: "SharedMemory", timeout: float | None) -> None:
        self._shm = shm
        self._timeout = timeout

    def __enter__(self) -> "SharedMemory":
        self._shm.acquire(timeout=self._timeout)
        return self._shm

    def __exit__(self, exc_type, exc, tb) -> None:
        self._shm.release()


class _WriteView:
    """Context manager returned by :meth:`SharedMemory.write_view_locked`.

    A class, not a generator, because in-place producers enter one per frame.
    """

    __slots__ = ("_shm", "_frame_id")

    def __init__(self, shm: "SharedMemory", frame_id: int | None) -> None:
        self._shm = shm
        self._frame_id = frame_id

    def __enter__(self) -> np.ndarray:
        return self._shm._begin_view()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._shm._commit_view(self._frame_id)
        else:
            self._shm._abort_view()


class _LockedWriteView:
    """Context manager returned by :meth:`SharedMemory.write_view`."""

    __slots__ = ("_shm", "_frame_id", "_timeout")

    def __init__(self, shm: "SharedMemory", frame_id: int | None, timeout: float | None) -> None:
        self._shm = shm
        self._frame_id = frame_id
        self._timeout = timeout

    def __enter__(self) -> np.ndarray:
        self._shm.acquire(timeout=self._timeout)
        try:
            return self._shm._begin_view()
        except BaseException:
            self._shm.release()
            raise

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._shm._commit_view(self._frame_id)
            else:
                self._shm._abort_view()
        finally:
            self._shm.release()


def _check_frame_id(frame_id: Any, name: str) -> int | None:
    if frame_id is None:
        return None
    try:
        value = operator.index(frame_id)
    except TypeError:
        value = -1
    if not 0 <= value <= _U64_MAX:
        raise ValueError(
            f"torch_shmem: stream {name!r}: frame_id must be an int in [0, 2**64), got {frame_id!r}"
        )
    return value


def _closed_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"torch_shmem: stream {name!r} is closed on this handle (closed shared "
        f"memory cannot be used); reopen it with torch_shmem.open({name!r})"
    )


class HostPayload:
    """The payload of a handle whose data is in host memory.

    A :class:`SharedMemory` holds a payload object and delegates to it what
    depends on where the data lives. Its data operations have the native
    handle's signatures (``read(out, timeout)``, ``read_after(after, out,
    timeout)``, ``read_pub``, ``read_after_pub``, ``write(value, frame_id,
    timeout)`` returning NotImplemented for a value that needs converting,
    ``clear(timeout)``, ``live_array()``), and the handle calls them on its
    ``_io``: for host data that is the native handle itself (``_core``: the
    stream's segment, one payload or slots in it, or a GPU stream's CPU
    mirror, refusing the rest with its own message), so no Python frame
    sits between a CPU read or write and C. This object holds the rest:
    the ``gpu_device`` the handle reports, the DLPack device, the config
    keys, what is not supported, and whether a large value may be cast
    straight into the live payload. Stateless: host handles share ``_HOST``.
    The device payload (``torch_shmem._gpu.DevicePayload``, CUDA tensors)
    is its own ``_io``.
    """

    __slots__ = ()

    #: the handle's ``gpu_device``: host memory belongs to no CUDA device
    device = None
    #: a large value of another dtype or layout is cast into live_array()
    cast_in_place = True

    def unsupported(self, shm: "SharedMemory", what: str) -> None:
        """Raise when ``what`` is not offered on this payload: everything is."""

    def dlpack_device(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU

    def config(self, info: Any) -> dict:
        """Keys of :meth:`SharedMemory.to_config` that depend on the payload."""
        if not info.flags & _core.FLAG_GPU:
            return {"slots": info.nslots}  # explicit: the default depends on the size
        return {}

    def close(self) -> None:
        """Release what the payload holds besides the native handle: nothing."""


_HOST = HostPayload()


class SharedMemory:
    """A handle to a named shared-memory stream.

    Create one with :func:`create` or attach with :func:`open`. A stream has a
    fixed shape and dtype and holds the latest published value. Writers are
    serialized by a cross-process lock; ``read()`` returns a consistent
    snapshot of exactly one completed write without blocking writers;
    ``read_new()`` blocks until the next write.

    Handles are cheap, not thread-bound, and may be shared by threads. They
    pickle by name: a child process that unpickles one opens the stream again.

    A handle holds the native handle (``_core``: header, lock, waits, read
    statistics) and a payload object that moves the data: :class:`HostPayload`
    (ndarrays; CPU streams) or, for a GPU stream attached with
    ``gpu_device=``, ``torch_shmem._gpu.DevicePayload`` (CUDA tensors).
    """

    __slots__ = (
        "_h",
        "_io",
        "_payload",
        "_name",
        "_shape",
        "_dtype",
        "_size",
        "_owner",
        "_instance_id",
        "_creator_pid",
        "_held",
        "_create_time",
        "_auto_unlink",
        "_watches",
        "_cursors",
        "_reader",
        "__weakref__",
    )

    def __init__(self, handle: Any, *, owner: bool, payload: Any = None) -> None:
        code, shape, nbytes, _flags, creator_pid, instance_id, ctime, _mode = handle.info()
        self._h = handle
        # the payload, and the object that moves its data (see HostPayload)
        self._payload = _HOST if payload is None else payload
        self._io = handle if payload is None else payload
        self._name = handle.name
        self._shape = shape
        self._dtype = code_dtype(code)
        self._size = nbytes
        self._owner = owner
        self._instance_id = instance_id
        self._creator_pid = creator_pid
        self._create_time = ctime
        self._auto_unlink = False
        # lock levels taken through this handle, per thread (for close())
        self._held: dict[int, int] = {}
        # async waits on a readiness descriptor, per event loop (_aio.FdWatch);
        # made on first use (a WeakKeyDictionary: finished loops drop out)
        self._watches: Any = {}
        # ring cursors attached through this handle (released by close())
        self._cursors: list[Cursor] = []
        self._reader: Cursor | None = None

    # ------------------------------------------------------------------ state
    def _check_open(self) -> None:
        if self._h.closed:
            raise _closed_error(self._name)

    @property
    def name(self) -> str:
        """The stream's user-visible name (readable after close)."""
        return self._name

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called on this handle."""
        return self._h.closed

    @property
    def shape(self) -> tuple[int, ...]:
        self._check_open()
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        self._check_open()
        return self._dtype

    @property
    def size(self) -> int:
        """Payload size in bytes."""
        self._check_open()
        return self._size

    @property
    def gpu_device(self) -> str | None:
        """The CUDA device this handle is attached to (None: not attached)."""
        self._check_open()
        return self._payload.device

    @property
    def slots(self) -> int:
        """Payload slots of the stream: 1 for a single payload (see :func:`create`)."""
        self._check_open()
        return self._h.info().nslots

    @property
    def ring(self) -> int | None:
        """Slots of a ring (``create(ring=N)``), None for other streams."""
        info = self._h.ring_info()
        return None if info is None else info[0]

    @property
    def policy(self) -> str | None:
        """A ring's policy (``"overwrite"``, ``"block"``, ``"drop_newest"``), None for other streams."""
        info = self._h.ring_info()
        return None if info is None else RING_POLICIES[info[1]]

    @property
    def drops(self) -> int:
        """Writes a ``drop_newest`` ring dropped so far (all writers; 0 for other streams)."""
        info = self._h.ring_info()
        return 0 if info is None else info[2]

    def cursor(self, name: str, *, timeout: float | None = None) -> "Cursor":
        """Attach the ring cursor ``name`` for this process (see :class:`Cursor`).

        A new name starts at the current count (it consumes the publications
        made from now on); a name left by an earlier consumer (closed, or its
        process dead) resumes after the last publication that consumer read.
        Takes the stream lock briefly (TimeoutError after ``timeout``).
        Raises RuntimeError when the stream is not a ring, when a live
        process holds the name, or when all 32 cursors are held by live
        processes (cursors of dead ones are reclaimed first); ValueError
        for an empty name or one over 64 bytes (UTF-8).
        """
        self._check_open()
        cname = _check_cursor_name(name, self._name)
        if self._h.ring_info() is None:
            raise RuntimeError(
                f"torch_shmem: stream {self._name!r} is not a ring; cursors need a stream "
                f"created with torch_shmem.create({self._name!r}, ..., ring=N)"
            )
        index = self._io.cursor_attach(cname, timeout)
        cur = Cursor(self, cname, index)
        self._cursors.append(cur)
        return cur

    def read_next(self, *, timeout: float | None = None, out: np.ndarray | None = None) -> Publication:
        """The next publication for this handle's reader cursor (``open(name, reader=...)``).

        See :meth:`Cursor.read_next`. RuntimeError when the handle was
        opened without ``reader=``.
        """
        if self._reader is None:
            self._check_open()
            raise RuntimeError(
                f"torch_shmem: stream {self._name!r}: read_next() needs a cursor: open the "
                f"stream with torch_shmem.open({self._name!r}, reader='NAME') or use "
                "shm.cursor('NAME').read_next()"
            )
        return self._reader.read_next(timeout=timeout, out=out)

    async def read_next_async(
        self, *, timeout: float | None = None, out: np.ndarray | None = None
    ) -> Publication:
        """Awaitable :meth:`read_next` (see :meth:`Cursor.read_next_async`)."""
        if self._reader is None:
            self.read_next()  # raises: no cursor
        return await self._reader.read_next_async(timeout=timeout, out=out)

    @property
    def gpu_enabled(self) -> bool:
        """True for GPU streams (payload in device memory), attached or not."""
        self._check_open()
        return bool(self._h.info()[3] & _core.FLAG_GPU)

    @property
    def cpu_mirror(self) -> bool:
        """True when the payload is readable from host memory (always for CPU streams)."""
        self._check_open()
        flags = self._h.info()[3]
        return not flags & _core.FLAG_GPU or bool(flags & _core.FLAG_CPU_MIRROR)

    @property
    def owner(self) -> bool:
        """True on the handle that created the stream."""
        self._check_open()
        return self._owner

    @property
    def readonly(self) -> bool:
        self._check_open()
        return self._h.readonly

    @property
    def count(self) -> int:
        """Number of completed publications (writes and clears)."""
        return self._h.count()

    @property
    def write_sequence(self) -> int:
        """The seqlock sequence: ``2 * count``, plus one while a write is in progress."""
        return self._h.seq()

    @property
    def write_time(self) -> float:
        """UNIX time of the latest completed write, 0.0 before the first."""
        return self._h.state()[1] * 1e-9

    @property
    def frame_id(self) -> int:
        """The ``frame_id`` stamped by the latest write that passed one (0 before)."""
        return self._h.state()[2]

    @property
    def creator_pid(self) -> int:
        self._check_open()
        return self._creator_pid

    @property
    def instance_id(self) -> str:
        """32 hex characters, new for each generation of the name."""
        self._check_open()
        return self._instance_id.hex()

    @property
    def lock_owner(self) -> int | None:
        """The pid holding the write lock, or None when it is free."""
        pid = self._h.state()[5]
        return pid or None

    @property
    def last_read_count(self) -> int:
        """The count of the publication this handle read last.

        Before the handle's first read it is the stream's count when the
        handle was opened, so ``missed_writes`` counts from the open.
        """
        return self._h.read_stats()[0]

    @property
    def missed_writes(self) -> int:
        """Publications skipped between this handle's previous read and its latest."""
        return self._h.read_stats()[1]

    @property
    def total_missed_writes(self) -> int:
        """Sum of :attr:`missed_writes` over all reads of this handle."""
        return self._h.read_stats()[2]

    @property
    def notify(self) -> bool:
        """Whether the stream was created with ``notify=True``.

        pyshmem made futex notification opt-in; here every wait parks on a
        futex that writers wake, so the flag changes no behaviour. It is kept
        in the header (for :func:`stat`, :meth:`to_config`) as created.
        """
        self._check_open()
        return bool(self._h.info()[3] & _core.FLAG_NOTIFY)

    @property
    def age(self) -> float:
        """Seconds since the latest completed write; ``math.inf`` before the first."""
        written_ns = self._h.state()[1]
        if written_ns <= 0:
            return math.inf
        return max(0.0, time.time() - written_ns * 1e-9)

    def is_stale(self, max_age: float) -> bool:
        """True when the latest write is older than ``max_age`` seconds (or there is none).

        ``max_age`` must be positive (ValueError).
        """
        if not max_age > 0:
            raise ValueError(
                f"torch_shmem: stream {self._name!r}: max_age must be positive, got {max_age!r}"
            )
        return self.age > float(max_age)

    def header(self) -> StreamHeader:
        """The stream's publication state (count, write time, frame_id, state
        label, unlinked, lock owner, waiters) from one read of its header:
        the fields agree with each other, unlike separate property reads.
        Reads metadata only (no read is recorded)."""
        self._check_open()
        seq, write_ns, frame_id, broken, unlinked, lock_pid, _tid, waiters = self._h.state()
        return StreamHeader(seq >> 1, write_ns * 1e-9, frame_id, state_label(seq, broken, lock_pid),
                            bool(unlinked), lock_pid or None, waiters)

    def producer_alive(self) -> bool:
        """Whether the process that created the stream is still running.

        Best effort, this host only: a zombie counts as dead, and a pid that
        was recycled by a process started after the stream was created
        counts as dead too. It does not say whether anyone still writes (see
        :attr:`age`); a writer killed mid-write is detected separately
        (InconsistentStreamError).
        """
        self._check_open()
        return _proc.pid_alive(self._creator_pid, created_at=self._create_time)

    def __repr__(self) -> str:
        if self._h.closed:
            return f"SharedMemory(name={self._name!r}, closed)"
        return (
            f"SharedMemory(name={self._name!r}, shape={self._shape!r}, "
            f"dtype={str(self._dtype)!r}, gpu_device={self._payload.device!r})"
        )

    # ------------------------------------------------------------------ lock
    def acquire(self, *, timeout: float | None = None, poll_interval: float = 1e-3) -> None:
        """Take the cross-process write lock (re-entrant for the calling thread).

        Blocks (GIL released) until the lock is free; raises TimeoutError after
        ``timeout`` seconds. A lock whose holder died is taken over at once.
        ``poll_interval`` is accepted for pyshmem compatibility and ignored.
        """
        if self._h.readonly:
            self._check_open()
            raise PermissionError(
                f"torch_shmem: stream {self._name!r} is open read-only; cannot take its write lock"
            )
        self._h.acquire(timeout)
        # Each thread writes only its own entry and single dict operations are
        # atomic, so this per-handle bookkeeping needs no mutex; close() reads
        # a snapshot (list(items())).
        held, ident = self._held, _get_ident()
        held[ident] = held.get(ident, 0) + 1

    def release(self) -> None:
        """Release one level of the calling thread's lock."""
        self._h.release()
        held, ident = self._held, _get_ident()
        depth = held.get(ident, 0)
        if depth <= 1:
            held.pop(ident, None)
        else:
            held[ident] = depth - 1

    def locked(self, *, timeout: float | None = None, poll_interval: float = 1e-3) -> _LockScope:
        """Context manager holding the write lock; yields this handle."""
        return _LockScope(self, timeout)

    # ------------------------------------------------------------------ IO
    def _coerce(self, value: Any, casting: str = "checked") -> np.ndarray:
        """Slow path of write(): ``value`` in the stream's dtype, shape and C layout."""
        return self._cast(self._validated(value), _check_casting(casting, self._name), keep=True)

    def _validated(self, value: Any) -> np.ndarray:
        """``value`` as an array of the stream's shape, in its own dtype (no copy if possible)."""
        try:
            array = np.asarray(value)
            if array.dtype.kind not in "biufc" and not (
                hasattr(value, "dtype") or hasattr(value, "__array_interface__")
            ):
                # not numbers (strings, objects such as ints beyond 64 bits):
                # NumPy's own conversion to the stream's dtype decides
                array = np.asarray(value, dtype=self._dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ValueError(
                f"torch_shmem: stream {self._name!r}: cannot convert "
                f"{type(value).__name__} to {self._dtype} of shape {self._shape}: {exc}"
            ) from exc
        if array.shape != self._shape:
            raise ValueError(
                f"torch_shmem: stream {self._name!r}: expected shape {self._shape}, "
                f"got {array.shape}"
            )
        return array

    def _cast(self, array: np.ndarray, casting: str, *, keep: bool) -> np.ndarray | None:
        """Apply the ``casting`` rule to ``array`` (ValueError when refused).

        Returns it in the stream's dtype and C layout when ``keep``; None
        otherwise (the caller casts it into the payload, where no value can
        be refused any more).
        """
        dst = self._dtype
        if array.dtype != dst:
            if casting == "checked":
                if not np.can_cast(array.dtype, dst, "safe"):  # safe casts keep every value
                    if array.dtype.kind not in "biufc":
                        raise ValueError(
                            f"torch_shmem: stream {self._name!r}: expected dtype {dst}, got "
                            f"{array.dtype} (not numbers; casting='unsafe' lets NumPy convert them)"
                        )
                    return _checked_cast(array, dst, self._name, keep)
            elif casting != "unsafe" and not np.can_cast(array.dtype, dst, casting):
                raise ValueError(
                    f"torch_shmem: stream {self._name!r}: expected dtype {dst}, got "
                    f"{array.dtype} (not a {casting!r} cast)"
                )
        if not keep:
            return None
        return np.asarray(array, dtype=dst, order="C")

    def write(
        self,
        value: Any,
        *,
        frame_id: int | None = None,
        timeout: float | None = None,
        casting: str = "checked",
    ) -> None:
        """Publish ``value`` (copied in; the stream's shape, any numeric dtype).

        Takes the write lock for the copy (re-entrant if the calling thread
        holds it). ``frame_id`` stamps a 64-bit token read back by
        :attr:`frame_id`. A value of another dtype is converted under
        ``casting``: ``"checked"`` (default) accepts it when no value changes
        (7 and 3 as int64 into a uint8 stream; float streams round to
        nearest) and raises ValueError naming the first value that would
        (300 or 2.5 into uint8, an overflow to inf); ``"unsafe"`` is NumPy's
        unsafe cast (wrap-around and truncation, as pyshmem did); ``"no"``,
        ``"equiv"``, ``"safe"`` and ``"same_kind"`` are NumPy's rules.
        Raises ValueError for a wrong shape or a refused dtype, TimeoutError
        if the lock is not free within ``timeout``.
        """
        if casting != "checked":
            _check_casting(casting, self._name)
        if self._io.write(value, frame_id, timeout) is NotImplemented:
            self._check_open()
            array = self._validated(value)
            direct = (
                array.nbytes >= _DIRECT_CAST_BYTES
                and not self._h.readonly
                and self._payload.cast_in_place
                and self._h.ring_info() is None  # rings publish only whole copies
            )
            converted = self._cast(array, casting, keep=not direct)
            if converted is None:
                self._write_cast(array, _check_frame_id(frame_id, self._name), timeout)
            elif self._io.write(converted, frame_id, timeout) is NotImplemented:
                raise AssertionError("torch_shmem: internal error: coerced value rejected")

    def _write_cast(self, array: np.ndarray, frame_id: int | None, timeout: float | None) -> None:
        """Cast or re-layout a large value straight into the payload (one pass, no temporary)."""
        self._h.acquire(timeout)
        try:
            self._h.begin_write(None, True)  # every byte is written below
            try:
                # the casting rule was applied by _cast: the copy cannot fail midway
                np.copyto(self._payload_view(), array, casting="unsafe")
            except BaseException:
                self._h.abort_write()
                raise
            self._h.commit_write(frame_id)
        finally:
            self._h.release()

    def read(
        self,
        *,
        safe: bool = True,
        poll_interval: float = 1e-6,
        out: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Return the latest completed write.

        ``safe=True`` returns a copy of exactly one completed write (into
        ``out`` when given, with no allocation). It never blocks a writer;
        when a writer keeps overwriting the payload it falls back to the lock
        (bounded by ``timeout``). Raises InconsistentStreamError if the last
        writer died mid-write and nothing was published since.

        ``safe=False`` returns the live shared payload; the calling thread must
        hold the lock (``with shm.locked():``) and the view is only meaningful
        while it does. Editing it in place is not a publication: ``count`` does
        not move and concurrent safe readers may see a partial edit.
        """
        if safe:
            return self._io.read(out, timeout)
        return self._read(None, False, out, timeout, "read", False)

    def _check_live(self, out: Any, what: str) -> None:
        """Preconditions of a live-payload read: open, writable, no out, lock held."""
        self._check_open()
        if out is not None:
            raise ValueError(
                f"torch_shmem: stream {self._name!r}: out is only supported for safe reads"
            )
        if self._h.readonly:
            raise PermissionError(
                f"torch_shmem: stream {self._name!r} is open read-only; unsafe views need the lock"
            )
        if self._h.held_depth() <= 0:
            raise RuntimeError(
                f"torch_shmem: stream {self._name!r}: {what}() with safe=False requires the "
                "lock; use it inside 'with shm.locked():'"
            )

    def _read(
        self, after: int | None, safe: bool, out: Any, timeout: float | None, what: str, publication: bool
    ) -> Any:
        """Every synchronous read: wait until ``count > after`` (None: no wait;
        -1: a write newer than the call), then a snapshot (``safe``) or the
        live payload (lock held), as an array (a tensor on GPU handles) or a
        :class:`Publication`. The payload's ``_io`` moves the data."""
        h, io = self._h, self._io
        if publication and io is not h:
            self._payload.unsupported(self, f"{what}()")
        if safe:
            if not publication:
                return io.read(out, timeout) if after is None else io.read_after(after, out, timeout)
            if after is None:
                payload, count, write_time_ns, frame_id, missed = io.read_pub(out, timeout)
            else:
                payload, count, write_time_ns, frame_id, missed = io.read_after_pub(after, out, timeout)
            return Publication(payload, count, frame_id, write_time_ns * 1e-9, missed)
        self._check_live(out, what)
        if after is not None:
            h.wait_for_count(after, timeout)
        count, write_time_ns, frame_id, missed = h.note_read()
        if io is h:
            # a slotted stream keeps writing into this slot from now on, so the
            # view stays the live payload (docs/design.md, "Slotted CPU streams")
            h.pin_live()
        if not publication:
            return io.live_array()
        return Publication(io.live_array(), count, frame_id, write_time_ns * 1e-9, missed)

    def _payload_view(self) -> np.ndarray:
        # an ndarray over the live host payload whose base holds a buffer export
        return self._h.live_array()

    def _after(self, after: Any) -> int:
        try:
            value = operator.index(after)
        except TypeError:
            raise ValueError(
                f"torch_shmem: stream {self._name!r}: after must be an int, got {after!r}"
            ) from None
        if value < 0:
            raise ValueError(f"torch_shmem: stream {self._name!r}: after must be >= 0, got {value}")
        if value >= 2**63:  # seq = 2 * count is 64-bit: a count never reaches 2**63
            raise ValueError(
                f"torch_shmem: stream {self._name!r}: after must be < 2**63, got {value}"
            )
        return value

    def read_publication(
        self,
        *,
        safe: bool = True,
        poll_interval: float = 1e-6,
        out: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> Publication:
        """Like :meth:`read`, returning the payload with its publication metadata.

        ``count``, ``frame_id`` and ``write_time`` of the returned
        :class:`Publication` were captured in the same seqlock window as the
        payload copy, so they describe exactly that payload, even when other
        threads read through this handle at the same time. Blocks and raises
        as :meth:`read`. With ``safe=False`` (lock held) the payload is the
        live view and the metadata is the stream's current publication.
        """
        return self._read(None, safe, out, timeout, "read_publication", True)

    def read_new(
        self,
        *,
        timeout: float | None = None,
        safe: bool = True,
        poll_interval: float = 1e-5,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Block until a write newer than the moment of the call, then read.

        Edge-triggered at entry: it returns the first publication after the
        call (or a later one if several land before it wakes). A write that
        landed just before the call does not count, so do not use it for
        request/reply exchanges; wait on a count instead
        (:meth:`read_after`, :meth:`wait_for_count`). Raises TimeoutError
        after ``timeout`` seconds; RuntimeError if the handle is closed
        meanwhile. The GIL is released while waiting and the wait parks on a
        futex (no polling). ``safe=False`` needs the lock, and waiting while
        holding it keeps other writers out, so it only returns for writes of
        this thread's own making or times out.
        """
        if safe:
            return self._io.read_after(-1, out, timeout)
        return self._read(-1, False, out, timeout, "read_new", False)

    def read_new_publication(
        self,
        *,
        timeout: float | None = None,
        safe: bool = True,
        poll_interval: float = 1e-5,
        out: np.ndarray | None = None,
    ) -> Publication:
        """:meth:`read_new` returning a :class:`Publication` (see :meth:`read_publication`)."""
        return self._read(-1, safe, out, timeout, "read_new_publication", True)

    def read_after(
        self,
        after: int,
        *,
        timeout: float | None = None,
        safe: bool = True,
        poll_interval: float = 1e-5,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Wait until ``count > after``, then read (level-triggered).

        Returns at once when a publication newer than ``after`` already
        exists, so it is safe for request/reply and lock-step pipelines:
        note ``n = shm.count`` (or ``last_read_count``) before sending a
        request, then ``read_after(n)``. The wait and the copy share one
        ``timeout`` (TimeoutError). The count of the publication read is
        :attr:`last_read_count`; skipped ones are in :attr:`missed_writes`.
        Raises ValueError for a negative ``after``; RuntimeError if the
        handle is closed meanwhile.
        """
        return self._read(self._after(after), safe, out, timeout, "read_after", False)

    def read_after_publication(
        self,
        after: int,
        *,
        timeout: float | None = None,
        safe: bool = True,
        poll_interval: float = 1e-5,
        out: np.ndarray | None = None,
    ) -> Publication:
        """:meth:`read_after` returning a :class:`Publication` (see :meth:`read_publication`)."""
        return self._read(self._after(after), safe, out, timeout, "read_after_publication", True)

    def wait_for_count(
        self, *, after: int, timeout: float | None = None, poll_interval: float = 1e-5
    ) -> int:
        """Block until ``count > after`` (level-triggered); return the count.

        Copies nothing and records no read. TimeoutError after ``timeout``;
        RuntimeError if the handle is closed meanwhile.
        """
        return self._h.wait_for_count(self._after(after), timeout)

    def fileno(self) -> int:
        """A file descriptor that is readable while a publication newer than
        this handle's last read exists (:attr:`last_read_count`).

        For event loops: register it with :mod:`selectors`, ``select``,
        ``epoll`` or asyncio's ``loop.add_reader``; when it is readable, read
        with :meth:`read` or :meth:`read_publication` (not :meth:`read_new`,
        which waits for the write after that one). Every read through this
        handle re-arms it: readable again once something newer than what
        was read is published. The write path signals only handles whose
        descriptor is armed, so streams nobody watches pay nothing.

        Made on the first call (later calls return the same descriptor) and
        closed by :meth:`close`: unregister it from your loop first. It
        belongs to this process (a forked child must call ``fileno()`` on
        its own handle). A readiness can rarely be spurious (a writer's
        signal racing with this handle's own read): check the count of what
        you read, e.g. with :meth:`read_publication`. Up to 64 handles per
        stream may hold one at a time (RuntimeError beyond). Unlinking the
        stream makes armed descriptors readable once.
        """
        self._check_open()
        # GPU handles too: their device reads record the count they read on
        # the native handle (note_count), which re-arms the descriptor.
        return self._h.notify_fd()

    def clear(self, *, timeout: float | None = None) -> None:
        """Zero the payload; counts as a publication.

        Takes the write lock like :meth:`write`: TimeoutError if it is not
        free within ``timeout`` (None waits, as pyshmem's ``clear()`` did).
        """
        self._io.clear(timeout)

    # ----------------------------------------------------------- in place
    def write_locked(self, value: Any, *, frame_id: int | None = None, casting: str = "checked") -> None:
        """:meth:`write` for a caller that already holds the lock.

        Raises RuntimeError when the calling thread does not hold the lock
        (``with shm.locked():`` or :func:`locked_many`), so a missing lock is
        a loud error rather than a silent extra acquire.
        """
        self._check_open()
        if self._h.readonly:
            raise PermissionError(f"torch_shmem: stream {self._name!r} is open read-only")
        if self._h.held_depth() <= 0:
            raise RuntimeError(
                f"torch_shmem: stream {self._name!r}: write_locked() requires the lock; "
                "use it inside 'with shm.locked():' or use write()"
            )
        self.write(value, frame_id=frame_id, casting=casting)

    def write_view_locked(self, *, frame_id: int | None = None) -> _WriteView:
        """In-place publication for a caller that already holds the lock.

        ``with shm.write_view_locked() as view:`` yields the live payload
        (a writeable ndarray of the stream's shape); fill it in place, and a
        normal exit publishes it as one write (``count`` + 1, ``frame_id``
        stamped, waiters woken). Readers never see the partial edit: the
        stream is marked "write in progress" for the whole block, so
        concurrent safe reads wait for the commit or, after a short spin,
        queue on the lock. An exception in the block aborts: the stream is
        marked inconsistent and reads raise InconsistentStreamError until
        the next completed write. RuntimeError when the lock is not held.

        Inside the block do not write, clear or release the lock of this
        stream; a publication made inside it is detected at exit, the stream
        is marked inconsistent and RuntimeError is raised. The view must not
        be used after the block.
        """
        self._payload.unsupported(self, "write_view_locked()")
        return _WriteView(self, _check_frame_id(frame_id, self._name))

    def write_view(self, *, timeout: float | None = None, frame_id: int | None = None) -> _LockedWriteView:
        """Take the lock and publish in place: :meth:`write_view_locked` plus the lock.

        ``with shm.write_view(frame_id=7) as view: view[...] = ...`` is a
        zero-copy write. TimeoutError if the lock is not free within
        ``timeout``. See :meth:`write_view_locked` for the commit/abort
        contract.
        """
        self._payload.unsupported(self, "write_view()")
        return _LockedWriteView(self, _check_frame_id(frame_id, self._name), timeout)

    def _write_at(self, array: np.ndarray, count: int, frame_id: int | None,
                  timeout: float | None) -> int:
        """Publish ``array`` (the stream's exact dtype and shape) as publication
        ``count`` when that is past the current count, else as count + 1;
        return the count published. For carrying another stream's counts
        (the bridge): readers' missed-publication counts then follow the
        source's. Takes the lock (TimeoutError after ``timeout``); the copy is
        the native write's (as :meth:`write`).

        A CPU ring publishes through its policy, also at a count past the
        next one: cursors find the counts in between skipped (they count in
        ``missed_publications``). ``block`` waits for room as :meth:`write`
        does (TimeoutError after ``timeout``), ``overwrite`` never waits,
        ``drop_newest`` drops the write and the current count is returned.
        GPU streams (rings too) publish one count at a time (count + 1)."""
        self._check_open()
        if self._h.info().flags & _core.FLAG_GPU:
            with self.locked(timeout=timeout):
                self.write_locked(array, frame_id=frame_id)
                return self._h.count()
        at = max(int(count), 0)
        published = self._h.write(array, frame_id, timeout, at)
        if published is NotImplemented:
            converted = self._cast(self._validated(array), "checked", keep=True)
            published = self._h.write(converted, frame_id, timeout, at)
        return published if published else self._h.count()  # 0: a ring dropped it

    def _begin_view(self) -> np.ndarray:
        self._check_open()
        if self._h.readonly:
            raise PermissionError(f"torch_shmem: stream {self._name!r} is open read-only")
        if self._h.held_depth() <= 0:
            raise RuntimeError(
                f"torch_shmem: stream {self._name!r}: write_view_locked() requires the lock; "
                "use it inside 'with shm.locked():' or use write_view()"
            )
        seq, _, _, broken = self._h.state()[:4]
        if seq & 1 and not broken:
            # Under the lock an odd sequence that is not marked broken can
            # only be this thread's own unfinished write.
            raise RuntimeError(
                f"torch_shmem: stream {self._name!r}: a write view is already open on this "
                "stream in this thread; write views do not nest"
            )
        self._h.begin_write()
        try:
            return self._payload_view()
        except BaseException:
            self._h.abort_write()
            raise

    def _commit_view(self, frame_id: int | None) -> None:
        if not self._h.seq() & 1:
            # A write or clear published inside the block ended the
            # in-progress window early: later edits were visible to readers
            # as a completed write. Mark the stream torn and say so.
            self._h.begin_write()
            self._h.abort_write()
            raise RuntimeError(
                f"torch_shmem: stream {self._name!r}: a write was published inside a write "
                "view; the stream is marked inconsistent until the next write"
            )
        self._h.commit_write(frame_id)

    def _abort_view(self) -> None:
        if self._h.closed or self._h.held_depth() <= 0:
            return  # nothing can be done without the lock; the next writer repairs
        if not self._h.seq() & 1:
            self._h.begin_write()
        self._h.abort_write()

    # ------------------------------------------------------------------ async
    def _timeout_error(self, timeout: float | None, after: int | None) -> TimeoutError:
        what = "a write" if after is None else f"a write newer than count {after}"
        return TimeoutError(
            f"torch_shmem: stream {self._name!r}: timed out after {timeout:.3g} s waiting for {what}"
        )

    async def _wait_async(
        self, after: int, timeout: float | None, what: str, finish: Any
    ) -> Any:
        if timeout is not None and not timeout >= 0:
            raise ValueError(
                f"torch_shmem: stream {self._name!r}: timeout must be >= 0 or None, got {timeout!r}"
            )
        from . import _aio  # asyncio costs ~25 ms to import: only for async users

        h = self._h
        watch = self._fd_watch(_aio)
        if watch is not None:
            return await self._wait_fd(_aio, watch, after, timeout, what, finish)

        def wait(slice_: float) -> int:
            try:
                return h.wait_for_count(after, slice_)
            except RuntimeError:
                if h.closed:
                    raise RuntimeError(
                        f"torch_shmem: stream {self._name!r} was closed while a read was "
                        f"waiting on this handle ({what})"
                    ) from None
                raise

        return await _aio.run_wait(
            wait, finish, timeout=timeout, on_timeout=lambda: self._timeout_error(timeout, after)
        )

    def _fd_watch(self, _aio: Any) -> Any:
        """This handle's descriptor watch in the running loop (made on first
        use), or None where waits fall back to worker threads: the header
        cannot be pinned (unlinked, no write permission), the stream's table
        of descriptors is full, or TORCH_SHMEM_ASYNC_WAIT=thread."""
        import asyncio
        import os

        if os.environ.get("TORCH_SHMEM_ASYNC_WAIT", "fd") == "thread":
            return None
        import weakref

        loop = asyncio.get_running_loop()
        if not self._watches:
            self._watches = weakref.WeakKeyDictionary()
        watch = self._watches.get(loop)
        if watch is not None and not watch.closed:
            return watch
        for other in [lp for lp in list(self._watches) if lp.is_closed()]:
            self._watches.pop(other).close_threadsafe(None)  # closed, not yet collected
        try:
            notifier = _core.notifier(self._name, self._instance_id)
        except RuntimeError:  # every descriptor of the stream is taken
            return None
        if notifier is None:
            return None
        watch = self._watches[loop] = _aio.FdWatch(loop, notifier)
        return watch

    async def _wait_fd(self, _aio: Any, watch: Any, after: int, timeout: float | None,
                       what: str, finish: Any) -> Any:
        import asyncio

        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            count = await asyncio.wait_for(watch.wait(after), timeout)
        except asyncio.TimeoutError:
            raise self._timeout_error(timeout, after) from None
        except _aio.Closed:
            raise RuntimeError(
                f"torch_shmem: stream {self._name!r} was closed while a read was waiting on "
                f"this handle ({what})"
            ) from None
        except _aio.Gone:
            # unlinked: the synchronous wait raises the exact error (or returns
            # a publication that a handle still mapping the old stream made)
            count = self._h.wait_for_count(after, 0)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if self._size > _aio.INLINE_COPY_BYTES:
            return await _aio.run_in_thread(lambda: finish(count, remaining))
        return finish(count, remaining)

    async def wait_for_count_async(
        self, *, after: int, timeout: float | None = None, poll_interval: float = 1e-5
    ) -> int:
        """Awaitable :meth:`wait_for_count`; never blocks the event loop.

        The wait sits on a readiness descriptor registered with the running
        loop (or, where none can be had, in a worker thread: see
        torch_shmem._aio); cancelling the awaiting task returns at once.
        :meth:`close` from any thread wakes it with RuntimeError.
        """
        after = self._after(after)
        self._check_open()
        return await self._wait_async(after, timeout, "wait_for_count_async", lambda n, _: n)

    async def read_after_async(
        self,
        after: int,
        *,
        timeout: float | None = None,
        safe: bool = True,
        poll_interval: float = 1e-5,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Awaitable :meth:`read_after` (safe reads only); never blocks the event loop.

        A task cancelled before the wait completes reads nothing and leaves
        ``out`` untouched (see :meth:`wait_for_count_async` for how it waits).
        """
        return await self._read_async(self._after(after), safe, timeout, out, "read_after_async", False)

    async def read_new_async(
        self,
        *,
        timeout: float | None = None,
        safe: bool = True,
        poll_interval: float = 1e-5,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Awaitable :meth:`read_new` (safe reads only); never blocks the event loop.

        Edge-triggered at the moment the coroutine starts running (when it is
        awaited or its task first runs). Cancelling the awaiting task
        returns at once, reads nothing and leaves ``out`` untouched (see
        :meth:`wait_for_count_async` for how it waits). :meth:`close` wakes
        it with RuntimeError; TimeoutError after ``timeout``.
        """
        return await self._read_async(None, safe, timeout, out, "read_new_async", False)

    async def read_new_publication_async(
        self,
        *,
        timeout: float | None = None,
        safe: bool = True,
        poll_interval: float = 1e-5,
        out: np.ndarray | None = None,
    ) -> Publication:
        """Awaitable :meth:`read_new_publication`; see :meth:`read_new_async`."""
        return await self._read_async(None, safe, timeout, out, "read_new_publication_async", True)

    async def read_after_publication_async(
        self,
        after: int,
        *,
        timeout: float | None = None,
        safe: bool = True,
        poll_interval: float = 1e-5,
        out: np.ndarray | None = None,
    ) -> Publication:
        """Awaitable :meth:`read_after_publication`; see :meth:`read_after_async`."""
        return await self._read_async(
            self._after(after), safe, timeout, out, "read_after_publication_async", True
        )

    async def _read_async(
        self, after: int | None, safe: bool, timeout: float | None, out: Any, what: str, publication: bool
    ) -> Any:
        """The async reads: wait until ``count > after`` (None: the count now), then
        read what the synchronous form of the same read returns."""
        self._check_async(safe)
        if publication:
            self._payload.unsupported(self, f"{what}()")

            def finish(_: int, rem: float | None) -> Any:
                return self.read_publication(out=out, timeout=rem)
        else:
            def finish(_: int, rem: float | None) -> Any:
                return self.read(out=out, timeout=rem)
        if after is None:
            after = self._h.count()
        return await self._wait_async(after, timeout, what, finish)

    def _check_async(self, safe: bool) -> None:
        self._check_open()
        if not safe:
            # the lock is per thread, and an async read may complete in another one
            raise ValueError(
                f"torch_shmem: stream {self._name!r}: async reads are safe reads only "
                "(safe=False needs the lock, which belongs to a thread)"
            )

    # ---------------------------------------------------------- description
    def describe(self) -> str:
        """A multi-line human summary of the stream and this handle.

        First pyshmem 1.4's lines, in its order and layout (``label:`` padded
        to 14 columns): name, shape, dtype, size, gpu_enabled, gpu_device,
        cpu_mirror, count, write_time, write_seq, owner, readonly,
        creator_pid, producer, age, notify. Then this library's: state, last
        write (local time), frame_id, lock, waiters, instance_id, slots (slotted streams only) and this
        handle's read statistics. Reads metadata only.
        """
        self._check_open()
        seq, write_ns, frame_id, broken, _unlinked, lock_pid, _tid, waiters = self._h.state()
        last_read, missed, total_missed = self._h.read_stats()[:3]
        state = state_label(seq, broken, lock_pid)  # the words of stat() and the CLI
        if state == "inconsistent":
            state = "inconsistent (a write was cut short)"
        age = self.age
        if write_ns:
            written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(write_ns * 1e-9))
            written += f" ({age:.3f} s ago)"
        else:
            written = "never"
        alive = "alive" if self.producer_alive() else "dead"
        lock = "free" if not lock_pid else f"held by pid {lock_pid}"
        lines = [
            # pyshmem 1.4's fields, layout and order (programs parse them)
            f"name:         {self._name}",
            f"shape:        {self._shape}",
            f"dtype:        {self._dtype}",
            f"size:         {self._size} bytes",
            f"gpu_enabled:  {self.gpu_enabled}",
            f"gpu_device:   {self.gpu_device}",
            f"cpu_mirror:   {self.cpu_mirror}",
            f"count:        {seq >> 1}",
            f"write_time:   {write_ns * 1e-9}",
            f"write_seq:    {seq}",
            f"owner:        {self._owner}",
            f"readonly:     {self._h.readonly}",
            f"creator_pid:  {self._creator_pid}",
            f"producer:     {alive}",
            f"age:          {age:.3f} s",
            f"notify:       {self.notify}",
            # torch_shmem's additions
            f"state:        {state}",
            f"last write:   {written}",
            f"frame_id:     {frame_id}",
            f"lock:         {lock}",
            f"waiters:      {waiters}",
            f"instance_id:  {self._instance_id.hex()}",
            f"reads:        last count {last_read}, missed {missed}, total missed {total_missed}",
        ]
        nslots = self._h.info().nslots
        if nslots != 1:  # slotted streams only: single-payload output stays as it was
            lines.insert(-1, f"slots:        {nslots}")
        ring = self._h.ring_info()
        if ring is not None:
            lines.insert(-1, f"ring:         {ring[0]} ({RING_POLICIES[ring[1]]}, {ring[2]} dropped, "
                             f"{len(ring[3])} cursors)")
        return "\n".join(lines)

    def to_config(self) -> dict:
        """The stream's configuration as a plain dict for :meth:`create_from_config`.

        Keys as in pyshmem: ``name``, ``shape`` (list), ``dtype`` (str),
        ``gpu_device``, ``cpu_mirror``, ``notify``; ``slots`` too for a
        slotted CPU stream and for a GPU handle (whose config re-creates the
        same GPU stream), ``ring`` and ``policy`` for a ring.
        """
        self._check_open()
        config = {
            "name": self._name,
            "shape": list(self._shape),
            "dtype": str(self._dtype),
            "gpu_device": self._payload.device,
            "cpu_mirror": self.cpu_mirror,
            "notify": self.notify,
        }
        info = self._h.info()
        ring = self._h.ring_info()
        if ring is not None:
            config["ring"] = ring[0]
            config["policy"] = RING_POLICIES[ring[1]]
        else:
            config.update(self._payload.config(info))
        return config

    @classmethod
    def create_from_config(cls, config: dict) -> "SharedMemory":
        """Create a new stream from a :meth:`to_config` dict (or a hand-written one).

        Needs ``name`` and ``shape``; ``dtype`` (default float32),
        ``gpu_device``, ``cpu_mirror``, ``notify``, ``mode``, ``slots``,
        ``ring`` and ``policy`` are optional.
        Raises as :func:`create`.
        """
        return create(
            config["name"],
            shape=config["shape"],
            dtype=config.get("dtype", "float32"),
            gpu_device=config.get("gpu_device"),
            cpu_mirror=config.get("cpu_mirror"),
            notify=config.get("notify", False),
            mode=config.get("mode", 0o600),
            slots=config.get("slots"),
            ring=config.get("ring"),
            policy=config.get("policy"),
        )

    # ----------------------------------------------------------------- DLPack
    def __dlpack_device__(self) -> tuple[int, int]:
        """``(1, 0)``: kDLCPU. CPU streams live in host memory (a GPU handle
        names its device: ``(2, index)``, kDLCUDA)."""
        self._check_open()
        return self._payload.dlpack_device()

    def __dlpack__(self, *, stream: Any = None, **kwargs: Any) -> Any:
        """Export a snapshot (a :meth:`read` copy) as a DLPack capsule.

        ``np.from_dlpack(shm)`` and ``torch.from_dlpack(shm)`` get an array
        that owns a private copy of one completed write: never torn, never
        aliasing the shared payload, valid after this handle closes. For a
        live zero-copy view use ``read(safe=False)`` under the lock.
        """
        snapshot = self.read()
        try:
            return snapshot.__dlpack__(stream=stream, **kwargs)
        except TypeError:
            # NumPy versions that predate the newer keywords (max_version, copy)
            return snapshot.__dlpack__()

    # ------------------------------------------------------------ lifecycle
    def close(self, *, timeout: float = 5.0) -> None:
        """Release this handle (the stream itself lives on). Idempotent.

        Readers blocked on this handle in other threads are woken and raise
        RuntimeError. Lock levels taken through this handle by the calling
        thread are released; raises RuntimeError if another thread holds the
        lock through this handle.
        """
        if self._h.closed:
            return
        ident = _get_ident()
        snapshot = list(self._held.items())  # one C-level copy: atomic under the GIL
        others = [t for t, d in snapshot if t != ident and d > 0]
        mine = self._held.get(ident, 0)
        if others:
            raise RuntimeError(
                f"torch_shmem: cannot close stream {self._name!r}: another thread owns its "
                "lock through this handle"
            )
        for _ in range(mine):
            self._h.release()
        self._held.clear()
        if self._watches:
            from . import _aio

            watches, self._watches = list(self._watches.values()), {}
            for watch in watches:
                watch.close_threadsafe(_aio.Closed())
        for cur in list(self._cursors):
            cur.close()
        self._h.close(timeout)
        self._payload.close()

    def unlink(self) -> None:
        """Close this handle and destroy the stream (other handles keep their mapping).

        Raises StreamReplacedError (a StaleStreamError; removes nothing)
        when the name was re-created since this handle opened it;
        PermissionError on a read-only handle. A stream already unlinked is
        not an error. Blocked waits of every handle of the stream, in any
        process, end with StreamUnlinkedError or StreamReplacedError
        (see :meth:`read_new`).
        """
        if self._h.readonly:
            self._check_open()
            raise PermissionError(
                f"torch_shmem: stream {self._name!r} is open read-only; cannot unlink it"
            )
        instance_id = self._instance_id
        self.close()
        _cleanup.forget(self._name, instance_id)
        if unlink_generation(self._name, instance_id) == "replaced":
            raise StreamReplacedError(
                f"torch_shmem: stream {self._name!r} was re-created since this handle "
                "opened it: the name belongs to a newer generation, which is left alone"
            )

    def delete(self) -> None:
        """Alias of :meth:`unlink`."""
        self.unlink()

    def __enter__(self) -> "SharedMemory":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._auto_unlink:
            self.unlink()
        else:
            self.close()

    def __reduce__(self):
        return (_reopen, (self._name, self._h.readonly, self._payload.device))

    def __del__(self) -> None:
        # Drop lock levels this thread still holds through a forgotten handle.
        try:
            h = self._h
        except AttributeError:
            return
        try:
            if not h.closed:
                mine = self._held.get(threading.get_ident(), 0)
                for _ in range(mine):
                    h.release()
        except Exception:
            pass


def _reopen(name: str, readonly: bool, gpu_device: str | None = None) -> SharedMemory:
    return open(name, readonly=readonly, gpu_device=gpu_device)


def create(
    name: str,
    *,
    shape: Sequence[int] | int,
    dtype: Any = np.float32,
    size: int | None = None,
    gpu_device: str | None = None,
    cpu_mirror: bool | None = None,
    mode: int = 0o600,
    auto_unlink: bool = False,
    notify: bool = False,
    slots: int | None = None,
    ring: int | None = None,
    policy: str | None = None,
) -> SharedMemory:
    """Create a new stream and return its (owner) handle.

    ``shape`` is any tuple of non-negative ints (``()`` for a scalar);
    ``dtype`` a NumPy dtype or string. ``size``, when given, must equal the
    payload bytes. ``mode`` sets the permission bits (0600 by default: only
    this user). The pages are reserved up front, so a stream larger than the
    free space of /dev/shm fails here with OSError(ENOSPC). Raises
    FileExistsError when the name is taken. The stream outlives this process
    until :func:`unlink`.

    The handle is a context manager: leaving the ``with`` block closes it,
    or unlinks the stream when ``auto_unlink=True`` (see also :func:`stream`).
    With ``auto_unlink=True`` the stream is also unlinked when this process
    exits (atexit: a normal exit, ``sys.exit``, an uncaught exception or
    KeyboardInterrupt) or is terminated by SIGTERM, SIGINT or SIGHUP whose
    handler was the default one (a handler is installed for those, from the
    main thread only; see docs/api.md, "Signals"). SIGKILL cannot be
    handled: ``torch-shmem purge --dead-only`` removes what it leaves.
    ``notify`` is accepted for pyshmem compatibility and only recorded (it
    shows in :func:`stat`): every wait here parks on a futex that writers wake.

    ``slots`` (CPU streams, 1 to 16) is the number of payload copies the
    stream keeps. With 1 the payload is rewritten in place; with N > 1 each
    write fills the slot after the latest one and then publishes it, so a
    reader copying the latest publication is not overtaken unless the writer
    completes N - 1 more writes meanwhile (docs/design.md, "Slotted CPU
    streams"). The guarantees are the same; the segment holds N payloads.
    Without ``slots`` a stream gets 3 when its payload is at most 64 MiB
    and the 3 copies take at most half of the free space of /dev/shm, else
    1 (``AUTO_SLOTS``, ``AUTO_SLOTS_MAX_BYTES``).

    ``ring`` (CPU streams, 2 to 4096) makes a ring of N slots: readers
    with named cursors (:meth:`SharedMemory.cursor`, ``open(reader=)``)
    consume every publication in order with :meth:`Cursor.read_next`, and
    ``policy`` says what a write does when the ring is full for a live
    cursor: ``"overwrite"`` (default; the writer never waits, the reader
    skips and is told how many it missed), ``"block"`` (the writer waits,
    up to its ``timeout``, until the slowest live cursor consumed the
    publication it would overwrite) or ``"drop_newest"`` (the write is
    dropped and counted in :attr:`SharedMemory.drops`). A ring is a slotted
    stream (``slots`` is then N; do not pass both). ``read()`` and
    ``read_new()`` keep their latest-value meaning. docs/api.md, "Rings".

    A GPU stream keeps 2 to 16 slots in device memory (docs/gpu.md); it has
    no single-payload form, so no ``slots`` or 1 gives it 3.
    """
    _check_name(name)
    nslots = None if slots is None else _check_slots(slots, name)
    nring, policy_code = _check_ring(ring, policy, nslots, name)
    dims = _normalize_shape(shape, name)
    try:
        dt = normalize_dtype(dtype, name=name)
    except SyntaxError:  # NumPy parses dtype strings with ast: dtype="," is a SyntaxError
        raise TypeError(f"torch_shmem: stream {name!r}: {dtype!r} is not a dtype") from None
    expected = math.prod(dims) * dt.itemsize
    if math.prod(d for d in dims if d) * dt.itemsize >= 2**63:
        # NumPy refuses such an array even when a zero dimension makes it
        # empty, so the stream could never be read: refuse it here
        raise ValueError(f"torch_shmem: stream {name!r}: shape {dims} is too large")
    if size is not None and operator.index(size) != expected:
        raise ValueError(
            f"torch_shmem: stream {name!r}: size does not match shape and dtype: "
            f"expected {expected}, got {size}"
        )
    mode = operator.index(mode)
    if mode & ~0o777:
        raise ValueError(f"torch_shmem: stream {name!r}: mode must be within 0o777, got {oct(mode)}")
    try:
        if _wants_gpu(gpu_device):
            gpu = _gpu_module(name)
            if nring:
                # A GPU ring: device slots, per-cursor device counters (docs/gpu.md, "GPU rings").
                if nring > _core.MAX_SLOTS:
                    raise ValueError(
                        f"torch_shmem: stream {name!r}: a GPU ring holds 2 to {_core.MAX_SLOTS} "
                        f"publications, got ring={nring}"
                    )
                if cpu_mirror:
                    raise ValueError(f"torch_shmem: stream {name!r}: a GPU ring keeps no CPU mirror")
                shm = gpu.create_handle(name, dims, dt, gpu_device, False, mode, notify, nring,
                                        ring_policy=policy_code)
            else:
                shm = gpu.create_handle(name, dims, dt, gpu_device, bool(cpu_mirror), mode, notify,
                                        gpu.DEFAULT_SLOTS if nslots in (None, 1) else nslots)
            _set_auto_unlink(shm, auto_unlink)
            return shm
        flags = _core.FLAG_NOTIFY if notify else 0
        if nslots is None:
            nslots = _auto_slots(expected)
        if nring:
            handle = _core.create(
                name, dtype_code(dt), dims, mode,
                flags | _core.FLAG_HOST_SLOTS | _core.FLAG_RING, nring, policy_code,
            )
        elif nslots > 1:
            handle = _core.create(name, dtype_code(dt), dims, mode, flags | _core.FLAG_HOST_SLOTS, nslots)
        else:
            handle = _core.create(name, dtype_code(dt), dims, mode, flags)
    except FileExistsError as exc:
        raise FileExistsError(
            exc.errno,
            f"torch_shmem: stream {name!r} already exists; attach to it with "
            f"torch_shmem.open({name!r}) or remove it with torch_shmem.unlink({name!r})",
        ) from None
    shm = SharedMemory(handle, owner=True)
    _set_auto_unlink(shm, auto_unlink)
    return shm


def _auto_slots(payload_bytes: int) -> int:
    """create()'s slot count when none is given: AUTO_SLOTS up to AUTO_SLOTS_MAX_BYTES,
    unless the slots would take more than half of the free space of /dev/shm (a
    container's default 64 MiB, say): then one payload, so that the default never
    makes a stream fail to fit that would fit alone."""
    if payload_bytes > AUTO_SLOTS_MAX_BYTES:
        return 1
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:
        return AUTO_SLOTS
    return AUTO_SLOTS if AUTO_SLOTS * payload_bytes <= st.f_bavail * st.f_frsize // 2 else 1


def _check_slots(slots: Any, name: str) -> int:
    """The slot count of create(): an int in [1, MAX_SLOTS]."""
    if isinstance(slots, bool) or not isinstance(slots, numbers.Integral):
        raise TypeError(
            f"torch_shmem: stream {name!r}: slots must be an int, got {type(slots).__name__}"
        )
    n = int(slots)
    if not 1 <= n <= _core.MAX_SLOTS:
        raise ValueError(
            f"torch_shmem: stream {name!r}: slots must be between 1 and {_core.MAX_SLOTS}, got {n}"
        )
    return n


def _check_ring(ring: Any, policy: Any, nslots: int | None, name: str) -> tuple[int, int]:
    """create()'s ring and policy: (0, 0) for no ring, else (N, policy code)."""
    if ring is None:
        if policy is not None:
            raise ValueError(
                f"torch_shmem: stream {name!r}: policy={policy!r} needs a ring (create(..., ring=N))"
            )
        return 0, 0
    if isinstance(ring, bool) or not isinstance(ring, numbers.Integral):
        raise TypeError(
            f"torch_shmem: stream {name!r}: ring must be an int (slots of the ring), "
            f"got {type(ring).__name__}"
        )
    n = int(ring)
    if not 2 <= n <= _core.MAX_RING:
        raise ValueError(
            f"torch_shmem: stream {name!r}: ring must be between 2 and {_core.MAX_RING}, got {n}"
        )
    if nslots not in (None, 1):
        raise ValueError(
            f"torch_shmem: stream {name!r}: ring= and slots= exclude each other "
            f"(a ring of N publications is a slotted stream of N slots)"
        )
    if policy is None:
        policy = "overwrite"
    if not isinstance(policy, str):
        raise TypeError(
            f"torch_shmem: stream {name!r}: policy must be a str, got {type(policy).__name__}"
        )
    if policy not in RING_POLICIES:
        raise ValueError(
            f"torch_shmem: stream {name!r}: policy must be one of {', '.join(map(repr, RING_POLICIES))}, "
            f"got {policy!r}"
        )
    return n, RING_POLICIES.index(policy)


def _check_cursor_name(cname: Any, name: str) -> str:
    if not isinstance(cname, str):
        raise TypeError(
            f"torch_shmem: stream {name!r}: a cursor name must be a str, got {type(cname).__name__}"
        )
    raw = cname.encode("utf-8", "surrogatepass")
    if not raw or len(raw) > _core.MAX_CURSOR_NAME_BYTES or b"\0" in raw:
        raise ValueError(
            f"torch_shmem: stream {name!r}: a cursor name must be 1 to "
            f"{_core.MAX_CURSOR_NAME_BYTES} bytes (UTF-8) without NUL, got {cname!r}"
        )
    return cname


class Cursor:
    """A named reader position in a ring (``shm.cursor(name)``).

    The position lives in the stream (its control area), with the name and
    the owning process: every publication is delivered once per cursor, in
    count order; a consumer that restarts under the same name resumes after
    the last publication it consumed. One process holds a name at a time;
    threads of that process may share the cursor (each publication goes to
    exactly one of them). Under the ``block`` policy a live cursor holds
    the writer when it lags a full ring; a closed cursor, or one whose
    process died, no longer does (it keeps its place).
    """

    __slots__ = ("_shm", "_name", "_index", "_closed")

    def __init__(self, shm: SharedMemory, name: str, index: int) -> None:
        self._shm = shm
        self._name = name
        self._index = index
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed or self._shm.closed

    @property
    def consumed(self) -> int:
        """Count of the last publication this cursor consumed (0: none)."""
        self._check()
        return self._shm._h.cursor_consumed(self._index)

    @property
    def lag(self) -> int:
        """Publications made that this cursor has not consumed yet."""
        self._check()
        return max(0, self._shm._h.count() - self._shm._h.cursor_consumed(self._index))

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError(
                f"torch_shmem: cursor {self._name!r} of stream {self._shm.name!r} is closed"
            )

    def read_next(self, *, timeout: float | None = None, out: np.ndarray | None = None) -> Publication:
        """The next publication this cursor has not consumed, as a :class:`Publication`.

        Blocks (futex wait, GIL released; None waits forever) until one
        exists; TimeoutError after ``timeout``. ``missed_publications`` is
        the number of publications skipped because the writer overwrote
        them before this cursor got to them (``overwrite`` policy, or a
        cursor that was closed or dead under ``block``). ``count``,
        ``frame_id`` and ``write_time`` are those of the publication
        returned. Raises StreamUnlinkedError when the stream was unlinked
        and nothing is left to consume.
        """
        self._check()
        payload, count, write_time_ns, frame_id, missed = self._shm._io.read_next(
            self._index, out, timeout
        )
        return Publication(payload, count, frame_id, write_time_ns * 1e-9, missed)

    async def read_next_async(
        self, *, timeout: float | None = None, out: np.ndarray | None = None
    ) -> Publication:
        """Awaitable :meth:`read_next`; never blocks the event loop.

        Waits on the handle's readiness descriptor in the running loop (or in
        a worker thread where none can be had, as the other async reads) for
        a publication past this cursor's position, then takes it without
        waiting; when a thread sharing the cursor took it first, waits again.
        TimeoutError after ``timeout`` in all; cancelling the awaiting task
        consumes nothing.
        """
        self._check()
        shm = self._shm
        if timeout is not None and not timeout >= 0:
            raise ValueError(
                f"torch_shmem: stream {shm.name!r}: timeout must be >= 0 or None, got {timeout!r}"
            )
        deadline = None if timeout is None else time.monotonic() + timeout

        def take(_count: int, _remaining: float | None) -> Publication | None:
            try:
                return self.read_next(timeout=0, out=out)
            except TimeoutError:
                return None  # another thread of this process took it first

        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            pub = await shm._wait_async(self.consumed, remaining, "read_next_async", take)
            if pub is not None:
                return pub
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"torch_shmem: stream {shm.name!r}: cursor {self._name!r}: timed out after "
                    f"{timeout:.3g} s waiting for a publication"
                )

    def close(self) -> None:
        """Release the cursor (it keeps its name and position). Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError):
            self._shm._cursors.remove(self)
        if not self._shm.closed:
            self._shm._h.cursor_detach(self._index)

    def __enter__(self) -> "Cursor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"consumed={self.consumed}"
        return f"<torch_shmem.Cursor {self._name!r} of {self._shm.name!r} {state}>"


def _set_auto_unlink(shm: SharedMemory, auto_unlink: bool) -> None:
    shm._auto_unlink = bool(auto_unlink)
    if auto_unlink:
        # unlinked at exit and on SIGTERM/SIGINT/SIGHUP (torch_shmem/_cleanup.py)
        _cleanup.register(shm._name, shm._instance_id, unlink_generation)


def open(  # noqa: A001
    name: str,
    *,
    gpu_device: str | None = None,
    readonly: bool = False,
    wait: float | None = 0.0,
    reader: str | None = None,
) -> SharedMemory:
    """Attach to an existing stream.

    Raises FileNotFoundError (pointing to :func:`create`) when it does not
    exist, ValueError when the name holds a foreign or corrupted segment,
    PermissionError when this user may not open it. ``readonly=True`` maps
    the payload read-only and refuses writes and the lock.

    ``wait`` is for a consumer that may start before its producer: up to
    that many seconds (None: no limit) for the name to appear, then it opens
    the stream once its creator has initialised it. The name is polled with
    a backoff from 1 ms to 50 ms; Ctrl-C interrupts the wait. TimeoutError
    (naming the stream) when it does not appear in time. ``wait=0`` (the
    default) does not wait.

    ``reader`` (rings only) attaches the cursor of that name
    (:meth:`SharedMemory.cursor`) for :meth:`SharedMemory.read_next`; it
    is released when the handle closes.
    """
    _check_name(name)
    wait = _check_wait(wait, name)
    if reader is not None:
        _check_cursor_name(reader, name)
    if _wants_gpu(gpu_device):
        gpu = _gpu_module(name)  # imports torch: only for GPU attachments
        return gpu.open_handle(_open_handle(name, bool(readonly), wait), name, gpu_device, bool(readonly))
    handle = _open_handle(name, bool(readonly), wait)
    shm = SharedMemory(handle, owner=False)
    if reader is not None:
        try:
            shm._reader = shm.cursor(reader)
        except BaseException:
            shm.close()
            raise
    return shm


# Polling of open(wait=...): the first retry after 1 ms, the delay doubling
# up to 50 ms. A failed shm_open costs a few microseconds, so this is cheap
# and needs no inotify watch (a limited per-user resource) on /dev/shm.
_OPEN_POLL_FIRST = 1e-3
_OPEN_POLL_MAX = 0.05


def _check_wait(wait: Any, name: str) -> float | None:
    if wait is None:
        return None
    if isinstance(wait, bool) or not isinstance(wait, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"torch_shmem: stream {name!r}: wait must be a number of seconds or None, got {wait!r}"
        )
    wait = float(wait)
    if not wait >= 0:
        raise ValueError(f"torch_shmem: stream {name!r}: wait must be >= 0 or None, got {wait!r}")
    return wait


def _open_handle(
    name: str, readonly: bool, wait: float | None, stop: threading.Event | None = None
) -> Any:
    """``_core.open``, retried while the name does not exist, for ``wait`` seconds (None: no limit).

    Returns None when ``stop`` is set while waiting.
    """
    deadline = None if wait is None else time.monotonic() + wait
    delay = _OPEN_POLL_FIRST
    while True:
        try:
            return _core.open(name, readonly)
        except FileNotFoundError:
            if wait == 0:
                raise FileNotFoundError(
                    2,
                    f"torch_shmem: stream {name!r} does not exist; create it with "
                    f"torch_shmem.create({name!r}, shape=..., dtype=...), or wait for its "
                    f"producer with torch_shmem.open({name!r}, wait=seconds)",
                ) from None
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise TimeoutError(
                f"torch_shmem: stream {name!r} did not appear within {wait:.3g} s; its producer "
                f"creates it with torch_shmem.create({name!r}, shape=..., dtype=...)"
            )
        pause = delay if deadline is None else min(delay, deadline - now)
        if stop is None:
            time.sleep(pause)
        elif stop.wait(pause):
            return None
        delay = min(delay * 2, _OPEN_POLL_MAX)


def unlink(name: str) -> None:
    """Destroy the named stream; a silent no-op when it does not exist.

    Handles that are open keep their mapping until they close; their waits
    for a future publication end with StreamUnlinkedError.
    """
    _check_name(name)
    _cleanup.forget_name(name)
    if "torch_shmem._C" in sys.modules:
        # the op library also drops this process's own GPU allocation
        import torch

        torch.ops.shmem.unlink(name)
        return
    _core.unlink(name)


def unlink_generation(name: str, instance_id: bytes) -> str:
    """Unlink ``name`` only while it holds generation ``instance_id`` (16 bytes).

    Returns ``"removed"``, ``"gone"`` (nothing there) or ``"replaced"`` (a newer
    generation, left alone). The check and the removal are one step for other
    processes' unlinks and re-creates (``_core.unlink_if``).
    """
    _check_name(name)
    result = _core.unlink_if(name, instance_id)
    if result == "removed":
        _cleanup.forget(name, instance_id)
        if "torch_shmem._C" in sys.modules:
            # the op library drops this process's own GPU allocation, as unlink() does
            sys.modules["torch_shmem._C"].forget_instance(instance_id)
    return result


def unlink_quiet(name: str) -> None:
    """:func:`unlink`, spelled for cleanup code: silent when the stream does not exist."""
    unlink(name)


@contextlib.contextmanager
def stream(
    name: str,
    *,
    shape: Sequence[int] | int,
    dtype: Any = np.float32,
    size: int | None = None,
    gpu_device: str | None = None,
    cpu_mirror: bool | None = None,
    mode: int = 0o600,
    notify: bool = False,
    slots: int | None = None,
    ring: int | None = None,
    policy: str | None = None,
) -> Iterator[SharedMemory]:
    """Create a stream for the duration of a ``with`` block, then unlink it.

    The stream is unlinked on exit, also when the block raises. Raises as
    :func:`create`. For temporary streams in tests and one-shot pipelines::

        with torch_shmem.stream("tmp", shape=(3,)) as shm:
            shm.write([1, 2, 3])
    """
    shm = create(
        name, shape=shape, dtype=dtype, size=size, gpu_device=gpu_device,
        cpu_mirror=cpu_mirror, mode=mode, notify=notify, auto_unlink=True, slots=slots,
        ring=ring, policy=policy,
    )
    try:
        yield shm
    finally:
        shm.unlink()


class _LockedMany:
    """Context manager returned by :func:`locked_many`."""

    __slots__ = ("_handles", "_timeout", "_taken")

    def __init__(self, handles: tuple, timeout: float | None) -> None:
        self._handles = handles
        self._timeout = timeout
        self._taken: list[SharedMemory] = []

    def __enter__(self) -> tuple:
        handles = self._handles
        for h in handles:
            if not isinstance(h, SharedMemory):
                raise TypeError(
                    f"torch_shmem: locked_many() takes SharedMemory handles, got {type(h).__name__}"
                )
        ordered = sorted(handles, key=_name_key)
        for a, b in zip(ordered, ordered[1:]):
            if a.name == b.name:
                raise ValueError(
                    f"torch_shmem: locked_many() got stream {a.name!r} twice; "
                    "each stream may appear once (the handles must name unique streams)"
                )
        timeout = self._timeout
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"torch_shmem: locked_many(): timeout must be >= 0, got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        taken = self._taken
        try:
            for h in ordered:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                h.acquire(timeout=remaining)
                taken.append(h)
        except BaseException:
            _release_reversed(taken)
            raise
        return handles

    def __exit__(self, exc_type, exc, tb) -> None:
        _release_reversed(self._taken)


def _name_key(handle: SharedMemory) -> bytes:
    # Byte order of the UTF-8 name: the same total order in every process.
    return handle.name.encode("utf-8")


def _release_reversed(taken: list) -> None:
    """Release ``taken`` last-first; every one is released even if one raises."""
    error: BaseException | None = None
    while taken:
        try:
            taken.pop().release()
        except BaseException as exc:  # keep releasing the rest
            error = error or exc
    if error is not None:
        raise error


def locked_many(
    handles: Sequence[SharedMemory], *, timeout: float | None = None, poll_interval: float = 1e-3
) -> _LockedMany:
    """Hold the write locks of several streams at once, without deadlock.

    ``with torch_shmem.locked_many([a, b]) as (a, b):`` takes every lock in
    one global order (the UTF-8 bytes of the stream names), so two processes
    locking the same streams in any order cannot deadlock each other. It
    yields the handles as a tuple in the order given. ``timeout`` bounds the
    whole acquisition (TimeoutError, with every lock taken so far released).
    ValueError when a stream appears twice (also as two handles of one
    name); PermissionError for a read-only handle. The locks are released in
    reverse order on exit. Mixing it with manual ``acquire()`` of the same
    streams in another order can still deadlock.
    """
    return _LockedMany(tuple(handles), timeout)
