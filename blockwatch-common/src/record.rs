//! Ring-buffer records: what the kernel programs tell user space.
//!
//! Every record starts with a [`RecordHeader`] whose `kind` is a
//! [`RecordKind`]; user space reads the kind, then the whole record as the
//! type that kind names. The header is 12 bytes and each record's next
//! field is 4 bytes wide, so the 8-byte fields after it stay aligned
//! without padding.

use crate::python::{MAX_PY_FRAMES, PyFrameRef};
use crate::stack::{MAX_FRAMES, MAX_USER_STACK};

/// Length of a task's `comm`.
pub const COMM_LEN: usize = 16;
/// Bytes of user stack copied for a futex probe (see [`ProbeEvent`]).
pub const PROBE_STACK_BYTES: usize = 512;

/// What a ring-buffer record is (its header's `kind`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A loop episode at or over the threshold ([`BlockEvent`]).
    Block = 1,
    /// A futex wait to classify ([`ProbeEvent`]).
    Probe = 2,
    /// A process image was replaced ([`TaskEvent`]).
    Exec = 3,
    /// A task exited ([`TaskEvent`]).
    Exit = 4,
    /// The first blocking-class syscall of a strict call site that stayed
    /// on the CPU (`--strict`, [`StrictEvent`]): its stacks, sent once per
    /// site; the counts are in the `STRICT_COUNTS` map. Preceded by the
    /// [`UserStack`] copied at the call (same TID and `start_ns`).
    Strict = 5,
    /// An on-CPU stack sample of a loop thread in a long episode
    /// ([`LoopEvent`], `start_ns` the episode's start).
    Sample = 6,
    /// A thread was first seen idling in its runtime's wait: it runs an
    /// event loop ([`TaskEvent`], `aux` its loop's epoll fd, or -1 for a
    /// loop that parks on a futex). Sent once per thread, at the
    /// moment it becomes a loop thread, so user space can learn the
    /// process's interpreter before the loop's first blocking call.
    LoopFound = 8,
    /// A copy of a thread's user stack ([`UserStack`]), sent just before
    /// the record it belongs to: the `Block` record of its longest wait, a
    /// `Strict` site's first call, or a `Sample`. Numbered apart from the
    /// others, which are dense.
    UserStack = 16,
}

impl RecordKind {
    /// The kind with this number, if any.
    pub const fn from_u32(kind: u32) -> Option<Self> {
        Some(match kind {
            1 => Self::Block,
            2 => Self::Probe,
            3 => Self::Exec,
            4 => Self::Exit,
            5 => Self::Strict,
            6 => Self::Sample,
            8 => Self::LoopFound,
            16 => Self::UserStack,
            _ => return None,
        })
    }
}

/// The start of every record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordHeader {
    /// A [`RecordKind`]; a plain `u32` because user space reads it from
    /// bytes that may hold any value.
    pub kind: u32,
    /// Process (TGID).
    pub pid: u32,
    /// Thread (TID).
    pub tid: u32,
}

impl RecordHeader {
    #[inline(always)]
    pub const fn new(kind: RecordKind, pid: u32, tid: u32) -> Self {
        Self {
            kind: kind as u32,
            pid,
            tid,
        }
    }
}

/// Off-CPU state of a blocking wait.
pub const STATE_SLEEPING: u8 = 0;
pub const STATE_DISK: u8 = 1;
pub const STATE_PREEMPTED: u8 = 2;
/// An episode without a wait: it never left the CPU.
pub const STATE_RUNNING: u8 = 3;

/// A loop episode at or over the threshold ([`RecordKind::Block`]): one
/// iteration of the loop, from leaving its idle wait to entering it again
/// (or a single wait of a thread that runs no loop yet). `state`,
/// `syscall`, `args` and the stacks are those of its longest wait; with
/// no wait, `state` is `STATE_RUNNING`, `syscall` -1 and the stacks come
/// from the episode's samples.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockEvent {
    pub header: RecordHeader,
    /// `STATE_*` of the longest wait.
    pub state: u8,
    /// 1 when the longest wait's call site is in `KNOWN_SITES`: no user
    /// stack is sent (`frames` is 0), user space has it under `site`.
    pub site_known: u8,
    pub _pad: [u8; 2],
    pub syscall: i64,
    pub args: [u64; 3],
    /// The longest wait's call site (see [`SiteKey`](crate::SiteKey)).
    pub site: u64,
    /// Episode start, `CLOCK_MONOTONIC` nanoseconds.
    pub start_ns: u64,
    /// Episode wall time: how long the loop was unavailable.
    pub duration_ns: u64,
    /// On-CPU time of the episode.
    pub run_ns: u64,
    /// Off-CPU time of the episode by `STATE_*` (sleeping, disk, preempted).
    pub off_ns: [u64; 3],
    /// The longest wait: its switch-out time (the key of its `UserStack`)
    /// and its length.
    pub wait_start_ns: u64,
    pub wait_ns: u64,
    /// Waits and CPU samples in the episode.
    pub waits: u32,
    pub samples: u32,
    pub comm: [u8; COMM_LEN],
    /// Number of valid entries in the [`BlockStacks`] `ips` that follow
    /// (0: the record is a bare `BlockEvent`).
    pub frames: u32,
    /// Number of valid entries in `py`.
    pub py_frames: u32,
    pub py: [PyFrameRef; MAX_PY_FRAMES],
}

