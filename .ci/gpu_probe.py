"""Isolate crashes seen on a GPU: each case runs in a fresh process (30 s limit) and its
exit status and output tail are printed. Used as `python3 .ci/gpu_probe.py [CASE...]`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

PRE = """
import os, threading, time, uuid
import numpy as np, torch
import torch_shmem
from torch_shmem import ops as O
name = "probe-" + uuid.uuid4().hex[:10]
"""

CASES = {
    "value_error_cpu_stream": """
s = O.create(name, (4,), torch.float32)
try:
    O.wait_device(s, 1)
except ValueError as e:
    print("ValueError:", e)
O.close(s); O.unlink(name)
""",
    "value_error_gpu_count0_creator": """
s = O.create_gpu(name, (1024,), torch.float32, device=0, nslots=3)
try:
    O.wait_device(s, 0)
except ValueError as e:
    print("ValueError:", e)
O.close(s); O.unlink(name)
""",
    "value_error_gpu_count0_direct_op": """
s = O.create_gpu(name, (1024,), torch.float32, device=0, nslots=3)
try:
    torch.ops.shmem.wait_device(s.token, 0)
except ValueError as e:
    print("ValueError:", e)
O.close(s); O.unlink(name)
""",
    "runtime_error_gpu_publish_shape": """
s = O.create_gpu(name, (1024,), torch.float32, device=0, nslots=3)
try:
    O.publish(s, torch.zeros(7, device="cuda"))
except (ValueError, RuntimeError) as e:
    print(type(e).__name__, e)
O.close(s); O.unlink(name)
""",
    "wait_device_then_count0": """
s = O.create_gpu(name, (1024,), torch.float32, device=0, nslots=3)
r = O.open(name)
c = torch.cuda.Stream()
O.publish(s, torch.ones(1024, device="cuda"))
with torch.cuda.stream(c):
    O.wait_device(r, 1)
    print("parked on 1 ok")
    O.wait_device(r, 2)
    print("parked on 2 ok")
O.publish(s, torch.ones(1024, device="cuda"))
c.synchronize()
print("released ok", torch._C._cuda_getCurrentRawStream(0))
try:
    O.wait_device(r, 0)
except ValueError as e:
    print("ValueError:", e)
O.close(r); O.close(s); O.unlink(name)
""",
    "publish_in_thread_device_src": """
s = O.create_gpu(name, (4,), torch.float32, device=0, nslots=3)
def w():
    O.publish(s, torch.ones(4, device="cuda"))
    print("thread publish ok")
t = threading.Thread(target=w); t.start(); t.join()
print(O.read(s).tolist() if hasattr(O, "read") else "")
O.close(s); O.unlink(name)
""",
    "publish_in_thread_host_src": """
s = O.create_gpu(name, (4,), torch.float32, device=0, nslots=3)
def w():
    O.publish(s, torch.ones(4))
    print("thread publish ok")
t = threading.Thread(target=w); t.start(); t.join()
O.close(s); O.unlink(name)
""",
    "pyshmem_read_new_thread": """
w = torch_shmem.create(name, shape=(2, 2), dtype=np.float32, gpu_device="cuda:0")
r = torch_shmem.open(name, gpu_device="cuda:0")
w.write(np.zeros((2, 2), np.float32))
print(r.read().cpu().tolist())
def later():
    time.sleep(0.05)
    w.write(np.ones((2, 2), np.float32))
    print("thread write ok")
t = threading.Thread(target=later); t.start()
print(r.read_new(timeout=5.0).cpu().tolist())
t.join()
r.close(); w.close(); w.unlink()
""",
    "pyshmem_write_in_thread_no_wait": """
w = torch_shmem.create(name, shape=(2, 2), dtype=np.float32, gpu_device="cuda:0")
def later():
    w.write(np.ones((2, 2), np.float32))
    print("thread write ok")
t = threading.Thread(target=later); t.start(); t.join()
w.close(); w.unlink()
""",
}


def main(argv: list[str]) -> int:
    names = argv or list(CASES)
    env = dict(os.environ, TORCH_SHMEM_NATIVE_BACKTRACE="1", PYTHONFAULTHANDLER="1")
    for n in names:
        code = PRE + textwrap.dedent(CASES[n])
        try:
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, env=env)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = "timeout", (e.stdout or b"").decode() + (e.stderr or b"").decode()
        print(f"===== {n}: rc {rc}")
        lines = out.splitlines()
        print("\n".join(lines[-60:] if rc != 0 else lines[-8:]))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
