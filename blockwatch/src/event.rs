//! The user-space model of a blocking event, a strict call or a stall:
//! what [`crate::pipeline`] builds from kernel records and every output in
//! [`crate::output`] consumes (text, JSON, summary, metrics). Its JSON form
//! is the documented schema of `--output json` (see README), so field
//! names here are a public contract.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

/// What kind of wait blocked the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    File,
    Stat,
    Sleep,
    Lock,
    Gil,
    Net,
    Process,
    Other,
    /// A loop stalled by CPU work (no syscall): `detector` is `stall`.
    Stall,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::File => "file",
            Class::Stat => "stat",
            Class::Sleep => "sleep",
            Class::Lock => "lock",
            Class::Gil => "gil",
            Class::Net => "net",
            Class::Process => "process",
            Class::Other => "other",
            Class::Stall => "stall",
        }
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the thread was off the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OffState {
    /// Interruptible sleep: a timer, a lock, a socket.
    Sleeping,
    /// Uninterruptible sleep (D state): disk I/O, page faults on files.
    Disk,
    /// Runnable but descheduled: the loop wanted the CPU and did not get it.
    Preempted,
    /// Did not leave the CPU: strict calls and stalls.
    Running,
}

impl OffState {
    pub fn as_str(self) -> &'static str {
        match self {
            OffState::Sleeping => "sleeping",
            OffState::Disk => "disk",
            OffState::Preempted => "preempted",
            OffState::Running => "running",
        }
    }
}

/// What took the largest share of a reported episode, or strict mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Detector {
    /// An episode at or over `--threshold` whose time went mostly to
    /// waits off the CPU: the event names its longest wait.
    #[default]
    Offcpu,
    /// A blocking-class syscall that stayed on the CPU (`--strict`).
    Strict,
    /// An episode at or over `--threshold` whose time went mostly to CPU
    /// work: the event names the stack most CPU samples share.
    Stall,
}

impl Detector {
    pub fn as_str(self) -> &'static str {
        match self {
            Detector::Offcpu => "offcpu",
            Detector::Strict => "strict",
            Detector::Stall => "stall",
        }
    }
}

/// What produced a frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    /// Machine code: `function` is a symbol, `module` the binary.
    #[default]
    Native,
    /// A CPython interpreter frame: `function` is the qualified name,
    /// `module` and `file` the source file.
    Python,
}

impl FrameKind {
    fn is_native(&self) -> bool {
        *self == FrameKind::Native
    }
}

/// One stack frame, innermost first in [`Event::stack`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Frame {
    /// Instruction address in the process.
    #[serde(serialize_with = "hex")]
    pub address: u64,
    /// Demangled function name, when known.
    pub function: Option<String>,
    /// Path of the binary or library the address lies in.
    pub module: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// Set on frames that were inlined into the next (outer) frame.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inlined: bool,
    /// Omitted for native frames; `"python"` for interpreter frames.
    #[serde(skip_serializing_if = "FrameKind::is_native")]
    pub kind: FrameKind,
}

fn hex<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

/// A loop episode at or over the threshold (what blocked a tagged
/// event-loop thread), or a strict call.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    /// When the wait began (wall clock), RFC 3339 with microseconds.
    #[serde(serialize_with = "rfc3339")]
    pub ts: SystemTime,
    pub pid: u32,
    pub tid: u32,
    /// Process name.
    pub comm: String,
    /// Name of the blocked thread.
    pub thread: String,
    /// Syscall name of the episode's longest wait (or the strict call),
    /// or null when it was not in a syscall (preempted, a page fault) or
    /// the episode never left the CPU.
    pub syscall: Option<&'static str>,
    /// Raw syscall number (x86-64), -1 when not in a syscall.
    pub syscall_nr: i64,
    pub class: Class,
    /// Episodes: wall time; strict calls: time in the call.
    pub duration_ns: u64,
    /// How the longest wait was off the CPU; `running` for an episode that
    /// never left it, and for strict calls.
    pub state: OffState,
    pub stack: Vec<Frame>,
    /// The innermost frame that belongs to the application, or null.
    pub culprit: Option<Frame>,
    /// The innermost frame of the user's own code, outside installed
    /// packages: when the culprit is in a library, the line that called
    /// it; else the culprit itself (see [`crate::analyze::culprit::offender`]).
    pub offender: Option<Frame>,
    /// What to do instead, for this runtime and call (see
    /// [`crate::analyze::advice::advise`]); never empty.
    pub advice: String,
    /// What took most of the episode (`offcpu`: waits, `stall`: CPU
    /// work), or `strict` for a strict call.
    pub detector: Detector,
    /// Episodes (not strict calls): where the time went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub episode: Option<Episode>,
}

/// Where a reported episode's time went. `Event::duration_ns` is its wall
/// time: from the loop leaving its idle wait to entering it again, while
/// no other task on that loop could run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Episode {
    /// On the CPU: callbacks' own work.
    pub cpu_ns: u64,
    /// Off the CPU in interruptible sleep (timers, locks, sockets).
    pub sleeping_ns: u64,
    /// Off the CPU in uninterruptible sleep (disk I/O, page faults).
    pub disk_ns: u64,
    /// Runnable but not running: the CPU went to another task.
    pub preempted_ns: u64,
    /// Waits in the episode; the event's `syscall`, `state` and (for
    /// `offcpu`) stack are its longest one's.
    pub waits: u32,
    pub longest_wait_ns: u64,
    /// CPU stack samples taken in the episode (`stall`: `stack` is the
    /// one most of them share).
    pub samples: u32,
}

impl Episode {
    /// Off-CPU time of every kind.
    pub fn offcpu_ns(&self) -> u64 {
        self.sleeping_ns + self.disk_ns + self.preempted_ns
    }
}

fn rfc3339<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_rfc3339(*t))
}

/// `2026-11-25T06:12:00.123456Z`.
pub fn format_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    humantime::format_rfc3339_micros(UNIX_EPOCH + d).to_string()
}
