//! The one-line verdict for a blocking stack, the sentence a user acts on:
//! `blocking sleep (clock_nanosleep, 80.2ms) on the event loop of
//! python3[123] in refresh() at app/report.py:41`, followed by the fix
//! advice (`; fix: use ... instead of ...`).

use std::hash::{Hash, Hasher};

use crate::event::{Detector, Event, Frame};
use crate::settings::duration::format_duration;
use crate::text::{basename, scrub};

/// Identifies "the same blocking call": process, wait and stack, but not
/// duration or time, so each is announced once.
pub fn stack_key(ev: &Event) -> u64 {
    let mut h = crate::identity_hasher();
    (&ev.comm, ev.class, ev.syscall_nr, ev.detector).hash(&mut h);
    // The frames' part is kept with the stack, hashed once.
    ev.stack.identity().hash(&mut h);
    h.finish()
}

fn place(f: &Frame) -> String {
    let name = f.function.as_deref().unwrap_or("??");
    let call = if name.ends_with(')') {
        name.to_string()
    } else {
        format!("{name}()")
    };
    match (&f.file, f.line, &f.module) {
        (Some(file), Some(line), _) => format!("{call} at {file}:{line}"),
        (Some(file), None, _) => format!("{call} in {file}"),
        (None, _, Some(module)) => format!("{call} in {}", basename(module)),
        _ => call,
    }
}

/// The verdict line; names and paths come from the watched process, so
/// control characters are replaced to keep it one line.
pub fn verdict(ev: &Event) -> String {
    let what = ev.syscall.unwrap_or(match ev.state {
        crate::event::OffState::Preempted => "preempted",
        _ => "no syscall",
    });
    let mut culprit = match &ev.culprit {
        Some(f) => format!(" in {}", place(f)),
        None => String::new(),
    };
    // A library's line says where it blocked; the user's line, what to
    // change.
    if let Some(o) = &ev.offender
        && ev.culprit.as_ref() != Some(o)
    {
        culprit.push_str(&format!(", called from {}", place(o)));
    }
    let ms = |ns: u64| format_duration(std::time::Duration::from_nanos(ns));
    let duration = ms(ev.duration_ns);
    // The call named is the episode's longest wait: when it was only part
    // of the episode, both lengths are said, lest the call seem longer.
    let call = match &ev.episode {
        Some(e) if e.waits > 1 && e.longest_wait_ns * 10 < ev.duration_ns * 9 => {
            format!("{what} {}, in a {duration} episode", ms(e.longest_wait_ns))
        }
        _ => format!("{what}, {duration}"),
    };
    let line = match ev.detector {
        Detector::Offcpu => format!(
            "blocking {} ({call}) on the event loop of {}[{}]{culprit}",
            ev.class, ev.comm, ev.pid,
        ),
        Detector::Strict => format!(
            "blocking {} call ({what}, {duration} on the CPU, strict) on the event loop of {}[{}]{culprit}",
            ev.class, ev.comm, ev.pid,
        ),
        // CPU time the kernel spent for one call (a large read from the
        // page cache) names that call.
        Detector::Stall if ev.syscall.is_some() => format!(
            "blocking {} ({what}, {duration}, mostly on the CPU in the call) on the event loop of {}[{}]{culprit}",
            ev.class, ev.comm, ev.pid,
        ),
        Detector::Stall => format!(
            "stall ({duration}, mostly CPU work without reaching the idle wait) of the event loop of {}[{}]{culprit}",
            ev.comm, ev.pid,
        ),
    };
    scrub(&with_advice(line, &ev.advice)).into_owned()
}

