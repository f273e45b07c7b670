//! Decoding of ring-buffer records written by the kernel programs.
//!
//! The kernel is trusted to write the layouts in `blockwatch-common`, but a
//! short or unknown record (a version mismatch, a truncated read) must
//! become an error, never a panic or an out-of-bounds read.

use blockwatch_common::{
    BlockEvent, COMM_LEN, KIND_BLOCK, KIND_EXEC, KIND_EXIT, KIND_PROBE, MAX_FRAMES, MAX_PY_FRAMES,
    PROBE_STACK_BYTES, ProbeEvent, PyFrameRef, STATE_DISK, STATE_PREEMPTED, STATE_SLEEPING,
    TaskEvent,
};
use blockwatch_common::{KIND_USER_STACK, MAX_USER_STACK, USER_STACK_HEADER};

use blockwatch_common::{KIND_SAMPLE, KIND_STALL, KIND_STRICT, LoopEvent};

use crate::event::OffState;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is too short to hold a kind")]
    Empty(usize),
    #[error("record kind {kind} needs {need} bytes, got {got}")]
    Short { kind: u32, need: usize, got: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("unknown off-CPU state {0}")]
    UnknownState(u8),
}

/// A blocking wait of a tagged thread, as the kernel saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRecord {
    pub pid: u32,
    pub tid: u32,
    pub state: OffState,
    pub syscall: i64,
    pub args: [u64; 3],
    /// `CLOCK_MONOTONIC` nanoseconds at switch-out.
    pub start_ns: u64,
    pub duration_ns: u64,
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

/// The top of a blocked thread's user stack, sent just before the
/// [`BlockRecord`] of the same wait (same `tid` and `start_ns`).
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

/// What a [`LoopRecord`] reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopKind {
    /// A blocking-class syscall that stayed on the CPU (`--strict`).
    Strict,
    /// An on-CPU stack sample of a busy loop thread.
    Sample,
    /// A busy period over the stall threshold, ended.
    Stall,
}

/// A record of the strict and stall detectors (`LoopEvent`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoopRecord {
    pub kind: LoopKind,
    pub pid: u32,
    pub tid: u32,
    /// Strict: the syscall; otherwise -1.
    pub syscall: i64,
    pub args: [u64; 3],
    /// Strict: syscall entry; sample, stall: start of the busy period.
    pub start_ns: u64,
    /// Strict: time in the syscall; sample, stall: on-CPU time so far.
    pub duration_ns: u64,
    /// Sample, stall: wall time since the busy period began.
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
    /// A strict call, a stall or a stall's stack sample.
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
}

fn read<T: Copy>(bytes: &[u8], kind: u32) -> Result<T, DecodeError> {
    let need = std::mem::size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short {
            kind,
            need,
            got: bytes.len(),
        });
    }
    // SAFETY: length checked above; every T here is a plain-old-data
    // repr(C) type valid for any bit pattern; read_unaligned has no
    // alignment requirement.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const T) })
}

/// Addresses at or above this are not user space (x86-64, 47-bit).
const USER_SPACE_END: u64 = 0x0000_8000_0000_0000;

