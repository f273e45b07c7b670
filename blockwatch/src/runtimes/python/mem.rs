//! Reading the interpreter's objects out of the process (through
//! [`crate::procfs::mem`]).

pub(super) use crate::procfs::mem::{read as read_mem, read_u64};
use blockwatch_common::x86_64::USER_SPACE_END;

pub(super) fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

pub(super) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

/// Could this be a pointer to a Python object? Objects are at least
/// 8-aligned, and live in user space.
pub(super) fn plausible_object(p: u64) -> bool {
    (0x1000..USER_SPACE_END).contains(&p) && p.is_multiple_of(8)
}
