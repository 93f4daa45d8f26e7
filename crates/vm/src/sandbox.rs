//! A sandbox: one QEMU process, its copy-on-write disk, its run directory and a session with its
//! agent. Booted from a base disk, or restored from a snapshot (a template is one).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::agent::AgentConn;
use crate::assets::{Initramfs, Kernel};
use crate::error::IoContext;
use crate::qemu::{Vm, VmSpec};
use crate::snapshot::{self, SnapshotMeta, SNAPSHOT_FORMAT};
use crate::tier::Tier;
use crate::{disk, AccelChoice, Error, Result};

/// How long a cold boot may take to reach "agent ready". TCG boots take ~3 s here; a guest that
/// takes 20× longer is broken.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a restored guest may take to answer.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the runtime needs that does not change between sandboxes.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub home: PathBuf,
    pub accel: AccelChoice,
    pub kernel: Kernel,
    pub initramfs: Initramfs,
    pub qemu_version: String,
}

impl Runtime {
    /// Finds the installed kernel, builds (or reuses) the initramfs for `agent_bin`, detects the
    /// accelerator and removes run directories that crashed processes left behind.
    pub fn new(home: &Path, agent_bin: &Path, accel_override: Option<&str>) -> Result<Runtime> {
        let kernel = crate::assets::installed_kernel(home)?;
        let initramfs = crate::assets::build_initramfs(&kernel, agent_bin, home)?;
        let accel = crate::accel::detect(accel_override)?;
        let qemu_version = crate::qemu::qemu_version_cached(&home.join("qemu-version.json"))?;
        let rt = Runtime {
            home: home.to_path_buf(),
            accel,
            kernel,
            initramfs,
            qemu_version,
        };
        rt.collect_garbage();
        Ok(rt)
    }

    pub fn run_root(&self) -> PathBuf {
        self.home.join("run")
    }

    /// Removes run directories whose owner is gone: a process that owns one holds an exclusive
    /// lock on its `lock` file for as long as it lives, even through `kill -9` (the kernel drops
    /// the lock with the process). Directories are created complete, lock held, under a
    /// `.tmp-` name and renamed into place, so a directory without a held lock is garbage; a
    /// `.tmp-` one only once it is old enough that its creator must be gone.
    fn collect_garbage(&self) {
        let Ok(entries) = std::fs::read_dir(self.run_root()) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let young = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < Duration::from_secs(60)));
                if young {
                    continue;
                }
            }
            let lock = dir.join("lock");
            let dead = !lock.exists() || matches!(snapshot::try_lock(&lock), Ok(Some(_)));
            if dead {
                tracing::info!(dir = %dir.display(), "removing run directory of a dead sandbox");
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
}

/// The per-sandbox directory under `MOAT_HOME/run`: removed when the sandbox is dropped.
#[derive(Debug)]
struct RunDir {
    path: PathBuf,
    _lock: File,
}

