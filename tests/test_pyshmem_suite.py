"""pyshmem 1.4.0's own CPU test suite passes against torch_shmem (tests/pyshmem_suite.py).

The first test runs the reference suite (about 20 s) and skips, saying
why, when the sdist can be neither found nor downloaded. The others check
the job's own guards without the sdist: the shim wins over an installed
pyshmem, a wrong sdist is refused, offline is a skip and not a failure.
"""

import json
import os
import subprocess
import sys
import tarfile

import pytest

import pyshmem_suite

pytestmark = pytest.mark.cpu


def test_pyshmem_cpu_suite_passes_against_torch_shmem():
    result = pyshmem_suite.run("cpu")
    if result.status == "unavailable":
        pytest.skip(result.message)
    print(result.summary())
    assert result.status == "passed", result.output + "\n" + result.summary()
    excluded = result.of("excluded")
    # only pyshmem's own platform conditions (Windows-only tests) skip otherwise
    skipped = result.of("skipped")
    assert all("Win" in result.tests[n]["reason"] for n in skipped), result.summary()
    assert len(result.of("passed")) == result.total - len(excluded) - len(skipped)
    # the exclusions that are not about pyshmem's internals stay few
    internal = pyshmem_suite.INTERNALS
    other = [n for n in excluded if not result.tests[n]["reason"].startswith(internal)]
    assert len(other) <= 7, other
    assert len(result.of("passed")) >= 99, result.summary()  # 100 with a private /dev/shm


def _import_pyshmem(env):
    code = ("import pyshmem, torch_shmem; "
            "print(pyshmem.__file__, pyshmem.SharedMemory is torch_shmem.SharedMemory)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_shim_comes_before_an_installed_pyshmem(tmp_path):
    # A pyshmem package later on the path (as a venv's site-packages would be) loses.
    other = tmp_path / "site"
    (other / "pyshmem").mkdir(parents=True)
    (other / "pyshmem" / "__init__.py").write_text("raise ImportError('the real pyshmem')\n")
    shim = pyshmem_suite.write_shim(tmp_path / "src")
    env = pyshmem_suite.child_env(tmp_path / "src", [other])
    path, same = _import_pyshmem(env)
    assert os.path.dirname(path) == str(shim) and same == "True"


def test_plugin_refuses_a_shadowed_shim(tmp_path):
    # The plugin checks what `import pyshmem` gives: here the shim is not first.
    shim = pyshmem_suite.write_shim(tmp_path / "src")
    shadow = tmp_path / "shadow"
    (shadow / "pyshmem").mkdir(parents=True)
    (shadow / "pyshmem" / "__init__.py").write_text("class SharedMemory: pass\n")
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    (tmp_path / "config.json").write_text(json.dumps(
        {"shim": str(shim), "excluded": {}, "report": str(tmp_path / "report.json")}))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = pyshmem_suite.child_env(shadow, [pyshmem_suite.PLUGIN.parent])
    env["TORCH_SHMEM_COMPAT_CONFIG"] = str(tmp_path / "config.json")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c",
         str(tmp_path / "pytest.ini"), "-p", pyshmem_suite.PLUGIN.stem,
         str(tmp_path / "test_x.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 4, out.stdout + out.stderr  # pytest's usage error
    assert "shadows it" in out.stdout + out.stderr
    assert not (tmp_path / "report.json").exists()


def test_sdist_with_another_hash_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / pyshmem_suite.SDIST_NAME
    with tarfile.open(fake, "w:gz"):
        pass
    monkeypatch.setenv("TORCH_SHMEM_PYSHMEM_SDIST", str(fake))
    with pytest.raises(ValueError, match="does not match the pinned"):
        pyshmem_suite.fetch_sdist()


def test_offline_is_unavailable_not_a_failure(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCH_SHMEM_PYSHMEM_SDIST", raising=False)
    monkeypatch.setattr(pyshmem_suite, "REPO", tmp_path)  # no bench/wheels copy
    offline_pip = [sys.executable, "-c", "import sys; sys.exit('ERROR: network is unreachable')"]
    with pytest.raises(pyshmem_suite.Unavailable, match="network is unreachable"):
        pyshmem_suite.fetch_sdist(cache=tmp_path / "cache", pip=offline_pip)
    assert not (tmp_path / "cache" / pyshmem_suite.SDIST_NAME).exists()
