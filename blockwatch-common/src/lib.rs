//! Types shared by the kernel programs and user space.
//!
//! Every type here is `#[repr(C)]`, `Copy`, and laid out without implicit
//! padding so that the bytes the kernel writes are the bytes user space
//! decodes. Layout changes must be made on both sides at once; the size
//! assertions at the bottom catch the accidental ones.
#![no_std]

/// Frames kept per user stack (the kernel's default `perf_event_max_stack`).
pub const MAX_FRAMES: usize = 127;
/// Length of a task's `comm`.
pub const COMM_LEN: usize = 16;
/// Bytes of user stack copied for a futex probe (see [`ProbeEvent`]).
pub const PROBE_STACK_BYTES: usize = 512;
/// How many futex probes a thread may send before the kernel stops asking.
pub const PROBE_BUDGET: u8 = 16;
/// Most bytes of user stack copied per blocking wait (see [`UserStack`]).
pub const MAX_USER_STACK: usize = 32 * 1024;
/// Bytes of user stack copied per blocking wait unless configured otherwise.
pub const DEFAULT_USER_STACK: u32 = 16 * 1024;
/// Bytes of [`UserStack`] before its `bytes`.
pub const USER_STACK_HEADER: usize = 48;

/// Thread is watched but not (yet) known to run an event loop: nothing it
/// does is reported, but the kernel watches for its first idle wait.
pub const TAG_CANDIDATE: u8 = 1;
/// Thread runs an event loop: blocking waits are reported.
pub const TAG_LOOP: u8 = 2;

/// `--threads loop`: tag threads once they idle in their runtime's wait.
pub const THREADS_LOOP: u8 = 0;
/// `--threads main`: tag only each process's main thread.
pub const THREADS_MAIN: u8 = 1;
/// `--threads all`: tag every thread.
pub const THREADS_ALL: u8 = 2;

/// Off-CPU state of a blocking wait.
pub const STATE_SLEEPING: u8 = 0;
pub const STATE_DISK: u8 = 1;
pub const STATE_PREEMPTED: u8 = 2;

/// Record kinds in the event ring buffer (first `u32` of every record).
pub const KIND_BLOCK: u32 = 1;
pub const KIND_PROBE: u32 = 2;
pub const KIND_EXEC: u32 = 3;
pub const KIND_EXIT: u32 = 4;
/// A copy of a blocked thread's user stack ([`UserStack`]), sent just before
/// the `KIND_BLOCK` record of the same wait. Numbered apart from the others
/// so that new kinds can be added densely without colliding.
pub const KIND_USER_STACK: u32 = 16;

/// Indexes into the `COUNTERS` per-CPU array.
pub const COUNTER_LOST_EVENTS: u32 = 0;
pub const COUNTER_LOST_PROBES: u32 = 1;
pub const COUNTER_LOST_STACKS: u32 = 2;
pub const COUNTER_LOST_TAGS: u32 = 3;
pub const COUNTER_EVENTS: u32 = 4;
/// User-stack copies that failed (no map entry) or could not be sent.
pub const COUNTER_LOST_USER_STACKS: u32 = 7;
pub const NUM_COUNTERS: u32 = 8;

/// Per-thread state, kept by the kernel in `THREADS` (key: TID).
///
/// User space inserts entries for threads that existed before it attached
/// (with `BPF_NOEXIST`, never overwriting the kernel's) and otherwise only
/// reads them; everything it learns goes through `PARKS` instead, so the two
/// sides never race on one value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadTag {
    /// Switch-out time of a pending blocking wait; 0 when none is pending.
    pub out_ns: u64,
    /// Syscall number of the pending wait, or -1 when not in a syscall.
    pub syscall: i64,
    /// First syscall arguments of the pending wait (rdi, rsi, rdx).
    pub args: [u64; 3],
    /// The thread's CPython `PyThreadState`, once found; 0 unknown.
    pub py_tstate: u64,
    pub tgid: u32,
    /// The loop's own epoll fd, learned from its first idle wait; -1 unknown.
    pub loop_epfd: i32,
    pub tag: u8,
    /// `STATE_*` of the pending wait.
    pub off_state: u8,
    pub probe_budget: u8,
    pub _pad: [u8; 5],
}

