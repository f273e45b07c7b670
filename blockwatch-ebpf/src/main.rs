//! blockwatch's kernel programs.
//!
//! `sched_switch` is the detector: when a tagged thread leaves the CPU for a
//! reason other than its runtime's idle wait, the switch-out time, syscall
//! and user stack are kept; when it comes back, waits over the threshold go
//! to user space. Untagged threads pay one hash lookup per switch.
//!
//! The task programs keep the tags right: new threads of a watched process
//! are tagged before they first run, exec resets what was learned, exit
//! forgets the TID so a reused one starts clean.
//!
//! Every program has a `tp_btf` entry point and a `raw_tracepoint` twin for
//! kernels without BTF-typed tracepoints; both share one body.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_NO_PREALLOC, BPF_F_USER_STACK},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_stack, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::bpf_task_pt_regs,
    },
    macros::{btf_tracepoint, map, raw_tracepoint},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext},
};
use aya_log_ebpf::info;
use blockwatch_common::*;

mod stall;
mod strict;

// ---- maps -----------------------------------------------------------------

#[map]
static THREADS: HashMap<u32, ThreadTag> = HashMap::with_max_entries(65536, 0);
#[map]
static WATCHED: HashMap<u32, WatchRule> = HashMap::with_max_entries(16384, 0);
/// Futex addresses user space identified as a thread's runtime park (idle).
#[map]
static PARKS: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);
#[map]
static STACKS: HashMap<u32, StackBuf> = HashMap::with_max_entries(4096, 0);
/// CPython processes and their layout, from user space.
#[map]
static PYPROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(4096, 0);
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);
#[map]
static SCRATCH: PerCpuArray<StackBuf> = PerCpuArray::with_max_entries(1, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);
/// The top of the user stack of each loop thread's latest non-idle wait,
/// for DWARF unwinding in user space.
///
/// Why a hash without preallocation, entries kept for the thread's life:
/// a preallocated map would pin `max_entries` × 32 KiB (128 MiB) whether or
/// not anything blocks; without preallocation memory follows the loop
/// threads that actually blocked (a few per process). An entry is reused
/// by every later wait of its thread rather than deleted at switch-in, so
/// the hot path never allocates (freed elements of a non-preallocated map
/// come back only after an RCU grace period, and a burst of waits on one
/// CPU would run its allocator cache dry); exit and exec delete it. A
/// per-CPU scratch could not hold it (per-CPU values stop at 32 KiB) and
/// is not needed: the copy is made straight into the map value.
#[map]
static USER_STACKS: HashMap<u32, UserStack> =
    HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC as u32);
/// One zeroed value, never written: the source of a new `USER_STACKS` entry
/// (an update copies a whole value from somewhere).
#[map]
static USER_STACK_ZERO: Array<UserStack> = Array::with_max_entries(1, 0);

/// Filled in by user space from the running kernel's BTF before load.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    task_pid: 0,
    task_tgid: 0,
    task_comm: 0,
    task_stack: 0,
    pt_regs_orig_ax: 0,
    pt_regs_ip: 0,
    pt_regs_sp: 0,
    pt_regs_di: 0,
    pt_regs_si: 0,
    pt_regs_dx: 0,
    pt_regs_size: 0,
    thread_size: 0,
    task_fsbase: 0,
    pt_regs_bp: 0,
    task_flags: 0,
};

/// Bytes of user stack copied per blocking wait, at most `MAX_USER_STACK`;
/// 0 keeps frame pointers only. Set by user space before load.
#[unsafe(no_mangle)]
static USER_STACK_SIZE: u32 = 0;

// ---- x86-64 syscall numbers and kernel constants ---------------------------

const NR_FUTEX: i64 = 202;
const NR_EPOLL_WAIT: i64 = 232;
const NR_EPOLL_PWAIT: i64 = 281;
const NR_IO_URING_ENTER: i64 = 426;
const NR_EPOLL_PWAIT2: i64 = 441;
const NR_FUTEX_WAIT: i64 = 455;

