//! The image cache. Layout under the store root:
//!
//! ```text
//! sha256/<hex>/{rootfs.ext4, config.json, manifest.json, meta.json}   one entry per manifest digest
//! names/<name with '/' as '%'>                                          "sha256:<hex>\n"
//! locks/<hex>.lock                                                      flock per digest
//! tmp/<hex>.<pid>.<rand>/                                              builds in progress
//! ```
//! An entry is built in `tmp/` and renamed into `sha256/` complete, under the digest's flock,
//! so a crash leaves no partial entry; leftovers in `tmp/` are removed by the next open or import.

use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::archive::{self, BlobLoc};
use crate::digest::{self, HashRef, HashState};
use crate::error::{ioe, Error, Result};
use crate::fsutil::{mkdirs, remove_all, sync_dir, write_atomic};
use crate::reference::Source;
use crate::registry::Client;
use crate::spec::{self, Compression, Manifest};
use crate::unpack::Unpacker;
use crate::{Image, ImageConfig, ImportOptions, Progress};

/// The on-disk image cache.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    digest: String,
    size: u64,
    created_unix_nanos: u128,
    source: String,
    config: ImageConfig,
}

/// Where the blobs of a resolved image come from.
enum Blobs {
    Registry(Client),
    Layout(PathBuf),
    Archive {
        config: Vec<u8>,
        layers: Vec<BlobLoc>,
    },
}

struct Resolved {
    manifest_bytes: Vec<u8>,
    digest: String,
    manifest: Manifest,
    blobs: Blobs,
    default_name: Option<String>,
}

/// Checks a local image name. Allowed: 1-128 of `A-Z a-z 0-9 . _ - / :`, starting and ending
/// with a letter or digit, no `..` or `//`. Names become file names, hence the strictness.
pub fn validate_name(name: &str) -> Result<()> {
    let bad = |r: &str| {
        Err(Error::InvalidName {
            name: name.into(),
            reason: r.into(),
        })
    };
    let b = name.as_bytes();
    if b.is_empty() || b.len() > 128 {
        return bad("it must be 1-128 characters long");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || b"._-/:".contains(c))
    {
        return bad("it contains a character that is not allowed");
    }
    if !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return bad("it must start and end with a letter or digit");
    }
    if name.contains("..") || name.contains("//") {
        return bad("it contains \"..\" or \"//\"");
    }
    if name.starts_with("sha256:") {
        return bad("it looks like a digest");
    }
    Ok(())
}

fn name_file(name: &str) -> String {
    name.replace('/', "%")
}

fn name_from_file(f: &str) -> String {
    f.replace('%', "/")
}

impl ImageStore {
    /// Opens (creating if needed) a store rooted at `root`, removing what builds killed
    /// half-way left in `tmp/` (a daemon killed mid-import must not leave a half-unpacked
    /// image on disk until some later import happens to clean up).
    pub fn open(root: &Path) -> Result<ImageStore> {
        for d in ["sha256", "names", "locks", "tmp"] {
            mkdirs(&root.join(d))?;
        }
        let store = ImageStore {
            root: root.to_path_buf(),
        };
        store.clean_tmp();
        Ok(store)
    }

    fn entry_dir(&self, digest: &str) -> PathBuf {
        self.root.join("sha256").join(digest::hex_of(digest))
    }

    /// Takes the per-digest lock (blocking in a worker thread, so other tasks keep running).
    async fn lock(&self, digest: &str) -> Result<Flock<File>> {
        let p = self.lock_path(digest);
        tokio::task::spawn_blocking(move || lock_file(&p))
            .await
            .map_err(|e| Error::Io {
                context: "lock task".into(),
                source: std::io::Error::other(e),
            })?
    }

