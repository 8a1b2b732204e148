//! `mk1 bench latency`: one token in flight, round trip producer → worker → producer.
//!
//! Three ways in the same run: mk1's rings with both sides spinning, mk1's rings with both
//! sides going straight to sleep (every hand-off is a futex wake), and a 4-byte ping-pong over a
//! Unix stream socket between two processes.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::stream::spawn_child;
use crate::config::Wait;
use crate::report::Latency;

/// One way of doing a round trip.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyFigure {
    /// What was measured.
    pub transport: &'static str,
    /// Round trips timed.
    pub round_trips: u64,
    /// Round-trip time, nanoseconds.
    pub latency_ns: Latency,
}

fn mk1_round_trips(exe: &std::path::Path, wait: Wait, n: u64) -> Result<Latency, String> {
    let r = crate::Config::default()
        .workers(1)
        .inflight(1)
        .min_dim(1)
        .max_dim(1)
        .batch(crate::Batch::Off)
        .wait(wait)
        .stop(crate::Stop::Count(n))
        .worker_exe(exe)
        .run()
        .map_err(|e| e.to_string())?;
    if !r.verified {
        return Err(format!("latency run did not verify: {r}"));
    }
    Ok(r.latency_ns)
}

fn socket_round_trips(exe: &std::path::Path, n: u64) -> Result<Latency, String> {
    let (mut mine, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
    let fd = theirs.as_raw_fd();
    let _child = spawn_child(
        exe,
        format!("pingpong:{fd},{}", crate::sys::own_pid()),
        &[fd],
    )?;
    drop(OwnedFd::from(theirs));
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let mut b = *b"ping";
    for i in 0..n + 1000 {
        let t = Instant::now();
        mine.write_all(&b).map_err(|e| e.to_string())?;
        mine.read_exact(&mut b).map_err(|e| e.to_string())?;
        if i >= 1000 {
            hist.saturating_record(t.elapsed().as_nanos() as u64);
        }
    }
    if &b != b"ping" {
        return Err("ping-pong returned other bytes".into());
    }
    Ok(Latency {
        p50: hist.value_at_quantile(0.5),
        p99: hist.value_at_quantile(0.99),
        max: hist.max(),
    })
}

/// Measures the three transports, `n` round trips each (the futex path uses a tenth: it is
/// slower and its cost is all in the kernel: see `futex_round_trips`).
pub fn measure_latency(exe: &std::path::Path, n: u64) -> Result<Vec<LatencyFigure>, String> {
    let spin = mk1_round_trips(exe, Wait::Auto, n)?;
    let sleep = mk1_round_trips(exe, Wait::Sleep, futex_round_trips(n))?;
    let socket = socket_round_trips(exe, n)?;
    Ok(vec![
        LatencyFigure {
            transport: "mk1 ring, spinning",
            round_trips: n,
            latency_ns: spin,
        },
        LatencyFigure {
            transport: "mk1 ring, futex wake every hand-off",
            round_trips: futex_round_trips(n),
            latency_ns: sleep,
        },
        LatencyFigure {
            transport: "unix socket ping-pong, 4 bytes",
            round_trips: n,
            latency_ns: socket,
        },
    ])
}

/// Round trips of the futex row for `n` asked: a tenth (each sleeps and wakes, so it is slow),
/// 100 at least, and never more than asked.
fn futex_round_trips(n: u64) -> u64 {
    (n / 10).max(100).min(n)
}
