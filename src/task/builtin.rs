//! The built-in elementwise ops as tasks: written once without a dtype (`affine:2,1`), checked
//! and converted for the dtype of each array at submit, carried as an op code and two
//! parameter words, and run in the worker by the SIMD kernels of [`crate::ops::typed`] (no user
//! code involved).

use std::fmt;

use super::exec::RawIo;
use super::Params;
use crate::dtype::{with_dtype, DType, Element};
use crate::layout::BUILTIN;
use crate::ops::typed::{ElemOp, TypedOp};
use crate::ops::Kernel;

/// A parameter of a built-in op as written: an integer or a float.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// An integer (exact for every integer dtype).
    Int(i128),
    /// A float.
    Float(f64),
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v.into())
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Value {
        Value::Int(v.into())
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Float(v)
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            // (Shortest text that reads back the same: `1.0`, not `1`; `1e-320`, not 320
            // digits.)
            Value::Float(x) => write!(f, "{x:?}"),
        }
    }
}

/// A built-in elementwise op, for any dtype it makes sense for: wrapping arithmetic on
/// integers, IEEE on floats; `xor`, `and`, `or`, `shl`, `shr` on integers only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Builtin {
    /// `x * a + b`.
    Affine(Value, Value),
    /// `x + k`.
    Add(Value),
    /// `x * k`.
    Mul(Value),
    /// `-x`.
    Neg,
    /// `|x|`.
    Abs,
    /// `x` limited to `lo..=hi`.
    Clamp(Value, Value),
    /// `x ^ k`.
    Xor(Value),
    /// `x & k`.
    And(Value),
    /// `x | k`.
    Or(Value),
    /// `x << n`.
    Shl(Value),
    /// `x >> n` (arithmetic for signed dtypes).
    Shr(Value),
}

/// A built-in op that cannot be run as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuiltinError {
    /// Not one of the op names, or the wrong number of parameters.
    #[error("bad op `{given}`: {why}")]
    Syntax {
        /// What was given.
        given: String,
        /// What is wrong.
        why: String,
    },
    /// A parameter the dtype cannot hold exactly, or an op the dtype does not have.
    #[error("op {op} on {dtype}: {why}")]
    Dtype {
        /// The op, as written.
        op: String,
        /// The dtype.
        dtype: DType,
        /// What is wrong.
        why: String,
    },
}

/// The op names, as [`Builtin::parse`] takes them.
pub const NAMES: &str =
    "affine:A,B  add:K  mul:K  neg  abs  clamp:LO,HI  xor:K  and:K  or:K  shl:N  shr:N";

