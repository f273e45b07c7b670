//! `cargo xtask <command>`: the project's setup, build, demo, image, test, fuzz
//! and bench entry points (the alias lives in `.cargo/config.toml`).

mod bench;
mod fuzz;
mod image;
mod run;
mod setup;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::run::{cargo, root_dir, status_code};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "blockwatch's development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (nightly rust-src, bpf-linker,
    /// tracefs/bpffs mounts, apt packages); fast when all is present.
    Setup,
    /// Set up, then build target/release/blockwatch.
    Build,
    /// Build, then trace examples/asyncio-demo.py with blockwatch (as root).
    Demo,
    /// Set up, then build a static blockwatch and the container image
    /// localhost/blockwatch:VERSION (and :latest) with podman, FROM scratch.
    Image,
    /// Build (the binary, the subjects, the container image), then run the
    /// unit tests and, one at a time, the integration tests against the real
    /// kernel (as root), then fuzz each fuzz target for a bounded time.
    Test,
    /// Fuzz the record decoder and the config parser (cargo-fuzz, nightly).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Only these targets (default: all).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(fuzz::target_names()))]
        targets: Vec<String>,
    },
    /// Build, then measure what blockwatch costs (host tax, an aiohttp and
    /// a Node server under wrk, pipeline throughput, the daemon's memory
    /// and CPU, symbolization) against bare runs and bpftrace, as root;
    /// prints tables of ratios and each of issue 11's figures beside its
    /// target.
    Bench {
        /// Fewer repetitions and shorter runs, and no extra rounds for open verdicts (under six minutes, against 15-20).
        #[arg(long)]
        quick: bool,
        /// Repetitions of each measurement [default: 5, --quick: 3].
        #[arg(long)]
        reps: Option<usize>,
        /// Seconds per measurement [default: 1, --quick: 0.5].
        #[arg(long)]
        secs: Option<f64>,
        /// Only these sections (comma-separated).
        #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(bench::SECTIONS))]
        only: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run::put_cargo_bin_on_path();
    let result = match cli.command {
        Command::Setup => setup::run().map(|()| ExitCode::SUCCESS),
        Command::Build => build().map(|path| {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }),
        Command::Demo => demo(),
        Command::Image => setup::run().and_then(|()| image::build()).map(|tag| {
            image::print_push_hint(&tag);
            ExitCode::SUCCESS
        }),
        Command::Test => test(),
        Command::Fuzz { time, targets } => setup::run()
            .and_then(|()| fuzz::run(std::time::Duration::from_secs(time), &targets))
            .map(|()| ExitCode::SUCCESS),
        Command::Bench {
            quick,
            reps,
            secs,
            only,
        } => bench_cmd(bench::Options {
            reps: reps.unwrap_or(if quick { 3 } else { 5 }).max(1),
            secs: secs.unwrap_or(if quick { 0.5 } else { 1.0 }).max(0.1),
            only,
            quick,
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let msg = e
                .chain()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("xtask: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Setup, then `cargo build --release -p blockwatch`; returns the binary.
fn build() -> anyhow::Result<PathBuf> {
    setup::run()?;
    cargo(&["build", "--release", "-p", "blockwatch"])?;
    let bin = root_dir().join("target/release/blockwatch");
    if !bin.is_file() {
        bail!("cargo built blockwatch but {} is missing", bin.display());
    }
    Ok(bin)
}

fn bench_cmd(opts: bench::Options) -> anyhow::Result<ExitCode> {
    require_root("bench", "the benchmarks load BPF programs")?;
    let bin = build()?;
    bench::run(&bin, &opts)?;
    Ok(ExitCode::SUCCESS)
}

fn build_subjects() -> anyhow::Result<()> {
    cargo(&[
        "build",
        "--release",
        "-p",
        "tokio-blocker",
        "-p",
        "tokio-server",
    ])
}

fn require_root(task: &str, why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{why}: run as root, e.g. sudo -E cargo xtask {task}");
    }
    Ok(())
}

const DEMO_INTRO: &str = "\
You are about to see blockwatch trace examples/asyncio-demo.py, a small asyncio
service that runs for about 5 seconds. Three of its handlers block the event
loop by mistake: a time.sleep(0.15) in a rate limiter, an os.fsync() of a
freshly written report, and a subprocess.run([\"sleep\", \"0.1\"]). Each shows up
as an event with the process, thread, syscall, how long the loop was blocked
and the stack; its correct `await asyncio.sleep(...)` calls do not. A summary
follows when the script exits.
";

fn demo() -> anyhow::Result<ExitCode> {
    require_root("demo", "the demo loads BPF programs")?;
    let bin = build()?;
    build_subjects()?;
    let root = root_dir();
    let script = Path::new("examples/asyncio-demo.py");
    println!("\n{DEMO_INTRO}");
    println!(
        "$ {} trace -- python3 {}\n",
        bin.strip_prefix(&root).unwrap_or(&bin).display(),
        script.display()
    );
    let status = std::process::Command::new(&bin)
        .args(["trace", "--", "python3"])
        .arg(script)
        .current_dir(&root)
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    Ok(status_code(status))
}

fn test() -> anyhow::Result<ExitCode> {
    require_root("test", "the tests load BPF programs")?;
    build()?;
    build_subjects()?;
    // blockwatch/tests/episodes.rs serves HTTP with aiohttp from this venv
    // (and fails when it is missing).
    bench::aiohttp_venv()?;
    // blockwatch/tests/image.rs runs it (and fails when it is missing).
    image::build()?;
    // Unit tests one at a time too: the privileged ones among them load the
    // kernel programs and time real waits, which a CPU-bound neighbour test
    // would stretch. The eBPF crate only builds for the BPF target.
    cargo(&[
        "test",
        "--release",
        "--workspace",
        "--exclude",
        "blockwatch-ebpf",
        "--lib",
        "--bins",
        "--",
        "--test-threads=1",
    ])?;
    // Integration tests one at a time: they share the kernel and the CPUs,
    // and measure durations. Every file runs even when one fails, so a
    // failure in one says nothing about the others.
    cargo(&[
        "test",
        "--release",
        "-p",
        "blockwatch",
        "--no-fail-fast",
        "--test",
        "*",
        "--",
        "--test-threads=1",
    ])?;
    // A little fuzzing of every change (the decoder and the config parser
    // take untrusted input).
    fuzz::run(fuzz::TEST_TIME, &[])?;
    println!("xtask: all tests passed");
    Ok(ExitCode::SUCCESS)
}
