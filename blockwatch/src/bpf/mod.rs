//! The kernel programs from user space: checks before load, kernel offsets
//! from BTF, loading, attaching.

pub mod btf;
#[cfg(test)]
mod kernel_tests;
pub mod loader;
