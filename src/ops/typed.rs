//! Elementwise ops on every [`Element`] type: the scalar reference ([`TypedOp::apply_scalar`])
//! and the slice kernels ([`TypedOp::apply`]) with run-time CPU dispatch.
//!
//! The kernels are one generic loop per op, compiled three times: for the baseline target, and
//! inside `#[target_feature]` functions for AVX2 and AVX-512F, where the compiler vectorises the
//! same loop with wider registers. The int32 pipeline keeps its hand-written intrinsics
//! (`x86.rs`); these serve the other nine dtypes and user arrays, and are proptested against the
//! scalar reference for every dtype, odd lengths and unaligned starts.
//!
//! Must never: allocate, make a syscall, or read outside the slice it is given.

use std::fmt;

use super::Kernel;
use crate::dtype::{DType, Element};

/// An elementwise op on elements of type `T`: wrapping for integers, IEEE for floats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ElemOp<T> {
    /// `x * a + b`.
    Affine {
        /// Multiplier.
        a: T,
        /// Addend.
        b: T,
    },
    /// `x + k`.
    Add(T),
    /// `x * k`.
    Mul(T),
    /// `-x`.
    Neg,
    /// `|x|`.
    Abs,
    /// `x` limited to `lo..=hi` (NaN stays NaN).
    Clamp {
        /// Lower bound.
        lo: T,
        /// Upper bound.
        hi: T,
    },
    /// `x ^ k` (integers only).
    Xor(T),
    /// `x & k` (integers only).
    And(T),
    /// `x | k` (integers only).
    Or(T),
    /// `x << n`, `n` less than the width (integers only).
    Shl(u32),
    /// `x >> n`, arithmetic for signed, logical for unsigned, `n` less than the width (integers
    /// only).
    Shr(u32),
}

/// An op that does not make sense for its dtype.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypedOpError {
    /// A bitwise op on a float dtype.
    #[error("{op} is defined for integer dtypes only, not {dtype}")]
    IntegerOnly {
        /// The op.
        op: &'static str,
        /// The dtype.
        dtype: DType,
    },
    /// A shift by the width or more.
    #[error("shift by {n} does not fit {dtype} ({bits} bits)")]
    Shift {
        /// The shift.
        n: u32,
        /// The dtype.
        dtype: DType,
        /// Its width.
        bits: u32,
    },
    /// `clamp` with `lo > hi` (or a NaN bound).
    #[error("clamp bounds {lo} > {hi} (or NaN)")]
    Clamp {
        /// Lower bound, printed.
        lo: String,
        /// Upper bound, printed.
        hi: String,
    },
}

impl<T: Element> ElemOp<T> {
    fn name(&self) -> &'static str {
        match self {
            ElemOp::Affine { .. } => "affine",
            ElemOp::Add(_) => "add",
            ElemOp::Mul(_) => "mul",
            ElemOp::Neg => "neg",
            ElemOp::Abs => "abs",
            ElemOp::Clamp { .. } => "clamp",
            ElemOp::Xor(_) => "xor",
            ElemOp::And(_) => "and",
            ElemOp::Or(_) => "or",
            ElemOp::Shl(_) => "shl",
            ElemOp::Shr(_) => "shr",
        }
    }
}

/// An [`ElemOp`] checked against its dtype: only this runs, so a kernel never meets a bitwise
/// op on floats, a shift past the width or inverted clamp bounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TypedOp<T>(ElemOp<T>);

impl<T: Element> TypedOp<T> {
    /// Checks `op` for dtype `T`.
    pub fn new(op: ElemOp<T>) -> Result<TypedOp<T>, TypedOpError> {
        let dtype = T::DTYPE;
        let bits = 8 * dtype.size() as u32;
        match op {
            ElemOp::Xor(_) | ElemOp::And(_) | ElemOp::Or(_) | ElemOp::Shl(_) | ElemOp::Shr(_)
                if dtype.is_float() =>
            {
                return Err(TypedOpError::IntegerOnly {
                    op: op.name(),
                    dtype,
                })
            }
            ElemOp::Shl(n) | ElemOp::Shr(n) if n >= bits => {
                return Err(TypedOpError::Shift { n, dtype, bits })
            }
            // `!(lo <= hi)` also refuses NaN bounds.
            ElemOp::Clamp { lo, hi } if lo.partial_cmp(&hi).is_none_or(|o| o.is_gt()) => {
                return Err(TypedOpError::Clamp {
                    lo: format!("{lo:?}"),
                    hi: format!("{hi:?}"),
                })
            }
            _ => {}
        }
        Ok(TypedOp(op))
    }

    /// Wraps an op already checked by [`TypedOp::new`] (for a hot path that checked it once
    /// for many arrays).
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn prechecked(op: ElemOp<T>) -> TypedOp<T> {
        debug_assert!(TypedOp::new(op).is_ok());
        TypedOp(op)
    }

    /// The op.
    pub fn op(&self) -> ElemOp<T> {
        self.0
    }

