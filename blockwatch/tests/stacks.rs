//! End-to-end tests of native stacks: code built without frame pointers is
//! unwound with its DWARF tables from the user stack the kernel copied,
//! JIT frames are named from perf maps, and a process that exits right
//! after blocking is still symbolized. The real binary, as root, on the
//! real kernel; run with `sudo -E cargo xtask test`.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::{Event, Run, repo_root, subject, trace};

/// subjects/tokio-blocker built with `-C force-frame-pointers=no` (whatever
/// the workspace's flags say), in its own target folder; built once per
/// test binary.
fn tokio_blocker_without_frame_pointers() -> String {
    static BUILT: OnceLock<String> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = repo_root();
            let target = root.join("target").join("no-frame-pointers");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let out = Command::new(&cargo)
                .args(["build", "--release", "--quiet", "-p", "tokio-blocker"])
                .arg("--target-dir")
                .arg(&target)
                .env("RUSTFLAGS", "-C force-frame-pointers=no")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .current_dir(&root)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
            assert!(
                out.status.success(),
                "building tokio-blocker without frame pointers failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let bin: PathBuf = target.join("release").join("tokio-blocker");
            assert!(bin.is_file(), "{} was not built", bin.display());
            bin.to_str().expect("UTF-8 path").to_string()
        })
        .clone()
}

/// The stack goes all the way to where the thread started.
fn reaches_thread_root(e: &Event) -> bool {
    e.functions()
        .iter()
        .any(|f| matches!(*f, "start_thread" | "clone3" | "__clone3" | "_start"))
}

fn sleeps(run: &Run) -> Vec<&Event> {
    run.events_where(|e| e.class == "sleep" && e.syscall.as_deref() == Some("clock_nanosleep"))
}

/// An async fn of a tokio program built without frame pointers calls
/// std::thread::sleep: the stack is unwound through libc, std and tokio to
/// the worker thread's start, and the async fn is the culprit.
fn check_async_fn_is_the_culprit(extra: &[&str]) {
    let bin = tokio_blocker_without_frame_pointers();
    let mut args = extra.to_vec();
    args.extend(["--", &bin, "async-sleep"]);
    let run = trace(&args);
    run.assert_success();
    let sleeps = sleeps(&run);
    assert_eq!(
        sleeps.len(),
        1,
        "expected the one std::thread::sleep(90ms) in async_fn_that_sleeps\n{}\n{}",
        run.report(),
        run.stacks()
    );
    let e = sleeps[0];
    assert!(
        e.ms() >= 85.0,
        "the sleep lasts 90 ms: {}\n{}",
        e.summary(),
        run.report()
    );
    assert!(
        e.culprit_function()
            .starts_with("tokio_blocker::async_fn_that_sleeps"),
        "the async fn must be the culprit, demangled; got {:?}\n{}",
        e.culprit,
        run.stacks()
    );
    assert!(
        reaches_thread_root(e),
        "the DWARF-unwound stack reaches the worker thread's start\n{}",
        run.stacks()
    );
    assert!(
        e.functions().iter().any(|f| f.starts_with("tokio::")),
        "the stack goes through tokio's scheduler\n{}",
        run.stacks()
    );
}

#[test]
fn async_fn_without_frame_pointers_is_the_culprit() {
    let _serial = common::setup();
    check_async_fn_is_the_culprit(&[]);
}

