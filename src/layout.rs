//! Where everything sits in the segment. Pure arithmetic: no memory is touched here.
//!
//! ```text
//! [ Header (its own page) | WorkerShared × W | ProducerShared × P | rings: (to, from) × P × W
//!   | TaskDesc × S | slot data, class by class ]
//! ```
//!
//! Every offset is computed by [`Layout::new`] with checked arithmetic and stored in the
//! header's [`Params`], so an attaching process finds everything from the header alone and can
//! re-check it with [`Layout::from_params`]. The `const` asserts below make any change to the
//! ABI structs fail to compile until [`LAYOUT_VERSION`] and the asserts are updated together.

use crate::sync::{AtomicU32, AtomicU64};

/// `b"mk1-seg\0"` as a little-endian u64: the first eight bytes of every segment.
pub const MAGIC: u64 = u64::from_le_bytes(*b"mk1-seg\0");
/// Bumped on every change to a `repr(C)` struct in this module.
pub const LAYOUT_VERSION: u32 = 12;
/// Separation between data written by different processes (two 64-byte lines: the adjacent-line
/// prefetcher on x86_64 pulls pairs, see crossbeam's `CachePadded`).
pub const LINE: u64 = 128;
/// Alignment of every matrix inside a slot, so SIMD loads never split a cache line.
pub const MATRIX_ALIGN: u64 = 64;

/// What a slot class of `bytes` is rounded up to a multiple of: a page from a page on,
/// [`MATRIX_ALIGN`] below.
pub fn slot_align(bytes: u64) -> u64 {
    if bytes >= PAGE {
        PAGE
    } else {
        MATRIX_ALIGN
    }
}

/// The bytes of a slot of a class asked for `bytes`: rounded up to [`slot_align`] (`None` past
/// `u64::MAX`).
pub fn slot_bytes(bytes: u64) -> Option<u64> {
    align_up(bytes, slot_align(bytes))
}
/// Alignment of slots of at least this size (and of the data region): a page.
pub const PAGE: u64 = 4096;
/// Most slot size classes.
pub const MAX_CLASSES: usize = 8;
/// Most worker processes.
pub const MAX_WORKERS: u32 = 1024;
/// Most producer threads.
pub const MAX_PRODUCERS: u32 = 64;
/// Bytes of one [`WorkerShared`].
const WORKER_BYTES: u64 = 2 * LINE;
/// Largest slot: 1 GiB (16384 × 16384 int32), so byte offsets inside a slot fit a u32.
pub const MAX_SLOT_BYTES: u64 = 1 << 30;

/// One size class of slots: `count` slots of `slot_bytes` each, numbered from `first_slot`,
/// whose data starts at `data_offset`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotClass {
    /// Bytes per slot; a multiple of [`MATRIX_ALIGN`] (of [`PAGE`] when at least a page).
    pub slot_bytes: u64,
    /// Offset of the first slot's data from the segment start.
    pub data_offset: u64,
    /// Global index of the first slot in this class.
    pub first_slot: u32,
    /// Number of slots in this class.
    pub count: u32,
}

/// Everything needed to find every object in the segment. Written once by the creator before
/// the header's version is published; read-only afterwards.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Worker processes, `1..=MAX_WORKERS`.
    pub workers: u32,
    /// Producer threads, `1..=MAX_PRODUCERS`.
    pub producers: u32,
    /// Total slots (= tokens), the sum of the class counts.
    pub slots: u32,
    /// Entries per ring: a power of two at least the tokens any one producer owns.
    pub ring_capacity: u32,
    /// Used entries of `classes`, `1..=MAX_CLASSES`, in increasing `slot_bytes`.
    pub class_count: u32,
    /// 1 if every slot has a separate output region (out-of-place tasks), else 0.
    pub outputs: u32,
    /// Slot classes.
    pub classes: [SlotClass; MAX_CLASSES],
    /// Offset of `WorkerShared[workers]`.
    pub workers_offset: u64,
    /// Offset of `ProducerShared[producers]`.
    pub producers_offset: u64,
    /// Offset of the first ring.
    pub rings_offset: u64,
    /// Bytes from one ring to the next.
    pub ring_stride: u64,
    /// Offset of `TaskDesc[slots]`.
    pub descriptors_offset: u64,
    /// Size of the whole segment.
    pub total_bytes: u64,
    /// With `outputs`: offset of the output region, a copy of the data region's layout (slot
    /// `s`'s output sits as far from it as its data sits from the first class's data). 0
    /// without.
    pub output_offset: u64,
}

/// The first bytes of the segment.
#[repr(C, align(128))]
pub struct Header {
    /// [`MAGIC`]; written by the creator before `version`.
    pub magic: u64,
    /// 0 while the creator initialises, then [`LAYOUT_VERSION`], stored with Release after
    /// everything else in the header; attachers load it with Acquire before reading `params`.
    pub version: AtomicU32,
    /// Pid of the creating coordinator; workers compare it with their parent pid.
    pub coordinator_pid: u32,
    /// 0 while running; the coordinator stores 1 (Release) to ask workers to drain and exit.
    /// Workers read it (Acquire) whenever their rings are empty.
    pub shutdown: AtomicU32,
    /// Zero.
    pub reserved: u32,
    /// Where everything is.
    pub params: Params,
}

