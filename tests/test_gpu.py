"""GPU streams on a real device (marker gpu; skipped without CUDA).

None of these can run on the development machines; run them first thing on a
GPU machine: `pytest -m gpu -q`.
"""

import multiprocessing as mp
import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu

# TORCH_SHMEM_COLLECT_GPU_TESTS=1: import and collect this module without a GPU
# (tests/test_gpu_collect.py), so a broken import or parametrization shows in CI
# rather than in a rare GPU window; the tests themselves still need a device.
_COLLECT_ONLY = os.environ.get("TORCH_SHMEM_COLLECT_GPU_TESTS") == "1"
if not torch.cuda.is_available() and not _COLLECT_ONLY:
    pytest.skip("no CUDA device visible to torch", allow_module_level=True)

from torch_shmem import _C  # noqa: E402

if not _C.WITH_CUDA and not _COLLECT_ONLY:
    pytest.skip("torch_shmem was built without CUDA (no toolkit at build time)", allow_module_level=True)

import _gpu_workers  # noqa: E402
import torch_shmem  # noqa: E402
import torch_shmem.ops as O  # noqa: E402

ctx = mp.get_context("spawn")


def wait_stream(stream, release, timeout=60):
    """Wait for a CUDA stream without hanging the session: a stream parked in wait_device
    on a count nobody publishes would block synchronize() forever (and every later
    device-wide sync). On timeout, ``release()`` publishes what it waits for, then fail."""
    deadline = time.monotonic() + timeout
    while not stream.query():
        if time.monotonic() > deadline:
            release()
            stream.synchronize()
            pytest.fail(f"the CUDA stream was still waiting after {timeout} s")
        time.sleep(0.005)


def join(p, timeout=120):
    p.join(timeout)
    if p.is_alive():
        p.kill()
        pytest.fail(f"{p.name} hung")
    assert p.exitcode == 0, p.exitcode


def test_same_process_publish_read_upload_download(name):
    s = O.create_gpu(name, (4, 5), torch.float32, device=0)
    assert s.device == torch.device("cuda", 0)
    x = torch.randn(4, 5, device="cuda")
    O.publish(s, x)
    y = O.read(s)
    assert y.device.type == "cuda" and torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    O.publish(s, x.cpu() * 2)  # host upload
    assert torch.equal(O.read(s), x * 2)
    out = torch.empty(4, 5)  # download into a host tensor
    O.read_into(s, out)
    assert torch.equal(out, (x * 2).cpu())
    again = O.open(name)  # the creator can open its own stream
    assert torch.equal(O.read(again), x * 2)
    assert int(O.count(s)) == 2
    O.close(again)
    O.close(s)
    O.unlink(name)


@pytest.mark.ipc
def test_cross_process_read(name):
    s = O.create_gpu(name, (3,), torch.float32, device=0)
    O.publish(s, torch.tensor([1.0, 2.0, 3.0], device="cuda"))
    q = ctx.Queue()
    p = ctx.Process(target=_gpu_workers.read_once, args=(name, q))
    p.start()
    assert q.get(timeout=120) == [1.0, 2.0, 3.0]
    join(p)
    O.close(s)
    O.unlink(name)


@pytest.mark.ipc
@pytest.mark.parametrize("nbytes", [4, 1 << 20, 64 << 20])
def test_consistency_under_a_fast_writer(name, nbytes):
    """A writer process publishes uniform frames 1, 2, ... back to back for 2 s into a
    two-slot stream (so the writer laps a reader's slot as often as it can); this process
    reads all the while: every read is one whole frame, never older than the last."""
    n = nbytes // 4
    s = O.create_gpu(name, (n,), torch.float32, device=0, nslots=2)
    ready = ctx.Event()
    q = ctx.Queue()
    p = ctx.Process(target=_gpu_workers.publish_for, args=(name, 2.0, ready, q))
    p.start()
    assert ready.wait(120), "the writer process did not open the stream"
    torn = reads = 0
    last = 0
    deadline = time.monotonic() + 120
    while p.is_alive() and time.monotonic() < deadline:
        y = O.read(s)
        lo, hi = float(y.min()), float(y.max())
        reads += 1
        if lo != hi:
            torn += 1
        assert lo >= last  # never goes back
        last = lo
    join(p)
    frames = q.get(timeout=10)
    print(f"{reads} reads of {frames} frames of {nbytes} B")
    assert torn == 0, f"{torn}/{reads} torn reads"
    assert reads > 0 and frames > 0
    assert float(O.read(s)[0]) == float(frames) and int(O.count(s)) == frames
    O.close(s)
    O.unlink(name)


