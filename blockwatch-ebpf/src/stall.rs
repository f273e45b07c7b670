//! Loop stalls: a loop thread that stays on the CPU too long between two
//! visits to its idle wait is stalled by CPU work (a slow callback).
//!
//! `sched_switch` (see `on_switch` in main.rs) calls in here for tagged
//! loop threads: a busy period starts when the thread comes back from its
//! idle wait and ends when it enters it again; its on-CPU time is summed
//! over the switch-ins and switch-outs in between (time spent blocked or
//! preempted is the off-CPU detector's business, not counted here). A busy
//! period whose on-CPU time reaches `LoopConfig::stall_ns` is sent as
//! `KIND_STALL` when it ends. A per-CPU cpu-clock perf event samples the
//! user stack (and CPython frames) of busy loop threads (`KIND_SAMPLE`),
//! which user space joins with the stall by (TID, busy start).
//!
//! With `--strict`, the syscall tracepoints see the idle wait's entry and
//! exit too (strict.rs), so a wait that returns at once (work was ready)
//! also ends a busy period; without them only a wait that sleeps does.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_stack, bpf_ktime_get_ns,
        generated::bpf_get_current_task,
    },
    macros::{map, perf_event},
    maps::{Array, HashMap, PerCpuArray},
    programs::PerfEventContext,
};
use blockwatch_common::*;

use crate::{EVENTS, THREADS, walk_python};

#[map]
pub(crate) static LOOP_CONFIG: Array<LoopConfig> = Array::with_max_entries(1, 0);
#[map]
pub(crate) static LOOPSTATE: HashMap<u32, LoopState> = HashMap::with_max_entries(16384, 0);
#[map]
pub(crate) static LOOP_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(NUM_LOOP_COUNTERS, 0);
/// Frame-walk scratch of the sampling program; its own, since it can
/// interrupt the other programs on the same CPU.
#[map]
static SAMPLE_SCRATCH: PerCpuArray<StackBuf> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub(crate) fn loop_count(index: u32) {
    if let Some(c) = LOOP_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer while this program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub(crate) fn config() -> Option<&'static LoopConfig> {
    LOOP_CONFIG.get(0)
}

#[inline(always)]
fn stall_ns() -> u64 {
    config().map(|c| c.stall_ns).unwrap_or(0)
}

/// The thread's state, created on first use.
#[inline(always)]
pub(crate) fn state(tid: u32) -> Option<&'static mut LoopState> {
    if let Some(s) = LOOPSTATE.get_ptr_mut(tid) {
        // SAFETY: map value pointer, valid for this program run.
        return Some(unsafe { &mut *s });
    }
    if LOOPSTATE
        .insert(tid, &LoopState::default(), BPF_NOEXIST_FLAG)
        .is_err()
    {
        loop_count(LOOP_COUNTER_LOST_STATE);
        return None;
    }
    // SAFETY: as above.
    LOOPSTATE.get_ptr_mut(tid).map(|s| unsafe { &mut *s })
}

const BPF_NOEXIST_FLAG: u64 = 1;

/// A TID that exited or was reused: its state must not carry over.
#[inline(always)]
pub(crate) fn forget(tid: u32) {
    let _ = LOOPSTATE.remove(tid);
}

/// Called with `current` = the thread that reaches its idle wait: ends the
/// busy period, and reports it when its on-CPU time made it a stall.
#[inline(always)]
pub(crate) fn idle_reached(st: &mut LoopState, tid: u32, tgid: u32, now: u64) {
    if st.busy_start_ns == 0 {
        return;
    }
    if st.in_ns != 0 {
        st.run_ns += now.saturating_sub(st.in_ns);
    }
    let limit = stall_ns();
    if limit != 0 && st.run_ns >= limit {
        send_stall(st, tid, tgid, now);
    }
    st.busy_start_ns = 0;
    st.in_ns = 0;
    st.run_ns = 0;
}

