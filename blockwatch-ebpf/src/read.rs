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

/// What the program's kernel pointers are. `Btf`: a tp_btf program's task
/// arguments, and the registers `bpf_task_pt_regs` finds, are typed by
/// BTF, and their fields are read by plain loads that the verifier checks
/// against the type and makes fault-safe (a fraction of a
/// `bpf_probe_read_kernel` call, on paths every context switch takes).
/// `StackTop`: a raw tracepoint's are plain numbers, read through the
/// helper, and a task's user registers are found at the top of its kernel
/// stack.
#[derive(Clone, Copy)]
pub(crate) enum Regs {
    Btf,
    StackTop,
}

impl Regs {
    /// The `T` at `base + offset`, where `base` is one of the program's
    /// own kernel pointers (see above) and `offset` a frozen global's
    /// (`OFFSETS`), a constant the verifier can check the load by.
    #[inline(always)]
    pub(crate) fn field<T: Copy + Default>(self, base: *const u8, offset: u32) -> T {
        match self {
            // SAFETY: the verifier admits the load only at a field of
            // `base`'s BTF type and turns a fault into a zero.
            Regs::Btf => unsafe { core::ptr::read_volatile(base.add(offset as usize) as *const T) },
            Regs::StackTop => kread(base, offset),
        }
    }
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

/// [`cpu_time`] of one of the program's own task pointers.
#[inline(always)]
pub(crate) fn cpu_time_of(task: *const u8, how: Regs) -> u64 {
    how.field(task, off().task_sum_exec)
}

/// The task (one of the program's own pointers) began to exit.
#[inline(always)]
pub(crate) fn exiting(task: *const u8, how: Regs) -> bool {
    how.field::<u32>(task, off().task_flags) & PF_EXITING != 0
}
