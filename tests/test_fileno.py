"""Readiness descriptors: SharedMemory.fileno() (csrc/core/notify.h).

The descriptor is readable exactly while a publication newer than the handle's last
read exists; every read re-arms it. Checked with select() (timeout 0 for "not
readable", a bounded timeout for "becomes readable"), from writers in this process
and in spawned processes, over many streams in one selector, with asyncio's
add_reader, across unlink, close, and the death of a process holding descriptors.
"""

import asyncio
import multiprocessing as mp
import os
import select
import selectors
import signal
import time

import numpy as np
import pytest

import _workers
import torch_shmem
from torch_shmem import _admin

pytestmark = pytest.mark.cpu

ctx = mp.get_context("spawn")
SHM = "/dev/shm"


def readable(fd, timeout=0.0):
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


def notify_files(pid):
    prefix = f"torch_shmem-notify.{pid}."
    return sorted(f for f in os.listdir(SHM) if f.startswith(prefix))


def value(k):
    return np.full((4,), k, dtype=np.int64)


def test_readable_only_while_something_newer_exists(name):
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64)
    r = torch_shmem.open(name)
    fd = r.fileno()
    assert isinstance(fd, int) and fd >= 0
    assert r.fileno() == fd  # one descriptor per handle
    assert not readable(fd)
    w.write(value(1))
    assert readable(fd, 5.0)
    assert readable(fd)  # level-triggered: stays readable until a read
    assert r.read()[0] == 1
    assert not readable(fd)
    w.write(value(2))
    w.write(value(3))
    assert readable(fd, 5.0)
    pub = r.read_publication()
    assert (pub.count, int(pub.payload[0]), pub.missed_publications) == (3, 3, 1)
    assert not readable(fd)
    w.close()
    r.close()


def test_first_request_sees_writes_since_the_open(name):
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64)
    r = torch_shmem.open(name)
    w.write(value(7))  # after the open, before fileno(): newer than last_read_count
    assert readable(r.fileno(), 5.0)
    r.read()
    assert not readable(r.fileno())
    r2 = torch_shmem.open(name)  # opened after the write: nothing newer for it
    assert not readable(r2.fileno())
    for h in (w, r, r2):
        h.close()


@pytest.mark.parametrize("kind", ["read_after", "write_view", "slots", "readonly", "clear"])
def test_every_read_and_write_path(name, kind):
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64, slots=3 if kind == "slots" else 1)
    r = torch_shmem.open(name, readonly=(kind == "readonly"))
    fd = r.fileno()
    if kind == "write_view":
        with w.write_view() as view:
            view[:] = 5
    elif kind == "clear":
        w.clear()
    else:
        w.write(value(5))
    assert readable(fd, 5.0)
    if kind == "read_after":
        assert r.read_after(0, timeout=5)[0] in (0, 5)
    else:
        r.read()
    assert not readable(fd)
    assert r.last_read_count == 1
    w.close()
    r.close()


def test_no_signal_without_an_armed_descriptor(name):
    """Handles without fileno() leave the table empty: the write path skips it."""
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64)
    r = torch_shmem.open(name)
    w.write(value(1))
    before = notify_files(os.getpid())  # other tests' handles may still hold some
    fd = r.fileno()
    assert len(notify_files(os.getpid())) == len(before) + 1
    r.close()  # closes the descriptor and removes its socket
    assert notify_files(os.getpid()) == before
    with pytest.raises(OSError):
        os.fstat(fd)
    w.write(value(2))  # no armed entry left: nothing to signal, nothing fails
    w.close()


def test_writer_in_another_process(name, seed):
    n = 50
    r = torch_shmem.create(name, shape=(1,), dtype=np.int64)
    fd = r.fileno()
    go = ctx.Event()
    p = ctx.Process(target=_workers.paced_writes, args=(name, n, 0.002, go))
    p.start()
    try:
        go.set()
        seen = []
        deadline = time.monotonic() + 60
        while (not seen or seen[-1] < n) and time.monotonic() < deadline:
            if readable(fd, 1.0):
                pub = r.read_publication()
                seen.append(pub.count)
        assert seen and seen[-1] == n, seen
        assert seen == sorted(set(seen))  # every wake-up brought something new
    finally:
        p.join(30)
        assert p.exitcode == 0
        r.close()


