//! The monitor: starts worker processes from the running image, checks their handshake,
//! notices deaths (pidfd or exit pipe), gives up on workers stuck in the kernel, restarts,
//! enforces the stall watchdog, and shuts workers down in bounded time.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::layout::{Direction, WorkerState};
use crate::report::{Unreaped, WorkerExit};
use crate::shm::Segment;
use crate::sync::Ordering;
use crate::sys::{self, ChildProcess, ExitKind};
use crate::wait::{Doorbell, Futex};
use crate::worker::{WorkerSpec, EXIT_BAD_SEGMENT, WORKER_ENV};

use super::{Control, DeathNote, RunError, KILL_GRACE, KILL_WAIT, PAUSE_GAP, SHUTDOWN_GRACE};

/// A running worker process as the monitor sees it.
pub(crate) struct WorkerProc {
    pub(crate) child: ChildProcess,
    /// Answers this worker slot had pushed at the last change (from `flow_of`).
    pub(crate) progress: u64,
    /// When `progress` last changed (or the worker owed nothing).
    pub(crate) last_beat: Instant,
    /// When it was started.
    pub(crate) started: Instant,
    /// It reported `Running` with our build id.
    pub(crate) attached: bool,
    /// It owed nothing at the last look: work seen from now on starts the stall clock now,
    /// not at the last look (which may be long ago when the pool was idle).
    pub(crate) idle: bool,
    /// The monitor rang its doorbell at a look that found work owed and none back, and none
    /// has come back since: a stall is judged only then, so that a worker asleep on work
    /// published without a wake-up (`submit_deferred`, a map's unannounced slots) is woken,
    /// not killed, whatever the timeout.
    pub(crate) rung: bool,
    /// When SIGKILL was sent, and why (words for the report).
    pub(crate) killed: Option<(Instant, KillReason)>,
}

/// Why the monitor killed a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KillReason {
    /// It held tokens and made no progress for this long (`worker_timeout`, or the shutdown
    /// grace while draining).
    Stalled(Duration),
    /// A producer caught it breaking the protocol.
    Fault,
    /// It did not start properly (wrong build, no attach in time).
    Start(String),
}

/// The program to start as a worker, with its arguments and environment.
pub(crate) struct WorkerImage {
    exe: Exe,
    launch: sys::Launch,
}

/// How the program to re-execute as a worker is named.
enum Exe {
    /// The running program, held open: restarts run this very build, whatever happens to its
    /// path since.
    Running(OwnedFd),
    /// A program the caller named ([`Config::worker_exe`]), or the path of the current one where
    /// `/proc/self/exe` cannot be opened.
    Path(std::path::PathBuf),
}

impl WorkerImage {
    pub(crate) fn new(cfg: &Config) -> Result<WorkerImage, RunError> {
        let exe = WorkerImage::exe(cfg)?;
        Ok(WorkerImage {
            exe,
            launch: cfg.worker_launch.clone(),
        })
    }

    fn exe(cfg: &Config) -> Result<Exe, RunError> {
        if let Some(p) = &cfg.worker_exe {
            return Ok(Exe::Path(p.clone()));
        }
        match sys::open_running_image() {
            Ok(fd) => Ok(Exe::Running(fd)),
            Err(_) => std::env::current_exe()
                .map(Exe::Path)
                .map_err(|e| RunError::WorkerStart {
                    worker: 0,
                    exe: "current executable".into(),
                    why: e.to_string(),
                }),
        }
    }

    pub(crate) fn path(&self) -> std::path::PathBuf {
        match &self.exe {
            Exe::Running(fd) => sys::fd_path(fd.as_fd()),
            Exe::Path(p) => p.clone(),
        }
    }

    /// For messages: what the user knows the program as.
    pub(crate) fn describe(&self) -> String {
        match &self.exe {
            Exe::Running(_) => std::env::current_exe()
                .map_or_else(|_| "this program".into(), |p| p.display().to_string()),
            Exe::Path(p) => p.display().to_string(),
        }
    }
}

/// The workers' stderr: one pipe that every worker writes and the monitor drains to this
/// process's stderr, so that a worker stuck in the kernel holds only our pipe open, never the
/// user's terminal or pipeline.
///
/// The monitor does not write to stderr itself: a thread of its own does (`mk1-stderr`,
/// started with the first line; only where no thread can be started does the monitor write
/// itself, as a last resort), so a stderr that nobody reads (`prog 2>&1 | less` left at a
/// page, a stalled log collector, a terminal stopped with Ctrl-S) blocks that thread only,
/// never the monitor's watchdog, its restarts or a shutdown. While that thread is behind by
/// [`STDERR_BACKLOG`] bytes the monitor stops reading the pipe, so workers that keep writing
/// wait, as they would on the stderr itself; at shutdown what cannot be taken any more is
/// dropped, and said so once the stderr moves again.
pub(crate) struct WorkerStderr {
    read: OwnedFd,
    write: OwnedFd,
    /// What the workers show as `argv[0]` in `ps`.
    arg0: std::ffi::OsString,
    /// Lines for the writer thread.
    outbox: Arc<Outbox>,
}

