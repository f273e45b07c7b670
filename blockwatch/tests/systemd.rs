//! The shipped unit under a real systemd: a minimal Debian machine booted
//! with `systemd-nspawn --boot` (nspawn's own PID namespace, the unit's
//! capabilities, `bpf` and `perf_event_open` allowed), the binary,
//! `packaging/blockwatch.service` and `packaging/blockwatch.toml` installed
//! with the commands of the README's "Install as a systemd service", run
//! as they are written. Only `listen` is changed in the installed config,
//! to a free port: the machine shares the host's network.
//!
//! Needs debootstrap and systemd-container (`cargo xtask setup`) and, the
//! first time, Debian's package archive (the root is cached under
//! `~/.cache/blockwatch`).

#[path = "common/bounded.rs"]
mod bounded;
mod common;
#[path = "common/nspawn.rs"]
mod nspawn;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use nspawn::{Boot, Machine};

/// Where the machine sees the files the README's commands install, laid out
/// as in the repository (they run from there).
const REPO: &str = "/srv/blockwatch";
/// `systemd-analyze security` of the unit today; it must not get worse.
const MAX_EXPOSURE: f64 = 4.3;
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(30);
const METRICS_TIMEOUT: Duration = Duration::from_secs(30);

/// An asyncio service whose loop calls `time.sleep(0.05)` every 0.2 s, in
/// `blocking_handler`, which is therefore the culprit.
const BLOCKER: &str = r#"
import asyncio
import time


def blocking_handler():
    time.sleep(0.05)


async def main():
    while True:
        blocking_handler()
        await asyncio.sleep(0.2)


asyncio.run(main())
"#;

fn unit_text() -> String {
    std::fs::read_to_string(common::repo_root().join("packaging/blockwatch.service"))
        .expect("packaging/blockwatch.service")
}

/// `name=` of the unit's [Service] section, e.g. `TimeoutStopSec`.
fn unit_setting(name: &str) -> String {
    unit_text()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("packaging/blockwatch.service has no {name}="))
        .trim()
        .to_string()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// The shell commands of the README's "Install as a systemd service" block.
fn readme_install_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(common::repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split_once("### Install as a systemd service")
        .expect("README.md has a section \"### Install as a systemd service\"")
        .1;
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .expect("the install section starts with a ```sh block")
        .0;
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// Whether the test runs a README line itself: building is done (the
/// test's binary is installed), following the journal never ends, and the
/// metrics are fetched from the host (the machine has no curl).
fn run_by_the_test(line: &str) -> bool {
    !(line.starts_with("cargo build")
        || (line.starts_with("journalctl") && line.contains(" -f"))
        || line.starts_with("curl"))
}

/// A booted machine with the repository's files at [`REPO`] and the daemon
/// configured to listen on `port`.
struct Rig {
    machine: Machine,
    addr: SocketAddr,
    _files: tempfile::TempDir,
}

fn boot() -> Rig {
    let root = nspawn::debian_root();
    let files = tempfile::tempdir().expect("a temporary directory");
    let dir = files.path();
    let port = free_port();
    let toml = std::fs::read_to_string(common::repo_root().join("packaging/blockwatch.toml"))
        .expect("packaging/blockwatch.toml");
    let listen = "listen = \"127.0.0.1:9747\"";
    assert_eq!(
        toml.matches(listen).count(),
        1,
        "packaging/blockwatch.toml has one line `{listen}`, which the test replaces"
    );
    let toml = toml.replace(listen, &format!("listen = \"127.0.0.1:{port}\""));
    std::fs::create_dir_all(dir.join("packaging")).unwrap();
    std::fs::create_dir_all(dir.join("target/release")).unwrap();
    std::fs::write(dir.join("packaging/blockwatch.toml"), toml).unwrap();
    std::fs::write(dir.join("packaging/blockwatch.service"), unit_text()).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_blockwatch"),
        dir.join("target/release/blockwatch"),
    )
    .expect("copy the blockwatch binary");
    std::fs::write(dir.join("blocker.py"), BLOCKER).unwrap();

    let capabilities: Vec<String> = unit_setting("CapabilityBoundingSet")
        .split_whitespace()
        .map(String::from)
        .collect();
    let machine = Machine::boot(&Boot {
        root: &root,
        capabilities: &capabilities,
        system_calls: &["bpf", "perf_event_open"],
        binds_ro: &[(dir, REPO)],
    });
    let btf = machine.sh("test -r /sys/kernel/btf/vmlinux", Duration::from_secs(10));
    assert!(
        btf.ok(),
        "the machine does not see /sys/kernel/btf/vmlinux: bind-mount it (--bind-ro=/sys/kernel/btf)"
    );
    Rig {
        machine,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        _files: files,
    }
}

