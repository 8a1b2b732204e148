//! Waiting without burning a core, and waking without a syscall when nobody sleeps.
//!
//! A waiter goes through three phases ([`Backoff`]): spin (re-check the condition with a CPU
//! pause, giving the CPU away once every [`SPINS_PER_YIELD`] re-checks), yield the CPU, then
//! sleep on a [`Doorbell`]. The spin and yield budgets adapt to
//! whether spinning pays (it does not on a machine shared with other busy processes; see
//! [`Backoff`]), and the roles add one step before sleeping: a waiter whose partner last waited on
//! the same CPU yields to it ([`SAME_CPU_YIELDS`]). The doorbell is a futex word plus a
//! `sleeping` flag in shared memory. The notifier rings only when the flag says someone sleeps,
//! so while work flows there is no syscall at all (DESIGN invariant 7).
//!
//! Lost wake-ups are excluded without any SeqCst: both sides do a read-modify-write on the same
//! `sleeping` word, and RMWs on one location are totally ordered.
//! - waiter: `sleeping.swap(1, AcqRel)`; read `word`; re-check the condition; futex-wait on
//!   `word`; `sleeping.store(0, Release)`.
//! - notifier: publish the work (ring `tail`, Release); `sleeping.fetch_add(0, AcqRel)`; if it
//!   read 1, bump `word` (Release) and futex-wake.
//!
//! If the notifier's RMW comes first, the waiter's swap reads from it (Release → Acquire), so the
//! waiter's re-check sees the published work. If the waiter's swap comes first, the notifier
//! reads 1 and wakes it. If the bump lands between the waiter's read of `word` and its
//! futex-wait, the kernel sees a changed value and returns at once. (loom models RMWs exactly,
//! which it does not do for SeqCst fences; `tests/loom_ring.rs` checks this protocol.)
//!
//! The futex itself is injected ([`Park`]), so the protocol can be model-checked without
//! syscalls.

use std::time::{Duration, Instant};

use crate::layout::Bell;
use crate::sync::{AtomicU32, Ordering};

/// Sleep and wake on a 32-bit word (a futex in production).
pub trait Park {
    /// Sleep while `*word == expected`, at most `timeout`; may return spuriously.
    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Duration);
    /// Wake sleepers on `word`.
    fn wake(&self, word: &AtomicU32);
}

/// The real thing: a shared (cross-process) futex.
#[cfg(not(loom))]
#[derive(Debug, Clone, Copy, Default)]
pub struct Futex;

#[cfg(not(loom))]
impl Park for Futex {
    fn wait(&self, word: &AtomicU32, expected: u32, timeout: Duration) {
        crate::sys::futex_wait(word, expected, timeout);
    }
    fn wake(&self, word: &AtomicU32) {
        crate::sys::futex_wake(word, i32::MAX as u32);
    }
}

/// A futex word and the flag that says whether anyone sleeps on it.
#[derive(Clone, Copy)]
pub struct Doorbell<'a> {
    bell: &'a Bell,
}

impl<'a> Doorbell<'a> {
    /// A doorbell over a shared [`Bell`].
    pub fn new(bell: &'a Bell) -> Self {
        Doorbell { bell }
    }

    /// Called by the notifier after publishing work. Returns whether a wake was issued.
    #[inline]
    pub fn ring(&self, park: &impl Park) -> bool {
        // AcqRel RMW: ordered against the waiter's swap in `sleep` (see module doc). A plain load
        // could miss a waiter that announced itself just before our publish became visible.
        if self.bell.sleeping.fetch_add(0, Ordering::AcqRel) == 0 {
            return false;
        }
        // Release: a waiter that sees the new value (Acquire below) also sees our work.
        self.bell.word.fetch_add(1, Ordering::Release);
        park.wake(&self.bell.word);
        true
    }

