//! User-space half of the strict and stall detectors (kernel side:
//! blockwatch-ebpf/src/{strict,stall}.rs): what the pipeline keeps between
//! records, and the pure decisions, unit-tested without a kernel.
//!
//! - Strict calls are counted in the kernel, per call site
//!   ([`crate::pipeline::strict`]).
//! - CPU samples of a loop thread's long episode are kept (unwound, a
//!   bounded number) until the episode is reported (a `Block` record with
//!   the same TID and start): when CPU work took most of it, they are
//!   symbolized and the stack most of them share becomes the event's;
//!   otherwise the next episode replaces them.

use crate::FastMap;
use crate::event::Frame;
use crate::ingest::decode::LoopRecord;

/// Raw samples kept per busy period; at the sampler's 250 a second (the
/// tick of a `HZ=250` kernel) this is its first 130 ms, and the first
/// samples of a stall name it as well as the last ones.
pub const MAX_SAMPLES_PER_STALL: usize = 32;

/// `, 12 strict calls` for the session's last line, when strict mode ran;
/// strict calls the kernel counted without a call site (`strict_lost`: its
/// map was full) are said next to the count.
pub fn header_counts(
    options: &crate::bpf::LoopOptions,
    strict: u64,
    strict_lost: u64,
) -> Option<String> {
    let mut s = String::new();
    if options.strict {
        s.push_str(&format!(", {} strict calls", strict + strict_lost));
        if strict_lost > 0 {
            s.push_str(&format!(
                " ({strict_lost} of them at no call site: the strict-call map was full)"
            ));
        }
    }
    (!s.is_empty()).then_some(s)
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
    pending: FastMap<u32, Pending>,
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

    /// Process `pid` exec'd or exited: its threads' samples can never
    /// become a stall.
    pub fn forget_process(&mut self, pid: u32) {
        self.pending.retain(|_, p| p.pid != pid);
    }
}

/// The name that groups samples: the culprit's function, else its module.
fn culprit_name(culprit: Option<&Frame>) -> Option<&str> {
    let f = culprit?;
    f.function.as_deref().or(f.module.as_deref())
}

/// Equal keys counted, in the order first seen: (key, count, first index).
fn tally<K: PartialEq>(keys: impl Iterator<Item = (usize, K)>) -> Vec<(K, usize, usize)> {
    let mut counts: Vec<(K, usize, usize)> = Vec::new();
    for (i, key) in keys {
        match counts.iter_mut().find(|(k, _, _)| *k == key) {
            Some(entry) => entry.1 += 1,
            None => counts.push((key, 1, i)),
        }
    }
    counts
}

