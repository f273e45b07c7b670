//! Which culprits of a process get a label of their own, and which
//! processes' series expire: the decisions behind the metrics' bounded
//! cardinality, pure so they are tested without a registry or a kernel.
//!
//! Per process only the top N culprits by blocking time get their own
//! label, the rest share [`OTHER`]; the series of a process expire some
//! time after its last instance exited.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// The label of culprits outside a process's top N.
pub const OTHER: &str = "other";

/// One labelled series of the per-culprit counters.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey {
    pub class: String,
    pub syscall: String,
    pub culprit: String,
}

/// What the registry must do after one event.
#[derive(Debug, Default, PartialEq)]
pub struct Placement {
    /// The culprit label to count this event under.
    pub culprit: String,
    /// Series of a culprit that just lost its label to a heavier one.
    pub removed: Vec<SeriesKey>,
}

/// A process whose series expired.
#[derive(Debug, PartialEq)]
pub struct Expired {
    pub process: String,
    pub series: Vec<SeriesKey>,
    pub classes: Vec<String>,
}

#[derive(Debug, Default)]
struct Proc {
    /// Culprits with their own label, and their blocking seconds since.
    slots: HashMap<String, f64>,
    /// Seconds of culprits without a label (a bounded space-saving tally,
    /// so thousands of culprits cost a fixed amount of memory).
    candidates: HashMap<String, f64>,
    series: HashSet<SeriesKey>,
    classes: HashSet<String>,
    pids: HashSet<u32>,
    /// When the last live PID of this name exited.
    gone_since: Option<Instant>,
}

/// Decides the culprit label of each event and which series expire.
#[derive(Debug)]
pub struct Aggregator {
    top_n: usize,
    expire_after: Duration,
    procs: HashMap<String, Proc>,
    pid_names: HashMap<u32, String>,
}

impl Aggregator {
    pub fn new(top_n: usize, expire_after: Duration) -> Self {
        Self {
            top_n: top_n.max(1),
            expire_after,
            procs: HashMap::new(),
            pid_names: HashMap::new(),
        }
    }

    /// Takes new limits (config reload). Existing labels stay: a smaller
    /// N applies as labels are reassigned.
    pub fn set_limits(&mut self, top_n: usize, expire_after: Duration) {
        self.top_n = top_n.max(1);
        self.expire_after = expire_after;
    }

