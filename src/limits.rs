//! What the kernel will let this process use, read from where the kernel enforces it, so that a
//! run that cannot fit is refused before any worker starts (exit 2), instead of being ended by
//! the OOM killer, an allocation abort or a failed thread spawn half-way through.
//!
//! Memory: `MemAvailable`, and every cgroup level from the process's own up to the root of the
//! hierarchy, v1 (`memory.limit_in_bytes`) and v2 (`memory.max`, `memory.high`), each minus its
//! usage; the tightest wins. A cgroup is found from `/proc/self/cgroup` and the mount table
//! (`/proc/self/mountinfo`), so nested cgroups (systemd scopes, Kubernetes pods, Docker without
//! a cgroup namespace), v1, v2 and hybrid hosts are all read where they are. Tasks: `pids.max`
//! at every level, and `RLIMIT_NPROC` for non-root users. Per process: `RLIMIT_AS`,
//! `RLIMIT_FSIZE` (a memfd larger than it raises SIGXFSZ) and `RLIMIT_NOFILE`.
//!
//! The parsers take text and the readers take a file-reading function, so the unit tests run on
//! captured samples of v1, v2 and hybrid hosts. (The `procfs` crate parses both files too, but
//! the walk up the hierarchy and the limit files are the part that matters, and they are a few
//! lines on top of these two small parsers.)

use std::path::{Path, PathBuf};

use crate::shm::human_bytes;

/// A cgroup filesystem in the mount table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// The cgroup path that this mount shows at its mount point (`/` unless bind-mounted or
    /// namespaced).
    pub root: String,
    /// Where it is mounted.
    pub point: PathBuf,
    /// `cgroup2` (the unified hierarchy) rather than v1.
    pub v2: bool,
    /// v1 only: the controllers of this hierarchy (`memory`, `pids`, `cpu`…).
    pub controllers: Vec<String>,
}

/// One line of `/proc/self/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMembership {
    /// Empty for the v2 hierarchy (id 0).
    pub controllers: Vec<String>,
    /// The v2 line (`0::/path`).
    pub v2: bool,
    /// The process's cgroup in that hierarchy.
    pub path: String,
}

/// Undoes the octal escapes of mountinfo fields (`\040` for a space).
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup filesystems in a `/proc/self/mountinfo` text ([proc_pid_mountinfo(5)]).
///
/// [proc_pid_mountinfo(5)]: https://man7.org/linux/man-pages/man5/proc_pid_mountinfo.5.html
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let (root, point) = (unescape(l[3]), PathBuf::from(unescape(l[4])));
        match r[0] {
            "cgroup2" => out.push(CgroupMount {
                root,
                point,
                v2: true,
                controllers: Vec::new(),
            }),
            "cgroup" => out.push(CgroupMount {
                root,
                point,
                v2: false,
                controllers: r[2]
                    .split(',')
                    .filter(|o| {
                        !matches!(
                            *o,
                            "rw" | "ro"
                                | "xattr"
                                | "noprefix"
                                | "clone_children"
                                | "cpuset_v2_mode"
                        ) && !o.contains('=')
                    })
                    .map(str::to_owned)
                    .collect(),
            }),
            _ => {}
        }
    }
    out
}

/// The lines of a `/proc/self/cgroup` text ([cgroups(7)]).
///
/// [cgroups(7)]: https://man7.org/linux/man-pages/man7/cgroups.7.html
pub fn parse_proc_cgroup(text: &str) -> Vec<CgroupMembership> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ':');
            let id = it.next()?;
            let controllers = it.next()?;
            let path = it.next()?.to_owned();
            let v2 = id == "0" && controllers.is_empty();
            Some(CgroupMembership {
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                v2,
                path,
            })
        })
        .collect()
}

/// `path` relative to `root` if `root` is `path` or one of its ancestors (component-wise:
/// `/docker/abc` is not below `/docker/ab`).
fn below<'p>(path: &'p str, root: &str) -> Option<&'p str> {
    let root = root.trim_end_matches('/');
    let rest = path.strip_prefix(root)?;
    (rest.is_empty() || rest.starts_with('/')).then(|| rest.trim_start_matches('/'))
}

