//! `mk1 bench library`: the library API's figures, each a ratio against a baseline measured in
//! the same command, interleaved and repeated.
//!
//! - `kernel`: a user kernel computing `x*3+1` on int32 against the built-in `affine:3,1`
//!   (same pool, same shapes, same fill and check).
//! - `threads`: a user f32 kernel (`x*3+1`) through a pool, in place and out of place, against
//!   threads in one process running the same closure on the same arrays handed through
//!   crossbeam channels (the fill and the check are the same code), and against rayon as it
//!   is commonly used: fill a batch of arrays, apply the closure to the batch with
//!   `par_iter_mut` on every CPU the pool side uses, then check the batch.
//! - `packing`: `map` over many small f32 arrays (up to 16x16), packed against one per slot,
//!   and both against the bound the caller's own work sets (its copies and checks, alone);
//!   the same with each result read in place ([`crate::Map::next_view`]) rather than copied
//!   out;
//!   then packed in a pool without pack slots ([`crate::PoolBuilder::pack_slots`]`(0)`: maps
//!   pack in its largest slots, 4 per worker) against one per slot and against packed with
//!   them; and packed with [`crate::PoolBuilder::streaming_stores`] on (the default) against
//!   off.
//! - `idle`: CPU used by an idle pool's processes over an idle spell, and the round trip of the
//!   first task after each idle spell.
//!
//! The program serving as workers must register [`kernels`] (the `mk1` binary does).

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel as chan;
use serde::Serialize;

use crate::array::{Array, Shape};
use crate::client::{Mode, Pool, Producer, Task};
use crate::dispatch::DEFAULT_QUEUE_AHEAD;
use crate::dtype::Element;
use crate::job::Shapes;
use crate::task::{Params, Registry};

/// The user kernels the benchmarks run; the `mk1` binary registers them for its workers.
pub fn kernels() -> Registry {
    Registry::new()
        .kernel::<i32>("x3p1", |mut a| {
            a.io.map(|x| x.wrapping_mul(3).wrapping_add(1))
        })
        .kernel::<f32>("affine", |mut a| {
            let (s, t) = (a.params.f64(0)? as f32, a.params.f64(1)? as f32);
            a.io.map(|x| x * s + t)
        })
}

/// Settings of one `mk1 bench library` run.
#[derive(Debug, Clone)]
pub struct LibraryBench {
    /// Worker processes (and threads for the baseline).
    pub workers: u32,
    /// Repetitions, interleaved.
    pub reps: u32,
    /// Each throughput run's length.
    pub duration: Duration,
    /// Arrays for the packing comparison.
    pub map_arrays: u64,
    /// Length of the long idle spell.
    pub idle: Duration,
}

/// Median and range of one measured quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    fn of(v: &[f64]) -> Spread {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        Spread {
            median: if s.is_empty() { 0.0 } else { s[s.len() / 2] },
            min: s.first().copied().unwrap_or(0.0),
            max: s.last().copied().unwrap_or(0.0),
        }
    }
}

/// One comparison: the rates of both sides and the per-repetition ratio `a / b`.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// What was compared.
    pub name: String,
    /// Side a (arrays per second).
    pub a: Spread,
    /// Side b (arrays per second).
    pub b: Spread,
    /// `a / b`, per repetition.
    pub ratio: Spread,
}

/// The idle figures.
#[derive(Debug, Clone, Serialize)]
pub struct IdleFigures {
    /// CPU time of the pool's processes (coordinator and workers) over the idle spell, as a
    /// percentage of one CPU.
    pub cpu_percent_of_one_core: f64,
    /// The idle spell, seconds.
    pub idle_seconds: f64,
    /// Round trip of the first task after an idle spell, microseconds: median.
    pub first_task_p50_us: f64,
    /// The same, 99th percentile.
    pub first_task_p99_us: f64,
    /// A reference for `first_task_p50_us` on this machine, measured interleaved with it: two
    /// threads of one process, without mk1, each waking the other by a futex once after an
    /// idle spell, microseconds: median.
    pub floor_p50_us: f64,
    /// The same, 99th percentile.
    pub floor_p99_us: f64,
    /// Idle spells timed.
    pub spells: usize,
    /// The same first-task round trip with the caller and the workers confined to the caller's
    /// CPU (no cross-CPU wake-up of an idle CPU), microseconds: median.
    pub one_cpu_first_task_p50_us: f64,
    /// The same, 99th percentile.
    pub one_cpu_first_task_p99_us: f64,
}

