//! `blockwatch trace`: one session from attach to summary.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use blockwatch_common::Config;
use log::{debug, info, warn};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::bpf::counters::Counters;
use crate::bpf::loader::{self, Loaded};
use crate::cli::TraceArgs;
use crate::output::report::{OutputFormat, Reporter};
use crate::pipeline::{Output, Pipeline};
use crate::targets::selector::Selector;
use crate::targets::{self, TagMaps};

/// Why the session ended.
enum Stop {
    Interrupted,
    Duration,
    CommandExited(std::process::ExitStatus),
    TargetsGone,
}

/// Where the pipeline's outputs go in a trace session.
struct Sink {
    reporter: Reporter,
    watch: Watch,
    threads_seen: HashSet<u32>,
    /// First output error (stdout closed): ends the session.
    error: Option<std::io::Error>,
}

impl Sink {
    fn take(&mut self, output: Output) {
        match output {
            Output::Event(ev) => {
                self.threads_seen.insert(ev.tid);
                if self.error.is_none()
                    && let Err(e) = self.reporter.event(&ev)
                {
                    self.error = Some(e);
                }
            }
            Output::Exec { pid, comm } => self.watch.on_exec(pid, &comm),
            Output::ProcessExit { pid } => self.watch.on_process_exit(pid),
        }
    }

    fn check(&mut self) -> anyhow::Result<()> {
        match self.error.take() {
            Some(e) => Err(e).context("writing an event"),
            None => Ok(()),
        }
    }
}

/// What is being watched, and what to do as processes come and go.
struct Watch {
    explicit_pids: HashSet<u32>,
    selector: Selector,
    rule: blockwatch_common::WatchRule,
    /// Processes matched by a selector that exec'd since the last drain.
    to_watch: Vec<u32>,
    /// The session ends otherwise (the command's exit, Ctrl-C for explicit
    /// threads), not when the explicit processes are gone.
    keep_open: bool,
}

impl Watch {
    fn on_exec(&mut self, pid: u32, comm: &str) {
        if self.selector.selects(pid, comm) {
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
        !self.keep_open && self.selector.is_empty() && self.explicit_pids.is_empty()
    }
}

pub async fn run(args: TraceArgs) -> anyhow::Result<i32> {
    if !args.has_targets() {
        bail!(
            "nothing to watch: give --pid PID, --tid TID, --comm/--exe/--cmdline/--cgroup/--unit GLOB, or a command after `--` (see `blockwatch trace --help`)"
        );
    }
    // Everything that can be checked without the kernel is checked first.
    for &pid in &args.pids {
        targets::validate_pid(pid)?;
    }
    for &tid in &args.tids {
        targets::tgid_of(tid).ok_or(targets::TargetError::NoSuchTid(tid))?;
    }
    let selector = Selector::new(&args.patterns())?;
    loader::check_privileges()?;

    let threshold_ns = args.threshold.as_nanos().min(u64::MAX as u128) as u64;
    let mut loaded = loader::load_with_user_stack(
        threshold_ns,
        loader::force_raw_from_env(),
        args.user_stack_size,
    )?;
    let detectors = loader::enable_loop_detectors(
        &mut loaded.ebpf,
        args.detectors
            .options(Some(crate::pipeline::loops::DEFAULT_STALL_THRESHOLD)),
    )?;
    let Loaded {
        mode,
        mut threads,
        mut watched,
        mut parks,
        mut pyprocs,
        mut config,
        counters,
        events,
        logger,
        ebpf: _ebpf,
    } = loaded;
    debug!("attach mode: {mode:?}");
    if let Some(logger) = logger {
        loader::forward_kernel_log(logger)?;
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
    if !selector.is_empty() {
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
                && targets::process_name(pid).is_some_and(|c| selector.selects(pid, &c))
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
        crate::settings::duration::format_duration(args.threshold),
        if command.is_some() {
            "stops when the command exits"
        } else {
            "Ctrl-C to stop"
        }
    ));
    let mut pipeline = Pipeline::new();
    let mut sink = Sink {
        reporter,
        watch: Watch {
            explicit_pids: args.pids.iter().copied().collect(),
            selector,
            rule,
            to_watch: Vec::new(),
            keep_open: command.is_some() || (args.pids.is_empty() && !args.tids.is_empty()),
        },
        threads_seen: HashSet::new(),
        error: None,
    };

    // Processes of explicitly tagged threads are not in WATCHED.
    let tid_pids: Vec<u32> = args
        .tids
        .iter()
        .filter_map(|&t| targets::tgid_of(t))
        .collect();
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
    // Often enough that a Python program blocking soon after it starts
    // has its interpreter known (its Python frames) by then.
    let mut tick = tokio::time::interval(Duration::from_millis(100));

    let stop = loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                pipeline.drain(guard.get_inner_mut(), &mut parks, |o| sink.take(o));
                guard.clear_ready();
                sink.check()?;
                for pid in std::mem::take(&mut sink.watch.to_watch) {
                    let mut maps = TagMaps { threads: &mut threads, watched: &mut watched };
                    if let Err(e) = maps.watch_process(pid, sink.watch.rule) {
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
                let pids: Vec<u32> = watched.keys().filter_map(Result::ok).chain(tid_pids.iter().copied()).collect();
                pipeline.refresh_interpreters(pids, &mut pyprocs);
                if sink.watch.all_gone() {
                    break Stop::TargetsGone;
                }
            }
        }
    };

    // Events of the last moments (a command's final blocking call) are
    // already in the ring buffer: report them before the summary.
    pipeline.drain(ring.get_mut(), &mut parks, |o| sink.take(o));
    sink.check()?;
    let mut reporter = sink.reporter;

    for warning in Counters::read(&counters).warnings() {
        reporter.diag(&warning);
    }
    if pipeline.stats.decode_errors > 0 {
        reporter.diag(&format!(
            "blockwatch: warning: {} kernel records could not be decoded",
            pipeline.stats.decode_errors
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
    let mut found = format!(
        "{} blocking calls over {}",
        pipeline.stats.events,
        crate::settings::duration::format_duration(args.threshold),
    );
    if let Some(more) = crate::pipeline::loops::header_counts(
        &detectors.options,
        pipeline.stats.strict,
        pipeline.stats.stalls,
    ) {
        found.push_str(&more);
    }
    let header = format!(
        "blockwatch: {found} in {:.1}s on {} threads; {why}",
        started.elapsed().as_secs_f64(),
        sink.threads_seen.len(),
    );
    reporter.finish(&header)?;
    if args.output == OutputFormat::Json {
        debug!("json output finished");
    }
    Ok(exit_code)
}

fn describe_targets(args: &TraceArgs, command: Option<&targets::Command>) -> String {
    let ids = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    let mut parts = Vec::new();
    if let Some(c) = command {
        parts.push(format!("`{}` (pid {})", c.display, c.pid));
    }
    if !args.pids.is_empty() {
        parts.push(format!("pid {}", ids(&args.pids)));
    }
    if !args.tids.is_empty() {
        parts.push(format!("tid {}", ids(&args.tids)));
    }
    parts.extend(args.patterns().describe());
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