/// The directories of this process's cgroups that can hold `controller`'s files: in the v1
/// hierarchy that has it and in the v2 hierarchy, each from the process's own cgroup up to the
/// mount point (the highest level this process can see).
pub fn cgroup_dirs(controller: &str, proc_cgroup: &str, mountinfo: &str) -> Vec<PathBuf> {
    let mounts = parse_mountinfo(mountinfo);
    let mut dirs = Vec::new();
    for m in parse_proc_cgroup(proc_cgroup) {
        // Of the mounts of this hierarchy, the one whose root is the longest prefix of our path
        // (a container may see several bind mounts of one hierarchy).
        let mount = mounts
            .iter()
            .filter(|mt| {
                if m.v2 {
                    mt.v2
                } else {
                    !mt.v2
                        && m.controllers.iter().any(|c| c == controller)
                        && mt.controllers.iter().any(|c| c == controller)
                }
            })
            .max_by_key(|mt| below(&m.path, &mt.root).map_or(0, |_| mt.root.len() + 1));
        let Some(mount) = mount else { continue };
        // The part of our path below what the mount shows. A path outside the mount's root, or
        // one that climbs (`/../x`: a cgroup namespace's view of a cgroup outside it), means the
        // mount point itself is the closest level we can read.
        let rel = below(&m.path, &mount.root)
            .filter(|r| !r.split('/').any(|c| c == ".."))
            .unwrap_or("");
        let mut dir = mount.point.clone();
        if !rel.is_empty() {
            dir.push(rel);
        }
        loop {
            dirs.push(dir.clone());
            if dir == mount.point || !dir.pop() || !dir.starts_with(&mount.point) {
                break;
            }
        }
    }
    dirs
}

/// How much of something is left, and which limit says so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    /// What is left (bytes or tasks).
    pub left: u64,
    /// The limit that leaves this, in words, for error messages.
    pub source: String,
}

/// A limit file's value: a number, or `None` for "max" and v1's near-2^63 "unlimited".
fn limit_value(text: &str) -> Option<u64> {
    let v = text.trim().parse::<u64>().ok()?;
    (v < 1 << 62).then_some(v)
}

fn tightest(rooms: impl IntoIterator<Item = Room>) -> Option<Room> {
    rooms.into_iter().min_by_key(|r| r.left)
}

/// Rooms left under `(limit file, usage file)` pairs in each directory, with `fmt` formatting a
/// count for messages.
fn cgroup_rooms(
    dirs: &[PathBuf],
    files: &[(&str, &str)],
    read: &dyn Fn(&Path) -> Option<String>,
    fmt: fn(u64) -> String,
) -> Vec<Room> {
    let mut rooms = Vec::new();
    for dir in dirs {
        for &(limit, usage) in files {
            let Some(max) = read(&dir.join(limit)).as_deref().and_then(limit_value) else {
                continue;
            };
            let used = read(&dir.join(usage))
                .and_then(|u| u.trim().parse::<u64>().ok())
                .unwrap_or(0);
            // Page cache is memory, not tasks: only memory usage gives it back.
            let used = if usage.starts_with("memory.") {
                used.saturating_sub(reclaimable(dir, read))
            } else {
                used
            };
            rooms.push(Room {
                left: max.saturating_sub(used),
                source: format!(
                    "the cgroup limit {} ({} limit, {} in use)",
                    dir.join(limit).display(),
                    fmt(max),
                    fmt(used)
                ),
            });
        }
    }
    rooms
}

/// Page cache a memory cgroup can drop under pressure (inactive file pages from `memory.stat`:
/// `inactive_file` on v2, `total_inactive_file` on v1). Usage counts it, the limit does not
/// keep it, so it is room; 0 for other controllers.
fn reclaimable(dir: &Path, read: &dyn Fn(&Path) -> Option<String>) -> u64 {
    let Some(stat) = read(&dir.join("memory.stat")) else {
        return 0;
    };
    let field = |key: &str| {
        stat.lines().find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse::<u64>().ok()).flatten()
        })
    };
    field("total_inactive_file")
        .or_else(|| field("inactive_file"))
        .unwrap_or(0)
}

