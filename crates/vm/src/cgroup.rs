//! CPU quotas for fractional tiers (e.g. XS = 0.25 vCPU): QEMU's whole process is put in its
//! own cgroup with a CFS bandwidth limit. cgroup v2 is used when `/sys/fs/cgroup` is the
//! unified hierarchy, else the v1 `cpu` controller (hybrid hosts like ours). Without either,
//! VMs run unthrottled and a warning says so: a quota is a fairness measure, not isolation.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

const ROOT: &str = "/sys/fs/cgroup";
/// CFS period: 100 ms, the kernel default.
const PERIOD_US: u64 = 100_000;

/// Limits process `pid` (with all its threads) to `millicores` / 1000 CPUs. Returns the
/// cgroup directory, or `None` when no usable cpu controller exists (logged as a warning).
/// [`remove_cpu_limit`] deletes the cgroup once the process has exited.
pub fn limit_cpu(pid: u32, millicores: u32) -> Result<Option<PathBuf>> {
    if millicores == 0 {
        return Err(Error::InvalidArgument(
            "a CPU limit of 0 millicores would stop the VM; use at least 10".into(),
        ));
    }
    let quota_us = (u64::from(millicores) * PERIOD_US / 1000).max(1000);
    let root = Path::new(ROOT);
    let res = if root.join("cgroup.controllers").exists() {
        limit_v2(root, pid, quota_us)
    } else if root.join("cpu/cpu.cfs_quota_us").exists() {
        limit_v1(&root.join("cpu"), pid, quota_us)
    } else {
        Err("no cgroup v2 hierarchy and no cgroup v1 cpu controller at /sys/fs/cgroup".into())
    };
    match res {
        Ok(dir) => {
            tracing::info!(pid, millicores, cgroup = %dir.display(), "CPU quota applied");
            Ok(Some(dir))
        }
        Err(reason) => {
            tracing::warn!(pid, millicores, %reason, "CPU quota unavailable: the VM runs without a CPU limit");
            Ok(None)
        }
    }
}

/// Removes the cgroup [`limit_cpu`] made for `pid` (a no-op if there is none). It only
/// succeeds once the process has exited; [`crate::Vm`] calls it when dropped.
pub fn remove_cpu_limit(pid: u32) {
    for dir in [
        Path::new(ROOT).join(format!("moat/vm-{pid}")),
        Path::new(ROOT).join(format!("cpu/moat/vm-{pid}")),
    ] {
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir(&dir) {
                tracing::debug!(dir = %dir.display(), "cannot remove cgroup: {e}");
            }
        }
    }
}

fn write(p: &Path, v: &str) -> std::result::Result<(), String> {
    std::fs::write(p, v).map_err(|e| format!("writing {v:?} to {}: {e}", p.display()))
}

fn mkdir(p: &Path) -> std::result::Result<(), String> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("creating {}: {e}", p.display())),
    }
}

fn limit_v2(root: &Path, pid: u32, quota_us: u64) -> std::result::Result<PathBuf, String> {
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if !controllers.split_whitespace().any(|c| c == "cpu") {
        return Err("the cgroup v2 root has no cpu controller".into());
    }
    write(&root.join("cgroup.subtree_control"), "+cpu")?;
    let moat = root.join("moat");
    mkdir(&moat)?;
    write(&moat.join("cgroup.subtree_control"), "+cpu")?;
    let dir = moat.join(format!("vm-{pid}"));
    mkdir(&dir)?;
    write(&dir.join("cpu.max"), &format!("{quota_us} {PERIOD_US}"))?;
    write(&dir.join("cgroup.procs"), &pid.to_string())?;
    Ok(dir)
}

fn limit_v1(cpu: &Path, pid: u32, quota_us: u64) -> std::result::Result<PathBuf, String> {
    let moat = cpu.join("moat");
    mkdir(&moat)?;
    let dir = moat.join(format!("vm-{pid}"));
    mkdir(&dir)?;
    write(&dir.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
    write(&dir.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
    // cgroup.procs moves every thread of the process (QEMU's vCPU and I/O threads too).
    write(&dir.join("cgroup.procs"), &pid.to_string())?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu_ticks(pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        // utime, stime are fields 14, 15 (1-based) = index 11, 12 after the comm.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    #[test]
    fn quota_throttles_a_busy_loop() {
        assert!(limit_cpu(1, 0).is_err());
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let dir = limit_cpu(pid, 100).unwrap();
        let Some(dir) = dir else {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("no cgroup cpu controller here; skipping");
            return;
        };
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|l| l == pid.to_string()));
        let t0 = cpu_ticks(pid);
        std::thread::sleep(std::time::Duration::from_millis(1000));
        let used = cpu_ticks(pid) - t0; // in clock ticks (USER_HZ = 100)
        let _ = child.kill();
        let _ = child.wait();
        remove_cpu_limit(pid);
        assert!(!dir.exists());
        // 0.1 CPU for 1 s = 10 ticks; allow generous slack for a noisy host.
        assert!(used <= 30, "busy loop used {used} ticks under a 100m quota");
    }
}
