//! The outputs of `blockwatch trace`: events as they happen, then a
//! summary.
//!
//! Text mode writes events with their stacks and the summary to `out`
//! (stdout). JSON mode writes exactly one JSON object per event per line
//! to `out` and nothing else, so `blockwatch trace -o json | jq` never
//! sees a stray line; the summary then goes to `diag` (stderr) with the
//! other diagnostics.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::event::{Class, Detector, Event, Frame};
use crate::settings::duration::format_duration;

/// `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Events with stacks as they happen, then a summary table.
    Text,
    /// One JSON object per event per line; the summary goes to stderr.
    Json,
}

/// Writes events and, at the end, the summary.
pub struct Reporter {
    format: OutputFormat,
    out: Box<dyn Write + Send>,
    diag: Box<dyn Write + Send>,
    summary: Summary,
    /// Stacks already announced with a verdict line.
    seen: std::collections::HashSet<u64>,
}

impl Reporter {
    /// `out` is stdout in real use, `diag` stderr.
    pub fn new(
        format: OutputFormat,
        out: Box<dyn Write + Send>,
        diag: Box<dyn Write + Send>,
    ) -> Self {
        Self {
            format,
            out,
            diag,
            summary: Summary::new(),
            seen: Default::default(),
        }
    }

    pub fn format(&self) -> OutputFormat {
        self.format
    }

    /// What has been aggregated so far.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Reports one event and adds it to the summary. The output is
    /// flushed: people pipe it into `jq` or watch it with `tail -f`.
    pub fn event(&mut self, ev: &Event) -> io::Result<()> {
        self.summary.add(ev);
        let new_stack = self.seen.insert(crate::output::verdict::stack_key(ev));
        // Strict calls repeat by the thousand: each stack is shown once,
        // all are counted in the summary.
        if ev.detector == Detector::Strict && !new_stack {
            return Ok(());
        }
        // Rendered whole before writing, so an error never leaves half a
        // line (or half a JSON object) behind.
        let bytes = match self.format {
            OutputFormat::Text => {
                let mut text = String::new();
                if new_stack {
                    text = format!("{}\n", clean(&crate::output::verdict::verdict(ev)));
                }
                text.push_str(&text_event(ev));
                text.into_bytes()
            }
            OutputFormat::Json => {
                let mut line = serde_json::to_vec(ev).map_err(io::Error::other)?;
                line.push(b'\n');
                line
            }
        };
        self.out.write_all(&bytes)?;
        self.out.flush()
    }

    /// Writes a diagnostic line to `diag`. Failing to write a diagnostic
    /// (stderr closed) is not worth stopping a trace for.
    pub fn diag(&mut self, msg: &str) {
        let _ = writeln!(self.diag, "{msg}");
        let _ = self.diag.flush();
    }

    /// Writes `header` and the summary table: to `out` in text mode, to
    /// `diag` in JSON mode (where `out` carries events only).
    pub fn finish(mut self, header: &str) -> io::Result<()> {
        let table = self.summary.render();
        match self.format {
            OutputFormat::Text => {
                // A blank line sets the summary apart from the last stack.
                let gap = if self.summary.is_empty() { "" } else { "\n" };
                write!(self.out, "{gap}{header}\n{table}\n")?;
                self.out.flush()?;
                self.diag.flush()
            }
            OutputFormat::Json => {
                write!(self.diag, "{header}\n{table}\n")?;
                self.diag.flush()?;
                self.out.flush()
            }
        }
    }
}