/// Everything `mk1 bench library` measured.
#[derive(Debug, Clone, Serialize)]
pub struct LibraryReport {
    /// Worker processes.
    pub workers: u32,
    /// Repetitions.
    pub reps: u32,
    /// The comparisons.
    pub comparisons: Vec<Comparison>,
    /// Idle costs.
    pub idle: IdleFigures,
}

fn fill_i32(d: &mut [i32], seq: u64) {
    let base = crate::job::fill_base(seq, 7);
    for (i, x) in d.iter_mut().enumerate() {
        *x = base.wrapping_add(i as i32);
    }
}

/// Checks every element (a fold, not a short-circuit, so the compiler vectorises it: the
/// caller's share of each comparison should be as small as it can be, on both sides).
fn check_i32(d: &[i32], seq: u64) -> bool {
    let base = crate::job::fill_base(seq, 7);
    d.iter().enumerate().fold(true, |ok, (i, &y)| {
        ok & (y == base.wrapping_add(i as i32).wrapping_mul(3).wrapping_add(1))
    })
}

/// Element `i` is `base + i` (exact in f32 for arrays up to 2^23 elements), so `x*3+1` is
/// exact too and the check is an equality. (The index counts in i32, which converts to f32 in
/// one vector instruction; a usize does not, and the check then costs more than the kernel.)
fn fill_f32(d: &mut [f32], seq: u64) {
    let base = (seq % 1024) as f32;
    for (x, i) in d.iter_mut().zip(0i32..) {
        *x = base + i as f32;
    }
}

fn check_f32(d: &[f32], seq: u64) -> bool {
    check_affine_f32(d, seq, 3.0, 1.0)
}

/// Whether `d` is the fill of array `seq` through `x*a+b`.
#[inline]
fn check_affine_f32(d: &[f32], seq: u64, a: f32, b: f32) -> bool {
    let base = (seq % 1024) as f32;
    d.iter()
        .zip(0i32..)
        .fold(true, |ok, (&y, i)| ok & (y == (base + i as f32) * a + b))
}

