//! libuv's iteration clock. From libuv 1.45 on (Node 20, uvloop 0.18)
//! `uv_run` counts its iterations (`uv_metrics_t.loop_count`, reached
//! through `uv_loop_t.internal_fields`), and nothing else writes that
//! count: `CLOCK_UV_COUNT`. Before, the clock is `uv_loop_t.time`, the
//! loop's time in milliseconds (`CLOCK_WORD`), which `uv__update_time`
//! rewrites at the start of every iteration of `uv_run`, but which the
//! loop's own code may rewrite in mid-callback too: Node's timers read
//! the loop's time through `uv_update_time` (a `setTimeout` in a long
//! handler), and so does uvloop's `loop.time()` (every `call_later`). An
//! episode is then ended early there; with the count it is not. Which
//! libuv a process runs is told by its symbols: `uv_metrics_info` came
//! with the count.
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
//! A Node worker thread runs its own loop, kept on its stack: it is found
//! by the same checks, scanning the thread's live stack. uvloop (Python's
//! libuv loop) keeps each loop in `malloc`ed memory: it is found by
//! scanning the heap.
//!
//! The offsets are those of libuv 1.x on x86-64 glibc (the struct is part
//! of libuv's ABI, stable through 1.x): computed from libuv 1.44's headers
//! (`offsetof` in a C program), and checked in the tests against real
//! loops, Node 20's libuv 1.46 and the one uvloop bundles.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use blockwatch_common::x86_64::USER_SPACE_END;
use blockwatch_common::{CLOCK_UV_COUNT, CLOCK_WORD, LoopClock};
use object::{Object, ObjectSegment, ObjectSymbol, SegmentFlags};

use crate::procfs::{self, FileId, MapKind, Mapping, maps, mem};

/// `offsetof(uv_loop_t, …)`, libuv 1.x, x86-64 glibc.
pub(super) const LOOP_HANDLE_QUEUE: usize = 16;
/// `internal_fields`: a `malloc`ed `uv__loop_internal_fields_t`, whose
/// `uv_metrics_t` (libuv ≥ 1.45) begins with `loop_count` at +8 (after
/// an `unsigned int flags`).
pub(super) const LOOP_INTERNAL_FIELDS: usize = 40;
pub(super) const INTERNAL_LOOP_COUNT: u64 = 8;
pub(super) const LOOP_STOP_FLAG: usize = 48;
pub(super) const LOOP_BACKEND_FD: usize = 64;
pub(super) const LOOP_NWATCHERS: usize = 112;
pub(super) const LOOP_NFDS: usize = 116;
/// `wq_async`, a `uv_async_t` that `uv_loop_init` initialises: its
/// `uv_handle_t.loop` (at +8) points back at the loop, its `type` (+16)
/// is `UV_ASYNC`.
pub(super) const LOOP_WQ_ASYNC_LOOP: usize = 176 + 8;
pub(super) const LOOP_WQ_ASYNC_TYPE: usize = 176 + 16;
const UV_ASYNC: u32 = 1;
pub(super) const LOOP_TIME: usize = 544;
/// Bytes of a `uv_loop_t` read to check it (through `time`).
pub(super) const LOOP_CHECKED: usize = LOOP_TIME + 8;

/// The static default loop's symbol (`uv_default_loop` returns it).
const DEFAULT_LOOP: &[u8] = b"default_loop_struct";
/// A function that came with `loop_count` (libuv 1.45).
const METRICS_INFO: &[u8] = b"uv_metrics_info";
/// A loop's time may run ahead of ours by at most this (it is read from
/// the coarse clock, which lags the precise one, never leads it by much).
const TIME_SLACK_MS: u64 = 1000;
/// Bytes of writable segments scanned per object at most.
const MAX_SCAN: u64 = 64 << 20;
/// Bytes of a thread's live stack scanned at most.
const MAX_STACK_SCAN: u64 = 8 << 20;
/// Bytes of heap and anonymous memory scanned for a uvloop loop at most.
const MAX_HEAP_SCAN: u64 = 256 << 20;
const SCAN_CHUNK: usize = 64 << 10;
/// Parsed ELF files kept; cleared when full.
const MAX_ELF_CACHE: usize = 64;

