"""The GPU streams' slot protocol (csrc/core/slots.h), exercised on the CPU.

Streams flagged FLAG_SIM_DEVICE keep their "device" allocation in host shared
memory (/dev/shm/torch_shmem-simdev.<name>) and run exactly the protocol GPU
streams use: per-slot generations, publication c in slot c % N, host
publication only after the slot is complete, readers validating the slot's
generation after their copy.
"""

import multiprocessing as mp
import os
import struct
import time

import numpy as np
import pytest

import _workers
import torch_shmem
from torch_shmem import _core
from torch_shmem._dtypes import dtype_code
from torch_shmem._stream import SharedMemory

pytestmark = pytest.mark.cpu

ctx = mp.get_context("spawn")
SIM = _core.FLAG_GPU | _core.FLAG_SIM_DEVICE


def create_sim(name, shape, dtype=np.uint64, nslots=3):
    handle = _core.create(name, dtype_code(np.dtype(dtype)), tuple(shape), 0o600, SIM, nslots)
    return SharedMemory(handle, owner=True)


def sim_path(name):
    return "/dev/shm/torch_shmem-simdev." + name


def test_publications_rotate_through_slots(name):
    s = create_sim(name, (5,), nslots=3)
    assert os.path.exists(sim_path(name))
    assert s.read().tolist() == [0] * 5 and s.count == 0  # slot 0, generation 0
    r = torch_shmem.open(name)
    for c in range(1, 8):
        s.write(np.full(5, c, np.uint64), frame_id=100 + c)
        assert s._h.state()[0] == 2 * c  # host seq
        pub = r.read_publication()
        assert pub.count == c and pub.frame_id == 100 + c and pub.payload.tolist() == [c] * 5
    # publication c lives in slot c % 3: check the simulated device memory
    stride = 512
    with open(sim_path(name), "rb") as f:
        mem = f.read()
    for c in (5, 6, 7):
        k = c % 3
        (gen,) = struct.unpack_from("<Q", mem, 128 * (1 + k))
        assert gen == 2 * c
        assert np.frombuffer(mem, np.uint64, 5, 4096 + stride * k).tolist() == [c] * 5
    (device_count,) = struct.unpack_from("<Q", mem, 0)
    assert device_count == 7
    s.clear()
    assert r.read().tolist() == [0] * 5 and r.count == 8


def test_validation_rejects_a_slot_whose_generation_moved(name):
    """The reader's generation check is live: a rewritten slot is never returned."""
    s = create_sim(name, (4,), nslots=2)
    s.write(np.arange(4, dtype=np.uint64))  # publication 1 -> slot 1, gen 2
    with open(sim_path(name), "r+b") as f:  # a writer that lapped the ring began slot 1
        f.seek(128 * 2)
        f.write(struct.pack("<Q", 5))
    with pytest.raises(torch_shmem.InconsistentStreamError, match=name):
        s.read(timeout=1)
    s.write(np.full(4, 9, np.uint64))  # publication 2 -> slot 0: readable again
    assert s.read().tolist() == [9] * 4


def test_cpu_only_paths_are_refused(name):
    s = create_sim(name, (4,))
    with pytest.raises(RuntimeError, match="GPU stream"):
        np.frombuffer(s._h, np.uint64)  # no live CPU view of device slots
    with s.locked():
        with pytest.raises(RuntimeError, match="GPU stream"):
            s._h.begin_write()


@pytest.mark.parametrize("n,nslots", [(1, 2), (128 * 1024, 3), (1024 * 1024, 2)],
                         ids=["8B-2slots", "1MiB-3slots", "8MiB-2slots"])
def test_no_torn_reads_across_processes(name, n, nslots):
    s = create_sim(name, (n,), nslots=nslots)
    s.write(_workers.make_frame(0, n), frame_id=0)
    ready, done = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    procs = [ctx.Process(target=_workers.slot_reader, args=(name, ready, done, results))
             for _ in range(2)]
    procs.append(ctx.Process(target=_workers.slot_writer, args=(name, n, 1.0, ready, done, results)))
    got = _workers.run_together(procs, ready, results, 3)
    written = [v for kind, v in got if kind == "writer"][0]
    for reads, torn, regress, mismatched_id, last in (v for kind, v in got if kind == "reader"):
        print(f"n={n} slots={nslots} written={written} reads={reads} torn={torn}")
        assert torn == 0 and regress == 0 and mismatched_id == 0
        assert last == written and reads > 0
    assert s.count == written + 1