    /// The reference definition, one element.
    #[inline(always)]
    pub fn apply_scalar(&self, x: T) -> T {
        match self.0 {
            ElemOp::Affine { a, b } => x.mul_add(a, b),
            ElemOp::Add(k) => x.add(k),
            ElemOp::Mul(k) => x.mul(k),
            ElemOp::Neg => x.neg(),
            ElemOp::Abs => x.abs(),
            ElemOp::Clamp { lo, hi } => {
                if x < lo {
                    lo
                } else if x > hi {
                    hi
                } else {
                    x
                }
            }
            ElemOp::Xor(k) => x.xor(k),
            ElemOp::And(k) => x.and(k),
            ElemOp::Or(k) => x.or(k),
            ElemOp::Shl(n) => x.shl(n),
            ElemOp::Shr(n) => x.shr(n),
        }
    }

    /// Applies the op in place to every element of `data`, with `kernel` (which must be
    /// available on this CPU: [`Kernel::is_available`]; an unavailable one runs the portable
    /// loop instead).
    pub fn apply(&self, kernel: Kernel, data: &mut [T]) {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 if kernel.is_available() => {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                unsafe { apply_avx512(self, data) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 if kernel.is_available() => {
                // SAFETY: the CPU supports AVX2 (checked just above).
                unsafe { apply_avx2(self, data) }
            }
            _ => apply_loops(self, data),
        }
    }

    /// Out of place: `output[i] = op(input[i])` for every element, in one pass (the same
    /// results as copying `input` to `output` and applying in place, without the second pass
    /// over `output`). `kernel` as for [`TypedOp::apply`].
    ///
    /// # Panics
    /// If the two slices differ in length.
    pub fn apply_to(&self, kernel: Kernel, input: &[T], output: &mut [T]) {
        assert_eq!(input.len(), output.len(), "input and output lengths");
        match kernel {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 if kernel.is_available() => {
                // SAFETY: the CPU supports AVX-512F (checked just above).
                unsafe { apply_to_avx512(self, input, output) }
            }
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 if kernel.is_available() => {
                // SAFETY: the CPU supports AVX2 (checked just above).
                unsafe { apply_to_avx2(self, input, output) }
            }
            _ => apply_loops(self, (input, output)),
        }
    }
}

impl<T: Element> fmt::Display for TypedOp<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0.name(), T::DTYPE)
    }
}

/// Where an op's loop reads and writes: one slice in place, or an input and an output.
trait Sweep<T> {
    /// Runs `f` over every element: `x = f(x)`, or `output[i] = f(input[i])`.
    fn sweep(self, f: impl Fn(T) -> T);
}

impl<T: Copy> Sweep<T> for &mut [T] {
    #[inline(always)]
    fn sweep(self, f: impl Fn(T) -> T) {
        self.iter_mut().for_each(|x| *x = f(*x));
    }
}

impl<T: Copy> Sweep<T> for (&[T], &mut [T]) {
    #[inline(always)]
    fn sweep(self, f: impl Fn(T) -> T) {
        let (input, output) = self;
        output.iter_mut().zip(input).for_each(|(o, &x)| *o = f(x));
    }
}

