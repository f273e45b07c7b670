//! What a wait means: its syscall class and who is to blame for it.

pub mod culprit;
pub mod gil;
pub mod syscalls;
