//! The library API: a [`Pool`] of worker processes that runs your kernels on your arrays in
//! shared memory.
//!
//! ```no_run
//! use mk1::{Pool, Task, Shape};
//! mk1::run_if_worker(); // first thing in main: a worker serves here and never returns
//! let pool = Pool::builder().workers(2).build().expect("pool");
//! let producer = pool.producer().expect("a producer handle");
//! let mut loan = producer.loan::<f32>(Shape::d2(64, 64)).expect("a slot");
//! loan.as_mut_slice().fill(1.0);
//! producer.submit(loan, &Task::op("affine:3,1").unwrap()).expect("submitted");
//! let done = producer.recv().expect("one task in flight");
//! assert!(done.output::<f32>().unwrap().as_slice().iter().all(|&x| x == 4.0));
//! ```
//!
//! Layers: the pool owns the segment, the worker processes and a monitor thread (the
//! coordinator's monitor (`coordinator/monitor.rs`), unchanged: deaths, restarts, the watchdog);
//! each [`Producer`] handle is one producer of the segment's protocol, used from one thread at
//! a time; [`map`](Producer::map) is built on the handle.

mod map;
mod packed;
mod producer;

pub use map::{Map, MapUnordered, ViewOutcome};
pub use packed::{PackedLoan, RejectedPacked};
pub use producer::{
    Completion, Interrupter, Loan, LoanError, OutputView, Producer, Rejected, SubmitError,
    TaskError, Ticket,
};

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::array::Shape;
use crate::config::{Config, DispatchKind, Wait};
use crate::coordinator::{start_workers, Control, Monitor, RunError, WorkerImage, WorkerStderr};
use crate::dtype::DType;
use crate::layout::Layout;
use crate::ops::Kernel;
use crate::report::{Unreaped, WorkerExit};
use crate::shm::Segment;
use crate::sync::Ordering;
use crate::task::{Builtin, BuiltinError, Params, Registry};
use crate::wait::SpinMode;
use crate::worker::WorkerSpec;

/// Where a kernel's result goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The kernel rewrites its input. Guarantee: a task whose worker dies after taking it comes
    /// back as [`TaskError::WorkerDied`] (its input may be half-written) and is not redone,
    /// unless [`PoolBuilder::keep_copies`] asked mk1 to keep a copy of each input: then it is
    /// restored and redone as out of place. A task the dead worker had not taken yet (queued
    /// in its ring) is untouched, and is sent again without counting an attempt. In a packed
    /// batch, the array the worker was running takes the blame alone: the arrays it ran before
    /// it fail with it (changed in place), those it had not reached are sent again.
    InPlace,
    /// The kernel reads the input and writes a separate output region. Workers map every
    /// input read-only, so no worker can change an input. Guarantee: a task whose worker dies
    /// is redone on another worker from its intact input, up to `max_retries` times, then
    /// comes back as [`TaskError::WorkerDied`]. In a packed batch, the array the worker was
    /// running takes the blame alone: once its attempts are spent (or at once, for a hang) it
    /// fails by itself, and the rest of the batch is sent again without it.
    OutOfPlace,
}

/// Why a pool could not be built (exit code 2 in a command-line tool: usage or environment).
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A setting is out of range.
    #[error("invalid pool setting {what}: {why}")]
    Setting {
        /// Which setting.
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The segment, a limit, or a worker could not be had (see [`RunError`]).
    #[error(transparent)]
    Start(#[from] RunError),
    /// Every producer handle is in use.
    #[error("all {0} producer handles are in use (PoolBuilder::producers sets how many)")]
    NoHandle(u32),
    /// [`PoolBuilder::build_interruptible`]'s `stop` said to give the start up (every worker
    /// started was killed and reaped).
    #[error("the pool's start was interrupted; every worker started was stopped")]
    Interrupted,
    /// The pool was to be started inside an mk1 worker (by a kernel or its init hook), which
    /// is refused: pools start in the caller's process.
    #[error(
        "a pool cannot be started inside an mk1 worker (a kernel or its init hook tried): \
         start pools in the caller's process"
    )]
    InWorker,
}

/// A task: which kernel runs on each array, with which parameters.
#[derive(Debug, Clone)]
pub struct Task {
    kind: TaskKind,
    params: Params,
    out_shape: Option<Shape>,
    context: Option<Arc<[u8]>>,
    /// Redos after its worker died, for this task; `None`: the pool's `max_retries`.
    retries: Option<u32>,
    /// A built-in op's code and parameters per dtype (by `DType::code() - 1`), worked out at
    /// the first submit for that dtype and shared by clones: submits of the same op cost no
    /// decoding.
    encoded: Arc<[std::sync::OnceLock<Encoded>; DType::ALL.len()]>,
    /// Which content this is: a fresh number whenever a task is built or changed, kept by its
    /// clones (same content). A handle that last sent a slot this task's one array of a dtype
    /// reuses what it worked out then (kernel code, parameters) for the next one.
    pub(crate) id: u64,
}

/// A built-in op's descriptor code and parameters for one dtype, or why it has none.
type Encoded = Result<(u32, Params), BuiltinError>;

impl PartialEq for Task {
    /// Equal when they run the same kernel with the same parameters, output shape and context.
    fn eq(&self, other: &Task) -> bool {
        self.kind == other.kind
            && self.params == other.params
            && self.out_shape == other.out_shape
            && self.context == other.context
            && self.retries == other.retries
    }
}

#[derive(Debug, Clone, PartialEq)]
enum TaskKind {
    Kernel(String),
    Builtin(Builtin),
}

