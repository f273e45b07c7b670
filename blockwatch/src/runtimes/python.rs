//! CPython interpreter frames, the user-space half.
//!
//! When a tagged CPython thread blocks, the kernel program walks that
//! thread's interpreter frames and records, for each, the code object's
//! address and an instruction value ([`blockwatch_common::PyFrameRef`]). It
//! cannot follow strings or decode line tables, and it does not know where
//! the interpreter keeps its state, so this module supplies both ends:
//!
//! - [`inspect`] finds a process's interpreter: the `_PyRuntime` symbol of
//!   the python binary or `libpython3.X.so` it maps, the version, and the
//!   structure offsets ([`PyOffsets`]) the kernel walk follows.
//! - [`CodeReader`] turns a recorded (code, instr) pair into function,
//!   file and line by reading the code object from the process's memory
//!   afterwards: code objects outlive the calls that run them, and their
//!   name, file and line table never change, so they are cached.
//!
//! CPython's internal structures change between minor versions but not
//! within one, so offsets are tabled per minor version (3.10 to 3.13, x86-64
//! release builds) and checked in tests against the headers of every
//! installed build. 3.13 also describes its own layout in the
//! `_Py_DebugOffsets` block at the start of `_PyRuntime`; when present it
//! is preferred over the table, since it comes from the build that runs.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use blockwatch_common::PyOffsets;
use blockwatch_common::x86_64::USER_SPACE_END;
use log::debug;
use object::{Object, ObjectSegment, ObjectSymbol};

/// Marks an offset that does not apply to a version.
const ABSENT: u32 = u32::MAX;

/// Longest function or file name read. Real ones are far shorter; a longer
/// length field means the pointer was not a str object.
const MAX_STR_CHARS: u64 = 4096;

/// Longest line table read. CPython's largest real modules have tables of a
/// few hundred KiB at most (one entry per few instructions).
const MAX_TABLE_BYTES: u64 = 1 << 20;

/// Code objects longer than this (in 2-byte code units) are not believed.
const MAX_CODE_UNITS: u64 = 1 << 24;

/// Resolved code objects kept per cache generation (so at most twice this,
/// i.e. 16k): a busy service has a few thousand hot functions at most.
const CODE_CACHE_GENERATION: usize = 8 * 1024;

/// Parsed ELF files kept by [`inspect`]; cleared when full.
const MAX_ELF_CACHE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum PyError {
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a readable ELF file: {msg}", path.display())]
    Elf { path: PathBuf, msg: String },
    #[error("process {pid}: cannot place {} in its address space", path.display())]
    NotMapped { pid: u32, path: PathBuf },
}

/// A CPython process, as the kernel walk needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyProcess {
    pub version: (u8, u8),
    /// Address of `_PyRuntime` in the process.
    pub runtime_addr: u64,
    /// Its size (`st_size`; 0 when the symbol table has none). The main
    /// interpreter's GIL lies inside it (`ceval.gil` before 3.12, the
    /// embedded main interpreter's `_gil` from 3.12), so a futex wait in
    /// `[runtime_addr, runtime_addr + runtime_size)` is a wait for the GIL.
    pub runtime_size: u64,
    pub offsets: PyOffsets,
}

impl PyProcess {
    /// Whether a futex at `uaddr` is one of the interpreter's own: its GIL
    /// (mutex or condition variable), not a lock of the application.
    pub fn is_gil_futex(&self, uaddr: u64) -> bool {
        self.runtime_size > 0
            && uaddr >= self.runtime_addr
            && uaddr - self.runtime_addr < self.runtime_size
    }
}

/// One resolved interpreter frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyFrame {
    /// Qualified name (`Class.method`; plain name on 3.10).
    pub function: String,
    pub file: String,
    pub line: Option<u32>,
}

// ---------------------------------------------------------------------------
// Per-version layouts.

/// The offsets the kernel walk follows, for x86-64 release (non-debug,
/// GIL) builds. Values from the headers, see the `offsets_match_headers`
/// test.
fn offsets_for(minor: u8) -> Option<PyOffsets> {
    let o = match minor {
        10 => PyOffsets {
            version: 0x030a,
            runtime_interpreters_head: 32,
            interp_threads_head: 8, // tstate_head
            tstate_next: 8,
            tstate_thread_id: 176,
            tstate_frame: 24, // frame (PyFrameObject *)
            cframe_current_frame: ABSENT,
            frame_previous: 24, // f_back
            frame_code: 32,     // f_code
            frame_instr: 96,    // f_lasti (int, in code units)
            frame_instr_size: 4,
            frame_owner: ABSENT,
        },
        11 => PyOffsets {
            version: 0x030b,
            runtime_interpreters_head: 40,
            interp_threads_head: 16,
            tstate_next: 8,
            tstate_thread_id: 152,
            tstate_frame: 56, // cframe
            cframe_current_frame: 8,
            frame_previous: 48,
            frame_code: 32,
            frame_instr: 56, // prev_instr
            frame_instr_size: 8,
            // 3.11 has an owner field (offset 69) but no C-stack shim
            // frames to skip, so the kernel need not read it.
            frame_owner: ABSENT,
        },
        12 => PyOffsets {
            version: 0x030c,
            runtime_interpreters_head: 40,
            interp_threads_head: 72,
            tstate_next: 8,
            tstate_thread_id: 136,
            tstate_frame: 56, // cframe
            cframe_current_frame: 0,
            frame_previous: 8,
            frame_code: 0,
            frame_instr: 56, // prev_instr
            frame_instr_size: 8,
            frame_owner: 70,
        },
        13 => PyOffsets {
            version: 0x030d,
            runtime_interpreters_head: 632,
            interp_threads_head: 7344,
            tstate_next: 8,
            tstate_thread_id: 152,
            tstate_frame: 72, // current_frame
            cframe_current_frame: ABSENT,
            frame_previous: 8,
            frame_code: 0,   // f_executable
            frame_instr: 56, // instr_ptr
            frame_instr_size: 8,
            frame_owner: 70,
        },
        _ => return None,
    };
    Some(o)
}

/// Where [`CodeReader`] finds things in code, str and bytes objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct CodeLayout {
    /// `co_qualname` (3.11+) or `co_name` (3.10, which has no qualname).
    name: u32,
    filename: u32,
    /// `co_firstlineno` (an int).
    firstlineno: u32,
    /// `co_linetable` (a bytes object).
    linetable: u32,
    /// `co_code_adaptive`, where the instructions start (3.11+); `None` on
    /// 3.10, whose `f_lasti` is already an instruction index.
    code_adaptive: Option<u32>,
    /// `sizeof(PyASCIIObject)`: where a compact ASCII string's characters
    /// start.
    ascii_size: u32,
    /// `sizeof(PyCompactUnicodeObject)`: where other compact strings'
    /// characters start.
    compact_size: u32,
}

