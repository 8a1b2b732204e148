//! `map` over an iterator of arrays: bounded work in flight, results in input order (or in
//! completion order), small arrays packed many to a slot.
//!
//! Each result is copied out of shared memory into an [`Array`] (or, through
//! [`Map::next_view`], lent as a view): the results of the slot that holds the next ones, when
//! every array in it succeeded (the common case), one at a time as the caller takes them (a
//! view is read in place), the slot going home after its last (a view's, at the map's next
//! call); the results of any other slot (out of turn, or with failures) when the map next
//! collects and the slot holding the next ones is not back, that slot going home at once.
//! (Ordered, a slot whose turn comes is drained even while later ones wait, parked: its
//! results come before theirs.)
//! While the caller takes one slot's results, the map neither sends inputs nor collects other
//! slots (those already sent run meanwhile). So a caller that collects every result never
//! blocks the pool: results waiting for their turn cost heap memory, bounded by the window,
//! not slots.
//!
//! The caller's code runs inside a map (its input iterator, its arrays' `AsArray` methods and
//! `Drop`): a panic there sends the arrays already packed (their results stay owed) before it
//! goes on, so a map whose panic is caught goes on with the next input. A map forgotten with
//! `mem::forget` leaves its slots to the next map of the same handle, which sends them home
//! unread (each slot's record carries its map's number).

use std::collections::VecDeque;
use std::ops::DerefMut;

use super::producer::{packed_offset, Core, Outcome, Producer, TaskError, Until, PACK_MAX};
use super::{OutputView, SubmitError, Task};
use crate::array::{as_bytes, cast, copied_vec, Array, AsArray, Shape, SlotWriter};
use crate::dtype::Element;
use crate::layout::{ItemDesc, TaskDesc};
use crate::task::Params;

/// Why `map` refuses an array of `shape` with `elements` elements (`bytes` bytes) for slots
/// of `slot_bytes`.
#[cold]
fn refused(
    shape: Result<Shape, crate::array::ShapeError>,
    elements: usize,
    bytes: u64,
    slot_bytes: u64,
) -> TaskError {
    match shape {
        Err(e) => TaskError::Shape(e.to_string()),
        Ok(shape) if elements as u64 != shape.elements() => {
            TaskError::Shape(format!("{elements} elements for a shape of {shape}"))
        }
        Ok(_) => TaskError::TooLarge {
            asked: bytes,
            max: slot_bytes,
        },
    }
}

/// One array's result.
type Outcome1<I> = Result<Array<<<I as Iterator>::Item as AsArray>::Elem>, TaskError>;

/// The iterator [`Producer::map`] and [`Producer::map_unordered`] return.
pub struct Map<'h, 'pool, I: Iterator>
where
    I::Item: AsArray,
{
    producer: &'h Producer<'pool>,
    inputs: I,
    pending: Option<I::Item>,
    kernel: u32,
    params: Params,
    /// The kernel takes any dtype (its outputs are as it reports).
    any: bool,
    /// The task's context bytes, after the arrays of every slot.
    context: Option<std::sync::Arc<[u8]>>,
    /// The task's redos after a death ([`Task::max_retries`], or the pool's).
    retries: u32,
    ordered: bool,
    window: u64,
    next_in: u64,
    next_out: u64,
    /// Ordered: results by `seq - next_out` (`None` while not finished; at most the window).
    parked: VecDeque<Option<Outcome1<I>>>,
    /// Finished, in completion order (unordered).
    finished: VecDeque<(u64, Outcome1<I>)>,
    exhausted: bool,
    /// Slots of this map in flight.
    out: usize,
    /// Times slots were sent since the workers' bells were last rung.
    unrung: usize,
    /// A finished slot whose arrays all succeeded, handed out straight from shared memory one
    /// at a time (no parking), then sent home.
    drain: Option<Drain>,
    /// This map's number on its handle (the `map` field of its slots' records).
    id: u32,
    /// The size class a slot is first looked for in: the smallest whose slots hold a pack
    /// (the pool's pack slots, if it has them), or the largest.
    first_class: usize,
    /// Bytes the pending input needs in its slot when the last slot taken was too small for
    /// it (0: none).
    need: u64,
    /// Bytes of arrays the largest slot holds (the context goes after them).
    max_usable: u64,
    /// How long a worker takes per array of this map, in ticks, as measured on the slots back
    /// so far (an average of about the last four; 0 until one is back): it caps the arrays a
    /// slot takes at what runs in about the pool's pack time.
    per_array: u64,
    /// [`super::PoolBuilder::pack_time`] in ticks; `u64::MAX`: no cap.
    pack_ticks: u64,
    /// The result [`Map::next_view`] last lent out of the heap (a failed slot's, or one out of
    /// turn).
    viewed: Option<Array<<I::Item as AsArray>::Elem>>,
}

