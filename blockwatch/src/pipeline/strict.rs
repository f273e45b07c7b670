//! User-space half of strict mode's counts (kernel side:
//! blockwatch-ebpf/src/strict.rs). The kernel counts every strict call in
//! `STRICT_COUNTS`, per (thread, syscall, call site), and sends each site's
//! stacks once, as a `Strict` record the pipeline turns into the site's
//! event. Here each site's event is remembered, and the map's running
//! totals become [`StrictCalls`]: the calls of one site since the last
//! read, under its stack and culprit. No count goes through the ring
//! buffer, so none depends on its space.
//!
//! The map's entries are read:
//! - periodically (`trace` and `daemon`, every second), as deltas from the
//!   previous read; a live thread's entries are never deleted, so no call
//!   of it can be lost between a read and a delete;
//! - when a thread exits (its `Exit` record): its entries are read a last
//!   time and deleted, before the process's exit is reported;
//! - when a process execs: its sites (of the old program) likewise;
//! - at the end of `trace`, a last time.
//!
//! A site whose stacks never came (its record was lost: the ring buffer
//! was full when its last call tried) is counted under an unknown stack:
//! at once at the final read, otherwise once two reads in a row found it
//! still unsent. A thread gone without its `Exit` record (also lost) has
//! its entries read and deleted by the periodic read that finds it gone.

use std::collections::{HashMap, HashSet};

use aya::maps::{HashMap as BpfHashMap, MapData};
use blockwatch_common::{StrictKey, StrictTally};
use log::debug;

use crate::event::Event;

/// Calls of one strict call site counted since the previous read.
#[derive(Clone, Debug)]
pub struct StrictCalls {
    /// The site's event (its first call, with its stacks), or one without
    /// a stack when the site's record never came.
    pub event: Event,
    pub calls: u64,
    /// Time in those calls.
    pub total_ns: u64,
    /// The site's longest call so far.
    pub max_ns: u64,
}

impl StrictCalls {
    /// The site's event carrying the time of these calls, for what weighs
    /// stacks by time (flame graph, pprof).
    pub fn weighted_event(&self) -> Event {
        Event {
            duration_ns: self.total_ns,
            ..self.event.clone()
        }
    }
}

/// Which reading of the map this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// A site without its stacks waits for them, for one more read.
    Periodic,
    /// The session ends: every count goes out, known stack or not.
    Final,
}

/// The kernel's `STRICT_COUNTS`, as this module uses it (a plain map in
/// the unit tests).
pub trait CountsMap {
    fn entries(&self) -> Vec<(StrictKey, StrictTally)>;
    fn value(&self, key: &StrictKey) -> Option<StrictTally>;
    fn delete(&mut self, key: &StrictKey);
}

impl CountsMap for BpfHashMap<MapData, StrictKey, StrictTally> {
    fn entries(&self) -> Vec<(StrictKey, StrictTally)> {
        // An entry deleted while the keys are walked is skipped.
        self.iter().filter_map(Result::ok).collect()
    }

    fn value(&self, key: &StrictKey) -> Option<StrictTally> {
        self.get(key, 0).ok()
    }

    fn delete(&mut self, key: &StrictKey) {
        if let Err(e) = self.remove(key) {
            debug!("strict site of tid {} already gone: {e}", key.tid);
        }
    }
}

impl CountsMap for HashMap<StrictKey, StrictTally> {
    fn entries(&self) -> Vec<(StrictKey, StrictTally)> {
        self.iter().map(|(k, v)| (*k, *v)).collect()
    }

    fn value(&self, key: &StrictKey) -> Option<StrictTally> {
        self.get(key).copied()
    }

    fn delete(&mut self, key: &StrictKey) {
        self.remove(key);
    }
}

/// A site whose record came: its event, and the totals already counted.
#[derive(Debug)]
struct Site {
    event: Event,
    seen: StrictTally,
}

/// A site whose record has not come (yet).
#[derive(Debug, Default)]
struct Pending {
    /// Totals already counted under the unknown stack.
    seen: StrictTally,
    /// Reads in a row that found it unsent.
    unsent_reads: u32,
}

