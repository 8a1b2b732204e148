//! What runs in a worker: user kernels registered by name ([`Registry`]), the built-in
//! elementwise ops ([`Builtin`]), and what a kernel is handed for each array ([`Args`]).
//!
//! A kernel is ordinary Rust compiled into the same program. The coordinator starts workers
//! by re-executing that program, so the program builds the same [`Registry`] in both roles and
//! hands it to [`crate::run_if_worker_with`] first thing in `main`; the pool checks, at start,
//! that every worker's registry has the same names and dtypes as its own.

mod builtin;
pub(crate) mod exec;
mod registry;

pub use builtin::{Builtin, BuiltinError, Value};
pub use registry::{Registry, WorkerInfo};

use crate::array::Shape;
use crate::dtype::{DType, Element};
use crate::layout::PARAM_BYTES;

/// Most parameter words a task carries.
pub const MAX_PARAMS: usize = PARAM_BYTES / 8;

/// A task's small parameters: up to [`MAX_PARAMS`] 8-byte words, each an `f64`, `i64` or
/// `u64` as the kernel reads it. They travel in the slot descriptor, not in the slot.
#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct Params {
    words: [u64; MAX_PARAMS],
    len: u8,
}

/// More parameters than fit a descriptor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} parameters; a task carries at most {MAX_PARAMS}")]
pub struct TooManyParams(pub usize);

impl Params {
    /// No parameters.
    pub fn none() -> Params {
        Params::default()
    }

    /// Parameters from raw words.
    ///
    /// # Errors
    /// More than [`MAX_PARAMS`] words.
    pub fn from_words(words: &[u64]) -> Result<Params, TooManyParams> {
        if words.len() > MAX_PARAMS {
            return Err(TooManyParams(words.len()));
        }
        let mut p = Params::default();
        p.words[..words.len()].copy_from_slice(words);
        p.len = words.len() as u8;
        Ok(p)
    }

    /// Parameters from `f64` values (read back with [`Params::f64`]).
    ///
    /// # Errors
    /// More than [`MAX_PARAMS`] values.
    pub fn from_f64(values: &[f64]) -> Result<Params, TooManyParams> {
        let words: Vec<u64> = values.iter().map(|v| v.to_bits()).collect();
        Params::from_words(&words)
    }

    /// Parameters from `i64` values (read back with [`Params::i64`]).
    ///
    /// # Errors
    /// More than [`MAX_PARAMS`] values.
    pub fn from_i64(values: &[i64]) -> Result<Params, TooManyParams> {
        let words: Vec<u64> = values.iter().map(|&v| v as u64).collect();
        Params::from_words(&words)
    }

    /// The words in use.
    pub fn words(&self) -> &[u64] {
        &self.words[..self.len as usize]
    }

    /// Number of words.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// No words.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Word `i` as raw bits.
    ///
    /// # Errors
    /// A [`KernelError`] naming the missing parameter.
    pub fn u64(&self, i: usize) -> Result<u64, KernelError> {
        self.words().get(i).copied().ok_or_else(|| {
            KernelError::new(format!(
                "parameter {i} is missing (the task has {})",
                self.len
            ))
        })
    }

    /// Word `i` as an `f64`.
    ///
    /// # Errors
    /// A [`KernelError`] naming the missing parameter.
    pub fn f64(&self, i: usize) -> Result<f64, KernelError> {
        self.u64(i).map(f64::from_bits)
    }

    /// Word `i` as an `i64`.
    ///
    /// # Errors
    /// A [`KernelError`] naming the missing parameter.
    pub fn i64(&self, i: usize) -> Result<i64, KernelError> {
        self.u64(i).map(|w| w as i64)
    }

    /// Writes the words in use into `out` (the rest is left as it is); returns their length
    /// in bytes.
    pub(crate) fn write_to(&self, out: &mut [u8; PARAM_BYTES]) -> u32 {
        for (i, w) in self.words().iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        u32::from(self.len) * 8
    }

    /// From descriptor bytes (untrusted `len`: `None` unless a multiple of 8 within the room).
    pub(crate) fn decode(bytes: &[u8; PARAM_BYTES], len: u32) -> Option<Params> {
        let len = len as usize;
        if len > PARAM_BYTES || !len.is_multiple_of(8) {
            return None;
        }
        let mut words = [0u64; MAX_PARAMS];
        for (w, c) in words.iter_mut().zip(bytes[..len].chunks_exact(8)) {
            *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        }
        Params::from_words(&words[..len / 8]).ok()
    }
}

/// Why a kernel failed one array: its message reaches the caller as
/// [`crate::TaskError::Kernel`]. Any `Display` error converts with `?` via [`KernelError::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelError(String);