/// [`super::PoolBuilder::pack_time`] unless set: long enough that the costs of a slot (ring
/// entry, descriptor, doorbell, about a microsecond) are small beside it, short enough that a
/// kernel that is slow per array is spread over the workers rather than run a slot of arrays at
/// a time on one.
pub(crate) const PACK_TIME: std::time::Duration = std::time::Duration::from_micros(100);

/// A finished slot being handed out: its array `next` (of `count`) is the map's next result;
/// its first array was input `seq`. The slot's token waits in `Core::map_drain` (so a map
/// that is forgotten mid-drain does not take the slot with it). `next == count`: its last
/// array was lent as a view, and the slot goes home at the map's next call.
struct Drain {
    next: usize,
    count: usize,
    seq: u64,
}

impl<'pool> Producer<'pool> {
    /// Runs `task` on every array of `inputs`, yielding the results in input order; at most a
    /// bounded number of arrays are in flight or waiting for their turn (the handle's slots
    /// times the arrays a slot packs), so any number of inputs is fine. `inputs` is consumed
    /// lazily.
    ///
    /// Takes the handle mutably: no loan or completion of it may be alive meanwhile. The
    /// handle's own tasks submitted earlier whose completions were not yet received still hold
    /// their slots (the map receives none of them): with pack slots, small arrays run anyway,
    /// but an input that needs one of the slots they hold, while no slot of the map's own is
    /// out, fails with [`TaskError::NoSlot`] rather than waiting forever.
    ///
    /// Small arrays are packed many to a slot (up to [`super::PoolBuilder::pack_bytes`], in
    /// the pool's [`super::PoolBuilder::pack_slots`] first, then its largest slots; an array
    /// too large for a pack slot goes in a largest one), and a slot's arrays run one after
    /// another on one worker. So that a kernel that is slow per array is spread over the
    /// workers, a slot takes at most as many arrays as run in about
    /// [`super::PoolBuilder::pack_time`] (100 µs) at the pace its map's slots came back at (one
    /// array per slot until the first is back; the pace is measured by the handle, so a caller
    /// that is slow to take results makes it look slower: smaller packs, never larger).
    /// `pack_bytes(0)` sends one array per slot throughout.
    /// Each result has its input's dtype:
    /// a kernel for any dtype that changes it fails each array with [`TaskError::Dtype`] here
    /// (submit such tasks one by one).
    ///
    /// # Errors
    /// The task's [`SubmitError`] (unknown kernel, dtype, op parameters) before any work
    /// starts; errors of single arrays come as `Err` items.
    pub fn map<'h, I>(
        &'h mut self,
        task: &Task,
        inputs: I,
    ) -> Result<Map<'h, 'pool, I::IntoIter>, SubmitError>
    where
        I: IntoIterator,
        I::Item: AsArray,
    {
        self.start_map(task, inputs.into_iter(), true)
    }

    /// As [`Producer::map`], yielding `(index, result)` in about the order they complete
    /// (`index` counts the inputs from 0): a slot's arrays come together, and those of a slot
    /// that succeeded whole can come before those of one with failures that came back first.
    ///
    /// # Errors
    /// As [`Producer::map`].
    pub fn map_unordered<'h, I>(
        &'h mut self,
        task: &Task,
        inputs: I,
    ) -> Result<MapUnordered<'h, 'pool, I::IntoIter>, SubmitError>
    where
        I: IntoIterator,
        I::Item: AsArray,
    {
        self.start_map(task, inputs.into_iter(), false)
            .map(MapUnordered)
    }

    fn start_map<'h, I>(
        &'h mut self,
        task: &Task,
        inputs: I,
        ordered: bool,
    ) -> Result<Map<'h, 'pool, I>, SubmitError>
    where
        I: Iterator,
        I::Item: AsArray,
    {
        if task.out_shape.is_some() {
            return Err(SubmitError::OutShape(
                "map keeps each array's shape; submit tasks with another output shape one by one"
                    .into(),
            ));
        }
        let c = self.core();
        let dtype = <<I::Item as AsArray>::Elem as Element>::DTYPE;
        let (kernel, params) = task.resolve(&c.sh.registry, dtype).map(|(k, p)| (k, *p))?;
        let any = c.sh.registry.takes_any(kernel);
        let context = task.context.clone();
        let retries = task.retries_or(c.sh.max_retries);
        // The context goes at the end of every slot the map sends: it must fit the largest.
        let (context_len, slot) = (task.context_bytes().len() as u64, c.max_slot_bytes());
        if context_len > 0 && TaskDesc::context_offset_for(context_len, slot).is_none() {
            return Err(SubmitError::OutShape(format!(
                "{context_len} bytes of context do not fit a slot of {slot} bytes, the largest \
                 (see PoolBuilder::max_array_bytes)"
            )));
        }
        let window = (c.slots.len() * PACK_MAX) as u64;
        // (`Duration::MAX` saturates to `u64::MAX` ticks: no cap.)
        let pack_ticks = crate::clock::ticks_in(c.sh.pack_time).max(1);
        // Slots are of the smallest class that holds a pack, unless an array needs more.
        let classes = c.sh.seg.layout().classes();
        let largest = classes.len() - 1;
        let max_usable = usable(context_len, classes[largest].slot_bytes);
        let pack = c.sh.pack_bytes.min(max_usable);
        // (A class whose slots hold half a pack after the context will do: the pack slots for
        // a context of up to half their size.)
        let first_class = if c.sh.pack_bytes == 0 {
            largest
        } else {
            class_holding(classes, context_len, pack.div_ceil(2).max(1))
        };
        // One map at a time holds the handle: any map's slot already back belongs to one that
        // was forgotten (`mem::forget`) and goes home now; those still out, when they return.
        let mut c = c;
        c.maps = c.maps.wrapping_add(1).max(1);
        let id = c.maps;
        release_stale(c.deref_mut(), id);
        if let Some(t) = c.map_drain.take() {
            c.release(t, false);
        }
        drop(c);
        Ok(Map {
            producer: self,
            inputs,
            pending: None,
            kernel,
            params,
            any,
            context,
            retries,
            ordered,
            window,
            next_in: 0,
            next_out: 0,
            parked: VecDeque::new(),
            finished: VecDeque::new(),
            exhausted: false,
            out: 0,
            unrung: 0,
            drain: None,
            id,
            first_class,
            need: 0,
            max_usable,
            per_array: 0,
            pack_ticks,
            viewed: None,
        })
    }
}

