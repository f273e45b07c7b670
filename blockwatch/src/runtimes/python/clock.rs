//! asyncio's iteration clock (`CLOCK_PY_LOCAL`): the `end_time` local of
//! `BaseEventLoop._run_once`.
//!
//! `_run_once` is one loop iteration: it waits in the selector, then
//! computes `end_time = self.time() + self._clock_resolution` once, then
//! runs the ready callbacks. Each call starts with the local unset (NULL),
//! and the float stored there holds the loop's monotonic time, so its value
//! differs in every iteration and stays put while one callback runs, however
//! long. (Its address does not: freed floats are reused, hence the value.)
//!
//! The `_run_once` code object is found by walking the loop thread's frames
//! once from user space, as the kernel walks them (the thread is asleep in
//! the selector's `epoll_wait`, called from `_run_once`). Every asyncio
//! loop of the process runs that one code object, so the clock holds for
//! each of them; the kernel finds the frame in whichever thread it samples.

use blockwatch_common::{CLOCK_PY_LOCAL, LoopClock};

use super::PyProcess;
use super::code::CodeReader;
use super::mem::{plausible_object, read_mem, read_u64};
use super::offsets::{ABSENT, FLOAT_VALUE, LocalsLayout};
use crate::procfs;

/// Thread states looked at (the kernel's own walk stops at 64 too).
const MAX_THREADS: usize = 64;
/// Frames looked at per thread: `_run_once` sits near the bottom of a
/// loop thread's stack, under whatever the current callback calls.
const MAX_FRAMES: usize = 256;
/// CPython 3.12+: a frame pushed by C code, not Python code.
const FRAME_OWNED_BY_CSTACK: u8 = 3;
/// glibc's `struct pthread.tid` on x86-64 (the TCB header, then a list
/// head): a 3.10 thread state records its thread's `pthread_t` (the
/// address of that struct) but not its TID.
const GLIBC_PTHREAD_TID: u64 = 720;

/// The function and file that make a frame one of asyncio's iterations.
const RUN_ONCE_QUALNAME: &str = "BaseEventLoop._run_once";
const RUN_ONCE_NAME_310: &str = "_run_once";
const BASE_EVENTS_FILE: &str = "asyncio/base_events.py";
const END_TIME: &str = "end_time";

/// The clock of the asyncio loop that thread `tid` of `pid` runs: None when
/// the thread has no `_run_once` frame (no asyncio loop, or uvloop's, which
/// iterates in C).
pub(crate) fn find(pid: u32, tid: u32, py: &PyProcess) -> Option<LoopClock> {
    let locals = LocalsLayout::for_version(py.version)?;
    let tstate = tstate_of(pid, tid, py, &locals)?;
    let mut reader = CodeReader::new();
    let (frame, code) = frames(pid, py, tstate)
        .into_iter()
        .find(|&(_, code)| is_run_once(&mut reader, pid, py, code))?;
    let names = reader.local_names(pid, py, code)?;
    let index = names.iter().position(|n| n == END_TIME)?;
    Some(LoopClock {
        kind: CLOCK_PY_LOCAL,
        // Where the `_run_once` frame is now: it stays there iteration
        // after iteration, and the kernel, whose walks stop at a depth a
        // busy server's callbacks exceed, starts from it.
        addr: frame,
        code,
        offset: u64::from(locals.frame_localsplus) + 8 * index as u64,
        value_offset: FLOAT_VALUE,
        ..LoopClock::default()
    })
}

/// The clock's value in thread `tid`, read as the kernel reads it: the
/// innermost frame running `clock.code`, the object pointer at
/// `clock.offset` in it, the 8 bytes at `clock.value_offset` in that
/// object; 0 while the local is unset (the iteration is in its select).
/// None when the thread runs no such frame.
pub(crate) fn read(pid: u32, tid: u32, py: &PyProcess, clock: &LoopClock) -> Option<u64> {
    let locals = LocalsLayout::for_version(py.version)?;
    let tstate = tstate_of(pid, tid, py, &locals)?;
    let (frame, _) = frames(pid, py, tstate)
        .into_iter()
        .find(|&(_, code)| code == clock.code)?;
    let object = read_u64(pid, frame.checked_add(clock.offset)?)?;
    if object == 0 {
        return Some(0);
    }
    read_u64(pid, object.checked_add(clock.value_offset)?)
}

fn is_run_once(reader: &mut CodeReader, pid: u32, py: &PyProcess, code: u64) -> bool {
    let Some(f) = reader.frame(pid, py, code, 0) else {
        return false;
    };
    let name = if py.version.1 == 10 {
        RUN_ONCE_NAME_310
    } else {
        RUN_ONCE_QUALNAME
    };
    f.function == name && f.file.ends_with(BASE_EVENTS_FILE)
}

/// The thread state of thread `tid`, told by its TID as the process's own
/// PID namespace numbers it.
fn tstate_of(pid: u32, tid: u32, py: &PyProcess, locals: &LocalsLayout) -> Option<u64> {
    let o = &py.offsets;
    let ns_tid = u64::from(procfs::ns_pid(tid));
    let interp = read_u64(
        pid,
        py.runtime_addr + u64::from(o.runtime_interpreters_head),
    )?;
    let mut tstate = read_u64(pid, interp.checked_add(u64::from(o.interp_threads_head))?)?;
    for _ in 0..MAX_THREADS {
        if !plausible_object(tstate) {
            return None;
        }
        let thread_tid = match locals.tstate_native_thread_id {
            Some(off) => read_u64(pid, tstate + u64::from(off)),
            None => read_u64(pid, tstate + u64::from(o.tstate_thread_id))
                .and_then(|pthread| read_u64(pid, pthread.checked_add(GLIBC_PTHREAD_TID)?))
                .map(|v| v & 0xffff_ffff),
        };
        if thread_tid == Some(ns_tid) {
            return Some(tstate);
        }
        tstate = read_u64(pid, tstate + u64::from(o.tstate_next))?;
    }
    None
}

/// A thread state's frames, innermost first: (frame address, code object),
/// without C-stack shims.
fn frames(pid: u32, py: &PyProcess, tstate: u64) -> Vec<(u64, u64)> {
    let o = &py.offsets;
    let mut out = Vec::new();
    let Some(mut frame) = read_u64(pid, tstate + u64::from(o.tstate_frame)) else {
        return out;
    };
    if o.cframe_current_frame != ABSENT && frame != 0 {
        frame = read_u64(pid, frame + u64::from(o.cframe_current_frame)).unwrap_or(0);
    }
    for _ in 0..MAX_FRAMES {
        if !plausible_object(frame) {
            break;
        }
        let mut owner = [0u8];
        let shim = o.frame_owner != ABSENT
            && read_mem(pid, frame + u64::from(o.frame_owner), &mut owner)
            && owner[0] == FRAME_OWNED_BY_CSTACK;
        if !shim && let Some(code) = read_u64(pid, frame + u64::from(o.frame_code)) {
            out.push((frame, code));
        }
        match read_u64(pid, frame + u64::from(o.frame_previous)) {
            Some(prev) => frame = prev,
            None => break,
        }
    }
    out
}
