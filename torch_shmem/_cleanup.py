"""Unlinking of ``auto_unlink=True`` streams when their creating process ends.

``create(..., auto_unlink=True)`` registers the new generation here (name
and instance id, with the creating pid). The registered streams that still
hold their generation are unlinked:

* at interpreter exit (``atexit``): a normal exit, ``sys.exit``, an uncaught
  exception, including the KeyboardInterrupt of Python's default SIGINT
  handler;
* on SIGTERM, SIGINT and SIGHUP, by a handler installed for each of those
  signals whose handler is the default action (``SIG_DFL``) when the first
  such stream is created in the main thread. It unlinks, restores
  ``SIG_DFL`` and sends the signal again, so the process still ends as that
  signal would have ended it (exit status -SIGTERM...). A signal that has a
  handler of its own (Python's KeyboardInterrupt handler for SIGINT, a
  program's handler, ``SIG_IGN``) is left alone: such programs exit through
  their handler and atexit. The handlers are removed again (if still ours)
  when the last registered stream of the process is unlinked.

A forked child inherits the registry but never unlinks its parent's
streams (entries are per pid). SIGKILL, ``os._exit`` and crashes run none of
this: ``torch-shmem purge --dead-only`` removes such orphans.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from typing import Any, Callable


__all__ = ["forget", "forget_name", "register", "registered"]

# (name, instance_id) -> pid of the creating process. Every access is a
# single dict operation (atomic under the GIL), so no lock: the signal
# handler runs in the main thread between two bytecodes of whatever it was
# doing, possibly in the middle of register(), and must not deadlock there.
_streams: dict[tuple[str, bytes], int] = {}
_unlink: list[Callable[[str, bytes], Any]] = []
_installed: set[int] = set()
_atexit_registered = False
_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


def register(name: str, instance_id: bytes, unlink: Callable[[str, bytes], Any]) -> None:
    """Unlink generation ``instance_id`` of ``name`` when this process ends.

    ``unlink(name, instance_id)`` removes the name only while it holds that generation.
    """
    global _atexit_registered
    if not _unlink:
        _unlink.append(unlink)
    _streams[(name, instance_id)] = os.getpid()
    if not _atexit_registered:
        _atexit_registered = True
        atexit.register(cleanup)
    _install()


def forget(name: str, instance_id: bytes) -> None:
    """Drop a registration (the stream was unlinked by its handle)."""
    if _streams.pop((name, instance_id), None) is not None and not registered():
        _uninstall()


def forget_name(name: str) -> None:
    """Drop every registration of ``name`` (unlinked by name: whichever
    generation it held, a registered one is gone, since a re-create needs an
    unlink first)."""
    for key in [k for k in list(_streams) if k[0] == name]:
        forget(*key)


def registered() -> list[str]:
    """Names of the streams this process would unlink at exit."""
    pid = os.getpid()
    return [n for (n, _), p in list(_streams.items()) if p == pid]


def cleanup() -> None:
    """Unlink this process's registered streams that still hold their generation."""
    pid = os.getpid()
    for key, owner in list(_streams.items()):
        if owner != pid:
            continue
        _streams.pop(key, None)
        name, instance_id = key
        try:
            _unlink[0](name, instance_id)  # only while the name holds that generation
        except Exception:  # exiting: never mask the reason of the exit
            pass


def _on_signal(signum: int, frame: Any) -> None:
    try:
        cleanup()
    finally:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    # Not reached while the signal is unblocked in this thread (kill()
    # delivers it before returning); exit with the shell's convention if it was.
    raise SystemExit(128 + signum)


def _install() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # signal.signal() works in the main thread only; atexit still applies
    for signame in _SIGNALS:
        signum = getattr(signal, signame, None)
        if signum is None or signum in _installed:
            continue
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _on_signal)
            _installed.add(signum)


def _uninstall() -> None:
    if threading.current_thread() is not threading.main_thread():
        return  # left in place: with nothing registered it only re-sends the signal
    for signum in list(_installed):
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, signal.SIG_DFL)
        _installed.discard(signum)
