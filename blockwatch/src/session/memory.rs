//! Gives the heap's free memory back to the system once work has stopped.
//!
//! glibc returns freed memory to the system only from the top of the heap
//! and only past `M_TRIM_THRESHOLD`; what start-up (BTF, the ELF object,
//! /proc scans) and a burst of events (stack copies, symbolization) freed
//! elsewhere stays resident for the life of the daemon, which spends most
//! of it idle. `malloc_trim` releases those free pages.

use std::time::{Duration, Instant};

/// How long after the last work the heap is trimmed: long enough that a
/// burst which pauses for a moment does not pay a trim per pause, short
/// enough that an idle daemon soon shows its idle size.
pub const TRIM_AFTER: Duration = Duration::from_secs(2);

/// Work that never pauses for [`TRIM_AFTER`] (a host starting processes
/// all the time, each an exec record under `--auto`) still gets a trim
/// this long after it began.
pub const TRIM_AT_MOST_AFTER: Duration = Duration::from_secs(30);

/// When the heap is next due to be trimmed.
#[derive(Debug, Default)]
pub struct Trimmer {
    due: Option<Instant>,
    /// The first work since the last trim.
    since: Option<Instant>,
}

impl Trimmer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Work was just done: trim [`TRIM_AFTER`] after the last of it.
    pub fn worked(&mut self, now: Instant) {
        let since = *self.since.get_or_insert(now);
        self.due = Some((now + TRIM_AFTER).min(since + TRIM_AT_MOST_AFTER));
    }

    /// When to call [`Trimmer::trim`], if anything is pending.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// Trims now; nothing is pending afterwards.
    pub fn trim(&mut self) {
        self.due = None;
        self.since = None;
        trim();
    }
}

/// Returns the heap's free pages to the system.
pub fn trim() {
    // SAFETY: malloc_trim only walks the allocator's own free lists, under
    // its arena locks.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_the_last_work() {
        let mut t = Trimmer::new();
        assert_eq!(t.due(), None);
        let start = Instant::now();
        t.worked(start);
        t.worked(start + Duration::from_secs(1));
        assert_eq!(t.due(), Some(start + Duration::from_secs(1) + TRIM_AFTER));
        t.trim();
        assert_eq!(t.due(), None);
    }

    #[test]
    fn work_that_never_pauses_is_trimmed_all_the_same() {
        let mut t = Trimmer::new();
        let start = Instant::now();
        for s in 0..100 {
            t.worked(start + Duration::from_secs(s));
        }
        assert_eq!(t.due(), Some(start + TRIM_AT_MOST_AFTER));
    }
}
