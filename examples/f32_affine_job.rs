//! The Python benchmark's built-in-op job, driven from Rust: float32 arrays of random shapes
//! up to `MAX_DIM` x `MAX_DIM` (integer values, so `x * 3 + 1` is exact), `affine:3,1` in the
//! workers through `map`, every result checked. Prints one JSON line with the time taken, for
//! `python/bench/bench_python.py` to compare the same job from Python against.
//!
//! `cargo run --release --example f32_affine_job -- ARRAYS MAX_DIM WORKERS [MAX_ARRAY_BYTES [nocheck]]`
//!
//! With `nocheck` the results are only received, not checked: what the bindings cost shows.

use mk1::{Array, Pool, Shape, Task};
use rand::{Rng, SeedableRng};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    mk1::run_if_worker();
    let check = std::env::args().nth(5).as_deref() != Some("nocheck");
    let mut args = std::env::args().skip(1).take(4).map(|a| a.parse::<u64>());
    let usage = "usage: f32_affine_job ARRAYS MAX_DIM WORKERS [MAX_ARRAY_BYTES [nocheck]]";
    let n = args.next().ok_or(usage)??;
    let max_dim = args.next().ok_or(usage)?? as u32;
    let workers = args.next().ok_or(usage)?? as u32;
    let max_bytes = args.next().transpose()?.unwrap_or(4 << 20);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    let inputs: Vec<Array<f32>> = (0..n)
        .map(|_| {
            let shape = Shape::d2(rng.random_range(1..=max_dim), rng.random_range(1..=max_dim));
            let data = (0..shape.elements())
                .map(|_| rng.random_range(0..1000) as f32)
                .collect();
            Array::new(data, shape).expect("shape matches")
        })
        .collect();
    let pool = Pool::builder()
        .workers(workers)
        .max_array_bytes(max_bytes)
        .build()?;
    let mut producer = pool.producer()?;
    let task = Task::op("affine:3,1")?;
    let start = std::time::Instant::now();
    let mut count = 0u64;
    for (input, result) in inputs.iter().zip(producer.map(&task, inputs.iter())?) {
        let out = result?;
        if !check {
            count += 1;
            continue;
        }
        let ok = out
            .as_slice()
            .iter()
            .zip(input.as_slice())
            .all(|(&y, &x)| y == x * 3.0 + 1.0);
        assert!(ok && out.shape() == input.shape(), "array {count} is wrong");
        count += 1;
    }
    let seconds = start.elapsed().as_secs_f64();
    println!("{{\"arrays\": {count}, \"seconds\": {seconds}}}");
    Ok(())
}
