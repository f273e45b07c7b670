//! Sending records to user space through the `EVENTS` ring buffer. A
//! record that cannot be sent (the buffer is full) is counted under its own
//! [`Counter`], so user space can say what was lost.

use aya_ebpf::{EbpfContext, helpers::bpf_get_current_comm, maps::ring_buf::RingBufEntry};
use blockwatch_common::{
    BlockEvent, BlockStacks, Counter, LoopEvent, LoopState, MAX_FRAMES, MAX_PY_FRAMES,
    MAX_USER_STACK, PROBE_STACK_BYTES, ProbeEvent, PyFrameRef, RecordHeader, RecordKind, StackBuf,
    StrictEvent, TaskEvent, ThreadTag, UserStackHead,
};

use crate::{
    maps::{EVENTS, STACKS, USER_STACKS, count, off, user_stack_size},
    read::{kcopy, kread, read_user},
    stack,
};

/// Reserves a `T` in the ring buffer; counts `lost` when it is full.
#[inline(always)]
fn reserve<T: 'static>(lost: Counter) -> Option<RingBufEntry<T>> {
    let entry = EVENTS.reserve::<T>(0);
    if entry.is_none() {
        count(lost);
    }
    entry
}

/// The episode `st` of `tid`, `wall` long, with its longest wait's stacks
/// (slot `st.max_slot`), sent after that wait's user-stack copy; `task`
/// is the thread's task. The frame-pointer stack goes too (a
/// [`BlockStacks`]) only when the wait's call site is new to user space.
#[inline(always)]
pub(crate) fn send_episode(tag: &ThreadTag, tid: u32, st: &LoopState, wall: u64, task: *const u8) {
    let key = stack::slot_key(tid, st.max_slot);
    let slot = (st.max_slot & 1) as usize;
    let waited = st.max_ns != 0;
    let known = waited && (st.slot_known >> slot) & 1 != 0;
    // No wait, no stacks of one; nothing in the slot: a known site with
    // no interpreter frames, or a capture that failed at switch-out (where
    // it was counted).
    // SAFETY: map value pointer, valid for this program run.
    let stack = if waited && (st.slot_kept >> slot) & 1 != 0 {
        STACKS.get_ptr(key).map(|s| unsafe { &*s })
    } else {
        None
    };
    let ips = match stack {
        Some(s) if !known && s.len > 0 && s.len <= (MAX_FRAMES * 8) as u64 => s.len / 8,
        _ => 0,
    };
    let copied = waited && !known && send_user_stack_at(key, st.max_start_ns);
    if ips == 0 {
        let Some(mut entry) = reserve::<BlockEvent>(Counter::LostEvents) else {
            return;
        };
        // SAFETY: a reserved record, exclusively ours.
        unsafe { fill_episode(entry.as_mut_ptr(), tag, tid, st, wall, task, known, stack) };
        entry.submit(0);
    } else {
        let Some(mut entry) = reserve::<BlockStacks>(Counter::LostEvents) else {
            return;
        };
        let ev = entry.as_mut_ptr();
        // SAFETY: a reserved record, exclusively ours; `ips` was checked
        // against the buffer's length above.
        unsafe {
            fill_episode(&mut (*ev).event, tag, tid, st, wall, task, known, stack);
            if let Some(s) = stack
                && kcopy(
                    (*ev).ips.as_mut_ptr() as *mut u8,
                    size_of::<[u64; MAX_FRAMES]>(),
                    s.ips.as_ptr() as *const u8,
                )
            {
                (*ev).event.frames = ips as u32;
            }
        }
        entry.submit(0);
    }
    // User space has this site's stacks by the time it reads the next
    // record: later waits there send none, even before it has said so.
    if copied {
        stack::site_sent(tag.tgid, st.slot_site[slot]);
    }
    count(Counter::Events);
}

/// Writes every field of the episode record but its frame-pointer stack.
///
/// # Safety
/// `ev` points at a reserved record, exclusively ours.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn fill_episode(
    ev: *mut BlockEvent,
    tag: &ThreadTag,
    tid: u32,
    st: &LoopState,
    wall: u64,
    task: *const u8,
    known: bool,
    stack: Option<&StackBuf>,
) {
    let slot = (st.max_slot & 1) as usize;
    // SAFETY: as the caller promised; every field is written.
    unsafe {
        (*ev).header = RecordHeader::new(RecordKind::Block, tag.tgid, tid);
        (*ev).state = st.max_state;
        (*ev).site_known = known as u8;
        (*ev)._pad = [0; 2];
        (*ev).site = if st.max_ns != 0 {
            st.slot_site[slot]
        } else {
            0
        };
        (*ev).syscall = st.max_syscall;
        (*ev).args = st.max_args;
        (*ev).start_ns = st.start_ns;
        (*ev).duration_ns = wall;
        (*ev).run_ns = st.run_ns;
        (*ev).off_ns = st.off_ns;
        (*ev).wait_start_ns = st.max_start_ns;
        (*ev).wait_ns = st.max_ns;
        (*ev).waits = st.waits;
        (*ev).samples = st.samples;
        (*ev).comm = kread(task, off().task_comm);
        (*ev).frames = 0;
        (*ev).py_frames = 0;
        if let Some(stack) = stack {
            let py = stack.py_len;
            if py > 0
                && py <= MAX_PY_FRAMES as u64
                && kcopy(
                    (*ev).py.as_mut_ptr() as *mut u8,
                    size_of::<[PyFrameRef; MAX_PY_FRAMES]>(),
                    stack.py.as_ptr() as *const u8,
                )
            {
                (*ev).py_frames = py as u32;
            }
        }
    }
}

