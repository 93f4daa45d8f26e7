//! What one fuzz input must satisfy, shared by the libFuzzer targets (`fuzz_targets/*.rs`, run
//! by scripts/fuzz-image.sh) and the bounded smoke run in `cargo test -p moat-image --test
//! fuzz_smoke`. The bytes are what a registry or an archive a user imports could hold.
//!
//! - [`manifest`]: the bytes as every image document moat parses (a manifest's media type, a
//!   manifest, an index and the platform picked from it, an image config): an answer or a
//!   clear error, never a panic.
//! - [`layer`]: the bytes as two layer tar streams (the first byte says where the second
//!   starts), unpacked over each other into a root with files beside it: an answer or an
//!   error, and nothing outside the root is created, changed or linked.

use std::fs;
use std::os::unix::fs::MetadataExt;

use moat_image::spec;
use moat_image::unpack::Unpacker;

pub fn manifest(data: &[u8]) -> Result<(), String> {
    let _ = spec::manifest_media_type(None, data);
    let _ = spec::manifest_media_type(Some("application/json; charset=utf-8"), data);
    if let Ok(m) = spec::parse_manifest(data) {
        if m.schema_version != 2 {
            return Err(format!("schemaVersion {} accepted", m.schema_version));
        }
    }
    if let Ok(index) = serde_json::from_slice::<spec::Index>(data) {
        if let Ok(d) = spec::pick_platform(&index) {
            let p = d
                .platform
                .as_ref()
                .ok_or("picked a manifest with no platform")?;
            if (p.os.as_str(), p.architecture.as_str()) != ("linux", "amd64") {
                return Err(format!("picked {}/{}", p.os, p.architecture));
            }
        }
    }
    for layers in 0..3 {
        let _ = spec::parse_config(data, layers);
    }
    Ok(())
}

pub fn layer(data: &[u8]) -> Result<(), String> {
    let Some((&cut, rest)) = data.split_first() else {
        return Ok(());
    };
    let cut = (usize::from(cut) * 512).min(rest.len());
    let (first, second) = if cut == 0 {
        (rest, &[][..])
    } else {
        rest.split_at(cut)
    };
    let outer = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root = outer.path().join("root");
    fs::create_dir(&root).map_err(|e| e.to_string())?;
    fs::create_dir(outer.path().join("etc")).map_err(|e| e.to_string())?;
    fs::write(outer.path().join("etc/passwd"), b"host").map_err(|e| e.to_string())?;
    fs::write(outer.path().join("secret"), b"s").map_err(|e| e.to_string())?;
    let mut u = Unpacker::new(&root);
    let applied = u
        .apply_layer(first, "layer0")
        .and_then(|()| u.apply_layer(second, "layer1"));
    if applied.is_ok() {
        let _ = u.finish();
    }
    let mut names: Vec<String> = fs::read_dir(outer.path())
        .map_err(|e| e.to_string())?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    names.sort();
    if names != ["etc", "root", "secret"] {
        return Err(format!("the layer reached outside its root: {names:?}"));
    }
    let etc = fs::read_dir(outer.path().join("etc"))
        .map_err(|e| e.to_string())?
        .count();
    if etc != 1 {
        return Err(format!(
            "the layer added {} files beside the root's",
            etc - 1
        ));
    }
    for (file, want) in [("etc/passwd", &b"host"[..]), ("secret", &b"s"[..])] {
        let path = outer.path().join(file);
        let meta = fs::symlink_metadata(&path).map_err(|e| format!("{file}: {e}"))?;
        if !meta.is_file() || meta.nlink() != 1 || fs::read(&path).ok().as_deref() != Some(want) {
            return Err(format!(
                "the layer changed or linked {file} outside its root"
            ));
        }
    }
    Ok(())
}
