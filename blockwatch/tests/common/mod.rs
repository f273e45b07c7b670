//! Helpers for the integration tests: they run the real `blockwatch` binary,
//! as root, against the real kernel, and read its `--output json` events.
//!
//! Every run has a deadline: a hang kills blockwatch and fails the test with
//! what it printed, instead of blocking CI.

#![allow(dead_code)] // each test binary uses its own subset

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Default deadline for one blockwatch run: the subjects take a few seconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Called first by every test: checks that we are root and makes the tests
/// of this binary run one at a time (they share the kernel, the CPUs and
/// measure durations), whatever `--test-threads` says.
pub fn setup() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "these tests load BPF programs and must run as root: \
             run `sudo -E cargo xtask test`"
        );
    }
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One stack frame of an event, as in the README's JSON schema.
#[derive(Debug, Clone, Deserialize)]
pub struct Frame {
    pub address: String,
    pub function: Option<String>,
    pub module: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
}

/// One event of `--output json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    pub ts: String,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub thread: String,
    pub syscall: Option<String>,
    pub syscall_nr: i64,
    pub class: String,
    pub duration_ns: u64,
    pub state: String,
    pub stack: Vec<Frame>,
    pub culprit: Option<Frame>,
    pub offender: Option<Frame>,
    /// `offcpu`, `strict` or `stall` (README, JSON schema).
    pub detector: String,
    /// Episodes (not strict calls): where the time went.
    #[serde(default)]
    pub episode: Option<Episode>,
}

/// An event's `episode` object (README, JSON schema).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Episode {
    pub cpu_ns: u64,
    pub sleeping_ns: u64,
    pub disk_ns: u64,
    pub preempted_ns: u64,
    pub waits: u32,
    pub longest_wait_ns: u64,
    pub samples: u32,
}

const EVENT_FIELDS: [&str; 14] = [
    "ts",
    "pid",
    "tid",
    "comm",
    "thread",
    "syscall",
    "syscall_nr",
    "class",
    "duration_ns",
    "state",
    "stack",
    "culprit",
    "offender",
    "advice",
];
const CLASSES: [&str; 9] = [
    "file", "stat", "sleep", "lock", "gil", "net", "process", "other", "stall",
];
const STATES: [&str; 4] = ["sleeping", "disk", "preempted", "running"];
const DETECTORS: [&str; 3] = ["offcpu", "strict", "stall"];

impl Event {
    pub fn ms(&self) -> f64 {
        self.duration_ns as f64 / 1e6
    }

    pub fn is_main_thread(&self) -> bool {
        self.tid == self.pid
    }

    /// `pid/tid thread syscall class 80.1ms state @ culprit`.
    /// The stack's function names, innermost first (`??` when unknown).
    pub fn functions(&self) -> Vec<&str> {
        self.stack
            .iter()
            .map(|f| f.function.as_deref().unwrap_or("??"))
            .collect()
    }

    /// The culprit's function name, or "" when there is none.
    pub fn culprit_function(&self) -> &str {
        self.culprit
            .as_ref()
            .and_then(|f| f.function.as_deref())
            .unwrap_or("")
    }

    pub fn summary(&self) -> String {
        let culprit = self
            .culprit
            .as_ref()
            .map(|f| f.function.clone().unwrap_or_else(|| f.address.clone()))
            .unwrap_or_else(|| "-".into());
        format!(
            "{}/{} {:?} ({}) {} {} {:.1}ms {} @ {}",
            self.pid,
            self.tid,
            self.thread,
            self.comm,
            self.syscall.as_deref().unwrap_or("-"),
            self.class,
            self.ms(),
            self.state,
            culprit
        )
    }

