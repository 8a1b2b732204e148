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
use crate::report::{Failure, Latency, Report, Unreaped, WorkerExit};
use crate::ring::{RingConsumer, RingProducer};
use crate::shm::{Segment, ShmCreateError};
use crate::sync::{AtomicU64, Ordering};
use crate::sys::{self, ChildProcess, ExitKind};
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
/// A worker sent SIGKILL that still has it pending after this long is stuck in the kernel; its
/// tokens are reclaimed without waiting for it to exit.
const KILL_GRACE: Duration = Duration::from_millis(200);
/// How long shutdown waits for killed workers before naming them and returning.
const KILL_WAIT: Duration = Duration::from_secs(1);
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
    /// The run does not fit under a limit of this process (memory, address space, tasks, files).
    #[error(transparent)]
    Limit(#[from] crate::limits::LimitError),
    /// Something the run needs could not be had after workers started (a thread, say); they
    /// were stopped and reaped before this was returned.
    #[error("{what}: {why}")]
    Resource {
        /// What could not be had.
        what: String,
        /// The system's answer.
        why: String,
    },
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
    /// `abandoned[w]`: worker `w` could not be killed; producers give up its tokens as lost
    /// (the run has stopped issuing, so their slots are never reused).
    abandoned: Vec<AtomicBool>,
    /// `idle[p]`: producer `p` stopped issuing and has every token home.
    idle: Vec<AtomicBool>,
    /// Matrices verified by producer `p` (progress only), one line each.
    done: Vec<Padded<AtomicU64>>,
    /// `flow[p][w]`: tokens producer `p` has sent to worker `w` and has had back (returned or
    /// reclaimed). Process-local, written only by producer `p`, so the watchdog's notion of
    /// "owes tokens and makes no progress" cannot be faked by a worker.
    flow: Vec<Box<[Flow]>>,
}

impl Control {
    fn new(workers: u32, producers: u32) -> Control {
        let per_worker = || {
            (0..workers)
                .map(|_| AtomicBool::new(false))
                .collect::<Vec<_>>()
        };
        Control {
            stop: AtomicBool::new(false),
            finish: AtomicBool::new(false),
            alive: (0..workers).map(|_| AtomicBool::new(true)).collect(),
            changes: AtomicUsize::new(0),
            death_epoch: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            acked: (0..producers)
                .map(|_| (0..workers).map(|_| AtomicUsize::new(0)).collect())
                .collect(),
            reclaimed: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            kill: per_worker(),
            fault_reasons: Mutex::new(Vec::with_capacity(16)),
            no_workers: AtomicBool::new(false),
            abandoned: per_worker(),
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
        }
    }
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
    /// `gave_up[w]`: the tokens out at abandoned worker `w` were counted lost.
    gave_up: Vec<bool>,
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
        spin: SpinMode,
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
            shapes: Shapes::new(
                cfg.seed ^ (u64::from(p) << 32) ^ 0x5eed,
                cfg.min_dim,
                cfg.max_dim,
            ),
            policy: dispatch::policy(cfg.dispatch, cfg.seed.wrapping_add(u64::from(p))),
            next_seq: u64::from(p) << 48,
            budget,
            deadline: None,
            issuing: budget != Some(0),
            spin,
            gave_up: vec![false; w],
            redo: Vec::with_capacity(plan.layout.slots() as usize),
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

