//! mk1 moves matrices between processes through shared memory and runs elementwise work on
//! them in worker processes. Only tokens (slot indices with a generation) travel, through
//! single-producer single-consumer rings in one shared segment; the matrices never move.
//!
//! The layers, bottom up: [`sys`] (every syscall) → [`shm`] and [`layout`] (the segment) →
//! [`ring`], [`pool`], [`wait`] (the protocol) → [`ops`] (the kernels) → [`worker`] and
//! [`coordinator`] (the two roles) → [`Config`] / [`run`] (the API).
//!
//! ```no_run
//! // A program that runs a pipeline also serves as its worker: this returns at once in the
//! // coordinator and never returns in a worker. Call it first thing in `main`.
//! mk1::run_if_worker();
//! let report = mk1::Config::default()
//!     .workers(2)
//!     .max_dim(256)
//!     .stop(mk1::Stop::Count(100_000))
//!     .run()
//!     .expect("could not start");
//! println!("{report}");
//! assert!(report.verified);
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

#[cfg(not(loom))]
pub mod array;
pub mod dtype;
pub mod layout;
pub mod ops;
pub mod ring;
pub mod sync;
pub mod wait;

#[cfg(not(loom))]
pub mod bench;
#[cfg(not(loom))]
pub mod client;
#[cfg(not(loom))]
pub mod clock;
#[cfg(not(loom))]
pub mod config;
#[cfg(not(loom))]
pub mod coordinator;
#[cfg(not(loom))]
pub mod dispatch;
#[cfg(not(loom))]
pub mod job;
#[cfg(not(loom))]
pub mod limits;
#[cfg(not(loom))]
pub mod npy;
#[cfg(not(loom))]
pub mod pool;
#[cfg(not(loom))]
pub mod report;
#[cfg(not(loom))]
pub mod shm;
#[cfg(not(loom))]
pub mod sys;
#[cfg(not(loom))]
pub mod task;
#[cfg(not(loom))]
pub mod worker;

#[cfg(not(loom))]
pub use array::{Array, AsArray, Shape};
#[cfg(not(loom))]
pub use client::{
    Completion, Loan, LoanError, Map, MapUnordered, Mode, OutputView, Pool, PoolBuilder, PoolError,
    Producer, Rejected, SubmitError, Task, TaskError, Ticket,
};
#[cfg(not(loom))]
pub use config::{Batch, Config, ConfigError, DispatchKind, Pin, Stop, Wait};
#[cfg(not(loom))]
pub use coordinator::{run, Hooks, Progress, RunError};
#[cfg(not(loom))]
pub use dtype::{DType, Element};
#[cfg(not(loom))]
pub use ops::{Kernel, Op};
#[cfg(not(loom))]
pub use report::Report;
#[cfg(not(loom))]
pub use worker::{run_if_worker, run_if_worker_with};