impl<I: Iterator> Map<'_, '_, I>
where
    I::Item: AsArray,
{
    fn done(&mut self, seq: u64, r: Outcome1<I>) {
        if self.ordered {
            let at = (seq - self.next_out) as usize;
            // (Results mostly come in input order: then this one goes at the end.)
            if at == self.parked.len() {
                self.parked.push_back(Some(r));
                return;
            }
            if self.parked.len() <= at {
                self.parked.resize_with(at + 1, || None);
            }
            self.parked[at] = Some(r);
        } else {
            self.finished.push_back((seq, r));
        }
    }

    /// Fills one free slot with as many next inputs as fit and sends it. Whether it did.
    fn issue(&mut self, c: &mut Core<'_>) -> bool {
        let needed = self.need;
        if self.issue_once(c) {
            return true;
        }
        // The next input did not fit the slot taken (a pack slot, say) and went back: once
        // more, in a slot that holds it, if one is free (else it waits for one, as any input).
        needed == 0 && self.need > 0 && self.issue_once(c)
    }

    /// [`Map::issue`], with the slot class `need` asks for: when the first input does not fit
    /// the slot taken, it stays pending, `need` says the bytes it needs, and nothing is sent.
    fn issue_once(&mut self, c: &mut Core<'_>) -> bool {
        type E<I> = <<I as Iterator>::Item as AsArray>::Elem;
        let dtype = <E<I> as Element>::DTYPE;
        let context_arc = self.context.clone();
        let context = context_arc.as_deref().unwrap_or(&[]);
        if let Some(why) = c.broken() {
            // Nothing can run any more: the next inputs fail without taking a slot (a worker of
            // a terminated pool may still be writing one).
            while self.next_in - self.next_out < self.window {
                let Some(item) = self.pending.take().or_else(|| self.inputs.next()) else {
                    self.exhausted = true;
                    break;
                };
                drop(item);
                let seq = self.next_in;
                self.next_in += 1;
                self.done(seq, Err(TaskError::NoWorkers(why.clone())));
            }
            return false;
        }
        // The smallest slot that holds a pack (or the pending array), or a larger one.
        let class = match self.need {
            0 => self.first_class,
            need => class_holding(c.sh.seg.layout().classes(), context.len() as u64, need),
        };
        let Some(mut token) = c.slots.take_any(class) else {
            return false;
        };
        self.need = 0;
        // The context goes at the slot's end: arrays get what is before it.
        let context_at = TaskDesc::context_offset_for(context.len() as u64, c.capacity(&token));
        let slot_bytes = if context.is_empty() {
            c.capacity(&token)
        } else {
            context_at.unwrap_or(0)
        };
        // Arrays are packed several to a slot up to the pool's pack size: per-task costs (a ring
        // entry, a descriptor, a doorbell) then count once per slot instead of once per array.
        let limit = slot_bytes.min(c.sh.pack_bytes);
        let one_per_slot = c.sh.pack_bytes == 0;
        let cap = self.pack_cap();
        // The descriptor is built in place in the slot's record (no copy of a whole one).
        let sh = c.sh;
        let record = c.fresh_record(&token);
        record.dtype = dtype;
        record.out_shape = Shape::d1(0);
        record.map = self.id;
        record.any = self.any;
        record.max_retries = self.retries;
        let desc = &mut record.desc;
        desc.kernel = self.kernel;
        desc.dtype = u32::from(dtype.code());
        desc.out_dtype = desc.dtype;
        desc.params_len = self.params.write_to(&mut desc.params);
        desc.seq = self.next_in;
        let mut used = 0u64;
        let mut count = 0usize;
        // Arrays after a slot's first go in by non-temporal stores out of place (see
        // `PoolBuilder::streaming_stores`). Not the first: a slot of one array would pay the
        // fence alone on each task's path; nor in place, where they measured no faster.
        let stream = sh.stream_inputs;
        let mut data = SlotWriter::new(sh.seg.slot_bytes_mut(&mut token));
        // The caller's iterator, its arrays' `shape`/`elements` and their `Drop` may panic:
        // then the arrays already copied in are sent as usual (their results stay owed) and
        // the slot is not lost, before the panic goes on to the caller. An input taken whose
        // own methods panicked keeps its index, with an error as its result.
        let mut holding = false;
        let fill = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            while count < cap && self.next_in - self.next_out < self.window {
                let Some(item) = self.pending.take().or_else(|| self.inputs.next()) else {
                    self.exhausted = true;
                    break;
                };
                holding = true;
                // An array mk1 cannot carry fails alone; it never shares a slot with others.
                let shape = item.shape();
                let elements = item.elements();
                // (Its length matches the shape, checked below, so the bytes are its length's.)
                let bytes = (elements.len() * dtype.size()) as u64;
                let whole = matches!(shape, Ok(s) if elements.len() as u64 == s.elements());
                let shape = match shape {
                    Ok(s) if whole && bytes <= slot_bytes => s,
                    // Too large for this slot, not for a larger one: it goes in the next slot,
                    // one that holds it.
                    Ok(_) if whole && bytes <= self.max_usable => {
                        drop(elements);
                        self.pending = Some(item);
                        self.need = bytes;
                        holding = false;
                        break;
                    }
                    _ if count > 0 => {
                        drop(elements);
                        self.pending = Some(item);
                        holding = false;
                        break;
                    }
                    shape => {
                        let e = refused(shape, elements.len(), bytes, self.max_usable);
                        drop(elements);
                        let seq = self.next_in;
                        self.next_in += 1;
                        desc.seq = self.next_in;
                        holding = false;
                        self.done(seq, Err(e));
                        continue;
                    }
                };
                if count > 0 && (one_per_slot || used + bytes > limit || used + bytes > slot_bytes)
                {
                    drop(elements);
                    self.pending = Some(item);
                    holding = false;
                    break;
                }
                data.write(used as usize, as_bytes(&elements), stream && count > 0);
                drop(elements);
                let (ndim, dims) = shape.raw();
                desc.items[count] = ItemDesc {
                    offset: used as u32,
                    ndim,
                    shape: dims,
                };
                count += 1;
                used += packed_offset(bytes);
                self.next_in += 1;
                // (Its `Drop` runs at the end of this pass: a panic there is after its turn.)
                holding = false;
                drop(item);
                if one_per_slot || used >= limit {
                    break;
                }
            }
        }));
        // (The fence for the arrays' stores, before anything reads the slot: `SlotWriter`.)
        drop(data);
        if count == 0 {
            c.release(token, false);
        } else {
            let desc = &mut c.records[token.slot() as usize].desc;
            desc.count = count as u32;
            let context = c.place_context(context, &mut token);
            let desc = &mut c.records[token.slot() as usize].desc;
            (desc.context_offset, desc.context_len) = context;
            c.send_recorded(token);
            self.out += 1;
            c.map_out += 1;
        }
        if let Err(panic) = fill {
            if holding {
                let seq = self.next_in;
                self.next_in += 1;
                self.done(
                    seq,
                    Err(TaskError::Shape(format!(
                        "input {seq}: its shape or elements panicked (the panic went on to \
                         the caller)"
                    ))),
                );
            }
            c.ring_bells();
            std::panic::resume_unwind(panic);
        }
        count > 0
    }

    /// Arrays the next slot may take: as many as run in about the pool's pack time at the
    /// pace measured so far, 1 to [`PACK_MAX`]; 1 until a slot is back (a kernel slow per array
    /// is not packed before its pace is known); [`PACK_MAX`] without a pack time.
    fn pack_cap(&self) -> usize {
        match (self.pack_ticks, self.per_array) {
            (u64::MAX, _) => PACK_MAX,
            (_, 0) => 1,
            (limit, t) => (limit / t).clamp(1, PACK_MAX as u64) as usize,
        }
    }

    /// Learns the pace per array from a slot of `count` arrays back after `service` ticks
    /// (0: unknown). A `shared` time (another handle's tasks ran on that worker meanwhile) is
    /// an upper bound: it can only lower the pace (or set a first one), so that other work does
    /// not make this map's look slow for good, while a kernel that is slow stays known as slow.
    fn learn(&mut self, service: u64, count: usize, shared: bool) {
        if service == 0 || count == 0 {
            return;
        }
        let each = (service / count as u64).max(1);
        self.per_array = match self.per_array {
            0 => each,
            t if shared => t.min(each),
            t => (3 * t + each) / 4,
        };
    }

    /// Copies out the results of every finished slot of this map and frees the slots, until
    /// one holds the next results (it is drained instead, and the rest wait for the next
    /// call). That one is taken first when it is back: out of turn, a slot's results are
    /// parked (a heap copy each, all at once, then moved twice), and with 2 workers, when any
    /// parking made every later slot park too, packed maps ran 1.4x slower (see the README).
    fn harvest(&mut self, c: &mut Core<'_>) {
        release_stale(c, self.id);
        while self.drain.is_none() {
            let mut pick = None;
            for (i, r) in c.ready.iter().enumerate() {
                let rec = &c.records[r.token.slot() as usize];
                if rec.map != self.id {
                    continue;
                }
                pick = pick.or(Some(i));
                if self.ordered && rec.desc.seq == self.next_out {
                    pick = Some(i);
                    break;
                }
            }
            let Some(i) = pick else {
                return;
            };
            let r = c.ready.remove(i).expect("in range");
            self.out -= 1;
            c.map_out -= 1;
            // (Failed arrays took the worker's time as well; a slot that came back unanswered,
            // after a death, did not run as sent.)
            if r.outcome.answered() {
                let count = c.records[r.token.slot() as usize].desc.count as usize;
                self.learn(r.service, count, r.shared);
            }
            // The slot holding the next result, all of it as asked (the common case): its
            // results are copied out one at a time as the caller takes them, not parked.
            // (Ordered, results parked behind it wait: their places come after its own, which
            // are empty, and the drain takes those as it goes. Unordered, any slot will do.)
            let seq = c.records[r.token.slot() as usize].desc.seq;
            let next = !self.ordered || seq == self.next_out;
            if next && matches!(r.outcome, Outcome::Ok) && !r.quarantine {
                let count = c.records[r.token.slot() as usize].desc.count as usize;
                debug_assert!(c.map_drain.is_none(), "one drain at a time");
                c.map_drain = Some(r.token);
                self.drain = Some(Drain {
                    next: 0,
                    count,
                    seq,
                });
                return;
            }
            {
                let rec = &c.records[r.token.slot() as usize];
                // Only for an answered task: a quarantined slot may still be written.
                type E<I> = <<I as Iterator>::Item as AsArray>::Elem;
                let results = r
                    .outcome
                    .answered()
                    .then(|| c.sh.seg.result_bytes(&r.token));
                let copy_out = |results: &[u8], k: usize, shape: Shape| {
                    copy_result::<E<I>>(results, &rec.desc.items[k], shape)
                };
                let items = &rec.desc.items[..rec.desc.count as usize];
                // Every array succeeded as asked (the common case): nothing to look up per array.
                let all_ok = matches!(r.outcome, Outcome::Ok);
                for (k, item) in items.iter().enumerate() {
                    let seq = rec.desc.seq + k as u64;
                    let shape = Shape::from_raw(item.ndim, item.shape).expect("ours");
                    let result = match (all_ok, results) {
                        (true, Some(results)) => Ok(copy_out(results, k, shape)),
                        _ => match (r.outcome.item_error(k), results) {
                            (Some(e), _) => Err(e),
                            (None, Some(results)) => {
                                match r.outcome.produced(k).unwrap_or((rec.dtype, shape)) {
                                    (dtype, shape) if dtype == <E<I> as Element>::DTYPE => {
                                        Ok(copy_out(results, k, shape))
                                    }
                                    (actual, _) => Err(TaskError::Dtype {
                                        asked: <E<I> as Element>::DTYPE,
                                        actual,
                                    }),
                                }
                            }
                            (None, None) => unreachable!("a task without an answer failed"),
                        },
                    };
                    self.done(seq, result);
                }
            }
            c.release(r.token, r.quarantine);
        }
    }
}

