//! Every map and frozen global of the kernel programs, and the accessors
//! the logic reads them through.
//!
//! User space owns the settings (`CONFIG`, `LOOP_CONFIG`, the globals) and
//! the process-level knowledge (`WATCHED`, `PARKS`, `PYPROCS`,
//! `KNOWN_SITES`); the kernel
//! owns the per-thread state (`THREADS`, `STACKS`, `USER_STACKS`,
//! `LOOPSTATE`), and both read `COUNTERS` and the `EVENTS` ring buffer from
//! their own end.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use blockwatch_common::{
    COMM_MATCH_MAX, CommMatch, Config, Counter, KernelOffsets, LoopClock, LoopConfig, LoopState,
    MAX_FRAMES, MAX_KNOWN_SITES, NUM_COUNTERS, PyProc, SiteCheck, SiteKey, StackBuf, StrictCall,
    StrictKey, StrictTally, TAG_FILTER_WORDS, TAG_LOOP, ThreadTag, UserStack, WatchRule,
    tag_filter_bits,
};

#[map]
pub(crate) static THREADS: HashMap<u32, ThreadTag> = HashMap::with_max_entries(65536, 0);
/// The tag filter: a TID whose bits are clear in both halves has no
/// `THREADS` entry, and one without its `looping` bit is a plain candidate
/// (blockwatch-common `TagFilterBits`). Nearly every context switch is of
/// untagged threads, and an array lookup the verifier inlines costs them
/// far less than a hash lookup that finds nothing (`sched_switch` on
/// untagged threads: 0.7× with this filter alone, measured); a plain
/// candidate's tag is looked up only when it sleeps in an epoll or futex
/// wait. A set bit may be stale (the lookup then finds nothing, or a
/// candidate pays a loop's lookups), a clear one never is: each half has
/// one writer, as a bit lost to two writers of one word would hide a
/// tagged thread. This half is the kernel's, changed by atomic adds only,
/// of bits that no other CPU changes at that moment (a TID's bits change
/// in its own life's order: at its creation, exec and exit, and in its own
/// switches and ticks when it becomes a loop or sends a probe).
#[map]
pub(crate) static TAGGED_BY_KERNEL: Array<u64> = Array::with_max_entries(TAG_FILTER_WORDS, 0);
/// User space's half: it sets a TID's bits before it tags the thread and
/// clears them once the tag is gone; words are written whole, by it only.
#[map]
pub(crate) static TAGGED_BY_USER: Array<u64> = Array::with_max_entries(TAG_FILTER_WORDS, 0);
#[map]
pub(crate) static WATCHED: HashMap<u32, WatchRule> = HashMap::with_max_entries(16384, 0);
/// Futex addresses user space identified as a thread's runtime park (idle).
#[map]
pub(crate) static PARKS: HashMap<u32, u64> = HashMap::with_max_entries(16384, 0);
/// The stacks of each loop thread's waits (two slots a thread, see
/// stack.rs), written in place at switch-out and read when the episode is
/// sent; an entry lives as long as its thread. Copying a whole value in
/// at every wait (1.5 KiB, mostly frames a known site does not need) cost
/// more than the rest of the capture.
#[map]
pub(crate) static STACKS: HashMap<u32, StackBuf> = HashMap::with_max_entries(8192, 0);
/// One zeroed value, never written: the source of a new `STACKS` entry.
#[map]
pub(crate) static STACK_ZERO: Array<StackBuf> = Array::with_max_entries(1, 0);
/// CPython processes and their layout, from user space.
#[map]
pub(crate) static PYPROCS: HashMap<u32, PyProc> = HashMap::with_max_entries(4096, 0);
#[map]
pub(crate) static CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// Process-name patterns matched at exec (`CommMatch`); the first
/// `Config::comm_matches` are in use.
#[map]
pub(crate) static COMM_MATCHES: Array<CommMatch> = Array::with_max_entries(COMM_MATCH_MAX, 0);
/// One slot per [`Counter`].
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(NUM_COUNTERS as u32, 0);
/// Every record to user space. 16 MiB: at 100,000 episodes a second
/// (664 bytes each once their call sites are known) it holds about 250 ms,
/// the longest user space pauses (a cold symbolizer reading a binary's
/// DWARF at start-up). Its pages are the kernel's; user space's resident
/// memory grows only with the pages it has read.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(16 << 20, 0);

