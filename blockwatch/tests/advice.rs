//! Fix advice on the real subjects: every event's `advice` (JSON) and
//! every verdict line say what to do instead, for Python, tokio and Node.

mod common;

use common::{blockwatch, subject, tokio_blocker, trace};

/// (class, advice) of every event of a `--output json` run.
fn advice(run: &common::Run) -> Vec<(String, String)> {
    run.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON event");
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_string();
            (field("class"), field("advice"))
        })
        .collect()
}

#[test]
fn python_time_sleep_gets_asyncio_sleep() {
    let _serial = common::setup();
    let run = trace(&["--", "python3", &subject("asyncio_blocker.py")]);
    run.assert_success();
    let all = advice(&run);
    let sleeps: Vec<_> = all.iter().filter(|(c, _)| c == "sleep").collect();
    assert_eq!(sleeps.len(), 3, "{}", run.report());
    for (_, a) in &sleeps {
        assert!(
            a.contains("await asyncio.sleep(...)"),
            "{a}\n{}",
            run.report()
        );
    }
    assert!(all.iter().all(|(_, a)| !a.is_empty()), "{all:?}");
}

#[test]
fn tokio_sleep_and_fs_get_their_tokio_forms() {
    let _serial = common::setup();
    let run = trace(&["--", &tokio_blocker()]);
    run.assert_success();
    let all = advice(&run);
    let of = |class: &str| -> Vec<&String> {
        all.iter()
            .filter(|(c, _)| c == class)
            .map(|(_, a)| a)
            .collect()
    };
    assert_eq!(of("sleep").len(), 3, "{}", run.report());
    for a in of("sleep") {
        assert!(a.contains("tokio::time::sleep"), "{a}");
    }
    assert!(!of("file").is_empty(), "{}", run.report());
    for a in of("file") {
        assert!(
            a.contains("tokio::fs") && a.contains("spawn_blocking"),
            "{a}"
        );
    }
}

#[test]
fn node_verdicts_name_the_async_forms() {
    let _serial = common::setup();
    let run = blockwatch(&["trace", "--", "node", &subject("node_blocker.js")]);
    run.assert_success();
    let verdicts: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("blocking "))
        .collect();
    assert!(
        verdicts.iter().all(|v| v.contains("; fix: ")),
        "{verdicts:#?}"
    );
    assert!(
        verdicts
            .iter()
            .any(|v| v.contains("child_process.exec") && v.contains("execSync")),
        "execSync's verdict names child_process.exec/spawn\n{}",
        run.stdout
    );
    assert!(
        verdicts
            .iter()
            .any(|v| v.starts_with("blocking lock") && v.contains("Atomics.waitAsync")),
        "Atomics.wait's verdict names Atomics.waitAsync\n{}",
        run.stdout
    );
}
