//! Small helpers shared by the modules: atomic file writes and running host tools.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use crate::error::IoContext;
use crate::{Error, Result};

/// Writes `bytes` to `path` atomically: temp file in the same directory, fsync, rename, fsync
/// of the directory. A crash leaves either the old file or the new one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::InvalidArgument(format!("{} has no parent", path.display())))?;
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .ctx(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).ctx(|| format!("renaming into {}", path.display()))?;
        fsync_dir(dir)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// fsyncs a directory so a rename inside it is durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing directory {}", dir.display()))
}

/// Runs a host command to completion and returns its stdout; a missing binary becomes
/// [`Error::ToolMissing`] with the Debian package that provides it.
pub(crate) fn run(cmd: &mut Command, tool: &'static str, package: &'static str) -> Result<String> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::ToolMissing { tool, package }
        } else {
            Error::io(format!("running {shown}"), e)
        }
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `max_bytes` of a file, lossily decoded; empty if it cannot be read. Reads only
/// the tail, however large the file has grown.
pub(crate) fn file_tail(path: &Path, max_bytes: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(max_bytes as u64);
    let mut bytes = Vec::with_capacity(max_bytes.min(len as usize));
    if f.seek(SeekFrom::Start(start)).is_err()
        || f.take(max_bytes as u64).read_to_end(&mut bytes).is_err()
    {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}
