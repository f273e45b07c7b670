//! Code objects: a recorded (code, instr) pair turned into function, file
//! and line by reading the code object from the process's memory
//! afterwards. Code objects outlive the calls that run them, and their
//! name, file and line table never change, so they are cached.

use std::collections::HashMap;

use super::PyFrame;
use super::PyProcess;
use super::lines::{line_310, line_311};
use super::mem::{plausible_object, read_mem, read_u64, u32_at, u64_at};
use super::offsets::{
    BYTES_SVAL, CodeLayout, LocalsLayout, OB_SIZE, OB_TYPE, TP_NAME, TUPLE_ITEMS, UNICODE_LENGTH,
    UNICODE_STATE,
};

/// Longest function or file name read. Real ones are far shorter; a longer
/// length field means the pointer was not a str object.
const MAX_STR_CHARS: u64 = 4096;

/// Longest line table read. CPython's largest real modules have tables of a
/// few hundred KiB at most (one entry per few instructions).
const MAX_TABLE_BYTES: u64 = 1 << 20;

/// Code objects longer than this (in 2-byte code units) are not believed.
const MAX_CODE_UNITS: u64 = 1 << 24;

/// Local slots believed in one code object (CPython's own limit on
/// arguments and locals is far above any real function's count).
const MAX_LOCALS: u64 = 1 << 16;

/// Resolved code objects kept per cache generation (so at most twice this,
/// i.e. 16k): a busy service has a few thousand hot functions at most.
const CODE_CACHE_GENERATION: usize = 8 * 1024;

/// What is kept of a code object.
#[derive(Clone, Debug)]
pub(super) struct Code {
    function: String,
    file: String,
    first_line: i32,
    table: Box<[u8]>,
    /// Length of the bytecode in code units (3.11+: the object's ob_size).
    units: Option<u64>,
}

impl Code {
    fn line(&self, layout: &CodeLayout, code_addr: u64, instr: u64) -> Option<u32> {
        let index = match layout.code_adaptive {
            // 3.10: f_lasti, an int the kernel read as 4 bytes (zero- or
            // sign-extended), -1 before the first instruction.
            None => i64::from(instr as u32 as i32),
            // 3.11/3.12 prev_instr (the last instruction started, one
            // before the code at frame start) and 3.13 instr_ptr (the
            // instruction executing, e.g. the CALL a caller frame waits
            // in): CPython's _PyInterpreterFrame_LASTI is in both cases
            // the pointer minus the code's start, in code units.
            Some(off) => (instr.wrapping_sub(code_addr.wrapping_add(u64::from(off))) as i64) / 2,
        };
        // CPython's PyCode_Addr2Line answers co_firstlineno before the first
        // instruction.
        let line = if index < 0 {
            Some(i64::from(self.first_line))
        } else if self.units.is_some_and(|n| index as u64 >= n) {
            None
        } else if layout.code_adaptive.is_none() {
            line_310(&self.table, self.first_line, index.checked_mul(2)?)
        } else {
            line_311(&self.table, self.first_line, index)
        };
        line.and_then(|l| u32::try_from(l).ok()).filter(|&l| l > 0)
    }
}

/// The type objects of one process, learnt from the first object of each
/// kind by its `tp_name`, then compared by address: cheaper than reading
/// the name each time, and a stray pointer rarely points at an object whose
/// type is exactly `PyCode_Type`.
#[derive(Clone, Copy, Debug, Default)]
struct Types {
    code: Option<u64>,
    str: Option<u64>,
    bytes: Option<u64>,
    tuple: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Code,
    Str,
    Bytes,
    Tuple,
}

impl Kind {
    fn tp_name(self) -> &'static [u8] {
        match self {
            Kind::Code => b"code",
            Kind::Str => b"str",
            Kind::Bytes => b"bytes",
            Kind::Tuple => b"tuple",
        }
    }
}