    fn lock_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("locks")
            .join(format!("{}.lock", digest::hex_of(digest)))
    }

    /// Removes build leftovers whose digest is not locked by a live build.
    fn clean_tmp(&self) {
        let tmp = self.root.join("tmp");
        let Ok(rd) = fs::read_dir(&tmp) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.split('.').next().unwrap_or("");
            if !digest::is_hex64(hex) {
                continue;
            }
            let lp = self.root.join("locks").join(format!("{hex}.lock"));
            let Ok(f) = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lp)
            else {
                continue;
            };
            if let Ok(_guard) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                let _ = remove_all(&e.path());
            }
        }
    }

    /// Imports an image: resolves the manifest, and unless that digest is cached, downloads,
    /// verifies and unpacks the layers and builds the root disk. Then records `name` (or the
    /// source's own name: `registry/repo:tag`, the archive's first RepoTag, the layout tag).
    pub async fn import(
        &self,
        source: &Source,
        name: Option<&str>,
        opts: &ImportOptions,
        progress: &dyn Progress,
    ) -> Result<Image> {
        if let Some(n) = name {
            validate_name(n)?;
        }
        progress.phase("resolving", None);
        let resolved = self.resolve_source(source, opts).await?;
        let name = match name {
            Some(n) => Some(n.to_string()),
            None => resolved
                .default_name
                .clone()
                .filter(|n| validate_name(n).is_ok()),
        };
        let _lock = self.lock(&resolved.digest).await?;
        let entry = self.entry_dir(&resolved.digest);
        if !entry.join("meta.json").is_file() {
            self.clean_tmp();
            self.build(&resolved, &source.to_string(), progress).await?;
        }
        if let Some(n) = &name {
            write_atomic(
                &self.root.join("names").join(name_file(n)),
                format!("{}\n", resolved.digest).as_bytes(),
            )?;
        }
        self.load(&resolved.digest, name)
    }

    async fn resolve_source(&self, source: &Source, opts: &ImportOptions) -> Result<Resolved> {
        match source {
            Source::Registry(r) => {
                let client = Client::new(r, opts, false)?;
                let (mut body, mut mt) = client.manifest(r.manifest_ref()).await?;
                let mut digest = digest::sha256(&body);
                if spec::is_index(&mt) {
                    let idx: spec::Index = serde_json::from_slice(&body).map_err(|e| {
                        Error::InvalidImage(format!("image index does not parse: {e}"))
                    })?;
                    let d = spec::pick_platform(&idx)?;
                    digest::validate(&d.digest)?;
                    (body, mt) = client.manifest(&d.digest).await?;
                    digest = d.digest;
                }
                if !spec::is_manifest(&mt) {
                    return Err(Error::UnsupportedMediaType {
                        kind: "manifest".into(),
                        media_type: mt,
                        allowed: spec::MANIFEST_TYPES.to_vec(),
                    });
                }
                let manifest = spec::parse_manifest(&body)?;
                Ok(Resolved {
                    manifest_bytes: body,
                    digest,
                    manifest,
                    blobs: Blobs::Registry(client),
                    default_name: r.name_with_tag(),
                })
            }
            Source::OciLayout(p) => {
                let s = Source::oci_spec(p);
                let (body, digest) = crate::layout::select_manifest(&s.dir, s.tag.as_deref())?;
                let manifest = spec::parse_manifest(&body)?;
                Ok(Resolved {
                    manifest_bytes: body,
                    digest,
                    manifest,
                    blobs: Blobs::Layout(s.dir),
                    default_name: s.tag,
                })
            }
            Source::DockerArchive(p) => {
                let a = tokio::task::spawn_blocking({
                    let p = p.clone();
                    move || archive::open(&p)
                })
                .await
                .map_err(|e| Error::Io {
                    context: "archive task".into(),
                    source: std::io::Error::other(e),
                })??;
                Ok(Resolved {
                    manifest_bytes: a.manifest_bytes,
                    digest: a.digest,
                    manifest: a.manifest,
                    blobs: Blobs::Archive {
                        config: a.config_bytes,
                        layers: a.layers,
                    },
                    default_name: a.repo_tag,
                })
            }
        }
    }

    async fn build(&self, r: &Resolved, source: &str, progress: &dyn Progress) -> Result<()> {
        let hex = digest::hex_of(&r.digest).to_string();
        let tmp =
            self.root
                .join("tmp")
                .join(format!("{hex}.{}.{:08x}", std::process::id(), rand_u32()));
        let res = self.build_in(&tmp, r, source, progress).await;
        if res.is_err() {
            let _ = remove_all(&tmp);
        }
        res
    }

    async fn build_in(
        &self,
        tmp: &Path,
        r: &Resolved,
        source: &str,
        progress: &dyn Progress,
    ) -> Result<()> {
        let rootfs = tmp.join("rootfs");
        let blobs = tmp.join("blobs");
        mkdirs(&rootfs)?;
        mkdirs(&blobs)?;
        let m = &r.manifest;

        // Config.
        let config_bytes = match &r.blobs {
            Blobs::Registry(c) => {
                let p = blobs.join("config");
                c.download(&m.config, "config", &p, &crate::NoProgress)
                    .await?;
                fs::read(&p).map_err(ioe("reading", &p))?
            }
            Blobs::Layout(dir) => crate::layout::read_blob_verified(dir, &m.config, "config")?,
            Blobs::Archive { config, .. } => config.clone(),
        };
        digest::check(
            || format!("config {}", m.config.digest),
            &m.config.digest,
            &digest::sha256(&config_bytes),
        )?;
        let config = spec::parse_config(&config_bytes, m.layers.len())?;

        // Layers, in order.
        let mut unpacker = Unpacker::new(&rootfs);
        let n = m.layers.len();
        for (i, layer) in m.layers.iter().enumerate() {
            let comp = Compression::from_media_type(&layer.media_type)?;
            let diff_id = config.rootfs.diff_ids[i].clone();
            let loc = match &r.blobs {
                Blobs::Registry(c) => {
                    progress.phase(
                        &format!("downloading layer {}/{n}", i + 1),
                        Some(layer.size),
                    );
                    let p = blobs.join(digest::hex_of(&layer.digest));
                    c.download(layer, &format!("layer {}/{n}", i + 1), &p, progress)
                        .await?;
                    BlobLoc {
                        path: p,
                        offset: 0,
                        len: layer.size,
                    }
                }
                Blobs::Layout(dir) => {
                    let p = crate::layout::blob_path(dir, &layer.digest);
                    let len = fs::metadata(&p)
                        .map_err(|_| Error::NotFound {
                            what: format!("layer blob {} in {}", layer.digest, dir.display()),
                        })?
                        .len();
                    BlobLoc {
                        path: p,
                        offset: 0,
                        len,
                    }
                }
                Blobs::Archive { layers, .. } => layers[i].clone(),
            };
            // Local blobs are hashed before unpacking so a tampered blob is reported as such
            // (not as a decompression error); every blob is hashed again while it is unpacked.
            let verify_first = !matches!(r.blobs, Blobs::Registry(_));
            progress.phase(&format!("unpacking layer {}/{n}", i + 1), Some(loc.len));
            let expected = layer.digest.clone();
            unpacker = tokio::task::spawn_blocking(move || -> Result<Unpacker> {
                if verify_first && comp != Compression::None {
                    let (d, _) = digest::HashingReader::new(loc.open()?)
                        .finish()
                        .map_err(ioe("reading", &loc.path))?;
                    digest::check(|| format!("layer {expected}"), &expected, &d)?;
                }
                apply(&mut unpacker, &loc, comp, &expected, &diff_id)?;
                Ok(unpacker)
            })
            .await
            .map_err(|e| Error::Io {
                context: "unpack task".into(),
                source: std::io::Error::other(e),
            })??;
            progress.advance(layer.size);
        }
        tokio::task::spawn_blocking(move || unpacker.finish())
            .await
            .map_err(|e| Error::Io {
                context: "unpack task".into(),
                source: std::io::Error::other(e),
            })??;
        remove_all(&blobs)?;

        progress.phase("building root disk", None);
        let img = tmp.join("rootfs.ext4");
        let size = tokio::task::spawn_blocking({
            let (rootfs, img) = (rootfs.clone(), img.clone());
            move || crate::disk::build_ext4(&rootfs, &img)
        })
        .await
        .map_err(|e| Error::Io {
            context: "mkfs task".into(),
            source: std::io::Error::other(e),
        })??;
        remove_all(&rootfs)?;

        let rc = config.config.clone().unwrap_or_default();
        let meta = Meta {
            digest: r.digest.clone(),
            size,
            created_unix_nanos: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
            source: source.to_string(),
            config: ImageConfig {
                env: rc.env.unwrap_or_default(),
                working_dir: rc.working_dir.filter(|w| !w.is_empty()),
                user: rc.user.filter(|u| !u.is_empty()),
                entrypoint: rc.entrypoint.unwrap_or_default(),
                cmd: rc.cmd.unwrap_or_default(),
            },
        };
        write_atomic(&tmp.join("config.json"), &config_bytes)?;
        write_atomic(&tmp.join("manifest.json"), &r.manifest_bytes)?;
        let mb =
            serde_json::to_vec_pretty(&meta).map_err(|e| Error::InvalidImage(e.to_string()))?;
        write_atomic(&tmp.join("meta.json"), &mb)?;
        let entry = self.entry_dir(&r.digest);
        remove_all(&entry)?; // an incomplete entry without meta.json (cannot normally exist)
        fs::rename(tmp, &entry).map_err(ioe("moving the new image into", &entry))?;
        sync_dir(&self.root.join("sha256"))
    }

    fn load(&self, digest: &str, name: Option<String>) -> Result<Image> {
        let dir = self.entry_dir(digest);
        let p = dir.join("meta.json");
        let bytes = fs::read(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::NotFound {
                    what: format!("image {digest} in the store"),
                }
            } else {
                Error::io("reading", &p, e)
            }
        })?;
        let meta: Meta = serde_json::from_slice(&bytes)
            .map_err(|e| Error::InvalidImage(format!("{} does not parse: {e}", p.display())))?;
        let nanos = u64::try_from(meta.created_unix_nanos).unwrap_or(u64::MAX);
        Ok(Image {
            name,
            digest: meta.digest,
            size: meta.size,
            created: UNIX_EPOCH + Duration::from_nanos(nanos),
            config: meta.config,
            rootfs: dir.join("rootfs.ext4"),
        })
    }

    /// `(name, digest)` for every name.
    fn names(&self) -> Result<Vec<(String, String)>> {
        let dir = self.root.join("names");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(ioe("reading", &dir))? {
            let e = e.map_err(ioe("reading", &dir))?;
            let f = e.file_name().to_string_lossy().into_owned();
            if f.starts_with('.') {
                continue;
            }
            let d = fs::read_to_string(e.path()).map_err(ioe("reading", &e.path()))?;
            let d = d.trim().to_string();
            if digest::validate(&d).is_ok() {
                out.push((name_from_file(&f), d));
            }
        }
        Ok(out)
    }

    fn digests(&self) -> Result<Vec<String>> {
        let dir = self.root.join("sha256");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(ioe("reading", &dir))? {
            let e = e.map_err(ioe("reading", &dir))?;
            let h = e.file_name().to_string_lossy().into_owned();
            if digest::is_hex64(&h) && e.path().join("meta.json").is_file() {
                out.push(format!("sha256:{h}"));
            }
        }
        Ok(out)
    }

    /// One entry per name, plus unnamed cached images; sorted by name (unnamed last).
    pub fn list(&self) -> Result<Vec<Image>> {
        let names = self.names()?;
        let mut out = Vec::new();
        for (n, d) in &names {
            if let Ok(img) = self.load(d, Some(n.clone())) {
                out.push(img);
            }
        }
        for d in self.digests()? {
            if !names.iter().any(|(_, nd)| *nd == d) {
                out.push(self.load(&d, None)?);
            }
        }
        out.sort_by(|a, b| match (&a.name, &b.name) {
            (Some(x), Some(y)) => x.cmp(y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.digest.cmp(&b.digest),
        });
        Ok(out)
    }

    /// Finds an image by name, full digest (`sha256:…`) or a unique digest prefix.
    pub fn resolve(&self, name_or_digest: &str) -> Result<Image> {
        let q = name_or_digest;
        if validate_name(q).is_ok() {
            let p = self.root.join("names").join(name_file(q));
            if let Ok(d) = fs::read_to_string(&p) {
                return self.load(d.trim(), Some(q.to_string()));
            }
        }
        let prefix = q.strip_prefix("sha256:").unwrap_or(q);
        let is_hex = !prefix.is_empty() && prefix.bytes().all(|b| b.is_ascii_hexdigit());
        if is_hex && (prefix.len() >= 4 || q.starts_with("sha256:")) {
            let prefix = prefix.to_ascii_lowercase();
            let hits: Vec<String> = self
                .digests()?
                .into_iter()
                .filter(|d| digest::hex_of(d).starts_with(&prefix))
                .collect();
            match hits.len() {
                1 => {
                    let name = self
                        .names()?
                        .into_iter()
                        .filter(|(_, d)| *d == hits[0])
                        .map(|(n, _)| n)
                        .min();
                    return self.load(&hits[0], name);
                }
                0 => {}
                _ => {
                    return Err(Error::Ambiguous {
                        prefix: q.into(),
                        candidates: hits,
                    })
                }
            }
        }
        Err(Error::NotFound {
            what: format!("no image named {q:?} or with a digest starting with it in the store (import it first; names and digests are listed by `moat image ls`)"),
        })
    }

    /// Removes a name; the cached disk is deleted when no name refers to it any more. Given a
    /// digest, all its names and the disk are removed. Returns what was resolved.
    pub fn remove(&self, name_or_digest: &str) -> Result<Image> {
        self.remove_unless(name_or_digest, |_| Ok(None))
    }

    /// [`ImageStore::remove`], except that when the removal would delete the disk, `keep` is
    /// asked first (under the digest's lock) whether something still needs it: `Some(why)`
    /// removes nothing and answers [`Error::InUse`].
    pub fn remove_unless(
        &self,
        name_or_digest: &str,
        keep: impl FnOnce(&Image) -> Result<Option<String>>,
    ) -> Result<Image> {
        let img = self.resolve(name_or_digest)?;
        let _lock = lock_file(&self.lock_path(&img.digest))?;
        let by_name = img.name.as_deref() == Some(name_or_digest);
        let names = self.names()?;
        let drops_disk = !names
            .iter()
            .any(|(n, d)| *d == img.digest && by_name && n != name_or_digest);
        if drops_disk {
            if let Some(why) = keep(&img)? {
                return Err(Error::InUse {
                    image: name_or_digest.to_string(),
                    why,
                });
            }
        }
        for (n, d) in names {
            if d == img.digest && (!by_name || n == name_or_digest) {
                let p = self.root.join("names").join(name_file(&n));
                fs::remove_file(&p).map_err(ioe("removing", &p))?;
            }
        }
        sync_dir(&self.root.join("names"))?;
        if !self.names()?.iter().any(|(_, d)| *d == img.digest) {
            // Rename away first so the entry vanishes atomically, then delete.
            let entry = self.entry_dir(&img.digest);
            let gone = self.root.join("tmp").join(format!(
                "{}.removed.{}",
                digest::hex_of(&img.digest),
                std::process::id()
            ));
            fs::rename(&entry, &gone).map_err(ioe("removing", &entry))?;
            sync_dir(&self.root.join("sha256"))?;
            remove_all(&gone)?;
        }
        Ok(img)
    }
}

