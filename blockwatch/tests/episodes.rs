//! End-to-end tests of loop episodes (issue 9): what blockwatch reports is
//! one iteration of an event loop that kept every other task waiting, from
//! the moment its thread leaves the runtime's idle wait to the moment it
//! enters it again, whatever filled it — many short waits, one read that
//! sleeps on the disk many times, or CPU work. Healthy servers kept busy by
//! wrk, whose loops never sleep in their idle wait, are never reported;
//! one slow handler among them is, once, by its name.
//!
//! Real servers (aiohttp, Node's `http`, hyper on tokio) under real load
//! (`wrk`), watched by `trace --pid` as root; run with
//! `sudo -E cargo xtask test`, which builds `tokio-server` and installs
//! aiohttp in ~/.cache/blockwatch/bench-venv.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Background, Event, Run, Watch, subject, trace};

/// `--threshold` for the servers under wrk. Measured on this 2-CPU host
/// with bpftrace (per thread, from a return from epoll_wait, or from a
/// tokio worker's futex, to the next such call) over 15–40 s of
/// `wrk -t1 -c16` without blockwatch: the longest healthy iteration was
/// 2.2 ms for aiohttp, 4.5 ms for Node and 20 ms for tokio on a quiet host
/// (two busy workers and wrk are three threads on two CPUs: workers are
/// preempted for 10–20 ms about once a second), and 29, 41 and 92 ms while
/// other builds shared the CPUs (Node's GC pauses stayed under 6.1 ms:
/// that was preemption too). Preemption is time the loop really lost, which
/// an episode at the default 10 ms reports, so these tests use 50 ms: far
/// above a healthy iteration on a host the tests have to themselves, far
/// below the 150 ms slow handler. Under other load they can fail; rerun.
/// (tokio's 20 ms is from one park to the next, over many task polls; its
/// episodes end at each poll, by its `CONTEXT` clock.)
const SERVER_THRESHOLD: &str = "50ms";

/// The slow handlers compute for this long (wall time, without syscalls).
const SLOW_MS: f64 = 150.0;

/// The venv `cargo xtask test` (and `cargo xtask bench`) installs aiohttp
/// in: `bench::aiohttp_venv` in xtask/src/bench.rs.
fn aiohttp_python() -> String {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let python = PathBuf::from(home).join(".cache/blockwatch/bench-venv/bin/python");
    let has_aiohttp = Command::new(&python)
        .args(["-c", "import aiohttp"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        has_aiohttp,
        "{} with aiohttp is missing: run `sudo -E cargo xtask test`, which installs it",
        python.display()
    );
    python.to_str().expect("UTF-8 path").to_string()
}

fn wrk_output_rps(out: &str) -> Option<f64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}

/// What happened while blockwatch watched a server under load.
struct Loaded {
    run: Run,
    /// wrk's requests per second: the load was real.
    rps: f64,
    /// How long the one `/slow` request took.
    slow: Duration,
}

