//! Copy-on-write disks: every VM writes to its own qcow2 overlay on top of a shared,
//! read-only base, so the host stores only the blocks a sandbox actually wrote.

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

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

/// Creates an empty qcow2 disk of `size_bytes` at `path` with no backing file: the target of
/// a live migration that mirrors a whole disk (the destination lacks its backing chain).
pub async fn create_standalone(size_bytes: u64, path: &Path) -> Result<()> {
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size_bytes.to_string());
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

/// Writes the whole backing chain of the qcow2 image `path` into `dest`, a new qcow2 with no
/// backing file: a disk that depends on no other file, which any host can run (a suspend on
/// shared storage, read by other nodes whose templates and image files are their own). Not
/// `-B` (see [`rebase`]): without a backing file `convert` reads every layer.
pub async fn flatten(path: &Path, dest: &Path) -> Result<()> {
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["convert", "-q", "-f", "qcow2", "-O", "qcow2"])
        .arg(path)
        .arg(dest);
    qemu_img(cmd).await
}

/// The backing file named in the header of the qcow2 image at `path` (resolved against its
/// directory, as QEMU does), or None for a raw file or a qcow2 without one. Headers are read
/// directly: they are written by QEMU on the host, and a process per file would make a scan
/// of every sandbox's disk slow.
pub fn backing_file(path: &Path) -> Result<Option<PathBuf>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    let mut header = [0u8; 20];
    if f.read_exact(&mut header).is_err() || &header[..4] != b"QFI\xfb" {
        return Ok(None);
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    let size = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
    // QEMU itself refuses backing names longer than 1023 bytes.
    if offset == 0 || size == 0 || size > 1023 {
        return Ok(None);
    }
    let mut name = vec![0u8; size as usize];
    f.seek(SeekFrom::Start(offset))
        .and_then(|_| f.read_exact(&mut name))
        .ctx(|| format!("reading the backing file name of {}", path.display()))?;
    let name = PathBuf::from(std::ffi::OsString::from_vec(name));
    Ok(Some(match path.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name,
    }))
}

/// Every file below `path` in its backing chain (not `path` itself), nearest first. Stops
/// after a missing file and at a loop.
pub fn backing_chain(path: &Path) -> Result<Vec<PathBuf>> {
    let mut chain: Vec<PathBuf> = Vec::new();
    let mut current = path.to_path_buf();
    while let Some(next) = backing_file(&current)? {
        if next == path || chain.contains(&next) {
            break;
        }
        chain.push(next.clone());
        if !next.exists() {
            break;
        }
        current = next;
    }
    Ok(chain)
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
    async fn backing_chain_reads_qcow2_headers() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        std::fs::write(p("base.raw"), vec![1u8; 1 << 20]).unwrap();
        create_overlay(&p("base.raw"), "raw", 0, &p("a.qcow2"))
            .await
            .unwrap();
        create_overlay(&p("a.qcow2"), "qcow2", 0, &p("b.qcow2"))
            .await
            .unwrap();
        let base = std::fs::canonicalize(p("base.raw")).unwrap();
        let a = std::fs::canonicalize(p("a.qcow2")).unwrap();
        assert_eq!(backing_chain(&p("b.qcow2")).unwrap(), vec![a, base]);
        assert_eq!(
            backing_chain(&p("base.raw")).unwrap(),
            Vec::<PathBuf>::new()
        );
        // A missing middle layer still names itself, and the walk stops there.
        std::fs::remove_file(p("a.qcow2")).unwrap();
        assert_eq!(backing_chain(&p("b.qcow2")).unwrap().len(), 1);
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

    #[tokio::test]
    async fn a_standalone_disk_has_its_size_and_no_backing_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("whole.qcow2");
        create_standalone(64 << 20, &p).await.unwrap();
        assert_eq!(backing_file(&p).unwrap(), None);
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&p)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["virtual-size"], 64u64 << 20);
        assert_eq!(v["format"], "qcow2");
    }

    #[tokio::test]
    async fn flatten_makes_a_disk_that_needs_no_other_file() {
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n);
        let io = |img: &Path, cmd: &str| {
            let out = std::process::Command::new("qemu-io")
                .args(["-c", cmd])
                .arg(img)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success() && !text.contains("fail"),
                "qemu-io {cmd}: {text}"
            );
        };
        std::fs::write(p("base.raw"), vec![1u8; 4 << 20]).unwrap();
        create_overlay(&p("base.raw"), "raw", 8 << 20, &p("tpl.qcow2"))
            .await
            .unwrap();
        io(&p("tpl.qcow2"), "write -P 2 0 1M");
        create_overlay(&p("tpl.qcow2"), "qcow2", 0, &p("top.qcow2"))
            .await
            .unwrap();
        io(&p("top.qcow2"), "write -P 3 1M 1M");
        flatten(&p("top.qcow2"), &p("flat.qcow2")).await.unwrap();
        // Every layer can go (another host has none of them); content and size are kept.
        for f in ["base.raw", "tpl.qcow2", "top.qcow2"] {
            std::fs::remove_file(p(f)).unwrap();
        }
        assert_eq!(backing_file(&p("flat.qcow2")).unwrap(), None);
        for (off, pat) in [(0, 2), (1 << 20, 3), (2 << 20, 1), (6 << 20, 0)] {
            io(&p("flat.qcow2"), &format!("read -P {pat} {off} 512k"));
        }
    }
}
