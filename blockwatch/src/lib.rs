//! blockwatch: finds the calls that block async runtimes' event loops.
//!
//! The modules follow the data, one stage each (see ARCHITECTURE.md):
//! [`bpf`] loads and attaches the kernel programs, whose records arrive
//! through the ring buffer and are decoded in [`ingest`]; [`targets`] says
//! which threads the kernel watches; [`procfs`] reads what `/proc` says of
//! the watched processes; [`stacks`] turns raw stacks into frames with the
//! help of [`runtimes`]; [`analyze`] classifies the wait and
//! names its culprit; [`pipeline`] keeps the per-process state that ties
//! those together; [`output`] renders events; [`session`] runs `trace` and
//! `daemon` on top of all of it, configured by [`cli`] and [`settings`].
//! [`text`] holds the helpers every output shares for names from traced
//! processes.

pub mod analyze;
pub mod bpf;
pub mod cli;
pub mod event;
pub mod ingest;
pub mod output;
pub mod pipeline;
pub mod procfs;
pub mod runtimes;
pub mod session;
pub mod settings;
pub mod stacks;
pub mod targets;
pub mod text;
