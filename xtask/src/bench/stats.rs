//! Pure helpers: medians and spreads, the parsing of what the tools print
//! (wrk, blockwatch's loss warnings, the workload's JSON stream), tables.

use std::io::Write as _;

/// Bare runs further apart than this ([`spread`]) call for
/// [`WIDE_REPS`] repetitions of a section.
pub const WIDE_SPREAD: f64 = 0.05;
pub const WIDE_REPS: usize = 7;

pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// How far apart repeated runs of the same thing were: (max − min) /
/// median, the noise floor a ratio has to be read against.
pub fn spread(v: &[f64]) -> f64 {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    if v.is_empty() {
        return f64::NAN;
    }
    (hi - lo) / median(v)
}

/// `1.23ms`, `850.00us`, `1.02s` → seconds.
pub fn parse_wrk_duration(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    })
}

/// wrk's `Requests/sec:` and `99%` latency lines → (requests/s, p99 s).
pub fn parse_wrk(text: &str) -> Option<(f64, f64)> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| parse_wrk_duration(v.trim()))?;
    Some((rps, p99))
}

/// blockwatch's `warning: N WHAT were lost…` lines: (N, WHAT) each, in
/// order. Any kind counts as a loss for the pipeline's "without loss".
pub fn losses(stderr: &str) -> Vec<(u64, String)> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = l.split("warning: ").nth(1)?;
            let (n, tail) = rest.split_once(' ')?;
            let (what, _) = tail.split_once(" were lost")?;
            Some((n.parse().ok()?, what.to_string()))
        })
        .collect()
}

/// Counts the JSON events (lines starting with `{`) of a stream, and
/// keeps the other lines (the workload's own output, which shares
/// blockwatch's stdout).
#[derive(Debug, Default)]
pub struct LineCounter {
    pub events: u64,
    pub other: Vec<String>,
}

impl LineCounter {
    /// One line, its newline included or not.
    pub fn line(&mut self, line: &[u8]) {
        if line.first() == Some(&b'{') {
            self.events += 1;
            return;
        }
        let text = String::from_utf8_lossy(line).trim().to_string();
        if !text.is_empty() {
            self.other.push(text);
        }
    }
}

pub fn print_table(header: &[String], rows: &[Vec<String>]) {
    let cols = header.len();
    let width = |i: usize| {
        rows.iter()
            .filter_map(|r| r.get(i))
            .chain(std::iter::once(&header[i]))
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(0)
    };
    let widths: Vec<usize> = (0..cols).map(width).collect();
    let line = |cells: &[String]| {
        let mut s = String::from("|");
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            s.push_str(&format!(" {c}{} |", " ".repeat(pad)));
        }
        println!("{s}");
    };
    line(header);
    let sep: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    line(&sep);
    for r in rows {
        line(r);
    }
}

/// A progress line on a terminal, overwritten by the next one (and
/// cleared by [`progress_done`]); nothing when stdout is a file or a
/// pipe, whose readers want the tables only.
pub fn progress(what: &str) {
    if stdout_is_terminal() {
        print!("\r{what:<72}");
        let _ = std::io::stdout().flush();
    }
}

pub fn progress_done() {
    if stdout_is_terminal() {
        print!("\r{:<72}\r", "");
        let _ = std::io::stdout().flush();
    }
}

fn stdout_is_terminal() -> bool {
    use std::io::IsTerminal as _;
    std::io::stdout().is_terminal()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn spreads() {
        assert_eq!(spread(&[100.0, 110.0, 90.0]), 0.2);
        assert_eq!(spread(&[5.0]), 0.0);
        assert!(spread(&[]).is_nan());
    }

    #[test]
    fn wrk_durations() {
        assert_eq!(parse_wrk_duration("850.00us"), Some(850e-6));
        assert_eq!(parse_wrk_duration("1.50ms"), Some(1.5e-3));
        assert_eq!(parse_wrk_duration("2.00s"), Some(2.0));
        assert_eq!(parse_wrk_duration("fast"), None);
    }

    #[test]
    fn wrk_output() {
        let text = "Running 2s test @ http://127.0.0.1:1/\n  Latency Distribution\n     50%    1.10ms\n     99%    3.20ms\n  9000 requests in 2.00s, 1.5MB read\nRequests/sec:   4500.25\nTransfer/sec:    750.00KB\n";
        assert_eq!(parse_wrk(text), Some((4500.25, 3.2e-3)));
        assert_eq!(parse_wrk("unable to connect"), None);
    }

    #[test]
    fn loss_lines() {
        let s = "blockwatch: warning: 1234 events were lost (ring buffer full); raise --threshold\n\
                 blockwatch: warning: 7 user-stack copies (those stacks are frame pointers only) were lost\n\
                 blockwatch: 3 loop episodes over 1.00ms";
        assert_eq!(
            losses(s),
            [
                (1234, "events".to_string()),
                (
                    7,
                    "user-stack copies (those stacks are frame pointers only)".to_string()
                )
            ]
        );
        assert!(losses("blockwatch: 3 blocking calls").is_empty());
    }

    #[test]
    fn json_lines_are_counted_and_the_rest_kept() {
        let mut c = LineCounter::default();
        for line in [
            "{\"a\":1}\n",
            "{\"b\":{\"c\":2}}\n",
            "12345\n",
            "\n",
            "{\"d\":3}\n",
            "last",
        ] {
            c.line(line.as_bytes());
        }
        assert_eq!(c.events, 3);
        assert_eq!(c.other, ["12345", "last"]);
    }
}
