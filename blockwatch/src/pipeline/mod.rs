//! Kernel records in, events out: decode, learn runtime parks, symbolize,
//! classify. Shared by every front end (trace today); it owns nothing that
//! is specific to one output.

pub mod loops;

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use log::{debug, info, warn};

use blockwatch_common::PyProc;
use blockwatch_common::x86_64::NR_FUTEX;

use crate::analyze::culprit;
use crate::analyze::syscalls::{self, FdKind};
use crate::event::{Class, Detector, Event, Frame, FrameKind, OffState};
use crate::ingest::decode::{self, BlockRecord, LoopKind, LoopRecord, Record};
use crate::runtimes::python::{self, CodeReader, PyProcess};
use crate::runtimes::tokio as runtime;
use crate::stacks::perfmap::PerfMaps;
use crate::stacks::symbolize::Symbolizer;
use crate::stacks::unwind::StackUnwinder;
use crate::targets;
use loops::Loops;

/// How long a watched process that is not (yet) recognisably CPython is
/// looked at again, at each refresh: a shared libpython is mapped only
/// after exec, by the dynamic loader, and a launcher (pyenv's shim) may
/// exec the interpreter. Bounded, so a host's other processes cost a few
/// /proc reads each, not one per refresh forever.
const PY_INSPECT_WINDOW: Duration = Duration::from_secs(30);
/// The gap between looks starts small (a program that blocks soon after
/// it starts gets its Python frames) and doubles up to this.
const PY_INSPECT_MAX_GAP: Duration = Duration::from_secs(2);

enum Interp {
    Python(Box<PyProcess>),
    Unknown {
        since: Instant,
        next: Instant,
        gap: Duration,
        given_up: bool,
    },
}

/// What a record means to the front end.
#[derive(Debug)]
pub enum Output {
    Event(Box<Event>),
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
    /// Strict calls (`--strict`) and stalls reported.
    pub strict: u64,
    pub stalls: u64,
}

