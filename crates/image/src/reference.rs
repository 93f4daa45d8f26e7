//! Image references (`host[:port]/repo[:tag]`, `…@sha256:…`) and import sources.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// The registry used for references without a host part, as Docker does.
pub const DOCKER_HUB: &str = "docker.io";

/// A parsed registry reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]` as written (or `docker.io`).
    pub registry: String,
    /// Repository path, e.g. `library/busybox`.
    pub repository: String,
    /// Tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// Manifest digest when pinned with `@sha256:…`.
    pub digest: Option<String>,
}

fn bad(input: &str, reason: impl Into<String>) -> Error {
    Error::InvalidReference {
        input: input.into(),
        reason: reason.into(),
    }
}

fn valid_repo_component(c: &str) -> bool {
    let b = c.as_bytes();
    !b.is_empty()
        && b.iter()
            .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"._-".contains(&x))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

pub(crate) fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || b"_.-".contains(&x))
}

impl Reference {
    /// Parses `host[:port]/repo[:tag]` or `host[:port]/repo@sha256:<64 hex>`. A first path
    /// component without `.` or `:` (and not `localhost`) means Docker Hub, like `docker pull`.
    pub fn parse(input: &str) -> Result<Reference> {
        let s = input.strip_prefix("docker://").unwrap_or(input);
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                crate::digest::validate(d).map_err(|_| {
                    bad(
                        input,
                        "the digest after '@' must be sha256: followed by 64 lowercase hex digits",
                    )
                })?;
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (path, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (
                &rest[..last_slash + i],
                Some(rest[last_slash + i + 1..].to_string()),
            ),
            None => (rest, None),
        };
        if let Some(t) = &tag {
            if !valid_tag(t) {
                return Err(bad(
                    input,
                    "a tag is 1-128 characters of A-Z a-z 0-9 _ . - and cannot start with . or -",
                ));
            }
        }
        let (registry, repository) = match path.split_once('/') {
            Some((first, repo))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), repo.to_string())
            }
            _ if path.contains('/') => (DOCKER_HUB.to_string(), path.to_string()),
            _ => (DOCKER_HUB.to_string(), format!("library/{path}")),
        };
        if registry.is_empty() || registry.contains(|c: char| c.is_whitespace() || c == '@') {
            return Err(bad(input, "the registry host is empty or malformed"));
        }
        if repository.is_empty() || !repository.split('/').all(valid_repo_component) {
            return Err(bad(
                input,
                "the repository must be '/'-separated components of a-z 0-9 . _ - (starting and ending with a letter or digit)",
            ));
        }
        let tag = if tag.is_none() && digest.is_none() {
            Some("latest".to_string())
        } else {
            tag
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host to connect to (`docker.io` is served by `registry-1.docker.io`).
    pub fn host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }

    /// What to ask the registry for: the digest if pinned, else the tag.
    pub fn manifest_ref(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// `registry/repo:tag` (used as the default local name); None for digest-only references.
    pub fn name_with_tag(&self) -> Option<String> {
        self.tag
            .as_ref()
            .map(|t| format!("{}/{}:{}", self.registry, self.repository, t))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A registry reference.
    Registry(Reference),
    /// An OCI image layout directory, optionally selecting a manifest by its ref name.
    OciLayout(PathBuf),
    /// A `docker save` tarball.
    DockerArchive(PathBuf),
}

/// An OCI layout source with its optional tag (kept out of [`Source`] so its shape stays what
/// the CLI matches on).
#[derive(Debug, Clone)]
pub(crate) struct OciSpec {
    pub dir: PathBuf,
    pub tag: Option<String>,
}

impl Source {
    /// Parses `oci:DIR[:tag]`, `docker-archive:FILE` or a registry reference.
    pub fn parse(s: &str) -> Result<Source> {
        if let Some(rest) = s.strip_prefix("oci:") {
            if rest.is_empty() {
                return Err(bad(
                    s,
                    "oci: needs a directory, e.g. oci:./layout or oci:./layout:tag",
                ));
            }
            return Ok(Source::OciLayout(PathBuf::from(rest)));
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            if rest.is_empty() {
                return Err(bad(
                    s,
                    "docker-archive: needs a file, e.g. docker-archive:./image.tar",
                ));
            }
            return Ok(Source::DockerArchive(PathBuf::from(rest)));
        }
        Reference::parse(s).map(Source::Registry)
    }

    /// Splits `DIR[:tag]` of an OCI layout source: a trailing `:tag` is a tag unless the whole
    /// string names an existing directory.
    pub(crate) fn oci_spec(dir: &std::path::Path) -> OciSpec {
        let s = dir.to_string_lossy();
        if !dir.is_dir() {
            if let Some((d, t)) = s.rsplit_once(':') {
                if !d.is_empty() && !t.contains('/') && !t.is_empty() {
                    return OciSpec {
                        dir: PathBuf::from(d),
                        tag: Some(t.to_string()),
                    };
                }
            }
        }
        OciSpec {
            dir: dir.to_path_buf(),
            tag: None,
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Registry(r) => write!(f, "{r}"),
            Source::OciLayout(p) => write!(f, "oci:{}", p.display()),
            Source::DockerArchive(p) => write!(f, "docker-archive:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let r = Reference::parse("127.0.0.1:5000/app/busybox:1.36").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "app/busybox");
        assert_eq!(r.tag.as_deref(), Some("1.36"));
        let r = Reference::parse("localhost/busybox").unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("ghcr.io/x/y@{d}")).unwrap();
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.tag, None);
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "library/busybox")
        );
        assert!(Reference::parse("host:5000/UPPER").is_err());
        assert!(Reference::parse("host:5000/x@sha256:123").is_err());
        assert!(Reference::parse("host:5000/x:bad tag").is_err());
    }

    #[test]
    fn parses_sources() {
        assert_eq!(
            Source::parse("oci:/tmp/x").unwrap(),
            Source::OciLayout("/tmp/x".into())
        );
        assert_eq!(
            Source::parse("docker-archive:a.tar").unwrap(),
            Source::DockerArchive("a.tar".into())
        );
        let spec = Source::oci_spec(std::path::Path::new("/nonexistent/dir:v1"));
        assert_eq!(spec.tag.as_deref(), Some("v1"));
        assert!(Source::parse("oci:").is_err());
    }
}
