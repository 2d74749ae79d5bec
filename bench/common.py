"""Shared pieces of the benchmark suite: configuration, timing, peers, machine info, report.

Every ``bench_<topic>.py`` module exposes ``TITLE`` and ``run(cfg, progress) -> Section``;
``bench/__main__.py`` runs them in order and renders one Markdown report (and JSON).

Conventions used by every section:

- rates are iterations per second (Hz) measured over at least ``cfg.duration`` seconds per
  repeat, after a warm-up, in batches of about ``BATCH_SECONDS``;
- repeats of all implementations of one configuration are **interleaved** (round robin), so
  slow drift of the host hits every column alike, and the **best** repeat is reported;
- decimal units: GB = 1e9 B, GFLOP = 1e9 flop;
- a torch_shmem figure is also given as a ratio to its like-for-like raw baseline and to the
  like-for-like pyshmem call (Hz ratios, so equal to GB/s and GFLOP/s ratios).

Importing this module never imports torch (the CPU sections must not pay for it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import uuid
from typing import Any, Callable, Iterable, Sequence

import numpy as np

import torch_shmem as ts
from torch_shmem._labels import fmt_bytes  # binary sizes: 64 KiB, 1 MiB, 100 B

BATCH_SECONDS = 0.01
WARMUP_SECONDS = 0.1
DURATION = 1.0
QUICK_DURATION = 0.15
SMOKE_DURATION = 0.01
REPEATS = 3
QUICK_REPEATS = 3
SMOKE_REPEATS = 1
JOIN_TIMEOUT = 60.0

Step = Callable[[], Any]


# ---------------------------------------------------------------- configuration
@dataclasses.dataclass
class Config:
    """What to run and for how long (built by ``bench/__main__.py`` from the command line)."""

    mode: str = "full"  # "full", "quick" or "smoke"
    big: bool = False
    duration: float = DURATION
    repeats: int = REPEATS
    sizes: list[int] | None = None  # IO frame sizes override
    use_pyshmem: bool = True
    use_iceoryx2: bool = True
    gpu: str = "auto"  # "auto": GPU parts when CUDA is present; "off"; "only"

    @property
    def quick(self) -> bool:
        return self.mode == "quick"

    @property
    def smoke(self) -> bool:
        return self.mode == "smoke"

    def pick(self, full: Any, quick: Any, smoke: Any) -> Any:
        """The value for the current mode."""
        return {"full": full, "quick": quick, "smoke": smoke}[self.mode]


# ---------------------------------------------------------------- results
@dataclasses.dataclass
class Target:
    """One design target (../shared/design.md section 8) and whether this run met it."""

    name: str
    requirement: str
    measured: str
    met: bool | None  # None: not measured in this run


@dataclasses.dataclass
class Section:
    """The outcome of one benchmark module: Markdown for the report, rows for JSON."""

    key: str
    title: str
    method: str = ""  # Markdown paragraph(s): what one iteration is, formulas
    tables: list[str] = dataclasses.field(default_factory=list)  # Markdown tables (with captions)
    notes: list[str] = dataclasses.field(default_factory=list)  # skips, caveats, observations
    rows: list[dict] = dataclasses.field(default_factory=list)  # every measured row, for JSON
    targets: list[Target] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)  # data for plots (e.g. latency CDFs)
    seconds: float = 0.0
    load: tuple[float, float] | None = None  # 1-minute load average before and after
    foreign_cpu: float | None = None  # CPU seconds used by other processes during the section
    steal: float | None = None  # CPU seconds stolen by the hypervisor during the section

    def markdown(self) -> str:
        parts = [f"## {self.title}"]
        if self.method:
            parts.append(self.method.strip())
        parts += self.tables
        notes = list(self.notes)
        if self.foreign_cpu is not None and self.seconds > 0:
            cores = len(os.sched_getaffinity(0))
            share = self.foreign_cpu / (self.seconds * cores)
            disturbed = share > 0.05 and self.foreign_cpu > 0.5
            flag = " **(disturbed: rerun for clean numbers)**" if disturbed else ""
            notes.append(f"ran {self.seconds:.0f} s; other processes used {self.foreign_cpu:.1f} "
                         f"CPU-s meanwhile ({share:.0%} of the machine){flag}; hypervisor steal "
                         f"{self.steal:.1f} s")
        if notes:
            parts.append("\n".join(f"- {n}" for n in notes))
        return "\n\n".join(parts)

    def to_json(self) -> dict:
        return {
            "title": self.title,
            "seconds": round(self.seconds, 2),
            "load_average_1min": self.load,
            "foreign_cpu_s": self.foreign_cpu,
            "steal_s": self.steal,
            "notes": self.notes,
            "rows": self.rows,
            "targets": [dataclasses.asdict(t) for t in self.targets],
            "extra": self.extra,
        }


# ---------------------------------------------------------------- progress
class Progress:
    """A one-line progress bar on stderr (a line per section when stderr is not a terminal)."""

    WIDTH = 28

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.section = ""
        self.total = 1
        self.done = 0
        self.started = time.monotonic()

    def start(self, section: str, total: int) -> None:
        """Begin a section of ``total`` steps."""
        self.section, self.total, self.done = section, max(1, total), 0
        self.started = time.monotonic()
        if self.enabled and not self.tty:
            print(f"[bench] {section}: {total} steps", file=sys.stderr, flush=True)
        self._draw("")

    def step(self, label: str = "", n: int = 1) -> None:
        """Mark ``n`` steps done; ``label`` says what ran."""
        self.done = min(self.total, self.done + n)
        self._draw(label)

    def finish(self) -> None:
        """End the section line."""
        if self.tty:
            elapsed = time.monotonic() - self.started
            sys.stderr.write(f"\r\033[K[bench] {self.section}: done in {elapsed:.1f} s\n")
            sys.stderr.flush()
        elif self.enabled:
            print(f"[bench] {self.section}: done in {time.monotonic() - self.started:.1f} s",
                  file=sys.stderr, flush=True)

    def _draw(self, label: str) -> None:
        if not self.tty:
            return
        filled = int(self.WIDTH * self.done / self.total)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        elapsed = time.monotonic() - self.started
        line = f"[bench] {self.section} [{bar}] {self.done}/{self.total} {elapsed:5.1f}s {label}"
        width = shutil.get_terminal_size((100, 20)).columns
        sys.stderr.write("\r\033[K" + line[: width - 1])
        sys.stderr.flush()


# ---------------------------------------------------------------- timing
def calibrate(step: Step, sync: Callable[[], None] | None = None,
              warmup: float = WARMUP_SECONDS) -> int:
    """Warm ``step`` up for ``warmup`` seconds; return a batch size taking about BATCH_SECONDS."""
    iters, start = 0, time.perf_counter()
    while True:
        step()
        iters += 1
        if sync is not None:
            sync()
        elapsed = time.perf_counter() - start
        if elapsed >= warmup and iters >= 3:
            return max(1, int(iters * BATCH_SECONDS / elapsed))


def run_for(step: Step, batch: int, duration: float, sync: Callable[[], None] | None = None) -> float:
    """Run ``step`` in batches for at least ``duration`` seconds; return iterations/s.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs after every batch, so asynchronous work
    is inside the timed interval.
    """
    iters, start = 0, time.perf_counter()
    while True:
        for _ in range(batch):
            step()
        if sync is not None:
            sync()
        iters += batch
        elapsed = time.perf_counter() - start
        if elapsed >= duration:
            return iters / elapsed


def measure_interleaved(
    steps: dict[str, Step],
    cfg: Config,
    progress: Progress | None = None,
    label: str = "",
    sync: Callable[[], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Rates (Hz) of every step over ``cfg.repeats`` interleaved repeats, and the batch sizes."""
    warmup = min(WARMUP_SECONDS, max(cfg.duration, 0.005))
    batches = {}
    for name, step in steps.items():
        batches[name] = calibrate(step, sync, warmup)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(cfg.repeats):
        for name, step in steps.items():
            rates[name].append(run_for(step, batches[name], cfg.duration, sync))
            if progress is not None:
                progress.step(f"{label} {name}")
    return rates, batches


