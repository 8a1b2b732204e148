//! Several arrays of one dtype packed into one slot and submitted as one task: what `map` does
//! for small arrays, for callers that build their own loop (bindings, dtypes known only at run
//! time). Per-task costs (a ring entry, a descriptor, a doorbell, a worker wake-up) then count
//! once per slot instead of once per array.

use super::producer::{
    keep_spare, packed_offset, Handle, LoanError, SubmitError, Ticket, Until, PACK_MAX,
};
use super::{Producer, Task};
use crate::array::{cast_mut, Shape};
use crate::dtype::{DType, Element};
use crate::layout::{ItemDesc, MAX_ITEMS};
use crate::pool::Token;
use std::ptr::NonNull;

/// A loaned slot being filled with arrays of one dtype ([`Producer::loan_packed`]), each on its
/// own cache line; [`Producer::submit_packed`] sends them as one task and the completion has one
/// result per array ([`super::Completion::item_bytes`]). Dropping it unsubmitted gives the slot
/// back.
pub struct PackedLoan<'p> {
    producer: &'p dyn Handle,
    token: Option<Token>,
    dtype: DType,
    /// The arrays pushed so far (at most [`MAX_ITEMS`]).
    items: Vec<ItemDesc>,
    /// Bytes taken, each array rounded up to a line.
    used: u64,
    /// Bytes the arrays may take.
    limit: u64,
    /// The slot's data (at least `limit` bytes), found once when the batch is made.
    data: NonNull<u8>,
}

/// A refused packed submit: why, and the packed loan back, its arrays intact.
#[derive(thiserror::Error)]
#[error("{error}")]
pub struct RejectedPacked<'p> {
    /// Why.
    pub error: SubmitError,
    /// The packed loan, untouched.
    pub loan: PackedLoan<'p>,
}

impl std::fmt::Debug for RejectedPacked<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RejectedPacked({:?})", self.error)
    }
}

impl PackedLoan<'_> {
    /// Appends an array of the batch's dtype: `bytes` are its row-major elements for `shape`.
    /// `Ok(false)` when it does not fit beside the arrays already in (submit, then start a new
    /// batch) or the batch holds [`MAX_ITEMS`] arrays.
    ///
    /// # Errors
    /// [`LoanError::TooLarge`] when the array could never fit (larger than the batch's byte
    /// limit).
    ///
    /// # Panics
    /// If `bytes` is not `shape`'s size in the batch's dtype.
    pub fn push_bytes(&mut self, shape: Shape, bytes: &[u8]) -> Result<bool, LoanError> {
        let n = shape.bytes(self.dtype);
        assert_eq!(
            n,
            bytes.len() as u64,
            "{shape} of {} is {n} bytes",
            self.dtype
        );
        Ok(match self.append(shape)? {
            Some(room) => {
                crate::array::copy_elements(room, bytes);
                true
            }
            None => false,
        })
    }

    /// Appends an array of `T` (the batch's dtype) with `shape` and returns its elements in
    /// the slot, row-major, to be written in place (they hold whatever the slot last held).
    /// `Ok(None)` when it does not fit beside the arrays already in, as for
    /// [`PackedLoan::push_bytes`].
    ///
    /// # Errors
    /// As [`PackedLoan::push_bytes`].
    ///
    /// # Panics
    /// If `T` is not the batch's dtype.
    pub fn push_array<T: Element>(&mut self, shape: Shape) -> Result<Option<&mut [T]>, LoanError> {
        assert_eq!(T::DTYPE, self.dtype, "the batch is {}", self.dtype);
        Ok(self.append(shape)?.map(cast_mut::<T>))
    }

    /// Reserves room for one more array: its bytes in the slot, or `None` when it does not fit.
    fn append(&mut self, shape: Shape) -> Result<Option<&mut [u8]>, LoanError> {
        let n = shape.bytes(self.dtype);
        if n > self.limit {
            return Err(LoanError::TooLarge {
                asked: n,
                max: self.limit,
            });
        }
        if self.items.len() == PACK_MAX || self.used + n > self.limit {
            return Ok(None);
        }
        let at = self.used as usize;
        let (ndim, dims) = shape.raw();
        self.items.push(ItemDesc {
            offset: at as u32,
            ndim,
            shape: dims,
        });
        self.used += packed_offset(n);
        // SAFETY: `data` is the slot's memory (at least `limit` bytes, inside the mapped
        // segment) and this batch holds the slot's token, so nothing else reaches it (DESIGN
        // invariant 1); `at + n <= used <= limit` (checked above). The borrow of `self` keeps the
        // slice from outliving the batch. Offsets are multiples of a cache line, so the bytes
        // are aligned for any dtype.
        Ok(Some(unsafe {
            std::slice::from_raw_parts_mut(self.data.as_ptr().add(at), n as usize)
        }))
    }

    /// Arrays in the batch.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// No array yet.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The batch's dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

