//! `blockwatch trace`: one session from attach to summary.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use blockwatch_common::{
    COUNTER_LOST_EVENTS, COUNTER_LOST_PROBES, COUNTER_LOST_STACKS, COUNTER_LOST_TAGS, Config,
};
use log::{debug, info, warn};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::cli::TraceArgs;
use crate::decode::{self, BlockRecord, Record};
use crate::event::Event;
use crate::loader::{self, Loaded};
use crate::report::{OutputFormat, Reporter};
use crate::symbolize::Symbolizer;
use crate::syscalls::{self, FdKind};
use crate::targets::{self, CommRules, TagMaps};
use crate::{culprit, runtime};

const NR_FUTEX: i64 = 202;

/// Why the session ended.
enum Stop {
    Interrupted,
    Duration,
    CommandExited(std::process::ExitStatus),
    TargetsGone,
}

/// Turns kernel records into events and keeps what was learned.
struct Pipeline {
    sym: Symbolizer,
    reporter: Reporter,
    /// CLOCK_REALTIME - CLOCK_MONOTONIC, to date kernel timestamps.
    wall_offset: Duration,
    process_names: HashMap<u32, String>,
    /// Futex parks learned per thread, to drop waits that raced the map update.
    parks: HashMap<u32, u64>,
    events: u64,
    threads_seen: HashSet<u32>,
    decode_errors: u64,
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and timespec pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Pipeline {
    fn new(reporter: Reporter) -> Self {
        let wall = clock_ns(libc::CLOCK_REALTIME);
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        Self {
            sym: Symbolizer::new(),
            reporter,
            wall_offset: Duration::from_nanos(wall.saturating_sub(mono)),
            process_names: HashMap::new(),
            parks: HashMap::new(),
            events: 0,
            threads_seen: HashSet::new(),
            decode_errors: 0,
        }
    }

    fn process_name(&mut self, pid: u32, fallback: &str) -> String {
        self.process_names
            .entry(pid)
            .or_insert_with(|| targets::process_name(pid).unwrap_or_else(|| fallback.to_string()))
            .clone()
    }

    fn to_event(&mut self, b: BlockRecord) -> Event {
        let stack = self.sym.symbolize(b.pid, &b.ips);
        // Only read/write-style calls need the fd's kind (a socket read is
        // network, a file read is disk); they are few, as events are.
        let fd_kind = syscalls::fd_arg(b.syscall, &b.args).and_then(|fd| {
            std::fs::read_link(format!("/proc/{}/fd/{fd}", b.pid))
                .ok()
                .map(|l| FdKind::from_link(&l.to_string_lossy()))
        });
        let culprit = culprit::culprit(&stack);
        Event {
            ts: SystemTime::UNIX_EPOCH + self.wall_offset + Duration::from_nanos(b.start_ns),
            pid: b.pid,
            tid: b.tid,
            comm: self.process_name(b.pid, &b.thread),
            thread: b.thread,
            syscall: syscalls::name(b.syscall),
            syscall_nr: b.syscall,
            class: syscalls::classify(b.syscall, &b.args, fd_kind),
            duration_ns: b.duration_ns,
            state: b.state,
            stack,
            culprit,
        }
    }

    fn handle(
        &mut self,
        bytes: &[u8],
        loaded_parks: &mut aya::maps::HashMap<aya::maps::MapData, u32, u64>,
        ctx: &mut Watch,
    ) -> anyhow::Result<()> {
        let record = match decode::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.decode_errors += 1;
                debug!("undecodable record: {e}");
                return Ok(());
            }
        };
        match record {
            Record::Block(b) => {
                if b.syscall == NR_FUTEX && self.parks.get(&b.tid) == Some(&b.args[0]) {
                    return Ok(());
                }
                self.threads_seen.insert(b.tid);
                let ev = self.to_event(b);
                self.events += 1;
                self.reporter.event(&ev).context("writing an event")?;
            }
            Record::Probe(p) => {
                if runtime::probe_is_park(&mut self.sym, &p) {
                    info!(
                        "tid {} parks on futex {:#x}: an event-loop worker",
                        p.tid, p.uaddr
                    );
                    self.parks.insert(p.tid, p.uaddr);
                    if let Err(e) = loaded_parks.insert(p.tid, p.uaddr, 0) {
                        warn!("cannot record the park of tid {}: {e}", p.tid);
                    }
                }
            }
            Record::Exec { pid, tid, comm } => {
                self.sym.invalidate(pid);
                self.process_names.insert(pid, comm.clone());
                self.parks.remove(&tid);
                self.parks.remove(&pid);
                ctx.on_exec(pid, &comm);
            }
            Record::Exit {
                pid,
                tid,
                group_dead,
            } => {
                self.parks.remove(&tid);
                if group_dead {
                    ctx.on_process_exit(pid);
                }
            }
        }
        Ok(())
    }
}

