//! Image operations of the daemon: imports run as long-running operations (`POST /v1/images`
//! answers 202 with an [`Operation`] to poll), and removal refused while something uses the
//! image. The routes are `http/routes/images.rs`.
//!
//! Images are host-wide (every group's sandboxes share the store), so only admin keys import
//! and delete them; any key may list them. An operation's row is written when it starts and
//! when it ends; its progress lives in memory meanwhile. A daemon that starts marks the rows
//! still `running` failed: their import died with the previous daemon (the image store
//! removes the half-built files on its next import).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use moat_image::{ImageStore, ImportOptions, Source};

use crate::api::{
    self, check_name, image_of, ErrorDetail, ImportImage, Operation, OperationProgress,
};
use crate::error::{Error, Result};
use crate::store::Store;

/// The imports in progress: their image names (one import per name at a time) and progress.
#[derive(Default)]
pub struct Operations {
    live: Mutex<HashMap<String, Live>>,
}

struct Live {
    name: String,
    progress: Arc<Mutex<OperationProgress>>,
}

impl Operations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The running import of `name`, if there is one.
    pub(crate) fn importing(&self, name: &str) -> Option<String> {
        self.lock()
            .iter()
            .find(|(_, l)| l.name == name)
            .map(|(id, _)| id.clone())
    }

    /// The progress of running import `id`, if it runs in this daemon.
    pub(crate) fn progress(&self, id: &str) -> Option<OperationProgress> {
        self.lock().get(id).map(|live| {
            live.progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        })
    }

    /// Starts an import of `source` as `name`: claims the name (a conflict while another
    /// import of it runs), records the operation and runs the import in the background.
    pub(crate) async fn start_import(
        self: &Arc<Self>,
        store: &Store,
        images: ImageStore,
        req: &ImportImage,
        source: Source,
        name: String,
    ) -> Result<Operation> {
        let id = new_op_id();
        let progress = Arc::new(Mutex::new(OperationProgress {
            phase: "queued".to_string(),
            ..OperationProgress::default()
        }));
        {
            // Checked and claimed under one lock: two imports of one name never both start.
            let mut live = self.lock();
            if let Some((other, _)) = live.iter().find(|(_, l)| l.name == name) {
                return Err(Error::Conflict(format!(
                    "an import of image {} is already running (operation {other}); wait for it",
                    api::quote(&name)
                )));
            }
            live.insert(
                id.clone(),
                Live {
                    name: name.clone(),
                    progress: progress.clone(),
                },
            );
        }
        let request = serde_json::to_string(&req).unwrap_or_default();
        let inserted = store.insert_operation(&id, &name, &request).await;
        let op = match inserted {
            Ok(Some(op)) => op,
            other => {
                self.lock().remove(&id);
                return Err(other
                    .err()
                    .unwrap_or_else(|| Error::Internal("the operation row vanished".to_string())));
            }
        };
        let (store, ops) = (store.clone(), self.clone());
        tokio::spawn(run_import(
            store,
            ops,
            images,
            id,
            source,
            name,
            req.plain_http,
            progress,
        ));
        Ok(op)
    }
}

/// Feeds an import's progress into its operation.
struct Tracker(Arc<Mutex<OperationProgress>>);

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, OperationProgress> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl moat_image::Progress for Tracker {
    fn phase(&self, name: &str, total_bytes: Option<u64>) {
        *self.lock() = OperationProgress {
            phase: name.to_string(),
            bytes_done: 0,
            bytes_total: total_bytes,
        };
    }

    fn advance(&self, bytes: u64) {
        let mut p = self.lock();
        p.bytes_done = p.bytes_done.saturating_add(bytes);
    }
}

fn new_op_id() -> String {
    format!("op-{:016x}", rand::random::<u64>())
}

