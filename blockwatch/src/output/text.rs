//! One event as text, for `trace`'s default output: a header line (time,
//! process, thread, syscall, class, duration, state, culprit), then the
//! stack, one frame a line.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::event::{Detector, Event, Frame};
use crate::output::labels;
use crate::settings::duration::format_duration;
use crate::text::{basename, scrub as clean};

/// ` file:line`, ` file`, or nothing.
fn location(f: &Frame) -> String {
    match (&f.file, f.line) {
        (Some(file), Some(line)) => format!(" {}:{line}", clean(file)),
        (Some(file), None) => format!(" {}", clean(file)),
        (None, _) => String::new(),
    }
}

/// `HH:MM:SS.mmm` in local time.
fn local_time(ts: SystemTime) -> String {
    let d = ts.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let ms = d.subsec_millis();
    let t = libc::time_t::try_from(secs).unwrap_or(libc::time_t::MAX);
    // SAFETY: an all-zero `tm` is valid (integers and a null pointer).
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r keeps
    // neither.
    let ok = !unsafe { libc::localtime_r(&t, &mut tm) }.is_null();
    let (h, m, s) = if ok {
        (
            u64::try_from(tm.tm_hour).unwrap_or(0),
            u64::try_from(tm.tm_min).unwrap_or(0),
            u64::try_from(tm.tm_sec).unwrap_or(0),
        )
    } else {
        // No usable time zone: UTC is better than nothing.
        (secs / 3600 % 24, secs / 60 % 60, secs % 60)
    };
    format!("{h:02}:{m:02}:{s:02}.{ms:03}")
}

/// `in handler at app.py:42`, `in ?? (libfoo.so)`, or `(culprit
/// unknown)`: a phrase for the header line, where the summary and the
/// metrics want a bare name ([`labels::frame_name`]).
fn culprit_phrase(culprit: Option<&Frame>) -> String {
    let Some(f) = culprit else {
        return "(culprit unknown)".to_string();
    };
    let mut s = format!("in {}", clean(f.function.as_deref().unwrap_or("??")));
    if f.function.is_none()
        && let Some(m) = &f.module
    {
        s.push_str(&format!(" ({})", clean(basename(m))));
    }
    if f.file.is_some() {
        s.push_str(" at");
        s.push_str(&location(f));
    }
    s
}

/// One event in text form: a header line, then the stack.
pub fn event(ev: &Event) -> String {
    let mut s = format!(
        "{} {}[{}] {}/{} {} {} {} {} {}\n",
        local_time(ev.ts),
        clean(&ev.comm),
        ev.pid,
        clean(&ev.thread),
        ev.tid,
        labels::syscall(ev, labels::NO_SYSCALL_TEXT),
        ev.class,
        format_duration(Duration::from_nanos(ev.duration_ns)),
        ev.state.as_str(),
        culprit_phrase(ev.culprit.as_ref()),
    );
    match ev.detector {
        Detector::Offcpu => {}
        Detector::Strict => {
            s.pop();
            s.push_str(
                " [strict: first call from this stack; repeats are counted in the summary]\n",
            );
        }
        Detector::Stall => {
            s.pop();
            s.push_str(&format!(
                " [stall: busy {}, {} stack samples]\n",
                format_duration(Duration::from_nanos(ev.busy_ns.unwrap_or(ev.duration_ns))),
                ev.samples.unwrap_or(0)
            ));
        }
    }
    if ev.stack.is_empty() {
        s.push_str("    (no stack)\n");
    }
    for (i, f) in ev.stack.iter().enumerate() {
        s.push_str(&format!(
            "    #{i} {:#x} {}",
            f.address,
            clean(f.function.as_deref().unwrap_or("??"))
        ));
        if let Some(m) = &f.module {
            s.push_str(&format!(" ({})", clean(basename(m))));
        }
        s.push_str(&location(f));
        if f.inlined {
            s.push_str(" [inlined]");
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Class, OffState};
    use crate::output::fixtures::{self, frame, read_event};

    #[test]
    fn event_lines() {
        let text = event(&read_event(80));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        let head = lines[0];
        let (time, rest) = head.split_once(' ').unwrap();
        assert_eq!(time.len(), 12, "{time}");
        let b = time.as_bytes();
        assert!(b[2] == b':' && b[5] == b':' && b[8] == b'.', "{time}");
        assert!(
            time.chars().filter(char::is_ascii_digit).count() == 9,
            "{time}"
        );
        // Whatever the time zone, seconds and milliseconds are these.
        assert!(time.ends_with(":40.123"), "{time}");
        assert_eq!(
            rest,
            "python3[1234] MainThread/1240 read file 80.0ms disk in handle_request at /srv/app/handlers.py:42"
        );

        assert_eq!(
            lines[1],
            "    #0 0x7f0000001000 __GI___libc_read (libc.so.6)"
        );
        assert_eq!(lines[2], "    #1 0x7f0000002000 ?? (libfoo.so.1)");
        assert_eq!(
            lines[3],
            "    #2 0x555500001234 read_config (python3.12) [inlined]"
        );
        assert_eq!(
            lines[4],
            "    #3 0x555500001234 handle_request (python3.12) /srv/app/handlers.py:42"
        );
    }

    #[test]
    fn unknown_culprit_and_syscall() {
        let mut ev = fixtures::event(None, None, -1, Class::Other, 15);
        ev.state = OffState::Preempted;
        ev.stack.clear();
        let text = event(&ev);
        let mut lines = text.lines();
        let head = lines.next().unwrap();
        assert!(
            head.ends_with(
                " python3[1234] MainThread/1240 - other 15.0ms preempted (culprit unknown)"
            ),
            "{head}"
        );
        assert_eq!(lines.next(), Some("    (no stack)"));

        let ev = fixtures::event(
            Some(frame(0x1000, None, Some("/lib/libz.so"))),
            None,
            470,
            Class::Other,
            15,
        );
        let text = event(&ev);
        let head = text.lines().next().unwrap();
        assert!(head.contains(" syscall_470 other "), "{head}");
        assert!(head.ends_with(" in ?? (libz.so)"), "{head}");
    }
}
