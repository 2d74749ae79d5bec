"""Stream lifecycle as readers see it: unlink and re-create end waits, open(wait=),
follow() across producer restarts, auto_unlink on exit and signals, Ctrl-C in the
torch ops' waits, and the quickstart's producer/consumer pair."""

import asyncio
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import _workers
import torch_shmem
from torch_shmem import StaleStreamError, StreamReplacedError, StreamUnlinkedError

pytestmark = pytest.mark.cpu

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A waiter must end within this after the unlink instead of at its timeout (the
# margin is for a loaded 2-core machine). That the unlink's wake itself ends a
# parked slice is checked in tests/cpp/test_core.cpp (one 10 s slice).
PROMPT = 0.5


def wait_until(predicate, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


def parked(name, n=1):
    """True once at least n waits are pending: readers parked on the stream's futex,
    or (asyncio waits) a readiness descriptor armed for the next publication."""
    try:
        info = torch_shmem.stat(name)
        return info["waiters"] + info["armed_descriptors"] >= n
    except FileNotFoundError:
        return False


def child(code, *args):
    """A Python child process running `code` with sys.argv[1:] = args (this checkout's
    torch_shmem first on its path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(p, timeout=120):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"child did not finish within {timeout} s\nstdout:\n{out}\nstderr:\n{err}")
    return p.returncode, out, err


def read_line(p, timeout=120):
    """The child's next stdout line; kills it (and fails) if none comes in time."""
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    try:
        line = p.stdout.readline()
    finally:
        killer.cancel()
    if not line:
        pytest.fail(f"child ended without output (exit {p.wait()}): {p.stderr.read()}")
    return line.strip()


def blocked_call(fn):
    """Run fn in a thread; returns (thread, result dict with 'exc'/'value' and 'end' time)."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            result["exc"] = exc
        result["end"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


# ------------------------------------------------------------------ unlink ends waits
WAITS = {
    "read_new": lambda r: r.read_new(timeout=None),
    "read_new_timeout": lambda r: r.read_new(timeout=30),
    "read_after": lambda r: r.read_after(r.count),
    "wait_for_count": lambda r: r.wait_for_count(after=r.count),
    "read_new_publication": lambda r: r.read_new_publication(),
    "read_after_publication": lambda r: r.read_after_publication(r.count, timeout=30),
    "read_new_async": lambda r: asyncio.run(r.read_new_async()),
    "read_after_async": lambda r: asyncio.run(r.read_after_async(r.count)),
    "wait_for_count_async": lambda r: asyncio.run(r.wait_for_count_async(after=r.count)),
    "read_new_publication_async": lambda r: asyncio.run(r.read_new_publication_async(timeout=30)),
    "read_after_publication_async": lambda r: asyncio.run(r.read_after_publication_async(r.count)),
}


@pytest.mark.parametrize("wait", list(WAITS))
def test_unlink_ends_a_blocked_wait_at_once(name, wait):
    s = torch_shmem.create(name, shape=(3,))
    s.write(np.ones(3, np.float32))
    r = torch_shmem.open(name)
    t, result = blocked_call(lambda: WAITS[wait](r))
    wait_until(lambda: parked(name), what="the reader to park")
    start = time.monotonic()
    torch_shmem.unlink(name)
    t.join(30)
    assert not t.is_alive()
    exc = result.get("exc")
    assert isinstance(exc, StreamUnlinkedError), result
    assert isinstance(exc, StaleStreamError) and isinstance(exc, RuntimeError)
    assert f"stream {name!r} was unlinked" in str(exc)
    assert "newer than count 1" in str(exc)
    assert result["end"] - start < PROMPT, result["end"] - start
    # the handles stay usable for what does not wait: the last data, metadata
    np.testing.assert_array_equal(r.read(), np.ones(3, np.float32))
    assert r.count == 1 and r.shape == (3,)
    r.close()
    s.close()


def test_unlink_ends_a_wait_in_another_process(name):
    s = torch_shmem.create(name, shape=(2,))
    p = child(f"""
        import time, torch_shmem
        r = torch_shmem.open({name!r})
        t0 = time.monotonic()
        try:
            r.read_new(timeout=None)
        except torch_shmem.StreamUnlinkedError as exc:
            print("unlinked", time.monotonic(), str(exc))
    """)
    wait_until(lambda: parked(name), what="the child to park")
    start = time.monotonic()
    s.unlink()
    code, out, err = finish(p)
    assert code == 0, err
    word, end, message = out.split(" ", 2)
    assert word == "unlinked" and name in message
    assert float(end) - start < PROMPT  # CLOCK_MONOTONIC is shared by the processes


def test_recreated_name_raises_replaced(name):
    old = torch_shmem.create(name, shape=(2,))
    r = torch_shmem.open(name)
    t, result = blocked_call(lambda: r.read_new(timeout=30))
    wait_until(lambda: parked(name), what="the reader to park")
    old.unlink()
    t.join(30)
    assert isinstance(result.get("exc"), StaleStreamError)  # unlinked, or replaced already
    new = torch_shmem.create(name, shape=(5, 5), dtype=np.int32)
    # once the name holds another generation, every wait of the old handle says so at once
    for call in (lambda: r.read_new(timeout=30), lambda: r.wait_for_count(after=0, timeout=30),
                 lambda: asyncio.run(r.read_new_async(timeout=30))):
        start = time.monotonic()
        with pytest.raises(StreamReplacedError, match="re-created: the name now holds a new generation"):
            call()
        assert time.monotonic() - start < PROMPT
    # the old handle's unlink() leaves the new generation alone and says why
    with pytest.raises(StreamReplacedError, match="newer generation"):
        r.unlink()
    assert torch_shmem.open(name).shape == (5, 5)
    new.unlink()


def test_unlink_if_removes_only_the_generation_it_names(name):
    """_core.unlink_if / unlink_generation: the generation it names is removed (and its
    parked readers woken with StreamUnlinkedError); a newer generation, or nothing, is
    left alone and reported; a malformed instance id is a ValueError."""
    from torch_shmem import _core
    from torch_shmem._stream import unlink_generation

    old = torch_shmem.create(name, shape=(2,))
    old_id = bytes.fromhex(old.instance_id)
    r = torch_shmem.open(name)
    t, result = blocked_call(lambda: r.read_new(timeout=30))
    wait_until(lambda: parked(name), what="the reader to park")
    assert unlink_generation(name, old_id) == "removed"
    t.join(30)
    assert isinstance(result.get("exc"), StreamUnlinkedError)
    assert not os.path.exists(f"/dev/shm/torch_shmem.{name}")
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("torch_shmem-unlinking.")
                and f.split(".")[1] == str(os.getpid())]
    assert _core.unlink_if(name, old_id) == "gone"
    new = torch_shmem.create(name, shape=(3,))
    assert _core.unlink_if(name, old_id) == "replaced"
    assert torch_shmem.open(name).shape == (3,)  # left alone
    with pytest.raises(ValueError, match="16 bytes"):
        _core.unlink_if(name, b"short")
    with pytest.raises(TypeError):
        _core.unlink_if(name, "not bytes")
    assert unlink_generation(name, bytes.fromhex(new.instance_id)) == "removed"
    old.close()
    r.close()
    new.close()


def test_unlink_if_races_with_unlink_and_recreate(name):
    """Processes that each create the name and remove the generation they created, in a
    loop, while the others try the same: a conditional unlink never removes a generation
    other than the one it names (each process always removes its own)."""
    code = textwrap.dedent(f"""
        import sys, numpy as np, torch_shmem
        from torch_shmem._stream import unlink_generation
        name = {name!r}
        removed = replaced = 0
        for i in range(20000):  # until 50 of its own are removed (the others contend)
            if removed == 50:
                break
            try:
                s = torch_shmem.create(name, shape=(1,))
            except FileExistsError:
                continue
            iid = bytes.fromhex(s.instance_id)
            s.close()
            r = unlink_generation(name, iid)
            if r != "removed":  # only this process removes its own generation
                sys.exit(f"our generation was {{r}} before we removed it")
            removed += 1
        print(removed)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert [int(out) for out, _ in outs] == [50, 50, 50]  # the name was contended, never lost
    assert not os.path.exists(f"/dev/shm/torch_shmem.{name}")


def test_a_publication_that_exists_is_returned_after_unlink(name):
    """Rule: a wait ends with the error only when nothing newer than `after` exists."""
    s = torch_shmem.create(name, shape=(2,))
    writer = torch_shmem.open(name)
    r = torch_shmem.open(name)
    # a write that lands before the unlink wakes the waiter with that write
    t, result = blocked_call(lambda: r.read_new(timeout=30))
    wait_until(lambda: parked(name), what="the reader to park")
    writer.write(np.full(2, 7, np.float32))
    torch_shmem.unlink(name)
    t.join(30)
    np.testing.assert_array_equal(result.get("value"), np.full(2, 7, np.float32))
    # a handle can still publish to the unlinked generation; level-triggered
    # waits on a count it passed return that publication
    n = r.count
    writer.write(np.full(2, 8, np.float32))
    np.testing.assert_array_equal(r.read_after(n, timeout=30), np.full(2, 8, np.float32))
    assert r.wait_for_count(after=n, timeout=30) == n + 1
    # nothing newer than the current count: an edge-triggered read ends at once
    start = time.monotonic()
    with pytest.raises(StreamUnlinkedError):
        r.read_new(timeout=30)
    assert time.monotonic() - start < PROMPT
    np.testing.assert_array_equal(r.read(), np.full(2, 8, np.float32))
    for h in (writer, r, s):
        h.close()


def test_close_still_ends_waits_with_runtime_error(name):
    s = torch_shmem.create(name, shape=(2,))
    t, result = blocked_call(lambda: s.read_new(timeout=30))
    wait_until(lambda: parked(name), what="the reader to park")
    s.close()
    t.join(30)
    exc = result.get("exc")
    assert type(exc) is RuntimeError and "closed" in str(exc)


# ------------------------------------------------------------------------ torch ops
def test_ops_wait_read_into_ends_on_unlink_and_recreate(name):
    torch = pytest.importorskip("torch")
    import torch_shmem.ops as O

    s = O.create(name, (4,), torch.float32)
    r = O.open(name)
    out = torch.empty(4)
    t, result = blocked_call(lambda: O.wait_read_into(r, out))
    wait_until(lambda: parked(name), what="the op to park")
    start = time.monotonic()
    O.unlink(name)
    t.join(30)
    exc = result.get("exc")
    assert isinstance(exc, StreamUnlinkedError), result
    assert f"shmem::wait_read_into: stream {name!r} was unlinked" in str(exc)
    assert result["end"] - start < PROMPT
    new = O.create(name, (9,), torch.int64)
    start = time.monotonic()
    with pytest.raises(StreamReplacedError, match="open the new generation with torch_shmem.ops.open"):
        torch.ops.shmem.wait_read_into(r.token, out, 30.0)  # the raw op raises the same class
    assert time.monotonic() - start < PROMPT
    O.read_into(r, out)  # non-waiting ops keep working on the old generation
    for h in (r, s, new):
        O.close(h)
    O.unlink(name)


def test_ops_parked_read_ends_on_unlink(name):
    """A read queued behind wait_device (simulated device memory) waits on the host
    for the parked publication; an unlink ends that wait too."""
    torch = pytest.importorskip("torch")
    import torch_shmem.ops as O
    from torch_shmem import _core
    from torch_shmem._dtypes import dtype_code

    flags = _core.FLAG_GPU | _core.FLAG_SIM_DEVICE
    handle = _core.create(name, dtype_code(np.dtype(np.uint64)), (8,), 0o600, flags, 2)
    st = O.open(name)

    def parked_read():
        O.wait_device(st, 3)  # parks this thread's "reader queue" (simulated device)
        return O.read(st)

    t, result = blocked_call(parked_read)
    wait_until(lambda: parked(name), what="the parked read to wait")
    torch_shmem.unlink(name)
    t.join(30)
    assert isinstance(result.get("exc"), StreamUnlinkedError), result
    assert "shmem::read:" in str(result["exc"])
    O.close(st)
    handle.close(1.0)


OPS_CHILD = """
    import os, signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if the parent ignores it
    import torch, torch_shmem, torch_shmem.ops as O
    name, what = sys.argv[1], sys.argv[2]
    st = O.open(name)
    out = torch.empty(4)
    print("ready", flush=True)
    t0 = time.monotonic()
    try:
        if what == "wait":
            O.wait_read_into(st, out)          # no timeout
        else:
            O.publish(st, torch.full((4,), 9.0))  # the lock is held by the parent
        print("returned", flush=True)
    except KeyboardInterrupt:
        print("interrupted", round(time.monotonic() - t0, 3), flush=True)
    r = torch_shmem.open(name)
    print("lock", r.lock_owner, "count", r.count, flush=True)
"""


@pytest.mark.parametrize("what", ["wait", "lock"])
def test_ctrl_c_interrupts_a_blocked_op(name, what):
    pytest.importorskip("torch")
    s = torch_shmem.create(name, shape=(4,))
    if what == "lock":
        s.acquire()
    p = child(OPS_CHILD, name, what)
    try:
        assert read_line(p) == "ready"
        if what == "wait":
            wait_until(lambda: parked(name), what="the op to park")
        else:
            time.sleep(0.5)  # in the lock wait by now (nothing to observe from outside)
        p.send_signal(signal.SIGINT)
        code, out, err = finish(p)
    finally:
        if what == "lock":
            s.release()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("interrupted"), out + err
    expected_owner = os.getpid() if what == "lock" else None
    assert lines[1] == f"lock {expected_owner} count 0"  # nothing published, no lock left held
    s.acquire(timeout=5)  # the lock is free for others
    s.release()
    s.close()


# ------------------------------------------------------------------------ open(wait=)
def test_open_waits_for_the_producer(name):
    t, result = blocked_call(lambda: torch_shmem.open(name, wait=30))
    time.sleep(0.2)
    assert t.is_alive()
    s = torch_shmem.create(name, shape=(2, 2), dtype=np.int16)
    created = time.monotonic()
    t.join(30)
    r = result.get("value")
    assert r is not None, result
    assert r.shape == (2, 2) and r.dtype == np.int16 and r.instance_id == s.instance_id
    assert result["end"] - created < 0.2  # the poll backs off to 50 ms at most
    r.close()
    s.close()


def test_open_wait_timeout_and_arguments(name):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=rf"stream {name!r} did not appear within 0.3 s"):
        torch_shmem.open(name, wait=0.3)
    assert 0.3 <= time.monotonic() - start < 5
    for wait in (0, 0.0):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            torch_shmem.open(name, wait=wait)
    with pytest.raises(FileNotFoundError):
        torch_shmem.open(name)  # the default does not wait
    with pytest.raises(ValueError, match="wait must be >= 0"):
        torch_shmem.open(name, wait=-1)
    with pytest.raises(TypeError, match="wait must be a number of seconds or None"):
        torch_shmem.open(name, wait=True)
    with pytest.raises(TypeError, match="wait must be a number of seconds or None"):
        torch_shmem.open(name, wait="1")
    s = torch_shmem.create(name, shape=(1,))
    torch_shmem.open(name, wait=None).close()  # an existing stream opens at once
    s.close()


def test_ctrl_c_interrupts_open_wait(name):
    p = child(f"""
        import signal, time, torch_shmem
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("ready", flush=True)
        t0 = time.monotonic()
        try:
            torch_shmem.open({name!r}, wait=None)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
    """)
    assert read_line(p) == "ready"
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    code, out, err = finish(p)
    assert code == 0 and out.strip() == "interrupted", out + err


# ---------------------------------------------------------------------------- follow
PRODUCER = """
    import sys, time
    import numpy as np
    import torch_shmem
    name = sys.argv[1]
    for gen, shape in enumerate([(2,), (3, 3), (4,)], start=1):
        shm = torch_shmem.create(name, shape=shape, dtype=np.float64)
        k = 0
        # publish until the follower (the test) says it saw this generation
        while not torch_shmem.stat(name + "-ack")["count"] >= gen:
            k += 1
            shm.write(np.full(shape, gen * 1000 + k), frame_id=gen)
            time.sleep(0.005)
            if k > 20000:
                sys.exit("no acknowledgement")
        shm.write(np.full(shape, gen * 1000 + k + 1), frame_id=gen)
        shm.unlink()   # a restart: the next generation may have another shape
        time.sleep(0.1)
"""


def test_follow_survives_two_producer_restarts(name):
    ack = torch_shmem.create(name + "-ack", shape=(1,))
    try:
        p = child(PRODUCER, name)
        seen = {}
        try:
            follower = torch_shmem.follow(name, wait=3.0, timeout=60)
            for pub in follower:
                gen = pub.frame_id
                assert pub.payload.shape == {1: (2,), 2: (3, 3), 3: (4,)}[gen]
                assert np.all(pub.payload == pub.payload.flat[0])  # one whole write
                assert int(pub.payload.flat[0]) // 1000 == gen
                seen.setdefault(gen, []).append(pub.count)
                assert follower.generations == gen
                if len(seen[gen]) == 3:
                    ack.write(np.ones(1, np.float32))  # producer moves on
            # the loop ended by itself: the producer unlinked and did not come back in 3 s
        finally:
            code, out, err = finish(p)
        assert code == 0, err
    finally:
        ack.unlink()
    assert sorted(seen) == [1, 2, 3]
    for counts in seen.values():
        assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert follower.shm is None


def test_follow_waits_for_the_first_generation_and_close_ends_it(name):
    got = []
    follower = torch_shmem.follow(name)  # no limits: only close() ends it

    def consume():
        for pub in follower:
            got.append(pub.payload.copy())

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    time.sleep(0.2)
    s = torch_shmem.create(name, shape=(2,))
    s.write(np.full(2, 3, np.float32))
    wait_until(lambda: len(got) == 1, what="the first publication")
    s.write(np.full(2, 4, np.float32))
    wait_until(lambda: len(got) == 2, what="the second publication")
    wait_until(lambda: parked(name), what="the follower to park")
    start = time.monotonic()
    follower.close()  # from another thread: wakes the blocked next()
    t.join(30)
    assert not t.is_alive() and time.monotonic() - start < PROMPT
    assert [g.tolist() for g in got] == [[3, 3], [4, 4]]
    with pytest.raises(StopIteration):
        next(follower)
    s.close()


def test_follow_yields_the_latest_publication_first_and_times_out(name):
    s = torch_shmem.create(name, shape=(1,), dtype=np.int64)
    for k in range(1, 4):
        s.write(np.array([k]))
    with torch_shmem.follow(name, timeout=0.2) as follower:
        pub = next(follower)
        assert pub.count == 3 and pub.payload.tolist() == [3]
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"stream {name!r}: timed out"):
            next(follower)
        assert time.monotonic() - start >= 0.2
        assert repr(follower) == f"Follower(name={name!r}, generations=1)"
    with pytest.raises(TimeoutError, match="did not appear"):
        next(torch_shmem.follow(name + "-never", wait=0.1))
    s.close()


