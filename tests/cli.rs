//! The `mk1 run` command end to end, as a user runs it.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

const KEYS: [&str; 21] = [
    "system",
    "matrices",
    "verified",
    "failed",
    "lost",
    "redone",
    "seconds",
    "matrices_per_s",
    "gb_per_s",
    "workers",
    "producers",
    "min_dim",
    "max_dim",
    "op",
    "dispatch",
    "inflight",
    "per_worker",
    "worker_restarts",
    "latency_ns",
    "tokens",
    "matrices_per_token",
];

/// Runs mk1 with `--json` plus `args`, checks it verified and left nothing behind.
fn verified_run(args: &[&str]) -> serde_json::Value {
    let shm_before = dev_shm();
    let mut all = vec!["run", "--json"];
    all.extend_from_slice(args);
    let child = Command::new(MK1)
        .args(&all)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = wait_with_limit(child, LIMIT);
    assert!(
        out.status.success(),
        "mk1 {all:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json(&out);
    assert_eq!(j["verified"], true, "{j}");
    assert_eq!(j["failed"], 0);
    assert_eq!(j["lost"], 0);
    assert_no_workers_left(pid, Duration::from_secs(5));
    assert_eq!(dev_shm(), shm_before, "/dev/shm changed");
    j
}

fn per_worker(j: &serde_json::Value) -> Vec<u64> {
    j["per_worker"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

#[test]
fn json_has_every_key_and_consistent_counts() {
    let j = verified_run(&["--workers", "2", "--count", "20000", "--max-dim", "128"]);
    for k in KEYS {
        assert!(j.get(k).is_some(), "missing key {k} in {j}");
    }
    let lat = |k: &str| {
        j["latency_ns"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("latency_ns.{k}"))
    };
    assert!(
        0 < lat("p50") && lat("p50") <= lat("p99") && lat("p99") <= lat("max"),
        "{j}"
    );
    assert_eq!(j["system"], "mk1");
    assert_eq!(j["matrices"], 20000);
    assert_eq!(per_worker(&j).iter().sum::<u64>(), 20000);
    assert!(j["seconds"].as_f64().unwrap() > 0.0);
    assert!(j["gb_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(j["op"], "affine:3,1");
    assert_eq!(j["dispatch"], "random");
}

#[test]
fn random_dispatch_reaches_every_worker() {
    let j = verified_run(&[
        "--workers",
        "3",
        "--count",
        "3000",
        "--max-dim",
        "32",
        "--batch",
        "off",
    ]);
    let pw = per_worker(&j);
    assert_eq!(pw.len(), 3);
    assert!(pw.iter().all(|&n| n > 300), "every worker used: {pw:?}");
}

#[test]
fn max_dim_1024_verifies() {
    let j = verified_run(&["--workers", "2", "--count", "300", "--max-dim", "1024"]);
    assert_eq!(j["matrices"], 300);
    assert!(per_worker(&j).iter().all(|&n| n > 0));
}

#[test]
fn duration_mode_and_every_op_and_dispatch() {
    for (op, dispatch) in [
        ("neg", "round-robin"),
        ("abs", "least-loaded"),
        ("xor:255", "random"),
        ("mul:-7", "random"),
        ("add:9", "round-robin"),
    ] {
        let j = verified_run(&[
            "--workers",
            "2",
            "--duration",
            "300ms",
            "--max-dim",
            "64",
            "--op",
            op,
            "--dispatch",
            dispatch,
        ]);
        assert_eq!(j["op"], op);
        assert_eq!(j["dispatch"], dispatch);
        assert!(j["matrices"].as_u64().unwrap() > 0);
        // First issue to last return spans the requested duration (timestamps are not stale).
        let secs = j["seconds"].as_f64().unwrap();
        assert!(
            (0.2..10.0).contains(&secs),
            "seconds {secs} for a 300 ms run: {j}"
        );
        assert!(j["latency_ns"]["p50"].as_u64().unwrap() > 0, "{j}");
    }
}

/// Op parameters in hexadecimal, as `mk1 apply` takes them (once refused by `mk1 run`).
#[test]
fn hexadecimal_op_parameters_verify() {
    let j = verified_run(&["--workers", "1", "--count", "200", "--op", "xor:0xff"]);
    assert_eq!(j["op"], "xor:255");
    assert_eq!(j["matrices"], 200);
}

#[test]
fn summary_is_human_readable() {
    let out = mk1(&["run", "--workers", "1", "--count", "1000"], LIMIT);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("Processed 1000 matrices in "), "{text}");
    assert!(text.contains("0 lost, 0 failed"), "{text}");
    assert!(text.contains("p50"), "{text}");
}

#[test]
fn bad_invocations_exit_2_with_one_line() {
    let cases: &[&[&str]] = &[
        &["run", "--workers", "0"],
        &["run", "--workers", "-1"],
        &["run", "--workers", "abc"],
        &["run", "--workers", "100000"],
        &["run", "--max-dim", "0"],
        &["run", "--min-dim", "9", "--max-dim", "8"],
        &["run", "--duration", "soon"],
        &["run", "--duration", "-1s"],
        &["run", "--dispatch", "fastest"],
        &["run", "--op", "sqrt"],
        &["run", "--batch", "many"],
        &["run", "--inflight", "0"],
        &["run", "--producers", "0"],
        &["run", "--count", "0"],
        &["run", "--kernel", "sse9"],
        &["run", "--workers"],
        &["fly"],
        &[
            "run",
            "--max-dim",
            "16384",
            "--inflight",
            "4096",
            "--workers",
            "64",
        ],
    ];
    for args in cases {
        let out = mk1(args, LIMIT);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{args:?} one line: {err}"
        );
        assert!(err.starts_with("mk1: error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
}

#[test]
fn too_much_memory_names_the_sizes() {
    let out = mk1(
        &[
            "run",
            "--max-dim",
            "16384",
            "--inflight",
            "4096",
            "--workers",
            "64",
        ],
        LIMIT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err.contains("asked for") && err.contains("available"),
        "{err}"
    );
}

#[test]
fn library_api_runs_with_the_binary_as_worker() {
    let report = mk1::Config::default()
        .workers(2)
        .max_dim(48)
        .stop(mk1::Stop::Count(5000))
        .worker_exe(MK1)
        .run()
        .expect("starts");
    assert!(report.verified, "{report}");
    assert_eq!(report.matrices, 5000);
    assert_eq!(report.per_worker.iter().sum::<u64>(), 5000);
}

#[test]
fn a_program_that_is_not_a_worker_is_a_clear_start_error() {
    let err = mk1::Config::default()
        .workers(1)
        .stop(mk1::Stop::Count(10))
        .worker_exe("/bin/true")
        .run()
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("run_if_worker"), "{msg}");
}

/// However short the duration, a run issues a matrix and verifies it: a run of none was "NOT
/// verified", exit 1, with nothing wrong.
#[test]
fn a_very_short_duration_still_verifies() {
    for d in ["1us", "50us"] {
        let out = mk1(&["run", "--duration", d, "--json"], LIMIT);
        let j = json(&out);
        assert_eq!(out.status.code(), Some(0), "{d}: {j}");
        assert_eq!(j["verified"], true, "{d}: {j}");
        assert!(j["matrices"].as_u64().unwrap() >= 1, "{d}: {j}");
    }
}

/// Output that cannot be written (a full disk) is an environment error: one line on stderr
/// and exit 2, for a job that itself succeeded; a closed pipe (`| head`) is not an error.
#[test]
fn an_unwritable_stdout_exits_2() {
    let full = std::fs::File::options()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = Command::new(MK1)
        .args(["run", "--count", "50", "--json"])
        .stdout(full)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("cannot write to stdout").count(), 1, "{err}");
}

/// A stderr that cannot be written changes no exit code (usage errors stayed 2, not a panic's
/// 101, found by a new-user trial), and help or the version read by a reader that has gone
/// (`mk1 --help | head -1`) is no error.
#[test]
fn exit_codes_hold_without_stderr_and_for_a_reader_gone() {
    let full = || {
        std::fs::File::options()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full")
    };
    for (args, code) in [
        (&["run", "--workers", "0"][..], 2),
        (&["--bogus"][..], 2),
        (
            &["apply", "--op", "neg", "/no/such.npy", "--out-dir", "/tmp"][..],
            2,
        ),
        (&["run", "--count", "50"][..], 0),
    ] {
        let out = Command::new(MK1)
            .args(args)
            .stderr(full())
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}");
    }
    for args in [&["--help"][..], &["run", "--help"][..], &["--version"][..]] {
        // (The reading end closed before mk1 starts: every write meets EPIPE.)
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(MK1)
            .args(args)
            .stdout(writer)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?}: {err}");
    }
}

/// `MK1_WORKER` set by hand (no pool's worker spec) is an environment error: exit 2, saying
/// what to unset, and nothing runs.
#[test]
fn a_stray_mk1_worker_variable_exits_2() {
    // Malformed (no such kernel as "scalar"), and well-formed but naming a live process that
    // is not its parent (pid 1).
    for value in ["1", "", "3,0,1,scalar,-,0,0", "3,0,1,portable,-,0,0"] {
        let out = Command::new(MK1)
            .args(["run", "--count", "50"])
            .env("MK1_WORKER", value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{value:?}: {err}");
        assert!(err.contains("unset MK1_WORKER"), "{value:?}: {err}");
        assert!(out.stdout.is_empty(), "{value:?}");
    }
}
