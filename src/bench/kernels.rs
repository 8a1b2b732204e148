//! `mk1 bench kernels`: each kernel's throughput on an in-cache and an out-of-cache buffer.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::ops::typed::{ElemOp, TypedOp};
use crate::ops::{reference, Kernel, Kernels, Op};

/// The `op` of the out-of-place figure that copies the input, then applies the op in place.
pub const OUT_OF_PLACE_COPY: &str = "f32 affine, copy+op";
/// The `op` of the out-of-place figure that reads the input and writes the output in one pass.
pub const OUT_OF_PLACE_ONE_PASS: &str = "f32 affine, 1 pass";

/// The `op` of a copy out of a page-aligned buffer by one `memcpy`.
pub const COPY_MEMCPY: &str = "page -> +16, memcpy";
/// The same copy by `array::copy_elements`.
pub const COPY_MK1: &str = "page -> +16, mk1";

/// One kernel on one op at one buffer size.
#[derive(Debug, Clone, Serialize)]
pub struct KernelFigure {
    /// Kernel name.
    pub kernel: &'static str,
    /// `fill`, `verify:<op>` or the op applied in place.
    pub op: String,
    /// Buffer size in bytes.
    pub bytes: usize,
    /// Bytes processed per second, 1e9 (best of the trials).
    pub gb_per_s: f64,
}

/// Every available kernel, measured.
#[derive(Debug, Clone, Serialize)]
pub struct KernelReport {
    /// What `--kernel auto` picks on this machine.
    pub selected: &'static str,
    /// The measurements.
    pub kernels: Vec<KernelFigure>,
}

impl KernelReport {
    /// The rate measured for `kernel` on `op` at `bytes`, GB/s.
    pub fn rate(&self, kernel: &str, op: &str, bytes: usize) -> Option<f64> {
        self.kernels
            .iter()
            .find(|g| g.kernel == kernel && g.op == op && g.bytes == bytes)
            .map(|g| g.gb_per_s)
    }
}

