"""When ``zero_copy=True`` pays off: a map of the built-in op ``affine(3, 1)`` over float32
arrays of one shape, results lent from shared memory against results copied out, interleaved
round by round. Each round maps the same arrays both ways and reads one element of every
result; the report gives each side's arrays/s (median) and the zero-copy / copying ratio per
round (median, min..max).

    python3 python/bench/bench_zero_copy.py [--sides 16,64,128,256,512] [--rounds 5]
        [--workers 1] [--mib 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import mk1


def timed(pool, arrays, zero_copy):
    op = mk1.ops.affine(3, 1)
    start = time.perf_counter()
    n = 0
    for k, y in enumerate(pool.map(op, arrays, zero_copy=zero_copy)):
        if y[0, 0] != arrays[k][0, 0] * 3 + 1:
            raise AssertionError(f"result {k} is wrong")
        n += 1
        del y
    return n / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sides", default="16,64,128,256,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--mib", type=int, default=20, help="input bytes per map, at most 20 000 arrays")
    a = ap.parse_args()
    with mk1.Pool(workers=a.workers) as pool:
        for side in (int(s) for s in a.sides.split(",")):
            n = max(200, min(20_000, (a.mib << 20) // (side * side * 4)))
            arrays = [np.full((side, side), k % 1000, dtype=np.float32) for k in range(n)]
            lent, copied = [], []
            for _ in range(a.rounds):
                copied.append(timed(pool, arrays, False))
                lent.append(timed(pool, arrays, True))
            ratio = sorted(x / y for x, y in zip(lent, copied))
            print(
                f"{side}x{side} float32, {n} arrays: copied {statistics.median(copied):.0f}/s, "
                f"zero-copy {statistics.median(lent):.0f}/s; zero-copy / copied "
                f"{statistics.median(ratio):.2f}x ({ratio[0]:.2f}..{ratio[-1]:.2f})"
            )


if __name__ == "__main__":
    main()
