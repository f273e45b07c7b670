//! The pictures, read by the programs people read them with:
//! `trace --flamegraph` parsed as XML and rendered by headless Chromium,
//! `trace --pprof` read by the real `go tool pprof` (Debian's golang-go),
//! and the daemon's page and `/flamegraph.svg` loaded in Chromium
//! (Debian's chromium). `cargo xtask setup` installs both.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Background, free_addr, http_get, python_alias, repo_root, subject, trace};

/// The coroutine of subjects/asyncio_blocker.py that calls time.sleep.
const CULPRIT: &str = "blocking_sleep_in_coroutine";
/// Where subjects/asyncio_ticker.py's main() calls time.sleep.
const TICKER_LINE: &str = "asyncio_ticker.py:23";

fn tool(name: &str) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    found.unwrap_or_else(|| {
        panic!("`{name}` is not installed: run `cargo xtask setup` (Debian packages golang-go, chromium)")
    })
}

/// Runs headless Chromium on `url` with a fresh profile and no network
/// of its own, and returns the DOM it rendered.
fn chromium_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(tool("chromium"))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .stdin(Stdio::null())
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !dom.is_empty(),
        "chromium --dump-dom {url} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// The frames of a flame graph: (title text, class attribute, fill).
fn flame_frames(svg: &str) -> Vec<(String, String, String)> {
    let doc = parse_svg(svg);
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    doc.descendants()
        .filter(|n| n.has_tag_name("g"))
        .filter_map(|g| {
            let title = g.children().find(|c| c.has_tag_name("title"))?.text()?;
            let fill = g
                .children()
                .find(|c| c.has_tag_name("rect"))
                .and_then(|r| r.attribute("fill"))
                .unwrap_or_default();
            Some((
                title.to_string(),
                g.attribute("class").unwrap_or_default().to_string(),
                fill.to_string(),
            ))
        })
        .collect()
}

/// Parses an SVG (inferno's starts with a DOCTYPE).
fn parse_svg(svg: &str) -> roxmltree::Document<'_> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..Default::default()
    };
    roxmltree::Document::parse_with_options(svg, options)
        .expect("the flame graph is well-formed XML")
}

/// `culprit`'s frame is red, marked `culprit`, and its tooltip gives the
/// time it blocked, in `range` microseconds.
fn assert_culprit_frame(svg: &str, name: &str, range: std::ops::Range<u64>) {
    let frames = flame_frames(svg);
    let culprit = frames
        .iter()
        .find(|(title, _, _)| title.starts_with(&format!("{name} (")))
        .unwrap_or_else(|| panic!("no frame of {name}: {frames:#?}"));
    assert_eq!(culprit.1, "culprit", "{culprit:?}");
    assert_eq!(culprit.2, "rgb(220,50,40)", "{culprit:?}");
    let us: u64 = culprit.0[name.len() + 2..]
        .split(' ')
        .next()
        .unwrap()
        .replace(',', "")
        .parse()
        .unwrap_or_else(|e| panic!("{:?}: {e}", culprit.0));
    assert!(
        range.contains(&us) && culprit.0.contains("µs blocked"),
        "{range:?} µs blocked: {culprit:?}"
    );
    assert!(
        frames.iter().any(|(_, class, fill)| class != "culprit"
            && fill.starts_with("rgb(")
            && fill != "rgb(220,50,40)"),
        "the other frames are not red: {frames:#?}"
    );
}

#[test]
fn trace_writes_a_flame_graph_and_a_pprof_profile() {
    let _serial = common::setup();
    let dir = tempfile::tempdir().unwrap();
    let svg_path = dir.path().join("blocking.svg");
    let pprof_path = dir.path().join("blocking.pb.gz");
    // 40 ms: the subject's three 80 ms sleeps, not the 10–36 ms the
    // interpreter's finalization can lose to a busy machine after the loop
    // ended (those are not this test's subject).
    let run = trace(&[
        "--threshold",
        "40ms",
        "--flamegraph",
        svg_path.to_str().unwrap(),
        "--pprof",
        pprof_path.to_str().unwrap(),
        "--",
        "python3",
        &subject("asyncio_blocker.py"),
    ]);
    run.assert_success();
    assert!(
        run.stderr.contains("flame graph written to")
            && run.stderr.contains("pprof profile written to"),
        "{}",
        run.report()
    );

    let svg = std::fs::read_to_string(&svg_path).expect("the flame graph was written");
    assert_culprit_frame(&svg, CULPRIT, 200_000..1_000_000);
    // Chromium renders it: the DOM it built holds the frames' text.
    let dom = chromium_dom(&format!("file://{}", svg_path.display()));
    assert!(dom.contains(CULPRIT) && dom.contains("<svg"), "{dom}");

    check_pprof(&pprof_path);
}

