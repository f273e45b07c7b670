//! Raw stacks to frames: DWARF unwinding of copied user stacks, native
//! symbols, JIT perf maps, and the one [`builder`] that puts them together
//! with the CPython frames for every detector's events.

pub mod builder;
pub mod perfmap;
pub mod sites;
pub mod symbolize;
pub mod unwind;

use std::collections::HashMap;
use std::hash::Hash;

/// The key of the least recently used entry of `map`, `last_used` saying
/// when each entry was (a logical clock).
fn least_recently_used<K: Clone, V>(
    map: &HashMap<K, V>,
    last_used: impl Fn(&V) -> u64,
) -> Option<K> {
    map.iter()
        .min_by_key(|(_, v)| last_used(v))
        .map(|(k, _)| k.clone())
}

/// Makes room for one more entry in `map`, bounded to `max`: the least
/// recently used entry goes when it is full.
fn make_room<K: Clone + Eq + Hash, V>(
    map: &mut HashMap<K, V>,
    max: usize,
    last_used: impl Fn(&V) -> u64,
) {
    if map.len() >= max
        && let Some(lru) = least_recently_used(map, last_used)
    {
        map.remove(&lru);
    }
}
