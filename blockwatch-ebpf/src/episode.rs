//! Loop episodes: what one iteration of an event loop cost.
//!
//! An episode begins when a loop thread comes back from its runtime's idle
//! wait and ends when it enters it again. Everything in between is time
//! no other task on that loop could run, and is summed in the thread's
//! `LoopState`: on-CPU time, off-CPU time by how the thread was off
//! (sleeping, disk, preempted), and its longest wait, whose stacks
//! `switch.rs` keeps in one of two slots. An episode at or over the
//! threshold is sent once, as one `Block` record, whatever filled it.
//!
//! A loop whose idle wait returns at once (work always ready) never sleeps
//! in it, so `sched_switch` cannot see its iterations end. Its iteration
//! clock can: a value the runtime rewrites every iteration (`CLOCKS`,
//! found by user space), read here at each CPU sample and each switch-out
//! of the thread. When it changed, the episode ended no earlier than the
//! last read that still saw the old value; that lower bound is what is
//! reported, so a loop that iterates is never reported for the sum of its
//! iterations. The clock also gives a timestamp of the new iteration's
//! start (libuv's loop time, asyncio's `end_time`, both from
//! `CLOCK_MONOTONIC`), which is where the next episode begins.
//!
//! A thread that has never been seen in its idle wait runs no loop yet
//! (a thread tagged by rule, a script before its `asyncio.run`): each of
//! its waits is an episode of its own, sent when it ends.
//!
//! With `--strict`, the syscall tracepoints see the idle wait's entry and
//! exit (strict.rs), so a wait that returns at once also ends an episode.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_ktime_get_ns, generated::bpf_get_current_task},
};
use blockwatch_common::{
    CLOCK_PY_LOCAL, CLOCK_TLS_BLOCK, CLOCK_UV_COUNT, CLOCK_WORD, Counter, LoopState, RecordKind,
    SAMPLE_GAP_NS, STATE_PREEMPTED, STATE_RUNNING, TAG_CANDIDATE, TAG_LOOP, TLS_CLOCK_MAX,
    ThreadTag,
    x86_64::{is_epoll_wait, is_futex_wait},
};

use crate::{
    idle::{self, LoopFd},
    maps::{
        BPF_NOEXIST, CLOCKS, LOOPSTATE, PARKS, SAMPLE_SCRATCH, count, loop_config, off, thread,
        threshold_ns,
    },
    python,
    read::{Regs, cpu_time, kread, read_user, user_regs},
    record::{self, LoopFacts},
    stack,
    switch::FoundBy,
};

