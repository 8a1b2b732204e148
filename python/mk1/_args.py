"""Calls with any arguments and any result: arrays through shared memory, the rest pickled.

``pool.submit(fn, *args, **kwargs)`` (and ``starmap``, ``map`` over several iterables, or over
items that are not arrays) sends the function wrapped in a ``Batch`` and its calls as one
*bundle*: a 1-D uint8 array that mk1 carries like any other. Numpy arrays inside the arguments
travel out of band: their bytes are written once into the slot and the function gets
read-only views of them there; everything else is pickled. The results come back the same way,
so they may be any picklable objects, arrays in them again out of band. A function called with
one array whose result is not an array mk1 carries (a dict, a scalar, a bool array) sends that
result back as a bundle too.

A bundle, all integers unsigned 64-bit little-endian::

    [0, 8)          MAGIC
    [8, 24)         NONCE: the calling process's (random, given to its workers at start)
    [24, 32)        length of the pickles, P
    [32, 40)        number of out-of-band arrays, N
    [40, 40 + 16N)  per array: its offset from the bundle's start, its length in bytes
    then the pickles (P bytes), then each array's bytes at a multiple of ALIGN bytes.

The pickles are pieces, each pickled on its own (no object is shared between two pieces, as
no object is shared between two calls of ``concurrent.futures``), the last one a trailer:

- calls: one ``(args, kwargs)`` per call, then ``("calls", batch, count)``;
- results: one entry per call, then ``("results", batch, seconds, count)``, ``seconds`` the
  worker's time for the calls it made. An entry is ``(OK, result)``, ``(FAILED, error)`` (the
  error encoded as a failed task's message), or ``(AGAIN, None)``: run that call again on its
  own (the worker stopped the batch before it, because the batch ran long or its results
  filled the slot; or, rarely, it ran but its result did not fit what the others left).

A *block* is the same in one piece, for calls whose arguments, or results, are all *atoms*
(``int``, ``float``, ``complex``, ``bool``, ``None``, ``str``, ``bytes``, paths, numpy's
scalars, and tuples of these: objects that cannot change, so that calls sharing one share
nothing that matters): ``("calls", batch, count, [args, ...])`` (no keywords), or
``("results", batch, seconds, count, [result, ...])``: the results of the batch's first
``count`` calls, every one an atom. The calls after them are left (as AGAIN above): the worker
stopped the batch because it ran long or its results were about to fill the slot. One pickle
per batch instead of one per call: what makes a map over numbers or paths as quick as
``multiprocessing``'s chunks.

The nonce is what tells the caller that a uint8 result of a one-array function is a bundle and
not the function's own bytes: a function's result cannot start with it by chance (2^-128).
Whoever reads a bundle checks every length and offset against the bundle's size first: a
bundle written by a misbehaving worker raises ``ValueError``, it never reads out of bounds.
(Its pickles are trusted as the workers' pickled exceptions are: the workers run the caller's
own code.)
"""

from __future__ import annotations

import io
import itertools
import pathlib
import pickle
import secrets
import struct
import threading
from typing import Any

import numpy as np

MAGIC = b"mk1args\x01"
ALIGN = 64
# Replaced in a worker by its caller's (see `mk1._worker._main`).
NONCE = secrets.token_bytes(16)
_HEAD = struct.Struct("<8s16sQQ")
_BUF = struct.Struct("<QQ")
# (Arrays larger than a slot cannot be in a bundle; this caps N before anything is allocated.)
_MAX_BUFFERS = 1 << 20
# Bytes a calls bundle may take past the pool's max_array_bytes: its header, table, pickles
# and alignment, so that arguments of max_array_bytes fit (the slot has room for them: the
# pickled function takes its end, up to 64 KiB).
ROOM = 4096
# Entry kinds of a results bundle.
OK, FAILED, AGAIN = 0, 1, 2
# The exact types of atoms (see the module's docs).
ATOMS = frozenset(
    {int, float, complex, bool, type(None), str, bytes, type(pathlib.Path())}
    | {pathlib.PurePosixPath, pathlib.PureWindowsPath}
    # numpy's scalars (what iterating over an array gives, what np.mean returns)
    | {np.dtype(t).type for t in "?bhilqBHILQefdgFDG"}
    | {np.str_, np.bytes_}
)
_all_atoms = ATOMS.issuperset
# The atoms that always pickle in a few bytes (an int of 64 bits or less, most often).
NUMBERS = frozenset(
    {int, float, complex, bool, type(None)} | {np.dtype(t).type for t in "?bhilqBHILQefdgFDG"}
)