    /// Sleeps until rung or `timeout`, unless `ready()` is already true after announcing.
    /// `ready` must check the condition the notifier publishes (e.g. "a ring is non-empty").
    pub fn sleep(&self, park: &impl Park, timeout: Duration, mut ready: impl FnMut() -> bool) {
        // AcqRel RMW: pairs with the notifier's RMW in `ring`.
        self.bell.sleeping.swap(1, Ordering::AcqRel);
        let seen = self.bell.word.load(Ordering::Acquire);
        if !ready() {
            park.wait(&self.bell.word, seen, timeout);
        }
        self.bell.sleeping.store(0, Ordering::Release);
    }
}

/// When a waiter's budget is spent but a partner last waited on this same CPU, hand the CPU to
/// it by yielding (a context switch on one run queue, no futex) up to this many times in a row
/// before sleeping: two busy runs sharing two CPUs settle into one CPU per run, where yield
/// hand-offs cost a fraction of a futex wake-up.
pub const SAME_CPU_YIELDS: u32 = 256;

/// For a waiter about to sleep on CPU `cpu`: says so in its own bell `me` (for its partners to
/// read), and tells whether one of `partners` that is not asleep on its futex last waited on
/// the same CPU. That partner shares this CPU's run queue: a yield hands it the CPU at once,
/// where a sleep would wait for a futex wake-up (see [`SAME_CPU_YIELDS`]).
pub fn same_cpu_partner<'b>(
    me: &Bell,
    cpu: usize,
    partners: impl IntoIterator<Item = &'b Bell>,
) -> bool {
    let cpu = cpu as u32 + 1;
    me.cpu.store(cpu, Ordering::Relaxed);
    partners.into_iter().any(|bell| {
        bell.cpu.load(Ordering::Relaxed) == cpu && bell.sleeping.load(Ordering::Relaxed) == 0
    })
}

/// How long to spin and yield before sleeping, adapted to whether spinning pays.
///
/// Spinning only helps when the other side answers within the spin, which needs it to be on
/// another CPU right now. On a machine shared with other busy processes (two runs at once, a
/// build next door) it often is not, and each spin then burns the CPU the other side needs;
/// yielding is no better (a yield that finds no other thread on this CPU's queue returns at
/// once). Measured on 2 CPUs: two runs at once each fell to under 1% of one run alone.
///
/// So the budget adapts, judged by time: a wait answered while spinning, without losing the CPU
/// on the way (at most [`PAYS`] plus a microsecond per re-check), keeps the budget and grows it
/// back; a wait that lost the CPU, yielded or had to sleep halves the spin budget, down to a few
/// dozen re-checks. The yield budget is judged apart: a wait answered during the yields keeps
/// it (the partner ran on the CPU they gave away), and only a wait that had to sleep halves it,
/// after which waiting is the futex. Because a collapsed budget cannot notice that spinning
/// would pay again (both sides asleep make every hand-off slow), one wait per [`PROBE_EVERY`]
/// spins with the full budget as a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    spins: u32,
    yields: u32,
    spin_limit: u32,
    yield_limit: u32,
    /// The most `spin_limit` may grow back to.
    max_spin: u32,
    /// The most `yield_limit` may grow back to.
    max_yield: u32,
    /// The current wait reached [`Step::Sleep`].
    slept: bool,
    /// When the current wait began (its first step).
    wait_start: Option<Instant>,
    /// When the last probe began.
    last_probe: Option<Instant>,
    /// The current wait is a probe: full budgets.
    probing: bool,
    /// This thread woke a sleeping partner, and no spin step or sleep has acted on it yet
    /// ([`Backoff::woke_partner`]).
    woke: bool,
}

/// The smallest adaptive spin budget: enough to catch a hand-off already in flight.
const MIN_SPIN: u32 = 32;
/// A wait answered within this long paid for its spinning (about two futex wake-ups here).
pub const PAYS: Duration = Duration::from_micros(100);
/// How often a waiter with a reduced budget spins the full budget once to see if it pays again.
pub const PROBE_EVERY: Duration = Duration::from_millis(100);

