//! End-to-end tests of `blockwatch daemon`: the real binary, as root,
//! watching real Python processes, scraped over HTTP and by a real
//! Prometheus server (Debian's `prometheus`, installed by
//! `cargo xtask setup`). Every wait has a deadline.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Alias, free_addr, python_alias, repo_root, subject};

fn until<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {deadline:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn run_blocker(alias: &Alias) {
    let status = Command::new(&alias.path)
        .arg(subject("asyncio_blocker.py"))
        .current_dir(repo_root())
        .status()
        .expect("run the subject");
    assert!(status.success());
}

/// A running daemon; killed (SIGTERM, then SIGKILL) when dropped.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(args: &[&str]) -> Daemon {
        Daemon::start_with(&[], &[], args)
    }

    /// Runs the daemon under `prefix` (e.g. setpriv …) with `env` added.
    fn start_with(prefix: &[&str], env: &[(&str, &str)], args: &[&str]) -> Daemon {
        let addr = free_addr();
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("stderr");
        let listen = addr.to_string();
        let mut full: Vec<&str> = prefix.to_vec();
        full.extend([
            env!("CARGO_BIN_EXE_blockwatch"),
            "daemon",
            "--listen",
            listen.as_str(),
        ]);
        full.extend(args);
        let child = Command::new(full[0])
            .args(&full[1..])
            .envs(env.iter().copied())
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start blockwatch daemon");
        let mut d = Daemon {
            child,
            addr,
            stderr,
            _dir: dir,
        };
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((200, _)) = http_get(addr, "/healthz") {
                // Serving starts before the initial scan ends: wait for
                // the startup line, printed once everything is watched.
                if d.stderr().contains("blockwatch: watching") {
                    return d;
                }
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!("daemon exited with {status}: {}", d.stderr());
            }
            assert!(
                Instant::now() < end,
                "daemon not serving after 30 s: {}",
                d.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        match http_get(self.addr, "/metrics") {
            Some((200, body)) => body,
            other => panic!("/metrics: {other:?}\n{}", self.stderr()),
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// SIGTERM and the exit status (None: still running after 10 s).
    fn terminate(&mut self) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The value of the sample `name{labels…}` whose labels include all of
/// `want` (text exposition format).
/// Sum of the series of `name` that carry the `want` labels (one process
/// may have several, e.g. before and after its Python frames were known
/// the culprit label differs); None when there is none.
fn sample(metrics: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix('{')?;
            let (labels, value) = rest.rsplit_once("} ")?;
            want.iter()
                .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .reduce(|a, b| a + b)
}

fn events_of(d: &Daemon, process: &str) -> f64 {
    sample(
        &d.metrics(),
        "blockwatch_blocking_events_total",
        &[("process", process), ("class", "sleep")],
    )
    .unwrap_or(0.0)
}

#[test]
fn metrics_count_a_python_subjects_blocking_calls() {
    let _serial = common::setup();
    let alias = python_alias("bwdmetrics");
    let mut d = Daemon::start(&["--comm", "bwdmetric*"]);
    run_blocker(&alias);
    until(
        Duration::from_secs(20),
        "3 sleep events in /metrics",
        || (events_of(&d, "bwdmetrics") >= 3.0).then_some(()),
    );
    let m = d.metrics();
    let secs = sample(
        &m,
        "blockwatch_blocking_seconds_total",
        &[("process", "bwdmetrics"), ("class", "sleep")],
    )
    .unwrap_or(0.0);
    assert!((0.2..1.0).contains(&secs), "3 × 80 ms, got {secs}\n{m}");
    assert!(
        sample(
            &m,
            "blockwatch_blocking_duration_seconds_count",
            &[("process", "bwdmetrics"), ("class", "sleep")]
        ) >= Some(3.0),
        "{m}"
    );
    assert!(m.contains("blockwatch_build_info{version="), "{m}");
    assert!(m.contains("blockwatch_events_lost_total "), "{m}");
    for what in ["stack", "user_stack", "probe", "tag", "loop_state"] {
        assert!(
            m.contains(&format!("blockwatch_kernel_drops_total{{what=\"{what}\"}}")),
            "{m}"
        );
    }
    assert!(!m.contains("pid=") && !m.contains("tid="), "{m}");
    assert_eq!(http_get(d.addr, "/healthz").map(|r| r.0), Some(200));
    let (code, stacks) = http_get(d.addr, "/stacks").unwrap();
    assert_eq!(code, 200);
    let line = stacks
        .lines()
        .find(|l| l.starts_with("bwdmetrics;"))
        .unwrap_or_else(|| panic!("no folded stack of the subject:\n{stacks}"));
    let us: u64 = line.rsplit_once(' ').unwrap().1.parse().unwrap();
    assert!(us >= 200_000, "{line}");
    assert_eq!(http_get(d.addr, "/nope").map(|r| r.0), Some(404));

    let status = d.terminate().expect("daemon stops on SIGTERM");
    assert!(status.success(), "{status}: {}", d.stderr());
    let log = d.stderr();
    let verdicts: Vec<_> = log
        .lines()
        .filter(|l| l.starts_with("blocking sleep (clock_nanosleep"))
        .collect();
    assert_eq!(
        verdicts.len(),
        1,
        "one line per new blocking stack, not per event:\n{log}"
    );
    assert!(
        verdicts[0].contains("on the event loop of bwdmetrics["),
        "{log}"
    );
}

/// A unit rule picks up a process that starts later in a container-like
/// cgroup, and --container-labels puts the container ID on its series.
#[test]
fn unit_rule_and_container_labels() {
    let _serial = common::setup();
    let id = format!("{:0>64x}", 0xb10c_3a7c_u64 + std::process::id() as u64);
    let cg = common::TestCgroup::new(&format!("bwtest.slice/docker-{id}.scope"));
    let alias = python_alias("bwdcontainer");
    let mut d = Daemon::start(&["--unit", "docker-*.scope", "--container-labels"]);
    let script = subject("asyncio_blocker.py");
    let alias_path = alias.path.to_str().unwrap();
    let status = cg
        .exec_in(&[alias_path, &script])
        .current_dir(repo_root())
        .status()
        .expect("run the subject in the cgroup");
    assert!(status.success());
    let short = &id[..12];
    until(
        Duration::from_secs(20),
        "3 sleep events with the container label",
        || {
            let n = sample(
                &d.metrics(),
                "blockwatch_blocking_events_total",
                &[
                    ("process", "bwdcontainer"),
                    ("container", short),
                    ("pod", ""),
                ],
            )?;
            (n >= 3.0).then_some(())
        },
    );
    assert!(
        sample(
            &d.metrics(),
            "blockwatch_blocking_duration_seconds_count",
            &[("process", "bwdcontainer"), ("container", short)],
        ) >= Some(3.0)
    );
    let status = d.terminate().expect("daemon stops on SIGTERM");
    assert!(status.success(), "{status}: {}", d.stderr());
    assert!(
        d.stderr().contains("units docker-*.scope"),
        "{}",
        d.stderr()
    );
}

/// `--auto` finds event loops in processes nobody named, with their Python
/// culprit, and never watches what the config excludes.
#[test]
fn auto_finds_loops_and_honours_excludes() {
    let _serial = common::setup();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("auto.toml");
    std::fs::write(
        &file,
        "auto = true\n[targets]\nexclude_comms = [\"bwdexclud*\"]\n",
    )
    .unwrap();
    let mut d = Daemon::start(&["--config", file.to_str().unwrap()]);
    let (found, excluded) = (python_alias("bwdauto"), python_alias("bwdexcluded"));
    let ticker = subject("asyncio_ticker.py");
    let args = ["--block", "0.02", "--seconds", "20"];
    let mut a = common::Background::python(found.path.to_str().unwrap(), &ticker, &args);
    let mut b = common::Background::python(excluded.path.to_str().unwrap(), &ticker, &args);
    // Python frames come once the process is known to run a loop: the
    // culprit label turns from the interpreter's to the coroutine's.
    until(
        Duration::from_secs(30),
        "bwdauto's time.sleep in main() counted under culprit main",
        || {
            let n = sample(
                &d.metrics(),
                "blockwatch_blocking_events_total",
                &[
                    ("process", "bwdauto"),
                    ("class", "sleep"),
                    ("culprit", "main"),
                ],
            )?;
            (n >= 3.0).then_some(())
        },
    );
    // The gauge is set at the daemon's periodic refresh (every 2 s),
    // which may come after the events: wait for it.
    let end = Instant::now() + Duration::from_secs(10);
    let mut m = d.metrics();
    while sample(&m, "blockwatch_tagged_threads", &[("process", "bwdauto")]).is_none()
        && Instant::now() < end
    {
        std::thread::sleep(Duration::from_millis(200));
        m = d.metrics();
    }
    assert!(
        sample(
            &m,
            "blockwatch_tagged_threads",
            &[("process", "bwdauto"), ("runtime", "python")]
        ) == Some(1.0),
        "one loop thread in bwdauto\n{m}"
    );
    assert!(!m.contains("bwdexcluded"), "excluded by exclude_comms\n{m}");
    a.kill();
    b.kill();
    let status = d.terminate().expect("daemon stops on SIGTERM");
    assert!(status.success(), "{status}: {}", d.stderr());
}

/// `strict = true` in the config (with the old `stall_threshold` key, which
/// no longer stops a daemon from starting): the daemon counts
/// subjects/asyncio_strict.py's strict calls and its CPU-bound episode, by
/// process and culprit, and logs each new stack once.
#[test]
fn daemon_exports_strict_and_cpu_episode_metrics() {
    let _serial = common::setup();
    let alias = python_alias("bwdstrict");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("blockwatch.toml");
    std::fs::write(
        &config,
        "strict = true\nstall_threshold = \"100ms\"\n[targets]\ncomms = [\"bwdstrict\"]\n",
    )
    .unwrap();
    let d = Daemon::start(&["--config", config.to_str().unwrap()]);
    // A first idle of 3 s: the daemon inspects new interpreters every 2 s,
    // and the culprits are Python functions only once it has.
    let status = Command::new(&alias.path)
        .arg(subject("asyncio_strict.py"))
        .arg("3")
        .status()
        .expect("run the subject");
    assert!(status.success());
    let of = |m: &str, name: &str, want: &[(&str, &str)]| sample(m, name, want).unwrap_or(0.0);
    let metrics = until(Duration::from_secs(20), "strict opens and a stall", || {
        let m = d.metrics();
        let opens = of(
            &m,
            "blockwatch_strict_calls_total",
            &[
                ("process", "bwdstrict"),
                ("syscall", "openat"),
                ("class", "file"),
            ],
        );
        let stalls = of(
            &m,
            "blockwatch_blocking_events_total",
            &[("process", "bwdstrict"), ("class", "stall")],
        );
        (opens >= 3.0 && stalls >= 1.0).then_some(m)
    });
    assert!(
        of(
            &metrics,
            "blockwatch_strict_calls_total",
            &[("process", "bwdstrict"), ("culprit", "read_cached_file")]
        ) >= 3.0,
        "{metrics}"
    );
    let stall_secs = of(
        &metrics,
        "blockwatch_blocking_seconds_total",
        &[("process", "bwdstrict"), ("class", "stall")],
    );
    assert!((0.25..3.0).contains(&stall_secs), "{stall_secs}\n{metrics}");
    assert!(
        of(
            &metrics,
            "blockwatch_blocking_events_total",
            &[
                ("process", "bwdstrict"),
                ("class", "stall"),
                ("culprit", "cpu_hog.<locals>.<genexpr>")
            ]
        ) + of(
            &metrics,
            "blockwatch_blocking_events_total",
            &[
                ("process", "bwdstrict"),
                ("class", "stall"),
                ("culprit", "cpu_hog")
            ]
        ) >= 1.0,
        "{metrics}"
    );
    assert!(!metrics.contains("blockwatch_stall"), "gone\n{metrics}");
    // The journal: each new stack once, strict calls and CPU episodes
    // alike; the ignored key is said so.
    assert!(
        d.stderr().contains("`stall_threshold` ignored"),
        "{}",
        d.stderr()
    );
    let journal = d.stderr();
    assert!(
        journal.contains("strict) on the event loop of bwdstrict["),
        "{journal}"
    );
    assert!(
        journal.contains(
            "mostly CPU work without reaching the idle wait) of the event loop of bwdstrict["
        ),
        "{journal}"
    );
}

fn daemon_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_blockwatch"))
        .arg("daemon")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run blockwatch");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "should fail: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    stderr
}

#[test]
fn config_errors_name_the_key_and_the_line() {
    let _serial = common::setup();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blockwatch.toml");
    let f = file.to_str().unwrap();

    std::fs::write(&file, "[targets]\ncomms = [\"x\"]\n\nthresold = \"5ms\"\n").unwrap();
    let e = daemon_fails(&["--config", f]);
    assert!(e.contains("line 4") && e.contains("thresold"), "{e}");
    assert!(e.contains(f), "names the file: {e}");

    std::fs::write(&file, "threshold = \"80\"\n[targets]\ncomms = [\"x\"]\n").unwrap();
    let e = daemon_fails(&["--config", f]);
    assert!(e.contains("line 1") && e.contains("`threshold`"), "{e}");
    assert!(e.contains("80ms"), "says what to write: {e}");

    std::fs::write(&file, "[metrics]\nexpire_after = \"a while\"\n").unwrap();
    let e = daemon_fails(&["--config", f]);
    assert!(
        e.contains("line 2") && e.contains("metrics.expire_after"),
        "{e}"
    );

    let e = daemon_fails(&["--config", "/nonexistent/blockwatch.toml"]);
    assert!(e.contains("/nonexistent/blockwatch.toml"), "{e}");
    let e = daemon_fails(&[]);
    assert!(e.contains("nothing to watch"), "{e}");
}

#[test]
fn a_port_in_use_is_one_clear_line() {
    let _serial = common::setup();
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let e = daemon_fails(&["--listen", &addr, "--comm", "x"]);
    assert!(e.contains(&addr) && e.contains("in use"), "{e}");
    assert!(e.contains("--listen"), "names the fix: {e}");
}

#[test]
fn sighup_reloads_the_config_and_keeps_counters() {
    let _serial = common::setup();
    let alias = python_alias("bwdreload");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blockwatch.toml");
    std::fs::write(&file, "[targets]\ncomms = [\"bwdrel*\"]\n").unwrap();
    let d = Daemon::start(&["--config", file.to_str().unwrap()]);
    run_blocker(&alias);
    until(Duration::from_secs(20), "3 events before reload", || {
        (events_of(&d, "bwdreload") >= 3.0).then_some(())
    });

    // A broken file is refused and the daemon goes on as before.
    std::fs::write(&file, "[targets]\ncomms = [\"bwdrel*\"]\nbogus = 1\n").unwrap();
    d.signal(libc::SIGHUP);
    until(Duration::from_secs(10), "reload refused", || {
        d.stderr().contains("reload refused").then_some(())
    });
    assert!(d.stderr().contains("bogus"), "{}", d.stderr());

    std::fs::write(
        &file,
        "threshold = \"20ms\"\n[targets]\ncomms = [\"bwdrel*\", \"nothing-else\"]\n",
    )
    .unwrap();
    d.signal(libc::SIGHUP);
    until(Duration::from_secs(10), "configuration reloaded", || {
        d.stderr().contains("configuration reloaded").then_some(())
    });
    assert!(d.stderr().contains("20.0ms"), "{}", d.stderr());
    assert!(events_of(&d, "bwdreload") >= 3.0, "counters survive");
    run_blocker(&alias);
    until(Duration::from_secs(20), "6 events after reload", || {
        (events_of(&d, "bwdreload") >= 6.0).then_some(())
    });
}

/// The dashboard's PromQL expressions, with Grafana's variables replaced
/// by what Grafana would send.
fn dashboard_queries() -> Vec<(String, String)> {
    let path = repo_root().join("dashboards/blockwatch.json");
    let text = std::fs::read_to_string(&path).expect("dashboards/blockwatch.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or("?").to_string();
        for t in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = t["expr"].as_str() else {
                continue;
            };
            let expr = expr
                .replace("$__rate_interval", "30s")
                .replace("$__interval", "15s")
                .replace("$__range", "5m")
                .replace("${process}", ".*")
                .replace("$process", ".*");
            assert!(!expr.contains('$'), "unsubstituted variable in {expr}");
            out.push((title.clone(), expr));
        }
    }
    assert!(out.len() >= 8, "the dashboard has its panels: {out:?}");
    out
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Results of an instant query (empty on any error).
fn promql(prom: SocketAddr, expr: &str) -> Vec<serde_json::Value> {
    let Some((200, body)) = http_get(prom, &format!("/api/v1/query?query={}", urlencode(expr)))
    else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_prometheus(target: SocketAddr) -> Prometheus {
    let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("prometheus is installed (cargo xtask setup: apt-get install prometheus)");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: blockwatch\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let addr = free_addr();
    let child = Command::new(bin)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let p = Prometheus {
        child,
        addr,
        _dir: dir,
    };
    until(Duration::from_secs(30), "prometheus ready", || {
        matches!(http_get(addr, "/-/ready"), Some((200, _))).then_some(())
    });
    p
}

/// Every query of the Grafana dashboard returns data from a real
/// Prometheus scraping a daemon that watches a blocking asyncio loop.
#[test]
fn prometheus_answers_every_dashboard_query() {
    let _serial = common::setup();
    let queries = dashboard_queries();
    let alias = python_alias("bwdprom");
    let strict_alias = python_alias("bwdpromstrict");
    // --strict and a subject with cached opens and a 300 ms CPU hog: the
    // strict-call and stall panels have data too.
    let d = Daemon::start(&["--comm", "bwdprom*", "--strict"]);
    let prom = start_prometheus(d.addr);
    let mut strict_subject = Command::new(&strict_alias.path)
        .arg(subject("asyncio_strict.py"))
        .arg("0.5")
        .current_dir(repo_root())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the strict subject");
    // 20 ms of time.sleep every 70 ms: events all along the test.
    let mut subject = Command::new(&alias.path)
        .arg(subject("asyncio_ticker.py"))
        .args(["--block", "0.02", "--seconds", "90"])
        .current_dir(repo_root())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the ticker");
    let up = until(
        Duration::from_secs(30),
        "prometheus scrapes the daemon",
        || {
            let r = promql(prom.addr, "up{job=\"blockwatch\"} == 1");
            (!r.is_empty()).then_some(r)
        },
    );
    assert_eq!(up.len(), 1);
    // Rates need two scrapes that hold the series.
    let end = Instant::now() + Duration::from_secs(45);
    let mut missing: Vec<(String, String)>;
    loop {
        missing = queries
            .iter()
            .filter(|(_, q)| promql(prom.addr, q).is_empty())
            .cloned()
            .collect();
        if missing.is_empty() || Instant::now() > end {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let _ = subject.kill();
    let _ = subject.wait();
    assert!(strict_subject.wait().unwrap().success());
    assert!(
        missing.is_empty(),
        "dashboard queries without data:\n{}\n/metrics:\n{}",
        missing
            .iter()
            .map(|(t, q)| format!("  {t}: {q}"))
            .collect::<Vec<_>>()
            .join("\n"),
        d.metrics()
    );
    // And the data is the subject's.
    let per_process = promql(
        prom.addr,
        "sum by (process, class) (rate(blockwatch_blocking_seconds_total[30s]))",
    );
    assert!(
        per_process
            .iter()
            .any(|r| r["metric"]["process"] == "bwdprom" && r["metric"]["class"] == "sleep"),
        "{per_process:?}"
    );
    let tagged = promql(prom.addr, "blockwatch_tagged_threads{process=\"bwdprom\"}");
    assert!(
        tagged
            .iter()
            .any(|r| r["metric"]["runtime"] == "python" && r["value"][1] == "1"),
        "the ticker's loop thread is tagged: {tagged:?}"
    );
}

/// What systemd sees: READY=1 once attached, WATCHDOG=1 pings when
/// WATCHDOG_USEC is set; and the capability set of
/// packaging/blockwatch.service (root without CAP_SYS_ADMIN, no new
/// privileges) is enough to load, watch and symbolize.
#[test]
fn systemd_notify_and_the_units_capabilities() {
    let _serial = common::setup();
    let unit = std::fs::read_to_string(repo_root().join("packaging/blockwatch.service"))
        .expect("packaging/blockwatch.service");
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("the unit bounds capabilities");
    let bounding: Vec<String> = caps
        .split_whitespace()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let bounding = format!("--bounding-set=-all,{}", bounding.join(","));

    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let alias = python_alias("bwdnotify");
    let d = Daemon::start_with(
        &["setpriv", "--no-new-privs", &bounding, "--"],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
        &["--comm", "bwdnotif*"],
    );
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end
        && !(got.iter().any(|m: &String| m.contains("READY=1"))
            && got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        let mut buf = [0u8; 512];
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(got[0].contains("READY=1"), "READY first: {got:?}");
    assert!(
        got.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2,
        "watchdog pings every WATCHDOG_USEC/2: {got:?}"
    );
    run_blocker(&alias);
    until(
        Duration::from_secs(20),
        "events under the unit's capabilities",
        || (events_of(&d, "bwdnotify") >= 3.0).then_some(()),
    );
}

/// A program that loads libpython without ever starting the interpreter,
/// then waits in epoll like an event loop: built with `cc` in `dir`.
fn libpython_mapper(dir: &Path) -> Option<(PathBuf, String)> {
    let lib = ["3.11.7", "3.12.1", "3.10.13", "3.13.0"]
        .iter()
        .find_map(|v| {
            let minor = &v[..v.rfind('.')?];
            let p = format!("/root/.pyenv/versions/{v}/lib/libpython{minor}.so.1.0");
            Path::new(&p).exists().then_some(p)
        })?;
    let source = dir.join("bwdlibpy.c");
    std::fs::write(
        &source,
        r#"#include <dlfcn.h>
#include <stdio.h>
#include <sys/epoll.h>
int main(int argc, char **argv) {
    if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    int ep = epoll_create1(0);
    struct epoll_event ev;
    printf("ready\n");
    fflush(stdout);
    for (int i = 0; i < 600; i++) epoll_wait(ep, &ev, 1, 50);
    return 0;
}
"#,
    )
    .unwrap();
    let exe = dir.join("bwdlibpy");
    let built = Command::new("cc")
        .arg("-o")
        .arg(&exe)
        .arg(&source)
        .arg("-ldl")
        .status()
        .expect("cc");
    assert!(built.success(), "cc failed");
    Some((exe, lib))
}

/// `--auto` never watches a blockwatch (itself or a `trace` running
/// beside it), and a process that maps libpython without running it is
/// not labelled a Python loop.
#[test]
fn auto_skips_blockwatch_and_libpython_mappers() {
    let _serial = common::setup();
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(&["--auto"]);
    let sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    let sleeper_pid = sleeper.id().to_string();
    let second = Command::new(env!("CARGO_BIN_EXE_blockwatch"))
        .args(["trace", "--pid", &sleeper_pid])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("a second blockwatch");
    let mapper = libpython_mapper(dir.path()).map(|(exe, lib)| {
        Command::new(exe)
            .arg(lib)
            .stdout(Stdio::null())
            .spawn()
            .expect("start bwdlibpy")
    });
    let m = if mapper.is_some() {
        until(
            Duration::from_secs(30),
            "bwdlibpy's epoll loop is found",
            || {
                let m = d.metrics();
                sample(&m, "blockwatch_tagged_threads", &[("process", "bwdlibpy")])
                    .filter(|&n| n >= 1.0)
                    .map(|_| m)
            },
        )
    } else {
        std::thread::sleep(Duration::from_secs(5));
        d.metrics()
    };
    // The second blockwatch had as long to be found as bwdlibpy.
    assert!(
        sample(
            &m,
            "blockwatch_tagged_threads",
            &[("process", "blockwatch")]
        )
        .is_none(),
        "a blockwatch is never watched\n{m}"
    );
    if mapper.is_some() {
        assert!(
            sample(
                &m,
                "blockwatch_tagged_threads",
                &[("process", "bwdlibpy"), ("runtime", "python")]
            )
            .is_none(),
            "mapping libpython does not make a Python loop\n{m}"
        );
    }
    for mut child in [Some(sleeper), Some(second), mapper].into_iter().flatten() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let status = d.terminate().expect("daemon stops on SIGTERM");
    assert!(status.success(), "{status}: {}", d.stderr());
}

/// The status and body of `GET path`.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    common::http_get(addr, path).map(|(status, _, body)| (status, body))
}
