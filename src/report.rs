//! What a run reports: one [`Report`], printed as the seed-style summary or as JSON.

use std::fmt;

use serde::Serialize;

/// Token round-trip latency (producer push to producer pop), nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest seen.
    pub max: u64,
}

/// A matrix whose result did not match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failure {
    /// Its sequence number.
    pub seq: u64,
    /// Worker slot that processed it.
    pub worker: u32,
    /// First wrong element (row-major index).
    pub index: u64,
    /// What it should have been.
    pub expected: i32,
    /// What it was.
    pub got: i32,
}

/// A worker process that ended before the run did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerExit {
    /// Worker slot.
    pub worker: u32,
    /// Its pid.
    pub pid: u32,
    /// How it ended, in words.
    pub how: String,
    /// Milliseconds since the run started when the coordinator noticed.
    pub noticed_ms: f64,
    /// Tokens reclaimed from it (summed over producers).
    pub reclaimed_tokens: u64,
}

/// The outcome of one run. `--json` prints exactly this.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Always "mk1".
    pub system: &'static str,
    /// Matrices returned and checked (passed or failed).
    pub matrices: u64,
    /// True iff at least one matrix completed, none failed and none was lost.
    pub verified: bool,
    /// Matrices whose result was wrong.
    pub failed: u64,
    /// Matrices issued that never came back checked.
    pub lost: u64,
    /// Matrices filled and sent again because their worker died.
    pub redone: u64,
    /// First issue to last return, seconds.
    pub seconds: f64,
    /// `matrices / seconds`.
    pub matrices_per_s: f64,
    /// Payload (rows·cols·4 of verified matrices) per second, 1e9 bytes.
    pub gb_per_s: f64,
    /// Worker processes.
    pub workers: u32,
    /// Producer threads.
    pub producers: u32,
    /// Smallest dimension.
    pub min_dim: u32,
    /// Largest dimension.
    pub max_dim: u32,
    /// The op.
    pub op: String,
    /// Dispatch policy.
    pub dispatch: &'static str,
    /// Tokens in flight per worker.
    pub inflight: u32,
    /// Matrices per token allowed.
    pub batch: u32,
    /// Tokens that made the round trip.
    pub tokens: u64,
    /// `matrices / tokens`.
    pub matrices_per_token: f64,
    /// Kernel used for fill, op and verify.
    pub kernel: &'static str,
    /// Whether producers and workers were pinned to CPUs.
    pub pinned: bool,
    /// Bytes of shared memory.
    pub segment_bytes: u64,
    /// Matrices processed by each worker slot (sums to `matrices`).
    pub per_worker: Vec<u64>,
    /// Workers started again after dying.
    pub worker_restarts: u32,
    /// Workers ended because they broke the protocol (bad token, counters, descriptor).
    pub worker_faults: u32,
    /// Token round trip.
    pub latency_ns: Latency,
    /// The first failures (at most 16).
    pub failures: Vec<Failure>,
    /// Workers that ended early.
    pub worker_exits: Vec<WorkerExit>,
    /// Why the run ended early, if it did ("SIGINT", "too many worker restarts", …).
    pub interrupted: Option<String>,
    /// The signal number that stopped the run (SIGINT, SIGTERM or SIGHUP), if one did.
    pub signal: Option<i32>,
    /// Worker processes that were sent SIGKILL but had not exited when the run ended (stuck in
    /// the kernel: a frozen cgroup, a hung filesystem). They can run no code of their own; the
    /// kernel ends them when it releases them, and init reaps them.
    pub unreaped: Vec<Unreaped>,
}

/// A worker that would not die (see [`Report::unreaped`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Unreaped {
    /// Worker slot.
    pub worker: u32,
    /// Its pid.
    pub pid: u32,
    /// Its scheduler state when the run ended (`D` = stuck in the kernel), if readable.
    pub state: Option<char>,
    /// Why it is still there, in words.
    pub why: String,
}

impl Report {
    /// The process exit code, from this report alone: 1 if a matrix was wrong or lost, or the
    /// run stopped early for any reason but a signal (restart limit, a worker that could not be
    /// restarted, no workers left), or produced nothing; 128 + n if signal n stopped it after a
    /// clean drain (130 SIGINT, 143 SIGTERM, 129 SIGHUP); 0 if every matrix verified.
    pub fn exit_code(&self) -> u8 {
        let complete = self.failed == 0 && self.lost == 0;
        match (complete, self.signal, &self.interrupted) {
            (false, _, _) => 1,
            (true, Some(sig), _) => 128u8.saturating_add(sig.clamp(0, 127) as u8),
            (true, None, Some(_)) => 1,
            (true, None, None) if self.verified => 0,
            (true, None, None) => 1,
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Processed {} matrices in {:.2} seconds ({:.0} matrices/s, {:.2} GB/s payload), {} lost, {} failed",
            self.matrices, self.seconds, self.matrices_per_s, self.gb_per_s, self.lost, self.failed
        )?;
        writeln!(
            f,
            "token round trip: p50 {} ns, p99 {} ns, max {} ns; {} tokens, {:.1} matrices/token",
            self.latency_ns.p50,
            self.latency_ns.p99,
            self.latency_ns.max,
            self.tokens,
            self.matrices_per_token
        )?;
        let per: Vec<String> = self.per_worker.iter().map(u64::to_string).collect();
        writeln!(
            f,
            "{} workers [{}], {} producer(s), {} dims {}..={}, op {}, dispatch {}, kernel {}, {}",
            self.workers,
            per.join(" "),
            self.producers,
            if self.batch > 1 {
                format!("batch ≤{}", self.batch)
            } else {
                "unbatched".into()
            },
            self.min_dim,
            self.max_dim,
            self.op,
            self.dispatch,
            self.kernel,
            if self.pinned { "pinned" } else { "unpinned" },
        )?;
        if self.redone > 0 || self.worker_restarts > 0 || self.worker_faults > 0 {
            writeln!(
                f,
                "{} worker restart(s), {} fault(s), {} matrices redone",
                self.worker_restarts, self.worker_faults, self.redone
            )?;
        }
        for e in &self.worker_exits {
            writeln!(
                f,
                "  worker {} (pid {}) {} at {:.1} ms; {} token(s) reclaimed",
                e.worker, e.pid, e.how, e.noticed_ms, e.reclaimed_tokens
            )?;
        }
        for x in &self.failures {
            writeln!(
                f,
                "  FAILED: matrix seq {} from worker {}: element {} is {} , expected {}",
                x.seq, x.worker, x.index, x.got, x.expected
            )?;
        }
        for u in &self.unreaped {
            writeln!(
                f,
                "  worker {} (pid {}) was still there when the run ended (state {}): {}",
                u.worker,
                u.pid,
                u.state.unwrap_or('?'),
                u.why
            )?;
        }
        if let Some(why) = &self.interrupted {
            writeln!(f, "stopped early: {why}")?;
        }
        write!(
            f,
            "{}",
            match (self.verified, self.exit_code()) {
                (true, 0) => "verified",
                (true, 1) => "verified what was issued, but the run failed: it stopped early",
                (true, _) => "verified (stopped by a signal)",
                (false, _) => "NOT verified",
            }
        )
    }
}

/// The name a report gives the stopping signal `sig` (`interrupted`): SIGHUP, SIGINT,
/// SIGTERM, else "signal N".
pub fn signal_name(sig: usize) -> String {
    match sig {
        1 => "SIGHUP".into(),
        2 => "SIGINT".into(),
        15 => "SIGTERM".into(),
        s => format!("signal {s}"),
    }
}
