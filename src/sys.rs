//! Every system call mk1 makes, in one place, through rustix.
//!
//! Nothing above this module talks to the kernel directly. The functions here are thin, typed
//! and documented with the man page they wrap; none of them is called on the hot path except
//! [`futex_wait`] and [`futex_wake`], and those only when the other side has said it sleeps.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{MapFlags, ProtFlags};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};
use rustix::thread::futex;

use crate::sync::AtomicU32;

/// Creates an anonymous, close-on-exec memory file ([memfd_create(2)]).
///
/// It lives on the kernel's internal tmpfs, not `/dev/shm`, so the size of `/dev/shm` (64 MiB
/// under Docker) does not matter, and it is freed when the last fd and mapping go away. Where
/// `memfd_create` is refused (a kernel before 3.17, a seccomp profile) it falls back to an
/// unnamed file in `/dev/shm` (`O_TMPFILE`), which is just as anonymous but counts against
/// `/dev/shm`'s size; the commit that follows still fails up front if that is too small.
///
/// [memfd_create(2)]: https://man7.org/linux/man-pages/man2/memfd_create.2.html
pub fn memfd(name: &str) -> io::Result<OwnedFd> {
    let first = match rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC) {
        Ok(fd) => return above_stdio(fd),
        Err(e) => e,
    };
    if std::env::var_os("MK1_TEST_NO_TMPFILE").is_none() {
        if let Ok(fd) = rustix::fs::open(
            "/dev/shm",
            rustix::fs::OFlags::TMPFILE | rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        ) {
            return above_stdio(fd);
        }
    }
    Err(io::Error::new(
        io::Error::from(first).kind(),
        format!(
            "memfd_create(2) failed ({first}) and no unnamed file could be made in /dev/shm; \
             allow memfd_create in the seccomp profile, or mount a writable tmpfs on /dev/shm"
        ),
    ))
}

/// An unnamed, write-only file in directory `dir` ([open(2)] `O_TMPFILE`, mode 0666 less the
/// umask), if its filesystem makes them; it gets a name only through [`link_unnamed`].
///
/// [open(2)]: https://man7.org/linux/man-pages/man2/open.2.html
pub fn unnamed_file_in(dir: &std::path::Path) -> Option<File> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open(
        dir,
        OFlags::TMPFILE | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o666),
    )
    .ok()
    .map(File::from)
}

/// Names the unnamed `file` ([`unnamed_file_in`]) `path` ([linkat(2)] of its /proc/self/fd
/// entry, which needs no privilege, unlike `AT_EMPTY_PATH`). Fails with `AlreadyExists` if
/// `path` exists.
///
/// [linkat(2)]: https://man7.org/linux/man-pages/man2/linkat.2.html
pub fn link_unnamed(file: &File, path: &std::path::Path) -> io::Result<()> {
    use rustix::fs::{linkat, AtFlags, CWD};
    let by_fd = format!("/proc/self/fd/{}", file.as_raw_fd());
    Ok(linkat(
        CWD,
        by_fd.as_str(),
        CWD,
        path,
        AtFlags::SYMLINK_FOLLOW,
    )?)
}

/// Whether `fd` is a file on the filesystem mounted at `/dev/shm` (the fallback of [`memfd`]),
/// and if so the bytes still free there ([statvfs(3)]).
///
/// [statvfs(3)]: https://man7.org/linux/man-pages/man3/statvfs.3.html
pub fn dev_shm_room(fd: BorrowedFd<'_>) -> Option<u64> {
    let ours = rustix::fs::fstat(fd).ok()?;
    let shm = rustix::fs::stat("/dev/shm").ok()?;
    if ours.st_dev != shm.st_dev {
        return None;
    }
    let v = rustix::fs::statvfs("/dev/shm").ok()?;
    Some(v.f_bavail.saturating_mul(v.f_frsize))
}

