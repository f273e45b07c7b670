//! Call sites whose stack is already known: the kernel sends a wait's
//! native stack (frame-pointer walk and 16 KiB user-stack copy) only the
//! first time it sees its call site, and the frames built from it then are
//! reused for every later wait there.
//!
//! A site is the kernel's hash of the wait's user `ip` and `sp`, its
//! nearest frame-pointer return addresses and its CPython (code,
//! instruction) pairs (`SiteKey`). Two different native stacks with all of
//! these equal would share frames; at the same `sp` and `ip` that takes two
//! callers with identical frame sizes whose own callers keep no frame
//! pointer, and CPython frames, which tell Python callers apart, are part
//! of the key. That trade is what lets a busy host's repeated waits cost
//! no copy, no unwinding and no symbolization (ARCHITECTURE.md, "Known
//! call sites").
//!
//! Right after it sends a site's stacks, the kernel sends that site's next
//! waits without them for up to a second (`SENT_SITES`): those records come
//! after the full one, so the frames are here when they are read. Once the
//! frames are here, the site is known (`KNOWN_SITES`) with a check of
//! where its callers' return addresses were: a wait whose callers differ
//! sends its stacks, window or not. Only a stack that came whole (its copy
//! arrived) is learned; one with a frame not named yet (a JIT frame whose
//! perf map line was not written) is known only for a while after each
//! send (`SITE_REFRESH`), so it is looked up again. A site is added to the
//! kernel map only once its frames are here, and leaves it before it
//! leaves here (eviction, the process's exec or exit).

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use blockwatch_common::{MAX_KNOWN_SITES, SITE_CHECKS, SITE_REFRESH, SiteCheck, SiteKey};
use log::debug;

use crate::FastMap;
use crate::event::Stack;
use crate::ingest::decode::UserStackRecord;

/// The kernel's `KNOWN_SITES` (a trait so the cache's logic is testable
/// without a kernel).
pub trait KnownSites {
    fn add(&mut self, key: SiteKey, check: SiteCheck) -> Result<(), MapError>;
    fn drop_site(&mut self, key: &SiteKey);
}

impl KnownSites for BpfHashMap<MapData, SiteKey, SiteCheck> {
    fn add(&mut self, key: SiteKey, check: SiteCheck) -> Result<(), MapError> {
        self.insert(key, check, 0)
    }

    fn drop_site(&mut self, key: &SiteKey) {
        // Absent is fine: the map refused it, or never had it.
        let _ = self.remove(key);
    }
}

/// Sites kept, as many as the kernel's map holds.
const MAX_SITES: usize = MAX_KNOWN_SITES as usize;

struct Site {
    stack: Stack,
    last_used: u64,
    /// What the kernel checks the site's waits against, if anything.
    check: Option<SiteCheck>,
    /// Stacks of other callers sent since the kernel last skipped one of
    /// this site's: enough of them in a row and the site follows them.
    others: u8,
}

/// Other callers' stacks in a row, with none of the known one's waits
/// between, after which a site follows the other caller.
const SWITCH_AFTER: u8 = 4;

/// Whether two checks check the same callers (flags aside).
fn same_callers(a: &SiteCheck, b: &SiteCheck) -> bool {
    a.n == b.n && a.offs == b.offs && a.vals == b.vals
}

/// The frames of every known call site, by process and site.
#[derive(Default)]
pub struct Sites {
    sites: FastMap<u32, FastMap<u64, Site>>,
    len: usize,
    /// A logical clock for least-recently-used eviction.
    tick: u64,
}

impl Sites {
    pub fn new() -> Self {
        Self::default()
    }

    /// The stack of site `site` of process `pid`, if known.
    pub fn get(&mut self, pid: u32, site: u64) -> Option<&Stack> {
        self.tick += 1;
        let tick = self.tick;
        let s = self.sites.get_mut(&pid)?.get_mut(&site)?;
        s.last_used = tick;
        s.others = 0;
        Some(&s.stack)
    }

