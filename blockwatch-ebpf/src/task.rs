//! The task lifecycle keeps the tags right: new threads of a watched
//! process are tagged before they first run, exec resets what was learned,
//! exit forgets the TID so a reused one starts clean.
//!
//! Map removals here ignore their result on purpose: a key that is absent
//! (the common case) is already what they want.

use aya_ebpf::helpers::bpf_get_current_comm;
use blockwatch_common::{COMM_MATCH_MAX, Counter, RecordKind, ThreadTag, WatchRule, tag_for};

use crate::{
    episode, ids,
    maps::{self, COMM_MATCHES, PARKS, PYPROCS, WATCHED, comm_matches, count, notify_all_execs},
    read::Regs,
    record, stack,
};

/// `clone` flag: the new task is a thread of its parent's process.
const CLONE_THREAD: u64 = 0x0001_0000;

/// Runs in the parent, before the child `task` is first scheduled.
#[inline(always)]
pub(crate) fn on_newtask(task: *const u8, clone_flags: u64, how: Regs) {
    // Outside blockwatch's PID namespace, neither is watched.
    let Some((parent_tgid, _)) = ids::current() else {
        return;
    };
    let child = ids::tid_of(task, how);
    if child == 0 {
        return;
    }
    // SAFETY: map value read, copied out at once.
    let rule = unsafe { WATCHED.get(parent_tgid) }.copied();
    let is_thread = clone_flags & CLONE_THREAD != 0;
    let (tgid, rule) = match rule {
        Some(rule) if is_thread => (parent_tgid, Some(rule)),
        Some(rule) if rule.follow_children != 0 => {
            if WATCHED.insert(child, rule, 0).is_err() {
                count(Counter::LostTags);
            }
            (child, Some(rule))
        }
        _ => {
            if !is_thread {
                // A recycled PID must not inherit an old process's watch.
                let _ = WATCHED.remove(child);
            }
            (0, None)
        }
    };
    let _ = PARKS.remove(child);
    episode::forget(child);
    crate::strict::forget(child);
    retag(child, tgid, rule, !is_thread);
}

/// Gives `tid` the tag `rule` calls for, or none.
#[inline(always)]
fn retag(tid: u32, tgid: u32, rule: Option<WatchRule>, main_thread: bool) {
    match rule.map(|r| tag_for(&r, main_thread)) {
        Some(t) if t != 0 => {
            if !maps::tag(tid, ThreadTag::new(tgid, t)) {
                count(Counter::LostTags);
            }
        }
        _ => {
            maps::untag(tid);
        }
    }
}

/// The current process replaced its image; `old_pid` is the TID that
/// called exec (it becomes the TGID).
#[inline(always)]
pub(crate) fn on_exec(old_pid: u32) {
    let Some((tgid, _)) = ids::current() else {
        return;
    };
    // `old_pid` is a host PID. Inside a PID namespace the exec'ing thread's
    // old number there is not at hand (it now belongs to the departed
    // leader), so its cleanup is left to that TID's next task_newtask,
    // which retags it.
    let old_pid = if ids::in_host_namespace() {
        old_pid
    } else {
        tgid
    };
    // A new program: what was learned about the old one no longer holds.
    if old_pid != tgid {
        maps::untag(old_pid);
        stack::forget(old_pid);
    }
    stack::forget(tgid);
    let _ = PARKS.remove(tgid);
    episode::forget(tgid);
    crate::strict::forget(tgid);
    episode::forget(old_pid);
    crate::strict::forget(old_pid);
    let _ = PYPROCS.remove(tgid);
    // SAFETY: map value read, copied out at once.
    let mut rule = unsafe { WATCHED.get(tgid) }.copied();
    if rule.is_none()
        && let Some(by_name) = rule_by_name()
    {
        if WATCHED.insert(tgid, by_name, 0).is_ok() {
            rule = Some(by_name);
        } else {
            count(Counter::LostTags);
        }
    }
    if rule.is_some() {
        retag(tgid, tgid, rule, true);
    }
    if rule.is_some() || notify_all_execs() {
        record::send_task(RecordKind::Exec, tgid, old_pid, 0);
    }
}

/// The rule a process-name pattern gives the current task's new name:
/// the first including pattern that matches, unless an excluding one
/// does. Matched here, a process that blocks right after exec is watched
/// already; user space, which reads the exec notice later, would miss it.
#[inline(always)]
fn rule_by_name() -> Option<WatchRule> {
    let n = comm_matches();
    if n == 0 {
        return None;
    }
    let comm = bpf_get_current_comm().ok()?;
    let mut found = None;
    for i in 0..COMM_MATCH_MAX {
        if i >= n {
            break;
        }
        let Some(m) = COMM_MATCHES.get(i) else {
            break;
        };
        if m.matches(&comm) {
            if m.exclude != 0 {
                return None;
            }
            if found.is_none() {
                found = Some(m.rule);
            }
        }
    }
    found
}

/// The current task exits; `group_dead` when it is the process's last.
#[inline(always)]
pub(crate) fn on_exit(group_dead: bool) {
    let Some((tgid, tid)) = ids::current() else {
        return;
    };
    // SAFETY: no preconditions; the task is only read through
    // bpf_probe_read_kernel.
    let task = unsafe { aya_ebpf::helpers::generated::bpf_get_current_task() } as *const u8;
    episode::thread_exits(tid, task);
    let was_tagged = maps::untag(tid);
    episode::forget(tid);
    crate::strict::forget(tid);
    if was_tagged {
        let _ = PARKS.remove(tid);
    }
    // Whether or not it is still tagged (user space may have untagged it):
    // a copy is 32 KiB that would otherwise stay until the TID is reused.
    stack::forget(tid);
    if group_dead {
        let _ = PYPROCS.remove(tgid);
    }
    let watched = group_dead && WATCHED.remove(tgid).is_ok();
    if was_tagged || watched {
        record::send_task(RecordKind::Exit, tgid, tid, watched as u32);
    }
}
