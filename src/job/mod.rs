//! The seed's synthetic job, defined once: which shapes come next, what each matrix is filled
//! with, and `mk1 run` itself ([`run`]), which drives a [`crate::Pool`] through the public API
//! only. Every benchmark baseline draws the same shapes and fill, so "the same work" is
//! literally the same work; `mk1 run` may use them in another order ([`Shapes::nearest`]: a
//! returned slot gets a shape of about the size it held), each shape still once.

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
/// with one shape held back when it did not fit where it was drawn for, and a few drawn ahead
/// for [`Shapes::nearest`].
pub struct Shapes {
    rng: SmallRng,
    min: u32,
    max: u32,
    /// A shape drawn but not yet used.
    pub pending: Option<(u32, u32)>,
    /// Shapes drawn ahead for [`Shapes::nearest`] (filled on its first call), each with how
    /// many of its calls passed it over.
    ahead: Vec<((u32, u32), u32)>,
}

/// Shapes [`Shapes::nearest`] chooses among.
pub const AHEAD: usize = 8;
/// Calls of [`Shapes::nearest`] that may pass a shape ahead over before it is taken whatever
/// its size (as soon as a slot it fits comes back): the shapes used stay the shapes drawn.
pub const MAX_PASSED: u32 = 64;

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
            ahead: Vec::new(),
        }
    }

    /// The next `(rows, cols)`.
    #[inline]
    pub fn next_shape(&mut self) -> (u32, u32) {
        self.pending.take().unwrap_or_else(|| self.draw())
    }

    fn draw(&mut self) -> (u32, u32) {
        // One 64-bit draw for both: each half is mapped onto `min..=max` by a multiply and a
        // shift (no division, no rejection loop; uneven by at most span / 2^32, nothing at
        // these spans). `random_range` twice cost 3% of the producer at max-dim 16.
        let x = self.rng.next_u64();
        let span = u64::from(self.max - self.min) + 1;
        let pick = |half: u64| self.min + (((half & 0xffff_ffff) * span) >> 32) as u32;
        (pick(x), pick(x >> 32))
    }

    /// A shape for a slot that held a matrix of `elems` elements: of the next [`AHEAD`] shapes
    /// drawn, the one that `fits` and is closest to `elems` in elements (so that refilling the
    /// slot in place overwrites what it checks, and little is left to check or fill alone),
    /// unless one that fits was passed over [`MAX_PASSED`] times: then the one of those passed
    /// over most. The one taken is replaced by a new draw. A shape held back
    /// ([`Shapes::pending`]) goes first; `None` when it, or every shape ahead, does not fit
    /// (then the one passed over most is held back, for the next slot that comes free).
    ///
    /// Each shape drawn is used once, and one that fits every slot is taken within
    /// `MAX_PASSED + AHEAD` calls of its draw (calls that find a shape held back do not count):
    /// the shapes used are the shapes drawn, in another order (the mean matrix size does not
    /// move; which of the last few drawn are left unused when a run stops depends on timing).
    pub fn nearest(&mut self, elems: u64, fits: impl Fn(u32, u32) -> bool) -> Option<(u32, u32)> {
        if let Some((r, c)) = self.pending {
            if !fits(r, c) {
                return None;
            }
            self.pending = None;
            return Some((r, c));
        }
        if self.ahead.is_empty() {
            self.ahead = (0..AHEAD).map(|_| (self.draw(), 0)).collect();
        }
        let oldest = (0..AHEAD)
            .max_by_key(|&i| self.ahead[i].1)
            .expect("AHEAD > 0");
        let size = |&((r, c), _): &((u32, u32), u32)| u64::from(r) * u64::from(c);
        let fitting = || (0..AHEAD).filter(|&i| fits(self.ahead[i].0 .0, self.ahead[i].0 .1));
        // An overdue shape that fits goes first (the one passed over most); one that does not
        // fit this slot waits for a slot it fits, and the others are matched meanwhile.
        let pick = fitting()
            .filter(|&i| self.ahead[i].1 >= MAX_PASSED)
            .max_by_key(|&i| self.ahead[i].1)
            .or_else(|| fitting().min_by_key(|&i| size(&self.ahead[i]).abs_diff(elems)));
        for a in &mut self.ahead {
            a.1 = a.1.saturating_add(1);
        }
        let fresh = (self.draw(), 0);
        match pick {
            Some(i) => Some(std::mem::replace(&mut self.ahead[i], fresh).0),
            None => {
                self.pending = Some(std::mem::replace(&mut self.ahead[oldest], fresh).0);
                None
            }
        }
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

    #[test]
    fn nearest_takes_the_closest_fitting_shape_and_every_shape_drawn_once() {
        // Every shape drawn carries its draw number: `Shapes` draws the same stream for both.
        let mut plain = Shapes::new(21, 1, 128);
        let drawn: Vec<(u32, u32)> = (0..20_000).map(|_| plain.next_shape()).collect();
        let mut s = Shapes::new(21, 1, 128);
        let mut rng = SmallRng::seed_from_u64(4);
        let mut taken = Vec::new();
        let mut refused = 0;
        for call in 0..10_000u64 {
            let elems = rng.next_u64() % 16_384 + 1;
            // Every fourth call, a small slot: only shapes of at most 4096 elements fit.
            let cap = if call % 4 == 3 { 4096 } else { u64::MAX };
            let fits = |r: u32, c: u32| u64::from(r) * u64::from(c) <= cap;
            let ahead: Vec<(u32, u32)> = s.ahead.iter().map(|a| a.0).collect();
            let pending = s.pending;
            let overdue = s
                .ahead
                .iter()
                .any(|a| a.1 >= MAX_PASSED && fits(a.0 .0, a.0 .1));
            match s.nearest(elems, fits) {
                Some(shape) => {
                    assert!(fits(shape.0, shape.1));
                    if pending.is_none() && !ahead.is_empty() && !overdue {
                        // The closest of those that fit (no shape was overdue).
                        let best = ahead
                            .iter()
                            .filter(|&&(r, c)| fits(r, c))
                            .map(|&(r, c)| (u64::from(r) * u64::from(c)).abs_diff(elems))
                            .min()
                            .expect("one fits");
                        assert_eq!(
                            (u64::from(shape.0) * u64::from(shape.1)).abs_diff(elems),
                            best
                        );
                    }
                    taken.push(shape);
                }
                None => refused += 1,
            }
        }
        assert!(refused > 0, "the small slots refused some");
        // What was taken, what waits ahead and what is held back are exactly the shapes drawn.
        let mut used = taken.clone();
        used.extend(s.ahead.iter().map(|a| a.0));
        used.extend(s.pending);
        let mut want = drawn[..used.len()].to_vec();
        used.sort_unstable();
        want.sort_unstable();
        assert_eq!(used, want);
        // The sizes taken average as the sizes drawn: 4160 elements (within 3%).
        let mean = taken.iter().map(|&(r, c)| f64::from(r * c)).sum::<f64>() / taken.len() as f64;
        assert!((mean - 4160.0).abs() < 125.0, "mean {mean}");
    }

    #[test]
    fn no_shape_waits_longer_than_the_bound() {
        // Always a 1-element matrix to match: large shapes are passed over until they are
        // overdue. Dimensions over the whole u32 range make every shape drawn distinct, so each
        // take is credited to its own draw.
        let mut plain = Shapes::new(8, 1, u32::MAX);
        let drawn: Vec<(u32, u32)> = (0..5_000).map(|_| plain.next_shape()).collect();
        let distinct: std::collections::HashSet<_> = drawn.iter().collect();
        assert_eq!(distinct.len(), drawn.len(), "shapes drawn are distinct");
        let drawn_at: std::collections::HashMap<(u32, u32), usize> = drawn
            .iter()
            .enumerate()
            // Draw k happens at call 0 for the first AHEAD, at call k - AHEAD + 1 after.
            .map(|(k, &s)| (s, (k + 1).saturating_sub(AHEAD)))
            .collect();
        let mut s = Shapes::new(8, 1, u32::MAX);
        let mut longest = 0;
        for call in 0..4_000usize {
            let shape = s.nearest(1, |_, _| true).expect("everything fits");
            longest = longest.max(call - drawn_at[&shape]);
        }
        assert!(
            longest <= MAX_PASSED as usize + AHEAD,
            "waited {longest} calls"
        );
        assert!(
            longest >= MAX_PASSED as usize,
            "large shapes were passed over: {longest}"
        );
    }

    #[test]
    fn a_shape_that_fits_nothing_is_held_back_and_goes_first_once_it_fits() {
        let mut s = Shapes::new(3, 2, 100);
        // A few ordinary picks, so that the shapes ahead have been passed over unequally.
        for elems in [4, 10_000, 400, 9] {
            assert!(s.nearest(elems, |_, _| true).is_some());
        }
        // Only 1-element matrices fit: none of the shapes ahead (all at least 2x2) does, and the
        // one passed over most is held back.
        let most = s.ahead.iter().max_by_key(|a| a.1).expect("ahead").0;
        assert_eq!(s.nearest(4, |r, c| r * c <= 1), None);
        let held = s.pending.expect("a shape is held back");
        assert_eq!(held, most);
        // Still nothing fits: it stays held back, and nothing else is taken meanwhile.
        let ahead: Vec<(u32, u32)> = s.ahead.iter().map(|a| a.0).collect();
        assert_eq!(s.nearest(4, |r, c| r * c <= 1), None);
        assert_eq!(s.pending, Some(held));
        assert_eq!(s.ahead.iter().map(|a| a.0).collect::<Vec<_>>(), ahead);
        // A slot it fits: it goes first, whatever its size.
        assert_eq!(s.nearest(1, |_, _| true), Some(held));
        assert_eq!(s.pending, None);
        // Shapes of more than 1024 elements never fit here: they are passed over until overdue
        // (or held back, once nothing ahead fits); then the slot they fit takes the one passed
        // over most, whatever its size, not the closest.
        let mut s = Shapes::new(5, 1, 64);
        for _ in 0..MAX_PASSED as usize + AHEAD {
            let _ = s.nearest(1, |r, c| r * c <= 1024);
        }
        let overdue = s.ahead.iter().any(|a| a.1 >= MAX_PASSED);
        assert!(
            overdue || s.pending.is_some(),
            "a large shape became overdue"
        );
        let want = s
            .pending
            .unwrap_or_else(|| s.ahead.iter().max_by_key(|a| a.1).expect("ahead").0);
        assert!(
            want.0 * want.1 > 1024,
            "the one waiting is a large shape: {want:?}"
        );
        assert_eq!(s.nearest(1, |_, _| true), Some(want));
    }
}
