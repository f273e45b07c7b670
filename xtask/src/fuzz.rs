//! `cargo xtask fuzz`: runs the cargo-fuzz targets of `fuzz/` (libFuzzer,
//! nightly, AddressSanitizer, debug assertions) for a bounded time each.
//! `cargo xtask test` runs them too, so CI fuzzes every change a little.
//!
//! Each target starts from the seeds kept in `fuzz/seeds/<target>` plus
//! whatever earlier runs on this machine found (`fuzz/corpus/<target>`, not
//! in git). A crash stops the run with the input's path and the command that
//! replays it; the input belongs in a regression unit test next to the code
//! it broke.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::run::{describe, display, root_dir};

/// A fuzz target and the libFuzzer options it needs.
struct Target {
    name: &'static str,
    /// Longest input tried: a ring-buffer record can be several KiB.
    max_len: usize,
}

const TARGETS: &[Target] = &[
    Target {
        name: "decode",
        max_len: 32 * 1024,
    },
    Target {
        name: "config",
        max_len: 4 * 1024,
    },
];

/// How long `cargo xtask test` fuzzes each target.
pub const TEST_TIME: Duration = Duration::from_secs(25);

/// The target names, for the command line's help and validation.
pub fn target_names() -> Vec<&'static str> {
    TARGETS.iter().map(|t| t.name).collect()
}

/// A `cargo fuzz` command on the nightly toolchain, from the workspace root.
fn cargo_fuzz(args: &[&str]) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .args(args)
        .current_dir(root_dir())
        // The outer `cargo xtask` runs on stable: its cargo and rustc must
        // not leak into the nightly build.
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTUP_AUTO_INSTALL", "0");
    cmd
}

/// Builds the targets once (so the time limit is spent fuzzing), then
/// fuzzes each of `only` (all when empty) for `time`.
pub fn run(time: Duration, only: &[String]) -> anyhow::Result<()> {
    for name in only {
        if !TARGETS.iter().any(|t| t.name == name) {
            bail!(
                "no fuzz target `{name}`; the targets are {}",
                target_names().join(", ")
            );
        }
    }
    let root = root_dir();
    println!("xtask: building the fuzz targets (nightly, AddressSanitizer)");
    let mut build = cargo_fuzz(&["build", "--fuzz-dir", "fuzz", "--codegen-units", "16"]);
    crate::run::check(&mut build).context(
        "building the fuzz targets failed; `cargo xtask setup` installs cargo-fuzz and nightly rust-src",
    )?;
    for target in TARGETS
        .iter()
        .filter(|t| only.is_empty() || only.iter().any(|o| o == t.name))
    {
        fuzz_one(&root, target, time)?;
    }
    Ok(())
}

fn fuzz_one(root: &Path, target: &Target, time: Duration) -> anyhow::Result<()> {
    let corpus = format!("fuzz/corpus/{}", target.name);
    let seeds = format!("fuzz/seeds/{}", target.name);
    let artifacts = format!("fuzz/artifacts/{}/", target.name);
    std::fs::create_dir_all(root.join(&corpus))
        .with_context(|| format!("cannot create {corpus}"))?;
    std::fs::create_dir_all(root.join(&artifacts))
        .with_context(|| format!("cannot create {artifacts}"))?;
    let max_total_time = format!("-max_total_time={}", time.as_secs().max(1));
    let max_len = format!("-max_len={}", target.max_len);
    let artifact_prefix = format!("-artifact_prefix={artifacts}");
    println!(
        "xtask: fuzzing `{}` for {} s (seeds: {seeds})",
        target.name,
        time.as_secs()
    );
    let mut cmd = cargo_fuzz(&[
        "run",
        "--fuzz-dir",
        "fuzz",
        "--codegen-units",
        "16",
        target.name,
        &corpus,
        &seeds,
        "--",
        &max_total_time,
        &max_len,
        &artifact_prefix,
        "-rss_limit_mb=2048",
        "-timeout=10",
        "-print_final_stats=1",
    ]);
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", display(&cmd)))?;
    if !status.success() {
        let found = std::fs::read_dir(root.join(&artifacts))
            .map(|d| {
                d.filter_map(|e| Some(e.ok()?.path().display().to_string()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        bail!(
            "fuzz target `{}` failed ({}); inputs that broke it: {}; replay one with \
             `cargo +nightly fuzz run --fuzz-dir fuzz {} <input>`, then keep it as a \
             regression unit test",
            target.name,
            describe(status),
            if found.is_empty() {
                "none saved".to_string()
            } else {
                found.join(", ")
            },
            target.name
        );
    }
    Ok(())
}
