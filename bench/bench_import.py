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

TITLE = "6. Import time (NumPy-only process)"
BASE = "numpy"
TIMED = ("import numpy, time; t = time.perf_counter(); import {mod}; "
         "print(time.perf_counter() - t)")


# the children may use (and write) the bytecode cache
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def _wall(code: str) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=ENV)
    return time.perf_counter() - t


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
    return sec


if __name__ == "__main__":
    from .__main__ import main

    sys.exit(main(["--only", "import", *sys.argv[1:]]))
