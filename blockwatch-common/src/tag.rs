//! Per-thread state and the rules that create it.
//!
//! A watched process ([`WatchRule`], `WATCHED`) gets its threads tagged
//! ([`ThreadTag`], `THREADS`) by [`tag_for`], in the kernel for threads
//! created while attached and in user space for those that already ran.

/// Thread is watched but not (yet) known to run an event loop: nothing it
/// does is reported, but the kernel watches for its first idle wait.
pub const TAG_CANDIDATE: u8 = 1;
/// Thread runs an event loop: blocking waits are reported.
pub const TAG_LOOP: u8 = 2;

/// `--threads loop`: tag threads once they idle in their runtime's wait.
pub const THREADS_LOOP: u8 = 0;
/// `--threads main`: tag only each process's main thread.
pub const THREADS_MAIN: u8 = 1;
/// `--threads all`: tag every thread.
pub const THREADS_ALL: u8 = 2;

/// How many futex probes a thread may send before the kernel stops asking.
pub const PROBE_BUDGET: u8 = 16;

/// Words of each half of the tag filter (`TAGGED_BY_KERNEL`,
/// `TAGGED_BY_USER`): two bits per TID up to the kernel's largest PID
/// (`PID_MAX_LIMIT`, 4,194,304 on 64-bit), 1 MiB a half.
pub const TAG_FILTER_WORDS: u32 = 131072;

/// A TID's two bits in the tag filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TagFilterBits {
    pub word: u32,
    /// The thread may be tagged.
    pub tagged: u64,
    /// It may run a loop, or be a candidate whose park may be learned:
    /// every switch of it needs its tag. Without this bit a tagged thread
    /// is a plain candidate, whose tag matters only when it sleeps in an
    /// epoll or futex wait (or the sampler finds it running).
    pub looping: u64,
}

/// `tid`'s bits in the tag filter, or `None` past its end (such a TID may
/// always be tagged, and may always run a loop).
#[inline(always)]
pub const fn tag_filter_bits(tid: u32) -> Option<TagFilterBits> {
    let word = tid >> 5;
    if word >= TAG_FILTER_WORDS {
        return None;
    }
    let tagged = 1u64 << ((tid & 31) * 2);
    Some(TagFilterBits {
        word,
        tagged,
        looping: tagged << 1,
    })
}

/// A watched process (key: TGID in `WATCHED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchRule {
    /// `THREADS_*`.
    pub threads: u8,
    /// Children forked by the process are watched with the same rule.
    pub follow_children: u8,
    pub _pad: [u8; 6],
}

/// Most process-name patterns the kernel matches itself (`COMM_MATCHES`).
pub const COMM_MATCH_MAX: u32 = 16;

/// A process-name pattern the kernel matches at exec, so that a process
/// selected by its name is watched from its first instruction rather than
/// from whenever user space reads the exec notice: the name exactly
/// (`exact`) or any name that begins with `name[..len]`. An `exclude`
/// pattern that matches keeps the kernel from watching the process by
/// name at all. User space matches every exec too (all glob forms, and
/// the other selectors); this is its head start, never the only path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CommMatch {
    pub name: [u8; 16],
    pub len: u8,
    pub exact: u8,
    pub exclude: u8,
    pub _pad: [u8; 5],
    pub rule: WatchRule,
}

impl CommMatch {
    /// Whether `comm` (a task's NUL-padded name) matches.
    #[inline(always)]
    pub fn matches(&self, comm: &[u8; 16]) -> bool {
        let len = self.len as usize;
        // A constant bound the verifier can follow; `len` is at most 15.
        for (i, (c, n)) in comm.iter().zip(self.name.iter()).enumerate() {
            if i >= len {
                break;
            }
            if c != n {
                return false;
            }
        }
        self.exact == 0 || (len < 16 && comm[len & 15] == 0)
    }
}

/// The tag a thread of a process watched under `rule` starts with (0:
/// none, the thread is not watched).
#[inline(always)]
pub const fn tag_for(rule: &WatchRule, main_thread: bool) -> u8 {
    match rule.threads {
        THREADS_ALL => TAG_LOOP,
        THREADS_MAIN if main_thread => TAG_LOOP,
        THREADS_MAIN => 0,
        _ => TAG_CANDIDATE,
    }
}

