"""torch_shmem.bridge, reliable mode: rings carried over ZeroMQ (docs/bridge.md, "Rings").

Every publication of a CPU ring reaches each remote subscriber in order,
with the source's counts, under credit-based flow control: a full window is
a full ring, so the rings' policies hold end to end. Servers and
attachments run in this process (background threads) or in spawned
children; endpoints bind port 0 and are read back.
"""

import importlib.util
import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np
import pytest

import torch_shmem
from _workers import frame_seq, make_frame

pytestmark = pytest.mark.cpu

HAVE_ZMQ = importlib.util.find_spec("zmq") is not None
if not HAVE_ZMQ:
    pytest.skip("pyzmq is not installed (pip install 'torch_shmem[bridge]')", allow_module_level=True)

import zmq  # noqa: E402

import _bridge_workers as W  # noqa: E402
from test_bridge import _cli, _readline, wait_until  # noqa: E402
from torch_shmem import bridge  # noqa: E402
from torch_shmem._bridge_ring import (  # noqa: E402
    CTRL_ACK,
    CTRL_HELLO,
    decode_control,
    encode_control,
    ring_flags,
    ring_from_flags,
)

ctx = mp.get_context("spawn")


@pytest.fixture
def names():
    """Stream names unique to the test; unlinked (with bridge sidecars) afterwards."""
    made = []

    def make(tag):
        n = f"rb_{tag}_{os.getpid()}_{len(made)}_{time.monotonic_ns() % 1_000_000}"
        made.append(n)
        return n

    yield make
    for n in made:
        torch_shmem.unlink(n)
        torch_shmem.unlink(n + ".bridge")


def start_server(src_name, bind):
    """A bridge server for `src_name` in a spawned child: (process, endpoint)."""
    ready, stop = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=W.serve, args=(src_name, bind, ready, stop, {}), daemon=True)
    p.start()
    return p, ready.get(timeout=30)


def read_all(shm, n, timeout=20.0):
    """n publications from the handle's cursor: (count, frame k, frame_id, missed)."""
    out = []
    for _ in range(n):
        p = shm.read_next(timeout=timeout)
        out.append((p.count, frame_seq(p.payload), p.frame_id, p.missed_publications))
    return out


@pytest.mark.parametrize("n", [512, 32768])  # 4 KiB (copied into messages), 256 KiB (zero-copy)
def test_every_publication_arrives_in_order_with_its_count(names, n):
    src_name, dst_name = names("src"), names("dst")
    total = 1500 if n == 512 else 200
    src = torch_shmem.create(src_name, shape=(n,), dtype=np.uint64, ring=8, policy="block")
    with bridge.serve(src_name) as srv:
        assert isinstance(srv, bridge.RingBridgeServer)
        with bridge.attach(srv.endpoint, dst_name, reliable=True, window=4) as att:
            assert isinstance(att, bridge.RingBridgeAttachment)
            dst = torch_shmem.open(dst_name, reader="consumer")
            assert dst.ring == 8 and dst.policy == "block"  # the source ring's, by default
            got = []
            reader = threading.Thread(target=lambda: got.extend(read_all(dst, total)))
            reader.start()
            for k in range(1, total + 1):
                src.write(make_frame(k, n), frame_id=1000 + k, timeout=20)
            reader.join(60)
            assert not reader.is_alive()
            assert got == [(k, k, 1000 + k, 0) for k in range(1, total + 1)]
            cursor = att.stat()["cursor"]
            wait_until(lambda: srv.stat()["subscribers"][cursor]["acknowledged"] == total, 10,
                       "the last acknowledgement")
            sub = srv.stat()["subscribers"][cursor]
            assert sub["live"] and sub["lag"] == 0 and sub["in_flight"] == 0
            assert sub["window"] == 4
            st = att.stat()
            assert st["delivered"] == total and st["skipped"] == 0 and st["duplicates"] == 0
            assert st["link"] == "up" and st["mode"] == "reliable"
            dst.close()
    src.unlink()