impl Task {
    /// The registered kernel `name` (found, for the array's dtype, at submit).
    pub fn kernel(name: &str) -> Task {
        Task {
            kind: TaskKind::Kernel(name.to_string()),
            params: Params::none(),
            out_shape: None,
            context: None,
            retries: None,
            encoded: Arc::default(),
            id: crate::sync::unique_id(),
        }
    }

    /// A built-in op.
    pub fn builtin(op: Builtin) -> Task {
        Task {
            kind: TaskKind::Builtin(op),
            params: Params::none(),
            out_shape: None,
            context: None,
            retries: None,
            encoded: Arc::default(),
            id: crate::sync::unique_id(),
        }
    }

    /// A built-in op from its text, e.g. `affine:3,1` (see [`Builtin::parse`]).
    ///
    /// # Errors
    /// The op's [`BuiltinError`].
    pub fn op(text: &str) -> Result<Task, BuiltinError> {
        Builtin::parse(text).map(Task::builtin)
    }

    /// With these parameters (user kernels read them from [`crate::task::Args::params`]).
    pub fn params(mut self, params: Params) -> Task {
        self.params = params;
        self.id = crate::sync::unique_id();
        self
    }

    /// With an output shape other than the input's (out of place, user kernels, one array per
    /// task; the output must fit the input's slot).
    pub fn out_shape(mut self, shape: Shape) -> Task {
        self.out_shape = Some(shape);
        self.id = crate::sync::unique_id();
        self
    }

    /// With context bytes: copied into each slot after its arrays and handed, read-only, to the
    /// kernel with every array ([`crate::task::Args::context`]), for what does not fit the
    /// parameters (a serialized function, a small table). They take room in the slot: an array
    /// plus its context must fit a slot.
    pub fn context(mut self, bytes: impl Into<Arc<[u8]>>) -> Task {
        let bytes = bytes.into();
        self.context = if bytes.is_empty() { None } else { Some(bytes) };
        self.id = crate::sync::unique_id();
        self
    }

    /// Redone at most `n` times when its worker dies, in place of the pool's
    /// [`PoolBuilder::max_retries`] (with the same conditions: out of place, or with
    /// [`PoolBuilder::keep_copies`]). `0`: a death fails it at once (for a caller that packs
    /// work of its own into one task and redoes its parts itself, say). In a packed batch the
    /// bound is on the array its worker was running, as [`Mode`] says: the arrays sent again
    /// with the rest of the batch include those that had run before it (their results died
    /// with the worker).
    pub fn max_retries(mut self, n: u32) -> Task {
        self.retries = Some(n);
        self.id = crate::sync::unique_id();
        self
    }

    /// This task's redos after a death: its own, or `pool`'s.
    #[inline]
    pub(crate) fn retries_or(&self, pool: u32) -> u32 {
        self.retries.unwrap_or(pool)
    }

    /// Bytes of context.
    pub(crate) fn context_bytes(&self) -> &[u8] {
        self.context.as_deref().unwrap_or(&[])
    }

    /// The kernel code and parameters a descriptor carries for arrays of `dtype`.
    #[inline]
    pub(crate) fn resolve(
        &self,
        registry: &Registry,
        dtype: DType,
    ) -> Result<(u32, &Params), SubmitError> {
        match &self.kind {
            TaskKind::Kernel(name) => registry
                .find(name, dtype)
                .map(|k| (k, &self.params))
                .map_err(SubmitError::Kernel),
            TaskKind::Builtin(op) => {
                match self.encoded[usize::from(dtype.code()) - 1].get_or_init(|| op.encode(dtype)) {
                    Ok((k, p)) => Ok((*k, p)),
                    Err(e) => Err(SubmitError::Op(e.clone())),
                }
            }
        }
    }
}

/// Settings of a [`Pool`]; [`Pool::builder`] gives the defaults.
#[derive(Clone)]
pub struct PoolBuilder {
    workers: u32,
    producers: u32,
    max_array_bytes: u64,
    slots_per_producer: Option<u32>,
    /// Smaller slots besides the largest: `(bytes, slots per handle)`.
    size_classes: Vec<(u64, u32)>,
    mode: Mode,
    max_retries: u32,
    max_restarts: u32,
    worker_timeout: Duration,
    worker_exe: Option<PathBuf>,
    worker_launch: crate::sys::Launch,
    start_timeout: Duration,
    kernel: Kernel,
    registry: Arc<Registry>,
    pack_bytes: u64,
    pack_slots: Option<u32>,
    pack_time: Duration,
    streaming_stores: bool,
    worker_memory: u64,
    keep_copies: bool,
    dispatch: DispatchKind,
    queue_ahead: Option<Duration>,
    seed: u64,
    wait: Wait,
    worker_cpus: Vec<usize>,
}

impl PoolBuilder {
    /// Which worker each task goes to (default [`DispatchKind::LeastLoaded`]: the worker
    /// expected to start it soonest, with at most [`PoolBuilder::queue_ahead`] of work queued
    /// behind each worker's running task).
    pub fn dispatch(mut self, kind: DispatchKind) -> Self {
        self.dispatch = kind;
        self
    }

    /// With [`DispatchKind::LeastLoaded`]: how much work (estimated from each worker's recent
    /// tasks) may be out at a worker, the task it runs included. Default 2 ms.
    ///
    /// A task that no worker may take waits in its handle, and goes to the first worker that
    /// can take it. So a long task does not hold back the tasks sent after it while another
    /// worker is free, as with a task queue shared by the workers: tasks longer than this go
    /// to workers as they free up, and nothing is queued behind a worker's first task (its
    /// length is unknown). Short tasks still queue deep enough to keep each worker busy; only
    /// a task much longer than its worker's last ones can hold back what was queued behind it
    /// before it looked long (as many tasks as would take this long at the pace of those last
    /// ones).
    ///
    /// The handle sends waiting tasks while it looks for returns: in any submit, receive, wait
    /// (a `map`'s, a `recv`'s, a loan's that waits for a slot) or `notify`, and in its drop,
    /// which waits for every task.
    ///
    /// `Duration::MAX`: no limit; every task is sent when submitted, to the worker holding
    /// fewest of the handle's tasks. Choose it when a caller submits work and then stays away
    /// from the handle (computing, say) for longer than the tasks take: the workers then run
    /// what was submitted meanwhile.
    pub fn queue_ahead(mut self, ahead: Duration) -> Self {
        self.queue_ahead = (ahead != Duration::MAX).then_some(ahead);
        self
    }