pub struct Pipeline {
    sym: Symbolizer,
    unwinder: StackUnwinder,
    /// User-stack copies waiting for the block record of their wait (the
    /// kernel sends the copy just before it), by TID.
    user_stacks: HashMap<u32, decode::UserStackRecord>,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, to date kernel timestamps.
    wall_offset: Duration,
    process_names: HashMap<u32, String>,
    /// Futex parks learned per thread, to drop waits that raced the
    /// kernel map update.
    parks: HashMap<u32, u64>,
    perf_maps: PerfMaps,
    interps: HashMap<u32, Interp>,
    code: CodeReader,
    loops: Loops,
    pub stats: Stats,
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
            sym: Symbolizer::new(),
            unwinder: StackUnwinder::new(),
            user_stacks: HashMap::new(),
            wall_offset: Duration::from_nanos(wall.saturating_sub(mono)),
            process_names: HashMap::new(),
            parks: HashMap::new(),
            perf_maps: PerfMaps::new(),
            interps: HashMap::new(),
            code: CodeReader::new(),
            loops: Loops::new(),
            stats: Stats::default(),
        }
    }

    /// Symbolization failures so far.
    pub fn symbol_failures(&self) -> u64 {
        self.sym.failures()
    }

    /// Finds which of the watched processes `pids` run CPython and hands
    /// the kernel what it needs to walk their frames, and snapshots their
    /// memory maps (so that a process that exits right after blocking is
    /// still symbolized). Cheap to call periodically: a process is
    /// inspected a bounded number of times.
    pub fn refresh_interpreters(
        &mut self,
        pids: impl IntoIterator<Item = u32>,
        pyprocs: &mut BpfHashMap<MapData, u32, PyProc>,
    ) {
        for pid in pids {
            self.sym.observe(pid);
            let now = Instant::now();
            let state = self.interps.entry(pid).or_insert(Interp::Unknown {
                since: now,
                next: now,
                gap: Duration::from_millis(100),
                given_up: false,
            });
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
                    *given_up = true;
                }
            }
        }
    }

    /// Drains every record the kernel has written, handing each output to
    /// `out`. Learned parks are written to `parks_map`.
    pub fn drain(
        &mut self,
        ring: &mut RingBuf<MapData>,
        parks_map: &mut BpfHashMap<MapData, u32, u64>,
        mut out: impl FnMut(Output),
    ) {
        while let Some(item) = ring.next() {
            let output = self.process(&item, parks_map);
            // Release the ring-buffer slot before the (slow) output.
            drop(item);
            if let Some(o) = output {
                out(o);
            }
        }
    }

    /// Handles one record.
    pub fn process(
        &mut self,
        bytes: &[u8],
        parks_map: &mut BpfHashMap<MapData, u32, u64>,
    ) -> Option<Output> {
        let record = match decode::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.stats.decode_errors += 1;
                debug!("undecodable record: {e}");
                return None;
            }
        };
        match record {
            Record::Block(mut b) => {
                let copy = self
                    .user_stacks
                    .remove(&b.tid)
                    .filter(|u| u.start_ns == b.start_ns);
                if b.syscall == NR_FUTEX && self.parks.get(&b.tid) == Some(&b.args[0]) {
                    return None;
                }
                b.ips = self
                    .unwinder
                    .stack(&mut self.sym, b.pid, &b.ips, copy.as_ref());
                self.stats.events += 1;
                Some(Output::Event(Box::new(self.enrich(b))))
            }
            Record::UserStack(u) => {
                self.user_stacks.insert(u.tid, u);
                None
            }
            Record::Probe(p) => {
                if runtime::probe_is_park(&mut self.sym, &p) {
                    info!(
                        "tid {} parks on futex {:#x}: an event-loop worker",
                        p.tid, p.uaddr
                    );
                    self.stats.parks_learned += 1;
                    self.parks.insert(p.tid, p.uaddr);
                    if let Err(e) = parks_map.insert(p.tid, p.uaddr, 0) {
                        warn!("cannot record the park of tid {}: {e}", p.tid);
                    }
                }
                None
            }
            Record::Loop(l) => self.loop_record(l).map(|e| Output::Event(Box::new(e))),
            Record::Exec { pid, tid, comm } => {
                self.loops.forget_process();
                self.sym.invalidate(pid);
                self.unwinder.forget(pid);
                self.perf_maps.forget(pid);
                self.interps.remove(&pid);
                self.code.forget(pid);
                self.process_names.insert(pid, comm.clone());
                self.parks.remove(&tid);
                self.parks.remove(&pid);
                Some(Output::Exec { pid, comm })
            }
            Record::Exit {
                pid,
                tid,
                group_dead,
            } => {
                self.parks.remove(&tid);
                self.user_stacks.remove(&tid);
                self.loops.thread_exit(tid);
                if group_dead {
                    self.loops.forget_process();
                    // Kept until here so late events still carry the name.
                    self.process_names.remove(&pid);
                    self.perf_maps.forget(pid);
                    self.interps.remove(&pid);
                    self.code.forget(pid);
                    self.unwinder.forget(pid);
                    Some(Output::ProcessExit { pid })
                } else {
                    None
                }
            }
        }
    }

    fn process_name(&mut self, pid: u32, fallback: &str) -> String {
        self.process_names
            .entry(pid)
            .or_insert_with(|| targets::process_name(pid).unwrap_or_else(|| fallback.to_string()))
            .clone()
    }

    fn enrich(&mut self, b: BlockRecord) -> Event {
        let stack = self.stack(b.pid, &b.ips, &b.py);
        // Only read/write-style calls need the fd's kind (a socket read is
        // network, a file read is disk); they are few, as events are.
        let fd_kind = syscalls::fd_arg(b.syscall, &b.args).and_then(|fd| {
            std::fs::read_link(format!("/proc/{}/fd/{fd}", b.pid))
                .ok()
                .map(|l| FdKind::from_link(&l.to_string_lossy()))
        });
        let culprit = culprit::culprit(&stack);
        let offender = culprit::offender(&stack);
        let mut class = syscalls::classify(b.syscall, &b.args, fd_kind);
        if class == Class::Lock
            && syscalls::name(b.syscall) == Some("futex")
            && let Some(Interp::Python(py)) = self.interps.get(&b.pid)
            && py.is_gil_futex(b.args[0])
        {
            // Another thread holds the GIL: waiting for it blocks the loop
            // as surely as a lock, but the fix differs (move the CPU work
            // out of the process, or release the GIL in it).
            class = Class::Gil;
        }
        Event {
            ts: SystemTime::UNIX_EPOCH + self.wall_offset + Duration::from_nanos(b.start_ns),
            pid: b.pid,
            tid: b.tid,
            comm: self.process_name(b.pid, &b.thread),
            thread: b.thread,
            syscall: syscalls::name(b.syscall),
            syscall_nr: b.syscall,
            class,
            duration_ns: b.duration_ns,
            state: b.state,
            stack,
            culprit,
            offender,
            detector: Detector::Offcpu,
            busy_ns: None,
            samples: None,
        }
    }
}

