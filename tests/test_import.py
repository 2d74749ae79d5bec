"""The NumPy path never imports torch; the module surface pyshmem programs rely on."""

import dataclasses
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

import _workers
import torch_shmem

pytestmark = pytest.mark.cpu


def _run_ok(code: str) -> None:
    """Run ``code`` in a fresh interpreter, which must print ``ok`` and exit 0."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_numpy_path_does_not_import_torch(name):
    code = (
        "import sys, numpy as np, torch_shmem\n"
        f"s = torch_shmem.create({name!r}, shape=(4,), dtype='float32')\n"
        "s.write(np.arange(4, dtype=np.float32))\n"
        "assert s.read().tolist() == [0, 1, 2, 3]\n"
        "s.read_new(timeout=0.01) if False else None\n"
        "s.unlink()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert not any(m.startswith('torch.') for m in sys.modules)\n"
        "print('ok')\n"
    )
    _run_ok(code)


def test_checksum_helper_detects_a_mixed_frame():
    # guards the torn-read tests: a frame stitched from two writes must fail
    a, b = _workers.make_frame(3, 64), _workers.make_frame(4, 64)
    assert _workers.frame_seq(a) == 3 and _workers.frame_seq(b) == 4
    mixed = np.concatenate([a[:32], b[32:]])
    assert _workers.frame_seq(mixed) == -1


def test_version_like_pyshmem():
    # pyshmem 1.4 exports importlib.metadata.version (and PackageNotFoundError)
    assert torch_shmem.version() == torch_shmem.version("torch_shmem") == torch_shmem.__version__
    assert torch_shmem.version("numpy") == importlib.metadata.version("numpy")
    assert torch_shmem.version(distribution_name="numpy") == importlib.metadata.version("numpy")
    assert torch_shmem.PackageNotFoundError is importlib.metadata.PackageNotFoundError
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        torch_shmem.version("no-such-distribution-" + uuid.uuid4().hex)
    assert "version" in torch_shmem.__all__


def test_readme_names_the_publication_fields():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    fields = [f.name for f in dataclasses.fields(torch_shmem.Publication)]
    listed = re.search(r"read_after_publication`\s*\(([^)]*)\)", readme)
    assert listed, "README no longer lists the Publication fields"
    assert re.findall(r"`(\w+)`", listed.group(1)) == fields


@pytest.mark.parametrize(
    "hidden, why",
    [("torch", "torch is not installed"), ("torch_shmem._C", "built without torch")],
)
def test_gpu_stream_without_torch_is_a_clear_runtime_error(name, hidden, why):
    # None in sys.modules makes the module absent to find_spec and import: the
    # NumPy-only install (no torch) and a build made without torch (no _C).
    if hidden != "torch" and importlib.util.find_spec("torch") is None:
        pytest.skip("a build without torch_shmem._C beside an installed torch needs torch")
    code = (
        "import sys, re\n"
        f"sys.modules[{hidden!r}] = None\n"
        "import torch_shmem\n"
        f"name = {name!r}\n"
        "for call in (lambda: torch_shmem.create(name, shape=(2,), gpu_device='cuda:0'),\n"
        "             lambda: torch_shmem.open(name, gpu_device='cuda:0')):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as exc:\n"
        "        msg = str(exc)\n"
        "        assert 'GPU streams' in msg and repr(name) in msg, msg\n"
        f"        assert {why!r} in msg, msg\n"
        "    else:\n"
        "        raise AssertionError('no error')\n"
        "assert torch_shmem.gpu_available() is False\n"
        "print('ok')\n"
    )
    _run_ok(code)
