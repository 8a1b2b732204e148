//! The coordinator role: the producer threads that fill, dispatch and verify, and the monitor
//! (the calling thread) that starts workers, notices deaths, enforces the watchdog, and ends
//! the run.
//!
//! Producer hot path, per thread: pop returned tokens from every worker's ring, verify each
//! matrix against the op applied to the deterministic fill, recycle the slot, fill a new one,
//! push its token to the worker the dispatch policy picks, flush, ring doorbells only for
//! sleepers. No lock, no allocation, no syscall while work flows (DESIGN invariant 7).
//!
//! Deaths (DESIGN invariant 3). The monitor holds a pidfd per worker and polls them, so it learns
//! of an exit as it happens. It marks the worker dead and bumps its death epoch; each producer,
//! on seeing the new epoch, drains and verifies what the dead worker had already returned,
//! reclaims every other token it had sent there (their matrices are filled again and redone),
//! resets its own ring pair with that worker, and acknowledges. Only when every producer has
//! acknowledged does the monitor start a replacement, so the new process never sees stale ring
//! state. A producer that finds a protocol violation (bad token, impossible ring counter) asks
//! the monitor to kill the worker, and the same path follows.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::clock::{self, Ticks};
use crate::config::{matrix_bytes, Config, ConfigError, Pin, Plan, Stop, Wait};
use crate::dispatch::{self, Dispatch, WorkerView};
use crate::job::{fill_base, Shapes};
use crate::layout::{Direction, MatrixDesc, Padded, SlotDesc, WorkerState, MAX_BATCH};
use crate::ops::{Kernels, Op};
use crate::pool::{SlotPool, Token};
use crate::report::{Failure, Latency, Report, WorkerExit};
use crate::ring::{RingConsumer, RingProducer};
use crate::shm::{Segment, ShmCreateError};
use crate::sync::{AtomicU64, Ordering};
use crate::sys::{self, ExitKind};
use crate::wait::{Backoff, Doorbell, Futex, SpinMode, Step};
use crate::worker::{WorkerSpec, EXIT_BAD_SEGMENT, WORKER_ENV};

/// How often the monitor looks at heartbeats and reports progress, at most.
const MONITOR_TICK: Duration = Duration::from_millis(20);
/// Longest a producer sleeps before re-checking its deadline.
const PRODUCER_SLEEP: Duration = Duration::from_millis(20);
/// How long workers get to exit after shutdown is requested before they are killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long a new worker may take to attach.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Failures kept in the report.
const KEEP_FAILURES: usize = 16;

/// Why a run could not start (exit 2: usage or environment).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Shared memory could not be set up.
    #[error(transparent)]
    Shm(#[from] ShmCreateError),
    /// A worker process could not be started.
    #[error("cannot start worker {worker} ({exe}): {why}")]
    WorkerStart {
        /// Worker slot.
        worker: u32,
        /// The program.
        exe: String,
        /// What happened.
        why: String,
    },
}

/// Live progress, passed to [`Hooks::progress`] a few times a second.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Matrices verified so far.
    pub matrices: u64,
    /// Since the run started.
    pub elapsed: Duration,
    /// What ends the run.
    pub stop: Stop,
}

/// Optional callbacks for a run.
#[derive(Default, Clone, Copy)]
pub struct Hooks<'a> {
    /// Called from the monitor thread every ~100 ms.
    pub progress: Option<&'a (dyn Fn(&Progress) + Sync)>,
    /// When this becomes non-zero (e.g. a signal number stored by a handler), stop issuing,
    /// drain, and report with `interrupted` set.
    pub stop_signal: Option<&'a AtomicUsize>,
}

/// State shared between the monitor and the producer threads (process-local).
struct Control {
    /// Stop issuing new matrices.
    stop: AtomicBool,
    /// Producers may exit (they are all idle).
    finish: AtomicBool,
    /// `alive[w]`: worker `w` may be sent tokens.
    alive: Vec<AtomicBool>,
    /// Bumped on every death and every restart; producers re-read `alive` when it moves.
    changes: AtomicUsize,
    /// Deaths of worker `w` so far.
    death_epoch: Vec<AtomicUsize>,
    /// `acked[p][w]`: the last death epoch of `w` producer `p` has cleaned up after.
    acked: Vec<Vec<AtomicUsize>>,
    /// Tokens reclaimed from worker `w` at its last death (summed over producers).
    reclaimed: Vec<AtomicU64>,
    /// `kill[w]`: a producer caught worker `w` breaking the protocol.
    kill: Vec<AtomicBool>,
    /// Why, for the report (cold path).
    fault_reasons: Mutex<Vec<(u32, String)>>,
    /// Every worker is gone for good; producers give up on what is left.
    no_workers: AtomicBool,
    /// `idle[p]`: producer `p` stopped issuing and has every token home.
    idle: Vec<AtomicBool>,
    /// Matrices verified by producer `p` (progress only), one line each.
    done: Vec<Padded<AtomicU64>>,
    /// `flow[p][w]`: tokens producer `p` has sent to worker `w` and has had back (returned or
    /// reclaimed). Process-local, written only by producer `p`, so the watchdog's notion of
    /// "owes tokens and makes no progress" cannot be faked by a worker.
    flow: Vec<Box<[Flow]>>,
}

/// One producer's token counts for one worker (see [`Control::flow`]).
struct Flow {
    sent: AtomicU64,
    back: AtomicU64,
}

