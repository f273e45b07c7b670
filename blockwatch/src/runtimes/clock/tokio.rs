//! tokio's iteration clock. A worker keeps its tick in a heap-allocated
//! core that no symbol names, and parks only when it runs out of tasks:
//! a worker kept busy by a saturated server parks rarely, and without a
//! clock its episodes ran together into "stalls" of many quick polls.
//!
//! Every task poll, though, rewrites the thread-local
//! `tokio::runtime::context::CONTEXT`: the current task's id is set as
//! the poll begins and cleared as it ends (`TaskIdGuard`), and the coop
//! budget is reset for each scheduled task. Nothing in it changes while
//! one poll computes or blocks in a syscall, so the kernel reads the
//! whole thread-local and folds its bytes into one value
//! (`CLOCK_TLS_BLOCK`): a changed value is a poll boundary. A poll that
//! polls ready tokio resources spends budget, which also changes the
//! block: such a poll may be split into several episodes, two polls are
//! never merged. Rust's layout of the struct is not fixed, which is why
//! no single field is read.
//!
//! The thread-local lives in the executable's static TLS block, at a
//! fixed offset below the thread pointer that the linker computes the
//! same way for every thread (x86-64's TLS variant II): the kernel adds
//! it to the thread's `fsbase`. A tokio linked into a shared library
//! (dynamic TLS) has no clock.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use blockwatch_common::{CLOCK_TLS_BLOCK, LoopClock, TLS_CLOCK_MAX};
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Endianness, Object, ObjectSymbol, SymbolKind};

/// The thread-local's path in both Rust manglings (legacy `_ZN…` and v0
/// `_R…` spell identifiers alike).
const CONTEXT: &[u8] = b"5tokio7runtime7context7CONTEXT";
/// Executables kept; cleared when full.
const MAX_CACHE: usize = 64;

/// Where tokio's `CONTEXT` lies in every thread of an executable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TlsBlock {
    /// Offset from the thread pointer (negative).
    pub offset: i64,
    /// Bytes to read, at most `TLS_CLOCK_MAX`.
    pub size: u64,
}

/// The clock of any tokio worker of process `pid`, when its executable
/// has tokio's `CONTEXT` in its static TLS.
pub(super) fn find(pid: u32) -> Option<LoopClock> {
    let exe = format!("/proc/{pid}/exe");
    let meta = std::fs::metadata(&exe).ok()?;
    let key = (meta.dev(), meta.ino(), meta.len());
    let block = {
        let cache = cache().lock().ok()?;
        cache.get(&key).copied()
    };
    let block = match block {
        Some(b) => b,
        None => {
            let b = context_block(Path::new(&exe));
            let mut cache = cache().lock().ok()?;
            if cache.len() >= MAX_CACHE {
                cache.clear();
            }
            cache.insert(key, b);
            b
        }
    }?;
    Some(LoopClock {
        kind: CLOCK_TLS_BLOCK,
        addr: block.offset as u64,
        offset: block.size,
        ..LoopClock::default()
    })
}

type Key = (u64, u64, u64);

fn cache() -> &'static Mutex<HashMap<Key, Option<TlsBlock>>> {
    static CACHE: OnceLock<Mutex<HashMap<Key, Option<TlsBlock>>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// tokio's `CONTEXT` in the ELF executable at `path`: its offset from the
/// thread pointer and its size. None when the file has no such TLS symbol.
pub(crate) fn context_block(path: &Path) -> Option<TlsBlock> {
    // ReadCache reads only what is parsed, not the whole executable.
    let cache = object::ReadCache::new(File::open(path).ok()?);
    let elf = ElfFile64::<Endianness, _>::parse(&cache).ok()?;
    let endian = elf.endian();
    let tls = elf
        .elf_header()
        .program_headers(endian, &cache)
        .ok()?
        .iter()
        .find(|p| p.p_type(endian) == object::elf::PT_TLS)?;
    let (vaddr, memsz, align) = (
        tls.p_vaddr(endian),
        tls.p_memsz(endian),
        tls.p_align(endian),
    );
    let sym = elf
        .symbols()
        .find(|s| s.kind() == SymbolKind::Tls && s.name_bytes().is_ok_and(has_context))?;
    let offset = tp_offset(vaddr, memsz, align, sym.address())?;
    Some(TlsBlock {
        offset,
        size: sym.size().clamp(1, TLS_CLOCK_MAX),
    })
}

