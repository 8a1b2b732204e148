"""``mk1.Pool``: the caller's side, built on the ``mk1._mk1`` extension."""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import io
import itertools
import json
import multiprocessing
import operator
import os
import pickle
import re
import sys
import tempfile
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import _base
from typing import Any

import numpy as np

from . import _mk1
from . import _args
from . import _worker
from ._worker import BOOT_ENV, EXC_MARKER
from .ops import Op

_WAIT = 0.05  # longest wait inside Rust before Python checks for Ctrl-C (seconds)
# Batches of calls, or arrays, a map in order may take ahead of its next result, at most,
# while that result is slow: those that came back wait as copies (64 MiB of their inputs and
# results at most), so that one slow call does not stop the workers (multiprocessing's imap
# takes its whole input).
_REORDER = 4096
# A zero_copy map lends results of at least this many bytes; smaller ones come as read-only
# copies: below it, a copy costs less than a view of shared memory (bench_zero_copy.py).
_LEND_MIN = 64 << 10
_POOLS: "weakref.WeakSet[Pool]" = weakref.WeakSet()  # live pools, for fork()


_TERMINATED = "the pool was terminated (garbage-collected, or open at exit)"


def _finalize(core, ended: threading.Event) -> None:
    """A pool garbage-collected or left open at exit: killed at once, its pending futures
    failed. A Ctrl-C meanwhile (a second one, at exit) does not stop this half done: the
    pool is being stopped already."""
    pending = None
    try:
        while True:
            try:
                if pending is None:
                    pending = core.terminate()
                while pending:
                    _fail(pending.pop(), _TERMINATED)
                return
            except KeyboardInterrupt:
                continue
    finally:
        ended.set()


def _fail(fut: concurrent.futures.Future, why: str) -> None:
    """Fails ``fut`` with ``Mk1Error(why)`` unless it is done (by now, or meanwhile)."""
    if not concurrent.futures.Future.done(fut):
        try:
            fut.set_exception(_mk1.Mk1Error(why))
        except concurrent.futures.InvalidStateError:
            pass  # (completed meanwhile)


_FORKED = (
    "this pool belongs to the process this one was forked from (its workers serve that "
    "process only): make a new pool here"
)


def _after_fork_in_child() -> None:
    """A child made by fork() inherits the parent's pools but not their workers or threads: it
    forgets them (using one there raises ``ValueError``, saying so; a future it inherited
    pending fails with ``Mk1Error``; ``close()`` and ``join()`` return)."""
    for pool in list(_POOLS):
        if pool._core is not None:
            pool._forked = True
            pool._why = _FORKED
            pool._finalizer.detach()
            pool._core.abandon()
            pool._core = None
        # The parent's threads may have held these locks at the fork (its futures' thread
        # often does, right after a submit): they would never be released here. New ones.
        pool._driver = _Driver(pool)
        pool._end_lock = threading.Lock()
        # (Closed here, whatever the parent was doing: nothing waits for its closing.)
        pool._ended = threading.Event()
        pool._ended.set()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
_THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


class RemoteTraceback(Exception):
    """The worker's traceback, attached as ``__cause__`` of a re-raised exception (named as
    ``multiprocessing.pool``'s, for code that looks for it by name)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _rebuild(exc: BaseException) -> BaseException:
    """A failed Python function's exception as it was raised in the worker (same type, with
    the worker's traceback as ``__cause__``) when it unpickles here; else ``RemoteError``."""
    if not isinstance(exc, _mk1.RemoteError):
        # A new one of mk1's own errors: the one given may be held elsewhere too (a failed
        # slot's error is every array's of it), and the traceback raising it attaches would
        # hold the caller's frames, and the results they hold, alive with it.
        if isinstance(exc, _mk1.Mk1Error):
            fresh = type(exc)(*exc.args)
            fresh.__cause__ = exc.__cause__
            return fresh
        return exc
    message = str(exc)
    text, sep, blob = message.partition(EXC_MARKER)
    if sep:
        try:
            original = pickle.loads(base64.b64decode(blob))
        except Exception:  # its type is not importable here, or it does not rebuild
            original = None
        if isinstance(original, BaseException):
            original.__cause__ = RemoteTraceback(text)
            return original
    return _mk1.RemoteError(text)


_TOP_LEVEL: dict[str, frozenset] = {}


def _script_names(path: str) -> frozenset | None:
    """The functions and classes of the main script at ``path`` that its workers define too
    (see ``_names_run_on_import``); None when it cannot be read (then everything of it goes
    by reference, as with multiprocessing)."""
    names = _TOP_LEVEL.get(path)
    if names is None:
        import ast

        try:
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, ValueError):
            return None
        names = _names_run_on_import(tree.body)
        _TOP_LEVEL[path] = names
    return names


def _names_run_on_import(body: list) -> frozenset:
    """The functions and classes that the statements ``body`` (a module's) surely define when
    the module is imported rather than run as ``__main__``, as the workers run the main
    script: those at the top level, also inside a top-level ``if``, ``try``, ``with``,
    ``match`` or loop, but not under ``if __name__ == "__main__":`` (under its ``else:``, yes),
    nor in either branch of another test of ``__name__`` (or of a name set from it); and
    none that is also defined where the workers may not run it."""
    import ast

    run: set = set()
    other: set = set()  # defined where the workers may not run it
    derived: set = {"__name__"}  # names whose value depends on `__name__`

    def mentions(node: Any) -> bool:
        return any(isinstance(x, ast.Name) and x.id in derived for x in ast.walk(node))

    def walk(stmts: list, runs: bool) -> None:
        for n in stmts:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                (run if runs else other).add(n.name)
            elif isinstance(n, (ast.Assign, ast.AnnAssign)) and n.value is not None:
                if mentions(n.value):
                    targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                    derived.update(x.id for t in targets for x in ast.walk(t)
                                   if isinstance(x, ast.Name))
            elif isinstance(n, ast.If):
                if _is_main_guard(n.test):
                    walk(n.body, False)
                    walk(n.orelse, runs)
                else:
                    known = not mentions(n.test)
                    walk(n.body, runs and known)
                    walk(n.orelse, runs and known)
            elif isinstance(n, (ast.For, ast.AsyncFor, ast.While)):
                walk(n.body, runs)
                walk(n.orelse, runs)
            elif isinstance(n, (ast.With, ast.AsyncWith)):
                walk(n.body, runs)
            elif isinstance(n, ast.Try) or type(n).__name__ == "TryStar":
                walk(n.body, runs)
                for h in n.handlers:
                    walk(h.body, runs)
                walk(n.orelse, runs)
                walk(n.finalbody, runs)
            elif type(n).__name__ == "Match":
                known = not mentions(n.subject)
                for case in n.cases:
                    walk(case.body, runs and known)

    walk(body, True)
    return frozenset(run - other)


def _is_main_guard(test: Any) -> bool:
    """Whether ``test`` is ``__name__ == "__main__"`` (either way round)."""
    import ast

    if not (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.Eq)
        and len(test.comparators) == 1
    ):
        return False
    sides = (test.left, test.comparators[0])
    return any(isinstance(x, ast.Name) and x.id == "__name__" for x in sides) and any(
        isinstance(x, ast.Constant) and x.value == "__main__" for x in sides
    )


# Plain functions pickled by reference, by the wrapper they went in (see `_pickle_function`).
_BY_REFERENCE: "weakref.WeakKeyDictionary[Callable, dict]" = weakref.WeakKeyDictionary()


class _Closing(ValueError):
    """The pool is closed, or being closed by some thread (see ``Pool._pump_open``)."""


class _NotInWorkers(Exception):
    """A function or class of the main script that its workers do not define (the object
    in ``args[0]``)."""


class _ByReference(pickle.Pickler):
    """Pickles by reference (as ``pickle.dumps``), refusing with ``_NotInWorkers`` a function
    or class of the main script that the workers do not define (``names``: those they do; None:
    every one), wherever it is in what is pickled (a callable instance's state, say)."""

    def __init__(self, f: io.BytesIO, names: frozenset | None) -> None:
        super().__init__(f, protocol=pickle.HIGHEST_PROTOCOL)
        self.names = names

    def reducer_override(self, obj: Any) -> Any:
        if (
            self.names is not None
            and isinstance(obj, (types.FunctionType, type))
            and getattr(obj, "__module__", None) == "__main__"
            and obj.__qualname__.split(".")[0] not in self.names
        ):
            raise _NotInWorkers(obj)
        return NotImplemented


def _pickle_function(fn: Callable, wrap: Callable[[Any], Any] | None = None) -> bytes:
    """The function (wrapped in ``wrap(fn)`` if given) as bytes for the workers: by reference
    (module and name) when it can be, else by value with cloudpickle (lambdas, closures,
    functions of an interactive session)."""
    obj = fn if wrap is None else wrap(fn)
    main = sys.modules.get("__main__")
    in_main = getattr(fn, "__module__", None) == "__main__"
    # (A script read from stdin has the file name "<stdin>", which the workers cannot run.)
    main_file = getattr(main, "__file__", None)
    interactive = in_main and (not main_file or main_file.endswith("<stdin>"))
    if not interactive:
        # (A plain function by reference pickles the same every time: its module and name.)
        plain = type(fn) is types.FunctionType
        known = _BY_REFERENCE.get(fn) if plain else None
        if known is not None and wrap in known:
            return known[wrap]
        # (No script the workers can run, `python -c` or stdin: they define none of the main
        # module's names, wherever one is in what is pickled, a partial's function say.)
        scripted = main_file and not main_file.endswith("<stdin>")
        names = _script_names(main_file) if scripted else frozenset()
        try:
            f = io.BytesIO()
            _ByReference(f, names).dump(obj)
            blob = f.getvalue()
            if plain:
                _BY_REFERENCE.setdefault(fn, {})[wrap] = blob
            return blob
        except _NotInWorkers as e:
            # Defined under `if __name__ == "__main__":` (or by exec), or in it: the workers'
            # copy of the script does not have it, so it goes by value, with cloudpickle.
            try:
                import cloudpickle
            except ImportError:
                lam = getattr(e.args[0], "__name__", None) == "<lambda>"
                where = (
                    "as a lambda, which has no name that the workers can look up (wherever it "
                    "is defined). Define it with `def` at the script's top level"
                    if lam
                    else "under `if __name__ == '__main__':` (or by exec, or where the workers "
                    "may not define it), which the workers do not run. Define it at the "
                    "script's top level"
                    if scripted
                    else "in an interactive session (or a script from `python -c` or stdin), "
                    "which the workers cannot run. Define it in an importable module or a "
                    "script file"
                )
                raise TypeError(
                    f"mk1 cannot send {fn!r} to the workers: {e.args[0]!r} is defined {where}, "
                    f"or install cloudpickle (pip install cloudpickle) to send it by value."
                ) from None
            return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            by_reference_error = e
    else:
        by_reference_error = None
    try:
        import cloudpickle
    except ImportError:
        why = (
            "it is defined in an interactive session"
            if interactive
            else f"it cannot be pickled by reference ({by_reference_error})"
        )
        raise TypeError(
            f"mk1 cannot send {fn!r} to the workers: {why}. Define it at module level in an "
            f"importable module or in the main script, or install cloudpickle "
            f"(pip install cloudpickle) to send lambdas and closures by value."
        ) from None
    return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


_CARRIED = frozenset(
    np.dtype(n)
    for n in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
              "float32", "float64")
)


def _carried(a: Any) -> np.ndarray | None:
    """``a`` as the C-contiguous array mk1 carries for it, when it is a numpy array (an
    ``ndarray`` or a ``memmap``; not a subclass with more to it, such as a masked array) of a
    dtype of ``_CARRIED`` and 1 to ``MAX_DIMS`` dimensions. None for anything else (a list, a
    scalar, a string, a bool or complex array, ...), which then travels as it is, as an
    argument of a call (see ``mk1._args``)."""
    if type(a) is not np.ndarray and type(a) is not np.memmap:
        return None
    if a.dtype not in _CARRIED or not 1 <= a.ndim <= _mk1.MAX_DIMS:
        return None
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _op_input(a: Any) -> tuple[np.ndarray, tuple | None]:
    """An input of a built-in op as the array to copy into a slot, C-contiguous (a strided
    array is copied first), and the shape to give its result: None, or for an array of 0 or
    more than ``MAX_DIMS`` dimensions (which a slot does not describe), its own shape, the
    array going as one dimension (built-in ops are elementwise)."""
    given = a
    a = np.asarray(a)
    if a.dtype.kind in "OSUV" and not isinstance(given, np.ndarray):
        raise TypeError(
            f"a built-in op takes numeric arrays (or what numpy makes one of), not "
            f"{type(given).__name__}"
        )
    shape = None
    if a.ndim == 0 or a.ndim > _mk1.MAX_DIMS:
        shape, a = a.shape, a.reshape(-1)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a, shape


