//! Raw stacks to frames: DWARF unwinding of copied user stacks, native
//! symbols, JIT perf maps.

pub mod perfmap;
pub mod symbolize;
pub mod unwind;