/// A [`BlockEvent`] with the frame-pointer stack of its longest wait: sent
/// only when that wait's call site is new to user space. A wait at a known
/// site, or an episode with no wait, is the `BlockEvent` alone, a third of
/// the size: the ring buffer holds three times as many.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockStacks {
    pub event: BlockEvent,
    pub ips: [u64; MAX_FRAMES],
}

/// A futex wait of a watched thread whose meaning user space must decide
/// ([`RecordKind::Probe`]): is this the runtime's park (idle) or a lock
/// (blocking)?
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProbeEvent {
    pub header: RecordHeader,
    pub _pad: u32,
    pub uaddr: u64,
    pub ip: u64,
    pub sp: u64,
    /// Bytes of `stack` that were read, from `sp` up.
    pub stack_len: u64,
    pub stack: [u8; PROBE_STACK_BYTES],
}

/// A process image was replaced ([`RecordKind::Exec`]), a task exited
/// ([`RecordKind::Exit`]) or a thread was found to run a loop
/// ([`RecordKind::LoopFound`]).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TaskEvent {
    pub header: RecordHeader,
    /// For exec: the TID that called exec; for exit: 1 when the whole
    /// thread group is gone; for a loop found: 0.
    pub aux: u32,
    pub comm: [u8; COMM_LEN],
}

/// The fixed part of a [`UserStack`]: all of it but the stack bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UserStackHead {
    pub header: RecordHeader,
    /// Bytes of `bytes` that were copied, from `sp` up.
    pub len: u32,
    /// Switch-out time of the wait this copy belongs to
    /// (`BlockEvent::wait_start_ns`).
    pub start_ns: u64,
    /// User registers at switch-out.
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
}

/// The top of a blocked thread's user stack and its registers, copied at
/// switch-out for DWARF unwinding in user space. Kept in `USER_STACKS`,
/// two slots per loop thread (the episode's longest wait so far, and the
/// wait in progress); sent ([`RecordKind::UserStack`]), only its `head`
/// and the first `head.len` bytes, when its episode is reported.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UserStack {
    pub head: UserStackHead,
    pub bytes: [u8; MAX_USER_STACK],
}

/// A stack sample ([`RecordKind::Sample`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopEvent {
    pub header: RecordHeader,
    pub _pad: u32,
    /// The syscall the thread was in when sampled, or -1, and its
    /// arguments.
    pub syscall: i64,
    pub args: [u64; 3],
    /// Start of the episode (a sample belongs to the `Block` record with
    /// the same TID and `start_ns`).
    pub start_ns: u64,
    /// On-CPU time of the episode so far.
    pub duration_ns: u64,
    /// Wall time since the episode began.
    pub busy_ns: u64,
    /// Thread name.
    pub comm: [u8; COMM_LEN],
    pub frames: u32,
    pub py_frames: u32,
    pub ips: [u64; MAX_FRAMES],
    pub py: [PyFrameRef; MAX_PY_FRAMES],
}

/// The first call of a strict call site ([`RecordKind::Strict`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StrictEvent {
    pub header: RecordHeader,
    pub _pad: u32,
    pub syscall: i64,
    pub args: [u64; 3],
    /// Syscall entry, `CLOCK_MONOTONIC` nanoseconds (the `UserStack` copy
    /// of the call has the same `start_ns`).
    pub start_ns: u64,
    /// Time in the syscall.
    pub duration_ns: u64,
    /// The call site (`StrictKey::site`; the key's other fields are the
    /// header's and `syscall`).
    pub site: u64,
    /// Thread name.
    pub comm: [u8; COMM_LEN],
    pub frames: u32,
    pub py_frames: u32,
    pub ips: [u64; MAX_FRAMES],
    pub py: [PyFrameRef; MAX_PY_FRAMES],
}

pod!(UserStack);

const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<RecordHeader>() == 12);
    assert!(offset_of!(RecordHeader, kind) == 0);
    let stacks = 8 * MAX_FRAMES + 16 * MAX_PY_FRAMES;
    assert!(size_of::<BlockEvent>() == 152 + 16 * MAX_PY_FRAMES);
    assert!(size_of::<BlockStacks>() == 152 + stacks);
    assert!(size_of::<ProbeEvent>() == 48 + PROBE_STACK_BYTES);
    assert!(size_of::<TaskEvent>() == 32);
    assert!(size_of::<UserStackHead>() == 48);
    assert!(size_of::<UserStack>() == size_of::<UserStackHead>() + MAX_USER_STACK);
    assert!(size_of::<LoopEvent>() == 96 + stacks);
    assert!(size_of::<StrictEvent>() == 96 + stacks);
};