@pytest.mark.ipc
def test_two_writer_processes_alternating(name):
    """Two writer processes publish to one GPU stream at the same time (the lock
    serializes them); every read is one whole frame and the count is exact."""
    n = (4 << 20) // 4
    s = O.create_gpu(name, (n,), torch.float32, device=0, nslots=2)
    q = ctx.Queue()
    readies = [ctx.Event(), ctx.Event()]
    writers = [ctx.Process(target=_gpu_workers.publish_for, args=(name, 1.5, readies[i], q, 1e6 * i))
               for i in range(2)]
    for w in writers:
        w.start()
    for r in readies:
        assert r.wait(120)
    torn = reads = 0
    deadline = time.monotonic() + 120
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        y = O.read(s)
        reads += 1
        torn += float(y.min()) != float(y.max())
    for w in writers:
        join(w)
    frames = [q.get(timeout=10), q.get(timeout=10)]
    assert torn == 0, f"{torn}/{reads} torn reads"
    assert min(frames) > 0 and int(O.count(s)) == sum(frames)
    O.close(s)
    O.unlink(name)


def test_cpu_mirror_on_and_off(name):
    m = O.create_gpu(name, (2, 2), torch.float64, device=0, cpu_mirror=True)
    O.publish(m, torch.ones(2, 2, dtype=torch.float64, device="cuda"))
    np.testing.assert_array_equal(torch_shmem.open(name).read(), np.ones((2, 2)))
    O.close(m)
    O.unlink(name)
    p = O.create_gpu(name, (2, 2), torch.float64, device=0)
    O.publish(p, torch.ones(2, 2, dtype=torch.float64, device="cuda"))
    with pytest.raises(RuntimeError, match="gpu_device"):
        torch_shmem.open(name).read()
    O.close(p)
    O.unlink(name)


@pytest.mark.ipc
def test_wait_read_into_woken_by_another_process(name):
    s = O.create_gpu(name, (8,), torch.int32, device=0)
    p = ctx.Process(target=_gpu_workers.publish_after, args=(name, 0.5, 7))
    p.start()
    out = torch.empty(8, dtype=torch.int32, device="cuda")
    O.wait_read_into(s, out, timeout=60)
    assert torch.equal(out.cpu(), torch.full((8,), 7, dtype=torch.int32))
    join(p)
    O.close(s)
    O.unlink(name)


def test_lock_holder_killed(name):
    s = O.create_gpu(name, (4,), torch.float32, device=0)
    ready = ctx.Event()
    p = ctx.Process(target=_gpu_workers.hold_lock_and_die, args=(name, ready))
    p.start()
    assert ready.wait(60)
    p.kill()
    p.join(30)
    t0 = time.monotonic()
    O.publish(s, torch.ones(4, device="cuda"))
    assert time.monotonic() - t0 < 1.0
    assert torch.equal(O.read(s).cpu(), torch.ones(4))
    O.close(s)
    O.unlink(name)


def test_no_leak_over_create_unlink_loops(name):
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info(0)[0]
    for i in range(30):
        s = O.create_gpu(f"{name}-{i}", (16 << 20,), torch.float32, device=0)  # 64 MiB x 3 slots
        O.publish(s, torch.zeros(16 << 20, device="cuda"))
        O.close(s)
        O.unlink(f"{name}-{i}")
    torch.cuda.synchronize()
    free_after = torch.cuda.mem_get_info(0)[0]
    assert free_before - free_after < (256 << 20), (free_before, free_after)


@pytest.mark.ipc
def test_importer_after_its_creator_exits(name):
    """Legacy CUDA IPC gives no guarantee for memory whose exporting process has exited
    (docs/gpu.md: keep the creator alive while others read). What must hold: the importer
    neither hangs nor crashes; a read returns the last publication or raises a clear error.
    The outcome on this driver is printed."""
    importer_ready, creator_gone = ctx.Event(), ctx.Event()
    q = ctx.Queue()
    creator = ctx.Process(target=_gpu_workers.create_publish_wait, args=(name, importer_ready))
    creator.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            torch_shmem.stat(name)
            break
        except FileNotFoundError:
            time.sleep(0.05)
    importer = ctx.Process(target=_gpu_workers.map_and_read_after_creator_exit,
                           args=(name, importer_ready, creator_gone, q))
    importer.start()
    join(creator)
    creator_gone.set()
    kind, first, got = q.get(timeout=120)
    join(importer)
    print(f"read after the creator exited: {kind}: {got}")
    assert first == [0.0, 1.0, 2.0, 3.0]
    assert kind in ("data", "error")
    if kind == "data":
        assert got == first
    else:
        assert "GPU stream" in got or "CUDA" in got or "cuda" in got


