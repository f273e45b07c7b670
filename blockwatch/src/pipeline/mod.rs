//! Kernel records in, events out: decode, learn runtime parks, build
//! stacks, classify. Shared by every front end (trace and daemon); it owns
//! nothing that is specific to one output.
//!
//! What it keeps per process (names, CPython state, maps snapshots,
//! unwinders, perf maps) goes in one [`Pipeline::forget`] when the process
//! execs or exits; what is keyed by binary (symbols, unwind tables) is
//! shared by every process and stays. Strict call sites go with their
//! thread ([`strict`]).

pub mod cache;
pub mod loops;
pub mod strict;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use log::{debug, info, warn};

use blockwatch_common::x86_64::NR_FUTEX;
use blockwatch_common::{
    LoopClock, PyFrameRef, PyProc, SiteCheck, SiteKey, StrictKey, StrictTally,
};

use crate::FastMap;
use crate::analyze::gil;
use crate::analyze::syscalls::{self, FdKind};
use crate::event::{Class, Detector, Episode, Event, Frame, OffState, Stack};
use crate::ingest::decode::{self, BlockRecord, LoopRecord, ProbeRecord, Record, StrictRecord};
use crate::procfs;
use crate::runtimes::python::{self, PyProcess};
use crate::runtimes::tokio as runtime;
use crate::stacks::builder::StackBuilder;
use crate::stacks::sites::{self, Sites};
use crate::targets::IdleLoop;
use cache::StackCache;
use loops::Loops;
use strict::{StrictCalls, StrictSites};

/// How long a watched process that is not (yet) recognisably CPython is
/// looked at again, at each refresh: a shared libpython is mapped only
/// after exec, by the dynamic loader, and a launcher (pyenv's shim) may
/// exec the interpreter. Bounded, so a host's other processes cost a few
/// /proc reads each, not one per refresh forever.
const PY_INSPECT_WINDOW: Duration = Duration::from_secs(30);
/// The gap between looks starts small (a program that blocks soon after
/// it starts gets its Python frames) and doubles up to this.
const PY_INSPECT_MAX_GAP: Duration = Duration::from_secs(2);

/// After a Python executable's exec, its shared libpython is mapped by the
/// loader a few milliseconds later: looked for this often...
const EXEC_RETRY_GAP: Duration = Duration::from_millis(5);
/// ...for this long (the interpreter's start-up, before any loop).
const EXEC_RETRY_FOR: Duration = Duration::from_secs(2);
/// A drain that found at least this many records, and caught up, was
/// woken by a busy ring buffer: the next read waits `BUSY_PAUSE` first, so
/// that records are read in batches, not one wake-up each (the kernel
/// wakes its reader for the first record after the reader caught up, and a
/// reader that always catches up is woken for every record). A reader
/// still behind (a full `DRAIN_BATCH`) reads on at once.
pub const BUSY_RECORDS: usize = 16;
/// Records read per drain at most.
pub const DRAIN_BATCH: usize = 4096;
pub const BUSY_PAUSE: Duration = Duration::from_millis(5);
/// A CPython loop's clock not found at its discovery is looked for again
/// this often, this many times (a second in all).
const CLOCK_RETRY_GAP: Duration = Duration::from_millis(20);
const CLOCK_TRIES: u32 = 50;

enum Interp {
    Python(Box<PyProcess>),
    Unknown {
        since: Instant,
        next: Instant,
        gap: Duration,
        given_up: bool,
    },
}

impl Interp {
    /// Not yet known to be CPython: looked at again from `now` on.
    fn unknown(now: Instant) -> Self {
        Interp::Unknown {
            since: now,
            next: now,
            gap: Duration::from_millis(100),
            given_up: false,
        }
    }
}

/// The kernel maps the pipeline writes what it learns to: the runtime
/// parks of futex-parking workers and the CPython interpreters; and the
/// strict counts, which it reads and deletes as threads go.
pub struct RuntimeMaps<'a> {
    pub parks: &'a mut BpfHashMap<MapData, u32, u64>,
    pub pyprocs: &'a mut BpfHashMap<MapData, u32, PyProc>,
    pub clocks: &'a mut BpfHashMap<MapData, u32, LoopClock>,
    pub strict: &'a mut BpfHashMap<MapData, StrictKey, StrictTally>,
    pub sites: &'a mut BpfHashMap<MapData, SiteKey, SiteCheck>,
    pub tags: crate::targets::TagMaps<'a>,
}

impl<'a> RuntimeMaps<'a> {
    /// The maps of a loaded session that the pipeline writes.
    pub fn of(maps: &'a mut crate::bpf::Maps) -> Self {
        Self {
            parks: &mut maps.parks,
            pyprocs: &mut maps.pyprocs,
            clocks: &mut maps.clocks,
            strict: &mut maps.strict_counts,
            sites: &mut maps.known_sites,
            tags: crate::targets::TagMaps {
                threads: &mut maps.threads,
                watched: &mut maps.watched,
                filter: &mut maps.tag_filter,
            },
        }
    }
}