/// What is being watched, and what to do as processes come and go.
struct Watch {
    explicit_pids: HashSet<u32>,
    comm_rules: CommRules,
    rule: blockwatch_common::WatchRule,
    /// Processes matched by name that exec'd since the last drain.
    to_watch: Vec<u32>,
    has_command: bool,
}

impl Watch {
    fn on_exec(&mut self, pid: u32, comm: &str) {
        if !self.comm_rules.is_empty() && self.comm_rules.matches(comm) {
            self.to_watch.push(pid);
        }
    }

    fn on_process_exit(&mut self, pid: u32) {
        if self.explicit_pids.remove(&pid) {
            info!("process {pid} exited");
        }
    }

    /// Nothing left that could ever produce an event.
    fn all_gone(&self) -> bool {
        !self.has_command && self.comm_rules.is_empty() && self.explicit_pids.is_empty()
    }
}

pub async fn run(args: TraceArgs) -> anyhow::Result<i32> {
    if !args.has_targets() {
        bail!(
            "nothing to watch: give --pid PID, --tid TID, --comm GLOB, or a command after `--` (see `blockwatch trace --help`)"
        );
    }
    // Everything that can be checked without the kernel is checked first.
    for &pid in &args.pids {
        targets::validate_pid(pid)?;
    }
    for &tid in &args.tids {
        targets::tgid_of(tid).ok_or(targets::TargetError::NoSuchTid(tid))?;
    }
    let comm_rules = CommRules::new(&args.comms)?;
    loader::check_privileges()?;

    let threshold_ns = args.threshold.as_nanos().min(u64::MAX as u128) as u64;
    let Loaded {
        mode,
        mut threads,
        mut watched,
        mut parks,
        mut config,
        counters,
        events,
        logger,
        ebpf: _ebpf,
    } = loader::load(threshold_ns, loader::force_raw_from_env())?;
    debug!("attach mode: {mode:?}");
    if let Some(logger) = logger {
        // SAFETY: the logger owns its ring buffer fd for its whole life.
        let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        tokio::spawn(async move {
            while let Ok(mut guard) = logger.readable_mut().await {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
        });
    }

    let rule = args.threads.rule(false);
    let mut maps = TagMaps {
        threads: &mut threads,
        watched: &mut watched,
    };
    for &pid in &args.pids {
        maps.watch_process(pid, rule)?;
    }
    for &tid in &args.tids {
        maps.tag_thread(tid)?;
    }
    if !comm_rules.is_empty() {
        config.set(
            0,
            Config {
                threshold_ns,
                notify_all_execs: 1,
                ..Default::default()
            },
            0,
        )?;
        for pid in targets::all_pids() {
            if pid != std::process::id()
                && targets::process_name(pid).is_some_and(|c| comm_rules.matches(&c))
            {
                maps.watch_process(pid, rule).ok();
            }
        }
    }
    let mut command: Option<targets::Command> = None;
    if !args.command.is_empty() {
        let rule = args.threads.rule(true);
        let started =
            targets::spawn_watched(&args.command, |pid| maps.watch_process(pid, rule).map(drop))
                .await?;
        command = Some(started);
    }

    let out: Box<dyn std::io::Write + Send> = Box::new(std::io::stdout());
    let diag: Box<dyn std::io::Write + Send> = Box::new(std::io::stderr());
    let mut reporter = Reporter::new(args.output, out, diag);
    let what = describe_targets(&args, command.as_ref());
    reporter.diag(&format!(
        "blockwatch: watching {what} for event-loop waits ≥ {}; {}",
        crate::duration::format_duration(args.threshold),
        if command.is_some() {
            "stops when the command exits"
        } else {
            "Ctrl-C to stop"
        }
    ));
    let mut pipeline = Pipeline::new(reporter);
    let mut watch = Watch {
        explicit_pids: args.pids.iter().copied().collect(),
        comm_rules,
        rule,
        to_watch: Vec::new(),
        has_command: command.is_some(),
    };
    if args.pids.is_empty() && !args.tids.is_empty() {
        // Explicit threads keep the session open until interrupted.
        watch.has_command = true;
    }

    let started = Instant::now();
    // SAFETY: the ring buffer owns its map fd for its whole life.
    let mut ring = unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let deadline = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));

    let stop = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                while let Some(item) = guard.get_inner_mut().next() {
                    let bytes = item.to_vec();
                    drop(item);
                    pipeline.handle(&bytes, &mut parks, &mut watch)?;
                }
                guard.clear_ready();
                for pid in std::mem::take(&mut watch.to_watch) {
                    let mut maps = TagMaps { threads: &mut threads, watched: &mut watched };
                    if let Err(e) = maps.watch_process(pid, watch.rule) {
                        warn!("cannot watch new process {pid}: {e}");
                    }
                }
            }
            _ = &mut ctrl_c => break Stop::Interrupted,
            _ = sigterm.recv() => break Stop::Interrupted,
            _ = &mut deadline => break Stop::Duration,
            status = async { command.as_mut().expect("guarded").child.wait().await }, if command.is_some() => {
                break Stop::CommandExited(status.context("waiting for the command")?);
            }
            _ = tick.tick() => {
                if watch.all_gone() {
                    break Stop::TargetsGone;
                }
            }
        }
    };

    // Events of the last moments (a command's final blocking call) are
    // already in the ring buffer: report them before the summary.
    while let Some(item) = ring.get_mut().next() {
        let bytes = item.to_vec();
        drop(item);
        pipeline.handle(&bytes, &mut parks, &mut watch)?;
    }

    let counter = |i: u32| -> u64 { counters.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
    let lost = counter(COUNTER_LOST_EVENTS);
    if lost > 0 {
        pipeline.reporter.diag(&format!(
            "blockwatch: warning: {lost} events were lost (ring buffer full); raise --threshold to report fewer"
        ));
    }
    for (i, what) in [
        (COUNTER_LOST_PROBES, "futex probes"),
        (COUNTER_LOST_STACKS, "stacks"),
        (COUNTER_LOST_TAGS, "thread tags"),
    ] {
        let n = counter(i);
        if n > 0 {
            pipeline
                .reporter
                .diag(&format!("blockwatch: warning: {n} {what} were lost"));
        }
    }
    if pipeline.decode_errors > 0 {
        pipeline.reporter.diag(&format!(
            "blockwatch: warning: {} kernel records could not be decoded",
            pipeline.decode_errors
        ));
    }

    let exit_code = match &stop {
        Stop::CommandExited(status) => exit_code(status),
        _ => 0,
    };
    let why = match &stop {
        Stop::Interrupted => "interrupted".to_string(),
        Stop::Duration => "duration reached".to_string(),
        Stop::TargetsGone => "all watched processes exited".to_string(),
        Stop::CommandExited(status) => format!(
            "`{}` exited with {}",
            command.as_ref().map(|c| c.display.as_str()).unwrap_or(""),
            describe_status(status)
        ),
    };
    let header = format!(
        "blockwatch: {} blocking calls over {} in {:.1}s on {} threads; {why}",
        pipeline.events,
        crate::duration::format_duration(args.threshold),
        started.elapsed().as_secs_f64(),
        pipeline.threads_seen.len(),
    );
    pipeline.reporter.finish(&header)?;
    if args.output == OutputFormat::Json {
        debug!("json output finished");
    }
    Ok(exit_code)
}

fn describe_targets(args: &TraceArgs, command: Option<&targets::Command>) -> String {
    let mut parts = Vec::new();
    if let Some(c) = command {
        parts.push(format!("`{}` (pid {})", c.display, c.pid));
    }
    if !args.pids.is_empty() {
        parts.push(format!(
            "pid {}",
            args.pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !args.tids.is_empty() {
        parts.push(format!(
            "tid {}",
            args.tids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !args.comms.is_empty() {
        parts.push(format!("processes named {}", args.comms.join(", ")));
    }
    parts.join(" and ")
}

fn exit_code(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

fn describe_status(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "an unknown status".into(),
    }
}
