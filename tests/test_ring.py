"""Rings: create(ring=N, policy=), named cursors, read_next (csrc/core/ring.h).

Every publication c goes to slot c % N with a generation (odd while
written, 2c once complete); cursors in the segment hold each reader's
position, so every reader gets every publication once, in order, or is
told exactly how many it missed.
"""

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

import _ring_workers as rw
import torch_shmem
from torch_shmem import cli

pytestmark = pytest.mark.cpu

ctx = mp.get_context("spawn")


def _join(*procs, timeout=60):
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join(5)
            pytest.fail(f"process {p.pid} did not finish within {timeout} s")


def _stop(p):
    if p.is_alive():
        p.kill()
    p.join(10)


# ----------------------------------------------------------------- validation

@pytest.mark.parametrize("ring,exc", [
    (1, ValueError), (0, ValueError), (-3, ValueError), (4097, ValueError),
    ("4", TypeError), (True, TypeError), (2.0, TypeError),
])
def test_ring_size_refused(name, ring, exc):
    with pytest.raises(exc, match=name):
        torch_shmem.create(name, shape=(2,), ring=ring)
    assert name not in torch_shmem.list_streams()


def test_policy_and_slots_refused(name):
    with pytest.raises(ValueError, match="policy must be one of"):
        torch_shmem.create(name, shape=(2,), ring=4, policy="newest")
    with pytest.raises(TypeError, match="policy must be a str"):
        torch_shmem.create(name, shape=(2,), ring=4, policy=1)
    with pytest.raises(ValueError, match="needs a ring"):
        torch_shmem.create(name, shape=(2,), policy="block")
    with pytest.raises(ValueError, match="exclude each other"):
        torch_shmem.create(name, shape=(2,), ring=4, slots=4)
    assert name not in torch_shmem.list_streams()


def test_bounds_and_properties(name):
    s = torch_shmem.create(name, shape=(2,), dtype=np.int64, ring=4096, policy="drop_newest")
    assert (s.ring, s.policy, s.slots, s.drops) == (4096, "drop_newest", 4096, 0)
    s.unlink()
    s = torch_shmem.create(name, shape=(2,), ring=2)
    assert (s.ring, s.policy) == (2, "overwrite")
    config = s.to_config()
    assert config["ring"] == 2 and config["policy"] == "overwrite" and "slots" not in config
    s.unlink()


def test_cursor_misuse(name):
    plain = torch_shmem.create(name, shape=(2,))
    assert plain.ring is None and plain.policy is None and plain.drops == 0
    with pytest.raises(RuntimeError, match="not a ring"):
        plain.cursor("a")
    with pytest.raises(RuntimeError, match="not a ring"):
        torch_shmem.open(name, reader="a")
    with pytest.raises(RuntimeError, match="read_next"):
        plain.read_next()
    plain.unlink()
    s = torch_shmem.create(name, shape=(2,), ring=4)
    for bad, exc in [("", ValueError), ("x" * 65, ValueError), ("a\0b", ValueError), (3, TypeError)]:
        with pytest.raises(exc, match="cursor name"):
            s.cursor(bad)
    assert len(torch_shmem.stat(name)["ring"]["cursors"]) == 0
    with pytest.raises(RuntimeError, match="ring"):
        with s.write_view():
            pass
    c = s.cursor("a")
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        c.read_next()
    with pytest.raises(ValueError, match="out must be"):
        s.cursor("b").read_next(out=np.empty(3, np.float32))


# --------------------------------------------------------- one process: order

