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

/// A call site whose native stack user space already has (`KNOWN_SITES`):
/// a wait there sends no stack, only the site. `site` is the kernel's hash
/// of the user `ip` and `sp` and the CPython (code, instruction) pairs
/// (blockwatch-ebpf/src/stack.rs `wait_site`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SiteKey {
    pub tgid: u32,
    pub _pad: u32,
    pub site: u64,
}

pod!(SiteKey);

/// Return addresses checked per known site.
pub const SITE_CHECKS: usize = 8;

/// What makes a wait at a [`SiteKey`] the same stack as the one user space
/// unwound there: the words at `offs[i]` bytes above `sp` hold `vals[i]`,
/// the return addresses of its nearest `n` callers, where they were found.
/// Code without frame pointers keeps data in `rbp`, so the frame-pointer
/// chain cannot tell two callers at the same depth apart; these words can.
/// A wait whose words differ sends its stacks, whatever else is known.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SiteCheck {
    pub n: u32,
    /// `SITE_REFRESH`, or 0.
    pub flags: u32,
    pub offs: [u32; SITE_CHECKS],
    pub vals: [u64; SITE_CHECKS],
}

pod!(SiteCheck);

/// [`SiteCheck::flags`]: the site's frames are not all named yet (a JIT
/// frame whose perf map line was not written): its waits count as known
/// only for a while after its stacks were last sent, then send them again
/// so user space can name them.
pub const SITE_REFRESH: u32 = 1;

/// Entries of `KNOWN_SITES`, and of user space's matching cache: one per
/// (process, call site) at which a watched thread waited.
pub const MAX_KNOWN_SITES: u32 = 16384;

const _: () = {
    assert!(core::mem::size_of::<SiteKey>() == 16);
    assert!(core::mem::size_of::<SiteCheck>() == 8 + 12 * SITE_CHECKS);
    assert!(core::mem::size_of::<StackBuf>() == 16 + 8 * MAX_FRAMES + 16 * MAX_PY_FRAMES);
    // The kernel copies user stacks page by page.
    assert!(MAX_USER_STACK.is_multiple_of(4096));
    assert!(DEFAULT_USER_STACK as usize <= MAX_USER_STACK);
};
