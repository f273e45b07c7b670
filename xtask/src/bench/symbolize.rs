//! Symbolization: stacks per second of a fresh and of a warm symbolizer,
//! and what copying user stacks for DWARF unwinding costs per event.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::stats::{median, print_table, progress, progress_done};
use super::targets::Figure;
use super::tracer::strings;
use super::{Bench, Options, bench_dir};
use crate::run::{cargo, root_dir};

impl Bench {
    pub(super) fn symbolize(&self, opts: &Options) -> anyhow::Result<Vec<Figure>> {
        println!("\n== symbolization ==");
        cargo(&[
            "build",
            "--release",
            "-p",
            "blockwatch",
            "--example",
            "symbolize_bench",
        ])?;
        let example = root_dir().join("target/release/examples/symbolize_bench");
        let mut subject = Command::new("python3")
            .arg(root_dir().join("bench/symbolize_subject.py"))
            .stdout(Stdio::null())
            .spawn()
            .context("python3 bench/symbolize_subject.py")?;
        let pid = subject.id().to_string();
        let result = (|| -> anyhow::Result<String> {
            std::thread::sleep(Duration::from_millis(500));
            let stacks = bench_dir().join("stacks.jsonl");
            let out = self
                .blockwatch_cmd(&strings(&[
                    "trace",
                    "-o",
                    "json",
                    "--pid",
                    &pid,
                    "--threads",
                    "all",
                    "--threshold",
                    "1ms",
                    "--duration",
                    "3s",
                ]))
                .stdout(std::fs::File::create(&stacks)?)
                .stderr(Stdio::null())
                .status()?;
            if !out.success() {
                bail!("recording stacks failed");
            }
            let out = Command::new(&example)
                .arg(&pid)
                .arg(&stacks)
                .arg(format!("{}", opts.secs.max(1.0)))
                .output()?;
            if !out.status.success() {
                bail!(
                    "symbolize_bench failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        })();
        let _ = subject.kill();
        let _ = subject.wait();
        let line = result?;
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                .unwrap_or("?")
                .to_string()
        };
        println!(
            "stacks/s: cold {} (new symbolizer: maps, ELF and DWARF read), warm {} ({} distinct stacks of a Python process, {} native frames)",
            field("cold_per_s"),
            field("warm_per_s"),
            field("stacks"),
            field("frames")
        );

        self.user_stack_cost(opts)?;
        Ok(Vec::new())
    }

    /// The same load with the user stack copied (default size) or not (0),
    /// interleaved: what the copy costs per event.
    fn user_stack_cost(&self, opts: &Options) -> anyhow::Result<()> {
        if !self.has_user_stack_size {
            println!("user-stack copy (--user-stack-size): n/a (no --user-stack-size)");
            return Ok(());
        }
        let secs = (opts.secs * 4.0).max(2.0);
        let mut by: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
        for rep in 0..opts.reps {
            for (label, size) in [("default", None), ("0 (off)", Some("0"))] {
                progress(&format!(
                    "bench: user stacks rep {}/{} {label}",
                    rep + 1,
                    opts.reps
                ));
                let r = self.block_run(16, secs, size, false)?;
                let cpu = r
                    .steady
                    .map_or(r.cpu_per_event_us(), |s| s.cpu_per_event_us());
                by.entry(label)
                    .or_default()
                    .push((r.events as f64 / r.secs, cpu));
            }
        }
        progress_done();
        let rows: Vec<Vec<String>> = ["default", "0 (off)"]
            .iter()
            .map(|l| {
                let v = &by[l];
                let rate = median(&v.iter().map(|x| x.0).collect::<Vec<_>>());
                let cpu = median(&v.iter().map(|x| x.1).collect::<Vec<_>>());
                vec![l.to_string(), format!("{rate:.0}"), format!("{cpu:.1} µs")]
            })
            .collect();
        print_table(
            &[
                "--user-stack-size",
                "events/s (16 threads)",
                "blockwatch CPU/event (steady)",
            ]
            .map(String::from),
            &rows,
        );
        Ok(())
    }
}
