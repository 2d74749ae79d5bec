"""GPU rings (kFlagGpu | kFlagRing) on the simulated-device backend.

The stream is flagged FLAG_SIM_DEVICE: its "device" slots and per-cursor
device counters live in a second host shared-memory object and run the GPU
ring protocol of csrc/core/ring.h ("GPU rings") through torch.ops.shmem with
CPU tensors. A reader's copy and counter store happen in its call (the host
backend has no queues), so these tests check the host half of the protocol:
claims, the writer's waits on cursor counters, policies, missed counts and
the release of dead readers. tests/test_gpu.py runs the CUDA half.
"""

import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest

import torch_shmem
from torch_shmem import _core
from torch_shmem._dtypes import dtype_code

torch = pytest.importorskip("torch", reason="GPU rings are read through torch.ops.shmem")
from torch_shmem import ops as O  # noqa: E402

pytestmark = pytest.mark.cpu

FLAGS = _core.FLAG_GPU | _core.FLAG_SIM_DEVICE | _core.FLAG_RING
POLICY = {"overwrite": 0, "block": 1, "drop_newest": 2}
N = 64  # int64 elements per publication
K = 1_000_003


def payload(c):
    return torch.arange(N, dtype=torch.int64) + c * K


def make_ring(name, nslots=4, policy="block"):
    _core.create(name, dtype_code(np.dtype(np.int64)), (N,), 0o600, FLAGS, nslots,
                 POLICY[policy]).close(1.0)
    return O.open(name)


def publish_in_thread(writer, counts):
    t = threading.Thread(target=lambda: [O.publish(writer, payload(c)) for c in counts], daemon=True)
    t.start()
    return t


def test_every_publication_in_order_to_each_cursor(name):
    writer = make_ring(name, nslots=4)
    a, b = O.open(name), O.open(name)
    ca, cb = O.cursor(a, "a"), O.cursor(b, "b")
    out = torch.empty(N, dtype=torch.int64)
    for c in range(1, 4):
        O.publish(writer, payload(c))
    for stream, cur in ((a, ca), (b, cb)):
        for c in range(1, 4):
            count, missed, _fid, _t = O.read_next(stream, cur, out).tolist()
            assert (count, missed) == (c, 0)
            assert torch.equal(out, payload(c))
    ring = torch_shmem.stat(name)["ring"]
    assert ring["size"] == 4 and ring["policy"] == "block"
    assert sorted((c["name"], c["consumed"]) for c in ring["cursors"]) == [("a", 3), ("b", 3)]


def test_block_waits_for_the_slowest_cursor(name):
    writer = make_ring(name, nslots=4, policy="block")
    reader = O.open(name)
    cur = O.cursor(reader, "slow")
    for c in range(1, 5):
        O.publish(writer, payload(c))  # 4 publications fill the ring
    t = publish_in_thread(writer, [5])  # would overwrite 1, which "slow" has not read
    t.join(0.5)
    assert t.is_alive(), "the block writer overwrote an unread publication"
    out = torch.empty(N, dtype=torch.int64)
    assert O.read_next(reader, cur, out)[0].item() == 1
    t.join(10)
    assert not t.is_alive() and O.count(writer).item() == 5
    for c in range(2, 6):
        count, missed, _, _ = O.read_next(reader, cur, out).tolist()
        assert (count, missed) == (c, 0) and torch.equal(out, payload(c))


def test_overwrite_reports_exact_missed_counts(name):
    writer = make_ring(name, nslots=4, policy="overwrite")
    reader = O.open(name)
    cur = O.cursor(reader, "lagging")
    for c in range(1, 11):
        O.publish(writer, payload(c))  # never blocks
    out = torch.empty(N, dtype=torch.int64)
    count, missed, _, _ = O.read_next(reader, cur, out).tolist()
    assert (count, missed) == (7, 6)  # 7..10 are left in a ring of 4
    assert torch.equal(out, payload(7))
    seen = [O.read_next(reader, cur, out)[0].item() for _ in range(3)]
    assert seen == [8, 9, 10]
    assert torch_shmem.stat(name)["ring"]["cursors"][0]["missed"] == 6


