"""Matrix-vector pipelines with the matrix kept in a stream: Hz and GFLOP/s.

A float32 ``n x n`` matrix ``A`` is published once into a matrix stream. One iteration of
the pipeline makes a new vector ``x`` (NumPy, or on the GPU for the device-resident GPU
pipeline), publishes it into a vector stream, reads it back, and computes ``y = A @ x``
reading ``A`` from the matrix stream.

Metrics: ``Hz`` (pipeline iterations per second, best of the interleaved repeats) and
``GFLOP/s = Hz * 2 * n * n / 1e9`` (the multiply-adds of one matrix-vector product, the
formula of pyshmem's published figures). Ratios are Hz ratios to the like-for-like raw
baseline and pyshmem pipeline.

CPU pipelines (NumPy ``np.dot(A, x, out=y)``, OpenBLAS threads as configured):

* ``numpy, private A``: no streams at all (the compute ceiling);
* ``raw in place`` / ``raw snapshot``: ``multiprocessing.shared_memory`` segments, no
  synchronisation; ``A`` used where it lies, or copied into a private array first;
* ``torch_shmem in place``: ``with mat.locked(): A = mat.read(safe=False)`` (the live
  payload; the lock keeps writers out while the product runs);
* ``torch_shmem snapshot``: ``mat.read(out=A_private)`` (a consistent copy every iteration,
  what a reader must do when it cannot hold the writers off);
* ``pyshmem in place`` / ``pyshmem snapshot``: the same calls on pyshmem 1.4. (pyshmem's
  published pipeline, ``matrix.read() @ vector.read()``, allocates both every iteration;
  the snapshot row is that pipeline with preallocated outputs.)

GPU pipelines (CUDA only; UNTESTED until run on a GPU): the matrix lives in a GPU stream
and is read in place (its slot, under the lock); ``x`` is either made in NumPy and
uploaded by the vector stream's write (host-upload) or produced on the GPU (device-
resident); ``y`` by the Triton GEMV (``torch_shmem.kernels.gemv``) and by ``torch.mv``.
``torch.mv`` on a private CUDA matrix is the ceiling. Each batch ends with
``torch.cuda.synchronize()``. Matrix GB/s = ``(n*n + 2*n) * 4 * Hz / 1e9`` is compared with
the device's peak memory bandwidth (design target: >= 80% at 10000x10000, device-resident).
"""

from __future__ import annotations

import contextlib
import sys
from multiprocessing import shared_memory
from typing import Any, Iterator

import numpy as np

import torch_shmem as ts

from .common import (
    Config,
    Progress,
    Section,
    Step,
    Target,
    GPU_DEVICE,
    GPU_DRY_RUN,
    fmt_hz,
    gpu_sync,
    gpu_torch,
    fmt_ratio,
    load_pyshmem,
    measure_interleaved,
    md_table,
    quiet_unlink,
    unique_name,
)

TITLE = "2. Matrix-vector pipelines (matrix kept in a stream)"
SIZES = (100, 1000, 4000)
BIG_SIZE = 10000
SMOKE_SIZES = (16, 64)
DTYPE = np.float32

PRIVATE = "numpy, private A (no stream)"
RAW_IN, RAW_SNAP = "raw in place", "raw snapshot"
TS_IN, TS_SNAP = "torch_shmem in place (locked live view)", "torch_shmem snapshot (read(out=))"
PY_IN, PY_SNAP = "pyshmem in place (locked live view)", "pyshmem snapshot (read(out=))"
BASELINES = {TS_IN: (RAW_IN, PY_IN), TS_SNAP: (RAW_SNAP, PY_SNAP)}


class Vector:
    """The per-iteration vector: a fixed random vector whose first element counts up."""

    def __init__(self, n: int) -> None:
        self.src = np.random.default_rng(n + 1).standard_normal(n, dtype=DTYPE)
        self.i = 0

    def next(self) -> np.ndarray:
        self.i += 1
        self.src[0] = self.i & 1023
        return self.src


