//! Process-name patterns the kernel matches itself at exec
//! ([`CommMatch`]): a process selected by `--comm` (or the daemon's
//! `comms`) is then watched from its first instruction. User space still
//! matches every exec notice with the full glob syntax and the other
//! selectors, but it reads the notice some time after the exec, and a
//! process that blocks at once (a short script, a busy host) was missed.
//!
//! The kernel takes what it can compare byte by byte within a task's
//! 15-character name: a literal name, or a literal prefix followed by one
//! `*`. Other patterns stay user space's alone. An exclusion the kernel
//! cannot express means it matches nothing by name, so that it never
//! watches what user space would refuse.

use aya::maps::{Array, MapData, MapError};
use blockwatch_common::{COMM_MATCH_MAX, CommMatch, WatchRule};

/// What a task's name can hold (`TASK_COMM_LEN` less its NUL).
const COMM_CHARS: usize = 15;

/// The kernel's part of `includes` under `rule`, with `excludes` (and
/// blockwatch's own name) first; empty when nothing can be matched there.
pub fn kernel_matches(includes: &[String], excludes: &[String], rule: WatchRule) -> Vec<CommMatch> {
    let mut out = Vec::new();
    for p in excludes
        .iter()
        .map(String::as_str)
        .chain(std::iter::once("blockwatch"))
    {
        let Some(mut m) = literal(p) else {
            return Vec::new();
        };
        m.exclude = 1;
        out.push(m);
    }
    let first_include = out.len();
    for p in includes {
        if out.len() >= COMM_MATCH_MAX as usize {
            break;
        }
        if let Some(mut m) = literal(p) {
            m.rule = rule;
            out.push(m);
        }
    }
    if out.len() > COMM_MATCH_MAX as usize || out.len() == first_include {
        return Vec::new();
    }
    out
}

/// `pattern` as a kernel match, if it is a literal name or a literal
/// prefix and a trailing `*`.
fn literal(pattern: &str) -> Option<CommMatch> {
    let (text, exact) = match pattern.strip_suffix('*') {
        Some(prefix) => (prefix, 0),
        None => (pattern, 1),
    };
    if text.is_empty()
        || text.len() > COMM_CHARS
        || text.bytes().any(|b| b"*?[]{}\\!".contains(&b) || b == 0)
    {
        return None;
    }
    let mut m = CommMatch {
        len: text.len() as u8,
        exact,
        ..CommMatch::default()
    };
    m.name[..text.len()].copy_from_slice(text.as_bytes());
    Some(m)
}

/// Puts `matches` in the kernel's map; returns how many
/// (`Config::comm_matches`). Set that count to 0 before, so that a
/// half-written list is never read.
pub fn store(map: &mut Array<MapData, CommMatch>, matches: &[CommMatch]) -> Result<u8, MapError> {
    for (i, m) in matches.iter().enumerate() {
        map.set(i as u32, *m, 0)?;
    }
    Ok(matches.len() as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comm(name: &str) -> [u8; 16] {
        let mut c = [0u8; 16];
        let n = name.len().min(COMM_CHARS);
        c[..n].copy_from_slice(&name.as_bytes()[..n]);
        c
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn literal_names_and_prefixes_match_as_the_globs_do() {
        let rule = WatchRule::default();
        let ms = kernel_matches(&s(&["python3*", "node", "hass"]), &[], rule);
        // blockwatch's own name first, excluded.
        assert_eq!(ms.len(), 4);
        assert!(ms[0].exclude == 1 && ms[0].matches(&comm("blockwatch")));
        let hit = |name: &str| ms[1..].iter().any(|m| m.matches(&comm(name)));
        let globs = crate::targets::CommRules::new(&s(&["python3*", "node", "hass"])).unwrap();
        for name in [
            "python3",
            "python3.12",
            "python",
            "node",
            "nodejs",
            "nod",
            "hass",
            "hass2",
            "",
        ] {
            assert_eq!(hit(name), globs.matches(name), "{name:?}");
        }
    }

    #[test]
    fn what_the_kernel_cannot_compare_is_left_to_user_space() {
        let rule = WatchRule::default();
        // Only `node` is the kernel's.
        let ms = kernel_matches(&s(&["py*3", "[nN]ode", "*", "node", "?x"]), &[], rule);
        assert_eq!(ms.len(), 2);
        assert!(ms[1].matches(&comm("node")));
        // Nothing the kernel can take: no list at all.
        assert!(kernel_matches(&s(&["*thon"]), &[], rule).is_empty());
        // Longer than a task name can be.
        assert!(kernel_matches(&s(&["a-very-long-process-name"]), &[], rule).is_empty());
    }

    #[test]
    fn an_exclusion_the_kernel_cannot_honour_disables_it() {
        let rule = WatchRule::default();
        assert!(kernel_matches(&s(&["python3*"]), &s(&["*test*"]), rule).is_empty());
        let ms = kernel_matches(&s(&["python3*"]), &s(&["python3-dbg"]), rule);
        assert_eq!(ms.len(), 3);
        let included = |name: &str| {
            !ms.iter().any(|m| m.exclude == 1 && m.matches(&comm(name)))
                && ms.iter().any(|m| m.exclude == 0 && m.matches(&comm(name)))
        };
        assert!(included("python3"));
        assert!(!included("python3-dbg"));
    }

    #[test]
    fn the_list_is_bounded() {
        let many: Vec<String> = (0..40).map(|i| format!("p{i}")).collect();
        let ms = kernel_matches(&many, &[], WatchRule::default());
        assert_eq!(ms.len(), COMM_MATCH_MAX as usize);
        let excl: Vec<String> = (0..20).map(|i| format!("x{i}")).collect();
        assert!(kernel_matches(&many, &excl, WatchRule::default()).is_empty());
    }

    #[test]
    fn a_name_cut_at_fifteen_characters_matches_exactly_as_the_kernel_keeps_it() {
        let m = literal("abcdefghijklmno").unwrap();
        assert!(m.matches(&comm("abcdefghijklmnopqrs")));
        assert!(!m.matches(&comm("abcdefghijklmn")));
    }
}
