"""Checks behind ``torch-shmem doctor``: each finding says what is wrong and what to do.

Nothing here changes the system except one temporary stream (created,
exercised and unlinked) to prove that streams work for this user. torch is
imported only for the CUDA checks, and only when it is installed and the
caller did not opt out.
"""

from __future__ import annotations

import importlib.util
import os
import stat as stat_mod
import uuid
from dataclasses import dataclass

import numpy as np

from . import _admin, _proc
from ._labels import fmt_bytes

__all__ = ["Finding", "run_checks"]

# Below this, /dev/shm is probably a container default (Docker: 64 MiB).
_SMALL_SHM = 1 << 30


@dataclass
class Finding:
    level: str  # "ok", "info", "warn" or "error"
    title: str
    detail: str = ""
    fix: str = ""


def _fs_type(path: str) -> str | None:
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split() for line in f]
    except OSError:
        return None
    best = None
    for m in mounts:
        if len(m) >= 3 and (path == m[1] or path.startswith(m[1].rstrip("/") + "/")):
            if best is None or len(m[1]) > len(best[1]):
                best = m
    return best[2] if best else None


def _check_shm_dir(entries: list[dict]) -> list[Finding]:
    d = _proc.SHM_DIR
    if not os.path.isdir(d):
        return [Finding("error", f"{d} does not exist",
                        "POSIX shared memory needs a tmpfs mounted there.",
                        f"mount -t tmpfs -o size=1G tmpfs {d} (as root), or fix the container's mounts")]
    out = []
    fs = _fs_type(d)
    if fs not in (None, "tmpfs"):
        out.append(Finding("warn", f"{d} is {fs}, not tmpfs",
                           "Streams would live on a disk-backed file system.",
                           f"mount a tmpfs on {d}"))
    vfs = os.statvfs(d)
    size = vfs.f_blocks * vfs.f_frsize
    free = vfs.f_bavail * vfs.f_frsize
    used_by_streams = sum(e.get("segment_bytes", 0) for e in entries)
    largest = max((e.get("segment_bytes", 0) for e in entries), default=0)
    summary = (f"{fs or 'unknown fs'}, size {fmt_bytes(size)}, free {fmt_bytes(free)}; "
               f"{len(entries)} stream file(s) use {fmt_bytes(used_by_streams)}")
    if size < _SMALL_SHM:
        out.append(Finding("warn", f"{d} is small: {summary}",
                           "Containers default to 64 MiB; a stream larger than the free space "
                           "fails at create() with OSError(ENOSPC).",
                           "docker run --shm-size=8g ... (or ipc: host / shm_size: in compose; "
                           "emptyDir medium: Memory in Kubernetes)"))
    elif free < max(0.1 * size, largest):
        out.append(Finding("warn", f"{d} is nearly full: {summary}",
                           "New streams may fail with OSError(ENOSPC).",
                           "torch-shmem purge --dead-only removes orphans; torch-shmem list "
                           "shows what uses the space"))
    else:
        out.append(Finding("ok", f"{d}: {summary}"))
    return out


def _check_permissions(entries: list[dict]) -> list[Finding]:
    d = _proc.SHM_DIR
    out = []
    if not os.access(d, os.W_OK | os.X_OK):
        out.append(Finding("error", f"{d} is not writable by this user",
                           "create() fails with PermissionError.",
                           f"chmod 1777 {d} (as root)"))
    elif not os.stat(d).st_mode & stat_mod.S_ISVTX:
        out.append(Finding("warn", f"{d} lacks the sticky bit",
                           "Any user can remove any other user's streams.",
                           f"chmod +t {d} (as root)"))
    # Exercise the whole path once: create, write, wait, read, unlink.
    from . import _stream

    name = f"torch-shmem-doctor-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        s = _stream.create(name, shape=(4,), dtype=np.float32)
        try:
            n = s.count
            s.write(np.arange(4, dtype=np.float32))
            got = s.read_after(n, timeout=1.0)
            if got.tolist() != [0.0, 1.0, 2.0, 3.0]:
                raise RuntimeError(f"read back {got.tolist()}")
        finally:
            s.unlink()
        out.append(Finding("ok", "a test stream was created, written, read and unlinked"))
    except Exception as exc:
        out.append(Finding("error", "streams do not work for this user",
                           f"{type(exc).__name__}: {exc}",
                           "see the message; docs/platform.md lists the requirements"))
    denied = [e for e in entries if "error" in e and "ermission" in e["error"]]
    invalid = [e for e in entries if "error" in e and e not in denied]
    if denied:
        out.append(Finding("info", f"{len(denied)} stream(s) belong to other users and cannot "
                           "be opened: " + ", ".join(repr(e["name"]) for e in denied)))
    for e in invalid:
        out.append(Finding("warn", f"{_proc.SHM_DIR}/{_admin.PREFIX}{e['name']} is not a valid "
                           "stream", e["error"],
                           f"torch-shmem unlink {_quote(e['name'])}"))
    wide = [e for e in entries if "error" not in e and e["mode"] & 0o077]
    if wide:
        out.append(Finding("info", f"{len(wide)} stream(s) are accessible to other users: "
                           + ", ".join(f"{e['name']!r} ({oct(e['mode'])})" for e in wide)))
    return out


