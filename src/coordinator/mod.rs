//! The coordinator role: the producer threads that fill, dispatch and verify, and the monitor
//! (the calling thread) that starts workers, notices deaths, enforces the watchdog, and ends
//! the run.
//!
//! Producer hot path, per thread: pop returned tokens from every worker's ring, verify each
//! matrix against the op applied to the deterministic fill, recycle the slot, fill a new one,
//! push its token to the worker the dispatch policy picks, flush, ring doorbells only for
//! sleepers. No lock, no allocation, no syscall while work flows (DESIGN invariant 7).
//!
//! Deaths (DESIGN invariant 3). The monitor (`monitor.rs`) holds a pidfd per worker (or, where
//! pidfds are refused, a pipe only the worker holds) and polls them, so it learns
//! of an exit as it happens. It marks the worker dead and bumps its death epoch; each producer,
//! on seeing the new epoch, drains and verifies what the dead worker had already returned,
//! reclaims every other token it had sent there (their matrices are filled again and redone),
//! resets its own ring pair with that worker, and acknowledges. Only when every producer has
//! acknowledged does the monitor start a replacement, so the new process never sees stale ring
//! state. A producer that finds a protocol violation (bad token, impossible ring counter) asks
//! the monitor to kill the worker, and the same path follows.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::clock::{self, Ticks};
use crate::config::{Config, ConfigError, Pin, Plan, Stop, Wait};
use crate::layout::Padded;
use crate::ops::Kernels;
use crate::report::{Latency, Report, WorkerExit};
use crate::shm::{Segment, ShmCreateError};
use crate::sync::{AtomicU64, Ordering};
use crate::sys::{self};
use crate::wait::{Doorbell, Futex, SpinMode};
use crate::worker::WorkerSpec;

pub(crate) mod monitor;
mod producer;

pub(crate) use monitor::*;
use producer::*;

/// How often the monitor looks at heartbeats and reports progress, at most.
pub(crate) const MONITOR_TICK: Duration = Duration::from_millis(20);
/// Longest a producer sleeps before re-checking its deadline.
const PRODUCER_SLEEP: Duration = Duration::from_millis(20);
/// How long workers get to exit after shutdown is requested before they are killed.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How long a new worker may take to attach.
/// A worker's default time from start to attach ([`Config::start_timeout`]).
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// A worker sent SIGKILL that still has it pending after this long is stuck in the kernel; its
/// tokens are reclaimed without waiting for it to exit.
pub(crate) const KILL_GRACE: Duration = Duration::from_millis(200);
/// How long shutdown waits for killed workers before naming them and returning.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(1);
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
pub(crate) struct Control {
    /// Stop issuing new matrices.
    pub(crate) stop: AtomicBool,
    /// Producers may exit (they are all idle).
    pub(crate) finish: AtomicBool,
    /// `alive[w]`: worker `w` may be sent tokens.
    pub(crate) alive: Vec<AtomicBool>,
    /// Bumped on every death and every restart; producers re-read `alive` when it moves.
    pub(crate) changes: AtomicUsize,
    /// Deaths of worker `w` so far.
    pub(crate) death_epoch: Vec<AtomicUsize>,
    /// `acked[p][w]`: the last death epoch of `w` producer `p` has cleaned up after.
    pub(crate) acked: Vec<Vec<AtomicUsize>>,
    /// Tokens reclaimed from worker `w` at its last death (summed over producers).
    pub(crate) reclaimed: Vec<AtomicU64>,
    /// `kill[w]`: a producer caught worker `w` breaking the protocol.
    pub(crate) kill: Vec<AtomicBool>,
    /// `stalled[w]`: worker `w`'s last kill was for running past the worker timeout (set before
    /// its death is published, cleared at its restart).
    pub(crate) stalled: Vec<AtomicBool>,
    /// Why, for the report (cold path).
    pub(crate) fault_reasons: Mutex<Vec<(u32, String)>>,
    /// How worker `w` last ended, in words (written before its death is published).
    pub(crate) last_exit: Vec<Mutex<String>>,
    /// Every worker is gone for good; producers give up on what is left.
    pub(crate) no_workers: AtomicBool,
    /// `abandoned[w]`: worker `w` could not be killed; producers give up its tokens as lost
    /// (the run has stopped issuing, so their slots are never reused).
    pub(crate) abandoned: Vec<AtomicBool>,
    /// `idle[p]`: producer `p` stopped issuing and has every token home.
    pub(crate) idle: Vec<AtomicBool>,
    /// Matrices verified by producer `p` (progress only), one line each.
    pub(crate) done: Vec<Padded<AtomicU64>>,
    /// `flow[p][w]`: tokens producer `p` has sent to worker `w` and has had back (returned or
    /// reclaimed). Process-local, written only by producer `p`, so the watchdog's notion of
    /// "owes tokens and makes no progress" cannot be faked by a worker.
    pub(crate) flow: Vec<Box<[Flow]>>,
}

