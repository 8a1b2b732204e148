"""Calls with any arguments and any result: arrays through shared memory, the rest pickled.

``pool.submit(fn, *args, **kwargs)`` (and ``starmap``, ``map`` over several iterables, or over
items that are not arrays) sends the function wrapped in a ``Call`` and its arguments as one
*bundle*: a 1-D uint8 array that mk1 carries like any other. Numpy arrays inside the arguments
travel out of band: their bytes are written once into the slot and the
function gets read-only views of them there; everything else is pickled. The result comes back
the same way, so it may be any picklable object, arrays in it again out of band. A function
called with one array whose result is not an array mk1 carries (a dict, a tuple, a string, a
bool array) sends that result back as a bundle too.

A bundle, all integers unsigned 64-bit little-endian::

    [0, 8)          MAGIC
    [8, 24)         NONCE: the calling process's (random, given to its workers at start)
    [24, 32)        length of the pickle, P
    [32, 40)        number of out-of-band buffers, N
    [40, 40 + 16N)  per buffer: its offset from the bundle's start, its length in bytes
    then the pickle (P bytes), then each buffer at a multiple of ALIGN bytes.

The nonce is what tells the caller that a uint8 result of a one-array function is a bundle and
not the function's own bytes: a function's result cannot start with it by chance (2^-128).
Whoever reads a bundle checks every length and offset against the bundle's size first: a
bundle written by a misbehaving worker raises ``ValueError``, it never reads out of bounds.
(Its pickle is trusted as the workers' pickled exceptions are: the workers run the caller's
own code.)
"""

from __future__ import annotations

import io
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
# (Buffers larger than a slot cannot be in a bundle; this caps N before anything is allocated.)
_MAX_BUFFERS = 1 << 20


class _Wrapped:
    """A function wrapped to say how its task's input and result are to be read."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __reduce__(self):
        return (type(self), (self.fn,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.fn!r})"


class Call(_Wrapped):
    """The function of a task whose input is a bundle of ``(args, kwargs)``: the worker calls
    ``fn(*args, **kwargs)`` and sends back a bundle of the result."""

    __slots__ = ()


class Batch(_Wrapped):
    """The function of a map's tasks whose input is a bundle of a list of ``(args, kwargs)``:
    the worker makes each call in turn and sends back a bundle of ``(seconds, results)``, the
    worker's time for all of them and, per call, ``(True, result)`` or ``(False, error)`` (the
    error encoded as a failed task's message)."""

    __slots__ = ()


class Auto(_Wrapped):
    """The function of a map of arrays: an input that is a bundle of ``((item,), {})`` (an
    item that was not an array mk1 carries) is a call, and its result a bundle; any other
    input is the array itself, and ``fn`` runs as for one array."""

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


def _dtype(text: str) -> np.dtype:
    """The dtype a bundle names; only one of those ``_carry`` sends (a dtype with objects
    would read pointers out of the bundle's bytes)."""
    dt = _DTYPES.get(text)
    if dt is None:
        raise ValueError(f"not a dtype mk1 sends out of band: {text!r}")
    return dt


# The arrays of the bundle being read in this thread (see `_array`).
_LOADING = threading.local()


def _array(k: Any, text: Any, shape: Any, order: Any) -> np.ndarray:
    """Array ``k`` of the bundle being read (a view of its bytes, no copy): how an array that
    went out of band comes back. Anything that does not name one raises ``ValueError``."""
    buffers = getattr(_LOADING, "buffers", None)
    if buffers is None or type(k) is not int or not 0 <= k < len(buffers) or order not in "CF":
        raise ValueError(f"a garbled mk1 bundle: no array {k!r}")
    return np.ndarray(shape, _dtype(text), buffers[k], order=order)


class _Pickler(pickle.Pickler):
    """Sends the bytes of arrays of the dtypes of ``_TEXT`` out of band (into ``arrays``), a
    strided one as a contiguous copy (so that the function gets a view of it too); everything
    else, empty arrays too, is pickled as usual.

    (Not pickle's own out-of-band buffers: numpy's reduction costs twice as much, and those
    buffers come back read-only when they left read-only, as a worker's inputs are. And a
    reducer, not a persistent id: pickle asks a reducer about arrays only, but asks for a
    persistent id of every object.)"""

    def __init__(self, f: io.BytesIO) -> None:
        super().__init__(f, protocol=5)
        self.arrays: list = []

    def reducer_override(self, obj: Any) -> Any:
        return _reduce(obj, self.arrays)


def _reduce(obj: Any, arrays: list) -> Any:
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


