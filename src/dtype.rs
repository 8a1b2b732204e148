//! Element types: the [`DType`] code that travels in shared memory, and the sealed [`Element`]
//! trait that ties each Rust type to it.
//!
//! Ten dtypes, named as numpy names them: `int8 uint8 int16 uint16 int32 uint32 int64 uint64
//! float32 float64`. Integers use wrapping arithmetic (as numpy does), floats IEEE 754 (each
//! operation rounded on its own: `x * a + b` is never fused into one rounding, so every kernel
//! gives the bit-identical result of the scalar reference). Arrays are row-major (C order) and
//! contiguous.
//!
//! Building block of the library API (issue 10): the ops in [`crate::ops::typed`] run on every
//! dtype; the slot descriptor does not carry a dtype yet (see the README).

use std::fmt;

/// The element type of an array, as a one-byte code that can sit in shared memory. A code read
/// from shared memory is untrusted: [`DType::from_code`] rejects anything else.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// `i8`, numpy `int8`.
    I8 = 1,
    /// `u8`, numpy `uint8`.
    U8 = 2,
    /// `i16`, numpy `int16`.
    I16 = 3,
    /// `u16`, numpy `uint16`.
    U16 = 4,
    /// `i32`, numpy `int32`.
    I32 = 5,
    /// `u32`, numpy `uint32`.
    U32 = 6,
    /// `i64`, numpy `int64`.
    I64 = 7,
    /// `u64`, numpy `uint64`.
    U64 = 8,
    /// `f32`, numpy `float32`.
    F32 = 9,
    /// `f64`, numpy `float64`.
    F64 = 10,
}

impl DType {
    /// Every dtype, in code order.
    pub const ALL: [DType; 10] = [
        DType::I8,
        DType::U8,
        DType::I16,
        DType::U16,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
        DType::F32,
        DType::F64,
    ];

    /// The code stored in shared memory.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The dtype of a code read from shared memory; `None` for any other value.
    pub fn from_code(code: u8) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.code() == code)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::I16 | DType::U16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// numpy's name for it (`"float32"`), which is also what [`DType::from_name`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::I16 => "int16",
            DType::U16 => "uint16",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::I64 => "int64",
            DType::U64 => "uint64",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    /// The dtype with numpy name `name` (or the Rust name: `"f32"`).
    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.name() == name || format!("{d:?}").eq_ignore_ascii_case(name))
    }

    /// Whether it is `float32` or `float64`.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

mod sealed {
    pub trait Sealed {}
}

/// A Rust type mk1 can move and compute on: exactly the ten of [`DType`] (sealed: no other type
/// can implement it, so a dtype code always names a type mk1 knows).
///
/// The arithmetic methods are the reference semantics of the elementwise ops: wrapping for
/// integers, IEEE for floats.
pub trait Element:
    sealed::Sealed + Copy + PartialEq + PartialOrd + fmt::Debug + Default + Send + Sync + 'static
{
    /// Its dtype.
    const DTYPE: DType;
    /// `self * a + b`, two roundings for floats, wrapping for integers.
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// `self + k`.
    fn add(self, k: Self) -> Self;
    /// `self * k`.
    fn mul(self, k: Self) -> Self;
    /// `-self` (wrapping; for unsigned integers, `0 - self`).
    fn neg(self) -> Self;
    /// `|self|` (wrapping: `i32::MIN` stays `i32::MIN`; unsigned integers are unchanged).
    fn abs(self) -> Self;
    /// Bitwise xor (integers); the bit patterns for floats, which the ops never ask for.
    fn xor(self, k: Self) -> Self;
    /// Bitwise and (integers).
    fn and(self, k: Self) -> Self;
    /// Bitwise or (integers).
    fn or(self, k: Self) -> Self;
    /// Left shift by `n` modulo the width (integers).
    fn shl(self, n: u32) -> Self;
    /// Right shift by `n` modulo the width: arithmetic for signed, logical for unsigned.
    fn shr(self, n: u32) -> Self;
    /// Equal, with every NaN equal to every NaN (what "the same result" means for floats).
    fn same(self, other: Self) -> bool;
    /// A value from the low bits of `x` (integers) or `x` scaled into a small range (floats),
    /// for tests and fills.
    fn from_u64(x: u64) -> Self;
    /// The value's bits in a u64 word (what a descriptor's parameter word holds).
    fn to_word(self) -> u64;
    /// The value whose bits [`Element::to_word`] gave (the low bits of `w`).
    fn from_word(w: u64) -> Self;
    /// `i` exactly, if this type can hold it.
    fn from_i128(i: i128) -> Option<Self>;
    /// `f` as this type: rounded for floats; for integers only a finite whole number in range.
    fn from_f64(f: f64) -> Option<Self>;
}