def test_drop_newest_counts_drops(name):
    writer = make_ring(name, nslots=2, policy="drop_newest")
    reader = O.open(name)
    O.cursor(reader, "r")
    for c in range(1, 6):
        O.publish(writer, payload(c))
    assert O.count(writer).item() == 2
    assert torch_shmem.stat(name)["ring"]["drops"] == 3


def test_latest_value_read_of_a_gpu_ring(name):
    writer = make_ring(name, nslots=3, policy="overwrite")
    for c in range(1, 6):
        O.publish(writer, payload(c), frame_id=100 + c)
    got = O.read(O.open(name))
    assert torch.equal(got, payload(5))


def test_frame_id_and_write_time_travel_with_each_publication(name):
    writer = make_ring(name, nslots=4)
    reader = O.open(name)
    cur = O.cursor(reader, "r")
    O.publish(writer, payload(1), frame_id=11)
    O.publish(writer, payload(2))  # frame_id is sticky
    out = torch.empty(N, dtype=torch.int64)
    first = O.read_next(reader, cur, out).tolist()
    second = O.read_next(reader, cur, out).tolist()
    assert first[2] == 11 and second[2] == 11
    assert 0 < first[3] <= second[3]


def _consumer(name, cursor_name, total, ready, results):
    from torch_shmem import ops as O

    stream = O.open(name)
    cur = O.cursor(stream, cursor_name)
    ready.set()
    out = torch.empty(N, dtype=torch.int64)
    got, bad = [], 0
    while not got or got[-1] < total:
        count, missed, _, _ = O.read_next(stream, cur, out, timeout=60).tolist()
        if not torch.equal(out, payload(count)):
            bad += 1
        got.append(count)
    results.put((cursor_name, got, bad))


def _attach_and_hang(name, ready):
    from torch_shmem import ops as O

    stream = O.open(name)
    O.cursor(stream, "doomed")
    ready.set()
    time.sleep(120)


def test_block_ring_across_processes_every_count_once(name):
    ctx = mp.get_context("spawn")
    writer = make_ring(name, nslots=4, policy="block")
    total = 300
    results = ctx.Queue()
    readers = []
    for i in range(2):
        ready = ctx.Event()
        p = ctx.Process(target=_consumer, args=(name, f"r{i}", total, ready, results), daemon=True)
        p.start()
        assert ready.wait(60)
        readers.append(p)
    for c in range(1, total + 1):
        O.publish(writer, payload(c))
    for _ in readers:
        cname, got, bad = results.get(timeout=120)
        assert got == list(range(1, total + 1)), cname
        assert bad == 0, cname
    for p in readers:
        p.join(30)
        assert p.exitcode == 0


def test_dead_reader_does_not_wedge_a_block_writer(name):
    ctx = mp.get_context("spawn")
    writer = make_ring(name, nslots=2, policy="block")
    ready = ctx.Event()
    p = ctx.Process(target=_attach_and_hang, args=(name, ready), daemon=True)
    p.start()
    assert ready.wait(60)
    O.publish(writer, payload(1))
    O.publish(writer, payload(2))
    t = publish_in_thread(writer, [3, 4, 5])
    t.join(0.5)
    assert t.is_alive()  # blocked by "doomed", which read nothing
    os.kill(p.pid, signal.SIGKILL)
    p.join(30)
    t.join(10)
    assert not t.is_alive() and O.count(writer).item() == 5
    cursors = torch_shmem.stat(name)["ring"]["cursors"]
    assert [(c["name"], c["pid"]) for c in cursors] == [("doomed", None)]


def test_gpu_ring_geometry_is_validated(name):
    code = dtype_code(np.dtype(np.int64))
    with pytest.raises(ValueError, match="GPU rings need 2 to 16 slots"):
        _core.create(name, code, (N,), 0o600, FLAGS, 17, 0)
    with pytest.raises(ValueError, match="keeps no CPU mirror"):
        _core.create(name, code, (N,), 0o600, FLAGS | _core.FLAG_CPU_MIRROR, 4, 0)
    assert name not in torch_shmem.list_streams()