/// A futex wait on `uaddr` for user space to classify, with the top of the
/// waiting thread's user stack (its registers at `regs`).
#[inline(always)]
pub(crate) fn send_probe(tid: u32, tgid: u32, uaddr: u64, regs: *const u8) {
    let Some(mut entry) = reserve::<ProbeEvent>(Counter::LostProbes) else {
        return;
    };
    let o = off();
    let ev = entry.as_mut_ptr();
    // SAFETY: reserved record, written in full before submit.
    unsafe {
        (*ev).header = RecordHeader::new(RecordKind::Probe, tgid, tid);
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

/// An exec or an exit (`kind`), named after the current task.
#[inline(always)]
pub(crate) fn send_task(kind: RecordKind, pid: u32, tid: u32, aux: u32) {
    let Some(mut entry) = reserve::<TaskEvent>(Counter::LostTaskRecords) else {
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: reserved record, written in full before submit.
    unsafe {
        (*ev).header = RecordHeader::new(kind, pid, tid);
        (*ev).aux = aux;
        // A name that cannot be read is empty; the record still counts.
        (*ev).comm = bpf_get_current_comm().unwrap_or_default();
    }
    entry.submit(0);
}

/// Sends the copy in `USER_STACKS[key]` if it is the one taken at `start`;
/// whether it was sent.
#[inline(always)]
pub(crate) fn send_user_stack_at(key: u32, start: u64) -> bool {
    if user_stack_size() == 0 {
        return false;
    }
    // No entry, or one from an earlier wait: the copy failed at
    // switch-out, where it was counted.
    let Some(value) = USER_STACKS.get_ptr(key) else {
        return false;
    };
    // SAFETY: map value pointer, valid for this run.
    let head = unsafe { &(*value).head };
    if head.start_ns != start {
        return false;
    }
    let len = head.len as usize;
    // Never true (the copy is bounded); the check bounds the slice for the
    // verifier.
    if len > MAX_USER_STACK {
        return false;
    }
    const HEAD: usize = core::mem::size_of::<UserStackHead>();
    // SAFETY: the head and the first `len` bytes of the value, which is
    // HEAD + MAX_USER_STACK long.
    let bytes = unsafe { core::slice::from_raw_parts(value as *const u8, HEAD + len) };
    if EVENTS.output::<[u8]>(bytes, 0).is_err() {
        count(Counter::LostUserStacks);
        return false;
    }
    true
}

/// What a strict or sample record says, its stacks aside.
pub(crate) struct LoopFacts {
    pub kind: RecordKind,
    pub pid: u32,
    pub tid: u32,
    pub syscall: i64,
    pub args: [u64; 3],
    pub start_ns: u64,
    pub duration_ns: u64,
    pub busy_ns: u64,
}

/// Writes everything of a loop record but its stacks (none, so far).
///
/// # Safety
/// `ev` points at a reserved record, exclusively ours.
#[inline(always)]
unsafe fn fill_loop(ev: *mut LoopEvent, f: &LoopFacts) {
    // SAFETY: as the caller promised.
    unsafe {
        (*ev).header = RecordHeader::new(f.kind, f.pid, f.tid);
        (*ev)._pad = 0;
        (*ev).syscall = f.syscall;
        (*ev).args = f.args;
        (*ev).start_ns = f.start_ns;
        (*ev).duration_ns = f.duration_ns;
        (*ev).busy_ns = f.busy_ns;
        // A name that cannot be read is empty; the record still counts.
        (*ev).comm = bpf_get_current_comm().unwrap_or_default();
        (*ev).frames = 0;
        (*ev).py_frames = 0;
    }
}

/// Sends a loop record with the current user stack (from `ctx`) and the
/// CPython frames walked into `py`. Whether it was sent.
#[inline(always)]
pub(crate) fn send_loop_with_stacks<C: EbpfContext>(ctx: &C, f: &LoopFacts, py: &StackBuf) -> bool {
    let Some(mut entry) = reserve::<LoopEvent>(Counter::LostLoopRecords) else {
        return false;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: a reserved record, exclusively ours, written in full.
    unsafe {
        fill_loop(ev, f);
        (*ev).frames = stack::user_ips(ctx, &mut (*ev).ips);
        (*ev).py_frames = if py.py_len <= MAX_PY_FRAMES as u64 {
            py.py_len as u32
        } else {
            0
        };
        (*ev).py = py.py;
    }
    entry.submit(0);
    true
}

/// The first call of a strict call site ([`StrictEvent`]): what `f` says,
/// the site, and the stacks in `buf` (frame pointers, CPython frames).
/// Whether it was sent; counted as lost when the buffer is full.
#[inline(always)]
pub(crate) fn send_strict(f: &LoopFacts, site: u64, buf: &StackBuf) -> bool {
    let Some(mut entry) = reserve::<StrictEvent>(Counter::LostLoopRecords) else {
        return false;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: a reserved record, exclusively ours, written in full.
    unsafe {
        (*ev).header = RecordHeader::new(RecordKind::Strict, f.pid, f.tid);
        (*ev)._pad = 0;
        (*ev).syscall = f.syscall;
        (*ev).args = f.args;
        (*ev).start_ns = f.start_ns;
        (*ev).duration_ns = f.duration_ns;
        (*ev).site = site;
        // A name that cannot be read is empty; the record still counts.
        (*ev).comm = bpf_get_current_comm().unwrap_or_default();
        let len = buf.len;
        (*ev).frames = if len <= (MAX_FRAMES * 8) as u64 {
            (len / 8) as u32
        } else {
            0
        };
        (*ev).ips = buf.ips;
        (*ev).py_frames = if buf.py_len <= MAX_PY_FRAMES as u64 {
            buf.py_len as u32
        } else {
            0
        };
        (*ev).py = buf.py;
    }
    entry.submit(0);
    true
}
