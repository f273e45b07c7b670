//! How an event's syscall and culprit are spelled in each output, written
//! once with the spellings side by side, so that outputs differ only where
//! they mean to.

use std::borrow::Cow;

use crate::event::{Event, Frame};
use crate::text::basename;

/// "Not in a syscall" in the text output: a table cell and an event
/// header people read, where an empty-looking `-` is clearest.
pub const NO_SYSCALL_TEXT: &str = "-";
/// "Not in a syscall" in metric labels: a value people type into queries
/// (`syscall="none"`), where a word is easier to write and search for.
pub const NO_SYSCALL_METRIC: &str = "none";

/// The syscall of `ev`: its name, `syscall_N` for syscalls newer than our
/// table, `none` when the thread was not in a syscall (one of the
/// `NO_SYSCALL_*` spellings).
pub fn syscall(ev: &Event, none: &'static str) -> Cow<'static, str> {
    match ev.syscall {
        Some(name) => Cow::Borrowed(name),
        None if ev.syscall_nr >= 0 => Cow::Owned(format!("syscall_{}", ev.syscall_nr)),
        None => Cow::Borrowed(none),
    }
}

/// How a frame is named where a name is wanted (a table cell, a metric
/// label, a folded-stack frame), never its address: its function, else
/// its binary's file name between `module.0` and `module.1`, else
/// `unknown`.
pub struct Naming {
    pub unknown: &'static str,
    pub module: (&'static str, &'static str),
}

/// The summary table's CULPRIT column: `<unknown>` stands out among
/// function names, and a module alone is still an unknown function.
pub const SUMMARY: Naming = Naming {
    unknown: "<unknown>",
    module: ("<unknown> (", ")"),
};
/// The `culprit` metric label: plain words for queries, and the bracketed
/// binary that profilers' flame graphs use for frames without a symbol.
pub const METRIC: Naming = Naming {
    unknown: "unknown",
    module: ("[", "]"),
};
/// A frame of `/stacks`: flame-graph tools' `[binary]` and `[unknown]`.
pub const FOLDED: Naming = Naming {
    unknown: "[unknown]",
    module: ("[", "]"),
};

/// `frame`'s name as `naming` spells it; not yet cleaned of control
/// characters (each output has its own way).
pub fn frame_name<'a>(frame: Option<&'a Frame>, naming: &Naming) -> Cow<'a, str> {
    match frame {
        Some(Frame {
            function: Some(name),
            ..
        }) => Cow::Borrowed(name),
        Some(Frame {
            module: Some(m), ..
        }) => Cow::Owned(format!(
            "{}{}{}",
            naming.module.0,
            basename(m),
            naming.module.1
        )),
        _ => Cow::Borrowed(naming.unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::fixtures::{event, frame};

    #[test]
    fn no_syscall_is_spelled_per_output() {
        let mut ev = event(None, None, -1, crate::event::Class::Other, 1);
        assert_eq!(syscall(&ev, NO_SYSCALL_TEXT), "-");
        assert_eq!(syscall(&ev, NO_SYSCALL_METRIC), "none");
        ev.syscall_nr = 470;
        assert_eq!(syscall(&ev, NO_SYSCALL_TEXT), "syscall_470");
        ev.syscall = Some("read");
        assert_eq!(syscall(&ev, NO_SYSCALL_METRIC), "read");
    }

    #[test]
    fn frames_are_named_per_output() {
        let lib = frame(1, None, Some("/usr/lib/libfoo.so.1"));
        let f = frame(1, Some("handler"), Some("/usr/lib/libfoo.so.1"));
        for (naming, module, unknown) in [
            (&SUMMARY, "<unknown> (libfoo.so.1)", "<unknown>"),
            (&METRIC, "[libfoo.so.1]", "unknown"),
            (&FOLDED, "[libfoo.so.1]", "[unknown]"),
        ] {
            assert_eq!(frame_name(Some(&f), naming), "handler");
            assert_eq!(frame_name(Some(&lib), naming), module);
            assert_eq!(frame_name(Some(&Frame::default()), naming), unknown);
            assert_eq!(frame_name(None, naming), unknown);
        }
    }
}