def test_order_and_exactness(name):
    n = 5
    s = torch_shmem.create(name, shape=(n,), dtype=np.int64, ring=8, policy="block")
    r = torch_shmem.open(name, reader="a", readonly=True)  # a read-only consumer advances too
    b = s.cursor("b")
    with pytest.raises(TimeoutError):
        r.read_next(timeout=0.05)
    for c in range(1, 9):
        s.write(rw.make_payload(c, n), frame_id=100 + c if c % 2 else None)
    for c in range(1, 9):
        pub = r.read_next(timeout=1)
        assert pub.count == c and pub.missed_publications == 0
        assert pub.frame_id == (100 + c if c % 2 else 100 + c - 1)  # sticky, per publication
        assert rw.payload_ok(pub.payload, c)
        assert pub.write_time > 0
    # latest-value reads are unchanged on a ring
    np.testing.assert_array_equal(r.read(), rw.make_payload(8, n))
    assert r.read_publication().count == 8
    # b lags by 8 = N: the ring is full for b; block times out naming it
    with pytest.raises(TimeoutError, match="cursor 'b'") as exc:
        s.write(rw.make_payload(9, n), timeout=0.2)
    assert name in str(exc.value)
    out = np.empty(n, np.int64)
    pub = b.read_next(out=out)
    assert pub.payload is out and pub.count == 1 and rw.payload_ok(out, 1)
    s.write(rw.make_payload(9, n), timeout=1)
    assert [b.read_next().count for _ in range(8)] == list(range(2, 10))
    assert b.consumed == 9 and b.lag == 0 and r._reader.lag == 1
    st = torch_shmem.stat(name)["ring"]
    assert st["size"] == 8 and st["policy"] == "block" and st["drops"] == 0
    cur = {c["name"]: c for c in st["cursors"]}
    assert cur["a"]["pid"] == os.getpid() and cur["a"]["alive"] and cur["a"]["lag"] == 1
    assert cur["b"]["consumed"] == 9 and cur["b"]["missed"] == 0
    s.clear()
    assert r.read_next(timeout=1).count == 9
    pub = r.read_next(timeout=1)
    assert pub.count == 10 and not pub.payload.any()


def test_overwrite_missed_exact(name):
    s = torch_shmem.create(name, shape=(3,), dtype=np.int64, ring=4)
    c = s.cursor("slow")
    for k in range(1, 11):
        s.write(rw.make_payload(k, 3))  # never blocks
    pub = c.read_next()
    assert (pub.count, pub.missed_publications) == (7, 6)  # 7..10 are what 4 slots hold
    assert [c.read_next().count for _ in range(3)] == [8, 9, 10]
    assert torch_shmem.stat(name)["ring"]["cursors"][0]["missed"] == 6


def test_drop_newest_counts_drops(name):
    s = torch_shmem.create(name, shape=(2,), dtype=np.int64, ring=4, policy="drop_newest")
    c = s.cursor("a")
    for k in range(1, 5):
        s.write(rw.make_payload(k, 2))
    assert s.count == 4 and s.drops == 0
    for k in range(5, 8):
        s.write(rw.make_payload(k, 2))  # dropped: not published
    assert s.count == 4 and s.drops == 3
    assert torch_shmem.stat(name)["ring"]["drops"] == 3
    assert s._h.write(rw.make_payload(99, 2), None, None) == 0  # the binding says "dropped"
    assert [c.read_next().count for _ in range(4)] == [1, 2, 3, 4]
    s.write(rw.make_payload(5, 2))
    pub = c.read_next()
    assert pub.count == 5 and rw.payload_ok(pub.payload, 5) and pub.missed_publications == 0
    assert s.drops == 4
    c.close()  # a released cursor never holds the ring
    for k in range(6, 20):
        s.write(rw.make_payload(k, 2))
    assert s.count == 19 and s.drops == 4


def test_cursor_table_full_and_reclaim(name, seed):
    s = torch_shmem.create(name, shape=(), dtype=np.int64, ring=2)
    mine = [s.cursor(f"c{i}") for i in range(31)]
    ready, results = ctx.Event(), ctx.Queue()
    s.write(np.int64(1))
    p = ctx.Process(target=rw.consume_n, args=(name, "child", 1, ready, results))
    p.start()
    assert ready.wait(30)
    s.write(np.int64(2))
    assert results.get(timeout=30) == [2]
    _join(p)
    assert p.exitcode == 0
    child = [c for c in torch_shmem.stat(name)["ring"]["cursors"] if c["name"] == "child"][0]
    assert not child["alive"]
    mine.append(s.cursor("new"))  # reclaims the dead child's entry
    with pytest.raises(RuntimeError, match="all 32 cursors"):
        s.cursor("one-too-many")
    mine[0].close()
    s.cursor("one-too-many")  # a released entry is reclaimed too


