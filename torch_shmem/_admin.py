"""Discovery and cleanup: list_streams(), stat(), purge() and the CLI's scan.

Every stream is one file, ``/dev/shm/torch_shmem.<name>``; the part after
the prefix is the user-visible name (any UTF-8 text the name rules allow).
A file there counts as a stream only if it opens and validates (the native
open checks the whole header), so nothing else in /dev/shm is ever listed
or removed. Metadata is read through a read-only mapping that is closed
before returning; the payload is never copied.

Orphans: a stream whose creator is dead, that no live process maps and
whose lock no live process holds. "Maps" comes from /proc/PID/maps matched
by device and inode, so a process holding an older, unlinked generation of
the name does not count. Where the maps of other users' processes cannot be read,
only streams that other users could not open (mode 0600, ours) can be
called orphans.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any

from . import _core, _proc
from ._labels import state_label
from ._dtypes import code_dtype
from ._stream import RING_POLICIES, _check_name

__all__ = ["list_streams", "purge", "scan", "stat", "PREFIX"]

PREFIX = "torch_shmem."

# Cross-process ref-count files of CUDA IPC, both encoding the producer's pid.
# torch 2.x names its ref counters (and the CPU storages of the file_system
# sharing strategy) /dev/shm/torch_<pid>_<random>_<n>; the CUDA IPC
# ref-count files pyshmem 1.4 sweeps are cuda.shm.<id>.<pid hex>.<n>.
_TORCH_REFCOUNT = re.compile(r"^torch_(\d+)_\d+_\d+$")
_CUDA_SHM = "cuda.shm."


def _path(name: str) -> str:
    return os.path.join(_proc.SHM_DIR, PREFIX + name)


def _candidate_names() -> list[str]:
    """User-visible names of the files carrying the stream prefix (unvalidated)."""
    try:
        entries = os.listdir(_proc.SHM_DIR)
    except OSError:
        return []
    names = []
    for entry in entries:
        if not entry.startswith(PREFIX):
            continue
        name = entry[len(PREFIX):]
        try:
            _core.os_name(name)  # a name create() would accept (UTF-8, no '/', ...)
        except ValueError:  # includes UnicodeEncodeError of non-UTF-8 file names
            continue
        names.append(name)
    return sorted(names)


def _missing(name: str) -> FileNotFoundError:
    return FileNotFoundError(
        2,
        f"torch_shmem: stream {name!r} does not exist; create it with "
        f"torch_shmem.create({name!r}, shape=..., dtype=...)",
    )


def _read_stat(name: str) -> dict[str, Any]:
    """stat() without the name check; raises FileNotFoundError, PermissionError, ValueError."""
    try:
        st = os.stat(_path(name))
        h = _core.open(name, True)
    except FileNotFoundError:
        raise _missing(name) from None
    try:
        info = h.info()
        code, shape, nbytes, flags, creator_pid, instance_id, ctime, mode = info
        nslots = info.nslots
        device_index = info.device_index
        state = h.state()
        seq, write_ns, frame_id, broken, _unlinked, lock_pid, _tid, waiters = state
        armed = state.armed_readers
        live_slot = state.live_slot
        rotating = bool(state.slot_contention) and not live_slot
        importers = list(h.importers())
        ring_info = h.ring_info()
    finally:
        h.close(1.0)
    creator_alive = _proc.pid_alive(creator_pid, created_at=ctime)
    lock_owner = lock_pid or None
    lock_alive = lock_owner is not None and _proc.pid_alive(lock_owner)
    state = state_label(seq, broken, lock_pid)
    write_time = write_ns * 1e-9
    gpu = bool(flags & _core.FLAG_GPU)
    ring = None
    if ring_info is not None:
        nring, policy, drops, cursors = ring_info
        ring = {
            "size": nring,
            "policy": RING_POLICIES[policy],
            "drops": drops,
            "cursors": [
                {
                    "name": cname,
                    "pid": owner or None,
                    "last_pid": last_pid,
                    "alive": bool(alive),
                    "consumed": consumed,
                    "lag": max(0, (seq >> 1) - consumed),
                    "missed": missed,
                }
                for _index, cname, owner, last_pid, alive, consumed, missed in cursors
            ],
        }
    return {
        "name": name,
        "shape": list(shape),
        "dtype": str(code_dtype(code)),
        "size": nbytes,
        "gpu_enabled": gpu,
        "gpu_device": f"cuda:{device_index}" if gpu else None,
        "cpu_mirror": not gpu or bool(flags & _core.FLAG_CPU_MIRROR),
        "gpu_importers": importers,
        "notify": bool(flags & _core.FLAG_NOTIFY),
        "slots": nslots,
        # slotted streams: the slot a live view pinned (writes then go there in place)
        "pinned_slot": live_slot - 1 if live_slot else None,
        # slotted streams: writes go to the next slot (a read overlapped a write once)
        # rather than rewriting the latest slot in place
        "slots_rotating": nslots > 1 and rotating,
        "ring": ring,
        "instance_id": instance_id.hex(),
        "creator_pid": creator_pid,
        "creator_alive": creator_alive,
        "create_time": ctime,
        "count": seq >> 1,
        "write_sequence": seq,
        "write_time": write_time,
        "age": max(0.0, time.time() - write_time) if write_ns > 0 else math.inf,
        "frame_id": frame_id,
        "state": state,
        "lock_owner": lock_owner,
        "lock_owner_alive": lock_alive,
        "waiters": waiters,
        "armed_descriptors": armed,
        "mode": mode,
        "uid": st.st_uid,
        "segment_bytes": st.st_size,
        "bridge": bridge_link(name),
        "_file": (st.st_dev, st.st_ino),
    }


def bridge_link(name: str) -> dict[str, Any] | None:
    """The link state of the bridge attachment feeding stream ``name``
    (docs/bridge.md), or None when no attachment keeps a sidecar for it.

    A subset of ``torch_shmem.bridge.link_status``: ``state`` (``up``,
    ``connecting``, ``stale``, ``stopped``...), ``alive``, ``source_count``,
    ``delivered_count``, ``behind``, ``skipped``, ``lag`` and ``age`` (s).
    Reading it needs no pyzmq.
    """
    try:
        side = _core.os_name(name + ".bridge")
    except ValueError:
        return None  # no room for the suffix: such a stream has no sidecar
    if not os.path.exists(_proc.SHM_DIR + side):
        return None
    from . import bridge  # noqa: PLC0415  (imports no zmq; only when a sidecar exists)

    try:
        row = bridge.link_status(name)
    except (FileNotFoundError, PermissionError, ValueError):
        return None
    keys = ("state", "alive", "source_count", "delivered_count", "behind", "skipped", "lag", "age")
    return {k: row[k] for k in keys}


def stat(name: str) -> dict[str, Any]:
    """Metadata of a stream, without attaching a handle or copying the payload.

    Keys: ``name``, ``shape`` (list), ``dtype`` (str), ``size`` (payload
    bytes), ``gpu_enabled``, ``gpu_device``, ``cpu_mirror``, ``gpu_importers``
    (pids of the live processes other than the creator that map a GPU
    stream's device memory; the creator frees it only once they are gone), ``notify``
    (True: waits are always futex-notified), ``instance_id``,
    ``creator_pid``, ``creator_alive``, ``create_time``, ``count``,
    ``write_sequence``, ``write_time`` (0.0 before the first write), ``age``
    (``math.inf`` before it), ``frame_id``, ``state`` (``"ok"``,
    ``"writing"`` or ``"inconsistent"``), ``lock_owner`` (pid or None),
    ``lock_owner_alive``, ``waiters`` (parked readers), ``armed_descriptors``
    (readiness descriptors waiting for the next publication: ``fileno()``
    watchers and asyncio waits), ``mode``, ``uid``,
    ``segment_bytes`` (header + payload, page-rounded), ``bridge`` (the
    link state of a bridge attachment feeding the stream, see
    :func:`bridge_link`; None for other streams) and ``ring``: None except
    for rings: ``{"size", "policy", "drops", "cursors"}`` where each
    cursor is ``{"name", "pid"`` (owner now, None when released),
    ``"last_pid", "alive", "consumed", "lag"`` (publications made that it
    has not consumed), ``"missed"}``.

    Raises FileNotFoundError when it does not exist, PermissionError when
    this user may not open it, ValueError for a corrupted segment.
    """
    _check_name(name)
    info = _read_stat(name)
    del info["_file"]
    return info


def list_streams() -> list[str]:
    """Sorted user-visible names of the streams in /dev/shm.

    Only files that validate as torch_shmem streams are listed, plus the
    streams of other users that this user may not open (their names are
    visible; :func:`stat` raises PermissionError for them) and streams whose
    dtype NumPy cannot represent (GPU-only dtypes). Non-ASCII names are
    returned as created.
    """
    names = []
    for name in _candidate_names():
        try:
            h = _core.open(name, True)
        except (PermissionError, TypeError):  # valid, but not openable here
            names.append(name)
            continue
        except (FileNotFoundError, ValueError):
            continue  # removed meanwhile, or not a stream
        h.close(1.0)
        names.append(name)
    return names


def scan(*, holders: bool = True) -> list[dict[str, Any]]:
    """One entry per file carrying the stream prefix, for the CLI.

    Valid streams get the :func:`stat` keys plus, with ``holders=True``,
    ``holders`` (pids mapping the stream) and ``orphan`` (see the module
    docstring). Files that are not readable streams get only ``name`` and
    ``error`` (a message). Sorted by name.
    """
    entries: list[dict[str, Any]] = []
    for name in _candidate_names():
        try:
            entries.append(_read_stat(name))
        except FileNotFoundError:
            continue
        except (PermissionError, ValueError, TypeError) as exc:
            entries.append({"name": name, "error": str(exc)})
    if holders:
        _add_holders(entries)
    for e in entries:
        e.pop("_file", None)
    return entries


def stat_with_holders(name: str) -> dict[str, Any]:
    """:func:`stat` plus ``holders`` and ``orphan`` as in :func:`scan`, for one stream."""
    _check_name(name)
    info = _read_stat(name)
    _add_holders([info])
    info.pop("_file", None)
    return info


def is_orphan(name: str, instance_id: str, *, ignore_pids: frozenset | set = frozenset()) -> bool:
    """Whether generation ``instance_id`` of ``name`` is an orphan as :func:`scan` says.

    Mappings by ``ignore_pids`` do not count (``torch-shmem watch`` maps what
    it watches). False when the name is gone, holds another generation, or
    cannot be read. Scans the processes' maps only when the creator is dead
    and no live process holds the lock.
    """
    try:
        info = _read_stat(name)
    except (OSError, ValueError, TypeError):
        return False
    if info["instance_id"] != instance_id or info["creator_alive"] or info["lock_owner_alive"]:
        return False
    _add_holders([info], ignore_pids=ignore_pids)
    return info["orphan"]


def _add_holders(entries: list[dict[str, Any]], *, ignore_pids: frozenset | set = frozenset()) -> None:
    files = {e["_file"] for e in entries if "_file" in e}
    mapped, complete = _proc.scan_mappings(files)
    euid = os.geteuid()
    for e in entries:
        if "error" in e:
            continue
        pids = sorted(set(mapped.get(e["_file"], ())) - set(ignore_pids))
        e["holders"] = pids
        # Without every process's maps, only a stream no other user can
        # open (ours, mode 0600) can be known to be unmapped.
        known = complete or (e["uid"] == euid and not e["mode"] & 0o066)
        e["orphan"] = bool(
            known and not e["creator_alive"] and not pids and not e["lock_owner_alive"]
        )


def _unlink_generation(name: str, instance_id: str) -> bool:
    """Unlink ``name`` only if it still holds generation ``instance_id`` (hex)."""
    from ._stream import unlink_generation

    return unlink_generation(name, bytes.fromhex(instance_id)) == "removed"


def cuda_orphans() -> list[str]:
    """/dev/shm files of CUDA IPC ref counting left by dead producers.

    A file qualifies when its name encodes a producer pid, that process is
    dead (a live producer's files are never touched) and no live process
    visibly maps the file:

    - ``cuda.shm.<id>.<pid hex>.<n>`` (the files pyshmem 1.4 sweeps): a
      ref counter counts users of its producer's device memory, which is
      gone once the producer has exited, so the dead producer decides, as
      in pyshmem, even where other users' maps cannot be read.
    - ``torch_<pid>_<random>_<n>`` (torch 2.x): the same names back CPU
      tensors of torch's file_system sharing strategy, which outlive their
      producer, so these also need the map scan to be conclusive: every
      process's maps were readable, or the file is ours with mode 0600.

    Returns base names, sorted.
    """
    try:
        entries = os.listdir(_proc.SHM_DIR)
    except OSError:
        return []
    found: dict[tuple[int, int], str] = {}
    found_meta: dict[tuple[int, int], os.stat_result] = {}
    for base in entries:
        pid = _refcount_pid(base)
        if pid is None or _proc.pid_alive(pid):
            continue
        try:
            st = os.stat(os.path.join(_proc.SHM_DIR, base))
        except OSError:
            continue
        found[(st.st_dev, st.st_ino)] = base
        found_meta[(st.st_dev, st.st_ino)] = st
    mapped, complete = _proc.scan_mappings(set(found))
    euid = os.geteuid()
    result = []
    for key, base in found.items():
        if key in mapped:
            continue
        st = found_meta[key]
        if base.startswith(_CUDA_SHM) or complete or (
            st.st_uid == euid and not st.st_mode & 0o066
        ):
            result.append(base)
    return sorted(result)


def _refcount_pid(base: str) -> int | None:
    m = _TORCH_REFCOUNT.match(base)
    if m:
        return int(m.group(1))
    parts = base.split(".")
    if len(parts) >= 4 and base.startswith(_CUDA_SHM):
        try:
            return int(parts[-2], 16)
        except ValueError:
            return None
    return None


_LEFTOVER_PREFIXES = ("torch_shmem-notify.", "torch_shmem-unlinking.")


def leftovers() -> list[str]:
    """Files in /dev/shm that dead torch_shmem processes left behind.

    ``torch_shmem-notify.<pid>.<token>``: the socket of a readiness
    descriptor (:meth:`SharedMemory.fileno`) whose process died without
    closing its handle. ``torch_shmem-unlinking.<pid>.<n>``: a stream that a
    generation-checked unlink had renamed aside when its process died,
    before removing it (the stream had already lost its name). Only files
    whose pid is dead qualify. Returns base names, sorted.
    """
    try:
        entries = os.listdir(_proc.SHM_DIR)
    except OSError:
        return []
    result = []
    for base in entries:
        if not base.startswith(_LEFTOVER_PREFIXES):
            continue
        try:
            pid = int(base.split(".")[1])
        except (IndexError, ValueError):
            continue
        if pid > 0 and not _proc.pid_alive(pid):
            result.append(base)
    return sorted(result)


def _remove_files(bases: list[str], skipped: list) -> list[str]:
    """Remove /dev/shm files by base name; return those removed (gone already:
    skipped silently; other errors go to ``skipped``)."""
    removed = []
    for base in bases:
        try:
            os.unlink(os.path.join(_proc.SHM_DIR, base))
        except FileNotFoundError:
            continue
        except OSError as exc:
            skipped.append((base, str(exc)))
            continue
        removed.append(base)
    return removed


def purge_report(*, dead_only: bool = False, include_cuda_orphans: bool = False) -> dict[str, list]:
    """The work of :func:`purge`, with everything the CLI reports.

    Returns ``{"removed": [names], "skipped": [(name, reason)],
    "cuda_removed": [base names], "leftovers_removed": [base names]}``
    (see :func:`leftovers`; removed in both modes, as they belong to dead
    processes only).
    """
    removed: list[str] = []
    skipped: list[tuple[str, str]] = []
    for e in scan(holders=dead_only):
        name = e["name"]
        if "error" in e:
            skipped.append((name, e["error"]))
            continue
        if dead_only and not e["orphan"]:
            continue
        try:
            if dead_only:
                ok = _unlink_generation(name, e["instance_id"])
            else:
                ok = bool(_core.unlink(name))
        except PermissionError as exc:
            skipped.append((name, str(exc)))
            continue
        if ok:
            removed.append(name)
    cuda_removed = _remove_files(cuda_orphans(), skipped) if include_cuda_orphans else []
    leftovers_removed = _remove_files(leftovers(), skipped)
    return {
        "removed": sorted(removed),
        "skipped": skipped,
        "cuda_removed": cuda_removed,
        "leftovers_removed": leftovers_removed,
    }


def purge(*, include_cuda_orphans: bool = False, dead_only: bool = False) -> list[str]:
    """Remove torch_shmem streams from /dev/shm; return the names removed, sorted.

    By default every stream this user may remove is unlinked, in use or not
    (handles that are open keep their mapping). ``dead_only=True`` removes
    only orphans: streams whose creator died, that no live process maps and
    whose lock no live process holds. ``include_cuda_orphans=True`` also
    removes torch's ref-count files in /dev/shm whose producer died and that
    nobody maps (see :func:`cuda_orphans`). Files dead torch_shmem
    processes left behind (:func:`leftovers`) are always removed. Files that
    are not valid streams are never removed (``torch-shmem doctor`` lists them). Not reversible.
    """
    return purge_report(dead_only=dead_only, include_cuda_orphans=include_cuda_orphans)["removed"]
