//! OCI image layout: a writer (used by the base image builder and by tests) and the reader the
//! importer uses for `oci:DIR` sources.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::{self, HashingReader};
use crate::error::{ioe, Error, Result};
use crate::fsutil::{mkdirs, write_atomic};
use crate::spec::{self, Compression, ConfigFile, Descriptor, Index, Manifest};
use crate::ImageConfig;

/// Writes an OCI image layout directory (`oci-layout`, `index.json`, `blobs/sha256/…`).
/// Several images can be written into one layout; each `finish` adds a manifest to the index.
pub struct LayoutWriter {
    dir: PathBuf,
    layers: Vec<Descriptor>,
    diff_ids: Vec<String>,
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl LayoutWriter {
    /// Creates (or opens, to add another image) a layout at `dir`.
    pub fn create(dir: &Path) -> Result<LayoutWriter> {
        mkdirs(&dir.join("blobs/sha256"))?;
        write_atomic(
            &dir.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        Ok(LayoutWriter {
            dir: dir.to_path_buf(),
            layers: Vec::new(),
            diff_ids: Vec::new(),
        })
    }

    /// Stores a blob and returns its `(digest, size)`.
    pub fn add_blob(&self, bytes: &[u8]) -> Result<(String, u64)> {
        let d = digest::sha256(bytes);
        let path = blob_path(&self.dir, &d);
        if !path.exists() {
            write_atomic(&path, bytes)?;
        }
        Ok((d, bytes.len() as u64))
    }

    /// Adds a layer from uncompressed tar bytes, compressing it as asked.
    pub fn add_layer(&mut self, tar: &[u8], compression: Compression) -> Result<Descriptor> {
        self.add_layer_reader(tar, compression)
    }

    /// Adds a layer from an uncompressed tar file, streaming (for big layers).
    pub fn add_layer_file(&mut self, tar: &Path, compression: Compression) -> Result<Descriptor> {
        let f = File::open(tar).map_err(ioe("opening layer", tar))?;
        self.add_layer_reader(BufReader::new(f), compression)
    }

    fn add_layer_reader<R: Read>(
        &mut self,
        tar: R,
        compression: Compression,
    ) -> Result<Descriptor> {
        let blobs = self.dir.join("blobs/sha256");
        let tmp = tempfile::NamedTempFile::new_in(&blobs)
            .map_err(ioe("creating a temp blob in", &blobs))?;
        let werr = |e| Error::io("writing a layer blob in", &blobs, e);
        let mut src = HashingReader::new(tar);
        let mut out = HashingWriter {
            inner: io::BufWriter::new(
                tmp.as_file()
                    .try_clone()
                    .map_err(ioe("opening", tmp.path()))?,
            ),
            hasher: Sha256::new(),
            count: 0,
        };
        match compression {
            Compression::None => {
                io::copy(&mut src, &mut out).map_err(werr)?;
            }
            Compression::Gzip => {
                let mut enc = flate2::write::GzEncoder::new(&mut out, flate2::Compression::fast());
                io::copy(&mut src, &mut enc).map_err(werr)?;
                enc.finish().map_err(werr)?;
            }
            Compression::Zstd => {
                let mut enc = zstd::stream::write::Encoder::new(&mut out, 3).map_err(werr)?;
                io::copy(&mut src, &mut enc).map_err(werr)?;
                enc.finish().map_err(werr)?;
            }
        }
        out.flush().map_err(werr)?;
        let (diff_id, _) = src.finish().map_err(werr)?;
        let d = format!("sha256:{}", hex::encode(out.hasher.finalize()));
        let size = out.count;
        out.inner.into_inner().map_err(|e| werr(e.into_error()))?;
        tmp.as_file().sync_all().map_err(werr)?;
        tmp.persist(blob_path(&self.dir, &d))
            .map_err(|e| werr(e.error))?;
        let desc = Descriptor {
            media_type: compression.oci_media_type().to_string(),
            digest: d,
            size,
            platform: None,
            annotations: BTreeMap::new(),
            urls: Vec::new(),
        };
        self.layers.push(desc.clone());
        self.diff_ids.push(diff_id);
        Ok(desc)
    }

    /// Adds a pre-made layer blob (any media type, e.g. to test rejections) with its diff_id.
    pub fn add_raw_layer(
        &mut self,
        blob: &[u8],
        media_type: &str,
        diff_id: &str,
    ) -> Result<Descriptor> {
        let (d, size) = self.add_blob(blob)?;
        let desc = Descriptor {
            media_type: media_type.into(),
            digest: d,
            size,
            platform: None,
            annotations: BTreeMap::new(),
            urls: Vec::new(),
        };
        self.layers.push(desc.clone());
        self.diff_ids.push(diff_id.into());
        Ok(desc)
    }

    /// Writes the config (linux/amd64) and manifest and adds the manifest to `index.json`
    /// (replacing an entry with the same ref name). Returns the manifest descriptor.
    pub fn finish(self, config: &ImageConfig, ref_name: Option<&str>) -> Result<Descriptor> {
        self.finish_platform(config, ref_name, "linux", "amd64")
    }

    /// Like [`finish`](Self::finish) for another platform (tests use it for platform errors).
    pub fn finish_platform(
        self,
        config: &ImageConfig,
        ref_name: Option<&str>,
        os: &str,
        arch: &str,
    ) -> Result<Descriptor> {
        let cfg = ConfigFile::new(config, self.diff_ids.clone(), os, arch);
        let cfg_bytes = serde_json::to_vec(&cfg).map_err(|e| Error::InvalidImage(e.to_string()))?;
        let (cd, cs) = self.add_blob(&cfg_bytes)?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(spec::OCI_MANIFEST.into()),
            config: Descriptor {
                media_type: spec::OCI_CONFIG.into(),
                digest: cd,
                size: cs,
                platform: None,
                annotations: BTreeMap::new(),
                urls: Vec::new(),
            },
            layers: self.layers.clone(),
        };
        let mbytes =
            serde_json::to_vec(&manifest).map_err(|e| Error::InvalidImage(e.to_string()))?;
        let (md, ms) = self.add_blob(&mbytes)?;
        let mut annotations = BTreeMap::new();
        if let Some(r) = ref_name {
            annotations.insert(spec::REF_NAME.to_string(), r.to_string());
        }
        let desc = Descriptor {
            media_type: spec::OCI_MANIFEST.into(),
            digest: md,
            size: ms,
            platform: Some(spec::Platform {
                architecture: arch.into(),
                os: os.into(),
                variant: None,
            }),
            annotations,
            urls: Vec::new(),
        };
        add_to_index(&self.dir, desc.clone())?;
        Ok(desc)
    }
}

/// Adds a descriptor to the layout's `index.json`, replacing one with the same ref name.
pub fn add_to_index(dir: &Path, desc: Descriptor) -> Result<()> {
    let mut index = match read_index(dir) {
        Ok(i) => i,
        Err(_) => Index {
            schema_version: 2,
            media_type: Some(spec::OCI_INDEX.into()),
            manifests: Vec::new(),
        },
    };
    let name = desc.annotations.get(spec::REF_NAME).cloned();
    index
        .manifests
        .retain(|d| name.is_none() || d.annotations.get(spec::REF_NAME) != name.as_ref());
    index.manifests.push(desc);
    let bytes = serde_json::to_vec(&index).map_err(|e| Error::InvalidImage(e.to_string()))?;
    write_atomic(&dir.join("index.json"), &bytes)
}

/// Path of a blob in a layout (the digest must be validated first).
pub fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256").join(digest::hex_of(digest))
}

