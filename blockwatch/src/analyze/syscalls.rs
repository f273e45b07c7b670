//! x86-64 syscall knowledge: numbers to names, what kind of wait a
//! blocking syscall is (its [`Class`]), and which calls `--strict` counts
//! (a property of the name, kept with its class in one table).
//!
//! The kernel side records the raw syscall number and the first three
//! arguments of the call a thread was blocked in; everything here is pure
//! so it can be tested without a kernel.
//!
//! Classification decisions worth knowing:
//! - `mmap`, `munmap`, `mremap`, `mprotect`, `brk`, `madvise` and friends
//!   are `other`, not `file`: malloc issues them all the time, and when
//!   they block it is on the process's mm lock or on reclaim, not on the
//!   application's file I/O. `msync` is `file` (it writes dirty pages).
//!   Page faults on mapped files are not syscalls (nr -1), hence `other`.
//! - `select`/`pselect6` with no descriptors and `poll`/`ppoll` with none
//!   are `sleep`: that is how sleeps are written (CPython before 3.11
//!   implemented `time.sleep` with `select`).
//! - `io_uring_enter` is `other`: runtimes use it for both network and
//!   disk I/O, and the argument does not say which.
//! - Metadata reads (xattr gets, `file_getattr`) are `stat`; metadata
//!   writes (xattr sets, `utimensat`, `file_setattr`) are `file`, like
//!   `chmod`.

use std::sync::OnceLock;

use crate::event::{Class, Frame};