def _op_inputs(inputs: Iterator, shapes: dict) -> Iterator:
    """``inputs`` of a map of a built-in op as arrays to copy into slots; ``shapes`` gets the
    result's shape by input index for those that go as one dimension (see ``_op_input``)."""
    for i, x in enumerate(inputs):
        a, shape = _op_input(x)
        if shape is not None:
            shapes[i] = shape
        yield a


# What a worker runs: first the caller's sys.path (so that the standard library, numpy and
# the rest resolve as in the caller), then this very mk1 package, loaded from where the caller
# loaded it (not whatever that path finds first under the name: another installed version),
# then its main.
#
# What the worker needs to know (its boot data: the caller's sys.path, argv and main; the
# pickled initializer) is read from a descriptor whose number is in BOOT_ENV (an environment
# variable holds at most 128 KiB, too little for a large initargs or a long argv), with
# positioned reads (the workers share the descriptor's offset), into one buffer that `_main`
# takes over (the initializer's bytes are let go once it has run). Every variable of mk1's
# leaves the worker's environment first thing: what its calls start is no worker.
_WORKER_MAIN = f"""
import importlib.util, json, os, sys
worker = os.environ.pop("MK1_WORKER", None)
fd = int(os.environ.pop({BOOT_ENV!r}))
buf = bytearray(os.fstat(fd).st_size)
at = got = 0
while at < len(buf):
    got = os.preadv(fd, [memoryview(buf)[at:]], at)
    if not got:
        sys.exit("mk1: the pool's start-up file ended early")
    at += got
os.close(fd)
at = buf.index(b"\\n")
start = {{"boot": json.loads(bytes(buf[:at])), "init": memoryview(buf)[at + 1:], "spec": worker}}
sys.path[:] = start["boot"].get("path", sys.path)
del worker, fd, buf, at, got
d = {os.path.dirname(os.path.abspath(__file__))!r}
spec = importlib.util.spec_from_file_location(
    "mk1", os.path.join(d, "__init__.py"), submodule_search_locations=[d]
)
mk1 = importlib.util.module_from_spec(spec)
sys.modules["mk1"] = mk1
spec.loader.exec_module(mk1)
import mk1._worker
mk1._worker._main(start)
"""


