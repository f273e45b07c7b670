//! libuv's iteration clock (`CLOCK_WORD`): `uv_loop_t.time`, the loop's
//! time in milliseconds (libuv's fast monotonic clock), which
//! `uv__update_time` rewrites at the start of every iteration of
//! `uv_run`, and which stays put while one callback runs.
//!
//! Node's main thread runs libuv's default loop, the static
//! `default_loop_struct`. Where libuv is linked statically (the official
//! builds, this project's machines) the executable's `.symtab` names it;
//! where the symbol is missing (a shared `libuv.so.1`, as Debian's nodejs
//! links, exports no static data), the writable segments of the object
//! holding libuv are scanned for a `uv_loop_t` whose `backend_fd` is the
//! epoll fd the thread waits on. Either way the candidate must pass the
//! same checks, `backend_fd` first: that also proves it is the loop this
//! thread runs.
//!
//! The offsets are those of libuv 1.x on x86-64 glibc (the struct is part
//! of libuv's ABI, stable through 1.x), checked against libuv's headers and
//! a running node in the tests.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use blockwatch_common::x86_64::USER_SPACE_END;
use blockwatch_common::{CLOCK_WORD, LoopClock};
use object::{Object, ObjectSegment, ObjectSymbol, SegmentFlags};

use crate::procfs::{self, FileId, MapKind, Mapping, maps, mem};

/// `offsetof(uv_loop_t, …)`, libuv 1.x, x86-64 glibc.
pub(super) const LOOP_HANDLE_QUEUE: usize = 16;
pub(super) const LOOP_STOP_FLAG: usize = 48;
pub(super) const LOOP_BACKEND_FD: usize = 64;
pub(super) const LOOP_NWATCHERS: usize = 112;
pub(super) const LOOP_NFDS: usize = 116;
pub(super) const LOOP_TIME: usize = 544;
/// Bytes of a `uv_loop_t` read to check it (through `time`).
pub(super) const LOOP_CHECKED: usize = LOOP_TIME + 8;

/// The static default loop's symbol (`uv_default_loop` returns it).
const DEFAULT_LOOP: &[u8] = b"default_loop_struct";
/// A loop's time may run ahead of ours by at most this (it is read from
/// the coarse clock, which lags the precise one, never leads it by much).
const TIME_SLACK_MS: u64 = 1000;
/// Bytes of writable segments scanned per object at most.
const MAX_SCAN: u64 = 64 << 20;
const SCAN_CHUNK: usize = 64 << 10;
/// Parsed ELF files kept; cleared when full.
const MAX_ELF_CACHE: usize = 64;

/// What is needed of an object that may hold libuv.
#[derive(Clone, Debug, Default)]
struct ElfInfo {
    /// `st_value` of `default_loop_struct`.
    default_loop: Option<u64>,
    /// PT_LOAD segments: (p_vaddr, p_offset).
    loads: Vec<(u64, u64)>,
    /// Writable PT_LOAD segments: (p_vaddr, p_memsz), `.bss` included.
    writable: Vec<(u64, u64)>,
}

/// The clock of the default loop, when thread `tid` of `pid` is the main
/// thread and runs it on `epfd`. Worker threads' loops are heap-allocated
/// by Node's `Worker` (found by no symbol); they are out of scope.
pub(super) fn find(pid: u32, tid: u32, epfd: i32) -> Option<LoopClock> {
    if tid != pid || epfd < 0 {
        return None;
    }
    let addr = find_loop(pid, epfd, true)?;
    Some(LoopClock {
        kind: CLOCK_WORD,
        addr: addr.checked_add(LOOP_TIME as u64)?,
        ..LoopClock::default()
    })
}