def _dump(obj: Any) -> tuple[bytes, list[np.ndarray]]:
    """``obj`` pickled, and the arrays that go out of band: by reference where it can be,
    else with cloudpickle when it is installed (lambdas, closures, as for the function)."""
    f = io.BytesIO()
    p = _Pickler(f)
    try:
        p.dump(obj)
        return f.getvalue(), p.arrays
    except (pickle.PicklingError, AttributeError, TypeError) as e:
        error = e
    try:
        import cloudpickle
    except ImportError:
        raise TypeError(
            f"mk1 cannot send {_short(obj)} to or from a worker: {error}. Install "
            f"cloudpickle (pip install cloudpickle) to send lambdas and closures by value"
        ) from error

    class _Cloud(cloudpickle.CloudPickler):
        def reducer_override(self, obj: Any) -> Any:
            r = _reduce(obj, arrays)
            return super().reducer_override(obj) if r is NotImplemented else r

    f, arrays = io.BytesIO(), []
    try:
        _Cloud(f, protocol=5).dump(obj)
    except Exception as e:
        raise TypeError(f"mk1 cannot send {_short(obj)} to or from a worker: {e}") from e
    return f.getvalue(), arrays


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:200] + "..."


class Packed:
    """An object pickled with its arrays out of band, ready to be written as a bundle of
    ``nbytes`` bytes."""

    __slots__ = ("head", "raws", "offsets", "nbytes")

    def __init__(self, obj: Any) -> None:
        self.head, arrays = _dump(obj)
        # (Contiguous arrays, C or Fortran order: `raw` is their bytes, without a copy.)
        self.raws = [pickle.PickleBuffer(a).raw() for a in arrays]
        at = _align(_HEAD.size + _BUF.size * len(self.raws) + len(self.head))
        self.offsets = []
        for r in self.raws:
            self.offsets.append(at)
            at = _align(at + r.nbytes)
        self.nbytes = at if self.raws else _HEAD.size + len(self.head)

    def write(self, dst: np.ndarray) -> None:
        """Writes the bundle at the start of ``dst`` (a 1-D uint8 array of at least
        ``nbytes``)."""
        table = [0] * (2 * len(self.raws))
        table[0::2] = self.offsets
        table[1::2] = [r.nbytes for r in self.raws]
        prefix = b"".join(
            (
                _HEAD.pack(MAGIC, NONCE, len(self.head), len(self.raws)),
                struct.pack(f"<{len(table)}Q", *table),
                self.head,
            )
        )
        # (Through a memoryview: a slice assignment there is a plain copy, several times
        # cheaper than numpy's for the many small pieces of a batch.)
        with memoryview(dst) as mv:
            mv[: len(prefix)] = prefix
            for off, r in zip(self.offsets, self.raws):
                mv[off : off + r.nbytes] = r

    def array(self) -> np.ndarray:
        """The bundle as a new uint8 array."""
        out = np.empty(self.nbytes, np.uint8)
        self.write(out)
        return out


def pack(obj: Any) -> np.ndarray:
    """``obj`` as a new bundle."""
    return Packed(obj).array()


def is_bundle(a: np.ndarray) -> bool:
    """Whether ``a`` (a result of a one-array function) is a bundle of this process."""
    return (
        a.dtype == np.uint8
        and a.ndim == 1
        and a.shape[0] >= _HEAD.size
        and a[:24].tobytes() == MAGIC + NONCE
    )


def unpack(bundle: np.ndarray) -> Any:
    """The object of ``bundle`` (a 1-D uint8 array). Its arrays are views of ``bundle``
    (read-only when it is), which they keep alive. Raises ``ValueError`` for anything that is
    not a well-formed bundle."""
    if bundle.dtype != np.uint8 or bundle.ndim != 1:
        raise ValueError(f"not an mk1 bundle: a {bundle.dtype} array of shape {bundle.shape}")
    size = bundle.shape[0]
    if size < _HEAD.size:
        raise ValueError(f"not an mk1 bundle: {size} bytes")
    magic, nonce, head_len, n = _HEAD.unpack(bundle[: _HEAD.size].tobytes())
    if magic != MAGIC or nonce != NONCE:
        raise ValueError("not an mk1 bundle of this pool (its first bytes are not mk1's)")
    if n > _MAX_BUFFERS or _HEAD.size + _BUF.size * n + head_len > size:
        raise ValueError(f"a garbled mk1 bundle: {n} buffers, {head_len} bytes of pickle in {size}")
    at = _HEAD.size + _BUF.size * n
    head = bundle[at : at + head_len]
    end = at + head_len
    table = struct.unpack_from(f"<{2 * n}Q", bundle, _HEAD.size)
    buffers = []
    for k in range(n):
        off, length = table[2 * k], table[2 * k + 1]
        if off < end or off > size or length > size - off:
            raise ValueError(f"a garbled mk1 bundle: buffer {k} at {off}+{length} of {size} bytes")
        # (A numpy slice, not a memoryview slice: every array made from it keeps `bundle`
        # itself referenced, which is how a worker sees a function keep its arguments.)
        buffers.append(bundle[off : off + length])
    outer = getattr(_LOADING, "buffers", None)
    _LOADING.buffers = buffers
    try:
        return pickle.loads(head.tobytes())
    finally:
        _LOADING.buffers = outer
