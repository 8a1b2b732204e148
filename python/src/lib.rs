//! `mk1._mk1`: the Python extension module. It is a thin layer over mk1's public Rust API
//! (`mk1::Pool`, its producer handle, `Registry::kernel_any_dtype`); the user-facing Python API
//! (`mk1.Pool`, `map`, futures, errors) is written in Python on top of it, in `mk1/`.
//!
//! Two roles, as in every mk1 program:
//! - the caller builds a [`PoolCore`], submits numpy arrays (copied once into a slot) and
//!   receives results (copied out into a new numpy array, or lent zero-copy as a [`View`]);
//! - a worker is the Python interpreter running `mk1._worker`, which calls [`serve`]: mk1's
//!   worker loop, whose one kernel (`py`, any dtype) hands each array to Python as a
//!   `memoryview` of shared memory and writes back what the function returned.

mod handle;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use handle::{HandleLock, Held};

use mk1::task::{AnyIo, KernelError, Output, Registry};
use mk1::{
    Completion, DType, LoanError, Mode, Pool, PoolError, Producer, Shape, SubmitError, Task,
    TaskError,
};
use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

pyo3::create_exception!(_mk1, Mk1Error, PyException, "Base class of mk1's errors.");
pyo3::create_exception!(
    _mk1,
    PoolStartError,
    Mk1Error,
    "The pool could not start (a setting, a limit of this machine, a worker that failed to start)."
);
pyo3::create_exception!(
    _mk1,
    WorkerDied,
    Mk1Error,
    "The worker running the task died, after every retry the pool's mode allows."
);
pyo3::create_exception!(
    _mk1,
    TaskTimeout,
    Mk1Error,
    "The task ran past the pool's timeout; its worker was killed and replaced."
);
pyo3::create_exception!(
    _mk1,
    NoWorkersLeft,
    Mk1Error,
    "Every worker is gone for good (restart limit, or workers that cannot start)."
);
pyo3::create_exception!(
    _mk1,
    ArrayTooLarge,
    Mk1Error,
    "An array (or a function's result) does not fit a slot: see Pool(max_array_bytes=...)."
);
pyo3::create_exception!(
    _mk1,
    RemoteError,
    Mk1Error,
    "The function failed in the worker and its exception could not be rebuilt here."
);
pyo3::create_exception!(
    _mk1,
    Busy,
    Mk1Error,
    "Every slot is in use (internal: the Python layer receives a result and retries)."
);
pyo3::create_exception!(
    _mk1,
    StepTimeout,
    PyException,
    "A map's step waited its own timeout (internal: `MapIter.next_within` returns None)."
);

/// Memory a Python worker takes of its own, for the pool's check against memory limits: one
/// with numpy imported had 18 MiB of private pages (`/proc/PID/smaps_rollup`); a function's
/// own imports add to that.
const PYTHON_WORKER_MEMORY: u64 = 32 << 20;

/// Bytes of each slot kept for the pickled function that travels with every array.
const CONTEXT_ROOM: u64 = 64 << 10;

/// The kernel every Python pool registers, in the caller and in the workers alike.
const PY_KERNEL: &str = "py";

/// The registry of a Python pool: one kernel for every dtype that calls the Python function
/// the task's context names. Built identically in callers and workers.
fn registry() -> Registry {
    Registry::new().kernel_any_dtype::<PyWorker>(
        PY_KERNEL,
        |info| {
            Python::attach(|py| PyWorker::new(py, info.worker, info.workers))
                .map_err(|e| KernelError::new(python_error_text(&e)))
        },
        |state, args| Python::attach(|py| state.call(py, args)),
    )
}

/// A worker's Python side: `mk1._worker`'s entry points, numpy's dtype objects by mk1 dtype,
/// and the last function unpickled (tasks of one map carry the same pickled function, so it
/// is unpickled once).
struct PyWorker {
    run: Py<PyAny>,
    load: Py<PyAny>,
    dtypes: Vec<Py<PyAny>>,
    last: Option<(Vec<u8>, Py<PyAny>, bool)>,
    /// This worker's pid: a process forked by the function and returning here is not it.
    pid: u32,
}

impl PyWorker {
    fn new(py: Python<'_>, worker: u32, workers: u32) -> PyResult<PyWorker> {
        let m = py.import("mk1._worker")?;
        let codes = pyo3::types::PyDict::new(py);
        for d in DType::ALL {
            codes.set_item(d.name(), d.code())?;
        }
        m.call_method1("_init", (worker, workers, codes))?;
        let numpy = py.import("numpy")?;
        let dtypes = DType::ALL
            .iter()
            .map(|d| Ok(numpy.call_method1("dtype", (d.name(),))?.unbind()))
            .collect::<PyResult<_>>()?;
        Ok(PyWorker {
            run: m.getattr("_run")?.unbind(),
            load: m.getattr("_load")?.unbind(),
            dtypes,
            last: None,
            pid: std::process::id(),
        })
    }

    /// Runs one array through the task's Python function (`mk1._worker._run`).
    fn call(
        &mut self,
        py: Python<'_>,
        args: mk1::task::AnyArgs<'_>,
    ) -> Result<Output, KernelError> {
        if self
            .last
            .as_ref()
            .is_none_or(|(c, _, _)| c.as_slice() != args.context)
        {
            // (`new_with`: a MemoryError, not a panic, when the bytes cannot be allocated.)
            let context = PyBytes::new_with(py, args.context.len(), |b| {
                b.copy_from_slice(args.context);
                Ok(())
            })
            .map_err(py_err)?;
            let loaded = self.load.call1(py, (context,)).map_err(py_err)?;
            let (f, wants_out): (Py<PyAny>, bool) = loaded.extract(py).map_err(py_err)?;
            self.last = Some((args.context.to_vec(), f, wants_out));
        }
        let (_, f, wants_out) = self.last.as_ref().expect("just set");
        let n_in = args.shape.bytes(args.dtype) as usize;
        let (input, output, in_place) = match args.io {
            // SAFETY (both arms): the memoryviews point into this worker's mapping of the
            // segment, which lives as long as the process; they are valid for this call, and
            // Python code that keeps one past it reads the slot's later contents, never
            // unmapped memory. The read-only one is made with PyBUF_READ, so Python cannot
            // write through it (out of place it is also mapped read-only).
            AnyIo::InPlace(buf) => unsafe {
                let mv = memoryview(py, buf.as_mut_ptr(), buf.len(), true)?;
                (mv.clone(), mv, true)
            },
            AnyIo::OutOfPlace { input, output } => unsafe {
                (
                    memoryview(py, input.as_ptr().cast_mut(), n_in, false)?,
                    memoryview(py, output.as_mut_ptr(), output.len(), true)?,
                    false,
                )
            },
        };
        let dtype = &self.dtypes[DType::ALL
            .iter()
            .position(|&d| d == args.dtype)
            .expect("every dtype")];
        let shape = PyTuple::new(py, args.shape.dims().iter().copied()).map_err(py_err)?;
        let views = (input.clone(), output.clone());
        let answer = self
            .run
            .call1(py, (f, *wants_out, input, dtype, shape, output, in_place))
            .map_err(py_err);
        if std::process::id() != self.pid {
            // A child the function forked (and that did not exit) came back here: it must not
            // serve this worker's rings. It leaves at once, without Python's exit handlers.
            let _ = py
                .import("os")
                .and_then(|os| os.call_method1("_exit", (0,)));
            std::process::abort();
        }
        // Views of the slot must not outlive the call: a function that kept its input or
        // output array (a global, a thread) would read or write other tasks' data later. Such
        // a task fails, and the worker is replaced after answering (the reference cannot be
        // taken back; the process that holds it goes).
        // A kept array holds its memoryview (its `base`), so the view has more references than
        // ours (in place, the two of `views` are one object); `release` fails while the view's
        // buffer is exported.
        let own = if in_place { 2 } else { 1 };
        let release = || {
            [&views.0, &views.1].iter().any(|v| {
                // SAFETY: `v` is a live object (we hold a reference) and the GIL is held.
                let refs = unsafe { pyo3::ffi::Py_REFCNT(v.as_ptr()) };
                refs > own || v.call_method0("release").is_err()
            })
        };
        // (A reference cycle that holds the array is garbage, not a kept reference: collect
        // it. Another thread that is just letting go of a part of it (a thread pool that ran
        // pieces of the array) gets a few moments, the GIL given up meanwhile.)
        let kept = release() && {
            let _ = py.import("gc").and_then(|gc| gc.call_method0("collect"));
            let sleep = py.import("time").and_then(|t| t.getattr("sleep"));
            (0..20).all(|_| release() && sleep.as_ref().is_ok_and(|s| s.call1((0.0005,)).is_ok()))
                && release()
        };
        if kept {
            mk1::worker::retire_after_this_task(
                "the Python function kept a reference to its input or output array",
            );
            return Err(KernelError::new(
                "the function kept a reference to its input or output array (or a view of \
                 it) after returning; those arrays are shared memory that the next tasks \
                 reuse, so the task fails and its worker is replaced: keep a copy instead \
                 (np.array(x))",
            ));
        }
        let answer = answer?;
        // `_run` returns (dtype code, shape) or (None, message) for an exception.
        let (code, shape): (Option<u8>, Bound<'_, PyAny>) = answer.extract(py).map_err(py_err)?;
        let Some(code) = code else {
            return Err(KernelError::new(shape.extract::<String>().map_err(py_err)?));
        };
        let dims: Vec<usize> = shape.extract().map_err(py_err)?;
        let dtype = DType::from_code(code)
            .ok_or_else(|| KernelError::new(format!("no dtype has code {code}")))?;
        let shape = Shape::new(&dims).map_err(|e| KernelError::new(e.to_string()))?;
        Ok(Output { dtype, shape })
    }
}

/// A memoryview of `len` bytes at `ptr`.
///
/// # Safety
/// `ptr..ptr + len` must stay mapped for as long as Python may use the view (here: the
/// worker's life), and be writable if `writable`.
unsafe fn memoryview(
    py: Python<'_>,
    ptr: *mut u8,
    len: usize,
    writable: bool,
) -> Result<Bound<'_, PyAny>, KernelError> {
    let flags = if writable {
        pyo3::ffi::PyBUF_WRITE
    } else {
        pyo3::ffi::PyBUF_READ
    };
    // An empty array still needs a valid pointer.
    let ptr = if len == 0 {
        std::ptr::NonNull::<u8>::dangling().as_ptr()
    } else {
        ptr
    };
    // SAFETY: the caller's promise; PyMemoryView_FromMemory returns a new reference or NULL
    // with an exception set, which `from_owned_ptr_or_err` turns into a PyErr.
    unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            pyo3::ffi::PyMemoryView_FromMemory(ptr.cast(), len as isize, flags),
        )
    }
    .map_err(py_err)
}

/// A Python exception raised in the worker's own glue (not in the user's function, whose
/// exceptions `_run` returns as text), as a kernel error with its traceback.
fn py_err(e: PyErr) -> KernelError {
    KernelError::new(python_error_text(&e))
}

/// An exception's formatted traceback and message.
fn python_error_text(e: &PyErr) -> String {
    Python::attach(|py| {
        let tb = e
            .traceback(py)
            .and_then(|tb| tb.format().ok())
            .unwrap_or_default();
        format!("{tb}{e}")
    })
}

