"""Import time of torch_shmem for a NumPy-only process.

Two measurements, each in fresh interpreter subprocesses (``sys.executable``), the variants
alternated so that drift hits them alike:

* **process**: wall time of ``python -c "import numpy"`` vs ``python -c "import numpy,
  torch_shmem"`` (the whole process: start-up, imports, exit); added cost = median(with) -
  median(without);
* **in process**: ``import numpy`` first, then time ``import torch_shmem`` alone with
  ``time.perf_counter`` inside the child; reported as the median.

The same for pyshmem and iceoryx2 when installed. A last child checks that
``import torch_shmem`` leaves ``torch`` out of ``sys.modules``.

What installing torch_shmem costs a program that imports torch and never uses it (when torch
is installed and torch_shmem's ``torch.backends`` autoload entry point is registered): torch
runs that entry point (``torch_shmem_autoload.autoload``, which loads ``torch.ops.shmem``)
during every ``import torch``.

* **process**: wall time of ``python -c "import torch"`` vs the same with
  ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` (torch then runs no backend entry point at all);
* **in process**: ``import torch`` with ``TORCH_DEVICE_BACKEND_AUTOLOAD=0``, then time the
  entry point alone, ``torch_shmem_autoload.autoload()``, with ``time.perf_counter``.

Children run with Python's bytecode cache allowed (``PYTHONDONTWRITEBYTECODE`` removed from
their environment) after one warm-up import that writes it, as in any normal install: pip
compiles installed packages, but an editable install run under
``PYTHONDONTWRITEBYTECODE=1`` would otherwise recompile its sources on every import and
measure the compiler, not the import.

Design target (design.md section 4): importing torch_shmem adds well under 50 ms to NumPy's
own import.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from .common import Config, Progress, Section, Target, has_module, md_table

TITLE = "6. Import time (NumPy-only process; import torch with torch_shmem installed)"
BASE = "numpy"
TIMED = ("import numpy, time; t = time.perf_counter(); import {mod}; "
         "print(time.perf_counter() - t)")
AUTOLOAD_ENV = "TORCH_DEVICE_BACKEND_AUTOLOAD"
TIMED_AUTOLOAD = ("import sys, time, torch; t = time.perf_counter(); "
                  "import torch_shmem_autoload; torch_shmem_autoload.autoload(); "
                  "d = time.perf_counter() - t; assert hasattr(torch.ops.shmem, 'publish'); "
                  "print(d, 'torch._dynamo' in sys.modules)")


# the children may use (and write) the bytecode cache
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _wall(code: str, env: dict | None = None) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                   env=ENV if env is None else env)
    return time.perf_counter() - t


def _autoload_registered() -> bool:
    """Whether torch will run torch_shmem's entry point on ``import torch`` (installed package)."""
    import importlib.metadata

    return any(e.value.startswith("torch_shmem_autoload")
               for e in importlib.metadata.entry_points(group="torch.backends"))


def torch_rows(cfg: Config, sec: Section, progress: Progress) -> None:
    """``import torch`` with and without torch_shmem's autoload entry point."""
    if not has_module("torch"):
        sec.notes.append("import torch: skipped (torch is not installed)")
        return
    if not _autoload_registered():
        sec.notes.append("import torch: skipped (torch_shmem's torch.backends entry point is not "
                         "installed: pip install --no-build-isolation -e .)")
        return
    reps = cfg.pick(10, 5, 1)
    off = dict(ENV, **{AUTOLOAD_ENV: "0"})
    on = {k: v for k, v in ENV.items() if k != AUTOLOAD_ENV}
    progress.start("import torch", reps)
    _wall("import torch", on)  # warm the page cache and the bytecode cache
    walls: dict[str, list[float]] = {"on": [], "off": []}
    inproc: list[float] = []
    dynamo = False
    for _ in range(reps):
        walls["off"].append(_wall("import torch", off))
        walls["on"].append(_wall("import torch", on))
        done = subprocess.run([sys.executable, "-c", TIMED_AUTOLOAD], check=True,
                              capture_output=True, text=True, env=off)
        seconds, imported = done.stdout.split()
        inproc.append(float(seconds))
        dynamo = dynamo or imported == "True"
        progress.step()
    progress.finish()
    off_ms = 1e3 * statistics.median(walls["off"])
    on_ms = 1e3 * statistics.median(walls["on"])
    auto_ms = 1e3 * statistics.median(inproc)
    sec.rows.append({"module": "torch", "autoload": False, "process_ms": off_ms,
                     "process_ms_all": [1e3 * v for v in walls["off"]]})
    sec.rows.append({"module": "torch", "autoload": True, "process_ms": on_ms,
                     "added_ms": on_ms - off_ms, "in_process_ms": auto_ms,
                     "in_process_ms_all": [1e3 * v for v in inproc], "imports_dynamo": dynamo})
    sec.tables.append(
        f"`import torch` in a fresh interpreter, {reps} alternated repetitions, medians. "
        f"**added ms = median wall time of `python -c 'import torch'` - the same with "
        f"`{AUTOLOAD_ENV}=0`**; *in process* = torch_shmem's entry point "
        "(`torch_shmem_autoload.autoload()`: loads `torch.ops.shmem`) timed alone after "
        f"`import torch` with `{AUTOLOAD_ENV}=0`.\n\n"
        + md_table(("process", "wall ms (median)", "added ms", "autoload alone, ms"),
                   [(f"import torch, {AUTOLOAD_ENV}=0", f"{off_ms:.1f}", "", ""),
                    ("import torch (torch_shmem installed)", f"{on_ms:.1f}",
                     f"{on_ms - off_ms:+.1f}", f"{auto_ms:.1f}")],
                   right=(1, 2, 3)))
    sec.notes.append(f"torch_shmem's autoload imports torch._dynamo: {dynamo}")
    sec.targets.append(Target("import torch with torch_shmem installed", "adds at most a few ms "
                              "(autoload < 10 ms); no torch._dynamo",
                              f"autoload {auto_ms:.1f} ms in process; {on_ms - off_ms:+.1f} ms "
                              f"process (noisier); torch._dynamo imported: {dynamo}",
                              auto_ms < 10 and not dynamo))


