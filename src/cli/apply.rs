//! `mk1 apply`: a built-in op over `.npy` files, through worker processes, results written
//! atomically to an output directory.
//!
//! Every input header is checked before any worker starts (exit 2 naming the file and why);
//! results are written as they complete ([`npy::write_atomically`]), so a run stopped at any
//! point leaves only whole files. Exit 1 if any file failed, naming it; 128 + n when signal n
//! stopped the run early (the files in flight are written first).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, ValueEnum};
use mk1::npy::{self, NpyInfo};
use mk1::task::Builtin;
use mk1::{Completion, Mode, Pool, PoolBuilder, Producer, Shape, Task};

/// Flags of `mk1 apply`.
#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// The op: affine:A,B add:K mul:K neg abs clamp:LO,HI xor:K and:K or:K shl:N shr:N
    #[arg(long, value_parser = parse_builtin)]
    op: Builtin,
    /// Input .npy files
    #[arg(required = true, value_name = "FILE")]
    inputs: Vec<PathBuf>,
    /// Directory for the results (created if missing); each keeps its input's file name
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
    /// Worker processes [default: CPU cores - 1, at least 1]
    #[arg(long, value_name = "N")]
    workers: Option<u32>,
    /// out-of-place: inputs are read-only in workers and a task whose worker dies is redone;
    /// in-place: half the memory
    #[arg(long, value_enum, default_value_t = ModeArg::OutOfPlace)]
    mode: ModeArg,
    /// Print one JSON object on stdout instead of the summary
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum ModeArg {
    InPlace,
    OutOfPlace,
}

fn parse_builtin(s: &str) -> Result<Builtin, String> {
    Builtin::parse(s).map_err(|e| e.to_string())
}

/// One input, checked.
struct Input {
    path: PathBuf,
    out: PathBuf,
    info: NpyInfo,
}

/// Slots for files of `sizes` bytes: enough to keep every worker busy while results are
/// written, not more. Files larger than half the largest get slots of the largest size; the
/// others get slots of their own largest size (so one large file among many small ones maps
/// one large slot, not one per worker).
fn sized_for(pool: PoolBuilder, sizes: &[u64], workers: u32) -> PoolBuilder {
    let busy = 2 * workers + 2;
    let largest = sizes.iter().copied().max().unwrap_or(0).max(64);
    let count = |n: usize| (n.max(1) as u32).min(busy);
    let (large, small): (Vec<u64>, Vec<u64>) = sizes.iter().partition(|&&b| b * 2 > largest);
    // (Apply loans and submits; it never maps, so it needs no pack slots.)
    let pool = pool
        .max_array_bytes(largest)
        .slots_per_producer(count(large.len()))
        .pack_slots(0);
    match small.iter().max() {
        Some(&s) if s.max(64) * 2 <= largest => pool.size_class(s.max(64), count(small.len())),
        _ => pool,
    }
}

fn usage(msg: impl std::fmt::Display) -> ExitCode {
    errln!("mk1 apply: {msg}");
    ExitCode::from(2)
}

