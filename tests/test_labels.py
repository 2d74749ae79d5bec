"""The state label and byte sizes: one definition for stat(), describe(), header() and the CLI."""

import os
import threading

import numpy as np
import pytest

import torch_shmem
from torch_shmem._labels import fmt_bytes, state_label

pytestmark = pytest.mark.cpu


def test_state_label_from_the_header_fields():
    me = os.getpid()
    assert state_label(4, False, 0) == "ok"
    assert state_label(4, True, me) == "ok"
    assert state_label(5, False, me) == "writing"  # in progress, writer alive
    assert state_label(5, True, me) == "inconsistent"  # aborted
    assert state_label(5, False, 0) == "inconsistent"  # nobody holds the lock
    assert state_label(5, False, 2**22 + 12345) == "inconsistent"  # the holder is gone


@pytest.mark.parametrize(
    "n, text",
    [(0, "0 B"), (100, "100 B"), (1023, "1023 B"), (1024, "1 KiB"), (64 * 1024, "64 KiB"),
     (1536, "1.5 KiB"), (40000, "39.1 KiB"), (2**20, "1 MiB"), (3 * 2**30, "3 GiB"),
     (5 * 2**40, "5 TiB"), (2**50, "1024 TiB")],
)
def test_fmt_bytes(n, text):
    assert fmt_bytes(n) == text


def test_header_is_one_consistent_reading(name):
    s = torch_shmem.create(name, shape=(3,))
    r = torch_shmem.open(name)
    try:
        h = s.header()
        assert (h.count, h.write_time, h.frame_id, h.state, h.unlinked, h.lock_owner) == (
            0, 0.0, 0, "ok", False, None)
        s.write(np.ones(3, np.float32), frame_id=9)
        h = s.header()
        assert h.count == 1 and h.frame_id == 9 and h.state == "ok"
        assert abs(h.write_time - s.write_time) < 1e-6
        with s.locked():
            assert s.header().lock_owner == os.getpid()
        assert s.header().lock_owner is None
    finally:
        s.unlink()
    assert r.header().unlinked is True
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.header()


def test_describe_stat_and_header_agree_on_the_state(name):
    s = torch_shmem.create(name, shape=(3,))
    try:
        held, done = threading.Event(), threading.Event()

        def writing():
            with s.locked():
                s._h.begin_write()
                held.set()
                done.wait(10)
                s._h.commit_write(None)

        t = threading.Thread(target=writing)
        t.start()
        try:
            assert held.wait(10)
            assert s.header().state == torch_shmem.stat(name)["state"] == "writing"
            assert "state:        writing" in s.describe()
        finally:
            done.set()
            t.join(10)
        assert s.header().state == torch_shmem.stat(name)["state"] == "ok"
        assert "state:        ok" in s.describe()
        with s.locked():
            s._h.begin_write()
            s._h.abort_write()  # a torn stream
        assert s.header().state == torch_shmem.stat(name)["state"] == "inconsistent"
        assert "state:        inconsistent (a write was cut short)" in s.describe()
    finally:
        s.unlink()