def test_block_holds_the_source_writer_end_to_end(names):
    """A local reader that stops holds the attachment, the window, the server's cursor and
    finally the source's writer; when it reads again everything arrives, nothing lost."""
    src_name, dst_name = names("src"), names("dst")
    src = torch_shmem.create(src_name, shape=(64,), dtype=np.uint64, ring=4, policy="block")
    dst = torch_shmem.create(dst_name, shape=(64,), dtype=np.uint64, ring=4, policy="block")
    cur = dst.cursor("consumer")  # registered, not reading
    with bridge.serve(src_name) as srv, \
            bridge.attach(srv.endpoint, dst_name, reliable=True, window=2):
        written = 0
        with pytest.raises(TimeoutError):
            for k in range(1, 100):
                src.write(make_frame(k, 64), timeout=0.5)
                written = k
        # local ring 4 + the one the attachment holds + window 2 + source ring 4 (+1 read ahead)
        assert 4 <= written <= 12, written
        got = [cur.read_next(timeout=10) for _ in range(written)]
        assert [frame_seq(p.payload) for p in got] == list(range(1, written + 1))
        assert [p.count for p in got] == list(range(1, written + 1))
        for k in range(written + 1, written + 21):  # the writer runs again, one at a time
            src.write(make_frame(k, 64), timeout=10)
            p = cur.read_next(timeout=10)
            assert (p.count, frame_seq(p.payload), p.missed_publications) == (k, k, 0)
    cur.close()
    dst.close()
    src.unlink()


def test_overwrite_gaps_at_the_source_are_exact_on_the_far_side(names):
    """Under overwrite at the source, a stalled subscriber's cursor skips; the far ring keeps
    the source counts, so its readers' missed_publications say exactly what was lost."""
    src_name, dst_name = names("src"), names("dst")
    src = torch_shmem.create(src_name, shape=(64,), dtype=np.uint64, ring=4, policy="overwrite")
    dst = torch_shmem.create(dst_name, shape=(64,), dtype=np.uint64, ring=64, policy="block")
    hold = dst.cursor("holder")  # a block ring with a cursor that lags: stalls the attachment
    with bridge.serve(src_name) as srv, \
            bridge.attach(srv.endpoint, dst_name, reliable=True, window=2, policy="block"):
        total = 200
        for k in range(1, total + 1):
            src.write(make_frame(k, 64), frame_id=k)  # never waits (overwrite)
        time.sleep(0.2)
        seen, missed, last = [], 0, 0
        deadline = time.monotonic() + 20
        while last < total and time.monotonic() < deadline:
            p = hold.read_next(timeout=10)
            assert frame_seq(p.payload) == p.count == p.frame_id  # the source's counts
            assert p.count > last
            missed += p.missed_publications
            assert p.missed_publications == p.count - last - 1
            last = p.count
            seen.append(p.count)
        assert last == total
        assert len(seen) + missed == total and missed > 0, (len(seen), missed)
    hold.close()
    dst.close()
    src.unlink()


def test_an_attachment_resumes_under_its_cursor_name(names):
    src_name, dst_name = names("src"), names("dst")
    src = torch_shmem.create(src_name, shape=(64,), dtype=np.uint64, ring=16, policy="block")
    with bridge.serve(src_name) as srv:
        att = bridge.attach(srv.endpoint, dst_name, reliable=True, cursor="far")
        dst = torch_shmem.open(dst_name, reader="c")
        for k in range(1, 11):
            src.write(make_frame(k, 64), timeout=10)
        assert [r[1] for r in read_all(dst, 10)] == list(range(1, 11))
        att.close()
        for k in range(11, 16):  # made while no attachment runs: the server's cursor keeps them
            src.write(make_frame(k, 64), timeout=10)
        att = bridge.attach(srv.endpoint, dst_name, reliable=True, cursor="far")
        try:
            got = read_all(dst, 5)
            assert [(c, k, missed) for c, k, _, missed in got] == [(k, k, 0) for k in range(11, 16)]
            assert srv.stat()["subscribers"]["far"]["live"]
        finally:
            att.close()
        dst.close()
    src.unlink()


def test_a_second_subscriber_under_a_held_cursor_name_is_refused(names):
    src_name = names("src")
    src = torch_shmem.create(src_name, shape=(8,), dtype=np.uint64, ring=4)
    with bridge.serve(src_name) as srv, \
            bridge.attach(srv.endpoint, names("a"), reliable=True, cursor="shared"):
        with pytest.raises(RuntimeError, match="held by another live subscriber"):
            bridge.attach(srv.endpoint, names("b"), reliable=True, cursor="shared", timeout=5)
        assert srv.stat()["refused"] == 1
    src.unlink()


