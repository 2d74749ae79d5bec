"""Cross-process tests (spawn): torn reads, crash recovery, wake-ups, lifetime."""

import multiprocessing as mp
import random
import time

import numpy as np
import pytest

import _workers
import torch_shmem
from torch_shmem import InconsistentStreamError

pytestmark = pytest.mark.cpu

ctx = mp.get_context("spawn")


def join_all(procs, timeout=120):
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
            pytest.fail(f"process {p.name} did not finish in {timeout} s")
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"


def start(target, *args):
    p = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    return p


@pytest.mark.parametrize(
    "n,frames",
    [(1, 5000), (1024, 5000), (128 * 1024, 2000), (8 * 1024 * 1024, 60)],
    ids=["8B", "8KiB", "1MiB", "64MiB"],
)
def test_no_torn_reads_across_processes(name, n, frames):
    race_writer_and_readers(name, n, frames)


@pytest.mark.parametrize("slots", [1, 3])
def test_no_torn_reads_with_streaming_stores(name, slots, monkeypatch):
    """Writes from 4 KiB up with non-temporal stores (TORCH_SHMEM_STREAMING_COPY, read by
    the spawned writer): the stores must still land between the odd and the even seq (or
    generation), so 128 KiB frames, one payload or slots, are never read torn."""
    monkeypatch.setenv("TORCH_SHMEM_STREAMING_COPY", "4096")
    race_writer_and_readers(name, 16 * 1024, 3000, slots=slots)


def race_writer_and_readers(name, n, frames, slots=None):
    s = torch_shmem.create(name, shape=(n,), dtype=np.uint64, slots=slots)
    s.write(_workers.make_frame(0, n))  # a valid frame before the race starts
    ready, done = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    readers = [start(_workers.reader, name, ready, done, results) for _ in range(2)]
    writer = start(_workers.writer, name, n, frames, 1.0, ready, done, results)
    time.sleep(0.5)
    ready.set()
    join_all([writer] + readers)
    got = [results.get(timeout=10) for _ in range(3)]
    written = [v for kind, v in got if kind == "writer"][0]
    assert written >= frames
    for reads, torn, regress, last, missed in (v for kind, v in got if kind == "reader"):
        print(f"n={n} written={written} reads={reads} torn={torn} regress={regress} "
              f"last={last} missed={missed}")
        assert torn == 0 and regress == 0
        assert last == written  # the final read after the writer finished sees its last frame
        assert reads > 0
    assert s.count == written + 1
    assert _workers.frame_seq(s.read()) == written


def test_sigkill_while_holding_lock_recovers_at_once(name):
    s = torch_shmem.create(name, shape=(16,), dtype=np.float32)
    s.write(np.ones(16, np.float32))
    ready = ctx.Event()
    p = start(_workers.hold_lock_forever, name, ready)
    assert ready.wait(30)
    assert s.lock_owner == p.pid
    with pytest.raises(TimeoutError):
        s.acquire(timeout=0.05)
    p.kill()
    p.join(10)
    t0 = time.monotonic()
    s.acquire(timeout=5)
    waited = time.monotonic() - t0
    s.release()
    print(f"lock recovered {waited * 1e3:.2f} ms after the holder's death was reaped")
    assert waited < 0.5
    # the holder was not writing: the payload is intact
    assert s.read().tolist() == [1.0] * 16
    s.write(np.full(16, 2, np.float32))
    assert s.read().tolist() == [2.0] * 16


def test_sigkill_mid_write_never_returns_torn_data(name):
    n = 1 << 16
    s = torch_shmem.create(name, shape=(n,), dtype=np.uint64)
    s.write(_workers.make_frame(1, n))
    ready = ctx.Event()
    p = start(_workers.die_mid_write, name, ready)
    assert ready.wait(30)
    p.kill()
    p.join(10)
    r = torch_shmem.open(name)
    for handle in (r, s):
        with pytest.raises(InconsistentStreamError, match=name):
            handle.read()
    assert s.count == 1  # the dead write did not count
    t0 = time.monotonic()
    s.write(_workers.make_frame(2, n), timeout=5)  # repairs the stream
    assert time.monotonic() - t0 < 0.5
    assert _workers.frame_seq(r.read()) == 2
    assert s.count == 2


