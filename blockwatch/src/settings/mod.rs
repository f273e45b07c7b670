//! What blockwatch runs with: every default (for `trace`'s flags and the
//! daemon alike), the validators the flags and the config keys share, and
//! the daemon's configuration, a TOML file validated whole at start (and
//! at each reload) with command-line flags on top ([`Overrides`]).
//!
//! Every error names the file, the line and the key, so a typo in a unit
//! file's config is found from the journal alone. Unknown keys are errors:
//! a misspelt `treshold` silently ignored would watch with the default.

pub mod duration;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use blockwatch_common::MAX_USER_STACK;
use clap::ValueEnum as _;
use serde::Deserialize;
use toml::Spanned;

use crate::settings::duration::{format_duration, parse_duration};
use crate::targets::ThreadsMode;
use crate::targets::selector::{Patterns, Selector};

/// localhost only: metrics name processes and functions of the host.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9747));
/// `--threshold`: waits shorter than this are not reported.
pub const DEFAULT_THRESHOLD: Duration = Duration::from_millis(10);
/// Bytes of a blocked thread's user stack copied for DWARF unwinding; the
/// kernel programs' own default, so that both sides agree.
pub const DEFAULT_USER_STACK_SIZE: u32 = blockwatch_common::DEFAULT_USER_STACK;
/// The daemon's ring buffer: every byte of it is resident, twice (see
/// ARCHITECTURE.md, "What the daemon keeps in memory"). 4 MiB holds about
/// 6,000 episodes, 200 ms at the 32,000 a second of the bench's load.
pub const DEFAULT_RING_BUFFER_SIZE: u32 = 4 << 20;
/// Bounds of `ring_buffer_size`: the kernel wants a power of two and at
/// least a page; past 256 MiB the memory is the problem, not the drain.
const RING_BUFFER_SIZES: std::ops::RangeInclusive<i64> = (64 << 10)..=(256 << 20);
pub const DEFAULT_TOP_CULPRITS: usize = 20;
pub const DEFAULT_EXPIRE_AFTER: Duration = Duration::from_secs(600);
pub const DEFAULT_LOG_PER_MINUTE: u32 = 10;

/// `--user-stack-size`: a number of bytes within
/// [`check_user_stack_size`]'s bounds.
pub fn parse_user_stack_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    check_user_stack_size(i64::from(n))
}

/// The bounds of a user-stack copy, for the flag and the config key: 0
/// to `MAX_USER_STACK` bytes.
pub fn check_user_stack_size(n: i64) -> Result<u32, String> {
    if n < 0 || n as usize > MAX_USER_STACK {
        return Err(format!(
            "{n} bytes is out of range: use 0 (frame pointers only) to {MAX_USER_STACK}"
        ));
    }
    Ok(n as u32)
}

/// The bounds of the daemon's ring buffer, for the config key.
pub fn check_ring_buffer_size(n: i64) -> Result<u32, String> {
    if !RING_BUFFER_SIZES.contains(&n) || !(n as u64).is_power_of_two() {
        return Err(format!(
            "{n} bytes is not a power of two from {} to {}",
            RING_BUFFER_SIZES.start(),
            RING_BUFFER_SIZES.end()
        ));
    }
    Ok(n as u32)
}

/// Why `--stall-threshold` and the `stall_threshold` key are gone.
pub const STALL_THRESHOLD_GONE: &str = "the stall threshold is gone: blockwatch reports loop \
     episodes, and an iteration of the loop at or over `threshold` is reported whatever filled \
     it, CPU work included; remove it (set `threshold` instead)";

