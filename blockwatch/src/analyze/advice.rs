//! What to do instead of a blocking call: one sentence per event, chosen
//! from the runtime (Python, tokio, Node), the wait's class and syscall
//! and the names in its stack. The rules are the README's "Fix advice"
//! table; keep the two in step.
//!
//! A pure function of the event's facts, so every rule is tested with a
//! frame list and nothing here reads the process.

use crate::event::{Class, Frame, FrameKind, OffState};
use crate::text::basename;

/// The runtime whose event loop was blocked, told from the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Python,
    Tokio,
    Node,
    Unknown,
}

/// Says which runtime `stack` of thread `thread` belongs to: CPython
/// frames or an interpreter binary, a tokio frame or worker name (a stack
/// cut short, as when its process exited before it was unwound, still
/// comes from a worker named by tokio), or Node's binary or V8's frames.
pub fn runtime(stack: &[Frame], thread: &str) -> Runtime {
    if stack.iter().any(|f| {
        f.kind == FrameKind::Python
            || module(f).starts_with("python")
            || module(f).starts_with("libpython")
    }) {
        Runtime::Python
    } else if stack.iter().any(|f| function(f).contains("tokio::"))
        || thread.starts_with("tokio-runtime-w")
        || thread.starts_with("tokio-rt-worker")
    {
        Runtime::Tokio
    } else if stack.iter().any(|f| {
        let m = module(f);
        m == "node" || m.starts_with("libnode") || function(f).starts_with("node::")
    }) {
        Runtime::Node
    } else {
        Runtime::Unknown
    }
}

fn module(f: &Frame) -> &str {
    basename(f.module.as_deref().unwrap_or(""))
}

fn function(f: &Frame) -> &str {
    f.function.as_deref().unwrap_or("")
}

/// The advice for a wait of `class` in `syscall` with `stack` (innermost
/// frame first) of thread `thread`. Never empty: an unknown case says so
/// plainly.
/// A thread preempted outside any syscall (`state`) was not blocked by its
/// code: it waited for a CPU, and no change to a call would help.
pub fn advise(
    class: Class,
    syscall: Option<&str>,
    state: OffState,
    stack: &[Frame],
    thread: &str,
) -> String {
    if state == OffState::Preempted && syscall.is_none() {
        return PREEMPTED.to_string();
    }
    let found = match runtime(stack, thread) {
        Runtime::Python => python(class, stack),
        Runtime::Tokio => tokio(class, stack),
        Runtime::Node => node(class, stack),
        Runtime::Unknown => None,
    };
    found
        .map(str::to_string)
        .unwrap_or_else(|| unknown(class, syscall))
}

const PREEMPTED: &str = "nothing to fix in the code: the loop thread was ready to run but waited for a CPU (an overloaded host, or a cgroup CPU limit); give the service more CPU or fewer neighbours";

fn unknown(class: Class, syscall: Option<&str>) -> String {
    let what = match (class, syscall) {
        (Class::Stall, _) => "CPU work".to_string(),
        (_, Some(s)) => format!("blocking {class} call ({s})"),
        (_, None) => format!("blocking {class} wait"),
    };
    format!("no specific advice: move the {what} off the event loop")
}

/// Whether any frame's function, file or module holds `needle`.
fn mentions(stack: &[Frame], needle: &str) -> bool {
    stack.iter().any(|f| {
        [&f.function, &f.file, &f.module]
            .into_iter()
            .flatten()
            .any(|s| s.contains(needle))
    })
}

/// A Python frame of `file` (a path suffix) in `function`, or any
/// function when `function` is empty.
fn python_frame(stack: &[Frame], file: &str, function: &str) -> bool {
    stack.iter().any(|f| {
        f.kind == FrameKind::Python
            && f.file.as_deref().is_some_and(|p| p.ends_with(file))
            && (function.is_empty() || f.function.as_deref() == Some(function))
    })
}

const PY_SLEEP: &str = "use `await asyncio.sleep(...)` instead of `time.sleep(...)`";
const PY_HTTP: &str =
    "use an async HTTP client (aiohttp, or httpx.AsyncClient) instead of requests/urllib";