/// The stack words `sched_switch` checks a known call site by, in a
/// process without interpreter frames (stack.rs, `capture_native`).
#[map]
pub(crate) static SWITCH_WINDOW: PerCpuArray<[u64; MAX_FRAMES]> =
    PerCpuArray::with_max_entries(1, 0);

/// Frame-walk scratch of `strict_exit`. Each program that walks frames
/// outside `STACKS` has its own: the sampling program can interrupt the
/// others on the same CPU.
#[map]
pub(crate) static STRICT_SCRATCH: PerCpuArray<StackBuf> = PerCpuArray::with_max_entries(1, 0);
/// Frame-walk scratch of `episode_sample`.
#[map]
pub(crate) static SAMPLE_SCRATCH: PerCpuArray<StackBuf> = PerCpuArray::with_max_entries(1, 0);

/// The top of the user stack of each loop thread's latest non-idle wait,
/// for DWARF unwinding in user space.
///
/// Why a hash without preallocation, entries kept for the thread's life:
/// a preallocated map would pin `max_entries` × 32 KiB (128 MiB) whether or
/// not anything blocks; without preallocation memory follows the loop
/// threads that actually blocked (a few per process). An entry is reused
/// by every later wait of its thread rather than deleted at switch-in, so
/// the hot path never allocates (freed elements of a non-preallocated map
/// come back only after an RCU grace period, and a burst of waits on one
/// CPU would run its allocator cache dry); exit and exec delete it. A
/// per-CPU scratch could not hold it (per-CPU values stop at 32 KiB) and
/// is not needed: the copy is made straight into the map value.
#[map]
pub(crate) static USER_STACKS: HashMap<u32, UserStack> =
    HashMap::with_max_entries(8192, BPF_F_NO_PREALLOC);
/// One zeroed value, never written: the source of a new `USER_STACKS` entry
/// (an update copies a whole value from somewhere).
#[map]
pub(crate) static USER_STACK_ZERO: Array<UserStack> = Array::with_max_entries(1, 0);

/// Set while a program that runs in a thread's own context with interrupts
/// on (the syscall hooks, exec, exit) is at work on the thread's
/// episode. The sampler's timer interrupt can stop such a program midway
/// on its CPU; it must then leave the episode alone, or the two
/// read-modify-writes interleave (an episode sent twice, once with its
/// parts and once without, was seen under `--strict`).
#[map]
pub(crate) static EPISODE_BUSY: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Holds `EPISODE_BUSY` for its lifetime.
pub(crate) struct EpisodeBusy;

impl EpisodeBusy {
    #[inline(always)]
    pub(crate) fn hold() -> Self {
        set_episode_busy(1);
        EpisodeBusy
    }
}

impl Drop for EpisodeBusy {
    #[inline(always)]
    fn drop(&mut self) {
        set_episode_busy(0);
    }
}

#[inline(always)]
fn set_episode_busy(v: u32) {
    // Index 0 of a per-CPU array always exists.
    if let Some(b) = EPISODE_BUSY.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; the programs that write it run in thread
        // context and do not nest on a CPU.
        unsafe { *b = v };
    }
}

/// Whether the sampler interrupted a thread-context program at work on
/// an episode (see `EPISODE_BUSY`).
#[inline(always)]
pub(crate) fn episode_busy() -> bool {
    EPISODE_BUSY.get(0).is_some_and(|b| *b != 0)
}

/// Settings of the sampler and of strict mode.
#[map]
pub(crate) static LOOP_CONFIG: Array<LoopConfig> = Array::with_max_entries(1, 0);
/// Each loop thread's current episode (episode.rs).
#[map]
pub(crate) static LOOPSTATE: HashMap<u32, LoopState> = HashMap::with_max_entries(16384, 0);
/// Each loop thread's iteration clock, found by user space.
#[map]
pub(crate) static CLOCKS: HashMap<u32, LoopClock> = HashMap::with_max_entries(16384, 0);
/// The pending strict syscall of each loop thread.
#[map]
pub(crate) static STRICT_CALLS: HashMap<u32, StrictCall> = HashMap::with_max_entries(16384, 0);
/// Every strict call, counted per (thread, syscall, call site). User space
/// reads it and deletes a thread's entries once the thread is gone, so
/// it holds the call sites of live loop threads; a call whose site finds
/// it full is counted under `Counter::LostStrictSites`. Not preallocated:
/// memory follows the sites in use, a new site allocates once, and an
/// entry user space deletes is freed only after the programs that may
/// hold it are done (RCU), never reused under them.
#[map]
pub(crate) static STRICT_COUNTS: HashMap<StrictKey, StrictTally> =
    HashMap::with_max_entries(STRICT_SITES, BPF_F_NO_PREALLOC);