/// Checks everything that can be checked before starting: the op for every file's dtype,
/// every header, the output directory, name clashes.
fn check(args: &ApplyArgs) -> Result<Vec<Input>, String> {
    let mut inputs = Vec::with_capacity(args.inputs.len());
    let mut names: HashMap<std::ffi::OsString, &Path> = HashMap::new();
    for path in &args.inputs {
        let info = npy::inspect(path).map_err(|e| e.to_string())?;
        args.op
            .check(info.dtype)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let name = path
            .file_name()
            .ok_or_else(|| format!("{}: not a file name", path.display()))?;
        if let Some(other) = names.insert(name.to_os_string(), path) {
            return Err(format!(
                "{} and {} would both be written to {}",
                other.display(),
                path.display(),
                args.out_dir.join(name).display()
            ));
        }
        let out = args.out_dir.join(name);
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same(path, &out) {
            return Err(format!(
                "{} would be overwritten by its own result: choose another --out-dir",
                path.display()
            ));
        }
        inputs.push(Input {
            out,
            path: path.clone(),
            info,
        });
    }
    if args.out_dir.exists() && !args.out_dir.is_dir() {
        return Err(format!(
            "--out-dir {} exists and is not a directory",
            args.out_dir.display()
        ));
    }
    std::fs::create_dir_all(&args.out_dir)
        .map_err(|e| format!("cannot create {}: {e}", args.out_dir.display()))?;
    let probe = args
        .out_dir
        .join(format!(".mk1-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| format!("cannot write to {}: {e}", args.out_dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(inputs)
}

/// What the write-back side keeps.
struct State<'i> {
    by_ticket: HashMap<mk1::Ticket, &'i Input>,
    failed: Vec<String>,
    written: u64,
    /// Data bytes of the files written.
    bytes: u64,
    bar: Option<indicatif::ProgressBar>,
    /// A result could not be written for want of space (`ENOSPC`, `EDQUOT`): no file is
    /// started after it (each would fail the same way, a line each).
    full: bool,
}

impl State<'_> {
    /// Writes one result (or records why not).
    fn finish(&mut self, done: Completion<'_>) {
        let input = self.by_ticket.remove(&done.ticket()).expect("our ticket");
        match write_result(input, &done) {
            Ok(()) => {
                self.written += 1;
                self.bytes += input.info.data_bytes;
            }
            Err((e, full)) => {
                self.full |= full;
                self.failed.push(e);
            }
        }
        if let Some(b) = &self.bar {
            b.inc(1);
        }
    }
}

