//! `blockwatch trace`: one session from attach to summary.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use blockwatch_common::{Config, Counter};
use log::{debug, info, warn};

use crate::bpf::LoopDetectors;
use crate::bpf::counters::Counters;
use crate::cli::TraceArgs;
use crate::event::Detector;
use crate::output::report::{OutputFormat, Reporter};
use crate::pipeline::strict::Read as StrictRead;
use crate::pipeline::{BUSY_PAUSE, BUSY_RECORDS, DRAIN_BATCH, Output, Pipeline, RuntimeMaps};
use crate::procfs;
use crate::session::pictures::Pictures;
use crate::session::{Session, StartOptions, threshold_ns};
use crate::settings::duration::format_duration;
use crate::targets::selector::Selector;
use crate::targets::{self, IdleLoop, TagMaps};

/// Strict counts are read every this many ticks (a second): a thread gone
/// without its exit record is found, and its counts kept, that soon.
const STRICT_READ_TICKS: u64 = 10;
/// Drains after the stop, at most: a full 16 MiB ring buffer of the
/// smallest episode records is about 25,000 records.
const FINAL_BATCHES: usize = 8;

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
    threads_seen: crate::FastSet<u32>,
    pictures: Pictures,
    /// First output error (stdout closed): ends the session.
    error: Option<std::io::Error>,
}

impl Sink {
    /// The sink, once its reporter has said what is watched and until
    /// when.
    fn new(
        args: &TraceArgs,
        selector: Selector,
        pictures: Pictures,
        command: Option<&targets::Command>,
    ) -> Self {
        let out: Box<dyn std::io::Write + Send> = Box::new(std::io::stdout());
        let diag: Box<dyn std::io::Write + Send> = Box::new(std::io::stderr());
        let mut reporter = Reporter::new(args.output, out, diag).all_frames(args.all_frames);
        let what = describe_targets(args, command);
        reporter.diag(&format!(
            "blockwatch: watching {what} for event-loop waits ≥ {}; {}",
            format_duration(args.threshold),
            if command.is_some() {
                "stops when the command exits"
            } else {
                "Ctrl-C to stop"
            }
        ));
        Sink {
            reporter,
            watch: Watch {
                explicit_pids: args.pids.iter().copied().collect(),
                selector,
                rule: args.threads.rule(false),
                to_watch: Vec::new(),
                execd: Vec::new(),
                keep_open: command.is_some() || (args.pids.is_empty() && !args.tids.is_empty()),
            },
            threads_seen: crate::FastSet::default(),
            pictures,
            error: None,
        }
    }

    fn take(&mut self, output: Output) {
        match output {
            Output::Event(ev) => {
                self.threads_seen.insert(ev.tid);
                // A strict call site's time comes with its counts.
                if ev.detector != Detector::Strict {
                    self.pictures.add(&ev);
                }
                if self.error.is_none()
                    && let Err(e) = self.reporter.event(&ev)
                {
                    self.error = Some(e);
                }
            }
            Output::StrictCalls(c) => {
                self.threads_seen.insert(c.event.tid);
                self.pictures.add(&c.weighted_event());
                self.reporter.strict_calls(&c);
            }
            Output::Exec { pid, comm } => self.watch.on_exec(pid, &comm),
            Output::ProcessExit { pid } => self.watch.on_process_exit(pid),
        }
    }