/// Resolves recorded (code, instr) pairs to frames, caching code objects.
#[derive(Debug, Default)]
pub struct CodeReader {
    /// Two generations: when `current` is full it becomes `previous`, and
    /// entries still in use move back on their next hit.
    pub(super) current: HashMap<(u32, u64), Option<Code>>,
    pub(super) previous: HashMap<(u32, u64), Option<Code>>,
    types: HashMap<u32, Types>,
}

impl CodeReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Function, file and line of the frame that runs code object `code`
    /// at instruction value `instr` (as the kernel recorded them for
    /// process `pid`). `None` when `code` is not a readable code object.
    pub fn frame(&mut self, pid: u32, py: &PyProcess, code: u64, instr: u64) -> Option<PyFrame> {
        let layout = CodeLayout::for_version(py.version)?;
        let key = (pid, code);
        if !self.current.contains_key(&key) {
            let entry = match self.previous.remove(&key) {
                Some(entry) => entry,
                None => self.load(pid, &layout, code),
            };
            if self.current.len() >= CODE_CACHE_GENERATION {
                self.previous = std::mem::take(&mut self.current);
            }
            self.current.insert(key, entry);
        }
        let c = self.current.get(&key)?.as_ref()?;
        Some(PyFrame {
            function: c.function.clone(),
            file: c.file.clone(),
            line: c.line(&layout, code, instr),
        })
    }

    /// Drops what is known of process `pid` (it exited, or exec'd).
    pub fn forget(&mut self, pid: u32) {
        self.current.retain(|k, _| k.0 != pid);
        self.previous.retain(|k, _| k.0 != pid);
        self.types.remove(&pid);
    }

    /// The names of code object `code`'s local slots, in slot order
    /// (arguments, then locals, then cells and free variables). Not
    /// cached: it is read once per loop.
    pub(super) fn local_names(
        &mut self,
        pid: u32,
        py: &PyProcess,
        code: u64,
    ) -> Option<Vec<String>> {
        let layout = CodeLayout::for_version(py.version)?;
        let locals = LocalsLayout::for_version(py.version)?;
        if !plausible_object(code) {
            return None;
        }
        self.check_type(pid, Kind::Code, read_u64(pid, code.checked_add(OB_TYPE)?)?)?;
        let tuple = read_u64(pid, code.checked_add(u64::from(locals.code_local_names))?)?;
        let mut head = [0u8; TUPLE_ITEMS as usize];
        if !plausible_object(tuple) || !read_mem(pid, tuple, &mut head) {
            return None;
        }
        self.check_type(pid, Kind::Tuple, u64_at(&head, OB_TYPE as usize)?)?;
        let len = u64_at(&head, OB_SIZE as usize)?;
        if len > MAX_LOCALS {
            return None;
        }
        let mut items = vec![0u8; len as usize * 8];
        if !read_mem(pid, tuple.checked_add(TUPLE_ITEMS)?, &mut items) {
            return None;
        }
        items
            .chunks_exact(8)
            .map(|c| self.read_str(pid, &layout, u64_at(c, 0)?))
            .collect()
    }

    fn load(&mut self, pid: u32, layout: &CodeLayout, code: u64) -> Option<Code> {
        let mut head = [0u8; 256];
        let head = head.get_mut(..layout.header_len())?;
        if !plausible_object(code) || !read_mem(pid, code, head) {
            return None;
        }
        self.check_type(pid, Kind::Code, u64_at(head, OB_TYPE as usize)?)?;
        let ptr = |off: u32| u64_at(head, off as usize);
        let function = self.read_str(pid, layout, ptr(layout.name)?)?;
        let file = self.read_str(pid, layout, ptr(layout.filename)?)?;
        let first_line = u32_at(head, layout.firstlineno as usize)? as i32;
        let table = self.read_bytes(pid, ptr(layout.linetable)?)?;
        let units = match layout.code_adaptive {
            Some(_) => Some(u64_at(head, OB_SIZE as usize)?).filter(|&n| n <= MAX_CODE_UNITS),
            None => None,
        };
        if layout.code_adaptive.is_some() && units.is_none() {
            return None;
        }
        Some(Code {
            function,
            file,
            first_line,
            table,
            units,
        })
    }

    /// Is `ob_type` the type of `kind` objects in process `pid`?
    fn check_type(&mut self, pid: u32, kind: Kind, ob_type: u64) -> Option<()> {
        let types = self.types.entry(pid).or_default();
        let known = match kind {
            Kind::Code => &mut types.code,
            Kind::Str => &mut types.str,
            Kind::Bytes => &mut types.bytes,
            Kind::Tuple => &mut types.tuple,
        };
        if let Some(t) = *known {
            return (t == ob_type).then_some(());
        }
        if !plausible_object(ob_type) {
            return None;
        }
        let name_ptr = read_u64(pid, ob_type.checked_add(TP_NAME)?)?;
        let want = kind.tp_name();
        // One byte more than the name, to see its terminating NUL.
        let mut name = [0u8; 8];
        let name = name.get_mut(..want.len() + 1)?;
        if !read_mem(pid, name_ptr, name) || &name[..want.len()] != want || name[want.len()] != 0 {
            return None;
        }
        *known = Some(ob_type);
        Some(())
    }

    /// A str object's text. Code objects' names and file names are always
    /// compact strings (created by PyUnicode_New), whose characters follow
    /// the header: ASCII ones after PyASCIIObject, others after
    /// PyCompactUnicodeObject in 1, 2 or 4 bytes per character.
    fn read_str(&mut self, pid: u32, layout: &CodeLayout, p: u64) -> Option<String> {
        let mut head = [0u8; 72];
        let head = head.get_mut(..layout.compact_size as usize)?;
        if !plausible_object(p) || !read_mem(pid, p, head) {
            return None;
        }
        self.check_type(pid, Kind::Str, u64_at(head, OB_TYPE as usize)?)?;
        let len = u64_at(head, UNICODE_LENGTH as usize)?;
        if len > MAX_STR_CHARS {
            return None;
        }
        // state: interned:2, kind:3, compact:1, ascii:1 (same bits 3.10-3.13).
        let state = u32_at(head, UNICODE_STATE as usize)?;
        let (width, compact, ascii) = (
            (state >> 2) & 7,
            state & (1 << 5) != 0,
            state & (1 << 6) != 0,
        );
        if !compact {
            return None;
        }
        let (data_off, width) = if ascii {
            (layout.ascii_size, 1)
        } else {
            (layout.compact_size, width)
        };
        if !matches!(width, 1 | 2 | 4) {
            return None;
        }
        let mut data = vec![0u8; (len * u64::from(width)) as usize];
        if !read_mem(pid, p.checked_add(u64::from(data_off))?, &mut data) {
            return None;
        }
        if ascii {
            return data.is_ascii().then(|| String::from_utf8(data).ok())?;
        }
        data.chunks_exact(width as usize)
            .map(|c| {
                let v = match *c {
                    [a] => u32::from(a),
                    [a, b] => u32::from(u16::from_le_bytes([a, b])),
                    [a, b, c, d] => u32::from_le_bytes([a, b, c, d]),
                    _ => return None,
                };
                char::from_u32(v)
            })
            .collect()
    }

    /// A bytes object's contents.
    fn read_bytes(&mut self, pid: u32, p: u64) -> Option<Box<[u8]>> {
        let mut head = [0u8; BYTES_SVAL as usize];
        if !plausible_object(p) || !read_mem(pid, p, &mut head) {
            return None;
        }
        self.check_type(pid, Kind::Bytes, u64_at(&head, OB_TYPE as usize)?)?;
        let len = u64_at(&head, OB_SIZE as usize)?;
        if len > MAX_TABLE_BYTES {
            return None;
        }
        let mut data = vec![0u8; len as usize];
        read_mem(pid, p.checked_add(BYTES_SVAL)?, &mut data).then(|| data.into_boxed_slice())
    }
}
