//! `map` over a lazy stream of arrays of mixed shapes: results come back in input order,
//! small arrays are packed many to a slot, and at most a bounded number are in flight, so the
//! stream can be any length. A failing array fails alone.
//!
//! `cargo run --release --example ordered_map`

use mk1::{Array, Pool, Shape, Task, TaskError};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    mk1::run_if_worker();
    let pool = Pool::builder().workers(2).build()?;
    let mut producer = pool.producer()?;
    let n = 200_000u32;
    // Arrays from 1x1 to 16x16, made as they are needed.
    let inputs = (0..n).map(|k| {
        let shape = Shape::d2(k % 16 + 1, (k / 16) % 16 + 1);
        let data = (0..shape.elements())
            .map(|i| (k as f64) + i as f64)
            .collect();
        Array::new(data, shape).expect("shape matches")
    });
    let start = std::time::Instant::now();
    let mut count = 0u32;
    for (k, result) in producer
        .map(&Task::op("affine:0.5,1")?, inputs)?
        .enumerate()
    {
        let out = result?;
        let k = k as u32;
        assert_eq!(
            out.shape(),
            Shape::d2(k % 16 + 1, (k / 16) % 16 + 1),
            "in input order"
        );
        assert_eq!(out.as_slice()[0], k as f64 * 0.5 + 1.0);
        count += 1;
    }
    println!(
        "{count} arrays in input order in {:.2} s ({:.0} arrays/s)",
        start.elapsed().as_secs_f64(),
        f64::from(count) / start.elapsed().as_secs_f64()
    );
    // The same stream, each result read where it lies in shared memory (`next_view` lends it
    // until the next call) instead of copied into an array of its own.
    let inputs = (0..n).map(|k| vec![k as f64; (k % 200 + 1) as usize]);
    let start = std::time::Instant::now();
    let mut map = producer.map(&Task::op("affine:0.5,1")?, inputs)?;
    let mut k = 0u32;
    while let Some(view) = map.next_view() {
        let view = view?;
        assert_eq!(
            view.as_slice().len(),
            (k % 200 + 1) as usize,
            "in input order"
        );
        assert!(view.as_slice().iter().all(|&x| x == k as f64 * 0.5 + 1.0));
        k += 1;
    }
    drop(map);
    // (Other arrays than the first stream's: the two times are not a comparison; `mk1 bench
    // library` compares reading in place with copying out.)
    println!(
        "{k} arrays read in place in input order in {:.2} s, every element checked",
        start.elapsed().as_secs_f64()
    );
    // An array too large for a slot is an error of its own; the others go on.
    let sizes = [10usize, 1 << 20, 10];
    let results: Vec<Result<Array<f64>, TaskError>> = producer
        .map(&Task::op("neg")?, sizes.iter().map(|&n| vec![1.0f64; n]))?
        .collect();
    assert!(results[0].is_ok() && results[2].is_ok());
    println!(
        "as expected, an oversized array failed alone (the arrays beside it succeeded): {}",
        results[1].as_ref().unwrap_err()
    );
    Ok(())
}
