//! The command line, as clap definitions: the flags, their help, and how
//! they map onto [`settings`](crate::settings) and the other stages' plain
//! options. Defaults and validation live in `settings`; the help texts that
//! quote a default are checked against it in the tests below.

use std::ffi::OsString;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::bpf::LoopOptions;
use crate::output::report::OutputFormat;
use crate::settings::duration::clap_duration;
use crate::settings::{
    DEFAULT_USER_STACK_SIZE, Overrides, parse_stall_threshold, parse_user_stack_size,
};
use crate::targets::ThreadsMode;
use crate::targets::selector::Patterns;

#[derive(Debug, Parser)]
#[command(
    name = "blockwatch",
    version,
    about = "Finds the calls that block async runtimes' event loops (asyncio, tokio, Node/libuv)",
    long_about = "Finds the calls that block async runtimes' event loops.\n\n\
An event loop (Python asyncio, tokio workers, libuv/Node) must never wait on \
disk, sleep, locks or blocking sockets: while one call blocks, every task on \
that loop waits. blockwatch watches the event-loop threads of the processes you \
name with eBPF, and reports each loop episode (one iteration of the loop, from \
leaving its idle wait to entering it again) that lasted at least a threshold, \
whatever filled it (one long wait, many short ones, CPU work, preemption), \
with the stack of what took the most time.\n\n\
Needs root (or CAP_BPF and CAP_PERFMON) and a kernel with BTF."
)]
pub struct Cli {
    /// More diagnostics on stderr (-v: what is attached and tagged,
    /// including the kernel programs' own log; -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch processes until Ctrl-C, --duration, or the command's end, then
    /// print a summary.
    #[command(after_help = TRACE_EXAMPLES)]
    Trace(TraceArgs),
    /// Run as a service: export Prometheus metrics of blocking calls on
    /// /metrics, log each new blocking stack once, until SIGTERM.
    #[command(after_help = DAEMON_EXAMPLES)]
    Daemon(DaemonArgs),
}

const DAEMON_EXAMPLES: &str = "Examples:
  sudo blockwatch daemon --comm 'python3*'                 metrics on 127.0.0.1:9747
  sudo blockwatch daemon --auto --listen 127.0.0.1:9800    every event loop on the host
  sudo blockwatch daemon --config /etc/blockwatch/blockwatch.toml

Endpoints: /metrics (Prometheus), /healthz, /stacks (folded stacks, microseconds).
Flags override the config file; SIGHUP reloads the file, keeping counters.";

const TRACE_EXAMPLES: &str = "Examples:
  sudo blockwatch trace -- python3 app.py         run app.py and watch its event loop
  sudo blockwatch trace --pid 1234                 watch a running process
  sudo blockwatch trace --comm 'python3*' -d 60s   every python3 process, for a minute
  sudo blockwatch trace -p 1234 -o json | jq .     one JSON object per event