/// Entries of `STRICT_COUNTS`.
pub(crate) const STRICT_SITES: u32 = 16384;
/// Call sites whose native stack user space already unwound (it adds a
/// site after the first full stack from it, and deletes a process's sites
/// when it execs or exits). A wait at a known site takes no stack and
/// sends none: at a busy loop the same few sites block again and again,
/// and copying 16 KiB of stack per wait is what limited the event rate.
/// Full, it only means more sites send their stacks.
#[map]
pub(crate) static KNOWN_SITES: HashMap<SiteKey, SiteCheck> =
    HashMap::with_max_entries(MAX_KNOWN_SITES, BPF_F_NO_PREALLOC);
/// Call sites whose stacks were just sent, and when: user space has them
/// when it reads any later record, so until it adds the site to
/// `KNOWN_SITES` (or `SENT_WINDOW_NS` passes) their waits send none
/// either. Without it, a burst of new sites (a busy process attached to)
/// fills the ring buffer with full stacks, whose 16 KiB copies then find no
/// room, so no site is ever learned.
#[map]
pub(crate) static SENT_SITES: LruHashMap<SiteKey, u64> =
    LruHashMap::with_max_entries(MAX_KNOWN_SITES, 0);

/// Filled in by user space from the running kernel's BTF before load.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets::ZERO;

/// Bytes of user stack copied per blocking wait, at most `MAX_USER_STACK`;
/// 0 keeps frame pointers only. Set by user space before load.
#[unsafe(no_mangle)]
static USER_STACK_SIZE: u32 = 0;

/// bpf(2) map update flag: fail if the key exists.
pub(crate) const BPF_NOEXIST: u64 = 1;

#[inline(always)]
pub(crate) fn off() -> KernelOffsets {
    // SAFETY: a plain read of a global the loader froze before load; the
    // volatile read stops the compiler from folding the zero initialiser.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
pub(crate) fn user_stack_size() -> usize {
    // SAFETY: as in `off`.
    unsafe { core::ptr::read_volatile(&USER_STACK_SIZE) as usize }
}

#[inline(always)]
pub(crate) fn count(counter: Counter) {
    // Every `Counter` has its slot: the lookup cannot fail.
    if let Some(c) = COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: per-CPU slot, no other writer while this program runs.
        unsafe { *c += 1 };
    }
}

/// Off-CPU time at or above which a wait is sent; none before user space
/// configured it.
#[inline(always)]
pub(crate) fn threshold_ns() -> u64 {
    CONFIG.get(0).map(|c| c.threshold_ns).unwrap_or(u64::MAX)
}

#[inline(always)]
pub(crate) fn comm_matches() -> u32 {
    CONFIG.get(0).map(|c| c.comm_matches as u32).unwrap_or(0)
}

#[inline(always)]
pub(crate) fn notify_all_execs() -> bool {
    CONFIG
        .get(0)
        .map(|c| c.notify_all_execs != 0)
        .unwrap_or(false)
}

#[inline(always)]
pub(crate) fn loop_config() -> Option<&'static LoopConfig> {
    LOOP_CONFIG.get(0)
}

/// The value at `key` of a map whose entries belong to one thread (its
/// programs are serialised by the scheduler), created from `zero`'s only
/// value on first use; None when the map is full.
// The entry is the map's, not part of the references passed in.
#[allow(clippy::mut_from_ref)]
#[inline(always)]
pub(crate) fn thread_entry<V>(
    map: &'static HashMap<u32, V>,
    key: u32,
    zero: &'static Array<V>,
) -> Option<&'static mut V> {
    // SAFETY (both): map value pointer, valid for this run; only the
    // owning thread's programs touch the entry, one at a time.
    if let Some(v) = map.get_ptr_mut(key) {
        return Some(unsafe { &mut *v });
    }
    let zero = zero.get(0)?;
    map.insert(key, zero, 0).ok()?;
    map.get_ptr_mut(key).map(|v| unsafe { &mut *v })
}

