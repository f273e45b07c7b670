//! One stack builder for every detector's events (blocking waits, strict
//! calls, stall samples): the native walk (the kernel's frame pointers or
//! the DWARF unwinder's walk of a stack copy), its symbols, Node's
//! JavaScript functions from V8's frames, other JIT names from perf maps,
//! and the CPython frames placed where the interpreter's evaluation loop is
//! on the native stack.

use std::collections::HashMap;

use blockwatch_common::PyFrameRef;

use crate::event::{Frame, FrameKind};
use crate::ingest::decode::UserStackRecord;
use crate::runtimes::node::{self, JsFunction, V8Layouts};
use crate::runtimes::python::{CodeReader, PyProcess};
use crate::stacks::perfmap::PerfMaps;
use crate::stacks::symbolize::Symbolizer;
use crate::stacks::unwind::StackUnwinder;

/// The per-process caches stacks are built from. Caches keyed by binary
/// (symbols, unwind tables) are shared by every process.
pub struct StackBuilder {
    sym: Symbolizer,
    unwinder: StackUnwinder,
    perf_maps: PerfMaps,
    code: CodeReader,
    v8: V8Layouts,
    /// The stack copy of the last [`StackBuilder::native`] call, for the
    /// frames of the same event (V8 frames are read through it).
    copy: Option<UserStackRecord>,
    /// JS functions of stall samples, read when each sample arrived (the
    /// thread was still running them), by process and stack.
    sampled: HashMap<(u32, Vec<u64>), Vec<Option<JsFunction>>>,
}

/// Sampled stacks whose JS functions are kept until their stall is
/// reported (a stall has a few dozen samples).
const MAX_SAMPLED: usize = 4096;

impl Default for StackBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl StackBuilder {
    pub fn new() -> Self {
        Self {
            sym: Symbolizer::new(),
            unwinder: StackUnwinder::new(),
            perf_maps: PerfMaps::new(),
            code: CodeReader::new(),
            v8: V8Layouts::new(),
            copy: None,
            sampled: HashMap::new(),
        }
    }

    /// The symbolizer, for what is not a stack (a runtime's park probe)
    /// and to snapshot a process's maps early.
    pub fn symbolizer(&mut self) -> &mut Symbolizer {
        &mut self.sym
    }

    /// Symbolization failures so far.
    pub fn symbol_failures(&self) -> u64 {
        self.sym.failures()
    }

    /// The native return addresses of a wait: the kernel's frame-pointer
    /// walk `fp`, or the DWARF walk of the stack `copy` taken with it (see
    /// [`crate::stacks::unwind::choose`]).
    pub fn native(&mut self, pid: u32, fp: &[u64], copy: Option<&UserStackRecord>) -> Vec<u64> {
        self.copy = copy.cloned();
        self.unwinder.stack(&mut self.sym, pid, fp, copy)
    }

    /// The native return addresses of a CPU sample, as [`Self::native`]
    /// finds them, without keeping `copy` for the next symbolization: a
    /// sample is symbolized later, with its episode, when the copy is gone
    /// (its JS frames are named from the live stack, [`Self::sampled`]).
    pub fn unwind(&mut self, pid: u32, fp: &[u64], copy: Option<&UserStackRecord>) -> Vec<u64> {
        self.unwinder.stack(&mut self.sym, pid, fp, copy)
    }

    /// The generation of `pid`'s maps snapshot (see
    /// [`Symbolizer::generation`]): frames built from the same addresses
    /// in the same generation are the same.
    pub fn maps_generation(&self, pid: u32) -> Option<u64> {
        self.sym.generation(pid)
    }

    /// Drops the stack copy [`Self::native`] kept, for an event whose
    /// frames were found already built.
    pub fn skip_copy(&mut self) {
        self.copy = None;
    }

    /// Native frames (ELF symbols, perf maps for JIT code) with the
    /// CPython frames `py` in place when `interp` says the process runs
    /// CPython; and whether they may be reused for the same addresses
    /// and maps: every native frame was named by its ELF symbol (none by
    /// V8 or a perf map, whose names come later or change) and every
    /// CPython frame by its code object.
    pub fn frames(
        &mut self,
        pid: u32,
        ips: &[u64],
        py: &[PyFrameRef],
        interp: Option<&PyProcess>,
    ) -> (Vec<Frame>, bool) {
        let mut stack = self.sym.symbolize(pid, ips);
        // V8 renames its builtins' frames; perf maps name unnamed ones.
        let mut reusable = stack.iter().all(|f| {
            f.function
                .as_deref()
                .is_some_and(|n| !n.starts_with("Builtins_"))
        });
        let copy = self
            .copy
            .take()
            .filter(|c| c.pid == pid && ips.first() == Some(&c.ip));
        self.js_frames(pid, ips, copy.as_ref(), &mut stack);
        // JIT code has no ELF symbols: its perf map, if it writes one.
        let jit: Vec<usize> = (0..stack.len())
            .filter(|&i| stack[i].function.is_none() && !stack[i].inlined)
            .collect();
        if !jit.is_empty() {
            let addrs: Vec<u64> = jit
                .iter()
                .map(|&i| stack[i].address - u64::from(i > 0))
                .collect();
            for (i, name) in jit.into_iter().zip(self.perf_maps.names(pid, &addrs)) {
                stack[i].function = name;
            }
        }
        let Some(interp) = interp else {
            return (stack, reusable);
        };
        // The interpreter frames are the Python code that called into the
        // native frames above: they go where the interpreter's evaluation
        // loop is on the native stack, before its own callers (down to
        // main), or last when the native stack does not reach it.
        let at = stack
            .iter()
            .position(|f| {
                f.function
                    .as_deref()
                    .is_some_and(|n| n.starts_with("_PyEval_EvalFrame"))
            })
            .unwrap_or(stack.len());
        let python: Vec<Frame> = py
            .iter()
            .filter(|r| r.code != 0)
            .map(|r| self.python_frame(pid, interp, r))
            .collect();
        reusable &= python.iter().all(|f| f.function.is_some());
        stack.splice(at..at, python);
        (stack, reusable)
    }

