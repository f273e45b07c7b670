//! Events and writers for the outputs' unit tests.

use std::io::{self, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use crate::event::{Class, Event, Frame, OffState};

/// A writer whose bytes only become visible on flush, so tests see
/// whether the reporter flushed.
#[derive(Clone, Default)]
pub struct Sink {
    pending: Arc<Mutex<Vec<u8>>>,
    flushed: Arc<Mutex<Vec<u8>>>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        let mut p = self.pending.lock().unwrap();
        self.flushed.lock().unwrap().append(&mut p);
        Ok(())
    }
}

impl Sink {
    pub fn text(&self) -> String {
        String::from_utf8(self.flushed.lock().unwrap().clone()).unwrap()
    }
    pub fn unflushed(&self) -> usize {
        self.pending.lock().unwrap().len()
    }
}

pub fn frame(addr: u64, function: Option<&str>, module: Option<&str>) -> Frame {
    Frame {
        address: addr,
        function: function.map(String::from),
        module: module.map(String::from),
        ..Frame::default()
    }
}

pub fn app_frame() -> Frame {
    Frame {
        file: Some("/srv/app/handlers.py".into()),
        line: Some(42),
        ..frame(
            0x5555_0000_1234,
            Some("handle_request"),
            Some("/usr/bin/python3.12"),
        )
    }
}

/// A wait of `ms` by python3[1234]'s MainThread, in disk sleep, with a
/// four-frame stack (libc, an unknown library frame, an inlined frame,
/// [`app_frame`]).
pub fn event(
    culprit: Option<Frame>,
    syscall: Option<&'static str>,
    nr: i64,
    class: Class,
    ms: u64,
) -> Event {
    Event {
        ts: UNIX_EPOCH + Duration::new(1_780_000_000, 123_456_789),
        pid: 1234,
        tid: 1240,
        comm: "python3".into(),
        thread: "MainThread".into(),
        advice: String::new(),
        syscall,
        syscall_nr: nr,
        class,
        duration_ns: ms * 1_000_000,
        state: OffState::Disk,
        stack: vec![
            frame(
                0x7f00_0000_1000,
                Some("__GI___libc_read"),
                Some("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            ),
            frame(0x7f00_0000_2000, None, Some("/usr/lib/libfoo.so.1")),
            Frame {
                inlined: true,
                ..frame(
                    0x5555_0000_1234,
                    Some("read_config"),
                    Some("/usr/bin/python3.12"),
                )
            },
            app_frame(),
        ]
        .into(),
        offender: culprit.clone(),
        culprit,
        detector: Default::default(),
        episode: None,
    }
}

/// `svc[1]` blocked `ms` in a file read with `stack`, whose frame
/// `culprit` (an index into it) is the culprit and offender: the
/// pictures' tests.
pub fn stack_event(stack: Vec<Frame>, culprit: Option<usize>, ms: u64) -> Event {
    let culprit = culprit.and_then(|i| stack.get(i).cloned());
    Event {
        ts: UNIX_EPOCH,
        pid: 1,
        tid: 1,
        comm: "svc".into(),
        thread: "svc".into(),
        stack: stack.into(),
        ..event(culprit, Some("read"), 0, Class::File, ms)
    }
}

pub fn read_event(ms: u64) -> Event {
    event(Some(app_frame()), Some("read"), 0, Class::File, ms)
}
