//! Elementwise int32 ops and the kernels that run them: fill, apply, verify.
//!
//! One [`Op`] definition serves the worker (apply) and the producer (verify): both go through
//! [`Op::lanes`], and [`Op::apply_scalar`] is the reference every kernel is tested against.
//! Kernels are chosen at run time ([`Kernel::detect`]): AVX-512 or AVX2 on x86_64, else the
//! portable version (plain Rust that the compiler vectorises for the baseline target: SSE2 on
//! x86_64, NEON on aarch64).
//!
//! Must never: allocate, make a syscall, or read outside the slice it is given.

mod portable;
pub mod typed;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::fmt;
use std::str::FromStr;

/// An elementwise operation on int32 with wrapping arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `x * a + b`.
    Affine {
        /// Multiplier.
        a: i32,
        /// Addend.
        b: i32,
    },
    /// `x + k`.
    Add(i32),
    /// `x * k`.
    Mul(i32),
    /// `x ^ k`.
    Xor(i32),
    /// `-x`.
    Neg,
    /// `|x|` (`i32::MIN` stays `i32::MIN`).
    Abs,
}

impl Default for Op {
    fn default() -> Self {
        Op::Affine { a: 3, b: 1 }
    }
}

/// The three shapes every op reduces to; kernels implement only these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lanes {
    /// `x * a + b` (covers add, mul, neg).
    Affine(i32, i32),
    /// `x ^ k`.
    Xor(i32),
    /// `|x|`, wrapping.
    Abs,
}

impl Lanes {
    /// The reference definition, one element.
    #[inline(always)]
    pub fn scalar(self, x: i32) -> i32 {
        match self {
            Lanes::Affine(a, b) => x.wrapping_mul(a).wrapping_add(b),
            Lanes::Xor(k) => x ^ k,
            Lanes::Abs => x.wrapping_abs(),
        }
    }
}

impl Op {
    /// The kernel shape of this op.
    pub fn lanes(self) -> Lanes {
        match self {
            Op::Affine { a, b } => Lanes::Affine(a, b),
            Op::Add(k) => Lanes::Affine(1, k),
            Op::Mul(k) => Lanes::Affine(k, 0),
            Op::Neg => Lanes::Affine(-1, 0),
            Op::Xor(k) => Lanes::Xor(k),
            Op::Abs => Lanes::Abs,
        }
    }

    /// The reference definition, one element.
    pub fn apply_scalar(self, x: i32) -> i32 {
        match self {
            Op::Affine { a, b } => x.wrapping_mul(a).wrapping_add(b),
            Op::Add(k) => x.wrapping_add(k),
            Op::Mul(k) => x.wrapping_mul(k),
            Op::Xor(k) => x ^ k,
            Op::Neg => x.wrapping_neg(),
            Op::Abs => x.wrapping_abs(),
        }
    }

    /// `(kind, a, b)` as stored in a slot descriptor.
    pub fn encode(self) -> (u32, i32, i32) {
        match self {
            Op::Affine { a, b } => (1, a, b),
            Op::Add(k) => (2, k, 0),
            Op::Mul(k) => (3, k, 0),
            Op::Xor(k) => (4, k, 0),
            Op::Neg => (5, 0, 0),
            Op::Abs => (6, 0, 0),
        }
    }

    /// Inverse of [`encode`](Self::encode); `None` for an unknown kind (untrusted input).
    pub fn decode(kind: u32, a: i32, b: i32) -> Option<Op> {
        Some(match kind {
            1 => Op::Affine { a, b },
            2 => Op::Add(a),
            3 => Op::Mul(a),
            4 => Op::Xor(a),
            5 => Op::Neg,
            6 => Op::Abs,
            _ => return None,
        })
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Affine { a, b } => write!(f, "affine:{a},{b}"),
            Op::Add(k) => write!(f, "add:{k}"),
            Op::Mul(k) => write!(f, "mul:{k}"),
            Op::Xor(k) => write!(f, "xor:{k}"),
            Op::Neg => write!(f, "neg"),
            Op::Abs => write!(f, "abs"),
        }
    }
}

