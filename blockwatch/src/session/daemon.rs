//! `blockwatch daemon`: a long-running session for systemd. It mirrors
//! `trace` (load, tag, drain the ring buffer) but its outputs are
//! Prometheus metrics, folded stacks over HTTP, and one journal line per
//! new blocking stack.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use aya::maps::{HashMap as BpfHashMap, MapData};
use blockwatch_common::{Config, TAG_LOOP, ThreadTag, WatchRule};
use log::{debug, info, warn};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};

use crate::bpf::counters::{Counters, KERNEL_DROPS};
use crate::bpf::loader::{self, Loaded};
use crate::cli::DaemonArgs;
use crate::output::metrics::Metrics;
use crate::pipeline::{Output, Pipeline};
use crate::settings::{self, Overrides, Settings};
use crate::targets::selector::{Container, Selector, cgroup_paths, container_of};
use crate::targets::{self, CommRules, TagMaps, ThreadsMode};

/// New-stack keys remembered; past this the set restarts (a stack then
/// logged twice is harmless, unbounded memory is not).
const MAX_SEEN_STACKS: usize = 100_000;
/// How often gauges (tagged threads) and expiry are refreshed.
const REFRESH: Duration = Duration::from_secs(2);

impl DaemonArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            threshold: self.threshold,
            threads: self.threads,
            auto: self.auto,
            select: self.matching.patterns(&self.comms),
            pids: self.pids.clone(),
            container_labels: self.container_labels,
            strict: self.detectors.strict,
            stall_threshold: self.detectors.stall_threshold,
            user_stack_size: self.user_stack_size,
        }
    }
}

fn settings(file: Option<&Path>, o: &Overrides) -> anyhow::Result<Settings> {
    let mut s = match file {
        Some(p) => settings::load(p)?,
        None => Settings::default(),
    };
    s.apply(o)?;
    Ok(s)
}

/// Writes one message to systemd's notify socket, if there is one
/// (`Type=notify`). The protocol is a datagram of `KEY=value` lines.
pub fn sd_notify(msg: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt as _;
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = path.as_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            // Abstract socket namespace (systemd's default in containers).
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg.as_bytes(), &addr)?;
        } else {
            sock.send_to(msg.as_bytes(), Path::new(&path))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        warn!("cannot notify systemd ({}): {e}", path.to_string_lossy());
    }
}

/// The watchdog ping interval systemd asks for (half its timeout).
fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok()
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2).max(Duration::from_millis(100)))
}

/// A token bucket: `per_minute` lines, in bursts of up to `per_minute`.
#[derive(Debug)]
pub struct RateLimit {
    per_minute: u32,
    tokens: f64,
    last: Instant,
    pub suppressed: u64,
}

impl RateLimit {
    pub fn new(per_minute: u32, now: Instant) -> Self {
        Self {
            per_minute,
            tokens: per_minute as f64,
            last: now,
            suppressed: 0,
        }
    }

    pub fn set_rate(&mut self, per_minute: u32) {
        self.per_minute = per_minute;
        self.tokens = self.tokens.min(per_minute as f64);
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let cap = self.per_minute as f64;
        self.tokens = (self.tokens + dt * cap / 60.0).min(cap);
    }

    /// Whether one more line may be written now; counts it as suppressed
    /// otherwise.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// The "N more suppressed" line, once a token is available again.
    pub fn flush(&mut self, now: Instant) -> Option<String> {
        if self.suppressed == 0 {
            return None;
        }
        self.refill(now);
        if self.tokens < 1.0 {
            return None;
        }
        self.tokens -= 1.0;
        let n = std::mem::take(&mut self.suppressed);
        Some(format!(
            "blockwatch: {n} more new blocking stacks suppressed (at most {} logged per minute; see /metrics and /stacks)",
            self.per_minute
        ))
    }
}

/// Which processes the daemon watches.
struct Rules {
    select: Selector,
    exclude: CommRules,
    auto: bool,
    rule: WatchRule,
    auto_rule: WatchRule,
}

