"""Reliable bridge mode for rings: every publication, in order, to every remote subscriber.

A ring (``create(name, ..., ring=N, policy=...)``) promises each of its
cursors every publication in count order, subject to its policy; the bridge
carries that promise to other hosts. ``serve(name)`` of a CPU ring starts a
:class:`RingBridgeServer` (a ZeroMQ ROUTER socket); ``attach(endpoint,
reliable=True)`` a :class:`RingBridgeAttachment` (a DEALER socket), which
republishes into a local ring at the source's counts. docs/bridge.md
("Rings: the reliable mode") has the usage and the guarantees.

Per subscriber the server holds a cursor on the source ring, named by the
subscriber (so a subscriber that comes back resumes where it left off), and
a window of credits: it reads ahead of the cursor, without moving it, only
while fewer than ``window`` of its publications are unacknowledged, keeps
those in memory until the subscriber acknowledges them (resent after a
reconnection), and then moves the cursor: it stands at the last publication
the far side holds, so a restarted server reads the rest again from the
ring. The attachment acknowledges a publication once it is in the local
ring. So a
full window is a full ring: under ``block`` at both ends a slow local
reader holds the attachment, which holds the server's cursor, which holds
the source's writer; under ``overwrite`` at the source the server's cursor
skips what was overwritten and the local ring shows the same gap
(``missed_publications`` of the far readers count it).

Wire format: the bridge's version-1 messages (``torch_shmem.bridge``), with
kinds 3 (ring publication: header + payload; ``count`` is the source ring
count) and 4 (welcome: header only; ``count`` is the position the cursor
resumes after, ``frame_id`` the window granted); on both, ``flags`` bits 8-9
carry the source ring's policy and bits 16-31 its slots. A refusal is
``MAGIC, version, kind 5`` followed by a UTF-8 reason. Subscribers send
control messages (:func:`encode_control`): HELLO (kind 16: window, the last
source count the local ring holds, the cursor name) and ACK (kind 17: the
window and the last source count delivered, cumulative; also sent every
heartbeat as a keepalive, so a subscriber blocked by its local readers is
not taken for dead).
"""

from __future__ import annotations

import collections
import secrets
import socket
import struct
import time
from typing import Any

import numpy as np

from . import _core
from . import _stream as _api
from .bridge import (
    _POLL_SLICE,
    DEFAULT_BIND,
    KIND_HEARTBEAT,
    KIND_RING_PUBLICATION,
    KIND_RING_WELCOME,
    MAGIC,
    VERSION,
    BridgeAttachment,
    BridgeServer,
    _CpuSink,
)

KIND_RING_REFUSED = 5
CONTROL_MAGIC = b"TSHC"
CTRL_HELLO = 16
CTRL_ACK = 17
_CTRL = struct.Struct("<4sHHIQB")  # magic, version, kind, window, count, name_len; then the name
_REFUSED = struct.Struct("<4sHH")
DEFAULT_WINDOW = 8
MAX_WINDOW = 256
# The server grants at most this many bytes of unacknowledged publications per
# subscriber (it keeps them for resending), and at least 2 publications.
WINDOW_BYTES = 64 * 1024 * 1024
POLICY_CODES = {"overwrite": 0, "block": 1, "drop_newest": 2}
POLICY_NAMES = {v: k for k, v in POLICY_CODES.items()}


def ring_flags(slots: int, policy: str) -> int:
    """The ``flags`` bits of kinds 3 and 4 that describe the source ring."""
    return (int(slots) << 16) | (POLICY_CODES[policy] << 8)


def ring_from_flags(flags: int) -> tuple[int, str]:
    """(slots, policy) from a kind 3 or 4 message's ``flags``; ValueError when invalid."""
    slots, code = flags >> 16, (flags >> 8) & 0xFF
    if slots < 2 or code not in POLICY_NAMES:
        raise ValueError(f"ring message with invalid ring description (slots {slots}, policy code {code})")
    return slots, POLICY_NAMES[code]