impl CodeLayout {
    fn for_version(version: (u8, u8)) -> Option<CodeLayout> {
        if version.0 != 3 {
            return None;
        }
        let l = match version.1 {
            10 => CodeLayout {
                name: 112,
                filename: 104,
                firstlineno: 40,
                linetable: 120,
                code_adaptive: None,
                ascii_size: 48,
                compact_size: 72,
            },
            11 => CodeLayout {
                name: 128,
                filename: 112,
                firstlineno: 72,
                linetable: 136,
                code_adaptive: Some(184),
                ascii_size: 48,
                compact_size: 72,
            },
            // 3.12 dropped the `wstr` fields from str objects.
            12 => CodeLayout {
                name: 128,
                filename: 112,
                firstlineno: 68,
                linetable: 136,
                code_adaptive: Some(192),
                ascii_size: 40,
                compact_size: 56,
            },
            13 => CodeLayout {
                name: 128,
                filename: 112,
                firstlineno: 68,
                linetable: 136,
                code_adaptive: Some(200),
                ascii_size: 40,
                compact_size: 56,
            },
            _ => return None,
        };
        Some(l)
    }

    /// Bytes of the code object to read to reach every field used.
    fn header_len(&self) -> usize {
        let last = [self.name, self.filename, self.firstlineno, self.linetable]
            .into_iter()
            .max()
            .unwrap_or(0);
        last as usize + 8
    }
}

// Offsets shared by 3.10-3.13 (PyObject, PyVarObject, PyTypeObject,
// PyBytesObject, PyASCIIObject heads), checked by the header test too.
const OB_TYPE: u64 = 8;
const OB_SIZE: u64 = 16;
const TP_NAME: u64 = 24;
const BYTES_SVAL: u64 = 32;
const UNICODE_LENGTH: u64 = 16;
const UNICODE_STATE: u64 = 32;

// ---------------------------------------------------------------------------
// 3.13's `_Py_DebugOffsets`: an array of u64 after an 8-byte cookie. These
// are the word indices of the fields used (layout of 3.13.x; 3.14 changed
// it, so it is only parsed for 3.13).

const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";
mod dbg {
    pub const VERSION: usize = 1;
    pub const FREE_THREADED: usize = 2;
    pub const RUNTIME_INTERPRETERS_HEAD: usize = 5;
    pub const INTERP_THREADS_HEAD: usize = 9;
    pub const TSTATE_NEXT: usize = 21;
    pub const TSTATE_CURRENT_FRAME: usize = 23;
    pub const TSTATE_THREAD_ID: usize = 24;
    pub const FRAME_PREVIOUS: usize = 29;
    pub const FRAME_EXECUTABLE: usize = 30;
    pub const FRAME_INSTR_PTR: usize = 31;
    pub const FRAME_OWNER: usize = 33;
    pub const CODE_FILENAME: usize = 35;
    pub const CODE_QUALNAME: usize = 37;
    pub const CODE_LINETABLE: usize = 38;
    pub const CODE_FIRSTLINENO: usize = 39;
    pub const CODE_ADAPTIVE: usize = 43;
    pub const UNICODE_ASCII_SIZE: usize = 70;
    /// Words read (the block is 73 words long in 3.13.0).
    pub const WORDS: usize = 71;
}

/// What a 3.13 `_Py_DebugOffsets` block says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DebugOffsets {
    version_hex: u64,
    free_threaded: bool,
    offsets: PyOffsets,
    /// Only the code object fields (the debug block has no compact str
    /// size; `compact_size` is copied from the table).
    code: CodeLayout,
}

fn read_debug_offsets(pid: u32, runtime: u64) -> Option<DebugOffsets> {
    let mut raw = [0u8; dbg::WORDS * 8];
    if !read_mem(pid, runtime, &mut raw) || &raw[..8] != DEBUG_COOKIE {
        return None;
    }
    let word = |i: usize| u64_at(&raw, i * 8);
    // Offsets are small; anything else means this is not the layout we
    // know, and must not reach the kernel as an offset.
    let off = |i: usize| {
        word(i)
            .filter(|&v| v < 1 << 20)
            .and_then(|v| u32::try_from(v).ok())
    };
    let version_hex = word(dbg::VERSION)?;
    let table = offsets_for(13)?;
    let code_table = CodeLayout::for_version((3, 13))?;
    Some(DebugOffsets {
        version_hex,
        free_threaded: word(dbg::FREE_THREADED)? != 0,
        offsets: PyOffsets {
            version: 0x030d,
            runtime_interpreters_head: off(dbg::RUNTIME_INTERPRETERS_HEAD)?,
            interp_threads_head: off(dbg::INTERP_THREADS_HEAD)?,
            tstate_next: off(dbg::TSTATE_NEXT)?,
            tstate_thread_id: off(dbg::TSTATE_THREAD_ID)?,
            tstate_frame: off(dbg::TSTATE_CURRENT_FRAME)?,
            cframe_current_frame: ABSENT,
            frame_previous: off(dbg::FRAME_PREVIOUS)?,
            frame_code: off(dbg::FRAME_EXECUTABLE)?,
            frame_instr: off(dbg::FRAME_INSTR_PTR)?,
            frame_instr_size: table.frame_instr_size,
            frame_owner: off(dbg::FRAME_OWNER)?,
        },
        code: CodeLayout {
            name: off(dbg::CODE_QUALNAME)?,
            filename: off(dbg::CODE_FILENAME)?,
            firstlineno: off(dbg::CODE_FIRSTLINENO)?,
            linetable: off(dbg::CODE_LINETABLE)?,
            code_adaptive: Some(off(dbg::CODE_ADAPTIVE)?),
            ascii_size: off(dbg::UNICODE_ASCII_SIZE)?,
            compact_size: code_table.compact_size,
        },
    })
}

// ---------------------------------------------------------------------------
// Process memory.

