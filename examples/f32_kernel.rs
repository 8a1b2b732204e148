//! A user kernel on float32 arrays with per-worker state, driven through loan → submit → recv.
//!
//! Each worker builds a lookup table once (its init hook), then every array it gets is mapped
//! through `y = a*x + b` followed by a soft clip from the table. The caller keeps every slot
//! busy, checks each result in shared memory without copying it, and reuses the slot for the
//! next input.
//!
//! `cargo run --release --example f32_kernel`

use std::collections::HashMap;
use std::time::Instant;

use mk1::task::{KernelError, Params, Registry};
use mk1::{Pool, Shape, Task};

/// Soft clip of `v` to (-1, 1) from a table of 4097 points over [-4, 4].
struct Clip {
    table: Vec<f32>,
}

impl Clip {
    fn new() -> Clip {
        let table = (0..=4096)
            .map(|i| ((i as f32 / 512.0) - 4.0).tanh())
            .collect();
        Clip { table }
    }
    fn apply(&self, v: f32) -> f32 {
        let i = ((v + 4.0) * 512.0).clamp(0.0, 4096.0) as usize;
        self.table[i]
    }
}

/// The same registry in the coordinator and in every worker (this program is both).
fn kernels() -> Registry {
    Registry::new().kernel_with_state::<f32, Clip>(
        "affine_clip",
        |info| {
            eprintln!(
                "worker {} of {} builds its table",
                info.worker, info.workers
            );
            Ok(Clip::new())
        },
        |clip, mut a| {
            let (s, t) = (a.params.f64(0)? as f32, a.params.f64(1)? as f32);
            if !s.is_finite() {
                return Err(KernelError::new("the scale must be finite"));
            }
            a.io.map(|x| clip.apply(x * s + t))
        },
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // First thing: in a worker process this serves tasks and never returns.
    mk1::run_if_worker_with(&kernels());

    let pool = Pool::builder().workers(2).kernels(kernels()).build()?;
    let producer = pool.producer()?;
    let task = Task::kernel("affine_clip").params(Params::from_f64(&[0.01, -0.5])?);
    let reference = Clip::new();
    let shape = Shape::d2(256, 256);
    let total = 2_000u64;
    let start = Instant::now();
    let mut seq_of = HashMap::new();
    let (mut sent, mut checked) = (0u64, 0u64);
    let fill = |x: &mut [f32], seq: u64| {
        for (i, v) in x.iter_mut().enumerate() {
            *v = ((i as u64 + seq) % 100) as f32;
        }
    };
    // Fill every slot once, then refill each slot as its result is checked.
    while sent < total {
        let Ok(mut loan) = producer.try_loan::<f32>(shape) else {
            break;
        };
        fill(loan.as_mut_slice(), sent);
        seq_of.insert(
            producer
                .submit(loan, &task)
                .map_err(mk1::SubmitError::from)?,
            sent,
        );
        sent += 1;
    }
    while let Some(done) = producer.recv() {
        let seq = seq_of.remove(&done.ticket()).expect("our ticket");
        let out = done.output::<f32>()?;
        for (i, &y) in out.as_slice().iter().enumerate() {
            let x = ((i as u64 + seq) % 100) as f32;
            assert_eq!(
                y,
                reference.apply(x * 0.01 - 0.5),
                "array {seq} element {i}"
            );
        }
        checked += 1;
        if sent < total {
            let mut loan = done.reuse::<f32>(shape)?;
            fill(loan.as_mut_slice(), sent);
            seq_of.insert(
                producer
                    .submit(loan, &task)
                    .map_err(mk1::SubmitError::from)?,
                sent,
            );
            sent += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{checked} arrays of {shape} float32 through 2 worker processes in {secs:.2} s ({:.0} arrays/s, {:.2} GB/s), every element checked",
        checked as f64 / secs,
        checked as f64 * shape.bytes(mk1::DType::F32) as f64 / secs / 1e9
    );
    Ok(())
}
