//! `blockwatch daemon`: a long-running session for systemd. It starts as
//! `trace` does ([`Session::start`]), tags and drains the ring buffer the
//! same way, but its outputs are Prometheus metrics, folded stacks over
//! HTTP, and one journal line per new blocking stack; SIGHUP reloads its
//! configuration.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use aya::maps::MapError;
use blockwatch_common::{CommMatch, Config, TAG_LOOP, WatchRule};
use log::{debug, info, warn};
use tokio::signal::unix::{SignalKind, signal};

use crate::bpf::counters::{Counters, KERNEL_DROPS};
use crate::bpf::{LoopOptions, Maps};
use crate::cli::DaemonArgs;
use crate::output::metrics::Metrics;
use crate::pipeline::strict::Read as StrictRead;
use crate::pipeline::{BUSY_PAUSE, BUSY_RECORDS, DRAIN_BATCH, Output, Pipeline, RuntimeMaps};
use crate::procfs;
use crate::runtimes::python;
use crate::session::memory::Trimmer;
use crate::session::notify::{sd_notify, watchdog_interval};
use crate::session::rate_limit::RateLimit;
use crate::session::trace::sleep_until;
use crate::session::{Session, StartOptions, threshold_ns};
use crate::settings::{self, Overrides, Settings};
use crate::targets::selector::{Container, Selector, cgroup_paths, container_of};
use crate::targets::{self, CommRules, IdleLoop, TagMaps, ThreadsMode};

/// New-stack keys remembered; past this the set restarts (a stack then
/// logged twice is harmless, unbounded memory is not).
const MAX_SEEN_STACKS: usize = 100_000;
/// How often gauges and expiry are refreshed.
const REFRESH: Duration = Duration::from_secs(2);
/// How often the tag map is read for `blockwatch_tagged_threads` when no
/// loop was reported found, exec'd or gone. Reading it costs two system
/// calls per tagged thread, and under `--auto` every thread of the host
/// is tagged; a loop that ends sends no record, so the gauge may lag this
/// long.
const TAGS_RESCAN: Duration = Duration::from_secs(30);
/// How often the kernel's strict counts are read into the metrics (so a
/// scrape sees the calls of at most this long ago).
const STRICT_READ: Duration = Duration::from_secs(1);

fn settings(file: Option<&Path>, o: &Overrides) -> anyhow::Result<Settings> {
    let mut s = match file {
        Some(p) => settings::load(p)?,
        None => Settings::default(),
    };
    s.apply(o)?;
    Ok(s)
}

/// Which processes the daemon watches.
struct Rules {
    select: Selector,
    exclude: CommRules,
    /// What of `select` and `exclude` the kernel matches at exec.
    by_name: Vec<CommMatch>,
    auto: bool,
    rule: WatchRule,
    auto_rule: WatchRule,
}

