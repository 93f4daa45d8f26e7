//! Template RAM shared copy-on-write: one copy of a template's guest memory per host process,
//! mapped privately by every sandbox restored from it (`docs/SNAPSHOTS.md`, "Memory sharing").
//!
//! A template is built with its RAM in a memfd that QEMU maps *shared*, so the migration stream
//! (with `x-ignore-shared`) carries only device state and the host reads the RAM straight from
//! the memfd afterwards; its non-zero pages are stored as the sparse file `memory.ram`. A
//! restore loads that file once per process into a memfd *sealed* against writes, growth and
//! shrinking, and every clone's QEMU maps it with `share=off` (MAP_PRIVATE): pages it only
//! reads stay shared, pages it writes become its own.
//!
//! Why sealed and not a plain file: QEMU 7.2 turns any discard of guest RAM in a clone
//! (balloon, free page reporting, virtio-mem, postcopy) into `fallocate(PUNCH_HOLE)` on the
//! backing file, which would zero those pages under every other clone. On a write-sealed
//! memfd that call fails with EPERM and nothing changes (tested below), and neither can a
//! compromised QEMU write the template through its descriptor. Where QEMU has it (≥ 8.2) the
//! clones also get `readonly=on,rom=off`, which opens the memfd read-only.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use crate::error::IoContext;
use crate::{Error, Result};

/// A template's RAM file in its snapshot directory.
pub const RAM_FILE: &str = "memory.ram";
/// Guest pages are copied and compared at this size.
const PAGE: usize = 4096;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];
/// Bytes read at a time.
const CHUNK: usize = 1 << 20;
/// Every memfd of template RAM is named this plus the template's key, which is how
/// [`mapped_by_a_qemu`] recognises it in `/proc/<pid>/maps`.
const NAME_PREFIX: &str = "moat-template-ram:";

/// A template's RAM, loaded into a sealed memfd of exactly the guest's memory size.
#[derive(Debug)]
pub struct SharedRam {
    fd: OwnedFd,
    bytes: u64,
    /// The bytes it does not hold (the template's zero pages, left out).
    holes: u64,
    /// The file it was loaded from, to notice a rebuilt template.
    identity: (u64, u64),
}

impl SharedRam {
    /// The memfd, for QEMU to inherit.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// The bytes of guest memory it does not hold: the template's zero pages. A clone's first
    /// touch of one of them, read or write, allocates that page in the memfd, charged to the
    /// clone's memory cgroup, and a write then copies it into the clone, charged again; so a
    /// clone can be charged for each of these bytes once on top of its own memory (what its
    /// cgroup's limit leaves room for, `qemu::limits`). Allocating them all at load instead
    /// would cost every loaded template its whole guest RAM and every `moat run` ~0.5 s per
    /// GiB (measured: 0.9 s for 2 GiB).
    pub fn holes(&self) -> u64 {
        self.holes
    }

    /// Its size: the guest's memory.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

fn memfd(name: &str, sealable: bool) -> Result<File> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| Error::InvalidArgument(format!("memfd name {name:?} has a NUL byte")))?;
    let mut flags = libc::MFD_CLOEXEC;
    if sealable {
        flags |= libc::MFD_ALLOW_SEALING;
    }
    // SAFETY: `cname` is a valid C string that outlives the call; the result is checked.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::io(
            "memfd_create for guest RAM",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A memfd of `bytes` for the RAM of the template being built under `key` (QEMU maps it
/// shared). Not sealed: the template VM writes it.
pub(crate) fn source(key: &str, bytes: u64) -> Result<OwnedFd> {
    let f = memfd(&format!("moat-template-build:{key}"), false)?;
    f.set_len(bytes)
        .ctx(|| format!("sizing the template RAM to {bytes} bytes"))?;
    Ok(f.into())
}

/// The next data extent at or after `offset` of `f`, or `None` past the last one.
pub(crate) fn next_data(f: &File, offset: u64, len: u64) -> Result<Option<(u64, u64)>> {
    let seek = |off: u64, whence| {
        // SAFETY: lseek on a descriptor we own; the result is checked.
        let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r as u64)
        }
    };
    if offset >= len {
        return Ok(None);
    }
    let start = match seek(offset, libc::SEEK_DATA) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) => return Err(Error::io("finding data in guest RAM", e)),
    };
    let end = seek(start, libc::SEEK_HOLE)
        .map_err(|e| Error::io("finding holes in guest RAM", e))?
        .min(len);
    Ok(Some((start, end)))
}

