"""Permissions: streams are 0600 by default, other users get exactly what mode= grants.

The probes run as another user: a child started with setpriv(1) under uid
65534 (nobody), with gid 65534 ("other") or gid 0 (a member of the group of a
root-created stream). Needs root and setpriv; skipped with the reason
otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import stat as stat_mod
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import torch_shmem

pytestmark = pytest.mark.cpu

SHM = "/dev/shm/torch_shmem."
OTHER_UID = 65534

PROBE = textwrap.dedent(r"""
    import json, os, sys
    import numpy as np
    import torch_shmem

    name, with_handle = sys.argv[1], sys.argv[2] == "1"
    out = {"uid": os.getuid(), "gid": os.getgid()}

    def rec(op, f):
        try:
            r = f()
            out[op] = "ok" if r is None else r
        except Exception as exc:
            out[op] = type(exc).__name__

    def raw_read():
        with open("/dev/shm/torch_shmem." + name, "rb") as f:
            return len(f.read())

    rec("open", lambda: torch_shmem.open(name).close())
    rec("open_readonly", lambda: torch_shmem.open(name, readonly=True).close())
    rec("stat", lambda: torch_shmem.stat(name)["uid"])
    rec("raw_read", raw_read)
    rec("listed", lambda: name in torch_shmem.list_streams())
    rec("create_same_name", lambda: torch_shmem.create(name, shape=(1,)).close())
    if with_handle:
        try:
            h = torch_shmem.open(name)
        except Exception as exc:
            out["handle"] = type(exc).__name__
        else:
            rec("read", lambda: h.read(timeout=5).tolist())
            rec("write", lambda: h.write(np.full(h.shape, 42, h.dtype), timeout=5))
            rec("lock", lambda: (h.acquire(timeout=5), h.release()) and None)
            def view():
                with h.write_view(timeout=5) as v:
                    v[...] = 43
            rec("write_view", view)
            rec("count", lambda: h.count)
            h.close()
    rec("unlink", lambda: torch_shmem.unlink(name))
    print(json.dumps(out))