def test_create_gpu_ring_policy_is_checked():
    from torch_shmem import _C

    if not _C.WITH_CUDA:
        pytest.skip("a build without the CUDA half refuses every GPU stream first")
    with pytest.raises(ValueError, match="ring_policy must be -1"):
        torch.ops.shmem.create_gpu("t-never", [4], torch.float32, 0, 4, False, 0o600, False, 7)
    with pytest.raises(ValueError, match="a GPU ring keeps no CPU mirror"):
        torch.ops.shmem.create_gpu("t-never", [4], torch.float32, 0, 4, True, 0o600, False, 0)


def _cursor_counter(name, index):
    """Cursor `index`'s device counter in the simulated allocation (csrc/core/slots.h:
    the counter page after the 16 generation words)."""
    mem = np.memmap(f"/dev/shm/torch_shmem-simdev.{name}", dtype=np.uint64, mode="r+",
                    offset=128 * 18, shape=(32,))
    return mem[index:index + 1]


def test_writer_waits_for_a_claimed_copy_to_finish(name):
    """A cursor that claimed the publication a slot holds but has not finished copying it
    (its device counter is behind) holds the writer of that slot, under every policy;
    the counter's advance releases it."""
    writer = make_ring(name, nslots=2, policy="overwrite")
    reader = O.open(name)
    cur = O.cursor(reader, "r")
    out = torch.empty(N, dtype=torch.int64)
    O.publish(writer, payload(1))
    O.publish(writer, payload(2))
    assert O.read_next(reader, cur, out)[0].item() == 1
    counter = _cursor_counter(name, cur)
    assert counter[0] == 1
    counter[0] = 0  # as if the copy of publication 1 were still queued on the reader's stream
    t = publish_in_thread(writer, [3])  # slot 1 % 2 holds publication 1
    t.join(0.5)
    assert t.is_alive(), "the writer rewrote a slot a reader was still copying"
    counter[0] = 1  # the copy completed
    t.join(10)
    assert not t.is_alive() and O.count(writer).item() == 3


def _claim_and_die(name, attached, ready):
    from torch_shmem import ops as O

    stream = O.open(name)
    cur = O.cursor(stream, "dies")
    attached.set()
    O.read_next(stream, cur, torch.empty(N, dtype=torch.int64), timeout=30)
    ready.set()
    time.sleep(120)


def test_a_reader_that_dies_mid_copy_is_released(name):
    ctx = mp.get_context("spawn")
    writer = make_ring(name, nslots=2, policy="overwrite")
    attached, ready = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_claim_and_die, args=(name, attached, ready), daemon=True)
    p.start()
    assert attached.wait(60)
    O.publish(writer, payload(1))
    assert ready.wait(60)
    O.publish(writer, payload(2))
    index = [c for c in torch_shmem.stat(name)["ring"]["cursors"] if c["name"] == "dies"]
    assert index and index[0]["consumed"] == 1
    counter = _cursor_counter(name, 0)
    counter[0] = 0  # its copy of publication 1 never completes...
    os.kill(p.pid, signal.SIGKILL)  # ...because its process dies
    p.join(30)
    t0 = time.monotonic()
    O.publish(writer, payload(3))  # waits one liveness slice at most, then releases it
    assert time.monotonic() - t0 < 5
    assert counter[0] >= 1
    assert [(c["name"], c["pid"]) for c in torch_shmem.stat(name)["ring"]["cursors"]] == [("dies", None)]


def test_handle_cursor_reads_a_gpu_ring(name):
    """SharedMemory.cursor()/read_next on a GPU handle (a device payload) read through the
    torch ops: tensors on the stream's device, exact counts, frame ids and missed counts."""
    from torch_shmem import _gpu

    make_ring(name, nslots=4, policy="overwrite")
    handle = _core.open(name, False)
    shm = torch_shmem.SharedMemory(handle, owner=False, payload=_gpu.DevicePayload(handle, O.open(name)))
    try:
        cur = shm.cursor("h")
        assert shm.ring == 4 and shm.policy == "overwrite"
        for c in range(1, 7):
            shm.write(payload(c), frame_id=2**64 - c)
        pub = cur.read_next(timeout=5)
        assert isinstance(pub.payload, torch.Tensor) and torch.equal(pub.payload, payload(3))
        assert (pub.count, pub.missed_publications, pub.frame_id) == (3, 2, 2**64 - 3)
        out = torch.empty(N, dtype=torch.int64)
        pub = cur.read_next(out=out)
        assert pub.payload is out and pub.count == 4 and torch.equal(out, payload(4))
        assert cur.consumed == 4 and cur.lag == 2
        assert [cur.read_next().count for _ in range(2)] == [5, 6]
        with pytest.raises(TimeoutError, match=name):
            cur.read_next(timeout=0.05)
    finally:
        shm.close()


