//! The container image (`cargo xtask image`, which `cargo xtask test` runs
//! first) run with podman the way deploy/kubernetes/daemonset.yaml runs it:
//! the host's PID namespace, the unit's five capabilities and no others,
//! no seccomp or AppArmor profile, a read-only root with a tmpfs /tmp, and
//! the host's /sys/kernel/btf (no tracefs, no bpffs). It must
//! see a Python process of the host blocking in `time.sleep`.

#[path = "common/bounded.rs"]
mod bounded;
mod common;

use std::io::Read as _;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bounded::bounded;

const IMAGE: &str = concat!("localhost/blockwatch:", env!("CARGO_PKG_VERSION"));

/// An asyncio loop that calls `time.sleep(0.05)` in `blocking_handler`
/// every 0.2 s for about a minute.
const BLOCKER: &str = r#"
import asyncio
import time


def blocking_handler():
    time.sleep(0.05)


async def main():
    for _ in range(240):
        blocking_handler()
        await asyncio.sleep(0.2)


asyncio.run(main())
"#;

fn podman() -> Command {
    let mut cmd = Command::new("podman");
    // crun 1.8, podman's default runtime on Debian 12, refuses hosts that
    // mount cgroup v1 controllers next to a v2 hierarchy with controllers
    // (as this CI host does); runc runs there (`cargo xtask setup`
    // installs it).
    cmd.arg("--runtime=runc");
    cmd
}

/// `podman run` as the DaemonSet runs the pod (see its securityContext and
/// volumes).
fn podman_run() -> Command {
    let mut cmd = podman();
    cmd.args([
        "run",
        "--pid=host",
        "--user=0",
        "--cap-drop=all",
        "--cap-add=BPF,PERFMON,SYS_RESOURCE,SYS_PTRACE,DAC_READ_SEARCH",
        "--security-opt=seccomp=unconfined",
        "--security-opt=apparmor=unconfined",
        "--security-opt=no-new-privileges",
        "--read-only",
        "--tmpfs=/tmp",
        "--volume=/sys/kernel/btf:/sys/kernel/btf:ro",
    ]);
    // podman asks for 1M open files and 4M processes by default, which a
    // runtime without CAP_SYS_RESOURCE (as on this CI host) cannot grant:
    // ask for what we have. Not part of the DaemonSet (kubelet sets none).
    cmd.arg(format!("--ulimit=nofile={0}:{0}", hard_nofile().min(65536)))
        .arg("--ulimit=nproc=4096:4096");
    cmd
}

fn hard_nofile() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if ok { limit.rlim_max } else { 1024 }
}

/// The image `cargo xtask image` built from this version; not rebuilt
/// here (a nested static build takes minutes).
fn require_image() {
    let out = podman()
        .args(["image", "exists", IMAGE])
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run podman ({e}): run `cargo xtask setup`, which installs it")
        });
    assert!(
        out.success(),
        "no image {IMAGE}: build it with `cargo xtask image` (`cargo xtask test` does)"
    );
}

/// A host Python process named `name` running [`BLOCKER`]; killed on drop.
struct Blocker {
    child: Child,
    _alias: common::Alias,
    _dir: tempfile::TempDir,
}

impl Blocker {
    fn start(name: &str) -> Blocker {
        let alias = common::python_alias(name);
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("blocker.py");
        std::fs::write(&script, BLOCKER).unwrap();
        let child = Command::new(&alias.path)
            .arg(&script)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the Python blocker");
        Blocker {
            child,
            _alias: alias,
            _dir: dir,
        }
    }
}

impl Drop for Blocker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `trace` in the image, for a few seconds, reports the host's Python
/// process blocking in `time.sleep`, with its Python culprit.
#[test]
fn trace_in_the_image_sees_a_host_python_process() {
    let _serial = common::setup();
    require_image();
    let _blocker = Blocker::start("bwimgtrace");
    let out = bounded(
        podman_run().args([
            "--rm",
            IMAGE,
            "trace",
            "--comm",
            "bwimgtrace",
            "--duration",
            "4s",
            "--output",
            "json",
        ]),
        Duration::from_secs(60),
    );
    let report = format!("stdout:\n{}\nstderr:\n{}", out.stdout, out.stderr);
    assert!(
        out.ok(),
        "blockwatch trace in {IMAGE} {}\n{report}",
        out.outcome()
    );
    let seen = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| {
            e["comm"] == "bwimgtrace"
                && e["class"] == "sleep"
                && e["culprit"]["function"] == "blocking_handler"
        })
        .count();
    assert!(
        seen >= 3,
        "{seen} sleep events of bwimgtrace with culprit blocking_handler (want 3 or more in 4 s)\n{report}"
    );
}

/// A container removed on drop.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time=5", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::Write as _;
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.starts_with("HTTP/1.1 200").then_some(body)
}

/// The image's own command and config (`daemon --auto`, every loop the
/// host's PID namespace shows) counts the host's Python process, and
/// SIGTERM (`podman stop`, a pod's deletion) ends it with exit code 0.
#[test]
fn the_images_daemon_counts_a_host_python_process() {
    let _serial = common::setup();
    require_image();
    let _blocker = Blocker::start("bwimgdaemon");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let name = format!("blockwatch-test-{}", std::process::id());
    let run = bounded(
        podman_run()
            .args(["--detach", "--network=host", "--name", &name])
            // The image's CMD and config, listening where the test can
            // reach it (flags override the file).
            .args([
                IMAGE,
                "daemon",
                "--config",
                "/etc/blockwatch/blockwatch.toml",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ]),
        Duration::from_secs(60),
    );
    let container = Container(name);
    assert!(
        run.ok(),
        "podman run --detach {IMAGE} {}: {}",
        run.outcome(),
        run.stderr
    );
    let logs = || {
        bounded(
            podman().args(["logs", &container.0]),
            Duration::from_secs(10),
        )
        .all()
    };
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let counted = http_get(port, "/metrics").is_some_and(|m| {
            m.lines().any(|l| {
                l.starts_with("blockwatch_blocking_events_total{")
                    && l.contains("process=\"bwimgdaemon\"")
                    && l.contains("culprit=\"blocking_handler\"")
            })
        });
        if counted {
            break;
        }
        assert!(
            Instant::now() < end,
            "no blockwatch_blocking_events_total{{process=\"bwimgdaemon\",culprit=\"blocking_handler\"}} \
             on :{port}/metrics after 30 s\n--- podman logs ---\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let stop = bounded(
        podman().args(["stop", "--time=15", &container.0]),
        Duration::from_secs(30),
    );
    assert!(stop.ok(), "podman stop {}: {}", stop.outcome(), stop.stderr);
    let status = bounded(
        podman().args(["inspect", "--format", "{{.State.ExitCode}}", &container.0]),
        Duration::from_secs(10),
    );
    assert_eq!(
        status.stdout.trim(),
        "0",
        "the daemon's exit code on SIGTERM\n{}",
        logs()
    );
}
