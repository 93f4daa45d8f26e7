//! `/v1/images[/{name}]` and `/v1/operations/{id}`: import (a long-running operation to
//! poll), list, read and delete images. Imports run in `crate::images`.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use moat_image::ImageStore;
use utoipa::OpenApi;

use crate::api::{
    self, check_name, image_of, ErrorBody, Image, ImageList, ImportImage, Operation, OperationState,
};
use crate::error::{Error, Result};
use crate::http::access::require_image_admin;
use crate::http::extract::{path_param, ApiJson};
use crate::http::state::AppState;
use crate::images;
use crate::store::Principal;

pub(in crate::http) fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/images", get(list_images).post(import_image))
        .route("/v1/images/{name}", get(get_image).delete(delete_image))
        .route("/v1/operations/{id}", get(get_operation))
}

#[derive(OpenApi)]
#[openapi(
    paths(import_image, get_operation, list_images, get_image, delete_image),
    components(schemas(
        ImportImage,
        Image,
        ImageList,
        Operation,
        api::OperationState,
        api::OperationProgress
    ))
)]
pub(in crate::http) struct Doc;

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
        (status = 400, body = ErrorBody), (status = 422, description = "The source does not parse, an oci: or docker-archive: source without a name or with a relative path, or a name with `..`, `//` or a leading `sha256:`",
            body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "Not an admin key", body = ErrorBody),
        (status = 409, description = "An import of this name is already running",
            body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn import_image(
    State(state): State<AppState>,
    p: Principal,
    ApiJson(req): ApiJson<ImportImage>,
) -> Result<(StatusCode, Json<Operation>)> {
    require_image_admin(&p, "import images")?;
    let (source, name) = req.validate()?;
    let images = image_store(&state)?;
    let op = state
        .operations
        .start_import(&state.store, images, &req, source, name)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(op)))
}

#[utoipa::path(get, path = "/v1/operations/{id}", tag = "images",
    security(("bearer" = [])),
    params(("id" = String, Path, description = "Operation id")),
    responses(
        (status = 200, body = Operation),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
async fn get_operation(
    State(state): State<AppState>,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Operation>> {
    let id = path_param(id)?;
    require_image_admin(&p, "see image operations")?;
    let missing = || Error::NotFound(format!("no operation {}", api::quote(&id)));
    if id.len() > 64 {
        return Err(missing());
    }
    let mut op = state.store.get_operation(&id).await?.ok_or_else(missing)?;
    if op.state == OperationState::Running {
        if let Some(progress) = state.operations.progress(&id) {
            op.progress = progress;
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
async fn list_images(State(state): State<AppState>, _p: Principal) -> Result<Json<ImageList>> {
    let images = image_store(&state)?;
    let list = tokio::task::spawn_blocking(move || images.list())
        .await
        .map_err(Error::task("listing images"))?
        .map_err(Error::image("listing images"))?;
    Ok(Json(ImageList {
        images: list
            .iter()
            .filter_map(|i| i.name.as_deref().map(|n| image_of(i, n)))
            .collect(),
    }))
}

/// The `{name}` of an image route. A name no image can have is not found (404, with the
/// rules), whatever the daemon's state: checked before the image store is asked.
fn path_image_name(name: std::result::Result<Path<String>, PathRejection>) -> Result<String> {
    let name = path_param(name)?;
    match check_name(&name) {
        Ok(()) => Ok(name),
        Err(e) => Err(Error::NotFound(format!(
            "no image named {}: {e}",
            api::quote(&name)
        ))),
    }
}

#[utoipa::path(get, path = "/v1/images/{name}", tag = "images",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Image name ('/' percent-encoded as %2F)")),
    responses(
        (status = 200, body = Image),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn get_image(
    State(state): State<AppState>,
    _p: Principal,
    name: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Image>> {
    let name = path_image_name(name)?;
    let img = images::named(&image_store(&state)?, &name).await?;
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
async fn delete_image(
    State(state): State<AppState>,
    p: Principal,
    name: std::result::Result<Path<String>, PathRejection>,
) -> Result<StatusCode> {
    let name = path_image_name(name)?;
    require_image_admin(&p, "delete images")?;
    if let Some(op) = state.operations.importing(&name) {
        return Err(Error::Conflict(format!(
            "image {} is being imported (operation {op}); wait for it to end",
            api::quote(&name)
        )));
    }
    let mgr = state.manager()?;
    let images = mgr.images().clone();
    let img = images::named(&images, &name).await?;
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
    images::remove(images, mgr.runtime_home(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