/// The thread's state, created on first use; counted when the map is full.
#[inline(always)]
pub(crate) fn state(tid: u32) -> Option<&'static mut LoopState> {
    if let Some(s) = existing_state(tid) {
        return Some(s);
    }
    let fresh = LoopState {
        max_syscall: -1,
        ..LoopState::default()
    };
    if LOOPSTATE.insert(tid, fresh, BPF_NOEXIST).is_err() {
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

/// A TID that exited or was reused, or a loop that ended: its episode and
/// clock must not carry over.
#[inline(always)]
pub(crate) fn forget(tid: u32) {
    forget_episode(tid);
    let _ = CLOCKS.remove(tid);
}

/// A new loop of `tid`, whose clock user space has just found: only its
/// episode must not carry over.
#[inline(always)]
pub(crate) fn forget_episode(tid: u32) {
    // Absent is fine: most threads never had any.
    let _ = LOOPSTATE.remove(tid);
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// Sends the episode `st` of `tid` if it lasted until `end` at least the
/// threshold, then clears it; `task` names the thread in the record.
#[inline(always)]
fn close(st: &mut LoopState, tag: &ThreadTag, tid: u32, end: u64, task: *const u8) {
    if st.in_ns != 0 && end > st.in_ns {
        st.run_ns += end - st.in_ns;
    }
    let wall = end.saturating_sub(st.start_ns);
    if st.start_ns != 0 && wall >= threshold_ns() {
        // No wait to name it by (none, or only preemptions).
        if st.max_ns == 0 {
            st.max_state = STATE_RUNNING;
        }
        record::send_episode(tag, tid, st, wall, task);
    }
    st.start_ns = 0;
    st.in_ns = 0;
    st.run_ns = 0;
    st.off_ns = [0; 3];
    st.max_start_ns = 0;
    st.max_ns = 0;
    st.max_syscall = -1;
    st.max_args = [0; 3];
    st.max_state = 0;
    st.waits = 0;
    st.samples = 0;
}

/// `current` (= `task`), a loop thread, enters its idle wait at `now`:
/// its episode ends.
#[inline(always)]
pub(crate) fn idle_reached(tag: &mut ThreadTag, tid: u32, task: *const u8, now: u64) {
    // No state: counted (LostLoopState) by `state`.
    let Some(st) = state(tid) else {
        return;
    };
    st.looped = 1;
    close(st, tag, tid, now, task);
    // In its idle wait the loop's stack is at its shallowest: the place
    // to find the frame its clock lives in, once.
    if st.clock_frame == 0
        // SAFETY: map value read, copied out at once.
        && let Some(c) = unsafe { CLOCKS.get(tid) }.copied()
        && c.kind == CLOCK_PY_LOCAL
    {
        st.clock_frame = python::frame_running(tag, task, c.code);
    }
}

/// Back from the idle wait at `now`: an episode begins, if none runs.
#[inline(always)]
pub(crate) fn begin(st: &mut LoopState, now: u64) {
    if st.start_ns == 0 {
        st.start_ns = now;
        st.run_ns = 0;
    }
}

/// The value of `tid`'s iteration clock, and the start of the iteration it
/// names in `CLOCK_MONOTONIC` nanoseconds (0 when unknown); None when the
/// thread has no clock or it cannot be read now.
#[inline(always)]
fn clock(st: &mut LoopState, tag: &mut ThreadTag, tid: u32, task: *const u8) -> Option<(u64, u64)> {
    // SAFETY: map value read, copied out at once.
    let c = (unsafe { CLOCKS.get(tid) }).copied()?;
    match c.kind {
        CLOCK_WORD => {
            let ms: u64 = read_word(c.addr)?;
            Some((ms, ms_to_ns(ms)))
        }
        CLOCK_UV_COUNT => {
            let count: u64 = read_word(c.addr)?;
            // Unreadable, the start is unknown (0); the count still tells.
            let ms: u64 = read_word(c.time_addr).unwrap_or(0);
            Some((count, ms_to_ns(ms)))
        }
        CLOCK_PY_LOCAL => {
            // The `_run_once` frame sits at the same address iteration
            // after iteration (the interpreter's frame stack, or 3.10's
            // reused frame object): kept once found, checked at each read,
            // so a deep callback, whose frames a walk could not get past,
            // still has its clock read.
            let mut frame = st.clock_frame;
            if frame == 0 {
                frame = c.addr;
            }
            if frame == 0 || !python::frame_runs(tag, frame, c.code) {
                frame = python::frame_running(tag, task, c.code);
                st.clock_frame = frame;
            }
            if frame == 0 {
                return None;
            }
            let obj: u64 = read_word(frame + c.offset)?;
            // NULL: the iteration is between its select and its callbacks
            // (a new `_run_once` frame): a value of its own.
            let bits: u64 = if obj == 0 {
                0
            } else {
                read_word(obj + c.value_offset)?
            };
            Some((bits, seconds_to_ns(bits)))
        }
        CLOCK_TLS_BLOCK => {
            let fsbase: u64 = kread(task, off().task_fsbase);
            if fsbase == 0 || c.offset == 0 || c.offset > TLS_CLOCK_MAX {
                return None;
            }
            // Zeroed first: the words past `offset` fold in as constants.
            let mut words = [0u64; (TLS_CLOCK_MAX / 8) as usize];
            if !read_user(
                words.as_mut_ptr() as *mut u8,
                c.offset as usize,
                fsbase.wrapping_add(c.addr),
            ) {
                return None;
            }
            // Any change is a boundary: a fold that two different blocks
            // rarely share is enough (FNV-1a's prime, a word at a time).
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for w in words {
                h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
            }
            // No start time: the next episode begins where this one ends.
            Some((h, 0))
        }
        _ => None,
    }
}

/// The `u64` at `addr` in the current task's memory; None when it cannot
/// be read now. A failed read is no value: taken as one, it would look
/// like a new iteration and end the episode in mid-callback.
#[inline(always)]
fn read_word(addr: u64) -> Option<u64> {
    let mut v: u64 = 0;
    read_user(&mut v as *mut u64 as *mut u8, 8, addr).then_some(v)
}

/// Nanoseconds in `ms` milliseconds; 0 (unknown) for a value so large it
/// is garbage. A plain product: checked ones need 128-bit helpers BPF
/// lacks.
#[inline(always)]
fn ms_to_ns(ms: u64) -> u64 {
    if ms < u64::MAX / 1_000_000 {
        ms * 1_000_000
    } else {
        0
    }
}

/// Nanoseconds in the IEEE 754 double `bits` (seconds), without floating
/// point (BPF has none); 0 for a negative value, one under a second, or
/// one over 2^33 seconds.
#[inline(always)]
pub(crate) fn seconds_to_ns(bits: u64) -> u64 {
    let exp = ((bits >> 52) & 0x7ff) as i64 - 1023;
    if bits >> 63 != 0 || !(0..=32).contains(&exp) {
        return 0;
    }
    let mant = (bits & ((1 << 52) - 1)) | (1 << 52);
    // The value in fixed point with 20 fractional bits (about 1 µs).
    let fixed = mant >> (32 - exp) as u64;
    (fixed >> 20) * 1_000_000_000 + (((fixed & 0xf_ffff) * 1_000_000_000) >> 20)
}

/// Reads the iteration clock of `tid` (`current`, on the CPU since at
/// least `st.in_ns`) at `now`. When it changed, the episode ended: it is
/// closed at the last read that saw the old value, and the next begins
/// where the clock says the new iteration began.
#[inline(always)]
pub(crate) fn observe_clock(
    st: &mut LoopState,
    tag: &mut ThreadTag,
    tid: u32,
    task: *const u8,
    now: u64,
) {
    let Some((value, began)) = clock(st, tag, tid, task) else {
        return;
    };
    let seen = st.clock_ns;
    st.clock_ns = now;
    if value == st.clock || st.start_ns == 0 {
        st.clock = value;
        return;
    }
    st.clock = value;
    let end = if seen > st.start_ns {
        seen
    } else {
        st.start_ns
    };
    // Not `clamp`: it panics when its bounds cross, and BPF cannot.
    let next = if began < end {
        end
    } else if began > now {
        now
    } else {
        began
    };
    let on_cpu = st.in_ns != 0;
    let long = end - st.start_ns >= threshold_ns();
    close(st, tag, tid, end, task);
    if long {
        count(Counter::ClockEnds);
    }
    st.start_ns = next;
    st.in_ns = if on_cpu { next } else { 0 };
}

/// sched_switch: `tid` (`current` = `task`) leaves the CPU for a wait that
/// is not its idle wait, at `now`. Returns its state and the slot the
/// wait's stacks go to, or None when they are not needed.
///
/// A loop thread's preemption takes no stacks: it is time the host took,
/// summed with the episode's other parts but never the wait an episode is
/// named by (a long one is named by its CPU samples), and a busy server is
/// preempted thousands of times a second, each of which would otherwise
/// pay for a stack walk and a 16 KiB copy.
#[inline(always)]
pub(crate) fn wait_begins(
    tag: &mut ThreadTag,
    tid: u32,
    task: *const u8,
    now: u64,
    ran_ns: u64,
    preempted: bool,
) -> Option<(&'static mut LoopState, u8)> {
    // No state: counted (LostLoopState) by `state`; the wait is then not
    // part of any episode.
    let st = state(tid)?;
    if st.looped == 0 {
        // No loop yet: the wait is an episode of its own.
        st.start_ns = now;
        st.in_ns = 0;
        let slot = st.max_slot ^ 1;
        return Some((st, slot));
    }
    observe_clock(st, tag, tid, task, now);
    unseen_idle_exit(st, ran_ns, now);
    begin(st, now);
    if st.in_ns != 0 {
        st.run_ns += now.saturating_sub(st.in_ns);
        st.in_ns = 0;
    }
    if preempted {
        return None;
    }
    let slot = st.max_slot ^ 1;
    Some((st, slot))
}

/// What `stack::capture` kept of the wait in `slot`.
#[inline(always)]
pub(crate) fn slot_site(st: &mut LoopState, slot: u8, kept: stack::Captured) {
    let bit = 1u8 << (slot & 1);
    st.slot_site[(slot & 1) as usize] = kept.site;
    st.slot_known = if kept.known {
        st.slot_known | bit
    } else {
        st.slot_known & !bit
    };
    st.slot_kept = if kept.in_slot {
        st.slot_kept | bit
    } else {
        st.slot_kept & !bit
    };
}

/// sched_switch: `tid` (the task `next`) comes back to the CPU at `now`
/// from the wait `tag` describes (`tag.out_ns` its switch-out, 0 when it
/// comes back from its idle wait instead).
#[inline(always)]
pub(crate) fn back_on_cpu(tag: &ThreadTag, tid: u32, next: *const u8, now: u64) {
    let Some(st) = state(tid) else {
        return;
    };
    resume(st, tag, tid, next, now);
}

/// `tid` (`current` = `task`, with `cpu_ns` of CPU time) is on the CPU at
/// `now`, yet a wait is still pending (`tag.out_ns` set): `sched_switch`
/// never showed it coming back. This happens: on a 6.18 VM, a Node loop
/// preempted by another process's thread was running again a few ms
/// later with no switch-in seen by this program, its recursion-miss count
/// at 0, and none in ftrace's own `sched_switch` events either. Left
/// alone, the time it ran is lost, its episode no longer adds up, and the
/// stale `out_ns` counts a wait twice.
///
/// The switch-in is applied where the scheduler's own CPU time places it:
/// the thread's CPU time since its latest switch-out, counted back from
/// `now` (never before that switch-out). At a timer interrupt that time
/// lags by at most a tick, which goes to the wait instead.
///
/// A switch-in from the idle wait left unseen is `unseen_idle_exit`'s.
#[inline(always)]
pub(crate) fn unseen_switch_in(
    tag: &mut ThreadTag,
    tid: u32,
    task: *const u8,
    cpu_ns: u64,
    now: u64,
) {
    if tag.out_ns == 0 {
        return;
    }
    let Some(st) = existing_state(tid) else {
        return;
    };
    let ran = cpu_ns.saturating_sub(tag.out_cpu_ns);
    let mut at = now.saturating_sub(ran);
    if at < tag.out_ns {
        at = tag.out_ns;
    }
    resume(st, tag, tid, task, at);
    tag.out_ns = 0;
    count(Counter::MissedSwitchIns);
}

/// A loop thread (state `st`) is found running at `now` outside any
/// episode, after `ran_ns` of CPU time since its latest switch-out: its
/// way back from the idle wait went unseen (see `unseen_switch_in`), and
/// its episode begins where that CPU time puts the switch-in. Left alone,
/// the episode began only at its next wait, and a stall before that wait
/// (or with none) was never reported. Not while `--strict`'s `sys_enter`
/// has the thread in its idle wait, where it runs outside any episode.
#[inline(always)]
fn unseen_idle_exit(st: &mut LoopState, ran_ns: u64, now: u64) {
    if st.looped == 0 || st.start_ns != 0 || st.in_idle != 0 {
        return;
    }
    let at = now.saturating_sub(ran_ns);
    st.start_ns = at;
    st.run_ns = 0;
    st.in_ns = at;
    count(Counter::MissedSwitchIns);
}

/// `back_on_cpu` on the thread's state `st`.
#[inline(always)]
fn resume(st: &mut LoopState, tag: &ThreadTag, tid: u32, next: *const u8, now: u64) {
    if tag.out_ns != 0 && st.looped != 0 && parked(tag, tid) {
        // The wait was the runtime's park after all: user space learned it
        // while the thread slept in it (its first parks are probed). Idle,
        // so the episode ended where the wait began.
        close(st, tag, tid, tag.out_ns, next);
        begin(st, now);
        st.in_ns = now;
        return;
    }
    if tag.out_ns != 0 {
        // The slot `wait_begins` gave the wait: `max_slot` has not changed
        // since, as nothing ran on the thread.
        let slot = st.max_slot ^ 1;
        let waited = now.saturating_sub(tag.out_ns);
        let i = if tag.off_state <= STATE_PREEMPTED {
            tag.off_state as usize
        } else {
            0
        };
        st.off_ns[i] += waited;
        st.waits += 1;
        st.wait_end_ns = now;
        // A strict call whose wait alone reaches the threshold is reported
        // as (part of) an episode, not counted again as strict. Without
        // --strict there is no call to look up, and a lookup is no small
        // part of a switch.
        if waited >= threshold_ns()
            && loop_config().is_some_and(|c| c.strict != 0)
            && let Some(call) = crate::strict::pending_call(tid)
        {
            call.offcpu = 1;
        }
        // A loop's preemption has no stacks (see `wait_begins`).
        if waited > st.max_ns && (tag.off_state != STATE_PREEMPTED || st.looped == 0) {
            st.max_ns = waited;
            st.max_start_ns = tag.out_ns;
            st.max_syscall = tag.syscall;
            st.max_args = tag.args;
            st.max_state = tag.off_state;
            st.max_slot = slot;
        }
        if st.looped == 0 {
            close(st, tag, tid, now, next);
            return;
        }
    }
    if st.looped == 0 {
        return;
    }
    begin(st, now);
    st.in_ns = now;
    // An iteration ends only while its thread runs: the one under way
    // before the wait is under way still, whatever the clock said.
    st.clock_ns = now;
}

/// sched_process_exit: `tid` (`current` = `task`) exits in an episode.
/// A process that exits right after its last blocking call (a runtime
/// shut down by `exit`) never brings its loop back to the idle wait, so the
/// episode is sent now, up to the end of its latest wait: what follows is
/// the exit's own work. A loop whose epoll instance is closed has ended,
/// and what the thread did since (interpreter finalization) is no loop's.
#[inline(always)]
pub(crate) fn thread_exits(tid: u32, task: *const u8) {
    let Some(tag) = thread(tid) else {
        return;
    };
    if tag.tag != TAG_LOOP {
        return;
    }
    if tag.out_ns != 0 {
        // It runs its exit, so its last wait is over, though no switch-in
        // showed it: applied now, or a thread that exits right after its
        // last wait (the wait an episode of its own) loses that wait.
        let cpu_ns = cpu_time(task);
        unseen_switch_in(tag, tid, task, cpu_ns, now());
    }
    let Some(st) = existing_state(tid) else {
        return;
    };
    if st.looped == 0 || st.start_ns == 0 || st.wait_end_ns <= st.start_ns {
        return;
    }
    if tag.loop_file != 0 && !matches!(idle::loop_fd(tag, task), LoopFd::Same) {
        return;
    }
    // Its CPU time since the latest wait is the exit's.
    st.in_ns = 0;
    let end = st.wait_end_ns;
    close(st, tag, tid, end, task);
}

/// The sampler caught candidate `tid` (`current`) inside an epoll wait on
/// its first epoll fd: it runs a loop, one so busy that its wait returns
/// at once and it may never sleep in it (a server saturated when
/// blockwatch attached), so that sleep cannot be what finds it. Its first
/// episode begins now.
#[inline(always)]
fn found_busy(tag: &mut ThreadTag, tid: u32) {
    // SAFETY: no preconditions; the task is only read through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let regs = user_regs(task, Regs::StackTop);
    if regs.is_null() {
        return;
    }
    let o = off();
    let nr: i64 = kread(regs, o.pt_regs_orig_ax);
    if !is_epoll_wait(nr) {
        return;
    }
    let epfd = kread::<u64>(regs, o.pt_regs_di) as i32;
    if tag.loop_epfd < 0 {
        tag.loop_epfd = epfd;
    }
    if epfd != tag.loop_epfd {
        return;
    }
    crate::switch::become_loop(tag, tid, task, FoundBy::Kernel);
    let Some(st) = state(tid) else {
        return;
    };
    let now = now();
    st.looped = 1;
    st.start_ns = now;
    st.in_ns = now;
}

/// Whether the wait `tag` describes is a futex wait on `tid`'s learned park.
#[inline(always)]
fn parked(tag: &ThreadTag, tid: u32) -> bool {
    if !is_futex_wait(tag.syscall, tag.args[1]) {
        return false;
    }
    // SAFETY: map value read, compared at once.
    matches!(unsafe { PARKS.get(tid) }, Some(park) if *park == tag.args[0])
}

/// A timer interrupt (`hrtimer_expire_entry`) stopped `current`: on a loop
/// thread in an episode, reads its iteration clock, and samples its stacks
/// once the episode is old enough to be reported; at most every
/// `SAMPLE_GAP_NS`.
///
/// No timer of blockwatch's own: the tick interrupts a running thread
/// anyway. A perf event per CPU adds an interrupt 199 times a second on
/// every CPU, and one per thread starts and stops a timer at each of its
/// context switches; on a VM both exit to the hypervisor, and each cost a
/// busy server measurably (ARCHITECTURE.md, "Why the sampler rides the
/// tick").
#[inline(always)]
pub(crate) fn on_sample<C: EbpfContext>(ctx: &C) {
    let tid = crate::ids::current_tid();
    if tid == 0 || crate::maps::episode_busy() {
        return;
    }
    let Some(tag) = thread(tid) else {
        return;
    };
    if tag.tag == TAG_CANDIDATE {
        found_busy(tag, tid);
        return;
    }
    if tag.tag != TAG_LOOP {
        return;
    }
    if tag.out_ns != 0 {
        // It runs, so no wait can be pending: see `unseen_switch_in`.
        // SAFETY: as below.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        let cpu_ns = cpu_time(task);
        unseen_switch_in(tag, tid, task, cpu_ns, now());
    }
    let Some(st) = existing_state(tid) else {
        return;
    };
    if st.start_ns == 0 && st.looped != 0 && st.in_idle == 0 {
        // SAFETY: as below.
        let task = unsafe { bpf_get_current_task() } as *const u8;
        let cpu_ns = cpu_time(task);
        unseen_idle_exit(st, cpu_ns.saturating_sub(tag.out_cpu_ns), now());
    }
    if st.start_ns == 0 || st.in_ns == 0 || st.looped == 0 {
        return;
    }
    let now = now();
    if now.saturating_sub(st.sampled_ns) < SAMPLE_GAP_NS {
        return;
    }
    st.sampled_ns = now;
    // SAFETY: no preconditions; the task is only read through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    observe_clock(st, tag, tid, task, now);
    // Samples from half the threshold on: they name an episode that will
    // be reported, and the short ones (nearly all) send none.
    if now.saturating_sub(st.start_ns) < threshold_ns() / 2 {
        return;
    }
    // The sample may interrupt kernel code: the user registers are those
    // saved at the top of the task's kernel stack. Whether the thread was
    // in a syscall, and which, names CPU time spent in the kernel for it
    // (a large read copying from the page cache).
    let regs = user_regs(task, Regs::StackTop);
    let (syscall, args) = if regs.is_null() {
        (-1, [0; 3])
    } else {
        let o = off();
        (
            kread(regs, o.pt_regs_orig_ax),
            [
                kread(regs, o.pt_regs_di),
                kread(regs, o.pt_regs_si),
                kread(regs, o.pt_regs_dx),
            ],
        )
    };
    // Index 0 of a per-CPU array always exists: this cannot fail.
    let Some(py) = python::current_frames(&SAMPLE_SCRATCH, tag) else {
        return;
    };
    let sample = LoopFacts {
        kind: RecordKind::Sample,
        pid: tag.tgid,
        tid,
        syscall,
        args,
        start_ns: st.start_ns,
        duration_ns: st.run_ns + now.saturating_sub(st.in_ns),
        busy_ns: now.saturating_sub(st.start_ns),
    };
    if stack::send_sample_stack(tag, tid, st.start_ns, regs)
        && record::send_loop_with_stacks(ctx, &sample, py)
    {
        st.samples += 1;
        count(Counter::Samples);
    }
}

#[cfg(test)]
mod tests {
    use super::seconds_to_ns;

    #[test]
    fn doubles_become_nanoseconds() {
        for s in [1.0f64, 1.5, 12345.678901, 86400.25, 4.0e9] {
            let got = seconds_to_ns(s.to_bits()) as f64;
            assert!((got - s * 1e9).abs() < 2000.0, "{s}: {got}");
        }
        assert_eq!(seconds_to_ns(0.5f64.to_bits()), 0);
        assert_eq!(seconds_to_ns((-3.0f64).to_bits()), 0);
        assert_eq!(seconds_to_ns(0), 0);
    }
}
