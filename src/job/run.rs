//! `mk1 run`: the seed's job as one client of the library.
//!
//! Each producer thread takes a [`Producer`] handle on a [`Pool`] (in place, int32, the run's
//! op as a built-in [`Task`]) and keeps its share of `--inflight` tasks out: it loans a slot,
//! fills a matrix of a random shape into it and submits it; when the completion comes back it
//! checks every element and, in the same pass over the slot, writes the next matrix over it
//! ([`Completion::reuse`], so the slot skips the free list while it is hot in cache). With
//! batching, small matrices go many to a slot ([`Producer::loan_packed`]). The pool does the
//! rest: dispatch, the rings, deaths and restarts, the watchdog, validation of what workers
//! write. The calling thread watches the clock, signals and progress, and turns what the
//! threads counted and how the pool's workers fared into the [`Report`].
//!
//! Sequence numbers come from tickets (a handle numbers its tasks 0, 1, 2, … as they are
//! submitted), so no table maps a completion back to what was filled into it: matrix `i` of
//! the task with ticket `t`, sent by producer `p` of `P`, is matrix `(t · 64 + i) · P + p`,
//! filled from [`super::fill_base`] of that number.
//!
//! A task whose worker died (in place: its matrix is lost with it), or that ran past the
//! worker timeout, is counted as redone and issued again with a fresh fill, outside the
//! `--count` budget. A task the pool could not run at all (no workers left) is lost.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::array::Shape;
use crate::client::{Completion, LoanError, Mode, Pool, PoolError, Producer, Task, TaskError};
use crate::clock::{self, Ticks};
use crate::config::{matrix_bytes, Config, ConfigError, Pin, Stop};
use crate::coordinator::RunError;
use crate::dtype::DType;
use crate::layout::{Padded, MAX_ITEMS};
use crate::ops::{Kernels, Op};
use crate::report::{Failure, Latency, Report};
use crate::sync::{AtomicU64, Ordering};
use crate::sys;

/// Above this many bytes of largest slots, `mk1 run` uses the plan's size classes (the reason
/// is where `run` picks them).
const SINGLE_CLASS_BYTES: u64 = 8 << 20;
/// Failures kept in the report.
const KEEP_FAILURES: usize = 16;
/// How often the calling thread looks at signals, progress and the producer threads.
const TICK: Duration = Duration::from_millis(20);

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
    /// Called from the calling thread every ~100 ms.
    pub progress: Option<&'a (dyn Fn(&Progress) + Sync)>,
    /// When this becomes non-zero (e.g. a signal number stored by a handler), stop issuing,
    /// drain, and report with `interrupted` set.
    pub stop_signal: Option<&'a AtomicUsize>,
}

