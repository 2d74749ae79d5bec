"""Paced writer: CPU time of a reader in a ``read_new`` loop against a writer at 1 kHz.

One writer process publishes a 64 KiB frame (16384 float32) to every stream once per
millisecond (absolute deadlines, ``time.sleep`` in between); one reader process per
implementation loops on ``read_new(timeout=...)`` and samples ``time.process_time()``
(user + system CPU) and ``resource.getrusage`` over the measured window. All readers run
at once, against the same writer ticks.

Metrics: **CPU % of a core = reader CPU seconds / wall seconds x 100**, CPU µs per received
publication, reads/s and wake-ups/s (voluntary context switches / s).

Implementations: torch_shmem ``read_new`` (adaptive spin, the default), torch_shmem with
``TORCH_SHMEM_WAIT_SPIN=always`` (spins its 50 µs budget before every park: the behaviour
before adaptive waiting), pyshmem 1.4 ``read_new`` with ``notify=True`` (futex) and without
(its default: polling with short sleeps).

Design target: the torch_shmem reader costs no more CPU than pyshmem's futex reader.
"""

from __future__ import annotations

import os
import resource
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
    load_pyshmem,
    md_table,
    spawn_context,
    unique_name,
)

TITLE = "5b. Reader CPU against a paced writer (64 KiB at 1 kHz)"
TS, TS_ALWAYS, PY_NOTIFY, PY_POLL = (
    "torch_shmem read_new", "torch_shmem read_new, TORCH_SHMEM_WAIT_SPIN=always",
    "pyshmem notify=True read_new", "pyshmem polling read_new",
)
SHAPE = (16384,)  # 64 KiB of float32
RATE_HZ = 1000.0
WARMUP = 0.3  # seconds of writes before the window (the estimator learns the gap here)


def _sample() -> tuple:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return time.monotonic(), time.process_time(), ru.ru_nvcsw


def _reader(impl: str, name: str, start: float, seconds: float, results: Any) -> None:
    """Loop on read_new from `start` (monotonic) for WARMUP + seconds; measure the window."""
    if impl == TS_ALWAYS:
        os.environ["TORCH_SHMEM_WAIT_SPIN"] = "always"  # read at the first wait
    if impl in (TS, TS_ALWAYS):
        stream = ts.open(name)
    else:
        import pyshmem

        stream = pyshmem.open(name)
    begin, end = start + WARMUP, start + WARMUP + seconds
    first = last = None
    reads = 0
    while True:
        now = time.monotonic()
        if first is None and now >= begin:
            first, reads = _sample(), 0
        if now >= end:
            last = _sample()
            break
        try:
            stream.read_new(timeout=0.2)
            reads += 1
        except TimeoutError:
            pass
    stream.close()
    (w0, c0, v0), (w1, c1, v1) = first, last
    results.put((impl, w1 - w0, c1 - c0, v1 - v0, reads))


def _writer(streams: dict[str, str], start: float, seconds: float, done: Any) -> None:
    """Publish one frame to every stream per tick from `start` until the readers are done."""
    handles = []
    for impl, name in streams.items():
        if impl in (TS, TS_ALWAYS):
            handles.append(ts.open(name))
        else:
            import pyshmem

            handles.append(pyshmem.open(name))
    frame = np.zeros(SHAPE, np.float32)
    period = 1.0 / RATE_HZ
    tick = start
    stop = start + WARMUP + seconds + 0.3
    k = 0
    while tick < stop:
        delay = tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        frame[0] = k
        for i in range(len(handles)):  # rotate who is published first
            handles[(i + k) % len(handles)].write(frame)
        k += 1
        tick += period
    for h in handles:
        h.close()
    done.put(k)


def run(cfg: Config, progress: Progress) -> Section:
    """One writer at 1 kHz, one reader per implementation, all at once."""
    sec = Section("paced", TITLE)
    if cfg.gpu == "only":
        sec.notes.append("skipped: --gpu (CPU only)")
        return sec
    seconds = cfg.pick(4.0, 2.0, 0.1)
    pyshmem, py_note = load_pyshmem(cfg)
    names: dict[str, str] = {}
    owners: list[Any] = []
    for impl in (TS, TS_ALWAYS):
        names[impl] = unique_name("paced")
        owners.append(ts.create(names[impl], shape=SHAPE, dtype=np.float32))
    if pyshmem is not None:
        for impl, kw in ((PY_NOTIFY, {"notify": True}), (PY_POLL, {})):
            names[impl] = unique_name("paced")
            owners.append(pyshmem.create(names[impl], shape=SHAPE, dtype=np.float32, **kw))
    progress.start("paced", 1)
    ctx = spawn_context()
    results, done = ctx.Queue(), ctx.Queue()
    start = time.monotonic() + 3.0  # after the children have started (spawn imports)
    procs = [ctx.Process(target=_reader, args=(impl, name, start, seconds, results), daemon=True)
             for impl, name in names.items()]
    procs.append(ctx.Process(target=_writer, args=(names, start, seconds, done), daemon=True))
    try:
        for p in procs:
            p.start()
        got = {}
        for _ in names:
            impl, wall, cpu, vol, reads = results.get(timeout=seconds + 60)
            got[impl] = {"impl": impl, "wall_s": wall, "cpu_s": cpu, "cpu_pct": 100 * cpu / wall,
                         "reads_per_s": reads / wall, "wakeups_per_s": vol / wall,
                         "cpu_us_per_read": 1e6 * cpu / max(reads, 1)}
        writes = done.get(timeout=30)
        codes = join_all(procs, 30)
        if any(c != 0 for c in codes):
            raise RuntimeError(f"paced: child exit codes {codes}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        for o in owners:
            o.unlink()
    progress.step("", 1)
    progress.finish()
    sec.rows = [got[k] for k in names if k in got]
    base = got.get(PY_NOTIFY)
    sec.method = (
        f"A writer publishes 64 KiB to every stream at {RATE_HZ:g} Hz ({writes} ticks); one reader "
        f"process per implementation loops on `read_new` and is measured for {seconds:g} s after a "
        f"{WARMUP:g} s warm-up (all at once). **CPU % = reader CPU time / wall time x 100** (100% "
        "= one core); ratios are against pyshmem notify=True (lower is better)."
    )
    sec.tables.append(md_table(
        ("reader", "CPU % of a core", "vs pyshmem notify", "CPU µs / read", "reads/s",
         "wake-ups/s"),
        [(r["impl"], f"{r['cpu_pct']:.2f}%",
          f"{r['cpu_pct'] / base['cpu_pct']:.2f}x" if base else "n/a",
          f"{r['cpu_us_per_read']:.1f}", f"{r['reads_per_s']:.0f}", f"{r['wakeups_per_s']:.0f}")
         for r in sec.rows], right=(1, 2, 3, 4, 5)))
    sec.notes.append(py_note)
    t = got.get(TS)
    if t and base:
        ratio = t["cpu_pct"] / base["cpu_pct"]
        sec.targets.append(Target(
            "paced 1 kHz reader CPU", "<= pyshmem notify=True reader",
            f"{t['cpu_pct']:.2f}% vs {base['cpu_pct']:.2f}% ({ratio:.2f}x)", ratio <= 1.0))
    return sec


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--only", "paced", *sys.argv[1:]]))
