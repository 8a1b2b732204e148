//! The lock that lets any Python thread use a pool.
//!
//! A pool has one producer handle (`mk1::Producer`), which is not thread-safe, and the state
//! beside it (which map or future each ticket belongs to, the parsed ops). Every Python object
//! of a pool reaches them only while its thread holds this lock: that is the invariant that
//! makes those objects shareable between threads (see the `Send`/`Sync` impls in `lib.rs`).
//!
//! It is **reentrant**: the thread that holds it runs Python code (the input iterator of a map,
//! a future's done-callback) that may call into the pool again.
//!
//! Callers queue in arrival order (a ticket each), so a thread that loops on the pool cannot
//! starve the others. There are two ways in:
//! - [`HandleLock::acquire`], for work to be done now (submitting, closing): if the holder is
//!   waiting for a completion, it is interrupted ([`mk1::Interrupter`]) and gives the lock up at
//!   once instead of at the end of its wait.
//! - [`HandleLock::acquire_to_wait`], for a thread that only waits for results: it interrupts
//!   nobody. The holder receives every completion and sends each where it belongs (a future, a
//!   map's queue), so such a thread loses nothing by waiting its turn; and two threads that both
//!   wait do not take turns interrupting each other (which would spin instead of sleeping).
//!
//! [`HandleLock::try_acquire`] never waits: for a result dropped on a thread that cannot wait.
//!
//! Every wait here releases the GIL first: a thread that holds the lock may need the GIL to
//! finish (it builds Python objects), so no thread may wait for the lock while holding the GIL.
//! The GIL is then always taken after this lock, never the other way round.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;

use pyo3::Python;

/// See the module documentation.
pub(crate) struct HandleLock {
    /// The pool was closed, or forgotten in a child made by `fork()` (where this lock may look
    /// held by a thread that does not exist): objects that still reach it stop instead of
    /// taking it.
    pub(crate) gone: AtomicBool,
    /// `close()` has begun: it waits for the work already given, and no new work starts
    /// (maps running in other threads stop at their next step).
    closing: AtomicBool,
    /// Threads queued by [`HandleLock::acquire`] (to do work now), not yet holding it (read
    /// without the mutex on every wait for results).
    urgent: AtomicUsize,
    state: Mutex<State>,
    /// Notified whenever the lock is given up.
    released: Condvar,
}

struct State {
    owner: Option<ThreadId>,
    /// Acquisitions by `owner` not yet given up.
    depth: usize,
    /// The next ticket to hand out.
    next: u64,
    /// The ticket whose turn it is: the lock is free for it once `owner` is `None`.
    serving: u64,
    /// Threads asleep on `released` (a notify is a system call: made only for them).
    sleepers: usize,
    /// Cuts the holder's wait for a completion short; `None` once the handle is gone.
    interrupter: Option<mk1::Interrupter<'static>>,
}

/// The lock held by this thread, until dropped.
pub(crate) struct Held<'a> {
    lock: &'a HandleLock,
    /// This thread had to wait for another holder first.
    pub(crate) waited: bool,
}

impl HandleLock {
    pub(crate) fn new() -> HandleLock {
        HandleLock {
            gone: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            urgent: AtomicUsize::new(0),
            state: Mutex::new(State {
                owner: None,
                depth: 0,
                next: 0,
                serving: 0,
                sleepers: 0,
                interrupter: None,
            }),
            released: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // (Nothing panics while holding it; a poisoned state is still consistent.)
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets (or with `None`, clears) how to interrupt the holder's wait for a completion.
    ///
    /// # Safety
    /// The interrupter's handle must outlive its use here: clear it, holding this lock, before
    /// the handle is dropped.
    pub(crate) unsafe fn set_interrupter(&self, interrupter: Option<mk1::Interrupter<'_>>) {
        // SAFETY: the lifetime is only extended to be stored; the caller clears it before the
        // handle goes, and every use is under the state mutex, as this store is.
        let interrupter = interrupter.map(|i| unsafe {
            std::mem::transmute::<mk1::Interrupter<'_>, mk1::Interrupter<'static>>(i)
        });
        self.state().interrupter = interrupter;
    }

    /// Takes the lock, in turn, waiting (GIL released) for earlier holders; a holder waiting
    /// for a completion is interrupted. For work to be done now.
    pub(crate) fn acquire(&self, py: Python<'_>) -> Held<'_> {
        self.take(py, true)
    }

    /// As [`HandleLock::acquire`], without interrupting the holder: for a thread that only
    /// waits for results, which the holder receives and sends where they belong meanwhile.
    pub(crate) fn acquire_to_wait(&self, py: Python<'_>) -> Held<'_> {
        self.take(py, false)
    }

    fn take(&self, py: Python<'_>, interrupt: bool) -> Held<'_> {
        let me = std::thread::current().id();
        let mut s = self.state();
        if s.owner == Some(me) {
            s.depth += 1;
            return self.held(false);
        }
        let ticket = s.next;
        s.next += 1;
        if s.owner.is_none() && s.serving == ticket {
            s.owner = Some(me);
            s.depth = 1;
            return self.held(false);
        }
        if interrupt {
            // (Before the interrupt: the holder, woken, reads it to give the lock up.)
            self.urgent.fetch_add(1, Ordering::AcqRel);
            if let Some(i) = &s.interrupter {
                i.interrupt();
            }
        }
        drop(s);
        py.detach(|| {
            let mut s = self.state();
            while !(s.owner.is_none() && s.serving == ticket) {
                s.sleepers += 1;
                s = self.released.wait(s).unwrap_or_else(|e| e.into_inner());
                s.sleepers -= 1;
            }
            s.owner = Some(me);
            s.depth = 1;
            if interrupt {
                self.urgent.fetch_sub(1, Ordering::AcqRel);
            }
        });
        self.held(true)
    }

    /// Takes the lock if this thread holds it already, or if it is free and nobody waits for
    /// it; never waits.
    pub(crate) fn try_acquire(&self) -> Option<Held<'_>> {
        let me = std::thread::current().id();
        let mut s = self.state();
        if s.owner == Some(me) {
            s.depth += 1;
        } else if s.owner.is_none() && s.serving == s.next {
            s.next += 1;
            s.owner = Some(me);
            s.depth = 1;
        } else {
            return None;
        }
        Some(self.held(false))
    }

    /// Whether a thread waits for its turn to do work now ([`HandleLock::acquire`]): the
    /// holder should not start a wait for results, and give the lock up soon.
    pub(crate) fn contended(&self) -> bool {
        self.urgent.load(Ordering::Acquire) > 0
    }

    /// Whether the pool is gone (closed, or forgotten after `fork()`).
    pub(crate) fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Marks the pool gone (see [`HandleLock::gone`]).
    pub(crate) fn set_gone(&self) {
        self.gone.store(true, Ordering::Release);
    }

    /// Whether `close()` has begun (see [`HandleLock::closing`]), or the pool is gone.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire) || self.is_gone()
    }

    /// Marks that `close()` has begun.
    pub(crate) fn set_closing(&self) {
        self.closing.store(true, Ordering::Release);
    }

    fn held(&self, waited: bool) -> Held<'_> {
        Held { lock: self, waited }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let mut s = self.lock.state();
        s.depth -= 1;
        if s.depth == 0 {
            s.owner = None;
            s.serving += 1;
            let sleepers = s.sleepers > 0;
            drop(s);
            if sleepers {
                self.lock.released.notify_all();
            }
        }
    }
}
