//! `.npy` files (numpy's array format) in and out, through the `npyz` crate: headers are
//! parsed and checked by it; data is read and written as raw little-endian bytes straight into
//! and out of slot memory.
//!
//! Accepted: the ten dtypes of [`DType`] in either byte order, C or Fortran order, any shape
//! (0-d included). Big-endian data is read in little-endian order (as numpy's own arithmetic
//! on such an array gives its result in the machine's order); the memory order is kept as the
//! file says, for [`write_atomically`] to write the result in it. Refused with a reason:
//! structured, object, complex, bool, float16, strings, dates, and files shorter than their
//! header says.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, Write};
use std::path::{Path, PathBuf};

use npyz::{Endianness, NpyHeader, Order, TypeChar, WriterBuilder};

use crate::dtype::DType;

/// What a checked `.npy` header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyInfo {
    /// Element type.
    pub dtype: DType,
    /// Dimensions as in the file (may be empty for a 0-d array).
    pub shape: Vec<u64>,
    /// Offset of the first data byte.
    pub data_offset: u64,
    /// Bytes of data (elements × element size).
    pub data_bytes: u64,
    /// The file's elements are in Fortran (column-major) order. Elementwise work does not
    /// care; a result written with the same order and shape holds the same array.
    pub fortran_order: bool,
    /// The file's elements are big-endian; [`read_data`] gives them little-endian.
    pub big_endian: bool,
}

impl NpyInfo {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Why a file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    /// It could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// It is not an `.npy` file mk1 can take.
    #[error("{path}: {why}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// Reads and checks the header of `path` (and that the data is all there).
///
/// # Errors
/// [`NpyError`] naming the file: unreadable, not `.npy`, an unsupported dtype, or truncated.
pub fn inspect(path: &Path) -> Result<NpyInfo, NpyError> {
    let io_err = |source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |why: String| NpyError::Unsupported {
        path: path.to_path_buf(),
        why,
    };
    // (Looked at before it is opened: opening a named pipe waits for a writer.)
    if !std::fs::metadata(path).map_err(io_err)?.is_file() {
        // (A pipe, `<(cat f.npy)` say, cannot be read twice: once checked, once for the data.)
        return Err(bad(
            "not a regular file (a directory, pipe, socket or device): mk1 apply reads .npy \
             files it can open again, from a filesystem"
                .into(),
        ));
    }
    let file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    let mut r = BufReader::new(file);
    let header = NpyHeader::from_reader(&mut r)
        .map_err(|e| bad(format!("not a readable .npy file ({e})")))?;
    let data_offset = r.stream_position().map_err(io_err)?;
    let ts = match header.dtype() {
        npyz::DType::Plain(ts) => ts,
        npyz::DType::Record(fields) => {
            let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
            return Err(bad(format!(
                "a structured dtype (fields {}): mk1 takes plain numeric arrays",
                names.join(", ")
            )));
        }
        other => {
            return Err(bad(format!(
                "dtype {}: mk1 takes plain numeric arrays",
                other.descr()
            )))
        }
    };
    let size = ts.size_field();
    let dtype = match (ts.type_char(), size) {
        (TypeChar::Int, 1) => DType::I8,
        (TypeChar::Uint, 1) => DType::U8,
        (TypeChar::Int, 2) => DType::I16,
        (TypeChar::Uint, 2) => DType::U16,
        (TypeChar::Int, 4) => DType::I32,
        (TypeChar::Uint, 4) => DType::U32,
        (TypeChar::Int, 8) => DType::I64,
        (TypeChar::Uint, 8) => DType::U64,
        (TypeChar::Float, 4) => DType::F32,
        (TypeChar::Float, 8) => DType::F64,
        _ => {
            return Err(bad(format!(
            "dtype {ts} is not supported (mk1 takes int8..int64, uint8..uint64, float32, float64)"
        )))
        }
    };
    let big_endian = size > 1 && ts.endianness() == Endianness::Big;
    // (A 0-d or 1-d array is the same in either order.)
    let fortran_order = header.order() == Order::Fortran && header.shape().len() > 1;
    let elements = header
        .shape()
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .ok_or_else(|| bad("the shape's element count overflows".into()))?;
    let data_bytes = elements
        .checked_mul(size)
        .ok_or_else(|| bad("the data size overflows".into()))?;
    let have = len.saturating_sub(data_offset);
    if have < data_bytes {
        return Err(bad(format!(
            "truncated: the header says {data_bytes} bytes of data, the file has {have}"
        )));
    }
    Ok(NpyInfo {
        dtype,
        shape: header.shape().to_vec(),
        data_offset,
        data_bytes,
        fortran_order,
        big_endian,
    })
}

/// Reads the data of a file [`inspect`] accepted into `out` (exactly `info.data_bytes`), in
/// the file's memory order, each element little-endian (swapped from a big-endian file).
///
/// # Errors
/// The file could not be read (changed or shrunk since it was inspected, say).
pub fn read_data(path: &Path, info: &NpyInfo, out: &mut [u8]) -> Result<(), NpyError> {
    let io_err = |source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io_err)?;
    f.seek(io::SeekFrom::Start(info.data_offset))
        .map_err(io_err)?;
    f.read_exact(out).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io_err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "the file ends before its {} bytes of data do (it shrank after mk1 checked it)",
                    info.data_bytes
                ),
            ))
        } else {
            io_err(e)
        }
    })?;
    if info.big_endian {
        for element in out.chunks_exact_mut(info.dtype.size()) {
            element.reverse();
        }
    }
    Ok(())
}

