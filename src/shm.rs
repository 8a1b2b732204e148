//! The shared segment: create (size, commit, map, write the header), attach (map, validate), and
//! typed access to the objects [`Layout`] places in it.
//!
//! The segment is an anonymous memfd: it has no name, so nothing can be left behind in
//! `/dev/shm`, and it is freed when the last process holding the fd or a mapping exits. Workers
//! inherit the fd across exec.
//!
//! Access rules. Only all-atomic structs ([`WorkerShared`], [`ProducerShared`], [`RingCtl`] and
//! ring entries) are handed out as references: they may be written by other processes at any
//! time, and atomics make that sound. Descriptors and slot data are reached only through a
//! [`Token`], whose holder owns the slot (DESIGN invariant 1); the header's plain fields are
//! copied out once at attach and validated, never referenced.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::array::Shape;
use crate::dtype::DType;
use crate::layout::{
    Direction, Header, ItemDesc, Layout, LayoutError, OutDesc, Params, ProducerShared, RingCtl,
    TaskDesc, WorkerShared, INLINE_CAPACITY, LAYOUT_VERSION, MAGIC, MAX_ITEMS, MESSAGE_BYTES,
    TASK_FAILED, TASK_OK,
};
use crate::pool::Token;
use crate::sync::{AtomicU32, AtomicU64, Ordering};
use crate::sys;

/// Bytes kept free for everything else on the machine when checking whether a segment fits
/// (as the pool's own check keeps).
const HEADROOM: u64 = crate::limits::MEMORY_HEADROOM;

/// Why a segment could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ShmCreateError {
    /// The machine cannot commit that much memory.
    #[error(
        "shared memory does not fit: asked for {} ({asked} bytes), {} available \
         under {limit}; {smaller}",
        human_bytes(*asked), human_bytes(*available),
        smaller = crate::limits::SMALLER
    )]
    TooLarge {
        /// Segment size in bytes.
        asked: u64,
        /// Bytes the machine reported available.
        available: u64,
        /// The limit that leaves `available` (MemAvailable or a cgroup's limit file).
        limit: String,
    },
    /// A system call failed.
    #[error("could not create shared memory ({step}): {source}")]
    Io {
        /// Which step failed.
        step: &'static str,
        /// The error.
        source: io::Error,
    },
}

