//! The engine's coordinator side, shared by every client of the segment: the monitor
//! (`monitor.rs`) that starts workers, notices deaths, restarts them and enforces the
//! watchdog, and the `Control` state through which it and the producer handles
//! (`client/producer.rs`) agree on who is alive. It knows nothing of what the arrays hold:
//! `mk1 run`'s fill and verify live in `job`, on the public API.
//!
//! Deaths (DESIGN invariant 3). The monitor holds a pidfd per worker (or, where pidfds are
//! refused, a pipe only the worker holds) and polls them, so it learns of an exit as it
//! happens. It marks the worker dead and bumps its death epoch; each producer handle, on
//! seeing the new epoch, keeps what the dead worker had already returned, takes back every
//! other token it had sent there (redone or failed, by mode), resets its own ring pair with
//! that worker, and acknowledges. Only when every handle has acknowledged does the monitor
//! start a replacement, so the new process never sees stale ring state. A handle that finds a
//! protocol violation (bad token, impossible ring counter) asks the monitor to kill the
//! worker, and the same path follows.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::ConfigError;
use crate::shm::ShmCreateError;
use crate::sync::AtomicU64;

pub(crate) mod monitor;

pub(crate) use monitor::*;

/// How often the monitor looks at heartbeats and reports progress, at most.
pub(crate) const MONITOR_TICK: Duration = Duration::from_millis(20);
/// A monitor that did not run for this long (ten ticks) was stopped with its workers, not
/// slow: the time is not counted against their stall clocks (see `Monitor::watch`).
pub(crate) const PAUSE_GAP: Duration = Duration::from_millis(200);
/// How long workers get to exit after shutdown is requested before they are killed.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// A worker's default time from start to attach ([`crate::Config::start_timeout`]).
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// A worker sent SIGKILL that still has it pending after this long is stuck in the kernel; its
/// tokens are reclaimed without waiting for it to exit.
pub(crate) const KILL_GRACE: Duration = Duration::from_millis(200);
/// How long shutdown waits for killed workers before naming them and returning.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(1);

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

/// State shared between the monitor and the producer threads (process-local).
pub(crate) struct Control {
    /// Stop issuing new matrices.
    pub(crate) stop: AtomicBool,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_clock_moves_forward() {
        let a = crate::clock::now();
        std::thread::sleep(Duration::from_millis(2));
        assert!(crate::clock::now() > a);
    }
}