const PY_SUBPROCESS: &str =
    "use `await asyncio.create_subprocess_exec(...)` instead of subprocess.run/check_output";
const PY_ONCE: &str =
    "do it once at start-up, or in an executor (`await asyncio.to_thread(...)`), not on every call";
const PY_FILE: &str = "do file I/O in a thread: `await asyncio.to_thread(...)` or `await loop.run_in_executor(None, ...)`, or use aiofiles";
const PY_GIL: &str = "another thread holds the GIL: move the CPU work to a process pool (`loop.run_in_executor(ProcessPoolExecutor(), ...)`)";
const PY_LOCK: &str = "use asyncio.Lock/asyncio.Event, or wait for the threading lock in `await asyncio.to_thread(...)`";
const PY_NET: &str = "use asyncio streams or an async client library instead of blocking sockets";
const PY_STALL: &str = "CPU work on the loop: move it to a process pool (`loop.run_in_executor(ProcessPoolExecutor(), ...)`)";

fn python(class: Class, stack: &[Frame]) -> Option<&'static str> {
    // The library that made the call says more than the syscall does.
    if python_frame(stack, "ssl.py", "") || mentions(stack, "create_default_context") {
        return Some(PY_ONCE);
    }
    if mentions(stack, "importlib") || mentions(stack, "import_module") {
        return Some(PY_ONCE);
    }
    if python_frame(stack, "subprocess.py", "") {
        return Some(PY_SUBPROCESS);
    }
    if [
        "/requests/",
        "/urllib3/",
        "urllib/request.py",
        "http/client.py",
    ]
    .iter()
    .any(|p| {
        stack.iter().any(|f| {
            f.kind == FrameKind::Python && f.file.as_deref().is_some_and(|file| file.contains(p))
        })
    }) {
        return Some(PY_HTTP);
    }
    if python_frame(stack, "time.py", "sleep") || mentions(stack, "time_sleep") {
        return Some(PY_SLEEP);
    }
    Some(match class {
        Class::Sleep => PY_SLEEP,
        Class::File | Class::Stat => PY_FILE,
        Class::Gil => PY_GIL,
        Class::Lock => PY_LOCK,
        Class::Net => PY_NET,
        Class::Process => PY_SUBPROCESS,
        Class::Stall => PY_STALL,
        Class::Other => return None,
    })
}

const RS_SLEEP: &str = "use `tokio::time::sleep(...).await` instead of `std::thread::sleep`";
const RS_FILE: &str = "use tokio::fs, or run the std::fs calls in `tokio::task::spawn_blocking`";
const RS_LOCK: &str = "use tokio::sync (Mutex, RwLock, Notify) instead of a blocking lock, or take it in `spawn_blocking`";
const RS_NET: &str = "use tokio::net instead of std::net";
const RS_PROCESS: &str = "use tokio::process::Command instead of std::process::Command";
const RS_STALL: &str =
    "CPU work on a runtime worker: move it to `tokio::task::spawn_blocking` or a rayon pool";

fn tokio(class: Class, stack: &[Frame]) -> Option<&'static str> {
    if mentions(stack, "std::thread::sleep") {
        return Some(RS_SLEEP);
    }
    if mentions(stack, "std::fs::") {
        return Some(RS_FILE);
    }
    if mentions(stack, "std::process::") {
        return Some(RS_PROCESS);
    }
    if mentions(stack, "std::net::") {
        return Some(RS_NET);
    }
    Some(match class {
        Class::Sleep => RS_SLEEP,
        Class::File | Class::Stat => RS_FILE,
        Class::Lock | Class::Gil => RS_LOCK,
        Class::Net => RS_NET,
        Class::Process => RS_PROCESS,
        Class::Stall => RS_STALL,
        Class::Other => return None,
    })
}

const JS_EXEC: &str =
    "use `child_process.exec`/`spawn` (or util.promisify(exec)) instead of execSync/spawnSync";
