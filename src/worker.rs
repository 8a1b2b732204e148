//! The worker role: its own process, started by re-executing the program with [`WORKER_ENV`]
//! set. It attaches the inherited segment, then loops: pop a token from each producer's ring,
//! validate it and its descriptor, apply the op in place to every matrix in the slot, push the
//! token back, ring the producer's doorbell if it sleeps.
//!
//! A worker trusts nothing it reads from the segment: a bad token, descriptor or ring counter
//! ends it with [`WorkerError`] and exit status [`EXIT_BAD_SEGMENT`]; the coordinator then
//! reclaims its tokens. It exits on its own when the coordinator dies (parent-death signal, and a
//! parent check whenever a sleep times out).

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use crate::layout::{Direction, WorkerState, DONE_OK, NO_ITEM, NO_TASK, TASK_OK};
use crate::ops::{Kernel, Kernels};
use crate::pool::{BadToken, Token};
use crate::ring::{PushError, RingConsumer, RingError, RingProducer};
use crate::shm::{Segment, ShmAttachError, TaskBuffers};
use crate::sync::Ordering;
use crate::sys;
use crate::task::exec::Executor;
use crate::task::{Registry, WorkerInfo};
use crate::wait::{same_cpu_partner, Backoff, Doorbell, Futex, SpinMode, Step, SAME_CPU_YIELDS};

/// Environment variable that turns a process into a worker:
/// `fd,index,coordinator_pid,kernel,cpu,spin,tasks` (`cpu` is `-` for no pinning; `spin` is a
/// [`SpinMode`] code; `tasks` is `-` for the synthetic job, else the hex fingerprint of the
/// kernel registry the worker must have).
pub const WORKER_ENV: &str = "MK1_WORKER";

/// This build's identity: a hash of the crate's sources and version, made by `build.rs`. A
/// worker publishes it at attach and the coordinator refuses any other, so a program replaced
/// on disk, or a worker program built from other sources, is a clear start failure.
pub const BUILD_ID: u64 = parse_build_id(env!("MK1_BUILD_ID"));

const fn parse_build_id(hex: &str) -> u64 {
    let b = hex.as_bytes();
    let mut v = 0u64;
    let mut i = 0;
    while i < b.len() {
        let d = match b[i] {
            c @ b'0'..=b'9' => c - b'0',
            c @ b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("MK1_BUILD_ID is lower-case hex"),
        };
        v = (v << 4) | d as u64;
        i += 1;
    }
    v
}

/// What a worker says when its kernels are not the pool's: the pool adds its own to the
/// start error it finds this in (the worker knows only their fingerprint).
pub(crate) const OTHER_KERNELS: &str = "are not the pool's";

/// Exit status of a worker whose spec was unusable (its kernels, its index, its registry).
pub const EXIT_BAD_SPEC: i32 = 70;
/// Exit status of a worker that found invalid data in the segment.
pub const EXIT_BAD_SEGMENT: i32 = 71;
/// Exit status of a worker whose coordinator went away.
pub const EXIT_ORPHANED: i32 = 72;
/// Exit status of a worker that a kernel retired ([`retire_after_this_task`]).
pub const EXIT_RETIRED: i32 = 73;

/// Why this worker process is to end after its current task, once a kernel said so.
static RETIRE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
/// This process is an mk1 worker: set by [`serve_and_exit`] (after [`run_if_worker_with`] took
/// [`WORKER_ENV`] out of the environment), so that a pool started in it is still refused.
static IN_WORKER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// This worker process is to end after its current task, quietly (a reason set in `RETIRE`
/// too, before or after, is still written).
static RETIRE_QUIETLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// This worker's slot regions, (address, bytes) each, for [`revoke_in_forked_child`].
static SLOTS: std::sync::OnceLock<[(usize, usize); 2]> = std::sync::OnceLock::new();

