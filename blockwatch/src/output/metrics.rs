//! Prometheus metrics of the daemon, with bounded label cardinality.
//!
//! Labels are names people act on (process, class, syscall, culprit), never
//! a PID, a TID or an address: those are unbounded over a host's life. Per
//! process only the top culprits by blocking time get their own label, the
//! rest share `other`; the series of a process expire some time after its
//! last instance exited. [`Aggregator`] makes those decisions and is pure
//! (unit-tested without a kernel); [`Metrics`] applies them to the
//! registry.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use prometheus::{
    CounterVec, Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::event::{Detector, Event, Frame};
use crate::targets::selector::Container;

/// The label of culprits outside a process's top N.
pub const OTHER: &str = "other";
/// The culprit label when no frame belongs to the application.
pub const UNKNOWN: &str = "unknown";
/// Labels longer than this are cut: a C++ template name can be kilobytes.
const MAX_LABEL_LEN: usize = 160;
/// Buckets of the duration histogram: 1 ms to 10 s.
pub const DURATION_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Distinct folded stacks kept per process; the rest are merged.
const MAX_STACKS_PER_PROCESS: usize = 500;
/// Joins a process's label values into the aggregator's key. `cut` turns
/// control characters in labels into `?`, so it never occurs in one.
const KEY_SEP: char = '\u{1f}';

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics registry: {0}")]
    Prometheus(#[from] prometheus::Error),
}

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
            let (min_name, min_secs) = p
                .slots
                .iter()
                .min_by(|a, b| a.1.total_cmp(b.1))
                .map(|(k, v)| (k.clone(), *v))
                .expect("top_n >= 1 slots");
            // Half again as heavy: two culprits of equal weight must not
            // swap labels at every event.
            if tally > min_secs * 1.5 && culprit != OTHER {
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

/// A process key's label values followed by `rest`.
fn labels<'a>(key: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    key.split(KEY_SEP).chain(rest.iter().copied()).collect()
}

/// A process key for people: `name` or `name[container]`.
fn display(key: &str) -> String {
    let mut parts = key.split(KEY_SEP);
    let name = parts.next().unwrap_or_default();
    match (parts.next().unwrap_or(""), parts.next().unwrap_or("")) {
        ("", "") => name.to_string(),
        ("", pod) => format!("{name}[pod {pod}]"),
        (c, _) => format!("{name}[{c}]"),
    }
}

/// The culprit label of an event: its function, or the binary it lies in
/// when it has no symbol; never its address.
pub fn culprit_label(culprit: Option<&Frame>) -> String {
    let name = culprit.and_then(|f| {
        f.function.clone().or_else(|| {
            f.module.as_ref().map(|m| {
                format!(
                    "[{}]",
                    std::path::Path::new(m)
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or(m)
                )
            })
        })
    });
    cut(name.as_deref().unwrap_or(UNKNOWN))
}

/// The syscall label: its name, `syscall_N` past our table, `none` when
/// the thread was not in a syscall.
pub fn syscall_label(ev: &Event) -> String {
    match ev.syscall {
        Some(n) => n.to_string(),
        None if ev.syscall_nr >= 0 => format!("syscall_{}", ev.syscall_nr),
        None => "none".to_string(),
    }
}

fn cut(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if clean.len() <= MAX_LABEL_LEN {
        return clean;
    }
    let mut end = MAX_LABEL_LEN;
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &clean[..end])
}

/// Folded stacks (`frame;frame;frame value`), outermost frame first, the
/// process name as root, values in microseconds of blocking.
#[derive(Debug, Default)]
pub struct Folded {
    stacks: HashMap<String, HashMap<String, u64>>,
}

impl Folded {
    /// Adds `ev` under `process` (the key that [`Folded::forget`] takes),
    /// with `root` as the outermost frame.
    pub fn add(&mut self, process: &str, root: &str, ev: &Event) {
        let mut frames = vec![fold_frame(root)];
        frames.extend(ev.stack.iter().rev().map(|f| {
            let name = f.function.clone().unwrap_or_else(|| {
                f.module
                    .as_deref()
                    .and_then(|m| std::path::Path::new(m).file_name()?.to_str())
                    .map(|m| format!("[{m}]"))
                    .unwrap_or_else(|| "[unknown]".to_string())
            });
            fold_frame(&name)
        }));
        let per = self.stacks.entry(process.to_string()).or_default();
        let mut key = frames.join(";");
        if !per.contains_key(&key) && per.len() >= MAX_STACKS_PER_PROCESS {
            key = format!("{};[other stacks]", fold_frame(root));
        }
        *per.entry(key).or_default() += ev.duration_ns / 1000;
    }

