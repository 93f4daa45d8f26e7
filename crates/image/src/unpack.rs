//! Applies layer tarballs to a directory with OCI whiteout semantics.
//!
//! Layer paths are hostile. Every entry path is normalised lexically (`..` is clamped at the
//! root, leading `/` dropped), and its parent directories are resolved one component at a time
//! with `lstat`: a symlink found on the way is followed *inside* the root, as a chroot would
//! (absolute targets restart at the root, `..` never climbs above it). The final component is
//! never followed: whatever is there is removed and the new entry is created with `O_EXCL |
//! O_NOFOLLOW`. Only this process writes into the directory while it is unpacked, so a resolved
//! path made of real directories stays valid while it is used.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{self, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use tar::EntryType;

use crate::error::{Error, Result};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";
const MAX_SYMLINKS: usize = 40;

/// Unpacks layers, in order, into `root`.
pub struct Unpacker {
    root: PathBuf,
    is_root: bool,
    /// Directory mtimes, applied at the end because creating children changes them.
    dir_times: HashMap<PathBuf, (i64, i64)>,
    /// Paths (relative, resolved) written by the layer being applied: whiteouts and opaque
    /// markers only hide what lower layers wrote.
    layer_paths: HashSet<PathBuf>,
    layer_ancestors: HashSet<PathBuf>,
}

