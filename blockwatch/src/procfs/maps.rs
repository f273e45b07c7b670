//! `/proc/PID/maps`: one parser for every reader (the symbolizer, the
//! unwinder through it, CPython inspection, the loop clocks), and where a
//! mapped ELF file was loaded.

use std::path::PathBuf;
use std::rc::Rc;

/// Identity of a mapped file, as `/proc/PID/maps` reports it. Paths are no
/// identity: the same library has different paths in different mount
/// namespaces, and an upgraded library has the same path as the old one
/// that running processes still map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `(major << 32) | minor`.
    pub dev: u64,
    pub inode: u64,
}

/// What a mapping maps.
#[derive(Clone, Debug)]
pub enum MapKind {
    File {
        id: FileId,
        /// The path as the process sees it, without ` (deleted)`.
        path: Rc<str>,
        deleted: bool,
    },
    Vdso,
    /// Anonymous memory (JIT code, heap, stack), with its name if the
    /// kernel gives one (`[heap]`, `[anon:name]`).
    Anon(Option<Rc<str>>),
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    /// Offset in the file of `start`.
    pub offset: u64,
    pub exec: bool,
    pub kind: MapKind,
}

impl Mapping {
    /// The file's path, for file mappings.
    pub fn path(&self) -> Option<&str> {
        match &self.kind {
            MapKind::File { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The name frames give as their module: the path, `[vdso]`, the
    /// kernel's name of anonymous memory, or `[anon]`.
    pub fn name(&self) -> String {
        match &self.kind {
            MapKind::File { path, .. } => path.to_string(),
            MapKind::Vdso => "[vdso]".to_string(),
            MapKind::Anon(Some(name)) => name.to_string(),
            MapKind::Anon(None) => "[anon]".to_string(),
        }
    }

    /// `/proc/PID/map_files/START-END`: the very file this mapping maps,
    /// reached through the process (containers, deleted or replaced files).
    pub fn map_files(&self, pid: u32) -> PathBuf {
        map_files(pid, self.start, self.end)
    }
}

/// `/proc/PID/map_files/START-END`, named as the kernel names it (hex
/// without padding, unlike the maps text).
pub fn map_files(pid: u32, start: u64, end: u64) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"))
}

/// Splits off the next space-separated field.
fn field<'a>(rest: &mut &'a str) -> Option<&'a str> {
    let s = rest.trim_start_matches(' ');
    if s.is_empty() {
        return None;
    }
    let end = s.find(' ').unwrap_or(s.len());
    let (f, r) = s.split_at(end);
    *rest = r;
    Some(f)
}

/// One line: `start-end perms offset major:minor inode   pathname`.
pub fn parse_line(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let (start, end) = field(&mut rest)?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let exec = field(&mut rest)?.as_bytes().get(2) == Some(&b'x');
    let offset = u64::from_str_radix(field(&mut rest)?, 16).ok()?;
    let (major, minor) = field(&mut rest)?.split_once(':')?;
    let dev = (u64::from_str_radix(major, 16).ok()? << 32) | u64::from_str_radix(minor, 16).ok()?;
    let inode: u64 = field(&mut rest)?.parse().ok()?;
    // The pathname may itself contain spaces: it is the rest of the line.
    let name = rest.trim_start_matches(' ');
    let kind = if name == "[vdso]" {
        MapKind::Vdso
    } else if name.starts_with('/') && inode != 0 {
        let (path, deleted) = match name.strip_suffix(" (deleted)") {
            Some(p) => (p, true),
            None => (name, false),
        };
        MapKind::File {
            id: FileId { dev, inode },
            path: path.into(),
            deleted,
        }
    } else if name.is_empty() {
        MapKind::Anon(None)
    } else {
        MapKind::Anon(Some(name.into()))
    };
    Some(Mapping {
        start,
        end,
        offset,
        exec,
        kind,
    })
}

/// Every parsable line of a maps file, sorted by address. Malformed lines
/// are skipped.
pub fn parse(text: &str) -> Vec<Mapping> {
    // Consecutive mappings of one file share its path.
    let mut last_path: Option<Rc<str>> = None;
    let mut maps: Vec<Mapping> = text
        .lines()
        .filter_map(parse_line)
        .map(|mut m| {
            if let MapKind::File { path, .. } = &mut m.kind {
                match &last_path {
                    Some(p) if **p == **path => *path = Rc::clone(p),
                    _ => last_path = Some(Rc::clone(path)),
                }
            }
            m
        })
        .collect();
    maps.sort_by_key(|m| m.start);
    maps
}

/// Process `pid`'s mappings, sorted by address.
pub fn read(pid: u32) -> std::io::Result<Vec<Mapping>> {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).map(|text| parse(&text))
}