def _quote(name: str) -> str:
    import shlex

    return shlex.quote(name)


def _check_streams(entries: list[dict]) -> list[Finding]:
    out = []
    valid = [e for e in entries if "error" not in e]
    orphans = [e for e in valid if e.get("orphan")]
    if orphans:
        out.append(Finding("warn", f"{len(orphans)} orphan stream(s): creator dead, nobody maps them",
                           ", ".join(repr(e["name"]) for e in orphans),
                           "torch-shmem purge --dead-only"))
    held = [e for e in valid if not e["creator_alive"] and e.get("holders")]
    for e in held:
        out.append(Finding("info", f"stream {e['name']!r}: its creator (pid {e['creator_pid']}) "
                           f"died; still mapped by pid(s) {', '.join(map(str, e['holders']))}"))
    for e in valid:
        if e["state"] == "inconsistent":
            out.append(Finding("warn", f"stream {e['name']!r} holds an incomplete write",
                               "Its last writer died or aborted mid-write; reads raise "
                               "InconsistentStreamError.",
                               "the next completed write repairs it; or torch-shmem unlink "
                               + _quote(e["name"])))
        elif e["lock_owner"] is not None and not e["lock_owner_alive"]:
            out.append(Finding("info", f"stream {e['name']!r}: its lock is held by dead pid "
                               f"{e['lock_owner']}", "The next acquirer takes it over at once."))
    if not entries:
        out.append(Finding("ok", "no streams in /dev/shm"))
    elif not orphans:
        out.append(Finding("ok", f"{len(valid)} stream(s), no orphans"))
    return out


def _check_cuda(skip_torch: bool) -> list[Finding]:
    out = []
    cuda_files = _admin.cuda_orphans()
    if cuda_files:
        out.append(Finding("warn", f"{len(cuda_files)} orphaned torch ref-count file(s) in "
                           f"{_proc.SHM_DIR} (producer dead, nobody maps them)",
                           ", ".join(cuda_files[:8]) + (" ..." if len(cuda_files) > 8 else ""),
                           "torch-shmem purge --include-cuda-orphans"))
    if skip_torch:
        out.append(Finding("info", "CUDA checks skipped (--no-cuda)"))
        return out
    if importlib.util.find_spec("torch") is None:
        out.append(Finding("info", "torch is not installed: CUDA checks skipped",
                           "CPU streams do not need torch."))
        return out
    try:
        import torch
    except Exception as exc:
        out.append(Finding("warn", "torch is installed but fails to import",
                           f"{type(exc).__name__}: {exc}", "reinstall torch"))
        return out
    if torch.version.cuda is None:
        out.append(Finding("info", f"torch {torch.__version__} is a CPU-only build"))
        return out
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        out.append(Finding("info", f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no "
                           "CUDA device",
                           f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else
                           "no driver or no GPU on this machine",
                           "check nvidia-smi; in containers pass --gpus all"))
        return out
    n = torch.cuda.device_count()
    for i in range(n):
        name = torch.cuda.get_device_name(i)
        try:
            # Exporting an allocation for IPC is what GPU streams need.
            t = torch.empty(1, device=f"cuda:{i}")
            t.untyped_storage()._share_cuda_()
            out.append(Finding("ok", f"cuda:{i} {name}: CUDA IPC export works"))
        except Exception as exc:
            out.append(Finding("warn", f"cuda:{i} {name}: CUDA IPC export fails",
                               f"{type(exc).__name__}: {exc}",
                               "CUDA IPC needs Linux with a real driver (not WSL or MIG "
                               "slices without IPC); GPU streams will not work here"))
    try:
        from . import _gpu

        usable, why = _gpu.availability()
    except Exception as exc:  # the op library failed to load: say so, do not crash doctor
        usable, why = False, f"torch_shmem's op library does not load: {type(exc).__name__}: {exc}"
    if usable:
        out.append(Finding("ok", "GPU streams are usable (torch_shmem.gpu_available() is True)"))
    else:
        out.append(Finding("warn", "GPU streams are not usable in this process", why,
                           "rebuild torch_shmem with CUDA_HOME set to a CUDA toolkit "
                           "(pip install --no-build-isolation -e .)"))
    return out


def run_checks(*, skip_torch: bool = False) -> list[Finding]:
    """All checks, in display order."""
    entries = _admin.scan(holders=True)
    return (
        _check_shm_dir(entries)
        + _check_permissions(entries)
        + _check_streams(entries)
        + _check_cuda(skip_torch)
    )