/// What a record means to the front end.
#[derive(Debug)]
pub enum Output {
    Event(Box<Event>),
    /// Strict calls of one call site counted since the last read (the
    /// site's own event, once per stack, is an [`Output::Event`]).
    StrictCalls(Box<StrictCalls>),
    /// Process `pid` now runs a program named `comm`.
    Exec {
        pid: u32,
        comm: String,
    },
    /// Process `pid` is gone.
    ProcessExit {
        pid: u32,
    },
}

/// Counters a front end may report.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub events: u64,
    pub parks_learned: u64,
    pub decode_errors: u64,
    /// Strict calls (`--strict`) counted, and episodes (of `events`) that
    /// were mostly CPU work.
    pub strict: u64,
    pub stalls: u64,
    /// Episodes dropped because their parts did not add up.
    pub inconsistent: u64,
    /// CPU-bound episodes of loops whose clock was still being looked for.
    pub unclocked: u64,
    /// Episodes at a call site the kernel took for known and user space
    /// had forgotten (in flight across an exec): reported without their
    /// native frames.
    pub unknown_sites: u64,
    /// Loops the kernel reported found.
    pub loops_found: u64,
}

pub struct Pipeline {
    stacks: StackBuilder,
    /// The frames of call sites seen before, whose waits the kernel sends
    /// without stacks.
    sites: Sites,
    /// Stacks built before, by what they were built from.
    cache: StackCache,
    /// User-stack copies waiting for the record they belong to (the kernel
    /// sends a copy just before its episode or sample), by TID.
    user_stacks: FastMap<u32, decode::UserStackRecord>,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, to date kernel timestamps.
    wall_offset: Duration,
    process_names: FastMap<u32, String>,
    /// Futex parks learned per thread (TID -> PID, futex), to drop waits
    /// that raced the kernel map update.
    parks: HashMap<u32, (u32, u64)>,
    interps: FastMap<u32, Interp>,
    /// Processes that exec'd a Python executable whose interpreter is not
    /// found yet, with when to stop looking.
    exec_retries: HashMap<u32, Instant>,
    /// When to look at them again.
    exec_retry_at: Instant,
    loops: Loops,
    /// `BLOCKWATCH_NO_LOOP_CLOCK` is set: no iteration clock is looked for
    /// (the benchmark's measure of what reading them costs).
    no_clock: bool,
    /// Loop threads of CPython processes whose clock was not found yet:
    /// TID -> (PID, epoll fd, tries so far); and when to look again.
    clock_retries: HashMap<u32, (u32, i32, u32)>,
    clock_retry_at: Instant,
    /// Loop threads whose clock was handed to the kernel: TID -> (PID,
    /// `CLOCK_MONOTONIC` ns then). Their episodes that ended before were
    /// timed without it, from idle wait to idle wait, and may each span
    /// many iterations of a loop that rarely slept.
    clocked_at: HashMap<u32, (u32, u64)>,
    strict: StrictSites,
    /// Outputs of the record being handled beyond its own (strict counts
    /// read at a thread's exit), sent before it.
    queued: Vec<Output>,
    pub stats: Stats,
}

