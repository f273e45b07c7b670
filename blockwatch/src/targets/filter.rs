//! User space's half of the kernel's tag filter (`TAGGED_BY_USER`, see
//! blockwatch-ebpf's maps.rs): a thread's bit is set before user space tags
//! it and cleared once the tag is gone, so that the kernel programs skip
//! the tag lookup of every thread that has no bit. User space is this
//! half's only writer: it keeps the words it wrote and writes a word whole.

use std::collections::HashMap;

use aya::maps::{Array, MapData, MapError};
use blockwatch_common::tag_filter_bit;

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

    /// Lets the kernel look `tid`'s tag up: before the tag is written.
    pub fn set(&mut self, tid: u32) -> Result<(), MapError> {
        // Past the filter's end the kernel always looks.
        let Some((word, bit)) = tag_filter_bit(tid) else {
            return Ok(());
        };
        let old = self.words.get(&word).copied().unwrap_or(0);
        if old & bit == 0 {
            self.write(word, old | bit)?;
        }
        Ok(())
    }

    /// Whether user space set `tid`'s bit (and has not cleared it).
    pub fn has(&self, tid: u32) -> bool {
        tag_filter_bit(tid)
            .is_some_and(|(word, bit)| self.words.get(&word).is_some_and(|w| w & bit != 0))
    }

    /// Stops the kernel looking `tid`'s tag up: only once the tag is gone.
    pub fn clear(&mut self, tid: u32) {
        let Some((word, bit)) = tag_filter_bit(tid) else {
            return;
        };
        let Some(&old) = self.words.get(&word) else {
            return;
        };
        // A bit left set costs the kernel one lookup, no more.
        if old & bit != 0 {
            let _ = self.write(word, old & !bit);
        }
    }

    /// Whether the kernel's copy has `tid`'s bit.
    #[cfg(test)]
    pub fn is_set(&self, tid: u32) -> bool {
        tag_filter_bit(tid)
            .is_some_and(|(word, bit)| self.map.get(&word, 0).is_ok_and(|w| w & bit != 0))
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