/// Syscalls 0..=336, in order (`syscall_64.tbl`). Numbers 337..=423 are
/// unused on x86-64 (387..=423 are reserved to keep the tables of all
/// architectures aligned).
static LOW: [&str; 337] = [
    "read",                   // 0
    "write",                  // 1
    "open",                   // 2
    "close",                  // 3
    "stat",                   // 4
    "fstat",                  // 5
    "lstat",                  // 6
    "poll",                   // 7
    "lseek",                  // 8
    "mmap",                   // 9
    "mprotect",               // 10
    "munmap",                 // 11
    "brk",                    // 12
    "rt_sigaction",           // 13
    "rt_sigprocmask",         // 14
    "rt_sigreturn",           // 15
    "ioctl",                  // 16
    "pread64",                // 17
    "pwrite64",               // 18
    "readv",                  // 19
    "writev",                 // 20
    "access",                 // 21
    "pipe",                   // 22
    "select",                 // 23
    "sched_yield",            // 24
    "mremap",                 // 25
    "msync",                  // 26
    "mincore",                // 27
    "madvise",                // 28
    "shmget",                 // 29
    "shmat",                  // 30
    "shmctl",                 // 31
    "dup",                    // 32
    "dup2",                   // 33
    "pause",                  // 34
    "nanosleep",              // 35
    "getitimer",              // 36
    "alarm",                  // 37
    "setitimer",              // 38
    "getpid",                 // 39
    "sendfile",               // 40
    "socket",                 // 41
    "connect",                // 42
    "accept",                 // 43
    "sendto",                 // 44
    "recvfrom",               // 45
    "sendmsg",                // 46
    "recvmsg",                // 47
    "shutdown",               // 48
    "bind",                   // 49
    "listen",                 // 50
    "getsockname",            // 51
    "getpeername",            // 52
    "socketpair",             // 53
    "setsockopt",             // 54
    "getsockopt",             // 55
    "clone",                  // 56
    "fork",                   // 57
    "vfork",                  // 58
    "execve",                 // 59
    "exit",                   // 60
    "wait4",                  // 61
    "kill",                   // 62
    "uname",                  // 63
    "semget",                 // 64
    "semop",                  // 65
    "semctl",                 // 66
    "shmdt",                  // 67
    "msgget",                 // 68
    "msgsnd",                 // 69
    "msgrcv",                 // 70
    "msgctl",                 // 71
    "fcntl",                  // 72
    "flock",                  // 73
    "fsync",                  // 74
    "fdatasync",              // 75
    "truncate",               // 76
    "ftruncate",              // 77
    "getdents",               // 78
    "getcwd",                 // 79
    "chdir",                  // 80
    "fchdir",                 // 81
    "rename",                 // 82
    "mkdir",                  // 83
    "rmdir",                  // 84
    "creat",                  // 85
    "link",                   // 86
    "unlink",                 // 87
    "symlink",                // 88
    "readlink",               // 89
    "chmod",                  // 90
    "fchmod",                 // 91
    "chown",                  // 92
    "fchown",                 // 93
    "lchown",                 // 94
    "umask",                  // 95
    "gettimeofday",           // 96
    "getrlimit",              // 97
    "getrusage",              // 98
    "sysinfo",                // 99
    "times",                  // 100
    "ptrace",                 // 101
    "getuid",                 // 102
    "syslog",                 // 103
    "getgid",                 // 104
    "setuid",                 // 105
    "setgid",                 // 106
    "geteuid",                // 107
    "getegid",                // 108
    "setpgid",                // 109
    "getppid",                // 110
    "getpgrp",                // 111
    "setsid",                 // 112
    "setreuid",               // 113
    "setregid",               // 114
    "getgroups",              // 115
    "setgroups",              // 116
    "setresuid",              // 117
    "getresuid",              // 118
    "setresgid",              // 119
    "getresgid",              // 120
    "getpgid",                // 121
    "setfsuid",               // 122
    "setfsgid",               // 123
    "getsid",                 // 124
    "capget",                 // 125
    "capset",                 // 126
    "rt_sigpending",          // 127
    "rt_sigtimedwait",        // 128
    "rt_sigqueueinfo",        // 129
    "rt_sigsuspend",          // 130
    "sigaltstack",            // 131
    "utime",                  // 132
    "mknod",                  // 133
    "uselib",                 // 134
    "personality",            // 135
    "ustat",                  // 136
    "statfs",                 // 137
    "fstatfs",                // 138
    "sysfs",                  // 139
    "getpriority",            // 140
    "setpriority",            // 141
    "sched_setparam",         // 142
    "sched_getparam",         // 143
    "sched_setscheduler",     // 144
    "sched_getscheduler",     // 145
    "sched_get_priority_max", // 146
    "sched_get_priority_min", // 147
    "sched_rr_get_interval",  // 148
    "mlock",                  // 149
    "munlock",                // 150
    "mlockall",               // 151
    "munlockall",             // 152
    "vhangup",                // 153
    "modify_ldt",             // 154
    "pivot_root",             // 155
    "_sysctl",                // 156
    "prctl",                  // 157
    "arch_prctl",             // 158
    "adjtimex",               // 159
    "setrlimit",              // 160
    "chroot",                 // 161
    "sync",                   // 162
    "acct",                   // 163
    "settimeofday",           // 164
    "mount",                  // 165
    "umount2",                // 166
    "swapon",                 // 167
    "swapoff",                // 168
    "reboot",                 // 169
    "sethostname",            // 170
    "setdomainname",          // 171
    "iopl",                   // 172
    "ioperm",                 // 173
    "create_module",          // 174
    "init_module",            // 175
    "delete_module",          // 176
    "get_kernel_syms",        // 177
    "query_module",           // 178
    "quotactl",               // 179
    "nfsservctl",             // 180
    "getpmsg",                // 181
    "putpmsg",                // 182
    "afs_syscall",            // 183
    "tuxcall",                // 184
    "security",               // 185
    "gettid",                 // 186
    "readahead",              // 187
    "setxattr",               // 188
    "lsetxattr",              // 189
    "fsetxattr",              // 190
    "getxattr",               // 191
    "lgetxattr",              // 192
    "fgetxattr",              // 193
    "listxattr",              // 194
    "llistxattr",             // 195
    "flistxattr",             // 196
    "removexattr",            // 197
    "lremovexattr",           // 198
    "fremovexattr",           // 199
    "tkill",                  // 200
    "time",                   // 201
    "futex",                  // 202
    "sched_setaffinity",      // 203
    "sched_getaffinity",      // 204
    "set_thread_area",        // 205
    "io_setup",               // 206
    "io_destroy",             // 207
    "io_getevents",           // 208
    "io_submit",              // 209
    "io_cancel",              // 210
    "get_thread_area",        // 211
    "lookup_dcookie",         // 212
    "epoll_create",           // 213
    "epoll_ctl_old",          // 214
    "epoll_wait_old",         // 215
    "remap_file_pages",       // 216
    "getdents64",             // 217
    "set_tid_address",        // 218
    "restart_syscall",        // 219
    "semtimedop",             // 220
    "fadvise64",              // 221
    "timer_create",           // 222
    "timer_settime",          // 223
    "timer_gettime",          // 224
    "timer_getoverrun",       // 225
    "timer_delete",           // 226
    "clock_settime",          // 227
    "clock_gettime",          // 228
    "clock_getres",           // 229
    "clock_nanosleep",        // 230
    "exit_group",             // 231
    "epoll_wait",             // 232
    "epoll_ctl",              // 233
    "tgkill",                 // 234
    "utimes",                 // 235
    "vserver",                // 236
    "mbind",                  // 237
    "set_mempolicy",          // 238
    "get_mempolicy",          // 239
    "mq_open",                // 240
    "mq_unlink",              // 241
    "mq_timedsend",           // 242
    "mq_timedreceive",        // 243
    "mq_notify",              // 244
    "mq_getsetattr",          // 245
    "kexec_load",             // 246
    "waitid",                 // 247
    "add_key",                // 248
    "request_key",            // 249
    "keyctl",                 // 250
    "ioprio_set",             // 251
    "ioprio_get",             // 252
    "inotify_init",           // 253
    "inotify_add_watch",      // 254
    "inotify_rm_watch",       // 255
    "migrate_pages",          // 256
    "openat",                 // 257
    "mkdirat",                // 258
    "mknodat",                // 259
    "fchownat",               // 260
    "futimesat",              // 261
    "newfstatat",             // 262
    "unlinkat",               // 263
    "renameat",               // 264
    "linkat",                 // 265
    "symlinkat",              // 266
    "readlinkat",             // 267
    "fchmodat",               // 268
    "faccessat",              // 269
    "pselect6",               // 270
    "ppoll",                  // 271
    "unshare",                // 272
    "set_robust_list",        // 273
    "get_robust_list",        // 274
    "splice",                 // 275
    "tee",                    // 276
    "sync_file_range",        // 277
    "vmsplice",               // 278
    "move_pages",             // 279
    "utimensat",              // 280
    "epoll_pwait",            // 281
    "signalfd",               // 282
    "timerfd_create",         // 283
    "eventfd",                // 284
    "fallocate",              // 285
    "timerfd_settime",        // 286
    "timerfd_gettime",        // 287
    "accept4",                // 288
    "signalfd4",              // 289
    "eventfd2",               // 290
    "epoll_create1",          // 291
    "dup3",                   // 292
    "pipe2",                  // 293
    "inotify_init1",          // 294
    "preadv",                 // 295
    "pwritev",                // 296
    "rt_tgsigqueueinfo",      // 297
    "perf_event_open",        // 298
    "recvmmsg",               // 299
    "fanotify_init",          // 300
    "fanotify_mark",          // 301
    "prlimit64",              // 302
    "name_to_handle_at",      // 303
    "open_by_handle_at",      // 304
    "clock_adjtime",          // 305
    "syncfs",                 // 306
    "sendmmsg",               // 307
    "setns",                  // 308
    "getcpu",                 // 309
    "process_vm_readv",       // 310
    "process_vm_writev",      // 311
    "kcmp",                   // 312
    "finit_module",           // 313
    "sched_setattr",          // 314
    "sched_getattr",          // 315
    "renameat2",              // 316
    "seccomp",                // 317
    "getrandom",              // 318
    "memfd_create",           // 319
    "kexec_file_load",        // 320
    "bpf",                    // 321
    "execveat",               // 322
    "userfaultfd",            // 323
    "membarrier",             // 324
    "mlock2",                 // 325
    "copy_file_range",        // 326
    "preadv2",                // 327
    "pwritev2",               // 328
    "pkey_mprotect",          // 329
    "pkey_alloc",             // 330
    "pkey_free",              // 331
    "statx",                  // 332
    "io_pgetevents",          // 333
    "rseq",                   // 334
    "uretprobe",              // 335
    "uprobe",                 // 336
];

