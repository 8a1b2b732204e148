//! Helpers for tests that run the `mk1` binary: a watchdog on every child, JSON parsing, and
//! checks that nothing is left behind.
#![allow(dead_code)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const MK1: &str = env!("CARGO_BIN_EXE_mk1");

/// Runs `mk1 args…`, killing it if it takes longer than `limit` (then the test fails).
pub fn mk1(args: &[&str], limit: Duration) -> Output {
    let child = Command::new(MK1)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mk1");
    wait_with_limit(child, limit)
}

/// Waits for `child`, reading its output; kills it and panics after `limit`.
pub fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    let out = child.stdout.take();
    let err = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        if let Some(mut out) = out {
            out.read_to_end(&mut o).unwrap();
        }
        o
    });
    let ereader = std::thread::spawn(move || {
        let mut e = Vec::new();
        if let Some(mut err) = err {
            err.read_to_end(&mut e).unwrap();
        }
        e
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mk1 ran longer than {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: reader.join().unwrap(),
        stderr: ereader.join().unwrap(),
    }
}

/// The single JSON object mk1 printed on stdout.
pub fn json(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one JSON line on stdout, got: {text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(lines[0]).expect("valid JSON")
}

/// Entries in /dev/shm right now.
pub fn dev_shm() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Pids of live processes started as workers of coordinator `coordinator` (from their
/// MK1_WORKER environment), so a test can prove none outlived it.
pub fn workers_of(coordinator: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        for var in env.split(|&b| b == 0) {
            if let Some(v) = var.strip_prefix(b"MK1_WORKER=") {
                let v = String::from_utf8_lossy(v);
                if v.split(',').nth(2) == Some(&coordinator.to_string()) {
                    // Zombies have an empty environ, so a hit here is a live process.
                    found.push(pid);
                }
            }
        }
    }
    found
}

/// Waits up to `limit` for every worker of `coordinator` to be gone.
pub fn assert_no_workers_left(coordinator: u32, limit: Duration) {
    let start = Instant::now();
    loop {
        let left = workers_of(coordinator);
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "workers {left:?} of coordinator {coordinator} survived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether coordinator `pid` has started its producer threads, which it does only once every
/// worker has attached: from then on a worker's death is an ordinary death, not a start failure.
fn producing(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
        tasks.flatten().any(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("mk1-producer"))
        })
    })
}

/// Waits until coordinator `pid` has `n` live, attached workers (the run is producing);
/// returns their pids.
pub fn wait_for_workers(pid: u32, n: usize) -> Vec<u32> {
    let start = Instant::now();
    loop {
        let w = workers_of(pid);
        if w.len() >= n && producing(pid) {
            return w;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "workers of {pid} did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Makes `c` run with the x86_64 syscalls `nrs` failing with EPERM (a seccomp filter
/// installed between fork and exec, as a container's profile would).
#[cfg(target_arch = "x86_64")]
pub fn with_denied_syscalls(c: &mut Command, nrs: &[u32]) {
    const LD_ABS_W: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const RET_ALLOW: u32 = 0x7fff_0000;
    const RET_ERRNO: u32 = 0x0005_0000;
    const ARCH_X86_64: u32 = 0xc000_003e;
    let f = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut prog = vec![
        f(LD_ABS_W, 0, 0, 4),
        f(JEQ_K, 1, 0, ARCH_X86_64),
        f(RET_K, 0, 0, RET_ALLOW),
        f(LD_ABS_W, 0, 0, 0),
    ];
    for &nr in nrs {
        prog.push(f(JEQ_K, 0, 1, nr));
        prog.push(f(RET_K, 0, 0, RET_ERRNO | libc::EPERM as u32));
    }
    prog.push(f(RET_K, 0, 0, RET_ALLOW));
    // SAFETY: two prctl calls on a filter allocated before the fork and alive in the child until
    // exec; both are async-signal-safe.
    unsafe {
        c.pre_exec(move || {
            let fprog = libc::sock_fprog {
                len: prog.len() as u16,
                filter: prog.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &fprog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
