//! End to end: a loop's first blocking call is named. The kernel reports
//! the moment a thread becomes a loop thread and blockwatch inspects the
//! process for CPython at once (and at exec), not on a timer, so a
//! coroutine that blocks 20-30 ms after its loop first idles still carries
//! its Python frames: in `trace -- COMMAND`, in `trace --comm` for a
//! process started later, and in `daemon --auto`, on every interpreter.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Run, Watch, repo_root, subject, trace};

/// Runs of each case per interpreter: discovery races the program.
const RUNS: usize = 3;

/// A symlink to `python` named `name` (the process's comm), in `dir`.
fn alias(dir: &Path, python: &str, name: &str) -> PathBuf {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    std::os::unix::fs::symlink(python, &path).unwrap();
    path
}

/// The subject's one blocking call, named `early_block`.
fn assert_named(run: &Run, comm: Option<&str>, what: &str) {
    let sleeps = run.events_where(|e| e.class == "sleep" && comm.is_none_or(|c| e.comm == c));
    assert_eq!(sleeps.len(), 1, "{what}\n{}", run.report());
    let culprit = sleeps[0]
        .culprit
        .as_ref()
        .and_then(|c| c.function.as_deref());
    assert_eq!(
        culprit,
        Some("early_block"),
        "{what}: the first blocking call carries its Python frames\n{}",
        run.report()
    );
}

#[test]
fn first_blocking_call_is_named_under_trace_command() {
    let _serial = common::setup();
    let script = subject("python_early_block.py");
    for python in common::interpreters() {
        for delay in ["0.03", "0.02"] {
            for n in 0..RUNS {
                let run = trace(&["--", python, &script, delay]);
                run.assert_success();
                assert_named(&run, None, &format!("{python}, {delay} s, run {n}"));
            }
        }
    }
}

#[test]
fn first_blocking_call_is_named_under_trace_comm() {
    let _serial = common::setup();
    let script = subject("python_early_block.py");
    let dir = tempfile::tempdir().unwrap();
    for python in common::interpreters() {
        let exe = alias(dir.path(), python, "bwdiscovcomm");
        // Each run starts once trace says it is watching, so each is new
        // to it and found at its exec, however long the attach took.
        let watch = Watch::start(&["--comm", "bwdiscovcomm"]);
        for n in 0..RUNS {
            let ran = Command::new(&exe)
                .args([script.as_str(), "0.02"])
                .current_dir(repo_root())
                .status()
                .is_ok_and(|s| s.success());
            assert!(ran, "{python}: the subject ran (run {n})");
        }
        let run = watch.stop();
        run.assert_success();
        let sleeps = run.events_where(|e| e.class == "sleep" && e.comm == "bwdiscovcomm");
        assert_eq!(sleeps.len(), RUNS, "{python}\n{}", run.report());
        for e in sleeps {
            assert_eq!(
                e.culprit.as_ref().and_then(|c| c.function.as_deref()),
                Some("early_block"),
                "{python}: each run's first blocking call is named\n{}",
                run.report()
            );
        }
    }
}