impl ThreadTag {
    pub const fn new(tgid: u32, tag: u8) -> Self {
        Self {
            out_ns: 0,
            syscall: -1,
            args: [0; 3],
            py_tstate: 0,
            tgid,
            loop_epfd: -1,
            tag,
            off_state: 0,
            probe_budget: PROBE_BUDGET,
            _pad: [0; 5],
        }
    }
}

/// A watched process (key: TGID in `WATCHED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchRule {
    /// `THREADS_*`.
    pub threads: u8,
    /// Children forked by the process are watched with the same rule.
    pub follow_children: u8,
    pub _pad: [u8; 6],
}

/// Runtime settings, `CONFIG[0]`; user space may change them while attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// Off-CPU time at or above which a wait becomes an event.
    pub threshold_ns: u64,
    /// Send `KIND_EXEC` for every exec on the host (process-name rules).
    pub notify_all_execs: u8,
    pub _pad: [u8; 7],
}

/// A user stack captured at switch-out, kept per TID in `STACKS` until the
/// thread runs again.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackBuf {
    /// Bytes written by `bpf_get_stack` (a multiple of 8), or 0.
    pub len: u64,
    pub ips: [u64; MAX_FRAMES],
    /// Interpreter frames found, innermost first.
    pub py_len: u64,
    pub py: [PyFrameRef; MAX_PY_FRAMES],
}

/// The top of a blocked thread's user stack and its registers, copied at
/// switch-out for DWARF unwinding in user space. Kept per TID in
/// `USER_STACKS` (one entry per loop thread, rewritten by each of its
/// waits); sent (`KIND_USER_STACK`), only its first `USER_STACK_HEADER +
/// len` bytes, when the wait becomes an event.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UserStack {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    /// Bytes of `bytes` that were copied, from `sp` up.
    pub len: u32,
    /// Switch-out time of the wait this copy belongs to (`BlockEvent::start_ns`).
    pub start_ns: u64,
    /// User registers at switch-out.
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    pub bytes: [u8; MAX_USER_STACK],
}

/// A blocking wait that ended (`KIND_BLOCK`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockEvent {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    /// `STATE_*`.
    pub state: u8,
    pub _pad: [u8; 3],
    pub syscall: i64,
    pub args: [u64; 3],
    /// Switch-out time, `CLOCK_MONOTONIC` nanoseconds.
    pub start_ns: u64,
    pub duration_ns: u64,
    pub comm: [u8; COMM_LEN],
    /// Number of valid entries in `ips`.
    pub frames: u32,
    /// Number of valid entries in `py`.
    pub py_frames: u32,
    pub ips: [u64; MAX_FRAMES],
    pub py: [PyFrameRef; MAX_PY_FRAMES],
}

/// A futex wait of a watched thread whose meaning user space must decide
/// (`KIND_PROBE`): is this the runtime's park (idle) or a lock (blocking)?
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ProbeEvent {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    pub _pad: u32,
    pub uaddr: u64,
    pub ip: u64,
    pub sp: u64,
    /// Bytes of `stack` that were read, from `sp` up.
    pub stack_len: u64,
    pub stack: [u8; PROBE_STACK_BYTES],
}

/// A process image was replaced (`KIND_EXEC`) or a task exited (`KIND_EXIT`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TaskEvent {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    /// For exec: the TID that called exec; for exit: 1 when the whole
    /// thread group is gone.
    pub aux: u32,
    pub comm: [u8; COMM_LEN],
}

