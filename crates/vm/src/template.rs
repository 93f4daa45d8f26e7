//! Templates: an image booted once to "agent ready" and snapshotted, so that every later
//! sandbox of that image is a restore instead of a boot.
//!
//! A template is only valid for the exact machine that made it, so its key covers the image
//! digest, the tier's memory and CPUs, the kernel, the initramfs (agent and modules), the
//! accelerator and the QEMU version. Builds are serialised per key by a lock file, so
//! concurrent first runs of one image build it once; the snapshot directory is renamed into
//! place only when complete, so a crash mid-build leaves nothing that looks valid.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::sandbox::{Runtime, Sandbox};
use crate::snapshot::{self, SnapshotMeta, SNAPSHOT_FORMAT};
use crate::tier::Tier;
use crate::Result;

/// A ready template.
#[derive(Debug, Clone)]
pub struct Template {
    /// The snapshot directory to restore from.
    pub dir: PathBuf,
    /// Whether this call built it (a cold start) rather than found it.
    pub built: bool,
}

/// The cache key of the template of `image_digest` at `tier` on this runtime.
pub fn key(rt: &Runtime, image_digest: &str, tier: Tier) -> String {
    let material = serde_json::json!({
        "snapshot_format": SNAPSHOT_FORMAT,
        "image": image_digest,
        "tier": tier.as_str(),
        "mem_mib": tier.mem_mib(),
        "cpus": tier.cpus(),
        "kernel": rt.kernel.version,
        "initramfs": rt.initramfs.sha256,
        "accel": rt.accel.accel.as_str(),
        "qemu": rt.qemu_version,
        "cmdline": crate::qemu::kernel_cmdline(),
    });
    hex::encode(Sha256::digest(material.to_string().as_bytes()))
}

pub fn templates_root(home: &Path) -> PathBuf {
    home.join("templates")
}

/// Whether the template of `image_digest` at `tier` is ready (a run would be warm).
pub fn exists(rt: &Runtime, image_digest: &str, tier: Tier) -> bool {
    templates_root(&rt.home)
        .join(key(rt, image_digest, tier))
        .join("meta.json")
        .exists()
}

/// Returns the template of `image_digest` (whose base disk is `rootfs`), building it first if
/// this machine has none yet.
pub async fn ensure(
    rt: &Runtime,
    image_digest: &str,
    rootfs: &Path,
    tier: Tier,
) -> Result<Template> {
    let root = templates_root(&rt.home);
    let key = key(rt, image_digest, tier);
    let dir = root.join(&key);
    if dir.join("meta.json").exists() {
        return Ok(Template { dir, built: false });
    }
    std::fs::create_dir_all(&root)
        .map_err(|e| crate::Error::io(format!("creating {}", root.display()), e))?;
    let _lock = snapshot::lock(&root.join(format!("{key}.lock"))).await?;
    if dir.join("meta.json").exists() {
        // Another process built it while we waited.
        return Ok(Template { dir, built: false });
    }
    // Leftovers of a build that crashed, and a directory without its meta.json, are garbage.
    remove_stale(&root, &key);
    let started = Instant::now();
    let id = format!("template-{}-{:08x}", &key[..12], rand::random::<u32>());
    let sandbox = Sandbox::boot(rt, &id, image_digest, rootfs, tier).await?;
    let meta = sandbox.snapshot_and_stop(rt, &dir).await?;
    tracing::info!(
        image = image_digest,
        tier = tier.as_str(),
        key = &key[..12],
        build_ms = started.elapsed().as_millis() as u64,
        memory_bytes = meta.memory_bytes,
        "template built"
    );
    Ok(Template { dir, built: true })
}

fn remove_stale(root: &Path, key: &str) {
    let _ = std::fs::remove_dir_all(root.join(key));
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let prefix = format!(".tmp-{key}");
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Removes the template of `image_digest` at `tier` on this runtime, so the next run is cold.
pub fn remove_for_tier(rt: &Runtime, image_digest: &str, tier: Tier) -> Result<()> {
    let dir = templates_root(&rt.home).join(key(rt, image_digest, tier));
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(crate::Error::io(format!("removing {}", dir.display()), e))
        }
        _ => Ok(()),
    }
}

/// Removes every template built from `image_digest` (when the image is removed).
pub fn remove_for_image(home: &Path, image_digest: &str) -> Result<usize> {
    let root = templates_root(home);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(0);
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = SnapshotMeta::load(&path) else {
            continue;
        };
        if meta.image == image_digest {
            std::fs::remove_dir_all(&path)
                .map_err(|err| crate::Error::io(format!("removing {}", path.display()), err))?;
            removed += 1;
        }
    }
    Ok(removed)
}
