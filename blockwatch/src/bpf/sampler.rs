//! The episode sampler's perf events: one cpu-clock event per watched
//! thread, not one per CPU.
//!
//! A per-CPU event interrupts every CPU 199 times a second whatever runs
//! there, idle included: measured on a 2-vCPU VM, that alone (an empty
//! program, bpftrace's `profile:hz:199` as much as ours) cost a Node server
//! under wrk 15 % of its requests. A per-thread event only ticks while its
//! thread runs: the same 199 Hz on the watched loop cost under 1 %. The
//! price is bookkeeping: user space opens an event for each thread the
//! sampler is for and closes it when the thread is gone.
//!
//! Which threads: every loop thread (as the kernel reports it found, or
//! as tagged at start), and every thread of a process watched by name or
//! PID, since a server saturated when blockwatch attached is found as a
//! loop by a sample that catches it in its epoll wait. Those events are
//! opened with `inherit`, so the threads such a process creates later
//! carry one too without user space hearing of them. The processes
//! `daemon --auto` watches (every process of the host) are not sampled
//! before they show a loop: a thread per event over a whole host would
//! cost more than the sampler is worth.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use aya::programs::ProgramFd;
use log::{debug, warn};

use crate::bpf::SAMPLE_HZ;

/// Events open at most: a descriptor and a few KiB of kernel memory each.
/// A host with more loop threads than this has the rest unsampled (said
/// once).
const MAX_EVENTS: usize = 4096;

// From linux/perf_event.h.
const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_COUNT_SW_CPU_CLOCK: u64 = 0;
const ATTR_INHERIT: u64 = 1 << 1;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// `_IOW('$', 8, __u32)`
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// `struct perf_event_attr` up to `config3` (PERF_ATTR_SIZE_VER8); older
/// kernels accept it as long as the fields they do not know are zero.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
    config2: u64,
    branch_sample_type: u64,
    sample_regs_user: u64,
    sample_stack_user: u32,
    clockid: i32,
    sample_regs_intr: u64,
    aux_watermark: u32,
    sample_max_stack: u16,
    reserved_2: u16,
    aux_sample_size: u32,
    reserved_3: u32,
    sig_data: u64,
    config3: u64,
}

/// Opens a cpu-clock event on thread `tid` that runs program `prog` every
/// 1/`SAMPLE_HZ` s of the thread's CPU time.
fn open(prog: BorrowedFd<'_>, tid: u32, inherit: bool) -> std::io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_SOFTWARE,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: PERF_COUNT_SW_CPU_CLOCK,
        // A period, not a frequency: nothing for the kernel to re-tune at
        // every tick.
        sample_period: 1_000_000_000 / SAMPLE_HZ,
        flags: if inherit { ATTR_INHERIT } else { 0 },
        wakeup_events: 1,
        ..Default::default()
    };
    // SAFETY: attr is a valid perf_event_attr of the size it states; the
    // returned descriptor is checked before it is owned.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            tid as libc::pid_t,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: perf_event_open just returned this fresh descriptor.
    let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: both descriptors are open; the ioctl reads the program fd.
    if unsafe { libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_SET_BPF, prog.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(event)
}

#[derive(Debug, thiserror::Error)]
#[error("perf_event_open (cpu-clock on a thread): {0}")]
pub struct SamplerError(#[from] std::io::Error);

/// The sampler's events, by thread.
#[derive(Default)]
pub struct Sampler {
    /// `episode_sample`; None when perf events were refused (or before the
    /// detectors are enabled): then nothing is sampled.
    prog: Option<ProgramFd>,
    /// Events user space opened, by TID, with the TID's process.
    threads: HashMap<u32, (u32, OwnedFd)>,
    /// Processes whose threads all carry an event, the ones created later
    /// by inheritance.
    whole: HashSet<u32>,
    /// Events open at most.
    budget: usize,
    /// Whether a warning was given (only the first is).
    warned: bool,
}

impl Sampler {
    /// A sampler that runs `prog`, once a test event on this thread shows
    /// the kernel allows it.
    pub fn new(prog: ProgramFd) -> Result<Self, SamplerError> {
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() } as u32;
        drop(open(prog.as_fd(), me, false)?);
        Ok(Self {
            prog: Some(prog),
            budget: event_budget(),
            ..Default::default()
        })
    }

    /// Whether anything is sampled at all.
    pub fn is_on(&self) -> bool {
        self.prog.is_some()
    }

    /// Samples loop thread `tid` of process `pid`, unless it already is.
    pub fn watch_thread(&mut self, pid: u32, tid: u32) {
        if self.whole.contains(&pid) {
            return;
        }
        self.add(pid, tid, false);
    }

    /// Samples every thread of process `pid`, `threads` (those it has now)
    /// and those they create later.
    pub fn watch_process(&mut self, pid: u32, threads: impl IntoIterator<Item = u32>) {
        if self.prog.is_none() || !self.whole.insert(pid) {
            return;
        }
        for tid in threads {
            self.add(pid, tid, true);
        }
    }

    fn add(&mut self, pid: u32, tid: u32, inherit: bool) {
        let Some(prog) = &self.prog else {
            return;
        };
        if self.threads.contains_key(&tid) {
            return;
        }
        if self.threads.len() >= self.budget {
            if !std::mem::replace(&mut self.warned, true) {
                warn!(
                    "{} threads are sampled already: thread {tid} of pid {pid} and \
                     later ones are not (their CPU-bound episodes have no stack)",
                    self.budget
                );
            }
            return;
        }
        match open(prog.as_fd(), tid, inherit) {
            Ok(fd) => {
                self.threads.insert(tid, (pid, fd));
            }
            // Gone meanwhile: nothing to sample.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => {
                if !std::mem::replace(&mut self.warned, true) {
                    warn!("thread {tid} of pid {pid} is not sampled: {e}");
                } else {
                    debug!("thread {tid} of pid {pid} is not sampled: {e}");
                }
            }
        }
    }

    /// Closes the event of thread `tid`, which exited.
    pub fn forget_thread(&mut self, tid: u32) {
        self.threads.remove(&tid);
    }

    /// Closes the events of process `pid` (gone, or no longer watched).
    pub fn forget_process(&mut self, pid: u32) {
        self.whole.remove(&pid);
        self.threads.retain(|_, (p, _)| *p != pid);
    }

    /// Closes the events of threads that are gone (an exit record lost).
    pub fn prune(&mut self, alive: impl Fn(u32) -> bool) {
        self.threads.retain(|&tid, _| alive(tid));
        let pids: HashSet<u32> = self.threads.values().map(|(p, _)| *p).collect();
        self.whole.retain(|p| pids.contains(p) || alive(*p));
    }
}

/// Events this process may open: `MAX_EVENTS`, or half its soft limit on
/// open files if that is lower. The limit is not raised, since the
/// commands `trace` starts would inherit it.
fn event_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return MAX_EVENTS;
    }
    MAX_EVENTS.min((lim.rlim_cur / 2) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attr_is_the_kernels_size() {
        // PERF_ATTR_SIZE_VER8.
        assert_eq!(std::mem::size_of::<PerfEventAttr>(), 136);
    }

    #[test]
    fn a_sampler_without_program_samples_nothing() {
        let mut s = Sampler::default();
        s.watch_process(1, [1]);
        s.watch_thread(1, 1);
        assert!(!s.is_on());
        assert!(s.threads.is_empty());
    }
}
