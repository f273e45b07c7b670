//! The end-of-trace summary: reported loop episodes grouped by (culprit,
//! syscall), whatever took most of them (waits, or CPU work as class
//! `stall`), and strict calls in a table of their own, each sorted by total
//! time.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::FastMap;
use crate::event::{Class, Detector, Event};
use crate::output::labels;
use crate::pipeline::strict::StrictCalls;
use crate::settings::duration::format_duration;
use crate::text::scrub as clean;

#[derive(Clone, Debug, Default)]
struct Group {
    count: u64,
    total_ns: u64,
    max_ns: u64,
    classes: BTreeSet<Class>,
}

/// Groups by culprit, then by syscall: two levels, so that adding an
/// event to a group that exists looks it up by the names the event
/// already has, with no key to allocate.
type Groups = FastMap<String, FastMap<String, Group>>;

/// Events grouped by (culprit, syscall), for the end-of-trace table.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    groups: Groups,
    /// Strict calls, tabled apart from the episodes.
    strict: Groups,
}

impl Summary {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.strict.is_empty()
    }

    /// Number of events (strict: calls) added.
    pub fn events(&self) -> u64 {
        [&self.groups, &self.strict]
            .iter()
            .flat_map(|g| g.values())
            .flat_map(|by_syscall| by_syscall.values())
            .map(|g| g.count)
            .sum()
    }

    /// Adds one event. A strict call site's event only shows its stack:
    /// its calls are counted by [`Summary::add_strict`].
    pub fn add(&mut self, ev: &Event) {
        let groups = match ev.detector {
            Detector::Offcpu | Detector::Stall => &mut self.groups,
            Detector::Strict => return,
        };
        add_to(groups, ev, 1, ev.duration_ns, ev.duration_ns);
    }

    /// Adds the calls the kernel counted at one strict call site.
    pub fn add_strict(&mut self, c: &StrictCalls) {
        add_to(&mut self.strict, &c.event, c.calls, c.total_ns, c.max_ns);
    }

    /// A table sorted by total time, most first, with a totals line; or
    /// a sentence when nothing was seen. No trailing newline.
    pub fn render(&self) -> String {
        let mut out = if self.groups.is_empty() {
            "no loop episodes over the threshold were seen".to_string()
        } else {
            render_groups(&self.groups)
        };
        if !self.strict.is_empty() {
            out.push_str(
                "\n\nstrict: blocking-class syscalls that stayed on the CPU (TOTAL: time in the calls)\n",
            );
            out.push_str(&render_groups(&self.strict));
        }
        out
    }
}

/// Adds `count` events of `total_ns`, the longest `max_ns`, to the group
/// of `ev`'s culprit and syscall.
fn add_to(groups: &mut Groups, ev: &Event, count: u64, total_ns: u64, max_ns: u64) {
    // The culprit column: the function, or `<unknown>` with the module
    // when only that is known.
    let name = labels::frame_name(ev.culprit.as_ref(), &labels::SUMMARY);
    let culprit = clean(&name);
    let syscall = labels::syscall(ev, labels::NO_SYSCALL_TEXT);
    if !groups.contains_key(culprit.as_ref()) {
        groups.insert(culprit.to_string(), FastMap::default());
    }
    let Some(by_syscall) = groups.get_mut(culprit.as_ref()) else {
        return;
    };
    if !by_syscall.contains_key(syscall.as_ref()) {
        by_syscall.insert(syscall.to_string(), Group::default());
    }
    let Some(g) = by_syscall.get_mut(syscall.as_ref()) else {
        return;
    };
    g.count = g.count.saturating_add(count);
    g.total_ns = g.total_ns.saturating_add(total_ns);
    g.max_ns = g.max_ns.max(max_ns);
    g.classes.insert(ev.class);
}

/// One table of groups, sorted by total time, with a totals line.
fn render_groups(groups: &Groups) -> String {
    let mut groups: Vec<_> = groups
        .iter()
        .flat_map(|(culprit, by_syscall)| {
            by_syscall
                .iter()
                .map(move |(syscall, g)| ((culprit, syscall), g))
        })
        .collect();
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
            syscall.to_string(),
            classes.join("/"),
            culprit.to_string(),
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
    use crate::output::fixtures::{app_frame, event, frame, read_event};

    #[test]
    fn summary_empty() {
        let s = Summary::new();
        assert!(s.is_empty());
        assert_eq!(s.render(), "no loop episodes over the threshold were seen");
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
        let want: [&[&str]; 6] = [
            &["TOTAL", "COUNT", "MAX", "SYSCALL", "CLASS", "CULPRIT"],
            &["100ms", "1", "100ms", "futex", "lock", "<unknown>"],
            &[
                "32.0ms",
                "4",
                "15.0ms",
                "read",
                "file/net",
                "handle_request",
            ],
            &["20.0ms", "1", "20.0ms", "fsync", "file", "handle_request"],
            &[
                "1.00ms",
                "1",
                "1.00ms",
                "nanosleep",
                "sleep",
                "<unknown>",
                "(libfoo.so.1)",
            ],
            &["153ms", "7", "100ms", "(total)"],
        ];
        for (line, want) in lines.iter().zip(want) {
            assert_eq!(cells(line), want);
        }

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
}
