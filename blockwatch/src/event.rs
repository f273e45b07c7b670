//! The user-space model of a blocking event, a strict call or a stall:
//! what [`crate::pipeline`] builds from kernel records and every output in
//! [`crate::output`] consumes (text, JSON, summary, metrics). Its JSON form
//! is the documented schema of `--output json` (see README), so field
//! names here are a public contract.

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

use crate::analyze::{advice, culprit};

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

/// A stack's frames, innermost first, shared by every event of one call
/// site rather than copied into each (a site's waits come by the
/// thousand a second), with what is worked out from the frames alone
/// kept beside them, so that it is worked out once a stack, not once an
/// event.
#[derive(Clone, Default)]
pub struct Stack(Arc<Shared>);

#[derive(Default)]
struct Shared {
    frames: Vec<Frame>,
    culprit: OnceLock<Option<Frame>>,
    offender: OnceLock<Option<Frame>>,
    /// The advice depends on the wait too: a few (wait, advice) pairs.
    advice: Mutex<Vec<(AdviceKey, String)>>,
    identity: OnceLock<u64>,
    json: OnceLock<Box<[u8]>>,
    /// [`Stack::culprit`] and [`Stack::offender`] as JSON.
    culprit_json: OnceLock<Box<[u8]>>,
    offender_json: OnceLock<Box<[u8]>>,
    /// The text lines, folded and whole (`--all-frames`).
    text: [OnceLock<Box<str>>; 2],
}

/// What the advice for a stack depends on beyond its frames.
type AdviceKey = (Class, Option<&'static str>, OffState, String);

/// Waits whose advice a stack keeps; those of a stack blocking in more
/// ways (rare) are worked out each time.
const ADVICE_KEPT: usize = 8;

impl Stack {
    pub fn new(frames: Vec<Frame>) -> Self {
        Stack(Arc::new(Shared {
            frames,
            ..Shared::default()
        }))
    }

    pub fn frames(&self) -> &[Frame] {
        &self.0.frames
    }

    /// [`culprit::culprit`] of the frames.
    pub fn culprit(&self) -> &Option<Frame> {
        self.0
            .culprit
            .get_or_init(|| culprit::culprit(&self.0.frames))
    }

    /// [`culprit::offender`] of the frames.
    pub fn offender(&self) -> &Option<Frame> {
        self.0
            .offender
            .get_or_init(|| culprit::offender(&self.0.frames))
    }

    /// [`advice::advise`] for a wait with these frames.
    pub fn advice(
        &self,
        class: Class,
        syscall: Option<&'static str>,
        state: OffState,
        thread: &str,
    ) -> String {
        let mut kept = self.0.advice.lock().unwrap_or_else(|e| e.into_inner());
        let found = kept
            .iter()
            .find(|((c, s, st, t), _)| (*c, *s, *st) == (class, syscall, state) && t == thread);
        if let Some((_, advice)) = found {
            return advice.clone();
        }
        let advice = advice::advise(class, syscall, state, &self.0.frames, thread);
        if kept.len() < ADVICE_KEPT {
            kept.push(((class, syscall, state, thread.to_string()), advice.clone()));
        }
        advice
    }

    /// A hash of what a reader tells stacks apart by: each frame's
    /// function, module and line (not its address, which ASLR moves).
    pub fn identity(&self) -> u64 {
        *self.0.identity.get_or_init(|| {
            let mut h = crate::identity_hasher();
            for f in &self.0.frames {
                (&f.function, &f.module, f.line).hash(&mut h);
            }
            h.finish()
        })
    }

    /// The frames as a JSON array ([`crate::output::json::write_frames`]).
    pub fn json(&self) -> &[u8] {
        self.0.json.get_or_init(|| {
            let mut out = Vec::new();
            crate::output::json::write_frames(&mut out, &self.0.frames);
            out.into_boxed_slice()
        })
    }

    /// [`Stack::culprit`] as JSON (a frame object, or `null`): every
    /// event of the stack names it, and rendering it (an address in hex,
    /// three escaped strings) each time cost more than the rest of the
    /// line's fields.
    pub fn culprit_json(&self) -> &[u8] {
        self.0
            .culprit_json
            .get_or_init(|| frame_json(self.culprit().as_ref()))
    }

    /// [`Stack::offender`] as JSON, likewise.
    pub fn offender_json(&self) -> &[u8] {
        self.0
            .offender_json
            .get_or_init(|| frame_json(self.offender().as_ref()))
    }

    /// The frames as text lines ([`crate::output::text::stack`]).
    pub fn text(&self, frames: crate::output::text::Frames) -> &str {
        let all = frames == crate::output::text::Frames::All;
        self.0.text[usize::from(all)]
            .get_or_init(|| crate::output::text::stack(&self.0.frames, frames).into())
    }
}

fn frame_json(frame: Option<&Frame>) -> Box<[u8]> {
    let mut out = Vec::new();
    crate::output::json::write_frame(&mut out, frame);
    out.into_boxed_slice()
}

impl std::ops::Deref for Stack {
    type Target = [Frame];

    fn deref(&self) -> &[Frame] {
        &self.0.frames
    }
}

impl<'a> IntoIterator for &'a Stack {
    type Item = &'a Frame;
    type IntoIter = std::slice::Iter<'a, Frame>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.frames.iter()
    }
}

impl FromIterator<Frame> for Stack {
    fn from_iter<I: IntoIterator<Item = Frame>>(frames: I) -> Self {
        Stack::new(frames.into_iter().collect())
    }
}

impl From<Vec<Frame>> for Stack {
    fn from(frames: Vec<Frame>) -> Self {
        Stack::new(frames)
    }
}

impl PartialEq for Stack {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.frames == other.0.frames
    }
}

impl Eq for Stack {}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.frames.fmt(f)
    }
}

impl Serialize for Stack {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.frames.serialize(s)
    }
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
    pub stack: Stack,
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
    rfc3339_display(t).to_string()
}

/// [`format_rfc3339`] without its `String`, to write in place.
pub fn rfc3339_display(t: SystemTime) -> humantime::Rfc3339Timestamp {
    // A time before the epoch (a clock stepped back) is shown as the epoch.
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    humantime::format_rfc3339_micros(UNIX_EPOCH + d)
}