impl Drop for PackedLoan<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.token.take() {
            self.producer.give_back(t, false, false);
        }
        if self.items.capacity() > 0 {
            self.producer
                .recycle(Some(std::mem::take(&mut self.items)), None);
        }
    }
}

impl Producer<'_> {
    /// Loans a slot to pack arrays of `dtype` into, waiting while every slot of this handle is
    /// busy (backpressure, as [`Producer::loan`]). The arrays may take up to `limit` bytes
    /// together (at most a slot; `None`: a whole slot).
    ///
    /// # Errors
    /// As [`Producer::loan`].
    pub fn loan_packed(
        &self,
        dtype: DType,
        limit: Option<u64>,
    ) -> Result<PackedLoan<'_>, LoanError> {
        self.packed_until(dtype, limit, Until::Forever)
    }

    /// As [`Producer::loan_packed`], without waiting ([`LoanError::Busy`] says what holds the
    /// slots).
    ///
    /// # Errors
    /// As [`Producer::try_loan`].
    pub fn try_loan_packed(
        &self,
        dtype: DType,
        limit: Option<u64>,
    ) -> Result<PackedLoan<'_>, LoanError> {
        self.packed_until(dtype, limit, Until::Now)
    }

    fn packed_until(
        &self,
        dtype: DType,
        limit: Option<u64>,
        until: Until,
    ) -> Result<PackedLoan<'_>, LoanError> {
        let mut c = self.core();
        // A batch takes a slot of the largest size.
        let slot = c.max_slot_bytes();
        let mut token = c.take_slot(slot, until)?;
        c.loaned += 1;
        let data = NonNull::from(&mut *c.sh.seg.slot_bytes_mut(&mut token)).cast();
        let items = c
            .spare_items
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(MAX_ITEMS));
        Ok(PackedLoan {
            producer: self,
            token: Some(token),
            dtype,
            items,
            used: 0,
            limit: limit.map_or(slot, |l| l.min(slot)),
            data,
        })
    }

    /// Submits every array of `batch` with `task`, as one task; returns its ticket. Its
    /// [`super::Completion`] has one result per array, in the order they were pushed.
    ///
    /// # Errors
    /// [`RejectedPacked`] (boxed: it carries the loan; the batch back, intact) as for [`Producer::submit`], and for an empty
    /// batch, a batch of another handle, a task with an output shape of its own, or a context
    /// that does not fit after the arrays.
    pub fn submit_packed<'a>(
        &'a self,
        batch: PackedLoan<'a>,
        task: &Task,
    ) -> Result<Ticket, Box<RejectedPacked<'a>>> {
        let reject = |error, loan| Err(Box::new(RejectedPacked { error, loan }));
        if !std::ptr::addr_eq(batch.producer as *const dyn Handle, self as *const Self) {
            return reject(SubmitError::OtherHandle, batch);
        }
        if batch.items.is_empty() || task.out_shape.is_some() {
            let why = if batch.items.is_empty() {
                "an empty batch"
            } else {
                "a batch keeps each array's shape; submit tasks with another output shape one by one"
            };
            return reject(SubmitError::OutShape(why.into()), batch);
        }
        let mut c = self.core();
        let slot = c.capacity(batch.token.as_ref().expect("a live batch holds its token"));
        let (kernel, params) = match c.admit(task, batch.dtype, batch.used, slot) {
            Ok(k) => k,
            Err(e) => {
                drop(c);
                return reject(e, batch);
            }
        };
        let mut batch = batch;
        let mut token = batch.token.take().expect("a live batch holds its token");
        c.loaned -= 1;
        let ticket = c.next_ticket();
        let context = c.place_context(task.context_bytes(), &mut token);
        let any = c.sh.registry.takes_any(kernel);
        let first = batch.items[0];
        let out_shape = Shape::from_raw(first.ndim, first.shape).expect("pushed");
        let r = c.fresh_record(&token);
        r.max_retries = task.retries_or(r.max_retries);
        r.dtype = batch.dtype;
        r.out_shape = out_shape;
        r.any = any;
        let desc = &mut r.desc;
        desc.seq = ticket;
        desc.kernel = kernel;
        desc.dtype = u32::from(batch.dtype.code());
        desc.out_dtype = desc.dtype;
        desc.count = batch.items.len() as u32;
        desc.params_len = params.write_to(&mut desc.params);
        desc.items[..batch.items.len()].copy_from_slice(&batch.items);
        (desc.context_offset, desc.context_len) = context;
        c.send_recorded(token);
        c.ring_bells();
        keep_spare(&mut c.spare_items, std::mem::take(&mut batch.items));
        Ok(Ticket(ticket))
    }
}