@pytest.mark.ipc
def test_creator_exit_is_reported(name):
    q = ctx.Queue()
    p = ctx.Process(target=_gpu_workers.create_and_exit, args=(name, q))
    p.start()
    assert q.get(timeout=120) == "created"
    join(p)
    with pytest.raises(RuntimeError, match="creating process may have exited"):
        O.open(name)
    O.unlink(name)


def test_compiled_publish_read_on_cuda(name):
    s = O.create_gpu(name, (16,), torch.float32, device=0)

    @torch.compile(fullgraph=True)
    def step(x):
        O.publish(s, x * 2)
        return O.read(s) + 1

    x = torch.randn(16, device="cuda")
    torch.testing.assert_close(step(x), x * 2 + 1)
    O.close(s)
    O.unlink(name)


def test_live_view_under_lock(name):
    s = O.create_gpu(name, (4,), torch.float32, device=0)
    O.publish(s, torch.arange(4.0, device="cuda"))
    h = torch_shmem.open(name)
    with h.locked():
        view = torch.ops.shmem.live_view(s.token)
        assert view.device.type == "cuda" and torch.equal(view, torch.arange(4.0, device="cuda"))
    O.close(s)
    O.unlink(name)


@pytest.mark.ipc
def test_pyshmem_api_on_gpu_streams(name):
    assert torch_shmem.gpu_available()
    s = torch_shmem.create(name, shape=(2, 3), dtype=np.float32, gpu_device="cuda:0")
    assert s.gpu_enabled and s.gpu_device == "cuda:0" and s.cpu_mirror is False
    assert repr(s).endswith("gpu_device='cuda:0')")
    s.write(np.ones((2, 3), np.float32))  # host upload
    y = s.read()
    assert isinstance(y, torch.Tensor) and y.device.type == "cuda" and torch.equal(y.cpu(), torch.ones(2, 3))
    s.write(torch.full((2, 3), 2.0, device="cuda"), frame_id=9)  # device to device
    assert s.count == 2 and s.frame_id == 9
    q = ctx.Queue()
    p = ctx.Process(target=_gpu_workers.api_read, args=(name, q))
    p.start()
    assert q.get(timeout=120) == ("cuda", [[2.0] * 3] * 2)
    join(p)
    plain = torch_shmem.open(name)  # no attachment, no mirror: metadata and lock only
    assert plain.gpu_enabled and plain.count == 2
    with pytest.raises(RuntimeError, match="gpu_device='cuda:N'"):
        plain.read()
    with plain.locked():
        live = s.read(safe=False)
        assert torch.equal(live, torch.full((2, 3), 2.0, device="cuda"))
    with pytest.raises(ValueError):
        s.write(torch.zeros(3, 2, device="cuda"))
    s.unlink()


def test_pyshmem_api_cpu_mirror(name):
    s = torch_shmem.create(name, shape=(4,), dtype=np.int32, gpu_device="cuda:0", cpu_mirror=True)
    s.write(np.arange(4, dtype=np.int32))
    assert torch_shmem.open(name).read().tolist() == [0, 1, 2, 3]  # NumPy from the mirror
    with pytest.raises(RuntimeError, match="GPU"):
        torch_shmem.open(name).write(np.zeros(4, np.int32))  # writes need the attachment
    s.unlink()


def test_notify_is_recorded_on_gpu_streams(name):
    s = torch_shmem.create(name, shape=(4,), gpu_device="cuda:0", notify=True)
    try:
        assert s.notify is True and s.to_config()["notify"] is True
        assert torch_shmem.open(name).notify is True
        assert torch_shmem.stat(name)["notify"] is True
    finally:
        s.unlink()
    plain = torch_shmem.create(name, shape=(4,), gpu_device="cuda:0")
    assert plain.notify is False
    plain.unlink()