/// The host's files, for the readers below.
pub fn read_host(path: &Path) -> Option<String> {
    crate::sys::read_small(path.to_str()?)
}

fn dirs_of(controller: &str, read: &dyn Fn(&Path) -> Option<String>) -> Vec<PathBuf> {
    match (
        read(Path::new("/proc/self/cgroup")),
        read(Path::new("/proc/self/mountinfo")),
    ) {
        (Some(c), Some(m)) => cgroup_dirs(controller, &c, &m),
        _ => Vec::new(),
    }
}

/// Memory this process could still commit: the tightest of `MemAvailable` and every memory
/// cgroup limit above it (v1 and v2, `max` and `high`), each less its usage.
pub fn memory_room(read: &dyn Fn(&Path) -> Option<String>) -> Option<Room> {
    let mut rooms = Vec::new();
    if let Some(kib) = read(Path::new("/proc/meminfo")).and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    }) {
        rooms.push(Room {
            left: kib * 1024,
            source: "MemAvailable in /proc/meminfo".into(),
        });
    }
    let dirs = dirs_of("memory", read);
    rooms.extend(cgroup_rooms(
        &dirs,
        &[
            ("memory.max", "memory.current"),
            ("memory.high", "memory.current"),
            ("memory.limit_in_bytes", "memory.usage_in_bytes"),
        ],
        read,
        human_bytes,
    ));
    // v1 also reports the tightest limit of all ancestors, including those above what this
    // process can see (a Kubernetes pod's limit, above the container's cgroup mount).
    if let Some(dir) = dirs.first() {
        if let Some(limit) = read(&dir.join("memory.stat")).and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("hierarchical_memory_limit "))
                .and_then(limit_value)
        }) {
            let used = read(&dir.join("memory.usage_in_bytes"))
                .and_then(|u| u.trim().parse::<u64>().ok())
                .unwrap_or(0)
                .saturating_sub(reclaimable(dir, read));
            rooms.push(Room {
                left: limit.saturating_sub(used),
                source: format!(
                    "the cgroup limit hierarchical_memory_limit in {} ({} limit on an enclosing \
                     cgroup, {} in use here)",
                    dir.join("memory.stat").display(),
                    human_bytes(limit),
                    human_bytes(used)
                ),
            });
        }
    }
    tightest(rooms)
}

/// Tasks (processes and threads) this process could still start under the `pids` cgroup
/// limits above it, v1 or v2; `None` when none is set.
pub fn pids_room(read: &dyn Fn(&Path) -> Option<String>) -> Option<Room> {
    let dirs = dirs_of("pids", read);
    tightest(cgroup_rooms(
        &dirs,
        &[("pids.max", "pids.current")],
        read,
        |n| n.to_string(),
    ))
}

/// Tasks this user may still start under `RLIMIT_NPROC` (which the kernel does not apply to
/// root): the limit less the threads the user's processes have now.
fn nproc_room() -> Option<Room> {
    let uid = crate::sys::real_uid();
    if uid == 0 {
        return None;
    }
    let limit = crate::sys::soft_limit(crate::sys::Resource::Nproc)?;
    let mut threads = 0u64;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Some(status) =
            crate::sys::read_small(&format!("/proc/{}/status", name.to_string_lossy()))
        else {
            continue;
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        if field("Uid:") == Some(u64::from(uid)) {
            threads += field("Threads:").unwrap_or(1);
        }
    }
    Some(Room {
        left: limit.saturating_sub(threads),
        source: format!("RLIMIT_NPROC ({limit} tasks for uid {uid}, {threads} in use)"),
    })
}

/// What a run will need from the kernel, estimated before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Shared segment bytes (one memfd).
    pub segment: u64,
    /// Worker processes.
    pub workers: u32,
    /// Producer threads.
    pub producers: u32,
    /// Memory each worker process takes of its own ([`WORKER_MEMORY`] for this program's).
    pub worker_memory: u64,
}

