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

    The payload object of a :class:`~torch_shmem.SharedMemory` opened or
    created with ``gpu_device=`` (see ``_stream.HostPayload`` for the
    interface). Metadata, the lock and the waits of such a handle use the
    stream's CPU header through the native handle, exactly as for CPU
    streams; here only the data moves: snapshots and live views are CUDA
    tensors on the stream's device, writes take CUDA tensors (device to
    device) or host values (uploaded). In-place publication
    (``write_view``) and the ``*_publication`` reads are not offered.
    """

    __slots__ = ("stream", "device")

    def __init__(self, stream: _ops.Stream) -> None:
        self.stream = stream
        #: the handle's ``gpu_device``: "cuda:N" (the host stands in for the
        #: device on simulated-device streams: "cpu")
        self.device = str(stream.device)

    @classmethod
    def create(cls, name, shape, np_dtype, gpu_device, cpu_mirror, mode, nslots=DEFAULT_SLOTS):
        require(name)
        index = device_index(gpu_device, name)
        return cls(_ops.create_gpu(name, shape, torch_dtype(np_dtype), device=index,
                                   nslots=nslots, cpu_mirror=cpu_mirror, mode=mode))

    @classmethod
    def attach(cls, name, gpu_device, readonly=False):
        require(name)
        index = device_index(gpu_device, name)
        stream = _ops.open(name, readonly=readonly, device=index)
        if stream.device.type != "cuda":
            _ops.close(stream)
            raise ValueError(f"torch_shmem: stream {name!r} is a CPU stream; open it without gpu_device")
        return cls(stream)

    # ------------------------------------------------------------- reads
    def read(self, shm: Any, after: int | None, out: Any, timeout: float | None) -> torch.Tensor:
        """A snapshot on the stream's device (or into ``out``): the latest
        publication (``after`` None) or the first with ``count > after`` (-1:
        newer than the count at the call); the wait and the copy share
        ``timeout`` (TimeoutError naming the stream).

        The untimed latest read is the op ``read``/``read_into``. Every other
        read is one ``wait_read_into`` (a deadline over the wait and the
        copy's lock fallback) on a private copy of the token whose
        ``last_count`` is ``after``: the op finds the stream by the token's
        handle, and a private copy keeps threads that share this handle
        from moving each other's ``after``. A timed latest read waits for
        ``count > count - 1``, which is there at once. Before the first
        publication (count 0) that cannot be said: with the sequence still
        0 the untimed read copies without the lock (the fallback is taken
        only when a first write's host window opens during the copy, and
        ends with that window); while the first write is in its host window
        it waits for that write within ``timeout``.
        """
        shm._check_open()
        stream = self.stream
        try:
            if after is None:
                if timeout is None:
                    return _ops.read(stream) if out is None else _ops.read_into(stream, out)
                h = shm._h
                seq = h.seq()
                if seq <= 1:
                    if seq == 0 or h.state()[3]:  # never written, or broken: the op says so
                        return _ops.read(stream) if out is None else _ops.read_into(stream, out)
                    after = 0  # the first write is in its host window
                else:
                    after = (seq >> 1) - 1
            elif after < 0:
                after = shm._h.count()
            token = stream.token.clone()
            token[3] = after
            if out is None:
                out = torch.empty(stream.shape, dtype=stream.dtype, device=stream.device)
            torch.ops.shmem.wait_read_into(token, out, -1.0 if timeout is None else float(timeout))
            return out
        except (RuntimeError, ValueError) as exc:
            raise _mapped(exc, shm) from None

    def read_publication(self, shm: Any, after: int | None, out: Any, timeout: float | None, what: str):
        self.unsupported(shm, f"{what}()")

    def live(self, shm: Any) -> torch.Tensor:
        """The latest slot itself (the caller holds the lock)."""
        return torch.ops.shmem.live_view(self.stream.token)

    # ------------------------------------------------------------- writes
    def write(self, shm: Any, value: Any, frame_id: int | None, timeout: float | None, casting: str) -> None:
        """Publish a CUDA tensor (device to device) or a host value (uploaded).

        A host value goes through the CPU streams' validation and ``casting``
        rule first; a tensor must have the stream's dtype. The lock is taken
        through the handle (``timeout`` bounds the wait; the op re-enters
        it), then the op copies into the next slot on the current CUDA
        stream, waits for that copy only and publishes.
        """
        if casting != "checked":
            _check_casting(casting, shm._name)
        if isinstance(value, torch.Tensor):
            src = value.detach()
        else:
            src = torch.from_numpy(shm._coerce(value, casting))
        shm.acquire(timeout=timeout)
        try:
            _ops.publish(self.stream, src, frame_id)
        except (RuntimeError, ValueError) as exc:
            raise _mapped(exc, shm) from None
        finally:
            shm.release()

    def clear(self, shm: Any, timeout: float | None) -> None:
        stream = self.stream
        zeros = torch.zeros(stream.shape, dtype=stream.dtype, device=stream.device)
        self.write(shm, zeros, None, timeout, "checked")

    # -------------------------------------------------------------- other
    def unsupported(self, shm: Any, what: str) -> None:
        shm._check_open()
        raise RuntimeError(f"torch_shmem: stream {shm._name!r} is a GPU stream: {what} is not supported")

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
def _mapped(exc: BaseException, shm: Any) -> BaseException:
    from ._stream import InconsistentStreamError, StaleStreamError

    name = shm._name
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
from ._stream import SharedMemory, _check_casting  # noqa: E402


def create_handle(name, dims, np_dtype, gpu_device, cpu_mirror, mode, notify, nslots=DEFAULT_SLOTS) -> SharedMemory:
    """``torch_shmem.create(..., gpu_device=...)``."""
    payload = DevicePayload.create(name, dims, np_dtype, gpu_device, cpu_mirror, mode, nslots)
    try:
        handle = _core.open(name, False)
    except BaseException:
        payload.close()
        _ops.unlink(name)
        raise
    return SharedMemory(handle, owner=True, payload=payload)


def open_handle(handle: Any, name: str, gpu_device: Any, readonly: bool) -> SharedMemory:
    """``torch_shmem.open(name, gpu_device=...)`` given the stream's CPU handle."""
    if not handle.info()[3] & _core.FLAG_GPU:
        handle.close(1.0)
        raise ValueError(f"torch_shmem: stream {name!r} is a CPU stream; open it without gpu_device")
    try:
        payload = DevicePayload.attach(name, gpu_device, readonly)
    except BaseException:
        handle.close(1.0)
        raise
    return SharedMemory(handle, owner=False, payload=payload)
