//! Loads the kernel programs and attaches them.
//!
//! Everything that can be checked before touching the kernel is checked
//! first (privileges, BTF, mounts), so the user gets one line naming the
//! problem and its fix rather than a verifier log.

use std::path::Path;

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, RawTracePoint},
};
use blockwatch_common::{
    Config, Counter, DEFAULT_USER_STACK, KernelOffsets, MAX_USER_STACK, PyProc, ThreadTag,
    WatchRule,
};
use log::{debug, info, warn};

use crate::bpf::btf::{self, BtfError};

/// The kernel programs, built from `blockwatch-ebpf` by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/blockwatch"));

/// Set to force the raw-tracepoint programs (as on kernels without tp_btf).
pub const FORCE_RAW_ENV: &str = "BLOCKWATCH_FORCE_RAW_TRACEPOINTS";

/// (tp_btf program, raw_tracepoint twin, tracepoint name)
const ATTACHMENTS: &[(&str, &str, &str)] = &[
    // Task lifecycle first, so no thread created while attaching is missed.
    ("task_newtask", "task_newtask_raw", "task_newtask"),
    (
        "sched_process_exec",
        "sched_process_exec_raw",
        "sched_process_exec",
    ),
    (
        "sched_process_exit",
        "sched_process_exit_raw",
        "sched_process_exit",
    ),
    ("sched_switch", "sched_switch_raw", "sched_switch"),
];

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "blockwatch needs root (or the capabilities CAP_BPF and CAP_PERFMON) to load its kernel programs and lacks {missing}: run it with sudo, or with those capabilities"
    )]
    NotPrivileged { missing: String },
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error(
        "cannot mount {what} at {path}: {err} (mount it by hand: mount -t {fstype} none {path})"
    )]
    Mount {
        what: &'static str,
        path: &'static str,
        fstype: &'static str,
        err: std::io::Error,
    },
    #[error("the kernel refused blockwatch's programs: {0} (run with -v for the verifier log)")]
    Load(String),
    #[error("cannot attach to tracepoint {tracepoint}: {err}")]
    Attach { tracepoint: String, err: String },
    #[error(
        "kernel program or map {0} is missing from the build (rebuild with `cargo xtask build`)"
    )]
    Missing(&'static str),
    #[error("kernel map update failed: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// Whether the environment asks for the raw-tracepoint programs.
pub fn force_raw_from_env() -> bool {
    std::env::var_os(FORCE_RAW_ENV).is_some_and(|v| v != "0")
}

/// How the programs were attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    BtfTracepoints,
    RawTracepoints,
}

/// The loaded programs and the maps user space talks to.
pub struct Loaded {
    /// Keeps the programs attached; dropping it detaches everything.
    pub ebpf: Ebpf,
    pub mode: AttachMode,
    pub threads: HashMap<MapData, u32, ThreadTag>,
    pub watched: HashMap<MapData, u32, WatchRule>,
    pub parks: HashMap<MapData, u32, u64>,
    pub pyprocs: HashMap<MapData, u32, PyProc>,
    pub config: Array<MapData, Config>,
    pub counters: PerCpuArray<MapData, u64>,
    pub events: RingBuf<MapData>,
    pub logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// Forwards the kernel programs' aya-log records to the `log` crate (shown
/// with -v) from a task on the current tokio runtime.
pub fn forward_kernel_log(
    logger: aya_log::EbpfLogger<&'static dyn log::Log>,
) -> std::io::Result<()> {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the logger owns its ring buffer fd for its whole life.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Checks the capabilities loading needs. Root is not enough on its own: a
/// container or a unit may run root without CAP_BPF, and the kernel's
/// refusal would then not say which capability is missing.
pub fn check_privileges() -> Result<(), LoadError> {
    // CAP_SYS_RESOURCE only raised RLIMIT_MEMLOCK, which BPF maps stopped
    // being charged to in 5.11 (memory cgroups account them): root in a
    // sandbox without it loads fine, so it is not required.
    const NEEDED: [(u32, &str); 2] = [(39, "CAP_BPF"), (38, "CAP_PERFMON")];
    let eff = match effective_caps() {
        Some(eff) => eff,
        // SAFETY: geteuid has no preconditions.
        None if unsafe { libc::geteuid() } == 0 => return Ok(()),
        None => 0,
    };
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|&&(cap, _)| eff & (1u64 << cap) == 0)
        .map(|&(_, name)| name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(LoadError::NotPrivileged {
            missing: missing.join(", "),
        })
    }
}

fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn is_mounted(path: &str, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let mut f = l.split_whitespace();
                let (_, mnt, ty) = (f.next(), f.next(), f.next());
                mnt == Some(path) && ty == Some(fstype)
            })
        })
        .unwrap_or(false)
}

fn ensure_mounted(
    what: &'static str,
    path: &'static str,
    fstype: &'static str,
) -> Result<(), LoadError> {
    if is_mounted(path, fstype) {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("static string");
    let (src, target, ty) = (c("none"), c(path), c(fstype));
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            ty.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(LoadError::Mount {
            what,
            path,
            fstype,
            err: std::io::Error::last_os_error(),
        });
    }
    info!("mounted {what} at {path}");
    Ok(())
}

