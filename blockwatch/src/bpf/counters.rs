//! The kernel programs' counters ([`Counter`]), read from user space: one
//! per-CPU array, summed here once for `trace`'s warnings and the daemon's
//! metrics.

use std::borrow::Borrow;
use std::ops::Index;

use aya::maps::{MapData, PerCpuArray};
use blockwatch_common::{Counter, NUM_COUNTERS};

/// What the daemon exports as `blockwatch_kernel_drops_total{what}`, the
/// label being each counter's [`Counter::label`].
pub const KERNEL_DROPS: [Counter; 7] = [
    Counter::LostStacks,
    Counter::LostUserStacks,
    Counter::LostProbes,
    Counter::LostTags,
    Counter::LostTaskRecords,
    Counter::LostStrictSites,
    Counter::LostLoopState,
];

/// Every kernel counter, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters([u64; NUM_COUNTERS]);

impl Counters {
    /// Reads and sums the `COUNTERS` map. A slot that cannot be read
    /// counts 0: the counters only feed warnings and metrics, and a loaded
    /// array's slots can always be read.
    pub fn read<T: Borrow<MapData>>(map: &PerCpuArray<T, u64>) -> Self {
        let mut sums = [0; NUM_COUNTERS];
        for (sum, counter) in sums.iter_mut().zip(Counter::ALL) {
            *sum = map
                .get(&counter.index(), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
        }
        Self(sums)
    }

    /// Records lost to a full ring buffer that would have been events
    /// (blocking waits, strict calls, stalls, samples): the daemon's
    /// `blockwatch_events_lost_total`.
    pub fn events_lost(&self) -> u64 {
        self[Counter::LostEvents] + self[Counter::LostLoopRecords]
    }

    /// `trace`'s closing warnings about what the kernel lost, one line
    /// each, with what to do about it where something helps.
    pub fn warnings(&self) -> Vec<String> {
        let advice = |c: Counter| match c {
            Counter::LostEvents => " (ring buffer full); raise --threshold to report fewer",
            Counter::LostLoopRecords => {
                " (ring buffer full; a strict call site's calls are counted all the same)"
            }
            Counter::LostStrictSites => {
                " (the strict-call map was full): counted in the total, under no culprit"
            }
            Counter::LostTaskRecords => {
                " (ring buffer full): processes that started or exited meanwhile may have been missed"
            }
            Counter::LostLoopState => {
                " (the per-thread episode map was full): those threads' waits went unreported; watch fewer threads (--threads loop)"
            }
            _ => "",
        };
        [
            Counter::LostEvents,
            Counter::LostProbes,
            Counter::LostStacks,
            Counter::LostTags,
            Counter::LostUserStacks,
            Counter::LostLoopRecords,
            Counter::LostTaskRecords,
            Counter::LostStrictSites,
            Counter::LostLoopState,
        ]
        .into_iter()
        .filter(|&c| self[c] > 0)
        .map(|c| {
            format!(
                "blockwatch: warning: {} {} were lost{}",
                self[c],
                c.what(),
                advice(c)
            )
        })
        .collect()
    }
}

impl Index<Counter> for Counters {
    type Output = u64;

    fn index(&self, counter: Counter) -> &u64 {
        &self.0[counter.index() as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(counts: &[(Counter, u64)]) -> Counters {
        let mut c = Counters::default();
        for &(counter, n) in counts {
            c.0[counter.index() as usize] = n;
        }
        c
    }

    #[test]
    fn warnings_name_what_was_lost_and_what_helps() {
        assert!(Counters::default().warnings().is_empty());
        let c = with(&[
            (Counter::LostEvents, 3),
            (Counter::LostUserStacks, 2),
            (Counter::LostTaskRecords, 1),
            (Counter::LostLoopState, 6),
            (Counter::Events, 9),
        ]);
        assert_eq!(
            c.warnings(),
            [
                "blockwatch: warning: 3 events were lost (ring buffer full); raise --threshold to report fewer",
                "blockwatch: warning: 2 user-stack copies (those stacks are frame pointers only) were lost",
                "blockwatch: warning: 1 exec and exit records were lost (ring buffer full): processes that started or exited meanwhile may have been missed",
                "blockwatch: warning: 6 episode and strict thread states were lost (the per-thread episode map was full): those threads' waits went unreported; watch fewer threads (--threads loop)",
            ]
        );
    }

    #[test]
    fn events_lost_sums_blocking_and_loop_records_only() {
        let c = with(&[
            (Counter::LostEvents, 3),
            (Counter::LostLoopRecords, 4),
            (Counter::LostTaskRecords, 5),
        ]);
        assert_eq!(c.events_lost(), 7);
        assert_eq!(c[Counter::LostTaskRecords], 5);
    }

    #[test]
    fn drop_labels_are_the_exported_ones() {
        let labels: Vec<_> = KERNEL_DROPS.iter().map(|c| c.label()).collect();
        assert_eq!(
            labels,
            [
                "stack",
                "user_stack",
                "probe",
                "tag",
                "task",
                "strict_site",
                "loop_state"
            ]
        );
    }
}
