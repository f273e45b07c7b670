//! Stack sizes, and the stack the kernel keeps while a thread is off-CPU.

use crate::python::{MAX_PY_FRAMES, PyFrameRef};

/// Frames kept per user stack (the kernel's default `perf_event_max_stack`).
pub const MAX_FRAMES: usize = 127;
/// Most bytes of user stack copied per blocking wait (see
/// [`UserStack`](crate::UserStack)).
pub const MAX_USER_STACK: usize = 32 * 1024;
/// Bytes of user stack copied per blocking wait unless configured otherwise
/// (a wait in a nested event loop copies [`MAX_USER_STACK`]).
pub const DEFAULT_USER_STACK: u32 = 16 * 1024;

/// A user stack captured at switch-out, kept per TID in `STACKS` until the
/// thread runs again; also the per-CPU scratch of the frame walks.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StackBuf {
    /// Bytes written by `bpf_get_stack` (a multiple of 8), or 0.
    pub len: u64,
    pub ips: [u64; MAX_FRAMES],
    /// Interpreter frames found, innermost first.
    pub py_len: u64,
    pub py: [PyFrameRef; MAX_PY_FRAMES],
}

pod!(StackBuf);

const _: () = {
    assert!(core::mem::size_of::<StackBuf>() == 16 + 8 * MAX_FRAMES + 16 * MAX_PY_FRAMES);
    // The kernel copies user stacks page by page.
    assert!(MAX_USER_STACK.is_multiple_of(4096));
    assert!(DEFAULT_USER_STACK as usize <= MAX_USER_STACK);
};