/// Runs in the child of a `fork()` made in a worker (by a kernel, or a library it calls):
/// the child is not a worker, but it shares the segment, and whatever it runs on (the kernel's
/// code returning, a Python function writing its result) would write slots that the pool
/// hands to other tasks once the worker has answered: a wrong result for one of them. So the
/// child loses access to every slot first; a write there faults in the child alone.
extern "C" fn revoke_in_forked_child() {
    if let Some(slots) = SLOTS.get() {
        for &(at, len) in slots {
            // SAFETY: the slots of this process's segment mapping, which no code of the child
            // may use: it is not a worker (its kernel-side views fault, ending it). An error
            // (none is expected) leaves the child as it was before this guard existed.
            let _ = unsafe { sys::protect_none_at(at, len) };
        }
    }
}

/// Called by a kernel in a worker process: this process ends as soon as the task running now
/// has been answered (its results, or the error the kernel returns, reach the caller first),
/// and the pool starts a replacement, as after a death (it counts as a restart); tasks already
/// queued for this worker go to the others. For a kernel that finds its process unfit to go
/// on: state it can no longer trust, or a view of shared memory that escaped the call (the
/// Python bindings retire a worker whose function kept its input or output array). `why` is
/// written to stderr with the worker's last words, and its replacement is charged to
/// [`PoolBuilder::max_restarts`](crate::PoolBuilder::max_restarts) as after a death. An empty
/// `why` retires quietly: a planned replacement (a limit of tasks per process, say), not
/// charged. Outside a worker it does nothing.
pub fn retire_after_this_task(why: impl Into<String>) {
    let why = why.into();
    if why.is_empty() {
        RETIRE_QUIETLY.store(true, std::sync::atomic::Ordering::Relaxed);
    } else {
        let _ = RETIRE.set(why);
    }
}

/// Why this worker process retires after its task, if it does ("" when quietly).
fn retiring() -> Option<&'static str> {
    RETIRE.get().map(String::as_str).or_else(|| {
        RETIRE_QUIETLY
            .load(std::sync::atomic::Ordering::Relaxed)
            .then_some("")
    })
}

/// Tokens taken from one producer's ring before looking at the next (fairness between
/// producers, and a bound on how long a doorbell waits to be rung).
const BURST: usize = 16;
/// Longest sleep between liveness checks of the coordinator.
const SLEEP: Duration = Duration::from_millis(100);

/// Fault injection for tests, from the `MK1_CHAOS` environment variable: `KIND:N[@W]` makes
/// worker slot `W` (every worker if omitted) misbehave once it has processed `N` tokens. Kinds:
/// `wrong` flips one element of every N-th token, `exit` exits with status 99, `stall` stops
/// consuming (holding its tokens), `fake` stops consuming but keeps its heartbeat moving,
/// `header` writes the shutdown flag in the header, `badtoken` pushes back a forged token,
/// `foreign` (checked at attach, `N` ignored) claims another build id when the file named by
/// `MK1_CHAOS_FOREIGN_IF` exists. Never set in normal use; `tests/reliability.rs` uses it to
/// prove the coordinator copes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chaos {
    None,
    Wrong(u64),
    Exit(u64),
    Stall(u64),
    Fake(u64),
    Header(u64),
    BadToken(u64),
    Foreign,
}

impl Chaos {
    fn from_env(index: u32) -> Chaos {
        let Ok(v) = std::env::var("MK1_CHAOS") else {
            return Chaos::None;
        };
        let (spec, only) = match v.split_once('@') {
            Some((s, w)) => (s, w.parse::<u32>().ok()),
            None => (v.as_str(), None),
        };
        if only.is_some_and(|w| w != index) {
            return Chaos::None;
        }
        let Some((kind, n)) = spec.split_once(':') else {
            return Chaos::None;
        };
        let Ok(n) = n.parse::<u64>() else {
            return Chaos::None;
        };
        let n = n.max(1);
        match kind {
            "wrong" => Chaos::Wrong(n),
            "exit" => Chaos::Exit(n),
            "stall" => Chaos::Stall(n),
            "fake" => Chaos::Fake(n),
            "header" => Chaos::Header(n),
            "badtoken" => Chaos::BadToken(n),
            "foreign" => Chaos::Foreign,
            _ => Chaos::None,
        }
    }