def test_the_wrong_mode_is_explained(names):
    ring_name, plain_name = names("ring"), names("plain")
    ring = torch_shmem.create(ring_name, shape=(8,), dtype=np.uint64, ring=4)
    plain = torch_shmem.create(plain_name, shape=(8,), dtype=np.uint64)
    with bridge.serve(ring_name) as rsrv:
        with pytest.raises(RuntimeError, match="ring server"):
            bridge.attach(rsrv.endpoint, names("x"), timeout=10)
    with bridge.serve(plain_name) as psrv:
        assert type(psrv) is bridge.BridgeServer
        with pytest.raises(RuntimeError, match="latest-value server"):
            bridge.attach(psrv.endpoint, names("y"), reliable=True, timeout=10)
    with pytest.raises(ValueError, match="not a ring"):
        bridge.serve(plain_name, reliable=True)
    # a ring can still be served as a latest-value stream
    with bridge.serve(ring_name, reliable=False) as lsrv:
        assert type(lsrv) is bridge.BridgeServer
        ring.write(np.arange(8, dtype=np.uint64))
        with bridge.attach(lsrv.endpoint, names("z"), timeout=10) as att:
            wait_until(lambda: att.stat()["delivered"] >= 1, 10, "the latest value")
    ring.unlink()
    plain.unlink()


def test_garbage_and_malformed_control_messages_are_counted_and_dropped(names):
    src_name, dst_name = names("src"), names("dst")
    src = torch_shmem.create(src_name, shape=(8,), dtype=np.uint64, ring=4)
    with bridge.serve(src_name) as srv:
        c = zmq.Context.instance()
        rogue = c.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(srv.endpoint)
        bad = [
            b"",
            b"garbage" * 10,
            encode_control(CTRL_HELLO, 8, 0, "x")[:-1],  # truncated name
            encode_control(CTRL_HELLO, 0, 0, "x"),  # window 0
            encode_control(CTRL_HELLO, 8, 0, ""),  # no cursor name
            encode_control(CTRL_HELLO, 8, 0, "n" * 65),  # cursor name too long
            b"TSHC" + encode_control(CTRL_ACK, 8, 0)[4:6] + b"\x63\x00" + encode_control(CTRL_ACK, 8, 0)[8:],
        ]
        for msg in bad:
            rogue.send(msg)
        rogue.send_multipart([b"two", b"frames"])
        wait_until(lambda: srv.stat()["malformed"] >= len(bad) + 1, 10, "the malformed count")
        assert srv.stat()["running"] and not srv.stat()["subscribers"]
        rogue.send(encode_control(CTRL_ACK, 8, 5))  # an ACK from nobody: ignored
        with bridge.attach(srv.endpoint, dst_name, reliable=True) as att:
            dst = torch_shmem.open(dst_name, reader="c")
            src.write(make_frame(1, 8))
            assert read_all(dst, 1)[0][:2] == (1, 1)
            assert att.stat()["malformed"] == 0
            dst.close()
        rogue.close(0)
    src.unlink()


def test_control_messages_round_trip_and_reject_bad_input():
    assert decode_control(encode_control(CTRL_HELLO, 8, 42, "cam:1")) == (CTRL_HELLO, 8, 42, "cam:1")
    assert decode_control(encode_control(CTRL_ACK, 256, 2**63)) == (CTRL_ACK, 256, 2**63, "")
    for bad in (b"", b"TSHC", encode_control(CTRL_ACK, 257, 0), encode_control(99, 8, 0),
                b"XXXX" + encode_control(CTRL_ACK, 8, 0)[4:], encode_control(CTRL_ACK, 8, 0) + b"x"):
        with pytest.raises(ValueError):
            decode_control(bad)
    assert ring_from_flags(ring_flags(4096, "drop_newest") | 1) == (4096, "drop_newest")
    with pytest.raises(ValueError):
        ring_from_flags(0)


