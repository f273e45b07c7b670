//! The one-line verdict for a blocking stack, the sentence a user acts on:
//! `blocking sleep (clock_nanosleep, 80.2ms) on the event loop of
//! python3[123] in refresh() at app/report.py:41`.

use std::hash::{DefaultHasher, Hash, Hasher};

use crate::duration::format_duration;
use crate::event::{Event, Frame};

/// Identifies "the same blocking call": process, wait and stack, but not
/// duration or time, so each is announced once.
pub fn stack_key(ev: &Event) -> u64 {
    let mut h = DefaultHasher::new();
    (&ev.comm, ev.class, ev.syscall_nr).hash(&mut h);
    for f in &ev.stack {
        (&f.function, &f.module, f.line).hash(&mut h);
    }
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

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The verdict line; names and paths come from the watched process, so
/// control characters are replaced to keep it one line.
pub fn verdict(ev: &Event) -> String {
    let what = ev.syscall.unwrap_or(match ev.state {
        crate::event::OffState::Preempted => "preempted",
        _ => "no syscall",
    });
    let culprit = match &ev.culprit {
        Some(f) => format!(" in {}", place(f)),
        None => String::new(),
    };
    format!(
        "blocking {} ({what}, {}) on the event loop of {}[{}]{culprit}",
        ev.class,
        format_duration(std::time::Duration::from_nanos(ev.duration_ns)),
        ev.comm,
        ev.pid,
    )
    .chars()
    .map(|c| if c.is_control() { '?' } else { c })
    .collect()
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::event::{Class, FrameKind, OffState};

    fn event(culprit: Option<Frame>) -> Event {
        Event {
            ts: SystemTime::UNIX_EPOCH,
            pid: 123,
            tid: 123,
            comm: "python3".into(),
            thread: "python3".into(),
            syscall: Some("clock_nanosleep"),
            syscall_nr: 230,
            class: Class::Sleep,
            duration_ns: 80_200_000,
            state: OffState::Sleeping,
            stack: culprit.iter().cloned().collect(),
            culprit,
        }
    }

    #[test]
    fn names_the_line_to_fix() {
        let f = Frame {
            function: Some("refresh".into()),
            file: Some("app/report.py".into()),
            line: Some(41),
            kind: FrameKind::Python,
            ..Frame::default()
        };
        assert_eq!(
            verdict(&event(Some(f))),
            "blocking sleep (clock_nanosleep, 80.2ms) on the event loop of python3[123] in refresh() at app/report.py:41"
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
        let f = Frame {
            function: Some("tokio_blocker::blocking_sleep_in_task".into()),
            module: Some("/srv/bin/tokio-blocker".into()),
            ..Frame::default()
        };
        let mut ev = event(Some(f));
        ev.comm = "evil\nname".into();
        assert_eq!(
            verdict(&ev),
            "blocking sleep (clock_nanosleep, 80.2ms) on the event loop of evil?name[123] in tokio_blocker::blocking_sleep_in_task() in tokio-blocker"
        );
    }

    #[test]
    fn same_stack_same_key_whatever_the_duration() {
        let f = Frame {
            function: Some("tokio_blocker::blocking_sleep_in_task".into()),
            ..Frame::default()
        };
        let a = event(Some(f.clone()));
        let mut b = event(Some(f));
        b.duration_ns = 1;
        b.tid = 9;
        assert_eq!(stack_key(&a), stack_key(&b));
        b.syscall_nr = 35;
        assert_ne!(stack_key(&a), stack_key(&b));
    }
}
