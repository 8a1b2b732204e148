//! The byte-stream baselines: worker processes that receive every matrix's bytes over a Unix
//! stream socket or a pair of pipes, apply the op, and send the bytes back. This is what
//! `multiprocessing` queues, `Pipe`s and most RPC layers do under the hood.
//!
//! The producer thread fills and writes; one reader thread per worker reads responses into
//! recycled buffers and hands them to the producer, which verifies them, as in mk1.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crossbeam_channel as chan;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{Job, SystemRun, Tally};
use crate::job::{fill_base, Shapes};
use crate::ops::{Kernel, Kernels, Op};
use crate::sys;

/// Environment variable that turns a process into a bench child.
pub const CHILD_ENV: &str = "MK1_BENCH_CHILD";

/// Which byte stream carries the matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// A Unix stream socket pair.
    UnixSocket,
    /// Two pipes.
    Pipe,
}

/// Message header: id (u32), rows (u32), cols (u32), reserved (u32), seq (u64).
const HEADER: usize = 24;

fn header(id: u32, rows: u32, cols: u32, seq: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&id.to_le_bytes());
    h[4..8].copy_from_slice(&rows.to_le_bytes());
    h[8..12].copy_from_slice(&cols.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    h
}

fn parse_header(h: &[u8; HEADER]) -> (u32, u32, u32, u64) {
    let u = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    (
        u(0),
        u(4),
        u(8),
        u64::from_le_bytes(h[16..24].try_into().expect("8 bytes")),
    )
}

fn as_bytes(v: &[i32]) -> &[u8] {
    // SAFETY: i32 has no padding and any alignment is fine for u8; same memory, 4× the length.
    unsafe { core::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 4) }
}

fn as_bytes_mut(v: &mut [i32]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern is a valid i32, so writes through it are fine.
    unsafe { core::slice::from_raw_parts_mut(v.as_mut_ptr().cast(), v.len() * 4) }
}