def percentiles(samples_ns: Sequence[int] | np.ndarray) -> dict[str, float]:
    """p50/p95/p99/max/mean of latencies given in ns, returned in microseconds."""
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    if a.size == 0:
        return {k: float("nan") for k in ("p50", "p95", "p99", "max", "mean")}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99),
            "max": float(a.max()), "mean": float(a.mean())}


def cdf_points(samples_ns: Sequence[int] | np.ndarray, points: int = 400) -> list[float]:
    """``points`` evenly spaced quantiles (µs) of the latencies, for a CDF plot."""
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    if a.size == 0:
        return []
    return [round(float(v), 3) for v in np.quantile(a, np.linspace(0.0, 1.0, points))]


# ---------------------------------------------------------------- peers
def load_pyshmem(cfg: Config) -> tuple[Any, str]:
    """``(pyshmem module or None, note)``."""
    if not cfg.use_pyshmem:
        return None, "pyshmem skipped: --no-pyshmem"
    try:
        import pyshmem
    except Exception as exc:  # ImportError, or a broken install
        return None, (f"pyshmem skipped: it does not import ({type(exc).__name__}: {exc}); "
                      "`pip install pyshmem` to compare")
    return pyshmem, f"pyshmem {getattr(pyshmem, '__version__', 'unknown')}"


