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
    ndim: u32,
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
            ndim: dims.len() as u32,
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
        // Unused dimensions zeroed by masks, without branches: the shape is then built in
        // registers and stored whole (built piecewise on the stack, each read of it back
        // stalled on store forwarding: 5% of `mk1 run`'s producer at max-dim 16).
        const _: () = assert!(MAX_DIMS == 4, "from_raw masks four dimensions");
        let keep = |i: u32| if i < ndim { u32::MAX } else { 0 };
        let dims = [
            dims[0] & keep(0),
            dims[1] & keep(1),
            dims[2] & keep(2),
            dims[3] & keep(3),
        ];
        Some(Shape { ndim, dims })
    }

    /// The fields a descriptor stores: `(ndim, dims)`, unused dimensions 0.
    pub(crate) fn raw(&self) -> (u32, [u32; MAX_DIMS]) {
        (self.ndim, self.dims)
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
        const _: () = assert!(MAX_DIMS == 4, "elements() multiplies four dimensions");
        let d = |i: usize| {
            if i < self.ndim as usize {
                u64::from(self.dims[i])
            } else {
                1
            }
        };
        // Two products of two dimensions below 2^32 each fit a u64; only their product can
        // overflow.
        (d(0) * d(1)).saturating_mul(d(2) * d(3))
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

    /// An array whose length the caller computed from `shape` (no check but in debug builds).
    pub(crate) fn from_trusted(data: Vec<T>, shape: Shape) -> Array<T> {
        debug_assert_eq!(data.len() as u64, shape.elements());
        Array { data, shape }
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

/// Where two buffers' distance within a page makes `memcpy` slow: the destination 1 to 63
/// bytes after the source (measured slow for 1..32; the margin is cheap).
const SLOW_GAP: usize = 64;
/// Sizes from which glibc's `memcpy` uses `rep movsb` here (about 2 to 4 KiB), so below which
/// a piece is always copied by vector loads and stores.
const PIECE_BYTES: usize = 2048;
/// From about here (448 KiB measured) glibc's `memcpy` uses non-temporal stores instead, fast
/// at any distance (34 GB/s), and faster than pieces (15 GB/s): one `memcpy` again.
const PIECES_BELOW: usize = 512 << 10;

/// Copies `src` into `dst`, which must have the same length, at `memcpy`'s full speed whatever
/// the two addresses are.
///
/// `memcpy` copies blocks from 4 KiB to about 448 KiB with `rep movsb`. On the AMD EPYC host
/// measured here (glibc 2.36) that runs at 1.5–2.7 GB/s instead of 30–50 GB/s when the
/// destination starts 1 to 31 bytes after the source within a page (`(dst - src) mod 4096`). A
/// result copied from a page-aligned slot meets it when the buffer is a block glibc (or numpy)
/// serves by `mmap`, 16 bytes into a page, or for about one heap address in 256. Then a copy of
/// up to 512 KiB goes in pieces of 2 KiB, which `memcpy` does with vector loads and stores (14x
/// faster at 32 KiB, `mk1 bench kernels`); every other case is one `memcpy`.
///
/// # Panics
/// If the lengths differ.
pub fn copy_elements<T: Copy>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "copy_elements: lengths differ");
    // SAFETY: `dst` is a live, exclusive slice of `size_of_val(src)` bytes (same length and
    // type), so it cannot overlap `src`; `T: Copy`, so its bytes are a valid copy.
    unsafe {
        copy_raw(
            src.as_ptr().cast(),
            dst.as_mut_ptr().cast(),
            size_of_val(src),
        )
    }
}

/// Copies `src` to `dst` as [`copy_elements`] does, for a destination that may not be
/// initialised yet (a new numpy array, say).
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes and must not overlap `src`.
pub unsafe fn copy_bytes_to(src: &[u8], dst: *mut u8) {
    // SAFETY: the caller's promise.
    unsafe { copy_raw(src.as_ptr(), dst, src.len()) }
}

/// A new `Vec` holding a copy of `src`, copied as [`copy_elements`] does.
pub fn copied_vec<T: Copy>(src: &[T]) -> Vec<T> {
    // (One allocation of the exact size: `reserve` on an empty `Vec` goes through its growth
    // path, three times the instructions for a small array.)
    let mut v = Vec::with_capacity(src.len());
    extend_copied(&mut v, src);
    v
}

/// Appends a copy of `src` to `v`, copied as [`copy_elements`] does.
pub fn extend_copied<T: Copy>(v: &mut Vec<T>, src: &[T]) {
    v.reserve(src.len());
    let len = v.len();
    // SAFETY: `reserve` left room for `src.len()` more elements after `len`, in `v`'s own
    // allocation, which `src` (a shared borrow while `v` is borrowed mutably) cannot overlap;
    // they are initialised by the copy before `set_len` counts them, and `T: Copy`.
    unsafe {
        let dst = v.as_mut_ptr().add(len);
        copy_raw(src.as_ptr().cast(), dst.cast(), size_of_val(src));
        v.set_len(len + src.len());
    }
}