const JS_FS: &str =
    "use the promise forms (`await fs.promises.readFile(...)`) instead of fs.*Sync calls";
const JS_ATOMICS: &str =
    "use `await Atomics.waitAsync(...).value` instead of Atomics.wait on the main thread";
const JS_STALL: &str = "CPU work on the loop: move it to a worker thread (worker_threads)";

fn node(class: Class, stack: &[Frame]) -> Option<&'static str> {
    let js = |needle: &str| mentions(stack, needle);
    // Named by V8's perf map (JS) or by Node's own C++ frames.
    if js("execSync")
        || js("execFileSync")
        || js("spawnSync")
        || js("SyncProcessRunner")
        || class == Class::Process
    {
        return Some(JS_EXEC);
    }
    if js("Atomics") || js("AtomicsWait") {
        return Some(JS_ATOMICS);
    }
    let fs_sync = stack.iter().any(|f| {
        f.function.as_deref().is_some_and(|n| {
            n.split(|c: char| !c.is_alphanumeric())
                .any(|w| w.len() > 4 && w.ends_with("Sync") && w != "execSync")
        })
    });
    if fs_sync || js("node::fs::") || matches!(class, Class::File | Class::Stat) {
        return Some(JS_FS);
    }
    match class {
        Class::Stall => Some(JS_STALL),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The advice for a thread that slept in the call (most cases).
    fn advise(class: Class, syscall: Option<&str>, stack: &[Frame]) -> String {
        super::advise(class, syscall, OffState::Sleeping, stack, "")
    }

    fn py(function: &str, file: &str) -> Frame {
        Frame {
            function: Some(function.into()),
            file: Some(file.into()),
            kind: FrameKind::Python,
            ..Frame::default()
        }
    }

    fn native(function: &str, module: &str) -> Frame {
        Frame {
            function: Some(function.into()),
            module: Some(module.into()),
            ..Frame::default()
        }
    }

    const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";

    #[test]
    fn a_preemption_outside_a_call_is_not_the_codes_fault() {
        let stack = [py("handler", "/srv/app.py")];
        let advice = super::advise(Class::Other, None, OffState::Preempted, &stack, "");
        assert_eq!(advice, PREEMPTED);
        assert!(advice.contains("CPU"));
        // Preempted inside a call: the call's advice still applies.
        let stack = [native("read", LIBC), py("load", "/srv/app.py")];
        assert_eq!(
            super::advise(Class::File, Some("read"), OffState::Preempted, &stack, ""),
            PY_FILE
        );
    }

    #[test]
    fn python_sleep_file_and_gil() {
        let stack = [
            native("clock_nanosleep", LIBC),
            native("time_sleep", "/usr/bin/python3.12"),
            py("handler", "/srv/app.py"),
        ];
        assert_eq!(
            advise(Class::Sleep, Some("clock_nanosleep"), &stack),
            PY_SLEEP
        );
        let stack = [native("read", LIBC), py("load", "/srv/app.py")];
        assert_eq!(advise(Class::File, Some("read"), &stack), PY_FILE);
        assert!(PY_FILE.contains("asyncio.to_thread") && PY_FILE.contains("aiofiles"));
        assert_eq!(advise(Class::Gil, Some("futex"), &stack), PY_GIL);
        assert!(PY_GIL.contains("process pool"));
    }

    #[test]
    fn python_libraries_decide_before_the_syscall() {
        let http = [
            native("recv", LIBC),
            py("_read_status", "/usr/lib/python3.12/http/client.py"),
            py(
                "send",
                "/srv/venv/lib/python3.12/site-packages/requests/sessions.py",
            ),
            py("fetch", "/srv/app.py"),
        ];
        assert_eq!(advise(Class::Net, Some("recvfrom"), &http), PY_HTTP);
        let sub = [
            native("wait4", LIBC),
            py("_wait", "/usr/lib/python3.12/subprocess.py"),
            py("run", "/usr/lib/python3.12/subprocess.py"),
        ];
        assert_eq!(advise(Class::Process, Some("wait4"), &sub), PY_SUBPROCESS);
        assert!(PY_SUBPROCESS.contains("asyncio.create_subprocess_exec"));
        let ssl = [
            native("read", LIBC),
            py("create_default_context", "/usr/lib/python3.12/ssl.py"),
        ];
        assert_eq!(advise(Class::File, Some("read"), &ssl), PY_ONCE);
        let import = [
            native("openat", LIBC),
            py("import_module", "/usr/lib/python3.12/importlib/__init__.py"),
        ];
        assert_eq!(advise(Class::File, Some("openat"), &import), PY_ONCE);
    }

    #[test]
    fn tokio_rules() {
        let tokio_frame = native("tokio::runtime::task::harness::poll", "/srv/svc");
        let sleep = [
            native("clock_nanosleep", LIBC),
            native("std::thread::sleep", "/srv/svc"),
            native("svc::handler", "/srv/svc"),
            tokio_frame.clone(),
        ];
        assert_eq!(runtime(&sleep, ""), Runtime::Tokio);
        assert_eq!(
            advise(Class::Sleep, Some("clock_nanosleep"), &sleep),
            RS_SLEEP
        );
        let fs = [
            native("fsync", LIBC),
            native("std::fs::File::sync_all", "/srv/svc"),
            tokio_frame.clone(),
        ];
        assert_eq!(advise(Class::File, Some("fsync"), &fs), RS_FILE);
        // A stack cut short (no tokio frame) on a worker tokio named.
        let short = [native("fsync", LIBC)];
        assert_eq!(runtime(&short, "tokio-rt-worker"), Runtime::Tokio);
        assert_eq!(runtime(&short, "tokio-runtime-w"), Runtime::Tokio);
        assert_eq!(
            super::advise(
                Class::File,
                Some("fsync"),
                OffState::Disk,
                &short,
                "tokio-rt-worker"
            ),
            RS_FILE
        );
        assert!(RS_FILE.contains("tokio::fs") && RS_FILE.contains("spawn_blocking"));
        let lock = [native("syscall", LIBC), tokio_frame];
        assert_eq!(advise(Class::Lock, Some("futex"), &lock), RS_LOCK);
        assert!(RS_LOCK.contains("tokio::sync"));
    }

    #[test]
    fn node_rules() {
        let exec = [
            native("epoll_wait", LIBC),
            native("uv_run", "/usr/bin/node"),
            native(
                "node::SyncProcessRunner::TryInitializeAndRunLoop",
                "/usr/bin/node",
            ),
        ];
        assert_eq!(runtime(&exec, ""), Runtime::Node);
        assert_eq!(advise(Class::Other, Some("epoll_wait"), &exec), JS_EXEC);
        let read = [
            native("read", LIBC),
            native("node::fs::Read", "/usr/bin/node"),
            native("JS:~readFileSync node:fs:441", "[anon]"),
        ];
        assert_eq!(advise(Class::File, Some("read"), &read), JS_FS);
        let wait = [
            native("syscall", LIBC),
            native("v8::internal::FutexEmulation::WaitSync", "/usr/bin/node"),
            native("Builtins_AtomicsWait", "/usr/bin/node"),
        ];
        assert_eq!(advise(Class::Lock, Some("futex"), &wait), JS_ATOMICS);
    }

    #[test]
    fn unknown_cases_say_so() {
        let stack = [native("read", LIBC), native("main", "/srv/c-app")];
        assert_eq!(runtime(&stack, ""), Runtime::Unknown);
        assert_eq!(
            advise(Class::File, Some("read"), &stack),
            "no specific advice: move the blocking file call (read) off the event loop"
        );
        let py_other = [native("ioctl", LIBC), py("poke", "/srv/app.py")];
        assert_eq!(
            advise(Class::Other, Some("ioctl"), &py_other),
            "no specific advice: move the blocking other call (ioctl) off the event loop"
        );
        assert_eq!(
            advise(Class::Stall, None, &[]),
            "no specific advice: move the CPU work off the event loop"
        );
    }
}
