//! Early boot as PID 1 in the initramfs: drivers, root disk, switch root, the mounts every
//! Linux program expects, and the agent port.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys::{check, cstr, mount};

/// Where exec cgroups live; created at boot.
pub const EXEC_CGROUP_ROOT: &str = "/sys/fs/cgroup/moat-exec";
/// Tasks all user processes together may have: far more than real work needs (3,000
/// sleeping processes are fine), few enough that a fork bomb stops there with memory left.
const EXEC_PIDS_MAX: u32 = 4096;
/// The CPU weight of user processes against the agent's (the agent, in the root cgroup,
/// counts as weight 100): under a spinner or a fork bomb the agent still gets ~90 % of a
/// CPU whenever it has work, so it keeps answering the host.
const EXEC_CPU_WEIGHT: u32 = 10;
/// Guest memory kept back from user processes for the kernel and the agent: an eighth of
/// RAM, at least 48 MiB and at most 256 MiB.
const AGENT_RESERVE: (u64, u64) = (48 << 20, 256 << 20);

const ROOT_DEVICE: &str = "/dev/vda";
const NEWROOT: &str = "/newroot";
const PORT_NAME: &str = "agent";
const DEVICE_WAIT: Duration = Duration::from_secs(10);

/// `_IOR(0x12, 114, size_t)`
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IOW('f', 16, __u64)`
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

type Result<T> = std::result::Result<T, String>;

fn ctx<T>(r: io::Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    r.map_err(|e| format!("{}: {e}", what()))
}

/// Runs the whole boot sequence and returns the opened agent port.
pub fn boot() -> Result<File> {
    mount_early()?;
    load_modules()?;
    wait_for(ROOT_DEVICE)?;
    ctx(fs::create_dir_all(NEWROOT), || format!("mkdir {NEWROOT}"))?;
    ctx(mount(ROOT_DEVICE, NEWROOT, Some("ext4"), 0, None), || {
        format!("mount {ROOT_DEVICE} on {NEWROOT}")
    })?;
    grow_root_fs()?;
    switch_root()?;
    mount_system()?;
    if let Err(e) = crate::sys::sethostname("sandbox") {
        crate::sys::console(&format!("sethostname: {e}"));
    }
    if let Err(e) = loopback_up() {
        crate::sys::console(&format!("bringing up lo: {e}"));
    }
    open_port()
}

fn mount_early() -> Result<()> {
    let flags = libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV;
    for (fstype, target, flags, data) in [
        ("devtmpfs", "/dev", libc::MS_NOSUID, Some("mode=0755")),
        ("proc", "/proc", flags, None),
        ("sysfs", "/sys", flags, None),
    ] {
        ctx(fs::create_dir_all(target), || format!("mkdir {target}"))?;
        match mount(fstype, target, Some(fstype), flags, data) {
            // The kernel may have mounted devtmpfs already.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            r => ctx(r, || format!("mount {fstype} on {target}"))?,
        }
    }
    Ok(())
}

/// Loads every `/modules/*.ko` in lexical order (the file names carry the dependency order).
fn load_modules() -> Result<()> {
    let mut modules: Vec<PathBuf> = match fs::read_dir("/modules") {
        Ok(dir) => dir.filter_map(|e| e.ok().map(|e| e.path())).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("reading /modules: {e}")),
    };
    modules.sort();
    for path in modules {
        let file = ctx(File::open(&path), || format!("open {}", path.display()))?;
        // SAFETY: finit_module reads the module from the open fd; the params string is a
        // static NUL-terminated empty string.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                c"".as_ptr(),
                0 as libc::c_int,
            )
        };
        if ret != 0 {
            let err = io::Error::last_os_error();
            // Already loaded (or built in): fine.
            if err.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("loading module {}: {err}", path.display()));
            }
        }
        // The initramfs is kept in RAM: free what is no longer needed.
        let _ = fs::remove_file(&path);
    }
    Ok(())
}

/// Polls for a device node; there is no uevent listener to wait on.
fn wait_for(path: &str) -> Result<()> {
    let start = Instant::now();
    while !Path::new(path).exists() {
        if start.elapsed() > DEVICE_WAIT {
            return Err(format!("{path} did not appear within {DEVICE_WAIT:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The host gives every sandbox a disk bigger than the image's filesystem: grow the filesystem
/// online to fill it.
fn grow_root_fs() -> Result<()> {
    let dev = ctx(File::open(ROOT_DEVICE), || format!("open {ROOT_DEVICE}"))?;
    let mut dev_bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live u64.
    let ret = unsafe { libc::ioctl(dev.as_raw_fd(), BLKGETSIZE64, &mut dev_bytes) };
    ctx(check(ret), || "BLKGETSIZE64".into())?;
    let mut sb = [0u8; 1024];
    ctx(dev.read_exact_at(&mut sb, 1024), || {
        "reading the ext4 superblock".into()
    })?;
    let (blocks, block_size) = ext4_size(&sb).ok_or("the root disk is not ext4")?;
    let want = dev_bytes / block_size;
    if want <= blocks {
        return Ok(());
    }
    let root = ctx(File::open(NEWROOT), || format!("open {NEWROOT}"))?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 through the pointer, which points to a live u64.
    let ret = unsafe { libc::ioctl(root.as_raw_fd(), EXT4_IOC_RESIZE_FS, &want) };
    ctx(check(ret), || {
        format!("growing the root filesystem from {blocks} to {want} blocks")
    })?;
    Ok(())
}

/// Block count and block size from an ext4 superblock.
fn ext4_size(sb: &[u8; 1024]) -> Option<(u64, u64)> {
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return None;
    }
    let log = u32_at(0x18);
    if log > 6 {
        return None;
    }
    let incompat_64bit = u32_at(0x60) & 0x80 != 0;
    let hi = if incompat_64bit { u32_at(0x150) } else { 0 };
    Some(((u64::from(hi) << 32) | u64::from(u32_at(0x4)), 1024 << log))
}

fn switch_root() -> Result<()> {
    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEWROOT}{dir}");
        ctx(fs::create_dir_all(&target), || format!("mkdir {target}"))?;
        ctx(mount(dir, &target, None, libc::MS_MOVE, None), || {
            format!("moving {dir} to {target}")
        })?;
    }
    // Free the initramfs (it stays in RAM otherwise); only our own binary remains, and it is
    // still mapped.
    let _ = fs::remove_file("/init");
    let _ = fs::remove_dir("/modules");
    ctx(std::env::set_current_dir(NEWROOT), || {
        format!("chdir {NEWROOT}")
    })?;
    ctx(mount(".", "/", None, libc::MS_MOVE, None), || {
        format!("moving {NEWROOT} to /")
    })?;
    let dot = ctx(cstr("."), || "chroot".into())?;
    // SAFETY: `dot` is a NUL-terminated string that outlives the call.
    ctx(check(unsafe { libc::chroot(dot.as_ptr()) }), || {
        "chroot .".into()
    })?;
    ctx(std::env::set_current_dir("/"), || "chdir /".into())
}

fn mount_system() -> Result<()> {
    let nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let mut mounts = vec![
        (
            "devpts",
            "/dev/pts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "mode=0620,ptmxmode=0666",
        ),
        ("tmpfs", "/dev/shm", nodev, "mode=1777"),
        ("tmpfs", "/run", nodev, "mode=0755"),
        ("cgroup2", "/sys/fs/cgroup", nodev | libc::MS_NOEXEC, ""),
    ];
    if !Path::new("/tmp").exists() {
        mounts.push(("tmpfs", "/tmp", nodev, "mode=1777"));
    }
    for (fstype, target, flags, data) in mounts {
        ctx(fs::create_dir_all(target), || format!("mkdir {target}"))?;
        ctx(
            mount(fstype, target, Some(fstype), flags, Some(data)),
            || format!("mount {fstype} on {target}"),
        )?;
    }
    // devtmpfs does not make these, and shells rely on them.
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, link);
    }
    if let Err(e) = fs::create_dir_all(EXEC_CGROUP_ROOT) {
        // Execs then fall back to killing their process group.
        crate::sys::console(&format!("mkdir {EXEC_CGROUP_ROOT}: {e}"));
    } else {
        limit_user_processes();
    }
    Ok(())
}

/// Puts every exec's cgroup under limits that leave the agent (PID 1, in the root cgroup,
/// outside them) memory, pids and CPU to keep answering, whatever user code does: a fork
/// bomb stops at [`EXEC_PIDS_MAX`], a memory hog meets the OOM killer inside the execs'
/// cgroup, a spinner gets CPU only when the agent does not need it. Best effort: a kernel
/// without a controller still runs execs, with that limit missing (said on the console).
fn limit_user_processes() {
    let root = Path::new(EXEC_CGROUP_ROOT);
    for controller in ["pids", "memory", "cpu"] {
        for parent in [Path::new("/sys/fs/cgroup"), root] {
            if let Err(e) = fs::write(
                parent.join("cgroup.subtree_control"),
                format!("+{controller}"),
            ) {
                crate::sys::console(&format!(
                    "cgroup controller {controller} in {}: {e}",
                    parent.display()
                ));
            }
        }
    }
    let total = mem_total().unwrap_or(0);
    let reserve = (total / 8).clamp(AGENT_RESERVE.0, AGENT_RESERVE.1);
    let limits = [
        ("pids.max", EXEC_PIDS_MAX.to_string()),
        (
            "memory.max",
            total.saturating_sub(reserve).max(reserve).to_string(),
        ),
        ("cpu.weight", EXEC_CPU_WEIGHT.to_string()),
    ];
    for (file, value) in limits {
        if let Err(e) = fs::write(root.join(file), &value) {
            crate::sys::console(&format!("{EXEC_CGROUP_ROOT}/{file} = {value}: {e}"));
        }
    }
}

/// The guest's RAM in bytes (`MemTotal` of `/proc/meminfo`).
fn mem_total() -> Option<u64> {
    let info = fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib << 10)
}

/// Programs expect a working 127.0.0.1 even without a network device.
fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket creation; the fd is owned right after.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data for which all zeroes is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq that `req` points to.
    unsafe {
        check(libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req))?;
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        check(libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req))?;
    }
    Ok(())
}

/// Finds the virtio-serial port named `agent` through sysfs (there is no udev) and opens it.
fn open_port() -> Result<File> {
    let start = Instant::now();
    loop {
        if let Some(dev) = find_port()? {
            return ctx(OpenOptions::new().read(true).write(true).open(&dev), || {
                format!("open {}", dev.display())
            });
        }
        if start.elapsed() > DEVICE_WAIT {
            return Err(format!(
                "no virtio-serial port named {PORT_NAME:?} in /sys/class/virtio-ports"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn find_port() -> Result<Option<PathBuf>> {
    let dir = match fs::read_dir("/sys/class/virtio-ports") {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading /sys/class/virtio-ports: {e}")),
    };
    for entry in dir.flatten() {
        let mut name = String::new();
        if File::open(entry.path().join("name"))
            .and_then(|mut f| f.read_to_string(&mut name))
            .is_ok()
            && name.trim_end() == PORT_NAME
        {
            let dev = Path::new("/dev").join(entry.file_name());
            if dev.exists() {
                return Ok(Some(dev));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_superblock_size() {
        let mut sb = [0u8; 1024];
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[0x4..0x8].copy_from_slice(&1000u32.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(ext4_size(&sb), Some((1000, 4096)));
        // The high half only counts with the 64bit feature.
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(ext4_size(&sb), Some((1000, 4096)));
        sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
        assert_eq!(ext4_size(&sb), Some(((1 << 32) + 1000, 4096)));
        sb[0x38] = 0;
        assert_eq!(ext4_size(&sb), None);
    }
}
