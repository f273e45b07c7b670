//! What a wait means: its syscall class, who is to blame for it and what
//! to do instead.

pub mod advice;
pub mod culprit;
pub mod gil;
pub mod syscalls;