/// What one producer thread counted.
struct ProducerStats {
    matrices: u64,
    failed: u64,
    lost: u64,
    redone: u64,
    tokens: u64,
    bytes: u64,
    per_worker: Vec<u64>,
    latency: Histogram<u64>,
    failures: Vec<Failure>,
    first_issue: Option<Ticks>,
    last_return: Option<Ticks>,
}

/// Producer `p`'s ends of its two rings with worker `w`, both counters zeroed. Only while no
/// worker process serves `w` with tokens from them: at start, or after `w` died.
fn zeroed_ring_pair(seg: &Segment, p: u32, w: u32) -> (RingProducer<'_>, RingConsumer<'_>) {
    let (c, e) = seg.ring(p, w, Direction::ToWorker);
    let to = RingProducer::reset(c, e);
    let (c, e) = seg.ring(p, w, Direction::FromWorker);
    (to, RingConsumer::after_reset(c, e))
}

/// Writes the fill of every matrix in `desc`, then the descriptor, into the token's slot.
fn write_slot(seg: &Segment, kernels: Kernels, seed: u64, desc: &SlotDesc, token: &mut Token) {
    let data = seg.slot_mut(token);
    for (i, m) in desc.matrices[..desc.count as usize].iter().enumerate() {
        let start = m.offset as usize / 4;
        let elems = m.rows as usize * m.cols as usize;
        kernels.fill(
            fill_base(desc.seq + i as u64, seed),
            &mut data[start..start + elems],
        );
    }
    seg.write_desc(token, desc);
}

/// Counts one checked matrix: its bytes if it matched, a failure (the first few in detail) if
/// `bad` holds the first wrong element and the value found there.
fn account(
    s: &mut ProducerStats,
    op: Op,
    seq: u64,
    w: u32,
    base: i32,
    elems: usize,
    bad: Option<(usize, i32)>,
) {
    match bad {
        None => s.bytes += elems as u64 * 4,
        Some((at, got)) => {
            s.failed += 1;
            if s.failures.len() < KEEP_FAILURES {
                s.failures.push(Failure {
                    seq,
                    worker: w,
                    index: at as u64,
                    expected: op.apply_scalar(base.wrapping_add(at as i32)),
                    got,
                });
            }
        }
    }
}

/// Counts one returned token of `count` matrices from worker `w`.
fn returned(s: &mut ProducerStats, w: u32, count: u32, sent_at: Ticks, now: Ticks) {
    s.matrices += u64::from(count);
    s.per_worker[w as usize] += u64::from(count);
    s.tokens += 1;
    s.latency
        .saturating_record(clock::nanos_between(sent_at, now));
    s.last_return = Some(now);
}

/// One producer thread.
struct Producer<'s> {
    p: u32,
    seg: &'s Segment,
    ctl: &'s Control,
    kernels: Kernels,
    op: Op,
    seed: u64,
    batch_cap: u32,
    out_limit: u32,
    /// Slot bytes of each class, smallest first.
    class_bytes: Vec<u64>,
    pool: SlotPool,
    to: Vec<RingProducer<'s>>,
    from: Vec<RingConsumer<'s>>,
    bells: Vec<Doorbell<'s>>,
    touched: Vec<bool>,
    usable: Vec<bool>,
    faulted: Vec<bool>,
    seen_epoch: Vec<usize>,
    seen_changes: usize,
    redo: Vec<Token>,
    shapes: Shapes,
    policy: Box<dyn Dispatch>,
    next_seq: u64,
    /// Matrices still to issue in count mode.
    budget: Option<u64>,
    /// End of issuing, in clock ticks.
    deadline: Option<Ticks>,
    issuing: bool,
    /// How long to spin before sleeping.
    spin: SpinMode,
    /// Local copies of this producer's `Control::flow` counters.
    sent: Vec<u64>,
    back: Vec<u64>,
    /// Last value stored into `Control::done`.
    done_published: u64,
    stats: ProducerStats,
}

impl<'s> Producer<'s> {
    fn new(
        p: u32,
        seg: &'s Segment,
        ctl: &'s Control,
        cfg: &Config,
        plan: &Plan,
        kernels: Kernels,
        start: Instant,
    ) -> Self {
        let layout = seg.layout();
        let workers = layout.params().workers;
        let producers = layout.params().producers;
        let mut to = Vec::new();
        let mut from = Vec::new();
        let mut bells = Vec::new();
        for w in 0..workers {
            // Zeroed rather than validated: a worker may already have scribbled on them.
            let (t, f) = zeroed_ring_pair(seg, p, w);
            to.push(t);
            from.push(f);
            let ws = seg.worker(w);
            bells.push(Doorbell::new(&ws.bell));
        }
        let budget = match cfg.stop {
            Stop::Count(n) => {
                let (p, np) = (u64::from(p), u64::from(producers));
                Some(n * (p + 1) / np - n * p / np)
            }
            Stop::After(_) => None,
        };
        let deadline = match cfg.stop {
            Stop::After(d) => {
                let left = d.saturating_sub(start.elapsed()).as_nanos() as f64;
                Some(clock::now().saturating_add((left / clock::ns_per_tick()) as u64))
            }
            Stop::Count(_) => None,
        };
        let w = workers as usize;
        Producer {
            p,
            seg,
            ctl,
            kernels,
            op: cfg.op,
            seed: cfg.seed,
            batch_cap: plan.batch_cap,
            out_limit: plan.out_limit[p as usize],
            class_bytes: layout.classes().iter().map(|c| c.slot_bytes).collect(),
            pool: SlotPool::share(layout, p, producers),
            to,
            from,
            bells,
            touched: vec![false; w],
            usable: vec![true; w],
            faulted: vec![false; w],
            seen_epoch: vec![0; w],
            seen_changes: 0,
            redo: Vec::new(),
            shapes: Shapes::new(
                cfg.seed ^ (u64::from(p) << 32) ^ 0x5eed,
                cfg.min_dim,
                cfg.max_dim,
            ),
            policy: dispatch::policy(cfg.dispatch, cfg.seed.wrapping_add(u64::from(p))),
            next_seq: u64::from(p) << 48,
            budget,
            deadline,
            issuing: budget != Some(0),
            spin: match cfg.wait {
                Wait::Sleep => SpinMode::Never,
                Wait::Auto if (workers + producers) as usize <= sys::online_cpus() => {
                    SpinMode::Long
                }
                Wait::Auto => SpinMode::Short,
            },
            sent: vec![0; w],
            back: vec![0; w],
            done_published: 0,
            stats: ProducerStats {
                matrices: 0,
                failed: 0,
                lost: 0,
                redone: 0,
                tokens: 0,
                bytes: 0,
                per_worker: vec![0; w],
                latency: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds"),
                failures: Vec::new(),
                first_issue: None,
                last_return: None,
            },
        }
    }