    /// Remembers `stack`, built from a whole stack (its copy arrived), as
    /// the stack of site `site` of process `pid`: the kernel may already
    /// send that site's next waits without stacks (`SENT_SITES`). When
    /// `check` says where its callers are, the kernel is told (`known`) to
    /// skip the stacks of waits with those callers: for good when every
    /// frame is named, else only for a while after each send
    /// (`SITE_REFRESH`), so a JIT frame whose perf map line was not
    /// written yet is looked up again.
    ///
    /// A site already known with other callers keeps them: the kernel may
    /// have skipped the stacks of their waits after sending these, and
    /// those records, still in flight, must find their own frames. It
    /// follows the new callers only once `SWITCH_AFTER` of their stacks
    /// came with none of the old callers' waits between.
    pub fn learn(
        &mut self,
        pid: u32,
        site: u64,
        stack: &Stack,
        check: Option<SiteCheck>,
        known: &mut impl KnownSites,
    ) {
        if stack.is_empty() {
            return;
        }
        self.tick += 1;
        let tick = self.tick;
        if let Some(s) = self.sites.get_mut(&pid).and_then(|p| p.get_mut(&site))
            && let Some(old) = s.check
            && !check.is_some_and(|c| same_callers(&c, &old))
        {
            s.last_used = tick;
            s.others = s.others.saturating_add(1);
            if s.others < SWITCH_AFTER {
                return;
            }
        }
        let fresh = !self.sites.get(&pid).is_some_and(|p| p.contains_key(&site));
        if fresh
            && self.len >= MAX_SITES
            && let Some((old_pid, old_site)) = self.least_recently_used()
        {
            self.unlearn(old_pid, old_site, known);
        }
        let named = stack.iter().all(|f| f.function.is_some());
        let check = check.map(|c| SiteCheck {
            flags: if named { 0 } else { SITE_REFRESH },
            ..c
        });
        let entry = Site {
            stack: stack.clone(),
            last_used: tick,
            check,
            others: 0,
        };
        if self
            .sites
            .entry(pid)
            .or_default()
            .insert(site, entry)
            .is_none()
        {
            self.len += 1;
        }
        let Some(check) = check else {
            known.drop_site(&key(pid, site));
            return;
        };
        // Full (another session's sites, or a race with deletes): the site
        // keeps sending its stacks, which is only slower.
        if let Err(e) = known.add(key(pid, site), check) {
            debug!("call site {site:#x} of pid {pid} not handed to the kernel: {e}");
            if let Some(s) = self.sites.get_mut(&pid).and_then(|p| p.get_mut(&site)) {
                s.check = None;
            }
        }
    }

    /// The site used longest ago (a scan: only when the cache is full).
    fn least_recently_used(&self) -> Option<(u32, u64)> {
        self.sites
            .iter()
            .flat_map(|(&pid, sites)| sites.iter().map(move |(&s, v)| (v.last_used, pid, s)))
            .min()
            .map(|(_, pid, s)| (pid, s))
    }

    /// Forgets one site, the kernel's copy first: its next wait sends its
    /// stacks again.
    pub fn unlearn(&mut self, pid: u32, site: u64, known: &mut impl KnownSites) {
        known.drop_site(&key(pid, site));
        if let Some(sites) = self.sites.get_mut(&pid)
            && sites.remove(&site).is_some()
        {
            self.len -= 1;
            if sites.is_empty() {
                self.sites.remove(&pid);
            }
        }
    }

    /// Forgets every site of process `pid` (it exec'd or exited: its
    /// addresses mean something else now, or nothing).
    pub fn forget(&mut self, pid: u32, known: &mut impl KnownSites) {
        let Some(sites) = self.sites.remove(&pid) else {
            return;
        };
        self.len -= sites.len();
        for site in sites.keys() {
            known.drop_site(&key(pid, *site));
        }
    }

