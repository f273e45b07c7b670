//! A loop's iteration clock: a value the runtime itself rewrites once per
//! iteration of its event loop, which the kernel reads (at a sample, at a
//! switch-out) to see that an iteration ended even when the loop never
//! sleeps in its idle wait (a saturated server). User space finds it once
//! per loop thread (`blockwatch::runtimes::clock`) and hands it to the
//! kernel in the `CLOCKS` map, keyed by TID.

/// No clock known for the thread: only its idle waits end episodes.
pub const CLOCK_NONE: u32 = 0;
/// A `u64` at `addr` that the runtime rewrites at the start of every
/// iteration: libuv's `uv_loop_t.time` (Node, uvloop), in milliseconds.
/// Only for a libuv older than 1.45: the loop's own code rewrites it in
/// mid-callback too (Node's timers, uvloop's `loop.time()` call
/// `uv_update_time`), which would end an episode there.
pub const CLOCK_WORD: u32 = 1;
/// CPython asyncio: the `end_time` local of `BaseEventLoop._run_once`, a
/// float computed once per iteration before its callbacks run. The kernel
/// finds the frame running `code` (the `_run_once` code object) in the
/// thread's frame chain and reads the object pointer at `offset` bytes
/// from that frame (the frame object on 3.10, the `_PyInterpreterFrame`
/// on 3.11+), then the float's bits at `value_offset` in that object.
pub const CLOCK_PY_LOCAL: u32 = 2;
/// libuv 1.45 and later: the loop's iteration count (`uv_metrics_t.loop_count`,
/// a `u64` at `addr`), which `uv_run` alone increments, once per iteration;
/// `time_addr` is `uv_loop_t.time`, where the new iteration's start is read.
pub const CLOCK_UV_COUNT: u32 = 3;
/// tokio: the worker's `tokio::runtime::context::CONTEXT` thread-local,
/// `offset` bytes (at most [`TLS_CLOCK_MAX`]) at `addr` from the thread
/// pointer (`addr` is an `i64`: the executable's static TLS lies below
/// it). Every task poll rewrites it (the current task's id, set as a poll
/// begins and cleared as it ends); the kernel folds the bytes into one
/// value.
pub const CLOCK_TLS_BLOCK: u32 = 4;
/// Bytes of a `CLOCK_TLS_BLOCK` the kernel reads at most.
pub const TLS_CLOCK_MAX: u64 = 128;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopClock {
    /// `CLOCK_*`.
    pub kind: u32,
    pub _pad: u32,
    /// `CLOCK_WORD`, `CLOCK_UV_COUNT`: the address of the word.
    /// `CLOCK_TLS_BLOCK`: the block's offset from the thread pointer.
    /// `CLOCK_PY_LOCAL`: where user
    /// space found the `_run_once` frame (the kernel checks it, and walks
    /// the thread's frames when it no longer holds).
    pub addr: u64,
    /// `CLOCK_PY_LOCAL`: the `_run_once` code object.
    pub code: u64,
    /// `CLOCK_PY_LOCAL`: byte offset of the local's slot in the frame.
    /// `CLOCK_TLS_BLOCK`: bytes to read.
    pub offset: u64,
    /// `CLOCK_PY_LOCAL`: byte offset of the value in the object
    /// (`PyFloatObject.ob_fval`).
    pub value_offset: u64,
    /// `CLOCK_UV_COUNT`: the address of the loop's time (ms), the start of
    /// its latest iteration.
    pub time_addr: u64,
}

pod!(LoopClock);

const _: () = {
    assert!(core::mem::size_of::<LoopClock>() == 48);
};
