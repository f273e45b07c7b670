//! `cargo xtask bench`: what blockwatch costs, measured side by side in one
//! run and printed as ratios.
//!
//! - host: the tax on processes blockwatch does not report — a getppid loop,
//!   1-byte reads from /dev/zero and a two-thread pipe ping-pong — bare, and
//!   under `trace` (watching another, idle process), `daemon --auto`
//!   (watching everything), `trace --strict` and the bpftrace equivalent
//!   (syscall tracepoint with a TID filter, sched_switch with a map lookup);
//! - http: an aiohttp server and a Node `http` server under wrk, bare and
//!   watched, with the events `trace --pid` reported (a healthy saturated
//!   loop should have none);
//! - pipeline: slow events per second reported before any is lost, the
//!   daemon's memory idle and under load;
//! - symbolize: stacks per second cold and warm, and what copying user
//!   stacks for DWARF unwinding costs per event.
//!
//! The machines are small and noisy: every configuration is measured
//! `--reps` times, interleaved (bare, tracer, bare, tracer…), and the median
//! is kept. Nothing here fails on a slow result; it only prints.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::run::{cargo, display, home, root_dir};
use crate::setup::{self, Package};

/// What `cargo xtask bench` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Repetitions of each measurement (medians are kept).
    pub reps: usize,
    /// Seconds of each measurement.
    pub secs: f64,
    /// Sections to run (all when empty): host, http, pipeline, symbolize.
    pub only: Vec<String>,
    pub quick: bool,
}

pub const SECTIONS: [&str; 4] = ["host", "http", "pipeline", "symbolize"];

impl Options {
    fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }
}

/// Where the bench builds its workloads and keeps its scratch files.
fn bench_dir() -> PathBuf {
    root_dir().join("target/bench")
}

