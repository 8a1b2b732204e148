"""How much one slow call holds back the calls after it: mk1 against ``multiprocessing`` and
``concurrent.futures``, whose workers take calls from one shared queue.

Two jobs, each with 2 workers (``--workers``), timed in wall-clock seconds:

- ``map``: one call of 1 s, then a hundred of 20 ms, through an ordered map (mk1 ``map``,
  ``multiprocessing.Pool.imap``, chunksize 1). Ideal with 2 workers: 1.5 s.
- ``submits``: a call of 2 s, then 10 quick calls, each its own future (mk1 ``submit``,
  ``ProcessPoolExecutor.submit``): the time until every quick one is done. Ideal: ~0 s. Twice:
  with workers that have just run 20 ms calls, and 1 ms calls (mk1 then lets quick calls
  queue a little at each worker, up to its ``queue_ahead`` of 5 ms at that pace: one can land
  behind the 2 s call).

Each system gets a warm pool (start-up is not timed). The systems run interleaved, in a shuffled
order each round; the report gives seconds (median, min..max) and mk1's ratio to the other
system, paired round by round.

    python3 python/bench/bench_slow_call.py [--rounds 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing as mp
import random
import statistics
import time

import mk1


def nap(seconds):
    time.sleep(seconds)
    return seconds


CALLS = [1.0] + [0.02] * 100


def map_mk1(pool):
    t = time.perf_counter()
    assert list(pool.map(nap, CALLS)) == CALLS
    return time.perf_counter() - t


def map_mp(pool):
    t = time.perf_counter()
    assert list(pool.imap(nap, CALLS)) == CALLS
    return time.perf_counter() - t


def submits(pool, warm):
    # (Calls of `warm` s first, so that the workers' pace is known.)
    for f in [pool.submit(nap, warm) for _ in range(20)]:
        f.result()
    t = time.perf_counter()
    slow = pool.submit(nap, 2.0)
    quick = [pool.submit(nap, 0.0) for _ in range(10)]
    for f in concurrent.futures.as_completed(quick):
        f.result()
    took = time.perf_counter() - t
    slow.result()
    return took


def spread(v):
    return f"{statistics.median(v):.3f} ({min(v):.3f}..{max(v):.3f})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    w = args.workers
    runs = {
        "map": {"mk1": lambda p: map_mk1(p["mk1"]), "other": lambda p: map_mp(p["mp"])},
        "submits after 20 ms calls": {
            "mk1": lambda p: submits(p["mk1"], 0.02),
            "other": lambda p: submits(p["ppe"], 0.02),
        },
        "submits after 1 ms calls": {
            "mk1": lambda p: submits(p["mk1"], 0.001),
            "other": lambda p: submits(p["ppe"], 0.001),
        },
    }
    names = {job: "ProcessPoolExecutor" for job in runs}
    names["map"] = "multiprocessing.Pool.imap"
    got = {job: {"mk1": [], "other": []} for job in runs}
    with mk1.Pool(w) as m, mp.Pool(w) as p, concurrent.futures.ProcessPoolExecutor(w) as e:
        pools = {"mk1": m, "mp": p, "ppe": e}
        for f in [e.submit(nap, 0) for _ in range(w)]:
            f.result()
        for _ in range(args.rounds):
            order = [(job, side) for job in runs for side in ("mk1", "other")]
            random.shuffle(order)
            for job, side in order:
                got[job][side].append(runs[job][side](pools))
    print(f"# {w} workers, {args.rounds} rounds; seconds: median (min..max)")
    for job in runs:
        a, b = got[job]["mk1"], got[job]["other"]
        ratio = [x / y for x, y in zip(a, b)]
        print(f"{job}: mk1 {spread(a)}  {names[job]} {spread(b)}  mk1/other {spread(ratio)}")


if __name__ == "__main__":
    main()
