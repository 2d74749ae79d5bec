"""torch_shmem demo: a producer process streams frames to a consumer process.

    python examples/demo.py [--seconds 3] [--shape 480 640] [--name NAME]

The producer creates a float32 stream and publishes frames as fast as it can
for ``--seconds``; the consumer attaches with ``torch_shmem.open`` and loops on
``read_new(timeout=...)``, verifying that every frame it reads is intact (one
whole write, never a mix of two) and timing how long each frame took to get
from the producer's ``write`` to the return of ``read_new``. Both run in
processes started with the ``spawn`` context. The main process prints a short
report and exits 0 only if every frame read verified.

Frame layout (float32, shape ``(h, w)``, viewed flat):

* ``flat[0:6]`` is a header of three int64 (``flat[:6].view(np.int64)``):
  ``seq`` (1, 2, 3, ... : the producer is the only writer of a new stream, so
  ``seq`` also equals the stream's ``count`` after that write), ``send_ns``
  (``time.monotonic_ns()`` taken just before ``write``; CLOCK_MONOTONIC is
  system-wide on Linux, so the consumer can subtract it from its own clock),
  and ``seq ^ send_ns ^ MAGIC`` to catch a header mixed from two writes.
* ``flat[6:]`` is the body ``ramp + (seq % 65536)`` with ``ramp`` a fixed
  sawtooth of multiples of 0.5 below 126. Every value is exactly
  representable in float32, so the consumer checks ``body - ramp == seq % 65536``
  exactly; a torn read would show two different constants.

The sequence number and timestamp live inside the payload, rather than in
``write(..., frame_id=...)``, because ``read_new()`` followed by
``r.frame_id`` is two steps: ``frame_id`` reports the latest write, which may
already be newer than the frame just read. The payload is read atomically.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import sys
import time

import numpy as np

import torch_shmem as ts

MAGIC = 0x5EED_F00D_CAFE_BEEF
HEADER = 6  # float32 elements holding the three int64 header fields
BODY_MOD = 65536  # body constant is seq % BODY_MOD (float32-exact with the ramp)
MIN_FRAMES = 10  # fewer verified reads than this is a failure
READ_TIMEOUT = 0.25  # seconds per read_new call
START_TIMEOUT = 60.0  # spawning and importing a child can be slow on a busy machine
MAX_FAILURES_SHOWN = 5


def make_ramp(n: int) -> np.ndarray:
    """The fixed body pattern: 0, 0.5, 1, ..., 125 repeating (float32-exact)."""
    return ((np.arange(n, dtype=np.int64) % 251) * 0.5).astype(np.float32)


def producer(name, shape, seconds, created, ready, done, results):
    """Create the stream, wait for the consumer, publish for ``seconds``."""
    s = None
    try:
        s = ts.create(name, shape=shape, dtype=np.float32)
        created.set()
        if not ready.wait(START_TIMEOUT):
            raise RuntimeError("consumer did not attach in time")
        n = int(np.prod(shape))
        ramp = make_ramp(n)[HEADER:]
        frame = np.zeros(shape, dtype=np.float32)
        flat = frame.reshape(-1)
        header = flat[:HEADER].view(np.int64)  # writes through to frame
        body = flat[HEADER:]
        seq = 0
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            seq += 1
            np.add(ramp, np.float32(seq % BODY_MOD), out=body)
            send_ns = time.monotonic_ns()
            header[0] = seq
            header[1] = send_ns
            header[2] = seq ^ send_ns ^ MAGIC
            s.write(frame)
            if time.perf_counter() >= deadline:
                break
        elapsed = time.perf_counter() - t0
        results.put(("producer", {"published": seq, "elapsed": elapsed, "count": s.count}))
    except KeyboardInterrupt:
        pass
    finally:
        done.set()  # always, so the consumer stops waiting
        if s is not None:
            s.close()  # the main process unlinks the stream


def consumer(name, shape, created, ready, done, results):
    """Attach, loop on read_new until the producer is done, verify each frame."""
    r = None
    try:
        t_end = time.monotonic() + START_TIMEOUT
        while not created.wait(0.1):
            if done.is_set():
                return  # the producer failed before creating it (and said why)
            if time.monotonic() > t_end:
                raise RuntimeError("the producer did not create the stream in time")
        r = ts.open(name)
        n = int(np.prod(shape))
        ramp = make_ramp(n)[HEADER:]
        buf = np.empty(shape, dtype=np.float32)
        flat = buf.reshape(-1)
        header = flat[:HEADER].view(np.int64)
        body = flat[HEADER:]
        scratch = np.empty_like(body)

        start_count = r.last_read_count  # the count when the handle opened
        prev_seq = start_count
        reads = ok = gaps = 0
        failures = []  # (publication number, reason), the first few only
        n_failed = 0
        latencies = []
        ready.set()
        while True:
            try:
                r.read_new(timeout=READ_TIMEOUT, out=buf)
            except TimeoutError:
                if done.is_set():
                    break
                continue
            recv_ns = time.monotonic_ns()
            reads += 1
            seq, send_ns, check = (int(v) for v in header[:3])
            problem = None
            if check != (seq ^ send_ns ^ MAGIC):
                problem = "header checksum mismatch"
            else:
                np.subtract(body, ramp, out=scratch)
                want = np.float32(seq % BODY_MOD)
                # min == max == want  <=>  every body element matches this seq
                if not (scratch.min() == want and scratch.max() == want):
                    problem = "body does not match its header (torn or corrupt)"
                elif seq <= prev_seq:
                    problem = f"sequence went backwards ({prev_seq} -> {seq})"
                elif r.last_read_count != seq:
                    problem = f"last_read_count {r.last_read_count} != seq"
            if problem is None:
                ok += 1
                gaps += seq - prev_seq - 1
                prev_seq = seq
                latencies.append(recv_ns - send_ns)
            else:
                n_failed += 1
                if len(failures) < MAX_FAILURES_SHOWN:
                    failures.append((r.last_read_count, problem))
        lat_us = np.asarray(latencies, dtype=np.float64) / 1e3
        pct = (
            dict(zip(("p50", "p90", "p99"), np.percentile(lat_us, [50, 90, 99]).tolist()),
                 max=float(lat_us.max()))
            if lat_us.size else {}
        )
        results.put(("consumer", {
            "reads": reads,
            "ok": ok,
            "failed": n_failed,
            "failures": failures,
            "start_count": start_count,
            "last_read_count": r.last_read_count,
            "final_count": r.count,
            "total_missed": r.total_missed_writes,
            "seq_gaps": gaps,
            "latency_us": pct,
        }))
    except KeyboardInterrupt:
        pass
    finally:
        ready.set()  # never leave the producer waiting
        if r is not None:
            r.close()


def report(name, shape, prod, cons) -> bool:
    """Print the summary table; return True when everything checked out."""
    h, w = shape
    mb = h * w * 4 / 1e6
    secs = prod["elapsed"]
    rate = prod["published"] / secs
    unread = cons["final_count"] - cons["last_read_count"]
    gaps = cons["seq_gaps"]
    print(f"torch_shmem demo: {name!r}  {h}x{w} float32 ({mb:.2f} MB/frame)  {secs:.2f} s")
    print(f"  published    {prod['published']:>9} frames  {rate:>9.0f} Hz  {rate * mb / 1e3:.2f} GB/s")
    print(f"  read         {cons['reads']:>9} frames  {cons['reads'] / secs:>9.0f} Hz")
    print(f"  missed       {cons['total_missed']:>9} frames  "
          f"(total_missed_writes; sequence gaps: {gaps})")
    print(f"  unread       {unread:>9} frames  (published after the last read)")
    if cons["total_missed"]:
        print("               missed frames are normal here: a stream holds the latest value"
              " only, and a")
        print("               reader slower than the writer skips to the newest frame; every"
              " skipped frame")
        print("               is counted (missed_writes), never read torn or twice")
    lat = cons["latency_us"]
    if lat:
        print(f"  latency us   p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  "
              f"p99 {lat['p99']:.1f}  max {lat['max']:.1f}  (write -> read_new returns)")

    problems = []
    if cons["failed"] == 0:  # (the sequence numbers of failed frames are not trusted)
        # Exact accounting: every publication since the consumer attached was
        # read, skipped between two reads, or published after the last read.
        if cons["total_missed"] != gaps:
            problems.append("total_missed_writes disagrees with the sequence gaps")
        accounted = cons["start_count"] + cons["ok"] + cons["total_missed"] + unread
        if accounted != prod["published"]:
            problems.append(f"frames unaccounted for: {accounted} != {prod['published']} published")
    if cons["final_count"] != prod["published"] or prod["count"] != prod["published"]:
        problems.append(f"stream count {cons['final_count']} != {prod['published']} published")
    if cons["ok"] < MIN_FRAMES:
        problems.append(f"only {cons['ok']} frames verified (need {MIN_FRAMES})")

    if cons["failed"] == 0:
        print(f"  checksum OK: {cons['ok']}/{cons['reads']} frames")
    else:
        print(f"  checksum FAILED: {cons['failed']}/{cons['reads']} frames")
        for number, why in cons["failures"]:
            print(f"    publication {number}: {why}")
    for p in problems:
        print(f"  ERROR: {p}")
    return cons["failed"] == 0 and not problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="publishing time (default 3)")
    parser.add_argument("--shape", type=int, nargs=2, default=[480, 640], metavar=("H", "W"),
                        help="frame shape (default 480 640)")
    parser.add_argument("--name", default=f"torch_shmem_demo_{os.getpid()}",
                        help="stream name (default torch_shmem_demo_<pid>)")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if min(shape) < 1 or shape[0] * shape[1] < HEADER + 1:
        parser.error(f"--shape must hold at least {HEADER + 1} elements")
    if args.seconds <= 0:
        parser.error("--seconds must be positive")

    ctx = mp.get_context("spawn")
    created, ready, done = ctx.Event(), ctx.Event(), ctx.Event()
    results = ctx.Queue()
    procs = [
        ctx.Process(target=producer, name="producer",
                    args=(args.name, shape, args.seconds, created, ready, done, results)),
        ctx.Process(target=consumer, name="consumer",
                    args=(args.name, shape, created, ready, done, results)),
    ]
    got = {}
    try:
        for p in procs:
            p.start()
        # Collect both results before joining (a child blocks on exit until
        # its queued data is consumed).
        deadline = time.monotonic() + args.seconds + 2 * START_TIMEOUT
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                who, data = results.get(timeout=0.5)
                got[who] = data
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break  # a child died; no result is coming from it
                if all(p.exitcode is not None for p in procs) and results.empty():
                    break
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        try:
            for p in procs:
                if p.pid is None:
                    continue  # never started
                p.join(timeout=10)
                if p.is_alive():
                    print(f"{p.name} did not exit; terminating it", file=sys.stderr)
                    p.terminate()
                    p.join(timeout=5)
        finally:
            # Unlink only a stream this run created: never someone else's
            # stream that happened to hold the name (create() refused it).
            if created.is_set():
                ts.unlink(args.name)

    codes = {p.name: p.exitcode for p in procs}
    if "producer" not in got or "consumer" not in got or any(codes.values()):
        print(f"demo FAILED: results from {sorted(got)}; exit codes {codes}", file=sys.stderr)
        return 1
    return 0 if report(args.name, shape, got["producer"], got["consumer"]) else 1


if __name__ == "__main__":
    sys.exit(main())
