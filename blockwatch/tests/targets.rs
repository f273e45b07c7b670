//! End-to-end tests of target selection and privileges: processes matched
//! by name as they start, and the error a user without privileges gets.

mod common;

use std::process::Command;

use common::{PYTHON, Run, TestCgroup, Watch, repo_root, subject};

/// `trace --output json ARGS` while `subjects` runs, started once trace
/// says it is watching (so each subject is new to it, however long the
/// attach took), stopped with SIGINT once `subjects` returns.
fn watch_while<T>(args: &[&str], subjects: impl FnOnce() -> T) -> (Run, T) {
    let watch = Watch::start(args);
    let result = subjects();
    (watch.stop(), result)
}

/// `--comm` picks up a process that starts after blockwatch attached (it is
/// matched at exec) and reports its loop like any other.
#[test]
fn comm_glob_watches_processes_started_later() {
    let _serial = common::setup();
    // A uniquely named interpreter: comm comes from the exec'd file name.
    let alias = common::python_alias("bwcommtest");
    let script = subject("asyncio_blocker.py");
    let (run, status) = watch_while(&["--comm", "bwcomm*"], || {
        Command::new(&alias.path)
            .arg(script)
            .current_dir(repo_root())
            .status()
            .expect("run the subject")
    });
    assert!(status.success());
    run.assert_success();
    let sleeps = run.events_where(|e| e.class == "sleep" && e.comm == "bwcommtest");
    assert_eq!(
        sleeps.len(),
        3,
        "the subject's three time.sleep(0.08) on its loop\n{}",
        run.report()
    );
    assert!(
        run.events.iter().all(|e| e.comm == "bwcommtest"),
        "only the matched process is watched\n{}",
        run.report()
    );
}

/// A process picked by `--comm` that blocks right after exec (coreutils
/// `sleep`, in its nanosleep about a millisecond after exec) is watched
/// already: the kernel matches the name at exec, user space only later
/// reads the exec notice. `--threads all` makes each wait its own event.
#[test]
fn a_process_named_by_comm_is_watched_from_its_exec() {
    let _serial = common::setup();
    const RUNS: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("bwquicksleep");
    std::os::unix::fs::symlink("/bin/sleep", &exe).unwrap();
    let (run, ran) = watch_while(&["--comm", "bwquick*", "--threads", "all"], || {
        (0..RUNS).all(|_| {
            Command::new(&exe)
                .arg("0.04")
                .status()
                .is_ok_and(|s| s.success())
        })
    });
    assert!(ran, "the sleeps ran");
    run.assert_success();
    let sleeps = run.events_where(|e| e.class == "sleep" && e.comm == "bwquicksleep");
    assert_eq!(
        sleeps.len(),
        RUNS,
        "every run's one 40 ms sleep, the first thing it does\n{}",
        run.report()
    );
}

/// An asyncio loop asleep in its wait when it is first watched (a server
/// idle between requests, as `trace --pid` or the daemon finds it): the
/// first call that blocks it after the attach is reported, with its
/// Python function, not only the calls after its next idle wait.
#[test]
fn a_loop_idle_when_watched_reports_its_first_blocking_call() {
    let _serial = common::setup();
    const SUBJECT: &str = r#"
import asyncio, signal, time
def first_slow_request():
    time.sleep(0.15)
async def main():
    woke = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, woke.set)
    print("idle", flush=True)
    await woke.wait()
    first_slow_request()
    await asyncio.sleep(0.3)
asyncio.run(main())
"#;
    let mut child = Command::new(PYTHON)
        .args(["-c", SUBJECT])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the subject");
    let pid = child.id();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("piped")),
        &mut line,
    )
    .expect("the subject's first line");
    assert_eq!(line.trim(), "idle");
    // Asleep in epoll_wait, epoll_pwait or epoll_pwait2 (x86_64).
    let asleep_in_epoll = || {
        std::fs::read_to_string(format!("/proc/{pid}/syscall"))
            .is_ok_and(|s| matches!(s.split_whitespace().next(), Some("232" | "281" | "441")))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !asleep_in_epoll() {
        assert!(
            std::time::Instant::now() < deadline,
            "the subject never slept in its loop's wait"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid_arg = pid.to_string();
    let (run, status) = watch_while(&["--pid", &pid_arg], || {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) };
        child.wait().expect("the subject exits")
    });
    assert!(status.success());
    run.assert_success();
    let first = run.events_where(|e| e.culprit_function() == "first_slow_request");
    assert_eq!(
        first.len(),
        1,
        "the one blocking call, made right after the loop woke\n{}",
        run.report()
    );
    assert_eq!(first[0].class, "sleep", "{}", run.report());
    assert!(
        (140.0..400.0).contains(&first[0].ms()),
        "about 150 ms: {}",
        first[0].ms()
    );
}

