//! Small text helpers for names that come from traced processes: paths,
//! symbols, thread names. Written once here so that every output treats
//! them alike.

use std::borrow::Cow;

/// The last component of a path (`/usr/lib/libc.so.6` → `libc.so.6`); the
/// whole string when it has none (`[vdso]`).
pub fn basename(path: &str) -> &str {
    std::path::Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

/// `s` with every control character replaced by `?`. Names taken from a
/// traced process may hold any bytes; they must not break a one-line
/// layout or drive the terminal. Borrows when there is nothing to replace.
pub fn scrub(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_control) {
        Cow::Owned(
            s.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basenames() {
        assert_eq!(basename("/usr/lib/x86_64-linux-gnu/libc.so.6"), "libc.so.6");
        assert_eq!(basename("libc.so.6"), "libc.so.6");
        assert_eq!(basename("[vdso]"), "[vdso]");
        assert_eq!(basename("/opt/my dir/node"), "node");
    }

    #[test]
    fn control_characters_are_scrubbed() {
        assert!(matches!(scrub("plain name"), Cow::Borrowed("plain name")));
        assert_eq!(scrub("a\nb\x1b[2Jc\t"), "a?b?[2Jc?");
        assert_eq!(scrub("caller_λ 🐍"), "caller_λ 🐍");
    }
}