    pub fn forget(&mut self, process: &str) {
        self.stacks.remove(process);
    }

    pub fn render(&self) -> String {
        let mut lines: Vec<String> = self
            .stacks
            .values()
            .flat_map(|m| m.iter().map(|(k, v)| format!("{k} {v}")))
            .collect();
        lines.sort();
        let mut s = lines.join("\n");
        if !s.is_empty() {
            s.push('\n');
        }
        s
    }
}

/// Folded-stack frames may not hold `;` (the separator), spaces (before
/// the value) or newlines.
fn fold_frame(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect()
}

/// The registry and its metric families.
pub struct Metrics {
    registry: Registry,
    events: IntCounterVec,
    seconds: CounterVec,
    durations: HistogramVec,
    tagged: IntGaugeVec,
    lost: IntCounter,
    sym_failures: IntCounter,
    drops: IntCounterVec,
    drops_seen: HashMap<&'static str, u64>,
    lost_seen: u64,
    sym_seen: u64,
    /// Per-process series also carry `container` and `pod`.
    containers: bool,
    pub agg: Aggregator,
    pub folded: Folded,
    /// Strict calls and stalls.
    loops: LoopMetrics,
}

impl Metrics {
    pub fn new(top_n: usize, expire_after: Duration) -> Result<Self, MetricsError> {
        Self::with_labels(top_n, expire_after, false)
    }

