//! What the workloads run under (nothing, a blockwatch, bpftrace), started
//! until attached and stopped with SIGINT, and small process helpers.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::proc::{TracerCost, bpf_prog_fds};
use super::{Bench, bench_dir};
use crate::run::display;
use crate::setup::{self, Package};

/// A tracer the workloads run under.
pub enum Tracer {
    Bare,
    Blockwatch {
        label: &'static str,
        args: Vec<String>,
    },
    Bpftrace {
        label: &'static str,
        script: String,
    },
}

/// An empty program on the tracepoint blockwatch's detector runs on: what
/// any program there costs each context switch, the floor of a tax paid
/// per switch.
pub const FLOOR_SCRIPT: &str = "tracepoint:sched:sched_switch {}";
pub const FLOOR_LABEL: &str = "floor: empty sched_switch (bpftrace)";

pub struct Running {
    child: Option<Child>,
    what: String,
    stderr: PathBuf,
    /// Only a comparison (bpftrace): killed, with a note, when SIGINT does
    /// not stop it. A blockwatch that does not stop is a failure.
    may_kill: bool,
}

impl Tracer {
    /// The empty sched_switch program, measured beside the others.
    pub fn is_floor(&self) -> bool {
        matches!(self, Tracer::Bpftrace { script, .. } if script == FLOOR_SCRIPT)
    }

    /// A blockwatch `trace -o json`: its stdout is its events.
    pub fn reports_json(&self) -> bool {
        matches!(self, Tracer::Blockwatch { args, .. }
            if args.iter().any(|a| a == "trace") && args.iter().any(|a| a == "json"))
    }

    pub fn label(&self) -> &'static str {
        match self {
            Tracer::Bare => "bare",
            Tracer::Blockwatch { label, .. } => label,
            Tracer::Bpftrace { label, .. } => label,
        }
    }

    /// Starts the tracer and waits until it is attached.
    pub fn start(&self, b: &Bench) -> anyhow::Result<Running> {
        let (mut cmd, ready_file, ready) = match self {
            Tracer::Bare => {
                return Ok(Running {
                    child: None,
                    what: "bare".into(),
                    stderr: PathBuf::new(),
                    may_kill: false,
                });
            }
            Tracer::Blockwatch { args, .. } => {
                (b.blockwatch_cmd(args), "tracer.stderr", "watching")
            }
            Tracer::Bpftrace { script, .. } => {
                let mut cmd = Command::new("bpftrace");
                cmd.args(["-e", script]);
                (cmd, "tracer.stdout", "Attaching")
            }
        };
        let out = bench_dir().join("tracer.stdout");
        let err = bench_dir().join("tracer.stderr");
        cmd.stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?)
            .stdin(Stdio::null());
        let what = display(&cmd);
        let mut child = cmd.spawn().with_context(|| format!("cannot run {what}"))?;
        wait_for(&bench_dir().join(ready_file), ready, &err, &mut child)
            .with_context(|| format!("starting {what}"))?;
        // Attached; let the start-up work (a daemon's scan) settle.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Running {
            child: Some(child),
            what,
            stderr: err,
            may_kill: matches!(self, Tracer::Bpftrace { .. }),
        })
    }
}

impl Running {
    /// The tracer's process; None when bare.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the tracer has cost so far: its threads' CPU and its BPF
    /// programs' run time (counted only under [`BpfStats`](super::proc::BpfStats)); None when
    /// bare or unreadable.
    pub fn cost(&self) -> Option<TracerCost> {
        let pid = self.pid()?;
        TracerCost::of(pid, &bpf_prog_fds(pid))
    }

    pub fn stop(mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let end = Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if Instant::now() > end {
                let _ = child.kill();
                let _ = child.wait();
                if self.may_kill {
                    // Seen once in a full run: bpftrace stayed up 20 s
                    // after SIGINT. Its figures were already taken.
                    println!("({} did not stop on SIGINT within 20 s: killed)", self.what);
                    return Ok(());
                }
                bail!("{} did not stop on SIGINT", self.what);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = child.wait()?;
        if !status.success() {
            let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            bail!("{} failed ({status}):\n{err}", self.what);
        }
        Ok(())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits (up to 60 s) until `file` contains `what`, failing with the
/// content of `stderr` if `child` exits first.
pub fn wait_for(file: &Path, what: &str, stderr: &Path, child: &mut Child) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if std::fs::read_to_string(file).is_ok_and(|s| s.contains(what)) {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let err = std::fs::read_to_string(stderr).unwrap_or_default();
            bail!("exited ({status}) before it was ready:\n{err}");
        }
        if Instant::now() > end {
            bail!("not ready after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The peer: what blockwatch's default and strict modes do, in bpftrace.
pub fn bpftrace_script(tid: u32) -> String {
    format!(
        "BEGIN {{ @tagged[{tid}] = 1; }}\n\
         tracepoint:raw_syscalls:sys_enter /tid == {tid}/ {{ @calls = count(); }}\n\
         tracepoint:sched:sched_switch /@tagged[args->prev_pid]/ {{ @out[args->prev_pid] = nsecs; }}\n\
         END {{ clear(@tagged); clear(@out); }}\n"
    )
}

/// bpftrace is installed from Debian for the comparison (about 60 MB, so
/// only here, not by `cargo xtask setup`); false if that is impossible.
pub fn ensure_bpftrace() -> bool {
    match setup::ensure_packages(&[Package {
        name: "bpftrace",
        command: Some("bpftrace"),
    }]) {
        Ok(()) => true,
        Err(e) => {
            println!("bench: no bpftrace, its column is skipped: {e:#}");
            false
        }
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(19747)
}

pub fn free_listen() -> String {
    format!("127.0.0.1:{}", free_port())
}

pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}
