"""Readiness descriptors: wake-up latency of one selector thread watching many streams.

A writer process publishes a small frame (16 float32) to one stream at a time, chosen at
random, paced at 1 ms; the bench process watches every stream's ``fileno()`` in one
``selectors.DefaultSelector`` (epoll) and, on each readiness, reads the publication with
``read_publication()``. **Wake-up latency = time the read returns (realtime) - the
publication's write_time**, both taken on the same machine clock. The same pacing against a
single stream gives two references in the same run: that stream's descriptor in a selector,
and a ``read_new`` loop (futex wait, no descriptor). The writer times each ``write()`` call,
so the cost a watched stream adds to the write path (one datagram per armed reader) shows.

Design target (issue: readers that never wait on the writer): 1,000 streams in one
selector thread, wake-up latency p50 reported; no thread per stream.
"""

from __future__ import annotations

import random
import resource
import selectors
import sys
import time
from typing import Any

import numpy as np

import torch_shmem as ts

from .common import (
    Config,
    Progress,
    Section,
    Target,
    join_all,
    md_table,
    spawn_context,
    unique_name,
)

TITLE = "5c. Readiness descriptors: one selector thread, many streams"
SHAPE = (16,)
GAP = 1e-3  # seconds between writes


def _writer(names: list[str], writes: int, seed: int, start: float, results: Any) -> None:
    """Publish `writes` frames, each to a random stream, GAP apart; report write() times."""
    rng = random.Random(seed)
    handles = [ts.open(n) for n in names]
    frame = np.zeros(SHAPE, np.float32)
    costs = []
    tick = start
    for k in range(writes):
        delay = tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        frame[0] = k
        h = handles[rng.randrange(len(handles))]
        t0 = time.perf_counter()
        h.write(frame, frame_id=k)
        costs.append(time.perf_counter() - t0)
        tick += GAP
    for h in handles:
        h.close()
    results.put(float(np.median(costs)))


def _raise_fd_limit(need: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return ""
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return f"RLIMIT_NOFILE raised from {soft} to {target} for {need} descriptors."


def _run_one(mode: str, nstreams: int, writes: int, seed: int) -> dict:
    """One measurement: `mode` is "fileno" (selector) or "read_new" (one stream, futex)."""
    names = [unique_name("fileno") for _ in range(nstreams)]
    owners = [ts.create(n, shape=SHAPE, dtype=np.float32) for n in names]
    readers = [ts.open(n) for n in names]
    sel = selectors.DefaultSelector()
    ctx = spawn_context()
    results = ctx.Queue()
    start = time.monotonic() + 2.5  # after the child has started (spawn imports)
    p = ctx.Process(target=_writer, args=(names, writes, seed, start, results), daemon=True)
    lat: list[float] = []
    got = 0
    try:
        if mode == "fileno":
            for i, r in enumerate(readers):
                sel.register(r.fileno(), selectors.EVENT_READ, r)
        p.start()
        cpu0, wall0 = time.process_time(), time.monotonic()
        deadline = start + writes * GAP + 30
        last = 0
        while last < writes - 1 and time.monotonic() < deadline:
            if mode == "fileno":
                for key, _ in sel.select(timeout=0.5):
                    pub = key.data.read_publication()
                    lat.append(time.time() - pub.write_time)
                    got += 1
                    last = max(last, pub.frame_id)
            else:
                try:
                    pub = readers[0].read_new_publication(timeout=0.5)
                except TimeoutError:
                    continue
                lat.append(time.time() - pub.write_time)
                got += 1
                last = max(last, pub.frame_id)
        cpu1, wall1 = time.process_time(), time.monotonic()
        # A lost wake-up would leave a stream with a publication never read.
        unread = sum(r.count > r.last_read_count for r in readers)
        write_cost = results.get(timeout=60)
        codes = join_all([p], 30)
        if codes != [0]:
            raise RuntimeError(f"fileno bench: writer exit code {codes}")
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
        sel.close()
        for h in readers + owners:
            h.close()
        for n in names:
            ts.unlink(n)
    a = np.array(lat) * 1e6
    return {
        "streams": nstreams,
        "writes": writes,
        "received": got,
        "unread_streams": unread,
        "p50_us": float(np.percentile(a, 50)),
        "p99_us": float(np.percentile(a, 99)),
        "max_us": float(a.max()),
        "reader_cpu_pct": 100 * (cpu1 - cpu0) / (wall1 - wall0),
        "write_us_p50": write_cost * 1e6,
    }


def run(cfg: Config, progress: Progress) -> Section:
    sec = Section("fileno", TITLE)
    if cfg.gpu == "only":
        sec.notes.append("skipped: --gpu (CPU only)")
        return sec
    many = cfg.pick(1000, 1000, 20)
    writes = cfg.pick(3000, 1000, 20)
    note = _raise_fd_limit(many + 256)
    if note:
        sec.notes.append(note)
    cases = [
        (f"fileno, {many} streams, one selector", "fileno", many),
        ("fileno, 1 stream, one selector", "fileno", 1),
        ("read_new loop, 1 stream (futex, no descriptor)", "read_new", 1),
    ]
    progress.start("fileno", len(cases))
    seed = random.randrange(2**31)
    for label, mode, n in cases:
        row = _run_one(mode, n, writes, seed)
        row["case"] = label
        sec.rows.append(row)
        progress.step(label, 1)
    progress.finish()
    sec.method = (
        f"A writer process publishes {writes} frames of 64 B, each to a random stream, {GAP * 1e3:g} ms "
        "apart; the bench process reads every readiness with `read_publication()` in one selector "
        "(epoll) thread. **Latency = realtime when the read returns - the publication's "
        "write_time** (p50/p99/max). Reader CPU % = process CPU time / wall time x 100. "
        "Reads below writes are publications that landed on a stream before its previous one "
        "was read (latest-value coalescing); *unread streams* counts streams whose latest "
        "publication was never read (a lost wake-up; must be 0). "
        f"Write µs p50: the writer's own `write()` call (seed {seed})."
    )
    sec.tables.append(md_table(
        ("reader", "received / writes", "unread streams", "p50 µs", "p99 µs", "max µs", "reader CPU %",
         "write() µs p50"),
        [(r["case"], f"{r['received']} / {r['writes']}", r["unread_streams"], f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}",
          f"{r['max_us']:.0f}", f"{r['reader_cpu_pct']:.1f}%", f"{r['write_us_p50']:.2f}")
         for r in sec.rows], right=(1, 2, 3, 4, 5, 6, 7)))
    big = sec.rows[0]
    sec.targets.append(Target(
        f"fileno: {many} streams in one selector thread",
        "no lost wake-up (every stream's latest publication read); p50 reported",
        f"{big['unread_streams']} unread, {big['received']}/{big['writes']} reads, "
        f"p50 {big['p50_us']:.1f} µs", big["unread_streams"] == 0))
    return sec


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--only", "fileno", *sys.argv[1:]]))