    /// Parse one stdout line, checking it against the documented schema.
    fn parse(line: &str) -> Result<Event, String> {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("not JSON ({e})"))?;
        let object = value.as_object().ok_or("not a JSON object")?;
        for field in EVENT_FIELDS {
            if !object.contains_key(field) {
                return Err(format!("field `{field}` is missing"));
            }
        }
        let event: Event =
            serde_json::from_value(value).map_err(|e| format!("does not fit the schema: {e}"))?;
        humantime::parse_rfc3339(&event.ts)
            .map_err(|e| format!("ts {:?} is not RFC 3339: {e}", event.ts))?;
        if !CLASSES.contains(&event.class.as_str()) {
            return Err(format!("unknown class {:?}", event.class));
        }
        if !STATES.contains(&event.state.as_str()) {
            return Err(format!("unknown state {:?}", event.state));
        }
        if !DETECTORS.contains(&event.detector.as_str()) {
            return Err(format!("unknown detector {:?}", event.detector));
        }
        // Every episode says where its time went, and that adds up to no
        // more than its wall time; a strict call is no episode.
        match (&event.episode, event.detector.as_str()) {
            (None, "strict") => {}
            (Some(e), "offcpu" | "stall") => {
                let parts = e.cpu_ns + e.sleeping_ns + e.disk_ns + e.preempted_ns;
                if parts > event.duration_ns + 1_000_000 || e.longest_wait_ns > event.duration_ns {
                    return Err(format!("episode {e:?} over {} ns", event.duration_ns));
                }
            }
            (e, d) => return Err(format!("detector {d} with episode {e:?}")),
        }
        for frame in event
            .stack
            .iter()
            .chain(&event.culprit)
            .chain(&event.offender)
        {
            let hex = frame.address.strip_prefix("0x");
            if hex.is_none_or(|h| u64::from_str_radix(h, 16).is_err()) {
                return Err(format!("frame address {:?} is not 0x-hex", frame.address));
            }
        }
        Ok(event)
    }
}

/// What one blockwatch run left behind.
pub struct Run {
    pub args: Vec<String>,
    /// Exit code; `None` when killed by a signal (e.g. by the deadline).
    pub code: Option<i32>,
    pub events: Vec<Event>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

impl Run {
    /// Every event with its whole stack (address, function, module), for
    /// assertion messages about stacks.
    pub fn stacks(&self) -> String {
        let mut s = String::new();
        for e in &self.events {
            s += &format!("{}\n", e.summary());
            for f in &e.stack {
                s += &format!(
                    "    {} {} ({})\n",
                    f.address,
                    f.function.as_deref().unwrap_or("??"),
                    f.module.as_deref().unwrap_or("?")
                );
            }
        }
        s
    }

    /// Everything about the run, for assertion messages.
    pub fn report(&self) -> String {
        let mut s = format!(
            "blockwatch {}\nexit code: {:?}{} after {:.2}s\n{} events:\n",
            self.args.join(" "),
            self.code,
            if self.timed_out {
                " (killed at the deadline)"
            } else {
                ""
            },
            self.elapsed.as_secs_f64(),
            self.events.len()
        );
        for e in &self.events {
            let _ = writeln!(s, "  {}", e.summary());
        }
        let _ = write!(s, "stderr:\n{}", self.stderr);
        s
    }

    pub fn events_where(&self, f: impl Fn(&Event) -> bool) -> Vec<&Event> {
        self.events.iter().filter(|e| f(e)).collect()
    }

    /// Asserts a clean run: not killed at the deadline, exit code 0.
    pub fn assert_success(&self) {
        assert!(!self.timed_out, "blockwatch hung\n{}", self.report());
        assert_eq!(self.code, Some(0), "blockwatch failed\n{}", self.report());
    }

