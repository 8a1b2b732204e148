"""Built-in elementwise ops: they run in Rust in the workers (SIMD, no Python there).

Each returns an :class:`Op` to pass to ``Pool.map``, ``imap_unordered`` or ``submit`` in
place of a function. Integers wrap; floats follow IEEE. The output has the input's dtype and
shape, for arrays of any number of dimensions (a slot describes 1 to 4: a 0-d array, or one of
more, goes through as one dimension and its result is given the input's shape back). A
parameter that does not fit the array's dtype (``add(300)`` on uint8, ``xor`` on floats) fails
that array's task with ``ValueError``.
"""

from __future__ import annotations


class Op:
    """A built-in op, as text the Rust side parses (for example ``"affine:3,1"``)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"mk1.ops.Op({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Op) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


def _num(v: float) -> str:
    # numpy scalars (a parameter computed with numpy, such as ``a.mean()``) count as the
    # Python int or float they hold.
    if hasattr(v, "dtype") and hasattr(v, "item") and getattr(v, "shape", None) == ():
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"an op parameter must be an int or a float, not {type(v).__name__}")
    return repr(v)


def affine(scale: float, offset: float) -> Op:
    """``x * scale + offset``."""
    return Op(f"affine:{_num(scale)},{_num(offset)}")


def add(k: float) -> Op:
    """``x + k``."""
    return Op(f"add:{_num(k)}")


def mul(k: float) -> Op:
    """``x * k``."""
    return Op(f"mul:{_num(k)}")


def neg() -> Op:
    """``-x``."""
    return Op("neg")


def abs() -> Op:  # noqa: A001 - the op's name
    """``|x|``."""
    return Op("abs")


def clamp(lo: float, hi: float) -> Op:
    """``min(max(x, lo), hi)``."""
    return Op(f"clamp:{_num(lo)},{_num(hi)}")


def xor(k: int) -> Op:
    """``x ^ k`` (integers)."""
    return Op(f"xor:{_num(k)}")


def and_(k: int) -> Op:
    """``x & k`` (integers)."""
    return Op(f"and:{_num(k)}")


def or_(k: int) -> Op:
    """``x | k`` (integers)."""
    return Op(f"or:{_num(k)}")


def shl(n: int) -> Op:
    """``x << n`` (integers)."""
    return Op(f"shl:{_num(n)}")


def shr(n: int) -> Op:
    """``x >> n`` (integers; arithmetic for signed types)."""
    return Op(f"shr:{_num(n)}")
