//! Native stacks of code built without frame pointers: DWARF CFI unwinding
//! (`.eh_frame`, `.debug_frame`) of the user stack the kernel copied at
//! switch-out, with framehop.
//!
//! The kernel's frame-pointer walk (`bpf_get_stack`) stops after a frame or
//! two in Debian's libc and python3, Rust release builds or node. For each
//! event that came with a stack copy, the copy is unwound with the unwind
//! tables of the binaries the process maps, falling back to frame pointers
//! where no table covers an address (JIT code, which V8 keeps
//! frame-pointer based), and [`choose`] picks the better of the two walks.
//!
//! Unwind tables are read once per binary, keyed by its build ID (path,
//! inode and mtime when it has none), and shared by every process that maps
//! it; they are kept within a memory budget. A process's unwinder is built
//! from its maps snapshot (owned by the [`Symbolizer`], which keeps binaries
//! open so that a process that exited is still unwound) and rebuilt when
//! the snapshot changes.

use std::collections::HashMap;
use std::ops::{Deref, Range};
use std::rc::Rc;
use std::sync::Arc;

use blockwatch_common::MAX_FRAMES;
use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder as _};
use log::debug;
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

use crate::ingest::decode::UserStackRecord;
use crate::procfs::FileId;
use crate::stacks::symbolize::{CodeMapping, Symbolizer};

/// Bytes of unwind tables cached (tables a process unwinder still uses
/// live on there until it goes, so the bound is approximate).
const TABLE_BUDGET: usize = 128 << 20;
/// Process unwinders kept (least recently used dropped first).
const MAX_PROCESSES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error("cannot open {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("cannot map {path}: {err}")]
    Map { path: String, err: std::io::Error },
    #[error("{path} is not an ELF file: {err}")]
    Parse { path: String, err: object::Error },
    #[error("{path} has no unwind tables (.eh_frame, .debug_frame)")]
    NoTables { path: String },
}

/// Section bytes shared between the cache and the modules built from them.
#[derive(Clone, Default)]
struct Bytes(Arc<[u8]>);

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// What identifies a binary's contents across processes and mounts.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum TableKey {
    BuildId(Vec<u8>),
    /// No build ID: path, inode and modification time.
    File {
        path: String,
        inode: u64,
        mtime: i64,
    },
}

/// The unwind tables of one binary and where its segments go.
struct Tables {
    eh_frame: Option<(Range<u64>, Bytes)>,
    eh_frame_hdr: Option<(Range<u64>, Bytes)>,
    debug_frame: Option<Bytes>,
    text: Option<Range<u64>>,
    got: Option<Range<u64>>,
    /// Executable PT_LOAD segments: (file offset, file size, virtual
    /// address). Only those: a mapping starts at a page boundary, which
    /// the end of the segment before may share.
    segments: Vec<(u64, u64, u64)>,
    bytes: usize,
}

impl Tables {
    fn read(file: &std::fs::File, path: &str) -> Result<(TableKey, Tables), UnwindError> {
        // SAFETY: a private read-only mapping; a binary truncated under us
        // would fault, which the loader's own mapping of it would too.
        let map = unsafe { memmap2::Mmap::map(file) }.map_err(|err| UnwindError::Map {
            path: path.to_string(),
            err,
        })?;
        let elf = object::File::parse(&*map).map_err(|err| UnwindError::Parse {
            path: path.to_string(),
            err,
        })?;
        let key = table_key(&elf, file, path)?;
        let eh_frame = section(&elf, ".eh_frame");
        let eh_frame_hdr = section(&elf, ".eh_frame_hdr");
        // framehop reads .eh_frame when there is one: .debug_frame (usually
        // in separate debug files) is kept only for binaries without.
        let debug_frame = match eh_frame {
            None => section(&elf, ".debug_frame").map(|(_, b)| b),
            Some(_) => None,
        };
        if eh_frame.is_none() && debug_frame.is_none() {
            return Err(UnwindError::NoTables {
                path: path.to_string(),
            });
        }
        let bytes = [&eh_frame, &eh_frame_hdr]
            .iter()
            .filter_map(|s| s.as_ref().map(|(_, b)| b.len()))
            .sum::<usize>()
            + debug_frame.as_ref().map_or(0, |b| b.len());
        let range = |name: &str| {
            elf.section_by_name(name)
                .map(|s| s.address()..s.address() + s.size())
        };
        Ok((
            key,
            Tables {
                eh_frame,
                eh_frame_hdr,
                debug_frame,
                text: range(".text"),
                got: range(".got"),
                segments: code_segments(&elf),
                bytes,
            },
        ))
    }