/// Lexically normalises an archive path to components below the root.
pub fn normalize(p: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(x) => out.push(x.to_os_string()),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

fn rel_path(comps: &[OsString]) -> PathBuf {
    comps.iter().collect()
}

fn corrupt(label: &str, detail: impl std::fmt::Display) -> Error {
    Error::CorruptLayer {
        digest: label.to_string(),
        detail: detail.to_string(),
    }
}

impl Unpacker {
    pub fn new(root: &Path) -> Unpacker {
        Unpacker {
            root: root.to_path_buf(),
            is_root: nix::unistd::geteuid().is_root(),
            dir_times: HashMap::new(),
            layer_paths: HashSet::new(),
            layer_ancestors: HashSet::new(),
        }
    }

    /// Applies one uncompressed layer tar stream. `label` names the layer in errors. The reader
    /// is drained to its end so a hashing reader under it sees every byte.
    pub fn apply_layer<R: Read>(&mut self, reader: R, label: &str) -> Result<()> {
        self.layer_paths.clear();
        self.layer_ancestors.clear();
        let mut archive = tar::Archive::new(reader);
        let entries = archive.entries().map_err(|e| corrupt(label, e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| corrupt(label, format!("bad tar entry: {e}")))?;
            self.apply_entry(&mut entry, label)?;
        }
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| corrupt(label, e))?;
        Ok(())
    }

    /// Sets directory mtimes recorded while unpacking (deepest first).
    pub fn finish(self) -> Result<()> {
        let mut dirs: Vec<_> = self.dir_times.into_iter().collect();
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (rel, (s, ns)) in dirs {
            let host = self.root.join(&rel);
            if fs::symlink_metadata(&host)
                .map(|m| m.is_dir())
                .unwrap_or(false)
            {
                set_mtime(&host, s, ns).map_err(|e| Error::io("setting mtime", &host, e))?;
            }
        }
        Ok(())
    }

    fn mark(&mut self, rel: &Path) {
        let mut a = rel.parent();
        while let Some(p) = a {
            if p.as_os_str().is_empty() || !self.layer_ancestors.insert(p.to_path_buf()) {
                break;
            }
            a = p.parent();
        }
        self.layer_paths.insert(rel.to_path_buf());
    }

    /// Resolves `comps` as a directory path inside the root, following symlinks within the root.
    /// Missing directories are created (mode 0755) when `create`; otherwise None is returned.
    fn resolve_dir(&self, comps: &[OsString], create: bool) -> io::Result<Option<Vec<OsString>>> {
        let mut resolved: Vec<OsString> = Vec::new();
        let mut queue: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut links = 0;
        while let Some(c) = queue.pop_front() {
            if c == ".." {
                resolved.pop();
                continue;
            }
            if c == "." || c.is_empty() {
                continue;
            }
            let host = self.root.join(rel_path(&resolved)).join(&c);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(io::Error::from_raw_os_error(libc::ELOOP));
                    }
                    let target = fs::read_link(&host)?;
                    if target.is_absolute() {
                        resolved.clear();
                    }
                    let mut parts: Vec<OsString> = Vec::new();
                    for tc in target.components() {
                        match tc {
                            Component::Normal(x) => parts.push(x.to_os_string()),
                            Component::ParentDir => parts.push("..".into()),
                            _ => {}
                        }
                    }
                    for p in parts.into_iter().rev() {
                        queue.push_front(p);
                    }
                }
                Ok(m) if m.is_dir() => resolved.push(c),
                Ok(_) => {
                    return Err(io::Error::other(format!(
                        "{} is not a directory",
                        rel_path(&resolved).join(&c).display()
                    )))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    fs::create_dir(&host)?;
                    fs::set_permissions(&host, fs::Permissions::from_mode(0o755))?;
                    resolved.push(c);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some(resolved))
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, label: &str) -> Result<()> {
        let raw = entry.path_bytes().into_owned();
        let comps = normalize(Path::new(OsStr::from_bytes(&raw)));
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let Some((name, parent)) = comps.split_last() else {
            return Ok(()); // the root directory itself: mkfs sets its owner; keep its mode
        };
        let name_b = name.as_bytes();
        let fail = |e: io::Error| -> Error {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                Error::NoSpace {
                    path: self.root.clone(),
                }
            } else {
                corrupt(
                    label,
                    format!("cannot apply {:?}: {e}", String::from_utf8_lossy(&raw)),
                )
            }
        };

        if name_b.starts_with(WHITEOUT.as_bytes()) {
            let Some(parent_res) = self.resolve_dir(parent, false).map_err(fail)? else {
                return Ok(());
            };
            let dir_rel = rel_path(&parent_res);
            if name_b == OPAQUE.as_bytes() {
                self.prune(&dir_rel).map_err(fail)?;
            } else if !name_b.starts_with(b".wh..wh.") {
                let target = OsStr::from_bytes(&name_b[WHITEOUT.len()..]);
                if !target.is_empty() && target != "." && target != ".." {
                    let rel = dir_rel.join(target);
                    if !self.layer_paths.contains(&rel) {
                        remove_any(&self.root.join(&rel)).map_err(fail)?;
                    }
                }
            }
            return Ok(());
        }

        let parent_res = self
            .resolve_dir(parent, true)
            .map_err(fail)?
            .unwrap_or_default();
        let rel = rel_path(&parent_res).join(name);
        let host = self.root.join(&rel);
        let h = entry.header();
        let mode = h.mode().map_err(|e| corrupt(label, e))? & 0o7777;
        let uid = h.uid().map_err(|e| corrupt(label, e))? as u32;
        let gid = h.gid().map_err(|e| corrupt(label, e))? as u32;
        let mtime = h.mtime().unwrap_or(0) as i64;

        match kind {
            EntryType::Directory => {
                let is_dir = fs::symlink_metadata(&host)
                    .map(|m| m.is_dir())
                    .unwrap_or(false);
                if !is_dir {
                    remove_any(&host).map_err(fail)?;
                    fs::create_dir(&host).map_err(fail)?;
                }
                self.dir_times.insert(rel.clone(), (mtime, 0));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                remove_any(&host).map_err(fail)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&host)
                    .map_err(fail)?;
                let mut buf = vec![0u8; 128 * 1024];
                loop {
                    let n = entry.read(&mut buf).map_err(|e| {
                        corrupt(
                            label,
                            format!("reading {:?}: {e}", String::from_utf8_lossy(&raw)),
                        )
                    })?;
                    if n == 0 {
                        break;
                    }
                    f.write_all(&buf[..n])
                        .map_err(|e| Error::io("writing", &host, e))?;
                }
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| corrupt(label, "symlink without a target"))?
                    .into_owned();
                remove_any(&host).map_err(fail)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &host).map_err(fail)?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| corrupt(label, "hardlink without a target"))?
                    .into_owned();
                let tcomps = normalize(Path::new(OsStr::from_bytes(&target)));
                let (tname, tparent) = tcomps
                    .split_last()
                    .ok_or_else(|| corrupt(label, "hardlink to the root directory"))?;
                let src = self
                    .resolve_dir(tparent, false)
                    .map_err(fail)?
                    .map(|p| self.root.join(rel_path(&p)).join(tname))
                    .filter(|p| {
                        fs::symlink_metadata(p)
                            .map(|m| !m.is_dir())
                            .unwrap_or(false)
                    })
                    .ok_or_else(|| {
                        corrupt(
                            label,
                            format!(
                                "hardlink target {:?} does not exist",
                                String::from_utf8_lossy(&target)
                            ),
                        )
                    })?;
                if src != host {
                    remove_any(&host).map_err(fail)?;
                    fs::hard_link(&src, &host).map_err(fail)?;
                }
                self.mark(&rel);
                return Ok(()); // a hardlink shares the target's metadata
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                remove_any(&host).map_err(fail)?;
                let (sflag, dev) = match kind {
                    EntryType::Fifo => (SFlag::S_IFIFO, 0),
                    _ => {
                        let major = h.device_major().ok().flatten().unwrap_or(0);
                        let minor = h.device_minor().ok().flatten().unwrap_or(0);
                        let t = if kind == EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (t, stat::makedev(major.into(), minor.into()))
                    }
                };
                if sflag != SFlag::S_IFIFO && !self.is_root {
                    tracing::warn!(path = %rel.display(), "skipping device node: not running as root");
                    return Ok(());
                }
                stat::mknod(&host, sflag, Mode::from_bits_truncate(0o600), dev)
                    .map_err(|e| fail(e.into()))?;
            }
            other => {
                tracing::warn!(path = %rel.display(), kind = ?other, "skipping unsupported tar entry type");
                return Ok(());
            }
        }

        // Extended attributes (PAX SCHILY.xattr.*), set on the entry itself, not a link target.
        if let Ok(Some(exts)) = entry.pax_extensions() {
            for ext in exts.flatten() {
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    if let Err(e) = xattr::set(&host, OsStr::from_bytes(name), ext.value_bytes()) {
                        tracing::debug!(path = %rel.display(), error = %e, "cannot set xattr");
                    }
                }
            }
        }

        // Owner first: chown clears setuid/setgid bits, so the mode goes after it.
        if self.is_root {
            nix::unistd::fchownat(
                None,
                &host,
                Some(Uid::from_raw(uid)),
                Some(Gid::from_raw(gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| fail(e.into()))?;
        }
        if kind != EntryType::Symlink {
            fs::set_permissions(&host, fs::Permissions::from_mode(mode)).map_err(fail)?;
        }
        if kind != EntryType::Directory {
            set_mtime(&host, mtime, 0).map_err(fail)?;
        }
        self.mark(&rel);
        Ok(())
    }

    /// Opaque directory: drop everything under `dir_rel` that this layer did not write.
    fn prune(&self, dir_rel: &Path) -> io::Result<()> {
        let host = self.root.join(dir_rel);
        for child in fs::read_dir(&host)? {
            let child = child?;
            let rel = dir_rel.join(child.file_name());
            let is_dir = child.file_type()?.is_dir();
            if self.layer_paths.contains(&rel) || self.layer_ancestors.contains(&rel) {
                if is_dir {
                    self.prune(&rel)?;
                }
            } else {
                remove_any(&child.path())?;
            }
        }
        Ok(())
    }
}

/// Removes whatever is at `path` without following a symlink there.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn set_mtime(path: &Path, secs: i64, nsecs: i64) -> io::Result<()> {
    let t = TimeSpec::new(secs, nsecs);
    stat::utimensat(None, path, &t, &t, UtimensatFlags::NoFollowSymlink).map_err(io::Error::from)
}
