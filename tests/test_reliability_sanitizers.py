"""The C++ core under AddressSanitizer and UndefinedBehaviorSanitizer.

Builds tests/cpp/test_core.cpp with csrc/core/*.cpp and -fsanitize=address,undefined
(-fno-sanitize-recover=all: any report is fatal) and runs it: header fuzzing
with every byte of the header page randomized (checksum fixed up half of the
time so the deeper checks run) and the opened handle driven through every
core operation, crafted headers, threads, a writer SIGKILLed mid-write, and
the slot protocol. Skipped with the reason when g++ or the sanitizer runtimes
are missing. The short form (2,000 fuzz iterations) runs in CI; the full one:

    python -m pytest -m slow tests/test_reliability_sanitizers.py -s
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "cpp", "test_core.cpp")
FLAGS = ["-std=c++17", "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-omit-frame-pointer", "-Wall"]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: the sanitizer build needs it")
    sources = [DRIVER] + sorted(glob.glob(os.path.join(ROOT, "csrc", "core", "*.cpp")))
    out = tmp_path_factory.mktemp("sanitizers")
    probe = out / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    done = subprocess.run([gxx, "-fsanitize=address,undefined", str(probe), "-o",
                           str(out / "probe")], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("this toolchain cannot link -fsanitize=address,undefined: "
                    + done.stderr.strip()[-300:])
    digest = hashlib.sha256(b"".join(open(p, "rb").read() for p in sources)).hexdigest()[:12]
    exe = out / f"test_core-{digest}"
    done = subprocess.run([gxx, *FLAGS, "-I", os.path.join(ROOT, "csrc"), *sources, "-lpthread",
                           "-o", str(exe)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return str(exe)


def run(exe, iterations, seed):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    done = subprocess.run([exe, str(iterations), str(seed)], capture_output=True, text=True,
                          timeout=1200, env=env)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    assert "ok:" in done.stdout
    assert "ERROR: AddressSanitizer" not in done.stderr and "runtime error" not in done.stderr
    return done.stdout


@pytest.mark.cpu
def test_core_under_asan_ubsan_short(driver, seed):
    run(driver, 2000, seed)


@pytest.mark.slow
def test_core_under_asan_ubsan_full(driver, seed):
    run(driver, 50_000, seed)