/// `--unit` and `--cgroup` pick up a process that enters its cgroup and
/// execs after blockwatch attached; a second one outside it is not watched.
#[test]
fn unit_and_cgroup_rules_watch_processes_started_later() {
    let _serial = common::setup();
    let unit = format!("bwtest-{}.service", std::process::id());
    let cg = TestCgroup::new(&format!("bwtest.slice/{unit}"));
    for flags in [
        ["--unit", "bwtest-*.service"],
        ["--cgroup", "/bwtest.slice/*"],
    ] {
        let script = subject("asyncio_blocker.py");
        let mut inside = cg.exec_in(&[PYTHON, &script]);
        let (run, pid) = watch_while(&[flags[0], flags[1]], || {
            let outside = Command::new(PYTHON)
                .arg(&script)
                .current_dir(repo_root())
                .spawn()
                .expect("run the subject outside the cgroup");
            let inside = inside
                .current_dir(repo_root())
                .spawn()
                .expect("run the subject in the cgroup");
            let pid = inside.id();
            for mut c in [outside, inside] {
                assert!(c.wait().unwrap().success());
            }
            pid
        });
        run.assert_success();
        let sleeps = run.events_where(|e| e.class == "sleep" && e.pid == pid);
        assert_eq!(
            sleeps.len(),
            3,
            "{flags:?}: the three time.sleep(0.08) of the process in {unit}\n{}",
            run.report()
        );
        assert!(
            run.events.iter().all(|e| e.pid == pid),
            "{flags:?}: only the process in the cgroup is watched\n{}",
            run.report()
        );
    }
}

/// `--cmdline` and `--exe` select by what a process runs, not its name:
/// of two subjects started later, only the one the rule names is watched.
#[test]
fn cmdline_and_exe_rules_select_what_runs() {
    let _serial = common::setup();
    let script = subject("asyncio_blocker.py");
    let tag = format!("bwcmdline-{}", std::process::id());
    let cmdline = format!("*asyncio_blocker.py {tag}");
    // /proc/PID/exe is the resolved interpreter, not the name it was run as.
    let resolved = |python: &str| {
        let out = Command::new(python)
            .args(["-c", "import os; print(os.path.realpath('/proc/self/exe'))"])
            .output()
            .expect("run python");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let exe = resolved(PYTHON);
    assert_ne!(
        exe,
        resolved(common::SYSTEM_PYTHON),
        "the test needs two different interpreters"
    );
    let cases = [
        // (flags, selected subject's argv, other subject's argv)
        (
            ["--cmdline", cmdline.as_str()],
            vec![PYTHON.to_string(), script.clone(), tag.clone()],
            vec![PYTHON.to_string(), script.clone()],
        ),
        (
            ["--exe", exe.as_str()],
            vec![PYTHON.to_string(), script.clone()],
            vec![common::SYSTEM_PYTHON.to_string(), script.clone()],
        ),
    ];
    for (flags, selected, other) in cases {
        let (run, (selected, other)) = watch_while(&[flags[0], flags[1]], || {
            let start = |argv: &[String]| {
                Command::new(&argv[0])
                    .args(&argv[1..])
                    .current_dir(repo_root())
                    .spawn()
                    .expect("run a subject")
            };
            let (mut a, mut b) = (start(&selected), start(&other));
            let pids = (a.id(), b.id());
            assert!(a.wait().unwrap().success() && b.wait().unwrap().success());
            pids
        });
        run.assert_success();
        let sleeps = run.events_where(|e| e.class == "sleep" && e.pid == selected);
        assert_eq!(sleeps.len(), 3, "{flags:?}\n{}", run.report());
        assert!(
            run.events_where(|e| e.pid == other).is_empty(),
            "{flags:?}: the other subject is not watched\n{}",
            run.report()
        );
    }
}

/// Without root, blockwatch says which capabilities it needs and how to
/// get them, in one line, before touching the kernel.
#[test]
fn unprivileged_user_is_told_what_is_needed() {
    let _serial = common::setup();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            env!("CARGO_BIN_EXE_blockwatch"),
            "trace",
            "--",
            "true",
        ])
        .output()
        .expect("setpriv (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    for needed in ["CAP_BPF", "CAP_PERFMON", "sudo"] {
        assert!(stderr.contains(needed), "mentions {needed}: {stderr}");
    }
}