def test_writer_killed_mid_copy_leaves_the_latest_publication_intact(name, seed):
    import random

    rng = random.Random(seed)
    n = 4 * 1024 * 1024  # 32 MiB: the copy is long enough to be hit
    s = create_sim(name, (n,), nslots=3)
    s.write(_workers.make_frame(0, n))  # a valid frame even if the first writer dies early
    out = np.empty(n, np.uint64)
    outcomes = {"intact": 0, "inconsistent": 0}
    for i in range(5):
        ready = ctx.Event()
        p = ctx.Process(target=_workers.write_loop, args=(name, n, ready))
        p.start()
        assert ready.wait(60)
        time.sleep(rng.uniform(0.02, 0.2))
        p.kill()
        p.join(30)
        before = s.count
        try:
            k = _workers.frame_seq(s.read(out=out, timeout=5))
            assert k >= 0, "torn read"
            outcomes["intact"] += 1
        except torch_shmem.InconsistentStreamError:
            outcomes["inconsistent"] += 1  # killed inside the (short) host window
        s.write(_workers.make_frame(10**9 + i, n), timeout=5)
        assert s.count == before + 1
        assert _workers.frame_seq(s.read()) == 10**9 + i
    print(outcomes)


def test_unlink_removes_the_simulated_device_memory(name):
    s = create_sim(name, (3,))
    s.unlink()
    assert not os.path.exists(sim_path(name))
    assert not os.path.exists("/dev/shm/torch_shmem." + name)


def test_device_wait_orders_a_consumer_after_the_slot_is_complete(name):
    """The device counter is stored after its slot: a consumer that waits for
    count >= c (the host form of wait_device) and then copies slot c % N sees
    publication c intact whenever the slot's generation still reads 2c after
    the copy (otherwise the writer lapped the ring, which the check detects)."""
    n, nslots = 64 * 1024, 3  # 512 KiB slots
    s = create_sim(name, (n,), nslots=nslots)
    s.write(_workers.make_frame(0, n), frame_id=0)
    ready, done = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    w = ctx.Process(target=_workers.slot_writer, args=(name, n, 1.0, ready, done, results))
    w.start()
    stride = n * 8  # payload rounded up to 512 B: already a multiple
    mem = np.memmap(sim_path(name), dtype=np.uint8, mode="r")
    gens = mem[:4096].view(np.uint64)
    checked = lapped = 0
    try:
        assert not s._h.sim_wait_count(2, 0.01)  # nothing past publication 1 yet
        ready.set()
        c = 1
        deadline = time.monotonic() + 60
        while True:
            c += 1
            reached = False
            while not reached:  # in slices: the writer may have stopped before c
                reached = s._h.sim_wait_count(c, 0.05)
                if not reached and done.is_set() and s.count < c:
                    break
                assert time.monotonic() < deadline, f"device count never reached {c}"
            if not reached:
                break  # the writer is done and publication c never came
            k = c % nslots
            # count >= c is stored after gen[k] = 2c: the slot is complete (or
            # already lapped, which only raises gen), never still mid-copy
            assert gens[16 * (1 + k)] >= 2 * c, f"device count {c} visible before its slot"
            frame = np.array(mem[4096 + stride * k: 4096 + stride * (k + 1)].view(np.uint64))
            if gens[16 * (1 + k)] != 2 * c:  # gen[k] lives at 128 * (1 + k) bytes
                lapped += 1
                c = max(c, s.count - 1)  # catch up with the writer
                continue
            assert _workers.frame_seq(frame) == c - 1, f"slot {k} did not hold publication {c}"
            checked += 1
    finally:
        w.join(60)
        del gens, mem
    assert w.exitcode == 0
    written = results.get(timeout=10)[1]
    print(f"written={written} checked={checked} lapped={lapped}")
    assert checked > 0
    assert s._h.sim_wait_count(written + 1, 0)  # publication 1 was the frame-0 write


def _mirror_payload(name, n, dtype):
    """The CPU payload of a mirrored slotted stream, read straight from its segment."""
    mem = np.memmap("/dev/shm/torch_shmem." + name, dtype=np.uint8, mode="r")
    return np.frombuffer(mem[4096:4096 + n * np.dtype(dtype).itemsize].tobytes(), dtype=dtype)