/// Loads and attaches the programs with the given off-CPU threshold.
/// `force_raw` uses the raw-tracepoint twins even where tp_btf works.
/// Blocked threads' user stacks are copied with the default size.
pub fn load(threshold_ns: u64, force_raw: bool) -> Result<Loaded, LoadError> {
    load_with_user_stack(threshold_ns, force_raw, DEFAULT_USER_STACK)
}

/// As [`load`], copying `user_stack_size` bytes (at most
/// `MAX_USER_STACK`) of each blocked thread's user stack for DWARF
/// unwinding; 0 keeps frame pointers only.
pub fn load_with_user_stack(
    threshold_ns: u64,
    force_raw: bool,
    user_stack_size: u32,
) -> Result<Loaded, LoadError> {
    check_privileges()?;
    let user_stack_size = user_stack_size.min(MAX_USER_STACK as u32);
    let offsets: KernelOffsets = btf::kernel_offsets(Path::new(btf::VMLINUX_BTF))?;
    debug!("kernel offsets: {offsets:?}");
    // Tracepoint attachment by name goes through tracefs on some kernels;
    // bpffs is where a future daemon pins. Both are cheap to ensure.
    ensure_mounted("tracefs", "/sys/kernel/tracing", "tracefs")?;
    if let Err(e) = ensure_mounted("bpffs", "/sys/fs/bpf", "bpf") {
        warn!("{e}");
    }

    // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!("raising RLIMIT_MEMLOCK failed; fine on kernels since 5.11");
    }

    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &offsets, true)
        .override_global("USER_STACK_SIZE", &user_stack_size, true)
        .load(PROGRAMS)
        .map_err(|e| LoadError::Load(e.to_string()))?;
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            debug!("kernel log channel unavailable: {e}");
            None
        }
    };

    let btf = if force_raw {
        None
    } else {
        Btf::from_sys_fs().ok()
    };
    let mut mode = if btf.is_some() {
        AttachMode::BtfTracepoints
    } else {
        AttachMode::RawTracepoints
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

    for &(btf_name, raw_name, tracepoint) in ATTACHMENTS {
        if mode == AttachMode::BtfTracepoints {
            match attach_btf(&mut ebpf, btf_name, tracepoint, btf.as_ref().expect("btf")) {
                Ok(()) => continue,
                Err(e) if tracepoint == ATTACHMENTS[0].2 => {
                    // Nothing attached yet: fall back wholesale.
                    warn!("BTF tracepoints unavailable ({e}); using raw tracepoints");
                    mode = AttachMode::RawTracepoints;
                }
                Err(e) => return Err(e),
            }
        }
        attach_raw(&mut ebpf, raw_name, tracepoint)?;
    }
    info!("attached kernel programs ({mode:?})");

    Ok(Loaded {
        mode,
        threads: take(&mut ebpf, "THREADS")?,
        watched: take(&mut ebpf, "WATCHED")?,
        parks: take(&mut ebpf, "PARKS")?,
        pyprocs: take(&mut ebpf, "PYPROCS")?,
        counters: take(&mut ebpf, "COUNTERS")?,
        events: take(&mut ebpf, "EVENTS")?,
        config,
        logger,
        ebpf,
    })
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, LoadError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::Missing(name))?;
    Ok(T::try_from(map)?)
}

fn attach_btf(
    ebpf: &mut Ebpf,
    program: &'static str,
    tracepoint: &str,
    btf: &Btf,
) -> Result<(), LoadError> {
    let err = |e: &dyn std::fmt::Display| LoadError::Attach {
        tracepoint: tracepoint.to_string(),
        err: e.to_string(),
    };
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or(LoadError::Missing(program))?
        .try_into()
        .map_err(|e| err(&e))?;
    prog.load(tracepoint, btf)
        .map_err(|e| load_error(program, e))?;
    prog.attach().map_err(|e| err(&e))?;
    Ok(())
}

fn attach_raw(ebpf: &mut Ebpf, program: &'static str, tracepoint: &str) -> Result<(), LoadError> {
    let err = |e: &dyn std::fmt::Display| LoadError::Attach {
        tracepoint: tracepoint.to_string(),
        err: e.to_string(),
    };
    let prog: &mut RawTracePoint = ebpf
        .program_mut(program)
        .ok_or(LoadError::Missing(program))?
        .try_into()
        .map_err(|e| err(&e))?;
    prog.load().map_err(|e| load_error(program, e))?;
    prog.attach(tracepoint).map_err(|e| err(&e))?;
    Ok(())
}

fn load_error(program: &str, e: aya::programs::ProgramError) -> LoadError {
    // The verifier log is long; show it only at -v.
    if let aya::programs::ProgramError::LoadError { verifier_log, .. } = &e {
        debug!("verifier log for {program}:\n{verifier_log}");
    }
    LoadError::Load(format!("{program}: {e}"))
}

