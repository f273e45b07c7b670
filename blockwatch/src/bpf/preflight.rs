//! What loading needs from the system, checked before touching the
//! kernel, so the user gets one line naming the problem and its fix rather
//! than a verifier log.

use log::{debug, info};

use crate::bpf::LoadError;
use crate::procfs;

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

/// The limits loading relies on: RLIMIT_MEMLOCK raised on kernels that
/// charge BPF memory to it.
///
/// Nothing needs tracefs or bpffs: BTF and raw tracepoints attach through
/// bpf() alone (only classic
/// tracepoints look their ids up in tracefs), and nothing is pinned. So a
/// service without CAP_SYS_ADMIN, or a container without those mounts,
/// runs as it is.
pub fn prepare_system() {
    raise_memlock();
}

/// The PID namespace the kernel programs translate IDs to: 0 for the
/// host's (no translation), else the inode number of blockwatch's own.
/// Fails when `/proc` belongs to another namespace than blockwatch, where
/// the IDs it reads there and the ones the kernel sends would disagree.
pub fn pid_namespace() -> Result<u32, LoadError> {
    let inum = procfs::own_pid_namespace().map_err(LoadError::PidNamespace)?;
    if !procfs::proc_is_own_namespace() {
        return Err(LoadError::ForeignProc);
    }
    if inum == procfs::HOST_PID_NAMESPACE {
        return Ok(0);
    }
    info!(
        "running in PID namespace pid:[{inum}]: watching the processes of that namespace, under their PIDs there"
    );
    // Namespace inodes are 32-bit in the kernel (`ns_common.inum`).
    u32::try_from(inum).map_err(|_| LoadError::ForeignProc)
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!("raising RLIMIT_MEMLOCK failed; fine on kernels since 5.11");
    }
}
