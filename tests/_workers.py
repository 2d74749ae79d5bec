"""Child-process bodies for the multi-process tests (spawn context).

Frames carry their own checksum: element i of frame k is k ^ (i * C), so a
frame mixing bytes of two writes is detected by `frame_ok`.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

import torch_shmem

C = np.uint64(0x9E3779B97F4A7C15)


def make_frame(k, n):
    return np.uint64(k) ^ (np.arange(n, dtype=np.uint64) * C)


def frame_seq(frame):
    """Return k if frame is an intact frame k, else -1."""
    if frame.size == 0:
        return 0
    k = frame[0]
    if frame.size > 1 and not np.array_equal(frame, k ^ (np.arange(frame.size, dtype=np.uint64) * C)):
        return -1
    return int(k)


class FrameTally:
    """Counts of a reader's checks of checksummed frames: reads, torn, regressions, last."""

    def __init__(self):
        self.reads = self.torn = self.regress = self.last = 0

    def add(self, frame):
        """Check one frame read; return its number k (-1 if torn)."""
        k = frame_seq(frame)
        self.reads += 1
        if k < 0:
            self.torn += 1
        elif k < self.last:
            self.regress += 1
        else:
            self.last = k
        return k


def writer(name, n, frames, min_seconds, ready, done, results):
    """Write frames 1, 2, ... : at least `frames` of them and for at least `min_seconds`."""
    s = torch_shmem.open(name)
    ready.wait(30)
    buf = np.empty(n, dtype=np.uint64)
    base = np.arange(n, dtype=np.uint64) * C
    end = time.monotonic() + min_seconds
    k = 0
    while k < frames or time.monotonic() < end:
        k += 1
        np.bitwise_xor(base, np.uint64(k), out=buf)
        s.write(buf)
    results.put(("writer", k))
    done.set()
    s.close()


def reader(name, ready, done, results):
    """Read until the writer is done; count torn frames and regressions."""
    s = torch_shmem.open(name)
    ready.wait(30)
    t = FrameTally()
    deadline = time.monotonic() + 120
    out = np.empty(s.shape, dtype=np.uint64)
    while time.monotonic() < deadline:
        finished = done.is_set()
        s.read(out=out)
        t.add(out)
        if finished:
            break
    results.put(("reader", (t.reads, t.torn, t.regress, t.last, s.total_missed_writes)))
    s.close()


def hold_lock_forever(name, ready):
    s = torch_shmem.open(name)
    s.acquire()
    ready.set()
    time.sleep(600)