# --------------------------------------------------------------- processes

def test_block_four_readers_every_count_once(name, seed):
    n, total, readers = 64, 3000, 4
    s = torch_shmem.create(name, shape=(n,), dtype=np.int64, ring=16, policy="block")
    results = ctx.Queue()
    events = [ctx.Event() for _ in range(readers)]
    procs = [ctx.Process(target=rw.consume, args=(name, f"r{i}", total, events[i], results))
             for i in range(readers)]
    for p in procs:
        p.start()
    for e in events:
        assert e.wait(60)
    for c in range(1, total + 1):  # full rate, no pacing
        s.write(rw.make_payload(c, n), timeout=30)
    got = sorted(results.get(timeout=60) for _ in range(readers))
    _join(*procs)
    assert [p.exitcode for p in procs] == [0] * readers
    for reader, received, disorder, torn, missed, first, last in got:
        assert (received, disorder, torn, missed, first, last) == (total, 0, 0, 0, 1, total), reader


def test_overwrite_stopped_reader_missed_exact(name, seed):
    n, ring, total = 16, 32, 3000
    s = torch_shmem.create(name, shape=(n,), dtype=np.int64, ring=ring)
    ready, results = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=rw.consume, args=(name, "r", total, ready, results))
    p.start()
    try:
        assert ready.wait(60)
        stopped_at = None
        for c in range(1, total + 1):
            s.write(rw.make_payload(c, n))
            if c == 500:
                os.kill(p.pid, signal.SIGSTOP)
                stopped_at = time.monotonic()
                writes_at_stop = c
            if stopped_at is not None and time.monotonic() - stopped_at >= 0.5:
                written_while_stopped = c - writes_at_stop
                os.kill(p.pid, signal.SIGCONT)
                stopped_at = None
            time.sleep(0.0002)
        if stopped_at is not None:
            written_while_stopped = total - writes_at_stop
            os.kill(p.pid, signal.SIGCONT)
        reader, received, disorder, torn, missed, first, last = results.get(timeout=60)
        _join(p)
    finally:
        _stop(p)
    assert p.exitcode == 0
    assert written_while_stopped > ring  # the writer kept going past a full ring
    assert (disorder, torn, first, last) == (0, 0, 1, total)
    assert missed > 0 and received + missed == total  # every count delivered or reported
    assert torch_shmem.stat(name)["ring"]["cursors"][0]["missed"] == missed


def test_reader_sigkill_does_not_wedge_block_writer(name, seed):
    s = torch_shmem.create(name, shape=(4,), dtype=np.int64, ring=4, policy="block")
    ready = ctx.Event()
    p = ctx.Process(target=rw.attach_and_wait, args=(name, "victim", ready))
    p.start()
    try:
        assert ready.wait(60)
        for c in range(1, 5):
            s.write(rw.make_payload(c, 4), timeout=5)
        with pytest.raises(RuntimeError, match="held by live process"):
            s.cursor("victim")  # one process per cursor name
        with pytest.raises(TimeoutError, match="victim"):  # the live reader holds it
            s.write(rw.make_payload(5, 4), timeout=0.3)
        # a writer parked on the ring when its reader dies goes on
        import threading
        done = []
        t = threading.Thread(target=lambda: done.append(s.write(rw.make_payload(5, 4), timeout=20)))
        t.start()
        time.sleep(0.2)
        assert t.is_alive()
        os.kill(p.pid, signal.SIGKILL)
        t.join(30)
        assert not t.is_alive() and s.count == 5
    finally:
        _stop(p)
    for c in range(6, 50):
        s.write(rw.make_payload(c, 4), timeout=5)
    victim = torch_shmem.stat(name)["ring"]["cursors"][0]
    assert victim["name"] == "victim" and victim["pid"] is None and victim["consumed"] == 0
    # the victim's name resumes, and learns what it missed
    r = torch_shmem.open(name, reader="victim")
    pub = r.read_next(timeout=1)
    assert pub.count == 46 and pub.missed_publications == 45 and rw.payload_ok(pub.payload, 46)