impl Builtin {
    /// Parses `name[:a[,b]]`, e.g. `affine:2,1`, `clamp:0,255`, `neg`. Parameters are integers
    /// (`-3`, `0x10`) or floats (`2.5`, `1e-3`).
    ///
    /// # Errors
    /// [`BuiltinError::Syntax`] naming what is wrong and listing the ops.
    pub fn parse(s: &str) -> Result<Builtin, BuiltinError> {
        let bad = |why: String| BuiltinError::Syntax {
            given: s.to_string(),
            why,
        };
        let (name, rest) = s.split_once(':').unwrap_or((s, ""));
        if s.contains(':') && rest.trim().is_empty() {
            return Err(bad(format!(
                "nothing after the colon (write `{name}` for no parameter)"
            )));
        }
        let args: Vec<Value> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split(',')
                .map(|a| parse_value(a.trim()).ok_or_else(|| bad(format!("{a:?} is not a number"))))
                .collect::<Result<_, _>>()?
        };
        let want = |n: usize| {
            if args.len() == n {
                Ok(())
            } else {
                Err(bad(format!(
                    "{name} takes {n} parameter{}, got {}",
                    if n == 1 { "" } else { "s" },
                    args.len()
                )))
            }
        };
        let op = match name {
            "affine" => want(2).map(|_| Builtin::Affine(args[0], args[1])),
            "add" => want(1).map(|_| Builtin::Add(args[0])),
            "mul" => want(1).map(|_| Builtin::Mul(args[0])),
            "neg" => want(0).map(|_| Builtin::Neg),
            "abs" => want(0).map(|_| Builtin::Abs),
            "clamp" => want(2).map(|_| Builtin::Clamp(args[0], args[1])),
            "xor" => want(1).map(|_| Builtin::Xor(args[0])),
            "and" => want(1).map(|_| Builtin::And(args[0])),
            "or" => want(1).map(|_| Builtin::Or(args[0])),
            "shl" => want(1).map(|_| Builtin::Shl(args[0])),
            "shr" => want(1).map(|_| Builtin::Shr(args[0])),
            _ => Err(bad(format!("unknown op; the ops are: {NAMES}"))),
        }?;
        Ok(op)
    }

    fn code(&self) -> u32 {
        match self {
            Builtin::Affine(..) => 1,
            Builtin::Add(_) => 2,
            Builtin::Mul(_) => 3,
            Builtin::Neg => 4,
            Builtin::Abs => 5,
            Builtin::Clamp(..) => 6,
            Builtin::Xor(_) => 7,
            Builtin::And(_) => 8,
            Builtin::Or(_) => 9,
            Builtin::Shl(_) => 10,
            Builtin::Shr(_) => 11,
        }
    }

    fn values(&self) -> (Option<Value>, Option<Value>) {
        match *self {
            Builtin::Affine(a, b) | Builtin::Clamp(a, b) => (Some(a), Some(b)),
            Builtin::Add(k)
            | Builtin::Mul(k)
            | Builtin::Xor(k)
            | Builtin::And(k)
            | Builtin::Or(k)
            | Builtin::Shl(k)
            | Builtin::Shr(k) => (Some(k), None),
            Builtin::Neg | Builtin::Abs => (None, None),
        }
    }

    /// The op for dtype `T`, checked: every parameter held exactly (floats rounded), and the op
    /// defined for `T`.
    ///
    /// # Errors
    /// [`BuiltinError::Dtype`] saying which parameter or op does not fit.
    pub fn typed<T: Element>(&self) -> Result<TypedOp<T>, BuiltinError> {
        let bad = |why: String| BuiltinError::Dtype {
            op: self.to_string(),
            dtype: T::DTYPE,
            why,
        };
        let conv = |v: Value| -> Result<T, BuiltinError> {
            match v {
                Value::Int(i) => T::from_i128(i),
                Value::Float(f) => T::from_f64(f),
            }
            .ok_or_else(|| bad(format!("{v} is not a value of {}", T::DTYPE)))
        };
        let shift = |v: Value| -> Result<u32, BuiltinError> {
            match v {
                Value::Int(i) => u32::try_from(i)
                    .map_err(|_| bad(format!("shift {i} is not a number of bits (0 or more)"))),
                // A whole float counts as its integer, as for every other parameter.
                Value::Float(f) if f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f) => {
                    Ok(f as u32)
                }
                Value::Float(f) => Err(bad(format!(
                    "shift {f:?} is not a whole number of bits (give one such as 3)"
                ))),
            }
        };
        let op = match *self {
            Builtin::Affine(a, b) => ElemOp::Affine {
                a: conv(a)?,
                b: conv(b)?,
            },
            Builtin::Add(k) => ElemOp::Add(conv(k)?),
            Builtin::Mul(k) => ElemOp::Mul(conv(k)?),
            Builtin::Neg => ElemOp::Neg,
            Builtin::Abs => ElemOp::Abs,
            Builtin::Clamp(lo, hi) => ElemOp::Clamp {
                lo: conv(lo)?,
                hi: conv(hi)?,
            },
            Builtin::Xor(k) => ElemOp::Xor(conv(k)?),
            Builtin::And(k) => ElemOp::And(conv(k)?),
            Builtin::Or(k) => ElemOp::Or(conv(k)?),
            Builtin::Shl(n) => ElemOp::Shl(shift(n)?),
            Builtin::Shr(n) => ElemOp::Shr(shift(n)?),
        };
        TypedOp::new(op).map_err(|e| bad(e.to_string()))
    }

    /// Whether this op, with its parameters, works on `dtype`.
    ///
    /// # Errors
    /// As [`Builtin::typed`].
    pub fn check(&self, dtype: DType) -> Result<(), BuiltinError> {
        with_dtype!(dtype, T => self.typed::<T>().map(|_| ()))
    }

    /// What a descriptor carries for this op on `dtype`: the kernel code and the parameter
    /// words (the converted values' bits).
    ///
    /// # Errors
    /// As [`Builtin::typed`].
    pub(crate) fn encode(&self, dtype: DType) -> Result<(u32, Params), BuiltinError> {
        let words: [u64; 2] = with_dtype!(dtype, T => {
            let op = self.typed::<T>()?;
            match op.op() {
                ElemOp::Affine { a, b } | ElemOp::Clamp { lo: a, hi: b } => [a.to_word(), b.to_word()],
                ElemOp::Add(k) | ElemOp::Mul(k) | ElemOp::Xor(k) | ElemOp::And(k) | ElemOp::Or(k) => {
                    [k.to_word(), 0]
                }
                ElemOp::Shl(n) | ElemOp::Shr(n) => [u64::from(n), 0],
                ElemOp::Neg | ElemOp::Abs => [0, 0],
            }
        });
        Ok((
            BUILTIN + self.code(),
            Params::from_words(&words).expect("two words fit"),
        ))
    }
}

