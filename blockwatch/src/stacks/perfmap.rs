//! JIT frames from perf maps: `/tmp/perf-PID.map`, written by
//! `node --perf-basic-prof`, `python -X perf` (3.12+) and other JITs, one
//! line per code region: `START SIZE NAME` (hex start and size).
//!
//! JITs reuse code space: V8 frees a function's code and compiles another
//! at the same address, and appends a new line without removing the old
//! one. So the map is read in file order and a later line wins wherever it
//! overlaps earlier ones, and a map that grew is read again (its new lines)
//! before any of its names is trusted.
//!
//! The file is read through `/proc/PID/root`, so it is found inside the
//! process's container, under the PID the process has there.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::procfs;

/// Re-read a whole map at most this often when an address is not in it
/// (a map rewritten at the same size): events must not cost a file read
/// each. A map that grew is read at once, from where it was left.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// A process without a perf map is looked at again this often at most:
/// most processes have none, and their unnamed frames (a stripped
/// binary) would otherwise cost an open and a /proc read each, every
/// event. A JIT that starts writing one is seen that soon.
const ABSENT_RETRY: Duration = Duration::from_millis(100);
/// A perf map larger than this is not read (a runaway JIT).
const MAX_MAP_BYTES: u64 = 256 << 20;

/// Code regions that do not overlap: each address has the name of the last
/// line that covered it.
#[derive(Default)]
struct Regions {
    /// start -> (end, name).
    by_start: BTreeMap<u64, (u64, Arc<str>)>,
}

impl Regions {
    /// Adds `[start, end)`, cutting away what earlier regions had of it.
    fn paint(&mut self, start: u64, end: u64, name: Arc<str>) {
        // Regions are disjoint and sorted, so their ends are sorted too:
        // the overlapping ones are the last that start before `end`, back
        // to the first that ends after `start`.
        let overlapping: Vec<(u64, u64, Arc<str>)> = self
            .by_start
            .range(..end)
            .rev()
            .take_while(|(_, (e, _))| *e > start)
            .map(|(s, (e, n))| (*s, *e, n.clone()))
            .collect();
        for (s, e, n) in overlapping {
            self.by_start.remove(&s);
            if s < start {
                self.by_start.insert(s, (start, n.clone()));
            }
            if e > end {
                self.by_start.insert(end, (e, n));
            }
        }
        self.by_start.insert(start, (end, name));
    }

    fn find(&self, addr: u64) -> Option<&str> {
        let (_, (end, name)) = self.by_start.range(..=addr).next_back()?;
        (addr < *end).then_some(&**name)
    }

    /// Adds the lines of `text` in order (malformed ones are skipped).
    fn add(&mut self, text: &str) {
        for (start, end, name) in parse(text) {
            self.paint(start, end, name.into());
        }
    }
}

struct Map {
    regions: Regions,
    /// When the whole file was last read.
    loaded: Instant,
    /// Bytes read so far (whole lines): JITs only append, so a larger file
    /// has new lines, read from here.
    len: u64,
}

/// What is known of one process's perf map.
struct Entry {
    /// Where it is (the process's PID in its namespace is read once).
    path: PathBuf,
    /// None: absent or unreadable when last looked for, at `tried`.
    map: Option<Map>,
    tried: Instant,
}

impl Entry {
    fn new(pid: u32) -> Self {
        let path = map_path(pid);
        Entry {
            map: load(&path),
            path,
            tried: Instant::now(),
        }
    }

    fn reload(&mut self) {
        self.map = load(&self.path);
        self.tried = Instant::now();
    }
}

#[derive(Default)]
pub struct PerfMaps {
    maps: HashMap<u32, Entry>,
}

/// Parses perf map text, in file order; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<(u64, u64, String)> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ' ');
            let start = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
            let size = u64::from_str_radix(it.next()?.trim_start_matches("0x"), 16).ok()?;
            let name = it.next()?.trim();
            (size > 0 && !name.is_empty())
                .then(|| (start, start.saturating_add(size), name.to_string()))
        })
        .collect()
}

/// The map is named after the PID the process has in its own PID namespace.
fn map_path(pid: u32) -> PathBuf {
    procfs::in_root(pid, &format!("/tmp/perf-{}.map", procfs::ns_pid(pid)))
}