/// A doorbell: a futex word and the flag saying someone sleeps on it, alone on a line. Only
/// the sleeper and its notifiers touch it, and notifiers only with one read-modify-write per
/// ring (see `wait`), so it does not bounce while work flows.
#[repr(C, align(128))]
pub struct Bell {
    /// Futex word the owner sleeps on. Notifiers add 1 (Release) before waking it.
    pub word: AtomicU32,
    /// 1 while the owner is about to sleep or asleep, 0 otherwise. The owner swaps in 1 (AcqRel)
    /// before its last check and stores 0 (Release) after; notifiers read it with an AcqRel
    /// read-modify-write after publishing work.
    pub sleeping: AtomicU32,
    /// 1 + the CPU the owner last began to wait on, 0 if unknown; written by the owner, read by
    /// its partners (Relaxed: a placement hint, never trusted for safety).
    pub cpu: AtomicU32,
}

/// What one worker publishes about itself. Index = worker slot.
#[repr(C)]
pub struct WorkerShared {
    /// The worker sleeps on this when all its request rings are empty.
    pub bell: Bell,
    /// Written by the worker, read by the coordinator; on its own line, away from the bell.
    pub status: WorkerStatus,
}

/// A worker's self-reported state.
#[repr(C, align(128))]
pub struct WorkerStatus {
    /// Pid of the process currently serving this slot (written by that worker at start).
    pub pid: AtomicU32,
    /// [`WorkerState`] as u32, written by the worker (Release), read by the coordinator
    /// (Acquire) to learn that a new worker has attached.
    pub state: AtomicU32,
    /// Tokens processed since the worker started (Relaxed). Informational only: the watchdog
    /// counts the producers' own returns, which a worker cannot fake.
    pub heartbeat: AtomicU64,
    /// The worker's build id (`worker::BUILD_ID`), written before `state` becomes `Running`
    /// (so the Release/Acquire pair on `state` publishes it); 0 until then. The coordinator
    /// refuses a worker whose build differs from its own.
    pub build: AtomicU64,
    /// In a library pool's worker: the token word of the task it is running, or [`NO_TASK`]
    /// (Relaxed; the seed's job does not write it). A hint for
    /// the coordinator after a death or a timeout (which task to blame); never trusted for
    /// safety: a wrong value only moves the blame between the tokens the worker held.
    pub current: AtomicU64,
    /// Which item of [`WorkerStatus::current`] runs (a user kernel's, stored before each
    /// one), or [`NO_ITEM`]; Relaxed, a hint like `current`: it decides which array of a
    /// batch is blamed for a death or a hang, so that the others are not failed with it.
    pub current_item: AtomicU32,
}

/// [`WorkerStatus::current`] when the worker runs no task.
pub const NO_TASK: u64 = u64::MAX;
/// [`WorkerStatus::current_item`] when no single item runs (built-in ops, between tasks).
pub const NO_ITEM: u32 = u32::MAX;

/// Lifecycle of a worker slot as the worker reports it.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Not started, or reset by the coordinator after a death.
    Empty = 0,
    /// Attached and serving.
    Running = 1,
    /// Saw shutdown and left.
    Exited = 2,
    /// Left quietly on a kernel's request, after answering its task
    /// ([`retire_after_this_task`](crate::worker::retire_after_this_task) with no reason): a
    /// planned replacement, not a death.
    Retired = 3,
}

/// What one producer thread publishes so workers know when to wake it.
#[repr(C)]
pub struct ProducerShared {
    /// The producer sleeps on this when it waits for returned tokens.
    pub bell: Bell,
}

/// Most dimensions of a task's array.
pub const MAX_DIMS: usize = 4;
/// Most arrays packed into one slot of a task.
pub const MAX_ITEMS: usize = 64;
/// Bytes of a task's parameters: 16 little-endian 8-byte words.
pub const PARAM_BYTES: usize = 128;
/// Bytes of a failed task's message kept in the descriptor.
pub const MESSAGE_BYTES: usize = 256;
/// Starts the message of a failed array of a batch other than its first failure, written by
/// the worker at the start of that array's output space (void anyway): this word, a word of
/// flags (bit 0: the kernel panicked), the message's length in bytes, then as much of its
/// UTF-8 as the space holds; words little-endian ("MK1E"). The reader clamps the length to
/// the space and says when the message was cut.
pub const ITEM_MESSAGE: u32 = 0x4531_4b4d;
/// Bytes of an [`ITEM_MESSAGE`] header.
pub const ITEM_MESSAGE_HEADER: usize = 12;
/// [`TaskDesc::kernel`] values from here on name built-in ops (`BUILTIN + op code`); below, an
/// index into the pool's kernel registry.
pub const BUILTIN: u32 = 0x8000_0000;