pub fn comm_str(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
    let kind = u32::from_ne_bytes(
        bytes
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .ok_or(DecodeError::Empty(bytes.len()))?,
    );
    match kind {
        KIND_BLOCK => {
            let ev: BlockEvent = read(bytes, kind)?;
            let state = match ev.state {
                STATE_SLEEPING => OffState::Sleeping,
                STATE_DISK => OffState::Disk,
                STATE_PREEMPTED => OffState::Preempted,
                s => return Err(DecodeError::UnknownState(s)),
            };
            let frames = (ev.frames as usize).min(MAX_FRAMES);
            Ok(Record::Block(BlockRecord {
                pid: ev.pid,
                tid: ev.tid,
                state,
                syscall: ev.syscall,
                args: ev.args,
                start_ns: ev.start_ns,
                duration_ns: ev.duration_ns,
                thread: comm_str(&ev.comm),
                ips: ev.ips[..frames]
                    .iter()
                    .copied()
                    // A frame-pointer walk through code built without them
                    // ends in garbage: stop at the first impossible address.
                    .take_while(|&ip| (0x1000..USER_SPACE_END).contains(&ip))
                    .collect(),
                py: ev.py[..(ev.py_frames as usize).min(MAX_PY_FRAMES)].to_vec(),
            }))
        }
        KIND_PROBE => {
            let ev: ProbeEvent = read(bytes, kind)?;
            let len = (ev.stack_len as usize).min(PROBE_STACK_BYTES);
            Ok(Record::Probe(ProbeRecord {
                pid: ev.pid,
                tid: ev.tid,
                uaddr: ev.uaddr,
                ip: ev.ip,
                sp: ev.sp,
                stack: ev.stack[..len].to_vec(),
            }))
        }
        KIND_USER_STACK => {
            // Variable length: the header, then `len` bytes of stack.
            let header = bytes.get(..USER_STACK_HEADER).ok_or(DecodeError::Short {
                kind,
                need: USER_STACK_HEADER,
                got: bytes.len(),
            })?;
            let u32_at = |i: usize| u32::from_ne_bytes(header[i..i + 4].try_into().expect("4"));
            let u64_at = |i: usize| u64::from_ne_bytes(header[i..i + 8].try_into().expect("8"));
            let len = (u32_at(12) as usize).min(MAX_USER_STACK);
            let stack = bytes
                .get(USER_STACK_HEADER..USER_STACK_HEADER + len)
                .ok_or(DecodeError::Short {
                    kind,
                    need: USER_STACK_HEADER + len,
                    got: bytes.len(),
                })?;
            Ok(Record::UserStack(UserStackRecord {
                pid: u32_at(4),
                tid: u32_at(8),
                start_ns: u64_at(16),
                ip: u64_at(24),
                sp: u64_at(32),
                bp: u64_at(40),
                stack: stack.to_vec(),
            }))
        }
        KIND_STRICT | KIND_SAMPLE | KIND_STALL => {
            let ev: LoopEvent = read(bytes, kind)?;
            let frames = (ev.frames as usize).min(MAX_FRAMES);
            Ok(Record::Loop(LoopRecord {
                kind: match kind {
                    KIND_STRICT => LoopKind::Strict,
                    KIND_SAMPLE => LoopKind::Sample,
                    _ => LoopKind::Stall,
                },
                pid: ev.pid,
                tid: ev.tid,
                syscall: ev.syscall,
                args: ev.args,
                start_ns: ev.start_ns,
                duration_ns: ev.duration_ns,
                busy_ns: ev.busy_ns,
                thread: comm_str(&ev.comm),
                ips: ev.ips[..frames]
                    .iter()
                    .copied()
                    .take_while(|&ip| (0x1000..USER_SPACE_END).contains(&ip))
                    .collect(),
                py: ev.py[..(ev.py_frames as usize).min(MAX_PY_FRAMES)].to_vec(),
            }))
        }
        KIND_EXEC | KIND_EXIT => {
            let ev: TaskEvent = read(bytes, kind)?;
            Ok(if kind == KIND_EXEC {
                Record::Exec {
                    pid: ev.pid,
                    tid: ev.tid,
                    comm: comm_str(&ev.comm),
                }
            } else {
                Record::Exit {
                    pid: ev.pid,
                    tid: ev.tid,
                    group_dead: ev.aux != 0,
                }
            })
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a repr(C) POD value.
        unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
            .to_vec()
    }

    fn block() -> BlockEvent {
        let mut comm = [0u8; COMM_LEN];
        comm[..7].copy_from_slice(b"python3");
        let mut ips = [0u64; MAX_FRAMES];
        ips[0] = 0x7f00_0000_1000;
        ips[1] = 0x5500_0000_2000;
        BlockEvent {
            kind: KIND_BLOCK,
            pid: 10,
            tid: 11,
            state: STATE_SLEEPING,
            _pad: [0; 3],
            syscall: 230,
            args: [1, 0, 0x7ffd_0000],
            start_ns: 5_000,
            duration_ns: 80_000_000,
            comm,
            frames: 2,
            py_frames: 1,
            ips,
            py: [PyFrameRef {
                code: 0x1234,
                instr: 0x5678,
            }; MAX_PY_FRAMES],
        }
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
        ev.frames = 10_000;
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
            ev.state = raw;
            let Record::Block(b) = decode(&bytes_of(&ev)).unwrap() else {
                panic!()
            };
            assert_eq!(b.state, want);
        }
        let mut ev = block();
        ev.state = 9;
        assert_eq!(decode(&bytes_of(&ev)), Err(DecodeError::UnknownState(9)));
    }

    #[test]
    fn short_and_unknown_records_are_errors() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty(0)));
        assert_eq!(decode(&[1, 0]), Err(DecodeError::Empty(2)));
        let full = bytes_of(&block());
        assert!(matches!(
            decode(&full[..100]),
            Err(DecodeError::Short {
                kind: KIND_BLOCK,
                ..
            })
        ));
        assert_eq!(
            decode(&77u32.to_ne_bytes()),
            Err(DecodeError::UnknownKind(77))
        );
    }

    #[test]
    fn probe_stack_length_is_bounded() {
        let ev = ProbeEvent {
            kind: KIND_PROBE,
            pid: 1,
            tid: 2,
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
        let mut b = Vec::new();
        for v in [KIND_USER_STACK, 7, 8, len] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        for v in [
            1_000u64,
            0x5555_0000_1234,
            0x7ffd_0000_0100,
            0x7ffd_0000_0200,
        ] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
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
            Err(DecodeError::Short {
                kind: KIND_USER_STACK,
                ..
            })
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
            kind: KIND_EXIT,
            pid: 5,
            tid: 6,
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
            kind: KIND_EXEC,
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
    }
}

#[cfg(test)]
mod loop_tests {
    use super::*;

    fn loop_event(kind: u32) -> LoopEvent {
        let mut comm = [0u8; COMM_LEN];
        comm[..7].copy_from_slice(b"python3");
        let mut ips = [0u64; MAX_FRAMES];
        ips[0] = 0x7f00_0000_1000;
        ips[1] = 0xffff_ffff_8100_0000;
        LoopEvent {
            kind,
            pid: 10,
            tid: 11,
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

    fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a repr(C) POD value.
        unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
            .to_vec()
    }

    #[test]
    fn loop_records_decode_with_bounded_stacks() {
        for (raw, kind) in [
            (KIND_STRICT, LoopKind::Strict),
            (KIND_SAMPLE, LoopKind::Sample),
            (KIND_STALL, LoopKind::Stall),
        ] {
            let Record::Loop(r) = decode(&bytes_of(&loop_event(raw))).unwrap() else {
                panic!("not a loop record")
            };
            assert_eq!(r.kind, kind);
            assert_eq!((r.pid, r.tid, r.syscall), (10, 11, 257));
            assert_eq!((r.start_ns, r.duration_ns, r.busy_ns), (5, 12_000, 20_000));
            assert_eq!(r.thread, "python3");
            // Kernel addresses end the stack; counts are clamped.
            assert_eq!(r.ips, [0x7f00_0000_1000]);
            assert_eq!(r.py.len(), MAX_PY_FRAMES);
        }
        let full = bytes_of(&loop_event(KIND_STALL));
        assert!(matches!(
            decode(&full[..200]),
            Err(DecodeError::Short {
                kind: KIND_STALL,
                ..
            })
        ));
    }
}
