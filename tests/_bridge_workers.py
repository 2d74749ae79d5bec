"""Child-process bodies for tests/test_bridge.py (spawn context).

Each child reports through a queue and runs until its stop event is set or
it is killed; everything it opens is closed on the way out.
"""

import time

import torch_shmem
from torch_shmem import bridge
from _workers import frame_seq


def serve(name, bind, ready, stop, kwargs):
    """A bridge server for `name`; puts its endpoint on `ready`, runs until `stop`."""
    with bridge.serve(name, bind, **kwargs) as srv:
        ready.put(srv.endpoint)
        while not stop.wait(0.05):
            pass


def serve_run(name, bind, ready):
    """A bridge server in the blocking run() form (stopped by SIGINT)."""
    srv = bridge.BridgeServer(name, bind).open()
    ready.put(srv.endpoint)
    srv.run()
    ready.put(("returned", srv.running))


def attach(endpoint, local_name, ready, stop, kwargs):
    """A bridge attachment into `local_name`; puts "ok" (or the error) on `ready`."""
    try:
        att = bridge.attach(endpoint, local_name, timeout=15.0, **kwargs)
    except Exception as exc:  # reported to the test
        ready.put(f"{type(exc).__name__}: {exc}")
        return
    with att:
        ready.put("ok")
        while not stop.wait(0.05):
            pass


def attach_and_check(endpoint, local_name, last_k, results, timeout):
    """Attach, read the local stream until checksummed frame `last_k` arrives, verify every frame."""
    reads = torn = regress = 0
    last = -1
    with bridge.attach(endpoint, local_name, timeout=timeout) as att:
        shm = torch_shmem.open(local_name, readonly=True)
        deadline = time.monotonic() + timeout
        after = 0
        try:
            while last < last_k and time.monotonic() < deadline:
                try:
                    frame = shm.read_after(after, timeout=0.2)
                except TimeoutError:
                    continue
                after = shm.last_read_count
                k = frame_seq(frame)
                reads += 1
                if k < 0:
                    torn += 1
                elif k < last:
                    regress += 1
                else:
                    last = k
            st = att.stat()
        finally:
            shm.close()
    results.put((local_name, reads, torn, regress, last, st["malformed"], st["delivered"]))
