//! Which processes a rule selects: by name (`comm`), executable, command
//! line, cgroup or systemd unit. Used when a session starts (every running
//! process) and at each exec the kernel reports, so processes that start
//! later are picked up.
//!
//! What a rule is matched against is read from `/proc/PID` once per
//! decision ([`ProcessFacts`]); a process that is gone by then matches
//! nothing.

use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::procfs;

#[derive(Debug, thiserror::Error)]
#[error("invalid {flag} pattern {pattern:?}: {msg}")]
pub struct SelectorError {
    pub flag: &'static str,
    pub pattern: String,
    pub msg: String,
}

/// The patterns of a selection, as given on the command line or in the
/// daemon's config. A process is selected when any pattern matches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Patterns {
    /// Process names (`/proc/PID/comm`, at most 15 bytes).
    pub comms: Vec<String>,
    /// Executables: a pattern with a `/` matches the whole path, one
    /// without matches the file name.
    pub exes: Vec<String>,
    /// The command line, arguments joined by single spaces.
    pub cmdlines: Vec<String>,
    /// Cgroup paths, as `/proc/PID/cgroup` shows them.
    pub cgroups: Vec<String>,
    /// systemd units (`nginx.service`, `session-2.scope`).
    pub units: Vec<String>,
}

impl Patterns {
    pub fn is_empty(&self) -> bool {
        self.comms.is_empty()
            && self.exes.is_empty()
            && self.cmdlines.is_empty()
            && self.cgroups.is_empty()
            && self.units.is_empty()
    }

    /// One phrase per kind, for "watching …" lines.
    pub fn describe(&self) -> Vec<String> {
        let kinds: [(&str, &[String]); 5] = [
            ("processes named", &self.comms),
            ("executables", &self.exes),
            ("command lines", &self.cmdlines),
            ("cgroups", &self.cgroups),
            ("units", &self.units),
        ];
        kinds
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(what, v)| format!("{what} {}", v.join(", ")))
            .collect()
    }
}

/// What is known of a process when a rule is applied to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessFacts {
    pub comm: String,
    pub exe: Option<PathBuf>,
    pub cmdline: String,
    /// Every hierarchy's path (v2's `0::` line first when present).
    pub cgroups: Vec<String>,
}

impl ProcessFacts {
    pub fn read(pid: u32) -> Option<Self> {
        let comm = procfs::comm(pid)?;
        let exe = procfs::exe(pid);
        let cmdline = procfs::cmdline(pid)
            .map(|raw| cmdline_text(&raw))
            .unwrap_or_default();
        let cgroups = procfs::cgroup(pid)
            .map(|t| cgroup_paths(&t))
            .unwrap_or_default();
        Some(Self {
            comm,
            exe,
            cmdline,
            cgroups,
        })
    }

    /// The systemd unit the process runs in, if any.
    pub fn unit(&self) -> Option<&str> {
        self.cgroups.iter().find_map(|p| unit_of(p))
    }
}

/// NUL-separated arguments as one line (the kernel leaves a trailing NUL;
/// a process that rewrote its title may have none).
fn cmdline_text(raw: &[u8]) -> String {
    let args: Vec<_> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(String::from_utf8_lossy)
        .collect();
    args.join(" ")
}

/// The distinct non-root paths of `/proc/PID/cgroup`, the unified (v2)
/// hierarchy's first: on a hybrid host it is where systemd puts units.
pub fn cgroup_paths(text: &str) -> Vec<String> {
    let mut v2 = Vec::new();
    let mut v1 = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if path.is_empty() || path == "/" {
            continue;
        }
        let into = if id == "0" { &mut v2 } else { &mut v1 };
        if !into.iter().any(|p| p == path) {
            into.push(path.to_string());
        }
    }
    for p in v1 {
        if !v2.contains(&p) {
            v2.push(p);
        }
    }
    v2
}

/// The innermost systemd unit in a cgroup path: a service or a scope
/// (slices only group them).
pub fn unit_of(path: &str) -> Option<&str> {
    path.rsplit('/')
        .find(|c| c.ends_with(".service") || c.ends_with(".scope"))
}

/// Container identity found in a cgroup path, as container runtimes and
/// the kubelet name their cgroups.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Container {
    /// The container ID's first 12 hex digits (as `docker ps` shows it).
    pub id: String,
    /// The Kubernetes pod UID, when the cgroup is under `kubepods`.
    pub pod: String,
}

