//! Stacks of a thread going off-CPU: the frame-pointer stack and CPython
//! frames (`STACKS`), and a copy of the top of its user stack for DWARF
//! unwinding (`USER_STACKS`). Each loop thread has two slots in both: one
//! holds its episode's longest wait so far, the other takes the wait in
//! progress (episode.rs swaps them when the new wait is longer), so the
//! stacks reported are the longest wait's without copying them twice.
//! CPU samples copy the user stack straight into the ring buffer.
//!
//! A wait at a call site user space already has the native stack of
//! (`KNOWN_SITES`, keyed by [`wait_site`] and checked by `site_check`)
//! keeps only its CPython frames:
//! the frame-pointer walk and the 16 KiB copy are skipped, and the record
//! names the site instead. In a process without CPython frames such a
//! wait keeps nothing at all, and its thread's slot is not even looked up.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_USER_STACK,
    helpers::{bpf_get_stack, bpf_ktime_get_ns},
};
use blockwatch_common::{
    Counter, MAX_FRAMES, MAX_PY_FRAMES, MAX_USER_STACK, RecordHeader, RecordKind, SITE_CHECKS,
    SITE_REFRESH, SiteKey, StackBuf, ThreadTag, UserStack,
    x86_64::{USER_SPACE_END, is_epoll_wait},
};

