//! The same job through mk1 and through what users would pick instead, for `mk1 bench`.
//!
//! Every system runs [`Job`]: shapes from [`crate::job::Shapes`] with the same seed, the fill of
//! [`crate::job::fill_base`], the same op applied by the same kernels, every element of every
//! returned matrix verified by the producer, the same number of workers and the same number of
//! matrices in flight per worker. Only the hand-off differs:
//!
//! - `mk1`: worker processes, tokens through shared-memory rings (the real pipeline).
//! - `threads`: worker threads, matrices handed by pointer through crossbeam channels.
//! - `unix-socket` / `pipe`: worker processes, matrix bytes copied through the kernel each way.
//! - `inline`: one thread, fill + op + verify, no hand-off at all.

mod kernels;
mod latency;
pub mod library;
mod stream;

use std::time::{Duration, Instant};

use crossbeam_channel as chan;
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::job::{fill_base, Shapes};
use crate::ops::{Kernels, Op};
use crate::report::Latency;

pub use kernels::{
    measure_kernels, KernelFigure, KernelReport, COPY_MEMCPY, COPY_MK1, OUT_OF_PLACE_COPY,
    OUT_OF_PLACE_ONE_PASS,
};
pub use latency::{measure_latency, LatencyFigure};
pub use stream::{run_child_if_requested, StreamKind};

/// What every system is asked to do.
#[derive(Debug, Clone)]
pub struct Job {
    /// Worker processes or threads.
    pub workers: u32,
    /// Matrices in flight per worker.
    pub inflight: u32,
    /// Smallest dimension.
    pub min_dim: u32,
    /// Largest dimension.
    pub max_dim: u32,
    /// The op.
    pub op: Op,
    /// Seed for shapes, dispatch and fill.
    pub seed: u64,
    /// How long to issue matrices.
    pub duration: Duration,
    /// Kernels for fill, op and verify.
    pub kernels: Kernels,
    /// Program to start for worker processes (mk1, unix-socket, pipe).
    pub exe: std::path::PathBuf,
}

/// One system's run of a [`Job`].
#[derive(Debug, Clone, Serialize)]
pub struct SystemRun {
    /// System name.
    pub system: &'static str,
    /// Matrices verified.
    pub matrices: u64,
    /// First issue to last return.
    pub seconds: f64,
    /// `matrices / seconds`.
    pub matrices_per_s: f64,
    /// Payload bytes (rows·cols·4) per second, 1e9.
    pub gb_per_s: f64,
    /// Every matrix matched and none was lost.
    pub verified: bool,
    /// Round trip of one matrix (issue to verified return), nanoseconds.
    pub latency_ns: Latency,
}

/// The systems `mk1 bench` compares, in table order.
pub const SYSTEMS: [&str; 5] = ["mk1", "threads", "unix-socket", "pipe", "inline"];

/// Runs `system` on `job`.
pub fn run_system(system: &str, job: &Job) -> Result<SystemRun, String> {
    match system {
        "mk1" => run_mk1(job),
        "threads" => Ok(run_threads(job)),
        "unix-socket" => stream::run(job, StreamKind::UnixSocket),
        "pipe" => stream::run(job, StreamKind::Pipe),
        "inline" => Ok(run_inline(job)),
        other => Err(format!("unknown system `{other}`")),
    }
}

