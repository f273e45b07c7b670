//! JIT frames from perf maps: `/tmp/perf-PID.map`, written by
//! `node --perf-basic-prof`, `python -X perf` (3.12+) and other JITs, one
//! line per code region: `START SIZE NAME` (hex start and size).
//!
//! The file is read through `/proc/PID/root`, so it is found inside the
//! process's container, under the PID the process has there.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::procfs;

/// Re-read a map at most this often when an address is not in it (and
/// sooner when it grew): JITs append as they compile, but events must not
/// cost a file read each.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// A perf map larger than this is not read (a runaway JIT).
const MAX_MAP_BYTES: u64 = 256 << 20;

struct Map {
    /// (start, end, name), sorted by start.
    entries: Vec<(u64, u64, String)>,
    loaded: Instant,
    /// Size of the file when read: JITs only append, so a larger file has
    /// new entries (a function compiled just before it blocked).
    len: u64,
}

#[derive(Default)]
pub struct PerfMaps {
    maps: HashMap<u32, Option<Map>>,
}

/// Parses perf map text; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<(u64, u64, String)> {
    let mut entries: Vec<_> = text
        .lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ' ');
            let start = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
            let size = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
            let name = it.next()?.trim();
            (size > 0 && !name.is_empty())
                .then(|| (start, start.saturating_add(size), name.to_string()))
        })
        .collect();
    entries.sort_by_key(|e| e.0);
    entries
}

/// The map is named after the PID the process has in its own PID namespace.
fn map_path(pid: u32) -> PathBuf {
    procfs::in_root(pid, &format!("/tmp/perf-{}.map", procfs::ns_pid(pid)))
}

fn load(pid: u32) -> Option<Map> {
    let path = map_path(pid);
    if std::fs::metadata(&path).ok()?.len() > MAX_MAP_BYTES {
        log::warn!("{} is over {MAX_MAP_BYTES} bytes: not read", path.display());
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    Some(Map {
        entries: parse(&text),
        loaded: Instant::now(),
        len: text.len() as u64,
    })
}

fn find(entries: &[(u64, u64, String)], addr: u64) -> Option<&str> {
    let i = entries.partition_point(|e| e.0 <= addr);
    let (start, end, name) = entries.get(i.checked_sub(1)?)?;
    (*start <= addr && addr < *end).then_some(name.as_str())
}

impl PerfMaps {
    pub fn new() -> Self {
        Self::default()
    }

    /// The JIT function at `addr` in process `pid`, if its perf map says.
    pub fn lookup(&mut self, pid: u32, addr: u64) -> Option<String> {
        let slot = self.maps.entry(pid).or_insert_with(|| load(pid));
        if let Some(map) = slot
            && let Some(name) = find(&map.entries, addr)
        {
            return Some(name.to_string());
        }
        let stale = slot.as_ref().is_none_or(|m| {
            m.loaded.elapsed() >= RELOAD_INTERVAL
                || std::fs::metadata(map_path(pid)).is_ok_and(|meta| meta.len() > m.len)
        });
        if stale {
            *slot = load(pid);
            return slot
                .as_ref()
                .and_then(|m| find(&m.entries, addr))
                .map(str::to_string);
        }
        None
    }

    /// The process is gone or exec'd.
    pub fn forget(&mut self, pid: u32) {
        self.maps.remove(&pid);
    }

    #[cfg(test)]
    pub(crate) fn knows(&self, pid: u32) -> bool {
        self.maps.contains_key(&pid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_and_python_lines() {
        let text = "7f00a0001000 40 LazyCompile:*handler /srv/app.js:12\n\
                    0x7f00a0000000 0x80 py::refresh:/srv/report.py\n\
                    garbage line\n\
                    7f00a0002000 0 empty\n";
        let e = parse(text);
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0],
            (
                0x7f00a0000000,
                0x7f00a0000080,
                "py::refresh:/srv/report.py".into()
            )
        );
        assert_eq!(
            find(&e, 0x7f00a0001010),
            Some("LazyCompile:*handler /srv/app.js:12")
        );
        assert_eq!(find(&e, 0x7f00a0001040), None, "end is exclusive");
        assert_eq!(find(&e, 0x1000), None);
    }

    #[test]
    fn reads_this_process_map_and_sees_appends() {
        let me = std::process::id();
        let path = format!("/tmp/perf-{me}.map");
        std::fs::write(&path, "1000 100 first\n").unwrap();
        let mut maps = PerfMaps::new();
        assert_eq!(maps.lookup(me, 0x1010).as_deref(), Some("first"));
        std::fs::write(&path, "1000 100 first\n2000 100 second\n").unwrap();
        // Grown: read again at once (a function compiled just before it
        // blocked).
        assert_eq!(maps.lookup(me, 0x2010).as_deref(), Some("second"));
        let loaded = |maps: &PerfMaps| maps.maps[&me].as_ref().unwrap().loaded;
        let before = loaded(&maps);
        // Unchanged: a miss does not read it again before the interval.
        assert_eq!(maps.lookup(me, 0x3010), None);
        assert_eq!(loaded(&maps), before, "no file read per event");
        // Rewritten at the same size: seen once the interval has passed.
        std::fs::write(&path, "1000 100 first\n3000 100 third!\n").unwrap();
        assert_eq!(maps.lookup(me, 0x3010), None);
        maps.maps.get_mut(&me).unwrap().as_mut().unwrap().loaded -= RELOAD_INTERVAL;
        assert_eq!(maps.lookup(me, 0x3010).as_deref(), Some("third!"));
        std::fs::remove_file(&path).unwrap();
        maps.forget(me);
        assert_eq!(maps.lookup(me, 0x1010), None);
    }
}