    /// Checks every matrix of a returned token and puts the slot back in the pool.
    fn verify(&mut self, mut token: Token, w: u32, now: Ticks) {
        let record = self.pool.record(&token);
        let (desc, sent_at) = (&record.desc, record.sent_at);
        let data = self.seg.slot_mut(&mut token);
        for (i, m) in desc.matrices[..desc.count as usize].iter().enumerate() {
            let seq = desc.seq + i as u64;
            let base = fill_base(seq, self.seed);
            let start = m.offset as usize / 4;
            let elems = m.rows as usize * m.cols as usize;
            let matrix = &data[start..start + elems];
            let bad = self
                .kernels
                .verify(self.op, base, matrix)
                .map(|at| (at, matrix[at]));
            account(&mut self.stats, self.op, seq, w, base, elems, bad);
        }
        let count = desc.count;
        returned(&mut self.stats, w, count, sent_at, now);
        self.pool.put(token);
    }

    /// The fused return path for one-matrix tokens: verifies the returned matrix and fills the
    /// next one into the same slot in a single pass (the slot is hot in cache, and the token
    /// skips the free list). `Err` gives the token back when that is not possible (nothing more
    /// to issue, or the next shape does not fit this slot); the caller verifies it as usual.
    fn refill_in_place(&mut self, mut token: Token, w: u32, now: Ticks) -> Result<Token, Token> {
        if self.batch_cap != 1 || !self.issuing || !self.redo.is_empty() || self.budget == Some(0) {
            return Err(token);
        }
        if self.ctl.stop.load(Ordering::Relaxed) {
            self.issuing = false;
            return Err(token);
        }
        if self.deadline.is_some_and(|d| now >= d) {
            self.issuing = false;
            return Err(token);
        }
        let (r, c) = self.shapes.next_shape();
        let need = self
            .class_bytes
            .iter()
            .position(|&b| b >= matrix_bytes(r, c));
        let have = self.pool.class_index(&token);
        // Any slot the next matrix fits in will do: the pending shape mechanism makes sure a
        // large matrix takes the next large slot that comes back (measured: a few per cent more
        // matrices/s than requiring the exact class).
        if need.is_none_or(|n| n > have) {
            self.shapes.pending = Some((r, c));
            return Err(token);
        }
        let record = self.pool.record(&token);
        let (old, old_seq, sent_at) = (record.desc.matrices[0], record.desc.seq, record.sent_at);
        debug_assert_eq!(record.desc.count, 1);
        let new_seq = self.next_seq;
        let (old_base, new_base) = (fill_base(old_seq, self.seed), fill_base(new_seq, self.seed));
        let old_len = old.rows as usize * old.cols as usize;
        let new_len = r as usize * c as usize;
        let data = self.seg.slot_mut(&mut token);
        let bad = self
            .kernels
            .verify_then_fill(self.op, old_base, old_len, new_base, new_len, data);
        account(&mut self.stats, self.op, old_seq, w, old_base, old_len, bad);
        returned(&mut self.stats, w, 1, sent_at, now);
        self.next_seq += 1;
        if let Some(b) = &mut self.budget {
            *b -= 1;
            if *b == 0 {
                self.issuing = false;
            }
        }
        let desc = &mut self.pool.record_mut(&token).desc;
        desc.seq = new_seq;
        desc.matrices[0] = MatrixDesc {
            rows: r,
            cols: c,
            offset: 0,
            reserved: 0,
        };
        self.seg.write_desc(&token, &self.pool.record(&token).desc);
        Ok(token)
    }

