//! User-space half of the strict and stall detectors (kernel side:
//! blockwatch-ebpf/src/{strict,stall}.rs): what the pipeline keeps between
//! records, and the pure decisions, unit-tested without a kernel.
//!
//! - Strict calls come one record per call; their stacks repeat, so the
//!   symbolized stack of each distinct raw stack is cached.
//! - Stack samples of a busy loop thread are kept (raw, a bounded number)
//!   until the busy period ends: as a stall (`KIND_STALL`, same TID and
//!   busy start), they are symbolized and the stack most of them share
//!   becomes the stall's; otherwise the next busy period replaces them.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use crate::event::Frame;
use crate::ingest::decode::LoopRecord;

/// Raw samples kept per busy period; a 99 Hz sampler fills this in about
/// a third of a second, and the first samples of a stall name it as well
/// as the last ones.
pub const MAX_SAMPLES_PER_STALL: usize = 32;
/// Distinct raw strict stacks whose symbolization is cached.
const MAX_CACHED_STACKS: usize = 4096;

/// Default `--stall-threshold`: asyncio's own `slow_callback_duration`
/// (what `PYTHONASYNCIODEBUG=1` warns about) is 100 ms.
pub const DEFAULT_STALL_THRESHOLD: std::time::Duration = std::time::Duration::from_millis(100);
/// Sampling frequency of busy loop threads, per CPU.
pub const SAMPLE_HZ: u64 = 99;

/// `--strict` and `--stall-threshold`, shared by trace and daemon.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct DetectorArgs {
    /// Strict syscall mode: also count every blocking-class syscall (open,
    /// stat, listdir, sleep, fsync, flock, ...) of a loop thread that does
    /// not leave the CPU, as Home Assistant's checks do. Each distinct
    /// stack is reported once as a `strict` event; all calls are counted in
    /// the summary and metrics. COST: attaches the raw_syscalls
    /// tracepoints, which slow every syscall of every process on the host
    /// for as long as blockwatch runs: measured +50 ns per syscall
    /// (getppid 84 -> 135 ns, 1.6x) on a 2-core 6.18 VM, up to +250 ns
    /// (2x) on other machines. Syscall-heavy hosts feel it; off by default.
    #[arg(long)]
    pub strict: bool,

    /// Report a loop thread that stays on the CPU this long without
    /// reaching its idle wait (a CPU-heavy callback) as a `stall`, with
    /// stacks sampled at 99 Hz while it runs; `off` disables
    /// [default: 100ms, asyncio's slow_callback_duration].
    #[arg(long, value_name = "DURATION|off", value_parser = clap_stall_threshold)]
    pub stall_threshold: Option<std::time::Duration>,
}

/// `off` (as `Duration::ZERO`) or a duration with its unit.
pub fn clap_stall_threshold(s: &str) -> Result<std::time::Duration, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(std::time::Duration::ZERO);
    }
    match crate::settings::duration::clap_duration(s)? {
        d if d.is_zero() => Err("use `off` to disable stall detection".into()),
        d => Ok(d),
    }
}

impl DetectorArgs {
    /// The loader's options, `default_stall` applying when the flag was
    /// not given (a zero duration turns the stall detector off).
    pub fn options(
        &self,
        default_stall: Option<std::time::Duration>,
    ) -> crate::bpf::loader::LoopOptions {
        let stall = match self.stall_threshold {
            Some(d) => Some(d),
            None => default_stall,
        };
        crate::bpf::loader::LoopOptions {
            strict: self.strict,
            stall_threshold: stall.filter(|d| !d.is_zero()),
        }
    }
}

/// `, 12 strict calls, 1 stall over 100ms` for the session's last line,
/// naming only the detectors that ran.
pub fn header_counts(
    options: &crate::bpf::loader::LoopOptions,
    strict: u64,
    stalls: u64,
) -> Option<String> {
    let mut s = String::new();
    if options.strict {
        s.push_str(&format!(", {strict} strict calls"));
    }
    if let Some(t) = options.stall_threshold {
        s.push_str(&format!(
            ", {stalls} stalls over {}",
            crate::settings::duration::format_duration(t)
        ));
    }
    (!s.is_empty()).then_some(s)
}

