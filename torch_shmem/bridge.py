"""Carry a stream to other hosts over ZeroMQ: a stream on one machine is a stream on many.

``serve(name)`` publishes the publications of a local stream on a ZeroMQ
socket; ``attach(endpoint)`` on another host subscribes to it and republishes
every publication it receives into a local stream of the same shape and
dtype, so NumPy readers, torch ops and the CLI there see an ordinary stream.
Needs pyzmq (``pip install torch_shmem[bridge]``); it is imported when a
bridge is made, never by ``import torch_shmem``. docs/bridge.md has the
usage, the wire format, the security model and the limits.

Wire format (version 1): one single-frame ZeroMQ message per publication::

    offset  size  field (little-endian)
    0       4     magic b"TSHB"
    4       2     version (1)
    6       2     kind: 1 publication, 2 heartbeat (no payload)
    8       4     header_bytes: offset of the payload (a multiple of 64)
    12      4     flags: bit 0 = the source is a GPU stream (staged through host memory)
    16      8     payload_bytes
    24      8     session: random per server start (a restart changes it)
    32      8     seq: message number within the session (1, 2, ...)
    40      8     count: the source publication's count
    48      8     frame_id: the source publication's frame_id
    56      8     write_time_ns: the source publication's write time (UNIX ns)
    64      8     send_time_ns: the server's clock when it sent the message
    72      16    instance_id: the source stream's generation
    88      4     heartbeat_ms: the server's heartbeat interval
    92      2     dtype code (torch_shmem's stable header codes)
    94      1     ndim (<= 32)
    95      1     name_len (UTF-8 bytes of the source name)
    96      8*ndim shape (int64), then the name, then zero padding to header_bytes
    header_bytes  payload (C order, the source's native byte order)

Why one frame: ZMQ_CONFLATE, which gives a slow subscriber the newest
message instead of a backlog, keeps one *message part* and so cannot be used
with multipart messages. Header and payload share one buffer: the server
copies the stream's snapshot straight into the message buffer (the one copy a
consistent snapshot needs) and hands that buffer to ZeroMQ without copying
it again (``copy=False``; a MessageTracker says when ZeroMQ is done with it).

Latest value, end to end: the server snapshots the newest publication each
time it is ready to send (publications made meanwhile are skipped and
counted); each subscriber's queue at the server is bounded (SNDHWM); the
subscriber's socket keeps only the newest message (ZMQ_CONFLATE) and its
loop publishes a newer waiting publication instead of an older one. Whatever
was dropped on the way, the source count in every message says so.

Subscribers talk back through the subscription channel of the XPUB socket:
subscribing to everything announces a subscriber (the server sends it the
current publication at once), and a subscription to ``RESEND_TOPIC`` asks for
the latest publication again. A subscriber asks when a heartbeat carries a
count it has not received, e.g. when ZeroMQ dropped the newest publication
at a full queue or conflation replaced it by a heartbeat; a heartbeat
follows every burst of publications (TRAILING_HEARTBEAT) so that this is
noticed quickly.

Message kinds 3 and up are reserved: a reliable, credit-based mode for
rings (docs/bridge.md, "Rings") adds its kinds without changing this header.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import math
import os
import secrets
import struct
import sys
import threading
import time
import warnings
from typing import Any

import numpy as np

from . import _core, _proc
from . import _stream as _api
from ._dtypes import code_dtype, dtype_code

__all__ = [
    "BridgeAttachment",
    "BridgeServer",
    "RingBridgeAttachment",
    "RingBridgeServer",
    "DEFAULT_BIND",
    "Header",
    "attach",
    "decode",
    "encode",
    "link_status",
    "serve",
]

MAGIC = b"TSHB"
VERSION = 1
KIND_PUBLICATION = 1
KIND_HEARTBEAT = 2
KIND_RING_PUBLICATION = 3  # reliable mode (rings), docs/bridge.md "Rings"
KIND_RING_WELCOME = 4
_PAYLOAD_KINDS = (KIND_PUBLICATION, KIND_RING_PUBLICATION)
FLAG_GPU_SOURCE = 1
HEADER_ALIGN = 64
MAX_DIMS = 32
MAX_NAME_BYTES = 255

_FIXED = struct.Struct("<4sHHIIQQQQQqq16sIHBB")
assert _FIXED.size == 96

DEFAULT_BIND = "tcp://127.0.0.1:0"
DEFAULT_HEARTBEAT = 0.5
# Messages queued per subscriber at the server before newer ones are dropped
# (ZeroMQ drops the message being sent, i.e. the newest). By default as many
# as fit in SNDHWM_BYTES, 4 to 1000: enough that a healthy subscriber on a
# busy host loses nothing, few enough that a stuck one costs bounded memory
# and finds little stale data on resuming. A newest publication dropped
# there is sent again on request (trailing heartbeat, then a resend).
SNDHWM_BYTES = 16 * 1024 * 1024
# A heartbeat this long after the last publication when no other follows,
# so that a subscriber whose copy of it was dropped asks for it soon.
TRAILING_HEARTBEAT = 0.1
# From this size on a message is sent zero-copy (ZeroMQ reads the buffer in
# place; a MessageTracker says when it is done); below it pyzmq's copy into a
# new message is as cheap as the tracking (measured with pyzmq 27, libzmq 4.3).
ZERO_COPY_BYTES = 128 * 1024
RESEND_TOPIC = b"\xfftorch_shmem.resend"
SIDECAR_SUFFIX = ".bridge"
SIDECAR_VERSION = 1
LINK_STATES = ("stopped", "connecting", "up", "stale", "down", "auth_failed", "mismatch")

_POLL_SLICE = 0.05  # s: how often loops look at stop requests and subscriptions
_POLLIN = 1  # zmq.POLLIN, as a plain int (the enum's operators cost microseconds)
_SUPERSEDE_FOR = 0.01  # s


def _zmq():
    """pyzmq, or ImportError naming the extra that installs it."""
    try:
        import zmq
    except ImportError as exc:
        raise ImportError(
            "torch_shmem.bridge needs pyzmq: pip install 'torch_shmem[bridge]' (or pip install pyzmq)"
        ) from exc
    return zmq


def _close_socket(sock: Any, monitor: Any) -> None:
    """Close a bridge socket (its monitor disabled first) and its monitor socket."""
    if sock is not None:
        try:
            sock.disable_monitor()
        except Exception:
            pass
        sock.close(0)
    if monitor is not None:
        monitor.close(0)


# ------------------------------------------------------------------ format
@dataclasses.dataclass(frozen=True)
class Header:
    """The decoded header of a bridge message (see the module docstring)."""

    kind: int
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    payload_bytes: int
    session: int
    seq: int
    count: int
    frame_id: int
    write_time_ns: int
    send_time_ns: int
    instance_id: bytes
    heartbeat_ms: int
    flags: int = 0
    header_bytes: int = 0
    version: int = VERSION


def header_size(ndim: int, name_bytes: int) -> int:
    """Bytes of a header (payload offset) for ``ndim`` dimensions and a name of ``name_bytes``."""
    raw = _FIXED.size + 8 * ndim + name_bytes
    return -(-raw // HEADER_ALIGN) * HEADER_ALIGN


def _geometry_bytes(shape: tuple[int, ...], name: bytes) -> bytes:
    return struct.pack(f"<{len(shape)}q", *shape) + name


def encode(header: Header, payload: Any = b"") -> bytes:
    """One message (header + payload) as bytes; the reference encoder, used by tests and tools.

    The servers build the same bytes in place, without this intermediate copy.
    """
    name = header.name.encode("utf-8")
    hb = header_size(len(header.shape), len(name))
    fixed = _FIXED.pack(
        MAGIC, header.version, header.kind, hb, header.flags, header.payload_bytes,
        header.session, header.seq, header.count, header.frame_id, header.write_time_ns,
        header.send_time_ns, header.instance_id, header.heartbeat_ms,
        dtype_code(np.dtype(header.dtype)), len(header.shape), len(name),
    )
    head = fixed + _geometry_bytes(tuple(header.shape), name)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        body = bytes(payload)
    else:
        body = np.ascontiguousarray(payload).tobytes()
    return head + bytes(hb - len(head)) + body


def decode(buf: Any) -> tuple[Header, memoryview]:
    """Parse one message; return its header and a view of its payload.

    Raises ValueError (saying what is wrong) for anything that is not a
    well-formed version-1 message: foreign magic, unknown version or kind,
    inconsistent sizes, a payload shorter or longer than the header says,
    an unknown dtype, an invalid name. Nothing in the message is trusted
    before it is checked, and nothing is allocated from its sizes.
    """
    mv = memoryview(buf).cast("B")
    n = mv.nbytes
    if n < _FIXED.size:
        raise ValueError(f"message of {n} bytes is shorter than a header ({_FIXED.size})")
    (magic, version, kind, hb, flags, payload_bytes, session, seq, count, frame_id,
     write_ns, send_ns, instance_id, heartbeat_ms, code, ndim, name_len) = _FIXED.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ValueError(f"foreign message (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ValueError(f"unsupported bridge format version {version} (this side speaks {VERSION})")
    if kind not in (KIND_PUBLICATION, KIND_HEARTBEAT, KIND_RING_PUBLICATION, KIND_RING_WELCOME):
        raise ValueError(f"unknown message kind {kind}")
    if ndim > MAX_DIMS:
        raise ValueError(f"ndim {ndim} exceeds {MAX_DIMS}")
    if hb != header_size(ndim, name_len):
        raise ValueError(f"header_bytes {hb} does not match ndim {ndim} and a {name_len}-byte name")
    if hb > n:
        raise ValueError(f"truncated header: {n} bytes, header_bytes {hb}")
    try:
        dtype = code_dtype(code)
    except KeyError:
        raise ValueError(f"unknown dtype code {code}") from None
    shape = struct.unpack_from(f"<{ndim}q", mv, _FIXED.size)
    if any(d < 0 for d in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    if math.prod(shape) * dtype.itemsize != payload_bytes:
        raise ValueError(
            f"payload_bytes {payload_bytes} does not match shape {shape} and dtype {dtype}"
        )
    expected = hb + (payload_bytes if kind in _PAYLOAD_KINDS else 0)
    if n != expected:
        raise ValueError(f"message of {n} bytes, expected {expected} (truncated or padded payload)")
    start = _FIXED.size + 8 * ndim
    try:
        name = bytes(mv[start:start + name_len]).decode("utf-8")
        _api._check_name(name)
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ValueError(f"invalid stream name in header: {exc}") from None
    header = Header(kind, name, tuple(shape), dtype, payload_bytes, session, seq, count, frame_id,
                    write_ns, send_ns, bytes(instance_id), heartbeat_ms, flags, hb, version)
    return header, mv[hb:expected]


_VARIABLE = struct.Struct("<QQQQqq")  # session, seq, count, frame_id, write_time_ns, send_time_ns
_U32 = struct.Struct("<I")
_MAX_HEADER = header_size(MAX_DIMS, MAX_NAME_BYTES)


class _Decoder:
    """:func:`decode` for a stream of messages: the checked constant part of a header is cached.

    Consecutive messages of one stream differ only in session, seq, count,
    frame_id and the two times; a message whose other header bytes (and
    length) equal those of a message that passed :func:`decode` needs only
    those fields unpacked. Anything else goes through :func:`decode`.
    Returns ``(header, session, count, frame_id, write_time_ns, payload)``;
    ``header`` carries the constant fields (name, shape, dtype, kind, ...).
    """

    def __init__(self) -> None:
        self._known: dict[bytes, tuple[Header, int]] = {}

    def __call__(self, buf: Any) -> tuple[Header, int, int, int, int, memoryview]:
        mv = memoryview(buf).cast("B")
        n = mv.nbytes
        if n >= _FIXED.size:
            hb = _U32.unpack_from(mv, 8)[0]
            if _FIXED.size <= hb <= min(n, _MAX_HEADER):
                key = bytes(mv[:24]) + bytes(mv[72:hb])
                known = self._known.get(key)
                if known is not None and known[1] == n:
                    session, _seq, count, frame_id, write_ns, _send = _VARIABLE.unpack_from(mv, 24)
                    return known[0], session, count, frame_id, write_ns, mv[hb:]
        h, payload = decode(mv)
        if len(self._known) >= 16:
            self._known.clear()
        self._known[bytes(mv[:24]) + bytes(mv[72:h.header_bytes])] = (h, n)
        return h, h.session, h.count, h.frame_id, h.write_time_ns, payload


# ------------------------------------------------------------------ security
_LOCAL_HOSTS = ("localhost", "ip6-localhost")


def _is_local_endpoint(endpoint: str) -> bool:
    """Whether binding ``endpoint`` exposes nothing beyond this host."""
    transport, sep, address = endpoint.partition("://")
    if not sep:
        raise ValueError(f"torch_shmem.bridge: endpoint {endpoint!r} is not transport://address")
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False  # pgm, epgm, udp, ws, ...: network transports
    if ";" in address:  # tcp://source;destination
        address = address.split(";", 1)[1]
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host.lower() in _LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name


def _load_key(path: Any, what: str, *, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) Z85 keys from a certificate file of zmq.auth.create_certificates."""
    _zmq()
    import zmq.auth

    path = os.fspath(path)
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"torch_shmem.bridge: cannot load {what} from {path!r}: {exc}") from None
    if secret and not secret_key:
        raise ValueError(
            f"torch_shmem.bridge: {what} file {path!r} holds no secret key "
            "(pass the .key_secret file made by zmq.auth.create_certificates)"
        )
    return public, secret_key


