//! The loop clocks (`blockwatch::runtimes::clock`) against real event loops:
//! Node's default loop and a worker thread's, asyncio on every interpreter
//! the tests use, and
//! uvloop (installed from PyPI into a cached venv on first use). Each
//! subject's loop is found while it idles, then driven from stdin: the
//! clock must change while the loop ticks and while it is saturated (never
//! sleeping), and hold still through one long callback, which sets a timer
//! halfway (which makes Node and uvloop update their loop's time).

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use blockwatch::runtimes::clock;
use blockwatch::runtimes::python::{self, PyProcess};
use blockwatch_common::{CLOCK_PY_LOCAL, CLOCK_UV_COUNT, LoopClock};

/// A subject driven through its stdin, killed when dropped.
struct Subject {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
    label: String,
}

impl Subject {
    fn start(program: &str, args: &[&str]) -> Subject {
        let label = format!("{program} {}", args.join(" "));
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let s = Subject {
            child,
            stdin,
            lines,
            label,
        };
        s.expect("ready");
        s
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("subject's stdin");
        self.stdin.flush().expect("subject's stdin");
    }

    /// Waits for the line `word`.
    fn expect(&self, word: &str) {
        self.expect_line(|line| line == word, word);
    }

    /// Waits for the line `word NS`; NS, the subject's CLOCK_MONOTONIC in
    /// nanoseconds.
    fn expect_stamp(&self, word: &str) -> u64 {
        let line = self.expect_line(|line| line.split(' ').next() == Some(word), word);
        line.split(' ')
            .nth(1)
            .and_then(|ns| ns.parse().ok())
            .unwrap_or_else(|| panic!("{}: {line:?} has no time", self.label))
    }