/// Re-checks made without a CPU pause before pausing between them.
const EAGER_SPINS: u32 = 256;
/// Re-checks before a wait is timed (see [`Backoff::step`]).
const UNTIMED_SPINS: u32 = 16;
/// While spinning, give the CPU away once every this many re-checks (about 30 us here).
///
/// The partner a waiter waits for may be queued on the waiter's own CPU: a woken sleeper is
/// often placed on the waker's CPU, beside an idle one, and the load balancer moves it only at
/// the next tick. Spinning on then only delays it: measured on 2 CPUs, the first task after an
/// idle spell took 1.6 ms (the caller's whole spin, then the worker's) instead of 0.1 ms. A
/// yield with nobody else queued returns at once (about 0.6 us here), so a spin interrupted
/// by one every 30 us costs a few percent of time spent waiting anyway.
pub const SPINS_PER_YIELD: u32 = 512;

/// How eagerly a waiter spins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpinMode {
    /// Every busy thread has a CPU of its own: spin about half a millisecond, then sleep. Decide
    /// this from the whole machine's CPU count, not from a pinned thread's affinity (one CPU).
    Long,
    /// Oversubscribed: spin briefly and give the CPU away quickly, so a waiter never steals it
    /// from a process that has work.
    Short,
    /// Sleep at once (measures the futex path).
    Never,
}

impl SpinMode {
    /// Encoding in a worker spec.
    pub fn code(self) -> u8 {
        match self {
            SpinMode::Never => 0,
            SpinMode::Short => 1,
            SpinMode::Long => 2,
        }
    }

    /// Inverse of [`code`](Self::code).
    pub fn from_code(c: u8) -> Option<SpinMode> {
        [SpinMode::Never, SpinMode::Short, SpinMode::Long]
            .get(usize::from(c))
            .copied()
    }
}

/// What a waiter should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Pause the CPU briefly and re-check.
    Spin,
    /// Give the CPU away once and re-check.
    Yield,
    /// Sleep on the doorbell.
    Sleep,
}

impl Backoff {
    /// Spins for about `spin_limit` pauses and yields `yield_limit` times before sleeping; the
    /// budgets then adapt between a small floor and these.
    pub fn new(spin_limit: u32, yield_limit: u32) -> Backoff {
        Backoff {
            spins: 0,
            yields: 0,
            spin_limit,
            yield_limit,
            max_spin: spin_limit,
            max_yield: yield_limit,
            slept: false,
            wait_start: None,
            last_probe: None,
            probing: false,
            woke: false,
        }
    }

    /// The policy for `mode`.
    pub fn for_mode(mode: SpinMode) -> Backoff {
        match mode {
            SpinMode::Long => Backoff::new(1 << 14, 16),
            SpinMode::Short => Backoff::new(64, 64),
            SpinMode::Never => Backoff::new(0, 0),
        }
    }

    /// Start over (work arrived), and learn from how long this wait took: call it as the wait
    /// ends, whichever way it ends (its length is taken up to this call, and a wait left open
    /// counts the waiter's own work after it as waiting).
    #[inline]
    pub fn reset(&mut self) {
        if let Some(start) = self.wait_start.take() {
            // Paid: answered while spinning, and this thread stayed on its CPU the whole time
            // (a spin re-check takes well under a microsecond; far more time than that per
            // re-check means the scheduler took the CPU away, which is what sharing looks like).
            let on_cpu =
                start.elapsed() <= PAYS + Duration::from_nanos(u64::from(self.spins) * 1000);
            // Yields paid when the wait ended during them: the partner got the CPU they gave.
            let yielded = !self.slept && self.yields > 0;
            self.learn(!self.slept && self.yields == 0 && on_cpu, yielded);
        }
        self.spins = 0;
        self.yields = 0;
        self.slept = false;
        self.probing = false;
    }

    /// `paid`: the wait was answered while spinning, on the CPU. `yielded`: it was answered
    /// during the yields, without sleeping.
    #[cold]
    fn learn(&mut self, paid: bool, yielded: bool) {
        if paid && self.probing {
            self.spin_limit = self.max_spin;
            self.yield_limit = self.max_yield;
        } else if paid {
            self.spin_limit = (self.spin_limit + self.spin_limit / 4 + 1).min(self.max_spin);
            self.yield_limit = (self.yield_limit + 1).min(self.max_yield);
        } else {
            self.spin_limit = (self.spin_limit / 2).max(MIN_SPIN.min(self.max_spin));
            // Yields that brought the answer keep their budget: more threads than CPUs hand
            // work over by yielding (one run with a worker per CPU besides its producer:
            // 0.2x of yielding as long as it takes, measured on 2 CPUs, when a yield counted
            // as a failure and every wait ended on the futex). Only a wait that had to sleep
            // says that yielding did not help.
            if yielded {
                self.yield_limit = (self.yield_limit + 1).min(self.max_yield);
            } else if self.slept {
                self.yield_limit /= 2;
            }
        }
    }