/// Reserves every page of a file already sized to `len` ([`set_len`]) with [fallocate(2)], so
/// that touching the mapping later can never raise SIGBUS for want of memory.
///
/// [fallocate(2)]: https://man7.org/linux/man-pages/man2/fallocate.2.html
///
/// Returns `false` when `fallocate` is refused outright (a seccomp profile, a filesystem
/// without it): nothing is committed yet; the caller then commits through the mapping with
/// [`Mapping::commit`]. Out of memory or space is an error here.
pub fn commit(fd: BorrowedFd<'_>, len: u64) -> io::Result<bool> {
    match rustix::fs::fallocate(fd, FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::PERM | rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP) => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// Sets an open file's size ([ftruncate(2)]); to 0, gives its pages back.
pub fn set_len(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    Ok(rustix::fs::ftruncate(fd, len)?)
}

/// The size of an open file ([fstat(2)]).
///
/// [fstat(2)]: https://man7.org/linux/man-pages/man2/fstat.2.html
pub fn file_len(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(rustix::fs::fstat(fd)?.st_size as u64)
}

/// A shared, read-write mapping of a whole file; unmapped on drop.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; every access to its contents goes
// through raw pointers whose users document their own synchronisation.
unsafe impl Send for Mapping {}
// SAFETY: as above; `Mapping` itself has no interior state besides the fixed pointer and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` shared and read-write ([mmap(2)]).
    ///
    /// [mmap(2)]: https://man7.org/linux/man-pages/man2/mmap.2.html
    pub fn shared(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mapping> {
        // SAFETY: we ask for a fresh mapping (null hint, no MAP_FIXED), so no existing memory is
        // replaced; the kernel checks `fd` and `len`.
        let ptr = unsafe {
            rustix::mm::mmap(
                core::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )?
        };
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Commits every page of the mapping by writing nothing to it ([madvise(2)]
    /// `MADV_POPULATE_WRITE`, Linux 5.14): where the memory cannot be had, an error now
    /// instead of a SIGBUS at first touch later. The fallback of [`commit`].
    ///
    /// [madvise(2)]: https://man7.org/linux/man-pages/man2/madvise.2.html
    pub fn commit(&self) -> io::Result<()> {
        // SAFETY: the range is exactly our own live mapping; MADV_POPULATE_WRITE faults its
        // pages in as writable without changing their contents (zeros in a fresh file), so no
        // memory anyone reads changes.
        unsafe {
            rustix::mm::madvise(
                self.ptr.cast(),
                self.len,
                rustix::mm::Advice::LinuxPopulateWrite,
            )?
        };
        Ok(())
    }

    /// Makes the first `len` bytes (a multiple of the page size) read-only in this process
    /// ([mprotect(2)]); a later write there is a SIGSEGV in this process only.
    ///
    /// [mprotect(2)]: https://man7.org/linux/man-pages/man2/mprotect.2.html
    pub fn protect_prefix_read_only(&self, len: usize) -> io::Result<()> {
        assert!(len <= self.len, "prefix within the mapping");
        // SAFETY: the range is inside our own mapping; read-only is a subset of the current
        // read-write protection, so no existing reference becomes invalid for reads. Callers
        // only ever write the prefix through atomics they no longer use after this call.
        unsafe { rustix::mm::mprotect(self.ptr.cast(), len, rustix::mm::MprotectFlags::READ)? };
        Ok(())
    }

    /// Makes `len` bytes from `offset` (page aligned; `len` is rounded up to whole pages) read
    /// only in this process; a later write there is a SIGSEGV in this process only.
    pub fn protect_read_only(&self, offset: usize, len: usize) -> io::Result<()> {
        // SAFETY: read-only is a subset of the current protection, so existing references stay
        // valid for reads. The caller creates no mutable references into the range afterwards
        // (the worker only ever views task inputs through shared slices).
        unsafe { self.protect(offset, len, rustix::mm::MprotectFlags::READ) }
    }

    /// Makes `len` bytes at `offset` (page aligned) inaccessible in this process: any access
    /// faults from now on.
    ///
    /// # Safety
    /// Nothing in this process may use a reference into the range afterwards.
    pub unsafe fn protect_none(&self, offset: usize, len: usize) -> io::Result<()> {
        // SAFETY: the caller promises that no reference into the range is used again, so
        // revoking access breaks nothing Rust relies on.
        unsafe { self.protect(offset, len, rustix::mm::MprotectFlags::empty()) }
    }

    /// `mprotect` of `len` bytes at `offset` (page aligned) of this mapping.
    ///
    /// # Safety
    /// References into the range must stay valid under `flags` (the callers' contracts).
    unsafe fn protect(
        &self,
        offset: usize,
        len: usize,
        flags: rustix::mm::MprotectFlags,
    ) -> io::Result<()> {
        assert!(
            offset.is_multiple_of(4096) && offset.checked_add(len).is_some_and(|e| e <= self.len),
            "range within the mapping"
        );
        // SAFETY: the range is inside our own mapping (checked above); the caller vouches for
        // the references into it.
        unsafe { mprotect_range(self.ptr as usize + offset, len, flags) }
    }

    /// First byte of the mapping (page aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never, for a mapping that was created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned and nothing else unmaps them; every
        // borrow of the memory is tied to `&self` and therefore ended before drop.
        let _ = unsafe { rustix::mm::munmap(self.ptr.cast(), self.len) };
    }
}

/// Sleeps while `*word == expected`, at most `timeout` ([futex(2)] FUTEX_WAIT).
///
/// The futex is *shared* (no FUTEX_PRIVATE_FLAG): the word lives in memory mapped by several
/// processes. Spurious returns, EAGAIN and EINTR are all fine for callers, which re-check.
///
/// [futex(2)]: https://man7.org/linux/man-pages/man2/futex.2.html
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = rustix::time::Timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    let _ = futex::wait(word, futex::Flags::empty(), expected, Some(&ts));
}

/// Wakes up to `n` sleepers on `word` ([futex(2)] FUTEX_WAKE, shared).
///
/// [futex(2)]: https://man7.org/linux/man-pages/man2/futex.2.html
pub fn futex_wake(word: &AtomicU32, n: u32) {
    let _ = futex::wake(word, futex::Flags::empty(), n);
}

/// Opens a pid file descriptor for a child ([pidfd_open(2)]); it polls readable when the
/// child exits, which is how the coordinator notices a death without a timeout.
///
/// [pidfd_open(2)]: https://man7.org/linux/man-pages/man2/pidfd_open.2.html
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid as i32).ok_or_else(|| io::Error::other("pid 0"))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// Which of the pidfd system calls this kernel and sandbox allow, probed once per process on
/// this process itself: `pidfd_open(2)` (Linux 5.3), `pidfd_send_signal(2)` (5.1) and
/// `waitid(P_PIDFD)` (5.4). Seccomp profiles, valgrind and old kernels refuse some of them;
/// every caller has a fallback on the plain pid, which is safe for a child nobody else reaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidfdSupport {
    /// `pidfd_open` works.
    pub open: bool,
    /// `pidfd_send_signal` works.
    pub send_signal: bool,
    /// `waitid(P_PIDFD, ...)` works.
    pub waitid: bool,
}