def test_ops_on_simulated_device_mirror_through_the_op(name, monkeypatch):
    """torch.ops.shmem on a slotted stream with simulated device memory: publish/read go
    through the slot protocol, and the mirror copy inside the host window is dispatched from
    C++ to shmem::mirror_copy's Python implementation (the path of mirrored GPU streams).
    When that implementation raises, the error reaches the caller, the lock is released and
    the stream reads as torn until the next completed write."""
    torch = pytest.importorskip("torch")
    import threading

    import torch_shmem.kernels as K
    import torch_shmem.ops as O

    n = 1000
    handle = _core.create(name, dtype_code(np.dtype(np.float32)), (n,), 0o600,
                          SIM | _core.FLAG_CPU_MIRROR, 3)
    s = SharedMemory(handle, owner=True)
    st = O.open(name)
    x = torch.arange(n, dtype=torch.float32)
    calls = O.mirror_copy_calls
    O.publish(st, x)
    assert O.mirror_copy_calls == calls + 1
    assert torch.equal(O.read(st), x)
    np.testing.assert_array_equal(_mirror_payload(name, n, np.float32), x.numpy())
    # publication 1 is in slot 1 of the simulated device memory
    assert torch.equal(torch.ops.shmem.live_view(st.token, 1), x)

    def boom(src, dst):
        raise RuntimeError("mirror copy failed on purpose")

    monkeypatch.setattr(K, "mirror_copy", boom)
    with pytest.raises(RuntimeError, match="on purpose"):
        O.publish(st, x * 2)
    got = []

    def take_and_release():
        s.acquire(timeout=5)  # TimeoutError if the failed write had kept the lock
        got.append(True)
        s.release()

    other = threading.Thread(target=take_and_release)
    other.start()
    other.join(10)
    assert got == [True]  # another thread took the lock: the failed write released it
    with pytest.raises(RuntimeError, match="incomplete write"):
        O.read(st)
    monkeypatch.undo()
    # Publication 2 was complete in its slot, and the device count (what device
    # waiters follow) reached 2 before the mirror failed: the repairing write skips
    # to count 3, so slot 2 keeps publication 2 for any waiter released for it.
    O.publish(st, x * 3)
    assert int(O.count(st)) == 3 and s.count == 3
    assert torch.equal(O.read(st), x * 3)
    assert torch.equal(torch.ops.shmem.live_view(st.token, 2), x * 2)
    assert torch.equal(torch.ops.shmem.live_view(st.token, 3), x * 3)
    np.testing.assert_array_equal(_mirror_payload(name, n, np.float32), (x * 3).numpy())
    O.close(st)
    s.close()


def _device_count_word(name):
    return np.memmap(sim_path(name), dtype=np.uint64, mode="r+", shape=(1,))


def test_a_dead_writers_device_count_is_never_reused(name):
    """A writer that dies after its device count was stored but before its host
    publication (the host still shows the previous count) leaves device waiters
    released for a count the host never published: the next writer, taking the lock
    over from the dead one, publishes the count after it instead of rewriting that
    count's slot with other bytes."""
    s = create_sim(name, (16,), nslots=3)
    s.write(np.full(16, 1, np.uint64))
    ready = ctx.Event()
    p = ctx.Process(target=_workers.hold_lock_forever, args=(name, ready))
    p.start()
    try:
        assert ready.wait(60)
        word = _device_count_word(name)
        word[0] = 2  # the dead writer's device-side store of count 2
        word.flush()
        del word
    finally:
        p.kill()
        p.join(30)
    assert s.count == 1 and s.read().tolist() == [1] * 16  # the host never published 2
    s.write(np.full(16, 3, np.uint64))
    assert s.count == 3 and s.read().tolist() == [3] * 16
    assert int(_device_count_word(name)[0]) == 3


def test_ops_read_on_a_parked_reader_waits_on_the_host(name):
    """wait_device on simulated device memory parks the calling thread's reader queue
    (as on a GPU it parks the current CUDA stream): the next read waits on the host,
    without the stream lock, until the awaited publication exists, then returns it or
    a newer one; a timeout is honoured; a count already reached does not wait."""
    torch = pytest.importorskip("torch")
    import torch_shmem.ops as O

    s = create_sim(name, (64,), nslots=2)
    s.write(np.full(64, 1, np.uint64))
    st = O.open(name)
    O.wait_device(st, 1)  # already published: nothing to wait for
    t0 = time.monotonic()
    assert O.read(st).tolist() == [1] * 64
    assert time.monotonic() - t0 < 0.5
    O.wait_device(st, 2)
    p = ctx.Process(target=_workers.write_after, args=(name, 0.5, [2] * 64))
    p.start()
    out = torch.empty(64, dtype=torch.uint64)
    t0 = time.monotonic()
    O.read_into(st, out)  # the writer process needs the lock meanwhile: not held here
    waited = time.monotonic() - t0
    p.join(60)
    assert p.exitcode == 0
    assert out.tolist() == [2] * 64 and waited >= 0.3
    O.wait_device(st, 5)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="timed out"):
        O.wait_read_into(st, out, timeout=0.3)
    assert 0.25 <= time.monotonic() - t0 < 5
    s.write(np.full(64, 3, np.uint64))
    s.write(np.full(64, 4, np.uint64))
    s.write(np.full(64, 5, np.uint64))  # count 5: the park resolves
    assert O.read(st).tolist() == [5] * 64
    O.close(st)
    s.close()