/// First number of [`HIGH`]: new syscalls of all architectures share
/// numbers from here on.
const HIGH_BASE: usize = 424;

/// Syscalls 424..=470, in order. The newest entries (like `uprobe` at
/// 336 and `listns` here) postdate many running kernels; those kernels
/// never report the numbers, so knowing the names costs nothing.
static HIGH: [&str; 47] = [
    "pidfd_send_signal",       // 424
    "io_uring_setup",          // 425
    "io_uring_enter",          // 426
    "io_uring_register",       // 427
    "open_tree",               // 428
    "move_mount",              // 429
    "fsopen",                  // 430
    "fsconfig",                // 431
    "fsmount",                 // 432
    "fspick",                  // 433
    "pidfd_open",              // 434
    "clone3",                  // 435
    "close_range",             // 436
    "openat2",                 // 437
    "pidfd_getfd",             // 438
    "faccessat2",              // 439
    "process_madvise",         // 440
    "epoll_pwait2",            // 441
    "mount_setattr",           // 442
    "quotactl_fd",             // 443
    "landlock_create_ruleset", // 444
    "landlock_add_rule",       // 445
    "landlock_restrict_self",  // 446
    "memfd_secret",            // 447
    "process_mrelease",        // 448
    "futex_waitv",             // 449
    "set_mempolicy_home_node", // 450
    "cachestat",               // 451
    "fchmodat2",               // 452
    "map_shadow_stack",        // 453
    "futex_wake",              // 454
    "futex_wait",              // 455
    "futex_requeue",           // 456
    "statmount",               // 457
    "listmount",               // 458
    "lsm_get_self_attr",       // 459
    "lsm_set_self_attr",       // 460
    "lsm_list_modules",        // 461
    "mseal",                   // 462
    "setxattrat",              // 463
    "getxattrat",              // 464
    "listxattrat",             // 465
    "removexattrat",           // 466
    "open_tree_attr",          // 467
    "file_getattr",            // 468
    "file_setattr",            // 469
    "listns",                  // 470
];

/// The name of x86-64 syscall `nr`, or `None` when `nr` is -1 (not in a
/// syscall), unassigned, or an x32 number (those carry bit 30 and never
/// reach a 64-bit task as such).
pub fn name(nr: i64) -> Option<&'static str> {
    let i = usize::try_from(nr).ok()?;
    LOW.get(i)
        .or_else(|| HIGH.get(i.checked_sub(HIGH_BASE)?))
        .copied()
}

/// What a file descriptor refers to, from its `/proc/PID/fd/N` link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FdKind {
    /// A path: regular files, directories, block devices.
    File,
    Socket,
    Pipe,
    /// Anonymous inodes (eventfd, timerfd, epoll, signalfd, pidfd),
    /// namespaces, and character devices under `/dev` (terminals,
    /// `/dev/fuse`): waits on them are not disk I/O.
    Other,
}

impl FdKind {
    /// Classifies a `readlink(/proc/PID/fd/N)` target such as
    /// `socket:[123]`, `pipe:[456]`, `anon_inode:[eventfd]` or a path.
    /// (As read by [`crate::procfs::with_fd_target`].)
    pub fn from_link_bytes(target: &[u8]) -> FdKind {
        if target.starts_with(b"socket:") {
            FdKind::Socket
        } else if target.starts_with(b"pipe:") {
            FdKind::Pipe
        } else if target.starts_with(b"/dev/") && !target.starts_with(b"/dev/shm/") {
            // A read of /dev/tty or /dev/pts/N waits for a person, not
            // for a disk; /dev/shm holds ordinary (tmpfs) files.
            FdKind::Other
        } else if target.starts_with(b"/") {
            FdKind::File
        } else {
            FdKind::Other
        }
    }
}