/// Per-thread state, kept by the kernel in `THREADS` (key: TID).
///
/// User space inserts entries for threads that existed before it attached
/// (with `BPF_NOEXIST`, never overwriting the kernel's) and otherwise only
/// reads them; everything it learns goes through `PARKS` instead, so the two
/// sides never race on one value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ThreadTag {
    /// Switch-out time of a pending blocking wait; 0 when none is pending.
    pub out_ns: u64,
    /// Syscall number of the pending wait, or -1 when not in a syscall.
    pub syscall: i64,
    /// First syscall arguments of the pending wait (rdi, rsi, rdx).
    pub args: [u64; 3],
    /// The thread's CPython `PyThreadState`, once found; 0 unknown.
    pub py_tstate: u64,
    pub tgid: u32,
    /// The loop's own epoll fd, learned from its first idle wait; -1 unknown.
    pub loop_epfd: i32,
    pub tag: u8,
    /// `STATE_*` of the pending wait.
    pub off_state: u8,
    pub probe_budget: u8,
    /// 1: user space found this candidate asleep in an epoll wait on
    /// `loop_epfd` when it tagged it, and did for it what a `LoopFound`
    /// record asks: its next switch-in is its loop coming back from its
    /// idle wait, so it runs a loop from then, and the first call that
    /// blocks it counts (the kernel saw no wait of it to learn that from).
    pub asleep_in_loop: u8,
    pub _pad: [u8; 4],
    /// The `struct file` of the loop's epoll fd, kept when the thread was
    /// found to run a loop (0 for threads tagged as loops from the start):
    /// when that fd no longer holds it, the loop has ended.
    pub loop_file: u64,
    /// That file's `f_op`: a different file with the same operations at the
    /// same fd is a new epoll instance, i.e. a new loop.
    pub loop_fops: u64,
    /// The thread's CPU time (`sum_exec_runtime`) at its latest
    /// switch-out: with it, a switch-in `sched_switch` did not show is
    /// placed where the scheduler's own accounting says it was.
    pub out_cpu_ns: u64,
}

impl ThreadTag {
    pub const fn new(tgid: u32, tag: u8) -> Self {
        Self {
            out_ns: 0,
            syscall: -1,
            args: [0; 3],
            py_tstate: 0,
            tgid,
            loop_epfd: -1,
            tag,
            off_state: 0,
            probe_budget: PROBE_BUDGET,
            asleep_in_loop: 0,
            _pad: [0; 4],
            loop_file: 0,
            loop_fops: 0,
            out_cpu_ns: 0,
        }
    }
}

/// Per-thread state of a loop thread's current episode (`LOOPSTATE`, key:
/// TID), kept only by the kernel (blockwatch-ebpf/src/episode.rs).
///
/// An episode is one iteration of the loop: from leaving the runtime's
/// idle wait to entering it again (or, on a loop that never sleeps, to
/// the next change of its iteration clock). Everything the thread did in
/// between is summed here: on-CPU time, off-CPU time by how it was off,
/// and the longest single wait, whose stacks are kept in slot `max_slot`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopState {
    /// When the episode began; 0 while the thread is in its idle wait.
    pub start_ns: u64,
    /// Last switch-in during the episode; 0 while off the CPU.
    pub in_ns: u64,
    /// On-CPU time of the episode up to `in_ns`.
    pub run_ns: u64,
    /// Off-CPU time of the episode, by `STATE_*` (sleeping, disk, preempted).
    pub off_ns: [u64; 3],
    /// The episode's longest wait: when it began and how long it lasted.
    pub max_start_ns: u64,
    pub max_ns: u64,
    pub max_syscall: i64,
    pub max_args: [u64; 3],
    /// The iteration clock's value at its last read, and when that read
    /// was (the latest moment the iteration it names is known to run).
    pub clock: u64,
    pub clock_ns: u64,
    /// When the episode's latest wait ended: where an episode cut short by
    /// the thread's exit is known to have run to.
    pub wait_end_ns: u64,
    /// The frame whose local is the iteration clock (`CLOCK_PY_LOCAL`),
    /// once found; 0 before.
    pub clock_frame: u64,
    /// Waits and CPU samples of the episode.
    pub waits: u32,
    pub samples: u32,
    /// `STATE_*` of the longest wait.
    pub max_state: u8,
    /// The stack slot (0 or 1) holding the longest wait's stacks; the other
    /// takes the next wait's.
    pub max_slot: u8,
    /// In the idle wait's syscall (strict mode sees its entry and exit).
    pub in_idle: u8,
    /// 1 once the thread was seen in its idle wait: before, it runs no
    /// loop yet, and each of its waits is an episode of its own.
    pub looped: u8,
    /// Bit `slot` set: that slot's wait is at a site in `KNOWN_SITES`, and
    /// its user stacks were not taken.
    pub slot_known: u8,
    /// Bit `slot` set: that slot's `STACKS` entry holds the wait's frames.
    /// Unset for a known site with no interpreter frames, whose wait
    /// needed none of them (and skipped the entry's lookup).
    pub slot_kept: u8,
    pub _pad: [u8; 2],
    /// Each slot's call site (see `SiteKey`).
    pub slot_site: [u64; 2],
    /// When the thread was last sampled (`SAMPLE_GAP_NS`).
    pub sampled_ns: u64,
}