/// A worker's side: rebuilds the op for `T` from an untrusted descriptor's code and words and
/// validates it exactly as at submit.
pub(crate) fn decode<T: Element>(code: u32, p: &Params) -> Result<TypedOp<T>, String> {
    TypedOp::new(elem_op(code, p)?).map_err(|e| e.to_string())
}

/// Checks a descriptor's op for `dtype` (once per task; see [`run_prechecked_each`]).
pub(crate) fn validate(code: u32, p: &Params, dtype: DType) -> Result<(), String> {
    with_dtype!(dtype, T => decode::<T>(code, p).map(|_| ()))
}

fn elem_op<T: Element>(code: u32, p: &Params) -> Result<ElemOp<T>, String> {
    let w = |i: usize| p.words().get(i).copied().unwrap_or(0);
    let (a, b) = (T::from_word(w(0)), T::from_word(w(1)));
    let n = w(0).min(u64::from(u32::MAX)) as u32;
    let op = match code.wrapping_sub(BUILTIN) {
        1 => ElemOp::Affine { a, b },
        2 => ElemOp::Add(a),
        3 => ElemOp::Mul(a),
        4 => ElemOp::Neg,
        5 => ElemOp::Abs,
        6 => ElemOp::Clamp { lo: a, hi: b },
        7 => ElemOp::Xor(a),
        8 => ElemOp::And(a),
        9 => ElemOp::Or(a),
        10 => ElemOp::Shl(n),
        11 => ElemOp::Shr(n),
        other => return Err(format!("unknown built-in op code {other}")),
    };
    Ok(op)
}

/// Runs a built-in op that [`validate`] accepted on every array `arrays` yields (bytes of
/// elements of `dtype`), decoding the op once for all of them. Out of place the op reads the
/// input and writes the output in one pass.
pub(crate) fn run_prechecked_each<'b>(
    code: u32,
    p: &Params,
    dtype: DType,
    simd: Kernel,
    arrays: impl Iterator<Item = RawIo<'b>>,
) {
    use crate::array::{cast, cast_mut};
    with_dtype!(dtype, T => {
        if let Ok(op) = elem_op::<T>(code, p) {
            let op = TypedOp::prechecked(op);
            for a in arrays {
                match a {
                    RawIo::InPlace(d) => op.apply(simd, cast_mut::<T>(d)),
                    RawIo::OutOfPlace(i, o) => op.apply_to(simd, cast::<T>(i), cast_mut::<T>(o)),
                }
            }
        }
    })
}

fn parse_value(s: &str) -> Option<Value> {
    if let Some(i) = crate::ops::parse_int(s) {
        return Some(Value::Int(i));
    }
    // (A finite number beyond float64, `1e400`, is refused rather than taken as infinity;
    // `inf` says what it is.)
    s.parse::<f64>()
        .ok()
        .filter(|f| !f.is_infinite() || s.to_ascii_lowercase().contains("inf"))
        .map(Value::Float)
}

