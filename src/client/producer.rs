//! A producer handle: loan a slot, write an array into it, submit it with a task, get the
//! completion back with zero-copy access to the result.
//!
//! Ownership follows the token (DESIGN invariant 1): a [`Loan`] or a [`Completion`] holds its
//! slot's token, and dropping it puts the slot back in this handle's free list. Nothing else
//! reaches slot memory, so a slot is never written by two parties at once, and a slot whose
//! worker could not be killed is never reused.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use super::{Mode, Shared, Task};
use crate::array::{cast, cast_mut, Shape};
use crate::clock;
use crate::dispatch::{self, Dispatch, WorkerView};
use crate::dtype::{DType, Element};
use crate::layout::{Direction, ItemDesc, TaskDesc, DONE_OK, MAX_ITEMS, NO_ITEM, NO_TASK, TASK_OK};
use crate::pool::{SlotPool, Token};
use crate::ring::{RingConsumer, RingProducer};
use crate::shm::TaskResult;
use crate::sync::Ordering;
use crate::wait::{same_cpu_partner, Backoff, Doorbell, Futex, SpinMode, Step, SAME_CPU_YIELDS};

/// How long a call may wait for what it needs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Until {
    /// Not at all: one look (`try_` calls; no clock read for a deadline).
    Now,
    /// Until this instant (`_timeout` calls).
    At(Instant),
    /// As long as it takes.
    Forever,
}

impl Until {
    /// `timeout` from now; as long as it takes when that is past what the clock can say
    /// (`Duration::MAX`, say).
    pub(crate) fn after(timeout: Duration) -> Until {
        Instant::now()
            .checked_add(timeout)
            .map_or(Until::Forever, Until::At)
    }
}

/// Longest single sleep while waiting (deadlines and the monitor's news are re-checked after).
const SLEEP: Duration = Duration::from_millis(20);

/// The number a submit returns; its [`Completion`] carries the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ticket(pub u64);

/// Why a task produced no result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// The kernel returned an error, or panicked (the worker survives either way).
    #[error("kernel {}: {message}", if *.panicked { "panicked" } else { "failed" })]
    Kernel {
        /// The kernel's message (for a panic: its text and source location).
        message: String,
        /// It was a panic.
        panicked: bool,
    },
    /// The task ran past its limit, the worker timeout (once [`super::Pool::wind_down`] was
    /// called, at most 2 s); its worker was killed and replaced.
    #[error("the task ran past its limit of {0:?} (the worker timeout; at most 2 s once the pool winds down); its worker was killed and replaced")]
    Timeout(Duration),
    /// The worker running it died (in place: at once; out of place: after every retry).
    #[error("its worker died ({how}) after {attempts} attempt(s)")]
    WorkerDied {
        /// How the last worker ended.
        how: String,
        /// Attempts made.
        attempts: u32,
    },
    /// Every worker is gone for good (the restart limit, or a worker that cannot start).
    #[error("the pool has no workers left: {0}")]
    NoWorkers(String),
    /// A `map` input larger than a slot (bytes asked, the maximum).
    #[error("an array of {asked} bytes does not fit a slot: the largest array is {max} bytes (PoolBuilder::max_array_bytes)")]
    TooLarge {
        /// Bytes of the array.
        asked: u64,
        /// The slot size.
        max: u64,
    },
    /// A `map` input whose shape mk1 cannot carry, or whose element count does not match it.
    #[error("{0}")]
    Shape(String),
    /// `map` could get no slot that holds this input (one of the largest size, for an array
    /// too large for the pool's pack slots, or in a pool without them): the caller's loans,
    /// completions or own tasks hold them all (a map cannot free them). Each such input then
    /// gets it in its turn: receive and drop completions before a map.
    #[error("no slot for map: {0}")]
    NoSlot(String),
    /// The result was asked for as another dtype than the task's.
    #[error("the result is {actual}, not {asked}")]
    Dtype {
        /// Asked for.
        asked: DType,
        /// What it is.
        actual: DType,
    },
}

/// Why no slot was loaned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoanError {
    /// The array is larger than a slot (for `reuse` and `reshape`: than this slot).
    #[error("an array of {asked} bytes does not fit: {max} bytes at most (for a loan, the largest slot: PoolBuilder::max_array_bytes; for reuse and reshape, the slot at hand)")]
    TooLarge {
        /// Bytes asked.
        asked: u64,
        /// The slot size: the largest, or for `reuse` and `reshape` this slot's.
        max: u64,
    },
    /// Every slot of this handle the array fits is busy (`try_loan`, or a timeout ran out).
    #[error("every slot of this handle the array fits is busy ({slots} slots in all: {in_flight} in flight, {held} completed and not yet dropped, {loaned} loaned)")]
    Busy {
        /// Slots of this handle.
        slots: usize,
        /// Submitted and not yet completed.
        in_flight: usize,
        /// Completions received or waiting to be received, not yet dropped.
        held: usize,
        /// Loans not yet submitted or dropped.
        loaned: usize,
    },
    /// Every slot the array fits is the caller's to free: loaned, held as a completion, or in
    /// flight with a completion only [`Producer::recv`] takes (a loan never receives): waiting
    /// could never end.
    #[error("all {slots} slots of this handle that the array fits are the caller's to free (of all its slots: {in_flight} tasks in flight and {held} completions, which recv() takes and dropping frees, {loaned} loans): receive and drop completions, or drop loans, to loan again")]
    Exhausted {
        /// Slots of this handle the array fits (all of them without size classes).
        slots: usize,
        /// The caller's tasks in flight (their completions will be the caller's to receive).
        in_flight: usize,
        /// Completions held, or waiting to be received.
        held: usize,
        /// Loans held.
        loaned: usize,
    },
    /// Every worker is gone for good.
    #[error("the pool has no workers left: {0}")]
    NoWorkers(String),
    /// A shape mk1 cannot carry.
    #[error(transparent)]
    Shape(#[from] crate::array::ShapeError),
}

/// Why a submit was refused (the loan comes back in [`Rejected`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// No such kernel, or not for this dtype.
    #[error("{0}")]
    Kernel(String),
    /// A built-in op that does not fit the dtype.
    #[error(transparent)]
    Op(#[from] crate::task::BuiltinError),
    /// The requested output shape is impossible here.
    #[error("{0}")]
    OutShape(String),
    /// Every worker is gone for good.
    #[error("the pool has no workers left: {0}")]
    NoWorkers(String),
    /// The loan belongs to another producer handle (submit it there).
    #[error("the loan belongs to another producer handle")]
    OtherHandle,
}

/// A refused submit: the reason, and the loan with its data, to fix and submit again.
#[derive(thiserror::Error)]
#[error("{error}")]
pub struct Rejected<'p, T: Element> {
    /// Why.
    pub error: SubmitError,
    /// The loan, untouched.
    pub loan: Loan<'p, T>,
}

impl<T: Element> From<Rejected<'_, T>> for SubmitError {
    /// The reason alone (the loan is dropped and its slot goes home): for callers that give up
    /// on a refused array, e.g. `producer.submit(loan, &task).map_err(SubmitError::from)?`.
    fn from(r: Rejected<'_, T>) -> SubmitError {
        r.error
    }
}

impl<T: Element> std::fmt::Debug for Rejected<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rejected({:?})", self.error)
    }
}

/// How a returned token went. (Small: it waits in the ready queue; the rare answers are boxed.)
pub(crate) enum Outcome {
    /// Every array succeeded, each output as requested: the worker said so in the token word.
    Ok,
    /// The worker's answer in the descriptor.
    Done(Box<TaskResult>),
    /// No answer: the task failed as a whole.
    Failed(Box<TaskError>),
    /// Some arrays of a batch failed alone earlier (blamed for a death or a hang: index and
    /// error), and were skipped when the rest was sent again; the rest went as the inner
    /// outcome says.
    Partly(Box<(Outcome, Vec<(u32, TaskError)>)>),
}

impl Outcome {
    pub(crate) fn failed(e: TaskError) -> Outcome {
        Outcome::Failed(Box::new(e))
    }

    /// Array `k`'s error, if it failed.
    #[inline(always)]
    pub(crate) fn item_error(&self, k: usize) -> Option<TaskError> {
        match self {
            Outcome::Ok => None,
            Outcome::Done(res) if res.status == TASK_OK || res.failed_mask & (1 << k) == 0 => None,
            Outcome::Done(res) => Some(kernel_error(res, k)),
            Outcome::Failed(e) => Some((**e).clone()),
            Outcome::Partly(p) => partly_item_error(p, k),
        }
    }

    /// Array `k`'s output as its kernel reported it (kernels for any dtype).
    pub(crate) fn produced(&self, k: usize) -> Option<(DType, Shape)> {
        match self {
            Outcome::Done(res) => produced(res, k),
            Outcome::Partly(p) => partly_produced(p, k),
            Outcome::Ok | Outcome::Failed(_) => None,
        }
    }

    /// A worker answered (its slot's result region is written, and no longer its).
    pub(crate) fn answered(&self) -> bool {
        match self {
            Outcome::Failed(_) => false,
            Outcome::Partly(p) => !matches!(p.0, Outcome::Failed(_)),
            Outcome::Ok | Outcome::Done(_) => true,
        }
    }
}

// (Out of line, and cold: `Outcome`'s methods stay small enough to inline on the hot path.)

/// Failed array `k`'s error in the answer `res`: its own message (the first failure's is the
/// descriptor's, each later one's came in its own space).
#[cold]
fn kernel_error(res: &TaskResult, k: usize) -> TaskError {
    let (message, panicked) = match res.others.iter().find(|o| o.0 as usize == k) {
        Some((_, m, p)) => (m.clone(), *p),
        None => (res.message.clone(), res.panicked),
    };
    TaskError::Kernel { message, panicked }
}

#[cold]
fn partly_item_error(p: &(Outcome, Vec<(u32, TaskError)>), k: usize) -> Option<TaskError> {
    match p.1.iter().find(|(i, _)| *i as usize == k) {
        Some((_, e)) => Some(e.clone()),
        None => p.0.item_error(k),
    }
}

#[cold]
fn partly_produced(p: &(Outcome, Vec<(u32, TaskError)>), k: usize) -> Option<(DType, Shape)> {
    p.0.produced(k)
}

/// Array `k`'s dtype, shape and error as a completion reports them, from an outcome with
/// detail (kernels that report their outputs, failures; out of line: the common outcome,
/// `Ok`, needs none of it).
#[cold]
fn outcome_of_item(
    outcome: &Outcome,
    rec: &Record,
    k: usize,
) -> (DType, Shape, Option<Box<TaskError>>) {
    let (dtype, shape) = outcome
        .produced(k)
        .unwrap_or_else(|| (rec.dtype, rec.requested_shape(k)));
    (dtype, shape, outcome.item_error(k).map(Box::new))
}