/// What one producer thread counted.
struct Stats {
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

/// Runs the seed's job described by `cfg` on a pool: set up, run to the stop condition, drain,
/// shut down, report. Errors are only for runs that could not start (every worker already
/// started is then stopped and reaped); a run that started always returns a [`Report`] (check
/// `verified`).
///
/// # Errors
/// [`RunError`]: an invalid configuration, a limit of this process, shared memory, a worker
/// or a producer thread that cannot be started.
pub fn run(cfg: &Config, hooks: &Hooks<'_>) -> Result<Report, RunError> {
    let plan = cfg.plan()?;
    // Calibrate the tick clock now (it sleeps ~20 ms once), not at the first returned token.
    clock::ns_per_tick();
    let bad = |what: &'static str, why: String| RunError::Config(ConfigError { what, why });
    let kernels = Kernels::new(cfg.kernel).map_err(|e| bad("--kernel", e.to_string()))?;
    let task = Task::op(&cfg.op.to_string()).map_err(|e| bad("--op", e.to_string()))?;
    let (workers, producers) = (cfg.workers, cfg.producers);
    // A packed task carries at most MAX_ITEMS matrices.
    let batch = plan.batch_cap.min(MAX_ITEMS as u32);
    // Slots of the largest matrix's size keep every returned slot good for the fused pass.
    // When those would span more memory than the TLB covers (4 KiB pages, a few thousand
    // entries), the plan's size classes pay instead (growing ×4 up to the largest matrix, in
    // proportion to how many shapes need each, split evenly between producers): measured at
    // max-dim 1024, 1.13× the throughput of largest slots only, and 0.87× at max-dim 128.
    let per_producer = plan.out_limit.iter().copied().max().unwrap_or(1);
    let largest = matrix_bytes(cfg.max_dim, cfg.max_dim).max(64);
    let classes: Vec<(u64, u32)> =
        if batch > 1 || u64::from(per_producer * producers) * largest <= SINGLE_CLASS_BYTES {
            let bytes = if batch > 1 {
                plan.layout.classes()[0].slot_bytes
            } else {
                largest
            };
            vec![(bytes, per_producer)]
        } else {
            plan.layout
                .classes()
                .iter()
                .map(|c| (c.slot_bytes, c.count.div_ceil(producers).max(1)))
                .collect()
        };
    let &(slot_bytes, slots) = classes.last().expect("a plan has a class");
    // Placement comes from this process's affinity mask (taskset, cpusets), never absolute CPU
    // numbers: pin only when every producer and worker gets a CPU of that mask to itself.
    let allowed = sys::allowed_cpus();
    let busy = (workers + producers) as usize;
    let pinned = cfg.pin == Pin::Auto && busy <= allowed.len() && busy <= sys::online_cpus();
    let mut builder = Pool::builder()
        .workers(workers)
        .producers(producers)
        .mode(Mode::InPlace)
        .max_array_bytes(slot_bytes)
        .slots_per_producer(slots)
        .max_restarts(cfg.max_restarts)
        .worker_timeout(cfg.worker_timeout)
        .start_timeout(cfg.start_timeout)
        .simd(cfg.kernel)
        .dispatch(cfg.dispatch)
        .seed(cfg.seed)
        .wait(cfg.wait)
        .pack_bytes(0)
        .worker_args(cfg.worker_launch.args.clone())
        .inherit_stdout(cfg.worker_launch.inherit_stdout);
    for &(bytes, n) in &classes[..classes.len() - 1] {
        builder = builder.size_class(bytes, n);
    }
    for (k, v) in &cfg.worker_launch.env {
        builder = builder.worker_env(k, v);
    }
    if let Some(exe) = &cfg.worker_exe {
        builder = builder.worker_exe(exe);
    }
    if pinned {
        builder = builder.worker_cpus(allowed[producers as usize..busy].to_vec());
    }
    let pool = builder.build().map_err(|e| match e {
        // (The slots come from the run's flags: name those, not the library's setting.)
        PoolError::Setting {
            what: "slots_per_producer" | "size_class",
            why,
        } => bad(
            "--inflight",
            format!(
                "the run needs too many slots per producer ({why}): lower --inflight or \
                 --workers"
            ),
        ),
        PoolError::Setting { what, why } => bad(what, why),
        PoolError::Start(e) => e,
        other => RunError::Resource {
            what: "cannot start the pool".into(),
            why: other.to_string(),
        },
    })?;

    // Everything the producer threads use is allocated here, on this thread, within the room
    // the pool's limit check left: a new thread's first allocation can need a malloc arena of
    // its own, which an address-space limit refuses (an abort, not an error).
    let mut ready: Vec<Option<(Producer<'_>, Stats)>> = (0..producers)
        .map(|_| {
            let h = pool.producer().expect("one handle per producer thread");
            Some((h, Stats::new(workers as usize)))
        })
        .collect();
    let stop = AtomicBool::new(false);
    let done: Vec<Padded<AtomicU64>> = (0..producers).map(|_| Padded(AtomicU64::new(0))).collect();
    // `panics[p]`: producer thread `p` is unwinding (set by its `PanicFlag`).
    let panics: Vec<AtomicBool> = (0..producers).map(|_| AtomicBool::new(false)).collect();
    let start = Instant::now();
    let deadline = match cfg.stop {
        Stop::After(d) => Some(clock::now().saturating_add(clock::ticks_in(d))),
        Stop::Count(_) => None,
    };
    let chaos_thread = std::env::var("MK1_CHAOS_THREAD")
        .ok()
        .and_then(|v| v.parse::<u32>().ok());
    let mut thread_error: Option<(u32, std::io::Error)> = None;
    let mut interrupted: Option<String> = None;
    let mut signal: Option<i32> = None;
    let job = Job {
        kernels,
        op: cfg.op,
        task: &task,
        seed: cfg.seed,
        producers: u64::from(producers),
        batch,
        classes: classes.len() > 1,
        deadline,
        stop: &stop,
    };
    let stats: Vec<Stats> = std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(producers as usize);
        for p in 0..producers {
            // Fault injection for the tests: `MK1_CHAOS_THREAD=P` makes starting producer P fail
            // as the kernel would at a thread limit (EAGAIN), with workers already running.
            if chaos_thread == Some(p) {
                thread_error = Some((p, std::io::Error::from_raw_os_error(11)));
                break;
            }
            let cpu = pinned.then(|| allowed[p as usize]);
            let budget = match cfg.stop {
                Stop::Count(n) => {
                    let (p, np) = (u64::from(p), u64::from(producers));
                    Some(n * (p + 1) / np - n * p / np)
                }
                Stop::After(_) => None,
            };
            let (job, done) = (&job, &done[p as usize].0);
            let limit = plan.out_limit[p as usize] as usize;
            let (handle, stats) = ready[p as usize].take().expect("each producer starts once");
            let panicked = &panics[p as usize];
            let shapes = super::Shapes::new(
                cfg.seed ^ (u64::from(p) << 32) ^ 0x5eed,
                cfg.min_dim,
                cfg.max_dim,
            );
            let spawned = std::thread::Builder::new()
                .name(format!("mk1-producer-{p}"))
                .spawn_scoped(scope, move || {
                    let _flag = PanicFlag(panicked);
                    if let Some(cpu) = cpu {
                        let _ = sys::pin_to_cpu(cpu);
                    }
                    let mut feed = Feed {
                        job,
                        p: u64::from(p),
                        limit,
                        short: false,
                        shapes,
                        budget,
                        owed: 0,
                        issuing: true,
                        done,
                        stats,
                        now: clock::now(),
                        skip: 0,
                        returned_last: false,
                    };
                    feed.run(&handle);
                    drop(handle);
                    feed.stats
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    thread_error = Some((p, e));
                    break;
                }
            }
        }
        if thread_error.is_some() {
            // The threads already running give up what is out; the run is refused.
            stop.store(true, Ordering::Relaxed);
            pool.terminate();
            return handles.into_iter().filter_map(|h| h.join().ok()).collect();
        }
        let mut last_progress = Instant::now();
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(TICK);
            if let Some(sig) = hooks.stop_signal {
                let s = sig.load(Ordering::Relaxed);
                if s != 0 && signal.is_none() {
                    signal = Some(s as i32);
                    interrupted.get_or_insert_with(|| crate::report::signal_name(s));
                    stop.store(true, Ordering::Relaxed);
                    // Draining ends in bounded time even with a stuck worker.
                    pool.wind_down();
                }
            }
            // The pool gave up on a worker (could not kill or restart it) or hit the restart
            // limit: the run stops issuing, as the seed's job always has.
            if !stop.load(Ordering::Relaxed) {
                if let Some(why) = pool.trouble() {
                    interrupted.get_or_insert(why);
                    stop.store(true, Ordering::Relaxed);
                    pool.wind_down();
                }
            }
            // A producer thread panicked: stop issuing (its counts are lost, and the report
            // says the run is not verified).
            let panicked = panics.iter().any(|f| f.load(Ordering::Acquire));
            if panicked && !stop.load(Ordering::Relaxed) {
                interrupted.get_or_insert_with(|| "a producer thread panicked".into());
                stop.store(true, Ordering::Relaxed);
            }
            if let Some(progress) = hooks.progress {
                if last_progress.elapsed() >= Duration::from_millis(100) {
                    last_progress = Instant::now();
                    progress(&Progress {
                        matrices: done.iter().map(|d| d.0.load(Ordering::Relaxed)).sum(),
                        elapsed: start.elapsed(),
                        stop: cfg.stop,
                    });
                }
            }
        }
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    // (Handles of threads that never started.)
    drop(ready);
    let segment_bytes = pool.segment_bytes();
    let fared = pool.shutdown();
    if let Some((p, e)) = thread_error {
        return Err(RunError::Resource {
            what: format!("cannot start producer thread {p}"),
            why: e.to_string(),
        });
    }
    if stats.len() < producers as usize {
        // A producer's counts are missing: whatever else happened, the run failed (exit 1).
        signal = None;
        interrupted.get_or_insert_with(|| "a producer thread panicked".into());
    }
    let mut report = build_report(cfg, batch, kernels, pinned, segment_bytes, stats);
    report.worker_restarts = fared.restarts;
    report.worker_faults = fared.faults;
    report.worker_exits = fared.exits;
    report.unreaped = fared.unreaped;
    report.interrupted = interrupted.or(fared.gave_up);
    report.signal = signal;
    Ok(report)
}

/// Raises its flag if dropped while its thread unwinds (a producer thread panicked).
struct PanicFlag<'a>(&'a AtomicBool);

