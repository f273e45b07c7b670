//! `sched_switch`: where a loop thread's episodes (episode.rs) begin and
//! end. When a tagged thread enters its runtime's idle wait, its episode
//! ends; when it leaves the CPU for anything else, the switch-out time,
//! syscall and stacks of that wait are kept, and when it comes back the
//! wait is added to its episode. Untagged threads pay two array reads a
//! switch (the tag filter, maps.rs), and so do candidates that run no
//! loop, but for a syscall number read when they sleep.

use aya_ebpf::{EbpfContext, helpers::bpf_ktime_get_ns};
use aya_log_ebpf::info;
use blockwatch_common::{
    PROBE_BUDGET, RecordKind, STATE_DISK, STATE_PREEMPTED, STATE_SLEEPING, TAG_CANDIDATE, TAG_LOOP,
    ThreadTag,
    x86_64::{NR_FUTEX, NR_FUTEX_WAIT, is_epoll_wait},
};

use crate::{
    episode,
    idle::{self, LoopFd, Wait},
    ids,
    maps::{self, Filter, PARKS, off},
    read::{Regs, cpu_time_of, exiting, user_regs},
    record, stack,
};

/// `prev_state` bit of a task in uninterruptible sleep (disk I/O).
const TASK_UNINTERRUPTIBLE: u64 = 2;

#[inline(always)]
pub(crate) fn on_switch<C: EbpfContext>(
    ctx: &C,
    preempt: u64,
    prev_state: u64,
    prev: *const u8,
    next: *const u8,
    how: Regs,
) {
    // The switch-in first, though it happens after the switch-out: the two
    // are of different threads, so the order changes nothing for them, but
    // the verifier walks what follows once for each way the code before it
    // can end. After the switch-out (about twenty ways) the switch-in cost
    // it 951,000 instructions of its limit of a million; before it, 392,000.
    let next_tid = ids::tid_of(next, how);
    // A plain candidate's switch-in changes nothing.
    if next_tid != 0
        && maps::filter(next_tid) == Filter::Loop
        && let Some(tag) = maps::tag_of(next_tid)
        && !exiting(next, how)
    {
        // It wakes from its first idle wait, and its first blocking call
        // must count, not wait for a second idle wait to be seen: user
        // space found it asleep in its epoll wait when it tagged it, or
        // it last slept in a futex wait that was probed, and user space
        // has since found that futex to be its runtime's park.
        if tag.tag == TAG_CANDIDATE
            && (tag.asleep_in_loop != 0
                || (tag.probe_budget < PROBE_BUDGET && park_learned(next_tid)))
        {
            let asleep = tag.asleep_in_loop != 0;
            let found_by = if asleep {
                FoundBy::User
            } else {
                FoundBy::Kernel
            };
            become_loop(tag, next_tid, next, found_by);
            // Seen asleep in the wait that makes it a loop, as
            // `idle_reached` would have: its episode begins now.
            if asleep && let Some(st) = episode::state(next_tid) {
                st.looped = 1;
            }
        }
        if tag.tag == TAG_LOOP {
            // SAFETY: no preconditions.
            let now = unsafe { bpf_ktime_get_ns() };
            episode::back_on_cpu(tag, next_tid, next, now);
            tag.out_ns = 0;
        }
    }
    // `prev` is still `current` here, so its TID and user memory are ours.
    let prev_tid = ids::current_tid();
    let voluntary = preempt & 1 == 0 && prev_state & 0xff != 0;
    // The filter first: most switches are of untagged threads, and a plain
    // candidate matters only when it sleeps in an epoll or futex wait (its
    // loop's idle wait, or a probe of its park).
    let prev_needed = prev_tid != 0
        && match maps::filter(prev_tid) {
            Filter::Untagged => false,
            Filter::Candidate => voluntary && candidate_wait(prev, how),
            Filter::Loop => true,
        };
    // An exiting thread was untagged by sched_process_exit, and its exit
    // releases its TID before its last switches: a new thread may already
    // hold the TID, and that thread's tag (its pending wait) is not the
    // exiting thread's to touch, switching out or in.
    if prev_needed
        && let Some(tag) = maps::tag_of(prev_tid)
        && !exiting(prev, how)
    {
        switch_out(ctx, tag, prev_tid, preempt & 1 != 0, prev_state, prev, how);
    }
}

