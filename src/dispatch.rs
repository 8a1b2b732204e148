//! Which worker gets the next token: one small trait, three policies.

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

/// Which worker gets the next token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchKind {
    /// Uniformly random among live workers (seeded). The seed prototype's rule.
    Random,
    /// Next live worker in turn.
    RoundRobin,
    /// The live worker holding fewest of this producer's tokens.
    LeastLoaded,
}

impl DispatchKind {
    /// Name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            DispatchKind::Random => "random",
            DispatchKind::RoundRobin => "round-robin",
            DispatchKind::LeastLoaded => "least-loaded",
        }
    }
}

/// What a policy may look at: which workers can take a token now, and how many of this
/// producer's tokens each holds.
pub struct WorkerView<'a> {
    /// `usable[w]`: worker `w` is alive and not faulted.
    pub usable: &'a [bool],
    /// `load[w]`: this producer's tokens out at worker `w`.
    pub load: &'a [u32],
}

/// A dispatch policy. Called on the hot path: no allocation, no syscall.
pub trait Dispatch: Send {
    /// A usable worker, or `None` if there is none.
    fn pick(&mut self, view: &WorkerView<'_>) -> Option<u32>;
}

/// Uniformly random among usable workers.
pub struct Random(SmallRng);
/// Each usable worker in turn.
pub struct RoundRobin(usize);
/// The usable worker with the fewest of our tokens (ties: the next one in turn).
pub struct LeastLoaded(usize);

/// One of the three policies, picked without a virtual call (it runs once per task).
pub enum Policy {
    /// See [`Random`].
    Random(Random),
    /// See [`RoundRobin`].
    RoundRobin(RoundRobin),
    /// See [`LeastLoaded`].
    LeastLoaded(LeastLoaded),
}

impl Dispatch for Policy {
    #[inline]
    fn pick(&mut self, view: &WorkerView<'_>) -> Option<u32> {
        match self {
            Policy::Random(p) => p.pick(view),
            Policy::RoundRobin(p) => p.pick(view),
            Policy::LeastLoaded(p) => p.pick(view),
        }
    }
}

/// The policy for `kind`, seeded with `seed` where it is random.
pub fn policy(kind: DispatchKind, seed: u64) -> Policy {
    match kind {
        DispatchKind::Random => Policy::Random(Random(SmallRng::seed_from_u64(seed))),
        DispatchKind::RoundRobin => Policy::RoundRobin(RoundRobin(0)),
        DispatchKind::LeastLoaded => Policy::LeastLoaded(LeastLoaded(0)),
    }
}

/// The first usable worker from `from` on, wrapping around (`from` may be `usable.len()`).
#[inline]
fn next_usable(usable: &[bool], from: usize) -> Option<usize> {
    let n = usable.len();
    let from = if from >= n { 0 } else { from };
    // (No division on the hot path: the first candidate is usable while all is well.)
    (from..n).chain(0..from).find(|&w| usable[w])
}

impl Dispatch for Random {
    #[inline]
    fn pick(&mut self, v: &WorkerView<'_>) -> Option<u32> {
        // Multiply-shift (Lemire) maps 64 random bits onto 0..n without a division; its bias,
        // at most n / 2^64, is far below anything measurable.
        let n = v.usable.len() as u64;
        let w = ((u128::from(self.0.next_u64()) * u128::from(n)) >> 64) as usize;
        // A dead worker's turn goes to the next live one: still uniform when all are alive.
        next_usable(v.usable, w).map(|w| w as u32)
    }
}

impl Dispatch for RoundRobin {
    fn pick(&mut self, v: &WorkerView<'_>) -> Option<u32> {
        let w = next_usable(v.usable, self.0)?;
        self.0 = w + 1;
        Some(w as u32)
    }
}

impl Dispatch for LeastLoaded {
    fn pick(&mut self, v: &WorkerView<'_>) -> Option<u32> {
        let n = v.usable.len();
        let from = if self.0 >= n { 0 } else { self.0 };
        let w = (from..n)
            .chain(0..from)
            .filter(|&w| v.usable[w])
            .min_by_key(|&w| v.load[w])?;
        self.0 = w + 1;
        Some(w as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picks(kind: DispatchKind, usable: &[bool], load: &[u32], n: usize) -> Vec<u32> {
        let mut p = policy(kind, 7);
        (0..n)
            .map(|_| p.pick(&WorkerView { usable, load }).unwrap())
            .collect()
    }

    #[test]
    fn random_reaches_every_worker_and_skips_dead_ones() {
        let got = picks(DispatchKind::Random, &[true; 4], &[0; 4], 400);
        for w in 0..4 {
            assert!(
                got.iter().filter(|&&x| x == w).count() > 50,
                "worker {w} starved"
            );
        }
        let got = picks(DispatchKind::Random, &[true, false, true], &[0; 3], 100);
        assert!(!got.contains(&1));
    }

    #[test]
    fn round_robin_cycles() {
        assert_eq!(
            picks(DispatchKind::RoundRobin, &[true, true, true], &[0; 3], 5),
            [0, 1, 2, 0, 1]
        );
        assert_eq!(
            picks(DispatchKind::RoundRobin, &[true, false, true], &[0; 3], 3),
            [0, 2, 0]
        );
    }

    #[test]
    fn least_loaded_prefers_the_shortest_queue() {
        assert_eq!(
            picks(DispatchKind::LeastLoaded, &[true; 3], &[5, 1, 3], 1),
            [1]
        );
        assert_eq!(
            picks(
                DispatchKind::LeastLoaded,
                &[true, false, true],
                &[5, 0, 3],
                1
            ),
            [2]
        );
    }

    #[test]
    fn nobody_usable_is_none() {
        let mut p = policy(DispatchKind::Random, 1);
        assert_eq!(
            p.pick(&WorkerView {
                usable: &[false, false],
                load: &[0, 0]
            }),
            None
        );
    }
}