/// Ends this worker process once its task now running has been answered, and the pool starts
/// a replacement (not charged to `max_restarts`); quietly (the pool's `max_tasks_per_child`).
/// Outside a worker it does nothing.
#[pyfunction]
fn retire_after_this_task() {
    mk1::worker::retire_after_this_task("");
}

/// Serves as the worker `spec` describes (the value of `MK1_WORKER`, which the caller took
/// out of `os.environ`, so that what the worker's calls start is no worker) and never
/// returns; returns at once for `None`.
#[pyfunction]
#[pyo3(signature = (spec))]
fn serve(py: Python<'_>, spec: Option<std::ffi::OsString>) {
    let Some(spec) = spec else {
        return;
    };
    let registry = registry();
    // The worker loop runs without the GIL; the kernel takes it for each array.
    py.detach(|| mk1::worker::serve_and_exit(&spec, &registry));
}

/// The caller's pool and its one producer handle. The handle borrows the pool, so both live
/// behind one `Arc` (kept by every [`View`] too): the segment stays mapped while any lent result
/// is alive, even after `close()`.
struct Inner {
    // Dropped first (see `Drop`): it borrows `pool`.
    producer: ManuallyDrop<Producer<'static>>,
    pool: ManuallyDrop<Box<Pool>>,
    lock: Arc<HandleLock>,
}

// SAFETY: the producer handle (not thread-safe) is used, and `Inner` dropped, only by the thread
// that holds `lock` (see `handle`): every path to it takes the lock first, and the lock's mutex
// orders one holder's accesses before the next one's. The pool itself is thread-safe.
unsafe impl Send for Inner {}
// SAFETY: as for `Send`.
unsafe impl Sync for Inner {}

impl Drop for Inner {
    /// Runs while the lock is held (its last reference goes under it).
    fn drop(&mut self) {
        // SAFETY: the interrupter borrows the producer: it is cleared first. Then each field
        // is dropped exactly once, here, the producer (which borrows the pool) before the pool.
        unsafe {
            self.lock.set_interrupter(None);
            ManuallyDrop::drop(&mut self.producer);
            ManuallyDrop::drop(&mut self.pool);
        }
    }
}

impl Inner {
    fn new(pool: Pool, lock: Arc<HandleLock>) -> Result<Arc<Inner>, PoolError> {
        let pool = Box::new(pool);
        // SAFETY: the producer borrows the pool on the heap (a Box never moves its contents),
        // and `Inner` drops the producer before the pool, so the borrow never outlives it; the
        // 'static lifetime never leaves this struct except inside completions and views that
        // hold an `Arc<Inner>` themselves (see `View`), and the lock's interrupter, which
        // `Inner::drop` clears.
        let pool_ref: &'static Pool = unsafe { &*(&*pool as *const Pool) };
        let producer = pool_ref.producer()?;
        let inner = Inner {
            producer: ManuallyDrop::new(producer),
            pool: ManuallyDrop::new(pool),
            lock,
        };
        // SAFETY: cleared by `Inner::drop` before the producer goes.
        unsafe {
            inner
                .lock
                .set_interrupter(Some(inner.producer.interrupter()))
        };
        Ok(Arc::new(inner))
    }
}

/// Wrapper that lets a closure holding `!Send` references run with the GIL released. Sound
/// here because `Python::detach` runs the closure on this same thread, which holds the pool's
/// lock meanwhile (no other thread can reach the objects touched).
struct OnThisThread<T>(T);
// SAFETY: see the type's doc: the value never actually moves to another thread.
unsafe impl<T> Send for OnThisThread<T> {}

/// The Rust side of `mk1.Pool`. Usable from any thread: each method takes the pool's lock.
#[pyclass(frozen, module = "mk1._mk1")]
struct PoolCore {
    lock: Arc<HandleLock>,
    /// Taken (under `lock`) by `close`; cloned only under `lock`, so the last reference to the
    /// pool always goes while the lock is held.
    shared: Mutex<Option<Arc<Shared>>>,
}

/// What a pool's Python objects share: the pool and its handle, parsed ops, and where each
/// ticket's result goes.
struct Shared {
    inner: Arc<Inner>,
    /// The largest array the caller may send (the slot has room for the function too).
    max_array_bytes: u64,
    ops: RefCell<HashMap<String, Task>>,
    router: RefCell<Router>,
    /// Lent results dropped while another thread held the lock, dropped by the next holder
    /// (see [`View`]).
    orphans: Orphans,
}

// SAFETY: the `RefCell`s (and `inner`'s handle) are used, and `Shared` dropped, only by the
// thread that holds the pool's lock (see `handle`): every method of `PoolCore` and `MapIter`
// takes it before reaching a `Shared`, and clones or drops an `Arc<Shared>` only under it.
unsafe impl Send for Shared {}
// SAFETY: as for `Send`.
unsafe impl Sync for Shared {}

impl Drop for Shared {
    /// Under the lock: the lent results already dropped elsewhere go now; any dropped later
    /// without the lock are leaked (see [`Orphans`]).
    fn drop(&mut self) {
        self.orphans.adopt(true);
    }
}

/// Results of `map`s by ticket: a completion received by any call goes to its map (several
/// maps, and futures, may be in flight at once on the one handle).
#[derive(Default)]
struct Router {
    owner: HashMap<u64, (u64, Vec<u64>)>, // ticket -> (map id, input index of each array)
    /// Ticket -> the future its result goes to (registered with the submit, under the lock, so
    /// that no other thread can receive the result first).
    sinks: HashMap<u64, Py<PyAny>>,
    maps: HashMap<u64, MapState>,
    next_map: u64,
}

#[derive(Default)]
struct MapState {
    /// Index -> (ok, result or exception, whether the result is lent from shared memory).
    ready: std::collections::BTreeMap<u64, (bool, Py<PyAny>, bool)>,
    in_flight: usize,
    /// A map in order with `reorder` shares what it holds ahead with its state here: the
    /// results received as copies (not lent) count there as they are parked, as those it
    /// copies out later do (see `MapIter::spill`).
    ahead: Option<Arc<Mutex<Ahead>>>,
}

impl MapState {
    /// Whether a result can go to the caller now: input `next`'s (`ordered`), or any.
    fn has_result_out(&self, ordered: bool, next: u64) -> bool {
        if ordered {
            self.ready.contains_key(&next)
        } else {
            !self.ready.is_empty()
        }
    }
}

/// A completion as Python sees it: `(future, worker, ok, payload, dtype, shape)` (the future
/// given at submit, or None).
type Got = Py<PyTuple>;

