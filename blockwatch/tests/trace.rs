//! End-to-end tests of `blockwatch trace`: the real binary, as root, on the
//! real kernel, watching the subjects in `subjects/`. Run them with
//! `sudo -E cargo xtask test`, which builds the subjects first; they run
//! one at a time.
//!
//! The subjects are built so that what must be reported and what must not
//! differ by duration: the waits that are not blocking (before the loop
//! runs, idle loops, timers, executor threads) last 300 ms or more, the
//! blocking calls 80-150 ms.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use common::{
    Background, Event, PYTHON, SYSTEM_PYTHON, blockwatch_with_timeout, subject, tokio_blocker,
    trace, trace_with_timeout,
};

fn in_range(e: &Event, min_ms: f64, max_ms: f64) -> bool {
    (min_ms..=max_ms).contains(&e.ms())
}

// --- asyncio ---------------------------------------------------------------

/// subjects/asyncio_blocker.py: three time.sleep(0.08) on the loop thread
/// are reported; the 0.31 s sleep before the loop runs, the 0.4 s idle and
/// the executor's 0.33 s sleep are not.
fn check_asyncio_blocker(python: &str) {
    let run = trace(&["--", python, &subject("asyncio_blocker.py")]);
    run.assert_success();

    let sleeps = run.events_where(|e| e.class == "sleep");
    assert_eq!(
        sleeps.len(),
        3,
        "expected the 3 time.sleep(0.08) calls on the loop as class sleep\n{}",
        run.report()
    );
    for e in sleeps {
        assert!(
            e.syscall.as_deref() == Some("clock_nanosleep")
                && e.is_main_thread()
                && in_range(e, 70.0, 200.0),
            "each time.sleep(0.08) is a ~80 ms clock_nanosleep on the main thread; got {}\n{}",
            e.summary(),
            run.report()
        );
    }
    run.assert_none_longer_than(
        250.0,
        "the sleep before asyncio.run, the idle loop and the executor's sleep are not blocking",
    );
}

#[test]
fn asyncio_sleeps_on_the_loop_are_reported() {
    let _serial = common::setup();
    check_asyncio_blocker(PYTHON);
}

#[test]
fn asyncio_sleeps_on_the_loop_are_reported_debian_python() {
    let _serial = common::setup();
    if !Path::new(SYSTEM_PYTHON).exists() {
        eprintln!("SKIPPED: {SYSTEM_PYTHON} does not exist on this machine");
        return;
    }
    check_asyncio_blocker(SYSTEM_PYTHON);
}

// --- tokio -----------------------------------------------------------------

fn on_tokio_worker(e: &Event) -> bool {
    !e.is_main_thread()
        && (e.thread.starts_with("tokio-runtime-w") || e.thread.starts_with("tokio-rt-worker"))
}

/// subjects/tokio-blocker: std::thread::sleep(80ms) three times and a
/// 64 MiB write + fsync inside tasks are reported; the idle runtime, a
/// tokio timer and spawn_blocking's 340 ms sleep are not.
#[test]
fn tokio_blocking_calls_in_tasks_are_reported() {
    let _serial = common::setup();
    let run = trace(&["--", &tokio_blocker()]);
    run.assert_success();

    let sleeps = run.events_where(|e| e.class == "sleep");
    assert_eq!(
        sleeps.len(),
        3,
        "expected the 3 std::thread::sleep(80ms) calls in a task as class sleep\n{}",
        run.report()
    );
    for e in sleeps {
        assert!(
            e.syscall.as_deref() == Some("clock_nanosleep")
                && on_tokio_worker(e)
                && in_range(e, 70.0, 200.0),
            "each std::thread::sleep(80ms) is a ~80 ms clock_nanosleep on a worker; got {}\n{}",
            e.summary(),
            run.report()
        );
    }
    assert!(
        run.events
            .iter()
            .any(|e| e.class == "file" && on_tokio_worker(e)),
        "the std::fs write + sync_all of 64 MiB in a task must show as class file on a worker\n{}",
        run.report()
    );
    // The fsync may take long; everything else that long comes from the
    // idle runtime, the timer or the blocking pool, none of which blocks.
    let long = run.events_where(|e| e.ms() >= 300.0 && e.class != "file");
    assert!(
        long.is_empty(),
        "waits of 300 ms or more other than file I/O: idle, timers and spawn_blocking are not blocking\n{}",
        run.report()
    );
}

// --- Node ------------------------------------------------------------------

/// subjects/node_blocker.js: two execSync('sleep 0.12') and one 90 ms
/// Atomics.wait on the loop are reported; 0.4 s idle and a 0.35 s timer
/// are not, and neither are the `sh`/`sleep` children execSync starts.
#[test]
fn node_sync_calls_on_the_loop_are_reported() {
    let _serial = common::setup();
    let run = trace(&["--", "node", &subject("node_blocker.js")]);
    run.assert_success();

    let pids: HashSet<u32> = run.events.iter().map(|e| e.pid).collect();
    assert!(
        pids.len() <= 1 && run.events.iter().all(Event::is_main_thread),
        "only node's main thread runs its loop (execSync's children are no event loops)\n{}",
        run.report()
    );
    let exec_sync = run.events_where(|e| {
        in_range(e, 100.0, 300.0) && ["net", "process", "other"].contains(&e.class.as_str())
    });
    assert!(
        exec_sync.len() >= 2,
        "expected the 2 execSync('sleep 0.12') calls (100-300 ms, class net/process/other)\n{}",
        run.report()
    );
    let locks = run.events_where(|e| e.class == "lock");
    assert!(
        locks.len() == 1 && in_range(locks[0], 80.0, 150.0),
        "expected one ~90 ms lock event for Atomics.wait\n{}",
        run.report()
    );
    run.assert_none_longer_than(330.0, "the idle loop and the 350 ms timer are not blocking");
}

