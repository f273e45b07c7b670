//! The outputs of `blockwatch trace`: events as they happen, then a
//! summary. [`Reporter`] dispatches on `--output`: each event goes out as
//! text ([`crate::output::text`]) after its stack's verdict line, or as
//! one line of JSON (the schema is [`Event`]'s serde form); every event
//! feeds the [`Summary`].
//!
//! Text mode writes events with their stacks and the summary to `out`
//! (stdout). JSON mode writes exactly one JSON object per event per line
//! to `out` and nothing else, so `blockwatch trace -o json | jq` never
//! sees a stray line; the summary then goes to `diag` (stderr) with the
//! other diagnostics.

use std::io::{self, Write};

use crate::event::{Detector, Event};
use crate::output::summary::Summary;
use crate::output::{json, text, verdict};
use crate::pipeline::strict::StrictCalls;
use crate::text::scrub as clean;

/// `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Events with stacks as they happen, then a summary table.
    Text,
    /// One JSON object per event per line; the summary goes to stderr.
    Json,
}

/// Bytes of events at which they are written before the drain ends (the
/// event that crosses it included).
const OUT_BUFFER: usize = 256 * 1024;

/// Writes events and, at the end, the summary.
pub struct Reporter {
    format: OutputFormat,
    out: Box<dyn Write + Send>,
    /// Events not yet written to `out`: written at [`Reporter::flush`]
    /// (one write a drain of the ring buffer rather than one an event, a
    /// system call saved on each of 100,000 events a second), or once it
    /// holds `OUT_BUFFER` bytes. Events are rendered straight into it:
    /// through a line buffer first, each event's kilobyte or so was copied
    /// once more.
    pending: Vec<u8>,
    diag: Box<dyn Write + Send>,
    summary: Summary,
    /// Stacks already announced with a verdict line.
    seen: crate::FastSet<u64>,
    /// Which frames the text shows; JSON has them all.
    frames: text::Frames,
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
            pending: Vec::new(),
            diag,
            summary: Summary::new(),
            seen: Default::default(),
            frames: text::Frames::Folded,
        }
    }

    /// Text shows every frame of interpreted stacks (`--all-frames`)
    /// rather than folding the interpreter's own.
    pub fn all_frames(mut self, all: bool) -> Self {
        self.frames = if all {
            text::Frames::All
        } else {
            text::Frames::Folded
        };
        self
    }

    pub fn format(&self) -> OutputFormat {
        self.format
    }

    /// What has been aggregated so far.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Adds the calls the kernel counted at one strict call site to the
    /// summary; the site's stack is shown by its own event.
    pub fn strict_calls(&mut self, c: &StrictCalls) {
        self.summary.add_strict(c);
    }

    /// Reports one event and adds it to the summary. It is written by the
    /// next [`Reporter::flush`], which the session calls once it has
    /// handled what the ring buffer held.
    pub fn event(&mut self, ev: &Event) -> io::Result<()> {
        self.summary.add(ev);
        let new_stack = self.seen.insert(verdict::stack_key(ev));
        // A strict call site's event comes once per site, and sites of one
        // stack (other threads, other depths) are shown once; the calls
        // are counted in the summary (`strict_calls`).
        if ev.detector == Detector::Strict && !new_stack {
            return Ok(());
        }
        // An event is rendered whole before anything is written, so an
        // error never leaves half a line (or half a JSON object) behind.
        match self.format {
            OutputFormat::Text => {
                if new_stack {
                    self.pending
                        .extend_from_slice(clean(&verdict::verdict(ev)).as_bytes());
                    self.pending.push(b'\n');
                }
                self.pending
                    .extend_from_slice(text::event(ev, self.frames).as_bytes());
            }
            OutputFormat::Json => {
                json::write_event(&mut self.pending, ev);
                self.pending.push(b'\n');
            }
        }
        if self.pending.len() >= OUT_BUFFER {
            return self.flush();
        }
        Ok(())
    }

    /// Writes the events reported so far: people pipe them into `jq` or
    /// watch them with `tail -f`, so a session calls this whenever it has
    /// caught up with the kernel.
    pub fn flush(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            // Cleared even on an error: the session ends on it, and what
            // could not be written is not written twice.
            let written = self.out.write_all(&self.pending);
            self.pending.clear();
            written?;
        }
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
                write!(self.pending, "{gap}{header}\n{table}\n")?;
                self.flush()?;
                self.diag.flush()
            }
            OutputFormat::Json => {
                write!(self.diag, "{header}\n{table}\n")?;
                self.diag.flush()?;
                self.flush()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::event::{Class, Episode, Frame, OffState};
    use crate::output::fixtures::{Sink, event, frame, read_event};

    fn reporter(format: OutputFormat) -> (Reporter, Sink, Sink) {
        let (out, diag) = (Sink::default(), Sink::default());
        let r = Reporter::new(format, Box::new(out.clone()), Box::new(diag.clone()));
        (r, out, diag)
    }

    /// A strict call (`us` in the call) or a stall (`us` on the CPU) in
    /// `function` at app.py:7.
    fn loop_event(
        detector: Detector,
        function: &str,
        syscall: Option<&'static str>,
        us: u64,
    ) -> Event {
        let f = Frame {
            file: Some("app.py".into()),
            line: Some(7),
            ..frame(0x1000, Some(function), None)
        };
        let stall = detector == Detector::Stall;
        let class = if stall { Class::Stall } else { Class::File };
        Event {
            ts: UNIX_EPOCH,
            syscall_nr: if syscall.is_some() { 257 } else { -1 },
            duration_ns: us * 1000,
            state: OffState::Running,
            stack: vec![f.clone()].into(),
            detector,
            episode: stall.then(|| Episode {
                cpu_ns: us * 1000,
                samples: 12,
                ..Episode::default()
            }),
            ..event(Some(f), syscall, 0, class, 0)
        }
    }

    #[test]
    fn json_line_round_trips() {
        let (mut r, out, _) = reporter(OutputFormat::Json);
        r.event(&read_event(80)).unwrap();
        r.flush().unwrap();
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
        r.flush().unwrap();
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
        }
        assert!(out.text().is_empty(), "events wait for the flush");
        r.flush().unwrap();
        assert_eq!(out.text().lines().count(), 3);
        assert_eq!(out.unflushed(), 0, "events not flushed");
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
        r.flush().unwrap();
        assert_eq!(out.unflushed(), 0, "event not flushed");
        let text = out.text();
        let all: Vec<&str> = text.lines().collect();
        assert_eq!(all.len(), 6, "{text}");
        // A new stack is announced with its verdict first.
        assert!(all[0].starts_with("blocking file (read, 80.0ms) on the event loop of python3[1234] in handle_request()"), "{text}");
        // Then the event as text::event writes it.
        assert_eq!(
            text.split_once('\n').unwrap().1,
            text::event(&read_event(80), text::Frames::Folded)
        );
        assert!(diag.text().is_empty());
    }

    #[test]
    fn all_frames_reaches_the_text_and_json_keeps_every_frame() {
        let libpython = "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0";
        let mut ev = read_event(80);
        ev.stack = vec![
            frame(0x1000, Some("time_sleep"), Some(libpython)),
            Frame {
                kind: crate::event::FrameKind::Python,
                ..frame(0x2000, Some("handler"), Some("/srv/app.py"))
            },
            frame(0x3000, Some("_PyEval_EvalFrameDefault"), Some(libpython)),
        ]
        .into();
        for (all, format, shown) in [
            (false, OutputFormat::Text, false),
            (true, OutputFormat::Text, true),
            (false, OutputFormat::Json, true),
        ] {
            let (r, out, _) = reporter(format);
            let mut r = r.all_frames(all);
            r.event(&ev).unwrap();
            r.flush().unwrap();
            let text = out.text();
            assert_eq!(text.contains("_PyEval_EvalFrameDefault"), shown, "{text}");
            assert!(text.contains("handler"), "{text}");
        }
    }

    #[test]
    fn a_stack_is_announced_once() {
        let (mut r, out, _) = reporter(OutputFormat::Text);
        r.event(&read_event(80)).unwrap();
        r.event(&read_event(30)).unwrap();
        r.flush().unwrap();
        let text = out.text();
        assert_eq!(text.matches("on the event loop of").count(), 1, "{text}");
    }

    #[test]
    fn text_mode_neutralises_control_characters() {
        let (mut r, out, _) = reporter(OutputFormat::Text);
        let mut ev = read_event(20);
        ev.thread = "evil\nthread\x1b[31m".into();
        let mut frames = ev.stack.to_vec();
        frames[0].function = Some("f\r\ng".into());
        ev.stack = frames.into();
        r.event(&ev).unwrap();
        r.flush().unwrap();
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
            "blockwatch: 0 blocking calls\nno loop episodes over the threshold were seen\n"
        );
        let (r, out, diag) = reporter(OutputFormat::Json);
        r.finish("blockwatch: 0 blocking calls").unwrap();
        assert!(out.text().is_empty());
        assert!(
            diag.text()
                .ends_with("no loop episodes over the threshold were seen\n")
        );
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

    #[test]
    fn strict_calls_are_shown_once_per_stack_and_all_counted() {
        for format in [OutputFormat::Text, OutputFormat::Json] {
            let (mut r, out, diag) = reporter(format);
            for _ in 0..5 {
                r.event(&loop_event(Detector::Strict, "load", Some("openat"), 10))
                    .unwrap();
            }
            r.event(&loop_event(Detector::Strict, "other", Some("openat"), 10))
                .unwrap();
            // The calls come from the kernel's counts, not the events.
            assert_eq!(r.summary().events(), 0);
            for (function, calls) in [("load", 5), ("other", 1)] {
                r.strict_calls(&StrictCalls {
                    event: loop_event(Detector::Strict, function, Some("openat"), 10),
                    calls,
                    total_ns: calls * 10_000,
                    max_ns: 10_000,
                });
            }
            r.event(&loop_event(Detector::Stall, "hog", None, 300_000))
                .unwrap();
            r.event(&loop_event(Detector::Stall, "hog", None, 200_000))
                .unwrap();
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
                assert!(lines[0].get("episode").is_none());
                assert_eq!(lines[2]["detector"], "stall");
                assert_eq!(lines[2]["class"], "stall");
                assert_eq!(lines[2]["episode"]["cpu_ns"], 300_000_000u64);
                assert_eq!(lines[2]["episode"]["samples"], 12);
                assert!(diag.contains("strict: "), "{diag}");
            } else {
                assert_eq!(out.matches("[strict: first call").count(), 2, "{out}");
                assert_eq!(out.matches("[cpu 300ms, 12 samples]").count(), 1, "{out}");
                let summary = out.split("blockwatch: done\n").nth(1).unwrap();
                let lines: Vec<&str> = summary.lines().collect();
                // CPU-bound episodes are episodes: in the main table.
                assert_eq!(
                    lines[1].split_whitespace().collect::<Vec<_>>(),
                    ["500ms", "2", "300ms", "-", "stall", "hog"],
                    "{summary}"
                );
                // The first row of the table under `title`.
                let first_row = |title: &str| -> Vec<&str> {
                    let at = lines.iter().position(|l| l.starts_with(title)).unwrap();
                    lines[at + 2].split_whitespace().collect()
                };
                assert_eq!(
                    first_row("strict: "),
                    ["50.0us", "5", "10.0us", "openat", "file", "load"]
                );
            }
        }
    }
}