    /// Sites kept.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The check of a stack whose native return addresses are `ips`
/// (innermost first, `ips[0]` the wait's own address), unwound from
/// `copy`: where in the copy each of the nearest callers' return addresses
/// was. None when one of them is not in it (frames found by the
/// frame-pointer walk beyond the copy are not checked, but the nearest
/// must be).
pub fn site_check(copy: &UserStackRecord, ips: &[u64]) -> Option<SiteCheck> {
    let mut check = SiteCheck::default();
    let mut from = 0usize;
    for &ret in ips.iter().skip(1).take(SITE_CHECKS) {
        let at = copy.stack[from..]
            .chunks_exact(8)
            .position(|w| w == ret.to_ne_bytes())?;
        let off = from + at * 8;
        check.offs[check.n as usize] = u32::try_from(off).ok()?;
        check.vals[check.n as usize] = ret;
        check.n += 1;
        from = off + 8;
    }
    // A wait with callers must have at least one checked.
    (ips.len() <= 1 || check.n > 0).then_some(check)
}

fn key(pid: u32, site: u64) -> SiteKey {
    SiteKey {
        tgid: pid,
        _pad: 0,
        site,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Frame;

    #[derive(Default)]
    struct Kernel(std::collections::HashMap<SiteKey, SiteCheck>);

    impl KnownSites for Kernel {
        fn add(&mut self, key: SiteKey, check: SiteCheck) -> Result<(), MapError> {
            self.0.insert(key, check);
            Ok(())
        }
        fn drop_site(&mut self, key: &SiteKey) {
            self.0.remove(key);
        }
    }

    fn check_of(ret: u64) -> SiteCheck {
        let mut c = SiteCheck {
            n: 1,
            ..Default::default()
        };
        c.vals[0] = ret;
        c
    }

    fn name_at(sites: &mut Sites, pid: u32, site: u64) -> Option<String> {
        sites.get(pid, site)?[0].function.clone()
    }

    fn st(frames: &[Frame]) -> Stack {
        frames.to_vec().into()
    }

    fn frame(name: Option<&str>) -> Frame {
        Frame {
            address: 0x1000,
            function: name.map(str::to_string),
            module: Some("/bin/x".into()),
            file: None,
            line: None,
            inlined: false,
            kind: Default::default(),
        }
    }

    fn copy(words: &[u64]) -> UserStackRecord {
        UserStackRecord {
            pid: 1,
            tid: 1,
            start_ns: 0,
            ip: 0x10,
            sp: 0x7000,
            bp: 0,
            stack: words.iter().flat_map(|w| w.to_ne_bytes()).collect(),
        }
    }

    #[test]
    fn a_check_names_where_each_caller_was_found() {
        let c = copy(&[5, 0x401000, 7, 7, 0x402000, 0x403000]);
        let check = site_check(&c, &[0x10, 0x401000, 0x402000, 0x403000]).unwrap();
        assert_eq!(check.n, 3);
        assert_eq!(&check.offs[..3], &[8, 32, 40]);
        assert_eq!(&check.vals[..3], &[0x401000, 0x402000, 0x403000]);
    }

    #[test]
    fn a_caller_missing_from_the_copy_ends_the_check() {
        let c = copy(&[0x401000, 0]);
        // The second caller is not in the copy (found beyond it): only the
        // first is checked; a first caller not found means no check.
        assert_eq!(site_check(&c, &[0x10, 0x401000, 0x999000]), None);
        assert_eq!(site_check(&c, &[0x10, 0x999000]), None);
        assert_eq!(site_check(&c, &[0x10]).map(|c| c.n), Some(0));
    }

    #[test]
    fn a_learned_site_is_known_to_both_sides() {
        let (mut sites, mut kernel) = (Sites::new(), Kernel::default());
        sites.learn(
            7,
            0xabc,
            &st(&[frame(Some("f"))]),
            Some(SiteCheck::default()),
            &mut kernel,
        );
        assert_eq!(sites.get(7, 0xabc).map(|f| f.len()), Some(1));
        assert_eq!(kernel.0[&key(7, 0xabc)].flags, 0);
        assert!(sites.get(8, 0xabc).is_none(), "sites are per process");
    }

    #[test]
    fn a_stack_with_an_unnamed_frame_is_known_only_until_it_is_sent_again() {
        let (mut sites, mut kernel) = (Sites::new(), Kernel::default());
        let frames = [frame(Some("f")), frame(None)];
        sites.learn(7, 1, &st(&frames), Some(SiteCheck::default()), &mut kernel);
        sites.learn(7, 2, &st(&[frame(Some("g"))]), None, &mut kernel);
        sites.learn(
            7,
            3,
            &Stack::default(),
            Some(SiteCheck::default()),
            &mut kernel,
        );
        assert_eq!(sites.len(), 2, "kept for the waits sent meanwhile");
        assert_eq!(kernel.0.len(), 1, "a site without a check is not known");
        assert_eq!(kernel.0[&key(7, 1)].flags, SITE_REFRESH);
        assert!(sites.get(7, 3).is_none());
        // Sent again, now named: known for good.
        let named = [frame(Some("f")), frame(Some("jit"))];
        sites.learn(7, 1, &st(&named), Some(SiteCheck::default()), &mut kernel);
        assert_eq!(kernel.0[&key(7, 1)].flags, 0);
        assert_eq!(sites.get(7, 1).unwrap()[1].function.as_deref(), Some("jit"));
    }

    #[test]
    fn a_second_caller_does_not_take_the_site_of_a_known_one() {
        let (mut sites, mut kernel) = (Sites::new(), Kernel::default());
        sites.learn(
            7,
            1,
            &st(&[frame(Some("a"))]),
            Some(check_of(0xa)),
            &mut kernel,
        );
        // The kernel may have skipped a's stacks after sending b's: those
        // records still find a's frames.
        sites.learn(
            7,
            1,
            &st(&[frame(Some("b"))]),
            Some(check_of(0xb)),
            &mut kernel,
        );
        assert_eq!(name_at(&mut sites, 7, 1).as_deref(), Some("a"));
        assert_eq!(kernel.0[&key(7, 1)].vals[0], 0xa);
        // A stack without a check is another caller too.
        sites.learn(7, 1, &st(&[frame(Some("c"))]), None, &mut kernel);
        assert_eq!(name_at(&mut sites, 7, 1).as_deref(), Some("a"));
    }

    #[test]
    fn a_site_follows_a_caller_that_took_over() {
        let (mut sites, mut kernel) = (Sites::new(), Kernel::default());
        sites.learn(
            7,
            1,
            &st(&[frame(Some("a"))]),
            Some(check_of(0xa)),
            &mut kernel,
        );
        for _ in 1..SWITCH_AFTER {
            sites.learn(
                7,
                1,
                &st(&[frame(Some("b"))]),
                Some(check_of(0xb)),
                &mut kernel,
            );
        }
        // One of a's waits between: b's run starts over.
        assert!(sites.get(7, 1).is_some());
        for _ in 1..SWITCH_AFTER {
            sites.learn(
                7,
                1,
                &st(&[frame(Some("b"))]),
                Some(check_of(0xb)),
                &mut kernel,
            );
        }
        assert_eq!(kernel.0[&key(7, 1)].vals[0], 0xa);
        sites.learn(
            7,
            1,
            &st(&[frame(Some("b"))]),
            Some(check_of(0xb)),
            &mut kernel,
        );
        assert_eq!(kernel.0[&key(7, 1)].vals[0], 0xb);
        assert_eq!(name_at(&mut sites, 7, 1).as_deref(), Some("b"));
    }

    #[test]
    fn a_process_takes_its_sites_with_it() {
        let (mut sites, mut kernel) = (Sites::new(), Kernel::default());
        sites.learn(
            7,
            1,
            &st(&[frame(Some("f"))]),
            Some(SiteCheck::default()),
            &mut kernel,
        );
        sites.learn(
            7,
            2,
            &st(&[frame(Some("g"))]),
            Some(SiteCheck::default()),
            &mut kernel,
        );
        sites.learn(
            9,
            1,
            &st(&[frame(Some("h"))]),
            Some(SiteCheck::default()),
            &mut kernel,
        );
        sites.forget(7, &mut kernel);
        assert_eq!(sites.len(), 1);
        assert_eq!(kernel.0.len(), 1);
        assert!(sites.get(9, 1).is_some());
    }

    #[test]
    fn the_cache_is_bounded_and_drops_the_least_recently_used() {
        let (mut sites, mut kernel) = (Sites::new(), Kernel::default());
        for s in 0..MAX_SITES as u64 {
            sites.learn(
                1,
                s,
                &st(&[frame(Some("f"))]),
                Some(SiteCheck::default()),
                &mut kernel,
            );
        }
        // Site 0 used again: site 1 is now the oldest.
        assert!(sites.get(1, 0).is_some());
        sites.learn(
            2,
            99,
            &st(&[frame(Some("g"))]),
            Some(SiteCheck::default()),
            &mut kernel,
        );
        assert_eq!(sites.len(), MAX_SITES);
        assert_eq!(kernel.0.len(), MAX_SITES);
        assert!(sites.get(1, 1).is_none() && !kernel.0.contains_key(&key(1, 1)));
        assert!(sites.get(1, 0).is_some() && sites.get(2, 99).is_some());
    }
}