/// Watches `server` (listening on `addr`) with `trace --pid` for the
/// whole of `wrk -t1 -c16 -d5s` on `/`; 3 s in, still under load, sends one
/// `GET /slow`.
/// With `attach_busy`, trace attaches 1 s into the load, to a loop that
/// may never sleep in its idle wait again (found by the sampler instead).
fn watch_under_load(
    server: &Background,
    addr: SocketAddr,
    threshold: &str,
    attach_busy: bool,
) -> Loaded {
    let url = format!("http://{addr}/");
    // Warm the server up unwatched: first connections, lazy imports, JIT.
    let warm = Command::new("wrk")
        .args(["-t1", "-c16", "-d1s", &url])
        .output()
        .expect("wrk runs (/usr/bin/wrk: `cargo xtask setup` installs it)");
    assert!(warm.status.success(), "warm-up wrk failed: {warm:?}");

    let pid = server.pid().to_string();
    let start_watch = || Watch::start(&["--threshold", threshold, "--pid", &pid]);
    let early = (!attach_busy).then(start_watch);
    let wrk = Command::new("wrk")
        .args(["-t1", "-c16", "-d5s", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("wrk runs");
    let watch = match early {
        Some(w) => {
            std::thread::sleep(Duration::from_secs(3));
            w
        }
        None => {
            std::thread::sleep(Duration::from_secs(1));
            let w = start_watch();
            std::thread::sleep(Duration::from_secs(2));
            w
        }
    };
    let sent = Instant::now();
    let reply = common::http_get(addr, "/slow");
    let slow = sent.elapsed();
    let wrk = wrk.wait_with_output().expect("wrk ends");
    // The last episode's event on its way through the pipeline.
    std::thread::sleep(Duration::from_millis(500));
    let run = watch.stop();
    let out = String::from_utf8_lossy(&wrk.stdout);
    assert!(
        wrk.status.success(),
        "wrk failed: {out}{}",
        String::from_utf8_lossy(&wrk.stderr)
    );
    assert_eq!(
        reply.as_ref().map(|r| r.0),
        Some(200),
        "GET /slow under load: {reply:?}\n{}",
        run.report()
    );
    let rps = wrk_output_rps(&out).unwrap_or_else(|| panic!("no Requests/sec from wrk:\n{out}"));
    Loaded { run, rps, slow }
}

/// The assertions every server shares: the server was saturated, nothing
/// but the slow handler was reported, and it was reported once, by its name
/// (`is_handler` on the culprit's function).
fn check_one_report_of_the_slow_handler(
    server: &str,
    loaded: &Loaded,
    is_handler: impl Fn(&str) -> bool,
) {
    let run = &loaded.run;
    run.assert_success();
    assert!(
        loaded.rps >= 1000.0,
        "{server}: wrk kept it busy ({:.0} requests/s)",
        loaded.rps
    );
    assert!(
        loaded.slow.as_secs_f64() * 1e3 >= SLOW_MS,
        "{server}: /slow computed for {SLOW_MS} ms, answered in {:?}",
        loaded.slow
    );
    let others: Vec<&Event> = run.events_where(|e| !is_handler(e.culprit_function()));
    assert!(
        others.is_empty(),
        "{server} under wrk -c16 never blocks its loop outside /slow: a healthy saturated \
         loop is never reported\n{}",
        run.report()
    );
    assert_eq!(
        run.events.len(),
        1,
        "{server}: the one GET /slow is exactly one report\n{}",
        run.report()
    );
    let e = &run.events[0];
    // The episode lasts as long as the handler computed; where its ends
    // are known only to a sample's precision, a little less.
    assert!(
        e.ms() >= SLOW_MS - 50.0,
        "{server}: the episode is the handler's {SLOW_MS} ms: {}\n{}",
        e.summary(),
        run.stacks()
    );
}

/// aiohttp on asyncio's default loop: zero reports under load, then
/// exactly one, named `slow_handler`, for the one request to `/slow`.
#[test]
fn aiohttp_under_load_reports_only_the_slow_handler() {
    let _serial = common::setup();
    let python = aiohttp_python();
    let addr = common::free_addr();
    let server = Background::spawn(
        &python,
        &[&subject("aiohttp_server.py"), &addr.port().to_string()],
    );
    let loaded = watch_under_load(&server, addr, SERVER_THRESHOLD, false);
    check_one_report_of_the_slow_handler("aiohttp", &loaded, |f| f == "slow_handler");
    assert!(loaded.run.events[0].is_main_thread());
}

/// The same aiohttp server, attached to while wrk already saturates it:
/// its loop may never sleep in its idle wait while blockwatch watches, so
/// the sampler finds it in its epoll wait, and its clock (looked for again
/// if its frames were caught changing) ends its episodes: again zero
/// reports, then exactly one for `/slow`.
#[test]
fn aiohttp_attached_while_saturated_reports_only_the_slow_handler() {
    let _serial = common::setup();
    let python = aiohttp_python();
    let addr = common::free_addr();
    let server = Background::spawn(
        &python,
        &[&subject("aiohttp_server.py"), &addr.port().to_string()],
    );
    let loaded = watch_under_load(&server, addr, SERVER_THRESHOLD, true);
    check_one_report_of_the_slow_handler("aiohttp (attached busy)", &loaded, |f| {
        f == "slow_handler"
    });
}

/// The same Node server, attached to while wrk already saturates it: its
/// loop is found when it next sleeps, but rarely sleeps, and until its
/// clock is handed over its episodes run from sleep to sleep, over many
/// iterations (seen reported as stalls of 10 to 118 ms). Those are not
/// reported: again zero reports, then exactly one for `/slow`. (At the
/// tests' 50 ms, only the longest of those spans would fail it; at 25 ms
/// it failed 1 run in 4 without the rule, but a healthy saturated
/// iteration here already reaches 17 ms.)
#[test]
fn node_http_attached_while_saturated_reports_only_the_slow_handler() {
    let _serial = common::setup();
    let addr = common::free_addr();
    let server = Background::spawn(
        "node",
        &[&subject("node_http_server.js"), &addr.port().to_string()],
    );
    let loaded = watch_under_load(&server, addr, SERVER_THRESHOLD, true);
    check_one_report_of_the_slow_handler("node (attached busy)", &loaded, |f| {
        f.starts_with("slowHandler ")
    });
}

/// Node's `http` (plain `node`): zero reports under load, then exactly
/// one, named by the JS function `slowHandler`.
#[test]
fn node_http_under_load_reports_only_the_slow_handler() {
    let _serial = common::setup();
    let addr = common::free_addr();
    let server = Background::spawn(
        "node",
        &[&subject("node_http_server.js"), &addr.port().to_string()],
    );
    let loaded = watch_under_load(&server, addr, SERVER_THRESHOLD, false);
    check_one_report_of_the_slow_handler("node", &loaded, |f| f.starts_with("slowHandler "));
    assert!(loaded.run.events[0].is_main_thread());
}

/// hyper on tokio's multi-thread runtime (two workers): zero reports under
/// load, then exactly one, of the worker that polled `slow_handler`.
#[test]
fn tokio_hyper_under_load_reports_only_the_slow_handler() {
    let _serial = common::setup();
    let addr = common::free_addr();
    let server = Background::spawn(&common::tokio_server(), &[&addr.port().to_string()]);
    let loaded = watch_under_load(&server, addr, SERVER_THRESHOLD, false);
    check_one_report_of_the_slow_handler("tokio", &loaded, |f| {
        f.starts_with("tokio_server::slow_handler")
    });
    let e = &loaded.run.events[0];
    assert!(
        !e.is_main_thread() && e.thread.starts_with("tokio-r"),
        "on a worker: {}",
        e.summary()
    );
}

/// subjects/asyncio_episodes.py sleeps: 20 × time.sleep(0.006) in one
/// coroutine, no wait reaching the 10 ms threshold alone, are one episode
/// of ~120 ms, named by the coroutine, with its largest wait's syscall and
/// class.
#[test]
fn twenty_short_sleeps_are_one_episode_named_by_the_coroutine() {
    let _serial = common::setup();
    for python in common::interpreters() {
        let run = trace(&["--", python, &subject("asyncio_episodes.py"), "sleeps"]);
        run.assert_success();
        assert_eq!(
            run.events.len(),
            1,
            "{python}: the 20 sleeps are one loop iteration\n{}",
            run.report()
        );
        let e = &run.events[0];
        assert!(
            (110.0..250.0).contains(&e.ms()),
            "{python}: 20 × 6 ms is ~120 ms: {}\n{}",
            e.summary(),
            run.report()
        );
        assert_eq!(
            e.culprit_function(),
            "many_short_sleeps",
            "{python}\n{}",
            run.stacks()
        );
        // time.sleep is clock_nanosleep since CPython 3.11, pselect6 before.
        assert!(
            e.class == "sleep"
                && matches!(e.syscall.as_deref(), Some("clock_nanosleep" | "pselect6")),
            "{python}: the episode keeps its largest wait, a sleep: {}",
            e.summary()
        );
        assert!(e.is_main_thread(), "{python}: {}", e.summary());
    }
}

/// subjects/asyncio_episodes.py signal: a signal handler computes for
/// 150 ms while the loop sits in its select, before asyncio has set its
/// iteration clock (`end_time`, NULL in the new `_run_once` frame until
/// then). Reads that find it unset must not each end the episode (a change
/// that made them do so, for loops spinning on a ready fd, hid this stall).
#[test]
fn cpu_work_before_the_iteration_clock_is_set_is_one_stall() {
    let _serial = common::setup();
    for python in common::interpreters() {
        let run = trace(&["--", python, &subject("asyncio_episodes.py"), "signal"]);
        run.assert_success();
        assert_eq!(
            run.events.len(),
            1,
            "{python}: one handler computes for 150 ms\n{}",
            run.report()
        );
        let e = &run.events[0];
        assert_eq!(
            e.culprit_function(),
            "busy_signal_handler",
            "{python}\n{}",
            run.stacks()
        );
        assert!(
            (140.0..250.0).contains(&e.ms()),
            "{python}: 150 ms of CPU: {}",
            e.summary()
        );
    }
}

/// The milliseconds `prefix … in X ms` the subject printed to stderr.
fn printed_ms(stderr: &str, prefix: &str) -> f64 {
    stderr
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(" in ").next()?.strip_suffix(" ms")?.parse().ok())
        .unwrap_or_else(|| panic!("no `{prefix} … in X ms` line:\n{stderr}"))
}

/// subjects/asyncio_episodes.py cold-read: one os.read() of a 64 MiB file
/// dropped from the page cache sleeps on the disk many times, a few ms or
/// less each; the whole read is one episode named by the reading function.
#[test]
fn a_cold_read_of_many_short_disk_waits_is_one_episode() {
    let _serial = common::setup();
    for python in common::interpreters() {
        let run = trace(&["--", python, &subject("asyncio_episodes.py"), "cold-read"]);
        run.assert_success();
        assert_eq!(
            run.events.len(),
            1,
            "{python}: the read is one loop iteration\n{}",
            run.report()
        );
        let e = &run.events[0];
        assert_eq!(
            e.culprit_function(),
            "read_cold_file",
            "{python}\n{}",
            run.stacks()
        );
        // The episode holds the whole read, as long as the subject
        // measured it (10% less where its ends are known only to a
        // sample's precision), not one of its disk waits.
        let read_ms = printed_ms(&run.stderr, "cold-read:");
        assert!(
            e.ms() >= read_ms * 0.9,
            "{python}: the read took {read_ms:.1} ms: {}\n{}",
            e.summary(),
            run.report()
        );
        assert!(e.is_main_thread(), "{python}: {}", e.summary());
    }
}
