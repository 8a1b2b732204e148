"""The worker side of a Python pool: what runs in each worker process.

A pool starts ``python -c "import mk1._worker as w; w._main()"`` for every worker. ``_main``
rebuilds the caller's import context (``sys.path`` and, as ``multiprocessing``'s spawn start
method does, the main module under the name ``__mp_main__``) and enters mk1's worker loop,
which calls ``_init`` once and ``_run`` for every array.
"""

from __future__ import annotations

import base64
import inspect
import json
import os
import pickle
import runpy
import sys
import traceback
import types

import numpy as np

BOOT_ENV = "MK1_PY_BOOT"
INIT_ENV = "MK1_PY_INIT"
EXC_MARKER = "\n--mk1-pickled-exception--\n"

_CODES: dict = {}  # numpy dtype -> mk1's dtype code (native byte order only)
_worker_id: int | None = None
_workers: int | None = None
_state: dict = {}


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


def _main() -> None:
    """Entry point of a worker process."""
    boot = json.loads(os.environ.get(BOOT_ENV, "{}"))
    if "path" in boot:
        sys.path[:] = boot["path"]
    if "argv" in boot:
        sys.argv[:] = boot["argv"]
    try:
        _prepare_main(boot)
    except Exception as e:
        # One write, so that the tracebacks of workers starting together (they share the
        # caller's stderr) do not interleave line by line in the pool's start error.
        text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        os.write(2, text.encode("utf-8", "replace"))
        os._exit(1)
    from mk1 import _mk1

    _mk1.serve()  # never returns in a worker
    sys.exit("mk1._worker: this process was not started by an mk1 pool")


def _init(worker: int, workers: int, codes: dict) -> None:
    """Runs once per worker, before it reports ready: the pool's initializer. ``codes`` maps
    each dtype name mk1 carries to its code."""
    global _worker_id, _workers
    _worker_id, _workers = worker, workers
    _CODES.update({np.dtype(name): code for name, code in codes.items()})
    # Output written with print() shows at once (the worker's stdout is the caller's).
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)
        except (AttributeError, ValueError):
            pass
    blob = os.environ.get(INIT_ENV)
    if blob:
        initializer, initargs = pickle.loads(base64.b64decode(blob))
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
    return fn, _wants_out(fn)


def _encode_error(e: BaseException) -> str:
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    try:
        blob = base64.b64encode(pickle.dumps(e)).decode("ascii")
    except Exception:  # an exception that does not pickle travels as text only
        return text
    return text + EXC_MARKER + blob


_PID = os.getpid()  # this worker's: a child its function forks has another


def _leave_if_forked() -> None:
    """In a child that the function forked and that returned here: leave at once, before
    writing the result (the worker's own copy of it answers; the child has no access to the
    slots anyway, see mk1's worker)."""
    if os.getpid() != _PID:
        os._exit(0)


def _run(fn, wants_out, inp, dtype, shape, out, in_place):
    """Runs ``fn`` on one array; returns ``(dtype code, shape)`` of what it wrote at the start
    of ``out``, or ``(None, message)`` when it raised."""
    try:
        x = np.ndarray(shape, dtype, inp)  # read-only out of place, as its buffer is
        if wants_out:
            o = x if in_place else np.ndarray(shape, dtype, out)
            y = fn(x, out=o)
            _leave_if_forked()
            if y is None or y is o:
                return (_CODES[x.dtype], shape)
        else:
            y = fn(x)
            _leave_if_forked()
        code = _CODES.get(y.dtype) if type(y) is np.ndarray else None
        if code is None or not 1 <= y.ndim <= 4:
            y, code = _unusual(y)
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
        return (None, _encode_error(e))


def _unusual(y):
    """A result that is not a plain array of a carried dtype: a scalar becomes a 1-element
    array; anything mk1 cannot carry raises, saying why."""
    if y is None:
        raise TypeError(
            "the function returned None; return an array, or take a required `out` "
            "argument and write the result there"
        )
    y = np.asarray(y)
    if y.ndim == 0:
        y = y.reshape(1)
    code = _CODES.get(y.dtype)
    if code is None:
        raise TypeError(
            f"mk1 carries int8..int64, uint8..uint64, float32 and float64 arrays in native "
            f"byte order; the function returned {y.dtype}"
        )
    if y.ndim > 4:
        raise ValueError(
            f"mk1 carries arrays of 1 to 4 dimensions; the function returned {y.ndim} "
            f"(shape {y.shape})"
        )
    return y, code


def worker_id() -> int | None:
    """This worker's index (``0..workers``), or None outside a worker."""
    return _worker_id


def worker_state() -> dict:
    """A dict private to this worker process, kept between tasks: the initializer can fill
    it, functions read it (as mpire's worker state)."""
    return _state
