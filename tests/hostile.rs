//! mk1 where users' machines and containers put it: cgroup and rlimit limits, seccomp profiles
//! that refuse syscalls, job-control signals to the whole process group, a binary deleted or
//! replaced while running, a worker frozen in the kernel, a CPU mask. Each test stands for its
//! class in `issues show 9`; tests that need root or a cgroup hierarchy print why they skip.

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

fn is_root() -> bool {
    rustix::process::getuid().is_root()
}

/// Sends `sig` to process `pid`.
fn send(pid: u32, sig: rustix::process::Signal) {
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), sig)
        .unwrap();
}

fn skip(why: &str) {
    eprintln!("SKIPPED: {why}");
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn cmd(args: &[&str]) -> Command {
    cmd_at(Path::new(MK1), args)
}

/// `program args`, stdin from /dev/null, stdout and stderr piped.
fn cmd_at(program: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn run(mut c: Command) -> Output {
    wait_with_limit(c.spawn().expect("start mk1"), LIMIT)
}

/// A usage/environment refusal: exit 2, exactly one line on stderr, no panic, nothing on stdout.
fn assert_refused(out: &Output, needle: &str) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Sets a resource limit in the child before exec.
fn with_rlimit(c: &mut Command, res: rustix::process::Resource, bytes: u64) {
    // SAFETY: setrlimit is a single async-signal-safe syscall on values copied into the closure.
    unsafe {
        c.pre_exec(move || {
            rustix::process::setrlimit(
                res,
                rustix::process::Rlimit {
                    current: Some(bytes),
                    maximum: Some(bytes),
                },
            )?;
            Ok(())
        });
    }
}

// ---------------------------------------------------------------------------------------------
// A. Limits are read where the kernel enforces them.

/// A cgroup made for one test and removed (after its processes are gone) on drop.
struct TestCgroup {
    dirs: Vec<PathBuf>,
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            for _ in 0..100 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Makes `outer/inner` with a limit set on `outer` (`v1_file` in the v1 hierarchy of
/// `controller`, else `v2_file` under this process's v2 cgroup, enabling the controller there if
/// it can): the process will run in `inner`, one level below its limit, as in a systemd scope or
/// a pod. `None` (the caller skips) where this host does not let us.
fn limited_cgroup(
    controller: &str,
    name: &str,
    v1_file: &'static str,
    v2_file: &'static str,
    value: &str,
) -> Option<(TestCgroup, PathBuf, &'static str)> {
    if !is_root() {
        return None;
    }
    let tag = format!("mk1-test-{}-{name}", std::process::id());
    let v1 = PathBuf::from(format!("/sys/fs/cgroup/{controller}"));
    let (base, file) = if v1.join("cgroup.procs").exists() {
        (v1, v1_file)
    } else {
        let mounts =
            mk1::limits::parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").ok()?);
        let m = mounts.into_iter().find(|m| m.v2)?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        let rel = rel
            .strip_prefix(m.root.trim_end_matches('/'))
            .unwrap_or(rel);
        let base = m.point.join(rel.trim_start_matches('/'));
        // Works where our cgroup is the (namespaced) root or has no processes of its own.
        let _ = std::fs::write(
            base.join("cgroup.subtree_control"),
            format!("+{controller}"),
        );
        (base, v2_file)
    };
    let outer = base.join(&tag);
    let inner = outer.join("inner");
    std::fs::create_dir_all(&inner).ok()?;
    let guard = TestCgroup {
        dirs: vec![outer.clone(), inner.clone()],
    };
    std::fs::write(outer.join(file), value).ok()?;
    Some((guard, inner, file))
}

/// `mk1 args` started inside cgroup directory `dir`.
fn in_cgroup(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
            dir.display()
        ))
        .arg(MK1)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

#[test]
fn a_memory_limit_on_an_enclosing_cgroup_is_refused_before_any_worker_starts() {
    // The limit sits one level above the cgroup mk1 runs in: a nested scope, as systemd and
    // Kubernetes make them.
    let limit = format!("{}", 200u64 << 20);
    let Some((_g, inner, file)) = limited_cgroup(
        "memory",
        "mem",
        "memory.limit_in_bytes",
        "memory.max",
        &limit,
    ) else {
        return skip("needs root and a memory cgroup (v1 or v2) this process may create and limit");
    };
    let args = [
        "run",
        "--workers",
        "1",
        "--max-dim",
        "4096",
        "--inflight",
        "8",
        "--duration",
        "2s",
    ];
    let out = run(in_cgroup(&inner, &args));
    assert_refused(&out, "not enough memory");
    let err = text(&out.stderr);
    assert!(err.contains(file) && err.contains("asked for"), "{err}");
    // A run that fits under the same limit still runs.
    let ok = run(in_cgroup(
        &inner,
        &[
            "run",
            "--workers",
            "1",
            "--max-dim",
            "256",
            "--duration",
            "300ms",
        ],
    ));
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
}

/// A small job in a 64 MiB container runs (the check once asked for 72 MiB whatever the job,
/// for one that used 2 MiB), and so does a Python-sized share per worker.
#[test]
fn a_small_run_fits_a_64_mib_container() {
    let limit = format!("{}", 64u64 << 20);
    let Some((_g, inner, file)) = limited_cgroup(
        "memory",
        "mem64",
        "memory.limit_in_bytes",
        "memory.max",
        &limit,
    ) else {
        return skip("needs root and a memory cgroup (v1 or v2) this process may create and limit");
    };
    for args in [
        &[
            "run",
            "--workers",
            "1",
            "--max-dim",
            "8",
            "--inflight",
            "1",
            "--count",
            "500",
        ][..],
        &["run", "--workers", "1", "--count", "500"][..],
    ] {
        let out = run(in_cgroup(&inner, args));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?} under {file} 64 MiB: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_pids_limit_is_refused_before_any_worker_starts() {
    let Some((_g, inner, _)) = limited_cgroup("pids", "pids", "pids.max", "pids.max", "4") else {
        return skip("needs root and a pids cgroup (v1 or v2) this process may create and limit");
    };
    let out = run(in_cgroup(
        &inner,
        &[
            "run",
            "--workers",
            "3",
            "--producers",
            "2",
            "--duration",
            "1s",
        ],
    ));
    assert_refused(&out, "too many tasks");
    assert!(text(&out.stderr).contains("pids.max"));
}

#[test]
fn an_address_space_limit_never_panics_aborts_or_hangs() {
    use rustix::process::Resource;
    // The smallest limit the binary can start under at all.
    let floor = (4u64..200)
        .map(|m| m << 20)
        .find(|&b| {
            let mut c = cmd(&["--version"]);
            with_rlimit(&mut c, Resource::As, b);
            run(c).status.success()
        })
        .expect("mk1 --version runs under some address-space limit");
    let mut outcomes = Vec::new();
    let mut mib = floor >> 20;
    while mib < (floor >> 20) + 160 {
        let mut c = cmd(&[
            "run",
            "--workers",
            "2",
            "--producers",
            "4",
            "--max-dim",
            "1024",
            "--duration",
            "200ms",
        ]);
        with_rlimit(&mut c, Resource::As, mib << 20);
        let out = wait_with_limit(c.spawn().unwrap(), Duration::from_secs(30));
        let err = text(&out.stderr);
        let code = out.status.code();
        assert!(
            code == Some(0) || code == Some(2),
            "RLIMIT_AS {mib} MiB: exit {:?}: {err}",
            out.status
        );
        assert!(
            !err.contains("panicked") && !err.contains("memory allocation"),
            "{err}"
        );
        if code == Some(2) {
            assert_eq!(err.lines().count(), 1, "{err}");
        }
        outcomes.push((mib, code));
        mib += 8;
    }
    assert!(
        outcomes.iter().any(|o| o.1 == Some(2)) && outcomes.iter().any(|o| o.1 == Some(0)),
        "the sweep crosses the threshold: {outcomes:?}"
    );
}

#[test]
fn file_size_and_descriptor_limits_are_refused_with_the_numbers() {
    use rustix::process::Resource;
    let mut c = cmd(&["run", "--max-dim", "1024", "--duration", "1s"]);
    with_rlimit(&mut c, Resource::Fsize, 1 << 20);
    assert_refused(&run(c), "RLIMIT_FSIZE");
    let mut c = cmd(&["run", "--workers", "8", "--duration", "1s"]);
    with_rlimit(&mut c, Resource::Nofile, 12);
    assert_refused(&run(c), "RLIMIT_NOFILE");
}

#[test]
fn a_process_limit_for_an_unprivileged_user_is_refused() {
    if !is_root() {
        return skip("needs root to become another user");
    }
    let mut c = cmd(&["run", "--workers", "4", "--duration", "1s"]);
    // SAFETY: setrlimit and setuid/setgid are single async-signal-safe syscalls.
    unsafe {
        c.pre_exec(|| {
            rustix::process::setrlimit(
                rustix::process::Resource::Nproc,
                rustix::process::Rlimit {
                    current: Some(2),
                    maximum: Some(2),
                },
            )?;
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = match c.spawn() {
        Ok(child) => child,
        Err(e) => return skip(&format!("cannot start the binary as uid 65534 here: {e}")),
    };
    let out = wait_with_limit(child, LIMIT);
    assert_refused(&out, "RLIMIT_NPROC");
}

// Seccomp: a filter installed between fork and exec fails the listed syscalls with EPERM.

#[cfg(target_arch = "x86_64")]
const PIDFD_OPEN: u32 = 434;
#[cfg(target_arch = "x86_64")]
const PIDFD_SEND_SIGNAL: u32 = 424;
#[cfg(target_arch = "x86_64")]
const WAITID: u32 = 247;
#[cfg(target_arch = "x86_64")]
const MEMFD_CREATE: u32 = 319;
#[cfg(target_arch = "x86_64")]
const KILL: u32 = 62;
#[cfg(target_arch = "x86_64")]
const GETRLIMIT: u32 = 97;
#[cfg(target_arch = "x86_64")]
const PRLIMIT64: u32 = 302;
#[cfg(target_arch = "x86_64")]
const FALLOCATE: u32 = 285;
#[cfg(target_arch = "x86_64")]
const MADVISE: u32 = 28;
#[cfg(target_arch = "x86_64")]
const FTRUNCATE: u32 = 77;

/// Runs 20000 matrices with worker 0 exiting after 300 tokens, with `prepare` applied to the
/// command (a seccomp filter, a signal disposition); the death must be noticed, the worker
/// replaced and nothing lost. `what` names the variant in failures.
fn replaced_worker_run(what: &str, prepare: impl FnOnce(&mut Command)) -> Output {
    let mut c = cmd(&[
        "run",
        "--json",
        "--workers",
        "2",
        "--count",
        "20000",
        "--max-dim",
        "32",
        "--batch",
        "off",
    ]);
    c.env("MK1_CHAOS", "exit:300@0");
    prepare(&mut c);
    let out = run(c);
    let j = json(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: {j} {}",
        text(&out.stderr)
    );
    assert_eq!(j["lost"], 0, "{what}: {j}");
    assert!(j["worker_restarts"].as_u64().unwrap() >= 1, "{what}: {j}");
    out
}

#[test]
fn the_pid_fallback_replaces_workers_on_any_architecture() {
    // The same path as a refused pidfd_open, forced without seccomp.
    replaced_worker_run("MK1_NO_PIDFD=1", |c| {
        c.env("MK1_NO_PIDFD", "1");
    });
}

#[cfg(target_arch = "x86_64")]
#[test]
fn refused_pidfd_syscalls_fall_back_to_pids_and_workers_are_still_replaced() {
    for deny in [
        vec![PIDFD_OPEN],
        vec![PIDFD_SEND_SIGNAL],
        vec![WAITID],
        vec![PIDFD_OPEN, PIDFD_SEND_SIGNAL, WAITID],
    ] {
        // A worker that exits mid-run must be noticed (exit pipe or pidfd), reaped (waitpid or
        // waitid) and replaced, with nothing lost.
        let out = replaced_worker_run(&format!("deny {deny:?}"), |c| {
            with_denied_syscalls(c, &deny)
        });
        assert!(
            text(&out.stderr).is_empty(),
            "no stray lines: {}",
            text(&out.stderr)
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn refused_poll_still_notices_deaths_and_refused_fork_is_a_clear_start_error() {
    // mk1 waits with ppoll (rustix); plain poll is left alone because Rust's own runtime uses
    // it at start-up to check fds 0-2, and aborts any Rust program where it is refused.
    const PPOLL: u32 = 271;
    replaced_worker_run("deny ppoll", |c| with_denied_syscalls(c, &[PPOLL]));
    // No process (or thread) can be started at all: one line that says what and why (the
    // pool's monitor thread is the first thing started, as workers are tied to it).
    const CLONE: u32 = 56;
    const CLONE3: u32 = 435;
    const FORK: u32 = 57;
    const VFORK: u32 = 58;
    let mut c = cmd(&["run", "--workers", "2", "--duration", "1s"]);
    with_denied_syscalls(&mut c, &[CLONE, CLONE3, FORK, VFORK]);
    assert_refused(&run(c), "cannot start");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_host_that_ignores_sigchld_still_tracks_workers_by_pidfd_and_refuses_the_pid_fallback() {
    // SIGCHLD ignored (inherited across exec, as from some service managers and shells): the
    // kernel reaps workers itself, so their pids may be reused. With pidfds deaths are still
    // handled; without them mk1 refuses to fall back to bare pids.
    let ignore_sigchld = |c: &mut Command| {
        // SAFETY: signal(2) with SIG_IGN is async-signal-safe and installs no handler.
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGCHLD, libc::SIG_IGN);
                Ok(())
            });
        }
    };
    replaced_worker_run("SIGCHLD ignored", ignore_sigchld);

    let mut c = cmd(&["run", "--workers", "1", "--duration", "1s"]);
    ignore_sigchld(&mut c);
    with_denied_syscalls(&mut c, &[PIDFD_OPEN]);
    assert_refused(&run(c), "ignores SIGCHLD");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn refused_limit_reads_count_as_no_limit_not_as_garbage() {
    // A profile that refuses prlimit64: the limits are unknown, so they are not checked up
    // front (a limit hit later is reported when it happens); before, the uninitialised result
    // was read as a limit of a few bytes and the run refused to start.
    for args in [
        &["run", "--workers", "1", "--duration", "300ms"][..],
        &[
            "run",
            "--workers",
            "1",
            "--duration",
            "300ms",
            "--max-dim",
            "1024",
        ][..],
    ] {
        let mut c = cmd(args);
        with_denied_syscalls(&mut c, &[PRLIMIT64, GETRLIMIT]);
        let out = run(c);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn refused_fallocate_commits_through_the_mapping_or_names_the_syscall() {
    let args = ["run", "--workers", "1", "--duration", "300ms"];
    let mut c = cmd(&args);
    with_denied_syscalls(&mut c, &[FALLOCATE]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Neither way to commit the memory up front: refused, naming what to allow.
    let mut c = cmd(&args);
    with_denied_syscalls(&mut c, &[FALLOCATE, MADVISE]);
    assert_refused(&run(c), "allow fallocate");
    // A refused ftruncate is named as itself (it was reported as fallocate).
    let mut c = cmd(&args);
    with_denied_syscalls(&mut c, &[FTRUNCATE]);
    let out = run(c);
    assert_refused(&out, "ftruncate");
    assert!(
        !text(&out.stderr).contains("fallocate"),
        "{}",
        text(&out.stderr)
    );
}

/// An empty /dev (a bare chroot or container): the error names /dev/null, not the program
/// (std's failure to open /dev/null for a child's stdin reads as a missing program).
#[test]
fn a_missing_dev_null_is_named() {
    let Some(c) = over_a_tmpfs("/dev", &["run", "--count", "10"]) else {
        return skip("an empty /dev needs unshare -m (root)");
    };
    assert_refused(&run(c), "/dev/null cannot be opened");
}

/// `mk1 args` in a private mount namespace where an empty 1 MiB tmpfs hides `target`; `None`
/// (the caller skips) where this host does not let us (it needs root and `unshare -m`).
fn over_a_tmpfs(target: &str, args: &[&str]) -> Option<Command> {
    let unshare_ok = Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !is_root() || !unshare_ok {
        return None;
    }
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=1m tmpfs {target} && exec \"$0\" \"$@\""
        ))
        .arg(MK1)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Some(c)
}

#[cfg(target_arch = "x86_64")]
#[test]
fn refused_memfd_create_falls_back_or_names_the_syscall() {
    let mut c = cmd(&["run", "--workers", "1", "--duration", "300ms"]);
    with_denied_syscalls(&mut c, &[MEMFD_CREATE]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Without the /dev/shm fallback the error names the syscall and what to do.
    let mut c = cmd(&["run", "--workers", "1", "--duration", "300ms"]);
    c.env("MK1_TEST_NO_TMPFILE", "1");
    with_denied_syscalls(&mut c, &[MEMFD_CREATE]);
    let out = run(c);
    assert_refused(&out, "memfd_create");
    assert!(
        text(&out.stderr).contains("seccomp"),
        "{}",
        text(&out.stderr)
    );
    // With the fallback in a /dev/shm too small for the segment (Docker's is 64 MiB), the error
    // names /dev/shm, not the machine's memory.
    let args = [
        "run",
        "--workers",
        "1",
        "--max-dim",
        "1024",
        "--duration",
        "300ms",
    ];
    let Some(mut c) = over_a_tmpfs("/dev/shm", &args) else {
        return skip("a small /dev/shm needs unshare -m (root)");
    };
    with_denied_syscalls(&mut c, &[MEMFD_CREATE]);
    assert_refused(&run(c), "/dev/shm");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn a_worker_that_cannot_be_killed_is_reported_and_the_run_ends() {
    // The watchdog's kill is refused both ways: the run says so, gives that worker's tokens up
    // as lost (it may still write its slots), and ends in bounded time with exit 1.
    let mut c = cmd(&[
        "run",
        "--json",
        "--workers",
        "2",
        "--duration",
        "20s",
        "--worker-timeout",
        "300ms",
    ]);
    c.env("MK1_CHAOS", "stall:500@0");
    with_denied_syscalls(&mut c, &[KILL, PIDFD_SEND_SIGNAL]);
    let started = Instant::now();
    let out = run(c);
    let j = json(&out);
    assert_eq!(out.status.code(), Some(1), "{j}");
    assert!(
        j["interrupted"]
            .as_str()
            .unwrap()
            .contains("cannot kill worker 0"),
        "{j}"
    );
    assert!(j["lost"].as_u64().unwrap() > 0, "{j}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "ended early, bounded"
    );
}

// ---------------------------------------------------------------------------------------------
// B. Running out after workers exist.

#[test]
fn a_producer_thread_that_cannot_start_stops_everything_cleanly() {
    for producers in ["2", "4"] {
        let mut c = cmd(&[
            "run",
            "--workers",
            "2",
            "--producers",
            producers,
            "--duration",
            "5s",
        ]);
        c.env("MK1_CHAOS_THREAD", "1");
        let child = c.spawn().unwrap();
        let pid = child.id();
        let started = Instant::now();
        let out = wait_with_limit(child, Duration::from_secs(20));
        assert_refused(&out, "cannot start producer thread 1");
        assert!(started.elapsed() < Duration::from_secs(10), "no hang");
        assert_no_workers_left(pid, Duration::from_secs(1));
    }
}

// ---------------------------------------------------------------------------------------------
// C. Job-control signals are the coordinator's.

#[test]
fn signals_to_the_whole_process_group_drain_like_a_signal_to_the_coordinator() {
    // As the reproduction runs it: a background job of a non-interactive shell, which
    // starts with SIGINT ignored; the group's SIGINT must still drain the run.
    for (sig, num, name) in [
        (rustix::process::Signal::INT, 2, "SIGINT"),
        (rustix::process::Signal::TERM, 15, "SIGTERM"),
        (rustix::process::Signal::HUP, 1, "SIGHUP"),
    ] {
        let mut c = cmd(&[
            "run",
            "--json",
            "--workers",
            "2",
            "--duration",
            "30s",
            "--max-restarts",
            "0",
        ]);
        c.process_group(0);
        // SAFETY: signal(2) with SIG_IGN is async-signal-safe and installs no handler.
        unsafe {
            c.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                Ok(())
            });
        }
        let child = c.spawn().unwrap();
        let pid = child.id();
        wait_for_workers(pid, 2);
        std::thread::sleep(Duration::from_millis(300));
        // The whole group, as a terminal's Ctrl-C, `timeout` or `kill -- -PGID` does.
        rustix::process::kill_process_group(
            rustix::process::Pid::from_raw(pid as i32).unwrap(),
            sig,
        )
        .unwrap();
        let out = wait_with_limit(child, Duration::from_secs(20));
        let j = json(&out);
        assert_eq!(out.status.code(), Some(128 + num), "{name}: {j}");
        assert_eq!(j["lost"], 0, "{j}");
        assert_eq!(j["worker_restarts"], 0, "no worker died: {j}");
        assert_eq!(j["worker_exits"].as_array().unwrap().len(), 0, "{j}");
        assert_eq!(j["interrupted"], name);
        assert_eq!(j["signal"], num);
        assert_no_workers_left(pid, Duration::from_secs(2));
    }
}

#[test]
fn a_stopped_and_resumed_process_group_loses_no_worker() {
    // Ctrl-Z then `fg`, `docker pause`, a cgroup freezer: the monitor stops with its workers,
    // for longer than the worker timeout. On resuming, a worker in the middle of a matrix has
    // returned nothing since the monitor's last look before the stop; that is not a stall.
    let mut c = cmd(&[
        "run",
        "--json",
        "--workers",
        "2",
        "--duration",
        "2s",
        "--max-dim",
        "1024",
        "--worker-timeout",
        "500ms",
    ]);
    c.process_group(0);
    let child = c.spawn().unwrap();
    let pid = child.id();
    wait_for_workers(pid, 2);
    let group = rustix::process::Pid::from_raw(pid as i32).unwrap();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(200));
        rustix::process::kill_process_group(group, rustix::process::Signal::STOP).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        rustix::process::kill_process_group(group, rustix::process::Signal::CONT).unwrap();
    }
    let out = wait_with_limit(child, LIMIT);
    let j = json(&out);
    assert_eq!(out.status.code(), Some(0), "{j} {}", text(&out.stderr));
    assert_eq!(j["worker_restarts"], 0, "no worker was killed: {j}");
    assert_eq!(j["worker_exits"].as_array().unwrap().len(), 0, "{j}");
    assert_eq!(
        (j["lost"].clone(), j["redone"].clone()),
        (0.into(), 0.into()),
        "{j}"
    );
    assert_eq!(j["verified"], true, "{j}");
}

#[test]
fn nohup_is_respected_and_a_drain_does_not_wait_out_a_long_worker_timeout() {
    // SIGHUP ignored by the parent (nohup): the run goes on through a hang-up.
    let mut c = cmd(&["run", "--json", "--workers", "1", "--duration", "1500ms"]);
    // SAFETY: signal(2) with SIG_IGN is async-signal-safe and installs no handler.
    unsafe {
        c.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = c.spawn().unwrap();
    let pid = child.id();
    wait_for_workers(pid, 1);
    send(pid, rustix::process::Signal::HUP);
    let out = wait_with_limit(child, LIMIT);
    let j = json(&out);
    assert_eq!(out.status.code(), Some(0), "{j}");
    assert!(j["interrupted"].is_null(), "{j}");

    // Ctrl-C while a worker sits on its tokens and --worker-timeout is long: the drain gives it
    // at most the shutdown grace, its tokens are redone on the other worker, nothing is lost.
    let mut c = cmd(&[
        "run",
        "--json",
        "--workers",
        "2",
        "--duration",
        "60s",
        "--worker-timeout",
        "60s",
    ]);
    c.env("MK1_CHAOS", "stall:2000@0");
    let child = c.spawn().unwrap();
    let pid = child.id();
    wait_for_workers(pid, 2);
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    send(pid, rustix::process::Signal::INT);
    let out = wait_with_limit(child, LIMIT);
    let j = json(&out);
    assert_eq!(out.status.code(), Some(130), "{j}");
    assert_eq!(j["lost"], 0, "{j}");
    assert!(
        sent.elapsed() < Duration::from_secs(15),
        "drained in {:?}, not after the 60 s worker timeout",
        sent.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// D. A worker is the running image, not a path.

fn private_copy(tag: &str) -> (PathBuf, PathBuf) {
    // Under target/, not /tmp: tests leave nothing in /tmp, and /tmp may be noexec.
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("mk1-test-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("mk1");
    std::fs::copy(MK1, &exe).unwrap();
    (dir, exe)
}

#[test]
fn restarts_start_the_running_build_whatever_happened_to_its_file() {
    for what in ["deleted", "replaced"] {
        let (dir, exe) = private_copy(what);
        let child = cmd_at(
            &exe,
            &["run", "--json", "--workers", "1", "--duration", "3s"],
        )
        .spawn()
        .unwrap();
        let pid = child.id();
        let first = wait_for_workers(pid, 1)[0];
        std::fs::remove_file(&exe).unwrap();
        if what == "replaced" {
            // Something else now has the name: an upgrade, or another program entirely.
            std::fs::write(&exe, "#!/bin/sh\necho not mk1; exit 3\n").unwrap();
            std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
        }
        send(first, rustix::process::Signal::KILL);
        let out = wait_with_limit(child, LIMIT);
        let _ = std::fs::remove_dir_all(&dir);
        let j = json(&out);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{what}: {j} {}",
            text(&out.stderr)
        );
        assert_eq!(j["lost"], 0);
        assert!(j["worker_restarts"].as_u64().unwrap() >= 1, "{j}");
        assert_no_workers_left(pid, Duration::from_secs(2));
    }
}

#[test]
fn a_worker_of_another_build_is_refused_once_not_restarted_forever() {
    let flag = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("mk1-test-{}-foreign", std::process::id()));
    let _ = std::fs::remove_file(&flag);
    let spawn = |flag: &Path| -> Child {
        let mut c = cmd(&["run", "--json", "--workers", "2", "--duration", "20s"]);
        c.env("MK1_CHAOS", "foreign:1@0")
            .env("MK1_CHAOS_FOREIGN_IF", flag);
        c.spawn().unwrap()
    };
    // At start: a clear start-up error.
    std::fs::write(&flag, "").unwrap();
    let out = wait_with_limit(spawn(&flag), LIMIT);
    assert_refused(&out, "not the same build");
    // At a restart: refused once, the run stops and says why.
    std::fs::remove_file(&flag).unwrap();
    let child = spawn(&flag);
    let pid = child.id();
    wait_for_workers(pid, 2);
    std::fs::write(&flag, "").unwrap();
    let victim = workers_of(pid)
        .into_iter()
        .find(|&w| {
            std::fs::read(format!("/proc/{w}/environ"))
                .is_ok_and(|e| String::from_utf8_lossy(&e).contains(&format!(",0,{pid},")))
        })
        .expect("worker 0");
    send(victim, rustix::process::Signal::KILL);
    let out = wait_with_limit(child, LIMIT);
    let _ = std::fs::remove_file(&flag);
    let j = json(&out);
    assert_eq!(out.status.code(), Some(1), "{j}");
    assert!(
        j["interrupted"]
            .as_str()
            .unwrap()
            .contains("not the same build"),
        "{j}"
    );
    assert_eq!(j["worker_restarts"], 1, "refused once: {j}");
    assert_eq!(j["lost"], 0, "its tokens were redone on worker 1: {j}");
    assert_no_workers_left(pid, Duration::from_secs(2));
}

// ---------------------------------------------------------------------------------------------
// E. The exit code comes from the report alone.

#[test]
fn a_closed_stdout_never_turns_a_failed_run_into_success() {
    for (chaos, want) in [("wrong:100", 1), ("", 0)] {
        let mut c = cmd(&[
            "run",
            "--json",
            "--workers",
            "1",
            "--count",
            "20000",
            "--batch",
            "off",
        ]);
        c.env("MK1_CHAOS", chaos);
        let mut child = c.spawn().unwrap();
        drop(child.stdout.take()); // the reader is gone, as with `| true`
        let out = wait_with_limit(child, LIMIT);
        assert_eq!(
            out.status.code(),
            Some(want),
            "{chaos}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_run_that_runs_out_of_workers_exits_1_and_says_why() {
    let out = run({
        let mut c = cmd(&[
            "run",
            "--json",
            "--workers",
            "1",
            "--duration",
            "10s",
            "--max-restarts",
            "0",
        ]);
        c.env("MK1_CHAOS", "exit:50");
        c
    });
    let j = json(&out);
    assert_eq!(out.status.code(), Some(1), "{j}");
    assert!(!j["interrupted"].is_null(), "{j}");
}

// ---------------------------------------------------------------------------------------------
// F. A worker that cannot die does not hold the run hostage.

/// Freezes `pid` in a cgroup v1 freezer, where frozen tasks stay put even with SIGKILL pending
/// (v2's `cgroup.freeze` lets SIGKILL through, so it cannot stand for a stuck worker); thaws and
/// removes the cgroup on drop.
struct Frozen {
    dir: PathBuf,
}

impl Frozen {
    fn new(pid: u32) -> Option<Frozen> {
        let dir = PathBuf::from(format!(
            "/sys/fs/cgroup/freezer/mk1-test-{}-freeze",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).ok()?;
        let frozen = Frozen { dir };
        std::fs::write(frozen.dir.join("cgroup.procs"), pid.to_string()).ok()?;
        std::fs::write(frozen.dir.join("freezer.state"), "FROZEN").ok()?;
        Some(frozen)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
        let _ = TestCgroup {
            dirs: vec![self.dir.clone()],
        };
    }
}

#[test]
fn a_worker_frozen_in_the_kernel_is_given_up_and_the_run_ends_on_time() {
    if !Path::new("/sys/fs/cgroup/freezer/cgroup.procs").exists() {
        return skip("needs root and a cgroup v1 freezer (v2 frozen tasks die on SIGKILL)");
    }
    let child = cmd(&[
        "run",
        "--json",
        "--workers",
        "2",
        "--duration",
        "3s",
        "--worker-timeout",
        "1s",
    ])
    // Its stderr is read to the end too: a frozen worker holds only mk1's internal pipe, never
    // ours (this test hung on exactly that before workers' stderr went through the coordinator).
    .spawn()
    .unwrap();
    let pid = child.id();
    let start = Instant::now();
    wait_for_workers(pid, 2);
    let victim = workers_of(pid)[0];
    let Some(frozen) = Frozen::new(victim) else {
        drop(wait_with_limit(child, LIMIT));
        return skip("could not freeze the worker");
    };
    let out = wait_with_limit(child, Duration::from_secs(20));
    let ended = start.elapsed();
    drop(frozen);
    let j = json(&out);
    assert_eq!(out.status.code(), Some(0), "{j}");
    assert_eq!(j["lost"], 0, "{j}");
    assert!(
        ended < Duration::from_secs(10),
        "bounded shutdown: {ended:?}"
    );
    let how = j["worker_exits"][0]["how"].as_str().unwrap();
    assert!(how.contains("stuck in the kernel"), "{j}");
    assert_eq!(j["unreaped"][0]["pid"], victim, "named: {j}");
    // Thawed, it dies of the pending SIGKILL and is gone.
    let t = Instant::now();
    while Path::new(&format!("/proc/{victim}/environ")).exists()
        && std::fs::read(format!("/proc/{victim}/environ")).is_ok_and(|e| !e.is_empty())
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "thawed worker {victim} died"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// G. Sharing the machine: a CPU mask is respected.

#[test]
fn a_run_inside_a_cpu_mask_never_uses_a_cpu_outside_it() {
    let cpus: Vec<usize> = {
        let set = rustix::thread::sched_getaffinity(None).unwrap();
        (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect()
    };
    let only = *cpus.last().unwrap();
    let mut c = cmd(&[
        "run",
        "--json",
        "--workers",
        "2",
        "--duration",
        "1500ms",
        "--pin",
        "auto",
    ]);
    let mut set = rustix::thread::CpuSet::new();
    set.set(only);
    // SAFETY: one sched_setaffinity syscall on a set built before the fork.
    unsafe {
        c.pre_exec(move || {
            rustix::thread::sched_setaffinity(None, &set)?;
            Ok(())
        });
    }
    let child = c.spawn().unwrap();
    let pid = child.id();
    let mut seen = std::collections::BTreeSet::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1200) {
        for p in std::iter::once(pid).chain(workers_of(pid)) {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
                continue;
            };
            for t in tasks.flatten() {
                let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                // Field 39 of stat: the CPU it last ran on.
                if let Some(cpu) = stat
                    .rsplit_once(") ")
                    .and_then(|(_, r)| r.split(' ').nth(36))
                    .and_then(|c| c.parse::<usize>().ok())
                {
                    seen.insert(cpu);
                }
                if let Some(list) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                {
                    assert_eq!(list.trim(), only.to_string(), "task {:?}", t.path());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = wait_with_limit(child, LIMIT);
    let j = json(&out);
    assert_eq!(out.status.code(), Some(0), "{j}");
    assert_eq!(
        j["pinned"], false,
        "three busy threads cannot each have a CPU of a 1-CPU mask"
    );
    assert!(
        seen.iter().all(|&c| c == only),
        "ran on {seen:?}, allowed only {only}"
    );
}