/// Bytes of worker stderr waiting for the writer thread, at most.
const STDERR_BACKLOG: usize = 1 << 20;

/// How long a pool's end waits for the writer thread to write what is left: past this, the
/// thread is left to finish on its own (the stderr is not being read).
const STDERR_FLUSH_WAIT: Duration = Duration::from_secs(1);

/// What the monitor hands the writer thread.
#[derive(Default)]
struct Outbox {
    state: Mutex<OutState>,
    /// Something to write, or the end.
    more: Condvar,
    /// The writer has written what it took.
    wrote: Condvar,
}

#[derive(Default)]
struct OutState {
    /// Whole lines to write.
    lines: Vec<u8>,
    /// The writer is in a write.
    writing: bool,
    /// Bytes dropped at shutdown since the last note of it.
    dropped: u64,
    /// The pool is ending: the writer leaves once `lines` is written.
    closed: bool,
    /// The writer thread: started with the first line (None: not yet), or it could not be
    /// (false: the lines are written by the monitor itself, as a last resort).
    writer: Option<bool>,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer thread's loop.
    fn write_out(&self) {
        use std::io::Write;
        let mut batch = Vec::new();
        loop {
            {
                let mut st = self.lock();
                st.writing = false;
                self.wrote.notify_all();
                while st.lines.is_empty() && st.dropped == 0 && !st.closed {
                    st = self.more.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.lines.is_empty() && st.dropped == 0 {
                    return;
                }
                if st.dropped > 0 {
                    batch.extend_from_slice(
                        format!(
                            "mk1: {} bytes of the workers' stderr were dropped: this process's \
                             stderr was not being read\n",
                            st.dropped
                        )
                        .as_bytes(),
                    );
                    st.dropped = 0;
                }
                batch.append(&mut st.lines);
                st.writing = true;
            }
            let _ = std::io::stderr().write_all(&batch);
            batch.clear();
        }
    }
}

impl WorkerStderr {
    pub(crate) fn new() -> std::io::Result<WorkerStderr> {
        let (read, write) = sys::pipe()?;
        sys::set_nonblocking(read.as_fd())?;
        Ok(WorkerStderr {
            read,
            write,
            arg0: std::env::args_os().next().unwrap_or_else(|| "mk1".into()),
            outbox: Arc::new(Outbox::default()),
        })
    }

    /// Starts the writer thread, once (with the first line: a pool whose workers write
    /// nothing has none). Whether it runs.
    fn writer(&self, st: &mut OutState) -> bool {
        *st.writer.get_or_insert_with(|| {
            let theirs = self.outbox.clone();
            // (Not joined: see `Drop`.)
            std::thread::Builder::new()
                .name("mk1-stderr".into())
                .spawn(move || theirs.write_out())
                .is_ok()
        })
    }

    /// Hands every complete line the workers wrote to the writer thread; `pending` keeps a
    /// partial last line for next time, and what the writer has no room for yet (then the pipe
    /// is not read: the workers wait). Never blocks.
    pub(crate) fn forward(&self, pending: &mut Vec<u8>) {
        self.pass_on(pending, false);
    }

    /// As [`WorkerStderr::forward`], but what the writer has no room for is dropped (counted)
    /// and the pipe is read all the same: at shutdown, where a worker blocked on a full pipe
    /// could not exit.
    pub(crate) fn forward_or_drop(&self, pending: &mut Vec<u8>) {
        self.pass_on(pending, true);
    }

    fn pass_on(&self, pending: &mut Vec<u8>, drop_excess: bool) {
        // (Read while there is room: 64 KiB more at most, a pipe's worth.)
        if drop_excess || pending.len() < 64 << 10 {
            sys::read_available(self.read.as_fd(), pending);
        }
        // Whole lines, or everything once a line grows past 64 KiB (a worker writing without
        // newlines must not grow this without bound).
        let end = match pending.iter().rposition(|&b| b == b'\n') {
            Some(end) => end + 1,
            None if pending.len() > 64 << 10 => pending.len(),
            None => return,
        };
        let mut st = self.outbox.lock();
        if !self.writer(&mut st) {
            // No thread to be had (a sandbox that refuses them): written here, as a last
            // resort.
            drop(st);
            use std::io::Write;
            let _ = std::io::stderr().write_all(&pending[..end]);
            pending.drain(..end);
            return;
        }
        if st.lines.len() + end <= STDERR_BACKLOG {
            st.lines.extend_from_slice(&pending[..end]);
        } else if drop_excess {
            st.dropped += end as u64;
        } else {
            return;
        }
        drop(st);
        self.outbox.more.notify_one();
        pending.drain(..end);
    }

