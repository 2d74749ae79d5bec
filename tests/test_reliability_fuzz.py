"""Fuzzing of bad input: public API arguments and corrupted, truncated or foreign segments.

Property-based (hypothesis). Every case must end in a clear Python exception
of the right type or a correct result: never a crash, a hang, an
out-of-bounds access or silent garbage. Operations on damaged segments run in
a forked child (with an alarm), so a crash or hang shows up as the child's
signal instead of taking pytest down.

Scale with TORCH_SHMEM_FUZZ_EXAMPLES (default 40 per property; the full run
recorded in docs/reliability.md uses 1000):

    TORCH_SHMEM_FUZZ_EXAMPLES=1000 python -m pytest tests/test_reliability_fuzz.py
"""

from __future__ import annotations

import json
import math
import os
import signal
import stat as stat_mod
import struct
import uuid

import numpy as np
import pytest

pytest.importorskip("hypothesis", reason="the fuzz suite needs hypothesis (pip install hypothesis)")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import torch_shmem  # noqa: E402
from torch_shmem import InconsistentStreamError  # noqa: E402

pytestmark = pytest.mark.cpu

EXAMPLES = int(os.environ.get("TORCH_SHMEM_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])
SHM = "/dev/shm/torch_shmem."

# ---- the header layout (csrc/core/stream.h), pinned by test_layout_is_as_documented

FIELDS = {  # name: (offset, size)
    "magic": (0, 8), "layout_version": (8, 4), "header_bytes": (12, 4),
    "payload_offset": (16, 8), "payload_bytes": (24, 8), "segment_bytes": (32, 8),
    "dtype_code": (40, 4), "itemsize": (44, 4), "ndim": (48, 4), "flags": (52, 4),
    "creator_pid": (56, 4), "mode": (60, 4), "create_time_ns": (64, 8),
    "instance_id": (72, 16), "shape": (88, 256), "name_len": (344, 4), "name": (348, 204),
    "nslots": (552, 4), "device_index": (556, 4), "slot_stride": (560, 8),
    "device_bytes": (568, 8), "device_uuid": (576, 16), "ipc_handle": (592, 64),
    "reserved": (656, 360), "geometry_checksum": (1016, 8),
    # mutable lines
    "seq": (1024, 8), "write_time_ns": (1032, 8), "frame_id": (1040, 8), "broken": (1048, 4),
    "unlinked": (1052, 4), "latest_slot": (1056, 4), "mutex": (1152, 40),
    "owner_pid": (1192, 4), "owner_tid": (1196, 4), "owner_depth": (1200, 4),
    "epoch": (1280, 4), "waiters": (1284, 4),
}
GEOMETRY_END = 1024
CHECKSUM_AT = 1016
MUTEX_KIND_AT = 1152 + 16  # glibc x86_64 __pthread_mutex_s.__kind


def geometry_checksum(header: bytes) -> int:
    """FNV-1a 64 over header bytes [8, 1016): the checksum create() stores at 1016."""
    h = 0xCBF29CE484222325
    for b in header[8:CHECKSUM_AT]:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def fix_checksum(path: str) -> None:
    with open(path, "r+b") as f:
        head = f.read(GEOMETRY_END)
        f.seek(CHECKSUM_AT)
        f.write(struct.pack("<Q", geometry_checksum(head)))


def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def unique(tag: str = "f") -> str:
    return f"rel-{tag}-{os.getpid()}-{uuid.uuid4().hex[:10]}"


# ---- fork isolation ------------------------------------------------------------


def in_child(fn, timeout=30):
    """Run fn() in a forked child; return (how it ended, its JSON result)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            signal.alarm(int(timeout))
            data = json.dumps(fn()).encode()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            data = json.dumps({"child_error": repr(exc)}).encode()
            code = 1
        try:
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        return ("hang" if sig == "SIGALRM" else "crash:" + sig), None
    result = json.loads(b"".join(chunks) or b"null")
    if os.WEXITSTATUS(status) != 0:
        return "error", result
    return "ok", result


def probe_ops(name):
    """Every operation a user could try on a (possibly damaged) stream, with timeouts."""
    out = []

    def rec(op, f):
        try:
            f()
            out.append([op, "ok", ""])
        except Exception as exc:  # noqa: BLE001 - classified by the parent
            out.append([op, type(exc).__name__, str(exc)[:300]])

    try:
        h = torch_shmem.open(name)
    except Exception as exc:  # noqa: BLE001
        out.append(["open", type(exc).__name__, str(exc)[:300]])
        rec("stat", lambda: torch_shmem.stat(name))
        rec("list", lambda: assert_not_listed(name))
        return out
    out.append(["open", "ok", ""])

    def live():
        with h.locked(timeout=0.2):
            v = h.read(safe=False)
            v.sum()

    def view():
        with h.write_view(timeout=0.2) as v:
            v[...] = 0

    rec("geometry", lambda: check_geometry(h))
    rec("read", lambda: h.read(timeout=0.2))
    rec("read_publication", lambda: h.read_publication(timeout=0.2))
    rec("write", lambda: h.write(np.zeros(h.shape, h.dtype), timeout=0.2))
    rec("read_after_write", lambda: h.read(timeout=0.2))
    rec("read_new", lambda: h.read_new(timeout=0.02))
    rec("wait_for_count", lambda: h.wait_for_count(after=h.count, timeout=0.02))
    rec("acquire", lambda: (h.acquire(timeout=0.2), h.release()))
    rec("live_view", live)
    rec("write_view", view)
    rec("clear", lambda: h.clear(timeout=0.2))
    rec("props", lambda: (h.count, h.frame_id, h.write_time, h.age, h.lock_owner,
                          h.missed_writes, h.instance_id, h.creator_pid, h.is_stale(1.0),
                          h.producer_alive(), repr(h)))
    rec("describe", h.describe)
    rec("stat", lambda: torch_shmem.stat(name))
    rec("close", lambda: h.close(timeout=1))
    return out


def assert_not_listed(name):
    assert name not in torch_shmem.list_streams()


def check_geometry(h):
    """An opened stream's geometry must be self-consistent (never silently wrong)."""
    assert h.size == math.prod(h.shape) * h.dtype.itemsize
    assert len(h.shape) <= 32 and all(d >= 0 for d in h.shape)


# Exceptions a damaged segment may legitimately raise, per operation.
OPEN_OK = {"ValueError"}
# StreamUnlinkedError: the publication line's `unlinked` flag is mutable, so
# damage that sets it ends waits as an unlink does (a clean, named error).
OP_OK = {"TimeoutError", "InconsistentStreamError", "ValueError", "StreamUnlinkedError"}


def assert_clean(outcome, result, *, must_reject=False):
    assert outcome == "ok", f"child ended with {outcome}: {result}"
    assert isinstance(result, list), result
    first = result[0]
    if must_reject:
        assert first[1] in OPEN_OK, f"damaged segment was opened: {result}"
    for op, kind, msg in result:
        if kind == "ok":
            continue
        if op == "open":
            assert kind in OPEN_OK, f"open raised {kind}: {msg}"
        elif op in ("stat",):
            assert kind in OPEN_OK | OP_OK, f"{op} raised {kind}: {msg}"
        else:
            assert kind in OP_OK, f"{op} raised {kind}: {msg}"


def make_stream(shape=(3, 5), dtype=np.float64, tag="s"):
    name = unique(tag)
    s = torch_shmem.create(name, shape=shape, dtype=dtype)
    s.write(np.arange(math.prod(shape), dtype=dtype).reshape(shape))
    s.close()
    return name, SHM + name


# ---- layout ------------------------------------------------------------------


def test_layout_is_as_documented():
    """The offsets this suite corrupts are the real ones (fails if the layout moves)."""
    name, path = make_stream(shape=(3, 5), dtype=np.float64)
    try:
        raw = open(path, "rb").read(4096)
        u32 = lambda f: struct.unpack_from("<I", raw, FIELDS[f][0])[0]  # noqa: E731
        u64 = lambda f: struct.unpack_from("<Q", raw, FIELDS[f][0])[0]  # noqa: E731
        assert u64("magic") == 0x314D485354484354
        assert u32("header_bytes") == 4096 and u64("payload_offset") == 4096
        # create()'s default for a small payload: 3 slots (header, counters page,
        # 3 x 512 B slots, page rounded); segment_bytes covers the slot area
        assert u64("payload_bytes") == 120 and u64("segment_bytes") == 4096 + 8192
        assert u32("dtype_code") == 12 and u32("itemsize") == 8 and u32("ndim") == 2
        assert struct.unpack_from("<2q", raw, FIELDS["shape"][0]) == (3, 5)
        assert u32("creator_pid") == os.getpid() and u32("mode") == 0o600
        assert u32("name_len") == len(name)
        assert raw[348:348 + len(name)] == name.encode()
        assert u64("seq") == 2
        assert u64("geometry_checksum") == geometry_checksum(raw)
    finally:
        torch_shmem.unlink(name)


# ---- corrupted segments ---------------------------------------------------------


IMMUTABLE = [f for f, (off, _) in FIELDS.items() if off < GEOMETRY_END]


@pytest.mark.parametrize("field", IMMUTABLE)
def test_any_change_to_an_immutable_field_is_rejected(field):
    """Each geometry/identity field: one changed byte and open() raises ValueError.

    Includes fields no range check can catch (creator_pid, mode, instance_id,
    a same-size dtype swap, unused shape entries, name bytes past name_len):
    the geometry checksum does.
    """
    name, path = make_stream()
    try:
        off, size = FIELDS[field]
        raw = open(path, "rb").read(4096)
        for pos in sorted({off, off + size // 2, off + size - 1}):
            patch(path, pos, bytes([raw[pos] ^ 0x5A]))
            with pytest.raises(ValueError, match="not a torch_shmem stream|corrupted"):
                torch_shmem.open(name)
            with pytest.raises(ValueError):
                torch_shmem.stat(name)
            assert name not in torch_shmem.list_streams()
            patch(path, pos, raw[pos:pos + 1])
        torch_shmem.open(name).close()  # restored: opens again
    finally:
        torch_shmem.unlink(name)


def test_same_size_dtype_swap_is_not_silent_garbage():
    name, path = make_stream(dtype=np.float64)
    try:
        patch(path, FIELDS["dtype_code"][0], struct.pack("<I", 8))  # float64 -> int64
        with pytest.raises(ValueError, match="checksum"):
            torch_shmem.open(name)
    finally:
        torch_shmem.unlink(name)


def test_crafted_header_with_wrapping_payload_size_is_rejected():
    """int16 x (2**63 - 1) = 2**64 - 2 bytes: page rounding wraps to 0, so a 4 KiB file
    'fits'. A handle on it would memset 2**64 bytes in clear(). Checksum made valid."""
    name, path = make_stream(shape=(4,), dtype=np.int16)
    try:
        patch(path, FIELDS["payload_bytes"][0], struct.pack("<Q", 2**64 - 2))
        patch(path, FIELDS["segment_bytes"][0], struct.pack("<Q", 4096))
        patch(path, FIELDS["shape"][0], struct.pack("<q", 2**63 - 1))
        patch(path, FIELDS["ndim"][0], struct.pack("<I", 1))
        os.truncate(path, 4096)
        fix_checksum(path)
        outcome, result = in_child(lambda: probe_ops(name))
        assert_clean(outcome, result, must_reject=True)
    finally:
        torch_shmem.unlink(name)


@pytest.mark.parametrize("kind", [0x0, 0x1, 0x2, 0x3, 0x10, 0x20, 0x32, 0x40, 0x52, 0x80000000,
                                  0x7FFFFFFF, 0xFFFFFFFF])
def test_corrupted_mutex_kind_gives_value_error_not_abort(kind):
    """glibc asserts (SIGABRT) on some mutex kinds and silently misbehaves on others
    (a lock that is never released): the kind is validated at open and before every
    lock operation. None of these is the real kind (0x92: robust, shared, errorcheck)."""
    name, path = make_stream()
    try:
        def body():
            h = torch_shmem.open(name)  # opened while intact ...
            patch(path, MUTEX_KIND_AT, struct.pack("<I", kind))  # ... damaged afterwards
            out = []
            for op, f in [("acquire", lambda: h.acquire(timeout=0.2)),
                          ("write", lambda: h.write(np.ones(h.shape), timeout=0.2)),
                          ("write_view", lambda: h.write_view(timeout=0.2).__enter__()),
                          ("clear", lambda: h.clear(timeout=0.2)),
                          ("read", lambda: h.read(timeout=0.2))]:
                try:
                    f()
                    out.append([op, "ok", ""])
                except Exception as exc:  # noqa: BLE001
                    out.append([op, type(exc).__name__, str(exc)])
            h.close()
            return out + probe_ops(name)  # a new open refuses it

        outcome, result = in_child(body)
        assert_clean(outcome, result)
        got = {op: (k, m) for op, k, m in result}
        for op in ("acquire", "write", "write_view", "clear"):
            assert got[op][0] == "ValueError" and "lock is corrupted" in got[op][1], result
        assert got["read"][0] == "ok"  # the seqlock fast path needs no lock
        assert got["open"][0] == "ValueError" and "lock is corrupted" in got["open"][1], result
    finally:
        torch_shmem.unlink(name)


def test_odd_sequence_left_behind_reads_as_inconsistent():
    """seq odd with no writer (a corrupted header, or a holder that released the lock
    mid-write): reads raise InconsistentStreamError, not a misleading RuntimeError."""
    name, path = make_stream()
    try:
        patch(path, FIELDS["seq"][0], struct.pack("<Q", 7))

        def body():
            h = torch_shmem.open(name)
            out = []
            for _ in range(2):
                try:
                    h.read(timeout=1)
                    out.append("ok")
                except Exception as exc:  # noqa: BLE001
                    out.append(type(exc).__name__)
            h.write(np.full(h.shape, 9.0), timeout=1)  # repairs
            out.append(h.read().tolist())
            out.append(h.count)
            return out

        outcome, result = in_child(body)
        assert outcome == "ok", result
        assert result[0] == result[1] == "InconsistentStreamError", result
        assert result[2] == np.full((3, 5), 9.0).tolist() and result[3] == 4
    finally:
        torch_shmem.unlink(name)


def test_header_changed_after_validation_never_drives_a_copy():
    """Another process rewrites ndim and dtype while we open the stream (a writer that
    was granted access, or memory corruption): open() validates one private copy of the
    header and uses only that copy, so the race ends in ValueError or a correct handle.
    Re-reading the shared header after validation let ndim = 65535 overrun the handle's
    dims array (heap overflow) and a dtype swap size the result array wrongly."""
    import mmap
    import time

    name, path = make_stream(shape=(3, 5), dtype=np.float64)
    flipper = os.fork()
    if flipper == 0:
        try:
            fd = os.open(path, os.O_RDWR)
            m = mmap.mmap(fd, 4096)
            words = np.frombuffer(m, dtype=np.uint32)
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                for _ in range(1000):
                    words[12] = 0xFFFF  # ndim
                    words[10] = 3       # dtype uint8 (payload no longer matches)
                    words[12] = 2
                    words[10] = 12
        finally:
            os._exit(0)

    def opener():
        opened = refused = 0
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            try:
                h = torch_shmem.open(name)
            except ValueError:
                refused += 1
                continue
            assert h.shape == (3, 5) and h.dtype == np.float64, (h.shape, h.dtype)
            h.read()
            h.read(out=np.empty((3, 5)))
            h.close()
            opened += 1
        return [opened, refused]

    try:
        outcome, result = in_child(opener, timeout=60)
        assert outcome == "ok", (outcome, result)
        print(f"opened {result[0]}, refused {result[1]} while the header changed")
    finally:
        os.waitpid(flipper, 0)
        torch_shmem.unlink(name)


@FUZZ
@given(region=st.sampled_from(["geometry", "mutable", "anywhere"]),
       offset=st.integers(0, 4095), data=st.binary(min_size=1, max_size=16),
       fix=st.booleans(), dtype=st.sampled_from([np.uint8, np.float32, np.complex128]),
       shape=st.sampled_from([(), (1,), (7,), (3, 5), (2, 0, 4)]))
def test_random_bytes_in_header(region, offset, data, fix, dtype, shape):
    """Random bytes anywhere in the header page: open refuses, or every op behaves."""
    if region == "geometry":
        offset = 8 + offset % (GEOMETRY_END - 8)
    elif region == "mutable":
        offset = GEOMETRY_END + offset % (4096 - GEOMETRY_END)
    name, path = make_stream(shape=shape, dtype=dtype, tag="h")
    try:
        patch(path, offset, data[: 4096 - offset])
        if fix:
            fix_checksum(path)  # let the deeper validation run
        outcome, result = in_child(lambda: probe_ops(name))
        assert_clean(outcome, result)
        changed_geometry = offset < GEOMETRY_END and not fix
        if changed_geometry and result[0][1] == "ok":
            raw_now = open(path, "rb").read(GEOMETRY_END)
            # opened although the geometry changed: only if the bytes were equal
            assert struct.unpack_from("<Q", raw_now, CHECKSUM_AT)[0] == geometry_checksum(raw_now)
    finally:
        torch_shmem.unlink(name)


def foreign_file(path, content: bytes, size: int):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content[:size])
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


@FUZZ
@given(content=st.binary(min_size=8, max_size=256),
       size=st.one_of(st.integers(4096, 3 * 4096), st.sampled_from([8192, 4096 + 1, 1 << 20])),
       magic=st.booleans(), version=st.booleans())
def test_foreign_files_under_a_stream_name(content, size, magic, version):
    """Files that are not ours (random bytes, our magic on garbage): ValueError."""
    assume(content[:8] != b"\0" * 8 or magic)  # an all-zero magic waits 1 s (covered below)
    name = unique("x")
    path = SHM + name
    if magic:
        content = struct.pack("<Q", 0x314D485354484354) + content[8:]
        if version:
            content = content[:8] + struct.pack("<I", 2) + content[12:]
    foreign_file(path, content, size)
    try:
        outcome, result = in_child(lambda: probe_ops(name))
        assert_clean(outcome, result, must_reject=True)
    finally:
        os.unlink(path)


@pytest.mark.parametrize("size", [0, 100, 4095])
def test_files_shorter_than_a_header(size):
    name = unique("t")
    path = SHM + name
    foreign_file(path, os.urandom(size), size)
    try:
        outcome, result = in_child(lambda: probe_ops(name))
        assert_clean(outcome, result, must_reject=True)
        assert "bytes" in result[0][2]
    finally:
        os.unlink(path)


def test_huge_sparse_foreign_file_is_rejected_without_mapping_it():
    """A 1 PiB sparse file with our magic: ValueError, not an mmap failure (OSError)."""
    name = unique("p")
    path = SHM + name
    head = struct.pack("<QI", 0x314D485354484354, 2) + os.urandom(4096 - 12)
    foreign_file(path, head, 4096)
    try:
        try:
            os.truncate(path, 1 << 50)
        except OSError as exc:
            pytest.skip(f"tmpfs refuses a 1 PiB sparse file here: {exc}")
        outcome, result = in_child(lambda: probe_ops(name))
        assert_clean(outcome, result, must_reject=True)
    finally:
        os.unlink(path)


@pytest.mark.parametrize("change", ["shorter", "longer", "header_only", "one_byte_short"])
def test_segment_size_differs_from_header(change):
    name, path = make_stream(shape=(1000,), dtype=np.float64)
    try:
        size = os.stat(path).st_size
        new = {"shorter": size - 4096, "longer": size + 4096, "header_only": 4096,
               "one_byte_short": size - 1}[change]
        os.truncate(path, new)
        outcome, result = in_child(lambda: probe_ops(name))
        assert_clean(outcome, result, must_reject=True)
    finally:
        torch_shmem.unlink(name)


def test_another_streams_segment_under_this_name():
    a, path_a = make_stream(tag="a")
    b = unique("b")
    try:
        foreign_file(SHM + b, open(path_a, "rb").read(), os.stat(path_a).st_size)
        with pytest.raises(ValueError, match="stored name does not match"):
            torch_shmem.open(b)
    finally:
        torch_shmem.unlink(a)
        torch_shmem.unlink(b)


def test_non_files_under_a_stream_name(tmp_path):
    """A directory, a FIFO or a symlink where a stream should be: ValueError at once
    (not an OSError that breaks list_streams, not a 1 s wait), link never followed."""
    name = unique("n")
    path = SHM + name
    cases = {"dir": (lambda: os.mkdir(path), "a directory"),
             "fifo": (lambda: os.mkfifo(path), "not a regular file"),
             "symlink": (lambda: os.symlink(str(tmp_path / "target"), path), "symbolic link")}
    (tmp_path / "target").write_bytes(b"\0" * 8192)
    for kind, (make, why) in cases.items():
        make()
        try:
            outcome, result = in_child(lambda: probe_ops(name))
            assert_clean(outcome, result, must_reject=True)
            assert why in result[0][2], (kind, result)
            assert name not in torch_shmem.list_streams()
        finally:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.unlink(path)
    assert (tmp_path / "target").read_bytes() == b"\0" * 8192


def test_abandoned_files_do_not_slow_scans():
    """Empty files under the prefix (a creator that died before writing the header, or
    planted by anyone): once they are 2 s old, open() refuses them at once, so they
    cannot stall list_streams() by a second each."""
    import time

    names = [unique("e") for _ in range(10)]
    for n in names:
        foreign_file(SHM + n, b"", 0)
    try:
        time.sleep(2.2)
        t0 = time.monotonic()
        listed = torch_shmem.list_streams()
        took = time.monotonic() - t0
        assert not set(names) & set(listed)
        assert took < 5, f"list_streams took {took:.1f} s over 10 abandoned files"
        with pytest.raises(ValueError, match="header never initialized|only 0 bytes"):
            torch_shmem.open(names[0])
    finally:
        for n in names:
            os.unlink(SHM + n)


# ---- API arguments -------------------------------------------------------------

VALID_DTYPES = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128]
junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=5),
                 st.binary(max_size=5), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
                 st.just(object()), st.just(np.float32), st.just(float("inf")))
