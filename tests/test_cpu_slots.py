"""Slotted CPU streams: create(slots=N) (csrc/core/slots.h over the segment itself).

Publication c lives in slot c % N of the segment; readers copy the latest
published slot and check its generation after the copy, so a writer that
keeps publishing overtakes a reader only by lapping the whole ring.
"""

import multiprocessing as mp
import os
import time

import numpy as np
import pytest

import _workers
import torch_shmem
from torch_shmem import _core

pytestmark = pytest.mark.cpu

ctx = mp.get_context("spawn")


def _value(dtype, k):
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return bool(k % 2)
    if dt.kind == "c":
        return complex(k, -k)
    return k % 100


@pytest.mark.parametrize("slots", [2, 3, 16])
@pytest.mark.parametrize("dtype,shape", [
    ("float32", (3, 4)), ("uint8", (7,)), ("int64", ()), ("float64", (2, 3, 5)),
    ("bool", (9,)), ("complex64", (4, 2)), ("int16", (0, 3)), ("float16", (1000,)),
])
def test_round_trip(name, slots, dtype, shape):
    s = torch_shmem.create(name, shape=shape, dtype=dtype, slots=slots)
    r = torch_shmem.open(name)
    assert s.slots == r.slots == slots
    assert torch_shmem.stat(name)["slots"] == slots
    assert r.read().shape == tuple(shape) and r.count == 0 and not r.read().any()
    out = np.empty(shape, dtype)
    for k in range(1, 2 * slots + 3):  # around the ring twice
        value = np.full(shape, _value(dtype, k), dtype)
        s.write(value, frame_id=1000 + k)
        pub = r.read_publication()
        assert pub.count == k and pub.frame_id == 1000 + k and r.frame_id == 1000 + k
        np.testing.assert_array_equal(pub.payload, value)
        np.testing.assert_array_equal(r.read(out=out), value)
        assert r.last_read_count == k and r.missed_writes == 0
    assert r.read_after(k - 1).shape == tuple(shape)
    s.clear()
    assert r.count == k + 1 and not r.read().any()


def test_waits_and_missed_writes(name):
    s = torch_shmem.create(name, shape=(), dtype=np.int32, slots=3)
    r = torch_shmem.open(name)
    with pytest.raises(TimeoutError):
        r.read_new(timeout=0.05)
    for k in range(1, 6):
        s.write(np.int32(k))
    pub = r.read_after_publication(2)
    assert pub.count == 5 and pub.missed_publications == 4 and int(pub.payload) == 5
    p = ctx.Process(target=_workers.write_after, args=(name, 0.2, 7))
    p.start()
    try:
        assert int(r.read_new(timeout=30)) == 7
        assert r.count == 6
    finally:
        p.join(30)
    assert p.exitcode == 0


def test_live_views_are_the_latest_slot(name):
    s = torch_shmem.create(name, shape=(4,), dtype=np.int64, slots=2)
    r = torch_shmem.open(name)
    s.write(np.arange(4))
    with s.locked():
        live = s.read(safe=False)
        assert live.tolist() == [0, 1, 2, 3]
        live[0] = 42  # an in-place edit of the latest publication (not a new one)
    assert r.read().tolist() == [42, 1, 2, 3] and r.count == 1
    # an in-place publication starts from the latest payload, in the next slot
    with s.write_view(frame_id=9) as view:
        assert view.tolist() == [42, 1, 2, 3]
        view[1] = 7
    assert r.read_publication().payload.tolist() == [42, 7, 2, 3]
    assert r.count == 2 and r.frame_id == 9
    s.write(np.full(4, 5))
    with s.locked():
        assert s.read(safe=False).tolist() == [5] * 4
    # an aborted view leaves the stream inconsistent until the next write
    with pytest.raises(ZeroDivisionError):
        with s.write_view() as view:
            view[:] = -1
            1 / 0
    with pytest.raises(torch_shmem.InconsistentStreamError, match=name):
        r.read(timeout=1)
    s.write(np.full(4, 6))
    assert r.read().tolist() == [6] * 4 and r.count == 4


