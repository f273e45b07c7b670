//! End to end: CPython interpreter frames in blocking events, on every
//! interpreter the machine has (Debian's python3 and the pyenv builds), with
//! no change to the application. The culprit is the Python function that
//! blocked, at its file and line.

mod common;

use common::{subject, trace};

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
    for python in common::interpreters() {
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

/// The line of `subjects/python_blocking_calls.py` marked `# BLOCKS: what`.
fn marked_line(source: &str, what: &str) -> u32 {
    let marker = format!("# BLOCKS: {what}");
    source
        .lines()
        .position(|l| l.contains(&marker))
        .unwrap_or_else(|| panic!("no {marker:?} in the subject")) as u32
        + 1
}

/// The typical blocking calls of an asyncio application, on every
/// interpreter: a cold file read, a socket with a timeout (a `poll` wait),
/// GIL contention from a CPU-bound executor thread, a blocking call in an
/// installed package, and (with `--strict`, as it never leaves the CPU)
/// `os.listdir`, each named by its Python function and line.
#[test]
fn python_blocking_calls_are_named_on_every_interpreter() {
    let _serial = common::setup();
    let script = subject("python_blocking_calls.py");
    let source = std::fs::read_to_string(&script).unwrap();
    let line = |what| Some(marked_line(&source, what));
    let library = std::fs::read_to_string(subject("site-packages/slowlib/__init__.py")).unwrap();
    for python in common::interpreters() {
        // Below CPython's 5 ms switch interval: each GIL wait lasts ~5 ms.
        let run = trace(&["--strict", "--threshold", "2ms", "--", python, &script]);
        run.assert_success();
        let on_loop = |e: &&common::Event| e.is_main_thread();
        let by = |class: &str, function: &str| {
            run.events_where(|e| {
                e.class == class
                    && e.culprit.as_ref().and_then(|c| c.function.as_deref()) == Some(function)
            })
            .into_iter()
            .filter(on_loop)
            .collect::<Vec<_>>()
        };
        let culprit_line = |e: &common::Event| e.culprit.as_ref().and_then(|c| c.line);

        let reads = by("file", "read_large_file");
        assert!(
            reads
                .iter()
                .any(|e| e.syscall.as_deref() == Some("read") && culprit_line(e) == line("read")),
            "{python}: the cold read, at its line\n{}",
            run.report()
        );

        let polls = by("net", "poll_socket");
        assert!(
            polls.iter().any(|e| e.syscall.as_deref() == Some("poll")
                && culprit_line(e) == line("poll")
                && (140.0..1000.0).contains(&e.ms())),
            "{python}: the 150 ms socket wait in poll(), at its line\n{}",
            run.report()
        );

        // crunch(0.5) is one episode of ~500 ms: the loop computes in
        // 5 ms slices and waits for the GIL in between while the executor
        // spins, about half and half. Named after the GIL wait (class gil)
        // when the waits took more of it, else as CPU work (class stall)
        // whose time off the CPU is those GIL waits; either way many waits.
        let waits = |e: &&common::Event| e.episode.as_ref().map_or(0, |p| p.waits);
        let gil = by("gil", "crunch");
        let cpu = by("stall", "crunch");
        assert!(
            gil.len() + cpu.len() == 1
                && gil
                    .iter()
                    .all(|e| e.syscall.as_deref() == Some("futex") && waits(e) >= 3)
                && cpu.iter().all(|e| waits(e) >= 3
                    && e.episode
                        .as_ref()
                        .is_some_and(|p| p.sleeping_ns >= 50_000_000)),
            "{python}: the loop waits for the GIL in crunch() while the executor spins\n{}",
            run.report()
        );
        assert!(
            run.events_where(|e| e.class == "lock"
                && e.culprit.as_ref().and_then(|c| c.function.as_deref()) == Some("crunch"))
                .is_empty(),
            "{python}: GIL waits are not plain locks\n{}",
            run.report()
        );

        let lib = by("sleep", "fetch");
        assert_eq!(lib.len(), 1, "{python}\n{}", run.report());
        let culprit = lib[0].culprit.as_ref().unwrap();
        assert!(
            culprit
                .file
                .as_deref()
                .is_some_and(|f| f.ends_with("site-packages/slowlib/__init__.py"))
                && culprit.line == Some(marked_line(&library, "library")),
            "{python}: the culprit is the library's line\n{}",
            run.report()
        );
        let offender = lib[0].offender.as_ref().expect("an offender");
        assert_eq!(
            (offender.function.as_deref(), offender.line),
            (Some("call_library"), line("offender")),
            "{python}: the offender is the user's call into the library"
        );
        let listdir = run.events_where(|e| {
            e.class == "stat"
                && e.syscall.as_deref() == Some("getdents64")
                && e.culprit.as_ref().and_then(|c| c.function.as_deref()) == Some("list_directory")
        });
        assert!(
            !listdir.is_empty() && listdir.iter().all(|e| culprit_line(e) == line("listdir")),
            "{python}: os.listdir under --strict, at its line\n{}",
            run.report()
        );
        // Elsewhere, the user's own code is both.
        assert!(
            polls
                .iter()
                .all(|e| e.offender.as_ref().map(|o| &o.function)
                    == e.culprit.as_ref().map(|c| &c.function)),
            "{python}"
        );
    }
}

/// `python -X perf` (3.12+) writes a perf map of its trampolines: those
/// native frames are named from it, and the culprit stays the Python
/// function the kernel walk found.
#[test]
fn python_perf_trampolines_are_named_from_the_perf_map() {
    let _serial = common::setup();
    let script = subject("asyncio_blocker.py");
    // 3.12 and 3.13: the last two, oldest first.
    let newest = &common::INTERPRETERS[3..];
    for python in common::present(newest) {
        let run = trace(&["--", python, "-X", "perf", &script]);
        run.assert_success();
        let sleeps = run.events_where(|e| e.class == "sleep");
        assert_eq!(sleeps.len(), 3, "{python}\n{}", run.report());
        for e in sleeps {
            assert!(
                e.stack.iter().any(|f| f
                    .function
                    .as_deref()
                    .is_some_and(|n| n.starts_with("py::") && n.contains("asyncio_blocker.py"))),
                "{python}: a trampoline named from /tmp/perf-PID.map\n{}",
                run.report()
            );
            assert_eq!(
                e.culprit.as_ref().and_then(|c| c.function.as_deref()),
                Some("blocking_sleep_in_coroutine"),
                "{python}\n{}",
                run.report()
            );
        }
    }
}

/// A call site's first wait inside an iteration that was mostly CPU work
/// (a stall, named by its samples), then three plain waits there within a
/// second: the kernel counts the site as known from its first stacks on,
/// so user space must have learned them from that stall's record, or the
/// three arrive with no native frames at all (as they did before).
#[test]
fn a_sites_waits_after_a_stall_keep_their_native_frames() {
    let _serial = common::setup();
    let script = subject("asyncio_stall_then_wait.py");
    for python in common::interpreters() {
        let run = trace(&["--threshold", "10ms", "--", python, &script]);
        run.assert_success();
        let naps = run.events_where(|e| {
            e.class == "sleep"
                && e.duration_ns < 100_000_000
                && e.culprit.as_ref().and_then(|c| c.function.as_deref()) == Some("nap")
        });
        // Three, but one may be dropped or merged on a loaded machine (a
        // count once came out otherwise on 3.13, not reproduced since):
        // what is checked here is the frames of those that come.
        assert!(
            (2..=3).contains(&naps.len()),
            "{python}: the naps\n{}",
            run.report()
        );
        // time.sleep is clock_nanosleep in libc on 3.11+, select before.
        for e in naps {
            assert!(
                e.stack
                    .iter()
                    .any(|f| f.module.as_deref().is_some_and(|m| m.contains("/libc.so"))),
                "{python}: a nap named down to its wait in libc\n{}",
                run.report()
            );
        }
    }
}
