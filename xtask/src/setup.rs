//! `cargo xtask setup`: everything building and testing blockwatch needs,
//! installed idempotently. Each step prints `setup: <step> ... <outcome>`;
//! a step that cannot be done stops setup with one line naming the step and
//! what to do about it.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::anyhow;

use crate::run::{self, cargo_path, check, output_of, stdout_of};

/// The bpf-linker release seen to build against the nightly toolchain's own
/// LLVM (22) with the crates this workspace pins.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// A Debian package the tests or the demo need. Adding one is one line in
/// [`PACKAGES`].
pub struct Package {
    /// The Debian package to install when missing.
    pub name: &'static str,
    /// A command that, when already on PATH, satisfies the need (so a pyenv
    /// python3 or a Node from elsewhere is not replaced).
    pub command: Option<&'static str>,
}

const PACKAGES: &[Package] = &[
    // The asyncio subjects, the integration tests and the demo.
    Package {
        name: "python3",
        command: Some("python3"),
    },
    // The Node subject.
    Package {
        name: "nodejs",
        command: Some("node"),
    },
    // The daemon's end-to-end test scrapes it with a real Prometheus.
    Package {
        name: "prometheus",
        command: Some("prometheus"),
    },
    // `cargo xtask bench` loads an HTTP server with it (small: 200 KB).
    Package {
        name: "wrk",
        command: Some("wrk"),
    },
    // The systemd test builds a Debian root and boots it with nspawn.
    Package {
        name: "debootstrap",
        command: Some("debootstrap"),
    },
    Package {
        name: "systemd-container",
        command: Some("systemd-nspawn"),
    },
    // `cargo xtask image` builds the container image, the image test runs
    // it; `file` checks that the binary is static.
    Package {
        name: "podman",
        command: Some("podman"),
    },
    Package {
        name: "file",
        command: Some("file"),
    },
    // The image test's OCI runtime: crun 1.8 (podman's default) refuses
    // hosts with cgroup v1 and v2 controllers mounted side by side.
    Package {
        name: "runc",
        command: Some("runc"),
    },
    // The pictures test reads `trace --pprof` output with `go tool pprof`.
    Package {
        name: "golang-go",
        command: Some("go"),
    },
    // The pictures test renders the daemon's page and flame graph in it.
    Package {
        name: "chromium",
        command: Some("chromium"),
    },
];

/// The cargo-fuzz release `cargo xtask fuzz` and `test` are run with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

enum Outcome {
    Present(Option<String>),
    Done,
    Skipped(String),
}

/// Why a step failed, and what the user can do.
struct Failure {
    problem: String,
    hint: String,
}

fn fail(problem: impl Into<String>, hint: impl Into<String>) -> Failure {
    Failure {
        problem: problem.into(),
        hint: hint.into(),
    }
}

pub fn run() -> anyhow::Result<()> {
    step("rust-src for the nightly toolchain", rust_src)?;
    step("bpf-linker", bpf_linker)?;
    step("cargo-fuzz", cargo_fuzz)?;
    // blockwatch needs neither; bpftrace, the benchmark's point of
    // comparison, needs tracefs.
    step("tracefs at /sys/kernel/tracing", || {
        mount("tracefs", "/sys/kernel/tracing")
    })?;
    step("bpffs at /sys/fs/bpf", || mount("bpf", "/sys/fs/bpf"))?;
    let names: Vec<&str> = PACKAGES.iter().map(|p| p.name).collect();
    step(&format!("apt packages ({})", names.join(", ")), || {
        apt_packages(PACKAGES)
    })?;
    Ok(())
}

/// Installs the Debian packages of `packages` that are missing, as one
/// `setup: apt packages (...)` step; for tasks (bench) whose needs are too
/// large to install for every build.
pub fn ensure_packages(packages: &[Package]) -> anyhow::Result<()> {
    let names: Vec<&str> = packages.iter().map(|p| p.name).collect();
    step(&format!("apt packages ({})", names.join(", ")), || {
        apt_packages(packages)
    })
}

fn step(name: &str, f: impl FnOnce() -> Result<Outcome, Failure>) -> anyhow::Result<()> {
    print!("setup: {name} ... ");
    let _ = std::io::stdout().flush();
    ANNOUNCED.store(false, Ordering::Relaxed);
    let outcome = f();
    if ANNOUNCED.load(Ordering::Relaxed) {
        // The step printed its own lines: restate which step this is.
        print!("setup: {name} ... ");
    }
    match outcome {
        Ok(Outcome::Present(None)) => println!("already present"),
        Ok(Outcome::Present(Some(what))) => println!("already present ({what})"),
        Ok(Outcome::Done) => println!("ok"),
        Ok(Outcome::Skipped(why)) => println!("skipped ({why})"),
        Err(Failure { problem, hint }) => {
            println!("failed");
            return Err(anyhow!("setup step `{name}` failed: {problem}; {hint}"));
        }
    }
    Ok(())
}