/// The shortest time between two samples of a loop thread. Samples come
/// from timer interrupts the thread already takes, the scheduler tick
/// first (every 4 ms at the common `HZ=250`, 1 ms at `HZ=1000`): this
/// keeps them at 250–333 a second whatever the kernel's `HZ`, 100 at
/// `HZ=100`.
pub const SAMPLE_GAP_NS: u64 = 3_000_000;

/// The pending strict syscall of a loop thread (`STRICT_CALLS`, key: TID),
/// kept only by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StrictCall {
    /// Entry time of a pending strict syscall; 0 when none.
    pub enter_ns: u64,
    pub nr: i64,
    pub args: [u64; 3],
    /// The pending strict syscall became a `Block` record.
    pub offcpu: u8,
    pub _pad: [u8; 7],
}

/// The top bit of a `USER_STACKS` key: the entry is the stack copy of the
/// thread's strict call, not of its off-CPU wait. TIDs stay below 2^22
/// (`PID_MAX_LIMIT`), so the two key spaces never meet, and a strict call
/// (made while the thread runs) never overwrites the copy a pending wait
/// still needs.
pub const STRICT_COPY_KEY: u32 = 1 << 31;

/// One strict call site of one loop thread (`STRICT_COUNTS` key).
///
/// `site` is a hash the kernel computes cheaply at every call: the
/// syscall's user `ip` and `sp`, the return addresses of the frames whose
/// frame pointers lie on the thread's stack above `sp`, and the CPython
/// (code, instruction) pairs. `sp` is the depth of the call path: the same
/// path gives the same depth, and it tells apart callers that frame
/// pointers cannot (JS functions calling `readFileSync`, code built without
/// frame pointers). Two sites that collide are counted as one, under the
/// stack that was recorded first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct StrictKey {
    pub tgid: u32,
    pub tid: u32,
    /// The syscall number.
    pub nr: u32,
    pub _pad: u32,
    pub site: u64,
}

/// What the kernel counted at one strict call site (`STRICT_COUNTS`
/// value). Only the thread itself updates it; user space reads it and
/// deletes it once the thread is gone.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StrictTally {
    pub calls: u64,
    /// Time in the calls.
    pub total_ns: u64,
    pub max_ns: u64,
    /// 1 once the site's `Strict` record (its stacks) was sent; 0 while
    /// the ring buffer had no room, and the next call tries again.
    pub sent: u32,
    pub _pad: u32,
}

pod!(
    WatchRule,
    CommMatch,
    ThreadTag,
    LoopState,
    StrictCall,
    StrictKey,
    StrictTally
);

const _: () = {
    assert!(core::mem::size_of::<WatchRule>() == 8);
    assert!(core::mem::size_of::<CommMatch>() == 32);
    assert!(core::mem::size_of::<ThreadTag>() == 88);
    assert!(core::mem::size_of::<LoopState>() == 168);
    assert!(core::mem::size_of::<StrictCall>() == 48);
    assert!(core::mem::size_of::<StrictKey>() == 24);
    assert!(core::mem::size_of::<StrictTally>() == 32);
};