/// What every event says of where and when it happened, whichever
/// detector saw it.
struct Origin {
    pid: u32,
    tid: u32,
    thread: String,
    syscall: i64,
    start_ns: u64,
    duration_ns: u64,
    state: OffState,
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and timespec pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Default for Pipeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Pipeline {
    pub fn new() -> Self {
        let wall = clock_ns(libc::CLOCK_REALTIME);
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        Self {
            stacks: StackBuilder::new(),
            sites: Sites::new(),
            cache: StackCache::new(),
            user_stacks: FastMap::default(),
            wall_offset: Duration::from_nanos(wall.saturating_sub(mono)),
            process_names: FastMap::default(),
            parks: HashMap::new(),
            interps: FastMap::default(),
            exec_retries: HashMap::new(),
            exec_retry_at: Instant::now(),
            loops: Loops::new(),
            no_clock: std::env::var_os("BLOCKWATCH_NO_LOOP_CLOCK").is_some(),
            clock_retries: HashMap::new(),
            clocked_at: HashMap::new(),
            clock_retry_at: Instant::now(),
            strict: StrictSites::new(),
            queued: Vec::new(),
            stats: Stats::default(),
        }
    }

    /// Symbolization failures so far.
    pub fn symbol_failures(&self) -> u64 {
        self.stacks.symbol_failures()
    }

    pub fn symbolizer(&mut self) -> &mut crate::stacks::symbolize::Symbolizer {
        self.stacks.symbolizer()
    }

    /// Finds which of the watched processes `pids` run CPython and hands
    /// the kernel what it needs to walk their frames, and snapshots their
    /// memory maps (so that a process that exits right after blocking is
    /// still symbolized). Cheap to call periodically: a process is
    /// inspected a bounded number of times. The timer is the fallback;
    /// [`Pipeline::inspect_now`] runs at the moments that matter.
    pub fn refresh_interpreters(
        &mut self,
        pids: impl IntoIterator<Item = u32>,
        pyprocs: &mut BpfHashMap<MapData, u32, PyProc>,
    ) {
        for pid in pids {
            self.stacks.symbolizer().observe(pid);
            let now = Instant::now();
            let state = self
                .interps
                .entry(pid)
                .or_insert_with(|| Interp::unknown(now));
            let Interp::Unknown {
                since,
                next,
                gap,
                given_up,
            } = state
            else {
                continue;
            };
            if *given_up || now < *next || now.duration_since(*since) > PY_INSPECT_WINDOW {
                continue;
            }
            *next = now + *gap;
            *gap = (*gap * 2).min(PY_INSPECT_MAX_GAP);
            self.inspect(pid, pyprocs);
        }
    }

    /// Thread `l.tid` runs an event loop on `l.epfd`: found by the kernel
    /// at its first idle wait (`Record::LoopFound`), or asleep in that wait
    /// by the scan that watched its process. Its interpreter and its
    /// iteration clock are looked for now, before its first blocking call.
    pub fn loop_found(&mut self, l: IdleLoop, maps: &mut RuntimeMaps) {
        self.stats.loops_found += 1;
        debug!("tid {} of pid {} runs an event loop", l.tid, l.pid);
        self.inspect_now(l.pid, maps.pyprocs);
        self.find_clock(l.pid, l.tid, l.epfd, maps.clocks);
    }

    /// [`Pipeline::loop_found`] for each of the loops a watch found
    /// asleep in their wait.
    pub fn loops_found(&mut self, loops: Vec<IdleLoop>, maps: &mut RuntimeMaps) {
        for l in loops {
            self.loop_found(l, maps);
        }
    }

    /// Inspects process `pid` for CPython now, whatever the timer says:
    /// when its loop is first seen (the kernel's [`Record::LoopFound`]) or
    /// when it exec'd under watch. The kernel walks interpreter frames at
    /// a blocking call's switch-out, so the interpreter must be known
    /// before the loop's first blocking call, which may come a few
    /// milliseconds after its first idle wait.
    pub fn inspect_now(&mut self, pid: u32, pyprocs: &mut BpfHashMap<MapData, u32, PyProc>) {
        if matches!(self.interps.get(&pid), Some(Interp::Python(_))) {
            return;
        }
        self.stacks.symbolizer().observe(pid);
        self.interps
            .entry(pid)
            .or_insert_with(|| Interp::unknown(Instant::now()));
        self.inspect(pid, pyprocs);
    }

    /// A watched process exec'd: when it runs a Python executable, its
    /// interpreter is found now (linked in: Debian's python3) or within
    /// milliseconds, by [`Pipeline::retry_execs`], once the loader maps
    /// libpython (pyenv's builds). Either way before its loop runs, and
    /// the ELF files are parsed while nothing waits for them. Other
    /// programs cost one readlink; an embedder is found when the kernel
    /// reports its loop.
    pub fn inspect_at_exec(&mut self, pid: u32, pyprocs: &mut BpfHashMap<MapData, u32, PyProc>) {
        let python = procfs::exe(pid)
            .and_then(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy().starts_with("python"))
            })
            .unwrap_or(false);
        if !python {
            return;
        }
        self.inspect_now(pid, pyprocs);
        if !matches!(self.interps.get(&pid), Some(Interp::Python(_))) {
            let now = Instant::now();
            if self.exec_retries.is_empty() {
                self.exec_retry_at = now + EXEC_RETRY_GAP;
            }
            self.exec_retries.insert(pid, now + EXEC_RETRY_FOR);
        }
    }

    /// When [`Pipeline::retry_execs`] is next due, if anything waits (a
    /// fixed time, so a busy ring buffer does not keep pushing it back).
    pub fn exec_retry_due(&self) -> Option<Instant> {
        (!self.exec_retries.is_empty()).then_some(self.exec_retry_at)
    }

    /// Looks again at the processes [`Pipeline::inspect_at_exec`] has not
    /// found an interpreter in yet.
    pub fn retry_execs(&mut self, pyprocs: &mut BpfHashMap<MapData, u32, PyProc>) {
        let now = Instant::now();
        self.exec_retry_at = now + EXEC_RETRY_GAP;
        let pids: Vec<u32> = self.exec_retries.keys().copied().collect();
        for pid in pids {
            let found = matches!(self.interps.get(&pid), Some(Interp::Python(_)));
            let expired = self.exec_retries.get(&pid).is_none_or(|&end| end < now);
            if found || expired || !procfs::exists(pid) {
                self.exec_retries.remove(&pid);
                continue;
            }
            self.inspect_now(pid, pyprocs);
        }
    }

    /// One look at process `pid`, whose state is `Interp::Unknown`.
    fn inspect(&mut self, pid: u32, pyprocs: &mut BpfHashMap<MapData, u32, PyProc>) {
        let Some(state) = self.interps.get_mut(&pid) else {
            return;
        };
        match python::inspect(pid) {
            Ok(Some(py)) => {
                let (major, minor) = py.version;
                let entry = PyProc {
                    runtime: py.runtime_addr,
                    offsets: py.offsets,
                };
                match pyprocs.insert(pid, entry, 0) {
                    Ok(()) => {
                        info!("pid {pid} runs CPython {major}.{minor}: interpreter frames on")
                    }
                    Err(e) => warn!("cannot hand pid {pid}'s interpreter to the kernel: {e}"),
                }
                *state = Interp::Python(Box::new(py));
            }
            Ok(None) => {}
            Err(e) => {
                debug!("pid {pid}: {e}");
                if let Interp::Unknown { given_up, .. } = state {
                    *given_up = true;
                }
            }
        }
    }

    /// Finds the iteration clock of the loop `tid` was just found to run
    /// (its idle wait on `epfd`) and hands it to the kernel, which then
    /// sees that loop's iterations end even when it never sleeps. Found
    /// anew for each new loop: the kernel drops a thread's clock when its
    /// loop ends.
    fn find_clock(
        &mut self,
        pid: u32,
        tid: u32,
        epfd: i32,
        clocks: &mut BpfHashMap<MapData, u32, LoopClock>,
    ) {
        if self.no_clock {
            return;
        }
        let python = python_of(&self.interps, pid);
        let Some(clock) = crate::runtimes::clock::find(pid, tid, epfd, python) else {
            debug!("tid {tid} of pid {pid}: no iteration clock known");
            // A CPython thread's frames are read while it runs: a chain
            // caught mid-change hides `_run_once` now, not next time.
            if python.is_some() {
                let tries = self.clock_retries.get(&tid).map_or(0, |r| r.2) + 1;
                if tries <= CLOCK_TRIES {
                    self.clock_retries.insert(tid, (pid, epfd, tries));
                }
            }
            return;
        };
        self.clock_retries.remove(&tid);
        info!(
            "tid {tid} of pid {pid}: iteration clock found ({})",
            crate::runtimes::clock::describe(&clock)
        );
        debug!("tid {tid}: {clock:?}");
        match clocks.insert(tid, clock, 0) {
            Ok(()) => {
                if let Some(now) = crate::runtimes::clock::monotonic_ns() {
                    self.clocked_at.insert(tid, (pid, now));
                }
            }
            Err(e) => warn!("cannot hand the loop clock of tid {tid} to the kernel: {e}"),
        }
    }

    /// Drains the records the kernel has written, at most `DRAIN_BATCH`,
    /// handing each output to `out`; how many records there were. Bounded
    /// so that a kernel writing as fast as they are read cannot keep the
    /// caller from its signals and timers: a busy ring buffer is readable
    /// again at once.
    pub fn drain(
        &mut self,
        ring: &mut RingBuf<MapData>,
        maps: &mut RuntimeMaps,
        mut out: impl FnMut(Output),
    ) -> usize {
        let mut records = 0;
        while records < DRAIN_BATCH
            && let Some(item) = ring.next()
        {
            records += 1;
            let output = self.process(&item, maps);
            // Release the ring-buffer slot before the (slow) output.
            drop(item);
            for o in self.queued.drain(..) {
                out(o);
            }
            if let Some(o) = output {
                out(o);
            }
        }
        records
    }

    /// Reads the kernel's strict counts: each call site's calls since the
    /// last read (see [`strict`] for when). Drain the ring buffer first,
    /// so the sites' records are in.
    pub fn read_strict(
        &mut self,
        map: &mut BpfHashMap<MapData, StrictKey, StrictTally>,
        mode: strict::Read,
        mut out: impl FnMut(Output),
    ) {
        let mut sites = std::mem::take(&mut self.strict);
        let alive = |pid, tid| procfs::thread_exists(pid, tid);
        let calls = sites.read(map, mode, alive, |k| self.unknown_site(k));
        self.strict = sites;
        for c in calls {
            self.stats.strict += c.calls;
            out(Output::StrictCalls(Box::new(c)));
        }
    }

    /// Queues the last strict counts of thread `tid` (`pid` None) or of
    /// process `pid`'s old program, read before they are deleted.
    fn strict_last(
        &mut self,
        map: &mut BpfHashMap<MapData, StrictKey, StrictTally>,
        tid: u32,
        pid: Option<u32>,
    ) {
        let mut sites = std::mem::take(&mut self.strict);
        let calls = match pid {
            None => sites.thread_exit(map, tid, |k| self.unknown_site(k)),
            Some(pid) => sites.exec(map, pid, |k| self.unknown_site(k)),
        };
        self.strict = sites;
        for c in calls {
            self.stats.strict += c.calls;
            self.queued.push(Output::StrictCalls(Box::new(c)));
        }
    }

    /// Looks again for the clocks not found at their loop's discovery, at
    /// most every `CLOCK_RETRY_GAP` (called with each record, which a loop
    /// without its clock keeps coming).
    fn retry_clocks(&mut self, clocks: &mut BpfHashMap<MapData, u32, LoopClock>) {
        let now = Instant::now();
        if self.clock_retries.is_empty() || now < self.clock_retry_at {
            return;
        }
        self.clock_retry_at = now + CLOCK_RETRY_GAP;
        let due: Vec<_> = self
            .clock_retries
            .iter()
            .map(|(&tid, &(pid, epfd, _))| (pid, tid, epfd))
            .collect();
        for (pid, tid, epfd) in due {
            self.find_clock(pid, tid, epfd, clocks);
        }
    }

    /// Handles one record.
    pub fn process(&mut self, bytes: &[u8], maps: &mut RuntimeMaps) -> Option<Output> {
        self.retry_clocks(maps.clocks);
        let record = match decode::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.stats.decode_errors += 1;
                debug!("undecodable record: {e}");
                return None;
            }
        };
        match record {
            Record::Block(b) => self
                .block(b, maps.sites)
                .map(|e| Output::Event(Box::new(e))),
            Record::UserStack(u) => {
                self.user_stacks.insert(u.tid, u);
                None
            }
            Record::Probe(p) => {
                self.probe(p, maps.parks);
                None
            }
            Record::LoopFound { pid, tid, epfd } => {
                self.loop_found(IdleLoop { pid, tid, epfd }, maps);
                None
            }
            Record::Strict(r) => Some(Output::Event(Box::new(self.strict_site(r)))),
            Record::Loop(l) => {
                self.sample(l);
                None
            }
            Record::Exec { pid, comm, .. } => {
                self.strict_last(maps.strict, 0, Some(pid));
                self.sites.forget(pid, maps.sites);
                self.forget(pid);
                self.process_names.insert(pid, comm.clone());
                Some(Output::Exec { pid, comm })
            }
            Record::Exit {
                pid,
                tid,
                group_dead,
            } => {
                maps.tags.thread_exited(tid);
                self.parks.remove(&tid);
                self.user_stacks.remove(&tid);
                self.loops.thread_exit(tid);
                self.clocked_at.remove(&tid);
                self.strict_last(maps.strict, tid, None);
                // Kept until the whole process is gone so that its other
                // threads' late events still carry its name and symbols.
                group_dead.then(|| {
                    self.sites.forget(pid, maps.sites);
                    self.forget(pid);
                    Output::ProcessExit { pid }
                })
            }
        }
    }

    /// Process `pid` exec'd or exited: drops exactly what was kept of it
    /// (the next look at a new program starts afresh), and nothing of
    /// other processes.
    pub fn forget(&mut self, pid: u32) {
        self.stacks.forget(pid);
        self.interps.remove(&pid);
        self.exec_retries.remove(&pid);
        self.process_names.remove(&pid);
        self.parks.retain(|_, (p, _)| *p != pid);
        self.user_stacks.retain(|_, u| u.pid != pid);
        self.clock_retries.retain(|_, r| r.0 != pid);
        self.clocked_at.retain(|_, c| c.0 != pid);
        self.loops.forget_process(pid);
    }

    /// A reported episode, unless its only wait is a runtime park that
    /// raced the kernel map update.
    fn block(&mut self, b: BlockRecord, known: &mut KnownSitesMap) -> Option<Event> {
        let copy = self
            .user_stacks
            .remove(&b.tid)
            .filter(|u| b.waits != 0 && u.start_ns == b.wait_start_ns);
        // A record that brings its wait's stacks whole is learned from
        // before anything else, whatever becomes of its episode (dropped,
        // or named by its CPU samples): the kernel counts the site as
        // known from this send on (`SENT_SITES`), so its next waits come
        // without stacks, and user space must have them.
        let learned =
            (!b.site_known && copy.is_some()).then(|| self.wait_stack(&b, copy.as_ref(), known));
        if b.waits == 1
            && b.syscall == NR_FUTEX
            && self.parks.get(&b.tid).map(|p| p.1) == Some(b.args[0])
        {
            return None;
        }
        // Where the time went adds up to the wall time, within the gaps
        // an iteration boundary leaves. An episode whose parts come to less
        // than half of it lost track of a wait (seen under load, with a
        // thread's tag rewritten while it slept): its wall time cannot be
        // trusted, and it is dropped rather than reported as CPU work.
        let parts = b.run_ns + b.off_ns.iter().sum::<u64>();
        if parts.saturating_mul(2) < b.duration_ns {
            let (samples, _) = self.loops.take_samples(b.tid, b.start_ns);
            let last = samples.last().map_or(String::new(), |s| {
                format!(
                    "; its last sample saw {} µs on CPU of {} µs",
                    s.duration_ns / 1000,
                    s.busy_ns / 1000
                )
            });
            warn!(
                "episode of tid {} dropped, its parts do not add up: {} µs on CPU, \
                 {:?} µs off (sleeping, disk, preempted) of {} µs; {} waits, {} samples{last}",
                b.tid,
                b.run_ns / 1000,
                b.off_ns.map(|n| n / 1000),
                b.duration_ns / 1000,
                b.waits,
                b.samples,
            );
            self.stats.inconsistent += 1;
            return None;
        }
        let (samples, taken) = self.loops.take_samples(b.tid, b.start_ns);
        let episode = Episode {
            cpu_ns: b.run_ns,
            sleeping_ns: b.off_ns[0],
            disk_ns: b.off_ns[1],
            preempted_ns: b.off_ns[2],
            waits: b.waits,
            longest_wait_ns: b.wait_ns,
            samples: taken.max(b.samples),
        };
        // The loop wanted the CPU more than it waited: preemption is time
        // lost while running (a long callback is what the scheduler
        // preempts), so it counts with the CPU. Then CPU work took the
        // largest share, and the stack most samples share names it, not
        // whatever the loop last waited on; unless the loop barely ran
        // and was mostly kept off the CPU, the host's doing: then its
        // longest wait names it, with the preemption in its breakdown.
        // Preemptions carry no stacks (the kernel takes none for them),
        // so an episode with no other wait is named by its samples.
        let waited = episode.sleeping_ns + episode.disk_ns;
        let mostly_cpu = b.wait_ns == 0
            || (episode.cpu_ns + episode.preempted_ns > waited
                && episode.cpu_ns * 4 >= episode.preempted_ns);
        // A loop without its clock yet cannot have its iterations told
        // apart: a CPU-bound "episode" may be many of them (a busy Node
        // server's, ended by a sleep before its clock was handed over; a
        // CPython loop's whose clock is still being looked for). Its waits
        // are still reported. (The one its clock's first read ends is
        // reported: it is where a long callback under way was cut.)
        let before_clock = self
            .clocked_at
            .get(&b.tid)
            .is_some_and(|&(_, at)| b.start_ns.saturating_add(b.duration_ns) <= at);
        if mostly_cpu && (before_clock || self.clock_retries.contains_key(&b.tid)) {
            debug!(
                "CPU-bound episode of tid {} not reported: its loop's clock is not found yet",
                b.tid
            );
            self.stats.unclocked += 1;
            return None;
        }
        self.stats.events += 1;
        let mut ev = if mostly_cpu && (!samples.is_empty() || b.wait_ns == 0) {
            self.stats.stalls += 1;
            self.cpu_bound(b, samples)
        } else {
            let stack = match learned {
                Some(stack) => stack,
                None => self.wait_stack(&b, copy.as_ref(), known),
            };
            self.enrich(b, stack)
        };
        ev.episode = Some(episode);
        Some(ev)
    }

    /// An episode that was mostly CPU work, named by its samples: their
    /// most common culprit, and the syscall most of them were in, if any
    /// (CPU time the kernel spends for a call, such as a large read copying
    /// from the page cache, is that call's).
    fn cpu_bound(&mut self, b: BlockRecord, samples: Vec<LoopRecord>) -> Event {
        let samples_taken = samples.len();
        let in_call = sampled_syscall(&samples);
        // Named by a call: its stack is one of the samples in that call.
        let symbolized: Vec<_> = samples
            .iter()
            .filter(|s| in_call.is_none_or(|(nr, _)| s.syscall == nr))
            .map(|s| {
                let stack = self.stack(s.pid, &s.ips, &s.py);
                let culprit = stack.culprit().clone();
                (stack, culprit)
            })
            .collect();
        let (stack, culprit) = loops::pick_stall_stack(symbolized);
        let class = match in_call {
            Some((nr, args)) => {
                let fd_kind = syscalls::fd_arg(nr, &args)
                    .and_then(|fd| procfs::with_fd_target(b.pid, fd, FdKind::from_link_bytes));
                syscalls::refine_by_stack(syscalls::classify(nr, &args, fd_kind), &stack)
            }
            None => Class::Stall,
        };
        let origin = Origin {
            pid: b.pid,
            tid: b.tid,
            thread: b.thread,
            syscall: in_call.map_or(-1, |c| c.0),
            start_ns: b.start_ns,
            duration_ns: b.duration_ns,
            state: stall_state(b.run_ns, b.off_ns[2], samples_taken),
        };
        self.event(origin, class, Detector::Stall, stack, culprit)
    }

    /// A futex wait to tell apart: a runtime's park is learned and handed
    /// to the kernel, which treats it as idle from then on.
    fn probe(&mut self, p: ProbeRecord, parks_map: &mut BpfHashMap<MapData, u32, u64>) {
        if !runtime::probe_is_park(self.stacks.symbolizer(), &p) {
            return;
        }
        // Probes sent before the kernel had the first answer say it again:
        // told once, handed over each time (the kernel may have dropped it).
        if self.parks.insert(p.tid, (p.pid, p.uaddr)) != Some((p.pid, p.uaddr)) {
            info!(
                "tid {} parks on futex {:#x}: a runtime's idle wait",
                p.tid, p.uaddr
            );
            self.stats.parks_learned += 1;
        }
        if let Err(e) = parks_map.insert(p.tid, p.uaddr, 0) {
            warn!("cannot record the park of tid {}: {e}", p.tid);
        }
    }

    fn process_name(&mut self, pid: u32, fallback: &str) -> String {
        self.process_names
            .entry(pid)
            .or_insert_with(|| procfs::comm(pid).unwrap_or_else(|| fallback.to_string()))
            .clone()
    }

    /// The frames of an episode's longest wait: those of its call site
    /// when the kernel left its native stack out as known, else built from
    /// the stacks sent, and then its site's from now on.
    fn wait_stack(
        &mut self,
        b: &BlockRecord,
        copy: Option<&decode::UserStackRecord>,
        known: &mut KnownSitesMap,
    ) -> Stack {
        if b.site_known {
            if let Some(stack) = self.sites.get(b.pid, b.site) {
                return stack.clone();
            }
            // Forgotten here while its record was in flight: its next wait
            // sends its stacks again.
            self.stats.unknown_sites += 1;
            self.sites.unlearn(b.pid, b.site, known);
            return self.stack(b.pid, &b.ips, &b.py);
        }
        let ips = self.stacks.native(b.pid, &b.ips, copy);
        let stack = self.stack(b.pid, &ips, &b.py);
        // Only a stack that came whole is reused: without its copy it was
        // unwound by frame pointers alone (and the kernel, knowing, sends
        // the site's next wait whole).
        if let Some(c) = copy {
            let check = sites::site_check(c, &ips);
            self.sites.learn(b.pid, b.site, &stack, check, known);
        }
        stack
    }

    fn enrich(&mut self, b: BlockRecord, stack: Stack) -> Event {
        // Only read/write-style calls need the fd's kind (a socket read is
        // network, a file read is disk); they are few, as events are.
        let fd_kind = syscalls::fd_arg(b.syscall, &b.args)
            .and_then(|fd| procfs::with_fd_target(b.pid, fd, FdKind::from_link_bytes));
        let runtime = python_of(&self.interps, b.pid).and_then(PyProcess::runtime);
        let class = gil::refine(
            syscalls::refine_by_stack(syscalls::classify(b.syscall, &b.args, fd_kind), &stack),
            b.syscall,
            b.args[0],
            runtime,
        );
        let culprit = stack.culprit().clone();
        let origin = Origin {
            pid: b.pid,
            tid: b.tid,
            thread: b.thread,
            syscall: b.syscall,
            start_ns: b.start_ns,
            duration_ns: b.duration_ns,
            state: b.state,
        };
        self.event(origin, class, Detector::Offcpu, stack, culprit)
    }

    fn event(
        &mut self,
        o: Origin,
        class: Class,
        detector: Detector,
        stack: Stack,
        culprit: Option<Frame>,
    ) -> Event {
        let offender = stack.offender().clone();
        let syscall = syscalls::name(o.syscall);
        let advice = stack.advice(class, syscall, o.state, &o.thread);
        Event {
            ts: SystemTime::UNIX_EPOCH + self.wall_offset + Duration::from_nanos(o.start_ns),
            pid: o.pid,
            tid: o.tid,
            comm: self.process_name(o.pid, &o.thread),
            thread: o.thread,
            syscall,
            syscall_nr: o.syscall,
            class,
            duration_ns: o.duration_ns,
            state: o.state,
            advice,
            stack,
            culprit,
            offender,
            detector,
            episode: None,
        }
    }

    /// The frames of a stack of process `pid`, for every detector's events.
    fn stack(&mut self, pid: u32, ips: &[u64], py: &[PyFrameRef]) -> Stack {
        let interp = python_of(&self.interps, pid);
        let generation = self.stacks.maps_generation(pid);
        let key = generation.map(|generation| cache::Key {
            pid,
            python: interp.is_some(),
            generation,
            ips,
            py,
        });
        if let Some(stack) = key.as_ref().and_then(|k| self.cache.get(k)) {
            self.stacks.skip_copy();
            return stack;
        }
        let (frames, reusable) = self.stacks.frames(pid, ips, py, interp);
        let stack = Stack::new(frames);
        // The snapshot the frames came from: symbolizing may have taken a
        // new one (a library mapped since), and then they belong to that.
        let generation = self.stacks.maps_generation(pid);
        if let (Some(key), true) = (key, reusable)
            && Some(key.generation) == generation
        {
            self.cache.insert(&key, &stack);
        }
        stack
    }
}