/// Ends the `setup: <step> ... ` line before a long action prints its own
/// output; the step's outcome is printed again afterwards.
fn announce(what: &str) {
    println!("{what}");
    ANNOUNCED.store(true, Ordering::Relaxed);
}

static ANNOUNCED: AtomicBool = AtomicBool::new(false);

fn nightly_sysroot() -> Option<PathBuf> {
    // A probe must not make rustup download a missing toolchain (with the
    // default profile) behind our back: setup installs it deliberately.
    stdout_of(
        Command::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .env("RUSTUP_AUTO_INSTALL", "0"),
    )
    .filter(|s| !s.is_empty())
    .map(PathBuf::from)
}

const RUSTUP_HINT: &str = "check that rustup is installed (https://rustup.rs) and can reach \
static.rust-lang.org, then rerun `cargo xtask setup`";

fn rust_src() -> Result<Outcome, Failure> {
    let src = |sysroot: &Path| sysroot.join("lib/rustlib/src/rust/library");
    match nightly_sysroot() {
        Some(sysroot) if src(&sysroot).is_dir() => Ok(Outcome::Present(None)),
        Some(_) => {
            announce("adding the component");
            rustup(&["component", "add", "rust-src", "--toolchain", "nightly"])?;
            verify_rust_src(src)
        }
        None => {
            announce("installing the nightly toolchain with rust-src");
            rustup(&[
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ])?;
            verify_rust_src(src)
        }
    }
}

fn rustup(args: &[&str]) -> Result<(), Failure> {
    check(Command::new("rustup").args(args)).map_err(|e| fail(format!("{e:#}"), RUSTUP_HINT))
}

fn verify_rust_src(src: impl Fn(&Path) -> PathBuf) -> Result<Outcome, Failure> {
    match nightly_sysroot() {
        Some(sysroot) if src(&sysroot).is_dir() => Ok(Outcome::Done),
        Some(sysroot) => Err(fail(
            format!(
                "rustup reported success but {} is missing",
                src(&sysroot).display()
            ),
            "run `rustup component remove rust-src --toolchain nightly`, then rerun `cargo xtask setup`",
        )),
        None => Err(fail("`rustc +nightly` still does not run", RUSTUP_HINT)),
    }
}

fn bpf_linker_version() -> Option<String> {
    // PATH includes ~/.cargo/bin (see run::put_cargo_bin_on_path).
    output_of("bpf-linker", &["--version"]).filter(|v| !v.is_empty())
}

fn bpf_linker() -> Result<Outcome, Failure> {
    if let Some(version) = bpf_linker_version() {
        return Ok(Outcome::Present(Some(version)));
    }
    let sysroot = nightly_sysroot().ok_or_else(|| {
        fail(
            "`rustc +nightly --print sysroot` fails",
            "run `rustup toolchain install nightly --profile minimal --component rust-src`",
        )
    })?;
    let lib_dir = sysroot.join("lib");
    let (llvm_file, major) = nightly_llvm(&lib_dir)?;

    // bpf-linker links against LLVM_PREFIX/lib/libLLVM.so and keeps that
    // folder as its run path: it must outlive the install.
    let home = run::home().ok_or_else(|| fail("HOME is not set", "set HOME and rerun"))?;
    let prefix = home.join(".cache/blockwatch/llvm");
    let target = lib_dir.join(&llvm_file);
    link_llvm(&prefix.join("lib"), &target, &llvm_file).map_err(|e| {
        fail(
            format!("cannot make the LLVM folder {}: {e}", prefix.display()),
            "check that the folder is writable",
        )
    })?;

    announce(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's LLVM {major} (about a minute)"
    ));
    let features = format!("llvm-{major}");
    let mut cmd = Command::new(cargo_path());
    cmd.args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", &features])
        // --force replaces a bpf-linker whose LLVM went away with a nightly update.
        .args(["--locked", "--force"])
        .env("LLVM_PREFIX", &prefix);
    check(&mut cmd).map_err(|e| {
        fail(
            format!("{e:#}"),
            "check that crates.io is reachable and the nightly toolchain is intact, then rerun `cargo xtask setup`",
        )
    })?;
    match bpf_linker_version() {
        Some(_) => Ok(Outcome::Done),
        None => Err(fail(
            "bpf-linker was installed but `bpf-linker --version` fails",
            format!(
                "check that {} exists, then remove ~/.cargo/bin/bpf-linker and rerun `cargo xtask setup`",
                target.display()
            ),
        )),
    }
}

