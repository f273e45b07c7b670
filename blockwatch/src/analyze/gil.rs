//! The `gil` class: a wait for CPython's global interpreter lock.
//!
//! The main interpreter's GIL (its mutex and condition variable) lies
//! inside `_PyRuntime`: in `ceval.gil` before 3.12, in the embedded main
//! interpreter's `_gil` from 3.12. So a futex wait at an address inside
//! `_PyRuntime` is a wait for the GIL: another thread holds it. That blocks
//! the loop as surely as a lock, but the fix differs (move the CPU work out
//! of the process, or release the GIL in it), hence its own class.

use std::ops::Range;

use crate::analyze::syscalls;
use crate::event::Class;

/// Whether a futex at `uaddr` is the interpreter's own, given where its
/// `_PyRuntime` lies.
pub fn is_gil_futex(runtime: &Range<u64>, uaddr: u64) -> bool {
    runtime.contains(&uaddr)
}

/// The class of a wait, `gil` for a futex wait inside `runtime` (the
/// `_PyRuntime` of the process's interpreter, when it runs CPython) that
/// [`syscalls::classify`] called a lock; otherwise `class` unchanged.
pub fn refine(class: Class, syscall: i64, uaddr: u64, runtime: Option<Range<u64>>) -> Class {
    if class == Class::Lock
        && syscalls::name(syscall) == Some("futex")
        && runtime.is_some_and(|r| is_gil_futex(&r, uaddr))
    {
        Class::Gil
    } else {
        class
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FUTEX: i64 = 202;
    const READ: i64 = 0;

    #[test]
    fn futex_waits_inside_the_runtime_are_the_gil() {
        let runtime = Some(0x1000..0x2000);
        for (class, syscall, uaddr, runtime, want) in [
            (Class::Lock, FUTEX, 0x1000, runtime.clone(), Class::Gil),
            (Class::Lock, FUTEX, 0x1ff8, runtime.clone(), Class::Gil),
            (Class::Lock, FUTEX, 0x2000, runtime.clone(), Class::Lock),
            (Class::Lock, FUTEX, 0xffc, runtime.clone(), Class::Lock),
            // Not CPython, or its runtime's size unknown.
            (Class::Lock, FUTEX, 0x1000, None, Class::Lock),
            // Only lock waits on a futex.
            (Class::File, READ, 0x1000, runtime.clone(), Class::File),
            (Class::Sleep, FUTEX, 0x1000, runtime, Class::Sleep),
        ] {
            assert_eq!(refine(class, syscall, uaddr, runtime), want, "{uaddr:#x}");
        }
    }
}