/// An op string that does not parse: the string and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad op `{given}`: {why}; expected affine:A,B | add:K | mul:K | xor:K | neg | abs (K, A, B int32, decimal or 0x hex)"
)]
pub struct OpParseError {
    given: String,
    why: String,
}

/// An integer as op parameters are written: decimal or `0x` hexadecimal, after one `-` at
/// most, with a digit right after the sign or prefix (`--5`, `0x-5` and `+5` are refused).
/// `None` for anything else, and beyond `i128`.
pub(crate) fn parse_int(s: &str) -> Option<i128> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s),
    };
    // (`from_str_radix` and `parse` would take another sign.)
    let int = match digits.strip_prefix("0x") {
        Some(hex) => hex
            .starts_with(|c: char| c.is_ascii_hexdigit())
            .then(|| i128::from_str_radix(hex, 16).ok())
            .flatten(),
        None => digits
            .starts_with(|c: char| c.is_ascii_digit())
            .then(|| digits.parse::<i128>().ok())
            .flatten(),
    }?;
    Some(if neg { -int } else { int })
}

impl FromStr for Op {
    type Err = OpParseError;
    fn from_str(s: &str) -> Result<Op, OpParseError> {
        let err = |why: String| OpParseError {
            given: s.to_string(),
            why,
        };
        // (Decimal or hexadecimal, as `mk1 apply` takes them.)
        let int = |t: &str| {
            let t = t.trim();
            // (A `+` as `str::parse` takes it, before the digits or the `0x`.)
            let unsigned = t
                .strip_prefix('+')
                .filter(|d| d.starts_with(|c: char| c.is_ascii_digit()));
            parse_int(unsigned.unwrap_or(t))
                .and_then(|i| i32::try_from(i).ok())
                .ok_or_else(|| err(format!("`{t}` is not an int32")))
        };
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let takes = |n: &str| err(format!("{name} takes {n}"));
        match (name, arg) {
            ("affine", Some(arg)) => {
                let (a, b) = arg
                    .split_once(',')
                    .ok_or_else(|| takes("2 parameters, A,B"))?;
                Ok(Op::Affine {
                    a: int(a)?,
                    b: int(b)?,
                })
            }
            ("add", Some(k)) => Ok(Op::Add(int(k)?)),
            ("mul", Some(k)) => Ok(Op::Mul(int(k)?)),
            ("xor", Some(k)) => Ok(Op::Xor(int(k)?)),
            ("neg" | "abs", None) => Ok(if name == "neg" { Op::Neg } else { Op::Abs }),
            ("affine", None) => Err(takes("2 parameters, A,B")),
            ("add" | "mul" | "xor", None) => Err(takes("1 parameter, K")),
            ("neg" | "abs", Some(_)) => Err(takes("no parameter")),
            _ => Err(err("unknown op".to_string())),
        }
    }
}

/// Which kernel implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernel {
    /// Plain Rust, vectorised by the compiler for the baseline target.
    Portable,
    /// 256-bit AVX2 intrinsics.
    Avx2,
    /// 512-bit AVX-512F intrinsics.
    Avx512,
}