fn type_str(dtype: DType) -> &'static str {
    match dtype {
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::I16 => "<i2",
        DType::U16 => "<u2",
        DType::I32 => "<i4",
        DType::U32 => "<u4",
        DType::I64 => "<i8",
        DType::U64 => "<u8",
        DType::F32 => "<f4",
        DType::F64 => "<f8",
    }
}

/// Writes an array of `dtype` (little-endian) and `shape` to `path`, its `data` in Fortran
/// (column-major) order if `fortran_order` (as [`NpyInfo::fortran_order`]), else in C order;
/// atomically: a reader never sees a partial file, and a writer
/// stopped at any point, even by SIGKILL, leaves no partial file behind; on error `path` is
/// untouched.
///
/// The data goes into an unnamed file in the same directory (`O_TMPFILE`), which gets its
/// name only when whole: linked as `path` if there is none, otherwise linked under a
/// temporary name and renamed over `path`. Where unnamed files are not supported (some
/// filesystems, no /proc), it writes a temporary file and renames it, removing it on error.
///
/// # Errors
/// The system's error, naming the file.
pub fn write_atomically(
    path: &Path,
    dtype: DType,
    shape: &[u64],
    fortran_order: bool,
    data: &[u8],
) -> Result<(), NpyError> {
    let io_err = |source| NpyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| io_err(io::Error::other("no file name")))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".mk1-{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let write = |file: &File| -> io::Result<()> {
        let mut w = io::BufWriter::new(file);
        let ts: npyz::TypeStr = type_str(dtype).parse().expect("valid type strings");
        let w = npyz::WriteOptions::new_header_only()
            .dtype(npyz::DType::Plain(ts))
            .shape(shape)
            .order(if fortran_order {
                Order::Fortran
            } else {
                Order::C
            })
            .writer(&mut w)
            .write_header_only()?;
        w.write_all(data)?;
        w.flush()?;
        file.sync_data()
    };
    if let Some(file) = unnamed_file_beside(path) {
        write(&file).map_err(io_err)?;
        match link_as(&file, path, &tmp) {
            Ok(true) => return Ok(()),
            Ok(false) => {} // (cannot be linked here: write it again, named)
            Err(e) => return Err(io_err(e)),
        }
    }
    let result = File::create(&tmp)
        .and_then(|file| write(&file))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| cannot_replace(path, e)));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(e));
    }
    Ok(())
}

/// A failed rename over `path`, said as such where the file is there and the system refused
/// (a sticky directory, /tmp's kind, lets only a file's owner replace it).
fn cannot_replace(path: &Path, e: io::Error) -> io::Error {
    if matches!(e.kind(), io::ErrorKind::PermissionDenied) && path.exists() {
        return io::Error::new(
            e.kind(),
            format!(
                "cannot replace the file already there: {e} (in a sticky directory only its \
                 owner may; remove it, or write to another --out-dir)"
            ),
        );
    }
    e
}

/// An unnamed file in `path`'s directory, if its filesystem makes them.
fn unnamed_file_beside(path: &Path) -> Option<File> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    crate::sys::unnamed_file_in(dir)
}

