//! A guest that fills its disk, through the daemon with a real VM (tier xs, a 5 GiB disk):
//! the sandbox must stay usable (exec and downloads answer, its agent healthy), an upload must
//! fail with a clear 507 that leaves nothing behind, the upload must work again once space is
//! freed, and the host's disk must hold no more for the sandbox than its tier's disk size.
//!
//! Writing 5 GiB under TCG takes minutes (~35 MB/s measured), so the fill is cheap but real
//! for the host: `fallocate` reserves the free space (metadata only), then one 4 KiB block is
//! written in every 64 KiB of it, which makes QEMU allocate every qcow2 cluster (64 KiB) under
//! the reservation, i.e. the host's worst case, for a sixteenth of the writing; `dd` then takes
//! the last blocks, to ENOSPC.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Instant;

use common::daemon::{Daemon, ADMIN, G};
use serde_json::json;

const GROUP: &str = "full";
const GIB: u64 = 1 << 30;
/// The xs tier's disk (`Tier::Xs.disk_bytes()`).
const DISK: u64 = 5 * GIB;
/// What qcow2 keeps beside the data for a 5 GiB disk: L1/L2 and refcount tables are well
/// under 2 MiB at 64 KiB clusters; the rest is slack.
const QCOW2_METADATA: u64 = 64 << 20;

/// Fills the guest's root filesystem as described at the top; prints what it did.
const FILL: &str = r#"set -e
bs=$(stat -f -c %S /)
free=$(stat -f -c %f /)
# Leave 16 MiB for dd, so that the last bytes are written for real.
fallocate -l $(( (free - 4096) * bs )) /fill
python3 -c '
import os
fd = os.open("/fill", os.O_WRONLY)
block = b"x" * 4096
for off in range(0, os.fstat(fd).st_size, 65536):
    os.pwrite(fd, block, off)
os.fsync(fd)
'
dd if=/dev/zero of=/fill.tail bs=64k 2>/dev/null && exit 3
sync
echo "free blocks: $(stat -f -c %f /)""#;

/// Bytes the host stores for the sandbox's disk overlay.
fn overlay_bytes(d: &Daemon, id: &str) -> u64 {
    let disk = d.home.path().join("run").join(id).join("disk.qcow2");
    std::fs::metadata(&disk).expect("the overlay").blocks() * 512
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_guest_disk_is_a_clear_507_and_recovers() {
    let d = Daemon::start_with_runtime(Some(ADMIN)).await;
    d.put_group(GROUP, json!({"tier": "xs"}), 201).await;
    let id = d.new_sandbox(GROUP).await;
    let before = overlay_bytes(&d, &id);

    let t = Instant::now();
    let out = d.sh(GROUP, &id, FILL).await;
    eprintln!("filled in {:?}: {out}", t.elapsed());
    let free: u64 = out
        .trim_start_matches("free blocks: ")
        .parse()
        .unwrap_or_else(|_| panic!("{out}"));
    // ext4 keeps a few blocks for its own metadata, which data never gets.
    assert!(free < 8192, "the disk is not full: {free} blocks free");

    // The host holds no more than the tier's disk, though the guest made it allocate nearly
    // all of it.
    let full = overlay_bytes(&d, &id);
    eprintln!("overlay: {before} bytes before the fill, {full} after");
    assert!(
        full > before + 3 * GIB,
        "the fill did not reach the host ({before} → {full} bytes): the bound is untested"
    );
    assert!(
        full <= DISK + QCOW2_METADATA,
        "the overlay grew to {full} bytes, past the {DISK}-byte disk"
    );

    // The sandbox still answers, and an upload is refused with what went wrong.
    assert_eq!(d.sh(GROUP, &id, "echo alive").await, "alive");
    let up = format!("{G}/{GROUP}/sandboxes/{id}/files?path=/root/up.bin");
    let payload = vec![b'u'; 1 << 20];
    let (st, r) = d
        .call_raw(Some(ADMIN), "PUT", &up, Some(payload.clone()))
        .await;
    assert_eq!(st, 507, "{r}");
    assert_eq!(r["error"]["code"], "no_space", "{r}");
    let m = r["error"]["message"].as_str().unwrap();
    assert!(m.contains("/root/up.bin") && m.contains("space"), "{m}");
    // Reading needs no space: a download works.
    let (st, r) = d
        .call_raw(
            Some(ADMIN),
            "GET",
            &format!("{G}/{GROUP}/sandboxes/{id}/files?path=/etc/os-release"),
            None,
        )
        .await;
    assert_eq!(st, 200, "{r}");
    assert!(r.as_str().unwrap().contains("NAME="), "{r}");
    // Nothing half-written is left: neither the file nor the agent's temporary one.
    assert_eq!(
        d.sh(GROUP, &id, "ls -A /root | grep -c up.bin || true")
            .await,
        "0"
    );
    let sb = d.get(GROUP, &id).await.unwrap();
    assert_eq!(sb["state"], "running", "{sb}");
    assert_eq!(sb["health"], json!({"agent": "ok"}), "{sb}");

    // Space freed: the same upload works, and reads back whole.
    d.sh(GROUP, &id, "rm /fill /fill.tail && sync").await;
    let (st, r) = d.call_raw(Some(ADMIN), "PUT", &up, Some(payload)).await;
    assert_eq!(st, 201, "{r}");
    assert_eq!(r["size"], 1 << 20, "{r}");
    let (st, r) = d.call_raw(Some(ADMIN), "GET", &up, None).await;
    assert_eq!(st, 200);
    assert_eq!(r.as_str().unwrap(), "u".repeat(1 << 20));

    let after = overlay_bytes(&d, &id);
    assert!(after <= DISK + QCOW2_METADATA, "{after} bytes");
    d.delete(GROUP, &id).await;
}
