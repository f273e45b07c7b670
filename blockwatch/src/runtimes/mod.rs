//! What blockwatch knows about each runtime that the kernel cannot.

pub mod clock;
pub mod node;
pub mod python;
pub mod tokio;