    /// Applies the fault after the op ran on `token`; returns the word to push back.
    fn strike(
        self,
        seen: u64,
        seg: &Segment,
        index: u32,
        token: &mut Token,
        task: &crate::layout::TaskDesc,
    ) -> Option<u64> {
        match self {
            Chaos::Wrong(n) if seen.is_multiple_of(n) => {
                // One bit of the first result's first element (a real worker's wrong answer).
                let at = task.items[0].offset as usize;
                let out = match seg.task_buffers(token) {
                    TaskBuffers::InPlace(b) => b,
                    TaskBuffers::OutOfPlace(_, o) => o,
                };
                if let Some(b) = out.get_mut(at) {
                    *b ^= 0x10;
                }
                None
            }
            Chaos::Exit(n) if seen == n => std::process::exit(99),
            Chaos::Stall(n) if seen >= n => loop {
                std::thread::sleep(Duration::from_secs(1));
            },
            // Writes the header's shutdown flag, which would stop every other worker; the
            // header page is read-only in workers, so this faults the writer instead.
            Chaos::Header(n) if seen == n => {
                seg.shutdown_flag().store(1, crate::sync::Ordering::Release);
                None
            }
            // Looks busy (its self-reported heartbeat keeps moving) but returns nothing.
            Chaos::Fake(n) if seen >= n => loop {
                seg.worker(index)
                    .status
                    .heartbeat
                    .fetch_add(1, crate::sync::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(1));
            },
            Chaos::BadToken(n) if seen == n => Some(u64::from(token.slot()) | (0xdead << 32)),
            _ => None,
        }
    }
}

/// How a worker is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerSpec {
    /// The inherited segment fd.
    pub fd: i32,
    /// Worker slot.
    pub index: u32,
    /// Pid of the coordinator (our parent).
    pub coordinator: u32,
    /// Kernel to run ops with.
    pub kernel: Kernel,
    /// CPU to pin to.
    pub cpu: Option<usize>,
    /// How long waiting may spin (decided by the coordinator, which sees the whole machine; a
    /// pinned worker's own affinity shows one CPU).
    pub spin: SpinMode,
    /// The fingerprint of the pool's kernel registry ([`Registry::fingerprint`]).
    pub tasks: u64,
    /// The value that opens a producer handle's rings to this process, which is one
    /// incarnation of its slot ([`HeadLine::open_for`](crate::layout::HeadLine::open_for)): it
    /// serves a handle's rings only once that handle has stored this there.
    pub gate: u64,
}

impl WorkerSpec {
    /// The value of [`WORKER_ENV`].
    pub fn encode(&self) -> String {
        let cpu = self.cpu.map_or("-".to_string(), |c| c.to_string());
        let spin = self.spin.code();
        format!(
            "{},{},{},{},{cpu},{spin},{:x},{:x}",
            self.fd,
            self.index,
            self.coordinator,
            self.kernel.name(),
            self.tasks,
            self.gate
        )
    }