/// The probe behind [`PidfdSupport`]; `MK1_NO_PIDFD=1` forces the fallbacks (for tests).
pub fn pidfd_support() -> PidfdSupport {
    static PROBE: std::sync::OnceLock<PidfdSupport> = std::sync::OnceLock::new();
    *PROBE.get_or_init(|| {
        let none = PidfdSupport {
            open: false,
            send_signal: false,
            waitid: false,
        };
        if std::env::var_os("MK1_NO_PIDFD").is_some_and(|v| v == "1") {
            return none;
        }
        let Ok(fd) = pidfd_open(own_pid()) else {
            return none;
        };
        // Signal 0 checks permission and existence only; nothing is delivered.
        // SAFETY: a raw syscall with an fd we own, signal 0, a null siginfo and no flags: the
        // kernel reads no memory of ours.
        let send_signal = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                0,
                core::ptr::null::<libc::siginfo_t>(),
                0,
            )
        } == 0;
        // On ourselves waitid answers ECHILD when it understands P_PIDFD (EINVAL before 5.4).
        let waitid = matches!(
            rustix::process::waitid(
                WaitId::PidFd(fd.as_fd()),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG
            ),
            Err(rustix::io::Errno::CHILD)
        );
        PidfdSupport {
            open: true,
            send_signal,
            waitid,
        }
    })
}

/// Waits up to `timeout` for any of `fds` to become readable ([poll(2)]); returns the indices
/// of those that are (all of them, after sleeping `timeout`, where poll itself is refused).
///
/// [poll(2)]: https://man7.org/linux/man-pages/man2/poll.2.html
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<usize>> {
    use rustix::event::{PollFd, PollFlags};
    let mut polls: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    let ts = rustix::time::Timespec {
        tv_sec: timeout.as_secs() as _,
        tv_nsec: timeout.subsec_nanos() as _,
    };
    match rustix::event::poll(&mut polls, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        // Refused (a seccomp profile without poll/ppoll): wait the tick out and report every fd
        // as possibly ready. Callers only use readiness as a hint to try a non-blocking reap, so
        // deaths are still noticed, one tick later at most, and nobody spins.
        Err(_) => {
            std::thread::sleep(timeout);
            return Ok((0..fds.len()).collect());
        }
    }
    Ok(polls
        .iter()
        .enumerate()
        .filter(|(_, p)| !p.revents().is_empty())
        .map(|(i, _)| i)
        .collect())
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// It called exit with this status.
    Exited(i32),
    /// A signal ended it.
    Signaled(i32),
    /// It is gone, but its status went elsewhere (for instance the host program set SIGCHLD
    /// to SIG_IGN, so the kernel reaped it).
    Vanished,
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Exited(code) => write!(f, "exited with status {code}"),
            ExitKind::Signaled(9) => write!(f, "was killed by SIGKILL"),
            ExitKind::Signaled(sig) => write!(f, "was killed by signal {sig}"),
            ExitKind::Vanished => write!(f, "ended (exit status collected elsewhere)"),
        }
    }
}

/// A child process that only its creator reaps, so its pid cannot be recycled before
/// [`ChildProcess::try_reap`] returns its exit: killing or waiting by pid is as safe as by
/// pidfd. Notices an exit through a pidfd where the kernel allows one, otherwise through a pipe
/// whose write end only the child holds (it closes, and the read end polls readable, when the
/// child is gone: works on every kernel and under any seccomp profile that allows pipes).
#[derive(Debug)]
pub struct ChildProcess {
    pid: u32,
    /// Polls readable when the child has exited: its pidfd, or the read end of its exit pipe.
    exit_fd: OwnedFd,
    /// Whether `exit_fd` is a pidfd.
    is_pidfd: bool,
    /// Exit already collected (the pid may be reused from then on: no more kills).
    reaped: bool,
}

/// What a started program gets besides its path: arguments after `argv[0]`, and environment
/// variables on top of this process's (for an interpreter that runs a worker module, say).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launch {
    /// Arguments, in order.
    pub args: Vec<std::ffi::OsString>,
    /// Variables set in the child (the worker's own spec variable is set last and wins).
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// Keep this process's stdout in the child (an isolated child's stdout is /dev/null
    /// otherwise, so a stuck worker never holds the user's terminal or pipe open).
    pub inherit_stdout: bool,
    /// Descriptors the child gets open, under the same numbers (data too large for an
    /// environment variable, say): [`spawn_inheriting`] hands them on.
    pub fds: Vec<SharedFd>,
}

/// A descriptor shared by every [`Launch`] that holds it, open until the last one is dropped.
/// Two are equal when they are the same descriptor.
#[derive(Debug, Clone)]
pub struct SharedFd(std::sync::Arc<OwnedFd>);

impl SharedFd {
    /// Takes `fd` over.
    pub fn new(fd: OwnedFd) -> SharedFd {
        SharedFd(std::sync::Arc::new(fd))
    }
}

impl AsRawFd for SharedFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl PartialEq for SharedFd {
    fn eq(&self, other: &SharedFd) -> bool {
        self.0.as_raw_fd() == other.0.as_raw_fd()
    }
}

impl Eq for SharedFd {}