/// `--stall-threshold`, kept only to say what replaced it.
pub fn parse_stall_threshold(_: &str) -> Result<Duration, String> {
    Err(STALL_THRESHOLD_GONE.into())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {}: {err}", path.display())]
    Read { path: PathBuf, err: std::io::Error },
    #[error("config {}, line {line}{}: {msg}", path.display(), key.as_ref().map(|k| format!(", key `{k}`")).unwrap_or_default())]
    Invalid {
        path: PathBuf,
        line: usize,
        key: Option<String>,
        msg: String,
    },
    #[error("{0}")]
    Flag(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<Spanned<String>>,
    threshold: Option<Spanned<String>>,
    threads: Option<Spanned<String>>,
    auto: Option<bool>,
    strict: Option<bool>,
    stall_threshold: Option<Spanned<String>>,
    user_stack_size: Option<Spanned<i64>>,
    ring_buffer_size: Option<Spanned<i64>>,
    #[serde(default)]
    targets: Targets,
    #[serde(default)]
    metrics: Metrics,
    #[serde(default)]
    log: Log,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Targets {
    #[serde(default)]
    comms: Vec<Spanned<String>>,
    #[serde(default)]
    exes: Vec<Spanned<String>>,
    #[serde(default)]
    cmdlines: Vec<Spanned<String>>,
    #[serde(default)]
    cgroups: Vec<Spanned<String>>,
    #[serde(default)]
    units: Vec<Spanned<String>>,
    #[serde(default)]
    pids: Vec<u32>,
    #[serde(default)]
    exclude_comms: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metrics {
    top_culprits: Option<Spanned<i64>>,
    container_labels: Option<bool>,
    expire_after: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Log {
    new_stacks_per_minute: Option<Spanned<i64>>,
}

/// Everything the daemon runs with, after file and flags are merged.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub threshold: Duration,
    pub threads: ThreadsMode,
    pub auto: bool,
    /// Processes selected by name, executable, command line, cgroup or
    /// unit.
    pub select: Patterns,
    pub pids: Vec<u32>,
    /// Process-name globs `auto` never watches.
    pub exclude_comms: Vec<String>,
    /// Culprits kept as labels per process; the rest are `other`.
    pub top_culprits: usize,
    /// How long the series of a process outlive its last exit.
    pub expire_after: Duration,
    /// Add `container` and `pod` labels, read from the process's cgroup.
    pub container_labels: bool,
    /// New blocking stacks logged per minute at most.
    pub log_per_minute: u32,
    /// Strict syscall mode (`strict = true`, `--strict`).
    pub strict: bool,
    /// Bytes of user stack copied per blocking event (0: frame pointers
    /// only).
    pub user_stack_size: u32,
    /// Bytes of the ring buffer the kernel sends records through.
    pub ring_buffer_size: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            threshold: DEFAULT_THRESHOLD,
            threads: ThreadsMode::Loop,
            auto: false,
            select: Patterns::default(),
            pids: Vec::new(),
            exclude_comms: Vec::new(),
            top_culprits: DEFAULT_TOP_CULPRITS,
            expire_after: DEFAULT_EXPIRE_AFTER,
            container_labels: false,
            log_per_minute: DEFAULT_LOG_PER_MINUTE,
            strict: false,
            user_stack_size: DEFAULT_USER_STACK_SIZE,
            ring_buffer_size: DEFAULT_RING_BUFFER_SIZE,
        }
    }
}

/// Command-line values that override the file (None/empty: not given).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub threshold: Option<Duration>,
    pub threads: Option<ThreadsMode>,
    pub auto: bool,
    /// Each kind of pattern given on the command line replaces the file's.
    pub select: Patterns,
    pub pids: Vec<u32>,
    pub container_labels: bool,
    pub strict: bool,
    pub user_stack_size: Option<u32>,
}

impl Settings {
    pub fn has_targets(&self) -> bool {
        self.auto || !self.select.is_empty() || !self.pids.is_empty()
    }

    /// Flags win over the file; list flags replace the file's lists.
    pub fn apply(&mut self, o: &Overrides) -> Result<(), ConfigError> {
        if let Some(l) = o.listen {
            self.listen = l;
        }
        if let Some(t) = o.threshold {
            self.threshold = t;
        }
        if let Some(t) = o.threads {
            self.threads = t;
        }
        if o.auto {
            self.auto = true;
        }
        Selector::new(&o.select).map_err(|e| ConfigError::Flag(e.to_string()))?;
        let (to, from) = (&mut self.select, &o.select);
        for (to, from) in [
            (&mut to.comms, &from.comms),
            (&mut to.exes, &from.exes),
            (&mut to.cmdlines, &from.cmdlines),
            (&mut to.cgroups, &from.cgroups),
            (&mut to.units, &from.units),
        ] {
            if !from.is_empty() {
                *to = from.clone();
            }
        }
        if o.container_labels {
            self.container_labels = true;
        }
        if o.strict {
            self.strict = true;
        }
        if let Some(n) = o.user_stack_size {
            self.user_stack_size = n;
        }
        if !o.pids.is_empty() {
            self.pids = o.pids.clone();
        }
        Ok(())
    }

