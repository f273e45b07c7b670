//! What user space hands the kernel programs: the kernel's structure
//! offsets (a global frozen before load) and the settings in `CONFIG` and
//! `LOOP_CONFIG`, which may change while attached.

/// Syscall numbers covered by [`LoopConfig::strict_nrs`].
pub const STRICT_MAX_NR: usize = 512;

/// Kernel structure offsets read from the running kernel's BTF by user
/// space, handed to the programs as read-only globals before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_comm: u32,
    pub task_stack: u32,
    pub pt_regs_orig_ax: u32,
    pub pt_regs_ip: u32,
    pub pt_regs_sp: u32,
    pub pt_regs_di: u32,
    pub pt_regs_si: u32,
    pub pt_regs_dx: u32,
    pub pt_regs_size: u32,
    pub thread_size: u32,
    /// `task_struct.thread.fsbase`: the thread pointer, i.e. its pthread_t.
    pub task_fsbase: u32,
    pub pt_regs_bp: u32,
    /// `task_struct.flags` (`PF_EXITING` once the task began to exit).
    pub task_flags: u32,
    /// `task_struct.thread_pid`: the task's `struct pid`, whose `numbers`
    /// hold its PID in every namespace from the host's down.
    pub task_thread_pid: u32,
    /// `task_struct.group_leader`: the process's main thread.
    pub task_group_leader: u32,
    /// `pid.level`: how deep the task's own PID namespace is (0: host).
    pub pid_level: u32,
    /// `pid.numbers`: one `struct upid` per level.
    pub pid_numbers: u32,
    /// `sizeof(struct upid)`.
    pub upid_size: u32,
    /// `upid.nr`: the PID at that level.
    pub upid_nr: u32,
    /// `upid.ns`: the namespace of that level.
    pub upid_ns: u32,
    /// `pid_namespace.ns.inum`: the namespace's inode number, as
    /// `/proc/PID/ns/pid` shows it.
    pub pidns_inum: u32,
    /// `task_struct.files`, `files_struct.fdt`, `fdtable.fd`,
    /// `fdtable.max_fds` and `file.f_op`: which file a task's fd holds.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub fdtable_max_fds: u32,
    pub file_f_op: u32,
    /// `task_struct.se.sum_exec_runtime`: the thread's CPU time, kept by
    /// the scheduler itself.
    pub task_sum_exec: u32,
}

impl KernelOffsets {
    /// All zero: the kernel's initialiser, overwritten before load.
    pub const ZERO: Self = Self {
        task_pid: 0,
        task_tgid: 0,
        task_comm: 0,
        task_stack: 0,
        pt_regs_orig_ax: 0,
        pt_regs_ip: 0,
        pt_regs_sp: 0,
        pt_regs_di: 0,
        pt_regs_si: 0,
        pt_regs_dx: 0,
        pt_regs_size: 0,
        thread_size: 0,
        task_fsbase: 0,
        pt_regs_bp: 0,
        task_flags: 0,
        task_thread_pid: 0,
        task_group_leader: 0,
        pid_level: 0,
        pid_numbers: 0,
        upid_size: 0,
        upid_nr: 0,
        upid_ns: 0,
        pidns_inum: 0,
        task_files: 0,
        files_fdt: 0,
        fdtable_fd: 0,
        fdtable_max_fds: 0,
        file_f_op: 0,
        task_sum_exec: 0,
    };
}

/// Runtime settings of the off-CPU detector, `CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// Episode wall time at or above which it is sent; CPU samples of an
    /// episode begin at half of it.
    pub threshold_ns: u64,
    /// Send `Exec` records for every exec on the host (process-name rules).
    pub notify_all_execs: u8,
    /// Entries of `COMM_MATCHES` in use (at most `COMM_MATCH_MAX`).
    pub comm_matches: u8,
    pub _pad: [u8; 6],
}

/// Settings of strict mode, `LOOP_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LoopConfig {
    /// 1 when the syscall tracepoints are attached (`--strict`).
    pub strict: u8,
    pub _pad: [u8; 7],
    /// Bitmap of the syscalls strict mode counts (bit `nr % 64` of word
    /// `nr / 64`), chosen by user space.
    pub strict_nrs: [u64; STRICT_MAX_NR / 64],
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            strict: 0,
            _pad: [0; 7],
            strict_nrs: [0; STRICT_MAX_NR / 64],
        }
    }
}

impl LoopConfig {
    /// Whether strict mode counts syscall `nr`.
    #[inline(always)]
    pub fn counts_strict(&self, nr: i64) -> bool {
        if !(0..STRICT_MAX_NR as i64).contains(&nr) {
            return false;
        }
        let nr = nr as usize;
        match self.strict_nrs.get(nr / 64) {
            Some(w) => w & (1u64 << (nr % 64)) != 0,
            None => false,
        }
    }
}

pod!(KernelOffsets, Config, LoopConfig);

const _: () = {
    assert!(core::mem::size_of::<KernelOffsets>() == 116);
    assert!(core::mem::size_of::<Config>() == 16);
    assert!(core::mem::size_of::<LoopConfig>() == 8 + STRICT_MAX_NR / 8);
};