def load_iceoryx2(cfg: Config) -> tuple[Any, str]:
    """``(iceoryx2 module or None, note)``; the module's log level is set to warnings."""
    if not cfg.use_iceoryx2:
        return None, "iceoryx2 skipped: --no-iceoryx2"
    try:
        import iceoryx2
    except Exception as exc:
        return None, (f"iceoryx2 skipped: it does not import ({type(exc).__name__}: {exc}); "
                      "`pip install iceoryx2` to compare")
    iceoryx2.set_log_level_from_env_or(iceoryx2.LogLevel.Error)
    return iceoryx2, f"iceoryx2 {_dist_version('iceoryx2')}"


# iceoryx2 keeps its files under a root directory (/tmp/iceoryx2/ by default)
# and in /dev/shm as iox2_*, and some of them (a node's global management
# segment, the root directories) outlive the nodes. The benchmarks give
# iceoryx2 a prefix and a root of their own, passed to child processes
# through this variable, so that iceoryx2_cleanup() removes exactly what the
# run created.
IOX_ENV = "TORCH_SHMEM_BENCH_IOX2"


def _iox_tag() -> str:
    tag = os.environ.get(IOX_ENV)
    if not tag:
        tag = f"{os.getpid()}{uuid.uuid4().hex[:4]}"
        os.environ[IOX_ENV] = tag  # inherited by the spawned children
    return tag


def _iox_paths() -> tuple[str, str]:
    """(file prefix in /dev/shm, root directory) of this run's iceoryx2 files.

    Short: iceoryx2's event listeners are UNIX sockets named root + prefix + a
    40-digit hash + suffix, within the 107 characters a socket path may have.
    """
    tag = _iox_tag()
    if len(tag) > 14 or not tag.isalnum():
        raise ValueError(f"{IOX_ENV}={tag!r}: expected at most 14 letters or digits")
    return f"iox2b{tag}_", f"/tmp/iox2b{tag}"


def iox_node(iox: Any) -> Any:
    """A fresh iceoryx2 IPC node for this process, on this run's own prefix and root.

    The log level is set first (errors only; ``IOX2_LOG_LEVEL`` overrides) and the
    configuration is given explicitly, so iceoryx2 neither looks for a config file nor
    prints that it found none.
    """
    iox.set_log_level_from_env_or(iox.LogLevel.Error)
    prefix, root = _iox_paths()
    config = iox.config.default()
    config.global_cfg.prefix = iox.FileName.new(prefix)
    config.global_cfg.root_path = iox.Path.new(root + "/")
    return iox.NodeBuilder.new().config(config).create(iox.ServiceType.Ipc)


