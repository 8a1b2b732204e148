//! The worker's side of a task: validate the descriptor copy, run the kernel on every array in
//! the slot (catching panics), and say how it went.

use std::any::Any;
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;

use super::registry::WorkerInfo;
use super::{builtin, AnyArgs, AnyIo, Args, Io, KernelError, Output, Params, Registry};
use crate::array::{cast, cast_mut, Shape};
use crate::dtype::{DType, Element};
use crate::layout::{
    ItemDesc, OutDesc, TaskDesc, BUILTIN, ITEM_MESSAGE, ITEM_MESSAGE_HEADER, MATRIX_ALIGN,
    MAX_ITEMS, MESSAGE_BYTES, TASK_FAILED, TASK_OK,
};
use crate::ops::Kernel;
use crate::shm::{TaskBuffers, TaskResult};

/// One array's memory before it is typed.
pub(crate) enum RawIo<'a> {
    InPlace(&'a mut [u8]),
    OutOfPlace(&'a [u8], &'a mut [u8]),
}

/// One kernel call before it is typed: what the registry's type-erased entry receives.
pub(crate) struct RawCall<'a> {
    io: RawIo<'a>,
    dtype: DType,
    shape: Shape,
    out_shape: Shape,
    params: &'a Params,
    context: &'a [u8],
    worker: u32,
}

impl RawCall<'_> {
    /// The bytes view, for an any-dtype kernel.
    pub(crate) fn any(&mut self) -> AnyArgs<'_> {
        let io = match &mut self.io {
            RawIo::InPlace(b) => AnyIo::InPlace(b),
            RawIo::OutOfPlace(i, o) => AnyIo::OutOfPlace {
                input: i,
                output: o,
            },
        };
        AnyArgs {
            io,
            dtype: self.dtype,
            shape: self.shape,
            params: self.params,
            context: self.context,
            worker: self.worker,
        }
    }

    /// The typed view; the registry only calls an entry for its own dtype, so the check is a
    /// second line of defence.
    pub(crate) fn typed<T: Element>(&mut self) -> Result<Args<'_, T>, KernelError> {
        if self.dtype != T::DTYPE {
            return Err(KernelError::new(format!(
                "kernel for {} called with {}",
                T::DTYPE,
                self.dtype
            )));
        }
        let io = match &mut self.io {
            RawIo::InPlace(b) => Io::InPlace(cast_mut::<T>(b)),
            RawIo::OutOfPlace(i, o) => Io::OutOfPlace {
                input: cast::<T>(i),
                output: cast_mut::<T>(o),
            },
        };
        Ok(Args {
            io,
            shape: self.shape,
            out_shape: self.out_shape,
            params: self.params,
            context: self.context,
            worker: self.worker,
        })
    }
}

thread_local! {
    /// The last panic's message and place, kept by the worker's panic hook.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Whether user code (a kernel or an init hook) is running.
    static IN_KERNEL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Wraps the panic hook: a kernel's panic becomes its task's error message (with the source
/// location) instead of a report on the worker's stderr; any other panic is reported as before.
fn keep_kernel_panics_quiet() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if IN_KERNEL.with(|k| k.get()) {
            let msg = format!("{info}").replace('\n', " ");
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(msg));
        } else {
            previous(info);
        }
    }));
}

/// Runs user code `f`, turning a panic into `Err(message)`.
fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    IN_KERNEL.with(|k| k.set(true));
    let r = std::panic::catch_unwind(AssertUnwindSafe(f));
    IN_KERNEL.with(|k| k.set(false));
    r.map_err(|payload| {
        LAST_PANIC
            .with(|p| p.borrow_mut().take())
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panicked".into())
    })
}

/// A worker's kernels with their per-worker state.
pub(crate) struct Executor<'r> {
    registry: &'r Registry,
    states: Vec<Box<dyn Any>>,
    simd: Kernel,
    worker: u32,
}

impl<'r> Executor<'r> {
    /// Runs every kernel's init hook once. `Err` names the kernel whose init failed or
    /// panicked.
    pub(crate) fn new(
        registry: &'r Registry,
        info: WorkerInfo,
        simd: Kernel,
    ) -> Result<Self, String> {
        keep_kernel_panics_quiet();
        let mut states = Vec::with_capacity(registry.len());
        for i in 0..registry.len() as u32 {
            let e = registry.entry(i).expect("in range");
            let state = guarded(|| (e.init)(&info))
                .map_err(|p| format!("init of kernel {:?} panicked: {p}", e.name))?
                .map_err(|err| format!("init of kernel {:?} failed: {err}", e.name))?;
            states.push(state);
        }
        Ok(Executor {
            registry,
            states,
            simd,
            worker: info.worker,
        })
    }