impl Drop for PanicFlag<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Release);
        }
    }
}

/// What every producer thread shares.
struct Job<'a> {
    kernels: Kernels,
    op: Op,
    task: &'a Task,
    seed: u64,
    producers: u64,
    /// Matrices per task (1: one per task, filled and checked in the fused pass).
    batch: u32,
    /// The pool has slots of several sizes.
    classes: bool,
    /// End of issuing, in clock ticks.
    deadline: Option<Ticks>,
    /// Stop issuing (a signal, a panicked thread, a thread that could not start).
    stop: &'a AtomicBool,
}

/// One producer thread's state (its handle is passed alongside, as completions borrow it).
struct Feed<'a> {
    job: &'a Job<'a>,
    p: u64,
    /// Tasks this producer keeps in flight (`--inflight` × workers, its share).
    limit: usize,
    /// The last issue found no slot for its matrix while the pool has size classes (a smaller
    /// slot may be free).
    short: bool,
    shapes: super::Shapes,
    /// Matrices still to issue in count mode.
    budget: Option<u64>,
    /// Matrices to issue again (their worker died), outside the budget.
    owed: u64,
    /// Still issuing new matrices.
    issuing: bool,
    /// Matrices checked so far, for progress.
    done: &'a AtomicU64,
    stats: Stats,
    /// The clock as last read by [`Feed::tick`], and reads to skip before the next one.
    now: Ticks,
    skip: u32,
    /// The last completion was counted by [`Feed::returned`].
    returned_last: bool,
}