fn check_pprof(path: &Path) {
    let go = tool("go");
    // go keeps its caches under $HOME; a scratch one keeps the test's
    // traces out of the user's.
    let home = tempfile::tempdir().unwrap();
    let pprof = |args: &[&str]| {
        let out = Command::new(&go)
            .args(["tool", "pprof"])
            .args(args)
            .arg(path)
            .env("HOME", home.path())
            .env("PPROF_TMPDIR", home.path())
            .output()
            .expect("run go tool pprof");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "go tool pprof {args:?} failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let top = pprof(&["-top"]);
    assert!(top.contains("Type: blocking"), "{top}");
    let flat: Vec<(&str, &str)> = top
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.len() >= 6 && cols[0].ends_with("ms")).then(|| (cols[0], cols[5]))
        })
        .collect();
    // The wait itself is the flat time; the coroutine is on the stack of
    // all of it.
    assert!(
        flat.first()
            .is_some_and(|(_, f)| f.contains("clock_nanosleep")),
        "clock_nanosleep holds the flat time:\n{top}"
    );
    assert!(
        top.lines()
            .any(|l| l.contains(CULPRIT) && l.contains("100%")),
        "{CULPRIT} is in every sample:\n{top}"
    );
    let total_ms: f64 = top
        .lines()
        .find_map(|l| l.split("Total samples = ").nth(1))
        .and_then(|t| t.split("ms").next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no total:\n{top}"));
    assert!((200.0..1000.0).contains(&total_ms), "3 × 80 ms:\n{top}");
    let events = pprof(&["-sample_index=events", "-top"]);
    assert!(
        events.contains("of 3 total"),
        "three blocking calls:\n{events}"
    );
    let lines = pprof(&["-lines", "-top"]);
    assert!(
        lines.contains("asyncio_blocker.py:22"),
        "the culprit's file and line:\n{lines}"
    );
}

// --- the daemon's page -----------------------------------------------------

/// A daemon on a free port, killed when dropped.
struct Daemon {
    child: Child,
    addr: SocketAddr,
    stderr: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(comm: &str) -> Daemon {
        let addr = free_addr();
        let dir = tempfile::tempdir().unwrap();
        let stderr = dir.path().join("stderr");
        let child = Command::new(env!("CARGO_BIN_EXE_blockwatch"))
            .args(["daemon", "--listen", &addr.to_string(), "--comm", comm])
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
        d.wait_for("the daemon to watch", |d| {
            d.stderr().contains("blockwatch: watching")
                && matches!(http_get(d.addr, "/healthz"), Some((200, _, _)))
        });
        d
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn wait_for(&mut self, what: &str, f: impl Fn(&Daemon) -> bool) {
        let end = Instant::now() + Duration::from_secs(30);
        while !f(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("daemon exited with {status}: {}", self.stderr());
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_daemon_page_lists_culprits_with_advice_and_serves_the_flame_graph() {
    let _serial = common::setup();
    let alias = python_alias("bwdpictures");
    let mut d = Daemon::start("bwdpictures");

    // Before any event: a page and an SVG that say so.
    let (code, head, page) = http_get(d.addr, "/").expect("GET /");
    assert_eq!(code, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(page.contains("No blocking calls recorded yet."), "{page}");
    let (code, _, svg) = http_get(d.addr, "/flamegraph.svg").expect("GET /flamegraph.svg");
    assert_eq!(code, 200);
    parse_svg(&svg);

    // A loop that blocks in time.sleep every tick, for long enough that
    // the daemon knows its interpreter (it looks every 2 s) and names
    // the coroutine.
    let mut ticker = Background::python(
        alias.path.to_str().unwrap(),
        &subject("asyncio_ticker.py"),
        &["--block", "0.03", "--seconds", "30"],
    );
    d.wait_for("main() of asyncio_ticker.py on the page", |d| {
        http_get(d.addr, "/").is_some_and(|(_, _, page)| page.contains(TICKER_LINE))
    });

    let url = format!("http://{}/", d.addr);
    let dom = chromium_dom(&url);
    let row = dom
        .split("<tr>")
        .find(|r| r.contains(TICKER_LINE))
        .unwrap_or_else(|| panic!("no row of {TICKER_LINE} in the rendered page:\n{dom}"));
    assert!(
        row.contains("bwdpictures")
            && row.contains("<code>main at ")
            && row.contains("await asyncio.sleep(...)"),
        "the row names the process, the culprit and the fix:\n{row}"
    );
    assert!(
        dom.contains("href=\"/flamegraph.svg\"") && dom.contains("href=\"/metrics\""),
        "{dom}"
    );

    let (code, head, svg) = http_get(d.addr, "/flamegraph.svg").expect("GET /flamegraph.svg");
    assert_eq!(code, 200);
    assert!(head.contains("content-type: image/svg+xml"), "{head}");
    assert_culprit_frame(&svg, "main", 30_000..u64::MAX);
    let dom = chromium_dom(&format!("http://{}/flamegraph.svg", d.addr));
    assert!(
        dom.contains("main (") && dom.contains("bwdpictures"),
        "{dom}"
    );
    ticker.kill();
}
