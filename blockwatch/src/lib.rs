//! blockwatch: finds the calls that block async runtimes' event loops.
//!
//! Data flows one way: kernel programs → ring buffer → [`decode`] →
//! [`symbolize`] → [`report`] (terminal, JSON). [`loader`] loads and attaches
//! the programs, [`targets`] decides which threads are watched.

pub mod culprit;
pub mod duration;
pub mod event;
pub mod report;
pub mod symbolize;
pub mod syscalls;
