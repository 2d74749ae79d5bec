"""Fan-out: one writer process, N spawned reader processes, per-reader rate and missed frames.

The parent publishes 128x128 float32 frames (64 KiB), stamping a frame number in the
first 8 bytes; each reader loops "wait for a frame newer than the last one I read, read it"
(level-triggered: ``read_after(last)``) until told to stop. Two writer modes:

* ``max``: the writer publishes back to back (as fast as it can, with the readers
  competing for the same cores);
* ``paced``: the writer publishes at about ``PACED_HZ``, frames at least ``1/PACED_HZ``
  apart (no catch-up bursts after an overslept period); a reader that keeps up misses
  nothing.

Metrics per run (means over the N readers, and the slowest reader):

- writer Hz = frames written / duration;
- per-reader Hz = frames read / duration;
- missed % = frames skipped (gaps in the frame numbers a reader saw) / frames the reader
  could have seen (read + skipped); skipping is the contract of a latest-value stream, so
  this measures how far a reader falls behind, not data loss;
- reader CPU % = reader process CPU time / wall time (100% = one core).

Implementations: torch_shmem (``read_after``, futex waits), pyshmem 1.4 ``notify=True``
(``read_after``), and raw busy-poll (``multiprocessing.shared_memory``, readers spin on a
sequence counter; no consistency, so it may return torn frames). iceoryx2 is not run here:
its subscribers each hold a queue of samples rather than a latest value.

With 2 cores, 2 and 4 readers plus the writer oversubscribe the machine: the numbers show
how each implementation degrades, not its throughput on a larger host.
"""

from __future__ import annotations

import os
import sys
import time
from multiprocessing import shared_memory
from typing import Any

import numpy as np

import torch_shmem as ts

from .common import (
    Config,
    Progress,
    Section,
    fmt_hz,
    fmt_ratio,
    join_all,
    load_pyshmem,
    md_table,
    private_copy,
    private_empty,
    read_after,
    spawn_context,
    unique_name,
)

TITLE = "4. Fan-out: one writer, N readers"
SHAPE = (128, 128)
READERS = (1, 2, 4)
PACED_HZ = 1000
TS, PY, RAW = "torch_shmem read_after", "pyshmem notify=True read_after", "raw busy-poll"
RAW_OFFSET = 64
# Slotted streams against the raw bound: one reader, writer back to back, per frame size.
SLOT_SIZES = {"64 KiB": (128, 128), "1 MiB": (512, 512), "4 MiB": (1024, 1024), "16 MiB": (2048, 2048)}
SLOT_COUNTS = (1, 2, 3)


def _open(impl: str, name: str) -> Any:
    if impl == TS:
        return ts.open(name)
    import pyshmem

    return pyshmem.open(name)


