//! CPython's structure layouts per minor version: the offsets the kernel
//! walk follows ([`PyOffsets`]), where code, str and bytes objects keep
//! what [`super::CodeReader`] reads, and 3.13's own description of its
//! layout (`_Py_DebugOffsets`).

use blockwatch_common::PyOffsets;

use super::mem::{read_mem, u64_at};

/// Marks an offset that does not apply to a version.
pub(super) const ABSENT: u32 = u32::MAX;

/// The offsets the kernel walk follows, for x86-64 release (non-debug,
/// GIL) builds. Values from the headers, see the `offsets_match_headers`
/// test.
pub(super) fn offsets_for(minor: u8) -> Option<PyOffsets> {
    let o = match minor {
        10 => PyOffsets {
            version: 0x030a,
            runtime_interpreters_head: 32,
            interp_threads_head: 8, // tstate_head
            tstate_next: 8,
            tstate_thread_id: 176,
            tstate_frame: 24, // frame (PyFrameObject *)
            cframe_current_frame: ABSENT,
            frame_previous: 24, // f_back
            frame_code: 32,     // f_code
            frame_instr: 96,    // f_lasti (int, in code units)
            frame_instr_size: 4,
            frame_owner: ABSENT,
        },
        11 => PyOffsets {
            version: 0x030b,
            runtime_interpreters_head: 40,
            interp_threads_head: 16,
            tstate_next: 8,
            tstate_thread_id: 152,
            tstate_frame: 56, // cframe
            cframe_current_frame: 8,
            frame_previous: 48,
            frame_code: 32,
            frame_instr: 56, // prev_instr
            frame_instr_size: 8,
            // 3.11 has an owner field (offset 69) but no C-stack shim
            // frames to skip, so the kernel need not read it.
            frame_owner: ABSENT,
        },
        12 => PyOffsets {
            version: 0x030c,
            runtime_interpreters_head: 40,
            interp_threads_head: 72,
            tstate_next: 8,
            tstate_thread_id: 136,
            tstate_frame: 56, // cframe
            cframe_current_frame: 0,
            frame_previous: 8,
            frame_code: 0,
            frame_instr: 56, // prev_instr
            frame_instr_size: 8,
            frame_owner: 70,
        },
        13 => PyOffsets {
            version: 0x030d,
            runtime_interpreters_head: 632,
            interp_threads_head: 7344,
            tstate_next: 8,
            tstate_thread_id: 152,
            tstate_frame: 72, // current_frame
            cframe_current_frame: ABSENT,
            frame_previous: 8,
            frame_code: 0,   // f_executable
            frame_instr: 56, // instr_ptr
            frame_instr_size: 8,
            frame_owner: 70,
        },
        _ => return None,
    };
    Some(o)
}

/// Where [`super::CodeReader`] finds things in code, str and bytes objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CodeLayout {
    /// `co_qualname` (3.11+) or `co_name` (3.10, which has no qualname).
    pub(super) name: u32,
    pub(super) filename: u32,
    /// `co_firstlineno` (an int).
    pub(super) firstlineno: u32,
    /// `co_linetable` (a bytes object).
    pub(super) linetable: u32,
    /// `co_code_adaptive`, where the instructions start (3.11+); `None` on
    /// 3.10, whose `f_lasti` is already an instruction index.
    pub(super) code_adaptive: Option<u32>,
    /// `sizeof(PyASCIIObject)`: where a compact ASCII string's characters
    /// start.
    pub(super) ascii_size: u32,
    /// `sizeof(PyCompactUnicodeObject)`: where other compact strings'
    /// characters start.
    pub(super) compact_size: u32,
}

impl CodeLayout {
    pub(super) fn for_version(version: (u8, u8)) -> Option<CodeLayout> {
        if version.0 != 3 {
            return None;
        }
        let l = match version.1 {
            10 => CodeLayout {
                name: 112,
                filename: 104,
                firstlineno: 40,
                linetable: 120,
                code_adaptive: None,
                ascii_size: 48,
                compact_size: 72,
            },
            11 => CodeLayout {
                name: 128,
                filename: 112,
                firstlineno: 72,
                linetable: 136,
                code_adaptive: Some(184),
                ascii_size: 48,
                compact_size: 72,
            },
            // 3.12 dropped the `wstr` fields from str objects.
            12 => CodeLayout {
                name: 128,
                filename: 112,
                firstlineno: 68,
                linetable: 136,
                code_adaptive: Some(192),
                ascii_size: 40,
                compact_size: 56,
            },
            13 => CodeLayout {
                name: 128,
                filename: 112,
                firstlineno: 68,
                linetable: 136,
                code_adaptive: Some(200),
                ascii_size: 40,
                compact_size: 56,
            },
            _ => return None,
        };
        Some(l)
    }

    /// Bytes of the code object to read to reach every field used.
    pub(super) fn header_len(&self) -> usize {
        let last = [self.name, self.filename, self.firstlineno, self.linetable]
            .into_iter()
            .max()
            .unwrap_or(0);
        last as usize + 8
    }
}

/// Where a frame keeps its locals and a thread state its thread's TID,
/// for the loop clock ([`super::clock`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct LocalsLayout {
    /// `PyThreadState.native_thread_id` (3.11+; 3.10's thread state does
    /// not record the TID).
    pub(super) tstate_native_thread_id: Option<u32>,
    /// Where a frame's local slots start: `PyFrameObject.f_localsplus`
    /// (3.10), `_PyInterpreterFrame.localsplus` (3.11+).
    pub(super) frame_localsplus: u32,
    /// The tuple of names of those slots, in slot order:
    /// `co_varnames` (3.10), `co_localsplusnames` (3.11+).
    pub(super) code_local_names: u32,
}