    /// The current spin budget (re-checks before yielding).
    pub fn spin_limit(&self) -> u32 {
        self.spin_limit
    }

    /// Says that this thread just woke a sleeping partner: its next wait begins with a yield.
    ///
    /// A woken sleeper is often queued on its waker's CPU, beside an idle one (why spinning
    /// yields every few hundred re-checks); a waker that then waits for it would spin in its
    /// way. The pool's producers use this (the first task after an idle spell: p50 107 us ->
    /// 82 us here); its workers do not: in a worker, a yield after waking a producer measured
    /// 0.83x with 2 producers and 1 worker on 2 CPUs.
    #[inline]
    pub fn woke_partner(&mut self) {
        self.woke = true;
    }

    /// The next step; [`Step::Spin`] and [`Step::Yield`] are performed here.
    #[inline]
    pub fn step(&mut self) -> Step {
        // A wait answered within the first few re-checks (the common hand-off while work
        // flows) reads no clock: it is on the CPU and paid by definition, and two clock reads
        // would cost more than the wait.
        if self.wait_start.is_none()
            && self.max_spin + self.max_yield > 0
            && self.spins >= UNTIMED_SPINS.min(self.spin_limit)
        {
            self.begin_wait();
        }
        let (spin_limit, yield_limit) = if self.probing {
            (self.max_spin, self.max_yield)
        } else {
            (self.spin_limit, self.yield_limit)
        };
        if self.spins < spin_limit {
            self.spins += 1;
            if std::mem::take(&mut self.woke) {
                std::thread::yield_now();
                return Step::Spin;
            }
            // The first re-checks go without a pause: PAUSE costs ~25 ns on recent x86 cores,
            // which would add straight to the hand-off latency. After that, pause to be polite.
            if self.spins > EAGER_SPINS {
                crate::sync::spin_hint();
                if self.spins.is_multiple_of(SPINS_PER_YIELD) {
                    std::thread::yield_now();
                }
            }
            Step::Spin
        } else if self.yields < yield_limit {
            self.yields += 1;
            std::thread::yield_now();
            Step::Yield
        } else {
            self.slept = true;
            self.woke = false;
            Step::Sleep
        }
    }

