use std::collections::HashMap;

use super::*;

/// A layout like Node 20's on x86-64.
fn layout() -> Layout {
    Layout {
        fp_function: -16,
        fp_context: -8,
        map: 0,
        instance_type: 12,
        jsfunction_shared: 24,
        sfi_name_or_scope_info: 16,
        sfi_script_or_debug_info: 32,
        script_name: 16,
        string_length: 12,
        seq_one_byte_chars: 16,
        seq_two_byte_chars: 16,
        cons_first: 16,
        cons_second: 24,
        thin_actual: 16,
        scope_info_first_vars: 4,
        scope_info_ncontext_locals: 2,
        type_shared_function_info: 0xb0,
        type_script: 0xa0,
        type_scope_info: 0xc0,
        first_nonstring_type: 0x80,
        string_representation_mask: 7,
        seq_string_tag: 0,
        cons_string_tag: 1,
        thin_string_tag: 5,
        string_encoding_mask: 8,
        one_byte_string_tag: 8,
    }
}

/// Bytes at addresses.
#[derive(Default)]
struct FakeHeap {
    bytes: HashMap<u64, u8>,
    next: u64,
    maps: HashMap<u16, u64>,
}

impl Memory for FakeHeap {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        for (i, b) in buf.iter_mut().enumerate() {
            match self.bytes.get(&(addr + i as u64)) {
                Some(v) => *b = *v,
                None => return false,
            }
        }
        true
    }
}

impl FakeHeap {
    fn new() -> Self {
        FakeHeap {
            next: 0x10_0000,
            ..Default::default()
        }
    }

    fn put(&mut self, addr: u64, b: &[u8]) {
        for (i, v) in b.iter().enumerate() {
            self.bytes.insert(addr + i as u64, *v);
        }
    }

    fn put_u64(&mut self, addr: u64, v: u64) {
        self.put(addr, &v.to_le_bytes());
    }

    /// A new object of instance type `ty`, `size` bytes; its tagged pointer.
    fn object(&mut self, ty: u16, size: u64) -> u64 {
        let map = match self.maps.get(&ty) {
            Some(&m) => m,
            None => {
                let m = self.alloc(16);
                self.put(m + 12, &ty.to_le_bytes());
                self.maps.insert(ty, m);
                m
            }
        };
        let addr = self.alloc(size.max(8));
        self.put_u64(addr, map | 1);
        addr | 1
    }

    fn alloc(&mut self, size: u64) -> u64 {
        let a = self.next;
        self.next += size.next_multiple_of(16) + 16;
        self.put(a, &vec![0; size as usize]);
        a
    }

    fn one_byte(&mut self, s: &str) -> u64 {
        let o = self.object(0x08, 16 + s.len() as u64);
        self.put(o - 1 + 12, &(s.len() as u32).to_le_bytes());
        self.put(o - 1 + 16, s.as_bytes());
        o
    }

    fn two_byte(&mut self, s: &str) -> u64 {
        let units: Vec<u16> = s.encode_utf16().collect();
        let o = self.object(0x00, 16 + 2 * units.len() as u64);
        self.put(o - 1 + 12, &(units.len() as u32).to_le_bytes());
        let bytes: Vec<u8> = units.iter().flat_map(|u| u.to_le_bytes()).collect();
        self.put(o - 1 + 16, &bytes);
        o
    }

    fn cons(&mut self, a: u64, b: u64) -> u64 {
        let o = self.object(0x09, 32);
        self.put_u64(o - 1 + 16, a);
        self.put_u64(o - 1 + 24, b);
        o
    }

    /// A JSFunction with a SharedFunctionInfo naming it `name` (a string
    /// or ScopeInfo) in a Script named `script`.
    fn function(&mut self, name: u64, script: u64) -> u64 {
        let s = self.object(0xa0, 24);
        self.put_u64(s - 1 + 16, script);
        let sfi = self.object(0xb0, 40);
        self.put_u64(sfi - 1 + 16, name);
        self.put_u64(sfi - 1 + 32, s);
        let f = self.object(0x100, 32);
        self.put_u64(f - 1 + 24, sfi);
        f
    }

    fn scope_info(&mut self, locals: u64, name: u64) -> u64 {
        let o = self.object(0xc0, 8 + 16 * 8);
        self.put_u64(o - 1 + 8 + 2 * 8, locals << 32);
        // Context local names (heap objects that are not the name) come
        // first; the name after them.
        let first = 4 + 2 * locals;
        for i in 4..first {
            let local = self.object(0x120, 8);
            self.put_u64(o - 1 + 8 + i * 8, local);
        }
        self.put_u64(o - 1 + 8 + first * 8, name);
        o
    }
}

