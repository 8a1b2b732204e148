//! Every system call mk1 makes, in one place, through rustix.
//!
//! Nothing above this module talks to the kernel directly. The functions here are thin, typed
//! and documented with the man page they wrap; none of them is called on the hot path except
//! [`futex_wait`] and [`futex_wake`], and those only when the other side has said it sleeps.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{MapFlags, ProtFlags};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};
use rustix::thread::futex;

use crate::sync::AtomicU32;

/// Creates an anonymous, close-on-exec memory file ([memfd_create(2)]).
///
/// It lives on the kernel's internal tmpfs, not `/dev/shm`, so the size of `/dev/shm` (64 MiB
/// under Docker) does not matter, and it is freed when the last fd and mapping go away.
///
/// [memfd_create(2)]: https://man7.org/linux/man-pages/man2/memfd_create.2.html
pub fn memfd(name: &str) -> io::Result<OwnedFd> {
    Ok(rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC)?)
}

/// Sets the file's size ([ftruncate(2)]) and then reserves every page of it ([fallocate(2)]),
/// so that touching the mapping later can never raise SIGBUS for want of memory.
///
/// [ftruncate(2)]: https://man7.org/linux/man-pages/man2/ftruncate.2.html
/// [fallocate(2)]: https://man7.org/linux/man-pages/man2/fallocate.2.html
pub fn size_and_commit(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    rustix::fs::ftruncate(fd, len)?;
    rustix::fs::fallocate(fd, FallocateFlags::empty(), 0, len)?;
    Ok(())
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

/// Waits up to `timeout` for any of `fds` to become readable ([poll(2)]); returns the indices
/// of those that are.
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
        Err(e) => return Err(e.into()),
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

/// Reaps the child behind `pidfd` if it has exited ([waitid(2)] P_PIDFD, WNOHANG).
///
/// [waitid(2)]: https://man7.org/linux/man-pages/man2/waitid.2.html
pub fn try_reap(pidfd: BorrowedFd<'_>) -> io::Result<Option<ExitKind>> {
    let status = match rustix::process::waitid(
        WaitId::PidFd(pidfd),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    ) {
        Ok(s) => s,
        // Not our child any more: someone else reaped it, so it has exited.
        Err(rustix::io::Errno::CHILD) => return Ok(Some(ExitKind::Vanished)),
        Err(e) => return Err(e.into()),
    };
    Ok(status.and_then(|s| {
        if let Some(code) = s.exit_status() {
            Some(ExitKind::Exited(code))
        } else {
            s.terminating_signal().map(ExitKind::Signaled)
        }
    }))
}

/// Sends SIGKILL through a pidfd, which cannot hit a recycled pid ([pidfd_send_signal(2)]).
///
/// [pidfd_send_signal(2)]: https://man7.org/linux/man-pages/man2/pidfd_send_signal.2.html
pub fn kill_pidfd(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::process::pidfd_send_signal(pidfd, Signal::KILL)?)
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

/// This process's pid.
pub fn own_pid() -> u32 {
    rustix::process::getpid().as_raw_nonzero().get() as u32
}

/// Clears close-on-exec on `fd` ([fcntl(2)] F_SETFD). Only a raw syscall, so it is
/// async-signal-safe and may run between fork and exec.
///
/// [fcntl(2)]: https://man7.org/linux/man-pages/man2/fcntl.2.html
pub fn inherit_fd(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?)
}

/// Memory this process could commit now: the smaller of `MemAvailable` ([proc(5)]) and the
/// room left under the cgroup v2 `memory.max` limit, if one is set.
///
/// [proc(5)]: https://man7.org/linux/man-pages/man5/proc.5.html
pub fn available_memory() -> Option<u64> {
    let meminfo = read_small("/proc/meminfo")?;
    let mut avail = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)?;
    if let (Some(max), Some(cur)) = (
        read_small("/sys/fs/cgroup/memory.max"),
        read_small("/sys/fs/cgroup/memory.current"),
    ) {
        if let (Ok(max), Ok(cur)) = (max.trim().parse::<u64>(), cur.trim().parse::<u64>()) {
            avail = avail.min(max.saturating_sub(cur));
        }
    }
    Some(avail)
}

fn read_small(path: &str) -> Option<String> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    Some(s)
}

/// The number of CPUs this process may run on ([sched_getaffinity(2)]).
///
/// [sched_getaffinity(2)]: https://man7.org/linux/man-pages/man2/sched_getaffinity.2.html
pub fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Pins the calling thread to one CPU ([sched_setaffinity(2)]); errors are returned, not fatal.
///
/// [sched_setaffinity(2)]: https://man7.org/linux/man-pages/man2/sched_setaffinity.2.html
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    Ok(rustix::thread::sched_setaffinity(None, &set)?)
}

/// Starts `exe` with `key=value` in its environment, stdin from /dev/null, and the descriptors
/// `fds` left open across exec (they are close-on-exec in this process). The child is not reaped
/// by anyone else, so its pid stays valid until the caller waits for it.
pub fn spawn_inheriting(
    exe: &std::path::Path,
    key: &str,
    value: &str,
    fds: &[RawFd],
) -> io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(exe);
    cmd.env(key, value).stdin(std::process::Stdio::null());
    let fds = fds.to_vec();
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe
    // work is allowed: it makes raw fcntl syscalls on a vector allocated before the fork, and
    // allocates nothing. The fds stay open in the parent for the whole call, so the numbers are
    // valid in the child.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                inherit_fd(BorrowedFd::borrow_raw(fd))?;
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// A pipe, both ends close-on-exec ([pipe2(2)]): `(read, write)`.
///
/// [pipe2(2)]: https://man7.org/linux/man-pages/man2/pipe2.2.html
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}