/// Dispositions set to SIG_IGN in a worker between fork and exec (ignored signals stay
/// ignored across exec): a terminal's Ctrl-C, `kill -- -PGID`, `timeout` and service managers
/// signal the whole process group, and the coordinator alone decides when workers stop.
const JOB_CONTROL_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

impl ChildProcess {
    /// Starts `exe` with `key=value` in its environment and the descriptors `fds` (and the
    /// launch's own) left open across exec, isolated as [`spawn_inheriting`] describes. If anything fails after the fork, the child is killed and reaped
    /// before the error is returned: it never lives on to print a line of its own.
    pub fn spawn(
        exe: &std::path::Path,
        launch: &Launch,
        key: &str,
        value: &str,
        fds: &[RawFd],
        isolation: Isolation<'_>,
    ) -> io::Result<ChildProcess> {
        let support = pidfd_support();
        if !support.open && children_reaped_elsewhere() {
            return Err(io::Error::other(
                "pidfd_open(2) is refused and this process ignores SIGCHLD (or sets \
                 SA_NOCLDWAIT), so a worker's pid could be reused before mk1 sees it exit; \
                 restore SIGCHLD's default disposition or allow pidfd_open",
            ));
        }
        let pipe_ends = if support.open { None } else { Some(pipe()?) };
        let mut inherit = fds.to_vec();
        if let Some((_, w)) = &pipe_ends {
            inherit.push(w.as_raw_fd());
        }
        let mut child = spawn_inheriting(exe, launch, key, value, &inherit, Some(isolation))?;
        let pid = child.id();
        let exit_fd = match pipe_ends {
            // Our copy of the write end must go, or the read end never sees the child's close.
            Some((r, w)) => {
                drop(w);
                Ok(r)
            }
            None => pidfd_open(pid),
        };
        match exit_fd {
            Ok(exit_fd) => Ok(ChildProcess {
                pid,
                exit_fd,
                is_pidfd: support.open,
                reaped: false,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Polls readable once the child has exited (see the type's doc).
    pub fn exit_fd(&self) -> BorrowedFd<'_> {
        self.exit_fd.as_fd()
    }

    /// Reaps the child if it has exited ([waitid(2)] P_PIDFD, or [waitpid(2)] on the pid where
    /// P_PIDFD is refused), without blocking.
    ///
    /// [waitid(2)]: https://man7.org/linux/man-pages/man2/waitid.2.html
    /// [waitpid(2)]: https://man7.org/linux/man-pages/man2/waitpid.2.html
    pub fn try_reap(&mut self) -> io::Result<Option<ExitKind>> {
        if self.reaped {
            return Ok(Some(ExitKind::Vanished));
        }
        let got = if self.is_pidfd && pidfd_support().waitid {
            match rustix::process::waitid(
                WaitId::PidFd(self.exit_fd.as_fd()),
                WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
            ) {
                Ok(s) => s.and_then(|s| match s.exit_status() {
                    Some(code) => Some(ExitKind::Exited(code)),
                    None => s.terminating_signal().map(ExitKind::Signaled),
                }),
                Err(rustix::io::Errno::CHILD) => Some(ExitKind::Vanished),
                Err(e) => return Err(e.into()),
            }
        } else {
            let pid = Pid::from_raw(self.pid as i32).ok_or_else(|| io::Error::other("pid 0"))?;
            match rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG) {
                Ok(s) => s.and_then(|(_, s)| {
                    if let Some(code) = s.exit_status() {
                        Some(ExitKind::Exited(code))
                    } else {
                        s.terminating_signal().map(ExitKind::Signaled)
                    }
                }),
                Err(rustix::io::Errno::CHILD) => Some(ExitKind::Vanished),
                Err(e) => return Err(e.into()),
            }
        };
        self.reaped = got.is_some();
        Ok(got)
    }

    /// Sends SIGKILL: through the pidfd ([pidfd_send_signal(2)]) where allowed, else with
    /// [kill(2)] on the pid, which is safe because the child is not reaped yet. If the first way
    /// is refused the other is tried; the error is returned only when both fail.
    ///
    /// [pidfd_send_signal(2)]: https://man7.org/linux/man-pages/man2/pidfd_send_signal.2.html
    /// [kill(2)]: https://man7.org/linux/man-pages/man2/kill.2.html
    pub fn kill(&self) -> io::Result<()> {
        if self.reaped {
            return Ok(());
        }
        let by_pidfd = || -> io::Result<()> {
            Ok(rustix::process::pidfd_send_signal(
                self.exit_fd.as_fd(),
                Signal::KILL,
            )?)
        };
        let by_pid = || -> io::Result<()> {
            let pid = Pid::from_raw(self.pid as i32).ok_or_else(|| io::Error::other("pid 0"))?;
            Ok(rustix::process::kill_process(pid, Signal::KILL)?)
        };
        if self.is_pidfd && children_reaped_elsewhere() {
            // Only the pidfd names the child safely here (see `children_reaped_elsewhere`).
            by_pidfd()
        } else if self.is_pidfd && pidfd_support().send_signal {
            by_pidfd().or_else(|first| {
                by_pid().map_err(|second| {
                    io::Error::other(format!("pidfd_send_signal: {first}; kill: {second}"))
                })
            })
        } else {
            by_pid()
        }
    }

    /// Kills the child and waits up to `limit` for it to be reaped; returns whether it was.
    pub fn kill_and_reap(&mut self, limit: Duration) -> bool {
        let _ = self.kill();
        self.reap_within(limit).is_some()
    }

    /// Waits up to `limit` for the child to exit, and reaps it: how it ended, or `None` if it
    /// is still running then.
    pub fn reap_within(&mut self, limit: Duration) -> Option<ExitKind> {
        let end = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(how)) = self.try_reap() {
                return Some(how);
            }
            let now = std::time::Instant::now();
            if now >= end {
                return None;
            }
            let _ = poll_readable(
                &[self.exit_fd()],
                (end - now).min(Duration::from_millis(10)),
            );
        }
    }
}

/// The scheduler state of process `pid` from `/proc/PID/stat` ([proc_pid_stat(5)]): `R`
/// running, `S` sleeping, `D` uninterruptible (stuck in the kernel), `T` stopped, `Z` zombie…
///
/// [proc_pid_stat(5)]: https://man7.org/linux/man-pages/man5/proc_pid_stat.5.html
pub fn process_state(pid: u32) -> Option<char> {
    stat_fields(pid)?.chars().next()
}

/// The fields of `/proc/PID/stat` after the command name, from the state (field 3) on. The
/// name is in parentheses and may itself contain ") ", hence the last match.
fn stat_fields(pid: u32) -> Option<String> {
    let stat = read_small(&format!("/proc/{pid}/stat"))?;
    Some(stat.rsplit_once(") ")?.1.to_owned())
}

/// Whether SIGKILL is pending for process `pid` (`ShdPnd`/`SigPnd` in `/proc/PID/status`): such
/// a process never runs another instruction of its own, even while the kernel holds it.
fn kill_pending(pid: u32) -> bool {
    let Some(status) = read_small(&format!("/proc/{pid}/status")) else {
        return false;
    };
    status.lines().any(|l| {
        let hex = l
            .strip_prefix("ShdPnd:")
            .or_else(|| l.strip_prefix("SigPnd:"));
        hex.and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (libc::SIGKILL - 1)) != 0)
    })
}