def _check_curve(zmq: Any) -> None:
    if not zmq.has("curve"):
        raise RuntimeError("torch_shmem.bridge: this libzmq was built without CURVE support")


# ------------------------------------------------------------------ server side
class _SendBuffers:
    """Message buffers for zero-copy sends, each reused only once ZeroMQ released it.

    ``take`` returns the first buffer ZeroMQ no longer holds (the lowest
    index: warm in the caches), allocating up to ``depth`` of them; with all
    ``depth`` held (stuck subscribers keep their queued messages) it
    replaces one by a fresh allocation and leaves the old one to ZeroMQ.
    """

    def __init__(self, make: Any, depth: int) -> None:
        self._make = make  # () -> (buffer for zmq, payload target for the read)
        self._depth = depth
        self._slots: list[Any] = []
        self._trackers: list[Any] = []
        self._victim = 0
        self.replaced = 0

    def take(self) -> tuple[int, Any, Any]:
        trackers = self._trackers
        for i, tracker in enumerate(trackers):
            if tracker is None or tracker.done:
                trackers[i] = None
                buf, target = self._slots[i]
                return i, buf, target
        if len(self._slots) < self._depth:
            self._slots.append(self._make())
            trackers.append(None)
            i = len(self._slots) - 1
        else:
            i = self._victim
            self._victim = (i + 1) % self._depth
            self._slots[i] = self._make()  # ZeroMQ keeps its reference to the old one
            trackers[i] = None
            self.replaced += 1
        buf, target = self._slots[i]
        return i, buf, target

    def sent(self, i: int, tracker: Any) -> None:
        self._trackers[i] = tracker

    def in_flight(self) -> int:
        return sum(1 for t in self._trackers if t is not None and not t.done)


class _CpuSource:
    """Reads of a CPU stream (or of a GPU stream's CPU mirror) through the NumPy path."""

    gpu = False

    def __init__(self, shm: Any) -> None:
        self.shm = shm

    def read_after(self, after: int, target: Any, timeout: float) -> tuple[int, int, int] | None:
        """Snapshot a publication newer than ``after`` into ``target``; None on timeout."""
        try:
            _, count, write_ns, frame_id, _ = self.shm._h.read_after_pub(after, target, timeout)
        except TimeoutError:
            return None
        return count, frame_id, write_ns

    def payload_target(self, buf: np.ndarray, offset: int) -> Any:
        shm = self.shm
        return np.frombuffer(buf, dtype=shm.dtype, count=math.prod(shm.shape), offset=offset).reshape(shm.shape)

    def alloc(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, np.uint8)

    def close(self) -> None:
        self.shm.close()


class _GpuSource:
    """Reads of a GPU stream without a CPU mirror, staged through pinned host memory.

    A safe read copies the latest slot into a private device buffer (device
    to device); the stream's sequence, loaded before and after, says that
    the metadata belongs to that snapshot (under the lock when a writer keeps
    publishing). That buffer is then copied into the pinned message buffer
    (device to host, synchronous). Not exercised without a GPU.
    """

    gpu = True

    def __init__(self, shm: Any) -> None:
        import torch

        from ._gpu import torch_dtype

        self.shm = shm
        self.torch = torch
        self.tdtype = torch_dtype(shm.dtype)
        self.scratch = torch.empty(shm.shape, dtype=self.tdtype, device=shm.gpu_device)

    def read_after(self, after: int, target: Any, timeout: float) -> tuple[int, int, int] | None:
        shm = self.shm
        h = shm._h
        try:
            h.wait_for_count(after, timeout)
            for _ in range(3):
                # no publication completed between the two loads: the snapshot is
                # the publication the metadata describes
                seq, write_ns, frame_id = h.state()[:3]
                shm.read(out=self.scratch)
                if not seq & 1 and h.seq() == seq:
                    break
            else:  # a writer keeps publishing: pair them under the lock
                with shm.locked(timeout=timeout):
                    shm.read(out=self.scratch)
                    seq, write_ns, frame_id = h.state()[:3]
        except TimeoutError:
            return None
        target.copy_(self.scratch)  # device to pinned host memory; synchronous
        return seq >> 1, frame_id, write_ns

    def payload_target(self, buf: np.ndarray, offset: int) -> Any:
        # buf is the NumPy view of a pinned uint8 tensor (see alloc); torch.from_numpy
        # shares its memory, so the D2H copy lands in the message buffer.
        t = self.torch.from_numpy(buf)[offset:offset + self.shm.size]
        return t.view(self.tdtype).view(self.shm.shape)

    def alloc(self, nbytes: int) -> np.ndarray:
        pinned = self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=True)
        return pinned.numpy()  # the array keeps the pinned tensor alive

    def close(self) -> None:
        self.shm.close()


