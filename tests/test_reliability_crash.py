"""Crash torture: writers and readers killed with SIGKILL at random points.

After every writer kill: the lock is free at once (robust mutex), the stream
reads either the last completed frame (exactly the publication its count
names) or InconsistentStreamError, the next write repairs it, and counts
never move backwards. Reader processes verify every payload they get (each
frame carries its sequence and a checksum) for the whole run; a torn read
fails the test. Readers killed mid-read affect nobody.

The short forms run in CI (marker cpu); the long forms are marker `slow`:

    python -m pytest -m slow tests/test_reliability_crash.py -s

prints the figures recorded in docs/reliability.md.
"""

from __future__ import annotations

import math
import os
import random
import time

import numpy as np
import pytest

import _reliability_workers as rw
import torch_shmem
from torch_shmem import InconsistentStreamError

MiB = 1 << 20


def wait_ready(state, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while state[0] != 1:
        if not proc.is_alive():
            pytest.fail(f"child {proc.pid} died before it was ready (exit {proc.exitcode})")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"child {proc.pid} not ready after {timeout} s")
        time.sleep(0.0005)


def kill_and_reap(proc):
    proc.kill()
    proc.join(30)
    assert not proc.is_alive(), f"child {proc.pid} survived SIGKILL"


def random_words(rng, max_bytes):
    """A payload size in uint64 words, log-uniform from 24 B to max_bytes."""
    lo, hi = math.log(24), math.log(max_bytes)
    return max(3, int(math.exp(rng.uniform(lo, hi))) // 8)


class Torture:
    """One stream under crash torture; accumulates the figures."""

    def __init__(self, name, n, seed, readers=2, slots=1):
        self.ctx = rw.context()
        self.name = name
        self.n = n
        self.rng = random.Random(seed)
        self.frames = rw.Frames(n)
        self.buf = np.empty(n, dtype=np.uint64)
        self.s = torch_shmem.create(name, shape=(n,), dtype=np.uint64, slots=slots)
        self.s.write(self.frames.make(1))
        self.stop = self.ctx.Event()
        self.results = self.ctx.Queue()
        self.readers = [
            self.ctx.Process(target=rw.verifying_reader,
                             args=(name, n, self.stop, self.results, seed + i, True), daemon=True)
            for i in range(readers)
        ]
        for p in self.readers:
            p.start()
        self.fig = {"kills": 0, "intact_after_kill": 0, "inconsistent_after_kill": 0,
                    "repairs": 0, "parent_reads_verified": 0, "max_lock_ms": 0.0,
                    "points": {}}

    def _check_after_kill(self, dead_pid, expect=None, count_before=0):
        s = self.s
        seq_odd = bool(s.write_sequence & 1)
        t0 = time.monotonic()
        s.acquire(timeout=10)  # the dead holder's lock is taken over at once
        ms = (time.monotonic() - t0) * 1e3
        s.release()
        self.fig["max_lock_ms"] = max(self.fig["max_lock_ms"], ms)
        assert ms < 1000, f"lock took {ms:.1f} ms after the holder died"
        # Free, or taken by a verifying reader's lock fallback (readers fall back
        # to the lock while a dead writer's odd seq stands): never the dead pid.
        owner = s.lock_owner
        assert owner != dead_pid, "the dead writer still owns the lock"
        assert owner is None or owner in {p.pid for p in self.readers}, owner
        count = s.count
        assert count >= count_before, "count went backwards"
        try:
            pub = s.read_publication(out=self.buf, timeout=10)
        except InconsistentStreamError:
            assert seq_odd, "InconsistentStreamError although no write was cut short"
            assert expect in (None, "inconsistent")
            self.fig["inconsistent_after_kill"] += 1
        else:
            k = self.frames.check(self.buf)
            assert k >= 0, "torn payload returned after a kill"
            assert k == pub.count == count, (k, pub.count, count)
            assert expect in (None, "intact"), "a cut-short write was returned as data"
            self.fig["intact_after_kill"] += 1
            self.fig["parent_reads_verified"] += 1
        # the next good write repairs the stream and counts exactly once
        c = s.count
        s.write(self.frames.make(c + 1), timeout=10)
        assert s.count == c + 1
        pub = s.read_publication(out=self.buf, timeout=10)
        assert self.frames.check(self.buf) == c + 1 == pub.count
        self.fig["repairs"] += 1
        self.fig["parent_reads_verified"] += 1

    def kill_random(self):
        """Start a writer in a random mode, kill it after a random delay."""
        rng = self.rng
        mode = rng.choice(["write", "locked", "view", "mixed"])
        state = self.ctx.Array("q", 3, lock=False)
        count_before = self.s.count
        p = self.ctx.Process(target=rw.torture_writer,
                             args=(self.name, self.n, mode, rng.getrandbits(32), state),
                             daemon=True)
        p.start()
        if rng.random() < 0.05:
            kill_and_reap(p)  # killed while starting up
        else:
            wait_ready(state, p)
            write_s = self.n * 8 / 1.5e9  # rough copy time of one frame
            time.sleep(rng.uniform(0, max(0.003, 4 * write_s)))
            kill_and_reap(p)
        self.fig["kills"] += 1
        self._check_after_kill(p.pid, count_before=count_before)

    def kill_at_point(self, point):
        state = self.ctx.Array("q", 3, lock=False)
        count_before = self.s.count
        p = self.ctx.Process(target=rw.point_writer, args=(self.name, self.n, point, state),
                             daemon=True)
        p.start()
        wait_ready(state, p)
        kill_and_reap(p)
        self.fig["kills"] += 1
        self.fig["points"][point] = self.fig["points"].get(point, 0) + 1
        expect = "intact" if point in ("holding_lock", "after_write_locked") else "inconsistent"
        self._check_after_kill(p.pid, expect=expect, count_before=count_before)

    def finish(self):
        self.stop.set()
        got = []
        for _ in self.readers:
            got.append(self.results.get(timeout=120))
        for p in self.readers:
            p.join(60)
            assert p.exitcode == 0, f"reader exited with {p.exitcode}"
        totals = np.sum([r[2] for r in got], axis=0)
        reads, verified, torn, inconsistent, regress, mismatch, _timeouts = (int(v) for v in totals)
        self.fig.update(reader_reads=reads, reader_reads_verified=verified, torn_reads=torn,
                        reader_inconsistent=inconsistent, regressions=regress,
                        mismatches=mismatch)
        self.s.unlink()
        return self.fig


def merge(total, fig):
    for k, v in fig.items():
        if k == "points":
            for p, c in v.items():
                total.setdefault("points", {})
                total["points"][p] = total["points"].get(p, 0) + c
        elif k == "max_lock_ms":
            total[k] = max(total.get(k, 0.0), v)
        else:
            total[k] = total.get(k, 0) + v


def run_torture(name, seed, sizes_words, kills_per_size, point_every=4, slots=1):
    rng = random.Random(seed)
    total: dict = {"sizes_bytes": []}
    t0 = time.monotonic()
    for i, n in enumerate(sizes_words):
        t = Torture(f"{name}-{i}", n, rng.getrandbits(32), slots=slots)
        try:
            for j in range(kills_per_size):
                if j % point_every == point_every - 1:
                    t.kill_at_point(rw.POINTS[(j // point_every + i) % len(rw.POINTS)])
                else:
                    t.kill_random()
            fig = t.finish()
        finally:
            t.stop.set()
            torch_shmem.unlink(t.name)
        total["sizes_bytes"].append(n * 8)
        merge(total, fig)
    total["seconds"] = round(time.monotonic() - t0, 1)
    total["slots"] = slots
    print(f"crash torture figures: {total}")
    assert total["torn_reads"] == 0
    assert total["regressions"] == 0
    assert total["mismatches"] == 0
    assert total["reader_reads_verified"] > 0
    return total


@pytest.mark.cpu
def test_writer_kill_torture_short(name, seed):
    rng = random.Random(seed)
    sizes = [3, 512 + rng.randrange(512), random_words(rng, 1 * MiB), (8 * MiB) // 8]
    fig = run_torture(name, seed, sizes, kills_per_size=15)
    assert fig["kills"] == 60
    assert fig["inconsistent_after_kill"] >= 3  # the mid-view points at least


@pytest.mark.cpu
def test_writer_kill_torture_64mib_short(name, seed):
    fig = run_torture(name, seed, [(64 * MiB) // 8], kills_per_size=8, point_every=2)
    assert fig["kills"] == 8
    assert fig["inconsistent_after_kill"] >= 2  # mid_view and view_filled


@pytest.mark.cpu
def test_writer_kill_torture_slotted_short(name, seed):
    """The same torture on a slotted stream (create(slots=3)): writes go to a slot no
    reader is copying, in-place views to the next publication's slot."""
    rng = random.Random(seed)
    sizes = [3, 512 + rng.randrange(512), random_words(rng, 1 * MiB), (4 * MiB) // 8]
    fig = run_torture(name, seed, sizes, kills_per_size=10, point_every=2, slots=3)
    assert fig["kills"] == 40
    assert fig["inconsistent_after_kill"] >= 3  # the mid-view points at least


@pytest.mark.slow
def test_writer_kill_torture_full(name, seed):
    rng = random.Random(seed)
    sizes = [3, 4, 100, 1000] + [random_words(rng, 64 * MiB) for _ in range(6)]
    sizes += [(64 * MiB) // 8, (64 * MiB) // 8 - rng.randrange(1, 1000)]
    rng.shuffle(sizes)
    fig = run_torture(name, seed, sizes, kills_per_size=50)
    assert fig["kills"] == 50 * len(sizes)
    fig = run_torture(name + "-slots", seed, sizes[:6], kills_per_size=30, slots=4)
    assert fig["kills"] == 30 * 6


def reader_kill_torture(name, seed, n, kills, slots=1):
    """Readers looping on a payload written back to back get killed mid-read."""
    ctx = rw.context()
    rng = random.Random(seed)
    frames = rw.Frames(n)
    s = torch_shmem.create(name, shape=(n,), dtype=np.uint64, slots=slots)
    s.write(frames.make(1))
    stop = ctx.Event()
    wstate = ctx.Array("q", 3, lock=False)
    writer = ctx.Process(target=rw.steady_writer, args=(name, n, wstate, stop), daemon=True)
    writer.start()
    wait_ready(wstate, writer)
    results = ctx.Queue()
    witness = ctx.Process(target=rw.verifying_reader, args=(name, n, stop, results, seed, False),
                          daemon=True)
    witness.start()
    buf = np.empty(n, dtype=np.uint64)
    max_ms = 0.0
    try:
        for _ in range(kills):
            state = ctx.Array("q", 3, lock=False)
            p = ctx.Process(target=rw.reader_loop_forever, args=(name, n, state), daemon=True)
            p.start()
            wait_ready(state, p)
            time.sleep(rng.uniform(0, 0.02))
            kill_and_reap(p)
            assert p.exitcode == -9, f"reader saw a torn frame (exit {p.exitcode})"
            t0 = time.monotonic()
            s.acquire(timeout=10)
            max_ms = max(max_ms, (time.monotonic() - t0) * 1e3)
            # a reader's death never marks the stream inconsistent
            pub = s.read_publication(out=buf)
            assert frames.check(buf) == pub.count
            s.release()
            before = wstate[2]
            deadline = time.monotonic() + 30
            while wstate[2] <= before + 1:  # the writer keeps going
                assert time.monotonic() < deadline, "writer stalled after a reader died"
                time.sleep(0.001)
    finally:
        stop.set()
    writer.join(60)
    assert writer.exitcode == 0
    _, _, (reads, verified, torn, inconsistent, regress, mismatch, _t) = results.get(timeout=60)
    witness.join(60)
    fig = {"slots": slots, "reader_kills": kills, "writes": int(wstate[2]), "witness_reads_verified": verified,
           "torn_reads": torn, "inconsistent": inconsistent, "max_lock_ms": round(max_ms, 3)}
    print(f"reader kill figures (n={n * 8} B): {fig}")
    assert torn == 0 and inconsistent == 0 and regress == 0 and mismatch == 0
    assert verified > 0
    s.unlink()
    return fig


@pytest.mark.cpu
def test_reader_kill_torture_short(name, seed):
    reader_kill_torture(name, seed, (4 * MiB) // 8, kills=12)


@pytest.mark.cpu
def test_reader_kill_torture_slotted_short(name, seed):
    reader_kill_torture(name, seed, (4 * MiB) // 8, kills=8, slots=3)


@pytest.mark.slow
def test_reader_kill_torture_full(name, seed):
    rng = random.Random(seed)
    for i, n in enumerate([3, 4096, random_words(rng, 64 * MiB), (64 * MiB) // 8]):
        reader_kill_torture(f"{name}-{i}", seed + i, n, kills=40)


@pytest.mark.cpu
def test_reader_killed_while_parked_has_no_effect(name):
    """A reader SIGKILLed inside read_new() (registered as a waiter, parked on the
    futex): writes, counts and other readers' wake-ups are unaffected. Its waiter
    registration stays behind (each later write then makes one futex_wake system
    call; docs/reliability.md), which is why the count is reported, not asserted."""
    import threading

    ctx = rw.context()
    s = torch_shmem.create(name, shape=(8,), dtype=np.uint64)
    parked = []
    for _ in range(3):
        state = ctx.Array("q", 3, lock=False)
        p = ctx.Process(target=rw.parked_reader, args=(name, state), daemon=True)
        p.start()
        wait_ready(state, p)
        parked.append(p)
    deadline = time.monotonic() + 30
    while s._h.state()[7] < 3:  # all three parked
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for p in parked:
        kill_and_reap(p)
    left = s._h.state()[7]
    got = {}
    r = torch_shmem.open(name)
    t = threading.Thread(target=lambda: got.setdefault("v", r.read_new(timeout=30)))
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    s.write(np.full(8, 5, np.uint64), timeout=1)
    t.join(30)
    woke_ms = (time.monotonic() - t0) * 1e3
    assert got["v"].tolist() == [5] * 8 and s.count == 1
    print(f"parked readers killed: 3, waiter registrations left: {left}, "
          f"live reader woke after {woke_ms:.1f} ms")
    assert woke_ms < 1000