    /// Parses the value of [`WORKER_ENV`].
    pub fn parse(s: &str) -> Option<WorkerSpec> {
        let mut it = s.split(',');
        let fd = it.next()?.parse().ok()?;
        let index = it.next()?.parse().ok()?;
        let coordinator = it.next()?.parse().ok()?;
        let kname = it.next()?;
        let kernel = Kernel::ALL.into_iter().find(|k| k.name() == kname)?;
        let cpu = match it.next()? {
            "-" => None,
            c => Some(c.parse().ok()?),
        };
        let spin = SpinMode::from_code(it.next()?.parse().ok()?)?;
        let tasks = u64::from_str_radix(it.next()?, 16).ok()?;
        let gate = u64::from_str_radix(it.next()?, 16).ok()?;
        if it.next().is_some() {
            return None;
        }
        Some(WorkerSpec {
            fd,
            index,
            coordinator,
            kernel,
            cpu,
            spin,
            tasks,
            gate,
        })
    }
}

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The segment could not be attached.
    #[error("cannot attach the segment: {0}")]
    Attach(#[from] ShmAttachError),
    /// The worker index is not in the segment.
    #[error("worker index {index} but the segment has {workers} workers")]
    Index {
        /// Index given.
        index: u32,
        /// Workers in the segment.
        workers: u32,
    },
    /// A ring's counters were invalid.
    #[error("ring from producer {producer}: {source}")]
    Ring {
        /// Producer index.
        producer: u32,
        /// The error.
        source: RingError,
    },
    /// A popped token was invalid.
    #[error("ring from producer {producer}: {source}")]
    Token {
        /// Producer index.
        producer: u32,
        /// The error.
        source: BadToken,
    },
    /// A slot descriptor was invalid.
    #[error("slot {slot}: invalid descriptor: {why}")]
    Descriptor {
        /// Slot index.
        slot: u32,
        /// What was wrong.
        why: String,
    },
    /// The return ring was full: more tokens arrived than exist.
    #[error("return ring to producer {0} is full: more tokens in circulation than slots")]
    Overflow(u32),
    /// The kernel is not available (a spec from a different machine).
    #[error("{0}")]
    Kernel(#[from] crate::ops::KernelUnavailable),
    /// The coordinator is gone.
    #[error("coordinator (pid {0}) is gone")]
    Orphaned(u32),
    /// A system call failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// This program's kernels are not the pool's, or one's init hook failed.
    #[error("{0}")]
    Kernels(String),
    /// A kernel retired this worker ([`retire_after_this_task`]).
    #[error("retired after its task: {0}")]
    Retired(String),
}

impl WorkerError {
    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            WorkerError::Orphaned(_) => EXIT_ORPHANED,
            WorkerError::Retired(_) => EXIT_RETIRED,
            WorkerError::Kernel(_)
            | WorkerError::Io(_)
            | WorkerError::Index { .. }
            | WorkerError::Kernels(_) => EXIT_BAD_SPEC,
            _ => EXIT_BAD_SEGMENT,
        }
    }
}

/// Called by every entry point that starts workers. Ends a process that was started as an mk1
/// worker but, instead of serving, is about to start workers of its own (its `main` did not
/// call [`run_if_worker`] first): each would do the same, a cascade of processes. It exits
/// with a message the coordinator folds into its start-up error.
///
/// Returns whether this process is a serving worker (it called [`run_if_worker`], and a kernel
/// is starting a pool): that is refused with an error, for the kernel to see.
#[must_use = "a pool is refused in a worker"]
pub(crate) fn refuse_nested_start() -> bool {
    if IN_WORKER.load(std::sync::atomic::Ordering::Relaxed) {
        return true;
    }
    if std::env::var_os(WORKER_ENV).is_some() {
        // (Not `eprintln!`, which panics when stderr is gone.)
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "mk1 worker: this program was started as an mk1 worker but did not call \
             mk1::run_if_worker() / run_if_worker_with() first thing in main; it went on to \
             start workers of its own, which is refused"
        );
        std::process::exit(EXIT_BAD_SPEC);
    }
    false
}

/// If this process was started as an mk1 worker, serve and exit; otherwise return at once.
///
/// Call it first thing in `main` of any program that runs a pipeline or a pool with only
/// built-in ops: the coordinator starts workers by re-executing the current program with
/// [`WORKER_ENV`] set. A program with kernels of its own calls [`run_if_worker_with`] instead.
pub fn run_if_worker() {
    run_if_worker_with(&Registry::new());
}