/// `blockwatch daemon --auto`, serving metrics; killed when dropped.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn auto() -> Daemon {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_blockwatch"))
            .args(["daemon", "--auto", "--listen", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start blockwatch daemon");
        let d = Daemon {
            child,
            addr,
            stderr,
            _dir: dir,
        };
        let end = Instant::now() + Duration::from_secs(30);
        while !(http_get(addr, "/healthz").is_some_and(|r| r.0 == 200)
            && d.stderr().contains("blockwatch: watching"))
        {
            assert!(Instant::now() < end, "daemon not serving: {}", d.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        http_get(self.addr, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sum of the `blockwatch_blocking_events_total` series with these labels;
/// a value ending in `*` matches the labels that start with the rest.
fn events(metrics: &str, want: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l
                .strip_prefix("blockwatch_blocking_events_total")?
                .strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            want.iter()
                .all(|(k, v)| match v.strip_suffix('*') {
                    Some(prefix) => labels.contains(&format!("{k}=\"{prefix}")),
                    None => labels.contains(&format!("{k}=\"{v}\"")),
                })
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// Runs a Python subject (through its alias `exe`) to its end.
fn run_subject(exe: &Path, script: &str, arg: &str) {
    let ok = Command::new(exe)
        .args([script, arg])
        .current_dir(repo_root())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "{}: the subject ran", exe.display());
}

/// The daemon's metrics once they count `n` events with these labels, or
/// when `within` has passed.
fn metrics_once(d: &Daemon, want: &[(&str, &str)], n: f64, within: Duration) -> String {
    let end = Instant::now() + within;
    let mut m = d.metrics();
    while events(&m, want) < n && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        m = d.metrics();
    }
    m
}

#[test]
fn first_blocking_call_is_named_under_daemon_auto() {
    let _serial = common::setup();
    let script = subject("python_early_block.py");
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::auto();
    for (i, python) in common::interpreters().into_iter().enumerate() {
        let name = format!("bwdiscovauto{i}");
        let exe = alias(dir.path(), python, &name);
        for _ in 0..RUNS {
            run_subject(&exe, &script, "0.02");
        }
        let process = [("process", name.as_str()), ("class", "sleep")];
        let m = metrics_once(&d, &process, RUNS as f64, Duration::from_secs(15));
        let named = [
            ("process", name.as_str()),
            ("class", "sleep"),
            ("culprit", "early_block"),
        ];
        assert_eq!(
            (events(&m, &process), events(&m, &named)),
            (RUNS as f64, RUNS as f64),
            "{python}: every run's first blocking call counted under culprit early_block\n{m}\n{}",
            d.stderr()
        );
    }
}

/// Under `--auto` a process is sampled only once its loop is found (a
/// sampler event per found loop thread, not per CPU): a CPU-bound
/// coroutine is still named by its samples.
#[test]
fn a_cpu_bound_coroutine_is_named_under_daemon_auto() {
    let _serial = common::setup();
    let script = subject("asyncio_strict.py");
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::auto();
    let python = common::interpreters()[0];
    let exe = alias(dir.path(), python, "bwdautocpu");
    // Idle 2.5 s first: the daemon finds the interpreter within 2 s.
    run_subject(&exe, &script, "2.5");
    // The samples' most common stack ends in cpu_hog() or the generator
    // expression inside it. Other short stalls may come too on a loaded
    // machine (starting the executor's thread once took 24 ms in CI).
    let hog = [
        ("process", "bwdautocpu"),
        ("class", "stall"),
        ("culprit", "cpu_hog*"),
    ];
    let m = metrics_once(&d, &hog, 1.0, Duration::from_secs(10));
    assert_eq!(
        events(&m, &hog),
        1.0,
        "the 300 ms of cpu_hog(): one CPU-bound episode named by its samples\n{m}\n{}",
        d.stderr()
    );
}

/// A Node loop that never sleeps in its idle wait (setImmediate keeps
/// work always ready), running since before the daemon started: under
/// `--auto` every candidate thread is sampled (the sampler rides the timer
/// interrupts the thread takes anyway), so a sample finds the loop inside
/// its epoll wait, and its 200 ms CPU-bound callback is reported, named.
/// A per-thread sampler opened only for found loops never found it.
#[test]
fn a_loop_that_never_idles_is_found_under_daemon_auto() {
    let _serial = common::setup();
    let d = Daemon::auto();
    // Started after the daemon's first look, the hog 4 s later: the
    // loop is found by a sample or never.
    let subject = common::Background::spawn("node", &[&subject("node_never_idle.js"), "4"]);
    let hog = [("class", "stall"), ("culprit", "hog *")];
    let m = metrics_once(&d, &hog, 1.0, Duration::from_secs(15));
    assert_eq!(
        events(&m, &hog),
        1.0,
        "node pid {}: its 200 ms hog(), on a loop that never idled\n{m}\n{}",
        subject.pid(),
        d.stderr()
    );
}

/// A tokio worker is a known loop from its first park: with two workers
/// that parked once (300 ms idle) and then three tasks that each
/// `std::thread::sleep(70ms)`, every sleep is reported. A worker that runs
/// two of the tasks back to back without parking in between was
/// unavailable for both: one episode of ~140 ms with two sleeps.
#[test]
fn tokio_workers_that_parked_once_report_every_blocking_call() {
    let _serial = common::setup();
    let bin = common::tokio_blocker();
    for n in 0..RUNS {
        let run = trace(&["--", &bin, "cold-workers"]);
        run.assert_success();
        let sleeps = run.events_where(|e| {
            e.class == "sleep"
                && e.culprit.as_ref().and_then(|c| c.function.as_deref())
                    == Some("tokio_blocker::sleep_on_cold_worker")
        });
        let slept_ms: f64 = sleeps
            .iter()
            .map(|e| e.episode.as_ref().map_or(0, |p| p.sleeping_ns) as f64 / 1e6)
            .sum();
        assert!(
            (1..=3).contains(&sleeps.len()) && (205.0..1500.0).contains(&slept_ms),
            "run {n}: the three 70 ms sleeps, in one episode each or two in one\n{}",
            run.report()
        );
        assert!(
            sleeps.iter().all(|e| (65.0..1500.0).contains(&e.ms())
                && (65.0..500.0)
                    .contains(&(e.episode.as_ref().map_or(0, |p| p.longest_wait_ns) as f64 / 1e6))),
            "run {n}\n{}",
            run.report()
        );
    }
}

/// `cargo xtask demo`'s first event (the first `time.sleep(0.15)` of
/// examples/asyncio-demo.py) names its Python culprit, and each of its
/// bugs is an event of its own.
#[test]
fn the_demos_first_event_names_its_culprit() {
    let _serial = common::setup();
    let script = repo_root().join("examples/asyncio-demo.py");
    let script = script.to_str().expect("UTF-8 path");
    for n in 0..RUNS {
        let run = trace(&["--", common::PYTHON, script]);
        run.assert_success();
        let first = run.events.first();
        assert_eq!(
            first.and_then(|e| e.culprit.as_ref()?.function.as_deref()),
            Some("rate_limited_lookup"),
            "run {n}: the first event\n{}",
            run.report()
        );
        // Its requests come 200 ms apart, so each bug blocks an iteration
        // of its own and is named, not merged into another's episode.
        for bug in ["rate_limited_lookup", "make_thumbnail"] {
            let named = run.events_where(|e| {
                e.culprit.as_ref().and_then(|c| c.function.as_deref()) == Some(bug)
            });
            assert_eq!(
                named.len(),
                4,
                "run {n}: {bug} in each burst\n{}",
                run.report()
            );
        }
    }
}

/// The status and body of `GET path`.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    common::http_get(addr, path).map(|(status, _, body)| (status, body))
}
