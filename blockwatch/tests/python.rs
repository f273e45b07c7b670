//! End to end: CPython interpreter frames in blocking events, on every
//! interpreter the machine has (Debian's python3 and the pyenv builds), with
//! no change to the application. The culprit is the Python function that
//! blocked, at its file and line.

mod common;

use std::path::Path;

use common::{subject, trace};

const INTERPRETERS: &[&str] = &[
    "/usr/bin/python3",
    "/root/.pyenv/versions/3.10.13/bin/python3",
    "/root/.pyenv/versions/3.11.7/bin/python3",
    "/root/.pyenv/versions/3.12.1/bin/python3",
    "/root/.pyenv/versions/3.13.0/bin/python3",
];

#[test]
fn python_culprit_is_the_blocking_function_and_line() {
    let _serial = common::setup();
    let script = subject("asyncio_blocker.py");
    let source = std::fs::read_to_string(&script).unwrap();
    let line = source
        .lines()
        .position(|l| l.trim() == "time.sleep(0.08)")
        .expect("the subject's blocking line") as u32
        + 1;
    let present: Vec<_> = INTERPRETERS
        .iter()
        .filter(|p| Path::new(p).exists())
        .collect();
    assert!(!present.is_empty(), "no CPython interpreter found");
    for python in present {
        let run = trace(&["--", python, &script]);
        run.assert_success();
        let sleeps = run.events_where(|e| e.class == "sleep");
        assert_eq!(sleeps.len(), 3, "{python}\n{}", run.report());
        for e in sleeps {
            let c = e
                .culprit
                .as_ref()
                .unwrap_or_else(|| panic!("{python}: no culprit\n{}", run.report()));
            assert_eq!(
                c.function.as_deref(),
                Some("blocking_sleep_in_coroutine"),
                "{python}\n{}",
                run.report()
            );
            assert!(
                c.file
                    .as_deref()
                    .is_some_and(|f| f.ends_with("asyncio_blocker.py"))
            );
            assert_eq!(c.line, Some(line), "{python}");
            // The caller chain is there too, down to the module.
            let names: Vec<_> = e
                .stack
                .iter()
                .filter_map(|f| f.function.as_deref())
                .collect();
            assert!(
                names.contains(&"handler") && names.contains(&"<module>"),
                "{python}: {names:?}"
            );
        }
    }
}