/// One array of a task: where it starts in the slot and its shape (row-major, contiguous).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ItemDesc {
    /// Byte offset of element 0 from the slot start (input and, out of place, output); a
    /// multiple of [`MATRIX_ALIGN`].
    pub offset: u32,
    /// Dimensions in use, `1..=MAX_DIMS`.
    pub ndim: u32,
    /// The dimensions; entries at `ndim..` are ignored. A dimension may be 0.
    pub shape: [u32; MAX_DIMS],
}

/// Descriptor of a slot's task: which arrays it holds and what to run on them (one per slot,
/// each [`DESC_STRIDE`] bytes).
///
/// The request fields are written by the producer while it owns the token and read by the
/// worker that popped it, which copies them out and validates the copy. The result fields
/// (`status` to `produced`, `message`, `outs`) are written by the worker before it pushes the
/// token back, and read by the producer after popping it; the producer validates them (a status
/// it does not know is a failure) and clamps the message, so a scribbling worker can only fail
/// its own tasks.
///
/// The order keeps a one-array task to two cache lines each way: the request head and the
/// first item fill the first line, and only the `params_len` bytes of `params` in use (one
/// more line for most ops) and, when set, the output shape travel. A task that succeeds with
/// every output as requested is answered by [`DONE_OK`] in the returned token word alone: the
/// worker writes nothing here and the producer reads nothing back.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
pub struct TaskDesc {
    /// The caller's number for the first item.
    pub seq: u64,
    /// Kernel: an index into the registry, or [`BUILTIN`] + op code.
    pub kernel: u32,
    /// Input dtype code (`dtype::DType`).
    pub dtype: u32,
    /// Output dtype code; equal to `dtype` in place.
    pub out_dtype: u32,
    /// Items in use, `1..=MAX_ITEMS`.
    pub count: u32,
    /// 0: each output has its input's shape. Otherwise (only with `count == 1`, out of place)
    /// the output's dimensions in use.
    pub out_ndim: u32,
    /// Bytes of `params` in use, a multiple of 8, at most [`PARAM_BYTES`].
    pub params_len: u32,
    /// Byte offset, in the slot's input, of the task's context bytes (after every item, at the
    /// last multiple of [`MATRIX_ALIGN`] that leaves room for them before the slot's end);
    /// ignored when `context_len` is 0.
    pub context_offset: u32,
    /// Bytes of context (handed to the kernel as is, read-only).
    pub context_len: u32,
    /// The arrays; entries at `count..` are ignored.
    pub items: [ItemDesc; MAX_ITEMS],
    /// Parameters for the kernel (the first `params_len` bytes travel).
    pub params: [u8; PARAM_BYTES],
    /// The output shape when `out_ndim != 0`.
    pub out_shape: [u32; MAX_DIMS],
    /// Bit `i` set: item `i` is not run (its outcome is already settled: it was blamed for a
    /// worker's death or hang and failed alone, and the rest of its batch is sent again).
    /// Batches only: it travels when `count > 1` (off the first line, which a one-array task
    /// keeps to itself), and reads as 0 otherwise.
    pub skip_mask: u64,
    /// Written by the worker: bit `i` set if item `i` failed.
    pub failed_mask: u64,
    /// Written by the worker: [`TASK_OK`] or [`TASK_FAILED`] (anything else is a failure).
    pub status: u32,
    /// Written by the worker: bytes of `message` in use.
    pub message_len: u32,
    /// Written by the worker: 1 if the first failure was a panic, 0 if the kernel returned an
    /// error.
    pub panicked: u32,
    /// Written by the worker: when non-zero, the first failure's whole message (longer than
    /// `message`) is this many bytes at the start of the failed item's output space (see
    /// [`TaskDesc::item_space`]); the reader clamps it to that space.
    pub detail_len: u32,
    /// Written by the worker: 1 when `outs` says what each item's output is (a kernel that
    /// decides its output's dtype and shape), 0 when each output is as the request says.
    pub produced: u32,
    /// Written by the worker: the first failure's message (UTF-8, clamped by the reader).
    pub message: [u8; MESSAGE_BYTES],
    /// Written by the worker when `produced == 1`: each item's output dtype and shape, at the
    /// item's offset in the output (validated by the reader against the item's space).
    pub outs: [OutDesc; MAX_ITEMS],
}

/// An output a worker produced: its dtype and shape (row-major, contiguous).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutDesc {
    /// Dtype code (`dtype::DType`).
    pub dtype: u32,
    /// Dimensions in use, `1..=MAX_DIMS`.
    pub ndim: u32,
    /// The dimensions; entries at `ndim..` are ignored.
    pub shape: [u32; MAX_DIMS],
}

impl TaskDesc {
    /// An all-zero descriptor.
    pub const fn zeroed() -> TaskDesc {
        const ITEM: ItemDesc = ItemDesc {
            offset: 0,
            ndim: 0,
            shape: [0; MAX_DIMS],
        };
        TaskDesc {
            seq: 0,
            kernel: 0,
            dtype: 0,
            out_dtype: 0,
            count: 0,
            out_ndim: 0,
            params_len: 0,
            context_offset: 0,
            context_len: 0,
            skip_mask: 0,
            items: [ITEM; MAX_ITEMS],
            params: [0; PARAM_BYTES],
            out_shape: [0; MAX_DIMS],
            failed_mask: 0,
            status: 0,
            message_len: 0,
            panicked: 0,
            detail_len: 0,
            produced: 0,
            message: [0; MESSAGE_BYTES],
            outs: [OutDesc {
                dtype: 0,
                ndim: 0,
                shape: [0; MAX_DIMS],
            }; MAX_ITEMS],
        }
    }

