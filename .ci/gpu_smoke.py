"""The smoke step of .ci/gpu: one publish/read in this process, then CUDA IPC in a child.

1. Same process: create a GPU stream through ``torch_shmem.ops``, publish a CUDA tensor and
   a host tensor, read each back (also through ``ops.open`` of the creator's own stream).
2. Across processes: a ``spawn``-ed child opens the stream with ``torch_shmem.ops.open``,
   reads it and closes it, printing (and sending to this process) the call it is about to
   make and the one it finished. The child is killed after ``--child-timeout`` seconds, so
   when legacy CUDA IPC does not work on the machine's runtime the log says within seconds
   which call failed or hung.

The verdicts go to ``--verdict FILE`` as ``key=value`` lines (``same_process`` and ``ipc``),
read by .ci/gpu to choose the test markers and by .ci/gpu_summary.py for the summary:

  same_process=ok | fails: <error> | n/a: <why>
  ipc=works | fails at <call>: <error> | hangs at <call> | not possible: <why> | not checked: <why>
  ipc_child=the child's own result (works | fails ... | hangs ...), whatever the stream's kind

.ci/gpu runs the tests marked ``ipc`` (and the GPU ping-pong benchmark) only when
``ipc_child`` starts with ``works``.

Without a CUDA device (a rehearsal on a CPU machine) the same two parts run on a CPU stream
(``ops.create``): the IPC verdict is then ``not possible``, and the child's open/read/close of
the CPU stream is reported beside it. Exit status: 0 when both parts work (or, without
``--require-cuda``, when there is no device to check), 1 when the same-process part fails,
2 when only the cross-process part does.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import traceback

T0 = time.monotonic()
SHAPE = (256, 1024)  # 1 MiB of float32
# GPU_CHECK_FAKE_IPC=fail:<call> or hang:<call> makes the child fail or hang at that call
# (import, open, read or close): a rehearsal of .ci/gpu's fallbacks on a machine where IPC works.
FAULT_ENV = "GPU_CHECK_FAKE_IPC"
# The child's calls, by the short name the verdict uses.
CALLS = {"import": "import torch, torch_shmem.ops", "open": "torch_shmem.ops.open(name)",
         "read": "torch_shmem.ops.read(stream)", "close": "torch_shmem.ops.close(stream)"}


def say(*parts: object) -> None:
    print(f"[smoke {time.monotonic() - T0:6.2f} s]", *parts, flush=True)


def expected(torch, device):
    return torch.arange(SHAPE[0] * SHAPE[1], dtype=torch.float32, device=device).reshape(SHAPE) * 3


def child(name: str, conn, cuda: bool) -> None:
    """Open, read and close ``name``; announce every call before and after it."""
    fault, _, fault_call = os.environ.get(FAULT_ENV, "").partition(":")

    def begin(call: str) -> None:
        print(f"[smoke child {os.getpid()}] about to call {CALLS[call]}", flush=True)
        conn.send(("begin", call, time.monotonic()))
        if call == fault_call:  # a rehearsal of the failure paths ($GPU_CHECK_FAKE_IPC)
            print(f"[smoke child {os.getpid()}] {FAULT_ENV}: {fault} at {call}", flush=True)
            if fault == "hang":
                time.sleep(3600)
            raise RuntimeError(f"{FAULT_ENV}={fault}:{fault_call}: simulated failure")

    def end(call: str) -> None:
        print(f"[smoke child {os.getpid()}] {CALLS[call]} returned", flush=True)
        conn.send(("end", call, time.monotonic()))

    try:
        begin("import")
        import torch
        import torch_shmem.ops as O
        end("import")
        begin("open")
        s = O.open(name)
        end("open")
        begin("read")
        y = O.read(s)
        if cuda:
            torch.cuda.synchronize()
        end("read")
        want = expected(torch, y.device)
        if not torch.equal(y, want):
            raise AssertionError(f"the child read different data (device {y.device}, "
                                 f"max |diff| {float((y.float() - want).abs().max())})")
        begin("close")
        O.close(s)
        end("close")
        conn.send(("ok", str(y.device), time.monotonic()))
    except BaseException as exc:  # report anything, then fail
        traceback.print_exc()
        conn.send(("error", f"{type(exc).__name__}: {exc}", time.monotonic()))
        sys.exit(1)


def ipc_check(name: str, cuda: bool, timeout: float, note=lambda where: None) -> tuple[str, bool]:
    """(verdict, works) for a spawned child that opens, reads and closes ``name``.

    ``note(where)`` is called whenever the child starts or finishes a call, so that the
    verdict file says where the child was if this process is killed before it decides.
    """
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=child, args=(name, send, cuda), name="smoke-child", daemon=True)
    say(f"starting the child (spawn; killed after {timeout:g} s)")
    p.start()
    send.close()  # our copy: recv() sees EOF once the child is gone
    deadline = time.monotonic() + timeout
    current, done, error, timings = "start", [], None, {}
    started = {}
    where = "at start"  # "at <call>" while a call runs, "after <call>" between calls
    try:
        while True:
            if recv.poll(0.1):
                try:
                    kind, what, t = recv.recv()
                except EOFError:
                    p.join(5)
                    break
                if kind == "begin":
                    current, started[what] = what, t
                    where = f"at {what}"
                    note(where)
                    say(f"child: about to call {CALLS[what]}")
                elif kind == "end":
                    done.append(what)
                    timings[what] = t - started.get(what, t)
                    say(f"child: {CALLS[what]} returned after {timings[what]:.2f} s")
                    where = f"after {what}"
                    note(where)
                elif kind == "ok":
                    say(f"child: read the publication back on {what}")
                    p.join(10)
                    break
                elif kind == "error":
                    error = what
                    say(f"child: {CALLS.get(current, current)} raised {what}")
                    p.join(10)
                    break
            elif not p.is_alive():
                break
            if time.monotonic() > deadline:
                say(f"child: still {where} after {timeout:g} s: killing it")
                p.kill()
                p.join(5)
                return f"hangs {where} (killed after {timeout:g} s)", False
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
    code = p.exitcode
    if error is not None:
        return f"fails at {current}: {error}", False
    if code != 0 or "close" not in done:
        return f"fails {where}: the child died (exit code {code}) without a report", False
    spent = ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
    return f"works ({spent})", True


def same_process_gpu(O, torch, name: str) -> None:
    s = O.create_gpu(name, SHAPE, torch.float32, device=0)
    x = expected(torch, "cuda")
    say("publish (device tensor)")
    O.publish(s, x)
    say("read")
    assert torch.equal(O.read(s), x), "read back differs from the device publication"
    say("publish (host tensor: upload)")
    O.publish(s, (x / 3).cpu())
    assert torch.equal(O.read(s), x / 3), "read back differs from the uploaded publication"
    say("open (the creator's own stream) + read")
    again = O.open(name)
    assert torch.equal(O.read(again), x / 3), "the creator's second handle reads different data"
    O.close(again)
    O.publish(s, x)  # what the child must read
    torch.cuda.synchronize()
    return s


def same_process_cpu(O, torch, name: str):
    s = O.create(name, SHAPE, torch.float32)
    x = expected(torch, "cpu")
    say("publish (CPU stream)")
    O.publish(s, x)
    assert torch.equal(O.read(s), x), "read back differs (CPU stream)"
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--verdict", required=True, help="file for the key=value verdicts")
    ap.add_argument("--child-timeout", type=float, default=30.0)
    ap.add_argument("--require-cuda", action="store_true",
                    help="no usable CUDA device is a failure (on the GPU machine)")
    args = ap.parse_args()
    verdict = {"same_process": "not checked: the smoke step died", "ipc": "not checked: the smoke step died",
               "ipc_child": "not checked"}

    def save() -> None:
        with open(args.verdict, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in verdict.items())

    save()
    say("import torch, torch_shmem, torch_shmem.ops")
    import torch

    import torch_shmem
    import torch_shmem.ops as O
    from torch_shmem import _C, _gpu

    usable, why = _gpu.availability()
    say(f"torch {torch.__version__} (CUDA {torch.version.cuda}), torch_shmem {torch_shmem.__version__} "
        f"from {os.path.dirname(torch_shmem.__file__)}, _C.WITH_CUDA={_C.WITH_CUDA}, "
        f"torch.cuda.is_available()={torch.cuda.is_available()}, GPU streams: {why}")
    name = f"gpu-check-smoke-{os.getpid()}"
    O.unlink(name)
    rc = 0
    s = None
    try:
        try:
            if usable:
                say(f"device: {torch.cuda.get_device_name(0)}")
                s = same_process_gpu(O, torch, name)
                verdict["same_process"] = "ok"
            else:
                s = same_process_cpu(O, torch, name)
                verdict["same_process"] = f"n/a: {why} (a CPU stream through torch_shmem.ops works)"
        except Exception as exc:
            traceback.print_exc()
            verdict["same_process"] = f"fails: {type(exc).__name__}: {exc}"
            verdict["ipc"] = verdict["ipc_child"] = "not checked: the same-process publish/read failed"
            save()
            return 1
        save()
        say(f"same process: {verdict['same_process']}")
        def note(where: str) -> None:
            verdict["ipc_child"] = f"unknown: the smoke step was stopped while the child was {where}"
            verdict["ipc"] = verdict["ipc_child"]
            save()

        ipc, works = ipc_check(name, usable, args.child_timeout, note)
        verdict["ipc_child"] = ipc
        if usable:
            verdict["ipc"] = ipc
            rc = 0 if works else 2
        else:
            verdict["ipc"] = (f"not possible: {why}; the child's open/read/close of a CPU stream: "
                              f"{ipc}")
            rc = 0 if works else 2
        save()
        say(f"IPC: {verdict['ipc']}")
    finally:
        if s is not None:
            O.close(s)
        O.unlink(name)
    if not usable and args.require_cuda:
        say(f"no usable CUDA device ({why}): failing (--require-cuda)")
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
