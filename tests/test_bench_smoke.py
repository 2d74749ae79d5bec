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
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("io", "mvm", "pingpong", "fanout", "idle", "paced", "fileno", "import", "ring",
            "bridge")
HAVE_ZMQ = importlib.util.find_spec("zmq") is not None


@pytest.mark.cpu
def test_bench_smoke(tmp_path):
    out = tmp_path / "results" / "smoke.json"  # directories are created as needed
    report = tmp_path / "results" / "smoke.md"
    tag = f"t{os.getpid()}{uuid.uuid4().hex[:4]}"  # this run's iceoryx2 prefix and root
    env = dict(os.environ, TORCH_SHMEM_BENCH_IOX2=tag)
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-gpu", "--no-progress",
         "--json", str(out), "--report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    assert done.returncode == 0, f"python -m bench --smoke failed:\n{done.stdout}\n{done.stderr}"
    # iceoryx2 (when installed) leaves nothing behind and prints no stray lines
    left = [e for e in os.listdir("/dev/shm") if e.startswith(f"iox2b{tag}_")]
    assert left == [], left
    assert not os.path.exists(f"/tmp/iox2b{tag}")
    assert "No config file" not in done.stdout + done.stderr, done.stderr
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
