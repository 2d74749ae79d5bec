# Two entry points for a fresh machine (Linux, Python >= 3.10):
#   make demo   set up .venv, build, run the two-process demo
#   make test   set up .venv, build, run the CPU test suite
PYTHON ?= python3
VENV ?= .venv
# No GPU is needed to build the CUDA half: name the architectures explicitly.
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export CUDA_HOME ?= /usr/local/cuda

SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: demo test compat bench gpu-wheels clean

$(VENV)/.built: $(SOURCES)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch numpy ninja pytest setuptools wheel triton hypothesis pyzmq
	$(VENV)/bin/pip install -q --no-build-isolation -e .
	touch $@

demo: $(VENV)/.built
	$(VENV)/bin/python examples/demo.py

test: $(VENV)/.built
	$(VENV)/bin/python -m pytest -m cpu -q

# pyshmem 1.4.0's own test suite against torch_shmem (tests/pyshmem_suite.py):
# the CPU part (also run by `make test`), then the GPU part (skips without CUDA).
compat: $(VENV)/.built
	$(VENV)/bin/python -m tests.pyshmem_suite
	$(VENV)/bin/python -m tests.pyshmem_suite --gpu

# The peers the benchmarks compare with, and matplotlib for the plots.
$(VENV)/.bench: $(VENV)/.built
	$(VENV)/bin/pip install -q "pyshmem==1.4.0" iceoryx2 matplotlib
	touch $@

bench: $(VENV)/.bench
	$(VENV)/bin/python -m bench --quick --plots bench/results/plots \
		--report bench/results/report.md --json bench/results/results.json

# Wheels for .ci/gpu on a machine without a package registry (carried there
# with the working tree; .ci/gpu installs them with --no-deps --no-index):
# pyshmem 1.4.0, and for that machine's Python (3.12, manylinux x86_64) pyzmq
# (the bridge's GPU test) and pytest-timeout (per-test limits); and pyshmem's
# hash-pinned sdist, whose tests `python -m tests.pyshmem_suite --gpu` runs
# (found there; never installed).
GPU_PY := --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64
gpu-wheels: $(VENV)/.built
	$(VENV)/bin/pip download -q --no-deps -d bench/wheels "pyshmem==1.4.0"
	$(VENV)/bin/pip download -q --no-deps $(GPU_PY) -d bench/wheels pyzmq pytest-timeout
	$(VENV)/bin/python -m tests.pyshmem_suite --fetch-only --dest bench/wheels

clean:
	rm -rf build $(VENV) torch_shmem/*.so *.egg-info