/// Memory a worker process of this program takes of its own, besides the shared segment and
/// the page tables for its mapping of it: `mk1 run`'s workers had 0.2 MiB of private pages
/// (`/proc/PID/smaps_rollup`, 2026-12-02), its coordinator 0.7 MiB.
pub const WORKER_MEMORY: u64 = 2 << 20;
/// Slack kept free under a memory limit, for the coordinator's own growth and the kernel. (It
/// was 64 MiB, which refused runs that used 2 MiB in a 64 MiB container.)
pub(crate) const MEMORY_HEADROOM: u64 = 8 << 20;
/// Address space a producer thread takes: its stack (std's 2 MiB default) and guard page.
const THREAD_ADDRESS_SPACE: u64 = (2 << 20) + (64 << 10);
/// Address space kept free under `RLIMIT_AS` for allocations made while running (histograms,
/// reports, the progress bar, glibc's per-thread heaps).
const ADDRESS_SPACE_HEADROOM: u64 = 48 << 20;
/// File descriptors kept free under `RLIMIT_NOFILE` besides the per-worker ones.
const FD_HEADROOM: u64 = 16;

impl Needs {
    /// Memory the whole run commits: the segment, each worker's own pages and its page tables
    /// for the segment (8 bytes per 4 KiB page), and headroom.
    pub fn memory(&self) -> u64 {
        let tables = self.segment / 512;
        let per_worker = self.worker_memory.saturating_add(tables);
        self.segment
            .saturating_add(u64::from(self.workers).saturating_mul(per_worker))
            .saturating_add(MEMORY_HEADROOM)
    }

    /// Tasks the run starts: workers, producer threads, and one replacement worker that may be
    /// starting while a stuck one has not yet been reaped.
    pub fn tasks(&self) -> u64 {
        u64::from(self.workers) + u64::from(self.producers) + 1
    }
}

/// What to lower when a pool does not fit, for each way of making one.
pub(crate) const SMALLER: &str =
    "use fewer or smaller slots, or fewer workers (mk1 run: --max-dim, \
     --inflight, --workers; mk1 apply: --workers, or --mode in-place for half the memory; \
     PoolBuilder: max_array_bytes, slots_per_producer, size_class, pack_slots, workers; Python \
     mk1.Pool: max_array_bytes, slots, workers)";
/// What lowers the number of processes and threads a pool starts, in each context.
const FEWER_TASKS: &str = "lower the workers (mk1 run: --workers or --producers; mk1 apply: \
     --workers; PoolBuilder: workers, producers; Python mk1.Pool: workers)";

/// A limit the run does not fit under (exit 2, before any worker starts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Not enough memory under the tightest memory limit.
    #[error(
        "not enough memory: asked for {} ({asked} bytes: shared segment, workers and headroom), \
         {} available under {limit}; {smaller}",
        human_bytes(*asked), human_bytes(*available),
        smaller = crate::limits::SMALLER
    )]
    Memory {
        /// Bytes the run needs.
        asked: u64,
        /// Bytes left.
        available: u64,
        /// Which limit.
        limit: String,
    },
    /// Not enough address space under `RLIMIT_AS`.
    #[error(
        "address-space limit too low: asked for {} ({asked} bytes: this process, the shared \
         segment, {threads} producer thread(s) and headroom), but RLIMIT_AS is {} ({limit} bytes); \
         raise it (ulimit -v) or {smaller}",
        human_bytes(*asked), human_bytes(*limit),
        smaller = crate::limits::SMALLER
    )]
    AddressSpace {
        /// Bytes of address space needed.
        asked: u64,
        /// The soft limit.
        limit: u64,
        /// Producer threads counted.
        threads: u32,
    },
    /// The segment is larger than `RLIMIT_FSIZE` (sizing it would raise SIGXFSZ).
    #[error(
        "file-size limit too low: the shared segment is {} ({asked} bytes), but RLIMIT_FSIZE is \
         {} ({limit} bytes); raise it (ulimit -f) or {smaller}",
        human_bytes(*asked), human_bytes(*limit),
        smaller = crate::limits::SMALLER
    )]
    FileSize {
        /// Segment bytes.
        asked: u64,
        /// The soft limit.
        limit: u64,
    },
    /// Not enough tasks (processes and threads) may be started.
    #[error(
        "too many tasks: this run starts {asked} (workers, producer threads and one replacement), \
         but {limit} leaves {available}; {fewer}",
        fewer = FEWER_TASKS
    )]
    Tasks {
        /// Tasks needed.
        asked: u64,
        /// Tasks left.
        available: u64,
        /// Which limit.
        limit: String,
    },
    /// Not enough file descriptors.
    #[error(
        "too few file descriptors: this run needs {asked} more, but RLIMIT_NOFILE is {limit} with \
         {open} open; raise it (ulimit -n) or {fewer}",
        fewer = FEWER_TASKS
    )]
    Files {
        /// Descriptors needed.
        asked: u64,
        /// The soft limit.
        limit: u64,
        /// Open now.
        open: u64,
    },
}