@pytest.mark.parametrize("policy", ["block", "overwrite"])
def test_gpu_ring_in_order_on_the_device(name, policy):
    """A GPU ring's read_next queues the copy and the cursor's device counter on the current
    CUDA stream without waiting; the writer reuses a slot only after the counter passes."""
    from torch_shmem import ops as O

    shm = torch_shmem.create(name, shape=(1 << 16,), dtype=np.float32, gpu_device="cuda:0",
                             ring=4, policy=policy)
    try:
        reader = O.open(name, device=0)
        cur = O.cursor(reader, "r")
        outs = [torch.empty(1 << 16, device="cuda") for _ in range(12)]
        metas = []
        for c in range(1, 13):
            shm.write(torch.full((1 << 16,), float(c), device="cuda"))
            metas.append(O.read_next(reader, cur, outs[c - 1], timeout=10).tolist())
        torch.cuda.synchronize()
        assert [m[0] for m in metas] == list(range(1, 13)) and all(m[1] == 0 for m in metas)
        for c, out in enumerate(outs, start=1):
            assert torch.all(out == c).item(), c
        stat = torch_shmem.stat(name)["ring"]
        assert stat["size"] == 4 and stat["cursors"][0]["consumed"] == 12
        O.close(reader)
    finally:
        shm.unlink()


