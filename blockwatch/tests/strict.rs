//! End-to-end tests of strict syscall mode (`--strict`): the real binary,
//! as root, on the real kernel, against `subjects/asyncio_strict.py` (see
//! its timeline). CPU-bound episodes are in tests/cpu_work.rs; the daemon's
//! metrics of both in tests/daemon.rs. Run them with `sudo -E cargo xtask test`.

mod common;

use common::{Event, PYTHON, Run, subject, trace};

const SUBJECT: &str = "asyncio_strict.py";

fn strict_events(run: &Run) -> Vec<&Event> {
    run.events_where(|e| e.detector == "strict")
}

fn names(e: &Event) -> Vec<&str> {
    e.stack
        .iter()
        .filter_map(|f| f.function.as_deref())
        .collect()
}

fn culprit_fn(e: &Event) -> &str {
    e.culprit
        .as_ref()
        .and_then(|f| f.function.as_deref())
        .unwrap_or("")
}

/// The summary table's rows (stderr in JSON mode) of one section, as
/// whitespace-separated cells: TOTAL COUNT MAX SYSCALL CLASS CULPRIT.
fn summary_rows<'a>(run: &'a Run, section: &str) -> Vec<Vec<&'a str>> {
    let mut lines = run.stderr.lines().skip_while(|l| !l.starts_with(section));
    lines.next();
    lines
        .skip(1) // the column headers
        .take_while(|l| !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect()
}

/// open(cached file).read() and os.stat in a coroutine never leave the
/// CPU: only --strict sees them, on the loop thread, with their syscalls,
/// classes and Python functions; the executor thread's identical calls and
/// the idle loop give nothing.
#[test]
fn strict_reports_cached_opens_and_stats_on_the_loop_only() {
    let _serial = common::setup();
    let run = trace(&["--strict", "--", PYTHON, &subject(SUBJECT)]);
    run.assert_success();
    let strict = strict_events(&run);
    assert!(!strict.is_empty(), "no strict events\n{}", run.report());
    for e in &strict {
        assert!(
            e.is_main_thread() && e.state == "running" && e.ms() < 50.0,
            "strict calls are on the loop (main) thread and stay on the CPU: {}\n{}",
            e.summary(),
            run.report()
        );
        assert!(
            !names(e).contains(&"executor_reads"),
            "the executor thread's calls are not the loop's: {}\n{}",
            e.summary(),
            run.report()
        );
    }
    let open = strict
        .iter()
        .find(|e| e.syscall.as_deref() == Some("openat") && culprit_fn(e) == "read_cached_file");
    let open = open.unwrap_or_else(|| {
        panic!(
            "open() in a coroutine: an openat, class file, in read_cached_file\n{}",
            run.report()
        )
    });
    assert_eq!(open.class, "file", "{}", open.summary());
    let stat = strict
        .iter()
        .find(|e| culprit_fn(e) == "stat_file")
        .unwrap_or_else(|| {
            panic!(
                "os.stat in a coroutine: a strict call in stat_file\n{}",
                run.report()
            )
        });
    assert_eq!(stat.class, "stat", "{}", stat.summary());
    assert!(
        matches!(
            stat.syscall.as_deref(),
            Some("newfstatat" | "statx" | "stat")
        ),
        "{}",
        stat.summary()
    );
    // One event per stack, every call counted in the summary.
    let opens_of_read = strict
        .iter()
        .filter(|e| e.syscall.as_deref() == Some("openat") && culprit_fn(e) == "read_cached_file")
        .count();
    assert_eq!(opens_of_read, 1, "one event per stack\n{}", run.report());
    let rows = summary_rows(&run, "strict:");
    let row = rows
        .iter()
        .find(|r| r.get(3) == Some(&"openat") && r.last() == Some(&"read_cached_file"))
        .unwrap_or_else(|| panic!("no strict summary row for openat\n{}", run.stderr));
    // 5 calls: counted as strict, unless preempted past --threshold on a
    // loaded machine (then an off-CPU event).
    let preempted = run
        .events_where(|e| {
            e.detector == "offcpu"
                && e.syscall.as_deref() == Some("openat")
                && culprit_fn(e) == "read_cached_file"
        })
        .len();
    assert_eq!(
        row[1].parse::<usize>().unwrap() + preempted,
        5,
        "5 calls of read_cached_file\n{}",
        run.stderr
    );
    // A syscall of the strict set that went off the CPU past --threshold
    // (time.sleep(0.05)) is an off-CPU event and is not counted again.
    let sleeps = run.events_where(|e| culprit_fn(e) == "blocking_sleep");
    assert_eq!(sleeps.len(), 1, "{}", run.report());
    assert_eq!(
        (sleeps[0].detector.as_str(), sleeps[0].syscall.as_deref()),
        ("offcpu", Some("clock_nanosleep")),
        "{}",
        run.report()
    );
    assert!(
        !summary_rows(&run, "strict:")
            .iter()
            .any(|r| r.last() == Some(&"blocking_sleep")),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains(" strict calls"), "{}", run.stderr);
}

#[test]
fn without_strict_nothing_is_strict() {
    let _serial = common::setup();
    let run = trace(&["--", PYTHON, &subject(SUBJECT)]);
    run.assert_success();
    assert!(strict_events(&run).is_empty(), "{}", run.report());
    assert!(!run.stderr.contains("strict:"), "{}", run.stderr);
    assert!(!run.stderr.contains("strict calls"), "{}", run.stderr);
}

#[test]
fn text_output_names_strict_calls_and_stalls() {
    let _serial = common::setup();
    let run = common::blockwatch(&["trace", "--strict", "--", PYTHON, &subject(SUBJECT)]);
    run.assert_success();
    let out = &run.stdout;
    assert!(
        out.contains("blocking file call (openat, ") && out.contains("on the CPU, strict)"),
        "{out}"
    );
    assert!(
        out.contains("stall (") && out.contains(" in cpu_hog"),
        "{out}"
    );
    assert!(
        out.contains(" samples"),
        "the CPU episode's breakdown\n{out}"
    );
    assert!(out.contains("\nstrict: "), "{out}");
}
