//! What moat reads from `/proc`: the host's TSC frequency for the guest kernel, which
//! processes are QEMUs of a given disk (the guard against pid reuse, and the scan that kills
//! QEMUs nobody owns), how much CPU a QEMU has used (whether an idle sandbox is quiet), and how
//! much memory it really holds (capacity and metrics).

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::pidfd::PidFd;

/// The host TSC frequency in kHz from `/proc/cpuinfo`'s "cpu MHz". Under TCG the guest
/// TSC is the host TSC, and handing the kernel its frequency (`tsc_early_khz`) avoids the
/// PIT calibration that intermittently fails under TCG and hangs the boot.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

/// Field `field` (e.g. `MemTotal`, `MemAvailable`) of the host's `/proc/meminfo`, in MiB;
/// `None` if it cannot be read or has no such field.
pub fn host_meminfo_mib(field: &str) -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
}

/// The CPU time (user and system, all threads) process `pid` has used, from
/// `/proc/<pid>/stat`; `None` if it is gone.
pub fn cpu_time(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf only reads its integer argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|&h| h > 0)?;
    Some(std::time::Duration::from_millis(
        (utime + stime) * 1000 / hz,
    ))
}

/// The proportional set size of process `pid` in bytes (`Pss:` of `/proc/<pid>/smaps_rollup`):
/// its private pages plus its share of every page it maps together with others. Template
/// memory that N clones map copy-on-write counts 1/N in each, so the sum over all VMs counts
/// it once, where RSS would count it N times. `None` if the process is gone.
pub fn pss_bytes(pid: u32) -> Option<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_pss(&rollup)
}

fn parse_pss(rollup: &str) -> Option<u64> {
    rollup.lines().find_map(|l| {
        let kib = l.strip_prefix("Pss:")?.trim().strip_suffix("kB")?;
        kib.trim().parse::<u64>().ok().map(|k| k * 1024)
    })
}

/// Whether `pid` is a live QEMU whose root drive is `disk`: the guard against pid reuse when
/// adopting a VM or deciding that a run directory is still in use.
pub fn is_qemu_of(pid: u32, disk: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|&b| b == 0);
    let is_qemu = args.next().is_some_and(|a0| {
        Path::new(std::ffi::OsStr::from_bytes(a0))
            .file_name()
            .is_some_and(|n| n.as_bytes().starts_with(b"qemu-system"))
    });
    if !is_qemu {
        return false;
    }
    let Ok(want) = std::fs::canonicalize(disk) else {
        return false;
    };
    args.filter_map(|a| a.strip_prefix(b"id=root,file="))
        .any(|rest| {
            // The value ends at the first single comma; `,,` is an escaped comma.
            let mut value = Vec::new();
            let mut i = 0;
            while i < rest.len() {
                if rest[i] == b',' {
                    if rest.get(i + 1) == Some(&b',') {
                        value.push(b',');
                        i += 2;
                        continue;
                    }
                    break;
                }
                value.push(rest[i]);
                i += 1;
            }
            std::fs::canonicalize(std::ffi::OsStr::from_bytes(&value)).is_ok_and(|p| p == want)
        })
}

/// SIGKILLs every QEMU whose root drive is `disk` (a detached VM whose directory is being
/// removed). Scans `/proc`, so only called for directories already judged dead.
pub(crate) fn kill_qemu_of(disk: &Path) {
    if !disk.exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if !is_qemu_of(pid, disk) {
            continue;
        }
        // Through a pidfd, re-checked after opening it, so a reused pid is never signalled.
        if let Ok(fd) = PidFd::open_blocking(pid) {
            if is_qemu_of(pid, disk) && !fd.has_exited() {
                tracing::warn!(pid, disk = %disk.display(), "killing a QEMU nobody owns");
                let _ = fd.kill();
            }
        }
    }
}

/// Field `field` of `/proc/<pid>/status` (its value, trimmed); `None` if the process or the
/// field is not there.
pub fn status_field(pid: u32, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')
            .map(|v| v.trim().to_string())
    })
}

/// The real uid of process `pid` (`Uid:` in its status).
pub(crate) fn uid_of(pid: u32) -> Option<u32> {
    status_field(pid, "Uid")?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_grows_with_work_and_is_none_for_a_missing_process() {
        let me = std::process::id();
        let before = cpu_time(me).expect("our own stat");
        // Work until the reading shows 50 ms more, not for a fixed wall time: on a loaded
        // machine 100 ms of wall time can hold less than 50 ms of CPU.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut x = 0u64;
        loop {
            for _ in 0..1_000_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            let now = cpu_time(me).unwrap();
            if now >= before + std::time::Duration::from_millis(50) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "30 s of work, and the reading went from {before:?} only to {now:?}"
            );
        }
        assert_eq!(cpu_time(u32::MAX), None);
    }

    #[test]
    fn pss_counts_shared_pages_by_share_and_is_none_for_a_missing_process() {
        let rollup = "55d4c8a00000-7ffd5d1f7000 ---p 00000000 00:00 0    [rollup]\n\
                      Rss:              183324 kB\nPss:               45123 kB\n\
                      Pss_Anon:          40000 kB\nShared_Clean:      12 kB\n";
        assert_eq!(parse_pss(rollup), Some(45123 * 1024));
        assert_eq!(parse_pss("Rss: 1 kB\n"), None);
        // Our own: a test process maps at least its binary.
        let me = pss_bytes(std::process::id()).expect("our own smaps_rollup");
        assert!(me > 1 << 20, "{me}");
        assert_eq!(pss_bytes(u32::MAX), None);
    }
}