def test_sigkill_of_the_attachment_releases_the_block_writer(names):
    """A subscriber killed while its cursor holds a block writer: the server releases the
    cursor (its connection is gone, or it stays silent past peer_timeout), the writer goes
    on, and a subscriber that comes back under the name gets the rest, in order, with
    what the source overwrote meanwhile counted exactly as missed."""
    src_name, dst_name = names("src"), names("dst")
    src = torch_shmem.create(src_name, shape=(64,), dtype=np.uint64, ring=4, policy="block")
    # a local block ring whose reader does not read yet: the child's attachment stalls
    dst = torch_shmem.create(dst_name, shape=(64,), dtype=np.uint64, ring=4, policy="block")
    consumer = dst.cursor("holder")
    with bridge.serve(src_name, peer_timeout=1.0) as srv:
        ready, stop = ctx.Queue(), ctx.Event()
        child = ctx.Process(target=W.attach, args=(srv.endpoint, dst_name, ready, stop,
                                                   {"reliable": True, "cursor": "far", "window": 2}),
                            daemon=True)
        child.start()
        assert ready.get(timeout=30) == "ok"
        with pytest.raises(TimeoutError):
            while True:
                src.write(make_frame(src.count + 1, 64), timeout=0.5)
        held = src.count
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        t0 = time.monotonic()
        for _ in range(20):  # released: the writer no longer waits for "far"
            src.write(make_frame(src.count + 1, 64), timeout=5)
        assert time.monotonic() - t0 < 5
        wait_until(lambda: not srv.stat()["subscribers"]["far"]["live"], 5, "the release")
        stats = srv.stat()
        assert stats["unreachable"] + stats["peer_timeouts"] >= 1
        assert src.count == held + 20
        with bridge.attach(srv.endpoint, dst_name, reliable=True, cursor="far"):
            seen, missed, last = [], 0, 0
            while last < src.count:
                p = consumer.read_next(timeout=10)
                assert frame_seq(p.payload) == p.count > last  # the source's counts, in order
                assert p.missed_publications == p.count - last - 1
                missed += p.missed_publications
                last = p.count
                seen.append(p.count)
            assert len(seen) + missed == src.count
            assert missed >= 1  # the source overwrote while no live cursor held it
    consumer.close()
    dst.close()
    src.unlink()


def test_the_attachment_survives_a_server_restart(names):
    """The server (a child) is SIGKILLed and started again on the same port: the attachment
    reconnects, says HELLO, and delivery goes on at the source's counts; what the dead
    server had read but not delivered shows up as a gap, never as a duplicate."""
    src_name, dst_name = names("src"), names("dst")
    src = torch_shmem.create(src_name, shape=(64,), dtype=np.uint64, ring=64, policy="overwrite")

    server, endpoint = start_server(src_name, "tcp://127.0.0.1:0")
    with bridge.attach(endpoint, dst_name, reliable=True, cursor="far") as att:
        dst = torch_shmem.open(dst_name, reader="c")
        for k in range(1, 21):
            src.write(make_frame(k, 64))
        got = read_all(dst, 20)
        os.kill(server.pid, signal.SIGKILL)
        server.join(10)
        for k in range(21, 41):
            src.write(make_frame(k, 64))
        server, _ = start_server(src_name, endpoint)
        try:
            wait_until(lambda: dst.count == 40, 20, "delivery after the restart")
            while dst._reader.lag:
                got += read_all(dst, 1)
            counts = [g[0] for g in got]
            assert counts == sorted(set(counts)) and counts[-1] == 40
            assert all(c == k for c, k, _, _ in got)
            assert len(got) + sum(g[3] for g in got) == 40
            assert att.stat()["server_restarts"] >= 1
        finally:
            os.kill(server.pid, signal.SIGKILL)
            server.join(10)
        dst.close()
    src.unlink()


def test_cli_serves_a_ring_reliably_and_attaches_with_reliable(names):
    src_name, dst_name = names("src"), names("dst")
    src = torch_shmem.create(src_name, shape=(8,), dtype=np.uint64, ring=8, policy="block")
    serve = _cli("serve", src_name)
    attach = None
    try:
        line = _readline(serve, 30)
        assert line.startswith(f"serving {src_name!r} on tcp://127.0.0.1:") and "--reliable" in line, line
        endpoint = line.split()[3]
        attach = _cli("attach", endpoint, "--local-name", dst_name, "--reliable", "--cursor", "cli",
                      "--window", "3", "--timeout", "20")
        assert _readline(attach, 30).startswith(f"attached {endpoint} -> {dst_name!r}")
        dst = torch_shmem.open(dst_name, reader="r")
        got = []
        for k in range(1, 31):  # block at both ends: the reader keeps up, 3 at a time
            src.write(make_frame(k, 8), timeout=20)
            if k % 3 == 0:
                got += read_all(dst, 3)
        assert [g[:2] for g in got] == [(k, k) for k in range(1, 31)]
        assert [c["name"] for c in torch_shmem.stat(src_name)["ring"]["cursors"]] == ["cli"]
        dst.close()
        attach.send_signal(signal.SIGINT)
        assert attach.wait(10) == 0
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(10) == 0
        bad = _cli("attach", endpoint, "--reliable", "--window", "0")
        _, err = bad.communicate(timeout=60)
        assert bad.returncode == 1 and "window" in err
    finally:
        for p in (serve, attach):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
    src.unlink()