    /// Starts the clock of a duration run at `start` (called on the producer's own thread, once
    /// every worker has attached).
    fn arm(&mut self, stop: Stop, start: Instant) {
        if let Stop::After(d) = stop {
            let left = d.saturating_sub(start.elapsed()).as_nanos() as f64;
            self.deadline = Some(clock::now().saturating_add((left / clock::ns_per_tick()) as u64));
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
            if self.ctl.abandoned[w].load(Ordering::Acquire) && !self.gave_up[w] {
                // A worker that could not be killed may still write its slots: what it holds is
                // lost. The monitor stopped the run first, so no slot is reused after this.
                self.gave_up[w] = true;
                self.issuing = false;
                let back = self.pool.reclaim(w as u32);
                self.note_back(w, back.len() as u64);
                for t in back {
                    self.stats.lost += u64::from(self.pool.record(&t).desc.count);
                    self.pool.put(t);
                }
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
    child: ChildProcess,
    /// Tokens back from this worker slot at the last change (from `flow_of`).
    progress: u64,
    /// When `progress` last changed (or the worker owed nothing).
    last_beat: Instant,
    /// When it was started.
    started: Instant,
    /// It reported `Running` with our build id.
    attached: bool,
    /// When SIGKILL was sent, and why (words for the report).
    killed: Option<(Instant, KillReason)>,
}

/// Why the monitor killed a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KillReason {
    /// It held tokens and made no progress for `worker_timeout`.
    Stalled,
    /// A producer caught it breaking the protocol.
    Fault,
    /// It did not start properly (wrong build, no attach in time).
    Start(String),
}

/// How the program to re-execute as a worker is named.
enum WorkerImage {
    /// The running program, held open: restarts run this very build, whatever happens to its
    /// path since.
    Running(OwnedFd),
    /// A program the caller named ([`Config::worker_exe`]), or the path of the current one where
    /// `/proc/self/exe` cannot be opened.
    Path(std::path::PathBuf),
}

impl WorkerImage {
    fn new(cfg: &Config) -> Result<WorkerImage, RunError> {
        if let Some(p) = &cfg.worker_exe {
            return Ok(WorkerImage::Path(p.clone()));
        }
        match sys::open_running_image() {
            Ok(fd) => Ok(WorkerImage::Running(fd)),
            Err(_) => {
                std::env::current_exe()
                    .map(WorkerImage::Path)
                    .map_err(|e| RunError::WorkerStart {
                        worker: 0,
                        exe: "current executable".into(),
                        why: e.to_string(),
                    })
            }
        }
    }

    fn path(&self) -> std::path::PathBuf {
        match self {
            WorkerImage::Running(fd) => sys::fd_path(fd.as_fd()),
            WorkerImage::Path(p) => p.clone(),
        }
    }

    /// For messages: what the user knows the program as.
    fn describe(&self) -> String {
        match self {
            WorkerImage::Running(_) => std::env::current_exe()
                .map_or_else(|_| "this program".into(), |p| p.display().to_string()),
            WorkerImage::Path(p) => p.display().to_string(),
        }
    }
}

fn spawn_worker(
    image: &WorkerImage,
    seg: &Segment,
    spec: WorkerSpec,
) -> std::io::Result<WorkerProc> {
    let child = ChildProcess::spawn(
        &image.path(),
        WORKER_ENV,
        &spec.encode(),
        &[seg.fd().as_raw_fd()],
    )?;
    let now = Instant::now();
    Ok(WorkerProc {
        child,
        progress: 0,
        last_beat: now,
        started: now,
        attached: false,
        killed: None,
    })
}

/// Whether the worker in slot `w` has attached; `Err` says why it is not acceptable (another
/// build answered the handshake).
fn attach_state(seg: &Segment, w: u32) -> Result<bool, String> {
    let status = &seg.worker(w).status;
    if status.state.load(Ordering::Acquire) != WorkerState::Running as u32 {
        return Ok(false);
    }
    let theirs = status.build.load(Ordering::Relaxed);
    if theirs != crate::worker::BUILD_ID {
        return Err(format!(
            "it is not the same build as this coordinator (build {theirs:016x}, expected {:016x})",
            crate::worker::BUILD_ID
        ));
    }
    Ok(true)
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

/// Kills every worker and waits (bounded) for each; used when a run is abandoned at start.
fn abandon(procs: &mut [Option<WorkerProc>]) {
    for wp in procs.iter_mut().flatten() {
        wp.child.kill_and_reap(KILL_WAIT);
    }
}

/// What the monitor knows and decides: every worker process, deaths, restarts, the watchdog.
struct Monitor<'a> {
    cfg: &'a Config,
    seg: &'a Segment,
    ctl: &'a Control,
    image: &'a WorkerImage,
    spec: &'a dyn Fn(u32) -> WorkerSpec,
    start: Instant,
    procs: Vec<Option<WorkerProc>>,
    /// Processes sent SIGKILL that have not exited yet but can run no code of their own (see
    /// [`KILL_GRACE`]); their tokens are already reclaimed. Reaped when the kernel lets them go.
    undying: Vec<(u32, ChildProcess)>,
    exits: Vec<WorkerExit>,
    restarts: u32,
    faults: u32,
    interrupted: Option<String>,
    signal: Option<i32>,
    pending_restart: Vec<u32>,
    gone_for_good: Vec<bool>,
    /// Set when slot `w`'s last start failed: it is not tried again.
    start_failed: Vec<Option<String>>,
}

impl Monitor<'_> {
    fn stop_with(&mut self, why: String) {
        self.interrupted.get_or_insert(why);
        self.ctl.stop.store(true, Ordering::Relaxed);
    }

    /// Worker `w` is gone (or can never run again): tell the producers, record how, and queue
    /// its restart. `wp` is its process record, already reaped or moved to `undying`.
    fn declare_dead(
        &mut self,
        w: u32,
        pid: u32,
        mut how_words: String,
        killed: Option<KillReason>,
        how: Option<ExitKind>,
    ) {
        let ctl = self.ctl;
        let faulted = ctl.kill[w as usize].swap(false, Ordering::AcqRel);
        match &killed {
            Some(KillReason::Stalled) => {
                how_words = format!(
                    "stalled for {:?} and was killed; {how_words}",
                    self.cfg.worker_timeout
                );
            }
            Some(KillReason::Start(why)) => {
                self.start_failed[w as usize] = Some(why.clone());
            }
            Some(KillReason::Fault) => self.faults += 1,
            None if faulted || how == Some(ExitKind::Exited(EXIT_BAD_SEGMENT)) => self.faults += 1,
            None => {}
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
        for p in 0..self.seg.layout().params().producers {
            Doorbell::new(&self.seg.producer(p).bell).ring(&Futex);
        }
        self.exits.push(WorkerExit {
            worker: w,
            pid,
            how: how_words,
            noticed_ms: self.start.elapsed().as_secs_f64() * 1e3,
            reclaimed_tokens: 0,
        });
        self.pending_restart.push(w);
    }

    /// Reaps the workers whose exit fds are readable.
    fn reap_exited(&mut self, ready: &[u32]) {
        for &w in ready {
            let Some(mut wp) = self.procs[w as usize].take() else {
                continue;
            };
            let how = match wp.child.try_reap() {
                Ok(Some(k)) => k,
                // Readable but not reapable yet: look again next tick.
                _ => {
                    self.procs[w as usize] = Some(wp);
                    continue;
                }
            };
            let killed = wp.killed.map(|(_, r)| r);
            // Exiting with a status before attaching is a start failure (another program, a
            // different build, a refused syscall); a signal from outside is an ordinary death.
            // (It may have attached and left between two looks: the segment remembers.)
            let status = &self.seg.worker(w).status;
            let attached = wp.attached
                || (status.state.load(Ordering::Acquire) != WorkerState::Empty as u32
                    && status.build.load(Ordering::Relaxed) == crate::worker::BUILD_ID);
            if !attached && killed.is_none() && matches!(how, ExitKind::Exited(_)) {
                self.start_failed[w as usize] =
                    Some(format!("it {how} before attaching to shared memory"));
            }
            self.declare_dead(w, wp.child.pid(), how.to_string(), killed, Some(how));
        }
        self.undying
            .retain_mut(|(_, c)| !matches!(c.try_reap(), Ok(Some(_))));
    }

    /// Sends SIGKILL to worker `w` once, remembering why. A kill the kernel refuses on both
    /// ways (pidfd and pid) stops the run: the worker may still be writing its slots, so its
    /// tokens are given up as lost rather than reused.
    fn kill(&mut self, w: usize, why: KillReason) {
        let Some(wp) = self.procs[w].as_mut() else {
            return;
        };
        if wp.killed.is_some() {
            return;
        }
        match wp.child.kill() {
            Ok(()) => wp.killed = Some((Instant::now(), why)),
            Err(e) => {
                let pid = wp.child.pid();
                wp.killed = Some((Instant::now(), why));
                self.stop_with(format!("cannot kill worker {w} (pid {pid}): {e}"));
                self.ctl.abandoned[w].store(true, Ordering::Release);
                self.ctl.alive[w].store(false, Ordering::Release);
                self.ctl.changes.fetch_add(1, Ordering::AcqRel);
                self.gone_for_good[w] = true;
            }
        }
    }

    /// A worker sent SIGKILL that is still there after [`KILL_GRACE`] is stuck in the kernel
    /// (a frozen cgroup, hung NFS or FUSE). With SIGKILL pending it will never run another
    /// instruction of its own, so its tokens can be taken back now and redone elsewhere; the
    /// process is kept to be reaped when the kernel releases it.
    fn give_up_on_stuck(&mut self) {
        for w in 0..self.procs.len() {
            let Some(wp) = &self.procs[w] else { continue };
            let Some((at, _)) = &wp.killed else { continue };
            if at.elapsed() < KILL_GRACE || self.ctl.abandoned[w].load(Ordering::Acquire) {
                continue;
            }
            let pid = wp.child.pid();
            if !sys::kill_pending(pid) {
                // Either it is exiting right now (the next poll reaps it) or the signal was
                // lost: send it again.
                let _ = wp.child.kill();
                continue;
            }
            let wp = self.procs[w].take().expect("checked above");
            let state = sys::process_state(pid).unwrap_or('?');
            let killed = wp.killed.map(|(_, r)| r);
            self.undying.push((w as u32, wp.child));
            self.declare_dead(
                w as u32,
                pid,
                format!(
                    "did not exit within {KILL_GRACE:?} of SIGKILL (state {state}: stuck in the \
                     kernel); its tokens were reclaimed without waiting"
                ),
                killed,
                None,
            );
        }
    }

    /// Starts replacements for dead workers once every producer has cleaned up after them.
    fn restart_dead(&mut self) {
        let producers = self.seg.layout().params().producers as usize;
        let pending = std::mem::take(&mut self.pending_restart);
        for w in pending {
            let ctl = self.ctl;
            let epoch = ctl.death_epoch[w as usize].load(Ordering::Acquire);
            if (0..producers).any(|p| ctl.acked[p][w as usize].load(Ordering::Acquire) != epoch) {
                self.pending_restart.push(w);
                continue;
            }
            if let Some(e) = self.exits.iter_mut().rev().find(|e| e.worker == w) {
                e.reclaimed_tokens = ctl.reclaimed[w as usize].swap(0, Ordering::Relaxed);
            }
            let all_idle = ctl.idle.iter().all(|i| i.load(Ordering::Acquire));
            if let Some(why) = self.start_failed[w as usize].clone() {
                // Refused once: a program that cannot serve would only fail again.
                self.stop_with(format!(
                    "cannot restart worker {w} ({}): {why}",
                    self.image.describe()
                ));
                self.gone_for_good[w as usize] = true;
                continue;
            }
            if self.restarts >= self.cfg.max_restarts || all_idle {
                if self.restarts >= self.cfg.max_restarts {
                    self.stop_with(format!(
                        "more than {} worker restarts",
                        self.cfg.max_restarts
                    ));
                }
                self.gone_for_good[w as usize] = true;
                continue;
            }
            let ws = self.seg.worker(w);
            ws.bell.sleeping.store(0, Ordering::Relaxed);
            ws.status.heartbeat.store(0, Ordering::Relaxed);
            ws.status.build.store(0, Ordering::Relaxed);
            ws.status
                .state
                .store(WorkerState::Empty as u32, Ordering::Relaxed);
            // A producer may have flagged the dead process after it was reaped (while
            // draining its rings); that request must not kill the replacement.
            ctl.kill[w as usize].store(false, Ordering::Release);
            match spawn_worker(self.image, self.seg, (self.spec)(w)) {
                Ok(p) => {
                    self.restarts += 1;
                    self.procs[w as usize] = Some(p);
                    ctl.alive[w as usize].store(true, Ordering::Release);
                    ctl.changes.fetch_add(1, Ordering::AcqRel);
                }
                Err(e) => {
                    self.stop_with(format!(
                        "cannot restart worker {w} ({}): {e}",
                        self.image.describe()
                    ));
                    self.gone_for_good[w as usize] = true;
                }
            }
        }
        if self.gone_for_good.iter().all(|&g| g) {
            self.ctl.stop.store(true, Ordering::Relaxed);
            self.ctl.no_workers.store(true, Ordering::Release);
            self.ctl.changes.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Handshakes, kill requests from producers, and the stall watchdog.
    fn watch(&mut self) {
        let now = Instant::now();
        for w in 0..self.procs.len() {
            let (seg, ctl, timeout) = (self.seg, self.ctl, self.cfg.worker_timeout);
            let Some(wp) = &mut self.procs[w] else {
                continue;
            };
            if wp.killed.is_some() {
                continue;
            }
            let mut action = None;
            if !wp.attached {
                match attach_state(seg, w as u32) {
                    Ok(true) => wp.attached = true,
                    Ok(false) if now - wp.started > START_TIMEOUT => {
                        action = Some(KillReason::Start(format!(
                            "it did not attach within {START_TIMEOUT:?}"
                        )));
                    }
                    Ok(false) => {}
                    Err(why) => action = Some(KillReason::Start(why)),
                }
            }
            if action.is_none() && ctl.kill[w].load(Ordering::Acquire) {
                action = Some(KillReason::Fault);
            }
            if action.is_none() {
                let (owed, back) = flow_of(ctl, w);
                if back != wp.progress || owed == 0 {
                    wp.progress = back;
                    wp.last_beat = now;
                } else if now - wp.last_beat > timeout {
                    action = Some(KillReason::Stalled);
                }
            }
            if let Some(why) = action {
                self.kill(w, why);
            }
        }
    }

    /// Asks every worker to leave, waits [`SHUTDOWN_GRACE`], kills the rest, and waits
    /// [`KILL_WAIT`] more. Whatever is still there then is stuck in the kernel: it is named in
    /// the report rather than waited for.
    fn shut_down(&mut self) -> Vec<Unreaped> {
        self.seg.shutdown_flag().store(1, Ordering::Release);
        for w in 0..self.procs.len() as u32 {
            Doorbell::new(&self.seg.worker(w).bell).ring(&Futex);
        }
        let grace = Instant::now() + SHUTDOWN_GRACE;
        let mut killed_at: Option<Instant> = None;
        loop {
            for slot in self.procs.iter_mut() {
                if let Some(wp) = slot {
                    if let Ok(Some(_)) = wp.child.try_reap() {
                        *slot = None;
                    }
                }
            }
            self.undying
                .retain_mut(|(_, c)| !matches!(c.try_reap(), Ok(Some(_))));
            // Stuck workers already have SIGKILL pending and their tokens back: once the live
            // ones are gone there is nothing left to wait for.
            if self.procs.iter().all(Option::is_none) {
                break;
            }
            let now = Instant::now();
            if now > grace && killed_at.is_none() {
                killed_at = Some(now);
                for wp in self.procs.iter().flatten() {
                    let _ = wp.child.kill();
                }
            }
            if killed_at.is_some_and(|t| now - t > KILL_WAIT) {
                break;
            }
            let fds: Vec<BorrowedFd<'_>> = self
                .procs
                .iter()
                .flatten()
                .map(|p| p.child.exit_fd())
                .chain(self.undying.iter().map(|(_, c)| c.exit_fd()))
                .collect();
            let _ = sys::poll_readable(&fds, Duration::from_millis(10));
        }
        let mut left: Vec<Unreaped> = self
            .procs
            .iter()
            .enumerate()
            .filter_map(|(w, p)| p.as_ref().map(|p| (w as u32, p.child.pid())))
            .chain(self.undying.iter().map(|(w, c)| (*w, c.pid())))
            .map(|(worker, pid)| Unreaped {
                worker,
                pid,
                state: sys::process_state(pid),
            })
            .collect();
        left.sort_by_key(|u| u.worker);
        left
    }
}

/// Runs the pipeline described by `cfg`: set up, run to the stop condition, drain, shut down,
/// report. Errors are only for runs that could not start (every worker already started is then
/// killed and reaped); a run that started always returns a [`Report`] (check `verified`).
pub fn run(cfg: &Config, hooks: &Hooks<'_>) -> Result<Report, RunError> {
    let plan = cfg.plan()?;
    // Calibrate the tick clock now (it sleeps ~20 ms once), not at the first returned token.
    clock::ns_per_tick();
    let kernels = Kernels::new(cfg.kernel).map_err(|e| ConfigError {
        what: "--kernel",
        why: e.to_string(),
    })?;
    let workers = cfg.workers;
    let producers = cfg.producers;
    crate::limits::check(&crate::limits::Needs {
        segment: plan.layout.total_bytes(),
        workers,
        producers,
    })?;
    let seg = Segment::create(plan.layout)?;
    let cpus = sys::online_cpus();
    // Placement comes from this process's affinity mask (taskset, cpusets), never absolute CPU
    // numbers: pin only when every producer and worker gets a CPU of that mask to itself.
    let allowed = sys::allowed_cpus();
    let busy = (workers + producers) as usize;
    let pinned = cfg.pin == Pin::Auto && busy <= allowed.len() && busy <= cpus;
    let image = WorkerImage::new(cfg)?;
    let coordinator = sys::own_pid();
    let spin = match cfg.wait {
        Wait::Sleep => SpinMode::Never,
        Wait::Auto if busy <= cpus => SpinMode::Long,
        Wait::Auto => SpinMode::Short,
    };
    let spec = |w: u32| WorkerSpec {
        fd: seg.fd().as_raw_fd(),
        index: w,
        coordinator,
        kernel: cfg.kernel,
        cpu: pinned.then(|| allowed[(producers + w) as usize]),
        spin,
    };

    // Everything the producers need is allocated before the first worker starts, so running out
    // of memory is a start-up error, not an abort with workers running.
    let ctl = Control::new(workers, producers);
    let mut ready: Vec<Option<Producer<'_>>> = (0..producers)
        .map(|p| Some(Producer::new(p, &seg, &ctl, cfg, &plan, kernels, spin)))
        .collect();

    // Start every worker and wait until each has attached, so a program that cannot serve as a
    // worker is a clear start-up error rather than a storm of restarts.
    let mut procs: Vec<Option<WorkerProc>> = Vec::with_capacity(workers as usize);
    let start_err = |w: u32, why: String| RunError::WorkerStart {
        worker: w,
        exe: image.describe(),
        why,
    };
    for w in 0..workers {
        match spawn_worker(&image, &seg, spec(w)) {
            Ok(p) => procs.push(Some(p)),
            Err(e) => {
                abandon(&mut procs);
                return Err(start_err(w, e.to_string()));
            }
        }
    }
    let deadline = Instant::now() + START_TIMEOUT;
    for w in 0..workers {
        loop {
            let state = attach_state(&seg, w);
            if state == Ok(true) {
                break;
            }
            let wp = procs[w as usize].as_mut().expect("just spawned");
            let status = wp.child.try_reap().ok().flatten();
            if status.is_some() || state.is_err() || Instant::now() > deadline {
                let why = match (status, state) {
                    (Some(s), _) => format!(
                        "it {s} before attaching to shared memory; a program used as the worker must call \
                         mk1::run_if_worker() first thing in main"
                    ),
                    (None, Err(why)) => why,
                    (None, _) => format!("it did not attach within {START_TIMEOUT:?}"),
                };
                abandon(&mut procs);
                return Err(start_err(w, why));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(wp) = procs[w as usize].as_mut() {
            wp.attached = true;
        }
    }

    let start = Instant::now();
    let mut monitor = Monitor {
        cfg,
        seg: &seg,
        ctl: &ctl,
        image: &image,
        spec: &spec,
        start,
        procs,
        undying: Vec::new(),
        exits: Vec::new(),
        restarts: 0,
        faults: 0,
        interrupted: None,
        signal: None,
        pending_restart: Vec::new(),
        gone_for_good: vec![false; workers as usize],
        start_failed: vec![None; workers as usize],
    };

    let mut thread_error: Option<(usize, std::io::Error)> = None;
    let chaos_thread = std::env::var("MK1_CHAOS_THREAD")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let stats: Vec<ProducerStats> = std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(producers as usize);
        for (p, slot) in ready.iter_mut().enumerate() {
            let mut producer = slot.take().expect("each producer is started once");
            let cpu = pinned.then(|| allowed[p]);
            // Fault injection for the tests: `MK1_CHAOS_THREAD=P` makes starting producer P fail
            // as the kernel would at a thread limit (EAGAIN), with workers already running.
            if chaos_thread == Some(p) {
                thread_error = Some((p, std::io::Error::from_raw_os_error(11)));
                break;
            }
            let spawned = std::thread::Builder::new()
                .name(format!("mk1-producer-{p}"))
                .spawn_scoped(scope, move || {
                    if let Some(cpu) = cpu {
                        let _ = sys::pin_to_cpu(cpu);
                    }
                    producer.arm(cfg.stop, start);
                    producer.run()
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // Abandon: the producers already running drain what they sent and return;
                    // the workers are stopped below and the run is refused.
                    thread_error = Some((p, e));
                    break;
                }
            }
        }
        if thread_error.is_some() {
            ctl.stop.store(true, Ordering::Relaxed);
            ctl.finish.store(true, Ordering::Release);
            for p in 0..producers {
                Doorbell::new(&seg.producer(p).bell).ring(&Futex);
            }
            return handles.into_iter().filter_map(|h| h.join().ok()).collect();
        }
        let started = handles.len();

        // The monitor. It runs on the thread that spawned the workers, which lives until they
        // are reaped: their parent-death signal is tied to this thread.
        let mut last_progress = Instant::now();
        loop {
            let live: Vec<u32> = (0..workers)
                .filter(|&w| monitor.procs[w as usize].is_some())
                .collect();
            let fds: Vec<BorrowedFd<'_>> = live
                .iter()
                .map(|&w| {
                    monitor.procs[w as usize]
                        .as_ref()
                        .expect("live")
                        .child
                        .exit_fd()
                })
                .chain(monitor.undying.iter().map(|(_, c)| c.exit_fd()))
                .collect();
            // While a restart waits for the producers' acknowledgements, or a killed worker for
            // its death, look again soon.
            let busy = !monitor.pending_restart.is_empty()
                || monitor.procs.iter().flatten().any(|p| p.killed.is_some());
            let tick = if busy {
                Duration::from_millis(1)
            } else {
                MONITOR_TICK
            };
            let ready_idx = sys::poll_readable(&fds, tick).unwrap_or_default();
            drop(fds);
            let ready: Vec<u32> = ready_idx
                .iter()
                .filter_map(|&i| live.get(i).copied())
                .collect();
            monitor.reap_exited(&ready);
            monitor.give_up_on_stuck();
            monitor.restart_dead();
            monitor.watch();

            if let Some(sig) = hooks.stop_signal {
                let s = sig.load(Ordering::Relaxed);
                if s != 0 && !ctl.stop.load(Ordering::Relaxed) {
                    if monitor.interrupted.is_none() {
                        monitor.signal = Some(s as i32);
                    }
                    monitor.stop_with(signal_name(s));
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
            if (0..started).any(panicked) {
                monitor.stop_with("a producer thread panicked".into());
            }
            if monitor.pending_restart.is_empty()
                && (0..started).all(|p| ctl.idle[p].load(Ordering::Acquire) || panicked(p))
            {
                break;
            }
        }
        ctl.finish.store(true, Ordering::Release);
        for p in 0..producers {
            Doorbell::new(&seg.producer(p).bell).ring(&Futex);
        }
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });

    let unreaped = monitor.shut_down();
    if let Some((p, e)) = thread_error {
        return Err(RunError::Resource {
            what: format!("cannot start producer thread {p}"),
            why: e.to_string(),
        });
    }
    let Monitor {
        exits,
        restarts,
        faults,
        interrupted,
        signal,
        ..
    } = monitor;
    let mut report = build_report(
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
    );
    report.signal = signal;
    report.unreaped = unreaped;
    Ok(report)
}

fn signal_name(sig: usize) -> String {
    match sig {
        1 => "SIGHUP".into(),
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
        signal: None,
        unreaped: Vec::new(),
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