    /// Where the binary's addresses land in a process that maps file
    /// offset `offset` at `start`: avma = svma + bias.
    fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        let &(seg_offset, _, vaddr) = self
            .segments
            .iter()
            .find(|&&(o, size, _)| o & !0xfff <= offset && offset < o + size)?;
        Some(start.wrapping_sub(vaddr.wrapping_sub(seg_offset).wrapping_add(offset)))
    }

    fn module(&self, m: &CodeMapping) -> Option<Module<Bytes>> {
        let bias = self.bias(m.start, m.offset)?;
        let info = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: self.text.clone(),
            got_svma: self.got.clone(),
            eh_frame_svma: self.eh_frame.as_ref().map(|(r, _)| r.clone()),
            eh_frame: self.eh_frame.as_ref().map(|(_, b)| b.clone()),
            eh_frame_hdr_svma: self.eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
            eh_frame_hdr: self.eh_frame_hdr.as_ref().map(|(_, b)| b.clone()),
            debug_frame: self.debug_frame.clone(),
            ..Default::default()
        };
        Some(Module::new(m.path.to_string(), m.start..m.end, bias, info))
    }
}

/// The build ID of a binary, else its path, inode and mtime.
fn table_key(
    elf: &object::File<'_>,
    file: &std::fs::File,
    path: &str,
) -> Result<TableKey, UnwindError> {
    use std::os::unix::fs::MetadataExt as _;
    if let Ok(Some(id)) = elf.build_id()
        && !id.is_empty()
    {
        return Ok(TableKey::BuildId(id.to_vec()));
    }
    let meta = file.metadata().map_err(|err| UnwindError::Open {
        path: path.to_string(),
        err,
    })?;
    Ok(TableKey::File {
        path: path.to_string(),
        inode: meta.ino(),
        mtime: meta.mtime(),
    })
}

/// A non-empty section's address range and (uncompressed) bytes.
fn section(elf: &object::File<'_>, name: &str) -> Option<(Range<u64>, Bytes)> {
    let s = elf.section_by_name(name)?;
    let data = s.uncompressed_data().ok()?;
    (!data.is_empty()).then(|| {
        (
            s.address()..s.address() + s.size(),
            Bytes(Arc::from(&*data)),
        )
    })
}

/// Executable PT_LOAD segments: (file offset, file size, virtual address).
fn code_segments(elf: &object::File<'_>) -> Vec<(u64, u64, u64)> {
    const PF_X: u32 = 1;
    elf.segments()
        .filter(
            |s| matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0),
        )
        .map(|s| {
            let (offset, size) = s.file_range();
            (offset, size, s.address())
        })
        .collect()
}

/// Unwind tables by binary, within a byte budget: the least recently used
/// go first. Tables in use by a process unwinder stay alive there (their
/// bytes are shared), so the budget bounds what is kept for later.
struct TableCache {
    tables: HashMap<TableKey, (Rc<Tables>, u64)>,
    /// Which key each mapped file has, so a binary is read once.
    files: HashMap<FileId, Option<TableKey>>,
    bytes: usize,
    budget: usize,
    tick: u64,
}

impl TableCache {
    fn new(budget: usize) -> Self {
        Self {
            tables: HashMap::new(),
            files: HashMap::new(),
            bytes: 0,
            budget,
            tick: 0,
        }
    }

    fn get(&mut self, key: &TableKey) -> Option<Rc<Tables>> {
        self.tick += 1;
        let (t, used) = self.tables.get_mut(key)?;
        *used = self.tick;
        Some(Rc::clone(t))
    }