/// Reads exactly `buf.len()` bytes at `addr` in process `pid`.
/// process_vm_readv rather than /proc/PID/mem: one syscall, no file
/// descriptor to keep per process.
fn read_mem(pid: u32, addr: u64, buf: &mut [u8]) -> bool {
    if buf.is_empty() {
        return true;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if addr == 0
        || addr
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > USER_SPACE_END)
    {
        return false;
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which we borrow mutably for the
    // call; the kernel only reads the other process through `remote`.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    usize::try_from(n).is_ok_and(|n| n == buf.len())
}

fn read_u64(pid: u32, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    read_mem(pid, addr, &mut b).then(|| u64::from_le_bytes(b))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

/// Could this be a pointer to a Python object? Objects are at least
/// 8-aligned, and live in user space.
fn plausible_object(p: u64) -> bool {
    (0x1000..USER_SPACE_END).contains(&p) && p.is_multiple_of(8)
}

// ---------------------------------------------------------------------------
// inspect

#[derive(Debug)]
struct MapEntry {
    start: u64,
    end: u64,
    offset: u64,
    dev: String,
    inode: u64,
    /// Path as the process sees it (without ` (deleted)`), empty for
    /// anonymous memory.
    path: String,
    /// The `start-end` text, as /proc/PID/map_files names the mapping.
    range: String,
}

fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<MapEntry> {
    // The first five fields are separated by single spaces; the path, if
    // any, follows padding and may itself contain spaces.
    let mut f = line.splitn(6, ' ');
    let range = f.next()?;
    let _perms = f.next()?;
    let offset = u64::from_str_radix(f.next()?, 16).ok()?;
    let dev = f.next()?;
    let inode = f.next()?.parse().ok()?;
    let path = f.next().unwrap_or("").trim_start();
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let (start, end) = range.split_once('-')?;
    Some(MapEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        offset,
        dev: dev.to_string(),
        inode,
        path: path.to_string(),
        range: range.to_string(),
    })
}

/// "3.11" at the start of `s` (what follows may be anything: `.so.1.0`,
/// `t`, `d`).
fn leading_version(s: &str) -> Option<(u8, u8)> {
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

type ElfKey = (String, u64, u64);

/// Parsed ELF files by (device, inode, size): every Python process of a
/// host maps the same few interpreters.
fn elf_cache() -> &'static Mutex<HashMap<ElfKey, ElfInfo>> {
    static CACHE: OnceLock<Mutex<HashMap<ElfKey, ElfInfo>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// Opens the ELF file behind `entry` the way process `pid` sees it:
/// through its root (containers), else through map_files (which also
/// reaches deleted or replaced files).
fn elf_of(pid: u32, entry: &MapEntry) -> Result<ElfInfo, PyError> {
    let via_root = PathBuf::from(format!("/proc/{pid}/root{}", entry.path));
    let size = std::fs::metadata(&via_root).map(|m| m.len()).unwrap_or(0);
    let key = (entry.dev.clone(), entry.inode, size);
    if let Ok(cache) = elf_cache().lock()
        && let Some(info) = cache.get(&key)
    {
        return Ok(info.clone());
    }
    let info = match read_elf(&via_root) {
        Ok(info) => info,
        Err(e) => {
            let via_map = PathBuf::from(format!("/proc/{pid}/map_files/{}", entry.range));
            read_elf(&via_map).map_err(|_| e)?
        }
    };
    if let Ok(mut cache) = elf_cache().lock() {
        if cache.len() >= MAX_ELF_CACHE {
            cache.clear();
        }
        cache.insert(key, info.clone());
    }
    Ok(info)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n)
        .ok()
        .filter(|n| n.is_power_of_two())
        .unwrap_or(4096)
}

/// Load bias of a mapped ELF file: the loader maps each PT_LOAD segment at
/// `bias + page_down(p_vaddr)` from file offset `page_down(p_offset)`.
fn load_bias(info: &ElfInfo, mappings: &[&MapEntry]) -> Option<u64> {
    let mask = !(page_size() - 1);
    mappings.iter().find_map(|m| {
        let &(vaddr, _) = info.loads.iter().find(|(_, off)| off & mask == m.offset)?;
        Some(m.start.wrapping_sub(vaddr & mask))
    })
}

/// A mapped file that may be the interpreter: (is a library, version from
/// its name, path).
type Candidate<'a> = (bool, Option<(u8, u8)>, &'a str);

