//! Reliability under hostile conditions: the real binary, as root, against
//! the real kernel and real processes, with things going wrong on purpose —
//! thousands of threads, recycled PIDs, processes killed mid-wait, a
//! blockwatch too stopped to drain its ring buffer, a daemon killed with
//! SIGKILL, tracefs and bpffs missing, missing privileges. Every test fails
//! loudly; none skips.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use blockwatch_common::{ThreadTag, WatchRule};
use serde_json::Value;

use common::{Alias, free_addr, python_alias};

const BIN: &str = env!("CARGO_BIN_EXE_blockwatch");

/// Polls `f` every 50 ms until it returns `Some`, or panics after `limit`.
fn until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn threads_of(pid: u32) -> BTreeSet<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A blockwatch process whose output goes to files, so that it can be
/// read while blockwatch runs, stopped (SIGSTOP) or killed.
struct Blockwatch {
    child: Child,
    args: Vec<String>,
    stdout: PathBuf,
    stderr: PathBuf,
    status: Option<ExitStatus>,
    _dir: tempfile::TempDir,
}

impl Blockwatch {
    fn start(args: &[&str]) -> Blockwatch {
        Blockwatch::start_with(BIN, &[], args)
    }

    /// `prefix… blockwatch args…` (prefix: e.g. setpriv with its options).
    fn start_with(program: &str, prefix: &[&str], args: &[&str]) -> Blockwatch {
        let dir = tempfile::tempdir().unwrap();
        let stdout = dir.path().join("stdout");
        let stderr = dir.path().join("stderr");
        let mut cmd = Command::new(program);
        cmd.args(prefix);
        if program != BIN {
            cmd.arg(BIN);
        }
        let child = cmd
            .args(args)
            .current_dir(common::repo_root())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start blockwatch: {e}"));
        Blockwatch {
            child,
            args: args.iter().map(|s| s.to_string()).collect(),
            stdout,
            stderr,
            status: None,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn report(&self) -> String {
        format!(
            "blockwatch {}\nexit: {:?}\nstderr:\n{}\nstdout (first 3000 bytes):\n{}",
            self.args.join(" "),
            self.status,
            self.stderr(),
            self.stdout().chars().take(3000).collect::<String>()
        )
    }

    /// Waits until stderr contains `what` (blockwatch has attached, …).
    fn wait_for_stderr(&mut self, what: &str) {
        let end = Instant::now() + Duration::from_secs(60);
        while !self.stderr().contains(what) {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.status = Some(status);
                panic!(
                    "blockwatch exited before printing {what:?}\n{}",
                    self.report()
                );
            }
            assert!(
                Instant::now() < end,
                "blockwatch did not print {what:?} within 60 s\n{}",
                self.report()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the exit (at most `limit`), killing it past that.
    fn wait(&mut self, limit: Duration) -> ExitStatus {
        if let Some(s) = self.status {
            return s;
        }
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.status = Some(s);
                return s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let s = self.child.wait().unwrap();
                self.status = Some(s);
                panic!(
                    "blockwatch did not exit within {limit:?}\n{}",
                    self.report()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT (the user's Ctrl-C) and the exit status.
    fn interrupt(&mut self) -> ExitStatus {
        kill(self.pid(), libc::SIGINT);
        self.wait(Duration::from_secs(30))
    }

    /// The JSON events on stdout (`--output json`).
    fn events(&self) -> Vec<Value> {
        self.stdout()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("stdout line is not JSON ({e}): {l}\n{}", self.report())
                })
            })
            .collect()
    }

    /// IDs of the BPF programs, maps and links this process holds, from its
    /// file descriptors' fdinfo.
    fn bpf_objects(&self) -> BpfObjects {
        let mut objs = BpfObjects::default();
        let dir = format!("/proc/{}/fdinfo", self.pid());
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u32>().ok())
            };
            if let Some(id) = field("link_id:") {
                objs.links.insert(id);
            } else if let Some(id) = field("prog_id:") {
                objs.progs.insert(id);
            } else if let Some(id) = field("map_id:") {
                objs.maps.insert(id);
            }
        }
        objs
    }