impl Shared {
    fn producer(&self) -> &'static Producer<'static> {
        // SAFETY: the producer lives in `inner`, which outlives every use made of this
        // reference: the calls that take it hold `self` (and so `inner`), and completions that
        // outlive a call are kept in a `View` together with an `Arc<Inner>`.
        unsafe { &*(&*self.inner.producer as *const Producer<'static>) }
    }

    /// The built-in `op` (cached by its text), or the Python function pickled in `context`;
    /// with `retries`, its own bound on redos after a death (see `Task::max_retries`).
    fn task(
        &self,
        op: Option<&str>,
        context: Option<&[u8]>,
        retries: Option<u32>,
    ) -> PyResult<Task> {
        let task = match op {
            Some(text) => {
                let mut ops = self.ops.borrow_mut();
                if let Some(t) = ops.get(text) {
                    t.clone()
                } else {
                    let t = Task::op(text).map_err(|e| PyValueError::new_err(e.to_string()))?;
                    ops.insert(text.to_string(), t.clone());
                    t
                }
            }
            None => Task::kernel(PY_KERNEL).context(context.unwrap_or(&[])),
        };
        Ok(match retries {
            Some(n) => task.max_retries(n),
            None => task,
        })
    }

    /// Submits `input`: a numpy array ([`Shared::submit_array`]), or anything else as a
    /// bundle writer ([`Shared::submit_bundle`]).
    fn submit(&self, input: &Bound<'_, PyAny>, task: &Task) -> PyResult<u64> {
        match input.cast::<PyUntypedArray>() {
            Ok(array) => self.submit_array(array, task),
            Err(_) => self.submit_bundle(input, task),
        }
    }

    /// Loans a slot of `writer.nbytes` bytes and has `writer.write(room)` write them there
    /// (`room` a writable buffer of those bytes, [`Room`], valid during that call only), then
    /// submits them as a uint8 array: how a calls bundle (`mk1._args.Writer`) goes into its
    /// slot without a copy of its own. Raises `Busy` when no slot is free, `ArrayTooLarge`
    /// when it does not fit a slot beside the task's pickled function, and whatever `write`
    /// raised (the slot goes back).
    fn submit_bundle(&self, writer: &Bound<'_, PyAny>, task: &Task) -> PyResult<u64> {
        let py = writer.py();
        let nbytes: u64 = writer.getattr(intern!(py, "nbytes"))?.extract()?;
        // (What Python lets a bundle take is its own rule, `mk1._args.ROOM`; the loan and the
        // submit refuse, with `ArrayTooLarge`, one that does not fit its slot beside the
        // task's pickled function.)
        self.orphans.adopt(false);
        let p = self.producer();
        let mut loan = p
            .try_loan::<u8>(Shape::d1(nbytes as u32))
            .map_err(loan_error)?;
        let bytes = loan.as_mut_slice();
        let room = Bound::new(
            py,
            Room {
                ptr: bytes.as_mut_ptr() as usize,
                len: bytes.len(),
                open: Cell::new(true),
                exports: Cell::new(0),
            },
        )?;
        let wrote = writer.call_method1(intern!(py, "write"), (&room,));
        let room = room.borrow();
        room.open.set(false);
        if room.exports.get() > 0 {
            // A view of the slot outlived the write: the slot could be written through it
            // after its submit, so it never goes back (nor out); and the segment stays
            // mapped for good (the pool's workers still stop at close), so that writing
            // through that view never faults.
            std::mem::forget(loan);
            std::mem::forget(Arc::clone(&self.inner));
            return Err(Mk1Error::new_err(
                "a view of a slot outlived the writing of its bundle (a bug of mk1's); that \
                 slot is out of use",
            ));
        }
        wrote?;
        p.submit_bytes(loan, DType::U8, Shape::d1(nbytes as u32), task)
            .map(|t| t.0)
            .map_err(|r| submit_error(r.error))
    }

    /// Copies `array` into a free slot and submits it (raises `Busy` when none is free).
    fn submit_array(&self, array: &Bound<'_, PyUntypedArray>, task: &Task) -> PyResult<u64> {
        let dtype = dtype_of(array)?;
        if !array.is_c_contiguous() {
            return Err(PyValueError::new_err("the array must be C-contiguous"));
        }
        let shape = Shape::new(array.shape()).map_err(|e| PyValueError::new_err(e.to_string()))?;
        let nbytes = shape.bytes(dtype) as usize;
        if nbytes as u64 > self.max_array_bytes {
            return Err(ArrayTooLarge::new_err(format!(
                "an array of {nbytes} bytes ({shape} {dtype}) is larger than the pool's \
                 max_array_bytes, {} (mk1.Pool(max_array_bytes=...); each of its slots \
                 takes that much memory, twice out of place, from the start: for a few large \
                 arrays give fewer slots too, mk1.Pool(slots=...))",
                self.max_array_bytes
            )));
        }
        self.orphans.adopt(false);
        let p = self.producer();
        let mut loan = p
            .try_loan::<u8>(Shape::d1(nbytes as u32))
            .map_err(loan_error)?;
        // SAFETY: the array is C-contiguous (checked above), and we hold the GIL.
        loan.copy_from_slice(unsafe { array_bytes(array) });
        p.submit_bytes(loan, dtype, shape, task)
            .map(|t| t.0)
            .map_err(|r| submit_error(r.error))
    }

    /// Receives one completion, waiting at most `timeout` seconds with the GIL released. A
    /// map's result goes to its map (`Ok(Some(None))`); any other comes back.
    /// `lend_to`: the map (a `zero_copy` one, or one of batches) whose single-array results of
    /// at least the bytes given are lent, not copied; results of anything else are copied.
    fn recv(
        &self,
        py: Python<'_>,
        timeout: f64,
        lend_to: Option<(u64, usize)>,
    ) -> PyResult<Option<Option<Got>>> {
        self.orphans.adopt(false);
        let p = self.producer();
        // (A thread waits to submit: look once, and give the lock up.)
        let timeout = if self.inner.lock.contended() {
            0.0
        } else {
            timeout
        };
        let got = if timeout <= 0.0 {
            p.try_recv()
        } else {
            let wait = OnThisThread(p);
            py.detach(move || {
                let p = wait;
                OnThisThread(p.0.recv_timeout(Duration::from_secs_f64(timeout)))
            })
            .0
        };
        let Some(done) = got else {
            return Ok(None);
        };
        let ticket = done.ticket().0;
        let worker = done.worker().map_or(-1, i64::from);
        let dtype = done.dtype().name();
        let shape = PyTuple::new(py, done.shape().dims().iter().copied())?;
        let owner = self.router.borrow_mut().owner.remove(&ticket);
        let lend = match (&owner, lend_to) {
            (Some((map, _)), Some((to, least))) if *map == to => Some(least),
            _ => None,
        };
        let arrays = owner.as_ref().map_or(1, |(_, indices)| indices.len());
        let (mut results, lent) = match self.results_of(py, done, lend) {
            Ok(results) => results,
            // The results could not be made here (memory, say): each array still gets an
            // answer, this error, so no future or map waits for it forever.
            Err(e) if !e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) => {
                let e = e.into_value(py).into_any();
                let failed = (0..arrays).map(|_| (false, e.bind(py).clone())).collect();
                (failed, false)
            }
            Err(e) => return Err(e),
        };
        if let Some((map, indices)) = owner {
            let mut router = self.router.borrow_mut();
            if let Some(state) = router.maps.get_mut(&map) {
                state.in_flight -= indices.len();
                for (index, (ok, payload)) in indices.into_iter().zip(results) {
                    let lent = lent && ok;
                    if let (false, Some(ahead)) = (lent, &state.ahead) {
                        // A copy waiting for its turn holds no slot: it counts as one spilled.
                        let bytes = if ok { nbytes_of(&payload) } else { 0 };
                        lock_ahead(ahead).add_spilled(index, bytes);
                    }
                    state.ready.insert(index, (ok, payload.unbind(), lent));
                }
            }
            return Ok(Some(None));
        }
        let (ok, payload) = results.swap_remove(0);
        let sink = self.router.borrow_mut().sinks.remove(&ticket);
        Ok(Some(Some(
            PyTuple::new(
                py,
                [
                    sink.map_or_else(|| py.None().into_bound(py), |f| f.into_bound(py)),
                    worker.into_pyobject(py)?.into_any(),
                    pyo3::types::PyBool::new(py, ok).to_owned().into_any(),
                    payload,
                    dtype.into_pyobject(py)?.into_any(),
                    shape.into_any(),
                ],
            )?
            .unbind(),
        )))
    }

    /// Each array's `(ok, result or exception)`, and whether the result was lent: new numpy
    /// arrays, or for a single array of at least `lend` bytes, a read-only array lent from
    /// shared memory (its slot goes home when it is gone).
    fn results_of<'py>(
        &self,
        py: Python<'py>,
        done: Completion<'static>,
        lend: Option<usize>,
    ) -> PyResult<(Vec<ItemResult<'py>>, bool)> {
        // (The span is taken as numbers: the completion itself moves into the view below.)
        let lent_span = match (lend, done.output_bytes()) {
            (Some(least), Ok(bytes))
                if done.len() == 1 && done.error().is_none() && bytes.len() >= least =>
            {
                Some((bytes.as_ptr() as usize, bytes.len()))
            }
            _ => None,
        };
        if let Some((ptr, len)) = lent_span {
            let dtype = done.dtype().name();
            let shape = PyTuple::new(py, done.shape().dims().iter().copied())?;
            let view = Bound::new(
                py,
                View {
                    ptr,
                    len,
                    lock: self.inner.lock.clone(),
                    lent: std::sync::Mutex::new(Some(OnPoolThread {
                        _lent: Lent {
                            _done: done,
                            _inner: self.inner.clone(),
                        },
                    })),
                    orphans: self.orphans.clone(),
                    holder: std::thread::current().id(),
                },
            )?;
            self.orphans.lend(std::thread::current().id());
            let a = py
                .import("numpy")?
                .call_method1("frombuffer", (view, dtype))?
                .call_method1("reshape", (shape,))?;
            return Ok((vec![(true, a)], true));
        }
        let results = (0..done.len())
            .map(|k| {
                Ok(match done.item_bytes(k) {
                    Err(e) => (false, task_error(py, &e)),
                    Ok(b) => (
                        true,
                        copy_out(py, done.item_dtype(k), done.item_shape(k), b)?,
                    ),
                })
            })
            .collect::<PyResult<_>>()?;
        Ok((results, false))
    }
}

/// One array's result: `(ok, the array or the exception)`.
type ItemResult<'py> = (bool, Bound<'py, PyAny>);

fn start_error(e: PoolError) -> PyErr {
    PoolStartError::new_err(pythonize(&e.to_string()))
}

/// A message of the Rust API or the command line, in the Python API's words.
fn pythonize(msg: &str) -> String {
    msg.replace(
        "(PoolBuilder::max_array_bytes)",
        "(mk1.Pool(max_array_bytes=...))",
    )
    .replace(
        "PoolBuilder::max_array_bytes",
        "mk1.Pool(max_array_bytes=...)",
    )
    .replace(
        "(for a loan, the largest slot: mk1.Pool(max_array_bytes=...); for reuse and reshape, \
         the slot at hand)",
        "(mk1.Pool(max_array_bytes=...))",
    )
    .replace("slots_per_producer", "slots")
    .replace(
        "--max-dim, --inflight or --workers",
        "max_array_bytes, slots or workers",
    )
    // (The Python workers' one kernel, "py", runs the pool's initializer as its init.)
    .replace(
        "; a program used as the worker must call mk1::run_if_worker() (or run_if_worker_with) \
         first thing in main",
        "; the initializer, or the main script as the worker imported it, may have ended it \
         (os._exit, sys.exit)",
    )
    .replace("init of kernel \"py\" failed: ", "its initializer failed: ")
    .replace(
        "init of kernel \"py\" panicked: ",
        "its initializer failed: ",
    )
    .trim_end()
    .to_string()
}

/// Bytes of an array's data.
fn nbytes(array: &Bound<'_, PyUntypedArray>) -> usize {
    array.len() * array.dtype().itemsize()
}

impl PoolCore {
    /// The pool's shared state; `held` proves the lock is held (the reference, cloned here,
    /// is dropped before the lock: declare it after the `Held`).
    fn shared(&self, _held: &Held<'_>) -> PyResult<Arc<Shared>> {
        if self.lock.is_gone() {
            return Err(PyValueError::new_err("the pool is closed"));
        }
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| PyValueError::new_err("the pool is closed"))
    }

    /// Runs `f` on the pool's state with the lock held (taken to do work now: see `handle`).
    fn with<T>(&self, py: Python<'_>, f: impl FnOnce(&Arc<Shared>) -> PyResult<T>) -> PyResult<T> {
        if self.lock.is_gone() {
            return Err(PyValueError::new_err("the pool is closed"));
        }
        let held = self.lock.acquire(py);
        let sh = self.shared(&held)?;
        f(&sh)
    }
}

/// What `m` holds, taken out by the owner about to drop it (a poisoned mutex still gives it:
/// a panic elsewhere must not leak the pool).
fn take_out<T>(m: &mut Mutex<Option<T>>) -> Option<T> {
    m.get_mut().unwrap_or_else(|e| e.into_inner()).take()
}

impl Drop for PoolCore {
    /// A pool dropped without `close` (its finalizer normally closes it first): its state
    /// goes under the lock; in a child made by `fork()` it is forgotten, never touched.
    fn drop(&mut self) {
        let Some(shared) = take_out(&mut self.shared) else {
            return;
        };
        if self.lock.is_gone() {
            std::mem::forget(shared);
            return;
        }
        Python::attach(|py| {
            let _held = self.lock.acquire(py);
            drop(shared);
        });
    }
}

/// The dtype mk1 uses for a numpy dtype.
fn dtype_of(a: &Bound<'_, PyUntypedArray>) -> PyResult<DType> {
    let d = a.dtype();
    let native = d.is_native_byteorder() != Some(false);
    let dtype = match (d.kind(), d.itemsize()) {
        _ if !native => None,
        (b'i', 1) => Some(DType::I8),
        (b'u', 1) => Some(DType::U8),
        (b'i', 2) => Some(DType::I16),
        (b'u', 2) => Some(DType::U16),
        (b'i', 4) => Some(DType::I32),
        (b'u', 4) => Some(DType::U32),
        (b'i', 8) => Some(DType::I64),
        (b'u', 8) => Some(DType::U64),
        (b'f', 4) => Some(DType::F32),
        (b'f', 8) => Some(DType::F64),
        _ => None,
    };
    dtype.ok_or_else(|| {
        PyValueError::new_err(format!(
            "mk1 carries int8..int64, uint8..uint64, float32 and float64 arrays (native byte \
             order), not {d}"
        ))
    })
}