/// One loop per op, each simple enough for the compiler to vectorise at whatever width the
/// enclosing function's target features allow.
#[inline(always)]
fn apply_loops<T: Element>(op: &TypedOp<T>, data: impl Sweep<T>) {
    match op.0 {
        ElemOp::Affine { a, b } => data.sweep(|x| x.mul_add(a, b)),
        ElemOp::Add(k) => data.sweep(|x| x.add(k)),
        ElemOp::Mul(k) => data.sweep(|x| x.mul(k)),
        ElemOp::Neg => data.sweep(|x| x.neg()),
        ElemOp::Abs => data.sweep(|x| x.abs()),
        ElemOp::Clamp { .. } => data.sweep(|x| op.apply_scalar(x)),
        ElemOp::Xor(k) => data.sweep(|x| x.xor(k)),
        ElemOp::And(k) => data.sweep(|x| x.and(k)),
        ElemOp::Or(k) => data.sweep(|x| x.or(k)),
        ElemOp::Shl(n) => data.sweep(|x| x.shl(n)),
        ElemOp::Shr(n) => data.sweep(|x| x.shr(n)),
    }
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn apply_avx2<T: Element>(op: &TypedOp<T>, data: &mut [T]) {
    apply_loops(op, data)
}

/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn apply_to_avx2<T: Element>(op: &TypedOp<T>, input: &[T], output: &mut [T]) {
    apply_loops(op, (input, output))
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn apply_to_avx512<T: Element>(op: &TypedOp<T>, input: &[T], output: &mut [T]) {
    apply_loops(op, (input, output))
}

/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn apply_avx512<T: Element>(op: &TypedOp<T>, data: &mut [T]) {
    apply_loops(op, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ops<T: Element>(a: u64, b: u64, n: u32) -> Vec<ElemOp<T>> {
        let (a, b) = (T::from_u64(a), T::from_u64(b));
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let bits = 8 * T::DTYPE.size() as u32;
        let mut v = vec![
            ElemOp::Affine { a, b },
            ElemOp::Add(a),
            ElemOp::Mul(b),
            ElemOp::Neg,
            ElemOp::Abs,
            ElemOp::Clamp { lo, hi },
        ];
        if !T::DTYPE.is_float() {
            v.extend([
                ElemOp::Xor(a),
                ElemOp::And(b),
                ElemOp::Or(a),
                ElemOp::Shl(n % bits),
                ElemOp::Shr(n % bits),
            ]);
        }
        v
    }

    /// Every op of dtype `T`, every available kernel, against the scalar reference, on a
    /// sub-slice starting at `skew` (unaligned) of odd length.
    fn check<T: Element>(raw: &[u64], skew: usize, a: u64, b: u64, n: u32) {
        let input: Vec<T> = raw.iter().map(|&x| T::from_u64(x)).collect();
        let skew = skew.min(input.len());
        for op in ops::<T>(a, b, n) {
            let op = TypedOp::new(op).expect("valid for its dtype");
            let want: Vec<T> = input[skew..].iter().map(|&x| op.apply_scalar(x)).collect();
            for kernel in Kernel::available() {
                let mut got = input.clone();
                op.apply(kernel, &mut got[skew..]);
                assert_eq!(&got[..skew], &input[..skew], "{op} {kernel}: wrote outside");
                for (i, (g, w)) in got[skew..].iter().zip(&want).enumerate() {
                    assert!(g.same(*w), "{op} {kernel} at {i}: got {g:?}, want {w:?}");
                }
                // Out of place, into an output at another offset: the elements around it untouched.
                let mut out = vec![T::from_u64(7); want.len() + 3];
                op.apply_to(kernel, &input[skew..], &mut out[1..=want.len()]);
                assert!(out[0].same(T::from_u64(7)) && out[want.len() + 1].same(T::from_u64(7)));
                for (i, (g, w)) in out[1..=want.len()].iter().zip(&want).enumerate() {
                    assert!(
                        g.same(*w),
                        "{op} {kernel} out of place at {i}: {g:?} vs {w:?}"
                    );
                }
            }
        }
    }

    proptest! {
        #[test]
        fn every_dtype_every_kernel_matches_the_reference(
            raw in proptest::collection::vec(any::<u64>(), 0..300),
            skew in 0usize..9,
            a in any::<u64>(),
            b in any::<u64>(),
            n in any::<u32>(),
        ) {
            check::<i8>(&raw, skew, a, b, n);
            check::<u8>(&raw, skew, a, b, n);
            check::<i16>(&raw, skew, a, b, n);
            check::<u16>(&raw, skew, a, b, n);
            check::<i32>(&raw, skew, a, b, n);
            check::<u32>(&raw, skew, a, b, n);
            check::<i64>(&raw, skew, a, b, n);
            check::<u64>(&raw, skew, a, b, n);
            check::<f32>(&raw, skew, a, b, n);
            check::<f64>(&raw, skew, a, b, n);
        }
    }

    #[test]
    fn nan_and_signed_zero_follow_ieee() {
        let v = [f32::NAN, -0.0, 0.0, f32::INFINITY, -1.5];
        let clamp = TypedOp::new(ElemOp::Clamp { lo: -1.0, hi: 1.0 }).unwrap();
        let mut got = v;
        clamp.apply(Kernel::detect(), &mut got);
        assert!(got[0].is_nan(), "NaN stays NaN");
        assert_eq!(got[3], 1.0);
        assert_eq!(got[4], -1.0);
        let neg = TypedOp::new(ElemOp::<f32>::Neg).unwrap();
        let mut z = [0.0f32];
        neg.apply(Kernel::detect(), &mut z);
        assert_eq!(z[0].to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn ops_that_do_not_fit_their_dtype_are_refused() {
        assert!(matches!(
            TypedOp::new(ElemOp::Xor(1.0f32)),
            Err(TypedOpError::IntegerOnly {
                op: "xor",
                dtype: DType::F32
            })
        ));
        assert!(matches!(
            TypedOp::new(ElemOp::<u8>::Shl(8)),
            Err(TypedOpError::Shift { bits: 8, .. })
        ));
        assert!(TypedOp::new(ElemOp::<u8>::Shr(7)).is_ok());
        assert!(TypedOp::new(ElemOp::Clamp { lo: 2i16, hi: 1 }).is_err());
        assert!(TypedOp::new(ElemOp::Clamp {
            lo: f64::NAN,
            hi: 1.0
        })
        .is_err());
        let e = TypedOp::new(ElemOp::Or(0.5f64)).unwrap_err().to_string();
        assert!(
            e.contains("integer dtypes only") && e.contains("float64"),
            "{e}"
        );
    }
}