#[inline(always)]
fn send_stall(st: &LoopState, tid: u32, tgid: u32, now: u64) {
    let Some(mut entry) = EVENTS.reserve::<LoopEvent>(0) else {
        loop_count(LOOP_COUNTER_LOST);
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: reserved record, exclusively ours; every field is written
    // before submit (the stacks come with the samples).
    unsafe {
        (*ev).kind = KIND_STALL;
        (*ev).pid = tgid;
        (*ev).tid = tid;
        (*ev)._pad = 0;
        (*ev).syscall = -1;
        (*ev).args = [0; 3];
        (*ev).start_ns = st.busy_start_ns;
        (*ev).duration_ns = st.run_ns;
        (*ev).busy_ns = now.saturating_sub(st.busy_start_ns);
        (*ev).comm = bpf_get_current_comm().unwrap_or_default();
        // No stacks: they come with the samples (`ips` and `py` are
        // left unwritten and never read).
        (*ev).frames = 0;
        (*ev).py_frames = 0;
    }
    entry.submit(0);
    loop_count(LOOP_COUNTER_STALLS);
}

/// sched_switch, after the off-CPU detector handled `prev` (= `current`),
/// a loop thread. `tag.out_ns` tells what the switch was: 0 when the
/// thread went into its idle wait, the switch-out time otherwise.
#[inline(always)]
pub(crate) fn after_switch_out(tag: &ThreadTag, tid: u32) {
    if tag.tag != TAG_LOOP || stall_ns() == 0 {
        return;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(st) = state(tid) else {
        return;
    };
    if tag.out_ns == 0 {
        idle_reached(st, tid, tag.tgid, now);
    } else if st.in_ns != 0 {
        st.run_ns += now.saturating_sub(st.in_ns);
        st.in_ns = 0;
    }
}

/// sched_switch, before the off-CPU detector handles `next`, a loop thread
/// coming back to the CPU.
#[inline(always)]
pub(crate) fn before_switch_in(tag: &ThreadTag, tid: u32) {
    if tag.tag != TAG_LOOP {
        return;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // A strict syscall whose wait becomes an off-CPU event is counted
    // there, not twice.
    if tag.out_ns != 0
        && now.saturating_sub(tag.out_ns) >= crate::threshold_ns()
        && let Some(st) = LOOPSTATE.get_ptr_mut(tid)
    {
        // SAFETY: map value pointer, valid for this program run.
        unsafe { (*st).strict_offcpu = 1 };
    }
    if stall_ns() == 0 {
        return;
    }
    let Some(st) = state(tid) else {
        return;
    };
    if st.busy_start_ns == 0 {
        st.busy_start_ns = now;
        st.run_ns = 0;
    }
    st.in_ns = now;
}

/// Samples the user stack of a busy loop thread.
#[perf_event]
pub fn stall_sample(ctx: PerfEventContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    if tid == 0 {
        return 0;
    }
    let Some(tag) = THREADS.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for this program run.
    let tag = unsafe { &mut *tag };
    if tag.tag != TAG_LOOP {
        return 0;
    }
    // SAFETY: map value read, copied out at once.
    let Some(st) = (unsafe { LOOPSTATE.get(tid) }).copied() else {
        return 0;
    };
    if st.busy_start_ns == 0 || st.in_ns == 0 {
        return 0;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let after = config().map(|c| c.sample_after_ns).unwrap_or(0);
    if now.saturating_sub(st.busy_start_ns) < after {
        return 0;
    }
    let Some(buf) = SAMPLE_SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch, ours during this run.
    let buf = unsafe { &mut *buf };
    // SAFETY: no preconditions; the task is only read through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    walk_python(tag, task, buf);
    let Some(mut entry) = EVENTS.reserve::<LoopEvent>(0) else {
        loop_count(LOOP_COUNTER_LOST);
        return 0;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: reserved record, exclusively ours, written in full.
    unsafe {
        (*ev).kind = KIND_SAMPLE;
        (*ev).pid = tag.tgid;
        (*ev).tid = tid;
        (*ev)._pad = 0;
        (*ev).syscall = -1;
        (*ev).args = [0; 3];
        (*ev).start_ns = st.busy_start_ns;
        (*ev).duration_ns = st.run_ns + now.saturating_sub(st.in_ns);
        (*ev).busy_ns = now.saturating_sub(st.busy_start_ns);
        (*ev).comm = bpf_get_current_comm().unwrap_or_default();
        let n = bpf_get_stack(
            ctx.as_ptr(),
            (*ev).ips.as_mut_ptr() as *mut _,
            (MAX_FRAMES * 8) as u32,
            BPF_F_USER_STACK as u64,
        );
        (*ev).frames = if n > 0 { (n / 8) as u32 } else { 0 };
        let py = buf.py_len;
        (*ev).py_frames = if py <= MAX_PY_FRAMES as u64 {
            py as u32
        } else {
            0
        };
        (*ev).py = buf.py;
    }
    entry.submit(0);
    loop_count(LOOP_COUNTER_SAMPLES);
    0
}