def test_compiled_read_stays_after_wait_device(name):
    """Under torch.compile, wait_device is a graph break (eager only), so a compiled read
    written after it runs after it: it returns the awaited publication, which a writer
    process makes only after the compiled function started."""
    torch = pytest.importorskip("torch")
    import torch_shmem.ops as O

    s = create_sim(name, (8,), nslots=2)
    s.write(np.full(8, 1, np.uint64))
    st = O.open(name)

    def step(out, n):
        y = out.clone()
        O.wait_device(st, n)
        O.read_into(st, out)
        return y

    compiled = torch.compile(step)
    out = torch.zeros(8, dtype=torch.uint64)
    p = ctx.Process(target=_workers.write_after, args=(name, 0.5, [2] * 8))
    p.start()
    explanation = torch._dynamo.explain(step)(out, 2)
    p.join(60)
    assert p.exitcode == 0
    assert explanation.graph_break_count >= 1
    assert out.tolist() == [2] * 8
    p = ctx.Process(target=_workers.write_after, args=(name, 0.5, [3] * 8))
    p.start()
    O.wait_device(st, 3)  # warm the parked path in eager mode too
    O.read_into(st, out)
    p.join(60)
    assert out.tolist() == [3] * 8
    p = ctx.Process(target=_workers.write_after, args=(name, 0.5, [4] * 8))
    p.start()
    st_count_before = s.count
    compiled(out, 4)
    p.join(60)
    assert st_count_before == 3 and out.tolist() == [4] * 8
    O.close(st)
    s.close()


def test_two_writer_processes_alternating_on_a_slotted_stream(name):
    """Two writer processes publish checksummed frames to one slotted stream at the
    same time while this process reads it: every read is one intact frame, counts are
    exact (each completed write adds one), and each writer's frames arrive."""
    n = 64 * 1024  # 512 KiB frames
    s = create_sim(name, (n,), nslots=2)
    s.write(_workers.make_frame(0, n))  # a valid frame before the writers start
    ready, done = ctx.Event(), ctx.Event()
    q = ctx.Queue()
    writers = [ctx.Process(target=_workers.slot_writer, args=(name, n, 1.5, ready, done, q))
               for _ in range(2)]
    for w in writers:
        w.start()
    ready.set()
    tally = _workers.FrameTally()
    out = np.empty(n, np.uint64)
    deadline = time.monotonic() + 60
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        s.read(out=out)
        k = _workers.frame_seq(out)
        tally.reads += 1
        tally.torn += k < 0
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    written = [q.get(timeout=10)[1] for _ in writers]
    assert tally.torn == 0, f"{tally.torn}/{tally.reads} torn reads"
    assert tally.reads > 0 and min(written) > 0
    assert s.count == 1 + sum(written)


def test_ops_reads_of_a_sim_stream_under_a_fast_writer(name):
    """The torch ops' read paths of GPU streams (snapshot through the slot protocol, lock
    fallback), on simulated device memory: a writer process publishes checksummed frames
    back to back; read_into and wait_read_into in this process never return a torn or
    older frame."""
    torch = pytest.importorskip("torch")
    import torch_shmem.ops as O

    n = 128 * 1024  # 1 MiB
    s = create_sim(name, (n,), nslots=2)
    s.write(_workers.make_frame(0, n), frame_id=0)
    st = O.open(name)
    out = torch.empty(n, dtype=torch.uint64)
    ready, done = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    w = ctx.Process(target=_workers.slot_writer, args=(name, n, 1.0, ready, done, results))
    w.start()
    ready.set()
    t = _workers.FrameTally()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        finished = done.is_set()
        if t.reads % 2 or finished:
            O.read_into(st, out)
        else:
            try:
                O.wait_read_into(st, out, timeout=10)  # the writer may still be starting
            except RuntimeError:
                assert done.is_set(), "no new publication for 10 s while the writer runs"
                O.read_into(st, out)
        t.add(out.numpy())
        if finished:
            break
    w.join(60)
    assert w.exitcode == 0
    written = results.get(timeout=10)[1]
    print(f"reads={t.reads} torn={t.torn} written={written}")
    assert t.torn == 0 and t.regress == 0 and t.reads > 10
    assert t.last == written
    O.close(st)
    s.close()


