//! Issue 11's targets: each measured figure beside its target and whether
//! it was met, printed after its section and again, all together, at the
//! end of the run.

use super::stats::{Interval, MAX_REPS, print_table};

/// The unit a figure is measured and shown in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unit {
    /// A ratio to the bare run (`0.98×`).
    Ratio,
    /// Events per second (`100,000/s`).
    PerSec,
    /// Microseconds (`4.2 µs`).
    Micros,
    /// Mebibytes (`25.0 MiB`).
    MiB,
    /// Percent of one CPU (`0.050 %`).
    CpuPercent,
}

impl Unit {
    pub fn format(self, v: f64) -> String {
        match self {
            Unit::Ratio => format!("{v:.2}×"),
            Unit::PerSec => format!("{}/s", thousands(v)),
            Unit::Micros => format!("{v:.1} µs"),
            Unit::MiB => format!("{v:.1} MiB"),
            Unit::CpuPercent => format!("{v:.3} %"),
        }
    }

    /// A measured value: a ratio to three decimals, so one just short of
    /// its target (0.985× against ≥ 0.99×) does not read as the target.
    pub fn measured(self, v: f64) -> String {
        match self {
            Unit::Ratio => format!("{v:.3}×"),
            _ => self.format(v),
        }
    }
}

/// `123456.7` → `123,457`.
pub fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < -0.5 {
        out.insert(0, '-');
    }
    out
}

/// Which side of the target a figure must be on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

impl Goal {
    pub fn target(self) -> f64 {
        match self {
            Goal::AtLeast(t) | Goal::AtMost(t) => t,
        }
    }

    pub fn met(self, v: f64) -> bool {
        match self {
            Goal::AtLeast(t) => v >= t,
            Goal::AtMost(t) => v <= t,
        }
    }

    fn format(self, unit: Unit) -> String {
        match self {
            Goal::AtLeast(t) => format!("≥ {}", unit.format(t)),
            Goal::AtMost(t) => format!("≤ {}", unit.format(t)),
        }
    }
}

/// One row of issue 11's table, measured (or not, and why).
#[derive(Clone, Debug)]
pub struct Figure {
    pub name: String,
    pub measured: Result<f64, String>,
    pub unit: Unit,
    pub goal: Goal,
    /// Said after the value: what bounds it, how it was taken.
    pub note: String,
    /// For a ratio to bare runs: how far those spread ((max − min) /
    /// median), the noise the ratio is read against.
    pub bare_spread: Option<f64>,
    /// The same ratio for the floor (an empty `sched_switch` program):
    /// what any tool that hooks the scheduler costs here.
    pub floor: Option<f64>,
    /// For a median of per-round ratios: where that median lies, given
    /// how the rounds varied. A target inside it cannot be told met or
    /// missed on this machine.
    pub interval: Option<Interval>,
    /// The floor's own interval: one wholly on the missed side puts the
    /// target out of reach of any tool on the scheduler here.
    pub floor_interval: Option<Interval>,
    /// Rounds the figure's median would need to be told from its target
    /// at this spread (`rounds_to_tell`).
    pub rounds_needed: Option<f64>,
}

/// The verdict of a target not met that the floor misses as well.
const OUT_OF_REACH: &str = "NOT met; floor misses it too";

/// The verdict of a target inside the figure's interval: this machine's
/// noise is wider than the difference to be told.
pub const UNRESOLVED: &str = "unresolved: noise spans it";

/// The verdict of a target inside the figure's interval that more rounds
/// than a bench runs ([`MAX_REPS`]) would be needed to tell.
const NOISE_BOUND: &str = "beyond this machine's noise";

/// The coverage asked of a figure's interval (`rounds_to_tell` is for
/// this one).
pub const COVERAGE: f64 = 0.9;

/// Bare runs spread wider than this leave a ratio's verdict to chance.
pub const NOISY: f64 = 0.10;

