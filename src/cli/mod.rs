//! Flags → validated [`mk1::Config`] → run → report → exit code.
//!
//! Exit codes: 0 the job verified; 1 the job failed (a matrix wrong or lost); 2 bad usage or
//! environment, reported before any process starts, or a job that succeeded but whose output
//! could not be written; 128+n when stopped by signal n after draining (130 SIGINT, 143
//! SIGTERM).

/// `println!` that drops the line quietly when stdout's reader has gone (piped into `head`,
/// say) instead of panicking, and reports any other failure (see [`write_line`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_line(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: a line that cannot be written to stderr (a closed pipe, a
/// full disk) is dropped, so the exit code stays the one the result gives.
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `eprint!` that never panics (see [`errln!`]).
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

mod apply;
mod bench;

/// Writes one line to stdout. A reader that has gone away (`mk1 run | head -1`) ends nothing:
/// the line is dropped, and the exit code still comes from the run's result. Any other write
/// error (a full disk) is reported on stderr, once; it is an environment
/// error: a job that succeeded then exits 2 ([`exit_code`]).
pub fn write_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // (A standard stream closed when mk1 started, `>&-`, is /dev/null by then: Rust's runtime
    // puts it on every closed standard descriptor, so no file mk1 opens can take its number,
    // and what is written there goes nowhere, as with `> /dev/null`.)
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        if e.kind() != std::io::ErrorKind::BrokenPipe
            && !STDOUT_FAILED.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            errln!("mk1: cannot write to stdout: {e}");
        }
    }
}

/// Set when a write to stdout failed for a reason other than a closed pipe.
pub static STDOUT_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The exit code of a command whose job ended with `code` (0 it succeeded, 1 it failed,
/// 128+n stopped by signal n): 2 where the job succeeded but its output could not be written
/// (an environment error); a failed or stopped job keeps its own code.
pub fn exit_code(code: u8) -> ExitCode {
    if code == 0 && STDOUT_FAILED.load(std::sync::atomic::Ordering::Relaxed) {
        return ExitCode::from(2);
    }
    ExitCode::from(code)
}

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use mk1::{Batch, Config, DispatchKind, Kernel, Op, Pin, Stop};

pub use bench::bench_child_if_requested;

/// Move matrices between processes through shared memory; run elementwise ops in workers.
#[derive(Parser, Debug)]
#[command(name = "mk1", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the pipeline: fill matrices, send tokens to worker processes, verify every result.
    Run(RunArgs),
    /// Compare mk1 with threads, Unix sockets, pipes and a single thread on the same job.
    Bench(bench::BenchArgs),
    /// Run a built-in op over .npy files through worker processes; write the results.
    Apply(apply::ApplyArgs),
}

/// Flags shared by `run` and `bench`.
#[derive(Args, Debug, Clone)]
pub struct JobArgs {
    /// Worker processes [default: CPU cores - 1, at least 1]
    #[arg(long, value_name = "N")]
    pub workers: Option<u32>,
    /// Producer threads, each with its own share of the tokens
    #[arg(long, value_name = "P", default_value_t = 1)]
    pub producers: u32,
    /// Smallest rows/cols of a matrix
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub min_dim: u32,
    /// Tokens in flight per worker
    #[arg(long, value_name = "K", default_value_t = 4)]
    pub inflight: u32,
    /// Which worker gets each token
    #[arg(long, value_enum, default_value_t = DispatchArg::Random)]
    pub dispatch: DispatchArg,
    /// Elementwise op: affine:A,B | add:K | mul:K | xor:K | neg | abs (int32, wrapping)
    #[arg(long, default_value = "affine:3,1", value_parser = parse_op)]
    pub op: Op,
    /// Seed for shapes, dispatch and fill
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Matrices per token: auto (pack when max-dim <= 64), off, or a cap 1..=64
    #[arg(long, default_value = "auto", value_parser = parse_batch)]
    pub batch: Batch,
    /// Kernel for fill, op and verify: auto | portable | avx2 | avx512
    #[arg(long, default_value = "auto", value_parser = Kernel::parse_and_check)]
    pub kernel: Kernel,
    /// Pin producers and workers to distinct CPUs when there are enough
    #[arg(long, value_enum, default_value_t = PinArg::Auto)]
    pub pin: PinArg,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Largest rows/cols of a matrix
    #[arg(long, value_name = "N", default_value_t = 128)]
    max_dim: u32,
    /// How long to issue matrices (e.g. 20s, 500ms, 2m; a bare number is seconds)
    #[arg(long, default_value = "20s", value_parser = parse_duration, allow_hyphen_values = true, conflicts_with = "count")]
    duration: Duration,
    /// Issue exactly this many matrices instead of running for a duration
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Worker restarts allowed before the run stops issuing and fails
    #[arg(long, value_name = "N", default_value_t = 100)]
    max_restarts: u32,
    /// Kill a worker that holds tokens but makes no progress for this long
    #[arg(long, default_value = "5s", value_parser = parse_duration, allow_hyphen_values = true)]
    worker_timeout: Duration,
    /// Print one JSON object on stdout instead of the summary
    #[arg(long)]
    json: bool,
    /// No progress line; only the first summary line
    #[arg(long)]
    quiet: bool,
}