    /// Where `len` bytes of context go in a slot of `slot_bytes`: the last line boundary that
    /// leaves room for them (`None` if they do not fit at all).
    pub fn context_offset_for(len: u64, slot_bytes: u64) -> Option<u64> {
        let at = slot_bytes.checked_sub(len)?;
        Some(at / MATRIX_ALIGN * MATRIX_ALIGN)
    }

    /// Bytes item `i`'s output may take, from its offset: up to the next item's offset, and
    /// for the last item up to the end of `region` (the output region's size), or in place up
    /// to the context. Zero for an item out of order (untrusted descriptors are validated
    /// before this matters).
    pub fn item_space(&self, i: usize, region: u64, in_place: bool) -> u64 {
        let count = (self.count as usize).min(MAX_ITEMS);
        let end = if i + 1 < count {
            u64::from(self.items[i + 1].offset)
        } else if in_place && self.context_len > 0 {
            u64::from(self.context_offset)
        } else {
            region
        };
        end.min(region)
            .saturating_sub(u64::from(self.items[i.min(MAX_ITEMS - 1)].offset))
    }
}

/// Set by a worker in the token word it returns (in the slot half, above every slot index)
/// when the task succeeded with every output as requested: the producer then reads nothing of
/// the descriptor. Without it, the result fields say what happened.
pub const DONE_OK: u64 = 1 << 31;

/// [`TaskDesc::status`]: every item succeeded.
pub const TASK_OK: u32 = 0x6f6b;
/// [`TaskDesc::status`]: at least one item failed (see `failed_mask`).
pub const TASK_FAILED: u32 = 0xfa11;

/// Bytes of one entry of the descriptor array (a [`TaskDesc`]).
pub const DESC_STRIDE: u64 = core::mem::size_of::<TaskDesc>() as u64;

/// A value alone on its own [`LINE`]. Padding is implicit (no fields), so references to it are
/// sound even while other processes write the neighbouring lines.
#[repr(C, align(128))]
pub struct Padded<T>(pub T);

/// Entries a ring keeps in its tail line instead of after the control block.
pub const INLINE_ENTRIES: usize = 15;
/// Largest capacity (a power of two) whose entries live in the tail line: with the counter
/// at byte 0, entries 0..4 sit at bytes 8..40, inside the same 64-byte line.
pub const INLINE_CAPACITY: u32 = 4;

/// The producer's line of a ring: the tail counter, and room for the entries of a small ring.
/// When the capacity is at most [`INLINE_CAPACITY`] the entries live here, so a consumer that
/// sees a new tail finds the entry in the same cache line: one transfer per hand-off, not two.
#[repr(C, align(128))]
pub struct TailLine {
    /// Entries ever pushed. Written only by the producing side (Release), read by the consumer
    /// (Acquire). Monotonic; `tail - head <= capacity`.
    pub count: AtomicU64,
    /// Entries of a small ring (see [`INLINE_CAPACITY`]); unused otherwise.
    pub inline: [AtomicU64; INLINE_ENTRIES],
}

/// The consumer's line of a ring: the head counter, and the gate of a ring to a worker.
#[repr(C, align(128))]
pub struct HeadLine {
    /// Entries ever popped. Written only by the consuming side (Release), read by the producer
    /// (Acquire) when the ring looks full. Monotonic; `head <= tail`.
    pub count: AtomicU64,
    /// In a ring to a worker: which incarnation of that worker slot (the slot's deaths before
    /// it started) the producer handle has opened this ring and its way back to, as the value
    /// only that incarnation knows (`Control::gate`; 0: none). Written by the handle (Release)
    /// once it has cleaned up after the slot's last death and zeroed both rings; a worker
    /// attaches to the pair only once this equals its own (Acquire), so a replacement never
    /// reads a ring the handle has not yet cleaned up after, and the replacement need not
    /// wait for handles that are not calling in. Rarely written: it shares the consumer's
    /// line. Unused in rings from a worker.
    pub open_for: AtomicU64,
}

/// Head and tail of one ring, each on its own [`LINE`]. The entries of a ring larger than
/// [`INLINE_CAPACITY`] follow in the segment.
#[repr(C)]
pub struct RingCtl {
    /// The tail counter (and a small ring's entries).
    pub tail: TailLine,
    /// The head counter (and the gate of a ring to a worker).
    pub head: HeadLine,
}

impl RingCtl {
    /// A zeroed control block (for rings outside shared memory: tests, benches, models).
    pub fn new() -> RingCtl {
        RingCtl {
            tail: TailLine {
                count: AtomicU64::new(0),
                inline: core::array::from_fn(|_| AtomicU64::new(0)),
            },
            head: HeadLine {
                count: AtomicU64::new(0),
                open_for: AtomicU64::new(0),
            },
        }
    }
}