    /// One of its maps by name (as the kernel keeps it: 15 characters).
    fn map(&self, name: &str) -> MapData {
        for id in self.bpf_objects().maps {
            let Ok(info) = aya::maps::MapInfo::from_id(id) else {
                continue;
            };
            if info.name_as_str() == Some(name) {
                return MapData::from_id(id).expect("open the map by id");
            }
        }
        panic!("blockwatch holds no map named {name}\n{}", self.report());
    }
}

impl Drop for Blockwatch {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[derive(Debug, Default)]
struct BpfObjects {
    progs: BTreeSet<u32>,
    maps: BTreeSet<u32>,
    links: BTreeSet<u32>,
}

impl BpfObjects {
    /// Those of these objects the kernel still has.
    fn still_loaded(&self) -> BpfObjects {
        let progs: HashSet<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .collect();
        let maps: HashSet<u32> = aya::maps::loaded_maps()
            .filter_map(Result::ok)
            .map(|m| m.id())
            .collect();
        let links: HashSet<u32> = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .map(|l| l.id())
            .collect();
        BpfObjects {
            progs: self.progs.intersection_with(&progs),
            maps: self.maps.intersection_with(&maps),
            links: self.links.intersection_with(&links),
        }
    }

    fn is_empty(&self) -> bool {
        self.progs.is_empty() && self.maps.is_empty() && self.links.is_empty()
    }
}

trait Intersect {
    fn intersection_with(&self, other: &HashSet<u32>) -> BTreeSet<u32>;
}

impl Intersect for BTreeSet<u32> {
    fn intersection_with(&self, other: &HashSet<u32>) -> BTreeSet<u32> {
        self.iter()
            .copied()
            .filter(|id| other.contains(id))
            .collect()
    }
}

fn threads_map(bw: &Blockwatch) -> BpfHashMap<MapData, u32, ThreadTag> {
    BpfHashMap::try_from(Map::HashMap(bw.map("THREADS"))).expect("THREADS is a hash map")
}

fn watched_map(bw: &Blockwatch) -> BpfHashMap<MapData, u32, WatchRule> {
    BpfHashMap::try_from(Map::HashMap(bw.map("WATCHED"))).expect("WATCHED is a hash map")
}

/// The tagged threads of process `pid`, read from blockwatch's own map.
fn tagged_threads_of(bw: &Blockwatch, pid: u32) -> BTreeSet<u32> {
    threads_map(bw)
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, tag)| tag.tgid == pid)
        .map(|(tid, _)| tid)
        .collect()
}

fn u64_of(e: &Value, key: &str) -> u64 {
    e[key]
        .as_u64()
        .unwrap_or_else(|| panic!("event without integer {key}: {e}"))
}

fn str_of<'a>(e: &'a Value, key: &str) -> &'a str {
    e[key].as_str().unwrap_or("")
}

/// A Python program run under a unique process name; stdin is a pipe so
/// that the test decides when it ends, stdout a pipe it reports on.
struct Subject {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    _alias: Option<Alias>,
}

impl Subject {
    fn start(name: &str, code: &str) -> Subject {
        let alias = python_alias(name);
        let mut s = Subject::spawn(&alias.path, code);
        s._alias = Some(alias);
        s
    }