/// Runs `$body` with the type alias `$T` bound to the Rust type of dtype `$d`. (Its users are
/// left out of the loom build.)
#[cfg_attr(loom, allow(unused_macros))]
macro_rules! with_dtype {
    ($d:expr, $T:ident => $body:expr) => {
        match $d {
            $crate::dtype::DType::I8 => {
                type $T = i8;
                $body
            }
            $crate::dtype::DType::U8 => {
                type $T = u8;
                $body
            }
            $crate::dtype::DType::I16 => {
                type $T = i16;
                $body
            }
            $crate::dtype::DType::U16 => {
                type $T = u16;
                $body
            }
            $crate::dtype::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::dtype::DType::U32 => {
                type $T = u32;
                $body
            }
            $crate::dtype::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::dtype::DType::U64 => {
                type $T = u64;
                $body
            }
            $crate::dtype::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::dtype::DType::F64 => {
                type $T = f64;
                $body
            }
        }
    };
}
#[cfg(not(loom))]
pub(crate) use with_dtype;

macro_rules! int_element {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self { self.wrapping_mul(a).wrapping_add(b) }
            #[inline(always)]
            fn add(self, k: Self) -> Self { self.wrapping_add(k) }
            #[inline(always)]
            fn mul(self, k: Self) -> Self { self.wrapping_mul(k) }
            #[inline(always)]
            fn neg(self) -> Self { (0 as $t).wrapping_sub(self) }
            #[inline(always)]
            fn abs(self) -> Self {
                #[allow(unused_comparisons)]
                if self < 0 { (0 as $t).wrapping_sub(self) } else { self }
            }
            #[inline(always)]
            fn xor(self, k: Self) -> Self { self ^ k }
            #[inline(always)]
            fn and(self, k: Self) -> Self { self & k }
            #[inline(always)]
            fn or(self, k: Self) -> Self { self | k }
            #[inline(always)]
            fn shl(self, n: u32) -> Self { self.wrapping_shl(n) }
            #[inline(always)]
            fn shr(self, n: u32) -> Self { self.wrapping_shr(n) }
            #[inline(always)]
            fn same(self, other: Self) -> bool { self == other }
            fn from_u64(x: u64) -> Self { x as $t }
            fn to_word(self) -> u64 { self as u64 }
            fn from_word(w: u64) -> Self { w as $t }
            fn from_i128(i: i128) -> Option<Self> { <$t>::try_from(i).ok() }
            fn from_f64(f: f64) -> Option<Self> {
                // `as i128` saturates: any |f| >= 2^127 fails the range check below.
                (f.is_finite() && f.fract() == 0.0 && f.abs() < 1.7e38)
                    .then(|| <$t>::try_from(f as i128).ok())
                    .flatten()
            }
        }
    )*};
}

int_element!(i8 => I8, u8 => U8, i16 => I16, u16 => U16, i32 => I32, u32 => U32, i64 => I64, u64 => U64);