fn lock_file(p: &Path) -> Result<Flock<File>> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .map_err(ioe("opening lock", p))?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| Error::io("locking", p, e.into()))
}

/// Unpacks one layer, verifying the blob digest and the diff_id while streaming.
fn apply(
    u: &mut Unpacker,
    loc: &BlobLoc,
    comp: Compression,
    expected: &str,
    diff_id: &str,
) -> Result<()> {
    let mut f = loc.open()?;
    let mut cstate = HashState::default();
    let mut ustate = HashState::default();
    {
        let craw = BufReader::with_capacity(
            256 * 1024,
            HashRef {
                inner: &mut f,
                state: &mut cstate,
            },
        );
        let dec: Box<dyn Read + '_> = match comp {
            Compression::None => Box::new(craw),
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(craw)),
            Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::with_buffer(craw).map_err(|e| {
                    Error::CorruptLayer {
                        digest: expected.into(),
                        detail: e.to_string(),
                    }
                })?)
            }
        };
        let ur = HashRef {
            inner: dec,
            state: &mut ustate,
        };
        u.apply_layer(ur, expected)?;
    }
    std::io::copy(
        &mut HashRef {
            inner: &mut f,
            state: &mut cstate,
        },
        &mut std::io::sink(),
    )
    .map_err(ioe("reading", &loc.path))?;
    digest::check(|| format!("layer {expected}"), expected, &cstate.digest())?;
    digest::check(
        || format!("uncompressed layer {expected} (diff_id)"),
        diff_id,
        &ustate.digest(),
    )?;
    Ok(())
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        return std::process::id()
            ^ SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
    }
    u32::from_ne_bytes(b)
}
