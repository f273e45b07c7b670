//! Types shared by the kernel programs and user space.
//!
//! Every type here is `#[repr(C)]`, `Copy`, and laid out without implicit
//! padding so that the bytes the kernel writes are the bytes user space
//! decodes. Both sides are built together, so a layout may change, but on
//! both sides at once; the size assertion beside each type catches the
//! accidental changes. One module per concern:
//!
//! - [`record`]: what the kernel sends through the ring buffer: one
//!   [`RecordKind`], one [`RecordHeader`] every record starts with, and the
//!   records themselves.
//! - [`counter`]: the kernel's per-CPU counters ([`Counter`]).
//! - [`tag`]: per-thread state (the tag that marks a loop thread, the
//!   strict and stall detectors' state) and the watch rules behind it.
//! - [`stack`]: stack sizes and the stack kept while a thread is off-CPU.
//! - [`python`]: what the kernel needs to walk CPython frames.
//! - [`clock`]: a loop's iteration clock, which ends episodes of loops
//!   that never sleep.
//! - [`config`]: what user space hands the kernel (settings, offsets).
//! - [`x86_64`]: syscall numbers and address bounds of the architecture.
#![no_std]

/// Declares `#[repr(C)]` types plain old data for aya's map API (user
/// space only). Use it only beside a layout assertion that shows the type
/// has no padding and no field with invalid bit patterns.
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            // SAFETY: `#[repr(C)]`, `Copy`, integers and arrays of them
            // only (every bit pattern is valid), no implicit padding (its
            // size is asserted beside it).
            #[cfg(feature = "user")]
            unsafe impl aya::Pod for $t {}
        )*
    };
}

pub mod clock;
pub mod config;
pub mod counter;
pub mod python;
pub mod record;
pub mod stack;
pub mod tag;
pub mod x86_64;

pub use clock::*;
pub use config::*;
pub use counter::*;
pub use python::*;
pub use record::*;
pub use stack::*;
pub use tag::*;
