"""Unit tests of the CPU stream API (single process)."""

import os
import stat
import threading
import time

import numpy as np
import pytest

import torch_shmem
from torch_shmem import InconsistentStreamError

pytestmark = pytest.mark.cpu

ALL_DTYPES = [
    np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
    np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128,
]


def dev_shm_path(name):
    return "/dev/shm/torch_shmem." + name


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (2, 3, 4), (1,) * 32], ids=str)
def test_roundtrip_dtypes_shapes(name, dtype, shape):
    rng = np.random.default_rng(0)
    value = (rng.standard_normal(shape) * 50).astype(dtype)
    s = torch_shmem.create(name, shape=shape, dtype=dtype)
    assert s.shape == shape and s.dtype == np.dtype(dtype)
    assert s.size == value.nbytes
    s.write(value)
    r = torch_shmem.open(name)
    got = r.read()
    assert got.dtype == np.dtype(dtype) and got.shape == shape
    np.testing.assert_array_equal(got, value)
    got[...] = 0  # an independent copy
    np.testing.assert_array_equal(r.read(), value)
    r.close()
    s.close()


def test_dtype_strings_and_defaults(name):
    s = torch_shmem.create(name, shape=(2, 2))
    assert s.dtype == np.float32
    s.unlink()
    s = torch_shmem.create(name, shape=4, dtype="int16")
    assert s.dtype == np.int16 and s.shape == (4,)


def test_zero_size_stream(name):
    s = torch_shmem.create(name, shape=(0, 3), dtype=np.float32)
    s.write(np.zeros((0, 3), np.float32))
    assert s.read().shape == (0, 3)
    assert s.count == 1


def test_metadata_and_counts(name):
    s = torch_shmem.create(name, shape=(3,), dtype=np.float64)
    r = torch_shmem.open(name)  # opened before any write: last_read_count starts at 0
    assert s.owner is True and s.gpu_device is None and s.cpu_mirror is True
    assert s.count == 0 and s.write_sequence == 0 and s.write_time == 0.0
    before = time.time()
    s.write(np.ones(3))
    assert s.count == 1 and s.write_sequence == 2
    assert before - 1 <= s.write_time <= time.time() + 1
    assert r.owner is False and r.creator_pid == os.getpid()
    assert len(r.instance_id) == 32 and r.instance_id == s.instance_id
    s.write(np.ones(3), frame_id=2**64 - 1)
    assert r.frame_id == 2**64 - 1
    s.write(np.ones(3))
    assert r.frame_id == 2**64 - 1  # sticky
    r.read()
    assert r.last_read_count == 3 and r.missed_writes == 2 and r.total_missed_writes == 2


