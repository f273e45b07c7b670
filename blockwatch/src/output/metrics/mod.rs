//! Prometheus metrics of the daemon, with bounded label cardinality.
//!
//! Labels are names people act on (process, class, syscall, culprit), never
//! a PID, a TID or an address: those are unbounded over a host's life.
//! [`Aggregator`] (in `aggregator.rs`) decides each event's culprit label
//! and which series expire, and is pure; [`Metrics`] applies its decisions
//! to the registry: the blocking metrics here, the strict and stall ones
//! in `loops.rs`. [`Folded`] (`folded.rs`) keeps the stacks `/stacks`
//! serves and their culprits, which `/` and `/flamegraph.svg` draw.

mod aggregator;
mod folded;
mod loops;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::{
    CounterVec, Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

pub use aggregator::{Aggregator, Expired, OTHER, Placement, SeriesKey};
pub use folded::{Folded, folded_name};
use loops::LoopMetrics;

use crate::event::{Detector, Event, Frame};
use crate::output::labels;
use crate::pipeline::strict::StrictCalls;
use crate::targets::selector::Container;

/// The culprit label when no frame belongs to the application.
pub const UNKNOWN: &str = labels::METRIC.unknown;
/// Labels longer than this are cut: a C++ template name can be kilobytes.
const MAX_LABEL_LEN: usize = 160;
/// Buckets of the duration histogram: 1 ms to 10 s.
pub const DURATION_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Joins a process's label values into the aggregator's key. `cut` turns
/// control characters in labels into `?`, so it never occurs in one.
const KEY_SEP: char = '\u{1f}';

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics registry: {0}")]
    Prometheus(#[from] prometheus::Error),
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
    cut(&labels::frame_name(culprit, &labels::METRIC))
}

/// The syscall label: its name, `syscall_N` past our table, `none` when
/// the thread was not in a syscall.
pub fn syscall_label(ev: &Event) -> String {
    labels::syscall(ev, labels::NO_SYSCALL_METRIC).into_owned()
}

fn cut(s: &str) -> String {
    let clean = crate::text::scrub(s).into_owned();
    if clean.len() <= MAX_LABEL_LEN {
        return clean;
    }
    let mut end = MAX_LABEL_LEN;
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &clean[..end])
}

/// Registers `c` and hands it back.
fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> Result<C, MetricsError> {
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

/// How many events of one kind, and their seconds, under the same labels.
struct Tally {
    count: IntCounterVec,
    seconds: CounterVec,
}

impl Tally {
    fn new(
        registry: &Registry,
        count: Opts,
        seconds: Opts,
        labels: &[&str],
    ) -> Result<Self, MetricsError> {
        Ok(Self {
            count: register(registry, IntCounterVec::new(count, labels)?)?,
            seconds: register(registry, CounterVec::new(seconds, labels)?)?,
        })
    }

    fn add(&self, values: &[&str], secs: f64) {
        self.add_n(values, 1, secs);
    }

    /// `n` events of `secs` in all.
    fn add_n(&self, values: &[&str], n: u64, secs: f64) {
        self.count.with_label_values(values).inc_by(n);
        self.seconds.with_label_values(values).inc_by(secs);
    }

    fn remove(&self, values: &[&str]) {
        // Absent series (never created) are fine to "remove".
        let _ = self.count.remove_label_values(values);
        let _ = self.seconds.remove_label_values(values);
    }
}

/// What blockwatch itself lost: kernel events, frames, kernel records.
struct Losses {
    lost: IntCounter,
    sym_failures: IntCounter,
    drops: IntCounterVec,
}

impl Losses {
    fn new(registry: &Registry) -> Result<Self, MetricsError> {
        Ok(Self {
            lost: register(
                registry,
                IntCounter::new(
                    "blockwatch_events_lost_total",
                    "Blocking events dropped in the kernel (ring buffer full).",
                )?,
            )?,
            sym_failures: register(
                registry,
                IntCounter::new(
                    "blockwatch_symbolization_failures_total",
                    "Stack frames that could not be symbolized.",
                )?,
            )?,
            drops: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "blockwatch_kernel_drops_total",
                        "What the kernel programs could not record: `stack` (a frame-pointer stack), \
                         `user_stack` (a stack copy for unwinding: the event has a shorter stack), \
                         `probe` (a futex wait to classify), `tag` (a new thread: the tag map is full), \
                 `task` (an exec or exit record: a process that started or exited may be missed), \
                 `strict_site` (a strict call counted at no call site: the strict-call map was full).",
                    ),
                    &["what"],
                )?,
            )?,
        })
    }
}

