//! User-space half of the strict and stall detectors (kernel side:
//! blockwatch-ebpf/src/{strict,stall}.rs): what the pipeline keeps between
//! records, and the pure decisions, unit-tested without a kernel.
//!
//! - Strict calls come one record per call; their stacks repeat, so the
//!   symbolized stack of each distinct raw stack is cached.
//! - CPU samples of a loop thread's long episode are kept (unwound, a
//!   bounded number) until the episode is reported (a `Block` record with
//!   the same TID and start): when CPU work took most of it, they are
//!   symbolized and the stack most of them share becomes the event's;
//!   otherwise the next episode replaces them.

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

/// `, 12 strict calls` for the session's last line, when strict mode ran.
pub fn header_counts(options: &crate::bpf::LoopOptions, strict: u64) -> Option<String> {
    options.strict.then(|| format!(", {strict} strict calls"))
}

/// Samples of the current busy period of one thread.
#[derive(Debug, Default)]
struct Pending {
    pid: u32,
    start_ns: u64,
    samples: Vec<LoopRecord>,
    total: u32,
}

/// The detectors' state in the pipeline.
#[derive(Debug, Default)]
pub struct Loops {
    pending: HashMap<u32, Pending>,
    /// (PID, raw stack key) -> symbolized stack and culprit.
    strict_stacks: HashMap<(u32, u64), (Vec<Frame>, Option<Frame>)>,
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
        p.pid = r.pid;
        p.total = p.total.saturating_add(1);
        if p.samples.len() < MAX_SAMPLES_PER_STALL {
            p.samples.push(r);
        }
    }

    /// The samples of thread `tid`'s episode that began at `start_ns`, and
    /// how many were taken in all (more than returned when it was long).
    pub fn take_samples(&mut self, tid: u32, start_ns: u64) -> (Vec<LoopRecord>, u32) {
        match self.pending.remove(&tid) {
            Some(p) if p.start_ns == start_ns => (p.samples, p.total),
            _ => (Vec::new(), 0),
        }
    }

    /// A thread exited: its samples can never become a stall.
    pub fn thread_exit(&mut self, tid: u32) {
        self.pending.remove(&tid);
    }

    /// Process `pid` exec'd or exited: its cached stacks no longer hold,
    /// and its threads' samples can never become a stall.
    pub fn forget_process(&mut self, pid: u32) {
        self.strict_stacks.retain(|k, _| k.0 != pid);
        self.pending.retain(|_, p| p.pid != pid);
    }

    pub fn cached_stack(&self, pid: u32, key: u64) -> Option<&(Vec<Frame>, Option<Frame>)> {
        self.strict_stacks.get(&(pid, key))
    }

    pub fn cache_stack(&mut self, pid: u32, key: u64, stack: Vec<Frame>, culprit: Option<Frame>) {
        if self.strict_stacks.len() >= MAX_CACHED_STACKS {
            self.strict_stacks.clear();
        }
        self.strict_stacks.insert((pid, key), (stack, culprit));
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
    best.and_then(|i| samples.into_iter().nth(i))
        .unwrap_or((Vec::new(), None))
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
    fn samples_join_their_episode_by_tid_and_start() {
        let mut l = Loops::new();
        l.sample(rec(5, 100, 1));
        l.sample(rec(5, 100, 2));
        l.sample(rec(6, 100, 3));
        let (s, n) = l.take_samples(5, 100);
        assert_eq!((s.len(), n), (2, 2));
        // Taken once.
        assert_eq!(l.take_samples(5, 100).1, 0);
        // A new episode replaces the old one's samples.
        l.sample(rec(6, 200, 4));
        assert_eq!(l.take_samples(6, 100).1, 0);
        l.sample(rec(7, 1, 1));
        l.thread_exit(7);
        assert_eq!(l.take_samples(7, 1).1, 0);
    }

    #[test]
    fn samples_are_bounded_but_counted() {
        let mut l = Loops::new();
        for i in 0..100 {
            l.sample(rec(5, 1, i));
        }
        let (s, n) = l.take_samples(5, 1);
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
    fn raw_keys_tell_stacks_apart() {
        assert_eq!(raw_stack_key(&rec(1, 1, 10)), raw_stack_key(&rec(2, 9, 10)));
        assert_ne!(raw_stack_key(&rec(1, 1, 10)), raw_stack_key(&rec(1, 1, 11)));
        let mut l = Loops::new();
        l.cache_stack(1, 7, vec![frame("f")], None);
        l.cache_stack(2, 7, vec![frame("g")], None);
        l.sample(rec(5, 1, 1));
        assert!(l.cached_stack(1, 7).is_some());
        l.forget_process(1);
        assert!(l.cached_stack(1, 7).is_none());
        assert!(l.take_samples(5, 1).0.is_empty(), "pid 1's samples go");
        assert!(l.cached_stack(2, 7).is_some(), "other processes' stay");
    }
}

/// Privileged tests of the kernel programs alone (run as root by `cargo
/// xtask test`): the raw records of a real asyncio process.
#[cfg(test)]
mod kernel_tests {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use crate::bpf::{self, LoopOptions};
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
    fn strict_calls_cpu_episodes_and_samples_from_the_kernel() {
        let mut loaded = bpf::load(100_000_000, false).expect("load (run as root)");
        bpf::enable_loop_detectors(
            &mut loaded.ebpf,
            LoopOptions { strict: true },
            &crate::analyze::syscalls::strict_numbers(),
        )
        .expect("strict and sampler programs");
        let mut child = Command::new("python3")
            .args(["-c", SUBJECT])
            .stdin(Stdio::null())
            .spawn()
            .expect("python3");
        let pid = child.id();
        TagMaps {
            threads: &mut loaded.maps.threads,
            watched: &mut loaded.maps.watched,
        }
        .watch_process(pid, ThreadsMode::Loop.rule(false))
        .expect("watch");
        let start = Instant::now();
        let mut records: Vec<LoopRecord> = Vec::new();
        let mut episodes = Vec::new();
        let mut exited = false;
        while !exited && start.elapsed() < Duration::from_secs(15) {
            while let Some(item) = loaded.events.next() {
                match decode::decode(&item).expect("decodable record") {
                    Record::Loop(l) => records.push(l),
                    Record::Block(b) if b.pid == pid => episodes.push(b),
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
        // The spin is one episode over 100 ms, mostly on the CPU (the
        // machine may preempt it too), and nothing else is.
        assert_eq!(episodes.len(), 1, "{episodes:#?}");
        let e = &episodes[0];
        assert_eq!(e.tid, pid);
        let off: u64 = e.off_ns.iter().sum();
        assert!(
            (200_000_000..1_500_000_000).contains(&e.duration_ns)
                && e.run_ns >= 100_000_000
                && e.run_ns + off <= e.duration_ns + 1_000_000,
            "{e:#?}"
        );
        let samples: Vec<_> = of(LoopKind::Sample)
            .into_iter()
            .filter(|r| r.tid == pid && r.start_ns == e.start_ns)
            .collect();
        assert!(!samples.is_empty(), "samples of the episode: {records:#?}");
        assert_eq!(samples.len() as u32, e.samples, "each sample is counted");
        let lost = loaded.counter(blockwatch_common::Counter::LostLoopRecords);
        assert_eq!(lost, 0);
    }
}
