//! A throwaway Debian machine under a real systemd, for the systemd test:
//! a minimal root built once with debootstrap and cached under
//! `~/.cache/blockwatch`, booted with `systemd-nspawn --boot` on a
//! copy-on-write overlay (the cached root is never written), driven with
//! `nsenter` into its PID 1, and killed when dropped.
//!
//! Every wait has a deadline and fails with what the machine printed; the
//! host needs no systemd of its own (`--register=no --keep-unit`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::bounded::{Output, bounded, tail};

/// The Debian release and packages of the cached root. Changing them means
/// changing [`ROOT_NAME`] too, so that a new root is built.
const SUITE: &str = "bookworm";
const INCLUDE: &str = "systemd,systemd-sysv,dbus,python3";
const MIRROR: &str = "http://deb.debian.org/debian";
const ROOT_NAME: &str = "nspawn-bookworm-1";
/// Written into the root last, before the rename that publishes it.
const STAMP: &str = ".blockwatch-root";

/// debootstrap takes about 45 s with a good mirror; a slow one gets longer.
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(600);
/// From `systemd-nspawn` to `systemctl is-system-running` answering.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// `~/.cache/blockwatch`.
fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/blockwatch")
}

fn on_path(command: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(command).is_file())
}

fn require(command: &str, package: &str) {
    assert!(
        on_path(command),
        "`{command}` is missing: run `cargo xtask setup` (it installs the Debian package {package})"
    );
}

/// The cached Debian root, built on first use: debootstrap into a temporary
/// directory next to it, then one rename publishes it, so an interrupted
/// build is never mistaken for a root. Quick when it is there.
pub fn debian_root() -> PathBuf {
    let cache = cache_dir();
    let root = cache.join(ROOT_NAME);
    if root.join(STAMP).is_file() {
        return root;
    }
    require("debootstrap", "debootstrap");
    std::fs::create_dir_all(&cache)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", cache.display()));
    let tmp = cache.join(format!("{ROOT_NAME}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let args = [
        "--variant=minbase",
        &format!("--include={INCLUDE}"),
        SUITE,
        &tmp.display().to_string(),
        MIRROR,
    ];
    eprintln!(
        "nspawn: building the Debian root {} (debootstrap {}; about a minute, once)",
        root.display(),
        args.join(" ")
    );
    let out = bounded(Command::new("debootstrap").args(args), DEBOOTSTRAP_TIMEOUT);
    if !out.ok() {
        let _ = std::fs::remove_dir_all(&tmp);
        panic!(
            "debootstrap {} {}; check that {MIRROR} is reachable\n{}",
            args.join(" "),
            out.outcome(),
            tail(&out.all(), 30)
        );
    }
    std::fs::write(tmp.join(STAMP), format!("debootstrap {}\n", args.join(" ")))
        .unwrap_or_else(|e| panic!("cannot write the stamp into {}: {e}", tmp.display()));
    if let Err(e) = std::fs::rename(&tmp, &root) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another test process may have published its root first.
        assert!(
            root.join(STAMP).is_file(),
            "cannot rename {} to {}: {e}; remove {} and rerun",
            tmp.display(),
            root.display(),
            root.display()
        );
    }
    root
}

/// `text` without ANSI colour sequences (`ESC [ ... m`), which systemd
/// prints on the console.
fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// nspawn keeps per-machine state under /run/systemd/nspawn, which must be
/// a tmpfs; a host without systemd as PID 1 has none.
fn ensure_nspawn_run_dir() {
    const DIR: &str = "/run/systemd/nspawn";
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mountinfo
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(DIR))
    {
        return;
    }
    std::fs::create_dir_all(DIR).unwrap_or_else(|e| panic!("cannot create {DIR}: {e}"));
    let out = bounded(
        Command::new("mount").args(["-t", "tmpfs", "-o", "mode=0755", "tmpfs", DIR]),
        Duration::from_secs(10),
    );
    assert!(
        out.ok(),
        "mount -t tmpfs tmpfs {DIR} {}: {}",
        out.outcome(),
        out.all()
    );
}

/// A booted machine; dropping it kills it.
pub struct Machine {
    nspawn: Child,
    /// The machine's PID 1, as the host sees it.
    leader: u32,
    console: PathBuf,
    _scratch: tempfile::TempDir,
}

/// How to boot a [`Machine`].
pub struct Boot<'a> {
    pub root: &'a Path,
    /// Capabilities granted to the machine, e.g. `CAP_BPF`.
    pub capabilities: &'a [String],
    /// System calls allowed on top of nspawn's default filter.
    pub system_calls: &'a [&'a str],
    /// `(host path, machine path)` bind mounts, read-only.
    pub binds_ro: &'a [(&'a Path, &'a str)],
}

