//! Test subject: a tokio program that blocks its runtime's workers.
//!
//! `tokio-blocker [SCENARIO]` runs one scenario, or all of them in this order
//! (about 2.5 s in all, plus the fsync):
//!
//! | scenario         | what it does                                        | reported?            |
//! |------------------|-----------------------------------------------------|----------------------|
//! | `idle`           | nothing scheduled for 0.4 s                         | no                   |
//! | `timer`          | a task awaits `tokio::time::sleep(350ms)`           | no                   |
//! | `spawn-blocking` | `spawn_blocking(|| thread::sleep(340ms)).await`     | no (blocking pool)   |
//! | `sleep`          | a task calls `std::thread::sleep(80ms)` 3 times,    | yes: 3 × sleep, on a |
//! |                  | awaiting `tokio::time::sleep(50ms)` between         | worker thread        |
//! | `fsync`          | a task writes 64 MiB with `std::fs` and `sync_all`s | yes: class file      |
//!
//! Waits that must not be reported last ≥ 340 ms; the sleeps last 80 ms; the
//! fsync takes as long as the disk does.
//!
//! Three more scenarios run only when named (`all` leaves them out), for the
//! stack tests: each warms up for about 1.2 s first (short tasks and timers,
//! so that every worker parks and wakes many times and becomes a known
//! event loop, and blockwatch sees the process's libraries), then blocks in the
//! body of an async fn itself, with no helper function of its own between
//! the fn and the libc call:
//!
//! | scenario         | what it does                                           |
//! |------------------|--------------------------------------------------------|
//! | `async-sleep`    | `async_fn_that_sleeps` calls `std::thread::sleep(90ms)`|
//! | `exit-after-block` | `async_fn_that_sleeps_then_exits` sleeps 90 ms, then |
//! |                  | exits the process at once with code 0                  |
//! | `cpu-hog`        | a task computes for 300 ms of CPU time (`cpu_hog`):    |
//! |                  | a stall of its worker (stall tests)                    |
//!
//! And `two-callers`: a task calls `sleep_a` twice, `sleep_b` twice and
//! `sleep_a` twice again, each a `std::thread::sleep` (60 and 65 ms) from the same
//! depth of the same task (same syscall address, same stack pointer),
//! awaiting `tokio::time::sleep(50ms)` between: a known call site's stack
//! must not be taken for another caller's.
//!
//! And one with no warm-up, for discovery: `cold-workers` idles 300 ms (each
//! worker parks once), then spawns three tasks that each call
//! `std::thread::sleep(70ms)` in `sleep_on_cold_worker`: all three are
//! reported, the first ones included.
//!
//! The file goes to
//! `$TOKIO_BLOCKER_DIR`, else `/var/tmp` (a disk, where `/tmp` may be tmpfs
//! and make fsync free), and is deleted afterwards. Prints nothing.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