    fn spawn(path: &Path, code: &str) -> Subject {
        let mut child = Command::new(path)
            .args(["-c", code])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", path.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Subject {
            child,
            lines: rx,
            _alias: None,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line it prints (within `limit`).
    fn line(&self, limit: Duration) -> String {
        self.lines
            .recv_timeout(limit)
            .unwrap_or_else(|e| panic!("subject {} printed nothing: {e}", self.pid()))
    }

    fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin is piped");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    /// Closes its stdin and waits for the exit.
    fn finish(&mut self) -> ExitStatus {
        drop(self.child.stdin.take());
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!("subject {} did not exit", self.pid());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Thread churn
// ---------------------------------------------------------------------------

/// An asyncio process whose loop starts 4000 threads in batches of 100;
/// each waits 10 ms and exits. It prints its PID when started and `done`
/// when every thread has been joined, then waits for its stdin to close.
/// (The wait is a select() timeout, which is relative: time.sleep sleeps
/// until an absolute deadline, which may already have passed when a thread
/// that waited for a CPU or the GIL enters the syscall.)
const CHURN: &str = r#"
import asyncio, os, select, sys, threading
THREADS, BATCH = 4000, 100
print(os.getpid(), flush=True)
sys.stdin.readline()
def short():
    select.select([], [], [], 0.01)
async def main():
    await asyncio.sleep(0.1)
    for _ in range(THREADS // BATCH):
        batch = [threading.Thread(target=short) for _ in range(BATCH)]
        for t in batch:
            t.start()
        for t in batch:
            t.join()
        await asyncio.sleep(0)
asyncio.run(main())
print("done", flush=True)
sys.stdin.readline()
"#;

/// Thousands of threads created and exiting in a watched process (every
/// thread reported, `--threads all`): each one's sleep is reported or
/// counted as lost, no exited thread keeps its tag in the kernel, and once
/// the process is gone nothing of it remains watched.
/// (tests/trace.rs covers tag inheritance on the loop with 500 threads;
/// this is the scale and the kernel's own view.)
#[test]
fn thousands_of_exiting_threads_leave_no_stale_tags() {
    let _serial = common::setup();
    let mut bw = Blockwatch::start(&[
        "trace",
        "--output",
        "json",
        "--comm",
        "bwchurn",
        "--threads",
        "all",
        "--threshold",
        "1ms",
    ]);
    bw.wait_for_stderr("watching");
    let mut subject = Subject::start("bwchurn", CHURN);
    let pid: u32 = subject
        .line(Duration::from_secs(20))
        .trim()
        .parse()
        .unwrap();
    until_watched(&bw, pid);
    subject.say("go");
    let done = subject.line(Duration::from_secs(120));
    assert_eq!(done, "done");
    // Only the main thread is left; the tags of 4000 exited threads must
    // be gone (asyncio's own helper threads, if any, are alive).
    let alive = threads_of(pid);
    let tagged = tagged_threads_of(&bw, pid);
    let stale: Vec<_> = tagged.difference(&alive).collect();
    assert!(
        stale.is_empty(),
        "{} exited threads of pid {pid} are still tagged: {stale:?} (alive: {alive:?})",
        stale.len()
    );
    assert!(
        tagged.contains(&pid),
        "the main thread is tagged: {tagged:?}"
    );
    assert!(subject.finish().success());
    until(
        Duration::from_secs(10),
        "the exited process is forgotten",
        || {
            (tagged_threads_of(&bw, pid).is_empty() && watched_map(&bw).get(&pid, 0).is_err())
                .then_some(())
        },
    );
    let status = bw.interrupt();
    assert!(status.success(), "{}", bw.report());

    let events = bw.events();
    assert!(
        events.iter().all(|e| u64_of(e, "pid") == pid as u64),
        "only the subject is reported\n{}",
        bw.report()
    );
    let stderr = bw.stderr();
    let lost = lost_events(&stderr);
    // Counted as events: thread IDs are recycled within the process. Each
    // thread is off the CPU for 10 ms inside its select: asleep, or, on a
    // loaded machine, partly preempted inside the syscall (another, correct
    // event of the same call; if a preemption outlasts the timer, the thread
    // never sleeps at all). So at least one event per thread, and at most
    // one sleep.
    let selects = |state: Option<&str>| {
        events
            .iter()
            .filter(|e| {
                u64_of(e, "tid") != pid as u64
                    && ["select", "pselect6"].contains(&str_of(e, "syscall"))
                    && state.is_none_or(|s| str_of(e, "state") == s)
            })
            .count() as u64
    };
    let (waits, sleeps) = (selects(None), selects(Some("sleeping")));
    // At most one in a thousand may go missing: on a loaded 2-CPU machine a
    // single wait of 4000 has been seen unreported, with nothing counted as
    // lost (twice in 30-odd runs; the cause is not yet found). More than
    // that is a real loss of tags or events.
    assert!(
        waits + lost >= 4000 - 4 && sleeps <= 4000,
        "each of the 4000 threads' 10 ms waits is reported or counted lost, and no sleep twice: \
         {waits} events ({sleeps} asleep), {lost} events lost\n{}",
        bw.report()
    );
    assert!(
        !stderr.contains("thread tags were lost"),
        "the thread map never fills with 100 threads at a time\n{}",
        bw.report()
    );
}

/// `N` from blockwatch's `warning: N events were lost` line, or 0.
fn lost_events(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| {
            let rest = l.split("warning: ").nth(1)?;
            let (n, tail) = rest.split_once(' ')?;
            tail.starts_with("events were lost")
                .then(|| n.parse().ok())?
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// PID and TID reuse
// ---------------------------------------------------------------------------

/// Starts `alias` running `code` with process ID `pid`, by setting the
/// kernel's last-PID counter just below it (retried: other processes on the
/// host may take the PID first, and keep it for a while).
fn start_with_pid(name: &str, code: &str, pid: u32) -> Subject {
    // Made first: finding the interpreter runs a process, which takes a PID.
    let alias = python_alias(name);
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        // Another process on the host may have won a race for the PID:
        // wait until it is free again.
        if alive(pid) {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1))
            .expect("write /proc/sys/kernel/ns_last_pid (root)");
        let mut s = Subject::spawn(&alias.path, code);
        if s.pid() == pid {
            s._alias = Some(alias);
            return s;
        }
        got.push(s.pid());
        drop(s);
    }
    panic!(
        "could not start a process with the recycled PID {pid} (alive: {}); got {got:?}",
        alive(pid)
    );
}

fn until_watched(bw: &Blockwatch, pid: u32) {
    until(Duration::from_secs(10), "the process is watched", || {
        watched_map(bw).get(&pid, 0).ok()
    });
}

/// Blocks its main thread three times for 30 ms, after reading a line.
const SLEEPER: &str = r#"
import os, sys, time
print(os.getpid(), flush=True)
sys.stdin.readline()
for _ in range(3):
    time.sleep(0.03)
print("done", flush=True)
sys.stdin.readline()
"#;

/// Prints its PID and the TID of a thread that has exited, then blocks
/// three times for 30 ms.
const WITH_THREAD: &str = r#"
import os, sys, threading, time
tid = []
t = threading.Thread(target=lambda: tid.append(threading.get_native_id()))
t.start(); t.join()
print(os.getpid(), tid[0], flush=True)
sys.stdin.readline()
for _ in range(3):
    time.sleep(0.03)
print("done", flush=True)
sys.stdin.readline()
"#;

fn run_to_done(s: &mut Subject) {
    s.say("go");
    assert_eq!(s.line(Duration::from_secs(20)), "done");
    assert!(s.finish().success());
}

/// A process that exits leaves nothing behind for the next user of its PID
/// or of its threads' IDs: a process started on a recycled PID or TID is not
/// watched unless it matches a rule itself.
#[test]
fn recycled_pids_and_tids_are_not_watched_unless_they_match() {
    let _serial = common::setup();
    let mut bw = Blockwatch::start(&[
        "trace",
        "--output",
        "json",
        "--comm",
        "bwreuse_a",
        "--comm",
        "bwreuse_m",
        "--threads",
        "all",
        "--threshold",
        "10ms",
    ]);
    bw.wait_for_stderr("watching");
    // A: watched by name; its PID and one thread's TID are then recycled.
    let mut a = Subject::start("bwreuse_a", WITH_THREAD);
    let ids: Vec<u32> = a
        .line(Duration::from_secs(20))
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    let (pid_a, tid_a) = (ids[0], ids[1]);
    until_watched(&bw, pid_a);
    run_to_done(&mut a);
    until(Duration::from_secs(10), "A is forgotten", || {
        (!alive(pid_a) && watched_map(&bw).get(&pid_a, 0).is_err()).then_some(())
    });
    // B on A's PID and C on A's thread's TID, neither matching: not watched.
    let mut b = start_with_pid("bwreuse_b", SLEEPER, pid_a);
    b.line(Duration::from_secs(20));
    assert!(
        watched_map(&bw).get(&pid_a, 0).is_err() && tagged_threads_of(&bw, pid_a).is_empty(),
        "a process on a recycled PID is not watched"
    );
    run_to_done(&mut b);
    let mut c = start_with_pid("bwreuse_c", SLEEPER, tid_a);
    c.line(Duration::from_secs(20));
    assert!(
        threads_map(&bw).get(&tid_a, 0).is_err(),
        "a process on a recycled TID is not tagged"
    );
    run_to_done(&mut c);
    // M on A's PID again, matching a rule: watched like any new process.
    let mut m = start_with_pid("bwreuse_m", SLEEPER, pid_a);
    m.line(Duration::from_secs(20));
    until_watched(&bw, pid_a);
    run_to_done(&mut m);
    std::thread::sleep(Duration::from_millis(300));
    let status = bw.interrupt();
    assert!(status.success(), "{}", bw.report());

    let events = bw.events();
    let sleeps_of = |comm: &str| {
        events
            .iter()
            .filter(|e| str_of(e, "comm") == comm && str_of(e, "syscall") == "clock_nanosleep")
            .count()
    };
    // At least: a loaded machine may split a sleep with a preemption.
    assert!(sleeps_of("bwreuse_a") >= 3, "A's sleeps\n{}", bw.report());
    assert!(
        sleeps_of("bwreuse_m") >= 3,
        "M matches by name\n{}",
        bw.report()
    );
    let strays: Vec<_> = events
        .iter()
        .filter(|e| !["bwreuse_a", "bwreuse_m"].contains(&str_of(e, "comm")))
        .collect();
    assert!(
        strays.is_empty(),
        "processes on recycled IDs were reported: {strays:?}\n{}",
        bw.report()
    );
}

// ---------------------------------------------------------------------------
// Processes exiting mid-event
// ---------------------------------------------------------------------------

/// Blocks in a 40 ms sleep and exits at once: the event reaches user space
/// after the process is gone. (The 300 ms sleep first gives blockwatch time
/// to watch it: processes are matched by name after their exec.)
const SLEEP_AND_EXIT: &str = "import os, time\ntime.sleep(0.3)\ntime.sleep(0.04)\nos._exit(0)\n";

/// A watched thread killed in the middle of a long wait, and processes that
/// exit right after blocking (their events are symbolized after they are
/// gone): blockwatch reports what it can, never a wait longer than the
/// thread lived, and goes on.
#[test]
fn processes_exiting_mid_event_are_reported_sanely() {
    let _serial = common::setup();
    let mut bw = Blockwatch::start(&[
        "trace",
        "--output",
        "json",
        "--comm",
        "bwexit*",
        "--threads",
        "all",
        "--threshold",
        "20ms",
    ]);
    bw.wait_for_stderr("watching");
    let mut long = Subject::start(
        "bwexit_killed",
        "import os, sys, time\nprint(os.getpid(), flush=True)\ntime.sleep(30)\n",
    );
    let long_pid = long.pid();
    long.line(Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let killed_at = Instant::now();
    long.child.kill().unwrap();
    long.child.wait().unwrap();
    let lived = killed_at.elapsed() + Duration::from_millis(500);

    let alias = python_alias("bwexit_quick");
    for _ in 0..20 {
        let status = Command::new(&alias.path)
            .args(["-c", SLEEP_AND_EXIT])
            .status()
            .unwrap();
        assert!(status.success());
    }
    std::thread::sleep(Duration::from_millis(300));
    let status = bw.interrupt();
    assert!(status.success(), "{}", bw.report());

    let events = bw.events();
    for e in events
        .iter()
        .filter(|e| u64_of(e, "pid") == long_pid as u64)
    {
        let ms = u64_of(e, "duration_ns") / 1_000_000;
        assert!(
            ms as u128 <= lived.as_millis() + 1_000,
            "a killed thread's wait is at most its life: {e}"
        );
    }
    let quick: HashSet<u64> = events
        .iter()
        .filter(|e| {
            str_of(e, "comm") == "bwexit_quick"
                && str_of(e, "syscall") == "clock_nanosleep"
                && u64_of(e, "duration_ns") < 250_000_000
        })
        .map(|e| u64_of(e, "pid"))
        .collect();
    // Each event in a line, so that a missing one shows whose it was and
    // what its process's other events were.
    let listed: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {:?} {}ms culprit {}",
                u64_of(e, "pid"),
                str_of(e, "comm"),
                u64_of(e, "tid"),
                e.get("syscall").and_then(|s| s.as_str()),
                u64_of(e, "duration_ns") / 1_000_000,
                e.pointer("/culprit/function")
                    .and_then(|f| f.as_str())
                    .unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        quick.len(),
        20,
        "each short-lived process's 40 ms sleep, reported after it exited\n{}\n{}",
        listed.join("\n"),
        bw.report()
    );
}

// ---------------------------------------------------------------------------
// Ring buffer overflow
// ---------------------------------------------------------------------------

/// 16 threads blocking for 2 ms in a loop (about 8000 waits a second over a
/// 1 ms threshold) until stdin closes.
const FLOOD: &str = r#"
import os, sys, threading, time
stop = False
def work():
    while not stop:
        time.sleep(0.002)
ts = [threading.Thread(target=work) for _ in range(16)]
for t in ts:
    t.start()
print(os.getpid(), flush=True)
sys.stdin.readline()
stop = True
for t in ts:
    t.join()
"#;

/// blockwatch stopped (SIGSTOP) while a subject floods it fills its ring
/// buffer: the kernel counts what it drops, blockwatch reports the count
/// when it ends, and after SIGCONT it keeps reporting new events.
#[test]
fn ring_buffer_overflow_is_counted_and_reported() {
    let _serial = common::setup();
    let mut bw = Blockwatch::start(&[
        "trace",
        "--output",
        "json",
        "--comm",
        "bwflood",
        "--threads",
        "all",
        "--threshold",
        "1ms",
    ]);
    bw.wait_for_stderr("watching");
    let mut subject = Subject::start("bwflood", FLOOD);
    subject.line(Duration::from_secs(20));
    until(Duration::from_secs(20), "events flow", || {
        (bw.stdout().lines().count() > 100).then_some(())
    });
    kill(bw.pid(), libc::SIGSTOP);
    // 8 s: a slower host's GIL lets the 16 threads wait only ~5,700 times
    // a second, and 4 s of those (records without stacks, their sites
    // known) once fitted in the 16 MiB ring.
    std::thread::sleep(Duration::from_secs(8));
    kill(bw.pid(), libc::SIGCONT);
    let resumed = SystemTime::now();
    std::thread::sleep(Duration::from_millis(1500));
    subject.finish();
    let status = bw.interrupt();
    assert!(status.success(), "{}", bw.report());

    let stderr = bw.stderr();
    let lost = lost_events(&stderr);
    assert!(
        lost > 0,
        "an 8 s stop under 5,000–8,000 events/s overflows the ring buffer and is reported\n{}",
        bw.report()
    );
    let after: Vec<_> = bw
        .events()
        .into_iter()
        .filter(|e| humantime::parse_rfc3339(str_of(e, "ts")).is_ok_and(|ts| ts > resumed))
        .collect();
    assert!(
        !after.is_empty(),
        "events are reported again after SIGCONT\n{}",
        bw.report()
    );
}

// ---------------------------------------------------------------------------
// Daemon killed and restarted
// ---------------------------------------------------------------------------

/// The summed `blockwatch_blocking_events_total` of process `name`.
fn daemon_events(addr: SocketAddr, name: &str) -> f64 {
    let body = http_get(addr, "/metrics").unwrap_or_default();
    let label = format!("process=\"{name}\"");
    body.lines()
        .filter(|l| l.starts_with("blockwatch_blocking_events_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn pinned_files() -> BTreeSet<PathBuf> {
    fn walk(dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            }
            out.insert(p);
        }
    }
    let mut out = BTreeSet::new();
    walk(Path::new("/sys/fs/bpf"), &mut out);
    out
}

/// `blockwatch daemon` killed with SIGKILL (an OOM kill, a crash) leaves
/// no BPF program, map or link behind and pins nothing; started again on
/// the same port it works as before.
#[test]
fn daemon_killed_with_sigkill_leaks_nothing_and_restarts() {
    let _serial = common::setup();
    let addr = free_addr();
    let listen = addr.to_string();
    let args = [
        "daemon",
        "--listen",
        &listen,
        "--comm",
        "bwrestart",
        "--threads",
        "all",
        "--threshold",
        "10ms",
    ];
    let pins_before = pinned_files();
    let mut first = Blockwatch::start(&args);
    first.wait_for_stderr("watching");
    let objects = first.bpf_objects();
    assert!(
        objects.progs.len() >= 4 && objects.maps.len() >= 4,
        "the daemon holds its programs and maps: {objects:?}"
    );
    assert!(
        objects.still_loaded().progs == objects.progs,
        "fdinfo and the kernel agree: {objects:?}"
    );
    kill(first.pid(), libc::SIGKILL);
    let status = first.wait(Duration::from_secs(10));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let leaked = until(
        Duration::from_secs(20),
        "the kernel frees the objects",
        || {
            let left = objects.still_loaded();
            left.is_empty().then_some(left)
        },
    );
    assert!(leaked.is_empty());
    assert_eq!(pinned_files(), pins_before, "nothing pinned in /sys/fs/bpf");

    // Restarted on the same address, it watches and counts again.
    let mut second = Blockwatch::start(&args);
    second.wait_for_stderr("watching");
    let alias = python_alias("bwrestart");
    let status = Command::new(&alias.path)
        .args(["-c", "import time\nfor _ in range(3): time.sleep(0.03)\n"])
        .status()
        .unwrap();
    assert!(status.success());
    until(
        Duration::from_secs(20),
        "the restarted daemon counts",
        || (daemon_events(addr, "bwrestart") >= 3.0).then_some(()),
    );
    let objects = second.bpf_objects();
    kill(second.pid(), libc::SIGTERM);
    let status = second.wait(Duration::from_secs(20));
    assert!(status.success(), "{}", second.report());
    until(
        Duration::from_secs(20),
        "a stopped daemon frees all",
        || objects.still_loaded().is_empty().then_some(()),
    );
}

// ---------------------------------------------------------------------------
// tracefs and bpffs missing
// ---------------------------------------------------------------------------

/// A shell line that unmounts every tracefs and bpffs mount at blockwatch's
/// paths (in the private mount namespace `unshare -m` gives it).
const UNMOUNT: &str = "for p in /sys/kernel/tracing /sys/fs/bpf; do \
    while grep -q \" $p \" /proc/self/mounts; do umount -l $p || exit 99; done; done";

fn mounted_in(mounts: &str, point: &str, fstype: &str) -> bool {
    mounts.lines().any(|l| {
        let mut f = l.split_whitespace().skip(1);
        f.next() == Some(point) && f.next() == Some(fstype)
    })
}

/// Without tracefs and bpffs (a minimal container, an early boot, a unit
/// without CAP_SYS_ADMIN), blockwatch works as it is: nothing it attaches
/// needs them. It mounts neither, even with CAP_SYS_ADMIN, and without
/// that capability it still reports. The host's mounts are not touched.
#[test]
fn runs_without_tracefs_bpffs_or_cap_sys_admin() {
    let _serial = common::setup();
    let host_mounts = || std::fs::read_to_string("/proc/self/mounts").unwrap();
    let host_had = (
        mounted_in(&host_mounts(), "/sys/kernel/tracing", "tracefs"),
        mounted_in(&host_mounts(), "/sys/fs/bpf", "bpf"),
    );
    let script =
        format!("{UNMOUNT}; \"$@\"; rc=$?; echo '--- mounts'; cat /proc/self/mounts; exit $rc");
    let trace = [
        BIN,
        "trace",
        "--output",
        "json",
        "--threads",
        "all",
        "--threshold",
        "20ms",
        "--",
        "python3",
        "-c",
        "import time; time.sleep(0.3); time.sleep(0.05)",
    ];
    let no_sys_admin = [
        "setpriv",
        "--inh-caps=-sys_admin",
        "--bounding-set=-sys_admin",
    ];
    for drop_sys_admin in [false, true] {
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c", &script, "sh"]);
        if drop_sys_admin {
            cmd.args(no_sys_admin);
        }
        let out = cmd.args(trace).output().expect("unshare (util-linux)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let (events, mounts) = stdout
            .split_once("--- mounts")
            .unwrap_or_else(|| panic!("no mount list: {stdout}\n{stderr}"));
        assert!(
            out.status.success(),
            "works without tracefs/bpffs (CAP_SYS_ADMIN dropped: {drop_sys_admin}): {:?}\n{stderr}",
            out.status
        );
        assert!(
            events.lines().any(|l| l.contains("clock_nanosleep")),
            "the 50 ms sleep is reported (CAP_SYS_ADMIN dropped: {drop_sys_admin}):\n{events}\n{stderr}"
        );
        assert!(
            !mounted_in(mounts, "/sys/kernel/tracing", "tracefs")
                && !mounted_in(mounts, "/sys/fs/bpf", "bpf"),
            "blockwatch mounted nothing:\n{mounts}"
        );
    }
    assert_eq!(
        (
            mounted_in(&host_mounts(), "/sys/kernel/tracing", "tracefs"),
            mounted_in(&host_mounts(), "/sys/fs/bpf", "bpf"),
        ),
        host_had,
        "the host's mounts are untouched"
    );
}

// ---------------------------------------------------------------------------
// Privileges
// ---------------------------------------------------------------------------

/// Without root, and as root without one of the capabilities loading needs,
/// trace and daemon fail at once with one line naming the capability.
/// (tests/targets.rs checks the unprivileged trace; this adds the daemon and
/// root with a capability dropped.)
#[test]
fn missing_privileges_name_the_capability() {
    let _serial = common::setup();
    let nobody = [
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ];
    let addr = free_addr().to_string();
    let cases: Vec<(Vec<&str>, Vec<&str>, &str)> = vec![
        (
            nobody.to_vec(),
            vec!["daemon", "--listen", &addr, "--comm", "x"],
            "CAP_BPF",
        ),
        (
            vec!["--inh-caps=-bpf", "--bounding-set=-bpf"],
            vec!["trace", "--", "true"],
            "CAP_BPF",
        ),
        (
            vec!["--inh-caps=-perfmon", "--bounding-set=-perfmon"],
            vec!["daemon", "--listen", &addr, "--comm", "x"],
            "CAP_PERFMON",
        ),
    ];
    for (prefix, args, needed) in cases {
        let mut bw = Blockwatch::start_with("setpriv", &prefix, &args);
        let status = bw.wait(Duration::from_secs(30));
        let stderr = bw.stderr();
        assert_eq!(status.code(), Some(1), "{}", bw.report());
        assert_eq!(stderr.lines().count(), 1, "one line\n{}", bw.report());
        assert!(stderr.contains(needed), "names {needed}\n{}", bw.report());
        assert!(
            !stderr.contains("verifier") && !stderr.contains("refused"),
            "fails before loading\n{}",
            bw.report()
        );
    }
}

/// The body of `GET path`.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    common::http_get(addr, path).map(|(_, _, body)| body)
}