/// Whether process `pid`, already sent SIGKILL, can never run another instruction of its own:
/// SIGKILL is still pending (it is held in the kernel: a frozen cgroup, hung NFS or FUSE), or it
/// is already exiting (`PF_EXITING` in the flags of `/proc/PID/stat`, which stays set while
/// `do_exit` is stuck closing files), or it is a zombie.
pub fn runs_no_more_code(pid: u32) -> bool {
    if kill_pending(pid) {
        return true;
    }
    const PF_EXITING: u64 = 0x4;
    let Some(rest) = stat_fields(pid) else {
        return false;
    };
    let mut fields = rest.split(' ');
    let state = fields.next().unwrap_or("");
    let flags = fields
        .nth(5)
        .and_then(|f| f.parse::<u64>().ok())
        .unwrap_or(0);
    matches!(state, "Z" | "X") || flags & PF_EXITING != 0
}

/// Whether this process lets the kernel reap its children on its own (SIGCHLD ignored, or
/// `SA_NOCLDWAIT`; both survive exec). Then a child's pid may be reused before we see it exit,
/// and only a pidfd names the child safely.
pub fn children_reaped_elsewhere() -> bool {
    disposition(libc::SIGCHLD).is_some_and(|old| {
        old.sa_sigaction == libc::SIG_IGN || old.sa_flags & libc::SA_NOCLDWAIT != 0
    })
}

/// The current disposition of `sig` ([sigaction(2)] queried, nothing changed).
///
/// [sigaction(2)]: https://man7.org/linux/man-pages/man2/sigaction.2.html
fn disposition(sig: i32) -> Option<libc::sigaction> {
    let mut old = core::mem::MaybeUninit::<libc::sigaction>::zeroed();
    // SAFETY: a query (null new action) that writes the current disposition into `old`, a
    // valid, zeroed sigaction that outlives the call.
    let rc = unsafe { libc::sigaction(sig, core::ptr::null(), old.as_mut_ptr()) };
    // SAFETY: sigaction returned 0, so it initialised `old` (and it was zeroed before anyway).
    (rc == 0).then(|| unsafe { old.assume_init() })
}

/// Asks the kernel to SIGKILL this process when the thread that forked it exits
/// ([PR_SET_PDEATHSIG]), then closes the race where the parent died before the call:
/// returns false if our parent is no longer `expected_parent`.
///
/// [PR_SET_PDEATHSIG]: https://man7.org/linux/man-pages/man2/PR_SET_PDEATHSIG.2const.html
pub fn die_with_parent(expected_parent: u32) -> io::Result<bool> {
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
    Ok(parent_pid() == expected_parent)
}

/// Our parent's pid ([getppid(2)]); 0 if there is none.
///
/// [getppid(2)]: https://man7.org/linux/man-pages/man2/getppid.2.html
pub fn parent_pid() -> u32 {
    rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get() as u32)
}

/// Whether a process `pid` exists ([kill(2)] with signal 0: success, or EPERM for another
/// user's).
///
/// [kill(2)]: https://man7.org/linux/man-pages/man2/kill.2.html
pub fn process_exists(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) else {
        return false;
    };
    !matches!(
        rustix::process::test_kill_process(pid),
        Err(rustix::io::Errno::SRCH)
    )
}