impl<I: Iterator> Drop for Map<'_, '_, I>
where
    I::Item: AsArray,
{
    /// A map dropped before its end (a `break`, a `?`, `find`) takes back its arrays that no
    /// worker has yet, waits for the others and throws their results away, so its slots go
    /// home and the next map starts clean.
    fn drop(&mut self) {
        let producer = self.producer;
        let mut c = producer.core();
        self.drain = None;
        if let Some(t) = c.map_drain.take() {
            c.release(t, false);
        }
        // Its arrays that no worker has yet are not run at all.
        self.out -= c.cancel_waiting_of_map(self.id);
        loop {
            release_stale(c.deref_mut(), self.id);
            let mut i = 0;
            while i < c.ready.len() {
                if c.records[c.ready[i].token.slot() as usize].map == self.id {
                    let r = c.ready.remove(i).expect("in range");
                    c.release(r.token, r.quarantine);
                    self.out -= 1;
                    c.map_out -= 1;
                } else {
                    i += 1;
                }
            }
            if self.out == 0 {
                return;
            }
            c.wait_until(Until::Forever, any_mapped);
        }
    }
}

/// The iterator [`Producer::map_unordered`] returns: `(index, result)` in completion order.
pub struct MapUnordered<'h, 'pool, I: Iterator>(Map<'h, 'pool, I>)
where
    I::Item: AsArray;