big_ints = st.one_of(st.integers(-2, 40), st.integers(-2**70, 2**70),
                     st.sampled_from([2**31, 2**32, 2**46, 2**62, 2**63 - 1, 2**63, 2**64 - 1,
                                      2**64, -2**63]))
dims = st.one_of(big_ints, st.booleans(), st.floats(allow_nan=False, allow_infinity=False),
                 st.builds(np.int64, st.integers(0, 8)), st.text(max_size=2))
shapes = st.one_of(big_ints, st.lists(dims, max_size=34).map(tuple), st.lists(dims, max_size=4),
                   junk)
dtypes = st.one_of(st.sampled_from(VALID_DTYPES),
                   st.sampled_from(["float32", "<f8", ">f4", ">i8", "U4", "S3", "V8", "O",
                                    "M8[s]", "m8[ns]", "longdouble", "complex256", "f2",
                                    [("a", "<i4")], "i4,i4", "bogus", "", "?"]),
                   junk)
timeouts = st.one_of(st.none(), st.floats(min_value=0, max_value=0.01),
                     st.floats(allow_nan=True), st.integers(-5, 2**70), st.sampled_from(
                         [float("inf"), -0.0, 1e308, float("nan"), -1, True]), st.text(max_size=2))

ARG_ERRORS = (TypeError, ValueError)


