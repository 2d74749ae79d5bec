"""Idle cost: CPU time burnt by a reader blocked waiting for a write that never comes.

Each spawned child opens a stream nobody writes, then blocks in ``read_new(timeout=T)``
(it raises TimeoutError after ``T`` seconds); around the blocked call it samples
``time.process_time()`` (user + system CPU of the process) and ``resource.getrusage``.

Metrics: **CPU % of a core = CPU seconds / wall seconds x 100** over the blocked call, and
wake-ups/s = voluntary context switches / wall seconds (how often the waiter is scheduled).

Implementations: ``time.sleep`` (the floor of the measurement), torch_shmem ``read_new``
(futex wait, woken every 100 ms to check for signals and ``close()``), pyshmem 1.4
``read_new`` with ``notify=True`` (futex) and without (its default: polling with short
sleeps), iceoryx2 ``Listener.timed_wait``. All children block at the same time.

Design target: a blocked torch_shmem reader uses under 1% of a core.
"""

from __future__ import annotations

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
    iox_node,
    load_iceoryx2,
    load_pyshmem,
    md_table,
    spawn_context,
    unique_name,
)

TITLE = "5. Idle cost of a blocked reader"
SLEEP, TS, PY_NOTIFY, PY_POLL, IOX = (
    "time.sleep (floor)", "torch_shmem read_new", "pyshmem notify=True read_new",
    "pyshmem polling read_new", "iceoryx2 Listener.timed_wait",
)


def _block(impl: str, name: str, seconds: float) -> None:
    """Block the way ``impl`` waits, for ``seconds`` (the setup is outside the window)."""
    if impl == SLEEP:
        time.sleep(seconds)
        return
    if impl == IOX:
        import iceoryx2 as iox

        node = iox_node(iox)
        listener = (node.service_builder(iox.ServiceName.new(name)).event().open()
                    .listener_builder().create())
        _Window.begin()
        listener.timed_wait(iox.Duration.from_secs_f64(seconds))
        _Window.end()
        listener.delete()
        return
    if impl == TS:
        stream = ts.open(name)
    else:
        import pyshmem

        stream = pyshmem.open(name)
    _Window.begin()
    try:
        stream.read_new(timeout=seconds)
    except TimeoutError:
        pass
    _Window.end()
    stream.close()


class _Window:
    """The measured interval (set by ``_block`` around the blocked call only)."""

    start: tuple = ()
    stop: tuple = ()

    @classmethod
    def sample(cls) -> tuple:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return time.monotonic(), time.process_time(), ru.ru_nvcsw, ru.ru_nivcsw

    @classmethod
    def begin(cls) -> None:
        cls.start = cls.sample()

    @classmethod
    def end(cls) -> None:
        cls.stop = cls.sample()


def _child(impl: str, name: str, seconds: float, barrier: Any, results: Any) -> None:
    barrier.wait(60)
    if impl == SLEEP:
        _Window.begin()
        _block(impl, name, seconds)
        _Window.end()
    else:
        _block(impl, name, seconds)
    (w0, c0, v0, i0), (w1, c1, v1, i1) = _Window.start, _Window.stop
    results.put((impl, w1 - w0, c1 - c0, v1 - v0, i1 - i0))


def run(cfg: Config, progress: Progress) -> Section:
    """Block one child per implementation for a few seconds, all at once."""
    sec = Section("idle", TITLE)
    if cfg.gpu == "only":
        sec.notes.append("skipped: --gpu (CPU only)")
        return sec
    seconds = cfg.pick(5.0, 2.0, 0.2)
    pyshmem, py_note = load_pyshmem(cfg)
    iox, iox_note = load_iceoryx2(cfg)
    streams: dict[str, Any] = {}
    names: dict[str, str] = {SLEEP: ""}
    names[TS] = unique_name("idle")
    streams[TS] = ts.create(names[TS], shape=(16,), dtype=np.float32)
    if pyshmem is not None:
        for impl, kw in ((PY_NOTIFY, {"notify": True}), (PY_POLL, {})):
            names[impl] = unique_name("idle")
            streams[impl] = pyshmem.create(names[impl], shape=(16,), dtype=np.float32, **kw)
    iox_keep = None
    if iox is not None:
        names[IOX] = unique_name("idle")
        node = iox_node(iox)
        iox_keep = (node, node.service_builder(iox.ServiceName.new(names[IOX])).event().create())
    progress.start("idle", 1)
    ctx = spawn_context()
    barrier = ctx.Barrier(len(names) + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(impl, name, seconds, barrier, results), daemon=True)
             for impl, name in names.items()]
    try:
        for p in procs:
            p.start()
        barrier.wait(120)
        got = {}
        for _ in procs:
            impl, wall, cpu, vol, invol = results.get(timeout=seconds + 60)
            got[impl] = {"impl": impl, "wall_s": wall, "cpu_s": cpu, "cpu_pct": 100 * cpu / wall,
                         "wakeups_per_s": vol / wall, "involuntary_per_s": invol / wall}
        codes = join_all(procs, 30)
        if any(c != 0 for c in codes):
            raise RuntimeError(f"idle: child exit codes {codes}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        for s in streams.values():
            s.unlink()
        del iox_keep
    progress.step("", 1)
    progress.finish()
    sec.rows = [got[k] for k in names if k in got]
    sec.method = (
        f"Each child blocks for {seconds:g} s waiting for a write that never comes (all children "
        "at once). **CPU % = process CPU time / wall time x 100** (100% = one core); wake-ups/s "
        "= voluntary context switches / s."
    )
    sec.tables.append(md_table(("implementation", "CPU % of a core", "CPU ms", "wake-ups/s"),
                               [(r["impl"], f"{r['cpu_pct']:.3f}%", f"{1e3 * r['cpu_s']:.1f}",
                                 f"{r['wakeups_per_s']:.0f}") for r in sec.rows], right=(1, 2, 3)))
    sec.notes += [py_note, iox_note]
    t = got.get(TS)
    if t:
        measured = f"{t['cpu_pct']:.3f}% ({1e3 * t['cpu_s']:.1f} ms CPU in {t['wall_s']:.1f} s)"
        sec.targets.append(Target("idle blocked reader", "< 1% of a core", measured, t["cpu_pct"] < 1.0))
    return sec


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--only", "idle", *sys.argv[1:]]))
