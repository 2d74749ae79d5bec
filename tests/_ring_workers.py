"""Child-process bodies of tests/test_ring.py and bench/bench_ring.py (spawn context).

Payloads carry their count: element i of publication c is c * 1_000_003 + i
(int64), so a payload mixing two publications, or one filed under another
count, is detected by `payload_ok`.
"""

import os
import time

import numpy as np

import torch_shmem

K = 1_000_003


def make_payload(c, n):
    return np.int64(c) * K + np.arange(n, dtype=np.int64)


def payload_ok(payload, c):
    return payload.size == 0 or np.array_equal(payload, make_payload(c, payload.size))


def consume(name, reader, total, ready, results, timeout=60.0):
    """Reads with cursor `reader` until publication `total`; reports
    (reader, received, duplicated or out of order, torn, missed, first, last)."""
    shm = torch_shmem.open(name, reader=reader, readonly=True)
    ready.set()
    received = disorder = torn = missed = 0
    first = last = 0
    while last < total:
        pub = shm.read_next(timeout=timeout)
        if first == 0:
            first = pub.count
        if pub.count != last + 1 + pub.missed_publications:
            disorder += 1
        if not payload_ok(pub.payload, pub.count):
            torn += 1
        missed += pub.missed_publications
        received += 1
        last = pub.count
    shm.close()
    results.put((reader, received, disorder, torn, missed, first, last))


def consume_n(name, reader, n, ready, results):
    """Reads n publications with cursor `reader`, reports their counts, exits."""
    shm = torch_shmem.open(name, reader=reader)
    ready.set()
    counts = [shm.read_next(timeout=30).count for _ in range(n)]
    results.put(counts)
    # exits without close(): the process ends, the cursor keeps its place


def attach_and_wait(name, reader, ready):
    """Attaches cursor `reader`, consumes nothing, and waits to be killed."""
    torch_shmem.open(name, reader=reader)
    ready.set()
    time.sleep(600)


def write_forever(name, n, ready):
    """Writes count-stamped payloads back to back until killed."""
    shm = torch_shmem.open(name)
    c = shm.count
    ready.set()
    while True:
        c += 1
        shm.write(make_payload(c, n))


def latency_reader(name, reader, total, ready, results):
    """bench: (received, lost, duplicated, latencies in s) of one cursor."""
    shm = torch_shmem.open(name, reader=reader)
    ready.set()
    lat = []
    seen = set()
    dup = lost = 0
    last = 0
    while last < total:
        pub = shm.read_next(timeout=60)
        lat.append(time.time() - pub.write_time)
        if pub.count in seen or pub.count <= last:
            dup += 1
        seen.add(pub.count)
        lost += pub.missed_publications
        last = pub.count
    shm.close()
    results.put((reader, len(seen), lost, dup, lat, os.getpid()))


# Ring crash torture (tests/test_ring.py): state shared through a lock-free
# array, since a process SIGKILLed inside a multiprocessing lock would leave
# it held. Per reader, REC words: last count recorded, reads, torn payloads,
# counts out of order, publications missed while running, starts.
REC = 6


def torture_reader(name, reader, index, rec, stop_at):
    """Consumes with cursor `reader` until rec[stop_at] is set, recording as it goes.

    An instance starts where the cursor is (a SIGKILL between read_next and the
    record leaves the cursor one publication past the record): that position
    must not be behind the record, and every publication after it must follow
    exactly (count = previous + 1 + missed)."""
    shm = torch_shmem.open(name, readonly=True)
    cur = shm.cursor(reader)
    base = index * REC
    last = cur.consumed
    if last < rec[base]:
        rec[base + 3] += 1  # the cursor went back
    rec[base + 5] += 1
    first = True
    while not rec[stop_at]:
        try:
            pub = cur.read_next(timeout=0.2)
        except TimeoutError:
            continue
        except torch_shmem.InconsistentStreamError:
            continue  # a writer died in its publication window: the next write repairs
        expected = last + 1 + pub.missed_publications
        if not payload_ok(pub.payload, pub.count):
            rec[base + 2] += 1
        if pub.count != expected:
            rec[base + 3] += 1
        if pub.missed_publications and not first:
            rec[base + 4] += pub.missed_publications
        rec[base + 1] += 1
        last = pub.count
        rec[base] = last
        first = False
    cur.close()
    shm.close()


def torture_writer(name, n, rec, writes_at, stop_at, skip=False):
    """Publishes count-stamped payloads back to back until rec[stop_at] is set; with
    `skip`, often at a count past the next one (SharedMemory._write_at), by less than
    the ring, a whole ring or more."""
    import random

    shm = torch_shmem.open(name)
    rng = random.Random(os.getpid())
    gaps = (0, 0, 1, 2, shm.ring - 1, shm.ring, shm.ring + 3)
    while not rec[stop_at]:
        c = shm.count + 1  # a write after a writer died mid-write takes the same count
        try:
            if skip:
                c += rng.choice(gaps)
                if shm._write_at(make_payload(c, n), c, None, 0.2) != c:
                    continue  # dropped (drop_newest)
            else:
                shm.write(make_payload(c, n), timeout=0.2)
        except TimeoutError:
            continue  # policy block: a live reader is a ring behind
        rec[writes_at] += 1
    shm.close()