/// A stack copy: words from `sp`.
fn copy(sp: u64, words: &[u64]) -> UserStackRecord {
    UserStackRecord {
        pid: 1,
        tid: 1,
        start_ns: 0,
        ip: 0,
        sp,
        bp: 0,
        stack: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
    }
}

#[test]
fn strings_of_every_supported_shape() {
    let mut h = FakeHeap::new();
    let l = layout();
    let a = h.one_byte("handle");
    let b = h.two_byte("Login→");
    let c = h.cons(a, b);
    let heap = Heap { l: &l, mem: &h };
    assert_eq!(heap.string(a, 4).as_deref(), Some("handle"));
    assert_eq!(heap.string(b, 4).as_deref(), Some("Login→"));
    assert_eq!(heap.string(c, 4).as_deref(), Some("handleLogin→"));
    assert_eq!(heap.string(c, 1), None, "nesting is bounded");
    let not_string = h.object(0x100, 8);
    let heap = Heap { l: &l, mem: &h };
    assert_eq!(heap.string(not_string, 4), None);
    assert_eq!(heap.string(0x2000, 4), None, "a Smi is no string");
}

#[test]
fn js_frames_are_named_from_the_stack_copy() {
    let mut h = FakeHeap::new();
    let l = layout();
    let name = h.one_byte("handleLogin");
    let script = h.one_byte("/srv/app.js");
    let handle_login = h.function(name, script);
    let inner = h.one_byte("execSync");
    let lib = h.one_byte("node:child_process");
    let scope = h.scope_info(2, inner);
    let exec_sync = h.function(scope, lib);
    let context = h.object(0x130, 8);
    // ips: [native leaf, execSync's pc, handleLogin's pc, exit frame's
    // caller]; the stack from sp: the leaf's words, then execSync's
    // frame (function, context, saved fp, return into handleLogin), then
    // handleLogin's (function, context, saved fp, return into its
    // caller), then a typed frame with a Smi marker.
    let sp = 0x7ff0_0000u64;
    let words = [
        0xdead,
        0x1111,       // sp+8: return into execSync (ips[1])
        exec_sync,    // sp+16: fp1 - 16
        context,      // sp+24: fp1 - 8
        sp + 64,      // sp+32 = fp1: saved fp
        0x2222,       // sp+40: return into handleLogin (ips[2])
        handle_login, // sp+48
        context,      // sp+56
        sp + 96,      // sp+64 = fp2
        0x3333,       // sp+72: return into a typed frame (ips[3])
        0,
        7 << 32, // sp+88: a Smi frame marker
        0,       // sp+96 = fp3
        0x4444,  // sp+104 (ips[4])
    ];
    let c = copy(sp, &words);
    let ips = [0x9999, 0x1111, 0x2222, 0x3333, 0x4444];
    assert_eq!(
        frame_pointers(&c, &ips, |k| k > 0),
        [None, Some(sp + 32), Some(sp + 64), Some(sp + 96), None]
    );
    let named = js_functions(&l, &h, &c, &ips, |k| k > 0);
    let labels: Vec<Option<String>> = named
        .iter()
        .map(|f| f.as_ref().map(JsFunction::label))
        .collect();
    assert_eq!(
        labels,
        [
            None,
            Some("execSync node:child_process".into()),
            Some("handleLogin /srv/app.js".into()),
            None,
            None
        ]
    );
    // Only the frames asked for.
    let named = js_functions(&l, &h, &c, &ips, |k| k == 2);
    assert!(named[1].is_none() && named[2].is_some());
}

#[test]
fn anonymous_functions_and_unknown_scripts() {
    let f = JsFunction {
        name: String::new(),
        script: String::new(),
    };
    assert_eq!(f.label(), "(anonymous)");
}

#[test]
fn the_installed_node_has_a_layout() {
    let Ok(file) = std::fs::File::open("/usr/bin/node") else {
        eprintln!("no /usr/bin/node: skipped");
        return;
    };
    let l = Layout::from_binary(&file).expect("node's v8dbg_ symbols");
    assert_eq!((l.fp_function, l.fp_context), (-16, -8), "{l:#?}");
    assert_eq!(l.map, 0);
    assert!(l.first_nonstring_type > 0 && l.type_shared_function_info > l.first_nonstring_type);
    let own = std::fs::File::open("/proc/self/exe").unwrap();
    assert!(Layout::from_binary(&own).is_err(), "blockwatch runs no V8");
}
