//! `moat setup`: everything a first sandbox needs, installed under MOAT_HOME. Idempotent: what
//! is there already is kept.

use anyhow::{Context, Result};
use clap::Args;
use moat_image::{ImageStore, ImportOptions, NoProgress, Source};

use crate::home::Home;
use crate::progress::Bars;

/// Name under which the base image is imported; `moat run` uses it when no image is given.
pub const BASE_IMAGE: &str = "base";

#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Rebuild the base image even when one is imported.
    #[arg(long)]
    rebuild_base: bool,
}

pub async fn run(home: &Home, accel: Option<&str>, args: SetupArgs) -> Result<u8> {
    let bars = Bars::new();
    bars.spinner("installing the guest kernel");
    let root = home.root.clone();
    let kernel =
        tokio::task::spawn_blocking(move || moat_vm::assets::install_kernel(&root)).await??;
    bars.finish();
    eprintln!(
        "guest kernel {} in {}",
        kernel.version,
        kernel.vmlinuz.display()
    );

    let store = ImageStore::open(&home.images())?;
    if args.rebuild_base || store.resolve(BASE_IMAGE).is_err() {
        let dir = tempfile::Builder::new()
            .prefix(".base-image-")
            .tempdir_in(&home.root)
            .context("creating a temporary directory for the base image")?;
        bars.spinner("building the base image with mmdebstrap (Debian bookworm + python3)");
        let out = dir.path().join("oci");
        let built = {
            let out = out.clone();
            tokio::task::spawn_blocking(move || moat_image::build_base_image(&out)).await?
        };
        bars.finish();
        built?;
        let source = Source::parse(&format!("oci:{}", out.display()))?;
        let image = store
            .import(
                &source,
                Some(BASE_IMAGE),
                &ImportOptions::default(),
                &NoProgress,
            )
            .await?;
        eprintln!("base image {BASE_IMAGE} {}", image.digest);
    } else {
        eprintln!("base image {BASE_IMAGE} present");
    }
    let rt = home.runtime(accel)?;
    eprintln!(
        "initramfs {} (agent {}); accelerator {} ({})",
        rt.initramfs.path.display(),
        &rt.initramfs.sha256[..12],
        rt.accel.accel.as_str(),
        rt.accel.reason
    );
    let collected = {
        let rt = rt.clone();
        tokio::task::spawn_blocking(move || moat_vm::template::collect(&rt)).await??
    };
    if collected.removed > 0 {
        eprintln!(
            "removed {} superseded template(s), {} MiB",
            collected.removed,
            collected.freed_bytes >> 20
        );
    }

    Ok(0)
}
