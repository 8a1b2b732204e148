//! Source rules that the compiler cannot check for us.

use std::fs;
use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Shared atomics come from `crate::sync` only, so the protocol can be swapped to loom.
#[test]
fn atomics_go_through_the_sync_module() {
    let mut files = Vec::new();
    rust_files(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
        &mut files,
    );
    assert!(files.len() > 10);
    for f in files {
        if f.ends_with("sync.rs") {
            continue;
        }
        let text = fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let direct = line.contains("sync::atomic::")
                && (line.contains("AtomicU32") || line.contains("AtomicU64"));
            assert!(
                !direct,
                "{}:{}: use crate::sync for AtomicU32/AtomicU64: {line}",
                f.display(),
                i + 1
            );
        }
    }
}

/// Only `sys` talks to the kernel (rustix); `shm` may name rustix error codes.
#[test]
fn only_sys_makes_syscalls() {
    let mut files = Vec::new();
    rust_files(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
        &mut files,
    );
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if name == "sys.rs" {
            continue;
        }
        let text = fs::read_to_string(&f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let call = line.contains("rustix::") && !line.contains("rustix::io::Errno");
            assert!(
                !call || line.trim_start().starts_with("//"),
                "{}:{}: syscall outside sys: {line}",
                f.display(),
                i + 1
            );
            assert!(
                !line.contains("libc::"),
                "{}:{}: libc outside sys",
                f.display(),
                i + 1
            );
        }
    }
}
