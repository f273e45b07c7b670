//! Symbolization throughput on real stacks, for `cargo xtask bench`.
//!
//! ```sh
//! blockwatch trace -o json --pid PID --threads all -d 3s > stacks.jsonl
//! cargo run --release -p blockwatch --example symbolize_bench -- PID stacks.jsonl [SECONDS]
//! ```
//!
//! Takes the native frames of the events of process PID (which must still
//! run: its `/proc/PID/maps` is read) and symbolizes them with the library's
//! [`Symbolizer`], as the pipeline does:
//!
//! - cold: a new symbolizer symbolizes every distinct stack once (maps
//!   parsed, binaries opened and their symbols and DWARF read); repeated,
//!   the median is kept;
//! - warm: one symbolizer that has seen the stacks symbolizes them again
//!   and again for SECONDS (the steady state of a long session).
//!
//! Prints one line: `stacks=N frames=F cold_per_s=X warm_per_s=Y`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use blockwatch::stacks::symbolize::Symbolizer;

fn native_ips(event: &serde_json::Value) -> Vec<u64> {
    event["stack"]
        .as_array()
        .map(|frames| {
            frames
                .iter()
                // Inlined frames repeat their caller's address; interpreter
                // frames are not native addresses.
                .filter(|f| f["inlined"] != true && f.get("kind").is_none())
                .filter_map(|f| {
                    let hex = f["address"].as_str()?.strip_prefix("0x")?;
                    u64::from_str_radix(hex, 16).ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: symbolize_bench PID EVENTS.jsonl [SECONDS]");
        std::process::exit(2);
    }
    let pid: u32 = args[1].parse().expect("PID is a number");
    let text = std::fs::read_to_string(&args[2]).expect("read the events file");
    let secs: f64 = args.get(3).map_or(2.0, |s| s.parse().expect("SECONDS"));

    let stacks: Vec<Vec<u64>> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["pid"].as_u64() == Some(pid as u64))
        .map(|e| native_ips(&e))
        .filter(|s| !s.is_empty())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if stacks.is_empty() {
        eprintln!("no native stacks of pid {pid} in {}", args[2]);
        std::process::exit(1);
    }
    let frames: usize = stacks.iter().map(Vec::len).sum();

    let mut cold = Vec::new();
    let mut sym = Symbolizer::new();
    for _ in 0..5 {
        sym = Symbolizer::new();
        let t = Instant::now();
        for s in &stacks {
            std::hint::black_box(sym.symbolize(pid, s));
        }
        cold.push(stacks.len() as f64 / t.elapsed().as_secs_f64());
    }
    cold.sort_by(f64::total_cmp);

    let budget = Duration::from_secs_f64(secs);
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < budget {
        for s in &stacks {
            std::hint::black_box(sym.symbolize(pid, s));
        }
        n += stacks.len() as u64;
    }
    let warm = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "stacks={} frames={frames} cold_per_s={:.0} warm_per_s={warm:.0}",
        stacks.len(),
        cold[cold.len() / 2]
    );
}