    /// One line for the journal at start and after a reload.
    pub fn describe(&self) -> String {
        let mut what = Vec::new();
        if self.auto {
            what.push("every process (auto)".to_string());
        }
        what.extend(self.select.describe());
        if !self.pids.is_empty() {
            let ids: Vec<_> = self.pids.iter().map(u32::to_string).collect();
            what.push(format!("pid {}", ids.join(", ")));
        }
        format!(
            "watching {} for event-loop waits ≥ {}; metrics on http://{}/metrics",
            what.join(" and "),
            format_duration(self.threshold),
            self.listen
        )
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
        path: path.to_path_buf(),
        err,
    })?;
    parse(path, &text)
}

/// Validates `text` (the contents of `path`, named in errors).
pub fn parse(path: &Path, text: &str) -> Result<Settings, ConfigError> {
    let src = Source { path, text };
    let file: File = toml::from_str(text).map_err(|e| {
        // toml's message may quote the line; keep the first sentence.
        let msg = e.message().trim().replace('\n', " ");
        src.invalid(e.span(), None, msg)
    })?;
    let mut s = Settings::default();
    src.top_level(&file, &mut s)?;
    src.targets(&file.targets, &mut s)?;
    src.metrics(&file.metrics, &mut s)?;
    src.log(&file.log, &mut s)?;
    Ok(s)
}

/// The file being parsed, for errors that name its line.
struct Source<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Source<'_> {
    fn invalid(&self, span: Option<Range<usize>>, key: Option<&str>, msg: String) -> ConfigError {
        let start = span.map(|s| s.start).unwrap_or(0).min(self.text.len());
        let line = self.text[..start].matches('\n').count() + 1;
        let key = key
            .map(str::to_string)
            .or_else(|| key_on_line(self.text, line));
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            key,
            msg,
        }
    }

    fn duration(&self, v: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
        parse_duration(v.get_ref())
            .map_err(|e| self.invalid(Some(v.span()), Some(key), e.to_string()))
    }

    fn globs(&self, v: &[Spanned<String>], key: &str) -> Result<Vec<String>, ConfigError> {
        v.iter()
            .map(|g| {
                crate::targets::selector::glob(g.get_ref())
                    .map(|_| g.get_ref().clone())
                    .map_err(|msg| {
                        self.invalid(
                            Some(g.span()),
                            Some(key),
                            format!("invalid pattern {:?}: {msg}", g.get_ref()),
                        )
                    })
            })
            .collect()
    }

    /// `n` if within `range`; else an error whose fix is `use {hint}`.
    fn in_range(
        &self,
        n: &Spanned<i64>,
        key: &str,
        range: RangeInclusive<i64>,
        hint: &str,
    ) -> Result<i64, ConfigError> {
        let v = *n.get_ref();
        if !range.contains(&v) {
            return Err(self.invalid(
                Some(n.span()),
                Some(key),
                format!("{v} is out of range: use {hint}"),
            ));
        }
        Ok(v)
    }

    /// The keys outside any table.
    fn top_level(&self, file: &File, s: &mut Settings) -> Result<(), ConfigError> {
        if let Some(l) = &file.listen {
            s.listen = l.get_ref().parse().map_err(|_| {
                self.invalid(
                    Some(l.span()),
                    Some("listen"),
                    format!(
                        "{:?} is not an address: write IP:PORT, e.g. {DEFAULT_LISTEN}",
                        l.get_ref()
                    ),
                )
            })?;
        }
        if let Some(t) = &file.threshold {
            s.threshold = self.duration(t, "threshold")?;
        }
        if let Some(t) = &file.threads {
            s.threads = ThreadsMode::from_str(t.get_ref(), true).map_err(|_| {
                self.invalid(
                    Some(t.span()),
                    Some("threads"),
                    format!("{:?} is not a mode: use loop, main or all", t.get_ref()),
                )
            })?;
        }
        s.auto = file.auto.unwrap_or(false);
        s.strict = file.strict.unwrap_or(false);
        if let Some(n) = &file.user_stack_size {
            s.user_stack_size = check_user_stack_size(*n.get_ref())
                .map_err(|e| self.invalid(Some(n.span()), Some("user_stack_size"), e))?;
        }
        if let Some(n) = &file.ring_buffer_size {
            s.ring_buffer_size = check_ring_buffer_size(*n.get_ref())
                .map_err(|e| self.invalid(Some(n.span()), Some("ring_buffer_size"), e))?;
        }
        if file.stall_threshold.is_some() {
            // Not an error: a daemon upgraded with its old config must
            // still start.
            log::warn!("config key `stall_threshold` ignored: {STALL_THRESHOLD_GONE}");
        }
        Ok(())
    }

    fn targets(&self, t: &Targets, s: &mut Settings) -> Result<(), ConfigError> {
        s.select = Patterns {
            comms: self.globs(&t.comms, "targets.comms")?,
            exes: self.globs(&t.exes, "targets.exes")?,
            cmdlines: self.globs(&t.cmdlines, "targets.cmdlines")?,
            cgroups: self.globs(&t.cgroups, "targets.cgroups")?,
            units: self.globs(&t.units, "targets.units")?,
        };
        s.exclude_comms = self.globs(&t.exclude_comms, "targets.exclude_comms")?;
        s.pids = t.pids.clone();
        Ok(())
    }

    fn metrics(&self, m: &Metrics, s: &mut Settings) -> Result<(), ConfigError> {
        if let Some(n) = &m.top_culprits {
            s.top_culprits =
                self.in_range(n, "metrics.top_culprits", 1..=1000, "1 to 1000")? as usize;
        }
        s.container_labels = m.container_labels.unwrap_or(false);
        if let Some(e) = &m.expire_after {
            s.expire_after = self.duration(e, "metrics.expire_after")?;
        }
        Ok(())
    }

    fn log(&self, l: &Log, s: &mut Settings) -> Result<(), ConfigError> {
        if let Some(n) = &l.new_stacks_per_minute {
            s.log_per_minute = self.in_range(
                n,
                "log.new_stacks_per_minute",
                0..=10_000,
                "0 (log none) to 10000",
            )? as u32;
        }
        Ok(())
    }
}