def iceoryx2_cleanup() -> list[str]:
    """Remove the iceoryx2 files of this run (its prefix in /dev/shm, its root); return them."""
    tag = os.environ.get(IOX_ENV)
    if not tag:
        return []
    prefix, root = _iox_paths()
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.listdir("/dev/shm"):
            if entry.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join("/dev/shm", entry))
                    removed.append(os.path.join("/dev/shm", entry))
    if os.path.isdir(root):
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
    return removed


PAGE = 4096
# Page offset of every private buffer the benchmarks copy to or from. Shared
# payloads start at page offset 0 (torch_shmem, pyshmem, raw segments) or 64
# (the raw ping-pong payload); half a page away from both, no copy runs
# between buffers whose addresses differ by a small amount modulo 4 KiB.
PRIVATE_OFFSET = 2048


def private_empty(shape: Any, dtype: Any, offset: int = PRIVATE_OFFSET) -> np.ndarray:
    """An uninitialised private array starting ``offset`` bytes past a page boundary.

    Where ``np.empty`` puts an array depends on the allocator's state, and a copy
    between two buffers whose addresses differ by a few bytes modulo 4 KiB runs
    up to 12x slower on the AMD EPYC hosts used here (loads falsely aliasing
    earlier stores; two 64 KiB arrays allocated back to back sit 64 KiB + 16 B
    apart). NumPy's copy loops are exposed to it, glibc's memcpy avoids it, so an
    unlucky allocation made a baseline erratic from run to run. Fixed offsets make
    every implementation copy between the same relative alignments.
    """
    dtype = np.dtype(dtype)
    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (int(shape),)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + 2 * PAGE, np.uint8)
    start = (-buf.ctypes.data) % PAGE + offset
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def private_copy(a: np.ndarray, offset: int = PRIVATE_OFFSET) -> np.ndarray:
    """``a`` copied into a :func:`private_empty` array."""
    out = private_empty(a.shape, a.dtype, offset)
    np.copyto(out, a)
    return out


def unique_name(tag: str) -> str:
    """A stream/service name unique to this process and call."""
    return f"bench_{tag}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


def quiet_unlink(module: Any, name: str) -> None:
    """Unlink stream ``name`` of ``module`` (torch_shmem or pyshmem); ignore a missing one."""
    with contextlib.suppress(FileNotFoundError):
        module.unlink(name)


def read_after(stream: Any, after: int, out: np.ndarray, timeout: float | None) -> np.ndarray:
    """Level-triggered wait-then-read: ``read_after`` when the stream has it, else
    ``wait_for_count`` + ``read`` (both torch_shmem and pyshmem 1.4 have ``read_after``)."""
    if hasattr(stream, "read_after"):
        return stream.read_after(after, out=out, timeout=timeout)
    stream.wait_for_count(after=after, timeout=timeout)
    return stream.read(out=out)


# ---------------------------------------------------------------- processes
def spawn_context():
    """The ``spawn`` multiprocessing context (no fork of a process holding locks and mappings)."""
    import multiprocessing

    return multiprocessing.get_context("spawn")