/// As [`run_if_worker`], for a program whose pools run its own kernels: `kernels` must be
/// built exactly as the one given to [`crate::PoolBuilder::kernels`] (same names, dtypes and
/// order); a worker whose registry differs refuses to start, and the pool reports why.
///
/// Call it before the program starts any thread (so not inside `#[tokio::main]`, whose
/// runtime's threads already run there: call it in a plain `main` that then starts the
/// runtime), as it changes the environment.
///
/// A worker removes [`WORKER_ENV`] from its environment once read: the programs its kernels
/// start (another mk1 program, a script with a pool of its own) are not workers.
///
/// A process that has [`WORKER_ENV`] set to something no pool would set (by hand, say) exits
/// with status 2 (an environment error) and a line saying so.
pub fn run_if_worker_with(kernels: &Registry) {
    let Some(spec) = std::env::var_os(WORKER_ENV) else {
        return;
    };
    // (Changing the environment races with any other thread reading it: this runs first
    // thing in `main`, before the program starts a thread, as documented above.)
    std::env::remove_var(WORKER_ENV);
    serve_and_exit(&spec, kernels)
}

/// Serves as the worker `spec` (the value of [`WORKER_ENV`]) describes, then exits, as
/// [`run_if_worker_with`] does: for an embedding that takes [`WORKER_ENV`] out of the
/// environment itself (an interpreter that keeps its own copy of the environment).
pub fn serve_and_exit(spec: &std::ffi::OsStr, kernels: &Registry) -> ! {
    IN_WORKER.store(true, std::sync::atomic::Ordering::Relaxed);
    let code = match spec.to_str().and_then(WorkerSpec::parse) {
        None => {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "mk1: {WORKER_ENV} is set (to {spec:?}) but is no worker spec of this mk1's \
                 pools (set by hand, or by a pool of another mk1 version): this program runs \
                 as a worker only when a pool starts it; unset {WORKER_ENV}"
            );
            2
        }
        // (A worker's parent is its coordinator: a spec naming a live process that is not
        // the parent came from elsewhere, by hand or from a copied environment.)
        Some(spec)
            if sys::parent_pid() != spec.coordinator && sys::process_exists(spec.coordinator) =>
        {
            use std::io::Write;
            // (Not `eprintln!`: see below.)
            let _ = writeln!(
                std::io::stderr(),
                "mk1: {WORKER_ENV} is set (to {:?}), but this process's parent (pid {}) is not \
                 the pool's coordinator (pid {}): a copied environment (unset {WORKER_ENV}), or \
                 a worker program started through a wrapper that does not exec it",
                spec.encode(),
                sys::parent_pid(),
                spec.coordinator
            );
            2
        }
        Some(spec) => match serve(spec, kernels) {
            Ok(()) => 0,
            Err(e) => {
                // (Not `eprintln!`: an orphan's stderr pipe died with the coordinator, and a
                // panic here would replace the exit code that says why.)
                use std::io::Write;
                if !matches!(&e, WorkerError::Retired(why) if why.is_empty()) {
                    let _ = writeln!(std::io::stderr(), "mk1 worker {}: {e}", spec.index);
                }
                e.exit_code()
            }
        },
    };
    std::process::exit(code);
}

