//! Crash-safe file writes: temp file in the same directory, fsync, rename, fsync the directory.

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use crate::error::{ioe, Result};

/// Atomically replaces `path` with `data`.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(ioe("creating a temporary file in", dir))?;
    tmp.write_all(data).map_err(ioe("writing", tmp.path()))?;
    tmp.as_file().sync_all().map_err(ioe("syncing", path))?;
    tmp.persist(path)
        .map_err(|e| crate::Error::io("renaming into place", path, e.error))?;
    sync_dir(dir)
}

/// fsyncs a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(ioe("syncing directory", dir))
}

/// Creates a directory (and parents) if missing.
pub fn mkdirs(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(ioe("creating directory", dir))
}

/// Removes a file or directory tree; missing is fine.
pub fn remove_all(path: &Path) -> Result<()> {
    let r = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(crate::Error::io("removing", path, e))
        }
        _ => Ok(()),
    }
}
