"""CPU streams: the pyshmem-compatible API over the native core.

This module owns policy (argument checking, dtype casting, friendly error
messages, per-handle lock bookkeeping); the native ``_core`` module only moves
bytes, blocks and maps errors. Nothing here imports torch.
"""

from __future__ import annotations

import math
import operator
import threading
from typing import Any, Sequence

import numpy as np

from . import _core
from ._dtypes import code_dtype, dtype_code, normalize_dtype

InconsistentStreamError = _core.InconsistentStreamError

__all__ = [
    "InconsistentStreamError",
    "SharedMemory",
    "StaleStreamError",
    "create",
    "gpu_available",
    "open",
    "unlink",
]


class StaleStreamError(RuntimeError):
    """The handle's stream was unlinked and its name now names another generation."""


def gpu_available() -> bool:
    """Return whether GPU streams can be used in this process.

    GPU streams (``gpu_device="cuda:N"``) are not implemented in this version
    of torch_shmem, so this returns ``False`` on every machine; it never
    imports torch.
    """
    return False


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
    if len(dims) > _core.MAX_DIMS:
        raise ValueError(
            f"torch_shmem: stream {name!r}: shape has {len(dims)} dimensions; "
            f"the limit is {_core.MAX_DIMS}"
        )
    return dims


def _check_gpu_device(gpu_device: Any, name: str) -> None:
    if gpu_device is not None and gpu_device is not False:
        raise RuntimeError(
            f"torch_shmem: stream {name!r}: GPU streams (gpu_device={gpu_device!r}) are not "
            "supported by this version of torch_shmem; create a CPU stream instead "
            "(torch_shmem.gpu_available() returns False)"
        )


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