def release_on_exit(consumer, publish):
    """Context manager for tests that park ``consumer``: on the way out (pass or fail) a
    still-parked consumer is released by ``publish()`` from another CUDA stream, so a
    failed assertion cannot leave it parked and hang every later device-wide sync."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        try:
            yield
        finally:
            if not consumer.query():
                with torch.cuda.stream(torch.cuda.Stream()):
                    publish()
                wait_stream(consumer, lambda: None, timeout=30)

    return guard()


def skip_with_one_hardware_queue():
    """Same-process producer/consumer device waits need the producer's work in another
    hardware queue than the parked consumer's; with CUDA_DEVICE_MAX_CONNECTIONS=1 every
    CUDA stream of the process shares one and the producer can never run (docs/gpu.md,
    "A producer and a consumer in the same process")."""
    if os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1":
        pytest.skip("CUDA_DEVICE_MAX_CONNECTIONS=1: a same-process producer queues behind the parked consumer")


@pytest.mark.device_wait
def test_device_wait_same_process(name):
    """wait_device returns at once on the host; the consumer stream's later work
    runs only after publication n is complete, and slot_view(n) holds it."""
    skip_with_one_hardware_queue()
    s = O.create_gpu(name, (1024,), torch.float32, device=0, nslots=3)
    r = O.open(name)
    producer = torch.cuda.Stream()
    consumer = torch.cuda.Stream()
    with release_on_exit(consumer, lambda: [O.publish(s, torch.zeros(1024, device="cuda")) for _ in range(2)]):
        with torch.cuda.stream(producer):
            O.publish(s, torch.full((1024,), 1.0, device="cuda"))
        with torch.cuda.stream(consumer):
            O.wait_device(r, 1)  # already complete: no wait
            got = O.slot_view(r, 1).clone()
        consumer.synchronize()
        assert torch.equal(got, torch.full((1024,), 1.0, device="cuda"))
        with torch.cuda.stream(consumer):
            t0 = time.monotonic()
            O.wait_device(r, 2)  # not yet published: the host must not block
            assert time.monotonic() - t0 < 1.0
            got = O.slot_view(r, 2).clone()
        assert not consumer.query()  # the consumer stream is parked on the device counter
        with torch.cuda.stream(producer):
            O.publish(s, torch.full((1024,), 2.0, device="cuda"))
        wait_stream(consumer, lambda: O.publish(s, torch.zeros(1024, device="cuda")))
        assert torch.equal(got, torch.full((1024,), 2.0, device="cuda"))
        with pytest.raises(ValueError, match="count >= 1"):
            O.wait_device(r, 0)
    O.close(r)
    O.close(s)
    O.unlink(name)


@pytest.mark.device_wait
@pytest.mark.parametrize("path", ["memop", "poll"])
def test_device_wait_paths(name, path, monkeypatch):
    """Both device-wait paths park and release a consumer stream: cuStreamWaitValue64 and
    cuStreamWriteValue64 (default), and the polling and store kernels that replace them
    where the driver lacks stream memory operations (forced by TORCH_SHMEM_DEVICE_WAIT=poll,
    read once per process, hence a fresh process for each)."""
    skip_with_one_hardware_queue()
    if path == "poll":
        monkeypatch.setenv("TORCH_SHMEM_DEVICE_WAIT", "poll")
    else:
        monkeypatch.delenv("TORCH_SHMEM_DEVICE_WAIT", raising=False)
    q = ctx.Queue()
    p = ctx.Process(target=_gpu_workers.device_wait_roundtrip, args=(name, q))
    p.start()
    parked, released, value, uniform, stats = q.get(timeout=120)
    join(p)
    assert parked != "error", released
    print(path, stats)
    if path == "memop" and stats["device_wait_path"] == "kernel":
        pytest.skip(f"the driver refused 64-bit stream memory operations: {stats}")
    want = "kernel" if path == "poll" else "memop"
    assert stats["device_wait_path"] == want and stats["counter_store_path"] == want, stats
    assert parked, "the consumer stream ran before the publication"
    assert released and value == 5.0 and uniform


@pytest.mark.device_wait
def test_read_on_a_parked_stream_waits_for_the_publication(name):
    """wait_device(s, n) then read_into(s, out) on the same CUDA stream (the natural
    pattern): the read waits on the host, without the stream lock, until a writer (here
    another thread) publishes n, then returns it; it neither deadlocks nor blocks the
    writer."""
    skip_with_one_hardware_queue()
    import threading

    from torch_shmem import _C

    s = O.create_gpu(name, (1 << 20,), torch.float32, device=0, nslots=2)
    O.publish(s, torch.full((1 << 20,), 1.0, device="cuda"))
    consumer = torch.cuda.Stream()
    before = int(_C.gpu_stats()["parked_reads_waited"])

    def publish_later():
        time.sleep(0.5)
        with torch.cuda.stream(torch.cuda.Stream()):
            O.publish(s, torch.full((1 << 20,), 2.0, device="cuda"))

    writer = threading.Thread(target=publish_later)
    with release_on_exit(consumer, lambda: O.publish(s, torch.zeros(1 << 20, device="cuda"))):
        with torch.cuda.stream(consumer):
            O.wait_device(s, 2)
            writer.start()
            out = torch.empty(1 << 20, device="cuda")
            t0 = time.monotonic()
            O.read_into(s, out)
            waited = time.monotonic() - t0
        writer.join(30)
        consumer.synchronize()
    assert waited >= 0.3 and torch.equal(out, torch.full((1 << 20,), 2.0, device="cuda"))
    assert int(_C.gpu_stats()["parked_reads_waited"]) > before
    O.close(s)
    O.unlink(name)


@pytest.mark.device_wait
def test_publish_on_a_stream_parked_on_another_gpu_stream_is_refused(name):
    """A CUDA stream parked on an unpublished count of GPU stream A cannot publish to
    GPU stream B (the write would wait behind A's count holding B's lock): refused before
    anything is queued; once A's count is published the same stream publishes to B."""
    skip_with_one_hardware_queue()
    a = O.create_gpu(f"{name}-a", (64,), torch.float32, device=0)
    b = O.create_gpu(name, (64,), torch.float32, device=0)
    parked = torch.cuda.Stream()
    with release_on_exit(parked, lambda: O.publish(a, torch.zeros(64, device="cuda"))):
        with torch.cuda.stream(parked):
            O.wait_device(a, 1)
            with pytest.raises(RuntimeError, match="wait_device"):
                O.publish(b, torch.ones(64, device="cuda"))
            with pytest.raises(RuntimeError, match="another CUDA stream"):
                O.read(b)
        with torch.cuda.stream(torch.cuda.Stream()):
            O.publish(a, torch.ones(64, device="cuda"))
        wait_stream(parked, lambda: None)
        with torch.cuda.stream(parked):
            O.publish(b, torch.full((64,), 3.0, device="cuda"))
    assert torch.equal(O.read(b), torch.full((64,), 3.0, device="cuda"))
    for st in (a, b):
        O.close(st)
    O.unlink(f"{name}-a")
    O.unlink(name)


