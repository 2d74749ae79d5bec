"""Words shown to people: a stream's state label and byte sizes.

One definition each, for ``stat()``/``list_streams()``, ``describe()``,
``SharedMemory.header()``, the CLI and the benchmarks' reports.
"""

from __future__ import annotations

from . import _proc

__all__ = ["fmt_bytes", "state_label"]


def state_label(seq: int, broken: bool, lock_pid: int) -> str:
    """``"ok"``, ``"writing"`` or ``"inconsistent"`` from a stream header.

    An even write sequence is ``ok``. An odd one is a write in progress
    (``writing``) while its writer still holds the lock; it is
    ``inconsistent`` when the write was aborted or its writer died mid-write
    (the next lock acquirer sets ``broken``; a dead holder is reported as
    inconsistent already).
    """
    if not seq & 1:
        return "ok"
    if not broken and lock_pid and _proc.pid_alive(lock_pid):
        return "writing"
    return "inconsistent"


def fmt_bytes(n: float) -> str:
    """A binary size: ``100 B``, ``64 KiB``, ``1.5 MiB`` (whole numbers without decimals)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    if unit == "B" or n == int(n):
        return f"{n:.0f} {unit}"
    return f"{n:.1f} {unit}"