/// A task's trusted record, by slot.
#[derive(Clone, Copy)]
pub(crate) struct Record {
    pub(crate) desc: TaskDesc,
    pub(crate) dtype: DType,
    /// The first output's shape (single tasks).
    pub(crate) out_shape: Shape,
    pub(crate) attempts: u32,
    /// Redos allowed after a death ([`Task::max_retries`], or the pool's).
    pub(crate) max_retries: u32,
    /// The number of the `map` this slot's task belongs to (left alone by `recv`), or 0.
    pub(crate) map: u32,
    /// Its kernel takes any dtype and reports what it produced.
    pub(crate) any: bool,
    /// The [`Task::id`] of the one-array task (no output shape or context of its own) that
    /// this record describes, or 0: a next submit of the same task and dtype to this slot
    /// keeps the kernel code and parameters already here.
    pub(crate) task: u64,
    /// When the task was submitted, counted in tasks of this handle: the order in which
    /// tasks waiting for a worker are sent, those sent again after a death among them.
    pub(crate) order: u64,
}

impl Record {
    /// The ticket of the task this record describes, when it was submitted on its own (a
    /// `map`'s tasks are the map's, numbered by its inputs).
    #[inline]
    fn submitted(&self) -> Option<Ticket> {
        (self.map == 0).then_some(Ticket(self.desc.seq))
    }

    /// Array `k`'s output shape as requested: a single task's own output shape (or its
    /// input's), a batch array's input shape.
    #[inline]
    fn requested_shape(&self, k: usize) -> Shape {
        if self.desc.count == 1 {
            self.out_shape
        } else {
            let item = &self.desc.items[k];
            Shape::from_raw(item.ndim, item.shape).expect("ours")
        }
    }
}

/// A finished token, waiting to be received.
pub(crate) struct Ready {
    pub(crate) token: Token,
    pub(crate) outcome: Outcome,
    /// Its worker could not be killed: the slot is never reused.
    pub(crate) quarantine: bool,
    /// The worker that answered or last had it.
    pub(crate) worker: Option<u32>,
    /// Nanoseconds from its (last) dispatch to a worker until it was back.
    pub(crate) latency_ns: u64,
    /// Ticks its worker spent on it, as far as this handle can tell (0: unknown: for tasks
    /// collected after the worker's death, and when no map's task came back with it): see
    /// [`Core::time_returns`]. Late by however long
    /// the handle took to look, so an upper bound while the caller is busy elsewhere.
    pub(crate) service: clock::Ticks,
    /// Another handle had tasks at the same worker meanwhile: [`Ready::service`] holds their
    /// time too, and is only an upper bound.
    pub(crate) shared: bool,
}

/// The state behind a handle.
pub(crate) struct Core<'s> {
    pub(crate) sh: &'s Shared,
    p: u32,
    pub(crate) slots: SlotPool,
    to: Vec<RingProducer<'s>>,
    from: Vec<RingConsumer<'s>>,
    bells: Vec<Doorbell<'s>>,
    touched: Vec<bool>,
    usable: Vec<bool>,
    faulted: Vec<bool>,
    seen_epoch: Vec<usize>,
    seen_changes: usize,
    /// The handle is being dropped: tasks of a dead worker are failed, not redone.
    draining: bool,
    sent: Vec<u64>,
    back: Vec<u64>,
    /// Per worker: since when it has been busy with our tasks, as far as we can tell (its last
    /// return to us, or the send that found it holding none of ours); see [`Ready::service`].
    busy_since: Vec<clock::Ticks>,
    gave_up: Vec<bool>,
    policy: dispatch::Policy,
    pub(crate) records: Vec<Record>,
    pub(crate) ready: VecDeque<Ready>,
    /// Tasks waiting to be sent, oldest first: submitted while no worker could take them
    /// (see [`dispatch::LeastLoaded`]), or to run again after a death.
    redo: VecDeque<Token>,
    /// Tasks this handle submitted (see [`Record::order`]).
    submitted: u64,
    next_ticket: u64,
    /// Maps started on this handle (the last one's number; numbers go from 1, wrapping past
    /// 0): a map takes only slots with its own number, and releases those of a map that was
    /// forgotten (`mem::forget`) with tasks in flight.
    pub(crate) maps: u32,
    /// The finished slot a running map hands its results out of, one at a time.
    pub(crate) map_drain: Option<Token>,
    /// Slots of maps (this one's, and any forgotten one's) sent and not yet taken back from
    /// `ready`.
    pub(crate) map_out: usize,
    /// Submitted and not yet in `ready`.
    pub(crate) in_flight: usize,
    /// Loans alive.
    pub(crate) loaned: usize,
    /// Completions handed out and not yet dropped.
    pub(crate) held: usize,
    quarantined: Vec<Token>,
    /// In place with `keep_copies`: each slot's input as submitted (by slot index).
    copies: Vec<Vec<u8>>,
    /// Arrays of a slot's batch that failed alone (blamed for a death or a hang) while the
    /// rest was sent again, by slot index: added to the batch's outcome when it completes.
    item_failures: Vec<Vec<(u32, TaskError)>>,
    /// By slot: how the worker died that the slot's task was last blamed for (read only while
    /// the task's `attempts` count that death: for a task to be redone when no worker is
    /// left, which then fails as `WorkerDied`, not as `NoWorkers`).
    died_how: Vec<Option<String>>,
    /// Emptied item lists of packed loans and completions, kept for the next ones (no
    /// allocation per batch while work flows).
    pub(crate) spare_items: Vec<Vec<ItemDesc>>,
    spare_outs: Vec<Vec<ItemOut>>,
    backoff: Backoff,
}

impl<'s> Core<'s> {
    fn new(sh: &'s Shared, p: u32) -> Core<'s> {
        let seg = &sh.seg;
        let layout = seg.layout();
        let workers = layout.params().workers;
        let w = workers as usize;
        // First: a death or restart published from here on moves it, so this handle follows
        // it at its first call, whatever it reads of the epochs and `alive` below.
        let seen_changes = sh.ctl.changes.load(Ordering::Acquire);
        // Deaths before this handle existed are not ours to clean up (every token of this share
        // was home, so the rings hold nothing of them): acknowledge them at once, and open the
        // rings to each worker as it is now.
        let seen_epoch: Vec<usize> = (0..w)
            .map(|i| sh.ctl.death_epoch[i].load(Ordering::Acquire))
            .collect();
        let (mut to, mut from, mut bells) = (Vec::new(), Vec::new(), Vec::new());
        let mut faulted = vec![false; w];
        for (i, &epoch) in seen_epoch.iter().enumerate() {
            sh.ctl.acked[p as usize][i].store(epoch, Ordering::Release);
            let (c, e) = seg.ring(p, i as u32, Direction::ToWorker);
            let (c2, e2) = seg.ring(p, i as u32, Direction::FromWorker);
            // Rings the worker serves now: taken as they are (every token is home, so they are
            // empty; a worker that scribbled on them is faulted and killed, and they are zeroed
            // after its death). Rings no live process serves (none opened them to it, or it
            // died before this handle's predecessor cleaned up after it): zeroed, then opened.
            let served = c.head.open_for.load(Ordering::Acquire) == sh.ctl.gate(i as u32, epoch);
            let kept = if served {
                RingProducer::new(c, e)
                    .and_then(|t| Ok((t, RingConsumer::new(c2, e2)?)))
                    .ok()
            } else {
                None
            };
            match kept {
                Some((t, f)) => {
                    to.push(t);
                    from.push(f);
                }
                None => {
                    to.push(RingProducer::reset(c, e));
                    from.push(RingConsumer::after_reset(c2, e2));
                    if served {
                        faulted[i] = true;
                        sh.ctl.kill[i].fetch_max(epoch + 1, Ordering::AcqRel);
                    } else {
                        open_rings(sh, p, i, epoch);
                    }
                }
            }
            bells.push(Doorbell::new(&seg.worker(i as u32).bell));
        }
        let sent: Vec<u64> = (0..w)
            .map(|i| sh.ctl.flow[p as usize][i].sent.load(Ordering::Relaxed))
            .collect();
        Core {
            sh,
            p,
            slots: {
                let mut slots = SlotPool::share(layout, p, layout.params().producers);
                if let Some(c) = sh.pack_class {
                    slots.reserve(c);
                }
                slots
            },
            to,
            from,
            bells,
            touched: vec![false; w],
            usable: (0..w)
                .map(|i| sh.ctl.alive[i].load(Ordering::Acquire) && !faulted[i])
                .collect(),
            faulted,
            seen_epoch,
            seen_changes,
            draining: false,
            back: sent.clone(),
            sent,
            busy_since: vec![0; w],
            gave_up: vec![false; w],
            policy: dispatch::policy(
                sh.dispatch,
                sh.seed.wrapping_add(u64::from(p)),
                w,
                sh.queue_ahead,
            ),
            records: vec![
                Record {
                    desc: TaskDesc::zeroed(),
                    dtype: DType::U8,
                    out_shape: Shape::d1(0),
                    attempts: 0,
                    max_retries: 0,
                    map: 0,
                    any: false,
                    task: 0,
                    order: 0,
                };
                layout.slots() as usize
            ],
            ready: VecDeque::new(),
            redo: VecDeque::new(),
            submitted: 0,
            next_ticket: 0,
            maps: 0,
            map_drain: None,
            map_out: 0,
            in_flight: 0,
            loaned: 0,
            held: 0,
            quarantined: Vec::new(),
            copies: vec![
                Vec::new();
                if sh.keep_copies {
                    layout.slots() as usize
                } else {
                    0
                }
            ],
            item_failures: vec![Vec::new(); layout.slots() as usize],
            died_how: vec![None; layout.slots() as usize],
            backoff: Backoff::for_mode(sh.spin),
            spare_items: Vec::new(),
            spare_outs: Vec::new(),
        }
    }

    /// Checks `task` for arrays of `dtype` that take `used` bytes of a slot: the kernel code
    /// and parameters a descriptor carries.
    #[inline(always)]
    pub(crate) fn admit<'t>(
        &self,
        task: &'t Task,
        dtype: DType,
        used: u64,
        slot: u64,
    ) -> Result<(u32, &'t crate::task::Params), SubmitError> {
        let k = task.resolve(&self.sh.registry, dtype)?;
        if let Some(why) = self.broken() {
            return Err(SubmitError::NoWorkers(why));
        }
        let context = task.context_bytes().len() as u64;
        if context > 0 && TaskDesc::context_offset_for(context, slot).is_none_or(|at| at < used) {
            return Err(SubmitError::OutShape(format!(
                "{used} bytes of arrays and {context} bytes of context do not fit their slot of \
                 {slot} bytes (a loan's slot is sized for its array: loan a larger shape, or see \
                 PoolBuilder::max_array_bytes and size_class)"
            )));
        }
        Ok(k)
    }

    /// Copies a task's context bytes (checked to fit by `admit`, or by `map`'s packing) to
    /// the end of the token's slot; returns where (`context_offset`, `context_len`).
    #[inline]
    pub(crate) fn place_context(&self, context: &[u8], token: &mut Token) -> (u32, u32) {
        if context.is_empty() {
            return (0, 0);
        }
        let at = TaskDesc::context_offset_for(context.len() as u64, self.capacity(token))
            .expect("checked by admit") as usize;
        self.sh.seg.slot_bytes_mut(token)[at..at + context.len()].copy_from_slice(context);
        (at as u32, context.len() as u32)
    }

