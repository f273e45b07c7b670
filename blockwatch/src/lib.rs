//! blockwatch: finds the calls that block async runtimes' event loops.
//!
//! Data flows one way: kernel programs → ring buffer → [`decode`] →
//! [`symbolize`] → [`report`] (terminal, JSON). [`loader`] loads and attaches
//! the programs, [`targets`] decides which threads are watched, [`runtime`]
//! knows the runtimes' idle waits, [`trace`] runs a session.

pub mod btf;
pub mod cli;
pub mod config;
pub mod culprit;
pub mod daemon;
pub mod decode;
pub mod duration;
pub mod event;
pub mod http;
#[cfg(test)]
mod kernel_tests;
pub mod loader;
pub mod loopdetect;
pub mod metrics;
pub mod perfmap;
pub mod pipeline;
pub mod python;
pub mod report;
pub mod runtime;
pub mod selector;
pub mod symbolize;
pub mod syscalls;
pub mod targets;
pub mod trace;
pub mod unwind;
pub mod verdict;