def join_all(procs: Iterable[Any], timeout: float = JOIN_TIMEOUT) -> list[int | None]:
    """Join ``procs`` within ``timeout`` seconds in total; kill stragglers; return exit codes."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5.0)
        codes.append(p.exitcode)
    return codes


# ---------------------------------------------------------------- machine
def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    model, family, mdl = "unknown", None, None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and model == "unknown":
                model = value
            elif key == "cpu family" and family is None:
                family = value
            elif key == "model" and mdl is None:
                mdl = value
            elif not line.strip() and model != "unknown":
                break
    if family is not None:
        model += f" (family {family}, model {mdl})"
    return model


def _gpu_info() -> str:
    """GPU name, memory and driver from nvidia-smi (no torch import); 'none' when absent."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "none (no nvidia-smi)"
    try:
        done = subprocess.run(
            [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"none (nvidia-smi failed: {type(exc).__name__})"
    gpus = []
    for line in done.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 3:
            name, memory, driver = fields
            gpus.append(f"{name} ({memory}), driver {driver}")
    return "; ".join(gpus) or "none (nvidia-smi lists no GPU)"


def cuda_present() -> bool:
    """Whether an NVIDIA device node exists (checked without importing torch)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


# BENCH_GPU_DRY_RUN=1 runs the GPU code paths on CPU tensors (numbers meaningless): a check
# that they execute, for machines without a GPU. Rows that need CUDA-only features (GPU
# streams, pyshmem GPU streams) are skipped as they would be without CUDA.
GPU_DRY_RUN = os.environ.get("BENCH_GPU_DRY_RUN") == "1"
GPU_DEVICE = "cpu" if GPU_DRY_RUN else "cuda:0"


def gpu_torch(cfg: Config) -> tuple[Any, str | None]:
    """``(torch, None)`` when the GPU parts can run, else ``(None, reason)``; imports torch."""
    if cfg.gpu == "off":
        return None, "--no-gpu"
    if not GPU_DRY_RUN and not cuda_present():
        return None, "no NVIDIA device on this machine"
    try:
        import torch
    except Exception as exc:
        return None, f"torch does not import ({type(exc).__name__}: {exc})"
    if not GPU_DRY_RUN and not torch.cuda.is_available():
        return None, "torch.cuda.is_available() is False"
    return torch, None


def gpu_sync(torch: Any) -> Callable[[], None]:
    """``torch.cuda.synchronize`` (a no-op in a dry run)."""
    return (lambda: None) if GPU_DRY_RUN else torch.cuda.synchronize


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


def load_average() -> str:
    """The 1/5/15-minute load averages, e.g. ``0.12 0.30 0.41``."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def cpu_times() -> tuple[float, float, float]:
    """(busy CPU s of the whole machine, CPU s of this process and its reaped children, steal s).

    The difference of two samples, busy minus own, is the CPU that *other* processes used
    in between: the benchmark's check that nobody else was running.
    """
    busy = steal = 0.0
    with contextlib.suppress(OSError), open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / hz
        steal = fields[7] / hz if len(fields) > 7 else 0.0
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        own += ru.ru_utime + ru.ru_stime
    return busy, own, steal


def machine_info() -> dict:
    """CPU, memory, OS and software versions; torch/GPU details only if torch is already imported."""
    mem_gib = None
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo") as f:
        kib = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal:"))
        mem_gib = round(kib / 2**20, 1)
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "mem_gib": mem_gib,
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": _dist_version("torch") or "not installed",
        "gpu": _gpu_info(),
        "torch_shmem": ts.__version__,
        "git": git_revision(),
        "core_built": datetime.datetime.fromtimestamp(
            os.path.getmtime(ts._core.__file__)).astimezone().isoformat(timespec="seconds"),
        "pyshmem": _dist_version("pyshmem") or "not installed",
        "iceoryx2": _dist_version("iceoryx2") or "not installed",
        "matplotlib": _dist_version("matplotlib") or "not installed",
        "torch_imported": "torch" in sys.modules,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_cuda"] = getattr(torch.version, "cuda", None)
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def has_module(name: str) -> bool:
    """Whether ``name`` is importable (without importing it)."""
    return importlib.util.find_spec(name) is not None


# ---------------------------------------------------------------- Markdown
def fmt_hz(hz: float) -> str:
    """Iterations per second with sensible precision."""
    if hz != hz:  # NaN
        return "n/a"
    return f"{hz:,.0f}" if hz >= 1000 else f"{hz:.1f}"


def fmt_us(us: float) -> str:
    """Microseconds with sensible precision."""
    if us != us:
        return "n/a"
    return f"{us:,.0f}" if us >= 1000 else f"{us:.1f}"


def fmt_ratio(value: float | None, base: str | None = None) -> str:
    """``1.23x`` (with the baseline's name in parentheses when given); empty for None."""
    if value is None:
        return ""
    text = f"{value:.2f}x"
    return f"{text} ({base})" if base else text


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A Markdown table; columns whose index is in ``right`` are right-aligned."""
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(lines)