/// Copies the non-zero pages of the first `len` bytes of `src` to the same offsets of `dst`,
/// which the caller sized to `len` (so what is not copied reads as zero). Returns the bytes
/// copied. Holes in `src` are skipped without reading them.
fn copy_nonzero(src: &File, dst: &File, len: u64) -> Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut copied = 0;
    let mut offset = 0;
    while let Some((start, end)) = next_data(src, offset, len)? {
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(CHUNK);
            src.read_exact_at(&mut buf[..n], pos)
                .ctx(|| "reading guest RAM".to_string())?;
            // Each run of non-zero pages is one write: a write per page costs more than the
            // copy itself.
            let mut run: Option<usize> = None;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                // A slice comparison is a memcmp: fast even in debug builds.
                let zero = page == &ZERO_PAGE[..page.len()];
                match (zero, run) {
                    (false, None) => run = Some(i * PAGE),
                    (true, Some(from)) => {
                        copied += write_run(dst, &buf[from..i * PAGE], pos + from as u64)?;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(from) = run {
                copied += write_run(dst, &buf[from..n], pos + from as u64)?;
            }
            pos += n as u64;
        }
        offset = end;
    }
    Ok(copied)
}

fn write_run(dst: &File, bytes: &[u8], at: u64) -> Result<u64> {
    dst.write_all_at(bytes, at)
        .ctx(|| "writing guest RAM".to_string())?;
    Ok(bytes.len() as u64)
}

/// Stores the non-zero pages of the template RAM `src` (`bytes` long) as the sparse file
/// `dest`, synced. Most of a fresh guest's RAM is zero (`init_on_free=1` zeroes what the
/// kernel frees at boot), and zero pages are neither stored nor, later, loaded. Returns the
/// bytes stored.
pub(crate) fn store(src: &OwnedFd, bytes: u64, dest: &Path) -> Result<u64> {
    let src = File::from(
        src.try_clone()
            .ctx(|| "duplicating the RAM memfd".to_string())?,
    );
    let out = File::create(dest).ctx(|| format!("creating {}", dest.display()))?;
    out.set_len(bytes)
        .ctx(|| format!("sizing {}", dest.display()))?;
    let stored = copy_nonzero(&src, &out, bytes)?;
    out.sync_all()
        .ctx(|| format!("syncing {}", dest.display()))?;
    Ok(stored)
}

/// Loads `file` into a new memfd named for `key` and seals it: from then on nobody can change
/// its content or size, and a discard (`fallocate(PUNCH_HOLE)`) fails with EPERM.
pub(crate) fn load_sealed(file: &Path, key: &str) -> Result<SharedRam> {
    use std::os::unix::fs::MetadataExt;
    let src = File::open(file).ctx(|| format!("opening template RAM {}", file.display()))?;
    let md = src
        .metadata()
        .ctx(|| format!("inspecting {}", file.display()))?;
    let bytes = md.len();
    let fd = memfd(&format!("{NAME_PREFIX}{key}"), true)?;
    fd.set_len(bytes)
        .ctx(|| format!("sizing the RAM memfd to {bytes} bytes"))?;
    let stored = copy_nonzero(&src, &fd, bytes)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a memfd we own; the result is checked.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(Error::io(
            "sealing the template RAM memfd",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(SharedRam {
        fd: fd.into(),
        bytes,
        holes: bytes.saturating_sub(stored),
        identity: (md.dev(), md.ino()),
    })
}

type Cache = Mutex<HashMap<PathBuf, Arc<SharedRam>>>;

fn cache() -> &'static Cache {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    CACHE.get_or_init(Cache::default)
}

/// The sealed RAM of the template in `dir`, loaded on this process's first restore of it and
/// kept until [`forget`]: every sandbox this process restores from that template maps the
/// same pages. A template rebuilt in the same place (a new file) is loaded anew.
pub(crate) async fn load(dir: &Path) -> Result<Arc<SharedRam>> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || load_blocking(&dir))
        .await
        .map_err(|e| Error::io("loading template RAM", std::io::Error::other(e)))?
}

fn load_blocking(dir: &Path) -> Result<Arc<SharedRam>> {
    use std::os::unix::fs::MetadataExt;
    let file = dir.join(RAM_FILE);
    let md = std::fs::metadata(&file).ctx(|| format!("inspecting {}", file.display()))?;
    let key = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Held while loading, so concurrent first restores of one template load it once.
    let mut cache = cache().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ram) = cache.get(dir) {
        if ram.identity == (md.dev(), md.ino()) {
            return Ok(ram.clone());
        }
    }
    let started = std::time::Instant::now();
    let ram = Arc::new(load_sealed(&file, &key)?);
    tracing::info!(
        template = %dir.display(),
        bytes = ram.bytes,
        ms = started.elapsed().as_millis() as u64,
        "template RAM loaded and sealed"
    );
    cache.insert(dir.to_path_buf(), ram.clone());
    Ok(ram)
}

