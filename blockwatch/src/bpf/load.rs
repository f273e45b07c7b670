//! Loads the kernel programs: their frozen globals (kernel offsets from
//! BTF, the user-stack copy size) first, then the threshold in `CONFIG`,
//! then attachment; hands back the maps user space talks to.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
};
use blockwatch_common::{
    CommMatch, Config, Counter, DEFAULT_USER_STACK, KernelOffsets, LoopClock, MAX_USER_STACK,
    PyProc, SiteCheck, SiteKey, StrictKey, StrictTally, ThreadTag, WatchRule,
};
use log::debug;

use crate::bpf::attach::{self, AttachMode};
use crate::bpf::{LoadError, btf, preflight};

/// The kernel programs, built from `blockwatch-ebpf` by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/blockwatch"));

/// Bytes of the `EVENTS` ring buffer as the kernel programs declare it
/// (blockwatch-ebpf's `maps.rs`): about 250 ms of records at 100,000
/// episodes a second, what `trace` is sized for.
pub const RING_BYTES: u32 = 16 << 20;

/// Set to force the raw-tracepoint programs (as on kernels without tp_btf).
pub const FORCE_RAW_ENV: &str = "BLOCKWATCH_FORCE_RAW_TRACEPOINTS";

/// Whether the environment asks for the raw-tracepoint programs.
pub fn force_raw_from_env() -> bool {
    std::env::var_os(FORCE_RAW_ENV).is_some_and(|v| v != "0")
}

/// The loaded programs, their ring buffer, kernel log and maps.
pub struct Loaded {
    /// Keeps the programs attached; dropping it detaches everything.
    pub ebpf: Ebpf,
    pub mode: AttachMode,
    pub maps: Maps,
    pub events: RingBuf<MapData>,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// The maps user space reads and writes.
pub struct Maps {
    /// Tagged threads, by TID.
    pub threads: HashMap<MapData, u32, ThreadTag>,
    /// User space's half of the filter the kernel skips untagged threads
    /// by; written with every tag user space adds or removes.
    pub tag_filter: crate::targets::filter::TagFilter,
    /// Watched processes, by PID, and the rule their threads get.
    pub watched: HashMap<MapData, u32, WatchRule>,
    /// The futex address user space identified as a thread's runtime park
    /// (its idle wait), by TID.
    pub parks: HashMap<MapData, u32, u64>,
    /// CPython processes and their layout, by PID.
    pub pyprocs: HashMap<MapData, u32, PyProc>,
    /// Each loop thread's iteration clock, by TID.
    pub clocks: HashMap<MapData, u32, LoopClock>,
    pub config: Array<MapData, Config>,
    pub counters: PerCpuArray<MapData, u64>,
    /// Strict calls counted per (thread, syscall, call site); user space
    /// reads them and deletes a thread's entries once it is gone.
    pub strict_counts: HashMap<MapData, StrictKey, StrictTally>,
    /// Call sites whose native stack user space has: their waits send none.
    pub known_sites: HashMap<MapData, SiteKey, SiteCheck>,
    /// Process-name patterns the kernel matches at exec
    /// (`targets::names`); `Config::comm_matches` of them in use.
    pub comm_matches: Array<MapData, CommMatch>,
}

/// Loads and attaches the programs with the given off-CPU threshold.
/// `force_raw` uses the raw-tracepoint twins even where tp_btf works.
/// Blocked threads' user stacks are copied with the default size.
pub fn load(threshold_ns: u64, force_raw: bool) -> Result<Loaded, LoadError> {
    load_with_user_stack(threshold_ns, force_raw, DEFAULT_USER_STACK, RING_BYTES)
}

/// As [`load`], copying `user_stack_size` bytes (at most
/// `MAX_USER_STACK`) of each blocked thread's user stack for DWARF
/// unwinding (0 keeps frame pointers only), into a ring buffer of
/// `ring_bytes` (a power of two, at least a page).
pub fn load_with_user_stack(
    threshold_ns: u64,
    force_raw: bool,
    user_stack_size: u32,
    ring_bytes: u32,
) -> Result<Loaded, LoadError> {
    preflight::check_privileges()?;
    let offsets: KernelOffsets = btf::kernel_offsets(Path::new(btf::VMLINUX_BTF))?;
    debug!("kernel offsets: {offsets:?}");
    preflight::prepare_system();
    let pid_ns = preflight::pid_namespace()?;
    let mut ebpf = load_programs(&offsets, user_stack_size, ring_bytes, pid_ns)?;
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            debug!("kernel log channel unavailable: {e}");
            None
        }
    };
    // Map updates must precede attachment: the threshold is read by the
    // first context switch.
    let mut config: Array<MapData, Config> = take(&mut ebpf, "CONFIG")?;
    config.set(
        0,
        Config {
            threshold_ns,
            ..Default::default()
        },
        0,
    )?;
    let mode = attach::attach_tracepoints(&mut ebpf, force_raw)?;
    Ok(Loaded {
        mode,
        maps: Maps {
            threads: take(&mut ebpf, "THREADS")?,
            tag_filter: crate::targets::filter::TagFilter::new(take(&mut ebpf, "TAGGED_BY_USER")?),
            watched: take(&mut ebpf, "WATCHED")?,
            parks: take(&mut ebpf, "PARKS")?,
            pyprocs: take(&mut ebpf, "PYPROCS")?,
            clocks: take(&mut ebpf, "CLOCKS")?,
            counters: take(&mut ebpf, "COUNTERS")?,
            strict_counts: take(&mut ebpf, "STRICT_COUNTS")?,
            known_sites: take(&mut ebpf, "KNOWN_SITES")?,
            comm_matches: take(&mut ebpf, "COMM_MATCHES")?,
            config,
        },
        events: take(&mut ebpf, "EVENTS")?,
        logger,
        ebpf,
    })
}

