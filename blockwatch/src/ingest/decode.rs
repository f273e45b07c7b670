//! Decoding of ring-buffer records written by the kernel programs.
//!
//! The kernel is trusted to write the layouts in `blockwatch-common`, but a
//! short or unknown record (a version mismatch, a truncated read) must
//! become an error, never a panic or an out-of-bounds read.

use blockwatch_common::x86_64::USER_SPACE_END;
use blockwatch_common::{
    BlockEvent, BlockStacks, COMM_LEN, LoopEvent, MAX_FRAMES, MAX_PY_FRAMES, MAX_USER_STACK,
    PROBE_STACK_BYTES, ProbeEvent, PyFrameRef, RecordHeader, RecordKind, STATE_DISK,
    STATE_PREEMPTED, STATE_RUNNING, STATE_SLEEPING, StrictEvent, StrictKey, TaskEvent,
    UserStackHead,
};

use crate::event::OffState;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is too short to hold a record header")]
    Empty(usize),
    #[error("record kind {kind} needs {need} bytes, got {got}")]
    Short { kind: u32, need: usize, got: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("unknown off-CPU state {0}")]
    UnknownState(u8),
}

/// A loop episode at or over the threshold, as the kernel saw it: its wall
/// time, where that time went, and its longest wait (`state`, `syscall`,
/// `args`, the stacks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRecord {
    pub pid: u32,
    pub tid: u32,
    /// How the longest wait was off the CPU; `Running` when there was none.
    pub state: OffState,
    pub syscall: i64,
    pub args: [u64; 3],
    /// `CLOCK_MONOTONIC` nanoseconds at the episode's start.
    pub start_ns: u64,
    /// The episode's wall time.
    pub duration_ns: u64,
    /// On-CPU time, and off-CPU time sleeping, in disk waits, preempted.
    pub run_ns: u64,
    pub off_ns: [u64; 3],
    /// The longest wait: its switch-out (its user stack's key) and length.
    pub wait_start_ns: u64,
    pub wait_ns: u64,
    pub waits: u32,
    /// CPU samples the kernel sent for the episode.
    pub samples: u32,
    /// The longest wait's call site, and whether its native stack was left
    /// out because user space has it (`ips` is then empty).
    pub site: u64,
    pub site_known: bool,
    /// Thread name.
    pub thread: String,
    /// User stack, innermost first.
    pub ips: Vec<u64>,
    /// Interpreter frames (CPython), innermost first.
    pub py: Vec<PyFrameRef>,
}

/// A futex wait user space must classify (runtime park or lock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeRecord {
    pub pid: u32,
    pub tid: u32,
    pub uaddr: u64,
    pub ip: u64,
    pub sp: u64,
    /// User stack bytes from `sp` up.
    pub stack: Vec<u8>,
}

/// The top of a thread's user stack: a blocked thread's, sent just before
/// the [`BlockRecord`] whose longest wait it is (same `tid`, `start_ns` =
/// its `wait_start_ns`), or a CPU sample's, sent just before the sample
/// (same `tid` and `start_ns`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserStackRecord {
    pub pid: u32,
    pub tid: u32,
    pub start_ns: u64,
    /// User registers at switch-out.
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// Stack bytes from `sp` up.
    pub stack: Vec<u8>,
}

/// The first call of a strict call site (`--strict`): its stacks, sent
/// once per site (the kernel counts the calls in `STRICT_COUNTS`), just
/// after the [`UserStackRecord`] copied at the call (same `tid` and
/// `start_ns`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StrictRecord {
    pub pid: u32,
    pub tid: u32,
    pub syscall: i64,
    pub args: [u64; 3],
    /// `CLOCK_MONOTONIC` nanoseconds at syscall entry.
    pub start_ns: u64,
    pub duration_ns: u64,
    /// The call site's hash (`StrictKey::site`).
    pub site: u64,
    pub thread: String,
    pub ips: Vec<u64>,
    pub py: Vec<PyFrameRef>,
}

