//! Builds moat's default base image (Debian bookworm minbase + python3 + ca-certificates) as an
//! OCI layout with mmdebstrap, so the set-up needs no registry access beyond the Debian mirror.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, Result};
use crate::layout::LayoutWriter;
use crate::spec::Compression;
use crate::ImageConfig;

/// Runs `mmdebstrap` (needs root, ~25 s) and writes an OCI image layout at `out_dir` with one
/// gzip layer and the ref name `latest`.
pub fn build_base_image(out_dir: &Path) -> Result<()> {
    let work =
        tempfile::tempdir().map_err(|e| Error::io("creating a temp dir", Path::new("/tmp"), e))?;
    let tar = work.path().join("rootfs.tar");
    let out = Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--include=python3,ca-certificates",
            "--format=tar",
            "bookworm",
        ])
        .arg(&tar)
        .arg("http://deb.debian.org/debian")
        .output()
        .map_err(|e| Error::Command {
            command: "mmdebstrap".into(),
            detail: format!("{e}; install the mmdebstrap package"),
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(Error::Command {
            command: "mmdebstrap".into(),
            detail: format!("{}: {}", out.status, tail.join("\n")),
        });
    }
    let mut w = LayoutWriter::create(out_dir)?;
    w.add_layer_file(&tar, Compression::Gzip)?;
    w.finish(
        &ImageConfig {
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            working_dir: Some("/".into()),
            user: None,
            entrypoint: vec![],
            cmd: vec!["/bin/sh".into()],
        },
        Some("latest"),
    )?;
    Ok(())
}