/// `--dispatch` values.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum DispatchArg {
    /// Uniformly random live worker (seeded)
    Random,
    /// Each live worker in turn
    RoundRobin,
    /// Live worker holding the fewest tokens
    LeastLoaded,
}

/// `--pin` values.
#[derive(ValueEnum, Debug, Clone, Copy)]
pub enum PinArg {
    /// Pin when every producer and worker gets its own CPU
    Auto,
    /// Never pin
    Off,
}

fn parse_op(s: &str) -> Result<Op, String> {
    s.parse().map_err(|e: mk1::ops::OpParseError| e.to_string())
}

fn parse_batch(s: &str) -> Result<Batch, String> {
    match s {
        "auto" => Ok(Batch::Auto),
        "off" => Ok(Batch::Off),
        n => match n.parse::<u32>() {
            Ok(k) if (1..=mk1::config::MAX_BATCH as u32).contains(&k) => Ok(Batch::Max(k)),
            _ => Err(format!(
                "expected auto, off or 1..={}",
                mk1::config::MAX_BATCH
            )),
        },
    }
}

/// `20s`, `500ms`, `250us` (or `µs`), `10ns`, `2m` (or `min`), `1.5s`, `1h`, or a bare number
/// of seconds (as the seed's `--duration 20`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || {
        format!(
            "`{s}` is not a duration (examples: 20s, 500ms, 250us, 2m; a bare number is seconds)"
        )
    };
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!(
            "`{s}` is negative; give a duration such as 20s or 500ms"
        ));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| err())?;
    let secs = match unit.trim() {
        "" | "s" => v,
        "ms" => v / 1e3,
        "us" | "µs" => v / 1e6,
        "ns" => v / 1e9,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(err()),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(secs))
}

impl JobArgs {
    /// The library configuration for these flags.
    pub fn config(&self, max_dim: u32) -> Config {
        Config::default()
            .workers(self.workers.unwrap_or_else(mk1::config::default_workers))
            .producers(self.producers)
            .min_dim(self.min_dim)
            .max_dim(max_dim)
            .inflight(self.inflight)
            .dispatch(match self.dispatch {
                DispatchArg::Random => DispatchKind::Random,
                DispatchArg::RoundRobin => DispatchKind::RoundRobin,
                DispatchArg::LeastLoaded => DispatchKind::LeastLoaded,
            })
            .op(self.op)
            .seed(self.seed)
            .batch(self.batch)
            .kernel(self.kernel)
            .pin(match self.pin {
                PinArg::Auto => Pin::Auto,
                PinArg::Off => Pin::Off,
            })
    }
}