def test_writer_sigkill_mid_write_no_torn_read(name, seed):
    n = 1 << 20  # 8 MiB payloads: a kill lands inside a copy most of the time
    s = torch_shmem.create(name, shape=(n,), dtype=np.int64, ring=4)
    cur = s.cursor("r")
    rng = np.random.default_rng(seed)
    for round_ in range(3):
        ready = ctx.Event()
        p = ctx.Process(target=rw.write_forever, args=(name, n, ready))
        p.start()
        try:
            assert ready.wait(60)
            time.sleep(0.2 + rng.random() * 0.2)
            os.kill(p.pid, signal.SIGKILL)
            p.join(30)
        finally:
            _stop(p)
        assert p.exitcode == -signal.SIGKILL
        count = s.count
        # every read returns a whole publication (or an error), never a torn one
        try:
            latest = s.read_publication()
            assert rw.payload_ok(latest.payload, latest.count)
        except torch_shmem.InconsistentStreamError:
            pass  # died in the short host window: reported, not returned
        while cur.consumed < count:
            pub = cur.read_next(timeout=5)
            assert rw.payload_ok(pub.payload, pub.count), (round_, pub.count)
        # the next good write repairs the stream
        s.write(rw.make_payload(count + 1, n))
        pub = cur.read_next(timeout=5)
        assert pub.count == count + 1 and rw.payload_ok(pub.payload, count + 1)
        assert torch_shmem.stat(name)["state"] == "ok"


def test_cursor_resume_after_exit(name, seed):
    s = torch_shmem.create(name, shape=(2,), dtype=np.int64, ring=8, policy="block")
    ready, results = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=rw.consume_n, args=(name, "worker", 3, ready, results))
    p.start()
    assert ready.wait(60)
    for c in range(1, 6):
        s.write(rw.make_payload(c, 2), timeout=10)
    assert results.get(timeout=30) == [1, 2, 3]
    _join(p)
    assert p.exitcode == 0
    for c in range(6, 9):  # 8 publications, the cursor consumed 3: the ring still holds 4..8
        s.write(rw.make_payload(c, 2), timeout=1)
    p = ctx.Process(target=rw.consume_n, args=(name, "worker", 5, ready, results))
    p.start()
    assert results.get(timeout=30) == [4, 5, 6, 7, 8]
    _join(p)
    assert p.exitcode == 0


def test_threads_share_a_cursor(name):
    import threading
    s = torch_shmem.create(name, shape=(), dtype=np.int64, ring=64, policy="block")
    c = s.cursor("shared")
    got = [[], []]

    def take(i):
        while True:
            pub = c.read_next(timeout=10)
            if pub.payload == -1:
                got[i].append(pub.count)
                return
            got[i].append(pub.count)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for k in range(1, 2001):
        s.write(np.int64(k), timeout=10)
    s.write(np.int64(-1), timeout=10)
    s.write(np.int64(-1), timeout=10)
    for t in threads:
        t.join(30)
    assert sorted(got[0] + got[1]) == list(range(1, 2003))  # each exactly once


def test_unlink_ends_read_next(name):
    s = torch_shmem.create(name, shape=(), dtype=np.int64, ring=4)
    r = torch_shmem.open(name, reader="a")
    s.unlink()
    with pytest.raises(torch_shmem.StreamUnlinkedError):
        r.read_next(timeout=5)


def test_cli_stat_shows_ring(name, capsys):
    s = torch_shmem.create(name, shape=(2,), dtype=np.int64, ring=4, policy="drop_newest")
    c = s.cursor("consumer-a")
    for k in range(1, 7):
        s.write(rw.make_payload(k, 2))
    assert cli.main(["stat", name]) == 0
    out = capsys.readouterr().out
    assert "4 slots, policy drop_newest, 2 dropped" in out
    assert f"cursor consumer-a: pid {os.getpid()} (alive), consumed 0, lag 4, missed 0" in out
    c.close()
    assert cli.main(["stat", name]) == 0
    assert "released (last pid" in capsys.readouterr().out


# ----------------------------------------------- skipping counts (_write_at, the bridge)

def _fid(c):
    return 1000 + c


def _write(s, c):
    """Publish count c (its stamped payload and frame id) through _write_at."""
    return s._write_at(rw.make_payload(c, 3), c, _fid(c), 1.0)