/// The kernel's map of known call sites.
type KnownSitesMap = BpfHashMap<MapData, SiteKey, SiteCheck>;

/// Process `pid`'s interpreter, when it is known to run CPython.
fn python_of(interps: &FastMap<u32, Interp>, pid: u32) -> Option<&PyProcess> {
    match interps.get(&pid) {
        Some(Interp::Python(py)) => Some(py),
        _ => None,
    }
}

/// Episodes' CPU samples (see [`crate::pipeline::loops`]) and strict call
/// sites (see [`crate::pipeline::strict`]).
impl Pipeline {
    /// A CPU sample of a long episode, kept until the episode is reported.
    fn sample(&mut self, mut r: LoopRecord) {
        let copy = self
            .user_stacks
            .remove(&r.tid)
            .filter(|u| u.start_ns == r.start_ns);
        // Unwound now: the copy is of this moment's stack.
        r.ips = self.stacks.unwind(r.pid, &r.ips, copy.as_ref());
        self.stacks.sampled(r.pid, r.tid, &r.ips);
        self.loops.sample(r);
    }

    /// A strict call site's first call: its event, unwound from its stack
    /// copy as off-CPU waits are, and remembered for the site's counts.
    fn strict_site(&mut self, r: StrictRecord) -> Event {
        let copy = self
            .user_stacks
            .remove(&r.tid)
            .filter(|u| u.start_ns == r.start_ns);
        let ips = self.stacks.native(r.pid, &r.ips, copy.as_ref());
        let stack = self.stack(r.pid, &ips, &r.py);
        let culprit = stack.culprit().clone();
        // Strict calls are counted on the CPU, where the descriptor is not
        // looked up: the strict set's descriptor-dependent calls (pread64
        // and friends) take their class from the name alone, which is file.
        let class = syscalls::classify(r.syscall, &r.args, None);
        let key = r.key();
        let origin = Origin {
            pid: r.pid,
            tid: r.tid,
            thread: r.thread,
            syscall: r.syscall,
            start_ns: r.start_ns,
            duration_ns: r.duration_ns,
            state: OffState::Running,
        };
        let ev = self.event(origin, class, Detector::Strict, stack, culprit);
        self.strict.site_found(key, ev.clone());
        ev
    }

