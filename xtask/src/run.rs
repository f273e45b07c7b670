//! Running commands: where things are, and errors that say what failed.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Command, ExitCode, ExitStatus};

use anyhow::{Context as _, bail};

/// The workspace root (xtask lives one level below it).
pub fn root_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// `$CARGO_HOME`, else `~/.cargo`.
pub fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".cargo")))
}

pub fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Make `~/.cargo/bin` (bpf-linker, rustup's proxies) visible to every
/// child process, whatever PATH `sudo` left us.
pub fn put_cargo_bin_on_path() {
    let Some(bin) = cargo_home().map(|h| h.join("bin")) else {
        return;
    };
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|p| p == bin) {
        return;
    }
    let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
        .expect("PATH entries contain no ':'");
    // SAFETY: called first thing in main, before any other thread exists.
    unsafe { std::env::set_var("PATH", joined) };
}

/// The cargo that runs us (`$CARGO`), so nested builds use the same toolchain.
pub fn cargo_path() -> PathBuf {
    std::env::var_os("CARGO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("cargo"))
}

/// Run `cargo <args>` in the workspace root, inheriting stdio.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new(cargo_path());
    cmd.args(args).current_dir(root_dir());
    check(&mut cmd)
}

/// Run a command inheriting stdio; an error names it when it fails.
pub fn check(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({})", display(cmd), describe(status));
    }
    Ok(())
}

/// Run a command and capture its stdout; `None` when it cannot run or fails.
pub fn output_of<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Option<String> {
    stdout_of(Command::new(program).args(args))
}

/// Run a prepared command and capture its stdout; `None` when it cannot run
/// or fails.
pub fn stdout_of(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(std::process::Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

/// A child's exit status as our own exit code (128 + signal when killed).
pub fn status_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(code.clamp(0, 255) as u8)
}