impl<I: Iterator> Iterator for MapUnordered<'_, '_, I>
where
    I::Item: AsArray,
{
    type Item = (usize, Outcome1<I>);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next_indexed().map(|(i, r)| (i as usize, r))
    }
}

impl<I: Iterator> MapUnordered<'_, '_, I>
where
    I::Item: AsArray,
{
    /// The next `(index, result)`, read in place in shared memory: a lending alternative to
    /// [`Iterator::next`], as [`Map::next_view`].
    pub fn next_view(&mut self) -> Option<(usize, ViewOutcome<'_, I>)> {
        self.0.next_view_indexed().map(|(i, r)| (i as usize, r))
    }
}

impl<I: Iterator> Iterator for Map<'_, '_, I>
where
    I::Item: AsArray,
{
    type Item = Outcome1<I>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_indexed().map(|(_, r)| r)
    }
}

impl<I: Iterator> Map<'_, '_, I>
where
    I::Item: AsArray,
{
    /// The next result, read in place in shared memory: a lending alternative to
    /// [`Iterator::next`] that yields the same results in the same order. The results of the
    /// slot that holds the next ones, when every array in it succeeded (the common case; with
    /// one worker, nearly all), are not copied out at all; those of a slot that came back out
    /// of turn or with failures were copied out when it came back, and are lent from there.
    ///
    /// The view borrows the map, so it is gone before the next call: a caller cannot hold
    /// results this way, and the slot a view reads goes home when the map moves past its last
    /// array. Use [`OutputView::to_array`] to keep one.
    ///
    /// ```no_run
    /// # fn demo(producer: &mut mk1::Producer<'_>, inputs: Vec<Vec<f32>>) {
    /// let task = mk1::Task::op("affine:3,1").unwrap();
    /// let mut map = producer.map(&task, &inputs).unwrap();
    /// let mut sum = 0.0f32;
    /// while let Some(result) = map.next_view() {
    ///     sum += result.unwrap().as_slice().iter().sum::<f32>();
    /// }
    /// # let _ = sum; }
    /// ```
    ///
    /// A view cannot be kept past the next call:
    ///
    /// ```compile_fail,E0499
    /// # fn demo(producer: &mut mk1::Producer<'_>, inputs: Vec<Vec<f32>>) {
    /// let task = mk1::Task::op("neg").unwrap();
    /// let mut map = producer.map(&task, &inputs).unwrap();
    /// let first = map.next_view().unwrap().unwrap();
    /// let second = map.next_view(); // `first` still borrows the map
    /// drop(first);
    /// # }
    /// ```
    pub fn next_view(&mut self) -> Option<ViewOutcome<'_, I>> {
        self.next_view_indexed().map(|(_, r)| r)
    }

    /// The next result with its input's index.
    fn next_indexed(&mut self) -> Option<(u64, Outcome1<I>)> {
        let producer = self.producer;
        let mut c = producer.core();
        self.viewed = None;
        let (seq, next) = self.advance(&mut c)?;
        Some(match next {
            Next::Owned(r) => (seq, r),
            Next::Drained(k) => {
                type E<I> = <<I as Iterator>::Item as AsArray>::Elem;
                let (shape, bytes) = drained_item::<E<I>>(&c, k);
                let token = c.map_drain.as_ref().expect("a drain holds its slot");
                let out = copy_out::<E<I>>(&c.sh.seg.result_bytes(token)[bytes], shape);
                // Copied: nothing reads the slot any more, so after its last array it goes
                // home now (a map forgotten after this call does not keep it).
                self.end_drain(&mut c);
                (seq, Ok(out))
            }
        })
    }

    /// Sends the drained slot home once its last array has been handed out.
    fn end_drain(&mut self, c: &mut Core<'_>) {
        if self.drain.as_ref().is_some_and(|d| d.next == d.count) {
            self.drain = None;
            let token = c.map_drain.take().expect("a drain holds its slot");
            c.release(token, false);
        }
    }

    /// [`Map::next_view`] with its input's index.
    fn next_view_indexed(&mut self) -> Option<(u64, ViewOutcome<'_, I>)> {
        type E<I> = <<I as Iterator>::Item as AsArray>::Elem;
        let producer = self.producer;
        let mut c = producer.core();
        self.viewed = None;
        let (seq, next) = self.advance(&mut c)?;
        let k = match next {
            Next::Owned(Err(e)) => return Some((seq, Err(e))),
            Next::Owned(Ok(a)) => {
                let a = self.viewed.insert(a);
                return Some((seq, Ok(OutputView::new(a.as_slice(), a.shape()))));
            }
            Next::Drained(k) => k,
        };
        let (shape, bytes) = drained_item::<E<I>>(&c, k);
        let token = c.map_drain.as_ref().expect("a drain holds its slot");
        let (results, len) = c.sh.seg.result_raw(token);
        assert!(bytes.end <= len, "an array of this map's own descriptor");
        // SAFETY: the bytes are inside the slot's results (checked above against the span
        // `result_raw` gives; the offset and shape come from this handle's own records, which no
        // worker can write), which lie in the segment, mapped for the pool's life ('pool, longer
        // than this map); `cast` checks the alignment. The slot's token stays in
        // `Core::map_drain` until this map's next call, or its drop: both take the map mutably,
        // which the view's borrow rules out; no other map can start meanwhile (this one holds
        // the handle mutably for its life). Its task came back answered and not quarantined, so
        // no worker following the protocol writes the slot while it is held, and nothing in
        // this process does (as for `Segment::result_bytes`).
        let data =
            unsafe { std::slice::from_raw_parts(results.as_ptr().add(bytes.start), bytes.len()) };
        drop(c);
        Some((seq, Ok(OutputView::new(cast::<E<I>>(data), shape))))
    }

    /// Finds the next result: an array of the slot being drained, to be read in place, or one
    /// already out of shared memory; with its input's index.
    fn advance(&mut self, c: &mut Core<'_>) -> Option<(u64, Next<Outcome1<I>>)> {
        loop {
            // A view of the drained slot's last array lived until this call: the slot goes home.
            self.end_drain(c);
            if let Some(d) = &mut self.drain {
                // (Nothing is parked or finished meanwhile: `harvest` waits for the drain.
                // Ordered, results parked before it began are of later inputs: the front
                // places, this array's, are empty and go with it; unordered, those finished
                // before it began come after it.)
                let k = d.next;
                d.next += 1;
                self.next_out += 1;
                if self.ordered {
                    let place = self.parked.pop_front();
                    debug_assert!(matches!(place, None | Some(None)), "drained in turn");
                }
                return Some((d.seq + k as u64, Next::Drained(k)));
            }
            if self.ordered {
                if let Some(Some(_)) = self.parked.front() {
                    let seq = self.next_out;
                    self.next_out += 1;
                    return self
                        .parked
                        .pop_front()
                        .flatten()
                        .map(|r| (seq, Next::Owned(r)));
                }
            } else if let Some((seq, r)) = self.finished.pop_front() {
                self.next_out += 1;
                return Some((seq, Next::Owned(r)));
            }
            if self.exhausted && self.pending.is_none() && self.out == 0 {
                return None;
            }
            let mut sent = 0;
            while !(self.exhausted && self.pending.is_none()) && self.issue(c) {
                sent += 1;
            }
            if sent > 0 {
                self.unrung += sent;
                // The workers' bells are rung for a quarter of the map's slots out at a time,
                // not for each: a worker that sleeps costs the caller a wake-up (a system call,
                // an interrupt to its CPU, 2-5 µs here) per ring, as long as packing a whole
                // slot of small arrays. The slots sent since the last ring may wait on a
                // sleeping worker (the least loaded one gets them, often one that just went to
                // sleep) while the other three quarters run; every wait rings first (its first
                // `Core::pump`), so the map never waits on a slot it did not announce, and if
                // the caller stops calling, the monitor rings a worker that owes work within
                // two of its ticks (20-40 ms). Measured: no case slower (see the README).
                if self.unrung >= (self.out / 4).max(1) {
                    c.ring_bells();
                    self.unrung = 0;
                }
            }
            self.harvest(c);
            if self.drain.is_some()
                || matches!(self.parked.front(), Some(Some(_)))
                || !self.finished.is_empty()
            {
                continue;
            }
            // (A forgotten map's slots still out come back, to be sent home: wait for them.)
            if self.out == 0 && c.map_out == 0 {
                if self.exhausted && self.pending.is_none() {
                    continue;
                }
                // Nothing of ours in flight and no slot that holds the next input to be had (a
                // largest one, for an array too large for the pack slots, or when the pool has
                // none): the caller's own loans, completions and tasks hold them (the map
                // receives none of those, and they cannot be freed while the map holds the
                // handle), so waiting could never end. The next input fails, saying so, and
                // so does each after it: every input has its result.
                c.pump(); // (tasks done by now count as completions)
                let Some(item) = self.pending.take().or_else(|| self.inputs.next()) else {
                    self.exhausted = true;
                    continue;
                };
                drop(item);
                self.need = 0;
                let held = c.held + c.ready.len();
                let (loaned, in_flight) = (c.loaned, c.in_flight);
                let seq = self.next_in;
                self.next_in += 1;
                self.next_out += 1;
                return Some((
                    seq,
                    Next::Owned(Err(TaskError::NoSlot(format!(
                        "input {seq} was not run: the caller holds every slot of this handle \
                         that could take it ({held} completions not yet received or dropped, \
                         {loaned} loans, {in_flight} of its own tasks in flight): receive and \
                         drop them before a map"
                    )))),
                ));
            }
            self.unrung = 0; // (rung by the wait's first pump)
            c.wait_until(Until::Forever, any_mapped);
        }
    }
}

