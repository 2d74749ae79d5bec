"""Resource limits and leaks.

- 10,000 create/open/write/read/view/lock/close/unlink cycles (plus the failure
  paths: existing name, missing name, foreign segment) leave this process's
  open fds, its mappings (/proc/self/maps) and /dev/shm exactly as they were.
- A stream too large for /dev/shm fails at create() with a clear OSError
  (ENOSPC in a private 64 MiB tmpfs; EFBIG under a file-size rlimit), leaves
  nothing behind, and a stream that was created never gets SIGBUS later,
  even when /dev/shm is filled to the last byte afterwards.
"""

from __future__ import annotations

import os
import select
import time

import numpy as np
import pytest

import _reliability_workers as rw
import torch_shmem
from torch_shmem import InconsistentStreamError

SHM = "/dev/shm/torch_shmem."


def fds():
    return sorted(os.listdir("/proc/self/fd"))


def maps():
    with open("/proc/self/maps") as f:
        return f.read().splitlines()


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cycles(prefix, count, sizes):
    """count full lifecycles; every 100th also exercises the failure paths."""
    foreign = prefix + "-foreign"
    with open(SHM + foreign, "wb") as f:
        f.write(b"not a stream" * 1000)
    try:
        for i in range(count):
            n = sizes[i % len(sizes)]
            name = f"{prefix}-{i % 7}"
            s = torch_shmem.create(name, shape=(n,), dtype=np.uint8)
            r = torch_shmem.open(name)
            ro = torch_shmem.open(name, readonly=True) if i % 3 == 0 else None
            s.write(np.full(n, i % 251, np.uint8), frame_id=i)
            assert r.read()[-1] == i % 251
            r.read(out=np.empty(n, np.uint8))
            r.read_publication()
            with s.write_view() as v:
                v[...] = 1
            with s.locked():
                assert s.read(safe=False)[0] == 1
            try:
                r.read_new(timeout=0)
            except TimeoutError:
                pass
            if i % 10 == 0:
                torch_shmem.stat(name)
                s.clear(timeout=1)
                fd = r.fileno()  # a readiness descriptor: closed with r below
                assert select.select([fd], [], [], 5)[0] == [fd]
            if i % 100 == 0:
                with pytest.raises(FileExistsError):
                    torch_shmem.create(name, shape=(n,), dtype=np.uint8)
                with pytest.raises(FileNotFoundError):
                    torch_shmem.open(prefix + "-missing")
                with pytest.raises(ValueError):
                    torch_shmem.open(foreign)
                with s.write_view() as v:  # an aborted view, then a repair
                    pass
                try:
                    with s.write_view():
                        raise KeyError("abort")
                except KeyError:
                    pass
                with pytest.raises(InconsistentStreamError):
                    r.read()
                s.write(np.zeros(n, np.uint8))
            if i % 500 == 0:
                torch_shmem.list_streams()
            if ro is not None:
                ro.close()
            r.close()
            s.unlink()
    finally:
        os.unlink(SHM + foreign)


def leak_check(name, count, sizes):
    prefix = f"{name}-leak"
    cycles(prefix, 200, sizes)  # warm-up: caches, lazily imported modules, arenas
    fds0, maps0, rss0 = fds(), maps(), rss_kib()
    shm0 = sorted(os.listdir("/dev/shm"))
    t0 = time.monotonic()
    cycles(prefix, count, sizes)
    took = time.monotonic() - t0
    fds1, maps1, rss1 = fds(), maps(), rss_kib()
    shm1 = sorted(os.listdir("/dev/shm"))
    ours0 = [m for m in maps0 if "/dev/shm" in m]
    ours1 = [m for m in maps1 if "/dev/shm" in m]
    fig = {"cycles": count, "seconds": round(took, 2), "fds_before": len(fds0),
           "fds_after": len(fds1), "maps_before": len(maps0), "maps_after": len(maps1),
           "shm_maps_before": len(ours0), "shm_maps_after": len(ours1),
           "rss_kib_before": rss0, "rss_kib_after": rss1}
    print(f"leak figures: {fig}")
    assert fds1 == fds0, "file descriptors leaked"
    assert ours1 == ours0, "shared-memory mappings leaked"
    # other mappings come and go with Python's allocator: a leak of one mapping
    # per cycle would show as thousands
    assert len(maps1) <= len(maps0) + 16
    mine = [e for e in shm1 if prefix in e]
    assert mine == [], f"/dev/shm entries left behind: {mine}"
    assert not [e for e in set(shm1) - set(shm0) if name in e]
    notify = f"torch_shmem-notify.{os.getpid()}."
    assert not [e for e in shm1 if e.startswith(notify)], "readiness sockets left behind"
    assert rss1 - rss0 < 64 * 1024, "resident memory grew by more than 64 MiB"
    return fig


