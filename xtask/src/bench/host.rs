//! The host tax: what processes blockwatch does not report pay for it
//! running (a getppid loop, 1-byte reads, a pipe ping-pong), bare and under
//! each tracer, interleaved.

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context as _, bail};

use super::Bench;
use super::Options;
use super::proc::BpfStats;
use super::stats::{
    MAX_REPS, WIDE_REPS, WIDE_SPREAD, median, median_interval, paired_ratios, print_table,
    progress, progress_done, rounds_to_tell, spread,
};
use super::targets::{COVERAGE, Figure, Goal, UNRESOLVED, Unit};
use super::tracer::{
    FLOOR_LABEL, FLOOR_SCRIPT, Tracer, bpftrace_script, ensure_bpftrace, free_listen, strings,
};

const WORKLOADS: [&str; 3] = ["getppid", "read", "pingpong"];

/// Measured ns/op per (tracer index, workload), one value a repetition.
type Results = BTreeMap<(usize, &'static str), Vec<f64>>;

/// One run of a loop: its fastest slice's ns/op, and all its operations.
struct LoopRun {
    ns_per_op: f64,
    ops: f64,
}

impl Bench {
    pub(super) fn host(&self, opts: &Options) -> anyhow::Result<Vec<Figure>> {
        println!("\n== host tax: processes blockwatch does not report ==");
        let bpftrace = ensure_bpftrace();
        // The process `trace` and the peer watch: idle, never scheduled.
        let mut idle = Command::new("sleep")
            .arg("100000")
            .spawn()
            .context("sleep")?;
        let tracers = self.host_tracers(idle.id(), bpftrace);
        let result = self.host_runs(&tracers, opts).and_then(|results| {
            // Apart from the runs the ratios come from: timing every
            // program run costs each one two clock reads more. Without
            // the timing there is nothing to show (run_time_ns stays 0).
            let programs = match BpfStats::enable() {
                Some(_stats) => self.host_programs(&tracers, opts.secs)?,
                None => Results::new(),
            };
            Ok((results, programs))
        });
        progress_done();
        let _ = idle.kill();
        let _ = idle.wait();
        let (results, programs) = result?;
        self.print_host(&tracers, &results, bpftrace);
        print_programs(&tracers, &programs);
        Ok(host_figures(&tracers, &results, &programs))
    }

    /// `opts.reps` interleaved repetitions of every tracer; when the bare
    /// runs spread wide by then, more of the ones the verdicts read (bare,
    /// `trace`, `daemon --auto`, the floor) up to [`WIDE_REPS`], and on
    /// while a verdict is open that fewer than [`MAX_REPS`] rounds would
    /// close (not with `--quick`).
    fn host_runs(&self, tracers: &[Tracer], opts: &Options) -> anyhow::Result<Results> {
        let mut results = Results::new();
        let all: Vec<usize> = (0..tracers.len()).collect();
        self.host_reps(tracers, &all, 0..opts.reps, opts.secs, &mut results)?;
        let read: Vec<usize> = all
            .iter()
            .copied()
            .filter(|&i| i <= 2 || tracers[i].is_floor())
            .collect();
        let wide = WORKLOADS
            .iter()
            .map(|w| spread(&results[&(0, *w)]))
            .fold(0.0, f64::max);
        let mut reps = opts.reps;
        if reps < WIDE_REPS && wide > WIDE_SPREAD {
            progress_done();
            println!(
                "(bare runs spread over {:.1}% after {} repetitions, more than {:.0}%: bare, trace, daemon --auto and the floor run {WIDE_REPS})",
                wide * 100.0,
                opts.reps,
                WIDE_SPREAD * 100.0
            );
            self.host_reps(tracers, &read, reps..WIDE_REPS, opts.secs, &mut results)?;
            reps = WIDE_REPS;
        }
        let open = |results: &Results| {
            host_figures(tracers, results, &Results::new())
                .iter()
                .any(|f| f.verdict() == UNRESOLVED)
        };
        let extended = reps;
        while !opts.quick && reps < MAX_REPS && open(&results) {
            self.host_reps(tracers, &read, reps..reps + 1, opts.secs, &mut results)?;
            reps += 1;
        }
        if reps > extended {
            progress_done();
            println!(
                "({reps} rounds of bare, trace, daemon --auto and the floor: a verdict was open after {extended} that fewer than {MAX_REPS} would close)"
            );
        }
        Ok(results)
    }

    /// One more run of each loop under each tracer, with the kernel timing
    /// BPF programs: what the tracer's programs ran per operation of the
    /// loop, per (tracer, loop).
    fn host_programs(&self, tracers: &[Tracer], secs: f64) -> anyhow::Result<Results> {
        let mut programs = Results::new();
        for (ti, tracer) in tracers.iter().enumerate().skip(1) {
            progress(&format!("bench: host programs {}", tracer.label()));
            let running = tracer.start(self)?;
            for w in WORKLOADS {
                let before = running.cost();
                let run = self.loop_run(w, secs)?;
                if let (Some(b), Some(a)) = (before, running.cost()) {
                    let ns = a.kernel_ns.saturating_sub(b.kernel_ns) as f64;
                    programs.entry((ti, w)).or_default().push(ns / run.ops);
                }
            }
            running.stop()?;
        }
        Ok(programs)
    }

    /// Repetitions `reps` of the tracers `which`, interleaved, each loop
    /// run for `secs`.
    fn host_reps(
        &self,
        tracers: &[Tracer],
        which: &[usize],
        reps: std::ops::Range<usize>,
        secs: f64,
        results: &mut Results,
    ) -> anyhow::Result<()> {
        let last = reps.end;
        for rep in reps {
            for &ti in which {
                let tracer = &tracers[ti];
                progress(&format!(
                    "bench: host rep {}/{last} {}",
                    rep + 1,
                    tracer.label()
                ));
                let running = tracer.start(self)?;
                for w in WORKLOADS {
                    let run = self.loop_run(w, secs)?;
                    results.entry((ti, w)).or_default().push(run.ns_per_op);
                }
                running.stop()?;
            }
        }
        Ok(())
    }

    /// Runs the workload `mode` for `secs`.
    fn loop_run(&self, mode: &str, secs: f64) -> anyhow::Result<LoopRun> {
        let out = Command::new(&self.workload)
            .args([mode, &format!("{secs}")])
            .output()
            .context("running the workload")?;
        let text = String::from_utf8_lossy(&out.stdout);
        match (parse_loop_run(&text), out.status.success()) {
            (Some(run), true) => Ok(run),
            _ => bail!("workload {mode} failed: {text:?}"),
        }
    }

    /// Bare first (the ratios' denominator), then `trace` (the default
    /// mode's tax, which the verdict line checks), then the rest.
    fn host_tracers(&self, idle_pid: u32, bpftrace: bool) -> Vec<Tracer> {
        let pid = idle_pid.to_string();
        let mut tracers = vec![
            Tracer::Bare,
            Tracer::Blockwatch {
                label: "trace",
                args: strings(&["trace", "-o", "json", "--pid", &pid]),
            },
            Tracer::Blockwatch {
                label: "daemon --auto",
                args: strings(&["daemon", "--auto", "--listen", &free_listen()]),
            },
        ];
        if self.has_strict {
            tracers.push(Tracer::Blockwatch {
                label: "trace --strict",
                args: strings(&["trace", "-o", "json", "--strict", "--pid", &pid]),
            });
        }
        if bpftrace {
            tracers.push(Tracer::Bpftrace {
                label: "bpftrace",
                script: bpftrace_script(idle_pid),
            });
            tracers.push(Tracer::Bpftrace {
                label: FLOOR_LABEL,
                script: FLOOR_SCRIPT.into(),
            });
        }
        tracers
    }

    fn print_host(&self, tracers: &[Tracer], results: &Results, bpftrace: bool) {
        let mut header = vec!["workload".to_string()];
        header.extend(tracers.iter().map(|t| t.label().to_string()));
        if !self.has_strict {
            header.push("trace --strict".into());
        }
        if !bpftrace {
            header.push("bpftrace".into());
            header.push(FLOOR_LABEL.into());
        }
        let mut rows = Vec::new();
        for w in WORKLOADS {
            let bare = median(&results[&(0, w)]);
            let mut row = vec![format!("{w} (ns/op)"), format!("{bare:.0}")];
            for ti in 1..tracers.len() {
                let m = median(&results[&(ti, w)]);
                row.push(format!("{m:.0} ({:.2}×)", m / bare));
            }
            if !self.has_strict {
                row.push("n/a (no --strict)".into());
            }
            if !bpftrace {
                row.push("n/a (no bpftrace)".into());
                row.push("n/a (no bpftrace)".into());
            }
            rows.push(row);
        }
        print_table(&header, &rows);
        let tax = |w: &str| median(&results[&(1, w)]) / median(&results[&(0, w)]) - 1.0;
        let (g, r) = (tax("getppid"), tax("read"));
        println!(
            "default mode (trace, untagged) within 3% on the syscall loops: {} (getppid {:+.1}%, read {:+.1}%; \
             bare runs spread over {:.1}% and {:.1}%)",
            if g <= 0.03 && r <= 0.03 { "yes" } else { "NO" },
            g * 100.0,
            r * 100.0,
            spread(&results[&(0, "getppid")]) * 100.0,
            spread(&results[&(0, "read")]) * 100.0
        );
        println!(
            "(trace watches an idle process; daemon --auto watches every process, the workload's threads included;\n \
             --strict watches the idle process; bpftrace: raw_syscalls:sys_enter with a TID filter and sched_switch with a map lookup;\n \
             the floor: an empty program on sched_switch, what any program there costs a context switch)"
        );
    }
}

/// `<fastest slice's operations> <its ns> <all operations>`, the
/// workload's line.
fn parse_loop_run(text: &str) -> Option<LoopRun> {
    let mut it = text.split_whitespace().map(|s| s.parse::<f64>().ok());
    let (ops, ns, all) = (it.next()??, it.next()??, it.next()??);
    (ops > 0.0 && all > 0.0).then_some(LoopRun {
        ns_per_op: ns / ops,
        ops: all,
    })
}

/// What each tracer's BPF programs ran per operation of each loop, over
/// whole runs: the tax read directly, where the ns/op ratios read it
/// through the machine's noise.
fn print_programs(tracers: &[Tracer], programs: &Results) {
    let shown: Vec<usize> = (1..tracers.len())
        .filter(|ti| WORKLOADS.iter().any(|w| programs.contains_key(&(*ti, *w))))
        .collect();
    if shown.is_empty() {
        println!(
            "(BPF programs' run time: not measured, kernel.bpf_stats_enabled could not be set)"
        );
        return;
    }
    let mut header = vec!["their BPF programs, ns per op".to_string()];
    header.extend(shown.iter().map(|&ti| tracers[ti].label().to_string()));
    let rows: Vec<Vec<String>> = WORKLOADS
        .iter()
        .map(|w| {
            let mut row = vec![w.to_string()];
            row.extend(shown.iter().map(|ti| {
                programs
                    .get(&(*ti, *w))
                    .map_or("-".into(), |v| format!("{:.0}", median(v)))
            }));
            row
        })
        .collect();
    print_table(&header, &rows);
    println!(
        "(the run time of each tracer's BPF programs over a whole loop run (fdinfo run_time_ns), over the loop's operations, \
         from one more run of each with kernel.bpf_stats_enabled set (apart from the runs above: timing costs every program run two clock reads): \
         what the programs cost the loop, host-wide work of the same moment included)"
    );
}

/// Issue 11's host figures: each loop's ns/op under `daemon --auto` over
/// bare, at most 1.03×.
fn host_figures(tracers: &[Tracer], results: &Results, programs: &Results) -> Vec<Figure> {
    let daemon = tracers.iter().position(|t| t.label() == "daemon --auto");
    let floor = tracers.iter().position(Tracer::is_floor);
    WORKLOADS
        .iter()
        .map(|&w| {
            let name = format!("host tax: {w} under daemon --auto, ns/op vs bare");
            let goal = Goal::AtMost(1.03);
            match daemon {
                Some(ti) => {
                    // Per-round ratios: see `paired_ratios`.
                    let bare = &results[&(0, w)];
                    let ratios = paired_ratios(&results[&(ti, w)], bare);
                    let direct = |i: usize| programs.get(&(i, w)).map(|v| median(v));
                    let mut note = format!("median of {} rounds' ratios", ratios.len());
                    if let Some(ns) = direct(ti) {
                        note += &format!("; its programs ran {ns:.0} ns an op");
                        if let Some(f) = floor.and_then(direct) {
                            note += &format!(" (the floor's {f:.0})");
                        }
                    }
                    let floor = floor.map(|fi| paired_ratios(&results[&(fi, w)], bare));
                    Figure::new(name, median(&ratios), Unit::Ratio, goal)
                        .with_note(note)
                        .with_interval(median_interval(&ratios, COVERAGE))
                        .with_rounds_needed(rounds_to_tell(&ratios, goal.target()))
                        .with_bare_spread(spread(bare))
                        .with_floor(floor.as_deref().map(median))
                        .with_floor_interval(floor.and_then(|f| median_interval(&f, COVERAGE)))
                }
                None => Figure::missing(name, "no daemon --auto run", Unit::Ratio, goal),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_run_is_its_fastest_slice_and_all_its_operations() {
        let run = parse_loop_run("4096 819200 40960\n").expect("a run");
        assert_eq!(run.ns_per_op, 200.0);
        assert_eq!(run.ops, 40960.0);
        assert!(parse_loop_run("4096 819200\n").is_none(), "an old workload");
        assert!(parse_loop_run("0 0 0\n").is_none());
        assert!(parse_loop_run("").is_none());
    }
}