/// Whether a plain candidate's voluntary switch-out is in a wait its tag
/// needs to see: an epoll wait (its loop's, maybe) or a futex wait (its
/// runtime's park, maybe).
#[inline(always)]
fn candidate_wait(task: *const u8, how: Regs) -> bool {
    let regs = user_regs(task, how);
    if regs.is_null() {
        return false;
    }
    let nr: i64 = how.field(regs, off().pt_regs_orig_ax);
    is_epoll_wait(nr) || nr == NR_FUTEX || nr == NR_FUTEX_WAIT
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
    let voluntary = !preempt && prev_state & 0xff != 0;
    // A candidate matters only when it goes to sleep (in its idle wait,
    // it becomes a loop); its preemptions need no registers read.
    if tag.tag == TAG_CANDIDATE && !voluntary {
        return;
    }
    // 0 until needed: a candidate's switch-outs pay for no clock read.
    let mut now = 0;
    // CPU time since the latest switch-out, for an unseen way back from
    // the idle wait (episode.rs, `unseen_idle_exit`).
    let mut ran_ns = 0;
    if tag.tag == TAG_LOOP {
        // SAFETY: no preconditions.
        now = unsafe { bpf_ktime_get_ns() };
        let cpu_ns = cpu_time_of(prev, how);
        episode::unseen_switch_in(tag, tid, prev, cpu_ns, now);
        ran_ns = cpu_ns.saturating_sub(tag.out_cpu_ns);
        tag.out_cpu_ns = cpu_ns;
    }
    let regs = user_regs(prev, how);
    // No registers (raw tracepoints, the task's stack unreadable): no
    // syscall to judge the switch by. It never happens to a live task,
    // so it is not counted.
    if regs.is_null() {
        return;
    }
    let o = off();
    let nr: i64 = how.field(regs, o.pt_regs_orig_ax);
    // A candidate's first argument tells only an epoll or futex wait apart;
    // a loop keeps every wait's.
    let arg0: u64 =
        if tag.tag == TAG_LOOP || is_epoll_wait(nr) || nr == NR_FUTEX || nr == NR_FUTEX_WAIT {
            how.field(regs, o.pt_regs_di)
        } else {
            0
        };
    if voluntary && idle_or_probe(ctx, tag, tid, nr, arg0, regs, prev) {
        if tag.tag == TAG_LOOP {
            if now == 0 {
                // A candidate that has just become a loop.
                // SAFETY: no preconditions.
                now = unsafe { bpf_ktime_get_ns() };
            }
            episode::idle_reached(tag, tid, prev, now);
        }
        return;
    }
    if tag.tag == TAG_CANDIDATE && voluntary && tag.probe_budget < PROBE_BUDGET && park_learned(tid)
    {
        // User space learned its park (from the probe of an earlier wait)
        // only after the thread had woken from it, so the switch-in could
        // not tell: it runs a loop, and this wait, its first blocking
        // call, counts.
        become_loop(tag, tid, prev, FoundBy::Kernel);
    }
    if tag.tag != TAG_LOOP {
        return;
    }
    if now == 0 {
        // A candidate that has just become a loop.
        // SAFETY: no preconditions.
        now = unsafe { bpf_ktime_get_ns() };
    }
    // A loop found by its idle wait lives as long as its epoll instance:
    // what the thread does after closing it (finalization, the rest of a
    // script) is no loop's time, and a new instance is a new loop.
    if tag.loop_file != 0 {
        match idle::loop_fd(tag, prev) {
            LoopFd::Same => {}
            LoopFd::Replaced(file) => tag.loop_file = file,
            LoopFd::Ended => {
                info!(ctx, "tid {} left its event loop", tid);
                tag.tag = TAG_CANDIDATE;
                tag.loop_epfd = -1;
                tag.loop_file = 0;
                tag.loop_fops = 0;
                // Its episode and its clock ended with the loop.
                episode::forget(tid);
                if voluntary {
                    let _idle = idle_or_probe(ctx, tag, tid, nr, arg0, regs, prev);
                }
                return;
            }
        }
    }
    // Everything else blocks the loop, poll/select included: on a loop
    // thread they are a socket waited on with a timeout (CPython's sockets
    // do this), never the loop's own wait.
    let slot = episode::wait_begins(tag, tid, prev, now, ran_ns, !voluntary);
    tag.out_ns = now;
    tag.syscall = nr;
    tag.args = [
        arg0,
        how.field(regs, o.pt_regs_si),
        how.field(regs, o.pt_regs_dx),
    ];
    tag.off_state = if !voluntary {
        STATE_PREEMPTED
    } else if prev_state & TASK_UNINTERRUPTIBLE != 0 {
        STATE_DISK
    } else {
        STATE_SLEEPING
    };
    if let Some((st, slot)) = slot {
        let key = stack::slot_key(tid, slot);
        let kept = stack::capture(ctx, tag, tid, key, prev, regs);
        episode::slot_site(st, slot, kept);
    }
}

