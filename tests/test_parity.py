"""pyshmem 1.4 parity and beyond: module surface, publications, missed writes,
write views, discovery and cleanup, locked_many, async waits, DLPack.

Multi-process tests use the spawn context; helpers live in tests/_workers.py.
Tests that would remove streams they did not create either restrict the
scan to their own names or run in a private /dev/shm (see `isolated_shm`).
"""

import asyncio
import dataclasses
import inspect
import math
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import _workers
import torch_shmem
from torch_shmem import InconsistentStreamError, Publication, StaleStreamError, _admin, _proc

pytestmark = pytest.mark.cpu

ctx = mp.get_context("spawn")


def start(target, *args):
    p = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def join_ok(procs, timeout=60):
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
            pytest.fail(f"process {p.name} did not finish in {timeout} s")
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"


def until(predicate, timeout=10.0, what="condition"):
    """Wait for a condition of another thread/process that has no event to wait on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def dead_pid():
    """The pid of a process that has exited and been reaped."""
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    p.join(30)
    assert p.exitcode == 0
    return p.pid


async def async_until(predicate, timeout=10.0, what="condition"):
    """`until` for coroutines: yields to the event loop between polls."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


@pytest.fixture(params=["fd", "thread"])
def async_mode(request, monkeypatch):
    """Both ways async waits are made: on a readiness descriptor in the event loop
    (the default), and in worker threads parked on the futex (the fallback)."""
    monkeypatch.setenv("TORCH_SHMEM_ASYNC_WAIT", request.param)
    return request.param


def pending_waits(s):
    """Waits pending on handle `s`: parked on its futex (threads, blocking calls)
    plus those registered on its readiness descriptors (async, fd mode)."""
    return s._h.state().waiters + sum(len(w.waits) for w in s._watches.values())


def only_names(monkeypatch, *names):
    """Restrict discovery to `names` so the test never touches other streams."""
    real = _admin._candidate_names
    monkeypatch.setattr(_admin, "_candidate_names", lambda: [n for n in real() if n in names])


# --------------------------------------------------------------- module surface

PYSHMEM_14_MODULE = {
    # name -> keyword-only parameters pyshmem 1.4 accepts
    "create": {"shape", "dtype", "size", "gpu_device", "cpu_mirror", "auto_unlink", "notify"},
    "open": {"gpu_device", "readonly"},
    "unlink": set(),
    "unlink_quiet": set(),
    "list_streams": set(),
    "stat": set(),
    "purge": {"include_cuda_orphans"},
    "stream": {"shape", "dtype", "size", "gpu_device", "cpu_mirror"},
    "locked_many": {"timeout", "poll_interval"},
    "gpu_available": set(),
}

PYSHMEM_14_METHODS = {
    "acquire": {"timeout", "poll_interval"},
    "release": set(),
    "locked": {"timeout", "poll_interval"},
    "close": {"timeout"},
    "unlink": set(),
    "delete": set(),
    "clear": set(),
    "write": {"frame_id"},
    "read": {"safe", "poll_interval", "out", "timeout"},
    "read_publication": {"safe", "poll_interval", "out", "timeout"},
    "read_new": {"timeout", "safe", "poll_interval", "out"},
    "read_new_publication": {"timeout", "safe", "poll_interval", "out"},
    "wait_for_count": {"after", "timeout", "poll_interval"},
    "read_after": {"timeout", "safe", "poll_interval", "out"},
    "read_after_publication": {"timeout", "safe", "poll_interval", "out"},
    "write_locked": {"frame_id"},
    "write_view": {"timeout", "frame_id"},
    "write_view_locked": {"frame_id"},
    "read_new_async": {"timeout", "safe", "poll_interval", "out"},
    "is_stale": set(),
    "producer_alive": set(),
    "describe": set(),
    "to_config": set(),
    "create_from_config": set(),
    "__dlpack__": {"stream"},
    "__dlpack_device__": set(),
}

PYSHMEM_14_ATTRIBUTES = [
    "name", "shape", "dtype", "size", "gpu_device", "gpu_enabled", "cpu_mirror", "owner",
    "readonly", "instance_id", "notify", "count", "last_read_count", "missed_writes",
    "total_missed_writes", "write_time", "write_sequence", "frame_id", "creator_pid", "age",
]


def _keywords(fn):
    return {
        p.name for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in ("self", "name")
    }


@pytest.mark.parametrize("fn", sorted(PYSHMEM_14_MODULE))
def test_module_functions_accept_pyshmem_keywords(fn):
    assert callable(getattr(torch_shmem, fn))
    missing = PYSHMEM_14_MODULE[fn] - _keywords(getattr(torch_shmem, fn))
    assert not missing, f"torch_shmem.{fn} lacks pyshmem keywords {missing}"


@pytest.mark.parametrize("method", sorted(PYSHMEM_14_METHODS))
def test_methods_accept_pyshmem_keywords(method):
    fn = getattr(torch_shmem.SharedMemory, method)
    missing = PYSHMEM_14_METHODS[method] - _keywords(fn)
    assert not missing, f"SharedMemory.{method} lacks pyshmem keywords {missing}"


def test_handle_attributes_and_exports(name):
    for export in ("InconsistentStreamError", "StaleStreamError", "Publication", "SharedMemory",
                   "__version__"):
        assert hasattr(torch_shmem, export)
    assert issubclass(InconsistentStreamError, RuntimeError)
    assert issubclass(StaleStreamError, RuntimeError)
    s = torch_shmem.create(name, shape=(3, 3))
    for attr in PYSHMEM_14_ATTRIBUTES:
        getattr(s, attr)
    assert s.notify is False  # as created; waits are futex-based either way
    assert repr(s) == f"SharedMemory(name={name!r}, shape=(3, 3), dtype='float32', gpu_device=None)"


