//! Copy-on-write disks: every VM writes to its own qcow2 overlay on top of a shared,
//! read-only base, so the host stores only the blocks a sandbox actually wrote.

use std::path::Path;

use crate::error::IoContext;
use crate::{Error, Result};

/// Creates a qcow2 overlay at `path` backed by `backing` (`raw` or `qcow2`). The guest sees
/// a disk of `size_bytes` (0 = the backing file's size); it may be larger than the backing
/// file, the extra space reading as zeros until written.
pub async fn create_overlay(
    backing: &Path,
    backing_format: &str,
    size_bytes: u64,
    path: &Path,
) -> Result<()> {
    if !matches!(backing_format, "raw" | "qcow2") {
        return Err(Error::InvalidArgument(format!(
            "backing format {backing_format:?}: use \"raw\" or \"qcow2\""
        )));
    }
    // qemu-img resolves a relative backing path against the overlay's directory, which is
    // never what a caller means: store the absolute path.
    let backing = std::fs::canonicalize(backing)
        .ctx(|| format!("backing disk {} (does it exist?)", backing.display()))?;
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", backing_format, "-b"])
        .arg(&backing)
        .arg(path);
    if size_bytes > 0 {
        cmd.arg(size_bytes.to_string());
    }
    let out = cmd.output().await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::ToolMissing {
                tool: "qemu-img",
                package: "qemu-utils",
            }
        } else {
            Error::io("running qemu-img", e)
        }
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: format!("{cmd:?}"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overlay_is_bigger_than_base_and_small_on_disk() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
        let ov = d.path().join("ov.qcow2");
        create_overlay(&base, "raw", 64 << 20, &ov).await.unwrap();
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&ov)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["virtual-size"], 64u64 << 20);
        assert_eq!(v["backing-filename-format"], "raw");
        assert!(std::fs::metadata(&ov).unwrap().len() < 1 << 20);
        let e = create_overlay(&base, "vmdk", 0, &ov).await.unwrap_err();
        assert!(e.to_string().contains("raw"));
        let e = create_overlay(&d.path().join("nope"), "raw", 0, &ov)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("does it exist"), "{e}");
    }
}