#[pymethods]
impl PoolCore {
    /// Starts the pool (see `mk1.Pool` for the meaning of each argument).
    #[new]
    #[pyo3(signature = (workers, in_place, max_array_bytes, slots, max_retries, max_restarts, timeout, keep_copies, worker_exe, worker_args, worker_env, worker_fd, start_timeout, queue_ahead))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        workers: u32,
        in_place: bool,
        max_array_bytes: u64,
        slots: u32,
        max_retries: u32,
        max_restarts: u32,
        timeout: Option<f64>,
        keep_copies: bool,
        worker_exe: String,
        worker_args: Vec<String>,
        worker_env: Vec<(String, String)>,
        worker_fd: Option<(String, i32)>,
        start_timeout: f64,
        queue_ahead: Option<f64>,
    ) -> PyResult<PoolCore> {
        if start_timeout.is_nan() || start_timeout <= 0.0 {
            return Err(PyValueError::new_err(format!(
                "start_timeout {start_timeout} is not a number of seconds > 0"
            )));
        }
        // (Infinity means no limit: a year.)
        let start_timeout = start_timeout.min(YEAR_S);
        let largest = mk1::layout::MAX_SLOT_BYTES - CONTEXT_ROOM;
        if max_array_bytes > largest {
            return Err(PyValueError::new_err(format!(
                "max_array_bytes {max_array_bytes} is larger than {largest}: the largest \
                 slot, {} bytes, less the {CONTEXT_ROOM} kept in each for the function and \
                 its other arguments",
                mk1::layout::MAX_SLOT_BYTES
            )));
        }
        let queue_ahead = match queue_ahead {
            Some(t) if t.is_nan() || t < 0.0 => {
                return Err(PyValueError::new_err(format!(
                    "queue_ahead {t} is not a number of seconds >= 0 (None: no limit)"
                )))
            }
            Some(t) if t < YEAR_S => Duration::from_secs_f64(t),
            _ => Duration::MAX,
        };
        let timeout = match timeout {
            Some(t) if t.is_nan() || t <= 0.0 => {
                return Err(PyValueError::new_err(format!(
                    "timeout {t} is not a number of seconds > 0 (None or inf: no limit)"
                )))
            }
            Some(t) => Duration::from_secs_f64(t.min(YEAR_S)),
            None => Duration::from_secs_f64(YEAR_S),
        };
        let mut b = Pool::builder()
            .workers(workers)
            .mode(if in_place {
                Mode::InPlace
            } else {
                Mode::OutOfPlace
            })
            // Room for the pickled function beside the largest array.
            .max_array_bytes(max_array_bytes.saturating_add(CONTEXT_ROOM))
            .slots_per_producer(slots)
            .max_retries(max_retries)
            .max_restarts(max_restarts)
            .worker_timeout(timeout)
            .keep_copies(keep_copies)
            .pack_bytes(0)
            .worker_exe(worker_exe)
            .worker_args(worker_args)
            // A Python worker with numpy imported took 18 MiB of its own (2026-12-02).
            .worker_memory(PYTHON_WORKER_MEMORY)
            .inherit_stdout(true)
            .start_timeout(Duration::from_secs_f64(start_timeout))
            .queue_ahead(queue_ahead)
            .kernels(registry());
        for (k, v) in worker_env {
            b = b.worker_env(k, v);
        }
        if let Some((key, fd)) = worker_fd {
            if fd < 0 {
                return Err(PyValueError::new_err(format!(
                    "worker_fd {fd} is no descriptor"
                )));
            }
            // SAFETY: `fd` is not negative, and the caller keeps it open for this call (the
            // package's `_pool` does, and closes its own after it); the pool gets a duplicate
            // of its own (close-on-exec, numbered 3 or more).
            let own = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
                .try_clone_to_owned()
                .map_err(|e| PyOSError::new_err(format!("cannot duplicate worker_fd {fd}: {e}")))?;
            b = b.worker_fd(key, own);
        }
        // Workers start (and import numpy, run the initializer) meanwhile: no GIL needed,
        // except to look for Ctrl-C every 50 ms (a signal handler that raises gives the
        // start up; its exception is raised here once the workers are stopped).
        let mut signalled: Option<PyErr> = None;
        let built = py.detach(|| {
            OnThisThread(b.build_interruptible(|| {
                Python::attach(|py| py.check_signals())
                    .map_err(|e| signalled = Some(e))
                    .is_err()
            }))
        });
        if let Some(e) = signalled {
            return Err(e);
        }
        let pool = built.0.map_err(start_error)?;
        let lock = Arc::new(HandleLock::new());
        let inner = Inner::new(pool, lock.clone()).map_err(start_error)?;
        Ok(PoolCore {
            lock,
            shared: Mutex::new(Some(Arc::new(Shared {
                inner,
                max_array_bytes,
                ops: RefCell::new(HashMap::new()),
                router: RefCell::new(Router::default()),
                orphans: Orphans::new(),
            }))),
        })
    }

    /// Copies `array` (C-contiguous, 1 to 4 dimensions) into a free slot and submits it, to run
    /// the built-in `op` (text such as "affine:3,1") or, when `op` is None, the Python
    /// function pickled in `context`; its result will come back with `sink` (a future).
    /// `retries`: the task's own bound on redos after its worker died (None: the pool's).
    /// Returns the ticket. Raises `Busy` when no slot is free.
    #[pyo3(signature = (array, op, context, sink, retries=None))]
    fn submit(
        &self,
        py: Python<'_>,
        array: &Bound<'_, PyAny>,
        op: Option<&str>,
        context: Option<&Bound<'_, PyBytes>>,
        sink: Py<PyAny>,
        retries: Option<u32>,
    ) -> PyResult<u64> {
        if self.lock.is_closing() {
            return Err(PyValueError::new_err(
                "the pool is closing (close() was called)",
            ));
        }
        self.with(py, |sh| {
            let task = sh.task(op, context.map(|c| c.as_bytes()), retries)?;
            let ticket = sh.submit(array, &task)?;
            sh.router.borrow_mut().sinks.insert(ticket, sink);
            Ok(ticket)
        })
    }

    /// The next completion that belongs to no map, waiting at most `timeout` seconds (GIL
    /// released): None when nothing came, True when what came went to a running map (or to
    /// `route`), else `(future, worker, ok, payload, dtype, shape)` where payload is a new
    /// numpy array when ok, else the exception to raise. With `route`, that tuple goes to
    /// `route(tuple)`, called before this thread gives the pool up, so that a thread waiting
    /// for its turn finds the future done when it gets it.
    ///
    /// From any thread. Another thread receiving meanwhile is not interrupted (unless
    /// `urgent`): this one waits its turn (its results go where they belong meanwhile), and
    /// returns None at once after that turn if one of `watch` (futures) is done by then. With
    /// `timeout` 0 it does not wait for its turn either (None when another thread holds the
    /// pool).
    #[pyo3(signature = (timeout, watch=None, route=None, urgent=false))]
    fn recv(
        &self,
        py: Python<'_>,
        timeout: f64,
        watch: Option<Bound<'_, PyAny>>,
        route: Option<Bound<'_, PyAny>>,
        urgent: bool,
    ) -> PyResult<Py<PyAny>> {
        if self.lock.is_gone() {
            return Err(PyValueError::new_err("the pool is closed"));
        }
        let held = if timeout <= 0.0 {
            // (No wait at all: not for the lock either.)
            match self.lock.try_acquire() {
                Some(held) => held,
                None => return Ok(py.None()),
            }
        } else if urgent {
            self.lock.acquire(py)
        } else {
            self.lock.acquire_to_wait(py)
        };
        let sh = self.shared(&held)?;
        if let (true, Some(watch)) = (held.waited, watch) {
            for f in watch.try_iter()? {
                if f?.call_method0("done")?.is_truthy()? {
                    return Ok(py.None());
                }
            }
        }
        let yes = || {
            pyo3::types::PyBool::new(py, true)
                .to_owned()
                .into_any()
                .unbind()
        };
        Ok(match sh.recv(py, timeout, None)? {
            None => py.None(),
            Some(None) => yes(),
            Some(Some(t)) => match route {
                // (Routed before `held` goes, at the end: `sh`, declared after it, first.)
                Some(route) => {
                    route_surely(&route, t)?;
                    yes()
                }
                None => t.into_any(),
            },
        })
    }

    /// A map over the Python iterator `inputs` (see `MapIter`); `retries` as for `submit`.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (inputs, op, context, ordered, lend, window, reorder, prepare, route, timeout=None, retries=None, lend_min=0))]
    fn map_iter(
        &self,
        inputs: Bound<'_, PyAny>,
        op: Option<&str>,
        context: Option<&Bound<'_, PyBytes>>,
        ordered: bool,
        lend: bool,
        window: usize,
        reorder: usize,
        prepare: Bound<'_, PyAny>,
        route: Bound<'_, PyAny>,
        timeout: Option<f64>,
        retries: Option<u32>,
        lend_min: usize,
    ) -> PyResult<MapIter> {
        let deadline = timeout
            .map(|t| std::time::Instant::now() + Duration::from_secs_f64(t.clamp(0.0, YEAR_S)));
        let (task, shared, id, ahead) = self.with(inputs.py(), |sh| {
            let task = sh.task(op, context.map(|c| c.as_bytes()), retries)?;
            let mut r = sh.router.borrow_mut();
            r.next_map += 1;
            let id = r.next_map;
            let ahead = Arc::new(Mutex::new(Ahead::default()));
            r.maps.insert(
                id,
                MapState {
                    ahead: (reorder > 0).then(|| ahead.clone()),
                    ..MapState::default()
                },
            );
            // (`with`'s strong reference is dropped before the lock.)
            Ok((task, Arc::downgrade(sh), id, ahead))
        })?;
        Ok(MapIter {
            lock: self.lock.clone(),
            shared,
            id,
            inputs: inputs.unbind(),
            prepare: prepare.unbind(),
            route: route.unbind(),
            task,
            ordered,
            lend: lend.then_some(lend_min),
            window: window.max(1),
            reorder,
            ahead,
            in_hand: false,
            deadline,
            step_deadline: None,
            pending: None,
            pull_secs: 0.0,
            next_in: 0,
            next_out: 0,
            exhausted: false,
            failed_at: None,
            handed: None,
        })
    }

    /// Cancels the future of `ticket` if no worker has its task (see `Producer::cancel`):
    /// its result will not come. Whether it was cancelled.
    fn cancel(&self, py: Python<'_>, ticket: u64) -> PyResult<bool> {
        self.with(py, |sh| {
            let mut r = sh.router.borrow_mut();
            if !r.sinks.contains_key(&ticket) {
                return Ok(false);
            }
            let gone = sh.inner.producer.cancel(mk1::Ticket(ticket));
            if gone {
                r.sinks.remove(&ticket);
            }
            Ok(gone)
        })
    }

    /// Whether the task of `ticket` waits for a worker (see `Producer::is_waiting`).
    fn is_waiting(&self, py: Python<'_>, ticket: u64) -> PyResult<bool> {
        self.with(py, |sh| {
            Ok(sh.inner.producer.is_waiting(mk1::Ticket(ticket)))
        })
    }

    /// Cancels every future whose task no worker has (maps' tasks are left alone); returns
    /// those futures, oldest first.
    fn cancel_waiting(&self, py: Python<'_>) -> PyResult<Vec<Py<PyAny>>> {
        self.with(py, |sh| {
            let tickets = {
                let r = sh.router.borrow();
                sh.inner
                    .producer
                    .cancel_waiting(|t| r.sinks.contains_key(&t.0))
            };
            let mut r = sh.router.borrow_mut();
            Ok(tickets
                .iter()
                .filter_map(|t| r.sinks.remove(&t.0))
                .collect())
        })
    }

    /// Tasks submitted and not yet received.
    fn in_flight(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |sh| Ok(sh.inner.producer.in_flight()))
    }

    /// Slots of this pool.
    fn slots(&self, py: Python<'_>) -> PyResult<usize> {
        self.with(py, |sh| Ok(sh.inner.producer.slots()))
    }

    /// The largest array, in bytes.
    fn max_array_bytes(&self, py: Python<'_>) -> PyResult<u64> {
        self.with(py, |sh| Ok(sh.inner.pool.max_array_bytes()))
    }

    /// Worker restarts so far.
    fn restarts(&self, py: Python<'_>) -> PyResult<u32> {
        self.with(py, |sh| Ok(sh.inner.pool.restarts()))
    }

    /// Pids of the live workers.
    fn worker_pids(&self, py: Python<'_>) -> PyResult<Vec<u32>> {
        self.with(py, |sh| Ok(sh.inner.pool.worker_pids()))
    }

    /// Kills the workers now (tasks running are lost) and frees the segment once every lent
    /// result is gone. Returns the futures still waiting for a result (see `close`).
    fn terminate(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        if self.lock.is_gone() {
            return Vec::new();
        }
        {
            // (No lock needed to kill the workers: that also ends a wait under way at once.)
            let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(sh) = shared.as_ref() {
                sh.inner.pool.terminate();
            }
        }
        self.close(py)
    }

    /// Whether the pool is closed, or being closed by some thread (its calls then raise
    /// "the pool is closed").
    fn is_gone(&self) -> bool {
        self.lock.is_gone()
    }

    /// `close()` begins: no new work starts from here on (submit raises, maps stop at their
    /// next step); what was given still runs, and its results still come.
    fn begin_close(&self) {
        self.lock.set_closing();
    }

    /// In a child made by `fork()`: forgets the pool without touching it (its workers, monitor
    /// thread and handle belong to the parent, and its lock may be held by a parent thread
    /// that does not exist here; running its destructor here could hang or disturb them).
    /// Leaks the parent's copy of the memory in this process, by design.
    fn abandon(&self) {
        self.lock.set_gone();
        // (The mutex is held only for an instant, never across a call.)
        if let Ok(mut shared) = self.shared.try_lock() {
            std::mem::forget(shared.take());
        }
    }

    /// With no slot free and no task in flight: whether results are lent to other threads
    /// (then after waiting up to `timeout` seconds for one of them to be dropped), or none
    /// are (every slot is held by this thread's own: waiting could never end).
    fn wait_for_lent(&self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let orphans = self.with(py, |sh| Ok(sh.orphans.clone()))?;
        if !orphans.may_come_back() {
            return Ok(false);
        }
        orphans.wait_for_return(py, Duration::from_secs_f64(timeout.clamp(0.0, WAIT)));
        Ok(true)
    }

    /// Bytes of context (the pickled function) a task may carry.
    #[staticmethod]
    fn context_room() -> u64 {
        CONTEXT_ROOM
    }

    /// Stops the workers and frees the segment (once every lent View is gone). Tasks still in
    /// flight are waited for (bounded by the timeout) and dropped. From any thread; maps of
    /// other threads stop at their next step. Returns the futures still waiting for a result,
    /// for the caller to fail.
    fn close(&self, py: Python<'_>) -> Vec<Py<PyAny>> {
        if self.lock.is_gone() {
            return Vec::new();
        }
        let held = self.lock.acquire(py);
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(shared) = shared else {
            return Vec::new();
        };
        self.lock.set_gone();
        // Results waiting in maps may hold lent slots: let them go first, and those dropped
        // on other threads.
        let (parked, sinks) = {
            let mut r = shared.router.borrow_mut();
            let parked: Vec<_> = r.maps.drain().collect();
            (parked, r.sinks.drain().map(|(_, f)| f).collect::<Vec<_>>())
        };
        drop(parked);
        shared.orphans.adopt(false);
        // Results lent to the caller keep the segment mapped after this; the workers need
        // not wait for them.
        if Arc::strong_count(&shared.inner) > 1 {
            shared.inner.pool.terminate();
        }
        // (Dropped under the lock, GIL released: the drop waits for the workers.)
        let shared = OnThisThread(shared);
        py.detach(move || drop(shared));
        drop(held);
        sinks
    }
}