def flat(t: tuple) -> bool:
    """Whether every item of ``t`` is an atom or a tuple of atoms (as immutable as an atom)."""
    return _all_atoms(map(type, t)) or all(
        type(x) in ATOMS or (type(x) is tuple and _all_atoms(map(type, x))) for x in t
    )


# The keywords of a call without any (shared by many calls: `fn(**kwargs)` copies it).
NO_KEYWORDS: dict = {}
# Room kept in a results bundle for the entries still to come and the trailer (an AGAIN
# entry pickles to about 15 bytes; the trailer to about 60).
_ROOM_PER_ENTRY = 32
_ROOM_TRAILER = 160


class _Wrapped:
    """A function wrapped to say how its task's input and result are to be read."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __reduce__(self):
        return (type(self), (self.fn,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fn!r})"


class Batch(_Wrapped):
    """The function of a task whose input is a calls bundle: the worker makes each call in
    turn and sends back a results bundle."""

    __slots__ = ()


class Auto(_Wrapped):
    """The function of a map of arrays: an input that is a calls bundle (an item that was not
    an array mk1 carries) is a ``Batch`` of one call; any other input is the array itself,
    and ``fn`` runs as for one array."""

    __slots__ = ()


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


# The dtypes whose arrays go out of band, by their text in a bundle (native byte order; other
# arrays, such as strings, datetimes, structured or big-endian ones, are pickled in band).
_TEXT: dict[np.dtype, str] = {
    np.dtype(t): np.dtype(t).str
    for t in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "longdouble", "complex64", "complex128",
    )
}
_DTYPES: dict[str, np.dtype] = {text: dt for dt, text in _TEXT.items()}

# Bundles below this size are not worth copying arrays out of (see `read`'s `own_small`).
_PIN_MIN = 64 << 10

# The arrays of the bundle being read in this thread (see `_array`).
_LOADING = threading.local()


def _array(k: Any, text: Any, shape: Any, order: Any) -> np.ndarray:
    """Array ``k`` of the bundle being read (a view of its bytes, no copy): how an array that
    went out of band comes back. Anything that does not name one raises ``ValueError``."""
    loading = _LOADING
    buffers = getattr(loading, "buffers", None)
    try:
        if buffers is None or type(k) is not int or not 0 <= k < len(buffers):
            raise ValueError("no such array")
        if order not in ("C", "F") or type(text) is not str or text not in _DTYPES:
            raise ValueError("not an order and dtype mk1 sends")
        if type(shape) is not tuple:
            raise ValueError("not a shape")
        for d in shape:
            if type(d) is not int or d < 0:
                raise ValueError("not a shape")
        a = np.ndarray(shape, _DTYPES[text], buffers[k], order=order)
        if loading.copy:
            return a.copy(order="K")
        if a.nbytes < loading.own_below:
            # (A small array of a large bundle: a view would keep the whole bundle alive as
            # long as the caller keeps it. Read-only when the view would have been.)
            own = a.copy(order="K")
            own.flags.writeable = a.flags.writeable
            return own
        return a
    except Exception as e:  # noqa: BLE001 - whatever is wrong, it is a garbled bundle
        raise ValueError(f"a garbled mk1 bundle: array {k!r}: {e}") from None


def _reduce(obj: Any, arrays: list) -> Any:
    """How ``_Pickler`` sends an array of a dtype of ``_TEXT``: its bytes out of band (into
    ``arrays``), a strided one as a contiguous copy (so that the function gets a view of it
    too); NotImplemented for anything else, empty arrays too, pickled as usual."""
    if type(obj) is not np.ndarray:
        return NotImplemented
    text = _TEXT.get(obj.dtype)
    if text is None or obj.size == 0:
        return NotImplemented
    flags = obj.flags
    if flags.c_contiguous:
        order = "C"
    elif flags.f_contiguous:
        order = "F"
    else:
        obj, order = np.ascontiguousarray(obj), "C"
    arrays.append(obj)
    return (_array, (len(arrays) - 1, text, obj.shape, order))


class _Pickler(pickle.Pickler):
    """A pickler whose arrays go out of band (see ``_reduce``).

    (Not pickle's own out-of-band buffers: numpy's reduction costs twice as much, and those
    buffers come back read-only when they left read-only, as a worker's inputs are. And a
    reducer, not a persistent id: pickle asks a reducer about arrays only, but asks for a
    persistent id of every object.)"""

    def __init__(self, f: io.BytesIO, arrays: list) -> None:
        super().__init__(f, protocol=5)
        self.arrays = arrays

    def reducer_override(self, obj: Any) -> Any:
        return _reduce(obj, self.arrays)


_OBJ = object()  # (`Writer.add`'s default: show the object itself)


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:200] + "..."


class Writer:
    """Writes a bundle piece by piece, within ``limit`` bytes (see the module's docs)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.f = io.BytesIO()
        self.arrays: list[np.ndarray] = []
        self.array_bytes = 0  # the arrays' bytes, each aligned
        self.pieces = 0
        self.size = _HEAD.size  # (`nbytes` after the last piece that went in)
        self._pickler = _Pickler(self.f, self.arrays)
        self._owned = 0  # the arrays before this one are the bundle's own (``own_arrays``)
        self._cloud: Any = None

    @property
    def nbytes(self) -> int:
        """The bundle's size so far."""
        table = _HEAD.size + _BUF.size * len(self.arrays) + self.f.tell()
        return _align(table) + self.array_bytes if self.arrays else table

    def add(self, obj: Any, room: int = 0, shown: Any = _OBJ) -> int | None:
        """Pickles ``obj`` as the next piece, leaving ``room`` bytes below the limit. Returns
        None when it went in; else the bytes the bundle would have taken with it (nothing
        went in). Raises ``TypeError`` when ``obj`` does not pickle (nothing went in): by
        reference where it can be, else with cloudpickle when it is installed (lambdas,
        closures, as for the function); the error shows ``shown`` (by default ``obj``)."""
        f, arrays = self.f, self.arrays
        at, n = f.tell(), len(arrays)
        pickler = self._pickler
        # Each piece on its own: nothing shared with the pieces before it.
        pickler.clear_memo()
        try:
            pickler.dump(obj)
        except (pickle.PicklingError, AttributeError, TypeError) as e:
            self._by_value(obj, at, n, obj if shown is _OBJ else shown, e)
        except BaseException:
            self._undo(at, n)
            raise
        if len(arrays) == n and not n:
            size = _HEAD.size + f.tell()  # (`nbytes`, without arrays)
        else:
            for k in range(n, len(arrays)):
                self.array_bytes += _align(arrays[k].nbytes)
            size = self.nbytes
        if size + room > self.limit:
            self._undo(at, n)
            return size
        self.pieces += 1
        self.size = size
        return None

    def _by_value(self, obj: Any, at: int, n: int, shown: Any, error: BaseException) -> None:
        """Pickles ``obj`` with cloudpickle, after pickle by reference failed with ``error``
        (what it wrote undone); raises ``TypeError`` (nothing written) when that fails too,
        or cloudpickle is not installed."""
        self._undo(at, n)
        try:
            import cloudpickle
        except ImportError:
            raise TypeError(
                f"mk1 cannot send {_short(shown)} to or from a worker: {error}. Install "
                f"cloudpickle (pip install cloudpickle) to send lambdas and closures by value"
            ) from error
        if self._cloud is None:
            arrays = self.arrays

            class _Cloud(cloudpickle.CloudPickler):
                def reducer_override(self, obj: Any) -> Any:
                    r = _reduce(obj, arrays)
                    return super().reducer_override(obj) if r is NotImplemented else r

            self._cloud = _Cloud
        try:
            self._cloud(self.f, protocol=5).dump(obj)
        except BaseException as e:
            self._undo(at, n)
            if isinstance(e, Exception):
                raise TypeError(f"mk1 cannot send {_short(shown)} to or from a worker: {e}") from e
            raise

    def finish_calls(self, batch: int) -> int | None:
        """Adds the trailer of a calls bundle of batch number ``batch``; as ``add``."""
        return self.add(("calls", batch, self.pieces))

    def own_arrays(self) -> None:
        """Copies the arrays the pieces so far hold by reference (the bundle's arrays are
        otherwise read when it is written): for pieces taken from a caller's iterable, which
        may refill its buffers for the next piece."""
        arrays = self.arrays
        for k in range(self._owned, len(arrays)):
            arrays[k] = arrays[k].copy(order="K")
        self._owned = len(arrays)

    def _undo(self, at: int, n: int) -> None:
        self.f.seek(at)
        self.f.truncate()
        del self.arrays[n:]
        self._owned = min(self._owned, n)
        self.array_bytes = sum(_align(a.nbytes) for a in self.arrays)

    def write(self, dst: Any) -> None:
        """Writes the bundle at the start of ``dst`` (a writable buffer of at least ``nbytes``
        bytes: a 1-D uint8 array, or the pool's own buffer of a slot), keeping no view of
        it."""
        head = self.f.getbuffer()
        at = _align(_HEAD.size + _BUF.size * len(self.arrays) + len(head))
        table = []
        for a in self.arrays:
            table += (at, a.nbytes)
            at = _align(at + a.nbytes)
        # (Through a memoryview: a slice assignment there is a plain copy, several times
        # cheaper than numpy's for the many small pieces of a batch.)
        with memoryview(dst) as mv:
            n = _HEAD.size
            mv[:n] = _HEAD.pack(MAGIC, NONCE, len(head), len(self.arrays))
            mv[n : n + _BUF.size * len(self.arrays)] = struct.pack(f"<{len(table)}Q", *table)
            n += _BUF.size * len(self.arrays)
            mv[n : n + len(head)] = head
            for k, a in enumerate(self.arrays):
                off = table[2 * k]
                # (Contiguous, C or Fortran order: `raw` is its bytes, without a copy.)
                mv[off : off + a.nbytes] = pickle.PickleBuffer(a).raw()
        del head

    def array(self) -> np.ndarray:
        """The bundle as a new uint8 array."""
        out = np.empty(self.nbytes, np.uint8)
        self.write(out)
        return out


def calls(batch: int, pairs: list[tuple[tuple, dict]], limit: int) -> Writer:
    """A calls bundle of ``pairs`` (each ``(args, kwargs)``), to be written (the pool writes
    it straight into a slot); ``OverflowError`` carrying the bytes it would take when that is
    past ``limit``."""
    w = Writer(limit)
    for pair in pairs:
        size = w.add(pair)
        if size is not None:
            raise OverflowError(size)
    size = w.finish_calls(batch)
    if size is not None:
        raise OverflowError(size)
    return w


def block(trailer: tuple, limit: int) -> tuple[Writer | None, int]:
    """The bundle of one piece, ``trailer`` (a block, see the module's docs), and its size;
    no bundle when it takes more than ``limit`` bytes."""
    w = Writer(limit)
    size = w.add(trailer)
    return (w, w.nbytes) if size is None else (None, size)


def calls_block(batch: int, args: list, limit: int) -> tuple[Writer | None, int]:
    """The block of the calls of batch number ``batch`` with arguments ``args`` (a tuple per
    call, every item an atom; see the module's docs), as ``block``."""
    return block(("calls", batch, len(args), args), limit)


def results_block(
    batch: int, seconds: float, values: list, limit: int
) -> tuple[Writer | None, int]:
    """The block of ``values``, the results of the first calls of batch number ``batch``
    (made in ``seconds``; see the module's docs), as ``block``."""
    return block(("results", batch, seconds, len(values), values), limit)


def is_bundle(a: np.ndarray) -> bool:
    """Whether ``a`` (a result of a one-array function) is a bundle of this process."""
    return (
        a.dtype == np.uint8
        and a.ndim == 1
        and a.shape[0] >= _HEAD.size
        and a[:24].tobytes() == MAGIC + NONCE
    )


def read(bundle: np.ndarray, copy: bool = False, own_small: bool = False) -> list:
    """The pieces of ``bundle`` (a 1-D uint8 array). Its arrays are views of ``bundle``
    (read-only when it is), which they keep alive; with ``copy``, arrays of their own; with
    ``own_small``, in a bundle of ``_PIN_MIN`` bytes or more, those of less than half its
    bytes are arrays of their own (so that no array kept pins more than twice its own bytes,
    or a few KiB). Raises ``ValueError`` for anything that is not a well-formed bundle."""
    if bundle.dtype != np.uint8 or bundle.ndim != 1:
        raise ValueError(f"not an mk1 bundle: a {bundle.dtype} array of shape {bundle.shape}")
    size = bundle.shape[0]
    if size < _HEAD.size:
        raise ValueError(f"not an mk1 bundle: {size} bytes")
    magic, nonce, head_len, n = _HEAD.unpack(bundle[: _HEAD.size].tobytes())
    if magic != MAGIC or nonce != NONCE:
        raise ValueError("not an mk1 bundle of this pool (its first bytes are not mk1's)")
    if n > _MAX_BUFFERS or _HEAD.size + _BUF.size * n + head_len > size:
        raise ValueError(f"a garbled mk1 bundle: {n} arrays, {head_len} bytes of pickles in {size}")
    at = _HEAD.size + _BUF.size * n
    end = at + head_len
    table = struct.unpack_from(f"<{2 * n}Q", bundle, _HEAD.size)
    buffers = []
    for k in range(n):
        off, length = table[2 * k], table[2 * k + 1]
        if off < end or off > size or length > size - off:
            raise ValueError(f"a garbled mk1 bundle: array {k} at {off}+{length} of {size} bytes")
        # (A numpy slice, not a memoryview slice: every array made from it keeps `bundle`
        # itself referenced, which is how a worker sees a function keep its arguments.)
        buffers.append(bundle[off : off + length])
    f = io.BytesIO(bundle[at:end].tobytes())
    outer = (
        getattr(_LOADING, "buffers", None),
        getattr(_LOADING, "copy", False),
        getattr(_LOADING, "own_below", 0),
    )
    _LOADING.buffers, _LOADING.copy = buffers, copy
    _LOADING.own_below = size // 2 if own_small and size >= _PIN_MIN else 0
    try:
        pieces: list = []
        append, load = pieces.append, pickle.load
        try:
            while True:
                # (An unpickler per piece: each piece numbers its memo from 0, and an
                # unpickler would go on numbering from where the last piece left off.)
                append(load(f))
        except EOFError:
            # The end, where no piece starts (a piece cut short is an error of its own, or
            # takes the trailer with it: then what it leaves is not a bundle).
            if f.tell() != head_len:
                raise
        return pieces
    except ValueError:
        raise
    except (AttributeError, ImportError) as e:
        # A type (or function) this process cannot import: a class defined under
        # `if __name__ == "__main__":`, say, which the other process never ran. (Any other
        # such error, a user's `__setstate__` failing, say, is said as it is.)
        if not (isinstance(e, ModuleNotFoundError) or "Can't get attribute" in str(e)):
            raise ValueError(f"an object sent between the caller and a worker failed to "
                             f"rebuild on the receiving side: {e!r}") from e
        raise ValueError(
            f"an object sent between the caller and a worker cannot be rebuilt on the "
            f"receiving side: {e} (define its class at the top level of an importable module "
            f"or of the main script, outside `if __name__ == '__main__':`)"
        ) from e
    except Exception as e:  # noqa: BLE001 - a truncated or garbled pickle
        raise ValueError(f"a garbled mk1 bundle: {e!r}") from e
    finally:
        _LOADING.buffers, _LOADING.copy, _LOADING.own_below = outer


def _block(pieces: list, trailer: Any, kind: str, length: int) -> list | None:
    """The list a block of ``kind`` ends its trailer with (its trailer ``length`` long, and no
    other piece), or None when ``pieces`` and ``trailer`` are not such a block."""
    if (
        not pieces
        and type(trailer) is tuple
        and len(trailer) == length
        and trailer[0] == kind
        and type(trailer[-1]) is list
        and trailer[-2] == len(trailer[-1])
    ):
        return trailer[-1]
    return None


def read_calls(bundle: np.ndarray) -> tuple[int, list, bool]:
    """The batch number and the ``(args, kwargs)`` of a calls bundle, and whether it is a
    block (every argument an atom); ``ValueError`` for anything else."""
    *pairs, trailer = read(bundle) or [None]
    args = _block(pairs, trailer, "calls", 4)
    if args is not None:
        if not all(type(a) is tuple for a in args):
            raise ValueError("a garbled mk1 bundle: not calls")
        return trailer[1], list(zip(args, itertools.repeat(NO_KEYWORDS))), True
    if not (
        type(trailer) is tuple
        and len(trailer) == 3
        and trailer[0] == "calls"
        and trailer[2] == len(pairs)
        and all(type(p) is tuple and len(p) == 2 for p in pairs)
    ):
        raise ValueError("a garbled mk1 bundle: not calls")
    return trailer[1], pairs, False


def read_results(
    bundle: np.ndarray, copy: bool = False, own_small: bool = False
) -> tuple[int, float, list, bool, bool]:
    """The batch number, the worker's seconds, the entries of a results bundle (``copy``,
    ``own_small``: see ``read``), whether it is a block, and whether the entries are the
    results themselves: for
    a block (atoms, of the batch's first calls: every call after them is left), and when every
    entry is OK (the common case, read without a second pass); ``ValueError`` for anything
    else."""
    *entries, trailer = read(bundle, copy, own_small) or [None]
    values = _block(entries, trailer, "results", 5)
    if values is not None and type(trailer[2]) is float:
        return trailer[1], trailer[2], values, True, True
    if not (
        type(trailer) is tuple
        and len(trailer) == 4
        and trailer[0] == "results"
        and type(trailer[2]) is float
        and trailer[3] == len(entries)
    ):
        raise ValueError("a garbled mk1 bundle: not results")
    plain = True
    for e in entries:
        if type(e) is not tuple or len(e) != 2:
            raise ValueError("a garbled mk1 bundle: not results")
        kind = e[0]
        if kind != OK:
            if not (kind == AGAIN or (kind == FAILED and type(e[1]) is str)):
                raise ValueError("a garbled mk1 bundle: not results")
            plain = False
    if plain:
        entries = [value for _, value in entries]
    return trailer[1], trailer[2], entries, False, plain


class Results:
    """A results bundle being written by a worker into a result space of ``limit`` bytes for
    ``count`` calls: room is kept for an AGAIN entry for each call not yet answered."""

    def __init__(self, limit: int, count: int) -> None:
        self.w = Writer(limit)
        self.left = count
        self.largest = 0  # the bytes of the largest entry so far

    def add(self, entry: tuple) -> int | None:
        """Adds ``entry`` for the next call (see ``Writer.add``); raises ``TypeError`` for a
        result that does not pickle."""
        before = self.w.size
        size = self.w.add(entry, _ROOM_TRAILER + _ROOM_PER_ENTRY * (self.left - 1), entry[1])
        if size is None:
            self.left -= 1
            self.largest = max(self.largest, self.w.size - before)
        return size

    def room(self) -> int:
        """The bytes the next entry may take."""
        return self.w.limit - self.w.size - _ROOM_TRAILER - _ROOM_PER_ENTRY * (self.left - 1)

    def nearly_full(self) -> bool:
        """Whether an entry half again as large as the largest so far might not fit (so the
        worker makes no more calls: a call whose result does not fit runs again)."""
        kept = _ROOM_TRAILER + _ROOM_PER_ENTRY * self.left
        return self.w.size + kept + self.largest * 3 // 2 > self.w.limit

    def again(self) -> None:
        """Answers the next call with AGAIN (always fits: room was kept for it)."""
        self.w.add((AGAIN, None))
        self.left -= 1

    def finish(self, batch: int, seconds: float) -> Writer:
        self.w.add(("results", batch, seconds, self.w.pieces))
        return self.w


def results(value: Any, limit: int) -> Writer:
    """The results bundle of one call's ``value`` (a one-array function's result that is not
    an array mk1 carries); ``OverflowError`` carrying its bytes when past ``limit``. Raises
    ``TypeError`` when it does not pickle."""
    r = Results(limit, 1)
    size = r.add((OK, value))
    if size is not None:
        raise OverflowError(size)
    return r.finish(-1, 0.0)