/// The worker loop. Returns when the coordinator asks for shutdown and the rings are empty.
pub fn serve(spec: WorkerSpec, registry: &Registry) -> Result<(), WorkerError> {
    // Job-control signals sent to the whole process group are the coordinator's to act on
    // (and, through exec, not lost on the programs a kernel starts: see the function).
    sys::absorb_job_control_signals();
    // Started through /proc/self/fd/N, the process would show as "N" in ps, top and pgrep.
    sys::set_thread_name(&format!("mk1-worker-{}", spec.index));
    // Before anything else: die with the coordinator, and catch the case where it already died.
    // A sandbox that refuses prctl leaves the parent checks: whenever a sleep times out, and a
    // thread that looks every 100 ms, so that an orphan leaves even in the middle of a long
    // kernel.
    match sys::die_with_parent(spec.coordinator) {
        Ok(false) => return Err(WorkerError::Orphaned(spec.coordinator)),
        Ok(true) => {}
        Err(_) => watch_parent(spec.index, spec.coordinator),
    }
    if sys::parent_pid() != spec.coordinator {
        return Err(WorkerError::Orphaned(spec.coordinator));
    }
    if let Some(cpu) = spec.cpu {
        let _ = sys::pin_to_cpu(cpu); // best effort: placement is an optimisation
    }
    // What the coordinator handed this process (the segment, the pipe whose close tells it
    // of this process's exit, a pool's `worker_fd`) must not reach the programs a kernel
    // starts: one would hold the whole segment, or hide this worker's death.
    sys::cloexec_from_3();
    let kernels = Kernels::new(spec.kernel)?;
    // SAFETY: the coordinator cleared close-on-exec on this fd for us and nothing else in this
    // process knows the number, so we are its only owner.
    let fd = unsafe { OwnedFd::from_raw_fd(spec.fd) };
    let seg = Segment::attach(fd)?;
    let params = *seg.layout().params();
    if spec.index >= params.workers {
        return Err(WorkerError::Index {
            index: spec.index,
            workers: params.workers,
        });
    }
    let want = spec.tasks;
    // A pool without user kernels sends built-in ops only, which every worker has: its workers
    // may carry any kernels (a program's `mk1 run` pool, say).
    if want != Registry::new().fingerprint() && registry.fingerprint() != want {
        return Err(WorkerError::Kernels(format!(
            "this program's kernels ({}) {OTHER_KERNELS}: call mk1::run_if_worker_with() \
             first thing in main, with the registry given to the pool",
            registry.describe()
        )));
    }
    seg.protect_inputs()?;
    if SLOTS.set(seg.slot_addresses()).is_ok() {
        sys::in_every_forked_child(revoke_in_forked_child)?;
    }
    let info = WorkerInfo {
        worker: spec.index,
        workers: params.workers,
    };
    let mut executor =
        Executor::new(registry, info, kernels.kernel()).map_err(WorkerError::Kernels)?;
    let mut task = crate::layout::TaskDesc::zeroed();
    let me = seg.worker(spec.index);
    me.status.pid.store(sys::own_pid(), Ordering::Relaxed);
    me.status.current.store(NO_TASK, Ordering::Relaxed);
    me.status.current_item.store(NO_ITEM, Ordering::Relaxed);
    let chaos = Chaos::from_env(spec.index);
    let foreign = chaos == Chaos::Foreign
        && std::env::var_os("MK1_CHAOS_FOREIGN_IF")
            .is_some_and(|f| std::path::Path::new(&f).exists());
    let build = if foreign { !BUILD_ID } else { BUILD_ID };
    me.status.build.store(build, Ordering::Relaxed);
    me.status
        .state
        .store(WorkerState::Running as u32, Ordering::Release);

    let producers = params.producers;
    // Each handle's rings, once it has opened them to this process (`None` until then).
    let mut rings: Vec<Option<(RingConsumer<'_>, RingProducer<'_>)>> =
        (0..producers).map(|_| None).collect();
    let mut closed = producers as usize;
    let bells: Vec<Doorbell<'_>> = (0..producers)
        .map(|p| Doorbell::new(&seg.producer(p).bell))
        .collect();
    let opened = |p: u32| {
        let (ctl, _) = seg.ring(p, spec.index, Direction::ToWorker);
        // Acquire: pairs with the handle's Release once it has zeroed both rings.
        ctl.head.open_for.load(Ordering::Acquire) == spec.gate
    };
    let my_bell = Doorbell::new(&me.bell);
    let shutdown = seg.shutdown_flag();
    let mut backoff = Backoff::for_mode(spec.spin);
    let mut processed: u64 = 0;
    let mut same_cpu_yields = 0u32;
    let mut processed_total: u64 = 0;

    // Rounds of work until closed rings are looked at again (also whenever a round finds none).
    let mut busy_rounds = 0u32;
    loop {
        if closed > 0 && busy_rounds.is_multiple_of(GATE_LOOK_EVERY) {
            for (p, r) in rings.iter_mut().enumerate() {
                if r.is_none() && opened(p as u32) {
                    *r = Some(attach_rings(&seg, p as u32, spec.index)?);
                    closed -= 1;
                }
            }
        }
        let mut did = 0;
        for (p, r) in rings.iter_mut().enumerate() {
            let Some((inbox, outbox)) = r else {
                continue;
            };
            let ring_err = |source| WorkerError::Ring {
                producer: p as u32,
                source,
            };
            let mut n = 0;
            while n < BURST {
                let Some(word) = inbox.pop().map_err(ring_err)? else {
                    break;
                };
                let mut token =
                    Token::from_untrusted_word(word, params.slots).map_err(|source| {
                        WorkerError::Token {
                            producer: p as u32,
                            source,
                        }
                    })?;
                // Which task runs, for the pool to blame after a death or a timeout. The item
                // goes first (Release keeps the compiler from swapping the stores; a plain store
                // on x86): a death between the two stores then blames no array of this task,
                // never the previous task's last array.
                me.status.current_item.store(NO_ITEM, Ordering::Relaxed);
                me.status.current.store(word, Ordering::Release);
                seg.prefetch_slot(&token);
                seg.read_task(&token, &mut task);
                let result = executor
                    .run(&task, seg.task_buffers(&mut token), &me.status.current_item)
                    .map_err(|why| WorkerError::Descriptor {
                        slot: token.slot(),
                        why,
                    })?;
                let mut done = 0;
                if result.status == TASK_OK && result.outs.is_none() {
                    // The common answer travels in the token word alone.
                    done = DONE_OK;
                } else {
                    seg.write_result(&token, &result);
                }
                me.status.current.store(NO_TASK, Ordering::Relaxed);
                let mut word = None;
                if chaos != Chaos::None {
                    processed_total += 1;
                    word = chaos.strike(processed_total, &seg, spec.index, &mut token, &task);
                }
                let word = word.unwrap_or_else(|| token.into_word() | done);
                // A kernel retired this worker: once answered, the slot goes to others, so this
                // process gives up its access to every slot first (a thread the kernel left
                // behind faults instead of writing another task's data). Unable to, it leaves
                // without answering, and the pool takes the task back as after a death.
                let retiring = retiring();
                if let Some(why) = retiring {
                    // (Read by the monitor: a quiet retirement is planned, not a death.)
                    if why.is_empty() {
                        me.status
                            .state
                            .store(WorkerState::Retired as u32, Ordering::Release);
                    }
                    // SAFETY: no view of a slot is used in this process after this: the task's
                    // buffers are done with, and the loop returns below.
                    if unsafe { seg.revoke_slots() }.is_err() {
                        return Err(WorkerError::Retired(why.into()));
                    }
                }
                match outbox.push(word) {
                    Ok(()) => {}
                    Err(PushError::Full(_)) => return Err(WorkerError::Overflow(p as u32)),
                    Err(PushError::Corrupt(e)) => return Err(ring_err(e)),
                }
                // Publish each token at once: holding finished tokens back until the burst ends
                // leaves the producer idle while we work (a measured 2x bubble with few tokens).
                // The doorbell, which costs an RMW, is rung once per burst.
                outbox.flush();
                n += 1;
                if let Some(why) = retiring {
                    bells[p].ring(&Futex);
                    return Err(WorkerError::Retired(why.into()));
                }
            }
            if n > 0 {
                bells[p].ring(&Futex);
                did += n;
            }
        }
        busy_rounds = if did > 0 {
            busy_rounds.wrapping_add(1)
        } else {
            0
        };
        if did > 0 {
            processed += did as u64;
            me.status.heartbeat.store(processed, Ordering::Relaxed);
            backoff.reset();
            same_cpu_yields = 0;
            continue;
        }
        // Acquire: pairs with the coordinator's Release store; everything it pushed before
        // asking us to stop is visible, and the rings were just seen empty.
        if shutdown.load(Ordering::Acquire) != 0 {
            let mut pending = false;
            for (inbox, _) in rings.iter_mut().flatten() {
                pending |= inbox.has_pending().unwrap_or(false);
            }
            if !pending {
                me.status
                    .state
                    .store(WorkerState::Exited as u32, Ordering::Release);
                return Ok(());
            }
            continue;
        }
        if backoff.step() == Step::Sleep {
            // A producer that last waited on this CPU shares our run queue: yield to it (never
            // when told to sleep at once).
            if same_cpu_yields < SAME_CPU_YIELDS
                && spec.spin != SpinMode::Never
                && same_cpu_partner(
                    &me.bell,
                    sys::current_cpu(),
                    (0..producers).map(|p| &seg.producer(p).bell),
                )
            {
                same_cpu_yields += 1;
                std::thread::yield_now();
                continue;
            }
            my_bell.sleep(&Futex, SLEEP, || {
                shutdown.load(Ordering::Acquire) != 0
                    || rings.iter_mut().enumerate().any(|(p, r)| match r {
                        Some((inbox, _)) => inbox.has_pending().unwrap_or(true),
                        None => opened(p as u32),
                    })
            });
            if sys::parent_pid() != spec.coordinator {
                return Err(WorkerError::Orphaned(spec.coordinator));
            }
        }
    }
}