const FUTEX_CMD_MASK: u64 = !(128 | 256);
const FUTEX_WAIT: u64 = 0;
const FUTEX_WAIT_BITSET: u64 = 9;

const CLONE_THREAD: u64 = 0x0001_0000;
/// CPython 3.12+: a frame pushed by C code (a shim), not Python code.
const FRAME_OWNED_BY_CSTACK: u8 = 3;
const TASK_UNINTERRUPTIBLE: u64 = 2;
/// `task_struct.flags`: the task is exiting (set before sched_process_exit).
const PF_EXITING: u32 = 0x4;

// ---- small helpers ---------------------------------------------------------

#[inline(always)]
fn off() -> KernelOffsets {
    // SAFETY: a plain read of a global the loader froze before load; the
    // volatile read stops the compiler from folding the zero initialiser.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
fn kread<T: Copy + Default>(base: *const u8, offset: u32) -> T {
    // SAFETY: bpf_probe_read_kernel faults safely; a failed read gives the
    // default, which every caller treats as "unknown".
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T).unwrap_or_default() }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer while this program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn threshold_ns() -> u64 {
    CONFIG.get(0).map(|c| c.threshold_ns).unwrap_or(u64::MAX)
}

#[inline(always)]
fn tag_for(rule: &WatchRule, main_thread: bool) -> u8 {
    match rule.threads {
        THREADS_ALL => TAG_LOOP,
        THREADS_MAIN if main_thread => TAG_LOOP,
        THREADS_MAIN => 0,
        _ => TAG_CANDIDATE,
    }
}

#[inline(always)]
fn is_epoll_wait(nr: i64) -> bool {
    nr == NR_EPOLL_WAIT || nr == NR_EPOLL_PWAIT || nr == NR_EPOLL_PWAIT2
}

#[inline(always)]
fn is_futex_wait(nr: i64, op: u64) -> bool {
    (nr == NR_FUTEX && matches!(op & FUTEX_CMD_MASK, FUTEX_WAIT | FUTEX_WAIT_BITSET))
        || nr == NR_FUTEX_WAIT
}

/// How to find a task's user registers: the BTF helper where the program
/// type allows it, the top of the task's kernel stack otherwise.
#[derive(Clone, Copy)]
enum Regs {
    Btf,
    StackTop,
}

#[inline(always)]
fn user_regs(task: *const u8, how: Regs) -> *const u8 {
    match how {
        // SAFETY: `task` is the tracepoint's task_struct argument.
        Regs::Btf => unsafe { bpf_task_pt_regs(task as *mut _) as *const u8 },
        Regs::StackTop => {
            let o = off();
            let stack: u64 = kread(task, o.task_stack);
            if stack == 0 {
                return core::ptr::null();
            }
            (stack + o.thread_size as u64 - o.pt_regs_size as u64) as *const u8
        }
    }
}

// ---- sched_switch ----------------------------------------------------------

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    on_switch(&ctx, preempt & 1 != 0, prev_state, prev, next, Regs::Btf);
    0
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_raw(ctx: RawTracePointContext) -> i32 {
    let preempt: u64 = ctx.arg(0);
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    let prev_state: u64 = ctx.arg(3);
    on_switch(
        &ctx,
        preempt & 1 != 0,
        prev_state,
        prev,
        next,
        Regs::StackTop,
    );
    0
}