    /// Seed of [`DispatchKind::Random`] (handle `p` draws from `seed + p`). Default 1.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// How handles and workers wait for each other (default [`Wait::Auto`]: spin briefly,
    /// then sleep on the futex; [`Wait::Sleep`] sleeps at once).
    pub fn wait(mut self, wait: Wait) -> Self {
        self.wait = wait;
        self
    }

    /// Pins worker `w` to CPU `cpus[w]` (best effort: a CPU the process may not use is
    /// ignored). Empty (the default): no pinning. Replacements are pinned as the worker they
    /// replace.
    pub fn worker_cpus(mut self, cpus: Vec<usize>) -> Self {
        self.worker_cpus = cpus;
        self
    }

    /// `map` packs arrays several to a slot, up to this many bytes of them per slot (per-task
    /// costs then count once per slot); 0 turns packing off. Default 64 KiB.
    pub fn pack_bytes(mut self, bytes: u64) -> Self {
        self.pack_bytes = bytes;
        self
    }

    /// About how long the arrays of one packed slot of a `map` should take a worker (default
    /// 100 µs): a slot takes at most as many arrays as run in that time at the pace the map's
    /// slots come back at, and one until the first is back, so that a kernel that is slow per
    /// array is spread over the workers. Longer makes fewer, fuller slots (less per-slot
    /// cost); `Duration::MAX` packs by bytes alone from the first array (the pace is not
    /// used), right when every kernel mapped is known to be cheap; zero, one array per slot.
    ///
    /// A slot's time is measured by the handle, from its worker's previous return (or from
    /// the slot's send, when that is later) to its return, so a caller slow to take results
    /// makes it look longer (smaller packs). While other handles have tasks at the same
    /// worker, their work is in that time too: it then only ever lowers the pace.
    pub fn pack_time(mut self, time: Duration) -> Self {
        self.pack_time = time;
        self
    }

    /// Slots of [`PoolBuilder::pack_bytes`] each, per handle, that only `map` and
    /// `map_unordered` use, to pack small arrays in: more packed slots in flight at once than
    /// the largest slots give, for little memory. A map fills these first and the largest slots
    /// after them (an array too large for these goes in a largest slot); loans and batches
    /// never take them. Default: 32, or 8 per worker when that is more (with the default pack
    /// size, 2 MiB per handle up to 4 workers and 512 KiB per worker beyond; twice that out of
    /// place). None with 0, with packing off (`pack_bytes(0)`), with a pack size below 64
    /// bytes or not below the largest slot's (after rounding), or with seven size classes
    /// given; nor with a [`PoolBuilder::size_class`] of the pack size, whose slots maps then
    /// pack in (loans use those too). A map whose context leaves less than half a pack in a
    /// pack slot packs in the next larger class that holds that much.
    ///
    /// Why: with a map's arrays in few slots, each slot is written again soon after a worker
    /// last touched it, while its lines are still in that worker's cache, and copying into and
    /// out of it waits on that cache. In `mk1 bench library` (one worker, 2 CPUs), packed maps
    /// of small f32 arrays ran 1.39x (1.06–3.12) as fast with the default pack slots as with
    /// `pack_slots(0)`.
    pub fn pack_slots(mut self, n: u32) -> Self {
        self.pack_slots = Some(n);
        self
    }

    /// Whether a `map` out of place copies each array it packs after a slot's first into the
    /// slot by non-temporal (streaming) stores, on x86_64 (default true). Such a store sends
    /// the line to memory without fetching it first; an ordinary store fetches it, mostly from
    /// the cache of the worker that ran the slot's previous task, so copying into a slot waits
    /// on another core once per line. The worker then reads the arrays from memory, a stream
    /// its prefetcher follows. A slot's first array goes by ordinary stores, so a slot of one
    /// array pays no fence (`sfence`, about a memory write's time, before the slot is sent);
    /// in place, and for arrays over 1 MiB, ordinary stores always. Measured here (one
    /// worker, 2 CPUs, maps of 1 M small f32 arrays): the same speed while the host's cores
    /// shared lines fast (1.02x), 2.09x as fast while they did so slowly (see the README; `mk1
    /// bench library` has the comparison); `false` to compare on yours.
    pub fn streaming_stores(mut self, on: bool) -> Self {
        self.streaming_stores = on;
        self
    }

    /// Worker processes, `1..=1024`. Default: cores − 1, at least 1.
    pub fn workers(mut self, n: u32) -> Self {
        self.workers = n;
        self
    }

    /// Producer handles that may exist at once (one per submitting thread), `1..=64`; each owns
    /// an equal share of the slots. Default 1.
    pub fn producers(mut self, n: u32) -> Self {
        self.producers = n;
        self
    }

    /// Largest array (input or output) in bytes: the size of a slot. Default 1 MiB; at most
    /// 1 GiB.
    pub fn max_array_bytes(mut self, bytes: u64) -> Self {
        self.max_array_bytes = bytes;
        self
    }