# ------------------------------------------------------------ auto_unlink and signals
AUTO_CHILD = """
    import os, signal, sys, time
    import numpy as np
    import torch_shmem
    name, mode = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if mode == "sigint-default":
        signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt
    elif mode == "sigint-dfl":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    elif mode == "own-handler":
        def mine(signum, frame):
            print("own handler", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, mine)
    shm = torch_shmem.create(name, shape=(4,), auto_unlink=True)
    if mode == "own-handler":
        assert signal.getsignal(signal.SIGTERM) is mine  # left alone
    if mode == "exit":
        shm.write(np.ones(4, np.float32))
        sys.exit(0)
    if mode == "fork":
        pid = os.fork()
        if pid == 0:   # a forked child exits normally: its atexit must not unlink
            sys.exit(0)
        os.waitpid(pid, 0)
        assert os.path.exists("/dev/shm/torch_shmem." + name)
        sys.exit(0)
    k = 0
    while True:   # a producer loop
        k += 1
        shm.write(np.full(4, k, np.float32))
        time.sleep(0.01)
"""


def run_auto_child(name, mode):
    return child(AUTO_CHILD, name, mode)


def published(name):
    try:
        return torch_shmem.stat(name)["count"] >= 1
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    "mode,signum,expected_code",
    [
        ("sigterm", signal.SIGTERM, -signal.SIGTERM),      # our handler, then the default action
        ("sigint-dfl", signal.SIGINT, -signal.SIGINT),     # SIG_DFL SIGINT: same
        ("sigint-default", signal.SIGINT, -signal.SIGINT),  # KeyboardInterrupt, then atexit
        ("own-handler", signal.SIGTERM, 3),                # the program's handler exits; atexit
    ],
)
def test_auto_unlink_producer_killed_by_signal_cleans_up(name, mode, signum, expected_code):
    p = run_auto_child(name, mode)
    try:
        wait_until(lambda: published(name), what="the producer to publish")
    except BaseException:
        p.kill()
        raise
    p.send_signal(signum)
    code, out, err = finish(p)
    assert code == expected_code, (code, out, err)
    assert not os.path.exists(shm_path(name)), "the stream outlived its auto_unlink producer"
    if mode == "own-handler":
        assert out.strip() == "own handler"


