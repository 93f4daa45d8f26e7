//! End-to-end tests against real QEMU (TCG on CI hosts): kernel install, initramfs, boot,
//! guest panic, memory snapshot, restore and concurrent clones. The guest is busybox with a
//! shell `/init` that echoes lines on the `agent` port, standing in for the real agent.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use moat_vm::assets::{self, Kernel};
use moat_vm::qemu::{self, Vm, VmSpec};
use moat_vm::{accel, disk, Error, GuestRam, Incoming};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const ECHO_INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in /modules/*.ko; do $B insmod $m || echo "insmod $m failed"; done
port=
i=0
while [ -z "$port" ] && [ $i -lt 200 ]; do
  for p in /sys/class/virtio-ports/*; do
    if [ -e $p/name ] && [ "$($B cat $p/name)" = agent ]; then port=/dev/${p##*/}; fi
  done
  [ -z "$port" ] && $B usleep 10000
  i=$((i+1))
done
echo "agent port: $port"
exec 3<>$port
echo READY >&3
n=0
while true; do
  if read -r line <&3; then n=$((n+1)); echo "ECHO $line $n" >&3; else echo HELLO >&3; fi
done
"#;

const PANIC_INIT: &str = "#!/bin/busybox sh\necho init is leaving now\nexit 3\n";

fn home() -> PathBuf {
    std::env::var_os("MOAT_TEST_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/moat-test-home")
        })
}

/// Installs the kernel once per test process (the download is cached in the test home).
fn kernel() -> Kernel {
    static K: OnceLock<Mutex<Option<Kernel>>> = OnceLock::new();
    let m = K.get_or_init(|| Mutex::new(None));
    let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
    if g.is_none() {
        *g = Some(assets::install_kernel(&home()).expect("install kernel"));
    }
    g.clone().unwrap()
}

fn busybox_initramfs(kernel: &Kernel, init: &str, out: &Path) {
    let mut c = assets::base_cpio(kernel).unwrap();
    c.dir("/bin", 0o755)
        .file(
            "/bin/busybox",
            0o755,
            &std::fs::read("/bin/busybox").unwrap(),
        )
        .file("/init", 0o755, init.as_bytes());
    std::fs::write(out, c.finish_gz().unwrap()).unwrap();
}