impl Rules {
    fn new(s: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            select: Selector::new(&s.select)?,
            exclude: CommRules::new(&s.exclude_comms)?,
            auto: s.auto,
            rule: s.threads.rule(false),
            // Every process on the host: only threads seen idling in an
            // event-loop wait are reported.
            auto_rule: ThreadsMode::Loop.rule(false),
        })
    }

    fn needs_execs(&self) -> bool {
        self.auto || !self.select.is_empty()
    }

    /// The rule for a process of this name, if it is to be watched.
    fn rule_for(&self, pid: u32, comm: &str) -> Option<WatchRule> {
        if pid == std::process::id() || self.exclude.matches(comm) {
            return None;
        }
        if self.select.selects(pid, comm) {
            return Some(self.rule);
        }
        // Kernel threads have no command line and no event loop.
        (self.auto && !is_kernel_thread(pid)).then_some(self.auto_rule)
    }
}

fn is_kernel_thread(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).map_or(true, |c| c.is_empty())
}

/// The runtime label of a process, guessed from what it maps and names.
fn runtime_of(pid: u32) -> &'static str {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    if maps.contains("libpython") || exe.starts_with("python") {
        return "python";
    }
    if maps.contains("libnode") || exe == "node" || exe == "nodejs" {
        return "node";
    }
    let tokio = targets::threads_of(pid).into_iter().any(|tid| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
            .is_ok_and(|c| c.starts_with("tokio-r"))
    });
    if tokio { "tokio" } else { "unknown" }
}