def test_live_view_outlives_close_until_queued_work_is_done(name):
    """The last reference to a slot view can go while kernels that read it are still
    queued (here behind a 200 ms sleep kernel), and the stream be closed and unlinked at
    once: the mapping is released only after that work, which reads the right bytes."""
    from torch_shmem import _C

    s = O.create_gpu(name, (1 << 20,), torch.float32, device=0)
    O.publish(s, torch.full((1 << 20,), 4.0, device="cuda"))
    torch.cuda.synchronize()
    before = int(_C.gpu_stats()["deferred_view_releases"])
    view = O.slot_view(s, 1)
    torch.cuda._sleep(int(2e8))  # ~0.1-0.2 s of GPU cycles
    y = view * 2
    del view
    O.close(s)
    O.unlink(name)
    assert int(_C.gpu_stats()["deferred_view_releases"]) == before + 1
    torch.cuda.synchronize()
    assert torch.equal(y, torch.full((1 << 20,), 8.0, device="cuda"))


@pytest.mark.ipc
@pytest.mark.device_wait
def test_device_wait_across_processes(name):
    s = O.create_gpu(name, (4096,), torch.float32, device=0, nslots=3)
    consumer = torch.cuda.Stream()
    with release_on_exit(consumer, lambda: O.publish(s, torch.zeros(4096, device="cuda"))):
        with torch.cuda.stream(consumer):
            O.wait_device(s, 1)  # queued before the writer process even starts
            got = O.slot_view(s, 1).clone()
        p = ctx.Process(target=_gpu_workers.publish_after, args=(name, 0.5, 7.0))
        p.start()
        wait_stream(consumer, lambda: O.publish(s, torch.zeros(4096, device="cuda")), timeout=120)
        assert torch.equal(got, torch.full((4096,), 7.0, device="cuda"))
        join(p)
    O.close(s)
    O.unlink(name)



@pytest.mark.parametrize("policy", ["direct", "staged"])
def test_host_uploads_pageable_and_pinned(name, policy, monkeypatch):
    """Host uploads land byte for byte whatever the path: pageable NumPy and CPU tensors
    (driver staging, or torch_shmem's two page-locked 4 MiB chunks when staged: the size
    below is not a multiple of the chunk) and pinned tensors (straight DMA)."""
    monkeypatch.setenv("TORCH_SHMEM_HOST_UPLOAD", policy)  # read when the stream is mapped
    n = (9 << 20) // 4 + 3
    s = O.create_gpu(name, (n,), torch.float32, device=0)
    from torch_shmem import _C

    staged_before = int(_C.gpu_stats()["staged_uploads"])
    g = torch.Generator().manual_seed(1)
    for k in range(3):
        host = torch.randn(n, generator=g)
        src = host.pin_memory() if k == 2 else host
        O.publish(s, src)
        assert torch.equal(O.read(s).cpu(), host), (policy, k)
    staged = int(_C.gpu_stats()["staged_uploads"]) - staged_before
    assert staged == (2 if policy == "staged" else 0), staged  # pinned sources go by DMA
    small = O.create_gpu(f"{name}-small", (5,), torch.int16, device=0)  # below one chunk
    O.publish(small, torch.arange(5, dtype=torch.int16))
    assert O.read(small).cpu().tolist() == [0, 1, 2, 3, 4]
    for st in (small, s):
        O.close(st)
    O.unlink(f"{name}-small")
    O.unlink(name)


@pytest.mark.parametrize("policy", ["kernel", "copy"])
def test_cpu_mirror_pages_registered_and_released(name, policy, monkeypatch):
    """A mirrored stream's writable handles page-lock the CPU payload: every write lands in
    it, by the copy engine (default) or the Triton kernel (TORCH_SHMEM_MIRROR=kernel,
    through shmem::mirror_copy), and opening/closing handles repeatedly
    (register/unregister) never fails."""
    from torch_shmem import kernels

    if policy == "kernel":
        monkeypatch.setenv("TORCH_SHMEM_MIRROR", "kernel")  # read when a handle maps the stream
    else:
        monkeypatch.delenv("TORCH_SHMEM_MIRROR", raising=False)  # the default: the copy engine
    n = (5 << 20) // 8 + 1
    s = torch_shmem.create(name, shape=(n,), dtype=np.float64, gpu_device="cuda:0", cpu_mirror=True)
    from torch_shmem import _C
    from torch_shmem.kernels import mirror

    plain = torch_shmem.open(name)  # CPU handle: reads the mirror
    launches = mirror.launches
    dma = int(_C.gpu_stats()["mirror_dma_copies"])
    for k in range(1, 21):
        w = torch_shmem.open(name, gpu_device="cuda:0")
        w.write(torch.full((n,), float(k), dtype=torch.float64, device="cuda"))
        w.close()
        got = plain.read()
        assert got[0] == k and got[-1] == k and (got == k).all()
    assert plain.count == 20
    launched = mirror.launches - launches  # Triton kernel launches, not op calls
    by_dma = int(_C.gpu_stats()["mirror_dma_copies"]) - dma
    if policy == "copy" or not kernels.triton_available():
        assert (launched, by_dma) == (0, 20)
    else:
        assert (launched, by_dma) == (20, 0)
    plain.close()
    s.unlink()