# ---------------------------------------------------------------- CPU pipelines
@contextlib.contextmanager
def private_impl(A: np.ndarray) -> Iterator[Step]:
    """``y = A @ x`` on a private matrix: the compute ceiling."""
    vec, y = Vector(A.shape[0]), np.empty(A.shape[0], DTYPE)

    def step() -> np.ndarray:
        return np.dot(A, vec.next(), out=y)

    yield step


@contextlib.contextmanager
def raw_impl(A: np.ndarray, snapshot: bool) -> Iterator[Step]:
    """Matrix and vector in ``multiprocessing.shared_memory``, no synchronisation."""
    n = A.shape[0]
    shm_a = shared_memory.SharedMemory(create=True, size=A.nbytes)
    shm_x = shared_memory.SharedMemory(create=True, size=n * 4)
    a_view = np.ndarray(A.shape, DTYPE, buffer=shm_a.buf)
    x_view = np.ndarray((n,), DTYPE, buffer=shm_x.buf)
    np.copyto(a_view, A)
    vec, x, y = Vector(n), np.empty(n, DTYPE), np.empty(n, DTYPE)
    a_copy = np.empty_like(A) if snapshot else None

    def step_in_place() -> np.ndarray:
        np.copyto(x_view, vec.next())
        np.copyto(x, x_view)
        return np.dot(a_view, x, out=y)

    def step_snapshot() -> np.ndarray:
        np.copyto(x_view, vec.next())
        np.copyto(x, x_view)
        np.copyto(a_copy, a_view)
        return np.dot(a_copy, x, out=y)

    try:
        yield step_snapshot if snapshot else step_in_place
    finally:
        del a_view, x_view
        for shm in (shm_a, shm_x):
            shm.close()
            shm.unlink()


@contextlib.contextmanager
def stream_impl(module: Any, A: np.ndarray, snapshot: bool) -> Iterator[Step]:
    """Matrix and vector in streams of ``module`` (torch_shmem or pyshmem)."""
    n = A.shape[0]
    names = unique_name("mvm_A"), unique_name("mvm_x")
    for name in names:
        quiet_unlink(module, name)
    mat = module.create(names[0], shape=A.shape, dtype=DTYPE)
    vecs = module.create(names[1], shape=(n,), dtype=DTYPE)
    mat.write(A)
    vec, x, y = Vector(n), np.empty(n, DTYPE), np.empty(n, DTYPE)
    a_copy = np.empty_like(A) if snapshot else None

    def step_in_place() -> np.ndarray:
        vecs.write(vec.next())
        vecs.read(out=x)
        with mat.locked():
            return np.dot(mat.read(safe=False), x, out=y)

    def step_snapshot() -> np.ndarray:
        vecs.write(vec.next())
        vecs.read(out=x)
        mat.read(out=a_copy)
        return np.dot(a_copy, x, out=y)

    try:
        yield step_snapshot if snapshot else step_in_place
    finally:
        mat.unlink()
        vecs.unlink()


def cpu_rows(n: int, cfg: Config, pyshmem: Any, progress: Progress) -> list[dict]:
    """Every CPU pipeline at size ``n``."""
    A = np.random.default_rng(n).standard_normal((n, n), dtype=DTYPE)
    impls = {
        PRIVATE: private_impl(A),
        RAW_IN: raw_impl(A, snapshot=False),
        RAW_SNAP: raw_impl(A, snapshot=True),
        TS_IN: stream_impl(ts, A, snapshot=False),
        TS_SNAP: stream_impl(ts, A, snapshot=True),
    }
    if pyshmem is not None:
        impls[PY_IN] = stream_impl(pyshmem, A, snapshot=False)
        impls[PY_SNAP] = stream_impl(pyshmem, A, snapshot=True)
    with contextlib.ExitStack() as stack:
        steps = {label: stack.enter_context(impl) for label, impl in impls.items()}
        for label, step in steps.items():
            x = Vector(n).next()
            y = step()
            if not np.allclose(y, A @ x, rtol=1e-3, atol=1e-3 * np.sqrt(n)):
                raise AssertionError(f"{label}: wrong product at n={n}")
        rates, batches = measure_interleaved(steps, cfg, progress, f"n={n}")
    return [_row("cpu", n, label, hz, batches[label]) for label, hz in rates.items()]