/// Kernel structure offsets read from the running kernel's BTF by user
/// space, handed to the programs as read-only globals before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    pub task_stack: u32,
    pub pt_regs_orig_ax: u32,
    pub pt_regs_ip: u32,
    pub pt_regs_sp: u32,
    pub pt_regs_di: u32,
    pub pt_regs_si: u32,
    pub pt_regs_dx: u32,
    pub pt_regs_size: u32,
    pub thread_size: u32,
    /// `task_struct.thread.fsbase`: the thread pointer, i.e. its pthread_t.
    pub task_fsbase: u32,
    pub pt_regs_bp: u32,
    /// `task_struct.flags` (`PF_EXITING` once the task began to exit).
    pub task_flags: u32,
}

/// Interpreter frames recorded per blocking event (CPython).
pub const MAX_PY_FRAMES: usize = 32;

/// CPython structure offsets for one interpreter version, found by user
/// space (see `blockwatch::python`), so the kernel can walk a blocked
/// thread's interpreter frames.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyOffsets {
    /// (major << 8) | minor, e.g. 0x030b.
    pub version: u32,
    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interpreters_head: u32,
    /// Thread list head in `PyInterpreterState` (3.10: `tstate_head`; 3.11+: `threads.head`).
    pub interp_threads_head: u32,
    pub tstate_next: u32,
    /// `PyThreadState.thread_id`: the pthread_t, i.e. the thread's fs base.
    pub tstate_thread_id: u32,
    /// 3.10: `frame`; 3.11/3.12: `cframe`; 3.13: `current_frame`.
    pub tstate_frame: u32,
    /// 3.11/3.12: `_PyCFrame.current_frame`; `u32::MAX` when `tstate_frame`
    /// points at the frame itself.
    pub cframe_current_frame: u32,
    /// 3.10: `f_back`; 3.11+: `previous`.
    pub frame_previous: u32,
    /// 3.10-3.12: `f_code`; 3.13: `f_executable`.
    pub frame_code: u32,
    /// 3.10: `f_lasti` (4 bytes); 3.11/3.12: `prev_instr`; 3.13: `instr_ptr`.
    pub frame_instr: u32,
    /// 4 or 8.
    pub frame_instr_size: u32,
    /// 3.12+: `owner` (1 byte); `u32::MAX` when absent.
    pub frame_owner: u32,
}

/// A watched CPython process (`PYPROCS`, key: TGID).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PyProc {
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    pub offsets: PyOffsets,
}

/// One interpreter frame: the code object and where in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyFrameRef {
    pub code: u64,
    pub instr: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: all of these are plain-old-data `#[repr(C)]` types.
    unsafe impl aya::Pod for ThreadTag {}
    unsafe impl aya::Pod for WatchRule {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for StackBuf {}
    unsafe impl aya::Pod for UserStack {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for PyOffsets {}
    unsafe impl aya::Pod for PyProc {}
}

const _: () = {
    assert!(core::mem::size_of::<ThreadTag>() == 64);
    assert!(core::mem::size_of::<WatchRule>() == 8);
    assert!(core::mem::size_of::<BlockEvent>() == 88 + 8 * MAX_FRAMES + 16 * MAX_PY_FRAMES);
    assert!(core::mem::size_of::<ProbeEvent>() == 48 + PROBE_STACK_BYTES);
    assert!(core::mem::size_of::<TaskEvent>() == 32);
    assert!(core::mem::size_of::<UserStack>() == USER_STACK_HEADER + MAX_USER_STACK);
    assert!(MAX_USER_STACK.is_multiple_of(4096));
};

// ---- strict syscall mode and loop stalls (blockwatch-ebpf/src/{strict,stall}.rs)

/// A blocking-class syscall of a loop thread that did not go off the CPU
/// long enough to be a `KIND_BLOCK` event ([`LoopEvent`], `--strict`).
pub const KIND_STRICT: u32 = 5;
/// An on-CPU stack sample of a busy loop thread ([`LoopEvent`]).
pub const KIND_SAMPLE: u32 = 6;
/// A busy period of a loop thread whose on-CPU time reached the stall
/// threshold, sent when the thread reaches its idle wait again ([`LoopEvent`]).
pub const KIND_STALL: u32 = 7;

/// Indexes into the `LOOP_COUNTERS` per-CPU array.
pub const LOOP_COUNTER_LOST: u32 = 0;
pub const LOOP_COUNTER_STRICT: u32 = 1;
pub const LOOP_COUNTER_STALLS: u32 = 2;
pub const LOOP_COUNTER_SAMPLES: u32 = 3;
/// `LOOPSTATE` was full: a thread's strict/stall state could not be kept.
pub const LOOP_COUNTER_LOST_STATE: u32 = 4;
pub const NUM_LOOP_COUNTERS: u32 = 8;

/// Syscall numbers covered by [`LoopConfig::strict_nrs`].
pub const STRICT_MAX_NR: usize = 512;

/// Settings of the strict and stall detectors, `LOOP_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LoopConfig {
    /// On-CPU time of a busy period at or above which it is a stall; 0 off.
    pub stall_ns: u64,
    /// Busy periods are sampled once they have lasted this long.
    pub sample_after_ns: u64,
    /// 1 when the syscall tracepoints are attached (`--strict`).
    pub strict: u8,
    pub _pad: [u8; 7],
    /// Bitmap of the syscalls strict mode counts (bit `nr % 64` of word
    /// `nr / 64`), chosen by user space.
    pub strict_nrs: [u64; STRICT_MAX_NR / 64],
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            stall_ns: 0,
            sample_after_ns: 0,
            strict: 0,
            _pad: [0; 7],
            strict_nrs: [0; STRICT_MAX_NR / 64],
        }
    }
}