// Numbers the classification refers to by name.
mod sys {
    pub const READ: i64 = 0;
    pub const WRITE: i64 = 1;
    pub const POLL: i64 = 7;
    pub const PREAD64: i64 = 17;
    pub const PWRITE64: i64 = 18;
    pub const READV: i64 = 19;
    pub const WRITEV: i64 = 20;
    pub const SELECT: i64 = 23;
    pub const SENDFILE: i64 = 40;
    pub const FCNTL: i64 = 72;
    pub const SPLICE: i64 = 275;
    pub const PSELECT6: i64 = 270;
    pub const PPOLL: i64 = 271;
    pub const PREADV: i64 = 295;
    pub const PWRITEV: i64 = 296;
    pub const PREADV2: i64 = 327;
    pub const PWRITEV2: i64 = 328;
}

/// `fcntl` commands that wait for a record lock.
const F_SETLKW: u32 = 7;
const F_OFD_SETLKW: u32 = 38;

/// Calls whose class depends on what the descriptor in their first
/// argument is (a socket read is network, a file read is disk, a pipe read
/// is neither). For `sendfile` it is the output descriptor: sending a file
/// to a socket mostly waits on the socket; for `splice` it is the input.
///
/// Calls like `fsync` are absent on purpose: only files can be synced, so
/// looking the descriptor up would not change their class.
const BY_DESCRIPTOR: [i64; 12] = [
    sys::READ,
    sys::WRITE,
    sys::READV,
    sys::WRITEV,
    sys::PREAD64,
    sys::PWRITE64,
    sys::PREADV,
    sys::PWRITEV,
    sys::PREADV2,
    sys::PWRITEV2,
    sys::SENDFILE,
    sys::SPLICE,
];

/// The file descriptor in the first argument of the calls of
/// [`BY_DESCRIPTOR`]. `None` for every other call and for negative
/// descriptors (those fail at once, they never block).
pub fn fd_arg(nr: i64, args: &[u64; 3]) -> Option<i32> {
    if !BY_DESCRIPTOR.contains(&nr) {
        return None;
    }
    // The kernel reads descriptors as a C int: the low 32 bits.
    let fd = args[0] as u32 as i32;
    (fd >= 0).then_some(fd)
}

/// The class of a wait in syscall `nr` (-1: not in a syscall) with its
/// first three arguments, given the kind of the descriptor [`fd_arg`]
/// named when it could be resolved. Never returns [`Class::Gil`]: that
/// is decided from the futex address, elsewhere.
pub fn classify(nr: i64, args: &[u64; 3], fd: Option<FdKind>) -> Class {
    let by_fd = |unknown: Class| match fd {
        Some(FdKind::Socket) => Class::Net,
        Some(FdKind::File) => Class::File,
        Some(FdKind::Pipe | FdKind::Other) => Class::Other,
        None => unknown,
    };
    if name(nr).is_none() {
        return Class::Other;
    }
    match nr {
        // An unresolved descriptor (closed or reused by the time it was
        // looked up) is most often a file: sockets and pipes on a loop
        // thread are non-blocking and rarely show up here.
        _ if BY_DESCRIPTOR.contains(&nr) => by_fd(Class::File),
        sys::FCNTL => match args[1] as u32 {
            F_SETLKW | F_OFD_SETLKW => Class::Lock,
            _ => Class::Other,
        },
        // No descriptors to watch: a sleep with a timeout.
        // (The counts are C ints: only the low 32 bits count.)
        sys::SELECT | sys::PSELECT6 if args[0] as u32 == 0 => Class::Sleep,
        sys::POLL | sys::PPOLL if args[1] as u32 == 0 => Class::Sleep,
        _ => by_number(nr).unwrap_or(Class::Other),
    }
}

/// The class of syscall `nr` by its name's group, from a table made at
/// first use: every event is classified, and the groups' names would
/// otherwise be compared one by one.
fn by_number(nr: i64) -> Option<Class> {
    static TABLE: OnceLock<Vec<Option<Class>>> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..(HIGH_BASE + HIGH.len()) as i64)
            .map(|nr| name(nr).and_then(by_name).map(|g| g.class))
            .collect()
    });
    *table.get(usize::try_from(nr).ok()?)?
}

/// The class of a wait given the stack it was waited from, when the stack
/// says more than the syscall: Node's `execSync`/`spawnSync` wait for their
/// child in a private libuv loop (its own epoll instance, a pipe read), which
/// the syscall alone calls `net` or `other`, but it is a child-process wait.
pub fn refine_by_stack(class: Class, stack: &[Frame]) -> Class {
    // Every wait inside a synchronous spawn is for the child, reading its
    // pipes included.
    if matches!(class, Class::Net | Class::Other | Class::File)
        && stack.iter().any(is_sync_child_wait)
    {
        Class::Process
    } else {
        class
    }
}

/// Node's synchronous child-process machinery: the C++ runner, or the JS
/// `spawnSync` it is called from (named from V8's frames or a perf map).
fn is_sync_child_wait(f: &Frame) -> bool {
    f.function.as_deref().is_some_and(|n| {
        n.contains("node::SyncProcessRunner::")
            || n.split([' ', ':', '~', '*']).any(|w| w == "spawnSync")
    })
}

/// Syscalls of one class whose class follows from their name, and
/// whether `--strict` counts them.
struct Group {
    class: Class,
    /// `--strict` counts these on a loop thread even when they do not
    /// leave the CPU: those Home Assistant's checks call blocking
    /// (opening and inspecting files, listing directories, sleeping,
    /// file locks, syncing). Left out on purpose: calls that are the
    /// loop's own normal, non-blocking business (read/write/close and the
    /// socket calls on its sockets, pipes and eventfds, the futex of an
    /// uncontended lock or a wake-up, epoll/poll, process creation and
    /// `waitpid(WNOHANG)` for subprocesses); a file read shows up as the
    /// `open` before it.
    strict: bool,
    names: &'static [&'static str],
}