def encode_control(kind: int, window: int, count: int, cursor: str = "") -> bytes:
    """A subscriber's control message (HELLO carries the cursor name)."""
    name = cursor.encode("utf-8")
    return _CTRL.pack(CONTROL_MAGIC, VERSION, kind, window, count, len(name)) + name


def decode_control(buf: Any) -> tuple[int, int, int, str]:
    """(kind, window, count, cursor name) of a control message; ValueError when malformed."""
    mv = memoryview(buf).cast("B")
    if mv.nbytes < _CTRL.size:
        raise ValueError(f"control message of {mv.nbytes} bytes is shorter than {_CTRL.size}")
    magic, version, kind, window, count, name_len = _CTRL.unpack_from(mv, 0)
    if magic != CONTROL_MAGIC:
        raise ValueError(f"foreign control message (magic {bytes(magic)!r})")
    if version != VERSION:
        raise ValueError(f"unsupported control message version {version}")
    if kind not in (CTRL_HELLO, CTRL_ACK):
        raise ValueError(f"unknown control message kind {kind}")
    if mv.nbytes != _CTRL.size + name_len:
        raise ValueError(f"control message of {mv.nbytes} bytes, expected {_CTRL.size + name_len}")
    if not 1 <= window <= MAX_WINDOW:
        raise ValueError(f"window {window} outside 1..{MAX_WINDOW}")
    try:
        name = bytes(mv[_CTRL.size:]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"cursor name is not UTF-8: {exc}") from None
    if kind == CTRL_HELLO:
        _api._check_cursor_name(name, "<bridge>")  # ValueError/TypeError as the local API
    return kind, window, count, name


def default_cursor_name(local_name: str | None) -> str:
    """``bridge:<host>[:<local_name>]``, cut to the 64 bytes a cursor name may have."""
    raw = f"bridge:{socket.gethostname()}" + (f":{local_name}" if local_name else "")
    return raw.encode("utf-8")[:_core.MAX_CURSOR_NAME_BYTES].decode("utf-8", "ignore")


# ------------------------------------------------------------------ server side
class _Peer:
    """One subscriber (by cursor name): its cursor on the source, credits and unacknowledged messages."""

    __slots__ = ("name", "identity", "cursor", "window", "unacked", "free", "draining", "last_heard",
                 "last_sent", "delivered", "resent", "next")

    def __init__(self, name: str) -> None:
        self.name = name
        self.identity = b""
        self.cursor: Any = None
        self.window = DEFAULT_WINDOW
        self.unacked: collections.deque = collections.deque()  # (count, buf, tracker), count order
        self.free: list = []  # (buf, target) ready for a read
        self.draining: list = []  # (buf, target, tracker): acknowledged, ZeroMQ may still read it
        self.last_heard = 0.0
        self.last_sent = 0.0
        self.delivered = 0  # last count the subscriber acknowledged
        self.resent = 0
        self.next = 0  # the next count to read and send (0: after the cursor's position)

    @property
    def live(self) -> bool:
        return self.cursor is not None


