"""The `torch-shmem` console script, run in a subprocess as a user would."""

import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import _workers
import torch_shmem

pytestmark = pytest.mark.cpu

ctx = mp.get_context("spawn")
SCRIPT = Path(sys.executable).with_name("torch-shmem")


def cli(*args, timeout=60):
    if not SCRIPT.exists():
        pytest.fail(f"console script {SCRIPT} is missing: pip install --no-build-isolation -e .")
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def row(output, name):
    """The table row of stream `name`, split into columns (2+ spaces apart)."""
    for line in output.splitlines():
        cols = re.split(r"\s{2,}", line.strip())
        if cols[0] == name:
            return cols
    raise AssertionError(f"no row for {name!r} in:\n{output}")


def start(target, *args):
    p = ctx.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def popen_interruptible(args, **kwargs):
    """Popen whose child takes SIGINT as Ctrl-C even when this run ignores SIGINT.

    A process started with SIGINT ignored (``nohup``, ``&`` in a script, some CI
    runners) passes the ignored disposition on through exec, and Python then
    installs no KeyboardInterrupt handler. A Python-level handler in the parent
    becomes the default disposition in the child.
    """
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(args, **kwargs)
    finally:
        signal.signal(signal.SIGINT, old)


def orphan(name):
    """A stream whose creator has exited (and nobody maps it)."""
    p = start(_workers.create_and_exit, name)
    p.join(60)
    assert p.exitcode == 0
    return p.pid