impl Default for RingCtl {
    fn default() -> Self {
        RingCtl::new()
    }
}

/// Bytes of one ring in the segment: the control block, then the entries if they do not fit
/// the tail line.
pub fn ring_bytes(capacity: u32) -> u64 {
    let outside = if capacity <= INLINE_CAPACITY {
        0
    } else {
        8 * u64::from(capacity)
    };
    2 * LINE + outside
}

// The ABI, checked at compile time. Loom swaps the atomics for larger types, so the checks (and
// the shared-memory code that relies on them) exist only in normal builds.
#[cfg(not(loom))]
const _: () = {
    use core::mem::{align_of, offset_of, size_of};
    assert!(size_of::<SlotClass>() == 24);
    assert!(size_of::<Params>() == 24 + 24 * MAX_CLASSES + 56);
    assert!(offset_of!(Header, version) == 8);
    assert!(offset_of!(Header, params) == 24);
    assert!(size_of::<Header>().is_multiple_of(LINE as usize));
    assert!(size_of::<Header>() <= PAGE as usize);
    assert!(size_of::<Bell>() == LINE as usize);
    assert!(size_of::<WorkerShared>() == 2 * LINE as usize);
    assert!(offset_of!(WorkerShared, status) == LINE as usize);
    assert!(offset_of!(WorkerStatus, build) == 16);
    assert!(offset_of!(WorkerStatus, current) == 24);
    assert!(size_of::<ItemDesc>() == 24);
    assert!(offset_of!(WorkerStatus, current_item) == 32);
    // The head and the first item fill the first line: a one-array task moves that line and
    // the line of its parameters.
    assert!(offset_of!(TaskDesc, items) == 40);
    assert!(offset_of!(TaskDesc, items) + size_of::<ItemDesc>() == 64);
    assert!(offset_of!(TaskDesc, params) == 40 + 24 * MAX_ITEMS);
    assert!(offset_of!(TaskDesc, out_shape) == 40 + 24 * MAX_ITEMS + PARAM_BYTES);
    assert!(offset_of!(TaskDesc, skip_mask) == 56 + 24 * MAX_ITEMS + PARAM_BYTES);
    assert!(offset_of!(TaskDesc, failed_mask) == 64 + 24 * MAX_ITEMS + PARAM_BYTES);
    assert!(offset_of!(TaskDesc, status) == 72 + 24 * MAX_ITEMS + PARAM_BYTES);
    // A layout has at most 2^31 - 1 slots (`Layout::new`): the flag is above every index.
    assert!((u32::MAX >> 1) as u64 <= DONE_OK);
    assert!(size_of::<OutDesc>() == 24);
    assert!(size_of::<TaskDesc>().is_multiple_of(64));
    assert!(DESC_STRIDE.is_multiple_of(64));
    assert!(MAX_ITEMS <= 64); // failed_mask, skip_mask
    assert!(size_of::<ProducerShared>() == LINE as usize);
    assert!(offset_of!(RingCtl, head) == LINE as usize);
    assert!(size_of::<TailLine>() == LINE as usize);
    assert!(INLINE_CAPACITY.is_power_of_two() && INLINE_CAPACITY as usize <= INLINE_ENTRIES);
    assert!(size_of::<RingCtl>() == 2 * LINE as usize);
    assert!(size_of::<AtomicU64>() == 8 && align_of::<AtomicU64>() == 8);
    assert!(size_of::<AtomicU32>() == 4);
};

/// Which way a ring carries tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Producer → worker.
    ToWorker = 0,
    /// Worker → producer.
    FromWorker = 1,
}

/// Why a layout cannot be built or accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A parameter is outside its documented range.
    #[error("{what} = {value} is outside {range}")]
    OutOfRange {
        /// Which parameter.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The accepted range, in words.
        range: &'static str,
    },
    /// The offsets do not add up (overflow, overlap or misalignment).
    #[error("inconsistent layout: {0}")]
    Inconsistent(&'static str),
}

/// The computed placement of every object. Cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    params: Params,
}

fn align_up(x: u64, a: u64) -> Option<u64> {
    debug_assert!(a.is_power_of_two());
    x.checked_add(a - 1).map(|v| v & !(a - 1))
}

fn range(
    what: &'static str,
    value: u64,
    lo: u64,
    hi: u64,
    words: &'static str,
) -> Result<(), LayoutError> {
    if value < lo || value > hi {
        Err(LayoutError::OutOfRange {
            what,
            value,
            range: words,
        })
    } else {
        Ok(())
    }
}

impl Layout {
    /// Places `workers` worker states, `producers` producer states, a (to, from) ring pair per
    /// producer per worker, and the slot classes `(slot_bytes, count)` (in increasing size).
    /// `ring_capacity` is rounded up to a power of two.
    pub fn new(
        workers: u32,
        producers: u32,
        ring_capacity: u32,
        classes: &[(u64, u32)],
    ) -> Result<Layout, LayoutError> {
        Layout::with_outputs(workers, producers, ring_capacity, classes, false)
    }