def _in_process(mod: str) -> float:
    done = subprocess.run([sys.executable, "-c", TIMED.format(mod=mod)], check=True,
                          capture_output=True, text=True, env=ENV)
    return float(done.stdout.strip())


def run(cfg: Config, progress: Progress) -> Section:
    """Median added import time of torch_shmem (and peers) over fresh interpreters."""
    sec = Section("import", TITLE)
    if cfg.gpu == "only":
        sec.notes.append("skipped: --gpu (CPU only)")
        return sec
    reps = cfg.pick(30, 10, 1)
    mods = ["torch_shmem"] + [m for m in ("pyshmem", "iceoryx2") if has_module(m) and (
        (m != "pyshmem" or cfg.use_pyshmem) and (m != "iceoryx2" or cfg.use_iceoryx2))]
    progress.start("import", reps)
    base: list[float] = []
    wall: dict[str, list[float]] = {m: [] for m in mods}
    inproc: dict[str, list[float]] = {m: [] for m in mods}
    _wall(f"import {BASE}, {', '.join(mods)}")  # warm the page cache, write the bytecode cache
    for _ in range(reps):
        base.append(_wall(f"import {BASE}"))
        for m in mods:
            wall[m].append(_wall(f"import {BASE}, {m}"))
            inproc[m].append(_in_process(m))
        progress.step()
    progress.finish()
    check = subprocess.run([sys.executable, "-c", "import sys, numpy, torch_shmem; "
                            "print('torch' in sys.modules)"], check=True, capture_output=True, text=True)
    torch_loaded = check.stdout.strip() == "True"
    base_ms = 1e3 * statistics.median(base)
    body = [("numpy alone", f"{base_ms:.1f}", "", "")]
    for m in mods:
        w = 1e3 * statistics.median(wall[m])
        ip = 1e3 * statistics.median(inproc[m])
        sec.rows.append({"module": m, "process_ms": w, "added_ms": w - base_ms, "in_process_ms": ip,
                         "process_ms_all": [1e3 * v for v in wall[m]],
                         "in_process_ms_all": [1e3 * v for v in inproc[m]]})
        body.append((f"numpy + {m}", f"{w:.1f}", f"{w - base_ms:+.1f}", f"{ip:.1f}"))
    sec.rows.insert(0, {"module": "numpy", "process_ms": base_ms, "process_ms_all": [1e3 * v for v in base]})
    sec.method = (
        f"Fresh interpreters, {reps} alternated repetitions, medians. **added ms = median wall "
        "time of `python -c 'import numpy, X'` - median of `python -c 'import numpy'`**; "
        "*in process* = `import X` timed inside a child that already imported numpy. "
        "Children use Python's bytecode cache (written by a warm-up import), as a normal "
        "install does."
    )
    sec.tables.append(md_table(("process", "wall ms (median)", "added ms", "import X alone, ms"),
                               body, right=(1, 2, 3)))
    sec.notes.append(f"`import torch_shmem` imports torch: {torch_loaded}")
    ts_row = sec.rows[1]
    sec.targets.append(Target("import torch_shmem (NumPy-only)", "adds well under 50 ms; no torch",
                              f"+{ts_row['added_ms']:.1f} ms process, {ts_row['in_process_ms']:.1f} ms "
                              f"in process; torch imported: {torch_loaded}",
                              ts_row["in_process_ms"] < 50 and not torch_loaded))
    torch_rows(cfg, sec, progress)
    return sec


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--only", "import", *sys.argv[1:]]))