impl Figure {
    pub fn new(name: impl Into<String>, measured: f64, unit: Unit, goal: Goal) -> Figure {
        let measured = if measured.is_finite() {
            Ok(measured)
        } else {
            Err("no result".into())
        };
        Figure {
            name: name.into(),
            measured,
            unit,
            goal,
            note: String::new(),
            bare_spread: None,
            floor: None,
            interval: None,
            floor_interval: None,
            rounds_needed: None,
        }
    }

    /// A figure that could not be measured, with the reason.
    pub fn missing(
        name: impl Into<String>,
        why: impl Into<String>,
        unit: Unit,
        goal: Goal,
    ) -> Figure {
        Figure {
            name: name.into(),
            measured: Err(why.into()),
            unit,
            goal,
            note: String::new(),
            bare_spread: None,
            floor: None,
            interval: None,
            floor_interval: None,
            rounds_needed: None,
        }
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Figure {
        self.note = note.into();
        self
    }

    pub fn with_bare_spread(mut self, spread: f64) -> Figure {
        self.bare_spread = Some(spread);
        self
    }

    /// The floor's ratio, when it was measured.
    pub fn with_floor(mut self, floor: Option<f64>) -> Figure {
        self.floor = floor.filter(|f| f.is_finite());
        self
    }

    /// Where the measured median lies (see [`Interval`]).
    pub fn with_interval(mut self, interval: Option<Interval>) -> Figure {
        self.interval = interval.filter(|i| i.low.is_finite() && i.high.is_finite());
        self
    }

    /// The floor's interval (see [`Figure::floor_interval`]).
    pub fn with_floor_interval(mut self, interval: Option<Interval>) -> Figure {
        self.floor_interval = interval.filter(|i| i.low.is_finite() && i.high.is_finite());
        self
    }

    /// See [`Figure::rounds_needed`].
    pub fn with_rounds_needed(mut self, rounds: f64) -> Figure {
        self.rounds_needed = (!rounds.is_nan()).then_some(rounds);
        self
    }

    /// A verdict left to bare runs that spread widely, with no interval
    /// to say how far that goes.
    fn noisy(&self) -> bool {
        self.interval.is_none() && self.bare_spread.is_some_and(|s| s > NOISY)
    }

    /// "met", "NOT met", or "n/a" when nothing was measured; a target the
    /// floor misses too is out of reach for any tool on the scheduler here,
    /// and says so. With an interval, the whole of it must meet the target
    /// (or miss it): one that holds the target is out of reach when the
    /// floor's whole interval misses it, beyond the machine's noise when it
    /// would take more than [`MAX_REPS`] rounds to tell, else unresolved.
    pub fn verdict(&self) -> &'static str {
        if let (Ok(_), Some(i)) = (&self.measured, self.interval) {
            match (self.goal.met(i.low), self.goal.met(i.high)) {
                (true, true) => return "met",
                (false, false) => {}
                _ if self.floor_misses() => return OUT_OF_REACH,
                _ if self.rounds_needed.is_some_and(|n| n > MAX_REPS as f64) => {
                    return NOISE_BOUND;
                }
                _ => return UNRESOLVED,
            }
        }
        match self.measured {
            Ok(v) if self.goal.met(v) => "met",
            Ok(_) if self.floor_misses() => OUT_OF_REACH,
            Ok(_) => "NOT met",
            Err(_) => "n/a",
        }
    }

    /// Whether the floor misses the target: its whole interval when it
    /// has one (a median inside the noise says nothing), else its value.
    fn floor_misses(&self) -> bool {
        match (self.floor_interval, self.floor) {
            (Some(f), _) => !self.goal.met(f.low) && !self.goal.met(f.high),
            (None, Some(f)) => !self.goal.met(f),
            (None, None) => false,
        }
    }

