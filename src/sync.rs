//! The atomics every shared structure is built from.
//!
//! Under `cfg(loom)` these are loom's model-checked types, so the ring protocol can be explored
//! exhaustively (`tests/loom_ring.rs`). Everywhere else they are the core atomics, whose layout
//! (`repr(C)`-compatible, same size and alignment as the integer) is what the shared-memory ABI
//! relies on. `clippy.toml` forbids naming the core types directly anywhere else.

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(not(loom))]
#[allow(clippy::disallowed_types)]
pub use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// A CPU hint for busy-wait loops (loom: a yield point, so spinning models terminate).
#[inline(always)]
pub fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}