/// `map` and `imap_unordered`, run in Rust: pulls arrays from a Python iterator, keeps at most
/// `window` in flight or waiting to be read in their slots, and yields `(ok, result or
/// exception)` in input order (`ordered`) or as they come. With `reorder`, results that wait
/// for a slower one before them wait out of their slots (lent ones are copied out when they
/// fill the window; those received as copies are out from the start), so work goes on behind
/// a slow result (up to `reorder` inputs ahead of the next result out, and [`REORDER_BYTES`]
/// of their inputs and copies). An item mk1 cannot carry fails alone (its exception is
/// yielded in its turn). Holds the pool weakly: closing the pool ends the map.
///
/// Each step takes the pool's lock (see `handle`): to submit, in turn with interrupting a
/// thread that waits for results; only to wait for results, without. So maps and futures of
/// several threads share the pool, and whichever thread holds the lock receives for all.
#[pyclass(module = "mk1._mk1")]
struct MapIter {
    lock: Arc<HandleLock>,
    shared: Weak<Shared>,
    id: u64,
    inputs: Py<PyAny>,
    /// `Pool._prepare`, for what is not already a C-contiguous numpy array of a dtype mk1
    /// carries.
    prepare: Py<PyAny>,
    /// `Pool._route`, for completions that belong to no map (futures).
    route: Py<PyAny>,
    task: Task,
    ordered: bool,
    /// Its single-array results of at least these bytes are lent from shared memory; the
    /// others are copied. `None`: all are copied.
    lend: Option<usize>,
    /// Arrays in flight or waiting to be read in their slots, at most.
    window: usize,
    /// Inputs taken ahead of the next result out, at most, while results wait for it out of
    /// their slots (lent ones copied out to make room, or received as copies); 0: they do
    /// not, and `window` bounds the inputs taken ahead.
    reorder: usize,
    /// What this map holds ahead of its next result out, in bytes (see [`Ahead`]); shared with
    /// its `MapState`, where results received as copies are counted.
    ahead: Arc<Mutex<Ahead>>,
    /// The last step left a result ready to hand out (see `__next__`).
    in_hand: bool,
    /// When the map's `timeout` ends: a wait for a result that would begin after it raises
    /// `TimeoutError` (a result already in hand goes out first).
    deadline: Option<std::time::Instant>,
    /// When the step under way ends (set by `next_within` for one step): a wait that would
    /// begin after it raises `StepTimeout`, with nothing taken or lost, and the map goes on.
    step_deadline: Option<std::time::Instant>,
    /// An input taken from the iterator, waiting for a slot that only reading this map's
    /// waiting results can free.
    /// (Or its failure: the iterator's, or its preparing's, to be parked in its turn.)
    pending: Option<(u64, PyResult<Py<PyAny>>)>,
    /// How long taking the last input took, seconds.
    pull_secs: f64,
    next_in: u64,
    next_out: u64,
    exhausted: bool,
    /// The index of the input iterator's own failure (its turn comes after every array
    /// taken before it, also in completion order).
    failed_at: Option<u64>,
    /// What the last `__next__` (or `next_within`) returned, until the next one begins: a
    /// result that Ctrl-C took from the caller on its way out (see `unclaimed`).
    handed: Option<(bool, Py<PyAny>, u64)>,
}

/// What a map with `reorder` holds ahead of its next result out: the inputs it sent (their
/// bytes in shared memory stand for the caller's objects it keeps to run a call again) and
/// the results waiting out of their slots: copied out while they wait (see `MapIter::spill`),
/// or received as copies (counted as they are parked: see `Shared::recv`).
#[derive(Default)]
struct Ahead {
    /// Bytes of each input sent and not yet handed out, by input index.
    inputs: HashMap<u64, usize>,
    /// Bytes of each result waiting out of its slot and not yet handed out, by input index.
    spilled: HashMap<u64, usize>,
    /// The sum of both.
    bytes: usize,
}

impl Ahead {
    fn add_input(&mut self, index: u64, bytes: usize) {
        self.bytes += bytes;
        self.inputs.insert(index, bytes);
    }

    fn add_spilled(&mut self, index: u64, bytes: usize) {
        self.bytes += bytes;
        self.spilled.insert(index, bytes);
    }

    /// The result of input `index` was handed out.
    fn handed_out(&mut self, index: u64) {
        if !self.inputs.is_empty() || !self.spilled.is_empty() {
            let gone =
                self.inputs.remove(&index).unwrap_or(0) + self.spilled.remove(&index).unwrap_or(0);
            self.bytes -= gone;
        }
    }

    /// Whether it holds at most [`REORDER_BYTES`].
    fn has_room(&self) -> bool {
        self.bytes <= REORDER_BYTES
    }
}

