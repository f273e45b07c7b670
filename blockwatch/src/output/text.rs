//! One event as text, for `trace`'s default output: a header line (time,
//! process, thread, syscall, class, duration, state, culprit), then the
//! stack, one frame a line. In a Python or JavaScript stack the
//! interpreter's own native frames are folded into one line per run
//! ([`Frames::Folded`]), so the frames a user changes come first; JSON
//! keeps every frame.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::analyze::culprit;
use crate::event::{Detector, Episode, Event, Frame};
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

/// Which frames of a stack the text shows (`trace --all-frames`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Frames {
    /// In a stack with interpreted frames, each run of the interpreter's
    /// own native frames is one line: `… 5 interpreter frames (libpython…)`.
    #[default]
    Folded,
    /// Every frame, as JSON has them.
    All,
}

/// A line of a stack: a frame with its index, or a run of frames folded.
#[derive(Debug, PartialEq)]
enum StackLine<'a> {
    Frame(usize, &'a Frame),
    Folded(&'a [Frame]),
}

/// Whether a frame may sit inside a folded run: the interpreter's own, or
/// named native code that is not the application's (the C library's
/// process start below the interpreter). Unnamed frames outside the
/// interpreter stay visible: they may be a C extension.
fn foldable(f: &Frame) -> bool {
    culprit::is_interpreter_machinery(f)
        || (!culprit::is_interpreted(f) && f.function.is_some() && !culprit::is_application(f))
}

/// The lines of `stack`. A fold starts at an interpreter frame and runs
/// outward over foldable frames, so what the interpreter called (libc's
/// syscall wrapper at the top, a C library) stays shown. A stack without
/// interpreted frames (tokio, a native program, a Python process not yet
/// inspected) is shown whole: there the native frames are the code.
fn stack_lines(stack: &[Frame], frames: Frames) -> Vec<StackLine<'_>> {
    let fold = frames == Frames::Folded && stack.iter().any(culprit::is_interpreted);
    let mut lines = Vec::with_capacity(stack.len());
    let mut i = 0;
    while i < stack.len() {
        if fold && culprit::is_interpreter_machinery(&stack[i]) {
            let run = stack[i..].iter().take_while(|f| foldable(f)).count();
            lines.push(StackLine::Folded(&stack[i..i + run]));
            i += run;
        } else {
            lines.push(StackLine::Frame(i, &stack[i]));
            i += 1;
        }
    }
    lines
}

/// At most this many modules are named on a folded line.
const FOLDED_MODULES_SHOWN: usize = 3;

/// `    … 5 interpreter frames (libpython3.11.so.1.0)`: the count and the
/// modules the run lies in, in stack order.
fn folded_line(run: &[Frame]) -> String {
    let mut modules: Vec<&str> = Vec::new();
    for m in run.iter().filter_map(|f| f.module.as_deref()) {
        let m = basename(m);
        if !modules.contains(&m) {
            modules.push(m);
        }
    }
    let plural = if run.len() == 1 { "" } else { "s" };
    let mut s = format!("    … {} interpreter frame{plural}", run.len());
    if !modules.is_empty() {
        let shown: Vec<String> = modules
            .iter()
            .take(FOLDED_MODULES_SHOWN)
            .map(|m| clean(m).into_owned())
            .collect();
        s.push_str(&format!(" ({}", shown.join(", ")));
        if modules.len() > FOLDED_MODULES_SHOWN {
            s.push_str(", …");
        }
        s.push(')');
    }
    s.push('\n');
    s
}

/// `    #3 0x5555… handler (python3.12) app.py:42 [inlined]`.
fn frame_line(i: usize, f: &Frame) -> String {
    let mut s = format!(
        "    #{i} {:#x} {}",
        f.address,
        clean(f.function.as_deref().unwrap_or("??"))
    );
    if let Some(m) = &f.module {
        s.push_str(&format!(" ({})", clean(basename(m))));
    }
    s.push_str(&location(f));
    if f.inlined {
        s.push_str(" [inlined]");
    }
    s.push('\n');
    s
}

/// Where an episode's time went, for its header line: ` [cpu 140.2ms, 12
/// samples; preempted 9.8ms]`. Nothing for an episode that was one wait
/// and little else, which the line already says.
fn episode_note(detector: Detector, e: &Episode) -> Option<String> {
    let ms = |ns: u64| format_duration(Duration::from_nanos(ns));
    let total = e.cpu_ns + e.offcpu_ns();
    let single_wait = e.waits == 1 && e.cpu_ns * 10 < total.max(1);
    if detector == Detector::Offcpu && single_wait {
        return None;
    }
    let mut parts = Vec::new();
    if e.cpu_ns > 0 {
        parts.push(match detector {
            Detector::Stall => format!("cpu {}, {} samples", ms(e.cpu_ns), e.samples),
            _ => format!("cpu {}", ms(e.cpu_ns)),
        });
    }
    for (what, ns) in [
        ("sleeping", e.sleeping_ns),
        ("disk", e.disk_ns),
        ("preempted", e.preempted_ns),
    ] {
        if ns > 0 {
            parts.push(format!("{what} {}", ms(ns)));
        }
    }
    if e.waits > 1 {
        parts.push(format!(
            "{} waits, longest {}",
            e.waits,
            ms(e.longest_wait_ns)
        ));
    }
    (!parts.is_empty()).then(|| format!(" [{}]", parts.join("; ")))
}

