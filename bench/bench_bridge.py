"""Bridge: a stream carried over ZeroMQ on loopback, next to plain pyzmq PUB/SUB of the same bytes.

Both pipelines move one frame of S bytes from this process to a consumer process and
acknowledge it through a small torch_shmem stream, so the two sides are timed the same way:

* ``bridge``: this process publishes frame k into a source stream (in place: it stamps k
  into the payload and as ``frame_id``); a server process (``bridge.serve``) snapshots it
  and sends it; an attachment process (``bridge.attach``) republishes it into a local
  stream, which is the acknowledgement (its ``frame_id`` is k);
* ``pyzmq PUB/SUB``: this process sends S bytes (stamp k in the first 8 bytes) from a
  preallocated buffer with ``copy=False`` on a default PUB socket; a SUB process receives
  them (``copy=False``) and writes k into an 8-byte acknowledgement stream.

Throughput: at most ``WINDOW`` frames in flight (a frame is sent once frame k - WINDOW is
acknowledged), for the run's duration; **MB/s = frames delivered x S / s** (a frame the
bridge conflated away is not delivered). Latency: one frame in flight; **p50/p99 = time from
publish/send to the acknowledgement seen here**. Both ends are on this host, so one clock.

The bridge does two copies that PUB/SUB does not: the server's snapshot of the stream into
the message buffer and the attachment's write into the local stream (both needed for a
consistent latest value on each side); ZeroMQ then sends from that buffer without copying.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import time
from typing import Any

import numpy as np

import torch_shmem as ts

from .common import (
    Config,
    Progress,
    Section,
    Target,
    fmt_bytes,
    fmt_ratio,
    fmt_us,
    join_all,
    md_table,
    percentiles,
    quiet_unlink,
    spawn_context,
    unique_name,
)

TITLE = "7. Bridge: a stream over ZeroMQ (loopback)"
BRIDGE, PUBSUB, RING = "bridge", "pyzmq PUB/SUB", "bridge ring (reliable)"
RING_SLOTS = 16
WINDOW = 4
KIB, MIB = 1024, 1024 * 1024
SIZES = {"full": (4 * KIB, 64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB),
         "quick": (64 * KIB, MIB, 4 * MIB),
         "smoke": (4 * KIB, 64 * KIB)}
TARGET_MIN_BYTES = MIB
TARGET_RATIO = 0.9
ACK_TIMEOUT = 10.0


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) of this process and of ``pids`` so far, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    total = ru.ru_utime + ru.ru_stime
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (proc(5) 14, 15)
        except (OSError, IndexError, ValueError):
            pass
    return total


# ---------------------------------------------------------------- child processes
def _server(name: str, ready: Any, stop: Any) -> None:
    from torch_shmem import bridge

    with bridge.serve(name) as srv:
        ready.put(srv.endpoint)
        stop.wait(600)


def _attachment(endpoint: str, local: str, ready: Any, stop: Any, reliable: bool = False) -> None:
    from torch_shmem import bridge

    with bridge.attach(endpoint, local, timeout=30, reliable=reliable) as att:
        ready.put("ok")
        stop.wait(600)
        ready.put(att.stat())


def _subscriber(endpoint: str, ack_name: str, ready: Any, stop: Any) -> None:
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    ack = ts.open(ack_name)
    value = np.zeros(1, np.uint64)
    ready.put("ok")
    while not stop.is_set():
        if not sub.poll(50):
            continue
        frame = sub.recv(copy=False)
        k = int(np.frombuffer(frame.buffer, np.uint64, count=1)[0])
        value[0] = k
        ack.write(value, frame_id=k)
    ack.close()
    sub.close(0)
    ctx.term()


# ---------------------------------------------------------------- pipelines
class _Pipeline:
    """Publish frame k; the acknowledgement stream's frame_id says the highest k delivered."""

    ack: Any
    procs: list

    def publish(self, k: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def acked(self) -> int:
        return self.ack.frame_id

    def wait_ack(self, k: int, seen: int) -> int:
        """Block until frame k (or a later one) is acknowledged; return the ack stream's count."""
        deadline = time.monotonic() + ACK_TIMEOUT
        while self.ack.frame_id < k:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"bridge bench: frame {k} not acknowledged within {ACK_TIMEOUT} s")
            try:
                seen = self.ack.wait_for_count(after=seen, timeout=remaining)
            except TimeoutError:
                continue
        return seen