/// Best GB/s of `trials` runs of about `each`, calling `f` once per pass over `bytes` bytes.
fn best_rate(bytes: usize, trials: u32, each: Duration, mut f: impl FnMut()) -> f64 {
    let mut best: f64 = 0.0;
    for _ in 0..trials {
        let start = Instant::now();
        let mut passes = 0u64;
        while start.elapsed() < each {
            f();
            passes += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        best = best.max(bytes as f64 * passes as f64 / secs / 1e9);
    }
    best
}

/// Measures fill, verify and every op for every available kernel at each size. Each kernel's
/// result is checked against the reference before it is timed.
pub fn measure_kernels(
    sizes: &[usize],
    trials: u32,
    each: Duration,
) -> Result<KernelReport, String> {
    let ops = [
        Op::Affine { a: 3, b: 1 },
        Op::Add(7),
        Op::Mul(-3),
        Op::Xor(0x5555),
        Op::Neg,
        Op::Abs,
    ];
    let mut figures = Vec::new();
    for &bytes in sizes {
        let n = bytes / 4;
        let mut want = vec![0i32; n];
        reference::fill(17, &mut want);
        let mut applied = want.clone();
        reference::apply(Op::default(), &mut applied);
        for kernel in Kernel::available() {
            let k = Kernels::new(kernel).map_err(|e| e.to_string())?;
            let mut buf = vec![0i32; n];
            k.fill(17, &mut buf);
            if buf != want {
                return Err(format!("{kernel} fill disagrees with the reference"));
            }
            k.apply(Op::default(), &mut buf);
            if buf != applied || k.verify(Op::default(), 17, &buf).is_some() {
                return Err(format!(
                    "{kernel} apply/verify disagrees with the reference"
                ));
            }
            let mut push = |op: String, rate: f64| {
                figures.push(KernelFigure {
                    kernel: kernel.name(),
                    op,
                    bytes,
                    gb_per_s: rate,
                })
            };
            let rate = best_rate(bytes, trials, each, || {
                k.fill(std::hint::black_box(17), &mut buf)
            });
            push("fill".into(), rate);
            k.fill(17, &mut buf);
            k.apply(Op::default(), &mut buf);
            let rate = best_rate(bytes, trials, each, || {
                assert!(k
                    .verify(Op::default(), std::hint::black_box(17), &buf)
                    .is_none());
            });
            push(format!("verify:{}", Op::default()), rate);
            for op in ops {
                let rate = best_rate(bytes, trials, each, || {
                    k.apply(std::hint::black_box(op), &mut buf)
                });
                push(op.to_string(), rate);
            }
            // Out of place, as a built-in op runs in an out-of-place pool (typed f32 affine):
            // the input read and the output written in one pass, against copying the input to
            // the output and applying the op there.
            // Input and output start a whole number of pages apart, as a slot's input and output
            // regions do (memcpy between buffers a few bytes out of step within a page can be
            // 20x slower on some CPUs; see `array::copy_elements`).
            let region = (n * 4).div_ceil(4096) * 1024;
            let mut both = vec![0f32; 2 * region + 1024];
            let skip = both.as_ptr().align_offset(4096);
            let (input, output) = both[skip..skip + 2 * region].split_at_mut(region);
            let (input, output) = (&mut input[..n], &mut output[..n]);
            input
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = (i % 4096) as f32);
            let (input, output): (&[f32], &mut [f32]) = (input, output);
            let affine = TypedOp::new(ElemOp::Affine { a: 3.0f32, b: 1.0 }).expect("valid");
            affine.apply_to(kernel, input, output);
            let mut copied = input.to_vec();
            affine.apply(kernel, &mut copied);
            if *output != copied[..] {
                return Err(format!(
                    "{kernel} out-of-place affine disagrees with in place"
                ));
            }
            let rate = best_rate(bytes, trials, each, || {
                output.copy_from_slice(std::hint::black_box(input));
                affine.apply(kernel, output);
            });
            push(OUT_OF_PLACE_COPY.into(), rate);
            let rate = best_rate(bytes, trials, each, || {
                affine.apply_to(kernel, std::hint::black_box(input), output)
            });
            push(OUT_OF_PLACE_ONE_PASS.into(), rate);
        }
    }
    // Copying a result out of a page-aligned slot into a buffer that starts 16 bytes into a
    // page (where glibc puts large blocks): one `memcpy`, and `array::copy_elements`.
    for &bytes in sizes {
        let mut space = vec![0u8; 2 * bytes + 3 * 4096];
        let base = space.as_ptr().align_offset(4096);
        let split = base + bytes.div_ceil(4096) * 4096;
        let (src, dst) = space.split_at_mut(split);
        let (src, dst) = (&src[base..base + bytes], &mut dst[16..16 + bytes]);
        for (name, f) in [
            (
                COPY_MEMCPY,
                (|d: &mut [u8], s: &[u8]| d.copy_from_slice(s)) as fn(&mut [u8], &[u8]),
            ),
            (COPY_MK1, crate::array::copy_elements::<u8>),
        ] {
            let rate = best_rate(bytes, trials, each, || f(dst, std::hint::black_box(src)));
            figures.push(KernelFigure {
                kernel: "copy",
                op: name.into(),
                bytes,
                gb_per_s: rate,
            });
        }
    }
    Ok(KernelReport {
        selected: Kernel::auto().name(),
        kernels: figures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_available_kernel_is_measured_for_every_op() {
        let r = measure_kernels(&[4096], 1, Duration::from_micros(200)).unwrap();
        let kernels = Kernel::available().len();
        assert_eq!(r.kernels.len(), kernels * 10 + 2);
        assert!(r
            .kernels
            .iter()
            .all(|f| f.gb_per_s > 0.0 && f.bytes == 4096));
    }
}