    /// Writes the events taken so far (see [`Reporter::flush`]) and ends
    /// the session on the first output error. Called once the ring buffer
    /// has been drained (a batch of events, a write), before any wait.
    fn check(&mut self) -> anyhow::Result<()> {
        if self.error.is_none()
            && let Err(e) = self.reporter.flush()
        {
            self.error = Some(e);
        }
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
    /// Other processes that exec'd since the last drain (watched or not).
    execd: Vec<u32>,
    /// The session ends otherwise (the command's exit, Ctrl-C for explicit
    /// threads), not when the explicit processes are gone.
    keep_open: bool,
}

impl Watch {
    fn on_exec(&mut self, pid: u32, comm: &str) {
        if self.selector.selects(pid, comm) && !targets::is_blockwatch(pid) {
            self.to_watch.push(pid);
        } else {
            self.execd.push(pid);
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
    let selector = check_targets(&args)?;
    // Before the kernel work, so a bad output path fails at once.
    let pictures = Pictures::new(&args)?;
    let mut session = Session::start(&StartOptions {
        threshold: args.threshold,
        user_stack_size: args.user_stack_size,
        ring_bytes: crate::bpf::RING_BYTES,
        loops: args.detectors.options(),
    })?;
    let (mut command, idle_loops) = watch_targets(&args, &selector, &mut session).await?;
    let mut pipeline = Pipeline::new();
    // Before "watching" is said: a loop found asleep may block the moment
    // it wakes, and its frames need its interpreter known by then.
    pipeline.loops_found(idle_loops, &mut RuntimeMaps::of(&mut session.maps));
    let mut sink = Sink::new(&args, selector, pictures, command.as_ref());
    let started = Instant::now();
    let stop =
        watch_until_stop(&args, &mut session, &mut pipeline, &mut sink, &mut command).await?;

    // Events of the last moments (a command's final blocking call) are
    // already in the ring buffer: report them before the summary. Then the
    // strict counts, a last time: first those whose sites are known, then,
    // once the records sent meanwhile are in, all.
    for mode in [StrictRead::Periodic, StrictRead::Final] {
        let mut maps = RuntimeMaps::of(&mut session.maps);
        // What the ring buffer holds now, not what a program that keeps
        // blocking adds while it is read.
        for _ in 0..FINAL_BATCHES {
            if pipeline.drain(session.ring.get_mut(), &mut maps, |o| sink.take(o)) < DRAIN_BATCH {
                break;
            }
        }
        pipeline.read_strict(&mut session.maps.strict_counts, mode, |o| sink.take(o));
    }
    sink.check()?;
    let mut reporter = sink.reporter;
    for written in sink.pictures.write(started.elapsed())? {
        reporter.diag(&written);
    }
    report_losses(&mut reporter, &session, &pipeline);

    let exit_code = match &stop {
        Stop::CommandExited(status) => exit_code(status),
        _ => 0,
    };
    let why = describe_stop(&stop, command.as_ref());
    let strict_lost = Counters::read(&session.maps.counters)[Counter::LostStrictSites];
    let found = describe_found(&args, &pipeline, &session.detectors, strict_lost);
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

/// Everything about the targets that can be checked without the kernel:
/// there are some, the given processes and threads exist, the patterns
/// are valid.
fn check_targets(args: &TraceArgs) -> anyhow::Result<Selector> {
    if !args.has_targets() {
        bail!(
            "nothing to watch: give --pid PID, --tid TID, --comm/--exe/--cmdline/--cgroup/--unit GLOB, or a command after `--` (see `blockwatch trace --help`)"
        );
    }
    for &pid in &args.pids {
        targets::validate_pid(pid)?;
    }
    for &tid in &args.tids {
        procfs::tgid(tid).ok_or(targets::TargetError::NoSuchTid(tid))?;
    }
    Ok(Selector::new(&args.patterns())?)
}

/// Tags the given processes and threads and the running processes the
/// selector matches, then starts the command, if there is one. Returns it,
/// and the loops found asleep in their wait.
async fn watch_targets(
    args: &TraceArgs,
    selector: &Selector,
    session: &mut Session,
) -> anyhow::Result<(Option<targets::Command>, Vec<IdleLoop>)> {
    let rule = args.threads.rule(false);
    let mut maps = TagMaps::of(&mut session.maps);
    let mut idle = Vec::new();
    for &pid in &args.pids {
        idle.extend(maps.watch_process(pid, rule)?);
    }
    for &tid in &args.tids {
        maps.tag_thread(tid)?;
    }
    if !selector.is_empty() {
        // The kernel watches what it can match by name at exec itself,
        // before user space reads the notice; the count is still 0 here.
        let by_name = targets::names::kernel_matches(&args.comms, &[], rule);
        let comm_matches = targets::names::store(&mut session.maps.comm_matches, &by_name)?;
        session.maps.config.set(
            0,
            Config {
                threshold_ns: threshold_ns(args.threshold),
                notify_all_execs: 1,
                comm_matches,
                ..Default::default()
            },
            0,
        )?;
        let mut maps = TagMaps::of(&mut session.maps);
        for pid in procfs::pids() {
            if procfs::comm(pid).is_some_and(|c| selector.selects(pid, &c))
                && !targets::is_blockwatch(pid)
                && let Ok(found) = maps.watch_process(pid, rule)
            {
                idle.extend(found);
            }
        }
    }
    if args.command.is_empty() {
        return Ok((None, idle));
    }
    let rule = args.threads.rule(true);
    let mut maps = TagMaps::of(&mut session.maps);
    let started =
        targets::spawn_watched(&args.command, |pid| maps.watch_process(pid, rule).map(drop))
            .await?;
    Ok((Some(started), idle))
}

/// Drains the ring buffer into the sink, and watches the processes the
/// selector picks as they exec, until the session ends.
async fn watch_until_stop(
    args: &TraceArgs,
    session: &mut Session,
    pipeline: &mut Pipeline,
    sink: &mut Sink,
    command: &mut Option<targets::Command>,
) -> anyhow::Result<Stop> {
    // Processes of explicitly tagged threads are not in WATCHED.
    let tid_pids: Vec<u32> = args.tids.iter().filter_map(|&t| procfs::tgid(t)).collect();
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
    let mut ticks = 0u64;
    let has_command = command.is_some();

    loop {
        let retry = pipeline.exec_retry_due();
        tokio::select! {
            guard = session.ring.readable_mut() => {
                let mut guard = guard?;
                let mut maps = RuntimeMaps::of(&mut session.maps);
                let records = pipeline.drain(guard.get_inner_mut(), &mut maps, |o| sink.take(o));
                // A full batch leaves records behind, and the kernel wakes
                // a reader only once it has caught up: still ready.
                if records < DRAIN_BATCH {
                    guard.clear_ready();
                }
                sink.check()?;
                for pid in std::mem::take(&mut sink.watch.to_watch) {
                    let mut maps = TagMaps::of(&mut session.maps);
                    match maps.watch_process(pid, sink.watch.rule) {
                        Ok(idle) => {
                            pipeline.loops_found(idle, &mut RuntimeMaps::of(&mut session.maps));
                        }
                        Err(e) => warn!("cannot watch new process {pid}: {e}"),
                    }
                    pipeline.inspect_at_exec(pid, &mut session.maps.pyprocs);
                }
                // A watched program that exec'd (the command, a child):
                // an interpreter linked into the executable is found now,
                // before its loop runs; a shared libpython, mapped later by
                // the loader, when the kernel reports the loop.
                for pid in std::mem::take(&mut sink.watch.execd) {
                    if session.maps.watched.get(&pid, 0).is_ok() {
                        pipeline.inspect_at_exec(pid, &mut session.maps.pyprocs);
                    }
                }
                if (BUSY_RECORDS..DRAIN_BATCH).contains(&records) {
                    tokio::time::sleep(BUSY_PAUSE).await;
                }
            }
            _ = sleep_until(retry), if retry.is_some() => {
                pipeline.retry_execs(&mut session.maps.pyprocs);
            }
            _ = &mut ctrl_c => return Ok(Stop::Interrupted),
            _ = sigterm.recv() => return Ok(Stop::Interrupted),
            _ = &mut deadline => return Ok(Stop::Duration),
            status = wait_for(command), if has_command => {
                return Ok(Stop::CommandExited(status.context("waiting for the command")?));
            }
            _ = tick.tick() => {
                ticks += 1;
                if session.detectors.options.strict && ticks.is_multiple_of(STRICT_READ_TICKS) {
                    let mut maps = RuntimeMaps::of(&mut session.maps);
                    pipeline.drain(session.ring.get_mut(), &mut maps, |o| sink.take(o));
                    pipeline.read_strict(&mut session.maps.strict_counts, StrictRead::Periodic, |o| sink.take(o));
                    sink.check()?;
                }
                let pids: Vec<u32> = session.maps.watched.keys().filter_map(Result::ok).chain(tid_pids.iter().copied()).collect();
                pipeline.refresh_interpreters(pids, &mut session.maps.pyprocs);
                if sink.watch.all_gone() {
                    return Ok(Stop::TargetsGone);
                }
            }
        }
    }
}

/// Sleeps until `at`; never, without a time.
pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The command's exit; never, without a command.
async fn wait_for(
    command: &mut Option<targets::Command>,
) -> std::io::Result<std::process::ExitStatus> {
    match command {
        Some(c) => c.child.wait().await,
        None => std::future::pending().await,
    }
}

/// Warns of what the kernel or the decoder lost.
fn report_losses(reporter: &mut Reporter, session: &Session, pipeline: &Pipeline) {
    let counters = Counters::read(&session.maps.counters);
    for warning in counters.warnings() {
        reporter.diag(&warning);
    }
    // Not a loss: the episodes were repaired, and -v says how often.
    let repaired = counters[Counter::MissedSwitchIns];
    if repaired > 0 {
        info!("{repaired} switch-ins of loop threads that sched_switch never showed were repaired");
    }
    if pipeline.stats.decode_errors > 0 {
        reporter.diag(&format!(
            "blockwatch: warning: {} kernel records could not be decoded",
            pipeline.stats.decode_errors
        ));
    }
}

/// `12 loop episodes over 10ms (2 mostly CPU work), 3 strict calls` for
/// the last line; `strict_lost` strict calls were counted at no call site.
fn describe_found(
    args: &TraceArgs,
    pipeline: &Pipeline,
    detectors: &LoopDetectors,
    strict_lost: u64,
) -> String {
    let mut found = format!(
        "{} loop episodes over {} ({} mostly CPU work)",
        pipeline.stats.events,
        format_duration(args.threshold),
        pipeline.stats.stalls,
    );
    // Never silent about what was not reported.
    let st = &pipeline.stats;
    if st.unclocked > 0 {
        found.push_str(&format!(
            ", {} CPU-bound episodes not reported while their loop's clock was looked for",
            st.unclocked
        ));
    }
    if st.inconsistent > 0 {
        found.push_str(&format!(
            ", {} episodes dropped whose parts did not add up",
            st.inconsistent
        ));
    }
    if let Some(more) = crate::pipeline::loops::header_counts(
        &detectors.options,
        pipeline.stats.strict,
        strict_lost,
    ) {
        found.push_str(&more);
    }
    found
}

fn describe_stop(stop: &Stop, command: Option<&targets::Command>) -> String {
    match stop {
        Stop::Interrupted => "interrupted".to_string(),
        Stop::Duration => "duration reached".to_string(),
        Stop::TargetsGone => "all watched processes exited".to_string(),
        Stop::CommandExited(status) => format!(
            "`{}` exited with {}",
            command.map(|c| c.display.as_str()).unwrap_or(""),
            describe_status(status)
        ),
    }
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
