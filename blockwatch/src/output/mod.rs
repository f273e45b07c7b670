//! Where events go. `trace`: [`report`] dispatches each event to [`text`]
//! (with its [`verdict`] line) or to JSON, and feeds the end-of-trace
//! [`summary`]. `daemon`: [`metrics`] keeps the Prometheus registry and
//! the folded stacks that [`http`] serves, and prints [`verdict`] lines.
//! [`labels`] spells an event's syscall and culprit for each of them.

#[cfg(test)]
mod fixtures;
pub mod http;
pub mod labels;
pub mod metrics;
pub mod report;
pub mod summary;
pub mod text;
pub mod verdict;