def nbytes_of(shape, dtype):
    """(payload bytes, dims) when create() must accept (shape, dtype), else None.

    Mirrors the documented rules: an int or any iterable of ints (operator.index)
    >= 0, at most 32 of them; a supported native dtype.
    """
    import operator

    try:
        dt = np.dtype(dtype)
    except Exception:  # noqa: BLE001
        return None
    if dt not in [np.dtype(d) for d in VALID_DTYPES] or not dt.isnative:
        return None
    if shape is None:
        return None
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        out = [operator.index(d) for d in shape]
    except TypeError:
        return None
    if any(d < 0 or d >= 2**63 for d in out) or len(out) > 32:
        return None
    if math.prod(d for d in out if d) * dt.itemsize >= 2**63:
        return None  # NumPy could never hold it, even empty
    return math.prod(out) * dt.itemsize, out


@FUZZ
@given(shape=shapes, dtype=dtypes)
def test_create_shape_dtype(shape, dtype):
    info = nbytes_of(shape, dtype)
    if info is not None:
        # sizes /dev/shm might really try to hold are not fuzzed (a valid 1 GiB
        # stream would be created); the core's limit is 2**46 bytes
        assume(info[0] <= 1 << 20 or info[0] > 1 << 46)
    name = unique("c")
    try:
        s = torch_shmem.create(name, shape=shape, dtype=dtype)
    except ARG_ERRORS as exc:
        assert info is None or info[0] > 1 << 46, f"valid stream refused: {exc!r}"
        assert not os.path.exists(SHM + name)
        return
    try:
        assert info is not None and info[0] <= 1 << 20, "invalid arguments accepted"
        assert s.shape == tuple(info[1]) and s.size == info[0]
        assert s.read().shape == s.shape
    finally:
        torch_shmem.unlink(name)


