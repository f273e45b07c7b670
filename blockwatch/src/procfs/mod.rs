//! Everything blockwatch reads of other processes through `/proc`, in one
//! place: their memory maps ([`maps`]), threads, names, command lines,
//! status fields, files as they see them, and their memory ([`mem`]).
//!
//! Readers answer `None` (or an empty list) when the process is gone or
//! unreadable: a watched process may exit at any moment, and every caller
//! has a fallback.

pub mod maps;
pub mod mem;

use std::path::PathBuf;

pub use maps::{FileId, MapKind, Mapping};

/// The text after `field` (e.g. `Tgid:`) in `/proc/PID/status`.
fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_value(&status, field).map(str::to_string)
}

fn status_value<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(str::trim)
}

/// The process a thread belongs to.
pub fn tgid(tid: u32) -> Option<u32> {
    status_field(tid, "Tgid:")?.parse().ok()
}

/// The PID process `pid` has in its own PID namespace (the innermost of
/// `NSpid:`), or `pid` itself when that cannot be told.
pub fn ns_pid(pid: u32) -> u32 {
    status_field(pid, "NSpid:")
        .and_then(|v| innermost_pid(&v))
        .unwrap_or(pid)
}

fn innermost_pid(nspid: &str) -> Option<u32> {
    nspid.split_whitespace().last()?.parse().ok()
}

/// Inode number of the host's (the initial) PID namespace, fixed by the
/// kernel (`PROC_PID_INIT_INO`).
pub const HOST_PID_NAMESPACE: u64 = 0xEFFF_FFFC;

/// blockwatch's own PID namespace, as `/proc/self/ns/pid` names it.
pub fn own_pid_namespace() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata("/proc/self/ns/pid")?.ino())
}

/// Whether this `/proc` belongs to blockwatch's own PID namespace: its PID
/// for blockwatch (what `/proc/self` resolves to) is the one `getpid`
/// gives. A `/proc` mounted for another namespace names every process by
/// that namespace's numbers.
pub fn proc_is_own_namespace() -> bool {
    let Ok(link) = std::fs::read_link("/proc/self") else {
        return false;
    };
    link.to_str().and_then(|s| s.parse::<u32>().ok()) == Some(std::process::id())
}

/// Numeric entries of a `/proc` directory.
fn numbered(dir: &str) -> Vec<u32> {
    std::fs::read_dir(dir)
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The threads of process `pid`.
pub fn threads(pid: u32) -> Vec<u32> {
    numbered(&format!("/proc/{pid}/task"))
}

/// Every live process on the host.
pub fn pids() -> Vec<u32> {
    numbered("/proc")
}

/// Whether `/proc` still has process (or thread) `pid`.
pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether thread `tid` of process `pid` is still listed.
pub fn thread_exists(pid: u32, tid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}/task/{tid}")).exists()
}

/// The system call thread `tid` of process `pid` sleeps in, and its first
/// argument; None when it runs, is not in one, or cannot be read (the
/// file needs ptrace access).
pub fn sleeping_syscall(pid: u32, tid: u32) -> Option<(i64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    parse_syscall(&text)
}

/// `/proc/PID/task/TID/syscall`: "NR ARG1 .. ARG6 SP PC", the arguments in
/// hex; "running", or "-1 SP PC" outside a syscall.
fn parse_syscall(text: &str) -> Option<(i64, u64)> {
    let mut words = text.split_ascii_whitespace();
    let nr: i64 = words.next()?.parse().ok()?;
    let arg0 = words.next()?.strip_prefix("0x")?;
    let arg0 = u64::from_str_radix(arg0, 16).ok()?;
    (nr >= 0).then_some((nr, arg0))
}

/// A process's name (`comm`, at most 15 bytes), without the newline the
/// kernel ends it with.
pub fn comm(pid: u32) -> Option<String> {
    let mut s = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    if s.ends_with('\n') {
        s.pop();
    }
    Some(s)
}

/// A thread's name, as the kernel writes it (with its newline).
pub fn thread_comm(pid: u32, tid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok()
}

/// The raw command line: arguments each ended by a NUL; empty for kernel
/// threads.
pub fn cmdline(pid: u32) -> Option<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/cmdline")).ok()
}

/// The executable's path.
pub fn exe(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/exe")).ok()
}

/// The text of `/proc/PID/cgroup`.
pub fn cgroup(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()
}

