//! Flame graphs of blocking time (SVG, drawn by inferno) from the folded
//! stacks the daemon's `/stacks` serves: `trace --flamegraph` and the
//! daemon's `/flamegraph.svg` draw the same thing.
//!
//! Widths are blocking time (the folded values are microseconds), the
//! tooltips say how much; culprit frames are red and carry
//! `class="culprit"`, the rest are blue (off-CPU time, by convention).

use inferno::flamegraph::color::{BasicPalette, Color, Palette, PaletteMap};
use inferno::flamegraph::{self, FuncFrameAttrsMap, Options};

use crate::output::metrics::Folded;

/// The culprits' colour: the one thing on the graph to look at first.
const CULPRIT: Color = Color {
    r: 220,
    g: 50,
    b: 40,
};

#[derive(Debug, thiserror::Error)]
pub enum FlameError {
    #[error("cannot draw the flame graph: {0}")]
    Draw(#[source] std::io::Error),
    #[error("cannot write the flame graph to {path}: {err} (choose a writable path)")]
    Write {
        path: std::path::PathBuf,
        err: std::io::Error,
    },
}

/// The SVG of `folded`, titled `title`. With no stacks yet, a small SVG
/// that says so (inferno draws nothing from nothing).
pub fn svg(folded: &Folded, title: &str) -> Result<String, FlameError> {
    draw(&folded.render(), &folded.culprits.names(), title)
}

/// The SVG of folded-stack `text` (as [`Folded::render`] writes it), with
/// the frames named in `culprits` highlighted.
pub fn draw<S: AsRef<str>>(
    text: &str,
    culprits: &std::collections::HashSet<S>,
    title: &str,
) -> Result<String, FlameError> {
    if text.is_empty() {
        return Ok(empty(title));
    }
    let mut palette = PaletteMap::default();
    let mut attrs = String::new();
    for name in culprits {
        let name = name.as_ref();
        palette.insert(name, CULPRIT);
        attrs.push_str(&format!("{name}\tclass=culprit\n"));
    }
    let attrs = FuncFrameAttrsMap::from_reader(attrs.as_bytes()).map_err(FlameError::Draw)?;
    let mut options = Options::default();
    options.title = title.to_string();
    options.subtitle = Some("width: time blocked; red: culprit frames".to_string());
    options.colors = Palette::Basic(BasicPalette::Io);
    options.count_name = "µs blocked".to_string();
    options.palette_map = Some(&mut palette);
    options.func_frameattrs = attrs;
    let mut out = Vec::new();
    flamegraph::from_lines(&mut options, text.lines(), &mut out).map_err(FlameError::Draw)?;
    String::from_utf8(out).map_err(|e| FlameError::Draw(std::io::Error::other(e)))
}

/// Writes [`svg`] to `path`.
pub fn write(folded: &Folded, title: &str, path: &std::path::Path) -> Result<(), FlameError> {
    let svg = svg(folded, title)?;
    std::fs::write(path, svg).map_err(|err| FlameError::Write {
        path: path.to_path_buf(),
        err,
    })
}

fn empty(title: &str) -> String {
    format!(
        "<?xml version=\"1.0\" standalone=\"no\"?>\n\
         <svg version=\"1.1\" width=\"600\" height=\"60\" xmlns=\"http://www.w3.org/2000/svg\">\
         <text x=\"10\" y=\"24\">{}</text>\
         <text x=\"10\" y=\"48\">no blocking calls recorded yet</text></svg>\n",
        crate::output::page::escape(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Frame};

    fn ev(functions: &[&str], culprit: usize, ms: u64) -> Event {
        let stack: Vec<Frame> = functions
            .iter()
            .map(|f| Frame {
                function: Some(f.to_string()),
                ..Frame::default()
            })
            .collect();
        crate::output::fixtures::stack_event(stack, Some(culprit), ms)
    }

    #[test]
    fn culprits_are_red_and_tooltips_say_the_time() {
        let mut f = Folded::default();
        f.add("svc", "svc", &ev(&["read", "load_<config>", "main"], 1, 80));
        let svg = svg(&f, "blocking").unwrap();
        assert!(
            svg.contains("load_&lt;config&gt; (80,000 µs blocked, 100.00%)"),
            "{svg}"
        );
        assert!(svg.contains("rgb(220,50,40)"), "{svg}");
        assert!(svg.contains("class=\"culprit\""), "{svg}");
    }

    #[test]
    fn nothing_yet_is_still_an_svg() {
        let svg = svg(&Folded::default(), "a <title>").unwrap();
        assert!(
            svg.contains("<svg") && svg.contains("a &lt;title&gt;"),
            "{svg}"
        );
    }
}