def test_one_selector_many_streams(seed):
    import random

    rng = random.Random(seed)
    names = [f"t-{os.getpid()}-fileno-{i}-{seed}" for i in range(200)]
    writers, readers = [], []
    sel = selectors.DefaultSelector()
    try:
        for nm in names:
            writers.append(torch_shmem.create(nm, shape=(1,), dtype=np.int64))
            readers.append(torch_shmem.open(nm))
            sel.register(readers[-1].fileno(), selectors.EVENT_READ, len(readers) - 1)
        assert sel.select(timeout=0) == []
        for _ in range(20):
            chosen = set(rng.sample(range(len(names)), 5))
            for i in chosen:
                writers[i].write(np.array([i], dtype=np.int64))
            woke = set()
            deadline = time.monotonic() + 10
            while woke != chosen and time.monotonic() < deadline:
                for key, _ in sel.select(timeout=1.0):
                    i = key.data
                    assert readers[i].read()[0] == i
                    woke.add(i)
            assert woke == chosen
            assert sel.select(timeout=0) == []
    finally:
        sel.close()
        for h in readers + writers:
            h.close()
        for nm in names:
            torch_shmem.unlink(nm)


def test_asyncio_add_reader(name):
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64)
    r = torch_shmem.open(name)

    async def main():
        loop = asyncio.get_running_loop()
        got = []
        ready = asyncio.Event()

        def on_ready():
            got.append(int(r.read()[0]))
            ready.set()

        loop.add_reader(r.fileno(), on_ready)
        try:
            for k in (1, 2, 3):
                ready.clear()
                loop.call_later(0.01, w.write, value(k))
                await asyncio.wait_for(ready.wait(), 10)
        finally:
            loop.remove_reader(r.fileno())
        return got

    assert asyncio.run(main()) == [1, 2, 3]
    w.close()
    r.close()


def test_unlink_makes_armed_descriptors_readable(name):
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64)
    r = torch_shmem.open(name)
    fd = r.fileno()
    assert not readable(fd)
    torch_shmem.unlink(name)
    assert readable(fd, 5.0)
    w.close()
    r.close()


def test_table_full_then_freed_by_close(name):
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64)
    handles = [torch_shmem.open(name) for _ in range(64)]
    for h in handles:
        h.fileno()
    extra = torch_shmem.open(name)
    with pytest.raises(RuntimeError, match=rf"{name}.*64 readiness descriptors"):
        extra.fileno()
    handles.pop().close()
    fd = extra.fileno()
    w.write(value(1))
    assert readable(fd, 5.0)
    assert all(readable(h.fileno(), 5.0) for h in handles)
    for h in handles + [extra, w]:
        h.close()


def test_dead_holders_entries_are_reclaimed_and_purged(name):
    """A process killed while holding descriptors never blocks new ones, and
    purge removes the socket files it left."""
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64)
    mine = len(notify_files(os.getpid()))  # other tests' handles may still hold some
    ready = ctx.Event()
    p = ctx.Process(target=_workers.hold_descriptors, args=(name, 64, ready))
    p.start()
    try:
        assert ready.wait(60), "worker did not take its descriptors"
        r = torch_shmem.open(name)
        with pytest.raises(RuntimeError, match="readiness descriptors"):
            r.fileno()
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        assert p.exitcode == -signal.SIGKILL
        left = notify_files(p.pid)
        assert len(left) == 64
        fd = r.fileno()  # reclaims a dead holder's entry
        w.write(value(1))
        assert readable(fd, 5.0)
        assert set(left) <= set(_admin.leftovers())
        report = _admin.purge_report(dead_only=True)
        assert set(left) <= set(report["leftovers_removed"])
        assert notify_files(p.pid) == []
        assert len(notify_files(os.getpid())) == mine + 1  # ours is alive: kept
        r.close()
    finally:
        if p.is_alive():
            p.kill()
            p.join(30)
        w.close()


def test_closed_handle_refuses(name):
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64)
    w.close()
    with pytest.raises(RuntimeError, match=name):
        w.fileno()


# ---------------------------------------------------------------- asyncio waits