#[inline(always)]
fn on_switch<C: EbpfContext>(
    ctx: &C,
    preempt: bool,
    prev_state: u64,
    prev: *const u8,
    next: *const u8,
    how: Regs,
) {
    // `prev` is still `current` here, so its TID and user memory are ours.
    let prev_tid = bpf_get_current_pid_tgid() as u32;
    // An exiting thread was untagged by sched_process_exit, and its exit
    // releases its TID before its last switches: a new thread may already
    // hold the TID, and that thread's tag (its pending wait) is not the
    // exiting thread's to touch, switching out or in.
    let exiting = |task: *const u8| kread::<u32>(task, off().task_flags) & PF_EXITING != 0;
    if prev_tid != 0
        && !exiting(prev)
        && let Some(tag) = THREADS.get_ptr_mut(prev_tid)
    {
        // SAFETY: map value pointer, valid for this program run.
        switch_out(
            ctx,
            unsafe { &mut *tag },
            prev_tid,
            preempt,
            prev_state,
            prev,
            how,
        );
        // SAFETY: as above.
        stall::after_switch_out(unsafe { &*tag }, prev_tid);
    }
    let next_tid: u32 = kread(next, off().task_pid);
    if next_tid != 0
        && !exiting(next)
        && let Some(tag) = THREADS.get_ptr_mut(next_tid)
    {
        // SAFETY: as above.
        let tag = unsafe { &mut *tag };
        stall::before_switch_in(tag, next_tid);
        if tag.out_ns != 0 {
            switch_in(tag, next_tid, next);
        }
    }
}

#[inline(always)]
fn switch_out<C: EbpfContext>(
    ctx: &C,
    tag: &mut ThreadTag,
    tid: u32,
    preempt: bool,
    prev_state: u64,
    prev: *const u8,
    how: Regs,
) {
    let regs = user_regs(prev, how);
    if regs.is_null() {
        return;
    }
    let o = off();
    let nr: i64 = kread(regs, o.pt_regs_orig_ax);
    let arg0: u64 = kread(regs, o.pt_regs_di);
    let voluntary = !preempt && prev_state & 0xff != 0;

    if voluntary {
        if is_epoll_wait(nr) {
            let epfd = arg0 as i32;
            if tag.loop_epfd < 0 {
                tag.loop_epfd = epfd;
            }
            if tag.loop_epfd == epfd {
                if tag.tag == TAG_CANDIDATE {
                    tag.tag = TAG_LOOP;
                    info!(ctx, "tid {} is an event loop (epoll fd {})", tid, epfd);
                }
                return;
            }
            // A wait on another epoll instance blocks this loop.
        } else if nr == NR_IO_URING_ENTER {
            return;
        } else {
            let op: u64 = kread(regs, o.pt_regs_si);
            if is_futex_wait(nr, op) {
                // SAFETY: map value read.
                if let Some(park) = unsafe { PARKS.get(tid) }
                    && *park == arg0
                {
                    if tag.tag == TAG_CANDIDATE {
                        tag.tag = TAG_LOOP;
                        info!(ctx, "tid {} is an event loop (parks on futex)", tid);
                    }
                    return;
                }
                // Not deduplicated by address: with parking_lot, a thread's
                // locks and its park share one futex, so a first probe
                // that caught a lock must not stop the park being learned.
                if tag.probe_budget > 0 {
                    tag.probe_budget -= 1;
                    send_probe(tid, tag.tgid, arg0, regs);
                }
            }
        }
    }
    if tag.tag != TAG_LOOP {
        return;
    }
    // Everything else blocks the loop, poll/select included: on a loop
    // thread they are a socket waited on with a timeout (CPython's sockets
    // do this), never the loop's own wait.
    // SAFETY: no preconditions.
    tag.out_ns = unsafe { bpf_ktime_get_ns() };
    tag.syscall = nr;
    tag.args = [arg0, kread(regs, o.pt_regs_si), kread(regs, o.pt_regs_dx)];
    tag.off_state = if !voluntary {
        STATE_PREEMPTED
    } else if prev_state & TASK_UNINTERRUPTIBLE != 0 {
        STATE_DISK
    } else {
        STATE_SLEEPING
    };
    capture_stack(ctx, tag, tid, prev);
    copy_user_stack(tag, tid, regs);
}

/// Pages of user stack read by one helper call; a read that would cross the
/// end of the stack mapping fails whole, so the copy goes page by page.
const PAGE: usize = 4096;

