//! x86_64 kernels: AVX2 (8 lanes) and AVX-512F (16 lanes), generated from one template so the
//! two can never drift apart. Each loop handles four vectors per iteration (unaligned loads and
//! stores; slots are 64-byte aligned, so in practice the 512-bit ones never split a line) and
//! hands the remainder (fewer than four vectors) to the portable kernel.
//!
//! Every function here is `unsafe` only because it requires its CPU feature; callers go through
//! `ops::Kernels`, which checks the feature once at construction.

macro_rules! simd_kernels {
    (
        $module:ident, $feature:literal, $lanes:literal, $iota:expr,
        set1 $set1:ident, add $add:ident, mullo $mullo:ident, xor $xor:ident, or $or:ident,
        abs $abs:ident, load $load:ident, store $store:ident, nonzero $nonzero:ident,
        tail $tail:ident
    ) => {
        pub mod $module {
            use core::arch::x86_64::*;

            use super::*;
            use crate::ops::{portable, Lanes};

            /// Lanes per vector.
            const L: usize = $lanes;
            /// Elements per unrolled iteration.
            const STEP: usize = 4 * L;

            /// Applies `$f` to 4 consecutive vectors of `data` starting at `i`, in place.
            macro_rules! map4 {
                ($data:ident, $i:ident, |$x:ident| $f:expr) => {{
                    let p = $data.as_mut_ptr();
                    while $i + STEP <= $data.len() {
                        // SAFETY: `i + STEP <= len`, so the four vectors at `p + i`,
                        // `p + i + L`, … are inside `data`; loads and stores are unaligned.
                        unsafe {
                            let a = $load(p.add($i).cast());
                            let b = $load(p.add($i + L).cast());
                            let c = $load(p.add($i + 2 * L).cast());
                            let d = $load(p.add($i + 3 * L).cast());
                            let $x = a;
                            $store(p.add($i).cast(), $f);
                            let $x = b;
                            $store(p.add($i + L).cast(), $f);
                            let $x = c;
                            $store(p.add($i + 2 * L).cast(), $f);
                            let $x = d;
                            $store(p.add($i + 3 * L).cast(), $f);
                        }
                        $i += STEP;
                    }
                    // Then one vector at a time, so the portable tail is shorter than a vector.
                    while $i + L <= $data.len() {
                        // SAFETY: `i + L <= len`: one vector inside `data`.
                        unsafe {
                            let $x = $load(p.add($i).cast());
                            $store(p.add($i).cast(), $f);
                        }
                        $i += L;
                    }
                }};
            }

            /// `[s(v), s(v + L), s(v + 2·L), s(v + 3·L)]`: the states of 4 consecutive
            /// vectors whose first holds the fill values `v` (one per lane).
            macro_rules! states4 {
                ($v:expr, |$x:ident| $s:expr) => {{
                    let lane = $set1(L as i32);
                    let v0 = $v;
                    let v1 = $add(v0, lane);
                    let v2 = $add(v1, lane);
                    let v3 = $add(v2, lane);
                    let $x = v0;
                    let s0 = $s;
                    let $x = v1;
                    let s1 = $s;
                    let $x = v2;
                    let s2 = $s;
                    let $x = v3;
                    let s3 = $s;
                    [s0, s1, s2, s3]
                }};
            }

            /// Each of 4 states advanced by the same vector.
            macro_rules! advance4 {
                ($s:ident, $by:ident) => {
                    $s = [
                        $add($s[0], $by),
                        $add($s[1], $by),
                        $add($s[2], $by),
                        $add($s[3], $by),
                    ]
                };
            }

            /// Expands `$m!` once per op with how that op's expected values `op(base + i)` are
            /// tracked: `|x| state` maps fill values to a state, which grows by `inc` per
            /// element, and `|y| expected` maps a state to the expected values. An affine op's
            /// state is its expected value itself: `a·(base + i) + b` grows by exactly `a` per
            /// element in wrapping arithmetic, so a vector costs one add, not a multiply and
            /// two adds. Xor and abs are not linear: their state is the fill value.
            macro_rules! per_op {
                ($op:expr, $m:ident) => {
                    match $op {
                        Lanes::Affine(a, b) => {
                            let (va, vb) = ($set1(a), $set1(b));
                            $m!(|x| $add($mullo(x, va), vb), a, |y| y)
                        }
                        Lanes::Xor(k) => {
                            let vk = $set1(k);
                            $m!(|x| x, 1, |y| $xor(y, vk))
                        }
                        Lanes::Abs => $m!(|x| x, 1, |y| $abs(y)),
                    }
                };
            }

            /// OR over the 4 vectors at `p + i` of `data ^ expected(state)`: zero iff all
            /// match.
            macro_rules! diff4 {
                ($p:ident, $i:ident, $st:ident, |$y:ident| $e:expr) => {{
                    // SAFETY: callers check `i + STEP <= len`: the four loads are in bounds.
                    let (a, b, c, d) = unsafe {
                        (
                            $load($p.add($i).cast()),
                            $load($p.add($i + L).cast()),
                            $load($p.add($i + 2 * L).cast()),
                            $load($p.add($i + 3 * L).cast()),
                        )
                    };
                    let $y = $st[0];
                    let ea = $e;
                    let $y = $st[1];
                    let eb = $e;
                    let $y = $st[2];
                    let ec = $e;
                    let $y = $st[3];
                    let ed = $e;
                    $or($or($xor(a, ea), $xor(b, eb)), $or($xor(c, ec), $xor(d, ed)))
                }};
            }

            /// Stores the 4 vectors of `$v` at `p + i`, `p + i + L`, … (callers check that
            /// `i + STEP` elements fit, in an `unsafe` block).
            macro_rules! store4 {
                ($p:ident, $i:ident, $v:ident) => {{
                    $store($p.add($i).cast(), $v[0]);
                    $store($p.add($i + L).cast(), $v[1]);
                    $store($p.add($i + 2 * L).cast(), $v[2]);
                    $store($p.add($i + 3 * L).cast(), $v[3]);
                }};
            }

            /// Walks the `$len` elements at `p` block by block (whole blocks of `STEP` only)
            /// while each block matches `op(base + i)` (described as `per_op` hands it out),
            /// running `$body` after each matching block with `$i` at the block's start.
            /// Evaluates to `(i, state)`: where it stopped (the first block that did not match,
            /// or the end of the whole blocks) and the state of element `i`'s vector.
            macro_rules! matching_blocks {
                (
                    $p:ident, $len:expr, $base:expr,
                    |$x:ident| $s:expr, $inc:expr, |$y:ident| $e:expr,
                    |$i:ident| $body:block
                ) => {{
                    let inc: i32 = $inc;
                    let sstep = $set1(inc.wrapping_mul(STEP as i32));
                    let mut st = states4!($add($set1($base), $iota), |$x| $s);
                    let end = $len / STEP * STEP;
                    let mut $i = 0;
                    while $i < end {
                        let diff = diff4!($p, $i, st, |$y| $e);
                        if $nonzero(diff) {
                            break;
                        }
                        $body
                        advance4!(st, sstep);
                        $i += STEP;
                    }
                    ($i, st[0])
                }};
            }

            /// Over `data` (the common prefix of an old and a new matrix in one slot): checks
            /// each block of `STEP` against `op(old + i)` and, if it matches, overwrites it with
            /// the new fill `new + i`. Returns how far it got: `data.len()` rounded down to
            /// whole blocks, or the start of the first block with a mismatch (left untouched).
            ///
            /// # Safety
            /// The CPU must support the `
            #[doc = $feature]
            /// ` target feature.
            #[target_feature(enable = $feature)]
            pub unsafe fn check_and_refill(
                op: Lanes,
                old: i32,
                new: i32,
                data: &mut [i32],
            ) -> usize {
                macro_rules! run {
                    (|$x:ident| $s:expr, $inc:expr, |$y:ident| $e:expr) => {{
                        let p = data.as_mut_ptr();
                        let step = $set1(STEP as i32);
                        let mut n = states4!($add($set1(new), $iota), |v| v);
                        let (i, _) =
                            matching_blocks!(p, data.len(), old, |$x| $s, $inc, |$y| $e, |i| {
                                // SAFETY: a whole block: `i + STEP <= len`, so the four stores
                                // are inside `data`.
                                unsafe { store4!(p, i, n) };
                                advance4!(n, step);
                            });
                        i
                    }};
                }
                per_op!(op, run)
            }

            /// `out[i] = base + i`.
            ///
            /// # Safety
            /// The CPU must support the `
            #[doc = $feature]
            /// ` target feature.
            #[target_feature(enable = $feature)]
            pub unsafe fn fill(base: i32, out: &mut [i32]) {
                let step = $set1(STEP as i32);
                let mut n = states4!($add($set1(base), $iota), |v| v);
                let p = out.as_mut_ptr();
                let end = out.len() / STEP * STEP;
                let mut i = 0;
                while i < end {
                    // SAFETY: `i + STEP <= end <= len`: the four stores are inside `out`.
                    unsafe { store4!(p, i, n) };
                    advance4!(n, step);
                    i += STEP;
                }
                let lane = $set1(L as i32);
                let mut v = n[0];
                while i + L <= out.len() {
                    // SAFETY: `i + L <= len`: one store inside `out`.
                    unsafe { $store(p.add(i).cast(), v) };
                    v = $add(v, lane);
                    i += L;
                }
                // SAFETY: fewer than `L` elements are left; this function has the target feature
                // the tail kernel needs.
                unsafe { $tail::fill(base.wrapping_add(i as i32), &mut out[i..]) };
            }

            /// `x = op(x)` in place.
            ///
            /// # Safety
            /// The CPU must support the `
            #[doc = $feature]
            /// ` target feature.
            #[target_feature(enable = $feature)]
            pub unsafe fn apply(op: Lanes, data: &mut [i32]) {
                let mut i = 0;
                match op {
                    Lanes::Affine(a, b) => {
                        let (va, vb) = ($set1(a), $set1(b));
                        map4!(data, i, |x| $add($mullo(x, va), vb));
                    }
                    Lanes::Xor(k) => {
                        let vk = $set1(k);
                        map4!(data, i, |x| $xor(x, vk));
                    }
                    Lanes::Abs => map4!(data, i, |x| $abs(x)),
                }
                // SAFETY: as in `fill`.
                unsafe { $tail::apply(op, &mut data[i..]) };
            }

            /// First `i` with `data[i] != op(base + i)`.
            ///
            /// # Safety
            /// The CPU must support the `
            #[doc = $feature]
            /// ` target feature.
            #[target_feature(enable = $feature)]
            pub unsafe fn verify(op: Lanes, base: i32, data: &[i32]) -> Option<usize> {
                macro_rules! check {
                    (|$x:ident| $s:expr, $inc:expr, |$y:ident| $e:expr) => {{
                        let p = data.as_ptr();
                        let (mut i, mut s) =
                            matching_blocks!(p, data.len(), base, |$x| $s, $inc, |$y| $e, |i| {});
                        // Then one vector at a time (unless a block above mismatched).
                        if i == data.len() / STEP * STEP {
                            let inc: i32 = $inc;
                            let lstep = $set1(inc.wrapping_mul(L as i32));
                            while i + L <= data.len() {
                                // SAFETY: `i + L <= len`: one vector inside `data`.
                                let a = unsafe { $load(p.add(i).cast()) };
                                let $y = s;
                                if $nonzero($xor(a, $e)) {
                                    break;
                                }
                                s = $add(s, lstep);
                                i += L;
                            }
                        }
                        i
                    }};
                }
                let i = per_op!(op, check);
                // The first mismatching block is pinned down by the portable kernel; a tail
                // shorter than a vector by the tail kernel.
                let rest = &data[i..];
                let base = base.wrapping_add(i as i32);
                let at = if rest.len() < L {
                    // SAFETY: this function has the target feature the tail kernel needs.
                    unsafe { $tail::verify(op, base, rest) }
                } else {
                    portable::verify(op, base, rest)
                };
                at.map(|j| i + j)
            }
        }
    };
}

