"""The :class:`Publication` record returned by the ``*_publication`` reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Publication"]


@dataclass(frozen=True)
class Publication:
    """A payload and the metadata of the one publication it was copied from.

    Returned by :meth:`SharedMemory.read_publication` and its waiting
    variants. ``count``, ``frame_id`` and ``write_time`` were captured inside
    the same seqlock window as the payload copy, so they always describe
    exactly that payload (reading :attr:`SharedMemory.frame_id` after
    :meth:`SharedMemory.read` could describe a later write).

    - ``payload``: an independent NumPy array (or the caller's ``out=``
      array) for safe reads; the live shared view for ``safe=False``, valid
      only while the caller holds the lock.
    - ``count``: the publication's number (1 for the first write).
    - ``frame_id``: the token of the latest write that passed ``frame_id=``
      (sticky), as of this publication.
    - ``write_time``: UNIX time of the publication, 0.0 if never written.
    - ``missed_publications``: publications skipped since this handle's
      previous read (the same value as :attr:`SharedMemory.missed_writes`).

    The record is immutable; the payload array follows the usual NumPy
    mutability rules.
    """

    payload: Any
    count: int
    frame_id: int
    write_time: float
    missed_publications: int