    /// Bytes of the largest slots (the largest array the pool takes).
    pub(crate) fn max_slot_bytes(&self) -> u64 {
        max_slot_bytes(self.sh.seg.layout())
    }

    /// Bytes of `token`'s slot.
    pub(crate) fn capacity(&self, token: &Token) -> u64 {
        self.sh.seg.slot_len(token)
    }

    /// Why the pool can run nothing any more, if it cannot (checked on every submit: two
    /// loads when all is well, the words only otherwise).
    #[inline]
    pub(crate) fn broken(&self) -> Option<String> {
        if !self.sh.terminating.load(Ordering::Acquire)
            && !self.sh.ctl.no_workers.load(Ordering::Acquire)
        {
            return None;
        }
        self.broken_why()
    }

    #[cold]
    fn broken_why(&self) -> Option<String> {
        if self.sh.terminating.load(Ordering::Acquire) {
            return Some("the pool was terminated".into());
        }
        Some(
            self.sh
                .broken
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .unwrap_or_else(|| "every worker is gone".into()),
        )
    }

    /// Where the first completion for `recv` waits in `ready` (a running `map`'s are skipped).
    #[inline(always)]
    pub(crate) fn first_ready(&self) -> Option<usize> {
        let front = self.ready.front()?;
        // (Most often the first one is ours: no `map` runs.)
        if self.records[front.token.slot() as usize].map == 0 {
            return Some(0);
        }
        self.ready
            .iter()
            .position(|r| self.records[r.token.slot() as usize].map == 0)
    }

    pub(crate) fn peek_ticket(&self) -> u64 {
        self.next_ticket
    }

