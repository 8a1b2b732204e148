"""mk1 calls (several arguments, results of any kind) against the usual ways to make them.

The job: ``fn(a, b, scale=3.0)`` returns ``{"y": a * scale + b, "peak": a.max()}`` for pairs
of float32 arrays of one size, and the caller checks every result. Every system gets the same
workers, the same pregenerated pairs and a warm pool (start-up is not timed); they run
interleaved, in a shuffled order each round. The report gives calls/s (median, min..max) and
mk1's ratio to each system, paired round by round (median, min..max).

    python3 python/bench/bench_calls.py [--elements 16,4096,262144] [--rounds 5] [--workers N]

Systems: mk1 ``starmap`` (lazy; quick calls go several to a slot by themselves),
``multiprocessing.Pool.starmap`` (its default chunksize, which needs the whole input as a
list, and returns a list), ``multiprocessing.Pool.imap`` over the pairs (chunksize 1, lazy, as
mk1), ``ProcessPoolExecutor.map(fn, as, bs)`` and ``joblib.Parallel`` with ``delayed``.
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


def check(pair, r):
    a, b = pair
    if r["peak"] != float(a.max()) or not np.array_equal(r["y"], a * 3.0 + b):
        raise AssertionError("wrong result")


class Mk1Starmap:
    name = "mk1 starmap"

    def __init__(self, workers, max_bytes):
        self.pool = mk1.Pool(workers=workers, max_array_bytes=max_bytes)
        list(self.pool.starmap(fn, [(np.ones(4, np.float32),) * 2] * 8))

    def run(self, pairs):
        for p, r in zip(pairs, self.pool.starmap(fn, pairs)):
            check(p, r)

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

    def close(self):
        self.pool.terminate()
        self.pool.join()


class MpImap(MpStarmap):
    name = "multiprocessing.Pool.imap"

    def run(self, pairs):
        for p, r in zip(pairs, self.pool.imap(fn_pair, pairs)):
            check(p, r)


class Executor:
    name = "ProcessPoolExecutor.map"

    def __init__(self, workers, max_bytes):
        self.ex = concurrent.futures.ProcessPoolExecutor(workers)
        list(self.ex.map(fn, [np.ones(4, np.float32)] * 8, [np.ones(4, np.float32)] * 8))

    def run(self, pairs):
        a, b = zip(*pairs)
        for p, r in zip(pairs, self.ex.map(fn, a, b)):
            check(p, r)

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

    def close(self):
        pass


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--elements", default="16,4096,262144", help="float32 elements per array")
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
    for n in [int(e) for e in args.elements.split(",")]:
        calls = max(50, min(args.most_calls, args.bytes_per_round // (8 * n)))
        rng = np.random.default_rng(n)
        pairs = [
            tuple(rng.integers(0, 1000, size=n).astype(np.float32) for _ in range(2))
            for _ in range(calls)
        ]
        max_bytes = max(4 << 20, 4 * (8 * n + 4096))
        states = {s.name: s(workers, max_bytes) for s in systems}
        rates = {name: [] for name in states}
        for r in range(args.rounds):
            order = list(rates)
            random.Random(r).shuffle(order)
            for name in order:
                t = time.perf_counter()
                states[name].run(pairs)
                rates[name].append(calls / (time.perf_counter() - t))
        for st in states.values():
            st.close()
        print(f"\n## two float32 arrays of {n} elements per call, {calls} calls per round")
        print(f"{'system':32} {'calls/s median (min..max)':>30}   mk1/system median (min..max)")
        base = rates["mk1 starmap"]
        for name, rs in rates.items():
            ratios = [a / b for a, b in zip(base, rs)]
            print(
                f"{name:32} {statistics.median(rs):12.0f} ({min(rs):.0f}..{max(rs):.0f})"
                f"   {statistics.median(ratios):6.2f}x ({min(ratios):.2f}..{max(ratios):.2f})"
            )


if __name__ == "__main__":
    main()