/// Names taken from the traced process (thread names, paths, symbols)
/// may hold control characters; they must not break the one-event-per-
/// line layout or drive the terminal.
fn clean(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_control) {
        Cow::Owned(
            s.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}

fn basename(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

/// The syscall column: its name, `-` when not in a syscall, and the
/// number for syscalls newer than our table.
fn syscall_label(ev: &Event) -> Cow<'static, str> {
    match ev.syscall {
        Some(name) => Cow::Borrowed(name),
        None if ev.syscall_nr >= 0 => Cow::Owned(format!("syscall_{}", ev.syscall_nr)),
        None => Cow::Borrowed("-"),
    }
}

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

/// `handler at app.py:42`, `?? (libfoo.so)`, or `(culprit unknown)`,
/// preceded by `in ` when there is a culprit.
fn culprit_label(culprit: Option<&Frame>) -> String {
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
fn text_event(ev: &Event) -> String {
    let mut s = format!(
        "{} {}[{}] {}/{} {} {} {} {} {}\n",
        local_time(ev.ts),
        clean(&ev.comm),
        ev.pid,
        clean(&ev.thread),
        ev.tid,
        syscall_label(ev),
        ev.class,
        format_duration(Duration::from_nanos(ev.duration_ns)),
        ev.state.as_str(),
        culprit_label(ev.culprit.as_ref()),
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

#[derive(Clone, Debug, Default)]
struct Group {
    count: u64,
    total_ns: u64,
    max_ns: u64,
    classes: BTreeSet<Class>,
}

/// Events grouped by (culprit, syscall), for the end-of-trace table.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    groups: HashMap<(String, String), Group>,
    /// Strict calls and stalls, tabled apart from the off-CPU waits.
    strict: HashMap<(String, String), Group>,
    stalls: HashMap<(String, String), Group>,
}

/// The culprit column: the function, or `<unknown>` with the module
/// when only that is known.
fn culprit_key(culprit: Option<&Frame>) -> String {
    match culprit {
        Some(Frame {
            function: Some(name),
            ..
        }) => clean(name).into_owned(),
        Some(Frame {
            module: Some(m), ..
        }) => format!("<unknown> ({})", clean(basename(m))),
        _ => "<unknown>".to_string(),
    }
}

impl Summary {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.strict.is_empty() && self.stalls.is_empty()
    }

    /// Number of events added.
    pub fn events(&self) -> u64 {
        [&self.groups, &self.strict, &self.stalls]
            .iter()
            .flat_map(|g| g.values())
            .map(|g| g.count)
            .sum()
    }

    pub fn add(&mut self, ev: &Event) {
        let key = (
            culprit_key(ev.culprit.as_ref()),
            syscall_label(ev).into_owned(),
        );
        let groups = match ev.detector {
            Detector::Offcpu => &mut self.groups,
            Detector::Strict => &mut self.strict,
            Detector::Stall => &mut self.stalls,
        };
        let g = groups.entry(key).or_default();
        g.count += 1;
        g.total_ns = g.total_ns.saturating_add(ev.duration_ns);
        g.max_ns = g.max_ns.max(ev.duration_ns);
        g.classes.insert(ev.class);
    }

    /// A table sorted by total time, most first, with a totals line; or
    /// a sentence when nothing was seen. No trailing newline.
    pub fn render(&self) -> String {
        let mut out = if self.groups.is_empty() {
            "no blocking calls over the threshold were seen".to_string()
        } else {
            render_groups(&self.groups)
        };
        if !self.strict.is_empty() {
            out.push_str(
                "\n\nstrict: blocking-class syscalls that stayed on the CPU (TOTAL: time in the calls)\n",
            );
            out.push_str(&render_groups(&self.strict));
        }
        if !self.stalls.is_empty() {
            out.push_str(
                "\n\nstalls: CPU work that kept the loop from its idle wait (TOTAL: on-CPU time)\n",
            );
            out.push_str(&render_groups(&self.stalls));
        }
        out
    }
}

/// One table of groups, sorted by total time, with a totals line.
fn render_groups(groups: &HashMap<(String, String), Group>) -> String {
    let mut groups: Vec<_> = groups.iter().collect();
    groups.sort_by(|((ca, sa), a), ((cb, sb), b)| {
        b.total_ns
            .cmp(&a.total_ns)
            .then(b.count.cmp(&a.count))
            .then(ca.cmp(cb))
            .then(sa.cmp(sb))
    });
    let fmt = |ns: u64| format_duration(Duration::from_nanos(ns));

    let mut rows: Vec<[String; 6]> = vec![[
        "TOTAL".into(),
        "COUNT".into(),
        "MAX".into(),
        "SYSCALL".into(),
        "CLASS".into(),
        "CULPRIT".into(),
    ]];
    let (mut total, mut count, mut max) = (0u64, 0u64, 0u64);
    for ((culprit, syscall), g) in groups {
        total = total.saturating_add(g.total_ns);
        count = count.saturating_add(g.count);
        max = max.max(g.max_ns);
        // A culprit's reads can hit files and sockets alike.
        let classes: Vec<&str> = g.classes.iter().map(|c| c.as_str()).collect();
        rows.push([
            fmt(g.total_ns),
            g.count.to_string(),
            fmt(g.max_ns),
            syscall.clone(),
            classes.join("/"),
            culprit.clone(),
        ]);
    }
    rows.push([
        fmt(total),
        count.to_string(),
        fmt(max),
        String::new(),
        String::new(),
        "(total)".into(),
    ]);

    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let lines: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{:>w0$}  {:>w1$}  {:>w2$}  {:<w3$}  {:<w4$}  {}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                r[5],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3],
                w4 = widths[4],
            )
        })
        .collect();
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::OffState;
    use std::sync::{Arc, Mutex};

    /// A writer whose bytes only become visible on flush, so tests see
    /// whether the reporter flushed.
    #[derive(Clone, Default)]
    struct Sink {
        pending: Arc<Mutex<Vec<u8>>>,
        flushed: Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.pending.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            let mut p = self.pending.lock().unwrap();
            self.flushed.lock().unwrap().append(&mut p);
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.flushed.lock().unwrap().clone()).unwrap()
        }
        fn unflushed(&self) -> usize {
            self.pending.lock().unwrap().len()
        }
    }

    fn reporter(format: OutputFormat) -> (Reporter, Sink, Sink) {
        let (out, diag) = (Sink::default(), Sink::default());
        let r = Reporter::new(format, Box::new(out.clone()), Box::new(diag.clone()));
        (r, out, diag)
    }

    fn frame(addr: u64, function: Option<&str>, module: Option<&str>) -> Frame {
        Frame {
            address: addr,
            function: function.map(String::from),
            module: module.map(String::from),
            ..Frame::default()
        }
    }

    fn app_frame() -> Frame {
        Frame {
            file: Some("/srv/app/handlers.py".into()),
            line: Some(42),
            ..frame(
                0x5555_0000_1234,
                Some("handle_request"),
                Some("/usr/bin/python3.12"),
            )
        }
    }

    fn event(
        culprit: Option<Frame>,
        syscall: Option<&'static str>,
        nr: i64,
        class: Class,
        ms: u64,
    ) -> Event {
        Event {
            ts: UNIX_EPOCH + Duration::new(1_780_000_000, 123_456_789),
            pid: 1234,
            tid: 1240,
            comm: "python3".into(),
            thread: "MainThread".into(),
            advice: String::new(),
            syscall,
            syscall_nr: nr,
            class,
            duration_ns: ms * 1_000_000,
            state: OffState::Disk,
            stack: vec![
                frame(
                    0x7f00_0000_1000,
                    Some("__GI___libc_read"),
                    Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                ),
                frame(0x7f00_0000_2000, None, Some("/usr/lib/libfoo.so.1")),
                Frame {
                    inlined: true,
                    ..frame(
                        0x5555_0000_1234,
                        Some("read_config"),
                        Some("/usr/bin/python3.12"),
                    )
                },
                app_frame(),
            ],
            offender: culprit.clone(),
            culprit,
            detector: Default::default(),
            busy_ns: None,
            samples: None,
        }
    }

    fn read_event(ms: u64) -> Event {
        event(Some(app_frame()), Some("read"), 0, Class::File, ms)
    }

    #[test]
    fn json_line_round_trips() {
        let (mut r, out, _) = reporter(OutputFormat::Json);
        r.event(&read_event(80)).unwrap();
        let text = out.text();
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text:?}"
        );
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        let obj = v.as_object().unwrap();
        let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
        let expected: BTreeSet<&str> = [
            "ts",
            "pid",
            "tid",
            "comm",
            "thread",
            "syscall",
            "syscall_nr",
            "class",
            "duration_ns",
            "state",
            "stack",
            "culprit",
            "offender",
            "advice",
            "detector",
        ]
        .into();
        assert_eq!(keys, expected);
        assert_eq!(v["ts"], "2026-05-28T20:26:40.123456Z");
        assert_eq!(v["pid"], 1234);
        assert_eq!(v["tid"], 1240);
        assert_eq!(v["comm"], "python3");
        assert_eq!(v["thread"], "MainThread");
        assert_eq!(v["syscall"], "read");
        assert_eq!(v["syscall_nr"], 0);
        assert_eq!(v["class"], "file");
        assert_eq!(v["duration_ns"], 80_000_000);
        assert_eq!(v["state"], "disk");

        let stack = v["stack"].as_array().unwrap();
        assert_eq!(stack.len(), 4);
        let frame_keys = |f: &serde_json::Value| -> BTreeSet<String> {
            f.as_object().unwrap().keys().cloned().collect()
        };
        let bare: BTreeSet<String> = ["address", "function", "module"].map(String::from).into();
        assert_eq!(frame_keys(&stack[0]), bare);
        assert_eq!(stack[0]["address"], "0x7f0000001000");
        assert_eq!(stack[0]["function"], "__GI___libc_read");
        assert_eq!(stack[0]["module"], "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(frame_keys(&stack[1]), bare);
        assert!(stack[1]["function"].is_null());
        assert_eq!(stack[2]["inlined"], true);
        let mut located = bare.clone();
        located.extend(["file".to_string(), "line".to_string()]);
        assert_eq!(frame_keys(&stack[3]), located);
        assert_eq!(stack[3]["file"], "/srv/app/handlers.py");
        assert_eq!(stack[3]["line"], 42);

        assert_eq!(v["culprit"]["function"], "handle_request");
        assert_eq!(v["culprit"]["line"], 42);

        r.event(&event(None, None, -1, Class::Other, 12)).unwrap();
        let second = out.text().lines().nth(1).unwrap().to_string();
        let v: serde_json::Value = serde_json::from_str(&second).unwrap();
        assert!(v["culprit"].is_null());
        assert!(v["syscall"].is_null());
        assert_eq!(v["syscall_nr"], -1);
    }

    #[test]
    fn json_mode_writes_only_events_to_out() {
        let (mut r, out, diag) = reporter(OutputFormat::Json);
        r.diag("blockwatch: watching pid 1234");
        for ms in [80, 20, 300] {
            r.event(&read_event(ms)).unwrap();
            assert_eq!(out.unflushed(), 0, "event not flushed");
        }
        r.event(&event(None, Some("futex"), 202, Class::Lock, 50))
            .unwrap();
        r.diag("blockwatch: warning: 3 stacks were lost");
        r.finish("blockwatch: 4 blocking calls in 5.0s on 1 threads")
            .unwrap();

        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        for line in lines {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["pid"], 1234);
        }
        assert_eq!(out.unflushed(), 0);

        let d = diag.text();
        assert!(d.starts_with("blockwatch: watching pid 1234\n"), "{d}");
        assert!(d.contains("3 stacks were lost"));
        assert!(d.contains("blockwatch: 4 blocking calls in 5.0s on 1 threads\n"));
        assert!(d.contains("TOTAL") && d.contains("handle_request"), "{d}");
        assert_eq!(diag.unflushed(), 0);
    }

    #[test]
    fn text_mode_event_lines() {
        let (mut r, out, diag) = reporter(OutputFormat::Text);
        r.event(&read_event(80)).unwrap();
        assert_eq!(out.unflushed(), 0, "event not flushed");
        let text = out.text();
        let all: Vec<&str> = text.lines().collect();
        assert_eq!(all.len(), 6, "{text}");
        // A new stack is announced with its verdict first.
        assert!(all[0].starts_with("blocking file (read, 80.0ms) on the event loop of python3[1234] in handle_request()"), "{text}");
        let lines = &all[1..];
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
        assert!(diag.text().is_empty());
    }

    #[test]
    fn a_stack_is_announced_once() {
        let (mut r, out, _) = reporter(OutputFormat::Text);
        r.event(&read_event(80)).unwrap();
        r.event(&read_event(30)).unwrap();
        let text = out.text();
        assert_eq!(text.matches("on the event loop of").count(), 1, "{text}");
    }

    #[test]
    fn text_mode_unknown_culprit_and_syscall() {
        let (mut r, out, _) = reporter(OutputFormat::Text);
        let mut ev = event(None, None, -1, Class::Other, 15);
        ev.state = OffState::Preempted;
        ev.stack.clear();
        r.event(&ev).unwrap();
        let text = out.text();
        let mut lines = text.lines().skip(1);
        let head = lines.next().unwrap();
        assert!(
            head.ends_with(
                " python3[1234] MainThread/1240 - other 15.0ms preempted (culprit unknown)"
            ),
            "{head}"
        );
        assert_eq!(lines.next(), Some("    (no stack)"));

        let ev = event(
            Some(frame(0x1000, None, Some("/lib/libz.so"))),
            None,
            470,
            Class::Other,
            15,
        );
        r.event(&ev).unwrap();
        let text = out.text();
        let head = text.lines().nth(4).unwrap();
        assert!(head.contains(" syscall_470 other "), "{head}");
        assert!(head.ends_with(" in ?? (libz.so)"), "{head}");
    }

    #[test]
    fn text_mode_neutralises_control_characters() {
        let (mut r, out, _) = reporter(OutputFormat::Text);
        let mut ev = read_event(20);
        ev.thread = "evil\nthread\x1b[31m".into();
        ev.stack[0].function = Some("f\r\ng".into());
        r.event(&ev).unwrap();
        let text = out.text();
        assert_eq!(text.lines().count(), 6, "{text}");
        assert!(text.contains("evil?thread?[31m/1240"), "{text}");
        assert!(text.contains("f??g"), "{text}");
        assert!(!text.contains('\x1b'));
    }

    #[test]
    fn text_mode_summary_goes_to_out() {
        let (mut r, out, diag) = reporter(OutputFormat::Text);
        r.event(&read_event(80)).unwrap();
        r.diag("blockwatch: warning: something");
        r.finish("blockwatch: 1 blocking calls in 1.0s on 1 threads")
            .unwrap();
        let text = out.text();
        assert!(
            text.contains("\n\nblockwatch: 1 blocking calls in 1.0s on 1 threads\n"),
            "{text}"
        );
        assert!(
            text.contains("TOTAL") && text.ends_with("(total)\n"),
            "{text}"
        );
        assert_eq!(diag.text(), "blockwatch: warning: something\n");
    }

    #[test]
    fn empty_finish() {
        let (r, out, _) = reporter(OutputFormat::Text);
        r.finish("blockwatch: 0 blocking calls").unwrap();
        assert_eq!(
            out.text(),
            "blockwatch: 0 blocking calls\nno blocking calls over the threshold were seen\n"
        );
        let (r, out, diag) = reporter(OutputFormat::Json);
        r.finish("blockwatch: 0 blocking calls").unwrap();
        assert!(out.text().is_empty());
        assert!(
            diag.text()
                .ends_with("no blocking calls over the threshold were seen\n")
        );
    }

    #[test]
    fn summary_empty() {
        let s = Summary::new();
        assert!(s.is_empty());
        assert_eq!(s.render(), "no blocking calls over the threshold were seen");
    }

    #[test]
    fn summary_groups_sorts_and_totals() {
        let mut s = Summary::new();
        // handle_request/read: 3 events, 30ms total, 15ms max.
        for ms in [10, 15, 5] {
            s.add(&read_event(ms));
        }
        // Same culprit, another syscall: a group of its own.
        s.add(&event(
            Some(app_frame()),
            Some("fsync"),
            74,
            Class::File,
            20,
        ));
        // No culprit: 1 event of 100ms, the largest total.
        s.add(&event(None, Some("futex"), 202, Class::Lock, 100));
        // Culprit with only a module.
        s.add(&event(
            Some(frame(1, None, Some("/usr/lib/libfoo.so.1"))),
            Some("nanosleep"),
            35,
            Class::Sleep,
            1,
        ));
        // The same read culprit on a socket: classes are merged.
        s.add(&event(Some(app_frame()), Some("read"), 0, Class::Net, 2));
        assert_eq!(s.events(), 7);

        let table = s.render();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 6, "{table}");
        let cells = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            cells(lines[0]),
            ["TOTAL", "COUNT", "MAX", "SYSCALL", "CLASS", "CULPRIT"]
        );
        assert_eq!(
            cells(lines[1]),
            ["100ms", "1", "100ms", "futex", "lock", "<unknown>"]
        );
        assert_eq!(
            cells(lines[2]),
            [
                "32.0ms",
                "4",
                "15.0ms",
                "read",
                "file/net",
                "handle_request"
            ]
        );
        assert_eq!(
            cells(lines[3]),
            ["20.0ms", "1", "20.0ms", "fsync", "file", "handle_request"]
        );
        assert_eq!(
            cells(lines[4]),
            [
                "1.00ms",
                "1",
                "1.00ms",
                "nanosleep",
                "sleep",
                "<unknown>",
                "(libfoo.so.1)"
            ]
        );
        assert_eq!(cells(lines[5]), ["153ms", "7", "100ms", "(total)"]);

        // Columns line up: every CULPRIT cell starts where its header does.
        let col = lines[0].find("CULPRIT").unwrap();
        for l in &lines[1..] {
            assert!(
                l[..col].ends_with("  ") && !l[col..].starts_with(' '),
                "{l:?}"
            );
        }
        // Numbers are right-aligned under their headers.
        let count_end = lines[0].find("COUNT").unwrap() + "COUNT".len();
        for l in &lines[1..] {
            assert!(l.as_bytes()[count_end - 1].is_ascii_digit(), "{l:?}");
        }
        assert!(table.lines().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn summary_ties_are_deterministic() {
        let mut a = Summary::new();
        let mut b = Summary::new();
        let evs = [
            event(
                Some(frame(1, Some("zeta"), None)),
                Some("read"),
                0,
                Class::File,
                10,
            ),
            event(
                Some(frame(1, Some("alpha"), None)),
                Some("read"),
                0,
                Class::File,
                10,
            ),
            event(
                Some(frame(1, Some("alpha"), None)),
                Some("write"),
                1,
                Class::File,
                10,
            ),
        ];
        for e in &evs {
            a.add(e);
        }
        for e in evs.iter().rev() {
            b.add(e);
        }
        assert_eq!(a.render(), b.render());
        let table = a.render();
        let order: Vec<&str> = table
            .lines()
            .skip(1)
            .take(3)
            .map(|l| l.rsplit(' ').next().unwrap())
            .collect();
        assert_eq!(order, ["alpha", "alpha", "zeta"]);
        assert!(table.lines().nth(1).unwrap().contains(" read "));
    }

    #[test]
    fn summary_saturates_instead_of_overflowing() {
        let mut s = Summary::new();
        let mut ev = read_event(0);
        ev.duration_ns = u64::MAX;
        s.add(&ev);
        s.add(&ev);
        assert!(s.render().contains("(total)"));
    }

    #[test]
    fn output_format_values() {
        use clap::ValueEnum;
        let names: Vec<String> = OutputFormat::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        assert_eq!(names, ["text", "json"]);
        assert_eq!(
            OutputFormat::from_str("json", false),
            Ok(OutputFormat::Json)
        );
    }
}