    pub(crate) fn next_ticket(&mut self) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        t
    }

    /// Puts a slot back in the free list (or in quarantine).
    pub(crate) fn release(&mut self, token: Token, quarantine: bool) {
        if quarantine {
            self.quarantined.push(token);
        } else {
            self.slots.put(token);
        }
    }

    /// The record of `token`'s slot for a new task: its request fields cleared (the items and
    /// the result part are left as they are: `count` says which items count, and the result
    /// part is the worker's to write), to be filled in place and sent with
    /// [`Core::send_recorded`]. Saves building and copying a whole descriptor per task.
    pub(crate) fn fresh_record(&mut self, token: &Token) -> &mut Record {
        if !self.item_failures[token.slot() as usize].is_empty() {
            self.forget_item_failures(token.slot() as usize);
        }
        let r = &mut self.records[token.slot() as usize];
        let d = &mut r.desc;
        (d.seq, d.kernel, d.dtype, d.out_dtype, d.count, d.out_ndim) = (0, 0, 0, 0, 0, 0);
        (d.params_len, d.context_offset, d.context_len, d.skip_mask) = (0, 0, 0, 0);
        d.out_shape = [0; crate::layout::MAX_DIMS];
        r.attempts = 0;
        r.max_retries = self.sh.max_retries;
        r.map = 0;
        r.any = false;
        r.task = 0;
        r
    }

    /// Writes the slot's record (already in place) into its descriptor and sends it (or
    /// leaves it waiting when no worker can take it now).
    #[inline]
    pub(crate) fn send_recorded(&mut self, mut token: Token) {
        let record = &self.records[token.slot() as usize];
        if self.sh.keep_copies {
            // In place with copies kept: the input as submitted, to redo the task from if its
            // worker dies (the slot may be half-written then).
            let d = &record.desc;
            let dtype = record.dtype;
            let extent = d.items[..d.count as usize]
                .iter()
                .map(|it| {
                    let shape = Shape::from_raw(it.ndim, it.shape).expect("ours");
                    u64::from(it.offset) + shape.bytes(dtype)
                })
                .chain([u64::from(d.context_offset) + u64::from(d.context_len)])
                .max()
                .unwrap_or(0) as usize;
            let slot = token.slot() as usize;
            let data = self.sh.seg.slot_bytes_mut(&mut token);
            let copy = &mut self.copies[slot];
            copy.clear();
            crate::array::extend_copied(copy, &data[..extent]);
        }
        self.sh.seg.write_task(&token, &record.desc);
        self.records[token.slot() as usize].order = self.submitted;
        self.submitted += 1;
        self.in_flight += 1;
        self.send(token);
    }

    /// Sends `token` to a worker, or leaves it waiting (after those waiting already) until
    /// one can take it.
    fn send(&mut self, token: Token) {
        // A death the monitor published since the last look is acted on first, so no task goes
        // to a worker known dead (one load of a counter that changes only on a death, a
        // restart or a give-up).
        self.follow_monitor();
        if self.redo.is_empty() {
            match self.place(token) {
                Ok(()) => return,
                Err(token) => self.redo.push_back(token),
            }
        } else {
            self.redo.push_back(token);
        }
        // No worker may take it by what this handle last saw: the returns not yet collected
        // lower the loads (and show the workers' pace), so collect them, then send what waits.
        self.collect_all();
        self.send_waiting();
    }

    /// Pops everything the usable workers returned. Returns whether anything came.
    fn collect_all(&mut self) -> bool {
        let mut any = false;
        for w in 0..self.usable.len() {
            if self.usable[w] {
                any |= self.collect(w, false);
            }
        }
        any
    }

    /// Cancels the waiting tasks (not a map's) whose ticket `pick` takes: their slots go home.
    fn cancel_waiting(&mut self, mut pick: impl FnMut(Ticket) -> bool) {
        self.take_waiting(|r| r.submitted().is_some_and(&mut pick));
    }

    /// Cancels the waiting tasks of map `map` (see [`Record::map`]): their slots go home.
    /// How many.
    pub(crate) fn cancel_waiting_of_map(&mut self, map: u32) -> usize {
        let n = self.take_waiting(|r| r.map == map);
        self.map_out -= n;
        n
    }

    /// Takes the waiting tasks whose record `pick` takes out of flight, their slots home.
    /// How many.
    fn take_waiting(&mut self, mut pick: impl FnMut(&Record) -> bool) -> usize {
        let mut kept = VecDeque::with_capacity(self.redo.len());
        let mut n = 0;
        while let Some(t) = self.redo.pop_front() {
            if pick(&self.records[t.slot() as usize]) {
                self.in_flight -= 1;
                self.release(t, false);
                n += 1;
            } else {
                kept.push_back(t);
            }
        }
        self.redo = kept;
        n
    }

    /// Whether tasks wait for a worker (see [`Core::send`]).
    #[inline]
    pub(crate) fn has_waiting(&self) -> bool {
        !self.redo.is_empty()
    }

    /// Sends the waiting tasks, oldest first, while workers can take them. Whether any went.
    fn send_waiting(&mut self) -> bool {
        let mut any = false;
        while let Some(t) = self.redo.pop_front() {
            if let Err(t) = self.place(t) {
                self.redo.push_front(t);
                break;
            }
            any = true;
        }
        any
    }

    /// Sends `token` to the worker the policy picks; gives it back if none may take it now.
    #[inline]
    fn place(&mut self, token: Token) -> Result<(), Token> {
        let now = clock::now();
        let pick = self.policy.pick(&WorkerView {
            usable: &self.usable,
            load: self.slots.out_counts(),
            now,
        });
        let Some(w) = pick else {
            return Err(token);
        };
        self.policy
            .sent(w as usize, self.slots.out_counts()[w as usize], now);
        if self.slots.out_at(w) == 0 {
            self.busy_since[w as usize] = now;
        }
        self.sent[w as usize] += 1;
        self.sh.ctl.flow[self.p as usize][w as usize]
            .sent
            .store(self.sent[w as usize], Ordering::Relaxed);
        let pos = self.to[w as usize].position();
        let word = self.slots.dispatch(token, w, now, pos);
        if let Err(e) = self.to[w as usize].push(word) {
            self.fault(w as usize, format!("corrupted its request ring: {e}"));
        }
        self.to[w as usize].flush();
        self.touched[w as usize] = true;
        Ok(())
    }

    /// Rings the doorbells of the workers sent to since the last call.
    pub(crate) fn ring_bells(&mut self) {
        let mut woke = false;
        for w in 0..self.touched.len() {
            if std::mem::take(&mut self.touched[w]) {
                woke |= self.bells[w].ring(&Futex);
            }
        }
        if woke {
            self.backoff.woke_partner();
        }
    }

    /// Takes back every token out at worker `w` (dead, abandoned, or with nobody left to serve
    /// it) and counts them as back in the flow the watchdog reads.
    fn reclaim(&mut self, w: usize) -> Vec<Token> {
        self.policy.forget(w);
        let back = self.slots.reclaim(w as u32);
        self.note_back(w, back.len() as u64);
        back
    }

    fn note_back(&mut self, w: usize, n: u64) {
        self.back[w] += n;
        self.sh.ctl.flow[self.p as usize][w]
            .back
            .store(self.back[w], Ordering::Relaxed);
    }

    fn fault(&mut self, w: usize, why: String) {
        if !self.faulted[w] {
            self.faulted[w] = true;
            self.usable[w] = false;
            // The incarnation this handle's rings were opened to: a request made late, about
            // one already replaced, neither kills its replacement nor explains its death.
            let incarnation = self.seen_epoch[w];
            self.sh
                .ctl
                .fault_reasons
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((w as u32, incarnation, why));
            self.sh.ctl.kill[w].fetch_max(incarnation + 1, Ordering::AcqRel);
        }
    }

    fn finish(&mut self, token: Token, outcome: Outcome, quarantine: bool, worker: Option<u32>) {
        self.finish_at(token, outcome, quarantine, worker, clock::now());
    }

    /// As [`Core::finish`], with the clock already read.
    #[inline(always)]
    fn finish_at(
        &mut self,
        token: Token,
        outcome: Outcome,
        quarantine: bool,
        worker: Option<u32>,
        now: clock::Ticks,
    ) {
        self.in_flight -= 1;
        let latency_ns = clock::nanos_between(self.slots.record(&token).sent_at, now);
        let outcome = if self.item_failures[token.slot() as usize].is_empty() {
            outcome
        } else {
            self.with_item_failures(token.slot() as usize, outcome)
        };
        self.ready.push_back(Ready {
            token,
            outcome,
            quarantine,
            worker,
            latency_ns,
            service: 0,
            shared: false,
        });
    }

    /// Pops everything worker `w` returned. Returns whether anything came.
    fn collect(&mut self, w: usize, after_death: bool) -> bool {
        let mut got = 0;
        let first = self.ready.len();
        // (Only maps use the tasks' times: other returns are not timed.)
        let mut mapped = false;
        // One clock read for what one call pops (it came back within a few ring pops).
        let mut now = None;
        for _ in 0..self.slots.len() {
            match self.from[w].pop() {
                Ok(Some(word)) => match self.slots.accept(word & !DONE_OK, w as u32) {
                    Ok(token) => {
                        got += 1;
                        let rec = &self.records[token.slot() as usize];
                        mapped |= rec.map != 0;
                        // A plain success says so in the word; a kernel that decides its
                        // outputs always answers in the descriptor.
                        let outcome = if word & DONE_OK != 0 && !rec.any {
                            Outcome::Ok
                        } else {
                            Outcome::Done(Box::new(
                                self.sh.seg.read_result(&token, &rec.desc, rec.any),
                            ))
                        };
                        let now = *now.get_or_insert_with(clock::now);
                        self.finish_at(token, outcome, false, Some(w as u32), now);
                    }
                    Err(e) => {
                        if !after_death {
                            self.fault(w, format!("returned a bad token: {e}"));
                        }
                        break;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    if !after_death {
                        self.fault(w, format!("corrupted its return ring: {e}"));
                    }
                    break;
                }
            }
        }
        if let Some(now) = now {
            self.policy.returned(w, got, now);
            self.note_back(w, got);
            if mapped && !after_death {
                self.time_returns(w, first, now);
            }
            self.busy_since[w] = now;
        }
        got > 0
    }

    /// Sets [`Ready::service`] of the tasks worker `w` just returned (those in `ready` from
    /// `first` on): the time since it was last busy for us, from its previous return or from
    /// the send of the first of them, whichever is later, shared among them by their arrays;
    /// and [`Ready::shared`] when another handle has tasks at `w` (its time is in the gap
    /// too).
    fn time_returns(&mut self, w: usize, first: usize, now: clock::Ticks) {
        let p = self.p as usize;
        let shared = self.sh.ctl.flow.iter().enumerate().any(|(q, f)| {
            q != p && f[w].sent.load(Ordering::Relaxed) > f[w].back.load(Ordering::Relaxed)
        });
        let (ready, slots, records) = (&mut self.ready, &self.slots, &self.records);
        let worker = Some(w as u32);
        let arrays = |r: &Ready| u64::from(records[r.token.slot() as usize].desc.count.max(1));
        let (mut sent, mut total) = (now, 0);
        for r in ready.range(first..).filter(|r| r.worker == worker) {
            sent = sent.min(slots.record(&r.token).sent_at);
            total += arrays(r);
        }
        let elapsed = now.saturating_sub(self.busy_since[w].max(sent));
        for r in ready.range_mut(first..).filter(|r| r.worker == worker) {
            r.service = elapsed * arrays(r) / total.max(1);
            r.shared = shared;
        }
    }

    /// Worker `w` died: keep what it finished; fail, retry or time out the rest; reset rings.
    fn clean_up_after(&mut self, w: usize) {
        self.usable[w] = false;
        if !self.faulted[w] {
            self.collect(w, true);
        }
        let ctl = &self.sh.ctl;
        // The death that ended the incarnation our rings were open to, as the monitor noted it
        // then (the replacement may be running by now). None: none was open to it, so none of
        // our tasks was taken, and the hints below do not matter.
        let death = self.seen_epoch[w] + 1;
        let note = ctl.notes[self.p as usize][w]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .filter(|n| n.death == death);
        // Which task was running, and which array of it (hints written by the dead worker:
        // they only decide which of its own tasks, and which array of a batch, is blamed, so
        // the rest of the batch is not failed with it).
        let (current, running_item, timed_out, how) = match note {
            Some(n) => (n.current, n.current_item, n.stalled, n.how),
            None => (NO_TASK, NO_ITEM, false, format!("worker {w} exited")),
        };
        // Tasks written to its ring at or after what it had taken were never popped, so never
        // started: their slots are as submitted, in either mode.
        let taken = self.to[w].taken();
        let back = self.reclaim(w);
        if !back.is_empty() {
            let n = back.len() as u64;
            let mut reclaimed = ctl.reclaimed.lock().unwrap_or_else(|e| e.into_inner());
            reclaimed.push((w as u32, death, n));
        }
        for t in back {
            let queued = self.slots.record(&t).ring_pos >= taken;
            let r = &self.records[t.slot() as usize];
            if queued && !self.draining {
                // Sent again as it was, no attempt counted (the descriptor is rewritten from
                // our record all the same: the dead worker could write it).
                self.sh.seg.write_task(&t, &r.desc);
                self.redo.push_back(t);
                continue;
            }
            let word = u64::from(t.generation()) << 32 | u64::from(t.slot());
            // The running task is blamed (it may be another handle's: then none of ours is);
            // with no hint at all, every task out there is.
            let blamed = current == NO_TASK || word == current;
            // A batch whose running array is known: if the task is to fail, that array fails
            // alone and the rest goes again.
            let culprit = (word == current && !self.draining)
                .then_some(running_item)
                .filter(|&k| self.blame_one_array(&t, k));
            let r = &mut self.records[t.slot() as usize];
            if timed_out && blamed {
                // (Once the pool winds down, the limit a stalled worker gets is the shutdown
                // grace, as the monitor applies it.)
                let limit = if self.sh.winding_down.load(Ordering::Acquire) {
                    self.sh
                        .cfg
                        .worker_timeout
                        .min(crate::coordinator::SHUTDOWN_GRACE)
                } else {
                    self.sh.cfg.worker_timeout
                };
                let error = TaskError::Timeout(limit);
                match culprit {
                    Some(k) => self.fail_alone(t, k, error, &how, w),
                    None => self.finish(t, Outcome::failed(error), false, Some(w as u32)),
                }
                continue;
            }
            if blamed {
                r.attempts += 1;
            }
            let intact = self.sh.mode == Mode::OutOfPlace || self.sh.keep_copies;
            // (A handle being dropped redoes nothing: nobody will read the results.)
            let retry = intact && r.attempts <= r.max_retries && !self.draining;
            let error = TaskError::WorkerDied {
                how: how.clone(),
                attempts: r.attempts.max(1),
            };
            match (retry, culprit) {
                (true, _) => {
                    if blamed {
                        self.died_how[t.slot() as usize] = Some(how.clone());
                    }
                    self.send_again(t)
                }
                (false, Some(k)) => self.fail_alone(t, k, error, &how, w),
                (false, None) => self.finish(t, Outcome::failed(error), false, Some(w as u32)),
            }
        }
        // Those sent again were queued at the back, in slot order: the waiting tasks go in the
        // order they were submitted, so a task sent again goes before those submitted after
        // it (an ordered map waits on the oldest).
        let records = &self.records;
        self.redo
            .make_contiguous()
            .sort_by_key(|t| records[t.slot() as usize].order);
        if self.draining {
            // A handle being dropped feeds no more work to a pool whose workers die or hang
            // under it: the tasks still waiting for a worker are dropped unrun, as those
            // queued behind this worker were (nobody will read them).
            while let Some(t) = self.redo.pop_front() {
                let error = TaskError::WorkerDied {
                    how: how.clone(),
                    attempts: 0,
                };
                self.finish(t, Outcome::failed(error), false, None);
            }
        }
        let (c, e) = self.sh.seg.ring(self.p, w as u32, Direction::ToWorker);
        self.to[w] = RingProducer::reset(c, e);
        let (c, e) = self.sh.seg.ring(self.p, w as u32, Direction::FromWorker);
        self.from[w] = RingConsumer::after_reset(c, e);
        self.faulted[w] = false;
    }

    #[cold]
    fn forget_item_failures(&mut self, slot: usize) {
        self.item_failures[slot].clear();
    }

    /// `outcome` of slot `slot`'s batch, with the arrays that failed alone before.
    #[cold]
    fn with_item_failures(&mut self, slot: usize, outcome: Outcome) -> Outcome {
        Outcome::Partly(Box::new((
            outcome,
            std::mem::take(&mut self.item_failures[slot]),
        )))
    }

    /// Whether the death or hang of `t`'s worker is blamed on its array `item` alone: `t` is a
    /// batch, and `item` (the dead worker's hint) one of its arrays still to run.
    fn blame_one_array(&self, t: &Token, item: u32) -> bool {
        let d = &self.records[t.slot() as usize].desc;
        d.count > 1 && item < d.count && d.skip_mask & (1 << item) == 0
    }

    /// Batch `t` fails because its array `k` was running when its worker died or hung: array
    /// `k` fails alone with `error`, and the rest of the batch is sent again without it. In
    /// place without copies the arrays before it were changed in place, so they fail too
    /// (`WorkerDied`); those after it are untouched.
    fn fail_alone(&mut self, t: Token, k: u32, error: TaskError, how: &str, w: usize) {
        let slot = t.slot() as usize;
        let intact = self.sh.mode == Mode::OutOfPlace || self.sh.keep_copies;
        let r = &mut self.records[slot];
        let mut failed = vec![(k, error)];
        if !intact {
            let died = TaskError::WorkerDied {
                how: how.to_string(),
                attempts: 1,
            };
            failed.extend(
                (0..k)
                    .filter(|i| r.desc.skip_mask & (1 << i) == 0)
                    .map(|i| (i, died.clone())),
            );
        }
        for (i, _) in &failed {
            r.desc.skip_mask |= 1 << i;
        }
        // (The next array to take the blame starts with a clean count.)
        r.attempts = 0;
        let all = u64::MAX >> (64 - r.desc.count);
        let done = r.desc.skip_mask == all;
        let first = failed[0].1.clone();
        self.item_failures[slot].extend(failed);
        if done {
            self.finish(t, Outcome::failed(first), false, Some(w as u32));
        } else {
            self.send_again(t);
        }
    }

    /// Queues a task of a dead worker to be sent again: in place with copies, its input is
    /// restored first; the descriptor is rewritten from our record, as the dead worker may
    /// have scribbled on it.
    fn send_again(&mut self, mut t: Token) {
        let slot = t.slot() as usize;
        if self.sh.mode == Mode::InPlace && self.sh.keep_copies {
            let copy = &self.copies[slot];
            let data = self.sh.seg.slot_bytes_mut(&mut t);
            crate::array::copy_elements(&mut data[..copy.len()], copy);
        }
        self.sh.seg.write_task(&t, &self.records[slot].desc);
        self.redo.push_back(t);
    }

    /// Acts on deaths and restarts published by the monitor.
    #[inline]
    fn follow_monitor(&mut self) {
        let changes = self.sh.ctl.changes.load(Ordering::Acquire);
        if changes != self.seen_changes {
            self.follow_changes(changes);
        }
    }

    #[cold]
    fn follow_changes(&mut self, changes: usize) {
        self.seen_changes = changes;
        let ctl = &self.sh.ctl;
        for w in 0..self.usable.len() {
            let epoch = ctl.death_epoch[w].load(Ordering::Acquire);
            if epoch != self.seen_epoch[w] {
                self.clean_up_after(w);
                self.seen_epoch[w] = epoch;
                // Acknowledged before the rings open: a death of the incarnation that serves
                // them then finds this handle among those to leave a note for.
                self.sh.ctl.acked[self.p as usize][w].store(epoch, Ordering::Release);
                open_rings(self.sh, self.p, w, epoch);
            }
            let ctl = &self.sh.ctl;
            if ctl.abandoned[w].load(Ordering::Acquire) && !self.gave_up[w] {
                // A worker that could not be killed may still write its slots: fail its tasks
                // and never reuse their slots.
                self.gave_up[w] = true;
                let back = self.reclaim(w);
                for t in back {
                    self.finish(
                        t,
                        Outcome::failed(TaskError::WorkerDied {
                            how: "it could not be killed".into(),
                            attempts: 1,
                        }),
                        true,
                        Some(w as u32),
                    );
                }
            }
            let ctl = &self.sh.ctl;
            self.usable[w] = ctl.alive[w].load(Ordering::Acquire) && !self.faulted[w];
        }
    }

    /// One round of housekeeping: returns, deaths, redo, doorbells. Whether anything moved.
    pub(crate) fn pump(&mut self) -> bool {
        let mut progress = self.collect_all();
        self.follow_monitor();
        if !self.redo.is_empty() && self.usable.contains(&true) {
            // (Only a task sent is progress: one still waiting waits for a return.)
            progress |= self.send_waiting();
        }
        if let Some(why) = self.broken() {
            // Deaths the monitor published before the pool broke are followed first (seen
            // since `follow_monitor` above looked, they would otherwise pass for no workers).
            self.follow_monitor();
            // Nobody is left to do the remaining work: fail it, never drop it silently. A task
            // waiting to be redone after its worker died fails as that death.
            for t in std::mem::take(&mut self.redo) {
                let slot = t.slot() as usize;
                let error = match self.died_how[slot].take() {
                    Some(how) if self.records[slot].attempts > 0 => TaskError::WorkerDied {
                        how: format!("{how}; no worker was left to run it again: {why}"),
                        attempts: self.records[slot].attempts,
                    },
                    _ => TaskError::NoWorkers(why.clone()),
                };
                self.finish(t, Outcome::failed(error), false, None);
                progress = true;
            }
            // A terminated pool's workers are being killed, not yet dead: one may still write
            // the slot of the task it runs, so those slots are never reused.
            let terminating = self.sh.terminating.load(Ordering::Acquire);
            for w in 0..self.usable.len() {
                if self.gave_up[w] {
                    continue;
                }
                let back = self.reclaim(w);
                for t in back {
                    self.finish(
                        t,
                        Outcome::failed(TaskError::NoWorkers(why.clone())),
                        terminating,
                        Some(w as u32),
                    );
                    progress = true;
                }
            }
        }
        self.ring_bells();
        progress
    }

    /// Pumps until `done(self)` or the deadline; `false` if the deadline came first.
    pub(crate) fn wait_until(&mut self, until: Until, done: impl FnMut(&mut Self) -> bool) -> bool {
        self.wait_inner(until, false, done)
    }

    /// As [`Core::wait_until`]; with `interruptible`, an [`Interrupter::interrupt`] also ends
    /// the wait (`false`), and is used up by it.
    fn wait_inner(
        &mut self,
        until: Until,
        interruptible: bool,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> bool {
        let interrupt = &self.sh.interrupt[self.p as usize];
        self.backoff.reset();
        let mut same_cpu_yields = 0u32;
        loop {
            let progress = self.pump();
            // Each way out ends the wait for the backoff here, so that it judges the wait by
            // its own length (left to the next wait's start, it took the caller's work in
            // between for waiting: nearly every wait looked late, and the budgets collapsed).
            if done(self) {
                self.backoff.reset();
                return true;
            }
            // A load first: this runs on every spin of a wait, and a store (even of `false`)
            // would pull the line, shared with other handles' flags, from their cores. AcqRel
            // swap: pairs with the Release store in `Interrupter::interrupt`.
            if interruptible
                && interrupt.load(Ordering::Relaxed)
                && interrupt.swap(false, Ordering::AcqRel)
            {
                self.backoff.reset();
                return false;
            }
            // (The clock is read only for a deadline: `recv` and the `try_` calls have none.)
            let now = match until {
                Until::Now => return false,
                Until::At(d) => {
                    let now = Instant::now();
                    if now >= d {
                        self.backoff.reset();
                        return false;
                    }
                    Some((d, now))
                }
                Until::Forever => None,
            };
            if progress {
                self.backoff.reset();
                same_cpu_yields = 0;
                continue;
            }
            if self.backoff.step() == Step::Sleep {
                let (sh, usable) = (self.sh, &self.usable);
                // A usable worker that last waited on this CPU shares its run queue: yield to
                // it (the cheap hand-off of two runs sharing two CPUs, once each run's producer
                // and worker are on one CPU). The workers do the same towards producers.
                if same_cpu_yields < SAME_CPU_YIELDS
                    && sh.spin != SpinMode::Never
                    && same_cpu_partner(
                        &sh.seg.producer(self.p).bell,
                        crate::sys::current_cpu(),
                        (0..usable.len())
                            .filter(|&w| usable[w])
                            .map(|w| &sh.seg.worker(w as u32).bell),
                    )
                {
                    same_cpu_yields += 1;
                    std::thread::yield_now();
                    continue;
                }
                let left = now.map_or(SLEEP, |(d, now)| (d - now).min(SLEEP));
                let seen = self.seen_changes;
                let ctl = &self.sh.ctl;
                let from = &mut self.from;
                let usable = &self.usable;
                Doorbell::new(&self.sh.seg.producer(self.p).bell).sleep(&Futex, left, || {
                    (interruptible && interrupt.load(Ordering::Acquire))
                        || ctl.changes.load(Ordering::Acquire) != seen
                        || from
                            .iter_mut()
                            .zip(usable)
                            .any(|(r, &u)| u && r.has_pending().unwrap_or(true))
                });
            }
        }
    }

    /// A free slot of at least `bytes` (of the smallest size class that has one), waiting
    /// as `until` says.
    pub(crate) fn take_slot(&mut self, bytes: u64, until: Until) -> Result<Token, LoanError> {
        fits(bytes, self.max_slot_bytes())?;
        // (Deaths first: the monitor gives the pool up only once it knows no worker will serve.)
        self.follow_monitor();
        if let Some(why) = self.broken() {
            return Err(LoanError::NoWorkers(why));
        }
        let class = self
            .sh
            .seg
            .layout()
            .classes()
            .iter()
            .position(|c| c.slot_bytes >= bytes)
            .expect("the largest class fits (checked above)");
        if let Some(t) = self.slots.take(class) {
            return Ok(t);
        }
        let mut got = None;
        let mut hopeless = false;
        let waits = !matches!(until, Until::Now);
        self.wait_until(until, |c| {
            // Completed tasks not yet received do not free their slots: only dropping their
            // completions does, and receiving them is the caller's (a loan never receives). So
            // with no map's slots out (a forgotten map's go home by themselves), a wait cannot
            // help even while tasks are in flight, or wait in the handle for a worker, or to
            // run again after a death: each ends as a completion to receive. (`try_` says
            // `Busy` for those: its caller receives and tries again.)
            got = c.slots.take(class);
            hopeless = got.is_none() && (c.in_flight == 0 || (waits && c.map_out == 0));
            got.is_some() || hopeless
        });
        if let Some(t) = got {
            return Ok(t);
        }
        if let Some(why) = self.broken() {
            return Err(LoanError::NoWorkers(why));
        }
        let (slots, held, loaned) = (
            self.slots.loanable(),
            self.held + self.ready.len(),
            self.loaned,
        );
        if hopeless {
            return Err(LoanError::Exhausted {
                slots: self.slots.loanable_from(class),
                in_flight: self.in_flight,
                held,
                loaned,
            });
        }
        Err(LoanError::Busy {
            slots,
            in_flight: self.in_flight,
            held,
            loaned,
        })
    }

    /// Waits for all in-flight tasks (for a handle's drop).
    fn drain(&mut self) {
        self.draining = true;
        // A terminated pool kills its workers without waiting: nothing more will come back.
        self.wait_until(Until::Forever, |c| {
            c.in_flight == 0 || c.sh.terminating.load(Ordering::Acquire)
        });
        while let Some(r) = self.ready.pop_front() {
            self.release(r.token, r.quarantine);
        }
    }
}

/// Opens producer `p`'s rings to and from worker `w` to incarnation `epoch` of it (see
/// [`HeadLine::open_for`](crate::layout::HeadLine::open_for)); Release: whatever this handle
/// did to them before (zeroing them after a death) is visible to that worker once it attaches.
fn open_rings(sh: &Shared, p: u32, w: usize, epoch: usize) {
    let (ctl, _) = sh.seg.ring(p, w as u32, Direction::ToWorker);
    ctl.head
        .open_for
        .store(sh.ctl.gate(w as u32, epoch), Ordering::Release);
}

/// One submitting thread's handle on a [`super::Pool`]: its own share of the slots and its own
/// rings to every worker (no lock on the data path). Not `Sync`: one thread uses it at a time;
/// make one handle per thread with [`super::Pool::producer`].
///
/// Dropping it waits for its tasks in flight, those waiting in it for a worker included, and
/// discards their results; once a worker dies or is killed for hanging meanwhile, the tasks
/// it had and those still waiting are dropped unrun (so a drop takes at most about one worker
/// timeout per worker).
///
/// A handle takes part in recovering from a worker's death (it takes back what it had sent
/// there) whenever it is used: any call. A dead worker is replaced at once, and the
/// replacement serves each handle once that handle has done so: a handle left idle holds back
/// neither the replacement nor the other handles, and finds its own tasks redone or failed,
/// as that death left them, when it is used again.
pub struct Producer<'pool> {
    core: RefCell<Core<'pool>>,
    /// The pool's shared state (also in the core; here to reach the segment without a borrow).
    sh: &'pool Shared,
}