def _check(pub, count, missed):
    assert (pub.count, pub.missed_publications) == (count, missed)
    assert pub.frame_id == _fid(count) and rw.payload_ok(pub.payload, count), (pub.count, pub.payload)


@pytest.mark.parametrize("policy", ["overwrite", "block", "drop_newest"])
@pytest.mark.parametrize("k", [1, 3, 7, 8, 9, 20])  # counts skipped; the ring holds 8
def test_cursor_reads_across_a_skip(name, policy, k):
    """A cursor that consumed everything reads the publication after a skip of k counts
    (less than the ring or more) with its own count, frame id and payload, and exactly k
    missed; latest-value reads see it too. A caught-up cursor never holds the writer."""
    s = torch_shmem.create(name, shape=(3,), dtype=np.int64, ring=8, policy=policy)
    r = torch_shmem.open(name, readonly=True)
    cur = s.cursor("a")
    for c in range(1, 4):
        assert _write(s, c) == c
    for c in range(1, 4):
        _check(cur.read_next(timeout=1), c, 0)
    t = 3 + k + 1
    assert _write(s, t) == t
    assert s.count == r.count == t and s.drops == 0
    np.testing.assert_array_equal(r.read(), rw.make_payload(t, 3))
    latest = r.read_publication()
    assert (latest.count, latest.frame_id) == (t, _fid(t))
    _check(cur.read_next(timeout=1), t, k)
    assert cur.consumed == t and cur.lag == 0
    # then one count at a time again, and a count not past the current one is the next one
    assert _write(s, t + 1) == t + 1
    _check(cur.read_next(timeout=1), t + 1, 0)
    assert s._write_at(rw.make_payload(t + 2, 3), 2, _fid(t + 2), 1.0) == t + 2
    _check(cur.read_next(timeout=1), t + 2, 0)
    with pytest.raises(TimeoutError):
        cur.read_next(timeout=0.05)
    assert torch_shmem.stat(name)["ring"]["cursors"][0]["missed"] == k


def test_a_long_skip_costs_no_later_publication(name):
    """A skip marks up to N - 1 counts: a cursor passes them without taking them for a
    writer that laps it (which would make it jump to the newest publication and miss the
    ones after the skip)."""
    s = torch_shmem.create(name, shape=(3,), dtype=np.int64, ring=64)
    cur = s.cursor("a")
    _write(s, 1)
    assert _write(s, 40) == 40
    for c in (41, 42):
        _write(s, c)
    _check(cur.read_next(timeout=1), 1, 0)
    _check(cur.read_next(timeout=1), 40, 38)
    _check(cur.read_next(timeout=1), 41, 0)
    _check(cur.read_next(timeout=1), 42, 0)


@pytest.mark.parametrize("lag", [0, 3, 7])  # what the cursor consumed of the full ring
def test_lagging_cursor_never_gets_stale_data_across_a_skip(name, lag):
    """The ring is full of distinct publications 1..N, a cursor consumed `lag` of them, then
    the writer skips k = 1..N+1 counts: every publication the cursor gets is the one written
    for its count (the skipped counts' slots still hold older ones), in order, with exact
    missed counts, and it ends at the skip's publication."""
    n = 8
    for k in range(1, n + 2):
        s = torch_shmem.create(name, shape=(3,), dtype=np.int64, ring=n)  # overwrite
        cur = s.cursor("a")
        for c in range(1, n + 1):
            _write(s, c)
        for c in range(1, lag + 1):
            _check(cur.read_next(timeout=1), c, 0)
        t = n + 1 + k
        assert _write(s, t) == t
        # still in the ring: the old counts from t - N + 1 on, whose slots the skip left alone
        expected = list(range(max(lag + 1, t - n + 1), n + 1)) + [t]
        got, last = [], lag
        while last < t:
            pub = cur.read_next(timeout=1)
            assert rw.payload_ok(pub.payload, pub.count) and pub.frame_id == _fid(pub.count), (k, pub)
            assert pub.count == last + 1 + pub.missed_publications, (k, pub.count, last)
            got.append(pub.count)
            last = pub.count
        assert got == expected, (k, got)
        assert torch_shmem.stat(name)["ring"]["cursors"][0]["missed"] == t - lag - len(got)
        s.unlink()