/// Tails of the AVX2 kernels: the portable code (AVX2 has no cheap masked integer stores).
mod plain_tail {
    use crate::ops::{portable, Lanes};

    /// # Safety
    /// None; `unsafe` only to share the masked tails' signature.
    #[inline]
    pub unsafe fn fill(base: i32, out: &mut [i32]) {
        portable::fill(base, out)
    }

    /// # Safety
    /// None; as above.
    #[inline]
    pub unsafe fn apply(op: Lanes, data: &mut [i32]) {
        portable::apply(op, data)
    }

    /// # Safety
    /// None; as above.
    #[inline]
    pub unsafe fn verify(op: Lanes, base: i32, data: &[i32]) -> Option<usize> {
        portable::verify(op, base, data)
    }
}

/// Tails of the AVX-512 kernels, fewer than 16 elements, in one masked vector operation each.
/// Masked-off lanes are neither read nor written (AVX-512 suppresses faults on them), so the
/// slice bounds hold.
mod masked_tail {
    use core::arch::x86_64::*;

    use crate::ops::Lanes;

    #[inline(always)]
    fn mask(len: usize) -> __mmask16 {
        debug_assert!(len < 16);
        ((1u32 << len) - 1) as __mmask16
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn lanes(op: Lanes, x: __m512i) -> __m512i {
        match op {
            Lanes::Affine(a, b) => _mm512_add_epi32(
                _mm512_mullo_epi32(x, _mm512_set1_epi32(a)),
                _mm512_set1_epi32(b),
            ),
            Lanes::Xor(k) => _mm512_xor_si512(x, _mm512_set1_epi32(k)),
            Lanes::Abs => _mm512_abs_epi32(x),
        }
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    fn iota(base: i32) -> __m512i {
        _mm512_add_epi32(
            _mm512_set1_epi32(base),
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        )
    }

    /// # Safety
    /// AVX-512F must be available; `out.len() < 16`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn fill(base: i32, out: &mut [i32]) {
        // SAFETY: only the first `len` lanes are written, and they are inside `out`.
        unsafe { _mm512_mask_storeu_epi32(out.as_mut_ptr(), mask(out.len()), iota(base)) }
    }

    /// # Safety
    /// AVX-512F must be available; `data.len() < 16`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn apply(op: Lanes, data: &mut [i32]) {
        let m = mask(data.len());
        // SAFETY: only the first `len` lanes are read and written, all inside `data`.
        unsafe {
            let x = _mm512_maskz_loadu_epi32(m, data.as_ptr());
            _mm512_mask_storeu_epi32(data.as_mut_ptr(), m, lanes(op, x));
        }
    }

