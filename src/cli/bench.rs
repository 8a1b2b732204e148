//! `mk1 bench`: systems side by side, token latency, kernels. Flags and output only; the
//! measuring lives in `mk1::bench`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use mk1::bench::{self, Job, SystemRun, SystemSummary};

use super::{parse_duration, usage_error, JobArgs};
use mk1::bench::library::LibraryBench;

/// `mk1 bench` flags.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: Option<BenchWhat>,
    #[command(flatten)]
    job: JobArgs,
    /// Largest dimensions to compare at, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "16,128,1024")]
    max_dim: Vec<u32>,
    /// How long each system issues matrices, per repetition
    #[arg(long, default_value = "400ms", value_parser = parse_duration, allow_hyphen_values = true)]
    duration: Duration,
    /// Repetitions, interleaved across systems; the table shows the median and the range
    #[arg(long, default_value_t = 3)]
    reps: u32,
    /// Systems to run, comma-separated (mk1, threads, unix-socket, pipe, inline)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "mk1,threads,unix-socket,pipe,inline"
    )]
    systems: Vec<String>,
    /// One JSON object per max-dim on stdout instead of tables
    #[arg(long)]
    json: bool,
    /// Also draw the comparison as grouped bars into this SVG file
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
enum BenchWhat {
    /// Token round trip with one token in flight: mk1 spinning, mk1 via futex, Unix socket
    Latency {
        /// Round trips to time
        #[arg(long, default_value_t = 100_000)]
        round_trips: u64,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// The library API: user kernel vs built-in op, pool vs threads, packing, idle cost
    Library {
        /// Worker processes (and threads for the baseline) [default: CPU cores - 1, at least 1]
        #[arg(long, value_name = "N")]
        workers: Option<u32>,
        /// Repetitions, interleaved; the table shows the median and the range
        #[arg(long, default_value_t = 5)]
        reps: u32,
        /// Length of each throughput run
        #[arg(long, default_value = "500ms", value_parser = parse_duration, allow_hyphen_values = true)]
        duration: Duration,
        /// Small arrays per `map` run in the packing comparison
        #[arg(long, default_value_t = 1_000_000)]
        map_arrays: u64,
        /// The idle spell after which the pool's CPU use is measured
        #[arg(long, default_value = "5s", value_parser = parse_duration, allow_hyphen_values = true)]
        idle: Duration,
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Throughput of every available kernel, in cache (32 KiB) and out of cache (4 MiB)
    Kernels {
        /// JSON on stdout
        #[arg(long)]
        json: bool,
    },
}

/// Serves as a bench child process (socket, pipe, ping-pong worker) if asked to.
pub fn bench_child_if_requested() {
    bench::run_child_if_requested();
}

fn exe() -> Result<std::path::PathBuf, ExitCode> {
    std::env::current_exe().map_err(|e| usage_error(format!("cannot find the mk1 executable: {e}")))
}

pub fn main(args: BenchArgs) -> ExitCode {
    match args.what {
        Some(BenchWhat::Latency { round_trips, json }) => latency(round_trips, json),
        Some(BenchWhat::Kernels { json }) => kernels(json),
        Some(BenchWhat::Library {
            workers,
            reps,
            duration,
            map_arrays,
            idle,
            json,
        }) => library(
            LibraryBench {
                workers: workers.unwrap_or_else(mk1::config::default_workers),
                reps,
                duration,
                map_arrays,
                idle,
            },
            json,
        ),
        None => systems(&args),
    }
}

fn latency(n: u64, json: bool) -> ExitCode {
    if n == 0 {
        return usage_error("--round-trips must be at least 1");
    }
    let exe = match exe() {
        Ok(e) => e,
        Err(c) => return c,
    };
    match bench::measure_latency(&exe, n) {
        Ok(figures) => {
            if json {
                outln!("{}", serde_json::json!({ "latency": figures }));
            } else {
                outln!(
                    "{:<40} {:>10} {:>10} {:>12}",
                    "round trip, one token in flight",
                    "p50 ns",
                    "p99 ns",
                    "max ns"
                );
                for f in &figures {
                    outln!(
                        "{:<40} {:>10} {:>10} {:>12}",
                        f.transport,
                        f.latency_ns.p50,
                        f.latency_ns.p99,
                        f.latency_ns.max
                    );
                }
            }
            super::exit_code(0)
        }
        Err(e) => {
            errln!("mk1: bench latency failed: {e}");
            ExitCode::from(1)
        }
    }
}

fn library(b: LibraryBench, json: bool) -> ExitCode {
    // Flags checked before anything runs (usage errors: exit 2), as `mk1 run` checks its own.
    let max_workers = mk1::layout::MAX_WORKERS;
    if !(1..=max_workers).contains(&b.workers) {
        return usage_error(format!(
            "--workers must be 1..={max_workers}, not {}",
            b.workers
        ));
    }
    for (flag, zero) in [
        ("--reps", b.reps == 0),
        ("--map-arrays", b.map_arrays == 0),
        ("--duration", b.duration.is_zero()),
        ("--idle", b.idle.is_zero()),
    ] {
        if zero {
            return usage_error(format!("{flag} must be more than 0"));
        }
    }
    let report = match bench::library::measure(&b) {
        Ok(r) => r,
        Err(e) => {
            errln!("mk1 bench library: {e}");
            return ExitCode::from(1);
        }
    };
    if json {
        outln!("{}", serde_json::to_string(&report).expect("serialisable"));
        return super::exit_code(0);
    }
    outln!(
        "mk1 bench library: {} workers, {} interleaved repetitions; ratio a/b per repetition: median (min..max)",
        report.workers,
        report.reps
    );
    for c in &report.comparisons {
        outln!(
            "  {:<72} {:>6.2}x ({:.2}..{:.2})   a {:>10.0}/s  b {:>10.0}/s",
            c.name,
            c.ratio.median,
            c.ratio.min,
            c.ratio.max,
            c.a.median,
            c.b.median
        );
    }
    let i = &report.idle;
    outln!(
        "  idle {:.1} s: pool processes used {:.3}% of one CPU; first task after an idle spell: p50 {:.0} us, p99 {:.0} us ({} spells)",
        i.idle_seconds,
        i.cpu_percent_of_one_core,
        i.first_task_p50_us,
        i.first_task_p99_us,
        i.spells
    );
    outln!(
        "  a reference, interleaved: two threads waking each other by a futex after an idle spell, p50 {:.0} us, p99 {:.0} us",
        i.floor_p50_us,
        i.floor_p99_us
    );
    outln!(
        "  the same with the caller and the workers on one CPU: p50 {:.0} us, p99 {:.0} us",
        i.one_cpu_first_task_p50_us,
        i.one_cpu_first_task_p99_us
    );
    super::exit_code(0)
}

fn kernels(json: bool) -> ExitCode {
    match bench::measure_kernels(&[32 << 10, 4 << 20], 5, Duration::from_millis(20)) {
        Ok(r) => {
            if json {
                outln!("{}", serde_json::to_string(&r).expect("serialisable"));
            } else {
                outln!("selected by --kernel auto: {}", r.selected);
                outln!(
                    "{:<10} {:<20} {:>9} {:>10} {:>12}",
                    "kernel",
                    "op",
                    "bytes",
                    "GB/s",
                    "vs portable"
                );
                for f in &r.kernels {
                    let base = r
                        .rate("portable", &f.op, f.bytes)
                        .map_or(String::new(), |p| format!("{:.2}x", f.gb_per_s / p));
                    outln!(
                        "{:<10} {:<20} {:>9} {:>10.1} {:>12}",
                        f.kernel,
                        f.op,
                        f.bytes,
                        f.gb_per_s,
                        base
                    );
                }
                // The pairs measured side by side: each kernel and size, a / b.
                for (a, b, what) in [
                    (
                        bench::COPY_MK1,
                        bench::COPY_MEMCPY,
                        "copy out of a page-aligned slot to 16 bytes into a page: mk1 / memcpy",
                    ),
                    (
                        bench::OUT_OF_PLACE_ONE_PASS,
                        bench::OUT_OF_PLACE_COPY,
                        "out of place: one pass / copy then op",
                    ),
                ] {
                    for f in r.kernels.iter().filter(|f| f.op == a) {
                        if let Some(g) = r.rate(f.kernel, b, f.bytes) {
                            outln!(
                                "{what}, {} at {} bytes = {:.2}x",
                                f.kernel,
                                f.bytes,
                                f.gb_per_s / g
                            );
                        }
                    }
                }
            }
            super::exit_code(0)
        }
        Err(e) => {
            errln!("mk1: bench kernels failed: {e}");
            ExitCode::from(1)
        }
    }
}

fn systems(args: &BenchArgs) -> ExitCode {
    for s in &args.systems {
        if !bench::SYSTEMS.contains(&s.as_str()) {
            return usage_error(format!(
                "unknown system `{s}`: expected {}",
                bench::SYSTEMS.join(", ")
            ));
        }
    }
    if args.reps == 0 {
        return usage_error("--reps must be at least 1");
    }
    if args.duration.is_zero() {
        return usage_error("--duration must be more than 0");
    }
    if let Some(path) = &args.plot {
        // (Checked before the runs, not after minutes of them: the file is made, then removed
        // until the plot is drawn.)
        let fresh = !path.exists();
        if let Err(e) = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
        {
            return usage_error(format!("--plot {}: {e}", path.display()));
        }
        if fresh {
            let _ = std::fs::remove_file(path);
        }
    }
    if args.job.producers != 1 {
        // The baselines have one producer thread; mk1 must be compared on the same terms.
        return usage_error("bench compares single-producer systems: --producers must be 1 (use `mk1 run --producers P`)");
    }
    if args.max_dim.is_empty() {
        return usage_error("--max-dim needs at least one value");
    }
    let exe = match exe() {
        Ok(e) => e,
        Err(c) => return c,
    };
    // Validate every max-dim up front with the same rules as `mk1 run`.
    for &m in &args.max_dim {
        if let Err(e) = args.job.config(m).plan() {
            return usage_error(e);
        }
    }
    let workers = args
        .job
        .workers
        .unwrap_or_else(mk1::config::default_workers);
    let chatty = std::io::stderr().is_terminal();
    let mut all_ok = true;
    let mut tables = Vec::new();
    for &max_dim in &args.max_dim {
        let cfg = args.job.config(max_dim);
        let job = Job {
            workers,
            inflight: cfg.inflight,
            min_dim: cfg.min_dim,
            max_dim,
            op: cfg.op,
            seed: cfg.seed,
            duration: args.duration,
            kernels: mk1::ops::Kernels::new(cfg.kernel).expect("checked by plan"),
            exe: exe.clone(),
        };
        let mut runs: Vec<(&'static str, Vec<SystemRun>)> = bench::SYSTEMS
            .iter()
            .filter(|s| args.systems.iter().any(|x| x == *s))
            .map(|s| (*s, Vec::new()))
            .collect();
        for rep in 0..args.reps {
            for (name, rs) in runs.iter_mut() {
                if chatty {
                    err!(
                        "\rmax-dim {max_dim}: rep {}/{} {:<12}",
                        rep + 1,
                        args.reps,
                        name
                    );
                }
                match bench::run_system(name, &job) {
                    Ok(r) => rs.push(r),
                    Err(e) => {
                        errln!("\nmk1: bench {name} at max-dim {max_dim} failed: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
        }
        if chatty {
            err!("\r{:<60}\r", "");
        }
        let summary = bench::summarise(&runs);
        all_ok &= summary.iter().all(|s| s.verified);
        if args.json {
            let line = serde_json::json!({
                "max_dim": max_dim,
                "workers": workers,
                "inflight": job.inflight,
                "reps": args.reps,
                "seconds_per_run": args.duration.as_secs_f64(),
                "kernel": job.kernels.kernel().name(),
                "systems": summary,
            });
            outln!("{line}");
        } else {
            print_table(max_dim, workers, &job, args.reps, &summary);
        }
        tables.push((max_dim, summary));
    }
    if let Some(path) = &args.plot {
        if let Err(e) = plot(path, workers, &tables) {
            errln!("mk1: cannot draw {}: {e}", path.display());
            return ExitCode::from(1);
        }
        if !args.json {
            outln!("plot written to {}", path.display());
        }
    }
    if all_ok {
        super::exit_code(0)
    } else {
        errln!("mk1: some runs did not verify");
        ExitCode::from(1)
    }
}

/// A ratio to mk1, with enough digits to tell small ones apart.
fn ratio(r: f64) -> String {
    if r >= 0.01 {
        format!("{r:.2}x")
    } else {
        format!("{r:.4}x")
    }
}

fn print_table(max_dim: u32, workers: u32, job: &Job, reps: u32, rows: &[SystemSummary]) {
    outln!(
        "\nmax-dim {max_dim}, {workers} worker(s), {} in flight per worker, op {}, kernel {}, median of {reps} interleaved run(s) of {:?}",
        job.inflight,
        job.op,
        job.kernels.kernel(),
        job.duration
    );
    outln!(
        "{:<12} {:>13} {:>23} {:>8} {:>10} {:>10} {:>8} {:>8}",
        "system",
        "matrices/s",
        "range (worst..best)",
        "GB/s",
        "p50 ns",
        "p99 ns",
        "vs mk1",
        "verified"
    );
    for s in rows {
        outln!(
            "{:<12} {:>13.0} {:>23} {:>8.2} {:>10} {:>10} {:>8} {:>8}",
            s.system,
            s.matrices_per_s,
            format!(
                "{:.0}..{:.0}",
                s.worst_matrices_per_s, s.best_matrices_per_s
            ),
            s.gb_per_s,
            s.latency_ns.p50,
            s.latency_ns.p99,
            ratio(s.ratio_to_mk1),
            if s.verified { "yes" } else { "NO" }
        );
    }
    if max_dim <= mk1::config::AUTO_BATCH_MAX_DIM {
        outln!("(mk1 packs matrices up to {max_dim}x{max_dim} many per token here; the other systems send one per message)");
    }
}

/// One panel per max-dim, a bar per system (median matrices/s), best run as a tick.
fn plot(
    path: &std::path::Path,
    workers: u32,
    tables: &[(u32, Vec<SystemSummary>)],
) -> Result<(), String> {
    use plotters::prelude::*;
    let width = 360 * tables.len().max(1) as u32;
    let root = SVGBackend::new(path, (width, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root
        .titled(
            &format!("mk1 vs alternatives: matrices/s, {workers} worker(s), same job (median; tick = best)"),
            ("sans-serif", 18),
        )
        .map_err(|e| e.to_string())?;
    let panels = root.split_evenly((1, tables.len().max(1)));
    let colors = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    for (panel, (max_dim, rows)) in panels.iter().zip(tables) {
        let top = rows
            .iter()
            .map(|s| s.best_matrices_per_s)
            .fold(1.0, f64::max)
            * 1.2;
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("max-dim {max_dim}"), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..rows.len() as f64, 0.0..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_label_formatter(&|y| format!("{:.0}k", y / 1e3))
            .y_desc("matrices/s")
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, s) in rows.iter().enumerate() {
            let x = i as f64;
            let c = colors[i % colors.len()];
            chart
                .draw_series([Rectangle::new(
                    [(x + 0.15, 0.0), (x + 0.85, s.matrices_per_s)],
                    c.filled(),
                )])
                .map_err(|e| e.to_string())?;
            chart
                .draw_series([PathElement::new(
                    vec![
                        (x + 0.3, s.best_matrices_per_s),
                        (x + 0.7, s.best_matrices_per_s),
                    ],
                    BLACK.stroke_width(2),
                )])
                .map_err(|e| e.to_string())?;
            // The system's name and its ratio to mk1 above the bar (or above the best-run tick).
            let above = s.best_matrices_per_s.max(s.matrices_per_s);
            chart
                .draw_series([
                    Text::new(
                        s.system.to_string(),
                        (x + 0.1, above + top * 0.09),
                        ("sans-serif", 12),
                    ),
                    Text::new(
                        ratio(s.ratio_to_mk1),
                        (x + 0.1, above + top * 0.045),
                        ("sans-serif", 12),
                    ),
                ])
                .map_err(|e| e.to_string())?;
        }
    }
    root.present().map_err(|e| e.to_string())?;
    Ok(())
}