    /// Adds `slots_per_producer` smaller slots of `bytes` each to every handle (`bytes` below
    /// [`PoolBuilder::max_array_bytes`]; up to 7 such classes). A loan takes a free slot of the
    /// smallest size its array fits, or a larger one when those are all busy, so a pool for
    /// arrays of mixed sizes maps (and touches) less memory than one of largest slots only.
    /// Batches ([`Producer::loan_packed`]) use the largest slots; [`Producer::map`] packs in
    /// the smallest class that holds `pack_bytes` (the pack slots, unless a class given here
    /// is of that size). A
    /// loan's slot is picked for its input alone: a task that needs more room in its slot (a
    /// context, a larger output shape, a kernel for any dtype that grows its output) is refused
    /// at submit, or fails, in a slot too small for it; loan a larger shape for those (and
    /// `reshape` it down), or leave size classes out.
    pub fn size_class(mut self, bytes: u64, slots_per_producer: u32) -> Self {
        self.size_classes.push((bytes, slots_per_producer));
        self
    }

    /// Slots of the largest size per producer handle: how many arrays one handle can have
    /// loaned, in flight and completed-but-held at once (the backpressure bound; slots of a
    /// [`PoolBuilder::size_class`] come on top). Default: 4 per worker.
    pub fn slots_per_producer(mut self, n: u32) -> Self {
        self.slots_per_producer = Some(n);
        self
    }

    /// In place only: keep a private copy of every input at submit (one memcpy in this
    /// process), so that a task whose worker dies is restored and redone, up to `max_retries`
    /// times, as out of place does. Default off.
    pub fn keep_copies(mut self, keep: bool) -> Self {
        self.keep_copies = keep;
        self
    }

    /// In place or out of place (default [`Mode::OutOfPlace`]).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Out of place: how many times a task whose worker died is redone before it fails with
    /// [`TaskError::WorkerDied`]. Default 2.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Worker replacements after deaths over the pool's life before it gives up (every later
    /// task fails with [`TaskError::NoWorkers`]). A worker that retires itself quietly
    /// ([`crate::worker::retire_after_this_task`] with no reason) is replaced without counting
    /// here. Default 1000.
    pub fn max_restarts(mut self, n: u32) -> Self {
        self.max_restarts = n;
        self
    }

    /// A worker that holds tasks and returns none for this long is killed and replaced; the
    /// task it was running fails with [`TaskError::Timeout`]. Default 10 s. Answers it has
    /// returned that a handle has not received yet (its caller away) are not tasks it holds,
    /// and a handle that has not called in since the worker's slot last died does not count
    /// (the tasks it had out there are the dead process's). More than 0; `Duration::MAX`: no
    /// limit.
    pub fn worker_timeout(mut self, d: Duration) -> Self {
        self.worker_timeout = d;
        self
    }

    /// Memory each worker process takes of its own, besides the shared segment, for the check
    /// against the memory limits the pool runs under (cgroup, `MemAvailable`) before it
    /// starts: a pool that does not fit is refused then ([`PoolError::Start`], a limit named)
    /// rather than killed later. Default 2 MiB (this program's workers took 0.2 MiB in
    /// `mk1 run`); a worker program that allocates more of its own (an interpreter, large
    /// per-worker state) should say about how much.
    pub fn worker_memory(mut self, bytes: u64) -> Self {
        self.worker_memory = bytes;
        self
    }

    /// The program to run as workers (default: this very program). It must call
    /// [`crate::run_if_worker_with`] with the same kernels.
    pub fn worker_exe(mut self, path: impl Into<PathBuf>) -> Self {
        self.worker_exe = Some(path.into());
        self
    }

    /// Arguments the worker program is started with (default: none). With
    /// [`PoolBuilder::worker_exe`] naming an interpreter, these name what it runs: the program
    /// it runs must call [`crate::run_if_worker_with`] with the same kernels first thing.
    pub fn worker_args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString>,
    {
        self.worker_launch.args = args.into_iter().map(Into::into).collect();
        self
    }

    /// Sets an environment variable in every worker (on top of this process's environment).
    pub fn worker_env(
        mut self,
        key: impl Into<std::ffi::OsString>,
        value: impl Into<std::ffi::OsString>,
    ) -> Self {
        self.worker_launch.env.push((key.into(), value.into()));
        self
    }

    /// Hands `fd` to every worker, open, its number in the environment variable `key`, for as
    /// long as the pool lives (replacements get it too): a way to pass workers more than an
    /// environment variable holds (128 KiB at most on Linux). A worker that reads it should
    /// use positioned reads (`pread`): the file offset is shared by every process that has it;
    /// and close it once read (a worker's descriptors are close-on-exec from its start on, so
    /// the programs its kernels start never get it). A descriptor numbered 0, 1 or 2 is moved
    /// above them first (the workers' standard streams take those numbers).
    pub fn worker_fd(
        mut self,
        key: impl Into<std::ffi::OsString>,
        fd: std::os::fd::OwnedFd,
    ) -> Self {
        use std::os::fd::AsRawFd;
        let fd = crate::sys::above_stdio_or_as_is(fd);
        let number = fd.as_raw_fd().to_string();
        self.worker_launch.env.push((key.into(), number.into()));
        self.worker_launch.fds.push(crate::sys::SharedFd::new(fd));
        self
    }

    /// How long a worker may take to start (until it serves, its kernels' init hooks
    /// included) before `build()` fails, or a replacement counts as failed (default 10 s). More
    /// than 0; `Duration::MAX`: no limit.
    pub fn start_timeout(mut self, d: Duration) -> Self {
        self.start_timeout = d;
        self
    }

    /// Whether workers write to this process's stdout (default: no, their stdout is
    /// /dev/null, so a worker stuck in the kernel never holds the terminal or a pipe open;
    /// their stderr is always forwarded). Interpreters whose users `print` in workers want it.
    pub fn inherit_stdout(mut self, inherit: bool) -> Self {
        self.worker_launch.inherit_stdout = inherit;
        self
    }

