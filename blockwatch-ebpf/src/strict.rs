//! Strict syscall mode (`--strict`): every blocking-class syscall of a loop
//! thread counts, even one that never leaves the CPU (an `open()` served
//! from the page cache, a `stat`).
//!
//! Attached only on request: a program on `raw_syscalls:sys_enter`/
//! `sys_exit` puts every task on the host on the slow syscall path (about
//! 250 ns per syscall, measured; see ARCHITECTURE.md). The filter is the
//! same as the off-CPU detector's: one `THREADS` lookup, loop threads only.
//! Which syscalls count is a bitmap user space fills
//! (`LoopConfig::strict_nrs`); the runtimes' idle waits are never in it. A
//! call whose wait became an off-CPU event (a `Block` record) is not sent
//! again (`StrictCall::offcpu`).

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_ktime_get_ns, generated::bpf_get_current_task},
};
use blockwatch_common::{Counter, RecordKind, StrictCall, TAG_LOOP};

use crate::{
    episode::{self, begin, existing_state, state},
    idle,
    maps::{BPF_NOEXIST, STRICT_CALLS, STRICT_SCRATCH, THREADS, count, loop_config, off, thread},
    python,
    read::kread,
    record::{self, LoopFacts},
};

/// `sys_enter` of the current thread: syscall `nr`, user registers at
/// `regs`. The idle wait ends a busy period; a strict call is timed.
#[inline(always)]
pub(crate) fn on_enter(regs: *const u8, nr: i64) {
    let tid = crate::ids::current_tid();
    // SAFETY: map value read, copied out at once.
    let Some(tag) = (unsafe { THREADS.get(tid) }).copied() else {
        return;
    };
    if tag.tag != TAG_LOOP {
        return;
    }
    // Index 0 of an array always exists: this cannot fail.
    let Some(cfg) = loop_config() else {
        return;
    };
    let o = off();
    let arg0: u64 = kread(regs, o.pt_regs_di);
    // The loop's own idle wait ends its episode (episode.rs), whether or
    // not it then sleeps.
    if idle::classify(&tag, tid, nr, arg0, regs).is_idle() {
        // SAFETY: no preconditions; the task is only read through
        // bpf_probe_read_kernel.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        // SAFETY: no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        episode::idle_reached(&tag, tid, task, now);
        if let Some(st) = state(tid) {
            st.in_idle = 1;
        }
        return;
    }
    if !cfg.counts_strict(nr) {
        return;
    }
    // No state: counted (LostLoopState) by `call_state`.
    let Some(call) = call_state(tid) else {
        return;
    };
    // SAFETY: no preconditions.
    call.enter_ns = unsafe { bpf_ktime_get_ns() };
    call.nr = nr;
    call.args = [arg0, kread(regs, o.pt_regs_si), kread(regs, o.pt_regs_dx)];
    call.offcpu = 0;
}

/// The thread's pending-call slot, created on first use; counted when the
/// map is full.
#[inline(always)]
fn call_state(tid: u32) -> Option<&'static mut StrictCall> {
    if STRICT_CALLS.get_ptr_mut(tid).is_none()
        && STRICT_CALLS
            .insert(tid, StrictCall::default(), BPF_NOEXIST)
            .is_err()
    {
        count(Counter::LostLoopState);
        return None;
    }
    // SAFETY: map value pointer, valid for this program run; only the
    // thread's own programs touch its entry.
    STRICT_CALLS.get_ptr_mut(tid).map(|c| unsafe { &mut *c })
}

/// The thread's pending strict call, if it ever made one.
#[inline(always)]
pub(crate) fn pending_call(tid: u32) -> Option<&'static mut StrictCall> {
    // SAFETY: as in `call_state`.
    STRICT_CALLS.get_ptr_mut(tid).map(|c| unsafe { &mut *c })
}

/// A TID that exited or was reused: its pending call must not carry over.
#[inline(always)]
pub(crate) fn forget(tid: u32) {
    // Absent is fine: most threads never made a strict call.
    let _ = STRICT_CALLS.remove(tid);
}

/// `sys_exit` of the current thread: back from its idle wait, or the end
/// of a strict call, which is sent unless its wait was already an event.
#[inline(always)]
pub(crate) fn on_exit<C: EbpfContext>(ctx: &C) {
    let tid = crate::ids::current_tid();
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(st) = existing_state(tid)
        && st.in_idle != 0
    {
        // Back from the idle wait, slept or not: an episode begins.
        st.in_idle = 0;
        begin(st, now);
        if st.in_ns == 0 {
            st.in_ns = now;
        }
        return;
    }
    let Some(pending) = pending_call(tid) else {
        return;
    };
    if let Some(mut call) = end_call(pending, tid, now) {
        send_call(ctx, &mut call);
    }
}

/// Ends the pending strict call of `tid`; what to send about it, if
/// anything (none pending, or its wait was an off-CPU event). Its `pid`
/// comes from the thread's tag, in `send_call`.
#[inline(always)]
fn end_call(st: &mut StrictCall, tid: u32, now: u64) -> Option<LoopFacts> {
    let enter = st.enter_ns;
    if enter == 0 {
        return None;
    }
    st.enter_ns = 0;
    if st.offcpu != 0 {
        return None;
    }
    Some(LoopFacts {
        kind: RecordKind::Strict,
        pid: 0,
        tid,
        syscall: st.nr,
        args: st.args,
        start_ns: enter,
        duration_ns: now.saturating_sub(enter),
        busy_ns: 0,
    })
}

/// Counts a strict call of a loop thread and sends it with its stacks.
#[inline(always)]
fn send_call<C: EbpfContext>(ctx: &C, call: &mut LoopFacts) {
    let Some(tag) = thread(call.tid) else {
        return;
    };
    if tag.tag != TAG_LOOP {
        return;
    }
    count(Counter::StrictCalls);
    // Index 0 of a per-CPU array always exists: this cannot fail.
    let Some(py) = python::current_frames(&STRICT_SCRATCH, tag) else {
        return;
    };
    call.pid = tag.tgid;
    // Counted as lost by `send_loop_with_stacks` when the buffer is full.
    let _ = record::send_loop_with_stacks(ctx, call, py);
}
