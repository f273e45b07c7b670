//! User space's half of the kernel's tag filter (`TAGGED_BY_USER`, see
//! blockwatch-ebpf's maps.rs and blockwatch-common's `TagFilterBits`): a
//! thread's bits are set before user space tags it and cleared once the
//! tag is gone, so that the kernel programs skip the tag lookup of every
//! thread that has none, and of a plain candidate when it cannot matter.
//! User space is this half's only writer: it keeps the words it wrote and
//! writes a word whole.

use std::collections::HashMap;

use aya::maps::{Array, MapData, MapError};
use blockwatch_common::tag_filter_bits;

pub struct TagFilter {
    map: Array<MapData, u64>,
    /// The words that have a bit set, as last written.
    words: HashMap<u32, u64>,
}

impl TagFilter {
    pub fn new(map: Array<MapData, u64>) -> Self {
        Self {
            map,
            words: HashMap::new(),
        }
    }

    /// Lets the kernel look `tid`'s tag up (at every switch when `looping`:
    /// the tag is a loop's): before the tag is written.
    pub fn set(&mut self, tid: u32, looping: bool) -> Result<(), MapError> {
        // Past the filter's end the kernel always looks.
        let Some(b) = tag_filter_bits(tid) else {
            return Ok(());
        };
        let old = self.word(b.word);
        let new = old | b.tagged | if looping { b.looping } else { 0 };
        if new != old {
            self.write(b.word, new)?;
        }
        Ok(())
    }

    /// Whether user space set `tid`'s bits (and has not cleared them).
    pub fn has(&self, tid: u32) -> bool {
        tag_filter_bits(tid).is_some_and(|b| self.word(b.word) & b.tagged != 0)
    }

    /// Stops the kernel looking `tid`'s tag up: only once the tag is gone.
    pub fn clear(&mut self, tid: u32) {
        let Some(b) = tag_filter_bits(tid) else {
            return;
        };
        let old = self.word(b.word);
        let new = old & !(b.tagged | b.looping);
        // A bit left set costs the kernel one lookup, no more.
        if new != old {
            let _ = self.write(b.word, new);
        }
    }

    /// Whether the kernel's copy has `tid`'s bits: (tagged, looping).
    #[cfg(test)]
    pub fn bits(&self, tid: u32) -> (bool, bool) {
        tag_filter_bits(tid)
            .and_then(|b| {
                let w = self.map.get(&b.word, 0).ok()?;
                Some((w & b.tagged != 0, w & b.looping != 0))
            })
            .unwrap_or_default()
    }

    fn word(&self, word: u32) -> u64 {
        self.words.get(&word).copied().unwrap_or(0)
    }

    fn write(&mut self, word: u32, value: u64) -> Result<(), MapError> {
        self.map.set(word, value, 0)?;
        if value == 0 {
            self.words.remove(&word);
        } else {
            self.words.insert(word, value);
        }
        Ok(())
    }
}
