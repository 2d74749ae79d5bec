"""The GPU stream handle, on simulated-device streams.

A GPU handle (``torch_shmem.create/open(..., gpu_device=...)``) is a
SharedMemory holding a device payload (torch_shmem._gpu.DevicePayload); the
public functions need CUDA to make one. Here the same handle and payload are
attached to a stream flagged FLAG_SIM_DEVICE, whose "device" slots live in
host memory and run the GPU streams' slot protocol through torch.ops.shmem
(CPU tensors).
"""

import asyncio
import pickle
import threading
import time

import numpy as np
import pytest

import torch_shmem
from torch_shmem import _core
from torch_shmem._dtypes import dtype_code

torch = pytest.importorskip("torch", reason="GPU handles adapt torch.ops.shmem")

pytestmark = pytest.mark.cpu

SIM = _core.FLAG_GPU | _core.FLAG_SIM_DEVICE


def sim_handle(name, shape=(4,), dtype=np.float32, nslots=3, cpu_mirror=False, mode=0o600, notify=False):
    """A GPU handle (SharedMemory with a device payload) of a new simulated-device stream."""
    from torch_shmem import _gpu
    from torch_shmem import ops as O

    flags = SIM | (_core.FLAG_CPU_MIRROR if cpu_mirror else 0) | (_core.FLAG_NOTIFY if notify else 0)
    handle = _core.create(name, dtype_code(np.dtype(dtype)), tuple(shape), mode, flags, nslots)
    return torch_shmem.SharedMemory(handle, owner=True, payload=_gpu.DevicePayload(handle, O.open(name)))


@pytest.fixture
def gpu_handle(name):
    shm = sim_handle(name)
    yield shm
    shm.close()


def test_to_config_names_the_device(gpu_handle):
    config = gpu_handle.to_config()
    assert config["gpu_device"] == gpu_handle.gpu_device == str(gpu_handle._payload.stream.device)
    assert config["cpu_mirror"] is False
    assert config["shape"] == [4] and config["dtype"] == "float32"


def test_describe_names_the_device(gpu_handle):
    text = gpu_handle.describe()
    assert f"gpu_device:   {gpu_handle.gpu_device}" in text
    assert "gpu_enabled:  True" in text
    assert "cpu_mirror:   False" in text


def test_dlpack_device_is_the_payload_device(gpu_handle):
    gpu_handle.write(torch.arange(4, dtype=torch.float32))
    device = gpu_handle._payload.stream.device
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
        assert got.device == gpu_handle._payload.stream.device and got.tolist() == [7.0] * 4
    sync = gpu_handle.read_after(n)
    assert type(sync) is type(after)


def test_async_publication_reads_are_refused_like_the_sync_ones(gpu_handle):
    with pytest.raises(RuntimeError, match="GPU stream"):
        gpu_handle.read_publication()
    with pytest.raises(RuntimeError, match="GPU stream"):
        asyncio.run(gpu_handle.read_new_publication_async(timeout=0.01))
    with pytest.raises(RuntimeError, match="GPU stream"):
        asyncio.run(gpu_handle.read_after_publication_async(0, timeout=0.01))


def test_fileno_follows_the_gpu_handles_reads(name):
    """A GPU handle's readiness descriptor is armed on its read count, which its device
    reads keep (note_count): readable after a publication, not after reading it, and
    readable again after the next one; the latest read and a timed read both re-arm it."""
    import select

    def readable(fd, wait=0.0):
        return bool(select.select([fd], [], [], wait)[0])

    shm = sim_handle(name)
    try:
        fd = shm.fileno()
        assert fd == shm.fileno() and not readable(fd)
        shm.write(torch.full((4,), 1.0))
        assert readable(fd, 5)
        shm.read()  # the untimed latest read (op read)
        assert not readable(fd)
        shm.write(torch.full((4,), 2.0))
        assert readable(fd, 5)
        shm.read(timeout=1)  # a timed read (op wait_read_into)
        assert not readable(fd) and shm.last_read_count == 2
    finally:
        shm.close()


def test_stat_names_the_device_of_a_gpu_stream(gpu_handle):
    info = torch_shmem.stat(gpu_handle.name)
    assert info["gpu_enabled"] and info["gpu_device"] == "cuda:0"
    assert info["bridge"] is None


