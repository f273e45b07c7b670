//! End-to-end tests of strict syscall mode (`--strict`): the real binary,
//! as root, on the real kernel, against `subjects/asyncio_strict.py` (see
//! its timeline), and strict mode's exact counts and unwound stacks
//! against `subjects/asyncio_stat_loop.py`, `asyncio_many_sites.py`,
//! `asyncio_open_twice.py` and `node_strict_read.js`. CPU-bound episodes
//! are in tests/cpu_work.rs; the daemon's metrics of both in
//! tests/daemon.rs. Run them with `sudo -E cargo xtask test`.

mod common;

use common::{Event, PYTHON, Run, subject, trace};

/// The calls the summary's `strict:` table counts for `culprit` and one
/// of `syscalls`.
fn strict_count(run: &Run, culprit: &str, syscalls: &[&str]) -> u64 {
    summary_rows(run, "strict:")
        .iter()
        .filter(|r| r.last() == Some(&culprit) && r.get(3).is_some_and(|s| syscalls.contains(s)))
        .map(|r| r[1].parse::<u64>().expect("a count"))
        .sum()
}

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

/// 40,000 os.stat in one coroutine: every call counted, exactly, on every
/// interpreter, however full the ring buffer gets (the counts are kept in
/// the kernel; only each call site's first call sends a record). The
/// threshold is out of reach, so no call can become an off-CPU event
/// instead.
#[test]
fn strict_counts_every_call_exactly() {
    let _serial = common::setup();
    for python in common::interpreters() {
        let run = trace(&[
            "--strict",
            "--threshold",
            "30s",
            "--",
            python,
            &subject("asyncio_stat_loop.py"),
            "40000",
        ]);
        run.assert_success();
        let stats = ["newfstatat", "statx", "stat"];
        assert_eq!(
            strict_count(&run, "stat_many", &stats),
            40_000,
            "{python}: 40,000 os.stat in stat_many\n{}",
            run.stderr
        );
        let events = strict_events(&run);
        let sites = events
            .iter()
            .filter(|e| culprit_fn(e) == "stat_many")
            .count();
        // One line of Python: a few native paths (the interpreter
        // specialises the call after its first runs), never one per call.
        assert!(
            (1..=8).contains(&sites),
            "{python}: {sites} stacks for one call site\n{}",
            run.report()
        );
        assert!(
            !run.stderr.contains("were lost"),
            "{python}: nothing lost\n{}",
            run.stderr
        );
        assert!(
            run.stderr.contains(" strict calls in "),
            "{python}: the closing line counts them\n{}",
            run.stderr
        );
    }
}

/// 17,000 call sites, each called once: more than the kernel's site map
/// holds, and more first-call stacks than the ring buffer takes at once.
/// Every call is still counted: under its culprit, under `<unknown>` when
/// its stack was lost, or, past the map, in the closing line's total with
/// the number that had no call site next to it.
#[test]
fn strict_counts_stay_exact_past_the_site_map_and_the_ring_buffer() {
    let _serial = common::setup();
    let run = trace(&[
        "--strict",
        "--threshold",
        "30s",
        "--",
        PYTHON,
        &subject("asyncio_many_sites.py"),
        "17000",
    ]);
    run.assert_success();
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("loop episodes over") && l.contains(" strict calls"))
        .unwrap_or_else(|| panic!("no closing line\n{}", run.stderr));
    let number_before = |what: &str| -> u64 {
        let head = &line[..line.find(what).unwrap_or_else(|| panic!("{what}: {line}"))];
        let digits = head
            .rsplit(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap_or("");
        digits
            .parse()
            .unwrap_or_else(|_| panic!("a number before {what:?}: {line}"))
    };
    let total = number_before(" strict calls");
    let no_site = number_before(" of them at no call site");
    assert!(no_site > 0, "the map filled: {line}");
    let stats = ["newfstatat", "statx", "stat"];
    let rows: u64 = summary_rows(&run, "strict:")
        .iter()
        .filter(|r| r.get(3).is_some_and(|s| stats.contains(s)))
        .map(|r| r[1].parse::<u64>().expect("a count"))
        .sum();
    assert!(total >= 17_000, "{line}");
    // 17,000 first calls' stacks (27 MB without their copies) never fit
    // the 4 MiB ring buffer: the lost ones are counted under `<unknown>`.
    assert!(
        run.stderr.contains("stack-sample records were lost"),
        "{}",
        run.stderr
    );
    assert!(
        summary_rows(&run, "strict:")
            .iter()
            .any(|r| r.last() == Some(&"<unknown>") && r[1] != "0"),
        "{}",
        run.stderr
    );
    assert_eq!(rows + no_site, total, "{}", run.stderr);
    assert_eq!(
        rows + no_site,
        17_000,
        "every os.stat counted, none else on the loop\n{}",
        run.stderr
    );
}

