//! Stacks of a thread going off-CPU: the frame-pointer stack and CPython
//! frames (`STACKS`), and a copy of the top of its user stack for DWARF
//! unwinding (`USER_STACKS`). Each loop thread has two slots in both: one
//! holds its episode's longest wait so far, the other takes the wait in
//! progress (episode.rs swaps them when the new wait is longer), so the
//! stacks reported are the longest wait's without copying them twice.
//! CPU samples copy the user stack straight into the ring buffer.

use aya_ebpf::{EbpfContext, bindings::BPF_F_USER_STACK, helpers::bpf_get_stack};
use blockwatch_common::{
    Counter, MAX_FRAMES, MAX_USER_STACK, RecordHeader, RecordKind, ThreadTag, UserStack,
    x86_64::is_epoll_wait,
};

use crate::{
    maps::{
        EVENTS, SCRATCH, STACKS, USER_STACK_ZERO, USER_STACKS, count, off, scratch, user_stack_size,
    },
    python,
    read::{kread, read_user},
};

/// The key of `tid`'s stack slot `slot` (0 or 1) in `STACKS` and
/// `USER_STACKS`. TIDs stay below 2^22 (`PID_MAX_LIMIT`), so bit 30 is free.
#[inline(always)]
pub(crate) fn slot_key(tid: u32, slot: u8) -> u32 {
    tid | ((slot as u32 & 1) << 30)
}

/// Drops both of `tid`'s slots (exit, exec).
#[inline(always)]
pub(crate) fn forget(tid: u32) {
    for slot in 0..2 {
        // Absent is fine: most threads never blocked.
        let _ = STACKS.remove(slot_key(tid, slot));
        let _ = USER_STACKS.remove(slot_key(tid, slot));
    }
}

/// Pages of user stack read by one helper call; a read that would cross the
/// end of the stack mapping fails whole, so the copy goes page by page.
const PAGE: usize = 4096;

/// The user stack of `ctx`'s task, innermost first, into `ips`; how many
/// frames were written.
#[inline(always)]
pub(crate) fn user_ips<C: EbpfContext>(ctx: &C, ips: &mut [u64; MAX_FRAMES]) -> u32 {
    // SAFETY: the destination is MAX_FRAMES u64s long.
    let n = unsafe {
        bpf_get_stack(
            ctx.as_ptr(),
            ips.as_mut_ptr() as *mut _,
            (MAX_FRAMES * 8) as u32,
            BPF_F_USER_STACK as u64,
        )
    };
    // A failed walk is an event without a stack, not a lost event.
    if n > 0 { (n / 8) as u32 } else { 0 }
}

/// Keeps the stack and CPython frames of `task` (`current`), going off-CPU
/// in a wait, in slot `key`.
#[inline(always)]
pub(crate) fn capture<C: EbpfContext>(ctx: &C, tag: &mut ThreadTag, key: u32, task: *const u8) {
    // Index 0 of a per-CPU array always exists: this cannot fail.
    let Some(buf) = scratch(&SCRATCH) else {
        return;
    };
    buf.len = user_ips(ctx, &mut buf.ips) as u64 * 8;
    python::walk(tag, task, buf);
    if STACKS.insert(key, buf, 0).is_err() {
        count(Counter::LostStacks);
    }
}

/// The `USER_STACKS` entry at `key` (a TID's stack slot, or a TID with
/// `STRICT_COPY_KEY` for its strict calls), created on first use.
#[inline(always)]
fn user_stack_entry(key: u32) -> Option<&'static mut UserStack> {
    if USER_STACKS.get_ptr_mut(key).is_none() {
        let zero = USER_STACK_ZERO.get(0)?;
        USER_STACKS.insert(key, zero, 0).ok()?;
    }
    // SAFETY: map value pointer, valid for this run; only this thread's
    // switches (and, under its other key, its syscalls) touch the entry,
    // and they are serialised by the scheduler.
    USER_STACKS.get_ptr_mut(key).map(|v| unsafe { &mut *v })
}

/// Copies the top of the user stack and the registers DWARF unwinding
/// starts from into `USER_STACKS` slot `key`. Counted when nothing could
/// be copied.
#[inline(always)]
pub(crate) fn copy_user_stack(tag: &ThreadTag, tid: u32, key: u32, regs: *const u8) {
    let mut want = user_stack_size();
    if want == 0 {
        return;
    }
    // An epoll wait that is not idle is on another epoll instance than the
    // loop's own: a nested event loop (Node's execSync runs one), whose
    // poll keeps 12 KiB of events on the stack above its caller.
    if is_epoll_wait(tag.syscall) {
        want = MAX_USER_STACK;
    }
    copy_user_stack_at(key, tag.tgid, tid, tag.out_ns, want, regs);
}

/// Copies `want` bytes of the current thread's user stack (registers at
/// `regs`) into `USER_STACKS[key]`, for the record of what began at
/// `start_ns`. Counted when nothing could be copied.
#[inline(always)]
pub(crate) fn copy_user_stack_at(
    key: u32,
    tgid: u32,
    tid: u32,
    start_ns: u64,
    want: usize,
    regs: *const u8,
) {
    let Some(v) = user_stack_entry(key) else {
        count(Counter::LostUserStacks);
        return;
    };
    if !fill(v, tgid, tid, start_ns, regs, want) {
        count(Counter::LostUserStacks);
    }
}

/// Fills `v` with the registers at `regs` and up to `want` bytes of the
/// current task's user stack; whether anything was copied.
#[inline(always)]
fn fill(
    v: &mut UserStack,
    pid: u32,
    tid: u32,
    start_ns: u64,
    regs: *const u8,
    want: usize,
) -> bool {
    let o = off();
    let sp: u64 = kread(regs, o.pt_regs_sp);
    let h = &mut v.head;
    h.header = RecordHeader::new(RecordKind::UserStack, pid, tid);
    h.start_ns = start_ns;
    h.ip = kread(regs, o.pt_regs_ip);
    h.sp = sp;
    h.bp = kread(regs, o.pt_regs_bp);
    h.len = 0;
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
    v.head.len = copied.min(want) as u32;
    copied != 0
}

/// Sends a copy of the current task's user stack (its user registers at
/// `regs`, null when unknown) for a CPU sample of the episode that began at
/// `start_ns`, just before the sample's record; whether the sample may
/// follow (with stacks off, or no registers, it goes alone). Counted when
/// the copy cannot be sent.
#[inline(always)]
pub(crate) fn send_sample_stack(tag: &ThreadTag, tid: u32, start_ns: u64, regs: *const u8) -> bool {
    let want = user_stack_size();
    if want == 0 || regs.is_null() {
        return true;
    }
    let Some(mut entry) = EVENTS.reserve::<UserStack>(0) else {
        count(Counter::LostLoopRecords);
        return false;
    };
    // SAFETY: a reserved record, exclusively ours; `fill` writes the head
    // and the bytes it reports in `len`, the only ones user space reads.
    let v = unsafe { &mut *entry.as_mut_ptr() };
    fill(v, tag.tgid, tid, start_ns, regs, want);
    entry.submit(0);
    true
}