/// The target of the process's file descriptor `fd` (`socket:[123]`,
/// `/var/log/x`, ...) handed to `f` as bytes, without an allocation: it is
/// looked up for every event of a read or a write. A target longer than
/// 256 bytes is cut there; what it is (a socket, a pipe, a path) is in
/// its first bytes.
pub fn with_fd_target<T>(pid: u32, fd: i32, f: impl FnOnce(&[u8]) -> T) -> Option<T> {
    use std::io::Write as _;
    let mut path = [0u8; 48];
    let mut w = &mut path[..];
    write!(w, "/proc/{pid}/fd/{fd}\0").ok()?;
    let mut target = [0u8; 256];
    // SAFETY: `path` holds a NUL-terminated string and `target` is valid
    // for writes of its length; readlink writes no NUL and keeps neither.
    let n = unsafe {
        libc::readlink(
            path.as_ptr().cast(),
            target.as_mut_ptr().cast(),
            target.len(),
        )
    };
    let n = usize::try_from(n).ok()?;
    Some(f(&target[..n]))
}

/// `path` as process `pid` sees it: through its root, so that a path in a
/// container's mount namespace names the container's file.
pub fn in_root(pid: u32, path: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields() {
        let status = "Name:\tpython3\nTgid:\t4242\nNSpid:\t4242\t17\n";
        assert_eq!(status_value(status, "Tgid:"), Some("4242"));
        assert_eq!(status_value(status, "Pid:"), None);
        assert_eq!(
            innermost_pid(status_value(status, "NSpid:").unwrap()),
            Some(17)
        );
        assert_eq!(innermost_pid(""), None);
    }

    #[test]
    fn own_process() {
        let me = std::process::id();
        assert_eq!(tgid(me), Some(me));
        assert_eq!(ns_pid(me), me, "tests run in the host's PID namespace");
        assert!(threads(me).contains(&me));
        assert!(pids().contains(&me));
        assert!(exists(me) && !exists(u32::MAX));
        assert!(comm(me).is_some_and(|c| !c.is_empty() && !c.ends_with('\n')));
        assert!(cmdline(me).is_some_and(|c| c.ends_with(&[0])));
        assert_eq!(exe(me), std::env::current_exe().ok());
        assert!(cgroup(me).is_some());
        assert!(thread_comm(me, me).is_some());
        assert_eq!(
            in_root(me, "/etc"),
            PathBuf::from(format!("/proc/{me}/root/etc"))
        );
    }

    #[test]
    fn gone_processes_read_as_nothing() {
        let gone = u32::MAX;
        assert_eq!(tgid(gone), None);
        assert_eq!(ns_pid(gone), gone);
        assert!(threads(gone).is_empty());
        assert_eq!(comm(gone), None);
        assert_eq!(cmdline(gone), None);
        assert_eq!(with_fd_target(gone, 0, <[u8]>::to_vec), None);
    }

    #[test]
    fn fd_targets_are_read_as_bytes() {
        use std::os::fd::AsRawFd as _;
        let me = std::process::id();
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = null.as_raw_fd();
        let bytes = with_fd_target(me, fd, <[u8]>::to_vec).unwrap();
        assert_eq!(bytes, b"/dev/null");
        assert_eq!(with_fd_target(me, -1, <[u8]>::to_vec), None);
    }

    #[test]
    fn syscall_lines_give_the_number_and_first_argument() {
        let epoll =
            "232 0x3 0x7ffd4c2a1b20 0x400 0xffffffff 0x0 0x0 0x7ffd4c2a1af8 0x7f1c2b3e4d5e\n";
        assert_eq!(parse_syscall(epoll), Some((232, 3)));
        assert_eq!(parse_syscall("running\n"), None);
        assert_eq!(parse_syscall("-1 0x7ffd4c2a1af8 0x7f1c2b3e4d5e\n"), None);
        assert_eq!(parse_syscall(""), None);
    }

    #[test]
    fn a_thread_asleep_in_read_shows_its_fd() {
        use std::io::{Read as _, Write as _};
        use std::os::fd::AsRawFd as _;
        let (mut r, mut w) = std::io::pipe().unwrap();
        let fd = r.as_raw_fd();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let mut b = [0u8; 1];
            r.read_exact(&mut b).unwrap();
        });
        let tid = rx.recv().unwrap();
        let me = std::process::id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // Until it sleeps in its read (0 on x86_64): caught on its way
        // there, it may show another call it was preempted in.
        let mut seen = None;
        while seen.is_none_or(|(nr, _)| nr != 0) && std::time::Instant::now() < deadline {
            seen = sleeping_syscall(me, tid);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        w.write_all(b"x").unwrap();
        reader.join().unwrap();
        assert_eq!(seen, Some((0, fd as u64)));
    }
}
