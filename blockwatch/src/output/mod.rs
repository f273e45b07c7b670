//! Where events go: the terminal, JSON lines, verdicts, Prometheus metrics,
//! the daemon's HTTP endpoints and page, flame graphs and pprof profiles.

pub mod culprits;
pub mod flamegraph;
pub mod http;
pub mod metrics;
pub mod page;
pub mod pprof;
pub mod report;
pub mod verdict;
