"""mk1: numpy arrays through worker processes over shared memory.

>>> import mk1, numpy as np
>>> def f(x):                       # module level: the workers import it
...     return x * 3 + 1
>>> with mk1.Pool(workers=4) as pool:                          # doctest: +SKIP
...     for y in pool.map(f, arrays): ...                      # ordered, lazy, bounded
...     for y in pool.imap_unordered(f, arrays): ...           # completion order
...     y = pool.submit(f, a).result()                         # a future
...     ys = list(pool.map(mk1.ops.affine(3, 1), arrays))      # built-in op: Rust in the workers
...     d = pool.submit(stats, a, b, bins=10).result()         # any arguments, any result
...     for d in pool.starmap(stats, pairs): ...               # several arguments per call

See ``mk1.Pool`` for the guarantees, and the README for installation.
"""

from . import ops
from ._mk1 import (
    ArrayTooLarge,
    Mk1Error,
    NoWorkersLeft,
    PoolStartError,
    RemoteError,
    TaskTimeout,
    WorkerDied,
)
from ._pool import AsyncResult, Future, MapIterator, Pool
from ._worker import worker_id, worker_state

# The exception types live in the extension; name them as mk1's so that they pickle (a worker
# raising one sends it back by reference to this module).
for _e in (ArrayTooLarge, Mk1Error, NoWorkersLeft, PoolStartError, RemoteError, TaskTimeout,
           WorkerDied):
    _e.__module__ = "mk1"
del _e

__version__ = "0.1.0"

__all__ = [
    "ArrayTooLarge",
    "AsyncResult",
    "Future",
    "MapIterator",
    "Mk1Error",
    "NoWorkersLeft",
    "Pool",
    "PoolStartError",
    "RemoteError",
    "TaskTimeout",
    "WorkerDied",
    "ops",
    "worker_id",
    "worker_state",
]
