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

/// The hash map of the per-event path, keyed by PIDs, TIDs, call sites and
/// names: foldhash rather than the standard SipHash, whose hashing showed
/// as several percent of blockwatch's CPU per event. Each map still gets
/// its own random seed.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// The set of the per-event path (see [`FastMap`]).
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// The hasher of the 64-bit identities blockwatch keeps in memory for the
/// life of a process (a stack's, a stack-cache key's, an announced call's):
/// foldhash's quality variant, far cheaper than SipHash on the per-event
/// path, and the same from run to run.
pub fn identity_hasher() -> impl std::hash::Hasher {
    use std::hash::BuildHasher as _;
    foldhash::quality::FixedState::default().build_hasher()
}
