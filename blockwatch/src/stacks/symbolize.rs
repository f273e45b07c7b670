//! Native stack symbolization: user stacks captured by `bpf_get_stack` in
//! other processes, turned into [`Frame`]s.
//!
//! Events arrive at a high rate and stacks repeat, so the steady state must
//! not touch `/proc`: each process's `/proc/PID/maps` is parsed once into a
//! snapshot that answers "which mapping is this address in" by binary
//! search, and every resolved (binary, file offset) is remembered. Addresses
//! are translated to offsets in the mapped file and symbolized with
//! blazesym's ELF source, so one parsed copy of a binary (its symbol tables
//! and DWARF) serves every process that maps it, whatever address the
//! process loaded it at.
//!
//! A process may exit before its last events are read (it blocked, then
//! quit). So the snapshot is taken when a process is first seen
//! ([`Symbolizer::observe`], re-read while the process is young and loads
//! its libraries, after exec and on addresses it does not cover), and the
//! binaries it maps are opened at once and kept open (a bounded number):
//! after the exit, `/proc/PID` is gone but the open files still name the
//! very binaries the process ran, for symbols and for unwind tables.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use blazesym::symbolize::source::{Elf, Process, Source};
use blazesym::symbolize::{self as bz, Input, Symbolized};
use blazesym::{ErrorKind, Pid};
use log::debug;

use crate::event::Frame;
use crate::procfs::{self, FileId, MapKind, Mapping, maps};

/// A process's maps are re-read when an address falls outside all of its
/// known mappings (it loaded a library since), but at most this often:
/// scanning raw stack words for return addresses looks up many values that
/// are no address at all, and each one would otherwise cost a re-read.
const MAPS_REFRESH: Duration = Duration::from_secs(1);

/// A binary that could not be opened is not tried again for this long, so
/// that a process whose binaries we may not read costs nothing per event.
const OPEN_RETRY: Duration = Duration::from_secs(10);

/// Processes whose maps are kept. The pipeline forgets a process when its
/// exit record arrives (after its last events), but a lost exit record
/// would leave its snapshot behind: the least recently used goes when full.
const MAX_PROCESSES: usize = 1024;

/// Resolved addresses kept per cache generation (so at most twice this).
const FRAME_CACHE_GENERATION: usize = 16 * 1024;

/// A process first seen this long ago is still starting up (its dynamic
/// loader and imports map libraries): [`Symbolizer::observe`] re-reads its
/// maps every `MAPS_REFRESH` until then. Later, only misses re-read them.
const YOUNG: Duration = Duration::from_secs(10);

/// While young, a miss re-reads the maps this often at most: the libraries
/// a process loads at start must be seen before it can exit.
const YOUNG_MAPS_REFRESH: Duration = Duration::from_millis(50);

/// Binaries kept open for processes that may exit before their events are
/// symbolized. Past this, the least recently used is closed (and reopened
/// through its process if that is still alive).
const MAX_PINNED: usize = 256;

/// Binaries blazesym keeps parsed (symbol tables, DWARF, the file mapped):
/// megabytes each for a libpython or a node. Past this the least recently
/// looked-up one is released; its frames already resolved stay cached.
pub const MAX_PARSED: usize = 32;

/// A binary no lookup needed for this long is released
/// ([`Symbolizer::release_idle`]): after a burst of events, a daemon
/// should not keep what the burst parsed for the rest of its life.
pub const PARSED_IDLE: Duration = Duration::from_secs(60);

/// An executable mapping of a file in a process, for the unwinder.
#[derive(Clone, Debug)]
pub struct CodeMapping {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    pub file: FileId,
    /// The path as the process sees it (for messages and cache keys).
    pub path: Rc<str>,
}

/// What a frame cache entry was resolved in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Binary {
    File(FileId),
    /// The vDSO is the same kernel image in every (64-bit) process.
    Vdso,
}

/// A snapshot of one process's address space.
struct ProcMaps {
    maps: Vec<Mapping>,
    read_at: Instant,
    first_read: Instant,
    /// Changes whenever `maps` does.
    generation: u64,
    last_used: u64,
}

impl ProcMaps {
    fn find(&self, addr: u64) -> Option<&Mapping> {
        maps::find(&self.maps, addr)
    }
}

/// How a binary is opened for blazesym.
#[derive(Default)]
struct BinState {
    /// The path blazesym knows this binary by; it keeps the file open and
    /// never looks at the path again (auto-reload is off).
    path: Option<PathBuf>,
    failed_at: Option<Instant>,
    /// The last lookup blazesym answered for it (frame-cache hits do not
    /// count: they need no parsed binary).
    used_at: Option<Instant>,
}

/// Resolved frames of a (binary, offset): functions, files and lines, with
/// neither address nor module (those depend on the process). Empty when the
/// binary has no symbol there.
type Resolved = Rc<[Frame]>;

/// Bounded memory of resolved addresses. Two generations: when the current
/// one is full it becomes the old one and the previous old one is dropped;
/// an old entry that is used again moves back to the current one. This
/// keeps the stacks in use at the cost of a hash lookup, without the
/// bookkeeping of an exact LRU.
struct FrameCache {
    current: HashMap<(Binary, u64), Resolved>,
    old: HashMap<(Binary, u64), Resolved>,
    generation: usize,
}

impl FrameCache {
    fn new(generation: usize) -> Self {
        Self {
            current: HashMap::new(),
            old: HashMap::new(),
            generation,
        }
    }

    fn get(&mut self, key: (Binary, u64)) -> Option<Resolved> {
        if let Some(r) = self.current.get(&key) {
            return Some(Rc::clone(r));
        }
        let r = self.old.remove(&key)?;
        self.insert(key, Rc::clone(&r));
        Some(r)
    }

    fn insert(&mut self, key: (Binary, u64), value: Resolved) {
        if self.current.len() >= self.generation {
            self.old = std::mem::take(&mut self.current);
        }
        self.current.insert(key, value);
    }

    fn forget(&mut self, binary: Binary) {
        self.current.retain(|k, _| k.0 != binary);
        self.old.retain(|k, _| k.0 != binary);
    }
}

/// Our own vDSO, which resolves addresses in every other process's vDSO.
enum Vdso {
    Unknown,
    Ready { start: u64, len: u64 },
    Unavailable,
}