    fn insert(&mut self, key: TableKey, tables: Rc<Tables>) {
        self.tick += 1;
        let size = tables.bytes;
        if let Some((old, _)) = self.tables.insert(key, (tables, self.tick)) {
            self.bytes -= old.bytes;
        }
        self.bytes += size;
        while self.bytes > self.budget && self.tables.len() > 1 {
            let Some(lru) = super::least_recently_used(&self.tables, |(_, used)| *used) else {
                break;
            };
            if let Some((t, _)) = self.tables.remove(&lru) {
                self.bytes -= t.bytes;
            }
            self.files.retain(|_, k| k.as_ref() != Some(&lru));
        }
    }
}

/// One process's unwinder, for one generation of its maps.
struct ProcUnwinder {
    generation: u64,
    unwinder: UnwinderX86_64<Bytes>,
    cache: CacheX86_64,
    last_used: u64,
}

/// A native stack walk: return addresses after the first (exact) address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Walk {
    pub ips: Vec<u64>,
    /// Reached the start of the thread or program (not cut short).
    pub complete: bool,
    /// Why the walk stopped early, when it did.
    pub stopped: Option<String>,
}

/// Which walk an event's stack comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    FramePointers,
    Dwarf,
    /// The DWARF walk ran out of copied stack where the frame-pointer
    /// walk (which reads the live stack) went on: DWARF's frames up to its
    /// last, then the frame-pointer walk's from that frame outwards.
    Spliced {
        fp_from: usize,
    },
}

/// Picks the stack to report. The frame-pointer walk is kept when it is
/// complete (it is exact then, and costs nothing more); otherwise DWARF's,
/// which falls back to frame pointers itself wherever it has no tables, so
/// it is never worse except when it runs out of copied stack: then the
/// frame-pointer walk continues it if the two meet.
pub fn choose(fp: &Walk, dwarf: Option<&Walk>) -> Choice {
    let Some((dwarf, &last)) = dwarf.and_then(|d| Some((d, d.ips.last()?))) else {
        return Choice::FramePointers;
    };
    if fp.complete {
        return Choice::FramePointers;
    }
    if dwarf.complete {
        return Choice::Dwarf;
    }
    // Skip the first frame: it is the same instruction pointer in both.
    match fp.ips.iter().skip(1).position(|&ip| ip == last) {
        Some(i) if i + 2 < fp.ips.len() && dwarf.ips.len() > 1 => {
            Choice::Spliced { fp_from: i + 2 }
        }
        _ if fp.ips.len() > dwarf.ips.len()
            && dwarf.ips.iter().eq(fp.ips.iter().take(dwarf.ips.len())) =>
        {
            Choice::FramePointers
        }
        _ => Choice::Dwarf,
    }
}

/// Reads 8-byte words of a stack copy that starts at `sp`.
fn read_word(stack: &[u8], sp: u64, addr: u64) -> Result<u64, ()> {
    let off = addr.checked_sub(sp).ok_or(())? as usize;
    let bytes = stack.get(off..off.checked_add(8).ok_or(())?).ok_or(())?;
    Ok(u64::from_ne_bytes(bytes.try_into().map_err(|_| ())?))
}

/// Unwinds copied user stacks of any process.
pub struct StackUnwinder {
    tables: TableCache,
    procs: HashMap<u32, ProcUnwinder>,
    tick: u64,
    /// Stacks reported from the DWARF walk, for diagnostics.
    pub dwarf_stacks: u64,
}

impl Default for StackUnwinder {
    fn default() -> Self {
        Self::new()
    }
}

impl StackUnwinder {
    pub fn new() -> Self {
        Self {
            tables: TableCache::new(TABLE_BUDGET),
            procs: HashMap::new(),
            tick: 0,
            dwarf_stacks: 0,
        }
    }