struct State {
    rules: Rules,
    /// Processes the daemon put in WATCHED (not those the kernel added as
    /// children): the ones to unwatch when a reload drops their rule.
    watched: HashSet<u32>,
    explicit: HashSet<u32>,
    to_watch: Vec<u32>,
    exited: Vec<u32>,
    seen: HashSet<(String, &'static str, String, String)>,
    limit: RateLimit,
    runtimes: HashMap<u32, (String, &'static str)>,
    /// Container identity per process, when metrics carry it (read at
    /// watch time, so a process that blocks and exits keeps its labels).
    containers: Option<HashMap<u32, Option<Container>>>,
    /// Processes with at least one event-loop thread (as of the last
    /// refresh).
    loop_pids: HashSet<u32>,
}

impl State {
    fn container(&mut self, pid: u32) -> Option<Container> {
        let cache = self.containers.as_mut()?;
        cache
            .entry(pid)
            .or_insert_with(|| {
                let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
                container_of(&cgroup_paths(&cgroup))
            })
            .clone()
    }
}

impl State {
    fn take(&mut self, output: Output, metrics: &Mutex<Metrics>) {
        match output {
            Output::Event(ev) => {
                let container = self.container(ev.pid);
                let culprit = metrics
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .observe_in(&ev, container.as_ref());
                let key = (
                    ev.comm.clone(),
                    ev.class.as_str(),
                    crate::output::metrics::syscall_label(&ev),
                    culprit,
                );
                if !self.seen.contains(&key) {
                    if self.seen.len() >= MAX_SEEN_STACKS {
                        self.seen.clear();
                    }
                    self.seen.insert(key);
                    if self.limit.take(Instant::now()) {
                        eprintln!("{}", crate::output::verdict::verdict(&ev));
                    }
                }
            }
            Output::Exec { pid, comm } => {
                self.runtimes.remove(&pid);
                if self.rules.rule_for(pid, &comm).is_some() {
                    self.to_watch.push(pid);
                }
            }
            Output::ProcessExit { pid } => self.exited.push(pid),
        }
    }
}

struct Maps {
    threads: BpfHashMap<MapData, u32, ThreadTag>,
    watched: BpfHashMap<MapData, u32, WatchRule>,
}

impl Maps {
    fn watch(&mut self, state: &mut State, pid: u32, rule: WatchRule) {
        let mut tm = TagMaps {
            threads: &mut self.threads,
            watched: &mut self.watched,
        };
        match tm.watch_process(pid, rule) {
            Ok(_) => {
                state.watched.insert(pid);
                state.container(pid);
            }
            // Gone between the scan and now: nothing to watch.
            Err(e) if !Path::new(&format!("/proc/{pid}")).exists() => {
                debug!("pid {pid} exited before it was watched: {e}")
            }
            Err(e) => warn!("cannot watch process {pid}: {e}"),
        }
    }

    fn unwatch(&mut self, pid: u32) {
        let _ = self.watched.remove(&pid);
        for tid in targets::threads_of(pid) {
            let _ = self.threads.remove(&tid);
        }
    }

    /// Watches every running process the rules select.
    fn scan(&mut self, state: &mut State) {
        for pid in targets::all_pids() {
            if state.watched.contains(&pid) {
                continue;
            }
            let Some(comm) = targets::process_name(pid) else {
                continue;
            };
            if let Some(rule) = state.rules.rule_for(pid, &comm) {
                self.watch(state, pid, rule);
            }
        }
    }

    /// Loop threads per (process name, runtime).
    /// Also refreshes `state.loop_pids`.
    fn tagged(&self, state: &mut State) -> HashMap<(String, Option<Container>, String), i64> {
        let mut counts = HashMap::new();
        state.loop_pids.clear();
        for (_, tag) in self.threads.iter().flatten() {
            if tag.tag != TAG_LOOP {
                continue;
            }
            state.loop_pids.insert(tag.tgid);
            let (name, runtime) = state
                .runtimes
                .entry(tag.tgid)
                .or_insert_with(|| {
                    (
                        targets::process_name(tag.tgid).unwrap_or_else(|| "unknown".into()),
                        runtime_of(tag.tgid),
                    )
                })
                .clone();
            let container = state.container(tag.tgid);
            *counts
                .entry((name, container, runtime.to_string()))
                .or_insert(0) += 1;
        }
        counts
    }
}

fn kernel_config(s: &Settings, rules: &Rules) -> Config {
    Config {
        threshold_ns: s.threshold.as_nanos().min(u64::MAX as u128) as u64,
        notify_all_execs: rules.needs_execs() as u8,
        ..Default::default()
    }
}

pub async fn run(args: DaemonArgs) -> anyhow::Result<i32> {
    let overrides = args.overrides();
    let config_path: Option<PathBuf> = args.config.clone();
    let mut current = settings(config_path.as_deref(), &overrides)?;
    if !current.has_targets() {
        bail!(
            "nothing to watch: give --comm GLOB, --pid PID or --auto, or `targets` in the config file (see `blockwatch daemon --help`)"
        );
    }
    for &pid in &current.pids {
        targets::validate_pid(pid)?;
    }
    let rules = Rules::new(&current)?;
    // The port first: a taken port is the likeliest start failure and
    // needs no kernel work to report.
    let listener = crate::output::http::bind(current.listen).await?;
    loader::check_privileges()?;

    let mut loaded = loader::load_with_user_stack(
        kernel_config(&current, &rules).threshold_ns,
        loader::force_raw_from_env(),
        current.user_stack_size,
    )?;
    // Strict mode and the stall threshold are read at start: a reload
    // that changes them says so and takes effect at restart.
    loader::enable_loop_detectors(
        &mut loaded.ebpf,
        loader::LoopOptions {
            strict: current.strict,
            stall_threshold: current.stall_threshold,
        },
    )?;
    let Loaded {
        mode,
        threads,
        watched,
        mut parks,
        mut pyprocs,
        mut config,
        counters,
        events,
        logger,
        ebpf,
    } = loaded;
    debug!("attach mode: {mode:?}");
    if let Some(logger) = logger {
        loader::forward_kernel_log(logger)?;
    }
    config.set(0, kernel_config(&current, &rules), 0)?;

    let metrics = Arc::new(Mutex::new(Metrics::with_labels(
        current.top_culprits,
        current.expire_after,
        current.container_labels,
    )?));
    crate::output::http::spawn(listener, metrics.clone());

    let mut state = State {
        rules,
        watched: HashSet::new(),
        explicit: current.pids.iter().copied().collect(),
        to_watch: Vec::new(),
        exited: Vec::new(),
        seen: HashSet::new(),
        limit: RateLimit::new(current.log_per_minute, Instant::now()),
        runtimes: HashMap::new(),
        containers: current.container_labels.then(HashMap::new),
        loop_pids: HashSet::new(),
    };
    let mut maps = Maps { threads, watched };
    for &pid in &current.pids {
        let rule = state.rules.rule;
        maps.watch(&mut state, pid, rule);
    }
    maps.scan(&mut state);

    eprintln!("blockwatch: {}", current.describe());
    sd_notify(&format!(
        "READY=1\nSTATUS=watching {} processes",
        state.watched.len()
    ));

    let mut pipeline = Pipeline::new();
    // SAFETY: the ring buffer owns its map fd for its whole life.
    let mut ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut refresh = tokio::time::interval(REFRESH);
    let watchdog = watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                pipeline.drain(guard.get_inner_mut(), &mut parks, |o| state.take(o, &metrics));
                guard.clear_ready();
                for pid in std::mem::take(&mut state.to_watch) {
                    if let Some(rule) = targets::process_name(pid)
                        .and_then(|c| state.rules.rule_for(pid, &c))
                    {
                        maps.watch(&mut state, pid, rule);
                    }
                }
                let now = Instant::now();
                let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
                for pid in std::mem::take(&mut state.exited) {
                    state.watched.remove(&pid);
                    state.runtimes.remove(&pid);
                    if let Some(c) = state.containers.as_mut() {
                        c.remove(&pid);
                    }
                    if state.explicit.remove(&pid) {
                        info!("process {pid} exited");
                    }
                    m.agg.process_exit(pid, now);
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            _ = sighup.recv() => {
                match reload(config_path.as_deref(), &overrides, &current) {
                    Ok(new) => {
                        apply_reload(&new, &current, &mut state, &mut maps, &metrics, &mut config);
                        current = new;
                        eprintln!("blockwatch: configuration reloaded; {}", current.describe());
                    }
                    Err(e) => {
                        let msg = e.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ");
                        eprintln!("blockwatch: error: reload refused, keeping the running configuration: {msg}");
                    }
                }
            }
            _ = refresh.tick() => {
                // Interpreter frames for the CPython processes among them
                // (each process is inspected a bounded number of times).
                let now = Instant::now();
                let tagged = maps.tagged(&mut state);
                // With --auto every process is watched, and nearly none is
                // Python: only those with a loop thread are worth reading
                // /proc/PID/maps for (an event needs a loop thread anyway).
                if state.rules.auto {
                    let pids: Vec<u32> = state.loop_pids.iter().chain(&state.explicit).copied().collect();
                    pipeline.refresh_interpreters(pids.into_iter(), &mut pyprocs);
                } else {
                    pipeline.refresh_interpreters(state.watched.iter().copied(), &mut pyprocs);
                }
                let counts = Counters::read(&counters);
                let mut m = metrics.lock().unwrap_or_else(|p| p.into_inner());
                m.set_tagged(&tagged);
                m.set_lost(counts.events_lost());
                for c in KERNEL_DROPS {
                    m.set_drops(c.label(), counts[c]);
                }
                m.set_symbolization_failures(pipeline.symbol_failures());
                // Exits the kernel did not report (processes it never
                // watched, lost records): /proc is the truth.
                for pid in m.agg.pids() {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        m.agg.process_exit(pid, now);
                    }
                }
                for name in m.expire(now) {
                    debug!("series of {name} expired");
                }
                drop(m);
                state.runtimes.retain(|pid, _| Path::new(&format!("/proc/{pid}")).exists());
                if let Some(line) = state.limit.flush(now) {
                    eprintln!("{line}");
                }
            }
            _ = watchdog_tick.tick(), if watchdog.is_some() => sd_notify("WATCHDOG=1"),
        }
    }

