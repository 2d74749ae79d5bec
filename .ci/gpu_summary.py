"""summary.txt for .ci/gpu: one screen that says what ran on the GPU machine and how it went.

    python3 .ci/gpu_summary.py SCRATCH_DIR        # prints the summary
    python3 .ci/gpu_summary.py --done PYTEST_LOG  # the tests a timed-out session reached

Reads what .ci/gpu leaves in SCRATCH_DIR, tolerating anything missing or cut short (a step
killed at its limit leaves no JUnit XML or bench JSON):

- ``meta.txt``: ``key=value`` lines (mode, budget, start, ...) and ``warning=...`` lines;
- ``steps.tsv``: one line per step: name, rc, seconds, limit, status, note, command;
- ``<step>.xml`` (pytest JUnit), ``<step>.log`` (pytest -v output, the fallback for counts
  and the test that was running when a step was killed), ``<step>.json`` (python -m bench);
- ``smoke.verdict`` (.ci/gpu_smoke.py) and ``fact:`` lines in ``env.log``;
- ``running.txt``: the step in progress, while one is (a summary written then says so).

Standard library only; never imports torch or torch_shmem.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import xml.etree.ElementTree as ET
from collections import Counter

MAX_FAILED = 8  # failing test names listed per step
OUTCOME = re.compile(r"^(\S+::\S+?)(?:\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS))?(?:\s|$)")

# Row labels of the bench sections (bench/bench_io.py, bench_pingpong.py, bench_mvm.py).
IO_DEV = "torch_shmem GPU device write + read()"
IO_HOST = "torch_shmem GPU host write + read()"
IO_PINNED = "torch_shmem GPU pinned-host write + read()"
IO_D2D = "torch D2D copy x2"
IO_MIRROR_TRITON = "mirror_copy D2H (pinned), Triton kernel"
IO_MIRROR_CE = "copy_ D2H (pinned), copy engine"
PP_TS = "torch_shmem GPU stream + CPU ack"
PP_TORCH = "torch.multiprocessing CUDA + busy-poll"
MVM_TRITON = "torch_shmem device-resident, Triton GEMV"
MVM_MV = "torch_shmem device-resident, torch.mv"
MVM_PRIVATE = "torch.mv, private CUDA A, x made on GPU"


def read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def kv(path: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in read(path).splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def short(text: str, n: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# ---------------------------------------------------------------- pytest
def junit(path: str) -> dict | None:
    """Counts, failures and skip reasons from a JUnit XML file; None if absent or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = Counter()
    failed, skips = [], Counter()
    for case in root.iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        test = f"{cls.replace('.', '/')}.py::{name}" if cls else name
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            tag = "failure" if "failure" in kinds else "error"
            counts["failed" if tag == "failure" else "error"] += 1
            text_lines = (kinds[tag].text or "").strip().splitlines()
            msg = kinds[tag].get("message") or (text_lines[-1] if text_lines else "")
            failed.append(f"{'FAILED' if tag == 'failure' else 'ERROR'} {test}: {short(msg, 90)}")
        elif "skipped" in kinds:
            counts["skipped"] += 1
            msg = kinds["skipped"].get("message", "")
            if msg == "collection skipped":  # a module-level skip: the reason is in the text
                m = re.search(r"Skipped: (.*?)['\"]\)\s*$", kinds["skipped"].text or "")
                msg = f"{test} skipped at collection: {m.group(1) if m else '?'}"
            skips[short(msg, 100)] += 1
        else:
            counts["passed"] += 1
    return {"counts": counts, "failed": failed, "skips": skips, "source": "junit"}


def from_log(path: str) -> dict:
    """Counts from ``pytest -v`` lines; the last test without an outcome was running when it stopped."""
    counts, failed, running, seen = Counter(), [], None, []
    for line in read(path).splitlines():
        m = OUTCOME.match(line)
        if not m:
            continue
        test, outcome = m.groups()
        if test not in seen:
            seen.append(test)
        if outcome is None:
            running = test
            continue
        running = None
        key = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
               "XFAIL": "skipped", "XPASS": "passed"}[outcome]
        counts[key] += 1
        if key in ("failed", "error"):
            failed.append(f"{outcome} {test}")
    return {"counts": counts, "failed": failed, "skips": Counter(), "running": running, "seen": seen,
            "source": "log"}


def timeout_fired(log_text: str) -> bool:
    """Whether pytest-timeout stopped the session (its banner is in the log)."""
    return "+++ Timeout +++" in log_text


def markers(command: str) -> str:
    """`` [-m EXPR]`` from a recorded pytest command line (shell-quoted words), or ''."""
    try:
        words = shlex.split(command)
    except ValueError:
        return ""
    for i, w in enumerate(words[:-1]):
        if w == "-m" and words[i + 1] != "pytest":
            return f" [-m {words[i + 1]!r}]"
    return ""


