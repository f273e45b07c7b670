//! Each event loop's iteration clock, found from user space: a value the
//! runtime itself rewrites once per loop iteration
//! ([`blockwatch_common::LoopClock`]). The kernel reads it at each CPU
//! sample and each switch-out of the loop thread; a changed value means an
//! iteration ended, even on a saturated loop whose `epoll_wait` never
//! sleeps. It is found once per loop thread, when the kernel reports the
//! thread as a new loop (the thread is then asleep in its idle wait).
//!
//! - libuv (`clock/libuv.rs`): the iteration count of the loop the thread
//!   polls (`CLOCK_UV_COUNT`, libuv ≥ 1.45), else its `uv_loop_t.time`
//!   (`CLOCK_WORD`). Node's main thread runs the default loop (in its
//!   executable, `libnode.so` or `libuv.so`); a Node worker thread runs its
//!   own, on its stack; uvloop `malloc`s its loops.
//! - CPython asyncio (`CLOCK_PY_LOCAL`, see
//!   `python/clock.rs`): the `end_time` local of
//!   `BaseEventLoop._run_once`.
//!
//! - tokio (`clock/tokio.rs`): its `CONTEXT` thread-local, which every
//!   task poll rewrites (`CLOCK_TLS_BLOCK`), read at its offset from the
//!   thread pointer.
//!
//! Not found, so ended only at idle waits: loops of other runtimes.
//!
//! The kernel's reading of a `CLOCK_PY_LOCAL` clock gives 0 while the
//! iteration is in its select (the local is not set yet) and the time of
//! the iteration once its callbacks run: a change either way is an
//! iteration boundary.

mod libuv;
mod tokio;

use blockwatch_common::{CLOCK_PY_LOCAL, CLOCK_TLS_BLOCK, CLOCK_UV_COUNT, CLOCK_WORD, LoopClock};

use super::python::{self, PyProcess};
use crate::procfs::mem;

/// The iteration clock of the event loop that thread `tid` of process
/// `pid` runs, whose idle wait is on epoll fd `epfd`; `python` is the
/// process's interpreter when it runs CPython. None when none is known:
/// the kernel then ends episodes only at idle waits.
pub fn find(pid: u32, tid: u32, epfd: i32, python: Option<&PyProcess>) -> Option<LoopClock> {
    if let Some(py) = python {
        // CPython's loops are asyncio's or uvloop's; a tokio inside an
        // extension module has no static TLS to read.
        return python::clock::find(pid, tid, py).or_else(|| libuv::find(pid, tid, epfd));
    }
    tokio::find(pid).or_else(|| libuv::find(pid, tid, epfd))
}

/// The clock's current value in thread `tid`, read from user space exactly
/// as the kernel reads it (its twin, for tests and for checking a clock
/// before handing it over): `CLOCK_WORD` and `CLOCK_UV_COUNT` the u64 at
/// `addr`;
/// `CLOCK_PY_LOCAL` the float bits of the innermost `code` frame's local at
/// `offset`, 0 while that local is unset. None when it cannot be read (the
/// process is gone, the thread runs no such frame, or no clock), and for
/// `CLOCK_TLS_BLOCK`, whose thread pointer only the kernel sees.
pub fn read(pid: u32, tid: u32, clock: &LoopClock, python: Option<&PyProcess>) -> Option<u64> {
    match clock.kind {
        CLOCK_WORD | CLOCK_UV_COUNT => mem::read_u64(pid, clock.addr),
        CLOCK_PY_LOCAL => python::clock::read(pid, tid, python?, clock),
        _ => None,
    }
}

/// What the clock is, for a log line.
pub fn describe(clock: &LoopClock) -> &'static str {
    match clock.kind {
        CLOCK_WORD => "libuv's loop time",
        CLOCK_UV_COUNT => "libuv's iteration count",
        CLOCK_PY_LOCAL => "asyncio's _run_once end_time",
        CLOCK_TLS_BLOCK => "tokio's CONTEXT thread-local",
        _ => "unknown",
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the kernel's clock
/// (`bpf_ktime_get_ns`), which episode times are in, and the one both
/// libuv and asyncio read.
pub fn monotonic_ns() -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return None;
    }
    let secs = u64::try_from(ts.tv_sec).ok()?;
    secs.checked_mul(1_000_000_000)?
        .checked_add(u64::try_from(ts.tv_nsec).ok()?)
}

/// The epoll fd thread `tid` of `pid` is asleep on now, from
/// `/proc/PID/task/TID/syscall` (`epoll_wait`, `epoll_pwait` or
/// `epoll_pwait2`, the fd its first argument); None when it is not asleep
/// in one. The kernel learns a loop's fd the same way, from the wait it
/// sleeps in.
pub fn epoll_fd_waited(pid: u32, tid: u32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    parse_epoll_wait(&text)
}

/// The user stack pointer of a thread asleep in a syscall, from
/// `/proc/PID/task/TID/syscall` (`nr args×6 sp pc`).
fn syscall_sp(pid: u32, tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    parse_sp(&text)
}

fn parse_sp(text: &str) -> Option<u64> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    if fields.len() != 9 {
        return None; // running, or not in a syscall
    }
    u64::from_str_radix(fields.get(7)?.strip_prefix("0x")?, 16).ok()
}

fn parse_epoll_wait(text: &str) -> Option<i32> {
    let mut fields = text.split_whitespace();
    let nr: i64 = fields.next()?.parse().ok()?;
    if !blockwatch_common::x86_64::is_epoll_wait(nr) {
        return None;
    }
    let fd = fields.next()?.strip_prefix("0x")?;
    i32::try_from(u64::from_str_radix(fd, 16).ok()?).ok()
}

#[cfg(test)]
mod tests;