impl Control {
    pub(crate) fn new(workers: u32, producers: u32) -> Control {
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
            stalled: per_worker(),
            fault_reasons: Mutex::new(Vec::with_capacity(16)),
            last_exit: (0..workers).map(|_| Mutex::new(String::new())).collect(),
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
pub(crate) struct Flow {
    pub(crate) sent: AtomicU64,
    pub(crate) back: AtomicU64,
}

/// Runs the pipeline described by `cfg`: set up, run to the stop condition, drain, shut down,
/// report. Errors are only for runs that could not start (every worker already started is then
/// killed and reaped); a run that started always returns a [`Report`] (check `verified`).
pub fn run(cfg: &Config, hooks: &Hooks<'_>) -> Result<Report, RunError> {
    crate::worker::refuse_nested_start();
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
    let stderr = WorkerStderr::new().map_err(|e| RunError::Resource {
        what: "cannot make the workers' stderr pipe".into(),
        why: e.to_string(),
    })?;
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
        tasks: None,
    };

    // Everything the producers need is allocated before the first worker starts, so running out
    // of memory is a start-up error, not an abort with workers running.
    let ctl = Control::new(workers, producers);
    let mut ready: Vec<Option<Producer<'_>>> = (0..producers)
        .map(|p| Some(Producer::new(p, &seg, &ctl, cfg, &plan, kernels, spin)))
        .collect();

    // Start every worker and wait until each has attached, so a program that cannot serve as a
    // worker is a clear start-up error rather than a storm of restarts.
    let procs = start_workers(&image, &stderr, &seg, workers, cfg.start_timeout, &spec)?;

    let start = Instant::now();
    let mut monitor = Monitor::new(cfg, &seg, &ctl, &image, &stderr, &spec, procs);
    monitor.start = start;

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
            // No monitor will run: stop the workers first (bounded), so the producers that did
            // start give up what is out instead of waiting for returns, deaths or restarts.
            ctl.stop.store(true, Ordering::Relaxed);
            abandon(&mut monitor.procs);
            ctl.no_workers.store(true, Ordering::Release);
            ctl.changes.fetch_add(1, Ordering::AcqRel);
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
            // A producer that never started or has ended (panicked) never acknowledges a death.
            let producer_gone = || -> Vec<bool> {
                (0..producers as usize)
                    .map(|p| p >= started || handles[p].is_finished())
                    .collect()
            };
            monitor.tick(&producer_gone);

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
    // The last words of the workers that left (a stuck one keeps only our pipe open).
    monitor.stderr.forward(&mut monitor.stderr_pending);
    if !monitor.stderr_pending.is_empty() {
        monitor.stderr_pending.push(b'\n');
        monitor.stderr.forward(&mut monitor.stderr_pending);
    }
    if stats.len() < producers as usize {
        // A producer's counts are missing: whatever else happened, the run failed (exit 1).
        monitor.signal = None;
    }
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
