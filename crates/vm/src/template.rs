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
    let sandbox = Sandbox::boot_template(rt, &id, image_digest, rootfs, tier, &key).await?;
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
    crate::ram::forget(&dir);
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
            crate::ram::forget(&path);
            std::fs::remove_dir_all(&path)
                .map_err(|err| crate::Error::io(format!("removing {}", path.display()), err))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// What [`collect`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Superseded templates and interrupted builds removed.
    pub removed: usize,
    pub freed_bytes: u64,
    /// Superseded templates kept because a sandbox's disk still has them as its backing, or
    /// a QEMU still maps their RAM.
    pub kept_in_use: usize,
}

/// Removes the templates this runtime can no longer restore (built by another agent, kernel,
/// QEMU or snapshot format: their key is not the one this runtime computes for their image
/// and tier), except those still in the backing chain of a disk elsewhere in MOAT_HOME (a
/// running or suspended sandbox, a snapshot) or whose RAM a QEMU still maps. Without it every agent upgrade leaves a
/// template per image and tier behind for good. Also removes the `.tmp-` directories of
/// builds that were killed (their key's lock is free).
pub fn collect(rt: &Runtime) -> Result<Collected> {
    collect_in(&rt.home, |dir_key, meta| {
        dir_key == key(rt, &meta.image, meta.tier)
    })
}

fn collect_in(home: &Path, current: impl Fn(&str, &SnapshotMeta) -> bool) -> Result<Collected> {
    let root = templates_root(home);
    let mut done = Collected::default();
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(done);
    };
    let used = DisksInUse::scan(home)?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let dir = e.path();
        if let Some(key) = name.strip_prefix(".tmp-").and_then(|r| r.get(..64)) {
            // A build killed before it renamed its directory into place (a daemon under
            // `kill -9`): unless that key is being built now (its builder holds the key's lock),
            // it is garbage that no later build removes if the image is gone.
            if !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let Some(_lock) = snapshot::try_lock(&root.join(format!("{key}.lock")))? else {
                continue;
            };
            let bytes = snapshot::allocated_bytes(&dir);
            std::fs::remove_dir_all(&dir)
                .map_err(|err| crate::Error::io(format!("removing {}", dir.display()), err))?;
            tracing::info!(
                key = &key[..12],
                bytes,
                "removed an interrupted template build"
            );
            done.removed += 1;
            done.freed_bytes += bytes;
            continue;
        }
        if name.starts_with('.') || !dir.is_dir() {
            continue;
        }
        // No meta.json: a crashed build, removed by the next build of that key.
        let Ok(meta) = SnapshotMeta::load(&dir) else {
            continue;
        };
        if current(&name, &meta) {
            continue;
        }
        if used.holds(&dir) || crate::ram::mapped_by_a_qemu(&name) {
            done.kept_in_use += 1;
            continue;
        }
        // A template being built or removed by someone else holds its lock: leave it.
        let lock_path = root.join(format!("{name}.lock"));
        let Some(_lock) = snapshot::try_lock(&lock_path)? else {
            continue;
        };
        let bytes = snapshot::allocated_bytes(&dir);
        crate::ram::forget(&dir);
        std::fs::remove_dir_all(&dir)
            .map_err(|err| crate::Error::io(format!("removing {}", dir.display()), err))?;
        // Nobody builds a superseded key, so nobody can be waiting on this lock file.
        let _ = std::fs::remove_file(&lock_path);
        tracing::info!(
            key = &name[..name.len().min(12)],
            bytes,
            "removed a superseded template"
        );
        done.removed += 1;
        done.freed_bytes += bytes;
    }
    Ok(done)
}

/// The directories holding a file that some qcow2 disk under a MOAT_HOME — a running
/// sandbox's overlay, a suspend directory, a snapshot; not the templates or the image store
/// themselves — has in its backing chain: an image or template directory among them must not
/// be removed.
pub struct DisksInUse(std::collections::HashSet<PathBuf>);

impl DisksInUse {
    /// Reads the backing chains of every such disk under `home` (qcow2 headers only).
    pub fn scan(home: &Path) -> Result<DisksInUse> {
        backing_dirs_in_use(home).map(DisksInUse)
    }

