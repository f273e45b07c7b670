//! `--output json`'s lines, written by hand. serde_json's derived
//! serializer was a good part of the CPU an event cost at 100,000 events
//! a second (a `String` for every address, a call through the serializer's
//! state machine for every field); this writes the same bytes straight
//! into one buffer. [`Event`]'s serde form stays the schema: a unit test
//! holds the two byte for byte, so a field added to one and not the other
//! fails it.

use std::io::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::event::{Episode, Event, Frame, FrameKind};

/// Appends `ev` as one JSON object (no newline) to `out`, byte for byte
/// what `serde_json::to_vec(ev)` writes.
pub fn write_event(out: &mut Vec<u8>, ev: &Event) {
    out.extend_from_slice(b"{\"ts\":\"");
    // The timestamp needs no escaping: digits and separators only.
    timestamp(out, ev.ts);
    out.extend_from_slice(b"\",\"pid\":");
    int(out, ev.pid);
    out.extend_from_slice(b",\"tid\":");
    int(out, ev.tid);
    out.extend_from_slice(b",\"comm\":");
    string(out, &ev.comm);
    out.extend_from_slice(b",\"thread\":");
    string(out, &ev.thread);
    out.extend_from_slice(b",\"syscall\":");
    opt_string(out, ev.syscall);
    out.extend_from_slice(b",\"syscall_nr\":");
    int(out, ev.syscall_nr);
    out.extend_from_slice(b",\"class\":\"");
    out.extend_from_slice(ev.class.as_str().as_bytes());
    out.extend_from_slice(b"\",\"duration_ns\":");
    int(out, ev.duration_ns);
    out.extend_from_slice(b",\"state\":\"");
    out.extend_from_slice(ev.state.as_str().as_bytes());
    out.extend_from_slice(b"\",\"stack\":");
    // Kept with the stack: a call site's every event has the same frames.
    out.extend_from_slice(ev.stack.json());
    // Nearly always the stack's own culprit and offender, whose JSON the
    // stack keeps; a detector may name another (a stall's samples).
    out.extend_from_slice(b",\"culprit\":");
    if ev.culprit == *ev.stack.culprit() {
        out.extend_from_slice(ev.stack.culprit_json());
    } else {
        write_frame(out, ev.culprit.as_ref());
    }
    out.extend_from_slice(b",\"offender\":");
    if ev.offender == *ev.stack.offender() {
        out.extend_from_slice(ev.stack.offender_json());
    } else {
        write_frame(out, ev.offender.as_ref());
    }
    out.extend_from_slice(b",\"advice\":");
    string(out, &ev.advice);
    out.extend_from_slice(b",\"detector\":\"");
    out.extend_from_slice(ev.detector.as_str().as_bytes());
    out.push(b'"');
    if let Some(e) = &ev.episode {
        out.extend_from_slice(b",\"episode\":");
        episode(out, e);
    }
    out.push(b'}');
}

/// [`crate::event::format_rfc3339`] written in place: `fmt` and its
/// calendar took a few percent of blockwatch's time per event.
fn timestamp(out: &mut Vec<u8>, t: SystemTime) {
    // A time before the epoch (a clock stepped back) is shown as the epoch.
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    if secs > LAST_4_DIGIT_YEAR {
        let _ = write!(out, "{}", crate::event::rfc3339_display(t));
        return;
    }
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    digits(out, year, 4);
    out.push(b'-');
    digits(out, month, 2);
    out.push(b'-');
    digits(out, day, 2);
    out.push(b'T');
    digits(out, of_day / 3600, 2);
    out.push(b':');
    digits(out, of_day / 60 % 60, 2);
    out.push(b':');
    digits(out, of_day % 60, 2);
    out.push(b'.');
    digits(out, u64::from(d.subsec_micros()), 6);
    out.push(b'Z');
}

/// 9999-12-31T23:59:59Z: later times do not fit the format's year.
const LAST_4_DIGIT_YEAR: u64 = 253_402_300_799;