/// Copies the top of the user stack and the registers DWARF unwinding
/// starts from into the thread's `USER_STACKS` entry.
#[inline(always)]
fn copy_user_stack(tag: &ThreadTag, tid: u32, regs: *const u8) {
    // SAFETY: a plain read of a global frozen before load.
    let want = unsafe { core::ptr::read_volatile(&USER_STACK_SIZE) } as usize;
    if want == 0 {
        return;
    }
    let value = match USER_STACKS.get_ptr_mut(tid) {
        Some(v) => v,
        None => {
            let Some(zero) = USER_STACK_ZERO.get(0) else {
                count(COUNTER_LOST_USER_STACKS);
                return;
            };
            if USER_STACKS.insert(tid, zero, 0).is_err() {
                count(COUNTER_LOST_USER_STACKS);
                return;
            }
            match USER_STACKS.get_ptr_mut(tid) {
                Some(v) => v,
                None => {
                    count(COUNTER_LOST_USER_STACKS);
                    return;
                }
            }
        }
    };
    let o = off();
    let sp: u64 = kread(regs, o.pt_regs_sp);
    // SAFETY: map value pointer, valid for this run; only this thread's
    // switches touch its entry, and they are serialised by the scheduler.
    let v = unsafe { &mut *value };
    v.kind = KIND_USER_STACK;
    v.pid = tag.tgid;
    v.tid = tid;
    v.start_ns = tag.out_ns;
    v.ip = kread(regs, o.pt_regs_ip);
    v.sp = sp;
    v.bp = kread(regs, o.pt_regs_bp);
    v.len = 0;
    let pages = want.div_ceil(PAGE);
    // Bytes from sp to the end of its page: what is left to read when a
    // whole page from sp + k * PAGE runs past the end of the stack.
    let head = PAGE - (sp as usize & (PAGE - 1));
    let mut copied = 0usize;
    for k in 0..MAX_USER_STACK / PAGE {
        if k >= pages {
            break;
        }
        let at = k * PAGE;
        // SAFETY: at + PAGE <= MAX_USER_STACK, inside `bytes`.
        let dst = unsafe { v.bytes.as_mut_ptr().add(at) };
        if read_user(dst, PAGE, sp + at as u64) {
            copied = at + PAGE;
            continue;
        }
        if head < PAGE && read_user(dst, head, sp + at as u64) {
            copied = at + head;
        }
        break;
    }
    v.len = copied.min(want) as u32;
    if copied == 0 {
        count(COUNTER_LOST_USER_STACKS);
    }
}

/// Sends the user stack copied at the start of the wait that began at
/// `start`, just before its event. Counted when it cannot be sent.
#[inline(always)]
fn send_user_stack(tid: u32, start: u64) {
    // SAFETY: no preconditions.
    if unsafe { core::ptr::read_volatile(&USER_STACK_SIZE) } == 0 {
        return;
    }
    // No entry, or one from an earlier wait: the copy failed at
    // switch-out, where it was counted.
    let Some(value) = USER_STACKS.get_ptr(tid) else {
        return;
    };
    // SAFETY: map value pointer, valid for this run.
    let v = unsafe { &*value };
    if v.start_ns != start {
        return;
    }
    let len = v.len as usize;
    if len > MAX_USER_STACK {
        return;
    }
    // SAFETY: the first USER_STACK_HEADER + len bytes of the value, which
    // is USER_STACK_HEADER + MAX_USER_STACK long.
    let bytes = unsafe { core::slice::from_raw_parts(value as *const u8, USER_STACK_HEADER + len) };
    if EVENTS.output::<[u8]>(bytes, 0).is_err() {
        count(COUNTER_LOST_USER_STACKS);
    }
}