@pytest.mark.parametrize("mode", ["exit", "fork"])
def test_auto_unlink_at_exit_and_not_in_forked_children(name, mode):
    code, out, err = finish(run_auto_child(name, mode))
    assert code == 0, err
    assert not os.path.exists(shm_path(name))


def test_auto_unlink_handler_is_installed_only_while_needed(name):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this test process has its own SIGTERM handler")
    s = torch_shmem.create(name, shape=(1,), auto_unlink=True)
    try:
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert name in torch_shmem._cleanup.registered()
    finally:
        s.unlink()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert name not in torch_shmem._cleanup.registered()
    with torch_shmem.create(name, shape=(1,)) as plain:  # auto_unlink=False installs nothing
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        plain.write(np.ones(1, np.float32))


def test_sigkilled_auto_unlink_producer_is_purged_as_dead():
    """SIGKILL cannot be handled: the stream stays, and purge --dead-only removes it."""
    out = _workers.isolated_shm(f"""
        import os, signal, subprocess, sys, time
        import torch_shmem
        child = subprocess.Popen([sys.executable, "-c", {textwrap.dedent(AUTO_CHILD)!r},
                                  "killed", "sigterm"])
        end = time.monotonic() + 60
        while not (os.path.exists("/dev/shm/torch_shmem.killed")
                   and torch_shmem.stat("killed")["count"] >= 1):
            assert time.monotonic() < end, "no publication"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        assert child.wait(60) == -signal.SIGKILL
        assert torch_shmem.list_streams() == ["killed"]
        assert not torch_shmem.stat("killed")["creator_alive"]
        out = subprocess.run([sys.executable, "-m", "torch_shmem", "purge", "--dead-only"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == "purged 'killed'", out.stdout
        assert torch_shmem.list_streams() == []
        print("ok")
    """)
    assert out.strip().endswith("ok")