    /// The native stack of an event: the frame-pointer walk `fp` the kernel
    /// took, or the DWARF walk of `copy`, or both spliced (see [`choose`]).
    pub fn stack(
        &mut self,
        sym: &mut Symbolizer,
        pid: u32,
        fp: &[u64],
        copy: Option<&UserStackRecord>,
    ) -> Vec<u64> {
        let Some(copy) = copy else {
            return fp.to_vec();
        };
        let fp_walk = Walk {
            ips: fp.to_vec(),
            complete: fp.len() > 1 && fp.last().is_some_and(|&ip| sym.is_thread_root(pid, ip)),
            stopped: None,
        };
        if fp_walk.complete {
            return fp_walk.ips;
        }
        let dwarf = self.unwind(sym, pid, copy);
        match choose(&fp_walk, Some(&dwarf)) {
            Choice::FramePointers => fp_walk.ips,
            Choice::Dwarf => {
                self.dwarf_stacks += 1;
                dwarf.ips
            }
            Choice::Spliced { fp_from } => {
                self.dwarf_stacks += 1;
                let mut ips = dwarf.ips;
                ips.extend_from_slice(&fp_walk.ips[fp_from..]);
                ips.truncate(MAX_FRAMES);
                ips
            }
        }
    }

    /// Unwinds one stack copy with `pid`'s unwind tables.
    pub fn unwind(&mut self, sym: &mut Symbolizer, pid: u32, copy: &UserStackRecord) -> Walk {
        // An instruction pointer outside the snapshot means new mappings.
        sym.touch(pid, copy.ip);
        let Some(proc_) = self.proc_unwinder(sym, pid) else {
            return Walk::default();
        };
        let ProcUnwinder {
            unwinder, cache, ..
        } = proc_;
        let mut read = |addr: u64| read_word(&copy.stack, copy.sp, addr);
        let mut iter = unwinder.iter_frames(
            copy.ip,
            UnwindRegsX86_64::new(copy.ip, copy.sp, copy.bp),
            cache,
            &mut read,
        );
        let mut walk = Walk::default();
        loop {
            match iter.next() {
                Ok(Some(frame)) => {
                    walk.ips.push(frame.address());
                    if walk.ips.len() >= MAX_FRAMES {
                        break;
                    }
                }
                Ok(None) => {
                    walk.complete = true;
                    break;
                }
                Err(e) => {
                    debug!(
                        "pid {pid}: unwinding stopped after {} frames: {e}",
                        walk.ips.len()
                    );
                    walk.stopped = Some(e.to_string());
                    break;
                }
            }
        }
        walk
    }

    /// The process is gone or exec'd: its unwinder goes (the tables stay).
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    fn proc_unwinder(&mut self, sym: &mut Symbolizer, pid: u32) -> Option<&mut ProcUnwinder> {
        self.tick += 1;
        let (generation, code) = sym.code_mappings(pid)?;
        let fresh = self
            .procs
            .get(&pid)
            .is_some_and(|p| p.generation == generation);
        if !fresh {
            let mut unwinder = UnwinderX86_64::new();
            for m in &code {
                if let Some(t) = self.tables_for(sym, pid, m)
                    && let Some(module) = t.module(m)
                {
                    unwinder.add_module(module);
                }
            }
            if !self.procs.contains_key(&pid) {
                super::make_room(&mut self.procs, MAX_PROCESSES, |p| p.last_used);
            }
            self.procs.insert(
                pid,
                ProcUnwinder {
                    generation,
                    unwinder,
                    cache: CacheX86_64::new(),
                    last_used: 0,
                },
            );
        }
        let p = self.procs.get_mut(&pid)?;
        p.last_used = self.tick;
        Some(p)
    }

