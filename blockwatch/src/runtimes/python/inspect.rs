//! Finding a process's interpreter: the `_PyRuntime` symbol of the python
//! binary or `libpython3.X.so` it maps, the version, and the structure
//! offsets the kernel walk follows.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use log::debug;
use object::{Object, ObjectSegment, ObjectSymbol};

use super::mem::read_u64;
use super::offsets::{offsets_for, read_debug_offsets};
use super::{PyError, PyProcess};
use crate::procfs::{self, FileId, MapKind, Mapping, maps};

/// Parsed ELF files kept by [`inspect`]; cleared when full.
const MAX_ELF_CACHE: usize = 256;

/// "3.11" at the start of `s` (what follows may be anything: `.so.1.0`,
/// `t`, `d`).
pub(super) fn leading_version(s: &str) -> Option<(u8, u8)> {
    let (major, rest) = s.split_once('.')?;
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    Some((major.parse().ok()?, rest.get(..digits)?.parse().ok()?))
}

/// Is this mapped file a CPython interpreter? `Some(is_library, version
/// from the name)` for `libpython3.X.so*` and `python`, `python3`,
/// `python3.X` (with an ABI suffix letter or not).
fn interpreter_name(path: &str) -> Option<(bool, Option<(u8, u8)>)> {
    let base = path.rsplit('/').next()?;
    if let Some(rest) = base.strip_prefix("libpython") {
        return rest.contains(".so").then(|| (true, leading_version(rest)));
    }
    let rest = base.strip_prefix("python")?;
    let ver = rest.trim_end_matches(|c: char| c.is_ascii_lowercase());
    if !ver.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None; // python3-config, pythonista, ...
    }
    Some((false, leading_version(ver)))
}

/// What [`inspect`] needs from an interpreter's ELF file.
#[derive(Clone, Debug)]
struct ElfInfo {
    /// `st_value` and `st_size` of `_PyRuntime`.
    runtime: Option<(u64, u64)>,
    /// `st_value` of `Py_Version` (3.11+).
    py_version: Option<u64>,
    /// PT_LOAD segments: (p_vaddr, p_offset).
    loads: Vec<(u64, u64)>,
}

