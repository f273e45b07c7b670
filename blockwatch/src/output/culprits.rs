//! Blocking time per culprit and advice, kept next to the folded stacks
//! (see [`crate::output::metrics::Folded`]): the flame graph highlights
//! these frames, the daemon's page lists the heaviest with what to do.

use std::collections::{HashMap, HashSet};

use crate::event::{Event, Frame};
use crate::output::metrics::folded_name;
use crate::text::basename;

/// Distinct culprits kept per process; a daemon watching a process with
/// ever new culprits must not grow without bound.
const MAX_PER_PROCESS: usize = 200;

/// One culprit's share of a process's blocking time.
#[derive(Clone, Debug, PartialEq)]
pub struct Tally {
    /// The process as the folded stacks' root names it.
    pub process: String,
    /// The culprit frame's folded name (as in the flame graph), or
    /// `[unknown]` for events without a culprit.
    pub name: String,
    /// Where it is: `function() at file:line`, or the binary.
    pub place: String,
    pub advice: String,
    pub blocking_ns: u64,
    pub events: u64,
}

#[derive(Debug, Default)]
pub struct Culprits {
    /// Process key → (culprit name, advice) → tally.
    by_process: HashMap<String, HashMap<(String, String), Tally>>,
}

impl Culprits {
    /// Counts `ev` under `process` (the key [`Culprits::forget`] takes),
    /// shown as `root`.
    pub fn add(&mut self, process: &str, root: &str, ev: &Event) {
        let name = ev
            .culprit
            .as_ref()
            .map(folded_name)
            .unwrap_or_else(|| "[unknown]".to_string());
        let per = self.by_process.entry(process.to_string()).or_default();
        let key = (name, ev.advice.clone());
        if !per.contains_key(&key) && per.len() >= MAX_PER_PROCESS {
            return;
        }
        let tally = per.entry(key).or_insert_with_key(|(name, advice)| Tally {
            process: root.to_string(),
            name: name.clone(),
            place: ev.culprit.as_ref().map(place).unwrap_or_default(),
            advice: advice.clone(),
            blocking_ns: 0,
            events: 0,
        });
        tally.blocking_ns += ev.duration_ns;
        tally.events += 1;
    }

    pub fn forget(&mut self, process: &str) {
        self.by_process.remove(process);
    }

    /// The `n` heaviest by blocking time, heaviest first.
    pub fn top(&self, n: usize) -> Vec<&Tally> {
        let mut all: Vec<&Tally> = self.by_process.values().flat_map(|m| m.values()).collect();
        all.sort_by(|a, b| {
            b.blocking_ns
                .cmp(&a.blocking_ns)
                .then_with(|| (&a.process, &a.name).cmp(&(&b.process, &b.name)))
        });
        all.truncate(n);
        all
    }

    /// The folded names of every known culprit frame.
    pub fn names(&self) -> HashSet<&str> {
        self.by_process
            .values()
            .flat_map(|m| m.values())
            .map(|t| t.name.as_str())
            .filter(|n| *n != "[unknown]")
            .collect()
    }

    /// [`Culprits::names`], owned (to draw after a lock is released).
    pub fn names_owned(&self) -> HashSet<String> {
        self.names().into_iter().map(str::to_string).collect()
    }
}

/// `function at file:line`, `function in binary`, or the function alone.
fn place(f: &Frame) -> String {
    let function = f.function.as_deref().unwrap_or("??");
    match (&f.file, f.line, &f.module) {
        (Some(file), Some(line), _) => format!("{function} at {file}:{line}"),
        (Some(file), None, _) => format!("{function} in {file}"),
        (None, _, Some(module)) => format!("{function} in {}", basename(module)),
        _ => function.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::fixtures;

    fn ev(function: Option<&str>, advice: &str, ms: u64) -> Event {
        let frame = function.map(|f| Frame {
            function: Some(f.into()),
            file: Some("/srv/app.py".into()),
            line: Some(7),
            ..Frame::default()
        });
        let mut ev = fixtures::stack_event(frame.into_iter().collect(), Some(0), ms);
        ev.advice = advice.into();
        ev
    }

    #[test]
    fn heaviest_first_with_their_advice() {
        let mut c = Culprits::default();
        c.add("python3", "python3", &ev(Some("light"), "a", 10));
        c.add("python3", "python3", &ev(Some("heavy"), "b", 30));
        c.add("python3", "python3", &ev(Some("light"), "a", 10));
        c.add("python3", "python3", &ev(None, "c", 5));
        let top = c.top(2);
        assert_eq!(top[0].name, "heavy");
        assert_eq!(top[0].place, "heavy at /srv/app.py:7");
        assert_eq!((top[1].name.as_str(), top[1].events), ("light", 2));
        assert_eq!(top[1].blocking_ns, 20_000_000);
        assert_eq!(top[1].advice, "a");
        assert_eq!(c.names(), HashSet::from(["heavy", "light"]));
        c.forget("python3");
        assert!(c.top(5).is_empty());
    }

    #[test]
    fn bounded_per_process() {
        let mut c = Culprits::default();
        for i in 0..MAX_PER_PROCESS + 50 {
            c.add("p", "p", &ev(Some(&format!("f{i}")), "", 1));
        }
        assert_eq!(c.top(usize::MAX).len(), MAX_PER_PROCESS);
    }
}
