//! Reading another process's memory.

use blockwatch_common::x86_64::USER_SPACE_END;

/// Reads exactly `buf.len()` bytes at `addr` in process `pid`.
/// process_vm_readv rather than /proc/PID/mem: one syscall, no file
/// descriptor to keep per process.
pub fn read(pid: u32, addr: u64, buf: &mut [u8]) -> bool {
    if buf.is_empty() {
        return true;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if addr == 0
        || addr
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > USER_SPACE_END)
    {
        return false;
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, which we borrow mutably for the
    // call; the kernel only reads the other process through `remote`.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    usize::try_from(n).is_ok_and(|n| n == buf.len())
}

/// A little-endian u64 at `addr` in process `pid`.
pub fn read_u64(pid: u32, addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    read(pid, addr, &mut b).then(|| u64::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_memory_and_bounds() {
        let me = std::process::id();
        let value = std::hint::black_box(0x1122_3344_5566_7788u64);
        assert_eq!(read_u64(me, &value as *const u64 as u64), Some(value));
        assert!(read(me, 0, &mut []), "nothing to read");
        assert_eq!(read_u64(me, 0), None);
        assert_eq!(read_u64(me, USER_SPACE_END - 4), None);
        assert_eq!(read_u64(me, u64::MAX - 3), None);
        assert_eq!(read_u64(u32::MAX, &value as *const u64 as u64), None);
    }
}