def test_block_skip_waits_for_a_lagging_cursor(name):
    """block: a skip waits while a live cursor has not consumed what the skip takes over
    (min(t - N, count)), and a cursor that consumed everything never holds it."""
    s = torch_shmem.create(name, shape=(3,), dtype=np.int64, ring=4, policy="block")
    cur = s.cursor("a")
    for c in (1, 2):
        _write(s, c)
    # publication 5 takes the slot of 1 (and marks 3, 4): cursor 'a' consumed 0
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"cursor 'a'.*consumed count 0.*publication 5 would "
                                           r"overwrite count 1"):
        s._write_at(rw.make_payload(5, 3), 5, _fid(5), 0.1)
    assert time.monotonic() - t0 >= 0.09
    assert s.count == 2
    _check(cur.read_next(timeout=1), 1, 0)
    assert _write(s, 5) == 5  # 2 is still unread, but its slot is not taken
    _check(cur.read_next(timeout=1), 2, 0)
    _check(cur.read_next(timeout=1), 5, 2)
    # caught up: a skip of any length goes through at once
    assert _write(s, 100) == 100
    _check(cur.read_next(timeout=1), 100, 94)
    # one publication behind: a skip past a whole ring needs it consumed
    assert _write(s, 101) == 101
    with pytest.raises(TimeoutError, match="publication 500 would overwrite count 101"):
        s._write_at(rw.make_payload(500, 3), 500, _fid(500), 0.1)
    assert s.count == 101
    # the writer is woken when the cursor catches up
    import threading
    got = []
    reader = threading.Timer(0.2, lambda: got.append(cur.read_next(timeout=5)))
    t0 = time.monotonic()
    reader.start()
    assert s._write_at(rw.make_payload(500, 3), 500, _fid(500), 5.0) == 500
    assert time.monotonic() - t0 >= 0.15
    reader.join(5)
    _check(got[0], 101, 0)
    _check(cur.read_next(timeout=1), 500, 398)
    assert s.drops == 0


def test_drop_newest_drops_a_skip(name):
    """drop_newest: a skip that would take what a live cursor has not consumed is dropped
    (the current count is returned and nothing is published); a released cursor never
    holds the ring."""
    s = torch_shmem.create(name, shape=(3,), dtype=np.int64, ring=4, policy="drop_newest")
    cur = s.cursor("a")
    for c in (1, 2):
        _write(s, c)
    assert _write(s, 5) == 2 and s.count == 2 and s.drops == 1
    assert _write(s, 50) == 2 and s.count == 2 and s.drops == 2
    assert _write(s, 4) == 4  # takes the slots of 3 and 4: nothing unread there
    _check(cur.read_next(timeout=1), 1, 0)
    _check(cur.read_next(timeout=1), 2, 0)
    _check(cur.read_next(timeout=1), 4, 1)
    assert _write(s, 50) == 50 and s.drops == 2
    assert _write(s, 51) == 50 and s.drops == 3  # takes the slot of 47: 'a' consumed 4
    _check(cur.read_next(timeout=1), 50, 45)
    assert _write(s, 51) == 51
    assert _write(s, 60) == 51 and s.drops == 4  # 'a' has not consumed 51
    cur.close()
    assert _write(s, 60) == 60 and s.drops == 4


# ----------------------------------------------------------------- crash torture

def _wait_until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"hang: {what} within {timeout} s")
        time.sleep(0.005)