def _row(device: str, n: int, label: str, hz: list[float], batch: int) -> dict:
    best = max(hz)
    return {"device": device, "n": n, "impl": label, "matrix_bytes": n * n * 4, "batch": batch,
            "hz_repeats": hz, "hz": best, "gflops": best * 2 * n * n / 1e9,
            "matrix_gbps": best * (n * n + 2 * n) * 4 / 1e9}


# ---------------------------------------------------------------- GPU (untested: no GPU yet)
GPU_PRIVATE_DEV = "torch.mv, private CUDA A, x made on GPU"
GPU_PRIVATE_UP = "torch.mv, private CUDA A, x uploaded"
TSG_UP_TRITON, TSG_UP_MV = "torch_shmem host-upload, Triton GEMV", "torch_shmem host-upload, torch.mv"
TSG_DEV_TRITON, TSG_DEV_MV = ("torch_shmem device-resident, Triton GEMV",
                              "torch_shmem device-resident, torch.mv")
PYG_UP, PYG_DEV = "pyshmem host-upload, torch.mv", "pyshmem device-resident, torch.mv"
GPU_BASELINES = {TSG_UP_TRITON: (GPU_PRIVATE_UP, PYG_UP), TSG_UP_MV: (GPU_PRIVATE_UP, PYG_UP),
                 TSG_DEV_TRITON: (GPU_PRIVATE_DEV, PYG_DEV), TSG_DEV_MV: (GPU_PRIVATE_DEV, PYG_DEV)}


def _peak_bandwidth_gbps(torch: Any) -> float | None:
    """Theoretical DRAM bandwidth of cuda:0 from its clock and bus width (None if unknown)."""
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate


def gpu_rows(cfg: Config, sizes: list[int], pyshmem: Any,
             progress: Progress) -> tuple[list[dict], list[str], dict]:
    """GPU pipelines (UNTESTED); ``([], [reason], {})`` without CUDA."""
    torch, why = gpu_torch(cfg)
    if torch is None:
        return [], [f"GPU part skipped: {why}"], {}
    notes: list[str] = []
    try:
        from torch_shmem.kernels import gemv
    except Exception as exc:
        gemv = None
        notes.append(f"Triton GEMV rows skipped: torch_shmem.kernels does not import ({exc})")
    ts_gpu = ts.gpu_available()
    if not ts_gpu:
        notes.append("torch_shmem GPU rows skipped: torch_shmem.gpu_available() is False")
    py_gpu = pyshmem is not None and pyshmem.gpu_available()
    dev, sync = torch.device(GPU_DEVICE), gpu_sync(torch)
    n_impls = 2 + (4 if ts_gpu else 0) - (2 if ts_gpu and gemv is None else 0) + 2 * py_gpu
    progress.start("mvm (GPU)", len(sizes) * n_impls * cfg.repeats)
    rows: list[dict] = []
    for n in sizes:
        A_host = np.random.default_rng(n).standard_normal((n, n), dtype=DTYPE)
        A_dev = torch.from_numpy(A_host).to(dev)
        vec = Vector(n)
        x_base = torch.from_numpy(vec.src.copy()).to(dev)
        x_dev, x_made, y = torch.empty_like(x_base), torch.empty_like(x_base), torch.empty_like(x_base)
        counter = [0]

        def make_on_gpu() -> Any:  # the device-resident producer: x = x_base * (1 + i/1024)
            counter[0] = (counter[0] + 1) & 1023
            return torch.mul(x_base, 1.0 + counter[0] / 1024, out=x_made)

        def private_dev() -> Any:
            return torch.mv(A_dev, make_on_gpu(), out=y)

        def private_up() -> Any:
            x_dev.copy_(torch.from_numpy(vec.next()))
            return torch.mv(A_dev, x_dev, out=y)

        impls: dict[str, Any] = {GPU_PRIVATE_DEV: contextlib.nullcontext(private_dev),
                                 GPU_PRIVATE_UP: contextlib.nullcontext(private_up)}

        def pipelines(module: Any, with_triton: bool) -> dict[str, Any]:
            @contextlib.contextmanager
            def pipeline(upload: bool, kernel: str) -> Iterator[Step]:
                names = unique_name("gmvm_A"), unique_name("gmvm_x")
                mat = module.create(names[0], shape=(n, n), dtype=DTYPE, gpu_device=GPU_DEVICE)
                vs = module.create(names[1], shape=(n,), dtype=DTYPE, gpu_device=GPU_DEVICE)
                mat.write(A_dev)

                def step() -> Any:
                    vs.write(vec.next() if upload else make_on_gpu())
                    x = vs.read()
                    # The matrix is read in place: its latest slot under the lock. No matrix
                    # writer runs during the benchmark; a real pipeline with one would
                    # synchronize its CUDA stream before leaving the locked block.
                    with mat.locked():
                        A = mat.read(safe=False)
                        if kernel == "triton":
                            return gemv(A, x, y)
                        return torch.mv(A, x, out=y)

                try:
                    yield step
                finally:
                    sync()
                    mat.unlink()
                    vs.unlink()

            if module is ts:
                out = {TSG_UP_MV: pipeline(True, "mv"), TSG_DEV_MV: pipeline(False, "mv")}
                if with_triton:
                    out[TSG_UP_TRITON] = pipeline(True, "triton")
                    out[TSG_DEV_TRITON] = pipeline(False, "triton")
                return out
            return {PYG_UP: pipeline(True, "mv"), PYG_DEV: pipeline(False, "mv")}

        if ts_gpu:
            impls.update(pipelines(ts, gemv is not None))
        if py_gpu:
            impls.update(pipelines(pyshmem, False))
        with contextlib.ExitStack() as stack:
            steps = {label: stack.enter_context(impl) for label, impl in impls.items()}
            for step in steps.values():  # warm up (Triton autotunes on its first call per shape)
                step()
            sync()
            rates, batches = measure_interleaved(steps, cfg, progress, f"GPU n={n}", sync=sync)
        rows += [_row("cuda", n, label, hz, batches[label]) for label, hz in rates.items()]
    progress.finish()
    return rows, notes, {"peak_gbps": None if GPU_DRY_RUN else _peak_bandwidth_gbps(torch)}


# ---------------------------------------------------------------- report
def add_ratios(rows: list[dict], baselines: dict[str, tuple[str, str]]) -> None:
    """``vs_raw`` / ``vs_pyshmem`` Hz ratios on the torch_shmem rows."""
    hz = {(r["device"], r["n"], r["impl"]): r["hz"] for r in rows}
    for r in rows:
        if r["impl"] in baselines:
            raw, py = baselines[r["impl"]]
            key = (r["device"], r["n"])
            r["vs_raw"] = r["hz"] / hz[(*key, raw)] if (*key, raw) in hz else None
            r["vs_pyshmem"] = r["hz"] / hz[(*key, py)] if (*key, py) in hz else None


