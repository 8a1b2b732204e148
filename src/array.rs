//! Arrays as mk1 moves them: a [`Shape`] (row-major, C order, contiguous, 1 to
//! [`MAX_DIMS`] dimensions), typed views of slot memory, and an owned [`Array`] for results
//! copied out of shared memory.
//!
//! Slot memory is bytes; it becomes `[T]` only through [`cast`] / [`cast_mut`], which check
//! alignment and length. Every array in a slot starts at a multiple of 64 bytes, so the
//! checks never fail for arrays mk1 placed.

use std::borrow::Cow;
use std::fmt;

use crate::dtype::{DType, Element};
pub use crate::layout::MAX_DIMS;

/// The shape of an array: 1 to [`MAX_DIMS`] dimensions, each below 2^32, row-major. A
/// dimension may be 0 (an empty array).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Shape {
    ndim: u8,
    dims: [u32; MAX_DIMS],
}

/// A shape mk1 cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// No dimensions, or more than [`MAX_DIMS`].
    #[error("{0} dimensions; mk1 carries arrays of 1 to {MAX_DIMS}")]
    Rank(usize),
    /// A dimension of 2^32 or more.
    #[error("dimension {0} is too large (at most {max})", max = u32::MAX)]
    Dim(usize),
}

impl Shape {
    /// A shape from its dimensions.
    ///
    /// # Errors
    /// [`ShapeError`] for 0 or more than [`MAX_DIMS`] dimensions, or a dimension of 2^32 or more.
    pub fn new(dims: &[usize]) -> Result<Shape, ShapeError> {
        if dims.is_empty() || dims.len() > MAX_DIMS {
            return Err(ShapeError::Rank(dims.len()));
        }
        let mut s = Shape {
            ndim: dims.len() as u8,
            dims: [0; MAX_DIMS],
        };
        for (d, &n) in s.dims.iter_mut().zip(dims) {
            *d = u32::try_from(n).map_err(|_| ShapeError::Dim(n))?;
        }
        Ok(s)
    }

    /// A 1-D shape of `n` elements.
    pub fn d1(n: u32) -> Shape {
        Shape {
            ndim: 1,
            dims: [n, 0, 0, 0],
        }
    }

    /// A 2-D shape, `rows` × `cols`.
    pub fn d2(rows: u32, cols: u32) -> Shape {
        Shape {
            ndim: 2,
            dims: [rows, cols, 0, 0],
        }
    }

    /// From a descriptor's untrusted fields: `None` unless `1 <= ndim <= MAX_DIMS`.
    pub(crate) fn from_raw(ndim: u32, dims: [u32; MAX_DIMS]) -> Option<Shape> {
        if ndim == 0 || ndim as usize > MAX_DIMS {
            return None;
        }
        let mut s = Shape {
            ndim: ndim as u8,
            dims: [0; MAX_DIMS],
        };
        s.dims[..ndim as usize].copy_from_slice(&dims[..ndim as usize]);
        Some(s)
    }

    /// The fields a descriptor stores: `(ndim, dims)`, unused dimensions 0.
    pub(crate) fn raw(&self) -> (u32, [u32; MAX_DIMS]) {
        (u32::from(self.ndim), self.dims)
    }

    /// The dimensions.
    pub fn dims(&self) -> &[u32] {
        &self.dims[..self.ndim as usize]
    }

    /// Number of dimensions.
    pub fn ndim(&self) -> usize {
        self.ndim as usize
    }

    /// Number of elements (the product of the dimensions; at most 2^128, so it never
    /// overflows a u64 for shapes that fit a slot, and saturates otherwise).
    pub fn elements(&self) -> u64 {
        self.dims()
            .iter()
            .fold(1u64, |n, &d| n.saturating_mul(u64::from(d)))
    }