@pytest.mark.parametrize("shape,dtype", [((2**63,), np.uint8), ((2**64,), np.uint8),
                                         ((0, 2**70), np.float32), ((0, 2**31, 2**31), np.int16),
                                         ((2**62, 4), np.uint8)])
def test_out_of_range_shapes_are_value_errors(shape, dtype):
    """Dimensions past int64, or empty shapes NumPy could never hold: ValueError, not
    OverflowError (and not a stream that exists but can never be read)."""
    name = unique("o")
    try:
        with pytest.raises(ValueError, match="torch_shmem"):
            torch_shmem.create(name, shape=shape, dtype=dtype)
        assert not os.path.exists(SHM + name)
    finally:
        torch_shmem.unlink(name)


@pytest.mark.parametrize("dtype", [",", b",", "(,)i4", "0:", "0,", "i4,,", "[", "V-1"])
def test_malformed_dtype_strings_are_type_or_value_errors(dtype):
    """NumPy parses dtype strings with ast; some raise SyntaxError there."""
    name = unique("d")
    try:
        with pytest.raises(ARG_ERRORS):
            torch_shmem.create(name, shape=(1,), dtype=dtype)
    finally:
        torch_shmem.unlink(name)


@pytest.mark.parametrize("after", [2**63, 2**64, 2**100])
def test_out_of_range_counts_are_value_errors(fuzz_streams, after):
    s = fuzz_streams[("int32", (3,))]
    for call in (lambda: s.read_after(after, timeout=0), lambda: s.wait_for_count(after=after),
                 lambda: s.read_after_publication(after, timeout=0)):
        with pytest.raises(ValueError, match="2\\*\\*63"):
            call()


