//! `mk1 apply` against numpy: files written by numpy go through worker processes and come back
//! as numpy expects, for every dtype and several shapes; every kind of bad input is exit 2
//! naming the file, before any work.
//!
//! Needs `python3` with numpy (`.ci/run` installs it and sets `MK1_REQUIRE_NUMPY=1`, which
//! turns a missing numpy into a failure instead of a skip).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::mk1;

fn numpy() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("MK1_REQUIRE_NUMPY").is_none(),
            "numpy is required (MK1_REQUIRE_NUMPY is set) but `python3 -c 'import numpy'` fails"
        );
        println!("SKIPPED: python3 with numpy is not installed");
    }
    ok
}

fn py(dir: &Path, code: &str) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(code)
        .current_dir(dir)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        code
    );
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("mk1-apply-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn apply(dir: &Path, args: &[&str]) -> std::process::Output {
    let mut full = vec!["apply"];
    full.extend_from_slice(args);
    let owned: Vec<String> = full
        .iter()
        .map(|a| {
            if a.ends_with(".npy") && !a.starts_with('/') {
                dir.join(a).display().to_string()
            } else {
                a.to_string()
            }
        })
        .collect();
    let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
    mk1(&refs, Duration::from_secs(60))
}

/// `mk1 apply ARGS` (with `--json`) that must succeed: its summary.
fn apply_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let o = apply(dir, args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn numpy_files_round_trip_for_every_dtype_and_shape() {
    if !numpy() {
        return;
    }
    let t = TempDir::new("rt");
    py(
        &t.0,
        "import numpy as np\n\
         rng = np.random.default_rng(7)\n\
         shapes = [(0,), (1, 1), (1000,), (37, 53), (2, 3, 4), (2, 2, 2, 2, 3), ()]\n\
         for dt in ['int8','uint8','int16','uint16','int32','uint32','int64','uint64','float32','float64']:\n\
         \x20   for i, s in enumerate(shapes):\n\
         \x20       x = (rng.standard_normal(s) * 100).astype(dt)\n\
         \x20       np.save(f'{dt}_{i}.npy', x)\n\
         \x20       if x.ndim >= 2 and min(s) > 1:\n\
         \x20           np.save(f'{dt}_{i}_fortran.npy', np.asfortranarray(x))\n\
         \x20           np.save(f'{dt}_{i}_big.npy', x.astype(x.dtype.newbyteorder('>')))\n\
         \x20           np.save(f'{dt}_{i}_fortran_big.npy',\n\
         \x20                   np.asfortranarray(x).astype(x.dtype.newbyteorder('>'), order='K'))\n",
    );
    let inputs: Vec<String> = std::fs::read_dir(&t.0)
        .unwrap()
        .flatten()
        .map(|e| e.path().display().to_string())
        .collect();
    // 10 dtypes × 7 shapes; 3 shapes also Fortran-ordered, big-endian, and both (1-byte dtypes have
    // no byte order: their "big-endian" files are plain ones).
    assert_eq!(inputs.len(), 160);
    for mode in ["out-of-place", "in-place"] {
        let out = t.0.join(format!("out-{mode}"));
        let out_s = out.display().to_string();
        let mut args = vec![
            "--op",
            "affine:3,2",
            "--workers",
            "2",
            "--mode",
            mode,
            "--json",
        ];
        args.extend(inputs.iter().map(String::as_str));
        args.extend(["--out-dir", &out_s]);
        let v = apply_json(&t.0, &args);
        assert_eq!(v["written"], 160);
        assert_eq!(v["failed"], 0);
        py(
            &t.0,
            &format!(
                "import numpy as np, glob, os\n\
                 n = 0\n\
                 for f in glob.glob('*.npy'):\n\
                 \x20   a = np.load(f); b = np.load(os.path.join('{out_s}', f))\n\
                 \x20   with np.errstate(over='ignore'):\n\
                 \x20       want = (a * a.dtype.type(3) + a.dtype.type(2)).astype(a.dtype)\n\
                 \x20   # Little-endian (as numpy's own result), in the input's memory order.\n\
                 \x20   assert b.dtype == a.dtype.newbyteorder('<') and b.shape == a.shape, (f, b.dtype, b.shape)\n\
                 \x20   assert b.flags.f_contiguous == a.flags.f_contiguous, f\n\
                 \x20   assert b.flags.c_contiguous == a.flags.c_contiguous, f\n\
                 \x20   assert ('fortran' in f) == (a.ndim > 1 and not a.flags.c_contiguous), f\n\
                 \x20   assert ('big' in f and a.itemsize > 1) == (a.dtype.byteorder == '>'), f\n\
                 \x20   assert np.array_equal(b, want), f\n\
                 \x20   n += 1\n\
                 assert n == 160\n\
                 assert not [x for x in os.listdir('{out_s}') if 'tmp' in x]\n"
            ),
        );
    }
}

/// One large file among many small ones: the small ones get small slots, so the segment holds
/// one slot of the large file's size per region, not one per worker; every result is right.
#[test]
fn one_large_file_among_small_ones_gets_one_large_slot() {
    if !numpy() {
        return;
    }
    let t = TempDir::new("sizes");
    py(
        &t.0,
        "import numpy as np\n\
         np.save('big.npy', np.arange(2 << 20, dtype='int32'))\n\
         for i in range(10):\n\
         \x20   np.save(f's{i}.npy', np.arange(100 + i, dtype='int32'))\n",
    );
    let out = t.0.join("out");
    let out_s = out.display().to_string();
    let mut args = vec!["--op", "add:1", "--workers", "1", "--json", "big.npy"];
    let small: Vec<String> = (0..10).map(|i| format!("s{i}.npy")).collect();
    args.extend(small.iter().map(String::as_str));
    args.extend(["--out-dir", &out_s]);
    let v = apply_json(&t.0, &args);
    assert_eq!(v["written"], 11);
    // 8 MiB per region of a large slot, input and output: four large slots (one per worker
    // and two spare, as before) would be 64 MiB.
    let seg = v["segment_bytes"].as_u64().unwrap();
    assert!(seg < 24 << 20, "segment of {seg} bytes");
    py(
        &t.0,
        &format!(
            "import numpy as np, os\n\
             for f in ['big.npy'] + [f's{{i}}.npy' for i in range(10)]:\n\
             \x20   a = np.load(f); b = np.load(os.path.join('{out_s}', f))\n\
             \x20   assert b.dtype == a.dtype and np.array_equal(b, a + 1), f\n"
        ),
    );
}

#[test]
fn bad_inputs_are_exit_2_naming_the_file_before_any_work() {
    if !numpy() {
        return;
    }
    let t = TempDir::new("bad");
    py(
        &t.0,
        "import numpy as np\n\
         np.save('good.npy', np.arange(10, dtype=np.int32))\n\
         np.save('complex.npy', np.zeros(3, dtype=np.complex64))\n\
         np.save('object.npy', np.array([1, 'a'], dtype=object), allow_pickle=True)\n\
         np.save('f16.npy', np.zeros(3, dtype=np.float16))\n\
         np.save('f32.npy', np.ones(3, dtype=np.float32))\n\
         np.save('bool.npy', np.zeros(3, dtype=bool))\n\
         np.save('struct.npy', np.zeros(2, dtype=[('a', 'i4'), ('b', 'f8')]))\n\
         b = open('good.npy', 'rb').read(); open('trunc.npy', 'wb').write(b[:-5])\n\
         open('text.npy', 'w').write('not an array')\n\
         import os; os.mkfifo('pipe.npy'); os.mkdir('dir.npy')\n",
    );
    let out = t.0.join("out");
    let out_s = out.display().to_string();
    let cases = [
        ("complex.npy", "complex"),
        ("object.npy", "object"),
        ("bool.npy", "not supported"),
        ("f16.npy", "not supported"),
        ("struct.npy", "structured dtype (fields a, b)"),
        ("pipe.npy", "not a regular file"),
        ("dir.npy", "not a regular file"),
        ("trunc.npy", "truncated"),
        ("text.npy", "not a readable"),
        ("missing.npy", "No such file"),
    ];
    for (file, why) in cases {
        let o = apply(
            &t.0,
            &["--op", "neg", "good.npy", file, "--out-dir", &out_s],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{file}: {err}");
        assert!(err.contains(file) && err.contains(why), "{file}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            !out.join("good.npy").exists(),
            "{file}: work started before every header was checked"
        );
    }
    // An op the dtype does not have, named with the file.
    let o = apply(&t.0, &["--op", "shl:40", "good.npy", "--out-dir", &out_s]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("good.npy") && err.contains("32 bits"), "{err}");
    // A value the dtype cannot hold: 1e40 is beyond float32 (it was taken as infinity).
    let o = apply(&t.0, &["--op", "add:1e40", "f32.npy", "--out-dir", &out_s]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("f32.npy") && err.contains("not a value of float32"),
        "{err}"
    );
    // An output directory that cannot be made (under a file), and one that is a file.
    let blocker = t.0.join("file-not-dir");
    std::fs::write(&blocker, b"").unwrap();
    for (out_dir, says) in [
        (blocker.join("x"), "cannot create"),
        (blocker.clone(), "exists and is not a directory"),
    ] {
        let out = out_dir.display().to_string();
        let o = apply(&t.0, &["--op", "neg", "good.npy", "--out-dir", &out]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(says), "{err}");
    }
    // Two inputs that would overwrite each other.
    std::fs::create_dir_all(t.0.join("sub")).unwrap();
    std::fs::copy(t.0.join("good.npy"), t.0.join("sub/good.npy")).unwrap();
    let o = apply(
        &t.0,
        &[
            "--op",
            "neg",
            "good.npy",
            "sub/good.npy",
            "--out-dir",
            &out_s,
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("would both be written"));
    // A bad op.
    let o = apply(&t.0, &["--op", "frob:1", "good.npy", "--out-dir", &out_s]);
    assert_eq!(o.status.code(), Some(2));
    // No worker to run it (as `mk1 run --workers 0`).
    let o = apply(
        &t.0,
        &[
            "--op",
            "neg",
            "--workers",
            "0",
            "good.npy",
            "--out-dir",
            &out_s,
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--workers: 0"));
    // Results over their own inputs: refused, the input untouched.
    let before = std::fs::read(t.0.join("good.npy")).unwrap();
    let dir = t.0.display().to_string();
    let o = apply(&t.0, &["--op", "neg", "good.npy", "--out-dir", &dir]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("overwritten by its own result"));
    assert_eq!(std::fs::read(t.0.join("good.npy")).unwrap(), before);
}

/// Input files of 1 MiB each (f32, 512x512, element `i` of file `k` is `k + i`), written
/// with mk1's own writer (no numpy needed); their paths.
fn mib_inputs(dir: &Path, n: usize) -> Vec<String> {
    (0..n)
        .map(|k| {
            let p = dir.join(format!("in{k:03}.npy"));
            let data: Vec<u8> = (0..512 * 512)
                .flat_map(|i| ((k + i) as f32).to_le_bytes())
                .collect();
            mk1::npy::write_atomically(&p, mk1::DType::F32, &[512, 512], false, &data).unwrap();
            p.display().to_string()
        })
        .collect()
}

/// Every file in `out` is a whole result (`neg` of its input), and nothing else is there.
fn only_whole_results(out: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(out).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("in") && name.ends_with(".npy"),
            "left behind: {name}"
        );
        let k: usize = name[2..5].parse().unwrap();
        let info = mk1::npy::inspect(&p).unwrap();
        let mut data = vec![0u8; info.data_bytes as usize];
        mk1::npy::read_data(&p, &info, &mut data).unwrap();
        assert_eq!(data.len(), 512 * 512 * 4, "{name}");
        for (i, c) in data.chunks_exact(4).enumerate().step_by(997) {
            assert_eq!(f32::from_le_bytes(c.try_into().unwrap()), -((k + i) as f32));
        }
        n += 1;
    }
    n
}

#[test]
fn a_stopped_apply_leaves_only_whole_files_and_says_what_it_did_not_start() {
    use std::process::Stdio;
    let t = TempDir::new("signal");
    let inputs = mib_inputs(&t.0, 120);
    for (sig, code) in [(libc::SIGINT, Some(130)), (libc::SIGKILL, None)] {
        let out = t.0.join(format!("out-{sig}"));
        let mut args = vec![
            "apply",
            "--op",
            "neg",
            "--workers",
            "1",
            "--json",
            "--out-dir",
        ];
        let out_s = out.display().to_string();
        args.push(&out_s);
        args.extend(inputs.iter().map(String::as_str));
        let child = Command::new(common::MK1)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Signalled once the first result is there: in the middle of writing others. (A
        // result, not the writability probe `apply` makes and removes at start.)
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let results = |d: std::fs::ReadDir| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("in"))
                .count()
        };
        while std::fs::read_dir(&out).map_or(0, results) == 0 {
            assert!(std::time::Instant::now() < deadline, "no result came");
            std::thread::sleep(Duration::from_millis(2));
        }
        // SAFETY: kill(2) on our own child's pid, which it keeps until we wait for it.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let o = common::wait_with_limit(child, Duration::from_secs(60));
        assert_eq!(
            o.status.code(),
            code,
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let whole = only_whole_results(&out);
        if sig == libc::SIGINT {
            let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(j["interrupted"], "SIGINT", "{j}");
            assert_eq!(j["written"], whole, "{j}");
            assert_eq!(j["failed"], 0, "{j}");
            let not_started = j["not_started"].as_u64().unwrap();
            assert!(not_started > 0, "stopped early: {j}");
            assert_eq!(
                whole as u64 + not_started,
                120,
                "every file written or not started: {j}"
            );
        }
    }
}

/// An output directory that fills up: the files already started end (written or failed
/// alone), no file is started after the first that could not be written for want of space,
/// and the summary says so (it once tried every remaining file, one error line each).
#[test]
fn a_full_output_directory_stops_starting_files() {
    let unshare_ok = Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !unshare_ok || !rustix::process::getuid().is_root() {
        println!("skipped: a small output filesystem needs unshare -m (root)");
        return;
    }
    let t = TempDir::new("full");
    let inputs = mib_inputs(&t.0, 40);
    let out = t.0.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let out_s = out.display().to_string();
    // (The mount lives in the command's own mount namespace: 5 MiB, room for 4 results.)
    let script = "mount -t tmpfs -o size=5m tmpfs \"$1\" && shift && exec \"$@\"";
    let mut args = vec![
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        &out_s,
        common::MK1,
        "apply",
        "--op",
        "neg",
        "--workers",
        "1",
        "--json",
        "--out-dir",
        &out_s,
    ];
    args.extend(inputs.iter().map(String::as_str));
    let o = Command::new("unshare").args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["out_of_space"], true, "{j}");
    let (written, failed, not_started) = (
        j["written"].as_u64().unwrap(),
        j["failed"].as_u64().unwrap(),
        j["not_started"].as_u64().unwrap(),
    );
    assert!((1..=4).contains(&written), "{j}");
    assert_eq!(written + failed + not_started, 40, "{j}");
    // Only what was in flight when space ran out fails (the handle's slots: 4 per worker).
    assert!(failed <= 8 && not_started >= 28, "{j}");
    assert_eq!(err.lines().count() as u64, failed, "{err}");
}