    /// A CPU sample of thread `tid` just arrived (`ips` unwound): when it
    /// is a main thread running V8, its JS functions are read from its live
    /// stack now, while it still runs them, for when its episode is
    /// reported.
    pub fn sampled(&mut self, pid: u32, tid: u32, ips: &[u64]) {
        // Only a main thread's stack is known without a copy ([stack]).
        if pid != tid || ips.len() < 2 || self.sampled.contains_key(&(pid, ips.to_vec())) {
            return;
        }
        let Some(layout) = self.v8.of(pid) else {
            return;
        };
        let Some(live) = node::live_main_stack(pid) else {
            return;
        };
        let named = node::js_functions(&layout, &node::Process(pid), &live, ips, |_| true);
        if named.iter().any(Option::is_some) {
            if self.sampled.len() >= MAX_SAMPLED {
                self.sampled.clear();
            }
            self.sampled.insert((pid, ips.to_vec()), named);
        }
    }

    /// Names the frames V8 runs JavaScript in (JIT code, which has no
    /// symbol, and V8's builtins such as the interpreter's trampoline)
    /// from V8's own frames, when the process runs V8: through the
    /// event's stack copy, or as read when a stall sample arrived. Perf
    /// maps, read after, name what this could not.
    fn js_frames(
        &mut self,
        pid: u32,
        ips: &[u64],
        copy: Option<&UserStackRecord>,
        stack: &mut [Frame],
    ) {
        let v8_code = |f: &Frame| {
            !f.inlined
                && f.function
                    .as_deref()
                    .is_none_or(|n| n.starts_with("Builtins_"))
        };
        // Symbolization expands inlined frames: V8 code is never inlined
        // into anything, so frame k of `ips` is the k-th frame not inlined.
        let outer: Vec<usize> = (0..stack.len()).filter(|&i| !stack[i].inlined).collect();
        // V8's builtins (entry, trampolines) are on every stack that
        // reaches JavaScript: other processes are never looked into.
        let builtins = stack.iter().any(|f| {
            f.function
                .as_deref()
                .is_some_and(|n| n.starts_with("Builtins_"))
        });
        if outer.len() != ips.len() || !builtins {
            return;
        }
        let named = match copy {
            Some(copy) => {
                let Some(layout) = self.v8.of(pid) else {
                    return;
                };
                let wanted = |k: usize| v8_code(&stack[outer[k]]);
                node::js_functions(&layout, &node::Process(pid), copy, ips, wanted)
            }
            None => match self.sampled.get(&(pid, ips.to_vec())) {
                Some(named) => named.clone(),
                None => return,
            },
        };
        for (k, f) in named.into_iter().enumerate() {
            // No name and no script: V8's own closures (an await's
            // resumption); the frame keeps what it had.
            if let Some(f) = f
                && v8_code(&stack[outer[k]])
                && !(f.name.is_empty() && f.script.is_empty())
            {
                let frame = &mut stack[outer[k]];
                frame.function = Some(f.label());
                // The script is the module; no file: the label already
                // names the script, and there is no line yet.
                frame.module = (!f.script.is_empty()).then_some(f.script);
                frame.file = None;
            }
        }
    }

    fn python_frame(&mut self, pid: u32, interp: &PyProcess, r: &PyFrameRef) -> Frame {
        let frame = Frame {
            address: r.code,
            kind: FrameKind::Python,
            ..Frame::default()
        };
        match self.code.frame(pid, interp, r.code, r.instr) {
            Some(f) => Frame {
                function: Some(f.function),
                module: Some(f.file.clone()),
                file: Some(f.file),
                line: f.line,
                ..frame
            },
            None => frame,
        }
    }

    /// Drops what is known of process `pid` (it exec'd or exited): its
    /// maps snapshot, unwinder, perf map and code objects.
    pub fn forget(&mut self, pid: u32) {
        self.sym.forget(pid);
        self.unwinder.forget(pid);
        self.perf_maps.forget(pid);
        self.code.forget(pid);
        self.v8.forget(pid);
        self.sampled.retain(|(p, _), _| *p != pid);
    }

    /// Whether anything of `pid` is kept (its maps snapshot, perf map).
    #[cfg(test)]
    pub(crate) fn knows(&self, pid: u32) -> bool {
        self.sym.knows(pid) || self.perf_maps.knows(pid)
    }
}
