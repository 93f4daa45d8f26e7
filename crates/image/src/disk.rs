//! Builds the read-only ext4 root disk from an unpacked rootfs with `mkfs.ext4 -d` (no mount,
//! no loop device, works unprivileged apart from file ownership).

use std::fs::{self, File};
use std::path::Path;
use std::process::Command;

use crate::error::{ioe, Error, Result};

const MIB: u64 = 1 << 20;

/// Bytes and inodes the tree needs, counted the way ext4 allocates (4 KiB blocks).
fn usage(dir: &Path) -> Result<(u64, u64)> {
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).map_err(ioe("reading directory", &d))? {
            let e = e.map_err(ioe("reading directory", &d))?;
            let m = e.metadata().map_err(ioe("stat", &e.path()))?;
            inodes += 1;
            bytes += m.len().div_ceil(4096) * 4096 + 4096;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// Runs mkfs.ext4 on a sparse file sized from the content; retries bigger when mkfs runs out
/// of blocks or inodes. The default inode ratio is kept so a grown filesystem scales its inodes
/// too. Returns the disk size in bytes.
pub fn build_ext4(rootfs: &Path, img: &Path) -> Result<u64> {
    let (bytes, inodes) = usage(rootfs)?;
    // Slack: journal (up to 64 MiB at these sizes), group descriptors, inode tables, and
    // enough inodes at the default ratio of one per 16 KiB.
    let by_data = bytes + bytes / 4 + 64 * MIB;
    let by_inodes = (inodes + 1024) * 16384 * 3 / 2 + 32 * MIB;
    let mut size = by_data.max(by_inodes).div_ceil(MIB) * MIB;
    for _attempt in 0..5 {
        let _ = fs::remove_file(img);
        let f = File::create(img).map_err(ioe("creating", img))?;
        f.set_len(size).map_err(ioe("sizing", img))?;
        drop(f);
        let out = Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-E",
                "root_owner=0:0",
                "-L",
                "moat-root",
                "-d",
            ])
            .arg(rootfs)
            .arg(img)
            .output()
            .map_err(|e| {
                Error::Mkfs(format!(
                    "cannot run mkfs.ext4 ({e}); install the e2fsprogs package"
                ))
            })?;
        if out.status.success() {
            File::open(img)
                .and_then(|f| f.sync_all())
                .map_err(ioe("syncing", img))?;
            return Ok(size);
        }
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        if msg.contains("No space left on device") && host_free(img) < size {
            let _ = fs::remove_file(img);
            return Err(Error::NoSpace {
                path: img.to_path_buf(),
            });
        }
        let full = [
            "Could not allocate",
            "No free space",
            "inode",
            "space",
            "too small",
        ]
        .iter()
        .any(|s| msg.contains(s));
        if !full {
            let _ = fs::remove_file(img);
            return Err(Error::Mkfs(format!(
                "mkfs.ext4 -d {} failed: {}",
                rootfs.display(),
                msg.trim()
            )));
        }
        tracing::debug!(size, "mkfs.ext4 ran out of space; retrying bigger");
        size *= 2;
    }
    let _ = fs::remove_file(img);
    Err(Error::Mkfs(format!(
        "mkfs.ext4 kept running out of space up to {} MiB",
        size / MIB
    )))
}

fn host_free(path: &Path) -> u64 {
    let dir = path.parent().unwrap_or(Path::new("/"));
    nix::sys::statvfs::statvfs(dir)
        .map(|s| s.blocks_available() * s.fragment_size())
        .unwrap_or(u64::MAX)
}
