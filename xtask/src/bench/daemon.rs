//! The daemon's footprint: `daemon --auto` idle (resident memory by
//! component, CPU over an idle window after start-up has settled), and a
//! daemon's peak memory while a workload floods it with slow events.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::proc::{Rss, cpu_between, cpu_secs, last_pid, status_kb, thread_cpu_ns};
use super::stats::{progress, progress_done};
use super::targets::{Figure, Goal, Unit};
use super::tracer::{free_listen, strings, wait_for};
use super::{Bench, Options, bench_dir};

/// Threads of the load workload: 32,000 slow events/s offered.
const LOAD_THREADS: usize = 64;

struct Idle {
    settled_after: f64,
    rss_start: Rss,
    rss_end: Rss,
    window: f64,
    cpu: f64,
    /// How the CPU was read: schedstat (exact) or, when the daemon's
    /// threads changed meanwhile, /proc/PID/stat's ticks.
    cpu_source: &'static str,
    /// Processes and threads the host started during the window.
    host_pids: Option<u64>,
}

impl Idle {
    fn print(&self) {
        let mib = |kb: u64| kb as f64 / 1024.0;
        println!(
            "daemon --auto idle, {:.1} s after it was ready: RSS {:.1} MiB: {}",
            self.settled_after,
            mib(self.rss_start.total),
            self.rss_start.describe()
        );
        println!(
            "  {:.0} s later: RSS {:.1} MiB: {}",
            self.window,
            mib(self.rss_end.total),
            self.rss_end.describe()
        );
        println!(
            "  CPU {:.1} ms over {:.0} s of idle = {:.3} % of a CPU (all its threads, {}){}",
            self.cpu * 1e3,
            self.window,
            self.cpu / self.window * 100.0,
            self.cpu_source,
            self.host_pids.map_or(String::new(), |n| format!(
                "; the host started {n} processes and threads meanwhile (others' work on this machine, which --auto watches)"
            ))
        );
    }
}

impl Bench {
    pub(super) fn daemon(&self, opts: &Options) -> anyhow::Result<Vec<Figure>> {
        println!("\n== daemon: memory and CPU ==");
        let idle_secs = if opts.quick { 10.0 } else { 15.0 };
        let idle = self.with_daemon(&strings(&["daemon", "--auto"]), |d| idle(d, idle_secs))?;
        idle.print();
        let mib = |kb: u64| kb as f64 / 1024.0;
        let pct = idle.cpu / idle.window * 100.0;

        let load_secs = if opts.quick { 4.0 } else { 6.0 };
        let args = strings(&[
            "daemon",
            "--comm",
            "bwbench-load",
            "--threads",
            "all",
            "--threshold",
            "1ms",
        ]);
        let (peak, after) = self.with_daemon(&args, |d| self.under_load(d, load_secs))?;
        println!(
            "daemon --comm bwbench-load --threads all --threshold 1ms under load ({LOAD_THREADS} threads × 500 slow events/s for {load_secs:.0} s):\n  \
             peak RSS {:.1} MiB: {}\n  1 s after: {:.1} MiB",
            mib(peak.total),
            peak.describe(),
            mib(after)
        );
        let idle_rss = idle.rss_start.total.max(idle.rss_end.total);
        Ok(vec![
            Figure::new(
                "daemon --auto idle: RSS",
                mib(idle_rss),
                Unit::MiB,
                Goal::AtMost(25.0),
            )
            .with_note(format!(
                "anon {:.1} MiB",
                mib(idle.rss_start.anon.max(idle.rss_end.anon))
            )),
            Figure::new(
                "daemon --auto idle: CPU (% of one CPU)",
                pct,
                Unit::CpuPercent,
                Goal::AtMost(0.05),
            )
            .with_note(format!("over {:.0} s", idle.window)),
            Figure::new(
                "daemon peak RSS under load",
                mib(peak.total),
                Unit::MiB,
                Goal::AtMost(100.0),
            )
            .with_note(format!("{LOAD_THREADS} threads, ~32,000 events/s")),
        ])
    }