@FUZZ
@given(name=st.one_of(st.text(max_size=220), st.binary(max_size=10), junk,
                      st.sampled_from(["", "/", "a/b", "..", ".", "../x", "\0", "a\0b", "\n",
                                       "\x7f", "\ud800", "x" * 200, "x" * 201, "é" * 100,
                                       "é" * 101, " ", "-", "~", "*", "%s", "..\\..\\x"])),
       op=st.sampled_from(["create", "open", "unlink", "stat"]))
def test_names_cannot_escape_the_namespace(name, op):
    """Invalid names raise TypeError/ValueError; a valid name maps to exactly
    /dev/shm/torch_shmem.<name> and nothing else is touched."""
    if isinstance(name, str) and name and "/" not in name and "\0" not in name:
        try:
            encoded = name.encode()
        except UnicodeEncodeError:
            encoded = None
    else:
        encoded = None
    valid = (encoded is not None and 0 < len(encoded) <= 200
             and not any(c < 0x20 or c == 0x7F for c in encoded))
    if valid:
        name = f"{name}"  # real names: prefix keeps other sessions' streams out of reach
        unique_name = unique("n")[:40] + name
        if len(unique_name.encode()) > 200:
            unique_name = unique_name.encode()[:200].decode(errors="ignore")
        name = unique_name
    before = set(os.listdir("/dev/shm"))
    try:
        if op == "create":
            s = torch_shmem.create(name, shape=(1,))
            s.close()
        elif op == "open":
            torch_shmem.open(name)
        elif op == "unlink":
            torch_shmem.unlink(name)
        else:
            torch_shmem.stat(name)
    except FileNotFoundError:
        assert valid and op in ("open", "stat"), (name, op)
    except ARG_ERRORS as exc:
        assert not valid, f"valid name {name!r} refused by {op}: {exc!r}"
    else:
        assert valid, f"invalid name {name!r} accepted by {op}"
        if op == "create":
            path = SHM + name
            assert os.path.isfile(path) and os.path.dirname(os.path.realpath(path)) == "/dev/shm"
            # other processes may add their own entries meanwhile (a shared /dev/shm):
            # compare this process's only
            new = set(os.listdir("/dev/shm")) - before
            assert {e for e in new if name in e or f"-{os.getpid()}-" in e} == {"torch_shmem." + name}
            torch_shmem.unlink(name)
    finally:
        if valid:
            torch_shmem.unlink(name)
    if not valid and isinstance(name, str):
        try:
            assert not os.path.lexists(SHM + name)
        except ValueError:  # NUL in the name: no such path can exist
            pass
    mine = {e for e in set(os.listdir("/dev/shm")) - before if f"-{os.getpid()}-" in e}
    assert mine == set(), f"{op}({name!r}) left {mine}"