    /// Bytes of an array of this shape and `dtype` (saturating).
    pub fn bytes(&self, dtype: DType) -> u64 {
        self.elements().saturating_mul(dtype.size() as u64)
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(")?;
        for (i, d) in self.dims().iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        if self.ndim == 1 {
            f.write_str(",")?;
        }
        f.write_str(")")
    }
}

/// An owned array: elements of `T` in row-major order and their shape. What results are
/// copied into once they leave shared memory.
#[derive(Clone, PartialEq, Debug)]
pub struct Array<T> {
    data: Vec<T>,
    shape: Shape,
}

impl<T: Element> Array<T> {
    /// An array from its elements and shape.
    ///
    /// # Errors
    /// When `data.len()` is not the number of elements of `shape` (the data comes back).
    pub fn new(data: Vec<T>, shape: Shape) -> Result<Array<T>, Vec<T>> {
        if data.len() as u64 != shape.elements() {
            return Err(data);
        }
        Ok(Array { data, shape })
    }

    /// A 1-D array of `data`.
    pub fn from_vec(data: Vec<T>) -> Array<T> {
        let shape = Shape::d1(u32::try_from(data.len()).expect("at most 2^32-1 elements"));
        Array { data, shape }
    }

    /// The elements, row-major.
    pub fn as_slice(&self) -> &[T] {
        &self.data
    }

    /// The elements, row-major, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.data
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The elements, by value.
    pub fn into_vec(self) -> Vec<T> {
        self.data
    }
}

/// Anything `map` can take as an input array: its elements in row-major order and its shape.
pub trait AsArray {
    /// Element type.
    type Elem: Element;
    /// The elements, row-major; `shape().elements()` of them. Borrowed when the array is
    /// contiguous and row-major; a copy otherwise (an `ndarray` view with strides, say).
    fn elements(&self) -> Cow<'_, [Self::Elem]>;
    /// The shape.
    ///
    /// # Errors
    /// A shape mk1 cannot carry (more than [`MAX_DIMS`] dimensions, a dimension of 2^32 or
    /// more): `map` fails that array alone.
    fn shape(&self) -> Result<Shape, ShapeError>;
}

impl<T: Element> AsArray for Array<T> {
    type Elem = T;
    fn elements(&self) -> Cow<'_, [T]> {
        Cow::Borrowed(&self.data)
    }
    fn shape(&self) -> Result<Shape, ShapeError> {
        Ok(self.shape)
    }
}

impl<A: AsArray> AsArray for &A {
    type Elem = A::Elem;
    fn elements(&self) -> Cow<'_, [A::Elem]> {
        (*self).elements()
    }
    fn shape(&self) -> Result<Shape, ShapeError> {
        (*self).shape()
    }
}

impl<T: Element> AsArray for Vec<T> {
    type Elem = T;
    fn elements(&self) -> Cow<'_, [T]> {
        Cow::Borrowed(self)
    }
    fn shape(&self) -> Result<Shape, ShapeError> {
        Shape::new(&[self.len()])
    }
}

impl<T: Element> AsArray for &[T] {
    type Elem = T;
    fn elements(&self) -> Cow<'_, [T]> {
        Cow::Borrowed(self)
    }
    fn shape(&self) -> Result<Shape, ShapeError> {
        Shape::new(&[self.len()])
    }
}

/// `ndarray` arrays and views of any layout (with the `ndarray` feature): a standard-layout
/// (C-contiguous) array is read in place; any other (strided, transposed, Fortran order) is
/// copied into row-major order first.
#[cfg(feature = "ndarray")]
impl<T, S, D> AsArray for ndarray::ArrayBase<S, D>
where
    T: Element,
    S: ndarray::Data<Elem = T>,
    D: ndarray::Dimension,
{
    type Elem = T;
    fn elements(&self) -> Cow<'_, [T]> {
        match self.as_slice() {
            Some(s) => Cow::Borrowed(s),
            None => Cow::Owned(self.iter().copied().collect()),
        }
    }
    fn shape(&self) -> Result<Shape, ShapeError> {
        Shape::new(ndarray::ArrayBase::shape(self))
    }
}

/// The row-major elements of an `ndarray` array without a copy, or why not (with the
/// `ndarray` feature): for callers that asked for zero copy and must not silently get one.
///
/// # Errors
/// [`NotContiguous`] for a view that is not in standard (C-contiguous) layout.
#[cfg(feature = "ndarray")]
pub fn contiguous<T, S, D>(a: &ndarray::ArrayBase<S, D>) -> Result<&[T], NotContiguous>
where
    T: Element,
    S: ndarray::Data<Elem = T>,
    D: ndarray::Dimension,
{
    a.as_slice().ok_or(NotContiguous {
        strides: a.strides().to_vec(),
    })
}