/// What the pipeline keeps of strict call sites.
#[derive(Debug, Default)]
pub struct StrictSites {
    sites: HashMap<StrictKey, Site>,
    pending: HashMap<StrictKey, Pending>,
    by_tid: HashMap<u32, Vec<StrictKey>>,
    /// Threads the previous read found gone.
    gone: HashSet<u32>,
}

impl StrictSites {
    pub fn new() -> Self {
        Self::default()
    }

    /// The record of site `key` came: `event` is its first call. What was
    /// already counted under the unknown stack stays there.
    pub fn site_found(&mut self, key: StrictKey, event: Event) {
        let seen = match self.sites.remove(&key) {
            Some(old) => old.seen,
            None => self.pending.remove(&key).unwrap_or_default().seen,
        };
        self.sites.insert(key, Site { event, seen });
        debug!(
            "strict call site {:#x} of tid {} (syscall {}); {} sites known",
            key.site,
            key.tid,
            key.nr,
            self.sites.len()
        );
        let keys = self.by_tid.entry(key.tid).or_default();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }

    /// Every site's calls since the previous read. `alive` says whether a
    /// (TGID, TID) still runs: the entries of a thread two reads in a row
    /// found gone (its `Exit` record, and its sites' records before it,
    /// would have come by then) are read a last time and deleted.
    /// `unknown` builds the event of a site without its record.
    pub fn read(
        &mut self,
        map: &mut impl CountsMap,
        mode: Read,
        alive: impl Fn(u32, u32) -> bool,
        mut unknown: impl FnMut(&StrictKey) -> Event,
    ) -> Vec<StrictCalls> {
        let entries = map.entries();
        let mut out = Vec::new();
        let mut gone = HashSet::new();
        let mut checked = HashMap::new();
        for (key, now) in &entries {
            let live = *checked
                .entry((key.tgid, key.tid))
                .or_insert_with(|| alive(key.tgid, key.tid));
            if !live {
                gone.insert(key.tid);
            }
            let last = !live && self.gone.contains(&key.tid);
            let mode = if last { Read::Final } else { mode };
            out.extend(self.count(key, now, mode, &mut unknown));
        }
        let last: Vec<u32> = gone.intersection(&self.gone).copied().collect();
        for tid in last {
            self.forget_thread(map, tid);
        }
        self.gone = gone;
        out
    }

    /// Thread `tid` exited: its sites' last calls; their entries are
    /// deleted.
    pub fn thread_exit(
        &mut self,
        map: &mut impl CountsMap,
        tid: u32,
        unknown: impl FnMut(&StrictKey) -> Event,
    ) -> Vec<StrictCalls> {
        // Most exits are of threads without a strict call: no walk of
        // every site for them.
        let mut keys = self.by_tid.get(&tid).cloned().unwrap_or_default();
        keys.extend(self.pending.keys().filter(|k| k.tid == tid));
        self.last_reads(map, keys, unknown)
    }

    /// Process `pid` exec'd: the old program's sites' last calls; their
    /// entries are deleted (the new program's sites are new keys).
    pub fn exec(
        &mut self,
        map: &mut impl CountsMap,
        pid: u32,
        unknown: impl FnMut(&StrictKey) -> Event,
    ) -> Vec<StrictCalls> {
        // Called at every exec the kernel reports (on a host's worth of
        // them with name rules): one look per thread with sites, not per
        // site. A thread's sites share its process.
        let mut keys: Vec<StrictKey> = self
            .by_tid
            .values()
            .filter(|ks| ks.first().is_some_and(|k| k.tgid == pid))
            .flatten()
            .copied()
            .collect();
        keys.extend(self.pending.keys().filter(|k| k.tgid == pid));
        self.last_reads(map, keys, unknown)
    }

    /// The sites (known or pending) `which` selects.
    fn keys_where(&self, which: impl Fn(&StrictKey) -> bool) -> Vec<StrictKey> {
        self.sites
            .keys()
            .chain(self.pending.keys())
            .filter(|k| which(k))
            .copied()
            .collect()
    }

    /// The last calls of sites `keys`, as the final read counts them;
    /// their entries are deleted.
    fn last_reads(
        &mut self,
        map: &mut impl CountsMap,
        keys: Vec<StrictKey>,
        mut unknown: impl FnMut(&StrictKey) -> Event,
    ) -> Vec<StrictCalls> {
        let mut out = Vec::new();
        for key in &keys {
            if let Some(now) = map.value(key) {
                out.extend(self.count(key, &now, Read::Final, &mut unknown));
            }
            map.delete(key);
            self.forget_key(key);
        }
        out
    }

