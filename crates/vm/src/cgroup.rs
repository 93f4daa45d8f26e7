//! One cgroup per sandbox around its QEMU and its network stack, with the tier's limits:
//! `memory` (guest RAM plus QEMU's measured overhead), `pids` (a runaway or compromised
//! QEMU cannot fork-bomb the host) and `cpu` (a CFS quota, so a fractional tier such as
//! XS = 0.25 vCPU gets its share and a busy guest cannot starve its neighbours).
//!
//! cgroup v2 is used when `/sys/fs/cgroup` is the unified hierarchy (controllers enabled in
//! `/sys/fs/cgroup/moat`); otherwise the v1 `memory`, `pids` and `cpu` hierarchies (hybrid
//! hosts such as the ones moat is developed on), each nested under this process's own cgroup
//! there, so a moat that runs inside a limited cgroup keeps its VMs inside that limit.
//! Without all three controllers the jail refuses to start VMs ([`CgroupHost::detect`] says
//! which one is missing): a limit that silently does not apply is no limit.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

const ROOT: &str = "/sys/fs/cgroup";
/// CFS period: 100 ms, the kernel default.
const PERIOD_US: u64 = 100_000;
/// The controllers every sandbox cgroup uses.
const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Where sandbox cgroups are made on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupHost {
    /// The unified hierarchy: one directory per sandbox under `<root>/moat`.
    V2 { root: PathBuf },
    /// v1: per controller, the directory under which `moat/<name>` is made (this process's
    /// own cgroup in that hierarchy).
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
    },
}

/// The limits of one sandbox's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u32,
    /// CPU time per wall-clock second, in thousandths of a CPU.
    pub millicores: u32,
}

impl CgroupHost {
    /// Finds the cgroup controllers this host offers, or says which are missing.
    pub fn detect() -> Result<CgroupHost> {
        let root = Path::new(ROOT);
        if let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) {
            let missing: Vec<&str> = CONTROLLERS
                .into_iter()
                .filter(|c| !controllers.split_whitespace().any(|x| x == *c))
                .collect();
            if !missing.is_empty() {
                return Err(Error::Jail(format!(
                    "cgroup v2 at {ROOT} lacks the {} controller(s) (enabled: {})",
                    missing.join(", "),
                    controllers.trim()
                )));
            }
            return Ok(CgroupHost::V2 {
                root: root.to_path_buf(),
            });
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut found = Vec::new();
        let mut missing = Vec::new();
        for controller in CONTROLLERS {
            let mount = root.join(controller);
            // A line is `id:controller[,controller...]:path`.
            let path = own.lines().find_map(|l| {
                let mut f = l.splitn(3, ':');
                let (_, names, path) = (f.next()?, f.next()?, f.next()?);
                names.split(',').any(|n| n == controller).then_some(path)
            });
            match path {
                Some(p) if mount.join("cgroup.procs").exists() => {
                    found.push(mount.join(p.trim_start_matches('/')));
                }
                _ => missing.push(controller),
            }
        }
        if !missing.is_empty() {
            return Err(Error::Jail(format!(
                "no cgroup v2 hierarchy at {ROOT} and no cgroup v1 {} hierarchy mounted there",
                missing.join(", ")
            )));
        }
        let cpu = found.pop().unwrap_or_default();
        let pids = found.pop().unwrap_or_default();
        let memory = found.pop().unwrap_or_default();
        Ok(CgroupHost::V1 { memory, pids, cpu })
    }