/// The whole lines of the map from byte `from` on, and where they end.
fn read_from(path: &Path, from: u64) -> Option<(String, u64)> {
    let mut file = std::fs::File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    if size > MAX_MAP_BYTES {
        log::warn!("{} is over {MAX_MAP_BYTES} bytes: not read", path.display());
        return None;
    }
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut bytes = Vec::with_capacity(size.saturating_sub(from) as usize);
    file.read_to_end(&mut bytes).ok()?;
    // The JIT may be writing the last line: it is read next time.
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    bytes.truncate(whole);
    Some((
        String::from_utf8_lossy(&bytes).into_owned(),
        from + whole as u64,
    ))
}

fn load(path: &Path) -> Option<Map> {
    let (text, len) = read_from(path, 0)?;
    let mut regions = Regions::default();
    regions.add(&text);
    Some(Map {
        regions,
        loaded: Instant::now(),
        len,
    })
}

impl PerfMaps {
    pub fn new() -> Self {
        Self::default()
    }

    /// The JIT functions at `addrs` in process `pid`, as its perf map says
    /// now: the map is brought up to date once, then every address is
    /// looked up in it.
    pub fn names(&mut self, pid: u32, addrs: &[u64]) -> Vec<Option<String>> {
        self.refresh(pid);
        addrs.iter().map(|&a| self.lookup(pid, a)).collect()
    }

    /// Reads what was appended to the map since it was read (a function
    /// compiled, or recompiled over old code, just before it blocked); a
    /// map that shrank was rewritten and is read whole.
    fn refresh(&mut self, pid: u32) {
        let Some(entry) = self.maps.get_mut(&pid) else {
            return;
        };
        let Some(map) = &mut entry.map else {
            return;
        };
        let Ok(size) = std::fs::metadata(&entry.path).map(|m| m.len()) else {
            return;
        };
        if size < map.len {
            entry.reload();
        } else if size > map.len
            && let Some((text, len)) = read_from(&entry.path, map.len)
        {
            map.regions.add(&text);
            map.len = len;
        }
    }

