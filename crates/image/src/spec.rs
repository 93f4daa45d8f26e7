//! The subset of the OCI image and distribution specs (and Docker schema2) that moat reads and
//! writes. Unknown JSON fields are ignored on input; the output is what the specs require.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

/// Annotation naming a manifest inside an OCI layout's `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

pub const MANIFEST_TYPES: &[&str] = &[OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];
pub const CONFIG_TYPES: &[&str] = &[OCI_CONFIG, DOCKER_CONFIG];
pub const LAYER_TYPES: &[&str] = &[
    OCI_LAYER_TAR,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    DOCKER_LAYER_GZIP,
    DOCKER_LAYER_TAR,
];

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Maps a layer media type to its compression, or a clear "unsupported media type" error.
    pub fn from_media_type(media_type: &str) -> Result<Compression> {
        match media_type {
            OCI_LAYER_TAR | DOCKER_LAYER_TAR => Ok(Compression::None),
            OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Ok(Compression::Gzip),
            OCI_LAYER_ZSTD => Ok(Compression::Zstd),
            other => Err(Error::UnsupportedMediaType {
                kind: "layer".into(),
                media_type: other.into(),
                allowed: LAYER_TYPES.to_vec(),
            }),
        }
    }

    /// Sniffs the compression from the first bytes of a blob (used for `docker save` archives,
    /// which carry no media types).
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The OCI media type of a layer with this compression.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::None => OCI_LAYER_TAR,
            Compression::Gzip => OCI_LAYER_GZIP,
            Compression::Zstd => OCI_LAYER_ZSTD,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// The runtime part of an image config (`config` in the OCI config JSON).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RuntimeConfig {
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

/// The OCI image config blob (also Docker's container image v1 JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<RuntimeConfig>,
    pub rootfs: RootFs,
}

impl ConfigFile {
    /// The config of an image for `os`/`arch` with `config` and these uncompressed layer digests.
    pub fn new(config: &crate::ImageConfig, diff_ids: Vec<String>, os: &str, arch: &str) -> Self {
        let none_if_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
        ConfigFile {
            architecture: arch.into(),
            os: os.into(),
            created: None,
            config: Some(RuntimeConfig {
                env: none_if_empty(&config.env),
                entrypoint: none_if_empty(&config.entrypoint),
                cmd: none_if_empty(&config.cmd),
                working_dir: config.working_dir.clone(),
                user: config.user.clone(),
            }),
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids,
            },
        }
    }
}

/// Reads the media type of a manifest-ish document: the HTTP/descriptor type if given,
/// otherwise the `mediaType` field, otherwise guessed from its shape.
pub fn manifest_media_type(declared: Option<&str>, body: &[u8]) -> Result<String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        schema_version: Option<u32>,
    }
    let declared = declared
        .map(|d| d.split(';').next().unwrap_or(d).trim().to_string())
        .filter(|d| !d.is_empty() && d != "application/json" && d != "text/plain");
    let probe: Probe = serde_json::from_slice(body)
        .map_err(|e| Error::InvalidImage(format!("manifest is not valid JSON: {e}")))?;
    if let Some(t) = declared.or(probe.media_type) {
        return Ok(t);
    }
    if probe.schema_version == Some(1) {
        return Ok("application/vnd.docker.distribution.manifest.v1+json".into());
    }
    Ok(if probe.manifests.is_some() {
        OCI_INDEX
    } else {
        OCI_MANIFEST
    }
    .into())
}

pub fn is_index(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_LIST
}

pub fn is_manifest(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// Picks linux/amd64 from an index, or says which platforms exist.
pub fn pick_platform(index: &Index) -> Result<Descriptor> {
    let found = index.manifests.iter().find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    if let Some(d) = found {
        return Ok(d.clone());
    }
    let available = index
        .manifests
        .iter()
        .filter_map(|d| d.platform.as_ref())
        .map(|p| match &p.variant {
            Some(v) => format!("{}/{}/{}", p.os, p.architecture, v),
            None => format!("{}/{}", p.os, p.architecture),
        })
        .collect();
    Err(Error::UnsupportedPlatform { available })
}

/// Parses and checks a single-platform manifest document.
pub fn parse_manifest(body: &[u8]) -> Result<Manifest> {
    let m: Manifest = serde_json::from_slice(body)
        .map_err(|e| Error::InvalidImage(format!("manifest does not parse: {e}")))?;
    if m.schema_version != 2 {
        return Err(Error::InvalidImage(format!(
            "manifest schemaVersion is {}, only 2 is supported",
            m.schema_version
        )));
    }
    if !CONFIG_TYPES.contains(&m.config.media_type.as_str()) {
        return Err(Error::UnsupportedMediaType {
            kind: "image config".into(),
            media_type: m.config.media_type.clone(),
            allowed: CONFIG_TYPES.to_vec(),
        });
    }
    crate::digest::validate(&m.config.digest)?;
    for l in &m.layers {
        Compression::from_media_type(&l.media_type)?;
        crate::digest::validate(&l.digest)?;
    }
    Ok(m)
}

/// Parses an image config and checks it matches the manifest and platform.
pub fn parse_config(body: &[u8], layers: usize) -> Result<ConfigFile> {
    let c: ConfigFile = serde_json::from_slice(body)
        .map_err(|e| Error::InvalidImage(format!("image config does not parse: {e}")))?;
    if c.rootfs.diff_ids.len() != layers {
        return Err(Error::InvalidImage(format!(
            "the config lists {} diff_ids but the manifest has {} layers",
            c.rootfs.diff_ids.len(),
            layers
        )));
    }
    for d in &c.rootfs.diff_ids {
        crate::digest::validate(d)?;
    }
    let arch_ok = c.architecture.is_empty() || c.architecture == "amd64";
    let os_ok = c.os.is_empty() || c.os == "linux";
    if !arch_ok || !os_ok {
        return Err(Error::UnsupportedPlatform {
            available: vec![format!("{}/{}", c.os, c.architecture)],
        });
    }
    Ok(c)
}