/// The verdict ends with what to do instead (empty only in tests that
/// build events by hand).
fn with_advice(line: String, advice: &str) -> String {
    if advice.is_empty() {
        line
    } else {
        format!("{line}; fix: {advice}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Class, FrameKind, OffState};
    use crate::output::fixtures;

    /// 80.2 ms of `clock_nanosleep` by python3[123], with `culprit` as
    /// its stack, culprit and offender.
    fn event(culprit: Option<Frame>) -> Event {
        Event {
            pid: 123,
            tid: 123,
            thread: "python3".into(),
            duration_ns: 80_200_000,
            state: OffState::Sleeping,
            stack: culprit.iter().cloned().collect(),
            ..fixtures::event(culprit, Some("clock_nanosleep"), 230, Class::Sleep, 0)
        }
    }

    fn python_frame(function: &str, file: &str, line: u32) -> Frame {
        Frame {
            function: Some(function.into()),
            file: Some(file.into()),
            line: Some(line),
            kind: FrameKind::Python,
            ..Frame::default()
        }
    }

    #[test]
    fn names_the_line_to_fix() {
        let f = python_frame("refresh", "app/report.py", 41);
        assert_eq!(
            verdict(&event(Some(f))),
            "blocking sleep (clock_nanosleep, 80.2ms) on the event loop of python3[123] in refresh() at app/report.py:41"
        );
    }

    #[test]
    fn a_wait_that_was_part_of_its_episode_says_both_lengths() {
        let f = python_frame("refresh", "app/report.py", 41);
        let mut ev = event(Some(f));
        ev.duration_ns = 254_000_000;
        ev.episode = Some(crate::event::Episode {
            sleeping_ns: 250_000_000,
            waits: 4,
            longest_wait_ns: 150_000_000,
            ..Default::default()
        });
        assert_eq!(
            verdict(&ev),
            "blocking sleep (clock_nanosleep 150ms, in a 254ms episode) on the event loop of python3[123] in refresh() at app/report.py:41"
        );
        // One wait that is nearly the whole episode: one length.
        ev.episode.as_mut().unwrap().longest_wait_ns = 250_000_000;
        assert!(verdict(&ev).contains("(clock_nanosleep, 254ms)"));
    }

    #[test]
    fn a_library_culprit_names_the_users_line_too() {
        let lib = python_frame(
            "fetch",
            "/srv/venv/lib/python3.11/site-packages/slowlib/__init__.py",
            9,
        );
        let mut ev = event(Some(lib));
        ev.offender = Some(python_frame("refresh", "app/report.py", 41));
        assert_eq!(
            verdict(&ev),
            "blocking sleep (clock_nanosleep, 80.2ms) on the event loop of python3[123] in fetch() at /srv/venv/lib/python3.11/site-packages/slowlib/__init__.py:9, called from refresh() at app/report.py:41"
        );
    }

    #[test]
    fn without_a_culprit_says_what_it_knows() {
        let mut ev = event(None);
        ev.syscall = None;
        ev.state = OffState::Preempted;
        assert_eq!(
            verdict(&ev),
            "blocking sleep (preempted, 80.2ms) on the event loop of python3[123]"
        );
    }

    #[test]
    fn native_culprits_name_their_binary_and_control_characters_go() {
        let f = fixtures::frame(
            0,
            Some("tokio_blocker::blocking_sleep_in_task"),
            Some("/srv/bin/tokio-blocker"),
        );
        let mut ev = event(Some(f));
        ev.comm = "evil\nname".into();
        assert_eq!(
            verdict(&ev),
            "blocking sleep (clock_nanosleep, 80.2ms) on the event loop of evil?name[123] in tokio_blocker::blocking_sleep_in_task() in tokio-blocker"
        );
    }

    #[test]
    fn strict_calls_and_stalls_say_so() {
        let mut ev = event(Some(python_frame("load", "app.py", 3)));
        ev.detector = Detector::Strict;
        ev.syscall = Some("openat");
        ev.class = Class::File;
        ev.duration_ns = 12_000;
        assert_eq!(
            verdict(&ev),
            "blocking file call (openat, 12.0us on the CPU, strict) on the event loop of python3[123] in load() at app.py:3"
        );
        let strict_key = stack_key(&ev);
        ev.detector = Detector::Offcpu;
        assert_ne!(stack_key(&ev), strict_key, "detectors are told apart");
        ev.detector = Detector::Stall;
        ev.syscall = None;
        ev.class = Class::Stall;
        ev.duration_ns = 310_000_000;
        assert_eq!(
            verdict(&ev),
            "stall (310ms, mostly CPU work without reaching the idle wait) of the event loop of python3[123] in load() at app.py:3"
        );
    }

    #[test]
    fn the_verdict_says_what_to_do_instead() {
        let mut ev = event(None);
        ev.advice = "use `await asyncio.sleep(...)` instead of `time.sleep(...)`".into();
        assert_eq!(
            verdict(&ev),
            "blocking sleep (clock_nanosleep, 80.2ms) on the event loop of python3[123]; fix: use `await asyncio.sleep(...)` instead of `time.sleep(...)`"
        );
    }

    #[test]
    fn same_stack_same_key_whatever_the_duration() {
        let f = fixtures::frame(0, Some("tokio_blocker::blocking_sleep_in_task"), None);
        let a = event(Some(f.clone()));
        let mut b = event(Some(f));
        b.duration_ns = 1;
        b.tid = 9;
        assert_eq!(stack_key(&a), stack_key(&b));
        b.syscall_nr = 35;
        assert_ne!(stack_key(&a), stack_key(&b));
    }
}
