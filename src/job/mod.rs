//! The seed's synthetic job, defined once: which shapes come next, what each matrix is filled
//! with, and `mk1 run` itself ([`run`]), which drives a [`crate::Pool`] through the public API
//! only. Every benchmark baseline uses the same shapes and fill, so "the same work" is
//! literally the same work.

mod run;

pub use run::{run, Hooks, Progress};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

/// The fill base of matrix `seq`: element `i` is `fill_base(seq, seed) + i` (wrapping), a
/// splitmix64 hash so that neighbouring matrices differ.
pub fn fill_base(seq: u64, seed: u64) -> i32 {
    let mut z = (seq ^ seed).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as i32
}

/// Random matrix shapes: rows and columns uniform in `min..=max`, reproducible from a seed,
/// with one shape held back when it did not fit where it was drawn for.
pub struct Shapes {
    rng: SmallRng,
    min: u32,
    max: u32,
    /// A shape drawn but not yet used.
    pub pending: Option<(u32, u32)>,
}

impl Shapes {
    /// Shapes in `min..=max` from `seed`.
    ///
    /// # Panics
    /// If `min > max`.
    pub fn new(seed: u64, min: u32, max: u32) -> Shapes {
        assert!(min <= max, "shapes in {min}..={max}");
        Shapes {
            rng: SmallRng::seed_from_u64(seed),
            min,
            max,
            pending: None,
        }
    }

    /// The next `(rows, cols)`.
    #[inline]
    pub fn next_shape(&mut self) -> (u32, u32) {
        self.pending.take().unwrap_or_else(|| {
            // One 64-bit draw for both: each half is mapped onto `min..=max` by a multiply and a
            // shift (no division, no rejection loop; uneven by at most span / 2^32, nothing at
            // these spans). `random_range` twice cost 3% of the producer at max-dim 16.
            let x = self.rng.next_u64();
            let span = u64::from(self.max - self.min) + 1;
            let pick = |half: u64| self.min + (((half & 0xffff_ffff) * span) >> 32) as u32;
            (pick(x), pick(x >> 32))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_base_depends_on_seq_and_seed() {
        assert_ne!(fill_base(1, 1), fill_base(2, 1));
        assert_ne!(fill_base(1, 1), fill_base(1, 2));
        assert_eq!(fill_base(7, 9), fill_base(7, 9));
    }

    #[test]
    fn shapes_stay_in_range_and_repeat_from_the_seed() {
        let mut a = Shapes::new(5, 3, 9);
        let mut b = Shapes::new(5, 3, 9);
        for _ in 0..1000 {
            let s = a.next_shape();
            assert_eq!(s, b.next_shape());
            assert!((3..=9).contains(&s.0) && (3..=9).contains(&s.1));
        }
        a.pending = Some((1, 2));
        assert_eq!(a.next_shape(), (1, 2));
    }

    #[test]
    fn shapes_are_about_uniform_and_reach_both_ends() {
        // 16 x 16 cells, 64 000 draws: 250 expected per cell (standard deviation 16); a cell
        // outside 150..350 is a broken generator, not bad luck (below 1e-6 for all 256 cells).
        let mut s = Shapes::new(11, 1, 16);
        let mut cells = [[0u32; 16]; 16];
        for _ in 0..64_000 {
            let (r, c) = s.next_shape();
            cells[r as usize - 1][c as usize - 1] += 1;
        }
        for (r, row) in cells.iter().enumerate() {
            for (c, &n) in row.iter().enumerate() {
                assert!((150..350).contains(&n), "{}x{}: {n}", r + 1, c + 1);
            }
        }
        // The widest span: both ends reachable without overflow.
        let mut w = Shapes::new(3, 0, u32::MAX);
        let (mut lo, mut hi) = (u32::MAX, 0);
        for _ in 0..10_000 {
            let (r, c) = w.next_shape();
            (lo, hi) = (lo.min(r).min(c), hi.max(r).max(c));
        }
        assert!(lo < u32::MAX / 1000 && hi > u32::MAX - u32::MAX / 1000);
    }
}