impl MapIter {
    fn ahead(&self) -> std::sync::MutexGuard<'_, Ahead> {
        lock_ahead(&self.ahead)
    }

    fn waiting(&self, sh: &Shared) -> (usize, usize) {
        let r = sh.router.borrow();
        r.maps
            .get(&self.id)
            .map_or((0, 0), |m| (m.in_flight, m.ready.len()))
    }

    fn park(&self, sh: &Shared, index: u64, result: (bool, Py<PyAny>)) {
        if let Some(m) = sh.router.borrow_mut().maps.get_mut(&self.id) {
            m.ready.insert(index, (result.0, result.1, false));
        }
    }

    /// Receives one completion and sends it where it belongs, waiting up to `timeout`
    /// seconds (not past the map's deadline: a wait that would begin after it raises
    /// `TimeoutError`; nor past the step's: `StepTimeout`). Whether one came.
    fn pump(&self, py: Python<'_>, sh: &Shared, mut timeout: f64) -> PyResult<bool> {
        if timeout > 0.0 {
            let now = std::time::Instant::now();
            if let Some(deadline) = self.deadline {
                let left = deadline.saturating_duration_since(now);
                if left.is_zero() {
                    return Err(pyo3::exceptions::PyTimeoutError::new_err(
                        "the map's timeout passed before its next result came",
                    ));
                }
                timeout = timeout.min(left.as_secs_f64());
            }
            if let Some(deadline) = self.step_deadline {
                let left = deadline.saturating_duration_since(now);
                if left.is_zero() {
                    return Err(StepTimeout::new_err("no result within the step's timeout"));
                }
                timeout = timeout.min(left.as_secs_f64());
            }
        }
        match sh.recv(py, timeout, self.lend.map(|least| (self.id, least)))? {
            None => {
                py.check_signals()?;
                Ok(false)
            }
            Some(None) => Ok(true),
            Some(Some(other)) => {
                route_surely(self.route.bind(py), other)?;
                Ok(true)
            }
        }
    }

    /// Replaces this map's lent results that wait for their turn by read-only copies, so
    /// their slots go home. Whether there were any. (Zero-copy maps of several threads can hold
    /// every slot with their waiting results while each waits for a slot for the result that
    /// comes before its own waiting ones: each map that cannot get a slot spills its own, so
    /// none waits for the others.)
    fn spill(&self, py: Python<'_>, sh: &Shared) -> PyResult<bool> {
        let lent: Vec<(u64, Py<PyAny>)> = {
            let r = sh.router.borrow();
            let Some(m) = r.maps.get(&self.id) else {
                return Ok(false);
            };
            m.ready
                .iter()
                .filter(|(_, (_, _, lent))| *lent)
                .map(|(&k, (_, a, _))| (k, a.clone_ref(py)))
                .collect()
        };
        if lent.is_empty() {
            return Ok(false);
        }
        for (k, a) in lent {
            let copy = a.bind(py).call_method0("copy")?;
            copy.call_method1("setflags", (false,))?;
            self.ahead().add_spilled(k, nbytes_of(&copy));
            // (The view goes here, under the lock: its slot goes home at once.)
            if let Some(m) = sh.router.borrow_mut().maps.get_mut(&self.id) {
                m.ready.insert(k, (true, copy.unbind(), false));
            }
        }
        Ok(true)
    }

    /// Runs `f` until it does not raise `Busy`, receiving a result between tries (results
    /// that arrived unread hold slots too).
    /// `Ok(None)` when no slot can free up before this map's waiting results are read (lent
    /// results hold their slots): the caller yields those first and comes back.
    fn when_free<T>(
        &self,
        py: Python<'_>,
        sh: &Shared,
        mut f: impl FnMut() -> PyResult<T>,
    ) -> PyResult<Option<T>> {
        loop {
            match f() {
                Err(e) if e.is_instance_of::<Busy>(py) => {
                    // A result the caller can take now goes out first: this map's own results
                    // may hold the slots, when something else (a future, what a map left
                    // running) holds the one its window counted on.
                    if self.has_result_out(sh) {
                        return Ok(None);
                    }
                    // (Only when other threads hold lent results, or when this map may go
                    // past its window: alone, a map's own waiting results never hold the slot
                    // it needs, as its window is one short.)
                    if self.lend.is_some()
                        && (sh.orphans.lent_elsewhere()
                            || (self.reorder > 0 && self.ordered && self.ahead().has_room()))
                        && self.spill(py, sh)?
                    {
                        continue;
                    }
                    let busy = sh.producer().in_flight() > 0;
                    let got = self.pump(py, sh, if busy { WAIT } else { 0.0 })?;
                    if self.lock.contended() {
                        // Another thread waits to submit: give the lock up (this map comes
                        // back with the input kept).
                        return Ok(None);
                    }
                    if !got && !busy {
                        if self.waiting(sh).1 > 0 {
                            return Ok(None);
                        }
                        if sh.orphans.may_come_back() {
                            // Other threads hold the slots: wait for one to come back (the
                            // lock is then given up, and this map comes back).
                            sh.orphans
                                .wait_for_return(py, Duration::from_secs_f64(WAIT));
                            return Ok(None);
                        }
                        return Err(Mk1Error::new_err(
                            "every slot is held by results lent with zero_copy=True that are \
                             still referenced; drop them (or keep copies: np.array(y)) before \
                             asking for more",
                        ));
                    }
                }
                other => return other.map(Some),
            }
        }
    }

    /// The next input as a C-contiguous array or a bundle writer (or why it cannot be one);
    /// None at the end.
    #[allow(clippy::type_complexity)]
    fn next_array<'py>(
        &mut self,
        py: Python<'py>,
    ) -> PyResult<Option<(u64, PyResult<Bound<'py, PyAny>>)>> {
        let item = match self.inputs.bind(py).call_method0("__next__") {
            Ok(item) => item,
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyStopIteration>(py) => {
                self.exhausted = true;
                return Ok(None);
            }
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) => {
                return Err(e)
            }
            Err(e) => {
                // The input ended with an error: the arrays before it still come back, then
                // the error, in its turn.
                self.exhausted = true;
                let index = self.next_in;
                self.next_in += 1;
                self.failed_at = Some(index);
                return Ok(Some((index, Err(e))));
            }
        };
        let index = self.next_in;
        self.next_in += 1;
        // (An exact ndarray only: a subclass, a masked array say, is prepared in Python,
        // which sends it as a call, whole.)
        // What `prepare` returns is a numpy array, or a bundle writer (see `Shared::submit`).
        let input = match item.cast::<PyUntypedArray>() {
            Ok(a)
                if item.is_exact_instance_of::<PyUntypedArray>()
                    && a.is_c_contiguous()
                    && (1..=mk1::layout::MAX_DIMS).contains(&a.ndim())
                    && dtype_of(a).is_ok() =>
            {
                Ok(item)
            }
            _ => self.prepare.call1(py, (item,)).map(|a| a.into_bound(py)),
        };
        Ok(Some((index, input)))
    }

    /// Records a sent task (`Ok(ticket)`) or the failure of its arrays.
    fn sent(
        &self,
        py: Python<'_>,
        sh: &Shared,
        indices: Vec<u64>,
        r: PyResult<u64>,
    ) -> PyResult<()> {
        match r {
            Ok(ticket) => {
                let mut r = sh.router.borrow_mut();
                if let Some(m) = r.maps.get_mut(&self.id) {
                    m.in_flight += indices.len();
                }
                r.owner.insert(ticket, (self.id, indices));
            }
            Err(e) if e.is_instance_of::<pyo3::exceptions::PyKeyboardInterrupt>(py) => {
                return Err(e)
            }
            Err(e) => {
                let e = e.into_value(py).into_any();
                for i in indices {
                    self.park(sh, i, (false, e.clone_ref(py)));
                }
            }
        }
        Ok(())
    }

    /// Takes the next input from the Python iterator into `pending` when there is none and
    /// the window has room. Called without the pool's lock: the iterator is the caller's code,
    /// which may take any time (a slow generator, a queue) and may use the pool itself; other
    /// threads use the pool meanwhile. Whether it took one.
    fn pull(&mut self, py: Python<'_>) -> PyResult<bool> {
        if !self.may_take() {
            return Ok(false);
        }
        let start = std::time::Instant::now();
        let next = self.next_array(py)?;
        self.pull_secs = start.elapsed().as_secs_f64();
        Ok(match next {
            Some((index, input)) => {
                self.pending = Some((index, input.map(Bound::unbind)));
                true
            }
            None => false,
        })
    }

    /// Whether another input may be taken: none is pending, the input has not ended, and the
    /// window has room.
    fn may_take(&self) -> bool {
        let taken = self.next_in - self.next_out;
        let ahead = self.ahead();
        let spilled = ahead.spilled.len() as u64;
        // (Within the window it may always take; past it, only going ahead of a slow result,
        // within `reorder` and `REORDER_BYTES`.)
        self.pending.is_none()
            && !self.exhausted
            && taken - spilled < self.window as u64
            && (taken < self.window as u64
                || (spilled > 0 && taken < self.reorder as u64 && ahead.has_room()))
    }

    /// Whether the window is full of this map's results waiting in their slots for one still
    /// in flight, and they may be copied out to make room (see `reorder`).
    fn should_spill(&self, sh: &Shared) -> bool {
        if self.reorder == 0
            || !self.ordered
            || self.pending.is_some()
            || self.exhausted
            || self.next_in - self.next_out >= self.reorder as u64
        {
            return false;
        }
        if !self.ahead().has_room() {
            return false;
        }
        let r = sh.router.borrow();
        r.maps
            .get(&self.id)
            .is_some_and(|m| !m.ready.contains_key(&self.next_out) && m.ready.values().any(|v| v.2))
    }

    /// Whether a result of this map can go to the caller now.
    fn has_result_out(&self, sh: &Shared) -> bool {
        let r = sh.router.borrow();
        r.maps
            .get(&self.id)
            .is_some_and(|m| m.has_result_out(self.ordered, self.next_out))
    }

    /// Forgets what was held ahead for input `index`, whose result was handed out.
    fn handed_out(&self, index: u64) {
        self.ahead().handed_out(index);
    }

    /// Submits the pending input when a slot is free (it stays pending while none is), or
    /// parks its failure. (Packing small arrays several to a slot, as the Rust map does, was
    /// measured here and gained nothing: the caller's own per-array work is the limit from
    /// Python, not the workers or the rings.)
    fn submit_pending(&mut self, py: Python<'_>, sh: &Shared) -> PyResult<()> {
        // The input iterator (or a callback it runs, or another thread) may close the pool:
        // no new array goes then.
        if self.lock.is_closing() {
            return Err(PyValueError::new_err(
                "the pool was closed while this map ran; its arrays still in flight \
                 will not come back",
            ));
        }
        let Some((index, input)) = self.pending.take() else {
            return Ok(());
        };
        let input = match input {
            Ok(a) => a.into_bound(py),
            Err(e) => return self.sent(py, sh, vec![index], Err(e)),
        };
        match self.when_free(py, sh, || sh.submit(&input, &self.task)) {
            Ok(None) => {
                self.pending = Some((index, Ok(input.unbind())));
                Ok(())
            }
            Err(e)
                if e.is_instance_of::<StepTimeout>(py)
                    || e.is_instance_of::<pyo3::exceptions::PyTimeoutError>(py) =>
            {
                // A wait for a slot passed the step's deadline (the map goes on: the input is
                // still to be sent) or the map's (which ends the map, as a timeout, not as this
                // input's failure).
                self.pending = Some((index, Ok(input.unbind())));
                Err(e)
            }
            r => {
                if self.reorder > 0 && r.is_ok() {
                    self.ahead().add_input(index, nbytes_of(&input));
                }
                self.sent(py, sh, vec![index], r.map(|t| t.expect("some")))
            }
        }
    }
}

/// The bytes of a C-contiguous array.
///
/// # Safety
/// `array` must be C-contiguous, and the caller must hold the GIL for as long as it uses the
/// slice (numpy frees an array's data only under the GIL).
unsafe fn array_bytes<'a>(array: &'a Bound<'_, PyUntypedArray>) -> &'a [u8] {
    let n = nbytes(array);
    if n == 0 {
        return &[];
    }
    // SAFETY: the caller's promise; `nbytes` bytes of data start at `data`.
    unsafe {
        let raw = (*array.as_array_ptr()).fields.data as *const u8;
        std::slice::from_raw_parts(raw, n)
    }
}

/// Sends a received completion `got` to `route` (`Pool._route`), which completes its future:
/// no longer registered anywhere, it must complete whatever happens. A signal pending when
/// the call begins (Ctrl-C) is raised by Python at its first instruction, before anything is
/// done: the call is then made once more (the signal is spent), and the first error goes on.
/// (A second failure means the first one got as far as completing the future.)
fn route_surely(route: &Bound<'_, PyAny>, got: Got) -> PyResult<()> {
    let py = route.py();
    match route.call1((got.clone_ref(py),)) {
        Ok(_) => Ok(()),
        Err(e) => {
            let _ = route.call1((got,));
            Err(e)
        }
    }
}

/// What a map holds ahead (see [`Ahead`]). (Taken by the thread that holds the pool, and by
/// the map's own thread to see whether it may take input, without the pool: briefly.)
fn lock_ahead(ahead: &Mutex<Ahead>) -> std::sync::MutexGuard<'_, Ahead> {
    ahead.lock().unwrap_or_else(|e| e.into_inner())
}

/// `a.nbytes` for an input or result array of a map (0 for anything else).
fn nbytes_of(a: &Bound<'_, PyAny>) -> usize {
    a.getattr(intern!(a.py(), "nbytes"))
        .and_then(|n| n.extract::<usize>())
        .unwrap_or(0)
}

/// Bytes a map in order holds ahead of its next result while that one is slow (see
/// [`Ahead`]), at most, to go past its window; past that, it waits as a map without `reorder`
/// does.
const REORDER_BYTES: usize = 64 << 20;

/// A year, seconds: what "no limit" (None, or infinity) means for a timeout.
const YEAR_S: f64 = 365.0 * 24.0 * 3600.0;

/// Longest wait inside Rust before Python gets to run its signal handlers (Ctrl-C), seconds.
const WAIT: f64 = 0.05;

/// An input that took longer than this (seconds) to come from its iterator is slow: a map
/// waits for its arrays in flight before it takes the next one.
const SLOW_INPUT: f64 = 0.001;

