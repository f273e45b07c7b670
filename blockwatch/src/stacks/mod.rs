//! Raw stacks to frames: DWARF unwinding of copied user stacks, native
//! symbols, JIT perf maps, and the one [`builder`] that puts them together
//! with the CPython frames for every detector's events.

pub mod builder;
pub mod perfmap;
pub mod symbolize;
pub mod unwind;
