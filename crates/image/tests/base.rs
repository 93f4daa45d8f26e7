//! Builds the real base image with mmdebstrap (needs root and the Debian mirror, ~30-60 s).

use moat_image::{ImageStore, ImportOptions, NoProgress, Source};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_and_imports_the_base_image() {
    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("base");
    moat_image::build_base_image(&layout).unwrap();
    let home = tempfile::tempdir().unwrap();
    let store = ImageStore::open(home.path()).unwrap();
    let src = Source::parse(&format!("oci:{}:latest", layout.display())).unwrap();
    let img = store
        .import(&src, Some("base"), &ImportOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(img.config.cmd, vec!["/bin/sh"]);
    assert_eq!(img.config.working_dir.as_deref(), Some("/"));
    let out = std::process::Command::new("debugfs")
        .args(["-R", "ls -l /usr/bin"])
        .arg(&img.rootfs)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("python3"));
}