def test_a_restarted_attachment_does_not_duplicate_what_it_wrote_but_never_acknowledged(names, monkeypatch):
    """An attachment that wrote publications into its local ring and died before
    acknowledging them: the server still holds them for resending; its successor's HELLO
    names the local ring's count, so none of them is published twice."""
    from torch_shmem import _bridge_ring

    src_name, dst_name = names("src"), names("dst")
    src = torch_shmem.create(src_name, shape=(64,), dtype=np.uint64, ring=16, policy="block")
    with bridge.serve(src_name) as srv:
        real = _bridge_ring.RingBridgeAttachment._send_control

        def no_acks(self, kind, count):
            if kind == CTRL_HELLO:
                real(self, kind, count)

        monkeypatch.setattr(_bridge_ring.RingBridgeAttachment, "_send_control", no_acks)
        att = bridge.attach(srv.endpoint, dst_name, reliable=True, cursor="far", window=8)
        dst = torch_shmem.open(dst_name, reader="c")
        for k in range(1, 6):
            src.write(make_frame(k, 64), timeout=10)
        assert [g[:2] for g in read_all(dst, 5)] == [(k, k) for k in range(1, 6)]
        assert srv.stat()["subscribers"]["far"]["in_flight"] == 5  # written, never acknowledged
        att.close()
        monkeypatch.undo()
        with bridge.attach(srv.endpoint, dst_name, reliable=True, cursor="far"):
            for k in range(6, 11):
                src.write(make_frame(k, 64), timeout=10)
            got = read_all(dst, 5)
            assert [(c, k, missed) for c, k, _, missed in got] == [(k, k, 0) for k in range(6, 11)]
            wait_until(lambda: srv.stat()["subscribers"]["far"]["in_flight"] == 0, 10, "the acknowledgements")
            assert dst.count == 10
        dst.close()
    src.unlink()


def test_a_local_drop_newest_ring_drops_and_counts_what_its_readers_cannot_take(names):
    """The local ring's own policy applies to its own readers: drop_newest drops while its
    cursor lags a full ring (counted), and later publications keep the source's counts."""
    src_name, dst_name = names("src"), names("dst")
    src = torch_shmem.create(src_name, shape=(8,), dtype=np.uint64, ring=64, policy="block")
    with bridge.serve(src_name) as srv:
        with bridge.attach(srv.endpoint, dst_name, reliable=True, ring=4, policy="drop_newest") as att:
            dst = torch_shmem.open(dst_name, reader="slow")
            assert (dst.ring, dst.policy) == (4, "drop_newest")
            for k in range(1, 11):
                src.write(make_frame(k, 8), timeout=10)
            wait_until(lambda: att.stat()["delivered"] + att.stat()["dropped_locally"] == 10, 10,
                       "every publication handled")
            assert att.stat()["dropped_locally"] == 6 and dst.drops == 6
            assert [g[:2] for g in read_all(dst, 4)] == [(k, k) for k in range(1, 5)]
            src.write(make_frame(11, 8), timeout=10)
            (c, k, _, missed), = read_all(dst, 1)
            assert (c, k, missed) == (11, 11, 6)  # the source count; the dropped ones are missed
            dst.close()
    src.unlink()