impl fmt::Display for Builtin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Builtin::Affine(..) => "affine",
            Builtin::Add(_) => "add",
            Builtin::Mul(_) => "mul",
            Builtin::Neg => "neg",
            Builtin::Abs => "abs",
            Builtin::Clamp(..) => "clamp",
            Builtin::Xor(_) => "xor",
            Builtin::And(_) => "and",
            Builtin::Or(_) => "or",
            Builtin::Shl(_) => "shl",
            Builtin::Shr(_) => "shr",
        };
        match self.values() {
            (Some(a), Some(b)) => write!(f, "{name}:{a},{b}"),
            (Some(a), None) => write!(f, "{name}:{a}"),
            _ => f.write_str(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for s in ["affine:2,1", "neg", "clamp:-1.5,2.5", "shl:3", "xor:16"] {
            assert_eq!(Builtin::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(
            Builtin::parse("add:0x10").unwrap(),
            Builtin::Add(Value::Int(16))
        );
        for bad in ["affine:1", "neg:1", "frob", "add:x", "affine:1,2,3", ""] {
            assert!(Builtin::parse(bad).is_err(), "{bad}");
        }
        // One sign at most, right before the digits; nothing empty after a colon or comma.
        for bad in [
            "add:--5",
            "add:0x-5",
            "add:-0x-5",
            "add:0x+5",
            "add:-+5",
            "affine:1,",
        ] {
            assert!(Builtin::parse(bad).is_err(), "{bad}");
        }
        for s in ["neg:", "add:", "add: "] {
            let e = Builtin::parse(s).unwrap_err().to_string();
            assert!(e.contains("nothing after the colon"), "{s}: {e}");
        }
        assert_eq!(
            Builtin::parse("add:-5").unwrap(),
            Builtin::Add(Value::Int(-5))
        );
        assert_eq!(
            Builtin::parse("add:-0x10").unwrap(),
            Builtin::Add(Value::Int(-16))
        );
        assert_eq!(
            Builtin::parse("add:+5").unwrap(),
            Builtin::Add(Value::Float(5.0))
        );
        // Hexadecimal digits that are letters, first too (`0xff` was once refused).
        assert_eq!(
            Builtin::parse("xor:0xff").unwrap(),
            Builtin::Xor(Value::Int(255))
        );
        assert_eq!(
            Builtin::parse("and:-0xAb").unwrap(),
            Builtin::And(Value::Int(-0xab))
        );
        assert!(Builtin::parse("frob")
            .unwrap_err()
            .to_string()
            .contains("affine:A,B"));
    }

    #[test]
    fn parameters_must_fit_the_dtype() {
        let op = Builtin::parse("add:300").unwrap();
        assert!(op.typed::<u8>().unwrap_err().to_string().contains("uint8"));
        assert!(op.typed::<i16>().is_ok());
        assert!(Builtin::parse("mul:2.5").unwrap().typed::<i32>().is_err());
        assert!(Builtin::parse("mul:2.0").unwrap().typed::<i32>().is_ok());
        assert!(Builtin::parse("xor:1").unwrap().typed::<f32>().is_err());
        assert!(Builtin::parse("shl:8").unwrap().typed::<u8>().is_err());
        // A whole float is its integer, as for the other parameters (`xor:1.0` on ints); any
        // other float is refused, named as written.
        assert!(Builtin::parse("shr:1.0").unwrap().typed::<u32>().is_ok());
        let e = Builtin::parse("shr:1.5")
            .unwrap()
            .typed::<u32>()
            .unwrap_err();
        assert!(
            e.to_string().contains("shift 1.5 is not a whole number"),
            "{e}"
        );
        assert_eq!(
            Builtin::parse("mul:1e-320").unwrap().to_string(),
            "mul:1e-320"
        );
        assert_eq!(Builtin::parse("mul:2.0").unwrap().to_string(), "mul:2.0");
        assert!(Builtin::parse("clamp:5,1").unwrap().typed::<f64>().is_err());
    }

    #[test]
    fn encode_then_decode_gives_the_same_op_for_every_dtype() {
        for d in DType::ALL {
            for s in [
                "affine:3,1",
                "add:-2",
                "neg",
                "abs",
                "clamp:-4,9",
                "shr:1",
                "or:6",
            ] {
                let op = Builtin::parse(s).unwrap();
                let Ok((code, p)) = op.encode(d) else {
                    assert!(d.is_float() || s.starts_with('a') || s.contains('-'));
                    continue;
                };
                with_dtype!(d, T => {
                    assert_eq!(decode::<T>(code, &p).unwrap(), op.typed::<T>().unwrap(), "{s} {d}");
                });
            }
        }
        assert!(decode::<i32>(BUILTIN + 99, &Params::none()).is_err());
        assert!(decode::<u8>(BUILTIN + 10, &Params::from_words(&[9]).unwrap()).is_err());
    }
}
