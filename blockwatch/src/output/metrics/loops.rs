//! The metrics of strict mode. Their culprit labels
//! share each process's top-N budget with the blocking metrics (one
//! [`super::Aggregator`]), so they add no cardinality of their own beyond
//! `syscall`.

use prometheus::{Opts, Registry};

use super::{MetricsError, Tally};

pub(super) struct LoopMetrics {
    /// Strict calls, by class, syscall and culprit.
    pub(super) strict: Tally,
}

impl LoopMetrics {
    /// `with` prefixes the per-process labels.
    pub(super) fn new<'a>(
        registry: &Registry,
        with: &dyn Fn(&[&'static str]) -> Vec<&'a str>,
    ) -> Result<Self, MetricsError> {
        Ok(Self {
            strict: Tally::new(
                registry,
                Opts::new(
                    "blockwatch_strict_calls_total",
                    "Blocking-class syscalls on event-loop threads that stayed on the CPU (--strict).",
                ),
                Opts::new(
                    "blockwatch_strict_seconds_total",
                    "Time event-loop threads spent in blocking-class syscalls that stayed on the CPU (--strict).",
                ),
                &with(&["class", "syscall", "culprit"]),
            )?,
        })
    }
}