impl RunDir {
    fn create(rt: &Runtime, id: &str) -> Result<RunDir> {
        let path = rt.run_root().join(id);
        if path.exists() {
            return Err(Error::InvalidArgument(format!(
                "sandbox {id} exists already"
            )));
        }
        let tmp = rt
            .run_root()
            .join(format!(".tmp-{id}-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        let locked = snapshot::try_lock(&tmp.join("lock")).and_then(|lock| {
            let lock = lock.ok_or_else(|| {
                Error::InvalidArgument(format!("{} is locked by another process", tmp.display()))
            })?;
            // The lock is on the file, so it moves with the directory.
            std::fs::rename(&tmp, &path).ctx(|| {
                format!(
                    "creating {} (does the sandbox exist already?)",
                    path.display()
                )
            })?;
            Ok(lock)
        });
        match locked {
            Ok(lock) => Ok(RunDir { path, _lock: lock }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    image: String,
    tier: Tier,
    mem_mib: u32,
    cpus: u32,
    // Field order matters for Drop: the agent session, then QEMU, then the directory.
    agent: AgentConn,
    vm: Vm,
    dir: RunDir,
}

impl Sandbox {
    /// Boots a fresh VM on a copy-on-write disk over `base` (the raw, read-only root disk of
    /// the image `image`) and waits until its agent answers.
    pub async fn boot(
        rt: &Runtime,
        id: &str,
        image: &str,
        base: &Path,
        tier: Tier,
    ) -> Result<Sandbox> {
        let dir = RunDir::create(rt, id)?;
        let disk_path = dir.path.join("disk.qcow2");
        disk::create_overlay(base, "raw", tier.disk_bytes(), &disk_path).await?;
        let started = Instant::now();
        let mut vm = crate::qemu::launch(&spec(
            rt,
            (tier.mem_mib(), tier.cpus()),
            &dir.path,
            &disk_path,
            None,
        ))
        .await?;
        limit_cpu(&vm, tier)?;
        let agent = connect_agent(&mut vm, BOOT_TIMEOUT, "booting").await?;
        tracing::info!(
            id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sandbox booted"
        );
        let sb = Sandbox {
            id: id.to_string(),
            image: image.to_string(),
            tier,
            mem_mib: tier.mem_mib(),
            cpus: tier.cpus(),
            agent,
            vm,
            dir,
        };
        sb.agent.refresh(Some(&hostname(id))).await?;
        Ok(sb)
    }

    /// Starts a new VM from a snapshot directory with its own copy-on-write disk on top of the
    /// snapshot's, then gives the guest fresh time and entropy. One snapshot can be restored
    /// any number of times at once.
    pub async fn restore(rt: &Runtime, id: &str, snapshot: &Path) -> Result<Sandbox> {
        let meta = SnapshotMeta::load(snapshot)?;
        meta.check_compatible(rt)?;
        let dir = RunDir::create(rt, id)?;
        let disk_path = dir.path.join("disk.qcow2");
        overlay_from_seed(snapshot, meta.tier.disk_bytes(), &disk_path).await?;
        let started = Instant::now();
        let memory = snapshot.join("memory.bin");
        let mut vm = crate::qemu::launch(&spec(
            rt,
            (meta.mem_mib, meta.cpus),
            &dir.path,
            &disk_path,
            Some(memory),
        ))
        .await?;
        let agent = connect_agent(&mut vm, RESTORE_TIMEOUT, "restoring").await?;
        let sb = Sandbox {
            id: id.to_string(),
            image: meta.image.clone(),
            tier: meta.tier,
            mem_mib: meta.mem_mib,
            cpus: meta.cpus,
            agent,
            vm,
            dir,
        };
        sb.agent.refresh(Some(&hostname(id))).await?;
        tracing::info!(
            id,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "sandbox restored"
        );
        Ok(sb)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Digest of the image the sandbox runs.
    pub fn image(&self) -> &str {
        &self.image
    }

    pub fn tier(&self) -> Tier {
        self.tier
    }

    pub fn agent(&self) -> &AgentConn {
        &self.agent
    }

    /// The QEMU process id (for measurements).
    pub fn qemu_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Saves memory and disk to `dest` (which must not exist), atomically: the directory
    /// appears complete or not at all. The sandbox keeps running afterwards.
    pub async fn snapshot(&mut self, rt: &Runtime, dest: &Path) -> Result<SnapshotMeta> {
        let meta = self.save(rt, dest, false).await?;
        self.vm.resume().await?;
        Ok(meta)
    }

    /// Saves a snapshot and ends the sandbox; its disk moves into the snapshot instead of being
    /// copied. Used for templates.
    pub async fn snapshot_and_stop(mut self, rt: &Runtime, dest: &Path) -> Result<SnapshotMeta> {
        let meta = self.save(rt, dest, true).await?;
        self.destroy().await;
        Ok(meta)
    }

    async fn save(&mut self, rt: &Runtime, dest: &Path, move_disk: bool) -> Result<SnapshotMeta> {
        let parent = dest.parent().ok_or_else(|| {
            Error::InvalidArgument(format!("bad snapshot path {}", dest.display()))
        })?;
        std::fs::create_dir_all(parent).ctx(|| format!("creating {}", parent.display()))?;
        if dest.exists() {
            return Err(Error::InvalidArgument(format!(
                "snapshot {} exists already",
                dest.display()
            )));
        }
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = snapshot::TempDir::new_in(parent, &format!(".tmp-{name}"))?;
        let started = Instant::now();
        // No frame may be half-way through the channel when memory is saved.
        let quiet = self.agent.quiesce().await?;
        let memory = tmp.path().join("memory.bin");
        let memory_bytes = self.vm.save_memory(&memory).await?;
        let disk = tmp.path().join("disk.qcow2");
        let src = self.dir.path.join("disk.qcow2");
        if move_disk {
            std::fs::rename(&src, &disk).ctx(|| format!("moving {}", src.display()))?;
        } else {
            std::fs::copy(&src, &disk).ctx(|| format!("copying {}", src.display()))?;
        }
        snapshot::fsync_file(&disk)?;
        let meta = SnapshotMeta {
            format: SNAPSHOT_FORMAT,
            image: self.image.clone(),
            tier: self.tier,
            mem_mib: self.mem_mib,
            cpus: self.cpus,
            accel: rt.accel.accel.as_str().to_string(),
            kernel_version: rt.kernel.version.clone(),
            initramfs_sha256: rt.initramfs.sha256.clone(),
            qemu_version: rt.qemu_version.clone(),
            memory_bytes,
            created_unix: snapshot::unix_now(),
            save_ms: started.elapsed().as_millis() as u64,
        };
        meta.store(tmp.path())?;
        tmp.persist(dest)?;
        if !move_disk {
            quiet.release().await?;
        }
        Ok(meta)
    }

    /// Asks the guest to end its processes, sync its disk and power off, and waits for QEMU to
    /// exit; a guest that does not within `deadline` is killed. Returns whether it was clean.
    pub async fn shutdown(mut self, deadline: Duration) -> bool {
        let asked = self.agent.shutdown().await;
        let exited = asked.is_ok()
            && matches!(
                tokio::time::timeout(deadline, self.vm.wait_exit()).await,
                Ok(Ok(status)) if status.success()
            );
        // With -no-reboot a guest panic also ends QEMU with status 0: tell them apart.
        let clean = exited && !self.vm.console_tail(16 * 1024).contains("Kernel panic");
        if !clean {
            tracing::warn!(id = self.id, "the guest did not power off; killing it");
        }
        self.destroy().await;
        clean
    }

    /// Stops the VM and removes everything the sandbox wrote.
    pub async fn destroy(mut self) {
        if let Err(e) = self.vm.kill().await {
            tracing::warn!(id = self.id, error = %e, "stopping QEMU");
        }
    }
}

fn hostname(id: &str) -> String {
    let mut h: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if h.is_empty() {
        h.push_str("sandbox");
    }
    h
}

fn spec(
    rt: &Runtime,
    (mem_mib, cpus): (u32, u32),
    dir: &Path,
    disk: &Path,
    incoming: Option<PathBuf>,
) -> VmSpec {
    VmSpec {
        accel: rt.accel.clone(),
        mem_mib,
        cpus,
        kernel: rt.kernel.vmlinuz.clone(),
        initramfs: rt.initramfs.path.clone(),
        disk: disk.to_path_buf(),
        run_dir: dir.to_path_buf(),
        incoming,
    }
}

/// Makes a fresh copy-on-write overlay on a snapshot's disk at `dest`. `qemu-img create` costs
/// ~40 ms, a tenth of a warm `moat run`, and makes the same file for every restore of one
/// snapshot; so it runs once, its result is kept as `overlay-seed.qcow2` in the snapshot, and
/// each restore copies that (~1 ms).
async fn overlay_from_seed(snapshot: &Path, size: u64, dest: &Path) -> Result<()> {
    let seed = snapshot.join("overlay-seed.qcow2");
    if !seed.exists() {
        let tmp = snapshot.join(format!(
            ".overlay-seed-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let made = disk::create_overlay(&snapshot.join("disk.qcow2"), "qcow2", size, &tmp).await;
        // Concurrent restores may both get here; each rename installs a valid seed.
        let installed = made.and_then(|()| {
            snapshot::fsync_file(&tmp)?;
            std::fs::rename(&tmp, &seed).ctx(|| format!("installing {}", seed.display()))
        });
        if installed.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        installed?;
    }
    std::fs::copy(&seed, dest).ctx(|| format!("copying {}", seed.display()))?;
    Ok(())
}

/// Holds a fractional tier to its share of a CPU (QEMU itself only knows whole vCPUs).
fn limit_cpu(vm: &Vm, tier: Tier) -> Result<()> {
    if tier.millicores() < tier.cpus() * 1000 {
        crate::cgroup::limit_cpu(vm.pid(), tier.millicores())?;
    }
    Ok(())
}

async fn connect_agent(vm: &mut Vm, deadline: Duration, what: &str) -> Result<AgentConn> {
    let socket = vm.take_agent_stream()?;
    let what = format!("{what}: waiting for the guest agent");
    // The VM's own deadline fires first: its error carries the guest console.
    let handshake = AgentConn::connect(socket, deadline + Duration::from_secs(5));
    match vm.while_alive(&what, deadline, handshake).await? {
        Ok(conn) => Ok(conn),
        Err(Error::Agent(_) | Error::AgentGone | Error::AgentTimeout(_)) => {
            Err(vm.exit_error(&what).await)
        }
        Err(e) => Err(e),
    }
}
