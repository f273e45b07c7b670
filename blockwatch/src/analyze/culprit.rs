//! Who is to blame for a blocking call: the innermost frame of the stack
//! that is the application's own code rather than the C library, an
//! interpreter, or a runtime the application builds on. Those are where
//! every blocking call ends up, so naming them would say nothing.

use crate::event::{Frame, FrameKind};
use crate::text::basename;

/// Something a frame is recognised by as not being the application.
#[derive(Clone, Copy, Debug)]
enum Rule {
    /// A shared library by the stem of its file name: `libc` matches
    /// `libc.so.6`, `libc-2.31.so` and `libc.musl-x86_64.so.1`, not
    /// `libcrypto.so.3`.
    Library(&'static str),
    /// A module whose file name starts with this (`python3` matches
    /// `python3.11`).
    ModulePrefix(&'static str),
    /// A module whose file name is exactly this.
    ModuleName(&'static str),
    /// A module whose path contains this.
    ModulePath(&'static str),
    /// A function whose demangled name starts with this.
    FunctionPrefix(&'static str),
    /// A C API prefix: followed by `_` or an upper-case letter, so `Py`
    /// matches `PyObject_Call` and `Py_Main` but not `PythonBridge`.
    ApiPrefix(&'static str),
    /// Python source in the interpreter's standard library
    /// (`…/lib/python3.X/…` outside site-packages/dist-packages) or frozen
    /// into it (`<frozen importlib._bootstrap>`): asyncio's own frames are
    /// where every coroutine's call passes, never what a user fixes.
    PythonStdlib,
    /// Functions of a Rust crate, and its trait impls (`<crate::Type as
    /// Trait>::f`, and v0-demangled inherent impls `<crate::Type>::f`).
    RustCrate(&'static str),
    /// Rust's standard library inlined into the application: debug info
    /// names such a frame by its source, which official toolchains remap
    /// to `/rustc/<commit>/library/…` (a local one leaves its
    /// `lib/rustlib/src/rust/library/…`), and often without a path in its
    /// function name (`black_box<u64>`) for `RustCrate` to see.
    RustStdSource,
    /// JavaScript of Node's own library, as perf maps name it: the source
    /// location, last, is a `node:` module (`JS:~spawnSync
    /// node:internal/child_process:1108:19`).
    NodeLibraryJs,
}

/// Not the application, by whose code it is. Add to a group when a
/// runtime's frames show up as culprits.
const NOT_APPLICATION: &[&[Rule]] = &[C_RUNTIME, CPYTHON, NODE, RUST_RUNTIME];

/// The interpreters among them: their native code is the machinery that
/// runs the Python or JavaScript of a stack ([`is_interpreter_machinery`]).
const INTERPRETERS: &[&[Rule]] = &[CPYTHON, NODE];

const C_RUNTIME: &[Rule] = &[
    Rule::Library("libc"),
    // The kernel's vDSO: clock_gettime of a loop checking the time.
    Rule::ModuleName("[vdso]"),
    // `ld` covers ld-linux-x86-64.so.2, ld-2.31.so and ld-musl-*.so.1.
    Rule::Library("ld"),
    Rule::Library("libpthread"),
    Rule::Library("libm"),
    Rule::Library("libdl"),
    Rule::Library("librt"),
    Rule::Library("libgcc_s"),
    Rule::Library("libstdc++"),
    Rule::FunctionPrefix("_start"),
    Rule::FunctionPrefix("__libc_start"),
    Rule::FunctionPrefix("start_thread"),
    Rule::FunctionPrefix("clone3"),
];

const CPYTHON: &[Rule] = &[
    // CPython: the interpreter, linked in or shared, and its own extension
    // modules (`_socket`, `select`, ... in lib-dynload).
    Rule::ModulePrefix("python3"),
    Rule::ModulePrefix("libpython"),
    Rule::ModulePath("/lib-dynload/"),
    Rule::ApiPrefix("_Py"),
    Rule::ApiPrefix("Py"),
    Rule::PythonStdlib,
];

const NODE: &[Rule] = &[
    // Node: V8, libuv and Node's own C++, in the node binary or, as Debian
    // builds it, in libnode.
    Rule::ModuleName("node"),
    Rule::Library("libnode"),
    Rule::Library("libuv"),
    Rule::FunctionPrefix("uv_"),
    Rule::FunctionPrefix("uv__"),
    Rule::FunctionPrefix("v8::"),
    Rule::FunctionPrefix("node::"),
    Rule::FunctionPrefix("Builtins_"),
    Rule::NodeLibraryJs,
];

const RUST_RUNTIME: &[Rule] = &[
    // Rust: the standard library and the async runtime stack.
    Rule::RustCrate("std"),
    Rule::RustCrate("core"),
    Rule::RustCrate("alloc"),
    Rule::RustCrate("tokio"),
    Rule::RustCrate("futures"),
    Rule::RustCrate("futures_util"),
    Rule::RustCrate("futures_core"),
    Rule::RustCrate("futures_executor"),
    Rule::RustCrate("mio"),
    Rule::RustCrate("parking_lot"),
    Rule::RustCrate("parking_lot_core"),
    Rule::FunctionPrefix("__rust"),
    Rule::FunctionPrefix("rust_begin_unwind"),
    Rule::RustStdSource,
];

impl Rule {
    fn matches(self, function: &str, module: Option<&str>, file: Option<&str>) -> bool {
        match self {
            Rule::Library(stem) => module.is_some_and(|m| {
                basename(m)
                    .strip_prefix(stem)
                    .is_some_and(|rest| rest.starts_with(['.', '-']))
            }),
            Rule::ModulePrefix(prefix) => module.is_some_and(|m| basename(m).starts_with(prefix)),
            Rule::ModuleName(name) => module.is_some_and(|m| basename(m) == name),
            Rule::ModulePath(part) => module.is_some_and(|m| m.contains(part)),
            Rule::FunctionPrefix(prefix) => function.starts_with(prefix),
            Rule::ApiPrefix(prefix) => function
                .strip_prefix(prefix)
                .and_then(|rest| rest.chars().next())
                .is_some_and(|c| c == '_' || c.is_ascii_uppercase()),
            Rule::PythonStdlib => module.is_some_and(is_python_stdlib),
            Rule::NodeLibraryJs => function
                .rsplit(' ')
                .next()
                .is_some_and(|at| at.starts_with("node:") && !at.starts_with("node::")),
            Rule::RustStdSource => file.is_some_and(|f| {
                (f.starts_with("/rustc/") && f.contains("/library/"))
                    || f.contains("/lib/rustlib/src/rust/library/")
            }),
            Rule::RustCrate(krate) => function
                .strip_prefix('<')
                .unwrap_or(function)
                .strip_prefix(krate)
                .is_some_and(|rest| rest.starts_with("::")),
        }
    }
}

fn is_python_stdlib(path: &str) -> bool {
    if path.starts_with("<frozen ") {
        return true;
    }
    let Some(at) = path.find("/lib/python3") else {
        return false;
    };
    let rest = &path[at..];
    !(rest.contains("/site-packages/") || rest.contains("/dist-packages/"))
}

/// Whether `frame` is the application's code. Frames without a function
/// name are not: nothing useful can be said of them.
pub fn is_application(frame: &Frame) -> bool {
    let Some(function) = frame.function.as_deref() else {
        return false;
    };
    let module = frame.module.as_deref();
    let file = frame.file.as_deref();
    !NOT_APPLICATION
        .iter()
        .copied()
        .flatten()
        .any(|r| r.matches(function, module, file))
}

/// How V8 names JavaScript functions in perf maps (`JS:~handler
/// /srv/app.js:12:3` since V8 11, `LazyCompile:*handler …` before), as
/// opposed to its builtins and stubs.
const JS_NAME_PREFIXES: &[&str] = &[
    "JS:",
    "LazyCompile:",
    "Function:",
    "InterpretedFunction:",
    "Script:",
    "Eval:",
];

/// Whether `frame` is code an interpreter runs: a Python frame, or a
/// JavaScript function named by V8's perf map. These are the frames a user
/// reads and changes in an interpreted program's stack.
pub fn is_interpreted(frame: &Frame) -> bool {
    frame.kind == FrameKind::Python
        || frame
            .function
            .as_deref()
            .is_some_and(|f| JS_NAME_PREFIXES.iter().any(|p| f.starts_with(p)))
}

/// Whether `frame` is an interpreter's own native code, the machinery
/// that runs the interpreted frames: CPython's evaluation loop, call paths
/// and built-in modules (`time_sleep` in libpython, `_asyncio`), or Node's
/// V8, libuv and builtins. Unnamed frames count by their module. The C
/// library, C extensions and the application's own native code do not.
pub fn is_interpreter_machinery(frame: &Frame) -> bool {
    if is_interpreted(frame) {
        return false;
    }
    let function = frame.function.as_deref().unwrap_or_default();
    let module = frame.module.as_deref();
    INTERPRETERS
        .iter()
        .copied()
        .flatten()
        .any(|r| r.matches(function, module, None))
}

/// The innermost frame (frames are innermost first) that belongs to the
/// application.
pub fn culprit(frames: &[Frame]) -> Option<Frame> {
    frames.iter().find(|f| is_application(f)).cloned()
}

/// Code installed as a package rather than written by the user: what
/// `pip`/`apt` put in site-packages or dist-packages (requests, aiohttp,
/// an integration's dependencies) and what `npm` put in node_modules. A
/// perf map names a JavaScript function by its source location, so its
/// name is checked as well as its module.
pub fn is_third_party(frame: &Frame) -> bool {
    let installed = |s: &str| {
        s.contains("/site-packages/")
            || s.contains("/dist-packages/")
            || s.contains("/node_modules/")
    };
    frame.module.as_deref().is_some_and(installed)
        || frame.function.as_deref().is_some_and(installed)
}

/// Libraries the system or a runtime brings, by file name wherever they
/// are installed: the application calls them, their own frames are not
/// what a user edits.
const SYSTEM_LIBRARIES: &[&str] = &[
    "libsqlite3",
    "libssl",
    "libcrypto",
    "libz",
    "libffi",
    "libbz2",
    "liblzma",
    "libexpat",
    "libuuid",
    "libgdbm",
    "libreadline",
    "libncursesw",
    "libtinfo",
    "libmpdec",
];

/// Directories the system's shared libraries live in.
const LIBRARY_DIRS: &[&str] = &[
    "/lib/",
    "/lib64/",
    "/usr/lib/",
    "/usr/lib64/",
    "/usr/local/lib/",
];

/// A shared library of the system rather than the application's own
/// binary: any shared object under a library directory (libsqlite3,
/// libcrypto, a `.so` an `apt install` brought), or one of
/// [`SYSTEM_LIBRARIES`] wherever it lies.
pub fn is_system_library(frame: &Frame) -> bool {
    let Some(module) = frame.module.as_deref() else {
        return false;
    };
    let name = basename(module);
    let shared = name.ends_with(".so") || name.contains(".so.");
    (shared && LIBRARY_DIRS.iter().any(|dir| module.starts_with(dir)))
        || SYSTEM_LIBRARIES
            .iter()
            .any(|&stem| Rule::Library(stem).matches("", Some(module), None))
}

/// The innermost frame of the user's own code: the application minus
/// installed packages and system libraries. When the culprit lies in a
/// library (`requests` calling `poll`, libsqlite3 syncing a commit), this
/// is the line that called the library, the one a user can change (Home
/// Assistant's "integration frame"); otherwise it is the culprit itself.
/// A stack with no such frame (its interpreter frames unread) falls back
/// to the innermost system library the application called, which says
/// more than nothing; installed packages never stand in for the user.
pub fn offender(frames: &[Frame]) -> Option<Frame> {
    let candidates = || {
        frames
            .iter()
            .filter(|f| is_application(f) && !is_third_party(f))
    };
    candidates()
        .find(|f| !is_system_library(f))
        .or_else(|| candidates().next())
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offender_is_the_users_line_above_a_library() {
        let stack = [
            frame(Some("__poll"), Some("/usr/lib/x86_64-linux-gnu/libc.so.6")),
            frame(Some("sock_recv"), Some("/usr/lib/python3.11/socket.py")),
            frame(
                Some("send"),
                Some("/srv/venv/lib/python3.11/site-packages/requests/adapters.py"),
            ),
            frame(
                Some("get"),
                Some("/usr/lib/python3/dist-packages/requests/api.py"),
            ),
            frame(Some("refresh"), Some("/srv/app/report.py")),
            frame(Some("run"), Some("/usr/lib/python3.11/asyncio/events.py")),
        ];
        assert_eq!(culprit(&stack).unwrap().function.as_deref(), Some("send"));
        assert_eq!(
            offender(&stack).unwrap().function.as_deref(),
            Some("refresh")
        );
        // The user's own call: both name it.
        assert_eq!(offender(&stack[4..]), culprit(&stack[4..]));
        // Only library code: no line of the user's to name.
        assert_eq!(offender(&stack[..4]), None);
        assert!(culprit(&stack[..4]).is_some());
    }

    #[test]
    fn system_libraries_are_never_the_offender_beside_user_code() {
        let sqlite = [
            frame(
                Some("fdatasync"),
                Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            ),
            frame(
                Some("sqlite3PagerCommitPhaseOne"),
                Some("/usr/lib/x86_64-linux-gnu/libsqlite3.so.0.8.6"),
            ),
            frame(
                Some("pysqlite_connection_commit"),
                Some("/usr/lib/python3.11/lib-dynload/_sqlite3.cpython-311-x86_64-linux-gnu.so"),
            ),
            frame(
                Some("_PyEval_EvalFrameDefault"),
                Some("/usr/bin/python3.11"),
            ),
            frame(Some("save"), Some("/srv/app/store.py")),
            frame(Some("run"), Some("/usr/lib/python3.11/asyncio/events.py")),
        ];
        // The culprit keeps its meaning: the innermost application-side frame.
        assert_eq!(
            culprit(&sqlite).unwrap().function.as_deref(),
            Some("sqlite3PagerCommitPhaseOne")
        );
        assert_eq!(offender(&sqlite).unwrap().function.as_deref(), Some("save"));

        let crypto = [
            frame(
                Some("CRYPTO_strndup"),
                Some("/usr/lib/x86_64-linux-gnu/libcrypto.so.3"),
            ),
            frame(
                Some("SSL_CTX_new_ex"),
                Some("/usr/lib/x86_64-linux-gnu/libssl.so.3"),
            ),
            frame(Some("connect"), Some("/srv/app/client.py")),
        ];
        assert_eq!(
            offender(&crypto).unwrap().function.as_deref(),
            Some("connect")
        );

        // Bundled elsewhere (a pyenv build, a vendored copy): by name.
        for m in [
            "/root/.pyenv/versions/3.12.1/lib/libsqlite3.so.0",
            "/opt/vendor/libssl.so.3",
            "/opt/vendor/libz.so.1",
        ] {
            assert!(is_system_library(&frame(Some("f"), Some(m))), "{m}");
        }
        for m in [
            "/usr/local/lib/libmine.so",
            "/usr/lib64/libfoo.so.2",
            "/lib/x86_64-linux-gnu/libkeyutils.so.1",
        ] {
            assert!(is_system_library(&frame(Some("f"), Some(m))), "{m}");
        }
        // The application's own binary and sources are not.
        for m in [
            "/opt/app/bin/server",
            "/srv/app/store.py",
            "/usr/local/bin/app",
        ] {
            assert!(!is_system_library(&frame(Some("f"), Some(m))), "{m}");
        }
    }

    #[test]
    fn a_system_library_stands_in_when_no_user_frame_exists() {
        let stack = [
            frame(
                Some("fdatasync"),
                Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            ),
            frame(
                Some("sqlite3PagerCommitPhaseOne"),
                Some("/usr/lib/x86_64-linux-gnu/libsqlite3.so.0"),
            ),
            frame(
                Some("_PyEval_EvalFrameDefault"),
                Some("/usr/bin/python3.11"),
            ),
        ];
        assert_eq!(
            offender(&stack).unwrap().function.as_deref(),
            Some("sqlite3PagerCommitPhaseOne")
        );
    }

    #[test]
    fn node_modules_are_third_party() {
        let stack = [
            frame(Some("Builtins_CallFunction"), Some("/usr/bin/node")),
            frame(
                Some("JS:*readConfig /srv/app/node_modules/conf/index.js:10:3"),
                Some("[anon]"),
            ),
            frame(
                Some("JS:~handleLogin /srv/app/server.js:40:22"),
                Some("[anon]"),
            ),
        ];
        assert_eq!(
            culprit(&stack).unwrap().function.as_deref(),
            Some("JS:*readConfig /srv/app/node_modules/conf/index.js:10:3")
        );
        assert_eq!(
            offender(&stack).unwrap().function.as_deref(),
            Some("JS:~handleLogin /srv/app/server.js:40:22")
        );
    }

    #[test]
    fn the_vdso_is_never_the_culprit() {
        let stack = [
            frame(Some("__vdso_clock_gettime"), Some("[vdso]")),
            frame(Some("app::busy"), Some("/srv/app")),
        ];
        assert_eq!(
            culprit(&stack).and_then(|f| f.function).as_deref(),
            Some("app::busy")
        );
    }

    #[test]
    fn python_stdlib_is_not_the_application() {
        for path in [
            "/usr/lib/python3.11/asyncio/events.py",
            "/root/.pyenv/versions/3.12.1/lib/python3.12/subprocess.py",
            "<frozen importlib._bootstrap>",
        ] {
            assert!(!is_application(&frame(Some("run"), Some(path))), "{path}");
        }
        for path in [
            "/srv/app/handlers.py",
            "/usr/lib/python3/dist-packages/requests/api.py",
            "/root/.pyenv/versions/3.12.1/lib/python3.12/site-packages/aiohttp/web.py",
        ] {
            assert!(is_application(&frame(Some("get"), Some(path))), "{path}");
        }
    }

    fn frame(function: Option<&str>, module: Option<&str>) -> Frame {
        Frame {
            function: function.map(str::to_string),
            module: module.map(str::to_string),
            ..Frame::default()
        }
    }

    fn app(function: &str, module: &str) -> bool {
        is_application(&frame(Some(function), Some(module)))
    }

    /// A Rust build with line-tables-only debug info: std inlined into the
    /// handler is named by its source alone; the handler is the culprit.
    #[test]
    fn rust_std_inlined_with_minimal_debug_info_is_not_the_application() {
        let at = |function: &str, file: &str, inlined: bool| Frame {
            function: Some(function.to_string()),
            module: Some("/srv/bin/api".to_string()),
            file: Some(file.to_string()),
            inlined,
            ..Frame::default()
        };
        let frames = [
            at(
                "black_box<u64>",
                "/rustc/59807616e1fa2540724bfbac14d7976d7e4a3860/library/core/src/hint.rs",
                true,
            ),
            at(
                "now",
                "/root/.rustup/toolchains/stable/lib/rustlib/src/rust/library/std/src/time.rs",
                true,
            ),
            at("{async_fn#0}", "/srv/src/app.rs", true),
            at(
                "tokio::runtime::task::raw::poll",
                "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/tokio-1.54.1/src/runtime/task/raw.rs",
                false,
            ),
        ];
        let c = culprit(&frames).expect("a culprit");
        assert_eq!(c.file.as_deref(), Some("/srv/src/app.rs"));
        // A user's file that merely mentions `library` is the user's.
        assert!(is_application(&at(
            "load",
            "/srv/library/src/lib.rs",
            false
        )));
    }

    #[test]
    fn c_runtime_libraries_by_file_name() {
        for m in [
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libc-2.31.so",
            "/lib/ld-musl-x86_64.so.1",
            "/usr/lib/libc.musl-x86_64.so.1",
            "/lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/ld-2.31.so",
            "/lib/x86_64-linux-gnu/libpthread.so.0",
            "/lib/x86_64-linux-gnu/libpthread-2.31.so",
            "/lib/x86_64-linux-gnu/libm.so.6",
            "/lib/x86_64-linux-gnu/libdl.so.2",
            "/lib/x86_64-linux-gnu/librt.so.1",
            "/lib/x86_64-linux-gnu/libgcc_s.so.1",
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
        ] {
            assert!(!app("some_function", m), "{m}");
        }
        // Same prefix, other libraries: the application's dependencies.
        for m in [
            "/usr/lib/x86_64-linux-gnu/libcrypto.so.3",
            "/usr/lib/libmagic.so.1",
            "/usr/lib/libldap.so.2",
            "/usr/lib/librtmp.so.1",
            "/opt/app/bin/server",
        ] {
            assert!(app("some_function", m), "{m}");
        }
    }

    #[test]
    fn process_and_thread_entry_points() {
        for f in [
            "_start",
            "__libc_start_main",
            "__libc_start_call_main",
            "start_thread",
            "clone3",
        ] {
            assert!(!app(f, "/opt/app/bin/server"), "{f}");
        }
    }

    #[test]
    fn cpython() {
        for m in [
            "/usr/bin/python3.11",
            "/usr/local/bin/python3",
            "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0",
            "/usr/lib/python3.11/lib-dynload/_socket.cpython-311-x86_64-linux-gnu.so",
        ] {
            assert!(!app("sock_recv_guts", m), "{m}");
        }
        for f in [
            "_PyEval_EvalFrameDefault",
            "PyObject_Vectorcall",
            "_Py_read",
            "Py_RunMain",
            "_PyObject_MakeTpCall",
        ] {
            assert!(!app(f, "/opt/embedder/bin/app"), "{f}");
        }
        assert!(app("PythonBridge::call()", "/opt/embedder/bin/app"));
        assert!(app("Pyramid_build", "/opt/embedder/bin/app"));
        // A third-party extension module is the application's.
        assert!(app(
            "compress_block",
            "/venv/lib/python3.11/site-packages/zstd.cpython-311-x86_64-linux-gnu.so"
        ));
    }

    #[test]
    fn node() {
        for m in [
            "/usr/bin/node",
            "/opt/node-v20/bin/node",
            "/usr/lib/x86_64-linux-gnu/libnode.so.108",
            "/usr/lib/x86_64-linux-gnu/libuv.so.1",
        ] {
            assert!(!app("node_function", m), "{m}");
        }
        for f in [
            "uv_fs_read",
            "uv__fs_work",
            "v8::internal::Execution::Call(v8::internal::Isolate*)",
            "node::fs::Read(v8::FunctionCallbackInfo<v8::Value> const&)",
            "Builtins_JSEntryTrampoline",
            "JS:~spawnSync node:internal/child_process:1108:19",
            "LazyCompile:*execSync node:child_process:880:18",
        ] {
            assert!(!app(f, "/opt/embedder/bin/app"), "{f}");
        }
        // The application's JavaScript, named from a perf map.
        for f in [
            "JS:~blockingExecSync /srv/app/server.js:17:26",
            "LazyCompile:*handler file:///srv/app/index.mjs:3:1",
        ] {
            assert!(app(f, "[anon]"), "{f}");
        }
        // A native addon.
        assert!(app("addon::Work(int)", "/app/build/Release/addon.node"));
    }

    #[test]
    fn rust_runtime_and_libraries() {
        let bin = "/opt/app/bin/server";
        for f in [
            "std::fs::read_to_string",
            "std::thread::sleep",
            "core::ops::function::FnOnce::call_once",
            "alloc::vec::Vec<T,A>::push",
            "tokio::runtime::park::CachedParkThread::block_on",
            "futures::executor::block_on",
            "futures_util::future::future::FutureExt::poll_unpin",
            "mio::poll::Poll::poll",
            "parking_lot::raw_mutex::RawMutex::lock_slow",
            "parking_lot_core::parking_lot::park",
            "<std::fs::File as std::io::Read>::read",
            "<core::pin::Pin<P> as core::future::future::Future>::poll",
            "<alloc::boxed::Box<F,A> as core::ops::function::FnOnce<Args>>::call_once",
            "<tokio::runtime::blocking::task::BlockingTask<T> as core::future::future::Future>::poll",
            "<std::sys::pal::unix::fs::File>::open",
            "__rust_try",
            "__rust_begin_short_backtrace",
            "rust_begin_unwind",
        ] {
            assert!(!app(f, bin), "{f}");
        }
        for f in [
            "tokio_blocker::main::{{closure}}",
            "tokio_blocker::handler",
            "<tokio_blocker::Handler as tower::Service<Req>>::call",
            "<myapp::Store>::load",
            "stdlib_wrapper::read",
            "coredump::write",
        ] {
            assert!(app(f, bin), "{f}");
        }
    }

    #[test]
    fn frames_without_a_name_are_skipped() {
        assert!(!is_application(&frame(None, Some("/opt/app/bin/server"))));
        assert!(!is_application(&frame(None, None)));
        let stack = [frame(None, Some("[anon]")), frame(Some("app::work"), None)];
        assert_eq!(culprit(&stack), Some(stack[1].clone()));
    }

    #[test]
    fn innermost_application_frame_wins() {
        let stack = [
            frame(Some("read"), Some("/usr/lib/x86_64-linux-gnu/libc.so.6")),
            frame(Some("std::fs::read_to_string::inner"), Some("/app/server")),
            frame(Some("app::config::load"), Some("/app/server")),
            frame(Some("app::main::{{closure}}"), Some("/app/server")),
            frame(
                Some("tokio::runtime::task::harness::poll"),
                Some("/app/server"),
            ),
            frame(Some("app::main"), Some("/app/server")),
        ];
        assert_eq!(
            culprit(&stack).and_then(|f| f.function).as_deref(),
            Some("app::config::load")
        );
    }

    #[test]
    fn no_application_frame() {
        let stack = [
            frame(
                Some("__GI___libc_read"),
                Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            ),
            frame(
                Some("_PyEval_EvalFrameDefault"),
                Some("/usr/bin/python3.11"),
            ),
            frame(Some("main"), Some("/usr/bin/python3.11")),
        ];
        assert_eq!(culprit(&stack), None);
        assert_eq!(culprit(&[]), None);
    }

    #[test]
    fn inlined_frames_count_like_others() {
        let mut inlined = frame(Some("app::parse"), Some("/app/server"));
        inlined.inlined = true;
        let stack = [
            frame(Some("std::io::default_read_to_end"), Some("/app/server")),
            inlined.clone(),
            frame(Some("app::load"), Some("/app/server")),
        ];
        assert_eq!(culprit(&stack), Some(inlined));
    }

    #[test]
    fn interpreted_frames_and_interpreter_machinery() {
        let python = Frame {
            kind: FrameKind::Python,
            ..frame(Some("run"), Some("/usr/lib/python3.11/asyncio/events.py"))
        };
        assert!(is_interpreted(&python) && !is_interpreter_machinery(&python));
        for js in [
            "JS:~handleLogin /srv/app/server.js:17:26",
            "JS:*spawnSync node:internal/child_process:1108:19",
            "LazyCompile:*handler file:///srv/app/index.mjs:3:1",
        ] {
            let f = frame(Some(js), Some("[anon]"));
            assert!(is_interpreted(&f) && !is_interpreter_machinery(&f), "{js}");
        }
        for (function, module) in [
            (Some("_PyEval_EvalFrameDefault"), "/usr/bin/python3.11"),
            (Some("time_sleep"), "/usr/lib/libpython3.11.so.1.0"),
            (None, "/usr/lib/libpython3.11.so.1.0"),
            (
                Some("task_step"),
                "/usr/lib/python3.11/lib-dynload/_asyncio.cpython-311-x86_64-linux-gnu.so",
            ),
            (Some("PyObject_Vectorcall"), "/opt/embedder/bin/app"),
            (Some("Builtins_InterpreterEntryTrampoline"), "/usr/bin/node"),
            (
                Some("node::fs::Read(v8::FunctionCallbackInfo<v8::Value> const&)"),
                "/usr/bin/node",
            ),
            (Some("uv_run"), "/usr/lib/x86_64-linux-gnu/libuv.so.1"),
        ] {
            let f = frame(function, Some(module));
            assert!(
                is_interpreter_machinery(&f) && !is_interpreted(&f),
                "{function:?} {module}"
            );
        }
        // Not the interpreter's: the C library, a C extension, the
        // application's native code, a Rust runtime.
        for (function, module) in [
            (
                "__GI___clock_nanosleep",
                "/usr/lib/x86_64-linux-gnu/libc.so.6",
            ),
            (
                "sqlite3PagerCommitPhaseOne",
                "/usr/lib/x86_64-linux-gnu/libsqlite3.so.0",
            ),
            (
                "compress_block",
                "/venv/lib/python3.11/site-packages/zstd.cpython-311-x86_64-linux-gnu.so",
            ),
            ("addon::Work(int)", "/app/build/Release/addon.node"),
            (
                "tokio::runtime::park::CachedParkThread::block_on",
                "/opt/app/bin/server",
            ),
        ] {
            let f = frame(Some(function), Some(module));
            assert!(
                !is_interpreter_machinery(&f) && !is_interpreted(&f),
                "{function}"
            );
        }
    }
}