/// The one copy loop: `bytes` from `src` to `dst` in one `memcpy`, or in pieces of
/// [`PIECE_BYTES`] where one would be slow (see [`copy_elements`]).
///
/// # Safety
/// `src` must be valid for reads and `dst` for writes of `bytes` bytes, not overlapping.
#[inline(always)]
unsafe fn copy_raw(src: *const u8, dst: *mut u8, bytes: usize) {
    if bytes <= PIECE_BYTES {
        // (Small arrays, most of those `map` packs: one call, no gap arithmetic.)
        // SAFETY: the caller's promise.
        unsafe { core::ptr::copy_nonoverlapping(src, dst, bytes) };
        return;
    }
    let piece = if slow_for_memcpy(dst, src, bytes) {
        PIECE_BYTES
    } else {
        bytes
    };
    let mut at = 0;
    while at < bytes {
        let n = piece.min(bytes - at);
        // SAFETY: `at + n <= bytes`, inside both ranges the caller promised.
        unsafe { core::ptr::copy_nonoverlapping(src.add(at), dst.add(at), n) };
        at += n;
    }
}

/// Arrays up to this many bytes go into a slot by non-temporal stores ([`SlotWriter`]);
/// larger ones by [`copy_elements`].
const STREAM_MAX: usize = 1 << 20;

/// Writes arrays into a buffer that a worker on another core reads next (a slot about to be
/// sent), by non-temporal stores where the CPU has them (x86_64): each line goes to memory
/// without being fetched first. An ordinary store fetches the line, and the lines of a slot
/// are mostly in the cache of the worker that ran its previous task, so each would wait on
/// that core; the worker then reads the new bytes from memory, a stream its prefetcher
/// follows ([`crate::PoolBuilder::streaming_stores`] has the figures).
///
/// Non-temporal stores are weakly ordered: without a fence they may become visible after
/// later stores, such as the release that hands the slot to a worker. Dropping the writer
/// runs that fence (`sfence`), and the writer borrows the buffer mutably for its life, so
/// nothing reads or writes the buffer, in this thread or through a later release, before the
/// fence (the rule of `_mm_stream_si128`).
pub(crate) struct SlotWriter<'a> {
    buf: &'a mut [u8],
    /// A non-temporal store was made (the fence is owed).
    streamed: bool,
}

impl<'a> SlotWriter<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Self {
            buf,
            streamed: false,
        }
    }

    /// Copies `src` to `buf[at..at + src.len()]`, by non-temporal stores if `stream` (and the
    /// CPU has them, `src` is at most [`STREAM_MAX`] bytes and the destination is 16-byte
    /// aligned), by ordinary stores otherwise.
    ///
    /// # Panics
    /// If that range is not inside the buffer.
    pub(crate) fn write(&mut self, at: usize, src: &[u8], stream: bool) {
        let dst = &mut self.buf[at..at + src.len()];
        #[cfg(target_arch = "x86_64")]
        if stream && src.len() <= STREAM_MAX && (dst.as_ptr() as usize).is_multiple_of(16) {
            stream_copy(dst, src);
            self.streamed = true;
            return;
        }
        let _ = stream;
        copy_elements(dst, src);
    }
}

impl Drop for SlotWriter<'_> {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        if self.streamed {
            // SAFETY: SSE is part of the x86_64 baseline; a fence has no other effect.
            unsafe { core::arch::x86_64::_mm_sfence() };
        }
    }
}

/// Copies `src` to `dst` (same length, `dst` 16-byte aligned) by non-temporal stores: 16 bytes
/// at a time, then 4, then any last 1 to 3 bytes by ordinary stores.
#[cfg(target_arch = "x86_64")]
fn stream_copy(dst: &mut [u8], src: &[u8]) {
    use core::arch::x86_64::{_mm_loadu_si128, _mm_stream_si128, _mm_stream_si32};
    assert!(dst.len() == src.len() && (dst.as_ptr() as usize).is_multiple_of(16));
    let n = src.len();
    let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
    let mut at = 0;
    // SAFETY: SSE2 is part of the x86_64 baseline. Every access is inside `src` (read, any
    // alignment: `loadu`, `read_unaligned`) or `dst` (written; `dst + at` is 16-byte aligned
    // for the 16-byte stores, as `dst` is and `at` steps by 16); the two do not overlap (a
    // shared and an exclusive borrow). The caller (`SlotWriter`) fences before the bytes are
    // next reached.
    unsafe {
        while at + 16 <= n {
            _mm_stream_si128(d.add(at).cast(), _mm_loadu_si128(s.add(at).cast()));
            at += 16;
        }
        while at + 4 <= n {
            _mm_stream_si32(d.add(at).cast(), s.add(at).cast::<i32>().read_unaligned());
            at += 4;
        }
    }
    dst[at..].copy_from_slice(&src[at..]);
}

