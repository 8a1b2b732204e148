"""Calls with any arguments and any result: arrays through shared memory, the rest pickled.

``pool.submit(fn, *args, **kwargs)`` (and ``starmap``, ``map`` over several iterables, or over
items that are not arrays) sends the function wrapped in a ``Call`` and its arguments as one
*bundle*: a 1-D uint8 array that mk1 carries like any other. Numpy arrays inside the arguments
travel out of band (pickle protocol 5): their bytes are written once into the slot and the
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


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


_DTYPES: dict[str, np.dtype] = {}


def _array(buffer: Any, dtype: str, shape: tuple, order: str) -> np.ndarray:
    """An array over ``buffer`` (no copy): how ``_reduce`` rebuilds one. (Raises for a buffer
    of another size than the shape asks.)"""
    dt = _DTYPES.get(dtype)
    if dt is None:
        dt = _DTYPES.setdefault(dtype, np.dtype(dtype))
    return np.ndarray(shape, dt, buffer, order=order)


def _reduce(obj: Any) -> Any:
    """An array's reduction with its bytes out of band, half the cost of numpy's own (a dtype
    string instead of a pickled dtype object); a strided array is made contiguous first (numpy
    would pickle it in band, and the function would get a private copy instead of a view).
    NotImplemented for anything else, and for arrays whose dtype a string does not describe
    (structured, big-endian, object), which numpy pickles itself."""
    if type(obj) is not np.ndarray or obj.dtype.isbuiltin != 1 or obj.dtype.hasobject:
        return NotImplemented
    if obj.nbytes == 0:
        return NotImplemented
    if not obj.flags.forc:
        obj = np.ascontiguousarray(obj)
    order = "C" if obj.flags.c_contiguous else "F"
    return (_array, (pickle.PickleBuffer(obj), obj.dtype.str, obj.shape, order))


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: Any) -> Any:
        return _reduce(obj)


def _dump(obj: Any) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """``obj`` pickled (protocol 5) and its out-of-band buffers: by reference where it can be,
    else with cloudpickle when it is installed (lambdas, closures, as for the function)."""
    f, buffers = io.BytesIO(), []
    try:
        _Pickler(f, protocol=5, buffer_callback=buffers.append).dump(obj)
        return f.getvalue(), buffers
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
            r = _reduce(obj)
            return super().reducer_override(obj) if r is NotImplemented else r

    f, buffers = io.BytesIO(), []
    try:
        _Cloud(f, protocol=5, buffer_callback=buffers.append).dump(obj)
    except Exception as e:
        raise TypeError(f"mk1 cannot send {_short(obj)} to or from a worker: {e}") from e
    return f.getvalue(), buffers


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 200 else text[:200] + "..."


class Packed:
    """An object pickled with its arrays out of band, ready to be written as a bundle of
    ``nbytes`` bytes."""

    __slots__ = ("head", "raws", "offsets", "nbytes")

    def __init__(self, obj: Any) -> None:
        self.head, buffers = _dump(obj)
        # (numpy hands out contiguous buffers only; `raw` is their bytes, without a copy.)
        self.raws = [b.raw() for b in buffers]
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
    return pickle.loads(head, buffers=buffers)