    /// The SIMD kernels built-in ops run with (default: the best this CPU has).
    pub fn simd(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    /// The user kernels (the same registry the program passes to
    /// [`crate::run_if_worker_with`]).
    pub fn kernels(mut self, registry: Registry) -> Self {
        self.registry = Arc::new(registry);
        self
    }

    /// Creates the segment, starts every worker and waits until each has attached (and run its
    /// kernels' init hooks).
    ///
    /// # Errors
    /// [`PoolError::Setting`] for a value out of range; [`PoolError::Start`] when the segment
    /// does not fit a limit of this process, a worker cannot be started, exits before
    /// attaching, has other kernels, or an init hook fails (its message is in the error);
    /// [`PoolError::InWorker`] when called in an mk1 worker (by a kernel).
    pub fn build(self) -> Result<Pool, PoolError> {
        self.build_interruptible(|| false)
    }

    /// As [`PoolBuilder::build`], asking `stop` every 50 ms while the workers start (which
    /// takes as long as their init hooks, up to [`PoolBuilder::start_timeout`]): when it says
    /// `true`, the start is given up, every worker started is killed and reaped, and the build
    /// returns [`PoolError::Interrupted`] within a few milliseconds. For a caller that must
    /// stay responsive to Ctrl-C while a slow start runs (the Python package checks its
    /// signals here).
    ///
    /// # Errors
    /// As [`PoolBuilder::build`], and [`PoolError::Interrupted`]; [`PoolError::InWorker`] in
    /// an mk1 worker.
    pub fn build_interruptible(self, mut stop: impl FnMut() -> bool) -> Result<Pool, PoolError> {
        if crate::worker::refuse_nested_start() {
            return Err(PoolError::InWorker);
        }
        let bad = |what: &'static str, why: String| PoolError::Setting { what, why };
        if !(1..=crate::layout::MAX_WORKERS).contains(&self.workers) {
            return Err(bad(
                "workers",
                format!("{} is outside 1..=1024", self.workers),
            ));
        }
        if !(1..=crate::layout::MAX_PRODUCERS).contains(&self.producers) {
            return Err(bad(
                "producers",
                format!("{} is outside 1..=64", self.producers),
            ));
        }
        if !(64..=crate::layout::MAX_SLOT_BYTES).contains(&self.max_array_bytes) {
            return Err(bad(
                "max_array_bytes",
                format!("{} is outside 64..=1073741824", self.max_array_bytes),
            ));
        }
        // (Zero would fail every task, or every start: not a way to say "no limit", which
        // `Duration::MAX` says.)
        for (what, d) in [
            ("worker_timeout", self.worker_timeout),
            ("start_timeout", self.start_timeout),
        ] {
            if d.is_zero() {
                return Err(bad(
                    what,
                    "0 is not a limit (more than 0; Duration::MAX for none)".into(),
                ));
            }
        }
        let slots_per_producer = self.slots_per_producer.unwrap_or(4 * self.workers);
        if slots_per_producer == 0 || slots_per_producer > 1 << 20 {
            return Err(bad(
                "slots_per_producer",
                format!("{slots_per_producer} is outside 1..=1048576"),
            ));
        }
        if !self.kernel.is_available() {
            return Err(bad(
                "simd",
                format!("{} is not available on this CPU", self.kernel.name()),
            ));
        }
        let mut classes = self.size_classes.clone();
        classes.sort_unstable();
        // Slots are rounded up (to a page from a page on, to a line below): compare what the
        // layout will make of them.
        // (Sizes here are at most MAX_SLOT_BYTES, checked above: rounding cannot overflow.)
        let rounded = |b: u64| crate::layout::slot_bytes(b).unwrap_or(u64::MAX);
        for (i, &(bytes, n)) in classes.iter().enumerate() {
            let why = if !(64..self.max_array_bytes).contains(&bytes)
                || rounded(bytes) >= rounded(self.max_array_bytes)
            {
                Some(format!(
                    "{bytes} bytes is outside 64..{} (below max_array_bytes, after rounding to \
                     whole pages or lines)",
                    self.max_array_bytes
                ))
            } else if i > 0 && rounded(classes[i - 1].0) == rounded(bytes) {
                Some(format!(
                    "{bytes} bytes is given twice (after rounding to whole pages or lines)"
                ))
            } else if n == 0 || n > 1 << 20 {
                Some(format!("{n} slots per producer is outside 1..=1048576"))
            } else if classes.len() >= crate::layout::MAX_CLASSES {
                Some(format!(
                    "at most {} size classes besides the largest",
                    crate::layout::MAX_CLASSES - 1
                ))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(bad("size_class", why));
            }
        }
        // Slots for packed maps (see `pack_slots`): a class of their own, kept from loans, unless
        // packing is off, a pack fills a largest slot anyway, a class of that size is given
        // (maps pack in it, with loans), or there is no room for another class.
        let pack_slots = self
            .pack_slots
            .unwrap_or_else(|| default_pack_slots(self.workers));
        if pack_slots > 1 << 20 {
            return Err(bad(
                "pack_slots",
                format!("{pack_slots} is outside 0..=1048576"),
            ));
        }
        let pack_class = (pack_slots > 0
            && self.pack_bytes >= 64
            && rounded(self.pack_bytes) < rounded(self.max_array_bytes)
            && classes.len() < crate::layout::MAX_CLASSES - 1
            && !classes
                .iter()
                .any(|&(b, _)| rounded(b) == rounded(self.pack_bytes)))
        .then(|| {
            classes.push((self.pack_bytes, pack_slots));
            classes.sort_unstable();
            classes
                .iter()
                .position(|&(b, _)| rounded(b) == rounded(self.pack_bytes))
                .expect("just added")
        });
        classes.push((self.max_array_bytes, slots_per_producer));
        let per_producer: u32 = classes.iter().map(|&(_, n)| n).sum();
        for c in &mut classes {
            c.1 *= self.producers;
        }
        let layout = Layout::with_outputs(
            self.workers,
            self.producers,
            per_producer,
            &classes,
            self.mode == Mode::OutOfPlace,
        )
        .map_err(|e| bad("layout", e.to_string()))?;
        crate::limits::check(&crate::limits::Needs {
            segment: layout.total_bytes(),
            workers: self.workers,
            // Each handle is meant for a thread of its own, and the monitor is one more.
            producers: self.producers + 1,
            worker_memory: self.worker_memory,
        })
        .map_err(RunError::from)?;
        let seg = Segment::create(layout).map_err(RunError::from)?;
        let cfg = Config {
            workers: self.workers,
            producers: self.producers,
            max_restarts: self.max_restarts,
            worker_timeout: self.worker_timeout,
            worker_exe: self.worker_exe.clone(),
            worker_launch: self.worker_launch.clone(),
            start_timeout: self.start_timeout,
            kernel: self.kernel,
            ..Config::default()
        };
        let image = WorkerImage::new(&cfg)?;
        let stderr = WorkerStderr::new().map_err(|e| RunError::Resource {
            what: "cannot make the workers' stderr pipe".into(),
            why: e.to_string(),
        })?;
        let shared = Arc::new(Shared {
            ctl: Control::new(self.workers, self.producers),
            seg,
            image,
            stderr,
            cfg,
            registry: self.registry.clone(),
            mode: self.mode,
            max_retries: self.max_retries,
            pack_bytes: self.pack_bytes,
            pack_class,
            pack_time: self.pack_time,
            stream_inputs: self.streaming_stores && self.mode == Mode::OutOfPlace,
            keep_copies: self.keep_copies && self.mode == Mode::InPlace,
            spin: match self.wait {
                Wait::Sleep => SpinMode::Never,
                Wait::Auto if (self.workers as usize) < crate::sys::online_cpus() => SpinMode::Long,
                Wait::Auto => SpinMode::Short,
            },
            dispatch: self.dispatch,
            queue_ahead: self.queue_ahead,
            seed: self.seed,
            worker_cpus: self.worker_cpus.clone(),
            active: (0..self.producers)
                .map(|_| AtomicBool::new(false))
                .collect(),
            interrupt: (0..self.producers)
                .map(|_| AtomicBool::new(false))
                .collect(),
            closing: AtomicBool::new(false),
            terminating: AtomicBool::new(false),
            winding_down: AtomicBool::new(false),
            broken: Mutex::new(None),
            trouble: Mutex::new(None),
            restarts: crate::sync::AtomicU32::new(0),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let for_monitor = shared.clone();
        let monitor = std::thread::Builder::new()
            .name("mk1-monitor".into())
            .spawn(move || monitor_main(&for_monitor, &tx))
            .map_err(|e| RunError::Resource {
                what: "cannot start the pool's monitor thread".into(),
                why: e.to_string(),
            })?;
        // (`closing` during the start tells the monitor to give it up.)
        let mut interrupted = false;
        let started = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if !interrupted && stop() {
                        interrupted = true;
                        shared.closing.store(true, Ordering::Release);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break Err(()),
                Ok(r) => break Ok(r),
            }
        };
        match started {
            Ok(Ok(())) if !interrupted => Ok(Pool {
                shared,
                monitor: Some(monitor),
            }),
            Ok(Ok(())) => {
                // Started just as it was given up: stopped as a drop would.
                drop(Pool {
                    shared,
                    monitor: Some(monitor),
                });
                Err(PoolError::Interrupted)
            }
            Ok(Err(_)) if interrupted => {
                let _ = monitor.join();
                Err(PoolError::Interrupted)
            }
            Ok(Err(e)) => {
                let _ = monitor.join();
                Err(e.into())
            }
            Err(_) => {
                let _ = monitor.join();
                Err(RunError::Resource {
                    what: "the pool's monitor thread".into(),
                    why: "it ended before the workers started".into(),
                }
                .into())
            }
        }
    }
}

/// What the pool's threads share.
pub(crate) struct Shared {
    pub(crate) seg: Segment,
    pub(crate) ctl: Control,
    image: WorkerImage,
    stderr: WorkerStderr,
    cfg: Config,
    pub(crate) registry: Arc<Registry>,
    pub(crate) mode: Mode,
    pub(crate) max_retries: u32,
    pub(crate) pack_bytes: u64,
    /// The size class of [`PoolBuilder::pack_slots`], if the pool has one: loans never take
    /// its slots.
    pub(crate) pack_class: Option<usize>,
    /// [`PoolBuilder::pack_time`].
    pub(crate) pack_time: Duration,
    /// [`PoolBuilder::streaming_stores`], out of place.
    pub(crate) stream_inputs: bool,
    /// In place, inputs are copied at submit to redo tasks after a death.
    pub(crate) keep_copies: bool,
    pub(crate) spin: SpinMode,
    pub(crate) dispatch: DispatchKind,
    /// [`PoolBuilder::queue_ahead`] (`None`: no limit).
    pub(crate) queue_ahead: Option<Duration>,
    pub(crate) seed: u64,
    worker_cpus: Vec<usize>,
    /// `active[p]`: a [`Producer`] handle for `p` exists.
    pub(crate) active: Vec<AtomicBool>,
    /// `interrupt[p]`: handle `p`'s wait for a completion is to end ([`Interrupter`]).
    pub(crate) interrupt: Vec<AtomicBool>,
    /// The pool is being dropped.
    closing: AtomicBool,
    /// [`Pool::terminate`] was called: workers are killed now, handles stop waiting.
    pub(crate) terminating: AtomicBool,
    /// [`Pool::wind_down`] was called.
    winding_down: AtomicBool,
    /// Why the pool can run nothing any more (every worker gone for good).
    pub(crate) broken: Mutex<Option<String>>,
    /// The monitor's first reason to give up on part of the pool ([`Pool::trouble`]).
    trouble: Mutex<Option<String>>,
    restarts: crate::sync::AtomicU32,
}

/// [`PoolBuilder::pack_slots`] unless set: 32, or 8 per worker when that is more.
fn default_pack_slots(workers: u32) -> u32 {
    workers.saturating_mul(8).max(32)
}

/// The monitor thread: starts the workers (their parent-death signal is tied to this thread,
/// which lives as long as the pool), then watches them until the pool is dropped.
fn monitor_main(sh: &Shared, started: &std::sync::mpsc::Sender<Result<(), RunError>>) -> Shutdown {
    let coordinator = crate::sys::own_pid();
    let fingerprint = sh.registry.fingerprint();
    let spec = |w: u32| WorkerSpec {
        fd: sh.seg.fd().as_raw_fd(),
        index: w,
        coordinator,
        kernel: sh.cfg.kernel,
        cpu: sh.worker_cpus.get(w as usize).copied(),
        spin: sh.spin,
        tasks: fingerprint,
        gate: sh.ctl.gate(w, 0),
    };
    let procs = match start_workers(
        &sh.image,
        &sh.stderr,
        &sh.seg,
        sh.cfg.workers,
        sh.cfg.start_timeout,
        &sh.closing,
        &spec,
    ) {
        Ok(p) => p,
        Err(e) => {
            // A worker with other kernels names its own; the pool's are named here.
            let e = match e {
                RunError::WorkerStart { worker, exe, why }
                    if why.contains(crate::worker::OTHER_KERNELS) =>
                {
                    let why = format!("{why} (the pool's kernels: {})", sh.registry.describe());
                    RunError::WorkerStart { worker, exe, why }
                }
                e => e,
            };
            let _ = started.send(Err(e));
            return Shutdown::default();
        }
    };
    let mut monitor = Monitor::new(
        &sh.cfg, &sh.seg, &sh.ctl, &sh.image, &sh.stderr, &spec, procs,
    );
    monitor.short_drain = false;
    let _ = started.send(Ok(()));
    while !sh.closing.load(Ordering::Acquire) {
        if !monitor.short_drain && sh.winding_down.load(Ordering::Acquire) {
            // The stall clock of every worker then runs at most the shutdown grace, from now.
            monitor.short_drain = true;
            sh.ctl.stop.store(true, Ordering::Relaxed);
        }
        monitor.tick();
        sh.restarts.store(monitor.restarts, Ordering::Relaxed);
        if let Some(why) = &monitor.interrupted {
            let mut t = sh.trouble.lock().unwrap_or_else(|e| e.into_inner());
            if t.is_none() {
                *t = Some(why.clone());
            }
        }
        if sh.ctl.no_workers.load(Ordering::Acquire) {
            let mut b = sh.broken.lock().unwrap_or_else(|e| e.into_inner());
            if b.is_none() {
                *b = Some(
                    monitor
                        .interrupted
                        .clone()
                        .unwrap_or_else(|| "every worker is gone".into()),
                );
            }
        }
    }
    if sh.terminating.load(Ordering::Acquire) {
        // Killed now rather than asked to finish; any that would not die in time are left to
        // `shut_down`, which reports them.
        crate::coordinator::monitor::abandon(&mut monitor.procs);
    }
    let unreaped = monitor.shut_down();
    monitor.stderr.forward_or_drop(&mut monitor.stderr_pending);
    if !monitor.stderr_pending.is_empty() {
        // The last words of a worker that left mid-line.
        monitor.stderr_pending.push(b'\n');
        monitor.stderr.forward_or_drop(&mut monitor.stderr_pending);
    }
    Shutdown {
        exits: std::mem::take(&mut monitor.exits),
        restarts: monitor.restarts,
        faults: monitor.faults,
        gave_up: monitor.interrupted.take(),
        unreaped,
    }
}

/// How a pool's workers fared, from start to shutdown ([`Pool::shutdown`]).
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    /// Every worker death the pool saw while it served, in the order noticed (the exits at
    /// shutdown itself, and quiet retirements, are not listed).
    pub exits: Vec<WorkerExit>,
    /// Workers replaced (after deaths and retirements alike).
    pub restarts: u32,
    /// Workers killed for breaking the protocol (a bad token, a corrupted ring, a write to
    /// memory it may only read).
    pub faults: u32,
    /// Why the pool stopped serving before it was shut down (every worker gone for good: the
    /// restart limit, or replacements that cannot start), if it did.
    pub gave_up: Option<String>,
    /// Workers that could not be reaped before shutdown returned (stuck in the kernel).
    pub unreaped: Vec<Unreaped>,
}

/// A pool of worker processes running kernels on arrays in shared memory.
///
/// Dropping it asks every worker to finish and exit, waits up to 2 s, kills the rest and reaps
/// them all; the segment has no name, so nothing is left in `/dev/shm`. Handles borrow the
/// pool, so it cannot be dropped while one exists, and nothing can be submitted after it is
/// (the compiler refuses):
///
/// ```compile_fail
/// let pool = mk1::Pool::builder().build().unwrap();
/// let producer = pool.producer().unwrap();
/// drop(pool); // error: `pool` is borrowed by `producer`
/// let _ = producer.loan::<f32>(mk1::Shape::d1(4));
/// ```
pub struct Pool {
    shared: Arc<Shared>,
    monitor: Option<std::thread::JoinHandle<Shutdown>>,
}

impl Pool {
    /// The default settings: cores − 1 workers, one producer handle, 1 MiB slots, 4 slots per
    /// worker, maps packing up to 64 KiB of arrays per slot in 32 pack slots of 64 KiB (8 per
    /// worker when that is more), out of place, 2 retries, 10 s worker timeout, no user
    /// kernels.
    pub fn builder() -> PoolBuilder {
        let workers = crate::config::default_workers();
        PoolBuilder {
            workers,
            producers: 1,
            max_array_bytes: 1 << 20,
            slots_per_producer: None,
            size_classes: Vec::new(),
            mode: Mode::OutOfPlace,
            max_retries: 2,
            max_restarts: 1000,
            worker_timeout: Duration::from_secs(10),
            worker_exe: None,
            worker_launch: crate::sys::Launch::default(),
            start_timeout: crate::coordinator::START_TIMEOUT,
            kernel: Kernel::auto(),
            registry: Arc::new(Registry::new()),
            pack_bytes: 64 << 10,
            pack_slots: None,
            pack_time: map::PACK_TIME,
            streaming_stores: true,
            worker_memory: crate::limits::WORKER_MEMORY,
            keep_copies: false,
            dispatch: DispatchKind::LeastLoaded,
            queue_ahead: Some(crate::dispatch::DEFAULT_QUEUE_AHEAD),
            seed: 1,
            wait: Wait::Auto,
            worker_cpus: Vec::new(),
        }
    }