Threads (--threads loop, the default): a thread is an event loop once it idles
in its runtime's wait (epoll for asyncio, uvloop, libuv and tokio's I/O driver;
the park of a tokio worker). Executor threads (run_in_executor, spawn_blocking,
libuv's pool) never idle there and are never reported; nor is anything a
thread does before its loop first idles.";

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Watch this process (repeatable).
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Watch this thread as an event loop whatever it does (repeatable).
    #[arg(short, long = "tid", value_name = "TID")]
    pub tids: Vec<u32>,

    /// Which threads of the watched processes to report.
    #[arg(long, value_enum, default_value_t = ThreadsMode::Loop)]
    pub threads: ThreadsMode,

    /// Watch processes whose name matches this glob, including ones that
    /// start later (repeatable; e.g. 'python3*').
    #[arg(short, long = "comm", value_name = "GLOB")]
    pub comms: Vec<String>,

    #[command(flatten)]
    pub matching: MatchArgs,

    /// Report loop episodes at least this long (e.g. 5ms, 100us, 1s): one
    /// iteration of the loop, whatever filled it. A thread that runs no
    /// loop yet has each of its waits judged alone.
    #[arg(long, value_name = "DURATION", value_parser = clap_duration, default_value = "10ms")]
    pub threshold: Duration,

    /// Bytes of a blocked thread's user stack copied for DWARF unwinding
    /// (code without frame pointers), at most 32768; 0 uses frame
    /// pointers only.
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_USER_STACK_SIZE, value_parser = parse_user_stack_size)]
    pub user_stack_size: u32,

    #[command(flatten)]
    pub detectors: DetectorArgs,

    /// Stop after this long (default: until Ctrl-C or the command ends).
    #[arg(short, long, value_name = "DURATION", value_parser = clap_duration)]
    pub duration: Option<Duration>,

    /// text: events with stacks as they happen and a summary; json: one
    /// event per line on stdout, diagnostics and the summary on stderr.
    #[arg(short, long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// Text output: show every native frame of Python and JavaScript
    /// stacks. By default the interpreter's own frames (CPython's
    /// evaluation loop and call machinery in libpython, Node's V8, libuv
    /// and builtins) are folded into lines such as `… 12 interpreter frames
    /// (libpython3.11.so.1.0)`, so the code you can change comes first;
    /// the C library's call at the top, C extensions and your own native
    /// code always show. JSON output has every frame either way.
    #[arg(long)]
    pub all_frames: bool,

    /// At the end, write a flame graph (SVG) of blocking time by stack,
    /// culprits in red, to FILE.
    #[arg(long, value_name = "FILE.svg")]
    pub flamegraph: Option<std::path::PathBuf>,

    /// At the end, write a pprof profile (gzipped profile.proto) of
    /// blocking time to FILE, for `go tool pprof`, Pyroscope or Parca.
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<std::path::PathBuf>,

    /// Start this command and watch it and its children; blockwatch exits
    /// with its exit code. Runs as the invoking user under sudo.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// TOML configuration file (see README); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,

    /// Serve /metrics, /healthz and /stacks here [default: 127.0.0.1:9747].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,

    /// Watch this process (repeatable).
    #[arg(short, long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,

    /// Watch processes whose name matches this glob, including ones that
    /// start later (repeatable).
    #[arg(short, long = "comm", value_name = "GLOB")]
    pub comms: Vec<String>,

    #[command(flatten)]
    pub matching: MatchArgs,

    /// Which threads of the watched processes to report [default: loop].
    #[arg(long, value_enum)]
    pub threads: Option<ThreadsMode>,

    /// Report loop episodes at least this long, whatever filled them
    /// [default: 10ms].
    #[arg(long, value_name = "DURATION", value_parser = clap_duration)]
    pub threshold: Option<Duration>,

    /// Bytes of a blocked thread's user stack copied for DWARF unwinding
    /// (code without frame pointers), at most 32768; 0 uses frame
    /// pointers only [default: 16384]. A wait in a nested event loop
    /// (Node's execSync) copies 32768. Read at start (a reload does not
    /// change it).
    #[arg(long, value_name = "BYTES", value_parser = parse_user_stack_size)]
    pub user_stack_size: Option<u32>,

    #[command(flatten)]
    pub detectors: DetectorArgs,

    /// Watch every process on the host (but the config's exclude_comms and
    /// blockwatch itself) and report the threads that run event loops.
    #[arg(long)]
    pub auto: bool,

    /// Add `container` (the first 12 digits of the container ID) and `pod`
    /// (the Kubernetes pod UID) labels to the per-process metrics, read
    /// from each process's cgroup; empty for processes outside containers.
    #[arg(long)]
    pub container_labels: bool,
}

/// Process selectors beyond the name, shared by trace and daemon. Like
/// --comm they also select processes that start later.
#[derive(Clone, Debug, Default, Args)]
pub struct MatchArgs {
    /// Watch processes running this executable: a glob on the full path
    /// when it has a '/' (/usr/bin/python3*), else on the file name
    /// (repeatable).
    #[arg(long = "exe", value_name = "GLOB")]
    pub exes: Vec<String>,

    /// Watch processes whose command line (arguments joined by spaces)
    /// matches this glob, e.g. '*-m homeassistant*' (repeatable).
    #[arg(long = "cmdline", value_name = "GLOB")]
    pub cmdlines: Vec<String>,

