"""Asyncio adapters for the blocking waits.

Two ways, chosen per wait by SharedMemory._wait_async. Usually a readiness
descriptor (FdWatch, at the end of this module): the waits of one handle in
one loop share it, registered with ``loop.add_reader``. Where none can be
had (or with TORCH_SHMEM_ASYNC_WAIT=thread), the fallback below: a stream
wait parks on a futex in the stream's header, which asyncio cannot poll,
so each pending async wait runs the blocking native wait in a worker thread
(GIL released while parked) and hands its result back to the event loop
with ``call_soon_threadsafe``. Either way the event loop thread never blocks.

Workers come from a small unbounded pool: an idle thread is reused, a new
one is started only when none is idle, and idle threads exit after a while.
A fixed-size executor would queue waits behind each other and so break
their timeouts; one thread per pending wait costs one parked thread, which is
the price of futex waits here.

Cancellation: the worker runs the native wait in slices of ``SLICE``
seconds and checks a cancel flag between slices, and between the wait and
the payload copy. Cancelling the awaiting task returns at once (the task
never waits for the worker); the worker notices within one slice and drops
its result without reading. ``close()`` of the handle wakes a parked worker
at once and the awaiting task gets the RuntimeError.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import weakref
from typing import Any, Callable

__all__ = ["SLICE", "run_wait"]

# Longest a cancelled wait keeps its worker thread parked.
SLICE = 0.05
# Idle workers exit after this long without a job.
_IDLE_SECONDS = 30.0


class _Pool:
    """Unbounded pool of daemon threads that reuses idle ones."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._mutex = threading.Lock()
        self._idle = 0

    def submit(self, job: Callable[[], None]) -> None:
        # put() under the mutex so an idle worker that times out can tell,
        # under the same mutex, whether a job was handed to it meanwhile.
        with self._mutex:
            self._jobs.put(job)
            if self._idle > 0:
                self._idle -= 1
                return
        threading.Thread(target=self._work, name="torch_shmem-wait", daemon=True).start()

    def _work(self) -> None:
        job = self._jobs.get()
        while True:
            job()
            job = None
            with self._mutex:
                self._idle += 1
            while job is None:
                try:
                    job = self._jobs.get(timeout=_IDLE_SECONDS)
                except queue.Empty:
                    with self._mutex:
                        if self._jobs.empty():
                            self._idle -= 1
                            return
                    # a job was queued for an idle worker; take it


_POOL = _Pool()


class _Cancelled(Exception):
    pass