/// One event in text form: a header line, then the stack.
pub fn event(ev: &Event, frames: Frames) -> String {
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
        Detector::Stall => {}
    }
    if let Some(note) = ev
        .episode
        .as_ref()
        .and_then(|e| episode_note(ev.detector, e))
    {
        s.pop();
        s.push_str(&note);
        s.push('\n');
    }
    // Kept with the stack: a call site's every event shows the same lines.
    s.push_str(ev.stack.text(frames));
    s
}

/// The lines of a stack's frames, for [`event`].
pub fn stack(frames: &[Frame], which: Frames) -> String {
    if frames.is_empty() {
        return "    (no stack)\n".to_string();
    }
    let mut s = String::new();
    for line in stack_lines(frames, which) {
        s.push_str(&match line {
            StackLine::Frame(i, f) => frame_line(i, f),
            StackLine::Folded(run) => folded_line(run),
        });
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
        let text = event(&read_event(80), Frames::Folded);
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
        ev.stack = Default::default();
        let text = event(&ev, Frames::Folded);
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
        let text = event(&ev, Frames::Folded);
        let head = text.lines().next().unwrap();
        assert!(head.contains(" syscall_470 other "), "{head}");
        assert!(head.ends_with(" in ?? (libz.so)"), "{head}");
    }

    fn native(function: &str, module: &str) -> Frame {
        frame(0x7f00_0000_1000, Some(function), Some(module))
    }

    fn python(function: &str, file: &str, line: u32) -> Frame {
        Frame {
            kind: crate::event::FrameKind::Python,
            file: Some(file.into()),
            line: Some(line),
            ..frame(0x7f00_0000_2000, Some(function), Some(file))
        }
    }

    /// The stack lines of `stack` without their addresses: `#3 f (m)` or
    /// the folded line as is.
    fn shown(stack: Vec<Frame>, frames: Frames) -> Vec<String> {
        let ev = fixtures::stack_event(stack, None, 50);
        event(&ev, frames)
            .lines()
            .skip(1)
            .map(|l| match l.trim().split_once(" 0x") {
                Some((index, rest)) => {
                    format!("{index} {}", rest.split_once(' ').unwrap().1)
                }
                None => l.trim().to_string(),
            })
            .collect()
    }

    const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    const LIBPYTHON: &str = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0";
    const ASYNCIO_C: &str = "/root/.pyenv/versions/3.11.7/lib/python3.11/lib-dynload/_asyncio.cpython-311-x86_64-linux-gnu.so";
    const APP: &str = "/srv/app/app.py";
    const EVENTS: &str = "/root/.pyenv/versions/3.11.7/lib/python3.11/asyncio/events.py";

    /// `time.sleep` in a coroutine, as CPython 3.11 runs it (trimmed).
    fn python_stack() -> Vec<Frame> {
        vec![
            native("__GI___clock_nanosleep", LIBC),
            native("time_sleep", LIBPYTHON),
            native("cfunction_vectorcall_O", LIBPYTHON),
            native("PyObject_Vectorcall", LIBPYTHON),
            python("blocking_sleep", APP, 22),
            python("handler", APP, 27),
            python("Handle._run", EVENTS, 80),
            python("<module>", APP, 42),
            native("_PyEval_EvalFrameDefault", LIBPYTHON),
            native("task_step", ASYNCIO_C),
            native("_PyEval_EvalFrameDefault", LIBPYTHON),
            native("Py_BytesMain", LIBPYTHON),
            native("__libc_start_call_main", LIBC),
            native("__libc_start_main_impl", LIBC),
            native("_start", "/root/.pyenv/versions/3.11.7/bin/python3.11"),
        ]
    }

    #[test]
    fn python_stack_folds_the_interpreter() {
        assert_eq!(
            shown(python_stack(), Frames::Folded),
            [
                "#0 __GI___clock_nanosleep (libc.so.6)",
                "… 3 interpreter frames (libpython3.11.so.1.0)",
                "#4 blocking_sleep (app.py) /srv/app/app.py:22",
                "#5 handler (app.py) /srv/app/app.py:27",
                "#6 Handle._run (events.py) /root/.pyenv/versions/3.11.7/lib/python3.11/asyncio/events.py:80",
                "#7 <module> (app.py) /srv/app/app.py:42",
                "… 7 interpreter frames (libpython3.11.so.1.0, \
                 _asyncio.cpython-311-x86_64-linux-gnu.so, libc.so.6, …)",
            ]
        );
    }

    #[test]
    fn the_flag_shows_every_frame() {
        let all = shown(python_stack(), Frames::All);
        assert_eq!(all.len(), 15, "{all:#?}");
        for (i, line) in all.iter().enumerate() {
            assert!(line.starts_with(&format!("#{i} ")), "{line}");
        }
        assert_eq!(all[2], "#2 cfunction_vectorcall_O (libpython3.11.so.1.0)");
        assert_eq!(all[14], "#14 _start (python3.11)");
    }

    #[test]
    fn c_libraries_and_extensions_stay_between_folds() {
        let stack = vec![
            native("fdatasync", LIBC),
            native(
                "sqlite3PagerCommitPhaseOne",
                "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0",
            ),
            native(
                "pysqlite_connection_commit_impl",
                "/usr/lib/python3.11/lib-dynload/_sqlite3.cpython-311-x86_64-linux-gnu.so",
            ),
            native("PyObject_Vectorcall", LIBPYTHON),
            python("save", APP, 9),
            native("_PyEval_EvalFrameDefault", LIBPYTHON),
            native(
                "compress_block",
                "/venv/lib/python3.11/site-packages/zstd.cpython-311-x86_64-linux-gnu.so",
            ),
            frame(
                0x7f00_0000_3000,
                None,
                Some("/venv/lib/python3.11/site-packages/_ext.so"),
            ),
            native("PyObject_Call", LIBPYTHON),
            python("<module>", APP, 1),
            native("Py_BytesMain", LIBPYTHON),
        ];
        assert_eq!(
            shown(stack, Frames::Folded),
            [
                "#0 fdatasync (libc.so.6)",
                "#1 sqlite3PagerCommitPhaseOne (libsqlite3.so.0)",
                "… 2 interpreter frames (_sqlite3.cpython-311-x86_64-linux-gnu.so, libpython3.11.so.1.0)",
                "#4 save (app.py) /srv/app/app.py:9",
                "… 1 interpreter frame (libpython3.11.so.1.0)",
                "#6 compress_block (zstd.cpython-311-x86_64-linux-gnu.so)",
                "#7 ?? (_ext.so)",
                "… 1 interpreter frame (libpython3.11.so.1.0)",
                "#9 <module> (app.py) /srv/app/app.py:1",
                "… 1 interpreter frame (libpython3.11.so.1.0)",
            ]
        );
    }

    #[test]
    fn native_stacks_are_shown_whole() {
        // tokio: its runtime is not the application, but nothing here is
        // interpreted, so nothing is folded.
        let server = "/opt/app/bin/server";
        let tokio = vec![
            native("clock_nanosleep", LIBC),
            native("std::thread::sleep", server),
            native("server::handler::{{closure}}", server),
            native("tokio::runtime::task::harness::poll", server),
            native(
                "tokio::runtime::scheduler::multi_thread::worker::run",
                server,
            ),
            native(
                "std::sys::pal::unix::thread::Thread::new::thread_start",
                server,
            ),
            native("start_thread", LIBC),
        ];
        let whole = shown(tokio.clone(), Frames::All);
        assert_eq!(shown(tokio, Frames::Folded), whole);
        assert_eq!(whole.len(), 7);
        // A Python process blocked before its interpreter was inspected:
        // the native frames are all there is.
        let bare: Vec<Frame> = python_stack()
            .into_iter()
            .filter(|f| f.kind == crate::event::FrameKind::Native)
            .collect();
        assert_eq!(
            shown(bare.clone(), Frames::Folded),
            shown(bare, Frames::All)
        );
    }

    #[test]
    fn node_stack_folds_v8_and_libuv() {
        let node = "/usr/bin/node";
        let stack = vec![
            native("__GI___libc_read", LIBC),
            native("uv__fs_read", node),
            native("uv_fs_read", node),
            native(
                "node::fs::Read(v8::FunctionCallbackInfo<v8::Value> const&)",
                node,
            ),
            native("Builtins_CallApiCallback", node),
            frame(
                0x3e00_0000_1000,
                Some("JS:~readFileSync node:fs:441:22"),
                Some("[anon]"),
            ),
            frame(
                0x3e00_0000_2000,
                Some("JS:~handleLogin /srv/app/server.js:17:26"),
                Some("[anon]"),
            ),
            native("Builtins_InterpreterEntryTrampoline", node),
            frame(
                0x3e00_0000_3000,
                Some("LazyCompile:*route /srv/app/server.js:40:9"),
                Some("[anon]"),
            ),
            native("Builtins_JSEntryTrampoline", node),
            native(
                "v8::internal::Execution::Call(v8::internal::Isolate*)",
                node,
            ),
            native("uv_run", node),
            native("node::Start(int, char**)", node),
            native("__libc_start_call_main", LIBC),
            native("_start", node),
        ];
        assert_eq!(
            shown(stack.clone(), Frames::Folded),
            [
                "#0 __GI___libc_read (libc.so.6)",
                "… 4 interpreter frames (node)",
                "#5 JS:~readFileSync node:fs:441:22 ([anon])",
                "#6 JS:~handleLogin /srv/app/server.js:17:26 ([anon])",
                "… 1 interpreter frame (node)",
                "#8 LazyCompile:*route /srv/app/server.js:40:9 ([anon])",
                "… 6 interpreter frames (node, libc.so.6)",
            ]
        );
        assert_eq!(shown(stack, Frames::All).len(), 15);
    }
}
