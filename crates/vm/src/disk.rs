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
    qemu_img(cmd).await
}

/// Makes the qcow2 image `path` a single layer over `backing` (`raw` or `qcow2`, which must
/// be in `path`'s current backing chain or hold the same data below it): every cluster whose
/// content differs from `backing` is written into `path` (qemu-img's safe rebase). Used to
/// flatten a suspended sandbox's disk so its chain does not grow with every suspend/resume.
///
/// Not `qemu-img convert -B`: QEMU 7.2 copies only the clusters allocated in the *top*
/// image then, silently dropping what the intermediate layers hold.
pub async fn rebase(path: &Path, backing: &Path, backing_format: &str) -> Result<()> {
    let backing = std::fs::canonicalize(backing)
        .ctx(|| format!("backing disk {} (does it exist?)", backing.display()))?;
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["rebase", "-q", "-f", "qcow2", "-F", backing_format, "-b"])
        .arg(&backing)
        .arg(path);
    qemu_img(cmd).await
}

async fn qemu_img(mut cmd: tokio::process::Command) -> Result<()> {
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

    #[tokio::test]
    async fn rebase_keeps_every_layer_above_the_new_base() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        let io = |img: &Path, cmd: &str| {
            let ok = std::process::Command::new("qemu-io")
                .args(["-c", cmd])
                .arg(img)
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "qemu-io {cmd}");
        };
        std::fs::write(p("base.raw"), vec![1u8; 4 << 20]).unwrap();
        create_overlay(&p("base.raw"), "raw", 0, &p("tpl.qcow2"))
            .await
            .unwrap();
        io(&p("tpl.qcow2"), "write -P 2 0 1M");
        create_overlay(&p("tpl.qcow2"), "qcow2", 0, &p("mid.qcow2"))
            .await
            .unwrap();
        io(&p("mid.qcow2"), "write -P 3 1M 1M");
        create_overlay(&p("mid.qcow2"), "qcow2", 0, &p("top.qcow2"))
            .await
            .unwrap();
        io(&p("top.qcow2"), "write -P 4 2M 512k");
        std::fs::copy(p("top.qcow2"), p("flat.qcow2")).unwrap();
        rebase(&p("flat.qcow2"), &p("tpl.qcow2"), "qcow2")
            .await
            .unwrap();
        // The middle layer is no longer needed, and the content is unchanged.
        std::fs::remove_file(p("mid.qcow2")).unwrap();
        std::fs::rename(p("flat.qcow2"), p("check.qcow2")).unwrap();
        for (off, pat) in [(0, 2), (1 << 20, 3), (2 << 20, 4), (3 << 20, 1)] {
            io(&p("check.qcow2"), &format!("read -P {pat} {off} 512k"));
        }
    }
}