    /// Whether a disk in use backs onto a file in `dir`.
    pub fn holds(&self, dir: &Path) -> bool {
        self.0
            .contains(&std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()))
    }

    /// Why the base disk `disk` (an image's rootfs) must stay, if a disk in use lies over it.
    pub fn why_kept(&self, disk: &Path) -> Option<String> {
        disk.parent().filter(|dir| self.holds(dir)).map(|_| {
            "it is still under the disk of a sandbox or a snapshot (running, suspended or \
             forked); delete those first"
                .to_string()
        })
    }
}

fn backing_dirs_in_use(home: &Path) -> Result<std::collections::HashSet<PathBuf>> {
    let mut used = std::collections::HashSet::new();
    let mut stack = vec![(home.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                let skip =
                    depth == 0 && matches!(e.file_name().to_str(), Some("templates" | "images"));
                if !skip && depth < 4 {
                    stack.push((path, depth + 1));
                }
            } else if ft.is_file() && path.extension().is_some_and(|x| x == "qcow2") {
                for backing in crate::disk::backing_chain(&path)? {
                    if let Some(parent) = backing.parent() {
                        used.insert(
                            std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_path_buf()),
                        );
                    }
                }
            }
        }
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::create_overlay;

    fn template(root: &Path, key: &str, initramfs: &str, base: &Path) -> PathBuf {
        let dir = root.join(key);
        std::fs::create_dir_all(&dir).unwrap();
        let meta = SnapshotMeta {
            format: SNAPSHOT_FORMAT,
            image: "sha256:aa".into(),
            tier: Tier::S,
            mem_mib: 512,
            cpus: 1,
            accel: "tcg".into(),
            kernel_version: "k".into(),
            initramfs_sha256: initramfs.into(),
            qemu_version: "q".into(),
            memory_bytes: 0,
            created_unix: 0,
            save_ms: 0,
            shared_base: None,
            shared_ram_bytes: None,
            ram_base: None,
        };
        meta.store(&dir).unwrap();
        std::fs::copy(base, dir.join("disk.qcow2")).unwrap();
        dir
    }

    #[tokio::test]
    async fn collect_removes_superseded_templates_nobody_uses() {
        let home = tempfile::tempdir().unwrap();
        let root = templates_root(home.path());
        std::fs::create_dir_all(&root).unwrap();
        let raw = home.path().join("base.raw");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let base = home.path().join("base.qcow2");
        create_overlay(&raw, "raw", 0, &base).await.unwrap();
        let old = template(&root, "old", "agent-1", &base);
        let used = template(&root, "used", "agent-1", &base);
        let cur = template(&root, "cur", "agent-2", &base);
        // A sandbox suspended over the `used` template.
        let sus = home.path().join("suspended/sb-1/3");
        std::fs::create_dir_all(&sus).unwrap();
        create_overlay(
            &used.join("disk.qcow2"),
            "qcow2",
            0,
            &sus.join("disk.qcow2"),
        )
        .await
        .unwrap();

        let is_current = |_: &str, m: &SnapshotMeta| m.initramfs_sha256 == "agent-2";
        let done = collect_in(home.path(), is_current).unwrap();
        assert_eq!(done.removed, 1);
        assert_eq!(done.kept_in_use, 1);
        assert!(done.freed_bytes > 0);
        assert!(!old.exists() && used.exists() && cur.exists());

        // A build killed half-way goes; one under way (its key's lock held) stays.
        let (dead, live) = ("a".repeat(64), "b".repeat(64));
        for k in [&dead, &live] {
            let tmp = root.join(format!(".tmp-{k}-4242-0123456789abcdef"));
            std::fs::create_dir_all(&tmp).unwrap();
            std::fs::write(tmp.join("memory.bin"), vec![1u8; 4096]).unwrap();
        }
        let held = snapshot::try_lock(&root.join(format!("{live}.lock")))
            .unwrap()
            .unwrap();
        let done = collect_in(home.path(), is_current).unwrap();
        assert_eq!((done.removed, done.kept_in_use), (1, 1));
        assert!(!root
            .join(format!(".tmp-{dead}-4242-0123456789abcdef"))
            .exists());
        assert!(root
            .join(format!(".tmp-{live}-4242-0123456789abcdef"))
            .exists());
        drop(held);

        // Once that sandbox is gone, its template goes too.
        std::fs::remove_dir_all(home.path().join("suspended")).unwrap();
        let done = collect_in(home.path(), is_current).unwrap();
        assert_eq!((done.removed, done.kept_in_use), (2, 0));
        assert!(!used.exists() && cur.exists());
    }
}