    fn row(&self) -> Vec<String> {
        let mut shown = match &self.measured {
            Ok(v) => self.unit.measured(*v),
            Err(why) => format!("not measured: {why}"),
        };
        let mut notes: Vec<String> = Vec::new();
        if !self.note.is_empty() {
            notes.push(self.note.clone());
        }
        if let Some(i) = self.interval {
            notes.push(format!(
                "{:.0}% interval {}–{}",
                i.coverage * 100.0,
                self.unit.format(i.low),
                self.unit.format(i.high)
            ));
        }
        if let Some(floor) = self.floor {
            notes.push(match self.floor_interval {
                Some(f) => format!(
                    "floor {} ({}–{})",
                    self.unit.measured(floor),
                    self.unit.format(f.low),
                    self.unit.format(f.high)
                ),
                None => format!("floor {}", self.unit.measured(floor)),
            });
        }
        if let (Some(n), UNRESOLVED | NOISE_BOUND) = (self.rounds_needed, self.verdict()) {
            notes.push(if n.is_infinite() {
                "its median on the target: no number of rounds tells".into()
            } else if n > 1000.0 {
                "over 1,000 rounds to tell".into()
            } else {
                format!("~{} rounds to tell", n.ceil())
            });
        }
        if let Some(spread) = self.bare_spread {
            notes.push(format!("bare spread {:.0}%", spread * 100.0));
        }
        if !notes.is_empty() {
            shown.push_str(&format!(" ({})", notes.join("; ")));
        }
        vec![
            self.name.clone(),
            shown,
            self.goal.format(self.unit),
            self.verdict().to_string(),
        ]
    }
}

/// The figures as a table: figure | measured | target | met?
pub fn print(title: &str, figures: &[Figure]) {
    if figures.is_empty() {
        return;
    }
    println!("{title}");
    let rows: Vec<Vec<String>> = figures.iter().map(Figure::row).collect();
    print_table(
        &["figure", "measured", "target", "met?"].map(String::from),
        &rows,
    );
}

