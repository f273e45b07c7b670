//! Which threads are watched: explicit PIDs and TIDs, processes matched by
//! name, and a command blockwatch starts itself.
//!
//! User space only seeds the kernel maps for what already exists; threads
//! and children created later are tagged by the kernel programs before they
//! first run.

pub mod filter;
pub mod names;
pub mod selector;

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData};
pub use blockwatch_common::tag_for;
use blockwatch_common::{
    TAG_CANDIDATE, TAG_LOOP, THREADS_ALL, THREADS_LOOP, THREADS_MAIN, ThreadTag, WatchRule,
    x86_64::is_epoll_wait,
};
use clap::ValueEnum;
use log::debug;

use crate::procfs;
use filter::TagFilter;

/// bpf(2) map update flag: fail if the key exists.
const BPF_NOEXIST: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no process with PID {0} (check it with `ps -p {0}`)")]
    NoSuchPid(u32),
    #[error("{0} is a thread of process {1}, not a process: use --tid {0}, or --pid {1}")]
    NotAProcess(u32, u32),
    #[error("no thread with TID {0} (list threads with `ps -T -p PID`)")]
    NoSuchTid(u32),
    #[error("invalid --comm pattern {0:?}: {1}")]
    BadGlob(String, String),
    #[error("cannot start `{0}`: no such command (check the name, or give its full path)")]
    CommandNotFound(String),
    #[error("cannot start `{0}`: {1}")]
    Spawn(String, std::io::Error),
    #[error("kernel map update failed: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// Which threads of a watched process are tagged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ThreadsMode {
    /// Event-loop threads: those seen idling in their runtime's wait
    /// (epoll for asyncio/uvloop/libuv/tokio's driver, tokio's worker park).
    #[default]
    Loop,
    /// The main thread of each process.
    Main,
    /// Every thread.
    All,
}

impl ThreadsMode {
    pub fn rule(self, follow_children: bool) -> WatchRule {
        WatchRule {
            threads: match self {
                ThreadsMode::Loop => THREADS_LOOP,
                ThreadsMode::Main => THREADS_MAIN,
                ThreadsMode::All => THREADS_ALL,
            },
            follow_children: follow_children as u8,
            _pad: [0; 6],
        }
    }
}

/// Checks that `pid` names a live process (not a thread).
/// Whether process `pid` is this blockwatch or another one: blockwatch
/// never watches itself, and a second blockwatch (a `trace` beside the
/// daemon) is a profiler, not an application; both map libpython and wait
/// in epoll like the loops they look for. Recognised by the executable's
/// file (same inode as ours) or its name.
pub fn is_blockwatch(pid: u32) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    if pid == std::process::id() {
        return true;
    }
    let identity = |path: &str| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    // Asked for every process at start and at every exec under --auto:
    // our own executable does not change while we run.
    static OURS: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    if let (Some(theirs), Some(ours)) = (
        identity(&format!("/proc/{pid}/exe")),
        *OURS.get_or_init(|| identity("/proc/self/exe")),
    ) && theirs == ours
    {
        return true;
    }
    procfs::exe(pid).is_some_and(|exe| {
        exe.file_name().is_some_and(|n| {
            let n = n.to_string_lossy();
            // A replaced binary reads `blockwatch (deleted)`.
            n == "blockwatch" || n == "blockwatch (deleted)"
        })
    })
}

pub fn validate_pid(pid: u32) -> Result<(), TargetError> {
    match procfs::tgid(pid) {
        None => Err(TargetError::NoSuchPid(pid)),
        Some(tgid) if tgid != pid => Err(TargetError::NotAProcess(pid, tgid)),
        Some(_) => Ok(()),
    }
}

/// Process-name patterns (`--comm`).
pub struct CommRules(globset::GlobSet);