    /// `containers`: per-process series get `container` and `pod` labels.
    pub fn with_labels(
        top_n: usize,
        expire_after: Duration,
        containers: bool,
    ) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let proc_labels: &[&str] = if containers {
            &["process", "container", "pod"]
        } else {
            &["process"]
        };
        let with = |rest: &[&'static str]| -> Vec<&str> {
            proc_labels.iter().chain(rest).copied().collect()
        };
        let culprit_labels = with(&["class", "syscall", "culprit"]);
        let events = IntCounterVec::new(
            Opts::new(
                "blockwatch_blocking_events_total",
                "Blocking waits on event-loop threads at or over the threshold.",
            ),
            &culprit_labels,
        )?;
        let seconds = CounterVec::new(
            Opts::new(
                "blockwatch_blocking_seconds_total",
                "Time event-loop threads spent in blocking waits at or over the threshold.",
            ),
            &culprit_labels,
        )?;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "blockwatch_blocking_duration_seconds",
                "Duration of blocking waits on event-loop threads.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &with(&["class"]),
        )?;
        let tagged = IntGaugeVec::new(
            Opts::new(
                "blockwatch_tagged_threads",
                "Threads known to run an event loop, by process name and runtime.",
            ),
            &with(&["runtime"]),
        )?;
        let lost = IntCounter::new(
            "blockwatch_events_lost_total",
            "Blocking events dropped in the kernel (ring buffer full).",
        )?;
        let sym_failures = IntCounter::new(
            "blockwatch_symbolization_failures_total",
            "Stack frames that could not be symbolized.",
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("blockwatch_build_info", "blockwatch's version; always 1."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(durations.clone()))?;
        registry.register(Box::new(tagged.clone()))?;
        registry.register(Box::new(lost.clone()))?;
        registry.register(Box::new(sym_failures.clone()))?;
        let drops = IntCounterVec::new(
            Opts::new(
                "blockwatch_kernel_drops_total",
                "What the kernel programs could not record: `stack` (a frame-pointer stack), \
                 `user_stack` (a stack copy for unwinding: the event has a shorter stack), \
                 `probe` (a futex wait to classify), `tag` (a new thread: the tag map is full), \
                 `task` (an exec or exit record: a process that started or exited may be missed).",
            ),
            &["what"],
        )?;
        registry.register(Box::new(drops.clone()))?;
        registry.register(Box::new(build_info))?;
        let loops = LoopMetrics::new(&registry, &with)?;
        Ok(Self {
            registry,
            events,
            seconds,
            durations,
            tagged,
            lost,
            sym_failures,
            drops,
            drops_seen: HashMap::new(),
            lost_seen: 0,
            sym_seen: 0,
            containers,
            agg: Aggregator::new(top_n, expire_after),
            folded: Folded::default(),
            loops,
        })
    }

    /// Counts one event; returns its culprit label.
    pub fn observe(&mut self, ev: &Event) -> String {
        self.observe_in(ev, None)
    }

    /// The aggregator's key of a process: its label values, joined.
    fn key(&self, process: &str, container: Option<&Container>) -> String {
        let process = cut(process);
        if !self.containers {
            return process;
        }
        let c = container.cloned().unwrap_or_default();
        format!("{process}{KEY_SEP}{}{KEY_SEP}{}", cut(&c.id), cut(&c.pod))
    }

    /// Counts one event of a process in `container`; returns its culprit
    /// label.
    pub fn observe_in(&mut self, ev: &Event, container: Option<&Container>) -> String {
        let process = self.key(&ev.comm, container);
        let class = ev.class.as_str();
        let syscall = syscall_label(ev);
        let culprit = culprit_label(ev.culprit.as_ref());
        let secs = ev.duration_ns as f64 / 1e9;
        let placement = self
            .agg
            .record(ev.pid, &process, class, &syscall, &culprit, secs);
        for k in &placement.removed {
            self.remove_series(&process, k);
        }
        let values = labels(&process, &[class, &syscall, &placement.culprit]);
        match ev.detector {
            Detector::Offcpu => {}
            Detector::Strict => {
                self.loops.strict_calls.with_label_values(&values).inc();
                self.loops
                    .strict_seconds
                    .with_label_values(&values)
                    .inc_by(secs);
                return culprit;
            }
            Detector::Stall => {
                let values = labels(&process, &[&placement.culprit]);
                self.loops.stalls.with_label_values(&values).inc();
                self.loops
                    .stall_seconds
                    .with_label_values(&values)
                    .inc_by(secs);
                return culprit;
            }
        }
        self.events.with_label_values(&values).inc();
        self.seconds.with_label_values(&values).inc_by(secs);
        self.durations
            .with_label_values(&labels(&process, &[class]))
            .observe(secs);
        self.folded.add(&process, &display(&process), ev);
        culprit
    }

    fn remove_series(&self, process: &str, k: &SeriesKey) {
        let values = labels(process, &[&k.class, &k.syscall, &k.culprit]);
        // Absent series (never created) are fine to "remove".
        let _ = self.events.remove_label_values(&values);
        let _ = self.seconds.remove_label_values(&values);
        let _ = self.loops.strict_calls.remove_label_values(&values);
        let _ = self.loops.strict_seconds.remove_label_values(&values);
        if k.class == crate::event::Class::Stall.as_str() {
            let values = labels(process, &[&k.culprit]);
            let _ = self.loops.stalls.remove_label_values(&values);
            let _ = self.loops.stall_seconds.remove_label_values(&values);
        }
    }

    /// Drops the series of processes gone for the expiry time.
    pub fn expire(&mut self, now: Instant) -> Vec<String> {
        let expired = self.agg.expire(now);
        let mut names = Vec::new();
        for e in expired {
            for k in &e.series {
                self.remove_series(&e.process, k);
            }
            for c in &e.classes {
                let _ = self
                    .durations
                    .remove_label_values(&labels(&e.process, &[c.as_str()]));
            }
            self.folded.forget(&e.process);
            names.push(display(&e.process));
        }
        names
    }

    /// Replaces the tagged-thread gauges with fresh counts, by process
    /// name, container and runtime.
    pub fn set_tagged(&self, counts: &HashMap<(String, Option<Container>, String), i64>) {
        self.tagged.reset();
        for ((process, container, runtime), n) in counts {
            let key = self.key(process, container.as_ref());
            self.tagged
                .with_label_values(&labels(&key, &[runtime.as_str()]))
                .set(*n);
        }
    }

    /// Takes the kernel's running total of lost events.
    pub fn set_lost(&mut self, total: u64) {
        if total > self.lost_seen {
            self.lost.inc_by(total - self.lost_seen);
            self.lost_seen = total;
        }
    }

    /// Takes the kernel's running total of drops of one kind.
    pub fn set_drops(&mut self, what: &'static str, total: u64) {
        let seen = self.drops_seen.entry(what).or_insert(0);
        if total > *seen {
            self.drops.with_label_values(&[what]).inc_by(total - *seen);
            *seen = total;
        } else if *seen == 0 {
            // Present from the start, at 0: a dashboard sees the series.
            self.drops.with_label_values(&[what]);
        }
    }

    /// Takes the symbolizer's running total of failures.
    pub fn set_symbolization_failures(&mut self, total: u64) {
        if total > self.sym_seen {
            self.sym_failures.inc_by(total - self.sym_seen);
            self.sym_seen = total;
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// The strict and stall detectors' metrics. Their culprit labels share
/// each process's top-N budget with the blocking metrics (one
/// [`Aggregator`]), so they add no cardinality of their own beyond
/// `syscall`.
struct LoopMetrics {
    strict_calls: IntCounterVec,
    strict_seconds: CounterVec,
    stalls: IntCounterVec,
    stall_seconds: CounterVec,
}

impl LoopMetrics {
    fn new<'a>(
        registry: &Registry,
        with: &dyn Fn(&[&'static str]) -> Vec<&'a str>,
    ) -> Result<Self, MetricsError> {
        let culprit_labels = with(&["class", "syscall", "culprit"]);
        let stall_labels = with(&["culprit"]);
        let m = Self {
            strict_calls: IntCounterVec::new(
                Opts::new(
                    "blockwatch_strict_calls_total",
                    "Blocking-class syscalls on event-loop threads that stayed on the CPU (--strict).",
                ),
                &culprit_labels,
            )?,
            strict_seconds: CounterVec::new(
                Opts::new(
                    "blockwatch_strict_seconds_total",
                    "Time event-loop threads spent in blocking-class syscalls that stayed on the CPU (--strict).",
                ),
                &culprit_labels,
            )?,
            stalls: IntCounterVec::new(
                Opts::new(
                    "blockwatch_stalls_total",
                    "Event-loop stalls: CPU work over the stall threshold without reaching the idle wait.",
                ),
                &stall_labels,
            )?,
            stall_seconds: CounterVec::new(
                Opts::new(
                    "blockwatch_stall_seconds_total",
                    "On-CPU time of event-loop stalls.",
                ),
                &stall_labels,
            )?,
        };
        registry.register(Box::new(m.strict_calls.clone()))?;
        registry.register(Box::new(m.strict_seconds.clone()))?;
        registry.register(Box::new(m.stalls.clone()))?;
        registry.register(Box::new(m.stall_seconds.clone()))?;
        Ok(m)
    }
}

#[cfg(test)]
mod loop_metric_tests {
    use super::*;
    use crate::event::{Class, OffState};
    use std::time::SystemTime;

    fn ev(detector: Detector, class: Class, syscall: Option<&'static str>, ms: u64) -> Event {
        let f = Frame {
            function: Some("handler".into()),
            ..Default::default()
        };
        Event {
            ts: SystemTime::now(),
            pid: 10,
            tid: 10,
            comm: "svc".into(),
            thread: "svc".into(),
            syscall,
            syscall_nr: if syscall.is_some() { 257 } else { -1 },
            class,
            duration_ns: ms * 1_000_000,
            state: OffState::Running,
            stack: vec![f.clone()],
            offender: Some(f.clone()),
            culprit: Some(f),
            detector,
            busy_ns: None,
            samples: None,
        }
    }

    #[test]
    fn strict_calls_and_stalls_have_their_own_series() {
        let mut m = Metrics::new(20, Duration::from_secs(1)).unwrap();
        for _ in 0..3 {
            m.observe(&ev(Detector::Strict, Class::File, Some("openat"), 1));
        }
        m.observe(&ev(Detector::Stall, Class::Stall, None, 300));
        let text = m.render().unwrap();
        for want in [
            r#"blockwatch_strict_calls_total{class="file",culprit="handler",process="svc",syscall="openat"} 3"#,
            r#"blockwatch_strict_seconds_total{class="file",culprit="handler",process="svc",syscall="openat"} 0.003"#,
            r#"blockwatch_stalls_total{culprit="handler",process="svc"} 1"#,
            r#"blockwatch_stall_seconds_total{culprit="handler",process="svc"} 0.3"#,
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        // Neither counts as a blocking wait, nor feeds /stacks.
        assert!(
            !text.contains("blockwatch_blocking_events_total{"),
            "{text}"
        );
        assert!(m.folded.render().is_empty());
        let t = Instant::now();
        m.agg.process_exit(10, t);
        m.expire(t + Duration::from_secs(2));
        let text = m.render().unwrap();
        assert!(!text.contains("process=\"svc\""), "{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Class, OffState};
    use std::time::SystemTime;

    fn ev(pid: u32, comm: &str, function: &str, ms: u64) -> Event {
        let f = Frame {
            address: 0x1234,
            function: Some(function.into()),
            module: Some("/srv/app.py".into()),
            ..Default::default()
        };
        Event {
            ts: SystemTime::now(),
            pid,
            tid: pid,
            comm: comm.into(),
            thread: comm.into(),
            syscall: Some("clock_nanosleep"),
            syscall_nr: 230,
            class: Class::Sleep,
            duration_ns: ms * 1_000_000,
            state: OffState::Sleeping,
            stack: vec![f.clone()],
            offender: Some(f.clone()),
            culprit: Some(f),
            detector: Default::default(),
            busy_ns: None,
            samples: None,
        }
    }

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

    #[test]
    fn registry_exports_and_expires() {
        let mut m = Metrics::new(20, Duration::from_secs(1)).unwrap();
        for _ in 0..3 {
            m.observe(&ev(10, "svc", "handler", 80));
        }
        m.set_lost(5);
        m.set_lost(7);
        m.set_drops("user_stack", 0);
        m.set_drops("user_stack", 4);
        m.set_drops("user_stack", 4);
        let text = m.render().unwrap();
        assert!(
            text.contains(
                r#"blockwatch_blocking_events_total{class="sleep",culprit="handler",process="svc",syscall="clock_nanosleep"} 3"#
            ),
            "{text}"
        );
        assert!(text.contains("blockwatch_events_lost_total 7"), "{text}");
        assert!(
            text.contains(r#"blockwatch_kernel_drops_total{what="user_stack"} 4"#),
            "{text}"
        );
        assert!(text.contains("blockwatch_build_info{version="), "{text}");
        assert!(text.contains(r#"le="0.001""#) && text.contains(r#"le="10""#));
        assert!(!text.contains("pid"), "no PID labels: {text}");
        assert!(m.folded.render().contains("svc;handler 240000\n"));
        let t = Instant::now();
        m.agg.process_exit(10, t);
        assert_eq!(m.expire(t + Duration::from_secs(2)), ["svc"]);
        let text = m.render().unwrap();
        assert!(!text.contains("process=\"svc\""), "{text}");
        assert!(m.folded.render().is_empty());
    }

    #[test]
    fn container_labels_split_series_of_one_name() {
        let mut m = Metrics::with_labels(20, Duration::from_secs(1), true).unwrap();
        let a = Container {
            id: "0123456789ab".into(),
            pod: "1a2b3c4d-0000-1111-2222-333344445555".into(),
        };
        m.observe_in(&ev(10, "svc", "handler", 80), Some(&a));
        m.observe_in(&ev(11, "svc", "handler", 80), None);
        let mut tagged = HashMap::new();
        tagged.insert(
            ("svc".to_string(), Some(a.clone()), "python".to_string()),
            2,
        );
        m.set_tagged(&tagged);
        let text = m.render().unwrap();
        for want in [
            r#"blockwatch_blocking_events_total{class="sleep",container="0123456789ab",culprit="handler",pod="1a2b3c4d-0000-1111-2222-333344445555",process="svc",syscall="clock_nanosleep"} 1"#,
            r#"blockwatch_blocking_events_total{class="sleep",container="",culprit="handler",pod="",process="svc",syscall="clock_nanosleep"} 1"#,
            r#"blockwatch_tagged_threads{container="0123456789ab",pod="1a2b3c4d-0000-1111-2222-333344445555",process="svc",runtime="python"} 2"#,
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        let stacks = m.folded.render();
        assert!(
            stacks.contains("svc[0123456789ab];handler 80000\n"),
            "{stacks}"
        );
        assert!(stacks.contains("svc;handler 80000\n"), "{stacks}");
        let t = Instant::now();
        m.agg.process_exit(10, t);
        assert_eq!(m.expire(t + Duration::from_secs(2)), ["svc[0123456789ab]"]);
        let text = m.render().unwrap();
        assert!(!text.contains(r#"blockwatch_blocking_events_total{class="sleep",container="0"#));
        assert!(text.contains(r#"container="",culprit="handler""#), "{text}");
    }

    #[test]
    fn labels_never_hold_addresses() {
        let f = Frame {
            address: 0xdead,
            module: Some("/usr/lib/libfoo.so".into()),
            ..Default::default()
        };
        assert_eq!(culprit_label(Some(&f)), "[libfoo.so]");
        assert_eq!(culprit_label(Some(&Frame::default())), UNKNOWN);
        assert_eq!(culprit_label(None), UNKNOWN);
        let long = "x".repeat(1000);
        assert!(
            culprit_label(Some(&Frame {
                function: Some(long),
                ..Default::default()
            }))
            .len()
                < 200
        );
    }
}
