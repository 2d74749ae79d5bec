"""Rings: every publication to every reader (``create(ring=N, policy=...)``, ``read_next``).

Two measurements, 1024 float32 (4 KiB) payloads stamped with their count:

* ``block``: the writer publishes at about ``PACED_HZ`` (publication k due at
  start + k / PACED_HZ; a late writer catches up), a ring of ``RING`` slots with
  policy ``block``, ``READERS`` reader processes each with its own cursor
  (``open(name, reader=...)`` then ``read_next`` in a loop). Per reader: publications
  received, lost (skipped: ``missed_publications`` plus counts never seen),
  duplicated (a count seen twice or out of order), and the latency of each item,
  receipt time - ``write_time`` (both ``time.time()``, the realtime clock).
* ``overwrite``: one reader, the writer back to back for ``duration`` seconds; once
  with the reader running, once with it SIGSTOPped for ``STOP_S`` seconds (then
  SIGCONT). Writer Hz over the run and over the stop window (the same window of the
  run without a stop), and what the reader reports missed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import numpy as np

import torch_shmem as ts

from .common import (
    Config,
    Progress,
    Section,
    fmt_hz,
    join_all,
    md_table,
    spawn_context,
    unique_name,
)

TITLE = "8. Rings: every publication to every reader"
N = 1024  # float32 items per payload (4 KiB)
RING = 64
READERS = 4
PACED_HZ = 10_000
STOP_S = 1.0


def _payload(c: int) -> np.ndarray:
    a = np.zeros(N, np.float32)
    a[:2] = np.array([c], np.int64).view(np.float32)  # the count in the first 8 bytes
    return a


def _count_of(a: np.ndarray) -> int:
    return int(a[:2].view(np.int64)[0])


def _reader(name: str, cursor: str, ready: Any, results: Any) -> None:
    """Reads until the payload's count is -1; reports counts seen, missed and latencies."""
    shm = ts.open(name, reader=cursor)
    ready.set()
    lat: list[float] = []
    seen: list[int] = []
    missed = 0
    while True:
        pub = shm.read_next(timeout=60)
        now = time.time()
        if _count_of(pub.payload) == -1:
            break
        lat.append(now - pub.write_time)
        seen.append(pub.count)
        missed += pub.missed_publications
    shm.close()
    results.put((cursor, seen, missed, lat))


def _run_block(duration: float) -> dict:
    ctx = spawn_context()
    name = unique_name("ring")
    shm = ts.create(name, shape=(N,), dtype=np.float32, ring=RING, policy="block")
    results = ctx.Queue()
    readys = [ctx.Event() for _ in range(READERS)]
    procs = [ctx.Process(target=_reader, args=(name, f"r{i}", readys[i], results))
             for i in range(READERS)]
    try:
        for p in procs:
            p.start()
        for e in readys:
            if not e.wait(60):
                raise RuntimeError("a ring reader did not start")
        total = max(1, int(duration * PACED_HZ))
        start = time.monotonic()
        for c in range(1, total + 1):
            due = start + c / PACED_HZ
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            shm.write(_payload(c), timeout=30)
        elapsed = time.monotonic() - start
        end = _payload(0)
        end[:2] = np.array([-1], np.int64).view(np.float32)
        shm.write(end, timeout=30)
        got = [results.get(timeout=60) for _ in range(READERS)]
        join_all(procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shm.unlink()
    per = []
    all_lat: list[float] = []
    for cursor, seen, missed, lat in sorted(got):
        arr = np.asarray(seen)
        dup = int(np.sum(np.diff(arr) <= 0)) if arr.size > 1 else 0
        lost = missed + (total - len(set(seen)))
        per.append({"cursor": cursor, "received": len(seen), "lost": lost, "duplicated": dup})
        all_lat += lat
    lat_us = np.asarray(all_lat) * 1e6
    return {"table": "block", "policy": "block", "ring": RING, "readers": READERS,
            "target_hz": PACED_HZ, "writer_hz": total / elapsed, "published": total,
            "lost": sum(r["lost"] for r in per), "duplicated": sum(r["duplicated"] for r in per),
            "p50_us": float(np.percentile(lat_us, 50)), "p99_us": float(np.percentile(lat_us, 99)),
            "max_us": float(np.max(lat_us)), "per_reader": per}


def _run_overwrite(duration: float, stop: bool, stop_s: float) -> dict:
    ctx = spawn_context()
    name = unique_name("ringow")
    shm = ts.create(name, shape=(N,), dtype=np.float32, ring=RING, policy="overwrite")
    results, ready = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_reader, args=(name, "r", ready, results))
    try:
        p.start()
        if not ready.wait(60):
            raise RuntimeError("the ring reader did not start")
        payload = _payload(0)
        win_start = duration / 2 - stop_s / 2  # the stop window, centred in the run
        win_end = win_start + stop_s
        c = 0
        in_window = 0
        stopped = False
        start = time.monotonic()
        while True:
            now = time.monotonic() - start
            if now >= duration:
                break
            if stop and not stopped and now >= win_start:
                os.kill(p.pid, signal.SIGSTOP)
                stopped = True
            if stop and stopped and now >= win_end:
                os.kill(p.pid, signal.SIGCONT)
                stop = False
            c += 1
            payload[:2] = np.array([c], np.int64).view(np.float32)
            shm.write(payload)
            if win_start <= now < win_end:
                in_window += 1
        elapsed = time.monotonic() - start
        if stop and stopped:
            os.kill(p.pid, signal.SIGCONT)
        payload[:2] = np.array([-1], np.int64).view(np.float32)
        shm.write(payload)
        cursor, seen, missed, _lat = results.get(timeout=60)
        join_all([p])
    finally:
        if p.is_alive():
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        shm.unlink()
    return {"table": "overwrite", "policy": "overwrite", "ring": RING, "stopped": stopped,
            "writer_hz": c / elapsed, "window_hz": in_window / stop_s, "published": c,
            "received": len(seen), "missed": missed,
            "accounted": len(seen) + missed == c}