    /// Takes a free slot and fills it with fresh matrices; `None` if no slot fits right now.
    /// The descriptor is built in place in the pool's record (no copy of the whole struct).
    fn fill_new(&mut self) -> Option<Token> {
        let mut token = if self.batch_cap == 1 {
            let (r, c) = self.shapes.next_shape();
            let bytes = matrix_bytes(r, c);
            let class = self
                .class_bytes
                .iter()
                .position(|&b| b >= bytes)
                .expect("largest class fits max_dim");
            let Some(t) = self.pool.take(class) else {
                self.shapes.pending = Some((r, c));
                return None;
            };
            let desc = &mut self.pool.record_mut(&t).desc;
            desc.matrices[0] = MatrixDesc {
                rows: r,
                cols: c,
                offset: 0,
                reserved: 0,
            };
            desc.count = 1;
            t
        } else {
            let t = self.pool.take(0)?;
            let room = self
                .seg
                .layout()
                .slot_data(t.slot())
                .expect("pool slots are in range")
                .1;
            let cap = MAX_BATCH.min(self.batch_cap as usize) as u32;
            let cap = self.budget.map_or(cap, |b| b.min(u64::from(cap)) as u32);
            let desc = &mut self.pool.record_mut(&t).desc;
            desc.count = 0;
            let mut used = 0;
            while desc.count < cap {
                let (r, c) = self.shapes.next_shape();
                let bytes = matrix_bytes(r, c);
                if used + bytes > room {
                    self.shapes.pending = Some((r, c));
                    break;
                }
                desc.matrices[desc.count as usize] = MatrixDesc {
                    rows: r,
                    cols: c,
                    offset: used as u32,
                    reserved: 0,
                };
                desc.count += 1;
                used += bytes;
            }
            t
        };
        let desc = &mut self.pool.record_mut(&token).desc;
        desc.seq = self.next_seq;
        (desc.op_kind, desc.op_a, desc.op_b) = self.op.encode();
        let count = u64::from(desc.count);
        self.next_seq += count;
        if let Some(b) = &mut self.budget {
            *b -= count;
            if *b == 0 {
                self.issuing = false;
            }
        }
        write_slot(
            self.seg,
            self.kernels,
            self.seed,
            &self.pool.record(&token).desc,
            &mut token,
        );
        Some(token)
    }

    /// A worker broke the protocol: stop using its rings and ask the monitor to kill it.
    fn fault(&mut self, w: usize, why: String) {
        if !self.faulted[w] {
            self.faulted[w] = true;
            self.usable[w] = false;
            self.ctl
                .fault_reasons
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((w as u32, why));
            self.ctl.kill[w].store(true, Ordering::Release);
        }
    }

