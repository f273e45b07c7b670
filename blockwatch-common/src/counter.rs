//! The kernel programs' counters: one per-CPU array (`COUNTERS`), one slot
//! per [`Counter`], summed over CPUs by user space.

/// Slots of the `COUNTERS` per-CPU array.
pub const NUM_COUNTERS: usize = 16;

/// What the kernel counts: mostly what it could not record, and why. Its
/// slot is its place in this list.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// Blocking events lost: the ring buffer was full.
    LostEvents,
    /// Futex probes lost: the ring buffer was full.
    LostProbes,
    /// Stacks captured at switch-out that could not be kept (`STACKS` full).
    LostStacks,
    /// Threads or processes that could not be tagged or watched (map full).
    LostTags,
    /// Blocking events sent.
    Events,
    /// User-stack copies that failed (no map entry, nothing readable) or
    /// could not be sent.
    LostUserStacks,
    /// Strict-site and sample records lost: the ring buffer was full (a
    /// strict site's count is kept in the kernel either way).
    LostLoopRecords,
    /// Strict calls counted (in `STRICT_COUNTS` or, when it was full, under
    /// [`Counter::LostStrictSites`]).
    StrictCalls,
    /// Episodes ended by a change of their loop's iteration clock (a loop
    /// that did not sleep between iterations).
    ClockEnds,
    /// Stack samples of loop threads in long episodes sent.
    Samples,
    /// Threads whose episode or strict state could not be kept (map full).
    LostLoopState,
    /// Exec, exit and loop-found records lost: the ring buffer was full.
    LostTaskRecords,
    /// Strict calls counted without a call site: `STRICT_COUNTS` was full.
    LostStrictSites,
    /// Waits at a known call site (`KNOWN_SITES`): no stack taken or sent.
    SiteHits,
    /// Waits at a known call site whose callers were not the ones user
    /// space unwound there: their stacks were taken and sent.
    SiteMisses,
    /// Loop threads found running whose switch-in `sched_switch` never
    /// showed; their episodes were repaired from the scheduler's CPU time.
    MissedSwitchIns,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; NUM_COUNTERS] = [
        Counter::LostEvents,
        Counter::LostProbes,
        Counter::LostStacks,
        Counter::LostTags,
        Counter::Events,
        Counter::LostUserStacks,
        Counter::LostLoopRecords,
        Counter::StrictCalls,
        Counter::ClockEnds,
        Counter::Samples,
        Counter::LostLoopState,
        Counter::LostTaskRecords,
        Counter::LostStrictSites,
        Counter::SiteHits,
        Counter::SiteMisses,
        Counter::MissedSwitchIns,
    ];

    /// Its slot in `COUNTERS`.
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// Its short name; for what the daemon exports as
    /// `blockwatch_kernel_drops_total{what=...}`, that label's value.
    pub const fn label(self) -> &'static str {
        match self {
            Counter::LostEvents => "event",
            Counter::LostProbes => "probe",
            Counter::LostStacks => "stack",
            Counter::LostTags => "tag",
            Counter::Events => "events",
            Counter::LostUserStacks => "user_stack",
            Counter::LostLoopRecords => "loop_record",
            Counter::StrictCalls => "strict",
            Counter::ClockEnds => "clock_end",
            Counter::Samples => "sample",
            Counter::LostLoopState => "loop_state",
            Counter::LostTaskRecords => "task",
            Counter::LostStrictSites => "strict_site",
            Counter::SiteHits => "site_hit",
            Counter::SiteMisses => "site_miss",
            Counter::MissedSwitchIns => "missed_switch_in",
        }
    }

    /// What it counts, as `trace`'s warnings name it ("N ... were lost").
    pub const fn what(self) -> &'static str {
        match self {
            Counter::LostEvents => "events",
            Counter::LostProbes => "futex probes",
            Counter::LostStacks => "stacks",
            Counter::LostTags => "thread tags",
            Counter::Events => "episodes sent",
            Counter::LostUserStacks => "user-stack copies (those stacks are frame pointers only)",
            Counter::LostLoopRecords => "strict-call or stack-sample records",
            Counter::StrictCalls => "strict calls",
            Counter::ClockEnds => "episodes ended by their loop's clock",
            Counter::Samples => "stack samples",
            Counter::LostLoopState => "episode and strict thread states",
            Counter::LostTaskRecords => "exec and exit records",
            Counter::LostStrictSites => "strict calls' call sites",
            Counter::SiteHits => "waits at known call sites",
            Counter::SiteMisses => "waits at known call sites with other callers",
            Counter::MissedSwitchIns => "switch-ins of loop threads repaired",
        }
    }
}

const _: () = {
    let mut i = 0;
    while i < NUM_COUNTERS {
        assert!(Counter::ALL[i].index() as usize == i);
        i += 1;
    }
};
