"""The GPU stream handle's inherited API, on simulated-device streams.

A GPU handle (``torch_shmem.create/open(..., gpu_device=...)``) needs CUDA to
be made by the public functions; here the same handle class is attached to a
stream flagged FLAG_SIM_DEVICE, whose "device" slots live in host memory and
run the GPU streams' slot protocol through torch.ops.shmem (CPU tensors).
"""

import asyncio

import numpy as np
import pytest

import torch_shmem
from torch_shmem import _core
from torch_shmem._dtypes import dtype_code

torch = pytest.importorskip("torch", reason="GPU handles adapt torch.ops.shmem")

pytestmark = pytest.mark.cpu

SIM = _core.FLAG_GPU | _core.FLAG_SIM_DEVICE


@pytest.fixture
def gpu_handle(name):
    from torch_shmem import _gpu
    from torch_shmem import ops as O

    handle = _core.create(name, dtype_code(np.dtype(np.float32)), (4,), 0o600, SIM, 3)
    shm = _gpu.GpuSharedMemory(handle, owner=True, attachment=_gpu.GpuAttachment(O.open(name)))
    yield shm
    shm.close()


def test_to_config_names_the_device(gpu_handle):
    config = gpu_handle.to_config()
    assert config["gpu_device"] == gpu_handle.gpu_device == str(gpu_handle._gpu.device)
    assert config["cpu_mirror"] is False
    assert config["shape"] == [4] and config["dtype"] == "float32"


def test_describe_names_the_device(gpu_handle):
    text = gpu_handle.describe()
    assert f"gpu_device:   {gpu_handle.gpu_device}" in text
    assert "gpu_enabled:  True" in text
    assert "cpu_mirror:   False" in text


def test_dlpack_device_is_the_payload_device(gpu_handle):
    gpu_handle.write(torch.arange(4, dtype=torch.float32))
    device = gpu_handle._gpu.device
    expected = (2, device.index or 0) if device.type == "cuda" else (1, 0)
    assert gpu_handle.__dlpack_device__() == expected
    got = torch.from_dlpack(gpu_handle)
    assert got.device == device and got.tolist() == [0, 1, 2, 3]


def test_async_reads_return_tensors_like_the_sync_reads(gpu_handle):
    reader = gpu_handle
    n = reader.count

    async def main():
        after = asyncio.ensure_future(reader.read_after_async(n, timeout=10))
        new = asyncio.ensure_future(reader.read_new_async(timeout=10))
        await asyncio.sleep(0.05)
        gpu_handle.write(torch.full((4,), 7.0))
        return await after, await new

    after, new = asyncio.run(main())
    for got in (after, new):
        assert isinstance(got, torch.Tensor), type(got)
        assert got.device == gpu_handle._gpu.device and got.tolist() == [7.0] * 4
    sync = gpu_handle.read_after(n)
    assert type(sync) is type(after)


def test_async_publication_reads_are_refused_like_the_sync_ones(gpu_handle):
    with pytest.raises(RuntimeError, match="GPU stream"):
        gpu_handle.read_publication()
    with pytest.raises(RuntimeError, match="GPU stream"):
        asyncio.run(gpu_handle.read_new_publication_async(timeout=0.01))
    with pytest.raises(RuntimeError, match="GPU stream"):
        asyncio.run(gpu_handle.read_after_publication_async(0, timeout=0.01))


def test_fileno_is_refused_with_the_stream_name(gpu_handle):
    with pytest.raises(RuntimeError, match=rf"{gpu_handle.name}.*fileno\(\) is not supported"):
        gpu_handle.fileno()


def test_stat_names_the_device_of_a_gpu_stream(gpu_handle):
    info = torch_shmem.stat(gpu_handle.name)
    assert info["gpu_enabled"] and info["gpu_device"] == "cuda:0"
    assert info["bridge"] is None
