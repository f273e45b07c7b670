//! Folded stacks for `/stacks`, the input of flame-graph tools: one line
//! per distinct stack, bounded per process, with the same events' culprits
//! for the flame graph's highlights and the daemon's page.

use std::collections::HashMap;

use crate::event::{Event, Frame};
use crate::output::culprits::Culprits;
use crate::output::labels;

/// Distinct folded stacks kept per process; the rest are merged.
const MAX_STACKS_PER_PROCESS: usize = 500;

/// Folded stacks (`frame;frame;frame value`), outermost frame first, the
/// process name as root, values in microseconds of blocking.
#[derive(Debug, Default)]
pub struct Folded {
    stacks: HashMap<String, HashMap<String, u64>>,
    /// The culprits of the same events, for the flame graph's highlights
    /// and the daemon's page.
    pub culprits: Culprits,
}

/// A frame's name in folded stacks: its function, else `[binary]`.
pub fn folded_name(f: &Frame) -> String {
    fold_frame(&labels::frame_name(Some(f), &labels::FOLDED))
}

impl Folded {
    /// Adds `ev` under `process` (the key that [`Folded::forget`] takes),
    /// with `root` as the outermost frame.
    pub fn add(&mut self, process: &str, root: &str, ev: &Event) {
        self.culprits.add(process, root, ev);
        let mut frames = vec![fold_frame(root)];
        frames.extend(ev.stack.iter().rev().map(folded_name));
        let per = self.stacks.entry(process.to_string()).or_default();
        let mut key = frames.join(";");
        if !per.contains_key(&key) && per.len() >= MAX_STACKS_PER_PROCESS {
            key = format!("{};[other stacks]", fold_frame(root));
        }
        *per.entry(key).or_default() += ev.duration_ns / 1000;
    }

    pub fn forget(&mut self, process: &str) {
        self.stacks.remove(process);
        self.culprits.forget(process);
    }

    pub fn render(&self) -> String {
        let mut lines: Vec<String> = self
            .stacks
            .values()
            .flat_map(|m| m.iter().map(|(k, v)| format!("{k} {v}")))
            .collect();
        lines.sort();
        let mut s = lines.join("\n");
        if !s.is_empty() {
            s.push('\n');
        }
        s
    }
}

/// Folded-stack frames may not hold `;` (the separator), spaces (before
/// the value) or newlines.
fn fold_frame(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            ';' => ':',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect()
}