impl Rig {
    /// Runs the README's install commands in [`REPO`], those `until`
    /// accepts, stopping at the first it refuses.
    fn install(&self, until: impl Fn(&str) -> bool) {
        for line in readme_install_commands() {
            if !until(&line) {
                return;
            }
            if !run_by_the_test(&line) {
                continue;
            }
            let out = self
                .machine
                .sh(&format!("cd {REPO} && {line}"), SYSTEMCTL_TIMEOUT);
            assert!(
                out.ok(),
                "README, \"Install as a systemd service\": `{line}` {} in the machine\n{}\n{}",
                out.outcome(),
                out.all(),
                self.service_report()
            );
        }
    }

    /// The unit's state and its journal, for failure messages.
    fn service_report(&self) -> String {
        let status = self.machine.sh(
            "systemctl status blockwatch.service --no-pager --lines=0; \
             journalctl -u blockwatch.service --no-pager -o cat | tail -n 25; \
             systemctl status asyncio-blocker.service --no-pager --lines=5",
            Duration::from_secs(15),
        );
        format!(
            "--- blockwatch.service (and the Python service) ---\n{}",
            status.all()
        )
    }

    fn show(&self, properties: &str) -> String {
        self.machine.must(
            "systemctl show",
            &format!("systemctl show blockwatch.service --property={properties}"),
            SYSTEMCTL_TIMEOUT,
        )
    }

    fn property(&self, name: &str) -> String {
        self.show(name)
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_default()
            .to_string()
    }

    fn metrics(&self) -> Option<String> {
        use std::io::{Read as _, Write as _};
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.starts_with("HTTP/1.1 200").then_some(body)
    }