/// open() from one line, of a cached file (strict: it never leaves the
/// CPU) and of a FIFO whose writer comes later (off-CPU): both detectors
/// unwind the same stack copy the same way, so the off-CPU wait's stack,
/// native frames included, is one of the strict call site's, with one
/// culprit.
#[test]
fn strict_and_offcpu_unwind_one_call_site_alike() {
    let _serial = common::setup();
    for python in common::interpreters() {
        let run = trace(&["--strict", "--", python, &subject("asyncio_open_twice.py")]);
        run.assert_success();
        let opens = |detector: &str| -> Vec<&Event> {
            run.events_where(|e| {
                e.detector == detector
                    && e.syscall.as_deref() == Some("openat")
                    && culprit_fn(e) == "open_once"
            })
        };
        let (strict, offcpu) = (opens("strict"), opens("offcpu"));
        assert!(
            !strict.is_empty() && offcpu.len() == 1,
            "{python}: strict opens of the script, an off-CPU open of the FIFO\n{}",
            run.report()
        );
        let o = offcpu[0];
        assert!(
            strict.iter().any(|s| s.functions() == o.functions()),
            "{python}: the off-CPU stack is one of the strict ones\n{}",
            run.stacks()
        );
        // Native frames between libc's open and open_once(): the
        // unwinder's, which frame pointers do not reach in these builds.
        let to_caller = o
            .stack
            .iter()
            .position(|f| f.function.as_deref() == Some("open_once"))
            .unwrap_or(0);
        assert!(to_caller >= 2, "{python}: native frames\n{}", run.stacks());
        assert_eq!(
            strict_count(&run, "open_once", &["openat"]),
            5,
            "{python}\n{}",
            run.stderr
        );
    }
}

/// Plain `node` (no perf map): readFileSync in a timer callback opens a
/// cached file without leaving the CPU; strict mode names the JS function
/// from V8's frames in the call's stack copy, and counts its 3 calls.
#[test]
fn plain_node_strict_open_names_the_js_function() {
    let _serial = common::setup();
    let run = trace(&["--strict", "--", "node", &subject("node_strict_read.js")]);
    run.assert_success();
    let opens = run.events_where(|e| {
        e.detector == "strict"
            && e.syscall.as_deref() == Some("openat")
            && e.culprit_function().starts_with("loadTemplateEachTime ")
    });
    assert!(!opens.is_empty(), "{}\n{}", run.report(), run.stacks());
    assert!(
        opens[0]
            .functions()
            .iter()
            .any(|f| f.starts_with("readFileSync node:fs")),
        "{}",
        run.stacks()
    );
    let culprit = opens[0].culprit_function().to_string();
    let rows = summary_rows(&run, "strict:");
    let counted: u64 = rows
        .iter()
        .filter(|r| r.get(3) == Some(&"openat") && r.join(" ").ends_with(&culprit))
        .map(|r| r[1].parse::<u64>().expect("a count"))
        .sum();
    assert_eq!(counted, 3, "3 readFileSync\n{}", run.stderr);
}