const SCENARIOS: [&str; 5] = ["idle", "timer", "spawn-blocking", "sleep", "fsync"];
/// Scenarios run only when named.
const EXTRA_SCENARIOS: [&str; 5] = [
    "async-sleep",
    "exit-after-block",
    "cpu-hog",
    "cold-workers",
    "two-callers",
];
const FILE_SIZE: usize = 64 << 20;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    let selected: Vec<&str> = match arg.as_deref() {
        None | Some("all") => SCENARIOS.to_vec(),
        Some(name) if SCENARIOS.contains(&name) || EXTRA_SCENARIOS.contains(&name) => vec![name],
        Some(other) => {
            eprintln!(
                "tokio-blocker: unknown scenario {other:?}; expected one of: all, {}, {}",
                SCENARIOS.join(", "),
                EXTRA_SCENARIOS.join(", ")
            );
            return ExitCode::from(2);
        }
    };
    for (i, name) in selected.iter().enumerate() {
        if i > 0 {
            // A short idle gap keeps scenarios apart in a trace.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Err(e) = run(name).await {
            eprintln!("tokio-blocker: {name}: {e}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

async fn run(name: &str) -> std::io::Result<()> {
    match name {
        "idle" => idle().await,
        "timer" => tokio::spawn(timer_in_task()).await?,
        "spawn-blocking" => tokio::task::spawn_blocking(sleep_in_blocking_pool).await?,
        "sleep" => tokio::spawn(sleeps_in_task()).await?,
        "fsync" => tokio::spawn(fsync_in_task()).await??,
        "async-sleep" => {
            warm_up().await;
            tokio::spawn(async_fn_that_sleeps()).await?
        }
        "exit-after-block" => {
            warm_up().await;
            tokio::spawn(async_fn_that_sleeps_then_exits()).await?
        }
        "cold-workers" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let tasks: Vec<_> = (0..3)
                .map(|_| tokio::spawn(async { sleep_on_cold_worker() }))
                .collect();
            for task in tasks {
                task.await?;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        "two-callers" => {
            warm_up().await;
            tokio::spawn(two_callers()).await?;
        }
        "cpu-hog" => {
            warm_up().await;
            tokio::spawn(async { cpu_hog(Duration::from_millis(300)) }).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        _ => unreachable!("checked in main"),
    }
    Ok(())
}

/// `sleep_a`, `sleep_a`, `sleep_b`, `sleep_b`, `sleep_a`, `sleep_a`, with
/// the loop idle between.
async fn two_callers() {
    for first in [true, true, false, false, true, true] {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sleep: fn() -> std::time::Instant = if first { sleep_a } else { sleep_b };
        std::hint::black_box(sleep());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[inline(never)]
fn sleep_a() -> std::time::Instant {
    let start = std::time::Instant::now();
    std::thread::sleep(std::hint::black_box(Duration::from_millis(60)));
    std::hint::black_box(start)
}

/// As `sleep_a`, but for 65 ms: identical functions would be merged into
/// one by the compiler.
#[inline(never)]
fn sleep_b() -> std::time::Instant {
    let start = std::time::Instant::now();
    std::thread::sleep(std::hint::black_box(Duration::from_millis(65)));
    std::hint::black_box(start)
}

/// A blocking call on a worker that has parked only once so far.
#[inline(never)]
fn sleep_on_cold_worker() -> std::time::Instant {
    let start = std::time::Instant::now();
    std::thread::sleep(std::hint::black_box(Duration::from_millis(70)));
    // Used after the call, so the sleep is no tail call and this
    // function keeps its frame.
    std::hint::black_box(start)
}

/// Nothing to do: the workers park.
async fn idle() {
    tokio::time::sleep(Duration::from_millis(400)).await;
}

/// A correct timer wait on a worker.
async fn timer_in_task() {
    tokio::time::sleep(Duration::from_millis(350)).await;
}

/// Blocking where blocking belongs: a thread of the blocking pool.
#[inline(never)]
fn sleep_in_blocking_pool() {
    std::thread::sleep(Duration::from_millis(340));
}

async fn sleeps_in_task() {
    for i in 0..3 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        blocking_sleep_in_task();
    }
}

/// The bug: a synchronous sleep on a runtime worker.
#[inline(never)]
fn blocking_sleep_in_task() {
    std::thread::sleep(std::hint::black_box(Duration::from_millis(80)));
}

/// CPU work in a task: the worker runs `cpu` of CPU time (its own, from
/// /proc/thread-self/schedstat, so preemption on a loaded machine makes
/// the stall longer, never shorter) without reaching its park.
#[inline(never)]
fn cpu_hog(cpu: Duration) -> u64 {
    let on_cpu = || -> u64 {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(u64::MAX)
    };
    let end = on_cpu().saturating_add(cpu.as_nanos() as u64);
    let mut x = 0u64;
    while on_cpu() < end {
        for i in 0..200_000u64 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
        }
    }
    x
}

/// About 1.2 s of short tasks and idle gaps: every worker parks between.
async fn warm_up() {
    for _ in 0..12 {
        let tasks: Vec<_> = (0..4)
            .map(|_| tokio::spawn(tokio::time::sleep(Duration::from_millis(20))))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
}

/// The bug, in the async fn itself: its poll function calls into std.
async fn async_fn_that_sleeps() {
    std::thread::sleep(std::hint::black_box(Duration::from_millis(90)));
    tokio::task::yield_now().await;
}

/// Blocks, then ends the process before anyone can look at it again (the
/// yield, microseconds, keeps this fn's body out of tokio's poll function,
/// where the optimiser would otherwise fold a body that never returns).
async fn async_fn_that_sleeps_then_exits() {
    std::thread::sleep(std::hint::black_box(Duration::from_millis(90)));
    tokio::task::yield_now().await;
    std::process::exit(0);
}

async fn fsync_in_task() -> std::io::Result<()> {
    let dir = scratch_dir();
    std::fs::create_dir_all(&dir)?;
    let result = blocking_fsync_in_task(&dir.join("data.bin"));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The bug: synchronous file I/O, and an fsync, on a runtime worker.
#[inline(never)]
fn blocking_fsync_in_task(path: &Path) -> std::io::Result<()> {
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let mut file = File::create(path)?;
    for _ in 0..FILE_SIZE / chunk.len() {
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    drop(file);
    std::fs::remove_file(path)
}

fn scratch_dir() -> PathBuf {
    let base = std::env::var_os("TOKIO_BLOCKER_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .or_else(|| Some(PathBuf::from("/var/tmp")).filter(|p| p.is_dir()))
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("tokio-blocker-{}", std::process::id()))
}