fn read_elf(path: &Path) -> Result<ElfInfo, PyError> {
    let file = File::open(path).map_err(|source| PyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // ReadCache reads only the parts parsed (headers, symbol tables), not
    // the whole (multi-megabyte) library.
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(|e| PyError::Elf {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let mut info = ElfInfo {
        runtime: None,
        py_version: None,
        loads: elf
            .segments()
            .map(|s| (s.address(), s.file_range().0))
            .collect(),
    };
    // The dynamic table first: it survives stripping, and Debian's static
    // python3.11 exports these for extension modules too.
    for sym in elf.dynamic_symbols().chain(elf.symbols()) {
        if sym.is_undefined() {
            continue;
        }
        match sym.name_bytes() {
            Ok(b"_PyRuntime") if info.runtime.is_none() => {
                info.runtime = Some((sym.address(), sym.size()))
            }
            Ok(b"Py_Version") if info.py_version.is_none() => info.py_version = Some(sym.address()),
            _ => {}
        }
        if info.runtime.is_some() && info.py_version.is_some() {
            break;
        }
    }
    Ok(info)
}

type ElfKey = (FileId, u64);

/// Parsed ELF files by (device, inode, size): every Python process of a
/// host maps the same few interpreters.
fn elf_cache() -> &'static Mutex<HashMap<ElfKey, ElfInfo>> {
    static CACHE: OnceLock<Mutex<HashMap<ElfKey, ElfInfo>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Opens the ELF file `id` at `path` behind mapping `m` the way process
/// `pid` sees it: through its root (containers), else through map_files
/// (which also reaches deleted or replaced files).
fn elf_of(pid: u32, m: &Mapping, id: FileId, path: &str) -> Result<ElfInfo, PyError> {
    let via_root = procfs::in_root(pid, path);
    let size = std::fs::metadata(&via_root).map(|m| m.len()).unwrap_or(0);
    let key = (id, size);
    if let Ok(cache) = elf_cache().lock()
        && let Some(info) = cache.get(&key)
    {
        return Ok(info.clone());
    }
    let info = match read_elf(&via_root) {
        Ok(info) => info,
        Err(e) => read_elf(&m.map_files(pid)).map_err(|_| e)?,
    };
    if let Ok(mut cache) = elf_cache().lock() {
        if cache.len() >= MAX_ELF_CACHE {
            cache.clear();
        }
        cache.insert(key, info.clone());
    }
    Ok(info)
}

/// A mapped file that may be the interpreter: (is a library, version from
/// its name, path, identity).
type Candidate<'a> = (bool, Option<(u8, u8)>, &'a str, FileId);

/// Decides whether process `pid` runs CPython 3.10-3.13 and, if so, where
/// its interpreter state is and how to walk it. `Ok(None)` for other
/// programs and other Python versions.
pub fn inspect(pid: u32) -> Result<Option<PyProcess>, PyError> {
    let maps = maps::read(pid).map_err(|source| PyError::Io {
        path: PathBuf::from(format!("/proc/{pid}/maps")),
        source,
    })?;

    // Candidate files, libpython first: with a shared libpython the
    // executable does not define _PyRuntime, only references it.
    let mut candidates: Vec<Candidate> = Vec::new();
    for m in &maps {
        let MapKind::File { id, path, .. } = &m.kind else {
            continue;
        };
        if candidates.iter().any(|c| c.2 == &**path) {
            continue;
        }
        if let Some((lib, ver)) = interpreter_name(path) {
            candidates.push((lib, ver, path, *id));
        }
    }
    candidates.sort_by_key(|c| !c.0);

    for (lib, name_version, path, id) in candidates {
        // Python 2 and 3 before 3.10 need not be opened (before 3.7 they
        // have no _PyRuntime at all).
        if name_version.is_some_and(|v| offsets_for(v.1).is_none() || v.0 != 3) {
            debug!("process {pid}: {path} is an unsupported Python version");
            continue;
        }
        let mappings: Vec<&Mapping> = maps.iter().filter(|m| m.path() == Some(path)).collect();
        let Some(first) = mappings.first() else {
            continue;
        };
        let info = elf_of(pid, first, id, path)?;
        let Some((runtime_sym, runtime_size)) = info.runtime else {
            // A python executable linked to libpython references the
            // symbol without defining it; a library without it is an
            // older Python.
            debug!("process {pid}: no _PyRuntime in {path} (library: {lib})");
            continue;
        };
        let not_mapped = || PyError::NotMapped {
            pid,
            path: path.into(),
        };
        let bias = maps::load_bias(&info.loads, &mappings).ok_or_else(not_mapped)?;
        let runtime_addr = bias.wrapping_add(runtime_sym);
        if maps::find(&maps, runtime_addr).is_none() {
            return Err(not_mapped());
        }
        return Ok(describe(pid, runtime_addr, name_version, &info, bias)
            .map(|p| PyProcess { runtime_size, ..p }));
    }
    Ok(None)
}

/// Version and offsets of the interpreter whose `_PyRuntime` is at
/// `runtime_addr`.
fn describe(
    pid: u32,
    runtime_addr: u64,
    name_version: Option<(u8, u8)>,
    info: &ElfInfo,
    bias: u64,
) -> Option<PyProcess> {
    // Py_Version (3.11+) is the build's own PY_VERSION_HEX; a file name can
    // lie (a venv's copied `python3`), the constant cannot.
    let hex_version = info
        .py_version
        .and_then(|v| read_u64(pid, bias.wrapping_add(v)))
        .map(|hex| (((hex >> 24) & 0xff) as u8, ((hex >> 16) & 0xff) as u8))
        .filter(|v| v.0 == 3);
    if let (Some(h), Some(n)) = (hex_version, name_version)
        && h != n
    {
        debug!("process {pid}: file name says Python {n:?}, Py_Version {h:?}");
    }
    let version = hex_version.or(name_version)?;
    if version.0 != 3 {
        return None;
    }
    let mut offsets = offsets_for(version.1)?;
    if version.1 == 13
        && let Some(dbg) = read_debug_offsets(pid, runtime_addr)
    {
        if dbg.version_hex >> 16 != 0x030d {
            debug!(
                "process {pid}: _Py_DebugOffsets version {:#x}",
                dbg.version_hex
            );
            return None;
        }
        if dbg.free_threaded {
            // Free-threaded builds have another object header; unsupported.
            return None;
        }
        if dbg.offsets != offsets {
            debug!("process {pid}: using _Py_DebugOffsets, which differ from the 3.13 table");
        }
        offsets = dbg.offsets;
    }
    Some(PyProcess {
        version,
        runtime_addr,
        runtime_size: 0,
        offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreter_names() {
        assert_eq!(
            interpreter_name("/usr/bin/python3.11"),
            Some((false, Some((3, 11))))
        );
        assert_eq!(interpreter_name("/usr/bin/python3"), Some((false, None)));
        assert_eq!(
            interpreter_name("/x/python3.13t"),
            Some((false, Some((3, 13))))
        );
        assert_eq!(
            interpreter_name("/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0"),
            Some((true, Some((3, 12))))
        );
        assert_eq!(interpreter_name("/usr/bin/python3-config"), None);
        assert_eq!(
            interpreter_name("/usr/lib/libpython3.so.txt"),
            Some((true, None))
        );
        assert_eq!(interpreter_name("/usr/bin/perl"), None);
    }
}
