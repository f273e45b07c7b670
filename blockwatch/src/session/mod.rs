//! The two ways to run blockwatch, a one-shot [`trace`] and the
//! [`daemon`], and the start-up they share: [`Session::start`] loads and
//! attaches the kernel programs, enables the strict and stall detectors,
//! forwards the kernel log, and hands back the ring buffer and the maps.

pub mod daemon;
mod memory;
mod notify;
mod pictures;
mod rate_limit;
pub mod trace;

use std::time::Duration;

use aya::Ebpf;
use aya::maps::{MapData, RingBuf};
use log::debug;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::bpf::{self, LoopDetectors, LoopOptions, Maps};

/// What a session asks of the kernel programs at start.
#[derive(Clone, Copy, Debug)]
pub struct StartOptions {
    /// Off-CPU waits at least this long are sent up.
    pub threshold: Duration,
    /// Bytes of a blocked thread's user stack copied (0: frame pointers
    /// only).
    pub user_stack_size: u32,
    /// Bytes of the ring buffer (see [`bpf::RING_BYTES`]).
    pub ring_bytes: u32,
    /// The strict and stall detectors.
    pub loops: LoopOptions,
}

/// The kernel programs, attached, and the maps a session talks to. The
/// fields drop in order: the ring buffer and maps first, the programs
/// (which detaches them) last.
pub struct Session {
    /// Records from the kernel, readable on the tokio runtime.
    pub ring: AsyncFd<RingBuf<MapData>>,
    pub maps: Maps,
    pub detectors: LoopDetectors,
    /// Keeps the programs attached; dropping it detaches everything.
    pub ebpf: Ebpf,
}

impl Session {
    /// Checks privileges, loads the programs (raw tracepoints when
    /// `BLOCKWATCH_FORCE_RAW_TRACEPOINTS` asks, or where tp_btf fails),
    /// attaches them and the detectors `options` asks for, and starts
    /// forwarding the kernel log. Runs on the tokio runtime, which the
    /// ring buffer and the log are registered with.
    pub fn start(options: &StartOptions) -> anyhow::Result<Self> {
        let mut loaded = bpf::load_with_user_stack(
            threshold_ns(options.threshold),
            bpf::force_raw_from_env(),
            options.user_stack_size,
            options.ring_bytes,
        )?;
        let detectors = bpf::enable_loop_detectors(
            &mut loaded.ebpf,
            loaded.mode,
            options.loops,
            &crate::analyze::syscalls::strict_numbers(),
        )?;
        debug!("attach mode: {:?}", loaded.mode);
        if let Some(logger) = loaded.logger.take() {
            forward_kernel_log(logger)?;
        }
        // SAFETY: the ring buffer owns its map fd for its whole life.
        let ring = unsafe { AsyncFd::register_with_interest(loaded.events, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self {
            ring,
            maps: loaded.maps,
            detectors,
            ebpf: loaded.ebpf,
        })
    }
}

/// A threshold as the kernel's `Config` holds it.
pub fn threshold_ns(threshold: Duration) -> u64 {
    threshold.as_nanos().min(u64::MAX as u128) as u64
}

/// Forwards the kernel programs' aya-log records to the `log` crate (shown
/// with -v) from a task on the current tokio runtime.
fn forward_kernel_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) -> std::io::Result<()> {
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