impl StrictRecord {
    /// The site's key in the kernel's `STRICT_COUNTS`.
    pub fn key(&self) -> StrictKey {
        StrictKey {
            tgid: self.pid,
            tid: self.tid,
            nr: self.syscall as u32,
            _pad: 0,
            site: self.site,
        }
    }
}

/// An episode's CPU sample (`LoopEvent`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopRecord {
    pub pid: u32,
    pub tid: u32,
    /// -1: no syscall.
    pub syscall: i64,
    pub args: [u64; 3],
    /// Start of its episode.
    pub start_ns: u64,
    /// The episode's on-CPU time so far.
    pub duration_ns: u64,
    /// Sample: wall time since the episode began.
    pub busy_ns: u64,
    pub thread: String,
    pub ips: Vec<u64>,
    pub py: Vec<PyFrameRef>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Block(BlockRecord),
    UserStack(UserStackRecord),
    Probe(ProbeRecord),
    /// A strict call site's first call.
    Strict(StrictRecord),
    /// An episode's CPU sample.
    Loop(LoopRecord),
    /// Process `pid` exec'd (from thread `tid`).
    Exec {
        pid: u32,
        tid: u32,
        comm: String,
    },
    /// Task `tid` of `pid` exited; `group_dead` when the whole process is gone.
    Exit {
        pid: u32,
        tid: u32,
        group_dead: bool,
    },
    /// Thread `tid` of `pid` was just seen idling in its loop's wait for
    /// the first time.
    LoopFound {
        pid: u32,
        tid: u32,
        /// The loop's epoll fd; -1 for a loop that parks on a futex.
        epfd: i32,
    },
}

/// The `T` at the start of `bytes`, if they are long enough.
fn read_prefix<T: Copy>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: length checked above; every T here is a plain-old-data
    // repr(C) type valid for any bit pattern; read_unaligned has no
    // alignment requirement.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

/// The record of kind `kind` that `bytes` hold, as its type `T`.
fn read<T: Copy>(bytes: &[u8], kind: RecordKind) -> Result<T, DecodeError> {
    read_prefix(bytes).ok_or(DecodeError::Short {
        kind: kind as u32,
        need: size_of::<T>(),
        got: bytes.len(),
    })
}

pub fn comm_str(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Decodes one ring-buffer record: its header names the kind, the kind
/// the type the whole record is read as.
pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    let header: RecordHeader = read_prefix(bytes).ok_or(DecodeError::Empty(bytes.len()))?;
    let kind = RecordKind::from_u32(header.kind).ok_or(DecodeError::UnknownKind(header.kind))?;
    match kind {
        RecordKind::Block => decode_block(bytes),
        RecordKind::Probe => decode_probe(bytes),
        RecordKind::UserStack => decode_user_stack(bytes),
        RecordKind::Strict => decode_strict(bytes),
        RecordKind::Sample => decode_loop(bytes, kind),
        RecordKind::Exec | RecordKind::Exit | RecordKind::LoopFound => decode_task(bytes, kind),
    }
}

/// The frames of a recorded user stack: at most `n`, and none from the
/// first impossible address on (a frame-pointer walk through code built
/// without frame pointers ends in garbage).
fn user_ips(ips: &[u64; MAX_FRAMES], n: u32) -> Vec<u64> {
    ips[..(n as usize).min(MAX_FRAMES)]
        .iter()
        .copied()
        .take_while(|&ip| (0x1000..USER_SPACE_END).contains(&ip))
        .collect()
}

/// The first `n` recorded interpreter frames, at most all of them.
fn py_frames(py: &[PyFrameRef; MAX_PY_FRAMES], n: u32) -> Vec<PyFrameRef> {
    py[..(n as usize).min(MAX_PY_FRAMES)].to_vec()
}