    /// As [`Layout::new`]; with `outputs`, every slot also gets an output region of its own
    /// size (out-of-place tasks), placed after all the slot data so that workers can map the
    /// inputs read-only as one range.
    pub fn with_outputs(
        workers: u32,
        producers: u32,
        ring_capacity: u32,
        classes: &[(u64, u32)],
        outputs: bool,
    ) -> Result<Layout, LayoutError> {
        range("workers", workers.into(), 1, MAX_WORKERS.into(), "1..=1024")?;
        range(
            "producers",
            producers.into(),
            1,
            MAX_PRODUCERS.into(),
            "1..=64",
        )?;
        range(
            "slot classes",
            classes.len() as u64,
            1,
            MAX_CLASSES as u64,
            "1..=8",
        )?;
        let ring_capacity =
            ring_capacity
                .max(1)
                .checked_next_power_of_two()
                .ok_or(LayoutError::OutOfRange {
                    what: "ring capacity",
                    value: ring_capacity.into(),
                    range: "1..=2^31",
                })?;
        let mut params = Params {
            workers,
            producers,
            slots: 0,
            ring_capacity,
            class_count: classes.len() as u32,
            outputs: u32::from(outputs),
            classes: [SlotClass::default(); MAX_CLASSES],
            workers_offset: 0,
            producers_offset: 0,
            rings_offset: 0,
            ring_stride: 0,
            descriptors_offset: 0,
            total_bytes: 0,
            output_offset: 0,
        };
        let bad = LayoutError::Inconsistent("size overflow");
        // The header has a page to itself, so that attachers can map it read-only.
        let mut at = PAGE;
        params.workers_offset = at;
        at += u64::from(workers) * WORKER_BYTES;
        params.producers_offset = at;
        at += u64::from(producers) * LINE;
        params.rings_offset = at;
        params.ring_stride = align_up(ring_bytes(ring_capacity), LINE).ok_or(bad.clone())?;
        let rings = 2 * u64::from(workers) * u64::from(producers);
        at = rings
            .checked_mul(params.ring_stride)
            .and_then(|r| r.checked_add(at))
            .ok_or(bad.clone())?;
        let mut slots: u64 = 0;
        for &(_, count) in classes {
            slots += u64::from(count);
        }
        range("slots", slots, 1, u64::from(u32::MAX >> 1), "1..=2^31-1")?;
        params.slots = slots as u32;
        params.descriptors_offset = at;
        at = slots
            .checked_mul(DESC_STRIDE)
            .and_then(|d| d.checked_add(at))
            .ok_or(bad.clone())?;
        at = align_up(at, PAGE).ok_or(bad.clone())?;
        let mut first = 0u32;
        let mut prev_bytes = 0;
        for (i, &(bytes, count)) in classes.iter().enumerate() {
            range(
                "slot bytes",
                bytes,
                MATRIX_ALIGN,
                MAX_SLOT_BYTES,
                "64 B..=1 GiB",
            )?;
            if bytes <= prev_bytes {
                return Err(LayoutError::Inconsistent("classes must grow strictly"));
            }
            prev_bytes = bytes;
            at = align_up(at, slot_align(bytes)).ok_or(bad.clone())?;
            let bytes = slot_bytes(bytes).ok_or(bad.clone())?;
            params.classes[i] = SlotClass {
                slot_bytes: bytes,
                data_offset: at,
                first_slot: first,
                count,
            };
            first += count;
            at = bytes
                .checked_mul(u64::from(count))
                .and_then(|d| d.checked_add(at))
                .ok_or(bad.clone())?;
        }
        if outputs {
            let data = at - params.classes[0].data_offset;
            params.output_offset = align_up(at, PAGE).ok_or(bad.clone())?;
            at = params.output_offset.checked_add(data).ok_or(bad.clone())?;
        }
        params.total_bytes = align_up(at, PAGE).ok_or(bad)?;
        Layout::from_params(params)
    }