    /// The event of a strict call site whose record never came: no stack.
    fn unknown_site(&mut self, key: &StrictKey) -> Event {
        let syscall = key.nr as i64;
        let origin = Origin {
            pid: key.tgid,
            tid: key.tid,
            thread: procfs::thread_comm(key.tgid, key.tid)
                .map(|t| t.trim_end().to_string())
                .unwrap_or_default(),
            syscall,
            start_ns: 0,
            duration_ns: 0,
            state: OffState::Running,
        };
        let class = syscalls::classify(syscall, &[0; 3], None);
        self.event(origin, class, Detector::Strict, Stack::default(), None)
    }
}

/// The syscall (and its arguments) at least half of `samples` were taken
/// in; None when they were mostly in user code.
fn sampled_syscall(samples: &[LoopRecord]) -> Option<(i64, [u64; 3])> {
    let mut counts: HashMap<i64, (usize, [u64; 3])> = HashMap::new();
    for s in samples.iter().filter(|s| s.syscall >= 0) {
        counts.entry(s.syscall).or_insert((0, s.args)).0 += 1;
    }
    counts
        .into_iter()
        .max_by_key(|(nr, (n, _))| (*n, -nr))
        .filter(|(_, (n, _))| 2 * n >= samples.len())
        .map(|(nr, (_, args))| (nr, args))
}