/// What a producer counts, for every system alike.
pub(crate) struct Tally {
    matrices: u64,
    bytes: u64,
    failed: u64,
    latency: Histogram<u64>,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Tally {
    pub(crate) fn new() -> Tally {
        Tally {
            matrices: 0,
            bytes: 0,
            failed: 0,
            latency: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds"),
            first: None,
            last: None,
        }
    }

    pub(crate) fn issued(&mut self, at: Instant) {
        self.first.get_or_insert(at);
    }

    /// Verifies one returned matrix and counts it.
    pub(crate) fn check(&mut self, job: &Job, seq: u64, data: &[i32], sent: Instant) {
        let now = Instant::now();
        if job
            .kernels
            .verify(job.op, fill_base(seq, job.seed), data)
            .is_some()
        {
            self.failed += 1;
        } else {
            self.bytes += data.len() as u64 * 4;
        }
        self.matrices += 1;
        self.latency
            .saturating_record(now.saturating_duration_since(sent).as_nanos() as u64);
        self.last = Some(now);
    }

    pub(crate) fn finish(self, system: &'static str, issued: u64) -> SystemRun {
        let seconds = match (self.first, self.last) {
            (Some(a), Some(b)) => b.saturating_duration_since(a).as_secs_f64(),
            _ => 0.0,
        };
        let rate = |x: f64| if seconds > 0.0 { x / seconds } else { 0.0 };
        SystemRun {
            system,
            matrices: self.matrices,
            seconds,
            matrices_per_s: rate(self.matrices as f64),
            gb_per_s: rate(self.bytes as f64) / 1e9,
            verified: self.failed == 0 && self.matrices == issued && issued > 0,
            latency_ns: Latency {
                p50: self.latency.value_at_quantile(0.5),
                p99: self.latency.value_at_quantile(0.99),
                max: self.latency.max(),
            },
        }
    }
}

/// The mk1 pipeline itself, with its defaults: at max-dim 128 and above that is one matrix per
/// token, the same messages as the baselines; at max-dim 64 and below `--batch auto` packs many
/// matrices per token, which is mk1's answer to per-message cost (the table says so).
fn run_mk1(job: &Job) -> Result<SystemRun, String> {
    let cfg = crate::Config::default()
        .workers(job.workers)
        .inflight(job.inflight)
        .min_dim(job.min_dim)
        .max_dim(job.max_dim)
        .op(job.op)
        .seed(job.seed)
        .batch(crate::Batch::Auto)
        .kernel(job.kernels.kernel())
        .stop(crate::Stop::After(job.duration))
        .worker_exe(&job.exe);
    let r = cfg.run().map_err(|e| e.to_string())?;
    Ok(SystemRun {
        system: "mk1",
        matrices: r.matrices,
        seconds: r.seconds,
        matrices_per_s: r.matrices_per_s,
        gb_per_s: r.gb_per_s,
        verified: r.verified,
        latency_ns: r.latency_ns,
    })
}

/// One matrix in flight in the in-process baselines: the buffer travels by pointer.
struct Msg {
    seq: u64,
    len: usize,
    data: Vec<i32>,
    sent: Instant,
}

/// Producer and worker threads in one process; matrices handed by pointer through crossbeam
/// channels. The reference for what shared-memory IPC should cost: nothing more than this.
fn run_threads(job: &Job) -> SystemRun {
    let max_elems = (job.max_dim as usize).pow(2);
    let (back_tx, back_rx) = chan::unbounded::<Msg>();
    let mut tally = Tally::new();
    let mut issued = 0u64;
    std::thread::scope(|s| {
        let mut to = Vec::new();
        for _ in 0..job.workers {
            let (tx, rx) = chan::unbounded::<Msg>();
            to.push(tx);
            let back = back_tx.clone();
            let (kernels, op) = (job.kernels, job.op);
            s.spawn(move || {
                for mut m in rx {
                    kernels.apply(op, &mut m.data[..m.len]);
                    if back.send(m).is_err() {
                        break;
                    }
                }
            });
        }
        drop(back_tx);
        let mut free: Vec<Vec<i32>> = (0..job.workers * job.inflight)
            .map(|_| vec![0; max_elems])
            .collect();
        let mut shapes = Shapes::new(job.seed, job.min_dim, job.max_dim);
        let mut pick = SmallRng::seed_from_u64(job.seed);
        let deadline = Instant::now() + job.duration;
        let mut out = 0usize;
        loop {
            while Instant::now() < deadline {
                let Some(mut data) = free.pop() else { break };
                let (r, c) = shapes.next_shape();
                let len = (r * c) as usize;
                job.kernels
                    .fill(fill_base(issued, job.seed), &mut data[..len]);
                let now = Instant::now();
                tally.issued(now);
                let w = pick.random_range(0..to.len());
                to[w]
                    .send(Msg {
                        seq: issued,
                        len,
                        data,
                        sent: now,
                    })
                    .expect("worker alive");
                issued += 1;
                out += 1;
            }
            if out == 0 {
                break;
            }
            let m = back_rx.recv().expect("workers alive");
            out -= 1;
            tally.check(job, m.seq, &m.data[..m.len], m.sent);
            free.push(m.data);
            while let Ok(m) = back_rx.try_recv() {
                out -= 1;
                tally.check(job, m.seq, &m.data[..m.len], m.sent);
                free.push(m.data);
            }
        }
        drop(to);
    });
    tally.finish("threads", issued)
}

/// One thread doing fill, op and verify with no hand-off: the per-core compute reference.
fn run_inline(job: &Job) -> SystemRun {
    let mut data = vec![0; (job.max_dim as usize).pow(2)];
    let mut shapes = Shapes::new(job.seed, job.min_dim, job.max_dim);
    let mut tally = Tally::new();
    let deadline = Instant::now() + job.duration;
    let mut issued = 0u64;
    while Instant::now() < deadline {
        let (r, c) = shapes.next_shape();
        let m = &mut data[..(r * c) as usize];
        let start = Instant::now();
        tally.issued(start);
        job.kernels.fill(fill_base(issued, job.seed), m);
        job.kernels.apply(job.op, m);
        tally.check(job, issued, m, start);
        issued += 1;
    }
    tally.finish("inline", issued)
}

/// Median and range of one system's repeated runs.
#[derive(Debug, Clone, Serialize)]
pub struct SystemSummary {
    /// System name.
    pub system: &'static str,
    /// Median matrices/s over the repetitions.
    pub matrices_per_s: f64,
    /// Best matrices/s.
    pub best_matrices_per_s: f64,
    /// Worst matrices/s.
    pub worst_matrices_per_s: f64,
    /// Median payload GB/s.
    pub gb_per_s: f64,
    /// Every repetition verified.
    pub verified: bool,
    /// Latency of the median run.
    pub latency_ns: Latency,
    /// Median matrices/s relative to mk1's median.
    pub ratio_to_mk1: f64,
    /// matrices/s of every repetition, in run order.
    pub runs: Vec<f64>,
}

/// Summarises repeated runs per system (in the order of `runs`).
pub fn summarise(runs: &[(&'static str, Vec<SystemRun>)]) -> Vec<SystemSummary> {
    let mut out: Vec<SystemSummary> = runs
        .iter()
        .map(|(name, rs)| {
            let mut sorted: Vec<&SystemRun> = rs.iter().collect();
            sorted.sort_by(|a, b| a.matrices_per_s.total_cmp(&b.matrices_per_s));
            let mid = sorted[sorted.len() / 2];
            SystemSummary {
                system: name,
                matrices_per_s: mid.matrices_per_s,
                best_matrices_per_s: sorted.last().map_or(0.0, |r| r.matrices_per_s),
                worst_matrices_per_s: sorted.first().map_or(0.0, |r| r.matrices_per_s),
                gb_per_s: mid.gb_per_s,
                verified: rs.iter().all(|r| r.verified),
                latency_ns: mid.latency_ns,
                ratio_to_mk1: 0.0,
                runs: rs.iter().map(|r| r.matrices_per_s).collect(),
            }
        })
        .collect();
    let base = out
        .iter()
        .find(|s| s.system == "mk1")
        .map(|s| s.matrices_per_s);
    for s in &mut out {
        s.ratio_to_mk1 = match base {
            Some(b) if b > 0.0 => s.matrices_per_s / b,
            _ => 0.0,
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            workers: 2,
            inflight: 2,
            min_dim: 1,
            max_dim: 16,
            op: Op::default(),
            seed: 3,
            duration: Duration::from_millis(50),
            kernels: Kernels::detect(),
            exe: "/nonexistent".into(),
        }
    }

    #[test]
    fn in_process_baselines_verify_everything() {
        for r in [run_threads(&job()), run_inline(&job())] {
            assert!(r.verified, "{r:?}");
            assert!(r.matrices > 0 && r.matrices_per_s > 0.0);
        }
    }

    #[test]
    fn tally_counts_a_wrong_matrix() {
        let j = job();
        let mut t = Tally::new();
        let mut m = vec![0; 10];
        j.kernels.fill(fill_base(0, j.seed), &mut m);
        j.kernels.apply(j.op, &mut m);
        t.issued(Instant::now());
        t.check(&j, 0, &m, Instant::now());
        m[3] += 1;
        t.check(&j, 0, &m, Instant::now());
        let r = t.finish("x", 2);
        assert_eq!(r.matrices, 2);
        assert!(!r.verified);
    }

    #[test]
    fn summary_takes_the_median_and_the_ratio() {
        let run = |system, v: f64| SystemRun {
            system,
            matrices: 1,
            seconds: 1.0,
            matrices_per_s: v,
            gb_per_s: v,
            verified: true,
            latency_ns: Latency::default(),
        };
        let s = summarise(&[
            (
                "mk1",
                vec![run("mk1", 10.0), run("mk1", 30.0), run("mk1", 20.0)],
            ),
            (
                "pipe",
                vec![run("pipe", 1.0), run("pipe", 2.0), run("pipe", 9.0)],
            ),
        ]);
        assert_eq!(s[0].matrices_per_s, 20.0);
        assert_eq!(s[0].best_matrices_per_s, 30.0);
        assert_eq!(s[1].ratio_to_mk1, 0.1);
        assert_eq!(s[1].runs, [1.0, 2.0, 9.0]);
    }
}
