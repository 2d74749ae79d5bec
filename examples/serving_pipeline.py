"""torch_shmem serving pipeline: producer -> compiled model server -> consumer.

    python examples/serving_pipeline.py [--seconds 5] [--device cpu|cuda:0]
                                        [--batch 8 --features 64] [--name PREFIX]

Three processes (``spawn`` context) exchange requests and replies over three
named streams that the main process creates (and unlinks on the way out):

* ``PREFIX-req``  float64 ``(batch + 1, features)``: producer -> server
* ``PREFIX-resp`` float64 ``(batch + 1, 16)``: server -> consumer
* ``PREFIX-ack``  int64 ``(1,)``: consumer -> producer (the seq just received)

1. The **producer** (torch ops, eager) publishes request ``seq`` = 1, 2, 3, ...
   with ``O.publish`` and then blocks in ``O.wait_read_into`` on the ack
   stream until the consumer has received the matching reply. The exchange is
   lock-step: exactly one request is in flight, so every reply reaches the
   consumer and every one of them is checked; the rate is whatever the round
   trip allows. The first ``WARMUP_REQUESTS`` requests warm the pipeline up
   (the first one waits for the server's ``torch.compile``); the timed window
   of ``--seconds`` starts after them.
2. The **model server** builds ``Sequential(Linear(features, 128), ReLU,
   Linear(128, 16))`` from a fixed seed and loops on one
   ``torch.compile(fullgraph=True)`` step function that does the stream IO
   *inside* the compiled graph: ``O.wait_read_into`` (level-triggered on the
   request token's ``last_count``, so a request published while the server
   was busy is not missed), the model, and ``O.publish`` of the reply.
   ``O.open`` seeds ``last_count`` with the stream's count at open time, so
   the producer sends nothing before the server (and the consumer) have
   attached. After the first step
   it switches torch.compile to ``fail_on_recompile``: a recompilation in the
   timed window would be a latency spike and fails the run.
3. The **consumer** (NumPy API: ``torch_shmem.open``, ``wait_for_count``,
   ``read(out=...)``) reads every reply the ops published, acks it, stamps the
   receipt time, and checks the replies in chunks against the same seeded
   model run eagerly on the CPU, with the input recomputed from the sequence
   number (``Inputs``). It reports the end-to-end latency (producer's
   ``time.monotonic_ns()`` just before ``publish`` -> consumer's just after the
   read returns; CLOCK_MONOTONIC is system-wide on Linux) and the throughput.

Wire format. The request and the reply carry their own metadata so that a
reply is one atomic publication (no second stream to keep in step): row 0 is
a header ``[seq, send_ns - t0_ns, 0, ...]`` and rows ``1:`` are the payload.
The streams are float64 because float64 holds every integer below 2**53
exactly (``seq``, and the send time in ns relative to ``t0_ns``, which the
main process takes at start-up: 2**53 ns is 104 days) and every float32
exactly. The producer's float32 input and the server's float32 model output
therefore cross the wire bit for bit; the model itself runs in float32.

``--device cuda:N`` puts the model on that GPU. The streams are CPU streams
on every device, so that the example runs (and is tested) on any machine:
they stay in host memory, the server reads the request into a CPU tensor,
moves it to the GPU inside the compiled step, and copies the reply back to a
CPU tensor to publish it. GPU streams (``O.create_gpu``) would keep both on
the device; they are implemented and tested on the CPU with simulated
device memory, but have not yet run on a GPU (docs/gpu.md; ``.ci/gpu``
checks them on a machine with one).

The main process prints a summary table and exits 0 only if every reply was
received in order, every one matched the reference, and at least one reply of
the timed window was checked.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import sys
import time
from typing import NamedTuple

import numpy as np
import torch

import torch_shmem as ts
import torch_shmem.ops as O

HIDDEN = 128
OUT_FEATURES = 16  # >= 2: the reply header echoes seq and the send time
MODEL_SEED = 1234
INPUT_SEED = 0x5EED
HEADER_FIELDS = 2  # seq, send_ns - t0_ns
WARMUP_REQUESTS = 20  # before the timed window; the first one waits for the compile
START_TIMEOUT = 100.0  # s: spawn + import torch + torch.compile on a slow, busy machine
STEP_TIMEOUT = 10.0  # s: one round trip after the warm-up
WAIT_SLICE = 0.1  # s: blocking waits wake this often to check for shutdown
VERIFY_CHUNK = 4096  # replies checked per batched reference call
MAX_FAILURES_SHOWN = 5


class Names(NamedTuple):
    req: str
    resp: str
    ack: str

    @classmethod
    def from_prefix(cls, prefix: str) -> "Names":
        return cls(f"{prefix}-req", f"{prefix}-resp", f"{prefix}-ack")


class Aborted(Exception):
    """Another process asked everyone to stop (it failed, or the parent went away)."""


def tolerance(device: str) -> tuple[float, float]:
    """(rtol, atol) for the compiled server output vs the eager CPU reference.

    On the CPU the compiled graph calls the same GEMM as eager and fuses only
    bias + ReLU, and the reference batches many requests into one GEMM
    (different blocking): differences are a few float32 ulps. cuBLAS (TF32
    off, the default for float32 matmul) rounds differently again.
    """
    return (1e-4, 1e-5) if device == "cpu" else (1e-3, 1e-4)


def build_model(features: int) -> torch.nn.Module:
    """The served model; the same weights in every process (fixed seed)."""
    torch.manual_seed(MODEL_SEED)
    model = torch.nn.Sequential(
        torch.nn.Linear(features, HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Linear(HIDDEN, OUT_FEATURES),
    )
    return model.eval().requires_grad_(False)


class Inputs:
    """Request inputs as a pure function of the sequence number.

    ``input(seq) = pool[seq % POOL] + (seq // POOL % 64 - 32) / 16``: a pool
    of seeded random float32 matrices plus an exact float32 offset. One IEEE
    float32 add per element, so the producer (one request) and the consumer
    (a whole chunk at once, broadcast) get bit-identical inputs, and the
    consumer regenerates thousands of them in a millisecond.
    """

    POOL = 251

    def __init__(self, batch: int, features: int) -> None:
        g = torch.Generator().manual_seed(INPUT_SEED)
        self.pool = torch.randn((self.POOL, batch, features), generator=g)

    @classmethod
    def _offsets(cls, seqs: torch.Tensor) -> torch.Tensor:
        return ((seqs // cls.POOL % 64 - 32).to(torch.float32) / 16)  # k/16: exact

    def one(self, seq: int) -> torch.Tensor:
        seqs = torch.tensor([seq])
        return self.pool[seq % self.POOL] + self._offsets(seqs)[0]

    def many(self, seqs: torch.Tensor) -> torch.Tensor:
        """``(n,)`` int64 -> ``(n, batch, features)``, equal to ``one`` row by row."""
        return self.pool[seqs % self.POOL] + self._offsets(seqs)[:, None, None]


def one_thread() -> None:
    """Run this process's torch (eager and compiled) on one thread.

    Three busy processes share the machine; torch's default intra-op pool
    (one thread per core, OpenMP workers that spin after each parallel
    region) in each of them oversubscribes the cores and turns a ~100 us
    round trip into many ms of scheduler delay. The model is small: one
    thread per process is also the fastest setting. Called before the
    server compiles (inductor sizes its kernels' parallelism at compile time).
    """
    torch.set_num_threads(1)


def check_parent(parent_pid: int) -> None:
    if os.getppid() != parent_pid:
        raise Aborted("the main process went away")


def percentiles_us(samples_ns) -> dict:
    if len(samples_ns) == 0:
        return {}
    us = np.asarray(samples_ns, dtype=np.float64) / 1e3
    p50, p90, p99 = np.percentile(us, [50, 90, 99]).tolist()
    return {"p50": p50, "p90": p90, "p99": p99, "max": float(us.max()), "n": int(us.size)}


# ------------------------------------------------------------------ producer
def producer(names, batch, features, seconds, t0_ns, parent_pid, attached, stop, results):
    """Send requests lock-step (publish, then wait for the consumer's ack)."""
    req = ack = None
    try:
        one_thread()
        req = O.open(names.req)
        ack = O.open(names.ack)
        # A token opened with O.open starts at the stream's count at open
        # time, so the server's level-triggered wait only sees requests
        # published after it opened the stream: wait until both have attached.
        deadline = time.monotonic() + START_TIMEOUT
        for ev in attached:
            while not ev.wait(WAIT_SLICE):
                if stop.is_set():
                    raise Aborted("stop requested before the server and consumer attached")
                check_parent(parent_pid)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server and consumer did not attach within {START_TIMEOUT:.0f} s")
        inputs = Inputs(batch, features)
        frame = torch.zeros((batch + 1, features), dtype=torch.float64)
        header = frame[0]
        ack_buf = torch.zeros(1, dtype=torch.int64)

        def wait_ack(seq: int, timeout: float) -> int:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    # level-triggered on ack.last_count: an ack that landed
                    # before this call returns at once
                    O.wait_read_into(ack, ack_buf, timeout=WAIT_SLICE)
                    break
                except RuntimeError as exc:
                    if "timed out" not in str(exc):
                        raise
                if stop.is_set():
                    raise Aborted(f"stop requested while waiting for the reply to request {seq}")
                check_parent(parent_pid)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no reply to request {seq} within {timeout:.0f} s")
            recv_ns = time.monotonic_ns()
            got = int(ack_buf[0])
            if got != seq or ack.last_count != seq:
                raise RuntimeError(
                    f"ack mismatch: sent request {seq}, got ack {got} (ack count {ack.last_count})"
                )
            return recv_ns

        def round_trip(seq: int, timeout: float) -> int:
            frame[1:].copy_(inputs.one(seq))  # float32 -> float64: exact
            send_ns = time.monotonic_ns()
            header[0] = seq
            header[1] = send_ns - t0_ns
            O.publish(req, frame)
            if req.last_count != seq:  # the producer is the stream's only writer
                raise RuntimeError(f"request stream count {req.last_count} != seq {seq}")
            return wait_ack(seq, timeout) - send_ns

        t_first = time.perf_counter()
        seq = 0
        for seq in range(1, WARMUP_REQUESTS + 1):
            round_trip(seq, START_TIMEOUT if seq == 1 else STEP_TIMEOUT)
        warmup_s = time.perf_counter() - t_first

        rtts = []
        t_start = time.perf_counter()
        deadline = t_start + seconds
        while time.perf_counter() < deadline:
            seq += 1
            rtts.append(round_trip(seq, STEP_TIMEOUT))
        elapsed = time.perf_counter() - t_start
        results.put(("producer", {
            "sent": seq,
            "timed": seq - WARMUP_REQUESTS,
            "elapsed": elapsed,
            "warmup_s": warmup_s,
            "rtt_us": percentiles_us(rtts),
        }))
    except (Aborted, KeyboardInterrupt) as exc:
        print(f"producer: stopped: {str(exc) or 'interrupted'}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        stop.set()
        raise
    finally:
        stop.set()  # normal end too: the server and the consumer wind down
        for s in (req, ack):
            if s is not None:
                O.close(s)


# ------------------------------------------------------------------ server
def server(names, batch, features, device, parent_pid, attached, stop, results):
    """Serve requests with a compiled step that does its own stream IO."""
    req = resp = None
    try:
        one_thread()
        dev = torch.device(device)
        model = build_model(features).to(dev)
        req = O.open(names.req)
        resp = O.open(names.resp)
        # The streams are CPU streams (see the module docstring): the request
        # buffer is a CPU tensor even when the model runs on a GPU.
        req_buf = torch.zeros((batch + 1, features), dtype=torch.float64)
        attached.set()  # req.last_count is 0 now: the first request will wake the step

        @torch.compile(fullgraph=True)
        def step():
            # Blocks until a request newer than req.last_count (the one served
            # last) is published; raises RuntimeError("... timed out ...").
            O.wait_read_into(req, req_buf, timeout=WAIT_SLICE)
            # CPU stream -> (GPU) model: with --device cuda this .to() is the
            # host-to-device copy of the request ...
            x = req_buf[1:].to(device=dev, dtype=torch.float32)
            y = model(x)
            header = torch.nn.functional.pad(req_buf[:1, :HEADER_FIELDS], (0, OUT_FEATURES - HEADER_FIELDS))
            # ... and this one the device-to-host copy of the reply (it waits
            # for the GPU), which is published from a CPU tensor.
            reply = torch.cat((header, y.to(device="cpu", dtype=torch.float64)))
            O.publish(resp, reply)

        from torch._dynamo.utils import counters

        steps = 0
        first_step_s = None
        t_call = time.perf_counter()
        while True:
            try:
                with torch.no_grad():
                    step()
            except RuntimeError as exc:
                if "timed out" not in str(exc):
                    raise
                if stop.is_set():
                    break
                check_parent(parent_pid)
                continue
            steps += 1
            if first_step_s is None:
                first_step_s = time.perf_counter() - t_call
                # From now on a recompilation is an error, not a silent stall.
                torch.compiler.set_stance("fail_on_recompile")
            if req.last_count != steps or resp.last_count != steps:
                raise RuntimeError(
                    f"step {steps}: request count {req.last_count}, reply count "
                    f"{resp.last_count} (lock-step expects both to equal the step)"
                )
        results.put(("server", {
            "steps": steps,
            "first_step_s": first_step_s,
            "reply_count": int(O.count(resp)),
            "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
        }))
    except (Aborted, KeyboardInterrupt) as exc:
        print(f"server: stopped: {str(exc) or 'interrupted'}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        stop.set()
        raise
    finally:
        for s in (req, resp):
            if s is not None:
                O.close(s)


# ------------------------------------------------------------------ consumer
class Verifier:
    """Checks stored replies against the eager CPU reference, a chunk at a time."""

    def __init__(self, batch, features, device):
        self.model = build_model(features)
        self.inputs = Inputs(batch, features)
        self.rtol, self.atol = tolerance(device)
        self.checked = self.ok = 0
        self.max_err = 0.0
        self.failures: list[tuple[int, str]] = []

    def fail(self, seq: int, why: str) -> None:
        if len(self.failures) < MAX_FAILURES_SHOWN:
            self.failures.append((seq, why))

    def check(self, replies: np.ndarray, seqs: np.ndarray) -> None:
        """``replies`` (n, batch + 1, OUT) float64 as received; ``seqs`` (n,) expected."""
        n = len(seqs)
        if n == 0:
            return
        x = self.inputs.many(torch.from_numpy(seqs).to(torch.int64))
        with torch.no_grad():
            ref = self.model(x)  # (n, batch, OUT): one GEMM for the whole chunk
        y = torch.from_numpy(replies[:, 1:, :]).to(torch.float32)  # exact
        err = (y - ref).abs().flatten(1).amax(1)
        close = torch.isclose(y, ref, rtol=self.rtol, atol=self.atol).flatten(1).all(1)
        header_ok = replies[:, 0, 0] == seqs
        header_ok &= np.all(replies[:, 0, HEADER_FIELDS:] == 0, axis=1)
        for i in range(n):
            seq = int(seqs[i])
            if not header_ok[i]:
                self.fail(seq, f"bad reply header {replies[i, 0, :HEADER_FIELDS].tolist()}")
            elif not close[i]:
                self.fail(seq, f"output differs from the reference (max abs err {float(err[i]):.3g})")
            else:
                self.ok += 1
        self.max_err = max(self.max_err, float(err.max()))
        self.checked += n


def consumer(names, batch, features, device, t0_ns, parent_pid, attached, stop, results):
    """Receive every reply (NumPy API), ack it, check it against the reference."""
    resp = ack = None
    try:
        one_thread()
        resp = ts.open(names.resp)
        ack = ts.open(names.ack)
        verifier = Verifier(batch, features, device)
        replies = np.empty((VERIFY_CHUNK, batch + 1, OUT_FEATURES), dtype=np.float64)
        seqs = np.empty(VERIFY_CHUNK, dtype=np.int64)
        ack_msg = np.zeros(1, dtype=np.int64)
        latencies = []
        received = skipped = 0
        check_s = 0.0
        last = 0  # the streams are new: the first reply is count 1
        n = 0
        attached.set()
        while True:
            try:
                # level-triggered: returns at once if a reply newer than
                # `last` is already there (read_new() would miss it)
                resp.wait_for_count(after=last, timeout=WAIT_SLICE)
            except TimeoutError:
                if stop.is_set():
                    break
                check_parent(parent_pid)
                continue
            slot = replies[n]
            resp.read(out=slot)  # one whole publication, straight into the chunk
            recv_ns = time.monotonic_ns()
            count = resp.last_read_count
            seqs[n] = count  # the reply header must echo the stream count
            n += 1
            if n == VERIFY_CHUNK:
                # Check a full chunk *before* acking its last reply: the
                # producer holds its next request meanwhile, so no latency
                # sample includes the check (the throughput does).
                t = time.perf_counter()
                verifier.check(replies, seqs)
                check_s += time.perf_counter() - t
                n = 0
            seq = int(slot[0, 0])
            ack_msg[0] = seq
            ack.write(ack_msg)  # releases the producer's next request
            received += 1
            skipped += count - last - 1  # lock-step: always 0
            last = count
            if seq > WARMUP_REQUESTS:
                latencies.append(recv_ns - (t0_ns + int(slot[0, 1])))
        t = time.perf_counter()
        verifier.check(replies[:n], seqs[:n])
        check_s += time.perf_counter() - t
        results.put(("consumer", {
            "received": received,
            "skipped": skipped,
            "last_count": last,
            "checked": verifier.checked,
            "ok": verifier.ok,
            "failures": verifier.failures,
            "max_err": verifier.max_err,
            "rtol": verifier.rtol,
            "atol": verifier.atol,
            "latency_us": percentiles_us(latencies),
            "check_s": check_s,
        }))
    except (Aborted, KeyboardInterrupt) as exc:
        print(f"consumer: stopped: {str(exc) or 'interrupted'}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        stop.set()
        raise
    finally:
        for s in (resp, ack):
            if s is not None:
                s.close()


# ------------------------------------------------------------------ main
def report(args, prod, serv, cons) -> bool:
    """Print the summary table; return True when everything checked out."""
    rate = prod["timed"] / prod["elapsed"] if prod["elapsed"] > 0 else 0.0
    print(f"torch_shmem serving pipeline  prefix {args.name!r}  device {args.device}")
    print(f"  model        Linear({args.features}, {HIDDEN}) ReLU Linear({HIDDEN}, {OUT_FEATURES})"
          f"  batch {args.batch}  float32 (float64 on the wire)")
    print(f"  warm-up      {WARMUP_REQUESTS:>8} requests  {prod['warmup_s']:7.2f} s"
          f"  (first server step incl. compile {serv['first_step_s']:.2f} s)")
    print(f"  compile      {serv['graphs']:>8} graph(s)   graph breaks {serv['graph_breaks']}"
          f"  recompiles after warm-up: none (fail_on_recompile)")
    print(f"  timed        {prod['timed']:>8} requests  {prod['elapsed']:7.2f} s  {rate:9.0f} req/s"
          f"  ({rate * args.batch:.0f} samples/s)")
    lat = cons["latency_us"]
    if lat:
        print(f"  latency us   p50 {lat['p50']:8.1f}  p90 {lat['p90']:8.1f}  p99 {lat['p99']:8.1f}"
              f"  max {lat['max']:9.1f}  (producer send -> consumer receipt, n={lat['n']})")
    rtt = prod["rtt_us"]
    if rtt:
        print(f"  round trip   p50 {rtt['p50']:8.1f}  p90 {rtt['p90']:8.1f}  p99 {rtt['p99']:8.1f}"
              f"  max {rtt['max']:9.1f}  (producer send -> ack)")

    problems = []
    sent = prod["sent"]
    if not (cons["received"] == serv["steps"] == serv["reply_count"] == sent == cons["last_count"]):
        problems.append(
            f"accounting: sent {sent}, served {serv['steps']} (reply count {serv['reply_count']}), "
            f"received {cons['received']} (last count {cons['last_count']})"
        )
    if cons["skipped"]:
        problems.append(f"{cons['skipped']} replies skipped (lock-step should skip none)")
    if cons["checked"] != cons["received"]:
        problems.append(f"only {cons['checked']} of {cons['received']} replies checked")
    if prod["timed"] < 1 or not lat:
        problems.append("no reply in the timed window")
    if serv["graph_breaks"]:
        problems.append(f"{serv['graph_breaks']} graph break(s)")
    if cons["ok"] < WARMUP_REQUESTS + 1:
        problems.append(f"only {cons['ok']} replies verified")

    verdict = "all outputs verified" if cons["ok"] == cons["checked"] else "MISMATCH"
    print(f"  verified     {cons['ok']:>8}/{cons['checked']} outputs match the eager reference: "
          f"{verdict}  (max abs err {cons['max_err']:.2e}; rtol {cons['rtol']:g}, atol {cons['atol']:g})")
    print(f"  checking     {cons['check_s']:7.2f} s  (consumer's reference checks, every {VERIFY_CHUNK}"
          " replies; they hold up the lock-step pipeline)")
    for seq, why in cons["failures"]:
        print(f"    request {seq}: {why}")
    for p in problems:
        print(f"  ERROR: {p}")
    ok = cons["ok"] == cons["checked"] and not problems
    print(f"  result       {'PASS' if ok else 'FAIL'}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="timed window (default 5)")
    parser.add_argument("--device", default="cpu", help="model device: cpu or cuda[:N] (default cpu)")
    parser.add_argument("--batch", type=int, default=8, help="rows per request (default 8)")
    parser.add_argument("--features", type=int, default=64, help="input features (default 64)")
    parser.add_argument("--name", default=f"torch_shmem_serving_{os.getpid()}",
                        help="stream name prefix (default torch_shmem_serving_<pid>)")
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        parser.error("--seconds must be positive")
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    if args.features < HEADER_FIELDS:
        parser.error(f"--features must be >= {HEADER_FIELDS} (row 0 holds the request header)")
    try:
        dev = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
        args.device = str(dev if dev.index is not None else torch.device("cuda", 0))
    elif dev.type != "cpu":
        parser.error("--device must be cpu or cuda[:N]")

    names = Names.from_prefix(args.name)
    created = []  # handles of the streams this run created (only these are unlinked)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    server_attached, consumer_attached = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    procs = []
    got = {}
    try:
        try:
            created.append(ts.create(names.req, shape=(args.batch + 1, args.features), dtype=np.float64))
            created.append(ts.create(names.resp, shape=(args.batch + 1, OUT_FEATURES), dtype=np.float64))
            created.append(ts.create(names.ack, shape=(1,), dtype=np.int64))
        except (FileExistsError, ValueError) as exc:
            print(f"serving pipeline: {exc}", file=sys.stderr)
            return 1
        t0_ns = time.monotonic_ns()
        pid = os.getpid()
        procs = [
            ctx.Process(target=producer, name="producer",
                        args=(names, args.batch, args.features, args.seconds, t0_ns, pid,
                              (server_attached, consumer_attached), stop, results)),
            ctx.Process(target=server, name="server",
                        args=(names, args.batch, args.features, args.device, pid, server_attached,
                              stop, results)),
            ctx.Process(target=consumer, name="consumer",
                        args=(names, args.batch, args.features, args.device, t0_ns, pid, consumer_attached,
                              stop, results)),
        ]
        for p in procs:
            p.start()
        # Collect the three results before joining (a child blocks on exit
        # until its queued data is consumed).
        deadline = time.monotonic() + START_TIMEOUT + args.seconds + 60.0
        while len(got) < len(procs):
            try:
                who, data = results.get(timeout=0.5)
                got[who] = data
                continue
            except queue.Empty:
                pass
            if any(p.exitcode not in (None, 0) for p in procs):
                break  # a child failed (its traceback is on stderr)
            if all(p.exitcode is not None for p in procs) and results.empty():
                break
            if time.monotonic() > deadline:
                print("serving pipeline: timed out waiting for the processes", file=sys.stderr)
                break
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        stop.set()  # wind everyone down (a no-op after a normal run)
        try:
            for p in procs:
                if p.pid is None:
                    continue  # never started
                p.join(timeout=10)
                if p.is_alive():
                    print(f"{p.name} did not exit; terminating it", file=sys.stderr)
                    p.terminate()
                    p.join(timeout=5)
                    if p.is_alive():
                        p.kill()
                        p.join(timeout=5)
        finally:
            for h in created:
                try:
                    h.unlink()  # refuses (StaleStreamError) if the name was re-created
                except Exception as exc:  # keep unlinking the others
                    print(f"serving pipeline: could not unlink {h.name!r}: {exc}", file=sys.stderr)

    codes = {p.name: p.exitcode for p in procs}
    if set(got) != {"producer", "server", "consumer"} or any(codes.values()):
        print(f"serving pipeline FAILED: results from {sorted(got)}; exit codes {codes}", file=sys.stderr)
        return 1
    return 0 if report(args, got["producer"], got["server"], got["consumer"]) else 1


if __name__ == "__main__":
    sys.exit(main())