/// Whether any byte of `bytes` is a control character, `"` or `\\`.
fn needs_escape(bytes: &[u8]) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // A byte of `x` is zero: its high bit is set in `zero(x)` (bytes over
    // 0x80 of `x` itself are masked off by `!x`).
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGHS;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let x = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        // Below 0x20: subtracting 0x20 borrows into the high bit (which
        // bytes of 0x80 and over had set already, hence `!x`).
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
        if control | zero(x ^ (ONES * u64::from(b'"'))) | zero(x ^ (ONES * u64::from(b'\\'))) != 0 {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// `v` in exactly `width` decimal digits (`v` fits them).
fn digits(out: &mut Vec<u8>, v: u64, width: u32) {
    let mut div = 10u64.pow(width - 1);
    while div > 0 {
        out.push(b'0' + (v / div % 10) as u8);
        div /= 10;
    }
}

/// (year, month, day) of the `days`-th day after 1970-01-01, in the
/// proleptic Gregorian calendar (the civil-from-days algorithm, on
/// 400-year eras).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A stack's frames as a JSON array: the part of a line that repeats
/// from event to event of one call site, which [`crate::event::Stack`]
/// keeps once rendered.
pub fn write_frames(out: &mut Vec<u8>, frames: &[Frame]) {
    out.push(b'[');
    for (i, f) in frames.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        frame(out, f);
    }
    out.push(b']');
}

/// A frame object, or `null`.
pub fn write_frame(out: &mut Vec<u8>, f: Option<&Frame>) {
    match f {
        Some(f) => frame(out, f),
        None => out.extend_from_slice(b"null"),
    }
}

fn frame(out: &mut Vec<u8>, f: &Frame) {
    let _ = write!(out, "{{\"address\":\"{:#x}\",\"function\":", f.address);
    opt_string(out, f.function.as_deref());
    out.extend_from_slice(b",\"module\":");
    opt_string(out, f.module.as_deref());
    if let Some(file) = &f.file {
        out.extend_from_slice(b",\"file\":");
        string(out, file);
    }
    if let Some(line) = f.line {
        out.extend_from_slice(b",\"line\":");
        int(out, line);
    }
    if f.inlined {
        out.extend_from_slice(b",\"inlined\":true");
    }
    if f.kind == FrameKind::Python {
        out.extend_from_slice(b",\"kind\":\"python\"");
    }
    out.push(b'}');
}

fn episode(out: &mut Vec<u8>, e: &Episode) {
    let fields: [(&[u8], u64); 7] = [
        (b"{\"cpu_ns\":", e.cpu_ns),
        (b",\"sleeping_ns\":", e.sleeping_ns),
        (b",\"disk_ns\":", e.disk_ns),
        (b",\"preempted_ns\":", e.preempted_ns),
        (b",\"waits\":", e.waits.into()),
        (b",\"longest_wait_ns\":", e.longest_wait_ns),
        (b",\"samples\":", e.samples.into()),
    ];
    for (key, value) in fields {
        out.extend_from_slice(key);
        int(out, value);
    }
    out.push(b'}');
}