/// Every syscall with a class of its own; the rest are [`Class::Other`].
/// A name stands in one group only (tested). Not formatted by rustfmt,
/// which would put each name on a line of its own.
#[rustfmt::skip]
static GROUPS: &[Group] = &[
    Group::strict(Class::File, &[
        "open", "openat", "openat2", "creat", "fsync", "fdatasync", "sync", "syncfs",
        "sync_file_range", "truncate", "ftruncate", "fallocate", "rename", "renameat",
        "renameat2", "unlink", "unlinkat", "mkdir", "mkdirat", "rmdir", "link", "linkat",
        "symlink", "symlinkat", "chmod", "fchmodat", "chown", "fchownat", "copy_file_range",
    ]),
    // Reads and writes at an offset: [`classify`] asks their descriptor
    // first, like the plain ones below; but sockets and pipes have no
    // offset (ESPIPE), so these are file I/O and `--strict` counts them.
    Group::strict(Class::File, &[
        "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
    ]),
    Group::lax(Class::File, &[
        "open_by_handle_at", "close", "close_range", "mknod", "mknodat", "fchmod", "fchmodat2",
        "fchown", "lchown", "utime", "utimes", "futimesat", "utimensat", "setxattr",
        "lsetxattr", "fsetxattr", "setxattrat", "removexattr", "lremovexattr", "fremovexattr",
        "removexattrat", "file_setattr", "io_setup", "io_destroy", "io_submit", "io_cancel",
        "io_getevents", "io_pgetevents", "msync", "readahead", "fadvise64",
    ]),
    // The loop's own reads and writes (its sockets, pipes and eventfds):
    // [`classify`] asks their descriptor first; `File` is the class of
    // one it could not resolve.
    Group::lax(Class::File, &["read", "write", "readv", "writev", "sendfile", "splice"]),
    Group::strict(Class::Stat, &[
        "stat", "lstat", "fstat", "newfstatat", "statx", "access", "faccessat", "faccessat2",
        "getdents", "getdents64", "readlink", "readlinkat", "statfs", "fstatfs",
    ]),
    Group::lax(Class::Stat, &[
        "getxattr", "lgetxattr", "fgetxattr", "getxattrat", "listxattr", "llistxattr",
        "flistxattr", "listxattrat", "file_getattr", "name_to_handle_at",
    ]),
    Group::strict(Class::Sleep, &["nanosleep", "clock_nanosleep"]),
    Group::lax(Class::Sleep, &["pause"]),
    Group::strict(Class::Lock, &["flock"]),
    Group::lax(Class::Lock, &[
        "futex", "futex_wait", "futex_waitv", "futex_wake", "futex_requeue", "semop",
        "semtimedop",
    ]),
    Group::lax(Class::Net, &[
        "connect", "accept", "accept4", "recvfrom", "recvmsg", "recvmmsg", "sendto", "sendmsg",
        "sendmmsg", "shutdown", "poll", "ppoll", "select", "pselect6", "epoll_wait",
        "epoll_wait_old", "epoll_pwait", "epoll_pwait2",
    ]),
    Group::lax(Class::Process, &[
        "wait4", "waitid", "clone", "clone3", "fork", "vfork", "execve", "execveat",
    ]),
];

impl Group {
    const fn strict(class: Class, names: &'static [&'static str]) -> Self {
        Self {
            class,
            strict: true,
            names,
        }
    }

    const fn lax(class: Class, names: &'static [&'static str]) -> Self {
        Self {
            class,
            strict: false,
            names,
        }
    }
}

fn by_name(name: &str) -> Option<&'static Group> {
    GROUPS.iter().find(|g| g.names.contains(&name))
}

/// Whether `--strict` counts syscall `name` (see [`Group::strict`]).
pub fn is_strict(name: &str) -> bool {
    by_name(name).is_some_and(|g| g.strict)
}

