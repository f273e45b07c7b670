//! What loading needs from the system, checked before touching the
//! kernel, so the user gets one line naming the problem and its fix rather
//! than a verifier log.

use log::{debug, info, warn};

use crate::bpf::LoadError;

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

/// The mounts and limits loading relies on: tracefs (required), bpffs
/// (wanted), and RLIMIT_MEMLOCK raised on kernels that charge it.
pub fn prepare_system() -> Result<(), LoadError> {
    // Tracepoint attachment by name goes through tracefs on some kernels.
    // blockwatch pins nothing in bpffs, so failing to mount it is only a
    // warning.
    ensure_mounted("tracefs", "/sys/kernel/tracing", "tracefs")?;
    if let Err(e) = ensure_mounted("bpffs", "/sys/fs/bpf", "bpf") {
        warn!("{e}");
    }
    raise_memlock();
    Ok(())
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
    mount(path, fstype).map_err(|err| LoadError::Mount {
        what,
        path,
        fstype,
        err,
    })?;
    info!("mounted {what} at {path}");
    Ok(())
}

fn mount(path: &str, fstype: &str) -> std::io::Result<()> {
    use std::ffi::CString;
    let (src, target, ty) = (
        CString::new("none")?,
        CString::new(path)?,
        CString::new(fstype)?,
    );
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
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
