//! What a run is asked to do ([`Config`], a builder with validated fields), and how that turns
//! into a segment layout ([`Plan`]): slot size classes, batching, ring capacity.
//!
//! Everything here is checked before any memory is committed or any process started, so a bad
//! request is a [`ConfigError`] (exit 2), never a failure half-way through a run.

use std::path::PathBuf;
use std::time::Duration;

pub use crate::dispatch::DispatchKind;
use crate::layout::{Layout, LayoutError, MATRIX_ALIGN, MAX_PRODUCERS, MAX_WORKERS, PAGE};
use crate::ops::{Kernel, Op};

/// Largest `--max-dim`: a 16384 × 16384 int32 matrix is 1 GiB, the largest slot.
pub const MAX_DIM: u32 = 16384;
/// Most tokens in flight per worker.
pub const MAX_INFLIGHT: u32 = 4096;
/// `--batch auto` packs matrices when `max_dim` is at most this.
pub const AUTO_BATCH_MAX_DIM: u32 = 64;
/// Target size of a batching slot.
pub const BATCH_SLOT_BYTES: u64 = 64 << 10;

/// When a run stops issuing new matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this long.
    After(Duration),
    /// After this many matrices have been issued.
    Count(u64),
}

/// Most matrices `mk1 run` packs into one task (`--batch`; a task carries at most
/// [`crate::layout::MAX_ITEMS`] arrays, so caps above that act as that).
pub const MAX_BATCH: usize = 64;

/// How many matrices one token may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// Pack small matrices (max dim <= [`AUTO_BATCH_MAX_DIM`]) up to [`MAX_BATCH`] per token.
    Auto,
    /// One matrix per token.
    Off,
    /// At most this many per token (1..=[`MAX_BATCH`]).
    Max(u32),
}

/// How producers and workers wait for each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Spin, then yield, then sleep; spin long only when every busy thread has a CPU.
    Auto,
    /// Sleep on the futex at once (for measuring the wake-up path).
    Sleep,
}

/// Whether to pin producers and workers to distinct CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// Pin when every producer and worker can have a CPU of its own.
    Auto,
    /// Never pin.
    Off,
}

/// A pipeline run, built with chained setters and checked by [`Config::plan`].
///
/// ```no_run
/// use mk1::{Config, Stop};
/// use std::time::Duration;
/// mk1::run_if_worker(); // first thing in main: this program also serves as the worker
/// let report = Config::default()
///     .workers(2)
///     .max_dim(128)
///     .stop(Stop::After(Duration::from_secs(1)))
///     .run()
///     .expect("run failed to start");
/// assert!(report.verified);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Worker processes.
    pub workers: u32,
    /// Producer threads.
    pub producers: u32,
    /// When to stop issuing.
    pub stop: Stop,
    /// Smallest rows/cols.
    pub min_dim: u32,
    /// Largest rows/cols.
    pub max_dim: u32,
    /// Tokens in flight per worker.
    pub inflight: u32,
    /// Worker choice.
    pub dispatch: DispatchKind,
    /// The op.
    pub op: Op,
    /// Seed for shapes, dispatch and fill.
    pub seed: u64,
    /// Matrices per token.
    pub batch: Batch,
    /// Kernel for fill, op and verify.
    pub kernel: Kernel,
    /// CPU placement.
    pub pin: Pin,
    /// Waiting strategy.
    pub wait: Wait,
    /// Worker restarts allowed before the run gives up.
    pub max_restarts: u32,
    /// A worker holding tokens that makes no progress for this long is killed.
    pub worker_timeout: Duration,
    /// Program to start as the worker (default: the current executable).
    pub worker_exe: Option<PathBuf>,
    /// Arguments and environment the worker program is started with.
    pub worker_launch: crate::sys::Launch,
    /// How long a worker may take from its start to attaching (and running its kernels' init
    /// hooks) before it counts as failed to start.
    pub start_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: default_workers(),
            producers: 1,
            stop: Stop::After(Duration::from_secs(20)),
            min_dim: 1,
            max_dim: 128,
            inflight: 4,
            dispatch: DispatchKind::Random,
            op: Op::default(),
            seed: 1,
            batch: Batch::Auto,
            kernel: Kernel::auto(),
            pin: Pin::Auto,
            wait: Wait::Auto,
            max_restarts: 100,
            worker_timeout: Duration::from_secs(5),
            worker_exe: None,
            worker_launch: crate::sys::Launch::default(),
            start_timeout: crate::coordinator::START_TIMEOUT,
        }
    }
}