    /// Records `seconds` of blocking and returns the label to count it
    /// under.
    pub fn record(
        &mut self,
        pid: u32,
        process: &str,
        class: &str,
        syscall: &str,
        culprit: &str,
        seconds: f64,
    ) -> Placement {
        if let Some(old) = self.pid_names.insert(pid, process.to_string())
            && old != process
            && let Some(p) = self.procs.get_mut(&old)
        {
            // The PID exec'd another program.
            p.pids.remove(&pid);
        }
        let top_n = self.top_n;
        let p = self.procs.entry(process.to_string()).or_default();
        p.pids.insert(pid);
        p.gone_since = None;
        p.classes.insert(class.to_string());
        let mut placement = Placement::default();
        let label = if let Some(s) = p.slots.get_mut(culprit) {
            *s += seconds;
            culprit.to_string()
        } else if p.slots.len() < top_n {
            p.slots.insert(culprit.to_string(), seconds);
            culprit.to_string()
        } else {
            let tally = p.tally(culprit, seconds, top_n * 4);
            // There is a lightest slot: `top_n` is at least 1 and all
            // are taken.
            let lightest = p
                .slots
                .iter()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, v)| (k.clone(), *v));
            // Half again as heavy: two culprits of equal weight must not
            // swap labels at every event.
            if let Some((min_name, min_secs)) = lightest
                && tally > min_secs * 1.5
                && culprit != OTHER
            {
                p.candidates.remove(culprit);
                p.slots.remove(&min_name);
                p.candidates.insert(min_name.clone(), min_secs);
                p.slots.insert(culprit.to_string(), tally);
                let gone: Vec<SeriesKey> = p
                    .series
                    .iter()
                    .filter(|k| k.culprit == min_name)
                    .cloned()
                    .collect();
                for k in &gone {
                    p.series.remove(k);
                }
                placement.removed = gone;
                culprit.to_string()
            } else {
                OTHER.to_string()
            }
        };
        p.series.insert(SeriesKey {
            class: class.to_string(),
            syscall: syscall.to_string(),
            culprit: label.clone(),
        });
        placement.culprit = label;
        placement
    }

    /// Process `pid` exited (its series expire once no PID of its name is
    /// left, `expire_after` later).
    pub fn process_exit(&mut self, pid: u32, now: Instant) {
        if let Some(name) = self.pid_names.remove(&pid)
            && let Some(p) = self.procs.get_mut(&name)
        {
            p.pids.remove(&pid);
            if p.pids.is_empty() {
                p.gone_since = Some(now);
            }
        }
    }

    /// PIDs seen in events, to check for exits the kernel's notice missed.
    pub fn pids(&self) -> Vec<u32> {
        self.pid_names.keys().copied().collect()
    }

    /// Removes and returns the processes gone for `expire_after`.
    pub fn expire(&mut self, now: Instant) -> Vec<Expired> {
        let after = self.expire_after;
        let names: Vec<String> = self
            .procs
            .iter()
            .filter(|(_, p)| p.gone_since.is_some_and(|t| now.duration_since(t) >= after))
            .map(|(n, _)| n.clone())
            .collect();
        names
            .into_iter()
            .filter_map(|n| {
                let p = self.procs.remove(&n)?;
                let mut series: Vec<_> = p.series.into_iter().collect();
                series.sort();
                let mut classes: Vec<_> = p.classes.into_iter().collect();
                classes.sort();
                Some(Expired {
                    process: n,
                    series,
                    classes,
                })
            })
            .collect()
    }

    /// Culprits with their own label for `process`.
    pub fn labelled(&self, process: &str) -> Vec<String> {
        let mut v: Vec<_> = self
            .procs
            .get(process)
            .map(|p| p.slots.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Proc {
    /// Adds to a culprit's shadow tally and returns it; past `cap`
    /// entries the lightest is replaced and its count inherited
    /// (space-saving: an overestimate, never an underestimate).
    fn tally(&mut self, culprit: &str, seconds: f64, cap: usize) -> f64 {
        if let Some(v) = self.candidates.get_mut(culprit) {
            *v += seconds;
            return *v;
        }
        let mut base = 0.0;
        if self.candidates.len() >= cap
            && let Some((k, v)) = self
                .candidates
                .iter()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, v)| (k.clone(), *v))
        {
            self.candidates.remove(&k);
            base = v;
        }
        let v = base + seconds;
        self.candidates.insert(culprit.to_string(), v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_holds_with_thousands_of_culprits() {
        let mut a = Aggregator::new(20, Duration::from_secs(600));
        let mut labels = HashSet::new();
        for i in 0..5000 {
            let p = a.record(1, "app", "sleep", "clock_nanosleep", &format!("f{i}"), 0.01);
            for r in &p.removed {
                labels.remove(&r.culprit);
            }
            labels.insert(p.culprit);
        }
        assert!(a.labelled("app").len() <= 20);
        assert!(labels.len() <= 21, "{} labels", labels.len());
        assert!(labels.contains(OTHER));
        let p = &a.procs["app"];
        assert!(p.candidates.len() <= 80);
        assert!(p.series.len() <= 21);
    }

    #[test]
    fn a_heavy_culprit_takes_a_label_from_a_light_one() {
        let mut a = Aggregator::new(2, Duration::from_secs(600));
        a.record(1, "app", "sleep", "s", "light", 0.01);
        a.record(1, "app", "sleep", "s", "mid", 0.5);
        assert_eq!(
            a.record(1, "app", "sleep", "s", "heavy", 0.005).culprit,
            OTHER
        );
        let p = a.record(1, "app", "sleep", "s", "heavy", 1.0);
        assert_eq!(p.culprit, "heavy");
        assert_eq!(p.removed.len(), 1);
        assert_eq!(p.removed[0].culprit, "light");
        assert_eq!(a.labelled("app"), ["heavy", "mid"]);
    }

    #[test]
    fn series_expire_after_the_last_instance_exits() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(20, Duration::from_secs(600));
        a.record(1, "app", "sleep", "s", "f", 0.1);
        a.record(2, "app", "file", "read", "g", 0.1);
        a.record(3, "other-app", "sleep", "s", "f", 0.1);
        a.process_exit(1, t0);
        assert!(
            a.expire(t0 + Duration::from_secs(3600)).is_empty(),
            "pid 2 lives"
        );
        a.process_exit(2, t0 + Duration::from_secs(10));
        assert!(a.expire(t0 + Duration::from_secs(300)).is_empty());
        let gone = a.expire(t0 + Duration::from_secs(610));
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].process, "app");
        assert_eq!(gone[0].series.len(), 2);
        assert_eq!(gone[0].classes, ["file", "sleep"]);
        assert!(a.labelled("app").is_empty());
        assert_eq!(a.labelled("other-app"), ["f"]);
    }

    #[test]
    fn a_new_instance_cancels_expiry() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(20, Duration::from_secs(60));
        a.record(1, "app", "sleep", "s", "f", 0.1);
        a.process_exit(1, t0);
        a.record(7, "app", "sleep", "s", "f", 0.1);
        assert!(a.expire(t0 + Duration::from_secs(120)).is_empty());
    }
}
