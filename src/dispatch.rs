//! Which worker gets the next token: one small trait, three policies.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};

use crate::clock::{self, Ticks};

/// Which worker gets the next token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchKind {
    /// Uniformly random among live workers (seeded). The seed prototype's rule.
    Random,
    /// Next live worker in turn.
    RoundRobin,
    /// The live worker expected to start a new task soonest, from the tasks it holds and
    /// their typical time; with a limit on the work queued behind each worker's running task
    /// (see [`LeastLoaded`]).
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

/// What a policy may look at: which workers can take a token now, how many of this
/// producer's tokens each holds, and the time.
pub struct WorkerView<'a> {
    /// `usable[w]`: worker `w` is alive and not faulted.
    pub usable: &'a [bool],
    /// `load[w]`: this producer's tokens out at worker `w`.
    pub load: &'a [u32],
    /// When the pick is made (ticks of [`clock::now`]).
    pub now: Ticks,
}

/// A dispatch policy. Called on the hot path: no allocation, no syscall.
pub trait Dispatch: Send {
    /// The usable worker to send the next token to now, or `None` if none may take it now
    /// (none is usable, or, for [`LeastLoaded`], every one has as much queued as it may).
    fn pick(&mut self, view: &WorkerView<'_>) -> Option<u32>;
}

/// Uniformly random among usable workers.
pub struct Random(SmallRng);
/// Each usable worker in turn.
pub struct RoundRobin(usize);
/// The usable worker expected to start a new task soonest (ties: the next one in turn), and
/// a limit on the work waiting behind each worker's running task.
///
/// Each worker's typical task time is learnt from this handle's returns (an average of
/// about the last four, per worker). A worker may take a new task when:
/// - it holds none of this handle's tasks; or
/// - its typical time is known, its running task has not run past [`STUCK`] times that
///   (plus [`SLACK`]), and its tasks, the running one included, are expected to take at
///   most `ahead` (default 2 ms, [`crate::PoolBuilder::queue_ahead`]).
///
/// When none may, the task waits in the handle and goes to the first worker that can take
/// it (the handle sends it while it looks for returns: any submit, receive or wait).
/// So tasks longer than `ahead` go to workers as they free up, as from a queue shared by
/// the workers; nothing is queued behind a worker's first task (its time is unknown); and
/// short tasks queue deep enough to keep each worker busy between the handle's visits. Only
/// a task that is long where the worker's last ones were short can still hold back tasks sent
/// before it looked long: as many as would take `ahead` at the pace of those last ones (and
/// they may be long too).
///
/// Without a limit (`ahead` `None`) every usable worker may take any task, and the one
/// holding fewest of this handle's tasks gets it.
pub struct LeastLoaded {
    /// Where the search for the next pick starts (the worker after the last pick).
    next: usize,
    /// The limit, in ticks.
    ahead: Option<u64>,
    /// [`SLACK`] in ticks.
    slack: u64,
    pace: Vec<Pace>,
}

/// [`LeastLoaded`]'s limit unless set otherwise ([`crate::PoolBuilder::queue_ahead`]).
pub const DEFAULT_QUEUE_AHEAD: Duration = Duration::from_millis(2);

/// A worker's running task counts as long once it ran this many times its typical time...
pub const STUCK: u64 = 4;
/// ... plus this (a worker that slept may take tens of microseconds to wake).
pub const SLACK: Duration = Duration::from_micros(50);

/// What [`LeastLoaded`] learnt of one worker's tasks.
#[derive(Debug, Clone, Copy, Default)]
struct Pace {
    /// When its running task of ours started, as far as we can tell: its last return, or the
    /// send that found it holding none of ours.
    since: Ticks,
    /// Typical task time, in ticks; 0 while unknown.
    typical: u64,
}

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

impl Policy {
    /// A token went to worker `w`, which held `load` of this producer's tokens before it.
    #[inline]
    pub fn sent(&mut self, w: usize, load: u32, now: Ticks) {
        if let Policy::LeastLoaded(p) = self {
            if load == 0 {
                p.pace[w].since = now;
            }
        }
    }

