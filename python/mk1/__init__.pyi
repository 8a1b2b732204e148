"""Type stubs for mk1 (numpy arrays through worker processes over shared memory)."""

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future as _Future
from typing import Any


from . import ops as ops
from .ops import Op

__version__: str

class Mk1Error(Exception):
    """Base class of mk1's errors."""

class PoolStartError(Mk1Error):
    """The pool could not start: a setting, a limit of this machine (shared memory, processes,
    address space), a worker that failed to start, or an initializer that raised."""

class WorkerDied(Mk1Error):
    """The worker running the task died, after every retry the pool's mode allows."""

class TaskTimeout(Mk1Error):
    """The task ran past the pool's timeout; its worker was killed and replaced."""

class NoWorkersLeft(Mk1Error):
    """Every worker is gone for good (restart limit, or workers that cannot start)."""

class ArrayTooLarge(Mk1Error):
    """An array, or a function's result, larger than ``max_array_bytes``."""

class RemoteError(Mk1Error):
    """The function raised in the worker and its exception could not be rebuilt here; the
    message is the worker's formatted traceback."""

_Fn = Callable[..., Any] | Op

class Future(_Future[Any]):
    """A task's result, as ``concurrent.futures.Future``: it completes by itself (a thread of
    the pool receives while futures are pending), so ``concurrent.futures.wait``,
    ``add_done_callback`` and ``asyncio.wrap_future`` work; ``result()`` receives at once."""

    def cancel(self) -> bool:
        """Cancels the call if no worker has it yet (it waits in the pool for a worker);
        False for one a worker has."""
    def running(self) -> bool:
        """True while a worker has the call; False while it waits for one, or is done."""

class AsyncResult:
    """A result to come, as ``multiprocessing.pool.AsyncResult``."""

    def get(self, timeout: float | None = ...) -> Any: ...
    def wait(self, timeout: float | None = ...) -> None: ...
    def ready(self) -> bool: ...
    def successful(self) -> bool: ...

class MapIterator(Iterator[Any]):
    """The results of ``map``, ``imap``, ``imap_unordered`` and ``starmap``."""
    def __iter__(self) -> MapIterator: ...
    def __next__(self) -> Any: ...
    def next(self, timeout: float | None = None) -> Any: ...
    def close(self) -> None: ...

class Pool:
    """A pool of worker processes fed through shared memory (see the module's docs).

    Arrays: int8..int64, uint8..uint64, float32, float64 (native byte order), 1 to 4
    dimensions (a dimension may be 0), at most ``max_array_bytes``; strided ones are copied.
    Calls with other arguments (several, keywords, non-arrays) and results of any kind travel
    as pickles whose arrays go through shared memory.
    """

    def __init__(
        self,
        workers: int | None = ...,
        initializer: Callable[..., Any] | None = ...,
        initargs: tuple[Any, ...] = ...,
        maxtasksperchild: int | None = ...,
        context: Any = ...,
        *,
        max_tasks_per_child: int | None = ...,
        mp_context: Any = ...,
        mode: str = ...,
        max_array_bytes: int = ...,
        slots: int | None = ...,
        max_retries: int = ...,
        max_restarts: int = ...,
        timeout: float | None = ...,
        keep_copies: bool = ...,
        start_timeout: float = ...,
        queue_ahead: float | None = ...,
        processes: int | None = ...,
        max_workers: int | None = ...,
    ) -> None: ...
    def __enter__(self) -> Pool: ...
    def __exit__(self, *exc: object) -> None: ...
    def close(self) -> None: ...
    def terminate(self) -> None: ...
    def join(self) -> None: ...
    @property
    def workers(self) -> int: ...
    def worker_pids(self) -> list[int]: ...
    def restarts(self) -> int: ...
    def submit(self, fn: _Fn, /, *args: Any, **kwargs: Any) -> Future: ...
    def apply(
        self, fn: _Fn, args: Iterable[Any] = ..., kwds: dict[str, Any] | None = ...
    ) -> Any: ...
    def apply_async(
        self,
        fn: _Fn,
        args: Iterable[Any] = ...,
        kwds: dict[str, Any] | None = ...,
        callback: Callable[[Any], Any] | None = ...,
        error_callback: Callable[[BaseException], Any] | None = ...,
    ) -> AsyncResult: ...
    def map_async(
        self,
        fn: _Fn,
        iterable: Iterable[Any],
        chunksize: int | None = ...,
        callback: Callable[[list[Any]], Any] | None = ...,
        error_callback: Callable[[BaseException], Any] | None = ...,
    ) -> AsyncResult: ...
    def starmap_async(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = ...,
        callback: Callable[[list[Any]], Any] | None = ...,
        error_callback: Callable[[BaseException], Any] | None = ...,
    ) -> AsyncResult: ...
    def shutdown(self, wait: bool = ..., *, cancel_futures: bool = ...) -> None: ...
    def as_completed(
        self, futures: Iterable[Future], timeout: float | None = ...
    ) -> Iterator[Future]: ...
    def map(
        self,
        fn: _Fn,
        *iterables: Iterable[Any],
        chunksize: int | None = ...,
        zero_copy: bool = ...,
        progress: bool = ...,
        timeout: float | None = ...,
    ) -> MapIterator: ...
    def imap(
        self,
        fn: _Fn,
        *iterables: Iterable[Any],
        chunksize: int | None = ...,
        zero_copy: bool = ...,
        progress: bool = ...,
        timeout: float | None = ...,
    ) -> MapIterator: ...
    def imap_unordered(
        self,
        fn: _Fn,
        *iterables: Iterable[Any],
        chunksize: int | None = ...,
        zero_copy: bool = ...,
        progress: bool = ...,
        timeout: float | None = ...,
    ) -> MapIterator: ...
    def starmap(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = ...,
        *,
        zero_copy: bool = ...,
        progress: bool = ...,
    ) -> MapIterator: ...

def worker_id() -> int | None:
    """This worker's index (``0..workers``), or None outside a worker."""

def worker_state() -> dict[Any, Any]:
    """A dict private to this worker process, kept between tasks."""