#[inline(always)]
fn capture_stack<C: EbpfContext>(ctx: &C, tag: &mut ThreadTag, tid: u32, task: *const u8) {
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch, exclusively ours during this run.
    let buf = unsafe { &mut *buf };
    // SAFETY: the destination is MAX_FRAMES u64s long.
    let n = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            buf.ips.as_mut_ptr() as *mut _,
            (MAX_FRAMES * 8) as u32,
            BPF_F_USER_STACK as u64,
        )
    };
    buf.len = if n > 0 { n as u64 } else { 0 };
    walk_python(tag, task, buf);
    if STACKS.insert(tid, &*buf, 0).is_err() {
        count(COUNTER_LOST_STACKS);
    }
}

#[inline(always)]
fn uread<T: Copy + Default>(addr: u64) -> T {
    let mut v = T::default();
    // SAFETY: the helper writes at most size_of::<T>() bytes into `v` and
    // zeroes it on a fault. Its result is ignored on purpose: a branch per
    // read would multiply the verifier's paths through the frame walk.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            &mut v as *mut T as *mut _,
            core::mem::size_of::<T>() as u32,
            addr as *const _,
        )
    };
    v
}

/// The CPython frames of `task` (`current`) into `buf.py`, when its
/// process runs an interpreter the kernel was told about.
#[inline(always)]
fn walk_python(tag: &mut ThreadTag, task: *const u8, buf: &mut StackBuf) {
    buf.py_len = 0;
    // SAFETY: map value read, copied out at once.
    if let Some(py) = unsafe { PYPROCS.get(tag.tgid) }.copied() {
        let fsbase: u64 = kread(task, off().task_fsbase);
        buf.py_len = py_walk(tag, &py, fsbase, buf) as u64;
    }
}

/// Walks the blocked thread's CPython frames (it is `current`, so its
/// memory is readable) into `buf.py`; returns how many were found.
#[inline(always)]
fn py_walk(tag: &mut ThreadTag, py: &PyProc, fsbase: u64, buf: &mut StackBuf) -> usize {
    let o = &py.offsets;
    // The thread's PyThreadState is found once by its pthread_t and then
    // only re-checked: a thread keeps its tstate for life.
    let mut ts = tag.py_tstate;
    if ts != 0 && uread::<u64>(ts + o.tstate_thread_id as u64) != fsbase {
        ts = 0;
    }
    if ts == 0 {
        let interp: u64 = uread(py.runtime + o.runtime_interpreters_head as u64);
        if interp == 0 {
            return 0;
        }
        let mut cur: u64 = uread(interp + o.interp_threads_head as u64);
        for _ in 0..64 {
            if cur == 0 {
                break;
            }
            if uread::<u64>(cur + o.tstate_thread_id as u64) == fsbase {
                ts = cur;
                break;
            }
            cur = uread(cur + o.tstate_next as u64);
        }
        if ts == 0 {
            return 0;
        }
        tag.py_tstate = ts;
    }
    let mut frame: u64 = uread(ts + o.tstate_frame as u64);
    if o.cframe_current_frame != u32::MAX && frame != 0 {
        frame = uread(frame + o.cframe_current_frame as u64);
    }
    // One slot per frame, shims included (as code 0, skipped by user
    // space): a count that diverged per path would defeat state pruning.
    let mut n = 0usize;
    for slot in buf.py.iter_mut() {
        if frame == 0 {
            break;
        }
        let shim = o.frame_owner != u32::MAX
            && uread::<u8>(frame + o.frame_owner as u64) == FRAME_OWNED_BY_CSTACK;
        let code: u64 = uread(frame + o.frame_code as u64);
        let instr: u64 = if o.frame_instr_size == 4 {
            uread::<u32>(frame + o.frame_instr as u64) as u64
        } else {
            uread(frame + o.frame_instr as u64)
        };
        *slot = PyFrameRef {
            code: if shim { 0 } else { code },
            instr,
        };
        n += 1;
        frame = uread(frame + o.frame_previous as u64);
    }
    n
}

