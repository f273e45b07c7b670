//! Any text is a valid daemon configuration or an error naming the file
//! and a line of it, never a panic.

#![no_main]

use std::path::Path;

use blockwatch::settings::{ConfigError, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/blockwatch/fuzz.toml");
    match parse(path, text) {
        Ok(settings) => {
            let _ = settings.describe();
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("fuzz.toml"), "error without the file: {msg}");
            match e {
                ConfigError::Invalid { line, .. } => {
                    let lines = text.split('\n').count();
                    assert!(
                        (1..=lines).contains(&line),
                        "line {line} of a {lines}-line file: {msg}"
                    );
                }
                other => panic!("parse returned a non-parse error: {other}"),
            }
        }
    }
});