#[pymethods]
impl MapIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    /// Replaces this map's lent results that wait for their turn by read-only copies, so that
    /// their slots go home: for a caller that needs slots of its own before it reads them
    /// (calls of a batch that run again on their own). Whether there were any.
    fn spill_waiting(&self, py: Python<'_>) -> PyResult<bool> {
        let held = self.lock.acquire(py);
        // (Declared after `held`, so dropped before it: see `PoolCore::shared`.)
        let Some(sh) = self.shared.upgrade().filter(|_| !self.lock.is_gone()) else {
            return Ok(false);
        };
        let sh = StepHold(sh);
        let spilled = self.spill(py, &sh);
        drop(sh);
        drop(held);
        spilled
    }

    /// As `__next__`, waiting for results up to `timeout` seconds (None: no limit but the
    /// map's): None when none came by then (the map goes on: nothing was taken or lost),
    /// `StopIteration` at the end. (`timeout` bounds the waits for results, not the taking of
    /// an input from the caller's iterator.)
    fn next_within(
        &mut self,
        py: Python<'_>,
        timeout: Option<f64>,
    ) -> PyResult<Option<(bool, Py<PyAny>, u64)>> {
        self.step_deadline = timeout
            .map(|t| std::time::Instant::now() + Duration::from_secs_f64(t.clamp(0.0, YEAR_S)));
        let got = self.__next__(py);
        self.step_deadline = None;
        match got {
            Ok(Some(v)) => Ok(Some(v)),
            Ok(None) => Err(pyo3::exceptions::PyStopIteration::new_err(())),
            Err(e) if e.is_instance_of::<StepTimeout>(py) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// What the last `__next__` (or `next_within`) returned, taken back (None if it returned
    /// nothing, or it was taken back already). Python runs signal handlers as a call returns,
    /// so Ctrl-C can raise `KeyboardInterrupt` after a result left here and before the caller
    /// holds it: the caller takes it back here when its call raised.
    fn unclaimed(&mut self) -> Option<(bool, Py<PyAny>, u64)> {
        self.handed.take()
    }

    /// The next `(ok, result or error, input index)`.
    fn __next__(&mut self, py: Python<'_>) -> PyResult<Option<(bool, Py<PyAny>, u64)>> {
        self.handed = None;
        let got = self.step(py)?;
        if let Some((ok, v, index)) = &got {
            self.handed = Some((*ok, v.clone_ref(py), *index));
        }
        Ok(got)
    }
}

impl MapIter {
    /// One step of `__next__`: the next result out, taking inputs and waiting as need be.
    fn step(&mut self, py: Python<'_>) -> PyResult<Option<(bool, Py<PyAny>, u64)>> {
        let closed = || PyValueError::new_err("the pool is closed");
        // (With a slow input, what came back goes out first: taking an input ahead of a
        // result ready would only delay it.)
        let mut take = self.pull_secs <= SLOW_INPUT;
        loop {
            if self.lock.is_gone() {
                return Err(closed());
            }
            // An input per pass, taken without the pool's lock (see `pull`): one in for each
            // result out, more while no result is ready, so that the window stays full and a
            // result ready goes to the caller at once, whatever the input's pace.
            if take {
                self.pull(py)?;
            }
            take = true;
            // Then one pass with the lock: to submit, taken in turn (a thread waiting for
            // results gives it up); else only to wait for results.
            // (Also to hand out a result already in hand: that waits for nothing, so it may cut
            // short another thread's wait for results, which can last 50 ms, as the pool's own
            // thread waits while futures are pending.)
            let lock = self.lock.clone();
            let held = if self.pending.is_some() || self.in_hand {
                lock.acquire(py)
            } else {
                lock.acquire_to_wait(py)
            };
            // (Declared after `held`, so dropped before it: see `PoolCore::shared`.)
            let sh = self
                .shared
                .upgrade()
                .filter(|_| !self.lock.is_gone())
                .ok_or_else(closed)?;
            let sh = StepHold(sh);
            self.submit_pending(py, &sh)?;
            // (Results that came meanwhile, without waiting.)
            self.pump(py, &sh, 0.0)?;
            {
                let mut r = sh.router.borrow_mut();
                let Some(m) = r.maps.get_mut(&self.id) else {
                    // Only closing the pool (from the input iterator, say) takes a running
                    // map's state away: its arrays will not come back, so say so.
                    return Err(PyValueError::new_err(
                        "the pool was closed while this map ran; its arrays still in flight \
                         will not come back",
                    ));
                };
                let next = if self.ordered {
                    m.ready.remove(&self.next_out).map(|v| (self.next_out, v))
                } else {
                    // The input's own failure waits for the arrays taken before it: raising
                    // it ends the iteration.
                    let failed_at = self.failed_at;
                    let last = m.in_flight == 0 && self.pending.is_none();
                    let key = m
                        .ready
                        .keys()
                        .copied()
                        .find(|&k| last || Some(k) != failed_at);
                    key.and_then(|k| m.ready.remove(&k).map(|v| (k, v)))
                };
                if let Some((index, v)) = next {
                    self.next_out += 1;
                    self.handed_out(index);
                    self.in_hand = m.has_result_out(self.ordered, self.next_out);
                    return Ok(Some((v.0, v.1, index)));
                }
                self.in_hand = false;
                if self.exhausted
                    && self.pending.is_none()
                    && m.in_flight == 0
                    && m.ready.is_empty()
                {
                    return Ok(None);
                }
            }
            // Nothing to hand out: take more input while there is room, else wait. (When the
            // input is slow, the arrays in flight have time to come back before the next one
            // is taken: they are waited for first, as long as an input takes.)
            if !self.may_take() {
                if !(self.should_spill(&sh) && self.spill(py, &sh)?) {
                    self.pump(py, &sh, WAIT)?;
                }
            } else if self.pull_secs > SLOW_INPUT && self.waiting(&sh).0 > 0 {
                // (What came is handed out before the next input is taken.)
                take = !self.pump(py, &sh, self.pull_secs.min(WAIT))?;
            }
            drop(sh);
            drop(held);
        }
    }
}

/// A map's strong hold on its pool for one step. The pool may be closed during the step (from
/// the input iterator, or a future's callback run while receiving): if this is then its last
/// reference, the pool is terminated before it drops here, with the GIL held, so that its drop
/// does not wait for tasks in flight.
struct StepHold(Arc<Shared>);

impl std::ops::Deref for StepHold {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl Drop for StepHold {
    fn drop(&mut self) {
        if self.0.inner.lock.is_gone() && Arc::strong_count(&self.0) == 1 {
            self.0.inner.pool.terminate();
        }
    }
}

impl Drop for MapIter {
    /// A map ended early: results still to come are dropped as they arrive. (Nothing to do
    /// for a closed pool: closing dropped every map's state.)
    fn drop(&mut self) {
        if self.lock.is_gone() {
            return;
        }
        Python::attach(|py| {
            let held = self.lock.acquire(py);
            if let Some(sh) = self.shared.upgrade() {
                let mut r = sh.router.borrow_mut();
                let id = self.id;
                let parked = r.maps.remove(&id);
                // Its tasks that no worker has yet are not run at all.
                let mine: std::collections::HashSet<u64> = r
                    .owner
                    .iter()
                    .filter(|(_, (m, _))| *m == id)
                    .map(|(&t, _)| t)
                    .collect();
                if !mine.is_empty() {
                    sh.inner.producer.cancel_waiting(|t| mine.contains(&t.0));
                }
                r.owner.retain(|_, (m, _)| *m != id);
                drop(r);
                drop(parked);
                drop(sh);
            }
            drop(held);
        });
    }
}

/// What a lent result holds: its completion (so its slot) and the pool it came from. Dropped
/// only under the pool's lock (the completion's drop gives the slot back to the handle).
struct Lent {
    // Dropped before `_inner` (field order): the completion borrows the producer in it.
    _done: Completion<'static>,
    _inner: Arc<Inner>,
}

/// A [`Lent`] that may cross threads on its way to a holder of the pool's lock.
struct OnPoolThread {
    _lent: Lent,
}
// SAFETY: a `Lent` is moved between threads (in a `View`, and into `Orphans` under its mutex)
// but dropped only by a thread that holds the pool's lock (`View::drop` when it gets the lock
// without waiting, else `Orphans::adopt` under it), and never used otherwise.
unsafe impl Send for OnPoolThread {}
// SAFETY: nothing reads a `Lent` through a shared reference.
unsafe impl Sync for OnPoolThread {}

/// Lent results dropped while another thread held the pool's lock, waiting for the next
/// holder. Closed once the pool's side is gone: a result dropped after that without the lock
/// is leaked (nobody would take them).
#[derive(Clone)]
struct Orphans(std::sync::Arc<OrphanQueue>);

struct OrphanQueue {
    /// Something is in `list` (read without the lock on every submit and receive).
    waiting: std::sync::atomic::AtomicBool,
    /// `None` once closed.
    list: std::sync::Mutex<Option<Vec<OnPoolThread>>>,
    /// Lent results alive, by the thread they were lent to.
    lent: std::sync::Mutex<HashMap<std::thread::ThreadId, usize>>,
    /// Threads in `wait_for_return` (a notify is a system call: made only for them).
    sleepers: std::sync::atomic::AtomicUsize,
    /// Notified whenever a lent result is dropped.
    returned: std::sync::Condvar,
}

impl Orphans {
    fn new() -> Orphans {
        Orphans(std::sync::Arc::new(OrphanQueue {
            waiting: std::sync::atomic::AtomicBool::new(false),
            list: std::sync::Mutex::new(Some(Vec::new())),
            lent: std::sync::Mutex::new(HashMap::new()),
            sleepers: std::sync::atomic::AtomicUsize::new(0),
            returned: std::sync::Condvar::new(),
        }))
    }

    fn lent(&self) -> std::sync::MutexGuard<'_, HashMap<std::thread::ThreadId, usize>> {
        self.0.lent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a result lent to `thread`.
    fn lend(&self, thread: std::thread::ThreadId) {
        *self.lent().entry(thread).or_default() += 1;
    }

    /// A result lent to `thread` was dropped (its slot is home, or on its way in `list`).
    fn returned(&self, thread: std::thread::ThreadId) {
        let mut lent = self.lent();
        if let Some(n) = lent.get_mut(&thread) {
            *n -= 1;
            if *n == 0 {
                lent.remove(&thread);
            }
        }
        // (Read under the mutex that `wait_for_return` counts itself in under: no lost wake.)
        let sleepers = self.0.sleepers.load(std::sync::atomic::Ordering::Relaxed) > 0;
        drop(lent);
        if sleepers {
            self.0.returned.notify_all();
        }
    }

    /// Whether slots held by lent results may come back without this thread's doing: some
    /// wait in the queue (the next call takes them), or results are lent to another thread,
    /// which may drop them (a caller out of slots can wait for those, where it could not wait
    /// for its own).
    fn may_come_back(&self) -> bool {
        self.0.waiting.load(std::sync::atomic::Ordering::Acquire) || self.lent_elsewhere()
    }

    /// Whether results are lent to another thread than this one.
    fn lent_elsewhere(&self) -> bool {
        let me = std::thread::current().id();
        self.lent().keys().any(|&t| t != me)
    }

    /// Sleeps (GIL released) until a lent result is dropped, at most `timeout`.
    fn wait_for_return(&self, py: Python<'_>, timeout: Duration) {
        py.detach(|| {
            let lent = self.lent();
            self.0
                .sleepers
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (lent, _) = self
                .0
                .returned
                .wait_timeout(lent, timeout)
                .unwrap_or_else(|e| e.into_inner());
            self.0
                .sleepers
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            drop(lent);
        });
    }

    /// Without the lock: hands `lent` to the next holder, or leaks it once the queue is
    /// closed (keeping its slot, and the segment mapped, until exit).
    fn send(&self, lent: OnPoolThread) {
        let mut list = self.0.list.lock().unwrap_or_else(|e| e.into_inner());
        match list.as_mut() {
            Some(waiting) => {
                waiting.push(lent);
                self.0
                    .waiting
                    .store(true, std::sync::atomic::Ordering::Release);
            }
            None => std::mem::forget(lent),
        }
    }

    /// Under the lock: drops the results waiting (their slots go home), and with `close`
    /// closes the queue. One atomic load when nothing waits and it stays open.
    fn adopt(&self, close: bool) {
        if !close && !self.0.waiting.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let taken = {
            let mut list = self.0.list.lock().unwrap_or_else(|e| e.into_inner());
            self.0
                .waiting
                .store(false, std::sync::atomic::Ordering::Relaxed);
            if close {
                list.take()
            } else {
                list.as_mut().map(std::mem::take)
            }
        };
        // (Dropped after the lock: a completion's drop gives its slot back to the handle.)
        drop(taken);
    }
}

/// Fills `view` (a buffer Python asked `owner` for, with `flags`) for the `len` bytes at `ptr`,
/// read-only or not; the buffer keeps a reference to `owner`.
///
/// # Safety
/// `view` must be the `Py_buffer` Python passed to `owner`'s `__getbuffer__`, and the `len`
/// bytes at `ptr` must stay valid (and, unless `readonly`, writable by whoever holds the
/// buffer) for as long as `owner` lives.
unsafe fn fill_buffer(
    owner: &Bound<'_, PyAny>,
    view: *mut pyo3::ffi::Py_buffer,
    ptr: *mut u8,
    len: usize,
    readonly: bool,
    flags: c_int,
) -> PyResult<()> {
    // (Python wants a non-null pointer even for no bytes.)
    let ptr = if len == 0 {
        std::ptr::NonNull::<u8>::dangling().as_ptr()
    } else {
        ptr
    };
    // SAFETY: the caller's promises; PyBuffer_FillInfo fills `view` and takes a reference to
    // `owner`.
    let rc = unsafe {
        pyo3::ffi::PyBuffer_FillInfo(
            view,
            owner.as_ptr(),
            ptr.cast::<c_void>(),
            len as isize,
            c_int::from(readonly),
            flags,
        )
    };
    if rc != 0 {
        return Err(PyErr::fetch(owner.py()));
    }
    Ok(())
}

/// The bytes of a loaned slot, writable through the buffer protocol while a bundle is written
/// into them ([`Shared::submit_bundle`]); refused after that. It counts its exports, so that
/// the submit can tell that no view of the slot outlives the write.
#[pyclass(unsendable)]
struct Room {
    ptr: usize,
    len: usize,
    /// Whether the write is still going on (buffers may be taken).
    open: Cell<bool>,
    /// Buffers taken and not yet released.
    exports: Cell<usize>,
}

#[pymethods]
impl Room {
    /// The buffer protocol: the slot's bytes, writable, while the write goes on.
    ///
    /// # Safety
    /// Called by Python with a `Py_buffer` to fill, as the protocol requires.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (ptr, len) = {
            let me = slf.borrow();
            if !me.open.get() {
                return Err(pyo3::exceptions::PyBufferError::new_err(
                    "this slot was submitted: its bytes are no longer writable here",
                ));
            }
            (me.ptr as *mut u8, me.len)
        };
        // SAFETY: `view` is Python's; the `len` bytes at `ptr` are the loaned slot's, which
        // stay loaned (and mapped) until the write returns; the submit checks that every
        // buffer taken was released by then (`exports`), and this refuses new ones after
        // (`open`).
        unsafe { fill_buffer(slf.as_any(), view, ptr, len, false, flags)? };
        let me = slf.borrow();
        me.exports.set(me.exports.get() + 1);
        Ok(())
    }

    /// # Safety
    /// Called by Python for a buffer `__getbuffer__` filled.
    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {
        self.exports.set(self.exports.get() - 1);
    }
}

