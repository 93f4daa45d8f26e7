//! Suspend and resume: a suspended sandbox is a directory (memory, a flattened disk) and no
//! process; a resume continues its processes. Real QEMU, the base image's template.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{counter, counter_passes, images, qemu_processes, runtime, sh, unique};
use moat_vm::{snapshot, template, LaunchOptions, Sandbox, Tier};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_string()
}

/// The images of `disk`'s backing chain, top first.
fn backing_chain(disk: &Path) -> Vec<PathBuf> {
    let out = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(disk)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| PathBuf::from(i["filename"].as_str().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_and_files_survive_three_suspend_resume_cycles() {
    let rt = runtime();
    let image = images()
        .resolve("base")
        .expect("base image: run `moat setup`");
    let tpl = template::ensure(&rt, &image.digest, &image.rootfs, Tier::M)
        .await
        .expect("template");
    let id = unique("suspend");
    let mut sb = Sandbox::restore(&rt, &id, &tpl.dir).await.unwrap();
    let base = std::fs::canonicalize(tpl.dir.join("disk.qcow2")).unwrap();
    assert_eq!(sb.shared_base().path, base);

    sh(&sb, "echo 0 > /root/file0").await;
    let bg = text(
        &sh(&sb, &format!("{} echo $!", common::COUNTER))
            .await
            .stdout,
    );
    counter_passes(&sb, 0).await;
    // 4 MiB of random bytes in guest memory (tmpfs): pages the template does not have.
    sh(&sb, "head -c 4194304 /dev/urandom > /run/blob").await;
    let blob = text(&sh(&sb, "sha256sum /run/blob").await.stdout);
    assert!(blob.contains("/run/blob"), "{blob}");
    let template_ram = snapshot::SnapshotMeta::load(&tpl.dir)
        .unwrap()
        .shared_ram_bytes
        .expect("a template with shared RAM");

    let store = tempfile::tempdir_in(common::home()).unwrap();
    let mut previous: Option<PathBuf> = None;
    for cycle in 1..=3u32 {
        sh(&sb, &format!("echo {cycle} > /root/file{cycle}")).await;
        let before = counter(&sb).await;
        let dest = store.path().join(format!("suspended-{cycle}"));

        let started = Instant::now();
        let meta = sb.suspend(&rt, &dest).await.expect("suspend");
        let suspend_ms = started.elapsed().as_millis();

        // Suspended: a directory and no process.
        assert!(qemu_processes(&id).is_empty(), "QEMU still running");
        assert!(!rt.run_root().join(&id).exists());
        assert_eq!(meta.shared_base.as_ref().unwrap().path, base);
        // Only what differs from the template: the blob and what the guest wrote.
        assert_eq!(
            meta.ram_base.as_deref(),
            Some(std::fs::canonicalize(&tpl.dir).unwrap().as_path())
        );
        assert!(
            meta.memory_bytes < template_ram / 2,
            "memory image {} bytes, template RAM {template_ram}",
            meta.memory_bytes
        );
        let chain = backing_chain(&dest.join("disk.qcow2"));
        assert!(chain.len() <= 3, "backing chain grew: {chain:?}");
        assert_eq!(chain[1], base, "{chain:?}");
        let disk_bytes = std::fs::metadata(dest.join("disk.qcow2")).unwrap().len();
        // The previous suspend is no longer anyone's backing file.
        if let Some(p) = previous.take() {
            std::fs::remove_dir_all(p).unwrap();
        }

        let started = Instant::now();
        sb = Sandbox::resume(&rt, &id, &dest, LaunchOptions::default())
            .await
            .expect("resume");
        let resume_ms = started.elapsed().as_millis();
        let freed = snapshot::discard_memory(&dest).unwrap();
        assert!(freed > 0);
        assert_eq!(sb.shared_base().path, base);
        eprintln!(
            "cycle {cycle}: suspend {suspend_ms} ms (save {} ms), resume {resume_ms} ms, \
             memory {} MiB, disk layer {} KiB",
            meta.save_ms,
            meta.memory_bytes >> 20,
            disk_bytes >> 10
        );

        // Every file, the same background process, and it keeps counting.
        for i in 0..=cycle {
            let got = text(&sh(&sb, &format!("cat /root/file{i}")).await.stdout);
            assert_eq!(got, i.to_string(), "file{i} after cycle {cycle}");
        }
        let sum = text(&sh(&sb, "sha256sum /run/blob").await.stdout);
        assert_eq!(sum, blob, "/run/blob after cycle {cycle}");
        let alive = sh(&sb, &format!("kill -0 {bg} && echo alive")).await;
        assert_eq!(text(&alive.stdout), "alive");
        assert!(counter(&sb).await >= before);
        counter_passes(&sb, before).await;
        previous = Some(dest);
    }
    // A plain snapshot is not a suspended sandbox: resuming it is refused.
    assert!(
        Sandbox::resume(&rt, &unique("nope"), &tpl.dir, LaunchOptions::default())
            .await
            .is_err()
    );
    sb.destroy().await;
    assert!(qemu_processes(&id).is_empty());
}