def test_ops_on_a_sim_stream_compile_and_opcheck(name):
    """publish/read of a slotted stream inside torch.compile(fullgraph=True), and opcheck
    of the data ops on it (simulated device memory, CPU tensors)."""
    torch = pytest.importorskip("torch")
    import torch_shmem.ops as O

    s = create_sim(name, (16,), dtype=np.float32, nslots=3)
    st = O.open(name)

    @torch.compile(fullgraph=True)
    def step(x):
        O.publish(st, x * 2)
        return O.read(st) + 1

    x = torch.randn(16)
    torch.testing.assert_close(step(x), x * 2 + 1)
    assert s.count == 1
    torch.library.opcheck(torch.ops.shmem.publish.default, (st.token, x))
    torch.library.opcheck(torch.ops.shmem.read_into.default, (st.token, torch.empty(16)))
    torch.library.opcheck(torch.ops.shmem.read.default, (st.token, [16], torch.float32, "cpu"))
    O.close(st)
    s.close()


def _raw_importers(name):
    """Header::importers (64 int32 at offset 1408), read from the segment file."""
    with open("/dev/shm/torch_shmem." + name, "rb") as f:
        f.seek(1408)
        return [v for v in struct.unpack("64i", f.read(256)) if v]


def test_importer_table_tracks_processes_mapping_the_device_memory(name):
    """Every process other than the creator that maps a slotted stream's device memory has
    an entry in the header's importer table while it maps it (the creator of a GPU stream
    frees the allocation only once none is alive): a handle's close removes it, a killed
    process's entry is ignored and cleared by the next writable look."""
    s = create_sim(name, (4,))
    assert _raw_importers(name) == [] and s._h.importers() == ()
    h2 = torch_shmem.open(name)  # another handle of this process maps the memory too
    assert s._h.importers() == (os.getpid(),)
    h2.close()
    assert _raw_importers(name) == []
    ready = ctx.Event()
    p = ctx.Process(target=_workers.hold_open, args=(name, ready))
    p.start()
    assert ready.wait(60)
    assert s._h.importers() == (p.pid,)
    # (stat() maps the simulated memory itself, so it lists this process too)
    assert p.pid in torch_shmem.stat(name)["gpu_importers"]
    p.kill()
    p.join(30)
    assert _raw_importers(name) == [p.pid]  # died without unmapping
    assert p.pid not in torch_shmem.stat(name)["gpu_importers"]  # not alive: ignored
    assert s._h.importers() == ()  # and cleared through a writable handle
    assert _raw_importers(name) == []
    q = ctx.Process(target=_workers.slot_reader_once, args=(name,))
    q.start()
    q.join(60)
    assert q.exitcode == 0
    assert _raw_importers(name) == []  # a clean close removed its entry
    s.close()


def test_importer_table_full_of_dead_entries_is_swept(name):
    """Importers that crashed leave their entries; when the table is full, the next attach
    clears the dead ones instead of failing. A table full of live processes refuses the
    attach with an error that says so."""
    import subprocess

    s = create_sim(name, (4,))
    dead = []
    for _ in range(4):
        p = subprocess.Popen(["true"])
        p.wait()
        dead.append(p.pid)
    path = "/dev/shm/torch_shmem." + name
    with open(path, "r+b") as f:
        f.seek(1408)
        f.write(struct.pack("64i", *(dead * 16)))
    h = torch_shmem.open(name)  # sweeps the dead entries, then registers
    assert _raw_importers(name) == [os.getpid()]
    h.close()
    with open(path, "r+b") as f:  # 64 live entries (this process)
        f.seek(1408)
        f.write(struct.pack("64i", *([os.getpid()] * 64)))
    with pytest.raises(RuntimeError, match="64 other processes"):
        torch_shmem.open(name)
    with open(path, "r+b") as f:
        f.seek(1408)
        f.write(bytes(256))
    s.close()
