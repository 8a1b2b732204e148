//! `mk1 bench` end to end: the comparison, latency and kernels commands, JSON and the plot.

mod common;

use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn systems_comparison_json_and_plot() {
    let svg = std::env::temp_dir().join(format!("mk1-bench-test-{}.svg", std::process::id()));
    let out = mk1(
        &[
            "bench",
            "--max-dim",
            "8,40",
            "--duration",
            "60ms",
            "--reps",
            "2",
            "--workers",
            "2",
            "--json",
            "--plot",
            svg.to_str().unwrap(),
        ],
        LIMIT,
    );
    let drawn = std::fs::read_to_string(&svg);
    let _ = std::fs::remove_file(&svg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, dim) in lines.iter().zip([8, 40]) {
        assert_eq!(line["max_dim"], dim);
        assert_eq!(line["workers"], 2);
        let systems = line["systems"].as_array().unwrap();
        let names: Vec<&str> = systems
            .iter()
            .map(|s| s["system"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["mk1", "threads", "unix-socket", "pipe", "inline"]);
        for s in systems {
            assert_eq!(s["verified"], true, "{s}");
            assert!(s["matrices_per_s"].as_f64().unwrap() > 0.0);
            assert!(s["latency_ns"]["p50"].as_u64().is_some());
            assert_eq!(s["runs"].as_array().unwrap().len(), 2);
        }
        assert_eq!(systems[0]["ratio_to_mk1"], 1.0);
    }
    let drawn = drawn.expect("plot written");
    assert!(
        drawn.contains("<svg") && drawn.contains("max-dim 40") && drawn.contains("unix-socket")
    );
}

#[test]
fn latency_reports_three_transports() {
    let out = mk1(
        &["bench", "latency", "--round-trips", "2000", "--json"],
        LIMIT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json(&out);
    let rows = j["latency"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for r in rows {
        let l = &r["latency_ns"];
        assert!(
            l["p50"].as_u64().unwrap() > 0 && l["p50"].as_u64() <= l["p99"].as_u64(),
            "{r}"
        );
    }
}

#[test]
fn kernels_json_lists_every_available_kernel() {
    let out = mk1(&["bench", "kernels", "--json"], LIMIT);
    assert!(out.status.success());
    let j = json(&out);
    let selected = j["selected"].as_str().unwrap();
    let rows = j["kernels"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["kernel"] == selected));
    assert!(rows
        .iter()
        .any(|r| r["kernel"] == "portable" && r["bytes"] == 32768));
    assert!(rows.iter().any(|r| r["bytes"] == 4 << 20));
    assert!(rows.iter().all(|r| r["gb_per_s"].as_f64().unwrap() > 0.0));
}

#[test]
fn library_bench_reports_every_comparison_and_the_idle_figures() {
    let out = mk1(
        &[
            "bench",
            "library",
            "--workers",
            "1",
            "--reps",
            "2",
            "--duration",
            "50ms",
            "--map-arrays",
            "2000",
            "--idle",
            "300ms",
            "--json",
        ],
        LIMIT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j = json(&out);
    let rows = j["comparisons"].as_array().unwrap();
    assert_eq!(rows.len(), 26, "{rows:?}");
    for r in rows {
        for side in ["a", "b", "ratio"] {
            let s = &r[side];
            let (lo, mid, hi) = (
                s["min"].as_f64().unwrap(),
                s["median"].as_f64().unwrap(),
                s["max"].as_f64().unwrap(),
            );
            assert!(lo > 0.0 && lo <= mid && mid <= hi, "{r}");
        }
    }
    assert!(rows
        .iter()
        .any(|r| r["name"].as_str().unwrap().contains("packed")));
    // The caller's share alone: for the packing comparison, and for the f32 one at each size.
    let alone = |what: &str| {
        rows.iter().any(|r| {
            let name = r["name"].as_str().unwrap();
            name.contains("the caller's share alone") && name.contains(what)
        })
    };
    assert!(alone("small f32 arrays") && alone("max-dim 128") && alone("max-dim 1024"));
    // And packed maps without the pool's pack slots.
    assert!(rows.iter().any(|r| r["name"]
        .as_str()
        .unwrap()
        .contains("pack slots / no pack slots")));
    let idle = &j["idle"];
    assert!(idle["cpu_percent_of_one_core"].as_f64().unwrap() >= 0.0);
    assert!(idle["first_task_p50_us"].as_f64().unwrap() > 0.0);
    let (f50, f99) = (
        idle["floor_p50_us"].as_f64().unwrap(),
        idle["floor_p99_us"].as_f64().unwrap(),
    );
    assert!(f50 > 0.0 && f50 <= f99, "{idle}");
    assert!(idle["one_cpu_first_task_p99_us"].as_f64().unwrap() > 0.0);
    assert_eq!(idle["spells"], 40);
}

#[test]
fn bad_bench_flags_exit_2() {
    for args in [
        &["bench", "--systems", "carrier-pigeon"][..],
        &["bench", "--reps", "0"],
        &["bench", "--max-dim", "0"],
        &["bench", "latency", "--round-trips", "0"],
        &["bench", "--producers", "2"],
        &["bench", "library", "--duration", "forever"],
        // Checked before anything runs (they were job failures, exit 1, or taken as 1).
        &["bench", "--duration", "0"],
        &[
            "bench",
            "--plot",
            "/nonexistent/dir/x.svg",
            "--duration",
            "10ms",
        ],
        &["bench", "library", "--workers", "0"],
        &["bench", "library", "--workers", "5000"],
        &["bench", "library", "--reps", "0"],
        &["bench", "library", "--map-arrays", "0"],
        &["bench", "library", "--duration", "0"],
    ] {
        let out = mk1(args, LIMIT);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr)
                .trim_end()
                .lines()
                .count(),
            1,
            "{args:?}"
        );
    }
}