/// The requested kernel is not supported by this CPU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("kernel `{0}` is not available on this CPU (available: {1})")]
pub struct KernelUnavailable(&'static str, String);

impl Kernel {
    /// Every kernel, fastest last.
    pub const ALL: [Kernel; 3] = [Kernel::Portable, Kernel::Avx2, Kernel::Avx512];

    /// Name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run it.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The fastest kernel this CPU supports.
    pub fn detect() -> Kernel {
        Kernel::ALL
            .into_iter()
            .rev()
            .find(|k| k.is_available())
            .unwrap_or(Kernel::Portable)
    }

    /// What `auto` means: the kernel named by the `MK1_KERNEL` environment variable if it is
    /// set and available (CI uses it to force the portable path), else [`detect`](Self::detect).
    pub fn auto() -> Kernel {
        std::env::var("MK1_KERNEL")
            .ok()
            .and_then(|name| Kernel::ALL.into_iter().find(|k| k.name() == name))
            .filter(|k| k.is_available())
            .unwrap_or_else(Kernel::detect)
    }

    /// Every kernel this CPU supports.
    pub fn available() -> Vec<Kernel> {
        Kernel::ALL
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// `auto` (→ [`detect`](Self::detect)) or a kernel name, checked against this CPU.
    pub fn parse_and_check(s: &str) -> Result<Kernel, String> {
        let k = match s {
            "auto" => return Ok(Kernel::auto()),
            "portable" => Kernel::Portable,
            "avx2" => Kernel::Avx2,
            "avx512" => Kernel::Avx512,
            _ => {
                return Err(format!(
                    "unknown kernel `{s}`: expected auto | portable | avx2 | avx512"
                ))
            }
        };
        Kernels::new(k).map(|_| k).map_err(|e| e.to_string())
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A kernel proven available on this CPU. The only way to run the SIMD code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels(Kernel);

impl Kernels {
    /// Checks that `kernel` runs on this CPU.
    pub fn new(kernel: Kernel) -> Result<Kernels, KernelUnavailable> {
        if kernel.is_available() {
            Ok(Kernels(kernel))
        } else {
            let avail: Vec<&str> = Kernel::available().iter().map(|k| k.name()).collect();
            Err(KernelUnavailable(kernel.name(), avail.join(", ")))
        }
    }

    /// The fastest available kernel.
    pub fn detect() -> Kernels {
        Kernels(Kernel::detect())
    }

    /// Which kernel this is.
    pub fn kernel(self) -> Kernel {
        self.0
    }

    /// `out[i] = base + i` (wrapping): the producer's deterministic fill.
    #[inline]
    pub fn fill(self, base: i32, out: &mut [i32]) {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernels::new` checked that the CPU has AVX2.
            Kernel::Avx2 => unsafe { x86::avx2::fill(base, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernels::new` checked that the CPU has AVX-512F.
            Kernel::Avx512 => unsafe { x86::avx512::fill(base, out) },
            _ => portable::fill(base, out),
        }
    }

    /// `x = op(x)` for every element, in place.
    #[inline]
    pub fn apply(self, op: Op, data: &mut [i32]) {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernels::new` checked that the CPU has AVX2.
            Kernel::Avx2 => unsafe { x86::avx2::apply(op.lanes(), data) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernels::new` checked that the CPU has AVX-512F.
            Kernel::Avx512 => unsafe { x86::avx512::apply(op.lanes(), data) },
            _ => portable::apply(op.lanes(), data),
        }
    }

    /// Index of the first `i` with `data[i] != op(base + i)`, or `None` if all match.
    #[inline]
    pub fn verify(self, op: Op, base: i32, data: &[i32]) -> Option<usize> {
        match self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernels::new` checked that the CPU has AVX2.
            Kernel::Avx2 => unsafe { x86::avx2::verify(op.lanes(), base, data) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernels::new` checked that the CPU has AVX-512F.
            Kernel::Avx512 => unsafe { x86::avx512::verify(op.lanes(), base, data) },
            _ => portable::verify(op.lanes(), base, data),
        }
    }
}

impl Kernels {
    /// Verifies the old matrix in a slot and writes the fill of a new one over it, in one pass
    /// over the memory they share: `data[..old_len]` is checked against `op(old_base + i)`,
    /// then `data[..new_len]` holds `new_base + i`. Returns the first mismatch of the old
    /// matrix as `(index, value found)`. Every old element is checked before it is overwritten.
    pub fn verify_then_fill(
        self,
        op: Op,
        old_base: i32,
        old_len: usize,
        new_base: i32,
        new_len: usize,
        data: &mut [i32],
    ) -> Option<(usize, i32)> {
        let common = old_len.min(new_len);
        let lanes = op.lanes();
        let done = match self.0 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernels::new` checked that the CPU has AVX2.
            Kernel::Avx2 => unsafe {
                x86::avx2::check_and_refill(lanes, old_base, new_base, &mut data[..common])
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernels::new` checked that the CPU has AVX-512F.
            Kernel::Avx512 => unsafe {
                x86::avx512::check_and_refill(lanes, old_base, new_base, &mut data[..common])
            },
            _ => portable::check_and_refill(lanes, old_base, new_base, &mut data[..common]),
        };
        // The rest: whatever of the old matrix is left is checked first, then filled over.
        let bad = self
            .verify(op, old_base.wrapping_add(done as i32), &data[done..old_len])
            .map(|j| (done + j, data[done + j]));
        if done < new_len {
            self.fill(new_base.wrapping_add(done as i32), &mut data[done..new_len]);
        }
        bad
    }
}