def test_readonly_handle_and_config(name):
    s = torch_shmem.create(name, shape=(3,), dtype=np.float32, slots=4)
    s.write(np.ones(3, np.float32))
    ro = torch_shmem.open(name, readonly=True)
    assert ro.slots == 4 and ro.read().tolist() == [1, 1, 1]
    with pytest.raises(PermissionError):
        ro.write(np.zeros(3, np.float32))
    assert "slots:        4" in ro.describe()
    config = s.to_config()
    assert config["slots"] == 4
    s.unlink()
    again = torch_shmem.SharedMemory.create_from_config(config)
    try:
        assert again.slots == 4 and again.shape == (3,)
    finally:
        again.unlink()


def test_single_slot_keeps_the_single_payload_layout(name):
    s = torch_shmem.create(name, shape=(1000,), dtype=np.uint8, slots=1)
    assert s.slots == 1 and s.to_config()["slots"] == 1  # explicit: the default is sized
    assert not s._h.info().flags & _core.FLAG_HOST_SLOTS
    assert os.path.getsize(f"/dev/shm/torch_shmem.{name}") == 4096 + 4096
    s.unlink()
    s = torch_shmem.create(name, shape=(1000,), dtype=np.uint8, slots=3)
    # header + counters page + 3 slots of 1024 B (512 B aligned), page rounded
    assert os.path.getsize(f"/dev/shm/torch_shmem.{name}") == 4096 + 4096 + 4096
    assert s._h.info().flags & _core.FLAG_HOST_SLOTS


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (-1, ValueError), (17, ValueError),
                                     (2.0, TypeError), (True, TypeError), ("2", TypeError),
                                     (1.0, TypeError)])
def test_bad_slot_counts(name, bad, exc):
    with pytest.raises(exc, match=name):
        torch_shmem.create(name, shape=(3,), slots=bad)
    assert not os.path.exists(f"/dev/shm/torch_shmem.{name}")


def test_default_slots_follow_the_payload_size(name, monkeypatch):
    """create() without slots=: AUTO_SLOTS for payloads up to AUTO_SLOTS_MAX_BYTES, one above;
    to_config() records the count, so a stream made again from it has the same layout."""
    from torch_shmem import _stream

    s = torch_shmem.create(name, shape=(1000,), dtype=np.uint8)
    assert s.slots == _stream.AUTO_SLOTS == 3 and s._h.info().flags & _core.FLAG_HOST_SLOTS
    assert torch_shmem.stat(name)["slots"] == 3
    s.unlink()
    monkeypatch.setattr(_stream, "AUTO_SLOTS_MAX_BYTES", 999)
    s = torch_shmem.create(name, shape=(1000,), dtype=np.uint8)
    assert s.slots == 1 and not s._h.info().flags & _core.FLAG_HOST_SLOTS
    config = s.to_config()
    s.unlink()
    monkeypatch.setattr(_stream, "AUTO_SLOTS_MAX_BYTES", 64 * 1024 * 1024)
    again = torch_shmem.SharedMemory.create_from_config(config)
    try:
        assert again.slots == 1
    finally:
        again.unlink()
    with torch_shmem.stream(name, shape=(4,)) as t:
        assert t.slots == 3
    # 3 copies would take more than half of what /dev/shm has free: one payload
    import types

    monkeypatch.setattr(_stream.os, "statvfs", lambda path: types.SimpleNamespace(f_bavail=1, f_frsize=5999))
    with torch_shmem.stream(name, shape=(1000,), dtype=np.uint8) as t:
        assert t.slots == 1
    with torch_shmem.stream(name, shape=(999,), dtype=np.uint8) as t:
        assert t.slots == 3


