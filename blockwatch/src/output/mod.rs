//! Where events go: the terminal, JSON lines, verdicts, Prometheus metrics
//! and the daemon's HTTP endpoints.

pub mod http;
pub mod metrics;
pub mod report;
pub mod verdict;