/// Container ID and pod UID in any of the paths: `docker-ID.scope`,
/// `cri-containerd-ID.scope`, `crio-ID.scope`, `libpod-ID.scope`,
/// `/docker/ID`, `/kubepods/burstable/podUID/ID` and the systemd-driver
/// form `kubepods-burstable-podUID.slice` (with `_` for `-`).
pub fn container_of(paths: &[String]) -> Option<Container> {
    let mut c = Container::default();
    for path in paths {
        for comp in path.split('/') {
            let stem = comp
                .strip_suffix(".scope")
                .or_else(|| comp.strip_suffix(".slice"))
                .unwrap_or(comp);
            let id = stem.rsplit(['-', ':']).next().unwrap_or(stem);
            if c.id.is_empty() && id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                c.id = id[..12].to_ascii_lowercase();
            }
            if c.pod.is_empty()
                && path.contains("kubepods")
                && let Some(i) = stem.rfind("pod")
            {
                let uid = stem[i + 3..].replace('_', "-");
                if uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
                    c.pod = uid;
                }
            }
        }
    }
    (!c.id.is_empty() || !c.pod.is_empty()).then_some(c)
}

/// Compiled [`Patterns`].
pub struct Selector {
    comms: GlobSet,
    exe_paths: GlobSet,
    exe_names: GlobSet,
    cmdlines: GlobSet,
    cgroups: GlobSet,
    units: GlobSet,
    empty: bool,
    /// Only names are matched: the kernel's exec notice has the name, so
    /// /proc need not be read for processes that do not match.
    names_only: bool,
}

/// A pattern compiled, or why it cannot be (one line, for any front end).
pub fn glob(pattern: &str) -> Result<Glob, String> {
    if pattern.is_empty() {
        return Err("empty pattern (use '*' to match anything)".into());
    }
    Glob::new(pattern).map_err(|e| e.kind().to_string())
}

fn globs<'a>(
    flag: &'static str,
    patterns: impl IntoIterator<Item = &'a String>,
) -> Result<GlobSet, SelectorError> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(glob(p).map_err(|msg| SelectorError {
            flag,
            pattern: p.clone(),
            msg,
        })?);
    }
    b.build().map_err(|e| SelectorError {
        flag,
        pattern: String::new(),
        msg: e.to_string(),
    })
}