/// The registry and its metric families.
pub struct Metrics {
    registry: Registry,
    /// Off-CPU waits at or over the threshold.
    blocking: Tally,
    durations: HistogramVec,
    tagged: IntGaugeVec,
    losses: Losses,
    drops_seen: HashMap<&'static str, u64>,
    lost_seen: u64,
    sym_seen: u64,
    sym_evictions: IntCounter,
    evictions_seen: u64,
    /// Per-process series also carry `container` and `pod`.
    containers: bool,
    pub agg: Aggregator,
    pub folded: Folded,
    /// Strict calls.
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
        let blocking = Tally::new(
            &registry,
            Opts::new(
                "blockwatch_blocking_events_total",
                "Loop episodes (iterations of an event loop) at or over the threshold, by what took most of them (class stall: CPU work).",
            ),
            Opts::new(
                "blockwatch_blocking_seconds_total",
                "Wall time of loop episodes at or over the threshold: time no other task on the loop could run.",
            ),
            &with(&["class", "syscall", "culprit"]),
        )?;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "blockwatch_blocking_duration_seconds",
                "Wall time of loop episodes at or over the threshold.",
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
        let build_info = IntGaugeVec::new(
            Opts::new("blockwatch_build_info", "blockwatch's version; always 1."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        register(&registry, build_info)?;
        Ok(Self {
            blocking,
            durations: register(&registry, durations)?,
            tagged: register(&registry, tagged)?,
            losses: Losses::new(&registry)?,
            sym_evictions: register(
                &registry,
                IntCounter::new(
                    "blockwatch_symbolizer_evictions_total",
                    "Parsed binaries the symbolizer released, for being over its bound or unused \
                     for a minute (parsed again at their next unresolved address).",
                )?,
            )?,
            evictions_seen: 0,
            loops: LoopMetrics::new(&registry, &with)?,
            registry,
            drops_seen: HashMap::new(),
            lost_seen: 0,
            sym_seen: 0,
            containers,
            agg: Aggregator::new(top_n, expire_after),
            folded: Folded::default(),
        })
    }

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
    /// label. A strict call site's event counts nothing: its calls come
    /// from the kernel's counts ([`Metrics::observe_strict`]).
    pub fn observe_in(&mut self, ev: &Event, container: Option<&Container>) -> String {
        if ev.detector == Detector::Strict {
            return culprit_label(ev.culprit.as_ref());
        }
        let secs = ev.duration_ns as f64 / 1e9;
        let (process, syscall, placed, culprit) = self.place(ev, container, secs);
        let values = labels(&process, &[ev.class.as_str(), &syscall, &placed]);
        // Every episode is a blocking event, CPU-bound ones as class
        // `stall`.
        self.blocking.add(&values, secs);
        self.durations
            .with_label_values(&labels(&process, &[ev.class.as_str()]))
            .observe(secs);
        self.folded.add(&process, &display(&process), ev);
        culprit
    }

    /// Counts the calls the kernel counted at one strict call site of a
    /// process in `container`.
    pub fn observe_strict(&mut self, c: &StrictCalls, container: Option<&Container>) {
        let secs = c.total_ns as f64 / 1e9;
        let (process, syscall, placed, _) = self.place(&c.event, container, secs);
        let values = labels(&process, &[c.event.class.as_str(), &syscall, &placed]);
        self.loops.strict.add_n(&values, c.calls, secs);
    }

    /// Gives `secs` of `ev` (of a process in `container`) its place in the
    /// process's top culprits, dropping the series that fell out: the
    /// process key, the syscall label, the culprit label its series get
    /// (an "other" bucket past the top N), and its own culprit label.
    fn place(
        &mut self,
        ev: &Event,
        container: Option<&Container>,
        secs: f64,
    ) -> (String, String, String, String) {
        let process = self.key(&ev.comm, container);
        let class = ev.class.as_str();
        let syscall = syscall_label(ev);
        let culprit = culprit_label(ev.culprit.as_ref());
        let placement = self
            .agg
            .record(ev.pid, &process, class, &syscall, &culprit, secs);
        for k in &placement.removed {
            self.remove_series(&process, k);
        }
        (process, syscall, placement.culprit, culprit)
    }

    fn remove_series(&self, process: &str, k: &SeriesKey) {
        let values = labels(process, &[&k.class, &k.syscall, &k.culprit]);
        self.blocking.remove(&values);
        self.loops.strict.remove(&values);
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
            self.losses.lost.inc_by(total - self.lost_seen);
            self.lost_seen = total;
        }
    }

