//! The idle-wait test: is a loop thread's syscall its runtime's wait for
//! work (idle), or something that blocks the loop?
//!
//! Used by `sched_switch` (a wait that sleeps) and, with `--strict`, by
//! `sys_enter` (every call, so that a wait that returns at once also ends
//! a busy period).

use blockwatch_common::{
    ThreadTag,
    x86_64::{NR_FUTEX, NR_IO_URING_ENTER, is_epoll_wait, is_futex_wait},
};

use crate::{
    maps::{PARKS, off},
    read::kread,
};

/// What a syscall is to a loop thread.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// A wait on the loop's own epoll fd: idle.
    Epoll,
    /// A futex wait on the thread's runtime park: idle.
    Park,
    /// `io_uring_enter`: taken as idle, but no sign of a loop.
    Ring,
    /// A futex wait on another address: a lock, or a park user space has
    /// yet to learn.
    Futex,
    /// Anything else, another epoll instance's wait included.
    Other,
}

impl Wait {
    #[inline(always)]
    pub(crate) fn is_idle(self) -> bool {
        matches!(self, Wait::Epoll | Wait::Park | Wait::Ring)
    }
}

/// Classifies syscall `nr` of thread `tid`, whose first argument is `arg0`
/// and whose user registers are at `regs` (the futex op is read from
/// there only for a futex).
#[inline(always)]
pub(crate) fn classify(tag: &ThreadTag, tid: u32, nr: i64, arg0: u64, regs: *const u8) -> Wait {
    if is_epoll_wait(nr) {
        return if tag.loop_epfd >= 0 && arg0 as i32 == tag.loop_epfd {
            Wait::Epoll
        } else {
            Wait::Other
        };
    }
    if nr == NR_IO_URING_ENTER {
        return Wait::Ring;
    }
    // The op is read only for futex(2): most waits are not.
    let op = if nr == NR_FUTEX {
        kread(regs, off().pt_regs_si)
    } else {
        0
    };
    if !is_futex_wait(nr, op) {
        return Wait::Other;
    }
    // SAFETY: map value read, compared at once.
    match unsafe { PARKS.get(tid) } {
        Some(park) if *park == arg0 => Wait::Park,
        _ => Wait::Futex,
    }
}

/// The `struct file` that `task`'s descriptor `fd` holds; 0 when none.
#[inline(always)]
pub(crate) fn fd_file(task: *const u8, fd: i32) -> u64 {
    if fd < 0 {
        return 0;
    }
    let o = off();
    let files = kread::<u64>(task, o.task_files) as *const u8;
    if files.is_null() {
        return 0;
    }
    let fdt = kread::<u64>(files, o.files_fdt) as *const u8;
    if fdt.is_null() || fd as u32 >= kread::<u32>(fdt, o.fdtable_max_fds) {
        return 0;
    }
    let fds = kread::<u64>(fdt, o.fdtable_fd) as *const u8;
    if fds.is_null() {
        return 0;
    }
    kread(fds, fd as u32 * 8)
}

/// What became of the loop a thread was found to run, judged by the file
/// its epoll fd held then.
pub(crate) enum LoopFd {
    /// The fd still holds the loop's epoll instance.
    Same,
    /// Another epoll instance took the fd (`asyncio.run` again, reusing the
    /// number): a new loop in the same thread.
    Replaced(u64),
    /// The fd was closed or holds something else: the loop has ended
    /// (interpreter finalization, a script after `asyncio.run`).
    Ended,
}

#[inline(always)]
pub(crate) fn loop_fd(tag: &ThreadTag, task: *const u8) -> LoopFd {
    let file = fd_file(task, tag.loop_epfd);
    if file == tag.loop_file {
        LoopFd::Same
    } else if file != 0 && file_ops(file) == tag.loop_fops {
        LoopFd::Replaced(file)
    } else {
        LoopFd::Ended
    }
}

/// A file's `f_op`: the same for every epoll instance.
#[inline(always)]
pub(crate) fn file_ops(file: u64) -> u64 {
    kread(file as *const u8, off().file_f_op)
}
