"""IO vs frame size: in-process write+read round trip of float32 square frames.

One iteration publishes an ``n x n`` float32 frame and reads it back into memory the
process owns, in one process and one thread (no contention, no cross-process wake-ups).

Metrics (``Hz`` = iterations per second, best of the interleaved repeats):

- ``GB/s = Hz * 2 * n * n * 4 / 1e9``: bytes per iteration = 2 x payload (one copy in, one
  copy out), decimal GB, the formula of pyshmem's published figures;
- ``vs raw`` / ``vs pyshmem``: Hz ratio of a torch_shmem row to its like-for-like baseline
  (``read(out=)`` vs ``raw`` and ``pyshmem read(out=)``; ``read()`` vs ``raw_alloc`` and
  ``pyshmem read()``).

CPU implementations, side by side in the same run:

* ``np.copyto x2 (private)``: the same two copies between two private arrays, each a NumPy
  call from Python: the copy-bandwidth limit for large frames. Not a limit for small ones:
  there its two Python-level calls cost more than the copies, and torch_shmem's single C
  call per write and per read can beat it.
* ``raw``: ``multiprocessing.shared_memory`` + ``np.copyto`` in and out of a preallocated
  array, no synchronisation (the lower bound for ``read(out=)``).
* ``raw_alloc``: the same, reading with ``view.copy()`` (the baseline for ``read()``).
* ``torch_shmem read(out=)`` / ``torch_shmem read()``.
* ``pyshmem read(out=)`` / ``pyshmem read()`` when pyshmem imports.
* ``iceoryx2 loan+send, receive+copy``: iceoryx2 publish-subscribe of a byte slice: loan a
  sample, copy the frame in, send; receive, copy out, release. A queue of loaned samples,
  not a latest-value stream, so it is compared as write-then-read.

Writes of another dtype (CPU): ``write()`` of a value whose dtype is not the stream's, with
the default ``casting="checked"`` (accepted only when no value changes) and with
``casting="unsafe"`` (the same conversion without the check), next to a write of the stream's
own dtype; writes per second, best of the interleaved repeats. ``checked vs unsafe`` is the
cost of the value check.

GPU part (when CUDA is present; untested until run on a GPU): device-resident writes (CUDA
tensor source) and host-upload writes into GPU streams, read back into a CUDA tensor, next
to ``torch`` copies (the copy limits) and pyshmem's GPU streams. Host uploads come from a
NumPy array (pageable: the driver stages it, or ``TORCH_SHMEM_HOST_UPLOAD=staged``: two
page-locked chunks of torch_shmem's own) and from a pinned CPU tensor (straight DMA). A
``cpu_mirror=True`` stream adds the mirror copy into its page-locked CPU payload to every
write. The mirror copy itself is also timed alone, device tensor into page-locked host
memory: the Triton kernel (``torch_shmem.kernels.mirror_copy``, stores from the SMs) against
the copy engine (``copy_(non_blocking=True)``), which is what the write path uses. Each
timed batch ends with ``torch.cuda.synchronize()``.

Importing this module never imports torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
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
    iox_node,
    load_iceoryx2,
    load_pyshmem,
    measure_interleaved,
    private_copy,
    private_empty,
    quiet_unlink,
    unique_name,
)

TITLE = "1. IO round trip vs frame size (in process)"
SIZES = (100, 128, 1000, 4000)
BIG_SIZE = 10000
SMOKE_SIZES = (16, 64)
DTYPE = np.float32

RAW, RAW_ALLOC, MEMCPY = "raw", "raw_alloc", "np.copyto x2 (private)"
TS_READ, TS_OUT = "torch_shmem read()", "torch_shmem read(out=)"
PY_READ, PY_OUT = "pyshmem read()", "pyshmem read(out=)"
IOX = "iceoryx2 loan+send, receive+copy"
# torch_shmem variant -> (like-for-like raw baseline, like-for-like pyshmem variant)
BASELINES = {TS_READ: (RAW_ALLOC, PY_READ), TS_OUT: (RAW, PY_OUT)}

# GPU rows
CUDA_D2D, CUDA_H2D = "torch D2D copy x2", "torch H2D + D2D copy"
TSG_DEV, TSG_HOST = "torch_shmem GPU device write + read()", "torch_shmem GPU host write + read()"
TSG_DEV_OUT = "torch_shmem GPU device write + read(out=)"
TSG_HOST_STAGED = "torch_shmem GPU host write (staged) + read()"
TSG_HOST_PINNED = "torch_shmem GPU pinned-host write + read()"
TSG_MIRROR = "torch_shmem GPU device write, cpu_mirror (Triton) + read()"
TSG_MIRROR_CE = "torch_shmem GPU device write, cpu_mirror (copy engine) + read()"
CUDA_H2D_PINNED = "torch pinned H2D + D2D copy"
CUDA_D2D_D2H = "torch D2D + D2H (pinned) copy"
MIRROR_TRITON = "mirror_copy D2H (pinned), Triton kernel"
MIRROR_CE = "copy_ D2H (pinned), copy engine"
PYG_DEV, PYG_HOST = "pyshmem GPU device write + read()", "pyshmem GPU host write + read()"
GPU_BASELINES = {
    TSG_DEV: (CUDA_D2D, PYG_DEV), TSG_DEV_OUT: (CUDA_D2D, PYG_DEV),
    TSG_HOST: (CUDA_H2D, PYG_HOST), TSG_HOST_STAGED: (CUDA_H2D, PYG_HOST),
    TSG_HOST_PINNED: (CUDA_H2D_PINNED, PYG_HOST),
    TSG_MIRROR: (CUDA_D2D_D2H, None), TSG_MIRROR_CE: (CUDA_D2D_D2H, None),
    MIRROR_TRITON: (MIRROR_CE, None),
}
HOST_UPLOAD_ENV = "TORCH_SHMEM_HOST_UPLOAD"
MIRROR_ENV = "TORCH_SHMEM_MIRROR"


# ---------------------------------------------------------------- CPU implementations
@contextlib.contextmanager
def memcpy_impl(frame: np.ndarray) -> Iterator[Step]:
    """Two private copies per iteration (NumPy calls): the bandwidth limit for large frames."""
    # frame sits at PRIVATE_OFFSET; mid at page offset 0, like a shared payload
    mid, out = private_empty(frame.shape, frame.dtype, 0), private_empty(frame.shape, frame.dtype)

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
    out = private_empty(frame.shape, frame.dtype)

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
def stream_impl(module: Any, name: str, frame: Any, use_out: bool, out: Any = None,
                **create_kw: Any) -> Iterator[Step]:
    """write()+read() on a stream of ``module`` (torch_shmem or pyshmem)."""
    quiet_unlink(module, name)
    shape = tuple(frame.shape)
    stream = module.create(name, shape=shape, dtype=DTYPE, **create_kw)
    if out is None:
        out = private_empty(shape, DTYPE)

    def step_out() -> Any:
        stream.write(frame)
        stream.read(out=out)
        return out

    def step_alloc() -> Any:
        stream.write(frame)
        return stream.read()

    try:
        yield step_out if use_out else step_alloc
    finally:
        stream.unlink()


@contextlib.contextmanager
def iceoryx2_impl(iox: Any, frame: np.ndarray) -> Iterator[Step]:
    """Loan a sample, copy the frame in, send; receive it, copy it out, release it."""
    node = iox_node(iox)
    nbytes = frame.nbytes
    service = (
        node.service_builder(iox.ServiceName.new(unique_name("io")))
        .publish_subscribe(iox.Slice[ctypes.c_uint8])
        .max_publishers(1)
        .max_subscribers(1)
        .history_size(0)
        .subscriber_max_buffer_size(1)
        .create()
    )
    publisher = service.publisher_builder().initial_max_slice_len(nbytes).create()
    subscriber = service.subscriber_builder().create()
    out = private_empty(frame.shape, frame.dtype)
    array_t = ctypes.c_uint8 * nbytes
    shape, dtype = frame.shape, frame.dtype

    def view(ptr: int) -> np.ndarray:
        return np.frombuffer(array_t.from_address(ptr), dtype=dtype).reshape(shape)

    def step() -> np.ndarray:
        sample = publisher.loan_slice_uninit(nbytes)
        np.copyto(view(sample.payload_ptr), frame)
        sample.assume_init().send()
        received = subscriber.receive()
        np.copyto(out, view(received.payload_ptr))
        received.delete()
        return out

    try:
        yield step
    finally:
        subscriber.delete()
        publisher.delete()
        del service, node


def cpu_implementations(frame: np.ndarray, pyshmem: Any, iox: Any) -> dict[str, Any]:
    """The context managers (yielding step functions) to compare for ``frame``."""
    tag = f"io{frame.shape[0]}"
    impls = {
        MEMCPY: memcpy_impl(frame),
        RAW: raw_impl(frame, alloc=False),
        RAW_ALLOC: raw_impl(frame, alloc=True),
        TS_OUT: stream_impl(ts, unique_name(tag), frame, use_out=True),
        TS_READ: stream_impl(ts, unique_name(tag), frame, use_out=False),
    }
    if pyshmem is not None:
        impls[PY_OUT] = stream_impl(pyshmem, unique_name(tag), frame, use_out=True)
        impls[PY_READ] = stream_impl(pyshmem, unique_name(tag), frame, use_out=False)
    if iox is not None:
        impls[IOX] = iceoryx2_impl(iox, frame)
    return impls


def _rows(n: int, nbytes: int, rates: dict[str, list[float]], batches: dict[str, int],
          device: str) -> list[dict]:
    bytes_per_iter = 2 * nbytes
    return [
        {
            "device": device,
            "n": n,
            "impl": label,
            "payload_bytes": nbytes,
            "bytes_per_iter": bytes_per_iter,
            "batch": batches[label],
            "hz_repeats": hz,
            "hz": max(hz),
            "gbps": max(hz) * bytes_per_iter / 1e9,
        }
        for label, hz in rates.items()
    ]


def bench_size(n: int, cfg: Config, pyshmem: Any, iox: Any, progress: Progress) -> list[dict]:
    """Measure every CPU implementation on an ``n`` x ``n`` frame; return result rows."""
    frame = private_copy(np.random.default_rng(n).standard_normal((n, n), dtype=DTYPE))
    with contextlib.ExitStack() as stack:
        steps = {label: stack.enter_context(impl)
                 for label, impl in cpu_implementations(frame, pyshmem, iox).items()}
        for label, step in steps.items():
            if not np.array_equal(step(), frame):
                raise AssertionError(f"{label}: round trip returned wrong data at {n}x{n}")
        rates, batches = measure_interleaved(steps, cfg, progress, f"{n}x{n}")
    return _rows(n, frame.nbytes, rates, batches, "cpu")


# ---------------------------------------------------------------- writes of another dtype
CAST_SIZES = (100, 1000)
SMOKE_CAST_SIZES = (16, 300)
# (value dtype, stream dtype): the stream's own, a narrowing float cast, an integer cast that
# NumPy calls unsafe (checked by range), a safe cast (never checked)
CASTS = (("float32", "float32"), ("float64", "float32"), ("int64", "uint8"), ("int16", "float32"))


def cast_rows(cfg: Config, progress: Progress) -> list[dict]:
    """Writes per second of values in another dtype, checked and unchecked."""
    sizes = SMOKE_CAST_SIZES if cfg.smoke else CAST_SIZES
    rows: list[dict] = []
    progress.start("io casts", len(sizes) * 7 * cfg.repeats)
    for n in sizes:
        with contextlib.ExitStack() as stack:
            steps: dict[str, Step] = {}
            labels: dict[str, tuple[str, str, str]] = {}
            for src, dst in CASTS:
                name = unique_name(f"cast{n}")
                stream = ts.create(name, shape=(n, n), dtype=dst)
                stack.callback(stream.unlink)
                value = private_copy((np.arange(n * n) % 200).astype(src).reshape(n, n))
                for casting in (("checked",) if src == dst else ("checked", "unsafe")):
                    label = f"{src} -> {dst}, {casting}"
                    steps[label] = (lambda s=stream, v=value, c=casting: s.write(v, casting=c))
                    labels[label] = (src, dst, casting)
            rates, _ = measure_interleaved(steps, cfg, progress, f"casts {n}x{n}")
        for label, hz in rates.items():
            src, dst, casting = labels[label]
            rows.append({"n": n, "value_dtype": src, "stream_dtype": dst, "casting": casting,
                         "hz": max(hz), "hz_all": hz})
    progress.finish()
    by = {(r["n"], r["value_dtype"], r["casting"]): r for r in rows}
    for r in rows:
        unsafe = by.get((r["n"], r["value_dtype"], "unsafe"))
        if r["casting"] == "checked" and unsafe is not None:
            r["checked_vs_unsafe"] = unsafe["hz"] / r["hz"]  # > 1: the check costs time
    return rows


def cast_table(rows: list[dict]) -> str:
    lines = ["| frame | value -> stream | casting | writes/s | µs per write | time vs unsafe |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        ratio = r.get("checked_vs_unsafe")
        lines.append(f"| {r['n']}x{r['n']} | {r['value_dtype']} -> {r['stream_dtype']} "
                     f"| {r['casting']} | {fmt_hz(r['hz'])} | {1e6 / r['hz']:.1f} "
                     f"| {'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- GPU (untested: no GPU yet)
@contextlib.contextmanager
def env_at_create(key: str, value: str | None, impl: Any) -> Iterator[Step]:
    """Enter ``impl`` (which creates its stream) with ``os.environ[key] = value`` (unset for None).

    torch_shmem reads its upload policy when a stream is mapped, so the variable only needs
    to be set while the stream is created; it is restored before anything is timed.
    """
    old = os.environ.get(key)
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
    try:
        step = impl.__enter__()
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
    try:
        yield step
    finally:
        impl.__exit__(None, None, None)


def mirror_kernel_available() -> bool:
    """Whether the Triton mirror kernel can run on CUDA tensors here."""
    if GPU_DRY_RUN:
        return False
    try:
        from torch_shmem.kernels import triton_available
    except Exception:
        return False
    return triton_available()


def gpu_rows(cfg: Config, sizes: list[int], pyshmem: Any, progress: Progress) -> tuple[list[dict], list[str]]:
    """GPU stream round trips and torch copy limits; ``([], [reason])`` when CUDA is absent.

    UNTESTED: written before any GPU run; torch_shmem GPU rows need ``ts.gpu_available()``.
    """
    notes: list[str] = []
    torch, why = gpu_torch(cfg)
    if torch is None:
        return [], [f"GPU part skipped: {why}"]
    dev = torch.device(GPU_DEVICE)
    sync = gpu_sync(torch)
    ts_gpu = ts.gpu_available()
    if not ts_gpu:
        notes.append("torch_shmem GPU rows skipped: torch_shmem.gpu_available() is False "
                     "(the CUDA half was not built or no device is visible)")
    py_gpu = pyshmem is not None and pyshmem.gpu_available()
    pinned = not GPU_DRY_RUN  # page-locked host memory needs a CUDA device
    triton_mirror = mirror_kernel_available()
    if not triton_mirror:
        notes.append(f"{MIRROR_TRITON!r} skipped: the Triton kernels cannot run here")
    per_size = 2 + 3 * pinned + 4 * ts_gpu + 3 * (ts_gpu and pinned) + 2 * py_gpu + triton_mirror
    progress.start("io (GPU)", len(sizes) * per_size * cfg.repeats)
    rows: list[dict] = []
    for n in sizes:
        host = np.random.default_rng(n).standard_normal((n, n), dtype=DTYPE)
        src = torch.from_numpy(host).to(dev)
        mid = torch.empty_like(src)
        out = torch.empty_like(src)

        def d2d(src=src, mid=mid, out=out) -> Any:
            mid.copy_(src)
            out.copy_(mid)
            return out

        def h2d(host_t=torch.from_numpy(host), mid=mid, out=out) -> Any:
            mid.copy_(host_t)
            out.copy_(mid)
            return out

        impls: dict[str, Any] = {CUDA_D2D: contextlib.nullcontext(d2d),
                                 CUDA_H2D: contextlib.nullcontext(h2d)}
        host_pinned = torch.from_numpy(host).pin_memory() if pinned else None
        # page-locked like a mirrored stream's CPU payload (empty_like does not pin)
        mirror = torch.empty_like(host_pinned).pin_memory() if pinned else None
        if pinned:
            def h2d_pinned(host_t=host_pinned, mid=mid, out=out) -> Any:
                mid.copy_(host_t, non_blocking=True)
                out.copy_(mid)
                return out

            def d2d_d2h(src=src, mid=mid, mirror=mirror, out=out) -> Any:
                mid.copy_(src)
                mirror.copy_(mid, non_blocking=True)
                out.copy_(mid)
                return out

            def mirror_ce(src=src, mirror=mirror) -> Any:
                mirror.copy_(src, non_blocking=True)
                return mirror

            impls[CUDA_H2D_PINNED] = contextlib.nullcontext(h2d_pinned)
            impls[CUDA_D2D_D2H] = contextlib.nullcontext(d2d_d2h)
            impls[MIRROR_CE] = contextlib.nullcontext(mirror_ce)
        if triton_mirror and pinned:
            from torch_shmem.kernels import mirror_copy

            def mirror_triton(src=src, mirror=mirror) -> Any:
                return mirror_copy(src, mirror, backend="triton")

            impls[MIRROR_TRITON] = contextlib.nullcontext(mirror_triton)
        gpu_kw = {"gpu_device": GPU_DEVICE}
        if ts_gpu:
            impls[TSG_DEV_OUT] = stream_impl(ts, unique_name("gio"), src, True, out, **gpu_kw)
            impls[TSG_DEV] = stream_impl(ts, unique_name("gio"), src, False, **gpu_kw)
            impls[TSG_HOST] = stream_impl(ts, unique_name("gio"), host, False, **gpu_kw)
            impls[TSG_HOST_STAGED] = env_at_create(
                HOST_UPLOAD_ENV, "staged", stream_impl(ts, unique_name("gio"), host, False, **gpu_kw))
            if pinned:
                impls[TSG_HOST_PINNED] = stream_impl(ts, unique_name("gio"), host_pinned, False, **gpu_kw)
                impls[TSG_MIRROR] = env_at_create(MIRROR_ENV, "kernel", stream_impl(
                    ts, unique_name("gio"), src, False, cpu_mirror=True, **gpu_kw))
                impls[TSG_MIRROR_CE] = env_at_create(MIRROR_ENV, None, stream_impl(
                    ts, unique_name("gio"), src, False, cpu_mirror=True, **gpu_kw))
        if py_gpu:
            impls[PYG_DEV] = stream_impl(pyshmem, unique_name("gio"), src, False, **gpu_kw)
            impls[PYG_HOST] = stream_impl(pyshmem, unique_name("gio"), host, False, **gpu_kw)
        with contextlib.ExitStack() as stack:
            steps = {label: stack.enter_context(impl) for label, impl in impls.items()}
            for label, step in steps.items():
                got = step()
                sync()
                if not torch.equal(got.to(dev), src):
                    raise AssertionError(f"{label}: GPU round trip returned wrong data at {n}x{n}")
            rates, batches = measure_interleaved(steps, cfg, progress, f"GPU {n}x{n}", sync=sync)
        rows += _rows(n, host.nbytes, rates, batches, "cuda")
        del src, mid, out, host_pinned, mirror
    progress.finish()
    return rows, notes


# ---------------------------------------------------------------- report
def add_ratios(rows: list[dict], baselines: dict[str, tuple[str, str]]) -> None:
    """Add ``vs_raw`` and ``vs_pyshmem`` (Hz ratios) to the torch_shmem rows."""
    hz = {(r["device"], r["n"], r["impl"]): r["hz"] for r in rows}
    for r in rows:
        if r["impl"] in baselines:
            raw, py = baselines[r["impl"]]
            key = (r["device"], r["n"])
            r["vs_raw"] = r["hz"] / hz[(*key, raw)] if (*key, raw) in hz else None
            r["vs_pyshmem"] = r["hz"] / hz[(*key, py)] if (*key, py) in hz else None


def markdown_table(rows: list[dict], baselines: dict[str, tuple[str, str]] = BASELINES) -> str:
    """Render the result rows as a Markdown table (the table docs/benchmarks.md has always had)."""

    def ratio(row: dict, key: str, base: str | None) -> str:
        if base is None:
            return ""
        value = row.get(key)
        return "n/a" if value is None else fmt_ratio(value, base)

    lines = [
        "| frame | payload | implementation | Hz | GB/s | vs raw baseline | vs pyshmem |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        raw_base, py_base = baselines.get(r["impl"], (None, None))
        lines.append(
            f"| {r['n']}x{r['n']} | {r['payload_bytes'] / 1e6:.3g} MB | {r['impl']} "
            f"| {fmt_hz(r['hz'])} | {r['gbps']:.2f} "
            f"| {ratio(r, 'vs_raw', raw_base)} | {ratio(r, 'vs_pyshmem', py_base)} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[Target]:
    """The CPU round-trip targets of design.md section 8, evaluated on ``rows``."""
    by = {(r["n"], r["impl"]): r for r in rows if r["device"] == "cpu"}
    out: list[Target] = []
    if (100, TS_OUT) in by:
        parts, met = [], True
        for variant in (TS_OUT, TS_READ):
            r = by[(100, variant)]
            raw_base, py_base = BASELINES[variant]
            ok_raw = r.get("vs_raw") is not None and r["vs_raw"] >= 0.7
            parts.append(f"{variant}: {fmt_ratio(r.get('vs_raw'))} {raw_base}")
            met &= ok_raw
            if r.get("vs_pyshmem") is not None:
                parts.append(f"{fmt_ratio(r['vs_pyshmem'])} {py_base}")
                met &= r["vs_pyshmem"] >= 4.0
        out.append(Target("CPU round trip 100x100",
                          ">= 0.7x raw and >= 4x pyshmem (Hz, like for like)", "; ".join(parts), met))
    large = sorted({n for n, _ in by if n >= 1000})
    if large:
        parts, met = [], True
        for n in large:
            vals = []
            for variant in (TS_OUT, TS_READ):
                r = by.get((n, variant))
                if r is None or r.get("vs_raw") is None:
                    continue
                vals.append(fmt_ratio(r["vs_raw"]))
                met &= r["vs_raw"] >= 0.9
            parts.append(f"{n}: {' / '.join(vals)}")
        out.append(Target("CPU round trip >= 1000x1000",
                          ">= 0.9x raw GB/s (read(out=) vs raw / read() vs raw_alloc)",
                          "; ".join(parts), met))
    return out


def run(cfg: Config, progress: Progress) -> Section:
    """Measure the CPU (and, with CUDA, GPU) round trips for every frame size."""
    if cfg.sizes:
        sizes = list(cfg.sizes)
    elif cfg.smoke:
        sizes = list(SMOKE_SIZES)
    else:
        sizes = list(SIZES) + ([BIG_SIZE] if cfg.big else [])
    pyshmem, py_note = load_pyshmem(cfg)
    iox, iox_note = load_iceoryx2(cfg)
    rows: list[dict] = []
    if cfg.gpu != "only":
        n_impls = 5 + 2 * (pyshmem is not None) + (iox is not None)
        progress.start("io", len(sizes) * n_impls * cfg.repeats)
        for n in sizes:
            rows += bench_size(n, cfg, pyshmem, iox, progress)
        progress.finish()
    gpu, gpu_notes = gpu_rows(cfg, sizes, pyshmem, progress)
    add_ratios(rows, BASELINES)
    add_ratios(gpu, GPU_BASELINES)
    sec = Section("io", TITLE)
    sec.method = (
        "One iteration = publish a C-contiguous float32 `n x n` frame, then read it back into "
        "process-private memory (one process, one thread). **GB/s = Hz x 2 x n² x 4 / 1e9** "
        "(bytes = 2 x payload: one copy in, one copy out). Ratios are Hz ratios to the "
        "like-for-like baseline: `read(out=)` vs `raw` / `pyshmem read(out=)`, `read()` vs "
        "`raw_alloc` / `pyshmem read()`. `raw` is unsafe (no lock, no seqlock, no checks); "
        "`np.copyto x2 (private)` is the same two copies between private arrays, two NumPy "
        "calls from Python: the copy-bandwidth limit for large frames, but not for small ones, "
        "where the two Python-level calls cost more than the copies and torch_shmem's one C "
        "call per operation can beat it. iceoryx2 is a queue of loaned "
        "samples, not a latest-value stream: one iteration loans a sample, copies the frame "
        "in, sends, receives, copies out and releases it."
    )
    casts = cast_rows(cfg, progress) if cfg.gpu != "only" else []
    if rows:
        sec.tables.append("CPU streams:\n\n" + markdown_table(rows))
    if casts:
        sec.tables.append(
            "Writes of another dtype (CPU streams; `write(value, casting=...)` alone, no read). "
            "`checked` (the default) converts and accepts the value only when no value changes; "
            "`unsafe` is the same conversion without the check; *time vs unsafe* = time per "
            "checked write / time per unsafe write. From 64 KiB on, a value is cast straight "
            "into the payload (checked first in cache-sized slices); below, through a "
            "temporary:\n\n" + cast_table(casts))
        sec.extra["write_casts"] = casts
    if gpu:
        sec.tables.append("GPU streams (device-resident writes: CUDA tensor source; host "
                          "writes: NumPy source uploaded by the write, through the driver's "
                          "staging or, `(staged)`, torch_shmem's two page-locked chunks; "
                          "pinned-host writes: a pinned CPU tensor, straight DMA; `cpu_mirror`: "
                          "every write also copied into the page-locked CPU payload, by the Triton "
                          "kernel (default) or the copy engine). The two "
                          "`D2H (pinned)` rows time the mirror copy alone: Triton kernel vs "
                          "copy engine:\n\n"
                          + markdown_table(gpu, GPU_BASELINES))
    sec.notes += [py_note, iox_note] + gpu_notes
    sec.rows = rows + gpu
    sec.targets = targets(rows)
    if gpu:
        sec.targets += gpu_targets(gpu)
    else:
        sec.targets.append(Target("GPU round trip 100x100", ">= 3x pyshmem's", "no GPU run", None))
    if "torch" in sys.modules and not gpu:
        sec.notes.append("WARNING: torch was imported during the CPU IO benchmark")
    return sec


def gpu_targets(rows: list[dict]) -> list[Target]:
    """GPU write+read round trip at 100x100 at least 3x pyshmem's."""
    by = {(r["n"], r["impl"]): r for r in rows}
    r = by.get((100, TSG_DEV))
    if r is None or r.get("vs_pyshmem") is None:
        return [Target("GPU round trip 100x100", ">= 3x pyshmem's",
                       "not measured (torch_shmem or pyshmem GPU streams unavailable)", None)]
    return [Target("GPU round trip 100x100", ">= 3x pyshmem's",
                   f"{fmt_ratio(r['vs_pyshmem'])} ({TSG_DEV} vs {PYG_DEV})", r["vs_pyshmem"] >= 3.0)]


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--only", "io", *sys.argv[1:]]))
