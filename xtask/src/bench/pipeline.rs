//! The pipeline's throughput: `trace -o json --threads all --threshold 1ms
//! -- workload block THREADS 2000 SECS`, where every 2 ms sleep of every
//! thread is a slow event (500 a second a thread). Threads double until the
//! first loss; each run prints what the workload offered beside what
//! blockwatch reported and lost, and blockwatch's CPU per reported event in
//! steady state.

use std::io::BufRead as _;
use std::os::fd::AsRawFd as _;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::proc::{BpfStats, bpf_prog_fds, bpf_run_ns, cpu_secs, runqueue_wait_ns};
use super::stats::{LineCounter, losses, print_table, progress, progress_done};
use super::targets::{Figure, Goal, Unit, thousands};
use super::tracer::strings;
use super::{Bench, Options, bench_dir};
use crate::run::display;

/// Microseconds each workload thread sleeps: 500 events/s a thread.
const SLEEP_US: u64 = 2000;
/// The steady window starts this long after the first event (start-up:
/// first stacks, cold symbol caches) and ends this long before the
/// workload does (the final drain).
const WARMUP: f64 = 1.0;
const COOLDOWN: f64 = 0.25;
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The ladder's top: 256,500 events/s offered, which this workload
/// reaches on 2 CPUs (about 240,000 measured bare).
const TOP_THREADS: usize = 512;

/// One `block` run under `trace`.
pub(super) struct BlockRun {
    pub threads: usize,
    /// How long the workload ran, seconds.
    pub secs: f64,
    /// Sleeps the workload completed (its own count), if it said.
    pub offered: Option<u64>,
    /// JSON events blockwatch wrote.
    pub events: u64,
    /// blockwatch's `N WHAT were lost` warnings.
    pub losses: Vec<(u64, String)>,
    /// blockwatch's own CPU over the whole run (not the workload's), seconds.
    pub cpu: f64,
    pub steady: Option<Steady>,
}

/// The run after start-up and before the final drain.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Steady {
    pub secs: f64,
    pub events: u64,
    /// blockwatch's CPU over the window, seconds.
    pub cpu: f64,
    /// What its kernel programs ran over the window (in the threads they
    /// hooked, the workload's and every other on the host), seconds; None
    /// without BPF statistics.
    pub kernel: Option<f64>,
    /// How long its threads waited for a CPU while runnable over the
    /// window, seconds: a reader that falls behind for want of a CPU, not
    /// of speed, shows here.
    pub cpu_wait: Option<f64>,
}

impl Steady {
    pub fn cpu_per_event_us(&self) -> f64 {
        self.cpu / self.events as f64 * 1e6
    }

    pub fn kernel_per_event_us(&self) -> Option<f64> {
        Some(self.kernel? / self.events as f64 * 1e6)
    }

    /// The share of the window blockwatch's threads were runnable but
    /// not running.
    pub fn cpu_wait_share(&self) -> Option<f64> {
        Some(self.cpu_wait? / self.secs)
    }
}

/// What blockwatch's kernel programs ran per event in a run with the
/// kernel timing them.
pub(super) struct Programs {
    threads: usize,
    /// Events reported a second.
    rate: f64,
    per_event_us: f64,
}

/// One reading of a running blockwatch, every [`SAMPLE_EVERY`].
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Seconds since spawn.
    t: f64,
    /// Its CPU seconds.
    cpu: f64,
    /// Events it wrote so far.
    events: u64,
    /// Its kernel programs' run time so far, ns.
    kernel_ns: Option<u64>,
    /// Its threads' wait for a CPU so far, ns.
    wait_ns: Option<u64>,
}

impl BlockRun {
    /// Events blockwatch said it lost: "without loss" means none. Lost
    /// stacks and user-stack copies only degrade an event that was
    /// reported (its stack is the frame-pointer walk); they are shown in
    /// the table, not counted here.
    fn lost(&self) -> u64 {
        self.losses
            .iter()
            .filter(|(_, what)| what == "events")
            .map(|(n, _)| n)
            .sum()
    }

    /// Events neither reported nor counted as lost: the workload's sleeps
    /// (nearly its every wait over 1 ms: a thread's creation, or a wait
    /// for a CPU on a busy machine, are episodes too), less the events
    /// reported and those lost (lost stacks and user-stack copies only degrade an event
    /// that was reported).
    fn unaccounted(&self) -> Option<i64> {
        Some(self.offered? as i64 - self.events as i64 - self.lost() as i64)
    }

    fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }

    fn offered_rate(&self) -> Option<f64> {
        self.offered.map(|n| n as f64 / self.secs)
    }

    pub fn cpu_per_event_us(&self) -> f64 {
        self.cpu / self.events.max(1) as f64 * 1e6
    }
}

/// From the first sample at least [`WARMUP`] after the first event to the
/// last one at least [`COOLDOWN`] before the workload's end (it runs
/// `secs` from about its first event); None when that is under 0.5 s.
fn steady_window(samples: &[Sample], secs: f64) -> Option<Steady> {
    let first = samples.iter().find(|s| s.events > 0)?.t;
    let start = samples.iter().find(|s| s.t >= first + WARMUP)?;
    let end = samples
        .iter()
        .rev()
        .find(|s| s.t <= first + secs - COOLDOWN)?;
    let events = end.events.checked_sub(start.events)?;
    let between = |a: Option<u64>, b: Option<u64>| Some(b?.checked_sub(a?)? as f64 / 1e9);
    (end.t - start.t >= 0.5 && events > 0).then_some(Steady {
        secs: end.t - start.t,
        events,
        cpu: end.cpu - start.cpu,
        kernel: between(start.kernel_ns, end.kernel_ns),
        cpu_wait: between(start.wait_ns, end.wait_ns),
    })
}

impl Bench {
    /// `trace -o json --threads all --threshold 1ms -- workload block
    /// THREADS 2000 SECS`, its stdout counted as it comes and its CPU
    /// sampled every 100 ms.
    pub(super) fn block_run(
        &self,
        threads: usize,
        secs: f64,
        user_stack: Option<&str>,
        programs: bool,
    ) -> anyhow::Result<BlockRun> {
        let mut args = strings(&[
            "trace",
            "-o",
            "json",
            "--threads",
            "all",
            "--threshold",
            "1ms",
        ]);
        if let Some(size) = user_stack {
            args.extend(strings(&["--user-stack-size", size]));
        }
        args.push("--".into());
        args.push(self.workload.display().to_string());
        args.extend([
            "block".into(),
            threads.to_string(),
            SLEEP_US.to_string(),
            format!("{secs}"),
        ]);
        let err_path = bench_dir().join("pipeline.stderr");
        let mut cmd = self.blockwatch_cmd(&args);
        cmd.stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_path)?)
            .stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", display(&cmd)))?;
        let stdout = child.stdout.take().context("blockwatch's stdout")?;
        // A deeper pipe, so that blockwatch never waits on our reading.
        // SAFETY: fcntl on a pipe we own; a failure only leaves it smaller.
        unsafe { libc::fcntl(stdout.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
        let events = Arc::new(AtomicU64::new(0));
        let reader = {
            let events = Arc::clone(&events);
            std::thread::spawn(move || count_lines(stdout, &events))
        };
        let sampled = sample_until_exit(&mut child, &events, secs + 60.0, programs);
        // The pipe closes once blockwatch and the workload are gone.
        let counter = reader
            .join()
            .map_err(|_| anyhow::anyhow!("stdout reader panicked"))?;
        let (ok, cpu, samples) = sampled?;
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        if !ok {
            bail!("blockwatch failed:\n{stderr}");
        }
        Ok(BlockRun {
            threads,
            secs,
            offered: counter.other.iter().rev().find_map(|l| l.parse().ok()),
            events: counter.events,
            losses: losses(&stderr),
            cpu,
            steady: steady_window(&samples, secs),
        })
    }

    pub(super) fn pipeline(&self, opts: &Options) -> anyhow::Result<Vec<Figure>> {
        println!(
            "\n== pipeline: slow events per second (--threads all --threshold 1ms; threads sleeping 2 ms in a loop, 500 events/s each) =="
        );
        let secs = (opts.secs * 8.0).clamp(3.0, 8.0);
        let mut threads = if opts.quick { 16 } else { 8 };
        let mut runs: Vec<BlockRun> = Vec::new();
        loop {
            progress(&format!("bench: pipeline {threads} threads, {secs:.0} s"));
            let r = match self.block_run(threads, secs, None, false) {
                Ok(r) => r,
                Err(e) if !runs.is_empty() => {
                    progress_done();
                    println!(
                        "bench: the run with {threads} threads failed, the ladder stops there: {e:#}"
                    );
                    break;
                }
                Err(e) => return Err(e),
            };
            runs.push(r);
            let lost: Vec<bool> = runs.iter().map(|r| r.lost() > 0).collect();
            match next_threads(threads, &lost, TOP_THREADS) {
                Some(n) => threads = n,
                None => break,
            }
        }
        progress_done();
        runs.sort_by_key(|r| r.threads);
        print_pipeline(&runs);
        let programs = self.pipeline_programs(&runs, secs);
        match &programs {
            Some(p) => println!(
                "kernel programs: {:.1} µs an event at {} threads ({}/s reported), from one more run with kernel.bpf_stats_enabled set \
                 (apart from the ladder: timing costs every program run two clock reads); paid in the threads they hook, the workload's, \
                 not in blockwatch's CPU above",
                p.per_event_us,
                p.threads,
                thousands(p.rate)
            ),
            None => println!(
                "(kernel programs: not measured, kernel.bpf_stats_enabled could not be set or the run failed)"
            ),
        }
        Ok(pipeline_figures(&runs, programs.as_ref()))
    }

    /// One more run at the first rung that lost (else the top one), with
    /// the kernel timing BPF programs: what blockwatch's programs ran per
    /// event there.
    fn pipeline_programs(&self, runs: &[BlockRun], secs: f64) -> Option<Programs> {
        let rung = runs
            .iter()
            .find(|r| r.lost() > 0)
            .or_else(|| runs.last())?
            .threads;
        let _stats = BpfStats::enable()?;
        progress(&format!("bench: pipeline programs, {rung} threads"));
        let run = self.block_run(rung, secs, None, true);
        progress_done();
        let run = run.ok()?;
        Some(Programs {
            threads: rung,
            rate: run.rate(),
            per_event_us: run.steady?.kernel_per_event_us()?,
        })
    }
}