/// Per-thread state of the strict and stall detectors (`LOOPSTATE`, key:
/// TID), kept only by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopState {
    /// When the thread left its idle wait; 0 while idle.
    pub busy_start_ns: u64,
    /// Last switch-in during the busy period; 0 while off the CPU.
    pub in_ns: u64,
    /// On-CPU time of the busy period up to `in_ns`.
    pub run_ns: u64,
    /// Entry time of a pending strict syscall; 0 when none.
    pub strict_enter_ns: u64,
    pub strict_nr: i64,
    pub strict_args: [u64; 3],
    /// The pending strict syscall became a `KIND_BLOCK` event.
    pub strict_offcpu: u8,
    /// In the idle wait's syscall (strict mode sees its entry and exit).
    pub in_idle: u8,
    pub _pad: [u8; 6],
}

/// A strict call, a stack sample or a stall (`KIND_STRICT`, `KIND_SAMPLE`,
/// `KIND_STALL`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopEvent {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    pub _pad: u32,
    /// Strict: the syscall; otherwise -1.
    pub syscall: i64,
    pub args: [u64; 3],
    /// Strict: syscall entry; sample, stall: start of the busy period (a
    /// sample belongs to the stall with the same TID and `start_ns`).
    pub start_ns: u64,
    /// Strict: time in the syscall; sample, stall: on-CPU time of the busy
    /// period so far.
    pub duration_ns: u64,
    /// Sample, stall: wall time since the busy period began.
    pub busy_ns: u64,
    /// Thread name.
    pub comm: [u8; COMM_LEN],
    pub frames: u32,
    pub py_frames: u32,
    pub ips: [u64; MAX_FRAMES],
    pub py: [PyFrameRef; MAX_PY_FRAMES],
}

#[cfg(feature = "user")]
mod user_loop {
    use super::*;
    // SAFETY: plain-old-data `#[repr(C)]` types.
    unsafe impl aya::Pod for LoopConfig {}
    unsafe impl aya::Pod for LoopState {}
}

const _: () = {
    assert!(core::mem::size_of::<LoopConfig>() == 24 + STRICT_MAX_NR / 8);
    assert!(core::mem::size_of::<LoopState>() == 72);
    assert!(core::mem::size_of::<LoopEvent>() == 96 + 8 * MAX_FRAMES + 16 * MAX_PY_FRAMES);
};
