"""The worker side of a Python pool: what runs in each worker process.

A pool starts ``python -c CODE`` for every worker, CODE loading the caller's own mk1 (see
``mk1._pool._WORKER_MAIN``) and calling ``_main``, which rebuilds the caller's import context
(``sys.path`` and, as ``multiprocessing``'s spawn start method does, the main module under the
name ``__mp_main__``) and enters mk1's worker loop, which calls ``_init`` once and ``_run`` for
every array.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import pickle
import runpy
import signal
import sys
import time
import traceback
import types

import numpy as np

from . import _args

BOOT_ENV = "MK1_PY_BOOT"
EXC_MARKER = "\n--mk1-pickled-exception--\n"

# This process is a worker of a pool (its pools are refused), and the pool's pickled
# initializer with its arguments (empty: none).
IN_WORKER = False
_init_blob = b""
_CODES: dict = {}  # numpy dtype -> mk1's dtype code (native byte order only)
_U8 = np.dtype(np.uint8)
_worker_id: int | None = None
_workers: int | None = None
_state: dict = {}
# The pool's `max_tasks_per_child` (None: no limit), and the calls this process has made.
_max_calls: int | None = None
_calls = 0


def _prepare_main(boot: dict) -> None:
    """Makes the caller's main module importable as ``__main__`` (functions defined there are
    pickled by reference to it). Like multiprocessing: a main run with ``-m pkg`` is re-imported
    by name, a script is re-run by path under ``__name__ == "__mp_main__"`` (so code behind
    ``if __name__ == "__main__":`` does not run again)."""
    name = boot.get("main_name")
    path = boot.get("main_path")
    if name and name != "__main__" and not name.endswith(".__main__"):
        main_globals = runpy.run_module(name, run_name="__mp_main__", alter_sys=True)
    elif path and os.path.exists(path) and not path.endswith(("ipython", "<stdin>")):
        main_globals = runpy.run_path(path, run_name="__mp_main__")
    else:
        return
    main = types.ModuleType("__mp_main__")
    main.__dict__.update(main_globals)
    sys.modules["__main__"] = sys.modules["__mp_main__"] = main


def _main(start: dict) -> None:
    """Entry point of a worker process. ``start`` (taken over, emptied) holds ``boot`` and
    ``init`` (the pickled initializer and its arguments, or empty) as the pool wrote them (see
    ``mk1._pool._WORKER_MAIN``), and ``spec``, the worker's ``MK1_WORKER``, already out of the
    environment. (This never returns: it keeps no reference to ``init`` of its own.)"""
    global IN_WORKER, _init_blob
    IN_WORKER, _init_blob = True, start.pop("init")
    boot, spec = start.pop("boot"), start.pop("spec")
    if "path" in boot:
        sys.path[:] = boot["path"]
    if "argv" in boot:
        sys.argv[:] = boot["argv"]
    if "nonce" in boot:
        _args.NONCE = bytes.fromhex(boot["nonce"])
    global _max_calls
    _max_calls = boot.get("max_calls")
    try:
        _prepare_main(boot)
    except Exception as e:
        # One write, so that the tracebacks of workers starting together (they share the
        # caller's stderr) do not interleave line by line in the pool's start error.
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        os.write(2, text.encode("utf-8", "replace"))
        os._exit(1)
    from mk1 import _mk1

    _mk1.serve(spec)  # never returns in a worker
    sys.exit("mk1._worker: this process was not started by an mk1 pool")


def _init(worker: int, workers: int, codes: dict) -> None:
    """Runs once per worker, before it reports ready: the pool's initializer. ``codes`` maps
    each dtype name mk1 carries to its code."""
    global _worker_id, _workers, _init_blob
    _worker_id, _workers = worker, workers
    _CODES.update({np.dtype(name): code for name, code in codes.items()})
    # Job-control signals do nothing here (the pool acts on them), as mk1's worker loop set
    # them at the C level, unknown to Python; said again through `signal`, so that
    # `signal.getsignal` tells the truth, and a function that saves and restores a handler
    # puts this one back (not SIG_IGN, which every program it runs would inherit).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _absorb)
    # Output written with print() shows at once (the worker's stdout is the caller's), a line
    # in one write, so that the lines of workers printing at once do not mix mid-line.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True, write_through=False)
        except (AttributeError, ValueError):
            pass
    blob, _init_blob = _init_blob, b""
    if blob:
        initializer, initargs = pickle.loads(blob)
        del blob
        initializer(*initargs)


def _wants_out(fn) -> bool:
    """Whether ``fn`` writes its result into ``out``: only a *required* ``out`` parameter says
    so (numpy's own functions, whose ``out=None`` has other rules, are called plainly)."""
    try:
        p = inspect.signature(fn).parameters.get("out")
    except (TypeError, ValueError):
        return False
    return p is not None and p.default is inspect.Parameter.empty


def _load(context: bytes):
    """The task's function from its pickled bytes, and whether it takes ``out``."""
    fn = pickle.loads(context)
    return fn, _wants_out(fn.fn if type(fn) is _args.Auto else fn)


_READ_ONLY_NOTE = (
    "mk1: the arrays a function gets are read-only views of shared memory; copy one to change "
    "it (np.array(x)), or take a required `out` argument to write a result in place"
)


def _encode_error(e: BaseException, in_place: bool = False) -> str:
    if (
        not in_place
        and isinstance(e, ValueError)
        and "read-only" in str(e)
        and hasattr(e, "add_note")
    ):
        e.add_note(_READ_ONLY_NOTE)
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        blob = base64.b64encode(pickle.dumps(e)).decode("ascii")
    except Exception:  # an exception that does not pickle travels as text only
        return text
    return text + EXC_MARKER + blob


def _error_text(encoded: str, room: int) -> str:
    """A failure as ``_encode_error`` encoded it, cut to fit ``room`` bytes: its traceback cut
    in the middle (its end, with the exception's message, kept), and the exception itself,
    when it can be, as one of its type with its long messages cut (so that the caller still
    gets that type); else without it (a ``RemoteError`` for the caller)."""
    text, _, blob = encoded.partition(EXC_MARKER)
    # (Pickled, a character takes up to 4 bytes; a hundred more for the entry around it.)
    most = max(200, (room - 100) // 4)
    short = _shortened(blob, most // 2) if blob else None
    if short is not None:
        most -= len(short) + len(EXC_MARKER)
    if len(text) > most:
        cut = "\n[... mk1: the middle of this traceback was cut to fit the slot ...]\n"
        keep = max(0, (most - len(cut)) // 2)
        text = text[:keep] + cut + text[len(text) - keep :]
    return text if short is None else text + EXC_MARKER + short


def _shortened(blob: str, most: int) -> str | None:
    """The exception pickled in ``blob`` (as ``_encode_error`` made it) made again with each
    of its arguments, when all are strings or bytes, cut to its start and end, pickled in at
    most ``most`` characters; None when it cannot be (other arguments, attributes of its own,
    a type that is not made from its arguments, a pickle still too long)."""
    try:
        e = pickle.loads(base64.b64decode(blob))
        args = e.args
        if not args or not all(type(a) in (str, bytes) for a in args):
            return None
        if set(vars(e)) - {"__notes__"}:
            return None  # (state of its own besides its arguments, which would be lost)
        keep = max(64, most // (4 * len(args)))
        cut = []
        for a in args:
            if len(a) > 2 * keep:
                note = f"[... mk1: {len(a) - 2 * keep} characters cut to fit the slot ...]"
                middle = note if type(a) is str else note.encode()
                a = a[:keep] + middle + a[len(a) - keep :]
            cut.append(a)
        again = type(e)(*cut)
        if type(again) is not type(e) or again.args != tuple(cut):
            return None
        if getattr(e, "__notes__", None):
            again.__notes__ = [n[:keep] for n in e.__notes__ if type(n) is str][:8]
        short = base64.b64encode(pickle.dumps(again)).decode("ascii")
    except Exception:  # noqa: BLE001 - then it goes as text alone, as before
        return None
    return short if len(short) <= most else None


_PID = os.getpid()  # this worker's: a child its function forks has another
_forked = False  # set in a child made by os.fork (a flag is cheaper than a getpid per call)


def _mark_forked() -> None:
    global _forked
    _forked = True
    if IN_WORKER:
        _default_job_control_signals()


def _absorb(signum, frame) -> None:
    """The worker's handler of SIGINT, SIGTERM and SIGHUP: nothing (see ``_init``)."""


def _default_job_control_signals() -> None:
    """In a child that a worker's function forked (a ``multiprocessing`` pool's worker, say):
    Ctrl-C, SIGTERM and SIGHUP act as in any Python process again. The worker itself lets them
    do nothing (they are the pool's to act on: see mk1's worker); programs it starts with exec
    get their defaults back by themselves."""
    for sig, handler in (
        (signal.SIGINT, signal.default_int_handler),
        (signal.SIGTERM, signal.SIG_DFL),
        (signal.SIGHUP, signal.SIG_DFL),
    ):
        try:
            signal.signal(sig, handler)
        except (OSError, ValueError):  # (not the main thread: the child keeps the worker's)
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked)


def _leave_if_forked(sure: bool = False) -> None:
    """In a child that the function forked and that returned here: leave at once, before
    writing the result (the worker's own copy of it answers; the child has no access to the
    slots anyway, see mk1's worker). ``sure``: also for a child forked other than by
    ``os.fork`` (asks the kernel for the pid)."""
    if _forked or (sure and os.getpid() != _PID):
        os._exit(0)


def _run(fn, wants_out, inp, dtype, shape, out, in_place):
    """Runs ``fn`` on one array; returns ``(dtype code, shape)`` of what it wrote at the start
    of ``out``, or ``(None, message)`` when it raised. With ``max_tasks_per_child``, this
    process retires once the task is answered when it has made that many calls."""
    if _max_calls is None:
        return _run_task(fn, wants_out, inp, dtype, shape, out, in_place)
    try:
        return _run_task(fn, wants_out, inp, dtype, shape, out, in_place)
    finally:
        if _calls >= _max_calls:
            from mk1 import _mk1

            _mk1.retire_after_this_task()


def _count(calls: int) -> None:
    """Counts calls this process made (see ``_run``)."""
    global _calls
    _calls += calls


def _budget() -> float:
    """Calls this process may still make (infinite without ``max_tasks_per_child``)."""
    return float("inf") if _max_calls is None else _max_calls - _calls


def _run_task(fn, wants_out, inp, dtype, shape, out, in_place):
    if type(fn) is _args.Batch:
        return _run_batch(fn.fn, inp, dtype, shape, out, in_place)
    if type(fn) is _args.Auto:
        fn = fn.fn
        if len(shape) == 1 and dtype == _U8 and _args.is_bundle(np.ndarray(shape, dtype, inp)):
            return _run_batch(fn, inp, dtype, shape, out, in_place)
    _count(1)  # (one call, whether it returns or raises)
    try:
        x = np.ndarray(shape, dtype, inp)  # read-only out of place, as its buffer is
        if wants_out:
            if in_place:
                o = x
            else:
                # Zeroed: what the function leaves unwritten must not be another task's
                # result left in the slot (the cost is one pass of writes over the output).
                o = np.ndarray(shape, dtype, out)
                o.fill(0)
            y = fn(x, out=o)
            _leave_if_forked(True)
            if y is None or y is o:
                return (_CODES[x.dtype], shape)
        else:
            y = fn(x)
            _leave_if_forked(True)
        code = _CODES.get(y.dtype) if type(y) is np.ndarray else None
        if code is None or not 1 <= y.ndim <= 4:
            # Not an array mk1 carries (a scalar, a dict, a bool array...): it goes back
            # pickled, as it is (see mk1._args).
            del x
            try:
                w = _args.results(y, len(out))
            except OverflowError as e:
                raise _too_large(e.args[0], len(out)) from None
            return _write(w, out, in_place)
        if y.nbytes > len(out):
            from mk1 import ArrayTooLarge

            raise ArrayTooLarge(
                f"the function returned {y.shape} {y.dtype} ({y.nbytes} bytes); a result may "
                f"take {len(out)} bytes here (mk1.Pool(max_array_bytes=...))"
            )
        if not (in_place and y is x):
            np.ndarray(y.shape, y.dtype, out)[...] = y
        return (code, y.shape)
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
        encoded = _encode_error(e, in_place)
        if len(encoded) > len(out) // 4 and len(encoded.encode("utf-8", "replace")) > len(out):
            # (It goes in the slot: cut to fit there, keeping the end, with the message.)
            encoded = _error_text(encoded, len(out))
        return (None, encoded)


# A batch that has run this long stops: the caller runs its remaining calls one to a slot, on
# every worker (they turned out slower than the batch was sized for).
_BATCH_STOP = 0.02


def _run_batch(fn, inp, dtype, shape, out, in_place):
    """Makes the calls of the calls bundle in ``inp`` in turn, each failing alone, and writes
    their results bundle at the start of ``out`` (see ``mk1._args``); returns as ``_run``."""
    try:
        bundle = np.ndarray(shape, dtype, inp)
        batch, calls, block = _args.read_calls(bundle)
        del bundle
        start = time.perf_counter()
        made: list = []  # the entries of the calls made so far, in order
        if block:
            # Every argument an atom: while every result is one too, the results go back as a
            # block (one pickle), as many as were made. A batch stops, and the calls it did
            # not make are left to the caller (AGAIN), when it has run long, or when its
            # results would soon not fit the slot: the results are measured (by pickling
            # them) once the atoms that can be long among them (strings, bytes, paths, tuples
            # of these; numbers are taken to be short) have taken, by their lengths, half the
            # room left at the last measure. The first call
            # that fails or returns anything else goes on piece by piece (`_run_pieces`) with
            # the calls made so far, unless their pieces would not fit what the slot holds:
            # then the block goes as it is, and that call is left too.
            atoms, flat, clock = _args.ATOMS, _args.flat, time.perf_counter
            numbers, all_numbers = _args.NUMBERS, _args.NUMBERS.issuperset
            values: list = []
            last = None
            n, space = len(calls), len(out)
            long, check = 0, space // 2  # (the lengths of long atoms; the next measure)
            budget = _budget()  # (calls past it are left, as when the batch runs long)
            for args, _ in calls:
                if values and (clock() - start > _BATCH_STOP or len(values) >= budget):
                    break
                try:
                    value = fn(*args)
                except BaseException as e:  # noqa: BLE001 - this call fails alone
                    _leave_if_forked()
                    last = (_args.FAILED, _encode_error(e, in_place))
                    break
                if _forked:
                    os._exit(0)  # (see `_leave_if_forked`)
                kind = type(value)
                if kind in numbers or (kind is tuple and all_numbers(map(type, value))):
                    pass
                elif kind is str:
                    long += len(value) if value.isascii() else 4 * len(value)
                elif kind is bytes:
                    long += len(value)
                elif kind in atoms or (kind is tuple and flat(value)):
                    long += _length(value)
                else:
                    # (Pickled as it returned, before the next call could change it.)
                    last = (_args.OK, value)
                    break
                values.append(value)
                if long >= check:
                    size = _block_bytes(batch, values, space)
                    if size > 0.9 * space:
                        break
                    check = long + (space - size) // 2
            _count(len(values) + (last is not None))
            kept = None  # (a result or failure left out of a block sent as it is)
            if last is not None and values:
                size = _block_bytes(batch, values, space)
                # (A piece takes about 24 bytes more than its result in a block, and room is
                # kept for an entry of each call still to answer.)
                if size + 24 * len(values) + 32 * (n - len(values)) + 256 > space:
                    kept, last = last, None  # (its call runs again, on its own)
            if last is None:
                seconds = time.perf_counter() - start
                _leave_if_forked(True)
                w, _ = _args.results_block(batch, seconds, values, space)
                if w is None and len(values) > 1:
                    # (The last result, a long string say, took the block past the slot: the
                    # others go, and its call runs again, on its own.)
                    w, _ = _args.results_block(batch, seconds, values[:-1], space)
                if w is not None:
                    del calls, values
                    return _write(w, out, in_place)
            made = [(_args.OK, v) for v in values]
            del values
            last = last if kept is None else kept  # (no block after all: it goes as a piece)
            if last is not None:
                made.append(last)
                last = kept = None
        return _run_pieces(fn, batch, calls, made, start, out, in_place)
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
        return (None, _encode_error(e, in_place))


def _block_bytes(batch, values, space):
    """The bytes a block of results ``values`` takes (measured by pickling it), or more than
    ``space`` when that does not fit."""
    return _args.results_block(batch, 0.0, values, space)[1]


def _length(x) -> int:
    """About the bytes an atom (or a tuple of them) takes pickled, by its length: strings,
    bytes, paths and big numbers count, other atoms take a few bytes (counted as none)."""
    kind = type(x)
    if kind is str:
        return len(x) if x.isascii() else 4 * len(x)
    if kind is np.str_:
        return 4 * len(x)  # (numpy pickles its strings 4 bytes a character)
    if kind is bytes or kind is np.bytes_:
        return len(x)
    if kind is int:
        return x.bit_length() // 8
    if kind is tuple:
        return sum(map(_length, x))
    if isinstance(x, os.PathLike):
        return 2 * len(os.fspath(x))
    return 0


def _run_pieces(fn, batch, calls, made, start, out, in_place):
    """Makes the calls of a batch from ``len(made)`` on (``made``: the entries of those made
    before) and writes the results bundle, each entry pickled on its own; returns as
    ``_run``."""
    results = _args.Results(len(out), len(calls))
    stop = False
    OK, clock, was_made = _args.OK, time.perf_counter, len(made)
    budget = _budget() + was_made  # (calls of this batch past it are left)
    for i in range(len(calls)):
        if stop or (
            i >= was_made
            and i > 0
            and (clock() - start > _BATCH_STOP or results.nearly_full() or i >= budget)
        ):
            # (The calls not made are left: the batch ran long, or its results are filling
            # the slot.)
            stop = True
            results.again()
            continue
        if i < was_made:
            entry, made[i] = made[i], None
        else:
            _count(1)
            try:
                args, kwargs = calls[i]
                calls[i] = None
                entry = (OK, fn(*args, **kwargs) if kwargs else fn(*args))
            except BaseException as e:  # noqa: BLE001 - this call fails alone
                entry = (_args.FAILED, _encode_error(e, in_place))
            if _forked:
                os._exit(0)  # (see `_leave_if_forked`)
            args = kwargs = None
        try:
            size = results.add(entry)
        except Exception as e:  # its result does not pickle: it fails alone
            entry = (_args.FAILED, _encode_error(e, in_place))
            size = results.add(entry)
        if size is not None and entry[0] is _args.FAILED:
            # An exception too large for the room left (one carrying data, say): its traceback
            # alone, as text (a RemoteError for the caller, as on the path of one array).
            size = results.add((_args.FAILED, _error_text(entry[1], results.room())))
        entry = None
        if size is None:
            continue
        if i == 0 and size + _args._ROOM_TRAILER > len(out):
            # Too large even alone in the whole space: this call's failure.
            error = _too_large(size, len(out))
            if results.add((_args.FAILED, _encode_error(error, in_place))) is None:
                continue
        # The rest of the space is too small for it: it runs again on its own, and so do
        # the calls after it (this one ran; its result is dropped).
        results.again()
        stop = True
    seconds = time.perf_counter() - start
    _leave_if_forked(True)
    del calls, made
    return _write(results.finish(batch, seconds), out, in_place)


def _too_large(size, space):
    from mk1 import ArrayTooLarge

    return ArrayTooLarge(
        f"the function's result takes {size} bytes in shared memory (its arrays, and the rest "
        f"pickled); a result may take {space} bytes here (mk1.Pool(max_array_bytes=...))"
    )


def _write(w, out, in_place):
    """Writes the bundle of writer ``w`` at the start of ``out``; returns its dtype code and
    shape."""
    dst = np.ndarray((len(out),), np.uint8, out)
    if in_place:
        # Results may be (views of) the arguments, in the very memory they go to.
        dst[: w.nbytes] = w.array()
    else:
        w.write(dst)
    return (_CODES[_U8], (w.nbytes,))


def worker_id() -> int | None:
    """This worker's index (``0..workers``), or None outside a worker."""
    return _worker_id


def worker_state() -> dict:
    """A dict private to this worker process, kept between tasks: the initializer can fill
    it, functions read it (as mpire's worker state)."""
    return _state