def die_mid_write(name, ready):
    """Start a write (seq odd), scribble half the payload, then wait to be killed."""
    s = torch_shmem.open(name)
    s.acquire()
    s._h.begin_write()
    with_lock_view = np.frombuffer(s._h, dtype=np.uint64)
    with_lock_view[: with_lock_view.size // 2] = 0xDEAD
    ready.set()
    time.sleep(600)


def write_loop(name, n, ready):
    s = torch_shmem.open(name)
    base = np.arange(n, dtype=np.uint64) * C
    buf = np.empty(n, dtype=np.uint64)
    ready.set()
    k = 1
    while True:
        np.bitwise_xor(base, np.uint64(k), out=buf)
        s.write(buf)
        k += 1


def read_loop(name, ready):
    s = torch_shmem.open(name)
    ready.set()
    while True:
        s.read()


def write_after(name, delay, value):
    s = torch_shmem.open(name)
    time.sleep(delay)
    s.write(np.asarray(value, dtype=s.dtype))
    s.close()


def create_and_exit(name):
    s = torch_shmem.create(name, shape=(3,), dtype=np.int32)
    s.write(np.array([7, 8, 9], dtype=np.int32))
    # no close, no unlink: the stream must outlive this process


def read_pickled(handle, results):
    results.put(handle.read().tolist())


def kill(pid):
    os.kill(pid, signal.SIGKILL)


# ---- parity tests (tests/test_parity.py, tests/test_cli.py) -----------------


def write_frames(name, frames, go, first_frame_id):
    """After `go`, write frames k = 1..frames, frame k holds k and frame_id first_frame_id + k."""
    s = torch_shmem.open(name)
    go.wait(30)
    for k in range(1, frames + 1):
        s.write(np.full(s.shape, k, dtype=s.dtype), frame_id=first_frame_id + k)
    s.close()


def write_on_event(name, go, value, frame_id):
    s = torch_shmem.open(name)
    go.wait(30)
    s.write(np.asarray(value, dtype=s.dtype), frame_id=frame_id)
    s.close()


def locked_many_loop(names, iterations, go, results):
    """Lock every stream of `names` (in the order given) `iterations` times; bump each."""
    handles = [torch_shmem.open(n) for n in names]
    go.wait(30)
    for _ in range(iterations):
        with torch_shmem.locked_many(handles, timeout=30) as got:
            assert [h.name for h in got] == list(names)
            for h in got:
                live = h.read(safe=False)
                h.write_locked(live + 1)
    results.put(("done", os.getpid()))
    for h in handles:
        h.close()


def write_view_then_fail(name, ready, frame_id):
    """Publish one frame in place, then start another and fail halfway through it."""
    s = torch_shmem.open(name)
    with s.write_view(frame_id=frame_id) as view:
        view[...] = 1
    try:
        with s.write_view() as view:
            view[: view.shape[0] // 2] = 99
            raise RuntimeError("producer failed mid-frame")
    except RuntimeError:
        pass
    ready.set()
    s.close()


def readonly_probe(name, results):
    """Open read-only and report what each mutating call raises."""
    s = torch_shmem.open(name, readonly=True)
    got = {"read": s.read().tolist(), "readonly": s.readonly}
    for label, call in [
        ("write", lambda: s.write(np.zeros(s.shape, s.dtype))),
        ("clear", s.clear),
        ("acquire", s.acquire),
        ("unsafe", lambda: s.read(safe=False)),
        ("write_view", lambda: s.write_view().__enter__()),
        ("unlink", s.unlink),
    ]:
        try:
            call()
            got[label] = "no error"
        except Exception as exc:
            got[label] = type(exc).__name__
    view = np.frombuffer(s._h, dtype=s.dtype)
    got["view_writeable"] = bool(view.flags.writeable)
    results.put(got)
    del view
    s.close()


def recreate(name, shape, results):
    """Create a new generation of `name` and leave it behind."""
    s = torch_shmem.create(name, shape=shape, dtype=np.float32)
    s.write(np.full(shape, 5, np.float32))
    results.put(s.instance_id)
    s.close()


def hold_open(name, ready):
    """Map the stream and wait to be killed (keeps it 'held')."""
    s = torch_shmem.open(name)
    ready.set()
    time.sleep(600)


ISOLATED = ["unshare", "-m", "--propagation", "private", "sh", "-c"]


def isolated_shm(code, timeout=120):
    """Run Python `code` with a private, empty /dev/shm (a tmpfs in a new mount namespace).

    Lets purge() and `torch-shmem purge` remove "every stream" without
    touching streams of other tests or sessions. Skips (with the reason)
    where unshare/mount are not permitted. Returns stdout.
    """
    import pytest

    probe = subprocess.run(ISOLATED + ["mount -t tmpfs tmpfs /dev/shm"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs unshare + mount (root or user namespaces) for a private /dev/shm: "
                    + probe.stderr.decode(errors="replace").strip())
    script = f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} -c \"$0\""
    out = subprocess.run(ISOLATED + [script, textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def slot_writer(name, n, min_seconds, ready, done, results):
    """Publish checksummed frames 1, 2, ... to a slotted stream for min_seconds."""
    s = torch_shmem.open(name)
    ready.wait(30)
    base = np.arange(n, dtype=np.uint64) * C
    buf = np.empty(n, dtype=np.uint64)
    end = time.monotonic() + min_seconds
    k = 0
    while time.monotonic() < end:
        k += 1
        np.bitwise_xor(base, np.uint64(k), out=buf)
        s.write(buf, frame_id=k)
    results.put(("writer", k))
    done.set()
    s.close()


def slot_reader(name, ready, done, results):
    """Read a slotted stream until the writer is done; verify every frame."""
    s = torch_shmem.open(name)
    ready.wait(30)
    t = FrameTally()
    mismatched_id = 0
    out = np.empty(s.shape, dtype=np.uint64)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        finished = done.is_set()
        pub = s.read_publication(out=out)
        k = t.add(out)
        if k > 0 and pub.frame_id != k:
            mismatched_id += 1
        if finished:
            break
    results.put(("reader", (t.reads, t.torn, t.regress, mismatched_id, t.last)))
    s.close()


def slot_reader_once(name):
    """Map a slotted stream, read it once, close it."""
    s = torch_shmem.open(name)
    s.read()
    s.close()


def paced_writes(name, count, gap, go):
    """Publish [k] for k = 1..count, `gap` seconds apart (0: back to back)."""
    s = torch_shmem.open(name)
    go.wait(60)
    for k in range(1, count + 1):
        if gap:
            time.sleep(gap)
        s.write(np.array([k], dtype=np.int64))
    s.close()


def wait_reader(name, mode, count, ready, results):
    """Read every publication up to value `count` through level-triggered waits
    (read_after, wait_for_count) under TORCH_SHMEM_WAIT_SPIN=mode; put the
    values seen (or the error) on `results`."""
    if mode is not None:
        os.environ["TORCH_SHMEM_WAIT_SPIN"] = mode  # read at the first wait
    s = torch_shmem.open(name)
    seen = []
    ready.set()
    try:
        after = 0
        while not seen or seen[-1] < count:
            if len(seen) % 2:
                got = int(s.read_after(after, timeout=10)[0])
                after = s.last_read_count
            else:
                after = s.wait_for_count(after=after, timeout=10)
                got = int(s.read()[0])
            seen.append(got)
        results.put(("ok", seen))
    except Exception as exc:  # reported to the test
        results.put(("error", f"{type(exc).__name__}: {exc}"))


def run_together(procs, ready, results, n):
    """Starts procs, releases them at once (ready), joins them (each must exit 0) and
    returns the n results they put."""
    for p in procs:
        p.start()
    time.sleep(0.5)
    ready.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return [results.get(timeout=10) for _ in range(n)]


def count_writer(name, n, min_seconds, ready, done, results):
    """Publish payloads filled with their own count (count + 1 at each write) for min_seconds."""
    s = torch_shmem.open(name)
    ready.wait(30)
    buf = np.empty(n, dtype=np.uint64)
    end = time.monotonic() + min_seconds
    k = s.count
    while time.monotonic() < end:
        k += 1
        buf.fill(k)
        s.write(buf, frame_id=k)
    results.put(("writer", k))
    done.set()
    s.close()


def count_reader(name, mode, ready, done, results):
    """Read until the writer is done (read / read_new / read_after); every payload must be
    uniform, equal to the count and frame_id read with it, and counts must never go back."""
    s = torch_shmem.open(name)
    ready.wait(30)
    out = np.empty(s.shape, dtype=np.uint64)
    reads = bad = regress = 0
    last = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        finished = done.is_set()
        try:
            if mode == "read":
                pub = s.read_publication(out=out)
            elif mode == "read_new":
                pub = s.read_new_publication(out=out, timeout=0.2)
            else:
                pub = s.read_after_publication(last, out=out, timeout=0.2)
        except TimeoutError:
            if finished:
                break
            continue
        reads += 1
        v = int(out.flat[0]) if out.size else pub.count
        if not (out == v).all() or v != pub.count or pub.frame_id != pub.count:
            bad += 1
        if pub.count < last:
            regress += 1
        last = pub.count
        if finished:
            break
    results.put(("reader", (reads, bad, regress, last)))
    s.close()


def hold_descriptors(name, n, ready):
    """Open `name` n times, take each handle's readiness descriptor, then wait
    to be killed."""
    handles = [torch_shmem.open(name) for _ in range(n)]
    for h in handles:
        h.fileno()
    ready.set()
    while True:
        time.sleep(1)
