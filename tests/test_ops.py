"""torch.ops.shmem: opcheck, torch.compile, interop with the NumPy API, errors."""

import multiprocessing as mp
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import _np_workers

torch = pytest.importorskip("torch")

import torch_shmem  # noqa: E402
import torch_shmem.ops as O  # noqa: E402

pytestmark = pytest.mark.cpu

ctx = mp.get_context("spawn")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.complex64]
SHAPES = [(), (3,), (2, 3), (2, 3, 4)]


def sample(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 10
    if dtype.is_complex:
        return torch.complex(x, -x).to(dtype)
    return x.to(dtype)


@pytest.fixture
def stream(name):
    s = O.create(name, (2, 3), torch.float32)
    yield s
    O.close(s)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_opcheck_data_ops(name, shape, dtype):
    s = O.create(name, shape, dtype)
    src = sample(shape, dtype)
    torch.library.opcheck(torch.ops.shmem.publish.default, (s.token, src))
    torch.library.opcheck(torch.ops.shmem.read_into.default, (s.token, torch.empty(shape, dtype=dtype)))
    torch.library.opcheck(torch.ops.shmem.read.default, (s.token, list(shape), dtype, "cpu"))
    torch.library.opcheck(torch.ops.shmem.count.default, (s.token,))
    # wait_read_into blocks until a publication newer than the token's last
    # count: keep one coming (same data) from another thread while opcheck runs
    # the op several times.
    stop = threading.Event()
    publisher_token = s.token.clone()

    def publisher():
        while not stop.is_set():
            torch.ops.shmem.publish(publisher_token, src)
            time.sleep(0.001)

    t = threading.Thread(target=publisher)
    t.start()
    try:
        torch.library.opcheck(torch.ops.shmem.wait_read_into.default,
                              (s.token, torch.empty(shape, dtype=dtype), 10.0))
    finally:
        stop.set()
        t.join(10)
    assert torch.equal(O.read(s), src)
    O.close(s)


def test_publish_read_roundtrip_and_counts(stream):
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    O.publish(stream, x)
    assert stream.last_count == 1 and int(O.count(stream)) == 1
    out = torch.empty(2, 3)
    assert O.read_into(stream, out) is out and torch.equal(out, x)
    y = O.read(stream)
    assert torch.equal(y, x) and y.data_ptr() != out.data_ptr()


def test_non_contiguous_inputs(stream):
    base = torch.arange(12, dtype=torch.float32).reshape(2, 6)
    src = base[:, ::2]  # non-contiguous source: copied correctly
    assert not src.is_contiguous()
    O.publish(stream, src)
    assert torch.equal(O.read(stream), src)
    out = torch.empty(3, 2).t()  # non-contiguous out: rejected clearly
    with pytest.raises(ValueError, match="out must be contiguous"):
        O.read_into(stream, out)


def test_errors_eager(stream, name):
    with pytest.raises(ValueError, match=rf"shmem::publish: stream '{name}': expected src of dtype Float, got Double"):
        O.publish(stream, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected src of shape \[2, 3\], got \[3, 2\]"):
        O.publish(stream, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="expected out of dtype"):
        O.read_into(stream, torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="stream token"):
        torch.ops.shmem.publish(torch.zeros(4), torch.zeros(2, 3))
    forged = stream.token.clone()
    forged[1] += 1
    with pytest.raises(RuntimeError, match="generation"):
        torch.ops.shmem.publish(forged, torch.zeros(2, 3))
    with pytest.raises(RuntimeError, match=r"No such file or directory; create it with torch_shmem.ops.create"):
        O.open(name + "-missing")
    with pytest.raises(RuntimeError, match=r"attach to it with torch_shmem.ops.open"):
        O.create(name, (2, 3))
    with pytest.raises(RuntimeError, match="timed out"):
        O.wait_read_into(stream, torch.empty(2, 3), timeout=0.05)
    O.close(stream)
    O.close(stream)  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        O.read(stream)


def test_readonly_token_cannot_publish(stream, name):
    ro = O.open(name, readonly=True)
    with pytest.raises(RuntimeError, match="read-only"):
        O.publish(ro, torch.zeros(2, 3))
    O.close(ro)


def test_compile_fullgraph_publish_then_read_matches_eager(stream):
    def step(x):
        O.publish(stream, x * 2)
        return O.read(stream) + 1, O.count(stream)

    explanation = torch._dynamo.explain(step)(torch.randn(2, 3))
    assert explanation.graph_break_count == 0
    compiled = torch.compile(step, fullgraph=True)
    for i in range(3):
        x = torch.randn(2, 3)
        y, n = compiled(x)
        torch.testing.assert_close(y, x * 2 + 1)
        assert int(n) == stream.last_count
    eager_y, _ = step(x)
    torch.testing.assert_close(eager_y, y)
    # every publish ran (explain once, compiled three times, eager once):
    # nothing was dropped or merged
    assert stream.last_count == 5 and int(O.count(stream)) == 5


def test_compile_wait_read_into_and_errors_inside_compiled_code(stream):
    out = torch.empty(2, 3)

    @torch.compile(fullgraph=True)
    def serve(scale):
        O.wait_read_into(stream, out, timeout=0.2)
        O.publish(stream, out * scale)
        return out.sum()

    O.publish(stream, torch.ones(2, 3))
    stream.token[3] = 0  # pretend this token has seen nothing: the wait returns at once
    assert float(serve(torch.tensor(3.0))) == 6.0
    assert torch.equal(O.read(stream), torch.full((2, 3), 3.0))
    with pytest.raises(RuntimeError, match="timed out"):
        serve(torch.tensor(1.0))  # nothing newer than the token's last count

    @torch.compile(fullgraph=True)
    def bad(x):
        O.publish(stream, x)

    with pytest.raises(Exception, match=r"expected src of shape \[2, 3\], got \[4\]"):
        bad(torch.zeros(4))
    O.close(stream)

    @torch.compile(fullgraph=True)
    def closed():
        return O.read(stream)

    with pytest.raises(Exception, match="closed"):
        closed()


def test_ops_and_numpy_api_see_the_same_data_across_processes(stream, name):
    O.publish(stream, torch.arange(6, dtype=torch.float32).reshape(2, 3))
    q = ctx.Queue()
    p = ctx.Process(target=_np_workers.numpy_reader, args=(name, q))
    p.start()
    data, child_imported_torch = q.get(timeout=60)
    p.join(30)
    assert p.exitcode == 0
    assert data == [[0, 1, 2], [3, 4, 5]]
    assert not child_imported_torch  # the reader was a NumPy-only process
    w = ctx.Process(target=_np_workers.numpy_writer, args=(name,))
    w.start()
    out = torch.empty(2, 3)
    O.wait_read_into(stream, out, timeout=60)  # woken by the other process's write
    w.join(30)
    assert w.exitcode == 0
    assert torch.equal(out, torch.full((2, 3), 7.0))
    np.testing.assert_array_equal(torch_shmem.open(name).read(), out.numpy())


def test_numpy_stream_read_through_ops_equals_numpy_read(name):
    arr = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float64)
    s = torch_shmem.create(name, shape=(5, 4), dtype=np.float64)
    s.write(arr)
    t = O.open(name)
    assert t.dtype == torch.float64 and t.shape == (5, 4)
    np.testing.assert_array_equal(O.read(t).numpy(), s.read())
    O.close(t)


@pytest.mark.parametrize(
    "code",
    [
        "import torch, torch_shmem; assert hasattr(torch.ops.shmem, 'publish')",
        "import torch_shmem, torch; assert hasattr(torch.ops.shmem, 'publish')",
        "import torch; assert hasattr(torch.ops.shmem, 'publish')",
    ],
    ids=["torch-first", "torch_shmem-first", "torch-only-autoload"],
)
def test_ops_available_in_any_import_order(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_cuda_kernels_registered_when_built_with_cuda():
    from torch_shmem import _C

    if not _C.WITH_CUDA:
        pytest.skip("built without CUDA (no toolkit at build time or TORCH_SHMEM_USE_CUDA=0)")
    for op in ("publish", "read_into", "read", "wait_read_into"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"shmem::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"shmem::{op}", "CPU"), op


def test_mirror_copy_op_registered_and_byte_exact():
    """shmem::mirror_copy: declared in C++, implemented from Python for CPU and CUDA (the
    write path of mirrored GPU streams dispatches to it); here through torch's copy."""
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("shmem::mirror_copy", key), key
    src = torch.tensor([0x7FC0DEAD, 0x7F800001, -0x3FFFFF], dtype=torch.int32).view(torch.float32)
    dst = torch.zeros(3)
    before = O.mirror_copy_calls
    torch.ops.shmem.mirror_copy(src, dst)
    assert O.mirror_copy_calls == before + 1
    assert torch.equal(dst.view(torch.int32), src.view(torch.int32))  # NaN payloads kept
    torch.library.opcheck(torch.ops.shmem.mirror_copy.default,
                          (torch.arange(10, dtype=torch.uint8), torch.empty(10, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="shape mismatch"):
        torch.ops.shmem.mirror_copy(torch.zeros(3), torch.zeros(4))


def test_publish_frame_id_full_uint64_range(stream, name):
    reader = torch_shmem.open(name)
    for fid in (0, 7, 2**63 - 1, 2**63, 2**64 - 1):
        O.publish(stream, torch.zeros(2, 3), frame_id=fid)
        assert reader.frame_id == fid
    with pytest.raises(ValueError, match="frame_id"):
        O.publish(stream, torch.zeros(2, 3), frame_id=2**64)
    torch.library.opcheck(torch.ops.shmem.publish.default, (stream.token, torch.ones(2, 3), 5))


def test_device_wait_refuses_cpu_streams(stream):
    # wait_device and slot_view need a GPU stream's device counter and slots
    with pytest.raises(ValueError, match="CPU stream"):
        O.wait_device(stream, 1)
    with pytest.raises(ValueError, match="count >= 1"):
        O.slot_view(stream, 0)
    with pytest.raises(RuntimeError, match="CPU stream"):
        O.slot_view(stream, 1)


def test_device_wait_is_kept_out_of_compiled_graphs(stream):
    # wait_device orders the CUDA stream against kernels that never name the token
    # (on a slot_view), which a compiled graph could move across it: it is eager only,
    # so fullgraph=True refuses it at trace time (test_slots checks the
    # ordering of a compiled read after it)
    @torch.compile(fullgraph=True)
    def step():
        O.wait_device(stream, 1)

    with pytest.raises(Exception, match="(?i)disable|skip|unsupported"):
        step()


# ---------------------------------------------------------------- rings

def test_ring_ops_read_next_and_policy(name):
    shm = torch_shmem.create(name, shape=(2, 3), dtype=np.float32, ring=4, policy="drop_newest")
    s = O.open(name)
    with pytest.raises(RuntimeError, match="not a ring"):
        plain = O.create(name + "-plain", (2,), torch.float32)
        try:
            O.cursor(plain, "a")
        finally:
            O.close(plain)
            O.unlink(name + "-plain")
    with pytest.raises(ValueError, match="cursor name"):
        O.cursor(s, "")
    idx = O.cursor(s, "ops-reader")
    with pytest.raises(ValueError, match="cursor index"):
        O.read_next(s, 99, torch.empty(2, 3))
    for k in range(1, 7):  # the ring holds 4 for the cursor: 5 and 6 are dropped
        O.publish(s, torch.full((2, 3), float(k)), frame_id=k)
    assert int(O.count(s)) == 4 and shm.drops == 2
    out = torch.empty(2, 3)
    for k in range(1, 5):
        meta = O.read_next(s, idx, out, timeout=1)
        assert meta.tolist()[:3] == [k, 0, k] and meta[3] > 0
        assert torch.equal(out, torch.full((2, 3), float(k))) and s.last_count == k
    with pytest.raises(RuntimeError, match="timed out"):
        O.read_next(s, idx, out, timeout=0.05)
    O.cursor_release(s, idx)
    assert torch_shmem.stat(name)["ring"]["cursors"][0]["pid"] is None
    O.close(s)
    shm.close()


def test_ring_read_next_opcheck(name):
    shm = torch_shmem.create(name, shape=(3,), dtype=np.float32, ring=64)  # overwrite
    s = O.open(name)
    idx = O.cursor(s, "opcheck")
    src = torch.arange(3, dtype=torch.float32)
    # opcheck runs the op several times: each run consumes one publication.
    # test_aot_dispatch_dynamic is left out: it compares the outputs of two
    # runs, and two runs of a consuming read return different publications.
    for _ in range(60):
        O.publish(s, src)
    torch.library.opcheck(torch.ops.shmem.read_next.default,
                          (s.token, idx, torch.empty(3), 5.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    O.close(s)
    shm.close()