/// What is needed of an object that may hold libuv.
#[derive(Clone, Debug, Default)]
struct ElfInfo {
    /// `st_value` of `default_loop_struct`.
    default_loop: Option<u64>,
    /// It defines `uv_metrics_info`: its libuv counts iterations.
    counts_iterations: bool,
    /// PT_LOAD segments: (p_vaddr, p_offset).
    loads: Vec<(u64, u64)>,
    /// Writable PT_LOAD segments: (p_vaddr, p_memsz), `.bss` included.
    writable: Vec<(u64, u64)>,
}

/// The clock of the libuv loop that thread `tid` of `pid` runs on `epfd`:
/// the default loop on the main thread, a loop on the thread's own stack
/// (Node's workers), or a uvloop loop on any thread.
pub(super) fn find(pid: u32, tid: u32, epfd: i32) -> Option<LoopClock> {
    if epfd < 0 {
        return None;
    }
    let addr = if tid == pid {
        find_loop(pid, epfd, true)
    } else {
        find_on_stack(pid, tid, epfd)
    };
    let addr = addr.or_else(|| find_uvloop(pid, epfd))?;
    let time = addr.checked_add(LOOP_TIME as u64)?;
    if let Some(count) = loop_count(pid, addr) {
        return Some(LoopClock {
            kind: CLOCK_UV_COUNT,
            addr: count,
            time_addr: time,
            ..LoopClock::default()
        });
    }
    Some(LoopClock {
        kind: CLOCK_WORD,
        addr: time,
        ..LoopClock::default()
    })
}

/// The address of the iteration count of the loop at `addr` in `pid`,
/// when the process's libuv keeps one (an object that may hold libuv
/// defines `uv_metrics_info`) and it reads as one: a loop found asleep in
/// its poll has counted that iteration already, so it is at least 1.
fn loop_count(pid: u32, addr: u64) -> Option<u64> {
    let maps = maps::read(pid).ok()?;
    let exe = procfs::exe(pid);
    let mut seen: Vec<FileId> = Vec::new();
    let counts = maps.iter().any(|m| {
        let MapKind::File { id, path, .. } = &m.kind else {
            return false;
        };
        if seen.contains(id) || !(may_hold_libuv(path, exe.as_deref()) || is_uvloop(path)) {
            return false;
        }
        seen.push(*id);
        elf_of(pid, m, *id, path).is_some_and(|info| info.counts_iterations)
    });
    if !counts {
        return None;
    }
    let internal = mem::read_u64(pid, addr.checked_add(LOOP_INTERNAL_FIELDS as u64)?)?;
    if !(0x1000..USER_SPACE_END).contains(&internal) || !internal.is_multiple_of(8) {
        return None;
    }
    let count = internal.checked_add(INTERNAL_LOOP_COUNT)?;
    (mem::read_u64(pid, count)? >= 1).then_some(count)
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
                mem::read(pid, addr, &mut b) && is_loop(&b, addr, epfd, now)
            })
            .or_else(|| scan(pid, &info, bias, epfd, now));
        if found.is_some() {
            return found;
        }
    }
    None
}

/// A loop on thread `tid`'s own stack, above its stack pointer: a Node
/// worker thread keeps its `uv_loop_t` in the `WorkerThreadData` of the
/// function that runs the worker, a few tens of KiB above the wait. Cheap
/// enough to try on any thread (a thread's live stack is small).
fn find_on_stack(pid: u32, tid: u32, epfd: i32) -> Option<u64> {
    let maps = maps::read(pid).ok()?;
    let sp = super::syscall_sp(pid, tid)?;
    let stack = maps::find(&maps, sp)?;
    let mut budget = MAX_STACK_SCAN;
    scan_range(pid, sp, stack.end - sp, epfd, now_ms()?, &mut budget)
}

/// uvloop's extension module (`uvloop/loop.cpython-*.so`), which bundles
/// libuv.
fn is_uvloop(path: &str) -> bool {
    let mut parts = path.rsplit('/');
    let (Some(base), Some(dir)) = (parts.next(), parts.next()) else {
        return false;
    };
    dir == "uvloop" && base.starts_with("loop.") && base.ends_with(".so")
}