fn cargo_fuzz_version() -> Option<String> {
    // `cargo fuzz` finds cargo-fuzz in ~/.cargo/bin whichever cargo runs.
    output_of("cargo", &["fuzz", "--version"]).filter(|v| !v.is_empty())
}

fn cargo_fuzz() -> Result<Outcome, Failure> {
    if let Some(version) = cargo_fuzz_version() {
        return Ok(Outcome::Present(Some(version)));
    }
    announce(&format!(
        "building cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)"
    ));
    let mut cmd = Command::new(cargo_path());
    cmd.args(["install", "cargo-fuzz", "--version", CARGO_FUZZ_VERSION])
        .arg("--locked");
    check(&mut cmd).map_err(|e| {
        fail(
            format!("{e:#}"),
            "check that crates.io is reachable, then rerun `cargo xtask setup`",
        )
    })?;
    match cargo_fuzz_version() {
        Some(_) => Ok(Outcome::Done),
        None => Err(fail(
            "cargo-fuzz was installed but `cargo fuzz --version` fails",
            "check that ~/.cargo/bin is on PATH, then rerun `cargo xtask setup`",
        )),
    }
}

/// The nightly toolchain's LLVM library, `libLLVM.so.<major>.<minor>-rust-<version>`,
/// and its major version.
fn nightly_llvm(lib_dir: &Path) -> Result<(String, u32), Failure> {
    let entries = std::fs::read_dir(lib_dir).map_err(|e| {
        fail(
            format!("cannot read {}: {e}", lib_dir.display()),
            "reinstall the nightly toolchain: `rustup toolchain install nightly --force`",
        )
    })?;
    let mut found: Vec<(String, u32)> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|name| {
            let version = name.strip_prefix("libLLVM.so.")?;
            let major = version.split(['.', '-']).next()?.parse().ok()?;
            Some((name, major))
        })
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        fail(
            format!("no libLLVM.so.<version> in {}", lib_dir.display()),
            "the nightly toolchain ships its LLVM as a shared library on x86-64 Linux; \
             update it with `rustup update nightly`",
        )
    })
}

/// `dir/libLLVM.so` and `dir/<file_name>`, both symlinks to `target`.
fn link_llvm(dir: &Path, target: &Path, file_name: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for name in ["libLLVM.so", file_name] {
        let link = dir.join(name);
        if std::fs::read_link(&link).is_ok_and(|t| t == target) {
            continue;
        }
        match std::fs::remove_file(&link) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::os::unix::fs::symlink(target, &link)?;
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn mount(fstype: &str, mount_point: &str) -> Result<Outcome, Failure> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let mut f = l.split_whitespace().skip(1);
        f.next() == Some(mount_point) && f.next() == Some(fstype)
    });
    if mounted {
        return Ok(Outcome::Present(None));
    }
    if !is_root() {
        return Ok(Outcome::Skipped(
            "not root; blockwatch mounts it itself when it runs".into(),
        ));
    }
    check(Command::new("mount").args(["-t", fstype, fstype, mount_point])).map_err(|e| {
        fail(
            format!("{e:#}"),
            format!("the kernel needs {fstype} support; check `grep {fstype} /proc/filesystems`"),
        )
    })?;
    Ok(Outcome::Done)
}

fn on_path(command: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(command))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

fn dpkg_installed(package: &str) -> bool {
    output_of("dpkg", &["-s", package])
        .is_some_and(|s| s.lines().any(|l| l == "Status: install ok installed"))
}

fn apt_packages(packages: &[Package]) -> Result<Outcome, Failure> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|p| !p.command.is_some_and(on_path) && !dpkg_installed(p.name))
        .map(|p| p.name)
        .collect();
    if missing.is_empty() {
        return Ok(Outcome::Present(None));
    }
    let list = missing.join(" ");
    if !on_path("apt-get") {
        return Err(fail(
            format!("missing: {list}, and there is no apt-get"),
            "install them with the system's package manager",
        ));
    }
    if !is_root() {
        return Err(fail(
            format!("missing: {list}"),
            format!("run `sudo apt-get install -y {list}` or run setup as root"),
        ));
    }
    announce(&format!("installing {list}"));
    let apt = |args: &[&str]| {
        check(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .map_err(|e| {
            fail(
                format!("{e:#}"),
                format!("check the apt sources, then run `apt-get install -y {list}`"),
            )
        })
    };
    apt(&["update"])?;
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)?;
    Ok(Outcome::Done)
}