/// Decides whether process `pid` runs CPython 3.10-3.13 and, if so, where
/// its interpreter state is and how to walk it. `Ok(None)` for other
/// programs and other Python versions.
pub fn inspect(pid: u32) -> Result<Option<PyProcess>, PyError> {
    let maps_path = PathBuf::from(format!("/proc/{pid}/maps"));
    let text = std::fs::read_to_string(&maps_path).map_err(|source| PyError::Io {
        path: maps_path,
        source,
    })?;
    let maps = parse_maps(&text);

    // Candidate files, libpython first: with a shared libpython the
    // executable does not define _PyRuntime, only references it.
    let mut candidates: Vec<Candidate> = Vec::new();
    for m in &maps {
        if !m.path.starts_with('/') || candidates.iter().any(|c| c.2 == m.path) {
            continue;
        }
        if let Some((lib, ver)) = interpreter_name(&m.path) {
            candidates.push((lib, ver, &m.path));
        }
    }
    candidates.sort_by_key(|c| !c.0);

    for (lib, name_version, path) in candidates {
        // Python 2 and 3 before 3.10 need not be opened (before 3.7 they
        // have no _PyRuntime at all).
        if name_version.is_some_and(|v| offsets_for(v.1).is_none() || v.0 != 3) {
            debug!("process {pid}: {path} is an unsupported Python version");
            continue;
        }
        let mappings: Vec<&MapEntry> = maps.iter().filter(|m| m.path == path).collect();
        let Some(first) = mappings.first() else {
            continue;
        };
        let info = elf_of(pid, first)?;
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
        let bias = load_bias(&info, &mappings).ok_or_else(not_mapped)?;
        let runtime_addr = bias.wrapping_add(runtime_sym);
        if !maps
            .iter()
            .any(|m| m.start <= runtime_addr && runtime_addr < m.end)
        {
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

// ---------------------------------------------------------------------------
// Line tables.

/// 3.10's `co_linetable` (PEP 626, Objects/lnotab_notes.txt): pairs of
/// (bytecode-offset delta: u8, line delta: i8), where a line delta of -128
/// means "no line" and the line does not change. `addr` is in bytes.
/// Mirrors CPython's `advance()`/`_PyCode_CheckLineNumber`.
fn line_310(table: &[u8], first_line: i32, addr: i64) -> Option<i64> {
    let mut line = i64::from(first_line);
    let mut end: i64 = 0;
    for pair in table.chunks_exact(2) {
        let start = end;
        end += i64::from(pair[0]);
        let delta = pair[1] as i8;
        let this = if delta == -128 {
            None
        } else {
            line += i64::from(delta);
            Some(line)
        };
        if start <= addr && addr < end {
            return this;
        }
    }
    None
}

/// Reads a varint of the 3.11+ location table at `*pos`: 6-bit chunks,
/// least significant first, bit 6 set on all but the last.
fn varint(table: &[u8], pos: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    let mut shift = 0u32;
    loop {
        let b = *table.get(*pos)?;
        *pos += 1;
        value |= u64::from(b & 63).checked_shl(shift)?;
        if b & 64 == 0 {
            return Some(value);
        }
        shift += 6;
        if shift > 42 {
            return None;
        }
    }
}

fn svarint(table: &[u8], pos: &mut usize) -> Option<i64> {
    let v = varint(table, pos)?;
    let magnitude = i64::try_from(v >> 1).ok()?;
    Some(if v & 1 == 1 { -magnitude } else { magnitude })
}

/// 3.11+'s location table (Objects/locations.md): entries starting with a
/// byte `1cccclll` (code `cccc`, covering `lll + 1` code units) followed by
/// code-specific bytes that never have bit 7 set. Only the line is
/// decoded: codes 0-9 keep it, 10-12 add `code - 10`, 13 and 14 start with
/// a signed varint delta, 15 means "no location". `index` is in code
/// units. Mirrors CPython's `advance()`/`get_line_delta()`.
fn line_311(table: &[u8], first_line: i32, index: i64) -> Option<i64> {
    let mut line = i64::from(first_line);
    let mut end: i64 = 0;
    let mut pos = 0;
    while let Some(&head) = table.get(pos) {
        if head & 0x80 == 0 {
            return None; // not at an entry start: a corrupt table
        }
        let code = (head >> 3) & 15;
        let start = end;
        end += i64::from(head & 7) + 1;
        let delta = match code {
            10..=12 => i64::from(code - 10),
            13 | 14 => {
                let mut p = pos + 1;
                svarint(table, &mut p)?
            }
            _ => 0,
        };
        line = line.checked_add(delta)?;
        if start <= index && index < end {
            return (code != 15).then_some(line);
        }
        pos += 1;
        while table.get(pos).is_some_and(|b| b & 0x80 == 0) {
            pos += 1;
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Code objects.

/// What is kept of a code object.
#[derive(Clone, Debug)]
struct Code {
    function: String,
    file: String,
    first_line: i32,
    table: Box<[u8]>,
    /// Length of the bytecode in code units (3.11+: the object's ob_size).
    units: Option<u64>,
}

impl Code {
    fn line(&self, layout: &CodeLayout, code_addr: u64, instr: u64) -> Option<u32> {
        let index = match layout.code_adaptive {
            // 3.10: f_lasti, an int the kernel read as 4 bytes (zero- or
            // sign-extended), -1 before the first instruction.
            None => i64::from(instr as u32 as i32),
            // 3.11/3.12 prev_instr (the last instruction started, one
            // before the code at frame start) and 3.13 instr_ptr (the
            // instruction executing, e.g. the CALL a caller frame waits
            // in): CPython's _PyInterpreterFrame_LASTI is in both cases
            // the pointer minus the code's start, in code units.
            Some(off) => (instr.wrapping_sub(code_addr.wrapping_add(u64::from(off))) as i64) / 2,
        };
        // CPython's PyCode_Addr2Line answers co_firstlineno before the first
        // instruction.
        let line = if index < 0 {
            Some(i64::from(self.first_line))
        } else if self.units.is_some_and(|n| index as u64 >= n) {
            None
        } else if layout.code_adaptive.is_none() {
            line_310(&self.table, self.first_line, index.checked_mul(2)?)
        } else {
            line_311(&self.table, self.first_line, index)
        };
        line.and_then(|l| u32::try_from(l).ok()).filter(|&l| l > 0)
    }
}

/// The type objects of one process, learnt from the first object of each
/// kind by its `tp_name`, then compared by address: cheaper than reading
/// the name each time, and a stray pointer rarely points at an object whose
/// type is exactly `PyCode_Type`.
#[derive(Clone, Copy, Debug, Default)]
struct Types {
    code: Option<u64>,
    str: Option<u64>,
    bytes: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Code,
    Str,
    Bytes,
}

impl Kind {
    fn tp_name(self) -> &'static [u8] {
        match self {
            Kind::Code => b"code",
            Kind::Str => b"str",
            Kind::Bytes => b"bytes",
        }
    }
}

/// Resolves recorded (code, instr) pairs to frames, caching code objects.
#[derive(Debug, Default)]
pub struct CodeReader {
    /// Two generations: when `current` is full it becomes `previous`, and
    /// entries still in use move back on their next hit.
    current: HashMap<(u32, u64), Option<Code>>,
    previous: HashMap<(u32, u64), Option<Code>>,
    types: HashMap<u32, Types>,
}

impl CodeReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Function, file and line of the frame that runs code object `code`
    /// at instruction value `instr` (as the kernel recorded them for
    /// process `pid`). `None` when `code` is not a readable code object.
    pub fn frame(&mut self, pid: u32, py: &PyProcess, code: u64, instr: u64) -> Option<PyFrame> {
        let layout = CodeLayout::for_version(py.version)?;
        let key = (pid, code);
        if !self.current.contains_key(&key) {
            let entry = match self.previous.remove(&key) {
                Some(entry) => entry,
                None => self.load(pid, &layout, code),
            };
            if self.current.len() >= CODE_CACHE_GENERATION {
                self.previous = std::mem::take(&mut self.current);
            }
            self.current.insert(key, entry);
        }
        let c = self.current.get(&key)?.as_ref()?;
        Some(PyFrame {
            function: c.function.clone(),
            file: c.file.clone(),
            line: c.line(&layout, code, instr),
        })
    }

    /// Drops what is known of process `pid` (it exited, or exec'd).
    pub fn forget(&mut self, pid: u32) {
        self.current.retain(|k, _| k.0 != pid);
        self.previous.retain(|k, _| k.0 != pid);
        self.types.remove(&pid);
    }

    fn load(&mut self, pid: u32, layout: &CodeLayout, code: u64) -> Option<Code> {
        let mut head = [0u8; 256];
        let head = head.get_mut(..layout.header_len())?;
        if !plausible_object(code) || !read_mem(pid, code, head) {
            return None;
        }
        self.check_type(pid, Kind::Code, u64_at(head, OB_TYPE as usize)?)?;
        let ptr = |off: u32| u64_at(head, off as usize);
        let function = self.read_str(pid, layout, ptr(layout.name)?)?;
        let file = self.read_str(pid, layout, ptr(layout.filename)?)?;
        let first_line = u32_at(head, layout.firstlineno as usize)? as i32;
        let table = self.read_bytes(pid, ptr(layout.linetable)?)?;
        let units = match layout.code_adaptive {
            Some(_) => Some(u64_at(head, OB_SIZE as usize)?).filter(|&n| n <= MAX_CODE_UNITS),
            None => None,
        };
        if layout.code_adaptive.is_some() && units.is_none() {
            return None;
        }
        Some(Code {
            function,
            file,
            first_line,
            table,
            units,
        })
    }

    /// Is `ob_type` the type of `kind` objects in process `pid`?
    fn check_type(&mut self, pid: u32, kind: Kind, ob_type: u64) -> Option<()> {
        let types = self.types.entry(pid).or_default();
        let known = match kind {
            Kind::Code => &mut types.code,
            Kind::Str => &mut types.str,
            Kind::Bytes => &mut types.bytes,
        };
        if let Some(t) = *known {
            return (t == ob_type).then_some(());
        }
        if !plausible_object(ob_type) {
            return None;
        }
        let name_ptr = read_u64(pid, ob_type.checked_add(TP_NAME)?)?;
        let want = kind.tp_name();
        // One byte more than the name, to see its terminating NUL.
        let mut name = [0u8; 8];
        let name = name.get_mut(..want.len() + 1)?;
        if !read_mem(pid, name_ptr, name) || &name[..want.len()] != want || name[want.len()] != 0 {
            return None;
        }
        *known = Some(ob_type);
        Some(())
    }

    /// A str object's text. Code objects' names and file names are always
    /// compact strings (created by PyUnicode_New), whose characters follow
    /// the header: ASCII ones after PyASCIIObject, others after
    /// PyCompactUnicodeObject in 1, 2 or 4 bytes per character.
    fn read_str(&mut self, pid: u32, layout: &CodeLayout, p: u64) -> Option<String> {
        let mut head = [0u8; 72];
        let head = head.get_mut(..layout.compact_size as usize)?;
        if !plausible_object(p) || !read_mem(pid, p, head) {
            return None;
        }
        self.check_type(pid, Kind::Str, u64_at(head, OB_TYPE as usize)?)?;
        let len = u64_at(head, UNICODE_LENGTH as usize)?;
        if len > MAX_STR_CHARS {
            return None;
        }
        // state: interned:2, kind:3, compact:1, ascii:1 (same bits 3.10-3.13).
        let state = u32_at(head, UNICODE_STATE as usize)?;
        let (width, compact, ascii) = (
            (state >> 2) & 7,
            state & (1 << 5) != 0,
            state & (1 << 6) != 0,
        );
        if !compact {
            return None;
        }
        let (data_off, width) = if ascii {
            (layout.ascii_size, 1)
        } else {
            (layout.compact_size, width)
        };
        if !matches!(width, 1 | 2 | 4) {
            return None;
        }
        let mut data = vec![0u8; (len * u64::from(width)) as usize];
        if !read_mem(pid, p.checked_add(u64::from(data_off))?, &mut data) {
            return None;
        }
        if ascii {
            return data.is_ascii().then(|| String::from_utf8(data).ok())?;
        }
        data.chunks_exact(width as usize)
            .map(|c| {
                let v = match *c {
                    [a] => u32::from(a),
                    [a, b] => u32::from(u16::from_le_bytes([a, b])),
                    [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
                    _ => return None,
                };
                char::from_u32(v)
            })
            .collect()
    }

    /// A bytes object's contents.
    fn read_bytes(&mut self, pid: u32, p: u64) -> Option<Box<[u8]>> {
        let mut head = [0u8; BYTES_SVAL as usize];
        if !plausible_object(p) || !read_mem(pid, p, &mut head) {
            return None;
        }
        self.check_type(pid, Kind::Bytes, u64_at(&head, OB_TYPE as usize)?)?;
        let len = u64_at(&head, OB_SIZE as usize)?;
        if len > MAX_TABLE_BYTES {
            return None;
        }
        let mut data = vec![0u8; len as usize];
        read_mem(pid, p.checked_add(BYTES_SVAL)?, &mut data).then(|| data.into_boxed_slice())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use blockwatch_common::MAX_PY_FRAMES;

    use super::*;

    /// An installed interpreter to test against.
    #[derive(Debug)]
    struct Interp {
        python: PathBuf,
        version: (u8, u8),
        /// `include/python3.X` of the same build, when installed.
        include: Option<PathBuf>,
    }

    fn version_of(python: &Path) -> Option<(u8, u8)> {
        let out = Command::new(python)
            .args(["-c", "import sys; print(*sys.version_info[:2])"])
            .output()
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        let mut it = text.split_whitespace();
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    }

    /// Debian's /usr/bin/python3 and every pyenv 3.10-3.13.
    fn interpreters() -> Vec<Interp> {
        let mut found = Vec::new();
        if let Ok(python) = std::fs::canonicalize("/usr/bin/python3")
            && let Some(version) = version_of(&python)
        {
            let include = PathBuf::from(format!("/usr/include/python3.{}", version.1));
            found.push(Interp {
                python,
                version,
                include: include.join("Python.h").exists().then_some(include),
            });
        }
        let mut dirs: Vec<PathBuf> = std::fs::read_dir("/root/.pyenv/versions")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        dirs.sort();
        for dir in dirs {
            let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some((3, minor)) = leading_version(name) else {
                continue;
            };
            if !(10..=13).contains(&minor) {
                continue;
            }
            let python = dir.join(format!("bin/python3.{minor}"));
            let Some(version) = version_of(&python) else {
                continue;
            };
            let include = dir.join(format!("include/python3.{minor}"));
            found.push(Interp {
                python,
                version,
                include: include.join("Python.h").exists().then_some(include),
            });
        }
        found
    }

    // -- Offsets against the headers -------------------------------------

    /// A C program printing `name value` for every offset we table.
    fn offsets_program(minor: u8) -> String {
        let mut c = String::from(
            "#define Py_BUILD_CORE 1\n#include <Python.h>\n#include <frameobject.h>\n\
             #include <stddef.h>\n#include <stdio.h>\n#include \"internal/pycore_runtime.h\"\n\
             #include \"internal/pycore_interp.h\"\n",
        );
        if minor >= 11 {
            c.push_str("#include \"internal/pycore_frame.h\"\n");
        }
        c.push_str("#define P(n, e) printf(\"%s %zu\\n\", n, (size_t)(e))\nint main(void) {\n");
        let mut p = |name: &str, expr: &str| c.push_str(&format!("P(\"{name}\", {expr});\n"));
        p(
            "runtime_interpreters_head",
            "offsetof(_PyRuntimeState, interpreters.head)",
        );
        p("tstate_next", "offsetof(PyThreadState, next)");
        p("tstate_thread_id", "offsetof(PyThreadState, thread_id)");
        p("code_filename", "offsetof(PyCodeObject, co_filename)");
        p("code_firstlineno", "offsetof(PyCodeObject, co_firstlineno)");
        p("code_linetable", "offsetof(PyCodeObject, co_linetable)");
        p("ob_type", "offsetof(PyObject, ob_type)");
        p("ob_size", "offsetof(PyVarObject, ob_size)");
        p("tp_name", "offsetof(PyTypeObject, tp_name)");
        p("bytes_sval", "offsetof(PyBytesObject, ob_sval)");
        p("unicode_length", "offsetof(PyASCIIObject, length)");
        p(
            "unicode_state",
            "offsetof(PyASCIIObject, hash) + sizeof(Py_hash_t)",
        );
        p("ascii_size", "sizeof(PyASCIIObject)");
        p("compact_size", "sizeof(PyCompactUnicodeObject)");
        // The state bits we decode: a compact ASCII 1-byte string.
        c.push_str(
            "{ PyASCIIObject o; memset(&o, 0, sizeof o); o.state.kind = PyUnicode_1BYTE_KIND;\n\
             o.state.compact = 1; o.state.ascii = 1; unsigned int w;\n\
             memcpy(&w, (char *)&o + offsetof(PyASCIIObject, hash) + sizeof(Py_hash_t), 4);\n\
             P(\"state_bits\", w); }\n",
        );
        let mut p = |name: &str, expr: &str| c.push_str(&format!("P(\"{name}\", {expr});\n"));
        if minor == 10 {
            p(
                "interp_threads_head",
                "offsetof(PyInterpreterState, tstate_head)",
            );
            p("tstate_frame", "offsetof(PyThreadState, frame)");
            p("frame_previous", "offsetof(PyFrameObject, f_back)");
            p("frame_code", "offsetof(PyFrameObject, f_code)");
            p("frame_instr", "offsetof(PyFrameObject, f_lasti)");
            p("frame_instr_size", "sizeof(((PyFrameObject *)0)->f_lasti)");
            p("code_name", "offsetof(PyCodeObject, co_name)");
        } else {
            p(
                "interp_threads_head",
                "offsetof(PyInterpreterState, threads.head)",
            );
            p("frame_previous", "offsetof(_PyInterpreterFrame, previous)");
            p("code_name", "offsetof(PyCodeObject, co_qualname)");
            p("code_adaptive", "offsetof(PyCodeObject, co_code_adaptive)");
        }
        if minor == 11 || minor == 12 {
            p("tstate_frame", "offsetof(PyThreadState, cframe)");
            p("cframe_current_frame", "offsetof(_PyCFrame, current_frame)");
            p("frame_code", "offsetof(_PyInterpreterFrame, f_code)");
            p("frame_instr", "offsetof(_PyInterpreterFrame, prev_instr)");
            p(
                "frame_instr_size",
                "sizeof(((_PyInterpreterFrame *)0)->prev_instr)",
            );
        }
        if minor >= 12 {
            p("frame_owner", "offsetof(_PyInterpreterFrame, owner)");
            p("owned_by_cstack", "FRAME_OWNED_BY_CSTACK");
        }
        if minor == 13 {
            p("tstate_frame", "offsetof(PyThreadState, current_frame)");
            p("frame_code", "offsetof(_PyInterpreterFrame, f_executable)");
            p("frame_instr", "offsetof(_PyInterpreterFrame, instr_ptr)");
            p(
                "frame_instr_size",
                "sizeof(((_PyInterpreterFrame *)0)->instr_ptr)",
            );
            let d = "_Py_DebugOffsets";
            for (name, field) in [
                ("dbg_version", "version"),
                ("dbg_free_threaded", "free_threaded"),
                (
                    "dbg_runtime_interpreters_head",
                    "runtime_state.interpreters_head",
                ),
                ("dbg_interp_threads_head", "interpreter_state.threads_head"),
                ("dbg_tstate_next", "thread_state.next"),
                ("dbg_tstate_current_frame", "thread_state.current_frame"),
                ("dbg_tstate_thread_id", "thread_state.thread_id"),
                ("dbg_frame_previous", "interpreter_frame.previous"),
                ("dbg_frame_executable", "interpreter_frame.executable"),
                ("dbg_frame_instr_ptr", "interpreter_frame.instr_ptr"),
                ("dbg_frame_owner", "interpreter_frame.owner"),
                ("dbg_code_filename", "code_object.filename"),
                ("dbg_code_qualname", "code_object.qualname"),
                ("dbg_code_linetable", "code_object.linetable"),
                ("dbg_code_firstlineno", "code_object.firstlineno"),
                ("dbg_code_adaptive", "code_object.co_code_adaptive"),
                ("dbg_unicode_ascii_size", "unicode_object.asciiobject_size"),
            ] {
                p(name, &format!("offsetof({d}, {field}) / 8"));
            }
            p("dbg_words", &format!("sizeof({d}) / 8"));
        }
        c.push_str("return 0; }\n");
        c
    }

    /// What our tables say, under the names the C program prints.
    fn expected(minor: u8) -> Vec<(&'static str, u32)> {
        let o = offsets_for(minor).expect("tabled version");
        let l = CodeLayout::for_version((3, minor)).expect("tabled version");
        let mut e = vec![
            ("runtime_interpreters_head", o.runtime_interpreters_head),
            ("interp_threads_head", o.interp_threads_head),
            ("tstate_next", o.tstate_next),
            ("tstate_thread_id", o.tstate_thread_id),
            ("tstate_frame", o.tstate_frame),
            ("cframe_current_frame", o.cframe_current_frame),
            ("frame_previous", o.frame_previous),
            ("frame_code", o.frame_code),
            ("frame_instr", o.frame_instr),
            ("frame_instr_size", o.frame_instr_size),
            ("frame_owner", o.frame_owner),
            ("code_name", l.name),
            ("code_filename", l.filename),
            ("code_firstlineno", l.firstlineno),
            ("code_linetable", l.linetable),
            ("code_adaptive", l.code_adaptive.unwrap_or(ABSENT)),
            ("ascii_size", l.ascii_size),
            ("compact_size", l.compact_size),
            ("ob_type", OB_TYPE as u32),
            ("ob_size", OB_SIZE as u32),
            ("tp_name", TP_NAME as u32),
            ("bytes_sval", BYTES_SVAL as u32),
            ("unicode_length", UNICODE_LENGTH as u32),
            ("unicode_state", UNICODE_STATE as u32),
            ("state_bits", (1 << 2) | (1 << 5) | (1 << 6)),
        ];
        if minor >= 12 {
            e.push(("owned_by_cstack", 3));
        }
        if minor == 13 {
            for (name, word) in [
                ("dbg_version", dbg::VERSION),
                ("dbg_free_threaded", dbg::FREE_THREADED),
                (
                    "dbg_runtime_interpreters_head",
                    dbg::RUNTIME_INTERPRETERS_HEAD,
                ),
                ("dbg_interp_threads_head", dbg::INTERP_THREADS_HEAD),
                ("dbg_tstate_next", dbg::TSTATE_NEXT),
                ("dbg_tstate_current_frame", dbg::TSTATE_CURRENT_FRAME),
                ("dbg_tstate_thread_id", dbg::TSTATE_THREAD_ID),
                ("dbg_frame_previous", dbg::FRAME_PREVIOUS),
                ("dbg_frame_executable", dbg::FRAME_EXECUTABLE),
                ("dbg_frame_instr_ptr", dbg::FRAME_INSTR_PTR),
                ("dbg_frame_owner", dbg::FRAME_OWNER),
                ("dbg_code_filename", dbg::CODE_FILENAME),
                ("dbg_code_qualname", dbg::CODE_QUALNAME),
                ("dbg_code_linetable", dbg::CODE_LINETABLE),
                ("dbg_code_firstlineno", dbg::CODE_FIRSTLINENO),
                ("dbg_code_adaptive", dbg::CODE_ADAPTIVE),
                ("dbg_unicode_ascii_size", dbg::UNICODE_ASCII_SIZE),
            ] {
                e.push((name, word as u32));
            }
        }
        e
    }

    #[test]
    fn offsets_match_headers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut checked = Vec::new();
        for interp in interpreters() {
            let Some(include) = &interp.include else {
                eprintln!("{}: no headers, not checked", interp.python.display());
                continue;
            };
            let minor = interp.version.1;
            let src = dir.path().join(format!("off{}.c", checked.len()));
            let exe = dir.path().join(format!("off{}", checked.len()));
            std::fs::write(&src, offsets_program(minor)).expect("write C");
            let out = Command::new("gcc")
                .arg("-DPy_BUILD_CORE")
                .arg(format!("-I{}", include.display()))
                .arg(format!("-I{}/internal", include.display()))
                .arg(&src)
                .arg("-o")
                .arg(&exe)
                .output()
                .expect("gcc must be installed to check the offsets");
            assert!(
                out.status.success(),
                "{}: {}",
                include.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let out = Command::new(&exe).output().expect("run offsets program");
            let text = String::from_utf8(out.stdout).expect("utf-8");
            let actual: HashMap<&str, u32> = text
                .lines()
                .filter_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    Some((k, v.parse().ok()?))
                })
                .collect();
            for (name, want) in expected(minor) {
                match actual.get(name) {
                    Some(&got) => assert_eq!(got, want, "3.{minor} {name} ({})", include.display()),
                    None => assert_eq!(want, ABSENT, "3.{minor} {name} not printed"),
                }
            }
            if minor == 13 {
                assert!(actual["dbg_words"] as usize >= dbg::WORDS);
            }
            checked.push(include.display().to_string());
        }
        assert!(
            !checked.is_empty(),
            "no CPython headers found: nothing checked"
        );
        eprintln!("offsets checked against {checked:?}");
    }

    // -- Real processes ---------------------------------------------------

    /// Kills the child when the test ends, however it ends.
    struct Reaped(std::process::Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// `blocked_here` waits at line 8 (the call starts there; its argument
    /// is on line 9, which tells "the CALL" from "the instruction before
    /// it"). The caller's name has a non-Latin-1 letter and the file name
    /// an emoji, so 2- and 4-byte strings are read too. A thread reports
    /// what the interpreter itself says of the main thread's frames, then
    /// exits.
    const SCRIPT: &str = r#"import sys
import threading
import time


def blocked_here():
    x = 1
    time.sleep(
        30
    )
    return x


def caller_λ():
    blocked_here(
    )


def report():
    main = threading.main_thread().ident
    while True:
        f = sys._current_frames().get(main)
        if f is not None and f.f_code.co_name == "blocked_here":
            break
        time.sleep(0.01)
    time.sleep(0.2)
    f = sys._current_frames()[main]
    print("MAIN", main, sep="\t")
    while f is not None:
        c = f.f_code
        print("FRAME", getattr(c, "co_qualname", c.co_name), c.co_filename, f.f_lineno, sep="\t")
        f = f.f_back
    print("READY", flush=True)


threading.Thread(target=report).start()
caller_λ()
"#;

    /// The kernel's walk, in user space: runtime → interpreter → the
    /// thread state whose thread_id is `ident` → its frames.
    fn walk(pid: u32, py: &PyProcess, ident: u64) -> Vec<(u64, u64)> {
        let o = &py.offsets;
        let at = |base: u64, off: u32| read_u64(pid, base + u64::from(off)).expect("readable");
        let interp = at(py.runtime_addr, o.runtime_interpreters_head);
        let mut tstate = at(interp, o.interp_threads_head);
        for _ in 0..64 {
            assert_ne!(tstate, 0, "thread {ident:#x} not in the thread list");
            if at(tstate, o.tstate_thread_id) == ident {
                break;
            }
            tstate = at(tstate, o.tstate_next);
        }
        let mut frame = at(tstate, o.tstate_frame);
        if o.cframe_current_frame != ABSENT {
            frame = at(frame, o.cframe_current_frame);
        }
        let mut out = Vec::new();
        while frame != 0 && out.len() < MAX_PY_FRAMES {
            let shim = o.frame_owner != ABSENT && {
                let mut owner = [0u8];
                assert!(read_mem(pid, frame + u64::from(o.frame_owner), &mut owner));
                owner[0] == 3
            };
            if !shim {
                let instr = if o.frame_instr_size == 4 {
                    let mut b = [0u8; 4];
                    assert!(read_mem(pid, frame + u64::from(o.frame_instr), &mut b));
                    u64::from(u32::from_le_bytes(b))
                } else {
                    at(frame, o.frame_instr)
                };
                out.push((at(frame, o.frame_code), instr));
            }
            frame = at(frame, o.frame_previous);
        }
        out
    }

    fn check_process(interp: &Interp, dir: &Path) {
        let label = interp.python.display().to_string();
        let script = dir.join(format!("probe_3{}_🐍.py", interp.version.1));
        std::fs::write(&script, SCRIPT).expect("write script");
        let mut child = Reaped(
            Command::new(&interp.python)
                .arg(&script)
                .env("PYTHONUTF8", "1")
                .env("PYTHONIOENCODING", "utf-8")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .expect("start python"),
        );
        let pid = child.0.id();
        let stdout = child.0.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut main_ident = None;
        let mut truth: Vec<PyFrame> = Vec::new();
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("{label}: no report from the script"));
            let f: Vec<&str> = line.split('\t').collect();
            match f.as_slice() {
                ["MAIN", ident] => main_ident = ident.parse::<u64>().ok(),
                ["FRAME", function, file, line] => truth.push(PyFrame {
                    function: function.to_string(),
                    file: file.to_string(),
                    line: line.parse().ok(),
                }),
                ["READY"] => break,
                _ => panic!("{label}: unexpected output {line:?}"),
            }
        }
        let main_ident = main_ident.expect("main thread ident");
        // Let the reporting thread finish, so that only the main thread's
        // state is in the list while we walk it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count()) > 1 {
            assert!(
                Instant::now() < deadline,
                "{label}: reporter thread still alive"
            );
            std::thread::sleep(Duration::from_millis(10));
        }

        let py = inspect(pid)
            .unwrap_or_else(|e| panic!("{label}: {e}"))
            .unwrap_or_else(|| panic!("{label}: not recognised as CPython"));
        assert_eq!(py.version, interp.version, "{label}");
        // The GIL range: _PyRuntime itself, which holds the GIL (3.10,
        // 3.11) or embeds the main interpreter that holds it (3.12+).
        assert!(
            (256..16 << 20).contains(&py.runtime_size),
            "{label}: _PyRuntime size {}",
            py.runtime_size
        );
        assert!(py.is_gil_futex(py.runtime_addr) && py.is_gil_futex(py.runtime_addr + 8));
        assert!(!py.is_gil_futex(py.runtime_addr + py.runtime_size));
        assert!(!py.is_gil_futex(py.runtime_addr - 4));
        let main_interp = read_u64(
            pid,
            py.runtime_addr + u64::from(py.offsets.runtime_interpreters_head),
        )
        .expect("interpreters.head");
        assert_eq!(
            py.is_gil_futex(main_interp),
            interp.version.1 >= 11,
            "{label}: the main interpreter is embedded in _PyRuntime from 3.11 on"
        );
        if interp.version.1 == 13 {
            let dbg = read_debug_offsets(pid, py.runtime_addr).expect("3.13 has _Py_DebugOffsets");
            assert!(!dbg.free_threaded);
            assert_eq!(dbg.version_hex >> 16, 0x030d);
            assert_eq!(
                Some(dbg.offsets),
                offsets_for(13),
                "3.13 table vs _Py_DebugOffsets"
            );
            assert_eq!(Some(dbg.code), CodeLayout::for_version((3, 13)));
        }

        let refs = walk(pid, &py, main_ident);
        let mut reader = CodeReader::new();
        let frames: Vec<PyFrame> = refs
            .iter()
            .map(|&(code, instr)| {
                reader
                    .frame(pid, &py, code, instr)
                    .unwrap_or_else(|| panic!("{label}: code object {code:#x} unreadable"))
            })
            .collect();
        eprintln!("{label}: {frames:?}");
        // Exactly what the interpreter reports of itself...
        assert_eq!(frames, truth, "{label}");
        // ...and what the script says.
        let file = script.to_str().expect("utf-8 path");
        let (inner_line, caller_line) = (8, 15);
        assert_eq!(
            frames.first(),
            Some(&PyFrame {
                function: "blocked_here".into(),
                file: file.into(),
                line: Some(inner_line),
            }),
            "{label}"
        );
        assert_eq!(
            frames.get(1),
            Some(&PyFrame {
                function: "caller_λ".into(),
                file: file.into(),
                line: Some(caller_line),
            }),
            "{label}"
        );
        assert_eq!(frames.get(2).map(|f| f.function.as_str()), Some("<module>"));
        assert_eq!(frames.len(), 3, "{label}: {frames:?}");

        // 3.13's instr_ptr is the CALL itself: the instruction before it
        // (the argument, line 9) would be the wrong line.
        if interp.version.1 == 13 {
            let (code, instr) = refs[0];
            let before = reader.frame(pid, &py, code, instr - 2).and_then(|f| f.line);
            assert_eq!(before, Some(9), "{label}");
        }

        // Cached: the same answers without reading the process again.
        let (code, instr) = refs[0];
        reader.forget(pid + 1);
        assert_eq!(reader.frame(pid, &py, code, instr).as_ref(), frames.first());
        // Not code objects: nothing, rather than garbage.
        for bogus in [0, 1, code + 8, py.runtime_addr, refs[0].1, u64::MAX - 7] {
            assert_eq!(
                reader.frame(pid, &py, bogus, instr),
                None,
                "{label}: {bogus:#x}"
            );
        }
        reader.forget(pid);
        assert!(reader.current.is_empty() && reader.previous.is_empty());
    }

    #[test]
    fn frames_of_real_interpreters() {
        let interps = interpreters();
        assert!(
            !interps.is_empty(),
            "no CPython 3.10-3.13 installed: nothing tested"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        for interp in &interps {
            check_process(interp, dir.path());
        }
    }

    #[test]
    fn other_processes_are_not_python() {
        assert!(inspect(std::process::id()).expect("own maps").is_none());
        assert!(matches!(inspect(u32::MAX), Err(PyError::Io { .. })));
    }

    /// Prints a line once started, then sleeps (Python 2 and 3).
    const SLEEPER: &str =
        "import sys, time; sys.stdout.write('R\\n'); sys.stdout.flush(); time.sleep(30)";

    /// Pythons older than 3.10 (2.7 and 3.6 have no _PyRuntime at all) are
    /// "not ours", not errors.
    #[test]
    fn older_pythons_are_none() {
        let mut tried = 0;
        for v in ["2.7", "3.6", "3.9"] {
            let Ok(dirs) = std::fs::read_dir("/root/.pyenv/versions") else {
                return;
            };
            for dir in dirs.flatten() {
                let name = dir.file_name().to_string_lossy().into_owned();
                let python = dir.path().join(format!("bin/python{v}"));
                if !name.starts_with(&format!("{v}.")) || !python.exists() {
                    continue;
                }
                let mut child = Reaped(
                    Command::new(&python)
                        .args(["-c", SLEEPER])
                        .stdout(Stdio::piped())
                        .spawn()
                        .expect("start python"),
                );
                let mut line = String::new();
                let stdout = child.0.stdout.take().expect("piped");
                BufReader::new(stdout)
                    .read_line(&mut line)
                    .expect("ready line");
                assert_eq!(line, "R\n");
                let r = inspect(child.0.id());
                assert!(matches!(r, Ok(None)), "{}: {r:?}", python.display());
                tried += 1;
            }
        }
        eprintln!("{tried} older interpreters checked");
    }

    // -- Line tables against CPython's own decoding -------------------------

    /// Code that exercises the line tables: loops, handlers, multi-line
    /// expressions, nested code, big line jumps (3.10 splits deltas over
    /// 127, 3.11+ uses long-form entries) and long single-line code (3.10
    /// splits offset deltas over 255).
    const LINES_SCRIPT: &str = r#"
src = '''
import os
def f(a, b=2, *c, **d):
    for i in range(a):
        if i % 2:
            continue
        try:
            x = [j * 2
                 for j in range(i)
                 if j]
        except (ValueError,
                KeyError) as e:
            raise RuntimeError(
                "bad") from e
        finally:
            pass
    with open(
            os.devnull) as fh:
        fh.read()
    return lambda q: (q +
                      1)

class K:
    @staticmethod
    def m(self):
        while True:
            break
        return {k: v for k, v in
                zip("ab", "cd")}
''' + "\n" * 300 + "def far(y):\n    return " + "+".join(["y"] * 300) + "\n" + "\n" * 70000 + "def very_far():\n    return 1\n"

code = compile(src, "sample.py", "exec")

def walk(c):
    yield c
    for k in c.co_consts:
        if hasattr(k, "co_lines"):
            yield from walk(k)

for c in walk(code):
    ranges = " ".join("%d:%d:%s" % r for r in c.co_lines())
    print(c.co_firstlineno, c.co_linetable.hex(), ranges)
"#;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn line_tables_match_cpython() {
        let mut seen = std::collections::HashSet::new();
        for interp in interpreters() {
            if !seen.insert(interp.version) {
                continue;
            }
            let out = Command::new(&interp.python)
                .args(["-c", LINES_SCRIPT])
                .output()
                .expect("run python");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8(out.stdout).expect("utf-8");
            let mut checked = 0;
            for line in text.lines() {
                let mut f = line.splitn(3, ' ');
                let first: i32 = f.next().and_then(|s| s.parse().ok()).expect("firstlineno");
                let table = hex(f.next().expect("table"));
                for r in f.next().unwrap_or("").split_whitespace() {
                    let mut p = r.split(':');
                    let start: i64 = p.next().and_then(|s| s.parse().ok()).expect("start");
                    let end: i64 = p.next().and_then(|s| s.parse().ok()).expect("end");
                    let want: Option<i64> = p.next().and_then(|s| s.parse().ok());
                    for byte in (start..end).step_by(2) {
                        let got = if interp.version.1 == 10 {
                            line_310(&table, first, byte)
                        } else {
                            line_311(&table, first, byte / 2)
                        };
                        assert_eq!(got, want, "{:?} at {byte} in {line}", interp.version);
                        checked += 1;
                    }
                }
            }
            assert!(
                checked > 500,
                "{:?}: only {checked} instructions",
                interp.version
            );
        }
        assert!(!seen.is_empty(), "no interpreter to check line tables with");
    }

    #[test]
    fn decoders_survive_garbage() {
        // A small xorshift: deterministic, no dependency.
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..2000 {
            let len = (next() % 64) as usize;
            let table: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let at = (next() % 200) as i64 - 10;
            let _ = line_310(&table, i32::MAX, at);
            let _ = line_311(&table, i32::MIN, at);
            let _ = line_311(&table, 1, i64::MAX);
        }
        // Varints that never end, or overflow.
        assert_eq!(line_311(&[0xe8, 0x7f, 0x7f], 1, 0), None);
        assert_eq!(line_311(&[0xe8; 1], 1, 0), None);
    }

    #[test]
    fn line_311_forms() {
        // RESUME-like no-column entry at +0, one-line form +1, long form
        // -1, "no location" and a short form.
        let table = [
            0x80 | (13 << 3),     // no columns, 1 unit
            0x00,                 // delta 0
            0x80 | (11 << 3) | 1, // one line form: +1, 2 units
            0x05,
            0x06,
            0x80 | (14 << 3), // long form, 1 unit
            0x03,             // svarint -1
            0x00,
            0x01,
            0x02,
            0x80 | (15 << 3),    // no location, 1 unit
            0x80 | (2 << 3) | 2, // short form, same line, 3 units
            0x11,
        ];
        let lines: Vec<Option<i64>> = (0..9).map(|i| line_311(&table, 10, i)).collect();
        assert_eq!(
            lines,
            [
                Some(10),
                Some(11),
                Some(11),
                Some(10),
                None,
                Some(10),
                Some(10),
                Some(10),
                None
            ]
        );
    }

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

    #[test]
    fn maps_lines() {
        let m = parse_maps_line(
            "7f00-7f10 r-xp 00001000 fd:01 1234                       /opt/my dir/libpython3.11.so.1.0 (deleted)",
        )
        .expect("parses");
        assert_eq!(
            (m.start, m.end, m.offset, m.inode),
            (0x7f00, 0x7f10, 0x1000, 1234)
        );
        assert_eq!(m.path, "/opt/my dir/libpython3.11.so.1.0");
        assert_eq!(m.range, "7f00-7f10");
        let anon = parse_maps_line("7f00-7f10 rw-p 00000000 00:00 0 ").expect("parses");
        assert_eq!(anon.path, "");
        assert!(parse_maps_line("garbage").is_none());
    }
}