    #[cold]
    fn begin_wait(&mut self) {
        let now = Instant::now();
        self.wait_start = Some(now);
        if self.spin_limit < self.max_spin
            && self
                .last_probe
                .is_none_or(|t| now.duration_since(t) >= PROBE_EVERY)
        {
            self.probing = true;
            self.last_probe = Some(now);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    struct Words {
        bell: Bell,
        work: AtomicU32,
    }

    fn words() -> Words {
        Words {
            bell: Bell {
                word: AtomicU32::new(0),
                sleeping: AtomicU32::new(0),
                cpu: AtomicU32::new(0),
            },
            work: AtomicU32::new(0),
        }
    }

    #[test]
    fn a_same_cpu_partner_is_one_awake_on_this_cpu() {
        let (me, a, b) = (words(), words(), words());
        assert!(!same_cpu_partner(&me.bell, 3, [&a.bell, &b.bell]));
        assert_eq!(
            me.bell.cpu.load(Ordering::Relaxed),
            4,
            "1 + the CPU, 0 meaning unknown"
        );
        a.bell.cpu.store(4, Ordering::Relaxed);
        assert!(same_cpu_partner(&me.bell, 3, [&b.bell, &a.bell]));
        assert!(!same_cpu_partner(&me.bell, 2, [&a.bell]), "another CPU");
        a.bell.sleeping.store(1, Ordering::Relaxed);
        assert!(
            !same_cpu_partner(&me.bell, 3, [&a.bell]),
            "asleep: a yield cannot reach it"
        );
    }

    #[test]
    fn ring_is_silent_when_nobody_sleeps() {
        let w = words();
        let bell = Doorbell::new(&w.bell);
        assert!(!bell.ring(&Futex));
        assert_eq!(w.bell.word.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_sleeper_is_woken_long_before_its_timeout() {
        let w = Arc::new(words());
        let w2 = w.clone();
        let sleeper = std::thread::spawn(move || {
            let bell = Doorbell::new(&w2.bell);
            let start = Instant::now();
            while w2.work.load(Ordering::Acquire) == 0 {
                bell.sleep(&Futex, Duration::from_secs(30), || {
                    w2.work.load(Ordering::Acquire) != 0
                });
            }
            start.elapsed()
        });
        while w.bell.sleeping.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        w.work.store(1, Ordering::Release);
        let bell = Doorbell::new(&w.bell);
        bell.ring(&Futex);
        let waited = sleeper.join().unwrap();
        assert!(
            waited < Duration::from_secs(20),
            "woken by the ring, not the 30 s timeout"
        );
    }

    #[test]
    fn backoff_goes_spin_yield_sleep() {
        let mut b = Backoff::new(2, 1);
        assert_eq!(b.step(), Step::Spin);
        assert_eq!(b.step(), Step::Spin);
        assert_eq!(b.step(), Step::Yield);
        assert_eq!(b.step(), Step::Sleep);
        b.reset();
        assert_eq!(b.step(), Step::Spin);
        // After waking a partner, the next wait yields first (counted as a re-check, so the
        // spin budget is unchanged in length), once.
        let mut b = Backoff::new(2, 1);
        b.woke_partner();
        assert!(b.woke);
        assert_eq!(b.step(), Step::Spin);
        assert!(!b.woke);
        assert_eq!(b.step(), Step::Spin);
        assert_eq!(b.step(), Step::Yield);
        // A waiter that never spins forgets it at its sleep.
        let mut n = Backoff::for_mode(SpinMode::Never);
        n.woke_partner();
        assert_eq!(n.step(), Step::Sleep);
        assert!(!n.woke);
    }

    #[test]
    fn spinning_backs_off_when_it_does_not_pay_and_recovers_when_it_does() {
        let mut b = Backoff::new(1 << 14, 4);
        // Waits answered during the yields (more threads than CPUs, handing work over by
        // yielding): spinning did not pay, the yields did and keep their budget.
        let full_yields = b.yield_limit;
        for _ in 0..20 {
            loop {
                match b.step() {
                    Step::Spin => {}
                    Step::Yield => break,
                    Step::Sleep => panic!("the yields lost their budget"),
                }
            }
            b.reset();
        }
        assert_eq!(b.spin_limit(), MIN_SPIN);
        assert_eq!(b.yield_limit, full_yields);
        // Waits that end asleep: the budgets fall to the floor.
        for _ in 0..20 {
            while b.step() != Step::Sleep {}
            b.reset();
        }
        assert_eq!(b.spin_limit(), MIN_SPIN);
        assert_eq!(b.yield_limit, 0);
        // A wait with a reduced budget, due for a probe, spins the full budget...
        b.last_probe = None;
        b.begin_wait();
        assert!(b.probing);
        let spins = std::iter::from_fn(|| Some(b.step()))
            .take_while(|s| *s == Step::Spin)
            .count();
        assert_eq!(spins as u32, 1 << 14);
        // ...and when it pays, the whole budget is back.
        b.learn(true, false);
        assert_eq!(b.spin_limit(), 1 << 14);
        assert_eq!(b.yield_limit, 4);
        // A wait answered late (the other side was not running) halves it again.
        b.probing = false;
        b.learn(false, false);
        assert_eq!(b.spin_limit(), 1 << 13);
        // Never is never.
        let mut n = Backoff::for_mode(SpinMode::Never);
        assert_eq!(n.step(), Step::Sleep);
        n.reset();
        assert_eq!(n.spin_limit(), 0);
    }
}