/// Checks `needs` against every limit this process is under; the first one that does not fit is
/// the error.
pub fn check(needs: &Needs) -> Result<(), LimitError> {
    use crate::sys::Resource;
    let read = &read_host;
    if let Some(room) = memory_room(read) {
        if needs.memory() > room.left {
            return Err(LimitError::Memory {
                asked: needs.memory(),
                available: room.left,
                limit: room.source,
            });
        }
    }
    if let Some(limit) = crate::sys::soft_limit(Resource::Fsize) {
        if needs.segment > limit {
            return Err(LimitError::FileSize {
                asked: needs.segment,
                limit,
            });
        }
    }
    if let Some(limit) = crate::sys::soft_limit(Resource::As) {
        let now = read(Path::new("/proc/self/status"))
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmSize:"))
                    .and_then(|r| r.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map_or(0, |kib| kib * 1024);
        let asked = now
            + needs.segment
            + u64::from(needs.producers) * THREAD_ADDRESS_SPACE
            + ADDRESS_SPACE_HEADROOM;
        if asked > limit {
            return Err(LimitError::AddressSpace {
                asked,
                limit,
                threads: needs.producers,
            });
        }
    }
    for room in [pids_room(read), nproc_room()].into_iter().flatten() {
        if needs.tasks() > room.left {
            return Err(LimitError::Tasks {
                asked: needs.tasks(),
                available: room.left,
                limit: room.source,
            });
        }
    }
    if let Some(limit) = crate::sys::soft_limit(Resource::Nofile) {
        let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
        // Per worker: its pidfd or exit pipe, plus the pipes of one spawn in progress; the
        // segment fd and the running image's fd.
        let asked = u64::from(needs.workers) + 6 + FD_HEADROOM;
        if open + asked > limit {
            return Err(LimitError::Files { asked, limit, open });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A v1 host like this development machine: every controller its own hierarchy, memory in a
    /// nested cgroup, plus an empty v2 mount (hybrid).
    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/2f71c9d2
1:cpu:/
0::/
";
    /// A pure v2 host (systemd), the process in a user scope.
    const V2_MOUNTINFO: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/root rw
28 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const V2_CGROUP: &str = "0::/user.slice/user-1000.slice/session-3.scope\n";
    /// Docker on a v1 host without a cgroup namespace: the container's cgroup is bind-mounted.
    const DOCKER_V1_MOUNTINFO: &str = "\
700 690 0:60 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup rw,memory
701 690 0:61 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro,nosuid - cgroup cgroup rw,cpu,cpuacct
";
    const DOCKER_V1_CGROUP: &str = "\
5:memory:/docker/abc
3:cpu,cpuacct:/docker/abc
";

    fn fake(files: &[(&str, &str)]) -> impl Fn(&Path) -> Option<String> {
        let map: HashMap<PathBuf, String> = files
            .iter()
            .map(|(p, c)| (PathBuf::from(p), c.to_string()))
            .collect();
        move |p: &Path| map.get(p).cloned()
    }

    #[test]
    fn mountinfo_finds_v1_and_v2_mounts_with_their_controllers() {
        let m = parse_mountinfo(HYBRID_MOUNTINFO);
        assert_eq!(m.len(), 5, "tmpfs is not a cgroup mount: {m:?}");
        assert_eq!(m[1].controllers, vec!["memory"]);
        assert_eq!(
            m[3].controllers,
            Vec::<String>::new(),
            "name=systemd has no controller"
        );
        assert!(m[4].v2);
        let d = parse_mountinfo(DOCKER_V1_MOUNTINFO);
        assert_eq!(d[1].controllers, vec!["cpu", "cpuacct"]);
        assert_eq!(d[0].root, "/docker/abc");
        let spaced = parse_mountinfo("1 2 0:3 / /mnt/a\\040b rw - cgroup2 none rw\n");
        assert_eq!(spaced[0].point, PathBuf::from("/mnt/a b"));
    }

    #[test]
    fn proc_cgroup_lines() {
        let c = parse_proc_cgroup(HYBRID_CGROUP);
        assert_eq!(c.len(), 5);
        assert_eq!(c[2].path, "/process_api/2f71c9d2");
        assert!(!c[2].v2 && c[4].v2);
        assert!(parse_proc_cgroup("garbage\n").is_empty());
    }

    #[test]
    fn dirs_walk_from_own_cgroup_up_to_the_mount() {
        let d = cgroup_dirs("memory", HYBRID_CGROUP, HYBRID_MOUNTINFO);
        assert_eq!(
            d,
            vec![
                PathBuf::from("/sys/fs/cgroup/memory/process_api/2f71c9d2"),
                PathBuf::from("/sys/fs/cgroup/memory/process_api"),
                PathBuf::from("/sys/fs/cgroup/memory"),
                PathBuf::from("/sys/fs/cgroup/unified"),
            ]
        );
        let v2 = cgroup_dirs("memory", V2_CGROUP, V2_MOUNTINFO);
        assert_eq!(v2.len(), 4);
        assert_eq!(
            v2[0],
            PathBuf::from("/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope")
        );
        assert_eq!(v2[3], PathBuf::from("/sys/fs/cgroup"));
        let docker = cgroup_dirs("memory", DOCKER_V1_CGROUP, DOCKER_V1_MOUNTINFO);
        assert_eq!(docker, vec![PathBuf::from("/sys/fs/cgroup/memory")]);
        assert!(cgroup_dirs("pids", DOCKER_V1_CGROUP, DOCKER_V1_MOUNTINFO).is_empty());
        // A root that is a string prefix but not an ancestor, and a namespaced path that climbs
        // out of its namespace, both resolve to the mount point.
        let sibling = "5:memory:/docker/abcdef\n";
        assert_eq!(
            cgroup_dirs("memory", sibling, DOCKER_V1_MOUNTINFO),
            vec![PathBuf::from("/sys/fs/cgroup/memory")]
        );
        let climbing = "0::/../../user.slice/x\n";
        assert_eq!(
            cgroup_dirs("memory", climbing, V2_MOUNTINFO),
            vec![PathBuf::from("/sys/fs/cgroup")]
        );
    }

    #[test]
    fn reclaimable_page_cache_is_not_counted_as_used() {
        let read = fake(&[
            ("/proc/self/cgroup", V2_CGROUP),
            ("/proc/self/mountinfo", V2_MOUNTINFO),
            ("/sys/fs/cgroup/user.slice/memory.max", "1000000\n"),
            ("/sys/fs/cgroup/user.slice/memory.current", "900000\n"),
            (
                "/sys/fs/cgroup/user.slice/memory.stat",
                "anon 100000\nfile 800000\nactive_file 300000\ninactive_file 500000\n",
            ),
        ]);
        assert_eq!(memory_room(&read).unwrap().left, 600_000);
    }

    #[test]
    fn the_tightest_memory_limit_wins_at_any_level() {
        let read = fake(&[
            ("/proc/self/cgroup", V2_CGROUP),
            ("/proc/self/mountinfo", V2_MOUNTINFO),
            (
                "/proc/meminfo",
                "MemTotal: 1000 kB\nMemAvailable:   8000000 kB\n",
            ),
            (
                "/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.max",
                "max\n",
            ),
            (
                "/sys/fs/cgroup/user.slice/user-1000.slice/session-3.scope/memory.current",
                "100\n",
            ),
            ("/sys/fs/cgroup/user.slice/memory.max", "1073741824\n"),
            ("/sys/fs/cgroup/user.slice/memory.current", "73741824\n"),
            ("/sys/fs/cgroup/user.slice/memory.high", "2000000000\n"),
        ]);
        let room = memory_room(&read).unwrap();
        assert_eq!(room.left, 1_000_000_000);
        assert!(room.source.contains("user.slice/memory.max"), "{room:?}");

        let v1 = fake(&[
            ("/proc/self/cgroup", HYBRID_CGROUP),
            ("/proc/self/mountinfo", HYBRID_MOUNTINFO),
            ("/proc/meminfo", "MemAvailable: 8000000 kB\n"),
            (
                "/sys/fs/cgroup/memory/process_api/2f71c9d2/memory.limit_in_bytes",
                "9223372036854771712\n",
            ),
            (
                "/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes",
                "209715200\n",
            ),
            (
                "/sys/fs/cgroup/memory/process_api/memory.usage_in_bytes",
                "9715200\n",
            ),
        ]);
        let room = memory_room(&v1).unwrap();
        assert_eq!(room.left, 200_000_000);
        assert!(room.source.contains("memory.limit_in_bytes"), "{room:?}");

        // A limit above the cgroup mount (not visible as a directory) via memory.stat.
        let hidden = fake(&[
            ("/proc/self/cgroup", DOCKER_V1_CGROUP),
            ("/proc/self/mountinfo", DOCKER_V1_MOUNTINFO),
            ("/proc/meminfo", "MemAvailable: 8000000 kB\n"),
            (
                "/sys/fs/cgroup/memory/memory.stat",
                "cache 0\nhierarchical_memory_limit 41943040\ntotal_inactive_file 0\n",
            ),
            ("/sys/fs/cgroup/memory/memory.usage_in_bytes", "1943040\n"),
        ]);
        let room = memory_room(&hidden).unwrap();
        assert_eq!(room.left, 40_000_000);
        assert!(
            room.source.contains("hierarchical_memory_limit"),
            "{room:?}"
        );

        let none = fake(&[("/proc/meminfo", "MemAvailable: 4 kB\n")]);
        assert_eq!(memory_room(&none).unwrap().left, 4096);
    }

    #[test]
    fn pids_limits_from_either_hierarchy() {
        // v2 keeps pids and memory files side by side: page cache must not shrink the task count.
        let v2 = fake(&[
            ("/proc/self/cgroup", V2_CGROUP),
            ("/proc/self/mountinfo", V2_MOUNTINFO),
            ("/sys/fs/cgroup/user.slice/pids.max", "100\n"),
            ("/sys/fs/cgroup/user.slice/pids.current", "60\n"),
            (
                "/sys/fs/cgroup/user.slice/memory.stat",
                "inactive_file 500000000\n",
            ),
        ]);
        assert_eq!(pids_room(&v2).unwrap().left, 40);
        let read = fake(&[
            ("/proc/self/cgroup", "8:pids:/job\n0::/\n"),
            ("/proc/self/mountinfo", HYBRID_MOUNTINFO),
            ("/sys/fs/cgroup/pids/job/pids.max", "10\n"),
            ("/sys/fs/cgroup/pids/job/pids.current", "7\n"),
            ("/sys/fs/cgroup/pids/pids.max", "max\n"),
        ]);
        assert_eq!(pids_room(&read).unwrap().left, 3);
        let unlimited = fake(&[
            ("/proc/self/cgroup", V2_CGROUP),
            ("/proc/self/mountinfo", V2_MOUNTINFO),
        ]);
        assert_eq!(pids_room(&unlimited), None);
    }

    #[test]
    fn needs_grow_with_the_run() {
        let n = Needs {
            segment: 1 << 30,
            workers: 4,
            producers: 2,
            worker_memory: WORKER_MEMORY,
        };
        assert!(n.memory() > n.segment + 4 * WORKER_MEMORY);
        // A small pool fits a 64 MiB container (the headroom was once 64 MiB by itself), and a
        // worker program that takes more says so.
        let small = Needs {
            segment: 1 << 20,
            workers: 1,
            ..n
        };
        assert!(small.memory() < 16 << 20, "{}", small.memory());
        let python = Needs {
            worker_memory: 32 << 20,
            ..n
        };
        assert!(python.memory() > 4 * (32 << 20));
        let huge = Needs {
            worker_memory: u64::MAX,
            ..small
        };
        assert_eq!(huge.memory(), u64::MAX);
        assert_eq!(n.tasks(), 7);
    }
}
