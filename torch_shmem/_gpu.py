"""GPU streams behind the SharedMemory API: the device payload.

Imported only when a GPU stream is created or attached (it imports torch).
The payload lives in device slots (csrc/core/slots.h, csrc/cuda); a
:class:`DevicePayload` adapts values and results between the pyshmem-style
handle (torch_shmem._stream.SharedMemory, which holds it) and the
``torch.ops.shmem`` kernels, which do the work. See docs/gpu.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from . import _C
from ._dtypes import code_dtype
from . import ops as _ops

DEFAULT_SLOTS = 3


def availability() -> tuple[bool, str]:
    """(usable, reason): whether GPU streams can work in this process."""
    if not _C.WITH_CUDA:
        return False, "this build of torch_shmem has no CUDA support (no toolkit at build time)"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, (f"torch sees no CUDA device (no NVIDIA driver, a driver too old for "
                       f"CUDA {torch.version.cuda}, or CUDA_VISIBLE_DEVICES hides them)")
    return True, "ok"


def device_index(gpu_device: Any, name: str) -> int:
    """Parse ``"cuda:N"``, ``N`` or a ``torch.device`` into a CUDA ordinal."""
    if isinstance(gpu_device, bool):
        raise ValueError(f"torch_shmem: stream {name!r}: gpu_device must be 'cuda:N', got {gpu_device!r}")
    if isinstance(gpu_device, int):
        index = gpu_device
    else:
        try:
            dev = torch.device(gpu_device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"torch_shmem: stream {name!r}: gpu_device must be 'cuda:N', got {gpu_device!r}"
            ) from exc
        if dev.type != "cuda":
            raise ValueError(f"torch_shmem: stream {name!r}: gpu_device must be 'cuda:N', got {gpu_device!r}")
        index = 0 if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(
            f"torch_shmem: stream {name!r}: cuda:{index} does not exist "
            f"({torch.cuda.device_count()} device(s) visible)"
        )
    return index


def require(name: str) -> None:
    ok, reason = availability()
    if not ok:
        raise RuntimeError(f"torch_shmem: stream {name!r}: GPU streams are unavailable: {reason}")


def torch_dtype(np_dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype


class DevicePayload:
    """A GPU attachment's payload: the stream's device slots, moved by torch.ops.shmem.

    The payload of a :class:`~torch_shmem.SharedMemory` created or opened
    with ``gpu_device=`` (the interface is described at
    ``_stream.HostPayload``). Metadata, the lock and the waits of such a
    handle use the stream's CPU header through the native handle, exactly
    as for CPU streams; this object moves the data with the native handle's
    signatures, so the handle's code is the same for both: snapshots and
    live views are tensors on the stream's device, writes take tensors
    (device to device, or from the CPU) and host values (uploaded after the
    handle's casting rule). In-place publication (``write_view``) and the
    ``*_publication`` reads are not offered.
    """

    __slots__ = ("_h", "_name", "_np_dtype", "stream", "device")

    #: no live host payload to cast a large value into: values are converted first
    cast_in_place = False

    def __init__(self, handle: Any, stream: _ops.Stream) -> None:
        self._h = handle  # the native handle of the same stream (header, lock, waits)
        self._name = handle.name
        self._np_dtype = code_dtype(handle.info()[0])
        self.stream = stream
        #: the handle's ``gpu_device``: "cuda:N" ("cpu" on simulated device memory)
        self.device = str(stream.device)

    @staticmethod
    def create_stream(name, shape, np_dtype, gpu_device, cpu_mirror, mode, nslots=DEFAULT_SLOTS,
                      notify=False, ring_policy=-1) -> _ops.Stream:
        require(name)
        index = device_index(gpu_device, name)
        return _ops.create_gpu(name, shape, torch_dtype(np_dtype), device=index,
                               nslots=nslots, cpu_mirror=cpu_mirror, mode=mode, notify=notify,
                               ring_policy=ring_policy)

    @staticmethod
    def attach_stream(name, gpu_device, readonly=False) -> _ops.Stream:
        require(name)
        index = device_index(gpu_device, name)
        stream = _ops.open(name, readonly=readonly, device=index)
        if stream.device.type != "cuda":
            _ops.close(stream)
            raise ValueError(f"torch_shmem: stream {name!r} is a CPU stream; open it without gpu_device")
        return stream

    # ------------------------------------------------------------- reads
    def read(self, out: torch.Tensor | None, timeout: float | None) -> torch.Tensor:
        """The latest publication, on the stream's device (or into ``out``)."""
        return self.read_after(None, out, timeout)

    def read_after(self, after: int | None, out: torch.Tensor | None, timeout: float | None) -> torch.Tensor:
        """The first publication with ``count > after`` (-1: newer than the count
        at the call; None: the latest, no wait). The wait and the copy share
        ``timeout`` (TimeoutError naming the stream).

        The untimed latest read is the op ``read``/``read_into``. Every other
        read is one ``wait_read_into`` (one deadline over the wait and the
        copy's lock fallback) on a private copy of the token whose
        ``last_count`` is ``after``: the op finds the stream by the token's
        handle, and a private copy keeps threads that share this handle from
        moving each other's ``after``. A timed latest read waits for
        ``count > count - 1``, which is there at once. Before the first
        publication (sequence 0) that cannot be said: the untimed read
        copies the zeroed slot without the lock (it falls back to the lock
        only if a first write's host window opens during the copy, and then
        only for that window); while the first write is inside its host
        window (sequence 1) it waits for that write within ``timeout``.
        """
        h = self._h
        if h.closed:
            raise _closed_error(self._name)
        if timeout is not None:
            timeout = self._timeout(timeout)
        stream = self.stream
        try:
            if after is None:
                if timeout is None:
                    return self._latest(out)
                seq = h.seq()
                if seq <= 1:
                    if seq == 0 or h.state()[3]:  # never written, or torn: the op says so
                        return self._latest(out)
                    after = 0  # the first write is inside its host window
                else:
                    after = (seq >> 1) - 1
            elif after < 0:
                after = h.count()
            token = stream.token.clone()
            token[3] = after
            if out is None:
                out = torch.empty(stream.shape, dtype=stream.dtype, device=stream.device)
            torch.ops.shmem.wait_read_into(token, out, -1.0 if timeout is None else timeout)
            h.note_count(int(token[3]))  # the count the op read (read statistics)
            return out
        except (RuntimeError, ValueError) as exc:
            raise _mapped(exc, self._name) from None

    def _latest(self, out: torch.Tensor | None) -> torch.Tensor:
        """The untimed latest read (op ``read``/``read_into``), recorded in the read statistics."""
        stream = self.stream
        result = _ops.read(stream) if out is None else _ops.read_into(stream, out)
        self._h.note_count(int(stream.token[3]))
        return result

    def _timeout(self, timeout: Any) -> float:
        """``timeout`` as seconds (inf: none), checked as the native handle checks it."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float, np.integer, np.floating)):
            raise TypeError(f"torch_shmem: stream {self._name!r}: timeout must be a number or None")
        value = float(timeout)
        if not value >= 0:
            raise ValueError(
                f"torch_shmem: stream {self._name!r}: timeout must be >= 0 or None, got {timeout!r}"
            )
        return -1.0 if value == float("inf") else value

    def read_pub(self, out: Any, timeout: float | None):
        raise self._unsupported("read_publication()")

    def read_after_pub(self, after: int, out: Any, timeout: float | None):
        raise self._unsupported("read_after_publication()")

    def live_array(self) -> torch.Tensor:
        """The latest slot itself (the caller holds the lock)."""
        return torch.ops.shmem.live_view(self.stream.token)

    # ------------------------------------------------------------- writes
    def write(self, value: Any, frame_id: int | None, timeout: float | None) -> Any:
        """Publish a tensor (device to device, or an upload from the CPU) or an
        ndarray of exactly the stream's dtype, shape and C layout (uploaded);
        NotImplemented for anything else, which the handle converts first.

        A tensor must have the stream's dtype and shape (ValueError). Takes
        the lock (``timeout`` bounds the wait; the op re-enters it), then the
        op copies into the next slot on the current CUDA stream, waits for
        that copy only and publishes.
        """
        if isinstance(value, torch.Tensor):
            src = value.detach()
        elif (type(value) is np.ndarray and value.shape == self.stream.shape
              and value.dtype == self._np_dtype and value.flags.c_contiguous):
            src = torch.from_numpy(value)
        else:
            return NotImplemented
        h = self._h
        if h.closed:
            raise _closed_error(self._name)
        h.acquire(timeout)
        try:
            _ops.publish(self.stream, src, frame_id)
        except (RuntimeError, ValueError) as exc:
            raise _mapped(exc, self._name) from None
        finally:
            h.release()
        return None

    # ------------------------------------------------------------- rings
    def cursor_attach(self, cname: str, timeout: float | None) -> int:
        """The GPU ring cursor ``cname`` for this process; the op also sets its device
        counter. (The op takes the stream lock in slices without a deadline: ``timeout``
        is checked, not applied.)"""
        if self._h.closed:
            raise _closed_error(self._name)
        if timeout is not None:
            self._timeout(timeout)
        try:
            return _ops.cursor(self.stream, cname)
        except (RuntimeError, ValueError) as exc:
            raise _mapped(exc, self._name) from None

    def read_next(self, index: int, out: torch.Tensor | None, timeout: float | None):
        """Cursor ``index``'s next publication of a GPU ring, with the native handle's
        result ``(payload, count, write_time_ns, frame_id, missed)``. The copy into ``out``
        (a new tensor on the stream's device when None) is queued on the current CUDA
        stream and not waited for (docs/gpu.md, "GPU rings")."""
        if self._h.closed:
            raise _closed_error(self._name)
        if timeout is not None:
            timeout = self._timeout(timeout)
        stream = self.stream
        if out is None:
            out = torch.empty(stream.shape, dtype=stream.dtype, device=stream.device)
        try:
            count, missed, frame_id, write_time_ns = _ops.read_next(stream, index, out, timeout).tolist()
        except (RuntimeError, ValueError) as exc:
            raise _mapped(exc, self._name) from None
        self._h.note_count(count)
        return out, count, write_time_ns, frame_id & 0xFFFF_FFFF_FFFF_FFFF, missed

    def clear(self, timeout: float | None) -> None:
        stream = self.stream
        self.write(torch.zeros(stream.shape, dtype=stream.dtype, device=stream.device), None, timeout)

    # -------------------------------------------------------------- other
    def _unsupported(self, what: str) -> RuntimeError:
        if self._h.closed:
            return _closed_error(self._name)
        return RuntimeError(f"torch_shmem: stream {self._name!r} is a GPU stream: {what} is not supported")

    def unsupported(self, shm: Any, what: str) -> None:
        raise self._unsupported(what)

    def dlpack_device(self) -> tuple[int, int]:
        device = self.stream.device
        return (2, device.index or 0) if device.type == "cuda" else (1, 0)  # kDLCUDA / kDLCPU

    def config(self, info: Any) -> dict:
        """What create_from_config needs besides gpu_device and cpu_mirror: the slot count."""
        return {"slots": info.nslots}

    def close(self) -> None:
        _ops.close(self.stream)


# Errors of the ops as the CPU API raises them: a timeout is TimeoutError, a
# torn publication InconsistentStreamError, a close during a wait says so as
# CPU reads do; messages start "torch_shmem: stream 'x'" (the ops' own start
# "shmem::<op>: stream 'x'"). Other exceptions keep their type.
def _mapped(exc: BaseException, name: str) -> BaseException:
    from ._stream import InconsistentStreamError, StaleStreamError

    msg = str(exc)
    marker = f"stream '{name}'"
    at = msg.find(marker)
    if at < 0 or not msg.startswith("shmem::"):
        return exc
    text = f"torch_shmem: stream {name!r}" + msg[at + len(marker):]
    if isinstance(exc, StaleStreamError):
        return type(exc)(text)
    if "was closed while waiting" in msg:
        return RuntimeError(
            f"torch_shmem: stream {name!r} was closed while a read was waiting on this handle"
        )
    if "timed out after" in msg:
        return TimeoutError(text)
    if "holds an incomplete write" in msg:
        return InconsistentStreamError(text)
    if type(exc) in (RuntimeError, ValueError):
        return type(exc)(text)
    return exc


# ------------------------------------------------------------ SharedMemory API
from . import _core  # noqa: E402
from ._stream import SharedMemory, _closed_error  # noqa: E402


def create_handle(name, dims, np_dtype, gpu_device, cpu_mirror, mode, notify, nslots=DEFAULT_SLOTS,
                  ring_policy=-1) -> SharedMemory:
    """``torch_shmem.create(..., gpu_device=...)`` (a GPU ring of ``nslots`` when ``ring_policy >= 0``)."""
    stream = DevicePayload.create_stream(name, dims, np_dtype, gpu_device, cpu_mirror, mode, nslots, notify,
                                         ring_policy)
    try:
        handle = _core.open(name, False)
    except BaseException:
        _ops.close(stream)
        _ops.unlink(name)
        raise
    return SharedMemory(handle, owner=True, payload=DevicePayload(handle, stream))


def open_handle(handle: Any, name: str, gpu_device: Any, readonly: bool) -> SharedMemory:
    """``torch_shmem.open(name, gpu_device=...)`` given the stream's CPU handle."""
    if not handle.info()[3] & _core.FLAG_GPU:
        handle.close(1.0)
        raise ValueError(f"torch_shmem: stream {name!r} is a CPU stream; open it without gpu_device")
    try:
        stream = DevicePayload.attach_stream(name, gpu_device, readonly)
    except BaseException:
        handle.close(1.0)
        raise
    return SharedMemory(handle, owner=False, payload=DevicePayload(handle, stream))
