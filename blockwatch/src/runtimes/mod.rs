//! What blockwatch knows about each runtime that the kernel cannot.

pub mod python;
pub mod tokio;
