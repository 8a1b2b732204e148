//! The producer threads: fill, dispatch, verify, recycle; and their part in a worker's death
//! (drain what it returned, reclaim the rest, reset their rings, acknowledge).

use std::time::Instant;

use hdrhistogram::Histogram;

use crate::clock::{self, Ticks};
use crate::config::{matrix_bytes, Config, Plan, Stop};
use crate::dispatch::{self, Dispatch, WorkerView};
use crate::job::{fill_base, Shapes};
use crate::layout::{Direction, MatrixDesc, SlotDesc, MAX_BATCH};
use crate::ops::{Kernels, Op};
use crate::pool::{SlotPool, Token};
use crate::report::Failure;
use crate::ring::{RingConsumer, RingProducer};
use crate::shm::Segment;
use crate::sync::Ordering;
use crate::sys;
use crate::wait::{Backoff, Doorbell, Futex, SpinMode, Step, SAME_CPU_YIELDS};

use super::{Control, KEEP_FAILURES, PRODUCER_SLEEP};

/// What one producer thread counted.
pub(super) struct ProducerStats {
    pub(super) matrices: u64,
    pub(super) failed: u64,
    pub(super) lost: u64,
    pub(super) redone: u64,
    pub(super) tokens: u64,
    pub(super) bytes: u64,
    pub(super) per_worker: Vec<u64>,
    pub(super) latency: Histogram<u64>,
    pub(super) failures: Vec<Failure>,
    pub(super) first_issue: Option<Ticks>,
    pub(super) last_return: Option<Ticks>,
}

/// Producer `p`'s ends of its two rings with worker `w`, both counters zeroed. Only while no
/// worker process serves `w` with tokens from them: at start, or after `w` died.
pub(super) fn zeroed_ring_pair(
    seg: &Segment,
    p: u32,
    w: u32,
) -> (RingProducer<'_>, RingConsumer<'_>) {
    let (c, e) = seg.ring(p, w, Direction::ToWorker);
    let to = RingProducer::reset(c, e);
    let (c, e) = seg.ring(p, w, Direction::FromWorker);
    (to, RingConsumer::after_reset(c, e))
}

/// Writes the fill of every matrix in `desc`, then the descriptor, into the token's slot.
pub(super) fn write_slot(
    seg: &Segment,
    kernels: Kernels,
    seed: u64,
    desc: &SlotDesc,
    token: &mut Token,
) {
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
pub(super) fn account(
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
pub(super) fn returned(s: &mut ProducerStats, w: u32, count: u32, sent_at: Ticks, now: Ticks) {
    s.matrices += u64::from(count);
    s.per_worker[w as usize] += u64::from(count);
    s.tokens += 1;
    s.latency
        .saturating_record(clock::nanos_between(sent_at, now));
    s.last_return = Some(now);
}

/// One producer thread.
pub(super) struct Producer<'s> {
    pub(super) p: u32,
    pub(super) seg: &'s Segment,
    pub(super) ctl: &'s Control,
    pub(super) kernels: Kernels,
    pub(super) op: Op,
    pub(super) seed: u64,
    pub(super) batch_cap: u32,
    pub(super) out_limit: u32,
    /// Slot bytes of each class, smallest first.
    pub(super) class_bytes: Vec<u64>,
    pub(super) pool: SlotPool,
    pub(super) to: Vec<RingProducer<'s>>,
    pub(super) from: Vec<RingConsumer<'s>>,
    pub(super) bells: Vec<Doorbell<'s>>,
    pub(super) touched: Vec<bool>,
    pub(super) usable: Vec<bool>,
    pub(super) faulted: Vec<bool>,
    pub(super) seen_epoch: Vec<usize>,
    pub(super) seen_changes: usize,
    pub(super) redo: Vec<Token>,
    pub(super) shapes: Shapes,
    pub(super) policy: Box<dyn Dispatch>,
    pub(super) next_seq: u64,
    /// Matrices still to issue in count mode.
    pub(super) budget: Option<u64>,
    /// End of issuing, in clock ticks.
    pub(super) deadline: Option<Ticks>,
    pub(super) issuing: bool,
    /// How long to spin before sleeping.
    pub(super) spin: SpinMode,
    /// `gave_up[w]`: the tokens out at abandoned worker `w` were counted lost.
    pub(super) gave_up: Vec<bool>,
    /// Local copies of this producer's `Control::flow` counters.
    pub(super) sent: Vec<u64>,
    pub(super) back: Vec<u64>,
    /// Last value stored into `Control::done`.
    pub(super) done_published: u64,
    pub(super) stats: ProducerStats,
}

impl<'s> Producer<'s> {
    pub(super) fn new(
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
    pub(super) fn arm(&mut self, stop: Stop, start: Instant) {
        if let Stop::After(d) = stop {
            let left = d.saturating_sub(start.elapsed()).as_nanos() as f64;
            self.deadline = Some(clock::now().saturating_add((left / clock::ns_per_tick()) as u64));
        }
    }

    /// Checks every matrix of a returned token and puts the slot back in the pool.
    pub(super) fn verify(&mut self, mut token: Token, w: u32, now: Ticks) {
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
    pub(super) fn refill_in_place(
        &mut self,
        mut token: Token,
        w: u32,
        now: Ticks,
    ) -> Result<Token, Token> {
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
    pub(super) fn fill_new(&mut self) -> Option<Token> {
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
    pub(super) fn fault(&mut self, w: usize, why: String) {
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
    pub(super) fn collect(&mut self, w: usize, after_death: bool) -> bool {
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
    pub(super) fn clean_up_after(&mut self, w: usize) {
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
    pub(super) fn follow_monitor(&mut self) {
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
    pub(super) fn issue_one(&mut self) -> bool {
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
    pub(super) fn send(&mut self, token: Token, now: Ticks) -> bool {
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
    pub(super) fn note_back(&mut self, w: usize, n: u64) {
        self.back[w] += n;
        self.ctl.flow[self.p as usize][w]
            .back
            .store(self.back[w], Ordering::Relaxed);
    }

    pub(super) fn send_to(&mut self, token: Token, w: u32, now: Ticks) {
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

    pub(super) fn run(mut self) -> ProducerStats {
        let workers = self.usable.len();
        let mut backoff = Backoff::for_mode(self.spin);
        let me = self.seg.producer(self.p);
        let my_bell = Doorbell::new(&me.bell);
        let mut same_cpu_yields = 0u32;
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
                same_cpu_yields = 0;
            } else if backoff.step() == Step::Sleep {
                // A worker that last waited on this CPU shares our run queue: yield to it.
                let cpu = sys::current_cpu() as u32 + 1;
                me.bell.cpu.store(cpu, Ordering::Relaxed);
                // (Only to a partner that is not asleep on its futex: it must be runnable to
                // take the CPU; and never when told to sleep at once.)
                if same_cpu_yields < SAME_CPU_YIELDS
                    && self.spin != SpinMode::Never
                    && (0..workers).any(|w| {
                        let bell = &self.seg.worker(w as u32).bell;
                        self.usable[w]
                            && bell.cpu.load(Ordering::Relaxed) == cpu
                            && bell.sleeping.load(Ordering::Relaxed) == 0
                    })
                {
                    same_cpu_yields += 1;
                    std::thread::yield_now();
                    continue;
                }
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