/// While busy, a worker looks whether a handle has opened its rings to it every this many rounds
/// of work (a handle that never did, say a producer index never used, would otherwise cost a
/// load per round), and at once when a round finds none.
const GATE_LOOK_EVERY: u32 = 64;

/// Producer `p`'s rings to and from worker `w`, attached as they are (the handle zeroed them
/// before it opened them to this process).
fn attach_rings(
    seg: &Segment,
    p: u32,
    w: u32,
) -> Result<(RingConsumer<'_>, RingProducer<'_>), WorkerError> {
    let ring_err = |source| WorkerError::Ring {
        producer: p,
        source,
    };
    let (ctl, e) = seg.ring(p, w, Direction::ToWorker);
    let inbox = RingConsumer::new(ctl, e).map_err(ring_err)?;
    let (ctl, e) = seg.ring(p, w, Direction::FromWorker);
    let outbox = RingProducer::new(ctl, e).map_err(ring_err)?;
    Ok((inbox, outbox))
}

/// Without a parent-death signal (prctl refused): a thread that ends worker `index` once its
/// parent, the coordinator `parent`, is gone, whatever the worker is running then.
fn watch_parent(index: u32, parent: u32) {
    let started = std::thread::Builder::new()
        .name("mk1-parent-watch".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(100));
            if sys::parent_pid() != parent {
                // (Best effort: the pipe it goes to died with the coordinator, and
                // `eprintln!` would panic this thread instead of ending the process.)
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "mk1 worker {index}: {}",
                    WorkerError::Orphaned(parent)
                );
                std::process::exit(EXIT_ORPHANED);
            }
        });
    // (Without the thread, the checks after each sleep still end an orphan, later.)
    drop(started);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips() {
        let s = WorkerSpec {
            fd: 5,
            index: 3,
            coordinator: 1234,
            kernel: Kernel::Portable,
            cpu: Some(1),
            spin: SpinMode::Long,
            tasks: 0x1,
            gate: 0x7a11_5eed,
        };
        assert_eq!(WorkerSpec::parse(&s.encode()), Some(s));
        let s = WorkerSpec {
            cpu: None,
            spin: SpinMode::Never,
            tasks: 0xdead_beef,
            gate: 1,
            ..s
        };
        assert_eq!(WorkerSpec::parse(&s.encode()), Some(s));
        for bad in [
            "",
            "1,2,3",
            "a,2,3,portable,-,1,-",
            "1,2,3,sse9,-,1,-",
            "1,2,3,avx2,x,1,-",
            "1,2,3,avx2,-",
            "1,2,3,avx2,-,3,-",
            "1,2,3,avx2,-,1",
            "1,2,3,avx2,-,1,xyz",
            "1,2,3,avx2,-,1,-,-",
            "1,2,3,avx2,-,1,ff,-",
            "1,2,3,avx2,-,1,ff,0,-",
            "1,2,3,avx2,-,1,ff,x1",
        ] {
            assert_eq!(WorkerSpec::parse(bad), None, "{bad}");
        }
    }
}