def shm_path(name):
    return "/dev/shm/torch_shmem." + name


# ------------------------------------------------------------------------ quickstart
def quickstart_blocks():
    text = (ROOT / "docs" / "quickstart.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    named = {}
    for block in blocks:
        m = re.match(r"# (\w+\.py)\b", block)
        if m:
            named[m.group(1)] = block
    return named


def test_quickstart_pair_runs_as_documented(name):
    """The quickstart's consumer and follower, started before the producer, end cleanly
    (no traceback) once the producer finishes; the follower follows a restart."""
    blocks = quickstart_blocks()
    assert {"producer.py", "consumer.py", "follower.py"} <= set(blocks)
    assert blocks["producer.py"].count('"camera"') == 1

    def run(file):  # the documented code, with a unique stream name
        return child(blocks[file].replace('"camera"', repr(name)))

    consumer, follower = run("consumer.py"), run("follower.py")
    time.sleep(0.5)  # consumers first: they wait for the stream to appear
    for restart in range(2):
        code, out, err = finish(run("producer.py"))
        assert code == 0, err
        if restart == 0:
            code, out, err = finish(consumer)
            assert code == 0 and "Traceback" not in err, err
            lines = out.splitlines()
            assert lines[-1].startswith("the producer is gone"), out
            frames = [line.split() for line in lines[:-1]]
            assert len(frames) >= 10
            counts = [int(f[0]) for f in frames]
            assert counts == sorted(counts) and counts[-1] <= 200
    code, out, err = finish(follower)
    assert code == 0 and "Traceback" not in err, err
    rows = [line.split() for line in out.splitlines()]
    generations = [int(row[0]) for row in rows]
    assert set(generations) == {1, 2}, out  # both runs of the producer


def test_watch_shows_an_unlinked_stream_as_unlinked(name):
    """`torch-shmem watch`'s waiter ends quietly when the stream is unlinked; the
    STATE column says "unlinked" (not an error)."""
    torch_shmem.create(name, shape=(2,))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    p = subprocess.Popen([sys.executable, "-m", "torch_shmem", "watch", name, "--interval", "0.2",
                          "--count", "6"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env)
    wait_until(lambda: parked(name), what="watch to park")
    torch_shmem.unlink(name)
    code, out, err = finish(p)
    assert code == 0, err
    rows = [re.split(r"\s{2,}", line.strip()) for line in out.splitlines() if line.startswith(name)]
    assert rows and rows[-1][-1] == "unlinked", out
    assert "error" not in out