    sd_notify("STOPPING=1");
    // Dropping the programs detaches them; nothing is left in the kernel.
    drop(ring);
    drop(maps);
    drop(ebpf);
    eprintln!("blockwatch: detached; exiting");
    Ok(0)
}

fn reload(file: Option<&Path>, o: &Overrides, current: &Settings) -> anyhow::Result<Settings> {
    let Some(file) = file else {
        bail!("no --config file to reload");
    };
    let new = settings(Some(file), o).context("reading the new configuration")?;
    if !new.has_targets() {
        bail!("the new configuration watches nothing");
    }
    if new.listen != current.listen {
        warn!(
            "listen address changes ({} → {}) take effect at restart",
            current.listen, new.listen
        );
    }
    if (new.strict, new.stall_threshold, new.user_stack_size)
        != (
            current.strict,
            current.stall_threshold,
            current.user_stack_size,
        )
    {
        warn!("strict, stall_threshold and user_stack_size changes take effect at restart");
    }
    Ok(Settings {
        listen: current.listen,
        strict: current.strict,
        stall_threshold: current.stall_threshold,
        ..new
    })
}

fn apply_reload(
    new: &Settings,
    old: &Settings,
    state: &mut State,
    maps: &mut Maps,
    metrics: &Mutex<Metrics>,
    config: &mut aya::maps::Array<MapData, Config>,
) {
    let rules = match Rules::new(new) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("blockwatch: error: reload refused: {e}");
            return;
        }
    };
    if let Err(e) = config.set(0, kernel_config(new, &rules), 0) {
        warn!("cannot update the kernel configuration: {e}");
    }
    if new.container_labels != old.container_labels {
        // The label names of every series would change under Prometheus.
        eprintln!(
            "blockwatch: warning: container_labels changes only at restart; still {}",
            if old.container_labels { "on" } else { "off" }
        );
    }
    state.rules = rules;
    state.limit.set_rate(new.log_per_minute);
    metrics
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .agg
        .set_limits(new.top_culprits, new.expire_after);
    // Processes no rule selects any more are unwatched; new matches and
    // new explicit PIDs are watched.
    let explicit: HashSet<u32> = new.pids.iter().copied().collect();
    let drop_pids: Vec<u32> = state
        .watched
        .iter()
        .copied()
        .filter(|&pid| {
            !explicit.contains(&pid)
                && targets::process_name(pid)
                    .and_then(|c| state.rules.rule_for(pid, &c))
                    .is_none()
        })
        .collect();
    for pid in drop_pids {
        maps.unwatch(pid);
        state.watched.remove(&pid);
    }
    for &pid in &new.pids {
        if !old.pids.contains(&pid) && targets::validate_pid(pid).is_ok() {
            let rule = state.rules.rule;
            maps.watch(state, pid, rule);
        }
    }
    state.explicit = explicit;
    maps.scan(state);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_limits_and_reports_suppressed() {
        let t0 = Instant::now();
        let mut l = RateLimit::new(10, t0);
        let allowed = (0..25).filter(|_| l.take(t0)).count();
        assert_eq!(allowed, 10);
        assert_eq!(l.suppressed, 15);
        assert_eq!(l.flush(t0), None, "no token yet");
        let line = l.flush(t0 + Duration::from_secs(6)).unwrap();
        assert!(line.contains("15 more"), "{line}");
        assert_eq!(l.suppressed, 0);
        assert!(!l.take(t0 + Duration::from_secs(6)), "the flush used it");
        assert!(l.take(t0 + Duration::from_secs(12)));
        let mut none = RateLimit::new(0, t0);
        assert!(!none.take(t0 + Duration::from_secs(600)));
    }

    #[test]
    fn auto_never_watches_itself_or_excluded_names() {
        let s = Settings {
            auto: true,
            exclude_comms: vec!["sshd*".into()],
            ..Default::default()
        };
        let r = Rules::new(&s).unwrap();
        assert!(r.rule_for(std::process::id(), "blockwatch").is_none());
        assert!(r.rule_for(1, "sshd-session").is_none());
        assert!(r.needs_execs());
    }
}