/// Cores − 1 (one is the producer's), at least 1.
pub fn default_workers() -> u32 {
    (crate::sys::online_cpus().saturating_sub(1)).max(1) as u32
}

macro_rules! setters {
    ($($(#[$m:meta])* $name:ident: $t:ty),* $(,)?) => {
        $( $(#[$m])* pub fn $name(mut self, v: $t) -> Self { self.$name = v; self } )*
    };
}

impl Config {
    setters! {
        /// Sets the worker count.
        workers: u32,
        /// Sets the producer thread count.
        producers: u32,
        /// Sets when to stop.
        stop: Stop,
        /// Sets the smallest dimension.
        min_dim: u32,
        /// Sets the largest dimension.
        max_dim: u32,
        /// Sets tokens in flight per worker.
        inflight: u32,
        /// Sets the dispatch policy.
        dispatch: DispatchKind,
        /// Sets the op.
        op: Op,
        /// Sets the seed.
        seed: u64,
        /// Sets batching.
        batch: Batch,
        /// Sets the kernel.
        kernel: Kernel,
        /// Sets CPU placement.
        pin: Pin,
        /// Sets the waiting strategy.
        wait: Wait,
        /// Sets the restart budget.
        max_restarts: u32,
        /// Sets the stall timeout.
        worker_timeout: Duration,
    }

    /// Sets the worker program (it must call [`crate::run_if_worker`] first thing).
    pub fn worker_exe(mut self, path: impl Into<PathBuf>) -> Self {
        self.worker_exe = Some(path.into());
        self
    }

    /// Runs the seed's job; see [`crate::job::run`].
    pub fn run(&self) -> Result<crate::Report, crate::RunError> {
        crate::job::run(self, &crate::job::Hooks::default())
    }

    /// Matrices per token this configuration uses.
    pub fn batch_cap(&self) -> u32 {
        match self.batch {
            Batch::Off => 1,
            Batch::Max(n) => n,
            Batch::Auto if self.max_dim <= AUTO_BATCH_MAX_DIM => MAX_BATCH as u32,
            Batch::Auto => 1,
        }
    }

    /// Checks every field and computes the segment layout.
    pub fn plan(&self) -> Result<Plan, ConfigError> {
        let bad = |what: &'static str, why: String| Err(ConfigError { what, why });
        if self.workers == 0 || self.workers > MAX_WORKERS {
            return bad(
                "--workers",
                format!("{} is outside 1..={MAX_WORKERS}", self.workers),
            );
        }
        if self.producers == 0 || self.producers > MAX_PRODUCERS {
            return bad(
                "--producers",
                format!("{} is outside 1..={MAX_PRODUCERS}", self.producers),
            );
        }
        if self.min_dim == 0 || self.max_dim == 0 {
            return bad("--min-dim/--max-dim", "dimensions start at 1".into());
        }
        if self.max_dim > MAX_DIM {
            return bad(
                "--max-dim",
                format!("{} is above {MAX_DIM} (a 1 GiB matrix)", self.max_dim),
            );
        }
        if self.min_dim > self.max_dim {
            return bad(
                "--min-dim",
                format!("{} is above --max-dim {}", self.min_dim, self.max_dim),
            );
        }
        if self.inflight == 0 || self.inflight > MAX_INFLIGHT {
            return bad(
                "--inflight",
                format!("{} is outside 1..={MAX_INFLIGHT}", self.inflight),
            );
        }
        match self.stop {
            Stop::After(d) if d.is_zero() => {
                return bad("--duration", "must be more than 0".into())
            }
            Stop::Count(0) => return bad("--count", "must be at least 1".into()),
            _ => {}
        }
        if let Batch::Max(n) = self.batch {
            if n == 0 || n as usize > MAX_BATCH {
                return bad("--batch", format!("{n} is outside 1..={MAX_BATCH}"));
            }
        }
        if self.worker_timeout.is_zero() {
            return bad("--worker-timeout", "must be more than 0".into());
        }
        if let Err(e) = crate::ops::Kernels::new(self.kernel) {
            return bad("--kernel", e.to_string());
        }
        Plan::new(self).map_err(|e| ConfigError {
            what: "layout",
            why: e.to_string(),
        })
    }
}

/// A configuration that cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {why}")]
pub struct ConfigError {
    /// The flag or field at fault.
    pub what: &'static str,
    /// Why.
    pub why: String,
}

/// The segment plan derived from a [`Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Where everything goes.
    pub layout: Layout,
    /// Matrices per token.
    pub batch_cap: u32,
    /// Tokens each producer may have out at once (its share of `workers * inflight`).
    pub out_limit: Vec<u32>,
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Bytes a matrix takes in a slot.
pub fn matrix_bytes(rows: u32, cols: u32) -> u64 {
    align(u64::from(rows) * u64::from(cols) * 4, MATRIX_ALIGN)
}

/// Slot size for a class holding matrices up to `bytes`.
fn slot_size(bytes: u64) -> u64 {
    if bytes >= PAGE {
        align(bytes, PAGE)
    } else {
        align(bytes, MATRIX_ALIGN)
    }
}

impl Plan {
    fn new(c: &Config) -> Result<Plan, LayoutError> {
        let max_bytes = matrix_bytes(c.max_dim, c.max_dim);
        let tokens = u64::from(c.workers) * u64::from(c.inflight);
        let p = u64::from(c.producers);
        let batch_cap = c.batch_cap();
        let span = u64::from(c.max_dim - c.min_dim + 1);
        // How many of the span² equally likely shapes need at most `bytes`.
        let shapes_within = |bytes: u64| -> u64 {
            let elems = bytes / 4;
            (c.min_dim..=c.max_dim)
                .map(|r| {
                    (elems / u64::from(r)).clamp(u64::from(c.min_dim) - 1, u64::from(c.max_dim)) + 1
                        - u64::from(c.min_dim)
                })
                .sum()
        };
        let classes: Vec<(u64, u32)> = if batch_cap > 1 {
            // One class of batching slots, each able to hold at least one largest matrix.
            let mean = if span <= 1024 {
                let total: u64 = (c.min_dim..=c.max_dim)
                    .flat_map(|r| (c.min_dim..=c.max_dim).map(move |k| matrix_bytes(r, k)))
                    .sum();
                total / (span * span)
            } else {
                let m = u64::from(c.min_dim + c.max_dim) / 2;
                matrix_bytes(m as u32, m as u32)
            };
            let want = (mean * u64::from(batch_cap)).min(BATCH_SLOT_BYTES);
            vec![(slot_size(want.max(max_bytes)), tokens.max(p) as u32)]
        } else {
            // Size classes growing ×4 from 4 KiB up to the largest matrix; each gets tokens in
            // proportion to how many shapes need exactly it, the largest at least one per
            // producer (a producer falls back to a larger class when its own is empty).
            let mut sizes = Vec::new();
            let mut s = slot_size(max_bytes.min(PAGE));
            while s < max_bytes && sizes.len() + 1 < crate::layout::MAX_CLASSES {
                sizes.push(s);
                s *= 4;
            }
            sizes.push(slot_size(max_bytes));
            let all = span * span;
            let mut below = 0;
            let mut out = Vec::new();
            for (i, &size) in sizes.iter().enumerate() {
                let within = if i + 1 == sizes.len() {
                    all
                } else {
                    shapes_within(size)
                };
                let share = within - below;
                below = within;
                let mut count = (tokens * share).div_ceil(all);
                if i + 1 == sizes.len() {
                    count = count.max(p);
                }
                if count > 0 {
                    out.push((size, count as u32));
                }
            }
            out
        };
        let per_producer: u64 = classes.iter().map(|&(_, n)| u64::from(n).div_ceil(p)).sum();
        let capacity = u32::try_from(per_producer)
            .map_err(|_| LayoutError::Inconsistent("too many tokens"))?;
        let layout = Layout::new(c.workers, c.producers, capacity, &classes)?;
        let out_limit = (0..p)
            .map(|i| ((tokens * (i + 1) / p) - (tokens * i / p)).max(1) as u32)
            .collect();
        Ok(Plan {
            layout,
            batch_cap,
            out_limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_plan() {
        let p = Config::default().plan().unwrap();
        assert!(p.layout.total_bytes() > 0);
        assert_eq!(
            p.out_limit.iter().sum::<u32>(),
            Config::default().workers * 4
        );
    }

    #[test]
    fn bad_values_are_rejected_with_the_flag_name() {
        let c = Config::default();
        for (cfg, flag) in [
            (c.clone().workers(0), "--workers"),
            (c.clone().producers(0), "--producers"),
            (c.clone().max_dim(0), "--min-dim/--max-dim"),
            (c.clone().min_dim(9).max_dim(8), "--min-dim"),
            (c.clone().max_dim(MAX_DIM + 1), "--max-dim"),
            (c.clone().inflight(0), "--inflight"),
            (c.clone().stop(Stop::Count(0)), "--count"),
            (c.clone().stop(Stop::After(Duration::ZERO)), "--duration"),
            (c.clone().batch(Batch::Max(0)), "--batch"),
            (c.clone().batch(Batch::Max(65)), "--batch"),
        ] {
            assert_eq!(cfg.plan().unwrap_err().what, flag);
        }
    }

    #[test]
    fn size_classes_cover_every_shape_and_save_memory() {
        let c = Config::default()
            .workers(2)
            .inflight(8)
            .max_dim(1024)
            .batch(Batch::Off);
        let plan = c.plan().unwrap();
        let classes = plan.layout.classes();
        assert!(classes.len() > 1);
        assert!(classes.last().unwrap().slot_bytes >= 1024 * 1024 * 4);
        let data: u64 = classes
            .iter()
            .map(|k| k.slot_bytes * u64::from(k.count))
            .sum();
        assert!(
            data < 16 * 4 * 1024 * 1024,
            "classes reserve less than 16 × 4 MiB: {data}"
        );
        assert!(plan.layout.slots() >= 16);
    }

    #[test]
    fn batching_uses_one_class_that_fits_the_largest_matrix() {
        let c = Config::default().max_dim(16);
        assert_eq!(c.batch_cap(), MAX_BATCH as u32);
        let plan = c.plan().unwrap();
        assert_eq!(plan.layout.classes().len(), 1);
        assert!(plan.layout.classes()[0].slot_bytes >= matrix_bytes(16, 16));
        assert_eq!(Config::default().max_dim(128).batch_cap(), 1);
        assert_eq!(
            Config::default()
                .max_dim(128)
                .batch(Batch::Max(8))
                .batch_cap(),
            8
        );
    }

    #[test]
    fn ring_capacity_holds_every_token_of_a_producer() {
        for producers in 1..4 {
            let c = Config::default()
                .workers(3)
                .producers(producers)
                .max_dim(1024)
                .batch(Batch::Off);
            let plan = c.plan().unwrap();
            let l = &plan.layout;
            let cap = l.params().ring_capacity as u64;
            for p in 0..producers {
                let share = crate::pool::SlotPool::share(l, p, producers).len() as u64;
                assert!(
                    share <= cap && share > 0,
                    "producer {p}: {share} tokens, capacity {cap}"
                );
            }
        }
    }
}