/// Reads a layout's `index.json`.
pub fn read_index(dir: &Path) -> Result<Index> {
    let layout = dir.join("oci-layout");
    if !layout.is_file() {
        return Err(Error::NotFound {
            what: format!("OCI image layout at {} (no oci-layout file)", dir.display()),
        });
    }
    let p = dir.join("index.json");
    let bytes = fs::read(&p).map_err(ioe("reading", &p))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::InvalidImage(format!("{} does not parse: {e}", p.display())))
}

/// Reads a blob of a layout fully and checks its digest (for small blobs: manifests, configs).
pub fn read_blob_verified(dir: &Path, desc: &Descriptor, what: &str) -> Result<Vec<u8>> {
    digest::validate(&desc.digest)?;
    let p = blob_path(dir, &desc.digest);
    let bytes = fs::read(&p).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            Error::NotFound {
                what: format!("{what} blob {} in {}", desc.digest, dir.display()),
            }
        } else {
            Error::io("reading", &p, e)
        }
    })?;
    digest::check(
        || format!("{what} {}", p.display()),
        &desc.digest,
        &digest::sha256(&bytes),
    )?;
    Ok(bytes)
}

/// Finds the manifest to import in a layout: by ref name if given, otherwise the only one
/// (or linux/amd64 among several); indexes are followed to their linux/amd64 manifest.
/// Returns `(manifest bytes, manifest digest)`.
pub fn select_manifest(dir: &Path, tag: Option<&str>) -> Result<(Vec<u8>, String)> {
    let index = read_index(dir)?;
    let candidates: Vec<Descriptor> = match tag {
        Some(t) => index
            .manifests
            .iter()
            .filter(|d| d.annotations.get(spec::REF_NAME).map(String::as_str) == Some(t))
            .cloned()
            .collect(),
        None => index.manifests.clone(),
    };
    let desc = match candidates.len() {
        0 => {
            let names: Vec<_> = index
                .manifests
                .iter()
                .filter_map(|d| d.annotations.get(spec::REF_NAME))
                .collect();
            return Err(Error::NotFound {
                what: format!(
                    "manifest {:?} in OCI layout {} (ref names present: {names:?})",
                    tag.unwrap_or(""),
                    dir.display()
                ),
            });
        }
        1 => candidates[0].clone(),
        _ => spec::pick_platform(&Index {
            manifests: candidates,
            ..index.clone()
        })?,
    };
    let mut desc = desc;
    for _ in 0..4 {
        let bytes = read_blob_verified(dir, &desc, "manifest")?;
        let mt = spec::manifest_media_type(Some(&desc.media_type), &bytes)?;
        if spec::is_manifest(&mt) {
            return Ok((bytes, desc.digest));
        }
        if !spec::is_index(&mt) {
            return Err(Error::UnsupportedMediaType {
                kind: "manifest".into(),
                media_type: mt,
                allowed: spec::MANIFEST_TYPES.to_vec(),
            });
        }
        let idx: Index = serde_json::from_slice(&bytes)
            .map_err(|e| Error::InvalidImage(format!("image index does not parse: {e}")))?;
        desc = spec::pick_platform(&idx)?;
    }
    Err(Error::InvalidImage(
        "image indexes nested too deeply".into(),
    ))
}