/// The strict and stall detectors' records (see [`crate::pipeline::loops`]).
impl Pipeline {
    fn loop_record(&mut self, r: LoopRecord) -> Option<Event> {
        match r.kind {
            LoopKind::Sample => {
                self.loops.sample(r);
                None
            }
            LoopKind::Strict => {
                self.stats.strict += 1;
                let key = loops::raw_stack_key(&r);
                let (stack, culprit) = match self.loops.cached_stack(key) {
                    Some(c) => c.clone(),
                    None => {
                        let stack = self.stack(r.pid, &r.ips, &r.py);
                        let culprit = culprit::culprit(&stack);
                        self.loops.cache_stack(key, stack.clone(), culprit.clone());
                        (stack, culprit)
                    }
                };
                // The strict set holds no call whose class depends on
                // the descriptor (see syscalls::STRICT_SYSCALLS).
                let class = syscalls::classify(r.syscall, &r.args, None);
                Some(self.loop_event(r, class, Detector::Strict, stack, culprit))
            }
            LoopKind::Stall => {
                self.stats.stalls += 1;
                let (samples, total) = self.loops.take_samples(&r);
                let symbolized: Vec<_> = samples
                    .iter()
                    .map(|s| {
                        let stack = self.stack(s.pid, &s.ips, &s.py);
                        let culprit = culprit::culprit(&stack);
                        (stack, culprit)
                    })
                    .collect();
                let (stack, culprit) = loops::pick_stall_stack(symbolized);
                let busy_ns = r.busy_ns;
                let mut ev = self.loop_event(r, Class::Stall, Detector::Stall, stack, culprit);
                ev.busy_ns = Some(busy_ns);
                ev.samples = Some(total);
                Some(ev)
            }
        }
    }

    fn loop_event(
        &mut self,
        r: LoopRecord,
        class: Class,
        detector: Detector,
        stack: Vec<Frame>,
        culprit: Option<Frame>,
    ) -> Event {
        let offender = culprit::offender(&stack);
        Event {
            ts: SystemTime::UNIX_EPOCH + self.wall_offset + Duration::from_nanos(r.start_ns),
            pid: r.pid,
            tid: r.tid,
            comm: self.process_name(r.pid, &r.thread),
            thread: r.thread,
            syscall: syscalls::name(r.syscall),
            syscall_nr: r.syscall,
            class,
            duration_ns: r.duration_ns,
            state: OffState::Running,
            stack,
            culprit,
            offender,
            detector,
            busy_ns: None,
            samples: None,
        }
    }

    /// Native frames (ELF symbols, perf maps for JIT code) with the
    /// CPython frames in place, for every detector's events.
    fn stack(&mut self, pid: u32, ips: &[u64], py: &[blockwatch_common::PyFrameRef]) -> Vec<Frame> {
        let mut stack = self.sym.symbolize(pid, ips);
        // JIT code has no ELF symbols: its perf map, if it writes one.
        for (i, f) in stack.iter_mut().enumerate() {
            if f.function.is_none() && !f.inlined {
                let addr = if i == 0 { f.address } else { f.address - 1 };
                f.function = self.perf_maps.lookup(pid, addr);
            }
        }
        // The interpreter frames are the Python code that called into the
        // native frames above: they go where the interpreter's evaluation
        // loop is on the native stack, before its own callers (down to
        // main), or last when the native stack does not reach it.
        let Some(Interp::Python(interp)) = self.interps.get(&pid) else {
            return stack;
        };
        let at = stack
            .iter()
            .position(|f| {
                f.function
                    .as_deref()
                    .is_some_and(|n| n.starts_with("_PyEval_EvalFrame"))
            })
            .unwrap_or(stack.len());
        let python: Vec<Frame> = py
            .iter()
            .filter(|r| r.code != 0)
            .map(|r| match self.code.frame(pid, interp, r.code, r.instr) {
                Some(f) => Frame {
                    address: r.code,
                    function: Some(f.function),
                    module: Some(f.file.clone()),
                    file: Some(f.file),
                    line: f.line,
                    kind: FrameKind::Python,
                    ..Frame::default()
                },
                None => Frame {
                    address: r.code,
                    kind: FrameKind::Python,
                    ..Frame::default()
                },
            })
            .collect();
        stack.splice(at..at, python);
        stack
    }
}
