"""``python -m bench``: the benchmark suite, torch_shmem next to its peers in one run.

Sections (``--only`` / ``--skip`` take these keys):

  io        write+read round trip vs frame size, Hz and GB/s (CPU; GPU streams with CUDA)
  mvm       matrix-vector pipelines with the matrix kept in a stream, Hz and GFLOP/s
  pingpong  cross-process request/ack latency (p50/p95/p99/max) and round trips/s
  fanout    one writer, N readers: per-reader rate and missed frames
  idle      CPU time burnt by a reader blocked in read_new
  paced     CPU time of a reader in a read_new loop against a writer at 1 kHz (64 KiB)
  fileno    wake-up latency of one selector thread watching 1,000 streams' fileno()
  import    added import time of torch_shmem for a NumPy-only process
  ring      rings (create(ring=N)): 4 readers under policy block at 10 kHz (lost, duplicated,
            latency p50/p99), overwrite with a SIGSTOPped reader (writer rate, missed)
  bridge    a stream over ZeroMQ on loopback vs plain pyzmq PUB/SUB: MB/s, p50/p99 latency
            (needs pyzmq; skipped with a note without it)

Modes: default (full, about 5 minutes on 2 cores), ``--quick`` (about a minute),
``--smoke`` (seconds; checks the suite runs, numbers meaningless), ``--big`` (adds
10000x10000 frames and matrices). The Markdown report goes to stdout (and ``--report``),
raw results with machine info to ``--json``, PNG plots to ``--plots DIR`` (needs
matplotlib: ``pip install -e .[bench]``).

CPU sections never import torch; the GPU parts (with CUDA only) import it after the CPU
sections have run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

from . import (
    bench_bridge,
    bench_fanout,
    bench_fileno,
    bench_idle,
    bench_import,
    bench_io,
    bench_mvm,
    bench_paced,
    bench_pingpong,
    bench_ring,
)
from .common import (
    DURATION,
    GPU_DRY_RUN,
    QUICK_DURATION,
    QUICK_REPEATS,
    REPEATS,
    SMOKE_DURATION,
    SMOKE_REPEATS,
    Config,
    Progress,
    Section,
    cpu_times,
    cuda_present,
    iceoryx2_cleanup,
    load_average,
    machine_info,
    md_table,
)

SECTIONS = {
    "io": bench_io,
    "mvm": bench_mvm,
    "pingpong": bench_pingpong,
    "fanout": bench_fanout,
    "idle": bench_idle,
    "paced": bench_paced,
    "fileno": bench_fileno,
    "import": bench_import,
    "ring": bench_ring,
    "bridge": bench_bridge,
}
GPU_SECTIONS = ("io", "mvm", "pingpong")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="torch_shmem benchmark suite: torch_shmem vs raw shared memory, pyshmem "
                    "and iceoryx2 in one run; a Markdown report on stdout.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="short runs (about a minute in all)")
    mode.add_argument("--smoke", action="store_true",
                      help="tiny sizes and durations: checks that everything runs (seconds)")
    p.add_argument("--big", action="store_true", help="also 10000x10000 frames and matrices")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), metavar="SECTION",
                   help=f"run only these sections ({', '.join(SECTIONS)})")
    p.add_argument("--skip", nargs="+", choices=list(SECTIONS), metavar="SECTION", default=[],
                   help="skip these sections")
    p.add_argument("--json", metavar="PATH", help="save machine info and every measurement")
    p.add_argument("--report", metavar="PATH", help="also write the Markdown report to PATH")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots to DIR (needs matplotlib)")
    p.add_argument("--duration", type=float, default=None,
                   help="minimum seconds per repeat per implementation "
                        f"(default {DURATION}; {QUICK_DURATION} with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"interleaved repeats, the best is kept (default {REPEATS})")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="IO frame sizes (n for n x n)")
    p.add_argument("--no-pyshmem", action="store_true", help="leave pyshmem out")
    p.add_argument("--no-iceoryx2", action="store_true", help="leave iceoryx2 out")
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--no-gpu", action="store_true", help="skip the GPU parts even with CUDA")
    gpu.add_argument("--gpu", action="store_true",
                     help="run only the GPU parts (io, mvm, pingpong); fails without CUDA")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Config:
    """The :class:`Config` for the parsed options."""
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    cfg = Config(mode=mode, big=args.big, sizes=args.sizes,
                 use_pyshmem=not args.no_pyshmem, use_iceoryx2=not args.no_iceoryx2,
                 gpu="off" if args.no_gpu else "only" if args.gpu else "auto")
    cfg.duration = args.duration if args.duration is not None else cfg.pick(
        DURATION, QUICK_DURATION, SMOKE_DURATION)
    cfg.repeats = args.repeats if args.repeats is not None else cfg.pick(
        REPEATS, QUICK_REPEATS, SMOKE_REPEATS)
    return cfg


def targets_table(sections: list[Section]) -> str:
    """Every design target of the run: requirement, measurement, met or not."""
    rows = []
    for sec in sections:
        for t in sec.targets:
            met = "n/a" if t.met is None else "**yes**" if t.met else "**NO**"
            rows.append((t.name, t.requirement, t.measured, met))
    if not rows:
        return ""
    return md_table(("target (design.md section 8)", "requirement", "this run", "met?"), rows)


def render_report(sections: list[Section], info: dict, command: str, started: datetime.datetime,
                  seconds: float, loads: tuple[str, str]) -> str:
    """The whole Markdown report."""
    parts = [
        f"# torch_shmem benchmark report ({started:%Y-%m-%d %H:%M %Z})",
        f"Command: `{command}` (run time {seconds:.0f} s)",
        "Machine:\n\n" + md_table(("", ""), [(k, v) for k, v in info.items()]),
        f"Load average (1/5/15 min) at start: {loads[0]}; at end: {loads[1]}.",
    ]
    if GPU_DRY_RUN:
        parts.append("**GPU DRY RUN** (`BENCH_GPU_DRY_RUN=1`): the GPU code paths ran on CPU "
                     "tensors; their numbers are meaningless.")
    targets = targets_table(sections)
    if targets:
        parts.append("## Targets\n\n" + targets)
    parts += [sec.markdown() for sec in sections]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the selected sections, print the report, save JSON/plots when asked."""
    args = parse_args(argv)
    cfg = build_config(args)
    if cfg.gpu == "only" and not (cuda_present() or GPU_DRY_RUN):
        print("python -m bench --gpu: no NVIDIA device on this machine (no /dev/nvidiactl); "
              "nothing to run", file=sys.stderr)
        return 2
    keys = args.only or list(SECTIONS)
    keys = [k for k in keys if k not in args.skip]
    if cfg.gpu == "only":
        keys = [k for k in keys if k in GPU_SECTIONS]
    command = "python -m bench" + ("" if not sys.argv[1:] and argv is None else
                                   " " + " ".join(argv if argv is not None else sys.argv[1:]))
    started = datetime.datetime.now().astimezone()
    load_start = load_average()
    if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1) and not cfg.smoke:
        print(f"[bench] warning: the machine is busy (load {load_start}); numbers will be noisy",
              file=sys.stderr)
    progress = Progress(enabled=not args.no_progress)
    t0 = time.monotonic()
    sections: list[Section] = []
    try:
        for key in keys:
            s0, l0, c0 = time.monotonic(), os.getloadavg()[0], cpu_times()
            sec = SECTIONS[key].run(cfg, progress)
            c1 = cpu_times()
            sec.seconds = time.monotonic() - s0
            sec.load = (l0, os.getloadavg()[0])
            sec.foreign_cpu = max(0.0, (c1[0] - c0[0]) - (c1[1] - c0[1]))
            sec.steal = c1[2] - c0[2]
            sections.append(sec)
    finally:
        iceoryx2_cleanup()  # the files iceoryx2 leaves behind (this run's only)
    seconds = time.monotonic() - t0
    info = machine_info()
    loads = (load_start, load_average())
    report = render_report(sections, info, command, started, seconds, loads)
    if args.plots:
        from . import plots

        for note in plots.write_plots(sections, args.plots):
            print(f"[bench] {note}", file=sys.stderr)
    print(report)
    for path in (args.report, args.json):
        if path and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
    if args.report:
        with open(args.report, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "started": started.isoformat(),
                "command": command,
                "seconds": round(seconds, 1),
                "config": vars(cfg) | {"sections": keys},
                "machine": info,
                "load_average": {"start": loads[0], "end": loads[1]},
                "sections": {sec.key: sec.to_json() for sec in sections},
            }, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
