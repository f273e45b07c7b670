//! Pure helpers: medians and spreads, the parsing of what the tools print
//! (wrk, blockwatch's loss warnings, the workload's JSON stream), tables.

use std::io::Write as _;

/// Bare runs further apart than this ([`spread`]) call for
/// [`WIDE_REPS`] repetitions of a section.
pub const WIDE_SPREAD: f64 = 0.05;
pub const WIDE_REPS: usize = 7;

/// The most rounds a section runs to resolve a verdict its first rounds
/// left open ([`rounds_to_tell`]); one that needs more is beyond what this
/// machine's noise lets a bench tell.
pub const MAX_REPS: usize = 21;

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

/// Each run over the bare run of its own round: `runs[i] / bare[i]`.
/// A round runs every configuration once, back to back, so its runs
/// shared the machine's state (a VM's slow spell hits them all), which a
/// ratio of medians over the whole section does not cancel.
pub fn paired_ratios(runs: &[f64], bare: &[f64]) -> Vec<f64> {
    runs.iter()
        .zip(bare)
        .filter(|(_, b)| **b > 0.0)
        .map(|(r, b)| r / b)
        .collect()
}

/// Where the median of what was sampled lies, at a stated coverage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub low: f64,
    pub high: f64,
    /// The chance the interval holds the true median (0..1).
    pub coverage: f64,
}

/// A confidence interval for the median of `v` that assumes no
/// distribution: the k-th smallest and k-th largest samples, for the
/// largest k whose coverage (from the binomial count of samples below the
/// median) is at least `conf`; with few samples, where even the extremes
/// fall short, the extremes and their coverage. None under two samples.
pub fn median_interval(v: &[f64], conf: f64) -> Option<Interval> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n < 2 {
        return None;
    }
    v.sort_by(f64::total_cmp);
    // P(at most i of n samples fall below the median) = Σ C(n, j) / 2^n.
    let mut below = 0.0;
    let mut choose = 1.0;
    let mut k = 1;
    let mut coverage = 0.0;
    for i in 0..n / 2 {
        below += choose * 0.5f64.powi(n as i32);
        let c = 1.0 - 2.0 * below;
        if i == 0 {
            coverage = c;
        } else if c >= conf {
            k = i + 1;
            coverage = c;
        } else {
            break;
        }
        choose = choose * (n - i) as f64 / (i + 1) as f64;
    }
    Some(Interval {
        low: v[k - 1],
        high: v[n - k],
        coverage,
    })
}

/// How many rounds a median of per-round ratios spread like `v` needs for
/// its 90% interval to leave `target` on one side: the normal
/// approximation `(z·σ / |median − target|)²` with z = 1.645, times π/2
/// since a median needs that many more samples than a mean for the same
/// width. σ is read robustly, as 1.4826 × the median absolute deviation:
/// one run that stalled (a p99 fifty times the others) would otherwise
/// ask for millions of rounds where the median it is read against moved
/// no more than for any other run. Infinite when the median sits on the
/// target; NaN under two samples.
pub fn rounds_to_tell(v: &[f64], target: f64) -> f64 {
    const Z90: f64 = 1.644854;
    if v.len() < 2 {
        return f64::NAN;
    }
    let m = median(v);
    let deviations: Vec<f64> = v.iter().map(|x| (x - m).abs()).collect();
    let sigma = 1.4826 * median(&deviations);
    std::f64::consts::FRAC_PI_2 * (Z90 * sigma / (m - target).abs()).powi(2)
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
    fn paired_ratios_divide_round_by_round() {
        assert_eq!(
            paired_ratios(&[110.0, 90.0, 50.0], &[100.0, 100.0, 0.0]),
            [1.1, 0.9]
        );
    }

    #[test]
    fn median_intervals_widen_until_they_cover() {
        let seven = [5.0, 1.0, 7.0, 3.0, 2.0, 6.0, 4.0];
        // Seven samples: only the extremes cover 90% (98.4%); the next
        // pair in covers 87.5%.
        let i = median_interval(&seven, 0.9).unwrap();
        assert_eq!((i.low, i.high), (1.0, 7.0));
        assert!((i.coverage - 0.984375).abs() < 1e-9);
        let i = median_interval(&seven, 0.85).unwrap();
        assert_eq!((i.low, i.high), (2.0, 6.0));
        assert!((i.coverage - 0.875).abs() < 1e-9);
        // Ten: the second smallest and largest cover 97.9%.
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        let i = median_interval(&ten, 0.9).unwrap();
        assert_eq!((i.low, i.high), (2.0, 9.0));
        // Too few to reach the coverage: the extremes, and what they cover.
        let i = median_interval(&[2.0, 1.0, 3.0], 0.9).unwrap();
        assert_eq!((i.low, i.high, i.coverage), (1.0, 3.0, 0.75));
        assert_eq!(median_interval(&[1.0], 0.9), None);
    }

    #[test]
    fn rounds_to_tell_grow_with_noise_and_closeness() {
        // Median 1.00, median absolute deviation 0.01 (σ ≈ 0.0148): 0.01
        // away takes π/2 · (1.645 · 0.0148 / 0.01)² ≈ 9.34 rounds.
        let v = [0.98, 0.99, 1.0, 1.01, 1.02];
        let want = std::f64::consts::FRAC_PI_2 * (1.644854 * 1.4826 * 0.01 / 0.01f64).powi(2);
        assert!((rounds_to_tell(&v, 0.99) - want).abs() < 1e-6);
        assert!((rounds_to_tell(&v, 0.99) - 9.34).abs() < 0.01);
        // Twice as far: a quarter of the rounds.
        assert!((rounds_to_tell(&v, 0.98) - want / 4.0).abs() < 1e-6);
        // One run fifty times the others moves nothing.
        let stalled = [0.98, 0.99, 1.0, 1.01, 50.0];
        assert!((rounds_to_tell(&stalled, 0.99) - want).abs() < 1e-6);
        assert!(rounds_to_tell(&v, 1.0).is_infinite());
        assert!(rounds_to_tell(&[1.0], 0.99).is_nan());
    }

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