def run(cfg: Config, progress: Progress) -> Section:
    sec = Section("ring", TITLE)
    if cfg.gpu == "only":
        sec.notes.append("skipped: --gpu (CPU only)")
        return sec
    block_s = cfg.pick(5.0, 2.0, 0.1)
    ow_s = cfg.pick(4.0, 2.0, 0.4)
    stop_s = cfg.pick(STOP_S, STOP_S, 0.1)
    progress.start("ring", 3)
    block = _run_block(block_s)
    progress.step("block")
    free = _run_overwrite(ow_s, False, stop_s)
    progress.step("overwrite")
    held = _run_overwrite(ow_s, True, stop_s)
    progress.step("overwrite, reader stopped")
    progress.finish()
    sec.rows += [block, free, held]
    sec.method = (
        f"4 KiB payloads. **block**: writer paced at {PACED_HZ} Hz for {block_s:g} s, a ring "
        f"of {RING} slots with policy `block`, {READERS} reader processes each with a cursor "
        "(`read_next` loop); lost = skipped + never received, duplicated = a count not above "
        "the previous one; latency = receipt `time.time()` - the publication's `write_time`, "
        f"over every item of every reader. **overwrite**: ring of {RING}, one reader, writer "
        f"back to back for {ow_s:g} s; once as is, once with the reader SIGSTOPped for "
        f"{stop_s:g} s in the middle of the run; window Hz = writes during that {stop_s:g} s "
        "window (the same window in the run without a stop) / its length."
    )
    sec.tables.append(md_table(
        ("policy", "readers", "target Hz", "writer Hz", "published", "lost", "duplicated",
         "latency p50 (µs)", "p99 (µs)", "max (µs)"),
        [("block", READERS, fmt_hz(PACED_HZ), fmt_hz(block["writer_hz"]), block["published"],
          block["lost"], block["duplicated"], f"{block['p50_us']:.0f}", f"{block['p99_us']:.0f}",
          f"{block['max_us']:.0f}")],
        right=(1, 2, 3, 4, 5, 6, 7, 8, 9)))
    sec.tables.append(md_table(
        ("policy", "reader", "writer Hz (run)", "writer Hz (window)", "published", "received",
         "missed (reported)", "received + missed = published"),
        [("overwrite", "stopped" if r["stopped"] else "running", fmt_hz(r["writer_hz"]),
          fmt_hz(r["window_hz"]), r["published"], r["received"], r["missed"],
          "yes" if r["accounted"] else "NO") for r in (free, held)],
        right=(2, 3, 4, 5, 6)))
    sec.notes.append(
        f"{len(os.sched_getaffinity(0))} usable cores: the writer and {READERS} readers share "
        "them, so latency includes waiting for a CPU.")
    return sec


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--only", "ring", *sys.argv[1:]]))
