"""Runs examples/serving_pipeline.py end to end on the CPU (three processes)."""

import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import torch_shmem

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "serving_pipeline.py"
TIMEOUT = 180  # s: three spawned torch imports plus a torch.compile (~15 s on 2 cores)


@pytest.mark.cpu
def test_serving_pipeline_verifies_every_output():
    pytest.importorskip("torch")
    prefix = f"t-serve-{uuid.uuid4().hex[:12]}"
    names = [f"{prefix}-{suffix}" for suffix in ("req", "resp", "ack")]
    try:
        try:
            proc = subprocess.run(
                [sys.executable, str(EXAMPLE), "--seconds", "1", "--device", "cpu",
                 "--batch", "4", "--features", "32", "--name", prefix],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"the example did not finish within {TIMEOUT} s\n"
                        f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}")
        out = proc.stdout
        detail = f"exit code {proc.returncode}\nstdout:\n{out}\nstderr:\n{proc.stderr}"
        assert proc.returncode == 0, detail
        m = re.search(r"verified\s+(\d+)/(\d+) outputs match the eager reference: all outputs verified", out)
        assert m is not None, detail
        assert m.group(1) == m.group(2) and int(m.group(1)) > 0, detail
        assert re.search(r"timed\s+[1-9]\d* requests", out), detail
        assert re.search(r"latency us\s+p50\s+[\d.]+\s+p90\s+[\d.]+\s+p99\s+[\d.]+", out), detail
        assert "graph breaks 0" in out, detail
        assert "result       PASS" in out, detail
        # The example unlinks the streams it created on the way out.
        for n in names:
            with pytest.raises(FileNotFoundError):
                torch_shmem.open(n)
    finally:
        for n in names:  # in case the example was killed before its cleanup
            torch_shmem.unlink(n)
