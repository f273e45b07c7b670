//! Where events go. `trace`: [`report`] dispatches each event to [`text`]
//! (with its [`verdict`] line) or to JSON, and feeds the end-of-trace
//! [`summary`]; at the end it can draw a [`flamegraph`] and write a
//! [`pprof`] profile. `daemon`: [`metrics`] keeps the Prometheus registry,
//! the folded stacks and their [`culprits`] that [`http`] serves (with
//! the [`page`] and the flame graph), and prints [`verdict`] lines.
//! [`labels`] spells an event's syscall and culprit for each of them.

pub mod culprits;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod flamegraph;
pub mod http;
pub mod json;
pub mod labels;
pub mod metrics;
pub mod page;
pub mod pprof;
pub mod report;
pub mod summary;
pub mod text;
pub mod verdict;
