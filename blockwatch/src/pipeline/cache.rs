//! Stacks already built, by what they were built from: a busy process
//! blocks at the same few stacks again and again (its threads' waits at
//! one call site are one site each, to the kernel), and symbolizing,
//! placing the CPython frames and working out culprit and advice anew for
//! each cost more than the rest of an event. A stack found here is the
//! same [`Stack`], so what was worked out from it is shared too.
//!
//! The key is everything the frames depend on: the process, whether it
//! was known to run CPython (its frames are placed only then), the native
//! return addresses, the CPython (code, instruction) pairs and the
//! generation of the process's maps snapshot, which changes when a library
//! is mapped or unmapped, and whenever a process (a new one under a reused
//! PID, or one that exec'd) gets a new snapshot; entries of an old
//! generation are never found again and age out. Only stacks whose every
//! frame was named from an ELF symbol or a code object are kept: a JIT
//! frame's name (perf maps, V8's frames) may come later or change.

use std::hash::{Hash, Hasher};

use blockwatch_common::PyFrameRef;

use crate::FastMap;
use crate::event::Stack;

/// Stacks kept per generation (so at most twice this)...
const GENERATION_STACKS: usize = 1024;
/// ...and frames: deep stacks (a CPython import, 200 frames) fill a
/// generation sooner.
const GENERATION_FRAMES: usize = 16 * 1024;

/// What a stack was built from.
#[derive(Clone, Copy)]
pub struct Key<'a> {
    pub pid: u32,
    pub python: bool,
    pub generation: u64,
    pub ips: &'a [u64],
    pub py: &'a [PyFrameRef],
}

impl Key<'_> {
    fn hash(&self) -> u64 {
        let mut h = crate::identity_hasher();
        (self.pid, self.python, self.generation, self.ips).hash(&mut h);
        for r in self.py {
            (r.code, r.instr).hash(&mut h);
        }
        h.finish()
    }

    fn owned(&self) -> OwnedKey {
        OwnedKey {
            pid: self.pid,
            python: self.python,
            generation: self.generation,
            ips: self.ips.into(),
            py: self.py.iter().map(|r| (r.code, r.instr)).collect(),
        }
    }
}

struct OwnedKey {
    pid: u32,
    python: bool,
    generation: u64,
    ips: Box<[u64]>,
    py: Box<[(u64, u64)]>,
}

impl OwnedKey {
    fn is(&self, k: &Key) -> bool {
        (self.pid, self.python, self.generation) == (k.pid, k.python, k.generation)
            && *self.ips == *k.ips
            && self.py.len() == k.py.len()
            && self
                .py
                .iter()
                .zip(k.py)
                .all(|(a, b)| *a == (b.code, b.instr))
    }
}

struct Entry {
    key: OwnedKey,
    stack: Stack,
}

/// Two generations, as the symbolizer's frame cache: when the current one
/// is full it becomes the old one and the old one is dropped; an old entry
/// used again moves back. The stacks in use stay, at the cost of a hash
/// lookup, without the bookkeeping of an exact LRU.
#[derive(Default)]
pub struct StackCache {
    /// By the key's hash; a collision keeps the newer stack.
    current: FastMap<u64, Entry>,
    old: FastMap<u64, Entry>,
    /// Frames of the current generation's stacks.
    frames: usize,
}

impl StackCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// The stack built from `key` before, if it is kept.
    pub fn get(&mut self, key: &Key) -> Option<Stack> {
        let h = key.hash();
        if let Some(e) = self.current.get(&h) {
            return e.key.is(key).then(|| e.stack.clone());
        }
        let e = self.old.remove(&h)?;
        if !e.key.is(key) {
            return None;
        }
        let stack = e.stack.clone();
        self.put(h, e);
        Some(stack)
    }

    /// Keeps `stack`, built from `key`.
    pub fn insert(&mut self, key: &Key, stack: &Stack) {
        let entry = Entry {
            key: key.owned(),
            stack: stack.clone(),
        };
        self.put(key.hash(), entry);
    }

    fn put(&mut self, h: u64, e: Entry) {
        if self.current.len() >= GENERATION_STACKS || self.frames >= GENERATION_FRAMES {
            self.old = std::mem::take(&mut self.current);
            self.frames = 0;
        }
        self.frames += e.stack.len();
        if let Some(replaced) = self.current.insert(h, e) {
            self.frames -= replaced.stack.len();
        }
    }

    /// Stacks kept.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.current.len() + self.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Frame;

    fn stack(n: usize) -> Stack {
        (0..n)
            .map(|i| Frame {
                address: i as u64,
                function: Some(format!("f{i}")),
                ..Frame::default()
            })
            .collect()
    }

    fn key<'a>(pid: u32, ips: &'a [u64], py: &'a [PyFrameRef]) -> Key<'a> {
        Key {
            pid,
            python: !py.is_empty(),
            generation: 1,
            ips,
            py,
        }
    }

    #[test]
    fn a_stack_is_found_by_everything_it_was_built_from() {
        let mut c = StackCache::new();
        let py = [PyFrameRef { code: 7, instr: 9 }];
        let s = stack(3);
        c.insert(&key(1, &[1, 2, 3], &py), &s);
        let found = c.get(&key(1, &[1, 2, 3], &py)).unwrap();
        assert!(
            std::ptr::eq(found.frames(), s.frames()),
            "shared, not copied"
        );
        assert!(c.get(&key(2, &[1, 2, 3], &py)).is_none(), "per process");
        assert!(c.get(&key(1, &[1, 2], &py)).is_none());
        assert!(c.get(&key(1, &[1, 2, 3], &[])).is_none());
        let other = [PyFrameRef { code: 7, instr: 10 }];
        assert!(c.get(&key(1, &[1, 2, 3], &other)).is_none());
        let newer_maps = Key {
            generation: 2,
            ..key(1, &[1, 2, 3], &py)
        };
        assert!(c.get(&newer_maps).is_none(), "maps changed");
        let not_python = Key {
            python: false,
            ..key(1, &[1, 2, 3], &py)
        };
        assert!(c.get(&not_python).is_none());
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_what_is_used() {
        let mut c = StackCache::new();
        let ips: Vec<[u64; 1]> = (0..3 * GENERATION_STACKS as u64).map(|i| [i]).collect();
        for (i, ip) in ips.iter().enumerate() {
            c.insert(&key(1, ip, &[]), &stack(1));
            // The first stack, used all along, is never dropped.
            assert!(c.get(&key(1, &ips[0], &[])).is_some(), "after {i}");
        }
        assert!(c.len() <= 2 * GENERATION_STACKS);
        assert!(c.get(&key(1, &ips[1], &[])).is_none(), "the unused go");
        // Deep stacks fill a generation by their frames.
        let mut c = StackCache::new();
        for ip in &ips[..64] {
            c.insert(&key(1, ip, &[]), &stack(GENERATION_FRAMES / 16));
        }
        assert!(c.len() <= 2 * 16 + 2, "{}", c.len());
    }
}