def test_one_handle_class_with_a_device_payload(gpu_handle):
    from torch_shmem import _gpu
    from torch_shmem._stream import HostPayload

    assert type(gpu_handle) is torch_shmem.SharedMemory
    assert isinstance(gpu_handle._payload, _gpu.DevicePayload)
    assert repr(gpu_handle).endswith(f"gpu_device={gpu_handle.gpu_device!r})")
    plain = torch_shmem.open(gpu_handle.name)  # no gpu_device: the host payload
    try:
        assert isinstance(plain._payload, HostPayload) and plain.gpu_device is None
        assert plain.gpu_enabled and plain.to_config()["gpu_device"] is None
    finally:
        plain.close()


@pytest.mark.parametrize("nslots, cpu_mirror, notify", [(3, False, False), (2, True, True)])
def test_to_config_round_trip_recreates_the_gpu_stream(name, monkeypatch, nslots, cpu_mirror, notify):
    """to_config() of a GPU handle carries gpu_device, cpu_mirror, notify and slots, and
    create_from_config() hands all four to the GPU stream's creation (here a
    simulated-device stream in place of cudaMalloc'd slots)."""
    from torch_shmem import _gpu
    from torch_shmem import ops as O

    calls = []

    def create_stream(name_, shape, np_dtype, gpu_device, cpu_mirror_, mode, nslots_=_gpu.DEFAULT_SLOTS,
                      notify=False, ring_policy=-1):
        calls.append((gpu_device, cpu_mirror_, nslots_, notify))
        flags = SIM | (_core.FLAG_CPU_MIRROR if cpu_mirror_ else 0) | (_core.FLAG_NOTIFY if notify else 0)
        _core.create(name_, dtype_code(np_dtype), tuple(shape), mode, flags, nslots_).close(1.0)
        return O.open(name_)

    shm = sim_handle(name, (2, 3), np.int32, nslots=nslots, cpu_mirror=cpu_mirror, notify=notify)
    config = shm.to_config()
    assert config == {"name": name, "shape": [2, 3], "dtype": "int32", "gpu_device": shm.gpu_device,
                      "cpu_mirror": cpu_mirror, "notify": notify, "slots": nslots}
    shm.unlink()
    monkeypatch.setattr(_gpu.DevicePayload, "create_stream", staticmethod(create_stream))
    again = torch_shmem.SharedMemory.create_from_config(config)
    try:
        assert calls == [(config["gpu_device"], cpu_mirror, nslots, notify)]
        assert again.gpu_enabled and again.slots == nslots and again.cpu_mirror is cpu_mirror
        assert again.to_config() == config
        again.write(torch.arange(6, dtype=torch.int32).reshape(2, 3))
        assert isinstance(again.read(), torch.Tensor)
    finally:
        again.unlink()


@pytest.mark.parametrize("slots, nslots", [(1, 3), (2, 2), (16, 16)])
def test_create_gives_a_gpu_stream_its_slots(name, monkeypatch, slots, nslots):
    """create(gpu_device=..., slots=N) makes N device slots; the default 1 (a single
    payload, which GPU streams do not have) makes _gpu.DEFAULT_SLOTS."""
    from torch_shmem import _gpu

    seen = []

    def create_stream(name_, shape, np_dtype, gpu_device, cpu_mirror, mode, nslots_=_gpu.DEFAULT_SLOTS,
                      notify=False, ring_policy=-1):
        seen.append(nslots_)
        raise RuntimeError("no device here")

    monkeypatch.setattr(_gpu.DevicePayload, "create_stream", staticmethod(create_stream))
    with pytest.raises(RuntimeError, match="no device here"):
        torch_shmem.create(name, shape=(4,), gpu_device="cuda:0", slots=slots)
    assert seen == [nslots]


def test_describe_reports_the_device_and_the_slots(gpu_handle):
    lines = gpu_handle.describe().splitlines()
    assert f"gpu_device:   {gpu_handle.gpu_device}" in lines
    assert "gpu_device:   None" not in lines
    assert "slots:        3" in lines


def test_async_reads_into_out_return_it_like_the_sync_reads(gpu_handle):
    gpu_handle.write(torch.full((4,), 3.0))
    out = torch.empty(4)

    async def main():
        return await gpu_handle.read_after_async(0, timeout=10, out=out)

    got = asyncio.run(main())
    sync_out = torch.empty(4)
    assert got is out and gpu_handle.read_after(0, out=sync_out) is sync_out
    assert out.tolist() == sync_out.tolist() == [3.0] * 4