    /// Asserts no event lasted `ms` milliseconds or more.
    pub fn assert_none_longer_than(&self, ms: f64, why: &str) {
        let long = self.events_where(|e| e.ms() >= ms);
        assert!(
            long.is_empty(),
            "events of {ms} ms or more ({why}):\n{}",
            self.report()
        );
    }
}

/// `blockwatch trace --output json <args>` with the default deadline.
pub fn trace(args: &[&str]) -> Run {
    trace_with_timeout(args, DEFAULT_TIMEOUT)
}

/// `blockwatch trace --output json <args>`; past `timeout`, blockwatch gets
/// SIGINT, then SIGKILL, and the run is marked `timed_out`.
pub fn trace_with_timeout(args: &[&str], timeout: Duration) -> Run {
    let mut full = vec!["trace", "--output", "json"];
    full.extend(args);
    blockwatch_with_timeout(&full, timeout)
}

/// Run the blockwatch binary with exactly these arguments.
pub fn blockwatch(args: &[&str]) -> Run {
    blockwatch_with_timeout(args, DEFAULT_TIMEOUT)
}

pub fn blockwatch_with_timeout(args: &[&str], timeout: Duration) -> Run {
    let bin = env!("CARGO_BIN_EXE_blockwatch");
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(&args)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let stdout = read_in_background(child.stdout.take().expect("piped"));
    let stderr = read_in_background(child.stderr.take().expect("piped"));

    let deadline = started + timeout;
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait().expect("wait for blockwatch") {
            break (status, false);
        }
        if Instant::now() >= deadline {
            break (stop(&mut child), true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    // A command started by blockwatch may outlive it and hold the pipes.
    let stdout = stdout
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| "<stdout still open 10 s after blockwatch exited>".into());
    let stderr = stderr
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| "<stderr still open 10 s after blockwatch exited>".into());

    let events = parse_events(&args, &stdout, &stderr);
    Run {
        args,
        code: status.code(),
        events,
        stdout,
        stderr,
        elapsed,
        timed_out,
    }
}

/// `blockwatch trace --output json <args>` running in the background while
/// the test drives what it watches; [`Watch::stop`] ends it as a user's
/// Ctrl-C does and returns the run. Killed if dropped while running.
pub struct Watch {
    child: Option<Child>,
    args: Vec<String>,
    started: Instant,
    stdout: mpsc::Receiver<String>,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Watch {
    /// Starts blockwatch and waits (at most 60 s) until it says it is
    /// watching.
    pub fn start(args: &[&str]) -> Watch {
        let mut full = vec!["trace", "--output", "json"];
        full.extend(args);
        let args: Vec<String> = full.iter().map(|a| a.to_string()).collect();
        let dir = tempfile::tempdir().expect("a temporary folder");
        let stderr = dir.path().join("stderr");
        let bin = env!("CARGO_BIN_EXE_blockwatch");
        let mut child = Command::new(bin)
            .args(&args)
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("a stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
        let stdout = read_in_background(child.stdout.take().expect("piped"));
        let mut watch = Watch {
            child: Some(child),
            args,
            started: Instant::now(),
            stdout,
            stderr,
            _dir: dir,
        };
        let end = watch.started + Duration::from_secs(60);
        while !watch.stderr().contains("blockwatch: watching") {
            let exited = watch
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() >= end {
                let run = watch.stop();
                panic!("blockwatch did not start watching\n{}", run.report());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        watch
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGINT, as Ctrl-C (SIGKILL 30 s later, and the run is marked
    /// `timed_out`), and what blockwatch printed.
    pub fn stop(mut self) -> Run {
        let mut child = self.child.take().expect("stopped once");
        signal(child.id(), libc::SIGINT);
        let grace = Instant::now() + Duration::from_secs(30);
        let (status, timed_out) = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break (status, false);
            }
            if Instant::now() >= grace {
                let _ = child.kill();
                break (child.wait().expect("wait for killed blockwatch"), true);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = self
            .stdout
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| "<stdout still open 10 s after blockwatch exited>".into());
        let stderr = self.stderr();
        let events = parse_events(&self.args, &stdout, &stderr);
        Run {
            args: std::mem::take(&mut self.args),
            code: status.code(),
            events,
            stdout,
            stderr,
            elapsed: self.started.elapsed(),
            timed_out,
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The events of a run's stdout when `args` asked for `--output json`
/// (stdout then holds events and nothing else); fails the test on a line
/// that is not one.
fn parse_events(args: &[String], stdout: &str, stderr: &str) -> Vec<Event> {
    let json = args
        .windows(2)
        .any(|w| w[0] == "--output" && w[1] == "json");
    let mut events = Vec::new();
    let lines = stdout
        .lines()
        .enumerate()
        .filter(|(_, l)| json && !l.trim().is_empty());
    for (i, line) in lines {
        match Event::parse(line) {
            Ok(e) => events.push(e),
            Err(why) => panic!(
                "stdout line {} of `blockwatch {}` is not an event: {why}\nline: {line}\nstderr:\n{stderr}",
                i + 1,
                args.join(" ")
            ),
        }
    }
    events
}

fn read_in_background(mut r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
    });
    rx
}

/// SIGINT (blockwatch detaches and prints its summary), then SIGKILL.
fn stop(child: &mut Child) -> std::process::ExitStatus {
    signal(child.id(), libc::SIGINT);
    let grace = Instant::now() + Duration::from_secs(5);
    while Instant::now() < grace {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().expect("wait for killed blockwatch")
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2) on a child we own.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("blockwatch/ has a parent")
        .to_path_buf()
}

/// The path of a file under `subjects/`.
pub fn subject(name: &str) -> String {
    let p = repo_root().join("subjects").join(name);
    assert!(p.exists(), "test subject {} is missing", p.display());
    p.to_str()
        .expect("the repository path is UTF-8")
        .to_string()
}

/// `target/<profile>/tokio-blocker`, next to the blockwatch binary.
pub fn tokio_blocker() -> String {
    subject_binary("tokio-blocker")
}

/// `target/<profile>/tokio-server`, next to the blockwatch binary.
pub fn tokio_server() -> String {
    subject_binary("tokio-server")
}

/// A subject built by the workspace (`subjects/NAME`), next to the
/// blockwatch binary.
fn subject_binary(name: &str) -> String {
    let dir = Path::new(env!("CARGO_BIN_EXE_blockwatch"))
        .parent()
        .expect("the binary has a folder");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo xtask test`, which builds it",
        p.display()
    );
    p.to_str().expect("the target path is UTF-8").to_string()
}

/// A process the test starts itself (not through blockwatch), killed when
/// dropped.
pub struct Background {
    child: Child,
}

impl Background {
    /// Start a Python subject and wait until it prints "ready".
    pub fn python(python: &str, script: &str, args: &[&str]) -> Background {
        let mut all = vec![script];
        all.extend(args);
        Background::spawn(python, &all)
    }

    /// Start `program args…` and wait until it prints "ready".
    pub fn spawn(program: &str, args: &[&str]) -> Background {
        let what = format!("{program} {}", args.join(" "));
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next().and_then(Result::ok);
            let _ = tx.send(first);
            drain(lines);
        });
        let mut process = Background { child };
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Some(line)) if line.trim() == "ready" => process,
            other => {
                process.kill();
                panic!("{what} did not print `ready`: {other:?}");
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn drain(lines: std::io::Lines<BufReader<ChildStdout>>) {
    for _ in lines {}
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The python3 on PATH (pyenv's, on the project's machines).
pub const PYTHON: &str = "python3";
/// Debian's own interpreter, built differently from pyenv's.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// A symlink to the real interpreter under a unique name, so the process
/// name (comm) is ours alone.
pub struct Alias {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn python_alias(name: &str) -> Alias {
    let dir = tempfile::tempdir().unwrap();
    let exe = Command::new(PYTHON)
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 on PATH");
    let python = String::from_utf8(exe.stdout).unwrap().trim().to_string();
    let path = dir.path().join(name);
    std::os::unix::fs::symlink(&python, &path).unwrap();
    Alias { _dir: dir, path }
}

/// A scratch cgroup in the unified (v2) hierarchy, removed when dropped;
/// `relative` may nest (`bwtest.slice/app.service`).
pub struct TestCgroup {
    pub root: PathBuf,
    pub dirs: Vec<PathBuf>,
}

impl TestCgroup {
    pub fn new(relative: &str) -> TestCgroup {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        // Fields: ... mount-point ... - fstype source options.
        let root = mountinfo
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let point = left.split_whitespace().nth(4)?;
                (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(point))
            })
            .expect("a cgroup2 (unified) hierarchy is mounted");
        let mut dirs = Vec::new();
        let mut dir = root.clone();
        for part in relative.split('/') {
            dir.push(part);
            if !dir.exists() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
                dirs.push(dir.clone());
            }
        }
        TestCgroup { root, dirs }
    }

    /// The innermost cgroup's `cgroup.procs`: writing a PID moves it there.
    pub fn procs(&self) -> PathBuf {
        self.dirs.last().expect("a new cgroup").join("cgroup.procs")
    }

    /// A shell line that moves itself here and execs `argv`.
    pub fn exec_in(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {} && exec \"$@\"",
                self.procs().display()
            ))
            .arg("sh")
            .args(argv);
        c
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            // Its processes have exited; the kernel frees the cgroup lazily.
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The CPython interpreters the tests run on, where present: Debian's and
/// the pyenv builds (3.10–3.13, oldest first).
pub const INTERPRETERS: &[&str] = &[
    "/usr/bin/python3",
    "/root/.pyenv/versions/3.10.13/bin/python3",
    "/root/.pyenv/versions/3.11.7/bin/python3",
    "/root/.pyenv/versions/3.12.1/bin/python3",
    "/root/.pyenv/versions/3.13.0/bin/python3",
];

/// Those of `candidates` this machine has; fails when it has none.
pub fn present(candidates: &[&'static str]) -> Vec<&'static str> {
    let found: Vec<_> = candidates
        .iter()
        .copied()
        .filter(|p| Path::new(p).exists())
        .collect();
    assert!(!found.is_empty(), "no CPython interpreter found");
    found
}

/// Every interpreter of [`INTERPRETERS`] this machine has.
pub fn interpreters() -> Vec<&'static str> {
    present(INTERPRETERS)
}

pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// `GET path` over HTTP/1.0 (the server closes after the reply): the
/// status, the head (lower-cased) and the body; None when there is no
/// server or no reply.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String, String)> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    if !text.starts_with("HTTP/1") {
        return None;
    }
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((status, head.to_lowercase(), body.to_string()))
}
