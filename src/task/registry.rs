//! User kernels by name: what a program registers, identically in the coordinator and in its
//! workers (the same code builds both), so that a task can name a kernel by its index.

use std::any::Any;
use std::fmt::Write as _;

use super::{AnyArgs, Args, KernelError, Output};
use crate::dtype::{DType, Element};

/// Who runs a kernel: handed to per-worker init hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerInfo {
    /// This worker's index, `0..workers` (a replacement keeps the index of the worker it
    /// replaces).
    pub worker: u32,
    /// Workers in the pool.
    pub workers: u32,
}

/// The type-erased kernel: state, then the raw call.
pub(crate) type RunFn = dyn Fn(&mut dyn Any, &mut super::exec::RawCall<'_>) -> Result<Option<Output>, KernelError>
    + Send
    + Sync;
type InitFn = dyn Fn(&WorkerInfo) -> Result<Box<dyn Any>, KernelError> + Send + Sync;

pub(crate) struct Entry {
    pub(crate) name: String,
    /// `None`: any dtype (the kernel says what it produced).
    pub(crate) dtype: Option<DType>,
    pub(crate) run: Box<RunFn>,
    pub(crate) init: Box<InitFn>,
}

/// The kernels a program offers its workers, each registered by name for one dtype (register
/// the same name again for another dtype).
///
/// Build it the same way in every process of the program (typically in a function called from
/// `main`), pass it to [`crate::run_if_worker_with`] first thing, and to
/// [`crate::PoolBuilder::kernels`]. A worker whose registry differs (other names or dtypes, in
/// another order) is refused when the pool starts.
///
/// ```no_run
/// use mk1::task::{Registry, KernelError};
/// fn kernels() -> Registry {
///     Registry::new()
///         .kernel::<f32>("affine", |mut a| {
///             let (s, t) = (a.params.f64(0)? as f32, a.params.f64(1)? as f32);
///             a.io.map(|x| x * s + t)
///         })
///         .kernel_with_state::<u8, Vec<u8>>(
///             "lut",
///             |_info| Ok((0..=255u8).map(|v| 255 - v).collect()),
///             |lut, mut a| a.io.map(|x| lut[x as usize]),
///         )
/// }
/// ```
#[derive(Default)]
pub struct Registry {
    entries: Vec<Entry>,
}

impl Registry {
    /// No kernels (pools can still run [`super::Builtin`] ops).
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers `f` as kernel `name` for arrays of `T`. It is called once per array, in a
    /// worker process; an `Err` or a panic fails that array's task with its message and the
    /// worker goes on.
    ///
    /// # Panics
    /// If `name` is already registered for `T` (a programming error, found at start-up).
    pub fn kernel<T: Element>(
        self,
        name: &str,
        f: impl Fn(Args<'_, T>) -> Result<(), KernelError> + Send + Sync + 'static,
    ) -> Registry {
        self.kernel_with_state::<T, ()>(name, |_| Ok(()), move |_, args| f(args))
    }

    /// Registers kernel `name` for arrays of `T` with per-worker state: `init` runs once in
    /// each worker process, before the worker reports ready (an `Err` there makes the pool
    /// fail to start, with its message), and `f` gets the state mutably for every array.
    ///
    /// # Panics
    /// If `name` is already registered for `T`.
    pub fn kernel_with_state<T: Element, S: 'static>(
        self,
        name: &str,
        init: impl Fn(&WorkerInfo) -> Result<S, KernelError> + Send + Sync + 'static,
        f: impl Fn(&mut S, Args<'_, T>) -> Result<(), KernelError> + Send + Sync + 'static,
    ) -> Registry {
        self.push(
            name,
            Some(T::DTYPE),
            init,
            move |state: &mut S, call: &mut super::exec::RawCall<'_>| {
                f(state, call.typed::<T>()?).map(|()| None)
            },
        )
    }

    /// Registers kernel `name` for arrays of every dtype, with per-worker state as in
    /// [`Registry::kernel_with_state`]. It sees its arrays as bytes ([`AnyArgs`]), writes a
    /// row-major output of any dtype and shape at the start of its output space, and returns
    /// what it wrote ([`Output`]): a result larger than the space fails that array's task with
    /// a message giving both sizes. This is how an interpreter's functions (Python's, say)
    /// run in workers.
    ///
    /// # Panics
    /// If `name` is already registered, for any dtype.
    pub fn kernel_any_dtype<S: 'static>(
        self,
        name: &str,
        init: impl Fn(&WorkerInfo) -> Result<S, KernelError> + Send + Sync + 'static,
        f: impl Fn(&mut S, AnyArgs<'_>) -> Result<Output, KernelError> + Send + Sync + 'static,
    ) -> Registry {
        self.push(
            name,
            None,
            init,
            move |state: &mut S, call: &mut super::exec::RawCall<'_>| {
                f(state, call.any()).map(Some)
            },
        )
    }

    fn push<S: 'static>(
        mut self,
        name: &str,
        dtype: Option<DType>,
        init: impl Fn(&WorkerInfo) -> Result<S, KernelError> + Send + Sync + 'static,
        run: impl Fn(&mut S, &mut super::exec::RawCall<'_>) -> Result<Option<Output>, KernelError>
            + Send
            + Sync
            + 'static,
    ) -> Registry {
        assert!(
            !self
                .entries
                .iter()
                .any(|e| e.name == name
                    && (e.dtype.is_none() || dtype.is_none() || e.dtype == dtype)),
            "kernel {name:?} is registered twice for {}",
            dtype.map_or("any dtype", DType::name)
        );
        self.entries.push(Entry {
            name: name.to_string(),
            dtype,
            init: Box::new(move |info| init(info).map(|s| Box::new(s) as Box<dyn Any>)),
            run: Box::new(move |state, call| {
                let state = state
                    .downcast_mut::<S>()
                    .expect("the state was made by this entry's init");
                run(state, call)
            }),
        });
        self
    }

    /// The index of kernel `name` for `dtype`.
    ///
    /// # Errors
    /// A message naming the kernels that exist, or the dtypes `name` accepts.
    pub fn find(&self, name: &str, dtype: DType) -> Result<u32, String> {
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.name == name && e.dtype.is_none_or(|d| d == dtype))
        {
            return Ok(i as u32);
        }
        let dtypes: Vec<&str> = self
            .entries
            .iter()
            .filter(|e| e.name == name)
            .filter_map(|e| e.dtype.map(DType::name))
            .collect();
        if !dtypes.is_empty() {
            return Err(format!(
                "kernel {name:?} takes {}, not {dtype}",
                dtypes.join(", ")
            ));
        }
        Err(format!(
            "no kernel named {name:?}; registered: {}",
            self.describe()
        ))
    }

    /// `name(dtype, ...)` for every kernel, or `none`.
    pub fn describe(&self) -> String {
        if self.entries.is_empty() {
            return "none (only built-in ops)".into();
        }
        let mut out = String::new();
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            let _ = write!(out, "{}[{}]", e.name, e.dtype.map_or("any", DType::name));
        }
        out
    }

    /// Number of registered (name, dtype) pairs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// No kernels.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether kernel `i` takes any dtype (and says what it produced).
    #[inline]
    pub(crate) fn takes_any(&self, i: u32) -> bool {
        self.entry(i).is_some_and(|e| e.dtype.is_none())
    }

    #[inline]
    pub(crate) fn entry(&self, i: u32) -> Option<&Entry> {
        self.entries.get(i as usize)
    }

    /// A hash of the names and dtypes in order (never 0): what a worker must match.
    pub fn fingerprint(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |b: &[u8]| {
            for &x in b {
                h ^= u64::from(x);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for e in &self.entries {
            eat(e.name.as_bytes());
            eat(&[0, e.dtype.map_or(0xff, DType::code), 0]);
        }
        h | 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        Registry::new()
            .kernel::<f32>("scale", |mut a| a.io.map(|x| x * 2.0))
            .kernel::<f64>("scale", |mut a| a.io.map(|x| x * 2.0))
            .kernel::<u8>("inv", |mut a| a.io.map(|x| !x))
    }

    #[test]
    fn lookup_names_what_exists() {
        let r = reg();
        assert_eq!(r.find("scale", DType::F64), Ok(1));
        let e = r.find("scale", DType::I8).unwrap_err();
        assert!(e.contains("float32, float64") && e.contains("int8"), "{e}");
        let e = r.find("blur", DType::U8).unwrap_err();
        assert!(
            e.contains("scale[float32]") && e.contains("inv[uint8]"),
            "{e}"
        );
        assert!(Registry::new()
            .find("x", DType::U8)
            .unwrap_err()
            .contains("built-in"));
    }

    #[test]
    fn fingerprints_follow_names_dtypes_and_order() {
        assert_eq!(reg().fingerprint(), reg().fingerprint());
        let other = Registry::new()
            .kernel::<f64>("scale", |_| Ok(()))
            .kernel::<f32>("scale", |_| Ok(()))
            .kernel::<u8>("inv", |_| Ok(()));
        assert_ne!(reg().fingerprint(), other.fingerprint());
        assert_ne!(Registry::new().fingerprint(), 0);
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn a_name_twice_for_one_dtype_is_a_bug() {
        let _ = reg().kernel::<u8>("inv", |_| Ok(()));
    }
}
