"""Child-process bodies and helpers of the reliability suite (tests/test_reliability_*.py).

Frames are uint64 arrays of n >= 3 words that carry their own sequence and
checksum, so a reader can verify every payload it gets on its own:

    word 0        k, the publication this frame was written as (== count)
    word 1        checksum: wrapping sum of the body words, mixed with k
    words 2..n-1  body: (i * C) ^ (k * P)

A frame that mixes bytes of two writes fails `Frames.check` (the body
pattern, the checksum, or both). Writers write frame k as publication k
(k == the stream's count after the write), so `check` also proves that the
payload a reader got is exactly the publication its count names.

Children run from a forkserver whose server process preloaded numpy,
torch_shmem and this module (see `context()`): a kill-and-restart iteration
then costs a fork instead of a fresh interpreter, which is what lets the
torture run hundreds of kills in seconds. The server itself is started
clean (like spawn), never forked from the pytest process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np

import torch_shmem
from torch_shmem import InconsistentStreamError

C = np.uint64(0x9E3779B97F4A7C15)
P = 0xD6E8FEB86659FD93
MIX = 0xA0761D6478BD642F
M64 = (1 << 64) - 1


def _mul(k: int, m: int) -> np.uint64:
    """(k * m) mod 2**64 without NumPy's scalar overflow warning."""
    return np.uint64((k * m) & M64)

_CTX = None


def context():
    """The forkserver context used by the reliability suite (preloaded, started once)."""
    global _CTX
    if _CTX is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["numpy", "torch_shmem", "_reliability_workers"])
        _CTX = ctx
    return _CTX


class Frames:
    """Builds and checks self-verifying frames of n uint64 words (n >= 3).

    Not thread-safe (check() uses a scratch buffer): one per thread.
    """

    def __init__(self, n: int) -> None:
        if n < 3:
            raise ValueError("frames need at least 3 words")
        self.n = n
        self.base = np.arange(n - 2, dtype=np.uint64) * C
        self.scratch = np.empty(n - 2, dtype=np.uint64)

    def fill(self, k: int, out: np.ndarray) -> np.ndarray:
        """Write frame k into `out` (n uint64 words)."""
        body = out[2:]
        np.bitwise_xor(self.base, _mul(k, P), out=body)
        out[0] = k
        out[1] = self._checksum(k, body)
        return out

    def make(self, k: int) -> np.ndarray:
        return self.fill(k, np.empty(self.n, dtype=np.uint64))

    @staticmethod
    def _checksum(k: int, body: np.ndarray) -> np.uint64:
        with np.errstate(over="ignore"):
            return np.uint64(body.sum(dtype=np.uint64)) ^ _mul(k, MIX)

    def check(self, frame: np.ndarray) -> int:
        """k when `frame` is an intact frame k, else -1 (torn or foreign)."""
        k = int(frame[0])
        body = frame[2:]
        if frame[1] != self._checksum(k, body):
            return -1
        np.bitwise_xor(self.base, _mul(k, P), out=self.scratch)
        if not np.array_equal(body, self.scratch):
            return -1
        return k