/// The address of the `uv_loop_t` polling `epfd` in process `pid`: the
/// default loop's symbol first (when `by_symbol`), else a scan.
pub(super) fn find_loop(pid: u32, epfd: i32, by_symbol: bool) -> Option<u64> {
    let maps = maps::read(pid).ok()?;
    let exe = procfs::exe(pid);
    let now = now_ms()?;
    let mut seen: Vec<FileId> = Vec::new();
    for m in &maps {
        let MapKind::File { id, path, .. } = &m.kind else {
            continue;
        };
        if seen.contains(id) || !may_hold_libuv(path, exe.as_deref()) {
            continue;
        }
        seen.push(*id);
        let mappings: Vec<&Mapping> = maps.iter().filter(|x| x.path() == Some(path)).collect();
        let Some(info) = elf_of(pid, m, *id, path) else {
            continue;
        };
        let Some(bias) = maps::load_bias(&info.loads, &mappings) else {
            continue;
        };
        let found = info
            .default_loop
            .filter(|_| by_symbol)
            .map(|sym| bias.wrapping_add(sym))
            .filter(|&addr| {
                let mut b = [0u8; LOOP_CHECKED];
                mem::read(pid, addr, &mut b) && is_loop(&b, epfd, now)
            })
            .or_else(|| scan(pid, &info, bias, epfd, now));
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Node's executable (whatever its name), a node library, or libuv.
fn may_hold_libuv(path: &str, exe: Option<&Path>) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    matches!(base, "node" | "nodejs")
        || base.starts_with("libuv.so")
        || base.starts_with("libnode.so")
        || exe.is_some_and(|e| e == Path::new(path))
}

/// Whether `b` (the first [`LOOP_CHECKED`] bytes of a candidate) is an
/// initialised `uv_loop_t` polling `epfd`, whose time is no later than
/// `now` (ms of CLOCK_MONOTONIC).
pub(super) fn is_loop(b: &[u8], epfd: i32, now: u64) -> bool {
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let pointer = |p: Option<u64>| {
        p.is_some_and(|p| (0x1000..USER_SPACE_END).contains(&p) && p.is_multiple_of(8))
    };
    let (Some(fd), Some(stop), Some(nwatchers), Some(nfds), Some(time)) = (
        u32_at(LOOP_BACKEND_FD),
        u32_at(LOOP_STOP_FLAG),
        u32_at(LOOP_NWATCHERS),
        u32_at(LOOP_NFDS),
        u64_at(LOOP_TIME),
    ) else {
        return false;
    };
    // uv_loop_init links the handle queue to itself and sets the time, so
    // an uninitialised (zeroed) loop fails here.
    i64::from(fd) == i64::from(epfd)
        && stop <= 1
        && nfds <= nwatchers
        && pointer(u64_at(LOOP_HANDLE_QUEUE))
        && pointer(u64_at(LOOP_HANDLE_QUEUE + 8))
        && time > 0
        && time <= now.saturating_add(TIME_SLACK_MS)
}

/// The address of a loop on `epfd` in the object's writable segments.
fn scan(pid: u32, info: &ElfInfo, bias: u64, epfd: i32, now: u64) -> Option<u64> {
    let mut budget = MAX_SCAN;
    let mut buf = vec![0u8; SCAN_CHUNK + LOOP_CHECKED];
    for &(vaddr, memsz) in &info.writable {
        let start = bias.wrapping_add(vaddr) & !7;
        let end = start.checked_add(memsz.min(budget))?;
        budget = budget.saturating_sub(memsz);
        let mut at = start;
        while at < end {
            // Overlapping chunks, so a loop across a chunk's end is seen.
            let len = usize::try_from(end - at).ok()?.min(buf.len());
            let chunk = buf.get_mut(..len)?;
            if !mem::read(pid, at, chunk) {
                break;
            }
            let last = len.saturating_sub(LOOP_CHECKED);
            for off in (0..=last).step_by(8) {
                if chunk.get(off..).is_some_and(|c| is_loop(c, epfd, now)) {
                    return Some(at + off as u64);
                }
            }
            at += (last as u64 + 8).max(8);
        }
    }
    None
}

/// CLOCK_MONOTONIC in milliseconds (libuv's clock, in its unit).
pub(super) fn now_ms() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u64::try_from(ts.tv_nsec).ok()?;
    Some(secs.checked_mul(1000)? + nanos / 1_000_000)
}

fn read_elf(path: &Path) -> Option<ElfInfo> {
    // ReadCache reads only what is parsed (headers, symbol tables), not the
    // whole (100 MB) executable.
    let cache = object::ReadCache::new(File::open(path).ok()?);
    let elf = object::File::parse(&cache).ok()?;
    let mut info = ElfInfo::default();
    for s in elf.segments() {
        info.loads.push((s.address(), s.file_range().0));
        if let SegmentFlags::Elf { p_flags } = s.flags()
            && p_flags & object::elf::PF_W != 0
        {
            info.writable.push((s.address(), s.size()));
        }
    }
    // A static symbol: only in .symtab (kept by Node's own builds).
    info.default_loop = elf
        .symbols()
        .chain(elf.dynamic_symbols())
        .find(|s| !s.is_undefined() && s.name_bytes().ok() == Some(DEFAULT_LOOP))
        .map(|s| s.address());
    Some(info)
}

type ElfKey = (FileId, u64);

fn elf_cache() -> &'static Mutex<HashMap<ElfKey, ElfInfo>> {
    static CACHE: OnceLock<Mutex<HashMap<ElfKey, ElfInfo>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The ELF file behind mapping `m`, as process `pid` sees it (through its
/// root, else through map_files), cached by identity: Node's symbol table
/// takes tens of milliseconds to search.
fn elf_of(pid: u32, m: &Mapping, id: FileId, path: &str) -> Option<ElfInfo> {
    let via_root = procfs::in_root(pid, path);
    let size = std::fs::metadata(&via_root).map(|m| m.len()).unwrap_or(0);
    let key = (id, size);
    if let Some(info) = elf_cache().lock().ok()?.get(&key) {
        return Some(info.clone());
    }
    let info = read_elf(&via_root).or_else(|| read_elf(&m.map_files(pid)))?;
    let mut cache = elf_cache().lock().ok()?;
    if cache.len() >= MAX_ELF_CACHE {
        cache.clear();
    }
    cache.insert(key, info.clone());
    Some(info)
}
