//! End-to-end imports through a real registry (docker-registry), OCI layouts and docker archives.

use std::fs;
use std::process::Command;

use moat_image::{Compression, Error, ImageStore, ImportOptions, NoProgress, Reference, Source};
use moat_testkit::{
    busybox_layer, test_config, write_docker_archive, write_oci_layout, ArchiveForm, LayerBuilder,
    Registry,
};

/// Plain HTTP and an empty Docker config (so the host's own config never leaks into tests).
fn plain() -> ImportOptions {
    // Written once per process: rewritten by every test, a concurrent import could read it
    // truncated (seen in CI as "not valid JSON: EOF").
    static EMPTY: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    let p = EMPTY.get_or_init(|| {
        let p = std::env::temp_dir().join(format!(
            "moat-test-empty-docker-config-{}.json",
            std::process::id()
        ));
        fs::write(&p, "{}").unwrap();
        p
    });
    ImportOptions {
        plain_http: true,
        docker_config: Some(p.clone()),
    }
}

fn debugfs_ls(img: &std::path::Path, dir: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("ls -l {dir}")])
        .arg(img)
        .output()
        .expect("debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn entries(store: &std::path::Path) -> usize {
    fs::read_dir(store.join("sha256")).unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_anonymous_by_tag_digest_and_not_found() {
    let reg = Registry::start(None);
    let layout = tempfile::tempdir().unwrap();
    let digest = write_oci_layout(
        layout.path(),
        &[busybox_layer()],
        Compression::Gzip,
        &test_config(),
        Some("v1"),
    );
    let r = Reference::parse(&format!("{}/test/busybox:v1", reg.addr())).unwrap();
    let opts = ImportOptions {
        plain_http: true,
        docker_config: None,
    };
    assert_eq!(
        moat_image::push_layout(layout.path(), &r, &opts)
            .await
            .unwrap(),
        digest
    );

    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).unwrap();
    let src = Source::parse(&format!("{}/test/busybox:v1", reg.addr())).unwrap();
    let img = store
        .import(&src, None, &plain(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(img.digest, digest);
    assert_eq!(
        img.name.as_deref(),
        Some(format!("{}/test/busybox:v1", reg.addr()).as_str())
    );
    assert_eq!(img.config.cmd, vec!["/bin/sh"]);
    assert!(img.rootfs.is_file());
    let ls = debugfs_ls(&img.rootfs, "/bin");
    assert!(ls.contains("busybox") && ls.contains(" sh"), "{ls}");
    assert!(debugfs_ls(&img.rootfs, "/").contains("tmp"));
    assert!(!home
        .path()
        .join("sha256")
        .join(&digest[7..])
        .join("rootfs")
        .exists());

    // By digest, with a name: same cache entry, fast.
    let t = std::time::Instant::now();
    let src = Source::parse(&format!("{}/test/busybox@{digest}", reg.addr())).unwrap();
    let img2 = store
        .import(&src, Some("bb"), &plain(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(img2.digest, digest);
    assert!(t.elapsed().as_secs_f64() < 2.0);
    assert_eq!(entries(home.path()), 1);
    assert_eq!(store.resolve("bb").unwrap().digest, digest);
    assert_eq!(store.resolve(&digest[..12]).unwrap().digest, digest);
    assert_eq!(store.list().unwrap().len(), 2);

    // Unknown tag and repo.
    let src = Source::parse(&format!("{}/test/busybox:nope", reg.addr())).unwrap();
    let err = store
        .import(&src, None, &plain(), &NoProgress)
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let src = Source::parse(&format!("{}/no/such:v1", reg.addr())).unwrap();
    assert!(store
        .import(&src, None, &plain(), &NoProgress)
        .await
        .unwrap_err()
        .is_not_found());
    assert!(store.resolve("nothing-here").unwrap_err().is_not_found());

    // Remove: the disk stays while a name refers to it (and `keep` is not asked then).
    store
        .remove_unless("bb", |_| panic!("asked about a disk that stays"))
        .unwrap();
    assert_eq!(entries(home.path()), 1);
    // The last name: `keep` may refuse, and then nothing is removed.
    let last = format!("{}/test/busybox:v1", reg.addr());
    let err = store
        .remove_unless(&last, |_| Ok(Some("a sandbox needs it".to_string())))
        .unwrap_err();
    assert!(
        err.is_in_use() && err.to_string().contains("a sandbox needs it"),
        "{err}"
    );
    assert_eq!(entries(home.path()), 1);
    store.resolve(&last).unwrap();
    store.remove(&last).unwrap();
    assert_eq!(entries(home.path()), 0);
    assert!(store.list().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_with_credentials_and_unreachable() {
    let reg = Registry::start(Some(("alice", "s3cret")));
    let cfgdir = tempfile::tempdir().unwrap();
    let cfg = cfgdir.path().join("config.json");
    fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"YWxpY2U6czNjcmV0"}}}}}}"#,
            reg.addr()
        ),
    )
    .unwrap();
    let opts = ImportOptions {
        plain_http: true,
        docker_config: Some(cfg.clone()),
    };
    let layout = tempfile::tempdir().unwrap();
    let digest = write_oci_layout(
        layout.path(),
        &[busybox_layer()],
        Compression::Zstd,
        &test_config(),
        None,
    );
    let r = Reference::parse(&format!("{}/private/bb:latest", reg.addr())).unwrap();
    moat_image::push_layout(layout.path(), &r, &opts)
        .await
        .unwrap();

    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).unwrap();
    let src = Source::Registry(r.clone());
    let img = store
        .import(&src, Some("private"), &opts, &NoProgress)
        .await
        .unwrap();
    assert_eq!(img.digest, digest);
    // Without credentials: a clear refusal.
    let err = store
        .import(&src, None, &plain(), &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    // Wrong password.
    fs::write(
        &cfg,
        format!(
            r#"{{"auths":{{"{}":{{"username":"alice","password":"no"}}}}}}"#,
            reg.addr()
        ),
    )
    .unwrap();
    let err = store
        .import(&src, None, &opts, &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err}");
    // Nothing listens on port 1.
    let src = Source::parse("127.0.0.1:1/x/y:z").unwrap();
    let err = store
        .import(&src, None, &plain(), &NoProgress)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_blob_is_a_digest_error_and_nothing_is_cached() {
    let layout = tempfile::tempdir().unwrap();
    let extra = LayerBuilder::new()
        .file("data/big", &vec![7u8; 100_000], 0o644)
        .finish();
    write_oci_layout(
        layout.path(),
        &[busybox_layer(), extra],
        Compression::Gzip,
        &test_config(),
        Some("t"),
    );
    let m: moat_image::spec::Index =
        serde_json::from_slice(&fs::read(layout.path().join("index.json")).unwrap()).unwrap();
    let man: moat_image::spec::Manifest = serde_json::from_slice(
        &fs::read(moat_image::layout::blob_path(
            layout.path(),
            &m.manifests[0].digest,
        ))
        .unwrap(),
    )
    .unwrap();
    let blob = moat_image::layout::blob_path(layout.path(), &man.layers[1].digest);
    let mut b = fs::read(&blob).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 1;
    fs::write(&blob, b).unwrap();
    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).unwrap();
    let src = Source::parse(&format!("oci:{}:t", layout.path().display())).unwrap();
    let err = store
        .import(&src, None, &plain(), &NoProgress)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&man.layers[1].digest), "{err}");
    assert_eq!(entries(home.path()), 0);
    assert_eq!(fs::read_dir(home.path().join("tmp")).unwrap().count(), 0);
    assert!(store.list().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_layout_with_whiteouts_builds_the_disk() {
    let l2 = LayerBuilder::new()
        .whiteout("etc/group")
        .opaque("home")
        .file("home/new", b"n", 0o644)
        .finish();
    let l3 = LayerBuilder::new()
        .whiteout("bin/cat")
        .file("etc/motd", b"hi", 0o644)
        .finish();
    let layout = tempfile::tempdir().unwrap();
    let digest = write_oci_layout(
        layout.path(),
        &[busybox_layer(), l2, l3],
        Compression::None,
        &test_config(),
        None,
    );
    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).unwrap();
    let src = Source::parse(&format!("oci:{}", layout.path().display())).unwrap();
    let img = store
        .import(&src, Some("wh"), &plain(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(img.digest, digest);
    let etc = debugfs_ls(&img.rootfs, "/etc");
    assert!(
        etc.contains("passwd") && etc.contains("motd") && !etc.contains("group"),
        "{etc}"
    );
    let homels = debugfs_ls(&img.rootfs, "/home");
    assert!(
        homels.contains("new") && !homels.contains(" app"),
        "{homels}"
    );
    assert!(!debugfs_ls(&img.rootfs, "/bin").contains(" cat "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_archive_both_forms_and_same_digest() {
    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).unwrap();
    let layers = vec![
        busybox_layer(),
        LayerBuilder::new().file("hello", b"hi", 0o644).finish(),
    ];
    let mut digests = Vec::new();
    for form in [ArchiveForm::Legacy, ArchiveForm::Blobs] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img.tar");
        write_docker_archive(&p, &layers, &test_config(), "saved:v1", form);
        let src = Source::parse(&format!("docker-archive:{}", p.display())).unwrap();
        let img = store
            .import(&src, None, &plain(), &NoProgress)
            .await
            .unwrap();
        assert_eq!(img.name.as_deref(), Some("saved:v1"));
        assert!(debugfs_ls(&img.rootfs, "/").contains("hello"));
        digests.push(img.digest);
    }
    assert_eq!(
        digests[0], digests[1],
        "same content, same synthesised digest"
    );
    assert_eq!(entries(home.path()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_imports_share_one_entry() {
    let layout = tempfile::tempdir().unwrap();
    let digest = write_oci_layout(
        layout.path(),
        &[busybox_layer()],
        Compression::Gzip,
        &test_config(),
        None,
    );
    let home = tempfile::tempdir().unwrap();
    let src = Source::parse(&format!("oci:{}", layout.path().display())).unwrap();
    let tasks: Vec<_> = ["one", "two"]
        .into_iter()
        .map(|n| {
            let (src, root) = (src.clone(), home.path().to_path_buf());
            tokio::spawn(async move {
                let store = ImageStore::open(&root).unwrap();
                store.import(&src, Some(n), &plain(), &NoProgress).await
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().digest, digest);
    }
    assert_eq!(entries(home.path()), 1);
    let store = ImageStore::open(home.path()).unwrap();
    assert_eq!(store.list().unwrap().len(), 2);
}

/// A process killed mid-import (the daemon under `kill -9`) leaves its build in `tmp/`: the
/// next open removes it, but not the build of a live import (its digest's lock is held).
#[test]
fn open_removes_the_builds_of_dead_imports_only() {
    let home = tempfile::tempdir().unwrap();
    ImageStore::open(home.path()).unwrap();
    let (dead, live) = ("a".repeat(64), "b".repeat(64));
    let tmp = home.path().join("tmp");
    for hex in [&dead, &live] {
        fs::create_dir_all(tmp.join(format!("{hex}.4242.17/rootfs/etc"))).unwrap();
    }
    let lock = fs::File::create(home.path().join(format!("locks/{live}.lock"))).unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
    ImageStore::open(home.path()).unwrap();
    let left: Vec<_> = fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec![format!("{live}.4242.17")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_platform_and_media_type_and_bad_names() {
    let layout = tempfile::tempdir().unwrap();
    let mut w = moat_image::layout::LayoutWriter::create(layout.path()).unwrap();
    w.add_layer(&busybox_layer(), Compression::Gzip).unwrap();
    w.finish_platform(&test_config(), None, "linux", "arm64")
        .unwrap();
    let mut w = moat_image::layout::LayoutWriter::create(layout.path()).unwrap();
    w.add_layer(&busybox_layer(), Compression::Gzip).unwrap();
    w.finish_platform(&test_config(), None, "linux", "s390x")
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).unwrap();
    let src = Source::parse(&format!("oci:{}", layout.path().display())).unwrap();
    let err = store
        .import(&src, None, &plain(), &NoProgress)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("unsupported platform") && err.to_string().contains("linux/arm64"),
        "{err}"
    );

    let layout = tempfile::tempdir().unwrap();
    let mut w = moat_image::layout::LayoutWriter::create(layout.path()).unwrap();
    w.add_raw_layer(
        b"xx",
        "application/vnd.example.layer.v1+bz2",
        &moat_image::digest::sha256(b"xx"),
    )
    .unwrap();
    w.finish(&test_config(), None).unwrap();
    let src = Source::parse(&format!("oci:{}", layout.path().display())).unwrap();
    let err = store
        .import(&src, None, &plain(), &NoProgress)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unsupported media type"), "{err}");

    for bad in ["", "-x", "a b", "a/../b", "sha256:abc", "x%y"] {
        let err = store
            .import(&src, Some(bad), &plain(), &NoProgress)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::InvalidName { .. }), "{bad}: {err}");
    }
}
