"""Following a stream name across producer restarts.

A producer that restarts unlinks its stream and creates it again, possibly
with another shape or dtype: a new *generation* under the same name. A
handle maps one generation for good; its waits end with
StreamUnlinkedError or StreamReplacedError when that generation is
unlinked. :class:`Follower` turns that into an iterator of publications that
reopens the name whenever its generation goes away.
"""

from __future__ import annotations

import threading
from typing import Any

from ._publication import Publication
from ._stream import (
    SharedMemory,
    StaleStreamError,
    _check_name,
    _check_wait,
    _open_handle,
)

__all__ = ["Follower", "follow"]


class Follower:
    """Iterator over the publications of a stream name, across producer restarts.

    Returned by :func:`torch_shmem.follow`. Each item is a
    :class:`Publication` (a private copy of the payload with its count,
    frame_id, write_time and missed_publications). On opening a generation
    it first yields the generation's latest publication if there is one,
    then every publication it can keep up with (level-triggered on the
    count, so none is lost between two reads; the skipped ones are counted
    in ``missed_publications``). When the generation is unlinked it opens the
    name again, waiting up to ``wait`` seconds for a producer to re-create
    it; the new generation may have another shape or dtype.

    The iteration ends (StopIteration) when ``wait`` expires after an unlink
    (the producer is gone), or after :meth:`close`, which may be called from
    any thread and wakes a blocked ``next()``. It raises TimeoutError when
    the name does not appear within ``wait`` on the first open, or when a
    generation publishes nothing for ``timeout`` seconds (a producer killed
    without unlinking, e.g. by SIGKILL, looks like that).
    """

    def __init__(
        self,
        name: str,
        *,
        wait: float | None = None,
        timeout: float | None = None,
        readonly: bool = True,
    ) -> None:
        self._name = _check_name(name)
        self._wait = _check_wait(wait, name)
        if timeout is not None and not timeout >= 0:
            raise ValueError(
                f"torch_shmem: stream {name!r}: timeout must be >= 0 or None, got {timeout!r}"
            )
        self._timeout = timeout
        self._readonly = bool(readonly)
        self._stop = threading.Event()
        self._shm: SharedMemory | None = None
        self._after = 0
        self._generations = 0
        self._last_instance: bytes | None = None

    @property
    def name(self) -> str:
        return self._name

    @property
    def shm(self) -> SharedMemory | None:
        """The handle of the generation being followed (None between generations)."""
        return self._shm

    @property
    def generations(self) -> int:
        """How many generations of the name have been opened so far."""
        return self._generations

    def __iter__(self) -> "Follower":
        return self

    def __next__(self) -> Publication:
        while True:
            if self._stop.is_set():
                self._drop()
                raise StopIteration
            shm = self._shm
            if shm is None:
                shm = self._open_next()
                if shm is None:
                    self._drop()
                    raise StopIteration
            try:
                pub = shm.read_after_publication(self._after, timeout=self._timeout)
            except StaleStreamError:  # unlinked, maybe replaced: follow the name
                self._drop()
                continue
            except RuntimeError:
                if self._stop.is_set():  # close() closed the handle under the wait
                    continue
                raise
            self._after = pub.count
            return pub

    def _open_next(self) -> SharedMemory | None:
        first = self._generations == 0
        while True:
            try:
                handle = _open_handle(self._name, self._readonly, self._wait, self._stop)
            except TimeoutError:
                if first:
                    raise
                return None  # the producer did not come back: the end
            if handle is None:  # close()
                return None
            shm = SharedMemory(handle, owner=False)
            if shm._instance_id == self._last_instance:
                # The generation just left (possible only for a name removed
                # by other means than unlink): wait for a new one.
                shm.close()
                if self._stop.wait(0.05):
                    return None
                continue
            self._last_instance = shm._instance_id
            self._shm = shm
            self._after = 0
            self._generations += 1
            if self._stop.is_set():  # close() raced with the open
                return None
            return shm

    def _drop(self) -> None:
        shm, self._shm = self._shm, None
        if shm is not None:
            shm.close()

    def close(self) -> None:
        """End the iteration; a ``next()`` blocked in another thread returns at once."""
        self._stop.set()
        shm = self._shm
        if shm is not None:
            try:
                shm.close()
            except RuntimeError:
                pass  # its own thread closes it when it sees the stop

    def __enter__(self) -> "Follower":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Follower(name={self._name!r}, generations={self._generations})"


def follow(
    name: str,
    *,
    wait: float | None = None,
    timeout: float | None = None,
    readonly: bool = True,
) -> Follower:
    """Follow the publications of ``name`` across producer restarts.

    ``for pub in torch_shmem.follow("camera", wait=5.0): use(pub.payload)``
    yields a :class:`Publication` per publication it keeps up with, from
    every generation of the name in turn (see :class:`Follower`): when the
    producer unlinks the stream and creates it again (with any shape and
    dtype), the iteration goes on with the new generation. ``wait``: seconds
    to wait for the name to appear, at the start and after each unlink
    (None: no limit); when it expires after an unlink the iteration ends.
    ``timeout``: seconds to wait for each publication (None: no limit;
    TimeoutError). ``readonly``: open the generations read-only (default).
    CPU streams, and GPU streams with a CPU mirror (read from the mirror).
    """
    return Follower(name, wait=wait, timeout=timeout, readonly=readonly)
