"""Concurrency stress: several writers and readers across processes and threads.

For a fixed time per payload size, writer processes (several threads each,
through shared and private handles, with write(), write_locked() and write
views) publish self-verifying frames whose frame_id equals the count they
become, while reader processes (several threads each) read with read(),
read_publication(), read_new_publication() and read_after_publication().
Every read's checksum is verified, as are the monotonicity of count and
frame_id per reader thread and frame_id == count == the frame's own
sequence. Nothing is lost: the final count equals the number of writes.

A second test closes and unlinks handles while other threads use them.

Short forms run in CI; the long forms (`-m slow`) are the figures in
docs/reliability.md.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

import _reliability_workers as rw
import torch_shmem

KiB, MiB = 1 << 10, 1 << 20


def stress(name, seed, nbytes, seconds, writers=2, writer_threads=3, readers=2,
           reader_threads=3):
    ctx = rw.context()
    n = max(3, nbytes // 8)
    frames = rw.Frames(n)
    s = torch_shmem.create(name, shape=(n,), dtype=np.uint64)
    s.write(frames.make(1), frame_id=1)
    go = ctx.Event()
    results = ctx.Queue()
    procs = [ctx.Process(target=rw.stress_process,
                         args=(name, n, "writer", writer_threads, seconds, seed + i, go, results),
                         daemon=True) for i in range(writers)]
    procs += [ctx.Process(target=rw.stress_process,
                          args=(name, n, "reader", reader_threads, seconds, seed + 100 + i, go,
                                results), daemon=True) for i in range(readers)]
    for p in procs:
        p.start()
    go.set()
    got = [results.get(timeout=seconds + 300) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"{p.pid} exited with {p.exitcode}"
    writes = sum(v for role, _, out in got if role == "writer" for _, v in out)
    reads = torn = regress = bad_fid = mismatch = 0
    for role, _, out in got:
        if role == "reader":
            for _, (r, t, g, f, m) in out:
                reads, torn, regress = reads + r, torn + t, regress + g
                bad_fid, mismatch = bad_fid + f, mismatch + m
    final = s.count
    pub = s.read_publication()
    fig = {"bytes": n * 8, "seconds": seconds, "writes": writes, "reads_verified": reads,
           "torn": torn, "regressions": regress, "bad_frame_ids": bad_fid,
           "mismatches": mismatch, "final_count": final}
    print(f"stress figures: {fig}")
    assert torn == 0 and regress == 0 and bad_fid == 0 and mismatch == 0
    assert final == writes + 1, "a write was lost or counted twice"
    assert frames.check(pub.payload) == pub.count == pub.frame_id == final
    assert writes > 0 and reads > 0
    s.unlink()
    return fig


@pytest.mark.cpu
@pytest.mark.parametrize("nbytes", [24, 64 * KiB, 4 * MiB], ids=["24B", "64KiB", "4MiB"])
def test_stress_short(name, seed, nbytes):
    stress(name, seed, nbytes, seconds=1.5)


@pytest.mark.slow
@pytest.mark.parametrize("nbytes", [24, 4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB],
                         ids=["24B", "4KiB", "64KiB", "1MiB", "16MiB", "64MiB"])
def test_stress_full(name, seed, nbytes):
    stress(name, seed, nbytes, seconds=20, writers=3, readers=3)


def close_race(name, seed, iterations, n):
    ctx = rw.context()
    results = ctx.Queue()
    p = ctx.Process(target=rw.close_race, args=(name, n, iterations, seed, results), daemon=True)
    p.start()
    stats = results.get(timeout=600)
    p.join(60)
    print(f"close/unlink race figures (n={n * 8} B): {stats}")
    assert p.exitcode == 0, f"the racing process died with {p.exitcode}"
    assert stats["unexpected"] == [], stats["unexpected"][:10]
    assert stats["iterations"] == iterations
    for i in range(iterations):
        torch_shmem.unlink(f"{name}-{i}")
    return stats


@pytest.mark.cpu
def test_close_and_unlink_race_with_calls_short(name, seed):
    close_race(name, seed, iterations=40, n=3)
    close_race(name + "-big", seed + 1, iterations=10, n=(1 * MiB) // 8)


@pytest.mark.slow
def test_close_and_unlink_race_with_calls_full(name, seed):
    rng = random.Random(seed)
    for i in range(4):
        n = rng.choice([3, 512, (256 * KiB) // 8, (8 * MiB) // 8])
        close_race(f"{name}-{i}", seed + i, iterations=150, n=n)


@pytest.mark.cpu
def test_close_waits_for_a_lock_taken_in_the_race_window(name):
    """Thread A's acquire() returns just as the main thread's close() checks for
    holders (simulated: A takes the lock through the native handle, before the
    Python bookkeeping sees it). close() must not unmap under A's lock: it waits for
    A's release (allowed while closing), so the lock never stays held by a live thread."""
    import threading

    s = torch_shmem.create(name, shape=(4,), dtype=np.int32)
    other = torch_shmem.open(name)
    taken, go = threading.Event(), threading.Event()
    result = {}

    def holder():
        s._h.acquire(None)  # the lock, before SharedMemory.acquire() records it
        taken.set()
        go.wait(10)
        try:
            s._h.release()
            result["release"] = "ok"
        except Exception as exc:  # noqa: BLE001
            result["release"] = repr(exc)

    t = threading.Thread(target=holder)
    t.start()
    assert taken.wait(10)
    threading.Timer(0.2, go.set).start()
    s.close(timeout=10)  # returns once A released
    t.join(10)
    assert result["release"] == "ok", result
    other.acquire(timeout=2)  # free for everyone
    other.release()


@pytest.mark.cpu
def test_close_refuses_and_stays_usable_while_another_thread_holds_the_lock(name):
    import threading

    s = torch_shmem.create(name, shape=(4,), dtype=np.int32)
    taken, go = threading.Event(), threading.Event()

    def holder():
        s._h.acquire(None)
        taken.set()
        go.wait(10)
        s._h.release()

    t = threading.Thread(target=holder)
    t.start()
    assert taken.wait(10)
    with pytest.raises(RuntimeError, match="another thread owns its lock"):
        s._h.close(0.1)
    assert not s.closed  # the refused close left the handle usable
    go.set()
    t.join(10)
    s.write(np.ones(4, np.int32), timeout=2)
    s.close()
    assert s.closed


@pytest.mark.cpu
def test_write_view_finishes_while_another_thread_closes(name):
    """A thread inside write_view() when another thread starts close(): its commit and
    release are still accepted, so the write is published and the lock released."""
    import threading

    s = torch_shmem.create(name, shape=(4,), dtype=np.int32)
    other = torch_shmem.open(name)
    inside, go = threading.Event(), threading.Event()
    errors = []

    def writer():
        try:
            with s.write_view(timeout=5) as v:
                inside.set()
                go.wait(10)
                v[...] = 7
        except Exception as exc:  # noqa: BLE001
            errors.append(repr(exc))

    t = threading.Thread(target=writer)
    t.start()
    assert inside.wait(10)
    threading.Timer(0.2, go.set).start()
    s._h.close(10)  # the native close: no Python-level holder check
    t.join(10)
    assert errors == []
    assert other.read(timeout=2).tolist() == [7] * 4 and other.count == 1
    other.acquire(timeout=2)
    other.release()