/// The key assigned on line `line` (1-based), for errors whose message
/// does not name it (a wrong type).
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let l = text.lines().nth(line - 1)?;
    let (k, _) = l.split_once('=')?;
    let k = k.trim();
    (!k.is_empty() && !k.starts_with('#')).then(|| k.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Settings, ConfigError> {
        parse(Path::new("/etc/blockwatch.toml"), text)
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(p("").unwrap(), Settings::default());
        assert_eq!(Settings::default().listen.to_string(), "127.0.0.1:9747");
    }

    #[test]
    fn full_file() {
        let s = p(r#"
listen = "127.0.0.1:9999"
threshold = "25ms"
threads = "main"
auto = true

[targets]
comms = ["python3*", "node"]
exes = ["/usr/bin/python3*"]
cmdlines = ["*-m homeassistant*"]
cgroups = ["/kubepods.slice/*"]
units = ["home-assistant.service"]
pids = [1]
exclude_comms = ["systemd*"]

[metrics]
top_culprits = 5
container_labels = true
expire_after = "1m"

[log]
new_stacks_per_minute = 3
"#)
        .unwrap();
        assert_eq!(s.listen.port(), 9999);
        assert_eq!(s.threshold, Duration::from_millis(25));
        assert_eq!(s.threads, ThreadsMode::Main);
        assert!(s.auto);
        assert_eq!(s.select.comms, ["python3*", "node"]);
        assert_eq!(s.select.exes, ["/usr/bin/python3*"]);
        assert_eq!(s.select.cmdlines, ["*-m homeassistant*"]);
        assert_eq!(s.select.cgroups, ["/kubepods.slice/*"]);
        assert_eq!(s.select.units, ["home-assistant.service"]);
        assert!(s.container_labels);
        assert_eq!(s.pids, [1]);
        assert_eq!(s.exclude_comms, ["systemd*"]);
        assert_eq!(s.top_culprits, 5);
        assert_eq!(s.expire_after, Duration::from_secs(60));
        assert_eq!(s.log_per_minute, 3);
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = p("threshold = \"5ms\"\ntreshold = \"5ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("treshold"), "{e}");
        let e = p("[metrics]\n\ntop = 1\n").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("top"), "{e}");
    }

    #[test]
    fn bad_values_name_key_and_line() {
        let e = p("\nthreshold = \"80\"\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("`threshold`"), "{e}");
        assert!(e.contains("80ms"), "{e}");
        let e = p("[metrics]\nexpire_after = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("metrics.expire_after"),
            "{e}"
        );
        let e = p("listen = \"localhost\"\n").unwrap_err().to_string();
        assert!(e.contains("`listen`") && e.contains("IP:PORT"), "{e}");
        let e = p("[targets]\ncomms = [\"[\"]\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("targets.comms"), "{e}");
        let e = p("[targets]\nexes = [\"ok\"]\nunits = [\"[\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3") && e.contains("targets.units"), "{e}");
        let e = p("threads = \"every\"\n").unwrap_err().to_string();
        assert!(e.contains("loop, main or all"), "{e}");
        let e = p("[metrics]\ntop_culprits = 0\n").unwrap_err().to_string();
        assert!(e.contains("metrics.top_culprits"), "{e}");
        let e = p("auto = \"yes\"\n").unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("`auto`"), "{e}");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let e = p("a = 1\n[metrics\n").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn the_packaged_example_is_valid() {
        let text = include_str!("../../../packaging/blockwatch.toml");
        let s = p(text).unwrap();
        assert_eq!(s.listen, DEFAULT_LISTEN);
        assert!(s.has_targets());
    }

    #[test]
    fn flags_override_the_file() {
        let mut s = p("threshold = \"5ms\"\n[targets]\ncomms = [\"a\"]\n").unwrap();
        s.apply(&Overrides {
            threshold: Some(Duration::from_millis(50)),
            select: Patterns {
                units: vec!["x.service".into()],
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.threshold, Duration::from_millis(50));
        // Each kind replaces the file's own; the file's other kinds stay.
        assert_eq!(s.select.units, ["x.service"]);
        assert_eq!(s.select.comms, ["a"]);
        s.apply(&Overrides {
            select: Patterns {
                comms: vec!["b*".into()],
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.select.comms, ["b*"]);
        assert!(s.has_targets());
        let e = s
            .apply(&Overrides {
                select: Patterns {
                    cgroups: vec!["[".into()],
                    ..Default::default()
                },
                ..Default::default()
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("--cgroup"), "{e}");
    }

    #[test]
    fn user_stack_size_key() {
        assert_eq!(p("").unwrap().user_stack_size, DEFAULT_USER_STACK_SIZE);
        let mut s = p("user_stack_size = 0\n").unwrap();
        assert_eq!(s.user_stack_size, 0);
        s.apply(&Overrides {
            user_stack_size: Some(32768),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.user_stack_size, 32768);
        for bad in ["-1", "1000000"] {
            let e = p(&format!("\nuser_stack_size = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("line 2") && e.contains("`user_stack_size`") && e.contains("0 (frame"),
                "{e}"
            );
        }
    }

    #[test]
    fn ring_buffer_size_key() {
        assert_eq!(p("").unwrap().ring_buffer_size, DEFAULT_RING_BUFFER_SIZE);
        assert_eq!(
            p("ring_buffer_size = 16777216\n").unwrap().ring_buffer_size,
            16 << 20
        );
        for bad in ["0", "4096", "5000000", "1073741824"] {
            let e = p(&format!("\nring_buffer_size = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("line 2")
                    && e.contains("`ring_buffer_size`")
                    && e.contains("power of two"),
                "{e}"
            );
        }
    }

    #[test]
    fn strict_key_and_the_stall_threshold_that_is_gone() {
        let s = p("strict = true\n").unwrap();
        assert!(s.strict);
        assert!(!p("").unwrap().strict);
        // An old config still loads (a daemon upgraded with its config
        // must start); the key is ignored with a warning.
        let s = p("strict = true\nstall_threshold = \"250ms\"\n").unwrap();
        assert!(s.strict);
        let mut s = p("strict = false\n").unwrap();
        s.apply(&Overrides {
            strict: true,
            ..Default::default()
        })
        .unwrap();
        assert!(s.strict);
        let e = parse_stall_threshold("100ms").unwrap_err();
        assert!(e.contains("episodes") && e.contains("threshold"), "{e}");
    }
}
