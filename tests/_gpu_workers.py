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


def publish_frames(name, frames, ready):
    s = O.open(name)
    ready.wait(60)
    x = torch.empty(s.shape, dtype=s.dtype, device=s.device)
    for k in range(1, frames + 1):
        x.fill_(k)
        O.publish(s, x)
    torch.cuda.synchronize()
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
