//! Snapshot directories: a memory image, a disk and a `meta.json`, written so that a crash at
//! any point leaves either no snapshot or a complete one. `docs/SNAPSHOTS.md` has the layout.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::IoContext;
use crate::sandbox::Runtime;
use crate::tier::Tier;
use crate::util::{fsync_dir, write_atomic};
use crate::{Error, Result};

/// Version of the snapshot directory layout and `meta.json`. 2 added `shared_base`; 3 names
/// the RAM backend, saves with `x-ignore-shared` and gives templates `memory.ram` (see
/// `shared_ram_bytes`); 4: the VM has a NIC.
pub const SNAPSHOT_FORMAT: u32 = 4;
/// The oldest format this moat restores: a saved VM restores only with the same devices, and
/// format 4 added the NIC.
pub const OLDEST_FORMAT: u32 = 4;

/// A disk image as qemu-img names it: an absolute path and a format (`raw` or `qcow2`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseDisk {
    pub path: PathBuf,
    pub format: String,
}

/// What `meta.json` records: enough to refuse a restore that could not work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    pub format: u32,
    /// Digest of the image whose disk is at the bottom of the snapshot's disk chain.
    pub image: String,
    pub tier: Tier,
    pub mem_mib: u32,
    pub cpus: u32,
    pub accel: String,
    pub kernel_version: String,
    /// Covers the agent binary and the kernel modules in the guest.
    pub initramfs_sha256: String,
    pub qemu_version: String,
    /// Size of `memory.bin`.
    pub memory_bytes: u64,
    pub created_unix: u64,
    /// How long the save took, for the benchmark and logs.
    pub save_ms: u64,
    /// Set by a suspend only: the shared read-only disk that `disk.qcow2` is one private layer
    /// over (the template's disk, or the image's rootfs). A resume keeps it as the base of the
    /// next suspend, which bounds the backing chain. `None` for snapshots and templates,
    /// whose `disk.qcow2` itself becomes the base of their restores.
    pub shared_base: Option<BaseDisk>,
    /// Set for templates (format ≥ 3): the guest's RAM is the sparse file `memory.ram`, of
    /// which this many bytes are stored (non-zero pages), and `memory.bin` holds only the
    /// device state. Restores map it copy-on-write ([`crate::ram`]).
    #[serde(default)]
    pub shared_ram_bytes: Option<u64>,
    /// Set by a suspend of a template clone: the template directory whose `memory.ram` the
    /// guest RAM maps, and `memory.bin` holds only the pages that differ from it
    /// ([`crate::ramdiff`]). A resume maps that RAM again and loads the difference on top. A
    /// moat that predates the field refuses the directory (unknown field) rather than
    /// loading it as a whole image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_base: Option<PathBuf>,
}

impl SnapshotMeta {
    pub fn load(dir: &Path) -> Result<SnapshotMeta> {
        let path = dir.join("meta.json");
        let bytes = std::fs::read(&path).ctx(|| format!("reading snapshot {}", path.display()))?;
        // Check the format before the fields, so an old moat says "too new" rather than
        // "unknown field".
        let format = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("format").and_then(|f| f.as_u64()));
        if !format
            .is_some_and(|f| (u64::from(OLDEST_FORMAT)..=u64::from(SNAPSHOT_FORMAT)).contains(&f))
        {
            return Err(Error::Snapshot(format!(
                "{} has format {}; this moat reads formats {OLDEST_FORMAT} to {SNAPSHOT_FORMAT}",
                path.display(),
                format.map_or("unknown".into(), |f| f.to_string())
            )));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Snapshot(format!("{} is malformed: {e}", path.display())))
    }

    pub fn store(&self, dir: &Path) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::Snapshot(format!("encoding snapshot metadata: {e}")))?;
        write_atomic(&dir.join("meta.json"), &bytes)
    }

    /// A memory image only restores into the same machine: same accelerator, QEMU, kernel,
    /// agent and CPU/memory layout.
    pub fn check_compatible(&self, rt: &Runtime) -> Result<()> {
        let mismatch = |what: &str, ours: &str, theirs: &str| {
            Err(Error::Snapshot(format!(
                "snapshot was taken with {what} {theirs}, this host runs {ours}; \
                 it cannot be restored here"
            )))
        };
        if self.accel != rt.accel.accel.as_str() {
            return mismatch("accelerator", rt.accel.accel.as_str(), &self.accel);
        }
        if self.qemu_version != rt.qemu_version {
            return mismatch("QEMU", &rt.qemu_version, &self.qemu_version);
        }
        if self.kernel_version != rt.kernel.version {
            return mismatch("guest kernel", &rt.kernel.version, &self.kernel_version);
        }
        if self.initramfs_sha256 != rt.initramfs.sha256 {
            return mismatch("guest agent", &rt.initramfs.sha256, &self.initramfs_sha256);
        }
        Ok(())
    }
}

/// A directory being built next to its final place; removed on drop unless persisted.
#[derive(Debug)]
pub(crate) struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `<parent>/<prefix>-<pid>-<random>`.
    pub(crate) fn new_in(parent: &Path, prefix: &str) -> Result<TempDir> {
        let path = parent.join(format!(
            "{prefix}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).ctx(|| format!("creating {}", path.display()))?;
        Ok(TempDir { path, keep: false })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the directory durable and renames it to `dest` (which must not exist).
    pub(crate) fn persist(mut self, dest: &Path) -> Result<()> {
        fsync_dir(&self.path)?;
        std::fs::rename(&self.path, dest).ctx(|| format!("renaming into {}", dest.display()))?;
        self.keep = true;
        if let Some(parent) = dest.parent() {
            fsync_dir(parent)?;
        }
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

pub(crate) fn fsync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("syncing {}", path.display()))
}

/// An exclusive lock on `path` (created if missing), or `None` when another process holds it.
/// The kernel releases it when the holder dies, however it dies.
pub(crate) fn try_lock(path: &Path) -> Result<Option<File>> {
    let f = open_lock(path)?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(Error::io(format!("locking {}", path.display()), e))
        }
    }
}

/// Waits for an exclusive lock on `path`.
pub(crate) async fn lock(path: &Path) -> Result<File> {
    let f = open_lock(path)?;
    let shown = path.display().to_string();
    tokio::task::spawn_blocking(move || f.lock().map(|()| f))
        .await
        .map_err(|e| Error::io(format!("locking {shown}"), std::io::Error::other(e)))?
        .ctx(|| format!("locking {shown}"))
}

fn open_lock(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ctx(|| format!("opening lock file {}", path.display()))
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Deletes the memory image of a suspended sandbox once it has been resumed (QEMU has loaded
/// it by then): the largest file of the directory, and no longer needed. `disk.qcow2` stays,
/// as the resumed sandbox's backing file, until its next suspend replaces the directory; the
/// directory cannot be resumed again. Returns the bytes freed. Idempotent.
pub fn discard_memory(dir: &Path) -> Result<u64> {
    let memory = dir.join("memory.bin");
    let bytes = match std::fs::metadata(&memory) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(format!("inspecting {}", memory.display()), e)),
    };
    std::fs::remove_file(&memory).ctx(|| format!("removing {}", memory.display()))?;
    fsync_dir(dir)?;
    Ok(bytes)
}

/// The bytes the tree at `dir` takes on the host: allocated blocks, since disks and memory
/// images are sparse.
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => allocated_bytes(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