impl Loaded {
    /// One kernel counter, summed over all CPUs.
    pub fn counter(&self, counter: Counter) -> u64 {
        crate::bpf::counters::Counters::read(&self.counters)[counter]
    }

    pub fn set_config(&mut self, config: Config) -> Result<(), LoadError> {
        self.config.set(0, config, 0)?;
        Ok(())
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
        assert_eq!(loaded.config.get(&0, 0).unwrap().threshold_ns, 10_000_000);
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

// ---- strict syscall mode and loop stalls --------------------------------

/// What the strict and stall detectors are asked to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopOptions {
    /// `--strict`: attach the syscall tracepoints.
    pub strict: bool,
    /// `--stall-threshold`; `None` leaves the stall detector off.
    pub stall_threshold: Option<std::time::Duration>,
}

/// The strict and stall detectors, once attached (their counters are in
/// `Loaded::counters` with the others).
pub struct LoopDetectors {
    pub options: LoopOptions,
}

/// Configures the strict and stall detectors and attaches what they need:
/// the syscall tracepoints for `strict` (every syscall on the host pays for
/// them), a cpu-clock perf event per CPU for stall samples. Call after
/// [`load`], before taking `ebpf` apart.
pub fn enable_loop_detectors(
    ebpf: &mut Ebpf,
    options: LoopOptions,
) -> Result<LoopDetectors, LoadError> {
    use blockwatch_common::LoopConfig;

    let stall_ns = options
        .stall_threshold
        .map(|d| d.as_nanos().clamp(1, u64::MAX as u128) as u64)
        .unwrap_or(0);
    let mut cfg = LoopConfig {
        stall_ns,
        // Samples from a quarter of the threshold on: a stall's first
        // moments name it as well as its last, and shorter busy periods
        // (the common case) are not sent at all.
        sample_after_ns: stall_ns / 4,
        strict: options.strict as u8,
        ..Default::default()
    };
    if options.strict {
        for nr in crate::analyze::syscalls::strict_numbers() {
            let nr = nr as usize;
            cfg.strict_nrs[nr / 64] |= 1 << (nr % 64);
        }
    }
    // The configuration first: the programs read it from their first run.
    let mut config: Array<&mut MapData, LoopConfig> = Array::try_from(
        ebpf.map_mut("LOOP_CONFIG")
            .ok_or(LoadError::Missing("LOOP_CONFIG"))?,
    )?;
    config.set(0, cfg, 0)?;

    if options.strict {
        for (program, tracepoint) in [("strict_exit", "sys_exit"), ("strict_enter", "sys_enter")] {
            attach_raw(ebpf, program, tracepoint)?;
        }
        info!("strict mode: attached raw_syscalls sys_enter/sys_exit");
    }
    if stall_ns != 0 {
        // Stalls are still measured without the sampler, only not named:
        // a host that refuses perf events loses stacks, not the session.
        match attach_stall_sampler(ebpf) {
            Ok(()) => info!(
                "stall detector: busy loop threads sampled at {} Hz",
                crate::pipeline::loops::SAMPLE_HZ
            ),
            Err(e) => warn!("stalls are reported without stacks: {e}"),
        }
    }
    Ok(LoopDetectors { options })
}

/// A cpu-clock perf event per online CPU, running `stall_sample`.
fn attach_stall_sampler(ebpf: &mut Ebpf) -> Result<(), LoadError> {
    use aya::programs::perf_event::{
        PerfEvent, PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent,
    };
    let prog: &mut PerfEvent = ebpf
        .program_mut("stall_sample")
        .ok_or(LoadError::Missing("stall_sample"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| LoadError::Attach {
            tracepoint: "perf event cpu-clock".into(),
            err: e.to_string(),
        })?;
    prog.load().map_err(|e| load_error("stall_sample", e))?;
    let cpus = aya::util::online_cpus().map_err(|(what, e)| LoadError::Attach {
        tracepoint: "perf event cpu-clock".into(),
        err: format!("{what}: {e}"),
    })?;
    for cpu in cpus {
        prog.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Frequency(crate::pipeline::loops::SAMPLE_HZ),
            false,
        )
        .map_err(|e| LoadError::Attach {
            tracepoint: format!("perf event cpu-clock on CPU {cpu}"),
            err: e.to_string(),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod loop_tests {
    use super::*;

    // Privileged, like the tests above: a verifier rejection fails here.
    #[test]
    fn strict_and_stall_programs_load_and_attach() {
        let mut loaded = load(10_000_000, false).expect("load (run as root)");
        enable_loop_detectors(
            &mut loaded.ebpf,
            LoopOptions {
                strict: true,
                stall_threshold: Some(std::time::Duration::from_millis(100)),
            },
        )
        .expect("strict and stall programs");
        assert_eq!(loaded.counter(Counter::LostLoopRecords), 0);
    }

    #[test]
    fn strict_programs_load_with_raw_tracepoints_too() {
        let mut loaded = load(10_000_000, true).expect("load (run as root)");
        enable_loop_detectors(
            &mut loaded.ebpf,
            LoopOptions {
                strict: true,
                stall_threshold: None,
            },
        )
        .expect("strict programs");
    }
}