fn decode_block(bytes: &[u8]) -> Result<Record, DecodeError> {
    let ev: BlockEvent = read(bytes, RecordKind::Block)?;
    // A record with a frame-pointer stack is a `BlockStacks`.
    let ips = if ev.frames == 0 {
        Vec::new()
    } else {
        let full: BlockStacks = read(bytes, RecordKind::Block)?;
        user_ips(&full.ips, ev.frames)
    };
    let state = match ev.state {
        STATE_SLEEPING => OffState::Sleeping,
        STATE_DISK => OffState::Disk,
        STATE_PREEMPTED => OffState::Preempted,
        STATE_RUNNING => OffState::Running,
        s => return Err(DecodeError::UnknownState(s)),
    };
    Ok(Record::Block(BlockRecord {
        pid: ev.header.pid,
        tid: ev.header.tid,
        state,
        syscall: ev.syscall,
        args: ev.args,
        start_ns: ev.start_ns,
        duration_ns: ev.duration_ns,
        run_ns: ev.run_ns,
        off_ns: ev.off_ns,
        wait_start_ns: ev.wait_start_ns,
        wait_ns: ev.wait_ns,
        waits: ev.waits,
        samples: ev.samples,
        site: ev.site,
        site_known: ev.site_known != 0,
        thread: comm_str(&ev.comm),
        ips,
        py: py_frames(&ev.py, ev.py_frames),
    }))
}

fn decode_probe(bytes: &[u8]) -> Result<Record, DecodeError> {
    let ev: ProbeEvent = read(bytes, RecordKind::Probe)?;
    let len = (ev.stack_len as usize).min(PROBE_STACK_BYTES);
    Ok(Record::Probe(ProbeRecord {
        pid: ev.header.pid,
        tid: ev.header.tid,
        uaddr: ev.uaddr,
        ip: ev.ip,
        sp: ev.sp,
        stack: ev.stack[..len].to_vec(),
    }))
}

/// Variable length: the fixed head, then `head.len` bytes of stack.
fn decode_user_stack(bytes: &[u8]) -> Result<Record, DecodeError> {
    let kind = RecordKind::UserStack;
    let head: UserStackHead = read(bytes, kind)?;
    let start = size_of::<UserStackHead>();
    let end = start + (head.len as usize).min(MAX_USER_STACK);
    let stack = bytes.get(start..end).ok_or(DecodeError::Short {
        kind: kind as u32,
        need: end,
        got: bytes.len(),
    })?;
    Ok(Record::UserStack(UserStackRecord {
        pid: head.header.pid,
        tid: head.header.tid,
        start_ns: head.start_ns,
        ip: head.ip,
        sp: head.sp,
        bp: head.bp,
        stack: stack.to_vec(),
    }))
}

fn decode_loop(bytes: &[u8], kind: RecordKind) -> Result<Record, DecodeError> {
    let ev: LoopEvent = read(bytes, kind)?;
    Ok(Record::Loop(LoopRecord {
        pid: ev.header.pid,
        tid: ev.header.tid,
        syscall: ev.syscall,
        args: ev.args,
        start_ns: ev.start_ns,
        duration_ns: ev.duration_ns,
        busy_ns: ev.busy_ns,
        thread: comm_str(&ev.comm),
        ips: user_ips(&ev.ips, ev.frames),
        py: py_frames(&ev.py, ev.py_frames),
    }))
}

fn decode_strict(bytes: &[u8]) -> Result<Record, DecodeError> {
    let ev: StrictEvent = read(bytes, RecordKind::Strict)?;
    Ok(Record::Strict(StrictRecord {
        pid: ev.header.pid,
        tid: ev.header.tid,
        syscall: ev.syscall,
        args: ev.args,
        start_ns: ev.start_ns,
        duration_ns: ev.duration_ns,
        site: ev.site,
        thread: comm_str(&ev.comm),
        ips: user_ips(&ev.ips, ev.frames),
        py: py_frames(&ev.py, ev.py_frames),
    }))
}