/// The numbers of the syscalls `--strict` counts, as the kernel's bitmap
/// wants them.
pub fn strict_numbers() -> Vec<i64> {
    (0..512)
        .filter(|&nr| name(nr).is_some_and(is_strict))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_ARGS: [u64; 3] = [0; 3];

    #[test]
    fn the_class_table_is_the_groups() {
        for nr in -2..(HIGH_BASE + HIGH.len() + 2) as i64 {
            let by_group = name(nr).and_then(by_name).map(|g| g.class);
            assert_eq!(by_number(nr), by_group, "{nr}");
        }
    }

    #[test]
    fn well_known_numbers() {
        let known = [
            (0, "read"),
            (1, "write"),
            (2, "open"),
            (3, "close"),
            (4, "stat"),
            (7, "poll"),
            (9, "mmap"),
            (17, "pread64"),
            (23, "select"),
            (35, "nanosleep"),
            (40, "sendfile"),
            (42, "connect"),
            (56, "clone"),
            (59, "execve"),
            (61, "wait4"),
            (72, "fcntl"),
            (73, "flock"),
            (74, "fsync"),
            (87, "unlink"),
            (156, "_sysctl"),
            (186, "gettid"),
            (202, "futex"),
            (217, "getdents64"),
            (230, "clock_nanosleep"),
            (231, "exit_group"),
            (232, "epoll_wait"),
            (257, "openat"),
            (262, "newfstatat"),
            (270, "pselect6"),
            (271, "ppoll"),
            (281, "epoll_pwait"),
            (288, "accept4"),
            (299, "recvmmsg"),
            (307, "sendmmsg"),
            (318, "getrandom"),
            (332, "statx"),
            (334, "rseq"),
            (424, "pidfd_send_signal"),
            (425, "io_uring_setup"),
            (435, "clone3"),
            (437, "openat2"),
            (439, "faccessat2"),
            (441, "epoll_pwait2"),
            (449, "futex_waitv"),
            (450, "set_mempolicy_home_node"),
            (454, "futex_wake"),
            (455, "futex_wait"),
            (456, "futex_requeue"),
            (462, "mseal"),
            (466, "removexattrat"),
        ];
        for (nr, n) in known {
            assert_eq!(name(nr), Some(n), "syscall {nr}");
        }
    }

    #[test]
    fn unknown_numbers_have_no_name() {
        for nr in [
            -1,
            -2,
            i64::MIN,
            337,
            380,
            423,
            471,
            512,
            547,
            1 << 30,
            i64::MAX,
        ] {
            assert_eq!(name(nr), None, "syscall {nr}");
        }
    }

    #[test]
    fn table_is_dense_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for nr in (0..=336).chain(424..=470) {
            let n = name(nr).unwrap_or_else(|| panic!("{nr} has no name"));
            assert!(
                !n.is_empty()
                    && n.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            );
            assert!(seen.insert(n), "{n} appears twice");
        }
    }

    /// Cross-checks the table against the installed kernel headers, when
    /// there are any (they may be older than the table, never newer).
    #[test]
    fn matches_installed_headers() {
        let Ok(h) = std::fs::read_to_string("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
            .or_else(|_| std::fs::read_to_string("/usr/include/asm/unistd_64.h"))
        else {
            return;
        };
        let mut checked = 0;
        for line in h.lines() {
            let mut words = line.split_whitespace();
            let (Some("#define"), Some(macro_name), Some(num)) =
                (words.next(), words.next(), words.next())
            else {
                continue;
            };
            let (Some(n), Ok(num)) = (macro_name.strip_prefix("__NR_"), num.parse::<i64>()) else {
                continue;
            };
            assert_eq!(name(num), Some(n), "header defines {n} as {num}");
            checked += 1;
        }
        assert!(checked > 300, "only {checked} syscalls found in the header");
    }

    #[test]
    fn node_sync_child_process_waits_are_process() {
        let frame = |name: &str| Frame {
            function: Some(name.to_string()),
            ..Frame::default()
        };
        let exec_sync = [
            frame("epoll_pwait"),
            frame("uv_run"),
            frame("node::SyncProcessRunner::TryInitializeAndRunLoop(v8::Local<v8::Value>)"),
            frame("node::SyncProcessRunner::Run(v8::Local<v8::Value>)"),
        ];
        assert_eq!(refine_by_stack(Class::Net, &exec_sync), Class::Process);
        assert_eq!(refine_by_stack(Class::Other, &exec_sync), Class::Process);
        // Only the JS frames reached (perf map or V8 names).
        for js in [
            "spawnSync",
            "LazyCompile:~spawnSync node:child_process:843",
            "JS:*spawnSync",
        ] {
            let stack = [
                frame("epoll_pwait"),
                frame("Builtins_CallApiCallback"),
                frame(js),
            ];
            assert_eq!(refine_by_stack(Class::Net, &stack), Class::Process, "{js}");
        }
        // A lock stays a lock; a loop's own epoll under other code stays net.
        assert_eq!(refine_by_stack(Class::Lock, &exec_sync), Class::Lock);
        let other = [
            frame("epoll_pwait"),
            frame("uv_run"),
            frame("mySpawnSyncHelper"),
        ];
        assert_eq!(refine_by_stack(Class::Net, &other), Class::Net);
        assert_eq!(refine_by_stack(Class::Net, &[]), Class::Net);
    }

    #[test]
    fn fd_kinds() {
        for (link, kind) in [
            ("socket:[123456]", FdKind::Socket),
            ("pipe:[789]", FdKind::Pipe),
            ("anon_inode:[eventfd]", FdKind::Other),
            ("anon_inode:[eventpoll]", FdKind::Other),
            ("anon_inode:inotify", FdKind::Other),
            ("net:[4026531840]", FdKind::Other),
            ("", FdKind::Other),
            ("/var/lib/app/data.db", FdKind::File),
            ("/tmp/x (deleted)", FdKind::File),
            ("/dev/shm/segment", FdKind::File),
            ("/dev/pts/3", FdKind::Other),
            ("/dev/tty", FdKind::Other),
            // A file whose name looks like a socket link is still a file.
            ("/tmp/socket:[1]", FdKind::File),
        ] {
            assert_eq!(FdKind::from_link_bytes(link.as_bytes()), kind, "{link:?}");
        }
    }

    #[test]
    fn fd_arg_only_for_fd_dependent_calls() {
        let args = [5, 0, 0];
        for nr in [0, 1, 17, 18, 19, 20, 40, 275, 295, 296, 327, 328] {
            assert_eq!(fd_arg(nr, &args), Some(5), "syscall {nr}");
        }
        for nr in [-1, 2, 3, 7, 42, 45, 74, 202, 232, 257, 999] {
            assert_eq!(fd_arg(nr, &args), None, "syscall {nr}");
        }
        // -1 as an int, sign-extended or not: no descriptor.
        assert_eq!(fd_arg(0, &[u64::MAX, 0, 0]), None);
        assert_eq!(fd_arg(0, &[0xffff_ffff, 0, 0]), None);
        // Only the low 32 bits count.
        assert_eq!(fd_arg(0, &[(1 << 32) | 9, 0, 0]), Some(9));
        assert_eq!(fd_arg(0, &[0, 0, 0]), Some(0));
    }

    #[test]
    fn read_write_family_follows_fd_kind() {
        for nr in [0, 1, 17, 18, 19, 20, 295, 296, 327, 328] {
            assert_eq!(
                classify(nr, &NO_ARGS, Some(FdKind::File)),
                Class::File,
                "{nr}"
            );
            assert_eq!(classify(nr, &NO_ARGS, None), Class::File, "{nr}");
            assert_eq!(
                classify(nr, &NO_ARGS, Some(FdKind::Socket)),
                Class::Net,
                "{nr}"
            );
            assert_eq!(
                classify(nr, &NO_ARGS, Some(FdKind::Pipe)),
                Class::Other,
                "{nr}"
            );
            assert_eq!(
                classify(nr, &NO_ARGS, Some(FdKind::Other)),
                Class::Other,
                "{nr}"
            );
        }
        assert_eq!(classify(40, &NO_ARGS, Some(FdKind::Socket)), Class::Net);
        assert_eq!(classify(40, &NO_ARGS, None), Class::File);
        assert_eq!(classify(275, &NO_ARGS, Some(FdKind::File)), Class::File);
    }

    #[test]
    fn fd_kind_is_ignored_by_other_calls() {
        assert_eq!(classify(42, &NO_ARGS, Some(FdKind::File)), Class::Net);
        assert_eq!(classify(74, &NO_ARGS, Some(FdKind::Socket)), Class::File);
        assert_eq!(classify(35, &NO_ARGS, Some(FdKind::Socket)), Class::Sleep);
    }

    #[test]
    fn classes_by_name() {
        let cases: &[(&str, Class)] = &[
            ("open", Class::File),
            ("openat", Class::File),
            ("openat2", Class::File),
            ("creat", Class::File),
            ("close", Class::File),
            ("fsync", Class::File),
            ("fdatasync", Class::File),
            ("sync", Class::File),
            ("syncfs", Class::File),
            ("sync_file_range", Class::File),
            ("truncate", Class::File),
            ("ftruncate", Class::File),
            ("fallocate", Class::File),
            ("rename", Class::File),
            ("renameat2", Class::File),
            ("unlink", Class::File),
            ("unlinkat", Class::File),
            ("mkdir", Class::File),
            ("mkdirat", Class::File),
            ("rmdir", Class::File),
            ("link", Class::File),
            ("symlinkat", Class::File),
            ("chmod", Class::File),
            ("fchmodat2", Class::File),
            ("fchownat", Class::File),
            ("copy_file_range", Class::File),
            ("io_submit", Class::File),
            ("io_getevents", Class::File),
            ("msync", Class::File),
            ("stat", Class::Stat),
            ("fstat", Class::Stat),
            ("lstat", Class::Stat),
            ("newfstatat", Class::Stat),
            ("statx", Class::Stat),
            ("access", Class::Stat),
            ("faccessat", Class::Stat),
            ("faccessat2", Class::Stat),
            ("getdents", Class::Stat),
            ("getdents64", Class::Stat),
            ("readlink", Class::Stat),
            ("readlinkat", Class::Stat),
            ("statfs", Class::Stat),
            ("fstatfs", Class::Stat),
            ("nanosleep", Class::Sleep),
            ("clock_nanosleep", Class::Sleep),
            ("pause", Class::Sleep),
            ("futex", Class::Lock),
            ("futex_wait", Class::Lock),
            ("futex_waitv", Class::Lock),
            ("flock", Class::Lock),
            ("semop", Class::Lock),
            ("semtimedop", Class::Lock),
            ("connect", Class::Net),
            ("accept", Class::Net),
            ("accept4", Class::Net),
            ("recvfrom", Class::Net),
            ("recvmsg", Class::Net),
            ("recvmmsg", Class::Net),
            ("sendto", Class::Net),
            ("sendmsg", Class::Net),
            ("sendmmsg", Class::Net),
            ("shutdown", Class::Net),
            ("epoll_wait", Class::Net),
            ("epoll_pwait", Class::Net),
            ("epoll_pwait2", Class::Net),
            ("wait4", Class::Process),
            ("waitid", Class::Process),
            ("clone", Class::Process),
            ("clone3", Class::Process),
            ("fork", Class::Process),
            ("vfork", Class::Process),
            ("execve", Class::Process),
            ("execveat", Class::Process),
            ("mmap", Class::Other),
            ("munmap", Class::Other),
            ("madvise", Class::Other),
            ("brk", Class::Other),
            ("ioctl", Class::Other),
            ("getpid", Class::Other),
            ("io_uring_enter", Class::Other),
            ("msgrcv", Class::Other),
            ("socket", Class::Other),
        ];
        for &(n, class) in cases {
            let nr = (0..=470)
                .find(|&nr| name(nr) == Some(n))
                .unwrap_or_else(|| panic!("no syscall {n}"));
            assert_eq!(classify(nr, &[3, 1, 1], None), class, "{n} ({nr})");
        }
    }

    #[test]
    fn waits_with_descriptors_are_net_and_without_are_sleeps() {
        // select(nfds, ...), pselect6(nfds, ...)
        assert_eq!(classify(23, &[4, 0x1000, 0], None), Class::Net);
        assert_eq!(classify(23, &[0, 0, 0], None), Class::Sleep);
        assert_eq!(classify(270, &[4, 0x1000, 0], None), Class::Net);
        assert_eq!(classify(270, &[0, 0, 0], None), Class::Sleep);
        // poll(fds, nfds, timeout), ppoll(fds, nfds, ...)
        assert_eq!(classify(7, &[0x1000, 2, 100], None), Class::Net);
        assert_eq!(classify(7, &[0, 0, 100], None), Class::Sleep);
        assert_eq!(classify(271, &[0x1000, 1, 0], None), Class::Net);
        assert_eq!(classify(271, &[0, 0, 0], None), Class::Sleep);
    }

    #[test]
    fn fcntl_is_a_lock_only_when_it_waits() {
        assert_eq!(classify(72, &[3, 7, 0x1000], None), Class::Lock); // F_SETLKW
        assert_eq!(classify(72, &[3, 38, 0x1000], None), Class::Lock); // F_OFD_SETLKW
        assert_eq!(classify(72, &[3, 6, 0x1000], None), Class::Other); // F_SETLK
        assert_eq!(classify(72, &[3, 4, 0x800], None), Class::Other); // F_SETFL
        assert_eq!(classify(72, &[3, 37, 0], None), Class::Other); // F_OFD_SETLK
        // The command is an unsigned int: high bits are ignored.
        assert_eq!(classify(72, &[3, (1 << 32) | 7, 0], None), Class::Lock);
    }

    #[test]
    fn not_in_a_syscall_or_unknown_is_other() {
        assert_eq!(classify(-1, &NO_ARGS, None), Class::Other);
        assert_eq!(classify(-1, &NO_ARGS, Some(FdKind::Socket)), Class::Other);
        assert_eq!(classify(400, &NO_ARGS, None), Class::Other);
        assert_eq!(
            classify(i64::MAX, &[u64::MAX; 3], Some(FdKind::File)),
            Class::Other
        );
        assert_eq!(classify(i64::MIN, &[u64::MAX; 3], None), Class::Other);
    }

    #[test]
    fn never_gil_and_total() {
        let argses = [[0, 0, 0], [u64::MAX; 3], [3, 7, 0], [3, 38, 1]];
        let kinds = [
            None,
            Some(FdKind::File),
            Some(FdKind::Socket),
            Some(FdKind::Pipe),
            Some(FdKind::Other),
        ];
        for nr in -2..=600 {
            for args in &argses {
                for kind in kinds {
                    assert_ne!(classify(nr, args, kind), Class::Gil, "{nr}");
                }
            }
        }
    }

    #[test]
    fn strict_set_is_known_and_excludes_the_loops_own_calls() {
        let nrs = strict_numbers();
        let strict_names: usize = GROUPS
            .iter()
            .filter(|g| g.strict)
            .map(|g| g.names.len())
            .sum();
        assert_eq!(nrs.len(), strict_names, "every name is a syscall");
        for n in [2, 4, 257, 262, 35, 230, 73] {
            assert!(nrs.contains(&n), "{n} ({:?})", name(n));
        }
        // read, write, close, poll, futex, epoll_wait, recvfrom, epoll_pwait,
        // io_uring_enter, clone: the loop's own business.
        for n in [0, 1, 3, 7, 202, 232, 45, 281, 426, 56] {
            assert!(!nrs.contains(&n), "{n} ({:?})", name(n));
        }
        assert!(nrs.iter().all(|&n| n < 512));
        for &n in &nrs {
            assert_ne!(classify(n, &[0; 3], None), Class::Other, "{:?}", name(n));
        }
    }

    /// The set `--strict` has counted since it was written (as a list of
    /// its own, before it became a property of the name groups).
    #[test]
    fn strict_set_is_unchanged() {
        #[rustfmt::skip]
        let mut want = [
            "open", "openat", "openat2", "creat", "stat", "lstat", "fstat", "newfstatat", "statx",
            "access", "faccessat", "faccessat2", "getdents", "getdents64", "readlink", "readlinkat",
            "statfs", "fstatfs", "pread64", "pwrite64", "preadv", "pwritev", "preadv2", "pwritev2",
            "fsync", "fdatasync", "sync", "syncfs", "sync_file_range", "truncate", "ftruncate",
            "fallocate", "rename", "renameat", "renameat2", "unlink", "unlinkat", "mkdir",
            "mkdirat", "rmdir", "link", "linkat", "symlink", "symlinkat", "chmod", "fchmodat",
            "chown", "fchownat", "copy_file_range", "nanosleep", "clock_nanosleep", "flock",
        ];
        want.sort_unstable();
        let mut got: Vec<&str> = strict_numbers().into_iter().filter_map(name).collect();
        got.sort_unstable();
        assert_eq!(got, want);
    }

    #[test]
    fn a_name_stands_in_one_group_and_is_a_syscall() {
        let mut seen = std::collections::HashSet::new();
        for n in GROUPS.iter().flat_map(|g| g.names) {
            assert!(seen.insert(n), "{n} is in two groups");
            assert!((0..=470).any(|nr| name(nr) == Some(n)), "no syscall {n}");
        }
    }
}