#[inline(always)]
fn switch_in(tag: &mut ThreadTag, tid: u32, next: *const u8) {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let start = tag.out_ns;
    tag.out_ns = 0;
    let duration = now.saturating_sub(start);
    if duration < threshold_ns() {
        return;
    }
    send_user_stack(tid, start);
    let Some(mut entry) = EVENTS.reserve::<BlockEvent>(0) else {
        count(COUNTER_LOST_EVENTS);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, exclusively owned record; every
    // field is written before submit.
    unsafe {
        (*ev).kind = KIND_BLOCK;
        (*ev).pid = tag.tgid;
        (*ev).tid = tid;
        (*ev).state = tag.off_state;
        (*ev)._pad = [0; 3];
        (*ev).syscall = tag.syscall;
        (*ev).args = tag.args;
        (*ev).start_ns = start;
        (*ev).duration_ns = duration;
        (*ev).comm = kread(next, off().task_comm);
        (*ev).frames = 0;
        (*ev).py_frames = 0;
        if let Some(stack) = STACKS.get_ptr(tid) {
            let len = (*stack).len;
            if len > 0 && len <= (MAX_FRAMES * 8) as u64 {
                (*ev).frames = (len / 8) as u32;
                (*ev).ips = (*stack).ips;
            }
            let py = (*stack).py_len;
            if py > 0 && py <= MAX_PY_FRAMES as u64 {
                (*ev).py_frames = py as u32;
                (*ev).py = (*stack).py;
            }
        }
    }
    entry.submit(0);
    count(COUNTER_EVENTS);
}

#[inline(always)]
fn send_probe(tid: u32, tgid: u32, uaddr: u64, regs: *const u8) {
    let Some(mut entry) = EVENTS.reserve::<ProbeEvent>(0) else {
        count(COUNTER_LOST_PROBES);
        return;
    };
    let o = off();
    let ev = entry.as_mut_ptr();
    // SAFETY: reserved record, written in full before submit.
    unsafe {
        (*ev).kind = KIND_PROBE;
        (*ev).pid = tgid;
        (*ev).tid = tid;
        (*ev)._pad = 0;
        (*ev).uaddr = uaddr;
        (*ev).ip = kread(regs, o.pt_regs_ip);
        let sp: u64 = kread(regs, o.pt_regs_sp);
        (*ev).sp = sp;
        let dst = (*ev).stack.as_mut_ptr();
        // The top of a shallow stack may lie within 512 bytes of its end:
        // retry with less rather than lose the probe.
        (*ev).stack_len = if read_user(dst, PROBE_STACK_BYTES, sp) {
            PROBE_STACK_BYTES as u64
        } else if read_user(dst, 128, sp) {
            128
        } else {
            0
        };
    }
    entry.submit(0);
}

#[inline(always)]
fn read_user(dst: *mut u8, len: usize, src: u64) -> bool {
    // SAFETY: `dst` holds at least `len` bytes; the helper faults safely.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            dst as *mut _,
            len as u32,
            src as *const _,
        ) == 0
    }
}

// ---- task lifecycle --------------------------------------------------------

#[btf_tracepoint(function = "task_newtask")]
pub fn task_newtask(ctx: BtfTracePointContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    let clone_flags: u64 = ctx.arg(1);
    on_newtask(task, clone_flags);
    0
}

#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask_raw(ctx: RawTracePointContext) -> i32 {
    let task: *const u8 = ctx.arg(0);
    let clone_flags: u64 = ctx.arg(1);
    on_newtask(task, clone_flags);
    0
}