def test_sigkill_writer_at_random_points(name, seed):
    rng = random.Random(seed)
    n = 1 << 20  # 8 MiB payload: writes take long enough to be hit mid-copy
    s = torch_shmem.create(name, shape=(n,), dtype=np.uint64)
    s.write(_workers.make_frame(0, n))  # a valid frame even if the first writer dies early
    out = np.empty(n, np.uint64)
    stats = {"kills": 0, "good": 0, "inconsistent": 0}
    for i in range(8):
        ready = ctx.Event()
        p = start(_workers.write_loop, name, n, ready)
        assert ready.wait(30)
        time.sleep(rng.uniform(0.01, 0.2))
        p.kill()
        p.join(10)
        stats["kills"] += 1
        before = s.count
        try:
            k = _workers.frame_seq(s.read(out=out, timeout=5))
            assert k >= 0, "torn read"
            stats["good"] += 1
        except InconsistentStreamError:
            stats["inconsistent"] += 1
        s.write(_workers.make_frame(10**9 + i, n), timeout=5)
        assert s.count == before + 1
        assert _workers.frame_seq(s.read()) == 10**9 + i
    print(stats)


def test_sigkill_reader_mid_read_has_no_effect(name):
    n = 1 << 22
    s = torch_shmem.create(name, shape=(n,), dtype=np.uint64)
    s.write(_workers.make_frame(5, n))
    for _ in range(3):
        ready = ctx.Event()
        p = start(_workers.read_loop, name, ready)
        assert ready.wait(30)
        time.sleep(0.1)
        p.kill()
        p.join(10)
        s.write(_workers.make_frame(6, n), timeout=2)
        assert _workers.frame_seq(s.read(timeout=2)) == 6


def test_read_new_wakes_on_write_from_other_process(name):
    s = torch_shmem.create(name, shape=(3,), dtype=np.float64)
    p = start(_workers.write_after, name, 0.3, [1.0, 2.0, 3.0])
    t0 = time.monotonic()
    got = s.read_new(timeout=30)
    assert got.tolist() == [1.0, 2.0, 3.0]
    assert time.monotonic() - t0 >= 0.2
    join_all([p])


def test_stream_outlives_creator_and_no_resource_tracker(name):
    p = start(_workers.create_and_exit, name)
    join_all([p])
    r = torch_shmem.open(name)
    assert r.read().tolist() == [7, 8, 9]
    assert r.creator_pid == p.pid


def test_handles_pickle_to_children(name):
    s = torch_shmem.create(name, shape=(2,), dtype=np.int64)
    s.write(np.array([11, 12]))
    results = ctx.Queue()
    p = start(_workers.read_pickled, s, results)
    assert results.get(timeout=60) == [11, 12]
    join_all([p])


def test_forked_child_does_not_inherit_the_lock(name):
    import os

    s = torch_shmem.create(name, shape=(1,), dtype=np.int32)
    s.acquire()
    pid = os.fork()
    if pid == 0:  # child: must not believe it holds the parent's lock
        code = 1
        try:
            try:
                s.acquire(timeout=0.1)
                code = 2
            except TimeoutError:
                code = 0 if s.lock_owner == os.getppid() else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    s.release()
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("value", ["lots", "-1", "8MiB"])
def test_invalid_streaming_copy_setting_is_refused(name, value):
    """TORCH_SHMEM_STREAMING_COPY must be a byte count: anything else makes create() and
    open() raise ValueError naming the stream and the value, before any write starts."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, torch_shmem\n"
        "for call in (lambda: torch_shmem.create(NAME, shape=(1,)), lambda: torch_shmem.open(NAME)):\n"
        "    try:\n"
        "        call()\n"
        "        print('accepted')\n"
        "    except ValueError as exc:\n"
        "        print('ValueError', exc)\n"
    ).replace("NAME", repr(name))
    env = dict(os.environ, TORCH_SHMEM_STREAMING_COPY=value)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("ValueError") for line in lines), lines
    assert all(f"TORCH_SHMEM_STREAMING_COPY='{value}'" in line and name in line for line in lines)
    assert name not in torch_shmem.list_streams()