def test_entry_points_and_usage():
    out = cli("--help")
    assert out.returncode == 0
    for command in ("list", "stat", "unlink", "purge", "watch", "doctor"):
        assert command in out.stdout
    out = subprocess.run([sys.executable, "-m", "torch_shmem"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "usage: torch-shmem" in out.stderr
    out = cli("watch")
    assert out.returncode == 2 and "NAME" in out.stderr
    out = cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"torch-shmem {torch_shmem.__version__}"


def test_list_table(name):
    live, locked, dead = name + "-live", name + "-locked", name + "-dead"
    s = torch_shmem.create(live, shape=(3, 4), dtype=np.float64)
    s.write(np.zeros((3, 4)))
    t = torch_shmem.create(locked, shape=(2,), dtype=np.int8)
    ready = ctx.Event()
    holder = start(_workers.hold_lock_forever, locked, ready)
    dead_pid = orphan(dead)
    try:
        assert ready.wait(30)
        out = cli("list")
        assert out.returncode == 0, out.stderr
        header = re.split(r"\s{2,}", out.stdout.splitlines()[0].strip())
        assert header == ["NAME", "SHAPE", "DTYPE", "DEVICE", "SIZE", "COUNT", "LAST WRITE",
                          "LOCK", "CREATOR", "STATE"]
        r = row(out.stdout, live)
        assert r[1:6] == ["(3, 4)", "float64", "cpu", "96 B", "1"]
        assert re.fullmatch(r"\d+ms|\d+\.\ds", r[6]), r
        assert r[7:] == ["-", f"{os.getpid()} alive", "ok"]
        r = row(out.stdout, locked)
        assert r[1:8] == ["(2,)", "int8", "cpu", "2 B", "0", "never", str(holder.pid)]
        assert r[9] == "ok"
        r = row(out.stdout, dead)
        assert r[8:] == [f"{dead_pid} dead", "ok,orphan"]
        # the same facts as JSON
        out = cli("list", "--json")
        entries = {e["name"]: e for e in json.loads(out.stdout)}
        assert entries[live]["shape"] == [3, 4] and entries[live]["count"] == 1
        assert entries[live]["holders"] == [os.getpid()] and not entries[live]["orphan"]
        assert entries[locked]["lock_owner"] == holder.pid and entries[locked]["age"] is None
        assert entries[dead]["orphan"] and entries[dead]["creator_pid"] == dead_pid
    finally:
        holder.kill()
        holder.join(10)
        for n in (live, locked, dead):
            torch_shmem.unlink(n)


def test_stat_text_and_json(name):
    s = torch_shmem.create(name, shape=(5,), dtype=np.int32)
    s.write(np.arange(5, dtype=np.int32), frame_id=2**64 - 1)
    out = cli("stat", name)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("name:", name, "shape:", "(5,)", "dtype:", "int32", "count:", "frame_id:",
                   str(2**64 - 1), "creator_alive:", "mode:", "0o600", "holders:"):
        assert needle in text, text
    info = json.loads(cli("stat", name, "--json").stdout)
    assert info["name"] == name and info["shape"] == [5] and info["count"] == 1
    assert info["frame_id"] == 2**64 - 1 and info["instance_id"] == s.instance_id
    assert info["holders"] == [os.getpid()] and info["state"] == "ok"
    out = cli("stat", name + "-missing")
    assert out.returncode == 1
    assert out.stderr.strip() == (f"torch_shmem: stream '{name}-missing' does not exist "
                                  "(`torch-shmem list` shows the streams that do)")


def test_unlink(name):
    a, b = name + "-a", name + "-b"
    torch_shmem.create(a, shape=(1,)).close()
    torch_shmem.create(b, shape=(1,)).close()
    out = cli("unlink", a, b)
    assert out.returncode == 0 and out.stdout.splitlines() == [f"unlinked {a!r}", f"unlinked {b!r}"]
    assert a not in torch_shmem.list_streams() and b not in torch_shmem.list_streams()
    out = cli("unlink", a)
    assert out.returncode == 1 and f"stream {a!r} does not exist" in out.stderr
    out = cli("unlink", "bad/name")
    assert out.returncode == 1 and "'/'" in out.stderr


def test_purge_dry_run_lists_orphans_only(name):
    live, dead = name + "-live", name + "-dead"
    torch_shmem.create(live, shape=(1,))  # this process is alive (and maps it)
    orphan(dead)
    try:
        out = cli("purge", "--dead-only", "--dry-run")
        assert out.returncode == 0
        assert f"would purge {dead!r}" in out.stdout
        assert live not in out.stdout
        assert {live, dead} <= set(torch_shmem.list_streams())  # nothing removed
    finally:
        torch_shmem.unlink(live)
        torch_shmem.unlink(dead)


def test_purge_in_a_private_dev_shm():
    out = _workers.isolated_shm(f"""
        import subprocess, sys, torch_shmem
        script = {str(SCRIPT)!r}
        def cli(*args):
            out = subprocess.run([script, *args], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return out
        assert "no streams found" in cli("list").stderr
        subprocess.run([sys.executable, "-c",
                        "import torch_shmem; torch_shmem.create('gone', shape=(1,))"], check=True)
        live = torch_shmem.create("live", shape=(1,))
        out = cli("purge", "--dead-only")
        assert out.stdout.splitlines() == ["purged 'gone'", "removed 1 orphan stream(s)"], out.stdout
        assert torch_shmem.list_streams() == ["live"]
        out = cli("purge", "--include-cuda-orphans")
        assert out.stdout.splitlines() == ["purged 'live'",
                                           "removed 1 stream(s) and 0 CUDA orphan file(s)"], out.stdout
        assert torch_shmem.list_streams() == []
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_watch_reports_rate_missed_latency_and_stops_on_ctrl_c(name):
    s = torch_shmem.create(name, shape=(16,), dtype=np.float32)
    stop = threading.Event()

    def writer():
        k = 0
        while not stop.wait(0.005):  # pacing: about 200 writes/s
            k += 1
            s.write(np.full(16, k, np.float32), frame_id=k)

    t = threading.Thread(target=writer)
    t.start()
    proc = popen_interruptible([str(SCRIPT), "watch", name, "--interval", "0.2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killer = threading.Timer(60, proc.kill)  # never hang the suite
    killer.start()
    try:
        rows = []
        for line in proc.stdout:
            if line.startswith(name):
                cols = re.split(r"\s{2,}", line.strip())
                rows.append(cols)
                rate = float(cols[1].removesuffix("/s"))
                if rate > 0 and len(rows) >= 3:
                    break
        assert rows, "watch printed no rows"
        cols = rows[-1]
        assert float(cols[1].removesuffix("/s")) > 20, cols  # publications per second
        assert int(cols[2]) > 0 and int(cols[3]) >= 0  # count, missed
        assert re.fullmatch(r"\d+us|\d+\.\dms|\d+\.\d\ds", cols[4]), cols  # latency p50
        assert re.fullmatch(r"\d+us|\d+\.\dms|\d+\.\d\ds", cols[5]), cols  # latency max
        assert int(cols[7]) > 0 and cols[9] == "ok", cols  # frame_id, state
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(20)
        err = proc.stderr.read()
        assert rc == 0, err
        assert "stopped" in err and "Traceback" not in err
    finally:
        killer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        stop.set()
        t.join(10)


def test_watch_json_lines_and_orphans(name):
    live, dead = name + "-live", name + "-dead"
    s = torch_shmem.create(live, shape=(2,), dtype=np.int16)
    s.write(np.array([1, 2], np.int16), frame_id=9)
    dead_pid = orphan(dead)
    try:
        out = cli("watch", live, dead, "--interval", "0.05", "--count", "2", "--json")
        assert out.returncode == 0, out.stderr
        lines = [json.loads(line) for line in out.stdout.splitlines()]  # one object per line
        assert [e["name"] for e in lines] == [live, dead, live, dead]
        for e in lines:
            assert set(e) == {"time", "name", "interval", "rate", "count", "publications",
                              "missed", "latency_p50", "latency_max", "age", "frame_id",
                              "lock_owner", "state", "orphan", "link"}
            assert e["state"] == "ok" and e["lock_owner"] is None and e["missed"] == 0
        assert lines[0]["count"] == 1 and lines[0]["frame_id"] == 9 and not lines[0]["orphan"]
        assert lines[0]["link"] is None  # not fed by a bridge
        assert lines[1]["orphan"] and lines[1]["count"] == 1 and lines[1]["age"] > 0
        assert lines[1]["latency_p50"] is None and lines[1]["rate"] == 0  # no publication
        # the table shows the orphan as `list` does, although the watcher maps it
        out = cli("watch", live, dead, "--interval", "0.05", "--count", "1")
        assert row(out.stdout, dead)[9] == "ok,orphan"
        assert row(out.stdout, live)[9] == "ok"
        assert row(cli("list").stdout, dead)[8:] == [f"{dead_pid} dead", "ok,orphan"]
    finally:
        torch_shmem.unlink(dead)


def test_cli_errors_hint_at_commands(name):
    junk = name + "-junk"
    path = f"/dev/shm/torch_shmem.{junk}"
    with open(path, "wb") as f:
        f.write(b"\x02" * 4096)  # not a stream: bad magic
    try:
        out = cli("stat", junk)
        assert out.returncode == 1
        assert out.stderr.strip().endswith(f"; remove it with torch-shmem unlink {junk}"), out.stderr
        listed = row(cli("list").stdout, junk)
        assert listed[-1].startswith("error: ") and f"torch-shmem unlink {junk}" in listed[-1]
        for text in (out.stderr, listed[-1]):
            assert "torch_shmem.unlink(" not in text and "torch_shmem.create(" not in text
    finally:
        os.unlink(path)
    out = cli("unlink", junk)
    assert out.returncode == 1 and "`torch-shmem list`" in out.stderr
    out = cli("watch", junk)
    assert out.returncode == 1 and "torch_shmem.create(" not in out.stderr
    assert "`torch-shmem list`" in out.stderr


def test_describe_uses_the_state_words_of_stat_and_the_cli(name):
    s = torch_shmem.create(name, shape=(1,))
    s.write(np.ones(1))
    line = re.search(r"^state:\s+(.*)$", s.describe(), re.M)
    assert line is None or line.group(1) == torch_shmem.stat(name)["state"] == "ok"


def test_watch_count_and_missing(name):
    torch_shmem.create(name, shape=(1,))
    out = cli("watch", name, "--interval", "0.05", "--count", "2")
    assert out.returncode == 0, out.stderr
    assert len([line for line in out.stdout.splitlines() if line.startswith(name)]) == 2
    assert "never" in row(out.stdout, name)
    out = cli("watch", name + "-missing")
    assert out.returncode == 1 and f"'{name}-missing' does not exist" in out.stderr


def test_doctor_finds_orphans_and_junk(name):
    dead, junk = name + "-dead", name + "-junk"
    orphan(dead)
    path = f"/dev/shm/torch_shmem.{junk}"
    with open(path, "wb") as f:
        f.write(b"\x02" * 4096)
    try:
        out = cli("doctor", "--no-cuda")
        assert out.returncode == 1, out.stdout  # problems found
        text = out.stdout
        assert re.search(r"^\[(ok|warn)\] /dev/shm", text, re.M), text
        assert "[ok] a test stream was created, written, read and unlinked" in text
        orphan_line = re.search(r"^\[warn\] \d+ orphan stream\(s\).*\n(.*)\n(.*)$", text, re.M)
        assert orphan_line and repr(dead) in orphan_line.group(1), text
        assert "fix: torch-shmem purge --dead-only" in orphan_line.group(2)
        assert f"{path} is not a valid stream" in text
        assert f"fix: torch-shmem unlink {junk}" in text
        assert "[info] CUDA checks skipped (--no-cuda)" in text
        findings = json.loads(cli("doctor", "--no-cuda", "--json").stdout)
        assert {"level", "title", "detail", "fix"} <= set(findings[0])
        assert any(f["fix"] == "torch-shmem purge --dead-only" for f in findings)
    finally:
        os.unlink(path)
        torch_shmem.unlink(dead)


def test_doctor_cuda_section():
    pytest.importorskip("torch", reason="the CUDA checks need torch")
    out = cli("doctor", timeout=180)
    assert out.returncode in (0, 1), out.stderr
    assert re.search(r"CUDA IPC export (works|fails)|sees no CUDA device|CPU-only build",
                     out.stdout), out.stdout
    # Whatever the machine: a CUDA device (then whether GPU streams are usable, and why
    # not), none, or a CPU-only torch.
    assert re.search(r"GPU streams are (usable|not usable)|sees no CUDA device|CPU-only build",
                     out.stdout), out.stdout
    if torch_shmem.gpu_available():
        assert "GPU streams are usable" in out.stdout, out.stdout