/// Loads the programs into the kernel (not attached yet) with their
/// read-only globals set.
fn load_programs(
    offsets: &KernelOffsets,
    user_stack_size: u32,
    ring_bytes: u32,
    pid_ns: u32,
) -> Result<Ebpf, LoadError> {
    let user_stack_size = user_stack_size.min(MAX_USER_STACK as u32);
    let ebpf = EbpfLoader::new()
        .override_global("OFFSETS", offsets, true)
        .override_global("USER_STACK_SIZE", &user_stack_size, true)
        .override_global("PID_NS_INUM", &pid_ns, true)
        .map_max_entries("EVENTS", ring_bytes)
        .load(PROGRAMS)
        .map_err(|e| LoadError::Load(e.to_string()));
    release_pages(PROGRAMS);
    ebpf
}

/// Drops `bytes`' pages from our resident set. The object is read once,
/// at load, yet its 3 MiB in the executable would stay resident for the
/// life of a daemon; the pages are clean and file-backed, so a second load
/// (the raw-tracepoint fallback, tests) reads them back from the file.
fn release_pages(bytes: &'static [u8]) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let Ok(page) = usize::try_from(page) else {
        return;
    };
    if page == 0 {
        return;
    }
    let start = (bytes.as_ptr() as usize).next_multiple_of(page);
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    if end <= start {
        return;
    }
    // SAFETY: the range lies inside a read-only static, which nothing
    // writes; MADV_DONTNEED on a private file mapping only unmaps clean
    // pages, and the next read faults them in from the file unchanged.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    if r != 0 {
        debug!(
            "cannot release the programs' pages: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Takes map `name` out of `ebpf`, typed.
pub(super) fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::Missing(name))?;
    Ok(T::try_from(map)?)
}

impl Loaded {
    /// One kernel counter, summed over all CPUs.
    pub fn counter(&self, counter: Counter) -> u64 {
        crate::bpf::counters::Counters::read(&self.maps.counters)[counter]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Privileged: the suite runs as root (cargo xtask test); failing here
    // when BPF cannot load is the point, never a skip.
    #[test]
    fn programs_load_and_attach() {
        let loaded = load(10_000_000, false).expect("loading the kernel programs (run as root)");
        assert_eq!(loaded.mode, AttachMode::BtfTracepoints);
        assert_eq!(
            loaded.maps.config.get(&0, 0).unwrap().threshold_ns,
            10_000_000
        );
    }

    #[test]
    fn raw_tracepoint_fallback_loads() {
        let loaded = load(10_000_000, true);
        assert_eq!(
            loaded.expect("raw tracepoints").mode,
            AttachMode::RawTracepoints
        );
    }
}