/// Runs `mk1 apply`.
pub fn apply(args: ApplyArgs) -> ExitCode {
    // A stopping signal ends the run early and cleanly: no file is started after it, those in
    // flight are written, then the summary says so (exit 128 + the signal's number). Caught
    // from the start, so the checks below (which write and remove a probe file in the output
    // directory) always finish.
    let signal = match super::stop_signals() {
        Ok(s) => s,
        Err(e) => return usage(e),
    };
    let stopped = || signal.load(std::sync::atomic::Ordering::Relaxed);
    let inputs = match check(&args) {
        Ok(i) => i,
        Err(e) => return usage(e),
    };
    let largest = inputs.iter().map(|i| i.info.data_bytes).max().unwrap_or(0);
    if largest > mk1::layout::MAX_SLOT_BYTES {
        let big = inputs
            .iter()
            .find(|i| i.info.data_bytes == largest)
            .expect("the largest");
        return usage(format!(
            "{}: {largest} bytes of data; mk1 moves arrays of at most {} bytes",
            big.path.display(),
            mk1::layout::MAX_SLOT_BYTES
        ));
    }
    if args.workers == Some(0) {
        return usage("--workers: 0 is outside 1..=1024 (at least one worker runs the op)");
    }
    let workers = args.workers.unwrap_or_else(mk1::config::default_workers);
    let pool = Pool::builder()
        .workers(workers)
        .mode(match args.mode {
            ModeArg::InPlace => Mode::InPlace,
            ModeArg::OutOfPlace => Mode::OutOfPlace,
        })
        // The registry this binary's workers serve with (see main.rs); apply runs built-in
        // ops only.
        .kernels(mk1::bench::library::kernels());
    let sizes: Vec<u64> = inputs.iter().map(|i| i.info.data_bytes).collect();
    let pool = sized_for(pool, &sizes, workers).build();
    let pool = match pool {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let producer = match pool.producer() {
        Ok(p) => p,
        Err(e) => return usage(e),
    };
    let bar = (!args.json && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new(inputs.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} files {msg}")
                .expect("valid template"),
        );
        b
    });
    let task = Task::builtin(args.op);
    let start = Instant::now();
    let mut st = State {
        by_ticket: HashMap::new(),
        failed: Vec::new(),
        written: 0,
        bytes: 0,
        bar,
        full: false,
    };
    let mut started = 0usize;
    for input in &inputs {
        if stopped() != 0 || st.full {
            break;
        }
        started += 1;
        let loan = loop {
            match producer.try_loan::<u8>(Shape::d1(input.info.data_bytes as u32)) {
                Ok(l) => break Some(l),
                Err(mk1::LoanError::Busy { .. } | mk1::LoanError::Exhausted { .. }) => {
                    match producer.recv() {
                        Some(done) => st.finish(done),
                        None => break None,
                    }
                }
                Err(e) => {
                    st.failed.push(format!("{}: {e}", input.path.display()));
                    break None;
                }
            }
        };
        let Some(mut loan) = loan else { continue };
        if let Err(e) = npy::read_data(&input.path, &input.info, loan.as_mut_slice()) {
            st.failed.push(e.to_string());
            continue;
        }
        match submit(&producer, loan, &task, &input.info) {
            Ok(t) => {
                st.by_ticket.insert(t, input);
            }
            Err(e) => st.failed.push(format!("{}: {e}", input.path.display())),
        }
    }
    while let Some(done) = producer.recv() {
        st.finish(done);
    }
    let State {
        failed,
        written,
        bytes,
        bar,
        full,
        ..
    } = st;
    let signal = stopped();
    let interrupted = (signal != 0).then(|| mk1::report::signal_name(signal));
    let not_started = inputs.len() - started;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    for f in &failed {
        errln!("mk1 apply: {f}");
    }
    let restarts = pool.restarts();
    let segment_bytes = pool.segment_bytes();
    drop(producer);
    drop(pool);
    if args.json {
        let v = serde_json::json!({
            "op": args.op.to_string(),
            "files": inputs.len(),
            "written": written,
            "failed": failed.len(),
            "failures": failed,
            "bytes": bytes,
            "seconds": seconds,
            "gb_per_s": if seconds > 0.0 { bytes as f64 / seconds / 1e9 } else { 0.0 },
            "workers": workers,
            "worker_restarts": restarts,
            "segment_bytes": segment_bytes,
            "out_dir": args.out_dir.display().to_string(),
            "interrupted": interrupted,
            "out_of_space": full,
            "not_started": not_started,
        });
        outln!("{v}");
    } else {
        outln!(
            "mk1 apply {}: {written}/{} files written to {} ({:.1} MB in {:.2} s, {} failed, {restarts} worker restarts)",
            args.op,
            inputs.len(),
            args.out_dir.display(),
            bytes as f64 / 1e6,
            seconds,
            failed.len()
        );
        if let Some(name) = &interrupted {
            outln!(
                "stopped by {name}: {not_started} files not started (those started were finished)"
            );
        } else if full && not_started > 0 {
            outln!(
                "stopped: the output directory is out of space; {not_started} files not started \
                 (those started were finished or failed alone)"
            );
        }
    }
    super::exit_code(if signal != 0 {
        128 + signal as u8
    } else if failed.is_empty() {
        0
    } else {
        1
    })
}

/// Submits the bytes in `loan` as an array of the file's dtype (the loan was taken as bytes;
/// the op runs on the real dtype).
fn submit(
    producer: &Producer<'_>,
    loan: mk1::Loan<'_, u8>,
    task: &Task,
    info: &NpyInfo,
) -> Result<mk1::Ticket, String> {
    let elements = u32::try_from(info.elements()).map_err(|_| "too many elements".to_string())?;
    producer
        .submit_bytes(loan, info.dtype, Shape::d1(elements), task)
        .map_err(|e| e.to_string())
}

/// Writes one result; why not, and whether for want of space.
fn write_result(input: &Input, done: &Completion<'_>) -> Result<(), (String, bool)> {
    let bytes = done
        .output_bytes()
        .map_err(|e| (format!("{}: {e}", input.path.display()), false))?;
    npy::write_atomically(
        &input.out,
        input.info.dtype,
        &input.info.shape,
        input.info.fortran_order,
        bytes,
    )
    .map_err(|e| {
        let full =
            matches!(&e, npy::NpyError::Io { source, .. } if mk1::sys::is_out_of_space(source));
        (e.to_string(), full)
    })
}