def fill_view_in_steps(frames: Frames, k: int, view: np.ndarray, steps: int, pause: float) -> None:
    """Fill frame k into a live write view in `steps` chunks (so a kill lands mid-fill)."""
    n = frames.n
    frame = frames.make(k)
    bounds = np.linspace(0, n, steps + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        view[a:b] = frame[a:b]
        if pause:
            time.sleep(pause)


# ---- crash torture: writers that get killed ----------------------------------


def torture_writer(name, n, mode, seed, state):
    """Write frames k = count + 1, ... until killed.

    mode: "write" (write()), "locked" (locked() + write_locked, with pauses
    while holding the lock), "view" (write_view filled in steps), "mixed"
    (a random one per frame). `state` is a shared array: [0] = 1 once the
    loop runs, [1] = the phase the writer is in (see PHASES), [2] = frames
    completed.
    """
    rng = random.Random(seed)
    s = torch_shmem.open(name)
    frames = Frames(n)
    buf = np.empty(n, dtype=np.uint64)
    state[0] = 1
    modes = ["write", "locked", "view"]
    while True:
        m = rng.choice(modes) if mode == "mixed" else mode
        if m == "write":
            state[1] = PHASES["write"]
            frames.fill(s.count + 1, buf)  # single writer: count + 1 is the next count
            s.write(buf)
        elif m == "locked":
            with s.locked():
                state[1] = PHASES["locked"]
                frames.fill(s.count + 1, buf)
                if rng.random() < 0.3:
                    time.sleep(rng.uniform(0, 0.003))  # idle, holding the lock
                s.write_locked(buf)
                if rng.random() < 0.3:
                    time.sleep(rng.uniform(0, 0.003))  # published, lock still held
        else:
            with s.write_view() as view:
                state[1] = PHASES["view"]
                k = s.count + 1
                fill_view_in_steps(frames, k, view, rng.choice([1, 2, 4, 8]),
                                   rng.choice([0, 0, 0.0005]))
        state[1] = PHASES["idle"]
        state[2] += 1


PHASES = {"idle": 0, "write": 1, "locked": 2, "view": 3, "point": 4}

# Deterministic crash points: the writer gets there, says so and sleeps until killed.
POINTS = ["holding_lock", "after_write_locked", "mid_view", "view_filled", "mid_begin_write"]


def point_writer(name, n, point, state):
    s = torch_shmem.open(name)
    frames = Frames(n)
    k = s.count + 1
    if point == "holding_lock":
        s.acquire()
    elif point == "after_write_locked":
        s.acquire()
        s.write_locked(frames.make(k))
    elif point in ("mid_view", "view_filled"):
        cm = s.write_view()
        view = cm.__enter__()
        frame = frames.make(k)
        if point == "mid_view":
            view[: n // 2] = frame[: n // 2]
        else:
            view[...] = frame  # complete, but not committed
    elif point == "mid_begin_write":
        s.acquire()
        s._h.begin_write()
        np.frombuffer(s._h, dtype=np.uint64)[: max(1, n // 3)] = 0xDEAD
    state[1] = PHASES["point"]
    state[0] = 1
    time.sleep(600)


# ---- readers -----------------------------------------------------------------


def verifying_reader(name, n, stop, results, seed, use_new=False):
    """Read until `stop`: verify every payload, count inconsistent reads.

    Reports (reads, verified, torn, inconsistent, regressions, mismatches):
    torn = a payload that fails its checksum; mismatch = an intact frame
    whose k differs from the count of the publication it came with;
    regression = a count lower than one seen before.
    """
    rng = random.Random(seed)
    s = torch_shmem.open(name)
    frames = Frames(n)
    out = np.empty(n, dtype=np.uint64)
    reads = verified = torn = inconsistent = regress = mismatch = timeouts = 0
    last = -1
    while not stop.is_set():
        try:
            if use_new and rng.random() < 0.2:
                pub = s.read_new_publication(out=out, timeout=0.05)
            else:
                pub = s.read_publication(out=out, timeout=5)
        except InconsistentStreamError:
            inconsistent += 1
            time.sleep(0.0002)
            continue
        except TimeoutError:
            timeouts += 1
            continue
        reads += 1
        k = frames.check(out)
        if pub.count == 0 and not out.any():
            verified += 1  # the zero payload of a fresh stream
            continue
        if k < 0:
            torn += 1
            continue
        verified += 1
        if k != pub.count:
            mismatch += 1
        if pub.count < last:
            regress += 1
        last = pub.count
    results.put(("reader", os.getpid(), (reads, verified, torn, inconsistent, regress, mismatch,
                                         timeouts)))
    s.close()


def reader_loop_forever(name, n, state):
    """A reader that loops until killed (killed mid-read by the torture)."""
    s = torch_shmem.open(name)
    out = np.empty(n, dtype=np.uint64)
    state[0] = 1
    frames = Frames(n)
    while True:
        try:
            s.read(out=out, timeout=5)
        except InconsistentStreamError:
            continue
        if frames.check(out) < 0 and out.any():
            os._exit(3)  # a torn read: the parent sees exit code 3
        state[2] += 1


def steady_writer(name, n, state, stop):
    """Writes frames back to back (k == count) until `stop`; counts them in state[2]."""
    s = torch_shmem.open(name)
    frames = Frames(n)
    buf = np.empty(n, dtype=np.uint64)
    state[0] = 1
    while not stop.is_set():
        with s.locked():
            frames.fill(s.count + 1, buf)
            s.write_locked(buf)
        state[2] += 1
    s.close()


# ---- concurrency stress ------------------------------------------------------


def stress_process(name, n, role, threads, seconds, seed, go, results):
    """`threads` writer or reader threads on one handle per thread (and one shared)."""
    go.wait(60)
    shared = torch_shmem.open(name)
    deadline = time.monotonic() + seconds
    out = []
    lock = threading.Lock()

    def writer(tid):
        rng = random.Random(seed * 1000 + tid)
        s = shared if tid % 2 else torch_shmem.open(name)
        frames = Frames(n)
        buf = np.empty(n, dtype=np.uint64)
        writes = 0
        while time.monotonic() < deadline:
            how = rng.random()
            if how < 0.4:
                with s.locked(timeout=30):
                    k = s.count + 1
                    frames.fill(k, buf)
                    s.write(buf, frame_id=k)  # re-entrant write under the lock
            elif how < 0.7:
                with s.locked(timeout=30):
                    k = s.count + 1
                    s.write_locked(frames.fill(k, buf), frame_id=k)
            else:
                # frame_id must equal the count, so it is computed under the
                # lock; write_view then takes the lock re-entrantly
                with s.locked(timeout=30):
                    k = s.count + 1
                    with s.write_view(timeout=30, frame_id=k) as view:
                        view[...] = frames.fill(k, buf)
            writes += 1
        with lock:
            out.append(("w", writes))

    def writer_view_fid(tid):
        # write_view with frame_id: the frame id must equal the count, so it
        # is taken under the lock first (locked() then write_view_locked).
        rng = random.Random(seed * 1000 + tid)
        s = torch_shmem.open(name)
        frames = Frames(n)
        writes = 0
        while time.monotonic() < deadline:
            with s.locked(timeout=30):
                k = s.count + 1
                with s.write_view_locked(frame_id=k) as view:
                    fill_view_in_steps(frames, k, view, rng.choice([1, 3]), 0)
            writes += 1
        with lock:
            out.append(("w", writes))

    def reader(tid):
        rng = random.Random(seed * 1000 + tid)
        s = shared if tid % 2 else torch_shmem.open(name)
        frames = Frames(n)
        buf = np.empty(n, dtype=np.uint64)
        reads = torn = regress = bad_fid = mismatch = 0
        last_count = last_fid = 0
        while time.monotonic() < deadline:
            how = rng.random()
            try:
                if how < 0.5:
                    pub = s.read_publication(out=buf, timeout=30)
                elif how < 0.7:
                    pub = s.read_new_publication(out=buf, timeout=0.2)
                elif how < 0.85:
                    pub = s.read_after_publication(last_count, out=buf, timeout=0.2)
                else:
                    arr = s.read(timeout=30)
                    buf[...] = arr
                    pub = None
            except TimeoutError:
                continue
            reads += 1
            k = frames.check(buf)
            if k < 0:
                if buf.any():
                    torn += 1
                continue
            if pub is None:
                continue
            if pub.count != k:
                mismatch += 1
            if pub.frame_id != pub.count and pub.count > 0:
                bad_fid += 1
            if pub.count < last_count or pub.frame_id < last_fid:
                regress += 1
            last_count, last_fid = pub.count, pub.frame_id
        with lock:
            out.append(("r", (reads, torn, regress, bad_fid, mismatch)))

    if role == "writer":
        bodies = [writer if i % 3 != 2 else writer_view_fid for i in range(threads)]
    else:
        bodies = [reader] * threads
    ts = [threading.Thread(target=b, args=(i,)) for i, b in enumerate(bodies)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    results.put((role, os.getpid(), out))
    shared.close()


# ---- misc --------------------------------------------------------------------


def run_isolated(code: str, *, size: str = "64m", timeout: float = 120, preexec: str = "") -> str:
    """Run Python `code` in a private mount namespace with an empty tmpfs on /dev/shm.

    Skips (with the reason) where unshare/mount are not permitted. `preexec`
    is shell run before Python (e.g. `ulimit -f 1024`). Returns stdout.
    """
    import pytest

    iso = ["unshare", "-m", "--propagation", "private", "sh", "-c"]
    try:
        probe = subprocess.run(iso + ["mount -t tmpfs tmpfs /dev/shm"], capture_output=True,
                               timeout=30)
    except FileNotFoundError:
        pytest.skip("needs unshare(1) for a private /dev/shm")
    if probe.returncode != 0:
        pytest.skip("needs unshare + mount (root or user namespaces) for a private /dev/shm: "
                    + probe.stderr.decode(errors="replace").strip())
    script = (f"mount -t tmpfs -o size={size} tmpfs /dev/shm && {preexec} "
              f"exec {sys.executable} -c \"$0\"")
    out = subprocess.run(iso + [script, textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"rc={out.returncode}\n{out.stdout}\n{out.stderr}"
    return out.stdout


def signal_name(status: int) -> str:
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit {os.WEXITSTATUS(status)}"


# ---- close()/unlink() racing with calls in other threads -----------------------

# What a call may raise when another thread closes its handle or unlinks the
# stream meanwhile. Anything else (or a crash of the process) fails the test.
RACE_OK = (RuntimeError, TimeoutError, InconsistentStreamError, FileNotFoundError)


def close_race(name, n, iterations, seed, results):
    """Threads hammer one handle while the main thread closes or unlinks it."""
    rng = random.Random(seed)
    frames = Frames(n)
    stats = {"iterations": 0, "ops": 0, "expected_errors": 0, "close_retries": 0,
             "views_read_after_close": 0, "unexpected": []}
    lock = threading.Lock()
    for it in range(iterations):
        s = torch_shmem.create(f"{name}-{it}", shape=(n,), dtype=np.uint64)
        s.write(frames.make(1))
        other = torch_shmem.open(f"{name}-{it}")  # a second handle, never closed by the race
        stop = threading.Event()
        views = []

        def body(tid):
            r = random.Random(seed * 7919 + it * 31 + tid)
            frames = Frames(n)  # per thread: check() uses a scratch buffer
            buf = np.empty(n, dtype=np.uint64)
            ops = errs = 0
            while not stop.is_set():
                op = r.randrange(10)
                try:
                    if op == 0:
                        s.read(out=buf, timeout=1)
                        if frames.check(buf) < 0 and buf.any():  # zeros: a clear()
                            raise AssertionError("torn read")
                    elif op == 1:
                        s.write(frames.make(s.count + 1), timeout=1)
                    elif op == 2:
                        s.read_new(timeout=0.005)
                    elif op == 3:
                        s.wait_for_count(after=s.count, timeout=0.005)
                    elif op == 4:
                        with s.locked(timeout=1):
                            s.write_locked(frames.make(s.count + 1))
                    elif op == 5:
                        with s.write_view(timeout=1) as v:
                            v[...] = frames.make(s.count + 1)
                    elif op == 6:
                        with s.locked(timeout=1):
                            v = s.read(safe=False)
                            views.append(v)  # kept past close(): must stay mapped
                    elif op == 7:
                        s.read_publication(timeout=1)
                    elif op == 8:
                        s.count, s.frame_id, s.lock_owner, s.describe()
                    else:
                        s.clear(timeout=1)
                    ops += 1
                except RACE_OK:
                    errs += 1
                    if s.closed:
                        time.sleep(0.0005)
                except Exception as exc:  # noqa: BLE001 - reported
                    with lock:
                        stats["unexpected"].append(f"op {op}: {exc!r}")
            with lock:
                stats["ops"] += ops
                stats["expected_errors"] += errs

        threads = [threading.Thread(target=body, args=(t,)) for t in range(rng.choice([2, 3, 4]))]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0, 0.02))
        how = rng.choice(["close", "unlink", "unlink_name", "close_short"])
        deadline = time.monotonic() + 30
        while True:
            try:
                if how == "close":
                    s.close()
                elif how == "close_short":
                    s.close(timeout=0.001)
                elif how == "unlink":
                    s.unlink()
                else:
                    torch_shmem.unlink(f"{name}-{it}")
                    s.close()
                break
            except RuntimeError:
                # refused: another thread holds the lock through this handle,
                # or a call did not finish within the close timeout
                stats["close_retries"] += 1
                if time.monotonic() > deadline:
                    stats["unexpected"].append("close() refused for 30 s")
                    break
                time.sleep(0.001)
        stop.set()
        for t in threads:
            t.join(60)
            if t.is_alive():
                stats["unexpected"].append("a thread did not stop")
        for v in views:
            v.sum()  # the mapping outlives close() while views exist
            stats["views_read_after_close"] += 1
        del views
        # the threads are gone: the stream's lock must be free for everyone else
        try:
            other.acquire(timeout=5)
            other.release()
        except TimeoutError:
            stats["unexpected"].append(f"lock left held after {how} (owner {other.lock_owner})")
            while other._h.held_depth() > 0:
                other.release()
        other.close()
        torch_shmem.unlink(f"{name}-{it}")
        stats["iterations"] += 1
    results.put(stats)



def parked_reader(name, state):
    """Parks in read_new() (futex wait) until killed."""
    s = torch_shmem.open(name)
    state[0] = 1
    s.read_new(timeout=None)
    state[2] = 1  # not reached: the parent kills it first
