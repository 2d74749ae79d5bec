"""Child-process bodies for tests/test_gpu.py (spawn; they import torch)."""

import os
import signal
import time

import torch

import torch_shmem.ops as O


def read_once(name, q):
    s = O.open(name)
    q.put(O.read(s).cpu().tolist())
    O.close(s)


def publish_for(name, seconds, ready, q, base=0.0):
    """Open, say so (ready), then publish uniform frames base + 1, base + 2, ... for
    `seconds`; report how many."""
    s = O.open(name)
    x = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    ready.set()
    end = time.monotonic() + seconds
    k = 0
    while time.monotonic() < end:
        k += 1
        x.fill_(base + k)
        O.publish(s, x)
    torch.cuda.synchronize()
    q.put(k)
    O.close(s)


def publish_after(name, delay, value):
    s = O.open(name)
    time.sleep(delay)
    O.publish(s, torch.full(s.shape, value, dtype=s.dtype, device=s.device))
    torch.cuda.synchronize()
    O.close(s)


def create_and_exit(name, q):
    s = O.create_gpu(name, (4,), torch.float32, device=0)
    O.publish(s, torch.arange(4.0, device="cuda"))
    torch.cuda.synchronize()
    q.put("created")


def hold_lock_and_die(name, ready):
    import torch_shmem

    h = torch_shmem.open(name)
    h.acquire()
    ready.set()
    time.sleep(600)


def kill(pid):
    os.kill(pid, signal.SIGKILL)


def api_read(name, q):
    import torch_shmem

    s = torch_shmem.open(name, gpu_device="cuda:0")
    x = s.read()
    q.put((x.device.type, x.cpu().tolist()))
    s.close()


def leave_open_and_exit(name, q):
    import numpy as np

    import torch_shmem

    os.environ["TORCH_SHMEM_HOST_UPLOAD"] = "staged"
    s = torch_shmem.create(name, shape=(3 << 20,), dtype=np.float32, gpu_device="cuda:0", cpu_mirror=True)
    s.write(np.ones(3 << 20, np.float32))
    other = O.open(name)
    view = O.slot_view(other, 1)
    assert float(view[0]) == 1.0
    _LEFT_OPEN.extend((s, other, view))  # still referenced when the interpreter exits
    q.put("done")


_LEFT_OPEN = []


def attach_then_read_on_go(name, ready, go, q):
    s = O.open(name)
    ready.set()
    go.wait(120)
    q.put(O.read(s).cpu().tolist())
    O.close(s)


def device_wait_roundtrip(name, q):
    """Same-process device wait in a fresh process (TORCH_SHMEM_DEVICE_WAIT is read once
    per process): park a consumer CUDA stream on an unpublished count, publish it from
    a producer stream, and report what the consumer saw and the paths taken."""
    from torch_shmem import _C

    s = O.create_gpu(name, (4096,), torch.float32, device=0, nslots=3)
    producer, consumer = torch.cuda.Stream(), torch.cuda.Stream()
    try:
        # Made (and its fill kernel loaded) before the consumer parks: under lazy module
        # loading a kernel's first launch can wait for the parked stream (docs/gpu.md).
        with torch.cuda.stream(producer):
            src = torch.full((4096,), 5.0, device="cuda")
        producer.synchronize()
        with torch.cuda.stream(consumer):
            O.wait_device(s, 1)
            got = O.slot_view(s, 1).clone()
        time.sleep(0.2)
        parked = not consumer.query()
        with torch.cuda.stream(producer):
            O.publish(s, src)
        deadline = time.monotonic() + 30
        while not consumer.query() and time.monotonic() < deadline:
            time.sleep(0.005)
        released = consumer.query()
        value = float(got[0]) if released else None
        uniform = bool((got == got[0]).all()) if released else None
        q.put((parked, released, value, uniform, dict(_C.gpu_stats())))
    except BaseException as e:  # reported, so the test fails at once instead of waiting
        q.put(("error", f"{type(e).__name__}: {e}", None, None, None))
        raise
    finally:
        O.close(s)
        O.unlink(name)


def map_and_read_after_creator_exit(name, ready, creator_gone, q):
    """Map a GPU stream, then read it again once its creator has exited: report the
    outcome ("data", the values) or ("error", message)."""
    s = O.open(name)
    first = O.read(s).cpu().tolist()
    ready.set()
    creator_gone.wait(120)
    try:
        got = O.read(s)
        torch.cuda.synchronize()
        q.put(("data", first, got.cpu().tolist()))
    except RuntimeError as e:
        q.put(("error", first, str(e)))
    O.close(s)


def create_publish_wait(name, importer_ready):
    """Create and publish a GPU stream, wait until another process mapped it, exit."""
    s = O.create_gpu(name, (4,), torch.float32, device=0)
    O.publish(s, torch.arange(4.0, device="cuda"))
    torch.cuda.synchronize()
    importer_ready.wait(120)