/// An array that is not contiguous in row-major order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the array is not contiguous in row-major (C) order (strides {strides:?}); copy it, e.g. with as_standard_layout()")]
pub struct NotContiguous {
    /// Its strides, in elements.
    pub strides: Vec<isize>,
}

/// Views `bytes` as elements of `T`.
///
/// # Panics
/// If `bytes` is not aligned for `T` or its length is not a multiple of `T`'s size (never for
/// arrays mk1 placed: they start at multiples of 64 bytes and span whole elements).
pub fn cast<T: Element>(bytes: &[u8]) -> &[T] {
    let size = core::mem::size_of::<T>();
    assert!(
        (bytes.as_ptr() as usize).is_multiple_of(core::mem::align_of::<T>())
            && bytes.len().is_multiple_of(size),
        "misaligned array"
    );
    // SAFETY: alignment and length checked above; `Element` is sealed to the ten primitive
    // integer and float types, for which every bit pattern is a valid value. The lifetime and
    // shared borrow carry over from `bytes`.
    unsafe { core::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / size) }
}

/// Views `bytes` as mutable elements of `T` (see [`cast`]).
///
/// # Panics
/// As [`cast`].
pub fn cast_mut<T: Element>(bytes: &mut [u8]) -> &mut [T] {
    let size = core::mem::size_of::<T>();
    assert!(
        (bytes.as_ptr() as usize).is_multiple_of(core::mem::align_of::<T>())
            && bytes.len().is_multiple_of(size),
        "misaligned array"
    );
    // SAFETY: as in `cast`; the exclusive borrow carries over from `bytes`.
    unsafe { core::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast(), bytes.len() / size) }
}

/// The bytes of a slice of elements.
pub fn as_bytes<T: Element>(elems: &[T]) -> &[u8] {
    // SAFETY: any initialised memory may be viewed as bytes; `Element` types have no padding.
    unsafe { core::slice::from_raw_parts(elems.as_ptr().cast(), core::mem::size_of_val(elems)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_check_rank_and_count_elements() {
        assert_eq!(Shape::new(&[]), Err(ShapeError::Rank(0)));
        assert_eq!(Shape::new(&[1, 2, 3, 4, 5]), Err(ShapeError::Rank(5)));
        assert_eq!(Shape::new(&[1 << 32]), Err(ShapeError::Dim(1 << 32)));
        let s = Shape::new(&[2, 3, 4]).unwrap();
        assert_eq!(s.elements(), 24);
        assert_eq!(s.bytes(DType::F64), 192);
        assert_eq!(s.to_string(), "(2, 3, 4)");
        assert_eq!(Shape::d1(5).to_string(), "(5,)");
        assert_eq!(Shape::new(&[0, 7]).unwrap().elements(), 0);
        assert_eq!(Shape::from_raw(0, [1; 4]), None);
        assert_eq!(Shape::from_raw(5, [1; 4]), None);
        assert_eq!(Shape::from_raw(2, [3, 4, 9, 9]), Some(Shape::d2(3, 4)));
        let big = Shape::from_raw(4, [u32::MAX; 4]).unwrap();
        assert_eq!(big.elements(), u64::MAX, "saturates");
    }

    #[test]
    fn casts_round_trip_and_refuse_misalignment() {
        let v: Vec<u64> = vec![1, 2, 3];
        let b = as_bytes(&v);
        assert_eq!(cast::<u32>(b).len(), 6);
        assert_eq!(cast::<u64>(b), &v[..]);
        assert!(std::panic::catch_unwind(|| cast::<u32>(&b[1..5])).is_err());
        assert!(Array::new(vec![1.0f32; 5], Shape::d2(2, 3)).is_err());
        assert_eq!(Array::from_vec(vec![1u8, 2]).shape(), Shape::d1(2));
    }
}
