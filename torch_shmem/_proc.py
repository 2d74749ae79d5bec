"""Process facts from /proc: liveness (robust to pid reuse) and who maps what.

Linux only, standard library only. Everything here is best effort and says
so: a process of another user may hide its mappings, and a pid namespace
boundary hides processes entirely (streams are not supported across pid
namespaces; see docs/platform.md).
"""

from __future__ import annotations

import os

__all__ = ["SHM_DIR", "pid_alive", "process_start_time", "scan_mappings"]

SHM_DIR = "/dev/shm"

# A process that started this long after a stream was created cannot be the
# process that created it: the creator's pid was recycled. The slack absorbs
# the coarse clock of /proc (boot time in whole seconds, start time in clock
# ticks) and wall-clock steps; a recycled pid younger than that is missed and
# reported alive, which is the safe direction.
START_SLACK_SECONDS = 10.0


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields of /proc/PID/stat after the command name (state is index 0)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name is in parentheses and may itself contain ') '
    return data[data.rfind(b")") + 2 :].split()


def process_start_time(pid: int) -> float | None:
    """UNIX time at which ``pid`` started, or None when it cannot be read."""
    fields = _stat_fields(pid)
    boot = _boot_time()
    if fields is None or boot is None or len(fields) < 20:
        return None
    try:
        ticks = int(fields[19])  # field 22 of proc(5): starttime, in clock ticks
    except ValueError:
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def pid_alive(pid: int, *, created_at: float | None = None) -> bool:
    """Whether process ``pid`` is running (zombies count as dead).

    With ``created_at`` (the UNIX time a stream was created by ``pid``), a
    process that started more than START_SLACK_SECONDS after it is a
    recycled pid, hence the creator is dead.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return True  # cannot tell; assume alive (the safe direction)
    fields = _stat_fields(pid)
    if fields is not None and fields and fields[0] in (b"Z", b"X"):
        return False  # exited, not yet reaped by its parent
    if created_at is not None and created_at > 0:
        started = process_start_time(pid)
        if started is not None and started > created_at + START_SLACK_SECONDS:
            return False
    return True


def scan_mappings(files: set[tuple[int, int]]) -> tuple[dict[tuple[int, int], set[int]], bool]:
    """Which processes map the given files, identified by ``(st_dev, st_ino)``.

    Reads /proc/PID/maps of every visible process. Matching device and
    inode (not the path) means a deleted older generation of a name, or a
    file with the same name in another mount namespace's /dev/shm, is not
    counted as a holder. Returns ``({(dev, ino): {pid, ...}}, complete)``
    where ``complete`` is False when the maps of some process could not be
    read (another user's process, unless running as root).
    """
    holders: dict[tuple[int, int], set[int]] = {}
    complete = True
    if not files:
        return holders, complete
    inodes = {ino for _dev, ino in files}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return holders, False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        except OSError:
            complete = False
            continue
        for line in data.splitlines():
            # address perms offset major:minor inode path
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[4] == b"0":
                continue
            try:
                inode = int(parts[4])
                if inode not in inodes:
                    continue
                major, minor = (int(x, 16) for x in parts[3].split(b":"))
            except ValueError:
                continue
            key = (os.makedev(major, minor), inode)
            if key in files:
                holders.setdefault(key, set()).add(pid)
    return holders, complete