    /// Runs the task `desc` (a validated-here copy) on `bufs` (the token's memory). `Err` only
    /// for a descriptor that breaks the protocol (the worker then stops); a kernel's failure
    /// is in the returned result.
    ///
    /// Items whose bit is set in `desc.skip_mask` are not run. Before each item of a user
    /// kernel, its index is stored in `running` (Relaxed: a hint for the pool after a death or a
    /// hang, see [`crate::layout::WorkerStatus::current_item`]).
    pub(crate) fn run(
        &mut self,
        desc: &TaskDesc,
        bufs: TaskBuffers<'_>,
        running: &crate::sync::AtomicU32,
    ) -> Result<TaskResult, String> {
        let task = check(desc, &bufs, self.registry)?;
        let mut bufs = bufs;
        if desc.kernel >= BUILTIN {
            // A built-in op (validated by `check`, so it cannot fail): decoded once, applied to
            // each array in turn (out of place: reading the input, writing the output, in one
            // pass).
            let items = &desc.items[..desc.count as usize];
            let (out, input) = match &mut bufs {
                TaskBuffers::InPlace(b) => (&mut **b, None),
                TaskBuffers::OutOfPlace(i, o) => (&mut **o, Some(*i)),
            };
            let skip = desc.skip_mask;
            if skip == 0 {
                // Built-in ops are elementwise and do not depend on an element's position, and
                // `check` made sure the arrays lie in increasing order inside the region: one
                // pass over the span from the first array to the end of the last does them all
                // (packed arrays: one call instead of one per array). The gaps it also covers
                // are alignment padding of this slot, which nobody reads.
                let span = task.span;
                let io = match input {
                    Some(i) => RawIo::OutOfPlace(&i[span.clone()], &mut out[span]),
                    None => RawIo::InPlace(&mut out[span]),
                };
                let one = std::iter::once(io);
                builtin::run_prechecked_each(desc.kernel, &task.params, task.dtype, self.simd, one);
                return Ok(TaskResult::ok());
            }
            let arrays = disjoint_arrays(out, items, task.dtype)
                .enumerate()
                .filter(move |(i, _)| skip & (1 << i) == 0)
                .map(|(_, (at, a))| match input {
                    Some(i) => RawIo::OutOfPlace(&i[at..at + a.len()], a),
                    None => RawIo::InPlace(a),
                });
            builtin::run_prechecked_each(desc.kernel, &task.params, task.dtype, self.simd, arrays);
            return Ok(TaskResult::ok());
        }
        let mut result = TaskResult::ok();
        let any = desc.kernel < BUILTIN
            && self
                .registry
                .entry(desc.kernel)
                .is_some_and(|e| e.dtype.is_none());
        let context: Vec<u8> = match &bufs {
            TaskBuffers::InPlace(b) => context_of(desc, b).to_vec(),
            TaskBuffers::OutOfPlace(i, _) => context_of(desc, i).to_vec(),
        };
        let (region, in_place) = match &bufs {
            TaskBuffers::InPlace(b) => (b.len() as u64, true),
            TaskBuffers::OutOfPlace(_, o) => (o.len() as u64, false),
        };
        // What an any-dtype kernel produced, per array (typed kernels: as requested, nothing
        // to say).
        let mut outs = if any {
            vec![OutDesc::default(); desc.count as usize]
        } else {
            Vec::new()
        };
        for (i, item) in desc.items[..desc.count as usize].iter().enumerate() {
            if desc.skip_mask & (1 << i) != 0 {
                continue;
            }
            running.store(i as u32, crate::sync::Ordering::Relaxed);
            let shape = Shape::from_raw(item.ndim, item.shape).expect("checked");
            let out_shape = task.out_shape.unwrap_or(shape);
            let at = item.offset as usize;
            let n_in = shape.bytes(task.dtype) as usize;
            let space = desc.item_space(i, region, in_place) as usize;
            // A typed kernel gets exactly its arrays; an any-dtype one its whole space.
            let n_out = if any {
                space
            } else {
                out_shape.bytes(task.dtype) as usize
            };
            let io = match &mut bufs {
                TaskBuffers::InPlace(b) => RawIo::InPlace(&mut b[at..at + n_in.max(n_out)]),
                TaskBuffers::OutOfPlace(inp, out) => {
                    RawIo::OutOfPlace(&inp[at..at + n_in], &mut out[at..at + n_out])
                }
            };
            let outcome = self
                .call(desc.kernel, &task, io, shape, out_shape, &context)
                .and_then(|produced| match produced {
                    None => Ok(()),
                    Some(o) if o.shape.bytes(o.dtype) > space as u64 => Err((
                        format!(
                            "the kernel's output {} of {} is {} bytes; this array has room \
                             for {space} (PoolBuilder::max_array_bytes, or fewer arrays per slot)",
                            o.shape,
                            o.dtype,
                            o.shape.bytes(o.dtype)
                        ),
                        false,
                    )),
                    Some(o) => {
                        let (ndim, shape) = o.shape.raw();
                        outs[i] = OutDesc {
                            dtype: u32::from(o.dtype.code()),
                            ndim,
                            shape,
                        };
                        Ok(())
                    }
                });
            if let Err((msg, panicked)) = outcome {
                // This array's output space: void now, it can carry its message.
                let room = match &mut bufs {
                    TaskBuffers::InPlace(b) => &mut b[at..at + space],
                    TaskBuffers::OutOfPlace(_, o) => &mut o[at..at + space],
                };
                if result.status != TASK_OK {
                    // A later failure: its own message there (see ITEM_MESSAGE), where it fits
                    // a header.
                    if let Some((head, text)) = room.split_at_mut_checked(ITEM_MESSAGE_HEADER) {
                        let n = msg.len().min(text.len());
                        text[..n].copy_from_slice(&msg.as_bytes()[..n]);
                        head[..4].copy_from_slice(&ITEM_MESSAGE.to_le_bytes());
                        head[4..8].copy_from_slice(&u32::from(panicked).to_le_bytes());
                        // (The whole message's length: the reader says when it was cut.)
                        let len = u32::try_from(msg.len()).unwrap_or(u32::MAX);
                        head[8..].copy_from_slice(&len.to_le_bytes());
                    }
                } else {
                    // A message longer than the descriptor's room goes, whole, into this
                    // array's output space.
                    if msg.len() > MESSAGE_BYTES {
                        let n = msg.len().min(room.len());
                        room[..n].copy_from_slice(&msg.as_bytes()[..n]);
                        result.detail_len = n as u32;
                    }
                    result.message = msg;
                    result.panicked = panicked;
                }
                result.status = TASK_FAILED;
                result.failed_mask |= 1 << i;
            }
        }
        if any {
            result.outs = Some(outs);
        }
        Ok(result)
    }

