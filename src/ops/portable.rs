//! Portable kernels: plain Rust written so the compiler can vectorise it for the baseline target
//! (chunked reductions instead of early exits). Also the fallback on every other architecture.

use super::Lanes;

/// Elements checked between early-exit tests in `verify`.
const CHUNK: usize = 64;

#[inline]
pub fn fill(base: i32, out: &mut [i32]) {
    for (i, x) in out.iter_mut().enumerate() {
        *x = base.wrapping_add(i as i32);
    }
}

#[inline]
pub fn apply(op: Lanes, data: &mut [i32]) {
    // One loop per shape so each body is branch-free and vectorisable.
    match op {
        Lanes::Affine(a, b) => data
            .iter_mut()
            .for_each(|x| *x = x.wrapping_mul(a).wrapping_add(b)),
        Lanes::Xor(k) => data.iter_mut().for_each(|x| *x ^= k),
        Lanes::Abs => data.iter_mut().for_each(|x| *x = x.wrapping_abs()),
    }
}

#[inline]
pub fn verify(op: Lanes, base: i32, data: &[i32]) -> Option<usize> {
    for (c, chunk) in data.chunks(CHUNK).enumerate() {
        let start = base.wrapping_add((c * CHUNK) as i32);
        let diff = match op {
            Lanes::Affine(a, b) => mismatch(chunk, start, |x| x.wrapping_mul(a).wrapping_add(b)),
            Lanes::Xor(k) => mismatch(chunk, start, |x| x ^ k),
            Lanes::Abs => mismatch(chunk, start, |x| x.wrapping_abs()),
        };
        if diff != 0 {
            // If the rescan finds nothing, another process changed the data between the two
            // reads (which only a process breaking the protocol does): the chunk still failed.
            let at = chunk
                .iter()
                .enumerate()
                .position(|(i, &x)| x != op.scalar(start.wrapping_add(i as i32)))
                .unwrap_or(0);
            return Some(c * CHUNK + at);
        }
    }
    None
}

/// OR of `x ^ f(start + i)` over the chunk: zero iff every element matches.
#[inline(always)]
fn mismatch(chunk: &[i32], start: i32, f: impl Fn(i32) -> i32) -> i32 {
    chunk.iter().enumerate().fold(0, |acc, (i, &x)| {
        acc | (x ^ f(start.wrapping_add(i as i32)))
    })
}

/// Portable counterpart of the SIMD `check_and_refill`: whole chunks of the common prefix are
/// checked and, if they match, refilled; returns where it stopped.
#[inline]
pub fn check_and_refill(op: Lanes, old: i32, new: i32, data: &mut [i32]) -> usize {
    let mut done = 0;
    for chunk in data.chunks_exact_mut(CHUNK) {
        let start = old.wrapping_add(done as i32);
        let diff = match op {
            Lanes::Affine(a, b) => mismatch(chunk, start, |x| x.wrapping_mul(a).wrapping_add(b)),
            Lanes::Xor(k) => mismatch(chunk, start, |x| x ^ k),
            Lanes::Abs => mismatch(chunk, start, |x| x.wrapping_abs()),
        };
        if diff != 0 {
            break;
        }
        fill(new.wrapping_add(done as i32), chunk);
        done += CHUNK;
    }
    done
}