def test_reads_return_the_same_type_everywhere(gpu_handle):
    """read, read_new, read_after and their async forms: tensors on the payload's device."""
    gpu_handle.write(torch.ones(4))
    device = gpu_handle._payload.stream.device

    async def main():
        return await gpu_handle.read_after_async(0, timeout=10)

    results = [gpu_handle.read(), gpu_handle.read(timeout=5), gpu_handle.read_after(0, timeout=5),
               asyncio.run(main())]
    for got in results:
        assert isinstance(got, torch.Tensor) and got.device == device and got.tolist() == [1.0] * 4


class _HeldMidWrite:
    """Another thread holds the stream's lock while its sequence is odd (a writer
    inside its host window), so a snapshot can be had only through the lock."""

    def __init__(self, name):
        self.name = name
        self.native = _core.open(name, False)
        self.taken = threading.Event()
        self.leave = threading.Event()
        self.thread = threading.Thread(target=self._hold)
        self.seq = np.memmap("/dev/shm/torch_shmem." + name, dtype=np.uint64, mode="r+",
                             offset=1024, shape=(1,))

    def _hold(self):
        self.native.acquire(None)
        self.seq[0] += 1
        self.taken.set()
        self.leave.wait(30)
        self.seq[0] -= 1
        self.native.release()

    def __enter__(self):
        self.thread.start()
        assert self.taken.wait(10)
        return self

    def __exit__(self, *exc):
        self.leave.set()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.native.close(1.0)


def _bounded(fn, limit=20.0):
    """Run fn in a thread; (result or exception, seconds), failing if it does not end."""
    box = []

    def run():
        t0 = time.monotonic()
        try:
            box.append(fn())
        except BaseException as exc:  # noqa: BLE001  (reported to the test)
            box.append(exc)
        box.append(time.monotonic() - t0)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), "the read did not end: its timeout was not honoured"
    return box[0], box[1]


@pytest.mark.parametrize("use_out", [False, True])
def test_read_honours_timeout_when_the_lock_is_held(gpu_handle, use_out):
    gpu_handle.write(torch.full((4,), 5.0))
    out = torch.empty(4) if use_out else None
    with _HeldMidWrite(gpu_handle.name):
        got, took = _bounded(lambda: gpu_handle.read(timeout=0.3, out=out))
        assert isinstance(got, TimeoutError), got
        assert repr(gpu_handle.name) in str(got) and str(got).startswith("torch_shmem:")
        assert 0.25 <= took < 10
        got, _ = _bounded(lambda: gpu_handle.read_after(0, timeout=0.3))
        assert isinstance(got, TimeoutError) and gpu_handle.name in str(got)
    assert gpu_handle.read(timeout=5).tolist() == [5.0] * 4  # the lock is free again


def test_read_new_and_read_after_time_out_naming_the_stream(gpu_handle):
    gpu_handle.write(torch.zeros(4))
    for call in (lambda: gpu_handle.read_new(timeout=0.2),
                 lambda: gpu_handle.read_after(gpu_handle.count, timeout=0.2)):
        got, took = _bounded(call)
        assert isinstance(got, TimeoutError) and repr(gpu_handle.name) in str(got)
        assert took >= 0.15


def test_read_timeout_before_the_first_write(gpu_handle):
    assert gpu_handle.read(timeout=0.5).tolist() == [0.0] * 4  # never written: the zeroed slot
    with _HeldMidWrite(gpu_handle.name):  # the first write inside its host window
        got, _ = _bounded(lambda: gpu_handle.read(timeout=0.3))
        assert isinstance(got, TimeoutError) and repr(gpu_handle.name) in str(got)


def test_read_after_a_torn_write_raises_inconsistent(gpu_handle):
    gpu_handle.write(torch.ones(4))
    native = _core.open(gpu_handle.name, False)
    seq = np.memmap("/dev/shm/torch_shmem." + gpu_handle.name, dtype=np.uint64, mode="r+",
                    offset=1024, shape=(1,))
    seq[0] += 1  # a writer that died in its host window, recovered by ...
    native.acquire(None)
    try:
        with pytest.raises(torch_shmem.InconsistentStreamError, match=gpu_handle.name):
            gpu_handle.read(timeout=1)  # ... the lock taken under the reader: torn
    finally:
        native.release()
        seq[0] -= 1
        native.close(1.0)


def test_close_wakes_a_waiting_read(gpu_handle):
    gpu_handle.write(torch.zeros(4))
    timer = threading.Timer(0.2, gpu_handle.close)
    timer.start()
    got, _ = _bounded(lambda: gpu_handle.read_new(timeout=20))
    timer.join()
    assert isinstance(got, RuntimeError) and "closed" in str(got), got