def _open_source(name: str, gpu_device: Any) -> Any:
    """The source handle and its reader: NumPy path unless the payload is only on a GPU."""
    info = _api_stat(name)
    if info["gpu_enabled"] and (gpu_device is not None or not info["cpu_mirror"]):
        if gpu_device is None:
            raise ValueError(
                f"torch_shmem.bridge: stream {name!r} is a GPU stream without a CPU mirror; "
                "pass gpu_device='cuda:N' to serve it (staged through pinned host memory)"
            )
        shm = _api.open(name, gpu_device=gpu_device)  # writable: the lock fallback above
        try:
            return _GpuSource(shm)
        except BaseException:
            shm.close()
            raise
    return _CpuSource(_api.open(name, readonly=True))


def _api_stat(name: str) -> dict:
    from . import _admin

    return _admin.stat(name)


class _Component:
    """start/stop/close, context manager, background thread or blocking run()."""

    _kind = "bridge"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._ctx: Any = None
        self._opened = False
        self._closed = False
        self._running = False
        self._loop_error: BaseException | None = None

    # subclasses: _open() (sockets, handles; raises on bad configuration),
    # _loop() (until self._stop), _teardown() (sockets), _release() (handles)
    def open(self) -> Any:
        """Open the stream handles and sockets now (a server binds); errors are raised here.

        :meth:`start` and :meth:`run` do it when needed; call it first to
        learn a server's :attr:`endpoint` before a blocking :meth:`run`.
        """
        with self._lock:
            self._open_locked()
        return self

    def _open_locked(self) -> None:
        if self._closed:
            raise RuntimeError(f"torch_shmem.bridge: this {self._kind} is closed")
        if not self._opened:
            self._open()
            self._opened = True

    def start(self) -> Any:
        """Open everything (errors are raised here) and run in a background thread."""
        with self._lock:
            if self._thread is not None and not self._closed:
                return self
            self._open_locked()
            self._stop.clear()
            self._thread = threading.Thread(target=self._thread_main, name=f"torch_shmem-{self._kind}",
                                            daemon=True)
            self._running = True
            self._thread.start()
        return self

    def run(self) -> None:
        """Run in the calling thread until :meth:`stop` (from another thread) or Ctrl-C.

        Returns normally after Ctrl-C; everything is closed on return.
        """
        with self._lock:
            if self._thread is not None:
                raise RuntimeError(f"torch_shmem.bridge: this {self._kind} already runs in a thread")
            self._open_locked()
            self._running = True
        try:
            self._loop()
        except KeyboardInterrupt:
            pass
        finally:
            self._running = False
            self.close()

    def _thread_main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # recorded for stat(); the thread must not die silently
            self._loop_error = exc
        finally:
            self._running = False
            self._teardown()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background thread (its sockets are closed); idempotent.

        A stopped bridge can be started again; :meth:`close` releases it for good.
        """
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(f"torch_shmem.bridge: the {self._kind} thread did not stop within {timeout} s")
        with self._lock:
            self._thread = None
            self._opened = False if thread is not None else self._opened

    def close(self) -> None:
        """Stop and release the sockets, the ZeroMQ context and the stream handles; idempotent."""
        if self._closed:
            return
        self._stop.set()
        self.stop()  # TimeoutError if the thread is stuck: then nothing is torn down under it
        with self._lock:
            self._closed = True
            self._teardown()
            self._release()
            if self._ctx is not None:
                self._ctx.term()
                self._ctx = None

    @property
    def running(self) -> bool:
        """True while the loop runs (in the background thread or in :meth:`run`)."""
        return self._running

    def __enter__(self) -> Any:
        if not self._running:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop.set()
        except Exception:
            pass


class BridgeServer(_Component):
    """Publishes the publications of local stream ``name`` on a ZeroMQ XPUB socket.

    Made by :func:`serve` (started) or directly (call :meth:`start` or
    :meth:`run`). ``bind`` is a ZeroMQ endpoint; port 0 picks a free port
    (read it back from :attr:`endpoint`). Binding anything but loopback
    (``tcp://*``, a non-loopback address, a host or interface name, a network
    transport) raises PermissionError unless ``allow_remote=True``.

    ``curve_secret_key``: the server's certificate file with its secret key
    (``*.key_secret`` made by ``zmq.auth.create_certificates``); enables CURVE
    encryption and authentication, so a client without the server's public
    key gets nothing. ``curve_authorized_keys``: a directory of client public
    key files; when given, only those clients are let in (ZAP), otherwise any
    client that knows the server's public key is.

    ``gpu_device``: serve a GPU stream that has no CPU mirror (device to host
    through pinned memory); a mirrored GPU stream is served from its mirror.
    ``heartbeat``: seconds of silence after which the server sends a
    heartbeat (link state and the source count for subscribers).
    ``sndhwm``: messages queued per subscriber before newer ones are
    dropped (default: as many as fit in 16 MiB, 4 to 1000).
    """

    _kind = "server"

    def __init__(
        self,
        name: str,
        bind: str = DEFAULT_BIND,
        *,
        allow_remote: bool = False,
        curve_secret_key: Any = None,
        curve_authorized_keys: Any = None,
        gpu_device: Any = None,
        heartbeat: float = DEFAULT_HEARTBEAT,
        sndhwm: int | None = None,
    ) -> None:
        super().__init__()
        _api._check_name(name)
        if not isinstance(bind, str):
            raise TypeError(f"torch_shmem.bridge: stream {name!r}: bind must be a str endpoint, got {bind!r}")
        if not _is_local_endpoint(bind) and not allow_remote:
            raise PermissionError(
                f"torch_shmem.bridge: stream {name!r}: binding {bind!r} exposes the stream beyond "
                "this host; pass allow_remote=True (and use CURVE keys) to do that"
            )
        if not heartbeat > 0:
            raise ValueError(f"torch_shmem.bridge: stream {name!r}: heartbeat must be > 0 s, got {heartbeat!r}")
        if sndhwm is not None and int(sndhwm) < 1:
            raise ValueError(f"torch_shmem.bridge: stream {name!r}: sndhwm must be >= 1, got {sndhwm!r}")
        if curve_authorized_keys is not None and curve_secret_key is None:
            raise ValueError(
                f"torch_shmem.bridge: stream {name!r}: curve_authorized_keys needs curve_secret_key"
            )
        if curve_authorized_keys is not None and not os.path.isdir(curve_authorized_keys):
            raise ValueError(
                f"torch_shmem.bridge: curve_authorized_keys {os.fspath(curve_authorized_keys)!r} "
                "is not a directory of public key files"
            )
        self.name = name
        self._bind = bind
        self._allow_remote = bool(allow_remote)
        self._curve_secret_key = curve_secret_key
        self._curve_authorized_keys = curve_authorized_keys
        self._gpu_device = gpu_device
        self._heartbeat = float(heartbeat)
        self._sndhwm = None if sndhwm is None else int(sndhwm)
        self._session = secrets.randbits(64)
        self._endpoint: str | None = None
        self._sock: Any = None
        self._auth: Any = None
        self._source: Any = None
        self._peers: set[int] = set()  # fds of the accepted connections
        self._monitor: Any = None
        self._stats = dict(sent=0, bytes_sent=0, skipped=0, resends=0, heartbeats=0,
                           generations=0, source_errors=0, send_errors=0, buffers_replaced=0)
        self._last_count = 0
        self._last_error: str | None = None
        self._instance_id = b""

    # -------------------------------------------------------------- setup
    @property
    def endpoint(self) -> str | None:
        """The bound endpoint with its real port (``tcp://127.0.0.1:PORT``); None before start."""
        return self._endpoint

    def _open(self) -> None:
        zmq = self._zmq = _zmq()
        from zmq.utils.monitor import recv_monitor_message

        self._recv_monitor_message = recv_monitor_message
        source = _open_source(self.name, self._gpu_device)
        try:
            self._attach_source(source)
            if self._ctx is None:
                self._ctx = zmq.Context()
            sock = self._ctx.socket(getattr(zmq, self._socket_type))
            try:
                sock.setsockopt(zmq.LINGER, 0)
                self._socket_options(zmq, sock)
                if self._curve_secret_key is not None:
                    _check_curve(zmq)
                    public, secret = _load_key(self._curve_secret_key, "curve_secret_key", secret=True)
                    if self._curve_authorized_keys is not None and self._auth is None:
                        from zmq.auth.thread import ThreadAuthenticator

                        self._auth = ThreadAuthenticator(self._ctx)
                        self._auth.start()
                        self._auth.configure_curve(domain="*", location=os.fspath(self._curve_authorized_keys))
                    sock.curve_secretkey = secret
                    sock.curve_publickey = public
                    sock.curve_server = True
                elif not _is_local_endpoint(self._bind):
                    warnings.warn(
                        f"torch_shmem.bridge: serving stream {self.name!r} on {self._bind} without "
                        "CURVE keys: anyone who can reach the port reads it in clear text",
                        stacklevel=3,
                    )
                self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
                sock.bind(self._bind)
                self._endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            except BaseException:
                _close_socket(sock, self._monitor)
                self._monitor = None
                raise
            self._sock = sock
            self._peers.clear()
            self._inproc = self._endpoint.startswith("inproc://")  # no connection events there
        except BaseException:
            self._release_source(source)
            raise

    _socket_type = "XPUB"

    def _socket_options(self, zmq: Any, sock: Any) -> None:
        sock.setsockopt(zmq.SNDHWM, self._hwm)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscribe and unsubscribe

    def _attach_source(self, source: Any) -> None:
        shm = source.shm
        if self._source is not None:
            self._release_source(self._source)
        self._source = source
        self._instance_id = bytes.fromhex(shm.instance_id)
        name = self.name.encode("utf-8")
        self._name_len = len(name)
        self._hb = header_size(len(shm.shape), len(name))
        self._payload_bytes = shm.size
        self._geometry = _geometry_bytes(tuple(shm.shape), name)
        self._dtype_code = dtype_code(shm.dtype)
        self._ndim = len(shm.shape)
        self._flags = FLAG_GPU_SOURCE if shm.gpu_enabled else 0
        total = self._hb + self._payload_bytes
        self._zero_copy = total >= ZERO_COPY_BYTES
        if self._sndhwm is not None:
            self._hwm = self._sndhwm
        else:
            self._hwm = max(4, min(1000, SNDHWM_BYTES // total))
        self._buffers = _SendBuffers(self._make_buffer, self._hwm + 2 if self._zero_copy else 1)
        self._heartbeat_buf = bytearray(self._hb)
        self._heartbeat_buf[_FIXED.size:_FIXED.size + len(self._geometry)] = self._geometry
        self._last_count = 0

    def _make_buffer(self) -> tuple[np.ndarray, Any]:
        buf = self._source.alloc(self._hb + self._payload_bytes)
        buf[:self._hb] = 0
        buf[_FIXED.size:_FIXED.size + len(self._geometry)] = np.frombuffer(self._geometry, np.uint8)
        return buf, self._source.payload_target(buf, self._hb)

    def _release_source(self, source: Any) -> None:
        try:
            source.close()
        except Exception:
            pass
        if source is self._source:
            self._source = None

    def _teardown(self) -> None:
        _close_socket(self._sock, self._monitor)
        self._sock = self._monitor = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def _release(self) -> None:
        if self._source is not None:
            self._release_source(self._source)

    # -------------------------------------------------------------- loop
    def _pack(self, buf: Any, kind: int, count: int, frame_id: int, write_ns: int, payload: int) -> None:
        self._seq += 1
        _FIXED.pack_into(buf, 0, MAGIC, VERSION, kind, self._hb, self._flags, payload,
                         self._session, self._seq, count, frame_id, write_ns, time.time_ns(),
                         self._instance_id, int(self._heartbeat * 1000), self._dtype_code,
                         self._ndim, self._name_len)

    def _pack_heartbeat(self) -> bytearray:
        seq, write_ns, frame_id = self._source.shm._h.state()[:3]
        self._pack(self._heartbeat_buf, KIND_HEARTBEAT, seq >> 1, frame_id, write_ns, self._payload_bytes)
        return self._heartbeat_buf

    def _send_heartbeat(self) -> None:
        buf = self._pack_heartbeat()
        try:
            self._sock.send(buf, copy=True)
        except self._zmq.ZMQError as exc:
            self._stats["send_errors"] += 1
            self._last_error = f"send: {exc}"
            return
        self._stats["heartbeats"] += 1

    def _send_publication(self, after: int, timeout: float) -> bool:
        """Wait up to ``timeout`` for a publication newer than ``after`` and send it."""
        zmq = self._zmq
        i, buf, target = self._buffers.take()
        try:
            got = self._source.read_after(after, target, timeout)
        except _api.InconsistentStreamError as exc:  # a writer died mid-write: wait for the next
            self._stats["source_errors"] += 1
            self._last_error = str(exc)
            self._stop.wait(timeout)
            return False
        except _api.StaleStreamError:
            # The source was unlinked (its waits end at once from now on): follow the
            # name to a new generation when there is one, else look again shortly.
            self._check_generation()
            self._stop.wait(min(timeout, 0.05))
            return False
        if got is None:
            return False
        count, frame_id, write_ns = got
        self._pack(buf, KIND_PUBLICATION, count, frame_id, write_ns, self._payload_bytes)
        try:
            if self._zero_copy:
                # zero-copy: ZeroMQ reads buf until the tracker is done; the pool
                # never hands it out again before that
                tracker = self._sock.send(buf, copy=False, track=True)
            else:
                tracker = None
                self._sock.send(buf, copy=True)
            self._buffers.sent(i, tracker)
        except zmq.ZMQError as exc:
            self._stats["send_errors"] += 1
            self._last_error = f"send: {exc}"
            return False
        if self._last_count and count > self._last_count + 1:
            self._stats["skipped"] += count - self._last_count - 1
        self._last_count = count
        self._stats["sent"] += 1
        self._stats["bytes_sent"] += len(buf)
        self._last_send = time.monotonic()
        return True

    def _drain_subscriptions(self) -> bool:
        """Handle subscription messages; True when someone asked for the current value."""
        zmq = self._zmq
        resend = False
        sock = self._sock
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            msg = sock.recv(zmq.NOBLOCK)
            if msg == b"\x01" or msg == b"\x01" + RESEND_TOPIC:
                resend = True  # a new subscriber, or one that is behind
            # anything else (unsubscribes, other topics) is ignored: who is connected
            # comes from the socket monitor, which a peer cannot fake
        return resend

    def _drain_monitor(self) -> None:
        """Track the accepted connections (the handshake events carry no fd to match)."""
        zmq = self._zmq
        recv_monitor_message = self._recv_monitor_message
        mon = self._monitor
        while mon.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                msg = recv_monitor_message(mon, zmq.NOBLOCK)
            except (zmq.ZMQError, ValueError, struct.error):
                return
            if msg["event"] == zmq.EVENT_ACCEPTED:
                self._peers.add(msg["value"])
            elif msg["event"] == zmq.EVENT_DISCONNECTED:
                self._peers.discard(msg["value"])

    def _check_generation(self) -> None:
        """Follow the name to a new generation (unlinked and created again)."""
        try:
            h = _core.open(self.name, True)
        except (FileNotFoundError, PermissionError, ValueError, TypeError):
            return
        try:
            current = h.info()[5]
        finally:
            h.close(1.0)
        if current == self._instance_id:
            return
        try:
            source = _open_source(self.name, self._gpu_device)
        except (FileNotFoundError, PermissionError, ValueError, TypeError, RuntimeError) as exc:
            self._last_error = f"reopening {self.name!r}: {exc}"
            return
        self._attach_source(source)
        self._stats["generations"] += 1

    def _loop(self) -> None:
        self._seq = 0
        self._last_send = time.monotonic()
        next_generation_check = time.monotonic() + 1.0
        zmq = self._zmq
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        next_control = 0.0
        trailing: float | None = None  # when to send the heartbeat that follows a publication
        while not self._stop.is_set():
            now = time.monotonic()
            # subscriptions and connection events: every 10 ms at most (they cost
            # a few µs each, a publication at a time would pay it otherwise)
            if now >= next_control or not self._peers:
                next_control = now + 0.01
                self._drain_monitor()
                resend = self._drain_subscriptions()
            else:
                resend = False
            if resend:
                # send the current value now (subscribers drop what they have)
                if self._source.shm.count == 0 or not self._send_publication(0, _POLL_SLICE):
                    self._send_heartbeat()
                    self._last_send = time.monotonic()
                self._stats["resends"] += 1
            if self._peers or self._inproc:
                wait = _POLL_SLICE
                if trailing is not None:
                    wait = min(wait, max(0.0, trailing - now))
                if self._send_publication(self._last_count, wait):
                    trailing = self._last_send + TRAILING_HEARTBEAT
            else:  # nobody to send to: no snapshots; wake on a connection or subscription
                poller.poll(int(_POLL_SLICE * 1000))
                self._last_count = self._source.shm.count
            now = time.monotonic()
            if now - self._last_send >= self._heartbeat or (trailing is not None and now >= trailing):
                self._send_heartbeat()
                self._last_send = now
                trailing = None
            if now >= next_generation_check:
                next_generation_check = now + 1.0
                self._check_generation()
            self._stats["buffers_replaced"] = self._buffers.replaced

    # -------------------------------------------------------------- status
    def stat(self) -> dict:
        """Counters and state: a snapshot dict (see docs/bridge.md for the keys)."""
        source = self._source
        shm = source.shm if source is not None else None
        info = dict(self._stats)
        info.update(
            role="server",
            name=self.name,
            endpoint=self._endpoint,
            running=self._running,
            curve=self._curve_secret_key is not None,
            session=f"{self._session:016x}",
            instance_id=self._instance_id.hex(),
            last_count=self._last_count,
            source_count=shm.count if shm is not None and not shm.closed else None,
            connections=len(self._peers),
            in_flight=self._buffers.in_flight() if source is not None else 0,
            gpu_staging=bool(source is not None and source.gpu),
            last_error=self._last_error if self._loop_error is None else repr(self._loop_error),
        )
        return info


def serve(name: str, bind: str = DEFAULT_BIND, *, reliable: bool | None = None,
          **kwargs: Any) -> BridgeServer:
    """Start publishing stream ``name`` on ``bind`` (loopback, a free port, by default).

    Returns the started :class:`BridgeServer` (a background thread); use it
    as a context manager or call ``close()``. Keyword arguments as
    :class:`BridgeServer`. ``reliable``: serve every publication of a CPU
    ring to each subscriber (:class:`RingBridgeServer`; subscribers attach
    with ``reliable=True``); the default is True for CPU rings, False
    (latest value) otherwise. Raises FileNotFoundError when the stream does
    not exist, PermissionError for a non-loopback ``bind`` without
    ``allow_remote=True``, ImportError without pyzmq.
    """
    _zmq()  # ImportError naming the extra before anything else
    if reliable is None:
        info = _api_stat(name)
        reliable = bool(info.get("ring")) and not info["gpu_enabled"]
    server = (RingBridgeServer if reliable else BridgeServer)(name, bind, **kwargs)
    try:
        return server.start()
    except BaseException:
        server.close()
        raise


# ------------------------------------------------------------------ attached side
class _CpuSink:
    """Publishes at the source's count (plus a fixed offset), so that local
    readers' ``missed_writes`` and count gaps are those of the source."""

    def __init__(self, shm: Any) -> None:
        self.shm = shm
        self.offset: int | None = None  # local count - source count

    def new_generation(self) -> None:
        self.offset = None

    def write(self, payload: np.ndarray, frame_id: int, timeout: float, count: int) -> None:
        if self.offset is None:
            # A fresh local stream takes the source's counts as they are; one
            # that is already ahead (reused, or a new source generation whose
            # counts restart) keeps counting upwards from its own count.
            self.offset = max(0, self.shm.count + 1 - count)
        target = count + self.offset
        published = self.shm._write_at(payload, target, frame_id, timeout)
        if published != target:  # someone else published locally in between
            self.offset = published - count


class _GpuSink:
    """Host to device through a pinned staging buffer (one host copy, then a DMA upload)."""

    def __init__(self, shm: Any) -> None:
        import torch

        from ._gpu import torch_dtype

        self.shm = shm
        self.pinned = torch.empty(shm.shape, dtype=torch_dtype(shm.dtype), pin_memory=True)
        self.host = self.pinned.numpy()

    def new_generation(self) -> None:
        pass

    def write(self, payload: np.ndarray, frame_id: int, timeout: float, count: int) -> None:
        # GPU streams publish through the op library, which has no write at
        # a given count: local counts advance by one per delivery.
        np.copyto(self.host, payload)
        self.shm.write(self.pinned, frame_id=frame_id, timeout=timeout)


_SIDECAR_FIELDS = (
    "version", "state", "pid", "source_count", "delivered_count", "received", "skipped",
    "duplicates", "malformed", "mismatched", "disconnects", "generations", "last_message_ns",
    "source_write_ns", "delivered_ns", "heartbeat_ms",
)


class BridgeAttachment(_Component):
    """Subscribes to a :class:`BridgeServer` and republishes into a local stream.

    The local stream ``local_name`` (default: the source's name) is created
    with the source's shape and dtype (``mode``, and ``gpu_device`` for a GPU
    stream staged through pinned host memory), or reused when it exists with
    the same shape and dtype; a different one is a ValueError (raised by
    :meth:`start` when it waits, else reported by :meth:`stat`). With
    ``shape`` and ``dtype`` given, the local stream is made at start without
    waiting for the server.

    On the local stream ``count`` counts local publications; ``frame_id``
    is the source publication's frame_id (``frame_id="source"``, default) or
    the source publication's count (``frame_id="count"``: then a reader's
    gaps in ``frame_id`` are exactly the source publications it did not
    see). ``write_time`` is the local publication time; the source's is in
    :meth:`stat`. Conflation: a slow attachment publishes the newest
    publication it has, never a backlog.

    ``curve_server_key``: the server's public certificate file (``*.key``):
    required to talk to a CURVE server. ``curve_secret_key``: this client's
    certificate with its secret key (required when the server only lets
    authorized clients in); a throwaway key pair is used otherwise.
    ``sidecar``: keep link state in a small stream ``<local_name>.bridge``
    for ``torch-shmem bridge status`` (and ``watch``); it also stops two
    bridges from feeding one local stream.
    """

    _kind = "attachment"

    def __init__(
        self,
        endpoint: str,
        local_name: str | None = None,
        *,
        shape: Any = None,
        dtype: Any = None,
        gpu_device: Any = None,
        mode: int = 0o600,
        frame_id: str = "source",
        curve_server_key: Any = None,
        curve_secret_key: Any = None,
        sidecar: bool = True,
        unlink_on_close: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(endpoint, str) or "://" not in endpoint:
            raise ValueError(f"torch_shmem.bridge: endpoint must be 'transport://address', got {endpoint!r}")
        if local_name is not None:
            _api._check_name(local_name)
        if frame_id not in ("source", "count"):
            raise ValueError(f"torch_shmem.bridge: frame_id must be 'source' or 'count', got {frame_id!r}")
        if (shape is None) != (dtype is None):
            raise ValueError("torch_shmem.bridge: give both shape and dtype, or neither")
        if shape is not None and local_name is None:
            raise ValueError("torch_shmem.bridge: shape and dtype need local_name")
        if curve_secret_key is not None and curve_server_key is None:
            raise ValueError("torch_shmem.bridge: curve_secret_key needs curve_server_key")
        self.endpoint = endpoint
        self._local_name = local_name
        self._want_shape = None if shape is None else _api._normalize_shape(shape, local_name)
        self._want_dtype = None if dtype is None else np.dtype(dtype)
        self._gpu_device = gpu_device
        self._mode = mode
        self._frame_id_mode = frame_id
        self._curve_server_key = curve_server_key
        self._curve_secret_key = curve_secret_key
        self._use_sidecar = bool(sidecar)
        self._unlink_on_close = bool(unlink_on_close)
        self._sock: Any = None
        self._monitor: Any = None
        self._local: Any = None
        self._sink: Any = None
        self._sidecar: Any = None
        self._ready = threading.Event()
        self._error: str | None = None
        self._fatal: BaseException | None = None
        self._stats = dict(received=0, delivered=0, skipped=0, superseded=0, duplicates=0, heartbeats=0,
                           malformed=0, mismatched=0, disconnects=0, handshake_failures=0,
                           unanswered_connections=0,
                           server_restarts=0, generations=0, resend_requests=0, write_timeouts=0)
        self._source_name: str | None = None
        self._instance: bytes | None = None
        self._session: int | None = None
        self._delivered_count = 0  # source count of the last publication delivered (or the base)
        self._source_count = 0
        self._source_frame_id = 0
        self._source_write_ns = 0
        self._delivered_ns = 0
        self._last_message = 0.0  # monotonic
        self._last_message_ns = 0
        self._heartbeat_ms = int(DEFAULT_HEARTBEAT * 1000)
        self._connected = False
        self._handshake_ok = False
        self._auth_failed = False
        self._ever_up = False
        self._last_resend = 0.0
        self._resend_count = -1
        self._last_drop: str | None = None
        self._sidecar_written = 0.0
        self._sidecar_state: tuple | None = None
        self._next_local_check = 0.0
        self._decode = _Decoder()
        self._local_geometry: tuple | None = None
        self._local_size = 0
        self._local_instance = b""

    @property
    def local_name(self) -> str | None:
        """The local stream's name (None until known: the source name is learnt from the server)."""
        return self._local_name

    def start(self, *, wait: bool = True, timeout: float | None = 10.0) -> "BridgeAttachment":
        """Connect and run in a background thread.

        With ``wait=True`` block until the local stream exists and holds the
        source's current publication (when the source has one; at once when
        ``shape``/``dtype`` were given): TimeoutError after ``timeout`` s
        (no server, or wrong CURVE keys), ValueError when the local stream
        exists with another shape or dtype, RuntimeError when another live
        bridge feeds it (the thread is stopped in each case).
        """
        self._fatal = None
        super().start()
        if not wait:
            return self
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self._fatal is not None:
                fatal = self._fatal
                self.stop()
                raise fatal
            if self._loop_error is not None:
                raise RuntimeError(f"torch_shmem.bridge: attachment to {self.endpoint} failed: "
                                   f"{self._loop_error!r}") from self._loop_error
            if deadline is not None and time.monotonic() > deadline:
                state = self.link_state()
                self.stop()
                raise TimeoutError(
                    f"torch_shmem.bridge: no message from {self.endpoint} within {timeout} s "
                    f"(link {state}); is the server running, and are the CURVE keys right?"
                )
        return self

    # -------------------------------------------------------------- setup
    def _open(self) -> None:
        zmq = self._zmq = _zmq()
        if self._ctx is None:
            self._ctx = zmq.Context()
        if self._want_shape is not None and self._local is None:
            self._make_local(self._local_name, self._want_shape, self._want_dtype)
            self._ready.set()
        sock = self._ctx.socket(getattr(zmq, self._socket_type))
        try:
            sock.setsockopt(zmq.LINGER, 0)
            self._socket_options(zmq, sock)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            # ZMTP heartbeats: a peer that vanished without closing (host down,
            # network cut) is dropped and reconnected
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
            if self._curve_server_key is not None:
                _check_curve(zmq)
                server_public, _ = _load_key(self._curve_server_key, "curve_server_key", secret=False)
                if self._curve_secret_key is not None:
                    public, secret = _load_key(self._curve_secret_key, "curve_secret_key", secret=True)
                else:
                    public, secret = zmq.curve_keypair()
                sock.curve_serverkey = server_public
                sock.curve_publickey = public
                sock.curve_secretkey = secret
            events = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
            self._monitor = sock.get_monitor_socket(events)
            sock.connect(self.endpoint)
        except BaseException:
            _close_socket(sock, self._monitor)
            self._monitor = None
            raise
        self._sock = sock

    _socket_type = "SUB"

    def _socket_options(self, zmq: Any, sock: Any) -> None:
        # newest message only: the io thread keeps reading, the queue keeps one
        sock.setsockopt(zmq.CONFLATE, 1)
        sock.setsockopt(zmq.SUBSCRIBE, b"")

    def _teardown(self) -> None:
        _close_socket(self._sock, self._monitor)
        self._sock = self._monitor = None
        self._connected = self._handshake_ok = False

    def _release(self) -> None:
        self._write_sidecar(force=True, stopping=True)
        if self._sidecar is not None:
            try:
                self._sidecar.close()
            except RuntimeError:
                pass
            self._sidecar = None
        if self._local is not None:
            local, self._local, self._sink = self._local, None, None
            if self._unlink_on_close:
                if self._use_sidecar and len(local.name.encode()) + len(SIDECAR_SUFFIX) <= 200:
                    _api.unlink(local.name + SIDECAR_SUFFIX)
                try:
                    local.unlink()
                except (_api.StaleStreamError, PermissionError):
                    local.close()
            else:
                local.close()

    # -------------------------------------------------------------- local stream
    def _make_local(self, name: str, shape: tuple, dtype: np.dtype) -> None:
        """Create or reuse the local stream; ValueError on a geometry mismatch."""
        shm = self._create_or_open_local(name, shape, dtype)
        try:
            if self._use_sidecar:
                self._claim_sidecar(name)
        except BaseException:
            shm.close()
            raise
        self._local = shm
        self._local_name = name
        self._local_geometry = (tuple(shm.shape), shm.dtype)
        self._local_size = math.prod(shm.shape)
        self._local_instance = bytes.fromhex(shm.instance_id)
        self._sink = self._make_sink(shm)

    def _make_sink(self, shm: Any) -> Any:
        return _GpuSink(shm) if shm.gpu_enabled and self._gpu_device is not None else _CpuSink(shm)

    def _create_or_open_local(self, name: str, shape: tuple, dtype: np.dtype) -> Any:
        gpu = self._gpu_device
        try:
            shm = _api.create(name, shape=shape, dtype=dtype, mode=self._mode, gpu_device=gpu)
        except FileExistsError:
            shm = _api.open(name, gpu_device=gpu)
            if shm.gpu_enabled and gpu is None:
                shm.close()
                raise ValueError(
                    f"torch_shmem.bridge: stream {name!r} is a GPU stream; attach with "
                    "gpu_device='cuda:N' to republish into it"
                ) from None
            if tuple(shm.shape) != tuple(shape) or shm.dtype != dtype:
                got = (tuple(shm.shape), str(shm.dtype))
                shm.close()
                raise ValueError(
                    f"torch_shmem.bridge: stream {name!r} exists with shape {got[0]} and dtype "
                    f"{got[1]}; the bridge from {self.endpoint} carries shape {tuple(shape)} and "
                    f"dtype {dtype}: unlink it or pick another local_name"
                ) from None
        return shm

    def _claim_sidecar(self, name: str) -> None:
        side = name + SIDECAR_SUFFIX
        if len(side.encode("utf-8")) > 200:
            return  # no room for the suffix: no sidecar (stat() still works)
        try:
            shm = _api.create(side, shape=(len(_SIDECAR_FIELDS),), dtype=np.int64, mode=self._mode)
        except FileExistsError:
            shm = _api.open(side)
            if shm.shape != (len(_SIDECAR_FIELDS),) or shm.dtype != np.int64:
                shm.close()
                return  # a foreign stream of that name: leave it alone, no sidecar
        try:
            # under the sidecar's lock, so that two attachments starting at once
            # cannot both take the stream
            with shm.locked(timeout=5.0):
                old = shm.read()
                pid = int(old[2])
                if pid and pid != os.getpid() and old[1] != 0 and _proc.pid_alive(pid):
                    raise RuntimeError(
                        f"torch_shmem.bridge: stream {name!r} is already fed by a bridge in pid "
                        f"{pid} (see torch-shmem bridge status {name})"
                    )
                row = np.zeros(len(_SIDECAR_FIELDS), np.int64)
                row[0], row[1], row[2] = SIDECAR_VERSION, LINK_STATES.index("connecting"), os.getpid()
                shm.write(row)
        except BaseException:
            shm.close()
            raise
        self._sidecar = shm

    def _check_local(self, now: float) -> None:
        """Notice a local stream that was unlinked under us (it is made again on the next message)."""
        if self._local is None or now < self._next_local_check:
            return
        self._next_local_check = now + 1.0
        if self._local._h.state()[4]:  # unlinked
            self._local.close()
            self._local = self._sink = None
            if self._sidecar is not None:
                self._sidecar.close()
                self._sidecar = None

    def _ensure_local(self, h: Header) -> bool:
        """The local stream for ``h``'s geometry exists; False (counted) when it cannot."""
        if self._local is None:
            name = self._local_name or h.name
            try:
                self._make_local(name, h.shape, h.dtype)
            except (ValueError, RuntimeError, OSError, TypeError) as exc:
                self._error = str(exc)
                if not self._ready.is_set():
                    self._fatal = exc
                return False
        if self._local_instance == h.instance_id:
            # attached to the very stream served: republishing would feed it back
            self._error = (f"local stream {self._local_name!r} is the stream served at "
                           f"{self.endpoint}; pick another local_name")
            if not self._ready.is_set():
                self._fatal = ValueError(f"torch_shmem.bridge: {self._error}")
            return False
        if self._local_geometry != (h.shape, h.dtype):
            self._error = (f"source {h.name!r} has shape {h.shape} and dtype {h.dtype}; local stream "
                           f"{self._local_name!r} has shape {self._local_geometry[0]} and dtype "
                           f"{self._local_geometry[1]}")
            return False
        self._error = None
        return True

    # -------------------------------------------------------------- loop
    def _poller(self) -> Any:
        poller = self._zmq.Poller()
        poller.register(self._sock, _POLLIN)
        poller.register(self._monitor, _POLLIN)
        return poller

    def _poll(self, poller: Any) -> dict:
        """Wait up to a slice for a message or a connection event (handled here)."""
        events = dict(poller.poll(int(_POLL_SLICE * 1000)))
        if self._monitor in events:
            self._on_monitor()
        return events

    def _loop(self) -> None:
        poller = self._poller()
        while not self._stop.is_set():
            if self._sock in self._poll(poller):
                frame = self._recv_waiting()
                until = time.monotonic() + _SUPERSEDE_FOR
                while frame is not None:
                    # a publication is dropped for a newer one already waiting, for
                    # _SUPERSEDE_FOR at most (then one is written: progress against
                    # a source that outpaces this side)
                    frame = self._on_message(frame, time.monotonic() < until)
            now = time.monotonic()
            self._check_local(now)
            self._write_sidecar()

    def _recv_waiting(self) -> Any:
        """The message waiting (the newest: CONFLATE), or None."""
        zmq = self._zmq
        try:
            return self._sock.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None

    def _on_monitor(self) -> None:
        zmq = _zmq()
        from zmq.utils.monitor import recv_monitor_message

        while True:
            try:
                msg = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except (zmq.ZMQError, ValueError, struct.error):
                return
            event = msg["event"]
            if event == zmq.EVENT_CONNECTED:
                self._connected = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connected = self._handshake_ok = True
                self._auth_failed = False
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                           zmq.EVENT_HANDSHAKE_FAILED_AUTH):
                self._stats["handshake_failures"] += 1
                if self._curve_server_key is None and event != zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    # without keys, a handshake the server breaks off means another
                    # socket type (a ring server for a SUB, ...) or a CURVE server; ZeroMQ
                    # reports it as one of these failures or as a bare disconnection
                    self._unanswered_connection()
                else:
                    self._auth_failed = True
            elif event == zmq.EVENT_DISCONNECTED:
                if self._handshake_ok:
                    self._stats["disconnects"] += 1
                elif not self._auth_failed:
                    self._unanswered_connection()
                self._connected = self._handshake_ok = False

    # What a server that breaks off the handshake probably is.
    _other_mode = ("a ring server (reliable mode): attach to it with reliable=True "
                   "(CLI: --reliable)")

    def _unanswered_connection(self) -> None:
        """A connection closed in the ZeroMQ handshake, with no message ever: the server
        speaks another socket type, or needs CURVE keys: say so."""
        self._stats["unanswered_connections"] += 1
        if not self._ever_up:
            self._error = (f"the server at {self.endpoint} closes the connection in the ZeroMQ "
                           f"handshake: it is probably {self._other_mode}, or a server that needs "
                           "CURVE keys (curve_server_key=, CLI --curve-server-key)")
            if not self._ready.is_set():
                self._fatal = RuntimeError(f"torch_shmem.bridge: {self._error}")

    def _on_message(self, frame: Any, may_supersede: bool = False) -> Any:
        """Handle one message; returns a newer frame to handle instead, or None."""
        stats = self._stats
        try:
            h, session, count, frame_id, write_ns, payload = self._decode(frame.buffer)
        except ValueError as exc:
            stats["malformed"] += 1
            self._last_drop = str(exc)
            return None
        if h.kind not in (KIND_PUBLICATION, KIND_HEARTBEAT):  # reliable-mode kinds: not ours
            stats["malformed"] += 1
            self._last_drop = f"message kind {h.kind} on a latest-value link"
            return None
        first = self._note_message(h, session)
        if first:
            # counting starts here: nothing before the source's current
            # publication was missed (a heartbeat announcing it asks for it)
            self._delivered_count = max(0, count - 1)
        if count > self._source_count:
            self._source_count = count
        if h.kind == KIND_HEARTBEAT:
            stats["heartbeats"] += 1
            if not self._ensure_local(h):
                stats["mismatched"] += 1
                return None
            if not self._ready.is_set():
                self._ready.set()  # the local stream exists (nothing published yet)
            if count > self._delivered_count:
                self._request_resend(count)
            return None
        stats["received"] += 1
        if not self._ensure_local(h):
            stats["mismatched"] += 1
            return None
        if count <= self._delivered_count:
            stats["duplicates"] += 1
            if not self._ready.is_set():
                self._ready.set()
            return None
        after = None
        if may_supersede and self._sock.getsockopt(self._zmq.EVENTS) & _POLLIN:
            # a message arrived meanwhile: a newer publication (a backlog after a
            # stall, or a source faster than this side) is published instead
            after = self._recv_waiting()
            if after is not None and self._newer_publication(after, h.instance_id, count):
                stats["superseded"] += 1
                return after
        array = np.frombuffer(payload, dtype=h.dtype, count=self._local_size).reshape(h.shape)
        stamp = frame_id if self._frame_id_mode == "source" else count
        while True:
            try:
                self._sink.write(array, stamp, _POLL_SLICE, count)
                break
            except TimeoutError:
                # the local lock is held: keep waiting, but switch to a newer message
                self._stats["write_timeouts"] += 1
                if self._stop.is_set():
                    return None
                newer = self._recv_waiting()
                if newer is not None:
                    return newer
        stats["delivered"] += 1
        self._note_delivery(count, frame_id, write_ns)
        if not self._ready.is_set():
            self._ready.set()  # start(wait=True) returns with the first publication in place
        return after  # a message that came meanwhile and is not a newer publication

    def _note_delivery(self, count: int, frame_id: int, write_ns: int) -> None:
        """Source publication ``count`` is in the local stream (or handled)."""
        if count > self._delivered_count + 1:
            self._stats["skipped"] += count - self._delivered_count - 1
        self._delivered_count = count
        self._source_frame_id = frame_id
        self._source_write_ns = write_ns
        self._delivered_ns = time.time_ns()

    def _note_message(self, h: Header, session: int) -> bool:
        """Link bookkeeping for a well-formed message; True for the link's first one."""
        stats = self._stats
        self._last_message = time.monotonic()
        self._last_message_ns = time.time_ns()
        self._ever_up = self._connected = True
        self._auth_failed = False
        self._heartbeat_ms = min(max(h.heartbeat_ms, 10), 60_000)
        first = self._instance is None
        if h.instance_id != self._instance:
            if not first:
                stats["generations"] += 1
                self._new_generation()
            self._instance = h.instance_id
            self._source_count = 0
        if session != self._session:
            if self._session is not None:
                stats["server_restarts"] += 1
            self._session = session
        self._source_name = h.name
        return first

    def _new_generation(self) -> None:
        # publications of the new generation before this one were never seen
        self._delivered_count = 0
        if self._sink is not None:
            self._sink.new_generation()

    def _newer_publication(self, frame: Any, instance_id: bytes, count: int) -> bool:
        try:
            h, _, newer, _, _, _ = self._decode(frame.buffer)
        except ValueError:
            return False
        return h.kind == KIND_PUBLICATION and h.instance_id == instance_id and newer > count

    def _request_resend(self, count: int) -> None:
        """Ask the server for its latest publication (once per source count, or per heartbeat)."""
        zmq = self._zmq
        now = time.monotonic()
        if count == self._resend_count and now - self._last_resend < self._heartbeat_ms / 1000.0:
            return
        self._last_resend = now
        self._resend_count = count
        self._sock.setsockopt(zmq.SUBSCRIBE, RESEND_TOPIC)
        self._sock.setsockopt(zmq.UNSUBSCRIBE, RESEND_TOPIC)
        self._stats["resend_requests"] += 1

    # -------------------------------------------------------------- status
    def link_state(self) -> str:
        """``connecting``, ``up``, ``stale``, ``down``, ``auth_failed``, ``mismatch`` or ``stopped``."""
        if not self._running:
            return "stopped"
        if self._error is not None:
            return "mismatch"
        if self._ever_up and not self._connected:
            return "down"  # disconnected; ZeroMQ reconnects on its own
        stale_after = 3 * self._heartbeat_ms / 1000.0
        # "up" once a message arrived recently and the local stream exists (a reader
        # that sees "up" can open it)
        if (self._last_message and self._ready.is_set()
                and time.monotonic() - self._last_message <= stale_after):
            return "up"
        if self._auth_failed:
            return "auth_failed"
        if self._ever_up:
            return "stale"  # connected, but silent for three heartbeat intervals
        return "connecting"

    def stat(self) -> dict:
        """Counters, link state and lag: a snapshot dict (see docs/bridge.md for the keys)."""
        info = dict(self._stats)
        now_ns = time.time_ns()
        info.update(
            role="attachment",
            endpoint=self.endpoint,
            local_name=self._local_name,
            source_name=self._source_name,
            link=self.link_state(),
            running=self._running,
            instance_id=self._instance.hex() if self._instance else None,
            session=None if self._session is None else f"{self._session:016x}",
            source_count=self._source_count,
            delivered_count=self._delivered_count,
            behind=max(0, self._source_count - self._delivered_count) if self._instance else 0,
            source_frame_id=self._source_frame_id,
            source_write_time=self._source_write_ns * 1e-9,
            lag=((self._delivered_ns - self._source_write_ns) * 1e-9
                 if self._delivered_ns and self._source_write_ns else None),
            last_message_age=((now_ns - self._last_message_ns) * 1e-9 if self._last_message_ns else None),
            local_count=self._local.count if self._local is not None and not self._local.closed else None,
            error=self._error if self._loop_error is None else repr(self._loop_error),
            last_drop=self._last_drop,
            sidecar=self._sidecar.name if self._sidecar is not None else None,
        )
        return info

    def _write_sidecar(self, force: bool = False, stopping: bool = False) -> None:
        side = self._sidecar
        if side is None or side.closed:
            return
        now = time.monotonic()
        if not force and now - self._sidecar_written < 0.1:
            return
        state = "stopped" if stopping else self.link_state()
        s = self._stats
        row = (SIDECAR_VERSION, LINK_STATES.index(state), 0 if stopping else os.getpid(),
               self._source_count, self._delivered_count, s["received"], s["skipped"],
               s["duplicates"], s["malformed"], s["mismatched"], s["disconnects"], s["generations"],
               self._last_message_ns, self._source_write_ns, self._delivered_ns, self._heartbeat_ms)
        if not (force or row != self._sidecar_state or now - self._sidecar_written >= 1.0):
            return  # unchanged: rewritten once a second (its write_time says the bridge lives)
        try:
            side.write(np.array(row, np.int64), timeout=0.05)
        except (TimeoutError, RuntimeError):
            return
        self._sidecar_state = row
        self._sidecar_written = now


def attach(endpoint: str, local_name: str | None = None, *, wait: bool = True,
           timeout: float | None = 10.0, reliable: bool = False, **kwargs: Any) -> BridgeAttachment:
    """Subscribe to a bridge server and republish into a local stream; returns it started.

    Keyword arguments as :class:`BridgeAttachment`; ``wait``/``timeout`` as
    :meth:`BridgeAttachment.start` (by default it returns once the local
    stream exists). ``reliable=True`` subscribes to a ring server (every
    publication, in order, into a local ring; :class:`RingBridgeAttachment`
    and its ``cursor``, ``window``, ``ring``, ``policy`` arguments). Use the
    result as a context manager or call ``close()``.
    """
    att = (RingBridgeAttachment if reliable else BridgeAttachment)(endpoint, local_name, **kwargs)
    try:
        return att.start(wait=wait, timeout=timeout)
    except BaseException:
        att.close()
        raise


def link_status(local_name: str) -> dict:
    """The link state an attachment keeps in the sidecar stream ``<local_name>.bridge``.

    Readable by any process (no pyzmq needed). Keys: ``state``, ``pid``,
    ``alive`` (the bridge process runs), ``source_count``,
    ``delivered_count``, ``behind``, ``received``, ``skipped``,
    ``duplicates``, ``malformed``, ``mismatched``, ``disconnects``,
    ``generations``, ``lag`` (delivery time minus the source write time of
    the last delivered publication, s; the two hosts' clocks), ``age`` (s
    since the last message), ``updated`` (s since the sidecar was written).
    FileNotFoundError when the stream has no sidecar.
    """
    _api._check_name(local_name)
    side = local_name + SIDECAR_SUFFIX
    try:
        shm = _api.open(side, readonly=True)
    except FileNotFoundError:
        raise FileNotFoundError(
            2, f"torch_shmem.bridge: stream {local_name!r} has no bridge sidecar ({side!r}): "
               "no attachment feeds it, or it runs with sidecar=False"
        ) from None
    try:
        if shm.shape != (len(_SIDECAR_FIELDS),) or shm.dtype != np.int64:
            raise ValueError(f"torch_shmem.bridge: stream {side!r} is not a bridge sidecar")
        pub = shm.read_publication()
    finally:
        shm.close()
    row = dict(zip(_SIDECAR_FIELDS, (int(v) for v in pub.payload)))
    if row["version"] != SIDECAR_VERSION or not 0 <= row["state"] < len(LINK_STATES):
        raise ValueError(f"torch_shmem.bridge: stream {side!r} is not a bridge sidecar of version "
                         f"{SIDECAR_VERSION}")
    now = time.time()
    alive = bool(row["pid"]) and _proc.pid_alive(row["pid"])
    state = LINK_STATES[row["state"]]
    if not alive and state != "stopped":
        state = "stopped"  # the bridge process died without closing
    return {
        "name": local_name,
        "state": state,
        "pid": row["pid"] or None,
        "alive": alive,
        "source_count": row["source_count"],
        "delivered_count": row["delivered_count"],
        "behind": max(0, row["source_count"] - row["delivered_count"]),
        "received": row["received"],
        "skipped": row["skipped"],
        "duplicates": row["duplicates"],
        "malformed": row["malformed"],
        "mismatched": row["mismatched"],
        "disconnects": row["disconnects"],
        "generations": row["generations"],
        "lag": ((row["delivered_ns"] - row["source_write_ns"]) * 1e-9
                if row["delivered_ns"] and row["source_write_ns"] else None),
        "age": (now - row["last_message_ns"] * 1e-9) if row["last_message_ns"] else None,
        "updated": (now - pub.write_time) if pub.write_time else None,
        "heartbeat": row["heartbeat_ms"] / 1000.0,
    }


# ------------------------------------------------------------------ command line
def cli_main(args: argparse.Namespace) -> int:
    """``torch-shmem bridge ...`` (the argument parser is built in torch_shmem/cli.py)."""
    command = getattr(args, "bridge_command", None)
    try:
        if command == "serve":
            return _cli_serve(args)
        if command == "attach":
            return _cli_attach(args)
        if command == "status":
            return _cli_status(args)
        if command == "keygen":
            return _cli_keygen(args)
    except ImportError as exc:
        print(exc, file=sys.stderr)
        return 1
    except (FileNotFoundError, PermissionError, ValueError, TypeError, TimeoutError, RuntimeError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print("usage: torch-shmem bridge {serve,attach,status,keygen} ...", file=sys.stderr)
    return 2


def _run_until_signal(component: _Component, banner: str, stats_every: float | None) -> int:
    """Run ``component`` in a thread; stop on Ctrl-C or SIGTERM; print stats when asked."""
    import signal

    done = threading.Event()

    def on_term(signum, frame):  # noqa: ARG001
        done.set()

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        print(banner, flush=True)
        next_print = time.monotonic() + (stats_every or math.inf)
        try:
            while not done.wait(0.1):
                if component._loop_error is not None:
                    print(f"torch_shmem.bridge: {component._loop_error!r}", file=sys.stderr)
                    return 1
                if time.monotonic() >= next_print:
                    next_print += stats_every
                    print(json.dumps(component.stat()), flush=True)
        except KeyboardInterrupt:
            pass
        print(json.dumps(component.stat()), flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, old)
        component.close()


def _cli_serve(args: argparse.Namespace) -> int:
    server = serve(args.name, args.bind, reliable=False if args.latest else None,
                   allow_remote=args.allow_remote, curve_secret_key=args.curve_secret_key,
                   curve_authorized_keys=args.curve_authorized_keys, gpu_device=args.gpu_device,
                   heartbeat=args.heartbeat)
    mode = " (reliable: attach with --reliable)" if isinstance(server, RingBridgeServer) else ""
    return _run_until_signal(server, f"serving {args.name!r} on {server.endpoint}{mode}", args.stats)


def _cli_attach(args: argparse.Namespace) -> int:
    common = dict(gpu_device=args.gpu_device, frame_id=args.frame_id,
                  curve_server_key=args.curve_server_key, curve_secret_key=args.curve_secret_key,
                  unlink_on_close=args.unlink_on_exit)
    if args.reliable:
        att: BridgeAttachment = RingBridgeAttachment(args.endpoint, args.local_name, cursor=args.cursor,
                                                     window=args.window, **common)
    else:
        att = BridgeAttachment(args.endpoint, args.local_name, **common)
    try:
        att.start(wait=True, timeout=args.timeout)
    except BaseException:
        att.close()
        raise
    return _run_until_signal(att, f"attached {args.endpoint} -> {att.local_name!r}", args.stats)


def _cli_status(args: argparse.Namespace) -> int:
    info = link_status(args.name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        if isinstance(value, float):
            value = f"{value:.6f}"
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


def _cli_keygen(args: argparse.Namespace) -> int:
    _zmq()
    import zmq.auth

    os.makedirs(args.directory, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.directory, args.key_name)
    os.chmod(secret, 0o600)
    print(f"public key (give to the other side): {public}")
    print(f"secret key (keep private):          {secret}")
    return 0


# The reliable mode for rings builds on the classes above.
from ._bridge_ring import RingBridgeAttachment, RingBridgeServer  # noqa: E402
