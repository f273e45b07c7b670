//! End-to-end tests of target selection and privileges: processes matched
//! by name as they start, and the error a user without privileges gets.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{repo_root, subject, trace_with_timeout};

/// `--comm` picks up a process that starts after blockwatch attached (it is
/// matched at exec) and reports its loop like any other.
#[test]
fn comm_glob_watches_processes_started_later() {
    let _serial = common::setup();
    // A uniquely named interpreter: comm comes from the exec'd file name.
    let alias = common::python_alias("bwcommtest");
    let script = subject("asyncio_blocker.py");
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        Command::new(&alias.path)
            .arg(script)
            .current_dir(repo_root())
            .status()
            .expect("run the subject")
    });
    let run = trace_with_timeout(
        &["--comm", "bwcomm*", "--duration", "6s"],
        Duration::from_secs(30),
    );
    assert!(starter.join().unwrap().success());
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
