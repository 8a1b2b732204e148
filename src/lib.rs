//! mk1: move matrices between processes through shared memory and run elementwise work on them
//! in worker processes. Only tokens (slot indices) travel; matrices stay in one shared segment.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod layout;
pub mod ops;
pub mod ring;
pub mod sync;
#[cfg(not(loom))]
pub mod sys;