impl<'pool> Producer<'pool> {
    pub(crate) fn new(sh: &'pool Shared, p: u32) -> Producer<'pool> {
        Producer {
            core: RefCell::new(Core::new(sh, p)),
            sh,
        }
    }

    pub(crate) fn core(&self) -> std::cell::RefMut<'_, Core<'pool>> {
        self.core.borrow_mut()
    }

    /// Loans a slot for an array of `T` with `shape`, waiting while every slot of this handle
    /// is busy (backpressure). The slot holds whatever was last in it: write every element.
    ///
    /// A loan never receives: a task's slot comes back when its completion, taken by
    /// [`Producer::recv`], is dropped. So with every slot in flight or completed, a loop that
    /// only loans and submits gets [`LoanError::Exhausted`] at once; receive some first.
    ///
    /// # Errors
    /// [`LoanError::TooLarge`] (names bytes asked and the maximum), [`LoanError::Exhausted`]
    /// when every slot is the caller's to free (loaned, held, or in flight with a completion to
    /// receive), [`LoanError::NoWorkers`].
    pub fn loan<T: Element>(&self, shape: Shape) -> Result<Loan<'_, T>, LoanError> {
        self.loan_until(shape, Until::Forever)
    }

    /// As [`Producer::loan`], without waiting: [`LoanError::Busy`] says what holds the slots.
    ///
    /// # Errors
    /// As [`Producer::loan`], and [`LoanError::Busy`].
    pub fn try_loan<T: Element>(&self, shape: Shape) -> Result<Loan<'_, T>, LoanError> {
        self.loan_until(shape, Until::Now)
    }

    /// As [`Producer::loan`], waiting at most `timeout` (`Duration::MAX`: as long as it takes).
    ///
    /// # Errors
    /// As [`Producer::try_loan`].
    pub fn loan_timeout<T: Element>(
        &self,
        shape: Shape,
        timeout: Duration,
    ) -> Result<Loan<'_, T>, LoanError> {
        self.loan_until(shape, Until::after(timeout))
    }

    fn loan_until<T: Element>(&self, shape: Shape, until: Until) -> Result<Loan<'_, T>, LoanError> {
        let mut c = self.core();
        let token = c.take_slot(shape.bytes(T::DTYPE), until)?;
        c.loaned += 1;
        drop(c);
        // (A slot of a class the array fits: `new` cannot refuse it.)
        Loan::new(self, token, shape).map_err(|(token, e)| {
            self.give_back(token, false, false);
            e
        })
    }

    /// Submits the loan's array with `task`; returns its ticket at once (the task runs in a
    /// worker; [`Producer::recv`] gives its completion).
    ///
    /// # Errors
    /// [`Rejected`] (with the loan back, data intact) for an unknown kernel, a kernel without
    /// this dtype, an op that does not fit the dtype, an impossible output shape, or a pool
    /// without workers.
    pub fn submit<'a, T: Element>(
        &'a self,
        loan: Loan<'a, T>,
        task: &Task,
    ) -> Result<Ticket, Rejected<'a, T>> {
        let shape = loan.shape;
        self.submit_typed(loan, T::DTYPE, shape, task, true)
    }

    /// As [`Producer::submit`], but without waking a sleeping worker: the task is published to
    /// its worker's queue at once, so a worker that is awake (as while work flows) starts it
    /// without delay, and one asleep on its futex is woken by this handle's next
    /// [`Producer::notify`], [`Producer::submit`], `map`, a [`Producer::recv`],
    /// [`Producer::try_recv`] or loan that finds nothing ready (each looks for completions,
    /// which ends with the wake-ups owed), or the handle's drop. Waking a worker costs an
    /// atomic read-modify-write (a full fence) per call; a caller that submits many tasks in
    /// a row, such as one refilling each completion it receives, saves it by deferring and
    /// calling [`Producer::notify`] once (or by letting its next waiting `recv` do it).
    ///
    /// A task submitted this way and never followed by one of those calls waits for a sleeping
    /// worker until the pool's monitor, which looks every 20 ms, sees work owed to a worker
    /// that returns nothing and rings it (within about 40 ms). (A task that no worker may take
    /// yet waits in the handle instead, see [`crate::PoolBuilder::queue_ahead`]: only those
    /// calls send it, the monitor does not.)
    ///
    /// # Errors
    /// As [`Producer::submit`].
    pub fn submit_deferred<'a, T: Element>(
        &'a self,
        loan: Loan<'a, T>,
        task: &Task,
    ) -> Result<Ticket, Rejected<'a, T>> {
        let shape = loan.shape;
        self.submit_typed(loan, T::DTYPE, shape, task, false)
    }

    /// Wakes every sleeping worker that has a task of this handle waiting
    /// ([`Producer::submit_deferred`]); nothing when there is none. Tasks waiting in the
    /// handle for a worker (see [`crate::PoolBuilder::queue_ahead`]) go to the workers free by
    /// now.
    pub fn notify(&self) {
        let mut c = self.core();
        if c.has_waiting() {
            c.pump();
        } else {
            c.ring_bells();
        }
    }

    /// Submits a loan of bytes as an array of `dtype` and `shape` (for data whose dtype is
    /// known only at run time, such as a file's). `shape` must take exactly the loan's bytes.
    ///
    /// # Errors
    /// As [`Producer::submit`], and [`SubmitError::OutShape`] when `shape` and `dtype` do not
    /// take the loan's bytes.
    pub fn submit_bytes<'a>(
        &'a self,
        loan: Loan<'a, u8>,
        dtype: DType,
        shape: Shape,
        task: &Task,
    ) -> Result<Ticket, Rejected<'a, u8>> {
        if shape.bytes(dtype) != loan.shape.elements() {
            let error = SubmitError::OutShape(format!(
                "{shape} of {dtype} is {} bytes, the loan has {}",
                shape.bytes(dtype),
                loan.shape.elements()
            ));
            return Err(Rejected { error, loan });
        }
        self.submit_typed(loan, dtype, shape, task, true)
    }

    fn submit_typed<'a, T: Element>(
        &'a self,
        loan: Loan<'a, T>,
        dtype: DType,
        shape: Shape,
        task: &Task,
        notify: bool,
    ) -> Result<Ticket, Rejected<'a, T>> {
        let reject = |error, loan| Err(Rejected { error, loan });
        let mine = std::ptr::addr_eq(loan.producer as *const dyn Handle, self as *const Self);
        if !mine {
            return reject(SubmitError::OtherHandle, loan);
        }
        let mut c = self.core();
        let slot = loan
            .token
            .as_ref()
            .expect("a live loan holds its token")
            .slot() as usize;
        // The same task for one array of this dtype as this slot last carried, checked then
        // and unchanged since (same id, same content): its kernel code and parameters are in
        // the record already, and only the array and the number are new.
        let same = task.id == c.records[slot].task && c.records[slot].dtype == dtype;
        let resolved = if same {
            if let Some(why) = c.broken() {
                drop(c);
                return reject(SubmitError::NoWorkers(why), loan);
            }
            None
        } else {
            let (kernel, params) = match c.admit(task, dtype, shape.bytes(dtype), loan.cap) {
                Ok(k) => k,
                Err(e) => {
                    drop(c);
                    return reject(e, loan);
                }
            };
            if let Some(out_shape) = task.out_shape {
                let why = if c.sh.mode == Mode::InPlace {
                    Some("an output shape of its own needs an out-of-place pool".to_string())
                } else if kernel >= crate::layout::BUILTIN {
                    Some("built-in ops keep the input's shape".to_string())
                } else if out_shape.bytes(dtype)
                    > loan.cap.saturating_sub(task.context_bytes().len() as u64)
                {
                    Some(format!(
                        "an output {out_shape} of {dtype} is {} bytes; its slot holds {}",
                        out_shape.bytes(dtype),
                        loan.cap
                    ))
                } else {
                    None
                };
                if let Some(why) = why {
                    drop(c);
                    return reject(SubmitError::OutShape(why), loan);
                }
            }
            Some((kernel, params))
        };
        let out_shape = task.out_shape.unwrap_or(shape);
        let mut loan = loan;
        let mut token = loan.token.take().expect("a live loan holds its token");
        c.loaned -= 1;
        let ticket = c.next_ticket();
        if let Some((kernel, params)) = resolved {
            let any = c.sh.registry.takes_any(kernel);
            let context = c.place_context(task.context_bytes(), &mut token);
            let r = c.fresh_record(&token);
            r.dtype = dtype;
            r.any = any;
            r.max_retries = task.retries_or(r.max_retries);
            let desc = &mut r.desc;
            desc.kernel = kernel;
            desc.dtype = u32::from(dtype.code());
            desc.out_dtype = desc.dtype;
            desc.count = 1;
            desc.params_len = params.write_to(&mut desc.params);
            (desc.context_offset, desc.context_len) = context;
            if task.out_shape.is_some() {
                (desc.out_ndim, desc.out_shape) = out_shape.raw();
            } else if context == (0, 0) {
                r.task = task.id;
            }
        }
        let r = &mut c.records[slot];
        // (Only the lines above mark a record, and only for one array without an output shape
        // or context of its own; every other writer starts from `fresh_record`.)
        debug_assert!(
            !same
                || (r.desc.count == 1
                    && r.desc.out_ndim == 0
                    && r.desc.context_len == 0
                    && r.desc.skip_mask == 0
                    && r.map == 0),
            "a record marked with a task describes one plain array"
        );
        r.out_shape = out_shape;
        r.attempts = 0;
        r.desc.seq = ticket;
        let (ndim, dims) = shape.raw();
        r.desc.items[0] = ItemDesc {
            offset: 0,
            ndim,
            shape: dims,
        };
        c.send_recorded(token);
        if notify {
            c.ring_bells();
        }
        Ok(Ticket(ticket))
    }

    /// A way to cut this handle's waits for completions short from another thread (see
    /// [`Interrupter`]).
    pub fn interrupter(&self) -> Interrupter<'_> {
        Interrupter {
            sh: self.sh,
            p: self.core().p,
        }
    }

    /// The next completion, waiting for one; `None` when this handle has no task in flight and
    /// none completed (tasks of a running [`Producer::map`] are not counted), or when an
    /// [`Interrupter`] cut the wait short.
    pub fn recv(&self) -> Option<Completion<'_>> {
        self.recv_until(Until::Forever)
    }

    /// The next completion if one is ready now. When none is waiting, it looks for
    /// completions once, which also wakes the workers owed a wake-up
    /// ([`Producer::submit_deferred`]).
    pub fn try_recv(&self) -> Option<Completion<'_>> {
        self.recv_until(Until::Now)
    }

    /// The next completion, waiting at most `timeout` (less when an [`Interrupter`] cuts the
    /// wait short; `Duration::MAX`: as long as it takes).
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Completion<'_>> {
        self.recv_until(Until::after(timeout))
    }

    fn recv_until(&self, until: Until) -> Option<Completion<'_>> {
        let mut c = self.core();
        let mut at = c.first_ready();
        if at.is_some() && c.has_waiting() {
            // (Tasks waiting for a worker go as soon as one frees up, also while completions
            // wait to be received.)
            c.pump();
        }
        if at.is_none() {
            c.pump();
            at = c.first_ready();
            if at.is_none() && c.in_flight > 0 {
                c.wait_inner(until, true, |c| {
                    c.first_ready().is_some() || c.in_flight == 0
                });
                at = c.first_ready();
            }
        }
        let at = at?;
        let r = if at == 0 {
            c.ready.pop_front()
        } else {
            c.ready.remove(at)
        }
        .expect("found");
        c.held += 1;
        let slot = r.token.slot() as usize;
        let count = c.records[slot].desc.count as usize;
        let mut rest = if count > 1 {
            c.spare_outs.pop().unwrap_or_default()
        } else {
            Vec::new()
        };
        let rec = &c.records[slot];
        // (Arrays that all succeeded as requested, the common case, need none of the
        // outcome's detail: their dtype is the task's, their shapes the request's.)
        let plain = matches!(r.outcome, Outcome::Ok);
        let item_out = |k: usize| {
            let (dtype, shape, error) = if plain {
                (rec.dtype, rec.requested_shape(k), None)
            } else {
                outcome_of_item(&r.outcome, rec, k)
            };
            ItemOut {
                offset: rec.desc.items[k].offset as usize,
                dtype,
                shape,
                error,
            }
        };
        let first = item_out(0);
        if plain {
            // (Straight from each item's descriptor into its place: built through the closure's
            // tuple, each entry was assembled on the stack and read back whole, a stall per
            // array on store forwarding.)
            let dtype = rec.dtype;
            rest.extend(rec.desc.items[1..count].iter().map(|it| ItemOut {
                offset: it.offset as usize,
                dtype,
                shape: Shape::from_raw(it.ndim, it.shape).expect("ours"),
                error: None,
            }));
        } else {
            rest.extend((1..count).map(item_out));
        }
        let ticket = Ticket(rec.desc.seq);
        let Ready {
            token,
            outcome,
            quarantine,
            worker,
            latency_ns,
            service: _,
            shared: _,
        } = r;
        // (`Ok`, the common case, owns nothing: no drop glue to call for it.)
        if plain {
            std::mem::forget(outcome);
        } else {
            drop(outcome);
        }
        // (A pointer, not a slice: a quarantined slot may still be written by its worker.)
        let (results, results_len) = c.sh.seg.result_raw(&token);
        Some(Completion {
            producer: self,
            token,
            hold: if quarantine {
                Hold::Quarantined
            } else {
                Hold::Slot
            },
            worker: worker.unwrap_or(NO_WORKER),
            ticket,
            latency_ns,
            results,
            results_len,
            first,
            rest: std::mem::ManuallyDrop::new(rest),
        })
    }

    /// The ticket the next submit of this handle will return: a handle numbers its tasks 0,
    /// 1, 2, … in the order they are submitted (`submit`, `submit_deferred`, `submit_bytes`,
    /// `submit_packed`; a `map` takes no tickets, its results carry their input's index), so a
    /// caller can derive what it needs from the ticket instead of keeping a table.
    pub fn next_ticket(&self) -> Ticket {
        Ticket(self.core().peek_ticket())
    }

    /// Tasks submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.core().in_flight
    }

    /// Cancels task `ticket` if no worker has it: it waits in this handle for a worker (see
    /// [`crate::PoolBuilder::queue_ahead`]), or to run again after its worker died. Its slot
    /// goes home and no completion comes for it. Whether it was cancelled: `false` when a
    /// worker has it (it runs, or waits in that worker's queue), it is done, it is not this
    /// handle's, or it belongs to a `map`.
    pub fn cancel(&self, ticket: Ticket) -> bool {
        !self.cancel_waiting(|t| t == ticket).is_empty()
    }

    /// Whether task `ticket` waits in this handle for a worker (see
    /// [`crate::PoolBuilder::queue_ahead`]): no worker has it yet, so [`Producer::cancel`]
    /// would take it back. (Waiting tasks that workers can take now are sent first.)
    pub fn is_waiting(&self, ticket: Ticket) -> bool {
        let mut c = self.core();
        c.pump();
        c.redo
            .iter()
            .any(|t| c.records[t.slot() as usize].submitted() == Some(ticket))
    }

    /// Cancels each task of this handle that no worker has (as [`Producer::cancel`]) and that
    /// `pick` takes, and returns their tickets, oldest first.
    pub fn cancel_waiting(&self, mut pick: impl FnMut(Ticket) -> bool) -> Vec<Ticket> {
        let mut c = self.core();
        // (Returns first: they may let waiting tasks go to workers.)
        c.pump();
        let mut gone = Vec::new();
        c.cancel_waiting(|t| {
            let take = pick(t);
            if take {
                gone.push(t);
            }
            take
        });
        gone
    }

    /// Slots of this handle that loans take: the backpressure bound on its loans, tasks in
    /// flight and completions held (the pool's [`crate::PoolBuilder::pack_slots`], which only maps
    /// use, are not counted).
    pub fn slots(&self) -> usize {
        self.core().slots.loanable()
    }

    /// Slots of this handle that only maps use ([`crate::PoolBuilder::pack_slots`]; 0 when the
    /// pool has none).
    pub fn pack_slots(&self) -> usize {
        let c = self.core();
        c.slots.len() - c.slots.loanable()
    }

    /// Slots of this handle free now, of every kind: [`Producer::slots`] and
    /// [`Producer::pack_slots`] together when nothing is loaned, in flight or held.
    pub fn free_slots(&self) -> usize {
        self.core().slots.free()
    }
}

