//! `cargo xtask image`: the container image deploy/kubernetes/daemonset.yaml
//! runs, built with podman from a statically linked blockwatch and
//! `deploy/container/` (Containerfile, default config), `FROM scratch`:
//! nothing to download, nothing in it but the binary and its config.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::run::{cargo_path, check, root_dir};

/// The image's name; tagged `:VERSION` and `:latest`.
pub const NAME: &str = "localhost/blockwatch";

/// The target the static binary is built for; its own target directory
/// keeps the static build's artifacts apart from `target/release`.
const TARGET: &str = "x86_64-unknown-linux-gnu";

fn target_dir() -> PathBuf {
    root_dir().join("target/image")
}

/// Builds the static binary and the image; returns the `NAME:VERSION` tag.
pub fn build() -> anyhow::Result<String> {
    let bin = static_binary()?;
    let version = version_of(&bin)?;
    let context = target_dir().join("context");
    std::fs::create_dir_all(&context)
        .with_context(|| format!("cannot create {}", context.display()))?;
    let recipe = root_dir().join("deploy/container");
    for (from, to) in [
        (bin.clone(), "blockwatch"),
        (recipe.join("Containerfile"), "Containerfile"),
        (recipe.join("blockwatch.toml"), "blockwatch.toml"),
    ] {
        std::fs::copy(&from, context.join(to)).with_context(|| {
            format!("cannot copy {} into {}", from.display(), context.display())
        })?;
    }
    let tag = format!("{NAME}:{version}");
    println!(
        "image: podman build {tag} and {NAME}:latest from {}",
        context.display()
    );
    check(
        Command::new("podman")
            .args(["build", "--file"])
            .arg(context.join("Containerfile"))
            .args(["--tag", &tag, "--tag", &format!("{NAME}:latest")])
            .args([
                "--label",
                &format!("org.opencontainers.image.version={version}"),
                "--label",
                "org.opencontainers.image.title=blockwatch",
            ])
            .arg(&context),
    )
    .context("building the image needs podman (Debian: apt-get install podman; `cargo xtask setup` installs it)")?;
    Ok(tag)
}

/// `cargo build --release` for [`TARGET`] with a statically linked C
/// runtime (glibc's static-pie), checked with `file`: `FROM scratch` has no
/// loader and no libc.
fn static_binary() -> anyhow::Result<PathBuf> {
    let dir = target_dir();
    check(
        Command::new(cargo_path())
            .args(["build", "--release", "-p", "blockwatch", "--target", TARGET])
            .arg("--target-dir")
            .arg(&dir)
            // For TARGET only: not for build scripts, nor for the kernel
            // programs' nested build (bpfel-unknown-none).
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            )
            .current_dir(root_dir()),
    )?;
    let bin = dir.join(TARGET).join("release/blockwatch");
    let described = crate::run::output_of("file", &[&bin])
        .context("checking the binary needs `file` (Debian: apt-get install file)")?;
    if !(described.contains("statically linked") || described.contains("static-pie linked")) {
        bail!(
            "{} is not statically linked, an image FROM scratch cannot run it: {described}",
            bin.display()
        );
    }
    Ok(bin)
}

/// `0.1.0` from `blockwatch --version` (`blockwatch 0.1.0`).
fn version_of(bin: &Path) -> anyhow::Result<String> {
    let out = crate::run::output_of(&bin.display().to_string(), &["--version"])
        .with_context(|| format!("`{} --version` failed", bin.display()))?;
    out.split_whitespace()
        .nth(1)
        .map(String::from)
        .with_context(|| format!("no version in `{out}`"))
}

/// What to do with the image once built.
pub fn print_push_hint(tag: &str) {
    println!(
        "image: built {tag} and {NAME}:latest. To run it on a cluster, push it to a registry \
         the nodes can pull from and name it in deploy/kubernetes/daemonset.yaml:\n  \
         podman tag {tag} REGISTRY/blockwatch:VERSION\n  \
         podman push REGISTRY/blockwatch:VERSION"
    );
}
