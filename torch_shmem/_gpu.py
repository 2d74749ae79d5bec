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
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
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