def _reader(impl: str, name: str, ctrl_name: str, barrier: Any, results: Any, cpu: int | None,
            shape: tuple[int, ...] = SHAPE) -> None:
    """Read frames until the control byte is set; report (reads, missed, cpu s, wall s)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    ctrl_shm = shared_memory.SharedMemory(name=ctrl_name)
    ctrl = np.ndarray((1,), np.uint8, buffer=ctrl_shm.buf)
    buf = private_empty(shape, np.float32)
    stamp = buf.reshape(-1)[:2].view(np.uint64)
    reads = missed = 0
    if impl == RAW:
        shm = shared_memory.SharedMemory(name=name)
        seq = np.ndarray((1,), np.uint64, buffer=shm.buf)
        payload = np.ndarray(shape, np.float32, buffer=shm.buf, offset=RAW_OFFSET)
        last = int(seq[0])
        barrier.wait(60)
        t0, c0 = time.monotonic(), time.process_time()
        while not ctrl[0]:
            g = seq[0]
            if g == last:
                continue
            np.copyto(buf, payload)
            g = int(g)
            missed += g - last - 1
            last = g
            reads += 1
        del seq, payload
        shm.close()
    else:
        stream = _open(impl, name)
        last = stream.count
        barrier.wait(60)
        t0, c0 = time.monotonic(), time.process_time()
        while True:
            try:
                read_after(stream, last, buf, 0.2)
            except TimeoutError:
                if ctrl[0]:
                    break
                continue
            if ctrl[0]:
                break
            g = int(stamp[0])
            missed += g - last - 1
            last = g
            reads += 1
        stream.close()
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    del ctrl
    ctrl_shm.close()
    results.put((reads, missed, cpu, wall))


class Writer:
    """The parent's publisher for one implementation."""

    def __init__(self, impl: str, shape: tuple[int, ...] = SHAPE, slots: int | None = None) -> None:
        self.impl = impl
        self.frame = private_copy(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
        self.stamp = self.frame.reshape(-1)[:2].view(np.uint64)
        self.stamp[0] = 0
        if impl == RAW:
            self.shm = shared_memory.SharedMemory(create=True, size=RAW_OFFSET + self.frame.nbytes)
            self.name = self.shm.name
            self.seq = np.ndarray((1,), np.uint64, buffer=self.shm.buf)
            self.payload = np.ndarray(shape, np.float32, buffer=self.shm.buf, offset=RAW_OFFSET)
            self.seq[0] = 0
        else:
            self.name = unique_name("fan")
            if impl == TS:
                self.stream = ts.create(self.name, shape=shape, dtype=np.float32, slots=slots)
            else:
                import pyshmem

                self.stream = pyshmem.create(self.name, shape=shape, dtype=np.float32, notify=True)

    def write(self, k: int) -> None:
        self.stamp[0] = k
        if self.impl == RAW:
            np.copyto(self.payload, self.frame)
            self.seq[0] = k
        else:
            self.stream.write(self.frame)

    def close(self) -> None:
        if self.impl == RAW:
            del self.seq, self.payload
            self.shm.close()
            self.shm.unlink()
        else:
            self.stream.unlink()


def run_once(impl: str, readers: int, duration: float, paced_hz: float | None,
             shape: tuple[int, ...] = SHAPE, slots: int | None = None) -> dict:
    """One writer and ``readers`` reader processes for ``duration`` seconds."""
    ctx = spawn_context()
    writer = Writer(impl, shape, slots)
    ctrl_shm = shared_memory.SharedMemory(create=True, size=8)
    ctrl = np.ndarray((1,), np.uint8, buffer=ctrl_shm.buf)
    ctrl[0] = 0
    barrier = ctx.Barrier(readers + 1)
    results = ctx.Queue()
    cpus = sorted(os.sched_getaffinity(0))
    # Writer on the first CPU, readers round-robin over the others (all CPUs with one only).
    reader_cpus = cpus[1:] or cpus
    procs = [ctx.Process(target=_reader, args=(impl, writer.name, ctrl_shm.name, barrier, results,
                                               reader_cpus[i % len(reader_cpus)], shape), daemon=True)
             for i in range(readers)]
    saved = set(cpus)
    try:
        os.sched_setaffinity(0, {cpus[0]})
        for p in procs:
            p.start()
        barrier.wait(60)
        k = 0
        t0 = time.perf_counter()
        end = t0 + duration
        if paced_hz:
            # Frames at least one period apart: a writer that overslept does not catch up
            # with a burst (which a reader could not be expected to follow).
            period = 1.0 / paced_hz
            now = t0
            while now < end:
                k += 1
                writer.write(k)
                next_t = now + period
                while (now := time.perf_counter()) < next_t:
                    time.sleep(max(0.0, next_t - now - 50e-6))
        else:
            now = t0
            while now < end:
                for _ in range(16):
                    k += 1
                    writer.write(k)
                now = time.perf_counter()
        elapsed = time.perf_counter() - t0
        ctrl[0] = 1
        writer.write(k + 1)  # wake blocked readers so they see the stop byte
        got = [results.get(timeout=60) for _ in procs]
        codes = join_all(procs, 30)
        if any(c != 0 for c in codes):
            raise RuntimeError(f"fan-out {impl}: reader exit codes {codes}")
    finally:
        os.sched_setaffinity(0, saved)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        writer.close()
        del ctrl
        ctrl_shm.close()
        ctrl_shm.unlink()
    rates = [r[0] / r[3] for r in got]
    missed = [r[1] / max(1, r[0] + r[1]) for r in got]
    return {"impl": impl, "readers": readers, "mode": f"paced {paced_hz:g} Hz" if paced_hz else "max",
            "writer_hz": k / elapsed, "reader_hz_mean": float(np.mean(rates)),
            "reader_hz_min": float(np.min(rates)), "missed_frac_mean": float(np.mean(missed)),
            "missed_frac_max": float(np.max(missed)),
            "reader_cpu_mean": float(np.mean([r[2] / r[3] for r in got])),
            "per_reader": [{"reads": r[0], "missed": r[1], "cpu_s": r[2], "wall_s": r[3]} for r in got]}


def run(cfg: Config, progress: Progress) -> Section:
    """Every implementation x reader count x writer mode."""
    pyshmem, py_note = load_pyshmem(cfg)
    impls = [TS] + ([PY] if pyshmem is not None else []) + [RAW]
    counts = list(cfg.pick(READERS, READERS, (1,)))
    duration = cfg.pick(2.0, 0.5, 0.1)
    modes: list[float | None] = [None] if cfg.smoke else [None, PACED_HZ]
    plan = [(m, n, i) for m in modes for n in counts for i in impls
            if not (m and i == RAW)]  # a spinning reader trivially keeps up with a paced writer
    sec = Section("fanout", TITLE)
    if cfg.gpu == "only":
        sec.notes.append("skipped: --gpu (CPU only)")
        return sec
    sizes = cfg.pick(list(SLOT_SIZES), list(SLOT_SIZES), ["64 KiB"])
    slot_counts = cfg.pick(SLOT_COUNTS, SLOT_COUNTS, (1, 2))
    # per size, every slot count and the raw bound back to back (ratios within one size)
    slot_plan = [(size, impl, k) for size in sizes
                 for impl, k in [(TS, k) for k in slot_counts] + [(RAW, 1)]]
    # interleaved rounds, the best reader rate of each kept (a busy machine only slows runs down)
    rounds = 1 if cfg.smoke else max(1, cfg.repeats)
    progress.start("fanout", len(plan) + rounds * len(slot_plan))
    for mode, n, impl in plan:
        sec.rows.append(run_once(impl, n, duration, mode))
        progress.step(f"{impl} x{n}")
    best: dict[tuple, dict] = {}
    for _ in range(rounds):
        for size, impl, k in slot_plan:
            row = run_once(impl, 1, duration, None, SLOT_SIZES[size], k)
            row.update(table="slots", frame=size, slots=k if impl == TS else None)
            key = (size, impl, k)
            if key not in best or row["reader_hz_mean"] > best[key]["reader_hz_mean"]:
                best[key] = row
            progress.step(f"{impl} slots={k} {size}")
    slot_rows = [best[key] for key in slot_plan]
    progress.finish()
    sec.method = (
        f"The writer publishes 128x128 float32 frames (64 KiB) for {duration:g} s, either back "
        f"to back (`max`) or at {PACED_HZ} Hz (`paced`); each reader process waits for a frame "
        "newer than its last one and reads it. The writer is pinned to the first CPU and the "
        "readers round-robin to the others (all on the second CPU here). **per-reader Hz = "
        "frames read / s; missed % = skipped frames / (read + skipped); reader CPU % = CPU time / wall time** (mean over "
        "readers; min = slowest reader). torch_shmem streams of the first table are made with "
        "`create()`'s defaults (3 slots for these frames)."
    )
    hz = {(r["mode"], r["readers"], r["impl"]): r["reader_hz_mean"] for r in sec.rows}
    for r in sec.rows:
        if r["impl"] == TS:
            for key, base in (("vs_raw", RAW), ("vs_pyshmem", PY)):
                b = hz.get((r["mode"], r["readers"], base))
                r[key] = r["reader_hz_mean"] / b if b else None
    body = [(r["mode"], r["readers"], r["impl"], fmt_hz(r["writer_hz"]), fmt_hz(r["reader_hz_mean"]),
             fmt_hz(r["reader_hz_min"]), f"{100 * r['missed_frac_mean']:.1f}%",
             f"{100 * r['reader_cpu_mean']:.0f}%", fmt_ratio(r.get("vs_raw")),
             fmt_ratio(r.get("vs_pyshmem"))) for r in sec.rows]
    sec.tables.append(md_table(("writer", "readers", "implementation", "writer Hz", "per-reader Hz",
                                "slowest reader Hz", "missed %", "reader CPU %",
                                "reader Hz vs raw", "vs pyshmem"), body,
                               right=(1, 3, 4, 5, 6, 7, 8, 9)))
    raw_hz = {r["frame"]: r["reader_hz_mean"] for r in slot_rows if r["impl"] == RAW}
    for r in slot_rows:
        b = raw_hz.get(r["frame"])
        r["vs_raw"] = r["reader_hz_mean"] / b if b and r["impl"] == TS else None
    sec.tables.append(md_table(
        ("frame", "implementation", "slots", "writer Hz", "reader Hz", "missed %", "reader CPU %",
         "reader Hz vs raw"),
        [(r["frame"], r["impl"], r["slots"] or "-", fmt_hz(r["writer_hz"]), fmt_hz(r["reader_hz_mean"]),
          f"{100 * r['missed_frac_mean']:.1f}%", f"{100 * r['reader_cpu_mean']:.0f}%",
          fmt_ratio(r.get("vs_raw"))) for r in slot_rows],
        right=(2, 3, 4, 5, 6, 7)))
    sec.rows += slot_rows
    sec.method += (
        " Second table: one reader, writer back to back, float32 frames of each size, for "
        "`create(slots=N)` streams and the raw busy-poll bound, in interleaved rounds (best "
        f"reader rate of {rounds} kept); ratio = reader Hz / raw reader Hz of the same size."
    )
    sec.notes += [py_note,
                  f"{len(os.sched_getaffinity(0))} usable cores: with 2 and 4 readers plus "
                  "the writer the machine is oversubscribed, so per-reader rates fall with N and "
                  "busy-polling readers take CPU from the writer.",
                  "iceoryx2 not run here: a subscriber holds a queue of samples, not a latest value."]
    return sec


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--only", "fanout", *sys.argv[1:]]))