    /// Makes (or empties and remakes) the cgroup `name` with `limits`. Processes join it by
    /// writing to its [`SandboxCgroup::procs_files`] (the jail does so before exec).
    pub fn create(&self, name: &str, limits: Limits) -> Result<SandboxCgroup> {
        if limits.millicores == 0 || limits.pids == 0 || limits.memory_bytes == 0 {
            return Err(Error::InvalidArgument(format!(
                "cgroup limits must all be positive: {limits:?}"
            )));
        }
        let quota_us = (u64::from(limits.millicores) * PERIOD_US / 1000).max(1000);
        let cg = match self {
            CgroupHost::V2 { root } => {
                write(&root.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
                let moat = root.join("moat");
                mkdir(&moat)?;
                write(&moat.join("cgroup.subtree_control"), "+memory +pids +cpu")?;
                let dir = moat.join(name);
                let cg = SandboxCgroup { dirs: vec![dir] };
                cg.remake()?;
                let dir = &cg.dirs[0];
                write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
                // No swap: a guest's RAM must not page out to the host's disk.
                let _ = write(&dir.join("memory.swap.max"), "0");
                write(&dir.join("pids.max"), &limits.pids.to_string())?;
                write(&dir.join("cpu.max"), &format!("{quota_us} {PERIOD_US}"))?;
                cg
            }
            CgroupHost::V1 { memory, pids, cpu } => {
                let dirs: Vec<PathBuf> = [memory, pids, cpu]
                    .iter()
                    .map(|base| base.join("moat").join(name))
                    .collect();
                for base in [memory, pids, cpu] {
                    mkdir(&base.join("moat"))?;
                }
                let cg = SandboxCgroup { dirs };
                cg.remake()?;
                let [mem, pid, cpu] = [&cg.dirs[0], &cg.dirs[1], &cg.dirs[2]];
                write(
                    &mem.join("memory.limit_in_bytes"),
                    &limits.memory_bytes.to_string(),
                )?;
                write(&pid.join("pids.max"), &limits.pids.to_string())?;
                write(&cpu.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
                write(&cpu.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
                cg
            }
        };
        Ok(cg)
    }

    /// The cgroup `name` as [`CgroupHost::create`] made it, for removal.
    pub fn existing(&self, name: &str) -> SandboxCgroup {
        let dirs = match self {
            CgroupHost::V2 { root } => vec![root.join("moat").join(name)],
            CgroupHost::V1 { memory, pids, cpu } => [memory, pids, cpu]
                .iter()
                .map(|b| b.join("moat").join(name))
                .collect(),
        };
        SandboxCgroup { dirs }
    }
}

/// A sandbox's cgroup: one directory (v2) or one per controller (v1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxCgroup {
    dirs: Vec<PathBuf>,
}

impl SandboxCgroup {
    /// The `cgroup.procs` files a process writes `0` to in order to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// The directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Kills whatever is still in the cgroup and removes it.
    pub fn remove(&self) -> Result<()> {
        for dir in &self.dirs {
            if !dir.exists() {
                continue;
            }
            let mut last = None;
            for _ in 0..200 {
                kill_members(dir);
                match std::fs::remove_dir(dir) {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if let Some(e) = last {
                return Err(Error::io(format!("removing cgroup {}", dir.display()), e));
            }
        }
        Ok(())
    }

    fn remake(&self) -> Result<()> {
        self.remove()?;
        for dir in &self.dirs {
            mkdir(dir)?;
        }
        Ok(())
    }
}

/// SIGKILLs every process in `dir` (v2 `cgroup.kill` where the kernel has it).
fn kill_members(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn write(p: &Path, v: &str) -> Result<()> {
    std::fs::write(p, v).map_err(|e| Error::io(format!("writing {v:?} to {}", p.display()), e))
}

fn mkdir(p: &Path) -> Result<()> {
    match std::fs::create_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(format!("creating cgroup {}", p.display()), e)),
    }
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

    /// A process moved into a sandbox cgroup is held to its CPU quota and its pids limit,
    /// and removing the cgroup kills it.
    #[test]
    fn limits_hold_a_busy_loop_and_a_fork_loop() {
        let host = CgroupHost::detect().expect("the test host has cgroup controllers");
        let limits = Limits {
            memory_bytes: 64 << 20,
            pids: 8,
            millicores: 100,
        };
        assert!(host
            .create(
                "test-zero",
                Limits {
                    millicores: 0,
                    ..limits
                }
            )
            .is_err());
        let name = format!("test-{}", std::process::id());
        let cg = host.create(&name, limits).unwrap();
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "sleep 0.5; n=0; while [ $n -lt 40 ]; do sleep 5 & n=$((n+1)); done; wait",
            ])
            .spawn()
            .unwrap();
        let pid = child.id();
        for f in cg.procs_files() {
            std::fs::write(f, pid.to_string()).unwrap();
        }
        let mut spinner = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let spin = spinner.id();
        for f in cg.procs_files() {
            std::fs::write(f, spin.to_string()).unwrap();
        }
        let t0 = cpu_ticks(spin);
        std::thread::sleep(std::time::Duration::from_millis(1000));
        let used = cpu_ticks(spin) - t0; // in clock ticks (USER_HZ = 100)
        let members: usize = std::fs::read_to_string(cg.dirs()[cg.dirs().len() - 1].join("tasks"))
            .or_else(|_| std::fs::read_to_string(cg.dirs()[0].join("cgroup.threads")))
            .unwrap()
            .lines()
            .count();
        cg.remove().unwrap();
        let _ = child.wait();
        let _ = spinner.wait();
        assert!(cg.dirs().iter().all(|d| !d.exists()));
        // 0.1 CPU for 1 s = 10 ticks; allow generous slack for a noisy host.
        assert!(used <= 30, "busy loop used {used} ticks under a 100m quota");
        assert!(members <= 8, "{members} tasks under pids.max 8");
    }
}