def test_async_waits_park_no_thread(name, monkeypatch):
    """Async waits sit on one readiness descriptor per handle and loop: 50 pending
    waits over 10 streams start no thread, and each gets its publication."""
    monkeypatch.delenv("TORCH_SHMEM_ASYNC_WAIT", raising=False)
    import threading

    names = [f"{name}-{i}" for i in range(10)]
    writers = [torch_shmem.create(n, shape=(4,), dtype=np.int64) for n in names]
    readers = [torch_shmem.open(n) for n in names]

    async def main():
        threads = threading.active_count()
        tasks = [asyncio.create_task(r.read_after_async(0, timeout=30))
                 for r in readers for _ in range(5)]
        await asyncio.sleep(0.05)
        assert threading.active_count() == threads  # nothing parked in a worker
        assert all(len(w.waits) == 5 for r in readers for w in r._watches.values())
        for i, w in enumerate(writers):
            w.write(value(i))
        got = await asyncio.gather(*tasks)
        return [int(a[0]) for a in got]

    try:
        assert asyncio.run(main()) == [i for i in range(10) for _ in range(5)]
    finally:
        for h in readers + writers:
            h.close()
        for n in names:
            torch_shmem.unlink(n)


def test_finished_loops_release_their_descriptors(name):
    import gc

    w = torch_shmem.create(name, shape=(4,), dtype=np.int64)
    r = torch_shmem.open(name)
    before = len(notify_files(os.getpid()))
    for k in range(1, 101):  # more loops than the stream has descriptor entries
        loop_write = k

        async def main():
            asyncio.get_running_loop().call_later(0.001, w.write, value(loop_write))
            return await r.read_after_async(loop_write - 1, timeout=10)

        assert asyncio.run(main())[0] == k
        gc.collect()
    assert len(notify_files(os.getpid())) <= before + 1
    assert torch_shmem.stat(name)["armed_descriptors"] == 0
    r.close()
    w.close()
    assert len(notify_files(os.getpid())) == before


def test_large_payload_async_read_copies_off_the_loop(name):
    n = (4 << 20) // 8  # 4 MiB: above the inline-copy bound
    w = torch_shmem.create(name, shape=(n,), dtype=np.int64)
    r = torch_shmem.open(name)

    async def main():
        task = asyncio.create_task(r.read_new_publication_async(timeout=30))
        await asyncio.sleep(0.02)
        w.write(np.arange(n, dtype=np.int64))
        return await task

    pub = asyncio.run(main())
    assert pub.count == 1 and pub.payload[-1] == n - 1
    r.close()
    w.close()


def test_async_falls_back_to_threads_when_the_table_is_full(name):
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64)
    holders = [torch_shmem.open(name) for _ in range(64)]
    for h in holders:
        h.fileno()
    r = torch_shmem.open(name)

    async def main():
        task = asyncio.create_task(r.read_new_async(timeout=30))
        await asyncio.sleep(0.05)
        assert not r._watches  # no descriptor could be had
        w.write(value(3))
        return await task

    assert asyncio.run(main())[0] == 3
    for h in holders + [r, w]:
        h.close()


def test_connected_senders_are_bounded_and_released(name):
    """A writer keeps a connected socket to a reader it signals often: that costs the
    writer one descriptor per such reader, released when the reader's handle (in this
    process) closes, and never more than 64 however many readers come and go."""
    def fds():
        return len(os.listdir("/proc/self/fd"))

    # descriptors earlier tests left to be closed later (pipes of finished child
    # processes, objects in reference cycles) must not close during the counting
    import gc
    import multiprocessing

    multiprocessing.active_children()
    gc.collect()
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64)
    with torch_shmem.open(name) as first:  # a first signal makes the process's unbound sender
        first.fileno()
        w.write(value(0))
    base = fds()
    r = torch_shmem.open(name)
    fd = r.fileno()
    for k in range(1, 4):  # the second signal connects a socket to the reader
        w.write(value(k))
        assert readable(fd, 5.0)
        r.read()
    assert fds() == base + 2  # the reader's descriptor and the writer's connected socket
    r.close()
    assert fds() == base
    # more readers than the writer keeps connected sockets for (a stream has 64 entries)
    w2 = torch_shmem.create(name + "-2", shape=(4,), dtype=np.int64)
    base = fds()
    readers = []
    for writer, stream in ((w, name), (w2, name + "-2")):
        for i in range(40):
            h = torch_shmem.open(stream)
            h.fileno()
            readers.append((writer, h))
    for k in range(3):
        for writer, h in readers:
            writer.write(value(k))
            h.read()  # re-arms
    assert base + 80 < fds() <= base + 80 + 64
    for _, h in readers:
        h.close()
    # every connected socket of these readers is gone; the cache may also have
    # evicted an entry that an earlier test left (a reader in a process that was
    # killed), so the count can end below the base
    assert fds() <= base
    w2.unlink()
    w.close()