/// This process's pid.
pub fn own_pid() -> u32 {
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

/// Sets close-on-exec on every descriptor from 3 up ([close_range(2)] with
/// `CLOSE_RANGE_CLOEXEC`, or one by one from `/proc/self/fd` before Linux 5.11), so that
/// nothing this process holds reaches the programs it starts; a sandbox that refuses both
/// leaves the descriptors as they are.
///
/// [close_range(2)]: https://man7.org/linux/man-pages/man2/close_range.2.html
pub fn cloexec_from_3() {
    if !close_range_cloexec_from_3() {
        cloexec_each(&open_fds_from_3().unwrap_or_default());
    }
}

/// [close_range(2)] from 3 up with `CLOSE_RANGE_CLOEXEC`: whether it worked (it is missing
/// before Linux 5.11). Only a raw syscall, so it is async-signal-safe and may run between fork
/// and exec.
///
/// [close_range(2)]: https://man7.org/linux/man-pages/man2/close_range.2.html
fn close_range_cloexec_from_3() -> bool {
    // SAFETY: a raw syscall on plain integers; it only changes descriptor flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    rc == 0
}

/// Sets close-on-exec on each of `fds` (best effort: one closed since it was listed is
/// skipped). Only raw syscalls on a slice made beforehand: async-signal-safe, as above.
fn cloexec_each(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: fcntl on a plain integer; a number that is not open fails with EBADF.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// The descriptors from 3 up this process has open, from `/proc/self/fd` (`None` without it).
fn open_fds_from_3() -> Option<Vec<RawFd>> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd >= 3)
            .collect(),
    )
}

/// Clears close-on-exec on `fd` ([fcntl(2)] F_SETFD). Only a raw syscall, so it is
/// async-signal-safe and may run between fork and exec.
///
/// [fcntl(2)]: https://man7.org/linux/man-pages/man2/fcntl.2.html
pub fn inherit_fd(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?)
}

/// Reads a small text file (procfs, sysfs); `None` if it cannot be read.
pub fn read_small(path: &str) -> Option<String> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    Some(s)
}

/// The resource limits [`soft_limit`] reads (`RLIMIT_AS`, `RLIMIT_NPROC`…).
pub use rustix::process::Resource;

/// A resource limit of this process ([getrlimit(2)]): the soft limit, `None` if unlimited or
/// unknown. Unknown is a refused call (a seccomp profile that denies `prlimit64`): the limit
/// cannot be checked up front then, and hitting it is reported when it happens.
///
/// (Through libc, not rustix: rustix's `getrlimit` treats the call as infallible and, when it
/// is refused, returns whatever was in the buffer.)
///
/// [getrlimit(2)]: https://man7.org/linux/man-pages/man2/getrlimit.2.html
pub fn soft_limit(resource: Resource) -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes one `rlimit` through the valid, exclusive pointer it is given
    // and nothing else; the resource numbers are the kernel's (rustix's `Resource` is
    // `repr(u32)` with the kernel's values).
    let rc = unsafe { libc::getrlimit(resource as u32 as _, &mut limit) };
    (rc == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Under an address-space limit (`RLIMIT_AS`), keeps glibc's malloc to one arena. Each further
/// arena reserves 64 MiB of address space when a thread first allocates, which can take the
/// room the pool's limit check left for the run's own allocations, so that a later allocation
/// fails (an abort, not an error). Call it before any other thread starts. Without a limit, and
/// with other C libraries, it does nothing.
pub fn one_malloc_arena_under_address_limit() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if soft_limit(Resource::As).is_some() {
        // SAFETY: `mallopt` only sets a tunable of glibc's allocator (under the allocator's own
        // lock) and has no memory-safety preconditions; M_ARENA_MAX with 1 is a valid setting.
        // Its result (1 on success) needs no handling: on failure nothing changes.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
}

/// The real user id of this process.
pub fn real_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// The CPUs this process may run on, in increasing order ([sched_getaffinity(2)]): taskset,
/// cpusets and container runtimes all narrow this mask, so placement picks from it and never
/// uses absolute CPU numbers.
///
/// [sched_getaffinity(2)]: https://man7.org/linux/man-pages/man2/sched_getaffinity.2.html
pub fn allowed_cpus() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
        Err(_) => (0..online_cpus()).collect(),
    }
}

/// Clock ticks per second (the unit of CPU times in `/proc/PID/stat`).
pub fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second()
}

/// How many CPUs this process may use: its affinity mask, further limited by a cgroup CPU quota
/// (what [`std::thread::available_parallelism`] reports).
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPU the calling thread is running on ([getcpu(2)], through the vDSO: no syscall).
///
/// [getcpu(2)]: https://man7.org/linux/man-pages/man2/getcpu.2.html
#[inline]
pub fn current_cpu() -> usize {
    rustix::thread::sched_getcpu()
}

/// Pins the calling thread to one CPU ([sched_setaffinity(2)]); errors are returned, not fatal.
///
/// [sched_setaffinity(2)]: https://man7.org/linux/man-pages/man2/sched_setaffinity.2.html
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    set_affinity(&[cpu])
}

/// Lets the calling thread run on exactly `cpus` (children started later inherit the mask).
pub fn set_affinity(cpus: &[usize]) -> io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    for &c in cpus {
        set.set(c);
    }
    Ok(rustix::thread::sched_setaffinity(None, &set)?)
}

/// The program this process is running, opened from `/proc/self/exe` ([proc_pid_exe(5)]): the
/// inode stays reachable through this fd whatever happens to the path since (deleted, replaced,
/// upgraded in place), so a worker started through [`fd_path`] is always the same build.
///
/// [proc_pid_exe(5)]: https://man7.org/linux/man-pages/man5/proc_pid_exe.5.html
pub fn open_running_image() -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        "/proc/self/exe",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