def pytest_result(scratch: str, name: str) -> tuple[str, list[str]]:
    log = os.path.join(scratch, f"{name}.log")
    res = junit(os.path.join(scratch, f"{name}.xml"))
    logres = from_log(log)
    note = ""
    if res is None:
        res = logres
        note = " (counted from the log: no JUnit XML)"
    c = res["counts"]
    text = (f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
            f"{c['skipped']} skipped{note}")
    lines = []
    log_text = read(log)
    if logres.get("running") and (note or timeout_fired(log_text)):
        lines.append(f"stopped while running {logres['running']}")
    if timeout_fired(log_text):
        lines.append("pytest-timeout fired (stack dump in the log)")
    if not sum(c.values()) and "no tests ran" in log_text:
        lines.append("no test ran")
    lines += res["failed"][:MAX_FAILED]
    if len(res["failed"]) > MAX_FAILED:
        lines.append(f"... and {len(res['failed']) - MAX_FAILED} more (see {name}.log)")
    for reason, k in res["skips"].most_common(2):
        lines.append(f"skipped x{k}: {reason}")
    return text, lines


# ---------------------------------------------------------------- bench
def bench_json(scratch: str, name: str) -> dict | None:
    try:
        with open(os.path.join(scratch, f"{name}.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fnum(v: float | None, unit: str = "", digits: int = 0) -> str:
    if v is None or v != v:
        return "n/a"
    return f"{v:,.{digits}f}{unit}"


def rows_by(sec: dict, device: str | None = "cuda") -> dict:
    return {(r.get("n", r.get("size")), r["impl"]): r for r in sec.get("rows", [])
            if device is None or r.get("device", device) == device}


def skip_notes(sec: dict) -> list[str]:
    return [short(n, 100) for n in sec.get("notes", []) if "skipped" in n and "pyshmem" not in n
            and "iceoryx2" not in n][:2]


def io_headline(sec: dict) -> list[str]:
    by = rows_by(sec)
    sizes = sorted({n for n, _ in by})
    if not sizes:
        return ["no GPU rows"] + skip_notes(sec)
    small, big = sizes[0], sizes[-1]
    out = []
    r, base = by.get((small, IO_DEV)), by.get((small, IO_D2D))
    if r:
        out.append(f"GPU round trip {small}x{small} (device write + read()): {fnum(1e6 / r['hz'], ' µs', 1)}"
                   f" ({fnum(r['hz'], ' Hz')}; torch D2D copy x2: {fnum(1e6 / base['hz'], ' µs', 1) if base else 'n/a'})")
    elif base:
        out.append(f"torch D2D copy x2 {small}x{small}: {fnum(1e6 / base['hz'], ' µs', 1)} "
                   "(no torch_shmem GPU rows)")
    parts = []
    for label, short_label in ((IO_DEV, "device write"), (IO_D2D, "torch D2D x2"), (IO_HOST, "host write"),
                               (IO_PINNED, "pinned write"), (IO_MIRROR_TRITON, "mirror Triton"),
                               (IO_MIRROR_CE, "mirror copy engine")):
        r = by.get((big, label))
        if r:
            parts.append(f"{short_label} {fnum(r['gbps'], '', 0)}")
    if parts:
        out.append(f"{big}x{big} GB/s: " + ", ".join(parts))
    if not by.get((small, IO_DEV)):
        out += skip_notes(sec)
    return out


def pingpong_headline(sec: dict) -> list[str]:
    by = {r["impl"]: r for r in sec.get("rows", []) if r["impl"] in (PP_TS, PP_TORCH)}
    out = []
    for label, what in ((PP_TS, "GPU handoff (torch_shmem GPU stream + CPU ack)"),
                        (PP_TORCH, "torch.multiprocessing CUDA + busy-poll")):
        r = by.get(label)
        if r:
            out.append(f"{what}: p50 {fnum(r.get('p50_us'), ' µs', 1)}, p99 {fnum(r.get('p99_us'), ' µs', 1)},"
                       f" {fnum(r.get('rt_per_s'), ' round trips/s')}")
    if PP_TS not in by:
        out += skip_notes(sec) or ["no torch_shmem GPU handoff row"]
    return out


def mvm_headline(sec: dict) -> list[str]:
    by = rows_by(sec)
    sizes = sorted({n for n, _ in by})
    if not sizes:
        return ["no GPU rows"] + skip_notes(sec)
    n = sizes[-1]
    peak = (sec.get("extra") or {}).get("peak_gbps")
    parts = []
    for label, what in ((MVM_TRITON, "Triton GEMV"), (MVM_MV, "torch.mv"), (MVM_PRIVATE, "private torch.mv")):
        r = by.get((n, label))
        if r:
            pct = f" = {r['matrix_gbps'] / peak:.0%} of {peak:,.0f}" if peak else ""
            parts.append(f"{what} {fnum(r['matrix_gbps'])} GB/s{pct} ({fnum(r['hz'], ' Hz')})")
    out = [f"device-resident MVM n={n}: " + "; ".join(parts)] if parts else []
    if not by.get((n, MVM_TRITON)):
        out += skip_notes(sec)
    return out


HEADLINES = {"io": io_headline, "pingpong": pingpong_headline, "mvm": mvm_headline}


def bench_result(scratch: str, name: str) -> tuple[str, list[str]]:
    data = bench_json(scratch, name)
    if data is None:
        tail = [ln for ln in read(os.path.join(scratch, f"{name}.log")).splitlines() if ln.strip()][-1:]
        return "no bench JSON", [f"log ends: {short(t)}" for t in tail]
    lines = []
    for key, sec in (data.get("sections") or {}).items():
        fn = HEADLINES.get(key)
        if fn is not None:
            try:
                lines += fn(sec)
            except Exception as exc:  # a changed JSON layout must not lose the rest of the summary
                lines.append(f"(headline unreadable: {type(exc).__name__}: {exc})")
        for t in sec.get("targets", []):
            if t.get("met") is not None:
                lines.append(f"target {t['name']} ({t['requirement']}): {t['measured']} -> "
                             f"{'met' if t['met'] else 'NOT met'}")
    return f"{data.get('seconds', '?')} s measured", lines


# ---------------------------------------------------------------- env / smoke
def env_lines(scratch: str) -> list[str]:
    facts = {}
    for line in read(os.path.join(scratch, "env.log")).splitlines():
        if line.startswith("fact: "):
            key, _, value = line[6:].partition("=")
            facts[key.strip()] = value.strip()
    if not facts:
        return []
    get = lambda k: facts.get(k, "?")  # noqa: E731
    return [f"machine: {get('gpu')}; driver {get('driver')}; nvcc {get('nvcc')}; "
            f"CUDA_HOME {get('cuda_home')} (/usr/local/cuda {get('usr_local_cuda')}); "
            f"/dev/shm {get('dev_shm')}; {get('cores')} cores",
            f"software: Python {get('python')}, torch {get('torch')}, triton {get('triton')}, "
            f"numpy {get('numpy')}; kernel {get('kernel')}; commit {get('commit')}"]


def smoke_result(scratch: str) -> tuple[str, list[str]]:
    v = {k: vs[-1] for k, vs in kv(os.path.join(scratch, "smoke.verdict")).items()}
    if not v:
        return "no verdict", []
    return f"same process: {short(v.get('same_process', '?'), 120)}", [f"IPC: {short(v.get('ipc', '?'), 200)}"]


# ---------------------------------------------------------------- main
def main(scratch: str) -> str:
    meta = kv(os.path.join(scratch, "meta.txt"))
    m = {k: v[-1] for k, v in meta.items()}
    out = [f"GPU check (.ci/gpu), {m.get('mode', '?')}: started {m.get('started', '?')}, "
           f"budget {m.get('budget', '?')} s, python {m.get('python', '?')}"]
    out += env_lines(scratch)
    out += [f"WARNING: {w}" for w in meta.get("warning", [])]
    out += [f"note: {w}" for w in meta.get("note", [])]
    out.append(f"{'step':<18} {'rc':>4} {'s':>5} {'limit':>6}  result")
    for line in read(os.path.join(scratch, "steps.tsv")).splitlines():
        f = line.split("\t")
        if len(f) < 6:
            continue
        name, rc, secs, limit, status, note = f[:6]
        kind = f[7] if len(f) > 7 else ""
        if status in ("skipped", "omitted"):
            out.append(f"{name:<18} {'-':>4} {'-':>5} {'-':>6}  {status}: {note}")
            continue
        head, extra = status, []
        try:
            if kind == "pytest":
                head, extra = pytest_result(scratch, name)
                head += markers(f[6] if len(f) > 6 else "")
            elif kind == "bench":
                head, extra = bench_result(scratch, name)
            elif kind == "smoke":
                head, extra = smoke_result(scratch)
        except Exception as exc:  # never lose the summary to a parsing bug
            extra = [f"(summary of this step failed: {type(exc).__name__}: {exc})"]
        flag = "" if status == "ok" else f"{status.upper()}: "
        if note:
            extra.insert(0, note)
        out.append(f"{name:<18} {rc:>4} {secs:>5} {limit:>6}  {flag}{head}")
        out += [f"{'':<20}{e}" for e in extra]
    running = read(os.path.join(scratch, "running.txt")).strip()
    if running:
        out.append(f"IN PROGRESS when this summary was written: {running} (the check was killed, or is still running)")
    if "total" in m:
        out.append(f"total: {m['total']} s of wall time (budget {m.get('budget', '?')} s); {m.get('verdict', '')}")
    return "\n".join(out) + "\n"


def done_tests(log: str) -> int:
    """``--done LOG``: when pytest-timeout stopped the session of LOG, print the node ids of
    the tests it reached (finished, or hung), one a line, and return 0; else return 1."""
    res = from_log(log)
    if not (timeout_fired(read(log)) and res["running"]):
        return 1
    sys.stdout.write("".join(f"{t}\n" for t in res["seen"]))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--done":
        sys.exit(done_tests(sys.argv[2]))
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} SCRATCH_DIR | --done PYTEST_LOG")
    sys.stdout.write(main(sys.argv[1]))
