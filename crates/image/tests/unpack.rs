//! Layer application: whiteouts, opaque directories, hardlinks and hostile paths.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use moat_image::unpack::Unpacker;
use moat_testkit::LayerBuilder;

fn apply(root: &Path, layers: &[Vec<u8>]) -> moat_image::Result<()> {
    let mut u = Unpacker::new(root);
    for (i, l) in layers.iter().enumerate() {
        u.apply_layer(l.as_slice(), &format!("layer{i}"))?;
    }
    u.finish()
}

#[test]
fn whiteouts_and_opaque_dirs_across_layers() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    fs::create_dir(&root).unwrap();
    let l1 = LayerBuilder::new()
        .dir("etc/", 0o755)
        .file("etc/keep", b"1", 0o644)
        .file("etc/gone", b"1", 0o644)
        .dir("opq/", 0o755)
        .file("opq/old", b"old", 0o644)
        .dir("opq/sub/", 0o755)
        .file("opq/sub/deep", b"x", 0o644)
        .dir("dir/", 0o755)
        .file("dir/a", b"a", 0o644)
        .finish();
    let l2 = LayerBuilder::new()
        .whiteout("etc/gone")
        .file("opq/new", b"new", 0o600)
        .opaque("opq")
        .whiteout("dir")
        .file("etc/added", b"2", 0o640)
        .finish();
    let l3 = LayerBuilder::new()
        .dir("dir/", 0o700)
        .file("dir/b", b"b", 0o644)
        .finish();
    apply(&root, &[l1, l2, l3]).unwrap();
    assert!(root.join("etc/keep").is_file());
    assert!(!root.join("etc/gone").exists());
    assert!(!root.join("etc/.wh.gone").exists());
    assert_eq!(fs::read(root.join("opq/new")).unwrap(), b"new");
    assert!(
        !root.join("opq/old").exists(),
        "opaque dir keeps lower content"
    );
    assert!(
        !root.join("opq/sub").exists(),
        "opaque dir keeps lower subdirs"
    );
    assert!(!root.join("opq/.wh..wh..opq").exists());
    assert!(!root.join("dir/a").exists(), "whited-out dir came back");
    assert!(root.join("dir/b").is_file());
    assert_eq!(
        fs::metadata(root.join("dir")).unwrap().permissions().mode() & 0o7777,
        0o700
    );
    assert_eq!(
        fs::metadata(root.join("etc/added"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o640
    );
    assert_eq!(
        fs::metadata(root.join("etc/keep")).unwrap().mtime(),
        1_700_000_000
    );
}

#[test]
fn hardlinks_symlinks_fifos_and_modes() {
    let d = tempfile::tempdir().unwrap();
    let l = LayerBuilder::new()
        .file("bin/tool", b"#!x", 0o4755)
        .hardlink("bin/alias", "bin/tool")
        .hardlink("./bin/alias2", "/bin/tool")
        .symlink("bin/link", "tool")
        .fifo("run/fifo")
        .dir("tmp/", 0o1777)
        .finish();
    apply(d.path(), &[l]).unwrap();
    let a = fs::metadata(d.path().join("bin/tool")).unwrap();
    let b = fs::metadata(d.path().join("bin/alias")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 3);
    assert_eq!(a.mode() & 0o7777, 0o4755, "setuid bit kept");
    assert_eq!(
        fs::read_link(d.path().join("bin/link")).unwrap(),
        Path::new("tool")
    );
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::symlink_metadata(d.path().join("run/fifo"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(
        fs::metadata(d.path().join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
}

#[test]
fn hostile_paths_stay_inside_the_root() {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    fs::create_dir(&root).unwrap();
    // Something outside the root the layer will try to reach.
    fs::create_dir_all(outer.path().join("etc")).unwrap();
    fs::write(outer.path().join("etc/passwd"), b"host").unwrap();
    let l1 = LayerBuilder::new()
        .file("../../etc/x", b"dotdot", 0o644)
        .file("/abs/y", b"abs", 0o644)
        .symlink("a", "/")
        .file("a/etc/passwd", b"via-abs-link", 0o644)
        .symlink("up", "../..")
        .file("up/etc/passwd2", b"via-rel-link", 0o644)
        .dir("d/", 0o755)
        .symlink("d/rel", "../../../..")
        .file("d/rel/z", b"z", 0o644)
        .finish();
    // A later layer replaces the symlink target itself (must not write through the link).
    let l2 = LayerBuilder::new()
        .symlink("passwd-link", "/etc/passwd")
        .file("passwd-link", b"replaced", 0o644)
        .finish();
    apply(&root, &[l1, l2]).unwrap();
    assert_eq!(
        fs::read(outer.path().join("etc/passwd")).unwrap(),
        b"host",
        "host file touched"
    );
    assert!(!outer.path().join("etc/x").exists());
    assert!(!outer.path().join("etc/passwd2").exists());
    assert!(!outer.path().join("z").exists());
    assert_eq!(fs::read(root.join("etc/x")).unwrap(), b"dotdot");
    assert_eq!(fs::read(root.join("abs/y")).unwrap(), b"abs");
    assert_eq!(fs::read(root.join("etc/passwd")).unwrap(), b"via-abs-link");
    assert_eq!(fs::read(root.join("etc/passwd2")).unwrap(), b"via-rel-link");
    assert_eq!(fs::read(root.join("z")).unwrap(), b"z");
    assert_eq!(fs::read(root.join("passwd-link")).unwrap(), b"replaced");
    assert!(fs::symlink_metadata(root.join("a"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn hardlink_to_outside_is_rejected_or_clamped() {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    fs::create_dir(&root).unwrap();
    fs::write(outer.path().join("secret"), b"s").unwrap();
    let l = LayerBuilder::new()
        .symlink("a", "/")
        .hardlink("x", "../secret")
        .finish();
    // "../secret" is clamped to "/secret" inside the root, which does not exist.
    let err = apply(&root, &[l]).unwrap_err();
    assert!(err.to_string().contains("hardlink target"), "{err}");
    assert_eq!(
        fs::metadata(outer.path().join("secret")).unwrap().nlink(),
        1
    );
}

#[test]
fn corrupt_tar_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let mut l = LayerBuilder::new().file("a", b"aaaa", 0o644).finish();
    l[148] ^= 0xff; // header checksum
    let err = apply(d.path(), &[l]).unwrap_err();
    assert!(
        matches!(err, moat_image::Error::CorruptLayer { .. }),
        "{err}"
    );
}
