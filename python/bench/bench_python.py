"""mk1 from Python against the ways Python people feed worker processes today.

The same job in every system: float32 arrays of random shapes up to MAXxMAX (integer values,
so x * 3 + 1 is exact), ``fn`` computes ``x * 3 + 1`` with numpy in a worker process, and the
caller checks every result. Every system gets the same number of worker processes, the same
pregenerated arrays, and a warm pool (start-up is not timed). Systems run interleaved, in a
shuffled order each round, for ``--rounds`` rounds; the report gives each system's arrays/s
(median, min..max) and mk1's ratio to it, paired round by round (median, min..max).

    python3 python/bench/bench_python.py [--sizes 128,1024] [--rounds 5] [--workers N]
        [--rust-job target/release/examples/f32_affine_job] [--json out.json]

Systems: mk1 (results copied out), mk1 zero-copy (results lent from shared memory), mk1 with
the built-in op (no Python in the workers), multiprocessing.Pool.imap and
ProcessPoolExecutor.map (default chunksize 1, as most code calls them),
joblib.Parallel (loky, its automatic memmapping of large inputs), a hand-written
multiprocessing.shared_memory design (numpy slots, indices through SimpleQueues), and, with
``--rust-job``, the built-in op job driven from Rust (examples/f32_affine_job.rs). torch and
ray run when importable.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import time
from multiprocessing import shared_memory

import numpy as np

import mk1


def fn(x):
    return x * 3 + 1


def check(x, y):
    if y.shape != x.shape or not np.array_equal(y, x * 3 + 1):
        raise AssertionError("wrong result")


def make_arrays(n, max_dim, seed=7):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 1000, size=(rng.integers(1, max_dim + 1), rng.integers(1, max_dim + 1)))
        .astype(np.float32)
        for _ in range(n)
    ]


# -- systems: each is (setup(workers, max_bytes) -> state, run(state, arrays), teardown) ---------


class Mk1:
    name = "mk1"
    zero_copy = False

    def __init__(self, workers, max_bytes):
        self.pool = mk1.Pool(workers=workers, max_array_bytes=max_bytes)
        list(self.pool.map(fn, [np.ones(4, np.float32)] * 8))

    def run(self, arrays):
        for x, y in zip(arrays, self.pool.map(fn, arrays, zero_copy=self.zero_copy)):
            check(x, y)

    def close(self):
        self.pool.close()


class Mk1ZeroCopy(Mk1):
    name = "mk1 zero-copy"
    zero_copy = True


class Mk1Op(Mk1):
    name = "mk1 built-in op"

    def run(self, arrays):
        for x, y in zip(arrays, self.pool.map(mk1.ops.affine(3, 1), arrays)):
            check(x, y)


class Mk1OpNoCheck(Mk1):
    name = "mk1 built-in op, no check"

    def run(self, arrays):
        for _ in self.pool.map(mk1.ops.affine(3, 1), arrays):
            pass


class MpPool:
    name = "multiprocessing.Pool.imap"

    def __init__(self, workers, max_bytes):
        self.pool = mp.Pool(workers)
        list(self.pool.imap(fn, [np.ones(4, np.float32)] * 8))

    def run(self, arrays):
        for x, y in zip(arrays, self.pool.imap(fn, arrays)):
            check(x, y)

    def close(self):
        self.pool.terminate()
        self.pool.join()


class Executor:
    name = "ProcessPoolExecutor.map"

    def __init__(self, workers, max_bytes):
        self.ex = concurrent.futures.ProcessPoolExecutor(workers)
        list(self.ex.map(fn, [np.ones(4, np.float32)] * 8))

    def run(self, arrays):
        for x, y in zip(arrays, self.ex.map(fn, arrays)):
            check(x, y)

    def close(self):
        self.ex.shutdown()


class Joblib:
    name = "joblib (loky, memmapping)"

    def __init__(self, workers, max_bytes):
        import joblib

        self.joblib = joblib
        self.par = joblib.Parallel(n_jobs=workers, backend="loky", return_as="generator")
        list(self.par(joblib.delayed(fn)(a) for a in [np.ones(4, np.float32)] * 8))

    def run(self, arrays):
        results = self.par(self.joblib.delayed(fn)(a) for a in arrays)
        for x, y in zip(arrays, results):
            check(x, y)

    def close(self):
        pass


def _shm_worker(name, slot_bytes, tasks, results):
    shm = shared_memory.SharedMemory(name=name)
    try:
        while True:
            msg = tasks.get()
            if msg is None:
                break
            i, shape = msg
            base = i * 2 * slot_bytes
            x = np.ndarray(shape, np.float32, shm.buf, offset=base)
            out = np.ndarray(shape, np.float32, shm.buf, offset=base + slot_bytes)
            out[...] = fn(x)
            del x, out
            results.put(i)
    finally:
        shm.close()


class HandShm:
    """What people write by hand: a SharedMemory block of numpy slots (input and output each),
    slot indices to the workers through one SimpleQueue and back through another."""

    name = "hand-written shared_memory"

    def __init__(self, workers, max_bytes):
        self.slots = 4 * workers
        self.slot_bytes = max_bytes
        self.shm = shared_memory.SharedMemory(create=True, size=self.slots * 2 * max_bytes)
        self.tasks, self.results = mp.SimpleQueue(), mp.SimpleQueue()
        self.procs = [
            mp.Process(target=_shm_worker, args=(self.shm.name, max_bytes, self.tasks, self.results))
            for _ in range(workers)
        ]
        for p in self.procs:
            p.start()
        self.run([np.ones(4, np.float32)] * 8)

    def run(self, arrays):
        free = list(range(self.slots))
        owner = {}
        pending = 0
        it = iter(arrays)
        done = False
        buf = self.shm.buf
        while True:
            while free and not done:
                try:
                    x = next(it)
                except StopIteration:
                    done = True
                    break
                i = free.pop()
                np.ndarray(x.shape, np.float32, buf, offset=i * 2 * self.slot_bytes)[...] = x
                owner[i] = x
                self.tasks.put((i, x.shape))
                pending += 1
            if pending == 0:
                return
            i = self.results.get()
            pending -= 1
            x = owner.pop(i)
            y = np.ndarray(x.shape, np.float32, buf, offset=i * 2 * self.slot_bytes + self.slot_bytes)
            check(x, y)
            del y
            free.append(i)

    def close(self):
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join()
        self.shm.close()
        self.shm.unlink()


class TorchMp:
    name = "torch.multiprocessing.Pool.imap"

    def __init__(self, workers, max_bytes):
        import torch.multiprocessing as tmp

        self.pool = tmp.Pool(workers)

    run = MpPool.run
    close = MpPool.close


class Ray:
    name = "ray"

    def __init__(self, workers, max_bytes):
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        self.ray = ray
        self.remote = ray.remote(fn)

    def run(self, arrays):
        refs = [self.remote.remote(a) for a in arrays]
        for x, ref in zip(arrays, refs):
            check(x, self.ray.get(ref))

    def close(self):
        self.ray.shutdown()


RUST = "mk1 built-in op, driven from Rust"
RUST_NOCHECK = "mk1 built-in op, no check, from Rust"


def rust_job(path, n, max_dim, workers, max_bytes, check=True):
    out = subprocess.run(
        [path, str(n), str(max_dim), str(workers), str(max_bytes)] + ([] if check else ["nocheck"]),
        check=True,
        capture_output=True,
        text=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["arrays"] / r["seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,1024")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--arrays-128", type=int, default=3000)
    ap.add_argument("--arrays-1024", type=int, default=120)
    ap.add_argument("--rust-job", default=None)
    ap.add_argument("--only", default=None, help="comma-separated system names to run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    workers = args.workers or max(1, len(os.sched_getaffinity(0)))
    systems = [Mk1, Mk1ZeroCopy, Mk1Op, Mk1OpNoCheck, MpPool, Executor, Joblib, HandShm]
    skipped = {}
    for opt, why in ((TorchMp, "torch"), (Ray, "ray")):
        try:
            __import__(why)
            systems.append(opt)
        except ImportError:
            skipped[opt.name] = f"{why} is not installed here"
    if args.only:
        keep = set(args.only.split(","))
        systems = [s for s in systems if s.name in keep or s.__name__ in keep]
    report = {"workers": workers, "rounds": args.rounds, "skipped": skipped, "sizes": {}}
    print(f"# {workers} workers, {args.rounds} rounds, python {sys.version.split()[0]}, numpy {np.__version__}")
    for name, why in skipped.items():
        print(f"# skipped {name}: {why}")
    for size in [int(s) for s in args.sizes.split(",")]:
        n = args.arrays_128 if size <= 128 else args.arrays_1024
        max_bytes = max(4 << 20, size * size * 4)
        arrays = make_arrays(n, size)
        states = {}
        for s in systems:
            try:
                states[s.name] = s(workers, max_bytes)
            except Exception as e:  # a system that does not start here is reported, not fatal
                skipped[s.name] = f"did not start: {e}"
        rates = {name: [] for name in states}
        if args.rust_job:
            rates[RUST] = []
            rates[RUST_NOCHECK] = []
        for r in range(args.rounds):
            order = list(rates)
            random.Random(r).shuffle(order)
            for name in order:
                if name in (RUST, RUST_NOCHECK):
                    rates[name].append(
                        rust_job(args.rust_job, n, size, workers, max_bytes, name == RUST)
                    )
                    continue
                t = time.perf_counter()
                states[name].run(arrays)
                rates[name].append(n / (time.perf_counter() - t))
        for st in states.values():
            st.close()
        print(f"\n## max {size}x{size}, {n} arrays per round")
        print(f"{'system':38} {'arrays/s median (min..max)':>30}   mk1/system median (min..max)")
        out = {}
        base = rates.get("mk1") or next(iter(rates.values()))
        for name, rs in rates.items():
            ratios = [a / b for a, b in zip(base, rs)]
            out[name] = {"rates": rs, "mk1_ratio": ratios}
            print(
                f"{name:38} {statistics.median(rs):12.0f} ({min(rs):.0f}..{max(rs):.0f})"
                f"   {statistics.median(ratios):6.2f}x ({min(ratios):.2f}..{max(ratios):.2f})"
            )
        pairs = [
            ("mk1 zero-copy", "hand-written shared_memory", "mk1 zero-copy / hand-written"),
            ("mk1 built-in op", RUST, "built-in op from Python / from Rust"),
            ("mk1 built-in op, no check", RUST_NOCHECK, "same, results not checked"),
        ]
        # The ceiling for any Python caller: its own check of every result, with no pool.
        ys = [fn(x) for x in arrays]
        t = time.perf_counter()
        for x, y in zip(arrays, ys):
            check(x, y)
        ceiling = n / (time.perf_counter() - t)
        del ys
        out["check_only_arrays_per_s"] = ceiling
        print(f"the caller's numpy check alone, no pool: {ceiling:.0f} arrays/s", end="")
        if RUST in rates:
            print(f" = {ceiling / statistics.median(rates[RUST]):.2f}x the Rust job", end="")
        print()
        for a, b, label in pairs:
            if a in rates and b in rates:
                ratios = [x / y for x, y in zip(rates[a], rates[b])]
                out[label] = ratios
                print(
                    f"{label}: {statistics.median(ratios):.2f}x "
                    f"({min(ratios):.2f}..{max(ratios):.2f})"
                )
        report["sizes"][size] = out
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