    /// # Safety
    /// AVX-512F must be available; `data.len() < 16`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn verify(op: Lanes, base: i32, data: &[i32]) -> Option<usize> {
        let m = mask(data.len());
        // SAFETY: only the first `len` lanes are read, all inside `data`.
        let x = unsafe { _mm512_maskz_loadu_epi32(m, data.as_ptr()) };
        let bad = _mm512_mask_cmpneq_epi32_mask(m, x, lanes(op, iota(base)));
        (bad != 0).then(|| bad.trailing_zeros() as usize)
    }
}

#[target_feature(enable = "avx2")]
#[inline]
fn nonzero256(v: core::arch::x86_64::__m256i) -> bool {
    core::arch::x86_64::_mm256_testz_si256(v, v) == 0
}

#[target_feature(enable = "avx512f")]
#[inline]
fn nonzero512(v: core::arch::x86_64::__m512i) -> bool {
    core::arch::x86_64::_mm512_test_epi32_mask(v, v) != 0
}

simd_kernels!(
    avx2, "avx2", 8, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    set1 _mm256_set1_epi32, add _mm256_add_epi32, mullo _mm256_mullo_epi32,
    xor _mm256_xor_si256, or _mm256_or_si256, abs _mm256_abs_epi32,
    load _mm256_loadu_si256, store _mm256_storeu_si256, nonzero nonzero256,
    tail plain_tail
);

simd_kernels!(
    avx512, "avx512f", 16,
    _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
    set1 _mm512_set1_epi32, add _mm512_add_epi32, mullo _mm512_mullo_epi32,
    xor _mm512_xor_si512, or _mm512_or_si512, abs _mm512_abs_epi32,
    load _mm512_loadu_si512, store _mm512_storeu_si512, nonzero nonzero512,
    tail masked_tail
);
