//! Knowledge of the async runtimes' idle waits that the kernel cannot have.
//!
//! asyncio, uvloop, libuv and tokio's I/O driver idle in epoll, which the
//! kernel recognises by itself. A tokio worker that does not hold the
//! driver parks on a futex instead, indistinguishable in the kernel from a
//! lock. The kernel sends such waits as probes with the top of the user
//! stack; if a return address on it lies in tokio's park code, the futex is
//! that worker's park and the kernel is told to treat it as idle.

use crate::ingest::decode::ProbeRecord;
use crate::stacks::symbolize::Symbolizer;

/// Stack words scanned for a park return address.
const SCAN_WORDS: usize = 64;

/// Whether `function` (demangled) is a runtime's idle park.
pub fn is_park_function(function: &str) -> bool {
    // tokio: multi_thread::park::{Parker,Inner}::park*, the current-thread
    // scheduler's park, and park::CachedParkThread (block_on). Its blocking
    // pool waits for work in blocking::pool, which must not match: those
    // threads are meant to block and are never loops.
    function.contains("tokio::runtime::")
        && !function.contains("::blocking::")
        && (function.contains("::park::") || function.contains("::park"))
}

/// Whether a probed futex wait is the thread's runtime park.
pub fn probe_is_park(sym: &mut Symbolizer, probe: &ProbeRecord) -> bool {
    let words = probe
        .stack
        .chunks_exact(8)
        .take(SCAN_WORDS)
        .filter_map(|c| c.try_into().ok().map(u64::from_ne_bytes));
    for word in std::iter::once(probe.ip.wrapping_add(1)).chain(words) {
        // Return addresses point after the call: look up the call itself.
        let addr = word.wrapping_sub(1);
        if word < 0x1000 || !sym.is_code(probe.pid, addr) {
            continue;
        }
        if let Some(name) = sym.function_at(probe.pid, addr)
            && is_park_function(&name)
        {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokio_parks_are_idle() {
        for f in [
            "tokio::runtime::scheduler::multi_thread::park::Parker::park",
            "tokio::runtime::scheduler::multi_thread::park::Inner::park_condvar",
            "tokio::runtime::park::CachedParkThread::park",
            "tokio::runtime::scheduler::current_thread::Context::park",
        ] {
            assert!(is_park_function(f), "{f}");
        }
    }

    #[test]
    fn locks_and_the_blocking_pool_are_not() {
        for f in [
            "tokio::runtime::blocking::pool::Inner::run",
            "std::sys::sync::mutex::futex::Mutex::lock_contended",
            "std::sys::sync::condvar::futex::Condvar::wait_optional_timeout",
            "my_app::parking_lot_user",
            "tokio::sync::mutex::Mutex::lock",
        ] {
            assert!(!is_park_function(f), "{f}");
        }
    }
}
