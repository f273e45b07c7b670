//! Attaches the loaded programs: the scheduler and task-lifecycle
//! tracepoints (tp_btf, or their raw-tracepoint twins), the episode
//! sampler (on `hrtimer_expire_entry`, the same way) and, for strict mode,
//! the raw syscall tracepoints.

use std::fmt::Display;

use aya::{
    Btf, Ebpf,
    maps::{Array, MapData},
    programs::{BtfTracePoint, Program, ProgramError, RawTracePoint},
};
use blockwatch_common::{LoopConfig, SAMPLE_GAP_NS};
use log::{debug, info, warn};

use crate::bpf::LoadError;

/// Where the episode sampler runs: at every hrtimer expiry, the scheduler
/// tick's included (blockwatch-ebpf/src/episode.rs, `on_sample`).
const SAMPLER_TRACEPOINT: &str = "hrtimer_expire_entry";

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

/// How the programs were attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    BtfTracepoints,
    RawTracepoints,
}

/// Attaches the scheduler and task-lifecycle programs: the tp_btf ones
/// where the kernel has BTF and `force_raw` is off, else (or if the
/// verifier refuses any of them) their raw-tracepoint twins.
pub fn attach_tracepoints(ebpf: &mut Ebpf, force_raw: bool) -> Result<AttachMode, LoadError> {
    let btf = if force_raw {
        None
    } else {
        Btf::from_sys_fs().ok()
    };
    // All loaded before any is attached, so that a refusal (the tp_btf
    // programs read task fields by plain loads, checked against this
    // kernel's BTF) falls back wholesale, with nothing half attached.
    let loaded = btf.is_some_and(|btf| {
        ATTACHMENTS.iter().all(|&(name, _, tracepoint)| {
            load_btf(ebpf, name, tracepoint, &btf)
                .inspect_err(|e| warn!("BTF tracepoints unavailable ({e}); using raw tracepoints"))
                .is_ok()
        })
    });
    for &(btf_name, raw_name, tracepoint) in ATTACHMENTS {
        if loaded {
            let prog: &mut BtfTracePoint = program(ebpf, btf_name, tracepoint)?;
            prog.attach().map_err(|e| attach_error(tracepoint, e))?;
        } else {
            attach_raw(ebpf, raw_name, tracepoint)?;
        }
    }
    let mode = if loaded {
        AttachMode::BtfTracepoints
    } else {
        AttachMode::RawTracepoints
    };
    info!("attached kernel programs ({mode:?})");
    Ok(mode)
}

/// Program `name` as its type `P`; `what` names the attachment in errors.
fn program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    what: &str,
) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoadError::Missing(name))?
        .try_into()
        .map_err(|e| attach_error(what, e))
}

fn attach_error(what: &str, e: impl Display) -> LoadError {
    LoadError::Attach {
        tracepoint: what.to_string(),
        err: e.to_string(),
    }
}

fn load_btf(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &str,
    btf: &Btf,
) -> Result<(), LoadError> {
    let prog: &mut BtfTracePoint = program(ebpf, name, tracepoint)?;
    prog.load(tracepoint, btf).map_err(|e| load_error(name, e))
}

fn attach_btf(
    ebpf: &mut Ebpf,
    name: &'static str,
    tracepoint: &str,
    btf: &Btf,
) -> Result<(), LoadError> {
    load_btf(ebpf, name, tracepoint, btf)?;
    let prog: &mut BtfTracePoint = program(ebpf, name, tracepoint)?;
    prog.attach().map_err(|e| attach_error(tracepoint, e))?;
    Ok(())
}

fn attach_raw(ebpf: &mut Ebpf, name: &'static str, tracepoint: &str) -> Result<(), LoadError> {
    let prog: &mut RawTracePoint = program(ebpf, name, tracepoint)?;
    prog.load().map_err(|e| load_error(name, e))?;
    prog.attach(tracepoint)
        .map_err(|e| attach_error(tracepoint, e))?;
    Ok(())
}

fn load_error(program: &str, e: ProgramError) -> LoadError {
    // The verifier log is long; show it only at -v.
    if let ProgramError::LoadError { verifier_log, .. } = &e {
        debug!("verifier log for {program}:\n{verifier_log}");
    }
    LoadError::Load(format!("{program}: {e}"))
}

