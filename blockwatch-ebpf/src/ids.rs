//! Process and thread IDs as blockwatch's user space names them.
//!
//! The kernel's `pid`/`tgid` (and `bpf_get_current_pid_tgid`) are the host
//! PID namespace's numbers. A blockwatch that runs inside a PID namespace
//! (a container, a systemd-nspawn machine, a pod without `hostPID`) reads
//! `/proc` and writes the tag maps with its own namespace's numbers, so
//! every ID the programs use as a key or send up is translated to that
//! namespace: a task's `struct pid` holds its number at every level from
//! the host's down to its own, and the level of blockwatch's namespace is
//! the one whose namespace inode is `PID_NS_INUM`. Tasks outside that
//! namespace have no number there: they are not seen at all, exactly as
//! blockwatch's `/proc` does not show them.
//!
//! In the host namespace (`PID_NS_INUM` 0) the host numbers are used as
//! they are, at no cost.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_current_task},
    macros::map,
    maps::Array,
};

use crate::{
    maps::off,
    read::{Regs, kread},
};

/// Inode number of blockwatch's PID namespace, or 0 for the host's; set by
/// user space before load.
#[unsafe(no_mangle)]
static PID_NS_INUM: u32 = 0;

/// The absolute level of blockwatch's PID namespace plus one, written by
/// the first program that finds it (every task visible in the namespace has
/// it at the same level); 0 while unknown.
#[map]
static PID_NS_LEVEL: Array<u32> = Array::with_max_entries(1, 0);

/// Deepest namespace level looked for (the kernel allows 32; containers in
/// a pod in a VM's container are 3).
const MAX_LEVEL: u32 = 8;

#[inline(always)]
fn ns_inum() -> u32 {
    // SAFETY: a plain read of a global frozen before load.
    unsafe { core::ptr::read_volatile(&PID_NS_INUM) }
}

/// blockwatch runs in the host's PID namespace: IDs need no translation.
#[inline(always)]
pub(crate) fn in_host_namespace() -> bool {
    ns_inum() == 0
}

/// The current task's (TGID, TID), or `None` when it is outside
/// blockwatch's PID namespace.
#[inline(always)]
pub(crate) fn current() -> Option<(u32, u32)> {
    if ns_inum() == 0 {
        let pid_tgid = bpf_get_current_pid_tgid();
        return Some(((pid_tgid >> 32) as u32, pid_tgid as u32));
    }
    // SAFETY: no preconditions; the task pointer is only read through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    of_task(task)
}

/// The current task's TID; 0 (the idle task's, never tagged) when it is
/// outside the namespace.
#[inline(always)]
pub(crate) fn current_tid() -> u32 {
    if ns_inum() == 0 {
        return bpf_get_current_pid_tgid() as u32;
    }
    // SAFETY: as in `current`.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    ns_pid(task).unwrap_or(0)
}

/// `task`'s TID (`task` one of the program's own pointers, see `Regs`); 0
/// when it is outside the namespace.
#[inline(always)]
pub(crate) fn tid_of(task: *const u8, how: Regs) -> u32 {
    if ns_inum() == 0 {
        return how.field(task, off().task_pid);
    }
    ns_pid(task).unwrap_or(0)
}

/// `task`'s (TGID, TID), or `None` when it is outside the namespace.
#[inline(always)]
pub(crate) fn of_task(task: *const u8) -> Option<(u32, u32)> {
    let o = off();
    if ns_inum() == 0 {
        return Some((kread(task, o.task_tgid), kread(task, o.task_pid)));
    }
    let tid = ns_pid(task)?;
    let leader = kread::<u64>(task, o.task_group_leader) as *const u8;
    Some((ns_pid(leader)?, tid))
}

/// `task`'s PID in blockwatch's namespace.
#[inline(always)]
fn ns_pid(task: *const u8) -> Option<u32> {
    if task.is_null() {
        return None;
    }
    let pid = kread::<u64>(task, off().task_thread_pid) as *const u8;
    if pid.is_null() {
        return None;
    }
    let level: u32 = kread(pid, off().pid_level);
    if let Some(known) = PID_NS_LEVEL.get(0).copied()
        && known != 0
    {
        return if level + 1 < known {
            None
        } else {
            nr_at(pid, known - 1)
        };
    }
    for l in 0..MAX_LEVEL {
        if l > level {
            break;
        }
        if let Some(nr) = nr_at(pid, l) {
            if let Some(slot) = PID_NS_LEVEL.get_ptr_mut(0) {
                // SAFETY: the map value pointer is valid for this run; any
                // racing writer stores the same level.
                unsafe { *slot = l + 1 };
            }
            return Some(nr);
        }
    }
    None
}

/// The number at level `l` of `struct pid` `pid`, when that level is
/// blockwatch's namespace.
#[inline(always)]
fn nr_at(pid: *const u8, l: u32) -> Option<u32> {
    let o = off();
    // SAFETY: only an address computation; the reads below fault safely.
    let upid = unsafe { pid.add((o.pid_numbers + l * o.upid_size) as usize) };
    let ns = kread::<u64>(upid, o.upid_ns) as *const u8;
    if ns.is_null() || kread::<u32>(ns, o.pidns_inum) != ns_inum() {
        return None;
    }
    Some(kread(upid, o.upid_nr))
}