/// Prints a one-line error and returns exit code 2.
pub fn usage_error(msg: impl std::fmt::Display) -> ExitCode {
    errln!("mk1: error: {msg}");
    ExitCode::from(2)
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                use std::io::Write;
                return match e.print().and_then(|()| std::io::stdout().flush()) {
                    // (A reader gone away, `mk1 --help | head -1`, is no error: see
                    // `write_line`.)
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                    Err(err) => usage_error(format!("cannot write to stdout: {err}")),
                };
            }
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = e.print();
                return ExitCode::from(2);
            }
            // One line: clap's first line without its "error: " prefix, and a pointer to help.
            // (With the lines that belong to it: clap lists missing arguments below it.)
            let text = e.render().to_string();
            let first: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = first.join(" ");
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            let first = if first.is_empty() {
                "invalid arguments"
            } else {
                first
            };
            return usage_error(format!("{first} (see `mk1 --help`)"));
        }
    };
    match cli.command {
        Command::Run(args) => run(args),
        Command::Bench(args) => bench::main(args),
        Command::Apply(args) => apply::apply(args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let stop = match args.count {
        Some(n) => Stop::Count(n),
        None => Stop::After(args.duration),
    };
    let cfg = args
        .job
        .config(args.max_dim)
        .stop(stop)
        .max_restarts(args.max_restarts)
        .worker_timeout(args.worker_timeout);
    if let Err(e) = cfg.plan() {
        return usage_error(e);
    }
    let signal = match stop_signals() {
        Ok(s) => s,
        Err(e) => return usage_error(e),
    };
    let bar =
        (!args.json && !args.quiet && std::io::stderr().is_terminal()).then(|| progress_bar(stop));
    let show = |p: &mk1::Progress| {
        if let Some(bar) = &bar {
            let rate = p.matrices as f64 / p.elapsed.as_secs_f64().max(1e-9);
            match p.stop {
                Stop::After(_) => bar.set_position(p.elapsed.as_millis() as u64),
                Stop::Count(_) => bar.set_position(p.matrices),
            }
            bar.set_message(format!("{} matrices, {:.0}/s", p.matrices, rate));
        }
    };
    let hooks = mk1::Hooks {
        progress: Some(&show),
        stop_signal: Some(&signal),
    };
    let result = mk1::run(&cfg, &hooks);
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = match result {
        Ok(r) => r,
        Err(e) => return usage_error(e),
    };
    if args.json {
        outln!(
            "{}",
            serde_json::to_string(&report).expect("a report serialises")
        );
    } else if args.quiet {
        outln!("{}", report.to_string().lines().next().unwrap_or_default());
    } else {
        outln!("{report}");
    }
    // The code comes from the report alone (which records the signal that stopped it, if one
    // did); an unwritable stdout can only make it worse, never better.
    exit_code(report.exit_code())
}

/// A flag set to the number of the first stopping signal that arrives (0 until one does).
///
/// Ctrl-C, `timeout`, `kill -- -PGID` and service managers signal the whole process group:
/// workers ignore these (see `sys::spawn_inheriting`), the command drains and reports. SIGHUP
/// already ignored when mk1 starts stays ignored: that is what `nohup` asks for. SIGINT and
/// SIGTERM are always handled, even in a script's background job (where the shell ignores
/// SIGINT): `kill -INT -- -PGID` must still drain the run.
pub(crate) fn stop_signals() -> Result<Arc<AtomicUsize>, String> {
    let signal = Arc::new(AtomicUsize::new(0));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        if sig == signal_hook::consts::SIGHUP && mk1::sys::signal_ignored(sig) {
            continue;
        }
        signal_hook::flag::register_usize(sig, signal.clone(), sig as usize)
            .map_err(|e| format!("cannot install a signal handler: {e}"))?;
    }
    Ok(signal)
}

fn progress_bar(stop: Stop) -> indicatif::ProgressBar {
    let (len, template) = match stop {
        Stop::After(d) => (
            d.as_millis() as u64,
            "{spinner} [{elapsed_precise}] {wide_bar} {msg}",
        ),
        Stop::Count(n) => (
            n,
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
        ),
    };
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("-1s").unwrap_err().contains("negative"));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("250µs"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1ns"), Ok(Duration::from_nanos(1)));
        for bad in ["", "s", "-1s", "10 parsecs", "1e999", "abc"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn batch_values() {
        assert_eq!(parse_batch("auto"), Ok(Batch::Auto));
        assert_eq!(parse_batch("off"), Ok(Batch::Off));
        assert_eq!(parse_batch("8"), Ok(Batch::Max(8)));
        assert!(parse_batch("0").is_err());
        assert!(parse_batch("65").is_err());
        assert!(parse_batch("lots").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