    fn tables_for(
        &mut self,
        sym: &mut Symbolizer,
        pid: u32,
        m: &CodeMapping,
    ) -> Option<Rc<Tables>> {
        match self.tables.files.get(&m.file) {
            Some(Some(key)) => {
                let key = key.clone();
                if let Some(t) = self.tables.get(&key) {
                    return Some(t);
                }
            }
            // Known to have no tables (or to be unreadable).
            Some(None) => return None,
            None => {}
        }
        let file = sym.open(pid, m)?;
        match Tables::read(&file, &m.path) {
            Ok((key, tables)) => {
                let t = match self.tables.get(&key) {
                    Some(t) => t,
                    None => {
                        let t = Rc::new(tables);
                        self.tables.insert(key.clone(), Rc::clone(&t));
                        t
                    }
                };
                self.tables.files.insert(m.file, Some(key));
                Some(t)
            }
            Err(e) => {
                debug!("pid {pid}: {e}");
                self.tables.files.insert(m.file, None);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walk(ips: &[u64], complete: bool) -> Walk {
        Walk {
            ips: ips.to_vec(),
            complete,
            stopped: None,
        }
    }

    #[test]
    fn complete_frame_pointer_walk_is_kept() {
        let fp = walk(&[1, 2, 3], true);
        assert_eq!(
            choose(&fp, Some(&walk(&[1, 5, 6, 7], true))),
            Choice::FramePointers
        );
    }

    #[test]
    fn no_copy_or_empty_dwarf_walk_keeps_frame_pointers() {
        let fp = walk(&[1, 2], false);
        assert_eq!(choose(&fp, None), Choice::FramePointers);
        assert_eq!(choose(&fp, Some(&walk(&[], false))), Choice::FramePointers);
    }

    #[test]
    fn complete_dwarf_walk_wins_over_a_broken_frame_pointer_walk() {
        // Frame pointers through FP-less code end in garbage.
        let fp = walk(&[1, 0x5555, 0x6666, 0x7777], false);
        assert_eq!(choose(&fp, Some(&walk(&[1, 2, 3], true))), Choice::Dwarf);
    }

    #[test]
    fn incomplete_dwarf_walk_is_continued_by_frame_pointers_where_they_meet() {
        // DWARF ran out of copied stack at 3; frame pointers go on from it.
        let fp = walk(&[1, 3, 4, 5], false);
        let dwarf = walk(&[1, 2, 3], false);
        assert_eq!(choose(&fp, Some(&dwarf)), Choice::Spliced { fp_from: 2 });
    }

    #[test]
    fn longer_agreeing_frame_pointer_walk_is_kept() {
        let fp = walk(&[1, 2, 3, 4], false);
        assert_eq!(
            choose(&fp, Some(&walk(&[1, 2], false))),
            Choice::Spliced { fp_from: 2 }
        );
        assert_eq!(choose(&fp, Some(&walk(&[1], false))), Choice::FramePointers);
    }

    #[test]
    fn disagreeing_walks_trust_dwarf() {
        let fp = walk(&[1, 7, 8, 9, 10], false);
        assert_eq!(choose(&fp, Some(&walk(&[1, 2, 3], false))), Choice::Dwarf);
    }

    #[test]
    fn stack_words_are_read_inside_the_copy_only() {
        let mut stack = vec![0u8; 24];
        stack[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_ne_bytes());
        let sp = 0x7ffd_0000_1000;
        assert_eq!(read_word(&stack, sp, sp + 8), Ok(0x1122_3344_5566_7788));
        assert_eq!(read_word(&stack, sp, sp + 16), Ok(0));
        assert_eq!(read_word(&stack, sp, sp + 17), Err(()));
        assert_eq!(read_word(&stack, sp, sp - 8), Err(()));
        assert_eq!(read_word(&stack, sp, u64::MAX), Err(()));
    }

    /// The registers and the top of the stack of the calling thread, as
    /// the kernel would copy them.
    #[inline(never)]
    fn capture_own_stack() -> UserStackRecord {
        let (ip, sp, bp): (u64, u64, u64);
        // SAFETY: reads three registers, touches no memory.
        unsafe {
            std::arch::asm!(
                "lea {ip}, [rip]",
                "mov {sp}, rsp",
                "mov {bp}, rbp",
                ip = out(reg) ip,
                sp = out(reg) sp,
                bp = out(reg) bp,
            );
        }
        let maps = crate::procfs::maps::read(std::process::id()).unwrap();
        let end = crate::procfs::maps::find(&maps, sp).unwrap().end;
        let len = (end - sp).min(blockwatch_common::MAX_USER_STACK as u64) as usize;
        // SAFETY: sp..sp+len is this thread's mapped stack, above the
        // live frame of this function.
        let stack = unsafe { std::slice::from_raw_parts(sp as *const u8, len) }.to_vec();
        UserStackRecord {
            pid: std::process::id(),
            tid: 0,
            start_ns: 0,
            ip,
            sp,
            bp,
            stack,
        }
    }

    #[inline(never)]
    fn unwind_marker_outer() -> (UserStackRecord, u64) {
        let copy = std::hint::black_box(capture_own_stack());
        let f: fn() -> (UserStackRecord, u64) = unwind_marker_outer;
        (copy, f as usize as u64)
    }

    /// This test's own thread, unwound from a copy of its stack: through
    /// the test harness and std (no frame pointers) to the thread's start.
    #[test]
    fn own_thread_unwinds_to_its_start() {
        let (copy, _) = unwind_marker_outer();
        let mut sym = Symbolizer::new();
        let mut u = StackUnwinder::new();
        let walk = u.unwind(&mut sym, copy.pid, &copy);
        let frames = sym.symbolize(copy.pid, &walk.ips);
        let names: Vec<&str> = frames
            .iter()
            .filter(|f| !f.inlined)
            .map(|f| f.function.as_deref().unwrap_or("??"))
            .collect();
        assert!(walk.complete, "{names:#?} {walk:x?}");
        assert!(
            names.iter().any(|n| n.contains("unwind_marker_outer")),
            "{names:#?}"
        );
        assert!(
            names
                .iter()
                .any(|n| crate::stacks::symbolize::is_root_function(n)),
            "{names:#?}"
        );
        assert!(names.len() >= 8, "{names:#?}");
    }

    fn tables(bytes: usize) -> Rc<Tables> {
        Rc::new(Tables {
            eh_frame: None,
            eh_frame_hdr: None,
            debug_frame: None,
            text: None,
            got: None,
            segments: Vec::new(),
            bytes,
        })
    }

    fn id(n: u8) -> TableKey {
        TableKey::BuildId(vec![n])
    }

    #[test]
    fn table_cache_stays_within_its_budget_dropping_the_least_recently_used() {
        let mut c = TableCache::new(100);
        c.insert(id(1), tables(40));
        c.insert(id(2), tables(40));
        assert!(c.get(&id(1)).is_some()); // 2 is now the least recently used
        c.files.insert(FileId { dev: 1, inode: 2 }, Some(id(2)));
        c.insert(id(3), tables(40));
        assert!(c.bytes <= 100, "{}", c.bytes);
        assert!(c.get(&id(2)).is_none());
        assert!(c.get(&id(1)).is_some() && c.get(&id(3)).is_some());
        assert!(
            c.files.is_empty(),
            "the evicted binary's file entry goes too"
        );
        // One table larger than the budget is still kept: it is in use.
        c.insert(id(4), tables(500));
        assert_eq!(c.tables.len(), 1);
        assert_eq!(c.bytes, 500);
    }

    #[test]
    fn bias_maps_file_offsets_to_addresses() {
        let mut t = Rc::try_unwrap(tables(0)).ok().unwrap();
        // A PIE as rustc links it: the code segment starts mid-page in
        // the file (0x252f70), one page further in memory (0x253f70); its
        // mapping starts at the page boundary before, 0x252000.
        t.segments = vec![(0x252f70, 0x488fd0, 0x253f70)];
        let bias = t.bias(0x5555_0025_2000, 0x252000).unwrap();
        assert_eq!(bias + 0x253f70, 0x5555_0025_2f70);
        // A typical C PIE: r-x at 0x1000, vaddr 0x1000.
        t.segments = vec![(0x1000, 0x5000, 0x1000)];
        assert_eq!(t.bias(0x5555_0000_1000, 0x1000), Some(0x5555_0000_0000));
        // Offsets outside every segment have no place.
        assert_eq!(t.bias(0x5555_0000_1000, 0x9000), None);
    }
}