fn base_disk() -> PathBuf {
    let p = home().join("test-base.raw");
    if !p.exists() {
        std::fs::create_dir_all(home()).unwrap();
        // Unique per caller: tests run in parallel threads of one process.
        let tmp = home().join(format!(
            "test-base.raw.{}.{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&tmp, vec![0u8; 1 << 20]).unwrap();
        std::fs::rename(tmp, &p).unwrap();
    }
    p
}

struct Fixture {
    dir: tempfile::TempDir,
    kernel: Kernel,
    initramfs: PathBuf,
}

fn fixture(init: &str) -> Fixture {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("moat_vm=debug")
        .with_test_writer()
        .try_init();
    let kernel = kernel();
    let dir = tempfile::Builder::new()
        .prefix("moat-vm-")
        .tempdir_in("/tmp")
        .unwrap();
    let initramfs = dir.path().join("initrd.img");
    busybox_initramfs(&kernel, init, &initramfs);
    Fixture {
        dir,
        kernel,
        initramfs,
    }
}

impl Fixture {
    fn spec(&self, name: &str, disk: &Path, incoming: Option<PathBuf>) -> VmSpec {
        VmSpec {
            accel: accel::detect(None).unwrap(),
            mem_mib: 256,
            cpus: 1,
            kernel: self.kernel.vmlinuz.clone(),
            initramfs: self.initramfs.clone(),
            disk: disk.to_path_buf(),
            run_dir: self.dir.path().join(name),
            incoming: incoming.map(|path| Incoming {
                path,
                ignore_shared: true,
            }),
            ram: GuestRam::Private,
            detached: false,
            millicores: 500,
            jail: moat_vm::jail::JailMode::from_env().unwrap(),
        }
    }
}

struct Agent(BufReader<UnixStream>);

impl Agent {
    async fn line(&mut self) -> String {
        let mut l = String::new();
        let n = self.0.read_line(&mut l).await.unwrap();
        assert!(n > 0, "agent port closed");
        l.trim_end().to_string()
    }

    /// Sends `word`, returns the echo counter, skipping reconnect HELLOs.
    async fn echo(&mut self, word: &str) -> u64 {
        self.0
            .get_mut()
            .write_all(format!("{word}\n").as_bytes())
            .await
            .unwrap();
        loop {
            let l = self.line().await;
            if let Some(rest) = l.strip_prefix(&format!("ECHO {word} ")) {
                return rest.parse().unwrap();
            }
            assert!(l == "HELLO" || l == "READY", "unexpected line {l:?}");
        }
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

async fn boot_ready(fx: &Fixture, name: &str, base: &Path) -> (Vm, Agent, Duration) {
    let ov = fx.dir.path().join(format!("{name}.qcow2"));
    disk::create_overlay(base, "raw", 64 << 20, &ov)
        .await
        .unwrap();
    let t = Instant::now();
    let mut vm = qemu::launch(&fx.spec(name, &ov, None)).await.unwrap();
    let mut agent = Agent(BufReader::new(
        vm.take_agent_stream(Duration::from_secs(5)).await.unwrap(),
    ));
    let first = vm
        .while_alive("waiting for READY", Duration::from_secs(90), agent.line())
        .await
        .unwrap();
    assert_eq!(first, "READY");
    (vm, agent, t.elapsed())
}

#[test]
fn kernel_install_and_initramfs() {
    let h = home();
    let k = kernel();
    assert!(k.vmlinuz.is_file());
    let t = Instant::now();
    let again = assets::install_kernel(&h).unwrap();
    assert_eq!(again, k);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "second install must not download"
    );
    assert_eq!(assets::installed_kernel(&h).unwrap(), k);

    let ihome = tempfile::tempdir().unwrap();
    let a = assets::build_initramfs(&k, Path::new("/bin/busybox"), ihome.path()).unwrap();
    assert!(a.path.starts_with(ihome.path().join("initramfs")));
    assert!(a.path.ends_with(format!("{}.img", a.sha256)));
    let mtime = std::fs::metadata(&a.path).unwrap().modified().unwrap();
    let b = assets::build_initramfs(&k, Path::new("/bin/busybox"), ihome.path()).unwrap();
    assert_eq!(a, b);
    assert_eq!(
        std::fs::metadata(&b.path).unwrap().modified().unwrap(),
        mtime,
        "rebuilt"
    );
    let list = initramfs_entries(&a.path);
    let names: Vec<&str> = list.iter().map(|e| e.name.as_str()).collect();
    for want in [
        "modules/00-virtio_ring.ko",
        "modules/04-virtio_console.ko",
        "newroot",
        "dev/console",
    ] {
        assert!(names.contains(&want), "{want} missing in {names:?}");
    }
    let init = list.iter().find(|e| e.name == "init").expect("no /init");
    assert_eq!(
        init.mode, 0o100755,
        "/init must be a regular executable file"
    );
    assert_eq!(
        init.size,
        std::fs::metadata("/bin/busybox").unwrap().len(),
        "/init is the agent given"
    );
    let console = list.iter().find(|e| e.name == "dev/console").unwrap();
    assert_eq!(
        (console.mode, console.rdev),
        (0o020600, (5, 1)),
        "/dev/console must be the character device 5,1"
    );

    let e = assets::build_initramfs(&k, Path::new("/bin/true"), ihome.path()).unwrap_err();
    assert!(matches!(e, Error::BadAgent { .. }));
    assert!(e.to_string().contains("crt-static"), "{e}");
}

/// One entry of a newc archive, as an independent reader (the `cpio` crate) sees it.
struct CpioEntry {
    name: String,
    mode: u32,
    rdev: (u32, u32),
    size: u64,
}

/// The entries of the gzip'd newc archive at `path`, read in-process: the test needs no
/// host `cpio` or `gzip`.
fn initramfs_entries(path: &Path) -> Vec<CpioEntry> {
    let file = std::fs::File::open(path).unwrap();
    let mut rest = std::io::BufReader::new(flate2::read::GzDecoder::new(file));
    let mut out = Vec::new();
    loop {
        let r = cpio::NewcReader::new(rest).unwrap();
        let e = r.entry();
        if e.is_trailer() {
            return out;
        }
        out.push(CpioEntry {
            name: e.name().to_string(),
            mode: e.mode(),
            rdev: (e.rdev_major(), e.rdev_minor()),
            size: e.file_size().into(),
        });
        rest = r.finish().unwrap();
    }
}

#[test]
fn qemu_version_is_reported() {
    let v = qemu::qemu_version().unwrap();
    assert!(v.starts_with("QEMU emulator version"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_save_resume() {
    let fx = fixture(ECHO_INIT);
    let (mut vm, mut agent, boot) = boot_ready(&fx, "boot", &base_disk()).await;
    eprintln!("TIMING cold boot to agent READY: {boot:?}");
    assert_eq!(agent.echo("ping").await, 1);
    let pid = vm.pid();
    assert!(alive(pid));

    let snap = fx.dir.path().join("mem.snap");
    let t = Instant::now();
    let bytes = vm.save_memory(&snap).await.unwrap();
    eprintln!("TIMING save_memory: {:?}, {bytes} bytes", t.elapsed());
    assert_eq!(bytes, std::fs::metadata(&snap).unwrap().len());
    assert!(bytes > 1 << 20);
    assert_eq!(vm.status().await.unwrap(), "postmigrate");
    vm.resume().await.unwrap();
    assert_eq!(vm.status().await.unwrap(), "running");
    assert_eq!(agent.echo("again").await, 2);

    // The VM runs in its jail's cgroup (a half-CPU quota here), which goes away with it.
    let cgroups = jail_cgroups(pid);
    assert!(!cgroups.is_empty(), "QEMU is in no jail cgroup");
    drop(vm);
    assert!(!alive(pid), "QEMU survived drop");
    for cg in cgroups {
        assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    }
}

/// The directories of the jail cgroups `pid` is in.
fn jail_cgroups(pid: u32) -> Vec<PathBuf> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    own.lines()
        .filter(|l| l.contains("/moat/jail-"))
        .map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, names, path) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
            let mount = if names.is_empty() {
                PathBuf::from("/sys/fs/cgroup")
            } else {
                Path::new("/sys/fs/cgroup").join(names.split(',').next().unwrap())
            };
            mount.join(path.trim_start_matches('/'))
        })
        .collect()
}

/// A `/proc/<pid>/status` field.
fn status_field(pid: u32, field: &str) -> String {
    moat_vm::qemu::status_field(pid, field)
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Two jailed VMs, read from the host: each QEMU runs as a uid of its own with no
/// capabilities, `no_new_privs` and a seccomp filter, in namespaces of its own and its
/// sandbox's cgroup with the tier's limits, and its root shows only what it needs: not the
/// other VM's disk, not MOAT_HOME, not the host's /etc or /root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_jailed() {
    let fx = fixture(ECHO_INIT);
    let base = base_disk();
    let (mut a, _agent_a, _) = boot_ready(&fx, "ja", &base).await;
    let (mut b, _agent_b, _) = boot_ready(&fx, "jb", &base).await;
    let me = std::process::id();
    let mut uids = Vec::new();
    for vm in [&a, &b] {
        let pid = vm.pid();
        let uid = status_field(pid, "Uid");
        let ids: Vec<&str> = uid.split_whitespace().collect();
        assert!(ids.iter().all(|i| *i == ids[0] && *i != "0"), "Uid: {uid}");
        let gid = status_field(pid, "Gid");
        assert!(gid.split_whitespace().all(|g| g != "0"), "Gid: {gid}");
        assert_eq!(status_field(pid, "Groups"), "", "supplementary groups");
        for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
        }
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        // Mode 2: filters (ours, then QEMU's own -sandbox).
        assert_eq!(status_field(pid, "Seccomp"), "2");
        assert!(status_field(pid, "Seccomp_filters").parse::<u32>().unwrap() >= 2);
        for ns in ["mnt", "pid", "ipc", "uts", "net"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
            let ours = std::fs::read_link(format!("/proc/{me}/ns/{ns}")).unwrap();
            assert_ne!(theirs, ours, "QEMU shares our {ns} namespace");
        }
        // QEMU is PID 1 of its namespace.
        assert_eq!(
            status_field(pid, "NSpid").split_whitespace().last(),
            Some("1")
        );
        let cgroups = jail_cgroups(pid);
        assert!(!cgroups.is_empty(), "QEMU is in no jail cgroup");
        for cg in &cgroups {
            for (file, want) in [
                ("memory.limit_in_bytes", ((256u64 + 512) << 20).to_string()),
                ("memory.max", ((256u64 + 512) << 20).to_string()),
                ("pids.max", "512".to_string()),
                ("cpu.cfs_quota_us", "50000".to_string()),
                ("cpu.max", "50000 100000".to_string()),
            ] {
                if let Ok(v) = std::fs::read_to_string(cg.join(file)) {
                    assert_eq!(v.trim(), want, "{}", cg.join(file).display());
                }
            }
        }
        uids.push(ids[0].to_string());
    }
    assert_ne!(uids[0], uids[1], "two sandboxes share a uid");

    // What QEMU a sees: its own disk, not b's; nothing of the host's private places.
    let root = PathBuf::from(format!("/proc/{}/root", a.pid()));
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    let disk_a = fx.dir.path().join("ja.qcow2");
    let disk_b = fx.dir.path().join("jb.qcow2");
    assert!(inside(&disk_a).exists(), "QEMU cannot see its own disk");
    assert!(!inside(&disk_b).exists(), "QEMU a sees the disk of b");
    assert!(
        !inside(&fx.dir.path().join("jb")).exists(),
        "QEMU a sees b's run directory"
    );
    assert!(inside(&base).exists(), "QEMU cannot see its backing disk");
    for hidden in [
        "etc/shadow",
        "etc/passwd",
        "root",
        "home",
        "var",
        "sys",
        "run",
    ] {
        assert!(!root.join(hidden).exists(), "QEMU sees /{hidden}");
    }
    // In the fixture's directory: the boot files and its own disk (and the one directory
    // above it that leads there), nothing else.
    let mut seen: Vec<String> = std::fs::read_dir(inside(fx.dir.path()))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        ["initrd.img", "ja.qcow2"],
        "QEMU's view of the fixture"
    );
    // Of MOAT_HOME, only the way to the kernel it boots and the base disk (here in the home).
    let mut home_view: Vec<String> =
        std::fs::read_dir(inside(&std::fs::canonicalize(home()).unwrap()))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
    home_view.sort();
    assert_eq!(
        home_view,
        ["kernels", "test-base.raw"],
        "QEMU's view of MOAT_HOME"
    );
    // Its /proc is its own PID namespace's: it sees no other process.
    let pids: Vec<String> = std::fs::read_dir(root.join("proc"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert_eq!(
        pids,
        vec!["1".to_string()],
        "QEMU's /proc shows other processes"
    );
    // Its disk belongs to its uid alone.
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&disk_a).unwrap();
    assert_eq!(md.uid().to_string(), uids[0]);
    assert_eq!(md.mode() & 0o077, 0, "the disk is readable by others");
    a.kill().await.unwrap();
    b.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_panic_is_reported_with_console() {
    let fx = fixture(PANIC_INIT);
    let ov = fx.dir.path().join("p.qcow2");
    disk::create_overlay(&base_disk(), "raw", 0, &ov)
        .await
        .unwrap();
    let mut vm = qemu::launch(&fx.spec("panic", &ov, None)).await.unwrap();
    let mut agent = BufReader::new(vm.take_agent_stream(Duration::from_secs(5)).await.unwrap());
    let mut l = String::new();
    let r = vm
        .while_alive(
            "waiting for the agent",
            Duration::from_secs(90),
            agent.read_line(&mut l),
        )
        .await;
    // Either QEMU's exit is seen first, or the agent socket's EOF: then ask why.
    let e = match r {
        Err(e) => e,
        Ok(Ok(0)) => vm.exit_error("waiting for the agent").await,
        Ok(other) => panic!("unexpected agent read {other:?}: {l:?}"),
    };
    let msg = e.to_string();
    assert!(matches!(e, Error::VmExited { .. }), "{msg}");
    assert!(msg.contains("Attempted to kill init"), "{msg}");
    assert!(msg.contains("init is leaving now"), "{msg}");
    // panic=-1 reboots, -no-reboot turns that into a normal QEMU exit (status 0).
    vm.wait_exit().await.unwrap();
    assert!(vm.console_tail(4096).contains("Kernel panic"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_restore_and_two_clones() {
    let fx = fixture(ECHO_INIT);
    let (mut vm, mut agent, _) = boot_ready(&fx, "src", &base_disk()).await;
    assert_eq!(agent.echo("one").await, 1);
    let snap = fx.dir.path().join("mem.snap");
    vm.save_memory(&snap).await.unwrap();
    let src_pid = vm.pid();
    vm.kill().await.unwrap();
    drop(agent);
    assert!(!alive(src_pid));
    // The source overlay is frozen now: clones get overlays on top of it.
    let frozen = fx.dir.path().join("src.qcow2");

    let restore = |name: &'static str| {
        let fx = &fx;
        let frozen = frozen.clone();
        let snap = snap.clone();
        async move {
            let ov = fx.dir.path().join(format!("{name}.qcow2"));
            let t = Instant::now();
            disk::create_overlay(&frozen, "qcow2", 0, &ov)
                .await
                .unwrap();
            let overlay_time = t.elapsed();
            let mut vm = qemu::launch(&fx.spec(name, &ov, Some(snap))).await.unwrap();
            let running = t.elapsed();
            let mut agent = Agent(BufReader::new(
                vm.take_agent_stream(Duration::from_secs(5)).await.unwrap(),
            ));
            let n = vm
                .while_alive(
                    "echo after restore",
                    Duration::from_secs(60),
                    agent.echo(name),
                )
                .await
                .unwrap();
            eprintln!(
                "TIMING {name}: overlay {overlay_time:?}, running {running:?}, agent answered {:?}",
                t.elapsed()
            );
            (vm, agent, n)
        }
    };
    let (mut single, _a, n) = restore("single").await;
    assert_eq!(n, 2, "counter continues from the snapshot");
    assert_eq!(single.status().await.unwrap(), "running");
    single.kill().await.unwrap();

    let ((c1, mut a1, n1), (c2, mut a2, n2)) = tokio::join!(restore("clone1"), restore("clone2"));
    assert_eq!((n1, n2), (2, 2));
    assert_ne!(c1.pid(), c2.pid());
    assert_eq!(a1.echo("x").await, 3);
    assert_eq!(a2.echo("y").await, 3);
    let pids = [c1.pid(), c2.pid()];
    drop((c1, c2));
    assert!(pids.iter().all(|p| !alive(*p)));
}
