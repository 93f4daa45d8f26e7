//! The error type of moat-image. Every message says what was wrong and, where it helps, what is
//! allowed, because these errors are shown to users by the CLI as-is.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong while importing, caching or resolving an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid image reference {input:?}: {reason}")]
    InvalidReference { input: String, reason: String },

    #[error("invalid image name {name:?}: {reason} (allowed: 1-128 characters of a-z 0-9 . _ - / :, starting and ending with a letter or digit, no \"..\" or \"//\")")]
    InvalidName { name: String, reason: String },

    #[error("not found: {what}")]
    NotFound { what: String },

    #[error("image {image} is in use: {why}")]
    InUse { image: String, why: String },

    #[error("{prefix:?} is ambiguous: it matches {candidates:?}; use more digest characters")]
    Ambiguous {
        prefix: String,
        candidates: Vec<String>,
    },

    #[error("registry {host} is unreachable: {detail}")]
    Unreachable { host: String, detail: String },

    #[error("registry {host} refused access to {what}: {detail} (check the credentials in the Docker config file)")]
    Unauthorized {
        host: String,
        what: String,
        detail: String,
    },

    #[error("registry {host} answered {status} for {what}: {detail}")]
    Registry {
        host: String,
        what: String,
        status: u16,
        detail: String,
    },

    #[error("unsupported platform: the image has no linux/amd64 variant (available: {})", if available.is_empty() { "none".to_string() } else { available.join(", ") })]
    UnsupportedPlatform { available: Vec<String> },

    #[error("unsupported media type {media_type:?} for the {kind} (allowed: {})", allowed.join(", "))]
    UnsupportedMediaType {
        kind: String,
        media_type: String,
        allowed: Vec<&'static str>,
    },

    #[error("digest mismatch for {what}: expected {expected}, got {actual}; nothing was cached")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },

    #[error("corrupt layer {digest}: {detail}; nothing was cached")]
    CorruptLayer { digest: String, detail: String },

    #[error("invalid image: {0}")]
    InvalidImage(String),

    #[error("no space left on device while writing {}: free some disk space and retry", path.display())]
    NoSpace { path: PathBuf },

    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },

    #[error("Docker config file {}: {detail}", path.display())]
    DockerConfig { path: PathBuf, detail: String },

    #[error("building the root disk failed: {0}")]
    Mkfs(String),

    #[error("command {command} failed: {detail}")]
    Command { command: String, detail: String },
}

impl Error {
    /// Wraps an I/O error with context; ENOSPC becomes the dedicated [`Error::NoSpace`] so the
    /// user sees "no space left" instead of an errno.
    pub(crate) fn io(
        context: impl Into<String>,
        path: &std::path::Path,
        source: std::io::Error,
    ) -> Error {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Error::NoSpace {
                path: path.to_path_buf(),
            };
        }
        Error::Io {
            context: format!("{}: {}", context.into(), path.display()),
            source,
        }
    }

    /// True for "nothing of that name/reference exists" errors.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. })
    }

    pub fn is_in_use(&self) -> bool {
        matches!(self, Error::InUse { .. })
    }
}

/// Shorthand: `.map_err(ioe("reading", path))`.
pub(crate) fn ioe<'a>(
    context: &'a str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(context, path, e)
}