/// What loans and completions need of their handle, with the handle's own lifetime erased
/// (`Producer<'pool>` is invariant in `'pool`).
pub(crate) trait Handle {
    fn seg(&self) -> &crate::shm::Segment;
    /// A loan (`completion == false`) or a completion gives its slot back.
    fn give_back(&self, token: Token, quarantine: bool, completion: bool);
    /// A completion's slot becomes a loan.
    fn reloan(&self);
    /// An item list of a packed loan, or a completion's results, to reuse.
    fn recycle(&self, items: Option<Vec<ItemDesc>>, outs: Option<Vec<ItemOut>>);
}

impl Handle for Producer<'_> {
    fn seg(&self) -> &crate::shm::Segment {
        &self.sh.seg
    }
    fn give_back(&self, token: Token, quarantine: bool, completion: bool) {
        let mut c = self.core();
        if completion {
            c.held -= 1;
        } else {
            c.loaned -= 1;
        }
        c.release(token, quarantine);
    }
    fn reloan(&self) {
        let mut c = self.core();
        c.held -= 1;
        c.loaned += 1;
    }
    fn recycle(&self, items: Option<Vec<ItemDesc>>, outs: Option<Vec<ItemOut>>) {
        let mut c = self.core();
        if let Some(v) = items {
            keep_spare(&mut c.spare_items, v);
        }
        if let Some(v) = outs {
            keep_spare(&mut c.spare_outs, v);
        }
    }
}

