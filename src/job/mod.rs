//! The seed's synthetic job, defined once: which shapes come next, what each matrix is filled
//! with, and `mk1 run` itself ([`run`]), which drives a [`crate::Pool`] through the public API
//! only. Every benchmark baseline uses the same shapes and fill, so "the same work" is
//! literally the same work.

mod run;

pub use run::{run, Hooks, Progress};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

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
    pub fn new(seed: u64, min: u32, max: u32) -> Shapes {
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
            (
                self.rng.random_range(self.min..=self.max),
                self.rng.random_range(self.min..=self.max),
            )
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
}
