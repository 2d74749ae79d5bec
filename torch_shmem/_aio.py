"""Asyncio adapters for the blocking waits.

A stream wait parks on a futex in the stream's header; asyncio has no way to
poll a futex, so each pending async wait runs the blocking native wait in a
worker thread (GIL released while parked) and hands its result back to the
event loop with ``call_soon_threadsafe``. The event loop thread never blocks.

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