/// What [`Map`] finds next: array `k` of the slot being drained (its token in
/// `Core::map_drain`), or a result out of shared memory already.
enum Next<R> {
    Drained(usize),
    Owned(R),
}

/// One result of [`Map::next_view`]: a view of the output, or that array's error.
pub type ViewOutcome<'m, I> =
    Result<OutputView<'m, <<I as Iterator>::Item as AsArray>::Elem>, TaskError>;

/// Bytes of arrays a slot of `slot_bytes` holds with `context_len` bytes of context after
/// them (0 when the context does not fit).
fn usable(context_len: u64, slot_bytes: u64) -> u64 {
    if context_len == 0 {
        slot_bytes
    } else {
        TaskDesc::context_offset_for(context_len, slot_bytes).unwrap_or(0)
    }
}

/// The smallest of `classes` whose slots hold `bytes` of arrays besides `context_len` bytes
/// of context, or the largest.
fn class_holding(classes: &[crate::layout::SlotClass], context_len: u64, bytes: u64) -> usize {
    classes
        .iter()
        .position(|k| usable(context_len, k.slot_bytes) >= bytes)
        .unwrap_or(classes.len() - 1)
}

/// The output of the array `item` describes, of `T` and `shape`, copied out of its slot's
/// `results` into an array of its own.
#[inline]
fn copy_result<T: Element>(results: &[u8], item: &ItemDesc, shape: Shape) -> Array<T> {
    copy_out(&results[item_bytes::<T>(item, shape)], shape)
}