/// Keeps an emptied list for reuse (a few are enough: at most one per slot is ever taken).
pub(crate) fn keep_spare<T>(spares: &mut Vec<Vec<T>>, mut v: Vec<T>) {
    if v.capacity() > 0 && spares.len() < 64 {
        v.clear();
        spares.push(v);
    }
}

/// Cuts short, from any thread, a wait of one [`Producer`] handle for completions:
/// [`Producer::recv`] and [`Producer::recv_timeout`] under way return `None` at once, or, when
/// none is under way, the next one of them does. For a handle shared between threads by a lock
/// (as the Python bindings do): a thread that wants the handle interrupts the one waiting with
/// it, instead of waiting out its timeout. Nothing is lost: completions stay ready for the next
/// receive. Waits for slots (`loan`) and `map` are not affected.
#[derive(Clone, Copy)]
pub struct Interrupter<'p> {
    sh: &'p Shared,
    p: u32,
}

impl Interrupter<'_> {
    /// Ends the handle's current (or next) wait for a completion.
    pub fn interrupt(&self) {
        // Release: pairs with the waiter's AcqRel swap / Acquire load.
        self.sh.interrupt[self.p as usize].store(true, Ordering::Release);
        Doorbell::new(&self.sh.seg.producer(self.p).bell).ring(&Futex);
    }
}

impl Drop for Producer<'_> {
    fn drop(&mut self) {
        let c = self.core.get_mut();
        c.drain();
        let p = c.p as usize;
        // (No worker should yield to a handle that is gone.)
        c.sh.seg.producer(c.p).bell.cpu.store(0, Ordering::Relaxed);
        c.sh.active[p].store(false, Ordering::Release);
    }
}

/// A loaned slot: write the input array here, then [`Producer::submit`] it. Dropping it
/// unsubmitted gives the slot back.
pub struct Loan<'p, T: Element> {
    producer: &'p dyn Handle,
    token: Option<Token>,
    shape: Shape,
    /// The slot's data, `cap` bytes (aligned to a page, or to 64 bytes in a size class under a
    /// page), found once when the loan is made.
    data: NonNull<u8>,
    cap: u64,
    _t: PhantomData<T>,
}

impl<'p, T: Element> Loan<'p, T> {
    /// A loan of `token`'s slot for an array of `shape`, if it fits; the token back if not.
    #[inline]
    fn new(
        producer: &'p dyn Handle,
        mut token: Token,
        shape: Shape,
    ) -> Result<Loan<'p, T>, (Token, LoanError)> {
        let slot = producer.seg().slot_bytes_mut(&mut token);
        let (data, cap) = (NonNull::from(&mut *slot).cast(), slot.len() as u64);
        if let Err(e) = fits(shape.bytes(T::DTYPE), cap) {
            return Err((token, e));
        }
        Ok(Loan {
            producer,
            data,
            cap,
            token: Some(token),
            shape,
            _t: PhantomData,
        })
    }

    /// The array's elements, row-major, in shared memory (exactly `shape.elements()` of
    /// them). They hold whatever the slot last held until written.
    pub fn as_mut_slice(&mut self) -> &mut [T] {
        let n = self.shape.bytes(T::DTYPE) as usize;
        // SAFETY: `data` is the slot's memory, `cap` bytes inside the mapped segment, and this
        // loan holds the slot's token, so nothing else reaches it (DESIGN invariant 1); the
        // shape's bytes are at most `cap` (checked when the loan was made or reshaped). The
        // borrow of `self` keeps the slice from outliving the loan.
        let bytes = unsafe { std::slice::from_raw_parts_mut(self.data.as_ptr(), n) };
        cast_mut::<T>(bytes)
    }

    /// Copies `data` in (`data.len()` must be the shape's element count).
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn copy_from_slice(&mut self, data: &[T]) {
        crate::array::copy_elements(self.as_mut_slice(), data);
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Bytes the loaned slot holds: the largest shape [`Loan::reshape`] takes.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// Gives the loan another shape before it is submitted (the elements stay where they are:
    /// the first `shape.elements()` of the slot). With [`Completion::reuse`] at the larger of
    /// two shapes, this lets a caller check a result and write the next input in one pass over
    /// the slot.
    ///
    /// # Errors
    /// [`LoanError::TooLarge`] if `shape` does not fit the slot (the loan keeps its shape).
    pub fn reshape(&mut self, shape: Shape) -> Result<(), LoanError> {
        fits(shape.bytes(T::DTYPE), self.cap)?;
        self.shape = shape;
        Ok(())
    }

    /// The slot as an `ndarray` view of the loan's shape, to write the input in place (with the
    /// `ndarray` feature).
    #[cfg(feature = "ndarray")]
    pub fn as_ndarray_mut(&mut self) -> ndarray::ArrayViewMutD<'_, T> {
        let dims: Vec<usize> = self.shape.dims().iter().map(|&d| d as usize).collect();
        ndarray::ArrayViewMutD::from_shape(dims, self.as_mut_slice())
            .expect("the slice has the shape's element count")
    }

    /// Copies an `ndarray` array of any layout in (with the `ndarray` feature); its shape must
    /// be the loan's.
    ///
    /// # Errors
    /// [`crate::array::ShapeError`]-like message when the shapes differ.
    #[cfg(feature = "ndarray")]
    pub fn copy_from_ndarray<S, D>(&mut self, a: &ndarray::ArrayBase<S, D>) -> Result<(), String>
    where
        S: ndarray::Data<Elem = T>,
        D: ndarray::Dimension,
    {
        let want: Vec<usize> = self.shape.dims().iter().map(|&d| d as usize).collect();
        if a.shape() != want.as_slice() {
            return Err(format!(
                "an array of shape {:?} into a loan of {}",
                a.shape(),
                self.shape
            ));
        }
        self.as_ndarray_mut().assign(&a.view().into_dyn());
        Ok(())
    }
}

impl<T: Element> Drop for Loan<'_, T> {
    fn drop(&mut self) {
        if let Some(t) = self.token.take() {
            self.producer.give_back(t, false, false);
        }
    }
}

