"""GPU streams behind the SharedMemory API.

Imported only when a GPU stream is created or attached (it imports torch).
The payload lives in device slots (csrc/core/slots.h, csrc/cuda); this
module adapts values and results between the pyshmem-style API and the
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


class GpuAttachment:
    """This process's mapping of a GPU stream's device slots."""

    __slots__ = ("stream", "device", "dtype")

    def __init__(self, stream: _ops.Stream) -> None:
        self.stream = stream
        self.device = stream.device
        self.dtype = stream.dtype

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

    def write(self, value: Any, frame_id: int | None) -> None:
        """Publish a CUDA tensor (device to device) or a host value (upload)."""
        if isinstance(value, torch.Tensor):
            src = value.detach()
        else:
            src = torch.from_numpy(np.ascontiguousarray(value))
        _ops.publish(self.stream, src, frame_id)

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """A consistent snapshot on the stream's device (or into ``out``)."""
        if out is None:
            return _ops.read(self.stream)
        return _ops.read_into(self.stream, out)

    def live_view(self) -> torch.Tensor:
        """The latest slot itself (caller holds the lock)."""
        return torch.ops.shmem.live_view(self.stream.token)

    def close(self) -> None:
        _ops.close(self.stream)


# ------------------------------------------------------------ SharedMemory API
from . import _core  # noqa: E402
from ._stream import SharedMemory  # noqa: E402


class GpuSharedMemory(SharedMemory):
    """A :class:`SharedMemory` handle attached to a GPU stream's device slots.

    Metadata, the lock and waits use the stream's CPU header exactly as for
    CPU streams; payload reads and writes go through the slot protocol
    (torch.ops.shmem) and return CUDA tensors on the stream's device.
    """

    __slots__ = ("_gpu",)

    def __init__(self, handle: Any, *, owner: bool, attachment: GpuAttachment) -> None:
        super().__init__(handle, owner=owner)
        self._gpu = attachment

    @property
    def gpu_device(self) -> str:
        self._check_open()
        return str(self._gpu.device)

    def __repr__(self) -> str:
        if self._h.closed:
            return f"SharedMemory(name={self._name!r}, closed)"
        return (
            f"SharedMemory(name={self._name!r}, shape={self._shape!r}, "
            f"dtype={str(self._dtype)!r}, gpu_device={str(self._gpu.device)!r})"
        )

    def _unsupported(self, what: str):
        self._check_open()
        raise RuntimeError(f"torch_shmem: stream {self._name!r} is a GPU stream: {what} is not supported")

    def _source(self, value: Any, casting: str = "checked"):
        if isinstance(value, torch.Tensor):
            return value
        return self._coerce(value, casting)  # the CPU streams' casting policy, then an upload

    def write(
        self,
        value: Any,
        *,
        frame_id: int | None = None,
        timeout: float | None = None,
        casting: str = "checked",
    ) -> None:
        """Publish a CUDA tensor (device to device) or a host value (uploaded).

        Takes the write lock (``timeout`` bounds the wait), copies into the
        next slot on the current CUDA stream, waits for that copy only, then
        publishes. A host value of another dtype is converted under
        ``casting`` as for CPU streams; a tensor must have the stream's
        dtype. Raises ValueError for a wrong shape, dtype or device.
        """
        src = self._source(value, casting)
        self.acquire(timeout=timeout)
        try:
            self._gpu.write(src, frame_id)
        finally:
            self.release()

    def write_locked(self, value: Any, *, frame_id: int | None = None, casting: str = "checked") -> None:
        self._check_open()
        if self._h.held_depth() <= 0:
            raise RuntimeError(f"torch_shmem: stream {self._name!r}: write_locked() requires the lock")
        self._gpu.write(self._source(value, casting), frame_id)

    def read(self, *, safe: bool = True, poll_interval: float = 1e-6, out=None, timeout: float | None = None):
        """A CUDA tensor holding exactly one completed write (or fill ``out``).

        ``safe=False`` returns the latest slot itself; the calling thread must
        hold the lock, and must synchronize its CUDA stream before releasing it.
        """
        self._check_open()
        if not safe:
            if self._h.held_depth() <= 0:
                raise RuntimeError(
                    f"torch_shmem: stream {self._name!r}: read() with safe=False requires the "
                    "lock; use it inside 'with shm.locked():'"
                )
            return self._gpu.live_view()
        return self._gpu.read(out)

    def read_new(self, *, timeout: float | None = None, safe: bool = True, poll_interval: float = 1e-5, out=None):
        """Wait (host futex) for a write newer than the call, then read it."""
        self._h.wait_for_count(-1, timeout)
        return self.read(safe=safe, out=out)

    def read_after(self, after: int, *, timeout: float | None = None, safe: bool = True, out=None, **_: Any):
        """Level-triggered: wait until ``count > after``, then read."""
        self._h.wait_for_count(int(after), timeout)
        return self.read(safe=safe, out=out)

    def clear(self) -> None:
        self.write(torch.zeros(self._shape, dtype=self._gpu.dtype, device=self._gpu.device))

    def _check_publications(self, what: str) -> None:
        self._unsupported(f"{what}()")

    def __dlpack_device__(self) -> tuple[int, int]:
        self._check_open()
        device = self._gpu.device
        return (2, device.index or 0) if device.type == "cuda" else (1, 0)

    def read_publication(self, *args: Any, **kwargs: Any):
        self._unsupported("read_publication()")

    def read_new_publication(self, *args: Any, **kwargs: Any):
        self._unsupported("read_new_publication()")

    def read_after_publication(self, *args: Any, **kwargs: Any):
        self._unsupported("read_after_publication()")

    def write_view(self, *args: Any, **kwargs: Any):
        self._unsupported("write_view()")

    def write_view_locked(self, *args: Any, **kwargs: Any):
        self._unsupported("write_view_locked()")

    def fileno(self) -> int:
        # Its descriptor would arm on the NumPy handle's read count, which
        # GPU reads (through the op library) do not advance.
        self._unsupported("fileno()")

    def close(self, *, timeout: float = 5.0) -> None:
        if not self._h.closed:
            super().close(timeout=timeout)
            self._gpu.close()

    def __reduce__(self):
        return (_reopen_gpu, (self._name, str(self._gpu.device), self._h.readonly))


def _reopen_gpu(name: str, device: str, readonly: bool) -> GpuSharedMemory:
    from ._stream import open as _open

    return _open(name, gpu_device=device, readonly=readonly)


def create_handle(name, dims, np_dtype, gpu_device, cpu_mirror, mode, notify) -> GpuSharedMemory:
    """``torch_shmem.create(..., gpu_device=...)``."""
    attachment = GpuAttachment.create(name, dims, np_dtype, gpu_device, cpu_mirror, mode)
    try:
        handle = _core.open(name, False)
    except BaseException:
        attachment.close()
        _ops.unlink(name)
        raise
    return GpuSharedMemory(handle, owner=True, attachment=attachment)


def open_handle(handle: Any, name: str, gpu_device: Any, readonly: bool) -> GpuSharedMemory:
    """``torch_shmem.open(name, gpu_device=...)`` given the stream's CPU handle."""
    if not handle.info()[3] & _core.FLAG_GPU:
        handle.close(1.0)
        raise ValueError(f"torch_shmem: stream {name!r} is a CPU stream; open it without gpu_device")
    try:
        attachment = GpuAttachment.attach(name, gpu_device, readonly)
    except BaseException:
        handle.close(1.0)
        raise
    return GpuSharedMemory(handle, owner=False, attachment=attachment)
