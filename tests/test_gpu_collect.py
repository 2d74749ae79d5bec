"""The GPU test modules import and collect on a machine without a GPU.

tests/test_gpu.py skips itself at import without a CUDA device, so an import error,
a misspelt fixture or a bad parametrization would surface only on a GPU machine,
which is lent rarely and briefly. Here they are collected (not run) with
TORCH_SHMEM_COLLECT_GPU_TESTS=1.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu

pytest.importorskip("torch")

TESTS = Path(__file__).resolve().parent


def test_gpu_modules_collect_without_a_gpu():
    env = dict(os.environ, TORCH_SHMEM_COLLECT_GPU_TESTS="1")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "gpu",
         str(TESTS / "test_gpu.py"), str(TESTS / "test_kernels.py")],
        capture_output=True, text=True, timeout=300, env=env, cwd=TESTS.parent,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    in_gpu = [i for i in ids if i.startswith("tests/test_gpu.py::")]
    names = {re.sub(r"\[.*\]$", "", i.split("::")[1]) for i in in_gpu}
    # every test function of test_gpu.py is collected (none lost to a skip or an error)
    with open(TESTS / "test_gpu.py") as f:
        defined = set(re.findall(r"^def (test_\w+)\(", f.read(), flags=re.M))
    assert names == defined, (sorted(defined - names), out[-2000:])
    assert any(i.startswith("tests/test_kernels.py::") for i in ids), out[-2000:]