    /// `n` (at least 1) tokens came back from worker `w`, found at `now`.
    #[inline]
    pub fn returned(&mut self, w: usize, n: u64, now: Ticks) {
        if let Policy::LeastLoaded(p) = self {
            let pace = &mut p.pace[w];
            // Returns found together share the time since the last one (on average right).
            let each = now.saturating_sub(pace.since) / n.max(1);
            pace.typical = match pace.typical {
                0 => each,
                t => (3 * t + each) / 4,
            }
            .max(1);
            pace.since = now;
        }
    }

    /// Worker `w` died or was given up: what was learnt of it no longer holds.
    pub fn forget(&mut self, w: usize) {
        if let Policy::LeastLoaded(p) = self {
            p.pace[w] = Pace::default();
        }
    }
}

/// The policy for `kind` over `workers` workers, seeded with `seed` where it is random;
/// `ahead` is [`LeastLoaded`]'s limit (`None`: none).
pub fn policy(kind: DispatchKind, seed: u64, workers: usize, ahead: Option<Duration>) -> Policy {
    match kind {
        DispatchKind::Random => Policy::Random(Random(SmallRng::seed_from_u64(seed))),
        DispatchKind::RoundRobin => Policy::RoundRobin(RoundRobin(0)),
        DispatchKind::LeastLoaded => Policy::LeastLoaded(LeastLoaded {
            next: 0,
            ahead: ahead.map(clock::ticks_in),
            slack: clock::ticks_in(SLACK),
            pace: vec![Pace::default(); workers],
        }),
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

impl LeastLoaded {
    /// How long a new task would wait at worker `w` holding `load` tasks, in ticks; `None`
    /// when it may not queue there now.
    #[inline]
    fn wait(&self, w: usize, load: u32, now: Ticks, ahead: u64) -> Option<u64> {
        if load == 0 {
            return Some(0);
        }
        let Pace { since, typical } = self.pace[w];
        let ran = now.saturating_sub(since);
        if typical == 0 || ran > typical.saturating_mul(STUCK).saturating_add(self.slack) {
            return None;
        }
        if u64::from(load).saturating_mul(typical) > ahead {
            return None;
        }
        // (The running task is taken to need its typical time, or as long as it has run.)
        Some(u64::from(load - 1) * typical + typical.max(ran))
    }
}

impl Dispatch for LeastLoaded {
    fn pick(&mut self, v: &WorkerView<'_>) -> Option<u32> {
        let n = v.usable.len();
        let from = if self.next >= n { 0 } else { self.next };
        let order = (from..n).chain(0..from).filter(|&w| v.usable[w]);
        let w = match self.ahead {
            None => order.min_by_key(|&w| v.load[w])?,
            Some(ahead) => {
                let mut best: Option<(u64, usize)> = None;
                for w in order {
                    let Some(wait) = self.wait(w, v.load[w], v.now, ahead) else {
                        continue;
                    };
                    if best.is_none_or(|(b, _)| wait < b) {
                        best = Some((wait, w));
                        if wait == 0 {
                            break;
                        }
                    }
                }
                best?.1
            }
        };
        self.next = w + 1;
        Some(w as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picks(kind: DispatchKind, usable: &[bool], load: &[u32], n: usize) -> Vec<u32> {
        let mut p = policy(kind, 7, usable.len(), None);
        (0..n)
            .map(|_| {
                p.pick(&WorkerView {
                    usable,
                    load,
                    now: 0,
                })
                .unwrap()
            })
            .collect()
    }

    /// A least-loaded policy over `workers` workers, limit `ahead` ticks, slack 5 ticks.
    fn paced(workers: usize, ahead: u64) -> Policy {
        Policy::LeastLoaded(LeastLoaded {
            next: 0,
            ahead: Some(ahead),
            slack: 5,
            pace: vec![Pace::default(); workers],
        })
    }

    fn pick_at(p: &mut Policy, load: &[u32], now: Ticks) -> Option<u32> {
        p.pick(&WorkerView {
            usable: &vec![true; load.len()],
            load,
            now,
        })
    }

    #[test]
    fn nothing_queues_behind_a_task_of_unknown_length() {
        let mut p = paced(2, 1_000);
        p.sent(0, 0, 0);
        // Worker 0 runs a task nobody has timed yet: the next goes to the idle one...
        assert_eq!(pick_at(&mut p, &[1, 0], 1), Some(1));
        p.sent(1, 0, 1);
        // ... and the one after waits for either to return.
        assert_eq!(pick_at(&mut p, &[1, 1], 2), None);
        // Worker 1 returns after 10 ticks and gets its next at once: it takes another behind.
        p.returned(1, 1, 11);
        assert_eq!(pick_at(&mut p, &[1, 0], 11), Some(1));
        assert_eq!(pick_at(&mut p, &[1, 1], 12), Some(1));
    }

    #[test]
    fn short_tasks_queue_up_to_the_limit_and_a_long_one_stops_the_queue() {
        let mut p = paced(1, 100);
        p.sent(0, 0, 0);
        // Typical 10 ticks: 100 ticks of tasks may be out at the worker, 10 of them.
        p.returned(0, 1, 10);
        assert_eq!(pick_at(&mut p, &[10], 12), Some(0));
        assert_eq!(pick_at(&mut p, &[11], 12), None);
        // The running task has run 4 × 10 + 5 ticks: still taken as short...
        assert_eq!(pick_at(&mut p, &[1], 10 + 45), Some(0));
        // ... one tick more and it counts as long: nothing more queues behind it.
        assert_eq!(pick_at(&mut p, &[1], 10 + 46), None);
        // Returns found together share the time: 4 in 40 ticks keep the typical 10.
        p.returned(0, 4, 10 + 40);
        assert_eq!(pick_at(&mut p, &[10], 51), Some(0));
        assert_eq!(pick_at(&mut p, &[11], 51), None);
        // Once its tasks take 200 ticks, longer than the limit, they go one at a time.
        for i in 1..=10 {
            p.returned(0, 1, 50 + 200 * i);
        }
        assert_eq!(pick_at(&mut p, &[0], 2051), Some(0));
        assert_eq!(pick_at(&mut p, &[1], 2051), None);
        // A death forgets what was learnt.
        p.forget(0);
        assert_eq!(pick_at(&mut p, &[1], 52), None);
        assert_eq!(pick_at(&mut p, &[0], 52), Some(0));
    }

    #[test]
    fn the_worker_expected_to_start_it_soonest_gets_the_task() {
        let mut p = paced(3, 1_000);
        for (w, typical) in [(0, 30), (1, 10), (2, 20)] {
            p.sent(w, 0, 30 - typical);
            p.returned(w, 1, 30);
        }
        // Each runs one task, started at its return: 0 waits 30, 1 waits 10, 2 waits 20.
        assert_eq!(pick_at(&mut p, &[1, 1, 1], 30), Some(1));
        // Three of worker 1's (2 × 10 + 10 = 30 ahead) against one of worker 2's (20).
        assert_eq!(pick_at(&mut p, &[1, 3, 1], 30), Some(2));
        // An idle worker always wins.
        assert_eq!(pick_at(&mut p, &[1, 3, 0], 30), Some(2));
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
        for kind in [
            DispatchKind::Random,
            DispatchKind::RoundRobin,
            DispatchKind::LeastLoaded,
        ] {
            let mut p = policy(kind, 1, 2, Some(Duration::from_millis(1)));
            let view = WorkerView {
                usable: &[false, false],
                load: &[0, 0],
                now: 0,
            };
            assert_eq!(p.pick(&view), None);
        }
    }
}
