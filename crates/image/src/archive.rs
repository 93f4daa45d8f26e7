//! `docker save` archives. Two layouts exist in the wild: the legacy one (`<id>/layer.tar`,
//! `<hex>.json`) and the one of Docker ≥ 25 (an OCI layout inside, `blobs/sha256/<hex>`, with
//! the legacy paths as symlinks). Both have a `manifest.json` naming the config and layers.
//!
//! Such an archive has no manifest digest, so one is synthesised: a canonical OCI manifest from
//! the config and the layer blobs as stored. The same image content always gives the same digest.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::digest::{self, HashingReader};
use crate::error::{ioe, Error, Result};
use crate::spec::{self, Compression, Descriptor, Manifest};
use crate::unpack::normalize;

/// Where a blob's bytes are: a byte range of a file.
#[derive(Debug, Clone)]
pub struct BlobLoc {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

impl BlobLoc {
    pub fn open(&self) -> Result<std::io::Take<File>> {
        let mut f = File::open(&self.path).map_err(ioe("opening", &self.path))?;
        f.seek(SeekFrom::Start(self.offset))
            .map_err(ioe("seeking in", &self.path))?;
        Ok(f.take(self.len))
    }

    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut v = Vec::with_capacity(self.len.min(64 << 20) as usize);
        self.open()?
            .read_to_end(&mut v)
            .map_err(ioe("reading", &self.path))?;
        Ok(v)
    }
}

pub struct ArchiveImage {
    pub manifest_bytes: Vec<u8>,
    pub digest: String,
    pub manifest: Manifest,
    pub config_bytes: Vec<u8>,
    pub layers: Vec<BlobLoc>,
    pub repo_tag: Option<String>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

enum Member {
    File(u64, u64),
    Link(String),
}

fn key(p: &Path) -> String {
    normalize(p)
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

/// Reads the archive's index and synthesises its manifest.
pub fn open(path: &Path) -> Result<ArchiveImage> {
    let bad = |d: String| Error::InvalidImage(format!("docker archive {}: {d}", path.display()));
    let f = File::open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                what: format!("docker archive {}", path.display()),
            }
        } else {
            Error::io("opening", path, e)
        }
    })?;
    let mut members: HashMap<String, Member> = HashMap::new();
    let mut ar = tar::Archive::new(f);
    for e in ar.entries().map_err(|e| bad(e.to_string()))? {
        let e = e.map_err(|e| bad(format!("not a tar archive: {e}")))?;
        let name = key(&e.path().map_err(|e| bad(e.to_string()))?);
        match e.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                members.insert(name, Member::File(e.raw_file_position(), e.size()));
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = e
                    .link_name()
                    .ok()
                    .flatten()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let joined = if e.header().entry_type() == tar::EntryType::Symlink {
                    Path::new(&name)
                        .parent()
                        .unwrap_or(Path::new(""))
                        .join(target)
                } else {
                    target
                };
                members.insert(name, Member::Link(key(&joined)));
            }
            _ => {}
        }
    }
    let find = |name: &str| -> Result<BlobLoc> {
        let mut k = key(Path::new(name));
        for _ in 0..8 {
            match members.get(&k) {
                Some(Member::File(offset, len)) => {
                    return Ok(BlobLoc {
                        path: path.to_path_buf(),
                        offset: *offset,
                        len: *len,
                    })
                }
                Some(Member::Link(t)) => k = t.clone(),
                None => break,
            }
        }
        Err(bad(format!("member {name:?} is missing")))
    };
    let index: Vec<Entry> = serde_json::from_slice(&find("manifest.json")?.read_all()?)
        .map_err(|e| bad(format!("manifest.json does not parse: {e}")))?;
    let entry = index
        .into_iter()
        .next()
        .ok_or_else(|| bad("manifest.json lists no image".into()))?;
    let config_bytes = find(&entry.config)?.read_all()?;
    let config_digest = digest::sha256(&config_bytes);
    if let Some(h) = named_digest(&entry.config) {
        digest::check(|| format!("config {}", entry.config), &h, &config_digest)?;
    }
    let config = spec::parse_config(&config_bytes, entry.layers.len())?;

    let mut descs = Vec::new();
    let mut locs = Vec::new();
    for (i, l) in entry.layers.iter().enumerate() {
        let loc = find(l)?;
        let mut head = [0u8; 4];
        let n = loc.open()?.read(&mut head).map_err(ioe("reading", path))?;
        let comp = Compression::sniff(&head[..n]);
        let d = if comp == Compression::None {
            config.rootfs.diff_ids[i].clone() // verified against the bytes while unpacking
        } else if let Some(h) = named_digest(l) {
            h
        } else {
            HashingReader::new(loc.open()?)
                .finish()
                .map_err(ioe("reading", path))?
                .0
        };
        descs.push(Descriptor {
            media_type: comp.oci_media_type().into(),
            digest: d,
            size: loc.len,
            platform: None,
            annotations: BTreeMap::new(),
            urls: Vec::new(),
        });
        locs.push(loc);
    }
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(spec::OCI_MANIFEST.into()),
        config: Descriptor {
            media_type: spec::OCI_CONFIG.into(),
            digest: config_digest,
            size: config_bytes.len() as u64,
            platform: None,
            annotations: BTreeMap::new(),
            urls: Vec::new(),
        },
        layers: descs,
    };
    let manifest_bytes = serde_json::to_vec(&manifest).map_err(|e| bad(e.to_string()))?;
    Ok(ArchiveImage {
        digest: digest::sha256(&manifest_bytes),
        manifest_bytes,
        manifest,
        config_bytes,
        layers: locs,
        repo_tag: entry.repo_tags.and_then(|t| t.into_iter().next()),
    })
}

/// The digest a member's path claims: `blobs/sha256/<hex>` or `<hex>.json`.
fn named_digest(name: &str) -> Option<String> {
    let k = key(Path::new(name));
    let last = k.rsplit('/').next()?;
    let h = last.strip_suffix(".json").unwrap_or(last);
    (digest::is_hex64(h) && (k.starts_with("blobs/sha256/") || last.ends_with(".json")))
        .then(|| format!("sha256:{h}"))
}