@FUZZ
@given(mode=st.one_of(st.integers(-10, 0o1000), st.sampled_from([0o4777, 2**40, -1, 0o7777]),
                      junk),
       size=st.one_of(st.none(), st.integers(-5, 100), junk))
def test_create_mode_and_size(mode, size):
    name = unique("m")
    valid_mode = isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode <= 0o777
    valid_size = size is None or (isinstance(size, int) and size == 8)  # shape (2,) float32
    try:
        s = torch_shmem.create(name, shape=(2,), mode=mode, size=size)
    except ARG_ERRORS:
        assert not (valid_mode and valid_size) or isinstance(mode, bool)
        assert not os.path.exists(SHM + name)
        return
    try:
        assert (valid_mode or isinstance(mode, bool)) and valid_size
        assert stat_mod.S_IMODE(os.stat(SHM + name).st_mode) == int(mode)
        s.close()
    finally:
        torch_shmem.unlink(name)


@pytest.fixture(scope="module")
def fuzz_streams():
    made = {}
    for dt in (np.uint8, np.int32, np.float32, np.float64, np.complex64, np.bool_):
        for shape in ((), (3,), (2, 3)):
            n = unique("w")
            made[(np.dtype(dt).name, shape)] = torch_shmem.create(n, shape=shape, dtype=dt)
    yield made
    for s in made.values():
        s.unlink()