// --- what is watched -------------------------------------------------------

/// A process that blocks its loop all the time but is not named is never
/// reported, while blockwatch watches another (idle) loop by --pid.
#[test]
fn unwatched_processes_are_not_reported() {
    let _serial = common::setup();
    let ticker = subject("asyncio_ticker.py");
    let unwatched = Background::python(PYTHON, &ticker, &["--block", "0.05"]);
    let watched = Background::python(PYTHON, &ticker, &[]);
    let run = trace(&["--pid", &watched.pid().to_string(), "--duration", "3s"]);
    run.assert_success();

    assert!(
        run.events_where(|e| e.pid == unwatched.pid()).is_empty(),
        "pid {} blocks its loop every 50 ms but is not watched\n{}",
        unwatched.pid(),
        run.report()
    );
    assert!(
        run.events.is_empty(),
        "the watched loop (pid {}) only idles\n{}",
        watched.pid(),
        run.report()
    );
}

/// 500 short-lived threads started by the loop thread never become loop
/// threads; the one time.sleep(0.08) on the loop is still reported. The
/// threshold is 1 ms so that the churn threads' 1 ms sleeps would show if
/// they were tagged.
#[test]
fn thread_churn_does_not_leak_tags() {
    let _serial = common::setup();
    let run = trace(&[
        "--threshold",
        "1ms",
        "--",
        PYTHON,
        &subject("thread_churn.py"),
    ]);
    run.assert_success();

    assert!(
        run.events.iter().all(Event::is_main_thread),
        "events from threads other than the loop thread\n{}",
        run.report()
    );
    let sleeps = run.events_where(|e| e.class == "sleep");
    assert!(
        sleeps.len() == 1 && in_range(sleeps[0], 70.0, 200.0),
        "expected exactly the one time.sleep(0.08) on the loop\n{}",
        run.report()
    );
}

// --- the command line ------------------------------------------------------

const QUICK: Duration = Duration::from_secs(20);

#[test]
fn nonexistent_pid_is_one_clear_error() {
    let _serial = common::setup();
    let run = blockwatch_with_timeout(&["trace", "--pid", "999999999", "--duration", "1s"], QUICK);
    assert!(
        !run.timed_out && run.code.is_some_and(|c| c != 0),
        "{}",
        run.report()
    );
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        lines.len() == 1 && lines[0].contains("999999999"),
        "expected one stderr line naming pid 999999999\n{}",
        run.report()
    );
}

#[test]
fn threshold_without_unit_is_rejected() {
    let pid = std::process::id().to_string();
    let _serial = common::setup();
    let run = blockwatch_with_timeout(
        &[
            "trace",
            "--threshold",
            "80",
            "--pid",
            &pid,
            "--duration",
            "1s",
        ],
        QUICK,
    );
    assert!(
        !run.timed_out && run.code.is_some_and(|c| c != 0),
        "{}",
        run.report()
    );
    assert!(
        run.stderr.contains("unit") || run.stderr.contains("80ms"),
        "the error must say that a duration needs a unit (e.g. 80ms)\n{}",
        run.report()
    );
}

#[test]
fn missing_command_is_named() {
    let _serial = common::setup();
    let run = blockwatch_with_timeout(&["trace", "--", "/nonexistent/cmd"], QUICK);
    assert!(
        !run.timed_out && run.code.is_some_and(|c| c != 0),
        "{}",
        run.report()
    );
    assert!(
        run.stderr.contains("/nonexistent/cmd"),
        "the error must name the command\n{}",
        run.report()
    );
}

#[test]
fn exit_code_is_the_commands() {
    let _serial = common::setup();
    let run = trace(&["--", PYTHON, "-c", "import sys; sys.exit(3)"]);
    assert!(!run.timed_out, "{}", run.report());
    assert_eq!(
        run.code,
        Some(3),
        "blockwatch exits with the command's code\n{}",
        run.report()
    );
}

#[test]
fn duration_ends_the_session() {
    let _serial = common::setup();
    let idle = Background::python(PYTHON, &subject("asyncio_ticker.py"), &[]);
    let run = trace_with_timeout(
        &["--duration", "1s", "--pid", &idle.pid().to_string()],
        Duration::from_secs(15),
    );
    run.assert_success();
    let secs = run.elapsed.as_secs_f64();
    assert!(
        (0.9..3.5).contains(&secs),
        "--duration 1s must end the session after about a second, took {secs:.2}s\n{}",
        run.report()
    );
}