fn int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// serde_json's escaping: `"`, `\` and the C0 controls, the common ones
/// by letter and the rest as `\u00XX` in lower case; everything else,
/// DEL and non-ASCII included, as it is.
fn string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    // Names and advice nearly never need escaping: found out eight bytes
    // at a time, they are copied whole.
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x09 => b't',
            0x0a => b'n',
            0x0c => b'f',
            0x0d => b'r',
            0x00..=0x1f => b'u',
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        start = i + 1;
        if short == b'u' {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.push(b'\\');
            out.push(short);
        }
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Class, Detector, OffState};
    use crate::output::fixtures::{app_frame, event, frame, read_event};
    use std::time::Duration;

    #[test]
    fn escaping_is_found_at_every_position() {
        // Each special byte, at each offset of a 17-byte string (two whole
        // chunks and a remainder), beside bytes over 0x80 (UTF-8), which
        // must not pass for controls.
        for special in (0u8..0x20).chain([b'"', b'\\']) {
            for at in 0..17 {
                let mut b = "é-abcdefghijklmn".as_bytes().to_vec();
                b[at] = special;
                assert!(needs_escape(&b), "{special:#x} at {at}");
            }
        }
        for ok in [
            "",
            "a",
            "python3",
            "é€𝄞 ~\x7f!#/<>",
            "move the blocking sleep call (time.sleep) off the loop",
        ] {
            assert!(!needs_escape(ok.as_bytes()), "{ok}");
        }
        let mut out = Vec::new();
        string(&mut out, "tab\there \"q\" \\ \u{1}é");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#""tab\there \"q\" \\ \u0001é""#
        );
    }

    #[test]
    fn timestamps_match_the_calendar_formatter() {
        // Days across leap years, century rules (2000, 2100), year ends,
        // and a pseudo-random spread up to the last 4-digit year; every
        // microsecond digit and the epoch itself.
        let mut secs: Vec<u64> = vec![
            0,
            59,
            86_399,
            951_782_400,   // 2000-02-29
            4_107_542_400, // 2100-03-01
            1_798_761_599, // 2026-12-31T23:59:59
            super::LAST_4_DIGIT_YEAR,
        ];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            secs.push(x % (super::LAST_4_DIGIT_YEAR + 1));
        }
        for (i, s) in secs.into_iter().enumerate() {
            let t = UNIX_EPOCH + Duration::new(s, (i as u32 * 7_919_113) % 1_000_000_000);
            let mut ours = Vec::new();
            timestamp(&mut ours, t);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                crate::event::format_rfc3339(t),
                "{s}"
            );
        }
        // Before the epoch: the epoch, as the serde form says.
        let mut before = Vec::new();
        timestamp(&mut before, UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(before, b"1970-01-01T00:00:00.000000Z");
    }

    fn both(ev: &Event) {
        let mut ours = Vec::new();
        write_event(&mut ours, ev);
        let serde = serde_json::to_vec(ev).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&serde)
        );
    }

    #[test]
    fn events_are_written_as_serde_writes_them() {
        both(&read_event(80));
        both(&event(None, None, -1, Class::Other, 3));
        let mut stall = read_event(12);
        stall.detector = Detector::Stall;
        stall.state = OffState::Preempted;
        stall.ts = UNIX_EPOCH + Duration::new(1_780_000_000, 999_999_999);
        stall.episode = Some(Episode {
            cpu_ns: 1,
            sleeping_ns: u64::MAX,
            disk_ns: 0,
            preempted_ns: 7,
            waits: u32::MAX,
            longest_wait_ns: 3,
            samples: 12,
        });
        stall.syscall_nr = i64::MIN;
        let mut py = app_frame();
        py.kind = FrameKind::Python;
        py.line = None;
        py.inlined = true;
        stall.stack = vec![py.clone(), frame(0, None, None)].into();
        stall.culprit = Some(py);
        stall.offender = None;
        both(&stall);
    }

    #[test]
    fn strings_are_escaped_as_serde_escapes_them() {
        let mut ev = read_event(80);
        let nasty: String = (0u8..0x80).map(char::from).collect::<String>()
            + "\"quoted\" back\\slash é ✓ 🦀 \u{7f}\u{80}\u{2028}";
        ev.comm = nasty.clone();
        ev.thread = "\t\n\r\u{8}\u{c}\u{0}\u{1f}".into();
        ev.advice = nasty.clone();
        let mut f = frame(u64::MAX, Some(&nasty), Some("/odd \"path\"\n"));
        f.file = Some(nasty.clone());
        f.line = Some(u32::MAX);
        ev.stack = vec![f.clone(), frame(1, Some(""), Some(""))].into();
        ev.culprit = Some(f);
        both(&ev);
    }

    #[test]
    fn a_stacks_own_culprit_and_offender_are_written_from_its_cache() {
        let mut ev = read_event(80);
        // A library's frame is the culprit, the user's line that called it
        // the offender: two frames, so that neither's kept JSON can stand
        // in for the other's.
        let mut user = frame(
            0x5555_0000_4321,
            Some("refresh"),
            Some("/srv/app/report.py"),
        );
        user.file = Some("/srv/app/report.py".into());
        user.line = Some(7);
        ev.stack = vec![
            frame(
                0x7f00_0000_1000,
                Some("__poll"),
                Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            ),
            frame(
                0x7f00_0000_2000,
                Some("send"),
                Some("/srv/venv/lib/python3.11/site-packages/requests/adapters.py"),
            ),
            user,
        ]
        .into();
        ev.culprit = ev.stack.culprit().clone();
        ev.offender = ev.stack.offender().clone();
        assert!(
            ev.culprit.is_some() && ev.offender.is_some() && ev.culprit != ev.offender,
            "the stack names a culprit and another offender: {:?} {:?}",
            ev.culprit,
            ev.offender
        );
        // Twice: the second line comes from the kept JSON.
        both(&ev);
        both(&ev);
        // Another event of the same stack naming other frames writes those.
        let mut other = ev.clone();
        other.culprit = Some(frame(0x42, Some("elsewhere"), Some("/lib/x.so")));
        other.offender = None;
        both(&other);
        both(&ev);
    }
}