    /// Accepts parameters read from a segment (untrusted) after re-checking every range,
    /// alignment and offset against `total_bytes`.
    pub fn from_params(p: Params) -> Result<Layout, LayoutError> {
        range(
            "workers",
            p.workers.into(),
            1,
            MAX_WORKERS.into(),
            "1..=1024",
        )?;
        range(
            "producers",
            p.producers.into(),
            1,
            MAX_PRODUCERS.into(),
            "1..=64",
        )?;
        range(
            "slot classes",
            p.class_count.into(),
            1,
            MAX_CLASSES as u64,
            "1..=8",
        )?;
        if !p.ring_capacity.is_power_of_two() {
            return Err(LayoutError::Inconsistent(
                "ring capacity not a power of two",
            ));
        }
        let total = p.total_bytes;
        let end_of = |off: u64, len: u64| off.checked_add(len).filter(|&e| e <= total);
        let ws = u64::from(p.workers) * WORKER_BYTES;
        let ps = u64::from(p.producers) * LINE;
        let rings = 2 * u64::from(p.workers) * u64::from(p.producers);
        let ok = p.workers_offset.is_multiple_of(PAGE)
            && p.workers_offset >= core::mem::size_of::<Header>() as u64
            && end_of(p.workers_offset, ws).is_some_and(|e| e <= p.producers_offset)
            && p.producers_offset.is_multiple_of(LINE)
            && end_of(p.producers_offset, ps).is_some_and(|e| e <= p.rings_offset)
            && p.rings_offset.is_multiple_of(LINE)
            && p.ring_stride.is_multiple_of(LINE)
            && p.ring_stride >= ring_bytes(p.ring_capacity)
            && rings
                .checked_mul(p.ring_stride)
                .and_then(|r| end_of(p.rings_offset, r))
                .is_some_and(|e| e <= p.descriptors_offset)
            && p.descriptors_offset.is_multiple_of(64);
        if !ok {
            return Err(LayoutError::Inconsistent(
                "header regions overlap or are misaligned",
            ));
        }
        let desc_end = u64::from(p.slots)
            .checked_mul(DESC_STRIDE)
            .and_then(|d| end_of(p.descriptors_offset, d))
            .ok_or(LayoutError::Inconsistent(
                "descriptors run past the segment",
            ))?;
        let mut next_slot = 0u32;
        let mut floor = desc_end;
        for c in &p.classes[..p.class_count as usize] {
            let align = if c.slot_bytes >= PAGE {
                PAGE
            } else {
                MATRIX_ALIGN
            };
            let fits = c.first_slot == next_slot
                && c.slot_bytes >= MATRIX_ALIGN
                && c.slot_bytes <= MAX_SLOT_BYTES
                && c.slot_bytes % align == 0
                && c.data_offset % align == 0
                && c.data_offset >= floor
                && c.slot_bytes
                    .checked_mul(u64::from(c.count))
                    .and_then(|d| end_of(c.data_offset, d))
                    .is_some();
            if !fits {
                return Err(LayoutError::Inconsistent("slot class out of bounds"));
            }
            next_slot = next_slot
                .checked_add(c.count)
                .ok_or(LayoutError::Inconsistent("slot count overflow"))?;
            floor = c.data_offset + c.slot_bytes * u64::from(c.count);
        }
        if next_slot != p.slots {
            return Err(LayoutError::Inconsistent(
                "class counts do not sum to slots",
            ));
        }
        let data = floor - p.classes[0].data_offset;
        let outputs_fit = match p.outputs {
            0 => p.output_offset == 0,
            1 => {
                p.output_offset.is_multiple_of(PAGE)
                    && p.output_offset >= floor
                    && end_of(p.output_offset, data).is_some()
            }
            _ => false,
        };
        if !outputs_fit {
            return Err(LayoutError::Inconsistent("output region out of bounds"));
        }
        Ok(Layout { params: p })
    }

