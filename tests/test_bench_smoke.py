"""The benchmark suite still runs: ``python -m bench --smoke`` end to end (not a timing test).

Tiny sizes and durations, every section and every installed peer; the numbers are
meaningless and nothing here asserts on them. Performance is measured by ``python -m bench``
(docs/benchmarks.md), never in timed unit tests.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("io", "mvm", "pingpong", "fanout", "idle", "import", "bridge")
HAVE_ZMQ = importlib.util.find_spec("zmq") is not None


@pytest.mark.cpu
def test_bench_smoke(tmp_path):
    out = tmp_path / "smoke.json"
    report = tmp_path / "smoke.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-gpu", "--no-progress",
         "--json", str(out), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"python -m bench --smoke failed:\n{done.stdout}\n{done.stderr}"
    data = json.loads(out.read_text())
    assert set(data["sections"]) == set(SECTIONS)
    for key in SECTIONS:
        if key == "bridge" and not HAVE_ZMQ:  # skipped with a note without pyzmq
            assert any("pyzmq" in n for n in data["sections"][key]["notes"])
            continue
        assert data["sections"][key]["rows"], f"section {key} produced no rows"
    assert data["machine"]["torch_imported"] is False, "the CPU benchmarks imported torch"
    text = report.read_text()
    assert "## Targets" in text and "| cpu |" in text