def table(rows: list[dict], baselines: dict[str, tuple[str, str]], gbps: bool = False) -> str:
    """Markdown table of pipeline rows."""
    headers = ["n", "matrix", "pipeline", "Hz", "GFLOP/s"] + (["matrix GB/s"] if gbps else []) + \
        ["vs raw baseline", "vs pyshmem"]
    body = []
    for r in rows:
        raw, py = baselines.get(r["impl"], (None, None))
        body.append([r["n"], f"{r['matrix_bytes'] / 1e6:.3g} MB", r["impl"], fmt_hz(r["hz"]),
                     f"{r['gflops']:.2f}"] + ([f"{r['matrix_gbps']:.0f}"] if gbps else []) +
                    [fmt_ratio(r.get("vs_raw"), raw) if raw else "",
                     fmt_ratio(r.get("vs_pyshmem"), py) if py and r.get("vs_pyshmem") else ""])
    return md_table(headers, body, right=(1, 3, 4, 5, 6) if not gbps else (1, 3, 4, 5, 6, 7))


def run(cfg: Config, progress: Progress) -> Section:
    """Measure every pipeline at every size."""
    sizes = list(SMOKE_SIZES) if cfg.smoke else list(SIZES) + ([BIG_SIZE] if cfg.big else [])
    pyshmem, py_note = load_pyshmem(cfg)
    rows: list[dict] = []
    if cfg.gpu != "only":
        progress.start("mvm", len(sizes) * (5 + 2 * (pyshmem is not None)) * cfg.repeats)
        for n in sizes:
            rows += cpu_rows(n, cfg, pyshmem, progress)
        progress.finish()
    gpu, gpu_notes, gpu_extra = gpu_rows(cfg, sizes, pyshmem, progress)
    add_ratios(rows, BASELINES)
    add_ratios(gpu, GPU_BASELINES)
    sec = Section("mvm", TITLE)
    sec.method = (
        "One iteration = make a new vector x, publish it into the vector stream, read it back, "
        "then y = A @ x with A read from the matrix stream. **GFLOP/s = Hz x 2 x n² / 1e9.** "
        "*In place*: A is the stream's live payload under its lock (no copy); *snapshot*: A is "
        "copied out with `read(out=)` every iteration (n² x 4 bytes more per iteration). "
        "`numpy, private A` has no stream at all (the compute ceiling). Ratios are Hz ratios "
        "to the same pipeline on raw shared memory and on pyshmem."
    )
    if rows:
        sec.tables.append("CPU (NumPy):\n\n" + table(rows, BASELINES))
    if gpu:
        peak = gpu_extra.get("peak_gbps")
        sec.tables.append(
            "GPU (matrix read in place from the stream's allocation; device peak "
            f"{'%.0f GB/s' % peak if peak else 'unknown'}):\n\n" + table(gpu, GPU_BASELINES, gbps=True))
    sec.notes += [py_note] + gpu_notes
    if any(r["n"] == 100 for r in rows):
        sec.notes.append("At n=100 the product costs about a microsecond, so the rate measures "
                         "per-call overhead of the stream calls, not the multiply.")
    sec.rows = rows + gpu
    sec.extra = gpu_extra
    sec.targets.append(gpu_target(gpu, gpu_extra.get("peak_gbps")))
    return sec


def gpu_target(rows: list[dict], peak: float | None) -> Target:
    """Device-resident MVM at 10000x10000 reading A in place: >= 80% of HBM bandwidth."""
    req = ">= 80% of HBM bandwidth"
    name = "GPU device-resident MVM 10000x10000"
    r = next((r for r in rows if r["n"] == 10000 and r["impl"] == TSG_DEV_TRITON), None)
    if r is None:
        return Target(name, req, "no GPU run at 10000 (needs CUDA and --big)", None)
    if not peak:
        return Target(name, req, f"{r['matrix_gbps']:.0f} GB/s (device peak unknown)", None)
    frac = r["matrix_gbps"] / peak
    return Target(name, req, f"{r['matrix_gbps']:.0f} GB/s = {frac:.0%} of {peak:.0f} GB/s", frac >= 0.8)


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--only", "mvm", *sys.argv[1:]]))