/// What the loop detectors beyond `sched_switch` are asked to do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopOptions {
    /// `--strict`: attach the syscall tracepoints.
    pub strict: bool,
}

/// The loop detectors, once attached (their counters are in
/// `Maps::counters` with the others).
pub struct LoopDetectors {
    pub options: LoopOptions,
    /// Whether the episode sampler runs (its tracepoint may be refused).
    pub sampler: bool,
}

/// Configures strict mode and attaches what the loop detectors need: the
/// episode sampler, as the other tracepoints were (`mode`), and the syscall
/// tracepoints for `strict` (every syscall on the host pays for them).
/// `strict_syscalls` are the syscall numbers strict mode reports. Call
/// after [`load`](crate::bpf::load()), before taking `ebpf` apart.
pub fn enable_loop_detectors(
    ebpf: &mut Ebpf,
    mode: AttachMode,
    options: LoopOptions,
    strict_syscalls: &[i64],
) -> Result<LoopDetectors, LoadError> {
    let cfg = loop_config(options, strict_syscalls);
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
    // Episodes are still measured without the sampler: a kernel that
    // refuses it loses the stacks of CPU-bound episodes and the iteration
    // ends of loops that never sleep, not the session.
    let sampler = match attach_sampler(ebpf, mode) {
        Ok(()) => {
            info!(
                "episode sampler: running loop threads sampled at each timer interrupt, \
                 at most every {} ms",
                SAMPLE_GAP_NS / 1_000_000
            );
            true
        }
        Err(e) => {
            warn!(
                "loop threads are not sampled ({e}): CPU-bound episodes have no stack, \
                 and a loop that never sleeps looks like one long episode"
            );
            false
        }
    };
    Ok(LoopDetectors { options, sampler })
}

/// Strict mode's kernel configuration.
fn loop_config(options: LoopOptions, strict_syscalls: &[i64]) -> LoopConfig {
    let mut cfg = LoopConfig {
        strict: options.strict as u8,
        ..Default::default()
    };
    if options.strict {
        for &nr in strict_syscalls {
            let nr = nr as usize;
            cfg.strict_nrs[nr / 64] |= 1 << (nr % 64);
        }
    }
    cfg
}

/// The episode sampler on [`SAMPLER_TRACEPOINT`], attached as the other
/// tracepoints were (`mode`).
fn attach_sampler(ebpf: &mut Ebpf, mode: AttachMode) -> Result<(), LoadError> {
    match mode {
        AttachMode::BtfTracepoints => {
            let btf = Btf::from_sys_fs().map_err(|e| attach_error(SAMPLER_TRACEPOINT, e))?;
            attach_btf(ebpf, "episode_tick", SAMPLER_TRACEPOINT, &btf)
        }
        AttachMode::RawTracepoints => attach_raw(ebpf, "episode_tick_raw", SAMPLER_TRACEPOINT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyze::syscalls::strict_numbers;
    use crate::bpf::load;

    // Privileged, like bpf::load's tests: a verifier rejection fails here.
    #[test]
    fn strict_and_sampler_programs_load_and_attach() {
        let mut loaded = load(10_000_000, false).expect("load (run as root)");
        let detectors = enable_loop_detectors(
            &mut loaded.ebpf,
            loaded.mode,
            LoopOptions { strict: true },
            &strict_numbers(),
        )
        .expect("strict and sampler programs");
        assert!(detectors.sampler, "the episode sampler attached");
        assert_eq!(
            loaded.counter(blockwatch_common::Counter::LostLoopRecords),
            0
        );
    }

    #[test]
    fn strict_and_sampler_programs_load_with_raw_tracepoints_too() {
        let mut loaded = load(10_000_000, true).expect("load (run as root)");
        assert_eq!(loaded.mode, AttachMode::RawTracepoints);
        let detectors = enable_loop_detectors(
            &mut loaded.ebpf,
            loaded.mode,
            LoopOptions { strict: true },
            &strict_numbers(),
        )
        .expect("strict programs");
        assert!(detectors.sampler, "the raw episode sampler attached");
    }
}
