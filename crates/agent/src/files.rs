//! File requests: read, write, stat, list, mkdir, remove. Blocking filesystem work runs on
//! tokio's blocking pool; big files stream through a bounded channel so memory stays flat.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use moat_protocol::frame::MAX_DATA_CHUNK;
use moat_protocol::{channel, DirEntry, ErrorKind, Event, FileKind, FileStat, Message, Stream};
use tokio::sync::mpsc;

/// Most entries in one `Entries` message.
const ENTRIES_PER_MSG: usize = 256;

/// A failed request, as sent to the host.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure(pub ErrorKind, pub String);

impl Failure {
    fn io(path: &Path, e: &io::Error) -> Failure {
        Failure(error_kind(e), format!("{}: {e}", path.display()))
    }

    pub fn message(self) -> Message {
        Message::Error {
            kind: self.0,
            message: self.1,
        }
    }
}

/// The protocol's error kind for an I/O error.
pub fn error_kind(e: &io::Error) -> ErrorKind {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorKind::NotFound,
        Some(libc::EACCES | libc::EPERM) => ErrorKind::PermissionDenied,
        Some(libc::EISDIR) => ErrorKind::IsADirectory,
        Some(libc::ENOTDIR) => ErrorKind::NotADirectory,
        Some(libc::EEXIST) => ErrorKind::AlreadyExists,
        Some(libc::ENOTEMPTY) => ErrorKind::DirectoryNotEmpty,
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorKind::NoSpace,
        Some(libc::EINVAL | libc::ENAMETOOLONG) => ErrorKind::InvalidInput,
        _ => ErrorKind::Other,
    }
}

/// Paths from the host must be absolute and must not contain NUL.
pub fn validate(path: &str) -> Result<PathBuf, Failure> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(Failure(
            ErrorKind::InvalidInput,
            format!("{path:?}: not an absolute path"),
        ));
    }
    Ok(PathBuf::from(path))
}

/// Runs blocking filesystem work off the runtime thread.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Failure(ErrorKind::Other, format!("request failed: {e}"))))
}

fn file_stat(path: &Path, m: &fs::Metadata) -> FileStat {
    let ft = m.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    FileStat {
        kind,
        size: m.size(),
        mode: m.mode() & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        link_target: ft
            .is_symlink()
            .then(|| fs::read_link(path).ok())
            .flatten()
            .map(|t| t.to_string_lossy().into_owned()),
    }
}

pub fn stat(path: &Path) -> Result<FileStat, Failure> {
    fs::symlink_metadata(path)
        .map(|m| file_stat(path, &m))
        .map_err(|e| Failure::io(path, &e))
}

pub fn mkdir(path: &Path, parents: bool, mode: Option<u32>) -> Result<(), Failure> {
    let err = |e: io::Error| Failure::io(path, &e);
    let mut builder = fs::DirBuilder::new();
    builder.recursive(parents).mode(mode.unwrap_or(0o755));
    builder.create(path).map_err(err)?;
    // The umask narrowed the mode the host asked for.
    if let Some(mode) = mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)?;
    }
    Ok(())
}

/// Removes a file, a symlink (never its target) or a directory; a recursive removal never
/// follows symlinks (std's `remove_dir_all` works on directory fds with `O_NOFOLLOW`).
pub fn remove(path: &Path, recursive: bool) -> Result<(), Failure> {
    let err = |e: io::Error| Failure::io(path, &e);
    let meta = fs::symlink_metadata(path).map_err(err)?;
    if !meta.is_dir() {
        fs::remove_file(path)
    } else if recursive {
        fs::remove_dir_all(path)
    } else {
        fs::remove_dir(path)
    }
    .map_err(err)
}

/// `Entries` messages of at most [`ENTRIES_PER_MSG`], listed in a blocking thread and handed
/// over one message at a time.
pub async fn list(path: PathBuf, stream: &Stream) -> Result<(), Failure> {
    let (tx, mut rx) = mpsc::channel::<Result<Vec<DirEntry>, Failure>>(2);
    tokio::task::spawn_blocking(move || {
        let dir = match fs::read_dir(&path) {
            Ok(d) => d,
            Err(e) => return tx.blocking_send(Err(Failure::io(&path, &e))).unwrap_or(()),
        };
        let mut batch = Vec::new();
        for entry in dir {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => return tx.blocking_send(Err(Failure::io(&path, &e))).unwrap_or(()),
            };
            let p = entry.path();
            // An entry removed while listing is skipped.
            let Ok(meta) = fs::symlink_metadata(&p) else {
                continue;
            };
            batch.push(DirEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                stat: file_stat(&p, &meta),
            });
            if batch.len() == ENTRIES_PER_MSG
                && tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err()
            {
                return;
            }
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send(Ok(batch));
        }
    });
    let sender = stream.sender();
    while let Some(batch) = rx.recv().await {
        let msg = Message::Entries { entries: batch? };
        sender.msg(&msg).await.map_err(|_| closed())?;
    }
    Ok(())
}