/// Reference implementations, element by element, used by the tests.
pub mod reference {
    use super::Op;

    /// `out[i] = base + i`.
    pub fn fill(base: i32, out: &mut [i32]) {
        for (i, x) in out.iter_mut().enumerate() {
            *x = base.wrapping_add(i as i32);
        }
    }

    /// `x = op(x)`.
    pub fn apply(op: Op, data: &mut [i32]) {
        for x in data {
            *x = op.apply_scalar(*x);
        }
    }

    /// First mismatch against `op(base + i)`.
    pub fn verify(op: Op, base: i32, data: &[i32]) -> Option<usize> {
        data.iter()
            .enumerate()
            .position(|(i, &x)| x != op.apply_scalar(base.wrapping_add(i as i32)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OPS: [Op; 8] = [
        Op::Affine { a: 3, b: 1 },
        Op::Affine { a: -7, b: i32::MAX },
        Op::Add(5),
        Op::Mul(-3),
        Op::Xor(0x5a5a_5a5a),
        Op::Neg,
        Op::Abs,
        Op::Mul(i32::MIN),
    ];

    #[test]
    fn parse_display_round_trip() {
        for op in OPS {
            assert_eq!(op.to_string().parse::<Op>(), Ok(op));
            let (k, a, b) = op.encode();
            assert_eq!(Op::decode(k, a, b), Some(op));
        }
        // Each refusal says what is wrong, not only that the op is unknown.
        for (bad, why) in [
            ("", "unknown op"),
            ("affine", "affine takes 2 parameters"),
            ("affine:1", "affine takes 2 parameters"),
            ("add", "add takes 1 parameter"),
            ("add:x", "`x` is not an int32"),
            ("neg:1", "neg takes no parameter"),
            ("sqrt", "unknown op"),
            ("mul:99999999999", "`99999999999` is not an int32"),
            ("xor:0x80000000", "`0x80000000` is not an int32"),
            ("add:0x-5", "`0x-5` is not an int32"),
            ("add:--5", "`--5` is not an int32"),
            ("add:+-5", "`+-5` is not an int32"),
            ("add:0x", "`0x` is not an int32"),
        ] {
            let e = bad.parse::<Op>().expect_err(bad).to_string();
            assert!(
                e.contains(why) && e.contains("expected affine:A,B"),
                "{bad}: {e}"
            );
        }
        // Hexadecimal as `mk1 apply` takes it, and a `+` as before.
        for (given, op) in [
            ("xor:0xff", Op::Xor(0xff)),
            ("add:-0x10", Op::Add(-16)),
            ("xor:0x7fffffff", Op::Xor(i32::MAX)),
            ("add:-0x80000000", Op::Add(i32::MIN)),
            ("affine:0x2, -0x1", Op::Affine { a: 2, b: -1 }),
            ("add:+5", Op::Add(5)),
            ("mul:+0x3", Op::Mul(3)),
        ] {
            assert_eq!(given.parse::<Op>(), Ok(op), "{given}");
        }
        assert_eq!(Op::decode(0, 0, 0), None);
        assert_eq!(Op::decode(7, 0, 0), None);
    }

    #[test]
    fn lanes_match_the_op_definition() {
        let xs = [0, 1, -1, 17, i32::MIN, i32::MAX, 123_456_789];
        for op in OPS {
            for x in xs {
                assert_eq!(op.lanes().scalar(x), op.apply_scalar(x), "{op} at {x}");
            }
        }
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            (any::<i32>(), any::<i32>()).prop_map(|(a, b)| Op::Affine { a, b }),
            any::<i32>().prop_map(Op::Add),
            any::<i32>().prop_map(Op::Mul),
            any::<i32>().prop_map(Op::Xor),
            Just(Op::Neg),
            Just(Op::Abs),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Every available kernel agrees with the reference on fill, apply and verify, for
        /// random lengths (0 included), unaligned starts and every op.
        #[test]
        fn kernels_match_reference(
            op in op_strategy(),
            base in any::<i32>(),
            len in 0usize..700,
            skew in 0usize..16,
            flip in any::<prop::sample::Index>(),
        ) {
            let mut want = vec![0i32; len];
            reference::fill(base, &mut want);
            reference::apply(op, &mut want);
            for kernel in Kernel::available() {
                let k = Kernels::new(kernel).unwrap();
                let mut buf = vec![0i32; len + skew];
                let data = &mut buf[skew..];
                k.fill(base, data);
                let mut filled = vec![0; len];
                reference::fill(base, &mut filled);
                prop_assert_eq!(&data[..], &filled[..], "fill, {}", kernel);
                k.apply(op, data);
                prop_assert_eq!(&data[..], &want[..], "apply, {}", kernel);
                prop_assert_eq!(k.verify(op, base, data), None, "verify clean, {}", kernel);
                if len > 0 {
                    let at = flip.index(len);
                    data[at] ^= 1 << (at % 32);
                    prop_assert_eq!(k.verify(op, base, data), Some(at), "verify flipped, {}", kernel);
                    prop_assert_eq!(reference::verify(op, base, data), Some(at));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The fused verify-then-fill agrees with verify followed by fill, for every kernel,
        /// any pair of lengths, with or without a wrong element.
        #[test]
        fn verify_then_fill_matches_verify_and_fill(
            op in op_strategy(),
            old_base in any::<i32>(),
            new_base in any::<i32>(),
            old_len in 0usize..600,
            new_len in 0usize..600,
            flip in any::<Option<prop::sample::Index>>(),
        ) {
            let cap = old_len.max(new_len) + 3;
            let mut slot = vec![7i32; cap];
            reference::fill(old_base, &mut slot[..old_len]);
            reference::apply(op, &mut slot[..old_len]);
            let bad = flip.filter(|_| old_len > 0).map(|ix| {
                let at = ix.index(old_len);
                slot[at] ^= 0x100;
                (at, slot[at])
            });
            let mut want = slot.clone();
            reference::fill(new_base, &mut want[..new_len]);
            for kernel in Kernel::available() {
                let k = Kernels::new(kernel).unwrap();
                let mut data = slot.clone();
                let got = k.verify_then_fill(op, old_base, old_len, new_base, new_len, &mut data);
                prop_assert_eq!(got, bad, "{}", kernel);
                prop_assert_eq!(&data, &want, "{}", kernel);
            }
        }
    }

    #[test]
    fn verify_finds_the_first_of_several_errors() {
        for kernel in Kernel::available() {
            let k = Kernels::new(kernel).unwrap();
            let mut d = vec![0; 1000];
            k.fill(7, &mut d);
            k.apply(Op::Neg, &mut d);
            d[999] = 0;
            d[130] = 0;
            d[131] = 0;
            assert_eq!(k.verify(Op::Neg, 7, &d), Some(130), "{kernel}");
        }
    }

    #[test]
    fn unavailable_kernel_is_an_error_not_a_crash() {
        for kernel in Kernel::ALL {
            assert_eq!(Kernels::new(kernel).is_ok(), kernel.is_available());
        }
        assert!(Kernel::parse_and_check("sse9").is_err());
        assert_eq!(Kernel::parse_and_check("auto"), Ok(Kernel::auto()));
    }
}
