//! Node.js: JavaScript function names from V8's own frames, for a `node`
//! started with no flags (no perf map needed).
//!
//! V8 publishes its object layout in the node binary as `v8dbg_*` symbols
//! (postmortem metadata: frame slot offsets, field offsets, instance
//! types), and keeps frame pointers in all the code it generates. So a JS
//! frame's frame pointer gives its `JSFunction` (at `fp +
//! v8dbg_off_fp_function`), whose `SharedFunctionInfo` holds the function's
//! name (a `String`, or a `ScopeInfo` that holds it) and its `Script`, whose
//! name is the source file. Typed frames (entry, exit, stub) hold a Smi
//! marker where JS frames hold their context, and are skipped.
//!
//! Frame pointers come from the user stack copy the kernel took: the frame
//! of return address `ips[k]` has its caller's return address `ips[k+1]`
//! saved at `fp + 8`. The heap objects are read from the live process;
//! every object's type is checked first, so a moved or freed object gives
//! no name rather than a wrong one.

mod layout;

pub use layout::Layout;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::sync::Arc;

use crate::ingest::decode::UserStackRecord;
use crate::procfs;

/// Longest name or file name read.
const MAX_STRING: usize = 512;
/// ConsString nesting followed.
const MAX_STRING_DEPTH: u32 = 8;
/// ScopeInfo slots looked at for the function name.
const SCOPE_INFO_SLOTS: u64 = 16;

const HEAP_OBJECT_TAG: u64 = 1;
const HEAP_OBJECT_TAG_MASK: u64 = 3;
const SMI_TAG_MASK: u64 = 1;

/// A JS function a frame runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsFunction {
    /// Empty for an anonymous function.
    pub name: String,
    /// The script's name (a path, or `node:fs` for Node's own library);
    /// empty when unknown.
    pub script: String,
}

impl JsFunction {
    /// The frame's function name, as perf maps write it (`name script`),
    /// so the script's `node:` prefix tells Node's own library apart.
    pub fn label(&self) -> String {
        let name = if self.name.is_empty() {
            "(anonymous)"
        } else {
            &self.name
        };
        if self.script.is_empty() {
            name.to_string()
        } else {
            format!("{name} {}", self.script)
        }
    }
}

/// Memory of a process: the live process, or a test's heap.
pub trait Memory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;

    fn u64_at(&self, addr: u64) -> Option<u64> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b).then(|| u64::from_le_bytes(b))
    }
}

/// A live process's memory.
pub struct Process(pub u32);

impl Memory for Process {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        procfs::mem::read(self.0, addr, buf)
    }
}

fn heap_object(tagged: u64) -> Option<u64> {
    (tagged & HEAP_OBJECT_TAG_MASK == HEAP_OBJECT_TAG && tagged > 0x1000)
        .then_some(tagged & !HEAP_OBJECT_TAG_MASK)
}

fn smi(word: u64) -> Option<u64> {
    // 64-bit V8 without pointer compression (how Node is built): the value
    // is in the upper 32 bits.
    (word & SMI_TAG_MASK == 0).then_some(word >> 32)
}

/// Reads V8 objects with a process's layout.
struct Heap<'a, M: Memory> {
    l: &'a Layout,
    mem: &'a M,
}