""")


def run_as(uid, gid, name, with_handle=True):
    if os.geteuid() != 0:
        pytest.skip("needs root to start a process of another user (setpriv)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("needs setpriv(1) (util-linux) to start a process of another user")
    cmd = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
           sys.executable, "-c", PROBE, name, "1" if with_handle else "0"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSTARTUP",)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/", env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["uid"] == uid and out["gid"] == gid
    return out


def unlinked_flag(name):
    with open(SHM + name, "rb") as f:
        f.seek(1052)
        return struct.unpack("<I", f.read(4))[0]


def make(name, mode=None):
    kwargs = {} if mode is None else {"mode": mode}
    s = torch_shmem.create(name, shape=(4,), dtype=np.int32, **kwargs)
    s.write(np.arange(4, dtype=np.int32))
    return s


DENIED = {"open": "PermissionError", "open_readonly": "PermissionError",
          "stat": "PermissionError", "raw_read": "PermissionError",
          "create_same_name": "FileExistsError", "unlink": "PermissionError",
          "handle": "PermissionError"}


@pytest.mark.parametrize("gid", [OTHER_UID, 0], ids=["other", "group_member"])
def test_default_0600_denies_every_other_user(name, gid):
    s = make(name)
    assert stat_mod.S_IMODE(os.stat(SHM + name).st_mode) == 0o600
    out = run_as(OTHER_UID, gid, name)
    for op, want in DENIED.items():
        assert out[op] == want, (op, out)
    assert out["listed"] is True  # names are visible (documented), contents are not
    # nothing changed: same generation, same payload, same count, not flagged unlinked
    assert os.path.exists(SHM + name) and unlinked_flag(name) == 0
    assert s.count == 1 and s.read().tolist() == [0, 1, 2, 3]
    r = torch_shmem.open(name)
    assert r.instance_id == s.instance_id


@pytest.mark.parametrize("mode,gid,granted", [
    (0o660, 0, True),            # group rw, prober in the group
    (0o660, OTHER_UID, False),   # group rw, prober not in it
    (0o606, OTHER_UID, True),    # other rw
    (0o606, 0, False),           # the group class applies to members, even if "other" may
    (0o666, OTHER_UID, True),
    (0o640, 0, False),           # read alone is not enough: the lock lives in the segment
    (0o644, OTHER_UID, False),
], ids=["660-member", "660-other", "606-other", "606-member", "666-other", "640-member",
        "644-other"])
def test_explicit_mode_grants_exactly_read_write(name, mode, gid, granted):
    s = make(name, mode)
    assert stat_mod.S_IMODE(os.stat(SHM + name).st_mode) == mode
    out = run_as(OTHER_UID, gid, name)
    if granted:
        assert out["open"] == "ok" and out["open_readonly"] == "ok", out
        assert out["stat"] == 0  # owner uid: a consumer can check who created it
        assert out["read"] == [0, 1, 2, 3]
        assert out["write"] == "ok" and out["lock"] == "ok" and out["write_view"] == "ok", out
        assert s.count == 3 and s.read().tolist() == [43] * 4
    else:
        assert out["open"] == out["open_readonly"] == out["stat"] == "PermissionError", out
        assert s.count == 1
    # no one but the owner may remove it (/dev/shm is sticky) ...
    assert out["unlink"] == "PermissionError"
    # ... and a refused unlink changes nothing (it used to flag the stream
    # `unlinked` before the removal failed)
    assert os.path.exists(SHM + name) and unlinked_flag(name) == 0
    # read bits let the bytes be read with plain file I/O: mode= is the only protection
    readable = bool(mode & (0o040 if gid == 0 else 0o004))
    assert (out["raw_read"] != "PermissionError") == readable
    s.unlink()


def test_mode_is_exact_regardless_of_umask(name):
    old = os.umask(0o000)
    try:
        torch_shmem.create(name, shape=(1,)).close()
        assert stat_mod.S_IMODE(os.stat(SHM + name).st_mode) == 0o600
        torch_shmem.unlink(name)
        os.umask(0o077)
        torch_shmem.create(name, shape=(1,), mode=0o666).close()
        assert stat_mod.S_IMODE(os.stat(SHM + name).st_mode) == 0o666
    finally:
        os.umask(old)


def test_symlink_planted_under_a_stream_name_is_never_followed(name, tmp_path):
    """Another user plants /dev/shm/torch_shmem.<name> -> a file of ours: open and create
    refuse, the target is untouched, unlink removes only the link."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 1024)
    os.chmod(tmp_path, 0o755)
    code = f"import os; os.symlink({str(victim)!r}, {SHM + name!r})"
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to plant the link as another user")
    subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                    sys.executable, "-c", code], check=True, cwd="/", timeout=60)
    assert os.path.islink(SHM + name)
    with pytest.raises(ValueError, match="symbolic link"):
        torch_shmem.open(name)
    with pytest.raises(FileExistsError):
        torch_shmem.create(name, shape=(1,))
    with pytest.raises(ValueError):
        torch_shmem.stat(name)
    assert name not in torch_shmem.list_streams()  # a planted link used to break the listing
    torch_shmem.unlink(name)
    assert not os.path.lexists(SHM + name)
    assert victim.read_bytes() == b"precious" * 1024


def test_a_name_squatted_by_another_user_is_visible(name):
    """Another user creating the name first: create() fails loudly, and stat() names
    the owner so a consumer can refuse a stream it did not expect."""
    code = (f"import torch_shmem; s = torch_shmem.create({name!r}, shape=(1,), mode=0o666); "
            "s.close()")
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1) to create a stream as another user")
    subprocess.run(["setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", "--clear-groups",
                    sys.executable, "-c", code], check=True, cwd="/", timeout=60)
    with pytest.raises(FileExistsError):
        torch_shmem.create(name, shape=(1,))
    assert torch_shmem.stat(name)["uid"] == OTHER_UID
    torch_shmem.unlink(name)  # the owner of /dev/shm (root) may remove it
