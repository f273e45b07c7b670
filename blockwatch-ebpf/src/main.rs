//! blockwatch's kernel programs: the entry points, one short function
//! each; the logic lives in the modules below.
//!
//! - switch.rs: `sched_switch`, where episodes begin and end and waits are
//!   timed (idle.rs tells a loop's idle wait from a blocking one; stack.rs
//!   and python.rs capture the stacks).
//! - episode.rs: a loop thread's episode, its iteration clock, and the
//!   sampler, run by the timer interrupts that already come (the tick).
//! - task.rs: `task_newtask`, `sched_process_exec`, `sched_process_exit`
//!   keep the thread tags right.
//! - strict.rs: `sys_enter`/`sys_exit` for `--strict`.
//! - record.rs sends the ring-buffer records; maps.rs holds every map and
//!   frozen global; read.rs reads kernel and user memory.
//!
//! Every tracepoint program has a `tp_btf` entry point and a
//! `raw_tracepoint` twin for kernels without BTF-typed tracepoints; both
//! call one body.
#![no_std]
#![no_main]
// `atomic_xadd`: the bpf target's `AtomicU64` has no `fetch_add`.
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    macros::{btf_tracepoint, raw_tracepoint},
    programs::{BtfTracePointContext, RawTracePointContext},
};

use read::Regs;

mod episode;
mod idle;
mod ids;
mod maps;
mod python;
mod read;
mod record;
mod stack;
mod strict;
mod switch;
mod task;

// sched_switch(bool preempt, task_struct *prev, task_struct *next,
// unsigned int prev_state)

#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let (preempt, prev, next, state) = (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3));
    switch::on_switch(&ctx, preempt, state, prev, next, Regs::Btf);
    0
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch_raw(ctx: RawTracePointContext) -> i32 {
    let (preempt, prev, next, state) = (ctx.arg(0), ctx.arg(1), ctx.arg(2), ctx.arg(3));
    switch::on_switch(&ctx, preempt, state, prev, next, Regs::StackTop);
    0
}

// task_newtask(task_struct *task, unsigned long clone_flags)

#[btf_tracepoint(function = "task_newtask")]
pub fn task_newtask(ctx: BtfTracePointContext) -> i32 {
    task::on_newtask(ctx.arg(0), ctx.arg(1), Regs::Btf);
    0
}

#[raw_tracepoint(tracepoint = "task_newtask")]
pub fn task_newtask_raw(ctx: RawTracePointContext) -> i32 {
    task::on_newtask(ctx.arg(0), ctx.arg(1), Regs::StackTop);
    0
}

// sched_process_exec(task_struct *p, pid_t old_pid, linux_binprm *bprm)

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    let _busy = maps::EpisodeBusy::hold();
    task::on_exec(ctx.arg(1));
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sched_process_exec_raw(ctx: RawTracePointContext) -> i32 {
    let _busy = maps::EpisodeBusy::hold();
    task::on_exec(ctx.arg(1));
    0
}

// sched_process_exit(task_struct *p, bool group_dead)

#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    let _busy = maps::EpisodeBusy::hold();
    task::on_exit(ctx.arg::<u64>(1) & 1 != 0);
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sched_process_exit_raw(ctx: RawTracePointContext) -> i32 {
    let _busy = maps::EpisodeBusy::hold();
    task::on_exit(ctx.arg::<u64>(1) & 1 != 0);
    0
}

// raw_syscalls: sys_enter(pt_regs *regs, long id), sys_exit(pt_regs *regs,
// long ret); attached for --strict only.

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn strict_enter(ctx: RawTracePointContext) -> i32 {
    let _busy = maps::EpisodeBusy::hold();
    strict::on_enter(ctx.arg(0), ctx.arg(1));
    0
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn strict_exit(ctx: RawTracePointContext) -> i32 {
    let _busy = maps::EpisodeBusy::hold();
    strict::on_exit(&ctx);
    0
}

// hrtimer_expire_entry(struct hrtimer *timer, ktime_t *now): every
// hrtimer expiry, the scheduler tick's among them, in the interrupt that
// stopped whatever ran on the CPU. When that was a loop thread, it is
// sampled: its iteration clock, and its stacks once its episode is long.

#[btf_tracepoint(function = "hrtimer_expire_entry")]
pub fn episode_tick(ctx: BtfTracePointContext) -> i32 {
    episode::on_sample(&ctx);
    0
}

#[raw_tracepoint(tracepoint = "hrtimer_expire_entry")]
pub fn episode_tick_raw(ctx: RawTracePointContext) -> i32 {
    episode::on_sample(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