def test_unsupported_operations_raise_clear_errors(gpu_handle):
    for call, what in ((gpu_handle.write_view, "write_view()"),
                       (gpu_handle.write_view_locked, "write_view_locked()"),
                       (gpu_handle.read_publication, "read_publication()"),
                       (gpu_handle.read_new_publication, "read_new_publication()"),
                       (lambda: gpu_handle.read_after_publication(0), "read_after_publication()")):
        with pytest.raises(RuntimeError, match=rf"is a GPU stream: {what.replace('(', '[(]').replace(')', '[)]')} is not supported"):
            call()


def test_pickle_reopens_with_the_device(gpu_handle):
    from torch_shmem._stream import _reopen

    fn, args = gpu_handle.__reduce__()
    assert fn is _reopen and args == (gpu_handle.name, False, gpu_handle.gpu_device)
    plain = torch_shmem.open(gpu_handle.name)
    try:
        assert pickle.loads(pickle.dumps(plain)).gpu_device is None
    finally:
        plain.close()


def test_clear_and_write_locked(gpu_handle):
    gpu_handle.write(torch.ones(4))
    gpu_handle.clear(timeout=5)
    assert gpu_handle.read().tolist() == [0.0] * 4 and gpu_handle.count == 2
    with pytest.raises(RuntimeError, match="requires the lock"):
        gpu_handle.write_locked([1, 2, 3, 4])
    with gpu_handle.locked():
        gpu_handle.write_locked([1, 2, 3, 4], frame_id=7)
        assert gpu_handle.read(safe=False).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert gpu_handle.frame_id == 7 and gpu_handle.count == 3


def test_host_values_are_converted_by_the_casting_rule(name):
    """A host value of another dtype or layout is converted by the handle (the CPU
    streams' rule) and then uploaded; large ones too (no live host payload to cast into)."""
    n = 64 * 1024  # 64 KiB of uint8 and more: the CPU path would cast in place
    shm = sim_handle(name, (n,), np.uint8)
    try:
        shm.write(np.arange(n, dtype=np.int64) % 200)  # int64 -> uint8, every value fits
        assert shm.read().numpy().tolist()[:3] == [0, 1, 2] and shm.count == 1
        shm.write(np.arange(n, dtype=np.uint8)[::-1].copy()[::1])  # exact dtype
        bad = np.full(n, 300)
        with pytest.raises(ValueError, match=f"{name}.*300"):
            shm.write(bad)
        shm.write(bad, casting="unsafe")
        assert int(shm.read()[0]) == 300 % 256 and shm.count == 3
        with pytest.raises(ValueError, match="casting must be one of"):
            shm.write(bad, casting="nope")
        with pytest.raises(ValueError, match=name):
            shm.write(np.zeros(3, np.uint8))  # wrong shape
    finally:
        shm.close()


@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (float("nan"), ValueError), ("1", TypeError)])
def test_bad_read_timeouts_are_refused_like_cpu_reads(gpu_handle, bad, exc):
    gpu_handle.write(torch.ones(4))
    with pytest.raises(exc, match=f"{gpu_handle.name}.*timeout must be"):
        gpu_handle.read(timeout=bad)
    with pytest.raises(exc, match=f"{gpu_handle.name}.*timeout must be"):
        gpu_handle.read_after(0, timeout=bad)
    assert gpu_handle.read(timeout=float("inf")).tolist() == [1.0] * 4


def test_reads_keep_the_read_statistics(gpu_handle):
    """GPU handle reads count what they read, as CPU reads do: last_read_count and
    missed_writes / total_missed_writes, for the untimed, timed and waiting reads."""
    shm = gpu_handle
    assert (shm.last_read_count, shm.missed_writes) == (0, 0)
    for k in range(1, 4):
        shm.write(torch.full((4,), float(k)))
    assert shm.read().tolist() == [3.0] * 4
    assert (shm.last_read_count, shm.missed_writes, shm.total_missed_writes) == (3, 2, 2)
    for k in range(4, 6):
        shm.write(torch.full((4,), float(k)))
    assert shm.read(timeout=1.0).tolist() == [5.0] * 4
    assert (shm.last_read_count, shm.missed_writes, shm.total_missed_writes) == (5, 1, 3)
    shm.write(torch.full((4,), 6.0))
    out = torch.empty(4)
    assert shm.read_after(5, out=out, timeout=1.0) is out and out.tolist() == [6.0] * 4
    assert (shm.last_read_count, shm.missed_writes, shm.total_missed_writes) == (6, 0, 3)
    assert shm.read(out=out) is out and shm.last_read_count == 6
