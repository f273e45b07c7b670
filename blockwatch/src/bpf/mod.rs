//! The kernel programs from user space: checks before load, kernel offsets
//! from BTF, loading, attaching, reading their counters.

pub mod btf;
pub mod counters;
#[cfg(test)]
mod kernel_tests;
pub mod loader;