/// How a mostly-CPU episode of `run_ns` on the CPU and `preempted_ns`
/// waiting for one, with `samples` CPU samples, kept its loop: running its
/// own code, or preempted. Preempted when it was kept off the CPU far
/// longer than it ran (the host's doing), and also when it waited for a
/// CPU as long as it ran and no sample caught its code (it ran under half
/// the threshold): nothing names code to fix then, and the wait for a CPU
/// is what is known.
fn stall_state(run_ns: u64, preempted_ns: u64, samples: usize) -> OffState {
    if preempted_ns > run_ns.saturating_mul(4) || (samples == 0 && preempted_ns >= run_ns) {
        OffState::Preempted
    } else {
        OffState::Running
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unknown() -> Interp {
        Interp::unknown(Instant::now())
    }

    fn user_stack(pid: u32, tid: u32) -> decode::UserStackRecord {
        decode::UserStackRecord {
            pid,
            tid,
            start_ns: 1,
            ip: 0,
            sp: 0,
            bp: 0,
            stack: Vec::new(),
        }
    }

    #[test]
    fn an_unsampled_episode_mostly_waiting_for_a_cpu_is_a_preemption() {
        let ms = 1_000_000;
        // 6.8 ms on the CPU, 16 ms preempted, no sample: the host's.
        assert_eq!(stall_state(68 * ms / 10, 16 * ms, 0), OffState::Preempted);
        // The same with samples: they name code, which ran.
        assert_eq!(stall_state(68 * ms / 10, 16 * ms, 3), OffState::Running);
        // Far longer off the CPU than on it, sampled or not.
        assert_eq!(stall_state(10 * ms, 41 * ms, 5), OffState::Preempted);
        // Mostly its own CPU work.
        assert_eq!(stall_state(20 * ms, 5 * ms, 0), OffState::Running);
    }

    /// Forgetting one process (its exec or exit) keeps every other's state.
    #[test]
    fn forget_drops_one_process_only() {
        let me = std::process::id();
        // No process has this PID (above any pid_max): it gets an empty
        // snapshot, as an exited process would.
        let other = u32::MAX - 1;
        let mut p = Pipeline::new();
        for (pid, tid) in [(me, me), (other, other - 1)] {
            p.stacks.symbolizer().observe(pid);
            p.process_names.insert(pid, format!("p{pid}"));
            p.interps.insert(pid, unknown());
            p.parks.insert(tid, (pid, 0x10));
            p.user_stacks.insert(tid, user_stack(pid, tid));
        }
        p.forget(other);
        assert!(p.stacks.knows(me) && !p.stacks.knows(other));
        assert_eq!(p.process_names.keys().collect::<Vec<_>>(), [&me]);
        assert_eq!(p.interps.keys().collect::<Vec<_>>(), [&me]);
        assert_eq!(p.parks.keys().collect::<Vec<_>>(), [&me]);
        assert_eq!(p.user_stacks.keys().collect::<Vec<_>>(), [&me]);
        p.forget(me);
        assert!(!p.stacks.knows(me) && p.process_names.is_empty() && p.parks.is_empty());
    }
}
