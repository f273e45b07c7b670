//! End-to-end tests of Node with no flags: JavaScript functions are named
//! from V8's own frames (the `v8dbg_*` layout in the node binary and the
//! frame pointers V8 keeps), with the default stack copy; execSync's wait
//! is a child-process wait. The real binary, as root, on the real kernel;
//! run with `sudo -E cargo xtask test`.

mod common;

use common::{Event, subject, trace};

/// subjects/node_no_flags.js under plain `node`: the execSync and the
/// readFileSync, each in a function called once (interpreted, never
/// compiled), are named by that function, and Node's own library code
/// under it is named too but is not the culprit.
#[test]
fn plain_node_names_the_js_functions_that_block() {
    let _serial = common::setup();
    let dir = tempfile::tempdir().expect("a temporary folder");
    let fifo = dir.path().join("settings.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo runs");
    assert!(made.success());
    let run = trace(&[
        "--",
        "node",
        &subject("node_no_flags.js"),
        fifo.to_str().expect("UTF-8 path"),
    ]);
    run.assert_success();

    let execs = run.events_where(|e| e.syscall.as_deref() == Some("epoll_pwait"));
    assert_eq!(execs.len(), 1, "the one execSync\n{}", run.report());
    let e = execs[0];
    assert_eq!(
        e.class,
        "process",
        "execSync waits for a child\n{}",
        e.summary()
    );
    assert!(
        e.culprit_function().starts_with("rarelyRunReport ")
            && e.culprit_function().ends_with("node_no_flags.js"),
        "execSync's caller is the culprit, with its script; got {:?}\n{}",
        e.culprit,
        run.stacks()
    );
    assert!(
        e.functions()
            .iter()
            .any(|f| f.starts_with("execSync node:child_process")),
        "Node's own execSync is named, under the culprit\n{}",
        run.stacks()
    );
    assert!(
        e.functions().iter().any(|f| f.starts_with("main ")),
        "the stack goes on to the async main() that called it\n{}",
        run.stacks()
    );

    let reads = run.events_where(|e| e.class == "file");
    assert_eq!(reads.len(), 1, "the one readFileSync\n{}", run.report());
    assert!(
        reads[0].culprit_function().starts_with("loadSettingsOnce "),
        "readFileSync's caller is the culprit; got {:?}\n{}",
        reads[0].culprit,
        run.stacks()
    );
    assert!(
        reads[0]
            .functions()
            .iter()
            .any(|f| f.starts_with("readFileSync node:fs")),
        "{}",
        run.stacks()
    );
}

/// subjects/node_blocker.js under plain `node`: both execSync waits are
/// class process and named by their JS caller, and Atomics.wait by its own.
#[test]
fn plain_node_exec_sync_is_a_process_wait_named_by_its_caller() {
    let _serial = common::setup();
    let run = trace(&["--", "node", &subject("node_blocker.js")]);
    run.assert_success();
    let execs = run.events_where(|e| e.syscall.as_deref() == Some("epoll_pwait"));
    assert_eq!(execs.len(), 2, "the two execSync\n{}", run.report());
    for e in &execs {
        assert_eq!(e.class, "process", "{}", e.summary());
        assert!(
            e.culprit_function().starts_with("blockingExecSync "),
            "got {:?}\n{}",
            e.culprit,
            run.stacks()
        );
    }
    let locks = run.events_where(|e| e.class == "lock");
    assert_eq!(locks.len(), 1, "{}", run.report());
    assert!(
        locks[0]
            .culprit_function()
            .starts_with("blockingAtomicsWait "),
        "{}",
        run.stacks()
    );
}

/// subjects/node_stall.js under plain `node`: a timer callback computing
/// for ~300 ms is one stall named by its JS function (read from the live
/// stack while the samples arrive).
#[test]
fn plain_node_cpu_bound_handler_is_a_stall_named_by_its_function() {
    let _serial = common::setup();
    let run = trace(&["--", "node", &subject("node_stall.js")]);
    run.assert_success();
    // On a loaded machine node's own start-up or a GC may cross the 10 ms
    // threshold too (an unnamed 10.1 ms stall failed this once in a full run): the
    // hog is the one long stall.
    let stalls = run.events_where(|e| e.class == "stall" && e.ms() >= 100.0);
    assert_eq!(stalls.len(), 1, "exactly the cpuHog(300)\n{}", run.report());
    let e = stalls[0];
    assert!(
        e.culprit_function().starts_with("cpuHog ")
            && e.culprit_function().ends_with("node_stall.js"),
        "the JS function is the culprit; got {:?}\n{}",
        e.culprit,
        run.stacks()
    );
    assert!(
        e.functions()
            .iter()
            .any(|f| f.starts_with("listOnTimeout node:internal/timers")),
        "Node's timers called it\n{}",
        run.stacks()
    );
}

/// Perf maps, Node's second source, read right when a JIT reuses code
/// space: an old line (a larger start, still covering the address) and
/// the newest line both cover a trampoline, and the newest names it, even
/// when the map grew after blockwatch first read it. Node's frames are
/// named from V8 before any perf map is asked, so this runs CPython 3.12's
/// `-X perf` trampolines, which only the map names
/// (subjects/perf_map_reuse.py writes the lines over its own trampoline).
#[test]
fn perf_map_code_space_reuse_names_the_newest_entry() {
    let _serial = common::setup();
    let python = "/root/.pyenv/versions/3.12.1/bin/python3";
    assert!(std::path::Path::new(python).exists(), "no {python}");
    let run = trace(&["--", python, "-X", "perf", &subject("perf_map_reuse.py")]);
    run.assert_success();
    let sleeps = run.events_where(|e| e.class == "sleep");
    assert_eq!(sleeps.len(), 2, "{}", run.report());
    let trampolines = |e: &Event| -> Vec<String> {
        e.functions()
            .into_iter()
            .filter(|f| f.starts_with("py::") && f.contains("perf_map_reuse.py"))
            .map(str::to_string)
            .collect()
    };
    for e in &sleeps {
        assert!(
            !e.functions().iter().any(|f| f.contains("duplex_stale")),
            "the older line never names the address\n{}",
            run.stacks()
        );
    }
    // The first may be named before or after the map grew (blockwatch may
    // read it late); the second is named after.
    assert!(
        trampolines(sleeps[1])
            .iter()
            .any(|f| f.starts_with("py::handle_login_recompiled:")),
        "the newest line names the trampoline\n{}",
        run.stacks()
    );
}