impl Rules {
    fn new(s: &Settings) -> anyhow::Result<Self> {
        let rule = s.threads.rule(false);
        Ok(Self {
            select: Selector::new(&s.select)?,
            exclude: CommRules::new(&s.exclude_comms)?,
            by_name: targets::names::kernel_matches(&s.select.comms, &s.exclude_comms, rule),
            auto: s.auto,
            rule,
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
        // Kernel threads have no command line and no event loop.
        self.rule_of(pid, comm, || !is_kernel_thread(pid))
    }

    /// As [`Rules::rule_for`], for a process that just exec'd: no kernel
    /// thread, whatever its command line says (an exec with no arguments
    /// leaves it empty).
    fn rule_at_exec(&self, pid: u32, comm: &str) -> Option<WatchRule> {
        self.rule_of(pid, comm, || true)
    }

    fn rule_of(&self, pid: u32, comm: &str, user: impl FnOnce() -> bool) -> Option<WatchRule> {
        if self.exclude.matches(comm) || targets::is_blockwatch(pid) {
            return None;
        }
        if self.select.selects(pid, comm) {
            return Some(self.rule);
        }
        (self.auto && user()).then_some(self.auto_rule)
    }
}

fn is_kernel_thread(pid: u32) -> bool {
    procfs::cmdline(pid).is_none_or(|c| c.is_empty())
}

/// The runtime label of a process, guessed from what it maps and names.
fn runtime_of(pid: u32) -> &'static str {
    let maps = procfs::maps::read(pid).unwrap_or_default();
    let maps_a = |lib: &str| {
        maps.iter()
            .any(|m| m.path().is_some_and(|p| p.contains(lib)))
    };
    let exe = procfs::exe(pid)
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    // Mapping libpython is not enough (blockwatch itself maps it to
    // symbolize): the interpreter must be initialised.
    let python = || {
        python::inspect(pid)
            .ok()
            .flatten()
            .is_some_and(|py| py.is_initialised(pid))
    };
    if (maps_a("libpython") || exe.starts_with("python")) && python() {
        return "python";
    }
    if maps_a("libnode") || exe == "node" || exe == "nodejs" {
        return "node";
    }
    let tokio = procfs::threads(pid)
        .into_iter()
        .any(|tid| procfs::thread_comm(pid, tid).is_some_and(|c| c.starts_with("tokio-r")));
    if tokio { "tokio" } else { "unknown" }
}

struct State {
    rules: Rules,
    /// Processes the daemon put in WATCHED (not those the kernel added as
    /// children): the ones to unwatch when a reload drops their rule.
    watched: HashSet<u32>,
    explicit: HashSet<u32>,
    /// Processes that exec'd into something the rules select.
    to_watch: Vec<(u32, WatchRule)>,
    exited: Vec<u32>,
    seen: HashSet<(String, &'static str, String, String)>,
    limit: RateLimit,
    runtimes: HashMap<u32, (String, &'static str)>,
    /// Container identity per process, when metrics carry it (read at
    /// watch time, so a process that blocks and exits keeps its labels).
    containers: Option<HashMap<u32, Option<Container>>>,
    /// Processes with at least one event-loop thread (as of the last
    /// read of the tag map).
    loop_pids: HashSet<u32>,
    /// One of `loop_pids` exec'd or exited since that read.
    loops_changed: bool,
    /// Loops the latest watches found asleep in their wait, for the
    /// pipeline (`Daemon::adopt_idle_loops`).
    idle_loops: Vec<IdleLoop>,
}

impl State {
    fn container(&mut self, pid: u32) -> Option<Container> {
        let cache = self.containers.as_mut()?;
        cache
            .entry(pid)
            .or_insert_with(|| {
                let cgroup = procfs::cgroup(pid)?;
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
            Output::StrictCalls(c) => {
                let container = self.container(c.event.pid);
                metrics
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .observe_strict(&c, container.as_ref());
            }
            Output::Exec { pid, comm } => {
                self.runtimes.remove(&pid);
                self.loops_changed |= self.loop_pids.contains(&pid);
                if let Some(rule) = self.rules.rule_at_exec(pid, &comm) {
                    self.to_watch.push((pid, rule));
                }
            }
            Output::ProcessExit { pid } => {
                self.loops_changed |= self.loop_pids.contains(&pid);
                self.exited.push(pid);
            }
        }
    }
}

/// The kernel's tag maps, as the daemon uses them.
struct Tags<'a>(TagMaps<'a>);

impl<'a> Tags<'a> {
    fn of(maps: &'a mut Maps) -> Self {
        Self(TagMaps::of(maps))
    }

    fn watch(&mut self, state: &mut State, pid: u32, rule: WatchRule) {
        match self.0.watch_process(pid, rule) {
            Ok(idle) => {
                state.idle_loops.extend(idle);
                state.watched.insert(pid);
                state.container(pid);
            }
            // Gone between the scan and now: nothing to watch.
            Err(e) if !procfs::exists(pid) => {
                debug!("pid {pid} exited before it was watched: {e}")
            }
            Err(e) => warn!("cannot watch process {pid}: {e}"),
        }
    }

    fn unwatch(&mut self, pid: u32) {
        let _ = self.0.watched.remove(&pid);
        for tid in procfs::threads(pid) {
            self.0.untag(tid);
        }
    }

    /// Watches every running process the rules select.
    fn scan(&mut self, state: &mut State) {
        for pid in procfs::pids() {
            if state.watched.contains(&pid) {
                continue;
            }
            let Some(comm) = procfs::comm(pid) else {
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
        for (_, tag) in self.0.threads.iter().flatten() {
            if tag.tag != TAG_LOOP {
                continue;
            }
            state.loop_pids.insert(tag.tgid);
            let (name, runtime) = state
                .runtimes
                .entry(tag.tgid)
                .or_insert_with(|| {
                    (
                        procfs::comm(tag.tgid).unwrap_or_else(|| "unknown".into()),
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
        threshold_ns: threshold_ns(s.threshold),
        notify_all_execs: rules.needs_execs() as u8,
        comm_matches: rules.by_name.len() as u8,
        ..Default::default()
    }
}

/// Hands the kernel `rules`' name patterns, then its configuration (the
/// count of those patterns in it), never a half-written list in use.
fn configure_kernel(maps: &mut Maps, s: &Settings, rules: &Rules) -> Result<(), MapError> {
    let mut config = kernel_config(s, rules);
    let n = config.comm_matches;
    if maps.config.get(&0, 0).is_ok_and(|c| c.comm_matches != 0) {
        config.comm_matches = 0;
        maps.config.set(0, config, 0)?;
        config.comm_matches = n;
    }
    targets::names::store(&mut maps.comm_matches, &rules.by_name)?;
    maps.config.set(0, config, 0)
}

pub async fn run(args: DaemonArgs) -> anyhow::Result<i32> {
    let overrides = args.overrides();
    let config_path: Option<PathBuf> = args.config.clone();
    let current = settings(config_path.as_deref(), &overrides)?;
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
    // Strict mode, the user-stack size and the ring buffer's are read
    // at start: a reload that changes them says so and takes effect at
    // restart.
    let session = Session::start(&StartOptions {
        threshold: current.threshold,
        user_stack_size: current.user_stack_size,
        ring_bytes: current.ring_buffer_size,
        loops: LoopOptions {
            strict: current.strict,
        },
    })?;
    let mut daemon = Daemon::new(session, current, rules, overrides, config_path)?;
    crate::output::http::spawn(listener, daemon.metrics.clone());
    daemon.watch_at_start();
    daemon.serve().await?;

    sd_notify("STOPPING=1");
    // Dropping the programs detaches them; nothing is left in the kernel.
    drop(daemon);
    eprintln!("blockwatch: detached; exiting");
    Ok(0)
}

/// The running daemon: its settings, the kernel's maps, and what it
/// tracks between records.
struct Daemon {
    /// The settings in effect: a reload's values for what a reload
    /// changes, the start's for the rest.
    current: Settings,
    overrides: Overrides,
    config_path: Option<PathBuf>,
    state: State,
    metrics: Arc<Mutex<Metrics>>,
    pipeline: Pipeline,
    trimmer: Trimmer,
    /// When the tag map was last read, and `Stats::loops_found` then.
    tags_read: Option<(Instant, u64)>,
    /// The kernel programs and maps; dropped last, which detaches them.
    session: Session,
}

impl Daemon {
    fn new(
        mut session: Session,
        current: Settings,
        rules: Rules,
        overrides: Overrides,
        config_path: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        configure_kernel(&mut session.maps, &current, &rules)?;
        let metrics = Arc::new(Mutex::new(Metrics::with_labels(
            current.top_culprits,
            current.expire_after,
            current.container_labels,
        )?));
        let state = State {
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
            loops_changed: false,
            idle_loops: Vec::new(),
        };
        Ok(Self {
            current,
            overrides,
            config_path,
            state,
            metrics,
            pipeline: Pipeline::new(),
            trimmer: Trimmer::new(),
            tags_read: None,
            session,
        })
    }

    /// Watches the given processes and those the rules select, then tells
    /// the journal and systemd that the daemon is ready.
    fn watch_at_start(&mut self) {
        let mut maps = Tags::of(&mut self.session.maps);
        for &pid in &self.current.pids {
            let rule = self.state.rules.rule;
            maps.watch(&mut self.state, pid, rule);
        }
        maps.scan(&mut self.state);
        self.adopt_idle_loops();
        eprintln!("blockwatch: {}", self.current.describe());
        sd_notify(&format!(
            "READY=1\nSTATUS=watching {} processes",
            self.state.watched.len()
        ));
        // Start-up's garbage (BTF, the programs' object, the /proc scan)
        // goes back once the first refresh has run too.
        self.trimmer.worked(Instant::now());
    }

    /// Runs until SIGTERM or SIGINT.
    async fn serve(&mut self) -> anyhow::Result<()> {
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let mut refresh = tokio::time::interval(REFRESH);
        let mut strict_read = tokio::time::interval(STRICT_READ);
        let strict = self.session.detectors.options.strict;
        let watchdog = watchdog_interval();
        let mut watchdog_tick =
            tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
        loop {
            let retry = self.pipeline.exec_retry_due();
            let trim = self.trimmer.due();
            tokio::select! {
                guard = self.session.ring.readable_mut() => {
                    let mut guard = guard?;
                    let (state, metrics) = (&mut self.state, &self.metrics);
                    let mut maps = RuntimeMaps::of(&mut self.session.maps);
                    let records = self.pipeline.drain(guard.get_inner_mut(), &mut maps, |o| state.take(o, metrics));
                    // A full batch leaves records behind, and the kernel
                    // wakes a reader only once it has caught up: still ready.
                    if records < DRAIN_BATCH {
                        guard.clear_ready();
                    }
                    self.after_drain();
                    if records > 0 {
                        self.trimmer.worked(Instant::now());
                    }
                    if (BUSY_RECORDS..DRAIN_BATCH).contains(&records) {
                        tokio::time::sleep(BUSY_PAUSE).await;
                    }
                }
                _ = sleep_until(trim), if trim.is_some() => self.trimmer.trim(),
                _ = sleep_until(retry), if retry.is_some() => {
                    self.pipeline.retry_execs(&mut self.session.maps.pyprocs);
                }
                _ = sigterm.recv() => return Ok(()),
                _ = sigint.recv() => return Ok(()),
                _ = sighup.recv() => self.reload(),
                _ = refresh.tick() => self.refresh(),
                _ = strict_read.tick(), if strict => self.read_strict(),
                _ = watchdog_tick.tick(), if watchdog.is_some() => sd_notify("WATCHDOG=1"),
            }
        }
    }

    /// The strict calls counted since the last read, into the metrics (the
    /// ring buffer first, so the call sites' records are in).
    fn read_strict(&mut self) {
        let (state, metrics) = (&mut self.state, &self.metrics);
        let mut maps = RuntimeMaps::of(&mut self.session.maps);
        self.pipeline
            .drain(self.session.ring.get_mut(), &mut maps, |o| {
                state.take(o, metrics)
            });
        self.pipeline.read_strict(
            &mut self.session.maps.strict_counts,
            StrictRead::Periodic,
            |o| state.take(o, metrics),
        );
        self.after_drain();
    }

    /// Watches the processes that exec'd into a selected name, forgets
    /// those that exited.
    fn after_drain(&mut self) {
        let state = &mut self.state;
        let mut maps = Tags::of(&mut self.session.maps);
        let mut execd = Vec::new();
        for (pid, rule) in std::mem::take(&mut state.to_watch) {
            // The kernel keeps a process watched across its exec and tags
            // its one thread: under --auto, nearly every exec is of a
            // process watched as a child, and needs no /proc walk.
            if maps.0.watched.get(&pid, 0).is_ok_and(|r| r == rule) {
                state.watched.insert(pid);
                state.container(pid);
            } else {
                maps.watch(state, pid, rule);
            }
            execd.push(pid);
        }
        for pid in execd {
            self.pipeline
                .inspect_at_exec(pid, &mut self.session.maps.pyprocs);
        }
        let now = Instant::now();
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
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
        drop(m);
        self.adopt_idle_loops();
    }

    /// SIGHUP: rereads the config file; a file that does not validate
    /// leaves everything as it was.
    fn reload(&mut self) {
        match reload(self.config_path.as_deref(), &self.overrides, &self.current) {
            Ok(new) => match Rules::new(&new) {
                Ok(rules) => {
                    self.apply_reload(&new, rules);
                    // The file, the new rules' /proc scan.
                    self.trimmer.worked(Instant::now());
                    self.current = new;
                    eprintln!(
                        "blockwatch: configuration reloaded; {}",
                        self.current.describe()
                    );
                }
                Err(e) => eprintln!("blockwatch: error: reload refused: {e}"),
            },
            Err(e) => eprintln!(
                "blockwatch: error: reload refused, keeping the running configuration: {e:#}"
            ),
        }
    }

    /// Puts reloaded settings into effect: the kernel's threshold, the
    /// rules, the metrics' limits, and which processes are watched.
    fn apply_reload(&mut self, new: &Settings, rules: Rules) {
        if let Err(e) = configure_kernel(&mut self.session.maps, new, &rules) {
            warn!("cannot update the kernel configuration: {e}");
        }
        let (state, mut maps) = (&mut self.state, Tags::of(&mut self.session.maps));
        state.rules = rules;
        state.limit.set_rate(new.log_per_minute);
        self.metrics
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
                    && procfs::comm(pid)
                        .and_then(|c| state.rules.rule_for(pid, &c))
                        .is_none()
            })
            .collect();
        for pid in drop_pids {
            maps.unwatch(pid);
            state.watched.remove(&pid);
        }
        for &pid in &new.pids {
            if !self.current.pids.contains(&pid) && targets::validate_pid(pid).is_ok() {
                let rule = state.rules.rule;
                maps.watch(state, pid, rule);
            }
        }
        state.explicit = explicit;
        maps.scan(state);
        self.adopt_idle_loops();
    }

    /// Does for the loops the latest watches found asleep in their wait
    /// what the kernel's `LoopFound` would have had done: their
    /// interpreter and clock, looked for before their first blocking call.
    fn adopt_idle_loops(&mut self) {
        let idle = std::mem::take(&mut self.state.idle_loops);
        self.pipeline
            .loops_found(idle, &mut RuntimeMaps::of(&mut self.session.maps));
    }

    /// Gauges, drop counters, interpreters, expiry and the rate limiter's
    /// pending line, every [`REFRESH`].
    fn refresh(&mut self) {
        let state = &mut self.state;
        // Interpreter frames for the CPython processes among them
        // (each process is inspected a bounded number of times).
        let now = Instant::now();
        let found = self.pipeline.stats.loops_found;
        let tagged = match self.tags_read {
            Some((at, seen))
                if !state.loops_changed
                    && seen == found
                    && now.duration_since(at) < TAGS_RESCAN =>
            {
                None
            }
            _ => {
                self.tags_read = Some((now, found));
                state.loops_changed = false;
                Some(Tags::of(&mut self.session.maps).tagged(state))
            }
        };
        // With --auto every process is watched, and nearly none is
        // Python: only those with a loop thread are worth reading
        // /proc/PID/maps for (an event needs a loop thread anyway).
        if state.rules.auto {
            let pids: Vec<u32> = state
                .loop_pids
                .iter()
                .chain(&state.explicit)
                .copied()
                .collect();
            self.pipeline
                .refresh_interpreters(pids, &mut self.session.maps.pyprocs);
        } else {
            self.pipeline.refresh_interpreters(
                state.watched.iter().copied(),
                &mut self.session.maps.pyprocs,
            );
        }
        let counts = Counters::read(&self.session.maps.counters);
        let symbolizer = self.pipeline.symbolizer();
        let before = symbolizer.evictions();
        symbolizer.release_idle(now);
        let evictions = symbolizer.evictions();
        // What blazesym held is freed now, long after the burst's trim.
        if evictions > before {
            self.trimmer.worked(now);
        }
        let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tagged) = &tagged {
            m.set_tagged(tagged);
        }
        m.set_symbolizer_evictions(evictions);
        m.set_lost(counts.events_lost());
        for c in KERNEL_DROPS {
            m.set_drops(c.label(), counts[c]);
        }
        m.set_symbolization_failures(self.pipeline.symbol_failures());
        // Exits the kernel did not report (processes it never
        // watched, lost records): /proc is the truth.
        for pid in m.agg.pids() {
            if !procfs::exists(pid) {
                m.agg.process_exit(pid, now);
            }
        }
        for name in m.expire(now) {
            debug!("series of {name} expired");
        }
        drop(m);
        state.runtimes.retain(|&pid, _| procfs::exists(pid));
        if let Some(line) = state.limit.flush(now) {
            eprintln!("{line}");
        }
    }
}

/// The config file's new settings, for a reload. Those read only at start
/// keep their running values, so that the settings always say what is in
/// effect (and the next reload compares against that); a change to one of
/// them is reported as waiting for a restart.
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
    if (new.strict, new.user_stack_size, new.ring_buffer_size)
        != (
            current.strict,
            current.user_stack_size,
            current.ring_buffer_size,
        )
    {
        warn!("strict, user_stack_size and ring_buffer_size changes take effect at restart");
    }
    if new.container_labels != current.container_labels {
        // The label names of every series would change under Prometheus.
        eprintln!(
            "blockwatch: warning: container_labels changes only at restart; still {}",
            if current.container_labels {
                "on"
            } else {
                "off"
            }
        );
    }
    Ok(Settings {
        listen: current.listen,
        strict: current.strict,
        user_stack_size: current.user_stack_size,
        ring_buffer_size: current.ring_buffer_size,
        container_labels: current.container_labels,
        ..new
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// Values read only at start stay those in effect across reloads; the
    /// others take the file's.
    #[test]
    fn reload_keeps_the_values_in_effect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blockwatch.toml");
        let write = |text: &str| std::fs::write(&path, text).unwrap();
        write("user_stack_size = 8192\n[targets]\ncomms = [\"a\"]\n");
        let o = Overrides::default();
        let started = settings(Some(&path), &o).unwrap();
        assert_eq!(started.user_stack_size, 8192);

        write(
            "user_stack_size = 0\nthreshold = \"50ms\"\nstrict = true\n\
             [targets]\ncomms = [\"b\"]\n[metrics]\ncontainer_labels = true\n",
        );
        let first = reload(Some(&path), &o, &started).unwrap();
        assert_eq!(first.user_stack_size, 8192, "needs a restart");
        assert!(!first.strict && !first.container_labels);
        assert_eq!(first.threshold, Duration::from_millis(50));
        assert_eq!(first.select.comms, ["b"]);
        // Compared with what runs, the change is still pending.
        let second = reload(Some(&path), &o, &first).unwrap();
        assert_eq!(second, first);

        // A flag wins over the file, as at start.
        let flag = Overrides {
            user_stack_size: Some(4096),
            ..Default::default()
        };
        let started = settings(Some(&path), &flag).unwrap();
        assert_eq!(started.user_stack_size, 4096);
        write("user_stack_size = 16384\n[targets]\ncomms = [\"a\"]\n");
        let reloaded = reload(Some(&path), &flag, &started).unwrap();
        assert_eq!(reloaded.user_stack_size, 4096);
    }
}
