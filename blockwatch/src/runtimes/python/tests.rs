//! The tables against the headers of every installed CPython build, and
//! inspection and frame reading against real interpreter processes.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blockwatch_common::MAX_PY_FRAMES;

use super::inspect::leading_version;
use super::lines::{line_310, line_311};
use super::mem::{read_mem, read_u64};
use super::offsets::*;
use super::*;
use crate::analyze::gil;

/// An installed interpreter to test against.
#[derive(Debug)]
struct Interp {
    python: PathBuf,
    version: (u8, u8),
    /// `include/python3.X` of the same build, when installed.
    include: Option<PathBuf>,
}

fn version_of(python: &Path) -> Option<(u8, u8)> {
    let out = Command::new(python)
        .args(["-c", "import sys; print(*sys.version_info[:2])"])
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut it = text.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// Debian's /usr/bin/python3 and every pyenv 3.10-3.13.
fn interpreters() -> Vec<Interp> {
    let mut found = Vec::new();
    if let Ok(python) = std::fs::canonicalize("/usr/bin/python3")
        && let Some(version) = version_of(&python)
    {
        let include = PathBuf::from(format!("/usr/include/python3.{}", version.1));
        found.push(Interp {
            python,
            version,
            include: include.join("Python.h").exists().then_some(include),
        });
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/root/.pyenv/versions")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for dir in dirs {
        let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((3, minor)) = leading_version(name) else {
            continue;
        };
        if !(10..=13).contains(&minor) {
            continue;
        }
        let python = dir.join(format!("bin/python3.{minor}"));
        let Some(version) = version_of(&python) else {
            continue;
        };
        let include = dir.join(format!("include/python3.{minor}"));
        found.push(Interp {
            python,
            version,
            include: include.join("Python.h").exists().then_some(include),
        });
    }
    found
}

// -- Offsets against the headers -------------------------------------

/// A C program printing `name value` for every offset we table.
fn offsets_program(minor: u8) -> String {
    let mut c = String::from(
        "#define Py_BUILD_CORE 1\n#include <Python.h>\n#include <frameobject.h>\n\
             #include <stddef.h>\n#include <stdio.h>\n#include \"internal/pycore_runtime.h\"\n\
             #include \"internal/pycore_interp.h\"\n",
    );
    if minor >= 11 {
        c.push_str("#include \"internal/pycore_frame.h\"\n");
    }
    c.push_str("#define P(n, e) printf(\"%s %zu\\n\", n, (size_t)(e))\nint main(void) {\n");
    let mut p = |name: &str, expr: &str| c.push_str(&format!("P(\"{name}\", {expr});\n"));
    p(
        "runtime_interpreters_head",
        "offsetof(_PyRuntimeState, interpreters.head)",
    );
    p("tstate_next", "offsetof(PyThreadState, next)");
    p("tstate_thread_id", "offsetof(PyThreadState, thread_id)");
    p("code_filename", "offsetof(PyCodeObject, co_filename)");
    p("code_firstlineno", "offsetof(PyCodeObject, co_firstlineno)");
    p("code_linetable", "offsetof(PyCodeObject, co_linetable)");
    p("ob_type", "offsetof(PyObject, ob_type)");
    p("ob_size", "offsetof(PyVarObject, ob_size)");
    p("tp_name", "offsetof(PyTypeObject, tp_name)");
    p("bytes_sval", "offsetof(PyBytesObject, ob_sval)");
    p("unicode_length", "offsetof(PyASCIIObject, length)");
    p(
        "unicode_state",
        "offsetof(PyASCIIObject, hash) + sizeof(Py_hash_t)",
    );
    p("ascii_size", "sizeof(PyASCIIObject)");
    p("tuple_items", "offsetof(PyTupleObject, ob_item)");
    p("float_value", "offsetof(PyFloatObject, ob_fval)");
    p("compact_size", "sizeof(PyCompactUnicodeObject)");
    // The state bits we decode: a compact ASCII 1-byte string.
    c.push_str(
        "{ PyASCIIObject o; memset(&o, 0, sizeof o); o.state.kind = PyUnicode_1BYTE_KIND;\n\
             o.state.compact = 1; o.state.ascii = 1; unsigned int w;\n\
             memcpy(&w, (char *)&o + offsetof(PyASCIIObject, hash) + sizeof(Py_hash_t), 4);\n\
             P(\"state_bits\", w); }\n",
    );
    let mut p = |name: &str, expr: &str| c.push_str(&format!("P(\"{name}\", {expr});\n"));
    if minor == 10 {
        p(
            "interp_threads_head",
            "offsetof(PyInterpreterState, tstate_head)",
        );
        p("tstate_frame", "offsetof(PyThreadState, frame)");
        p("frame_previous", "offsetof(PyFrameObject, f_back)");
        p("frame_code", "offsetof(PyFrameObject, f_code)");
        p("frame_instr", "offsetof(PyFrameObject, f_lasti)");
        p("frame_instr_size", "sizeof(((PyFrameObject *)0)->f_lasti)");
        p("code_name", "offsetof(PyCodeObject, co_name)");
        p("frame_localsplus", "offsetof(PyFrameObject, f_localsplus)");
        p("code_local_names", "offsetof(PyCodeObject, co_varnames)");
    } else {
        p(
            "tstate_native_thread_id",
            "offsetof(PyThreadState, native_thread_id)",
        );
        p(
            "frame_localsplus",
            "offsetof(_PyInterpreterFrame, localsplus)",
        );
        p(
            "code_local_names",
            "offsetof(PyCodeObject, co_localsplusnames)",
        );
        p(
            "interp_threads_head",
            "offsetof(PyInterpreterState, threads.head)",
        );
        p("frame_previous", "offsetof(_PyInterpreterFrame, previous)");
        p("code_name", "offsetof(PyCodeObject, co_qualname)");
        p("code_adaptive", "offsetof(PyCodeObject, co_code_adaptive)");
    }
    if minor == 11 || minor == 12 {
        p("tstate_frame", "offsetof(PyThreadState, cframe)");
        p("cframe_current_frame", "offsetof(_PyCFrame, current_frame)");
        p("frame_code", "offsetof(_PyInterpreterFrame, f_code)");
        p("frame_instr", "offsetof(_PyInterpreterFrame, prev_instr)");
        p(
            "frame_instr_size",
            "sizeof(((_PyInterpreterFrame *)0)->prev_instr)",
        );
    }
    if minor >= 12 {
        p("frame_owner", "offsetof(_PyInterpreterFrame, owner)");
        p("owned_by_cstack", "FRAME_OWNED_BY_CSTACK");
    }
    if minor == 13 {
        p("tstate_frame", "offsetof(PyThreadState, current_frame)");
        p("frame_code", "offsetof(_PyInterpreterFrame, f_executable)");
        p("frame_instr", "offsetof(_PyInterpreterFrame, instr_ptr)");
        p(
            "frame_instr_size",
            "sizeof(((_PyInterpreterFrame *)0)->instr_ptr)",
        );
        let d = "_Py_DebugOffsets";
        for (name, field) in [
            ("dbg_version", "version"),
            ("dbg_free_threaded", "free_threaded"),
            (
                "dbg_runtime_interpreters_head",
                "runtime_state.interpreters_head",
            ),
            ("dbg_interp_threads_head", "interpreter_state.threads_head"),
            ("dbg_tstate_next", "thread_state.next"),
            ("dbg_tstate_current_frame", "thread_state.current_frame"),
            ("dbg_tstate_thread_id", "thread_state.thread_id"),
            ("dbg_frame_previous", "interpreter_frame.previous"),
            ("dbg_frame_executable", "interpreter_frame.executable"),
            ("dbg_frame_instr_ptr", "interpreter_frame.instr_ptr"),
            ("dbg_frame_owner", "interpreter_frame.owner"),
            ("dbg_code_filename", "code_object.filename"),
            ("dbg_code_qualname", "code_object.qualname"),
            ("dbg_code_linetable", "code_object.linetable"),
            ("dbg_code_firstlineno", "code_object.firstlineno"),
            ("dbg_code_adaptive", "code_object.co_code_adaptive"),
            ("dbg_unicode_ascii_size", "unicode_object.asciiobject_size"),
        ] {
            p(name, &format!("offsetof({d}, {field}) / 8"));
        }
        p("dbg_words", &format!("sizeof({d}) / 8"));
    }
    c.push_str("return 0; }\n");
    c
}

/// What our tables say, under the names the C program prints.
fn expected(minor: u8) -> Vec<(&'static str, u32)> {
    let o = offsets_for(minor).expect("tabled version");
    let l = CodeLayout::for_version((3, minor)).expect("tabled version");
    let locals = LocalsLayout::for_version((3, minor)).expect("tabled version");
    let mut e = vec![
        (
            "tstate_native_thread_id",
            locals.tstate_native_thread_id.unwrap_or(ABSENT),
        ),
        ("frame_localsplus", locals.frame_localsplus),
        ("code_local_names", locals.code_local_names),
        ("tuple_items", TUPLE_ITEMS as u32),
        ("float_value", FLOAT_VALUE as u32),
        ("runtime_interpreters_head", o.runtime_interpreters_head),
        ("interp_threads_head", o.interp_threads_head),
        ("tstate_next", o.tstate_next),
        ("tstate_thread_id", o.tstate_thread_id),
        ("tstate_frame", o.tstate_frame),
        ("cframe_current_frame", o.cframe_current_frame),
        ("frame_previous", o.frame_previous),
        ("frame_code", o.frame_code),
        ("frame_instr", o.frame_instr),
        ("frame_instr_size", o.frame_instr_size),
        ("frame_owner", o.frame_owner),
        ("code_name", l.name),
        ("code_filename", l.filename),
        ("code_firstlineno", l.firstlineno),
        ("code_linetable", l.linetable),
        ("code_adaptive", l.code_adaptive.unwrap_or(ABSENT)),
        ("ascii_size", l.ascii_size),
        ("compact_size", l.compact_size),
        ("ob_type", OB_TYPE as u32),
        ("ob_size", OB_SIZE as u32),
        ("tp_name", TP_NAME as u32),
        ("bytes_sval", BYTES_SVAL as u32),
        ("unicode_length", UNICODE_LENGTH as u32),
        ("unicode_state", UNICODE_STATE as u32),
        ("state_bits", (1 << 2) | (1 << 5) | (1 << 6)),
    ];
    if minor >= 12 {
        e.push(("owned_by_cstack", 3));
    }
    if minor == 13 {
        for (name, word) in [
            ("dbg_version", dbg::VERSION),
            ("dbg_free_threaded", dbg::FREE_THREADED),
            (
                "dbg_runtime_interpreters_head",
                dbg::RUNTIME_INTERPRETERS_HEAD,
            ),
            ("dbg_interp_threads_head", dbg::INTERP_THREADS_HEAD),
            ("dbg_tstate_next", dbg::TSTATE_NEXT),
            ("dbg_tstate_current_frame", dbg::TSTATE_CURRENT_FRAME),
            ("dbg_tstate_thread_id", dbg::TSTATE_THREAD_ID),
            ("dbg_frame_previous", dbg::FRAME_PREVIOUS),
            ("dbg_frame_executable", dbg::FRAME_EXECUTABLE),
            ("dbg_frame_instr_ptr", dbg::FRAME_INSTR_PTR),
            ("dbg_frame_owner", dbg::FRAME_OWNER),
            ("dbg_code_filename", dbg::CODE_FILENAME),
            ("dbg_code_qualname", dbg::CODE_QUALNAME),
            ("dbg_code_linetable", dbg::CODE_LINETABLE),
            ("dbg_code_firstlineno", dbg::CODE_FIRSTLINENO),
            ("dbg_code_adaptive", dbg::CODE_ADAPTIVE),
            ("dbg_unicode_ascii_size", dbg::UNICODE_ASCII_SIZE),
        ] {
            e.push((name, word as u32));
        }
    }
    e
}

#[test]
fn offsets_match_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut checked = Vec::new();
    for interp in interpreters() {
        let Some(include) = &interp.include else {
            eprintln!("{}: no headers, not checked", interp.python.display());
            continue;
        };
        let minor = interp.version.1;
        let src = dir.path().join(format!("off{}.c", checked.len()));
        let exe = dir.path().join(format!("off{}", checked.len()));
        std::fs::write(&src, offsets_program(minor)).expect("write C");
        let out = Command::new("gcc")
            .arg("-DPy_BUILD_CORE")
            .arg(format!("-I{}", include.display()))
            .arg(format!("-I{}/internal", include.display()))
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .expect("gcc must be installed to check the offsets");
        assert!(
            out.status.success(),
            "{}: {}",
            include.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let out = Command::new(&exe).output().expect("run offsets program");
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let actual: HashMap<&str, u32> = text
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k, v.parse().ok()?))
            })
            .collect();
        for (name, want) in expected(minor) {
            match actual.get(name) {
                Some(&got) => assert_eq!(got, want, "3.{minor} {name} ({})", include.display()),
                None => assert_eq!(want, ABSENT, "3.{minor} {name} not printed"),
            }
        }
        if minor == 13 {
            assert!(actual["dbg_words"] as usize >= dbg::WORDS);
        }
        checked.push(include.display().to_string());
    }
    assert!(
        !checked.is_empty(),
        "no CPython headers found: nothing checked"
    );
    eprintln!("offsets checked against {checked:?}");
}