pub fn run(blockwatch: &Path, opts: &Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(bench_dir())?;
    let started = Instant::now();
    let b = Bench::new(blockwatch)?;
    println!(
        "bench: {} repetitions of {:.1} s each, interleaved; medians (Linux {}, {} CPUs)",
        opts.reps,
        opts.secs,
        kernel_release(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if opts.wants("host") {
        b.host(opts)?;
    }
    if opts.wants("http") {
        b.http(opts)?;
    }
    if opts.wants("pipeline") {
        b.pipeline(opts)?;
    }
    if opts.wants("symbolize") {
        b.symbolize(opts)?;
    }
    println!("\nbench: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

struct Bench {
    blockwatch: PathBuf,
    workload: PathBuf,
    /// Flags `blockwatch trace --help` lists (others are being added).
    has_strict: bool,
    has_user_stack_size: bool,
}

impl Bench {
    fn new(blockwatch: &Path) -> anyhow::Result<Bench> {
        let workload = bench_dir().join("bwbench-load");
        let source = root_dir().join("bench/workload.c");
        println!(
            "bench: building {} from {}",
            workload.display(),
            source.display()
        );
        crate::run::check(
            Command::new("gcc")
                .args(["-O2", "-pthread", "-o"])
                .arg(&workload)
                .arg(&source),
        )
        .context("building the workloads needs gcc (Debian: apt-get install gcc)")?;
        let help = Command::new(blockwatch)
            .args(["trace", "--help"])
            .output()
            .context("blockwatch trace --help")?;
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        Ok(Bench {
            blockwatch: blockwatch.to_path_buf(),
            workload,
            has_strict: help.contains("--strict"),
            has_user_stack_size: help.contains("--user-stack-size"),
        })
    }

    /// Runs the workload `mode` for `secs` and returns nanoseconds per
    /// operation.
    fn ns_per_op(&self, mode: &str, secs: f64) -> anyhow::Result<f64> {
        let out = Command::new(&self.workload)
            .args([mode, &format!("{secs}")])
            .output()
            .context("running the workload")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(|s| s.parse::<f64>());
        match (it.next(), it.next(), out.status.success()) {
            (Some(Ok(ops)), Some(Ok(ns)), true) if ops > 0.0 => Ok(ns / ops),
            _ => bail!("workload {mode} failed: {text:?}"),
        }
    }

    /// blockwatch with `args`; leading `NAME=VALUE` arguments are set in
    /// its environment instead (a variant of a run, such as no loop clock).
    fn blockwatch_cmd(&self, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.blockwatch);
        let env = args.iter().take_while(|a| {
            a.split_once('=')
                .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        });
        let mut n = 0;
        for kv in env {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
            n += 1;
        }
        cmd.args(&args[n..]);
        cmd
    }

    // ---------------------------------------------------------------- host

    fn host(&self, opts: &Options) -> anyhow::Result<()> {
        println!("\n== host tax: processes blockwatch does not report ==");
        let bpftrace = ensure_bpftrace();
        // The process `trace` and the peer watch: idle, never scheduled.
        let mut idle = Command::new("sleep")
            .arg("100000")
            .spawn()
            .context("sleep")?;
        let tracers = self.host_tracers(idle.id(), bpftrace);
        let workloads = ["getppid", "read", "pingpong"];
        let mut results: BTreeMap<(usize, &str), Vec<f64>> = BTreeMap::new();
        for rep in 0..opts.reps {
            for (ti, tracer) in tracers.iter().enumerate() {
                print!(
                    "\rbench: host rep {}/{} {:<16}",
                    rep + 1,
                    opts.reps,
                    tracer.label()
                );
                let _ = std::io::stdout().flush();
                let running = tracer.start(self)?;
                for w in workloads {
                    let ns = self.ns_per_op(w, opts.secs)?;
                    results.entry((ti, w)).or_default().push(ns);
                }
                running.stop()?;
            }
        }
        println!("\r{:<60}", "");
        let _ = idle.kill();
        let _ = idle.wait();
        self.print_host(&tracers, &workloads, &results, bpftrace);
        Ok(())
    }

    /// Bare first (the ratios' denominator), then `trace` (the default
    /// mode's tax, which the verdict line checks), then the rest.
    fn host_tracers(&self, idle_pid: u32, bpftrace: bool) -> Vec<Tracer> {
        let pid = idle_pid.to_string();
        let mut tracers = vec![
            Tracer::Bare,
            Tracer::Blockwatch {
                label: "trace",
                args: strings(&["trace", "-o", "json", "--pid", &pid]),
            },
            Tracer::Blockwatch {
                label: "daemon --auto",
                args: strings(&["daemon", "--auto", "--listen", &free_listen()]),
            },
        ];
        if self.has_strict {
            tracers.push(Tracer::Blockwatch {
                label: "trace --strict",
                args: strings(&["trace", "-o", "json", "--strict", "--pid", &pid]),
            });
        }
        if bpftrace {
            tracers.push(Tracer::Bpftrace {
                script: bpftrace_script(idle_pid),
            });
        }
        tracers
    }

    fn print_host(
        &self,
        tracers: &[Tracer],
        workloads: &[&str],
        results: &BTreeMap<(usize, &str), Vec<f64>>,
        bpftrace: bool,
    ) {
        let mut header = vec!["workload".to_string()];
        header.extend(tracers.iter().map(|t| t.label().to_string()));
        if !self.has_strict {
            header.push("trace --strict".into());
        }
        if !bpftrace {
            header.push("bpftrace".into());
        }
        let mut rows = Vec::new();
        for &w in workloads {
            let bare = median(&results[&(0, w)]);
            let mut row = vec![format!("{w} (ns/op)")];
            row.push(format!("{bare:.0}"));
            for ti in 1..tracers.len() {
                let m = median(&results[&(ti, w)]);
                row.push(format!("{m:.0} ({:.2}×)", m / bare));
            }
            if !self.has_strict {
                row.push("n/a (no --strict)".into());
            }
            if !bpftrace {
                row.push("n/a (no bpftrace)".into());
            }
            rows.push(row);
        }
        print_table(&header, &rows);
        let tax = |w: &str| median(&results[&(1, w)]) / median(&results[&(0, w)]) - 1.0;
        let (g, r) = (tax("getppid"), tax("read"));
        // How much bare runs of the same loop differed: the noise floor.
        let spread = |w: &str| {
            let v = &results[&(0, w)];
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, 0.0f64), |(l, h), &x| (l.min(x), h.max(x)));
            (hi - lo) / median(v)
        };
        println!(
            "default mode (trace, untagged) within 3% on the syscall loops: {} (getppid {:+.1}%, read {:+.1}%; \
             bare runs spread over {:.1}% and {:.1}%)",
            if g <= 0.03 && r <= 0.03 { "yes" } else { "NO" },
            g * 100.0,
            r * 100.0,
            spread("getppid") * 100.0,
            spread("read") * 100.0
        );
        println!(
            "(trace watches an idle process; daemon --auto watches every process, the workload's threads included;\n \
             --strict watches the idle process; bpftrace: raw_syscalls:sys_enter with a TID filter and sched_switch with a map lookup)"
        );
    }

    // ---------------------------------------------------------------- http

    /// The same wrk load on an asyncio server (aiohttp) and a Node `http`
    /// server, each bare and watched: what watching a saturated loop costs
    /// in each runtime.
    fn http(&self, opts: &Options) -> anyhow::Result<()> {
        let python = aiohttp_venv()?;
        setup::ensure_packages(&[
            Package {
                name: "wrk",
                command: Some("wrk"),
            },
            Package {
                name: "nodejs",
                command: Some("node"),
            },
        ])?;
        let mut aiohttp = Command::new(&python);
        aiohttp.arg(root_dir().join("bench/http_server.py"));
        self.http_server("asyncio HTTP server (aiohttp)", aiohttp, opts)?;
        let mut node = Command::new("node");
        node.arg(root_dir().join("subjects/node_http_server.js"));
        self.http_server("Node http server", node, opts)
    }

    /// `server PORT` (which prints "ready" when it accepts connections)
    /// under wrk, bare and under each tracer, interleaved.
    fn http_server(&self, title: &str, mut server: Command, opts: &Options) -> anyhow::Result<()> {
        println!("\n== {title} under wrk ==");
        let port = free_port();
        let mut server = server
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {title}"))?;
        let ready = {
            use std::io::BufRead as _;
            let out = server.stdout.take().expect("piped");
            let mut line = String::new();
            std::io::BufReader::new(out).read_line(&mut line).ok();
            line.trim() == "ready"
        };
        if !ready {
            let _ = server.kill();
            let _ = server.wait();
            bail!("the {title} did not start");
        }
        let pid = server.id().to_string();
        let tracers = [
            Tracer::Bare,
            Tracer::Blockwatch {
                label: "trace --pid (watched)",
                args: strings(&["trace", "-o", "json", "--pid", &pid]),
            },
            // The same without the loop's iteration clock: what reading it
            // at each sample and switch-out (the episode boundary of a loop
            // that never sleeps) costs, beside the rest.
            Tracer::Blockwatch {
                label: "trace --pid, no loop clock",
                args: strings(&[
                    "BLOCKWATCH_NO_LOOP_CLOCK=1",
                    "trace",
                    "-o",
                    "json",
                    "--pid",
                    &pid,
                ]),
            },
            Tracer::Blockwatch {
                label: "daemon --auto",
                args: strings(&["daemon", "--auto", "--listen", &free_listen()]),
            },
        ];
        let url = format!("http://127.0.0.1:{port}/");
        let secs = (opts.secs * 2.0).max(2.0).round() as u64;
        let mut rps: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut p99: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let mut reports: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
        let result = (|| -> anyhow::Result<()> {
            // Warm up the server (imports, first connections).
            wrk(&url, 1)?;
            for rep in 0..opts.reps {
                for (ti, tracer) in tracers.iter().enumerate() {
                    print!(
                        "\rbench: http rep {}/{} {:<24}",
                        rep + 1,
                        opts.reps,
                        tracer.label()
                    );
                    let _ = std::io::stdout().flush();
                    let running = tracer.start(self)?;
                    let (r, p) = wrk(&url, secs)?;
                    running.stop()?;
                    rps.entry(ti).or_default().push(r);
                    p99.entry(ti).or_default().push(p);
                    if tracer.reports_json() {
                        reports.entry(ti).or_default().push(json_lines() as f64);
                    }
                }
            }
            Ok(())
        })();
        println!("\r{:<60}", "");
        let _ = server.kill();
        let _ = server.wait();
        result?;
        print_http(&tracers, &rps, &p99, &reports);
        println!("(wrk -t1 -c16 -d{secs}s on the same 2 CPUs as the server and blockwatch)");
        Ok(())
    }

    // ------------------------------------------------------------ pipeline

    /// `trace -- workload block THREADS 2000 SECS` with a 1 ms threshold:
    /// every 2 ms sleep of every thread is a slow event.
    fn block_run(
        &self,
        threads: usize,
        secs: f64,
        user_stack: Option<&str>,
    ) -> anyhow::Result<Run> {
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
        args.extend(strings(&[
            "block",
            &threads.to_string(),
            "2000",
            &format!("{secs}"),
        ]));
        let err_path = bench_dir().join("pipeline.stderr");
        let mut cmd = self.blockwatch_cmd(&args);
        cmd.stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path)?);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", display(&cmd)))?;
        let (status, cpu) = wait_with_cpu(child)?;
        let elapsed = started.elapsed().as_secs_f64();
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        if !status {
            bail!("blockwatch failed:\n{stderr}");
        }
        let events = stderr
            .lines()
            .find_map(|l| {
                l.strip_prefix("blockwatch: ")?
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0u64);
        Ok(Run {
            events,
            lost: lost_events(&stderr),
            secs: secs.min(elapsed),
            cpu,
        })
    }

    fn pipeline(&self, opts: &Options) -> anyhow::Result<()> {
        println!("\n== pipeline: slow events per second (threshold 1 ms, 2 ms sleeps) ==");
        let ladder: &[usize] = if opts.quick {
            &[4, 16, 64]
        } else {
            &[2, 4, 8, 16, 32, 64, 128]
        };
        let secs = opts.secs.max(1.0) * 2.0;
        let mut rows = Vec::new();
        let mut best = 0.0f64;
        let mut first_loss = None;
        for &threads in ladder {
            print!("\rbench: pipeline {threads} threads ");
            let _ = std::io::stdout().flush();
            let r = self.block_run(threads, secs, None)?;
            let rate = r.events as f64 / r.secs;
            if r.lost == 0 {
                best = best.max(rate);
            } else if first_loss.is_none() {
                first_loss = Some(rate);
            }
            rows.push(vec![
                threads.to_string(),
                format!("{rate:.0}"),
                r.lost.to_string(),
                format!("{:.1} µs", r.cpu / r.events.max(1) as f64 * 1e6),
            ]);
            if r.lost > 0 {
                break;
            }
        }
        println!("\r{:<60}", "");
        print_table(
            &[
                "threads",
                "events/s reported",
                "lost",
                "blockwatch CPU/event",
            ]
            .map(String::from),
            &rows,
        );
        match first_loss {
            Some(rate) => println!(
                "sustained without loss: {best:.0} events/s; first loss at {rate:.0} events/s"
            ),
            None => println!(
                "sustained without loss: {best:.0} events/s (no loss up to the workload's limit on this machine)"
            ),
        }
        println!(
            "(symbolization is always on: blockwatch has no switch to turn it off, and events without stacks are no use)"
        );
        self.daemon_rss(opts)
    }

    fn daemon_rss(&self, opts: &Options) -> anyhow::Result<()> {
        let err_path = bench_dir().join("daemon.stderr");
        let mut daemon = self
            .blockwatch_cmd(&strings(&[
                "daemon",
                "--listen",
                &free_listen(),
                "--comm",
                "bwbench-load",
                "--threads",
                "all",
                "--threshold",
                "1ms",
            ]))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err_path)?)
            .spawn()
            .context("starting the daemon")?;
        let result = (|| -> anyhow::Result<(u64, u64, u64)> {
            wait_for(&err_path, "watching", &mut daemon)?;
            std::thread::sleep(Duration::from_secs(2));
            let idle = rss_kb(daemon.id());
            let secs = (opts.secs * 3.0).max(3.0);
            let mut load = Command::new(&self.workload)
                .args(["block", "16", "2000", &format!("{secs}")])
                .stdout(Stdio::null())
                .spawn()?;
            let mut peak = idle;
            while load.try_wait()?.is_none() {
                peak = peak.max(rss_kb(daemon.id()));
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_secs(1));
            let after = rss_kb(daemon.id());
            Ok((idle, peak, after))
        })();
        let _ = daemon.kill();
        let _ = daemon.wait();
        let (idle, peak, after) = result?;
        println!(
            "daemon RSS: idle {:.1} MiB, under load (16 threads, ~7000 events/s) peak {:.1} MiB, 1 s after {:.1} MiB",
            idle as f64 / 1024.0,
            peak as f64 / 1024.0,
            after as f64 / 1024.0
        );
        Ok(())
    }

    // ----------------------------------------------------------- symbolize

    fn symbolize(&self, opts: &Options) -> anyhow::Result<()> {
        println!("\n== symbolization ==");
        cargo(&[
            "build",
            "--release",
            "-p",
            "blockwatch",
            "--example",
            "symbolize_bench",
        ])?;
        let example = root_dir().join("target/release/examples/symbolize_bench");
        let mut subject = Command::new("python3")
            .arg(root_dir().join("bench/symbolize_subject.py"))
            .stdout(Stdio::null())
            .spawn()
            .context("python3 bench/symbolize_subject.py")?;
        let pid = subject.id().to_string();
        let result = (|| -> anyhow::Result<String> {
            std::thread::sleep(Duration::from_millis(500));
            let stacks = bench_dir().join("stacks.jsonl");
            let out = self
                .blockwatch_cmd(&strings(&[
                    "trace",
                    "-o",
                    "json",
                    "--pid",
                    &pid,
                    "--threads",
                    "all",
                    "--threshold",
                    "1ms",
                    "--duration",
                    "3s",
                ]))
                .stdout(std::fs::File::create(&stacks)?)
                .stderr(Stdio::null())
                .status()?;
            if !out.success() {
                bail!("recording stacks failed");
            }
            let out = Command::new(&example)
                .arg(&pid)
                .arg(&stacks)
                .arg(format!("{}", opts.secs.max(1.0)))
                .output()?;
            if !out.status.success() {
                bail!(
                    "symbolize_bench failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        })();
        let _ = subject.kill();
        let _ = subject.wait();
        let line = result?;
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .unwrap_or("?")
                .to_string()
        };
        println!(
            "stacks/s: cold {} (new symbolizer: maps, ELF and DWARF read), warm {} ({} distinct stacks of a Python process, {} native frames)",
            field("cold_per_s"),
            field("warm_per_s"),
            field("stacks"),
            field("frames")
        );

        self.user_stack_cost(opts)
    }

    /// The same load with the user stack copied (default size) or not (0),
    /// interleaved: what the copy costs per event.
    fn user_stack_cost(&self, opts: &Options) -> anyhow::Result<()> {
        if !self.has_user_stack_size {
            println!("user-stack copy (--user-stack-size): n/a (no --user-stack-size)");
            return Ok(());
        }
        let secs = opts.secs.max(1.0) * 2.0;
        let mut by: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for rep in 0..opts.reps {
            for (label, size) in [("default", None), ("0 (off)", Some("0"))] {
                print!(
                    "\rbench: user stacks rep {}/{} {label:<10}",
                    rep + 1,
                    opts.reps
                );
                let _ = std::io::stdout().flush();
                let r = self.block_run(16, secs, size)?;
                by.entry(label).or_default().push((
                    r.events as f64 / r.secs,
                    r.cpu / r.events.max(1) as f64 * 1e6,
                ));
            }
        }
        println!("\r{:<60}", "");
        let rows: Vec<Vec<String>> = ["default", "0 (off)"]
            .iter()
            .map(|l| {
                let v = &by[l];
                let rate = median(&v.iter().map(|x| x.0).collect::<Vec<_>>());
                let cpu = median(&v.iter().map(|x| x.1).collect::<Vec<_>>());
                vec![l.to_string(), format!("{rate:.0}"), format!("{cpu:.1} µs")]
            })
            .collect();
        print_table(
            &[
                "--user-stack-size",
                "events/s (16 threads)",
                "blockwatch CPU/event",
            ]
            .map(String::from),
            &rows,
        );
        Ok(())
    }
}

struct Run {
    events: u64,
    lost: u64,
    secs: f64,
    /// blockwatch's CPU time (user + system), seconds.
    cpu: f64,
}

/// Waits for a child and returns (success, its CPU seconds) from wait4.
fn wait_with_cpu(child: Child) -> anyhow::Result<(bool, f64)> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is valid; wait4 on our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if rc != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    std::mem::forget(child); // reaped above
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((ok, secs(usage.ru_utime) + secs(usage.ru_stime)))
}

/// `N` from blockwatch's `warning: N events were lost` line, or 0.
fn lost_events(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| {
            let rest = l.split("warning: ").nth(1)?;
            let (n, tail) = rest.split_once(' ')?;
            tail.starts_with("events were lost")
                .then(|| n.parse().ok())?
        })
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// A tracer the workloads run under.
enum Tracer {
    Bare,
    Blockwatch {
        label: &'static str,
        args: Vec<String>,
    },
    Bpftrace {
        script: String,
    },
}

struct Running {
    child: Option<Child>,
    what: String,
    stderr: PathBuf,
}

impl Tracer {
    /// A blockwatch `trace -o json`: its stdout is its events.
    fn reports_json(&self) -> bool {
        matches!(self, Tracer::Blockwatch { args, .. }
            if args.iter().any(|a| a == "trace") && args.iter().any(|a| a == "json"))
    }

    fn label(&self) -> &'static str {
        match self {
            Tracer::Bare => "bare",
            Tracer::Blockwatch { label, .. } => label,
            Tracer::Bpftrace { .. } => "bpftrace",
        }
    }

    /// Starts the tracer and waits until it is attached.
    fn start(&self, b: &Bench) -> anyhow::Result<Running> {
        let (mut cmd, ready_file, ready) = match self {
            Tracer::Bare => {
                return Ok(Running {
                    child: None,
                    what: "bare".into(),
                    stderr: PathBuf::new(),
                });
            }
            Tracer::Blockwatch { args, .. } => {
                (b.blockwatch_cmd(args), "tracer.stderr", "watching")
            }
            Tracer::Bpftrace { script } => {
                let mut cmd = Command::new("bpftrace");
                cmd.args(["-e", script]);
                (cmd, "tracer.stdout", "Attaching")
            }
        };
        let out = bench_dir().join("tracer.stdout");
        let err = bench_dir().join("tracer.stderr");
        cmd.stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?)
            .stdin(Stdio::null());
        let what = display(&cmd);
        let mut child = cmd.spawn().with_context(|| format!("cannot run {what}"))?;
        wait_for(&bench_dir().join(ready_file), ready, &mut child)
            .with_context(|| format!("starting {what}"))?;
        // Attached; let the start-up work (a daemon's scan) settle.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Running {
            child: Some(child),
            what,
            stderr: err,
        })
    }
}