    fn call(
        &mut self,
        kernel: u32,
        task: &Checked,
        io: RawIo<'_>,
        shape: Shape,
        out_shape: Shape,
        context: &[u8],
    ) -> Result<Option<Output>, (String, bool)> {
        if kernel >= BUILTIN {
            let one = std::iter::once(io);
            builtin::run_prechecked_each(kernel, &task.params, task.dtype, self.simd, one);
            return Ok(None);
        }
        let entry = self.registry.entry(kernel).expect("checked");
        let state = &mut self.states[kernel as usize];
        let mut call = RawCall {
            io,
            dtype: task.dtype,
            shape,
            out_shape,
            params: &task.params,
            context,
            worker: self.worker,
        };
        match guarded(|| (entry.run)(state.as_mut(), &mut call)) {
            Ok(Ok(produced)) => Ok(produced),
            Ok(Err(e)) => Err((e.message().to_string(), false)),
            Err(p) => Err((p, true)),
        }
    }
}

/// Each item's bytes in `buf` (with its offset), as disjoint mutable slices: `check` made sure
/// the items come in increasing order without overlap and fit.
fn disjoint_arrays<'b>(
    buf: &'b mut [u8],
    items: &'b [ItemDesc],
    dtype: DType,
) -> impl Iterator<Item = (usize, &'b mut [u8])> {
    let mut rest = buf;
    let mut pos = 0usize;
    items.iter().map(move |item| {
        let at = item.offset as usize;
        let n = Shape::from_raw(item.ndim, item.shape)
            .expect("checked")
            .bytes(dtype) as usize;
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(at - pos);
        let (array, tail) = tail.split_at_mut(n);
        rest = tail;
        pos = at + n;
        (at, array)
    })
}

/// What validation found.
struct Checked {
    dtype: DType,
    params: Params,
    out_shape: Option<Shape>,
    /// From the first array's first byte to the last one's end (in the input, and for a
    /// built-in op the output too: it keeps the shape).
    span: std::ops::Range<usize>,
}