/// `bytes` (an output of `T` and `shape`) copied into an array of its own.
#[inline]
fn copy_out<T: Element>(bytes: &[u8], shape: Shape) -> Array<T> {
    Array::from_trusted(copied_vec(cast::<T>(bytes)), shape)
}

/// Where the output of the array `item` describes, of `T` and `shape`, lies in its slot's
/// results.
#[inline]
fn item_bytes<T: Element>(item: &ItemDesc, shape: Shape) -> std::ops::Range<usize> {
    let at = item.offset as usize;
    at..at + shape.bytes(T::DTYPE) as usize
}

/// Array `k` of the slot a map is draining (`Core::map_drain`), of `T`: its shape, and where
/// its bytes are in the slot's results.
fn drained_item<T: Element>(c: &Core<'_>, k: usize) -> (Shape, std::ops::Range<usize>) {
    let token = c.map_drain.as_ref().expect("a drain holds its slot");
    let item = &c.records[token.slot() as usize].desc.items[k];
    let shape = Shape::from_raw(item.ndim, item.shape).expect("ours");
    (shape, item_bytes::<T>(item, shape))
}

/// Whether a completion of some map (this one's, or a forgotten one's to release) is ready.
fn any_mapped(c: &mut Core<'_>) -> bool {
    c.ready
        .iter()
        .any(|r| c.records[r.token.slot() as usize].map != 0)
}

/// Sends home every ready slot of a map other than map `id` (one that was forgotten).
fn release_stale(c: &mut Core<'_>, id: u32) {
    let mut i = 0;
    while i < c.ready.len() {
        match c.records[c.ready[i].token.slot() as usize].map {
            m if m != 0 && m != id => {
                let r = c.ready.remove(i).expect("in range");
                c.release(r.token, r.quarantine);
                c.map_out -= 1;
            }
            _ => i += 1,
        }
    }
}