    /// `blockwatch_blocking_events_total` of the blocker's culprit.
    fn blocker_events(&self) -> Option<f64> {
        let metrics = self.metrics()?;
        metrics
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("blockwatch_blocking_events_total{")?;
                let (labels, value) = rest.rsplit_once("} ")?;
                (labels.contains("process=\"python3\"")
                    && labels.contains("culprit=\"blocking_handler\""))
                .then(|| value.trim().parse::<f64>().ok())?
            })
            .reduce(|a, b| a + b)
    }

    /// Waits until the blocker's counter passes `above`.
    fn wait_for_events_above(&self, above: f64, what: &str) -> f64 {
        let end = Instant::now() + METRICS_TIMEOUT;
        loop {
            if let Some(n) = self.blocker_events().filter(|&n| n > above) {
                return n;
            }
            if Instant::now() >= end {
                let metrics = self.metrics().map_or_else(
                    || format!("nothing answers on http://{}/metrics", self.addr),
                    |m| {
                        m.lines()
                            .filter(|l| l.starts_with("blockwatch_") && !l.contains("_bucket"))
                            .collect::<Vec<_>>()
                            .join("\n")
                    },
                );
                panic!(
                    "{what}: no blockwatch_blocking_events_total{{process=\"python3\",culprit=\"blocking_handler\"}} \
                     above {above} after {} s\n--- /metrics ---\n{metrics}\n{}",
                    METRICS_TIMEOUT.as_secs(),
                    self.service_report()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// Installed as the README says, the unit starts (Type=notify, with a
/// status text), counts a Python service's `time.sleep` under its culprit,
/// keeps its counters across `systemctl reload`, and stops cleanly within
/// TimeoutStopSec.
#[test]
fn the_shipped_unit_runs_under_systemd() {
    let _serial = common::setup();
    let rig = boot();
    let m = &rig.machine;
    m.must(
        "start the Python service",
        &format!(
            "systemd-run --unit=asyncio-blocker --property=Type=exec /usr/bin/python3 {REPO}/blocker.py"
        ),
        SYSTEMCTL_TIMEOUT,
    );
    rig.install(|_| true);

    let state = rig.show("ActiveState,SubState,StatusText,MainPID");
    assert!(
        state.contains("ActiveState=active\n") && state.contains("SubState=running\n"),
        "blockwatch.service is not active after `systemctl enable --now`:\n{state}\n{}",
        rig.service_report()
    );
    let status = rig.property("StatusText");
    assert!(
        !status.is_empty(),
        "the unit has no status text (Type=notify, STATUS=)\n{state}"
    );
    eprintln!("systemd: blockwatch.service active: {status:?}");

    let before = rig.wait_for_events_above(0.0, "the Python service's time.sleep");

    let pid = rig.property("MainPID");
    let reload = m.sh("systemctl reload blockwatch.service", SYSTEMCTL_TIMEOUT);
    assert!(
        reload.ok(),
        "`systemctl reload blockwatch.service` {}\n{}\n{}",
        reload.outcome(),
        reload.all(),
        rig.service_report()
    );
    // The daemon says it re-read the file (stderr goes to the journal).
    let end = Instant::now() + Duration::from_secs(10);
    while !m
        .sh(
            "journalctl -u blockwatch.service -o cat | grep -q 'configuration reloaded'",
            SYSTEMCTL_TIMEOUT,
        )
        .ok()
    {
        assert!(
            Instant::now() < end,
            "no \"configuration reloaded\" in the journal 10 s after `systemctl reload`\n{}",
            rig.service_report()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        rig.property("ActiveState"),
        "active",
        "active after reload\n{}",
        rig.service_report()
    );
    assert_eq!(
        rig.property("MainPID"),
        pid,
        "reload is a SIGHUP, not a restart\n{}",
        rig.service_report()
    );
    let kept = rig.blocker_events().unwrap_or(0.0);
    assert!(
        kept >= before,
        "the counter went from {before} to {kept} across `systemctl reload`: counters must be kept"
    );
    rig.wait_for_events_above(kept, "counting on after reload");

    let timeout = humantime::parse_duration(&unit_setting("TimeoutStopSec"))
        .expect("TimeoutStopSec is a duration");
    let started = Instant::now();
    let stop = m.sh(
        "systemctl stop blockwatch.service",
        timeout + Duration::from_secs(10),
    );
    let took = started.elapsed();
    assert!(
        stop.ok() && took < timeout,
        "`systemctl stop` {} after {:.1} s (TimeoutStopSec={} s)\n{}\n{}",
        stop.outcome(),
        took.as_secs_f64(),
        timeout.as_secs(),
        stop.all(),
        rig.service_report()
    );
    let after = rig.show("ActiveState,Result,ExecMainCode,ExecMainStatus");
    assert!(
        after.contains("ActiveState=inactive\n")
            && after.contains("Result=success\n")
            && after.contains("ExecMainStatus=0\n"),
        "blockwatch did not exit cleanly on SIGTERM:\n{after}\n{}",
        rig.service_report()
    );
    eprintln!("systemd: stopped in {:.2} s", took.as_secs_f64());
}

/// `systemd-analyze security` of the installed unit stays at or below
/// today's exposure.
#[test]
fn the_units_exposure_stays_low() {
    let _serial = common::setup();
    let rig = boot();
    // Installed and loaded; starting it is the other test's business.
    rig.install(|line| !line.contains("--now") && !line.contains("systemctl start"));
    let out = rig.machine.must(
        "systemd-analyze security",
        "systemd-analyze security --no-pager blockwatch.service",
        SYSTEMCTL_TIMEOUT,
    );
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level for blockwatch.service:"))
        .unwrap_or_else(|| panic!("no \"Overall exposure level\" line:\n{out}"));
    let level: f64 = line
        .split_once("blockwatch.service:")
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"));
    eprintln!("systemd: {}", line.trim());
    assert!(
        level <= MAX_EXPOSURE,
        "systemd-analyze security: {level} > {MAX_EXPOSURE} for packaging/blockwatch.service:\n{out}"
    );
}
