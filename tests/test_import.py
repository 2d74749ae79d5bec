"""The NumPy path never imports torch; the module surface pyshmem programs rely on."""

import dataclasses
import importlib.metadata
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


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
