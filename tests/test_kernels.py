"""Triton kernels (torch_shmem.kernels): the CPU-mirror copy and GEMV.

CPU (marker cpu): the kernels run under the Triton interpreter against torch references.
TRITON_INTERPRET must be set before triton builds the kernels, so those cases run in one
subprocess (this file executed as a script with ``--interpreter-worker``) that reports a
result per case; the pytest session itself keeps compiled (non-interpreted) kernels. The
CUDA code is also compiled ahead of time for sm_90 (no GPU needed) and its PTX checked
for 128-bit loads.

GPU (marker gpu; skipped without CUDA): the compiled kernels on a device, including a
10000 x 10000 GEMV and a mirror copy into registered shared pages. Not yet run on a GPU.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import traceback

import pytest

torch = pytest.importorskip("torch")

DTYPES = [
    "bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
]
SHAPES = [(0,), (1,), (7,), (1000,), (4097,), (), (3, 5, 7)]
# (dtype, element offset of src, element offset of dst, numel): addresses that are not 8-aligned
# force narrower words (and src/dst of different alignment).
MISALIGNED = [("uint8", 1, 0, 4099), ("uint8", 3, 5, 64), ("int16", 1, 0, 1001), ("float32", 1, 1, 4096),
              ("float32", 0, 1, 33), ("float64", 0, 0, 17)]
K_ENV = "TORCH_SHMEM_KERNEL_BACKEND"
GEMV = [  # (m, n, dtype, out dtype)
    (1, 1, "float32", None), (3, 5, "float32", None), (64, 130, "float32", None),
    (257, 1000, "float32", None), (33, 48, "float32", None), (0, 5, "float32", None),
    (5, 0, "float32", None), (64, 130, "float16", None), (64, 130, "bfloat16", None),
    (64, 130, "float16", "float32"), (64, 130, "bfloat16", "float32"),
]


def _sid(shape):
    return "x".join(map(str, shape)) if shape else "0d"


def _cases():
    """Case ids run by the interpreter worker (identical in the worker and at collection)."""
    ids = [f"mirror-{d}-{_sid(s)}" for d in DTYPES for s in SHAPES]
    ids += [f"misaligned-{d}-{a}-{b}-{n}" for d, a, b, n in MISALIGNED]
    ids += ["mirror-nan-bits", "mirror-auto-uses-kernel", "mirror-via-op"]
    ids += [f"gemv-{m}x{n}-{d}-{o}" for m, n, d, o in GEMV]
    ids += ["gemv-auto-uses-kernel"]
    return ids


# --------------------------------------------------------------------------------------
# Shared helpers (used by the worker, the CPU tests and the GPU tests)


def _bytes(t):
    return t.reshape(-1).view(torch.uint8)


def _random_tensor(shape, dtype, device="cpu", gen=None):
    """Random bit patterns (NaNs with payloads, denormals, non-0/1 bools included)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    nb = t.numel() * t.element_size()
    _bytes(t).copy_(torch.randint(0, 256, (nb,), dtype=torch.uint8, generator=gen).to(device))
    return t