/// A uvloop loop on `epfd`: uvloop `malloc`s each `uv_loop_t` (in its
/// `Loop`'s constructor) and no Python frame leads to it while the loop
/// iterates in C, so the heap is scanned: `[heap]` first (the main
/// thread's arena), then anonymous memory (other threads' arenas), within
/// [`MAX_HEAP_SCAN`] bytes. A closed loop's `backend_fd` is -1, so stale
/// copies in freed memory do not match.
fn find_uvloop(pid: u32, epfd: i32) -> Option<u64> {
    let maps = maps::read(pid).ok()?;
    if !maps.iter().any(|m| m.path().is_some_and(is_uvloop)) {
        return None;
    }
    let now = now_ms()?;
    let heap = |m: &&Mapping| matches!(&m.kind, MapKind::Anon(Some(n)) if &**n == "[heap]");
    let anon = |m: &&Mapping| matches!(m.kind, MapKind::Anon(None)) && !m.exec;
    let mut budget = MAX_HEAP_SCAN;
    maps.iter()
        .filter(heap)
        .chain(maps.iter().filter(anon))
        .find_map(|m| scan_range(pid, m.start, m.end - m.start, epfd, now, &mut budget))
}

/// Node's executable (whatever its name), a node library, or libuv.
fn may_hold_libuv(path: &str, exe: Option<&Path>) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    matches!(base, "node" | "nodejs")
        || base.starts_with("libuv.so")
        || base.starts_with("libnode.so")
        || exe.is_some_and(|e| e == Path::new(path))
}

/// Whether `b` (the first [`LOOP_CHECKED`] bytes of a candidate at `addr`)
/// is an initialised `uv_loop_t` polling `epfd`, whose time is no later
/// than `now` (ms of CLOCK_MONOTONIC).
pub(super) fn is_loop(b: &[u8], addr: u64, epfd: i32, now: u64) -> bool {
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
    // The fd first: a scan tries every 8-byte step.
    if u32_at(LOOP_BACKEND_FD).map(i64::from) != Some(i64::from(epfd)) {
        return false;
    }
    let (Some(stop), Some(nwatchers), Some(nfds), Some(time)) = (
        u32_at(LOOP_STOP_FLAG),
        u32_at(LOOP_NWATCHERS),
        u32_at(LOOP_NFDS),
        u64_at(LOOP_TIME),
    ) else {
        return false;
    };
    // uv_loop_init links the handle queue, sets the time and initialises
    // wq_async, whose pointer back at the loop is what a scan of the heap
    // needs: other structures hold an fd and plausible words at the same
    // places (libuv's own io_uring state does).
    u64_at(LOOP_WQ_ASYNC_LOOP) == Some(addr)
        && u32_at(LOOP_WQ_ASYNC_TYPE) == Some(UV_ASYNC)
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
    info.writable.iter().find_map(|&(vaddr, memsz)| {
        scan_range(pid, bias.wrapping_add(vaddr), memsz, epfd, now, &mut budget)
    })
}

/// The address of a loop on `epfd` in `[start, start + len)`, read in
/// chunks while `budget` (bytes) lasts; unreadable chunks are skipped.
fn scan_range(
    pid: u32,
    start: u64,
    len: u64,
    epfd: i32,
    now: u64,
    budget: &mut u64,
) -> Option<u64> {
    let mut buf = vec![0u8; SCAN_CHUNK + LOOP_CHECKED];
    let mut at = start.checked_add(7)? & !7;
    let end = start.checked_add(len)?;
    while at < end && *budget > 0 {
        // Overlapping chunks, so a loop across a chunk's end is seen.
        let n = usize::try_from(end - at).ok()?.min(buf.len());
        if n < LOOP_CHECKED {
            break;
        }
        *budget = budget.saturating_sub(n as u64);
        let chunk = buf.get_mut(..n)?;
        if mem::read(pid, at, chunk) {
            let found = (0..=n - LOOP_CHECKED).step_by(8).find(|&off| {
                let c = chunk.get(off..);
                c.is_some_and(|c| is_loop(c, at + off as u64, epfd, now))
            });
            if let Some(off) = found {
                return Some(at + off as u64);
            }
        }
        at += (n - LOOP_CHECKED) as u64 + 8;
    }
    None
}

/// CLOCK_MONOTONIC in milliseconds (libuv's clock, in its unit).
pub(super) fn now_ms() -> Option<u64> {
    Some(super::monotonic_ns()? / 1_000_000)
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
    // libuv's API is exported: `uv_metrics_info` is in .dynsym too.
    for s in elf.symbols().chain(elf.dynamic_symbols()) {
        if s.is_undefined() {
            continue;
        }
        match s.name_bytes().ok() {
            Some(DEFAULT_LOOP) if info.default_loop.is_none() => {
                info.default_loop = Some(s.address())
            }
            Some(METRICS_INFO) => info.counts_iterations = true,
            _ => {}
        }
        if info.default_loop.is_some() && info.counts_iterations {
            break;
        }
    }
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
