"""In-process write+read round-trip benchmark: torch_shmem vs raw shared memory vs pyshmem.

One iteration writes a float32 square frame into a shared-memory segment and
reads it back into process-private memory. Bytes per iteration are
``2 * payload`` (one copy in, one copy out), reported in decimal GB/s.

Implementations, measured side by side in the same run:

* ``memcpy``: ``np.copyto`` between two private arrays, twice (the copy limit).
* ``raw``: ``multiprocessing.shared_memory`` + ``np.copyto`` in and out of a
  preallocated array, no synchronisation (lower bound for ``read(out=)``).
* ``raw_alloc``: the same, reading with ``view.copy()`` (baseline for ``read()``).
* ``torch_shmem read()`` / ``torch_shmem read(out=)``.
* ``pyshmem read()`` / ``pyshmem read(out=)`` when pyshmem is importable.

Timing: each implementation is warmed up, then run in batches for at least
``--duration`` seconds per repeat; the repeats of all implementations are
interleaved and the best of ``--repeats`` (default 3) is reported.

Run with ``python -m bench`` (``--quick``, ``--big``, ``--json PATH``).
Importing this module never imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from multiprocessing import shared_memory
from typing import Callable, Iterator

import numpy as np

import torch_shmem as ts

SIZES = (100, 128, 1000, 4000)
BIG_SIZE = 10000
DTYPE = np.float32
REPEATS = 3
DURATION = 1.0
QUICK_DURATION = 0.3
BATCH_SECONDS = 0.01
WARMUP_SECONDS = 0.1

RAW, RAW_ALLOC, MEMCPY = "raw", "raw_alloc", "memcpy"
TS_READ, TS_OUT = "torch_shmem read()", "torch_shmem read(out=)"
PY_READ, PY_OUT = "pyshmem read()", "pyshmem read(out=)"
# torch_shmem variant -> (like-for-like raw baseline, like-for-like pyshmem variant)
BASELINES = {TS_READ: (RAW_ALLOC, PY_READ), TS_OUT: (RAW, PY_OUT)}

Step = Callable[[], np.ndarray]


# ---------------------------------------------------------------- implementations
@contextlib.contextmanager
def memcpy_impl(frame: np.ndarray) -> Iterator[Step]:
    """Two private copies per iteration: the memory-bandwidth ceiling."""
    mid, out = np.empty_like(frame), np.empty_like(frame)

    def step() -> np.ndarray:
        np.copyto(mid, frame)
        np.copyto(out, mid)
        return out

    yield step


@contextlib.contextmanager
def raw_impl(frame: np.ndarray, alloc: bool) -> Iterator[Step]:
    """Unsynchronised copy through a ``multiprocessing.shared_memory`` segment."""
    shm = shared_memory.SharedMemory(create=True, size=max(frame.nbytes, 1))
    view = np.ndarray(frame.shape, frame.dtype, buffer=shm.buf)
    out = np.empty_like(frame)

    def step_out() -> np.ndarray:
        np.copyto(view, frame)
        np.copyto(out, view)
        return out

    def step_alloc() -> np.ndarray:
        np.copyto(view, frame)
        return view.copy()

    try:
        yield step_alloc if alloc else step_out
    finally:
        del view  # drop the buffer export (clears the closures' cell) before close()
        shm.close()
        shm.unlink()  # also unregisters it from the resource tracker


@contextlib.contextmanager
def stream_impl(module, name: str, frame: np.ndarray, use_out: bool) -> Iterator[Step]:
    """write()+read() on a stream of ``module`` (torch_shmem or pyshmem)."""
    _quiet_unlink(module, name)
    stream = module.create(name, shape=frame.shape, dtype=frame.dtype)
    out = np.empty_like(frame)

    def step_out() -> np.ndarray:
        stream.write(frame)
        stream.read(out=out)
        return out

    def step_alloc() -> np.ndarray:
        stream.write(frame)
        return stream.read()

    try:
        yield step_out if use_out else step_alloc
    finally:
        stream.unlink()


def _quiet_unlink(module, name: str) -> None:
    """Remove a leftover stream ``name``; ignore a missing one."""
    try:
        module.unlink(name)
    except FileNotFoundError:
        pass


def load_pyshmem():
    """Return ``(pyshmem module or None, note)``."""
    try:
        import pyshmem
    except Exception as exc:  # ImportError, or a broken install
        return None, f"pyshmem skipped: import failed ({type(exc).__name__}: {exc})"
    version = getattr(pyshmem, "__version__", "unknown")
    return pyshmem, f"pyshmem {version}"


def implementations(frame: np.ndarray, pyshmem) -> dict[str, contextlib.AbstractContextManager]:
    """The context managers (yielding step functions) to compare for ``frame``."""
    tag = f"bench_io_{os.getpid()}_{frame.shape[0]}"
    impls = {
        MEMCPY: memcpy_impl(frame),
        RAW: raw_impl(frame, alloc=False),
        RAW_ALLOC: raw_impl(frame, alloc=True),
        TS_OUT: stream_impl(ts, f"{tag}_ts_out", frame, use_out=True),
        TS_READ: stream_impl(ts, f"{tag}_ts_read", frame, use_out=False),
    }
    if pyshmem is not None:
        impls[PY_OUT] = stream_impl(pyshmem, f"{tag}_py_out", frame, use_out=True)
        impls[PY_READ] = stream_impl(pyshmem, f"{tag}_py_read", frame, use_out=False)
    return impls


# ---------------------------------------------------------------- timing
def calibrate(step: Step) -> int:
    """Warm ``step`` up and return a batch size taking about BATCH_SECONDS."""
    iters, start = 0, time.perf_counter()
    while True:
        step()
        iters += 1
        elapsed = time.perf_counter() - start
        if elapsed >= WARMUP_SECONDS and iters >= 3:
            return max(1, int(iters * BATCH_SECONDS / elapsed))


def run_for(step: Step, batch: int, duration: float) -> float:
    """Run ``step`` in batches for at least ``duration`` seconds; return iterations/s."""
    iters, start = 0, time.perf_counter()
    while True:
        for _ in range(batch):
            step()
        iters += batch
        elapsed = time.perf_counter() - start
        if elapsed >= duration:
            return iters / elapsed


def bench_size(n: int, pyshmem, duration: float, repeats: int) -> list[dict]:
    """Measure every implementation on an ``n`` x ``n`` frame; return result rows."""
    frame = np.random.default_rng(n).standard_normal((n, n), dtype=DTYPE)
    with contextlib.ExitStack() as stack:
        steps = {
            label: stack.enter_context(impl)
            for label, impl in implementations(frame, pyshmem).items()
        }
        for label, step in steps.items():
            if not np.array_equal(step(), frame):
                raise AssertionError(f"{label}: round trip returned wrong data at {n}x{n}")
        batches = {label: calibrate(step) for label, step in steps.items()}
        rates: dict[str, list[float]] = {label: [] for label in steps}
        for _ in range(repeats):
            for label, step in steps.items():
                rates[label].append(run_for(step, batches[label], duration))
    bytes_per_iter = 2 * frame.nbytes
    return [
        {
            "n": n,
            "impl": label,
            "payload_bytes": frame.nbytes,
            "bytes_per_iter": bytes_per_iter,
            "batch": batches[label],
            "hz_repeats": hz,
            "hz": max(hz),
            "gbps": max(hz) * bytes_per_iter / 1e9,
        }
        for label, hz in rates.items()
    ]


# ---------------------------------------------------------------- report
def git_revision() -> str:
    """HEAD commit of the package source, ``-dirty`` when csrc/ or torch_shmem/ has local edits."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(ts.__file__)))

    def git(*cmd: str) -> str:
        done = subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "csrc", "torch_shmem")
        return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict:
    """CPU, memory and software versions of this host (torch only if already imported)."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    mem_gib = None
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:"))
        mem_gib = round(kib / 2**20, 1)
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "mem_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch_shmem": ts.__version__,
        "git": git_revision(),
        "core_built": datetime.datetime.fromtimestamp(
            os.path.getmtime(ts._core.__file__)).astimezone().isoformat(timespec="seconds"),
        "torch_imported": "torch" in sys.modules,
    }
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__
    return info


def add_ratios(rows: list[dict]) -> None:
    """Add ``vs_raw`` and ``vs_pyshmem`` (Hz ratios) to the torch_shmem rows."""
    hz = {(r["n"], r["impl"]): r["hz"] for r in rows}
    for r in rows:
        if r["impl"] in BASELINES:
            raw, py = BASELINES[r["impl"]]
            r["vs_raw"] = r["hz"] / hz[(r["n"], raw)]
            r["vs_pyshmem"] = r["hz"] / hz[(r["n"], py)] if (r["n"], py) in hz else None


def _fmt_hz(hz: float) -> str:
    """Iterations per second with sensible precision."""
    return f"{hz:,.0f}" if hz >= 1000 else f"{hz:.1f}"


def markdown_table(rows: list[dict]) -> str:
    """Render the result rows as a Markdown table."""

    def ratio(row: dict, key: str, base: str | None) -> str:
        if base is None:
            return ""
        value = row.get(key)
        return "n/a" if value is None else f"{value:.2f}x ({base})"

    lines = [
        "| frame | payload | implementation | Hz | GB/s | vs raw baseline | vs pyshmem |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        raw_base, py_base = BASELINES.get(r["impl"], (None, None))
        lines.append(
            f"| {r['n']}x{r['n']} | {r['payload_bytes'] / 1e6:.3g} MB | {r['impl']} "
            f"| {_fmt_hz(r['hz'])} | {r['gbps']:.2f} "
            f"| {ratio(r, 'vs_raw', raw_base)} | {ratio(r, 'vs_pyshmem', py_base)} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_DURATION} s per repeat instead of {DURATION} s")
    p.add_argument("--duration", type=float, default=None,
                   help="minimum seconds per repeat per implementation")
    p.add_argument("--repeats", type=int, default=REPEATS, help="repeats; the best is kept")
    p.add_argument("--big", action="store_true", help=f"also {BIG_SIZE}x{BIG_SIZE}")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="override frame sizes")
    p.add_argument("--no-pyshmem", action="store_true", help="skip pyshmem")
    p.add_argument("--json", metavar="PATH", help="save machine info and raw results")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = QUICK_DURATION if args.quick else DURATION
    if args.sizes is None:
        args.sizes = list(SIZES) + ([BIG_SIZE] if args.big else [])
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the report, optionally save JSON."""
    args = parse_args(argv)
    if args.no_pyshmem:
        pyshmem, py_note = None, "pyshmem skipped: --no-pyshmem"
    else:
        pyshmem, py_note = load_pyshmem()
    started = datetime.datetime.now().astimezone()
    rows: list[dict] = []
    for n in args.sizes:
        rows += bench_size(n, pyshmem, args.duration, args.repeats)
        print(f"done {n}x{n}", file=sys.stderr, flush=True)
    add_ratios(rows)
    info = machine_info()
    print(f"# torch_shmem write+read round trip ({started:%Y-%m-%d %H:%M %Z})\n")
    print("Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"Reference: {py_note}")
    print(f"Timing: warm-up >= {WARMUP_SECONDS} s, batches of ~{BATCH_SECONDS * 1e3:.0f} ms "
          f"for >= {args.duration} s per repeat, best of {args.repeats} interleaved repeats; "
          "bytes/iter = 2 x payload, GB = 1e9 B; ratios are Hz ratios to the "
          "like-for-like baseline.\n")
    print(markdown_table(rows))
    if "torch" in sys.modules:
        print("\nWARNING: torch was imported during the benchmark", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"started": started.isoformat(), "argv": sys.argv, "machine": info,
                       "pyshmem": py_note, "duration": args.duration, "repeats": args.repeats,
                       "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
