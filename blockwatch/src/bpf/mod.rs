//! The kernel programs from user space, in the order a session needs them:
//! [`preflight`] checks what loading needs (privileges, the PID namespace) and says
//! how to fix what is missing; [`load`](mod@load) loads the programs with
//! their frozen globals (kernel offsets from [`btf`], the user-stack size)
//! and takes the maps user space talks to; [`attach`] attaches them to the
//! scheduler tracepoints (BTF or raw), and the strict and stall detectors
//! to the syscall tracepoints and to the timer interrupts (`hrtimer_expire_entry`).
//!
//! [`counters`] sums the programs' per-CPU counters.
//!
//! Nothing here knows the pipeline: callers pass plain options in.

pub mod attach;
pub mod btf;
pub mod counters;
#[cfg(test)]
mod kernel_tests;
pub mod load;
pub mod preflight;

pub use attach::{AttachMode, LoopDetectors, LoopOptions, enable_loop_detectors};
pub use load::{
    FORCE_RAW_ENV, Loaded, Maps, RING_BYTES, force_raw_from_env, load, load_with_user_stack,
};
pub use preflight::check_privileges;

use crate::bpf::btf::BtfError;

/// Why the kernel programs could not be loaded or attached; each message
/// names the fix.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "blockwatch needs root (or the capabilities CAP_BPF and CAP_PERFMON) to load its kernel programs and lacks {missing}: run it with sudo, or with those capabilities"
    )]
    NotPrivileged { missing: String },
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("cannot read blockwatch's PID namespace (/proc/self/ns/pid): {0}")]
    PidNamespace(std::io::Error),
    #[error(
        "/proc belongs to another PID namespace than blockwatch, so the process IDs it shows are not the ones blockwatch sees: run blockwatch in the namespace /proc was mounted for, or mount /proc for this one (e.g. unshare --pid --fork --mount-proc)"
    )]
    ForeignProc,
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
