//! Strict syscall mode (`--strict`): every blocking-class syscall of a loop
//! thread counts, even one that never leaves the CPU (an `open()` served
//! from the page cache, a `stat`).
//!
//! Attached only on request: a program on `raw_syscalls:sys_enter`/
//! `sys_exit` puts every task on the host on the slow syscall path (about
//! 250 ns per syscall, measured; see DESIGN.md). The filter is the same as
//! the off-CPU detector's: one `THREADS` lookup, loop threads only. Which
//! syscalls count is a bitmap user space fills (`LoopConfig::strict_nrs`);
//! the runtimes' idle waits are never in it. A call whose wait became an
//! off-CPU event (`KIND_BLOCK`) is not sent again (`strict_offcpu`, set by
//! sched_switch).

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_USER_STACK,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_stack, bpf_ktime_get_ns,
        generated::bpf_get_current_task,
    },
    macros::{map, raw_tracepoint},
    maps::PerCpuArray,
    programs::RawTracePointContext,
};
use blockwatch_common::*;

use crate::stall::{LOOPSTATE, config, idle_reached, loop_count, state};
use crate::{
    EVENTS, NR_IO_URING_ENTER, PARKS, THREADS, is_epoll_wait, is_futex_wait, kread, off,
    walk_python,
};

#[map]
static STRICT_SCRATCH: PerCpuArray<StackBuf> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn strict_nr(cfg: &LoopConfig, nr: i64) -> bool {
    if !(0..STRICT_MAX_NR as i64).contains(&nr) {
        return false;
    }
    let nr = nr as usize;
    match cfg.strict_nrs.get(nr / 64) {
        Some(w) => w & (1u64 << (nr % 64)) != 0,
        None => false,
    }
}

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn strict_enter(ctx: RawTracePointContext) -> i32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    // SAFETY: map value read, copied out at once.
    let Some(tag) = (unsafe { THREADS.get(tid) }).copied() else {
        return 0;
    };
    if tag.tag != TAG_LOOP {
        return 0;
    }
    let Some(cfg) = config() else {
        return 0;
    };
    let regs: *const u8 = ctx.arg(0);
    let nr: i64 = ctx.arg(1);
    let o = off();
    let arg0: u64 = kread(regs, o.pt_regs_di);
    // The loop's own idle wait ends a busy period (stall.rs), whether or
    // not it then sleeps.
    let idle = (is_epoll_wait(nr) && tag.loop_epfd >= 0 && arg0 as i32 == tag.loop_epfd)
        || nr == NR_IO_URING_ENTER
        || (is_futex_wait(nr, kread(regs, o.pt_regs_si))
            // SAFETY: map value read.
            && unsafe { PARKS.get(tid) }.is_some_and(|p| *p == arg0));
    if idle {
        if cfg.stall_ns != 0
            && let Some(st) = state(tid)
        {
            // SAFETY: no preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            idle_reached(st, tid, tag.tgid, now);
            st.in_idle = 1;
        }
        return 0;
    }
    if !strict_nr(cfg, nr) {
        return 0;
    }
    let Some(st) = state(tid) else {
        return 0;
    };
    // SAFETY: no preconditions.
    st.strict_enter_ns = unsafe { bpf_ktime_get_ns() };
    st.strict_nr = nr;
    st.strict_args = [arg0, kread(regs, o.pt_regs_si), kread(regs, o.pt_regs_dx)];
    st.strict_offcpu = 0;
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn strict_exit(ctx: RawTracePointContext) -> i32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let Some(st) = LOOPSTATE.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for this program run.
    let st = unsafe { &mut *st };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if st.in_idle != 0 {
        // Back from the idle wait, slept or not: the loop is busy again.
        st.in_idle = 0;
        if st.busy_start_ns == 0 {
            st.busy_start_ns = now;
            st.run_ns = 0;
        }
        if st.in_ns == 0 {
            st.in_ns = now;
        }
        return 0;
    }
    let enter = st.strict_enter_ns;
    if enter == 0 {
        return 0;
    }
    st.strict_enter_ns = 0;
    if st.strict_offcpu != 0 {
        return 0;
    }
    let nr = st.strict_nr;
    let args = st.strict_args;
    let Some(tag) = THREADS.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: map value pointer, valid for this program run.
    let tag = unsafe { &mut *tag };
    if tag.tag != TAG_LOOP {
        return 0;
    }
    loop_count(LOOP_COUNTER_STRICT);
    let Some(buf) = STRICT_SCRATCH.get_ptr_mut(0) else {
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
        (*ev).kind = KIND_STRICT;
        (*ev).pid = tag.tgid;
        (*ev).tid = tid;
        (*ev)._pad = 0;
        (*ev).syscall = nr;
        (*ev).args = args;
        (*ev).start_ns = enter;
        (*ev).duration_ns = now.saturating_sub(enter);
        (*ev).busy_ns = 0;
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
    0
}
