//! What /proc says about a running blockwatch: its CPU time and its
//! resident memory, whole and by component.

use std::collections::BTreeMap;

/// utime + stime of the whole process (all its threads, the exited ones
/// included), in seconds, from /proc/PID/stat: 10 ms resolution.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = stat_cpu_ticks(&stat)?;
    Some(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line; the fields
/// are counted after the command name, which may hold spaces and parens.
pub fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The CPU time of each live thread, nanoseconds, from
/// /proc/PID/task/TID/schedstat (the scheduler's own count, exact, unlike
/// the tick-sampled utime and stime).
pub fn thread_cpu_ns(pid: u32) -> BTreeMap<u32, u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return BTreeMap::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let tid: u32 = e.file_name().to_str()?.parse().ok()?;
        let s = std::fs::read_to_string(e.path().join("schedstat")).ok()?;
        Some((tid, s.split_whitespace().next()?.parse().ok()?))
    })
    .collect()
}

/// CPU seconds between two [`thread_cpu_ns`] readings, when the same
/// threads were alive at both (else a thread's time went missing).
pub fn cpu_between(before: &BTreeMap<u32, u64>, after: &BTreeMap<u32, u64>) -> Option<f64> {
    if before.is_empty() || before.keys().ne(after.keys()) {
        return None;
    }
    let ns: u64 = after
        .iter()
        .map(|(tid, a)| a.saturating_sub(before[tid]))
        .sum();
    Some(ns as f64 / 1e9)
}

/// What a tracer had cost so far: the CPU time of its live threads and
/// the run time of its BPF programs, nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TracerCost {
    pub user_ns: u64,
    pub kernel_ns: u64,
}

impl TracerCost {
    /// Reads both for `pid`, whose programs are `progs` (see
    /// [`bpf_prog_fds`]); None when either cannot be read.
    pub fn of(pid: u32, progs: &[u32]) -> Option<TracerCost> {
        Some(TracerCost {
            user_ns: thread_cpu_ns(pid).values().sum(),
            kernel_ns: bpf_run_ns(pid, progs)?,
        })
    }

    /// What was spent from `before` to `self`, as shares of one CPU over
    /// `secs`: (its own threads, its kernel programs).
    pub fn shares_since(&self, before: &TracerCost, secs: f64) -> (f64, f64) {
        let share = |a: u64, b: u64| a.saturating_sub(b) as f64 / 1e9 / secs;
        (
            share(self.user_ns, before.user_ns),
            share(self.kernel_ns, before.kernel_ns),
        )
    }
}

/// Nanoseconds the live threads of `pid` spent waiting for a CPU while
/// runnable (the second field of /proc/PID/task/TID/schedstat), summed.
pub fn runqueue_wait_ns(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut sum = 0;
    for e in dir.flatten() {
        let s = std::fs::read_to_string(e.path().join("schedstat")).ok()?;
        sum += s.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    }
    Some(sum)
}

/// The file descriptors of `pid` that are BPF programs (their fdinfo
/// has a `prog_type`).
pub fn bpf_prog_fds(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let fd: u32 = e.file_name().to_str()?.parse().ok()?;
            let info = std::fs::read_to_string(e.path()).ok()?;
            info.lines()
                .any(|l| l.starts_with("prog_type:"))
                .then_some(fd)
        })
        .collect()
}

/// The time the kernel ran the programs behind `fds` of `pid`, summed
/// (`run_time_ns` in their fdinfo: counted only while
/// `kernel.bpf_stats_enabled` is 1). None when one cannot be read.
pub fn bpf_run_ns(pid: u32, fds: &[u32]) -> Option<u64> {
    let mut sum = 0;
    for fd in fds {
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
        sum += fdinfo_field(&info, "run_time_ns")?;
    }
    Some(sum)
}

fn fdinfo_field(info: &str, key: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .trim()
        .parse()
        .ok()
}

/// `kernel.bpf_stats_enabled` on for as long as this lives (the kernel
/// then times every BPF program's runs, at the cost of two clock reads a
/// run), restored to what it was on drop.
pub struct BpfStats {
    before: Option<String>,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    /// None when the switch cannot be turned (not root, no such sysctl).
    pub fn enable() -> Option<BpfStats> {
        let before = std::fs::read_to_string(BPF_STATS).ok()?;
        std::fs::write(BPF_STATS, "1").ok()?;
        Some(BpfStats {
            before: Some(before),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(before) = self.before.take() {
            let _ = std::fs::write(BPF_STATS, before.trim());
        }
    }
}

/// A `Key:   123 kB` field of /proc/PID/status, in KiB.
pub fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| kb_field(&s, key))
        .unwrap_or(0)
}

fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Resident memory by what it holds, KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rss {
    pub total: u64,
    /// Heap, thread stacks, anonymous mappings: blockwatch's own data.
    pub anon: u64,
    /// BPF maps mapped into user space (the ring buffers).
    pub bpf_maps: u64,
    /// blockwatch's executable.
    pub exe: u64,
    /// Other mapped files: libraries, and the ELF and debug files of
    /// watched programs read for symbols.
    pub other_files: u64,
    /// Shared memory (memfd and the like).
    pub shmem: u64,
}

impl Rss {
    pub fn of(pid: u32) -> Rss {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        std::fs::read_to_string(format!("/proc/{pid}/smaps"))
            .map(|s| Rss::parse(&s, &exe))
            .unwrap_or_default()
    }