/// A path that names `fd` in this process and in a child between fork and exec (the child
/// inherits the fd until exec, which opens the path first).
pub fn fd_path(fd: BorrowedFd<'_>) -> std::path::PathBuf {
    format!("/proc/self/fd/{}", fd.as_raw_fd()).into()
}

/// How a worker process is isolated from the coordinator's environment (see
/// [`spawn_inheriting`]).
#[derive(Debug, Clone, Copy)]
pub struct Isolation<'a> {
    /// Where the worker's stderr goes: a pipe the coordinator drains, so a worker stuck in the
    /// kernel never holds the user's terminal or pipe (`2>&1 | tee log`) open.
    pub stderr: BorrowedFd<'a>,
    /// `argv[0]` to show in `ps` (the program is started through `/proc/self/fd/N`).
    pub arg0: &'a std::ffi::OsStr,
}

/// Starts `exe` with `key=value` in its environment, stdin from /dev/null, and the descriptors
/// `fds` and the launch's own ([`Launch::fds`]) left open across exec (they are close-on-exec
/// in this process). With `isolation` (a worker): SIGINT, SIGTERM and SIGHUP are ignored in the child (dispositions set to ignore
/// survive exec), its stdout is /dev/null, its stderr the given fd, and every other descriptor
/// it would inherit by accident (not close-on-exec in this process: a shell's, a test
/// harness's) is closed at exec. The child is not reaped by anyone else, so its pid stays valid
/// until the caller waits for it.
pub fn spawn_inheriting(
    exe: &std::path::Path,
    launch: &Launch,
    key: &str,
    value: &str,
    fds: &[RawFd],
    isolation: Option<Isolation<'_>>,
) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .env(key, value)
        .stdin(std::process::Stdio::null());
    let isolate = isolation.is_some();
    // Where close_range(2) is missing (before 5.11) the child marks these one by one: the fds
    // open now, listed here in the parent (the child must not allocate), or, without /proc, the
    // first 4096 numbers.
    let open_fds: Vec<RawFd> = if isolation.is_some() {
        open_fds_from_3().unwrap_or_else(|| (3..4096).collect())
    } else {
        Vec::new()
    };
    if let Some(iso) = isolation {
        if !launch.inherit_stdout {
            cmd.stdout(std::process::Stdio::null());
        }
        // (Above 2 as well: std points the child's stdin at /dev/null before its stderr, so a
        // copy numbered 0 would be replaced before it is used.)
        let stderr = above_stdio(iso.stderr.try_clone_to_owned()?)?;
        cmd.stderr(std::process::Stdio::from(stderr)).arg0(iso.arg0);
    }
    if let Some(fd) = fds
        .iter()
        .copied()
        .chain(launch.fds.iter().map(AsRawFd::as_raw_fd))
        .find(|&fd| fd <= 2)
    {
        // (It would be overwritten by the child's standard streams: see `above_stdio`.)
        return Err(io::Error::other(format!(
            "descriptor {fd} cannot be handed to a child: it is a standard stream's number"
        )));
    }
    let fds: Vec<RawFd> = fds
        .iter()
        .copied()
        .chain(launch.fds.iter().map(AsRawFd::as_raw_fd))
        .collect();
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // work is allowed: it makes raw close_range, fcntl and sigaction syscalls (signal(2) with
    // SIG_IGN is async-signal-safe) on a vector allocated before the fork, and allocates
    // nothing. The fds stay open in the parent for the whole call, so the numbers are valid in
    // the child. std resets the signal mask and SIGPIPE before running this closure, so nothing
    // undoes it. Marking descriptors close-on-exec (rather than closing them) leaves std's own
    // exec-status pipe working.
    unsafe {
        cmd.pre_exec(move || {
            if isolate {
                if !close_range_cloexec_from_3() {
                    cloexec_each(&open_fds);
                }
                for sig in JOB_CONTROL_SIGNALS {
                    if libc::signal(sig, libc::SIG_IGN) == libc::SIG_ERR {
                        return Err(io::Error::last_os_error());
                    }
                }
            }
            for &fd in &fds {
                inherit_fd(BorrowedFd::borrow_raw(fd))?;
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|e| {
        // (std opens /dev/null for the child's stdin in this process, and its ENOENT reads as
        // if the program were missing: an empty /dev, a bare chroot.)
        if e.kind() == io::ErrorKind::NotFound && std::fs::File::open("/dev/null").is_err() {
            io::Error::new(
                e.kind(),
                "/dev/null cannot be opened (a worker's stdin, and its stdout unless kept, go \
                 there); give the container or chroot a /dev/null",
            )
        } else {
            e
        }
    })
}

/// Whether `e` says a filesystem is out of space: `ENOSPC`, or `EDQUOT` (a quota).
pub fn is_out_of_space(e: &io::Error) -> bool {
    e.raw_os_error().is_some_and(|c| {
        c == rustix::io::Errno::NOSPC.raw_os_error() || c == rustix::io::Errno::DQUOT.raw_os_error()
    })
}

/// Makes `fd` non-blocking ([fcntl(2)] `O_NONBLOCK`).
///
/// [fcntl(2)]: https://man7.org/linux/man-pages/man2/fcntl.2.html
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    Ok(rustix::fs::fcntl_setfl(
        fd,
        flags | rustix::fs::OFlags::NONBLOCK,
    )?)
}

/// Reads what is there from a non-blocking fd into `buf` (appending); returns false at end of
/// file.
pub fn read_available(fd: BorrowedFd<'_>, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    loop {
        match rustix::io::read(fd, &mut chunk) {
            Ok(0) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return true,
        }
    }
}