/// Whether one `memcpy` of `bytes` from `src` to `dst` would take glibc's slow path (see
/// [`copy_elements`]).
fn slow_for_memcpy(dst: *const u8, src: *const u8, bytes: usize) -> bool {
    let gap = (dst as usize).wrapping_sub(src as usize) % 4096;
    bytes > PIECE_BYTES && bytes < PIECES_BELOW && gap != 0 && gap < SLOW_GAP
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

    /// Every copy helper, at every distance within a page around the slow ones and at sizes
    /// around the piece size, copies exactly `src` and nothing else.
    #[test]
    fn copies_are_exact_at_every_gap_and_size() {
        let mut space = vec![0u8; 6 * 4096 + 200_000];
        let base = space.as_ptr().align_offset(4096);
        for len in [0usize, 1, 100, 2047, 2048, 2049, 4096, 5000, 70_001] {
            for gap in (0..80).chain([4000, 4095]) {
                // (Both start on a page: the destination lies `gap` bytes after the source.)
                let (src, rest) = space[base..].split_at_mut(25 * 4096);
                let src = &mut src[..len];
                src.iter_mut()
                    .enumerate()
                    .for_each(|(i, x)| *x = (i * 7 + 3) as u8);
                let dst_at = gap;
                rest.fill(0xAA);
                copy_elements(&mut rest[dst_at..dst_at + len], src);
                assert_eq!(&rest[dst_at..dst_at + len], &src[..], "len {len} gap {gap}");
                assert!(
                    rest[..dst_at].iter().all(|&b| b == 0xAA),
                    "before, gap {gap}"
                );
                assert!(rest[dst_at + len..dst_at + len + 64]
                    .iter()
                    .all(|&b| b == 0xAA));
                rest.fill(0xAA);
                // SAFETY: `rest` has room for `len` bytes after `dst_at`, apart from `src`.
                unsafe { copy_bytes_to(src, rest.as_mut_ptr().add(dst_at)) };
                assert_eq!(&rest[dst_at..dst_at + len], &src[..], "len {len} gap {gap}");
                assert!(rest[dst_at + len..dst_at + len + 64]
                    .iter()
                    .all(|&b| b == 0xAA));
            }
        }
        let wide: Vec<f64> = (0..70_001).map(|i| i as f64 * 0.5).collect();
        assert_eq!(copied_vec(&wide), wide);
        let mut v = vec![1.0f64, 2.0];
        extend_copied(&mut v, &wide);
        assert_eq!(&v[..2], &[1.0, 2.0]);
        assert_eq!(&v[2..], &wide[..]);
    }

    /// A slot writer copies exactly `src` and nothing else, streamed or not, at every length
    /// around its 16- and 4-byte steps and past its streaming limit, at aligned destinations
    /// (streamed) and misaligned ones (ordinary stores), from sources at any alignment.
    #[test]
    fn a_slot_writer_writes_exactly_its_arrays() {
        let mut buf = vec![0u8; STREAM_MAX + 4096];
        let base = buf.as_ptr().align_offset(64);
        let src: Vec<u8> = (0..STREAM_MAX + 200).map(|i| (i * 13 + 5) as u8).collect();
        let lens = (0..70).chain([255, 256, 257, 2047, 2048, 2049, STREAM_MAX, STREAM_MAX + 17]);
        for len in lens {
            for (at, from) in [(0, 0), (64, 3), (16, 1), (4, 0), (1, 2), (33, 7)] {
                for stream in [true, false] {
                    buf.fill(0xAA);
                    let region = &mut buf[base..base + len + 200];
                    let mut w = SlotWriter::new(region);
                    w.write(at, &src[from..from + len], stream);
                    drop(w);
                    let region = &buf[base..base + len + 200];
                    assert_eq!(
                        &region[at..at + len],
                        &src[from..from + len],
                        "len {len} at {at}"
                    );
                    assert!(region[..at].iter().all(|&b| b == 0xAA), "before, len {len}");
                    assert!(
                        region[at + len..].iter().all(|&b| b == 0xAA),
                        "after, len {len}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_slow_case_is_a_destination_just_after_the_source_in_its_page() {
        let p = |a: usize| a as *const u8;
        assert!(slow_for_memcpy(p(0x1_0010), p(0x5_0000), 1 << 16));
        assert!(slow_for_memcpy(p(0x1_0001), p(0x5_0000), 4096));
        assert!(
            !slow_for_memcpy(p(0x1_0000), p(0x5_0000), 1 << 16),
            "same offset"
        );
        assert!(
            !slow_for_memcpy(p(0x1_0040), p(0x5_0000), 1 << 16),
            "64 or more after"
        );
        assert!(
            !slow_for_memcpy(p(0x1_0000), p(0x5_0010), 1 << 16),
            "before the source"
        );
        assert!(
            !slow_for_memcpy(p(0x1_0010), p(0x5_0000), 2048),
            "one piece anyway"
        );
        assert!(
            !slow_for_memcpy(p(0x1_0010), p(0x5_0000), 1 << 20),
            "non-temporal"
        );
    }

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
