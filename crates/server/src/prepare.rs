//! Preparing a MOAT_HOME for sandboxes: the guest kernel, the base image and the initramfs.
//! The one code path behind both `moat setup` and a daemon that starts on a home without them
//! (see `readiness`); each front end shows the progress its own way.

use std::path::Path;

use moat_image::{ImageStore, ImportOptions, NoProgress, Source};
use moat_vm::Runtime;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{Error, Result};

/// Name under which the base image is imported; `moat run` and a group that names no image use
/// it.
pub const BASE_IMAGE: &str = "base";

/// One step of the preparation, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = SetupStep)]
pub enum Step {
    /// Debian's cloud kernel, downloaded with `apt-get download` (skipped when installed).
    Kernel,
    /// The base image, built with mmdebstrap and imported (skipped when imported).
    BaseImage,
    /// The initramfs with the guest agent as `/init` (cached), and the accelerator.
    Initramfs,
}

impl Step {
    pub const ALL: [Step; 3] = [Step::Kernel, Step::BaseImage, Step::Initramfs];

    /// 1-based position in [`Step::ALL`].
    pub fn number(self) -> u32 {
        Step::ALL.iter().position(|s| *s == self).unwrap_or(0) as u32 + 1
    }

    /// What the step does, for people.
    pub fn describe(self) -> &'static str {
        match self {
            Step::Kernel => {
                "installing the guest kernel (Debian's linux-image-cloud-amd64) if missing"
            }
            Step::BaseImage => {
                "building the base image with mmdebstrap (Debian bookworm + python3) if missing"
            }
            Step::Initramfs => "building the initramfs if missing and detecting the accelerator",
        }
    }
}

/// Where the preparation reports its progress.
pub trait Progress: Send + Sync {
    /// `step` starts.
    fn start(&self, step: Step);
    /// The step last started finished; `outcome` says what it installed or found, for people.
    fn done(&self, outcome: &str);
}

/// What to prepare beyond what is missing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Rebuild the base image even when one is imported.
    pub rebuild_base: bool,
}

/// Installs under `home` what a first sandbox needs and is missing, and returns the runtime
/// that uses it. Idempotent: what is there already is kept. Blocking work runs off the async
/// threads.
pub async fn prepare(
    home: &Path,
    agent: &Path,
    net_stack: &Path,
    accel: Option<&str>,
    options: Options,
    progress: &dyn Progress,
) -> Result<Runtime> {
    progress.start(Step::Kernel);
    let root = home.to_path_buf();
    let kernel = blocking(Step::Kernel, move || moat_vm::assets::install_kernel(&root)).await?;
    progress.done(&format!(
        "guest kernel {} in {}",
        kernel.version,
        kernel.vmlinuz.display()
    ));

    progress.start(Step::BaseImage);
    let outcome = base_image(home, options)
        .await
        .map_err(|e| failed(Step::BaseImage, e))?;
    progress.done(&outcome);

    progress.start(Step::Initramfs);
    let (root, agent, net_stack, accel) = (
        home.to_path_buf(),
        agent.to_path_buf(),
        net_stack.to_path_buf(),
        accel.map(str::to_string),
    );
    let rt = blocking(Step::Initramfs, move || {
        Runtime::new(&root, &agent, &net_stack, accel.as_deref())
    })
    .await?;
    progress.done(&format!(
        "initramfs {} (agent {}); accelerator {} ({})",
        rt.initramfs.path.display(),
        &rt.initramfs.sha256[..12],
        rt.accel.accel.as_str(),
        rt.accel.reason
    ));
    Ok(rt)
}

/// Builds and imports the base image unless it is there; says which.
async fn base_image(
    home: &Path,
    options: Options,
) -> std::result::Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let store = ImageStore::open(&home.join("images"))?;
    if !options.rebuild_base && store.resolve(BASE_IMAGE).is_ok() {
        return Ok(format!("base image {BASE_IMAGE} present"));
    }
    let dir = tempfile::Builder::new()
        .prefix(".base-image-")
        .tempdir_in(home)?;
    let out = dir.path().join("oci");
    let built = {
        let out = out.clone();
        tokio::task::spawn_blocking(move || moat_image::build_base_image(&out)).await?
    };
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
    Ok(format!("base image {BASE_IMAGE} {}", image.digest))
}

/// Runs blocking `f` for `step` on the blocking threads.
async fn blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    step: Step,
    f: impl FnOnce() -> std::result::Result<T, E> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| failed(step, e))?
        .map_err(|e| failed(step, e))
}

fn failed(step: Step, e: impl std::fmt::Display) -> Error {
    Error::Prepare {
        step,
        message: e.to_string(),
    }
}