#[inline(always)]
fn on_newtask(task: *const u8, clone_flags: u64) {
    // Runs in the parent, before the child is first scheduled.
    let parent_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let child: u32 = kread(task, off().task_pid);
    if child == 0 {
        return;
    }
    // SAFETY: map value read, copied out at once.
    let rule = unsafe { WATCHED.get(parent_tgid) }.copied();
    let is_thread = clone_flags & CLONE_THREAD != 0;
    let (tgid, rule) = match rule {
        Some(rule) if is_thread => (parent_tgid, Some(rule)),
        Some(rule) if rule.follow_children != 0 => {
            if WATCHED.insert(child, rule, 0).is_err() {
                count(COUNTER_LOST_TAGS);
            }
            (child, Some(rule))
        }
        _ => {
            if !is_thread {
                // A recycled PID must not inherit an old process's watch.
                let _ = WATCHED.remove(child);
            }
            (0, None)
        }
    };
    let _ = PARKS.remove(child);
    stall::forget(child);
    match rule.map(|r| tag_for(&r, !is_thread)) {
        Some(t) if t != 0 => {
            if THREADS.insert(child, ThreadTag::new(tgid, t), 0).is_err() {
                count(COUNTER_LOST_TAGS);
            }
        }
        _ => {
            let _ = THREADS.remove(child);
        }
    }
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    let old_pid: u32 = ctx.arg(1);
    on_exec(old_pid);
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec_raw(ctx: RawTracePointContext) -> i32 {
    let old_pid: u32 = ctx.arg(1);
    on_exec(old_pid);
    0
}

#[inline(always)]
fn on_exec(old_pid: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // A new program: what was learned about the old one no longer holds.
    if old_pid != tgid {
        let _ = THREADS.remove(old_pid);
        let _ = STACKS.remove(old_pid);
        let _ = USER_STACKS.remove(old_pid);
    }
    let _ = USER_STACKS.remove(tgid);
    let _ = PARKS.remove(tgid);
    stall::forget(tgid);
    stall::forget(old_pid);
    let _ = PYPROCS.remove(tgid);
    // SAFETY: map value read, copied out at once.
    let rule = unsafe { WATCHED.get(tgid) }.copied();
    if let Some(rule) = rule {
        let t = tag_for(&rule, true);
        if t != 0 {
            let _ = THREADS.insert(tgid, ThreadTag::new(tgid, t), 0);
        } else {
            let _ = THREADS.remove(tgid);
        }
    }
    let notify_all = CONFIG
        .get(0)
        .map(|c| c.notify_all_execs != 0)
        .unwrap_or(false);
    if rule.is_some() || notify_all {
        send_task_event(KIND_EXEC, tgid, old_pid, 0);
    }
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    let group_dead: u64 = ctx.arg(1);
    on_exit(group_dead & 1 != 0);
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit_raw(ctx: RawTracePointContext) -> i32 {
    let group_dead: u64 = ctx.arg(1);
    on_exit(group_dead & 1 != 0);
    0
}

#[inline(always)]
fn on_exit(group_dead: bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tid = pid_tgid as u32;
    let tgid = (pid_tgid >> 32) as u32;
    let was_tagged = THREADS.remove(tid).is_ok();
    stall::forget(tid);
    if was_tagged {
        let _ = STACKS.remove(tid);
        let _ = PARKS.remove(tid);
    }
    // Whether or not it is still tagged (user space may have untagged it):
    // a copy is 32 KiB that would otherwise stay until the TID is reused.
    let _ = USER_STACKS.remove(tid);
    if group_dead {
        let _ = PYPROCS.remove(tgid);
    }
    let watched = group_dead && WATCHED.remove(tgid).is_ok();
    if was_tagged || watched {
        send_task_event(KIND_EXIT, tgid, tid, watched as u32);
    }
}

#[inline(always)]
fn send_task_event(kind: u32, pid: u32, tid: u32, aux: u32) {
    let Some(mut entry) = EVENTS.reserve::<TaskEvent>(0) else {
        count(COUNTER_LOST_EVENTS);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: reserved record, written in full before submit.
    unsafe {
        (*ev).kind = kind;
        (*ev).pid = pid;
        (*ev).tid = tid;
        (*ev).aux = aux;
        (*ev).comm = aya_ebpf::helpers::bpf_get_current_comm().unwrap_or_default();
    }
    entry.submit(0);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