    fn expect_line(&self, want: impl Fn(&str) -> bool, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if want(&line) => return line,
                Ok(_) => {}
                Err(_) => panic!("{}: no {what:?}", self.label),
            }
        }
    }

    /// The threads asleep in epoll_wait, with their epoll fds.
    fn waiting(&self) -> Vec<(u32, i32)> {
        let pid = self.pid();
        blockwatch::procfs::threads(pid)
            .into_iter()
            .filter_map(|tid| Some((tid, clock::epoll_fd_waited(pid, tid)?)))
            .collect()
    }

    /// The loop's thread, asleep in epoll_wait, and its epoll fd, once the
    /// loop idles: the thread the kernel would report as a new loop. The
    /// main thread when `main` (Node has other threads that poll their own
    /// epoll), else the only other thread that waits there.
    fn idle_loop(&self, main: bool) -> (u32, i32) {
        let pid = self.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let waiting = self.waiting();
            let (mains, others): (Vec<_>, Vec<_>) = waiting.iter().partition(|w| w.0 == pid);
            match (main, mains.as_slice(), others.as_slice()) {
                (true, [one], _) | (false, _, [one]) => return *one,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "{}: no loop thread in epoll_wait ({waiting:?})",
                self.label
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the test knows of one found loop.
struct Loop<'a> {
    subject: &'a mut Subject,
    tid: u32,
    clock: LoopClock,
    py: Option<PyProcess>,
}

impl Loop<'_> {
    fn read(&self) -> Option<u64> {
        clock::read(self.subject.pid(), self.tid, &self.clock, self.py.as_ref())
    }

    /// Reads in a tight loop for `span`: (times the value changed between
    /// two reads, distinct non-zero values).
    fn changes(&self, span: Duration) -> (usize, usize) {
        let end = Instant::now() + span;
        let mut seen = std::collections::HashSet::new();
        let mut last = None;
        let mut changes = 0;
        while Instant::now() < end {
            let v = self.read();
            if last.is_some() && v != last {
                changes += 1;
            }
            last = v;
            if let Some(v) = v.filter(|&v| v != 0) {
                seen.insert(v);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        (changes, seen.len())
    }

    /// One 300 ms callback, read at 80 and 250 ms into it; None when a read
    /// fell outside it (the subject's stamps say when it ran).
    fn busy_reads(&mut self) -> Option<(Option<u64>, Option<u64>)> {
        self.subject.send("busy");
        let start = Duration::from_nanos(self.subject.expect_stamp("busy"));
        let at = |ms: u64| {
            std::thread::sleep((start + Duration::from_millis(ms)).saturating_sub(monotonic()));
            let t = monotonic();
            (self.read(), t, monotonic())
        };
        let (early, early_from, _) = at(80);
        let (late, _, late_to) = at(250);
        let end = Duration::from_nanos(self.subject.expect_stamp("done"));
        (start <= early_from && late_to <= end).then_some((early, late))
    }

    /// (a) a loop that ticks every 1 ms, (b) one 300 ms callback, (c) a
    /// saturated loop; `plausible` checks a value against our own clock.
    fn check(&mut self, plausible: impl Fn(u64) -> bool) {
        let label = self.subject.label.clone();

        // asyncio's clock is 0 while the loop sleeps in its select (the
        // rest of each tick): changes count, to and from 0. Our reads and
        // the subject's 300 ms of ticks may miss each other on a loaded
        // host (this process descheduled for much of the window): up to
        // three windows, the first that overlaps fully decides.
        let mut seen = (0, 0);
        for _ in 0..3 {
            self.subject.send("tick");
            self.subject.expect("ticking");
            seen = self.changes(Duration::from_millis(300));
            self.subject.expect("ticked");
            eprintln!("{label}: ticking: {} changes, {} values", seen.0, seen.1);
            if seen.0 >= 10 && seen.1 >= 5 {
                break;
            }
        }
        let (changes, distinct) = seen;
        assert!(
            changes >= 10 && distinct >= 5,
            "{label}: {changes} changes, {distinct} values in 300 ms of 1 ms ticks"
        );

        // Only reads that fell inside the callback, by the subject's own
        // stamps, test it: on a loaded machine, try again.
        let mut inside: Vec<u64> = Vec::new();
        for _ in 0..5 {
            let Some((early, late)) = self.busy_reads() else {
                continue;
            };
            eprintln!("{label}: busy callback: {early:?} at +80 ms, {late:?} at +250 ms");
            assert!(
                early.is_some_and(|v| v != 0 && plausible(v)),
                "{label}: {early:?}"
            );
            assert_eq!(early, late, "{label}: the clock moved within one callback");
            inside.extend(early);
            if inside.len() == 2 {
                break;
            }
        }
        assert!(
            !inside.is_empty(),
            "{label}: no read fell inside a busy callback"
        );
        if let [first, second] = inside[..] {
            assert_ne!(first, second, "{label}: two callbacks, two iterations");
        }

        self.subject.send("saturate");
        self.subject.expect("saturating");
        let (changes, distinct) = self.changes(Duration::from_millis(200));
        eprintln!("{label}: saturated: {changes} changes, {distinct} values");
        assert!(
            distinct >= 10,
            "{label}: {distinct} clock values in 200 ms of a saturated loop"
        );
        self.subject.expect("saturated");
    }
}

fn monotonic() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `ts` is.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn check_asyncio(python: &str, args: &[&str]) {
    let script = common::subject("clock_asyncio.py");
    let mut all = vec![script.as_str()];
    all.extend_from_slice(args);
    let mut subject = Subject::start(python, &all);
    let label = subject.label.clone();
    let pid = subject.pid();
    let (tid, epfd) = subject.idle_loop(args.is_empty());
    assert_eq!(tid == pid, args.is_empty(), "{label}: the loop's thread");
    let py = python::inspect(pid)
        .unwrap_or_else(|e| panic!("{label}: {e}"))
        .unwrap_or_else(|| panic!("{label}: not CPython"));
    let t = Instant::now();
    let found =
        clock::find(pid, tid, epfd, Some(&py)).unwrap_or_else(|| panic!("{label}: no clock"));
    eprintln!("{label}: {found:x?}, found in {:?}", t.elapsed());
    assert_eq!(found.kind, CLOCK_PY_LOCAL, "{label}");
    assert_eq!(found.value_offset, 16, "{label}");
    // While the loop idles, `_run_once` waits in its select: end_time is
    // not set yet.
    assert_eq!(
        clock::read(pid, tid, &found, Some(&py)),
        Some(0),
        "{label}: end_time is unset in the select"
    );
    // Another thread of the process runs no loop.
    if tid != pid {
        assert_eq!(clock::read(pid, pid, &found, Some(&py)), None, "{label}");
    }
    let mut l = Loop {
        subject: &mut subject,
        tid,
        clock: found,
        py: Some(py),
    };
    // asyncio's loop.time() is time.monotonic(), in seconds.
    l.check(|bits| (f64::from_bits(bits) - monotonic().as_secs_f64()).abs() < 5.0);
}

#[test]
fn asyncio_clock_on_every_interpreter() {
    let _guard = common::setup();
    for python in common::interpreters() {
        check_asyncio(python, &[]);
        check_asyncio(python, &["--thread"]);
    }
}

/// A Python with uvloop: a venv under ~/.cache/blockwatch made once, from
/// the newest interpreter the tests use that can make one (uvloop is on
/// PyPI, as wheels).
fn uvloop_python() -> PathBuf {
    let home = std::env::var_os("HOME").expect("HOME is set");
    let dir = Path::new(&home).join(".cache/blockwatch/uvloop-venv");
    let python = dir.join("bin/python");
    let has_uvloop = || {
        Command::new(&python)
            .args(["-c", "import uvloop"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_uvloop() {
        return python;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let made = common::interpreters().into_iter().rev().any(|base| {
        Command::new(base)
            .args(["-m", "venv"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success())
    });
    assert!(
        made,
        "no interpreter could make a venv at {}",
        dir.display()
    );
    let pip = Command::new(dir.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "uvloop",
        ])
        .status()
        .expect("pip");
    assert!(
        pip.success() && has_uvloop(),
        "installing uvloop from PyPI failed"
    );
    python
}

fn check_uvloop(python: &Path, thread: bool) {
    let script = common::subject("clock_asyncio.py");
    let mut args = vec![script.as_str(), "--uvloop"];
    if thread {
        args.push("--thread");
    }
    let mut subject = Subject::start(python.to_str().expect("UTF-8 path"), &args);
    let label = subject.label.clone();
    let pid = subject.pid();
    let (tid, epfd) = subject.idle_loop(!thread);
    let py = python::inspect(pid)
        .unwrap_or_else(|e| panic!("{label}: {e}"))
        .unwrap_or_else(|| panic!("{label}: not CPython"));
    let t = Instant::now();
    let found =
        clock::find(pid, tid, epfd, Some(&py)).unwrap_or_else(|| panic!("{label}: no clock"));
    eprintln!("{label}: {found:x?}, found in {:?}", t.elapsed());
    assert_eq!(
        found.kind, CLOCK_UV_COUNT,
        "{label}: uvloop's own libuv loop (1.45 or later) counts iterations"
    );
    assert_eq!(backend_fd(pid, &found), Some(epfd), "{label}");
    // The next fd is libuv's io_uring, which its heap state holds where a
    // loop holds its epoll fd.
    let t = Instant::now();
    assert_eq!(clock::find(pid, tid, epfd + 1, Some(&py)), None, "{label}");
    eprintln!(
        "{label}: no loop on fd {}, scanned in {:?}",
        epfd + 1,
        t.elapsed()
    );
    let mut l = Loop {
        subject: &mut subject,
        tid,
        clock: found,
        py: Some(py),
    };
    l.check(libuv_count);
}

/// libuv's iteration count: at least the iteration the loop was found in.
fn libuv_count(count: u64) -> bool {
    (1..1 << 40).contains(&count)
}

/// The `backend_fd` of the loop whose clock is `clock`: at offset 64 of
/// the `uv_loop_t`, whose time (`time_addr`) is at offset 544.
fn backend_fd(pid: u32, clock: &LoopClock) -> Option<i32> {
    blockwatch::procfs::mem::read_u64(pid, clock.time_addr - 544 + 64).map(|v| v as u32 as i32)
}

#[test]
fn uvloop_clock() {
    let _guard = common::setup();
    let python = uvloop_python();
    check_uvloop(&python, false);
    check_uvloop(&python, true);
}

#[test]
fn node_default_loop_clock() {
    let _guard = common::setup();
    let script = common::subject("clock_node.js");
    let mut subject = Subject::start("node", &[&script]);
    let label = subject.label.clone();
    let pid = subject.pid();
    let (tid, epfd) = subject.idle_loop(true);
    assert_eq!(tid, pid, "{label}: Node's loop runs on its main thread");
    let t = Instant::now();
    let found = clock::find(pid, tid, epfd, None).unwrap_or_else(|| panic!("{label}: no clock"));
    eprintln!(
        "{label}: epoll fd {epfd}, {found:x?}, found in {:?}",
        t.elapsed()
    );
    // Node 20's libuv is 1.46.
    assert_eq!(found.kind, CLOCK_UV_COUNT);
    // (c) The loop found is the one polling the thread's epoll fd.
    assert_eq!(backend_fd(pid, &found), Some(epfd), "{label}");
    // Another fd, another thread: no clock.
    assert_eq!(clock::find(pid, tid, epfd + 1, None), None);
    assert_eq!(clock::find(pid, tid + 1, epfd, None), None);

    let mut l = Loop {
        subject: &mut subject,
        tid,
        clock: found,
        py: None,
    };
    // Where the next iteration's start is read: libuv's time,
    // CLOCK_MONOTONIC(_COARSE) in ms.
    let idle = blockwatch::procfs::mem::read_u64(pid, found.time_addr).expect("readable");
    let now = monotonic().as_millis() as u64;
    assert!(
        idle <= now + 10 && now - idle < 60_000,
        "{label}: {idle} vs {now}"
    );
    l.check(libuv_count);
}

/// A worker thread's loop: its own `uv_loop_t`, on its stack.
#[test]
fn node_worker_loop_clock() {
    let _guard = common::setup();
    let script = common::subject("clock_node.js");
    let mut subject = Subject::start("node", &[&script]);
    let label = format!("{} (worker)", subject.label);
    let pid = subject.pid();
    let (_, main_epfd) = subject.idle_loop(true);
    let main_clock = clock::find(pid, pid, main_epfd, None).expect("the main loop's clock");
    let before = subject.waiting();
    subject.send("worker");
    subject.expect("ready");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (tid, epfd) = loop {
        let new: Vec<(u32, i32)> = subject
            .waiting()
            .into_iter()
            .filter(|w| !before.contains(w))
            .collect();
        if let [one] = new.as_slice() {
            break *one;
        }
        assert!(
            Instant::now() < deadline,
            "{label}: no new loop thread: {new:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_ne!(tid, pid);
    let t = Instant::now();
    let found = clock::find(pid, tid, epfd, None).unwrap_or_else(|| panic!("{label}: no clock"));
    eprintln!(
        "{label}: thread {tid}, epoll fd {epfd}, {found:x?}, found in {:?}",
        t.elapsed()
    );
    assert_eq!(found.kind, CLOCK_UV_COUNT);
    assert_ne!(
        found.addr, main_clock.addr,
        "{label}: the worker's own loop"
    );
    assert_eq!(backend_fd(pid, &found), Some(epfd), "{label}");
    assert_eq!(
        clock::find(pid, tid, main_epfd, None),
        None,
        "{label}: not the main loop"
    );
    let mut l = Loop {
        subject: &mut subject,
        tid,
        clock: found,
        py: None,
    };
    l.subject.label = label;
    l.check(libuv_count);
}
