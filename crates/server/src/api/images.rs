//! Images and their import operations: the import request (checked here), the image as
//! listed, and the long-running operation that an import is.

use moat_image::Source;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{quote, rfc3339, ErrorDetail};
use crate::error::{Error, Result};

/// Longest `source` accepted.
pub const MAX_SOURCE: usize = 1024;

/// `POST /v1/images`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    /// As `moat image import`: a registry reference (`host[:port]/repo:tag` or `…@sha256:…`),
    /// `oci:/ABS/DIR[:tag]` (an OCI layout on the daemon's host) or
    /// `docker-archive:/ABS/FILE` (a `docker save` tarball on the daemon's host). 1–1024
    /// characters without control characters; a source that does not parse is a 422.
    #[schema(
        min_length = 1,
        max_length = 1024,
        pattern = "^[^\\x00-\\x1f\\x7f-\\x9f]+$"
    )]
    pub source: String,
    /// The local name (described in `import_name_schema`).
    #[serde(default)]
    #[schema(schema_with = import_name_schema)]
    pub name: Option<String>,
    /// Talk plain HTTP to the registry (a registry on loopback).
    #[serde(default)]
    pub plain_http: bool,
}

/// An image name as far as a pattern can say (`moat_image::validate_name` also refuses `..`,
/// `//` and a leading `sha256:`): for the document, in bodies and paths.
pub const IMAGE_NAME_PATTERN: &str = "^[A-Za-z0-9]([A-Za-z0-9._/:-]*[A-Za-z0-9])?$";

/// The longest image name.
pub const MAX_IMAGE_NAME: usize = 128;

/// `ImportImage.name`: an image name, or null. A `oneOf` rather than a type list: with a
/// type list, schemathesis sends `null` where it meant a name that is too long.
fn import_name_schema() -> utoipa::openapi::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::Null))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(IMAGE_NAME_PATTERN))
                .min_length(Some(1))
                .max_length(Some(MAX_IMAGE_NAME)),
        )
        .description(Some(
            "The local name: 1–128 of `A-Za-z0-9._-/:`, starting and ending with a letter or \
             digit, without `..`, `//` or a leading `sha256:` (those are a 422). Default for a \
             registry source: its `repo:tag`; required for the others.",
        ))
        .build()
        .into()
}

/// An image in the daemon's store.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Image {
    pub name: String,
    /// Manifest digest, `sha256:<hex>`.
    pub digest: String,
    /// Size of its root disk.
    pub size_bytes: u64,
    /// When it was imported (RFC 3339, UTC).
    pub created_at: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageList {
    pub images: Vec<Image>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OperationState {
    Running,
    Succeeded,
    Failed,
}

impl OperationState {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationState::Running => "running",
            OperationState::Succeeded => "succeeded",
            OperationState::Failed => "failed",
        }
    }
}

/// Progress of the current phase (bytes restart at 0 with each phase).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationProgress {
    /// What the import is doing: resolving, a layer download, building the disk…; "done" or
    /// "failed" at the end.
    pub phase: String,
    pub bytes_done: u64,
    /// When the phase's size is known.
    pub bytes_total: Option<u64>,
}

/// A long-running operation: poll `GET /v1/operations/{id}` until `state` is not running.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// op-<16 hex>
    pub id: String,
    /// "image-import"
    pub kind: String,
    pub state: OperationState,
    pub progress: OperationProgress,
    /// Why it failed (`code` is import_failed or interrupted).
    pub error: Option<ErrorDetail>,
    /// The image, once it succeeded.
    pub result: Option<Image>,
    pub created_at: String,
    pub updated_at: String,
}

/// The image `i` of the image store as the API shows it, under `name`.
pub(crate) fn image_of(i: &moat_image::Image, name: &str) -> Image {
    let created = i
        .created
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| rfc3339(d.as_secs() as i64));
    Image {
        name: name.to_string(),
        digest: i.digest.clone(),
        size_bytes: i.size,
        created_at: created,
    }
}

impl ImportImage {
    /// The parsed source and the name to import under. What the schema cannot say (the
    /// source's grammar, a name for a local source, the name's rules beyond its pattern) is a
    /// 422.
    pub fn validate(&self) -> Result<(Source, String)> {
        self.parse().map_err(|e| match e {
            Error::BadRequest(m) => Error::Unprocessable(m),
            e => e,
        })
    }

    fn parse(&self) -> Result<(Source, String)> {
        let s = &self.source;
        if s.is_empty() || s.chars().count() > MAX_SOURCE || s.chars().any(|c| c.is_control()) {
            return Err(bad_request(format!(
                "invalid source {}: expected 1–{MAX_SOURCE} characters without control \
                 characters: a registry reference (host[:port]/repo:tag), \
                 oci:/ABSOLUTE/DIR[:tag] or docker-archive:/ABSOLUTE/FILE",
                quote(s)
            )));
        }
        let source = Source::parse(s).map_err(|e| bad_request(format!("invalid source: {e}")))?;
        let default = match &source {
            Source::Registry(r) => r.name_with_tag(),
            Source::OciLayout(p) | Source::DockerArchive(p) => {
                if !p.is_absolute() {
                    return Err(bad_request(format!(
                        "invalid source {}: the path must be absolute (it is on the daemon's \
                         host, whose working directory is not yours)",
                        quote(s)
                    )));
                }
                None
            }
        };
        let name =
            match (&self.name, default) {
                (Some(n), _) => n.clone(),
                (None, Some(d)) => d,
                (None, None) => return Err(bad_request(
                    "give a \"name\": oci: and docker-archive: sources have no name the daemon \
                     can use"
                        .to_string(),
                )),
            };
        check_name(&name)?;
        Ok((source, name))
    }
}

fn bad_request(msg: String) -> Error {
    Error::BadRequest(msg)
}

pub(crate) fn check_name(name: &str) -> Result<()> {
    moat_image::validate_name(name).map_err(|e| {
        bad_request(format!(
            "{e}; image names are 1–128 of A-Z a-z 0-9 . _ - / :, starting and ending with a \
             letter or digit"
        ))
    })
}

impl crate::http::extract::Checked for ImportImage {
    fn check(&self) -> Result<()> {
        self.parse().map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(source: &str, name: Option<&str>) -> ImportImage {
        ImportImage {
            source: source.to_string(),
            name: name.map(str::to_string),
            plain_http: false,
        }
    }

    #[test]
    fn sources_and_names() {
        let (_, n) = req("127.0.0.1:5000/app:v1", None).validate().unwrap();
        assert_eq!(n, "127.0.0.1:5000/app:v1");
        assert!(req("oci:/x", Some("a")).validate().is_ok());
        assert!(req("oci:rel/x", Some("a")).validate().is_err());
        assert!(req("docker-archive:/x.tar", None).validate().is_err());
        assert!(req("", Some("a")).validate().is_err());
        assert!(req("UPPER CASE", Some("a")).validate().is_err());
        assert!(req("127.0.0.1:5000/app:v1", Some("-bad"))
            .validate()
            .is_err());
        assert!(req("127.0.0.1:5000/app:v1", Some("a/../b"))
            .validate()
            .is_err());
    }
}