    /// Starts `blockwatch ARGS --listen ADDR`, waits until it watches, runs
    /// `f` on it and stops it.
    fn with_daemon<T>(
        &self,
        args: &[String],
        f: impl FnOnce(&mut Child) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let err_path = bench_dir().join("daemon.stderr");
        let mut args = args.to_vec();
        args.extend(["--listen".into(), free_listen()]);
        let mut daemon = self
            .blockwatch_cmd(&args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path)?)
            .stdin(Stdio::null())
            .spawn()
            .context("starting the daemon")?;
        let result =
            wait_for(&err_path, "watching", &err_path, &mut daemon).and_then(|()| f(&mut daemon));
        progress_done();
        let _ = daemon.kill();
        let _ = daemon.wait();
        result.with_context(|| format!("blockwatch {}", args.join(" ")))
    }

    /// The workload's load on a watching daemon: (RSS at its peak, VmRSS
    /// KiB 1 s after the load).
    fn under_load(&self, daemon: &mut Child, secs: f64) -> anyhow::Result<(Rss, u64)> {
        let pid = daemon.id();
        std::thread::sleep(Duration::from_millis(500));
        progress(&format!("bench: daemon under load, {secs:.0} s"));
        let mut load = Command::new(&self.workload)
            .args([
                "block",
                &LOAD_THREADS.to_string(),
                "2000",
                &format!("{secs}"),
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("starting the load")?;
        let mut peak = Rss::of(pid);
        while load.try_wait()?.is_none() {
            let rss = Rss::of(pid);
            if rss.total > peak.total {
                peak = rss;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_secs(1));
        Ok((peak, status_kb(pid, "VmRSS")))
    }
}

/// Waits for start-up to settle (at least 2 s, then until a second passes
/// with under 2 ms of CPU, 10 s at most), then reads the memory and the CPU
/// over `secs` of idle.
fn idle(daemon: &mut Child, secs: f64) -> anyhow::Result<Idle> {
    let pid = daemon.id();
    let ready = Instant::now();
    progress("bench: daemon --auto settling");
    std::thread::sleep(Duration::from_secs(2));
    loop {
        let before = cpu_now(pid);
        std::thread::sleep(Duration::from_secs(1));
        let quiet = before.zip(cpu_now(pid)).is_some_and(|(a, b)| b - a < 0.002);
        if quiet || ready.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    let settled_after = ready.elapsed().as_secs_f64();
    progress(&format!("bench: daemon --auto idle, {secs:.0} s"));
    let rss_start = Rss::of(pid);
    let (threads0, ticks0, pids0) = (thread_cpu_ns(pid), cpu_secs(pid), last_pid());
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (threads1, ticks1, pids1) = (thread_cpu_ns(pid), cpu_secs(pid), last_pid());
    let window = t0.elapsed().as_secs_f64();
    let rss_end = Rss::of(pid);
    let (cpu, cpu_source) = match cpu_between(&threads0, &threads1) {
        Some(cpu) => (cpu, "/proc/PID/task/*/schedstat, exact"),
        None => (
            ticks0.zip(ticks1).map_or(f64::NAN, |(a, b)| b - a),
            "/proc/PID/stat ticks, 10 ms: its threads changed",
        ),
    };
    Ok(Idle {
        settled_after,
        rss_start,
        rss_end,
        window,
        cpu,
        cpu_source,
        host_pids: pids0.zip(pids1).map(|(a, b)| b.saturating_sub(a)),
    })
}

/// The CPU seconds of a process's live threads, exactly.
fn cpu_now(pid: u32) -> Option<f64> {
    let threads = thread_cpu_ns(pid);
    (!threads.is_empty()).then(|| threads.values().sum::<u64>() as f64 / 1e9)
}