    /// The JIT function at `addr`; a miss reads a map not read yet, or
    /// read whole longer than [`RELOAD_INTERVAL`] ago.
    fn lookup(&mut self, pid: u32, addr: u64) -> Option<String> {
        let entry = self.maps.entry(pid).or_insert_with(|| Entry::new(pid));
        if let Some(name) = entry.map.as_ref().and_then(|m| m.regions.find(addr)) {
            return Some(name.to_string());
        }
        let stale = match &entry.map {
            Some(m) => m.loaded.elapsed() >= RELOAD_INTERVAL,
            None => entry.tried.elapsed() >= ABSENT_RETRY,
        };
        if stale {
            entry.reload();
            return entry
                .map
                .as_ref()
                .and_then(|m| m.regions.find(addr))
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

    fn regions(text: &str) -> Regions {
        let mut r = Regions::default();
        r.add(text);
        r
    }

    #[test]
    fn parses_node_and_python_lines() {
        let text = "7f00a0001000 40 LazyCompile:*handler /srv/app.js:12\n\
                    0x7f00a0000000 0x80 py::refresh:/srv/report.py\n\
                    garbage line\n\
                    7f00a0002000 0 empty\n";
        let e = parse(text);
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[1],
            (
                0x7f00a0000000,
                0x7f00a0000080,
                "py::refresh:/srv/report.py".into()
            )
        );
        let r = regions(text);
        assert_eq!(
            r.find(0x7f00a0001010),
            Some("LazyCompile:*handler /srv/app.js:12")
        );
        assert_eq!(r.find(0x7f00a0000000), Some("py::refresh:/srv/report.py"));
        assert_eq!(r.find(0x7f00a0001040), None, "end is exclusive");
        assert_eq!(r.find(0x1000), None);
    }

    /// V8 reused code space: the old entry starts below the new one and
    /// covers the address too, but the later line names what runs there.
    #[test]
    fn the_later_line_wins_where_entries_overlap() {
        let r = regions(
            "1000 400 node:internal/streams/duplex\n\
             1100 80 handleLogin /srv/app.js:3\n",
        );
        assert_eq!(r.find(0x1120), Some("handleLogin /srv/app.js:3"));
        assert_eq!(r.find(0x1000), Some("node:internal/streams/duplex"));
        assert_eq!(r.find(0x1180), Some("node:internal/streams/duplex"));
        assert_eq!(r.find(0x13ff), Some("node:internal/streams/duplex"));
        assert_eq!(r.find(0x1400), None);
        // The same address mapped twice: the newer line.
        let r = regions("2000 100 old\n2000 100 new\n");
        assert_eq!(r.find(0x2050), Some("new"));
        // A later line that covers several earlier ones, partly.
        let r = regions("1000 100 a\n1100 100 b\n1200 100 c\n1080 100 d\n1000 10 e\n");
        let at = |a| r.find(a);
        assert_eq!(
            [
                at(0x1000),
                at(0x1010),
                at(0x107f),
                at(0x1080),
                at(0x117f),
                at(0x1180),
                at(0x1250)
            ],
            [
                Some("e"),
                Some("a"),
                Some("a"),
                Some("d"),
                Some("d"),
                Some("b"),
                Some("c")
            ]
        );
        // An earlier line still wins where nothing later covers it.
        let r = regions("1100 10 inner\n1000 400 outer\n");
        assert_eq!(r.find(0x1105), Some("outer"));
    }

    #[test]
    fn reads_this_process_map_and_sees_appends() {
        let me = std::process::id();
        let path = format!("/tmp/perf-{me}.map");
        std::fs::write(&path, "1000 100 first\n").unwrap();
        let mut maps = PerfMaps::new();
        let one = |maps: &mut PerfMaps, a| maps.names(me, &[a]).remove(0);
        assert_eq!(one(&mut maps, 0x1010).as_deref(), Some("first"));
        std::fs::write(&path, "1000 100 first\n2000 100 second\n").unwrap();
        // Grown: read again at once (a function compiled just before it
        // blocked).
        assert_eq!(one(&mut maps, 0x2010).as_deref(), Some("second"));
        // Code space reused after a lookup hit: the cached hit is not
        // trusted, the appended line names the address. A line still being
        // written is not read.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut f, b"1000 80 recompiled\n1000 10 partl").unwrap();
        assert_eq!(
            maps.names(me, &[0x1010, 0x1090, 0x2010]),
            [
                Some("recompiled".into()),
                Some("first".into()),
                Some("second".into())
            ]
        );
        std::io::Write::write_all(&mut f, b"y\n").unwrap();
        assert_eq!(one(&mut maps, 0x1000).as_deref(), Some("partly"));
        let loaded = |maps: &PerfMaps| maps.maps[&me].map.as_ref().unwrap().loaded;
        let before = loaded(&maps);
        // Unchanged: a miss does not read it again before the interval.
        assert_eq!(one(&mut maps, 0x3010), None);
        assert_eq!(loaded(&maps), before, "no file read per event");
        // Rewritten smaller: read whole at once.
        std::fs::write(&path, "3000 100 third\n").unwrap();
        assert_eq!(one(&mut maps, 0x3010).as_deref(), Some("third"));
        assert_eq!(one(&mut maps, 0x1010), None);
        // Rewritten at the same size: seen once the interval has passed.
        std::fs::write(&path, "4000 100 forth\n").unwrap();
        assert_eq!(one(&mut maps, 0x4010), None);
        maps.maps.get_mut(&me).unwrap().map.as_mut().unwrap().loaded -= RELOAD_INTERVAL;
        assert_eq!(one(&mut maps, 0x4010).as_deref(), Some("forth"));
        std::fs::remove_file(&path).unwrap();
        maps.forget(me);
        assert_eq!(one(&mut maps, 0x4010), None);
        // Absent: not looked for again at every event, but soon.
        std::fs::write(&path, "4000 100 forth\n").unwrap();
        assert_eq!(one(&mut maps, 0x4010), None, "no file read per event");
        maps.maps.get_mut(&me).unwrap().tried -= ABSENT_RETRY;
        assert_eq!(one(&mut maps, 0x4010).as_deref(), Some("forth"));
        std::fs::remove_file(&path).unwrap();
    }
}