/// Drops this process's copy of the RAM of the template in `dir` (it is being removed).
/// QEMUs that map it keep their mapping; the memory goes when the last of them exits.
pub(crate) fn forget(dir: &Path) {
    cache()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(dir);
}

/// Whether a QEMU on this host maps the RAM of the template with key `key` (a sandbox
/// restored from it still runs, launched by any process).
pub fn mapped_by_a_qemu(key: &str) -> bool {
    let needle = format!("/memfd:{NAME_PREFIX}{key} ");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|e| {
        let dir = e.path();
        let is_qemu =
            std::fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.starts_with("qemu-system"));
        is_qemu
            && std::fs::read_to_string(dir.join("maps"))
                .is_ok_and(|maps| maps.lines().any(|l| l.contains(&needle)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn punch_hole(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: fallocate on a descriptor we own; the result is checked.
        let r = unsafe {
            libc::fallocate(
                f.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// A RAM image of 64 pages where page i holds byte i+1, except every fourth page is zero.
    fn image() -> Vec<u8> {
        let mut ram = vec![0u8; 64 * PAGE];
        for (i, page) in ram.chunks_mut(PAGE).enumerate() {
            if i % 4 != 0 {
                page.fill(i as u8 + 1);
            }
        }
        ram
    }

    #[test]
    fn store_keeps_only_nonzero_pages_and_load_restores_them() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let ram = image();
        let src: OwnedFd = source("k", ram.len() as u64).unwrap();
        File::from(src.try_clone().unwrap())
            .write_all_at(&ram, 0)
            .unwrap();
        let file = dir.path().join(RAM_FILE);
        let stored = store(&src, ram.len() as u64, &file).unwrap();
        assert_eq!(stored, 48 * PAGE as u64);
        let md = std::fs::metadata(&file).unwrap();
        assert_eq!(md.len(), ram.len() as u64);
        assert!(
            md.blocks() * 512 < ram.len() as u64,
            "zero pages were stored"
        );

        let shared = load_sealed(&file, "k").unwrap();
        assert_eq!(shared.bytes(), ram.len() as u64);
        assert_eq!(shared.holes(), 16 * PAGE as u64);
        let mut back = vec![0u8; ram.len()];
        File::from(shared.fd().try_clone().unwrap())
            .read_exact_at(&mut back, 0)
            .unwrap();
        assert_eq!(back, ram);
    }

    /// The QEMU 7.2 hazard: a clone's discard becomes a hole punched into the backing file.
    /// On the sealed memfd it fails and every page keeps its content; so do writes, resizes
    /// and shared writable mappings (what `share=on` would need).
    #[test]
    fn a_sealed_template_refuses_discards_writes_and_resizes() {
        let dir = tempfile::tempdir().unwrap();
        let ram = image();
        let file = dir.path().join(RAM_FILE);
        std::fs::write(&file, &ram).unwrap();
        let shared = load_sealed(&file, "k").unwrap();
        // QEMU opens `/proc/self/fd/N` read-write; so does this.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/self/fd/{}", shared.fd().as_raw_fd()))
            .unwrap();
        let eperm = |r: std::io::Result<()>| {
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EPERM));
        };
        eperm(punch_hole(&f, 0, ram.len() as u64));
        eperm(f.write_all_at(&[7u8; PAGE], PAGE as u64));
        eperm(f.set_len(PAGE as u64));
        eperm(f.set_len(2 * ram.len() as u64));
        let map = |flags| {
            // SAFETY: a new mapping of a file we own, at an address the kernel picks.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    ram.len(),
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    f.as_raw_fd(),
                    0,
                )
            }
        };
        assert_eq!(map(libc::MAP_SHARED), libc::MAP_FAILED);
        // A private writable mapping (a clone) works, and its writes stay its own.
        let p = map(libc::MAP_PRIVATE);
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: `p` is a live private mapping of `ram.len()` bytes, unmapped right after.
        unsafe {
            std::ptr::write_bytes(p as *mut u8, 0xee, ram.len());
            libc::munmap(p, ram.len());
        }
        let mut back = vec![0u8; ram.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, ram);
    }
}
