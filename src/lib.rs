//! mk1 runs your kernels on your arrays in worker processes, through shared memory: only
//! tokens (slot indices with a generation) travel, through single-producer single-consumer
//! rings in one shared segment; the arrays never move.
//!
//! The library: a [`Pool`] of worker processes (this same program, re-executed), a
//! [`Producer`] handle per submitting thread to loan a slot, write an array of any of ten
//! dtypes into it, submit it with a [`Task`] (a kernel registered in a [`task::Registry`], or a
//! built-in op) and receive its [`Completion`] with zero-copy access to the result; and
//! [`Producer::map`] over any number of arrays. See the README for the guarantees of each mode.
//!
//! ```no_run
//! use mk1::task::{Params, Registry};
//! use mk1::{Pool, Shape, Task};
//!
//! fn kernels() -> Registry {
//!     Registry::new().kernel::<f32>("affine", |mut a| {
//!         let (s, t) = (a.params.f64(0)? as f32, a.params.f64(1)? as f32);
//!         a.io.map(|x| x * s + t)
//!     })
//! }
//!
//! // A worker serves here and never returns; call it first thing in `main`.
//! mk1::run_if_worker_with(&kernels());
//! let pool = Pool::builder().workers(2).kernels(kernels()).build().expect("pool");
//! let producer = pool.producer().expect("a handle");
//! let mut loan = producer.loan::<f32>(Shape::d2(256, 256)).expect("a slot");
//! loan.as_mut_slice().fill(1.0);
//! let task = Task::kernel("affine").params(Params::from_f64(&[3.0, 1.0]).unwrap());
//! producer.submit(loan, &task).expect("submitted");
//! let done = producer.recv().expect("one task in flight");
//! assert!(done.output::<f32>().unwrap().as_slice().iter().all(|&y| y == 4.0));
//! ```
//!
//! The seed's synthetic job (`mk1 run`) is [`Config::run`]: it fills int32 matrices, applies
//! one op in the workers and verifies every element.
//!
//! The layers, bottom up: [`sys`] (every syscall) → [`shm`] and [`layout`] (the segment) →
//! [`ring`], [`pool`], [`wait`] (the protocol) → [`ops`] (the kernels) → [`worker`],
//! [`coordinator`] (the monitor and the seed's job) and [`client`] (the library) → [`task`]
//! (what runs in a worker).

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

#[cfg(all(not(loom), feature = "cli"))]
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
#[cfg(all(not(loom), feature = "cli"))]
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
    Completion, Interrupter, Loan, LoanError, Map, MapUnordered, Mode, OutputView, PackedLoan,
    Pool, PoolBuilder, PoolError, Producer, Rejected, RejectedPacked, Shutdown, SubmitError, Task,
    TaskError, Ticket, ViewOutcome,
};
#[cfg(not(loom))]
pub use config::{Batch, Config, ConfigError, DispatchKind, Pin, Stop, Wait};
#[cfg(not(loom))]
pub use coordinator::RunError;
#[cfg(not(loom))]
pub use dtype::{DType, Element};
#[cfg(not(loom))]
pub use job::{run, Hooks, Progress};
#[cfg(not(loom))]
pub use ops::{Kernel, Op};
#[cfg(not(loom))]
pub use report::Report;
#[cfg(not(loom))]
pub use worker::{run_if_worker, run_if_worker_with};