def test_live_view_pins_its_slot(name):
    """read(safe=False) hands out the latest slot; from then on writes (from any handle)
    rewrite that slot in place, so the view stays the live payload as on a single-payload
    stream. Counts stay exact and snapshot reads see every write."""
    s = torch_shmem.create(name, shape=(4,), dtype=np.int64)  # the default: 3 slots
    w, r = torch_shmem.open(name), torch_shmem.open(name)
    s.write(np.arange(4))
    s.write(np.arange(4) + 1)
    assert s._h.state().live_slot == 0 and torch_shmem.stat(name)["pinned_slot"] is None
    with s.locked():
        live = s.read(safe=False)
    pinned = s._h.state().live_slot
    assert pinned != 0 and torch_shmem.stat(name)["pinned_slot"] == pinned - 1
    for v in range(3, 9):
        w.write(np.full(4, v), frame_id=v)
        assert live.tolist() == [v] * 4
        assert r.read().tolist() == [v] * 4 and r.count == v and r.frame_id == v
    with w.write_view() as view:  # in place too: the view starts from the live payload
        assert view.tolist() == [8] * 4
        view[0] = 100
    assert live.tolist() == [100, 8, 8, 8] and r.count == 9
    w.clear()
    assert live.tolist() == [0] * 4 and r.count == 10
    s.write(np.full(4, 7.0), casting="unsafe")  # a casting write goes to the same slot
    assert live.tolist() == [7] * 4 and s._h.state().live_slot == pinned
    assert not torch_shmem.stat(name)["slots_rotating"]


def test_writes_rotate_once_a_read_overlaps_a_write(name):
    """Until a snapshot overlaps a write, a slotted stream rewrites its latest slot in place
    (the cache footprint of one payload: a write-then-read loop touches one slot); the first
    overlap (a reader in another process against a writer publishing back to back) switches
    it to rotating through the slots for good."""
    n = 256 * 1024
    s = torch_shmem.create(name, shape=(n,), dtype=np.uint64)
    assert s.slots == 3
    out = np.empty(n, np.uint64)
    for k in range(1, 20):
        s.write(np.full(n, k, np.uint64), frame_id=k)  # as count_writer stamps them
        assert s.read(out=out)[0] == k
    state = s._h.state()
    assert state.slot_contention == 0 and not torch_shmem.stat(name)["slots_rotating"]
    ready, done = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    procs = [ctx.Process(target=_workers.count_reader, args=(name, "read", ready, done, results)),
             ctx.Process(target=_workers.count_writer, args=(name, n, 1.0, ready, done, results))]
    got = dict(_workers.run_together(procs, ready, results, 2))
    reads, bad, regress, last = got["reader"]
    assert reads > 0 and bad == 0 and regress == 0 and last == s.count == got["writer"]
    assert s._h.state().slot_contention == 1 and torch_shmem.stat(name)["slots_rotating"]


def test_rings_are_never_pinned(name):
    s = torch_shmem.create(name, shape=(2,), dtype=np.int64, ring=4)
    c = s.cursor("r")
    for v in range(1, 4):
        s.write(np.full(2, v))
    with s.locked():
        assert s.read(safe=False).tolist() == [3, 3]
    assert s._h.state().live_slot == 0 and torch_shmem.stat(name)["pinned_slot"] is None
    s.write(np.full(2, 4))
    assert [c.read_next(timeout=1).count for _ in range(4)] == [1, 2, 3, 4]


@pytest.mark.parametrize("mode", ["read", "read_new", "read_after"])
@pytest.mark.parametrize("n,slots,pin", [(1, 2, False), (64 * 1024, 2, False), (512 * 1024, 3, False),
                                         (512 * 1024, 3, True)],
                         ids=["8B-2slots", "512KiB-2slots", "4MiB-3slots", "4MiB-3slots-pinned"])
def test_no_torn_reads_under_a_writer(name, n, slots, pin, mode):
    """Payloads filled with their count: every read is uniform, equal to its count and
    frame_id, and counts never go back; the final count is exact. `pinned`: a live view
    pinned the slot first, so the writer (another process) rewrites it in place."""
    s = torch_shmem.create(name, shape=(n,), dtype=np.uint64, slots=slots)
    s.write(np.full(n, 1, np.uint64), frame_id=1)
    if pin:
        with s.locked():
            s.read(safe=False)
        assert s._h.state().live_slot != 0
    ready, done = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    procs = [ctx.Process(target=_workers.count_reader, args=(name, mode, ready, done, results))
             for _ in range(2)]
    procs.append(ctx.Process(target=_workers.count_writer, args=(name, n, 1.0, ready, done, results)))
    got = _workers.run_together(procs, ready, results, 3)
    written = [v for kind, v in got if kind == "writer"][0]
    assert s.count == written
    for reads, bad, regress, last in (v for kind, v in got if kind == "reader"):
        print(f"n={n} slots={slots} {mode}: written={written} reads={reads}")
        assert reads > 0 and bad == 0 and regress == 0
        assert last <= written
        if mode == "read":
            assert last == written  # the read after the writer finished sees its last write