/// A result lent from shared memory (buffer protocol, read-only bytes): `numpy.frombuffer`
/// makes the array. The slot goes back to the pool when the last reference is dropped: at
/// once when the pool's lock is free (or held by this thread); else at the lock holder's next
/// call. One dropped that way after its pool was closed is leaked: it keeps the segment
/// mapped until the process exits.
#[pyclass(frozen, module = "mk1._mk1")]
struct View {
    /// The result's bytes in the segment, which `lent` keeps mapped.
    ptr: usize,
    len: usize,
    lock: Arc<HandleLock>,
    lent: Mutex<Option<OnPoolThread>>,
    orphans: Orphans,
    /// The thread it was lent to (see [`Orphans::may_come_back`]).
    holder: std::thread::ThreadId,
}

impl Drop for View {
    fn drop(&mut self) {
        let Some(lent) = take_out(&mut self.lent) else {
            return;
        };
        // (Never waits: Python may drop this anywhere, with the GIL held.)
        match self.lock.try_acquire() {
            Some(held) => {
                drop(lent);
                drop(held);
            }
            None => self.orphans.send(lent),
        }
        self.orphans.returned(self.holder);
    }
}

#[pymethods]
impl View {
    /// The buffer protocol: the result's bytes, read-only.
    ///
    /// # Safety
    /// Called by Python with a `Py_buffer` to fill, as the protocol requires.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut pyo3::ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let (ptr, len) = {
            let me = slf.get();
            (me.ptr as *const u8, me.len)
        };
        // SAFETY: `view` is Python's; the buffer holds a reference to `slf`, which keeps the
        // completion (and so the `len` bytes at `ptr`, the slot's contents, and the mapping)
        // alive while the buffer is; they are only read through it.
        unsafe { fill_buffer(slf.as_any(), view, ptr.cast_mut(), len, true, flags) }
    }
}

/// A new, uninitialised C-order numpy array of `T` and `dims`: numpy's `MemoryError` when it
/// cannot be allocated (`numpy::PyArray::new` panics then, and a panic would reach the caller
/// as pyo3's `PanicException`, which `except MemoryError` and `except Exception` miss).
fn new_array<'py, T: numpy::Element>(
    py: Python<'py>,
    dims: &[usize],
) -> PyResult<Bound<'py, numpy::PyArray<T, numpy::IxDyn>>> {
    use numpy::npyffi::{get_type_object, npy_intp, NpyTypes, PY_ARRAY_API};
    let mut dims: Vec<npy_intp> = dims.iter().map(|&d| d as npy_intp).collect();
    // SAFETY: the call is numpy's own constructor, given its array type, a descriptor reference
    // it steals (`into_dtype_ptr` adds the one it takes), `dims.len()` dimensions at a pointer
    // valid for the call, and null strides, data and base (numpy allocates C-ordered data). It
    // returns a new reference, or null with an exception set, which `from_owned_ptr_or_err`
    // turns into a PyErr. The object is a `PyArray<T>` of `dims.len()` dimensions, so the
    // unchecked cast holds.
    unsafe {
        let ptr = PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            get_type_object(py, NpyTypes::PyArray_Type),
            numpy::dtype::<T>(py).into_dtype_ptr(),
            dims.len() as c_int,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
            std::ptr::null_mut(),
        );
        Ok(Bound::from_owned_ptr_or_err(py, ptr)?.cast_into_unchecked())
    }
}

/// A new numpy array of `dtype` and `shape` holding `bytes`; `MemoryError` when it cannot be
/// allocated.
fn copy_out<'py>(
    py: Python<'py>,
    dtype: DType,
    shape: Shape,
    bytes: &[u8],
) -> PyResult<Bound<'py, PyAny>> {
    let dims: Vec<usize> = shape.dims().iter().map(|&d| d as usize).collect();
    macro_rules! make {
        ($t:ty) => {{
            let a = new_array::<$t>(py, &dims)?;
            // SAFETY: the new array is C-contiguous with exactly `bytes.len()` bytes (`shape`
            // and `dtype` are the result's), owned by us alone, and apart from shared memory.
            // (Not one memcpy: numpy's large buffers start 16 bytes into a page, where glibc's
            // memcpy from a page-aligned slot can be 20x slower; see `copy_elements`.)
            unsafe {
                mk1::array::copy_bytes_to(bytes, numpy::PyArrayMethods::data(&a).cast::<u8>())
            };
            a.into_any()
        }};
    }
    Ok(match dtype {
        DType::I8 => make!(i8),
        DType::U8 => make!(u8),
        DType::I16 => make!(i16),
        DType::U16 => make!(u16),
        DType::I32 => make!(i32),
        DType::U32 => make!(u32),
        DType::I64 => make!(i64),
        DType::U64 => make!(u64),
        DType::F32 => make!(f32),
        DType::F64 => make!(f64),
    })
}

fn loan_error(e: LoanError) -> PyErr {
    match e {
        LoanError::TooLarge { .. } => ArrayTooLarge::new_err(pythonize(&e.to_string())),
        LoanError::Busy { .. } | LoanError::Exhausted { .. } => Busy::new_err(e.to_string()),
        LoanError::NoWorkers(_) => NoWorkersLeft::new_err(e.to_string()),
        LoanError::Shape(_) => PyValueError::new_err(e.to_string()),
    }
}

fn submit_error(e: SubmitError) -> PyErr {
    match e {
        SubmitError::NoWorkers(_) => NoWorkersLeft::new_err(e.to_string()),
        SubmitError::OutShape(_) => ArrayTooLarge::new_err(pythonize(&e.to_string())),
        _ => PyValueError::new_err(e.to_string()),
    }
}

/// The exception (not raised) for a failed task. A Python function's failure carries its
/// formatted traceback and, when picklable, the exception itself: `mk1.Pool` rebuilds it.
fn task_error<'py>(py: Python<'py>, e: &TaskError) -> Bound<'py, PyAny> {
    let err = match e {
        TaskError::Kernel { message, .. } => RemoteError::new_err(message.clone()),
        TaskError::Timeout(_) => TaskTimeout::new_err(e.to_string()),
        TaskError::WorkerDied { .. } => WorkerDied::new_err(e.to_string()),
        TaskError::NoWorkers(_) => NoWorkersLeft::new_err(e.to_string()),
        TaskError::TooLarge { .. } => ArrayTooLarge::new_err(pythonize(&e.to_string())),
        _ => Mk1Error::new_err(e.to_string()),
    };
    err.into_value(py).into_bound(py).into_any()
}

/// The `mk1._mk1` module.
#[pymodule]
fn _mk1(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PoolCore>()?;
    m.add_class::<View>()?;
    m.add_class::<MapIter>()?;
    m.add_function(wrap_pyfunction!(serve, m)?)?;
    m.add_function(wrap_pyfunction!(retire_after_this_task, m)?)?;
    m.add("Mk1Error", py.get_type::<Mk1Error>())?;
    m.add("PoolStartError", py.get_type::<PoolStartError>())?;
    m.add("WorkerDied", py.get_type::<WorkerDied>())?;
    m.add("TaskTimeout", py.get_type::<TaskTimeout>())?;
    m.add("NoWorkersLeft", py.get_type::<NoWorkersLeft>())?;
    m.add("ArrayTooLarge", py.get_type::<ArrayTooLarge>())?;
    m.add("RemoteError", py.get_type::<RemoteError>())?;
    m.add("Busy", py.get_type::<Busy>())?;
    m.add("MAX_DIMS", mk1::layout::MAX_DIMS)?;
    Ok(())
}