// -- Real processes ---------------------------------------------------

/// Kills the child when the test ends, however it ends.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `blocked_here` waits at line 8 (the call starts there; its argument
/// is on line 9, which tells "the CALL" from "the instruction before
/// it"). The caller's name has a non-Latin-1 letter and the file name
/// an emoji, so 2- and 4-byte strings are read too. A thread reports
/// what the interpreter itself says of the main thread's frames, then
/// exits.
const SCRIPT: &str = r#"import sys
import threading
import time


def blocked_here():
    x = 1
    time.sleep(
        30
    )
    return x


def caller_λ():
    blocked_here(
    )


def report():
    main = threading.main_thread().ident
    while True:
        f = sys._current_frames().get(main)
        if f is not None and f.f_code.co_name == "blocked_here":
            break
        time.sleep(0.01)
    time.sleep(0.2)
    f = sys._current_frames()[main]
    print("MAIN", main, sep="\t")
    while f is not None:
        c = f.f_code
        print("FRAME", getattr(c, "co_qualname", c.co_name), c.co_filename, f.f_lineno, sep="\t")
        f = f.f_back
    print("READY", flush=True)


threading.Thread(target=report).start()
caller_λ()
"#;

/// The kernel's walk, in user space: runtime → interpreter → the
/// thread state whose thread_id is `ident` → its frames.
fn walk(pid: u32, py: &PyProcess, ident: u64) -> Vec<(u64, u64)> {
    let o = &py.offsets;
    let at = |base: u64, off: u32| read_u64(pid, base + u64::from(off)).expect("readable");
    let interp = at(py.runtime_addr, o.runtime_interpreters_head);
    let mut tstate = at(interp, o.interp_threads_head);
    for _ in 0..64 {
        assert_ne!(tstate, 0, "thread {ident:#x} not in the thread list");
        if at(tstate, o.tstate_thread_id) == ident {
            break;
        }
        tstate = at(tstate, o.tstate_next);
    }
    let mut frame = at(tstate, o.tstate_frame);
    if o.cframe_current_frame != ABSENT {
        frame = at(frame, o.cframe_current_frame);
    }
    let mut out = Vec::new();
    while frame != 0 && out.len() < MAX_PY_FRAMES {
        let shim = o.frame_owner != ABSENT && {
            let mut owner = [0u8];
            assert!(read_mem(pid, frame + u64::from(o.frame_owner), &mut owner));
            owner[0] == 3
        };
        if !shim {
            let instr = if o.frame_instr_size == 4 {
                let mut b = [0u8; 4];
                assert!(read_mem(pid, frame + u64::from(o.frame_instr), &mut b));
                u64::from(u32::from_le_bytes(b))
            } else {
                at(frame, o.frame_instr)
            };
            out.push((at(frame, o.frame_code), instr));
        }
        frame = at(frame, o.frame_previous);
    }
    out
}

