//! `cargo xtask bench`: what blockwatch costs, measured side by side in one
//! run, printed as ratios, and each of issue 11's figures beside its target
//! with whether it was met (after its section, and all together at the end).
//!
//! - host ([`host`]): the tax on processes blockwatch does not report — a
//!   getppid loop, 1-byte reads from /dev/zero and a two-thread pipe
//!   ping-pong — bare, and under `trace` (watching another, idle process),
//!   `daemon --auto` (watching everything), `trace --strict` and the
//!   bpftrace equivalent;
//! - http ([`http`]): an aiohttp server and a Node `http` server under
//!   `wrk -t1 -c16`, bare and watched by `trace --pid` and `daemon --auto`,
//!   with the events `trace` reported (a healthy saturated loop has none);
//! - pipeline ([`pipeline`]): slow events per second reported before any
//!   is lost, beside what the workload offered, and blockwatch's CPU per
//!   reported event in steady state;
//! - daemon ([`daemon`]): `daemon --auto`'s idle memory (by component) and
//!   CPU, and a daemon's peak memory under load;
//! - symbolize ([`symbolize`]): stacks per second cold and warm, and what
//!   copying user stacks for DWARF unwinding costs per event.
//!
//! The machines are small and noisy: every configuration is measured
//! `--reps` times, interleaved (bare, tracer, bare, tracer…), and the median
//! is kept. Nothing here fails on a slow result; it only prints.

mod daemon;
mod host;
mod http;
mod pipeline;
mod proc;
mod stats;
mod symbolize;
mod targets;
mod tracer;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

pub use http::aiohttp_venv;
use targets::Figure;

use crate::run::root_dir;

/// What `cargo xtask bench` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Repetitions of each measurement (medians are kept).
    pub reps: usize,
    /// Seconds of each measurement.
    pub secs: f64,
    /// Sections to run (all when empty): see [`SECTIONS`].
    pub only: Vec<String>,
    pub quick: bool,
}

pub const SECTIONS: [&str; 5] = ["host", "http", "pipeline", "daemon", "symbolize"];

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
    type Section = fn(&Bench, &Options) -> anyhow::Result<Vec<Figure>>;
    let sections: [(&str, Section); 5] = [
        ("host", Bench::host),
        ("http", Bench::http),
        ("pipeline", Bench::pipeline),
        ("daemon", Bench::daemon),
        ("symbolize", Bench::symbolize),
    ];
    let mut all = Vec::new();
    let mut failed = Vec::new();
    for (name, section) in sections {
        if !opts.wants(name) {
            continue;
        }
        // A broken section (a tool that would not start) leaves the
        // others' figures standing; the run still fails at the end.
        match section(&b, opts) {
            Ok(figures) => {
                targets::print(&format!("{name}: targets"), &figures);
                all.extend(figures);
            }
            Err(e) => {
                stats::progress_done();
                println!("bench: the {name} section failed: {e:#}");
                failed.push(name);
            }
        }
    }
    println!(
        "\n== targets (issue 11) ==\n(ratios: the median of per-round ratios, each run over the bare run of its own interleaved round, with the interval that median lies in)"
    );
    targets::print("", &all);
    for name in &failed {
        println!("({name}: section failed, its figures are missing)");
    }
    println!("{}", targets::summary(&all));
    println!("\nbench: done in {:.0} s", started.elapsed().as_secs_f64());
    if !failed.is_empty() {
        bail!("bench sections failed: {}", failed.join(", "));
    }
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

    /// blockwatch with `args`; leading `NAME=VALUE` arguments are set in
    /// its environment instead (a variant of a run).
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
}
