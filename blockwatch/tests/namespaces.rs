//! blockwatch inside a PID namespace (a container, a systemd-nspawn machine,
//! a pod without `hostPID`): it watches the processes it can see there and
//! names them by the PIDs they have there, and it says so when `/proc`
//! does not match its namespace instead of watching nothing.
//!
//! Each namespace is made with `unshare --pid --fork --mount-proc`, as
//! root, like the rest of the integration tests.

mod common;

use common::free_addr;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_blockwatch");

/// An asyncio program that prints its PID, then blocks its loop three
/// times in `inside_handler` (the first blocking call of a freshly
/// discovered interpreter may miss its Python frames; the later ones not).
const INSIDE: &str = r#"
import asyncio, os, sys, time
async def inside_handler():
    time.sleep(0.08)
async def main():
    print("pid", os.getpid(), flush=True)
    await asyncio.sleep(1.0)
    for _ in range(3):
        await inside_handler()
        await asyncio.sleep(0.1)
asyncio.run(main())
"#;

/// `args` run in a new PID namespace with its own /proc.
fn in_pid_namespace(args: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .args(args)
        .current_dir(common::repo_root());
    cmd
}

#[test]
fn trace_in_a_pid_namespace_names_processes_by_their_pids_there() {
    let _serial = common::setup();
    let out = in_pid_namespace(&[
        BIN,
        "trace",
        "-o",
        "json",
        "--threshold",
        "40ms",
        "--",
        "python3",
        "-c",
        INSIDE,
    ])
    .output()
    .expect("unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{:?}\n{stdout}\n{stderr}", out.status);
    // The subject's own PID in the namespace (blockwatch is 1, the
    // subject a small number after it).
    let ns_pid: u32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pid ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("the subject printed its PID:\n{stdout}\n{stderr}"));
    assert!(ns_pid < 100, "a namespace PID, not a host one: {ns_pid}");
    let events: Vec<common::Event> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let sleeps: Vec<_> = events
        .iter()
        .filter(|e| e.syscall.as_deref() == Some("clock_nanosleep"))
        .collect();
    assert_eq!(sleeps.len(), 3, "three sleeps:\n{stdout}\n{stderr}");
    for e in &sleeps {
        assert_eq!((e.pid, e.tid), (ns_pid, ns_pid), "namespace PIDs: {e:?}");
        assert!(
            (80.0..1080.0).contains(&e.ms()),
            "80 ms sleep: {}",
            e.summary()
        );
    }
    assert!(
        sleeps.iter().any(|e| e
            .culprit
            .as_ref()
            .is_some_and(|c| c.function.as_deref() == Some("inside_handler"))),
        "the Python function is named:\n{stdout}"
    );
}

/// A `/proc` of another namespace (`unshare --pid --fork` without
/// `--mount-proc`) would show other PIDs than the kernel programs send:
/// blockwatch refuses at start, in one line that says what to do.
#[test]
fn a_proc_of_another_namespace_is_refused_clearly() {
    let _serial = common::setup();
    let out = Command::new("unshare")
        .args(["--pid", "--fork", BIN, "trace", "--", "true"])
        .output()
        .expect("unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("/proc") && stderr.contains("--mount-proc"),
        "says what to do: {stderr}"
    );
}

fn metrics(addr: SocketAddr) -> Option<String> {
    common::http_get(addr, "/metrics").map(|(_, _, body)| body)
}

/// Sum of `blockwatch_blocking_events_total` over the series whose labels
/// contain `label`.
fn events_with(metrics: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("blockwatch_blocking_events_total{") && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: kill has no memory preconditions; the PID is our child's.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon and a Python service in one PID namespace: the service's
/// blocking calls reach /metrics with their culprit; a process of the
/// host, outside the namespace, blocking the same way, does not.
#[test]
fn daemon_watches_the_services_of_its_own_namespace_only() {
    let _serial = common::setup();
    let addr = free_addr();
    let outside_script = INSIDE
        .replace("inside_handler", "outside_handler")
        .replace("range(3)", "range(40)");
    let mut outside = Killed(
        Command::new("python3")
            .args(["-c", &outside_script])
            .stdout(Stdio::null())
            .spawn()
            .expect("python3"),
    );
    // The service loops forever so the daemon finds it whenever it looks.
    let service = INSIDE.replace("range(3)", "iter(int, 1)");
    let script = format!(
        "python3 -c '{}' >/dev/null & exec {BIN} daemon --listen {addr} --comm 'python3*'",
        service.replace('\'', "'\\''")
    );
    let daemon = Killed(
        in_pid_namespace(&["sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux)"),
    );
    let end = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < end {
        if let Some(m) = metrics(addr) {
            if events_with(&m, "culprit=\"inside_handler\"") >= 1.0 {
                last = m;
                break;
            }
            last = m;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        outside.0.try_wait().ok().flatten().is_none(),
        "the host's subject was still blocking while the daemon watched"
    );
    drop(daemon);
    drop(outside);
    assert!(
        events_with(&last, "culprit=\"inside_handler\"") >= 1.0,
        "the service inside the namespace is counted with its culprit:\n{last}"
    );
    assert_eq!(
        events_with(&last, "culprit=\"outside_handler\""),
        0.0,
        "a process outside the namespace is not watched:\n{last}"
    );
}