/// The script running under `interp`, stopped in `blocked_here`, with
/// what it says of itself.
struct Probe {
    child: Reaped,
    script: PathBuf,
    main_ident: u64,
    /// The main thread's frames, as the interpreter reports them.
    truth: Vec<PyFrame>,
}

fn check_process(interp: &Interp, dir: &Path) {
    let label = interp.python.display().to_string();
    let probe = start_probe(interp, dir, &label);
    let pid = probe.child.0.id();
    let py = inspect(pid)
        .unwrap_or_else(|e| panic!("{label}: {e}"))
        .unwrap_or_else(|| panic!("{label}: not recognised as CPython"));
    assert_eq!(py.version, interp.version, "{label}");
    check_runtime(interp, pid, &py, &label);
    check_frames(interp, &probe, &py, &label);
}

fn start_probe(interp: &Interp, dir: &Path, label: &str) -> Probe {
    let script = dir.join(format!("probe_3{}_🐍.py", interp.version.1));
    std::fs::write(&script, SCRIPT).expect("write script");
    let mut child = Reaped(
        Command::new(&interp.python)
            .arg(&script)
            .env("PYTHONUTF8", "1")
            .env("PYTHONIOENCODING", "utf-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start python"),
    );
    let pid = child.0.id();
    let stdout = child.0.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut main_ident = None;
    let mut truth: Vec<PyFrame> = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{label}: no report from the script"));
        let f: Vec<&str> = line.split('\t').collect();
        match f.as_slice() {
            ["MAIN", ident] => main_ident = ident.parse::<u64>().ok(),
            ["FRAME", function, file, line] => truth.push(PyFrame {
                function: function.to_string(),
                file: file.to_string(),
                line: line.parse().ok(),
            }),
            ["READY"] => break,
            _ => panic!("{label}: unexpected output {line:?}"),
        }
    }
    let main_ident = main_ident.expect("main thread ident");
    // Let the reporting thread finish, so that only the main thread's
    // state is in the list while we walk it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while crate::procfs::threads(pid).len() > 1 {
        assert!(
            Instant::now() < deadline,
            "{label}: reporter thread still alive"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Probe {
        child,
        script,
        main_ident,
        truth,
    }
}