impl CommRules {
    pub fn new(patterns: &[String]) -> Result<Self, TargetError> {
        let mut b = globset::GlobSetBuilder::new();
        for p in patterns {
            let g = globset::Glob::new(p)
                .map_err(|e| TargetError::BadGlob(p.clone(), e.to_string()))?;
            b.add(g);
        }
        b.build()
            .map(CommRules)
            .map_err(|e| TargetError::BadGlob(patterns.join(","), e.to_string()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, comm: &str) -> bool {
        self.0.is_match(comm)
    }
}

/// The kernel maps that hold the tags.
pub struct TagMaps<'a> {
    pub threads: &'a mut HashMap<MapData, u32, ThreadTag>,
    pub watched: &'a mut HashMap<MapData, u32, WatchRule>,
    pub filter: &'a mut TagFilter,
}

impl<'a> TagMaps<'a> {
    pub fn of(maps: &'a mut crate::bpf::Maps) -> Self {
        Self {
            threads: &mut maps.threads,
            watched: &mut maps.watched,
            filter: &mut maps.tag_filter,
        }
    }

    /// Thread `tid` exited, and the kernel removed its tag: its filter bit
    /// goes too, unless the TID is already tagged again (a new thread).
    pub fn thread_exited(&mut self, tid: u32) {
        // Most exits are of threads the kernel tagged: no lookup for them.
        if self.filter.has(tid) && self.threads.get(&tid, 0).is_err() {
            self.filter.clear(tid);
        }
    }

    /// Removes `tid`'s tag, then its filter bit.
    pub fn untag(&mut self, tid: u32) {
        let _ = self.threads.remove(&tid);
        self.filter.clear(tid);
    }