def test_writer_killed_mid_write_loses_nothing(name, seed):
    """SIGKILL a writer publishing back to back: the stream stays readable with an intact
    frame (or, if it died inside the short publication window, reports an inconsistent
    stream), the count is exactly that of the completed writes, the next write repairs."""
    import random

    rng = random.Random(seed)
    n = 4 * 1024 * 1024  # 32 MiB: the copy into a slot is long enough to be hit
    s = torch_shmem.create(name, shape=(n,), dtype=np.uint64, slots=2)
    s.write(_workers.make_frame(0, n))
    _kill_writers(s, name, n, rng)


def test_writer_killed_mid_write_of_a_pinned_slot(name, seed):
    """As above, with the slot pinned by a live view (writes in place): a kill inside the
    copy is reported (InconsistentStreamError), never read torn; the next write repairs."""
    import random

    n = 4 * 1024 * 1024
    s = torch_shmem.create(name, shape=(n,), dtype=np.uint64, slots=3)
    s.write(_workers.make_frame(0, n))
    with s.locked():
        s.read(safe=False)
    _kill_writers(s, name, n, random.Random(seed))
    assert s._h.state().live_slot != 0


def _kill_writers(s, name, n, rng):
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
            outcomes["inconsistent"] += 1  # killed inside the (short) publication window
        s.write(_workers.make_frame(10**9 + i, n), timeout=5)
        assert s.count == before + 1
        assert _workers.frame_seq(s.read()) == 10**9 + i
    print(outcomes)


def test_writer_killed_in_a_write_view(name):
    """A writer killed with an in-place write open: readers get InconsistentStreamError
    (never the partial edit), the next write repairs, the count is exact."""
    n = 1024
    s = torch_shmem.create(name, shape=(n,), dtype=np.uint64, slots=3)
    s.write(_workers.make_frame(1, n))
    ready = ctx.Event()
    p = ctx.Process(target=_workers.die_mid_write, args=(name, ready))
    p.start()
    assert ready.wait(60)
    p.kill()
    p.join(30)
    with pytest.raises(torch_shmem.InconsistentStreamError, match=name):
        s.read(timeout=5)
    assert s.count == 1
    s.write(_workers.make_frame(2, n), timeout=5)
    assert s.count == 2 and _workers.frame_seq(s.read()) == 2


def test_torch_ops_on_a_slotted_stream(name):
    """The op library reaches the same slots: publishes and reads interleave with the NumPy API."""
    torch = pytest.importorskip("torch")
    import torch_shmem.ops as O

    s = torch_shmem.create(name, shape=(3, 5), dtype=np.float32, slots=3)
    st = O.open(name)
    for k in range(1, 6):
        O.publish(st, torch.full((3, 5), float(k)), frame_id=k)
        assert s.read_publication().payload.tolist() == [[k] * 5] * 3 and s.frame_id == k
        s.write(np.full((3, 5), 10.0 + k, np.float32))
        assert O.read(st).eq(10 + k).all()
    assert s.count == 10


def test_large_casting_write_goes_to_the_next_slot(name):
    """A large write of another dtype is cast straight into the payload (in place):
    on a slotted stream that is the next slot, published as one write."""
    s = torch_shmem.create(name, shape=(200, 200), dtype=np.float32, slots=2)
    r = torch_shmem.open(name)
    for k in range(1, 4):
        s.write(np.full((200, 200), k, np.float64))
        assert r.count == k and (r.read() == k).all()