impl<M: Memory> Heap<'_, M> {
    /// The object `tagged` points to and its instance type.
    fn object(&self, tagged: u64) -> Option<(u64, u16)> {
        let addr = heap_object(tagged)?;
        let map = heap_object(self.mem.u64_at(addr + self.l.map)?)?;
        let mut t = [0u8; 2];
        self.mem
            .read(map + self.l.instance_type, &mut t)
            .then(|| (addr, u16::from_le_bytes(t)))
    }

    fn field(&self, addr: u64, off: u64) -> Option<(u64, u16)> {
        self.object(self.mem.u64_at(addr + off)?)
    }

    fn string(&self, tagged: u64, depth: u32) -> Option<String> {
        let (addr, ty) = self.object(tagged)?;
        self.string_at(addr, ty, depth)
    }

    fn string_at(&self, addr: u64, ty: u16, depth: u32) -> Option<String> {
        let l = self.l;
        if ty >= l.first_nonstring_type || depth == 0 {
            return None;
        }
        let repr = ty & l.string_representation_mask;
        if repr == l.seq_string_tag {
            let mut len = [0u8; 4];
            self.mem
                .read(addr + l.string_length, &mut len)
                .then_some(())?;
            let len = (u32::from_le_bytes(len) as usize).min(MAX_STRING);
            if ty & l.string_encoding_mask == l.one_byte_string_tag {
                let mut b = vec![0u8; len];
                self.mem
                    .read(addr + l.seq_one_byte_chars, &mut b)
                    .then_some(())?;
                // Latin-1.
                Some(b.into_iter().map(char::from).collect())
            } else {
                let mut b = vec![0u8; len * 2];
                self.mem
                    .read(addr + l.seq_two_byte_chars, &mut b)
                    .then_some(())?;
                let units: Vec<u16> = b
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                Some(String::from_utf16_lossy(&units))
            }
        } else if repr == l.cons_string_tag {
            let first = self.string(self.mem.u64_at(addr + l.cons_first)?, depth - 1)?;
            let second = self.string(self.mem.u64_at(addr + l.cons_second)?, depth - 1)?;
            let mut s = first + &second;
            s.truncate(s.floor_char_boundary(MAX_STRING));
            Some(s)
        } else if repr == l.thin_string_tag {
            self.string(self.mem.u64_at(addr + l.thin_actual)?, depth - 1)
        } else {
            None
        }
    }

    /// A `ScopeInfo`'s function name: the first string after the context
    /// locals (its slots move between V8 versions; the first string there
    /// is the name, as the OpenTelemetry profiler finds it too).
    fn scope_info_name(&self, addr: u64) -> Option<String> {
        let data = addr + self.l.map + 8;
        let mut slots = [0u8; SCOPE_INFO_SLOTS as usize * 8];
        self.mem.read(data, &mut slots).then_some(())?;
        let slot = |i: u64| {
            let i = i as usize * 8;
            slots
                .get(i..i + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
        };
        let locals = smi(slot(self.l.scope_info_ncontext_locals)?)?;
        let first = self
            .l
            .scope_info_first_vars
            .checked_add(locals.checked_mul(2)?)?;
        (first..SCOPE_INFO_SLOTS)
            .filter_map(slot)
            .filter(|&w| heap_object(w).is_some())
            .find_map(|w| self.string(w, MAX_STRING_DEPTH))
    }

    /// The function of a JS frame whose frame pointer is `fp`, reading
    /// stack words with `stack`.
    fn frame(&self, fp: u64, stack: impl Fn(u64) -> Option<u64>) -> Option<JsFunction> {
        let l = self.l;
        // Typed frames (entry, exit, stubs) keep a Smi marker here, JS
        // frames their context.
        let context = stack(fp.checked_add_signed(l.fp_context)?)?;
        smi(context).is_none().then_some(())?;
        let function = stack(fp.checked_add_signed(l.fp_function)?)?;
        let (jsfunc, _) = self.object(function)?;
        let (sfi, ty) = self.field(jsfunc, l.jsfunction_shared)?;
        (ty == l.type_shared_function_info).then_some(())?;
        let name = match self.field(sfi, l.sfi_name_or_scope_info) {
            Some((a, t)) if t == l.type_scope_info => self.scope_info_name(a),
            Some((a, t)) => self.string_at(a, t, MAX_STRING_DEPTH),
            None => None,
        }
        .unwrap_or_default();
        let script = match self.field(sfi, l.sfi_script_or_debug_info) {
            Some((a, t)) if t == l.type_script => self
                .mem
                .u64_at(a + l.script_name)
                .and_then(|n| self.string(n, MAX_STRING_DEPTH)),
            _ => None,
        }
        .unwrap_or_default();
        Some(JsFunction { name, script })
    }
}

/// Reads 8-byte words of a stack copy that starts at `sp`.
fn copy_word(copy: &UserStackRecord, addr: u64) -> Option<u64> {
    let off = usize::try_from(addr.checked_sub(copy.sp)?).ok()?;
    let b = copy.stack.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(b.try_into().ok()?))
}