/// The thread's tag, if it has one.
#[inline(always)]
pub(crate) fn thread(tid: u32) -> Option<&'static mut ThreadTag> {
    if filter(tid) == Filter::Untagged {
        return None;
    }
    tag_of(tid)
}

/// The thread's tag, looked up whatever the filter says.
#[inline(always)]
pub(crate) fn tag_of(tid: u32) -> Option<&'static mut ThreadTag> {
    // SAFETY: map value pointer, valid for this program run; only the
    // thread's own switches and syscalls touch its entry, and the
    // scheduler serialises those.
    THREADS.get_ptr_mut(tid).map(|t| unsafe { &mut *t })
}

/// What the tag filter says of a TID (see `TagFilterBits`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Filter {
    /// It has no tag.
    Untagged,
    /// It may be tagged, as a plain candidate at most.
    Candidate,
    /// It may run a loop, or be a candidate whose park may be learned.
    Loop,
}

#[inline(always)]
pub(crate) fn filter(tid: u32) -> Filter {
    let Some(b) = tag_filter_bits(tid) else {
        return Filter::Loop;
    };
    match (TAGGED_BY_KERNEL.get(b.word), TAGGED_BY_USER.get(b.word)) {
        (Some(k), Some(u)) => {
            let w = *k | *u;
            if w & b.looping != 0 {
                Filter::Loop
            } else if w & b.tagged != 0 {
                Filter::Candidate
            } else {
                Filter::Untagged
            }
        }
        _ => Filter::Loop,
    }
}

/// Tags `tid`: its filter bits first, so no moment has the tag without
/// them. False when `THREADS` is full.
#[inline(always)]
pub(crate) fn tag(tid: u32, tag: ThreadTag) -> bool {
    mark(
        tid,
        Mark::Set {
            looping: tag.tag == TAG_LOOP,
        },
    );
    THREADS.insert(tid, tag, 0).is_ok()
}

/// Removes `tid`'s tag, if any, then its filter bits.
#[inline(always)]
pub(crate) fn untag(tid: u32) -> bool {
    let was_tagged = THREADS.remove(tid).is_ok();
    mark(tid, Mark::Clear);
    was_tagged
}

/// Every switch of tagged thread `tid` needs its tag from now on: it runs
/// a loop, or its park may be learned (it sent a futex probe).
#[inline(always)]
pub(crate) fn mark_looping(tid: u32) {
    mark(tid, Mark::Set { looping: true });
}

#[derive(Clone, Copy)]
enum Mark {
    Set { looping: bool },
    Clear,
}

/// Sets or clears `tid`'s bits in the kernel's half of the tag filter.
#[inline(always)]
fn mark(tid: u32, how: Mark) {
    let Some(b) = tag_filter_bits(tid) else {
        return;
    };
    let Some(p) = TAGGED_BY_KERNEL.get_ptr_mut(b.word) else {
        return;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let set_now = unsafe { core::ptr::read_volatile(p) } & (b.tagged | b.looping);
    let delta = match how {
        Mark::Set { looping } => {
            let wanted = b.tagged | if looping { b.looping } else { 0 };
            wanted & !set_now
        }
        Mark::Clear => set_now.wrapping_neg(),
    };
    if delta == 0 {
        return;
    }
    // An add (no result used: the one atomic every kernel has) of bits that
    // are known clear, or minus bits known set, changes only them, whatever
    // other CPUs add to the word's other bits meanwhile.
    // SAFETY: as above; the value is 8-byte aligned. (`AtomicU64` has no
    // read-modify-write methods on this target.)
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, delta,
        )
    };
}

/// A per-CPU scratch buffer, exclusively this program's during its run.
// The buffer is the map's (per-CPU) value, not part of the reference.
#[allow(clippy::mut_from_ref)]
#[inline(always)]
pub(crate) fn scratch(map: &'static PerCpuArray<StackBuf>) -> Option<&'static mut StackBuf> {
    // SAFETY: per-CPU value; a program runs to completion on its CPU, and
    // each program that may interrupt another has its own map.
    map.get_ptr_mut(0).map(|b| unsafe { &mut *b })
}