impl KernelError {
    /// An error with this message (kept up to 256 bytes on its way back).
    pub fn new(message: impl std::fmt::Display) -> KernelError {
        KernelError(message.to_string())
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for KernelError {
    fn from(s: &str) -> KernelError {
        KernelError(s.to_string())
    }
}

impl From<String> for KernelError {
    fn from(s: String) -> KernelError {
        KernelError(s)
    }
}

/// The memory of one array, as a kernel sees it.
///
/// In place, the kernel reads its input and writes its result in the same elements. Out of
/// place, the input is mapped read-only in the worker (a write to it kills the worker with
/// SIGSEGV, and the task is redone elsewhere) and the output is separate: a kernel must write
/// every output element it wants the caller to see (the output region holds whatever the slot's
/// previous task left there).
pub enum Io<'a, T> {
    /// One buffer: input on entry, output on return.
    InPlace(&'a mut [T]),
    /// The input (read-only) and the output.
    OutOfPlace {
        /// The input elements, row-major.
        input: &'a [T],
        /// The output elements, row-major (the output shape's count).
        output: &'a mut [T],
    },
}

impl<T: Element> Io<'_, T> {
    /// The input elements (in place: the buffer, before the kernel changes it).
    pub fn input(&self) -> &[T] {
        match self {
            Io::InPlace(d) => d,
            Io::OutOfPlace { input, .. } => input,
        }
    }

    /// Applies `f` to every element: `output[i] = f(input[i])`, in either mode. Needs the
    /// output shape to have the input's element count (always true unless the task asked for
    /// another output shape).
    ///
    /// # Errors
    /// When the output does not have as many elements as the input.
    pub fn map(&mut self, f: impl Fn(T) -> T) -> Result<(), KernelError> {
        match self {
            Io::InPlace(d) => d.iter_mut().for_each(|x| *x = f(*x)),
            Io::OutOfPlace { input, output } => {
                if input.len() != output.len() {
                    return Err(KernelError::new(format!(
                        "map needs as many output elements as input elements ({} != {})",
                        output.len(),
                        input.len()
                    )));
                }
                output
                    .iter_mut()
                    .zip(input.iter())
                    .for_each(|(o, &x)| *o = f(x));
            }
        }
        Ok(())
    }
}

/// What a kernel gets for one array.
pub struct Args<'a, T> {
    /// The array's memory.
    pub io: Io<'a, T>,
    /// The input shape.
    pub shape: Shape,
    /// The output shape (the input's unless the task asked for another, out of place only).
    pub out_shape: Shape,
    /// The task's parameters.
    pub params: &'a Params,
    /// The task's context bytes (empty unless the task has some: [`crate::Task::context`]).
    pub context: &'a [u8],
    /// Which worker runs it (`0..workers`).
    pub worker: u32,
}

/// The memory of one array as bytes, for a kernel that takes any dtype and decides its
/// output's dtype and shape ([`Registry::kernel_any_dtype`]).
pub enum AnyIo<'a> {
    /// One buffer: the input's bytes at its start on entry, the output's on return. It is the
    /// array's whole space in the slot, which may be larger than the input.
    InPlace(&'a mut [u8]),
    /// The input's bytes (read-only) and the output's whole space.
    OutOfPlace {
        /// Exactly the input's bytes, row-major.
        input: &'a [u8],
        /// Room for the output, from its first byte (larger than the input unless packed).
        output: &'a mut [u8],
    },
}

/// What a [`Registry::kernel_any_dtype`] kernel gets for one array.
pub struct AnyArgs<'a> {
    /// The array's memory.
    pub io: AnyIo<'a>,
    /// The input's dtype.
    pub dtype: DType,
    /// The input's shape.
    pub shape: Shape,
    /// The task's parameters.
    pub params: &'a Params,
    /// The task's context bytes.
    pub context: &'a [u8],
    /// Which worker runs it (`0..workers`).
    pub worker: u32,
}

/// What a [`Registry::kernel_any_dtype`] kernel wrote at the start of its output space: the
/// dtype and shape of a row-major, contiguous array. The worker checks that it fits the space;
/// the caller's completion reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Output {
    /// The output's dtype.
    pub dtype: DType,
    /// The output's shape.
    pub shape: Shape,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip_through_descriptor_bytes() {
        let p = Params::from_f64(&[3.0, -1.5]).unwrap();
        let mut b = [0u8; PARAM_BYTES];
        let len = p.write_to(&mut b);
        assert_eq!(len, 16);
        let q = Params::decode(&b, len).unwrap();
        assert_eq!(q.f64(1).unwrap(), -1.5);
        assert!(q.f64(2).unwrap_err().message().contains("parameter 2"));
        assert_eq!(Params::decode(&b, 12), None);
        assert_eq!(Params::decode(&b, 136), None);
        assert!(Params::from_i64(&[0; 17]).is_err());
        assert_eq!(Params::from_i64(&[-2]).unwrap().i64(0).unwrap(), -2);
    }

    #[test]
    fn io_map_works_in_both_modes() {
        let mut a = [1i32, 2, 3];
        Io::InPlace(&mut a).map(|x| x * 3 + 1).unwrap();
        assert_eq!(a, [4, 7, 10]);
        let mut out = [0i32; 3];
        let mut io = Io::OutOfPlace {
            input: &a,
            output: &mut out,
        };
        io.map(|x| x - 1).unwrap();
        assert_eq!(out, [3, 6, 9]);
        let mut short = [0i32; 2];
        let mut io = Io::OutOfPlace {
            input: &a,
            output: &mut short,
        };
        assert!(io.map(|x| x).is_err());
    }
}