    /// Takes the kernel's running total of drops of one kind.
    pub fn set_drops(&mut self, what: &'static str, total: u64) {
        let seen = self.drops_seen.entry(what).or_insert(0);
        if total > *seen {
            self.losses
                .drops
                .with_label_values(&[what])
                .inc_by(total - *seen);
            *seen = total;
        } else if *seen == 0 {
            // Present from the start, at 0: a dashboard sees the series.
            self.losses.drops.with_label_values(&[what]);
        }
    }

    /// Takes the symbolizer's running total of failures.
    pub fn set_symbolization_failures(&mut self, total: u64) {
        if total > self.sym_seen {
            self.losses.sym_failures.inc_by(total - self.sym_seen);
            self.sym_seen = total;
        }
    }

    /// Takes the symbolizer's running total of parsed binaries released.
    pub fn set_symbolizer_evictions(&mut self, total: u64) {
        if total > self.evictions_seen {
            self.sym_evictions.inc_by(total - self.evictions_seen);
            self.evictions_seen = total;
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Class, OffState};
    use crate::output::fixtures::{event, frame};

    /// `ms` of sleep by `comm`[`pid`] in `function`.
    fn ev(pid: u32, comm: &str, function: &str, ms: u64) -> Event {
        let f = frame(0x1234, Some(function), Some("/srv/app.py"));
        Event {
            pid,
            tid: pid,
            comm: comm.into(),
            thread: comm.into(),
            state: OffState::Sleeping,
            stack: vec![f.clone()].into(),
            ..event(Some(f), Some("clock_nanosleep"), 230, Class::Sleep, ms)
        }
    }

    /// A strict call or a stall of `ms` by svc[10] in `handler`.
    fn loop_ev(detector: Detector, class: Class, syscall: Option<&'static str>, ms: u64) -> Event {
        Event {
            syscall,
            syscall_nr: if syscall.is_some() { 257 } else { -1 },
            class,
            state: OffState::Running,
            detector,
            ..ev(10, "svc", "handler", ms)
        }
    }

    #[test]
    fn strict_calls_have_their_own_series_and_cpu_episodes_are_episodes() {
        let mut m = Metrics::new(20, Duration::from_secs(1)).unwrap();
        // A site's event counts nothing; the kernel's counts do.
        let site = loop_ev(Detector::Strict, Class::File, Some("openat"), 1);
        assert_eq!(m.observe(&site), "handler");
        assert!(
            !m.render()
                .unwrap()
                .contains("blockwatch_strict_calls_total{")
        );
        for calls in [2, 1] {
            m.observe_strict(
                &StrictCalls {
                    event: site.clone(),
                    calls,
                    total_ns: calls * 1_000_000,
                    max_ns: 1_000_000,
                },
                None,
            );
        }
        let text = m.render().unwrap();
        for want in [
            r#"blockwatch_strict_calls_total{class="file",culprit="handler",process="svc",syscall="openat"} 3"#,
            r#"blockwatch_strict_seconds_total{class="file",culprit="handler",process="svc",syscall="openat"} 0.003"#,
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        // Strict calls are no episodes, and feed no /stacks.
        assert!(
            !text.contains("blockwatch_blocking_events_total{"),
            "{text}"
        );
        assert!(m.folded.render().is_empty());
        m.observe(&loop_ev(Detector::Stall, Class::Stall, None, 300));
        let text = m.render().unwrap();
        for want in [
            r#"blockwatch_blocking_events_total{class="stall",culprit="handler",process="svc",syscall="none"} 1"#,
            r#"blockwatch_blocking_seconds_total{class="stall",culprit="handler",process="svc",syscall="none"} 0.3"#,
        ] {
            assert!(text.contains(want), "{want}\n{text}");
        }
        assert!(!text.contains("blockwatch_stall"), "gone: {text}");
        assert!(
            !m.folded.render().is_empty(),
            "a CPU-bound episode has a stack"
        );
        let t = Instant::now();
        m.agg.process_exit(10, t);
        m.expire(t + Duration::from_secs(2));
        let text = m.render().unwrap();
        assert!(!text.contains("process=\"svc\""), "{text}");
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
