//! The CPython walk: the interpreter frames of the current thread, when
//! its process runs an interpreter user space described (`PYPROCS`).
//! Written once for every detector that records stacks.

use aya_ebpf::{helpers::generated::bpf_get_current_task, maps::PerCpuArray};
use blockwatch_common::{MAX_PY_FRAMES, PyFrameRef, PyProc, StackBuf, ThreadTag};

use crate::{
    maps::{PYPROCS, off, scratch},
    read::{kread, uread},
};

/// CPython 3.12+: a frame pushed by C code (a shim), not Python code.
const FRAME_OWNED_BY_CSTACK: u8 = 3;

/// The CPython frames of `task` (`current`) into `buf.py`.
#[inline(always)]
pub(crate) fn walk(tag: &mut ThreadTag, task: *const u8, buf: &mut StackBuf) {
    buf.py_len = 0;
    if let Some(py) = process(tag) {
        walk_in(tag, &py, task, buf);
    }
}

/// The interpreter of `tag`'s process, when it runs CPython.
#[inline(always)]
pub(crate) fn process(tag: &ThreadTag) -> Option<PyProc> {
    // SAFETY: map value read, copied out at once.
    unsafe { PYPROCS.get(tag.tgid) }.copied()
}

/// [`walk`] in a process known to run interpreter `py`.
#[inline(always)]
pub(crate) fn walk_in(tag: &mut ThreadTag, py: &PyProc, task: *const u8, buf: &mut StackBuf) {
    let fsbase: u64 = kread(task, off().task_fsbase);
    buf.py_len = py_walk(tag, py, fsbase, buf) as u64;
}

/// The CPython frames of the current thread, walked into the program's
/// own scratch `map`; None only if the scratch is missing (it cannot be).
// The buffer is the map's (per-CPU) value, not part of the reference.
#[allow(clippy::mut_from_ref)]
#[inline(always)]
pub(crate) fn current_frames(
    map: &'static PerCpuArray<StackBuf>,
    tag: &mut ThreadTag,
) -> Option<&'static mut StackBuf> {
    let buf = scratch(map)?;
    // SAFETY: no preconditions; the task is only read through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    walk(tag, task, buf);
    Some(buf)
}

/// The innermost CPython frame of the current thread (its memory is
/// readable); 0 when it has none or its thread state is not found.
#[inline(always)]
fn innermost(tag: &mut ThreadTag, py: &PyProc, fsbase: u64) -> u64 {
    let o = &py.offsets;
    // The thread's PyThreadState is found once by its pthread_t and then
    // only re-checked: a thread keeps its tstate for life.
    let mut ts = tag.py_tstate;
    if ts != 0 && uread::<u64>(ts + o.tstate_thread_id as u64) != fsbase {
        ts = 0;
    }
    if ts == 0 {
        ts = find_tstate(py, fsbase);
        if ts == 0 {
            return 0;
        }
        tag.py_tstate = ts;
    }
    let mut frame: u64 = uread(ts + o.tstate_frame as u64);
    if o.cframe_current_frame != u32::MAX && frame != 0 {
        frame = uread(frame + o.cframe_current_frame as u64);
    }
    frame
}

/// Walks the current thread's CPython frames into `buf.py`; returns how
/// many were found.
#[inline(always)]
fn py_walk(tag: &mut ThreadTag, py: &PyProc, fsbase: u64, buf: &mut StackBuf) -> usize {
    let o = &py.offsets;
    let mut frame = innermost(tag, py, fsbase);
    // One slot per frame, shims included (as code 0, skipped by user
    // space): a count that diverged per path would defeat state pruning.
    let mut n = 0usize;
    for slot in buf.py.iter_mut() {
        if frame == 0 {
            break;
        }
        let shim = o.frame_owner != u32::MAX
            && uread::<u8>(frame + o.frame_owner as u64) == FRAME_OWNED_BY_CSTACK;
        let code: u64 = uread(frame + o.frame_code as u64);
        let instr: u64 = if o.frame_instr_size == 4 {
            uread::<u32>(frame + o.frame_instr as u64) as u64
        } else {
            uread(frame + o.frame_instr as u64)
        };
        *slot = PyFrameRef {
            code: if shim { 0 } else { code },
            instr,
        };
        n += 1;
        frame = uread(frame + o.frame_previous as u64);
    }
    n
}

/// Whether CPython frame `frame` of `tag`'s process runs code object
/// `code`.
#[inline(always)]
pub(crate) fn frame_runs(tag: &ThreadTag, frame: u64, code: u64) -> bool {
    // SAFETY: map value read, copied out at once.
    let Some(py) = (unsafe { PYPROCS.get(tag.tgid) }).copied() else {
        return false;
    };
    uread::<u64>(frame + py.offsets.frame_code as u64) == code
}

/// The innermost frame of `task` (`current`) that runs code object `code`;
/// 0 when none of its first `MAX_PY_FRAMES` frames does.
#[inline(always)]
pub(crate) fn frame_running(tag: &mut ThreadTag, task: *const u8, code: u64) -> u64 {
    // SAFETY: map value read, copied out at once.
    let Some(py) = (unsafe { PYPROCS.get(tag.tgid) }).copied() else {
        return 0;
    };
    let fsbase: u64 = kread(task, off().task_fsbase);
    let o = &py.offsets;
    let mut frame = innermost(tag, &py, fsbase);
    for _ in 0..MAX_PY_FRAMES {
        if frame == 0 {
            break;
        }
        if uread::<u64>(frame + o.frame_code as u64) == code {
            return frame;
        }
        frame = uread(frame + o.frame_previous as u64);
    }
    0
}

/// The `PyThreadState` whose pthread_t is `fsbase`, in the first
/// interpreter's thread list; 0 when not found.
#[inline(always)]
fn find_tstate(py: &PyProc, fsbase: u64) -> u64 {
    let o = &py.offsets;
    let interp: u64 = uread(py.runtime + o.runtime_interpreters_head as u64);
    if interp == 0 {
        return 0;
    }
    let mut cur: u64 = uread(interp + o.interp_threads_head as u64);
    for _ in 0..64 {
        if cur == 0 {
            break;
        }
        if uread::<u64>(cur + o.tstate_thread_id as u64) == fsbase {
            return cur;
        }
        cur = uread(cur + o.tstate_next as u64);
    }
    0
}
