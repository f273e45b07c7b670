//! End to end: `trace`'s text output of a Python program leads with its
//! Python frames, CPython's own native frames folded into `… N interpreter
//! frames` lines; `--all-frames` shows them, and JSON always has them.

mod common;

use std::path::Path;

use common::{blockwatch, subject, trace};

/// The subject's stacks as `trace` prints them: the lines under each
/// event's header line (those that start with a time).
fn stacks(stdout: &str) -> Vec<Vec<&str>> {
    let mut stacks: Vec<Vec<&str>> = Vec::new();
    for line in stdout.lines() {
        if line.starts_with("    ") {
            if let Some(stack) = stacks.last_mut() {
                stack.push(line.trim());
            }
        } else if line.as_bytes().get(2) == Some(&b':') && line.contains(" clock_nanosleep ") {
            stacks.push(Vec::new());
        }
    }
    stacks
}

#[test]
fn python_frames_lead_and_the_interpreter_is_folded() {
    let _serial = common::setup();
    let script = subject("asyncio_blocker.py");
    let python = [
        "/usr/bin/python3",
        "/root/.pyenv/versions/3.11.7/bin/python3",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("no CPython interpreter found");

    let run = blockwatch(&["trace", "--", python, &script]);
    run.assert_success();
    let folded = stacks(&run.stdout);
    assert_eq!(folded.len(), 3, "{}", run.stdout);
    for stack in &folded {
        let text = stack.join("\n");
        for function in ["blocking_sleep_in_coroutine", "handler", "<module>"] {
            assert!(
                stack
                    .iter()
                    .any(|l| l.contains(&format!(" {function} (asyncio_blocker.py) "))),
                "{function} not shown:\n{text}"
            );
        }
        // libc's sleep, where the thread waited, stays on top.
        assert!(stack[0].contains("clock_nanosleep (libc"), "{text}");
        // CPython's call path into time.sleep and its evaluation loop
        // below the Python frames are folded.
        assert!(
            stack[1].starts_with("… ") && stack[1].contains(" interpreter frame"),
            "{text}"
        );
        assert!(
            stack
                .last()
                .is_some_and(|l| l.starts_with("… ") && l.contains(" interpreter frames")),
            "{text}"
        );
        assert!(!text.contains("_PyEval_EvalFrameDefault"), "{text}");
    }

    let run = blockwatch(&["trace", "--all-frames", "--", python, &script]);
    run.assert_success();
    let all = stacks(&run.stdout);
    assert_eq!(all.len(), 3, "{}", run.stdout);
    for stack in &all {
        let text = stack.join("\n");
        assert!(stack.iter().all(|l| l.starts_with('#')), "{text}");
        assert!(text.contains(" _PyEval_EvalFrameDefault ("), "{text}");
        assert!(text.contains(" blocking_sleep_in_coroutine ("), "{text}");
        assert!(stack.len() > folded[0].len(), "{text}");
    }

    // JSON has every frame, the flag or not.
    let run = trace(&["--", python, &script]);
    run.assert_success();
    let sleeps = run.events_where(|e| e.class == "sleep");
    assert_eq!(sleeps.len(), 3, "{}", run.report());
    for e in sleeps {
        assert!(
            e.stack
                .iter()
                .any(|f| f.function.as_deref() == Some("_PyEval_EvalFrameDefault")),
            "{}",
            run.report()
        );
    }
}