/// The frame pointer of each frame `k` that `wanted(k)`, from the stack
/// copy: the return address into its caller, `ips[k + 1]`, is saved right
/// above it. Return addresses are searched inwards, from the outermost,
/// each below the last one found: every interpreted JS frame returns to
/// the same address in V8's trampoline, and a search outwards from the
/// bottom of a live stack read after the fact (a CPU sample's) met a stale
/// copy of it below the live frames first, which named every frame after
/// it by its callee and lost one (`listOnTimeout` under a hot `cpuHog`).
pub fn frame_pointers(
    copy: &UserStackRecord,
    ips: &[u64],
    wanted: impl Fn(usize) -> bool,
) -> Vec<Option<u64>> {
    let mut fps = vec![None; ips.len()];
    // Stack slots are 8-aligned; a word must fit whole below `below`.
    let start = copy.sp.next_multiple_of(8);
    let mut below = copy.sp + copy.stack.len() as u64;
    for k in (0..ips.len().saturating_sub(1)).rev() {
        let ra = ips[k + 1];
        // The slots that hold a whole word below `below`, highest first.
        let slots = below.saturating_sub(start) / 8;
        let Some(at) = (0..slots)
            .rev()
            .map(|i| start + i * 8)
            .find(|&a| copy_word(copy, a) == Some(ra))
        else {
            continue;
        };
        if wanted(k) {
            fps[k] = at.checked_sub(8);
        }
        below = at;
    }
    fps
}

/// Names the JS functions of a stack: for each frame `k` that `wanted(k)`,
/// the function its V8 frame runs, if it is one.
pub fn js_functions<M: Memory>(
    layout: &Layout,
    mem: &M,
    copy: &UserStackRecord,
    ips: &[u64],
    wanted: impl Fn(usize) -> bool,
) -> Vec<Option<JsFunction>> {
    let heap = Heap { l: layout, mem };
    frame_pointers(copy, ips, wanted)
        .into_iter()
        .map(|fp| heap.frame(fp?, |a| copy_word(copy, a).or_else(|| mem.u64_at(a))))
        .collect()
}

/// Most bytes of a live main-thread stack read for a stall sample: deep
/// enough for Node's startup frames, the loop and the JavaScript it runs.
const LIVE_STACK_BYTES: u64 = 256 << 10;

/// The used top of process `pid`'s main-thread stack (its `[stack]`
/// mapping), read now, as a stack copy: what a stall sample of a thread
/// still busy is named from, since samples carry no copy of their own.
/// Dead frames below the live ones are in it too: [`frame_pointers`]
/// searches from the outermost frame inwards, so the live ones are met
/// first.
pub fn live_main_stack(pid: u32) -> Option<UserStackRecord> {
    let maps = procfs::maps::read(pid).ok()?;
    let stack = maps.iter().find(|m| m.name() == "[stack]")?;
    let start = stack.end.saturating_sub(LIVE_STACK_BYTES).max(stack.start);
    let mut bytes = vec![0u8; (stack.end - start) as usize];
    procfs::mem::read(pid, start, &mut bytes).then_some(())?;
    Some(UserStackRecord {
        pid,
        tid: pid,
        start_ns: 0,
        ip: 0,
        sp: start,
        bp: 0,
        stack: bytes,
    })
}

/// The V8 layout of each process that runs V8, read from its executable
/// once per binary.
#[derive(Default)]
pub struct V8Layouts {
    by_binary: HashMap<(u64, u64), Option<Arc<Layout>>>,
    by_pid: HashMap<u32, Option<Arc<Layout>>>,
}

impl V8Layouts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Process `pid`'s V8 layout, if its executable carries one, or the
    /// libnode it maps (Debian's node is a small executable over libnode).
    pub fn of(&mut self, pid: u32) -> Option<Arc<Layout>> {
        if let Some(l) = self.by_pid.get(&pid) {
            return l.clone();
        }
        // /proc/PID/exe and map_files open the very binaries the process
        // runs, inside another mount namespace or replaced on disk.
        let layout = self
            .read(pid, format!("/proc/{pid}/exe").into())
            .or_else(|| {
                let maps = procfs::maps::read(pid).ok()?;
                let libnode = maps
                    .iter()
                    .find(|m| m.path().is_some_and(|p| p.contains("/libnode.so")))?;
                self.read(pid, libnode.map_files(pid))
            });
        self.by_pid.insert(pid, layout.clone());
        layout
    }

    fn read(&mut self, pid: u32, path: std::path::PathBuf) -> Option<Arc<Layout>> {
        let file = std::fs::File::open(path).ok()?;
        let meta = file.metadata().ok()?;
        self.by_binary
            .entry((meta.dev(), meta.ino()))
            .or_insert_with(|| match Layout::from_binary(&file) {
                Ok(l) => Some(Arc::new(l)),
                Err(e) => {
                    log::debug!("pid {pid}: no V8 layout: {e}");
                    None
                }
            })
            .clone()
    }

    /// The process is gone or exec'd.
    pub fn forget(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
    }
}

#[cfg(test)]
mod tests;