/// A finished task: its result (zero-copy, in shared memory) or its error. Dropping it gives
/// the slot back, so hold few at a time.
pub struct Completion<'p> {
    producer: &'p dyn Handle,
    /// The slot's token while `hold` is not [`Hold::Gone`].
    token: Token,
    hold: Hold,
    /// The worker that ran it or whose death failed it; [`NO_WORKER`] for none.
    worker: u32,
    ticket: Ticket,
    latency_ns: u64,
    /// The slot's result region (out of place its output, in place its data), found once.
    results: NonNull<u8>,
    results_len: usize,
    /// The (first) array's outcome.
    first: ItemOut,
    /// A batch's other arrays ([`Producer::submit_packed`]); empty otherwise. (Given back to
    /// the handle for reuse by `drop`, never dropped here: no drop glue per completion.)
    rest: std::mem::ManuallyDrop<Vec<ItemOut>>,
}

// (128 bytes at most: completions move by value, and up to that size a move is a few register
// copies, not a call to `memcpy`.)
const _: () = assert!(core::mem::size_of::<Completion<'static>>() <= 128);

/// Whether a completion still holds its slot, and how it will give it back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// It holds the slot: dropping it sends the slot home.
    Slot,
    /// It holds a slot whose worker could not be killed: dropping it retires the slot.
    Quarantined,
    /// [`Completion::reuse`] handed the slot to a loan.
    Gone,
}

/// [`Completion`]'s `worker` when no worker had the task.
const NO_WORKER: u32 = u32::MAX;

/// A copy of an array's error, out of the way of the common path.
#[cold]
fn cloned(e: &TaskError) -> TaskError {
    e.clone()
}

/// One array's outcome in a completion.
#[derive(Debug, Clone)]
pub(crate) struct ItemOut {
    /// Byte offset of its output in the slot's output (or, in place, its data).
    offset: usize,
    dtype: DType,
    shape: Shape,
    /// Boxed: the common case carries none, and completions move by value.
    error: Option<Box<TaskError>>,
}

/// A result array in shared memory, valid while its [`Completion`] lives (or, from
/// [`super::Map::next_view`], until the map's next call).
pub struct OutputView<'c, T> {
    data: &'c [T],
    shape: Shape,
}

impl<'c, T: Element> OutputView<'c, T> {
    /// A view of `data`, of `shape` (as many elements).
    pub(crate) fn new(data: &'c [T], shape: Shape) -> OutputView<'c, T> {
        debug_assert_eq!(data.len() as u64, shape.elements());
        OutputView { data, shape }
    }

    /// The elements, row-major. The slice borrows what the view borrows (the completion, or
    /// the map until its next call), not the view itself, so it may outlive this value.
    pub fn as_slice(&self) -> &'c [T] {
        self.data
    }

    /// The shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// An `ndarray` view of the result in shared memory (with the `ndarray` feature).
    #[cfg(feature = "ndarray")]
    pub fn as_ndarray(&self) -> ndarray::ArrayViewD<'c, T> {
        let dims: Vec<usize> = self.shape.dims().iter().map(|&d| d as usize).collect();
        ndarray::ArrayViewD::from_shape(dims, self.data)
            .expect("the slice has the shape's element count")
    }

    /// A copy that outlives the completion (or the map's next call).
    pub fn to_array(&self) -> crate::array::Array<T> {
        crate::array::Array::new(crate::array::copied_vec(self.data), self.shape)
            .expect("shape matches")
    }
}

impl<'p> Completion<'p> {
    /// The ticket [`Producer::submit`] returned for this task.
    pub fn ticket(&self) -> Ticket {
        self.ticket
    }

    /// Its worker could not be killed and may still write this slot: the task failed with
    /// [`TaskError::WorkerDied`], and the slot is never used again (dropping this completion
    /// retires it; [`Completion::reuse`] refuses it).
    pub fn quarantined(&self) -> bool {
        self.hold == Hold::Quarantined
    }

    /// How long the task was out: from its dispatch to a worker (for a task redone after a
    /// death, its last dispatch) until this handle saw it back, in nanoseconds of the
    /// invariant TSC (or the monotonic clock where there is none).
    pub fn latency_ns(&self) -> u64 {
        self.latency_ns
    }

    /// The worker (`0..workers`) that ran the task, or whose death failed it; `None` when it
    /// failed without reaching one (no workers left).
    pub fn worker(&self) -> Option<u32> {
        (self.worker != NO_WORKER).then_some(self.worker)
    }

    /// Whether the task failed, and why (a batch: its first failed array's error; see
    /// [`Completion::item_error`]).
    pub fn error(&self) -> Option<&TaskError> {
        std::iter::once(&self.first)
            .chain(self.rest.iter())
            .find_map(|i| i.error.as_deref())
    }

    /// The result, as elements of `T` in shared memory (a batch: its first array's).
    ///
    /// # Errors
    /// The task's [`TaskError`], or [`TaskError::Dtype`] when the result is not `T`.
    pub fn output<T: Element>(&self) -> Result<OutputView<'_, T>, TaskError> {
        self.item_output(0)
    }

    /// Array `i`'s result, as elements of `T` in shared memory.
    ///
    /// # Errors
    /// That array's [`TaskError`], or [`TaskError::Dtype`] when it is not `T`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    #[inline]
    pub fn item_output<T: Element>(&self, i: usize) -> Result<OutputView<'_, T>, TaskError> {
        let bytes = self.item_bytes(i)?;
        let item = self.item(i);
        if T::DTYPE != item.dtype {
            return Err(TaskError::Dtype {
                asked: T::DTYPE,
                actual: item.dtype,
            });
        }
        Ok(OutputView {
            data: cast::<T>(bytes),
            shape: item.shape,
        })
    }

    /// The result's bytes (row-major elements of [`Completion::dtype`]) in shared memory.
    ///
    /// # Errors
    /// The task's [`TaskError`].
    pub fn output_bytes(&self) -> Result<&[u8], TaskError> {
        self.item_bytes(0)
    }

    /// The result's dtype: the task's, or what a kernel for any dtype reported.
    pub fn dtype(&self) -> DType {
        self.first.dtype
    }

    /// The result's shape.
    pub fn shape(&self) -> Shape {
        self.first.shape
    }

    /// Arrays in this completion: 1, or a batch's count.
    pub fn len(&self) -> usize {
        1 + self.rest.len()
    }

    /// Always false: a completion has at least one array.
    pub fn is_empty(&self) -> bool {
        false
    }

    #[inline]
    fn item(&self, i: usize) -> &ItemOut {
        if i == 0 {
            &self.first
        } else {
            &self.rest[i - 1]
        }
    }

    /// Array `i`'s result bytes in shared memory (row-major elements of
    /// [`Completion::item_dtype`]).
    ///
    /// # Errors
    /// That array's [`TaskError`].
    ///
    /// # Panics
    /// If `i >= self.len()`.
    #[inline]
    pub fn item_bytes(&self, i: usize) -> Result<&[u8], TaskError> {
        let item = self.item(i);
        if let Some(e) = &item.error {
            return Err(cloned(e));
        }
        let n = item.shape.bytes(item.dtype) as usize;
        // Within the slot: the request was built here, and a size a worker reported was
        // checked against the item's space when the result was read.
        assert!(
            item.offset + n <= self.results_len,
            "an array inside its slot"
        );
        // SAFETY: `results` is the slot's result region, `results_len` bytes inside the mapped
        // segment, found when this completion was made; the completion holds the slot's token
        // (the worker's push was Release, our pop Acquire), so no party following the protocol
        // writes it while the returned borrow of `self` lives; the range is inside (asserted).
        Ok(unsafe { std::slice::from_raw_parts(self.results.as_ptr().add(item.offset), n) })
    }

    /// Array `i`'s error, if it failed.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn item_error(&self, i: usize) -> Option<&TaskError> {
        self.item(i).error.as_deref()
    }

    /// Array `i`'s result dtype.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn item_dtype(&self, i: usize) -> DType {
        self.item(i).dtype
    }

    /// Array `i`'s result shape.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn item_shape(&self, i: usize) -> Shape {
        self.item(i).shape
    }

    /// Bytes this task's slot holds: the largest input [`Completion::reuse`] takes (a pool with
    /// [`super::PoolBuilder::size_class`] has slots of several sizes).
    pub fn capacity(&self) -> u64 {
        // (A slot's result region, its data in place or its output out of place, is the
        // slot's size.)
        self.results_len as u64
    }

    /// Reuses this slot for the next input (no trip through the free list): a loan of `shape`
    /// whose memory is this slot's input region. In place, it holds this task's result, ready
    /// to be read and overwritten in one pass.
    ///
    /// # Errors
    /// [`LoanError::TooLarge`] if `shape` does not fit this slot (see
    /// [`Completion::capacity`]; the slot goes home).
    #[inline]
    pub fn reuse<T: Element>(mut self, shape: Shape) -> Result<Loan<'p, T>, LoanError> {
        if self.hold == Hold::Quarantined {
            return Err(LoanError::NoWorkers(
                "the worker of this slot's task may still write it (it could not be killed, or \
                 the pool was terminated): the slot is never reused"
                    .into(),
            ));
        }
        match Loan::new(self.producer, self.take_token(), shape) {
            Ok(loan) => {
                self.producer.reloan();
                Ok(loan)
            }
            Err((token, e)) => {
                // (Dropping `self` sends the slot home.)
                (self.token, self.hold) = (token, Hold::Slot);
                Err(e)
            }
        }
    }

    /// Moves the token out; the completion no longer holds its slot.
    #[inline(always)]
    fn take_token(&mut self) -> Token {
        debug_assert!(
            self.hold != Hold::Gone,
            "a completion gives its slot up once"
        );
        self.hold = Hold::Gone;
        Token::assume_owned(self.token.slot(), self.token.generation())
    }
}

impl Drop for Completion<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.hold != Hold::Gone {
            let quarantine = self.hold == Hold::Quarantined;
            let token = self.take_token();
            self.producer.give_back(token, quarantine, true);
        }
        if self.rest.capacity() > 0 {
            self.producer
                .recycle(None, Some(std::mem::take(&mut *self.rest)));
        }
    }
}

/// Bytes of the largest slots of a segment.
pub(crate) fn max_slot_bytes(layout: &crate::layout::Layout) -> u64 {
    layout
        .classes()
        .last()
        .expect("a layout has a class")
        .slot_bytes
}

/// Item `i`'s output as its kernel reported it (any-dtype kernels; validated when read).
fn produced(res: &TaskResult, i: usize) -> Option<(DType, Shape)> {
    let o = res.outs.as_ref()?.get(i)?;
    Some((
        DType::from_code(u8::try_from(o.dtype).ok()?)?,
        Shape::from_raw(o.ndim, o.shape)?,
    ))
}

/// `Ok` if an array of `bytes` fits a slot of `max` bytes.
fn fits(bytes: u64, max: u64) -> Result<(), LoanError> {
    if bytes > max {
        return Err(LoanError::TooLarge { asked: bytes, max });
    }
    Ok(())
}

/// Slot bytes of `count` arrays of `bytes` each, each starting on a 64-byte line.
pub(crate) fn packed_offset(bytes: u64) -> u64 {
    bytes.div_ceil(crate::layout::MATRIX_ALIGN) * crate::layout::MATRIX_ALIGN
}

/// Most arrays per packed slot.
pub(crate) const PACK_MAX: usize = MAX_ITEMS;