fn closed() -> Failure {
    Failure(ErrorKind::Other, "stream closed".into())
}

/// `Stat`, then the contents as DATA on stdout, then EOF.
pub async fn read_file(path: PathBuf, stream: &Stream) -> Result<(), Failure> {
    let sender = stream.sender();
    let p = path.clone();
    let (file, st) = blocking(move || {
        let file = File::open(&p).map_err(|e| Failure::io(&p, &e))?;
        let meta = file.metadata().map_err(|e| Failure::io(&p, &e))?;
        if meta.is_dir() {
            return Err(Failure::io(&p, &io::Error::from_raw_os_error(libc::EISDIR)));
        }
        Ok((file, file_stat(&p, &meta)))
    })
    .await?;
    sender.msg(&Message::Stat(st)).await.map_err(|_| closed())?;
    // A few chunks in flight: reading overlaps with sending, memory stays bounded.
    let (tx, mut rx) = mpsc::channel::<io::Result<Vec<u8>>>(4);
    tokio::task::spawn_blocking(move || {
        let mut file = file;
        loop {
            let mut buf = vec![0u8; MAX_DATA_CHUNK];
            let r = match file.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    Ok(buf)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = r.is_err();
            if tx.blocking_send(r).is_err() || failed {
                return;
            }
        }
    });
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk.map_err(|e| Failure::io(&path, &e))?;
        sender
            .data(channel::STDOUT, &chunk)
            .await
            .map_err(|_| closed())?;
    }
    sender.eof(channel::STDOUT).await.map_err(|_| closed())
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Makes `path` hold exactly `data` (mode 0644), readers seeing the old file or the new one:
/// a temporary file next to it, fsynced and renamed over it. A file that already holds
/// `data` is left alone, so the configuration every restore sends again (resolv.conf, the
/// trust store) costs no write and no fsync on the guest's disk.
pub fn replace_if_changed(path: &Path, data: &[u8]) -> io::Result<()> {
    match fs::read(path) {
        Ok(old) if old == data => return Ok(()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let tmp = path.with_extension("moat-tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Receives the contents on stdin until EOF into a temporary file next to `path`, then
/// fsyncs and renames it over `path`: readers see the old file or the new one, never half.
/// A blocking thread writes while the next chunks arrive.
pub async fn write_file(
    path: PathBuf,
    mode: Option<u32>,
    make_parents: bool,
    stream: &mut Stream,
) -> Result<(), Failure> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(Failure(
            ErrorKind::InvalidInput,
            format!("{}: not a file path", path.display()),
        ));
    };
    let tmp = parent.join(format!(
        ".{}.moat-{}",
        name.to_string_lossy(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let (parent, target, t) = (parent.to_path_buf(), path.clone(), tmp.clone());
    let file = blocking(move || create_temp(&parent, &target, &t, mode, make_parents)).await?;

    // `Some(chunk)` to write, `None` to commit; a closed channel without `None` aborts.
    let (tx, mut rx) = mpsc::channel::<Option<Vec<u8>>>(4);
    let target = path.clone();
    let writer = tokio::task::spawn_blocking(move || {
        let result = commit_from(file, &mut rx, &tmp, &target);
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    });
    let received = loop {
        match stream.recv().await {
            Some(Event::Data {
                channel: channel::STDIN,
                data,
            }) => {
                // The writer failed: its error is the answer.
                if tx.send(Some(data)).await.is_err() {
                    break Ok(());
                }
            }
            Some(Event::Eof {
                channel: channel::STDIN,
            }) => {
                let _ = tx.send(None).await;
                break Ok(());
            }
            Some(Event::Reset(reason)) => break Err(Failure(ErrorKind::Other, reason)),
            None => break Err(closed()),
            Some(_) => {}
        }
    };
    drop(tx);
    let written = writer
        .await
        .unwrap_or_else(|e| Err(Failure(ErrorKind::Other, e.to_string())));
    received.and(written)
}

/// Opens the temporary file, with the mode and owner of the file it replaces unless told
/// otherwise.
fn create_temp(
    parent: &Path,
    target: &Path,
    tmp: &Path,
    mode: Option<u32>,
    make_parents: bool,
) -> Result<File, Failure> {
    if make_parents {
        fs::create_dir_all(parent).map_err(|e| Failure::io(parent, &e))?;
    }
    let old = fs::metadata(target).ok();
    if old.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(Failure::io(
            target,
            &io::Error::from_raw_os_error(libc::EISDIR),
        ));
    }
    let mode = mode
        .or(old.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(0o644);
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| Failure::io(target, &e))?;
    let setup = || -> io::Result<()> {
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some(m) = &old {
            std::os::unix::fs::fchown(&file, Some(m.uid()), Some(m.gid()))?;
        }
        Ok(())
    };
    setup().map_err(|e| {
        let _ = fs::remove_file(tmp);
        Failure::io(target, &e)
    })?;
    Ok(file)
}

/// Writes the chunks into `file`; on the commit marker fsyncs it and renames it into place.
fn commit_from(
    mut file: File,
    chunks: &mut mpsc::Receiver<Option<Vec<u8>>>,
    tmp: &Path,
    target: &Path,
) -> Result<(), Failure> {
    let err = |e: io::Error| Failure::io(target, &e);
    loop {
        match chunks.blocking_recv() {
            Some(Some(chunk)) => file.write_all(&chunk).map_err(err)?,
            Some(None) => break,
            None => return Err(closed()),
        }
    }
    file.sync_all().map_err(err)?;
    fs::rename(tmp, target).map_err(err)?;
    // Make the rename itself durable.
    if let Some(dir) = target.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that already holds the data is not rewritten (same inode: no new file, no
    /// fsync); different data replaces it with a new file holding exactly that data.
    #[test]
    fn replace_if_changed_skips_identical_content() {
        let dir = std::env::temp_dir().join(format!("moat-replace-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        replace_if_changed(&path, b"nameserver 1.1.1.1\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"nameserver 1.1.1.1\n");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
        let inode = fs::metadata(&path).unwrap().ino();
        replace_if_changed(&path, b"nameserver 1.1.1.1\n").unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().ino(),
            inode,
            "rewritten though unchanged"
        );
        replace_if_changed(&path, b"nameserver 2.2.2.2\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"nameserver 2.2.2.2\n");
        assert_ne!(
            fs::metadata(&path).unwrap().ino(),
            inode,
            "changed data not replaced"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errno_mapping() {
        let k = |errno| error_kind(&io::Error::from_raw_os_error(errno));
        assert_eq!(k(libc::ENOENT), ErrorKind::NotFound);
        assert_eq!(k(libc::EACCES), ErrorKind::PermissionDenied);
        assert_eq!(k(libc::EPERM), ErrorKind::PermissionDenied);
        assert_eq!(k(libc::EISDIR), ErrorKind::IsADirectory);
        assert_eq!(k(libc::ENOTDIR), ErrorKind::NotADirectory);
        assert_eq!(k(libc::EEXIST), ErrorKind::AlreadyExists);
        assert_eq!(k(libc::ENOTEMPTY), ErrorKind::DirectoryNotEmpty);
        assert_eq!(k(libc::ENOSPC), ErrorKind::NoSpace);
        assert_eq!(k(libc::EIO), ErrorKind::Other);
        assert_eq!(error_kind(&io::Error::other("x")), ErrorKind::Other);
    }

    #[test]
    fn path_validation() {
        assert_eq!(
            validate("/etc/passwd").unwrap(),
            PathBuf::from("/etc/passwd")
        );
        assert_eq!(validate("/").unwrap(), PathBuf::from("/"));
        for bad in ["", "etc", "./x", "/a\0b"] {
            assert_eq!(
                validate(bad).unwrap_err().0,
                ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn mkdir_stat_remove_roundtrip() {
        let base = std::env::temp_dir().join(format!("moat-agent-test-{}", std::process::id()));
        let deep = base.join("a/b");
        assert_eq!(
            mkdir(&deep, false, None).unwrap_err().0,
            ErrorKind::NotFound
        );
        mkdir(&deep, true, Some(0o700)).unwrap();
        let st = stat(&deep).unwrap();
        assert_eq!((st.kind, st.mode), (FileKind::Dir, 0o700));
        assert_eq!(
            mkdir(&deep, false, None).unwrap_err().0,
            ErrorKind::AlreadyExists
        );
        mkdir(&deep, true, None).unwrap();
        // A symlink to outside the tree: removed, never followed.
        let outside = base.with_extension("outside");
        fs::write(&outside, b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, deep.join("link")).unwrap();
        assert_eq!(stat(&deep.join("link")).unwrap().kind, FileKind::Symlink);
        assert_eq!(
            remove(&base, false).unwrap_err().0,
            ErrorKind::DirectoryNotEmpty
        );
        remove(&base, true).unwrap();
        assert_eq!(stat(&base).unwrap_err().0, ErrorKind::NotFound);
        assert_eq!(fs::read(&outside).unwrap(), b"keep");
        remove(&outside, false).unwrap();
    }
}
