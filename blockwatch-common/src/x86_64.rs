//! x86-64 facts both sides rely on: syscall numbers (the kernel's idle-wait
//! test, user space's reading of futex waits) and the end of user space.

pub const NR_FUTEX: i64 = 202;
pub const NR_EPOLL_WAIT: i64 = 232;
pub const NR_EPOLL_PWAIT: i64 = 281;
pub const NR_IO_URING_ENTER: i64 = 426;
pub const NR_EPOLL_PWAIT2: i64 = 441;
/// `futex_wait` (6.7+, the futex2 single wait).
pub const NR_FUTEX_WAIT: i64 = 455;

/// `futex` op bits that are flags, not the command.
pub const FUTEX_CMD_MASK: u64 = !(128 | 256);
pub const FUTEX_WAIT: u64 = 0;
pub const FUTEX_WAIT_BITSET: u64 = 9;

/// Addresses at or above this are not user space (47-bit address space):
/// no code or object of the process lives there.
pub const USER_SPACE_END: u64 = 0x0000_8000_0000_0000;

/// One of the epoll waits.
#[inline(always)]
pub const fn is_epoll_wait(nr: i64) -> bool {
    nr == NR_EPOLL_WAIT || nr == NR_EPOLL_PWAIT || nr == NR_EPOLL_PWAIT2
}

/// A futex wait on one address (`op` is the `futex` call's second
/// argument; `futex_wait` has no op).
#[inline(always)]
pub const fn is_futex_wait(nr: i64, op: u64) -> bool {
    (nr == NR_FUTEX && matches!(op & FUTEX_CMD_MASK, FUTEX_WAIT | FUTEX_WAIT_BITSET))
        || nr == NR_FUTEX_WAIT
}