    /// A producer handle: one submitting thread's share of the slots. At most
    /// [`PoolBuilder::producers`] exist at once; dropping one makes its share available again.
    ///
    /// # Errors
    /// [`PoolError::NoHandle`] when every handle is in use.
    pub fn producer(&self) -> Result<Producer<'_>, PoolError> {
        for (p, a) in self.shared.active.iter().enumerate() {
            if a.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Ok(Producer::new(&self.shared, p as u32));
            }
        }
        Err(PoolError::NoHandle(self.shared.active.len() as u32))
    }

    /// Worker processes.
    pub fn workers(&self) -> u32 {
        self.shared.cfg.workers
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.shared.mode
    }

    /// Bytes of shared memory the pool maps (its segment: slots, rings, descriptors).
    pub fn segment_bytes(&self) -> u64 {
        self.shared.seg.len() as u64
    }

    /// Bytes of the largest array a slot holds.
    pub fn max_array_bytes(&self) -> u64 {
        producer::max_slot_bytes(self.shared.seg.layout())
    }

    /// Workers replaced so far, after deaths and retirements alike (as the monitor thread last
    /// published it: a replacement shows here within a few milliseconds of its start, which
    /// follows the death at once; it serves each handle once that handle has called in since).
    pub fn restarts(&self) -> u32 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    /// Why the pool's monitor gave up on part of the pool, if it did: a worker it could not
    /// kill (its tasks fail with [`TaskError::WorkerDied`] and its slots are retired, see
    /// [`Completion::quarantined`]), a worker it could not restart, or the restart limit
    /// reached. The workers left, if any, still serve; a caller that wants a pool that is
    /// whole stops here.
    pub fn trouble(&self) -> Option<String> {
        self.shared
            .trouble
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Pids of the worker processes now serving (for tests and diagnostics). A worker that
    /// has just died stays listed until the pool's monitor has noticed its exit (it polls the
    /// workers' pidfds: normally milliseconds), and its replacement is listed once it serves.
    pub fn worker_pids(&self) -> Vec<u32> {
        (0..self.shared.cfg.workers as usize)
            .filter(|&w| {
                // A replacement counts once it serves (its slot still shows the dead pid
                // until then).
                self.shared.ctl.alive[w].load(Ordering::Acquire)
                    && self
                        .shared
                        .seg
                        .worker(w as u32)
                        .status
                        .state
                        .load(Ordering::Acquire)
                        == crate::layout::WorkerState::Running as u32
            })
            .map(|w| {
                self.shared
                    .seg
                    .worker(w as u32)
                    .status
                    .pid
                    .load(Ordering::Relaxed)
            })
            .collect()
    }

    /// Tells the pool its caller is winding down (Ctrl-C, a deadline): from now on a worker
    /// that holds tasks and returns none is given at most 2 s, not the worker timeout, before
    /// it is killed (its task then fails with [`TaskError::Timeout`]), so waiting for what is
    /// in flight ends in bounded time: at most 2 s for each task that hangs, each retry of it
    /// included (a handle being dropped redoes nothing). Work can still be submitted.
    pub fn wind_down(&self) {
        self.shared.winding_down.store(true, Ordering::Release);
    }

    /// Stops the pool now: every worker is killed at once (tasks running are lost, not
    /// waited for), handles stop waiting, and work submitted from here on is refused with
    /// [`LoanError::NoWorkers`] / [`SubmitError::NoWorkers`]. Dropping the pool afterwards
    /// returns at once. For a caller that is giving up (Ctrl-C, an error); a plain drop waits
    /// for the tasks in flight instead.
    pub fn terminate(&self) {
        self.shared.terminating.store(true, Ordering::Release);
        self.shared.closing.store(true, Ordering::Release);
    }
}

impl Pool {
    /// Shuts the pool down as dropping it does (every worker is asked to finish and exit,
    /// waited for up to 2 s, then killed, and reaped) and says how its workers fared.
    pub fn shutdown(mut self) -> Shutdown {
        self.close().unwrap_or_default()
    }

    fn close(&mut self) -> Option<Shutdown> {
        self.shared.closing.store(true, Ordering::Release);
        self.monitor.take().and_then(|m| m.join().ok())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.close();
    }
}
