//! End-to-end image tests through the `moat` binary: a real registry on loopback, an OCI layout
//! and a `docker save` archive, each imported and then run in a real VM, where the layers'
//! whiteouts and the image config must show.

mod common;

use std::path::Path;
use std::process::Output;

use common::{moat, unique};
use moat_image::{Compression, ImageConfig};
use moat_testkit::{
    busybox_layer, write_docker_archive, write_oci_layout, ArchiveForm, LayerBuilder, Registry,
};

fn layers() -> Vec<Vec<u8>> {
    let base = busybox_layer();
    let l2 = LayerBuilder::new()
        .dir("data/", 0o755)
        .file("data/keep", b"kept", 0o644)
        .file("data/gone", b"x", 0o644)
        .dir("data/dir/", 0o755)
        .file("data/dir/old", b"old", 0o644)
        .finish();
    let l3 = LayerBuilder::new()
        .whiteout("data/gone")
        .opaque("data/dir/")
        .file("data/dir/new", b"new", 0o644)
        .finish();
    vec![base, l2, l3]
}

fn config() -> ImageConfig {
    ImageConfig {
        env: vec!["PATH=/bin".into(), "FROM_IMAGE=yes".into()],
        working_dir: Some("/data".into()),
        user: Some("app".into()),
        entrypoint: vec![],
        cmd: vec!["/bin/sh".into()],
    }
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Imports `source` under a fresh name, checks the printed digest, and runs the checks in a VM.
fn import_and_check(source: &str, extra: &[&str], digest: &str) -> String {
    let name = unique("img");
    let o = moat()
        .args(["image", "import", source, "--name", &name])
        .args(extra)
        .env("DOCKER_CONFIG", empty_docker_config())
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "import {source}: {err}");
    assert_eq!(out.trim(), digest);

    let o = moat()
        .args([
            "run",
            &name,
            "--",
            "sh",
            "-c",
            "ls /data; ls /data/dir; echo $FROM_IMAGE; pwd; id -un",
        ])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(out, "dir\nkeep\nnew\nyes\n/data\napp\n", "{err}");
    name
}

fn empty_docker_config() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("moat-e2e-docker-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    dir
}

fn rm(name: &str) {
    let o = moat().args(["image", "rm", name]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_oci_layout_and_docker_archive() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let digest = write_oci_layout(&layout, &layers(), Compression::Gzip, &config(), Some("v1"));

    // A real registry on loopback, fed by our own push.
    let reg = Registry::start(None);
    let (reference, pushed) = reg.push(&layout, "e2e/whiteouts:v1").await;
    assert_eq!(pushed, digest);
    let from_registry = import_and_check(&reference, &["--plain-http"], &digest);
    // Without --plain-http the registry is spoken to over HTTPS, which it does not serve.
    let o = moat()
        .args(["image", "import", &reference, "--name", &unique("tls")])
        .env("DOCKER_CONFIG", empty_docker_config())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));

    let from_layout = import_and_check(&format!("oci:{}", layout.display()), &[], &digest);

    let archive = dir.path().join("image.tar");
    write_docker_archive(
        &archive,
        &layers(),
        &config(),
        "e2e/whiteouts:v1",
        ArchiveForm::Blobs,
    );
    let archive_name = import_and_check(
        &format!("docker-archive:{}", archive.display()),
        &[],
        &archive_digest(&archive),
    );

    // ls shows them; rm removes them; a removed image cannot run.
    let o = moat().args(["image", "ls", "--json"]).output().unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    for n in [&from_registry, &from_layout, &archive_name] {
        assert!(names.contains(&n.as_str()), "{n} not in {names:?}");
        rm(n);
    }
    let o = moat()
        .args(["run", &from_layout, "--", "true"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o).1.contains(&from_layout));
}