use crate::{
    maps::{
        EVENTS, KNOWN_SITES, SENT_SITES, STACK_ZERO, STACKS, SWITCH_WINDOW, USER_STACK_ZERO,
        USER_STACKS, count, off, thread_entry, user_stack_size,
    },
    python,
    read::{kread, read_user, uread},
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

/// Frames of the frame-pointer chain a site's hash follows: the nearest
/// callers, where two call sites at the same depth differ. Each costs two
/// user reads on every call; measured on Node's readFileSync (whose V8
/// frames keep a chain), 16 frames cost about 0.5 us a call, none 0.
const SITE_FRAMES: usize = 4;
/// A frame pointer more than this above `sp` is taken to be off the
/// thread's stack (code without frame pointers uses rbp for data).
const STACK_WINDOW: u64 = 1 << 20;

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

/// Keeps the stacks of `task` (`current`), going off-CPU in a wait (user
/// registers at `regs`), in slot `key`: its CPython frames always, and its
/// frame-pointer stack and user-stack copy only when user space does not
/// already have its call site's native stack.
#[inline(always)]
pub(crate) fn capture<C: EbpfContext>(
    ctx: &C,
    tag: &mut ThreadTag,
    tid: u32,
    key: u32,
    task: *const u8,
    regs: *const u8,
) -> Captured {
    let Some(py) = python::process(tag) else {
        return capture_native(ctx, tag, tid, key, regs);
    };
    let Some(buf) = thread_entry(&STACKS, key, &STACK_ZERO) else {
        count(Counter::LostStacks);
        return Captured::NONE;
    };
    python::walk_in(tag, &py, task, buf);
    let site = wait_site(regs, buf);
    // The frame slots are free until the stack is known to be needed: the
    // check reads its words through them.
    let known = is_known(tag.tgid, site, regs, &mut buf.ips);
    buf.len = if known {
        0
    } else {
        user_ips(ctx, &mut buf.ips) as u64 * 8
    };
    if !known {
        copy_user_stack(tag, tid, key, regs);
    }
    Captured {
        site,
        known,
        in_slot: true,
    }
}

/// [`capture`] in a process with no interpreter frames to keep. A wait at
/// a known site then needs nothing of the thread's slot: the check reads
/// through a per-CPU window, and the slot (a hash lookup, a large part of
/// a switch) is taken only for a stack to keep.
#[inline(always)]
fn capture_native<C: EbpfContext>(
    ctx: &C,
    tag: &mut ThreadTag,
    tid: u32,
    key: u32,
    regs: *const u8,
) -> Captured {
    let site = native_site(regs);
    // Index 0 of a per-CPU array always exists; missing, the site is
    // taken as unknown and its stack kept.
    let known = match SWITCH_WINDOW.get_ptr_mut(0) {
        // SAFETY: per-CPU value; nothing else runs on this CPU during a
        // context switch (interrupts are off).
        Some(w) => is_known(tag.tgid, site, regs, unsafe { &mut *w }),
        None => false,
    };
    if known {
        return Captured {
            site,
            known,
            in_slot: false,
        };
    }
    let Some(buf) = thread_entry(&STACKS, key, &STACK_ZERO) else {
        count(Counter::LostStacks);
        return Captured::NONE;
    };
    buf.py_len = 0;
    buf.len = user_ips(ctx, &mut buf.ips) as u64 * 8;
    copy_user_stack(tag, tid, key, regs);
    Captured {
        site,
        known,
        in_slot: true,
    }
}

/// What [`capture`] kept of a wait.
#[derive(Clone, Copy)]
pub(crate) struct Captured {
    /// Its call site (see [`wait_site`]); 0 when nothing was kept.
    pub site: u64,
    /// User space has the site's native stack: none was taken.
    pub known: bool,
    /// The thread's `STACKS` slot holds the wait's frames (interpreter
    /// frames, or the native stack of an unknown site).
    pub in_slot: bool,
}

impl Captured {
    const NONE: Captured = Captured {
        site: 0,
        known: false,
        in_slot: false,
    };
}

/// Whether user space has the native stack of a wait at `site` of `tgid`
/// (see [`site_check`]); `window` is scratch.
#[inline(always)]
fn is_known(tgid: u32, site: u64, regs: *const u8, window: &mut [u64; MAX_FRAMES]) -> bool {
    match site_check(tgid, site, regs, window) {
        Check::Match => true,
        Check::Mismatch => false,
        Check::Absent | Check::Refresh => site_recently_sent(tgid, site),
    }
}

/// The `USER_STACKS` entry at `key` (a TID's stack slot, or a TID with
/// `STRICT_COPY_KEY` for its strict calls), created on first use.
#[inline(always)]
fn user_stack_entry(key: u32) -> Option<&'static mut UserStack> {
    // A thread's strict calls (its other key) never run during its
    // switches, so the entry is still one thread's at a time.
    thread_entry(&USER_STACKS, key, &USER_STACK_ZERO)
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

/// The call site of a wait (user registers at `regs`, the CPython frames
/// in `buf`): its `ip` and `sp` and each CPython frame's (code,
/// instruction). Which native callers led there is checked apart, against
/// the words user space found them in (`site_check`).
#[inline(always)]
pub(crate) fn wait_site(regs: *const u8, buf: &StackBuf) -> u64 {
    let mut h = native_site(regs);
    for i in 0..MAX_PY_FRAMES {
        if i as u64 >= buf.py_len {
            break;
        }
        let f = buf.py[i];
        h = mix(mix(h, f.code), f.instr);
    }
    h
}

/// [`wait_site`] of a wait with no interpreter frames: its `ip` and `sp`.
#[inline(always)]
fn native_site(regs: *const u8) -> u64 {
    let o = off();
    let sp: u64 = kread(regs, o.pt_regs_sp);
    mix(mix(0x6a09_e667_f3bc_c908, kread(regs, o.pt_regs_ip)), sp)
}

/// What `KNOWN_SITES` says of a wait.
enum Check {
    /// User space has the site's stack, with these callers.
    Match,
    /// Another caller's stack is known there: this one is not.
    Mismatch,
    /// These callers, but frames still to be named (`SITE_REFRESH`).
    Refresh,
    /// Nothing known yet.
    Absent,
}

/// Checks a wait at `site` of process `tgid` (user registers at `regs`)
/// against what user space knows of the site: whether its callers' return
/// addresses are where user space found them. `window` is scratch.
#[inline(always)]
fn site_check(tgid: u32, site: u64, regs: *const u8, window: &mut [u64; MAX_FRAMES]) -> Check {
    let Some(check) = KNOWN_SITES.get_ptr(SiteKey {
        tgid,
        _pad: 0,
        site,
    }) else {
        return Check::Absent;
    };
    // SAFETY: map value pointer, valid for this program run; user space
    // replaces values whole, and a torn read only fails the check.
    let check = unsafe { &*check };
    let sp: u64 = kread(regs, off().pt_regs_sp);
    // The words lie in ascending order (sites.rs), mostly within a few
    // hundred bytes: one read of the span that holds them, rather than a
    // helper call per word, which cost ~100 ns each on a VM and made this
    // check the dearest part of a switch. Words past the window, or all of
    // them when the span cannot be read, are read one by one.
    let n = check.n as usize;
    let first = check.offs[0] as u64;
    let last = check.offs[n.saturating_sub(1) & (SITE_CHECKS - 1)] as u64;
    let span = (last + 8).saturating_sub(first);
    let want = if span > WINDOW_BYTES as u64 {
        WINDOW_BYTES as u64
    } else {
        span
    };
    let len = if n > 0 && read_user(window.as_mut_ptr() as *mut u8, want as usize, sp + first) {
        want
    } else {
        0
    };
    for i in 0..SITE_CHECKS {
        if i >= n {
            break;
        }
        let at = check.offs[i] as u64;
        let rel = at.wrapping_sub(first);
        let idx = (rel / 8) as usize;
        let word: u64 = if rel + 8 <= len && idx < MAX_FRAMES {
            window[idx]
        } else {
            uread(sp + at)
        };
        if word != check.vals[i] {
            count(Counter::SiteMisses);
            return Check::Mismatch;
        }
    }
    if check.flags & SITE_REFRESH != 0 {
        return Check::Refresh;
    }
    count(Counter::SiteHits);
    Check::Match
}

/// Bytes of stack [`site_check`] reads in one call.
const WINDOW_BYTES: usize = MAX_FRAMES * 8;

/// How long a site whose stacks were sent counts as known before user
/// space has said so: far longer than it takes to read the record, short
/// enough that a site user space could not use is sent again soon.
const SENT_WINDOW_NS: u64 = 1_000_000_000;

/// The stacks of a wait at `site` of process `tgid` were just sent.
#[inline(always)]
pub(crate) fn site_sent(tgid: u32, site: u64) {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // Full (an LRU map evicts) cannot fail; anything else only means the
    // next wait there sends its stacks again.
    let _ = SENT_SITES.insert(
        SiteKey {
            tgid,
            _pad: 0,
            site,
        },
        now,
        0,
    );
}

/// Whether the stacks of a wait at `site` of `tgid` were sent within
/// `SENT_WINDOW_NS`. Its callers are checked only if user space already
/// said where they are (`site_check`): until then a second caller at the
/// same site would pass for the first.
#[inline(always)]
fn site_recently_sent(tgid: u32, site: u64) -> bool {
    // SAFETY: map value read, copied out at once.
    let Some(sent) = (unsafe {
        SENT_SITES.get(SiteKey {
            tgid,
            _pad: 0,
            site,
        })
    })
    .copied() else {
        return false;
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.saturating_sub(sent) < SENT_WINDOW_NS {
        count(Counter::SiteHits);
        return true;
    }
    false
}

/// The call site of the current syscall (user registers at `regs`, the
/// CPython frames in `buf`), for strict counts: [`wait_site`] and the
/// return addresses of the frame-pointer chain while it stays on the
/// stack. See `StrictKey`.
#[inline(always)]
pub(crate) fn site_hash(regs: *const u8, buf: &StackBuf) -> u64 {
    let o = off();
    let sp: u64 = kread(regs, o.pt_regs_sp);
    let mut h = wait_site(regs, buf);
    // Only frames whose pointer lies above the previous one on the stack:
    // in code built without frame pointers rbp holds data, and following
    // it would read values that change from call to call.
    let mut fp: u64 = kread(regs, o.pt_regs_bp);
    for _ in 0..SITE_FRAMES {
        if fp <= sp || fp - sp >= STACK_WINDOW || fp & 7 != 0 {
            break;
        }
        let ret: u64 = uread(fp + 8);
        if !(0x1000..USER_SPACE_END).contains(&ret) {
            break;
        }
        h = mix(h, ret);
        let next: u64 = uread(fp);
        if next <= fp {
            break;
        }
        fp = next;
    }
    h
}

/// One step of the site hash (a multiply-xorshift mix).
#[inline(always)]
fn mix(h: u64, x: u64) -> u64 {
    let h = (h ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 29)
}
