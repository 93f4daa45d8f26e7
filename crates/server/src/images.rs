//! Images through the API: imports run as long-running operations (`POST /v1/images` answers
//! 202 with an [`Operation`] to poll), listing, and deletion refused while something uses the
//! image.
//!
//! Images are host-wide (every group's sandboxes share the store), so only admin keys import
//! and delete them; any key may list them. An operation's row is written when it starts and
//! when it ends; its progress lives in memory meanwhile. A daemon that starts marks the rows
//! still `running` failed: their import died with the previous daemon (the image store
//! removes the half-built files on its next import).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use moat_image::{ImageStore, ImportOptions, Source};

use crate::api::{
    self, check_name, image_of, ErrorBody, ErrorDetail, Image, ImageList, ImportImage, Operation,
    OperationProgress, OperationState, Role,
};
use crate::error::{Error, Result};
use crate::http::{ApiJson, AppState};
use crate::store::{Principal, Store};

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
    fn importing(&self, name: &str) -> Option<String> {
        self.lock()
            .iter()
            .find(|(_, l)| l.name == name)
            .map(|(id, _)| id.clone())
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

fn require_admin(p: &Principal, what: &str) -> Result<()> {
    if p.role == Role::Admin {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "only an admin key may {what} (images are shared by every group); this one is {}",
            p.role.as_str()
        )))
    }
}

fn new_op_id() -> String {
    format!("op-{:016x}", rand::random::<u64>())
}

/// The image store of the daemon's runtime (503 without one).
fn image_store(state: &AppState) -> Result<ImageStore> {
    Ok(state.manager()?.images().clone())
}

