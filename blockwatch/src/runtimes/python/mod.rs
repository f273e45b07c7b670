//! CPython interpreter frames, the user-space half.
//!
//! When a tagged CPython thread blocks, the kernel program walks that
//! thread's interpreter frames and records, for each, the code object's
//! address and an instruction value ([`blockwatch_common::PyFrameRef`]). It
//! cannot follow strings or decode line tables, and it does not know where
//! the interpreter keeps its state, so this module supplies both ends:
//!
//! - [`inspect`] finds a process's interpreter: the `_PyRuntime` symbol of
//!   the python binary or `libpython3.X.so` it maps, the version, and the
//!   structure offsets ([`PyOffsets`]) the kernel walk follows.
//! - [`CodeReader`] turns a recorded (code, instr) pair into function,
//!   file and line by reading the code object from the process's memory
//!   afterwards: code objects outlive the calls that run them, and their
//!   name, file and line table never change, so they are cached.
//!
//! CPython's internal structures change between minor versions but not
//! within one, so offsets are tabled per minor version (3.10 to 3.13, x86-64
//! release builds) and checked in tests against the headers of every
//! installed build. 3.13 also describes its own layout in the
//! `_Py_DebugOffsets` block at the start of `_PyRuntime`; when present it
//! is preferred over the table, since it comes from the build that runs.
//!
//! A process is inspected when it execs a python executable (again every
//! few milliseconds until the loader has mapped libpython) and when the
//! kernel reports its first loop thread, so the kernel can walk the frames
//! of the loop's first blocking call. One case stays unnamed: a process
//! that exits right after its blocking call ends, before the event is
//! read, takes its code objects with it (the frames are recorded but
//! cannot be read). Naming those needs the names read while the call
//! still blocks (a record at switch-out, costly for every short wait) or
//! by the kernel (strings and line tables in BPF).
//!
//! By concern: `inspect` (finding the interpreter), `clock` (asyncio's
//! iteration clock, for [`crate::runtimes::clock`]), `offsets` (the
//! per-version layouts), `code` (code objects), `lines` (line tables),
//! `mem` (reading the process through [`crate::procfs::mem`]).

pub(crate) mod clock;
mod code;
mod inspect;
mod lines;
mod mem;
mod offsets;
#[cfg(test)]
mod tests;

use std::ops::Range;
use std::path::PathBuf;

use blockwatch_common::PyOffsets;

pub use code::CodeReader;
pub use inspect::inspect;

#[derive(Debug, thiserror::Error)]
pub enum PyError {
    #[error("reading {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a readable ELF file: {msg}", path.display())]
    Elf { path: PathBuf, msg: String },
    #[error("process {pid}: cannot place {} in its address space", path.display())]
    NotMapped { pid: u32, path: PathBuf },
}

/// A CPython process, as the kernel walk needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PyProcess {
    pub version: (u8, u8),
    /// Address of `_PyRuntime` in the process.
    pub runtime_addr: u64,
    /// Its size (`st_size`; 0 when the symbol table has none). The main
    /// interpreter's GIL lies inside it (`ceval.gil` before 3.12, the
    /// embedded main interpreter's `_gil` from 3.12), so a futex wait in
    /// `[runtime_addr, runtime_addr + runtime_size)` is a wait for the GIL.
    pub runtime_size: u64,
    pub offsets: PyOffsets,
}

impl PyProcess {
    /// Where `_PyRuntime` lies, when its size is known: the main
    /// interpreter's GIL is inside (see `runtime_size`), which is what
    /// [`crate::analyze::gil`] asks.
    pub fn runtime(&self) -> Option<Range<u64>> {
        (self.runtime_size > 0)
            .then(|| self.runtime_addr..self.runtime_addr.saturating_add(self.runtime_size))
    }

    /// Whether process `pid` runs this interpreter: it has a main
    /// interpreter with at least one thread state. A process that only
    /// maps libpython (to symbolize it, or an embedder that never called
    /// `Py_Initialize`) has a zeroed `_PyRuntime` and is no Python program.
    pub fn is_initialised(&self, pid: u32) -> bool {
        let head = |addr: u64, off: u32| {
            mem::read_u64(pid, addr.wrapping_add(u64::from(off))).filter(|&p| p != 0)
        };
        head(self.runtime_addr, self.offsets.runtime_interpreters_head)
            .and_then(|interp| head(interp, self.offsets.interp_threads_head))
            .is_some()
    }
}

/// One resolved interpreter frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyFrame {
    /// Qualified name (`Class.method`; plain name on 3.10).
    pub function: String,
    pub file: String,
    pub line: Option<u32>,
}