def test_write_at_on_a_gpu_ring_publishes_the_next_count(name):
    """SharedMemory._write_at (the bridge's publication at a source count) on a GPU ring:
    one count at a time, whatever count it is given (CPU rings skip to it)."""
    from torch_shmem import _gpu

    make_ring(name, nslots=4, policy="overwrite")
    handle = _core.open(name, False)
    shm = torch_shmem.SharedMemory(handle, owner=False, payload=_gpu.DevicePayload(handle, O.open(name)))
    try:
        cur = shm.cursor("h")
        assert shm._write_at(payload(9), 9, 7, None) == 1
        assert shm._write_at(payload(20), 20, None, None) == 2
        assert shm.count == 2
        for count, c in ((1, 9), (2, 20)):
            pub = cur.read_next(timeout=5)
            assert (pub.count, pub.missed_publications, pub.frame_id) == (count, 0, 7)
            assert torch.equal(pub.payload, payload(c))
    finally:
        shm.close()


def test_read_next_on_a_parked_reader_queue_waits_for_the_park(name):
    """wait_device parks the reader queue (here: the calling thread) on a count not yet
    published: read_next first waits for that count on the host, within its timeout."""
    writer = make_ring(name, nslots=4, policy="block")
    reader = O.open(name)
    cur = O.cursor(reader, "r")
    out = torch.empty(N, dtype=torch.int64)
    O.publish(writer, payload(1))
    O.wait_device(reader, 3)
    with pytest.raises(RuntimeError, match="timed out"):
        O.read_next(reader, cur, out, timeout=0.2)
    t = publish_in_thread(writer, [2, 3])
    count = O.read_next(reader, cur, out, timeout=10)[0].item()
    t.join(10)
    assert count == 1 and torch.equal(out, payload(1))  # the park resolved; the cursor's next


def test_create_refuses_a_gpu_ring_it_cannot_make(name):
    """create(gpu_device=..., ring=N) checks what only a GPU ring limits, before any device
    work: N up to 16 (slots in the device allocation's counter page), no CPU mirror."""
    with pytest.raises(ValueError, match=f"stream {name!r}: a GPU ring holds 2 to 16 publications, got ring=17"):
        torch_shmem.create(name, shape=(4,), gpu_device="cuda:0", ring=17)
    with pytest.raises(ValueError, match=f"stream {name!r}: a GPU ring keeps no CPU mirror"):
        torch_shmem.create(name, shape=(4,), gpu_device="cuda:0", ring=4, cpu_mirror=True)
    assert name not in torch_shmem.list_streams()


def test_handle_cursor_read_next_async_on_a_gpu_ring(name):
    """Cursor.read_next_async on a GPU handle: the wait is the handle's (no event-loop
    blocking), the take goes through the device payload."""
    import asyncio

    from torch_shmem import _gpu

    writer = make_ring(name, nslots=4, policy="block")
    handle = _core.open(name, False)
    shm = torch_shmem.SharedMemory(handle, owner=False, payload=_gpu.DevicePayload(handle, O.open(name)))
    try:
        cur = shm.cursor("aio")

        async def main():
            task = asyncio.ensure_future(cur.read_next_async(timeout=10))
            await asyncio.sleep(0.1)
            assert not task.done()  # nothing published yet: the loop keeps running
            await asyncio.get_running_loop().run_in_executor(None, O.publish, writer, payload(1))
            return await task

        pub = asyncio.run(main())
        assert pub.count == 1 and isinstance(pub.payload, torch.Tensor)
        assert torch.equal(pub.payload, payload(1))
    finally:
        shm.close()