impl Selector {
    pub fn new(p: &Patterns) -> Result<Self, SelectorError> {
        let (paths, names): (Vec<_>, Vec<_>) = p.exes.iter().partition(|e| e.contains('/'));
        Ok(Self {
            comms: globs("--comm", &p.comms)?,
            exe_paths: globs("--exe", paths)?,
            exe_names: globs("--exe", names)?,
            cmdlines: globs("--cmdline", &p.cmdlines)?,
            cgroups: globs("--cgroup", &p.cgroups)?,
            units: globs("--unit", &p.units)?,
            empty: p.is_empty(),
            names_only: p.exes.is_empty()
                && p.cmdlines.is_empty()
                && p.cgroups.is_empty()
                && p.units.is_empty(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.empty
    }

    /// Whether process `pid`, named `comm`, is selected.
    pub fn selects(&self, pid: u32, comm: &str) -> bool {
        if self.empty {
            return false;
        }
        if self.comms.is_match(comm) {
            return true;
        }
        if self.names_only {
            return false;
        }
        ProcessFacts::read(pid).is_some_and(|f| self.matches(&f))
    }

    pub fn matches(&self, f: &ProcessFacts) -> bool {
        if self.comms.is_match(&f.comm) {
            return true;
        }
        if let Some(exe) = &f.exe
            && (self.exe_paths.is_match(exe)
                || exe
                    .file_name()
                    .is_some_and(|n| self.exe_names.is_match(Path::new(n))))
        {
            return true;
        }
        if !self.cmdlines.is_empty() && self.cmdlines.is_match(&f.cmdline) {
            return true;
        }
        if f.cgroups.iter().any(|c| self.cgroups.is_match(c)) {
            return true;
        }
        f.unit().is_some_and(|u| self.units.is_match(u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(comm: &str, exe: &str, cmdline: &str, cgroup: &str) -> ProcessFacts {
        ProcessFacts {
            comm: comm.into(),
            exe: Some(exe.into()),
            cmdline: cmdline.into(),
            cgroups: cgroup_paths(cgroup),
        }
    }

    fn sel(f: impl FnOnce(&mut Patterns)) -> Selector {
        let mut p = Patterns::default();
        f(&mut p);
        Selector::new(&p).unwrap()
    }

    const HA: &str = "0::/system.slice/home-assistant.service\n";

    #[test]
    fn each_kind_selects_on_its_own() {
        let f = facts(
            "python3",
            "/usr/bin/python3.11",
            "python3 -m homeassistant --config /config",
            HA,
        );
        assert!(sel(|p| p.comms = vec!["python*".into()]).matches(&f));
        assert!(sel(|p| p.exes = vec!["python3.*".into()]).matches(&f));
        assert!(sel(|p| p.exes = vec!["/usr/bin/python3*".into()]).matches(&f));
        assert!(!sel(|p| p.exes = vec!["/usr/local/*".into()]).matches(&f));
        assert!(sel(|p| p.cmdlines = vec!["*-m homeassistant*".into()]).matches(&f));
        assert!(!sel(|p| p.cmdlines = vec!["*django*".into()]).matches(&f));
        assert!(sel(|p| p.cgroups = vec!["/system.slice/*".into()]).matches(&f));
        assert!(sel(|p| p.units = vec!["home-assistant.service".into()]).matches(&f));
        assert!(sel(|p| p.units = vec!["home-*".into()]).matches(&f));
        assert!(!sel(|p| p.units = vec!["nginx.service".into()]).matches(&f));
        assert!(!sel(|_| {}).matches(&f));
    }

    #[test]
    fn empty_selects_nothing() {
        let s = sel(|_| {});
        assert!(s.is_empty());
        assert!(!s.selects(std::process::id(), "anything"));
    }

    #[test]
    fn own_process_is_selected_by_its_facts() {
        let me = ProcessFacts::read(std::process::id()).unwrap();
        let exe = me.exe.clone().unwrap();
        let name = exe.file_name().unwrap().to_str().unwrap().to_string();
        assert!(sel(|p| p.exes = vec![name.clone()]).selects(std::process::id(), "x"));
        assert!(sel(|p| p.exes = vec![exe.display().to_string()]).selects(std::process::id(), "x"));
        assert!(!me.cmdline.contains('\0') && me.cmdline.contains(&name));
        assert!(!sel(|p| p.exes = vec!["no-such-exe".into()]).selects(std::process::id(), "x"));
    }

    #[test]
    fn bad_patterns_name_the_flag() {
        let error = |f: fn(&mut Patterns)| {
            let mut p = Patterns::default();
            f(&mut p);
            Selector::new(&p).err().unwrap().to_string()
        };
        let e = error(|p| p.units = vec!["[".into()]);
        assert!(e.contains("--unit") && e.contains("\"[\""), "{e}");
        let e = error(|p| p.exes = vec!["".into()]);
        assert!(e.contains("--exe") && e.contains("empty"), "{e}");
    }

    #[test]
    fn cgroup_lines() {
        let t = "12:memory:/docker/abc\n1:name=systemd:/system.slice/x.service\n0::/system.slice/x.service\n3:cpu:/\n";
        assert_eq!(cgroup_paths(t), ["/system.slice/x.service", "/docker/abc"]);
        assert_eq!(cgroup_paths("garbage\n0::\n::\n"), Vec::<String>::new());
        assert_eq!(
            unit_of("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service"),
            Some("foo.service")
        );
        assert_eq!(
            unit_of("/user.slice/user-1000.slice/session-3.scope"),
            Some("session-3.scope")
        );
        assert_eq!(unit_of("/kubepods.slice"), None);
    }

    #[test]
    fn containers_and_pods() {
        let id = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let c = |p: &str| container_of(&[p.to_string()]);
        assert_eq!(
            c(&format!("/system.slice/docker-{id}.scope")).unwrap().id,
            "0123456789ab"
        );
        assert_eq!(c(&format!("/docker/{id}")).unwrap().id, "0123456789ab");
        assert_eq!(
            c(&format!("/machine.slice/libpod-{id}.scope/container"))
                .unwrap()
                .id,
            "0123456789ab"
        );
        let k = c(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1a2b3c4d_0000_1111_2222_333344445555.slice/cri-containerd-{id}.scope"
        ))
        .unwrap();
        assert_eq!(k.id, "0123456789ab");
        assert_eq!(k.pod, "1a2b3c4d-0000-1111-2222-333344445555");
        let k = c(&format!(
            "/kubepods/besteffort/pod1a2b3c4d-0000-1111-2222-333344445555/{id}"
        ))
        .unwrap();
        assert_eq!((k.id.as_str(), k.pod.len()), ("0123456789ab", 36));
        assert_eq!(c("/system.slice/nginx.service"), None);
        assert_eq!(c("/user.slice/pod-not-kube"), None);
    }

    #[test]
    fn cmdline_joins_arguments() {
        assert_eq!(cmdline_text(b"python3\0-m\0app\0"), "python3 -m app");
        assert_eq!(
            cmdline_text(b"nginx: worker process"),
            "nginx: worker process"
        );
        assert_eq!(cmdline_text(b""), "");
    }
}