impl LocalsLayout {
    pub(super) fn for_version(version: (u8, u8)) -> Option<LocalsLayout> {
        if version.0 != 3 {
            return None;
        }
        let (native, localsplus, names) = match version.1 {
            10 => (None, 352, 72),
            11 | 13 => (Some(160), 72, 96),
            12 => (Some(144), 72, 96),
            _ => return None,
        };
        Some(LocalsLayout {
            tstate_native_thread_id: native,
            frame_localsplus: localsplus,
            code_local_names: names,
        })
    }
}

/// `PyTupleObject.ob_item`, 3.10-3.13.
pub(super) const TUPLE_ITEMS: u64 = 24;
/// `PyFloatObject.ob_fval`, 3.10-3.13.
pub(super) const FLOAT_VALUE: u64 = 16;

// Offsets shared by 3.10-3.13 (PyObject, PyVarObject, PyTypeObject,
// PyBytesObject, PyASCIIObject heads), checked by the header test too.
pub(super) const OB_TYPE: u64 = 8;
pub(super) const OB_SIZE: u64 = 16;
pub(super) const TP_NAME: u64 = 24;
pub(super) const BYTES_SVAL: u64 = 32;
pub(super) const UNICODE_LENGTH: u64 = 16;
pub(super) const UNICODE_STATE: u64 = 32;

// 3.13's `_Py_DebugOffsets`: an array of u64 after an 8-byte cookie. These
// are the word indices of the fields used (layout of 3.13.x; 3.14 changed
// it, so it is only parsed for 3.13).

const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";
pub(super) mod dbg {
    pub const VERSION: usize = 1;
    pub const FREE_THREADED: usize = 2;
    pub const RUNTIME_INTERPRETERS_HEAD: usize = 5;
    pub const INTERP_THREADS_HEAD: usize = 9;
    pub const TSTATE_NEXT: usize = 21;
    pub const TSTATE_CURRENT_FRAME: usize = 23;
    pub const TSTATE_THREAD_ID: usize = 24;
    pub const FRAME_PREVIOUS: usize = 29;
    pub const FRAME_EXECUTABLE: usize = 30;
    pub const FRAME_INSTR_PTR: usize = 31;
    pub const FRAME_OWNER: usize = 33;
    pub const CODE_FILENAME: usize = 35;
    pub const CODE_QUALNAME: usize = 37;
    pub const CODE_LINETABLE: usize = 38;
    pub const CODE_FIRSTLINENO: usize = 39;
    pub const CODE_ADAPTIVE: usize = 43;
    pub const UNICODE_ASCII_SIZE: usize = 70;
    /// Words read (the block is 73 words long in 3.13.0).
    pub const WORDS: usize = 71;
}

/// What a 3.13 `_Py_DebugOffsets` block says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DebugOffsets {
    pub(super) version_hex: u64,
    pub(super) free_threaded: bool,
    pub(super) offsets: PyOffsets,
    /// Only the code object fields (the debug block has no compact str
    /// size; `compact_size` is copied from the table).
    pub(super) code: CodeLayout,
}

pub(super) fn read_debug_offsets(pid: u32, runtime: u64) -> Option<DebugOffsets> {
    let mut raw = [0u8; dbg::WORDS * 8];
    if !read_mem(pid, runtime, &mut raw) || &raw[..8] != DEBUG_COOKIE {
        return None;
    }
    let word = |i: usize| u64_at(&raw, i * 8);
    // Offsets are small; anything else means this is not the layout we
    // know, and must not reach the kernel as an offset.
    let off = |i: usize| {
        word(i)
            .filter(|&v| v < 1 << 20)
            .and_then(|v| u32::try_from(v).ok())
    };
    let version_hex = word(dbg::VERSION)?;
    let table = offsets_for(13)?;
    let code_table = CodeLayout::for_version((3, 13))?;
    Some(DebugOffsets {
        version_hex,
        free_threaded: word(dbg::FREE_THREADED)? != 0,
        offsets: PyOffsets {
            version: 0x030d,
            runtime_interpreters_head: off(dbg::RUNTIME_INTERPRETERS_HEAD)?,
            interp_threads_head: off(dbg::INTERP_THREADS_HEAD)?,
            tstate_next: off(dbg::TSTATE_NEXT)?,
            tstate_thread_id: off(dbg::TSTATE_THREAD_ID)?,
            tstate_frame: off(dbg::TSTATE_CURRENT_FRAME)?,
            cframe_current_frame: ABSENT,
            frame_previous: off(dbg::FRAME_PREVIOUS)?,
            frame_code: off(dbg::FRAME_EXECUTABLE)?,
            frame_instr: off(dbg::FRAME_INSTR_PTR)?,
            frame_instr_size: table.frame_instr_size,
            frame_owner: off(dbg::FRAME_OWNER)?,
        },
        code: CodeLayout {
            name: off(dbg::CODE_QUALNAME)?,
            filename: off(dbg::CODE_FILENAME)?,
            firstlineno: off(dbg::CODE_FIRSTLINENO)?,
            linetable: off(dbg::CODE_LINETABLE)?,
            code_adaptive: Some(off(dbg::CODE_ADAPTIVE)?),
            ascii_size: off(dbg::UNICODE_ASCII_SIZE)?,
            compact_size: code_table.compact_size,
        },
    })
}