/// A voluntary switch-out in syscall `nr`: true when it is the thread's
/// idle wait (which also shows a candidate runs a loop). A futex wait on
/// an unknown address is sent to user space to classify, within the
/// thread's probe budget.
#[inline(always)]
fn idle_or_probe<C: EbpfContext>(
    ctx: &C,
    tag: &mut ThreadTag,
    tid: u32,
    nr: i64,
    arg0: u64,
    regs: *const u8,
    task: *const u8,
) -> bool {
    // The first epoll fd a thread sleeps on is its loop's; a wait on
    // another epoll instance blocks the loop.
    if is_epoll_wait(nr) && tag.loop_epfd < 0 {
        tag.loop_epfd = arg0 as i32;
    }
    let wait = idle::classify(tag, tid, nr, arg0, regs);
    match wait {
        Wait::Epoll | Wait::Park if tag.tag == TAG_CANDIDATE => {
            become_loop(tag, tid, task, FoundBy::Kernel);
            if wait == Wait::Epoll {
                info!(
                    ctx,
                    "tid {} is an event loop (epoll fd {})", tid, arg0 as i32
                );
            } else {
                info!(ctx, "tid {} is an event loop (parks on futex)", tid);
            }
        }
        // Not deduplicated by address: with parking_lot, a thread's locks
        // and its park share one futex, so a first probe that caught a
        // lock must not stop the park being learned.
        Wait::Futex if tag.probe_budget > 0 => {
            tag.probe_budget -= 1;
            // Its switch-ins must now be seen: they tell when the park is
            // learned.
            maps::mark_looping(tid);
            record::send_probe(tid, tag.tgid, arg0, regs);
        }
        _ => {}
    }
    wait.is_idle()
}

/// Who found that a thread runs a loop.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum FoundBy {
    /// The kernel, at an idle wait: user space is told (a `LoopFound`
    /// record) and looks for the loop's interpreter and clock then.
    Kernel,
    /// User space, asleep in its wait when it tagged the thread
    /// (`asleep_in_loop`): it has looked already, and put the loop's clock
    /// in `CLOCKS`.
    User,
}

/// Candidate `tid` was seen in its runtime's idle wait: it runs a loop.
#[inline(always)]
pub(crate) fn become_loop(tag: &mut ThreadTag, tid: u32, task: *const u8, found_by: FoundBy) {
    tag.tag = TAG_LOOP;
    tag.asleep_in_loop = 0;
    maps::mark_looping(tid);
    // A new loop starts with no episode, whatever the thread's state
    // held: a loop that ended, or a tag user space wrote over the
    // kernel's (a process matched at exec while its thread already ran
    // its loop), would otherwise leave an episode open with none of the
    // waits it saw. Its clock is the new loop's when user space found it.
    match found_by {
        FoundBy::Kernel => episode::forget(tid),
        FoundBy::User => episode::forget_episode(tid),
    }
    // Remembered so that the loop's end, or a new loop, is noticed.
    tag.loop_file = idle::fd_file(task, tag.loop_epfd);
    tag.loop_fops = if tag.loop_file != 0 {
        idle::file_ops(tag.loop_file)
    } else {
        0
    };
    // User space inspects the process for an interpreter at once, so the
    // loop's first blocking call has its frames.
    if found_by == FoundBy::Kernel {
        record::send_task(RecordKind::LoopFound, tag.tgid, tid, tag.loop_epfd as u32);
    }
}

/// Whether user space has learned `tid`'s runtime park.
#[inline(always)]
fn park_learned(tid: u32) -> bool {
    // SAFETY: map value read, dropped at once.
    unsafe { PARKS.get(tid) }.is_some()
}