def ring_torture(name, seed, policy, kills, n=4096, readers=2, ring=8, skip=False):
    """SIGKILL the writer or a reader of a ring at random moments, `kills` times, and
    start it again each time (a reader under the same cursor name). Checks: no torn
    payload, counts in order with exact missed counts, no progress stall (0 hangs),
    every cursor still there and caught up at the end (0 lost cursors); under `block`,
    a running reader misses nothing (unless the writer skips counts: `skip`)."""
    import random

    rng = random.Random(seed)
    s = torch_shmem.create(name, shape=(n,), dtype=np.int64, ring=ring, policy=policy)
    rec = ctx.Array("q", rw.REC * readers + 3, lock=False)
    # the writer stops at rec[wstop_at], the readers (after draining) at rec[rstop_at]
    writes_at, wstop_at, rstop_at = rw.REC * readers, rw.REC * readers + 1, rw.REC * readers + 2
    names = [f"r{i}" for i in range(readers)]
    for cname in names:  # cursors exist before the first write: nothing is missed at start
        s.cursor(cname).close()

    def start(role):
        if role == "writer":
            p = ctx.Process(target=rw.torture_writer, args=(name, n, rec, writes_at, wstop_at, skip))
        else:
            i = names.index(role)
            p = ctx.Process(target=rw.torture_reader, args=(name, role, i, rec, rstop_at))
        p.start()
        return p

    def last(role):
        return rec[names.index(role) * rw.REC]

    def starts(role):
        return rec[names.index(role) * rw.REC + 5]

    procs = {role: start(role) for role in ["writer", *names]}
    killed = {role: 0 for role in procs}
    try:
        for role in names:
            _wait_until(lambda: starts(role) >= 1, 60, f"reader {role} starting")
        for _ in range(kills):
            time.sleep(rng.uniform(0.02, 0.15))
            role = rng.choice(list(procs))
            before = s.count
            os.kill(procs[role].pid, signal.SIGKILL)
            procs[role].join(30)
            assert procs[role].exitcode == -signal.SIGKILL
            killed[role] += 1
            n_starts = starts(role) if role != "writer" else 0
            procs[role] = start(role)
            if role != "writer":
                _wait_until(lambda: starts(role) > n_starts, 60, f"reader {role} restarting")
            # everyone moves on: the writer publishes, every reader consumes past `before`
            _wait_until(lambda: s.count > before + 2, 30, f"writes after killing the {role}")
            for r in names:
                _wait_until(lambda: last(r) > before, 30, f"reader {r} after killing the {role}")
        rec[wstop_at] = 1
        procs["writer"].join(30)
        assert procs["writer"].exitcode == 0
        final = s.count
        for r in names:
            _wait_until(lambda: last(r) >= final, 30, f"reader {r} draining to {final}")
        rec[rstop_at] = 1
        for r in names:
            procs[r].join(30)
            assert procs[r].exitcode == 0
    finally:
        rec[wstop_at] = rec[rstop_at] = 1
        for p in procs.values():
            _stop(p)
    stat = torch_shmem.stat(name)
    cursors = {c["name"]: c for c in stat["ring"]["cursors"]}
    fig = {"policy": policy, "kills": killed, "publications": final, "drops": stat["ring"]["drops"]}
    assert sorted(cursors) == names, cursors  # none lost, none leaked
    for i, r in enumerate(names):
        last_count, reads, torn, disorder, missed_running, n_starts = rec[i * rw.REC:(i + 1) * rw.REC]
        fig[r] = {"reads": reads, "torn": torn, "disorder": disorder,
                  "missed_while_running": missed_running, "starts": n_starts}
        assert torn == 0 and disorder == 0, fig
        assert cursors[r]["consumed"] == final and last_count == final, (fig, cursors[r])
        if policy == "block" and not skip:
            assert missed_running == 0, fig
    assert stat["state"] == "ok"  # the last writer stopped after a complete write
    return fig


@pytest.mark.parametrize("policy", ["block", "overwrite", "drop_newest"])
def test_ring_crash_torture_short(name, seed, policy):
    fig = ring_torture(name, seed, policy, kills=8)
    print(fig)


@pytest.mark.parametrize("policy", ["block", "overwrite", "drop_newest"])
def test_ring_crash_torture_skipping_writer_short(name, seed, policy):
    """The torture with a writer that often skips counts (by less than the ring, a ring,
    or more): killed mid-skip, it leaves nothing a reader takes for a publication."""
    fig = ring_torture(name, seed, policy, kills=8, skip=True)
    print(fig)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["block", "overwrite", "drop_newest"])
def test_ring_crash_torture_full(name, seed, policy):
    fig = ring_torture(name, seed, policy, kills=100, n=64 * 1024, readers=3)
    print(fig)


