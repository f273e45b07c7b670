//! Loops that end and begin again: a thread's loop lives as long as its
//! epoll instance, so what the thread does after closing it is not
//! reported, and a second loop in the same thread (a second
//! `asyncio.run`) is found and watched like the first. Real CPython
//! processes, on every interpreter on the machine.

mod common;

use common::{Run, subject, trace};

fn culprit(e: &common::Event) -> Option<&str> {
    e.culprit.as_ref().and_then(|c| c.function.as_deref())
}

/// The off-CPU events of `run` (stalls and strict calls aside).
fn waits(run: &Run) -> Vec<&common::Event> {
    run.events_where(|e| e.detector == "offcpu")
}

#[test]
fn a_second_asyncio_run_is_a_loop_and_the_time_between_is_not() {
    let _serial = common::setup();
    for python in common::interpreters() {
        let run = trace(&[
            "--threshold",
            "30ms",
            "--",
            python,
            &subject("asyncio_loops.py"),
            "two-runs",
        ]);
        run.assert_success();
        let waits = waits(&run);
        let named: Vec<_> = waits.iter().map(|e| (culprit(e), e.ms().round())).collect();
        assert!(
            waits.iter().all(|e| e.ms() < 150.0),
            "{python}: the 200 ms and 150 ms sleeps after each loop ended are not reported: {named:?}\n{}",
            run.report()
        );
        for (block, ms) in [("first_block", 60.0), ("second_block", 70.0)] {
            let found: Vec<_> = waits
                .iter()
                .filter(|e| e.class == "sleep" && culprit(e) == Some(block))
                .filter(|e| (ms - 1.0..ms + 100.0).contains(&e.ms()))
                .collect();
            assert_eq!(
                found.len(),
                1,
                "{python}: {block}'s {ms} ms sleep is reported once: {named:?}\n{}",
                run.report()
            );
        }
        assert!(
            run.events_where(|e| e.detector == "stall").is_empty(),
            "{python}: no stall: the time between the loops is no busy loop\n{}",
            run.report()
        );
    }
}

#[test]
fn loops_in_two_threads_are_each_watched() {
    let _serial = common::setup();
    for python in common::interpreters() {
        let run = trace(&[
            "--threshold",
            "30ms",
            "--",
            python,
            &subject("asyncio_loops.py"),
            "two-threads",
        ]);
        run.assert_success();
        let waits = waits(&run);
        let sleeps: Vec<_> = waits.iter().filter(|e| e.class == "sleep").collect();
        let tids: std::collections::BTreeSet<u32> = sleeps.iter().map(|e| e.tid).collect();
        assert_eq!(
            (sleeps.len(), tids.len()),
            (2, 2),
            "{python}: one 60 ms sleep in each loop thread\n{}",
            run.report()
        );
        assert!(
            sleeps.iter().all(|e| (59.0..1060.0).contains(&e.ms())
                && !e.is_main_thread()
                && culprit(e) == Some("thread_block")),
            "{python}: the threads' sleeps, not the main thread's join\n{}",
            run.report()
        );
        assert!(
            waits.iter().all(|e| e.class == "sleep"),
            "{python}: none of the loops' idle waits\n{}",
            run.report()
        );
    }
}
