//! Episodes that were mostly CPU work (`"detector": "stall"`): a callback or
//! task that computes keeps its loop from its idle wait as surely as a
//! sleep. The real binary, as root, on the real kernel, against
//! `subjects/asyncio_strict.py`, `subjects/node_stall.js` and
//! tokio-blocker's `cpu-hog`.

mod common;

use common::{Event, PYTHON, Run, subject, trace};

const SUBJECT: &str = "asyncio_strict.py";

fn stalls(run: &Run) -> Vec<&Event> {
    run.events_where(|e| e.detector == "stall")
}

/// The summary's main table (stderr in JSON mode), as whitespace-separated
/// cells: TOTAL COUNT MAX SYSCALL CLASS CULPRIT.
fn summary_rows(run: &Run) -> Vec<Vec<&str>> {
    let mut lines = run
        .stderr
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("TOTAL"));
    lines.next();
    lines
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect()
}

/// cpu_hog(0.3) in a coroutine keeps the loop on the CPU for ~300 ms: one
/// episode that was mostly CPU work (a `stall`), named after the Python
/// function, with samples; the idle loop, `await asyncio.sleep` and the
/// executor are not.
#[test]
fn a_cpu_bound_coroutine_is_a_stall() {
    let _serial = common::setup();
    let run = trace(&["--", PYTHON, &subject(SUBJECT)]);
    run.assert_success();
    let s = stalls(&run);
    assert_eq!(s.len(), 1, "exactly the cpu_hog(0.3)\n{}", run.report());
    let e = s[0];
    assert_eq!(
        (
            e.class.as_str(),
            e.state.as_str(),
            e.syscall.as_deref(),
            e.syscall_nr
        ),
        ("stall", "running", None, -1),
        "{}",
        e.summary()
    );
    assert!(e.is_main_thread(), "{}", e.summary());
    let ep = e.episode.as_ref().expect("an episode's breakdown");
    let cpu_ms = ep.cpu_ns as f64 / 1e6;
    // The episode's wall time: the hog's 300 ms of CPU (plus the loop's
    // own work around it), more when preempted; most of it on the CPU.
    assert!(
        (250.0..=3000.0).contains(&e.ms()) && (150.0..=e.ms() + 1.0).contains(&cpu_ms),
        "wall {:.1} ms, on-CPU {cpu_ms:.1} ms\n{}",
        e.ms(),
        run.report()
    );
    assert!(ep.samples >= 1, "{}", run.report());
    assert!(
        e.culprit_function().starts_with("cpu_hog"),
        "the stall's culprit is the Python function, got {:?}: {:#?}",
        e.culprit_function(),
        e.stack
    );
    let rows = summary_rows(&run);
    assert!(
        rows.iter().any(|r| r.get(1) == Some(&"1")
            && r.get(4) == Some(&"stall")
            && r.last().is_some_and(|c| c.starts_with("cpu_hog"))),
        "{}",
        run.stderr
    );
    // No event of any kind lasts as long as the idle waits (1 s, 0.3 s,
    // 0.4 s): idle is never blocking.
    run.assert_none_longer_than(1_500.0, "idle waits and asyncio.sleep are not blocking");
}

/// A Node timer callback computing for ~300 ms: one CPU episode on the main
/// thread, named after the JS function (from the perf map).
#[test]
fn a_cpu_bound_node_callback_is_a_stall() {
    let _serial = common::setup();
    let script = subject("node_stall.js");
    // --perf-basic-prof also writes V8's log, by default to the working
    // directory (the repository).
    let logs = tempfile::tempdir().unwrap();
    let logfile = format!("--logfile={}/v8.log", logs.path().display());
    let run = trace(&[
        "--",
        "node",
        "--perf-basic-prof",
        &logfile,
        "--no-logfile-per-isolate",
        &script,
    ]);
    run.assert_success();
    // On a loaded machine Node's own work (a GC's munmap of 14.8 ms, in a
    // full run) may cross the 10 ms threshold too: the hog is the one
    // long episode.
    let s: Vec<_> = stalls(&run)
        .into_iter()
        .filter(|e| e.ms() >= 100.0)
        .collect();
    assert_eq!(s.len(), 1, "exactly the cpuHog(300)\n{}", run.report());
    let e = s[0];
    assert!(e.is_main_thread() && e.class == "stall", "{}", e.summary());
    assert!(
        (250.0..=3000.0).contains(&e.ms()),
        "wall {:.1} ms\n{}",
        e.ms(),
        run.report()
    );
    assert!(
        e.functions().iter().any(|n| n.contains("cpuHog")),
        "the JS function is in the stack: {:#?}",
        e.stack
    );
}

/// A tokio task computing for 300 ms of CPU: one CPU episode of the worker that
/// ran it, named after the function (a leaf: its own frame is sampled even
/// without frame pointers).
#[test]
fn a_cpu_bound_tokio_task_is_a_stall() {
    let _serial = common::setup();
    let run = trace(&["--", &common::tokio_blocker(), "cpu-hog"]);
    run.assert_success();
    let s = stalls(&run);
    assert_eq!(s.len(), 1, "exactly the cpu_hog\n{}", run.report());
    let e = s[0];
    assert!(
        !e.is_main_thread()
            && (e.thread.starts_with("tokio-runtime-w") || e.thread.starts_with("tokio-rt-worker")),
        "on a worker: {}",
        e.summary()
    );
    // 300 ms of CPU in the task: the episode lasts at least that.
    assert!(
        (250.0..=3000.0).contains(&e.ms()),
        "wall {:.1} ms\n{}",
        e.ms(),
        run.report()
    );
    assert_eq!(
        e.culprit_function(),
        "tokio_blocker::cpu_hog",
        "{:#?}\n{}",
        e.stack,
        run.report()
    );
}

/// One threshold for everything: above the hog's 300 ms, nothing is
/// reported, CPU work included.
#[test]
fn a_threshold_above_the_hog_reports_nothing() {
    let _serial = common::setup();
    let run = trace(&["--threshold", "2s", "--", PYTHON, &subject(SUBJECT)]);
    run.assert_success();
    assert!(run.events.is_empty(), "{}", run.report());
    assert!(
        run.stderr.contains("0 loop episodes over 2.00s"),
        "{}",
        run.stderr
    );
}

/// The stall threshold is gone, and an old command line says why.
#[test]
fn the_stall_threshold_flag_says_what_replaced_it() {
    let run = common::blockwatch(&["trace", "--stall-threshold", "100ms", "-p", "1"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("episodes") && run.stderr.contains("threshold"),
        "{}",
        run.stderr
    );
}
