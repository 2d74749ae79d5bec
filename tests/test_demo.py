"""Runs examples/demo.py end to end (producer and consumer processes)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import torch_shmem

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.py"


@pytest.mark.cpu
def test_demo_runs_and_verifies_every_frame(name):
    try:
        proc = subprocess.run(
            [sys.executable, str(DEMO), "--seconds", "1", "--shape", "64", "64", "--name", name],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"demo did not finish within 60 s\nstdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")
    out = proc.stdout
    assert proc.returncode == 0, f"exit code {proc.returncode}\nstdout:\n{out}\nstderr:\n{proc.stderr}"
    m = re.search(r"checksum OK: (\d+)/(\d+) frames", out)
    assert m is not None, out
    assert m.group(1) == m.group(2) and int(m.group(1)) > 0, out
    missed = int(re.search(r"missed\s+(\d+) frames", out).group(1))
    # skipped frames are expected of a latest-value stream, and the demo says so
    assert ("missed frames are normal here" in out) == (missed > 0), out
    # The demo unlinks its stream on the way out.
    with pytest.raises(FileNotFoundError):
        torch_shmem.open(name)