#[test]
fn async_fn_without_frame_pointers_is_the_culprit_raw_tracepoints() {
    let _serial = common::setup();
    // SAFETY: the serial lock is held, so no other test of this binary runs
    // (nor reads the environment) while the variable is set; blockwatch
    // inherits it.
    unsafe { std::env::set_var("BLOCKWATCH_FORCE_RAW_TRACEPOINTS", "1") };
    let result = std::panic::catch_unwind(|| check_async_fn_is_the_culprit(&["-v"]));
    // SAFETY: as above.
    unsafe { std::env::remove_var("BLOCKWATCH_FORCE_RAW_TRACEPOINTS") };
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// A larger copy works too, and with the copy disabled (frame pointers
/// only) the wait is still reported.
#[test]
fn user_stack_size_is_configurable() {
    let _serial = common::setup();
    check_async_fn_is_the_culprit(&["--user-stack-size", "32768"]);

    let bin = tokio_blocker_without_frame_pointers();
    let run = trace(&["--user-stack-size", "0", "--", &bin, "async-sleep"]);
    run.assert_success();
    let sleeps = sleeps(&run);
    assert_eq!(sleeps.len(), 1, "{}", run.report());
    assert!(
        !sleeps[0].stack.is_empty(),
        "frame pointers still give the first frames\n{}",
        run.stacks()
    );

    let run = common::blockwatch(&["trace", "--user-stack-size", "40000", "--pid", "1"]);
    assert_eq!(run.code, Some(2), "{}", run.report());
    assert!(run.stderr.contains("32768"), "{}", run.stderr);
}

/// The process blocks, then exits at once: by the time blockwatch reads
/// the event, /proc/PID is gone, yet the stack is symbolized (maps taken
/// when the process was first seen, binaries kept open).
#[test]
fn process_that_exits_right_after_blocking_is_symbolized() {
    let _serial = common::setup();
    let bin = tokio_blocker_without_frame_pointers();
    let run = trace(&["--", &bin, "exit-after-block"]);
    run.assert_success();
    let sleeps = sleeps(&run);
    assert_eq!(
        sleeps.len(),
        1,
        "expected the sleep before the exit\n{}",
        run.report()
    );
    let e = sleeps[0];
    assert!(
        e.functions()
            .iter()
            .any(|f| f.starts_with("tokio_blocker::async_fn_that_sleeps_then_exits")),
        "the stack names the function that blocked\n{}",
        run.stacks()
    );
    assert!(
        e.culprit_function()
            .starts_with("tokio_blocker::async_fn_that_sleeps_then_exits"),
        "{}",
        run.stacks()
    );
    assert!(
        e.stack.iter().all(|f| f.module.is_some()),
        "every frame's module is known\n{}",
        run.stacks()
    );
}

fn node_with_perf_maps(extra: &[&str]) -> Run {
    let script = subject("node_blocker.js");
    // --perf-basic-prof also writes V8's log, by default to isolate-*.log
    // in the working directory (the repository); /dev/null would make it
    // stdout.
    let log_dir = tempfile::tempdir().expect("a temporary folder");
    let logfile = format!("--logfile={}", log_dir.path().join("v8.log").display());
    let mut args = extra.to_vec();
    args.extend([
        "--",
        "node",
        "--perf-basic-prof",
        "--interpreted-frames-native-stack",
        &logfile,
        "--no-logfile-per-isolate",
        &script,
    ]);
    let run = trace(&args);
    run.assert_success();
    run
}

/// Node with perf maps: V8 keeps frame pointers in JIT code, libc and
/// Node's C++ have none; the unwound stack reaches the JS function that
/// called Atomics.wait, named from /tmp/perf-PID.map, and it is the
/// culprit, with the default copy of the stack.
#[test]
fn node_js_function_is_the_culprit_with_perf_maps() {
    let _serial = common::setup();
    let run = node_with_perf_maps(&[]);
    let waits = run.events_where(|e| e.class == "lock");
    assert_eq!(
        waits.len(),
        1,
        "expected the one Atomics.wait\n{}",
        run.report()
    );
    assert!(
        waits[0].culprit_function().contains("blockingAtomicsWait"),
        "Atomics.wait's caller is the culprit; got {:?}\n{}",
        waits[0].culprit,
        run.stacks()
    );
    assert!(
        waits[0]
            .functions()
            .iter()
            // Perf maps write `~main`/`*main` (interpreted/compiled);
            // V8's own frames, read first, give `main`.
            .any(|f| f.contains("~main ") || f.contains("*main ") || f.starts_with("main ")),
        "the stack goes on to the async main() that called it\n{}",
        run.stacks()
    );
}

/// execSync runs a nested libuv loop whose poll keeps 12 KiB of events on
/// the stack: with a 32 KiB copy the stack reaches the JS caller, past
/// Node's own JavaScript (node:child_process), which is not the culprit.
#[test]
fn node_js_caller_of_exec_sync_is_the_culprit_with_a_larger_copy() {
    let _serial = common::setup();
    let run = node_with_perf_maps(&["--user-stack-size", "32768"]);
    let execs = run.events_where(|e| e.syscall.as_deref() == Some("epoll_pwait"));
    assert_eq!(
        execs.len(),
        2,
        "expected the two execSync('sleep 0.12')\n{}",
        run.report()
    );
    for e in &execs {
        assert!(
            e.culprit_function().contains("blockingExecSync"),
            "execSync's caller is the culprit; got {:?}\n{}",
            e.culprit,
            run.stacks()
        );
        assert!(
            e.functions()
                .iter()
                .any(|f| f.contains("node:child_process")),
            "Node's own execSync is on the stack, under the culprit\n{}",
            run.stacks()
        );
    }
}

/// pyenv's CPython has no frame pointers: its native stack is unwound down
/// to `_start`, and the Python frames sit where the interpreter's
/// evaluation loop is, after the C frames of time.sleep and before the
/// interpreter's own callers.
#[test]
fn python_frames_sit_inside_the_unwound_native_stack() {
    let _serial = common::setup();
    let run = trace(&["--", common::PYTHON, &subject("asyncio_blocker.py")]);
    run.assert_success();
    let sleeps = sleeps(&run);
    assert_eq!(sleeps.len(), 3, "{}", run.report());
    for e in sleeps {
        let names = e.functions();
        let at = |want: &dyn Fn(&str) -> bool| names.iter().position(|n| want(n));
        let libc = at(&|n| n.contains("clock_nanosleep"));
        let python = at(&|n| n == "blocking_sleep_in_coroutine");
        let eval = at(&|n| n.starts_with("_PyEval_EvalFrame"));
        assert!(
            matches!((libc, python, eval), (Some(l), Some(p), Some(v)) if l < p && p < v),
            "libc, then the Python frames, then the evaluation loop\n{}",
            run.stacks()
        );
        assert!(
            names.contains(&"_start"),
            "the native stack is complete\n{}",
            run.stacks()
        );
        assert_eq!(
            e.culprit_function(),
            "blocking_sleep_in_coroutine",
            "{}",
            run.stacks()
        );
    }
}

/// Waits at a call site seen before send no stack (the kernel checks where
/// user space found the site's nearest callers): two functions that sleep
/// from the same depth of the same task, a tokio program without frame
/// pointers, share the syscall's address and stack pointer, and each of
/// their sleeps is still named after its own caller, repeats (known site)
/// and switches (other callers at a known site) alike.
#[test]
fn known_call_sites_keep_their_callers_apart() {
    let _serial = common::setup();
    let bin = tokio_blocker_without_frame_pointers();
    let run = trace(&["--threshold", "20ms", "--", &bin, "two-callers"]);
    run.assert_success();
    let named: Vec<&str> = sleeps(&run)
        .iter()
        .map(|e| {
            let f = e.functions();
            if f.iter().any(|f| f.contains("sleep_a")) {
                "a"
            } else if f.iter().any(|f| f.contains("sleep_b")) {
                "b"
            } else {
                "?"
            }
        })
        .collect();
    assert_eq!(
        named,
        ["a", "a", "b", "b", "a", "a"],
        "each sleep named after its own caller\n{}\n{}",
        run.report(),
        run.stacks()
    );
    for e in sleeps(&run) {
        assert!(
            reaches_thread_root(e),
            "a known site keeps the whole stack: {}\n{}",
            e.summary(),
            run.stacks()
        );
    }
}