/// Samples of the current busy period of one thread.
#[derive(Debug, Default)]
struct Pending {
    start_ns: u64,
    samples: Vec<LoopRecord>,
    total: u32,
}

/// The detectors' state in the pipeline.
#[derive(Debug, Default)]
pub struct Loops {
    pending: HashMap<u32, Pending>,
    /// Raw stack key -> symbolized stack and culprit.
    strict_stacks: HashMap<u64, (Vec<Frame>, Option<Frame>)>,
}

/// Identifies a raw stack of a process: same key, same symbolized stack
/// (until the process execs).
pub fn raw_stack_key(r: &LoopRecord) -> u64 {
    let mut h = DefaultHasher::new();
    r.pid.hash(&mut h);
    r.ips.hash(&mut h);
    for f in &r.py {
        (f.code, f.instr).hash(&mut h);
    }
    h.finish()
}

impl Loops {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps a stack sample of a busy period.
    pub fn sample(&mut self, r: LoopRecord) {
        let p = self.pending.entry(r.tid).or_default();
        if p.start_ns != r.start_ns {
            *p = Pending {
                start_ns: r.start_ns,
                ..Pending::default()
            };
        }
        p.total = p.total.saturating_add(1);
        if p.samples.len() < MAX_SAMPLES_PER_STALL {
            p.samples.push(r);
        }
    }

    /// The samples of the busy period that `stall` ends, and how many were
    /// taken in all (more than returned when the period was long).
    pub fn take_samples(&mut self, stall: &LoopRecord) -> (Vec<LoopRecord>, u32) {
        match self.pending.remove(&stall.tid) {
            Some(p) if p.start_ns == stall.start_ns => (p.samples, p.total),
            _ => (Vec::new(), 0),
        }
    }

    /// A thread exited: its samples can never become a stall.
    pub fn thread_exit(&mut self, tid: u32) {
        self.pending.remove(&tid);
    }

    /// A process exec'd or exited: its cached stacks no longer hold.
    pub fn forget_process(&mut self) {
        self.strict_stacks.clear();
    }

    pub fn cached_stack(&self, key: u64) -> Option<&(Vec<Frame>, Option<Frame>)> {
        self.strict_stacks.get(&key)
    }

    pub fn cache_stack(&mut self, key: u64, stack: Vec<Frame>, culprit: Option<Frame>) {
        if self.strict_stacks.len() >= MAX_CACHED_STACKS {
            self.strict_stacks.clear();
        }
        self.strict_stacks.insert(key, (stack, culprit));
    }
}

/// The name that groups samples: the culprit's function, else its module.
fn culprit_name(culprit: Option<&Frame>) -> Option<String> {
    let f = culprit?;
    f.function.clone().or_else(|| f.module.clone())
}

