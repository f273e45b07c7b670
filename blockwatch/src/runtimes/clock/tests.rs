//! The epoll-wait parser, libuv's loop checks, and the scan that serves a
//! node without the default loop's symbol, against a real node. (The
//! clocks themselves are tested against real loops in `tests/clock.rs`.)

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::libuv::{
    LOOP_BACKEND_FD, LOOP_CHECKED, LOOP_HANDLE_QUEUE, LOOP_NFDS, LOOP_NWATCHERS, LOOP_STOP_FLAG,
    LOOP_TIME, LOOP_WQ_ASYNC_LOOP, LOOP_WQ_ASYNC_TYPE, find_loop, is_loop, now_ms,
};
use super::*;

#[test]
fn epoll_waits_from_proc_syscall() {
    let line = |nr: i64, fd: &str| {
        format!("{nr} {fd} 0x7ffd1000 0x400 0xffffffff 0x0 0x0 0x7ffd0f00 0x7f1234")
    };
    assert_eq!(parse_epoll_wait(&line(232, "0xe")), Some(14));
    assert_eq!(parse_epoll_wait(&line(281, "0x9")), Some(9));
    assert_eq!(parse_epoll_wait(&line(441, "0x0")), Some(0));
    // Another syscall, a running thread, a thread in no syscall, garbage.
    assert_eq!(parse_epoll_wait(&line(0, "0x3")), None);
    assert_eq!(parse_epoll_wait("running\n"), None);
    assert_eq!(parse_epoll_wait("-1 0x7ffd0f00 0x7f1234\n"), None);
    assert_eq!(parse_epoll_wait(&line(232, "0x1ffffffff")), None);
    assert_eq!(parse_epoll_wait(""), None);
    assert_eq!(epoll_fd_waited(u32::MAX, u32::MAX), None);
    assert_eq!(parse_sp(&line(232, "0xe")), Some(0x7ffd0f00));
    assert_eq!(parse_sp("running\n"), None);
    assert_eq!(parse_sp("-1 0x7ffd0f00 0x7f1234\n"), None);
}

/// Where the test's loop lies.
const AT: u64 = 0x5555_0000_2000;

/// A `uv_loop_t` at [`AT`] as `uv_loop_init` leaves it, polling fd 7, its
/// time `now - 5` ms.
fn loop_bytes(now: u64) -> Vec<u8> {
    let mut b = vec![0u8; LOOP_CHECKED];
    let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
    let head = 0x5555_0000_1010u64;
    put(LOOP_HANDLE_QUEUE, &head.to_le_bytes());
    put(LOOP_HANDLE_QUEUE + 8, &head.to_le_bytes());
    put(LOOP_BACKEND_FD, &7i32.to_le_bytes());
    put(LOOP_NWATCHERS, &64u32.to_le_bytes());
    put(LOOP_NFDS, &3u32.to_le_bytes());
    put(LOOP_TIME, &(now - 5).to_le_bytes());
    put(LOOP_WQ_ASYNC_LOOP, &AT.to_le_bytes());
    put(LOOP_WQ_ASYNC_TYPE, &1u32.to_le_bytes());
    b
}

#[test]
fn loop_checks() {
    let now = 1_000_000;
    let good = loop_bytes(now);
    assert!(is_loop(&good, AT, 7, now));
    assert!(!is_loop(&good, AT, 8, now), "another epoll fd");
    assert!(!is_loop(&good[..LOOP_TIME], AT, 7, now), "short");
    assert!(!is_loop(&vec![0u8; LOOP_CHECKED], AT, 0, now), "zeroed");
    let spoilt = |off: usize, v: &[u8]| {
        let mut b = good.clone();
        b[off..off + v.len()].copy_from_slice(v);
        is_loop(&b, AT, 7, now)
    };
    assert!(!spoilt(LOOP_STOP_FLAG, &2u32.to_le_bytes()));
    assert!(!spoilt(LOOP_NFDS, &65u32.to_le_bytes()));
    assert!(!spoilt(LOOP_HANDLE_QUEUE, &0u64.to_le_bytes()));
    assert!(!spoilt(
        LOOP_HANDLE_QUEUE + 8,
        &0x1234_5673u64.to_le_bytes()
    ));
    assert!(!spoilt(LOOP_TIME, &0u64.to_le_bytes()));
    assert!(
        !spoilt(LOOP_TIME, &(now + 60_000).to_le_bytes()),
        "in the future"
    );
    assert!(
        spoilt(LOOP_STOP_FLAG, &1u32.to_le_bytes()),
        "stopping is fine"
    );
}

/// A node asleep in its loop: its main thread and epoll fd.
struct Node(std::process::Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn idle_node() -> (Node, i32) {
    let mut child = Node(
        Command::new("node")
            .args(["-e", "setInterval(() => {}, 1000); console.log('ready')"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("node is installed"),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().expect("piped"))
        .read_line(&mut line)
        .expect("ready line");
    let pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(fd) = epoll_fd_waited(pid, pid) {
            return (child, fd);
        }
        assert!(Instant::now() < deadline, "node's main thread never idles");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Debian's nodejs links a shared libuv, whose static default loop no
/// symbol names: the scan must find the same loop as the symbol.
#[test]
fn the_scan_finds_the_default_loop() {
    let (node, epfd) = idle_node();
    let pid = node.0.id();
    let by_symbol = find_loop(pid, epfd, true).expect("default_loop_struct");
    let t = Instant::now();
    let by_scan = find_loop(pid, epfd, false).expect("a loop in node's data");
    eprintln!(
        "default loop at {by_symbol:#x}, scanned in {:?}",
        t.elapsed()
    );
    assert_eq!(by_scan, by_symbol);
    assert_eq!(
        find_loop(pid, epfd + 100, false),
        None,
        "no loop polls that fd"
    );
    // Node 20's libuv (1.46) counts its iterations: that count is the
    // clock, and the loop's time says where an iteration began.
    let clock = find(pid, pid, epfd, None).expect("a clock");
    assert_eq!(clock.kind, CLOCK_UV_COUNT);
    assert_eq!(clock.time_addr, by_symbol + LOOP_TIME as u64);
    let count = read(pid, pid, &clock, None).expect("readable");
    assert!(count >= 1, "the loop has iterated: {count}");
    let time = crate::procfs::mem::read_u64(pid, clock.time_addr).expect("readable");
    let now = now_ms().expect("a monotonic clock");
    assert!(time <= now && now - time < 60_000, "{time} vs {now}");
}

#[test]
fn no_clock_without_a_loop() {
    let me = std::process::id();
    // This test binary links tokio, so it has tokio's clock: a program
    // with no runtime has none.
    let mut sleep = std::process::Command::new("sleep")
        .arg("10")
        .spawn()
        .expect("sleep runs");
    let other = sleep.id();
    let found = find(other, other, 3, None);
    let _ = sleep.kill();
    let _ = sleep.wait();
    assert_eq!(found, None);
    assert_eq!(
        find(me, me, 3, None).map(|c| c.kind),
        Some(blockwatch_common::CLOCK_TLS_BLOCK),
        "a tokio program's clock"
    );
    assert_eq!(find(u32::MAX, u32::MAX, 3, None), None);
    let clock = LoopClock::default();
    assert_eq!(read(me, me, &clock, None), None, "CLOCK_NONE");
    let py_clock = LoopClock {
        kind: CLOCK_PY_LOCAL,
        ..LoopClock::default()
    };
    assert_eq!(read(me, me, &py_clock, None), None, "no interpreter");
}