/// Names the calling thread (and, for the main thread, the process as `ps`, `top` and `pgrep`
/// show it) ([PR_SET_NAME]); at most 15 bytes are kept. Best effort.
///
/// [PR_SET_NAME]: https://man7.org/linux/man-pages/man2/PR_SET_NAME.2const.html
pub fn set_thread_name(name: &str) {
    if let Ok(c) = std::ffi::CString::new(name) {
        let _ = rustix::thread::set_name(&c);
    }
}

/// Whether `sig` is ignored in this process (inherited from the parent: `nohup` ignores SIGHUP,
/// a non-interactive shell ignores SIGINT in background jobs).
pub fn signal_ignored(sig: i32) -> bool {
    disposition(sig).is_some_and(|old| old.sa_sigaction == libc::SIG_IGN)
}

/// The handler [`absorb_job_control_signals`] installs: it does nothing.
extern "C" fn absorb(_sig: libc::c_int) {}

/// Makes SIGINT, SIGTERM and SIGHUP do nothing in this process (a worker's first act; until
/// then they are ignored, as [`ChildProcess::spawn`] leaves them across exec).
///
/// A handler that does nothing, not SIG_IGN: an ignored signal stays ignored across exec, so
/// every program a worker's kernel starts (a `std::process::Command`, Python's `subprocess`, a
/// `multiprocessing` pool) would ignore Ctrl-C and `kill` too, and one that waits for such a
/// child to stop (`Popen.terminate`, a pool's exit) would hang. Exec resets a handled signal
/// to its default. (`SA_RESTART`: most system calls of the worker and its kernels go on as if
/// nothing came; the others return EINTR, which the worker's waits re-check.)
pub fn absorb_job_control_signals() {
    // SAFETY: all zeroes is a valid sigaction (plain integers and an empty signal mask).
    let mut act: libc::sigaction = unsafe { core::mem::zeroed() };
    act.sa_sigaction = absorb as extern "C" fn(libc::c_int) as libc::sighandler_t;
    act.sa_flags = libc::SA_RESTART;
    for sig in JOB_CONTROL_SIGNALS {
        // SAFETY: `act` is a valid sigaction that outlives the call; its handler is a plain
        // `extern "C"` function that does nothing, so it is async-signal-safe and touches no
        // Rust state; the old action is not asked for (null).
        unsafe { libc::sigaction(sig, &act, core::ptr::null_mut()) };
    }
}

/// A pipe, both ends close-on-exec ([pipe2(2)]): `(read, write)`.
///
/// [pipe2(2)]: https://man7.org/linux/man-pages/man2/pipe2.2.html
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    Ok((above_stdio(r)?, above_stdio(w)?))
}

/// `fd`, moved to a number above 2 (close-on-exec) if it got 0, 1 or 2. A process started with
/// a standard stream closed (a daemon, `python script.py <&-`) hands those numbers out first,
/// and a child's standard streams are set up before exec, over whatever the child inherited
/// there: a segment or pipe meant for a worker would be replaced by /dev/null. Every
/// descriptor mk1 hands to a child comes from here.
pub fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    Ok(rustix::io::fcntl_dupfd_cloexec(&fd, 3)?)
}

/// As [`above_stdio`], keeping `fd` as it is where it cannot be moved (out of descriptors): a
/// child it is handed to then fails to start, saying so.
pub fn above_stdio_or_as_is(fd: OwnedFd) -> OwnedFd {
    if fd.as_raw_fd() > 2 {
        return fd;
    }
    rustix::io::fcntl_dupfd_cloexec(&fd, 3).unwrap_or(fd)
}

/// Runs `handler` in the child of every `fork()` this process makes from now on, before
/// `fork` returns there (`pthread_atfork`; `vfork` and `posix_spawn` do not run it). The
/// handler must only make async-signal-safe calls.
pub fn in_every_forked_child(handler: extern "C" fn()) -> io::Result<()> {
    // SAFETY: registers a plain function pointer; what it may call is the caller's contract.
    match unsafe { libc::pthread_atfork(None, None, Some(handler)) } {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Makes `len` bytes at `addr` (page aligned) inaccessible in this process: `mprotect` with no
/// access, one system call, async-signal-safe (for a fork handler, which has no [`Mapping`]).
///
/// # Safety
/// The range must lie in a mapping of this process that nothing may use afterwards.
pub unsafe fn protect_none_at(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: the caller's promise.
    unsafe { mprotect_range(addr, len, rustix::mm::MprotectFlags::empty()) }
}

/// `mprotect` of `len` bytes at `addr` (page aligned) to `flags`; nothing for 0 bytes. One
/// system call, async-signal-safe (no allocation, no lock, no panic).
///
/// # Safety
/// The range must lie in a mapping of this process, and every reference into it that is used
/// afterwards must stay valid under `flags`.
unsafe fn mprotect_range(
    addr: usize,
    len: usize,
    flags: rustix::mm::MprotectFlags,
) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: the caller's promise.
    unsafe { rustix::mm::mprotect(addr as *mut core::ffi::c_void, len, flags)? };
    Ok(())
}