    /// The parameters, as stored in the header.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Size of the segment in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.params.total_bytes
    }

    /// Number of slots (tokens).
    pub fn slots(&self) -> u32 {
        self.params.slots
    }

    /// The slot classes in use.
    pub fn classes(&self) -> &[SlotClass] {
        &self.params.classes[..self.params.class_count as usize]
    }

    /// Offset of worker `w`'s shared state. `w < workers`.
    pub fn worker_offset(&self, w: u32) -> u64 {
        debug_assert!(w < self.params.workers);
        self.params.workers_offset + u64::from(w) * WORKER_BYTES
    }

    /// Offset of producer `p`'s shared state. `p < producers`.
    pub fn producer_offset(&self, p: u32) -> u64 {
        debug_assert!(p < self.params.producers);
        self.params.producers_offset + u64::from(p) * LINE
    }

    /// Offset of the ring between producer `p` and worker `w` in direction `d`. Its entries
    /// are in the tail line if the capacity is at most [`INLINE_CAPACITY`], else they start
    /// [`LINE`]` * 2` bytes later.
    pub fn ring_offset(&self, p: u32, w: u32, d: Direction) -> u64 {
        debug_assert!(p < self.params.producers && w < self.params.workers);
        let index = (u64::from(p) * u64::from(self.params.workers) + u64::from(w)) * 2 + d as u64;
        self.params.rings_offset + index * self.params.ring_stride
    }

    /// Offset of slot `s`'s descriptor. `s < slots`.
    pub fn descriptor_offset(&self, s: u32) -> u64 {
        debug_assert!(s < self.params.slots);
        self.params.descriptors_offset + u64::from(s) * DESC_STRIDE
    }

    /// Index of the class holding slot `s`, or `None` if `s` is out of range.
    pub fn class_of(&self, s: u32) -> Option<usize> {
        self.classes()
            .iter()
            .position(|c| s >= c.first_slot && s - c.first_slot < c.count)
    }

    /// Whether slots have separate output regions.
    pub fn has_outputs(&self) -> bool {
        self.params.outputs == 1
    }

    /// `(offset, bytes)` of the data of every slot, all classes together: the range workers
    /// map read-only when slots have output regions. Page aligned at the start.
    pub fn data_region(&self) -> (u64, u64) {
        let first = self.classes()[0].data_offset;
        let last = self.classes()[self.classes().len() - 1];
        (
            first,
            last.data_offset + last.slot_bytes * u64::from(last.count) - first,
        )
    }

    /// `(offset, bytes)` of slot `s`'s output region, or `None` if `s` is out of range or slots
    /// have no output regions.
    pub fn slot_output(&self, s: u32) -> Option<(u64, u64)> {
        if !self.has_outputs() {
            return None;
        }
        let (off, bytes) = self.slot_data(s)?;
        Some((
            self.params.output_offset + (off - self.data_region().0),
            bytes,
        ))
    }

    /// `(offset, bytes)` of slot `s`'s data, or `None` if `s` is out of range.
    pub fn slot_data(&self, s: u32) -> Option<(u64, u64)> {
        let c = &self.classes()[self.class_of(s)?];
        Some((
            c.data_offset + u64::from(s - c.first_slot) * c.slot_bytes,
            c.slot_bytes,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_aligned_and_disjoint() {
        let l = Layout::new(3, 2, 12, &[(4096, 10), (65536, 5), (4 << 20, 2)]).unwrap();
        let p = l.params();
        assert_eq!(p.ring_capacity, 16);
        assert_eq!(p.slots, 17);
        assert!(l.ring_offset(1, 2, Direction::FromWorker) + p.ring_stride <= p.descriptors_offset);
        assert_eq!(l.ring_offset(0, 0, Direction::ToWorker), p.rings_offset);
        let mut prev_end = l.descriptor_offset(16) + DESC_STRIDE;
        for s in 0..17 {
            let (off, bytes) = l.slot_data(s).unwrap();
            assert_eq!(off % PAGE, 0);
            assert!(off >= prev_end, "slot {s} overlaps the previous one");
            prev_end = off + bytes;
        }
        assert!(prev_end <= l.total_bytes());
        assert_eq!(l.slot_data(17), None);
        assert_eq!(l.class_of(10), Some(1));
    }

    #[test]
    fn output_regions_mirror_the_data_after_it() {
        let l = Layout::with_outputs(2, 1, 4, &[(64, 3), (8192, 2)], true).unwrap();
        let (start, len) = l.data_region();
        assert_eq!(start % PAGE, 0);
        for s in 0..5 {
            let (d, bytes) = l.slot_data(s).unwrap();
            let (o, obytes) = l.slot_output(s).unwrap();
            assert_eq!(bytes, obytes);
            assert!(o >= start + len, "output {s} overlaps the data");
            assert_eq!(o - l.params().output_offset, d - start);
            assert!(o + obytes <= l.total_bytes());
        }
        assert_eq!(Layout::from_params(*l.params()), Ok(l));
        let mut p = *l.params();
        p.output_offset = start;
        assert!(Layout::from_params(p).is_err(), "outputs over the data");
        let mut p = *l.params();
        p.output_offset = p.total_bytes;
        assert!(Layout::from_params(p).is_err(), "outputs past the end");
        let mut p = *l.params();
        p.outputs = 2;
        assert!(Layout::from_params(p).is_err());
        let plain = Layout::new(2, 1, 4, &[(64, 3), (8192, 2)]).unwrap();
        assert_eq!(plain.slot_output(0), None);
        let mut p = *plain.params();
        p.output_offset = PAGE;
        assert!(Layout::from_params(p).is_err(), "an offset without outputs");
    }

    #[test]
    fn small_slots_are_64_byte_aligned() {
        let l = Layout::new(1, 1, 4, &[(64, 3), (1024, 2)]).unwrap();
        for s in 0..5 {
            assert_eq!(l.slot_data(s).unwrap().0 % MATRIX_ALIGN, 0);
        }
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(Layout::new(0, 1, 1, &[(4096, 1)]).is_err());
        assert!(Layout::new(1, 0, 1, &[(4096, 1)]).is_err());
        assert!(Layout::new(1, 1, 1, &[]).is_err());
        assert!(Layout::new(1, 1, 1, &[(4096, 1), (4096, 1)]).is_err());
        assert!(Layout::new(1, 1, 1, &[(MAX_SLOT_BYTES * 2, 1)]).is_err());
    }

    #[test]
    fn from_params_rejects_tampering() {
        let l = Layout::new(2, 1, 8, &[(4096, 4)]).unwrap();
        assert_eq!(Layout::from_params(*l.params()), Ok(l));
        let mut p = *l.params();
        p.total_bytes -= PAGE;
        assert!(Layout::from_params(p).is_err());
        let mut p = *l.params();
        p.ring_capacity = 7;
        assert!(Layout::from_params(p).is_err());
        let mut p = *l.params();
        p.classes[0].count += 1;
        assert!(Layout::from_params(p).is_err());
        let mut p = *l.params();
        p.workers = 100;
        assert!(Layout::from_params(p).is_err());
        let mut p = *l.params();
        p.classes[0].data_offset = 8;
        assert!(Layout::from_params(p).is_err());
    }
}
