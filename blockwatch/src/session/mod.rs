//! The two ways to run blockwatch: a one-shot `trace` and the `daemon`.

pub mod daemon;
mod pictures;
pub mod trace;