macro_rules! float_element {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Element for $t {
            const DTYPE: DType = DType::$d;
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self { self * a + b }
            #[inline(always)]
            fn add(self, k: Self) -> Self { self + k }
            #[inline(always)]
            fn mul(self, k: Self) -> Self { self * k }
            #[inline(always)]
            fn neg(self) -> Self { -self }
            #[inline(always)]
            fn abs(self) -> Self { <$t>::abs(self) }
            #[inline(always)]
            fn xor(self, k: Self) -> Self { <$t>::from_bits(self.to_bits() ^ k.to_bits()) }
            #[inline(always)]
            fn and(self, k: Self) -> Self { <$t>::from_bits(self.to_bits() & k.to_bits()) }
            #[inline(always)]
            fn or(self, k: Self) -> Self { <$t>::from_bits(self.to_bits() | k.to_bits()) }
            #[inline(always)]
            fn shl(self, _n: u32) -> Self { self }
            #[inline(always)]
            fn shr(self, _n: u32) -> Self { self }
            #[inline(always)]
            fn same(self, other: Self) -> bool {
                self.to_bits() == other.to_bits() || (self.is_nan() && other.is_nan())
            }
            fn from_u64(x: u64) -> Self { ((x % 2_000_001) as $t - 1_000_000.0) / 64.0 }
            fn to_word(self) -> u64 { self.to_bits() as u64 }
            fn from_word(w: u64) -> Self { <$t>::from_bits(w as _) }
            fn from_i128(i: i128) -> Option<Self> { Some(i as $t) }
            // (Rounded; a finite value beyond the type's range is refused, not made infinite.)
            fn from_f64(f: f64) -> Option<Self> {
                let x = f as $t;
                (x.is_finite() || !f.is_finite()).then_some(x)
            }
        }
    )*};
}

float_element!(f32 => F32, f64 => F64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_names_and_sizes_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_code(d.code()), Some(d));
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert!(d.size().is_power_of_two());
        }
        assert_eq!(DType::from_name("f32"), Some(DType::F32));
        for bad in [0u8, 11, 255] {
            assert_eq!(DType::from_code(bad), None, "{bad}");
        }
        assert_eq!(DType::from_name("complex64"), None);
        assert_eq!(<u16 as Element>::DTYPE.size(), 2);
        assert_eq!(<f64 as Element>::DTYPE, DType::F64);
    }

    #[test]
    fn integer_semantics_wrap_and_floats_follow_ieee() {
        assert_eq!(<i32 as Element>::abs(i32::MIN), i32::MIN);
        assert_eq!(<u8 as Element>::neg(1), 255);
        assert_eq!(<i8 as Element>::mul_add(100, 3, 1), 45);
        assert_eq!(<u32 as Element>::shr(0x8000_0000, 31), 1);
        assert_eq!(<i32 as Element>::shr(-8, 1), -4);
        assert_eq!(<u64 as Element>::shl(1, 65), 2, "shift modulo the width");
        assert!(<f32 as Element>::same(f32::NAN, -f32::NAN));
        assert!(!<f32 as Element>::same(0.0, -0.0));
        assert_eq!(<f64 as Element>::neg(0.0).to_bits(), (-0.0f64).to_bits());
    }

    #[test]
    fn words_and_conversions() {
        assert_eq!(<i8 as Element>::from_word((-3i8).to_word()), -3);
        assert_eq!(<f32 as Element>::from_word(1.5f32.to_word()), 1.5);
        assert_eq!(<u8 as Element>::from_i128(256), None);
        assert_eq!(<u8 as Element>::from_i128(-1), None);
        assert_eq!(<i16 as Element>::from_f64(-7.0), Some(-7));
        assert_eq!(<i16 as Element>::from_f64(0.5), None);
        assert_eq!(<u64 as Element>::from_f64(f64::NAN), None);
        assert_eq!(<u64 as Element>::from_f64(1e30), None);
        assert_eq!(<f32 as Element>::from_f64(1e40), None);
        assert_eq!(<f32 as Element>::from_f64(-1e40), None);
        assert_eq!(
            <f32 as Element>::from_f64(f64::INFINITY),
            Some(f32::INFINITY)
        );
        assert_eq!(<f32 as Element>::from_f64(0.1), Some(0.1f32));
        assert_eq!(<f32 as Element>::from_i128(3), Some(3.0));
    }
}