/// `N of M targets met` (figures not measured are counted apart, and
/// verdicts that rest on noisy bare runs are said to).
pub fn summary(figures: &[Figure]) -> String {
    let met = figures.iter().filter(|f| f.verdict() == "met").count();
    let missing = figures.iter().filter(|f| f.verdict() == "n/a").count();
    let noisy = figures.iter().filter(|f| f.noisy()).count();
    let bound = figures
        .iter()
        .filter(|f| f.verdict() == OUT_OF_REACH)
        .count();
    let unresolved = figures.iter().filter(|f| f.verdict() == UNRESOLVED).count();
    let beyond = figures
        .iter()
        .filter(|f| f.verdict() == NOISE_BOUND)
        .count();
    let mut s = format!("{met} of {} targets met", figures.len());
    if bound > 0 {
        s.push_str(&format!(
            ", {bound} not met that an empty sched_switch program (the floor) misses too on this machine"
        ));
    }
    if unresolved > 0 {
        s.push_str(&format!(
            ", {unresolved} unresolved: the interval of their per-round ratios holds the target, and more rounds would tell (each row says how many)"
        ));
    }
    if beyond > 0 {
        s.push_str(&format!(
            ", {beyond} beyond this machine's noise: their per-round ratios vary so much against their distance to the target that telling them apart would take more than {MAX_REPS} rounds (each row says how many)"
        ));
    }
    if missing > 0 {
        s.push_str(&format!(", {missing} not measured"));
    }
    if noisy > 0 {
        s.push_str(&format!(
            "; {noisy} ratios rest on bare runs that spread over {:.0}%: their verdicts are this machine's noise, rerun them on a quieter one",
            NOISY * 100.0
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let at_least = Figure::new("rps", 0.995, Unit::Ratio, Goal::AtLeast(0.99));
        assert_eq!(at_least.verdict(), "met");
        let below = Figure::new("rps", 0.98, Unit::Ratio, Goal::AtLeast(0.99));
        assert_eq!(below.verdict(), "NOT met");
        let edge = Figure::new("p99", 1.02, Unit::Ratio, Goal::AtMost(1.02));
        assert_eq!(edge.verdict(), "met");
        let nan = Figure::new("p99", f64::NAN, Unit::Ratio, Goal::AtMost(1.02));
        assert_eq!(nan.verdict(), "n/a");
        let gone = Figure::missing("x", "section failed", Unit::MiB, Goal::AtMost(25.0));
        assert_eq!(gone.verdict(), "n/a");
        // Not met, and the floor misses it too: out of reach here.
        let bound =
            Figure::new("pingpong", 1.13, Unit::Ratio, Goal::AtMost(1.03)).with_floor(Some(1.08));
        assert_eq!(bound.verdict(), OUT_OF_REACH);
        // Not met where the floor meets it: blockwatch's own.
        let own =
            Figure::new("rps", 0.95, Unit::Ratio, Goal::AtLeast(0.99)).with_floor(Some(0.995));
        assert_eq!(own.verdict(), "NOT met");
        let met = Figure::new("rps", 0.99, Unit::Ratio, Goal::AtLeast(0.99)).with_floor(Some(0.97));
        assert_eq!(met.verdict(), "met");
        assert_eq!(
            summary(&[bound, own, met]),
            "1 of 3 targets met, 1 not met that an empty sched_switch program (the floor) misses too on this machine"
        );
    }

    #[test]
    fn rows_show_value_target_and_verdict() {
        let f = Figure::new("events/s", 7300.0, Unit::PerSec, Goal::AtLeast(100_000.0))
            .with_note("first loss at 16 threads");
        assert_eq!(
            f.row(),
            [
                "events/s",
                "7,300/s (first loss at 16 threads)",
                "≥ 100,000/s",
                "NOT met"
            ]
        );
        // Just short of its target: three decimals, so it does not read as 0.99×.
        let f = Figure::new("rps", 0.9852, Unit::Ratio, Goal::AtLeast(0.99)).with_floor(Some(0.99));
        assert_eq!(
            f.row()[1..],
            ["0.985× (floor 0.990×)", "≥ 0.99×", "NOT met"]
        );
        let f = Figure::new("idle CPU", 0.0312, Unit::CpuPercent, Goal::AtMost(0.05));
        assert_eq!(f.row()[1..], ["0.031 %", "≤ 0.050 %", "met"]);
        let f = Figure::missing("rss", "daemon failed", Unit::MiB, Goal::AtMost(25.0));
        assert_eq!(
            f.row()[1..],
            ["not measured: daemon failed", "≤ 25.0 MiB", "n/a"]
        );
    }

    #[test]
    fn intervals_decide_verdicts_and_show() {
        let iv = |low, high| {
            Some(Interval {
                low,
                high,
                coverage: 0.984,
            })
        };
        let rps = |v, i| {
            Figure::new("rps", v, Unit::Ratio, Goal::AtLeast(0.99))
                .with_interval(i)
                .with_bare_spread(0.3)
        };
        // The whole interval above the target: met, however noisy the bare runs.
        assert_eq!(rps(1.01, iv(0.995, 1.05)).verdict(), "met");
        // The target inside the interval: neither, whichever side the median is.
        assert_eq!(rps(1.01, iv(0.95, 1.05)).verdict(), UNRESOLVED);
        assert_eq!(rps(0.97, iv(0.95, 1.05)).verdict(), UNRESOLVED);
        // All of it below: missed, and out of reach when the floor misses too.
        assert_eq!(rps(0.95, iv(0.93, 0.98)).verdict(), "NOT met");
        assert_eq!(
            rps(0.95, iv(0.93, 0.98)).with_floor(Some(0.96)).verdict(),
            OUT_OF_REACH
        );
        assert_eq!(
            rps(1.01, iv(0.95, 1.05)).row()[1],
            "1.010× (98% interval 0.95×–1.05×; bare spread 30%)"
        );
        // An interval replaces the bare-spread caveat in the summary.
        assert_eq!(
            summary(&[rps(1.01, iv(0.95, 1.05)), rps(1.01, iv(0.995, 1.05))]),
            "1 of 2 targets met, 1 unresolved: the interval of their per-round ratios holds the target, and more rounds would tell (each row says how many)"
        );
    }

    #[test]
    fn open_verdicts_say_what_keeps_them_open() {
        let iv = |low, high| {
            Some(Interval {
                low,
                high,
                coverage: 0.9,
            })
        };
        let tax = |rounds| {
            Figure::new("pingpong", 1.06, Unit::Ratio, Goal::AtMost(1.03))
                .with_interval(iv(1.02, 1.11))
                .with_rounds_needed(rounds)
        };
        // A few more rounds would tell: unresolved, and the row says how many.
        assert_eq!(tax(12.4).verdict(), UNRESOLVED);
        assert_eq!(
            tax(12.4).row()[1],
            "1.060× (90% interval 1.02×–1.11×; ~13 rounds to tell)"
        );
        // More than a bench runs: beyond the machine's noise.
        assert_eq!(tax(140.0).verdict(), NOISE_BOUND);
        assert!(tax(1.3e6).row()[1].ends_with("; over 1,000 rounds to tell)"));
        assert_eq!(
            tax(f64::INFINITY).row()[1],
            "1.060× (90% interval 1.02×–1.11×; its median on the target: no number of rounds tells)"
        );
        // The floor's whole interval misses the target: out of reach,
        // however many rounds blockwatch's own would take.
        let bound = tax(12.4)
            .with_floor(Some(1.078))
            .with_floor_interval(iv(1.05, 1.10));
        assert_eq!(bound.verdict(), OUT_OF_REACH);
        assert_eq!(
            bound.row()[1],
            "1.060× (90% interval 1.02×–1.11×; floor 1.078× (1.05×–1.10×))"
        );
        // Missed with its whole interval, beside a floor whose median
        // misses but whose interval holds the target: blockwatch's own miss.
        let own = Figure::new("p99", 1.217, Unit::Ratio, Goal::AtMost(1.02))
            .with_interval(iv(1.05, 1.32))
            .with_floor(Some(1.032))
            .with_floor_interval(iv(0.84, 1.19));
        assert_eq!(own.verdict(), "NOT met");
        // A floor that only may miss it decides nothing.
        let maybe = tax(12.4)
            .with_floor(Some(1.04))
            .with_floor_interval(iv(1.0, 1.08));
        assert_eq!(maybe.verdict(), UNRESOLVED);
        // Decided verdicts keep no rounds note.
        let met = Figure::new("rps", 1.0, Unit::Ratio, Goal::AtLeast(0.99))
            .with_interval(iv(0.995, 1.01))
            .with_rounds_needed(3.0);
        assert_eq!(met.row()[1], "1.000× (90% interval 0.99×–1.01×)");
        assert!(summary(&[tax(140.0), met]).starts_with(
            "1 of 2 targets met, 1 beyond this machine's noise: their per-round ratios vary"
        ));
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(123_456.7), "123,457");
        assert_eq!(thousands(-1_234_567.0), "-1,234,567");
    }

    #[test]
    fn summary_counts() {
        let figs = [
            Figure::new("a", 1.0, Unit::Ratio, Goal::AtLeast(0.99)),
            Figure::new("b", 2.0, Unit::Ratio, Goal::AtMost(1.02)),
            Figure::missing("c", "x", Unit::Ratio, Goal::AtMost(1.02)),
        ];
        assert_eq!(summary(&figs), "1 of 3 targets met, 1 not measured");
        let figs = [
            Figure::new("a", 1.0, Unit::Ratio, Goal::AtLeast(0.99)).with_bare_spread(0.02),
            Figure::new("b", 2.0, Unit::Ratio, Goal::AtMost(1.02)).with_bare_spread(0.3),
        ];
        assert!(
            summary(&figs)
                .starts_with("1 of 2 targets met; 1 ratios rest on bare runs that spread over 10%")
        );
    }
}