#[cfg(test)]
mod loop_report_tests {
    use super::*;
    use crate::event::OffState;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Buf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn ev(detector: Detector, function: &str, syscall: Option<&'static str>, us: u64) -> Event {
        let f = Frame {
            address: 0x1000,
            function: Some(function.into()),
            file: Some("app.py".into()),
            line: Some(7),
            ..Frame::default()
        };
        Event {
            ts: UNIX_EPOCH,
            pid: 5,
            tid: 5,
            comm: "python3".into(),
            thread: "python3".into(),
            advice: String::new(),
            syscall,
            syscall_nr: if syscall.is_some() { 257 } else { -1 },
            class: if detector == Detector::Stall {
                Class::Stall
            } else {
                Class::File
            },
            duration_ns: us * 1000,
            state: OffState::Running,
            stack: vec![f.clone()],
            culprit: Some(f.clone()),
            offender: Some(f),
            detector,
            busy_ns: (detector == Detector::Stall).then_some(us * 1500),
            samples: (detector == Detector::Stall).then_some(12),
        }
    }

    #[test]
    fn strict_calls_are_shown_once_per_stack_and_all_counted() {
        for format in [OutputFormat::Text, OutputFormat::Json] {
            let (out, diag) = (Buf::default(), Buf::default());
            let mut r = Reporter::new(format, Box::new(out.clone()), Box::new(diag.clone()));
            for _ in 0..5 {
                r.event(&ev(Detector::Strict, "load", Some("openat"), 10))
                    .unwrap();
            }
            r.event(&ev(Detector::Strict, "other", Some("openat"), 10))
                .unwrap();
            r.event(&ev(Detector::Stall, "hog", None, 300_000)).unwrap();
            r.event(&ev(Detector::Stall, "hog", None, 200_000)).unwrap();
            assert_eq!(r.summary().events(), 8);
            r.finish("blockwatch: done").unwrap();
            let (out, diag) = (out.text(), diag.text());
            if format == OutputFormat::Json {
                let lines: Vec<serde_json::Value> = out
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
                // 2 strict stacks, each stall.
                assert_eq!(lines.len(), 4, "{out}");
                assert_eq!(lines[0]["detector"], "strict");
                assert_eq!(lines[0]["state"], "running");
                assert!(lines[0].get("busy_ns").is_none());
                assert_eq!(lines[2]["detector"], "stall");
                assert_eq!(lines[2]["class"], "stall");
                assert_eq!(lines[2]["busy_ns"], 450_000_000u64);
                assert_eq!(lines[2]["samples"], 12);
                assert!(diag.contains("strict: "), "{diag}");
            } else {
                assert_eq!(out.matches("[strict: first call").count(), 2, "{out}");
                assert_eq!(
                    out.matches("[stall: busy 450ms, 12 stack samples]").count(),
                    1
                );
                let summary = out.split("blockwatch: done\n").nth(1).unwrap();
                let lines: Vec<&str> = summary.lines().collect();
                assert_eq!(lines[0], "no blocking calls over the threshold were seen");
                let strict = lines
                    .iter()
                    .position(|l| l.starts_with("strict: "))
                    .unwrap();
                let cells: Vec<&str> = lines[strict + 2].split_whitespace().collect();
                assert_eq!(cells, ["50.0us", "5", "10.0us", "openat", "file", "load"]);
                let stalls = lines
                    .iter()
                    .position(|l| l.starts_with("stalls: "))
                    .unwrap();
                let cells: Vec<&str> = lines[stalls + 2].split_whitespace().collect();
                assert_eq!(cells, ["500ms", "2", "300ms", "-", "stall", "hog"]);
            }
        }
    }
}
