//! OCI images for moat: pull from a registry or import an OCI layout / `docker save` archive,
//! verify every digest, unpack layers with whiteouts (treating tar paths as hostile), and build
//! a read-only ext4 root disk once per manifest digest, cached in an [`ImageStore`].

mod archive;
mod auth;
mod base;
pub mod digest;
mod disk;
mod error;
mod fsutil;
pub mod layout;
mod reference;
mod registry;
pub mod spec;
mod store;
pub mod unpack;

use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

pub use base::build_base_image;
pub use error::{Error, Result};
pub use reference::{Reference, Source};
pub use registry::push_layout;
pub use spec::Compression;
pub use store::{validate_name, ImageStore};

/// Options for talking to registries.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Use `http://` instead of `https://` (test registries on loopback).
    pub plain_http: bool,
    /// Docker config file with `auths`; default `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
}

/// Receives progress of an import (the CLI draws bars from it).
pub trait Progress: Send + Sync {
    /// A new phase starts; `total_bytes` when its size is known.
    fn phase(&self, name: &str, total_bytes: Option<u64>);
    /// `bytes` more of the current phase are done.
    fn advance(&self, bytes: u64);
}

/// Discards progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
}

/// A cached image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// The local name it was resolved by (or its first name); None if it has no name.
    pub name: Option<String>,
    /// Manifest digest, `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes of the root disk file (a sparse raw ext4 image).
    pub size: u64,
    /// When it was imported.
    pub created: SystemTime,
    pub config: ImageConfig,
    /// The read-only ext4 base disk.
    pub rootfs: PathBuf,
}

/// What the guest needs from the image config to run its default command.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}