def array_values(_unused):
    return st.one_of(
        st.builds(lambda dt, shp, order, step: _arr(dt, shp, order, step),
                  st.sampled_from(VALID_DTYPES + ["<U3", "O", "S2", ">f8", ">i4"]),
                  st.sampled_from([(), (3,), (2, 3), (3, 2), (6,), (1, 2, 3), (2, 3, 1), (0,)]),
                  st.sampled_from(["C", "F"]), st.sampled_from([1, 2])))


def _arr(dt, shape, order, step):
    dt = np.dtype(dt)
    base_shape = tuple(d * step for d in shape) if step > 1 and shape else shape
    n = math.prod(base_shape)
    if dt.kind in "US":
        a = np.array([str(i) for i in range(n)], dtype=dt).reshape(base_shape)
    elif dt.kind == "O":
        a = np.array(list(range(n)), dtype=object).reshape(base_shape)
    else:
        a = (np.arange(n) % 3).astype(dt).reshape(base_shape)
    a = np.asarray(a, order=order)
    if step > 1 and shape:
        a = a[tuple(slice(None, None, step) for _ in shape)]
    return a


values = st.one_of(array_values(None), junk, st.integers(-2**70, 2**70), st.floats(),
                   st.complex_numbers(), st.lists(st.integers(-300, 300), max_size=7),
                   st.lists(st.lists(st.floats(allow_nan=False, width=32), min_size=3,
                                     max_size=3), min_size=2, max_size=2),
                   st.lists(st.text(max_size=2), max_size=3), st.builds(bytearray, st.binary()),
                   st.builds(memoryview, st.binary(max_size=12)))


def _kept(x, dt) -> bool:
    """Whether Python number ``x`` survives write()'s default "checked" cast into ``dt``
    (docs/api.md, "Writing another dtype"), decided here with Python arithmetic."""
    if isinstance(x, complex) and dt.kind != "c":
        if x.imag != 0:
            return False
        x = x.real
    if dt.kind in "biu":
        if isinstance(x, float) and not (math.isfinite(x) and x.is_integer()):
            return False
        lo, hi = (0, 1) if dt.kind == "b" else (np.iinfo(dt).min, np.iinfo(dt).max)
        return lo <= int(x) <= hi
    # float or complex stream: rounding is fine, a finite value becoming inf is not
    parts = (x.real, x.imag) if isinstance(x, complex) else (x,)
    component = np.finfo(dt).dtype  # float32 for complex64
    with np.errstate(all="ignore"):
        return all(not math.isfinite(p) or math.isfinite(float(component.type(p)))
                   for p in map(float, parts))


def expected_payload(s, value):
    """What write(value) must store, per the documented conversion rules, or None."""
    dt = s.dtype
    try:
        a = np.asarray(value)
        if a.dtype.kind not in "biufc":
            if hasattr(value, "dtype") or hasattr(value, "__array_interface__"):
                return None  # arrays of strings, objects: refused
            with np.errstate(all="ignore"):
                a = np.asarray(value, dtype=dt)  # sequences of non-numbers: NumPy converts
    except Exception:  # noqa: BLE001
        return None
    if a.shape != s.shape:
        return None
    if a.dtype != dt and not np.can_cast(a.dtype, dt, casting="safe"):
        if not all(_kept(x, dt) for x in a.ravel().tolist()):
            return None
    if a.dtype.kind == "c" and dt.kind != "c":
        a = a.real  # accepted only with zero imaginary parts (checked above)
    with np.errstate(all="ignore"):
        return np.ascontiguousarray(a.astype(dt))


@FUZZ
@given(key=st.sampled_from([(d, s) for d in ("uint8", "int32", "float32", "float64",
                                             "complex64", "bool") for s in ((), (3,), (2, 3))]),
       value=values, frame_id=st.one_of(st.none(), big_ints, junk), timeout=timeouts)
def test_write_arguments(fuzz_streams, key, value, frame_id, timeout):
    s = fuzz_streams[key]
    valid_fid = frame_id is None or (isinstance(frame_id, (int, np.integer))
                                     and not isinstance(frame_id, float)
                                     and 0 <= int(frame_id) < 2**64)
    valid_timeout = timeout is None or (
        isinstance(timeout, (int, float)) and not math.isnan(timeout) and timeout >= 0)
    with np.errstate(all="ignore"):
        expected = expected_payload(s, value)
    before = s.count
    try:
        with np.errstate(all="ignore"):
            s.write(value, frame_id=frame_id, timeout=timeout)
    except ARG_ERRORS as exc:
        assert s.count == before, "a refused write was published"
        assert str(exc).startswith("torch_shmem:") or isinstance(exc, TypeError), repr(exc)
        assert expected is None or not valid_fid or not valid_timeout, (
            f"valid write refused: {exc!r}")
        return
    assert s.count == before + 1
    assert valid_fid and valid_timeout, "invalid frame_id/timeout accepted"
    assert expected is not None, f"{value!r} accepted for {s.dtype}{s.shape}"
    got = s.read()
    assert got.tobytes() == expected.tobytes(), "stored payload differs from the value written"
    if frame_id is not None:
        assert s.frame_id == int(frame_id)