class SharedMemory:
    """A handle to a named shared-memory stream.

    Create one with :func:`create` or attach with :func:`open`. A stream has a
    fixed shape and dtype and holds the latest published value. Writers are
    serialized by a cross-process lock; ``read()`` returns a consistent
    snapshot of exactly one completed write without blocking writers;
    ``read_new()`` blocks until the next write.

    Handles are cheap, not thread-bound, and may be shared by threads. They
    pickle by name: a child process that unpickles one opens the stream again.
    """

    __slots__ = (
        "_h",
        "_name",
        "_shape",
        "_dtype",
        "_size",
        "_owner",
        "_instance_id",
        "_creator_pid",
        "_held",
        "_held_mutex",
        "__weakref__",
    )

    def __init__(self, handle: Any, *, owner: bool) -> None:
        code, shape, nbytes, _flags, creator_pid, instance_id, _ctime, _mode = handle.info()
        self._h = handle
        self._name = handle.name
        self._shape = shape
        self._dtype = code_dtype(code)
        self._size = nbytes
        self._owner = owner
        self._instance_id = instance_id
        self._creator_pid = creator_pid
        # lock levels taken through this handle, per thread (for close())
        self._held: dict[int, int] = {}
        self._held_mutex = threading.Lock()

    # ------------------------------------------------------------------ state
    def _check_open(self) -> None:
        if self._h.closed:
            raise RuntimeError(
                f"torch_shmem: stream {self._name!r} is closed on this handle; "
                f"reopen it with torch_shmem.open({self._name!r})"
            )

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
        self._check_open()
        return None

    @property
    def gpu_enabled(self) -> bool:
        self._check_open()
        return False

    @property
    def cpu_mirror(self) -> bool:
        """Always True for CPU streams (the payload lives in host memory)."""
        self._check_open()
        return True

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
        return self._h.read_stats()[2]

    def __repr__(self) -> str:
        if self._h.closed:
            return f"SharedMemory(name={self._name!r}, closed)"
        return (
            f"SharedMemory(name={self._name!r}, shape={self._shape!r}, "
            f"dtype={str(self._dtype)!r}, gpu_device=None)"
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
        ident = threading.get_ident()
        with self._held_mutex:
            self._held[ident] = self._held.get(ident, 0) + 1

    def release(self) -> None:
        """Release one level of the calling thread's lock."""
        self._h.release()
        ident = threading.get_ident()
        with self._held_mutex:
            depth = self._held.get(ident, 0)
            if depth <= 1:
                self._held.pop(ident, None)
            else:
                self._held[ident] = depth - 1

    def locked(self, *, timeout: float | None = None, poll_interval: float = 1e-3) -> _LockScope:
        """Context manager holding the write lock; yields this handle."""
        return _LockScope(self, timeout)

    # ------------------------------------------------------------------ IO
    def _coerce(self, value: Any) -> np.ndarray:
        """Slow path of write(): validate and convert ``value``."""
        if hasattr(value, "dtype") or hasattr(value, "__array_interface__"):
            array = np.asarray(value)
            if array.dtype != self._dtype and not np.can_cast(
                array.dtype, self._dtype, casting="same_kind"
            ):
                raise ValueError(
                    f"torch_shmem: stream {self._name!r}: expected dtype {self._dtype}, "
                    f"got {array.dtype} (no same-kind cast)"
                )
        else:
            try:
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
        # np.asarray(order="C") keeps 0-d arrays 0-d (ascontiguousarray does not)
        return np.asarray(array, dtype=self._dtype, order="C")

    def write(self, value: Any, *, frame_id: int | None = None, timeout: float | None = None) -> None:
        """Publish ``value`` (copied in; the stream's shape, a castable dtype).

        Takes the write lock for the copy (re-entrant if the calling thread
        holds it). ``frame_id`` stamps a 64-bit token read back by
        :attr:`frame_id`. Raises ValueError for a wrong shape or dtype,
        TimeoutError if the lock is not free within ``timeout``.
        """
        if self._h.write(value, frame_id, timeout) is NotImplemented:
            self._check_open()
            if self._h.write(self._coerce(value), frame_id, timeout) is NotImplemented:
                raise AssertionError("torch_shmem: internal error: coerced value rejected")

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
            return self._h.read(out, timeout)
        return self._live_view(out)

    def _live_view(self, out: Any) -> np.ndarray:
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
                f"torch_shmem: stream {self._name!r}: read(safe=False) requires the lock; "
                "use it inside 'with shm.locked():'"
            )
        view = np.frombuffer(self._h, dtype=self._dtype, count=math.prod(self._shape))
        return view.reshape(self._shape)

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
        (:meth:`wait_for_count`). Raises TimeoutError after ``timeout``
        seconds; RuntimeError if the handle is closed meanwhile. The GIL is
        released while waiting and the wait parks on a futex (no polling).
        """
        if safe:
            return self._h.read_after(-1, out, timeout)
        self._h.wait_for_count(-1, timeout)
        return self._live_view(out)

    def wait_for_count(self, *, after: int, timeout: float | None = None) -> int:
        """Block until ``count > after`` (level-triggered); return the count."""
        after = operator.index(after)
        if after < 0:
            raise ValueError(f"torch_shmem: stream {self._name!r}: after must be >= 0")
        return self._h.wait_for_count(after, timeout)

    def clear(self) -> None:
        """Zero the payload; counts as a publication."""
        self._h.clear(None)

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
        ident = threading.get_ident()
        with self._held_mutex:
            others = [t for t, d in self._held.items() if t != ident and d > 0]
            mine = self._held.get(ident, 0)
        if others:
            raise RuntimeError(
                f"torch_shmem: cannot close stream {self._name!r}: another thread holds its "
                "lock through this handle"
            )
        for _ in range(mine):
            self._h.release()
        with self._held_mutex:
            self._held.clear()
        self._h.close(timeout)

    def unlink(self) -> None:
        """Close this handle and destroy the stream (other handles keep their mapping)."""
        if self._h.readonly:
            self._check_open()
            raise PermissionError(
                f"torch_shmem: stream {self._name!r} is open read-only; cannot unlink it"
            )
        instance_id = self._instance_id
        self.close()
        try:
            current = _core.open(self._name, False)
        except (FileNotFoundError, ValueError):
            current = None
        if current is not None:
            current_id = current.info()[5]
            current.close(1.0)
            if current_id != instance_id:
                raise StaleStreamError(
                    f"torch_shmem: stream {self._name!r} was re-created since this handle "
                    "opened it; not unlinking the newer stream"
                )
        _core.unlink(self._name)

    def delete(self) -> None:
        """Alias of :meth:`unlink`."""
        self.unlink()

    def __enter__(self) -> "SharedMemory":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __reduce__(self):
        return (_reopen, (self._name, self._h.readonly))

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


def _reopen(name: str, readonly: bool) -> SharedMemory:
    return open(name, readonly=readonly)


def create(
    name: str,
    *,
    shape: Sequence[int] | int,
    dtype: Any = np.float32,
    size: int | None = None,
    gpu_device: str | None = None,
    cpu_mirror: bool | None = None,
    mode: int = 0o600,
) -> SharedMemory:
    """Create a new stream and return its (owner) handle.

    ``shape`` is any tuple of non-negative ints (``()`` for a scalar);
    ``dtype`` a NumPy dtype or string. ``size``, when given, must equal the
    payload bytes. ``mode`` sets the permission bits (0600 by default: only
    this user). The pages are reserved up front, so a stream larger than the
    free space of /dev/shm fails here with OSError(ENOSPC). Raises
    FileExistsError when the name is taken. The stream outlives this process
    until :func:`unlink`.
    """
    _check_name(name)
    _check_gpu_device(gpu_device, name)
    dims = _normalize_shape(shape, name)
    dt = normalize_dtype(dtype, name=name)
    expected = math.prod(dims) * dt.itemsize
    if size is not None and operator.index(size) != expected:
        raise ValueError(
            f"torch_shmem: stream {name!r}: size does not match shape and dtype: "
            f"expected {expected}, got {size}"
        )
    mode = operator.index(mode)
    if mode & ~0o777:
        raise ValueError(f"torch_shmem: stream {name!r}: mode must be within 0o777, got {oct(mode)}")
    try:
        handle = _core.create(name, dtype_code(dt), dims, mode, 0)
    except FileExistsError as exc:
        raise FileExistsError(
            exc.errno,
            f"torch_shmem: stream {name!r} already exists; attach to it with "
            f"torch_shmem.open({name!r}) or remove it with torch_shmem.unlink({name!r})",
        ) from None
    return SharedMemory(handle, owner=True)


def open(name: str, *, gpu_device: str | None = None, readonly: bool = False) -> SharedMemory:  # noqa: A001
    """Attach to an existing stream.

    Raises FileNotFoundError (pointing to :func:`create`) when it does not
    exist, ValueError when the name holds a foreign or corrupted segment,
    PermissionError when this user may not open it. ``readonly=True`` maps
    the payload read-only and refuses writes and the lock.
    """
    _check_name(name)
    _check_gpu_device(gpu_device, name)
    try:
        handle = _core.open(name, bool(readonly))
    except FileNotFoundError:
        raise FileNotFoundError(
            2,
            f"torch_shmem: stream {name!r} does not exist; create it with "
            f"torch_shmem.create({name!r}, shape=..., dtype=...)",
        ) from None
    return SharedMemory(handle, owner=False)


def unlink(name: str) -> None:
    """Destroy the named stream; a silent no-op when it does not exist.

    Handles that are open keep their mapping until they close.
    """
    _check_name(name)
    _core.unlink(name)
