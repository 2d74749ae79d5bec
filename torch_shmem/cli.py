"""``torch-shmem``: inspect and manage torch_shmem streams from the shell.

Also runnable as ``python -m torch_shmem``. Subcommands: list, stat, unlink,
purge, watch, doctor, bridge (docs/cli.md; bridge: docs/bridge.md). Exit status: 0 on success, 1 when
something was not found or doctor found a problem, 2 for usage errors.
Importing this module does not import torch; only ``doctor`` may (for its
CUDA checks, unless ``--no-cuda``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import threading
import time
from typing import Any, Sequence

from . import __version__, _admin, _core, _proc
from ._labels import fmt_bytes

__all__ = ["main"]


# ---------------------------------------------------------------- formatting
def _fmt_age(age: float) -> str:
    if age is None or math.isinf(age):
        return "never"
    if age < 1:
        return f"{age * 1e3:.0f}ms"
    if age < 60:
        return f"{age:.1f}s"
    if age < 3600:
        return f"{int(age // 60)}m{int(age % 60):02d}s"
    if age < 86400:
        return f"{int(age // 3600)}h{int(age % 3600 // 60):02d}m"
    return f"{int(age // 86400)}d{int(age % 86400 // 3600):02d}h"


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = []
    for r in [header] + rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no infinity: an age of "never" is null
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _state(e: dict) -> str:
    tags = [e["state"]]
    if e.get("orphan"):
        tags.append("orphan")
    return ",".join(tags)


# The library's messages suggest Python calls; on the command line the
# equivalent command is the useful hint.
_PY_HINTS = (
    (re.compile(r"torch_shmem\.unlink\('([^']*)'\)"), r"torch-shmem unlink \1"),
    (re.compile(r"torch_shmem\.purge\(dead_only=True\)"), "torch-shmem purge --dead-only"),
)


def _error(exc: BaseException, name: str | None = None) -> str:
    """The message of ``exc`` for the command line (CLI hints instead of Python calls)."""
    if isinstance(exc, FileNotFoundError) and name is not None:
        return (f"torch_shmem: stream {name!r} does not exist "
                "(`torch-shmem list` shows the streams that do)")
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    for pattern, hint in _PY_HINTS:
        text = pattern.sub(hint, text)
    if name is not None and "is not a torch_shmem stream" in text and "torch-shmem unlink" not in text:
        text += f"; remove it with torch-shmem unlink {name}"
    return text


# ----------------------------------------------------------------- commands
def cmd_list(args: argparse.Namespace) -> int:
    entries = _admin.scan(holders=True)
    if args.json:
        print(json.dumps(_jsonable(entries), indent=2, ensure_ascii=False))
        return 0
    if not entries:
        print("no streams found", file=sys.stderr)
        return 0
    rows = []
    for e in entries:
        if "error" in e:
            rows.append([e["name"], "?", "?", "?", "?", "?", "?", "?", "?",
                         "error: " + _error(ValueError(e["error"]), e["name"])])
            continue
        lock = "-"
        if e["lock_owner"] is not None:
            lock = str(e["lock_owner"]) + ("" if e["lock_owner_alive"] else " (dead)")
        creator = f"{e['creator_pid']} {'alive' if e['creator_alive'] else 'dead'}"
        rows.append([
            e["name"], _fmt_shape(e["shape"]), e["dtype"], "gpu" if e["gpu_enabled"] else "cpu",
            fmt_bytes(e["size"]),
            str(e["count"]), _fmt_age(e["age"]), lock, creator, _state(e),
        ])
    header = ["NAME", "SHAPE", "DTYPE", "DEVICE", "SIZE", "COUNT", "LAST WRITE", "LOCK",
              "CREATOR", "STATE"]
    print(_table(header, rows))
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    try:
        info = _admin.stat_with_holders(args.name)
    except (FileNotFoundError, PermissionError, ValueError, TypeError) as exc:
        print(_error(exc, args.name), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(_jsonable(info), indent=2, ensure_ascii=False))
        return 0
    shown = dict(info)
    shown["shape"] = _fmt_shape(info["shape"])
    shown["size"] = f"{info['size']} bytes ({fmt_bytes(info['size'])})"
    shown["mode"] = oct(info["mode"])
    shown["age"] = _fmt_age(info["age"])
    ring = shown.pop("ring", None)
    if ring is not None:  # rings only: the policy, drops and one line per cursor
        shown["ring"] = f"{ring['size']} slots, policy {ring['policy']}, {ring['drops']} dropped"
        for c in ring["cursors"]:
            owner = f"pid {c['pid']} ({'alive' if c['alive'] else 'dead'})" if c["pid"] else (
                f"released (last pid {c['last_pid']})")
            shown[f"cursor {c['name']}"] = (
                f"{owner}, consumed {c['consumed']}, lag {c['lag']}, missed {c['missed']}")
    for key in ("create_time", "write_time"):
        if info[key]:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info[key]))
            shown[key] = f"{stamp} ({info[key]:.6f})"
        else:
            shown[key] = "never"
    link = info["bridge"]
    if link is None:
        del shown["bridge"]
    else:
        shown["bridge"] = (f"{link['state']}, behind {link['behind']}, skipped {link['skipped']}"
                           + (f", lag {_fmt_latency(abs(link['lag']))}" if link["lag"] is not None
                              else ""))
    width = max(map(len, shown))
    for key, value in shown.items():
        print(f"{key + ':':<{width + 1}} {value}")
    return 0


def cmd_unlink(args: argparse.Namespace) -> int:
    status = 0
    for name in args.names:
        try:
            removed = _core.unlink(name)
        except (ValueError, TypeError, PermissionError, OSError) as exc:
            print(_error(exc), file=sys.stderr)
            status = 1
            continue
        if removed:
            print(f"unlinked {name!r}")
        else:
            print(_error(FileNotFoundError(), name), file=sys.stderr)
            status = 1
    return status


def cmd_purge(args: argparse.Namespace) -> int:
    if args.dry_run:
        entries = _admin.scan(holders=True)
        chosen = [e for e in entries if "error" not in e and (e["orphan"] or not args.dead_only)]
        for e in chosen:
            print(f"would purge {e['name']!r}")
        if args.include_cuda_orphans:
            for base in _admin.cuda_orphans():
                print(f"would remove {_core_path(base)}")
        for base in _admin.leftovers():
            print(f"would remove {_core_path(base)}")
        if not chosen:
            print("nothing to purge", file=sys.stderr)
        return 0
    report = _admin.purge_report(
        dead_only=args.dead_only, include_cuda_orphans=args.include_cuda_orphans
    )
    for name in report["removed"]:
        print(f"purged {name!r}")
    for base in report["cuda_removed"] + report["leftovers_removed"]:
        print(f"removed {_core_path(base)}")
    for name, why in report["skipped"]:
        print(f"skipped {name!r}: {_error(ValueError(why), name)}", file=sys.stderr)
    what = "orphan stream(s)" if args.dead_only else "stream(s)"
    print(f"removed {len(report['removed'])} {what}"
          + (f" and {len(report['cuda_removed'])} CUDA orphan file(s)" if args.include_cuda_orphans else ""))
    return 0


def _core_path(base: str) -> str:
    return os.path.join(_proc.SHM_DIR, base)


# -------------------------------------------------------------------- watch
class _Watched:
    """Per-stream counters, updated by one waiter thread, read by the printer."""

    def __init__(self, name: str, shm: Any) -> None:
        self.name = name
        self.shm = shm
        self.mutex = threading.Lock()
        self.last = shm.count
        self.seen = 0  # wake-ups that observed a new publication
        self.pubs = 0  # publications, observed or not
        self.missed = 0  # publications that landed between two wake-ups
        self.latencies: list[float] = []
        self.error: str | None = None

    def run(self) -> None:
        shm = self.shm
        try:
            while True:
                try:
                    shm.wait_for_count(after=self.last, timeout=0.25)
                except TimeoutError:
                    continue
                now = time.time()
                head = shm.header()
                count = head.count
                with self.mutex:
                    self.pubs += count - self.last
                    self.missed += max(0, count - self.last - 1)
                    self.seen += 1
                    if head.write_time:
                        self.latencies.append(max(0.0, now - head.write_time))
                    self.last = count
        except _core.StaleStreamError:
            pass  # unlinked: nothing new can come; STATE shows "unlinked" from the header
        except Exception as exc:  # closed by the printer (Ctrl-C), or a real error
            if not self.shm.closed:
                self.error = str(exc)

    def take(self) -> tuple[int, int, int, list[float]]:
        with self.mutex:
            out = (self.pubs, self.missed, self.seen, self.latencies)
            self.pubs = self.missed = self.seen = 0
            self.latencies = []
        return out


def _fmt_latency(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def _watch_state(w: _Watched, head: Any) -> str:
    """STATE as ``list`` shows it (ok, writing, inconsistent, orphan), plus ``unlinked``."""
    if w.error:
        return "error: " + w.error
    if head.unlinked:
        return "unlinked"
    state = head.state
    # The watcher maps the stream itself: it does not count as a holder.
    if _admin.is_orphan(w.name, w.shm.instance_id, ignore_pids={os.getpid()}):
        state += ",orphan"
    link = _admin.bridge_link(w.name)
    if link is not None:  # fed by a bridge attachment: its link state too
        state += f",link {link['state']}"
    return state


def cmd_watch(args: argparse.Namespace) -> int:
    from . import _stream

    watched = []
    for name in args.names:
        try:
            shm = _stream.open(name, readonly=True)
        except (FileNotFoundError, PermissionError, ValueError, TypeError) as exc:
            print(_error(exc, name), file=sys.stderr)
            for w in watched:
                w.shm.close()
            return 1
        watched.append(_Watched(name, shm))
    for w in watched:
        threading.Thread(target=w.run, name=f"watch-{w.name}", daemon=True).start()
    tty = sys.stdout.isatty() and not args.json
    header = ["NAME", "RATE", "COUNT", "MISSED", "LATENCY p50", "LATENCY max", "LAST WRITE",
              "FRAME_ID", "LOCK", "STATE"]
    printed_lines = 0
    refreshes = 0
    last_t = time.monotonic()
    try:
        while args.count is None or refreshes < args.count:
            time.sleep(args.interval)
            now = time.monotonic()
            dt, last_t = now - last_t, now
            rows = []
            for w in watched:
                pubs, missed, _seen, lats = w.take()
                head = w.shm.header()
                lats.sort()
                age = time.time() - head.write_time if head.write_time else math.inf
                state = _watch_state(w, head)
                if args.json:
                    word, *tags = state.split(",")
                    if state.startswith("error: "):
                        word, tags = "error", []
                    print(json.dumps(_jsonable({
                        "time": time.time(), "name": w.name, "interval": dt,
                        "rate": pubs / dt, "count": head.count, "publications": pubs,
                        "missed": missed,
                        "latency_p50": lats[len(lats) // 2] if lats else None,
                        "latency_max": lats[-1] if lats else None,
                        "age": age, "frame_id": head.frame_id, "lock_owner": head.lock_owner,
                        "state": word, "orphan": "orphan" in tags,
                        "link": next((t[5:] for t in tags if t.startswith("link ")), None),
                        **({"error": w.error} if word == "error" else {}),
                    }), ensure_ascii=False))
                    continue
                p50 = _fmt_latency(lats[len(lats) // 2]) if lats else "-"
                worst = _fmt_latency(lats[-1]) if lats else "-"
                rows.append([w.name, f"{pubs / dt:.1f}/s", str(head.count), str(missed), p50, worst,
                             _fmt_age(age), str(head.frame_id), str(head.lock_owner or "-"), state])
            refreshes += 1
            if args.json:
                sys.stdout.flush()
                continue
            block = _table(header, rows)
            if tty and printed_lines:
                sys.stdout.write(f"\x1b[{printed_lines}F\x1b[J")  # back up and clear
            sys.stdout.write(block + "\n")
            if not tty:
                sys.stdout.write("\n")
            sys.stdout.flush()
            printed_lines = block.count("\n") + 1
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        for w in watched:
            try:
                w.shm.close()
            except RuntimeError:
                pass
    return 0


# ------------------------------------------------------------------- doctor
def cmd_doctor(args: argparse.Namespace) -> int:
    from ._doctor import run_checks

    findings = run_checks(skip_torch=args.no_cuda)
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], indent=2, ensure_ascii=False))
    else:
        for f in findings:
            print(f"[{f.level}] {f.title}")
            if f.detail:
                print(f"       {f.detail}")
            if f.fix:
                print(f"       fix: {f.fix}")
        problems = sum(f.level in ("warn", "error") for f in findings)
        print(f"{problems} problem(s) found" if problems else "no problems found")
    return 1 if any(f.level in ("warn", "error") for f in findings) else 0


# --------------------------------------------------------------------- main
def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torch-shmem",
        description="Inspect and manage torch_shmem shared-memory streams (/dev/shm/torch_shmem.*).",
    )
    p.add_argument("--version", action="version", version=f"torch-shmem {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sp = sub.add_parser("list", help="table of all streams (shape, dtype, count, age, lock, creator, orphans)")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("stat", help="metadata of one stream")
    sp.add_argument("name", metavar="NAME")
    sp.add_argument("--json", action="store_true", help="print JSON instead of text")
    sp.set_defaults(func=cmd_stat)

    sp = sub.add_parser("unlink", help="destroy streams by name")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.set_defaults(func=cmd_unlink)

    sp = sub.add_parser("purge", help="remove all streams (or only orphans with --dead-only)")
    sp.add_argument("--dead-only", action="store_true",
                    help="only streams whose creator died and that no process maps")
    sp.add_argument("--include-cuda-orphans", action="store_true",
                    help="also remove torch's CUDA IPC ref-count files of dead producers")
    sp.add_argument("--dry-run", action="store_true", help="print what would be removed")
    sp.set_defaults(func=cmd_purge)

    sp = sub.add_parser("watch", help="live publication rate, missed frames and latency")
    sp.add_argument("names", nargs="+", metavar="NAME")
    sp.add_argument("--interval", type=_positive, default=1.0, help="refresh period in s (1.0)")
    sp.add_argument("--count", type=int, default=None, help="stop after this many refreshes")
    sp.add_argument("--json", action="store_true",
                    help="one JSON object per stream and refresh, one per line")
    sp.set_defaults(func=cmd_watch)

    sp = sub.add_parser("doctor", help="check /dev/shm, permissions, orphans and CUDA; say what to do")
    sp.add_argument("--no-cuda", action="store_true", help="skip the checks that import torch")
    sp.add_argument("--json", action="store_true", help="print the findings as JSON")
    sp.set_defaults(func=cmd_doctor)

    _add_bridge_parser(sub)
    return p


# ------------------------------------------------------------------- bridge
# Argument parsing only; torch_shmem/bridge.py does the work (and imports
# pyzmq only when a subcommand runs).
def cmd_bridge(args: argparse.Namespace) -> int:
    from . import bridge

    return bridge.cli_main(args)


def _add_bridge_parser(sub: Any) -> None:
    sp = sub.add_parser("bridge", help="carry a stream to other hosts over ZeroMQ (needs pyzmq)")
    sp.set_defaults(func=cmd_bridge)
    bsub = sp.add_subparsers(dest="bridge_command", metavar="BRIDGE_COMMAND")

    b = bsub.add_parser("serve", help="publish stream NAME on a ZeroMQ endpoint until Ctrl-C")
    b.add_argument("name", metavar="NAME")
    b.add_argument("--bind", default="tcp://127.0.0.1:0",
                   help="ZeroMQ endpoint (default tcp://127.0.0.1:0: loopback, a free port)")
    b.add_argument("--allow-remote", action="store_true",
                   help="allow binding a non-loopback address (use CURVE keys)")
    b.add_argument("--curve-secret-key", metavar="FILE", help="server certificate with its secret key")
    b.add_argument("--curve-authorized-keys", metavar="DIR",
                   help="directory of client public keys allowed in (default: any client with the server key)")
    b.add_argument("--gpu-device", metavar="cuda:N", help="serve a GPU stream without a CPU mirror")
    b.add_argument("--heartbeat", type=_positive, default=0.5, help="heartbeat interval in s (0.5)")
    b.add_argument("--latest", action="store_true",
                   help="serve a ring as a latest-value stream (default for rings: the reliable mode)")
    b.add_argument("--stats", type=_positive, metavar="S", help="print stat() as JSON every S seconds")

    b = bsub.add_parser("attach", help="republish a served stream into a local stream until Ctrl-C")
    b.add_argument("endpoint", metavar="ENDPOINT")
    b.add_argument("--local-name", metavar="NAME", help="local stream name (default: the source's name)")
    b.add_argument("--curve-server-key", metavar="FILE", help="the server's public certificate")
    b.add_argument("--curve-secret-key", metavar="FILE", help="this client's certificate with its secret key")
    b.add_argument("--gpu-device", metavar="cuda:N", help="make the local stream a GPU stream on this device")
    b.add_argument("--frame-id", choices=("source", "count"), default="source",
                   help="local frame_id: the source's frame_id (default) or the source's count")
    b.add_argument("--timeout", type=_positive, default=10.0, help="s to wait for the server (10)")
    b.add_argument("--unlink-on-exit", action="store_true", help="unlink the local stream on exit")
    b.add_argument("--reliable", action="store_true",
                   help="subscribe to a ring server: every publication, in order, into a local ring")
    b.add_argument("--cursor", metavar="NAME",
                   help="reliable: this subscriber's cursor name on the source ring "
                        "(default bridge:HOST[:LOCAL_NAME])")
    b.add_argument("--window", type=int, default=8,
                   help="reliable: publications in flight, 1 to 256 (8)")
    b.add_argument("--stats", type=_positive, metavar="S", help="print stat() as JSON every S seconds")

    b = bsub.add_parser("status", help="link state of the attachment feeding local stream NAME")
    b.add_argument("name", metavar="NAME")
    b.add_argument("--json", action="store_true", help="print JSON instead of text")

    b = bsub.add_parser("keygen", help="make a CURVE key pair (DIR/KEY.key, DIR/KEY.key_secret)")
    b.add_argument("directory", metavar="DIR")
    b.add_argument("key_name", metavar="KEY", nargs="?", default="bridge")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:  # `torch-shmem list | head`
        try:
            sys.stdout.close()
        except BrokenPipeError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