def _guarded(shape, dtype, device="cpu", guard=64, offset_bytes=0, pin=False):
    """dst inside a buffer of sentinel bytes: returns (buffer, dst, [guard slices])."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    buf = torch.full((guard + offset_bytes + nbytes + guard,), 0xA5, dtype=torch.uint8, device=device)
    if pin:
        buf = buf.pin_memory()
    start = guard + offset_bytes
    dst = buf[start:start + nbytes].view(dtype).reshape(shape)
    return buf, dst, (buf[:start], buf[start + nbytes:])


def _check_mirror(mirror_copy, src, dst, guards, **kw):
    out = mirror_copy(src, dst, **kw)
    if dst.is_cuda or src.is_cuda:
        torch.cuda.synchronize()
    assert out is dst
    assert torch.equal(_bytes(src).cpu(), _bytes(dst).cpu()), "bytes differ"
    for g in guards:
        assert bool((g == 0xA5).all()), "a byte outside dst was written"


def _gemv_tol(dtype, out_dtype):
    if out_dtype == torch.float32 or dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-4)
    return dict(rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10, atol=1e-2)


def _check_gemv(gemv, m, n, dtype, out_dtype, device="cpu", gen=None, **kw):
    A = torch.randn(m, n, generator=gen).to(device=device, dtype=dtype)
    x = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    out = None if out_dtype is None else torch.full((m,), float("nan"), dtype=out_dtype, device=device)
    y = gemv(A, x, out, **kw)
    assert y.shape == (m,) and y.device == A.device
    assert y.dtype == (dtype if out_dtype is None else out_dtype)
    if out is not None:
        assert y is out
    ref = A.double() @ x.double()  # the inputs as given, exactly; fp64 accumulation
    torch.testing.assert_close(y.double(), ref.to(y.dtype).double(), **_gemv_tol(dtype, out_dtype))


# --------------------------------------------------------------------------------------
# Interpreter worker: `TRITON_INTERPRET=1 python tests/test_kernels.py --interpreter-worker OUT`


def _run_case(case, K, mirror_mod, gemv_mod, gen):
    kind, rest = case.split("-", 1)
    if kind == "mirror" and rest == "nan-bits":
        pats = {
            torch.float16: (torch.int16, [0x7C01, 0x7E00, 0xFE01, 0x7DFF, 0x7C00, 0x8000, 0x0001]),
            torch.bfloat16: (torch.int16, [0x7F81, 0x7FC0, 0xFFC1, 0x7FFF, 0x7F80, 0x8000, 0x0001]),
            torch.float32: (torch.int32, [0x7F800001, 0x7FC00000, 0xFFC0DEAD, 0x7FBFFFFF, 0x7F800000,
                                          0x80000000, 0x00000001]),
            torch.float64: (torch.int64, [0x7FF0000000000001, 0x7FF8000000000000, 0xFFF8DEADBEEF0001,
                                          0x7FF7FFFFFFFFFFFF, 0x7FF0000000000000, 0x8000000000000000, 1]),
        }
        for dtype, (itype, vals) in pats.items():
            bits = torch.tensor([v - (1 << (8 * itype.itemsize)) if v >= 1 << (8 * itype.itemsize - 1) else v
                                 for v in vals], dtype=itype)
            src = bits.view(dtype)
            _, dst, guards = _guarded(src.shape, dtype)
            _check_mirror(K.mirror_copy, src, dst, guards, backend="triton")
            assert torch.equal(dst.view(itype), bits), dtype
        bits = torch.tensor([0x7FC0DEAD, 0x7F800001, 0xFFC00001 - (1 << 32), 0x7F800001], dtype=torch.int64)
        src = bits.to(torch.int32).view(torch.complex64)
        _, dst, guards = _guarded(src.shape, torch.complex64)
        _check_mirror(K.mirror_copy, src, dst, guards, backend="triton")
        assert torch.equal(dst.view(torch.int32), src.view(torch.int32))
        return
    if kind == "mirror" and rest == "via-op":
        # The op the write path of mirrored GPU streams calls from C++: its Python
        # implementation takes the Triton kernel (interpreted here) for byte views.
        import torch_shmem.ops as O

        src = _random_tensor((4099,), torch.uint8, gen=gen)
        dst = torch.zeros(4099, dtype=torch.uint8)
        assert mirror_mod.select_backend(src, dst) == "triton"
        before = O.mirror_copy_calls
        torch.ops.shmem.mirror_copy(src, dst)
        assert O.mirror_copy_calls == before + 1
        assert torch.equal(dst, src)
        return
    if kind == "mirror" and rest == "auto-uses-kernel":
        src = torch.arange(10.0)
        dst = torch.empty(10)
        assert mirror_mod.select_backend(src, dst) == "triton"
        assert mirror_mod.select_backend(src, dst, "torch") == "torch"
        return
    if kind == "mirror":
        d, s = rest.rsplit("-", 1)
        shape = () if s == "0d" else tuple(int(v) for v in s.split("x"))
        dtype = getattr(torch, d)
        src = _random_tensor(shape, dtype, gen=gen)
        _, dst, guards = _guarded(shape, dtype)
        _check_mirror(K.mirror_copy, src, dst, guards, backend="triton")
        return
    if kind == "misaligned":
        d, a, b, n = rest.split("-")
        dtype, a, b, n = getattr(torch, d), int(a), int(b), int(n)
        src = _random_tensor((a + n,), dtype, gen=gen)[a:]
        isz = src.element_size()
        _, dst, guards = _guarded((n,), dtype, offset_bytes=b * isz)
        _check_mirror(K.mirror_copy, src, dst, guards, backend="triton")
        return
    if kind == "gemv" and rest == "auto-uses-kernel":
        assert gemv_mod.select_backend(torch.ones(2, 3), torch.ones(3)) == "triton"
        return
    if kind == "gemv":
        shape, d, o = rest.split("-")
        m, n = (int(v) for v in shape.split("x"))
        out_dtype = None if o == "None" else getattr(torch, o)
        _check_gemv(K.gemv, m, n, getattr(torch, d), out_dtype, gen=gen, backend="triton")
        return
    raise AssertionError(f"unknown case {case}")


def _interpreter_loop_defect():
    """Why this Triton interpreter cannot run a loop with a runtime bound (None if it can).

    Triton 3.6's interpreter turns the bound into an int through a one-element array, which
    NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars").
    The GEMV kernel loops over the columns that way; its interpreted cases are skipped with
    this reason where the probe fails (they run under Triton 3.8 in CI and compiled on GPUs).
    """
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(out_ptr, n):
        acc = 0
        for _ in range(0, n, 4):
            acc += 1
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        _probe[(1,)](out, 8)
    except Exception as exc:  # InterpreterError wrapping the TypeError
        if "0-dimensional arrays" not in str(exc):
            raise
        return (f"triton {triton.__version__}'s interpreter cannot run a loop with a runtime bound "
                f"under numpy {numpy.__version__} ({exc})")
    assert int(out[0]) == 2, int(out[0])
    return None


def _interpreter_worker(out_path):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch_shmem.kernels as K

    mirror_mod = importlib.import_module("torch_shmem.kernels.mirror")
    gemv_mod = importlib.import_module("torch_shmem.kernels.gemv")
    results = {"_interpreted": K.interpreted()}
    seed = int.from_bytes(os.urandom(4), "little")
    results["_seed"] = seed
    gen = torch.Generator().manual_seed(seed)
    loop_defect = _interpreter_loop_defect()
    for case in _cases():
        if loop_defect and case.startswith("gemv-"):
            results[case] = {"skip": loop_defect}
            continue
        try:
            _run_case(case, K, mirror_mod, gemv_mod, gen)
            results[case] = None
        except Exception:
            results[case] = traceback.format_exc()
    with open(out_path, "w") as f:
        json.dump(results, f)


# --------------------------------------------------------------------------------------
# CPU tests


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("kernels") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop(K_ENV, None)
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--interpreter-worker", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    print(f"interpreter worker seed={results['_seed']}")
    assert results["_interpreted"] is True, "the worker's kernels were not built for the interpreter"
    return results



@pytest.mark.cpu
@pytest.mark.parametrize("case", _cases())
def test_interpreted_kernel(interpreted_results, case):
    err = interpreted_results[case]
    if isinstance(err, dict):
        pytest.skip(err["skip"])
    assert err is None, f"seed={interpreted_results['_seed']}\n{err}"


@pytest.fixture
def K(monkeypatch):
    monkeypatch.delenv(K_ENV, raising=False)
    import torch_shmem.kernels as K

    return K


def _mod(name):
    return importlib.import_module(f"torch_shmem.kernels.{name}")


@pytest.mark.cpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_mirror_torch_fallback_all_dtypes(K, dtype):
    dtype = getattr(torch, dtype)
    for shape in SHAPES:
        src = _random_tensor(shape, dtype)
        _, dst, guards = _guarded(shape, dtype)
        assert _mod("mirror").select_backend(src, dst, "torch") == "torch"
        _check_mirror(K.mirror_copy, src, dst, guards, backend="torch")


@pytest.mark.cpu
def test_gemv_torch_fallback(K):
    for m, n, d, o in GEMV:
        _check_gemv(K.gemv, m, n, getattr(torch, d), None if o is None else getattr(torch, o), backend="torch")


@pytest.mark.cpu
def test_mirror_errors(K):
    a = torch.zeros(4, 5)
    with pytest.raises(TypeError, match=r"^torch_shmem: mirror_copy: src must be a torch.Tensor"):
        K.mirror_copy(a.numpy(), a)
    with pytest.raises(ValueError, match=r"^torch_shmem: mirror_copy: dtype mismatch"):
        K.mirror_copy(a, torch.zeros(4, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^torch_shmem: mirror_copy: shape mismatch: src is \(4, 5\), dst is \(5, 4"):
        K.mirror_copy(a, torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"^torch_shmem: mirror_copy: shape mismatch"):
        K.mirror_copy(a, torch.zeros(20))
    with pytest.raises(ValueError, match=r"^torch_shmem: mirror_copy: src must be contiguous"):
        K.mirror_copy(torch.zeros(5, 4).t(), a)
    with pytest.raises(ValueError, match=r"^torch_shmem: mirror_copy: dst must be contiguous"):
        K.mirror_copy(a, torch.zeros(5, 4).t())
    with pytest.raises(ValueError, match=r"^torch_shmem: mirror_copy: dst must be contiguous"):
        K.mirror_copy(torch.zeros(3), torch.zeros(6)[::2])
    with pytest.raises(ValueError, match=r"^torch_shmem: mirror_copy: backend must be one of"):
        K.mirror_copy(a, a.clone(), backend="cuda")
    buf = torch.arange(10.0)
    with pytest.raises(ValueError, match=r"^torch_shmem: mirror_copy: src and dst overlap partially"):
        K.mirror_copy(buf[:6], buf[2:8])
    assert K.mirror_copy(buf, buf) is buf  # the same memory: a no-op


@pytest.mark.cpu
def test_backend_env_var(K, monkeypatch):
    src, dst = torch.arange(3.0), torch.zeros(3)
    monkeypatch.setenv(K_ENV, "torch")
    assert _mod("mirror").select_backend(src, dst) == "torch"
    assert _mod("gemv").select_backend(torch.ones(2, 3), torch.ones(3)) == "torch"
    monkeypatch.setenv(K_ENV, "bogus")
    with pytest.raises(ValueError, match=r"^torch_shmem: mirror_copy: backend must be one of"):
        K.mirror_copy(src, dst)


@pytest.mark.cpu
def test_forced_triton_without_a_device_raises(K):
    if K.interpreted():
        pytest.skip("this session's kernels are interpreted (TRITON_INTERPRET=1 in the environment)")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: CPU tensors are refused for another reason (tested under gpu)")
    with pytest.raises(RuntimeError, match=r"^torch_shmem: mirror_copy: the Triton kernel cannot run"):
        K.mirror_copy(torch.zeros(3), torch.zeros(3), backend="triton")
    with pytest.raises(RuntimeError, match=r"^torch_shmem: gemv: the Triton kernel cannot run"):
        K.gemv(torch.zeros(2, 3), torch.zeros(3), backend="triton")
    # auto falls back to torch
    assert _mod("mirror").select_backend(torch.zeros(3), torch.zeros(3)) == "torch"
    assert _mod("gemv").select_backend(torch.zeros(2, 3), torch.zeros(3)) == "torch"
    assert K.triton_available() is False


@pytest.mark.cpu
def test_gemv_errors(K):
    A, x = torch.zeros(4, 5), torch.zeros(5)
    with pytest.raises(TypeError, match=r"^torch_shmem: gemv: A must be a torch.Tensor"):
        K.gemv(A.numpy(), x)
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: A must be 2-d \(m, n\), got shape \(4, 5, 1\)"):
        K.gemv(A[..., None], x)
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: x must be 1-d"):
        K.gemv(A, x[None])
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: A is 4 x 5, so x must have 5 elements, got 4"):
        K.gemv(A, torch.zeros(4))
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: A must be float32, float16 or bfloat16, got torch.int3"):
        K.gemv(A.int(), x.int())
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: A must be float32, float16 or bfloat16"):
        K.gemv(A.double(), x.double())
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: x must have A's dtype torch.float32"):
        K.gemv(A, x.half())
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: A must be contiguous \(row-major\)"):
        K.gemv(torch.zeros(5, 4).t(), x)
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: x must be contiguous"):
        K.gemv(A, torch.zeros(10)[::2])
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: out must have shape \(4,\), got \(5,\)"):
        K.gemv(A, x, torch.zeros(5))
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: out must be torch.float32, got torch.float64"):
        K.gemv(A, x, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: out must be contiguous"):
        K.gemv(A, x, torch.zeros(8)[::2])
    with pytest.raises(TypeError, match=r"^torch_shmem: gemv: out must be a torch.Tensor"):
        K.gemv(A, x, [0.0] * 4)
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: backend must be one of"):
        K.gemv(A, x, backend="cublas")


def _run(code, env=None):
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **(env or {})))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.cpu
def test_import_torch_shmem_does_not_import_kernels():
    out = _run(
        "import sys, torch_shmem\n"
        "bad = [m for m in ('torch', 'triton', 'torch_shmem.kernels') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    assert out.strip() == "ok"


@pytest.mark.cpu
def test_kernels_work_without_triton():
    # CPU-only torch wheels ship without triton: the launchers must still import and fall back.
    out = _run(
        "import sys\n"
        "sys.modules['triton'] = None  # makes `import triton` raise ImportError\n"
        "import torch\n"
        "import torch_shmem.kernels as K\n"
        "assert not K.triton_available() and not K.interpreted()\n"
        "src = torch.arange(7, dtype=torch.int16); dst = torch.zeros(7, dtype=torch.int16)\n"
        "assert K.mirror_copy(src, dst) is dst and torch.equal(src, dst)\n"
        "A = torch.randn(3, 4); x = torch.randn(4)\n"
        "torch.testing.assert_close(K.gemv(A, x), torch.mv(A, x))\n"
        "try:\n"
        "    K.gemv(A, x, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton is not installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('ok')\n",
        env={"TRITON_INTERPRET": "1"},  # must not matter without triton
    )
    assert out.strip() == "ok"


@pytest.mark.cpu
def test_cuda_code_compiles_for_sm90_with_vector_loads(K):
    """Ahead-of-time compile for H100 (sm_90) with Triton's bundled ptxas: no GPU needed.

    Checks the body of the mirror copy and the GEMV tile loads are 128-bit vector accesses
    and that every autotune config compiles.
    """
    if K.interpreted():
        pytest.skip("this session's kernels are interpreted (TRITON_INTERPRET=1 in the environment)")
    triton = pytest.importorskip("triton")
    import triton.language as tl

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # the AOT entry points move between triton releases
        pytest.skip(f"triton {triton.__version__} has no ASTSource/GPUTarget: {e}")
    target = GPUTarget("cuda", 90, 32)
    aligned = lambda *idx: {(i,): [["tt.divisibility", 16]] for i in idx}  # noqa: E731
    mirror, gemv = _mod("mirror"), _mod("gemv")

    def ptx(fn, sig, consts, attrs, **opts):
        return triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=opts).asm["ptx"]

    sig = {"src_ptr": "*u8", "dst_ptr": "*u8", "n_body": "i32", "n_words": "i32", "WORD": "constexpr",
           "BLOCK": "constexpr", "TAIL": "constexpr"}
    for word, ty, vec in ((8, tl.int64, "v2.b64"), (4, tl.int32, "v4.b32"), (1, tl.int8, "v4.b32")):
        code = ptx(mirror._mirror_copy_kernel, sig, {"WORD": ty, "BLOCK": 16384 // word, "TAIL": 16},
                   aligned(0, 1, 2), num_warps=4)
        assert f"ld.global.{vec}" in code and f"st.global.{vec}" in code, f"word {word}: no vector copy"
    # Signatures the launcher also produces: 64-bit sizes (> 2**31 words), n_words == 1 (a constexpr).
    ptx(mirror._mirror_copy_kernel, dict(sig, n_body="i64", n_words="i64"),
        {"WORD": tl.int8, "BLOCK": 16384, "TAIL": 16}, aligned(0, 1, 2))
    ptx(mirror._mirror_copy_kernel, dict(sig, n_words="constexpr"),
        {"n_words": 1, "WORD": tl.int8, "BLOCK": 16384, "TAIL": 16}, aligned(0, 1))
    gsig = {"a_ptr": "*fp32", "x_ptr": "*fp32", "y_ptr": "*fp32", "m": "i32", "n": "i32",
            "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
    for i, cfg in enumerate(gemv._CONFIGS):
        code = ptx(gemv._gemv_kernel, gsig, dict(cfg.kwargs), aligned(0, 1, 2, 3, 4),
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if i == 0:
            assert "evict_first.L2::cache_hint.v4.b32" in code, "GEMV tile loads are not 128-bit"
    ptx(gemv._gemv_kernel, dict(gsig, m="i64", n="i64"), {"BLOCK_M": 16, "BLOCK_N": 256}, aligned(0, 1, 2))
    ptx(gemv._gemv_kernel, dict(gsig, m="constexpr", n="constexpr"), {"m": 1, "n": 1, "BLOCK_M": 16, "BLOCK_N": 256},
        aligned(0, 1, 2))
    hsig = dict(gsig, a_ptr="*bf16", x_ptr="*bf16", y_ptr="*fp32")
    code = ptx(gemv._gemv_kernel, hsig, {"BLOCK_M": 16, "BLOCK_N": 256}, aligned(0, 1, 2, 3, 4), num_warps=4)
    assert ".v4.b32" in code  # 8 bf16 per load


# --------------------------------------------------------------------------------------
# GPU tests (compiled kernels on a device)


def _need_gpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    import torch_shmem.kernels as K

    if not K.triton_available():
        pytest.skip("triton is not installed")
    if K.interpreted():
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels are interpreted, not compiled")
    return K


@pytest.fixture
def G(monkeypatch):
    monkeypatch.delenv(K_ENV, raising=False)
    return _need_gpu()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_mirror_device_to_device(G, dtype):
    dtype = getattr(torch, dtype)
    for shape in SHAPES + [((1 << 20) + 3,), (64, 1000, 3)]:
        src = _random_tensor(shape, dtype, device="cuda")
        _, dst, guards = _guarded(shape, dtype, device="cuda")
        assert _mod("mirror").select_backend(src, dst) == "triton"
        _check_mirror(G.mirror_copy, src, dst, guards)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bool", "uint8", "float16", "bfloat16", "float32", "float64", "complex128"])
@pytest.mark.parametrize("offset", [0, 1, 8])
def test_gpu_mirror_into_pinned_host(G, dtype, offset):
    dtype = getattr(torch, dtype)
    for shape in [(), (7,), (4097,), (1080, 1920, 3)]:
        src = _random_tensor(shape, dtype, device="cuda")
        isz = src.element_size()
        buf, dst, guards = _guarded(shape, dtype, offset_bytes=offset * isz, pin=True)
        assert dst.is_pinned() and not dst.is_cuda
        assert _mod("mirror").select_backend(src, dst) == "triton"
        _check_mirror(G.mirror_copy, src, dst, guards)


@pytest.mark.gpu
def test_gpu_mirror_into_registered_shared_pages(G):
    """The real CPU-mirror setup: MAP_SHARED pages registered with cudaHostRegister, written by the kernel."""
    import gc
    import mmap

    cudart = torch.cuda.cudart()
    size = 4096 + 1080 * 1920 * 3 * 4
    mm = mmap.mmap(-1, size)  # anonymous MAP_SHARED, like the stream's /dev/shm segment
    pages = torch.frombuffer(mm, dtype=torch.uint8)
    ptr = pages.data_ptr()
    rc = int(cudart.cudaHostRegister(ptr, size, 3))  # cudaHostRegisterPortable | cudaHostRegisterMapped
    assert rc == 0, f"cudaHostRegister failed: {rc}"
    try:
        assert pages.is_pinned()
        for dtype, offset in ((torch.float32, 4096), (torch.uint8, 4096 + 1), (torch.float64, 4096 - 8)):
            shape = (1080, 1920, 3) if dtype != torch.float64 else (999, 7)
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            pages.fill_(0xA5)
            dst = pages[offset:offset + nbytes].view(dtype).reshape(shape)
            src = _random_tensor(shape, dtype, device="cuda")
            assert _mod("mirror").select_backend(src, dst) == "triton"
            _check_mirror(G.mirror_copy, src, dst, (pages[:offset], pages[offset + nbytes:]))
            del dst
    finally:
        torch.cuda.synchronize()
        assert int(cudart.cudaHostUnregister(ptr)) == 0
        del pages
        gc.collect()  # no tensor may still export mm's buffer
        mm.close()


@pytest.mark.gpu
def test_gpu_mirror_pageable_host_falls_back(G):
    src = _random_tensor((1001,), torch.float32, device="cuda")
    _, dst, guards = _guarded((1001,), torch.float32)  # pageable: the kernel cannot reach it
    assert _mod("mirror").select_backend(src, dst) == "torch"
    _check_mirror(G.mirror_copy, src, dst, guards)
    with pytest.raises(RuntimeError, match="pageable host memory"):
        G.mirror_copy(src, dst, backend="triton")
    with pytest.raises(RuntimeError, match="no CUDA tensor"):
        G.mirror_copy(dst, dst.clone(), backend="triton")


@pytest.mark.gpu
def test_gpu_mirror_runs_on_the_current_stream(G):
    s = torch.cuda.Stream()
    n = 1 << 24
    src = torch.empty(n, dtype=torch.int32, device="cuda")
    dst = torch.empty(n, dtype=torch.int32).pin_memory()
    with torch.cuda.stream(s):
        for i in range(3):  # writes and copies ordered only by s
            src.fill_(i)
            G.mirror_copy(src, dst)
    s.synchronize()
    assert bool((dst == 2).all())


@pytest.mark.gpu
def test_gpu_mirror_more_than_2_31_words(G):
    # int64 offsets: 2**31 + 5 bytes copied as int8 words (odd size)
    free, _ = torch.cuda.mem_get_info()
    n = (1 << 31) + 5
    if free < 2 * n + (1 << 30):
        pytest.skip(f"needs {2 * n / 2**30:.1f} GiB free on the device, {free / 2**30:.1f} GiB free")
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    src[: 1 << 20].random_(0, 256)
    src[-(1 << 20):].random_(0, 256)
    dst = torch.zeros(n, dtype=torch.uint8, device="cuda")
    G.mirror_copy(src, dst)
    assert torch.equal(src[-(1 << 20):], dst[-(1 << 20):])
    assert torch.equal(src, dst)


GPU_GEMV = GEMV + [(1000, 257, "float32", None), (4096, 4096, "float32", None),
                   (4096, 4096, "bfloat16", "float32"), (7, 100003, "float32", None)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,dtype,out", GPU_GEMV)
def test_gpu_gemv(G, m, n, dtype, out):
    assert _mod("gemv").select_backend(torch.ones(1, 1, device="cuda"), torch.ones(1, device="cuda")) == "triton"
    _check_gemv(G.gemv, m, n, getattr(torch, dtype), None if out is None else getattr(torch, out), device="cuda")


@pytest.mark.gpu
def test_gpu_gemv_10000_in_place_in_a_larger_allocation(G):
    """10000 x 10000 float32, read in place at a 4096-byte offset (like a stream slot after its header)."""
    m = n = 10000
    gen = torch.Generator(device="cuda").manual_seed(0)
    alloc = torch.empty(1024 + m * n, device="cuda")
    A = alloc[1024:].view(m, n)
    A.normal_(generator=gen)
    x = torch.randn(n, device="cuda", generator=gen)
    y = G.gemv(A, x)
    y2 = G.gemv(A, x)  # after autotuning: the chosen config, same result
    ref = (A.double() @ x.double()).float()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=2e-3)
    torch.testing.assert_close(y2, y, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(y, torch.mv(A, x), rtol=1e-4, atol=2e-3)


@pytest.mark.gpu
def test_gpu_gemv_runs_on_the_current_stream(G):
    s = torch.cuda.Stream()
    A = torch.randn(2048, 3000, device="cuda")
    x = torch.empty(3000, device="cuda")
    out = torch.empty(2048, device="cuda")
    with torch.cuda.stream(s):
        x.fill_(1.0)
        G.gemv(A, x, out)
    s.synchronize()
    torch.testing.assert_close(out, A.sum(1), rtol=1e-5, atol=1e-3)


@pytest.mark.gpu
def test_gpu_gemv_rejects_mixed_devices(G):
    with pytest.raises(ValueError, match=r"^torch_shmem: gemv: x is on cpu, A on cuda:0"):
        G.gemv(torch.ones(2, 3, device="cuda"), torch.ones(3))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interpreter-worker":
        _interpreter_worker(sys.argv[2])
    else:
        sys.exit(f"usage: TRITON_INTERPRET=1 {sys.argv[0]} --interpreter-worker OUT.json")
