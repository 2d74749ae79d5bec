"""How torch.ops.shmem gets loaded, what that costs a program that never uses it, and the
errors of the ops on a machine where GPU streams cannot work."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_shmem  # noqa: E402
import torch_shmem.ops as O  # noqa: E402

pytestmark = pytest.mark.cpu

no_gpu = pytest.mark.skipif(torch_shmem.gpu_available(),
                            reason="GPU streams work here: the no-GPU errors cannot be seen")


def run(code, *, autoload=True, timeout=300):
    env = dict(os.environ)
    env.pop("TORCH_DEVICE_BACKEND_AUTOLOAD", None)
    if not autoload:
        env["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_import_torch_loads_the_ops_without_dynamo_or_the_numpy_api():
    # torch runs torch_shmem's entry point on every `import torch`: it must stay cheap
    out = run("""
        import sys, torch
        assert hasattr(torch.ops.shmem, "publish") and hasattr(torch.ops.shmem, "create")
        assert "torch._dynamo" not in sys.modules, "the autoload imported torch._dynamo"
        assert "torch_shmem" not in sys.modules, "the autoload imported the torch_shmem package"
        assert "triton" not in sys.modules
        import torch_shmem.ops as O  # the wrappers do not import the compiler either
        s = O.create("ops-load-%d" % __import__("os").getpid(), (3,), torch.float32)
        O.publish(s, torch.ones(3))
        assert O.read(s).tolist() == [1.0, 1.0, 1.0]
        O.close(s)
        O.unlink(s.name)
        assert "torch._dynamo" not in sys.modules, "eager ops imported torch._dynamo"
        print("ok")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_autoload_is_only_deferred_when_disabled():
    out = run("""
        import sys, torch
        assert "torch_shmem_autoload" not in sys.modules
        import torch_shmem  # torch is imported: the ops are loaded now
        assert hasattr(torch.ops.shmem, "publish")
        assert torch._C._dispatch_has_kernel_for_dispatch_key("shmem::mirror_copy", "CPU")
        print("ok")
    """, autoload=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_compile_with_the_ops_after_a_bare_import_torch(name):
    # the fake kernels come with the autoload: no torch_shmem import is needed to compile,
    # and compiling the ops prints nothing (no "No CUDA runtime is found" from torch's C++
    # extension helpers)
    out = run(f"""
        import sys, torch
        token = torch.ops.shmem.create({name!r}, [4], torch.float32)
        buf = torch.zeros(4)
        src = torch.full((4,), 3.0)

        @torch.compile(fullgraph=True)
        def step():
            torch.ops.shmem.publish(token, src)
            torch.ops.shmem.read_into(token, buf)
            return torch.ops.shmem.read(token, [4], torch.float32)

        got = step()
        assert buf.tolist() == [3.0] * 4 and got.tolist() == [3.0] * 4
        assert int(token[3]) == 1  # one publication, recorded in the token
        assert "torch_shmem.ops" not in sys.modules
        torch.ops.shmem.close(token)
        print("ok")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
    assert "No CUDA runtime" not in out.stdout + out.stderr, out.stderr
    assert out.stderr.strip() == "", out.stderr


def test_mirror_copy_counter_is_exposed_by_the_wrappers():
    before = O.mirror_copy_calls
    torch.ops.shmem.mirror_copy(torch.arange(4.0), torch.zeros(4))
    assert O.mirror_copy_calls == before + 1
    with pytest.raises(AttributeError, match="no_such_name"):
        O.no_such_name  # noqa: B018


def test_create_gpu_records_notify(name, monkeypatch):
    """create(..., gpu_device=..., notify=True) reaches the op's notify argument (the
    header flag itself: tests/test_gpu.py::test_notify_is_recorded_on_gpu_streams)."""
    args = {a.name: a for a in torch.ops.shmem.create_gpu.default._schema.arguments}
    assert str(args["notify"].type) == "bool" and args["notify"].default_value is False
    from torch_shmem import _gpu

    seen = {}

    class Stop(Exception):
        pass

    def fake_create_gpu(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(_gpu, "require", lambda name: None)
    monkeypatch.setattr(_gpu, "device_index", lambda device, name: 0)
    monkeypatch.setattr(_gpu._ops, "create_gpu", fake_create_gpu)
    for notify in (True, False):
        with pytest.raises(Stop):
            _gpu.create_handle(name, (4,), np.float32, "cuda:0", False, 0o600, notify)
        assert seen["notify"] is notify


@no_gpu
def test_create_gpu_without_a_usable_gpu_is_a_clear_error(name):
    with pytest.raises(RuntimeError) as info:
        O.create_gpu(name, (4,), torch.float32)
    message = str(info.value)
    assert message.startswith(f"torch_shmem: stream {name!r}: GPU streams are unavailable: ")
    assert type(info.value) is RuntimeError  # not torch.AcceleratorError from deep inside
    assert name not in torch_shmem.list_streams()  # nothing was created
    # the same words as the NumPy API
    with pytest.raises(RuntimeError) as numpy_api:
        torch_shmem.create(name, shape=(4,), gpu_device="cuda:0")
    assert str(numpy_api.value) == message


@no_gpu
def test_open_of_a_gpu_stream_without_a_usable_gpu_is_a_clear_error(name, monkeypatch):
    # A GPU stream's header cannot be made without a GPU; stand in for one: the op fails
    # (here: no such stream) and the name is taken for a GPU stream.
    monkeypatch.setattr(O, "_is_device_stream", lambda n: True)
    with pytest.raises(RuntimeError, match=rf"stream {name!r}: GPU streams are unavailable") as info:
        O.open(name)
    assert "cannot open" in str(info.value.__cause__)  # the op's own error stays attached
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="cannot open"):  # a CPU (here: missing) stream
        O.open(name)