#[utoipa::path(post, path = "/v1/images", tag = "images",
    security(("bearer" = [])),
    request_body = ImportImage,
    responses(
        (status = 202, description = "The import started; poll GET /v1/operations/{id}",
            body = Operation),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 409, description = "An import of this name is already running",
            body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn import_image(
    State(state): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<ImportImage>,
) -> Result<(StatusCode, Json<Operation>)> {
    require_admin(&p, "import images")?;
    let (source, name) = req.validate()?;
    let images = image_store(&state)?;
    let id = new_op_id();
    let progress = Arc::new(Mutex::new(OperationProgress {
        phase: "queued".to_string(),
        ..OperationProgress::default()
    }));
    {
        // Checked and claimed under one lock: two imports of one name never both start.
        let mut live = state.operations.lock();
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
    let inserted = state.store.insert_operation(&id, &name, &request).await;
    let op = match inserted {
        Ok(Some(op)) => op,
        other => {
            state.operations.lock().remove(&id);
            return Err(other
                .err()
                .unwrap_or_else(|| Error::Internal("the operation row vanished".to_string())));
        }
    };
    let (store, ops) = (state.store.clone(), state.operations.clone());
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
    Ok((StatusCode::ACCEPTED, Json(op)))
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
        .map_err(|e| ErrorDetail {
            code: "import_failed".to_string(),
            message: e.to_string(),
        });
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

#[utoipa::path(get, path = "/v1/operations/{id}", tag = "images",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Operation id")),
    responses(
        (status = 200, body = Operation),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn get_operation(
    State(state): State<AppState>,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Operation>> {
    let id = id
        .map(|Path(s)| s)
        .map_err(|e| Error::BadRequest(format!("invalid path: {}", e.body_text())))?;
    require_admin(&p, "see image operations")?;
    let missing = || Error::NotFound(format!("no operation {}", api::quote(&id)));
    if id.len() > 64 {
        return Err(missing());
    }
    let mut op = state.store.get_operation(&id).await?.ok_or_else(missing)?;
    if op.state == OperationState::Running {
        if let Some(live) = state.operations.lock().get(&id) {
            op.progress = live
                .progress
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
        }
    }
    Ok(Json(op))
}

#[utoipa::path(get, path = "/v1/images", tag = "images",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every named image", body = ImageList),
        (status = 401, body = ErrorBody), (status = 500, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub(crate) async fn list_images(
    State(state): State<AppState>,
    _p: Principal,
) -> Result<Json<ImageList>> {
    let images = image_store(&state)?;
    let list = tokio::task::spawn_blocking(move || images.list())
        .await
        .map_err(|e| Error::Internal(format!("listing images: {e}")))?
        .map_err(|e| Error::Internal(format!("listing images: {e}")))?;
    Ok(Json(ImageList {
        images: list
            .iter()
            .filter_map(|i| i.name.as_deref().map(|n| image_of(i, n)))
            .collect(),
    }))
}

/// The image named exactly `name` (not a digest prefix).
async fn named(images: &ImageStore, name: &str) -> Result<moat_image::Image> {
    check_name(name)?;
    let (images, n) = (images.clone(), name.to_string());
    let found = tokio::task::spawn_blocking(move || images.resolve(&n))
        .await
        .map_err(|e| Error::Internal(format!("resolving an image: {e}")))?;
    match found {
        Ok(img) if img.name.as_deref() == Some(name) => Ok(img),
        Ok(_) => Err(no_image(name)),
        Err(e) if e.is_not_found() => Err(no_image(name)),
        Err(e) => Err(Error::Internal(format!("resolving image {name}: {e}"))),
    }
}

fn no_image(name: &str) -> Error {
    Error::NotFound(format!(
        "no image named {}; see GET /v1/images",
        api::quote(name)
    ))
}

fn name_param(p: std::result::Result<Path<String>, PathRejection>) -> Result<String> {
    p.map(|Path(s)| s)
        .map_err(|e| Error::BadRequest(format!("invalid path: {}", e.body_text())))
}

#[utoipa::path(get, path = "/v1/images/{name}", tag = "images",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Image name ('/' percent-encoded as %2F)")),
    responses(
        (status = 200, body = Image),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn get_image(
    State(state): State<AppState>,
    _p: Principal,
    name: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Image>> {
    let name = name_param(name)?;
    let img = named(&image_store(&state)?, &name).await?;
    Ok(Json(image_of(&img, &name)))
}

#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Image name ('/' percent-encoded as %2F)")),
    responses(
        (status = 204, description = "The name is removed, and the image's disk and templates \
            with it when no other name refers to them"),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, description = "A sandbox, a snapshot or a group's default uses the image, \
            or it is being imported", body = ErrorBody),
        (status = 500, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn delete_image(
    State(state): State<AppState>,
    p: Principal,
    name: std::result::Result<Path<String>, PathRejection>,
) -> Result<StatusCode> {
    let name = name_param(name)?;
    check_name(&name)?;
    require_admin(&p, "delete images")?;
    if let Some(op) = state.operations.importing(&name) {
        return Err(Error::Conflict(format!(
            "image {} is being imported (operation {op}); wait for it to end",
            api::quote(&name)
        )));
    }
    let mgr = state.manager()?;
    let images = mgr.images().clone();
    let img = named(&images, &name).await?;
    let users = state.store.image_users(&name, &img.digest).await?;
    match (users.sandboxes, users.groups, users.snapshots) {
        (s, _, _) if !s.is_empty() => {
            return Err(Error::Conflict(format!(
                "image {} is used by {} sandbox(es) ({}); delete them first",
                api::quote(&name),
                s.len(),
                s.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            )))
        }
        (_, g, _) if !g.is_empty() => {
            return Err(Error::Conflict(format!(
                "image {} is the default image of group(s) {}; change their image first",
                api::quote(&name),
                g.join(", ")
            )))
        }
        (_, _, snaps) if !snaps.is_empty() => {
            return Err(Error::Conflict(format!(
                "image {} is under snapshot(s) {}; delete them first",
                api::quote(&name),
                snaps.join(", ")
            )))
        }
        _ => {}
    }
    let home = mgr.runtime_home();
    let n = name.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        // The store knows the daemon's sandboxes and snapshots; the disks also know those of
        // `moat run` and the suspended and forked ones.
        let used = moat_vm::template::DisksInUse::scan(&home)
            .map_err(|e| Error::Internal(format!("reading which disks are in use: {e}")))?;
        let removed = images
            .remove_unless(&n, |img| Ok(used.why_kept(&img.rootfs)))
            .map_err(|e| {
                if e.is_in_use() {
                    Error::Conflict(e.to_string())
                } else {
                    Error::Internal(format!("removing image {n}: {e}"))
                }
            })?;
        // Templates of a digest that is no longer cached can never be used again.
        if images.resolve(&removed.digest).is_err() {
            moat_vm::template::remove_for_image(&home, &removed.digest)
                .map_err(|e| Error::Internal(format!("removing the templates of {n}: {e}")))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| Error::Internal(format!("removing an image: {e}")))??;
    Ok(StatusCode::NO_CONTENT)
}