def test_write_validation(name):
    s = torch_shmem.create(name, shape=(2, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=rf"{name}.*expected shape \(2, 3\), got \(3, 2\)"):
        s.write(np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=rf"{name}.*complex64.*nonzero imaginary part"):
        s.write(np.full((2, 3), 1j, np.complex64))
    with pytest.raises(ValueError, match=rf"{name}.*expected dtype float32, got <U1"):
        s.write(np.full((2, 3), "a"))
    with pytest.raises(ValueError, match=name):
        s.write("not an array")
    with pytest.raises(ValueError, match="frame_id"):
        s.write(np.zeros((2, 3), np.float32), frame_id=-1)
    assert s.count == 0  # nothing was published
    # casts that keep the values and plain sequences are accepted, as pyshmem does
    s.write(np.arange(6, dtype=np.float64).reshape(2, 3))
    np.testing.assert_array_equal(s.read(), np.arange(6).reshape(2, 3))
    s.write([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(s.read(), [[1, 2, 3], [4, 5, 6]])
    # non-contiguous and byte-swapped inputs are copied correctly
    big = np.arange(12, dtype=np.float32).reshape(2, 6)[:, ::2]
    s.write(big)
    np.testing.assert_array_equal(s.read(), big)
    swapped = np.arange(6, dtype=">f4").reshape(2, 3)
    s.write(swapped)
    np.testing.assert_array_equal(s.read(), swapped)
    i = torch_shmem.create(name + "-i", shape=(2,), dtype=np.int32)
    try:
        with pytest.raises(ValueError, match=r"float64 values into this int32 stream.* 1\.5 at index \(0,\)"):
            i.write(np.array([1.5, 2.5]))
    finally:
        i.unlink()


def test_create_validation(name):
    with pytest.raises(ValueError, match="unsupported dtype"):
        torch_shmem.create(name, shape=(2,), dtype=object)
    with pytest.raises(ValueError, match="native byte order"):
        torch_shmem.create(name, shape=(2,), dtype=">f4")
    with pytest.raises(TypeError):
        torch_shmem.create(name, shape=(2,), dtype="not-a-dtype")
    with pytest.raises(ValueError, match=">= 0"):
        torch_shmem.create(name, shape=(2, -1))
    with pytest.raises(ValueError, match="limit is 32"):
        torch_shmem.create(name, shape=(1,) * 33)
    with pytest.raises(TypeError, match="shape"):
        torch_shmem.create(name, shape=(2.5,))
    with pytest.raises(ValueError, match="size does not match"):
        torch_shmem.create(name, shape=(2,), dtype=np.float32, size=9)
    s = torch_shmem.create(name, shape=(2,), dtype=np.float32, size=8)
    assert s.size == 8
    with pytest.raises(FileExistsError, match=r"torch_shmem.open"):
        torch_shmem.create(name, shape=(2,))
    if not torch_shmem.gpu_available():  # on a GPU machine tests/test_gpu.py covers it
        with pytest.raises(RuntimeError, match="GPU streams"):
            torch_shmem.create(name + "g", shape=(2,), gpu_device="cuda:0")


@pytest.mark.parametrize("bad", ["", "a/b", "/x", "x" * 201, "tab\tname"])
def test_invalid_names(bad):
    with pytest.raises(ValueError):
        torch_shmem.create(bad, shape=(1,))
    with pytest.raises(ValueError):
        torch_shmem.open(bad)


def test_name_types_and_unicode(name):
    with pytest.raises(TypeError):
        torch_shmem.create(123, shape=(1,))
    uname = name + "-kamera-é-相机"
    s = torch_shmem.create(uname, shape=(1,))
    try:
        assert torch_shmem.open(uname).name == uname
    finally:
        s.unlink()


def test_open_missing_and_unlink_missing(name):
    with pytest.raises(FileNotFoundError, match=r"torch_shmem.create\("):
        torch_shmem.open(name)
    torch_shmem.unlink(name)  # silent no-op


def test_read_out(name):
    s = torch_shmem.create(name, shape=(4, 4), dtype=np.float32)
    s.write(np.full((4, 4), 3, np.float32))
    out = np.empty((4, 4), np.float32)
    assert s.read(out=out) is out
    assert (out == 3).all()
    for bad in (np.empty((4, 5), np.float32), np.empty((4, 4), np.float64),
                np.empty((4, 8), np.float32)[:, ::2], [[0] * 4] * 4):
        with pytest.raises(ValueError, match=f"{name}.*out"):
            s.read(out=bad)
    ro = np.empty((4, 4), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        s.read(out=ro)


def test_unsafe_read_requires_lock(name):
    s = torch_shmem.create(name, shape=(3,), dtype=np.int64)
    with pytest.raises(RuntimeError, match="locked"):
        s.read(safe=False)
    with s.locked():
        live = s.read(safe=False)
        live[:] = [1, 2, 3]  # in-place edit of the shared payload
    assert s.read().tolist() == [1, 2, 3]
    s.write(np.array([4, 5, 6]))
    assert live.tolist() == [4, 5, 6]


def test_lock_reentrant_and_write_inside(name):
    s = torch_shmem.create(name, shape=(2,), dtype=np.float32)
    with s.locked():
        with s.locked():
            s.write(np.ones(2, np.float32))  # re-entrant for the holder
            s.clear()
        assert s.lock_owner == os.getpid()
    assert s.lock_owner is None
    assert s.count == 2
    with pytest.raises(RuntimeError, match="does not hold"):
        s.release()


def test_lock_excludes_other_threads(name):
    s = torch_shmem.create(name, shape=(2,), dtype=np.float32)
    s.acquire()
    errors = []

    def other():
        try:
            s.acquire(timeout=0.1)
        except TimeoutError as exc:
            errors.append(exc)
        try:
            s.write(np.ones(2, np.float32), timeout=0.05)
        except TimeoutError as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert len(errors) == 2 and name in str(errors[0])
    # a safe read does not need the lock
    s.read()
    s.release()
    s.write(np.ones(2, np.float32), timeout=1)


def test_clear_counts_as_publication(name):
    s = torch_shmem.create(name, shape=(3,), dtype=np.int32)
    s.write(np.array([1, 2, 3], np.int32))
    s.clear()
    assert s.count == 2 and s.read().tolist() == [0, 0, 0]


def test_close_semantics(name):
    s = torch_shmem.create(name, shape=(2,))
    r = torch_shmem.open(name)
    r.close()
    r.close()  # idempotent
    assert r.closed and r.name == name
    calls = [
        lambda: r.read(), lambda: r.write(np.zeros(2, np.float32)), lambda: r.acquire(),
        lambda: r.release(), lambda: r.clear(), lambda: r.read_new(timeout=0),
        lambda: r.count, lambda: r.shape, lambda: r.dtype, lambda: r.size, lambda: r.write_time,
        lambda: r.write_sequence, lambda: r.locked().__enter__(), lambda: r.owner,
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=rf"torch_shmem.open\('{name}'\)"):
            call()
    # the stream itself is untouched
    s.write(np.ones(2, np.float32))
    assert torch_shmem.open(name).read().tolist() == [1, 1]


def test_close_releases_own_lock_and_views_survive(name):
    s = torch_shmem.create(name, shape=(2,), dtype=np.int32)
    r = torch_shmem.open(name)
    r.acquire()
    live = r.read(safe=False)
    r.close()  # releases the lock levels this thread took through r
    s.acquire(timeout=1)
    s.release()
    assert live.tolist() == [0, 0]  # the mapping outlives close while views exist


def test_close_refuses_while_other_thread_holds_lock(name):
    s = torch_shmem.create(name, shape=(2,))
    held, done = threading.Event(), threading.Event()

    def holder():
        s.acquire()
        held.set()
        done.wait(10)
        s.release()

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    with pytest.raises(RuntimeError, match="another thread"):
        s.close()
    done.set()
    t.join(10)
    s.close()


def test_read_new_timeout_and_edge(name):
    s = torch_shmem.create(name, shape=(2,), dtype=np.float32)
    s.write(np.ones(2, np.float32))
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=name):
        s.read_new(timeout=0.1)  # the earlier write does not count
    assert time.monotonic() - t0 >= 0.09
    with pytest.raises(TimeoutError):
        s.read_new(timeout=0)

    def later():
        time.sleep(0.05)
        s.write(np.full(2, 2, np.float32))

    t = threading.Thread(target=later)
    t.start()
    assert s.read_new(timeout=5).tolist() == [2, 2]
    t.join()
    assert s.wait_for_count(after=1, timeout=0) == 2  # level-triggered
    with pytest.raises(ValueError):
        s.read_new(timeout=-1)


def test_close_from_other_thread_wakes_reader(name):
    s = torch_shmem.create(name, shape=(2,))
    r = torch_shmem.open(name)
    errors = []

    def blocked():
        try:
            r.read_new()
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=blocked)
    t.start()
    time.sleep(0.2)
    r.close()
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1 and "closed" in str(errors[0])


def test_aborted_write_is_inconsistent_until_next_write(name):
    s = torch_shmem.create(name, shape=(4,), dtype=np.int32)
    s.write(np.arange(4, dtype=np.int32))
    with s.locked():
        s._h.begin_write()
        s._h.abort_write()
    with pytest.raises(InconsistentStreamError, match=name):
        s.read()
    assert s.count == 1
    s.write(np.full(4, 9, np.int32))
    assert s.read().tolist() == [9] * 4 and s.count == 2


def test_permissions_default_0600_and_mode(name):
    torch_shmem.create(name, shape=(1,))
    assert stat.S_IMODE(os.stat(dev_shm_path(name)).st_mode) == 0o600
    other = name + "-m"
    try:
        torch_shmem.create(other, shape=(1,), mode=0o640)
        assert stat.S_IMODE(os.stat(dev_shm_path(other)).st_mode) == 0o640
    finally:
        torch_shmem.unlink(other)
    with pytest.raises(ValueError):
        torch_shmem.create(name + "-x", shape=(1,), mode=0o4777)


def test_readonly_handle(name):
    s = torch_shmem.create(name, shape=(2,), dtype=np.int16)
    s.write(np.array([1, 2], np.int16))
    r = torch_shmem.open(name, readonly=True)
    assert r.read().tolist() == [1, 2]
    for call in (lambda: r.write(np.zeros(2, np.int16)), r.clear, r.acquire, r.unlink):
        with pytest.raises(PermissionError, match=name):
            call()


def test_foreign_and_corrupted_segments(name):
    path = dev_shm_path(name)
    with open(path, "wb") as f:  # a file that is not ours
        f.write(os.urandom(8192))
    with pytest.raises(ValueError, match="not a torch_shmem stream"):
        torch_shmem.open(name)
    os.unlink(path)
    with open(path, "wb") as f:  # truncated: shorter than a header
        f.write(b"\0" * 100)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="only 100 bytes"):
        torch_shmem.open(name)
    assert time.monotonic() - t0 < 5
    os.unlink(path)

    s = torch_shmem.create(name, shape=(8, 8), dtype=np.float32)
    s.close()
    # corrupt one header field at a time
    fields = {8: "layout version", 32: "segment", 40: "dtype", 48: "ndim", 88: "shape"}
    for offset, what in fields.items():
        with open(path, "r+b") as f:
            f.seek(offset)
            original = f.read(4)
            f.seek(offset)
            f.write(b"\xff\xff\x00\x7f")
        with pytest.raises(ValueError, match="corrupted"):
            torch_shmem.open(name)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(original)
    # a segment shorter than its header claims
    os.truncate(path, 4096)
    with pytest.raises(ValueError, match="corrupted"):
        torch_shmem.open(name)


def test_create_larger_than_dev_shm_fails_at_create(name):
    vfs = os.statvfs("/dev/shm")
    total = vfs.f_blocks * vfs.f_frsize
    n = (2 * total) // 8
    with pytest.raises(OSError) as info:
        torch_shmem.create(name, shape=(n,), dtype=np.float64)
    assert info.value.errno in (28, 12)  # ENOSPC (or ENOMEM)
    assert "bytes" in str(info.value)
    assert not os.path.exists(dev_shm_path(name))


def test_unlink_then_recreate_and_stale_unlink(name):
    s = torch_shmem.create(name, shape=(1,))
    old = torch_shmem.open(name)
    s.unlink()
    assert not os.path.exists(dev_shm_path(name))
    old.read()  # the old mapping stays valid
    new = torch_shmem.create(name, shape=(2,))
    assert new.instance_id != old.instance_id
    with pytest.raises(torch_shmem.StaleStreamError):
        old.unlink()
    assert torch_shmem.open(name).shape == (2,)
    s.delete  # alias exists
    new.delete()
    assert not os.path.exists(dev_shm_path(name))


def test_pyshmem_style_import():
    import torch_shmem as pyshmem

    for attr in ("create", "open", "unlink", "gpu_available", "SharedMemory"):
        assert hasattr(pyshmem, attr)
    for attr in ("name", "shape", "dtype", "size", "gpu_device", "cpu_mirror", "owner", "count",
                 "write_time", "write_sequence", "acquire", "release", "locked", "write", "read",
                 "read_new", "clear", "close", "unlink", "delete"):
        assert hasattr(pyshmem.SharedMemory, attr), attr


def test_repr(name):
    s = torch_shmem.create(name, shape=(2, 2), dtype=np.uint8)
    assert repr(s) == f"SharedMemory(name='{name}', shape=(2, 2), dtype='uint8', gpu_device=None)"
    s.close()
    assert "closed" in repr(s)


def test_lock_depth_is_shared_by_handles_of_one_thread(name):
    a = torch_shmem.create(name, shape=(2,), dtype=np.int32)
    b = torch_shmem.open(name)
    with a.locked(timeout=1):
        b.write(np.array([1, 2], np.int32), timeout=1)  # same thread: re-entrant
        with b.locked(timeout=1):
            assert b.read(safe=False).tolist() == [1, 2]
        assert a.lock_owner == os.getpid()
    assert a.lock_owner is None
    with pytest.raises(RuntimeError, match="does not hold"):
        b.release()


@pytest.mark.parametrize("kind", ["fortran", "strided", "float64", "int16"])
def test_large_values_cast_straight_into_the_payload(name, kind):
    s = torch_shmem.create(name, shape=(300, 200), dtype=np.float32)
    r = torch_shmem.open(name)
    base = np.arange(300 * 200, dtype=np.float64).reshape(300, 200)
    value = {
        "fortran": np.asfortranarray(base.astype(np.float32)),
        "strided": np.arange(300 * 400, dtype=np.float32).reshape(300, 400)[:, ::2],
        "float64": base,
        "int16": (base % 1000).astype(np.int16),
    }[kind]
    s.write(value, frame_id=3)
    np.testing.assert_array_equal(r.read(), value.astype(np.float32))
    assert r.count == 1 and r.frame_id == 3 and r.lock_owner is None
    with pytest.raises(ValueError, match="frame_id"):
        s.write(value, frame_id=-1)
    assert r.count == 1  # nothing published, stream still consistent
    np.testing.assert_array_equal(r.read(), value.astype(np.float32))



@pytest.mark.parametrize("slots,rotating", [(1, False), (3, False), (3, True)])
def test_write_at_a_given_count(name, slots, rotating):
    """SharedMemory._write_at (the bridge's publication at the source's count): a single
    payload, slots written in place, and rotating slots (slot_write_locked)."""
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64, slots=slots)
    if rotating:  # as after a read overlapped a write (Header::slot_contention)
        import mmap

        with open(f"/dev/shm/torch_shmem.{name}", "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
            m[1064] = 1
    r = torch_shmem.open(name)
    assert w._write_at(np.full(4, 10, np.int64), 10, 7, None) == 10
    pub = r.read_publication()
    assert (pub.count, pub.frame_id, pub.missed_publications) == (10, 7, 9)
    assert pub.payload.tolist() == [10] * 4
    # not past the current count: published as the next one
    assert w._write_at(np.full(4, 5, np.int64), 5, None, None) == 11
    assert r.read().tolist() == [5] * 4 and r.last_read_count == 11
    assert w._write_at(np.full(4, 13, np.int64), 13, None, None) == 13
    pub = r.read_publication()
    assert (pub.count, pub.missed_publications, pub.payload.tolist()) == (13, 1, [13] * 4)
    assert torch_shmem.stat(name)["slots_rotating"] == rotating
    with w.locked():
        with pytest.raises(ValueError, match=rf"{name}.*count must be from 1"):
            w._h.begin_write(0)
        with pytest.raises(RuntimeError, match=rf"{name}.*publication 13 is not past count 13"):
            w._h.begin_write(13)
    w.close()
    r.close()


def test_write_at_on_a_ring_skips_counts(name):
    """On a CPU ring, _write_at publishes at the given count too (tests/test_ring.py has the
    cursors' side); a count not past the current one is published as the next."""
    w = torch_shmem.create(name, shape=(4,), dtype=np.int64, ring=4)
    assert w._write_at(np.full(4, 9, np.int64), 9, 3, None) == 9
    assert w.count == 9 and w.read().tolist() == [9] * 4 and w.frame_id == 3
    assert w._write_at(np.full(4, 5, np.int64), 5, None, None) == 10
    assert w.read().tolist() == [5] * 4
    assert w._write_at([7, 7, 7, 7], 20, None, None) == 20  # converted like write()
    assert w.read().tolist() == [7] * 4
    with pytest.raises(ValueError, match="shape"):
        w._write_at(np.zeros(3, np.int64), 30, None, None)
    with pytest.raises(ValueError, match="below 2..63"):
        w._write_at(np.zeros(4, np.int64), 2**63, None, None)
    plain = torch_shmem.create(name + "-plain", shape=(4,), dtype=np.int64)
    assert plain._h.write(np.zeros(4, np.int64), None, None, 5) == 5  # CPU streams take at= too
    plain.unlink()
    assert w.count == 20
    w.close()