/// Gives the whole unnamed `file` the name `path`: linked there directly if `path` does not
/// exist, else linked as `tmp` and renamed over `path` (a stop between the two leaves a whole
/// file under `tmp`). `Ok(false)` if it cannot be linked at all (no /proc, no hard links).
fn link_as(file: &File, path: &Path, tmp: &Path) -> io::Result<bool> {
    match crate::sys::link_unnamed(file, path) {
        Ok(()) => return Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        // (No /proc, a filesystem without hard links: the named way may still work, and
        // reports its own error if not.)
        Err(_) => return Ok(false),
    }
    let _ = std::fs::remove_file(tmp);
    crate::sys::link_unnamed(file, tmp)?;
    std::fs::rename(tmp, path)
        .inspect_err(|_| {
            let _ = std::fs::remove_file(tmp);
        })
        .map_err(|e| cannot_replace(path, e))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mk1-npy-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn atomic_writes_create_and_replace_leaving_only_the_file() {
        let d = tmpdir("atomic");
        let p = d.join("out.npy");
        for (n, fill) in [(4u8, 1u8), (6, 2)] {
            // First a new name (linked in place), then over an existing file (renamed over).
            let data = vec![fill; usize::from(n)];
            write_atomically(&p, DType::U8, &[u64::from(n)], false, &data).unwrap();
            let info = inspect(&p).unwrap();
            let mut back = vec![0u8; info.data_bytes as usize];
            read_data(&p, &info, &mut back).unwrap();
            assert_eq!(back, data);
            let names: Vec<_> = std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["out.npy"], "nothing else in the directory");
        }
        // A directory that does not exist: an error naming the file, nothing made.
        let e = write_atomically(&d.join("no/such.npy"), DType::U8, &[1], false, &[0]).unwrap_err();
        assert!(e.to_string().contains("such.npy"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn written_files_read_back_and_bad_ones_are_named() {
        let d = tmpdir("rt");
        let p = d.join("a.npy");
        let data: Vec<u8> = (0..24u8).collect();
        write_atomically(&p, DType::I16, &[3, 4], false, &data).unwrap();
        let info = inspect(&p).unwrap();
        assert_eq!(info.dtype, DType::I16);
        assert_eq!(info.shape, vec![3, 4]);
        assert_eq!(info.data_bytes, 24);
        let mut back = vec![0u8; 24];
        read_data(&p, &info, &mut back).unwrap();
        assert_eq!(back, data);
        // Truncated.
        let bytes = std::fs::read(&p).unwrap();
        let t = d.join("t.npy");
        std::fs::write(&t, &bytes[..bytes.len() - 1]).unwrap();
        let e = inspect(&t).unwrap_err().to_string();
        assert!(e.contains("t.npy") && e.contains("truncated"), "{e}");
        // Not npy.
        let n = d.join("n.npy");
        std::fs::write(&n, b"hello").unwrap();
        assert!(inspect(&n)
            .unwrap_err()
            .to_string()
            .contains("not a readable"));
        // Big-endian: rewrite the header's type string.
        let be = d.join("be.npy");
        let mut swapped = bytes.clone();
        let at = swapped.windows(3).position(|w| w == b"<i2").unwrap();
        swapped[at] = b'>';
        std::fs::write(&be, &swapped).unwrap();
        // The same bytes, now big-endian elements: read back, each element's bytes swap.
        let info = inspect(&be).unwrap();
        assert!(info.big_endian && !info.fortran_order);
        read_data(&be, &info, &mut back).unwrap();
        let want: Vec<u8> = data.chunks(2).flat_map(|e| [e[1], e[0]]).collect();
        assert_eq!(back, want);
        // Fortran order: kept in the header written, the data as it was.
        let f = d.join("f.npy");
        write_atomically(&f, DType::I16, &[3, 4], true, &data).unwrap();
        let info = inspect(&f).unwrap();
        assert!(info.fortran_order && !info.big_endian);
        assert_eq!(info.shape, vec![3, 4]);
        read_data(&f, &info, &mut back).unwrap();
        assert_eq!(back, data);
        let missing = inspect(&d.join("missing.npy")).unwrap_err().to_string();
        assert!(missing.contains("missing.npy"), "{missing}");
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(left.is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