/// The `_PyRuntime` found: its size, the GIL range, 3.13's own offsets.
fn check_runtime(interp: &Interp, pid: u32, py: &PyProcess, label: &str) {
    // The GIL range: _PyRuntime itself, which holds the GIL (3.10,
    // 3.11) or embeds the main interpreter that holds it (3.12+).
    assert!(
        (256..16 << 20).contains(&py.runtime_size),
        "{label}: _PyRuntime size {}",
        py.runtime_size
    );
    let runtime = py.runtime().expect("_PyRuntime has a size");
    let is_gil_futex = |addr| gil::is_gil_futex(&runtime, addr);
    assert!(is_gil_futex(py.runtime_addr) && is_gil_futex(py.runtime_addr + 8));
    assert!(!is_gil_futex(py.runtime_addr + py.runtime_size));
    assert!(!is_gil_futex(py.runtime_addr - 4));
    let main_interp = read_u64(
        pid,
        py.runtime_addr + u64::from(py.offsets.runtime_interpreters_head),
    )
    .expect("interpreters.head");
    assert_eq!(
        is_gil_futex(main_interp),
        interp.version.1 >= 11,
        "{label}: the main interpreter is embedded in _PyRuntime from 3.11 on"
    );
    if interp.version.1 == 13 {
        let dbg = read_debug_offsets(pid, py.runtime_addr).expect("3.13 has _Py_DebugOffsets");
        assert!(!dbg.free_threaded);
        assert_eq!(dbg.version_hex >> 16, 0x030d);
        assert_eq!(
            Some(dbg.offsets),
            offsets_for(13),
            "3.13 table vs _Py_DebugOffsets"
        );
        assert_eq!(Some(dbg.code), CodeLayout::for_version((3, 13)));
    }
}