/// Why attaching to a segment failed.
#[derive(Debug, thiserror::Error)]
pub enum ShmAttachError {
    /// A system call failed.
    #[error("could not map shared memory: {0}")]
    Io(#[from] io::Error),
    /// The segment is smaller than its header says, or than a header.
    #[error("segment is {actual} bytes, expected {expected}")]
    Size {
        /// Bytes expected.
        expected: u64,
        /// Bytes found.
        actual: u64,
    },
    /// Not an mk1 segment.
    #[error("not an mk1 segment (magic {0:#x})")]
    Magic(u64),
    /// Made by a different mk1 layout version.
    #[error("segment layout version {found}, this build understands {LAYOUT_VERSION}")]
    Version {
        /// Version found.
        found: u32,
    },
    /// The header's parameters do not describe a valid layout.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// Formats a byte count for people.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Failed item `i`'s own message and panic flag, read from its output space `room` (see
/// [`crate::layout::ITEM_MESSAGE`]; untrusted: the length is clamped, the text decoded
/// lossily); where the worker could not write one (a space smaller than the header), a message
/// saying so, with the batch's first failure `first`.
fn item_message(room: &[u8], i: usize, first: &str) -> (u32, String, bool) {
    use crate::layout::{ITEM_MESSAGE, ITEM_MESSAGE_HEADER};
    let word = |k: usize| {
        room.get(4 * k..4 * k + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    match (word(0), word(1), word(2)) {
        (Some(ITEM_MESSAGE), Some(flags), Some(len)) => {
            let text = &room[ITEM_MESSAGE_HEADER..];
            let n = (len as usize).min(text.len());
            let mut message = String::from_utf8_lossy(&text[..n]).into_owned();
            if n < len as usize {
                message.push_str(&format!(
                    "… (cut to the {n} of its {len} bytes that its array's space holds)"
                ));
            }
            (i as u32, message, flags & 1 == 1)
        }
        _ => (
            i as u32,
            format!(
                "array {i} of its batch failed; its own message did not fit its output space \
                 (the batch's first failure: {first})"
            ),
            false,
        ),
    }
}

/// A task's answer, as a worker writes it and a producer reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskResult {
    /// [`TASK_OK`] or [`TASK_FAILED`].
    pub status: u32,
    /// Bit `i`: item `i` failed.
    pub failed_mask: u64,
    /// The first failure was a panic.
    pub panicked: bool,
    /// The first failure's message.
    pub message: String,
    /// Bytes of the whole message written to the failed item's output space (0: the message
    /// fits the descriptor).
    pub detail_len: u32,
    /// What each item's output is, when the kernel decided it (any-dtype kernels).
    pub outs: Option<Vec<crate::layout::OutDesc>>,
    /// Read back only: each failed item after the first, with its own message and whether it
    /// was a panic (see [`crate::layout::ITEM_MESSAGE`]).
    pub others: Vec<(u32, String, bool)>,
}

impl TaskResult {
    /// Every item succeeded, each output as requested.
    pub fn ok() -> TaskResult {
        TaskResult {
            status: TASK_OK,
            failed_mask: 0,
            panicked: false,
            message: String::new(),
            detail_len: 0,
            outs: None,
            others: Vec::new(),
        }
    }
}

/// A worker's view of one task's memory (made by `Segment::task_buffers`).
pub enum TaskBuffers<'a> {
    /// The slot, read and written in place.
    InPlace(&'a mut [u8]),
    /// The input (read-only) and the output.
    OutOfPlace(&'a [u8], &'a mut [u8]),
}

/// One mapped segment.
pub struct Segment {
    map: sys::Mapping,
    fd: OwnedFd,
    layout: Layout,
    coordinator_pid: u32,
    /// Where each slot's memory lies (from the layout), by slot index.
    spans: Box<[SlotSpan]>,
}

/// Where one slot's memory lies in the segment, worked out once from the (validated) layout:
/// the hot paths index this instead of searching the size classes per task.
#[derive(Clone, Copy)]
struct SlotSpan {
    /// Offset of its data (the input).
    data: u64,
    /// Bytes of its data, and of its output region when there is one.
    bytes: u64,
    /// Offset of its results: its output region out of place, its data in place.
    result: u64,
}

fn slot_spans(layout: &Layout) -> Box<[SlotSpan]> {
    (0..layout.slots())
        .map(|s| {
            let (data, bytes) = layout.slot_data(s).expect("every slot index is in range");
            let result = layout.slot_output(s).map_or(data, |(out, _)| out);
            SlotSpan {
                data,
                bytes,
                result,
            }
        })
        .collect()
}

/// The byte ranges `(offset, len)` of a task descriptor's request that travel: the head, the
/// `count` items in use (the first shares the head's cache line), the `params_len` bytes of
/// parameters in use, the output shape when one is set, and a batch's skip mask (counts
/// clamped, so the ranges stay inside a `TaskDesc` whatever `desc` holds).
fn task_spans(desc: &TaskDesc) -> [(usize, usize); 5] {
    let head = core::mem::offset_of!(TaskDesc, items);
    let items = (desc.count as usize).min(MAX_ITEMS) * core::mem::size_of::<ItemDesc>();
    let params = (desc.params_len as usize).min(crate::layout::PARAM_BYTES);
    let shape = if desc.out_ndim != 0 {
        core::mem::size_of_val(&desc.out_shape)
    } else {
        0
    };
    [
        (0, head),
        (head, items),
        (core::mem::offset_of!(TaskDesc, params), params),
        (core::mem::offset_of!(TaskDesc, out_shape), shape),
        (
            core::mem::offset_of!(TaskDesc, skip_mask),
            if desc.count > 1 { 8 } else { 0 },
        ),
    ]
}

/// What a failure to commit the segment's memory (`fallocate`, or its fallback) means.
fn commit_error(fd: BorrowedFd<'_>, asked: u64, e: io::Error) -> ShmCreateError {
    match e.raw_os_error() {
        Some(code)
            if code == rustix::io::Errno::NOSPC.raw_os_error()
                || code == rustix::io::Errno::NOMEM.raw_os_error() =>
        {
            // Out of space on the /dev/shm fallback (not a memory refusal: ENOMEM, or
            // ENOSPC with room left, is a memory limit and reported as one below).
            if let Some(free) = sys::dev_shm_room(fd.as_fd())
                .filter(|&free| free < asked && code == rustix::io::Errno::NOSPC.raw_os_error())
            {
                return ShmCreateError::TooLarge {
                    asked,
                    available: free,
                    limit: "the free space of /dev/shm (memfd_create is refused, so the \
                            segment is a file there)"
                        .into(),
                };
            }
            let room = crate::limits::memory_room(&crate::limits::read_host);
            ShmCreateError::TooLarge {
                asked,
                available: room.as_ref().map_or(0, |r| r.left),
                limit: room
                    .map_or_else(|| "the kernel's refusal to commit it".into(), |r| r.source),
            }
        }
        _ => ShmCreateError::Io {
            step: "fallocate",
            source: e,
        },
    }
}

/// What a failure of the fallback commit through the mapping (`MADV_POPULATE_WRITE`) means.
fn populate_error(fd: BorrowedFd<'_>, asked: u64, e: io::Error) -> ShmCreateError {
    let refused = [
        rustix::io::Errno::INVAL,
        rustix::io::Errno::PERM,
        rustix::io::Errno::NOSYS,
    ];
    match e.raw_os_error() {
        Some(code) if refused.iter().any(|r| r.raw_os_error() == code) => ShmCreateError::Io {
            step: "fallocate",
            source: io::Error::new(
                e.kind(),
                "fallocate(2) is refused, and so is madvise(2) MADV_POPULATE_WRITE (or this \
                 kernel, before Linux 5.14, has none), so the segment's memory cannot be \
                 committed up front (touching it later could raise SIGBUS); allow fallocate in \
                 the seccomp profile",
            ),
        },
        // EFAULT: a page could not be had, where a touch would raise SIGBUS; as fallocate's
        // ENOSPC.
        Some(code) if code == rustix::io::Errno::FAULT.raw_os_error() => commit_error(
            fd,
            asked,
            io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()),
        ),
        _ => commit_error(fd, asked, e),
    }
}

impl Segment {
    /// Creates, sizes, commits and maps a new segment for `layout`, and writes its header.
    ///
    /// Fails with [`ShmCreateError::TooLarge`] before touching memory when the machine does not
    /// have the room, and again if the commit itself is refused — never with a later SIGBUS.
    pub fn create(layout: Layout) -> Result<Segment, ShmCreateError> {
        let asked = layout.total_bytes();
        let room = crate::limits::memory_room(&crate::limits::read_host);
        if let Some(room) = &room {
            if asked.saturating_add(HEADROOM) > room.left {
                return Err(ShmCreateError::TooLarge {
                    asked,
                    available: room.left.saturating_sub(HEADROOM),
                    limit: format!(
                        "{}, less {} kept for the rest of the machine",
                        room.source,
                        human_bytes(HEADROOM)
                    ),
                });
            }
        }
        let io = |step| move |source| ShmCreateError::Io { step, source };
        let fd = sys::memfd("mk1").map_err(io("memfd_create"))?;
        sys::set_len(fd.as_fd(), asked).map_err(io("ftruncate"))?;
        let committed = match sys::commit(fd.as_fd(), asked) {
            Ok(c) => c,
            Err(e) => return Err(commit_error(fd.as_fd(), asked, e)),
        };
        let len = usize::try_from(asked).map_err(|_| ShmCreateError::TooLarge {
            asked,
            available: usize::MAX as u64,
            limit: "this platform's address space".into(),
        })?;
        let map = sys::Mapping::shared(fd.as_fd(), len).map_err(io("mmap"))?;
        if !committed {
            // fallocate refused: commit through the mapping instead.
            map.commit().map_err(|e| {
                // (The pages it did get go back first, so the space reported is the space
                // there was.)
                let _ = sys::set_len(fd.as_fd(), 0);
                populate_error(fd.as_fd(), asked, e)
            })?;
        }
        let coordinator_pid = sys::own_pid();
        let h = map.as_ptr().cast::<Header>();
        // SAFETY: the mapping is fresh, page aligned and at least `size_of::<Header>()` long
        // (Layout places everything after the header); no other process has the fd yet, so
        // these plain writes cannot race. The memory is zeroed by the kernel, so the atomics
        // (version, shutdown) start as valid zeros.
        unsafe {
            core::ptr::addr_of_mut!((*h).magic).write(MAGIC);
            core::ptr::addr_of_mut!((*h).coordinator_pid).write(coordinator_pid);
            core::ptr::addr_of_mut!((*h).params).write(*layout.params());
        }
        let seg = Segment {
            map,
            fd,
            spans: slot_spans(&layout),
            layout,
            coordinator_pid,
        };
        // Release: publishes magic and params to any attacher's Acquire load of `version`.
        seg.version_word().store(LAYOUT_VERSION, Ordering::Release);
        Ok(seg)
    }

    /// Maps the segment behind an inherited fd and validates its header. The header page is
    /// mapped read-only here: only the creator writes it, so a worker that tries (the shutdown
    /// flag, say) faults itself instead of misleading the others.
    pub fn attach(fd: OwnedFd) -> Result<Segment, ShmAttachError> {
        let len = sys::file_len(fd.as_fd())?;
        let header = core::mem::size_of::<Header>() as u64;
        if len < header {
            return Err(ShmAttachError::Size {
                expected: header,
                actual: len,
            });
        }
        let map =
            sys::Mapping::shared(fd.as_fd(), usize::try_from(len).map_err(io::Error::other)?)?;
        let h = map.as_ptr().cast::<Header>();
        // SAFETY: the mapping is page aligned and at least a header long; `version` is an
        // atomic, so referencing it is sound even if another process writes it.
        let version = unsafe { &*core::ptr::addr_of!((*h).version) }.load(Ordering::Acquire);
        // SAFETY: as above for the bounds. The plain fields are only read after the Acquire
        // above saw the creator's Release; we copy them out (read_volatile: the value may be
        // changed by a misbehaving process, and a copy is then validated, never trusted).
        let (magic, pid, params): (u64, u32, Params) = unsafe {
            (
                core::ptr::addr_of!((*h).magic).read_volatile(),
                core::ptr::addr_of!((*h).coordinator_pid).read_volatile(),
                core::ptr::addr_of!((*h).params).read_volatile(),
            )
        };
        if magic != MAGIC {
            return Err(ShmAttachError::Magic(magic));
        }
        if version != LAYOUT_VERSION {
            return Err(ShmAttachError::Version { found: version });
        }
        let layout = Layout::from_params(params)?;
        if layout.total_bytes() != len {
            return Err(ShmAttachError::Size {
                expected: layout.total_bytes(),
                actual: len,
            });
        }
        map.protect_prefix_read_only(crate::layout::PAGE as usize)?;
        Ok(Segment {
            map,
            fd,
            spans: slot_spans(&layout),
            layout,
            coordinator_pid: pid,
        })
    }

    /// The layout this segment was created with (validated).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The segment's fd (inherited by workers).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Pid of the coordinator that created the segment, as written in the header.
    pub fn coordinator_pid(&self) -> u32 {
        self.coordinator_pid
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Always false for a created or attached segment.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// # Safety
    /// `offset + size_of::<T>() <= len`, `offset` aligned for `T`, and `T` made only of
    /// atomics (so concurrent writes from other processes are not data races).
    unsafe fn atomic_ref<T>(&self, offset: u64) -> &T {
        debug_assert!(offset as usize + core::mem::size_of::<T>() <= self.map.len());
        debug_assert_eq!(offset as usize % core::mem::align_of::<T>(), 0);
        // SAFETY: the caller guarantees bounds, alignment and an all-atomic `T`; the memory lives
        // as long as `self.map`, which outlives the returned borrow of `self`.
        unsafe { &*self.map.as_ptr().add(offset as usize).cast::<T>() }
    }

    fn version_word(&self) -> &AtomicU32 {
        // SAFETY: `version` lies inside the header at the start of the mapping (const-asserted
        // offset 8), 4-byte aligned, and is an atomic.
        unsafe { self.atomic_ref(core::mem::offset_of!(Header, version) as u64) }
    }

    /// The shutdown flag: the coordinator stores 1 (Release) when workers should drain and exit;
    /// workers load it (Acquire) when idle.
    pub fn shutdown_flag(&self) -> &AtomicU32 {
        // SAFETY: inside the header, aligned, atomic.
        unsafe { self.atomic_ref(core::mem::offset_of!(Header, shutdown) as u64) }
    }

    /// Worker `w`'s shared state. Panics if `w` is out of range (a caller bug).
    pub fn worker(&self, w: u32) -> &WorkerShared {
        assert!(w < self.layout.params().workers, "worker {w} out of range");
        // SAFETY: `Layout` (validated) places `workers` 128-byte-aligned `WorkerShared`s inside
        // the segment; `WorkerShared` holds only atomics.
        unsafe { self.atomic_ref(self.layout.worker_offset(w)) }
    }

    /// Producer `p`'s shared state. Panics if `p` is out of range (a caller bug).
    pub fn producer(&self, p: u32) -> &ProducerShared {
        assert!(
            p < self.layout.params().producers,
            "producer {p} out of range"
        );
        // SAFETY: as for `worker`, for the producer states.
        unsafe { self.atomic_ref(self.layout.producer_offset(p)) }
    }

    /// The control block and entries of the ring between producer `p` and worker `w` in
    /// direction `d`. Callers claim at most one `RingProducer` and one `RingConsumer` per ring.
    pub fn ring(&self, p: u32, w: u32, d: Direction) -> (&RingCtl, &[AtomicU64]) {
        let params = self.layout.params();
        assert!(
            p < params.producers && w < params.workers,
            "ring ({p}, {w}) out of range"
        );
        let off = self.layout.ring_offset(p, w, d);
        let cap = params.ring_capacity;
        // SAFETY: `Layout` places each ring (control block of `2 * LINE` bytes, then, unless
        // the capacity is at most INLINE_CAPACITY, `ring_capacity` u64 entries, within
        // `ring_stride`) 128-byte aligned inside the segment. `RingCtl` and the entries are
        // all atomics.
        unsafe {
            let ctl: &RingCtl = self.atomic_ref(off);
            if cap <= INLINE_CAPACITY {
                return (ctl, &ctl.tail.inline[..cap as usize]);
            }
            let first: *const AtomicU64 = self
                .map
                .as_ptr()
                .add(off as usize + core::mem::size_of::<RingCtl>())
                .cast();
            (
                ctl,
                core::slice::from_raw_parts(first, params.ring_capacity as usize),
            )
        }
    }

    fn task_ptr(&self, token: &Token) -> *mut TaskDesc {
        let off = self.layout.descriptor_offset(token.slot());
        // SAFETY: `Token` values only exist for slots `< slots` (checked where they are made), and
        // `Layout` places the descriptor array inside the segment, 64-byte aligned.
        unsafe { self.map.as_ptr().add(off as usize).cast() }
    }

    /// Writes the request part of a task descriptor (the head, the `count` items in use, the
    /// `params_len` bytes of parameters, the output shape if set and a batch's skip mask; see
    /// `task_spans`). The
    /// result fields are the worker's: it writes them whenever it answers without
    /// [`crate::layout::DONE_OK`].
    pub fn write_task(&self, token: &Token, desc: &TaskDesc) {
        let dst = self.task_ptr(token).cast::<u8>();
        let src = (desc as *const TaskDesc).cast::<u8>();
        let [head, items, params, shape, skip] = task_spans(desc);
        // SAFETY: holding the token means owning the slot and its descriptor (its previous
        // owner's ring push was Release, our pop Acquire), so nobody following the protocol
        // touches it meanwhile. The descriptor is DESC_STRIDE = size_of::<TaskDesc>() bytes;
        // `task_spans` gives byte ranges inside a `TaskDesc` (clamped counts; the head ends
        // where the items start), and the parameter words below end by `params.0 + PARAM_BYTES`
        // (`params.1 <= PARAM_BYTES`, a multiple of 8), so every range written lies inside it.
        unsafe {
            // The head and the first item (always written; a worker ignores items at `count..`)
            // in one copy of a constant size, a few register moves; then any further items.
            const ONE: usize =
                core::mem::offset_of!(TaskDesc, items) + core::mem::size_of::<ItemDesc>();
            core::ptr::copy_nonoverlapping(src, dst, ONE);
            let end = head.1 + items.1;
            if end > ONE {
                core::ptr::copy_nonoverlapping(src.add(ONE), dst.add(ONE), end - ONE);
            }
            // Parameters in 8-byte words (there are few).
            for w in 0..params.1.div_ceil(8) {
                let at = params.0 + 8 * w;
                core::ptr::copy_nonoverlapping(src.add(at), dst.add(at), 8);
            }
            for (at, len) in [shape, skip] {
                if len > 0 {
                    core::ptr::copy_nonoverlapping(src.add(at), dst.add(at), len);
                }
            }
        }
    }

    /// Copies the request part of the token's task descriptor into `out` (count clamped to
    /// [`MAX_ITEMS`], parameter bytes to [`crate::layout::PARAM_BYTES`]). Untrusted: validate
    /// `out` before use.
    pub fn read_task(&self, token: &Token, out: &mut TaskDesc) {
        let src = self.task_ptr(token);
        let head = core::mem::offset_of!(TaskDesc, items);
        // SAFETY: the worker holds the token (the producer's push was Release, our pop
        // Acquire), so the descriptor is its to read: the head first, then the spans its
        // (clamped) counts give, all inside the descriptor; `TaskDesc` is plain integers and
        // bytes, valid for any bits, and the copy is ours (a scribbler cannot change it after
        // validation).
        unsafe {
            core::ptr::copy_nonoverlapping(src.cast::<u8>(), (out as *mut TaskDesc).cast(), head);
            // The rest as the copied head says (not read again: a racing writer cannot make
            // the counts and what was copied disagree).
            for (at, len) in task_spans(out)
                .into_iter()
                .skip(1)
                .filter(|&(_, len)| len > 0)
            {
                core::ptr::copy_nonoverlapping(
                    src.cast::<u8>().add(at),
                    (out as *mut TaskDesc).cast::<u8>().add(at),
                    len,
                );
            }
        }
        // (Only a batch's skip mask travels: a single array is never skipped.)
        if out.count <= 1 {
            out.skip_mask = 0;
        }
    }

    /// The worker's answer for a task: status, failed items, whether the first failure was a
    /// panic, its message (at most [`MESSAGE_BYTES`] here; a longer one was already written to
    /// the item's output space, `detail_len` bytes), and the outputs a kernel decided.
    pub fn write_result(&self, token: &Token, result: &TaskResult) {
        let dst = self.task_ptr(token);
        let msg = &result.message.as_bytes()[..result.message.len().min(MESSAGE_BYTES)];
        let outs = result.outs.as_deref().unwrap_or(&[]);
        let outs = &outs[..outs.len().min(MAX_ITEMS)];
        // SAFETY: the worker holds the token (owns the descriptor); every field written and the
        // message and output entries (clamped to their arrays) lie inside it.
        unsafe {
            core::ptr::addr_of_mut!((*dst).status).write_volatile(result.status);
            core::ptr::addr_of_mut!((*dst).failed_mask).write_volatile(result.failed_mask);
            core::ptr::addr_of_mut!((*dst).panicked).write_volatile(u32::from(result.panicked));
            core::ptr::addr_of_mut!((*dst).message_len).write_volatile(msg.len() as u32);
            core::ptr::addr_of_mut!((*dst).detail_len).write_volatile(result.detail_len);
            core::ptr::addr_of_mut!((*dst).produced)
                .write_volatile(u32::from(result.outs.is_some()));
            core::ptr::copy_nonoverlapping(
                msg.as_ptr(),
                core::ptr::addr_of_mut!((*dst).message).cast::<u8>(),
                msg.len(),
            );
            core::ptr::copy_nonoverlapping(
                outs.as_ptr(),
                core::ptr::addr_of_mut!((*dst).outs).cast::<OutDesc>(),
                outs.len(),
            );
        }
    }

    /// Reads the worker's answer for a task the producer got back, against `sent` (the
    /// producer's own copy of the request). Untrusted and so normalised: an unknown status is a
    /// failure of every item; messages are clamped (a long one to the failed item's space) and
    /// decoded lossily; with `expect_outs`, an output that is missing, unknown or larger than
    /// its item's space fails that item.
    pub fn read_result(&self, token: &Token, sent: &TaskDesc, expect_outs: bool) -> TaskResult {
        let src = self.task_ptr(token);
        // SAFETY: the producer holds the token again (the worker's push was Release, our pop
        // Acquire); the fields are plain integers inside the descriptor, read by copy.
        let (status, failed_mask, panicked, len, detail_len, produced) = unsafe {
            (
                core::ptr::addr_of!((*src).status).read_volatile(),
                core::ptr::addr_of!((*src).failed_mask).read_volatile(),
                core::ptr::addr_of!((*src).panicked).read_volatile(),
                core::ptr::addr_of!((*src).message_len).read_volatile(),
                core::ptr::addr_of!((*src).detail_len).read_volatile(),
                core::ptr::addr_of!((*src).produced).read_volatile(),
            )
        };
        let count = (sent.count as usize).min(MAX_ITEMS);
        let in_place = !self.layout.has_outputs();
        let mut result = TaskResult::ok();
        if status != TASK_OK {
            let len = (len as usize).min(MESSAGE_BYTES);
            let mut msg = [0u8; MESSAGE_BYTES];
            // SAFETY: `len <= MESSAGE_BYTES`, inside the descriptor; copied out before decoding.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    core::ptr::addr_of!((*src).message).cast::<u8>(),
                    msg.as_mut_ptr(),
                    len,
                )
            };
            result.message = String::from_utf8_lossy(&msg[..len]).into_owned();
            match status {
                TASK_FAILED => {
                    result.status = TASK_FAILED;
                    result.failed_mask = failed_mask;
                    result.panicked = panicked == 1;
                    let first = failed_mask.trailing_zeros() as usize;
                    let region = self.result_bytes(token);
                    if detail_len > 0 && first < count {
                        let at = sent.items[first].offset as usize;
                        let room = sent.item_space(first, region.len() as u64, in_place) as usize;
                        let n = (detail_len as usize).min(room);
                        result.message = String::from_utf8_lossy(&region[at..at + n]).into_owned();
                    }
                    // Each later failure's own message, in its own space.
                    for i in (first + 1..count).filter(|&i| failed_mask & (1 << i) != 0) {
                        let at = sent.items[i].offset as usize;
                        let room = sent.item_space(i, region.len() as u64, in_place) as usize;
                        result.others.push(item_message(
                            &region[at..at + room],
                            i,
                            &result.message,
                        ));
                    }
                }
                other => {
                    result.status = TASK_FAILED;
                    result.failed_mask = u64::MAX;
                    result.message = format!("the worker left an invalid status {other:#x}");
                }
            }
        }
        if expect_outs {
            let mut outs = [OutDesc::default(); MAX_ITEMS];
            if produced == 1 {
                // SAFETY: as above; `count <= MAX_ITEMS` entries of plain integers, copied.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        core::ptr::addr_of!((*src).outs).cast::<OutDesc>(),
                        outs.as_mut_ptr(),
                        count,
                    )
                };
            }
            let region = self.result_bytes(token).len() as u64;
            for (i, o) in outs[..count].iter().enumerate() {
                if result.failed_mask & (1 << i) != 0 {
                    continue;
                }
                let fits = u8::try_from(o.dtype)
                    .ok()
                    .and_then(DType::from_code)
                    .zip(Shape::from_raw(o.ndim, o.shape))
                    .is_some_and(|(d, s)| s.bytes(d) <= sent.item_space(i, region, in_place));
                if !fits {
                    if result.status == TASK_OK {
                        result.message = format!(
                            "the worker reported output {i} as {o:?}, which is no dtype and \
                             shape that fits its space"
                        );
                    }
                    result.status = TASK_FAILED;
                    result.failed_mask |= 1 << i;
                }
            }
            result.outs = Some(outs[..count].to_vec());
        }
        result
    }

    /// The token's slot data as bytes, exclusively borrowed for as long as the token is (see
    /// [`Segment::slot_mut`] for the ownership argument). Not for a worker's view of an input
    /// that is mapped read-only: use [`Segment::task_buffers`] there.
    #[inline]
    pub(crate) fn slot_bytes_mut<'a>(&'a self, token: &'a mut Token) -> &'a mut [u8] {
        let s = self.span(token);
        // SAFETY: as for `slot_mut`; u8 is valid for any bits and has no alignment.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.map.as_ptr().add(s.data as usize),
                s.bytes as usize,
            )
        }
    }

    /// Where the token's slot lies (a token's slot index is in range: the pool checks every
    /// token it accepts).
    #[inline]
    fn span(&self, token: &Token) -> SlotSpan {
        self.spans[token.slot() as usize]
    }

    /// Bytes of the token's slot data (and of its output region, when slots have one).
    #[inline]
    pub(crate) fn slot_len(&self, token: &Token) -> u64 {
        self.span(token).bytes
    }

    /// A worker's view of a task's memory: the slot read-write in place, or the input shared
    /// (mapped read-only by [`Segment::protect_inputs`]) and the output exclusive.
    pub(crate) fn task_buffers<'a>(&'a self, token: &'a mut Token) -> TaskBuffers<'a> {
        let SlotSpan {
            data: off,
            bytes,
            result: out,
        } = self.span(token);
        if !self.layout.has_outputs() {
            return TaskBuffers::InPlace(self.slot_bytes_mut(token));
        }
        // SAFETY: both ranges lie inside the segment (validated layout) and do not overlap
        // (the output region starts after all slot data); the token owns both. The input is
        // only ever borrowed shared, so its read-only mapping is never written through.
        unsafe {
            TaskBuffers::OutOfPlace(
                core::slice::from_raw_parts(self.map.as_ptr().add(off as usize), bytes as usize),
                core::slice::from_raw_parts_mut(
                    self.map.as_ptr().add(out as usize),
                    bytes as usize,
                ),
            )
        }
    }

    /// Where a returned task's results are, shared: the output region out of place, the slot
    /// in place. Only for the producer, after the worker gave the token back.
    #[inline]
    pub(crate) fn result_bytes<'a>(&'a self, token: &'a Token) -> &'a [u8] {
        let SlotSpan {
            result: off, bytes, ..
        } = self.span(token);
        // SAFETY: inside the segment (validated layout). The token is held (the worker's push
        // was Release, our pop Acquire) and borrowed for the slice's life; the crate never makes
        // a mutable view of a slot from a shared borrow of its token, so nothing in this process
        // writes it meanwhile, and no worker follows the protocol while we hold the token.
        unsafe { core::slice::from_raw_parts(self.map.as_ptr().add(off as usize), bytes as usize) }
    }

    /// Where a returned task's results are, as [`Segment::result_bytes`] says, as a pointer and
    /// a length: no reference is made, so this is also right for a slot that a worker which
    /// could not be stopped may still write (a quarantined one).
    #[inline]
    pub(crate) fn result_raw(&self, token: &Token) -> (std::ptr::NonNull<u8>, usize) {
        let SlotSpan {
            result: off, bytes, ..
        } = self.span(token);
        // SAFETY: `off + bytes` lies inside the mapping (validated layout), so the offset
        // pointer stays in the same allocation and is not null.
        let at = unsafe { std::ptr::NonNull::new_unchecked(self.map.as_ptr().add(off as usize)) };
        (at, bytes as usize)
    }

    /// In a worker of a pool with output regions: maps every slot's input read-only, so no
    /// worker can change an input (which is what makes redoing a task after a death safe).
    pub fn protect_inputs(&self) -> io::Result<()> {
        if !self.layout.has_outputs() {
            return Ok(());
        }
        let (start, len) = self.layout.data_region();
        self.map.protect_read_only(start as usize, len as usize)
    }

    /// In a worker about to end: makes every slot's data and output region inaccessible in this
    /// process, so that nothing it still runs (a thread a kernel left behind) can reach a slot
    /// that the pool hands to other workers once this one has answered.
    ///
    /// # Safety
    /// Nothing in this process may use a view of a slot afterwards.
    pub unsafe fn revoke_slots(&self) -> io::Result<()> {
        for (start, len) in self.slot_regions() {
            // SAFETY: the caller's promise covers both regions.
            unsafe { self.map.protect_none(start as usize, len as usize)? };
        }
        Ok(())
    }

    /// The slots' data region and, when slots have one, their output region: (offset, bytes)
    /// each (a region of 0 bytes for none).
    fn slot_regions(&self) -> [(u64, u64); 2] {
        let (start, len) = self.layout.data_region();
        let outputs = if self.layout.has_outputs() {
            (self.layout.params().output_offset, len)
        } else {
            (0, 0)
        };
        [(start, len), outputs]
    }

    /// The slots' data and output regions (see `Segment::revoke_slots`) as addresses in this
    /// process: (address, bytes) each, 0 bytes for none.
    pub fn slot_addresses(&self) -> [(usize, usize); 2] {
        self.slot_regions()
            .map(|(at, len)| (self.map.as_ptr() as usize + at as usize, len as usize))
    }

    /// Hints the CPU to start fetching the first line of the token's slot data, so that the miss
    /// overlaps with the descriptor's (both lines were last written by another core).
    #[inline]
    pub fn prefetch_slot(&self, token: &Token) {
        #[cfg(target_arch = "x86_64")]
        if let Some(s) = self.spans.get(token.slot() as usize) {
            let p = self.map.as_ptr().wrapping_add(s.data as usize);
            // SAFETY: SSE is part of the x86_64 baseline, and a prefetch is only a hint: it never
            // faults, even on a bad address, and has no effect on memory contents.
            unsafe {
                core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast())
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = token;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_attach_sees_the_same_layout() {
        let layout = Layout::new(2, 1, 8, &[(4096, 4), (16384, 2)]).unwrap();
        let seg = Segment::create(layout).unwrap();
        let dup = seg.fd().try_clone_to_owned().unwrap();
        let other = Segment::attach(dup).unwrap();
        assert_eq!(other.layout(), seg.layout());
        assert_eq!(other.coordinator_pid(), sys::own_pid());
        seg.worker(1).status.heartbeat.store(7, Ordering::Relaxed);
        assert_eq!(other.worker(1).status.heartbeat.load(Ordering::Relaxed), 7);
        let mut t = Token::assume_owned(5, 0);
        seg.slot_bytes_mut(&mut t)[16383] = 42;
        assert_eq!(other.slot_bytes_mut(&mut t)[16383], 42);
    }

    #[test]
    fn attach_rejects_a_foreign_file() {
        let fd = sys::memfd("not-mk1").unwrap();
        sys::set_len(fd.as_fd(), 8192).unwrap();
        sys::commit(fd.as_fd(), 8192).unwrap();
        assert!(matches!(Segment::attach(fd), Err(ShmAttachError::Magic(0))));
        let fd = sys::memfd("tiny").unwrap();
        assert!(matches!(
            Segment::attach(fd),
            Err(ShmAttachError::Size { .. })
        ));
    }

    #[test]
    fn too_large_is_a_clear_error_not_a_crash() {
        let layout = Layout::new(1, 1, 1, &[(1 << 30, 1 << 14)]).unwrap(); // 16 TiB
        match Segment::create(layout) {
            Err(e @ ShmCreateError::TooLarge { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("16.0 TiB") && msg.contains("available"),
                    "{msg}"
                );
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a 16 TiB segment was created"),
        }
    }
}