def test_publication_is_a_frozen_dataclass():
    fields = [f.name for f in dataclasses.fields(Publication)]
    assert fields == ["payload", "count", "frame_id", "write_time", "missed_publications"]
    pub = Publication(np.zeros(2), 1, 2, 3.0, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pub.count = 5


def _python(code, timeout=120):
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_gpu_supported_dtypes_is_lazy():
    pytest.importorskip("torch", reason="needs torch to compute the GPU dtypes")
    out = _python("""
        import sys
        import numpy as np
        import torch_shmem
        from torch_shmem import *
        assert "torch" not in sys.modules, "import torch_shmem (or *) imported torch"
        assert "asyncio" not in sys.modules, "asyncio is for async users only (import cost)"
        dtypes = torch_shmem.GPU_SUPPORTED_DTYPES
        assert "torch" in sys.modules
        assert isinstance(dtypes, frozenset)
        assert np.dtype(np.float32) in dtypes and np.dtype(np.int64) in dtypes
        assert torch_shmem.GPU_SUPPORTED_DTYPES is dtypes  # computed once
        print("ok")
    """)
    assert out.strip() == "ok"


def test_gpu_supported_dtypes_empty_without_torch():
    out = _python("""
        import sys
        sys.modules["torch"] = None  # makes torch uninstallable for this process
        import torch_shmem
        assert torch_shmem.GPU_SUPPORTED_DTYPES == frozenset()
        assert torch_shmem.gpu_available() is False
        print("ok")
    """)
    assert out.strip() == "ok"


def test_a_pyshmem_program_runs_unchanged(name):
    # written against pyshmem 1.4's documented API, only the import differs
    out = _python(f"""
        import numpy as np
        import torch_shmem as pyshmem

        name = {name!r}
        with pyshmem.stream(name, shape=(2, 3), dtype=np.float32) as producer:
            consumer = pyshmem.open(name, readonly=True)
            assert name in pyshmem.list_streams()
            info = pyshmem.stat(name)
            assert info["shape"] == [2, 3] and info["dtype"] == "float32"
            producer.write(np.ones((2, 3), np.float32), frame_id=1)
            assert consumer.read().sum() == 6 and consumer.frame_id == 1
            with producer.locked(timeout=1.0, poll_interval=1e-3):
                producer.read(safe=False)[0, 0] = 5
                producer.write_locked(producer.read(safe=False).copy(), frame_id=2)
            pub = consumer.read_publication()
            assert (pub.count, pub.frame_id, pub.payload[0, 0]) == (2, 2, 5)
            n = consumer.count
            with producer.write_view(frame_id=3) as view:
                view[...] = 7
            assert consumer.read_after(n, timeout=1.0, poll_interval=1e-5)[1, 2] == 7
            assert consumer.wait_for_count(after=n, timeout=1.0) == 3
            try:
                consumer.read_new(timeout=0.01)
            except TimeoutError:
                pass
            with pyshmem.locked_many([producer], timeout=1.0) as (p,):
                p.write_locked(np.zeros((2, 3), np.float32))
            assert consumer.missed_writes == 0 and consumer.total_missed_writes >= 0
            assert not consumer.is_stale(60.0) and consumer.producer_alive()
            assert "name:" in consumer.describe()
            try:
                consumer.write(np.zeros((2, 3), np.float32))
            except PermissionError:
                pass
            consumer.close()
        assert name not in pyshmem.list_streams()
        pyshmem.unlink_quiet(name)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_unknown_module_attribute_raises():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        torch_shmem.nope  # noqa: B018


# ------------------------------------------------------------- lifecycle sugar

def test_create_context_manager_closes_or_unlinks(name):
    with torch_shmem.create(name, shape=(2,)) as s:
        s.write([1, 2])
    assert s.closed
    assert name in _admin._candidate_names()  # closed, not destroyed
    torch_shmem.unlink(name)
    with torch_shmem.create(name, shape=(2,), auto_unlink=True, notify=True) as s:
        assert torch_shmem.stat(name)["notify"] is True
    with pytest.raises(FileNotFoundError, match=name):
        torch_shmem.open(name)


def test_stream_helper_unlinks_on_exit_and_on_exception(name):
    with torch_shmem.stream(name, shape=(2,), dtype=np.int16) as s:
        s.write([3, 4])
        assert torch_shmem.open(name).read().tolist() == [3, 4]
    with pytest.raises(FileNotFoundError):
        torch_shmem.open(name)
    with pytest.raises(KeyError):
        with torch_shmem.stream(name, shape=(2,)):
            raise KeyError("boom")
    with pytest.raises(FileNotFoundError):
        torch_shmem.open(name)


def test_unlink_quiet(name):
    torch_shmem.unlink_quiet(name)  # missing: no error
    torch_shmem.create(name, shape=(1,)).close()
    torch_shmem.unlink_quiet(name)
    with pytest.raises(FileNotFoundError):
        torch_shmem.open(name)


def test_config_round_trip_describe(name):
    s = torch_shmem.create(name, shape=(2, 5), dtype="int32", notify=True)
    cfg = s.to_config()
    assert cfg == {"name": name, "shape": [2, 5], "dtype": "int32", "gpu_device": None,
                   "cpu_mirror": True, "notify": True, "slots": 3}
    s.unlink()
    t = torch_shmem.SharedMemory.create_from_config(cfg)
    assert (t.shape, t.dtype, t.owner) == ((2, 5), np.dtype(np.int32), True)
    t.write(np.ones((2, 5), np.int32), frame_id=77)
    text = t.describe()
    # pyshmem 1.4's lines first, in its order and layout, then ours
    labels = [line.split(":")[0] for line in text.splitlines()]
    assert labels == ["name", "shape", "dtype", "size", "gpu_enabled", "gpu_device", "cpu_mirror",
                      "count", "write_time", "write_seq", "owner", "readonly", "creator_pid",
                      "producer", "age", "notify", "state", "last write", "frame_id", "lock",
                      "waiters", "instance_id", "slots", "reads"], text
    # every value starts at column 14, as pyshmem prints them
    assert all(line[13] == " " and line[14] != " " for line in text.splitlines()), text
    values = dict(line.split(":", 1) for line in text.splitlines())
    assert {k: v.strip() for k, v in values.items() if k in (
        "name", "shape", "dtype", "size", "gpu_enabled", "gpu_device", "cpu_mirror", "count",
        "write_seq", "owner", "readonly", "creator_pid", "producer", "notify", "frame_id", "lock",
        "waiters")} == {
        "name": name, "shape": "(2, 5)", "dtype": "int32", "size": "40 bytes",
        "gpu_enabled": "False", "gpu_device": "None", "cpu_mirror": "True", "count": "1",
        "write_seq": "2", "owner": "True", "readonly": "False", "creator_pid": str(os.getpid()),
        "producer": "alive", "notify": "True", "frame_id": "77", "lock": "free", "waiters": "0"}
    assert float(values["write_time"]) == pytest.approx(t.write_time)
    assert values["age"].strip().endswith(" s") and float(values["age"].split()[0]) < 60
    with t.locked():
        assert f"lock:         held by pid {os.getpid()}" in t.describe()
    with torch_shmem.open(name) as reader:  # a second handle: not the owner; before any write
        assert "owner:        False" in reader.describe()
    with pytest.raises(FileExistsError, match="torch_shmem.open"):
        torch_shmem.SharedMemory.create_from_config(cfg)


def test_age_is_stale_and_producer_alive(name):
    s = torch_shmem.create(name, shape=(1,))
    assert s.age == math.inf and s.is_stale(1000.0)
    s.write([1.0])
    assert 0 <= s.age < 5 and not s.is_stale(60.0)
    with pytest.raises(ValueError, match=name):
        s.is_stale(0)
    assert s.producer_alive()


def test_pid_alive_detects_exit_and_recycling():
    assert _proc.pid_alive(os.getpid())
    assert _proc.pid_alive(os.getpid(), created_at=time.time())
    # a stream "created" an hour before this process started cannot be ours:
    # the recorded creator pid was recycled
    started = _proc.process_start_time(os.getpid())
    assert started is not None and abs(started - time.time()) < 24 * 3600
    assert not _proc.pid_alive(os.getpid(), created_at=started - 3600)
    assert not _proc.pid_alive(dead_pid())
    assert not _proc.pid_alive(0) and not _proc.pid_alive(-1)


def test_producer_alive_false_after_creator_exits(name):
    p = start(_workers.create_and_exit, name)
    join_ok([p])
    r = torch_shmem.open(name)
    assert r.creator_pid == p.pid
    assert not r.producer_alive()
    assert r.read().tolist() == [7, 8, 9]


# ------------------------------------------------ frame_id, publications, missed

def test_frame_id_full_range_sticky_and_validated(name):
    s = torch_shmem.create(name, shape=(2,))
    for fid in (0, 1, 2**63, 2**64 - 1):
        s.write([1, 2], frame_id=fid)
        assert s.frame_id == fid
        assert s.read_publication().frame_id == fid
    s.write([1, 2])
    assert s.frame_id == 2**64 - 1
    for bad in (-1, 2**64, 1.5):
        with pytest.raises(ValueError, match=name):
            s.write(np.ones(2, np.float32), frame_id=bad)
        with pytest.raises(ValueError, match=name):
            s.write_view(frame_id=bad)


def test_missed_writes_are_exact(name):
    s = torch_shmem.create(name, shape=(1,), dtype=np.int64)
    r = torch_shmem.open(name)
    for k in range(1, 4):
        s.write([k])
    assert r.read().tolist() == [3]
    assert (r.last_read_count, r.missed_writes, r.total_missed_writes) == (3, 2, 2)
    s.write([4])
    pub = r.read_publication()
    assert (pub.count, pub.missed_publications, pub.payload.tolist()) == (4, 0, [4])
    for k in range(5, 10):
        s.write([k])
    pub = r.read_publication()
    assert (pub.count, pub.missed_publications) == (9, 4)
    assert (r.missed_writes, r.total_missed_writes) == (4, 6)


def test_read_publication_matches_payload_under_a_racing_writer(name):
    # payload[0] == frame_id == count for every write: a publication whose
    # metadata came from another write than its payload is caught
    s = torch_shmem.create(name, shape=(256,), dtype=np.uint64)
    r = torch_shmem.open(name)
    s.write(np.zeros(256, np.uint64), frame_id=1)  # count 1
    stop = threading.Event()

    def writer():
        k = 1
        while not stop.is_set():
            k += 1
            s.write(np.full(256, k, np.uint64), frame_id=k)

    t = threading.Thread(target=writer)
    t.start()
    try:
        checked = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            pub = r.read_publication()
            if pub.count > 1:
                assert pub.payload[0] == pub.frame_id == pub.count
                assert (pub.payload == pub.payload[0]).all()
                checked += 1
    finally:
        stop.set()
        t.join(10)
    assert checked > 100


def test_read_publication_out_and_unsafe(name):
    s = torch_shmem.create(name, shape=(3,), dtype=np.float64)
    s.write([1, 2, 3], frame_id=5)
    out = np.empty(3)
    pub = s.read_publication(out=out)
    assert pub.payload is out and out.tolist() == [1, 2, 3]
    with pytest.raises(RuntimeError, match="requires the lock"):
        s.read_publication(safe=False)
    with s.locked():
        pub = s.read_publication(safe=False)
        assert pub.payload.tolist() == [1, 2, 3] and pub.frame_id == 5 and pub.count == 1
        assert np.shares_memory(pub.payload, s.read(safe=False))


def test_frame_ids_and_missed_counts_across_processes(name):
    frames = 500
    s = torch_shmem.create(name, shape=(4,), dtype=np.int64)
    r = torch_shmem.open(name)
    go = ctx.Event()
    p = start(_workers.write_frames, name, frames, go, 2**64 - 1 - frames)
    go.set()
    last = 0
    seen = 0
    while last < frames:
        # level-triggered: a write that lands between two calls is not lost
        pub = r.read_after_publication(r.last_read_count, timeout=30)
        k = int(pub.payload[0])
        assert (pub.payload == k).all()
        assert pub.count == k and pub.frame_id == 2**64 - 1 - frames + k
        assert pub.missed_publications == k - last - 1
        last = k
        seen += 1
    join_ok([p])
    assert r.frame_id == 2**64 - 1  # the largest uint64 crossed processes intact
    assert r.total_missed_writes == frames - seen
    assert s.count == frames


# --------------------------------------------------------------- level-triggered

def test_read_after_is_level_triggered(name):
    s = torch_shmem.create(name, shape=(1,), dtype=np.int32)
    s.write([1])
    s.write([2])
    assert s.read_after(0, timeout=0).tolist() == [2]  # already there: no wait
    assert s.read_after_publication(1, timeout=0).count == 2
    with pytest.raises(TimeoutError, match=rf"{name}.*count 2"):
        s.read_after(2, timeout=0.05)
    with pytest.raises(ValueError, match=name):
        s.read_after(-1)
    with pytest.raises(ValueError, match=name):
        s.read_after("3")
    threading.Timer(0.05, s.write, args=([3],)).start()
    assert s.read_after(2, timeout=10).tolist() == [3]
    assert s.wait_for_count(after=2, timeout=0) == 3


def test_request_reply_with_read_after_never_misses_a_fast_reply(name):
    req = torch_shmem.create(name, shape=(1,), dtype=np.int64)
    rep_name = name + "-reply"
    rep = torch_shmem.create(rep_name, shape=(1,), dtype=np.int64)
    try:
        def server():
            seen = 0
            for _ in range(200):
                value = req.read_after(seen, timeout=10)
                seen = req.last_read_count
                rep.write(value * 2)

        t = threading.Thread(target=server)
        t.start()
        for i in range(200):
            n = rep.count
            req.write([i])
            assert rep.read_after(n, timeout=10).tolist() == [2 * i]
        t.join(10)
    finally:
        rep.unlink()


# ------------------------------------------------------------- write_locked/view

def test_write_locked_requires_the_lock(name):
    s = torch_shmem.create(name, shape=(2,))
    with pytest.raises(RuntimeError, match=rf"{name}.*write_locked\(\) requires the lock"):
        s.write_locked([1, 2])
    with s.locked():
        s.write_locked([1, 2], frame_id=3)
        s.write_locked(np.array([3, 4], np.float64))  # slow path, still under the lock
    assert s.count == 2 and s.frame_id == 3 and s.read().tolist() == [3, 4]


def test_write_view_publishes_in_place(name):
    s = torch_shmem.create(name, shape=(4,), dtype=np.int32)
    r = torch_shmem.open(name)
    seen = []

    def read_in_other_thread():
        try:
            seen.append(r.read(timeout=0.05))
        except TimeoutError as exc:
            seen.append(exc)

    with s.write_view(frame_id=9) as view:
        assert isinstance(view, np.ndarray) and view.shape == (4,) and view.flags.writeable
        view[:2] = [1, 2]
        assert s.count == 0  # not published until the block ends
        t = threading.Thread(target=read_in_other_thread)
        t.start()
        t.join(10)
        view[2:] = [3, 4]
    # the reader waited for the commit (here: until its timeout), never saw [1, 2, 0, 0]
    assert len(seen) == 1 and isinstance(seen[0], TimeoutError), seen
    pub = r.read_publication()
    assert pub.payload.tolist() == [1, 2, 3, 4] and pub.count == 1 and pub.frame_id == 9
    with s.locked():
        with s.write_view_locked() as view:
            view[0] = 10
        assert s.lock_owner == os.getpid()  # write_view_locked leaves the lock alone
    assert s.lock_owner is None
    assert r.read().tolist() == [10, 2, 3, 4] and r.frame_id == 9 and s.count == 2


def test_write_view_wakes_waiters(name):
    s = torch_shmem.create(name, shape=(1,))
    got = []
    t = threading.Thread(target=lambda: got.append(s.read_new(timeout=10).tolist()))
    t.start()
    until(lambda: s._h.state()[7] > 0, what="the reader to park")
    with s.write_view() as view:
        view[0] = 5
    t.join(10)
    assert got == [[5.0]]


def test_write_view_exception_marks_inconsistent_until_next_write(name):
    s = torch_shmem.create(name, shape=(8,), dtype=np.int64)
    r = torch_shmem.open(name)
    s.write(np.zeros(8, np.int64))
    with pytest.raises(ZeroDivisionError):
        with s.write_view(frame_id=3) as view:
            view[:4] = 7
            1 / 0
    assert s.lock_owner is None  # the lock was released
    assert s.count == 1
    for reader in (r, s):
        with pytest.raises(InconsistentStreamError, match=name):
            reader.read()
        with pytest.raises(InconsistentStreamError, match=name):
            reader.read_publication()
    assert torch_shmem.stat(name)["state"] == "inconsistent"
    s.write(np.arange(8))
    assert r.read().tolist() == list(range(8)) and s.count == 2
    assert torch_shmem.stat(name)["state"] == "ok"
    # a failing write_view_locked inside a lock scope aborts too
    with s.locked():
        with pytest.raises(ValueError):
            with s.write_view_locked() as view:
                raise ValueError
    with pytest.raises(InconsistentStreamError):
        r.read()
    with s.write_view() as view:  # an in-place write repairs as well
        view[:] = 1
    assert r.read().tolist() == [1] * 8


def test_write_view_misuse(name):
    s = torch_shmem.create(name, shape=(2,))
    with pytest.raises(RuntimeError, match=rf"{name}.*requires the lock"):
        with s.write_view_locked():
            pass
    with s.write_view():
        with pytest.raises(RuntimeError, match="do not nest"):
            with s.write_view():
                pass
    assert s.read().tolist() == [0, 0] and s.count == 1
    with pytest.raises(RuntimeError, match="published inside a write view"):
        with s.write_view() as view:
            view[:] = 1
            s.write([2, 2])  # re-entrant lock: would end the in-progress window early
    with pytest.raises(InconsistentStreamError):
        s.read()
    s.write([3, 3])
    assert s.read().tolist() == [3, 3]


def test_write_view_failure_and_repair_across_processes(name):
    n = 1024
    s = torch_shmem.create(name, shape=(n,), dtype=np.int32)
    ready = ctx.Event()
    p = start(_workers.write_view_then_fail, name, ready, 41)
    assert ready.wait(30)
    join_ok([p])
    assert s.count == 1 and s.frame_id == 41
    with pytest.raises(InconsistentStreamError, match=name):
        s.read()
    with pytest.raises(InconsistentStreamError):
        s.read_after(0, timeout=5)
    s.write(np.full(n, 2, np.int32), frame_id=42)
    pub = s.read_publication()
    assert (pub.payload == 2).all() and pub.count == 2 and pub.frame_id == 42


# ------------------------------------------------------------------- readonly

def test_readonly_handle_refuses_every_mutation(name):
    s = torch_shmem.create(name, shape=(3,))
    s.write([1, 2, 3])
    r = torch_shmem.open(name, readonly=True)
    assert r.readonly and not s.readonly
    for call in (lambda: r.write([0, 0, 0]), r.clear, r.acquire, lambda: r.read(safe=False),
                 lambda: r.write_view().__enter__(), lambda: r.write_locked([1, 1, 1]),
                 r.unlink, lambda: r.read_publication(safe=False)):
        with pytest.raises(PermissionError, match=name):
            call()
    view = np.frombuffer(r._h, dtype=np.float32)
    assert not view.flags.writeable
    with pytest.raises(ValueError):
        view[0] = 5  # the mapping itself is read-only
    del view
    assert r.read().tolist() == [1, 2, 3] and r.read_publication().count == 1
    assert np.from_dlpack(r).tolist() == [1, 2, 3]


def test_readonly_handle_in_another_process(name):
    s = torch_shmem.create(name, shape=(2,), dtype=np.int64)
    s.write([5, 6])
    results = ctx.Queue()
    p = start(_workers.readonly_probe, name, results)
    got = results.get(timeout=60)
    join_ok([p])
    assert got == {"read": [5, 6], "readonly": True, "write": "PermissionError",
                   "clear": "PermissionError", "acquire": "PermissionError",
                   "unsafe": "PermissionError", "write_view": "PermissionError",
                   "unlink": "PermissionError", "view_writeable": False}
    assert s.read().tolist() == [5, 6] and s.count == 1


# --------------------------------------------------------------- generations

def test_stale_generation_unlink_leaves_new_stream_alone(name):
    old = torch_shmem.create(name, shape=(2,))
    other = torch_shmem.open(name)
    torch_shmem.unlink(name)
    results = ctx.Queue()
    p = start(_workers.recreate, name, (3,), results)
    new_id = results.get(timeout=60)
    join_ok([p])
    assert new_id != old.instance_id and len(new_id) == 32
    with pytest.raises(StaleStreamError, match=rf"torch_shmem: stream '{name}'.*newer generation"):
        other.unlink()
    with pytest.raises(StaleStreamError, match="newer generation"):
        old.unlink()
    fresh = torch_shmem.open(name)
    assert fresh.instance_id == new_id and fresh.shape == (3,) and fresh.read().tolist() == [5] * 3
    assert torch_shmem.stat(name)["instance_id"] == new_id


# ------------------------------------------------------------------ locked_many

def test_locked_many_order_duplicates_and_timeout(name):
    a = torch_shmem.create(name + "-b", shape=(1,))
    b = torch_shmem.create(name + "-a", shape=(1,))
    try:
        with torch_shmem.locked_many([a, b]) as got:
            assert got == (a, b) and isinstance(got, tuple)
            assert a.lock_owner == b.lock_owner == os.getpid()
            a.write_locked([1.0])
        assert a.lock_owner is None and b.lock_owner is None
        with pytest.raises(ValueError, match="twice"):
            with torch_shmem.locked_many([a, a]):
                pass
        with pytest.raises(ValueError, match="twice"):
            with torch_shmem.locked_many([a, torch_shmem.open(a.name)]):
                pass
        with pytest.raises(TypeError, match="SharedMemory"):
            with torch_shmem.locked_many([a, object()]):
                pass
        # b sorts first: when a is busy, b must be released again
        ready, done = threading.Event(), threading.Event()

        def hold_a():
            with a.locked():
                ready.set()
                done.wait(30)

        t = threading.Thread(target=hold_a)
        t.start()
        assert ready.wait(10)
        with pytest.raises(TimeoutError, match=a.name):
            with torch_shmem.locked_many([a, b], timeout=0.05):
                pass
        assert b.lock_owner is None
        done.set()
        t.join(10)
    finally:
        a.unlink()
        b.unlink()


@pytest.mark.parametrize("streams", [2, 4])
def test_locked_many_opposite_orders_across_processes_do_not_deadlock(name, streams):
    names = [f"{name}-{i}" for i in range(streams)]
    handles = [torch_shmem.create(n, shape=(1,), dtype=np.int64) for n in names]
    try:
        go = ctx.Event()
        results = ctx.Queue()
        iterations = 300
        procs = [start(_workers.locked_many_loop, names, iterations, go, results),
                 start(_workers.locked_many_loop, names[::-1], iterations, go, results)]
        go.set()
        join_ok(procs, timeout=120)
        assert sorted(results.get(timeout=10)[0] for _ in procs) == ["done", "done"]
        for h in handles:  # every increment happened under both locks
            assert h.read().tolist() == [2 * iterations]
            assert h.count == 2 * iterations
    finally:
        for h in handles:
            h.unlink()


# ---------------------------------------------------------------------- async

def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_async_waits_do_not_block_the_event_loop(name, async_mode):
    s = torch_shmem.create(name, shape=(2,), dtype=np.int32)
    go = ctx.Event()
    p = start(_workers.write_on_event, name, go, [4, 5], 8)

    async def main():
        ticks = 0
        parked = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1
                if pending_waits(s) > 0:  # the wait is pending
                    parked.set()

        tk = asyncio.create_task(ticker())
        reader = asyncio.create_task(s.read_new_publication_async(timeout=30))
        await parked.wait()
        before = ticks
        await asyncio.sleep(0.05)
        assert ticks > before + 5, "the event loop stalled while a read was waiting"
        go.set()
        pub = await reader
        tk.cancel()
        return pub

    pub = _run(main())
    join_ok([p])
    assert pub.payload.tolist() == [4, 5] and pub.count == 1 and pub.frame_id == 8


def test_async_variants(name, async_mode):
    s = torch_shmem.create(name, shape=(1,), dtype=np.int64)

    async def main():
        s.write([1])
        assert (await s.read_after_async(0, timeout=1)).tolist() == [1]  # level: already there
        assert (await s.read_after_publication_async(0)).count == 1
        assert await s.wait_for_count_async(after=0) == 1
        out = np.empty(1, np.int64)
        task = asyncio.create_task(s.read_new_async(out=out, timeout=10))
        await async_until(lambda: pending_waits(s) > 0, what="the wait to be pending")
        s.write([2])
        assert (await task) is out and out.tolist() == [2]
        task = asyncio.create_task(s.wait_for_count_async(after=2, timeout=10))
        await asyncio.sleep(0)
        s.write([3])
        assert await task == 3
        with pytest.raises(TimeoutError, match=rf"{name}.*timed out after 0.05 s"):
            await s.read_new_async(timeout=0.05)
        with pytest.raises(TimeoutError):
            await s.read_after_async(3, timeout=0)
        with pytest.raises(ValueError, match="safe reads only"):
            await s.read_new_async(safe=False)
        with pytest.raises(ValueError, match=name):
            await s.read_after_async(-2)

    _run(main())


def test_async_cancellation_reads_nothing(name, async_mode):
    s = torch_shmem.create(name, shape=(3,), dtype=np.int64)

    async def main():
        out = np.zeros(3, np.int64)
        task = asyncio.create_task(s.read_new_async(out=out))
        await async_until(lambda: pending_waits(s) > 0, what="the wait to be pending")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        s.write([1, 2, 3])
        # the worker wakes for this write, sees the cancellation and stops:
        # no read is recorded and `out` is untouched
        await async_until(lambda: pending_waits(s) == 0, what="the wait to leave")
        return out

    out = _run(main())
    assert out.tolist() == [0, 0, 0]
    assert s.last_read_count == 0
    with pytest.raises(asyncio.TimeoutError):
        _run(asyncio.wait_for(s.read_new_async(), 0.05))


def test_close_wakes_blocked_coroutines_and_threads(name, async_mode):
    s = torch_shmem.create(name, shape=(1,))
    r = torch_shmem.open(name)
    errors = []

    def blocked(call):
        try:
            call()
        except RuntimeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=blocked, args=(c,)) for c in (
        lambda: r.read_new(),
        lambda: r.read_after(5),
        lambda: r.wait_for_count(after=5),
        lambda: r.read_new_publication(),
        lambda: r.read_after_publication(5),
    )]
    for t in threads:
        t.start()

    async def main():
        tasks = [asyncio.create_task(c) for c in (
            r.read_new_async(), r.wait_for_count_async(after=5), r.read_after_async(5),
            r.read_new_publication_async(), r.read_after_publication_async(5),
        )]
        await async_until(lambda: pending_waits(r) >= len(threads) + len(tasks),
                          what="every waiter to park")
        t0 = time.monotonic()
        r.close()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, time.monotonic() - t0

    results, waited = _run(main())
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    assert len(errors) == len(threads)
    assert all(name in e and "closed" in e for e in errors), errors
    assert all(isinstance(e, RuntimeError) and "closed" in str(e) and name in str(e)
               for e in results), results
    assert waited < 2.0
    # other handles are unaffected
    s.write([1.0])
    assert s.read().tolist() == [1.0]


# --------------------------------------------------------------------- DLPack

def test_dlpack_snapshot_export(name):
    s = torch_shmem.create(name, shape=(2, 3), dtype=np.float64)
    s.write(np.arange(6.0).reshape(2, 3))
    assert s.__dlpack_device__() == (1, 0)
    a = np.from_dlpack(s)
    assert a.tolist() == [[0, 1, 2], [3, 4, 5]]
    s.write(np.zeros((2, 3)))
    assert a.tolist() == [[0, 1, 2], [3, 4, 5]]  # a snapshot, not a live view
    s.close()
    assert a.sum() == 15  # owned by the capsule, valid after close


def test_dlpack_into_torch(name):
    torch = pytest.importorskip("torch", reason="torch.from_dlpack needs torch")
    s = torch_shmem.create(name, shape=(4,), dtype=np.int32)
    s.write([1, 2, 3, 4])
    t = torch.from_dlpack(s)
    assert t.dtype == torch.int32 and t.tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------- discovery, cleanup

def test_list_streams_sorted_non_ascii_valid_only(name):
    names = [name + "-z", name + "-ünïcødé 名前", name + "-a b"]
    for n in names:
        torch_shmem.create(n, shape=(1,)).close()
    junk = name + "-junk"
    with open(f"/dev/shm/torch_shmem.{junk}", "wb") as f:  # our prefix, not a stream
        f.write(b"\x01" * 4096)
    other = f"/dev/shm/{name}-no-prefix"
    with open(other, "wb") as f:
        f.write(b"x")
    internal = f"/dev/shm/torch_shmem-simdev.{name}-z"  # an internal segment, not a stream
    with open(internal, "wb") as f:
        f.write(b"\0" * 4096)
    try:
        listed = torch_shmem.list_streams()
        assert listed == sorted(listed)
        mine = [n for n in listed if n.startswith(name)]
        assert mine == sorted(names)
        assert junk not in listed and f"{name}-no-prefix" not in listed
    finally:
        for n in names:
            torch_shmem.unlink(n)
        os.unlink(f"/dev/shm/torch_shmem.{junk}")
        os.unlink(other)
        os.unlink(internal)
    assert not [n for n in torch_shmem.list_streams() if n.startswith(name)]


def test_stat_reports_metadata_without_attaching(name):
    with pytest.raises(FileNotFoundError, match=rf"torch_shmem: stream '{name}' does not exist"):
        torch_shmem.stat(name)
    s = torch_shmem.create(name, shape=(2, 3), dtype=np.uint16, mode=0o640)
    info = torch_shmem.stat(name)
    assert info["name"] == name and info["shape"] == [2, 3] and info["dtype"] == "uint16"
    assert info["size"] == 12 and info["gpu_enabled"] is False and info["gpu_device"] is None
    assert info["creator_pid"] == os.getpid() and info["creator_alive"] is True
    assert info["count"] == 0 and info["age"] == math.inf and info["write_time"] == 0.0
    assert info["instance_id"] == s.instance_id and info["mode"] == 0o640
    assert info["notify"] is False and info["state"] == "ok" and info["lock_owner"] is None
    s.write(np.ones((2, 3), np.uint16), frame_id=12)
    with s.locked():
        info = torch_shmem.stat(name)
    assert info["count"] == 1 and info["frame_id"] == 12 and 0 <= info["age"] < 5
    assert info["lock_owner"] == os.getpid() and info["lock_owner_alive"] is True
    with pytest.raises(TypeError):
        torch_shmem.stat(3)


def test_orphans_are_streams_with_a_dead_creator_that_nobody_maps(name, monkeypatch):
    orphan, held, live = name + "-orphan", name + "-held", name + "-live"
    only_names(monkeypatch, orphan, held, live)
    for n in (orphan, held):
        p = start(_workers.create_and_exit, n)
        join_ok([p])
    torch_shmem.create(live, shape=(1,)).close()  # creator (this process) alive
    ready = ctx.Event()
    holder = start(_workers.hold_open, held, ready)
    try:
        assert ready.wait(30)
        by_name = {e["name"]: e for e in _admin.scan()}
        assert set(by_name) == {orphan, held, live}
        assert by_name[orphan]["orphan"] and by_name[orphan]["holders"] == []
        assert not by_name[orphan]["creator_alive"]
        assert not by_name[held]["orphan"] and by_name[held]["holders"] == [holder.pid]
        assert not by_name[live]["orphan"] and by_name[live]["creator_alive"]
        assert torch_shmem.purge(dead_only=True) == [orphan]
        assert sorted(torch_shmem.list_streams()) == [held, live]
        # a handle in this process makes a dead creator's stream "held"
        h = torch_shmem.open(held)
        holder.kill()
        holder.join(10)
        assert torch_shmem.purge(dead_only=True) == []
        h.close()
        assert torch_shmem.purge(dead_only=True) == [held]
    finally:
        if holder.is_alive():
            holder.kill()
            holder.join(10)
        for n in (orphan, held, live):
            torch_shmem.unlink(n)


def test_purge_removes_every_stream(name, monkeypatch):
    names = [name + "-1", name + "-2"]
    only_names(monkeypatch, *names)
    handles = [torch_shmem.create(n, shape=(1,)) for n in names]
    handles[0].write([4.0])
    assert torch_shmem.purge() == sorted(names)
    assert torch_shmem.list_streams() == []
    assert handles[0].read().tolist() == [4.0]  # open handles keep their mapping
    assert torch_shmem.purge() == []


def test_purge_everything_and_cuda_orphans_in_a_private_dev_shm():
    dead = dead_pid()
    out = _workers.isolated_shm(f"""
        import os, numpy as np, torch_shmem
        assert os.listdir("/dev/shm") == []
        for n in ("b", "a", "ünï"):
            torch_shmem.create(n, shape=(2,)).close()
        open("/dev/shm/torch_shmem.junk", "wb").write(b"\\1" * 4096)
        open("/dev/shm/unrelated", "wb").write(b"x")
        refs = ["torch_{dead}_123_0", "cuda.shm.7.{dead:x}.0", "torch_{os.getpid()}_5_1",
                "torch_notapid_1_1"]
        for f in refs:  # torch creates them 0600
            os.close(os.open("/dev/shm/" + f, os.O_CREAT | os.O_WRONLY, 0o600))
        assert torch_shmem.list_streams() == ["a", "b", "ünï"]
        assert torch_shmem.purge() == ["a", "b", "ünï"]
        left = sorted(os.listdir("/dev/shm"))
        assert left == sorted(["torch_shmem.junk", "unrelated"] + refs), left
        assert torch_shmem.purge(include_cuda_orphans=True) == []
        left = sorted(os.listdir("/dev/shm"))
        assert left == sorted(["torch_shmem.junk", "unrelated", "torch_{os.getpid()}_5_1",
                               "torch_notapid_1_1"]), left
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_cuda_shm_files_of_dead_producers_are_orphans_even_with_unreadable_maps(monkeypatch):
    # Fake ref-count files named like the CUDA IPC ones, with a unique <id>, in
    # the real /dev/shm; cuda_orphans() only lists, so nothing else is touched.
    # Created with the default mode (0644 under umask 022), as the reference's
    # tests create them, and the /proc map scan forced incomplete (another
    # user's process whose maps cannot be read).
    dead, live, tag = dead_pid(), os.getpid(), os.urandom(4).hex()
    files = {
        "dead": f"cuda.shm.t{tag}.{dead:x}.1",
        "live": f"cuda.shm.t{tag}.{live:x}.2",
        "mapped": f"cuda.shm.t{tag}.{dead:x}.3",
        "torch_dead": f"torch_{dead}_{int(tag, 16)}_4",
        "unparsable": f"cuda.shm.t{tag}.nothex.5",
    }
    paths = {k: os.path.join(_proc.SHM_DIR, f) for k, f in files.items()}
    real_scan = _proc.scan_mappings
    complete = {"value": False}
    monkeypatch.setattr(_proc, "scan_mappings",
                        lambda wanted: (real_scan(wanted)[0], complete["value"]))
    import mmap

    try:
        for p in paths.values():
            with open(p, "wb") as f:
                f.write(b"\0" * 4096)
        with open(paths["mapped"], "r+b") as f, mmap.mmap(f.fileno(), 4096):
            found = set(_admin.cuda_orphans()) & set(files.values())
            # the dead producer decides for cuda.shm.*; a live producer's file,
            # a file a live process maps and an unparsable name are kept; a
            # torch_<pid>_* file (which may back a CPU tensor) needs a conclusive scan
            assert found == {files["dead"]}
            complete["value"] = True
            found = set(_admin.cuda_orphans()) & set(files.values())
            assert found == {files["dead"], files["torch_dead"]}
    finally:
        for p in paths.values():
            if os.path.exists(p):
                os.unlink(p)


def test_purge_removes_cuda_shm_orphans_only_when_asked():
    dead = dead_pid()
    out = _workers.isolated_shm(f"""
        import mmap, os, torch_shmem
        from torch_shmem import _proc
        real_scan = _proc.scan_mappings  # as if another user's maps were unreadable
        _proc.scan_mappings = lambda files: (real_scan(files)[0], False)
        names = ["cuda.shm.7.{dead:x}.0", "cuda.shm.7.{os.getpid():x}.1",
                 "cuda.shm.7.{dead:x}.2", "cuda.shm.nothex", "cuda.shm.7.{dead:x}"]
        for n in names:
            with open("/dev/shm/" + n, "wb") as f:
                f.write(b"\\0" * 4096)  # default mode, 0644 under umask 022
        torch_shmem.create("s", shape=(1,)).close()
        f = open("/dev/shm/" + names[2], "r+b")
        m = mmap.mmap(f.fileno(), 4096)  # a live process maps this one
        assert torch_shmem.purge() == ["s"]
        assert sorted(os.listdir("/dev/shm")) == sorted(names)
        assert torch_shmem.purge(include_cuda_orphans=True) == []
        assert sorted(os.listdir("/dev/shm")) == sorted(names[1:]), os.listdir("/dev/shm")
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_error_messages_carry_pyshmem_phrases(name):
    # Programs that matched pyshmem 1.4's messages keep working: each of our
    # messages contains pyshmem's key phrase (and still names the stream).
    s = torch_shmem.create(name, shape=(2,))
    with pytest.raises(RuntimeError, match=f"{name}.*safe=False requires"):
        s.read(safe=False)
    with pytest.raises(RuntimeError, match=f"{name}.*unlocked"):
        s.release()  # the native core's message
    with pytest.raises(ValueError, match=f"{name}.*unique"):
        with torch_shmem.locked_many([s, s]):
            pass
    taken, go = threading.Event(), threading.Event()

    def hold():
        with s.locked():
            taken.set()
            go.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert taken.wait(10)
        with pytest.raises(RuntimeError, match=f"{name}.*another thread owns its lock"):
            s.close()
    finally:
        go.set()
        t.join(10)
    r = torch_shmem.open(name)
    errors = []

    def wait(call):
        try:
            call()
        except RuntimeError as exc:
            errors.append(str(exc))

    waiters = [threading.Thread(target=wait, args=(lambda: r.read_new(timeout=30),)),
               threading.Thread(target=wait, args=(lambda: r.wait_for_count(after=5, timeout=30),)),
               threading.Thread(target=wait, args=(
                   lambda: asyncio.run(r.read_new_async(timeout=30)),))]
    for w in waiters:
        w.start()
    until(lambda: pending_waits(r) >= 3, what="three parked waits")
    r.close()
    for w in waiters:
        w.join(10)
    assert len(errors) == 3 and all(
        name in e and "closed while a read was waiting" in e for e in errors), errors
    for op in (lambda: r.read(), lambda: r.count, lambda: r.shape, lambda: r.describe()):
        with pytest.raises(RuntimeError, match=f"{name}.*closed shared memory"):
            op()  # the native core's check (read, count) and the Python layer's
    s.close()
