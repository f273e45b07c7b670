//! What the kernel needs to walk a thread's CPython frames, found by user
//! space (`blockwatch::runtimes::python`) per interpreter version.

/// Interpreter frames recorded per blocking event (CPython).
pub const MAX_PY_FRAMES: usize = 32;

/// CPython structure offsets for one interpreter version, so the kernel
/// can walk a blocked thread's interpreter frames.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyOffsets {
    /// (major << 8) | minor, e.g. 0x030b.
    pub version: u32,
    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interpreters_head: u32,
    /// Thread list head in `PyInterpreterState` (3.10: `tstate_head`; 3.11+: `threads.head`).
    pub interp_threads_head: u32,
    pub tstate_next: u32,
    /// `PyThreadState.thread_id`: the pthread_t, i.e. the thread's fs base.
    pub tstate_thread_id: u32,
    /// 3.10: `frame`; 3.11/3.12: `cframe`; 3.13: `current_frame`.
    pub tstate_frame: u32,
    /// 3.11/3.12: `_PyCFrame.current_frame`; `u32::MAX` when `tstate_frame`
    /// points at the frame itself.
    pub cframe_current_frame: u32,
    /// 3.10: `f_back`; 3.11+: `previous`.
    pub frame_previous: u32,
    /// 3.10-3.12: `f_code`; 3.13: `f_executable`.
    pub frame_code: u32,
    /// 3.10: `f_lasti` (4 bytes); 3.11/3.12: `prev_instr`; 3.13: `instr_ptr`.
    pub frame_instr: u32,
    /// 4 or 8.
    pub frame_instr_size: u32,
    /// 3.12+: `owner` (1 byte); `u32::MAX` when absent.
    pub frame_owner: u32,
}

/// A watched CPython process (`PYPROCS`, key: TGID).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PyProc {
    /// Address of `_PyRuntime` in the process.
    pub runtime: u64,
    pub offsets: PyOffsets,
}

/// One interpreter frame: the code object and where in it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyFrameRef {
    pub code: u64,
    pub instr: u64,
}

pod!(PyOffsets, PyProc);

const _: () = {
    assert!(core::mem::size_of::<PyOffsets>() == 48);
    assert!(core::mem::size_of::<PyProc>() == 56);
    assert!(core::mem::size_of::<PyFrameRef>() == 16);
};
