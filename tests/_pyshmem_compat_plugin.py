"""pytest plugin of the pyshmem compatibility run (see tests/pyshmem_suite.py).

Loaded with ``-p _pyshmem_compat_plugin`` by the pytest process that runs
pyshmem's own test files; its configuration (the shim directory, the
exclusions and where to write the report) is the JSON file named by
$TORCH_SHMEM_COMPAT_CONFIG. It

- refuses to run unless ``import pyshmem`` gives the shim that re-exports
  torch_shmem (an installed pyshmem must not shadow it);
- marks each excluded test as skipped with "excluded: <reason>", and fails
  the run when an exclusion names no test (a stale or misspelt entry);
- writes every test's outcome to the report file for the runner to count.
"""

from __future__ import annotations

import json
import os

import pytest

_CONFIG = json.loads(open(os.environ["TORCH_SHMEM_COMPAT_CONFIG"], encoding="utf-8").read())
EXCLUDED_PREFIX = "excluded: "
_outcomes: dict[str, dict[str, str]] = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu: pyshmem CPU API test")
    config.addinivalue_line("markers", "gpu: pyshmem GPU API test")
    import pyshmem
    import torch_shmem

    where = os.path.dirname(os.path.realpath(pyshmem.__file__))
    shim = os.path.realpath(_CONFIG["shim"])
    if where != shim or pyshmem.SharedMemory is not torch_shmem.SharedMemory:
        raise pytest.UsageError(
            f"'import pyshmem' gave {pyshmem.__file__}, not the torch_shmem shim in "
            f"{_CONFIG['shim']}: an installed pyshmem shadows it"
        )


def pytest_collection_modifyitems(config, items):
    excluded: dict[str, dict[str, str]] = _CONFIG["excluded"]
    used = set()
    for item in items:
        reasons = excluded.get(item.path.name, {})
        test = getattr(item, "originalname", None) or item.name
        if test in reasons:
            used.add((item.path.name, test))
            item.add_marker(pytest.mark.skip(reason=EXCLUDED_PREFIX + reasons[test]))
    files = {item.path.name for item in items}
    stale = sorted(f"{f}::{t}" for f, tests in excluded.items() if f in files
                   for t in tests if (f, t) not in used)
    if stale:
        raise pytest.UsageError("exclusions that name no collected test: " + ", ".join(stale))


def pytest_runtest_logreport(report):
    entry = _outcomes.setdefault(report.nodeid, {"outcome": "passed"})
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        kind = "excluded" if reason.startswith(EXCLUDED_PREFIX) else "skipped"
        entry.update(outcome=kind, reason=reason.removeprefix(EXCLUDED_PREFIX))
    elif report.failed:
        lines = str(report.longrepr).splitlines()
        entry.update(outcome="failed" if report.when == "call" else "error",
                     reason=f"{report.when}: {lines[-1] if lines else ''}")


def pytest_sessionfinish(session, exitstatus):
    with open(_CONFIG["report"], "w", encoding="utf-8") as f:
        json.dump({"exitstatus": int(exitstatus), "tests": _outcomes}, f, indent=1)