def test_exit_without_close_is_clean(name):
    """A process that leaves GPU streams open (mirrored, staged uploads, a live mapping)
    exits with status 0: nothing in torch_shmem runs CUDA calls that can throw at exit."""
    q = ctx.Queue()
    p = ctx.Process(target=_gpu_workers.leave_open_and_exit, args=(name, q))
    p.start()
    assert q.get(timeout=120) == "done"
    join(p)


@pytest.mark.device_wait
def test_publish_behind_own_device_wait_is_refused(name):
    """Publishing count c on a CUDA stream that this process parked on count >= c of the
    same stream would queue the write behind its own wait: refused before anything is
    queued, the lock released; another CUDA stream can publish and release the wait."""
    skip_with_one_hardware_queue()
    s = O.create_gpu(name, (256,), torch.float32, device=0)
    parked, other = torch.cuda.Stream(), torch.cuda.Stream()
    with release_on_exit(parked, lambda: O.publish(s, torch.zeros(256, device="cuda"))):
        with torch.cuda.stream(parked):
            O.wait_device(s, 1)
            with pytest.raises(RuntimeError, match="wait_device"):
                O.publish(s, torch.ones(256, device="cuda"))
        with torch.cuda.stream(other):
            O.publish(s, torch.ones(256, device="cuda"))  # the lock was released by the refusal
        wait_stream(parked, lambda: None)
    with torch.cuda.stream(parked):
        O.publish(s, torch.full((256,), 2.0, device="cuda"))  # the wait is satisfied now
    assert torch.equal(O.read(s), torch.full((256,), 2.0, device="cuda"))
    O.close(s)
    O.unlink(name)


@pytest.mark.ipc
def test_unlink_while_another_process_maps_defers_the_free(name):
    """The creator's unlink (and close) does not free device memory that another live
    process still maps: that process keeps reading the stream's last publication, even
    after the creator allocated and scribbled over fresh device memory; the importer
    table lists it meanwhile. The memory goes once that process has closed."""
    n = 1 << 20
    s = O.create_gpu(name, (n,), torch.float32, device=0)
    O.publish(s, torch.full((n,), 5.0, device="cuda"))
    ready, go = ctx.Event(), ctx.Event()
    q = ctx.Queue()
    p = ctx.Process(target=_gpu_workers.attach_then_read_on_go, args=(name, ready, go, q))
    p.start()
    assert ready.wait(120)
    assert torch_shmem.stat(name)["gpu_importers"] == [p.pid]
    O.close(s)
    O.unlink(name)
    scribble = [torch.full((n * 3,), -1.0, device="cuda") for _ in range(8)]  # reuse bait
    torch.cuda.synchronize()
    go.set()
    got = q.get(timeout=120)
    join(p)
    assert got[0] == 5.0 and got[-1] == 5.0 and set(got) == {5.0}
    del scribble


@pytest.mark.ipc
def test_pyshmem_api_read_new_woken_by_another_process(name):
    """read_new() on a GPU stream parks on the host futex and returns the next publication
    (made by another process) as a CUDA tensor; read_after() is level-triggered."""
    s = torch_shmem.create(name, shape=(64,), dtype=np.float32, gpu_device="cuda:0")
    s.write(np.zeros(64, np.float32))
    p = ctx.Process(target=_gpu_workers.publish_after, args=(name, 0.5, 3.0))
    p.start()
    t0 = time.monotonic()
    y = s.read_new(timeout=60)
    assert time.monotonic() - t0 >= 0.3  # it waited for the writer
    assert y.device.type == "cuda" and torch.equal(y.cpu(), torch.full((64,), 3.0))
    join(p)
    assert torch.equal(s.read_after(0, timeout=1).cpu(), torch.full((64,), 3.0))  # count 2 > 0: at once
    s.unlink()
