//! Template RAM shared copy-on-write (issue 10): clones of one template map one sealed copy of
//! its RAM, never see each other's writes, and keep their memory intact however hard another
//! clone tries to write, free or discard memory; a template's RAM counts as in use while a
//! QEMU maps it.

mod common;

use std::io::Read;
use std::path::Path;

use common::{runtime, sh, unique};
use moat_vm::Sandbox;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The template's key: its directory's name, which names its RAM memfd.
fn key(template: &Path) -> String {
    template.file_name().unwrap().to_string_lossy().into_owned()
}

/// The memfd of template RAM this test process holds (the runtime's per-process copy), read
/// through `/proc/self/fd` and hashed.
fn sealed_ram_digest(key: &str) -> u64 {
    use std::hash::Hasher;
    let want = format!("/memfd:moat-template-ram:{key} (deleted)");
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target.to_string_lossy() != want {
            continue;
        }
        let mut f = std::fs::File::open(e.path()).unwrap();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                return h.finish();
            }
            h.write(&buf[..n]);
        }
    }
    panic!("this process holds no memfd {want}");
}

/// Whether QEMU `pid` maps the template RAM of `key`.
fn maps_template(pid: u32, key: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .contains(&format!("/memfd:moat-template-ram:{key} "))
}

/// Whether transparent huge pages are on for process `pid` (`THP_enabled` of its status).
fn thp_enabled(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .expect("THP_enabled in /proc/<pid>/status (Linux >= 5.0)");
    line.trim() == "1"
}

/// What a hostile clone can do to memory from inside: fill and free anonymous and shared
/// memory, `madvise(MADV_DONTNEED)` and `madvise(MADV_REMOVE)`, fill tmpfs, drop every cache,
/// compact. None of it may reach the template or another clone.
const WORST: &str = r#"
import mmap, os
size = 512 << 20
for flags in (mmap.MAP_PRIVATE, mmap.MAP_SHARED):
    m = mmap.mmap(-1, size, flags=flags | mmap.MAP_ANONYMOUS)
    for off in range(0, size, 4096):
        m[off:off + 8] = b'\xa5' * 8
    m.madvise(mmap.MADV_DONTNEED)
    if flags == mmap.MAP_SHARED:
        m.madvise(mmap.MADV_REMOVE)
    m.close()
with open('/dev/shm/fill', 'wb') as f:
    chunk = b'\x5a' * (1 << 20)
    for _ in range(384):
        f.write(chunk)
os.remove('/dev/shm/fill')
for knob, value in (('drop_caches', '3'), ('compact_memory', '1')):
    with open('/proc/sys/vm/' + knob, 'w') as f:
        f.write(value)
print('done')
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_share_template_ram_and_survive_each_others_worst() {
    let rt = runtime();
    let template = common::base_template(&rt).await;
    let key = key(&template);
    let (ida, idb) = (unique("dens-a"), unique("dens-b"));
    let (a, b) = tokio::join!(
        Sandbox::restore(&rt, &ida, &template),
        Sandbox::restore(&rt, &idb, &template)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    // Both map the one sealed copy; the save left RAM out of the state stream.
    assert!(maps_template(a.qemu_pid(), &key));
    assert!(maps_template(b.qemu_pid(), &key));
    assert!(moat_vm::ram::mapped_by_a_qemu(&key));
    let meta = moat_vm::SnapshotMeta::load(&template).unwrap();
    assert!(meta.shared_ram_bytes.is_some());
    assert!(
        meta.memory_bytes < 1 << 20,
        "a template's state stream holds RAM: {} bytes",
        meta.memory_bytes
    );
    // Under TCG a clone's QEMU runs without transparent huge pages: 2 MiB less private
    // memory per idle clone (`qemu::args::huge_pages` in moat-vm, docs/SNAPSHOTS.md).
    if meta.accel == "tcg" {
        assert!(!thp_enabled(a.qemu_pid()), "clone A's QEMU has huge pages");
        assert!(!thp_enabled(b.qemu_pid()), "clone B's QEMU has huge pages");
    }
    let before = sealed_ram_digest(&key);

    // Each clone's writes are its own.
    let put = "head -c 33554432 /dev/urandom > /dev/shm/mine && md5sum < /dev/shm/mine";
    let (ma, mb) = (sh(&a, put).await.stdout, sh(&b, put).await.stdout);
    assert_ne!(ma, mb);
    assert_eq!(sh(&a, "md5sum < /dev/shm/mine").await.stdout, ma);

    // A does its worst; B's memory and the template stay as they were.
    let worst = a
        .agent()
        .exec_output(common::req(&["python3", "-c", WORST]), 1 << 20)
        .await
        .unwrap();
    assert_eq!(
        text(&worst.stdout).trim(),
        "done",
        "{}",
        text(&worst.stderr)
    );
    assert_eq!(sh(&b, "md5sum < /dev/shm/mine").await.stdout, mb);
    assert_eq!(text(&sh(&b, "echo alive").await.stdout), "alive\n");
    assert_eq!(
        sealed_ram_digest(&key),
        before,
        "the sealed template RAM changed"
    );
    // No discard reached QEMU as a hole punch that went through (it would fail and log).
    let log = std::fs::read_to_string(a.run_dir().join("qemu.log")).unwrap_or_default();
    assert!(!log.contains("fallocate"), "{log}");

    // A clone restored afterwards starts from the intact template.
    let c = Sandbox::restore(&rt, &unique("dens-c"), &template)
        .await
        .unwrap();
    assert_eq!(sh(&c, "test -e /dev/shm/mine").await.status.code, Some(1));
    assert_eq!(text(&sh(&c, "echo fresh").await.stdout), "fresh\n");

    // The template's RAM is in use exactly as long as a QEMU maps it.
    a.destroy().await;
    b.destroy().await;
    assert!(moat_vm::ram::mapped_by_a_qemu(&key));
    c.destroy().await;
    assert!(!moat_vm::ram::mapped_by_a_qemu(&key));
}