def _readonly():
    a = np.zeros((2, 3), np.float32)
    a.setflags(write=False)
    return a


outs = st.one_of(array_values(None), junk, st.builds(_readonly),
                 st.builds(lambda: np.zeros((2, 3), np.float32).view(">f4")),
                 st.builds(lambda: np.zeros((3, 2), np.float32).T),
                 st.builds(lambda: np.zeros((2, 3), np.float32)),
                 st.builds(lambda: np.zeros((2, 3), np.int32)),
                 st.builds(lambda: np.zeros((2, 6), np.float32)[:, ::2]),
                 st.builds(lambda: np.zeros((2, 3), np.float32).tolist()))


@FUZZ
@given(out=outs, timeout=timeouts, which=st.sampled_from(["read", "read_publication",
                                                            "read_after", "read_new"]))
def test_read_out_and_timeout(fuzz_streams, out, timeout, which):
    s = fuzz_streams[("float32", (2, 3))]
    s.write(np.arange(6, dtype=np.float32).reshape(2, 3), frame_id=5)
    exact = (isinstance(out, np.ndarray) and out.shape == (2, 3) and out.dtype == np.float32
             and out.flags.c_contiguous and out.flags.writeable and out.dtype.isnative)
    valid_out = out is None or exact
    valid_timeout = timeout is None or (
        isinstance(timeout, (int, float)) and not math.isnan(timeout) and timeout >= 0)
    if which == "read_new" and valid_out and valid_timeout:
        timeout = 0.001  # nothing is written: a valid call can only time out
    try:
        if which == "read":
            got = s.read(out=out, timeout=timeout)
        elif which == "read_publication":
            got = s.read_publication(out=out, timeout=timeout).payload
        elif which == "read_after":
            got = s.read_after(s.count - 1, out=out, timeout=timeout)
        else:
            got = s.read_new(out=out, timeout=timeout)
    except TimeoutError:
        assert which == "read_new"
        return
    except ARG_ERRORS as exc:
        assert not (valid_out and valid_timeout), f"valid read refused: {exc!r}"
        return
    assert valid_out and valid_timeout, f"read accepted out={out!r} timeout={timeout!r}"
    assert which != "read_new"
    assert got.tolist() == [[0, 1, 2], [3, 4, 5]]
    if out is not None:
        assert got is out


@FUZZ
@given(after=st.one_of(big_ints, junk), timeout=timeouts,
       which=st.sampled_from(["read_after", "wait_for_count", "read_after_publication"]))
def test_after_arguments(fuzz_streams, after, timeout, which):
    s = fuzz_streams[("int32", (3,))]
    s.write(np.array([1, 2, 3], np.int32))
    count = s.count
    valid_after = (isinstance(after, (int, np.integer)) and 0 <= after < 2**63)  # bools are ints
    valid_timeout = timeout is None or (
        isinstance(timeout, (int, float)) and not math.isnan(timeout) and timeout >= 0)
    if valid_after and valid_timeout and int(after) >= count:
        timeout = 0.001
    try:
        if which == "read_after":
            s.read_after(after, timeout=timeout)
        elif which == "wait_for_count":
            s.wait_for_count(after=after, timeout=timeout)
        else:
            s.read_after_publication(after, timeout=timeout)
    except TimeoutError:
        assert valid_after and int(after) >= count
        return
    except ARG_ERRORS as exc:
        assert not (valid_after and valid_timeout), f"valid call refused: {exc!r}"
        return
    assert valid_after and valid_timeout and int(after) < count


@FUZZ
@given(timeout=timeouts, max_age=st.one_of(st.floats(), big_ints, junk))
def test_lock_and_misc_arguments(fuzz_streams, timeout, max_age):
    s = fuzz_streams[("uint8", (3,))]
    valid_timeout = timeout is None or (
        isinstance(timeout, (int, float)) and not math.isnan(timeout) and timeout >= 0)
    for call in (lambda: s.acquire(timeout=timeout), lambda: s.locked(timeout=timeout).__enter__(),
                 lambda: s.clear(timeout=timeout),
                 lambda: torch_shmem.locked_many([s], timeout=timeout).__enter__()):
        try:
            call()
        except ARG_ERRORS:
            assert not valid_timeout
            continue
        assert valid_timeout
        while s._h.held_depth() > 0:
            s.release()
    try:
        s.is_stale(max_age)
    except ARG_ERRORS:
        pass
    for junk_handles in ([s, s], [s, object()], [1], "ab"):
        with pytest.raises(ARG_ERRORS):
            torch_shmem.locked_many(junk_handles).__enter__()
    assert s._h.held_depth() == 0
