//! End to end: the offender is the user's own function even when the wait
//! or the CPU time is spent deep in a C library the interpreter calls
//! (libsqlite3 syncing a commit, libcrypto loading the CA bundle), while the
//! culprit keeps naming the innermost application-side frame.

mod common;

use common::{Event, Run, subject, trace};

fn function(frame: Option<&common::Frame>) -> Option<&str> {
    frame.and_then(|f| f.function.as_deref())
}

fn module(frame: Option<&common::Frame>) -> &str {
    frame.and_then(|f| f.module.as_deref()).unwrap_or("")
}

/// Events whose culprit lies in a library whose file name contains `lib`.
fn in_library<'a>(run: &'a Run, lib: &str) -> Vec<&'a Event> {
    run.events_where(|e| e.is_main_thread() && module(e.culprit.as_ref()).contains(lib))
}

#[test]
fn sqlite_commit_and_ssl_context_blame_the_users_function() {
    let _serial = common::setup();
    let script = subject("python_offender.py");
    for python in common::interpreters() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let db_dir = dir.path().to_str().expect("UTF-8 temp path");
        // 100 µs: an fsync of SQLite's journal on the test disk takes from
        // 0.1 to a few ms (five commits once all took under 1 ms).
        let run = trace(&["--threshold", "100us", "--", python, &script, db_dir]);
        run.assert_success();

        let commits = in_library(&run, "libsqlite3");
        let in_save: Vec<_> = commits
            .iter()
            .filter(|e| function(e.offender.as_ref()) == Some("save_order"))
            .collect();
        assert!(
            !in_save.is_empty(),
            "{python}: a commit's wait inside libsqlite3 is blamed on save_order\n{}",
            run.report()
        );
        for e in &in_save {
            assert!(
                function(e.culprit.as_ref()).is_some_and(|f| f.starts_with("sqlite3")),
                "{python}: the culprit stays the innermost application-side frame\n{}",
                run.report()
            );
        }

        // OpenSSL's time is on the CPU (a stall, named from samples) and,
        // when the CA bundle is not cached, in short waits inside
        // libcrypto: whichever blockwatch saw, it is blamed on make_client.
        let in_make_client: Vec<_> = run.events_where(|e| {
            e.is_main_thread()
                && e.stack
                    .iter()
                    .any(|f| f.function.as_deref() == Some("make_client"))
        });
        assert!(
            !in_make_client.is_empty(),
            "{python}: ssl.create_default_context() is seen\n{}",
            run.report()
        );
        for e in &in_make_client {
            assert_eq!(
                function(e.offender.as_ref()),
                Some("make_client"),
                "{python}: time inside OpenSSL is blamed on make_client\n{}",
                run.report()
            );
        }

        // With the user's function in the stack, no system library is ever
        // the offender.
        for e in run.events_where(|e| e.is_main_thread()) {
            let users = e.stack.iter().any(|f| {
                [&f.file, &f.module].iter().any(|p| {
                    p.as_deref()
                        .is_some_and(|p| p.ends_with("python_offender.py"))
                })
            });
            let offender = module(e.offender.as_ref());
            assert!(
                !users || !(offender.contains(".so") || offender.ends_with("python3")),
                "{python}: offender {offender} beside the user's frame in {}\n{}",
                e.summary(),
                run.report()
            );
        }
    }
}
