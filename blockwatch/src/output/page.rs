//! The daemon's page at `/`: the heaviest culprits by blocking time with
//! what to do about each, and links to the metrics and the flame graph.
//! Plain HTML without scripts; every name comes from a watched process,
//! so everything is escaped.

use std::fmt::Write as _;
use std::sync::Mutex;

use crate::output::culprits::Culprits;
use crate::output::metrics::{Folded, Metrics};
use crate::settings::duration::format_duration;
use crate::text::scrub;

/// Rows on the page: enough to act on, few enough to read.
pub const TOP: usize = 20;

/// HTML-escapes `s` for text and attribute values, control characters
/// scrubbed as in every output.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in scrub(s).chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page for `culprits`.
pub fn render(culprits: &Culprits) -> String {
    let mut rows = String::new();
    let top = culprits.top(TOP);
    for t in &top {
        let culprit = if t.place.is_empty() {
            "unknown (no frame of the application)".to_string()
        } else {
            t.place.clone()
        };
        let _ = writeln!(
            rows,
            "<tr><td class=\"time\">{}</td><td class=\"count\">{}</td><td>{}</td>\
             <td class=\"culprit\"><code>{}</code></td><td class=\"advice\">{}</td></tr>",
            escape(&format_duration(std::time::Duration::from_nanos(
                t.blocking_ns
            ))),
            t.events,
            escape(&t.process),
            escape(&culprit),
            escape(&t.advice),
        );
    }
    let body = if top.is_empty() {
        "<p>No blocking calls recorded yet.</p>".to_string()
    } else {
        format!(
            "<table>\n<thead><tr><th>blocked</th><th>calls</th><th>process</th>\
             <th>culprit</th><th>what to do instead</th></tr></thead>\n<tbody>\n{rows}</tbody>\n</table>"
        )
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>blockwatch</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n\
         <h1>blockwatch: what blocks the event loops</h1>\n\
         <p>Top culprits by blocking time since they were first seen. \
         <a href=\"/flamegraph.svg\">Flame graph</a> · <a href=\"/metrics\">Metrics</a> · \
         <a href=\"/stacks\">Folded stacks</a></p>\n{body}\n</body>\n</html>\n"
    )
}

type Response = hyper::Response<http_body_util::Full<hyper::body::Bytes>>;

/// `/`: the page for the daemon's folded stacks and culprits.
pub fn reply(folded: &Folded) -> Response {
    crate::output::http::reply(
        hyper::StatusCode::OK,
        "text/html; charset=utf-8",
        render(&folded.culprits),
    )
}

/// `/flamegraph.svg`: the flame graph of the same stacks, drawn after the
/// lock is released (events wait for it meanwhile).
pub fn flamegraph_reply(metrics: &Mutex<Metrics>) -> Response {
    let (stacks, culprits) = {
        let m = metrics.lock().unwrap_or_else(|p| p.into_inner());
        (m.folded.render(), m.folded.culprits.names_owned())
    };
    match crate::output::flamegraph::draw(
        &stacks,
        &culprits,
        "blockwatch: event-loop blocking time by stack",
    ) {
        Ok(svg) => crate::output::http::reply(hyper::StatusCode::OK, "image/svg+xml", svg),
        Err(e) => crate::output::http::reply(
            hyper::StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain; charset=utf-8",
            format!("{e}\n"),
        ),
    }
}

const STYLE: &str = "body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
td.time, td.count { text-align: right; white-space: nowrap; }
td.culprit code { color: #b00; }
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Frame;

    #[test]
    fn names_and_advice_are_escaped() {
        let frame = Frame {
            function: Some("<script>alert(1)</script>".into()),
            file: Some("/srv/a&b.py".into()),
            line: Some(3),
            ..Frame::default()
        };
        let mut ev = crate::output::fixtures::stack_event(vec![frame], Some(0), 42);
        ev.comm = "py\"thon".into();
        ev.advice = "use `asyncio.to_thread` <now>".into();

        let mut c = Culprits::default();
        c.add("py\"thon", "py\"thon", &ev);
        let page = render(&c);
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt; at /srv/a&amp;b.py:3"));
        assert!(page.contains("use `asyncio.to_thread` &lt;now&gt;"));
        assert!(
            page.contains("py&quot;thon") && page.contains("42.0ms"),
            "{page}"
        );
        assert!(page.contains("href=\"/flamegraph.svg\"") && page.contains("href=\"/metrics\""));
    }

    #[test]
    fn an_empty_page_says_so() {
        assert!(render(&Culprits::default()).contains("No blocking calls recorded yet."));
    }
}