/// Symbolizes user stacks of any process. Not `Send`: blazesym's caches are
/// single-threaded; keep it on the thread that consumes events.
pub struct Symbolizer {
    blaze: bz::Symbolizer,
    procs: HashMap<u32, ProcMaps>,
    bins: HashMap<FileId, BinState>,
    /// Which binary each path handed to blazesym stands for. A path can come
    /// back naming another file (a PID reused, a library replaced), and
    /// blazesym, which never re-checks a known path, would then answer from
    /// the old file.
    path_owner: HashMap<PathBuf, FileId>,
    frames: FrameCache,
    vdso: Vdso,
    /// Set once opening through `map_files` was refused, so later binaries
    /// go straight to the fallback.
    map_files_denied: bool,
    maps_refresh: Duration,
    young_maps_refresh: Duration,
    /// Logical clock for picking the least recently used process.
    tick: u64,
    failures: u64,
    /// Binaries held open (see the module doc), by identity.
    pins: HashMap<FileId, Pin>,
    /// Source of `ProcMaps::generation`.
    generations: u64,
    /// Parsed binaries released (over [`MAX_PARSED`], or idle).
    evictions: u64,
}

/// A binary held open.
struct Pin {
    file: std::fs::File,
    last_used: u64,
}

impl Pin {
    /// A path that opens this very file, for as long as it is pinned.
    fn path(&self) -> PathBuf {
        use std::os::fd::AsRawFd as _;
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// Whether `file` is the file `id` names (a path may name another file by
/// now: a library upgraded, a binary rebuilt).
fn is_file(file: &std::fs::File, id: FileId) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    file.metadata().is_ok_and(|m| {
        let dev = m.dev();
        let (major, minor) = (libc::major(dev) as u64, libc::minor(dev) as u64);
        m.ino() == id.inode && ((major << 32) | minor) == id.dev
    })
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

/// Converts a blazesym symbol to frames, innermost first: the inlined
/// callees (blazesym lists them outermost first), then the function itself.
fn frames_of(sym: &bz::Sym<'_>) -> Vec<Frame> {
    fn location(info: Option<&bz::CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
        match info {
            Some(info) => (
                Some(info.to_path().to_string_lossy().into_owned()),
                info.line,
            ),
            None => (None, None),
        }
    }
    let mut frames = Vec::with_capacity(sym.inlined.len() + 1);
    for f in sym.inlined.iter().rev() {
        let (file, line) = location(f.code_info.as_ref());
        frames.push(Frame {
            function: Some(f.name.to_string()),
            file,
            line,
            inlined: true,
            ..Frame::default()
        });
    }
    let (file, line) = location(sym.code_info.as_deref());
    frames.push(Frame {
        function: Some(sym.name.to_string()),
        file,
        line,
        ..Frame::default()
    });
    frames
}

fn read_maps(pid: u32) -> Option<Vec<Mapping>> {
    match maps::read(pid) {
        Ok(maps) => Some(maps),
        Err(e) => {
            debug!("cannot read the maps of process {pid}: {e}");
            None
        }
    }
}

fn blazesym() -> bz::Symbolizer {
    bz::Symbolizer::builder()
        // Paths we hand over are pinned to one file (see `path_owner`),
        // so the per-lookup stat() that auto-reload costs buys nothing.
        .enable_auto_reload(false)
        .enable_code_info(true)
        .enable_inlined_fns(true)
        .enable_demangling(true)
        .build()
}

impl Symbolizer {
    pub fn new() -> Self {
        Self {
            blaze: blazesym(),
            procs: HashMap::new(),
            bins: HashMap::new(),
            path_owner: HashMap::new(),
            frames: FrameCache::new(FRAME_CACHE_GENERATION),
            vdso: Vdso::Unknown,
            map_files_denied: false,
            maps_refresh: MAPS_REFRESH,
            young_maps_refresh: YOUNG_MAPS_REFRESH,
            tick: 0,
            failures: 0,
            pins: HashMap::new(),
            generations: 0,
            evictions: 0,
        }
    }

    /// Takes a snapshot of `pid`'s maps if there is none, or re-reads it
    /// while the process is young (see [`YOUNG`]), and opens the binaries
    /// it maps. Called for watched processes periodically: cheap for the
    /// ones already known.
    pub fn observe(&mut self, pid: u32) {
        self.tick += 1;
        match self.procs.get(&pid) {
            None => self.load_maps(pid),
            Some(s)
                if s.first_read.elapsed() < YOUNG && s.read_at.elapsed() >= self.maps_refresh =>
            {
                self.load_maps(pid)
            }
            Some(_) => {}
        }
    }

    /// The executable file mappings of `pid` and the generation of the
    /// snapshot they come from (it changes when the snapshot does).
    pub fn code_mappings(&mut self, pid: u32) -> Option<(u64, Vec<CodeMapping>)> {
        if !self.procs.contains_key(&pid) {
            self.load_maps(pid);
        }
        let s = self.procs.get(&pid)?;
        let code = s
            .maps
            .iter()
            .filter(|m| m.exec)
            .filter_map(|m| match &m.kind {
                MapKind::File { id, path, .. } => Some(CodeMapping {
                    start: m.start,
                    end: m.end,
                    offset: m.offset,
                    file: *id,
                    path: Rc::clone(path),
                }),
                _ => None,
            })
            .collect();
        Some((s.generation, code))
    }

    /// The generation of the snapshot of `pid`'s maps, if one was taken:
    /// it changes whenever the snapshot does.
    pub fn generation(&self, pid: u32) -> Option<u64> {
        self.procs.get(&pid).map(|s| s.generation)
    }

    /// Makes sure the snapshot of `pid` covers `addr` if the process can
    /// tell (re-reading its maps on a miss, rate-limited).
    pub fn touch(&mut self, pid: u32, addr: u64) {
        let _ = self.mapping(pid, addr);
    }

    /// Opens the binary of a code mapping of `pid`: the pinned file, else
    /// through the process (see `resolve_file`).
    pub fn open(&mut self, pid: u32, m: &CodeMapping) -> Option<std::fs::File> {
        if let Some(pin) = self.pins.get(&m.file) {
            return pin.file.try_clone().ok();
        }
        self.open_through(pid, m.start, m.end, m.file, &m.path)
    }

    /// The file mapped at `start..end` in `pid`, checked to be `id`.
    fn open_through(
        &mut self,
        pid: u32,
        start: u64,
        end: u64,
        id: FileId,
        path: &str,
    ) -> Option<std::fs::File> {
        if !self.map_files_denied {
            match std::fs::File::open(maps::map_files(pid, start, end)) {
                Ok(f) => return Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    self.map_files_denied = true
                }
                Err(_) => {}
            }
        }
        std::fs::File::open(procfs::in_root(pid, path))
            .ok()
            .filter(|f| is_file(f, id))
    }

    /// Opens and keeps open the binaries `pid` maps as code.
    fn pin_binaries(&mut self, pid: u32) {
        let Some(s) = self.procs.get(&pid) else {
            return;
        };
        let wanted: Vec<(u64, u64, FileId, Rc<str>)> = s
            .maps
            .iter()
            .filter(|m| m.exec)
            .filter_map(|m| match &m.kind {
                MapKind::File { id, path, .. } => Some((m.start, m.end, *id, Rc::clone(path))),
                _ => None,
            })
            .collect();
        let tick = self.tick;
        for (start, end, id, path) in wanted {
            if let Some(pin) = self.pins.get_mut(&id) {
                pin.last_used = tick;
                continue;
            }
            let Some(file) = self.open_through(pid, start, end, id, &path) else {
                continue;
            };
            super::make_room(&mut self.pins, MAX_PINNED, |p| p.last_used);
            let pin = Pin {
                file,
                last_used: tick,
            };
            // The descriptor's number may have named another binary.
            let path = pin.path();
            if self.path_owner.get(&path).is_some_and(|&owner| owner != id) {
                self.forget_path(&path);
            }
            self.pins.insert(id, pin);
        }
    }

    /// Whether the return address `ret` (as captured) lies in a function
    /// that starts threads or programs: a stack that reaches it is
    /// complete. Not counted as a failure when it cannot be told.
    pub fn is_thread_root(&mut self, pid: u32, ret: u64) -> bool {
        let Some(frames) = self.resolve(pid, ret.wrapping_sub(1)).1 else {
            return false;
        };
        frames
            .iter()
            .rev()
            .find(|f| !f.inlined)
            .and_then(|f| f.function.as_deref())
            .is_some_and(is_root_function)
    }

    /// Symbolize a user stack of process `pid` captured by bpf_get_stack:
    /// ips[0] is the exact instruction pointer, ips[1..] are return
    /// addresses (looked up at addr-1 so a call at the end of a function
    /// resolves to the caller). One Frame per input address at least:
    /// inlined frames, when DWARF says so, are extra frames marked
    /// `inlined: true` placed before their outer frame. Unknown addresses
    /// give a Frame with function None and the module if known. Frames keep
    /// the address as captured.
    pub fn symbolize(&mut self, pid: u32, ips: &[u64]) -> Vec<Frame> {
        let mut out = Vec::with_capacity(ips.len());
        for (i, &ip) in ips.iter().enumerate() {
            let at = if i == 0 { ip } else { ip.wrapping_sub(1) };
            let (module, resolved) = self.resolve(pid, at);
            match resolved.filter(|r| !r.is_empty()) {
                Some(frames) => out.extend(frames.iter().map(|f| Frame {
                    address: ip,
                    module: module.clone(),
                    ..f.clone()
                })),
                None => {
                    self.failures += 1;
                    out.push(Frame {
                        address: ip,
                        module,
                        ..Frame::default()
                    });
                }
            }
        }
        out
    }

    /// The function containing `addr` (exact address, no adjustment),
    /// demangled. That is the symbol, not a callee inlined at `addr`: a
    /// return address in a runtime's park loop is in the park function even
    /// when the call it follows sits in inlined library code.
    pub fn function_at(&mut self, pid: u32, addr: u64) -> Option<String> {
        let name = self
            .resolve(pid, addr)
            .1
            .and_then(|frames| frames.iter().rev().find(|f| !f.inlined)?.function.clone());
        if name.is_none() {
            self.failures += 1;
        }
        name
    }

    /// Whether `addr` lies in an executable file-backed mapping of `pid`
    /// (used to scan raw stack words for return addresses). Answered from
    /// the maps snapshot.
    pub fn is_code(&mut self, pid: u32, addr: u64) -> bool {
        self.mapping(pid, addr)
            .is_some_and(|m| m.exec && matches!(m.kind, MapKind::File { .. }))
    }

    /// The process exec'd or exited: drop its maps snapshot (the next
    /// look takes a new one, young again). The binaries it mapped stay
    /// open and symbolized for the other processes that map them.
    pub fn forget(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    #[cfg(test)]
    pub(crate) fn knows(&self, pid: u32) -> bool {
        self.procs.contains_key(&pid)
    }

    /// Count of addresses that could not be symbolized so far (by
    /// [`Self::symbolize`] and [`Self::function_at`]).
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// Parsed binaries released so far, for being over [`MAX_PARSED`] or
    /// idle for [`PARSED_IDLE`].
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Releases the binaries no lookup needed for [`PARSED_IDLE`]. Cheap:
    /// one pass over the binaries known.
    pub fn release_idle(&mut self, now: Instant) {
        let idle: Vec<FileId> = self
            .bins
            .iter()
            .filter(|(_, b)| {
                b.path.is_some()
                    && b.used_at
                        .is_none_or(|t| now.saturating_duration_since(t) >= PARSED_IDLE)
            })
            .map(|(&id, _)| id)
            .collect();
        let released = !idle.is_empty();
        for id in idle {
            self.release(id);
        }
        // The debug-link files blazesym opened for the binaries (a
        // libc6-dbg file is megabytes) are cached under their own paths,
        // which only blazesym knows: with nothing parsed left, a new
        // blazesym drops them too.
        if released && self.parsed() == 0 {
            self.blaze = blazesym();
            self.vdso = Vdso::Unknown;
        }
    }

    /// Parsed binaries held now.
    fn parsed(&self) -> usize {
        self.bins.values().filter(|b| b.path.is_some()).count()
    }

    /// Drops what blazesym parsed of binary `id`; the next lookup that
    /// misses the frame cache opens it again.
    fn release(&mut self, id: FileId) {
        let Some(path) = self.bins.get_mut(&id).and_then(|b| b.path.take()) else {
            return;
        };
        self.evictions += 1;
        if let Err(e) = self
            .blaze
            .evict(&bz::evict::Evict::Elf(bz::evict::Elf::new(&path)))
        {
            debug!("cannot evict {}: {e}", path.display());
        }
        self.path_owner.remove(&path);
        // A pinned file keeps its inode, so its resolved frames stay true;
        // an unpinned one's inode may go to another file once closed.
        if !self.pins.contains_key(&id) {
            self.frames.forget(Binary::File(id));
        }
    }

    /// Makes room for one more parsed binary.
    fn make_parsed_room(&mut self) {
        if self.parsed() < MAX_PARSED {
            return;
        }
        let lru = self
            .bins
            .iter()
            .filter(|(_, b)| b.path.is_some())
            .min_by_key(|(_, b)| b.used_at)
            .map(|(&id, _)| id);
        if let Some(id) = lru {
            self.release(id);
        }
    }

    /// The mapping `addr` lies in, from the snapshot; the snapshot is taken
    /// at first sight of `pid` and refreshed, rate-limited, on a miss.
    fn mapping(&mut self, pid: u32, addr: u64) -> Option<Mapping> {
        self.tick += 1;
        let tick = self.tick;
        if !self.procs.contains_key(&pid) {
            self.load_maps(pid);
        }
        let snapshot = self.procs.get_mut(&pid)?;
        snapshot.last_used = tick;
        if let Some(m) = snapshot.find(addr) {
            return Some(m.clone());
        }
        let every = if snapshot.first_read.elapsed() < YOUNG {
            self.young_maps_refresh
        } else {
            self.maps_refresh
        };
        if snapshot.read_at.elapsed() < every {
            return None;
        }
        self.load_maps(pid);
        self.procs.get(&pid)?.find(addr).cloned()
    }

    fn load_maps(&mut self, pid: u32) {
        let now = Instant::now();
        let fresh = read_maps(pid);
        if let Some(snapshot) = self.procs.get_mut(&pid) {
            // A process that exited keeps its last snapshot: its events may
            // still be queued, and the files it mapped may still be open here.
            if let Some(maps) = fresh {
                if !same_maps(&snapshot.maps, &maps) {
                    self.generations += 1;
                    snapshot.generation = self.generations;
                }
                snapshot.maps = maps;
            }
            snapshot.read_at = now;
            self.pin_binaries(pid);
            return;
        }
        super::make_room(&mut self.procs, MAX_PROCESSES, |s| s.last_used);
        // An unreadable process gets an empty snapshot, so that it is not
        // retried more often than a live one.
        self.generations += 1;
        self.procs.insert(
            pid,
            ProcMaps {
                maps: fresh.unwrap_or_default(),
                read_at: now,
                first_read: now,
                generation: self.generations,
                last_used: self.tick,
            },
        );
        self.pin_binaries(pid);
    }

    /// The module of `addr` and its frames (empty when there is no symbol),
    /// or None frames when its binary could not be read at all.
    fn resolve(&mut self, pid: u32, addr: u64) -> (Option<String>, Option<Resolved>) {
        let Some(m) = self.mapping(pid, addr) else {
            return (None, None);
        };
        let module = Some(m.name());
        let resolved = match &m.kind {
            MapKind::File { id, path, deleted } => {
                let offset = addr - m.start + m.offset;
                let key = (Binary::File(*id), offset);
                match self.frames.get(key) {
                    Some(r) => Some(r),
                    None => self
                        .resolve_file(pid, &m, *id, path, *deleted, offset)
                        .inspect(|r| {
                            self.frames.insert(key, Rc::clone(r));
                        }),
                }
            }
            MapKind::Vdso => {
                let offset = addr - m.start;
                let key = (Binary::Vdso, offset);
                match self.frames.get(key) {
                    Some(r) => Some(r),
                    None => self.resolve_vdso(m.end - m.start, offset).inspect(|r| {
                        self.frames.insert(key, Rc::clone(r));
                    }),
                }
            }
            // JIT code: nothing to read symbols from.
            MapKind::Anon(_) => None,
        };
        (module, resolved)
    }

    fn resolve_file(
        &mut self,
        pid: u32,
        m: &Mapping,
        id: FileId,
        path: &str,
        deleted: bool,
        offset: u64,
    ) -> Option<Resolved> {
        let now = Instant::now();
        let state = self.bins.entry(id).or_default();
        if let Some(known) = state.path.clone() {
            state.used_at = Some(now);
            if let Some(r) = self.lookup(&known, offset) {
                return Some(r);
            }
            self.forget_path(&known);
        }
        let state = self.bins.entry(id).or_default();
        if state.failed_at.is_some_and(|t| t.elapsed() < OPEN_RETRY) {
            return None;
        }
        self.make_parsed_room();
        // The file is opened through /proc/PID/map_files/<range>: that is
        // the very file the process mapped, reached through the process, so
        // it works for processes in other mount namespaces (containers) and
        // for files deleted or replaced on disk since (upgrades, `cargo
        // build` over a running binary), where the path would give the new
        // file's symbols or nothing. It needs CAP_SYS_ADMIN (or, since 5.9,
        // CAP_CHECKPOINT_RESTORE), which a tracer loading eBPF usually has;
        // without it, /proc/PID/root/<path> still resolves the path in the
        // process's mount namespace, but only while the file is unchanged.
        let mut candidates = Vec::with_capacity(3);
        // First the copy held open, which outlives the process.
        if let Some(pin) = self.pins.get(&id) {
            candidates.push((pin.path(), false));
        }
        if !self.map_files_denied {
            candidates.push((m.map_files(pid), true));
        }
        if !deleted {
            candidates.push((procfs::in_root(pid, path), false));
        }
        for (candidate, via_map_files) in candidates {
            if let Some(&owner) = self.path_owner.get(&candidate)
                && owner != id
            {
                self.forget_path(&candidate);
            }
            match self.symbolize_in(&candidate, offset) {
                Ok(r) => {
                    self.path_owner.insert(candidate.clone(), id);
                    let state = self.bins.entry(id).or_default();
                    state.path = Some(candidate);
                    state.failed_at = None;
                    state.used_at = Some(now);
                    return Some(r);
                }
                Err(e) => {
                    debug!(
                        "cannot read {path} of process {pid} through {}: {e}",
                        candidate.display()
                    );
                    if via_map_files && e.kind() == ErrorKind::PermissionDenied {
                        self.map_files_denied = true;
                    }
                    self.forget_path(&candidate);
                }
            }
        }
        self.bins.entry(id).or_default().failed_at = Some(Instant::now());
        None
    }

    /// Symbolizes `offset` in a binary blazesym already has open.
    fn lookup(&mut self, path: &Path, offset: u64) -> Option<Resolved> {
        match self.symbolize_in(path, offset) {
            Ok(r) => Some(r),
            Err(e) => {
                debug!("cannot symbolize in {}: {e}", path.display());
                None
            }
        }
    }

    /// `offset` in the ELF file at `path`: its frames, innermost first.
    fn symbolize_in(&mut self, path: &Path, offset: u64) -> Result<Resolved, blazesym::Error> {
        let syms = self
            .blaze
            .symbolize(&Source::Elf(Elf::new(path)), Input::FileOffset(&[offset]))?;
        let Some(sym) = syms.first().and_then(Symbolized::as_sym) else {
            return Ok(Rc::from([]));
        };
        let mut frames = frames_of(sym);
        // Minimal debug info (Rust's `debug = "line-tables-only"`) names a
        // function without its path (`park_condvar`), where the symbol
        // table has it whole: the park detector and the culprit both need
        // the path. Inlined callees exist in the debug info only. A name
        // with no source location came from the symbol table already (a C
        // library without debug info): no second lookup for it.
        if let Some(outer) = frames.last_mut()
            && outer.file.is_some()
            && outer.function.as_deref().is_some_and(|f| !f.contains("::"))
            && let Some(full) = self.symtab_name(path, offset)
        {
            outer.function = Some(full);
        }
        Ok(frames.into())
    }

    /// The function at `offset` in `path` by its symbol table alone, when
    /// that name has a path (`::`).
    fn symtab_name(&mut self, path: &Path, offset: u64) -> Option<String> {
        let mut elf = Elf::new(path);
        elf.debug_syms = false;
        let syms = self
            .blaze
            .symbolize(&Source::Elf(elf), Input::FileOffset(&[offset]))
            .ok()?;
        let name = syms.first()?.as_sym()?.name.to_string();
        name.contains("::").then_some(name)
    }

    /// Drops what blazesym keeps for `path`, and the binary that path stood
    /// for forgets it (it will be reopened through a live process).
    fn forget_path(&mut self, path: &Path) {
        if let Err(e) = self
            .blaze
            .evict(&bz::evict::Evict::Elf(bz::evict::Elf::new(path)))
        {
            debug!("cannot evict {}: {e}", path.display());
        }
        if let Some(owner) = self.path_owner.remove(path) {
            if let Some(state) = self.bins.get_mut(&owner) {
                state.path = None;
            }
            // With the file closed its inode number may be reused by
            // another file, which would then hit these entries.
            self.frames.forget(Binary::File(owner));
        }
    }

    /// Symbolizes `offset` in a process's vDSO of `len` bytes, using our own
    /// vDSO: the kernel maps one image into every 64-bit process.
    fn resolve_vdso(&mut self, len: u64, offset: u64) -> Option<Resolved> {
        if let Vdso::Unknown = self.vdso {
            self.vdso = self.find_own_vdso();
        }
        let Vdso::Ready {
            start,
            len: own_len,
        } = self.vdso
        else {
            return None;
        };
        // A different size means another image (a 32-bit process).
        if len != own_len {
            return None;
        }
        let mut src = Process::new(Pid::Slf);
        src.debug_syms = false;
        src.perf_map = false;
        src.map_files = false;
        src.vdso = true;
        match self
            .blaze
            .symbolize(&Source::Process(src), Input::AbsAddr(&[start + offset]))
        {
            Ok(syms) => Some(resolved(syms.first())),
            Err(e) => {
                debug!("cannot symbolize in the vDSO: {e}");
                None
            }
        }
    }

    fn find_own_vdso(&mut self) -> Vdso {
        let Some(maps) = read_maps(std::process::id()) else {
            return Vdso::Unavailable;
        };
        let Some(m) = maps.iter().find(|m| matches!(m.kind, MapKind::Vdso)) else {
            return Vdso::Unavailable;
        };
        // blazesym would otherwise read /proc/self/maps on each lookup.
        let mut cache = bz::cache::Process::new(Pid::Slf);
        cache.cache_vmas = true;
        cache.cache_perf_map = false;
        if let Err(e) = self.blaze.cache(&bz::cache::Cache::Process(cache)) {
            debug!("cannot cache our own maps: {e}");
            return Vdso::Unavailable;
        }
        Vdso::Ready {
            start: m.start,
            len: m.end - m.start,
        }
    }
}

/// Two snapshots map the same things at the same places.
fn same_maps(a: &[Mapping], b: &[Mapping]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            (x.start, x.end, x.offset, x.exec) == (y.start, y.end, y.offset, y.exec)
                && match (&x.kind, &y.kind) {
                    (MapKind::File { id: i, .. }, MapKind::File { id: j, .. }) => i == j,
                    (MapKind::Vdso, MapKind::Vdso) | (MapKind::Anon(_), MapKind::Anon(_)) => true,
                    _ => false,
                }
        })
}