    /// Sums the `Rss:` of each mapping of a /proc/PID/smaps text by what
    /// the mapping is.
    pub fn parse(smaps: &str, exe: &str) -> Rss {
        let mut rss = Rss::default();
        let mut name = String::new();
        for line in smaps.lines() {
            let mut words = line.split_whitespace();
            let Some(first) = words.next() else { continue };
            if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                // `start-end perms offset dev inode [name…]`
                name = words.skip(4).collect::<Vec<_>>().join(" ");
                continue;
            }
            if first != "Rss:" {
                continue;
            }
            let kb: u64 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            rss.total += kb;
            let slot = if name.starts_with("anon_inode:bpf") {
                &mut rss.bpf_maps
            } else if name.starts_with("/memfd:")
                || name.starts_with("/dev/shm/")
                || name.starts_with("/SYSV")
            {
                &mut rss.shmem
            } else if name == exe && !exe.is_empty() {
                &mut rss.exe
            } else if name.starts_with('/') {
                &mut rss.other_files
            } else {
                // [heap], [stack], [anon:…], unnamed, [vdso]…
                &mut rss.anon
            };
            *slot += kb;
        }
        rss
    }

    /// `anon 27.0, BPF maps 8.3, executable 7.1, other files 6.2, shmem 0.3 (MiB)`.
    pub fn describe(&self) -> String {
        let mib = |kb: u64| kb as f64 / 1024.0;
        format!(
            "anon (heap, stacks) {:.1}, BPF maps (ring buffers) {:.1}, executable {:.1}, other files (libraries, symbol files) {:.1}, shmem {:.1} MiB",
            mib(self.anon),
            mib(self.bpf_maps),
            mib(self.exe),
            mib(self.other_files),
            mib(self.shmem)
        )
    }
}

/// The last PID the kernel handed out (/proc/loadavg): how many processes
/// and threads the host started between two readings.
pub fn last_pid() -> Option<u64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .nth(4)?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tracers_cost_is_a_share_of_one_cpu() {
        let before = TracerCost {
            user_ns: 1_000_000,
            kernel_ns: 5_000_000,
        };
        let after = TracerCost {
            user_ns: 31_000_000,
            kernel_ns: 20_000_000,
        };
        let (user, kernel) = after.shares_since(&before, 3.0);
        assert!((user - 0.01).abs() < 1e-12);
        assert!((kernel - 0.005).abs() < 1e-12);
        // A thread gone meanwhile takes its time with it: never negative.
        assert_eq!(before.shares_since(&after, 3.0), (0.0, 0.0));
    }

    #[test]
    fn fdinfo_fields_are_read_by_name() {
        let info = "pos:\t0\nflags:\t02000002\nprog_type:\t26\nprog_jited:\t1\nrun_time_ns:\t1862840846\nrun_cnt:\t443873\n";
        assert_eq!(fdinfo_field(info, "run_time_ns"), Some(1_862_840_846));
        assert_eq!(fdinfo_field(info, "run_cnt"), Some(443_873));
        assert_eq!(fdinfo_field(info, "verified_insns"), None);
    }

    #[test]
    fn stat_fields_after_the_command_name() {
        let stat =
            "4242 (tokio (rt) w) S 1 4242 4242 0 -1 4194560 1200 0 0 0 250 75 0 0 20 0 3 0 100 0 0";
        assert_eq!(stat_cpu_ticks(stat), Some(325));
        assert_eq!(stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn thread_time_needs_the_same_threads() {
        let before = BTreeMap::from([(1, 1_000_000), (2, 0)]);
        let after = BTreeMap::from([(1, 3_000_000), (2, 500_000)]);
        assert_eq!(cpu_between(&before, &after), Some(0.0025));
        let fewer = BTreeMap::from([(1, 3_000_000)]);
        assert_eq!(cpu_between(&before, &fewer), None);
        assert_eq!(cpu_between(&BTreeMap::new(), &BTreeMap::new()), None);
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tblockwatch\nVmRSS:\t   50312 kB\nRssAnon:\t   27288 kB\n";
        assert_eq!(kb_field(s, "VmRSS"), Some(50312));
        assert_eq!(kb_field(s, "RssAnon"), Some(27288));
        assert_eq!(kb_field(s, "RssFile"), None);
    }

    #[test]
    fn smaps_components() {
        let smaps = "\
556d6040c000-556d6050c000 r-xp 00000000 fd:01 123 /usr/bin/blockwatch
Size:               1024 kB
Rss:                 700 kB
556d7040c000-556d7140c000 rw-p 00000000 00:00 0          [heap]
Rss:                2000 kB
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
Rss:                  50 kB
7f1000000000-7f1000400000 rw-s 00000000 00:0e 55         anon_inode:bpf-map
Rss:                4096 kB
7f2000000000-7f2000100000 r-xp 00000000 fd:01 77         /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 900 kB
7f3000000000-7f3000001000 rw-s 00000000 00:01 88         /memfd:sealed-91 (deleted)
Rss:                   4 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0          [stack]
Rss:                  68 kB
";
        let rss = Rss::parse(smaps, "/usr/bin/blockwatch");
        assert_eq!(
            rss,
            Rss {
                total: 7818,
                anon: 2118,
                bpf_maps: 4096,
                exe: 700,
                other_files: 900,
                shmem: 4,
            }
        );
    }
}