/// The frames of the main thread, walked as the kernel would and read as
/// the pipeline does.
fn check_frames(interp: &Interp, probe: &Probe, py: &PyProcess, label: &str) {
    let pid = probe.child.0.id();
    let py = *py;
    let refs = walk(pid, &py, probe.main_ident);
    let mut reader = CodeReader::new();
    let frames: Vec<PyFrame> = refs
        .iter()
        .map(|&(code, instr)| {
            reader
                .frame(pid, &py, code, instr)
                .unwrap_or_else(|| panic!("{label}: code object {code:#x} unreadable"))
        })
        .collect();
    eprintln!("{label}: {frames:?}");
    // Exactly what the interpreter reports of itself...
    assert_eq!(frames, probe.truth, "{label}");
    // ...and what the script says.
    let file = probe.script.to_str().expect("utf-8 path");
    let (inner_line, caller_line) = (8, 15);
    assert_eq!(
        frames.first(),
        Some(&PyFrame {
            function: "blocked_here".into(),
            file: file.into(),
            line: Some(inner_line),
        }),
        "{label}"
    );
    assert_eq!(
        frames.get(1),
        Some(&PyFrame {
            function: "caller_λ".into(),
            file: file.into(),
            line: Some(caller_line),
        }),
        "{label}"
    );
    assert_eq!(frames.get(2).map(|f| f.function.as_str()), Some("<module>"));
    assert_eq!(frames.len(), 3, "{label}: {frames:?}");

    // 3.13's instr_ptr is the CALL itself: the instruction before it
    // (the argument, line 9) would be the wrong line.
    if interp.version.1 == 13 {
        let (code, instr) = refs[0];
        let before = reader.frame(pid, &py, code, instr - 2).and_then(|f| f.line);
        assert_eq!(before, Some(9), "{label}");
    }

    // Cached: the same answers without reading the process again.
    let (code, instr) = refs[0];
    reader.forget(pid + 1);
    assert_eq!(reader.frame(pid, &py, code, instr).as_ref(), frames.first());
    // Not code objects: nothing, rather than garbage.
    for bogus in [0, 1, code + 8, py.runtime_addr, refs[0].1, u64::MAX - 7] {
        assert_eq!(
            reader.frame(pid, &py, bogus, instr),
            None,
            "{label}: {bogus:#x}"
        );
    }
    reader.forget(pid);
    assert!(reader.current.is_empty() && reader.previous.is_empty());
}