def test_subscribers_have_their_own_positions(names):
    """Two subscribers of one ring server: each has its own cursor, window and resends.
    With the source under overwrite, a stalled one skips (exactly counted) while the
    other, keeping up with a paced writer, gets every publication."""
    src_name, a_name, b_name = names("src"), names("a"), names("b")
    src = torch_shmem.create(src_name, shape=(64,), dtype=np.uint64, ring=8, policy="overwrite")
    b_ring = torch_shmem.create(b_name, shape=(64,), dtype=np.uint64, ring=4, policy="block")
    b_cur = b_ring.cursor("stalled")  # never reads until the end: holds b's attachment
    with bridge.serve(src_name) as srv, \
            bridge.attach(srv.endpoint, a_name, reliable=True, cursor="a"), \
            bridge.attach(srv.endpoint, b_name, reliable=True, cursor="b", window=2):
        a = torch_shmem.open(a_name, reader="r")
        got_a = []
        reader = threading.Thread(target=lambda: got_a.extend(read_all(a, 200)))
        reader.start()
        for k in range(1, 201):
            src.write(make_frame(k, 64), frame_id=k)
            time.sleep(0.002)  # paced, so that "a" keeps up
        reader.join(30)
        assert [(c, k, missed) for c, k, _, missed in got_a] == [(k, k, 0) for k in range(1, 201)]
        subs = srv.stat()["subscribers"]
        assert set(subs) == {"a", "b"} and subs["a"]["lag"] == 0 and subs["b"]["lag"] > 0
        seen, missed, last = 0, 0, 0
        while last < 200:
            p = b_cur.read_next(timeout=10)
            assert frame_seq(p.payload) == p.count > last
            missed += p.missed_publications
            seen += 1
            last = p.count
        assert seen + missed == 200 and missed > 0
        a.close()
    b_cur.close()
    b_ring.close()
    src.unlink()


def _cursor_position(stream, cursor):
    return {c["name"]: c["consumed"] for c in torch_shmem.stat(stream)["ring"]["cursors"]}[cursor]


def test_the_server_cursor_stands_at_the_last_acknowledged_publication(names):
    """The server reads ahead without consuming: its cursor on the source moves when the
    subscriber acknowledges, so under block the source's writer waits for the far side
    itself, and what was sent but not acknowledged stays in the source ring."""
    src_name, dst_name = names("src"), names("dst")
    src = torch_shmem.create(src_name, shape=(64,), dtype=np.uint64, ring=16, policy="block")
    dst = torch_shmem.create(dst_name, shape=(64,), dtype=np.uint64, ring=4, policy="block")
    hold = dst.cursor("holder")  # does not read: the attachment holds publication 5
    with bridge.serve(src_name) as srv, \
            bridge.attach(srv.endpoint, dst_name, reliable=True, cursor="far", window=6) as att:
        for k in range(1, 11):
            src.write(make_frame(k, 64), timeout=10)
        wait_until(lambda: srv.stat()["sent"] >= 6 and att.stat()["acknowledged"] == 4, 10,
                   "the window to fill")
        time.sleep(0.2)
        assert srv.stat()["sent"] == 10  # 4 acknowledged + a window of 6 in flight
        assert _cursor_position(src_name, "far") == 4  # not 10: only what was acknowledged
        got = [hold.read_next(timeout=10) for _ in range(10)]
        assert [(p.count, frame_seq(p.payload), p.missed_publications) for p in got] == \
            [(k, k, 0) for k in range(1, 11)]
        wait_until(lambda: _cursor_position(src_name, "far") == 10, 10, "the last acknowledgement")
    hold.close()
    dst.close()
    src.unlink()


def test_a_restarted_server_sends_again_what_was_not_acknowledged(names):
    """The server (a child) is SIGKILLed with publications sent and not acknowledged; its
    successor reads them again from the source ring (the cursor stood at the last
    acknowledged count), the attachment drops what it had, and the far ring ends up
    with every publication exactly once."""
    src_name, dst_name = names("src"), names("dst")
    src = torch_shmem.create(src_name, shape=(64,), dtype=np.uint64, ring=64, policy="block")
    dst = torch_shmem.create(dst_name, shape=(64,), dtype=np.uint64, ring=4, policy="block")
    hold = dst.cursor("holder")

    server, endpoint = start_server(src_name, "tcp://127.0.0.1:0")
    with bridge.attach(endpoint, dst_name, reliable=True, cursor="far", window=8) as att:
        for k in range(1, 21):
            src.write(make_frame(k, 64), timeout=10)
        wait_until(lambda: att.stat()["received"] >= 5, 10, "the first publications")
        os.kill(server.pid, signal.SIGKILL)
        server.join(10)
        assert _cursor_position(src_name, "far") < 20
        server, _ = start_server(src_name, endpoint)
        try:
            got = [hold.read_next(timeout=20) for _ in range(20)]
            assert [(p.count, frame_seq(p.payload), p.missed_publications) for p in got] == \
                [(k, k, 0) for k in range(1, 21)]
            assert att.stat()["server_restarts"] >= 1
            assert dst.count == 20
        finally:
            os.kill(server.pid, signal.SIGKILL)
            server.join(10)
    hold.close()
    dst.close()
    src.unlink()