/// Functions a thread's or a program's stack starts in (glibc, musl and
/// Rust's std on Linux x86-64).
pub fn is_root_function(name: &str) -> bool {
    matches!(
        name,
        "_start"
            | "__clone3"
            | "clone3"
            | "__clone"
            | "clone"
            | "start_thread"
            | "__libc_start_main"
    ) || name.starts_with("__libc_start_main")
        || name.starts_with("__libc_start_call_main")
}

fn resolved(sym: Option<&Symbolized<'_>>) -> Resolved {
    match sym.and_then(Symbolized::as_sym) {
        Some(sym) => frames_of(sym).into(),
        None => Rc::from([]),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Child, Command, Stdio};

    use super::*;

    #[inline(never)]
    fn marker_function(x: u64) -> u64 {
        std::hint::black_box(x.wrapping_mul(0x5eed_f00d).rotate_left(7))
    }

    fn marker_addr() -> u64 {
        let f: fn(u64) -> u64 = marker_function;
        f as usize as u64
    }

    const MARKER: &str = "blockwatch::stacks::symbolize::tests::marker_function";

    fn me() -> u32 {
        std::process::id()
    }

    fn exe() -> String {
        std::env::current_exe()
            .unwrap()
            .canonicalize()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }

    /// The frame of each input address (inlined callees left out).
    fn outer(frames: &[Frame]) -> Vec<&Frame> {
        frames.iter().filter(|f| !f.inlined).collect()
    }

    #[test]
    fn frame_cache_is_bounded_and_keeps_what_is_used() {
        let mut cache = FrameCache::new(2);
        let r: Resolved = Rc::from([]);
        let k = |o| (Binary::Vdso, o);
        cache.insert(k(1), Rc::clone(&r));
        cache.insert(k(2), Rc::clone(&r));
        cache.insert(k(3), Rc::clone(&r)); // 1 and 2 become old
        assert!(cache.get(k(1)).is_some()); // 1 is used: current again
        cache.insert(k(4), Rc::clone(&r)); // current {3, 1} full: old
        cache.insert(k(5), Rc::clone(&r));
        assert!(cache.get(k(2)).is_none(), "dropped with its generation");
        assert!(cache.get(k(1)).is_some());
        assert!(cache.current.len() + cache.old.len() <= 4);
    }

    #[test]
    fn own_function_and_module() {
        let mut s = Symbolizer::new();
        let frames = s.symbolize(me(), &[marker_addr()]);
        let f = outer(&frames)[0];
        assert_eq!(f.function.as_deref(), Some(MARKER), "{frames:?}");
        assert_eq!(f.module.as_deref(), Some(exe().as_str()));
        assert_eq!(f.address, marker_addr());
        assert_eq!(s.failures(), 0);
    }

    /// An idle binary is released, its frames stay (it is pinned), and
    /// an address not resolved yet parses it again.
    #[test]
    fn idle_binaries_are_released_and_parsed_again() {
        let mut s = Symbolizer::new();
        let first = s.symbolize(me(), &[marker_addr()]);
        assert_eq!(s.parsed(), 1);
        s.release_idle(Instant::now());
        assert_eq!((s.parsed(), s.evictions()), (1, 0), "used just now");
        s.release_idle(Instant::now() + PARSED_IDLE);
        assert_eq!((s.parsed(), s.evictions()), (0, 1));
        assert_eq!(s.symbolize(me(), &[marker_addr()]), first, "from the cache");
        assert_eq!(s.parsed(), 0);
        let f: fn() -> String = exe;
        let other = s.symbolize(me(), &[f as usize as u64]);
        assert!(other[0].function.is_some(), "{other:?}");
        assert_eq!(s.parsed(), 1);
        assert_eq!(s.failures(), 0);
    }

    #[test]
    fn libc_function() {
        // SAFETY: a NUL-terminated name; dlsym has no other precondition.
        let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"getpid".as_ptr()) } as u64;
        assert_ne!(addr, 0);
        let mut s = Symbolizer::new();
        let frames = s.symbolize(me(), &[addr]);
        let f = outer(&frames)[0];
        // glibc's getpid has aliases (__getpid, and __GI_getpid in its
        // debug info when that is installed).
        assert!(
            f.function
                .as_deref()
                .unwrap_or_default()
                .ends_with("getpid"),
            "{frames:?}"
        );
        let module = f.module.as_deref().unwrap();
        let base = module.rsplit('/').next().unwrap();
        assert!(
            base.starts_with("libc.") || base.starts_with("libc-"),
            "{module}"
        );
        assert_eq!(
            s.function_at(me(), addr + 1).as_deref(),
            f.function.as_deref()
        );
    }

    #[test]
    fn function_at_exact_address() {
        let mut s = Symbolizer::new();
        assert_eq!(s.function_at(me(), marker_addr()).as_deref(), Some(MARKER));
        assert_eq!(
            s.function_at(me(), marker_addr() + 2).as_deref(),
            Some(MARKER)
        );
        assert_eq!(s.failures(), 0);
        assert_eq!(s.function_at(me(), 8), None);
        assert_eq!(s.failures(), 1);
    }

    #[test]
    fn return_addresses_are_looked_up_one_byte_earlier() {
        let mut s = Symbolizer::new();
        let a = marker_addr();
        // #0 is exact; #1 and #2 are return addresses: a+1 is a call ending
        // at a, in the marker; a is a call ending before the marker.
        let frames = s.symbolize(me(), &[a, a + 1, a]);
        let o = outer(&frames);
        assert_eq!(o.len(), 3, "{frames:?}");
        assert_eq!(o[0].function.as_deref(), Some(MARKER));
        assert_eq!(o[1].function.as_deref(), Some(MARKER));
        assert_ne!(o[2].function.as_deref(), Some(MARKER));
        assert_eq!(
            o.iter().map(|f| f.address).collect::<Vec<_>>(),
            [a, a + 1, a],
            "addresses are reported as captured"
        );
    }

    #[test]
    fn code_or_not() {
        let mut s = Symbolizer::new();
        let heap = Box::new(42u64);
        let local = 7u64;
        assert!(s.is_code(me(), marker_addr()));
        assert!(!s.is_code(me(), &*heap as *const u64 as u64));
        assert!(!s.is_code(me(), &local as *const u64 as u64));
        assert!(!s.is_code(me(), 0));
        // SAFETY: a vDSO-provided value with no preconditions.
        let vdso = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) };
        if vdso != 0 {
            assert!(!s.is_code(me(), vdso), "the vDSO is not file-backed");
        }
    }

    /// Our vDSO's base and its clock_gettime, when the libc exposes them.
    fn own_vdso_clock() -> Option<(u64, u64)> {
        // SAFETY: getauxval has no preconditions; dlopen and dlsym get
        // NUL-terminated names, and glibc registers the vDSO as a loaded
        // object that RTLD_NOLOAD finds without loading anything.
        unsafe {
            let base = libc::getauxval(libc::AT_SYSINFO_EHDR);
            let handle = libc::dlopen(
                c"linux-vdso.so.1".as_ptr(),
                libc::RTLD_LAZY | libc::RTLD_NOLOAD,
            );
            if base == 0 || handle.is_null() {
                return None;
            }
            let clock = libc::dlsym(handle, c"__vdso_clock_gettime".as_ptr()) as u64;
            (clock != 0).then_some((base, clock))
        }
    }

    #[test]
    fn vdso_addresses() {
        let Some((base, clock)) = own_vdso_clock() else {
            eprintln!("no vDSO symbols from the libc: skipped");
            return;
        };
        let mut s = Symbolizer::new();
        // #1 is a return address: looked up at clock.
        let frames = s.symbolize(me(), &[base + 1, clock + 1]);
        assert_eq!(frames[0].module.as_deref(), Some("[vdso]"));
        assert_eq!(frames[1].module.as_deref(), Some("[vdso]"));
        let name = frames[1].function.as_deref().unwrap_or_default();
        assert!(name.ends_with("clock_gettime"), "{frames:?}");
    }

    #[test]
    fn missing_process_gives_unknown_frames() {
        let mut s = Symbolizer::new();
        // Above any pid_max (at most 2^22).
        let pid = u32::MAX - 1;
        let ips = [marker_addr(), 0x1000, 0x7fff_0000_0000];
        let frames = s.symbolize(pid, &ips);
        assert_eq!(frames.len(), ips.len());
        for (f, ip) in frames.iter().zip(ips) {
            assert_eq!(f.address, ip);
            assert_eq!(f.function, None);
            assert_eq!(f.module, None);
        }
        assert_eq!(s.failures(), 3);
        assert!(!s.is_code(pid, marker_addr()));
        assert_eq!(s.function_at(pid, marker_addr()), None);
    }

    /// Maps this test binary a second time, whole, at an address of the
    /// kernel's choosing: resolution goes by file offset, and a mapping made
    /// after the snapshot is seen after a refresh or an invalidation.
    #[test]
    fn new_mappings_and_file_offsets() {
        let file = std::fs::File::open(exe()).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        let mut lazy = Symbolizer::new();
        lazy.maps_refresh = Duration::from_secs(3600);
        lazy.young_maps_refresh = Duration::from_secs(3600);
        let mut eager = Symbolizer::new();
        eager.maps_refresh = Duration::ZERO;
        eager.young_maps_refresh = Duration::ZERO;
        let m = lazy.mapping(me(), marker_addr()).unwrap();
        let offset = marker_addr() - m.start + m.offset;
        assert!(eager.is_code(me(), marker_addr()));
        // SAFETY: a fresh private read-only mapping of a file we opened,
        // unmapped below and never dereferenced.
        let base = unsafe {
            use std::os::fd::AsRawFd as _;
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let copy = base as u64 + offset;

        assert!(!lazy.is_code(me(), copy), "the snapshot is not re-read yet");
        assert!(
            eager.is_code(me(), copy),
            "re-read on a miss once old enough"
        );
        lazy.forget(me());
        assert!(lazy.is_code(me(), copy));
        let frames = lazy.symbolize(me(), &[copy]);
        assert_eq!(outer(&frames)[0].function.as_deref(), Some(MARKER));
        assert_eq!(outer(&frames)[0].module.as_deref(), Some(exe().as_str()));
        // SAFETY: unmapping exactly what was mapped above.
        unsafe { libc::munmap(base, len) };
    }

    /// A fixture process built and started by a test, killed on drop.
    struct Fixture {
        child: Child,
        /// The addresses it printed.
        addrs: Vec<u64>,
        dir: tempfile::TempDir,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Fixture {
        /// Compiles `source` with `compiler args`, runs it and reads the
        /// hex addresses it prints on its first line. None when the
        /// compiler is not installed.
        fn start(compiler: &str, args: &[&str], file: &str, source: &str) -> Option<Fixture> {
            let dir = tempfile::tempdir().unwrap();
            let src = dir.path().join(file);
            std::fs::write(&src, source).unwrap();
            let bin = dir.path().join("fixture");
            let out = match Command::new(compiler)
                .args(args)
                .arg(&src)
                .arg("-o")
                .arg(&bin)
                .output()
            {
                Ok(out) => out,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    eprintln!("{compiler} not installed: skipped");
                    return None;
                }
                Err(e) => panic!("{compiler}: {e}"),
            };
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let mut child = Command::new(&bin)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            // The pipe stays open: a fixture that prints more must not die
            // of EPIPE before it is symbolized.
            BufReader::new(child.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            let addrs = line
                .split_whitespace()
                .map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap())
                .collect();
            Some(Fixture { child, addrs, dir })
        }

        fn pid(&self) -> u32 {
            self.child.id()
        }

        fn path(&self) -> PathBuf {
            self.dir.path().canonicalize().unwrap().join("fixture")
        }
    }

    const CPP_FIXTURE: &str = r#"#include <cstdio>
#include <sys/auxv.h>
namespace fixture {
__attribute__((noinline)) void *probe(int x) {
    void *r = __builtin_return_address(0);
    __asm__ volatile("" : : "r"(x) : "memory");
    return r;
}
inline __attribute__((always_inline)) void *inner(int x) {
    void *r = probe(x + 1); // INNER
    __asm__ volatile("" : : "r"(r) : "memory");
    return r;
}
__attribute__((noinline)) void *outer(int x) {
    void *r = inner(x * 2); // OUTER
    __asm__ volatile("" : : "r"(r) : "memory");
    return r;
}
}
int main(int argc, char **) {
    void *ret = fixture::outer(argc);
    std::printf("%p %p %lx\n", (void *)&fixture::probe, ret, getauxval(AT_SYSINFO_EHDR));
    std::fflush(stdout);
    std::getchar();
    return 0;
}
"#;

    fn line_of(source: &str, marker: &str) -> u32 {
        source.lines().position(|l| l.contains(marker)).unwrap() as u32 + 1
    }

    /// Another process, C++ with DWARF: demangled names, file:line, and the
    /// inlined callee as an extra frame before its caller.
    #[test]
    fn cpp_process_with_dwarf_and_inlining() {
        let Some(fx) = Fixture::start(
            "c++",
            &["-g", "-O1", "-fno-optimize-sibling-calls"],
            "fixture.cpp",
            CPP_FIXTURE,
        ) else {
            return;
        };
        let (probe, ret) = (fx.addrs[0], fx.addrs[1]);
        let mut s = Symbolizer::new();
        let frames = s.symbolize(fx.pid(), &[probe, ret]);
        let names: Vec<_> = frames
            .iter()
            .map(|f| (f.function.as_deref().unwrap_or("??"), f.inlined))
            .collect();
        assert_eq!(
            names,
            [
                ("fixture::probe(int)", false),
                ("fixture::inner(int)", true),
                ("fixture::outer(int)", false)
            ],
            "{frames:#?}"
        );
        let module = fx.path().to_string_lossy().into_owned();
        for f in &frames {
            assert_eq!(f.module.as_deref(), Some(module.as_str()));
            assert!(f.file.as_deref().unwrap().ends_with("fixture.cpp"), "{f:?}");
        }
        assert_eq!(frames[1].line, Some(line_of(CPP_FIXTURE, "// INNER")));
        assert_eq!(frames[2].line, Some(line_of(CPP_FIXTURE, "// OUTER")));
        assert_eq!(
            (frames[0].address, frames[1].address, frames[2].address),
            (probe, ret, ret)
        );
        assert_eq!(
            s.function_at(fx.pid(), ret - 1).as_deref(),
            Some("fixture::outer(int)")
        );
        assert_eq!(s.failures(), 0);

        // Its vDSO, through ours.
        if let Some((base, clock)) = own_vdso_clock() {
            let at = fx.addrs[2] + (clock - base);
            let frames = s.symbolize(fx.pid(), &[at]);
            assert_eq!(frames[0].module.as_deref(), Some("[vdso]"));
            let name = frames[0].function.as_deref().unwrap_or_default();
            assert!(name.ends_with("clock_gettime"), "{frames:?}");
        }
    }

    const RUST_FIXTURE: &str = r#"
pub mod deep {
    pub struct Thing(pub u64);
    impl Thing {
        #[inline(never)]
        pub fn work(&self) -> u64 { std::hint::black_box(self.0.wrapping_mul(31)) }
    }
}
fn main() {
    let f: fn(&deep::Thing) -> u64 = deep::Thing::work;
    println!("{:p}", f as *const ());
    std::hint::black_box(f(&deep::Thing(std::env::args().count() as u64)));
    let mut s = String::new();
    let _ = std::io::stdin().read_line(&mut s);
}
"#;

    /// `RUST_FIXTURE` built by rustc at opt-level 1 with `flags`, running.
    fn rust_fixture(flags: &[&str]) -> Option<Fixture> {
        let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
        let mut args = vec!["-C", "opt-level=1", "--edition", "2021"];
        args.extend_from_slice(flags);
        Fixture::start(&rustc, &args, "fixture.rs", RUST_FIXTURE)
    }

    fn map_files_readable() -> bool {
        let maps = read_maps(me()).unwrap();
        let m = maps
            .iter()
            .find(|m| matches!(m.kind, MapKind::File { .. }))
            .unwrap();
        std::fs::File::open(m.map_files(me())).is_ok()
    }

    /// Another process, Rust with v0 mangling, whose binary is deleted
    /// before it is symbolized, and which then exits.
    #[test]
    fn rust_v0_process_deleted_binary_and_exit() {
        let Some(mut fx) = rust_fixture(&["-C", "symbol-mangling-version=v0"]) else {
            return;
        };
        let work = fx.addrs[0];
        let path = fx.path();
        let mut s = Symbolizer::new();
        if map_files_readable() {
            std::fs::remove_file(&path).unwrap();
        }
        let frames = s.symbolize(fx.pid(), &[work]);
        assert_eq!(frames[0].module.as_deref(), Some(path.to_str().unwrap()));
        assert_eq!(
            frames[0].function.as_deref(),
            Some("<fixture::deep::Thing>::work"),
            "{frames:?}"
        );

        // The process exits: what was seen stays answerable, a fresh
        // symbolizer knows nothing and says so.
        fx.child.stdin.take().unwrap().write_all(b"\n").unwrap();
        fx.child.wait().unwrap();
        let again = s.symbolize(fx.pid(), &[work]);
        assert_eq!(again[0].function, frames[0].function);
        let mut fresh = Symbolizer::new();
        let gone = fresh.symbolize(fx.pid(), &[work]);
        assert_eq!(
            gone,
            [Frame {
                address: work,
                ..Frame::default()
            }]
        );
    }

    /// Rust built with `debug = "line-tables-only"`: its debug info names
    /// functions without their path (`work`), its symbol table with it.
    /// The path wins, for culprits and for recognising a runtime's park.
    #[test]
    fn minimal_debug_info_keeps_the_symbol_tables_path() {
        let Some(fx) = rust_fixture(&["-C", "debuginfo=line-tables-only"]) else {
            return;
        };
        let work = fx.addrs[0];
        let mut s = Symbolizer::new();
        let frames = s.symbolize(fx.pid(), &[work]);
        let outer = frames.iter().rev().find(|f| !f.inlined).unwrap();
        assert_eq!(
            outer.function.as_deref(),
            Some("fixture::deep::Thing::work"),
            "{frames:?}"
        );
        assert!(
            outer
                .file
                .as_deref()
                .is_some_and(|f| f.ends_with("fixture.rs")),
            "file and line still come from the debug info: {frames:?}"
        );
        assert_eq!(
            s.function_at(fx.pid(), work).as_deref(),
            Some("fixture::deep::Thing::work")
        );
    }

    /// A process seen once (its maps read, its binaries kept open) that
    /// then exits and whose binary is deleted is still symbolized, and so
    /// is its unwind input: the code mappings stay known and openable.
    #[test]
    fn process_observed_before_it_exits_is_symbolized_after() {
        let Some(mut fx) = rust_fixture(&[]) else {
            return;
        };
        let work = fx.addrs[0];
        let mut s = Symbolizer::new();
        s.observe(fx.pid());
        fx.child.stdin.take().unwrap().write_all(b"\n").unwrap();
        fx.child.wait().unwrap();
        std::fs::remove_file(fx.path()).unwrap();
        assert!(
            !Path::new(&format!("/proc/{}/maps", fx.pid())).exists(),
            "the fixture is gone"
        );
        let frames = s.symbolize(fx.pid(), &[work]);
        assert_eq!(
            frames[0].function.as_deref(),
            Some("fixture::deep::Thing::work"),
            "{frames:?}"
        );
        let (_, code) = s.code_mappings(fx.pid()).unwrap();
        let m = code
            .iter()
            .find(|m| m.start <= work && work < m.end)
            .unwrap();
        assert!(s.open(fx.pid(), m).is_some(), "the binary is still open");
    }
}
