//! An image-like pipeline on uint8: each 480x640 "frame" is inverted by a built-in op, then
//! blurred by a user kernel (3x3 box, out of place, with a per-worker scratch row), with the
//! frames streamed through a bounded `map`. A worker that dies mid-frame is replaced and the
//! frame redone from its read-only input: kill one with `pkill -9 mk1-worker-0` while it runs
//! and every frame still comes out right.
//!
//! `cargo run --release --example u8_pipeline [ROUNDS]`: ROUNDS times 200 frames (default 1;
//! about 0.5 s a round on 2 cores, so `-- 60` leaves time to kill a worker by hand).

use mk1::task::{Io, KernelError, Registry};
use mk1::{Array, Pool, Shape, Task};

const H: u32 = 480;
const W: u32 = 640;

fn blur(input: &[u8], output: &mut [u8], rows: usize, cols: usize, sums: &mut Vec<u16>) {
    // Vertical 3-sums of one output row, then horizontal.
    sums.resize(cols, 0);
    for r in 0..rows {
        let up = r.saturating_sub(1);
        let down = (r + 1).min(rows - 1);
        for c in 0..cols {
            sums[c] = u16::from(input[up * cols + c])
                + u16::from(input[r * cols + c])
                + u16::from(input[down * cols + c]);
        }
        for c in 0..cols {
            let l = c.saturating_sub(1);
            let rr = (c + 1).min(cols - 1);
            output[r * cols + c] = ((sums[l] + sums[c] + sums[rr]) / 9) as u8;
        }
    }
}

fn kernels() -> Registry {
    Registry::new().kernel_with_state::<u8, Vec<u16>>(
        "box3",
        |_| Ok(Vec::new()),
        |sums, a| {
            let [rows, cols] = a.shape.dims() else {
                return Err(KernelError::new(format!(
                    "box3 takes 2-D frames, got {}",
                    a.shape
                )));
            };
            match a.io {
                Io::OutOfPlace { input, output } => {
                    blur(input, output, *rows as usize, *cols as usize, sums);
                    Ok(())
                }
                Io::InPlace(_) => Err(KernelError::new("box3 needs an out-of-place pool")),
            }
        },
    )
}

fn frame(k: u32) -> Array<u8> {
    let data = (0..H * W)
        .map(|i| ((i % W + i / W + 7 * k) % 256) as u8)
        .collect();
    Array::new(data, Shape::d2(H, W)).expect("shape matches")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    mk1::run_if_worker_with(&kernels());
    let pool = Pool::builder().workers(2).kernels(kernels()).build()?;
    let mut producer = pool.producer()?;
    let rounds: u32 = match std::env::args().nth(1) {
        Some(a) => a
            .parse()
            .map_err(|_| format!("ROUNDS must be a count, got {a:?}"))?,
        None => 1,
    };
    let frames = 200;
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        round(&mut producer, frames)?;
    }
    println!(
        "{} frames of {H}x{W} uint8 inverted and blurred in worker processes in {:.2} s, every pixel checked ({} worker restarts)",
        rounds * frames,
        start.elapsed().as_secs_f64(),
        pool.restarts()
    );
    Ok(())
}

/// One round: `frames` frames inverted, then blurred, every pixel checked.
fn round(producer: &mut mk1::Producer<'_>, frames: u32) -> Result<(), Box<dyn std::error::Error>> {
    // Stage 1: invert every frame (a built-in op: no user code runs).
    let inverted: Vec<Array<u8>> = producer
        .map(&Task::op("xor:255")?, (0..frames).map(frame))?
        .collect::<Result<_, _>>()?;
    // Stage 2: blur.
    let mut scratch = Vec::new();
    for (k, out) in producer.map(&Task::kernel("box3"), &inverted)?.enumerate() {
        let out = out?;
        let mut want = vec![0u8; (H * W) as usize];
        blur(
            inverted[k].as_slice(),
            &mut want,
            H as usize,
            W as usize,
            &mut scratch,
        );
        assert_eq!(out.as_slice(), &want[..], "frame {k}");
        assert_eq!(
            frame(k as u32).as_slice()[0] ^ 255,
            inverted[k].as_slice()[0]
        );
    }
    Ok(())
}
