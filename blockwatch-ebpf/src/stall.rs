//! Loop stalls: a loop thread that stays on the CPU too long between two
//! visits to its idle wait is stalled by CPU work (a slow callback).
//!
//! `sched_switch` (switch.rs) calls in here for tagged loop threads: a
//! busy period starts when the thread comes back from its idle wait and
//! ends when it enters it again; its on-CPU time is summed over the
//! switch-ins and switch-outs in between (time spent blocked or preempted
//! is the off-CPU detector's business, not counted here). A busy period
//! whose on-CPU time reaches `LoopConfig::stall_ns` is sent as a `Stall`
//! record when it ends. A per-CPU cpu-clock perf event samples the user
//! stack (and CPython frames) of busy loop threads (`Sample` records),
//! which user space joins with the stall by (TID, busy start).
//!
//! With `--strict`, the syscall tracepoints see the idle wait's entry and
//! exit too (strict.rs), so a wait that returns at once (work was ready)
//! also ends a busy period; without them only a wait that sleeps does.

use aya_ebpf::{EbpfContext, helpers::bpf_ktime_get_ns};
use blockwatch_common::{Counter, LoopState, RecordKind, TAG_LOOP, ThreadTag};

use crate::{
    maps::{
        BPF_NOEXIST, LOOPSTATE, SAMPLE_SCRATCH, count, loop_config, stall_ns, thread, threshold_ns,
    },
    python,
    record::{self, LoopFacts},
};

/// The thread's state, created on first use; counted when the map is full.
#[inline(always)]
pub(crate) fn state(tid: u32) -> Option<&'static mut LoopState> {
    if let Some(s) = existing_state(tid) {
        return Some(s);
    }
    if LOOPSTATE
        .insert(tid, LoopState::default(), BPF_NOEXIST)
        .is_err()
    {
        count(Counter::LostLoopState);
        return None;
    }
    existing_state(tid)
}

/// The thread's state if it has one.
#[inline(always)]
pub(crate) fn existing_state(tid: u32) -> Option<&'static mut LoopState> {
    // SAFETY: map value pointer, valid for this program run; only the
    // thread's own programs touch its entry.
    LOOPSTATE.get_ptr_mut(tid).map(|s| unsafe { &mut *s })
}

/// A TID that exited or was reused: its state must not carry over.
#[inline(always)]
pub(crate) fn forget(tid: u32) {
    // Absent is fine: most threads never had any.
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
        let stall = LoopFacts {
            kind: RecordKind::Stall,
            pid: tgid,
            tid,
            syscall: -1,
            args: [0; 3],
            start_ns: st.busy_start_ns,
            duration_ns: st.run_ns,
            busy_ns: now.saturating_sub(st.busy_start_ns),
        };
        if record::send_loop(&stall) {
            count(Counter::Stalls);
        }
    }
    st.busy_start_ns = 0;
    st.in_ns = 0;
    st.run_ns = 0;
}

/// Back from the idle wait: a busy period begins, if none is running.
#[inline(always)]
pub(crate) fn busy_from(st: &mut LoopState, now: u64) {
    if st.busy_start_ns == 0 {
        st.busy_start_ns = now;
        st.run_ns = 0;
    }
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
    // No state: counted (LostLoopState) by `state`.
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
        && now.saturating_sub(tag.out_ns) >= threshold_ns()
        && let Some(call) = crate::strict::pending_call(tid)
    {
        call.offcpu = 1;
    }
    if stall_ns() == 0 {
        return;
    }
    // No state: counted (LostLoopState) by `state`.
    let Some(st) = state(tid) else {
        return;
    };
    busy_from(st, now);
    st.in_ns = now;
}

/// The cpu-clock perf event: samples the user stack of a busy loop thread
/// once its busy period is old enough to become a stall.
#[inline(always)]
pub(crate) fn on_sample<C: EbpfContext>(ctx: &C) {
    let tid = crate::ids::current_tid();
    if tid == 0 {
        return;
    }
    let Some(tag) = thread(tid) else {
        return;
    };
    if tag.tag != TAG_LOOP {
        return;
    }
    // SAFETY: map value read, copied out at once.
    let Some(st) = (unsafe { LOOPSTATE.get(tid) }).copied() else {
        return;
    };
    if st.busy_start_ns == 0 || st.in_ns == 0 {
        return;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let after = loop_config().map(|c| c.sample_after_ns).unwrap_or(0);
    if now.saturating_sub(st.busy_start_ns) < after {
        return;
    }
    // Index 0 of a per-CPU array always exists: this cannot fail.
    let Some(py) = python::current_frames(&SAMPLE_SCRATCH, tag) else {
        return;
    };
    let sample = LoopFacts {
        kind: RecordKind::Sample,
        pid: tag.tgid,
        tid,
        syscall: -1,
        args: [0; 3],
        start_ns: st.busy_start_ns,
        duration_ns: st.run_ns + now.saturating_sub(st.in_ns),
        busy_ns: now.saturating_sub(st.busy_start_ns),
    };
    if record::send_loop_with_stacks(ctx, &sample, py) {
        count(Counter::Samples);
    }
}