/// Of the symbolized samples of a stall (stack, culprit), the one to
/// report: a sample of the culprit most samples share (ties: the one seen
/// first), preferring samples that have a culprit at all.
pub fn pick_stall_stack(samples: Vec<(Vec<Frame>, Option<Frame>)>) -> (Vec<Frame>, Option<Frame>) {
    let mut counts: Vec<(Option<String>, usize, usize)> = Vec::new();
    for (i, (_, c)) in samples.iter().enumerate() {
        let name = culprit_name(c.as_ref());
        match counts.iter_mut().find(|(n, _, _)| *n == name) {
            Some(entry) => entry.1 += 1,
            None => counts.push((name, 1, i)),
        }
    }
    let best = counts
        .iter()
        .max_by(|a, b| {
            (a.0.is_some(), a.1)
                .cmp(&(b.0.is_some(), b.1))
                // The earlier of equals wins: max_by keeps the last maximum.
                .then(b.2.cmp(&a.2))
        })
        .map(|(_, _, first)| *first);
    match best {
        Some(i) => samples.into_iter().nth(i).expect("index of a sample"),
        None => (Vec::new(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::decode::LoopKind;

    fn rec(tid: u32, start_ns: u64, ip: u64) -> LoopRecord {
        LoopRecord {
            kind: LoopKind::Sample,
            pid: 1,
            tid,
            syscall: -1,
            args: [0; 3],
            start_ns,
            duration_ns: 0,
            busy_ns: 0,
            thread: "t".into(),
            ips: vec![ip],
            py: vec![],
        }
    }

    fn frame(f: &str) -> Frame {
        Frame {
            function: Some(f.into()),
            ..Frame::default()
        }
    }

    #[test]
    fn samples_join_their_stall_by_tid_and_start() {
        let mut l = Loops::new();
        l.sample(rec(5, 100, 1));
        l.sample(rec(5, 100, 2));
        l.sample(rec(6, 100, 3));
        let (s, n) = l.take_samples(&rec(5, 100, 0));
        assert_eq!((s.len(), n), (2, 2));
        // Taken once.
        assert_eq!(l.take_samples(&rec(5, 100, 0)).1, 0);
        // A new busy period replaces the old one's samples.
        l.sample(rec(6, 200, 4));
        assert_eq!(l.take_samples(&rec(6, 100, 0)).1, 0);
        l.sample(rec(7, 1, 1));
        l.thread_exit(7);
        assert_eq!(l.take_samples(&rec(7, 1, 0)).1, 0);
    }

    #[test]
    fn samples_are_bounded_but_counted() {
        let mut l = Loops::new();
        for i in 0..100 {
            l.sample(rec(5, 1, i));
        }
        let (s, n) = l.take_samples(&rec(5, 1, 0));
        assert_eq!((s.len(), n), (MAX_SAMPLES_PER_STALL, 100));
    }

    #[test]
    fn the_most_common_culprit_names_the_stall() {
        let s = |c: Option<&str>, tag: &str| (vec![frame(tag)], c.map(frame));
        let (stack, culprit) = pick_stall_stack(vec![
            s(None, "a"),
            s(None, "b"),
            s(None, "c"),
            s(Some("hog"), "d"),
            s(Some("other"), "e"),
            s(Some("hog"), "f"),
        ]);
        assert_eq!(culprit.unwrap().function.as_deref(), Some("hog"));
        assert_eq!(stack[0].function.as_deref(), Some("d"), "first of its kind");
        // Equal counts: the first seen.
        let (_, c) = pick_stall_stack(vec![s(Some("x"), "1"), s(Some("y"), "2")]);
        assert_eq!(c.unwrap().function.as_deref(), Some("x"));
        // Only culprit-less samples: still a stack.
        let (stack, c) = pick_stall_stack(vec![s(None, "only")]);
        assert!(c.is_none() && stack.len() == 1);
        assert_eq!(pick_stall_stack(vec![]), (vec![], None));
    }

    #[test]
    fn stall_threshold_parses_off_and_durations() {
        use std::time::Duration;
        assert_eq!(clap_stall_threshold("off"), Ok(Duration::ZERO));
        assert_eq!(
            clap_stall_threshold("250ms"),
            Ok(Duration::from_millis(250))
        );
        assert!(clap_stall_threshold("0ms").is_err());
        assert!(clap_stall_threshold("100").is_err());
        let d = |s: Option<Duration>| DetectorArgs {
            strict: true,
            stall_threshold: s,
        };
        let o = d(None).options(Some(DEFAULT_STALL_THRESHOLD));
        assert!(o.strict);
        assert_eq!(o.stall_threshold, Some(Duration::from_millis(100)));
        assert_eq!(
            d(Some(Duration::ZERO))
                .options(Some(DEFAULT_STALL_THRESHOLD))
                .stall_threshold,
            None
        );
        assert_eq!(
            d(Some(Duration::from_secs(1)))
                .options(None)
                .stall_threshold,
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn raw_keys_tell_stacks_apart() {
        assert_eq!(raw_stack_key(&rec(1, 1, 10)), raw_stack_key(&rec(2, 9, 10)));
        assert_ne!(raw_stack_key(&rec(1, 1, 10)), raw_stack_key(&rec(1, 1, 11)));
        let mut l = Loops::new();
        l.cache_stack(1, vec![frame("f")], None);
        assert!(l.cached_stack(1).is_some());
        l.forget_process();
        assert!(l.cached_stack(1).is_none());
    }
}

/// Privileged tests of the kernel programs alone (run as root by `cargo
/// xtask test`): the raw records of a real asyncio process.
#[cfg(test)]
mod kernel_tests {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use crate::bpf::loader::{self, LoopOptions};
    use crate::ingest::decode::{self, LoopKind, LoopRecord, Record};
    use crate::targets::{TagMaps, ThreadsMode};

    const SUBJECT: &str = r#"
import asyncio, os, threading, time
def spin(s):
    end = time.thread_time() + s      # CPU time: preemption cannot shorten it
    while time.thread_time() < end:
        pass
async def main():
    await asyncio.sleep(0.4)          # idle: the thread becomes a loop
    for _ in range(20):
        os.stat("/")                  # strict: on the CPU, on the loop
    t = threading.Thread(target=lambda: [os.stat("/") for _ in range(20)])
    t.start(); t.join()               # a thread that is no loop: nothing
    await asyncio.sleep(0.1)
    spin(0.25)                        # a stall of ~250 ms
    await asyncio.sleep(0.2)
asyncio.run(main())
"#;

    #[test]
    fn strict_calls_stalls_and_samples_from_the_kernel() {
        let mut loaded = loader::load(1_000_000_000, false).expect("load (run as root)");
        loader::enable_loop_detectors(
            &mut loaded.ebpf,
            LoopOptions {
                strict: true,
                stall_threshold: Some(Duration::from_millis(100)),
            },
        )
        .expect("strict and stall programs");
        let mut child = Command::new("python3")
            .args(["-c", SUBJECT])
            .stdin(Stdio::null())
            .spawn()
            .expect("python3");
        let pid = child.id();
        TagMaps {
            threads: &mut loaded.threads,
            watched: &mut loaded.watched,
        }
        .watch_process(pid, ThreadsMode::Loop.rule(false))
        .expect("watch");
        let start = Instant::now();
        let mut records: Vec<LoopRecord> = Vec::new();
        let mut exited = false;
        while !exited && start.elapsed() < Duration::from_secs(15) {
            while let Some(item) = loaded.events.next() {
                match decode::decode(&item).expect("decodable record") {
                    Record::Loop(l) => records.push(l),
                    Record::Exit {
                        pid: p,
                        group_dead: true,
                        ..
                    } if p == pid => exited = true,
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait().unwrap();
        assert!(exited, "the subject did not exit in time");
        let of =
            |k: LoopKind| -> Vec<&LoopRecord> { records.iter().filter(|r| r.kind == k).collect() };
        // newfstatat (262) or statx (332), depending on the libc.
        let stats: Vec<_> = of(LoopKind::Strict)
            .into_iter()
            .filter(|r| r.syscall == 262 || r.syscall == 332)
            .collect();
        assert!(stats.len() >= 20, "20 os.stat on the loop: {stats:#?}");
        assert!(
            of(LoopKind::Strict).iter().all(|r| r.tid == pid),
            "only the loop thread: {records:#?}"
        );
        assert!(stats.iter().all(|r| r.duration_ns < 50_000_000));
        assert!(stats.iter().all(|r| !r.ips.is_empty()), "user stacks");
        let stalls = of(LoopKind::Stall);
        assert_eq!(stalls.len(), 1, "{stalls:#?}");
        let s = stalls[0];
        assert_eq!(s.tid, pid);
        assert!(
            (100_000_000..1_500_000_000).contains(&s.duration_ns) && s.busy_ns >= s.duration_ns,
            "{s:#?}"
        );
        let samples: Vec<_> = of(LoopKind::Sample)
            .into_iter()
            .filter(|r| r.tid == pid && r.start_ns == s.start_ns)
            .collect();
        assert!(!samples.is_empty(), "samples of the stall: {records:#?}");
        assert!(loaded.counter(blockwatch_common::Counter::Stalls) >= 1);
        let lost = loaded.counter(blockwatch_common::Counter::LostLoopRecords);
        assert_eq!(lost, 0);
    }
}