/// Of the symbolized samples of a stall (stack, culprit), the one to
/// report: of the culprit most samples share (preferring samples that have
/// a culprit at all), a sample at its most sampled line. That is the hot
/// spot, where the first sample may have caught the function on its way in
/// (its `with open(...)` line rather than the read). Ties: the first seen.
pub fn pick_stall_stack<S: Default>(samples: Vec<(S, Option<Frame>)>) -> (S, Option<Frame>) {
    let names = tally(
        samples
            .iter()
            .enumerate()
            .map(|(i, (_, c))| (i, culprit_name(c.as_ref()))),
    );
    // max_by keeps the last of equals: the index breaks ties to the first.
    let Some((winner, _, _)) = names
        .iter()
        .max_by(|a, b| (a.0.is_some(), a.1, b.2).cmp(&(b.0.is_some(), b.1, a.2)))
    else {
        return Default::default();
    };
    let lines = tally(
        samples
            .iter()
            .enumerate()
            .filter(|(_, (_, c))| culprit_name(c.as_ref()) == *winner)
            .map(|(i, (_, c))| (i, c.as_ref().and_then(|f| f.line))),
    );
    let chosen = lines
        .iter()
        .max_by(|a, b| (a.1, b.2).cmp(&(b.1, a.2)))
        .map(|(_, _, first)| *first);
    chosen
        .and_then(|i| samples.into_iter().nth(i))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(tid: u32, start_ns: u64, ip: u64) -> LoopRecord {
        LoopRecord {
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
        assert_eq!(pick_stall_stack::<Vec<Frame>>(vec![]), (vec![], None));
    }

    #[test]
    fn the_culprits_most_sampled_line_is_reported() {
        let at = |line: u32, tag: &str| {
            let culprit = Frame {
                line: Some(line),
                ..frame("read_large_file")
            };
            (vec![frame(tag)], Some(culprit))
        };
        let (stack, culprit) = pick_stall_stack(vec![
            at(47, "open"),
            at(48, "read1"),
            (vec![frame("x")], Some(frame("elsewhere"))),
            at(48, "read2"),
        ]);
        assert_eq!(
            culprit.unwrap().line,
            Some(48),
            "the hot line, not the first"
        );
        assert_eq!(
            stack[0].function.as_deref(),
            Some("read1"),
            "first at that line"
        );
    }

    #[test]
    fn the_last_line_counts_strict_calls_and_says_what_had_no_site() {
        let strict = crate::bpf::LoopOptions { strict: true };
        assert_eq!(
            header_counts(&strict, 40_000, 0).as_deref(),
            Some(", 40000 strict calls")
        );
        assert_eq!(
            header_counts(&strict, 39_988, 12).as_deref(),
            Some(", 40000 strict calls (12 of them at no call site: the strict-call map was full)")
        );
        assert_eq!(header_counts(&Default::default(), 5, 1), None);
    }

    #[test]
    fn forgetting_a_process_drops_its_samples_only() {
        let mut l = Loops::new();
        l.sample(rec(5, 1, 1));
        let mut other = rec(6, 1, 1);
        other.pid = 2;
        l.sample(other);
        l.forget_process(1);
        assert!(l.take_samples(5, 1).0.is_empty(), "pid 1's samples go");
        assert_eq!(l.take_samples(6, 1).1, 1, "other processes' stay");
    }
}

/// Privileged tests of the kernel programs alone (run as root by `cargo
/// xtask test`): the raw records of a real asyncio process.
#[cfg(test)]
mod kernel_tests {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use crate::bpf::{self, LoopOptions};
    use crate::ingest::decode::{self, LoopRecord, Record, StrictRecord};
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
            loaded.mode,
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
        TagMaps::of(&mut loaded.maps)
            .watch_process(pid, ThreadsMode::Loop.rule(false))
            .expect("watch");
        let start = Instant::now();
        let mut records: Vec<LoopRecord> = Vec::new();
        let mut sites: Vec<StrictRecord> = Vec::new();
        let mut episodes = Vec::new();
        let mut exited = false;
        while !exited && start.elapsed() < Duration::from_secs(15) {
            while let Some(item) = loaded.events.next() {
                match decode::decode(&item).expect("decodable record") {
                    Record::Loop(l) => records.push(l),
                    Record::Strict(s) => sites.push(s),
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
        // newfstatat (262) or statx (332), depending on the libc: the 20
        // os.stat of one call site, counted in the kernel, its stacks sent
        // once.
        let counts: Vec<_> = loaded
            .maps
            .strict_counts
            .iter()
            .map(|e| e.expect("a STRICT_COUNTS entry"))
            .collect();
        assert!(
            counts.iter().all(|(k, _)| k.tid == pid && k.tgid == pid),
            "only the loop thread: {counts:#?}"
        );
        let stats: Vec<_> = counts
            .iter()
            .filter(|(k, _)| k.nr == 262 || k.nr == 332)
            .collect();
        let calls: u64 = stats.iter().map(|(_, t)| t.calls).sum();
        assert_eq!(calls, 20, "20 os.stat on the loop: {counts:#?}");
        assert!(
            stats
                .iter()
                .all(|(_, t)| t.sent == 1 && t.max_ns < 50_000_000)
        );
        for (key, _) in &stats {
            let sent: Vec<_> = sites.iter().filter(|s| s.key() == *key).collect();
            assert_eq!(sent.len(), 1, "one record per site: {sites:#?}");
            assert!(!sent[0].ips.is_empty(), "user stacks");
        }
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
        let samples: Vec<&LoopRecord> = records
            .iter()
            .filter(|r| r.tid == pid && r.start_ns == e.start_ns)
            .collect();
        assert!(!samples.is_empty(), "samples of the episode: {records:#?}");
        assert_eq!(samples.len() as u32, e.samples, "each sample is counted");
        let lost = loaded.counter(blockwatch_common::Counter::LostLoopRecords);
        assert_eq!(lost, 0);
    }
}