/// Calls of [`Feed::tick`] per read of the clock: a read costs about 12 ns here (25 ns for
/// `rdtscp`), against about 1.5 µs per matrix at max-dim 128, and the deadline is then checked
/// every few µs, which a run measured in seconds cannot tell apart.
const TICK_EVERY: u32 = 8;
/// A completion whose round trip took longer than this reads the clock at once: with tasks
/// this long, skipped reads would let the deadline pass by more than a few µs.
const SLOW_TASK_NS: u64 = 20_000;

impl Feed<'_> {
    /// Matrix `i` of the task with ticket `ticket`.
    fn seq(&self, ticket: u64, i: usize) -> u64 {
        (ticket * MAX_ITEMS as u64 + i as u64) * self.job.producers + self.p
    }

    fn base(&self, seq: u64) -> i32 {
        super::fill_base(seq, self.job.seed)
    }

    /// The clock, read on every [`TICK_EVERY`]th call (the deadline check's and the last
    /// return's time; the round trips are timed by the pool, from its own reads).
    fn tick(&mut self) -> Ticks {
        if self.skip == 0 {
            self.now = clock::now();
            self.skip = TICK_EVERY;
        }
        self.skip -= 1;
        self.now
    }

    /// Whether another matrix may be issued now: a new one until the stop, the deadline or the
    /// budget; one owed (redone) until the pool has no workers left. Each producer issues one
    /// at least, however short the duration (a run of none would verify nothing).
    fn may_issue(&mut self, now: Ticks) -> bool {
        if self.issuing
            && (self.job.stop.load(Ordering::Relaxed)
                || (self.job.deadline.is_some_and(|d| now >= d)
                    && self.stats.first_issue.is_some()))
        {
            self.issuing = false;
        }
        self.owed > 0 || (self.issuing && self.budget != Some(0))
    }

    /// The pool has no workers left: nothing more can be issued, and what is owed is lost.
    fn no_workers(&mut self) {
        self.issuing = false;
        self.stats.lost += std::mem::take(&mut self.owed);
    }

    /// Takes `n` matrices off what is owed, then off the budget.
    fn charge(&mut self, n: u64) {
        let from_owed = n.min(self.owed);
        self.owed -= from_owed;
        if let Some(b) = &mut self.budget {
            *b -= (n - from_owed).min(*b);
        }
    }

    /// How many matrices the next task may carry.
    fn cap(&self) -> u64 {
        let cap = u64::from(self.job.batch);
        if self.owed > 0 {
            return cap.min(self.owed);
        }
        self.budget.map_or(cap, |b| b.min(cap))
    }

    fn run(&mut self, h: &Producer<'_>) {
        while self.may_issue(clock::now()) && self.issue(h) {}
        while let Some(c) = h.recv() {
            let recycled = self.complete(h, c);
            self.done.store(self.stats.matrices, Ordering::Relaxed);
            // A recycled slot went straight into the next task, and no other slot came free;
            // except that with size classes a slot too small for the pending matrix may have
            // gone home earlier, leaving the share short of a task: then try again.
            if recycled && !std::mem::take(&mut self.short) {
                continue;
            }
            let now = self.tick();
            while self.may_issue(now) && self.issue(h) {}
        }
        // When the last completion returned its matrices it was just now (`tick` may have
        // been a few calls behind); a last completion that was lost keeps the last return.
        if self.returned_last {
            self.stats.last_return = Some(clock::now());
        }
        // (Nothing is out: whatever is still owed could not be issued.)
        self.no_workers();
        self.done.store(self.stats.matrices, Ordering::Relaxed);
    }

    /// Fills and submits one task into a free slot; `false` when the producer's share of tasks
    /// in flight (`--inflight`) is reached, no slot is free now, or none ever will be (the pool
    /// has no workers left).
    fn issue(&mut self, h: &Producer<'_>) -> bool {
        if h.in_flight() >= self.limit {
            return false;
        }
        let ticket = h.next_ticket().0;
        let submitted = if self.job.batch > 1 {
            let mut b = match h.try_loan_packed(DType::I32, None) {
                Ok(b) => b,
                Err(e) => return self.refused(&e),
            };
            let mut n = 0;
            while n < self.cap() {
                let (r, c) = self.shapes.next_shape();
                let seq = self.seq(ticket, n as usize);
                let base = self.base(seq);
                match b.push_array::<i32>(Shape::d2(r, c)) {
                    Ok(Some(data)) => self.job.kernels.fill(base, data),
                    _ => {
                        self.shapes.pending = Some((r, c));
                        break;
                    }
                }
                n += 1;
            }
            self.charge(n);
            h.submit_packed(b, self.job.task).map_err(|e| (n, e.error))
        } else {
            let (r, c) = self.shapes.next_shape();
            let mut loan = match h.try_loan::<i32>(Shape::d2(r, c)) {
                Ok(l) => l,
                Err(e) => {
                    self.shapes.pending = Some((r, c));
                    return self.refused(&e);
                }
            };
            let base = self.base(self.seq(ticket, 0));
            self.job.kernels.fill(base, loan.as_mut_slice());
            self.charge(1);
            h.submit(loan, self.job.task).map_err(|e| (1, e.error))
        };
        match submitted {
            Ok(_) => {
                self.stats.first_issue.get_or_insert_with(clock::now);
                true
            }
            Err((n, _)) => {
                // Only a pool without workers refuses a task it accepted before (the op was
                // checked when the run started): what was charged is lost with the rest.
                self.stats.lost += n;
                self.no_workers();
                false
            }
        }
    }

    fn refused(&mut self, e: &LoanError) -> bool {
        match e {
            LoanError::NoWorkers(_) => self.no_workers(),
            // No free slot the next matrix fits: with size classes, smaller ones may be free.
            LoanError::Busy { .. } => self.short = self.job.classes,
            _ => {}
        }
        false
    }

    /// Checks a completion and recycles its slot: for one matrix, into the next matrix in the
    /// same pass when one is to be issued (then `true`: the slot is out again).
    #[inline(always)]
    fn complete<'h>(&mut self, h: &'h Producer<'_>, c: Completion<'h>) -> bool {
        if c.latency_ns() > SLOW_TASK_NS {
            self.skip = 0;
        }
        let now = self.tick();
        let count = c.len() as u64;
        // (Set again by `returned` for a completion that returns its matrices.)
        self.returned_last = false;
        match c.error() {
            None => {}
            Some(TaskError::WorkerDied { .. }) if c.quarantined() => {
                // Its worker could not be killed: the slot is retired, the matrix lost.
                self.stats.lost += count;
                return false;
            }
            Some(TaskError::WorkerDied { .. } | TaskError::Timeout(_)) => {
                // In place, the matrix died with its worker: issue it again.
                self.stats.redone += count;
                self.owed += count;
                return false;
            }
            Some(TaskError::NoWorkers(_)) => {
                self.stats.lost += count;
                self.no_workers();
                return false;
            }
            Some(_) => {
                // A worker said the op failed: for a built-in op, only a broken one does.
                self.returned(&c, now);
                self.stats.failed += count;
                return false;
            }
        }
        self.returned(&c, now);
        let w = c.worker().unwrap_or(0);
        let ticket = c.ticket().0;
        // (Batches are checked array by array and their slot packed anew: the fused pass is for
        // one matrix per task.) The next matrix is, of the next few shapes that fit this slot,
        // the one closest in size to the matrix checked: the fused pass then covers most of
        // both, and little is left to check or fill alone.
        let cap = c.capacity();
        let next = if self.job.batch == 1 && self.may_issue(now) {
            self.shapes
                .nearest(c.shape().elements(), |r, cols| matrix_bytes(r, cols) <= cap)
                .map(|(r, cols)| Shape::d2(r, cols))
        } else {
            None
        };
        let Some(next) = next else {
            for i in 0..c.len() {
                let seq = self.seq(ticket, i);
                let base = self.base(seq);
                match c.item_output::<i32>(i) {
                    Ok(out) => {
                        let m = out.as_slice();
                        let bad = self
                            .job
                            .kernels
                            .verify(self.job.op, base, m)
                            .map(|at| (at, m[at]));
                        self.account(seq, w, base, m.len(), bad);
                    }
                    Err(_) => self.stats.failed += 1,
                }
            }
            return false;
        };
        // The fused path: check this matrix and fill the next one over it in one pass.
        let old_seq = self.seq(ticket, 0);
        let old_base = self.base(old_seq);
        let old = c.shape().elements() as usize;
        let new = next.elements() as usize;
        let Ok(mut loan) = c.reuse::<i32>(Shape::d1(old.max(new) as u32)) else {
            // Never for a live slot (both matrices fit it, checked above); the matrix is lost.
            self.stats.lost += 1;
            return false;
        };
        let new_seq = self.seq(h.next_ticket().0, 0);
        let new_base = self.base(new_seq);
        let bad = self.job.kernels.verify_then_fill(
            self.job.op,
            old_base,
            old,
            new_base,
            new,
            loan.as_mut_slice(),
        );
        self.account(old_seq, w, old_base, old, bad);
        if loan.reshape(next).is_err() {
            return false;
        }
        self.charge(1);
        // Deferred wake-up: while completions flow the worker is awake, and the doorbell is
        // rung once by the next `recv` that finds nothing ready (or any plain submit).
        if h.submit_deferred(loan, self.job.task).is_err() {
            self.stats.lost += 1;
            self.no_workers();
            return false;
        }
        true
    }

    /// Counts one returned task.
    fn returned(&mut self, c: &Completion<'_>, now: Ticks) {
        let s = &mut self.stats;
        let count = c.len() as u64;
        s.matrices += count;
        if let Some(w) = c.worker() {
            if let Some(n) = s.per_worker.get_mut(w as usize) {
                *n += count;
            }
        }
        s.tokens += 1;
        s.latency.saturating_record(c.latency_ns().max(1));
        s.last_return = Some(now);
        self.returned_last = true;
    }

    /// Counts one checked matrix: its bytes if it matched, a failure (the first few in
    /// detail) if `bad` holds the first wrong element and the value found there.
    fn account(&mut self, seq: u64, w: u32, base: i32, elems: usize, bad: Option<(usize, i32)>) {
        let s = &mut self.stats;
        match bad {
            None => s.bytes += elems as u64 * 4,
            Some((at, got)) => {
                s.failed += 1;
                if s.failures.len() < KEEP_FAILURES {
                    s.failures.push(Failure {
                        seq,
                        worker: w,
                        index: at as u64,
                        expected: self.job.op.apply_scalar(base.wrapping_add(at as i32)),
                        got,
                    });
                }
            }
        }
    }
}

impl Stats {
    fn new(workers: usize) -> Stats {
        Stats {
            matrices: 0,
            failed: 0,
            lost: 0,
            redone: 0,
            tokens: 0,
            bytes: 0,
            per_worker: vec![0; workers],
            latency: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds"),
            failures: Vec::new(),
            first_issue: None,
            last_return: None,
        }
    }
}

fn build_report(
    cfg: &Config,
    batch: u32,
    kernels: Kernels,
    pinned: bool,
    segment_bytes: u64,
    stats: Vec<Stats>,
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
        batch,
        tokens,
        matrices_per_token: if tokens > 0 {
            matrices as f64 / tokens as f64
        } else {
            0.0
        },
        kernel: kernels.kernel().name(),
        pinned,
        segment_bytes,
        per_worker,
        worker_restarts: 0,
        worker_faults: 0,
        latency_ns: Latency {
            p50: latency.value_at_quantile(0.5),
            p99: latency.value_at_quantile(0.99),
            max: latency.max(),
        },
        failures,
        worker_exits: Vec::new(),
        interrupted: None,
        signal: None,
        unreaped: Vec::new(),
    }
}
