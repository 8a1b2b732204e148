//! The atomics every shared structure is built from.
//!
//! Under `cfg(loom)` these are loom's model-checked types, so the ring protocol can be explored
//! exhaustively (`tests/loom_ring.rs`). Everywhere else they are the core atomics, whose layout
//! (`repr(C)`-compatible, same size and alignment as the integer) is what the shared-memory ABI
//! relies on. `tests/hygiene.rs` fails if any other module names the core 32/64-bit atomics.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(not(loom))]
pub use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// A CPU hint for busy-wait loops (loom: a yield point, so spinning models terminate).
#[inline(always)]
pub fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}

/// A number unique within this process, never 0: an identity for caches, not a word of the
/// shared protocol (so the core atomic, under loom too).
pub(crate) fn unique_id() -> u64 {
    static NEXT: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, core::sync::atomic::Ordering::Relaxed)
}
