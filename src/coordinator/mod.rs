//! The engine's coordinator side, shared by every client of the segment: the monitor
//! (`monitor.rs`) that starts workers, notices deaths, restarts them and enforces the
//! watchdog, and the `Control` state through which it and the producer handles
//! (`client/producer.rs`) agree on who is alive. It knows nothing of what the arrays hold:
//! `mk1 run`'s fill and verify live in `job`, on the public API.
//!
//! Deaths (DESIGN invariant 3). The monitor holds a pidfd per worker (or, where pidfds are
//! refused, a pipe only the worker holds) and polls them, so it learns of an exit as it
//! happens. It notes for each handle what that handle will need to clean up (which task the
//! dead worker ran, whether it was killed for a timeout, how it ended), marks the worker dead,
//! bumps its death epoch, and starts a replacement at once. Each producer handle, on seeing the
//! new epoch (at its next call, however late), keeps what the dead worker had already
//! returned, takes back every other token it had sent there (redone or failed, by mode),
//! zeroes its own ring pair with that worker, acknowledges, and only then opens the pair to
//! the replacement (`HeadLine::open_for`): a worker serves a handle's rings only once they are
//! open to its own incarnation, so it never sees stale ring state, and a handle that does not
//! call in holds back neither the replacement nor the other handles. A handle that finds a
//! protocol violation (bad token, impossible ring counter) asks the monitor to kill that
//! incarnation of the worker, and the same path follows.

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
    /// `acked[p][w]`: the last death epoch of `w` producer `p` has cleaned up after (stored
    /// before the handle opens its rings to that incarnation: see
    /// [`HeadLine::open_for`](crate::layout::HeadLine::open_for)).
    pub(crate) acked: Vec<Vec<AtomicUsize>>,
    /// `notes[p][w]`: what producer `p` needs to clean up after the death of the incarnation
    /// of `w` it had opened its rings to. Written by the monitor before it publishes that death
    /// (for producers whose `acked` shows they had), taken by the producer when it cleans up,
    /// which may be long after the replacement started: the replacement overwrites the worker's
    /// own status.
    pub(crate) notes: Vec<Vec<Mutex<Option<DeathNote>>>>,
    /// Tokens producers took back after deaths, as `(worker, death, tokens)`: the monitor adds
    /// them to that death's record.
    pub(crate) reclaimed: Mutex<Vec<(u32, usize, u64)>>,
    /// `kill[w]`: one more than the incarnation of `w` a producer caught breaking the protocol
    /// (0: none). Raised with `fetch_max`, so a late request about an incarnation already
    /// replaced neither kills the replacement nor hides a request about it.
    pub(crate) kill: Vec<AtomicUsize>,
    /// Why, for the report (cold path): `(worker, incarnation, why)`.
    pub(crate) fault_reasons: Mutex<Vec<(u32, usize, String)>>,
    /// The keys of [`Control::gate`]: drawn at random when the pool starts, never in shared
    /// memory.
    gate_keys: std::hash::RandomState,
    /// Every worker is gone for good; producers give up on what is left.
    pub(crate) no_workers: AtomicBool,
    /// `abandoned[w]`: worker `w` could not be killed; producers give up its tokens as lost
    /// (the run has stopped issuing, so their slots are never reused).
    pub(crate) abandoned: Vec<AtomicBool>,
    /// `flow[p][w]`: tokens producer `p` has sent to worker `w` and has had back (returned or
    /// reclaimed). Process-local, written only by producer `p`, so no worker can make the
    /// watchdog count fewer tasks out than were sent (see `monitor::flow_of` for the answers
    /// it counts from the rings).
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
            notes: (0..producers)
                .map(|_| (0..workers).map(|_| Mutex::new(None)).collect())
                .collect(),
            reclaimed: Mutex::new(Vec::new()),
            kill: (0..workers).map(|_| AtomicUsize::new(0)).collect(),
            fault_reasons: Mutex::new(Vec::with_capacity(16)),
            gate_keys: std::hash::RandomState::new(),
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

impl Control {
    /// The value that opens a handle's rings to incarnation `epoch` of worker `w`
    /// ([`HeadLine::open_for`](crate::layout::HeadLine::open_for)): a keyed hash (SipHash, keys
    /// drawn at random, in this process only), never 0, the zeroed gate. The incarnation finds
    /// its own in its start-up spec; no earlier process can know it, so not even a stray write
    /// of a dying worker that lands on a gate lets a replacement in before its handle has
    /// cleaned up after that death.
    pub(crate) fn gate(&self, w: u32, epoch: usize) -> u64 {
        use std::hash::BuildHasher;
        self.gate_keys.hash_one((w, epoch as u64)) | 1
    }
}

/// What a producer needs to clean up after a worker's death (see [`Control::notes`]).
#[derive(Clone, Debug)]
pub(crate) struct DeathNote {
    /// Which death of the worker slot (its `death_epoch` once published).
    pub(crate) death: usize,
    /// The token word of the task it was running, or [`NO_TASK`](crate::layout::NO_TASK): a
    /// hint from the dead worker, as `WorkerStatus::current`.
    pub(crate) current: u64,
    /// Which array of that task ran, or [`NO_ITEM`](crate::layout::NO_ITEM) (a hint as well).
    pub(crate) current_item: u32,
    /// It was killed for running past the worker timeout.
    pub(crate) stalled: bool,
    /// How it ended, in words.
    pub(crate) how: String,
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
