//! Reading kernel and user memory: a failed read is a default value or
//! `false`, never a fault.

use aya_ebpf::helpers::{
    bpf_probe_read_kernel,
    generated::{bpf_probe_read_user, bpf_task_pt_regs},
};

use crate::maps::off;

/// `task_struct.flags`: the task is exiting (set before sched_process_exit).
const PF_EXITING: u32 = 0x4;

/// The `T` at `base + offset` in kernel memory.
#[inline(always)]
pub(crate) fn kread<T: Copy + Default>(base: *const u8, offset: u32) -> T {
    // SAFETY: bpf_probe_read_kernel faults safely; a failed read gives the
    // default, which every caller treats as "unknown".
    unsafe { bpf_probe_read_kernel(base.add(offset as usize) as *const T).unwrap_or_default() }
}

/// Copies `len` bytes of kernel memory (a map value) from `src` to `dst` in
/// one helper call: a plain copy of a large array is unrolled byte by byte
/// and runs the verifier out of instructions.
#[inline(always)]
pub(crate) fn kcopy(dst: *mut u8, len: usize, src: *const u8) -> bool {
    // SAFETY: `dst` holds at least `len` bytes; the helper faults safely.
    unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_kernel(
            dst as *mut _,
            len as u32,
            src as *const _,
        ) == 0
    }
}

/// The `T` at `addr` in the current task's user memory; zero on a fault.
#[inline(always)]
pub(crate) fn uread<T: Copy + Default>(addr: u64) -> T {
    let mut v = T::default();
    // SAFETY: the helper writes at most size_of::<T>() bytes into `v` and
    // zeroes it on a fault. Its result is ignored on purpose: a branch per
    // read would multiply the verifier's paths through the frame walk.
    unsafe {
        bpf_probe_read_user(
            &mut v as *mut T as *mut _,
            core::mem::size_of::<T>() as u32,
            addr as *const _,
        )
    };
    v
}

/// Copies `len` bytes of the current task's user memory at `src` to `dst`;
/// whether the whole read succeeded.
#[inline(always)]
pub(crate) fn read_user(dst: *mut u8, len: usize, src: u64) -> bool {
    // SAFETY: `dst` holds at least `len` bytes; the helper faults safely.
    unsafe { bpf_probe_read_user(dst as *mut _, len as u32, src as *const _) == 0 }
}

/// How to find a task's user registers: the BTF helper where the program
/// type allows it, the top of the task's kernel stack otherwise.
#[derive(Clone, Copy)]
pub(crate) enum Regs {
    Btf,
    StackTop,
}

/// The task's user registers (`struct pt_regs`); null when unknown.
#[inline(always)]
pub(crate) fn user_regs(task: *const u8, how: Regs) -> *const u8 {
    match how {
        // SAFETY: `task` is the tracepoint's task_struct argument.
        Regs::Btf => unsafe { bpf_task_pt_regs(task as *mut _) as *const u8 },
        Regs::StackTop => {
            let o = off();
            let stack: u64 = kread(task, o.task_stack);
            if stack == 0 {
                return core::ptr::null();
            }
            (stack + o.thread_size as u64 - o.pt_regs_size as u64) as *const u8
        }
    }
}

/// The task's CPU time so far (`se.sum_exec_runtime`), as the scheduler
/// keeps it.
#[inline(always)]
pub(crate) fn cpu_time(task: *const u8) -> u64 {
    kread(task, off().task_sum_exec)
}

/// The task began to exit.
#[inline(always)]
pub(crate) fn exiting(task: *const u8) -> bool {
    kread::<u32>(task, off().task_flags) & PF_EXITING != 0
}