    /// Watches process `pid` under `rule`: registers it for the kernel's
    /// new-thread tagging first, then tags the threads it already has, so a
    /// thread created in between is tagged by one side or the other.
    ///
    /// A candidate asleep in an epoll wait now is taken to be a loop in its
    /// idle wait (the kernel takes the first epoll wait it sees a thread
    /// sleep in the same way): it is returned, so that the caller does what
    /// the kernel's `LoopFound` record would have it do. Left to the
    /// kernel, it is found only at its next idle wait, after the first
    /// call that blocks it: an idle server's first slow request would go
    /// unreported.
    pub fn watch_process(
        &mut self,
        pid: u32,
        rule: WatchRule,
    ) -> Result<Vec<IdleLoop>, TargetError> {
        self.watched.insert(pid, rule, 0)?;
        let mut n = 0;
        let mut idle = Vec::new();
        for tid in procfs::threads(pid) {
            let mut tag = ThreadTag::new(pid, tag_for(&rule, tid == pid));
            if tag.tag == 0 {
                continue;
            }
            if tag.tag == TAG_CANDIDATE
                && let Some((nr, fd)) = procfs::sleeping_syscall(pid, tid)
                && is_epoll_wait(nr)
            {
                tag.loop_epfd = fd as i32;
                tag.asleep_in_loop = 1;
            }
            // Its switch-in must be seen: the looping bit.
            self.filter
                .set(tid, tag.tag == TAG_LOOP || tag.asleep_in_loop != 0)?;
            // BPF_NOEXIST: never overwrite what the kernel already learned.
            match self.threads.insert(tid, tag, BPF_NOEXIST) {
                Ok(()) => n += 1,
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
                {
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            if tag.asleep_in_loop != 0 {
                idle.push(IdleLoop {
                    pid,
                    tid,
                    epfd: tag.loop_epfd,
                });
            }
        }
        debug!(
            "watching pid {pid}: {n} threads tagged, {} asleep in their loop's wait",
            idle.len()
        );
        Ok(idle)
    }

    /// Tags one thread as an event loop, whatever it does (`--tid`).
    pub fn tag_thread(&mut self, tid: u32) -> Result<u32, TargetError> {
        let tgid = procfs::tgid(tid).ok_or(TargetError::NoSuchTid(tid))?;
        self.filter.set(tid, true)?;
        self.threads
            .insert(tid, ThreadTag::new(tgid, TAG_LOOP), 0)?;
        Ok(tgid)
    }
}

/// A thread found asleep in its event loop's epoll wait when its process
/// was watched (`TagMaps::watch_process`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleLoop {
    pub pid: u32,
    pub tid: u32,
    /// The epoll fd it waits on: its loop's.
    pub epfd: i32,
}

/// A command started by blockwatch.
pub struct Command {
    pub child: tokio::process::Child,
    pub pid: u32,
    /// The command line, for messages.
    pub display: String,
}

/// Who to run the command as: the user who invoked sudo, when there is one.
struct RunAs {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    home: Option<PathBuf>,
    name: String,
}

fn sudo_user() -> Option<RunAs> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let uid: libc::uid_t = std::env::var("SUDO_UID").ok()?.parse().ok()?;
    let gid: libc::gid_t = std::env::var("SUDO_GID").ok()?.parse().ok()?;
    if uid == 0 {
        return None;
    }
    let name = std::env::var("SUDO_USER").ok()?;
    let cname = CString::new(name.clone()).ok()?;
    // Supplementary groups are resolved here, in the parent: the child
    // between fork and exec may only make async-signal-safe calls.
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: buffer of n gids; n is updated to the count.
    let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
    groups.truncate(if rc < 0 { 0 } else { n as usize });
    if groups.is_empty() {
        groups.push(gid);
    }
    // SAFETY: getpwnam returns a pointer to static storage or null.
    let home = unsafe {
        let pw = libc::getpwnam(cname.as_ptr());
        (!pw.is_null()).then(|| {
            PathBuf::from(
                std::ffi::CStr::from_ptr((*pw).pw_dir)
                    .to_string_lossy()
                    .into_owned(),
            )
        })
    };
    Some(RunAs {
        uid,
        gid,
        groups,
        home,
        name,
    })
}

fn resolve_command(program: &OsString) -> Result<PathBuf, TargetError> {
    let shown = program.to_string_lossy().into_owned();
    let p = Path::new(program);
    if p.components().count() > 1 {
        return if p.exists() {
            Ok(p.to_path_buf())
        } else {
            Err(TargetError::CommandNotFound(shown))
        };
    }
    which::which(program).map_err(|_| TargetError::CommandNotFound(shown))
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two fresh descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The command `argv` (its program, `argv[0]`, resolved to `path`), run
/// as `run_as`, whose child writes its PID to `fds[0]` and then waits for
/// a byte on `fds[1]` before it execs.
fn held_command(
    path: &Path,
    argv: &[OsString],
    run_as: Option<&RunAs>,
    fds: [std::os::fd::RawFd; 2],
) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(path);
    let (program, args) = argv
        .split_first()
        .map_or((path.as_os_str(), &[][..]), |(p, a)| (p.as_os_str(), a));
    cmd.arg0(program).args(args).kill_on_drop(false);
    if let Some(u) = run_as {
        cmd.env("USER", &u.name).env("LOGNAME", &u.name);
        if let Some(home) = &u.home {
            cmd.env("HOME", home);
        }
    }
    let ids = run_as.map(|u| (u.uid, u.gid, u.groups.clone()));
    // SAFETY: the closure only makes async-signal-safe calls (getpid,
    // write, read, setgroups, setgid, setuid, _exit) on data prepared
    // before fork.
    unsafe {
        cmd.pre_exec(move || {
            let pid = libc::getpid().to_ne_bytes();
            let mut b = 0u8;
            // Tell the parent who we are, then wait until it watches us.
            if libc::write(fds[0], pid.as_ptr().cast(), 4) != 4
                || libc::read(fds[1], (&mut b as *mut u8).cast(), 1) != 1
            {
                libc::_exit(126);
            }
            if let Some((uid, gid, groups)) = &ids
                && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// The PID the held child reports (none if it died first).
fn read_pid(pid_r: &OwnedFd) -> Option<u32> {
    let mut buf = [0u8; 4];
    // SAFETY: reading 4 bytes into a 4-byte buffer from an owned fd.
    let n = unsafe { libc::read(pid_r.as_raw_fd(), buf.as_mut_ptr().cast(), 4) };
    (n == 4).then(|| i32::from_ne_bytes(buf) as u32)
}

/// Starts `argv` and calls `watch` with its PID before it execs, so the
/// command is watched from its first instruction (and its first thread).
///
/// `Command::spawn` itself waits for the exec, so the child cannot simply
/// be held until spawn returns: it reports its PID over a pipe and waits on
/// another, while spawn runs on a blocking thread.
pub async fn spawn_watched(
    argv: &[OsString],
    watch: impl FnOnce(u32) -> Result<(), TargetError>,
) -> Result<Command, TargetError> {
    let display = argv
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let program = argv
        .first()
        .ok_or_else(|| TargetError::CommandNotFound(String::new()))?;
    let path = resolve_command(program)?;
    let run_as = sudo_user();
    let spawn_err = |e| TargetError::Spawn(display.clone(), e);

    let (pid_r, pid_w) = pipe().map_err(spawn_err)?;
    let (release_r, release_w) = pipe().map_err(spawn_err)?;
    let fds = [pid_w.as_raw_fd(), release_r.as_raw_fd()];
    let mut cmd = held_command(&path, argv, run_as.as_ref(), fds);
    let spawner = tokio::task::spawn_blocking(move || {
        let child = cmd.spawn();
        // Our copies: the child's end of each pipe is all that remains, so
        // a child that dies early gives the reader end-of-file.
        drop((pid_w, release_r));
        child
    });
    let pid = tokio::task::spawn_blocking(move || read_pid(&pid_r))
        .await
        .ok()
        .flatten();
    let watched = match pid {
        Some(pid) => watch(pid),
        None => Ok(()),
    };
    if watched.is_ok() && pid.is_some() {
        // SAFETY: writing one byte from a valid buffer to an owned fd.
        unsafe { libc::write(release_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }
    drop(release_w);
    let child = spawner
        .await
        .map_err(|e| spawn_err(std::io::Error::other(e)))?
        .map_err(spawn_err)?;
    watched?;
    Ok(Command {
        pid: child.id().or(pid).unwrap_or(0),
        child,
        display,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_tag_the_right_threads() {
        let l = ThreadsMode::Loop.rule(false);
        let m = ThreadsMode::Main.rule(true);
        let a = ThreadsMode::All.rule(false);
        assert_eq!(tag_for(&l, true), blockwatch_common::TAG_CANDIDATE);
        assert_eq!(tag_for(&l, false), blockwatch_common::TAG_CANDIDATE);
        assert_eq!(tag_for(&m, true), TAG_LOOP);
        assert_eq!(tag_for(&m, false), 0);
        assert_eq!(tag_for(&a, false), TAG_LOOP);
        assert_eq!(m.follow_children, 1);
    }

    #[test]
    fn blockwatch_is_recognised_by_pid_and_executable() {
        assert!(is_blockwatch(std::process::id()));
        // Another process of this very binary: a fork that sleeps.
        // SAFETY: the child only calls async-signal-safe sleep and _exit.
        let twin = unsafe { libc::fork() };
        if twin == 0 {
            // SAFETY: as above.
            unsafe {
                libc::sleep(5);
                libc::_exit(0);
            }
        }
        assert!(twin > 0, "fork");
        let twin_is = is_blockwatch(twin as u32);
        let mut other = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let other_is = is_blockwatch(other.id());
        // SAFETY: kill and waitpid on our own child.
        unsafe {
            libc::kill(twin, libc::SIGKILL);
            libc::waitpid(twin, std::ptr::null_mut(), 0);
        }
        let _ = other.kill();
        let _ = other.wait();
        assert!(twin_is);
        assert!(!other_is);
        assert!(!is_blockwatch(1));
    }

    #[test]
    fn own_process_validates_and_its_threads_are_listed() {
        let me = std::process::id();
        validate_pid(me).unwrap();
        assert!(procfs::threads(me).contains(&me));
    }

    #[test]
    fn a_thread_is_not_a_process() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let err = validate_pid(tid).unwrap_err().to_string();
        assert!(err.contains(&format!("--tid {tid}")), "{err}");
        done_tx.send(()).unwrap();
        h.join().unwrap();
    }

    #[test]
    fn missing_pid_is_reported() {
        let err = validate_pid(999_999_999).unwrap_err().to_string();
        assert!(err.contains("999999999"), "{err}");
    }

    #[test]
    fn comm_globs() {
        let r = CommRules::new(&["python3*".into(), "node".into()]).unwrap();
        assert!(r.matches("python3.11"));
        assert!(r.matches("node"));
        assert!(!r.matches("nodejs"));
        assert!(CommRules::new(&["[".into()]).is_err());
    }

    #[test]
    fn unknown_command_is_named() {
        let err = resolve_command(&OsString::from("/nonexistent/cmd"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/cmd"), "{err}");
        let err = resolve_command(&OsString::from("no-such-command-xyz"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no-such-command-xyz"), "{err}");
    }
}