/// The mapping `addr` lies in, in mappings sorted by address.
pub fn find(maps: &[Mapping], addr: u64) -> Option<&Mapping> {
    let i = maps.partition_point(|m| m.start <= addr);
    let m = maps.get(i.checked_sub(1)?)?;
    (addr < m.end).then_some(m)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n)
        .ok()
        .filter(|n| n.is_power_of_two())
        .unwrap_or(4096)
}

/// Load bias of a mapped ELF file, given its PT_LOAD segments as
/// `(p_vaddr, p_offset)` and the mappings of that file: the loader maps
/// each segment at `bias + page_down(p_vaddr)` from file offset
/// `page_down(p_offset)`.
pub fn load_bias(loads: &[(u64, u64)], mappings: &[&Mapping]) -> Option<u64> {
    let mask = !(page_size() - 1);
    mappings.iter().find_map(|m| {
        let &(vaddr, _) = loads.iter().find(|(_, off)| off & mask == m.offset)?;
        Some(m.start.wrapping_sub(vaddr & mask))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
55d0c0a00000-55d0c0a21000 r--p 00000000 fd:01 1234                       /usr/bin/python3.11
55d0c0a21000-55d0c0b00000 r-xp 00021000 fd:01 1234                       /usr/bin/python3.11
7f0000000000-7f0000001000 r-xp 00001000 00:05 99 /memfd:jit code (deleted)
7f0000002000-7f0000003000 rwxp 00000000 00:00 0 
7f0000004000-7f0000005000 rw-p 00000000 00:00 0                          [heap]
7ffd1000-7ffd3000 r-xp 00000000 00:00 0                          [vdso]
garbage line
";

    #[test]
    fn parses_maps_lines() {
        let maps = parse(TEXT);
        assert_eq!(maps.len(), 6);
        assert_eq!(maps[0].start, 0x7ffd1000, "sorted by address");
        assert!(matches!(maps[0].kind, MapKind::Vdso));
        assert_eq!(maps[0].name(), "[vdso]");
        let m = &maps[2];
        assert_eq!(
            (m.start, m.end, m.offset, m.exec),
            (0x55d0c0a21000, 0x55d0c0b00000, 0x21000, true)
        );
        match &m.kind {
            MapKind::File { id, path, deleted } => {
                assert_eq!(
                    *id,
                    FileId {
                        dev: (0xfd << 32) | 1,
                        inode: 1234
                    }
                );
                assert_eq!(&**path, "/usr/bin/python3.11");
                assert!(!deleted);
            }
            k => panic!("{k:?}"),
        }
        assert!(!maps[1].exec);
        match &maps[3].kind {
            MapKind::File { path, deleted, .. } => {
                assert_eq!(&**path, "/memfd:jit code");
                assert!(deleted);
            }
            k => panic!("{k:?}"),
        }
        assert!(matches!(maps[4].kind, MapKind::Anon(None)));
        assert_eq!(maps[4].name(), "[anon]");
        assert_eq!(maps[5].name(), "[heap]");
        assert_eq!(maps[5].path(), None);
        assert_eq!(
            maps[1].map_files(7),
            PathBuf::from("/proc/7/map_files/55d0c0a00000-55d0c0a21000")
        );
    }

    #[test]
    fn paths_with_spaces_and_deleted_files() {
        let m = parse_line(
            "7f00-7f10 r-xp 00001000 fd:01 1234                       /opt/my dir/libpython3.11.so.1.0 (deleted)",
        )
        .expect("parses");
        assert_eq!((m.start, m.end, m.offset), (0x7f00, 0x7f10, 0x1000));
        assert_eq!(m.path(), Some("/opt/my dir/libpython3.11.so.1.0"));
        let anon = parse_line("7f00-7f10 rw-p 00000000 00:00 0 ").expect("parses");
        assert_eq!(anon.path(), None);
        assert!(parse_line("garbage").is_none());
    }

    #[test]
    fn addresses_find_their_mapping() {
        let maps = parse(TEXT);
        let at = |a| find(&maps, a).map(|m| m.start);
        assert_eq!(at(0x55d0c0a21000), Some(0x55d0c0a21000));
        assert_eq!(at(0x55d0c0afffff), Some(0x55d0c0a21000));
        assert_eq!(at(0x55d0c0b00000), None, "end is exclusive");
        assert_eq!(at(0x1000), None);
        assert_eq!(at(0x7f0000002800), Some(0x7f0000002000));
    }

    #[test]
    fn consecutive_mappings_share_their_path() {
        let maps = parse(TEXT);
        match (&maps[1].kind, &maps[2].kind) {
            (MapKind::File { path: a, .. }, MapKind::File { path: b, .. }) => {
                assert!(Rc::ptr_eq(a, b))
            }
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn own_maps_hold_own_code() {
        let maps = read(std::process::id()).expect("own maps");
        let f: fn() -> u32 = std::process::id;
        let m = find(&maps, f as usize as u64).expect("mapped");
        assert!(m.exec && m.path().is_some(), "{m:?}");
    }
}