impl Running {
    fn stop(mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let end = Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{} did not stop on SIGINT", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = child.wait()?;
        if !status.success() {
            let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            bail!("{} failed ({status}):\n{err}", self.what);
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (up to 60 s) until `file` contains `what`, failing if `child`
/// exits first.
fn wait_for(file: &Path, what: &str, child: &mut Child) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if std::fs::read_to_string(file).is_ok_and(|s| s.contains(what)) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let err =
                std::fs::read_to_string(bench_dir().join("tracer.stderr")).unwrap_or_default();
            bail!("exited ({status}) before it was ready:\n{err}");
        }
        if Instant::now() > end {
            bail!("not ready after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The peer: what blockwatch's default and strict modes do, in bpftrace.
fn bpftrace_script(tid: u32) -> String {
    format!(
        "BEGIN {{ @tagged[{tid}] = 1; }}\n\
         tracepoint:raw_syscalls:sys_enter /tid == {tid}/ {{ @calls = count(); }}\n\
         tracepoint:sched:sched_switch /@tagged[args->prev_pid]/ {{ @out[args->prev_pid] = nsecs; }}\n\
         END {{ clear(@tagged); clear(@out); }}\n"
    )
}

/// bpftrace is installed from Debian for the comparison (about 60 MB, so
/// only here, not by `cargo xtask setup`); false if that is impossible.
fn ensure_bpftrace() -> bool {
    match setup::ensure_packages(&[Package {
        name: "bpftrace",
        command: Some("bpftrace"),
    }]) {
        Ok(()) => true,
        Err(e) => {
            println!("bench: no bpftrace, its column is skipped: {e:#}");
            false
        }
    }
}

/// A Python with aiohttp: a venv under ~/.cache/blockwatch, made once. The
/// bench's HTTP server and blockwatch/tests/episodes.rs (which finds it at
/// this path) run on it.
pub fn aiohttp_venv() -> anyhow::Result<PathBuf> {
    let dir = home()
        .context("HOME is not set")?
        .join(".cache/blockwatch/bench-venv");
    let python = dir.join("bin/python");
    let has_aiohttp = || {
        Command::new(&python)
            .args(["-c", "import aiohttp"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    print!("xtask: aiohttp in {} ... ", dir.display());
    let _ = std::io::stdout().flush();
    if has_aiohttp() {
        println!("already present");
        return Ok(python);
    }
    println!("installing");
    if !python.exists() {
        let venv = || {
            Command::new("python3")
                .args(["-m", "venv"])
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !venv() {
            // Debian's python3 has no ensurepip without python3-venv.
            let _ = std::fs::remove_dir_all(&dir);
            setup::ensure_packages(&[Package {
                name: "python3-venv",
                command: None,
            }])?;
            if !venv() {
                bail!("`python3 -m venv {}` failed", dir.display());
            }
        }
    }
    crate::run::check(Command::new(dir.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "aiohttp",
    ]))
    .context("installing aiohttp from PyPI")?;
    if !has_aiohttp() {
        bail!("aiohttp was installed but does not import");
    }
    Ok(python)
}

/// `wrk` for `secs` seconds: (requests/s, p99 latency in seconds).
fn wrk(url: &str, secs: u64) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("wrk")
        .args(["-t1", "-c16", &format!("-d{secs}s"), "--latency", url])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok());
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| parse_wrk_duration(v.trim()));
    match (rps, p99, out.status.success()) {
        (Some(r), Some(p), true) => Ok((r, p)),
        _ => bail!("wrk failed or printed no result:\n{text}"),
    }
}

/// `1.23ms`, `850.00us`, `1.02s` → seconds.
fn parse_wrk_duration(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(19747)
}

fn free_listen() -> String {
    format!("127.0.0.1:{}", free_port())
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn print_table(header: &[String], rows: &[Vec<String>]) {
    let cols = header.len();
    let width = |i: usize| {
        rows.iter()
            .filter_map(|r| r.get(i))
            .chain(std::iter::once(&header[i]))
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..cols).map(width).collect();
    let line = |cells: &[String]| {
        let mut s = String::from("|");
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            s.push_str(&format!(" {c}{} |", " ".repeat(pad)));
        }
        println!("{s}");
    };
    line(header);
    let sep: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(&sep);
    for r in rows {
        line(r);
    }
}

/// Requests/s and p99 latency per tracer, as ratios to the bare run (index
/// 0), and the events a `trace` reported per run (median).
fn print_http(
    tracers: &[Tracer],
    rps: &BTreeMap<usize, Vec<f64>>,
    p99: &BTreeMap<usize, Vec<f64>>,
    reports: &BTreeMap<usize, Vec<f64>>,
) {
    let bare_rps = median(&rps[&0]);
    let bare_p99 = median(&p99[&0]);
    let rows: Vec<Vec<String>> = tracers
        .iter()
        .enumerate()
        .map(|(ti, t)| {
            let r = median(&rps[&ti]);
            let p = median(&p99[&ti]);
            vec![
                t.label().to_string(),
                format!("{r:.0} ({:.2}×)", r / bare_rps),
                format!("{:.2} ms ({:.2}×)", p * 1e3, p / bare_p99),
                reports
                    .get(&ti)
                    .map_or("-".into(), |v| format!("{:.0}", median(v))),
            ]
        })
        .collect();
    print_table(
        &["blockwatch", "requests/s", "p99 latency", "events reported"].map(String::from),
        &rows,
    );
}

/// Non-empty lines of the last tracer's stdout: with `-o json`, its events.
fn json_lines() -> usize {
    std::fs::read_to_string(bench_dir().join("tracer.stdout"))
        .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn wrk_durations() {
        assert_eq!(parse_wrk_duration("850.00us"), Some(850e-6));
        assert_eq!(parse_wrk_duration("1.50ms"), Some(1.5e-3));
        assert_eq!(parse_wrk_duration("2.00s"), Some(2.0));
        assert_eq!(parse_wrk_duration("fast"), None);
    }

    #[test]
    fn lost_line() {
        let s =
            "blockwatch: warning: 1234 events were lost (ring buffer full); raise --threshold\n";
        assert_eq!(lost_events(s), 1234);
        assert_eq!(lost_events("blockwatch: 3 blocking calls"), 0);
    }
}