    /// Pops and verifies everything worker `w` has returned. Returns whether anything came.
    /// A protocol violation faults the worker (it is killed), unless `after_death`: then the
    /// process is already gone and the drain just stops.
    ///
    /// At most as many tokens as the pool owns are taken per call: with the fused return path a
    /// token can be back before the loop ends, and the caller must get to its other duties. The
    /// clock is read per token (not cached), so latency and deadlines stay exact.
    fn collect(&mut self, w: usize, after_death: bool) -> bool {
        let mut got = false;
        for _ in 0..self.pool.len() {
            match self.from[w].pop() {
                Ok(Some(word)) => match self.pool.accept(word, w as u32) {
                    Ok(token) => {
                        self.note_back(w, 1);
                        let now = clock::now();
                        match self.refill_in_place(token, w as u32, now) {
                            Ok(t) => {
                                self.send(t, now);
                            }
                            Err(t) => self.verify(t, w as u32, now),
                        }
                        got = true;
                    }
                    Err(e) => {
                        if !after_death {
                            self.fault(w, format!("returned a bad token: {e}"));
                        }
                        break;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    if !after_death {
                        self.fault(w, format!("corrupted its return ring: {e}"));
                    }
                    break;
                }
            }
        }
        got
    }

    /// Worker `w` died: keep what it finished, take back the rest, reset our rings with it.
    fn clean_up_after(&mut self, w: usize) {
        // First of all: no token may be sent to the dead worker while we drain its returns.
        self.usable[w] = false;
        if !self.faulted[w] {
            // The worker is gone, so nothing new arrives: one pass drains the ring.
            self.collect(w, true);
        }
        let back = self.pool.reclaim(w as u32);
        self.note_back(w, back.len() as u64);
        self.ctl.reclaimed[w].fetch_add(back.len() as u64, Ordering::Relaxed);
        for t in back {
            self.stats.redone += u64::from(self.pool.record(&t).desc.count);
            self.redo.push(t);
        }
        (self.to[w], self.from[w]) = zeroed_ring_pair(self.seg, self.p, w as u32);
        self.faulted[w] = false;
    }

    /// Acts on deaths and restarts published by the monitor.
    fn follow_monitor(&mut self) {
        let changes = self.ctl.changes.load(Ordering::Acquire);
        if changes == self.seen_changes {
            return;
        }
        self.seen_changes = changes;
        for w in 0..self.usable.len() {
            let epoch = self.ctl.death_epoch[w].load(Ordering::Acquire);
            if epoch != self.seen_epoch[w] {
                self.clean_up_after(w);
                self.seen_epoch[w] = epoch;
                // Release: our ring reset happens-before the monitor's restart of the worker.
                self.ctl.acked[self.p as usize][w].store(epoch, Ordering::Release);
            }
            self.usable[w] = self.ctl.alive[w].load(Ordering::Acquire) && !self.faulted[w];
        }
    }

    /// Sends one token (fresh or redone) if a slot, a worker and room allow. Returns whether it did.
    /// The clock is read per token: a pass can fill many large matrices, and each one's send
    /// time and the deadline check must be its own.
    fn issue_one(&mut self) -> bool {
        if self.pool.out_total() >= self.out_limit || !self.usable.contains(&true) {
            return false;
        }
        let now = clock::now();
        let token = if let Some(mut t) = self.redo.pop() {
            write_slot(
                self.seg,
                self.kernels,
                self.seed,
                &self.pool.record(&t).desc,
                &mut t,
            );
            t
        } else if self.issuing {
            if self.deadline.is_some_and(|d| now >= d) {
                self.issuing = false;
                return false;
            }
            match self.fill_new() {
                Some(t) => t,
                None => return false,
            }
        } else {
            return false;
        };
        self.send(token, now)
    }

    /// Sends a filled token to the worker the policy picks; with no usable worker it waits in
    /// the redo list (its record still describes what it holds). Returns whether it was sent.
    fn send(&mut self, token: Token, now: Ticks) -> bool {
        match self.policy.pick(&WorkerView {
            usable: &self.usable,
            load: self.pool.out_counts(),
        }) {
            Some(w) => {
                self.send_to(token, w, now);
                true
            }
            None => {
                self.redo.push(token);
                false
            }
        }
    }

    /// Records that `n` tokens came back from (or were reclaimed from) worker `w`.
    #[inline]
    fn note_back(&mut self, w: usize, n: u64) {
        self.back[w] += n;
        self.ctl.flow[self.p as usize][w]
            .back
            .store(self.back[w], Ordering::Relaxed);
    }

    fn send_to(&mut self, token: Token, w: u32, now: Ticks) {
        self.sent[w as usize] += 1;
        self.ctl.flow[self.p as usize][w as usize]
            .sent
            .store(self.sent[w as usize], Ordering::Relaxed);
        self.stats.first_issue.get_or_insert(now);
        let word = self.pool.dispatch(token, w, now);
        if let Err(e) = self.to[w as usize].push(word) {
            // Cannot be Full (capacity >= our tokens); the worker corrupted the head counter.
            // The token is recorded as out at `w` and comes back through the death path.
            self.fault(w as usize, format!("corrupted its request ring: {e}"));
        }
        // Published at once so the worker can start while we fill the next one; its doorbell
        // is rung once per loop iteration.
        self.to[w as usize].flush();
        self.touched[w as usize] = true;
    }

    fn run(mut self) -> ProducerStats {
        let workers = self.usable.len();
        let mut backoff = Backoff::for_mode(self.spin);
        let me = self.seg.producer(self.p);
        let my_bell = Doorbell::new(&me.bell);
        loop {
            let mut progress = false;
            for w in 0..workers {
                if self.usable[w] {
                    progress |= self.collect(w, false);
                }
            }
            self.follow_monitor();
            if self.issuing && self.ctl.stop.load(Ordering::Relaxed) {
                self.issuing = false;
            }
            while self.issue_one() {
                progress = true;
            }
            for w in 0..workers {
                if std::mem::take(&mut self.touched[w]) {
                    self.bells[w].ring(&Futex);
                }
            }
            if self.stats.matrices != self.done_published {
                self.done_published = self.stats.matrices;
                self.ctl.done[self.p as usize]
                    .0
                    .store(self.done_published, Ordering::Relaxed);
            }
            if !self.issuing && self.ctl.no_workers.load(Ordering::Acquire) {
                // Nobody is left to do the remaining work: report it, never drop it silently.
                for t in std::mem::take(&mut self.redo) {
                    self.stats.lost += u64::from(self.pool.record(&t).desc.count);
                    self.pool.put(t);
                }
                for w in 0..workers {
                    let back = self.pool.reclaim(w as u32);
                    self.note_back(w, back.len() as u64);
                    for t in back {
                        self.stats.lost += u64::from(self.pool.record(&t).desc.count);
                        self.pool.put(t);
                    }
                }
            }
            if !self.issuing && self.pool.all_home() && self.redo.is_empty() {
                self.ctl.idle[self.p as usize].store(true, Ordering::Release);
                if self.ctl.finish.load(Ordering::Acquire) {
                    return self.stats;
                }
            }
            if progress {
                backoff.reset();
            } else if backoff.step() == Step::Sleep {
                let seen = self.seen_changes;
                let ctl = self.ctl;
                let from = &mut self.from;
                let usable = &self.usable;
                my_bell.sleep(&Futex, PRODUCER_SLEEP, || {
                    ctl.changes.load(Ordering::Acquire) != seen
                        || ctl.finish.load(Ordering::Acquire)
                        || from
                            .iter_mut()
                            .zip(usable)
                            .any(|(r, &u)| u && r.has_pending().unwrap_or(true))
                });
            }
        }
    }
}

/// A running worker process as the monitor sees it.
struct WorkerProc {
    pid: u32,
    pidfd: OwnedFd,
    /// Tokens back from this worker slot at the last change (from `flow_of`).
    progress: u64,
    /// When `progress` last changed (or the worker owed nothing).
    last_beat: Instant,
}

fn spawn_worker(
    exe: &std::path::Path,
    seg: &Segment,
    spec: WorkerSpec,
) -> std::io::Result<WorkerProc> {
    let child = sys::spawn_inheriting(exe, WORKER_ENV, &spec.encode(), &[seg.fd().as_raw_fd()])?;
    // Nobody else reaps the child (we never wait on `child`), so its pid cannot be reused before
    // this pidfd is open, even if it already exited.
    let pidfd = sys::pidfd_open(child.id())?;
    Ok(WorkerProc {
        pid: child.id(),
        pidfd,
        progress: 0,
        last_beat: Instant::now(),
    })
}

/// `(owed, progress)` of worker `w` from the producers' own counts: tokens sent and not yet
/// back, and tokens back so far.
fn flow_of(ctl: &Control, w: usize) -> (u64, u64) {
    ctl.flow.iter().fold((0, 0), |(owed, back), f| {
        let (s, b) = (
            f[w].sent.load(Ordering::Relaxed),
            f[w].back.load(Ordering::Relaxed),
        );
        (owed + s.saturating_sub(b), back + b)
    })
}

/// Runs the pipeline described by `cfg`: set up, run to the stop condition, drain, shut down,
/// report. Errors are only for runs that could not start; a run that started always returns a
/// [`Report`] (check `verified`).
pub fn run(cfg: &Config, hooks: &Hooks<'_>) -> Result<Report, RunError> {
    let plan = cfg.plan()?;
    // Calibrate the tick clock now (it sleeps ~20 ms once), not at the first returned token.
    clock::ns_per_tick();
    let kernels = Kernels::new(cfg.kernel).map_err(|e| ConfigError {
        what: "--kernel",
        why: e.to_string(),
    })?;
    let seg = Segment::create(plan.layout)?;
    let workers = cfg.workers;
    let producers = cfg.producers;
    let cpus = sys::online_cpus();
    let pinned = cfg.pin == Pin::Auto && (workers + producers) as usize <= cpus;
    let exe = match &cfg.worker_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| RunError::WorkerStart {
            worker: 0,
            exe: "current executable".into(),
            why: e.to_string(),
        })?,
    };
    let coordinator = sys::own_pid();
    let spec = |w: u32| WorkerSpec {
        fd: seg.fd().as_raw_fd(),
        index: w,
        coordinator,
        kernel: cfg.kernel,
        cpu: pinned.then_some((producers + w) as usize),
        spin: match cfg.wait {
            Wait::Sleep => SpinMode::Never,
            Wait::Auto if (workers + producers) as usize <= cpus => SpinMode::Long,
            Wait::Auto => SpinMode::Short,
        },
    };

    // Start every worker and wait until each has attached, so a program that cannot serve as a
    // worker is a clear start-up error rather than a storm of restarts.
    let mut procs: Vec<Option<WorkerProc>> = Vec::new();
    let start_err = |w: u32, why: String| RunError::WorkerStart {
        worker: w,
        exe: exe.display().to_string(),
        why,
    };
    let abort = |procs: &mut Vec<Option<WorkerProc>>| {
        for wp in procs.iter().flatten() {
            let _ = sys::kill_pidfd(wp.pidfd.as_fd());
            let _ = sys::poll_readable(&[wp.pidfd.as_fd()], Duration::from_secs(1));
            let _ = sys::try_reap(wp.pidfd.as_fd());
        }
    };
    for w in 0..workers {
        match spawn_worker(&exe, &seg, spec(w)) {
            Ok(p) => procs.push(Some(p)),
            Err(e) => {
                abort(&mut procs);
                return Err(start_err(w, e.to_string()));
            }
        }
    }
    let deadline = Instant::now() + START_TIMEOUT;
    for w in 0..workers {
        loop {
            if seg.worker(w).status.state.load(Ordering::Acquire) == WorkerState::Running as u32 {
                break;
            }
            let wp = procs[w as usize].as_ref().expect("just spawned");
            let status = sys::try_reap(wp.pidfd.as_fd()).ok().flatten();
            if status.is_some() || Instant::now() > deadline {
                let why = match status {
                    Some(s) => format!(
                        "it {s} before attaching to shared memory; a program used as the worker must call \
                         mk1::run_if_worker() first thing in main"
                    ),
                    None => format!("it did not attach within {START_TIMEOUT:?}"),
                };
                procs[w as usize] = None;
                abort(&mut procs);
                return Err(start_err(w, why));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    let ctl = Control {
        stop: AtomicBool::new(false),
        finish: AtomicBool::new(false),
        alive: (0..workers).map(|_| AtomicBool::new(true)).collect(),
        changes: AtomicUsize::new(0),
        death_epoch: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
        acked: (0..producers)
            .map(|_| (0..workers).map(|_| AtomicUsize::new(0)).collect())
            .collect(),
        reclaimed: (0..workers).map(|_| AtomicU64::new(0)).collect(),
        kill: (0..workers).map(|_| AtomicBool::new(false)).collect(),
        fault_reasons: Mutex::new(Vec::new()),
        no_workers: AtomicBool::new(false),
        idle: (0..producers).map(|_| AtomicBool::new(false)).collect(),
        done: (0..producers).map(|_| Padded(AtomicU64::new(0))).collect(),
        flow: (0..producers)
            .map(|_| {
                (0..workers)
                    .map(|_| Flow {
                        sent: AtomicU64::new(0),
                        back: AtomicU64::new(0),
                    })
                    .collect()
            })
            .collect(),
    };
    let start = Instant::now();
    let mut exits: Vec<WorkerExit> = Vec::new();
    let mut restarts = 0u32;
    let mut faults = 0u32;
    let mut interrupted: Option<String> = None;

    let stats: Vec<ProducerStats> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..producers)
            .map(|p| {
                let producer = Producer::new(p, &seg, &ctl, cfg, &plan, kernels, start);
                std::thread::Builder::new()
                    .name(format!("mk1-producer-{p}"))
                    .spawn_scoped(scope, move || {
                        if pinned {
                            let _ = sys::pin_to_cpu(p as usize);
                        }
                        producer.run()
                    })
                    .expect("spawning a producer thread")
            })
            .collect();

        // The monitor. It runs on the thread that spawned the workers, which lives until they
        // are reaped: their parent-death signal is tied to this thread.
        let mut pending_restart: Vec<u32> = Vec::new();
        let mut gone_for_good = vec![false; workers as usize];
        let mut last_progress = Instant::now();
        let mut watchdog_kills: Vec<bool> = vec![false; workers as usize];
        loop {
            let live: Vec<(u32, BorrowedFd<'_>)> = procs
                .iter()
                .enumerate()
                .filter_map(|(w, p)| p.as_ref().map(|p| (w as u32, p.pidfd.as_fd())))
                .collect();
            let fds: Vec<BorrowedFd<'_>> = live.iter().map(|&(_, fd)| fd).collect();
            // While a restart waits for the producers' acknowledgements, look again soon.
            let tick = if pending_restart.is_empty() {
                MONITOR_TICK
            } else {
                Duration::from_millis(1)
            };
            let ready = sys::poll_readable(&fds, tick).unwrap_or_default();
            let ready: Vec<u32> = ready.iter().map(|&i| live[i].0).collect();
            drop(fds);
            drop(live);
            for w in ready {
                let Some(wp) = procs[w as usize].take() else {
                    continue;
                };
                let how = match sys::try_reap(wp.pidfd.as_fd()) {
                    Ok(Some(k)) => k,
                    // Readable but not reapable yet: look again next tick.
                    _ => {
                        procs[w as usize] = Some(wp);
                        continue;
                    }
                };
                let noticed = start.elapsed();
                let mut how_words = how.to_string();
                let faulted = ctl.kill[w as usize].swap(false, Ordering::AcqRel);
                if std::mem::take(&mut watchdog_kills[w as usize]) {
                    how_words = format!("stalled for {:?} and was killed", cfg.worker_timeout);
                } else if faulted || how == ExitKind::Exited(EXIT_BAD_SEGMENT) {
                    faults += 1;
                }
                let reason = ctl
                    .fault_reasons
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .rev()
                    .find(|(fw, _)| *fw == w)
                    .map(|(_, r)| r.clone());
                if let Some(r) = reason {
                    how_words = format!("{r}; {how_words}");
                }
                ctl.alive[w as usize].store(false, Ordering::Release);
                ctl.death_epoch[w as usize].fetch_add(1, Ordering::AcqRel);
                ctl.changes.fetch_add(1, Ordering::AcqRel);
                for p in 0..producers {
                    let ps = seg.producer(p);
                    Doorbell::new(&ps.bell).ring(&Futex);
                }
                exits.push(WorkerExit {
                    worker: w,
                    pid: wp.pid,
                    how: how_words,
                    noticed_ms: noticed.as_secs_f64() * 1e3,
                    reclaimed_tokens: 0,
                });
                pending_restart.push(w);
            }

            // Restart a dead worker once every producer has cleaned up after it.
            pending_restart.retain(|&w| {
                let epoch = ctl.death_epoch[w as usize].load(Ordering::Acquire);
                if (0..producers as usize)
                    .any(|p| ctl.acked[p][w as usize].load(Ordering::Acquire) != epoch)
                {
                    return true;
                }
                if let Some(e) = exits.iter_mut().rev().find(|e| e.worker == w) {
                    e.reclaimed_tokens = ctl.reclaimed[w as usize].swap(0, Ordering::Relaxed);
                }
                let all_idle = ctl.idle.iter().all(|i| i.load(Ordering::Acquire));
                if restarts >= cfg.max_restarts || all_idle {
                    if restarts >= cfg.max_restarts && interrupted.is_none() {
                        interrupted =
                            Some(format!("more than {} worker restarts", cfg.max_restarts));
                        ctl.stop.store(true, Ordering::Relaxed);
                    }
                    gone_for_good[w as usize] = true;
                    return false;
                }
                let ws = seg.worker(w);
                ws.bell.sleeping.store(0, Ordering::Relaxed);
                ws.status.heartbeat.store(0, Ordering::Relaxed);
                ws.status
                    .state
                    .store(WorkerState::Empty as u32, Ordering::Relaxed);
                // A producer may have flagged the dead process after it was reaped (while
                // draining its rings); that request must not kill the replacement.
                ctl.kill[w as usize].store(false, Ordering::Release);
                match spawn_worker(&exe, &seg, spec(w)) {
                    Ok(p) => {
                        restarts += 1;
                        procs[w as usize] = Some(p);
                        ctl.alive[w as usize].store(true, Ordering::Release);
                        ctl.changes.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(e) => {
                        interrupted.get_or_insert(format!("cannot restart worker {w}: {e}"));
                        gone_for_good[w as usize] = true;
                    }
                }
                false
            });
            if gone_for_good.iter().all(|&g| g) {
                ctl.stop.store(true, Ordering::Relaxed);
                ctl.no_workers.store(true, Ordering::Release);
                ctl.changes.fetch_add(1, Ordering::AcqRel);
            }

            // Kill requests from producers and the stall watchdog.
            let now = Instant::now();
            for (w, slot) in procs.iter_mut().enumerate() {
                let Some(wp) = slot else { continue };
                if ctl.kill[w].load(Ordering::Acquire) {
                    let _ = sys::kill_pidfd(wp.pidfd.as_fd());
                    continue;
                }
                let (owed, back) = flow_of(&ctl, w);
                if back != wp.progress || owed == 0 {
                    wp.progress = back;
                    wp.last_beat = now;
                } else if now - wp.last_beat > cfg.worker_timeout && !watchdog_kills[w] {
                    watchdog_kills[w] = true;
                    let _ = sys::kill_pidfd(wp.pidfd.as_fd());
                }
            }

            if let Some(sig) = hooks.stop_signal {
                let s = sig.load(Ordering::Relaxed);
                if s != 0 && !ctl.stop.load(Ordering::Relaxed) {
                    interrupted.get_or_insert(signal_name(s));
                    ctl.stop.store(true, Ordering::Relaxed);
                }
            }
            if let Some(progress) = hooks.progress {
                if last_progress.elapsed() >= Duration::from_millis(100) {
                    last_progress = Instant::now();
                    let matrices = ctl.done.iter().map(|d| d.0.load(Ordering::Relaxed)).sum();
                    progress(&Progress {
                        matrices,
                        elapsed: start.elapsed(),
                        stop: cfg.stop,
                    });
                }
            }
            // Producers return only once told to finish, so one that has ended panicked: stop
            // issuing, count it as idle (its counts are lost, and the report says the run is not
            // verified), and keep monitoring so the others can drain.
            let panicked = |p: usize| handles[p].is_finished();
            if (0..producers as usize).any(panicked) && interrupted.is_none() {
                interrupted = Some("a producer thread panicked".into());
                ctl.stop.store(true, Ordering::Relaxed);
            }
            if pending_restart.is_empty()
                && (0..producers as usize)
                    .all(|p| ctl.idle[p].load(Ordering::Acquire) || panicked(p))
            {
                break;
            }
        }
        ctl.finish.store(true, Ordering::Release);
        for p in 0..producers {
            let ps = seg.producer(p);
            Doorbell::new(&ps.bell).ring(&Futex);
        }
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });

    // Shut the workers down: ask, wake, wait, then insist.
    seg.shutdown_flag().store(1, Ordering::Release);
    for w in 0..workers {
        let ws = seg.worker(w);
        Doorbell::new(&ws.bell).ring(&Futex);
    }
    let grace = Instant::now() + SHUTDOWN_GRACE;
    while procs.iter().any(Option::is_some) {
        for slot in procs.iter_mut() {
            if let Some(wp) = slot {
                if let Ok(Some(_)) = sys::try_reap(wp.pidfd.as_fd()) {
                    *slot = None;
                } else if Instant::now() > grace {
                    let _ = sys::kill_pidfd(wp.pidfd.as_fd());
                }
            }
        }
        let fds: Vec<BorrowedFd<'_>> = procs.iter().flatten().map(|p| p.pidfd.as_fd()).collect();
        if !fds.is_empty() {
            let _ = sys::poll_readable(&fds, Duration::from_millis(10));
        }
    }

    Ok(build_report(
        cfg,
        &plan,
        kernels,
        pinned,
        &seg,
        stats,
        exits,
        restarts,
        faults,
        interrupted,
    ))
}

fn signal_name(sig: usize) -> String {
    match sig {
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        s => format!("signal {s}"),
    }
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    cfg: &Config,
    plan: &Plan,
    kernels: Kernels,
    pinned: bool,
    seg: &Segment,
    stats: Vec<ProducerStats>,
    exits: Vec<WorkerExit>,
    restarts: u32,
    faults: u32,
    interrupted: Option<String>,
) -> Report {
    let mut latency =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds");
    let mut per_worker = vec![0u64; cfg.workers as usize];
    let (mut matrices, mut failed, mut lost, mut redone, mut tokens, mut bytes) =
        (0, 0, 0, 0, 0, 0);
    let mut failures = Vec::new();
    let complete = stats.len() == cfg.producers as usize;
    let mut first: Option<Ticks> = None;
    let mut last: Option<Ticks> = None;
    for s in stats {
        matrices += s.matrices;
        failed += s.failed;
        lost += s.lost;
        redone += s.redone;
        tokens += s.tokens;
        bytes += s.bytes;
        for (a, b) in per_worker.iter_mut().zip(&s.per_worker) {
            *a += b;
        }
        let _ = latency.add(&s.latency);
        failures.extend(s.failures);
        first = match (first, s.first_issue) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        last = match (last, s.last_return) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    failures.truncate(KEEP_FAILURES);
    let seconds = match (first, last) {
        (Some(a), Some(b)) => clock::nanos_between(a, b) as f64 / 1e9,
        _ => 0.0,
    };
    let rate = |x: f64| if seconds > 0.0 { x / seconds } else { 0.0 };
    Report {
        system: "mk1",
        matrices,
        // A producer that panicked took its counts with it: such a run is never verified.
        verified: matrices > 0 && failed == 0 && lost == 0 && complete,
        failed,
        lost,
        redone,
        seconds,
        matrices_per_s: rate(matrices as f64),
        gb_per_s: rate(bytes as f64) / 1e9,
        workers: cfg.workers,
        producers: cfg.producers,
        min_dim: cfg.min_dim,
        max_dim: cfg.max_dim,
        op: cfg.op.to_string(),
        dispatch: cfg.dispatch.name(),
        inflight: cfg.inflight,
        batch: plan.batch_cap,
        tokens,
        matrices_per_token: if tokens > 0 {
            matrices as f64 / tokens as f64
        } else {
            0.0
        },
        kernel: kernels.kernel().name(),
        pinned,
        segment_bytes: seg.len() as u64,
        per_worker,
        worker_restarts: restarts,
        worker_faults: faults,
        latency_ns: Latency {
            p50: latency.value_at_quantile(0.5),
            p99: latency.value_at_quantile(0.99),
            max: latency.max(),
        },
        failures,
        worker_exits: exits,
        interrupted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_clock_moves_forward() {
        let a = clock::now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(clock::now() > a);
    }
}