/// If this process was started as a bench child, serve and exit; otherwise return.
pub fn run_child_if_requested() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let code = match serve_child(&spec) {
        Ok(()) => 0,
        Err(e) => {
            // (Not `eprintln!`, which panics when stderr is gone.)
            use std::io::Write as _;
            let _ = writeln!(std::io::stderr(), "mk1 bench child: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// `stream:<rfd>,<wfd>,<parent>,<kernel>,<op>` or `pingpong:<fd>,<parent>`.
fn serve_child(spec: &str) -> Result<(), String> {
    let (kind, rest) = spec.split_once(':').ok_or("malformed spec")?;
    let f: Vec<&str> = rest.split(',').collect();
    let fd = |i: usize| -> Result<File, String> {
        let n: RawFd = f.get(i).and_then(|s| s.parse().ok()).ok_or("bad fd")?;
        // SAFETY: the parent cleared close-on-exec on this fd for us; nothing else here owns it.
        Ok(File::from(unsafe { OwnedFd::from_raw_fd(n) }))
    };
    let parent = |i: usize| -> Result<u32, String> {
        f.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "bad pid".into())
    };
    match kind {
        "stream" => {
            if !sys::die_with_parent(parent(2)?).map_err(|e| e.to_string())? {
                return Err("parent already gone".into());
            }
            let (mut rd, mut wr) = (fd(0)?, fd(1)?);
            let kernel = f
                .get(3)
                .and_then(|k| Kernel::ALL.into_iter().find(|x| x.name() == *k))
                .ok_or("bad kernel")?;
            let kernels = Kernels::new(kernel).map_err(|e| e.to_string())?;
            let op: Op = f
                .get(4)
                .ok_or("no op")?
                .replace(';', ",")
                .parse()
                .map_err(|e: crate::ops::OpParseError| e.to_string())?;
            let mut buf: Vec<i32> = Vec::new();
            loop {
                let mut h = [0u8; HEADER];
                if rd.read_exact(&mut h).is_err() {
                    return Ok(()); // parent closed: done
                }
                let (_, rows, cols, _) = parse_header(&h);
                let len = rows as usize * cols as usize;
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                rd.read_exact(as_bytes_mut(&mut buf[..len]))
                    .map_err(|e| e.to_string())?;
                kernels.apply(op, &mut buf[..len]);
                wr.write_all(&h).map_err(|e| e.to_string())?;
                wr.write_all(as_bytes(&buf[..len]))
                    .map_err(|e| e.to_string())?;
            }
        }
        "pingpong" => {
            if !sys::die_with_parent(parent(1)?).map_err(|e| e.to_string())? {
                return Err("parent already gone".into());
            }
            let mut s = fd(0)?;
            let mut b = [0u8; 4];
            while s.read_exact(&mut b).is_ok() {
                s.write_all(&b).map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        _ => Err(format!("unknown child kind {kind}")),
    }
}

/// A started child process, killed and reaped on drop.
pub(crate) struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A started child and its ends of the stream.
struct Child {
    proc: Proc,
    rd: File,
    wr: File,
}

/// Starts `exe` as a bench child with `spec` (after the kind), passing `child_fds`.
pub(crate) fn spawn_child(
    exe: &std::path::Path,
    spec: String,
    child_fds: &[RawFd],
) -> Result<Proc, String> {
    sys::spawn_inheriting(
        exe,
        &sys::Launch::default(),
        CHILD_ENV,
        &spec,
        child_fds,
        None,
    )
    .map(Proc)
    .map_err(|e| format!("cannot start {}: {e}", exe.display()))
}

fn start(job: &Job, kind: StreamKind) -> Result<Child, String> {
    let parent = sys::own_pid();
    let op = job.op.to_string().replace(',', ";");
    let kernel = job.kernels.kernel().name();
    match kind {
        StreamKind::UnixSocket => {
            let (mine, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
            let fd = theirs.as_raw_fd();
            let proc = spawn_child(
                &job.exe,
                format!("stream:{fd},{fd},{parent},{kernel},{op}"),
                &[fd],
            )?;
            drop(theirs);
            let rd = File::from(OwnedFd::from(mine.try_clone().map_err(|e| e.to_string())?));
            Ok(Child {
                proc,
                rd,
                wr: File::from(OwnedFd::from(mine)),
            })
        }
        StreamKind::Pipe => {
            let (req_r, req_w) = sys::pipe().map_err(|e| e.to_string())?;
            let (resp_r, resp_w) = sys::pipe().map_err(|e| e.to_string())?;
            let (cr, cw) = (req_r.as_raw_fd(), resp_w.as_raw_fd());
            let proc = spawn_child(
                &job.exe,
                format!("stream:{cr},{cw},{parent},{kernel},{op}"),
                &[cr, cw],
            )?;
            drop((req_r, resp_w));
            Ok(Child {
                proc,
                rd: File::from(resp_r),
                wr: File::from(req_w),
            })
        }
    }
}

/// A response read by a worker's reader thread.
struct Returned {
    id: u32,
    seq: u64,
    len: usize,
    data: Vec<i32>,
    worker: usize,
}

/// Runs the job over byte streams.
pub(crate) fn run(job: &Job, kind: StreamKind) -> Result<SystemRun, String> {
    let name = match kind {
        StreamKind::UnixSocket => "unix-socket",
        StreamKind::Pipe => "pipe",
    };
    let mut procs = Vec::new();
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..job.workers {
        let c = start(job, kind)?;
        procs.push(c.proc);
        readers.push(c.rd);
        writers.push(c.wr);
    }
    let max_elems = (job.max_dim as usize).pow(2);
    let slots = (job.workers * job.inflight) as usize;
    let (ret_tx, ret_rx) = chan::unbounded::<Returned>();
    let mut tally = Tally::new();
    let mut issued = 0u64;
    let result = std::thread::scope(|s| -> Result<(), String> {
        let mut recycle = Vec::new();
        for (w, mut rd) in readers.into_iter().enumerate() {
            let (free_tx, free_rx) = chan::unbounded::<Vec<i32>>();
            for _ in 0..job.inflight {
                free_tx.send(vec![0; max_elems]).expect("open channel");
            }
            recycle.push(free_tx);
            let tx = ret_tx.clone();
            s.spawn(move || loop {
                // Ends at EOF, when the child is stopped. A buffer comes from the recycled ones,
                // or is allocated if the producer still holds them all (never block here: the
                // child would block writing and the producer writing to the child).
                let mut h = [0u8; HEADER];
                if rd.read_exact(&mut h).is_err() {
                    return;
                }
                let (id, rows, cols, seq) = parse_header(&h);
                let len = rows as usize * cols as usize;
                let mut data = free_rx.try_recv().unwrap_or_else(|_| vec![0; max_elems]);
                if len > data.len() || rd.read_exact(as_bytes_mut(&mut data[..len])).is_err() {
                    return;
                }
                if tx
                    .send(Returned {
                        id,
                        seq,
                        len,
                        data,
                        worker: w,
                    })
                    .is_err()
                {
                    return;
                }
            });
        }
        drop(ret_tx);
        let mut produce = || -> Result<(), String> {
            let mut buf = vec![0i32; max_elems];
            let mut free_ids: Vec<u32> = (0..slots as u32).collect();
            let mut sent_at = vec![Instant::now(); slots];
            let mut shapes = Shapes::new(job.seed, job.min_dim, job.max_dim);
            let mut pick = SmallRng::seed_from_u64(job.seed);
            let deadline = Instant::now() + job.duration;
            let mut out = 0usize;
            loop {
                while Instant::now() < deadline {
                    let Some(id) = free_ids.pop() else { break };
                    let (r, c) = shapes.next_shape();
                    let len = (r * c) as usize;
                    job.kernels
                        .fill(fill_base(issued, job.seed), &mut buf[..len]);
                    let now = Instant::now();
                    tally.issued(now);
                    sent_at[id as usize] = now;
                    let w = pick.random_range(0..writers.len());
                    let wr = &mut writers[w];
                    wr.write_all(&header(id, r, c, issued))
                        .map_err(|e| e.to_string())?;
                    wr.write_all(as_bytes(&buf[..len]))
                        .map_err(|e| e.to_string())?;
                    issued += 1;
                    out += 1;
                }
                if out == 0 {
                    break;
                }
                let m = ret_rx.recv().map_err(|_| "a worker died".to_string())?;
                out -= 1;
                tally.check(job, m.seq, &m.data[..m.len], sent_at[m.id as usize]);
                free_ids.push(m.id);
                let _ = recycle[m.worker].send(m.data);
            }
            Ok(())
        };
        let r = produce();
        // Readers block in read; ending the children gives them EOF, so the scope can join them.
        drop(recycle);
        drop(std::mem::take(&mut procs));
        r
    });
    drop(procs);
    result?;
    Ok(tally.finish(name, issued))
}