def _boot_file(data: bytes) -> int:
    """A descriptor (close-on-exec) of a file holding ``data`` that leaves nothing behind: a
    memfd, or where that is refused (an old kernel, a sandbox) an unlinked temporary file in
    ``TMPDIR``. ``PoolStartError`` saying why when neither can be made or written (a file
    size limit, a full disk, a memory limit)."""
    try:
        fd = os.memfd_create("mk1-boot", os.MFD_CLOEXEC)
        where = "a memfd"
    except (AttributeError, OSError) as e:
        no_memfd = e
        try:
            with tempfile.TemporaryFile(prefix="mk1-boot-") as f:
                fd = os.dup(f.fileno())
            where = f"a temporary file in {tempfile.gettempdir()!r}"
        except OSError as e:
            raise _mk1.PoolStartError(
                f"cannot make the workers' start-up file: no memfd ({no_memfd}), and no "
                f"temporary file in {tempfile.gettempdir()!r} ({e}); set TMPDIR to a writable "
                f"directory"
            ) from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        os.close(fd)
        raise _mk1.PoolStartError(
            f"cannot write the workers' start-up data ({len(data)} bytes: the pickled "
            f"initializer and initargs, sys.path and argv) to {where}: {e}"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _as_is(x: Any) -> Any:
    return x


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Future(concurrent.futures.Future):
    """A task's result, as ``concurrent.futures.Future``: it completes by itself (a thread of
    the pool receives results while futures are pending), so ``concurrent.futures.wait``,
    ``as_completed``, ``add_done_callback`` and ``asyncio.wrap_future`` work on it; waiting on
    it (``result``, ``exception``) also receives results in the waiting thread, at once."""

    def __init__(self, pool: Pool, call: bool = False) -> None:
        super().__init__()
        self._pool = pool
        self._call = call  # its result is a bundle (see mk1._args), unpacked when it comes
        self._driven = False  # counted in its pool's `_Driver` until it completes
        self._group = False  # its result is the entries of several calls (see `_Left`)
        self._ticket: int | None = None  # its task's, once submitted
        self._died_in = 0  # it ran once already in a batch of this many calls that died
        self._shape: tuple | None = None  # its result's shape, when not as it comes (an op's)

    def cancel(self) -> bool:
        """Cancels the call if no worker has it yet: it waits in the pool for one to free up
        (a call goes to a worker only when it is free, unless the worker's recent calls were
        quick: then a little queues at each worker, see ``queue_ahead``). Else returns False, as a running
        ``concurrent.futures.Future`` does; True for a future already cancelled."""
        with self._condition:
            if self._state in (_base.CANCELLED, _base.CANCELLED_AND_NOTIFIED):
                return True
            if self._state != _base.RUNNING or self._ticket is None:
                return False
        try:
            if not self._pool._live().cancel(self._ticket):
                return False
        except ValueError:  # (closed: the closing completes it)
            return False
        self._cancelled_here()
        return True

    def running(self) -> bool:
        """True while a worker has the call, as in ``concurrent.futures``; False while it waits
        in the pool for a worker (``cancel()`` would then take it back) or is done."""
        if not super().running() or self._ticket is None:
            return super().running()
        try:
            waiting = self._pool._live().is_waiting(self._ticket)
        except ValueError:  # (closed: the closing completes it)
            waiting = False
        # (Asked again: another thread may have completed it meanwhile.)
        return not waiting and super().running()

    def _cancelled_here(self) -> None:
        """Its task was taken back before any worker had it: it completes as cancelled (its
        waiters and callbacks told, as ``concurrent.futures`` tells them)."""
        with self._condition:
            self._state = _base.CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        if self._driven:
            self._pool._driver.completed(self)
        self._invoke_callbacks()

    def result(self, timeout: float | None = None) -> Any:
        self._pool._wait_for(self, timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._pool._wait_for(self, timeout)
        return super().exception(0)

    def done(self) -> bool:
        if not super().done():
            try:
                self._pool._pump_open(0)
            except _Closing:
                pass  # (the closing fails it if its result did not come)
        return super().done()

    def _invoke_callbacks(self) -> None:
        # (concurrent.futures calls this when the future completes. Completed while its thread
        # holds the pool, its callbacks wait until the pool is given up: see `_routed`.)
        deferred = getattr(_ROUTING, "deferred", None)
        if deferred is None:
            super()._invoke_callbacks()
        else:
            deferred.append(self)

    def _run_callbacks(self) -> None:
        super()._invoke_callbacks()


class AsyncResult:
    """A result to come, as ``multiprocessing.pool.AsyncResult`` (what ``apply_async``,
    ``map_async`` and ``starmap_async`` return), over a future. As there, it is ready once its
    ``callback`` or ``error_callback`` has returned: ``get``, ``wait`` and ``ready`` see a
    result only after the callback is done with it."""

    def __init__(
        self,
        fut: concurrent.futures.Future,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> None:
        self._fut = fut
        self._called = threading.Event()  # set once the callback (if any) has run

        def done(f: concurrent.futures.Future) -> None:
            try:
                if f.cancelled():
                    return
                error = f.exception()
                if error is None:
                    if callback is not None:
                        callback(f.result())
                elif error_callback is not None:
                    error_callback(error)
            finally:
                # (Also when the callback raised: concurrent.futures logs that, and the
                # result stays the task's.)
                self._called.set()

        fut.add_done_callback(done)

    def get(self, timeout: float | None = None) -> Any:
        """The result (raises the task's exception); ``multiprocessing.TimeoutError`` past
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        try:
            self._fut.exception(timeout)
        except concurrent.futures.TimeoutError:
            # (Its result may have come at the deadline.)
            if not concurrent.futures.Future.done(self._fut):
                raise multiprocessing.TimeoutError() from None
        if not self._called.wait(_left(deadline)):
            raise multiprocessing.TimeoutError()
        return concurrent.futures.Future.result(self._fut, 0)

    def wait(self, timeout: float | None = None) -> None:
        """Waits for the result (and its callback), at most ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + max(0.0, float(timeout))
        try:
            self._fut.exception(timeout)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            pass
        if concurrent.futures.Future.done(self._fut):
            self._called.wait(_left(deadline))

    def ready(self) -> bool:
        """Whether the result is there (and its callback has run)."""
        return self._fut.done() and self._called.is_set()

    def successful(self) -> bool:
        """Whether the task succeeded; ``ValueError`` while it is not ready."""
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._fut.exception() is None


_CLOSED_MAP = (
    "the pool is closed: a map's calls run as it is iterated (Pool.map, imap, imap_unordered "
    "and starmap are lazy, unlike multiprocessing.Pool.map), so iterate it before its pool "
    "closes, e.g. results = list(pool.map(...)) inside the `with` block"
)


class MapIterator:
    """The results of ``Pool.map``, ``imap``, ``imap_unordered`` and ``starmap``: an iterator,
    lazy as a generator (see ``Pool.map``), with ``next(timeout)`` as ``multiprocessing``'s
    ``IMapIterator`` has it."""

    __slots__ = ("_gen", "_step", "_turn", "_broken", "_used", "__weakref__")

    def __init__(self, gen: Iterator[Any], step: _Step) -> None:
        self._gen = gen
        self._step = step
        # Why the map's generator ended early, if it did (see `next`).
        self._broken: str | None = None
        # Iterated or closed (see `__del__`).
        self._used = False
        # One thread at a time, as with a generator (which raises ValueError for a second):
        # a step's deadline belongs to the thread that set it.
        self._turn = threading.Lock()

    def __del__(self) -> None:
        # A map runs as it is iterated: one dropped unused ran nothing, which code written for
        # `multiprocessing.Pool.map` (a list, made at the call) does not expect.
        if not getattr(self, "_used", True):
            try:
                warnings.warn(
                    "mk1: a map's results were never iterated, so none of its calls ran: "
                    "Pool.map, imap, imap_unordered and starmap are lazy (unlike "
                    "multiprocessing.Pool.map); iterate the result, e.g. list(pool.map(...)), "
                    "or use map_async(...).get()",
                    RuntimeWarning,
                    stacklevel=2,
                )
            except Exception:  # noqa: BLE001 - (at interpreter exit, warnings may be gone)
                pass

    def __iter__(self) -> MapIterator:
        return self

    def __next__(self) -> Any:
        return self.next()

    def next(self, timeout: float | None = None) -> Any:
        """The next result, waiting for it up to ``timeout`` seconds (None: as long as it
        takes, or the map's own ``timeout``). Raises ``multiprocessing.TimeoutError`` when it
        has not come by then; the map goes on, and a later ``next`` gives that result (nothing
        is lost or skipped). The map's ``timeout`` still ends the map when it passes
        (``concurrent.futures.TimeoutError``). ``timeout`` bounds the waits for results, not
        the taking of an input from the map's iterable, which runs in this call."""
        self._used = True
        if not self._turn.acquire(blocking=False):
            raise ValueError("a map's iterator is being iterated in another thread")
        try:
            if self._broken is _CLOSED_MAP:
                raise ValueError(_CLOSED_MAP)
            if self._broken is not None:
                raise _mk1.Mk1Error(self._broken)
            if timeout is not None:
                self._step.deadline = time.monotonic() + max(0.0, float(timeout))
            got = next(self._gen)
        except (KeyboardInterrupt, SystemExit) as e:
            # Not while the map waited (that comes as `_Interrupted`, and the map goes on):
            # between two of its own steps, where its generator ends. Its results still to
            # come are lost, so a later `next` says so rather than ending as if complete.
            self._broken = (
                f"this map was interrupted ({type(e).__name__}) between two of its own "
                "steps and cannot go on; its results still to come are lost"
            )
            raise
        except ValueError as e:
            if not (isinstance(e, _Closing) or str(e) == "the pool is closed"):
                raise
            # (Most often a map made inside `with pool:` and read after it, as one reads a
            # `multiprocessing.Pool.map`'s list.)
            self._broken = _CLOSED_MAP
            raise ValueError(_CLOSED_MAP) from e
        finally:
            self._step.deadline = None
            self._turn.release()
        if got is _STEP_PASSED:
            raise multiprocessing.TimeoutError()
        if type(got) is _Failed or type(got) is _Interrupted:
            raise got.exc
        return got

    def close(self) -> None:
        """Ends the map now: results still to come are dropped as they arrive, inputs not yet
        taken are not (as when the iterator is dropped, or a ``for`` loop over it breaks)."""
        self._used = True
        self._gen.close()


class _Step:
    """The deadline of the step a ``MapIterator.next(timeout)`` runs (``time.monotonic()``;
    None outside one)."""

    __slots__ = ("deadline",)

    def __init__(self) -> None:
        self.deadline: float | None = None

    def left(self) -> float | None:
        return _left(self.deadline)


_STEP_PASSED = object()  # what a map's generator yields when its step's timeout passed


class _Interrupted:
    """What a map's generator yields when Ctrl-C (KeyboardInterrupt, or any exception a signal
    handler raises) came while it waited for an input or a result: ``MapIterator`` raises
    ``exc``, and the generator takes up where it was at the next call, so the map goes on
    losing nothing (as ``multiprocessing``'s ``imap`` does)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Failed:
    """What a map's generator yields for a failed array or call when the map goes on after a
    failure (``imap``): ``MapIterator`` raises ``exc``."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Driver:
    """Receives results for futures that nobody waits on, so that they complete by themselves
    (as ``concurrent.futures``' do): a thread runs while futures of the pool are pending and
    stops after ``LINGER`` seconds without any. It holds the pool only while it receives (a
    pool dropped by its caller is still garbage-collected), and it receives with the GIL
    released, in turns with the caller's own threads (whichever receives a result routes it
    where it belongs)."""

    LINGER = 1.0
    # The caller's threads receive (waiting on a future) or submit: this thread steps aside
    # meanwhile and for GRACE seconds after, so that it does not contend with a caller that
    # is busy with the pool, only with one that left its futures to complete by themselves.
    GRACE = 0.002

    def __init__(self, pool: Pool) -> None:
        self.pool = weakref.ref(pool)
        self.cond = threading.Condition(threading.Lock())
        self.pending = 0  # futures submitted and not completed
        self.busy = 0  # threads of the caller receiving or submitting (see `enter`)
        self.quiet = 0.0  # when the last of them left
        self.parked = False  # this thread waits for them to leave
        self.thread: threading.Thread | None = None

    def submitted(self, fut: Future) -> None:
        with self.cond:
            fut._driven = True
            self.pending += 1
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._run, name="mk1-futures", daemon=True
                )
                self.thread.start()
            elif self.pending == 1:
                self.cond.notify()

    def completed(self, fut: Future) -> None:
        with self.cond:
            if fut._driven:
                fut._driven = False
                self.pending -= 1

    def stop(self) -> None:
        with self.cond:
            self.pending = 0
            self.cond.notify()

    def enter(self) -> bool:
        """A thread of the caller starts receiving (or submitting): the pool's thread steps
        aside until it leaves. Whether that thread may be receiving now (to be interrupted)."""
        with self.cond:
            self.busy += 1
            return self.thread is not None

    def leave(self) -> None:
        with self.cond:
            self.busy -= 1
            self.quiet = time.monotonic()
            if self.busy == 0 and self.parked:
                self.cond.notify()  # (to count its GRACE from now)

    def _run(self) -> None:
        idle_since = None
        while True:
            with self.cond:
                while self.pending == 0 or self.busy or time.monotonic() < self.quiet + self.GRACE:
                    # (Every wait ends by itself: a pool garbage-collected is noticed below.)
                    if self.pending:
                        idle_since = None
                        # (While the caller's threads receive or submit, and for GRACE after.)
                        self.parked = self.busy > 0
                        self.cond.wait(self.LINGER if self.parked else self.GRACE)
                        self.parked = False
                    else:
                        now = time.monotonic()
                        if idle_since is None:
                            idle_since = now
                        elif now - idle_since >= self.LINGER:
                            self.thread = None
                            return
                        self.cond.wait(self.LINGER - (now - idle_since))
                    if self.pool() is None:
                        self.thread = None
                        return
                idle_since = None
            pool = self.pool()
            try:
                if pool is None or pool._core is None:
                    raise ValueError("the pool is closed")
                pool._pump(_WAIT)
            except Exception:  # noqa: BLE001 - closed under it: its futures fail there
                with self.cond:
                    self.pending = 0
                    self.thread = None
                return
            finally:
                pool = None


# Futures completed by this thread while it held its pool (see `_routed`).
_ROUTING = threading.local()


def _routed(call: Callable[[], Any]) -> Any:
    """``call()``, which may complete futures while this thread holds the pool (receiving
    results): their done-callbacks run once it returns, when the pool is given up, so that a
    slow callback holds up no other thread's use of the pool. (Nested, the outermost runs
    them.)"""
    if getattr(_ROUTING, "deferred", None) is not None:
        return call()
    mine: list = []
    _ROUTING.deferred = mine
    try:
        return call()
    finally:
        _ROUTING.deferred = None
        for fut in mine:
            fut._run_callbacks()


def _pool_in_worker() -> str:
    """Why a pool cannot start here (in a worker), in the words that fit the cause."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_prepare_main" and frame.f_globals.get("__name__") == (
            "mk1._worker"
        ):
            return (
                "mk1.Pool was created at the top level of the main script, which every worker "
                "runs again to find the functions defined there (as multiprocessing's spawn "
                'start method does): put the code that makes the pool under `if __name__ == '
                '"__main__":`'
            )
        frame = frame.f_back
    return (
        "mk1.Pool cannot be created inside an mk1 worker (a function running in a pool tried "
        "to start a pool of its own)"
    )


def _check_start_method(context: Any) -> None:
    """Accepts a ``multiprocessing`` context (or a start method's name) whose workers start as
    mk1's do, fresh interpreters that import the main module: "spawn" or "forkserver"."""
    if context is None:
        return
    method = context if isinstance(context, str) else getattr(context, "get_start_method", None)
    if callable(method):
        method = method()
    if not isinstance(method, str):
        raise TypeError(
            f"context must be a multiprocessing context or a start method's name, not "
            f"{type(context).__name__}"
        )
    if method not in multiprocessing.get_all_start_methods():
        raise ValueError(
            f"cannot find context for {method!r} (start methods here: "
            f"{', '.join(multiprocessing.get_all_start_methods())})"
        )
    if method not in ("spawn", "forkserver"):
        raise ValueError(
            f"mk1 starts its workers as fresh interpreters, as the 'spawn' start method does; "
            f"a {method!r} context is not supported (state the workers need goes through "
            f"initializer/initargs)"
        )


class Pool:
    """A pool of worker processes fed through shared memory.

    Arrays (numpy, any of int8..int64, uint8..uint64, float32, float64; 1 to 4 dimensions;
    a dimension may be 0) are copied once into a shared-memory slot; the worker's function gets
    a read-only numpy view of that slot and its result is copied once into the slot's output
    region; the caller gets it as a new array (or, with ``zero_copy=True``, as a read-only
    view of shared memory). Nothing is pickled but the function itself, once per call.
    Calls with other arguments (several, keywords, objects that are not such arrays) run as
    ``concurrent.futures`` runs them and return what the function returned: arrays in their
    arguments and results still travel through shared memory, the rest is pickled (see
    ``submit``).

    Parameters:
        workers: worker processes (default: the CPUs this process may run on); also spelt
            ``processes`` (as ``multiprocessing.Pool``) or ``max_workers`` (as
            ``ProcessPoolExecutor``).
        initializer, initargs: ``initializer(*initargs)`` runs once in every worker before it
            serves (including replacements); an exception there makes the pool fail to start.
            Both are pickled once, of any size: they reach the workers through a memfd (or an
            unlinked temporary file in ``TMPDIR``) that the pool keeps while it lives.
        mode: ``"out-of-place"`` (default): inputs are read-only in the workers, and a task
            whose worker dies is redone on another worker, up to ``max_retries`` times.
            ``"in-place"``: the function's result overwrites the input in its slot; a task
            whose worker dies fails with ``WorkerDied`` unless ``keep_copies=True``.
        max_array_bytes: the largest array in bytes (default 4 MiB; at most 1 GiB - 64 KiB),
            and the most a call's arguments may take together (their arrays and the rest
            pickled, with 4 KiB more for their bundle's own bytes). A result may take that
            plus 64 KiB (the room the pickled function travels in).
            Shared memory taken: about ``slots * max_array_bytes``, twice out of place.
        slots: arrays in flight at once (default ``4 * workers``): the bound on memory and
            the backpressure of ``map``.
        max_retries: redos of a task whose worker died (out of place, or with keep_copies):
            a task runs at most ``1 + max_retries`` times. A call that a map sent in a batch
            of calls counts its run in the batch: when the batch's worker dies, each of its
            calls runs again on its own with the redos left (mk1 cannot tell which call
            killed the worker; the caller keeps every call's arguments, so this is so in
            place too), except that with ``max_retries=0`` a batch's calls still run once
            more each (a lone call does not); ``chunksize=1`` sends every call alone.
        max_restarts: worker replacements after deaths before the pool gives up
            (``NoWorkersLeft``); replacements after ``max_tasks_per_child`` do not count.
        context: a ``multiprocessing`` context (``multiprocessing.pool.Pool``'s fifth argument;
            also spelt ``mp_context``, as ``ProcessPoolExecutor``) or a start method's name:
            mk1's workers always start as fresh interpreters, as "spawn" starts them, so
            "spawn" and "forkserver" are taken, and "fork" is refused (``ValueError``).
        max_tasks_per_child: calls a worker process makes before it is replaced by a fresh
            one (default None: no limit), for functions that leak memory or other resources;
            also spelt ``maxtasksperchild`` (``multiprocessing.Pool``'s fourth argument). A
            worker stops a batch of calls at its limit (the calls it left run again, as those
            of a batch that ran long), answers, and exits; its replacement starts as at the
            pool's start (``initializer`` included), and no call is lost or run twice for it.
            Each call of a Python function counts one (an array of a map, a ``submit``, a
            call of a map of calls); ``mk1.ops``, which run in Rust, are not counted.
        timeout: seconds one array may take; past it the worker is killed and replaced, and
            the task fails with ``TaskTimeout`` (default: no limit).
        keep_copies: in place, keep a copy of each input to redo a task whose worker died.
        start_timeout: seconds a worker may take to start (import the main script, run the
            initializer) before the pool fails to start, or a replacement counts as failed
            (default 120).
        queue_ahead: seconds of work, as estimated from a worker's recent calls, that it may
            hold, its running call included (default 0.005: two of the 2 ms batches a map
            makes of quick calls, so that a worker always has the next one); any more calls
            wait in the pool for a worker to free up (see ``Future.cancel``). Smaller values
            hold back less behind a call that turns out slow, and cost throughput: 0.002 ran
            maps of 0.2–5 ms calls at 0.76–0.84 of no limit, 0.005 at 0.94–0.99. ``None``: no
            limit, every call goes to a worker when submitted.

    Raises ``PoolStartError`` when the pool cannot start (a setting out of range, not enough
    shared memory or processes, a worker that fails to start or whose initializer raised).

    Any thread may use a pool (submit, map, wait, close): its calls take turns, and whichever
    thread is waiting receives results for all. Futures complete by themselves (see
    ``Future``). It is not shared across ``fork()`` (a child
    forgets its parent's pools). Use it as a context manager, or call ``close()``: workers
    stop, shared memory is freed. Ctrl-C (KeyboardInterrupt) in any call
    stops cleanly; if the caller dies, its workers exit with it and no shared memory is left
    behind (the segment is an anonymous memfd).
    """

    def __init__(
        self,
        workers: int | None = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple = (),
        maxtasksperchild: int | None = None,
        context: Any = None,
        *,
        max_tasks_per_child: int | None = None,
        mp_context: Any = None,
        mode: str = "out-of-place",
        max_array_bytes: int = 4 << 20,
        slots: int | None = None,
        max_retries: int = 2,
        max_restarts: int = 1000,
        timeout: float | None = None,
        keep_copies: bool = False,
        start_timeout: float = 120.0,
        queue_ahead: float | None = 0.005,
        processes: int | None = None,
        max_workers: int | None = None,
    ) -> None:
        # (`processes` is multiprocessing's name for `workers`, `max_workers`
        # concurrent.futures'.)
        given = [(k, v) for k, v in (("workers", workers), ("processes", processes),
                                     ("max_workers", max_workers)) if v is not None]
        if len(given) > 1:
            raise TypeError(f"{' and '.join(k for k, _ in given)} are one setting: give one")
        workers = given[0][1] if given else None
        # (`maxtasksperchild` is multiprocessing's name, `max_tasks_per_child`
        # concurrent.futures'.)
        if maxtasksperchild is not None and max_tasks_per_child is not None:
            raise TypeError("maxtasksperchild and max_tasks_per_child are one setting: give one")
        limit_name = "max_tasks_per_child"
        if maxtasksperchild is not None:
            max_tasks_per_child, limit_name = maxtasksperchild, "maxtasksperchild"
        if max_tasks_per_child is not None:
            try:
                max_tasks_per_child = operator.index(max_tasks_per_child)
            except TypeError:
                raise TypeError(
                    f"{limit_name} must be an int, not {type(max_tasks_per_child).__name__}"
                ) from None
            if max_tasks_per_child < 1:
                raise ValueError(
                    f"{limit_name} must be at least 1 (None: no limit), "
                    f"not {max_tasks_per_child}"
                )
        # (`context` is multiprocessing's name, `mp_context` concurrent.futures'.)
        if context is not None and mp_context is not None:
            raise TypeError("context and mp_context are one setting: give one")
        _check_start_method(context if context is not None else mp_context)
        if initializer is not None and not callable(initializer):
            hint = ""
            if hasattr(initializer, "get_start_method"):
                hint = (
                    " (ProcessPoolExecutor's second argument is mp_context, mk1.Pool's is "
                    "initializer: pass the context as mp_context=)"
                )
            raise TypeError(
                f"initializer must be callable, not {type(initializer).__name__}{hint}"
            )
        if _worker.IN_WORKER:
            raise RuntimeError(_pool_in_worker())
        if os.environ.get("MK1_WORKER") is not None:
            # (A worker takes it out of its environment first thing: this is no worker.)
            raise RuntimeError(
                f"MK1_WORKER is set (to {os.environ['MK1_WORKER']!r}) in this process, which "
                f"no mk1 pool started: unset it"
            )
        if mode not in ("out-of-place", "in-place"):
            raise ValueError(f"mode must be 'out-of-place' or 'in-place', not {mode!r}")
        workers = _default_workers() if workers is None else operator.index(workers)
        slots = 4 * workers if slots is None else operator.index(slots)
        max_array_bytes = operator.index(max_array_bytes)
        max_retries = operator.index(max_retries)
        max_restarts = operator.index(max_restarts)
        for name, value, least in (
            ("workers", workers, 1),
            ("slots", slots, 1),
            ("max_array_bytes", max_array_bytes, 1),
            ("max_retries", max_retries, 0),
            ("max_restarts", max_restarts, 0),
        ):
            if value < least:
                raise ValueError(f"{name} must be at least {least}, not {value}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds (None or inf: no limit), not {timeout}")
        main = sys.modules.get("__main__")
        # Workers run the main script as __mp_main__: what they pickle by reference to it
        # (an exception class of the script, say) must unpickle here too, as multiprocessing
        # arranges.
        if main is not None:
            sys.modules.setdefault("__mp_main__", main)
        spec = getattr(main, "__spec__", None)
        boot = {
            "argv": list(sys.argv),
            "nonce": _args.NONCE.hex(),
            "path": list(sys.path),
            "main_name": getattr(spec, "name", None),
            "main_path": os.path.abspath(main.__file__)
            if getattr(main, "__file__", None)
            else None,
            "max_calls": max_tasks_per_child,
        }
        env = []
        # Native thread pools (BLAS, OpenMP) sized for the worker's share of the CPUs, as
        # loky does, unless the caller chose: N workers each spinning up all-core pools would
        # oversubscribe the machine.
        share = str(max(1, _default_workers() // workers))
        for var in _THREAD_VARS:
            if var not in os.environ:
                env.append((var, share))
        init = b""
        if initializer is not None:
            init = _pickle_function((initializer, tuple(initargs)))
        boot_fd = _boot_file(json.dumps(boot).encode() + b"\n" + init)
        self._core = None
        try:
            self._core = _mk1.PoolCore(
                workers,
                mode == "in-place",
                int(max_array_bytes),
                slots,
                int(max_retries),
                int(max_restarts),
                timeout,
                bool(keep_copies),
                sys.executable,
                ["-c", _WORKER_MAIN],
                env,
                (BOOT_ENV, boot_fd),
                float(start_timeout),
                None if queue_ahead is None else float(queue_ahead),
            )
        finally:
            os.close(boot_fd)  # (the pool keeps a duplicate for its workers)
        self._workers = workers
        self._max_retries = max_retries
        self._max_array_bytes = max_array_bytes
        # What a call's bundle may take: arguments of max_array_bytes, and the bundle's own.
        self._bundle_bytes = max_array_bytes + _args.ROOM
        self._timeout = timeout
        self._slots = self._core.slots()
        self._driver = _Driver(self)
        self._lists: set = set()  # the lists of map_async/starmap_async still being made
        # The pool is closed: no future will be routed any more (each is failed, by `_end`
        # or by whoever waits on it, see `_closed`).
        self._ended = threading.Event()
        self._why = "the pool was closed"  # (what a future pending at the closing fails with)
        self._end_lock = threading.Lock()
        self._ending = False  # `_end` was called (the first call closes the pool)
        self._close_begun = False  # close(), terminate() or shutdown() was called
        # Garbage-collected or left open at exit: killed, never waited for.
        self._finalizer = weakref.finalize(self, _finalize, self._core, self._ended)
        _POOLS.add(self)

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Pool:
        """The pool itself; ``ValueError`` once it is closed (as ``multiprocessing.Pool``)."""
        if self._closing():
            self._live()  # (says why: closed, or a forked process's copy)
            raise ValueError("the pool is closed: make a new one")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Leaving normally waits for what is still running (results of futures not waited on
        # are dropped); leaving on an exception (Ctrl-C included) kills the workers at once,
        # as multiprocessing.Pool's context manager does.
        if exc_type is None:
            self.close()
        else:
            self.terminate()

    def close(self) -> None:
        """Waits for the tasks still running (their futures get their results, the lists of
        ``map_async`` and ``starmap_async`` are finished), then stops the
        workers and frees the shared memory; results lent with ``zero_copy`` keep the memory
        mapped until they are gone. Ctrl-C while waiting terminates instead. Idempotent."""
        self._close_begun = True
        core = self._core
        if core is None:
            return
        # The lists map_async makes are work already given: they are finished first.
        try:
            concurrent.futures.wait(list(self._lists))
        except BaseException:
            self.terminate()
            raise
        core.begin_close()  # (no new work from here on, from any thread)
        self._driver.enter()
        try:
            # In flight, or back and not yet received: every future gets its result.
            # (A wait of _WAIT also waits for this thread's turn when another holds the pool;
            # with nothing in flight it does not wait for results.)
            while self._pump(_WAIT) or core.in_flight() > 0:
                pass
        except BaseException:
            self.terminate()
            raise
        finally:
            self._driver.leave()
        self._end("the pool was closed", core.close)

    def terminate(self) -> None:
        """Kills the workers now, without waiting for tasks (pending futures fail with
        ``Mk1Error``), and frees the shared memory. Idempotent."""
        self._close_begun = True
        core = self._core
        if core is not None:
            self._end("the pool was terminated", core.terminate)

    def _end(self, why: str, stop: Callable[[], list]) -> None:
        with self._end_lock:  # (held for the check only)
            first = not self._ending
            self._ending = True
        self._finalizer.detach()
        if not first:
            # Another call is closing it (another thread's, or this one's, from a callback):
            # this one only adds its own stop (a kill, say) and leaves the rest to that one.
            stop()
            return
        try:
            waiting = stop()  # (the futures still waiting)
            self._core = None
            self._driver.stop()
        finally:
            self._why = why
            # (Set before the futures below are failed and their callbacks run: a callback
            # waiting on another future of the pool fails that one itself, see `_closed`.)
            self._ended.set()
        for fut in waiting:
            _fail(fut, why)

    def _closed(self, fut: Future, deadline: float | None) -> None:
        """The pool was closed while ``fut`` was pending (by another thread, or by this one
        in a callback of a future it failed): the closing fails it (unless its result came
        first). Waits for the closing to get that far, up to ``deadline`` (``TimeoutError``
        past it), then fails ``fut`` itself if it is still pending."""
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not self._ended.wait(wait):
            raise concurrent.futures.TimeoutError()
        _fail(fut, self._why)

    def join(self) -> None:
        """As ``multiprocessing.Pool.join``: waits until the pool is closed (``close()``
        already waited; after ``shutdown(wait=False)`` this waits for it).
        ``ValueError`` when neither ``close()``, ``terminate()`` nor ``shutdown()`` was
        called."""
        if not self._close_begun:
            raise ValueError("the pool is still running: call close() or terminate() first")
        self._ended.wait()

    @property
    def workers(self) -> int:
        """Worker processes."""
        return self._workers

    def worker_pids(self) -> list[int]:
        """Pids of the live workers."""
        return self._live().worker_pids()

    def restarts(self) -> int:
        """Workers replaced so far: after deaths, and after ``max_tasks_per_child``
        retirements (only the former count against ``max_restarts``)."""
        return self._live().restarts()

    def _live(self):
        core = self._core
        if core is None:
            if getattr(self, "_forked", False):
                raise ValueError(_FORKED)
            raise ValueError("the pool is closed")
        return core

    def _closing(self) -> bool:
        """Whether this pool is closed or being closed (by any thread)."""
        core = self._core
        return core is None or core.is_gone()

    # -- the data path --------------------------------------------------------------------

    def _task(self, fn: Callable | Op, wrap: type | None = None) -> tuple[str | None, bytes | None]:
        """What the workers run: a built-in op, or the pickled function (wrapped in ``wrap``,
        ``mk1._args.Batch`` or ``Auto``, for calls: arguments and results of any kind, in
        bundles)."""
        if isinstance(fn, Op):
            if wrap is not None:
                raise TypeError(
                    f"{fn!r} is a built-in op: it takes one array of a dtype mk1 carries "
                    f"(int8..int64, uint8..uint64, float32, float64), not several arguments "
                    f"or other objects"
                )
            return fn.text, None
        if not callable(fn):
            raise TypeError(f"fn must be a callable or an mk1.ops op, not {type(fn).__name__}")
        blob = _pickle_function(fn, wrap)
        room = _mk1.PoolCore.context_room()
        if len(blob) > room:
            raise ValueError(
                f"{fn!r} pickles to {len(blob)} bytes; at most {room} travel with each array. "
                f"Capture less in it: large data belongs in initargs (see worker_state()) or in "
                f"a module the workers import"
            )
        return None, blob

    def _submit_one(
        self,
        a: np.ndarray | _args.Writer,
        task: tuple[str | None, bytes | None],
        sink,
        retries: int | None = None,
    ) -> int:
        """Submits ``a`` (an array, copied into a slot, or a bundle, written there),
        receiving results while every slot is busy (backpressure); the result will go to
        ``sink``. ``retries``: the task's own redos after a death (None: ``max_retries``)."""
        core = self._live()
        stuck = 0  # rounds with nothing in flight, nothing received and no slot
        while True:
            try:
                return core.submit(a, task[0], task[1], sink, retries)
            except _mk1.Busy:
                pass  # (waited for below, outside the handler: a Ctrl-C there is not "during" it)
            # Results that arrived but were not received yet hold slots too. (With nothing in
            # flight this waits only for this thread's turn, if another holds the pool.)
            got = self._pump(_WAIT)
            if not got and core.in_flight() == 0:
                if core.wait_for_lent(_WAIT):
                    continue  # (other threads hold them, and will drop them)
                # Other threads' slots may be in passing (received, not yet dropped): give up
                # only when it lasts.
                stuck += 1
                if stuck < 20:
                    time.sleep(_WAIT / 5)
                    continue
                raise _mk1.Mk1Error(
                    "every slot is held: by results lent with zero_copy=True (drop them, or "
                    "copy them, before asking for more) or by maps not run to their end "
                    "(iterate them to the end, or close() them)"
                )

    def _pump(self, timeout: float, watch: list | None = None, urgent: bool = False) -> bool:
        """Receives one completion (waiting up to ``timeout`` s, also for the turn of this
        thread when another one receives, which ``urgent`` interrupts; not past that turn when
        one of ``watch`` is done by then) and routes it. Whether one came."""
        # (A future's result is routed before this thread gives the pool up; its callbacks
        # run after.)
        core = self._live()
        return _routed(lambda: core.recv(timeout, watch, self._route, urgent)) is not None

    def _pump_open(self, timeout: float, watch: list | None = None, urgent: bool = False) -> bool:
        """As ``_pump``; ``_Closing`` (a ``ValueError``) when the pool is closed or being
        closed, by any thread (then the closing fails what is pending: see ``_closed``)."""
        try:
            return self._pump(timeout, watch, urgent)
        except ValueError as e:
            if self._closing():
                raise _Closing() from e
            raise

    @staticmethod
    def _route(got: tuple) -> None:
        sink, _worker, ok, payload, _dtype, _shape = got
        if sink is None:
            return
        # (A future: it completes only here, or fails at close. It is no longer registered,
        # so whatever happens here, Ctrl-C included, must complete it.)
        try:
            if ok and sink._group:
                ok, payload = _group_entries(payload)
            elif ok and (sink._call or payload.dtype == _U8 and _args.is_bundle(payload)):
                ok, payload = _one_result(payload)
        except BaseException as e:  # (Ctrl-C while its result was read)
            if sink._driven:
                sink._pool._driver.completed(sink)
            sink.set_exception(e)
            raise
        if sink._driven:
            sink._pool._driver.completed(sink)
        if ok:
            if sink._shape is not None:
                payload = payload.reshape(sink._shape)
            sink.set_result(payload)
        else:
            if sink._died_in and isinstance(payload, _mk1.WorkerDied):
                payload = _counted_in_batch(payload, sink._died_in)
            sink.set_exception(_rebuild(payload))

    def _wait_for(self, fut: Future, timeout: float | None) -> None:
        if concurrent.futures.Future.done(fut):
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        # This thread receives while it waits; the pool's own thread steps aside (and is
        # interrupted once, if it is receiving).
        urgent = self._driver.enter()
        try:
            while not concurrent.futures.Future.done(fut):
                try:
                    wait = _WAIT
                    if deadline is not None:
                        wait = min(wait, deadline - time.monotonic())
                        if wait <= 0:
                            # (What came already is received first: `result(0)` sees it.)
                            while self._pump_open(0):
                                pass
                            if concurrent.futures.Future.done(fut):
                                break
                            raise concurrent.futures.TimeoutError()
                    self._pump_open(wait, [fut], urgent)
                except _Closing:
                    self._closed(fut, deadline)
                    break
                urgent = False
        finally:
            self._driver.leave()

    def submit(self, fn: Callable | Op, /, *args: Any, **kwargs: Any) -> Future:
        """Runs ``fn(*args, **kwargs)`` in a worker; returns a ``Future`` of the result.

        - One numpy array argument (``ndarray`` or ``memmap``, of a dtype mk1 carries, 1 to 4
          dimensions), no keywords: the array is copied once into shared memory and ``fn`` gets
          a read-only view of it (or writes into ``out``, see ``map``). ``fn`` may also be an
          ``mk1.ops`` op here.
        - Any other call (several arguments, keywords, an argument that is not such an array:
          a path, a number, a list, a bool or complex array, a masked array): as
          ``concurrent.futures`` makes it. Numpy arrays anywhere in the arguments travel
          through shared memory (copied once into the slot; ``fn`` gets read-only views),
          everything else is pickled. ``out`` is never supplied to such a call.

        The result is what ``fn`` returned: an array of a dtype mk1 carries as a new array
        (C order), anything else pickled, its arrays again through shared memory. Arguments
        and result must each fit ``max_array_bytes`` (a result has 64 KiB more).

        Raises at once (nothing submitted) for arguments larger than ``max_array_bytes``
        (``ArrayTooLarge``), or a function or argument that cannot be sent (``TypeError``,
        pickle's errors). The future's exception is what ``fn`` raised (same type, with the
        worker's traceback as ``__cause__``), or ``WorkerDied``, ``TaskTimeout``,
        ``NoWorkersLeft``.
        """
        shape = None
        if isinstance(fn, Op):
            if len(args) != 1 or kwargs:
                self._task(fn, _args.Batch)  # (raises, saying why)
            a, shape = _op_input(args[0])
            call = False
        else:
            a = _carried(args[0]) if len(args) == 1 and not kwargs else None
            call = a is None
        task = self._task(fn, _args.Batch if call else None)
        if call:
            a = self._calls([(args, kwargs)])
        fut = Future(self, call)
        fut._shape = shape
        fut.set_running_or_notify_cancel()
        try:
            self._driver.submitted(fut)  # (before it can complete, in another thread say)
            self._driver.enter()
            fut._ticket = self._submit_one(a, task, fut)
        except BaseException:
            self._driver.completed(fut)
            raise
        finally:
            self._driver.leave()
        return fut

    def _prepare(self, item: Any) -> np.ndarray | _args.Writer:
        """An item of a map of arrays as its task's input: the array, or for anything else a
        calls bundle of one call (the map's function is wrapped in ``mk1._args.Auto``)."""
        a = _carried(item)
        return a if a is not None else self._calls([((item,), {})])

    def _calls(self, pairs: list) -> _args.Writer:
        """A calls bundle outside a map's batches (see ``mk1._args``), checked against the
        slots' size."""
        try:
            return _args.calls(-1, pairs, self._bundle_bytes)
        except OverflowError as e:
            raise self._too_large(e.args[0]) from None

    def _too_large(self, nbytes: int) -> BaseException:
        """The error of a call whose arguments take ``nbytes`` in a bundle."""
        return _mk1.ArrayTooLarge(
            f"the arguments take {nbytes} bytes in shared memory (their arrays, and the rest "
            f"pickled); a call may take {self._bundle_bytes}: the pool's max_array_bytes, "
            f"{self._max_array_bytes}, and {_args.ROOM} for the bundle's own "
            f"(mk1.Pool(max_array_bytes=...))"
        )

    def _batches(
        self,
        calls: Iterator[tuple],
        sizer: _BatchSizer,
        sent: dict,
        items: Iterator[Any] | None = None,
        snapshot: bool = True,
    ) -> Iterator[_args.Writer]:
        """The calls of a map as calls bundles of up to ``sizer.size`` calls each, as many as
        fit a slot; ``sent`` keeps each batch's calls by its number until its results come
        (to run again those the worker answers AGAIN), as ``(is a block, calls)``: the
        arguments of each call for a block, ``(args, kwargs)`` pairs otherwise. While every
        argument so far is an atom (a number, a string...: see ``mk1._args``) a batch goes as
        a block, one pickle; from the first call with another argument on, each call is
        pickled on its own. An input that fails, a call that does not pickle (named by its
        index) or one too large for a slot ends the batches, after the calls taken before it.
        ``items``: for a map of one argument per call, the iterator under ``calls`` (each of
        its items ``((item,), {})``), taken from directly while the calls go as blocks.
        ``snapshot``: taking a call may run the caller's code (a generator), which may change
        the arrays of the calls taken before: those of the batch are copied first."""
        taken = 0  # calls taken from the input
        carry: collections.deque = collections.deque()  # taken, not yet in a batch
        ended = None  # what the input raised (after the calls taken before it)
        done = False  # the input ended (never asked again: a zip would take one more item)
        atoms, flat, kinds = _args.ATOMS.issuperset, _args.flat, _args.ATOMS
        no_keywords = _args.NO_KEYWORDS
        plain = True
        sizer.blocks(True)
        # (Batches are numbered as the map's inputs, by the batches sent: a round that sends
        # none, one whose input took its time before a call could go in, takes no number.)
        number = 0
        while True:
            # A block's arguments (a tuple per call), or a batch's (args, kwargs) pairs.
            batch: list = []
            failure = None  # a call's own (the calls after it are not sent)
            w = None
            # A batch takes calls until it is full or the input has taken TARGET seconds: a
            # slow input sends what it gave so far.
            start = time.perf_counter()
            closed = False
            if plain and not carry and ended is None and not done:
                # Blocks, the common case of quick calls: their calls taken in a tight loop,
                # up to 16 at a time, as many as the input's pace so far leaves time for.
                # (Any call that is not all atoms goes back to be taken below.)
                size, step = sizer.size, 1
                raw: list = []  # (one argument per call: the items themselves)
                append = batch.append if items is None else raw.append
                try:
                    while not carry and not done and len(batch) + len(raw) < size:
                        step = min(step, size - len(batch) - len(raw))
                        if items is None:
                            for call in itertools.islice(calls, step):
                                args = call[0]
                                if call[1] or not (atoms(map(type, args)) or flat(args)):
                                    carry.append(call)
                                    break
                                append(args)
                                step -= 1
                            else:
                                done = step > 0
                        else:
                            for item in itertools.islice(items, step):
                                kind = type(item)
                                if kind not in kinds and not (
                                    kind is tuple and atoms(map(type, item))
                                ):
                                    carry.append(((item,), no_keywords))
                                    break
                                append(item)
                                step -= 1
                            else:
                                done = step > 0
                        spent = time.perf_counter() - start
                        if spent > sizer.TARGET:
                            closed = True
                            break
                        # (The calls the time left would take at the pace so far.)
                        pace = (len(batch) + len(raw)) / max(spent, 1e-9)
                        step = min(16, max(1, int((sizer.TARGET - spent) * pace)))
                except (KeyboardInterrupt, SystemExit):
                    raise  # (at once: the map ends, what it took with it)
                except BaseException as e:
                    ended = e
                if raw:
                    batch.extend(zip(raw))  # (each item as its call's arguments)
                raw = []
                taken += len(batch) + len(carry)
            while len(batch) < sizer.size and not closed:
                if carry:
                    call = carry.popleft()
                elif ended is not None or done:
                    break
                else:
                    if w is not None and snapshot:
                        # The calls in the batch keep their arrays as they are now, whatever
                        # the input does to its buffers when it makes the next call (a batch
                        # that goes now, one large call say, copies nothing here).
                        w.own_arrays()
                    try:
                        call = next(calls)
                    except StopIteration:
                        done = True
                        break
                    except (KeyboardInterrupt, SystemExit):
                        raise  # (at once: the map ends, what it took with it)
                    except BaseException as e:
                        ended = e
                        break
                    taken += 1
                if plain:
                    if not call[1] and (atoms(map(type, call[0])) or flat(call[0])):
                        batch.append(call[0])
                        closed = time.perf_counter() - start > sizer.TARGET
                        continue
                    plain = False
                    sizer.blocks(False)
                    if batch:
                        carry.appendleft(call)  # (the next batch's first, on its own)
                        break
                if w is None:
                    w = _args.Writer(self._bundle_bytes)
                try:
                    # (The first call may take the whole slot but the trailer; room for it
                    # is kept after that.)
                    size = w.add(call, _args._ROOM_TRAILER if batch else 0)
                except Exception as e:  # (it does not pickle, or its pickling failed)
                    failure = e
                    if isinstance(e, TypeError):
                        index = taken - 1 - len(carry)
                        failure = TypeError(f"input {index} of this map: {e}")
                        failure.__cause__ = e
                    break
                if size is not None:
                    if not batch:
                        failure = self._too_large(size)
                        break
                    carry.appendleft(call)  # the next batch's first
                    break
                batch.append(call)
                closed = time.perf_counter() - start > sizer.TARGET
            block = w is None
            if batch and block:
                # A block; halved until it fits (the sizer learns the bytes per call from
                # it, so this is rare).
                while True:
                    w, size = _args.calls_block(number, batch, self._bundle_bytes)
                    if w is not None:
                        break
                    if len(batch) == 1:
                        raise self._too_large(size)
                    sizer.record_bytes(size, len(batch))
                    half = len(batch) // 2
                    carry.extendleft((args, no_keywords) for args in reversed(batch[half:]))
                    batch = batch[:half]
            elif batch:
                size = w.finish_calls(number)
                if size is not None:  # (one call, and no room left for the trailer)
                    raise self._too_large(size)
            if batch:
                sent[number] = (block, batch)
                sizer.record_bytes(w.nbytes, len(batch))
                yield w  # (written by the pool straight into its slot)
                number += 1
            w = None
            if failure is not None:
                raise failure
            if not carry and (ended is not None or not batch):
                if ended is not None:
                    raise ended
                return

    def as_completed(
        self, futures: Iterable[Future], timeout: float | None = None
    ) -> Iterator[Future]:
        """Yields ``futures`` of this pool as they complete, receiving results in this thread
        meanwhile (``concurrent.futures.as_completed`` works too; this one receives at once,
        without waiting for the pool's own thread). Raises
        ``concurrent.futures.TimeoutError`` past ``timeout``, and ``ValueError`` at the first
        step for a future of another pool (this one would never complete it).
        """
        pending = set(futures)
        others = [f for f in pending if getattr(f, "_pool", None) is not self]
        if others:
            raise ValueError(
                f"{len(others)} of these futures belong to another pool (or none): "
                f"wait on them with their own pool's as_completed"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending:
            done = {f for f in pending if concurrent.futures.Future.done(f)}
            yield from done
            pending -= done
            if not pending:
                return
            wait = _WAIT
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise concurrent.futures.TimeoutError(f"{len(pending)} futures not done")
            # (As `_wait_for`; not across the yield, where the caller may wait elsewhere.)
            urgent = self._driver.enter()
            try:
                self._pump_open(wait, list(pending), urgent)
            except _Closing:
                for f in list(pending):  # (closed meanwhile: each pending one fails)
                    self._closed(f, deadline)
            finally:
                self._driver.leave()

    def apply(self, fn: Callable | Op, args: Iterable[Any] = (), kwds: dict | None = None) -> Any:
        """``fn(*args, **kwds)`` in a worker, waiting for its result, as
        ``multiprocessing.Pool.apply``: ``submit(fn, *args, **kwds).result()``."""
        return self.submit(fn, *args, **(kwds or {})).result()

    def apply_async(
        self,
        fn: Callable | Op,
        args: Iterable[Any] = (),
        kwds: dict | None = None,
        callback: Callable[[Any], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> AsyncResult:
        """As ``multiprocessing.Pool.apply_async``: ``fn(*args, **kwds)`` submitted (see
        ``submit``), its result an ``AsyncResult``; ``callback`` gets the result, or
        ``error_callback`` the exception, in the pool's thread once it is there."""
        return AsyncResult(self.submit(fn, *args, **(kwds or {})), callback, error_callback)

    def map_async(
        self,
        fn: Callable | Op,
        iterable: Iterable[Any],
        chunksize: int | None = None,
        callback: Callable[[list], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> AsyncResult:
        """As ``multiprocessing.Pool.map_async``: the list of ``map(fn, iterable)``, made by
        a thread of its own; an ``AsyncResult``."""
        return self._list_async(self.map, fn, iterable, chunksize, callback, error_callback)

    def starmap_async(
        self,
        fn: Callable,
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        callback: Callable[[list], Any] | None = None,
        error_callback: Callable[[BaseException], Any] | None = None,
    ) -> AsyncResult:
        """As ``multiprocessing.Pool.starmap_async``: the list of ``starmap(fn, iterable)``,
        made by a thread of its own; an ``AsyncResult``."""
        return self._list_async(self.starmap, fn, iterable, chunksize, callback, error_callback)

    def _list_async(self, how, fn, iterable, chunksize, callback, error_callback) -> AsyncResult:
        self._live()  # (a closed pool raises here, not in the thread)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()
        self._lists.add(fut)  # (close() waits for it, as multiprocessing's close/join do)

        def run() -> None:
            try:
                fut.set_result(list(how(fn, iterable, chunksize=chunksize)))
            except BaseException as e:  # noqa: BLE001 - it goes to the AsyncResult
                fut.set_exception(e)
            finally:
                self._lists.discard(fut)

        threading.Thread(target=run, name="mk1-map-async", daemon=True).start()
        return AsyncResult(fut, callback, error_callback)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """As ``concurrent.futures.Executor.shutdown``: ``close()``, which waits for what was
        submitted; with ``cancel_futures=True``, the futures whose calls no worker has yet are
        cancelled first (see ``Future.cancel``); with ``wait=False``, the closing goes on in a
        thread of its own and this returns at once. As with ``ProcessPoolExecutor``, what was
        submitted still runs to its end when the program ends meanwhile: the interpreter waits
        for that thread before it exits."""
        if cancel_futures and not self._closing():
            try:
                cancelled = self._live().cancel_waiting()
            except ValueError:  # (closed meanwhile: the closing completes them)
                cancelled = []
            for fut in cancelled:
                fut._cancelled_here()
        if wait:
            self.close()
        else:
            # (Not a daemon: one would be dropped at exit, and the pool's finalizer would
            # then kill the tasks still running.)
            self._close_begun = True
            threading.Thread(target=self.close, name="mk1-shutdown").start()

    def map(
        self,
        fn: Callable | Op,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        zero_copy: bool = False,
        progress: bool = False,
        timeout: float | None = None,
    ) -> MapIterator:
        """``fn(a)`` for every array, in input order, lazily: at most ``slots`` arrays are in
        flight, so any number of arrays runs in bounded memory. Results that come back before
        a slower one ahead of them wait for it as copies, up to 4096 arrays and 64 MiB of
        inputs and results ahead of it, so the other workers go on meanwhile.

        With several iterables, ``fn(a, b, ...)`` for their items taken together (stopping
        at the shortest, as the built-in ``map``); and when the first item of a single
        iterable is not an array mk1 carries (a path, a number, a tuple...), ``fn(item)``
        for every item. (In a map whose first item is such an array, a later item that is not
        one runs as a call of its own.) Those run as calls (see ``submit``): arrays in the
        arguments and results travel through shared memory, the rest is pickled, and each
        result is what ``fn`` returned. Quick calls go several to a slot (batches of up to 64,
        sized to about 2 ms of a worker's time and to fit a slot; one to a slot under a
        ``timeout``); each is pickled on its own, so calls share no object, and each fails
        alone. A call's arguments are sent as they were when it was taken from the
        iterables, so a generator may refill one buffer for the next call (its arrays are
        copied before the next call is taken, when its batch is not sent first); a call run
        again on its own after its batch's worker died is pickled again from its arguments
        as they are then, as ``multiprocessing`` would. (Calls whose arguments are numbers,
        strings, bytes, None or tuples of them, which cannot change, go up to 1024 to a batch
        in one pickle, and their results too while each is such an object.) A call runs twice only when its batch's worker died
        (each of its calls then runs again on its own, its run in the batch counted as one
        of its ``1 + max_retries``: see ``Pool``) or when its result did not fit what the
        calls before it left of the slot (a worker stops making a batch's calls before its
        results fill the slot, but a result can be larger than those before it).

        ``fn`` is a module-level function (of an importable module or of the main script), or
        with cloudpickle installed any callable; or an ``mk1.ops`` op (no Python in the
        workers). It gets a read-only view of its input in shared memory and returns its
        result (see ``submit``), or, when it takes a required ``out`` argument, writes its
        result there (same dtype and shape as the input) and returns None: zero-copy both
        ways.

        With ``zero_copy=True`` each result of 64 KiB or more is a read-only array lent from
        shared memory: its slot goes back when the array (and every view of it) is gone, so
        drop results as you go (and behind a slow array, the map waits once ``slots`` results
        wait for it). Smaller results come as read-only copies (cheaper than a view, and they
        hold no slot). Otherwise results are new arrays.

        The first failed array raises its exception when the iteration reaches it (see
        ``submit``) and ends the iteration, as ``concurrent.futures``' ``map`` does (``imap``
        goes on after it, as ``multiprocessing``'s does): arrays
        still in flight are dropped and inputs not yet taken are not run; the pool keeps
        working. An input iterable that raises does so after the arrays taken before it (in
        either order). Closing the pool while a map runs makes its next step raise
        ``ValueError``. ``progress=True`` shows a progress bar (tqdm when
        installed).

        ``chunksize``: the most calls a batch carries (mk1 sizes batches by itself; this is
        ``multiprocessing``'s argument, also taken as a last positional int,
        ``map(fn, items, 64)``, as ``multiprocessing.Pool.map`` takes it).

        ``timeout`` (seconds, as ``concurrent.futures``' ``map``): the iteration raises
        ``concurrent.futures.TimeoutError`` when a result has not come within ``timeout`` of
        its start (the map starts its work when first iterated, where ``concurrent.futures``
        counts from the call, having submitted every call), and ends: the calls no worker has
        yet are not run, those running finish unread.

        The iterator returned (a ``MapIterator``) also has ``next(timeout)``, as
        ``multiprocessing``'s ``imap`` iterator: ``multiprocessing.TimeoutError`` when no
        result came within ``timeout`` seconds, and the map goes on.
        """
        return self._map(
            fn, iterables, True, zero_copy, progress, chunksize=chunksize, timeout=timeout
        )

    def imap(
        self,
        fn: Callable | Op,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        zero_copy: bool = False,
        progress: bool = False,
        timeout: float | None = None,
    ) -> MapIterator:
        """As ``map``, except that an array or call that failed raises its exception at its
        turn and the iteration goes on (as ``multiprocessing``'s ``imap``; ``map`` ends there,
        as ``concurrent.futures``' does). The input iterable's own failure, and the map's
        ``timeout``, still end it."""
        return self._map(
            fn, iterables, True, zero_copy, progress, chunksize=chunksize, timeout=timeout,
            go_on=True,
        )

    def starmap(
        self,
        fn: Callable,
        iterable: Iterable[Iterable[Any]],
        chunksize: int | None = None,
        *,
        zero_copy: bool = False,
        progress: bool = False,
    ) -> MapIterator:
        """``fn(*args)`` for every ``args`` of ``iterable``, in input order, lazily (as
        ``multiprocessing.Pool.starmap``, but an iterator): calls as ``submit`` makes them for
        several arguments. Otherwise as ``map``."""
        return self._map(fn, (iterable,), True, zero_copy, progress, True, chunksize)

    def imap_unordered(
        self,
        fn: Callable | Op,
        *iterables: Iterable[Any],
        chunksize: int | None = None,
        zero_copy: bool = False,
        progress: bool = False,
        timeout: float | None = None,
    ) -> MapIterator:
        """As ``imap``, in completion order: a failure raises its exception and the iteration
        goes on (as ``multiprocessing``'s ``imap_unordered``)."""
        return self._map(
            fn, iterables, False, zero_copy, progress, chunksize=chunksize, timeout=timeout,
            go_on=True,
        )

    def _map(
        self,
        fn,
        iterables,
        ordered,
        zero_copy,
        progress,
        star=False,
        chunksize=None,
        timeout=None,
        go_on=False,
    ):
        if timeout is not None:
            timeout = float(timeout)
        if len(iterables) > 1 and isinstance(iterables[-1], (int, np.integer)):
            # (multiprocessing's `map(fn, items, chunksize)`: an int is never an iterable.)
            if chunksize is not None:
                raise TypeError("chunksize given twice (as the last positional argument too)")
            *iterables, chunksize = iterables
        if chunksize is not None:
            chunksize = operator.index(chunksize)
            if chunksize < 1:
                raise ValueError(f"chunksize must be at least 1, not {chunksize}")
        if not iterables:
            raise TypeError("map needs at least one iterable")
        if zero_copy and self._slots < 2:
            # The loop variable still holds the last result (and its slot) while the next
            # one is fetched.
            raise ValueError("zero_copy=True needs slots >= 2 (mk1.Pool(slots=...))")
        # Fails here, before any input is taken. (One iterable: whether its items are arrays
        # or call arguments is known at its first item.)
        calls = None
        if star:
            calls = ((tuple(args), _args.NO_KEYWORDS) for args in iterables[0])
        elif len(iterables) > 1:
            calls = zip(zip(*iterables), itertools.repeat(_args.NO_KEYWORDS))
        if calls is not None:
            task = self._task(fn, _args.Batch)
        else:
            task = self._task(fn, None if isinstance(fn, Op) else _args.Auto)
        bar = None
        if progress:
            sized = all(hasattr(i, "__len__") for i in iterables)
            bar = _progress(min(len(i) for i in iterables) if sized else None)
        inputs = iter(iterables[0]) if calls is None else calls
        # Iterating a list, tuple or range runs no code of the caller's, which could refill an
        # array that a call taken before holds: only other inputs cost a copy per array.
        quiet = all(type(i) in (list, tuple, range) for i in iterables)
        step = _Step()
        return MapIterator(
            self._map_gen(
                fn, task, inputs, calls is not None, ordered, zero_copy, bar, chunksize, timeout,
                step, go_on, not quiet,
            ),
            step,
        )

    def _map_gen(
        self,
        fn,
        task,
        inputs,
        batched,
        ordered,
        zero_copy,
        bar,
        chunksize,
        timeout,
        step,
        go_on,
        snapshot=True,
    ):
        # (With `go_on`, a failed array or call is yielded as `_Failed`, which `MapIterator`
        # raises, and the generator goes on.)
        # (Yields `_STEP_PASSED`, and takes up where it was at the next step, when a wait passes
        # the deadline `MapIterator.next` set for this step: see `wait`.)
        # (From the first step on: the map starts its work there, where `concurrent.futures`'
        # submits every call at once and counts from the call.)
        deadline = None if timeout is None else time.monotonic() + timeout
        items = None
        if not batched and not isinstance(fn, Op):
            # The first item says whether this map carries arrays or makes calls.
            first = next(inputs, _END)
            if first is _END:
                if bar is not None:
                    bar.close()
                return
            a = _carried(first)
            if a is not None:
                # Arrays; an odd item later on is sent as a call of its own (see `_prepare`).
                inputs = itertools.chain((a,), inputs)
            else:
                batched = True
                task = self._task(fn, _args.Batch)
                # (Its calls take one argument each: blocks take the items themselves.)
                items = itertools.chain((first,), inputs)
                inputs = zip(zip(items), itertools.repeat(_args.NO_KEYWORDS))
            del first, a
        if batched:
            sizer = _BatchSizer(self._timeout is None, self._max_array_bytes, chunksize)
            sent: dict = {}
            inputs = self._batches(inputs, sizer, sent, items, snapshot)
        # Zero-copy, the result the caller holds keeps its slot: one less in flight.
        window = max(1, self._slots - 1) if zero_copy else self._slots
        # In order, results waiting for a slower one before them go on waiting out of their
        # slots, so the workers go on (see `_REORDER`): a batch's are copied out when they fill
        # the window, and arrays' results are copies from the start.
        reorder = _REORDER if ordered and not zero_copy else 0
        # (A map of calls sends bundles, written by the pool straight into their slots; a map
        # of an op takes what numpy makes an array of.)
        prepare = _as_is if batched else self._prepare
        # (An op's inputs are made arrays here; those of 0 or more than MAX_DIMS dimensions
        # go as one, and their results get their shapes back below.)
        op_shapes: dict = {}
        is_op = isinstance(fn, Op)
        if is_op:
            inputs, prepare = _op_inputs(inputs, op_shapes), _as_is
        # A batch's results are read straight from shared memory (lent), and unless zero-copy
        # each array is copied out on its own as it is read, so that a result kept does not
        # keep the whole batch's bytes alive; the slot goes home once they are read.
        lend = zero_copy or batched
        it = self._live().map_iter(
            inputs,
            task[0],
            task[1],
            ordered,
            lend,
            window,
            reorder,
            prepare,
            self._route,
            _left(deadline),
            # (A batch of calls is never redone whole: its calls are, each on its own, see
            # below; each call's redos then add up to max_retries.)
            0 if batched else None,
            # Zero-copy, a small result is copied all the same (read-only, as a lent one):
            # a copy of it costs less than a view, and it holds no slot.
            _LEND_MIN if zero_copy else 0,
        )

        def waited(fut: Future):
            """``fut``'s result (raises its exception), for ``yield from``: within the map's
            timeout, and yielding ``_STEP_PASSED`` each time the step's passes first."""
            while True:
                for_step, for_map = step.left(), _left(deadline)
                map_first = for_step is None or (for_map is not None and for_map <= for_step)
                try:
                    return fut.result(for_map if map_first else for_step)
                except KeyboardInterrupt as e:
                    # (The future waits on: the caller may take it up again.)
                    interrupted = _Interrupted(e)
                except concurrent.futures.TimeoutError:
                    # (The base class's `done`: this one's would receive, and the result may
                    # have come just now.)
                    if concurrent.futures.Future.done(fut):
                        return fut.result(0)  # (its result, or its own exception)
                    if map_first:
                        raise  # (the map's timeout: it ends the map)
                    interrupted = None
                yield _STEP_PASSED if interrupted is None else interrupted
                interrupted = None

        def failed_or(wait):
            """What ``yield from wait`` gives; with ``go_on``, its exception as ``_Failed``
            (but for the map's timeout, which ends the map)."""
            if not go_on:
                return (yield from wait)
            try:
                return (yield from wait)
            except concurrent.futures.TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                return _Failed(sys.exc_info()[1])
            except Exception as e:  # noqa: BLE001 - the call's failure, raised at its turn
                return _Failed(e)

        try:
            while True:
                stepped = None
                try:
                    # (Not deferred as `_pump` defers: the step also takes the caller's input
                    # and waits, without holding the pool, and a callback may feed that input.)
                    if step.deadline is None:
                        stepped = next(it)
                    else:
                        stepped = it.next_within(step.left())
                        if stepped is None:
                            yield _STEP_PASSED
                            continue
                except StopIteration:
                    return
                except TimeoutError as e:  # (not the same class before Python 3.11)
                    raise concurrent.futures.TimeoutError(*e.args) from None
                except ValueError:
                    # (A map inherited by a forked child: its pool is the parent's.)
                    if getattr(self, "_forked", False):
                        raise ValueError(_FORKED) from None
                    raise
                except KeyboardInterrupt as e:
                    # Ctrl-C while the map took an input or waited: what it had stays where
                    # it is (the pool keeps it), and the next call goes on from here. Or as
                    # its call returned a result: taken back, it goes out after the interrupt.
                    if stepped is None:
                        stepped = it.unclaimed()
                    interrupted = _Interrupted(e)
                    del e
                    yield interrupted
                    interrupted = None
                    if stepped is None:
                        continue
                ok, value, index = stepped
                stepped = None
                if not ok and batched:
                    pairs = _pairs(sent.pop(index, None))
                    # The batch's worker died (or hung) on one of its calls: each call runs
                    # again on its own, so that only the call that kills its worker fails.
                    again_ok = isinstance(value, (_mk1.WorkerDied, _mk1.TaskTimeout))
                    # (A lone call is redone as its batch would have been: only after a
                    # death, and while its redos last.)
                    alone = pairs is not None and len(pairs) == 1
                    if alone and (
                        isinstance(value, _mk1.TaskTimeout) or self._max_retries == 0
                    ):
                        again_ok = False
                    if again_ok and pairs:
                        it.spill_waiting()  # (lent results waiting give their slots up)
                        # (At most a slot's worth each ahead of the one waited for: each
                        # submit may wait for a slot, and the step's waits are all in
                        # `waited`.)
                        n, left = len(pairs), collections.deque(pairs)
                        again = collections.deque()
                        pairs = None
                        while True:
                            # (Sent while a slot is free; one is waited for only when none of
                            # them is out.)
                            while left:
                                fut = self._again(task, left[0], n, not again, value)
                                if fut is None:
                                    break
                                left.popleft()
                                again.append(fut)
                            if not again:
                                break
                            if bar is not None:
                                bar.update(1)
                            value = yield from failed_or(waited(again[0]))
                            again.popleft()
                            yield value
                        again = left = None
                        continue
                    # Any other failure of the batch (no workers left, say) is each of its
                    # calls' own: one error per call, in its turn, none lost.
                    for _ in range(1 if pairs is None else max(1, len(pairs))):
                        if bar is not None:
                            bar.update(1)
                        if not go_on:
                            raise _rebuild(value)
                        yield _Failed(_rebuild(value))
                    pairs = None
                    continue
                if not ok:
                    op_shapes.pop(index, None)
                    if bar is not None:
                        bar.update(1)
                    if not go_on:
                        raise _rebuild(value)
                    yield _Failed(_rebuild(value))
                    continue
                if zero_copy and value.flags.writeable:
                    # (A copy: another thread received it. Read-only all the same, as a lent
                    # result is, so that the caller sees one behaviour.)
                    value.setflags(write=False)
                if batched:
                    size = sizer.size  # (before this batch's time counts)
                    number, entries, plain, block = _batch_entries(
                        value, sizer, copy=not zero_copy
                    )
                    value = None
                    # (The batch is the map's input `index`, as Rust counted them; the number
                    # the worker wrote back only confirms it.)
                    got = sent.pop(index, None)
                    count = -1 if got is None else len(got[1])
                    if (
                        count < 0
                        or number != index
                        or count < len(entries)
                        or (count > len(entries) and not (block and entries))
                    ):
                        raise _mk1.Mk1Error("a worker sent back the results of another batch")
                    if plain and len(entries) == count:
                        # (Every call returned.)
                        got = None
                        if bar is not None:
                            bar.update(len(entries))
                        yield from entries
                        entries = None
                        continue
                    pairs, got = _pairs(got), None
                    if block:
                        # The worker stopped the block early: the calls after its results are
                        # left (AGAIN), as in a batch of pieces.
                        entries = [(_args.OK, v) for v in entries]
                        entries += [(_args.AGAIN, None)] * (count - len(entries))
                    # Calls the worker left: each on its own now, all at once (in order). (Lent
                    # results waiting for their turn give their slots up for them first: else
                    # they could hold every slot these need.)
                    left = [i for i, (kind, _) in enumerate(entries) if kind == _args.AGAIN]
                    if left:
                        it.spill_waiting()
                    # (In groups of calls sized as before this batch: the calls that made it
                    # run long are rarely all of them.)
                    # (And as the slot holds results like these: a batch stopped because its
                    # results were filling the slot.)
                    size = min(_BatchSizer.MOST, size, sizer.by_bytes())
                    again = _Left(self, task, pairs, left, size)
                    pairs = None
                    for i, (kind, value) in enumerate(entries):
                        if bar is not None:
                            bar.update(1)
                        if kind == _args.FAILED:
                            if not go_on:
                                raise _rebuild(_mk1.RemoteError(value))
                            value = _Failed(_rebuild(_mk1.RemoteError(value)))
                        elif kind != _args.OK:
                            value = yield from failed_or(again.result(i, waited))
                        yield value
                    entries = value = again = None
                    continue
                if bar is not None:
                    bar.update(1)
                if is_op:
                    shape = op_shapes.pop(index, None) if op_shapes else None
                    if shape is not None:
                        value = value.reshape(shape)
                elif value.dtype == _U8 and _args.is_bundle(value):
                    ok, value = _one_result(value)
                    if not ok:
                        if not go_on:
                            raise _rebuild(value)
                        value = _Failed(_rebuild(value))
                yield value
                value = None  # (a lent result's slot goes home with the caller's last reference)
        finally:
            del it  # (results still to come are dropped as they arrive)
            if bar is not None:
                bar.close()

    def _again(
        self,
        task: tuple,
        pair: tuple,
        died_in: int = 0,
        wait: bool = True,
        death: BaseException | None = None,
    ) -> Future | None:
        """A call of a batch that its worker left (see ``mk1._args``), submitted on its own;
        ``died_in``: the call ran already, in a batch of that many calls whose worker died
        (or hung: ``death`` says which), which counts as its first attempt. Without
        ``wait``, None (nothing sent) when no slot is free now."""
        fut = Future(self, True)
        fut.set_running_or_notify_cancel()
        retries = None
        if died_in:
            retries = max(0, self._max_retries - 1)
            fut._died_in = died_in
        a = self._calls([pair])
        try:
            if wait:
                self._submit_one(a, task, fut, retries)
            else:
                self._live().submit(a, task[0], task[1], fut, retries)
        except _mk1.Busy:
            return None
        except _mk1.NoWorkersLeft as e:
            # (The call's own error, in its turn.) A call alone in its batch is the one whose
            # worker died: that death is its error; a call of a larger batch may not be.
            if died_in == 1 and death is not None:
                fut.set_exception(_rebuild(death))
            elif died_in > 1 and death is not None:
                fut.set_exception(
                    _mk1.NoWorkersLeft(
                        f"{e}; it was in a batch of {died_in} calls whose worker died "
                        f"running one of them ({death})"
                    )
                )
            else:
                fut.set_exception(_rebuild(e))
        return fut

    def _again_group(self, task: tuple, pairs: list) -> Future:
        """Calls of a batch that its worker left, submitted together as a batch of their own
        (a block when every argument is an atom); the future's result is their entries (see
        ``mk1._args``)."""
        fut = Future(self, True)
        fut._group = True
        fut.set_running_or_notify_cancel()
        w = None
        atoms, flat = _args.ATOMS.issuperset, _args.flat
        if all(not kw and (atoms(map(type, a)) or flat(a)) for a, kw in pairs):
            w, _ = _args.calls_block(-1, [a for a, _ in pairs], self._bundle_bytes)
        # (Never redone whole: its calls are, each on its own, as a batch's.)
        try:
            self._submit_one(w or self._calls(pairs), task, fut, 0)
        except _mk1.NoWorkersLeft as e:
            fut.set_exception(e)  # (each call's error, in its turn: see `_Left.result`)
        return fut


class _Left:
    """The calls a batch's worker left (AGAIN, see ``mk1._args``), run again in groups of up
    to ``size``, each a batch of its own (whose worker stops it in turn if it runs long): a
    call left again, or one of a group whose worker died or hung, runs on its own."""

    def __init__(self, pool: Pool, task: tuple, pairs: list, left: list, size: int) -> None:
        self.pool, self.task = pool, task
        self.where: dict = {}  # a left call's index in its batch -> (its group, its place)
        self.again: dict = {}  # a left call's index -> its future, once it runs on its own
        size = max(1, size)
        for start in range(0, len(left), size):
            group = _Group([pairs[i] for i in left[start : start + size]])
            if len(group.pairs) == 1:
                group.singles = [pool._again(task, group.pairs[0])]
            else:
                group.fut = pool._again_group(task, group.pairs)
            for k, i in enumerate(left[start : start + size]):
                self.where[i] = (group, k)

    def result(self, i: int, waited: Callable[[Future], Iterator[Any]]):
        """The result of call ``i`` of the batch (raises its exception), for ``yield from``:
        ``waited(future)`` waits for a future, and yields ``_STEP_PASSED`` when the map's step
        is over first (see ``Pool._map_gen``); the next step takes up the wait."""
        group, k = self.where[i]
        if group.singles is None and group.entries is None:
            try:
                group.entries, block = yield from waited(group.fut)
            except (_mk1.WorkerDied, _mk1.TaskTimeout):
                # Only the call that kills its worker (or hangs) must fail: each on its own.
                n, death = len(group.pairs), sys.exc_info()[1]
                group.singles = [
                    self.pool._again(self.task, p, n, death=death) for p in group.pairs
                ]
            except _mk1.Mk1Error as e:
                # (The group's one error, a new one for each of its calls.)
                raise _rebuild(e) from None
            group.fut = None
            if group.entries is not None:
                # (A block the worker stopped early leaves the calls after its results.)
                short = len(group.pairs) - len(group.entries)
                if short < 0 or (short > 0 and not (block and group.entries)):
                    raise _mk1.Mk1Error("a worker sent back the results of another batch")
                group.entries += [(_args.AGAIN, None)] * short
        if group.singles is not None:
            value = yield from waited(group.singles[k])
        else:
            kind, value = group.entries[k]
            if kind == _args.FAILED:
                raise _rebuild(_mk1.RemoteError(value))
            if kind != _args.OK:
                fut = self.again.get(i)
                if fut is None:
                    fut = self.again[i] = self.pool._again(self.task, group.pairs[k])
                value = yield from waited(fut)
                del self.again[i]
            group.entries[k] = None
        del self.where[i]
        return value


def _left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (``time.monotonic()``; 0 once past), None for none."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class _Group:
    """A group of ``_Left``: its calls, and its future or, once they run on their own, its
    calls' futures."""

    __slots__ = ("pairs", "fut", "entries", "singles")

    def __init__(self, pairs: list) -> None:
        self.pairs = pairs
        self.fut: Future | None = None
        self.entries: list | None = None
        self.singles: list | None = None


class _BatchSizer:
    """How many calls a map's next slot carries: enough that the costs of a slot (a round
    trip, a bundle each way) are shared by many quick calls, few enough that a slot takes about
    ``TARGET`` seconds of a worker (so that the work spreads over the workers and results come
    steadily) and that the calls and their results fit a slot. Starts at one call, then follows
    the worker's own time per call and the bytes per call each way. One call per slot always
    when the pool has a ``timeout`` (it is per slot: it must count one call). A worker also
    stops a batch that runs long, or whose results fill the slot, and the caller runs the calls
    it left one to a slot (see ``mk1._args``)."""

    TARGET = 0.002
    MOST = 64
    # Blocks (calls and results all atoms, see `mk1._args`) cost one pickle per batch, not
    # per call: they may carry more calls (while the last results were a block too: results
    # pickled one by one keep room in the slot for every call after them).
    MOST_BLOCK = 1024

    def __init__(self, enabled: bool, slot_bytes: int, cap: int | None = None) -> None:
        self.enabled = enabled
        self.slot = slot_bytes
        self.cap = cap  # the caller's chunksize: the most, whatever the rest says
        self.most = self.MOST
        self.blocks_out = True  # the last results were a block
        self.blocks_in = False  # the calls go as blocks
        self.size = 1
        self.per_call: float | None = None
        self.bytes_in = 0.0  # per call, in the last batch sent
        self.bytes_out = 0.0  # per call, in the last results

    def record(self, seconds: float, calls: int) -> None:
        """A worker made ``calls`` calls in ``seconds``."""
        if calls <= 0 or not 0.0 <= seconds < 1e6:
            return
        t = seconds / calls
        self.per_call = t if self.per_call is None else 0.7 * self.per_call + 0.3 * t
        self._resize()

    def record_bytes(self, nbytes: int, calls: int) -> None:
        """A batch of ``calls`` calls took ``nbytes``."""
        self.bytes_in = nbytes / max(calls, 1)
        self._resize()

    def record_results(self, nbytes: int, calls: int, block: bool = False) -> None:
        """The results of ``calls`` calls took ``nbytes`` (as a ``block``, or not)."""
        self.bytes_out = nbytes / max(calls, 1)
        self.blocks_out = block
        self._most()

    def by_bytes(self) -> int:
        """The calls whose arguments and results fit a slot, by the bytes per call so far.
        (Three quarters of the slot: calls and results vary in size.)"""
        return int(max(1, 0.75 * self.slot / max(self.bytes_in, self.bytes_out, 1.0)))

    def _resize(self) -> None:
        if not self.enabled or self.per_call is None:
            return
        by_time = self.TARGET / max(self.per_call, 1e-9)
        most = self.most if self.cap is None else min(self.most, self.cap)
        self.size = int(max(1, min(most, by_time, self.by_bytes())))

    def blocks(self, on: bool) -> None:
        """Whether the calls go as blocks (see ``MOST_BLOCK``)."""
        self.blocks_in = on
        self._most()

    def _most(self) -> None:
        both = self.blocks_in and self.blocks_out
        self.most = self.MOST_BLOCK if both else self.MOST
        self._resize()


def _counted_in_batch(e: BaseException, calls: int) -> BaseException:
    """``WorkerDied`` ``e`` of a call that ran once before in a batch of ``calls`` calls whose
    worker died, with that first attempt counted in."""

    def more(m: re.Match) -> str:
        where = "" if calls == 1 else f", the first in a batch of {calls} calls"
        return f"after {int(m.group(1)) + 1} attempt(s){where}"

    text, n = re.subn(r"after (\d+) attempt\(s\)", more, str(e), count=1)
    return type(e)(text if n else f"{e} (and once before, in a batch of {calls} calls)")


def _pairs(sent: tuple | None) -> list | None:
    """The ``(args, kwargs)`` of each call of a batch as ``_batches`` keeps them in ``sent``
    (None for none)."""
    if sent is None:
        return None
    block, calls = sent
    return [(args, _args.NO_KEYWORDS) for args in calls] if block else calls


def _batch_entries(
    payload: np.ndarray, sizer: _BatchSizer, copy: bool = False
) -> tuple[int, list, bool, bool]:
    """The batch number and the entries of a results bundle, whether they are the results
    themselves, and whether it is a block (see ``mk1._args.read_results``; ``copy``: arrays
    of their own, not views of ``payload``), the worker's time and the bytes recorded in
    ``sizer``; ``Mk1Error`` when it is not what a worker sends."""
    try:
        number, seconds, entries, block, plain = _args.read_results(payload, copy)
    except Exception as e:  # garbled, or of a type this process cannot import
        raise _mk1.Mk1Error(f"the results of a batch cannot be read here: {e!r}") from e
    ran = len(entries) if plain else sum(1 for kind, _ in entries if kind != _args.AGAIN)
    sizer.record(seconds, ran)
    sizer.record_results(payload.nbytes, len(entries), block)
    return number, entries, plain, block


def _read_results(payload: np.ndarray, what: str) -> tuple[bool, Any]:
    """``(True, (entries, plain, block))`` of a results bundle (see
    ``mk1._args.read_results``), or ``(False, error)`` when the ``what`` cannot be read
    here."""
    try:
        # (Arrays of a call's result that are small against its bundle are copies: a view
        # kept would hold the whole bundle, as a dict's small array held its large one's.)
        _, _, entries, block, plain = _args.read_results(payload, own_small=True)
    except Exception as e:  # garbled, or of a type this process cannot import
        error = _mk1.Mk1Error(f"the {what} cannot be read here: {e!r}")
        error.__cause__ = e
        return False, error
    return True, (entries, plain, block)


def _group_entries(payload: np.ndarray) -> tuple[bool, Any]:
    """``(True, (entries, block))`` of a group's results bundle (see ``_Left``), or
    ``(False, error)`` when it cannot be read here."""
    ok, got = _read_results(payload, "results of a batch")
    if not ok:
        return ok, got
    entries, plain, block = got
    return True, ([(_args.OK, v) for v in entries] if plain else entries, block)


def _one_result(payload: np.ndarray) -> tuple[bool, Any]:
    """``(True, value)`` of one call from its results bundle, or ``(False, error)``: the
    function's (for ``_rebuild``), or an ``Mk1Error`` when it cannot be read here."""
    ok, got = _read_results(payload, "result of a call")
    if not ok:
        return ok, got
    entries, plain, _ = got
    if len(entries) == 1 and plain:
        return True, entries[0]
    if len(entries) != 1 or entries[0][0] == _args.AGAIN:
        return False, _mk1.Mk1Error("a worker could not answer this call (see its slot size)")
    kind, value = entries[0]
    if kind == _args.FAILED:
        return False, _mk1.RemoteError(value)
    return True, value


_END = object()  # the end of an iterator
_U8 = np.dtype(np.uint8)


def _progress(total: int | None):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, unit="item")
    except ImportError:
        return _TextBar(total)


class _TextBar:
    """A progress line on stderr when tqdm is not installed."""

    def __init__(self, total: int | None) -> None:
        self.total, self.n, self.last = total, 0, 0.0

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last > 0.2:
            self.last = now
            of = f"/{self.total}" if self.total is not None else ""
            print(f"\rmk1: {self.n}{of} items", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        of = f"/{self.total}" if self.total is not None else ""
        print(f"\rmk1: {self.n}{of} items", file=sys.stderr, flush=True)

