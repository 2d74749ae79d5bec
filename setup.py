"""Build script for torch_shmem.

The C++ core (csrc/core) is compiled once, into a static library linked
into both native modules:

* ``torch_shmem._core``: the core plus its CPython/NumPy binding
  (csrc/python). It links neither torch nor CUDA, so ``import
  torch_shmem`` stays cheap and never loads libtorch.
* ``torch_shmem._C``: the ``torch.ops.shmem`` library (csrc/ops, plus
  csrc/cuda when a CUDA toolkit matching torch is present), built with
  torch.utils.cpp_extension. It is only built when csrc/ops has sources and
  torch is installed; without torch only ``_core`` is built (plain setuptools)
  and the build says so in one line: the NumPy-only install.

CUDA is chosen by toolkit, never by the presence of a GPU: set
``TORCH_SHMEM_USE_CUDA=0`` to skip it, ``=1`` to require it; by default it is
built when torch is a CUDA build and ``CUDA_HOME`` names a toolkit. Set
``DEBUG=1`` for an unoptimized build with assertions.

Build with ``pip install --no-build-isolation -e .`` (the torch ops build
against the torch already installed; torch is not a build requirement, so an
isolated build is NumPy-only).
"""

import glob
import os

import numpy as np
from setuptools import Extension, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # the NumPy-only install: _core alone
    torch = None

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"
OPT = ["-O0", "-g"] if DEBUG else ["-O3", "-DNDEBUG"]
WARN = ["-Wall", "-Wextra", "-Wno-missing-field-initializers"]
# The NumPy binding is plain C++17; the torch library uses the standard
# torch.utils.cpp_extension picks for the installed torch (C++20 for recent ones).
# Both export nothing but their module init function (PyMODINIT_FUNC), so the
# core's symbols in one module never interpose on the other's.
CORE_FLAGS = ["-std=c++17", "-fvisibility=hidden"] + WARN + OPT
OPS_FLAGS = ["-fvisibility=hidden"] + WARN + ["-Wno-unused-parameter"] + OPT
NVCC_FLAGS = ["-Xcompiler", "-fvisibility=hidden"] + OPT


def rel(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def cuda_decision():
    """Return (use_cuda, reason) from the toolkit, never from a GPU."""
    flag = os.environ.get("TORCH_SHMEM_USE_CUDA")
    if flag == "0":
        return False, "TORCH_SHMEM_USE_CUDA=0"
    have = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
        and os.path.exists(os.path.join(CUDA_HOME, "include", "cuda_runtime.h"))
    )
    if flag == "1" and not have:
        raise SystemExit(
            "TORCH_SHMEM_USE_CUDA=1 but no usable toolkit: torch.version.cuda="
            f"{torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}"
        )
    if not have:
        why = (
            "torch is a CPU build"
            if torch.version.cuda is None
            else f"no CUDA toolkit at CUDA_HOME={CUDA_HOME!r} (set CUDA_HOME, e.g. /usr/local/cuda)"
        )
        return False, why
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {CUDA_HOME}"


def torch_libstdcxx():
    """Link arguments naming the libstdc++ that torch runs with (this process's).

    torch's ops run inside torch's libstdc++ (the one the interpreter loaded
    for it). A compiler whose own libstdc++ would be linked statically (some
    toolchains ship only the archive) puts a private copy of iostreams into
    _C: with Python's -Bsymbolic-functions its functions bind to the private
    copy while the locale data binds to the process's, and the first number
    formatted into an error message crashes. Naming the process's shared
    libstdc++ first makes the linker resolve the C++ runtime from it; anything
    it lacks still comes from the toolchain.
    """
    if not os.path.exists("/proc/self/maps"):
        return []
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libstdc++.so") and os.path.exists(path):
                return [path]
    return []


# The core, compiled once (position-independent, hidden visibility: linked
# into each module, exported by neither). Each module depends on the core's
# files so that a change to them relinks it.
CORE_LIB = (
    "torch_shmem_core",
    {
        "sources": rel("csrc/core/*.cpp"),
        "include_dirs": [os.path.join(HERE, "csrc")],
        "cflags": ["-fPIC"] + CORE_FLAGS,
        # setuptools' build_clib recompiles a source only when it or these
        # files are newer than its object: every core header, for all.
        "obj_deps": {"": rel("csrc/core/*.h")},
    },
)
CORE_DEPENDS = rel("csrc/core/*")

core = Extension(
    "torch_shmem._core",
    sources=rel("csrc/python/*.cpp"),
    depends=CORE_DEPENDS,
    include_dirs=[np.get_include(), os.path.join(HERE, "csrc")],
    extra_compile_args=CORE_FLAGS,
    libraries=["rt", "pthread"],
    language="c++",
)
ext_modules = [core]

ops_sources = rel("csrc/ops/*.cpp")
if ops_sources and torch is None:
    print("torch_shmem: torch is not installed, skipping torch.ops.shmem (torch_shmem._C); "
          "building the NumPy module torch_shmem._core only")
elif ops_sources:
    use_cuda, reason = cuda_decision()
    cuda_sources = rel("csrc/cuda/*.cu") if use_cuda else []
    if use_cuda and not cuda_sources:
        reason += "; csrc/cuda has no sources yet"
    if cuda_sources and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # torch derives the list from the visible GPUs; a build host without
        # one would get none. Name the architectures GPU streams target.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        print("torch_shmem: TORCH_CUDA_ARCH_LIST not set, building for sm_80 and sm_90")
    print(f"torch_shmem: building torch.ops.shmem {'with' if cuda_sources else 'without'} CUDA ({reason})")
    defines = ["-DTORCH_SHMEM_WITH_CUDA"] if cuda_sources else []
    common = dict(
        name="torch_shmem._C",
        sources=ops_sources + cuda_sources,
        depends=CORE_DEPENDS,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": OPS_FLAGS + defines, "nvcc": NVCC_FLAGS + defines},
        libraries=["rt"],
        extra_link_args=torch_libstdcxx(),
        py_limited_api=False,
    )
    ext_modules.append(CUDAExtension(**common) if cuda_sources else CppExtension(**common))

if torch is None:
    from setuptools.command.build_ext import build_ext as _BuildExtBase
else:
    _BuildExtBase = BuildExtension.with_options(use_ninja=True)


class BuildExt(_BuildExtBase):
    """build_ext that first builds the core library (a plain ``build_ext``,
    e.g. ``--inplace``, would otherwise skip build_clib)."""

    def run(self):
        self.run_command("build_clib")
        super().run()


setup(
    libraries=[CORE_LIB],
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
)