/// Keeps every slot of `producer` busy with arrays of shapes up to `max_dim` for `duration`:
/// fill, submit, receive, check, and refill the returned slot. Returns arrays per second.
fn drive<T: Element>(
    producer: &Producer<'_>,
    task: &Task,
    max_dim: u32,
    duration: Duration,
    fill: impl Fn(&mut [T], u64),
    check: impl Fn(&[T], u64) -> bool,
) -> Result<f64, String> {
    let mut shapes = Shapes::new(11, 1, max_dim);
    // A handle numbers its tasks in submit order: the array's number is its ticket's offset
    // from the first one (no table from tickets to numbers).
    let first = producer.next_ticket().0;
    let mut done = 0u64;
    let start = Instant::now();
    let deadline = start + duration;
    let next_loan = |shape: Shape| producer.try_loan::<T>(shape).ok();
    // Fill every slot once.
    loop {
        let (r, c) = shapes.next_shape();
        let Some(mut loan) = next_loan(Shape::d2(r, c)) else {
            shapes.pending = Some((r, c));
            break;
        };
        fill(loan.as_mut_slice(), producer.next_ticket().0 - first);
        producer.submit(loan, task).map_err(|e| e.to_string())?;
    }
    while let Some(c) = producer.recv() {
        let s = c.ticket().0 - first;
        let out = c.output::<T>().map_err(|e| e.to_string())?;
        if !check(out.as_slice(), s) {
            return Err(format!("array {s} came back wrong"));
        }
        done += 1;
        if Instant::now() >= deadline {
            continue;
        }
        let (r, cc) = shapes.next_shape();
        let mut loan = c.reuse::<T>(Shape::d2(r, cc)).map_err(|e| e.to_string())?;
        fill(loan.as_mut_slice(), producer.next_ticket().0 - first);
        producer.submit(loan, task).map_err(|e| e.to_string())?;
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// The threads baseline: `workers` threads apply `x*3+1` (the same closure as the user kernel)
/// to f32 arrays handed through crossbeam channels; the caller fills and checks as [`drive`].
fn threads_f32(
    workers: u32,
    inflight: u32,
    max_dim: u32,
    duration: Duration,
) -> Result<f64, String> {
    struct Msg {
        seq: u64,
        len: usize,
        data: Vec<f32>,
    }
    let (back_tx, back_rx) = chan::unbounded::<Msg>();
    let (to_tx, to_rx) = chan::unbounded::<Msg>();
    let kernel = |x: f32| x * 3.0 + 1.0;
    std::thread::scope(|s| -> Result<f64, String> {
        for _ in 0..workers {
            let (rx, back) = (to_rx.clone(), back_tx.clone());
            s.spawn(move || {
                for mut m in rx {
                    m.data[..m.len].iter_mut().for_each(|x| *x = kernel(*x));
                    if back.send(m).is_err() {
                        break;
                    }
                }
            });
        }
        drop(back_tx);
        let mut shapes = Shapes::new(11, 1, max_dim);
        let max = (max_dim as usize).pow(2);
        let start = Instant::now();
        let deadline = start + duration;
        let (mut seq, mut done, mut out) = (0u64, 0u64, 0u64);
        let mut send = |mut data: Vec<f32>, seq: u64| {
            let (r, c) = shapes.next_shape();
            let len = (r * c) as usize;
            fill_f32(&mut data[..len], seq);
            to_tx.send(Msg { seq, len, data }).expect("workers alive");
        };
        for _ in 0..inflight {
            send(vec![0.0; max], seq);
            seq += 1;
            out += 1;
        }
        while out > 0 {
            let m = back_rx.recv().map_err(|e| e.to_string())?;
            out -= 1;
            if !check_f32(&m.data[..m.len], m.seq) {
                return Err(format!("array {} came back wrong", m.seq));
            }
            done += 1;
            if Instant::now() < deadline {
                send(m.data, seq);
                seq += 1;
                out += 1;
            }
        }
        drop(to_tx);
        Ok(done as f64 / start.elapsed().as_secs_f64())
    })
}

/// The rayon baseline: the caller fills a batch of `batch` arrays (buffers allocated once and
/// reused), a rayon pool of `threads` threads applies `x*3+1` to the batch (`par_iter_mut`;
/// the caller waits meanwhile), then the caller checks the batch, as [`drive`] does. Returns
/// arrays per second.
fn rayon_f32(threads: u32, batch: u32, max_dim: u32, duration: Duration) -> Result<f64, String> {
    use rayon::prelude::*;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads as usize)
        .build()
        .map_err(|e| e.to_string())?;
    let kernel = |x: f32| x * 3.0 + 1.0;
    let max = (max_dim as usize).pow(2);
    let mut arrays: Vec<(u64, usize, Vec<f32>)> =
        (0..batch).map(|_| (0, 0, vec![0.0; max])).collect();
    let mut shapes = Shapes::new(11, 1, max_dim);
    let (mut seq, mut done) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < duration {
        for (s, len, data) in &mut arrays {
            let (r, c) = shapes.next_shape();
            (*s, *len) = (seq, (r * c) as usize);
            fill_f32(&mut data[..*len], seq);
            seq += 1;
        }
        pool.install(|| {
            arrays.par_iter_mut().for_each(|(_, len, data)| {
                data[..*len].iter_mut().for_each(|x| *x = kernel(*x));
            });
        });
        for (s, len, data) in &arrays {
            if !check_f32(&data[..*len], *s) {
                return Err(format!("array {s} came back wrong"));
            }
            done += 1;
        }
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

/// The bound that the caller's own work sets on [`drive`] and [`threads_f32`] over f32 arrays
/// of shapes up to `max_dim`, measured with no pool and no threads: one thread fills an array
/// and checks it, in turn in `buffers` buffers (as many as the pool's slots, for the same
/// memory in use). (It checks the values it filled, with a check of the same cost: in a pool
/// the workers apply `x*3+1` on other CPUs.) Arrays per second.
fn caller_share_f32(buffers: u32, max_dim: u32, duration: Duration) -> Result<f64, String> {
    // (Passed through `black_box`: the check must stay a multiply and an add, as in `check_f32`.)
    let (a, b) = (std::hint::black_box(1.0f32), std::hint::black_box(0.0f32));
    let max = (max_dim as usize).pow(2);
    let mut bufs: Vec<Vec<f32>> = (0..buffers.max(1)).map(|_| vec![0.0; max]).collect();
    let mut shapes = Shapes::new(11, 1, max_dim);
    let mut seq = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        for data in &mut bufs {
            let (r, c) = shapes.next_shape();
            let d = &mut data[..(r * c) as usize];
            fill_f32(d, seq);
            if !check_affine_f32(d, seq, a, b) {
                return Err(format!("array {seq} was filled wrong"));
            }
            seq += 1;
        }
    }
    Ok(seq as f64 / start.elapsed().as_secs_f64())
}

/// `n` small f32 arrays (up to 16x16), array `k` filled as [`fill_f32`] with seq `k`.
fn small_arrays(n: u64) -> Vec<Array<f32>> {
    let mut shapes = Shapes::new(5, 1, 16);
    (0..n)
        .map(|seq| {
            let (r, c) = shapes.next_shape();
            let mut data = vec![0f32; (r * c) as usize];
            fill_f32(&mut data, seq);
            Array::new(data, Shape::d2(r, c)).expect("shape matches")
        })
        .collect()
}

/// How the map's caller takes each result.
#[derive(Clone, Copy, PartialEq)]
enum Take {
    /// As an [`Array`] of its own (the map's `Iterator::next`: copied out of the slot).
    Copied,
    /// Read in place in the slot ([`crate::Map::next_view`]).
    InPlace,
}

/// `map` over `inputs` (made beforehand: only the map is timed); arrays per second, every
/// result checked as it arrives, taken as `take` says.
fn map_small(
    producer: &mut Producer<'_>,
    inputs: &[Array<f32>],
    take: Take,
) -> Result<f64, String> {
    let task = Task::op("affine:3,1").expect("valid");
    let start = Instant::now();
    let mut k = 0u64;
    let mut map = producer.map(&task, inputs).map_err(|e| e.to_string())?;
    loop {
        let ok = match take {
            Take::Copied => match map.next() {
                None => break,
                Some(r) => check_f32(r.map_err(|e| e.to_string())?.as_slice(), k),
            },
            Take::InPlace => match map.next_view() {
                None => break,
                Some(r) => check_f32(r.map_err(|e| e.to_string())?.as_slice(), k),
            },
        };
        if !ok {
            return Err(format!("mapped array {k} came back wrong"));
        }
        k += 1;
    }
    Ok(k as f64 / start.elapsed().as_secs_f64())
}

/// The bound that the caller's own work sets on [`map_small`] over `inputs`, measured with no
/// pool at all: one thread does, per array, what the map's caller does: copies it into a
/// buffer of `pack_bytes` as `map` packs a slot (each array at a cache line, at most
/// [`MAX_ITEMS`](crate::layout::MAX_ITEMS) to a slot), then (for [`Take::Copied`]) copies it
/// out into an array of its own, and checks every element. (It checks the values it copied
/// in, with a check of the same cost: in a pool the workers apply `x*3+1` on other CPUs.)
/// Arrays per second.
fn caller_share_small(inputs: &[Array<f32>], pack_bytes: u64, take: Take) -> Result<f64, String> {
    // (Passed through `black_box`: the check must stay a multiply and an add, as in `check_f32`.)
    let (a, b) = (std::hint::black_box(1.0f32), std::hint::black_box(0.0f32));
    let line = 64 / std::mem::size_of::<f32>();
    let largest = inputs.iter().map(|x| x.as_slice().len()).max().unwrap_or(0);
    let mut slot = vec![0f32; (pack_bytes as usize / 4).max(largest)];
    let mut packed: Vec<(usize, Shape)> = Vec::with_capacity(crate::layout::MAX_ITEMS);
    let start = Instant::now();
    let mut seq = 0u64;
    let mut rest = inputs;
    while !rest.is_empty() {
        packed.clear();
        let mut at = 0;
        while let Some((x, tail)) = rest.split_first() {
            let n = x.as_slice().len();
            if packed.len() == crate::layout::MAX_ITEMS || (at + n > slot.len() && at > 0) {
                break;
            }
            crate::array::copy_elements(&mut slot[at..at + n], x.as_slice());
            packed.push((at, x.shape()));
            at += n.div_ceil(line) * line;
            rest = tail;
        }
        for &(at, shape) in &packed {
            let n = shape.elements() as usize;
            let ok = match take {
                Take::Copied => {
                    let out =
                        Array::from_trusted(crate::array::copied_vec(&slot[at..at + n]), shape);
                    check_affine_f32(out.as_slice(), seq, a, b)
                }
                Take::InPlace => check_affine_f32(&slot[at..at + n], seq, a, b),
            };
            if !ok {
                return Err(format!("array {seq} came back wrong"));
            }
            seq += 1;
        }
    }
    Ok(seq as f64 / start.elapsed().as_secs_f64())
}

fn cpu_ticks(pid: u32) -> u64 {
    crate::sys::read_small(&format!("/proc/{pid}/stat"))
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// A pool of `workers` with this binary's kernels and default settings.
fn plain_pool(workers: u32) -> Result<Pool, String> {
    Pool::builder()
        .workers(workers)
        .kernels(kernels())
        .build()
        .map_err(|e| e.to_string())
}

/// A median and a 99th percentile, microseconds.
type P50P99 = (f64, f64);

/// p50 and p99 of `v`.
fn p50_p99(mut v: Vec<f64>) -> P50P99 {
    v.sort_by(f64::total_cmp);
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (p(0.5), p(0.99))
}

/// A thread that, each time it is told to go, wakes the thread that made it: the floor under
/// the first-task figure. (Each side parks until the other's flag says so: a park may return
/// spuriously.) Dropping it stops the thread, on every path out.
struct Echo {
    flags: std::sync::Arc<[AtomicU8; 2]>,
    thread: Option<std::thread::JoinHandle<()>>,
}

const GO: usize = 0;
const BACK: usize = 1;
const QUIT: u8 = 2;

impl Echo {
    fn start() -> Echo {
        let flags = std::sync::Arc::new([AtomicU8::new(0), AtomicU8::new(0)]);
        let (f, caller) = (flags.clone(), std::thread::current());
        let thread = std::thread::spawn(move || loop {
            match f[GO].swap(0, Ordering::Acquire) {
                0 => std::thread::park(),
                QUIT => return,
                _ => {
                    f[BACK].store(1, Ordering::Release);
                    caller.unpark();
                }
            }
        });
        Echo {
            flags,
            thread: Some(thread),
        }
    }

    /// One round trip, microseconds: wake the echo thread, sleep until it wakes us.
    fn round_trip(&self) -> f64 {
        let t0 = Instant::now();
        self.flags[GO].store(1, Ordering::Release);
        if let Some(t) = &self.thread {
            t.thread().unpark();
        }
        while self.flags[BACK].swap(0, Ordering::Acquire) == 0 {
            std::thread::park();
        }
        t0.elapsed().as_secs_f64() * 1e6
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.flags[GO].store(QUIT, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// First-task round trips after idle spells of 100 ms (p50, p99 in microseconds), with the
/// pool started under the caller's current affinity; and with `floor`, interleaved with them,
/// a reference for that figure on this machine: two threads of one process, without mk1, each
/// waking the other by a futex once after an idle spell. (The pool's caller spins before it
/// sleeps, so it often catches the answer without the second wake-up; the worker's wake-up
/// is the same.)
fn after_idle(
    workers: u32,
    spells: usize,
    floor: bool,
) -> Result<(P50P99, Option<P50P99>), String> {
    let pool = plain_pool(workers)?;
    let producer = pool.producer().map_err(|e| e.to_string())?;
    let task = Task::op("add:1").expect("valid");
    let (mut lat, mut floors) = (Vec::with_capacity(spells), Vec::with_capacity(spells));
    let echo = floor.then(Echo::start);
    for _ in 0..spells {
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        let loan = producer
            .loan::<i32>(Shape::d1(16))
            .map_err(|e| e.to_string())?;
        producer.submit(loan, &task).map_err(|e| e.to_string())?;
        let c = producer.recv().ok_or("no completion")?;
        c.output::<i32>().map_err(|e| e.to_string())?;
        lat.push(t0.elapsed().as_secs_f64() * 1e6);
        drop(c);
        if let Some(echo) = &echo {
            std::thread::sleep(Duration::from_millis(100));
            floors.push(echo.round_trip());
        }
    }
    Ok((p50_p99(lat), echo.map(|_| p50_p99(floors))))
}

fn idle(workers: u32, spell: Duration) -> Result<IdleFigures, String> {
    let pool = plain_pool(workers)?;
    let producer = pool.producer().map_err(|e| e.to_string())?;
    // One task first, so every process has done work before it goes idle.
    let loan = producer
        .loan::<i32>(Shape::d1(16))
        .map_err(|e| e.to_string())?;
    producer
        .submit(loan, &Task::op("add:1").expect("valid"))
        .map_err(|e| e.to_string())?;
    drop(producer.recv().ok_or("no completion")?);
    let pids: Vec<u32> = std::iter::once(crate::sys::own_pid())
        .chain(pool.worker_pids())
        .collect();
    let before: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    let t0 = Instant::now();
    std::thread::sleep(spell);
    let after: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
    let secs = t0.elapsed().as_secs_f64();
    let hz = crate::sys::clock_ticks_per_second() as f64;
    let cpu = (after - before) as f64 / hz / secs * 100.0;
    drop(producer);
    drop(pool);
    let spells = 40;
    let ((p50, p99), floor) = after_idle(workers, spells, true)?;
    let (f50, f99) = floor.expect("asked for");
    // Again with everything on this thread's CPU: workers inherit the mask.
    let allowed = crate::sys::allowed_cpus();
    crate::sys::pin_to_cpu(crate::sys::current_cpu()).map_err(|e| e.to_string())?;
    let one = after_idle(workers, spells, false);
    crate::sys::set_affinity(&allowed).map_err(|e| e.to_string())?;
    let ((o50, o99), _) = one?;
    Ok(IdleFigures {
        cpu_percent_of_one_core: cpu,
        idle_seconds: secs,
        first_task_p50_us: p50,
        first_task_p99_us: p99,
        floor_p50_us: f50,
        floor_p99_us: f99,
        spells,
        one_cpu_first_task_p50_us: o50,
        one_cpu_first_task_p99_us: o99,
    })
}

/// Runs every comparison `reps` times, interleaved, then the idle measurement.
///
/// # Errors
/// A pool that cannot start, or a result that came back wrong.
pub fn measure(b: &LibraryBench) -> Result<LibraryReport, String> {
    let builder = |mode: Mode, pack: u64, ahead: Duration| {
        Pool::builder()
            .queue_ahead(ahead)
            .workers(b.workers)
            .producers(2)
            .mode(mode)
            .max_array_bytes(4 << 20)
            .slots_per_producer(4 * b.workers)
            .pack_bytes(pack)
            .kernels(kernels())
    };
    let start_with = |mode: Mode, pack: u64, ahead: Duration| {
        builder(mode, pack, ahead)
            .build()
            .map_err(|e| e.to_string())
    };
    let start = |mode: Mode, pack: u64| start_with(mode, pack, DEFAULT_QUEUE_AHEAD);
    let in_place = start(Mode::InPlace, 64 << 10)?;
    let out_place = start(Mode::OutOfPlace, 64 << 10)?;
    let unpacked = start(Mode::OutOfPlace, 0)?;
    let unpaced = start_with(Mode::InPlace, 64 << 10, Duration::MAX)?;
    // As `out_place`, whose maps pack in its pack slots, without them: maps pack in the
    // largest slots.
    let no_pack_slots = || {
        builder(Mode::OutOfPlace, 64 << 10, DEFAULT_QUEUE_AHEAD)
            .pack_slots(0)
            .build()
            .map_err(|e| e.to_string())
    };
    // As `out_place`, its maps copying every array in by ordinary stores.
    let ordinary = builder(Mode::OutOfPlace, 64 << 10, DEFAULT_QUEUE_AHEAD)
        .streaming_stores(false)
        .build()
        .map_err(|e| e.to_string())?;
    let mut pord = ordinary.producer().map_err(|e| e.to_string())?;
    let pi = in_place.producer().map_err(|e| e.to_string())?;
    let pn = unpaced.producer().map_err(|e| e.to_string())?;
    let po = out_place.producer().map_err(|e| e.to_string())?;
    let builtin = Task::op("affine:3,1").expect("valid");
    let x3p1 = Task::kernel("x3p1");
    let affine = Task::kernel("affine").params(Params::from_f64(&[3.0, 1.0]).expect("two"));
    let inflight = 4 * b.workers;
    let small = small_arrays(b.map_arrays);
    let mut rows: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    let mut add = |name: &str, a: f64, bb: f64| match rows.iter_mut().find(|r| r.0 == name) {
        Some(r) => {
            r.1.push(a);
            r.2.push(bb);
        }
        None => rows.push((name.to_string(), vec![a], vec![bb])),
    };
    for _ in 0..b.reps {
        let k = drive::<i32>(&pi, &x3p1, 128, b.duration, fill_i32, check_i32)?;
        let bi = drive::<i32>(&pi, &builtin, 128, b.duration, fill_i32, check_i32)?;
        add(
            "user kernel x*3+1 / built-in affine:3,1 (int32, in place, max-dim 128)",
            k,
            bi,
        );
        for dim in [128, 1024] {
            let t = threads_f32(b.workers, inflight, dim, b.duration)?;
            // As many threads as the pool side has busy CPUs (its workers and the caller), and
            // batches as large as the pool's slots hold in bytes (4 MiB each).
            let batch = (inflight * (4 << 20) / (4 * dim * dim)).max(1);
            let r = rayon_f32(b.workers + 1, batch, dim, b.duration)?;
            let ip = drive::<f32>(&pi, &affine, dim, b.duration, fill_f32, check_f32)?;
            let op = drive::<f32>(&po, &affine, dim, b.duration, fill_f32, check_f32)?;
            add(
                &format!("f32 user kernel in place / threads (max-dim {dim})"),
                ip,
                t,
            );
            add(
                &format!("f32 user kernel out of place / threads (max-dim {dim})"),
                op,
                t,
            );
            add(
                &format!("f32 user kernel in place / rayon, batches of {batch} (max-dim {dim})"),
                ip,
                r,
            );
            add(
                &format!(
                    "f32 user kernel out of place / rayon, batches of {batch} (max-dim {dim})"
                ),
                op,
                r,
            );
            add(
                &format!("f32 user kernel out of place / in place (max-dim {dim})"),
                op,
                ip,
            );
            // What keeping tasks in the handle for a worker free costs while work flows.
            let n = drive::<f32>(&pn, &affine, dim, b.duration, fill_f32, check_f32)?;
            add(
                &format!(
                    "f32 user kernel in place: queue_ahead {} ms / no limit (max-dim {dim})",
                    DEFAULT_QUEUE_AHEAD.as_millis()
                ),
                ip,
                n,
            );
            // The most any pool could give here, with one caller: its fills and checks alone.
            let alone = caller_share_f32(inflight, dim, b.duration)?;
            add(
                &format!("f32 (max-dim {dim}): the caller's share alone, no pool / threads"),
                alone,
                t,
            );
            add(
                &format!("f32 user kernel in place / the caller's share alone (max-dim {dim})"),
                ip,
                alone,
            );
        }
        let mut pp = out_place.producer().map_err(|e| e.to_string())?;
        let packed = map_small(&mut pp, &small, Take::Copied)?;
        // (Right after, so that both see the host alike.)
        let packed_ordinary = map_small(&mut pord, &small, Take::Copied)?;
        let packed_view = map_small(&mut pp, &small, Take::InPlace)?;
        drop(pp);
        let mut pu = unpacked.producer().map_err(|e| e.to_string())?;
        let plain = map_small(&mut pu, &small, Take::Copied)?;
        let plain_view = map_small(&mut pu, &small, Take::InPlace)?;
        drop(pu);
        add(
            "map over small f32 arrays: packed / one per slot",
            packed,
            plain,
        );
        // The most packing could give here: the caller's own copies and checks, alone.
        let alone = caller_share_small(&small, 64 << 10, Take::Copied)?;
        add(
            "map over small f32 arrays: the caller's share alone, no pool / one per slot",
            alone,
            plain,
        );
        add(
            "map over small f32 arrays: packed / the caller's share alone, no pool",
            packed,
            alone,
        );
        // The same, each result read in place (`next_view`) rather than copied out.
        add(
            "map over small f32 arrays, read in place: packed / one per slot",
            packed_view,
            plain_view,
        );
        let alone_view = caller_share_small(&small, 64 << 10, Take::InPlace)?;
        add(
            "map over small f32 arrays, read in place: the caller's share alone, no pool / one per slot",
            alone_view,
            plain_view,
        );
        add(
            "map over small f32 arrays, packed: read in place / copied out",
            packed_view,
            packed,
        );
        // (Started here and stopped after, so that its workers take no part in the rest.)
        let pool = no_pack_slots()?;
        let packed_largest = map_small(
            &mut pool.producer().map_err(|e| e.to_string())?,
            &small,
            Take::Copied,
        )?;
        drop(pool);
        add(
            "map over small f32 arrays: packed in the largest slots (no pack slots) / one per slot",
            packed_largest,
            plain,
        );
        add(
            "map over small f32 arrays, packed: pack slots / no pack slots",
            packed,
            packed_largest,
        );
        add(
            "map over small f32 arrays, packed: streaming stores / ordinary stores",
            packed,
            packed_ordinary,
        );
    }
    drop((pi, po, pn, pord));
    drop((in_place, out_place, unpacked, unpaced, ordinary));
    let idle = idle(b.workers, b.idle)?;
    Ok(LibraryReport {
        workers: b.workers,
        reps: b.reps,
        comparisons: rows
            .into_iter()
            .map(|(name, a, bb)| {
                let ratio: Vec<f64> = a.iter().zip(&bb).map(|(x, y)| x / y).collect();
                Comparison {
                    name,
                    a: Spread::of(&a),
                    b: Spread::of(&bb),
                    ratio: Spread::of(&ratio),
                }
            })
            .collect(),
        idle,
    })
}