#[allow(clippy::too_many_arguments)]
async fn run_import(
    store: Store,
    ops: Arc<Operations>,
    images: ImageStore,
    id: String,
    source: Source,
    name: String,
    plain_http: bool,
    progress: Arc<Mutex<OperationProgress>>,
) {
    let opts = ImportOptions {
        plain_http,
        // The daemon's own registry credentials (DOCKER_CONFIG or ~/.docker/config.json).
        docker_config: None,
    };
    let tracker = Tracker(progress.clone());
    let started = std::time::Instant::now();
    let outcome = images
        .import(&source, Some(&name), &opts, &tracker)
        .await
        .map(|img| image_of(&img, &name))
        .map_err(|e| ErrorDetail::new("import_failed", e.to_string()));
    let mut last = tracker.lock().clone();
    last.phase = if outcome.is_ok() { "done" } else { "failed" }.to_string();
    match &outcome {
        Ok(img) => tracing::info!(
            id,
            name,
            digest = img.digest,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "image imported"
        ),
        Err(e) => tracing::warn!(id, name, error = e.message, "image import failed"),
    }
    if let Err(e) = store.finish_operation(&id, last, outcome).await {
        tracing::error!(id, error = %e, "recording the end of an import");
    }
    ops.lock().remove(&id);
}

/// Image `r` (a name or a digest) on this node, pulled by digest when it is not here but was
/// imported from a registry on a node of the fleet: the import's reference pinned to the
/// digest it gave, so every node runs the same image. `None`: no such import (or one from a
/// file on another node's host, which this node cannot read).
pub(crate) async fn pull_imported(
    store: &Store,
    images: &ImageStore,
    r: &str,
) -> Result<Option<moat_image::Image>> {
    let Some(found) = store.imported_image(r).await? else {
        return Ok(None);
    };
    let Ok(Source::Registry(mut reference)) = Source::parse(&found.request.source) else {
        return Ok(None);
    };
    reference.digest = Some(found.digest.clone());
    let opts = ImportOptions {
        plain_http: found.request.plain_http,
        docker_config: None,
    };
    let started = std::time::Instant::now();
    let img = images
        .import(
            &Source::Registry(reference.clone()),
            Some(&found.name),
            &opts,
            &moat_image::NoProgress,
        )
        .await
        .map_err(|e| {
            Error::Unavailable(format!(
                "image {} is not on this node, and pulling it by digest from {}/{}@{} failed: \
                 {e}",
                api::quote(r),
                reference.registry,
                reference.repository,
                found.digest
            ))
        })?;
    if img.digest != found.digest {
        return Err(Error::Internal(format!(
            "pulling image {} by digest {} gave {}",
            found.name, found.digest, img.digest
        )));
    }
    tracing::info!(
        name = found.name,
        digest = img.digest,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "image pulled by digest for a create placed here"
    );
    Ok(Some(img))
}

/// The image named exactly `name` (not a digest prefix).
pub(crate) async fn named(images: &ImageStore, name: &str) -> Result<moat_image::Image> {
    check_name(name)?;
    let (images, n) = (images.clone(), name.to_string());
    let found = tokio::task::spawn_blocking(move || images.resolve(&n))
        .await
        .map_err(Error::task("resolving an image"))?;
    match found {
        Ok(img) if img.name.as_deref() == Some(name) => Ok(img),
        Ok(_) => Err(no_image(name)),
        Err(e) if e.is_not_found() => Err(no_image(name)),
        Err(e) => Err(Error::image(format!("resolving image {name}"))(e)),
    }
}

fn no_image(name: &str) -> Error {
    Error::NotFound(format!(
        "no image named {}; see GET /v1/images",
        api::quote(name)
    ))
}

/// Removes the name `name` from the image store, refused while a disk still uses the image
/// (sandboxes of `moat run`, suspended and forked ones); the image's templates go with its
/// last name.
pub(crate) async fn remove(images: ImageStore, home: std::path::PathBuf, name: &str) -> Result<()> {
    let n = name.to_string();
    tokio::task::spawn_blocking(move || -> Result<()> {
        // The store knows the daemon's sandboxes and snapshots; the disks also know those of
        // `moat run` and the suspended and forked ones.
        let used = moat_vm::template::DisksInUse::scan(&home)
            .map_err(Error::vm("reading which disks are in use"))?;
        let removed = images
            .remove_unless(&n, |img| Ok(used.why_kept(&img.rootfs)))
            .map_err(Error::image(format!("removing image {n}")))?;
        // Templates of a digest that is no longer cached can never be used again.
        if images.resolve(&removed.digest).is_err() {
            moat_vm::template::remove_for_image(&home, &removed.digest)
                .map_err(Error::vm(&format!("removing the templates of {n}")))?;
        }
        Ok(())
    })
    .await
    .map_err(Error::task("removing an image"))?
}