def _deliver(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.done():  # the awaiting task was cancelled
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


async def run_wait(
    wait: Callable[[float], Any],
    finish: Callable[[Any, float | None], Any],
    *,
    timeout: float | None,
    on_timeout: Callable[[], BaseException],
) -> Any:
    """Await ``wait`` then ``finish`` run in a worker thread.

    ``wait(slice_seconds)`` makes one bounded blocking attempt: it returns a
    value when the condition holds and raises TimeoutError when the slice
    expired. ``finish(value, remaining)`` runs once after a successful wait
    (the payload copy, bounded by what is left of ``timeout``). After the
    overall ``timeout`` the awaitable raises ``on_timeout()``. Any other
    exception from the worker is raised in the awaiting task.
    """
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    cancelled = threading.Event()
    deadline = None if timeout is None else time.monotonic() + timeout

    def job() -> None:
        try:
            while True:
                if cancelled.is_set():
                    raise _Cancelled
                if deadline is None:
                    slice_ = SLICE
                else:
                    slice_ = max(0.0, min(SLICE, deadline - time.monotonic()))
                try:
                    value = wait(slice_)
                    break
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise on_timeout() from None
            if cancelled.is_set():
                raise _Cancelled
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            result, exc = finish(value, remaining), None
        except _Cancelled:
            return
        except BaseException as e:  # delivered to the awaiting task
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(_deliver, fut, result, exc)
        except RuntimeError:
            pass  # the event loop is closed; nobody is waiting any more

    _POOL.submit(job)
    try:
        return await fut
    finally:
        cancelled.set()


# ---------------------------------------------------------------------------
# Waits on a readiness descriptor (no thread per wait)
# ---------------------------------------------------------------------------
#
# Where the stream's header can be pinned (the usual case), async waits of
# one handle in one event loop share one readiness descriptor
# (torch_shmem._core.Notifier, csrc/core/notify.h) registered with
# loop.add_reader: the descriptor is armed for the smallest count any of the
# pending waits is after, and every readiness resolves the waits it
# satisfies and re-arms for the rest. No thread is parked, nothing polls;
# a writer signals the descriptor only while it is armed. The payload copy
# of a read runs inline for payloads up to INLINE_COPY_BYTES, in a worker
# thread above that (a long copy would stall the loop).

INLINE_COPY_BYTES = 1 << 20


class Gone(Exception):
    """The stream was unlinked and nothing newer than a wait's count is there."""


class Closed(Exception):
    """The handle was closed while the wait was pending."""


class FdWatch:
    """The pending waits of one handle in one event loop, on one descriptor.

    Used from the loop's thread only, except :meth:`close_threadsafe`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, notifier: Any) -> None:
        # The loop is held weakly (the handle's table of watches too): once a
        # finished loop (asyncio.run) is collected, its watch goes with it
        # and the notifier's descriptor and table entry are released.
        self._loop = weakref.ref(loop)
        self.notifier = notifier
        self.fd = notifier.fileno()
        self.waits: dict[asyncio.Future, int] = {}
        self.closed = False
        loop.add_reader(self.fd, self._ready)

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop()

    def wait(self, after: int) -> asyncio.Future:
        """A future resolved with the count once ``count > after`` (Gone if unlinked)."""
        fut = self._loop().create_future()
        self.waits[fut] = after
        fut.add_done_callback(self._discard)
        self._ready()
        return fut

    def _discard(self, fut: asyncio.Future) -> None:
        self.waits.pop(fut, None)
        if not self.waits and not self.closed:
            self.notifier.disarm()  # nobody waits: not readable, writers skip it

    def _ready(self) -> None:
        if self.closed:
            return
        n = self.notifier
        count = n.count()
        for fut, after in list(self.waits.items()):
            if count > after:
                del self.waits[fut]
                if not fut.done():
                    fut.set_result(count)
        if self.waits and n.unlinked():
            # No new opener can publish to a removed name; the awaiting
            # coroutine raises the exact error (unlinked or replaced).
            for fut in list(self.waits):
                del self.waits[fut]
                if not fut.done():
                    fut.set_exception(Gone())
        if self.waits:
            n.arm(min(self.waits.values()))  # drains; readable at once if already due
        else:
            n.disarm()

    def close(self, exc: BaseException | None = None) -> None:
        """Fail the pending waits with ``exc`` and release the descriptor."""
        if self.closed:
            return
        self.closed = True
        loop = self._loop()
        try:
            if loop is not None:
                loop.remove_reader(self.fd)
        except (RuntimeError, ValueError, OSError):
            pass  # the loop is closed: its selector is gone with it
        self.notifier.close()
        waits, self.waits = self.waits, {}
        for fut in waits:
            if not fut.done() and exc is not None:
                fut.set_exception(exc)

    def close_threadsafe(self, exc: BaseException | None) -> None:
        """Close from any thread: in the loop's thread when it can still run."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            self.closed = True
            self.notifier.close()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.close(exc)
            return
        try:
            loop.call_soon_threadsafe(self.close, exc)
        except RuntimeError:  # closed meanwhile
            self.closed = True
            self.notifier.close()


async def run_in_thread(fn: Callable[[], Any]) -> Any:
    """Await ``fn()`` run in a pooled worker thread (for long payload copies)."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def job() -> None:
        try:
            result, exc = fn(), None
        except BaseException as e:
            result, exc = None, e
        try:
            loop.call_soon_threadsafe(_deliver, fut, result, exc)
        except RuntimeError:
            pass

    _POOL.submit(job)
    return await fut
