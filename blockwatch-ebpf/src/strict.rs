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
//! call whose wait became an off-CPU event (a `Block` record) is not counted
//! again (`StrictCall::offcpu`, set at its switch-in). A preemption on the
//! way back to user space comes after `sys_exit`: that call is counted, and
//! its wait, if long enough, is an off-CPU event as well.
//!
//! Counting is exact and needs no ring-buffer space: each call adds to its
//! call site's entry in `STRICT_COUNTS` (key: thread, syscall, site hash;
//! see `StrictKey`). Only a site's first call sends records: the copy of
//! the top of the user stack (`USER_STACKS`, under the thread's
//! `STRICT_COPY_KEY` key, for DWARF unwinding as off-CPU waits are) and a
//! `Strict` record with the frame-pointer and CPython stacks. When the ring
//! buffer has no room the site stays unsent and its next call tries again.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_ktime_get_ns, generated::bpf_get_current_task},
    programs::RawTracePointContext,
};
use blockwatch_common::{
    Counter, RecordKind, STRICT_COPY_KEY, StackBuf, StrictCall, StrictKey, StrictTally, TAG_LOOP,
};

use crate::{
    episode::{self, begin, existing_state, state},
    idle,
    maps::{
        BPF_NOEXIST, STRICT_CALLS, STRICT_COUNTS, STRICT_SCRATCH, USER_STACKS, count, loop_config,
        off, thread, user_stack_size,
    },
    python,
    read::kread,
    record::{self, LoopFacts},
    stack,
};

/// `sys_enter` of the current thread: syscall `nr`, user registers at
/// `regs`. The idle wait ends an episode; a strict call is timed.
#[inline(always)]
pub(crate) fn on_enter(regs: *const u8, nr: i64) {
    let tid = crate::ids::current_tid();
    let Some(mut tag) = thread(tid).map(|t| *t) else {
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
        episode::idle_reached(&mut tag, tid, task, now);
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

/// A TID that exited or was reused: its pending call and its strict stack
/// copy must not carry over. (Its `STRICT_COUNTS` entries are user space's
/// to read, then delete.)
#[inline(always)]
pub(crate) fn forget(tid: u32) {
    // Absent is fine: most threads never made a strict call.
    let _ = STRICT_CALLS.remove(tid);
    let _ = USER_STACKS.remove(tid | STRICT_COPY_KEY);
}

/// `sys_exit` of the current thread (`sys_exit(pt_regs *regs, long ret)`):
/// back from its idle wait, or the end of a strict call, which is counted
/// unless its wait was already an event.
#[inline(always)]
pub(crate) fn on_exit(ctx: &RawTracePointContext) {
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
        count_call(ctx, &mut call, ctx.arg(0));
    }
}

/// Ends the pending strict call of `tid`; what to count of it, if
/// anything (none pending, or its wait was an off-CPU event). Its `pid`
/// comes from the thread's tag, in `count_call`.
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

/// Counts a strict call of a loop thread (user registers at `regs`) under
/// its call site; the site's first call also sends its stacks.
#[inline(always)]
fn count_call<C: EbpfContext>(ctx: &C, call: &mut LoopFacts, regs: *const u8) {
    let Some(tag) = thread(call.tid) else {
        return;
    };
    if tag.tag != TAG_LOOP {
        return;
    }
    count(Counter::StrictCalls);
    // Index 0 of a per-CPU array always exists: this cannot fail.
    let Some(buf) = python::current_frames(&STRICT_SCRATCH, tag) else {
        return;
    };
    call.pid = tag.tgid;
    let key = StrictKey {
        tgid: tag.tgid,
        tid: call.tid,
        nr: call.syscall as u32,
        _pad: 0,
        site: stack::site_hash(regs, buf),
    };
    let Some(tally) = tally(&key) else {
        count(Counter::LostStrictSites);
        return;
    };
    tally.calls += 1;
    tally.total_ns += call.duration_ns;
    if call.duration_ns > tally.max_ns {
        tally.max_ns = call.duration_ns;
    }
    if tally.sent == 0 && send_site(ctx, call, key.site, buf, regs) {
        tally.sent = 1;
    }
}

/// The site's entry in `STRICT_COUNTS`, created at its first call; None
/// when the map is full.
#[inline(always)]
fn tally(key: &StrictKey) -> Option<&'static mut StrictTally> {
    if STRICT_COUNTS.get_ptr_mut(key).is_none() {
        // Fails when full, or (impossible: only this thread makes its
        // keys) when the key exists; either way the lookup below says.
        let _ = STRICT_COUNTS.insert(key, StrictTally::default(), BPF_NOEXIST);
    }
    // SAFETY: map value pointer, valid for this program run; only the
    // thread itself updates its keys, and its syscalls are serialised.
    STRICT_COUNTS.get_ptr_mut(key).map(|t| unsafe { &mut *t })
}

/// Sends a site's first call: the copy of the top of the user stack, then
/// the `Strict` record with the frame-pointer and CPython stacks (the copy
/// first, so that user space has it when the record comes). Whether the
/// record was sent.
#[inline(always)]
fn send_site<C: EbpfContext>(
    ctx: &C,
    call: &LoopFacts,
    site: u64,
    buf: &mut StackBuf,
    regs: *const u8,
) -> bool {
    buf.len = stack::user_ips(ctx, &mut buf.ips) as u64 * 8;
    let size = user_stack_size();
    if size != 0 {
        let key = call.tid | STRICT_COPY_KEY;
        stack::copy_user_stack_at(key, call.pid, call.tid, call.start_ns, size, regs);
        record::send_user_stack_at(key, call.start_ns);
    }
    record::send_strict(call, site, buf)
}