def test_readonly_handle_refuses_in_place_writes(name):
    """The slot area of a read-only handle is mapped read-only: the private in-place write
    calls raise PermissionError instead of touching it."""
    s = torch_shmem.create(name, shape=(8,), dtype=np.uint8, slots=2)
    s.write(np.arange(8, dtype=np.uint8))
    ro = torch_shmem.open(name, readonly=True)
    ro._h.acquire(5.0)  # the public acquire() refuses read-only handles earlier
    try:
        with pytest.raises(PermissionError, match=name):
            ro._h.begin_write()
        with pytest.raises(PermissionError, match=name):
            ro._h.commit_write(None)
    finally:
        ro._h.release()
    assert ro.read().tolist() == list(range(8)) and ro.count == 1


def test_temporary_slotted_stream(name):
    with torch_shmem.stream(name, shape=(2,), dtype=np.int8, slots=2) as shm:
        shm.write([1, 2])
        assert shm.slots == 2 and torch_shmem.open(name).read().tolist() == [1, 2]
    assert not os.path.exists(f"/dev/shm/torch_shmem.{name}")


def test_cli_stat_shows_the_slot_count(name, capsys):
    from torch_shmem import cli

    torch_shmem.create(name, shape=(4,), slots=3)
    assert cli.main(["stat", name]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["slots:", "3"] in lines


def test_first_rotating_write_never_overwrites_the_latest_slot(name):
    """Writes in place leave the latest publication in slot 0; once writes rotate,
    publication 3 (slot 3 % 3 = 0 by the plain rule) must go to another slot: a writer
    killed in that copy (sequence even) would otherwise destroy what readers are shown."""
    import mmap
    import struct

    s = torch_shmem.create(name, shape=(64,), dtype=np.int64)
    s.write(np.full(64, 1))
    s.write(np.full(64, 2))
    with open(f"/dev/shm/torch_shmem.{name}", "r+b") as f:
        m = mmap.mmap(f.fileno(), 4096)
        try:
            assert struct.unpack_from("<I", m, 1056)[0] == 0  # latest_slot: in place, slot 0
            assert struct.unpack_from("<I", m, 1064)[0] == 0  # slot_contention
            struct.pack_into("<I", m, 1064, 1)  # as a reader that overlapped a write does
            s.write(np.full(64, 3))
            assert struct.unpack_from("<I", m, 1056)[0] == 1
            s.write(np.full(64, 4))
            assert struct.unpack_from("<I", m, 1056)[0] == 2  # then 4 % 3 = 1 is latest: next
        finally:
            m.close()
    assert torch_shmem.stat(name)["slots_rotating"] and s.read().tolist() == [4] * 64


def test_writer_avoids_a_slot_a_reader_announced(name):
    """Reader hints (slots.h): a rotating writer never rewrites a slot whose reader
    announced a copy in progress (Header::slot_readers), alternating between the other
    two; an announcement older than the lease (a reader that died mid-copy) is ignored;
    reads clear their own announcement."""
    import mmap
    import struct

    readers_at = 2688  # Header::slot_readers
    s = torch_shmem.create(name, shape=(256, 256), dtype=np.int64, slots=3)  # 512 KiB
    with open(f"/dev/shm/torch_shmem.{name}", "r+b") as f:
        m = mmap.mmap(f.fileno(), 4096)
        try:
            struct.pack_into("<I", m, 1064, 1)  # rotate, as after a read overlapped a write
            for k in range(1, 4):
                s.write(np.full((256, 256), k))
            assert s.read()[0, 0] == 3
            assert struct.unpack_from("<3q", m, readers_at) == (0, 0, 0)  # cleared after the copy
            busy = struct.unpack_from("<I", m, 1056)[0]  # the latest slot: a reader copies it
            struct.pack_into("<q", m, readers_at + 8 * busy, time.monotonic_ns())
            used = set()
            for k in range(4, 14):
                s.write(np.full((256, 256), k))
                used.add(struct.unpack_from("<I", m, 1056)[0])
            assert busy not in used and len(used) == 2
            assert s.read()[0, 0] == 13
            # a stale announcement (older than the 250 ms lease) holds nothing
            struct.pack_into("<q", m, readers_at + 8 * busy, time.monotonic_ns() - 2_000_000_000)
            used = set()
            for k in range(14, 20):
                s.write(np.full((256, 256), k))
                used.add(struct.unpack_from("<I", m, 1056)[0])
            assert busy in used
            assert s.read()[0, 0] == 19
        finally:
            m.close()
    s.unlink()