fn decode_task(bytes: &[u8], kind: RecordKind) -> Result<Record, DecodeError> {
    let ev: TaskEvent = read(bytes, kind)?;
    let (pid, tid) = (ev.header.pid, ev.header.tid);
    Ok(match kind {
        RecordKind::Exec => Record::Exec {
            pid,
            tid,
            comm: comm_str(&ev.comm),
        },
        RecordKind::LoopFound => Record::LoopFound {
            pid,
            tid,
            epfd: ev.aux as i32,
        },
        _ => Record::Exit {
            pid,
            tid,
            group_dead: ev.aux != 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a repr(C) POD value.
        unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
            .to_vec()
    }

    fn block() -> BlockStacks {
        let mut comm = [0u8; COMM_LEN];
        comm[..7].copy_from_slice(b"python3");
        let mut ips = [0u64; MAX_FRAMES];
        ips[0] = 0x7f00_0000_1000;
        ips[1] = 0x5500_0000_2000;
        BlockStacks {
            event: BlockEvent {
                header: RecordHeader::new(RecordKind::Block, 10, 11),
                state: STATE_SLEEPING,
                site_known: 0,
                _pad: [0; 2],
                syscall: 230,
                site: 0x5eed,
                args: [1, 0, 0x7ffd_0000],
                start_ns: 5_000,
                duration_ns: 80_000_000,
                run_ns: 1_000,
                off_ns: [79_999_000, 0, 0],
                wait_start_ns: 5_500,
                wait_ns: 79_999_000,
                waits: 1,
                samples: 0,
                comm,
                frames: 2,
                py_frames: 1,
                py: [PyFrameRef {
                    code: 0x1234,
                    instr: 0x5678,
                }; MAX_PY_FRAMES],
            },
            ips,
        }
    }

    /// A wait at a known call site: the event alone, no native stack.
    #[test]
    fn block_event_of_a_known_site_has_no_native_stack() {
        let mut full = block();
        full.event.frames = 0;
        full.event.site_known = 1;
        let Record::Block(b) = decode(&bytes_of(&full.event)).unwrap() else {
            panic!("not a block record");
        };
        assert!(b.ips.is_empty() && b.site_known && b.site == 0x5eed);
        assert_eq!(b.py.len(), 1);
        // A record that says it has frames must carry them.
        full.event.frames = 2;
        assert!(decode(&bytes_of(&full.event)).is_err());
    }

    #[test]
    fn block_event_round_trips() {
        let Record::Block(b) = decode(&bytes_of(&block())).unwrap() else {
            panic!("not a block record");
        };
        assert_eq!((b.pid, b.tid, b.syscall), (10, 11, 230));
        assert_eq!(b.state, OffState::Sleeping);
        assert_eq!(b.duration_ns, 80_000_000);
        assert_eq!(b.thread, "python3");
        assert_eq!(b.ips, vec![0x7f00_0000_1000, 0x5500_0000_2000]);
        assert_eq!(
            b.py,
            vec![PyFrameRef {
                code: 0x1234,
                instr: 0x5678
            }]
        );
    }

    #[test]
    fn frame_count_is_clamped_and_zero_terminated() {
        let mut ev = block();
        ev.event.frames = 10_000;
        let Record::Block(b) = decode(&bytes_of(&ev)).unwrap() else {
            panic!()
        };
        assert_eq!(b.ips.len(), 2);
    }

    #[test]
    fn states_map_to_names() {
        for (raw, want) in [
            (STATE_DISK, OffState::Disk),
            (STATE_PREEMPTED, OffState::Preempted),
        ] {
            let mut ev = block();
            ev.event.state = raw;
            let Record::Block(b) = decode(&bytes_of(&ev)).unwrap() else {
                panic!()
            };
            assert_eq!(b.state, want);
        }
        let mut ev = block();
        ev.event.state = 9;
        assert_eq!(decode(&bytes_of(&ev)), Err(DecodeError::UnknownState(9)));
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty(0)));
        assert_eq!(decode(&[1, 0]), Err(DecodeError::Empty(2)));
        let full = bytes_of(&block());
        assert!(matches!(
            decode(&full[..100]),
            Err(DecodeError::Short { kind: 1, .. })
        ));
        let unknown = RecordHeader {
            kind: 77,
            pid: 1,
            tid: 1,
        };
        assert_eq!(
            decode(&bytes_of(&unknown)),
            Err(DecodeError::UnknownKind(77))
        );
    }

    #[test]
    fn probe_stack_length_is_bounded() {
        let ev = ProbeEvent {
            header: RecordHeader::new(RecordKind::Probe, 1, 2),
            _pad: 0,
            uaddr: 0xdead,
            ip: 3,
            sp: 4,
            stack_len: u64::MAX,
            stack: [7; PROBE_STACK_BYTES],
        };
        let Record::Probe(p) = decode(&bytes_of(&ev)).unwrap() else {
            panic!()
        };
        assert_eq!(p.stack.len(), PROBE_STACK_BYTES);
        assert_eq!(p.uaddr, 0xdead);
    }

    fn user_stack_bytes(len: u32, stack: &[u8]) -> Vec<u8> {
        let mut b = bytes_of(&UserStackHead {
            header: RecordHeader::new(RecordKind::UserStack, 7, 8),
            len,
            start_ns: 1_000,
            ip: 0x5555_0000_1234,
            sp: 0x7ffd_0000_0100,
            bp: 0x7ffd_0000_0200,
        });
        b.extend_from_slice(stack);
        b
    }

    #[test]
    fn user_stack_is_variable_length_and_checked() {
        let bytes = user_stack_bytes(4, &[1, 2, 3, 4]);
        let Record::UserStack(u) = decode(&bytes).unwrap() else {
            panic!()
        };
        assert_eq!((u.pid, u.tid, u.start_ns), (7, 8, 1_000));
        assert_eq!(
            (u.ip, u.sp, u.bp),
            (0x5555_0000_1234, 0x7ffd_0000_0100, 0x7ffd_0000_0200)
        );
        assert_eq!(u.stack, [1, 2, 3, 4]);
        // A length past the record's end is an error, not a short read.
        assert!(matches!(
            decode(&user_stack_bytes(5, &[1, 2, 3, 4])),
            Err(DecodeError::Short { kind: 16, .. })
        ));
        assert!(matches!(
            decode(&bytes[..20]),
            Err(DecodeError::Short { .. })
        ));
    }

    #[test]
    fn task_events_decode() {
        let mut comm = [0u8; COMM_LEN];
        comm[..4].copy_from_slice(b"node");
        let ev = TaskEvent {
            header: RecordHeader::new(RecordKind::Exit, 5, 6),
            aux: 1,
            comm,
        };
        assert_eq!(
            decode(&bytes_of(&ev)).unwrap(),
            Record::Exit {
                pid: 5,
                tid: 6,
                group_dead: true
            }
        );
        let ev = TaskEvent {
            header: RecordHeader::new(RecordKind::Exec, 5, 6),
            ..ev
        };
        assert_eq!(
            decode(&bytes_of(&ev)).unwrap(),
            Record::Exec {
                pid: 5,
                tid: 6,
                comm: "node".into()
            }
        );
        let ev = TaskEvent {
            header: RecordHeader::new(RecordKind::LoopFound, 5, 7),
            aux: 9,
            ..ev
        };
        assert_eq!(
            decode(&bytes_of(&ev)).unwrap(),
            Record::LoopFound {
                pid: 5,
                tid: 7,
                epfd: 9
            }
        );
    }

    /// The fuzzer starts from seeds written in the record layout; one that
    /// no longer decodes as its name says would start it from noise.
    #[test]
    fn fuzz_seeds_decode_as_named() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/decode");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("fuzz/seeds/decode") {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let record = decode(&std::fs::read(&path).unwrap());
            let ok = match record {
                Ok(Record::Block(_)) => name.starts_with("block"),
                Ok(Record::Probe(_)) => name.starts_with("probe"),
                Ok(Record::UserStack(_)) => name == "user-stack",
                Ok(Record::Loop(_)) => name.starts_with("loop"),
                Ok(Record::Strict(_)) => name == "strict",
                Ok(Record::Exec { .. }) => name == "exec",
                Ok(Record::Exit { .. }) => name.starts_with("exit"),
                Ok(Record::LoopFound { .. }) => name == "loop-found",
                Err(_) => name.contains("short"),
            };
            assert!(ok, "seed {name}: {record:?}");
            seen += 1;
        }
        assert!(seen >= 10, "{seen} seeds");
    }

    fn loop_event(kind: RecordKind) -> LoopEvent {
        let mut comm = [0u8; COMM_LEN];
        comm[..7].copy_from_slice(b"python3");
        let mut ips = [0u64; MAX_FRAMES];
        ips[0] = 0x7f00_0000_1000;
        ips[1] = 0xffff_ffff_8100_0000;
        LoopEvent {
            header: RecordHeader::new(kind, 10, 11),
            _pad: 0,
            syscall: 257,
            args: [1, 2, 3],
            start_ns: 5,
            duration_ns: 12_000,
            busy_ns: 20_000,
            comm,
            frames: 500,
            py_frames: 1000,
            ips,
            py: [PyFrameRef { code: 1, instr: 2 }; MAX_PY_FRAMES],
        }
    }

    #[test]
    fn sample_records_decode_with_bounded_stacks() {
        let Record::Loop(r) = decode(&bytes_of(&loop_event(RecordKind::Sample))).unwrap() else {
            panic!("not a loop record")
        };
        assert_eq!((r.pid, r.tid, r.syscall), (10, 11, 257));
        assert_eq!((r.start_ns, r.duration_ns, r.busy_ns), (5, 12_000, 20_000));
        assert_eq!(r.thread, "python3");
        // Kernel addresses end the stack; counts are clamped.
        assert_eq!(r.ips, [0x7f00_0000_1000]);
        assert_eq!(r.py.len(), MAX_PY_FRAMES);
        let full = bytes_of(&loop_event(RecordKind::Sample));
        assert!(matches!(
            decode(&full[..200]),
            Err(DecodeError::Short { kind: 6, .. })
        ));
        // The stall record (kind 7) is gone with the stall detector.
        let mut gone = full.clone();
        gone[..4].copy_from_slice(&7u32.to_ne_bytes());
        assert!(matches!(decode(&gone), Err(DecodeError::UnknownKind(7))));
    }

    #[test]
    fn strict_records_decode_with_their_site_and_bounded_stacks() {
        let l = loop_event(RecordKind::Strict);
        let ev = StrictEvent {
            header: l.header,
            _pad: 0,
            syscall: 262,
            args: l.args,
            start_ns: 5,
            duration_ns: 12_000,
            site: 0xfeed,
            comm: l.comm,
            frames: l.frames,
            py_frames: l.py_frames,
            ips: l.ips,
            py: l.py,
        };
        let Record::Strict(r) = decode(&bytes_of(&ev)).unwrap() else {
            panic!("not a strict record")
        };
        assert_eq!((r.pid, r.tid, r.syscall, r.site), (10, 11, 262, 0xfeed));
        assert_eq!((r.start_ns, r.duration_ns), (5, 12_000));
        assert_eq!(r.ips, [0x7f00_0000_1000]);
        assert_eq!(r.py.len(), MAX_PY_FRAMES);
        let key = r.key();
        assert_eq!((key.tgid, key.tid, key.nr, key.site), (10, 11, 262, 0xfeed));
        let full = bytes_of(&ev);
        assert!(matches!(
            decode(&full[..200]),
            Err(DecodeError::Short { kind: 5, .. })
        ));
    }
}
