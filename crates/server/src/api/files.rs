//! Files in a sandbox: the answers of an upload and of a directory listing.

use moat_protocol::{FileKind, FileStat};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::rfc3339;

/// Longest path accepted (Linux's PATH_MAX, NUL included).
pub const MAX_PATH: usize = 4095;

/// The answer to an upload.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileWritten {
    pub path: String,
    /// The bytes received and written, as counted by the daemon.
    pub size: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One entry of a directory listing (symlinks are not followed).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    pub name: String,
    pub kind: EntryKind,
    /// Size in bytes as the guest reports it.
    pub size: u64,
    /// Permission bits in octal, e.g. "0644".
    pub mode: String,
    /// Modification time, RFC 3339 UTC.
    pub mtime: String,
    /// Where a symlink points (symlinks only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FileList {
    pub path: String,
    pub entries: Vec<FileEntry>,
}

pub(crate) fn entry(name: String, st: &FileStat) -> FileEntry {
    FileEntry {
        name,
        kind: match st.kind {
            FileKind::File => EntryKind::File,
            FileKind::Dir => EntryKind::Dir,
            FileKind::Symlink => EntryKind::Symlink,
            FileKind::Other => EntryKind::Other,
        },
        size: st.size,
        mode: format!("{:04o}", st.mode & 0o7777),
        mtime: rfc3339(st.mtime_ns.div_euclid(1_000_000_000)),
        link_target: st.link_target.clone(),
    }
}
