//! Any byte string handed to the record decoder is a record or an error.

#![no_main]

use blockwatch::ingest::decode::{Record, decode};
use blockwatch_common::{MAX_FRAMES, MAX_PY_FRAMES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(record) = decode(data) else {
        return;
    };
    // What user space relies on after a successful decode.
    match &record {
        Record::Block(b) => {
            assert!(b.ips.len() <= MAX_FRAMES);
            assert!(b.py.len() <= MAX_PY_FRAMES);
            assert!(!b.thread.contains('\0'), "a thread name with its NUL");
        }
        Record::Strict(s) => {
            assert!(s.ips.len() <= MAX_FRAMES);
            assert!(s.py.len() <= MAX_PY_FRAMES);
            assert!(!s.thread.contains('\0'), "a thread name with its NUL");
        }
        Record::Exec { comm, .. } => assert!(!comm.contains('\0')),
        _ => {}
    }
    let _ = format!("{record:?}");
});