/// Checks an untrusted descriptor copy against the slot's memory and the registry.
fn check(d: &TaskDesc, bufs: &TaskBuffers<'_>, registry: &Registry) -> Result<Checked, String> {
    let dtype = u8::try_from(d.dtype)
        .ok()
        .and_then(DType::from_code)
        .ok_or_else(|| format!("unknown dtype code {}", d.dtype))?;
    if d.out_dtype != d.dtype {
        return Err("output dtype differs from the input's".into());
    }
    if d.kernel < BUILTIN {
        let e = registry
            .entry(d.kernel)
            .ok_or_else(|| format!("kernel index {} out of range", d.kernel))?;
        if e.dtype.is_some_and(|d| d != dtype) {
            return Err(format!("kernel {:?} does not take {dtype}", e.name));
        }
    }
    let params = Params::decode(&d.params, d.params_len)
        .ok_or_else(|| format!("parameter length {}", d.params_len))?;
    if d.kernel >= BUILTIN {
        builtin::validate(d.kernel, &params, dtype)?;
    }
    let count = d.count as usize;
    if count == 0 || count > MAX_ITEMS {
        return Err(format!("{count} arrays, outside 1..={MAX_ITEMS}"));
    }
    let (in_len, out_len) = match bufs {
        TaskBuffers::InPlace(b) => (b.len() as u64, None),
        TaskBuffers::OutOfPlace(i, o) => (i.len() as u64, Some(o.len() as u64)),
    };
    let out_shape = match d.out_ndim {
        0 => None,
        n => {
            if count != 1 || out_len.is_none() || d.kernel >= BUILTIN {
                return Err(
                    "an output shape of its own needs one array, out of place, and a user kernel"
                        .into(),
                );
            }
            Some(Shape::from_raw(n, d.out_shape).ok_or("bad output rank")?)
        }
    };
    // Items in increasing order, each ending before the next starts, then the context: what
    // `TaskDesc::item_space` relies on.
    let mut end = 0u64;
    for item in &d.items[..count] {
        let shape = Shape::from_raw(item.ndim, item.shape)
            .ok_or_else(|| format!("array rank {}", item.ndim))?;
        let at = u64::from(item.offset);
        if at < end {
            return Err(format!("array at byte {at} overlaps the one before"));
        }
        let fits = |bytes: u64, len: u64| at.checked_add(bytes).is_some_and(|e| e <= len);
        if !at.is_multiple_of(MATRIX_ALIGN) || !fits(shape.bytes(dtype), in_len) {
            return Err(format!(
                "array {shape} of {dtype} at byte {at} does not fit a slot of {in_len} bytes"
            ));
        }
        // (Only now: a scribbled shape of 2^64 bytes would overflow the sum.)
        end = at + shape.bytes(dtype);
        if let Some(out_len) = out_len {
            let out = out_shape.unwrap_or(shape);
            if !fits(out.bytes(dtype), out_len) {
                return Err(format!("output {out} does not fit at byte {at}"));
            }
            if d.kernel >= BUILTIN && out.elements() != shape.elements() {
                return Err("a built-in op keeps the shape".into());
            }
        }
    }
    if d.context_len > 0 {
        let at = u64::from(d.context_offset);
        let past = at + u64::from(d.context_len);
        if at < end || !at.is_multiple_of(MATRIX_ALIGN) || past > in_len {
            return Err(format!(
                "context of {} bytes at byte {at} is not after the arrays in a slot of {in_len} bytes",
                d.context_len
            ));
        }
    }
    Ok(Checked {
        dtype,
        params,
        out_shape,
        span: d.items[0].offset as usize..end as usize,
    })
}

/// The task's context bytes in the slot's input (validated by `check`).
fn context_of<'b>(d: &TaskDesc, input: &'b [u8]) -> &'b [u8] {
    if d.context_len == 0 {
        return &[];
    }
    let at = d.context_offset as usize;
    &input[at..at + d.context_len as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Task;

    /// A valid one-array `add:1` task on int32, shape `dims`, at byte `at`.
    fn task(dims: [u32; 2], at: u32) -> TaskDesc {
        let registry = Registry::new();
        let (kernel, params) = Task::op("add:1")
            .unwrap()
            .resolve(&registry, DType::I32)
            .map(|(k, p)| (k, *p))
            .unwrap();
        let mut d = TaskDesc::zeroed();
        d.kernel = kernel;
        d.dtype = u32::from(DType::I32.code());
        d.out_dtype = d.dtype;
        d.count = 1;
        d.params_len = params.write_to(&mut d.params);
        d.items[0].offset = at;
        d.items[0].ndim = 2;
        d.items[0].shape[..2].copy_from_slice(&dims);
        d
    }

    #[test]
    fn a_scribbled_huge_shape_is_refused_not_an_overflow() {
        let registry = Registry::new();
        let mut slot = vec![0u8; 4096];
        let ok = task([4, 4], 64);
        assert!(check(&ok, &TaskBuffers::InPlace(&mut slot), &registry).is_ok());
        // 2^32-1 squared, times 4 bytes, saturates to 2^64-1: with the offset, the sum would
        // overflow (a debug build panicked here, found by the scribbling test).
        for (dims, at) in [
            ([u32::MAX, u32::MAX], 64),
            ([u32::MAX, 1], 64),
            ([1, 1], 4032),
        ] {
            let bad = task(dims, at);
            let why = check(&bad, &TaskBuffers::InPlace(&mut slot), &registry)
                .err()
                .unwrap_or_default();
            if dims == [1, 1] {
                assert_eq!(why, "", "fits: 4 bytes at 4032");
            } else {
                assert!(why.contains("does not fit"), "{dims:?}: {why}");
            }
        }
    }
}