/// The digest moat computes for an archive: import it once into a scratch store.
fn archive_digest(archive: &Path) -> String {
    let home = tempfile::tempdir().unwrap();
    let o = moat()
        .env("MOAT_HOME", home.path())
        .args([
            "image",
            "import",
            &format!("docker-archive:{}", archive.display()),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    text(&o).0.trim().to_string()
}

#[test]
fn tampered_layout_is_refused_and_nothing_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    write_oci_layout(&layout, &layers(), Compression::Gzip, &config(), Some("v1"));
    // Flip one byte in the largest blob (the busybox layer).
    let blobs = layout.join("blobs/sha256");
    let biggest = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .max_by_key(|e| e.metadata().unwrap().len())
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&biggest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&biggest, bytes).unwrap();
    let home = tempfile::tempdir().unwrap();
    let o = moat()
        .env("MOAT_HOME", home.path())
        .args(["image", "import", &format!("oci:{}", layout.display())])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(125));
    assert!(text(&o).1.contains("digest"), "{}", text(&o).1);
    let o = moat()
        .env("MOAT_HOME", home.path())
        .args(["image", "ls", "--json"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
}

/// An image no earlier run has seen, so its template does not exist yet.
fn fresh_image() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let marker = unique("marker");
    let mut l = layers();
    l.push(
        LayerBuilder::new()
            .file("marker", marker.as_bytes(), 0o644)
            .finish(),
    );
    write_oci_layout(&layout, &l, Compression::Gzip, &config(), Some("v1"));
    let name = unique("fresh");
    let o = moat()
        .args([
            "image",
            "import",
            &format!("oci:{}", layout.display()),
            "--name",
            &name,
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    (dir, name)
}

fn templates_of(digest_name: &str) -> usize {
    let o = moat().args(["image", "ls", "--json"]).output().unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let digest = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == digest_name)
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::read_dir(common::home().join("templates"))
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_to_string(e.path().join("meta.json")).is_ok_and(|m| m.contains(&digest))
        })
        .count()
}

#[test]
fn concurrent_first_runs_build_one_template() {
    let (_dir, name) = fresh_image();
    let runs: Vec<_> = (0..3)
        .map(|i| {
            moat()
                .args([
                    "run",
                    &name,
                    "--",
                    "sh",
                    "-c",
                    &format!("cat /marker >/dev/null && echo {i}"),
                ])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in runs.into_iter().enumerate() {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success());
        assert_eq!(text(&o).0, format!("{i}\n"));
    }
    assert_eq!(templates_of(&name), 1);
    rm(&name);
}

#[test]
fn a_crash_during_the_template_build_leaves_nothing_half_built() {
    let (_dir, name) = fresh_image();
    let mut child = moat()
        .args(["run", &name, "--", "true"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Crash moat while its template VM boots. Other tests build templates at the same time,
    // so find *this* moat's QEMU (its child) and the run directory of its disk.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let building = loop {
        if let Some(disk) = common::qemu_children(child.id())
            .iter()
            .find_map(|cmd| cmd.split("id=root,file=").nth(1))
            .and_then(|rest| rest.split([',', ' ']).next())
        {
            let dir = std::path::Path::new(disk).parent().unwrap().to_path_buf();
            assert!(dir
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("template-"));
            break dir;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "template build never started"
        );
        std::thread::yield_now();
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(templates_of(&name), 0);
    // QEMU died with moat (its parent-death signal)...
    let disk = building.join("disk.qcow2").display().to_string();
    let gone = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !common::qemu_processes(&disk).is_empty() {
        assert!(std::time::Instant::now() < gone, "QEMU outlived its moat");
        std::thread::yield_now();
    }
    // ...and the next run cleans up after the crash and builds a good template.
    let o = moat()
        .args(["run", &name, "--", "cat", "/marker"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(templates_of(&name), 1);
    assert!(
        !building.exists(),
        "run directory of the crashed build is still there"
    );
    rm(&name);
}

#[test]
fn an_image_under_a_running_sandbox_is_not_removed() {
    use std::io::BufRead;
    let (_dir, name) = fresh_image();
    let mut run = moat()
        .args(["run", &name, "--", "sh", "-c", "echo up; exec sleep 120"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(run.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "up\n");

    let o = moat().args(["image", "rm", &name]).output().unwrap();
    assert!(!o.status.success());
    let err = text(&o).1;
    assert!(err.contains("still under the disk of a sandbox"), "{err}");

    // Once the sandbox is gone, the image goes.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    run.wait().unwrap();
    rm(&name);
}