class _BridgePipeline(_Pipeline):
    reliable = False

    def _make_source(self, nbytes: int) -> Any:
        return ts.create(self.name, shape=(nbytes // 8,), dtype=np.uint64)

    def __init__(self, nbytes: int) -> None:
        ctx = spawn_context()
        self.name, self.local = unique_name("brsrc"), unique_name("brdst")
        self.src = self._make_source(nbytes)
        self.src.write(np.zeros(nbytes // 8, np.uint64), frame_id=0)
        self.q, self.stop = ctx.Queue(), ctx.Event()
        self.procs = [ctx.Process(target=_server, args=(self.name, self.q, self.stop), daemon=True)]
        self.procs[0].start()
        endpoint = self.q.get(timeout=60)
        self.procs.append(ctx.Process(target=_attachment,
                                      args=(endpoint, self.local, self.q, self.stop, self.reliable),
                                      daemon=True))
        self.procs[1].start()
        if self.q.get(timeout=60) != "ok":
            raise RuntimeError("bridge bench: the attachment did not start")
        self.ack = ts.open(self.local, readonly=True)

    def publish(self, k: int) -> None:
        with self.src.write_view(frame_id=k) as view:  # a producer filling in place
            view[0] = k

    def close(self) -> dict:
        self.stop.set()
        stat = {}
        try:
            stat = self.q.get(timeout=30)
        except Exception:
            pass
        codes = join_all(self.procs, 30)
        self.ack.close()
        self.src.unlink()
        for n in (self.local, self.local + ".bridge"):
            quiet_unlink(ts, n)
        if any(c != 0 for c in codes):
            raise RuntimeError(f"bridge bench: child exit codes {codes}")
        return stat


class _RingPipeline(_BridgePipeline):
    """A ring (policy block) served in the reliable mode into a local ring: every frame is
    delivered, in order; the producer writes each from its own buffer (rings take no
    in-place writes), so this pipeline has one copy more than ``bridge``."""

    reliable = True

    def _make_source(self, nbytes: int) -> Any:
        self.frame = np.zeros(nbytes // 8, np.uint64)
        return ts.create(self.name, shape=(nbytes // 8,), dtype=np.uint64, ring=RING_SLOTS, policy="block")

    def publish(self, k: int) -> None:
        self.frame[0] = k
        self.src.write(self.frame, frame_id=k, timeout=ACK_TIMEOUT)


class _PubSubPipeline(_Pipeline):
    def __init__(self, nbytes: int) -> None:
        import zmq

        ctx = spawn_context()
        self.zctx = zmq.Context()
        self.pub = self.zctx.socket(zmq.XPUB)  # a PUB that also says when the subscriber is in
        self.pub.setsockopt(zmq.LINGER, 0)
        port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.ack_name = unique_name("brack")
        self.ack = ts.create(self.ack_name, shape=(1,), dtype=np.uint64)
        self.ack.write(np.zeros(1, np.uint64), frame_id=0)
        # WINDOW + 1 buffers: buffer k % (WINDOW + 1) is reused only after frame k was
        # acknowledged, i.e. after ZeroMQ finished sending it
        self.bufs = [np.zeros(nbytes // 8, np.uint64) for _ in range(WINDOW + 1)]
        self.q, self.stop = ctx.Queue(), ctx.Event()
        self.procs = [ctx.Process(target=_subscriber, args=(f"tcp://127.0.0.1:{port}", self.ack_name,
                                                            self.q, self.stop), daemon=True)]
        self.procs[0].start()
        if self.q.get(timeout=60) != "ok" or not self.pub.poll(60_000):
            raise RuntimeError("bridge bench: the PUB/SUB subscriber did not start")
        self.pub.recv()  # its subscription

    def publish(self, k: int) -> None:
        buf = self.bufs[k % len(self.bufs)]
        buf[0] = k
        self.pub.send(buf, copy=False)

    def close(self) -> dict:
        self.stop.set()
        codes = join_all(self.procs, 30)
        self.pub.close(0)
        self.zctx.term()
        self.ack.unlink()
        if any(c != 0 for c in codes):
            raise RuntimeError(f"bridge bench: PUB/SUB child exit codes {codes}")
        return {}


def _throughput(p: _Pipeline, start: int, duration: float) -> tuple[float, float, int, float, int]:
    """(frames delivered per s, frames published per s, last k, CPU s per frame delivered,
    frames published but not delivered)."""
    seen = p.ack.count
    k = start
    pids = [q.pid for q in p.procs]
    cpu0 = _cpu_seconds(pids)
    t0 = time.perf_counter()
    first = p.ack.count
    while True:
        if k + 1 - WINDOW > p.acked():
            seen = p.wait_ack(k + 1 - WINDOW, seen)
        k += 1
        p.publish(k)
        if time.perf_counter() - t0 >= duration:
            break
    p.wait_ack(k, seen)
    elapsed = time.perf_counter() - t0
    delivered = max(1, p.ack.count - first)
    cpu = (_cpu_seconds(pids) - cpu0) / delivered
    return delivered / elapsed, (k - start) / elapsed, k, cpu, (k - start) - (p.ack.count - first)


def _latency(p: _Pipeline, start: int, samples: int, budget: float) -> tuple[list[int], int]:
    """One frame in flight: publish-to-acknowledgement times in ns."""
    out = []
    k = start
    seen = p.ack.count
    end = time.monotonic() + budget
    while len(out) < samples and time.monotonic() < end:
        k += 1
        t0 = time.perf_counter_ns()
        p.publish(k)
        seen = p.wait_ack(k, seen)
        out.append(time.perf_counter_ns() - t0)
    return out, k


def run(cfg: Config, progress: Progress) -> Section:
    """Both pipelines at every frame size: throughput (best of interleaved repeats) and latency."""
    sec = Section("bridge", TITLE)
    if cfg.gpu == "only":
        sec.notes.append("skipped: --gpu (CPU only)")
        return sec
    if importlib.util.find_spec("zmq") is None:
        sec.notes.append("skipped: pyzmq is not installed (`pip install -e .[bridge]`)")
        return sec
    import zmq

    sizes = SIZES[cfg.mode]
    duration = max(cfg.duration, cfg.pick(1.0, 0.3, 0.02))
    samples = cfg.pick(1000, 200, 10)
    progress.start("bridge", len(sizes) * 3 * (cfg.repeats + 1))
    for nbytes in sizes:
        pipes: dict[str, Any] = {}
        row: dict[str, Any] = {"bytes": nbytes}
        try:
            pipes[BRIDGE] = _BridgePipeline(nbytes)
            pipes[PUBSUB] = _PubSubPipeline(nbytes)
            pipes[RING] = _RingPipeline(nbytes)
            ks = {impl: 0 for impl in pipes}
            rates: dict[str, list[float]] = {impl: [] for impl in pipes}
            offered: dict[str, list[float]] = {impl: [] for impl in pipes}
            cpu: dict[str, list[float]] = {impl: [] for impl in pipes}
            lost: dict[str, int] = {impl: 0 for impl in pipes}
            for impl, p in pipes.items():  # warm-up
                ks[impl] = _throughput(p, ks[impl], min(0.1, duration))[2]
            for _ in range(cfg.repeats):
                for impl, p in pipes.items():
                    got, pub, ks[impl], c, missing = _throughput(p, ks[impl], duration)
                    lost[impl] += missing
                    rates[impl].append(got)
                    offered[impl].append(pub)
                    cpu[impl].append(c)
                    progress.step(f"{fmt_bytes(nbytes)} {impl}")
            for impl, p in pipes.items():
                lat, ks[impl] = _latency(p, ks[impl], samples, budget=max(2.0, 10 * duration))
                best = int(np.argmax(rates[impl]))
                row[impl] = {"frames_per_s": max(rates[impl]), "repeats": rates[impl],
                             "published_per_s": offered[impl][best],
                             "cpu_ms_per_MB": min(cpu[impl]) * 1e3 / (nbytes / 1e6),
                             "MBps": max(rates[impl]) * nbytes / 1e6,
                             "latency_us": percentiles(lat), "latency_samples": len(lat),
                             "not_delivered": lost[impl]}
                progress.step(f"{fmt_bytes(nbytes)} {impl} latency")
        finally:
            for impl, p in pipes.items():
                stat = p.close()
                if impl in (BRIDGE, RING) and stat:
                    row["bridge_stat" if impl == BRIDGE else "ring_stat"] = {
                        k: stat.get(k) for k in ("delivered", "skipped", "duplicates", "malformed")}
        row["ratio"] = row[BRIDGE]["frames_per_s"] / row[PUBSUB]["frames_per_s"]
        row["ring_ratio"] = row[RING]["frames_per_s"] / row[PUBSUB]["frames_per_s"]
        sec.rows.append(row)
    progress.finish()

    sec.method = (
        f"One frame of S bytes from this process to a consumer process on loopback, acknowledged "
        f"through a torch_shmem stream. `{BRIDGE}`: the producer stamps frame k into a source "
        f"stream in place (`write_view`); a `bridge.serve` process sends it; a `bridge.attach` "
        f"process republishes it into a local stream, whose `frame_id` is the acknowledgement. "
        f"`{PUBSUB}`: `send(copy=False)` of S bytes on a default PUB socket; a SUB process receives "
        f"them (`copy=False`) and writes k into an 8-byte acknowledgement stream. Throughput: "
        f"at most {WINDOW} frames in flight for {duration:g} s, best of {cfg.repeats} interleaved "
        f"repeats; **MB/s = frames delivered x S / s** (MB = 1e6 B; a frame the bridge conflated "
        f"away is not delivered). **CPU ms per MB = CPU time of every process of the pipeline "
        f"(all threads, ZeroMQ's I/O threads included) / MB delivered** (lowest repeat; /proc "
        f"ticks of 10 ms, so coarse for short runs). Latency: one frame in flight, {samples} "
        f"samples; **p50/p99 = publish-to-acknowledgement time**. Second table, `{RING}`: the "
        f"same with a ring of {RING_SLOTS} slots (policy block) served in the reliable mode into "
        f"a local ring (`attach(reliable=True)`): every frame is delivered in order (no "
        f"conflation: frames published and not delivered in the timed runs, and the "
        f"attachment's `skipped` count, must be 0), and the producer writes each frame from its own "
        f"buffer (rings take no in-place writes: one copy more than `{BRIDGE}`)."
    )
    table = []
    for r in sec.rows:
        b, z = r[BRIDGE], r[PUBSUB]
        table.append((fmt_bytes(r["bytes"]), f"{b['MBps']:,.0f}", f"{z['MBps']:,.0f}", fmt_ratio(r["ratio"]),
                      f"{b['frames_per_s']:,.0f}", f"{z['frames_per_s']:,.0f}",
                      f"{b['cpu_ms_per_MB']:.2f} / {z['cpu_ms_per_MB']:.2f}",
                      f"{fmt_us(b['latency_us']['p50'])} / {fmt_us(b['latency_us']['p99'])}",
                      f"{fmt_us(z['latency_us']['p50'])} / {fmt_us(z['latency_us']['p99'])}"))
    sec.tables.append(md_table(
        ("frame", "bridge MB/s", "PUB/SUB MB/s", "bridge / PUB/SUB", "bridge frames/s",
         "PUB/SUB frames/s", "CPU ms per MB (bridge / PUB/SUB)", "bridge p50 / p99 µs",
         "PUB/SUB p50 / p99 µs"),
        table, right=(1, 2, 3, 4, 5, 6, 7, 8)))
    ring_table = []
    for r in sec.rows:
        g, z, st = r[RING], r[PUBSUB], r.get("ring_stat") or {}
        ring_table.append((fmt_bytes(r["bytes"]), f"{g['MBps']:,.0f}", fmt_ratio(r["ring_ratio"]),
                           f"{g['frames_per_s']:,.0f}", f"{g['not_delivered']:,}",
                           str(st.get("skipped", "?")), f"{g['cpu_ms_per_MB']:.2f}",
                           f"{fmt_us(g['latency_us']['p50'])} / {fmt_us(g['latency_us']['p99'])}"))
    sec.tables.append(md_table(
        ("frame", "ring MB/s", "ring / PUB/SUB", "ring frames/s", "not delivered (timed runs)",
         "skipped (attachment)", "CPU ms per MB", "ring p50 / p99 µs"),
        ring_table, right=(1, 2, 3, 4, 5, 6, 7)))
    big = [r for r in sec.rows if r["bytes"] >= TARGET_MIN_BYTES]
    if big:
        worst = min(r["ratio"] for r in big)
        sec.targets.append(Target(
            "bridge throughput", f">= {TARGET_RATIO}x plain pyzmq PUB/SUB at frames >= 1 MiB",
            ", ".join(f"{fmt_bytes(r['bytes'])}: {r['ratio']:.2f}x" for r in big), worst >= TARGET_RATIO))
    sec.notes.append(f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}; producer, server, attachment "
                     "(or sender, subscriber) and ZeroMQ's I/O threads share the machine's cores")
    return sec