    /// Watch processes in a cgroup whose path (as in /proc/PID/cgroup)
    /// matches this glob, e.g. '/kubepods.slice/*' (repeatable).
    #[arg(long = "cgroup", value_name = "GLOB")]
    pub cgroups: Vec<String>,

    /// Watch the processes of a systemd unit (service or scope), e.g.
    /// home-assistant.service or 'app-*.service' (repeatable).
    #[arg(long = "unit", value_name = "GLOB")]
    pub units: Vec<String>,
}

impl MatchArgs {
    pub fn patterns(&self, comms: &[String]) -> Patterns {
        Patterns {
            comms: comms.to_vec(),
            exes: self.exes.clone(),
            cmdlines: self.cmdlines.clone(),
            cgroups: self.cgroups.clone(),
            units: self.units.clone(),
        }
    }
}

/// `--strict`, shared by trace and daemon.
#[derive(Clone, Debug, Default, Args)]
pub struct DetectorArgs {
    /// Strict syscall mode: also count every blocking-class syscall (open,
    /// stat, listdir, sleep, fsync, flock, ...) of a loop thread that does
    /// not leave the CPU, as Home Assistant's checks do. Each distinct
    /// stack is reported once as a `strict` event; all calls are counted in
    /// the summary and metrics. COST: attaches the raw_syscalls
    /// tracepoints, which slow every syscall of every process on the host
    /// for as long as blockwatch runs: measured +50 ns per syscall
    /// (getppid 84 -> 135 ns, 1.6x) on a 2-core 6.18 VM, up to +250 ns
    /// (2x) on other machines. Syscall-heavy hosts feel it; off by default.
    #[arg(long)]
    pub strict: bool,

    /// Gone: CPU work counts toward --threshold like any other part of a
    /// loop episode. Kept so that old command lines say what changed.
    #[arg(long, hide = true, value_parser = parse_stall_threshold)]
    pub stall_threshold: Option<Duration>,
}

impl DetectorArgs {
    /// The detectors' options.
    pub fn options(&self) -> LoopOptions {
        LoopOptions {
            strict: self.strict,
        }
    }
}

impl DaemonArgs {
    /// The flags that override the config file.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen,
            threshold: self.threshold,
            threads: self.threads,
            auto: self.auto,
            select: self.matching.patterns(&self.comms),
            pids: self.pids.clone(),
            container_labels: self.container_labels,
            strict: self.detectors.strict,
            user_stack_size: self.user_stack_size,
        }
    }
}

impl TraceArgs {
    pub fn patterns(&self) -> Patterns {
        self.matching.patterns(&self.comms)
    }

    pub fn has_targets(&self) -> bool {
        !(self.pids.is_empty()
            && self.tids.is_empty()
            && self.patterns().is_empty()
            && self.command.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;
    use crate::settings::{DEFAULT_LISTEN, DEFAULT_THRESHOLD};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("blockwatch").chain(args.iter().copied()))
    }

    #[test]
    fn trace_defaults() {
        let Command::Trace(t) = parse(&["trace", "--pid", "1"]).unwrap().command else {
            panic!("not trace")
        };
        assert_eq!(t.pids, vec![1]);
        assert_eq!(t.threads, ThreadsMode::Loop);
        assert_eq!(t.threshold, DEFAULT_THRESHOLD);
        assert_eq!(t.output, OutputFormat::Text);
        assert!(t.duration.is_none() && t.command.is_empty());
        assert!(!t.all_frames);
        let Command::Trace(t) = parse(&["trace", "--all-frames", "--pid", "1"])
            .unwrap()
            .command
        else {
            panic!("not trace")
        };
        assert!(t.all_frames);
    }

    #[test]
    fn command_after_double_dash_keeps_its_flags() {
        let Command::Trace(t) = parse(&[
            "trace",
            "--threshold",
            "80ms",
            "--",
            "python3",
            "-X",
            "dev",
            "app.py",
        ])
        .unwrap()
        .command
        else {
            panic!("not trace")
        };
        assert_eq!(t.threshold, Duration::from_millis(80));
        assert_eq!(t.command, ["python3", "-X", "dev", "app.py"]);
        assert!(t.has_targets());
    }

    #[test]
    fn durations_need_units() {
        let err = parse(&["trace", "--threshold", "80", "--pid", "1"]).unwrap_err();
        assert!(err.to_string().contains("80ms"), "{err}");
    }