    /// The calls of site `key` since it was last counted, its totals now
    /// being `now`.
    fn count(
        &mut self,
        key: &StrictKey,
        now: &StrictTally,
        mode: Read,
        unknown: &mut impl FnMut(&StrictKey) -> Event,
    ) -> Option<StrictCalls> {
        if let Some(site) = self.sites.get_mut(key) {
            let calls = since(&site.seen, now, &site.event);
            site.seen = *now;
            return calls;
        }
        let p = self.pending.entry(*key).or_default();
        // Unsent twice in a row: no call of the site since (a call would
        // have sent it), so its record is not coming soon. Sent but not
        // here yet: it is in the ring buffer, and the next read has it.
        let give_up = mode == Read::Final || (now.sent == 0 && p.unsent_reads >= 1);
        p.unsent_reads = if now.sent == 0 { p.unsent_reads + 1 } else { 0 };
        if !give_up {
            return None;
        }
        let calls = since(&p.seen, now, &unknown(key));
        p.seen = *now;
        calls
    }

    fn forget_thread(&mut self, map: &mut impl CountsMap, tid: u32) {
        for key in &self.keys_where(|k| k.tid == tid) {
            map.delete(key);
            self.forget_key(key);
        }
    }

    fn forget_key(&mut self, key: &StrictKey) {
        self.sites.remove(key);
        self.pending.remove(key);
        if let Some(keys) = self.by_tid.get_mut(&key.tid) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_tid.remove(&key.tid);
            }
        }
    }

    /// Sites known (with their record or not).
    pub fn len(&self) -> usize {
        self.sites.len() + self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What `now` adds to `seen`, under `event`; None when no call.
fn since(seen: &StrictTally, now: &StrictTally, event: &Event) -> Option<StrictCalls> {
    let calls = now.calls.saturating_sub(seen.calls);
    (calls > 0).then(|| StrictCalls {
        event: event.clone(),
        calls,
        total_ns: now.total_ns.saturating_sub(seen.total_ns),
        max_ns: now.max_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Class, Detector, Frame};
    use crate::output::fixtures::{event, frame};

    fn key(tid: u32, site: u64) -> StrictKey {
        StrictKey {
            tgid: 1,
            tid,
            nr: 262,
            _pad: 0,
            site,
        }
    }

    fn tally(calls: u64, sent: u32) -> StrictTally {
        StrictTally {
            calls,
            total_ns: calls * 1000,
            max_ns: 2000,
            sent,
            _pad: 0,
        }
    }

    fn site_event(function: &str) -> Event {
        let f: Frame = frame(0x10, Some(function), None);
        Event {
            detector: Detector::Strict,
            ..event(Some(f), Some("newfstatat"), 262, Class::Stat, 0)
        }
    }

    fn unknown(_: &StrictKey) -> Event {
        Event {
            detector: Detector::Strict,
            ..event(None, Some("newfstatat"), 262, Class::Stat, 0)
        }
    }

    fn culprit(c: &StrictCalls) -> Option<&str> {
        c.event.culprit.as_ref().and_then(|f| f.function.as_deref())
    }

    fn total(calls: &[StrictCalls]) -> u64 {
        calls.iter().map(|c| c.calls).sum()
    }

    #[test]
    fn reads_count_what_each_site_added_since_the_last() {
        let mut s = StrictSites::new();
        let mut map = HashMap::new();
        map.insert(key(5, 1), tally(10, 1));
        s.site_found(key(5, 1), site_event("stat_file"));
        let live = |_, _| true;
        let c = s.read(&mut map, Read::Periodic, live, unknown);
        assert_eq!((c.len(), c[0].calls, c[0].total_ns), (1, 10, 10_000));
        assert_eq!(culprit(&c[0]), Some("stat_file"));
        // Nothing new: nothing counted.
        assert!(s.read(&mut map, Read::Periodic, live, unknown).is_empty());
        map.insert(key(5, 1), tally(25, 1));
        let c = s.read(&mut map, Read::Periodic, live, unknown);
        assert_eq!((c[0].calls, c[0].total_ns, c[0].max_ns), (15, 15_000, 2000));
        assert_eq!(map.len(), 1, "a live thread's entries stay");
    }

    #[test]
    fn a_site_in_flight_waits_and_an_unsent_one_is_counted_unknown() {
        let mut s = StrictSites::new();
        let mut map = HashMap::new();
        let live = |_, _| true;
        // Sent, record not here yet: held for the record.
        map.insert(key(5, 1), tally(3, 1));
        assert!(s.read(&mut map, Read::Periodic, live, unknown).is_empty());
        assert!(s.read(&mut map, Read::Periodic, live, unknown).is_empty());
        s.site_found(key(5, 1), site_event("a"));
        let c = s.read(&mut map, Read::Periodic, live, unknown);
        assert_eq!((total(&c), culprit(&c[0])), (3, Some("a")));
        // Unsent (its record was lost): the second read counts it under
        // the unknown stack; its record, sent by a later call, takes the
        // calls after that.
        map.insert(key(5, 2), tally(4, 0));
        assert!(s.read(&mut map, Read::Periodic, live, unknown).is_empty());
        let c = s.read(&mut map, Read::Periodic, live, unknown);
        assert_eq!((total(&c), culprit(&c[0])), (4, None));
        map.insert(key(5, 2), tally(6, 1));
        s.site_found(key(5, 2), site_event("b"));
        let c = s.read(&mut map, Read::Periodic, live, unknown);
        assert_eq!((total(&c), culprit(&c[0])), (2, Some("b")));
        // The final read counts everything.
        map.insert(key(5, 3), tally(7, 1));
        let c = s.read(&mut map, Read::Final, live, unknown);
        assert_eq!((total(&c), culprit(&c[0])), (7, None));
    }

    #[test]
    fn a_thread_that_exits_is_read_a_last_time_and_deleted() {
        let mut s = StrictSites::new();
        let mut map = HashMap::new();
        for (tid, site, f) in [(5, 1, "a"), (5, 2, "b"), (6, 1, "c")] {
            map.insert(key(tid, site), tally(10, 1));
            s.site_found(key(tid, site), site_event(f));
        }
        let live = |_, _| true;
        assert_eq!(total(&s.read(&mut map, Read::Periodic, live, unknown)), 30);
        map.insert(key(5, 1), tally(12, 1));
        // Unknown to the pipeline (record lost): read and deleted too.
        map.insert(key(5, 9), tally(1, 0));
        s.pending.insert(key(5, 9), Pending::default());
        let c = s.thread_exit(&mut map, 5, unknown);
        assert_eq!(total(&c), 3, "{c:?}");
        assert_eq!(map.keys().collect::<Vec<_>>(), [&key(6, 1)]);
        assert_eq!(s.len(), 1);
        assert!(s.thread_exit(&mut map, 5, unknown).is_empty());
    }

    #[test]
    fn a_thread_gone_without_its_exit_is_swept() {
        let mut s = StrictSites::new();
        let mut map = HashMap::new();
        map.insert(key(5, 1), tally(10, 1));
        map.insert(key(6, 1), tally(2, 0));
        s.site_found(key(5, 1), site_event("a"));
        let gone = |_, tid| tid != 6;
        let c = s.read(&mut map, Read::Periodic, gone, unknown);
        assert_eq!(total(&c), 10, "its Exit record may still come");
        assert_eq!(map.len(), 2);
        let c = s.read(&mut map, Read::Periodic, gone, unknown);
        assert_eq!(total(&c), 2, "gone twice: its unsent site counts");
        assert_eq!(map.keys().collect::<Vec<_>>(), [&key(5, 1)]);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn exec_ends_the_old_programs_sites() {
        let mut s = StrictSites::new();
        let mut map = HashMap::new();
        map.insert(key(5, 1), tally(10, 1));
        s.site_found(key(5, 1), site_event("a"));
        let mut other = key(7, 1);
        other.tgid = 7;
        map.insert(other, tally(1, 1));
        s.site_found(other, site_event("z"));
        assert_eq!(total(&s.exec(&mut map, 1, unknown)), 10);
        assert_eq!(map.keys().collect::<Vec<_>>(), [&other]);
    }
}