impl Machine {
    /// Boots `boot.root` on a tmpfs overlay (so the root stays as built)
    /// in the host's network namespace, and waits for systemd to finish
    /// starting up.
    pub fn boot(boot: &Boot) -> Machine {
        require("systemd-nspawn", "systemd-container");
        require("nsenter", "util-linux");
        ensure_nspawn_run_dir();
        let scratch = tempfile::tempdir().expect("a scratch directory");
        let console = scratch.path().join("console.log");
        let log = std::fs::File::create(&console).expect("the console log");
        let name = format!("bwtest-{}", std::process::id());
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("--directory")
            .arg(boot.root)
            .args([
                "--volatile=overlay",
                "--boot",
                "--register=no",
                "--keep-unit",
            ])
            .arg(format!("--machine={name}"))
            .arg(format!("--capability={}", boot.capabilities.join(",")))
            .arg(format!(
                "--system-call-filter={}",
                boot.system_calls.join(" ")
            ));
        for (host, inside) in boot.binds_ro {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        let nspawn = cmd
            .env("SYSTEMD_COLORS", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the console log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run systemd-nspawn: {e}"));
        let mut machine = Machine {
            nspawn,
            leader: 0,
            console,
            _scratch: scratch,
        };
        machine.leader = machine.find_leader();
        machine.wait_for_boot();
        machine
    }

    /// The host PID of the machine's PID 1: nspawn's child whose PID in
    /// its own namespace is 1.
    fn find_leader(&mut self) -> u32 {
        let nspawn = self.nspawn.id();
        let end = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited ({status}) before the machine started\n{}",
                    self.console()
                );
            }
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
                    continue;
                };
                let field = |name: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(|v| v.split_whitespace().collect::<Vec<_>>())
                        .unwrap_or_default()
                };
                let ns_pids = field("NSpid:");
                // The child is PID 1 before it executes systemd; entering
                // it earlier would find the host's mounts.
                let comm = field("Name:");
                if field("PPid:") == [nspawn.to_string().as_str()]
                    && comm == ["systemd"]
                    && ns_pids.len() >= 2
                    && ns_pids.last() == Some(&"1")
                {
                    return pid;
                }
            }
            assert!(
                Instant::now() < end,
                "no PID 1 under systemd-nspawn (PID {nspawn}) after {} s\n{}",
                BOOT_TIMEOUT.as_secs(),
                self.console()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for_boot(&self) {
        // `--wait` blocks until start-up is done: "running", or "degraded"
        // when a unit of the minimal root failed (not ours to judge). Until
        // systemd listens on its socket it fails at once ("offline").
        let end = Instant::now() + BOOT_TIMEOUT;
        let state = loop {
            let left = end.saturating_duration_since(Instant::now());
            let out = self.sh("systemctl is-system-running --wait", left);
            let state = out.stdout.trim().to_string();
            if state == "running" || state == "degraded" {
                break state;
            }
            if Instant::now() >= end {
                panic!(
                    "the machine did not finish booting within {} s: `systemctl is-system-running --wait` {} ({state:?})\n{}\n{}",
                    BOOT_TIMEOUT.as_secs(),
                    out.outcome(),
                    out.stderr.trim(),
                    self.console()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if state == "degraded" {
            let failed = self.sh("systemctl --failed --no-legend", Duration::from_secs(10));
            eprintln!(
                "nspawn: the machine booted degraded: {}",
                failed.stdout.trim()
            );
        }
    }

    /// Runs `sh -c script` inside the machine (its namespaces and root) as
    /// root, with a clean environment, bounded by `timeout`.
    pub fn sh(&self, script: &str, timeout: Duration) -> Output {
        bounded(
            Command::new("nsenter")
                .arg(format!("--target={}", self.leader))
                .args(["--all", "--root", "--wd", "--"])
                .args(["/usr/bin/env", "-i"])
                .args([
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "HOME=/root",
                    "LANG=C.UTF-8",
                    "SYSTEMD_COLORS=0",
                    "SYSTEMD_PAGER=",
                ])
                .args(["/bin/sh", "-c", script]),
            timeout,
        )
    }

    /// Like [`Machine::sh`], panicking with `what` and the output on failure.
    pub fn must(&self, what: &str, script: &str, timeout: Duration) -> String {
        let out = self.sh(script, timeout);
        assert!(
            out.ok(),
            "{what}: `{script}` {} in the machine\n{}",
            out.outcome(),
            out.all()
        );
        out.stdout
    }

    /// What the machine printed on its console (nspawn and systemd), the
    /// last lines.
    pub fn console(&self) -> String {
        let text = std::fs::read_to_string(&self.console).unwrap_or_default();
        let text = strip_colours(&text);
        format!("--- machine console (last lines) ---\n{}", tail(&text, 40))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // Killing PID 1 of a PID namespace kills every process in it; the
        // overlay and the mounts go with nspawn's mount namespace.
        if self.leader != 0 && matches!(self.nspawn.try_wait(), Ok(None)) {
            // SAFETY: kill has no memory-safety preconditions. nspawn still
            // runs, so its child, the machine's PID 1, is not reaped and
            // the PID cannot have been recycled.
            unsafe { libc::kill(self.leader as libc::pid_t, libc::SIGKILL) };
        }
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}