/// The next rung of the ladder after `threads`, given whether each run so
/// far lost anything: double until the first loss; when the first rung
/// already loses, halve instead until one does not, so that a lossless
/// rate is known.
fn next_threads(threads: usize, lost: &[bool], top: usize) -> Option<usize> {
    if lost.iter().all(|&l| !l) {
        (threads < top).then_some(threads * 2)
    } else if lost.iter().all(|&l| l) {
        (threads > 1).then_some(threads / 2)
    } else {
        None
    }
}

/// Counts `stdout`'s JSON lines into `events` as they come. The lines
/// are found by std's `read_until` (an optimised memchr) rather than a
/// loop of our own: xtask is built unoptimised, and 100,000 events a
/// second are 150 MB/s of JSON to scan on the CPUs blockwatch uses.
fn count_lines(stdout: std::process::ChildStdout, events: &AtomicU64) -> LineCounter {
    let mut counter = LineCounter::default();
    let mut reader = std::io::BufReader::with_capacity(1 << 20, stdout);
    let mut line = Vec::with_capacity(1 << 16);
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                counter.line(&line);
                events.store(counter.events, Ordering::Relaxed);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    counter
}

/// Samples blockwatch's CPU and events every 100 ms until it exits (killed
/// after `limit` seconds): (exited 0, its CPU seconds at exit, samples).
/// The CPU is read from its own /proc/PID/stat once it has exited and
/// before it is reaped: wait4's figure would add the workload's CPU,
/// which blockwatch reaped.
fn sample_until_exit(
    child: &mut Child,
    events: &AtomicU64,
    limit: f64,
    programs: bool,
) -> anyhow::Result<(bool, f64, Vec<Sample>)> {
    let pid = child.id();
    let started = Instant::now();
    let mut samples = Vec::new();
    // Looked for until the first event, by when every program is loaded
    // and attached.
    let mut progs = Vec::new();
    loop {
        let t = started.elapsed().as_secs_f64();
        let exited = has_exited(pid)?;
        let written = events.load(Ordering::Relaxed);
        if programs && written == 0 && !exited {
            progs = bpf_prog_fds(pid);
        }
        if let Some(cpu) = cpu_secs(pid) {
            samples.push(Sample {
                t,
                cpu,
                events: written,
                kernel_ns: (!progs.is_empty())
                    .then(|| bpf_run_ns(pid, &progs))
                    .flatten(),
                wait_ns: runqueue_wait_ns(pid),
            });
        }
        if exited {
            let status = child.wait()?;
            let cpu = samples.last().map_or(f64::NAN, |s| s.cpu);
            return Ok((status.success(), cpu, samples));
        }
        if t > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("blockwatch did not exit after {limit:.0} s");
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
}

/// Whether our child `pid` has exited, leaving it a zombie (not reaped),
/// its /proc entry still readable.
fn has_exited(pid: u32) -> anyhow::Result<bool> {
    // SAFETY: a zeroed siginfo_t is a valid one for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child with a valid pointer; WNOWAIT
    // leaves it to be reaped by Child::wait.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc != 0 {
        bail!("waitid: {}", std::io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` (si_pid stays 0 while the child runs).
    Ok(unsafe { info.si_pid() } != 0)
}

fn print_pipeline(runs: &[BlockRun]) {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let lost = if r.losses.is_empty() {
                "0".to_string()
            } else {
                r.losses
                    .iter()
                    .map(|(n, what)| format!("{n} {}", what.split(' ').next().unwrap_or(what)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            vec![
                r.threads.to_string(),
                format!(
                    "{} of {}",
                    r.offered_rate().map_or("?".into(), thousands),
                    thousands(((r.threads as u64 + 1) * 1_000_000 / SLEEP_US) as f64)
                ),
                thousands(r.rate()),
                lost,
                r.unaccounted().map_or("?".into(), |n| n.to_string()),
                r.steady.map_or("-".into(), |s| {
                    format!(
                        "{:.1} µs ({}/s)",
                        s.cpu_per_event_us(),
                        thousands(s.events as f64 / s.secs)
                    )
                }),
                format!("{:.1} µs", r.cpu_per_event_us()),
                r.steady
                    .and_then(|s| s.cpu_wait_share())
                    .map_or("-".into(), |w| format!("{:.0}%", w * 100.0)),
            ]
        })
        .collect();
    print_table(
        &[
            "threads",
            "offered events/s (of nominal)",
            "reported/s",
            "lost",
            "unaccounted",
            "CPU/event steady (rate)",
            "CPU/event whole run",
            "blockwatch waiting for a CPU",
        ]
        .map(String::from),
        &rows,
    );
    println!(
        "(offered: the sleeps the workload completed, its own count, its main thread's included (nominal: 500/s a thread, +1 main); reported: JSON events on blockwatch's stdout; \
         lost: blockwatch's loss warnings; \
         unaccounted: offered − reported − lost events: above 0, events missing silently; below 0, episodes that were no sleep, \
         such as a thread's creation (clone3) or a wait for a CPU over 1 ms on a busy machine)"
    );
    println!(
        "(CPU/event steady: utime+stime of all blockwatch's threads (/proc/PID/stat, 10 ms ticks), sampled every 100 ms, \
         from {WARMUP:.0} s after the first event to {COOLDOWN} s before the workload's end, over the events written in that window; \
         whole run: its utime+stime at exit, start-up and final drain included, over all events; the workload's CPU is not counted)"
    );
    println!(
        "(waiting for a CPU: the share of the steady window blockwatch's threads were runnable but not running (schedstat), \
         high where the workload leaves it no CPU)"
    );
    println!(
        "(symbolization is always on: blockwatch has no switch to turn it off, and events without stacks are no use)"
    );
}

/// Slow events/s sustained without loss (≥ 100,000) and the CPU per event
/// in steady state at the fastest lossless run (≤ 5 µs).
fn pipeline_figures(runs: &[BlockRun], programs: Option<&Programs>) -> Vec<Figure> {
    let best = runs
        .iter()
        .filter(|r| r.lost() == 0)
        .max_by(|a, b| a.rate().total_cmp(&b.rate()));
    let first_loss = runs.iter().find(|r| r.lost() > 0);
    let name = "pipeline: slow events/s sustained without loss";
    let goal = Goal::AtLeast(100_000.0);
    let rate = match best {
        Some(b) => {
            let bound = match first_loss {
                Some(l) => format!(
                    "{} threads; loss at {} threads, {} offered{}",
                    b.threads,
                    l.threads,
                    l.offered_rate()
                        .map_or("?/s".into(), |v| format!("{}/s", thousands(v))),
                    l.steady.map_or(String::new(), |s| loss_bound(
                        &s,
                        programs.filter(|p| p.threads == l.threads)
                    ))
                ),
                None => format!(
                    "{} threads, no loss at any rung: bounded by what the workload offered, {}",
                    b.threads,
                    b.offered_rate()
                        .map_or("?/s".into(), |v| format!("{}/s", thousands(v)))
                ),
            };
            Figure::new(name, b.rate(), Unit::PerSec, goal).with_note(bound)
        }
        None => Figure::missing(name, "loss at every rung", Unit::PerSec, goal),
    };
    let name = "pipeline: blockwatch CPU per reported event (steady)";
    let goal = Goal::AtMost(5.0);
    let at = best.or_else(|| runs.first());
    let cpu = match at.and_then(|r| Some((r, r.steady?))) {
        Some((r, s)) => {
            Figure::new(name, s.cpu_per_event_us(), Unit::Micros, goal).with_note(format!(
                "{} threads, {}/s{}",
                r.threads,
                thousands(s.events as f64 / s.secs),
                if r.lost() > 0 { ", with loss" } else { "" }
            ))
        }
        None => Figure::missing(name, "no steady window", Unit::Micros, goal),
    };
    vec![rate, cpu]
}

/// What a run that lost events spent, for the reader to judge what bounds
/// the rate: blockwatch's CPU and its programs' per event, and how long it
/// waited for a CPU it could not have.
fn loss_bound(s: &Steady, programs: Option<&Programs>) -> String {
    let mut out = format!(", where blockwatch used {:.1} µs", s.cpu_per_event_us());
    if let Some(p) = programs {
        out += &format!(" and its kernel programs {:.1} µs", p.per_event_us);
    }
    out += " an event";
    if let Some(w) = s.cpu_wait_share() {
        out += &format!(" and waited for a CPU {:.0}% of the time", w * 100.0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(points: &[(f64, f64, u64)]) -> Vec<Sample> {
        points
            .iter()
            .map(|&(t, cpu, events)| Sample {
                t,
                cpu,
                events,
                // The kernel programs ran 2 µs an event, and blockwatch
                // waited for a CPU a fifth of the time.
                kernel_ns: Some(events * 2000),
                wait_ns: Some((t * 0.2e9) as u64),
            })
            .collect()
    }

    #[test]
    fn the_steady_window_skips_start_up_and_the_drain() {
        // Attach takes 0.5 s; the first event at 0.6 s; a 3 s workload.
        let s = samples(&[
            (0.1, 0.10, 0),
            (0.6, 0.30, 10),
            (1.0, 0.32, 200),
            (1.6, 0.34, 500),
            (2.0, 0.35, 700),
            (3.3, 0.40, 1300),
            (3.5, 0.41, 1400),
            (3.8, 0.60, 1500),
        ]);
        let w = steady_window(&s, 3.0).expect("a window");
        assert!((w.secs - 1.7).abs() < 1e-9);
        assert_eq!(w.events, 800);
        assert!((w.cpu - 0.06).abs() < 1e-9);
        assert!((w.cpu_per_event_us() - 75.0).abs() < 1e-6);
        assert!((w.kernel_per_event_us().unwrap() - 2.0).abs() < 1e-6);
        assert!((w.cpu_wait_share().unwrap() - 0.2).abs() < 1e-6);
    }

    #[test]
    fn a_figure_missing_from_either_end_of_the_window_is_none() {
        let mut s = samples(&[(0.6, 0.3, 10), (1.6, 0.34, 500), (3.0, 0.4, 1200)]);
        s[1].kernel_ns = None;
        let w = steady_window(&s, 3.0).expect("a window");
        assert_eq!(w.kernel_per_event_us(), None);
        assert!(w.cpu_wait_share().is_some());
    }

    #[test]
    fn the_ladder_doubles_to_the_first_loss_or_halves_to_none() {
        assert_eq!(next_threads(16, &[false], 512), Some(32));
        assert_eq!(next_threads(512, &[false; 6], 512), None);
        assert_eq!(next_threads(64, &[false, false, true], 512), None);
        assert_eq!(next_threads(16, &[true], 512), Some(8));
        assert_eq!(next_threads(8, &[true, true], 512), Some(4));
        assert_eq!(next_threads(4, &[true, true, false], 512), None);
        assert_eq!(next_threads(1, &[true; 5], 512), None);
    }

    #[test]
    fn no_window_without_events_or_time() {
        assert_eq!(
            steady_window(&samples(&[(0.1, 0.1, 0), (5.0, 0.2, 0)]), 3.0),
            None
        );
        let short = samples(&[(0.5, 0.1, 1), (1.5, 0.2, 100), (1.6, 0.2, 110)]);
        assert_eq!(steady_window(&short, 1.5), None);
    }
}