fn has_context(name: &[u8]) -> bool {
    name.windows(CONTEXT.len()).any(|w| w == CONTEXT)
}

/// The offset from the thread pointer of the executable's TLS symbol at
/// `value` (its offset in the TLS segment), x86-64 variant II: the block
/// ends at the thread pointer, its start aligned as the segment asks
/// (the linker's local-exec offsets and glibc's and musl's layouts agree).
pub(crate) fn tp_offset(vaddr: u64, memsz: u64, align: u64, value: u64) -> Option<i64> {
    let align = align.max(1);
    if !align.is_power_of_two() || value >= memsz.max(1) {
        return None;
    }
    let below = memsz.checked_add(vaddr.wrapping_neg().wrapping_sub(memsz) & (align - 1))?;
    i64::try_from(value)
        .ok()?
        .checked_sub(i64::try_from(below).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_block_ends_at_the_thread_pointer() {
        // 80 bytes aligned to 8 at 0: the block is the 80 bytes below.
        assert_eq!(tp_offset(0x1000, 80, 8, 0), Some(-80));
        assert_eq!(tp_offset(0x1000, 80, 8, 72), Some(-8));
        // A segment size rounded up to its alignment.
        assert_eq!(tp_offset(0x1000, 0x128, 16, 0), Some(-0x130));
        // A segment whose start is not aligned keeps its misalignment.
        assert_eq!(tp_offset(0x1008, 0x128, 16, 0), Some(-0x128));
        // Nonsense is refused, not wrapped.
        assert_eq!(tp_offset(0, 80, 8, 80), None);
        assert_eq!(tp_offset(0, 80, 3, 0), None);
    }

    /// The thread pointer of the calling thread.
    fn fsbase() -> u64 {
        let mut fs: u64 = 0;
        const ARCH_GET_FS: libc::c_int = 0x1003;
        // SAFETY: ARCH_GET_FS writes one unsigned long at the pointer.
        let r = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_FS, &mut fs) };
        assert_eq!(r, 0, "arch_prctl(ARCH_GET_FS)");
        fs
    }

    /// This test binary's own `CONTEXT`, read as the kernel reads it.
    fn own_block(b: TlsBlock) -> Vec<u8> {
        let addr = fsbase().wrapping_add(b.offset as u64);
        // SAFETY: the calling thread's static TLS block, `size` bytes of
        // which are tokio's CONTEXT (checked by the caller's symbol).
        unsafe { std::slice::from_raw_parts(addr as *const u8, b.size as usize) }.to_vec()
    }

    /// The clock's promise, on the real tokio this crate links: one
    /// poll's block stays the same however long it computes, and each
    /// task's poll has a block of its own.
    #[test]
    fn each_task_poll_rewrites_the_block_and_nothing_else_does() {
        let block = context_block(Path::new("/proc/self/exe")).expect("tokio's CONTEXT in TLS");
        assert!(block.offset < 0 && block.size >= 16, "{block:?}");
        let rt = ::tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let polls = rt.block_on(async move {
            let mut tasks = Vec::new();
            for _ in 0..4 {
                tasks.push(::tokio::spawn(async move {
                    let before = own_block(block);
                    // A poll that computes: nothing rewrites the block.
                    let mut x = 0u64;
                    for i in 0..2_000_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    let after = own_block(block);
                    (before, after)
                }));
            }
            let mut polls = Vec::new();
            for t in tasks {
                polls.push(t.await.unwrap());
            }
            polls
        });
        for (before, after) in &polls {
            assert_eq!(before, after, "one poll, one block");
        }
        for (i, a) in polls.iter().enumerate() {
            for b in &polls[i + 1..] {
                assert_ne!(a.0, b.0, "two tasks' polls, two blocks");
            }
        }
    }
}