@pytest.mark.cpu
def test_10000_lifecycles_leak_nothing(name):
    leak_check(name, 10_000, [1, 8, 100, 4096, 4097, 65536])


@pytest.mark.slow
def test_100000_lifecycles_leak_nothing(name):
    leak_check(name, 100_000, [1, 8, 100, 4096, 4097, 65536, 1 << 20])


CREATE_TOO_LARGE = r"""
import errno, os, numpy as np, torch_shmem

def free():
    v = os.statvfs("/dev/shm")
    return v.f_bavail * v.f_frsize

MiB = 1 << 20
assert os.listdir("/dev/shm") == []
before = free()
# larger than the whole tmpfs
try:
    torch_shmem.create("huge", shape=(100 * MiB,), dtype=np.uint8)
    raise SystemExit("100 MiB stream created in a 64 MiB /dev/shm")
except OSError as exc:
    assert exc.errno == errno.ENOSPC, exc
    assert "bytes" in str(exc) and "huge" in str(exc), exc
    print("ENOSPC:", exc)
assert os.listdir("/dev/shm") == [] and free() == before

# fits, then a second one that only partly fits: fallocate fails half way
a = torch_shmem.create("a", shape=(40 * MiB,), dtype=np.uint8)
mid = free()
try:
    torch_shmem.create("b", shape=(40 * MiB,), dtype=np.uint8)
    raise SystemExit("second 40 MiB stream created in a 64 MiB /dev/shm")
except OSError as exc:
    assert exc.errno == errno.ENOSPC, exc
assert sorted(os.listdir("/dev/shm")) == ["torch_shmem.a"], os.listdir("/dev/shm")
assert free() == mid, (free(), mid)  # the partial reservation was given back

# fill /dev/shm to the last byte with somebody else's file ...
fd = os.open("/dev/shm/filler", os.O_WRONLY | os.O_CREAT, 0o600)
for piece in (b"x" * MiB, b"x" * 4096, b"x"):
    try:
        while True:
            os.write(fd, piece)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
os.close(fd)
assert free() == 0
# ... the stream's pages were reserved at create: writing every page is no SIGBUS
value = np.arange(40 * MiB, dtype=np.uint64).astype(np.uint8)
a.write(value)
with a.write_view() as v:
    v[::4096] = 7
r = torch_shmem.open("a")
got = r.read()
assert got[::4096].tolist() == [7] * (40 * MiB // 4096)
print("full /dev/shm, stream still writable:", got.nbytes)
"""


@pytest.mark.cpu
def test_too_large_for_dev_shm_fails_at_create_never_sigbus():
    out = rw.run_isolated(CREATE_TOO_LARGE, size="64m")
    assert "ENOSPC" in out and "stream still writable" in out


FSIZE_LIMIT = r"""
import errno, os, resource, uuid, numpy as np, torch_shmem
name = "fsize-" + uuid.uuid4().hex[:8]
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    torch_shmem.create(name, shape=(4 << 20,), dtype=np.uint8)
    raise SystemExit("created past RLIMIT_FSIZE")
except OSError as exc:  # Python ignores SIGXFSZ, so this is EFBIG, not a kill
    assert exc.errno == errno.EFBIG, exc
    assert name in str(exc) and "bytes" in str(exc), exc
    print("EFBIG:", exc)
assert not os.path.exists("/dev/shm/torch_shmem." + name)
s = torch_shmem.create(name, shape=(1000,), dtype=np.uint8)  # within the limit
s.write(np.ones(1000, np.uint8))
s.unlink()
"""


@pytest.mark.cpu
def test_file_size_rlimit_fails_at_create_with_efbig():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FSIZE_LIMIT], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "EFBIG" in done.stdout
