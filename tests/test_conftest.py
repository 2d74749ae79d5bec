"""The suite's own rules: a test without a placement marker fails collection."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cpu


def _run_pytest(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(body)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cpu", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )


def test_an_unmarked_test_fails_collection_by_name(tmp_path):
    out = _run_pytest(
        tmp_path,
        "import pytest\n\n"
        "@pytest.mark.cpu\n"
        "def test_marked():\n    assert True\n\n"
        "def test_forgotten():\n    assert True\n",
    )
    assert out.returncode == pytest.ExitCode.USAGE_ERROR, out.stdout + out.stderr
    text = out.stdout + out.stderr
    assert "test_sample.py::test_forgotten" in text
    assert "test_marked" not in text.split("marker")[-1]


def test_marked_tests_run(tmp_path):
    out = _run_pytest(
        tmp_path,
        "import pytest\n\n"
        "@pytest.mark.cpu\n"
        "def test_one():\n    assert True\n\n"
        "@pytest.mark.slow\n"
        "def test_slow():\n    assert True\n",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed, 1 deselected" in out.stdout