    /// Everything the workers wrote and nobody forwarded yet, as one line (for a start error).
    pub(crate) fn take_text(&self) -> String {
        let mut all = Vec::new();
        sys::read_available(self.read.as_fd(), &mut all);
        one_line(&String::from_utf8_lossy(&all))
    }
}

impl Drop for WorkerStderr {
    /// Lets the writer thread write what is left and end, waiting for that at most
    /// [`STDERR_FLUSH_WAIT`]: a stderr that nobody reads must not hold up the pool's end.
    fn drop(&mut self) {
        let mut st = self.outbox.lock();
        if st.writer != Some(true) {
            return;
        }
        st.closed = true;
        self.outbox.more.notify_one();
        let deadline = Instant::now() + STDERR_FLUSH_WAIT;
        while !st.lines.is_empty() || st.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .outbox
                .wrote
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Why a worker that is still running failed to start in `start_timeout`.
fn not_attached(start_timeout: Duration) -> String {
    format!(
        "it did not attach within {start_timeout:?} (its start includes the kernels' init \
         hooks, or a Python pool's initializer: one may be slow or hung; a longer start \
         timeout gives them more time)"
    )
}

/// `text` as one line for an error message: its lines joined with "; ", without blank lines
/// and Python's `^^^^` markers under a traceback's code, and said once where every worker
/// that started together wrote the same.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| matches!(c, '^' | '~' | ' ')))
        .collect();
    let n = lines.len();
    let once = (1..=n / 2)
        .find(|&p| n.is_multiple_of(p) && (p..n).all(|i| lines[i] == lines[i - p]))
        .unwrap_or(n);
    lines[..once].join("; ")
}

pub(crate) fn spawn_worker(
    image: &WorkerImage,
    stderr: &WorkerStderr,
    seg: &Segment,
    spec: WorkerSpec,
) -> std::io::Result<WorkerProc> {
    let child = ChildProcess::spawn(
        &image.path(),
        &image.launch,
        WORKER_ENV,
        &spec.encode(),
        &[seg.fd().as_raw_fd()],
        sys::Isolation {
            stderr: stderr.write.as_fd(),
            arg0: &stderr.arg0,
        },
    )?;
    let now = Instant::now();
    Ok(WorkerProc {
        child,
        progress: 0,
        last_beat: now,
        started: now,
        attached: false,
        idle: true,
        rung: false,
        killed: None,
    })
}

/// Starts `workers` workers and waits until each has attached. On failure, or when `give_up`
/// is set meanwhile, every one already started is killed and reaped, and the error says which
/// worker failed and why, with its own words when it wrote any.
pub(crate) fn start_workers(
    image: &WorkerImage,
    stderr: &WorkerStderr,
    seg: &Segment,
    workers: u32,
    start_timeout: Duration,
    give_up: &AtomicBool,
    spec: &dyn Fn(u32) -> WorkerSpec,
) -> Result<Vec<Option<WorkerProc>>, RunError> {
    let mut procs: Vec<Option<WorkerProc>> = Vec::with_capacity(workers as usize);
    let start_err = |w: u32, why: String| RunError::WorkerStart {
        worker: w,
        exe: image.describe(),
        why,
    };
    for w in 0..workers {
        match spawn_worker(image, stderr, seg, spec(w)) {
            Ok(p) => procs.push(Some(p)),
            Err(e) => {
                abandon(&mut procs);
                return Err(start_err(w, e.to_string()));
            }
        }
    }
    // (None: past what the clock can say, `Duration::MAX`: no limit.)
    let deadline = Instant::now().checked_add(start_timeout);
    for w in 0..workers {
        loop {
            let state = attach_state(seg, w);
            if state == Ok(true) {
                break;
            }
            if give_up.load(Ordering::Acquire) {
                abandon(&mut procs);
                return Err(start_err(w, "the start was given up".into()));
            }
            let wp = procs[w as usize].as_mut().expect("just spawned");
            let status = wp.child.try_reap().ok().flatten();
            if status.is_some() || state.is_err() || deadline.is_some_and(|d| Instant::now() > d) {
                // One line: the worker's own words go into it; without any, the likely cause.
                let said = stderr.take_text();
                // Workers share one stderr pipe: the words quoted first are the first worker's
                // they name, and when that worker ends too (given a moment: its exit may lag
                // its words), its failure is the one to report.
                let named = named_workers(&said);
                let (w, status, state) = match named.first() {
                    Some(&k) if k != w && (k as usize) < procs.len() => {
                        let wp = procs[k as usize].as_mut().expect("just spawned");
                        match wp.child.reap_within(Duration::from_millis(200)) {
                            Some(s) => (k, Some(s), attach_state(seg, k)),
                            None => (w, status, state),
                        }
                    }
                    _ => (w, status, state),
                };
                abandon(&mut procs);
                let why = match (status, state) {
                    (Some(s), _) if said.is_empty() => format!(
                        "it {s} before attaching to shared memory; a program used as the worker \
                         must call mk1::run_if_worker() (or run_if_worker_with) first thing in main"
                    ),
                    (Some(s), _) => format!("it {s} before attaching to shared memory"),
                    (None, Err(why)) => why,
                    (None, _) => not_attached(start_timeout),
                };
                let why = if said.is_empty() {
                    why
                } else {
                    format!("{why} (it said: {said})")
                };
                return Err(start_err(w, why));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(wp) = procs[w as usize].as_mut() {
            wp.attached = true;
        }
    }
    Ok(procs)
}

/// The workers `N` that each `mk1 worker N:` in `said` names (as a worker's own error lines
/// start), in order.
fn named_workers(said: &str) -> Vec<u32> {
    said.split("mk1 worker ")
        .skip(1)
        .filter_map(|rest| rest.split_once(':')?.0.parse().ok())
        .collect()
}

/// Whether the worker in slot `w` has attached; `Err` says why it is not acceptable (another
/// build answered the handshake).
/// A worker that attached and has since left (`Exited`) counts as attached: the segment
/// remembers what a process that is already gone did.
pub(crate) fn attach_state(seg: &Segment, w: u32) -> Result<bool, String> {
    let status = &seg.worker(w).status;
    let state = status.state.load(Ordering::Acquire);
    if state != WorkerState::Running as u32
        && state != WorkerState::Exited as u32
        && state != WorkerState::Retired as u32
    {
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

/// `(owed, progress)` of worker `w`: the tasks it holds (sent by the producers and not yet
/// answered), and the answers it has pushed so far, from the handles that have cleaned up after
/// the slot's last death (another's tokens are those the dead process held, which its
/// replacement is not to be blamed for).
///
/// Tokens sent and not yet back come from each producer's own counts, which no worker can
/// fake. Of those, the answers already pushed to its ring and not yet received do not count as
/// held: a handle whose caller is away holds its answers there, and a worker that has answered
/// everything is not hung. Those come from the ring's counters, which the worker writes, so they
/// are capped at what that handle has out (a worker that pushes more than it holds is caught
/// when the handle reads the ring, as any corrupt ring is). The progress is the sum of the
/// answers pushed: it moves only when the worker answers, not when a caller receives, and it
/// grows while the incarnation lives (each ring counted was zeroed before it was opened to it).
pub(crate) fn flow_of(ctl: &Control, seg: &Segment, w: usize) -> (u64, u64) {
    let epoch = ctl.death_epoch[w].load(Ordering::Acquire);
    let mut owed = 0u64;
    let mut pushed = 0u64;
    for (p, (f, acked)) in ctl.flow.iter().zip(&ctl.acked).enumerate() {
        if acked[w].load(Ordering::Acquire) != epoch {
            continue;
        }
        let out = f[w]
            .sent
            .load(Ordering::Relaxed)
            .saturating_sub(f[w].back.load(Ordering::Relaxed));
        let (ring, _) = seg.ring(p as u32, w as u32, Direction::FromWorker);
        let tail = ring.tail.count.load(Ordering::Acquire);
        let unread = tail.saturating_sub(ring.head.count.load(Ordering::Acquire));
        owed += out - unread.min(out);
        pushed = pushed.wrapping_add(tail);
    }
    (owed, pushed)
}

/// Kills every worker and waits (bounded) for each; used when a run is abandoned at start.
pub(crate) fn abandon(procs: &mut [Option<WorkerProc>]) {
    for wp in procs.iter_mut().flatten() {
        wp.child.kill_and_reap(KILL_WAIT);
    }
}

/// What the monitor knows and decides: every worker process, deaths, restarts, the watchdog.
pub(crate) struct Monitor<'a> {
    pub(crate) cfg: &'a Config,
    pub(crate) seg: &'a Segment,
    pub(crate) ctl: &'a Control,
    pub(crate) image: &'a WorkerImage,
    pub(crate) stderr: &'a WorkerStderr,
    /// A partial line of worker stderr not yet forwarded.
    pub(crate) stderr_pending: Vec<u8>,
    /// When the monitor first saw the run stopping.
    pub(crate) stop_seen: Option<Instant>,
    /// When [`Monitor::watch`] last looked (to tell a pause of the whole pool from a stall).
    pub(crate) last_watch: Option<Instant>,
    pub(crate) spec: &'a dyn Fn(u32) -> WorkerSpec,
    pub(crate) start: Instant,
    pub(crate) procs: Vec<Option<WorkerProc>>,
    /// Processes sent SIGKILL that have not exited yet but can run no code of their own (see
    /// [`KILL_GRACE`]); their tokens are already reclaimed. Reaped when the kernel lets them go.
    pub(crate) undying: Vec<(u32, ChildProcess)>,
    pub(crate) exits: Vec<WorkerExit>,
    /// `(worker, death)` of each record in `exits`, to add the tokens producers took back
    /// after that death (`Control::reclaimed`) to it.
    exit_deaths: Vec<(u32, usize)>,
    pub(crate) restarts: u32,
    pub(crate) faults: u32,
    pub(crate) interrupted: Option<String>,
    pub(crate) pending_restart: Vec<u32>,
    pub(crate) gone_for_good: Vec<bool>,
    /// Set when slot `w`'s last start failed: it is not tried again.
    pub(crate) start_failed: Vec<Option<String>>,
    /// Set when slot `w`'s process retired itself quietly
    /// ([`crate::worker::retire_after_this_task`] with no reason): its replacement is not
    /// charged to `max_restarts`, which bounds deaths.
    pub(crate) retired: Vec<bool>,
    /// Of `restarts`, the replacements of retired workers.
    pub(crate) retirements: u32,
    /// Once the run stops, a silent worker is waited for at most `SHUTDOWN_GRACE` (a run
    /// draining after Ctrl-C); a pool keeps its worker timeout for the work still to do.
    pub(crate) short_drain: bool,
}

impl<'a> Monitor<'a> {
    /// A monitor of the workers `procs` (as [`start_workers`] returned them) of `seg`.
    pub(crate) fn new(
        cfg: &'a Config,
        seg: &'a Segment,
        ctl: &'a Control,
        image: &'a WorkerImage,
        stderr: &'a WorkerStderr,
        spec: &'a dyn Fn(u32) -> WorkerSpec,
        procs: Vec<Option<WorkerProc>>,
    ) -> Monitor<'a> {
        let workers = procs.len();
        Monitor {
            cfg,
            seg,
            ctl,
            image,
            stderr,
            stderr_pending: Vec::new(),
            stop_seen: None,
            last_watch: None,
            spec,
            start: Instant::now(),
            procs,
            undying: Vec::new(),
            exits: Vec::new(),
            exit_deaths: Vec::new(),
            restarts: 0,
            faults: 0,
            interrupted: None,
            pending_restart: Vec::new(),
            gone_for_good: vec![false; workers],
            start_failed: vec![None; workers],
            retired: vec![false; workers],
            retirements: 0,
            short_drain: true,
        }
    }

    /// One round: wait up to a tick for a worker to exit, then reap, give up on stuck ones,
    /// restart the dead, and run the handshake and stall checks.
    pub(crate) fn tick(&mut self) {
        let workers = self.procs.len() as u32;
        let live: Vec<u32> = (0..workers)
            .filter(|&w| self.procs[w as usize].is_some())
            .collect();
        let fds: Vec<BorrowedFd<'_>> = live
            .iter()
            .map(|&w| {
                self.procs[w as usize]
                    .as_ref()
                    .expect("live")
                    .child
                    .exit_fd()
            })
            .chain(self.undying.iter().map(|(_, c)| c.exit_fd()))
            .collect();
        // While a killed worker is waited for, look again soon.
        let busy = self.procs.iter().flatten().any(|p| p.killed.is_some());
        let tick = if busy {
            Duration::from_millis(1)
        } else {
            super::MONITOR_TICK
        };
        let ready_idx = sys::poll_readable(&fds, tick).unwrap_or_default();
        drop(fds);
        let ready: Vec<u32> = ready_idx
            .iter()
            .filter_map(|&i| live.get(i).copied())
            .collect();
        self.stderr.forward(&mut self.stderr_pending);
        self.reap_exited(&ready);
        self.give_up_on_stuck();
        self.restart_dead();
        self.watch();
        self.add_reclaimed();
    }

    /// Wakes every producer handle that sleeps, to look at what the monitor just published.
    fn ring_producers(&self) {
        for p in 0..self.seg.layout().params().producers {
            Doorbell::new(&self.seg.producer(p).bell).ring(&Futex);
        }
    }

    /// Adds the tokens producers took back after each death to that death's record.
    pub(crate) fn add_reclaimed(&mut self) {
        let taken =
            std::mem::take(&mut *self.ctl.reclaimed.lock().unwrap_or_else(|e| e.into_inner()));
        for (w, death, n) in taken {
            if let Some(k) = self.exit_deaths.iter().position(|&e| e == (w, death)) {
                self.exits[k].reclaimed_tokens += n;
            }
        }
    }

    pub(crate) fn stop_with(&mut self, why: String) {
        self.interrupted.get_or_insert(why);
        self.ctl.stop.store(true, Ordering::Relaxed);
    }

    /// Worker `w` is gone (or can never run again): tell the producers, record how, and queue
    /// its restart. `wp` is its process record, already reaped or moved to `undying`.
    pub(crate) fn declare_dead(
        &mut self,
        w: u32,
        pid: u32,
        mut how_words: String,
        killed: Option<KillReason>,
        how: Option<ExitKind>,
    ) {
        let ctl = self.ctl;
        // The incarnation that died: the deaths of its slot before it started.
        let incarnation = ctl.death_epoch[w as usize].load(Ordering::Acquire);
        let faulted = ctl.kill[w as usize].load(Ordering::Acquire) == incarnation + 1;
        // (A quiet retirement says so twice: the worker's state, which only its retiring sets,
        // and its exit status; a function that merely exits 73 is a death.)
        self.retired[w as usize] = killed.is_none()
            && !faulted
            && how == Some(ExitKind::Exited(crate::worker::EXIT_RETIRED))
            && self.seg.worker(w).status.state.load(Ordering::Acquire)
                == WorkerState::Retired as u32;
        match &killed {
            Some(KillReason::Stalled(after)) => {
                how_words = format!("stalled for {after:?} and was killed; {how_words}");
            }
            Some(KillReason::Start(why)) => {
                self.start_failed[w as usize] = Some(why.clone());
            }
            Some(KillReason::Fault) => self.faults += 1,
            None if faulted || how == Some(ExitKind::Exited(EXIT_BAD_SEGMENT)) => self.faults += 1,
            None => {}
        }
        // Take (not just read) this process's reasons, and drop any left about earlier ones
        // of its slot (a handle that found a dead one's leftovers late): none concerns its
        // replacement.
        let reason = {
            let mut reasons = ctl.fault_reasons.lock().unwrap_or_else(|e| e.into_inner());
            let last = reasons
                .iter()
                .rev()
                .find(|&&(fw, inc, _)| (fw, inc) == (w, incarnation))
                .map(|(_, _, r)| r.clone());
            reasons.retain(|&(fw, inc, _)| fw != w || inc > incarnation);
            last
        };
        if let Some(r) = reason {
            how_words = format!("{r}; {how_words}");
        }
        let words = format!("worker {w} (pid {pid}) {how_words}");
        // Before the death is published: what the producers that had opened their rings to
        // this incarnation need to clean up after it, kept for each until it does (its
        // replacement starts without waiting for them, and overwrites the worker's status).
        let status = &self.seg.worker(w).status;
        let note = DeathNote {
            death: incarnation + 1,
            current: status.current.load(Ordering::Relaxed),
            current_item: status.current_item.load(Ordering::Relaxed),
            stalled: matches!(killed, Some(KillReason::Stalled(_))),
            how: words,
        };
        for (acked, notes) in ctl.acked.iter().zip(&ctl.notes) {
            if acked[w as usize].load(Ordering::Acquire) == incarnation {
                *notes[w as usize].lock().unwrap_or_else(|e| e.into_inner()) = Some(note.clone());
            }
        }
        ctl.alive[w as usize].store(false, Ordering::Release);
        ctl.death_epoch[w as usize].fetch_add(1, Ordering::AcqRel);
        ctl.changes.fetch_add(1, Ordering::AcqRel);
        self.ring_producers();
        // (Deaths only: a pool that replaces its workers every few tasks on purpose would
        // otherwise keep a record of each, without bound.)
        if !self.retired[w as usize] {
            self.exit_deaths.push((w, incarnation + 1));
            self.exits.push(WorkerExit {
                worker: w,
                pid,
                how: how_words,
                noticed_ms: self.start.elapsed().as_secs_f64() * 1e3,
                reclaimed_tokens: 0,
            });
        }
        self.pending_restart.push(w);
    }

    /// Reaps the workers whose exit fds are readable.
    pub(crate) fn reap_exited(&mut self, ready: &[u32]) {
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
            let attached = wp.attached || attach_state(self.seg, w) == Ok(true);
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
    pub(crate) fn kill(&mut self, w: usize, why: KillReason) {
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
    pub(crate) fn give_up_on_stuck(&mut self) {
        for w in 0..self.procs.len() {
            let Some(wp) = &self.procs[w] else { continue };
            let Some((at, _)) = &wp.killed else { continue };
            if at.elapsed() < KILL_GRACE || self.ctl.abandoned[w].load(Ordering::Acquire) {
                continue;
            }
            let pid = wp.child.pid();
            if !sys::runs_no_more_code(pid) {
                // Neither pending nor exiting: the signal was lost. Send it again.
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
                     kernel, running no code of its own); its tokens were reclaimed without \
                     waiting"
                ),
                killed,
                None,
            );
        }
    }

    /// Worker `w` could not be killed (see [`Monitor::give_up_on_stuck`]).
    fn abandoned(&self, w: u32) -> bool {
        self.ctl.abandoned[w as usize].load(Ordering::Acquire)
    }

    /// Starts replacements for dead workers, at once: a replacement does not wait for the
    /// producer handles to clean up after the death (one that is not calling in would hold
    /// it back for as long), but serves each handle's rings only once that handle has (see
    /// [`HeadLine::open_for`](crate::layout::HeadLine::open_for)).
    pub(crate) fn restart_dead(&mut self) {
        let pending = std::mem::take(&mut self.pending_restart);
        for w in pending {
            let ctl = self.ctl;
            if self.abandoned(w) {
                // Could not be killed: its tokens were given up; never restarted.
                continue;
            }
            // A worker that will never be restarted is given up at once, before the producers
            // have cleaned up after it: with no worker left, their loans and submits say so
            // from now on instead of sending to nobody.
            if !self.gone_for_good[w as usize] {
                let never = if let Some(why) = &self.start_failed[w as usize] {
                    // Refused once: a program that cannot serve would only fail again.
                    Some(format!(
                        "cannot restart worker {w} ({}): {why}",
                        self.image.describe()
                    ))
                } else if self.restarts - self.retirements >= self.cfg.max_restarts
                    && !self.retired[w as usize]
                {
                    Some(format!(
                        "more than {} worker restarts",
                        self.cfg.max_restarts
                    ))
                } else {
                    None
                };
                if let Some(why) = never {
                    self.stop_with(why);
                    self.gone_for_good[w as usize] = true;
                }
            }
            if self.gone_for_good[w as usize] {
                continue;
            }
            let ws = self.seg.worker(w);
            ws.bell.sleeping.store(0, Ordering::Relaxed);
            ws.bell.cpu.store(0, Ordering::Relaxed);
            ws.status.heartbeat.store(0, Ordering::Relaxed);
            ws.status.build.store(0, Ordering::Relaxed);
            ws.status
                .current
                .store(crate::layout::NO_TASK, Ordering::Relaxed);
            ws.status
                .current_item
                .store(crate::layout::NO_ITEM, Ordering::Relaxed);
            ws.status
                .state
                .store(WorkerState::Empty as u32, Ordering::Relaxed);
            // (A producer's request to kill the dead process, made after it was reaped, names
            // that incarnation: it does not kill the replacement.)
            let mut spec = (self.spec)(w);
            spec.gate = ctl.gate(w, ctl.death_epoch[w as usize].load(Ordering::Acquire));
            match spawn_worker(self.image, self.stderr, self.seg, spec) {
                Ok(p) => {
                    self.restarts += 1;
                    if std::mem::take(&mut self.retired[w as usize]) {
                        self.retirements += 1;
                    }
                    self.procs[w as usize] = Some(p);
                    ctl.alive[w as usize].store(true, Ordering::Release);
                    ctl.changes.fetch_add(1, Ordering::AcqRel);
                    // A handle asleep with work for no worker left sends it now.
                    self.ring_producers();
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
    pub(crate) fn watch(&mut self) {
        let now = Instant::now();
        self.forgive_pause(now);
        for w in 0..self.procs.len() {
            // While draining after a stop, a silent worker is not waited for longer than the
            // shutdown grace: Ctrl-C with a stuck worker ends in bounded time.
            // Measured from the stop at the earliest, so a healthy worker in the middle of a
            // long batch is not killed the moment Ctrl-C arrives.
            let stopping = self.ctl.stop.load(Ordering::Relaxed);
            if stopping && self.stop_seen.is_none() {
                self.stop_seen = Some(now);
            }
            let timeout = if stopping && self.short_drain {
                self.cfg.worker_timeout.min(SHUTDOWN_GRACE)
            } else {
                self.cfg.worker_timeout
            };
            let stop_seen = self.stop_seen;
            let (seg, ctl) = (self.seg, self.ctl);
            let Some(wp) = &mut self.procs[w] else {
                continue;
            };
            if wp.killed.is_some() {
                continue;
            }
            let mut action = None;
            if !wp.attached {
                match attach_state(seg, w as u32) {
                    Ok(true) => {
                        // The stall clock starts when it can serve, not when it was started.
                        wp.attached = true;
                        wp.last_beat = now;
                    }
                    Ok(false) if now - wp.started > self.cfg.start_timeout => {
                        action = Some(KillReason::Start(not_attached(self.cfg.start_timeout)));
                    }
                    Ok(false) => {}
                    Err(why) => action = Some(KillReason::Start(why)),
                }
            }
            if action.is_none()
                && ctl.kill[w].load(Ordering::Acquire)
                    == ctl.death_epoch[w].load(Ordering::Acquire) + 1
            {
                action = Some(KillReason::Fault);
            }
            if action.is_none() && wp.attached {
                let (owed, pushed) = flow_of(ctl, seg, w);
                if pushed != wp.progress || owed == 0 || wp.idle {
                    wp.idle = owed == 0;
                    wp.progress = pushed;
                    wp.last_beat = now;
                    wp.rung = false;
                } else if wp.rung
                    && now - stop_seen.map_or(wp.last_beat, |t| t.max(wp.last_beat)) > timeout
                {
                    action = Some(KillReason::Stalled(timeout));
                } else {
                    // Work is owed and none came back since the last look: the worker may be
                    // asleep on a task published without a wake-up
                    // (`Producer::submit_deferred`, a map's slots sent between its rings)
                    // whose caller has not called in since. Ringing costs one
                    // read-modify-write when it is awake.
                    Doorbell::new(&seg.worker(w as u32).bell).ring(&Futex);
                    wp.rung = true;
                }
            }
            if let Some(why) = action {
                self.kill(w, why);
            }
        }
    }

    /// A monitor that did not look for [`PAUSE_GAP`] or more was not running: the whole
    /// process group was stopped (Ctrl-Z, `docker pause`, a cgroup freezer, a suspended VM).
    /// Its workers were stopped as long, so that time is not held against them: the stall and
    /// start clocks move forward by the gap.
    fn forgive_pause(&mut self, now: Instant) {
        let gap = self
            .last_watch
            .replace(now)
            .map_or(Duration::ZERO, |before| {
                now.saturating_duration_since(before)
            });
        if gap < PAUSE_GAP {
            return;
        }
        for wp in self.procs.iter_mut().flatten() {
            wp.last_beat += gap;
            wp.started += gap;
        }
        if let Some(t) = &mut self.stop_seen {
            *t += gap;
        }
    }

    /// Asks every worker to leave, waits [`SHUTDOWN_GRACE`], kills the rest, and waits
    /// [`KILL_WAIT`] more. Whatever is still there then is stuck in the kernel: it is named in
    /// the report rather than waited for.
    pub(crate) fn shut_down(&mut self) -> Vec<Unreaped> {
        // (Handles gone by now have cleaned up after every death they had to.)
        self.add_reclaimed();
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
            // Keep the workers' stderr flowing: one blocked on a full pipe cannot exit.
            self.stderr.forward_or_drop(&mut self.stderr_pending);
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
                why: if self.ctl.abandoned[worker as usize].load(Ordering::Acquire) {
                    "the kernel refused to kill it; it ends with this process (parent-death \
                     signal)"
                        .into()
                } else {
                    "SIGKILL is pending: it runs no more code of its own, and init reaps it when \
                     the kernel lets it go"
                        .into()
                },
            })
            .collect();
        left.sort_by_key(|u| u.worker);
        // (Handles left after `Pool::terminate` may have taken tokens back meanwhile.)
        self.add_reclaimed();
        left
    }
}

#[cfg(test)]
mod tests {
    use super::{named_workers, one_line};

    #[test]
    fn a_start_error_names_the_worker_whose_words_it_quotes() {
        assert_eq!(
            named_workers("mk1 worker 1: its initializer failed: x"),
            [1]
        );
        assert_eq!(
            named_workers("Traceback:; ValueError: y; mk1 worker 12: z; mk1 worker 3: z"),
            [12, 3]
        );
        assert_eq!(
            named_workers("mk1 worker: this program ...; mk1 worker 2: x"),
            [2]
        );
        assert!(named_workers("RuntimeError: no words of mk1").is_empty());
    }

    #[test]
    fn start_errors_read_as_one_line_said_once() {
        let tb = "Traceback:\n  File \"s.py\", line 4\n    with Pool():\n    ^^^^^^\n\nRuntimeError: x\n";
        assert_eq!(
            one_line(tb),
            "Traceback:; File \"s.py\", line 4; with Pool():; RuntimeError: x"
        );
        assert_eq!(one_line(&tb.repeat(3)), one_line(tb));
        assert_eq!(one_line("a\nb\na\n"), "a; b; a");
        assert_eq!(one_line("a\na\n"), "a");
        assert_eq!(one_line(""), "");
    }
}