# ----------------------------------------------------------------- asyncio

@pytest.mark.parametrize("mode", ["fd", "thread"])
def test_read_next_async(name, mode, monkeypatch):
    """read_next_async hands out every publication once, in order, without blocking the
    loop (a ticker task keeps running while it waits); times out; two tasks sharing a
    cursor split the publications; a cancelled wait consumes nothing."""
    import asyncio
    import threading

    monkeypatch.setenv("TORCH_SHMEM_ASYNC_WAIT", mode)
    s = torch_shmem.create(name, shape=(3,), dtype=np.int64, ring=8, policy="block")
    r = torch_shmem.open(name, reader="a")
    c2 = torch_shmem.open(name).cursor("b")

    def produce(first, n, gap):
        for c in range(first, first + n):
            time.sleep(gap)
            s.write(rw.make_payload(c, 3), timeout=10)

    async def main():
        ticks = 0
        stop = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.ensure_future(ticker())
        with pytest.raises(TimeoutError, match="timed out"):
            await r.read_next_async(timeout=0.05)
        with pytest.raises(ValueError, match="timeout"):
            await r.read_next_async(timeout=-1)
        waiter = asyncio.ensure_future(r.read_next_async(timeout=5))
        await asyncio.sleep(0.02)
        waiter.cancel()  # consumes nothing
        with pytest.raises(asyncio.CancelledError):
            await waiter
        th = threading.Thread(target=produce, args=(1, 6, 0.01))
        th.start()
        got = [await r.read_next_async(timeout=10) for _ in range(6)]
        th.join()
        assert [p.count for p in got] == [1, 2, 3, 4, 5, 6]
        assert all(rw.payload_ok(p.payload, p.count) and p.missed_publications == 0 for p in got)
        # two tasks on one cursor: each publication to exactly one of them
        th = threading.Thread(target=produce, args=(7, 6, 0.005))
        th.start()

        async def drain(k):
            return [(await c2.read_next_async(timeout=10)).count for _ in range(k)]

        b = await asyncio.gather(drain(6), drain(6))
        th.join()
        stop.set()
        await t
        return ticks, b

    ticks, b = asyncio.run(main())
    assert ticks > 20  # the loop kept running while the reads waited
    assert sorted(b[0] + b[1]) == list(range(1, 13)) and b[0] == sorted(b[0]) and b[1] == sorted(b[1])
    assert r._reader.consumed == 6


def test_read_ahead_and_advance_a_held_cursor(name):
    """ring_read_at copies publication c without moving any cursor; cursor_advance moves a
    cursor this process holds forward (never back) and wakes a writer waiting for room
    (the reliable bridge's server reads ahead and advances on acknowledgement)."""
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64, ring=4, policy="block")
    cur = w.cursor("ahead")
    for k in range(1, 5):
        w.write(np.full(4, k), frame_id=10 + k)
    arr, count, _, fid = w._h.ring_read_at(3)
    assert (arr.tolist(), count, fid) == ([3] * 4, 3, 13) and cur.consumed == 0
    with pytest.raises(TimeoutError):  # the held cursor at 0 keeps every slot
        w.write(np.full(4, 5), timeout=0.05)
    assert w._h.cursor_advance(cur._index, 2) == 2 and cur.consumed == 2
    assert w._h.cursor_advance(cur._index, 1) == 2  # never back
    w.write(np.full(4, 5), timeout=1.0)
    w.write(np.full(4, 6), timeout=1.0)
    assert w._h.ring_read_at(1) is None and w._h.ring_read_at(2) is None  # rewritten
    assert w._h.ring_read_at(6)[0].tolist() == [6] * 4
    for bad in (0, 7):
        with pytest.raises(ValueError, match="not in 1..count"):
            w._h.ring_read_at(bad)
    with pytest.raises(ValueError, match="past count 6"):
        w._h.cursor_advance(cur._index, 7)
    p = cur.read_next(timeout=0)
    assert (p.count, p.missed_publications) == (3, 0)
    cur.close()
    with pytest.raises(RuntimeError, match="not held by this process"):
        w._h.cursor_advance(cur._index, 4)
    w.close()
