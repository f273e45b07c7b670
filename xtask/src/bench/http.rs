//! The same wrk load (`wrk -t1 -c16`) on an asyncio server (aiohttp) and a
//! Node `http` server, each bare and watched by `trace --pid` and `daemon
//! --auto`, interleaved: what watching a saturated loop costs in each
//! runtime, as requests/s and p99 latency against the bare runs.

use std::collections::BTreeMap;
use std::io::{BufRead as _, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use super::proc::{BpfStats, cpu_between, thread_cpu_ns};
use super::stats::{
    MAX_REPS, WIDE_REPS, WIDE_SPREAD, median, median_interval, paired_ratios, parse_wrk,
    print_table, progress, progress_done, rounds_to_tell, spread,
};
use super::targets::{COVERAGE, Figure, Goal, UNRESOLVED, Unit};
use super::tracer::{
    FLOOR_LABEL, FLOOR_SCRIPT, Tracer, ensure_bpftrace, free_listen, free_port, strings,
};
use super::{Bench, Options, bench_dir};
use crate::run::{home, root_dir};
use crate::setup::{self, Package};

/// One value a repetition, per tracer index.
#[derive(Default)]
struct Samples {
    rps: BTreeMap<usize, Vec<f64>>,
    p99: BTreeMap<usize, Vec<f64>>,
    reports: BTreeMap<usize, Vec<f64>>,
    /// The tracer's own threads' CPU over its cost measurement
    /// (`http_costs`), as a share of one CPU.
    user: BTreeMap<usize, Vec<f64>>,
    /// Its kernel programs' run time over it, likewise.
    kernel: BTreeMap<usize, Vec<f64>>,
    /// The bare server's CPU time per request, a value a bare run: how far
    /// the same work's cost moves from one run to the next.
    bare_cpu_per_request: Vec<f64>,
}

impl Samples {
    /// The wider of the bare runs' spreads (requests/s, p99).
    fn bare_spread(&self) -> f64 {
        let s = |m: &BTreeMap<usize, Vec<f64>>| m.get(&0).map_or(0.0, |v| spread(v));
        s(&self.rps).max(s(&self.p99))
    }
}

impl Bench {
    pub(super) fn http(&self, opts: &Options) -> anyhow::Result<Vec<Figure>> {
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
        let mut figures =
            self.http_server("aiohttp", "asyncio HTTP server (aiohttp)", aiohttp, opts)?;
        let mut node = Command::new("node");
        node.arg(root_dir().join("subjects/node_http_server.js"));
        figures.extend(self.http_server("Node", "Node http server", node, opts)?);
        Ok(figures)
    }

    /// `server PORT` (which prints "ready" when it accepts connections)
    /// under wrk, bare and under each tracer, interleaved.
    fn http_server(
        &self,
        short: &str,
        title: &str,
        mut server: Command,
        opts: &Options,
    ) -> anyhow::Result<Vec<Figure>> {
        println!("\n== {title} under wrk ==");
        let port = free_port();
        let mut server = server
            .arg(port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the {title}"))?;
        let ready = server.stdout.take().is_some_and(|out| {
            let mut line = String::new();
            std::io::BufReader::new(out).read_line(&mut line).is_ok() && line.trim() == "ready"
        });
        if !ready {
            let _ = server.kill();
            let _ = server.wait();
            bail!("the {title} did not start");
        }
        let pid = server.id().to_string();
        let tracers = [
            Tracer::Bare,
            Tracer::Blockwatch {
                label: "trace --pid",
                args: strings(&["trace", "-o", "json", "--pid", &pid]),
            },
            Tracer::Blockwatch {
                label: "daemon --auto",
                args: strings(&["daemon", "--auto", "--listen", &free_listen()]),
            },
            // wrk runs an epoll loop too: --auto watches it as well, and on
            // these 2 CPUs wrk's own cost shows in the server's figures.
            Tracer::Blockwatch {
                label: "daemon --auto, wrk excluded",
                args: strings(&[
                    "daemon",
                    "--auto",
                    "--config",
                    &exclude_wrk_config()?,
                    "--listen",
                    &free_listen(),
                ]),
            },
        ];
        // The floor: what any program on sched_switch costs here, an
        // empty one (blockwatch's kernel side runs there on every context
        // switch of the host). Shown beside the figures, not one itself.
        let mut tracers = tracers.into_iter().collect::<Vec<_>>();
        if ensure_bpftrace() {
            tracers.push(Tracer::Bpftrace {
                label: FLOOR_LABEL,
                script: FLOOR_SCRIPT.into(),
            });
        }
        let url = format!("http://127.0.0.1:{port}/");
        let secs = if opts.quick { 2 } else { 3 };
        let result = self
            .http_reps(&tracers, server.id(), &url, secs, opts)
            .and_then(|(mut samples, reps, widened)| {
                // Apart from the runs the ratios come from: timing every
                // program run costs each one two clock reads more.
                // Without the timing the programs' share would read 0:
                // the costs are left out ("-").
                if let Some(_stats) = BpfStats::enable() {
                    self.http_costs(&tracers, &url, secs, &mut samples)?;
                }
                Ok((samples, reps, widened))
            });
        progress_done();
        let _ = server.kill();
        let _ = server.wait();
        let (samples, reps, widened) = result?;
        if let Some(spread) = widened {
            println!(
                "(bare runs spread over {:.1}% after {} repetitions, more than {:.0}%: {WIDE_REPS} repetitions)",
                spread * 100.0,
                opts.reps,
                WIDE_SPREAD * 100.0
            );
        }
        let planned = if widened.is_some() {
            WIDE_REPS
        } else {
            opts.reps
        };
        if reps > planned {
            println!(
                "({reps} repetitions: a verdict was open after {planned} that fewer than {MAX_REPS} would close)"
            );
        }
        print_http(&tracers, &samples);
        println!(
            "(wrk -t1 -c16 -d{secs}s on the same 2 CPUs as the server and blockwatch, after a 1 s wrk under the same tracer (what attaching does once: the loop found, symbols parsed); {reps} interleaved repetitions, medians; the floor is what any program on sched_switch costs here)"
        );
        println!(
            "(its CPU: over one more measurement under each tracer, with kernel.bpf_stats_enabled set (apart from the runs above: timing costs every program run two clock reads), the CPU time of the tracer's threads (schedstat) and the run time of its BPF programs (fdinfo run_time_ns), each as a share of one CPU: \
             what watching took from the machine's two CPUs, direct where the ratios are read through the machine's noise)"
        );
        Ok(http_figures(short, &tracers, &samples, reps))
    }

    /// Interleaved repetitions, `opts.reps` of them, or [`WIDE_REPS`] when
    /// the bare runs spread wide by then, and on while a verdict is open
    /// that fewer than [`MAX_REPS`] rounds would close (not with
    /// `--quick`). Returns the samples, how many repetitions were run, and
    /// the spread that called for more.
    fn http_reps(
        &self,
        tracers: &[Tracer],
        server: u32,
        url: &str,
        secs: u64,
        opts: &Options,
    ) -> anyhow::Result<(Samples, usize, Option<f64>)> {
        let mut s = Samples::default();
        // Warm up the server (imports, first connections).
        wrk(url, 1)?;
        let mut reps = opts.reps;
        let mut widened = None;
        let mut rep = 0;
        while rep < reps {
            for (ti, tracer) in tracers.iter().enumerate() {
                progress(&format!(
                    "bench: http rep {}/{reps} {}",
                    rep + 1,
                    tracer.label()
                ));
                let running = tracer.start(self)?;
                // What watching costs, not what attaching does once: the
                // loop found, its interpreter read, the binaries' symbols
                // parsed for its first event (tens of ms of one CPU).
                wrk(url, 1)?;
                let before = thread_cpu_ns(server);
                let (r, p) = wrk(url, secs)?;
                if ti == 0
                    && let Some(cpu) = cpu_between(&before, &thread_cpu_ns(server))
                {
                    s.bare_cpu_per_request.push(cpu / (r * secs as f64));
                }
                running.stop()?;
                s.rps.entry(ti).or_default().push(r);
                s.p99.entry(ti).or_default().push(p);
                if tracer.reports_json() {
                    s.reports.entry(ti).or_default().push(json_lines() as f64);
                }
            }
            rep += 1;
            if rep == reps && reps < WIDE_REPS && s.bare_spread() > WIDE_SPREAD {
                widened = Some(s.bare_spread());
                reps = WIDE_REPS;
            }
            let open = || {
                http_figures("", tracers, &s, rep)
                    .iter()
                    .any(|f| f.verdict() == UNRESOLVED)
            };
            if rep == reps && !opts.quick && reps < MAX_REPS && open() {
                reps += 1;
            }
        }
        Ok((s, reps, widened))
    }

    /// One more measurement under each tracer, with the kernel timing BPF
    /// programs: the CPU of the tracer's threads and its programs' run
    /// time over it, as shares of one CPU, into `s`.
    fn http_costs(
        &self,
        tracers: &[Tracer],
        url: &str,
        secs: u64,
        s: &mut Samples,
    ) -> anyhow::Result<()> {
        for (ti, tracer) in tracers.iter().enumerate().skip(1) {
            progress(&format!("bench: http cost {}", tracer.label()));
            let running = tracer.start(self)?;
            wrk(url, 1)?;
            let (before, started) = (running.cost(), std::time::Instant::now());
            wrk(url, secs)?;
            if let (Some(b), Some(a)) = (before, running.cost()) {
                let (user, kernel) = a.shares_since(&b, started.elapsed().as_secs_f64());
                s.user.entry(ti).or_default().push(user);
                s.kernel.entry(ti).or_default().push(kernel);
            }
            running.stop()?;
        }
        Ok(())
    }
}

/// Requests/s and p99 latency per tracer, as ratios to the bare run (index
/// 0), and the events a `trace` reported per run (median).
fn print_http(tracers: &[Tracer], s: &Samples) {
    let bare_rps = median(&s.rps[&0]);
    let bare_p99 = median(&s.p99[&0]);
    let rows: Vec<Vec<String>> = tracers
        .iter()
        .enumerate()
        .map(|(ti, t)| {
            let r = median(&s.rps[&ti]);
            let p = median(&s.p99[&ti]);
            vec![
                t.label().to_string(),
                format!("{r:.0} ({:.2}×)", r / bare_rps),
                format!("{:.2} ms ({:.2}×)", p * 1e3, p / bare_p99),
                s.reports
                    .get(&ti)
                    .map_or("-".into(), |v| format!("{:.0}", median(v))),
                cost_share(s, ti).map_or("-".into(), |(user, kernel)| {
                    format!("{:.2}% + {:.2}%", user * 100.0, kernel * 100.0)
                }),
            ]
        })
        .collect();
    print_table(
        &[
            "blockwatch",
            "requests/s",
            "p99 latency",
            "events reported",
            "its CPU: own threads + kernel programs (of one CPU)",
        ]
        .map(String::from),
        &rows,
    );
    println!(
        "(bare runs spread: requests/s {:.1}%, p99 {:.1}%; the bare server's CPU time per request {:.1}%, median {:.1} µs: the same requests took that much more of its CPU from one run to another, nothing watching)",
        spread(&s.rps[&0]) * 100.0,
        spread(&s.p99[&0]) * 100.0,
        spread(&s.bare_cpu_per_request) * 100.0,
        median(&s.bare_cpu_per_request) * 1e6
    );
}

/// The medians of a tracer's CPU over its measurements, as shares of one
/// CPU: (its own threads, its kernel programs).
fn cost_share(s: &Samples, ti: usize) -> Option<(f64, f64)> {
    Some((median(s.user.get(&ti)?), median(s.kernel.get(&ti)?)))
}

/// Requests/s (≥ 0.99×) and p99 (≤ 1.02×) against bare, per watcher, each
/// beside the floor (an empty sched_switch program) when it was measured.
/// Each figure is the median of its per-round ratios to the bare run
/// (`paired_ratios`), with the interval that median lies in.
fn http_figures(short: &str, tracers: &[Tracer], s: &Samples, reps: usize) -> Vec<Figure> {
    let rps = |ti: usize| paired_ratios(&s.rps[&ti], &s.rps[&0]);
    let p99 = |ti: usize| paired_ratios(&s.p99[&ti], &s.p99[&0]);
    let floor = tracers.iter().position(Tracer::is_floor);
    let mut figures = Vec::new();
    for (ti, t) in tracers.iter().enumerate().skip(1) {
        if t.is_floor() {
            continue;
        }
        let note = match cost_share(s, ti) {
            Some((user, kernel)) => format!(
                "median of {reps} rounds' ratios; it used {:.2}% of a CPU, {:.2}% in its kernel programs",
                (user + kernel) * 100.0,
                kernel * 100.0
            ),
            None => format!("median of {reps} rounds' ratios"),
        };
        let figure =
            |what: &str, ratios: Vec<f64>, goal: Goal, bare: &[f64], floor: Option<Vec<f64>>| {
                Figure::new(
                    format!("{short} under wrk, {}: {what} vs bare", t.label()),
                    median(&ratios),
                    Unit::Ratio,
                    goal,
                )
                .with_note(note.clone())
                .with_interval(median_interval(&ratios, COVERAGE))
                .with_rounds_needed(rounds_to_tell(&ratios, goal.target()))
                .with_bare_spread(spread(bare))
                .with_floor(floor.as_deref().map(median))
                .with_floor_interval(floor.and_then(|f| median_interval(&f, COVERAGE)))
            };
        figures.push(figure(
            "requests/s",
            rps(ti),
            Goal::AtLeast(0.99),
            &s.rps[&0],
            floor.map(rps),
        ));
        figures.push(figure(
            "p99 latency",
            p99(ti),
            Goal::AtMost(1.02),
            &s.p99[&0],
            floor.map(p99),
        ));
    }
    figures
}

/// Lines (events) a `trace -o json` wrote to its stdout.
fn json_lines() -> usize {
    std::fs::read_to_string(bench_dir().join("tracer.stdout"))
        .map(|s| s.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0)
}

/// A daemon configuration that leaves wrk unwatched; its path.
fn exclude_wrk_config() -> anyhow::Result<String> {
    let path = bench_dir().join("exclude-wrk.toml");
    std::fs::write(&path, "[targets]\nexclude_comms = [\"wrk\"]\n")?;
    Ok(path.display().to_string())
}

/// `wrk` for `secs` seconds: (requests/s, p99 latency in seconds).
fn wrk(url: &str, secs: u64) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("wrk")
        .args(["-t1", "-c16", &format!("-d{secs}s"), "--latency", url])
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match (parse_wrk(&text), out.status.success()) {
        (Some(r), true) => Ok(r),
        _ => bail!("wrk failed or printed no result:\n{text}"),
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