class RingBridgeServer(BridgeServer):
    """Serves a CPU ring in the reliable mode (made by :func:`torch_shmem.bridge.serve` for rings).

    Arguments as :class:`~torch_shmem.bridge.BridgeServer` (``sndhwm`` does
    not apply: credits bound what is queued), plus ``peer_timeout``: seconds
    without a message from a subscriber after which its cursor is released
    (it no longer holds a ``block`` writer; it keeps its position for the
    subscriber's return); default 4 heartbeats, at least 2 s.
    """

    _socket_type = "ROUTER"

    def __init__(self, name: str, bind: str = DEFAULT_BIND, *, peer_timeout: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(name, bind, **kwargs)
        if peer_timeout is not None and not peer_timeout > 0:
            raise ValueError(f"torch_shmem.bridge: stream {name!r}: peer_timeout must be > 0 s, "
                             f"got {peer_timeout!r}")
        self._peer_timeout = (float(peer_timeout) if peer_timeout is not None
                              else max(2.0, 4 * self._heartbeat))
        self._by_name: dict[str, _Peer] = {}
        self._by_identity: dict[bytes, _Peer] = {}
        self._notifier: Any = None
        self._stats.update(hellos=0, acks=0, refused=0, malformed=0, peer_timeouts=0, resent=0,
                           unreachable=0)

    def _socket_options(self, zmq: Any, sock: Any) -> None:
        # a send to a subscriber that went away fails (EHOSTUNREACH) instead of
        # vanishing: its cursor is released at once
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 0)  # credits bound each subscriber's queue

    def _attach_source(self, source: Any) -> None:
        shm = source.shm
        if shm.ring is None or source.gpu:
            kind = "a GPU ring" if source.gpu else "not a ring"
            if source is not self._source:
                source.close()
            raise ValueError(
                f"torch_shmem.bridge: stream {self.name!r} is {kind}; the reliable mode serves CPU "
                "rings (serve it with reliable=False for latest-value delivery)"
            )
        super()._attach_source(source)
        self._flags |= ring_flags(shm.ring, shm.policy)
        self._max_window = max(2, min(MAX_WINDOW, WINDOW_BYTES // (self._hb + self._payload_bytes)))
        if self._notifier is not None:
            self._notifier.close()
            self._notifier = None
        try:  # readiness descriptor: the loop sleeps in one poll on the socket and the ring
            self._notifier = _core.notifier(self.name, self._instance_id)
        except (RuntimeError, OSError):
            self._notifier = None  # every descriptor taken: the loop polls in short slices
        for peer in self._by_name.values():  # a new generation: the cursors start again
            if peer.cursor is not None:
                self._attach_cursor(peer)
            peer.unacked.clear()
            peer.free.clear()
            peer.draining.clear()
            peer.next = peer.delivered = 0

    def _attach_cursor(self, peer: _Peer) -> str | None:
        """(Re)attach ``peer``'s cursor on the source; the reason when that is refused."""
        try:
            peer.cursor = self._source.shm.cursor(peer.name, timeout=1.0)
        except (RuntimeError, TimeoutError, ValueError, TypeError) as exc:
            peer.cursor = None
            return str(exc)
        return None

    def _check_generation(self) -> None:
        try:
            super()._check_generation()
        except ValueError as exc:  # the name now holds a stream that is not a CPU ring
            self._last_error = str(exc)

    def _release_cursor(self, peer: _Peer) -> None:
        if peer.cursor is not None:
            try:
                peer.cursor.close()
            except RuntimeError:
                pass
            peer.cursor = None
        self._by_identity.pop(peer.identity, None)

    def _release(self) -> None:
        for peer in self._by_name.values():
            self._release_cursor(peer)
        if self._notifier is not None:
            self._notifier.close()
            self._notifier = None
        super()._release()

    # -------------------------------------------------------------- control
    def _refuse(self, identity: bytes, reason: str) -> None:
        self._stats["refused"] += 1
        self._last_error = reason
        try:
            self._sock.send_multipart([identity, _REFUSED.pack(MAGIC, VERSION, KIND_RING_REFUSED)
                                       + reason.encode("utf-8")])
        except self._zmq.ZMQError:
            pass

    def _on_hello(self, identity: bytes, window: int, last: int, name: str, now: float) -> None:
        self._stats["hellos"] += 1
        peer = self._by_name.get(name)
        if peer is None:
            peer = self._by_name[name] = _Peer(name)
        elif peer.live and peer.identity != identity and now - peer.last_heard <= self._peer_timeout:
            # another attachment under this name, or this one's successor after a
            # crash: the holder keeps it while ZeroMQ still has its connection
            if self._send(peer, self._pack_heartbeat(), copy=True):
                self._refuse(identity, f"stream {self.name!r}: cursor {name!r} is held by another "
                                       "live subscriber of this server; give each subscriber its "
                                       "own cursor name")
                return
        self._by_identity.pop(peer.identity, None)
        if peer.cursor is None:
            reason = self._attach_cursor(peer)
            if reason is not None:
                self._refuse(identity, reason)
                return
        peer.identity = identity
        self._by_identity[identity] = peer
        peer.window = min(window, self._max_window)
        peer.last_heard = now
        # what the subscriber already holds is acknowledged; the rest goes again, in order
        self._acknowledge(peer, last)
        # delivery continues after this count: the unacknowledged publications
        # this server still has (sent again below, in order), then the ring from
        # the cursor's position, which is the last acknowledged count (a server
        # that restarted reads again what its predecessor sent unacknowledged)
        if peer.unacked:
            start = peer.unacked[0][0] - 1
        else:
            start = peer.cursor.consumed
            peer.next = start + 1
        buf = self._pack_heartbeat()  # header only: reuse the heartbeat buffer's geometry
        self._pack(buf, KIND_RING_WELCOME, start, peer.window, 0, self._payload_bytes)
        if not self._send(peer, buf, copy=True):
            return
        zero_copy = self._zero_copy
        for i, (count, mbuf, _tracker) in enumerate(list(peer.unacked)):
            tracker = self._send(peer, mbuf, copy=not zero_copy, track=zero_copy)
            if tracker is False:
                return
            peer.unacked[i] = (count, mbuf, tracker if zero_copy else None)  # reused once both are done
            peer.resent += 1
            self._stats["resent"] += 1

    def _acknowledge(self, peer: _Peer, count: int) -> None:
        """The subscriber holds every publication up to ``count``: forget them, and move
        its cursor there (under block, the source's writer may then reuse their slots)."""
        unacked = peer.unacked
        while unacked and unacked[0][0] <= count:
            _, buf, tracker = unacked.popleft()
            peer.draining.append((buf, tracker))  # the last send's tracker: sends are in order
        peer.delivered = max(peer.delivered, count)
        cursor = peer.cursor
        if cursor is None:
            return
        shm = self._source.shm
        to = min(count, shm.count)  # a count past the source's is another generation's
        if to > cursor.consumed:
            try:
                shm._h.cursor_advance(cursor._index, to)
            except RuntimeError:  # released meanwhile (a dead-owner check of a writer)
                self._release_cursor(peer)
                return
            peer.next = max(peer.next, to + 1)

    def _drain_control(self) -> None:
        zmq = self._zmq
        sock = self._sock
        stats = self._stats
        now = time.monotonic()
        while True:
            try:
                identity, msg = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames
                stats["malformed"] += 1
                continue
            try:
                kind, window, count, name = decode_control(msg)
            except (ValueError, TypeError) as exc:
                stats["malformed"] += 1
                self._last_error = f"control message: {exc}"
                continue
            if kind == CTRL_HELLO:
                self._on_hello(identity, window, count, name, now)
                continue
            peer = self._by_identity.get(identity)
            if peer is None or not peer.live:
                continue  # an ACK from before a release: the subscriber says HELLO again
            stats["acks"] += 1
            peer.last_heard = now
            peer.window = min(window, self._max_window)
            self._acknowledge(peer, count)

    # -------------------------------------------------------------- sending
    def _send(self, peer: _Peer, buf: Any, *, copy: bool, track: bool = False) -> Any:
        """Send ``buf`` to ``peer``; its tracker (or True); False when it is unreachable (released)."""
        zmq = self._zmq
        try:
            self._sock.send(peer.identity, zmq.SNDMORE)
            tracker = self._sock.send(buf, copy=copy, track=track)
        except zmq.ZMQError as exc:
            self._stats["unreachable" if exc.errno == zmq.EHOSTUNREACH else "send_errors"] += 1
            self._last_error = f"send to {peer.name!r}: {exc}"
            self._release_cursor(peer)
            return False
        peer.last_sent = self._last_send = time.monotonic()
        return tracker if track else True

    def _buffer(self, peer: _Peer) -> tuple[Any, Any]:
        if peer.free:
            return peer.free.pop()
        for i, (buf, tracker) in enumerate(peer.draining):
            if tracker is None or tracker.done:
                del peer.draining[i]
                return buf, self._source.payload_target(buf, self._hb)
        return self._make_buffer()

    def _read_ahead(self, peer: _Peer, target: Any) -> tuple | None:
        """Publication ``peer.next`` (or the first later one the ring still holds) into
        ``target``, without moving the cursor: (count, write_time_ns, frame_id), or None
        when there is nothing new. The cursor stays at the last acknowledged count, so
        under block and drop_newest no slot read here is rewritten before that."""
        shm = self._source.shm
        h = shm._h
        latest = h.count()
        if peer.next == 0:
            peer.next = peer.cursor.consumed + 1
        while peer.next <= latest:
            got = h.ring_read_at(peer.next, target)
            if got is not None:
                return got[1:]
            # overwritten (overwrite policy) or skipped by the writer: lost for this
            # subscriber; the far ring shows the gap
            skip_to = max(peer.next + 1, latest - shm.ring + 1)
            self._stats["skipped"] += skip_to - peer.next
            peer.next = skip_to
        return None

    def _pump(self) -> bool:
        """One publication to each subscriber that has credit and one to read; True if any went."""
        sent = False
        for peer in list(self._by_identity.values()):
            if not peer.live or len(peer.unacked) >= peer.window:
                continue
            buf, target = self._buffer(peer)
            try:
                got = self._read_ahead(peer, target)
            except (_api.StaleStreamError, ValueError, RuntimeError) as exc:
                peer.free.append((buf, target))
                self._last_error = f"reading {self.name!r} for {peer.name!r}: {exc}"
                self._check_generation()
                return sent
            if got is None:
                peer.free.append((buf, target))
                continue
            count, write_ns, frame_id = got
            peer.next = count + 1
            self._pack(buf, KIND_RING_PUBLICATION, count, frame_id, write_ns, self._payload_bytes)
            zero_copy = self._zero_copy
            tracker = self._send(peer, buf, copy=not zero_copy, track=zero_copy)
            # kept until acknowledged, also when the send failed (the subscriber is
            # released, and this publication goes again when it says HELLO)
            peer.unacked.append((count, buf, tracker if zero_copy and tracker is not False else None))
            if tracker is False:
                continue
            self._last_count = count
            self._stats["sent"] += 1
            self._stats["bytes_sent"] += len(buf)
            sent = True
        return sent

    def _wait_position(self) -> int | None:
        """The lowest count sent among subscribers with credit (wait for a publication past it)."""
        positions = [(p.next - 1 if p.next else p.cursor.consumed) for p in self._by_identity.values()
                     if p.live and len(p.unacked) < p.window]
        return min(positions) if positions else None

    def _housekeeping(self, now: float) -> None:
        self._drain_monitor()
        for peer in list(self._by_identity.values()):
            if now - peer.last_heard > self._peer_timeout:
                self._stats["peer_timeouts"] += 1
                self._release_cursor(peer)  # keeps its unacknowledged messages for a HELLO
            elif now - peer.last_sent >= self._heartbeat:
                self._stats["heartbeats"] += 1
                self._send(peer, self._pack_heartbeat(), copy=True)

    def _loop(self) -> None:
        zmq = self._zmq
        self._seq = 0
        self._last_send = time.monotonic()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        fd = None
        next_generation_check = time.monotonic() + 1.0
        next_housekeeping = 0.0
        while not self._stop.is_set():
            self._drain_control()
            sent = self._pump()
            now = time.monotonic()
            if now >= next_housekeeping:  # also while publications stream out
                next_housekeeping = now + 0.05
                self._housekeeping(now)
                if now >= next_generation_check:
                    next_generation_check = now + 1.0
                    self._check_generation()
            if sent:
                continue
            after = self._wait_position()
            wait = _POLL_SLICE
            notifier = self._notifier
            if after is not None:
                if notifier is None:
                    wait = 0.002  # no descriptor: look at the ring every 2 ms
                else:
                    notifier.arm(after)  # readable now if the ring is already past it
            new_fd = notifier.fileno() if notifier is not None and after is not None else None
            if new_fd != fd:
                if fd is not None:
                    poller.unregister(fd)
                if new_fd is not None:
                    poller.register(new_fd, zmq.POLLIN)
                fd = new_fd
            poller.poll(int(wait * 1000))

    # -------------------------------------------------------------- status
    def stat(self) -> dict:
        """As :meth:`BridgeServer.stat`, plus ``subscribers``: per cursor name, its state and lag."""
        info = super().stat()
        shm = self._source.shm if self._source is not None else None
        count = shm.count if shm is not None and not shm.closed else 0
        subs = {}
        for name, peer in list(self._by_name.items()):  # the loop's thread may add one
            cursor = peer.cursor
            try:
                consumed = cursor.consumed if cursor is not None else None
            except RuntimeError:  # released meanwhile
                consumed = None
            subs[name] = dict(
                live=consumed is not None,
                window=peer.window,
                in_flight=len(peer.unacked),
                acknowledged=peer.delivered,
                consumed=consumed,
                lag=None if consumed is None else max(0, count - consumed),
                resent=peer.resent,
            )
        info.update(mode="reliable", ring=shm.ring if shm is not None else None,
                    policy=shm.policy if shm is not None else None, subscribers=subs,
                    connections=sum(1 for p in self._by_name.values() if p.live))
        return info


# ------------------------------------------------------------------ attached side
class _RingSink(_CpuSink):
    """Writes into the local ring at the source's counts (its policy applies);
    a ``drop_newest`` ring that drops returns the count unchanged."""

    def write(self, payload: np.ndarray, frame_id: int, timeout: float, count: int) -> bool:
        """True when published, False when the local ring's policy dropped it."""
        shm = self.shm
        if self.offset is None:
            self.offset = max(0, shm.count + 1 - count)
        target = count + self.offset
        published = shm._write_at(payload, target, frame_id, timeout)
        if published == target:
            return True
        if published < target:
            return False  # dropped by drop_newest (the count stayed): the offset stands
        self.offset = published - count  # someone else published locally in between
        return True


class RingBridgeAttachment(BridgeAttachment):
    """Subscribes to a :class:`RingBridgeServer` and republishes every publication into a local ring.

    Made by :func:`torch_shmem.bridge.attach` with ``reliable=True``.
    Arguments as :class:`~torch_shmem.bridge.BridgeAttachment` (CPU local
    streams only; ``frame_id="source"``), plus:

    - ``cursor``: the name of this subscriber's cursor on the source ring
      (default ``bridge:<host>[:<local_name>]``): an attachment that comes
      back under the same name resumes where the last one stopped.
    - ``window``: publications in flight (sent, not yet acknowledged),
      1 to 256 (default 8; the server may grant fewer for large frames).
    - ``ring``, ``policy``: of the local ring when it is made here (default:
      the source ring's); an existing local stream must be a ring of the
      source's shape and dtype.
    """

    _socket_type = "DEALER"
    _other_mode = ("a latest-value server: attach to it without reliable=True")

    def __init__(self, endpoint: str, local_name: str | None = None, *, cursor: str | None = None,
                 window: int = DEFAULT_WINDOW, ring: int | None = None, policy: str | None = None,
                 **kwargs: Any) -> None:
        if kwargs.get("gpu_device") is not None:
            raise ValueError("torch_shmem.bridge: the reliable mode republishes into CPU rings; "
                             "gpu_device is not supported with reliable=True")
        if kwargs.get("frame_id", "source") != "source":
            raise ValueError("torch_shmem.bridge: the reliable mode keeps the source's counts; "
                             "frame_id='count' is not needed (and not supported) with reliable=True")
        if not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
            raise ValueError(f"torch_shmem.bridge: window must be an int in 1..{MAX_WINDOW}, got {window!r}")
        if policy is not None and policy not in POLICY_CODES:
            raise ValueError(f"torch_shmem.bridge: policy must be one of {sorted(POLICY_CODES)}, got {policy!r}")
        if kwargs.get("shape") is not None and ring is None:
            raise ValueError("torch_shmem.bridge: with shape and dtype, give ring=N too (the local "
                             "ring is made before the server is heard)")
        super().__init__(endpoint, local_name, **kwargs)
        self._cursor_name = _api._check_cursor_name(
            cursor if cursor is not None else default_cursor_name(local_name), "<bridge>")
        self._window = window
        self._want_ring = ring
        self._want_policy = policy
        self._source_ring: tuple[int, str] | None = None
        self._acked = 0  # last count acknowledged to the server
        self._last_ack = 0.0
        self._hello_due = True
        # one routing id for the attachment's life: a reconnection is the same
        # subscriber to the server, another attachment under the cursor name is not
        self._routing_id = b"\x01" + secrets.token_bytes(15)
        self._stats.update(welcomes=0, acks_sent=0, hellos_sent=0, dropped_locally=0, refused=0)

    def _socket_options(self, zmq: Any, sock: Any) -> None:
        sock.setsockopt(zmq.RCVHWM, 0)  # the window bounds what the server sends
        sock.setsockopt(zmq.ROUTING_ID, self._routing_id)

    def _make_sink(self, shm: Any) -> Any:
        return _RingSink(shm)

    def _create_or_open_local(self, name: str, shape: tuple, dtype: np.dtype) -> Any:
        slots, policy = self._source_ring or (None, None)
        slots = self._want_ring or slots
        policy = self._want_policy or policy or "overwrite"
        try:
            shm = _api.create(name, shape=shape, dtype=dtype, mode=self._mode, ring=slots, policy=policy)
        except FileExistsError:
            shm = _api.open(name)
            if tuple(shm.shape) != tuple(shape) or shm.dtype != dtype or shm.ring is None or shm.gpu_enabled:
                got = (tuple(shm.shape), str(shm.dtype), shm.ring)
                shm.close()
                raise ValueError(
                    f"torch_shmem.bridge: stream {name!r} exists with shape {got[0]}, dtype "
                    f"{got[1]} and ring {got[2]}; the reliable bridge from {self.endpoint} needs a "
                    f"CPU ring of shape {tuple(shape)} and dtype {dtype}: unlink it or pick another "
                    "local_name"
                ) from None
        return shm

    # -------------------------------------------------------------- control
    def _send_control(self, kind: int, count: int) -> None:
        zmq = self._zmq
        name = self._cursor_name if kind == CTRL_HELLO else ""
        try:
            self._sock.send(encode_control(kind, self._window, count, name), zmq.NOBLOCK)
        except zmq.ZMQError:
            return  # not connected yet: HELLO goes again on the handshake
        self._last_ack = time.monotonic()
        if kind == CTRL_HELLO:
            self._stats["hellos_sent"] += 1
        else:
            self._stats["acks_sent"] += 1
            self._acked = count

    def _local_count(self) -> int:
        """The local ring's count (0 when it does not exist yet): it holds the source's
        counts, so what it has needs no resend (an attachment restarted after writing
        a publication it had not acknowledged)."""
        if self._local is not None and not self._local.closed:
            return self._local.count
        if self._local_name is None:
            return 0
        try:
            with _api.open(self._local_name, readonly=True) as shm:
                return shm.count if shm.ring is not None else 0
        except (FileNotFoundError, PermissionError, ValueError, RuntimeError):
            return 0

    def _hello(self) -> None:
        self._send_control(CTRL_HELLO, self._delivered_count or self._local_count())
        self._hello_due = False

    def _keepalive(self, now: float) -> None:
        if now - self._last_ack >= min(self._heartbeat_ms / 1000.0, 1.0):
            self._send_control(CTRL_ACK, self._delivered_count)

    def _new_generation(self) -> None:
        super()._new_generation()
        self._acked = 0

    def _on_monitor(self) -> None:
        was_up = self._handshake_ok
        super()._on_monitor()
        if self._handshake_ok and not was_up:
            self._hello_due = True  # a (re)connection: the server may not know us

    # -------------------------------------------------------------- loop
    def _loop(self) -> None:
        poller = self._poller()
        while not self._stop.is_set():
            events = self._poll(poller)
            if self._hello_due and self._handshake_ok:
                self._hello()
            if self._sock in events:
                while not self._stop.is_set():
                    frame = self._recv_waiting()
                    if frame is None:
                        break
                    self._on_ring_message(frame)
                if self._delivered_count != self._acked:
                    self._send_control(CTRL_ACK, self._delivered_count)
            now = time.monotonic()
            if self._handshake_ok:
                self._keepalive(now)
                # silent for 3 heartbeats while connected: the server may have lost us
                if self._last_message and now - self._last_message > 3 * self._heartbeat_ms / 1000.0:
                    self._hello_due = True
                    self._last_message = now
            self._check_local(now)
            self._write_sidecar()

    def _on_ring_message(self, frame: Any) -> None:
        stats = self._stats
        buf = frame.buffer
        if len(buf) >= _REFUSED.size and bytes(buf[:4]) == MAGIC:
            magic, version, kind = _REFUSED.unpack_from(buf, 0)
            if kind == KIND_RING_REFUSED:
                stats["refused"] += 1
                reason = bytes(buf[_REFUSED.size:]).decode("utf-8", "replace")
                self._error = f"refused by {self.endpoint}: {reason}"
                if not self._ready.is_set():
                    self._fatal = RuntimeError(f"torch_shmem.bridge: {self._error}")
                return
        try:
            h, session, count, frame_id, write_ns, payload = self._decode(buf)
            if h.kind != KIND_HEARTBEAT:
                ring = ring_from_flags(h.flags)
        except ValueError as exc:
            stats["malformed"] += 1
            self._last_drop = str(exc)
            return
        if h.kind not in (KIND_HEARTBEAT, KIND_RING_PUBLICATION, KIND_RING_WELCOME):
            stats["malformed"] += 1
            self._last_drop = f"message kind {h.kind} on a reliable link"
            return
        self._note_message(h, session)
        if h.kind == KIND_HEARTBEAT:
            stats["heartbeats"] += 1
            self._source_count = max(self._source_count, count)
            return
        self._source_ring = ring
        if not self._ensure_local(h):
            stats["mismatched"] += 1
            return
        if h.kind == KIND_RING_WELCOME:
            stats["welcomes"] += 1
            if not self._delivered_count:
                self._delivered_count = count  # the cursor's position: nothing before it is missed
            self._ready.set()
            return
        stats["received"] += 1
        self._source_count = max(self._source_count, count)
        if count <= self._delivered_count:
            stats["duplicates"] += 1  # a resend of what the local ring has
            return
        array = np.frombuffer(payload, dtype=h.dtype, count=self._local_size).reshape(h.shape)
        while True:
            try:
                published = self._sink.write(array, frame_id, _POLL_SLICE, count)
                break
            except TimeoutError:
                # the local ring is full (block) or its lock is held: keep the server
                # told that this subscriber lives, and wait on
                stats["write_timeouts"] += 1
                if self._stop.is_set():
                    return
                self._keepalive(time.monotonic())
        stats["delivered" if published else "dropped_locally"] += 1
        self._note_delivery(count, frame_id, write_ns)

    def stat(self) -> dict:
        """As :meth:`BridgeAttachment.stat`, plus ``mode``, ``cursor``, ``window`` and the source ring."""
        info = super().stat()
        slots, policy = self._source_ring or (None, None)
        info.update(mode="reliable", cursor=self._cursor_name, window=self._window,
                    acknowledged=self._acked, source_ring=slots, source_policy=policy)
        return info