    #[test]
    fn repeatable_targets_and_modes() {
        let Command::Trace(t) = parse(&[
            "trace",
            "-p",
            "1",
            "-p",
            "2",
            "--tid",
            "3",
            "--threads",
            "all",
            "-c",
            "py*",
            "-o",
            "json",
            "-d",
            "2s",
        ])
        .unwrap()
        .command
        else {
            panic!("not trace")
        };
        assert_eq!(t.pids, vec![1, 2]);
        assert_eq!(t.tids, vec![3]);
        assert_eq!(t.threads, ThreadsMode::All);
        assert_eq!(t.comms, vec!["py*"]);
        assert_eq!(t.output, OutputFormat::Json);
        assert_eq!(t.duration, Some(Duration::from_secs(2)));
    }

    #[test]
    fn daemon_flags() {
        let Command::Daemon(d) = parse(&[
            "daemon",
            "--listen",
            "127.0.0.1:9999",
            "--comm",
            "py*",
            "--threshold",
            "5ms",
            "--auto",
        ])
        .unwrap()
        .command
        else {
            panic!("not daemon")
        };
        assert_eq!(d.listen.unwrap().port(), 9999);
        assert_eq!(d.comms, ["py*"]);
        assert_eq!(d.threshold, Some(Duration::from_millis(5)));
        assert!(d.auto && d.config.is_none() && d.threads.is_none());
        assert!(parse(&["daemon", "--listen", "localhost"]).is_err());
    }

    #[test]
    fn user_stack_size_is_bounded() {
        let Command::Trace(t) = parse(&["trace", "--pid", "1"]).unwrap().command else {
            panic!("not trace")
        };
        assert_eq!(t.user_stack_size, DEFAULT_USER_STACK_SIZE);
        let Command::Trace(t) = parse(&["trace", "--user-stack-size", "0", "-p", "1"])
            .unwrap()
            .command
        else {
            panic!("not trace")
        };
        assert_eq!(t.user_stack_size, 0);
        let err = parse(&["trace", "--user-stack-size", "40000", "-p", "1"]).unwrap_err();
        assert!(err.to_string().contains("32768"), "{err}");
        assert!(parse(&["trace", "--user-stack-size", "16k", "-p", "1"]).is_err());
        let Command::Daemon(d) = parse(&["daemon", "--user-stack-size", "8192"])
            .unwrap()
            .command
        else {
            panic!("not daemon")
        };
        assert_eq!(d.user_stack_size, Some(8192));
    }

    #[test]
    fn no_targets_is_detectable() {
        let Command::Trace(t) = parse(&["trace"]).unwrap().command else {
            panic!("not trace")
        };
        assert!(!t.has_targets());
    }

    #[test]
    fn detector_flags_become_options() {
        let Command::Trace(t) = parse(&["trace", "--strict", "-p", "1"]).unwrap().command else {
            panic!("not trace")
        };
        assert!(t.detectors.options().strict);
        // The stall threshold is gone; an old command line is told why.
        let err = parse(&["trace", "--stall-threshold", "off", "-p", "1"]).unwrap_err();
        assert!(err.to_string().contains("episodes"), "{err}");
    }

    /// The defaults the help quotes in prose are the ones settings applies.
    #[test]
    fn help_quotes_the_settings_defaults() {
        let mut cli = Cli::command();
        let help = |cli: &mut clap::Command, sub: &str| {
            cli.find_subcommand_mut(sub)
                .expect("subcommand")
                .render_long_help()
                .to_string()
        };
        let daemon = help(&mut cli, "daemon");
        for default in [
            format!("[default: {DEFAULT_LISTEN}]"),
            format!("[default: {}ms]", DEFAULT_THRESHOLD.as_millis()),
            format!("[default: {DEFAULT_USER_STACK_SIZE}]"),
        ] {
            assert!(daemon.contains(&default), "{default} in\n{daemon}");
        }
        let trace = help(&mut cli, "trace");
        let default = format!("[default: {}ms]", DEFAULT_THRESHOLD.as_millis());
        assert!(trace.contains(&default), "{default} in\n{trace}");
    }
}