#[test]
fn frames_of_real_interpreters() {
    let interps = interpreters();
    assert!(
        !interps.is_empty(),
        "no CPython 3.10-3.13 installed: nothing tested"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for interp in &interps {
        check_process(interp, dir.path());
    }
}

#[test]
fn other_processes_are_not_python() {
    assert!(inspect(std::process::id()).expect("own maps").is_none());
    assert!(matches!(inspect(u32::MAX), Err(PyError::Io { .. })));
}

/// Prints a line once started, then sleeps (Python 2 and 3).
const SLEEPER: &str =
    "import sys, time; sys.stdout.write('R\\n'); sys.stdout.flush(); time.sleep(30)";

/// Pythons older than 3.10 (2.7 and 3.6 have no _PyRuntime at all) are
/// "not ours", not errors.
#[test]
fn older_pythons_are_none() {
    let mut tried = 0;
    for v in ["2.7", "3.6", "3.9"] {
        let Ok(dirs) = std::fs::read_dir("/root/.pyenv/versions") else {
            return;
        };
        for dir in dirs.flatten() {
            let name = dir.file_name().to_string_lossy().into_owned();
            let python = dir.path().join(format!("bin/python{v}"));
            if !name.starts_with(&format!("{v}.")) || !python.exists() {
                continue;
            }
            let mut child = Reaped(
                Command::new(&python)
                    .args(["-c", SLEEPER])
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("start python"),
            );
            let mut line = String::new();
            let stdout = child.0.stdout.take().expect("piped");
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("ready line");
            assert_eq!(line, "R\n");
            let r = inspect(child.0.id());
            assert!(matches!(r, Ok(None)), "{}: {r:?}", python.display());
            tried += 1;
        }
    }
    eprintln!("{tried} older interpreters checked");
}

// -- Line tables against CPython's own decoding -------------------------

/// Code that exercises the line tables: loops, handlers, multi-line
/// expressions, nested code, big line jumps (3.10 splits deltas over
/// 127, 3.11+ uses long-form entries) and long single-line code (3.10
/// splits offset deltas over 255).
const LINES_SCRIPT: &str = r#"
src = '''
import os
def f(a, b=2, *c, **d):
    for i in range(a):
        if i % 2:
            continue
        try:
            x = [j * 2
                 for j in range(i)
                 if j]
        except (ValueError,
                KeyError) as e:
            raise RuntimeError(
                "bad") from e
        finally:
            pass
    with open(
            os.devnull) as fh:
        fh.read()
    return lambda q: (q +
                      1)

class K:
    @staticmethod
    def m(self):
        while True:
            break
        return {k: v for k, v in
                zip("ab", "cd")}
''' + "\n" * 300 + "def far(y):\n    return " + "+".join(["y"] * 300) + "\n" + "\n" * 70000 + "def very_far():\n    return 1\n"

code = compile(src, "sample.py", "exec")

def walk(c):
    yield c
    for k in c.co_consts:
        if hasattr(k, "co_lines"):
            yield from walk(k)

for c in walk(code):
    ranges = " ".join("%d:%d:%s" % r for r in c.co_lines())
    print(c.co_firstlineno, c.co_linetable.hex(), ranges)
"#;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn line_tables_match_cpython() {
    let mut seen = std::collections::HashSet::new();
    for interp in interpreters() {
        if !seen.insert(interp.version) {
            continue;
        }
        let out = Command::new(&interp.python)
            .args(["-c", LINES_SCRIPT])
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("utf-8");
        let mut checked = 0;
        for line in text.lines() {
            let mut f = line.splitn(3, ' ');
            let first: i32 = f.next().and_then(|s| s.parse().ok()).expect("firstlineno");
            let table = hex(f.next().expect("table"));
            for r in f.next().unwrap_or("").split_whitespace() {
                let mut p = r.split(':');
                let start: i64 = p.next().and_then(|s| s.parse().ok()).expect("start");
                let end: i64 = p.next().and_then(|s| s.parse().ok()).expect("end");
                let want: Option<i64> = p.next().and_then(|s| s.parse().ok());
                for byte in (start..end).step_by(2) {
                    let got = if interp.version.1 == 10 {
                        line_310(&table, first, byte)
                    } else {
                        line_311(&table, first, byte / 2)
                    };
                    assert_eq!(got, want, "{:?} at {byte} in {line}", interp.version);
                    checked += 1;
                }
            }
        }
        assert!(
            checked > 500,
            "{:?}: only {checked} instructions",
            interp.version
        );
    }
    assert!(!seen.is_empty(), "no interpreter to check line tables with");
}
