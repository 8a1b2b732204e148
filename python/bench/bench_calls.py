"""mk1 calls (several arguments, results of any kind) against the usual ways to make them.

The job: ``fn(a, b, scale=3.0)`` returns ``{"y": a * scale + b, "peak": a.max()}`` for pairs
of float32 arrays of one size, and the caller checks every result. Every system gets the same
workers, the same pregenerated pairs and a warm pool (start-up is not timed); they run
interleaved, in a shuffled order each round. The report gives calls/s (median, min..max) and
mk1's ratio to each system, paired round by round (median, min..max).

A second job, ``--plain N`` (default 100000; 0 skips it), has no arrays at all: ``plain(i)``
returns ``(i, i * i % 7)`` for ``i`` in ``range(N)``, through ``map`` in every system, the
caller checking each result: the cost of a call itself, where ``multiprocessing``'s chunks
shine.

    python3 python/bench/bench_calls.py [--elements 16,4096,262144] [--plain 100000]
                                        [--rounds 5] [--workers N]

Systems: mk1 ``starmap`` (lazy; quick calls go several to a slot by themselves),
``multiprocessing.Pool.starmap`` (its default chunksize, which needs the whole input as a
list, and returns a list), ``multiprocessing.Pool.imap`` over the pairs (chunksize 1, lazy, as
mk1), ``ProcessPoolExecutor.map(fn, as, bs)`` and ``joblib.Parallel`` with ``delayed``; for
the plain job the same systems' ``map`` (``multiprocessing.Pool.imap`` with chunksize 1 and
with 64).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing as mp
import os
import random
import statistics
import sys
import time

import numpy as np

import mk1


def fn(a, b, scale=3.0):
    return {"y": a * scale + b, "peak": float(a.max())}


def fn_pair(pair):
    return fn(*pair)


def plain(i):
    return i, i * i % 7


def check_plain(n, results):
    k = 0
    for k, r in enumerate(results, 1):
        i = k - 1
        if r != (i, i * i % 7):
            raise AssertionError("wrong result")
    if k != n:
        raise AssertionError(f"{k} results of {n}")


def check(pair, r):
    a, b = pair
    if r["peak"] != float(a.max()) or not np.array_equal(r["y"], a * 3.0 + b):
        raise AssertionError("wrong result")


class Mk1Starmap:
    name = "mk1"

    def __init__(self, workers, max_bytes):
        self.pool = mk1.Pool(workers=workers, max_array_bytes=max_bytes)
        list(self.pool.starmap(fn, [(np.ones(4, np.float32),) * 2] * 8))

    def run(self, pairs):
        for p, r in zip(pairs, self.pool.starmap(fn, pairs)):
            check(p, r)

    def plain(self, n):
        check_plain(n, self.pool.map(plain, range(n)))

    def close(self):
        self.pool.close()


class MpStarmap:
    name = "multiprocessing.Pool.starmap"

    def __init__(self, workers, max_bytes):
        self.pool = mp.Pool(workers)
        self.pool.starmap(fn, [(np.ones(4, np.float32),) * 2] * 8)

    def run(self, pairs):
        for p, r in zip(pairs, self.pool.starmap(fn, pairs)):
            check(p, r)

    def plain(self, n):
        check_plain(n, self.pool.map(plain, range(n)))

    def close(self):
        self.pool.terminate()
        self.pool.join()


class MpImap(MpStarmap):
    name = "multiprocessing.Pool.imap"

    def run(self, pairs):
        for p, r in zip(pairs, self.pool.imap(fn_pair, pairs)):
            check(p, r)

    def plain(self, n):
        check_plain(n, self.pool.imap(plain, range(n)))


class MpImap64(MpStarmap):
    name = "multiprocessing.Pool.imap, 64"

    def plain(self, n):
        check_plain(n, self.pool.imap(plain, range(n), chunksize=64))


class Executor:
    name = "ProcessPoolExecutor.map"

    def __init__(self, workers, max_bytes):
        self.ex = concurrent.futures.ProcessPoolExecutor(workers)
        list(self.ex.map(fn, [np.ones(4, np.float32)] * 8, [np.ones(4, np.float32)] * 8))

    def run(self, pairs):
        a, b = zip(*pairs)
        for p, r in zip(pairs, self.ex.map(fn, a, b)):
            check(p, r)

    def plain(self, n):
        check_plain(n, self.ex.map(plain, range(n)))

    def close(self):
        self.ex.shutdown()


class Joblib:
    name = "joblib (loky)"

    def __init__(self, workers, max_bytes):
        import joblib

        self.joblib = joblib
        self.par = joblib.Parallel(n_jobs=workers, backend="loky", return_as="generator")
        list(self.par(joblib.delayed(fn)(np.ones(4), np.ones(4)) for _ in range(8)))

    def run(self, pairs):
        results = self.par(self.joblib.delayed(fn)(a, b) for a, b in pairs)
        for p, r in zip(pairs, results):
            check(p, r)

    def plain(self, n):
        check_plain(n, self.par(self.joblib.delayed(plain)(i) for i in range(n)))

    def close(self):
        pass


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--elements", default="16,4096,262144", help="float32 elements per array")
    ap.add_argument("--plain", type=int, default=100_000, help="calls of the plain job (0: none)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--bytes-per-round", type=int, default=64 << 20)
    ap.add_argument("--most-calls", type=int, default=20000)
    args = ap.parse_args()
    workers = args.workers or max(1, len(os.sched_getaffinity(0)))
    systems = [Mk1Starmap, MpStarmap, MpImap, Executor]
    try:
        import joblib  # noqa: F401

        systems.append(Joblib)
    except ImportError:
        print("# skipped joblib: not installed here")
    print(f"# {workers} workers, {args.rounds} rounds, python {sys.version.split()[0]}")
    jobs = [("arrays", int(e)) for e in args.elements.split(",") if e]
    if args.plain:
        jobs.append(("plain", args.plain))
    for job, n in jobs:
        if job == "plain":
            calls, data = n, n
            names = systems[:2] + [MpImap, MpImap64] + systems[3:]
            states = {s.name: s(workers, 4 << 20) for s in names}
            title = f"plain(i) -> (i, i * i % 7), no arrays, {n} calls per round"
        else:
            calls = max(50, min(args.most_calls, args.bytes_per_round // (8 * n)))
            rng = np.random.default_rng(n)
            data = [
                tuple(rng.integers(0, 1000, size=n).astype(np.float32) for _ in range(2))
                for _ in range(calls)
            ]
            max_bytes = max(4 << 20, 4 * (8 * n + 4096))
            states = {s.name: s(workers, max_bytes) for s in systems}
            title = f"two float32 arrays of {n} elements per call, {calls} calls per round"
        rates = {name: [] for name in states}
        for r in range(args.rounds):
            order = list(rates)
            random.Random(r).shuffle(order)
            for name in order:
                run = states[name].plain if job == "plain" else states[name].run
                t = time.perf_counter()
                run(data)
                rates[name].append(calls / (time.perf_counter() - t))
        for st in states.values():
            st.close()
        print(f"\n## {title}")
        print(f"{'system':32} {'calls/s median (min..max)':>30}   mk1/system median (min..max)")
        base = rates["mk1"]
        for name, rs in rates.items():
            ratios = [a / b for a, b in zip(base, rs)]
            print(
                f"{name:32} {statistics.median(rs):12.0f} ({min(rs):.0f}..{max(rs):.0f})"
                f"   {statistics.median(ratios):6.2f}x ({min(ratios):.2f}..{max(ratios):.2f})"
            )

if __name__ == "__main__":
    main()
