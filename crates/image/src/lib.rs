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

/// The PATH a command gets when neither the image nor the caller sets one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ImageConfig {
    /// The environment of a command in this image: the image's `Env`, then each layer of
    /// `overrides` on top (a later layer wins per key), and a PATH if none of them has one.
    /// The one merge both `moat run` and the daemon's exec use.
    pub fn merged_env<'a>(
        &self,
        overrides: impl IntoIterator<Item = &'a [(String, String)]>,
    ) -> Vec<String> {
        let mut env: Vec<(String, String)> = self
            .env
            .iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        for layer in overrides {
            for (k, v) in layer {
                env.retain(|(ek, _)| ek != k);
                env.push((k.clone(), v.clone()));
            }
        }
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    /// The argv of `docker run`-style execution: the entrypoint followed by `cmd`, or by the
    /// image's own command when `cmd` is empty. `None` when that leaves nothing to run.
    pub fn run_argv(&self, cmd: &[String]) -> Option<Vec<String>> {
        let mut argv = self.entrypoint.clone();
        if cmd.is_empty() {
            argv.extend(self.cmd.iter().cloned());
        } else {
            argv.extend(cmd.iter().cloned());
        }
        (!argv.is_empty()).then_some(argv)
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    #[test]
    fn env_layers_and_argv() {
        let c = ImageConfig {
            env: vec!["A=1".into(), "B=2".into(), "C=x=y".into()],
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            ..Default::default()
        };
        let l1 = [("B".to_string(), "3".to_string())];
        let l2 = [("B".to_string(), "4".to_string()), ("D".into(), "5".into())];
        let env = c.merged_env([&l1[..], &l2[..]]);
        assert_eq!(env[..4], ["A=1", "C=x=y", "B=4", "D=5"]);
        assert_eq!(env[4], format!("PATH={DEFAULT_PATH}"));
        let with_path = [("PATH".to_string(), "/x".to_string())];
        assert_eq!(c.merged_env([&with_path[..]]).last().unwrap(), "PATH=/x");
        assert_eq!(c.run_argv(&[]).unwrap(), ["/entry", "default"]);
        assert_eq!(c.run_argv(&["x".into()]).unwrap(), ["/entry", "x"]);
        assert_eq!(ImageConfig::default().run_argv(&[]), None);
    }
}
