//! The jail around every process that touches a guest: each sandbox's QEMU and its network
//! stack. A guest that escapes into QEMU (or a packet that takes over the stack) lands in a
//! process that:
//! - runs as an unprivileged uid/gid of its own (a *slot* from a host-wide range: QEMU gets
//!   `base + 2·slot`, the stack `base + 2·slot + 1`, and a slot is never shared by two live
//!   sandboxes, so one cannot read another's memory or files), with no capabilities (bounding,
//!   ambient, inheritable, permitted and effective sets all empty) and `no_new_privs`;
//! - lives in its own mount, PID, IPC and UTS namespaces, and QEMU also in an empty network
//!   namespace (its sockets are all inherited; the stack keeps the host's network, which it
//!   exists to reach); its root is an empty read-only tmpfs holding only what it needs:
//!   read-only binds of `/usr` (QEMU, its libraries and firmware), the kernel, initramfs and
//!   every disk of the VM's backing chain, the VM's own overlay read-write, a fresh `/proc` of
//!   its PID namespace and a few device nodes; never `MOAT_HOME`, other run directories or
//!   the host's `/etc`, `/home`, `/root`;
//! - sits in the sandbox's cgroup ([`crate::cgroup`]) with its tier's memory, pids and CPU
//!   limits;
//! - runs under a seccomp filter of ours ([`SECCOMP_DENY`]) that refuses the kernel surfaces
//!   no VMM needs (other processes, mounts, namespaces, modules, BPF, keyrings, io_uring,
//!   userfaultfd, perf); QEMU then adds its own `-sandbox on,...` on top;
//! - has its core dumps disabled (a dump of QEMU is a dump of the guest's RAM).
//!
//! The slot's lock file (`/run/moat/jail/slots/<n>`, flock) is inherited by QEMU and the
//! stack, so the slot stays taken exactly as long as one of them lives — across daemon
//! restarts too — without any bookkeeping.
//!
//! The host must offer all of it: [`JailHost::check`] says which feature is missing, and moat
//! refuses to start VMs rather than run them unjailed. `MOAT_NO_JAIL=1` turns the jail off
//! for development (logged as a warning at every start).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::cgroup::{CgroupHost, Limits, SandboxCgroup};
use crate::error::IoContext;
use crate::{Error, Result};

/// The first uid/gid of the jail range (`MOAT_JAIL_UID_BASE` overrides): far above
/// the ranges Debian gives users, system accounts, `subuid` and systemd's dynamic users.
const DEFAULT_UID_BASE: u32 = 1_600_000_000;
/// Slots in the range: two ids each.
const SLOTS: u32 = 32_768;
/// Host-wide state of the jail (a tmpfs on Debian, so slots are free again after a reboot).
const STATE_DIR: &str = "/run/moat/jail";

/// Whether VMs run jailed, and what the host offers for it.
#[derive(Debug, Clone)]
pub enum JailMode {
    On(Arc<JailHost>),
    /// `MOAT_NO_JAIL=1`: development only.
    Off,
}

impl JailMode {
    /// The jail, unless `MOAT_NO_JAIL=1`; an error naming the missing host feature when the
    /// host cannot jail.
    pub fn from_env() -> Result<JailMode> {
        if std::env::var_os("MOAT_NO_JAIL").is_some_and(|v| v == "1") {
            tracing::warn!(
                "MOAT_NO_JAIL=1: QEMU and the network stacks run UNJAILED, as this user, \
                 without namespaces, seccomp filter of ours or cgroup limits; for development only"
            );
            return Ok(JailMode::Off);
        }
        Ok(JailMode::On(Arc::new(JailHost::check()?)))
    }

    /// One line for `moat -v` and `/healthz`.
    pub fn describe(&self) -> String {
        match self {
            JailMode::Off => "off (MOAT_NO_JAIL=1)".into(),
            JailMode::On(h) => format!(
                "on: uids {}.., namespaces mnt/pid/ipc/uts/net, seccomp, cgroup {}",
                h.uid_base,
                match h.cgroups {
                    CgroupHost::V2 { .. } => "v2",
                    CgroupHost::V1 { .. } => "v1",
                }
            ),
        }
    }
}

/// What this host offers the jail, checked once.
#[derive(Debug)]
pub struct JailHost {
    cgroups: CgroupHost,
    uid_base: u32,
    /// The highest capability number this kernel knows (`/proc/sys/kernel/cap_last_cap`).
    cap_last: u32,
}

impl JailHost {
    /// Checks every host feature the jail needs; the error names the first one missing.
    pub fn check() -> Result<JailHost> {
        let missing = |what: String| Err(Error::Jail(what));
        // SAFETY: geteuid(2) has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return missing(
                "moat must run as root to jail QEMU (switching to per-sandbox uids, mount \
                 namespaces, cgroups)"
                    .into(),
            );
        }
        for ns in ["mnt", "pid", "ipc", "uts", "net"] {
            if !Path::new("/proc/self/ns").join(ns).exists() {
                return missing(format!(
                    "the kernel has no {ns} namespaces (/proc/self/ns/{ns})"
                ));
            }
        }
        let actions =
            std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_avail").unwrap_or_default();
        if !actions.split_whitespace().any(|a| a == "errno") {
            return missing(
                "the kernel has no seccomp filters (/proc/sys/kernel/seccomp/actions_avail)".into(),
            );
        }
        let cap_last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Error::Jail("cannot read /proc/sys/kernel/cap_last_cap".into()))?;
        let cgroups = CgroupHost::detect()?;
        let uid_base = match std::env::var("MOAT_JAIL_UID_BASE") {
            Ok(v) => v
                .parse::<u32>()
                .ok()
                .filter(|b| *b >= 65_536 && b.checked_add(2 * SLOTS).is_some())
                .ok_or_else(|| {
                    Error::Jail(format!(
                        "MOAT_JAIL_UID_BASE={v:?}: use a number from 65536 to {}",
                        u32::MAX - 2 * SLOTS
                    ))
                })?,
            Err(_) => DEFAULT_UID_BASE,
        };
        for dir in ["slots", "root"] {
            let p = Path::new(STATE_DIR).join(dir);
            std::fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
        }
        Ok(JailHost {
            cgroups,
            uid_base,
            cap_last,
        })
    }

    /// Takes a free slot (its uids and its cgroup with `limits`).
    pub(crate) fn take_slot(self: &Arc<Self>, limits: Limits) -> Result<Slot> {
        let start = rand::random::<u32>() % SLOTS;
        for i in 0..SLOTS {
            let n = (start + i) % SLOTS;
            let path = Path::new(STATE_DIR).join("slots").join(n.to_string());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .ctx(|| format!("opening {}", path.display()))?;
            // SAFETY: flock(2) on a descriptor we own; no memory is passed.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                continue;
            }
            let cgroup = self.cgroups.create(&slot_name(n), limits)?;
            return Ok(Slot {
                n,
                lock: file.into(),
                cgroup,
                host: self.clone(),
                keep: false,
            });
        }
        Err(Error::Jail(format!(
            "all {SLOTS} jail slots are in use ({STATE_DIR}/slots)"
        )))
    }

    /// The slot whose QEMU runs as `uid` (an adopted VM), if `uid` is one of ours.
    pub(crate) fn slot_of_qemu_uid(self: &Arc<Self>, uid: u32) -> Option<AdoptedSlot> {
        let off = uid.checked_sub(self.uid_base)?;
        (off % 2 == 0 && off / 2 < SLOTS).then(|| AdoptedSlot {
            cgroup: self.cgroups.existing(&slot_name(off / 2)),
        })
    }
}

fn slot_name(n: u32) -> String {
    format!("jail-{n}")
}

/// One sandbox's slot: its uids, its cgroup and the lock that keeps both its own.
#[derive(Debug)]
pub(crate) struct Slot {
    n: u32,
    /// Locked; inherited by the jailed processes, which keep it locked while they live.
    lock: OwnedFd,
    cgroup: SandboxCgroup,
    host: Arc<JailHost>,
    /// Released to outlive us (a detached VM handed over): the cgroup stays.
    keep: bool,
}

impl Slot {
    pub(crate) fn qemu_uid(&self) -> u32 {
        self.host.uid_base + 2 * self.n
    }

    pub(crate) fn net_uid(&self) -> u32 {
        self.qemu_uid() + 1
    }

    pub(crate) fn lock_fd(&self) -> std::os::fd::RawFd {
        self.lock.as_raw_fd()
    }

    pub(crate) fn cgroup(&self) -> &SandboxCgroup {
        &self.cgroup
    }

    pub(crate) fn host(&self) -> &JailHost {
        &self.host
    }

    /// Leaves the cgroup in place when dropped (the processes outlive this handle).
    pub(crate) fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = self.cgroup.remove() {
                tracing::warn!("jail slot {}: {e}", self.n);
            }
        }
    }
}

/// The cgroup of an adopted VM's slot, removed when the VM is destroyed.
#[derive(Debug)]
pub(crate) struct AdoptedSlot {
    cgroup: SandboxCgroup,
}

impl AdoptedSlot {
    pub(crate) fn remove(&self) {
        if let Err(e) = self.cgroup.remove() {
            tracing::warn!("{e}");
        }
    }
}

/// What a jailed process may see: paths bound at the same place inside its root.
#[derive(Debug, Default, Clone)]
pub(crate) struct View {
    /// (path, writable)
    pub binds: Vec<(PathBuf, bool)>,
    /// Device nodes bound from the host's `/dev`.
    pub devices: Vec<PathBuf>,
}

impl View {
    /// The system part every jailed program needs: `/usr` (binaries, libraries, QEMU's
    /// firmware) with the merged-`/usr` links, the dynamic loader's cache, `/dev/null` and the
    /// random devices.
    pub fn system() -> View {
        let mut v = View::default();
        v.binds.push(("/usr".into(), false));
        for f in ["/etc/ld.so.cache", "/etc/localtime"] {
            if Path::new(f).exists() {
                v.binds.push((f.into(), false));
            }
        }
        for d in ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"] {
            v.devices.push(d.into());
        }
        v
    }
}

/// How a jailed process is set up; see [`Plan`].
#[derive(Debug)]
pub(crate) struct JailSpec<'a> {
    pub slot: &'a Slot,
    pub uid: u32,
    pub view: View,
    /// An empty network namespace (QEMU) or the host's (the network stack).
    pub new_net: bool,
    /// Supplementary groups (e.g. `/dev/kvm`'s).
    pub groups: Vec<u32>,
}

/// Everything the child does between clone and exec, built (and allocated) before the
/// clone: the child only makes system calls on this memory.
pub(crate) struct Plan {
    pub clone_flags: u64,
    cgroup_procs: Vec<CString>,
    root: CString,
    mkdirs: Vec<CString>,
    files: Vec<CString>,
    symlinks: Vec<(CString, CString)>,
    /// (source, target inside `root`, read-only)
    binds: Vec<(CString, CString, bool)>,
    devices: Vec<(CString, CString)>,
    proc_dir: CString,
    uid: u32,
    groups: Vec<libc::gid_t>,
    cap_last: u32,
    filter: Vec<libc::sock_filter>,
}

impl std::fmt::Debug for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plan")
            .field("root", &self.root)
            .field("binds", &self.binds)
            .field("uid", &self.uid)
            .finish_non_exhaustive()
    }
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("path {} contains a NUL byte", p.display())))
}

impl Plan {
    pub(crate) fn new(spec: JailSpec<'_>) -> Result<Plan> {
        let root = Path::new(STATE_DIR).join("root");
        let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut files = Vec::new();
        let mut binds = Vec::new();
        let add_parents = |p: &Path, dirs: &mut Vec<PathBuf>| {
            let mut chain: Vec<PathBuf> = p
                .ancestors()
                .skip(1)
                .filter(|a| a.as_os_str().len() > 1)
                .map(Path::to_path_buf)
                .collect();
            chain.reverse();
            for a in chain {
                if !dirs.contains(&a) {
                    dirs.push(a);
                }
            }
        };
        for (path, writable) in &spec.view.binds {
            if !path.is_absolute() {
                return Err(Error::InvalidArgument(format!(
                    "jail bind {} is not absolute",
                    path.display()
                )));
            }
            let md = std::fs::metadata(path).ctx(|| format!("jail bind {}", path.display()))?;
            add_parents(path, &mut dirs);
            if md.is_dir() {
                if !dirs.contains(path) {
                    dirs.push(path.clone());
                }
            } else {
                files.push(path.clone());
            }
            binds.push((cstr(path)?, cstr(&inside(path))?, !writable));
        }
        let mut devices = Vec::new();
        add_parents(Path::new("/dev/x"), &mut dirs);
        for d in &spec.view.devices {
            files.push(d.clone());
            devices.push((cstr(d)?, cstr(&inside(d))?));
        }
        // Merged /usr: the top-level links to it, as on the host.
        let mut symlinks = Vec::new();
        for l in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
            if let Ok(target) = std::fs::read_link(l) {
                symlinks.push((cstr(&target)?, cstr(&inside(Path::new(l)))?));
            }
        }
        dirs.push("/proc".into());
        let host = spec.slot.host();
        let mut flags =
            (libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS)
                as u64;
        if spec.new_net {
            flags |= libc::CLONE_NEWNET as u64;
        }
        Ok(Plan {
            clone_flags: flags,
            cgroup_procs: spec
                .slot
                .cgroup()
                .procs_files()
                .iter()
                .map(|p| cstr(p))
                .collect::<Result<_>>()?,
            root: cstr(&root)?,
            mkdirs: dirs
                .iter()
                .map(|d| cstr(&inside(d)))
                .collect::<Result<_>>()?,
            files: files
                .iter()
                .map(|f| cstr(&inside(f)))
                .collect::<Result<_>>()?,
            symlinks,
            binds,
            devices,
            proc_dir: cstr(&inside(Path::new("/proc")))?,
            uid: spec.uid,
            groups: spec.groups,
            cap_last: host.cap_last,
            filter: seccomp_filter(),
        })
    }

    /// Runs in the child right after the clone, before exec. Async-signal-safe system calls
    /// only, on memory of `self` (which the child's copy of the address space keeps); the
    /// error names the step that failed.
    pub(crate) fn apply(&self) -> std::result::Result<(), (&'static str, i32)> {
        let err = |step: &'static str| {
            (
                step,
                std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
            )
        };
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: every call below is a plain system call on integers, on NUL-terminated
        // strings owned by `self`, or on structures on this stack frame.
        unsafe {
            for procs in &self.cgroup_procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(err("joining the sandbox cgroup"));
                }
                libc::close(fd);
            }
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::setrlimit(libc::RLIMIT_CORE, &no_core) != 0 {
                return Err(err("disabling core dumps"));
            }
            // Nothing we mount may propagate back to the host.
            if libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                null.cast(),
            ) != 0
            {
                return Err(err("making the mount namespace private"));
            }
            if libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=0755,size=64k".as_ptr().cast(),
            ) != 0
            {
                return Err(err("mounting the jail's root tmpfs"));
            }
            for d in &self.mkdirs {
                if libc::mkdir(d.as_ptr(), 0o755) != 0
                    && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                {
                    return Err(err("making a directory in the jail"));
                }
            }
            for f in &self.files {
                let fd = libc::open(
                    f.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o600,
                );
                if fd < 0 {
                    return Err(err("making a mount point in the jail"));
                }
                libc::close(fd);
            }
            for (target, link) in &self.symlinks {
                if libc::symlink(target.as_ptr(), link.as_ptr()) != 0 {
                    return Err(err("linking /usr's directories in the jail"));
                }
            }
            for (src, dst, ro) in &self.binds {
                if libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    null,
                    libc::MS_BIND | libc::MS_REC,
                    null.cast(),
                ) != 0
                {
                    return Err(err("binding a path into the jail"));
                }
                let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
                if *ro {
                    flags |= libc::MS_RDONLY;
                }
                if libc::mount(null, dst.as_ptr(), null, flags, null.cast()) != 0 {
                    return Err(err("making a bound path read-only"));
                }
            }
            for (src, dst) in &self.devices {
                if libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND, null.cast()) != 0 {
                    return Err(err("binding a device into the jail"));
                }
            }
            if libc::mount(
                c"proc".as_ptr(),
                self.proc_dir.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                null.cast(),
            ) != 0
            {
                return Err(err("mounting /proc of the jail's PID namespace"));
            }
            if libc::chdir(self.root.as_ptr()) != 0
                || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0
                || libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0
                || libc::chdir(c"/".as_ptr()) != 0
            {
                return Err(err("entering the jail's root (pivot_root)"));
            }
            if libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_RDONLY
                    | libc::MS_NOSUID
                    | libc::MS_NODEV,
                null.cast(),
            ) != 0
            {
                return Err(err("making the jail's root read-only"));
            }
            if libc::sethostname(c"moat-jail".as_ptr(), 9) != 0 {
                return Err(err("naming the jail's UTS namespace"));
            }
            // Capabilities: the bounding set first (needs CAP_SETPCAP), then the ids, which
            // empties the permitted and effective sets; then the inheritable set.
            for cap in 0..=self.cap_last {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(err("dropping the capability bounding set"));
                }
            }
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(err("clearing ambient capabilities"));
            }
            // Raw system calls, not glibc's wrappers: those apply the change to every thread
            // glibc knows of (`__nptl_setxid`), and after a raw clone3 the child inherits the
            // parent's thread list. When another daemon thread was being created at the clone,
            // the child waited forever on that thread's futex (seen: a QEMU that never started).
            if libc::syscall(libc::SYS_setgroups, self.groups.len(), self.groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, self.uid, self.uid, self.uid) != 0
                || libc::syscall(libc::SYS_setresuid, self.uid, self.uid, self.uid) != 0
            {
                return Err(err("switching to the jail's uid and gid"));
            }
            let mut header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let data = [CapData::default(); 2];
            if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
                return Err(err("clearing the remaining capabilities"));
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(err("setting no_new_privs"));
            }
            let prog = libc::sock_fprog {
                len: self.filter.len() as libc::c_ushort,
                filter: self.filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, &prog) != 0 {
                return Err(err("installing the seccomp filter"));
            }
        }
        Ok(())
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// System calls a jailed process is refused (`EPERM`), on top of QEMU's own `-sandbox`:
/// reaching other processes, changing mounts or namespaces, loading kernel code or BPF,
/// keyrings, io_uring (QEMU falls back to epoll/threads), userfaultfd, perf events, and
/// administrative calls. Everything else is allowed: QEMU installs its own, narrower filter
/// after it starts, and the network stack is a plain userspace program.
pub const SECCOMP_DENY: &[(&str, libc::c_long)] = &[
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("kcmp", libc::SYS_kcmp),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("chroot", libc::SYS_chroot),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsmount", libc::SYS_fsmount),
    ("fsconfig", libc::SYS_fsconfig),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("syslog", libc::SYS_syslog),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("adjtimex", libc::SYS_adjtimex),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("sethostname", libc::SYS_sethostname),
    ("setdomainname", libc::SYS_setdomainname),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("personality", libc::SYS_personality),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
];

/// `AUDIT_ARCH_X86_64`: the filter refuses every other ABI (i386 `int 0x80`, x32) outright.
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// x32 system calls are x86_64 numbers with this bit set.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

fn bpf_stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn bpf_jump(code: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The classic-BPF program for [`SECCOMP_DENY`].
fn seccomp_filter() -> Vec<libc::sock_filter> {
    // struct seccomp_data: nr at 0, arch at 4.
    let errno = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let mut f = vec![
        bpf_stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 4),
        bpf_jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            AUDIT_ARCH_X86_64,
            1,
            0,
        ),
        bpf_stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
        bpf_stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0),
        bpf_jump(
            libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
            X32_SYSCALL_BIT,
            0,
            1,
        ),
        bpf_stmt(libc::BPF_RET | libc::BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
    ];
    for (_, nr) in SECCOMP_DENY {
        f.push(bpf_jump(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            *nr as u32,
            0,
            1,
        ));
        f.push(bpf_stmt(libc::BPF_RET | libc::BPF_K, errno));
    }
    f.push(bpf_stmt(
        libc::BPF_RET | libc::BPF_K,
        libc::SECCOMP_RET_ALLOW,
    ));
    f
}

/// The group that owns `/dev/kvm`, which a jailed QEMU needs as a supplementary group.
pub(crate) fn kvm_group() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/dev/kvm").ok().map(|m| m.gid())
}

/// Makes a read-only layer readable by the jail's uids: a disk that was some VM's overlay
/// (a template's, a snapshot's, a suspended sandbox's) still belongs to that VM's uid with
/// mode 0600; as a backing file it is shared read-only, so it goes back to root, mode 0644.
/// Only our own jails see it, and only where it is bound read-only.
pub(crate) fn share_read_only(path: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let md = std::fs::metadata(path).ctx(|| format!("inspecting {}", path.display()))?;
    if md.uid() != 0 || md.gid() != 0 {
        std::os::unix::fs::chown(path, Some(0), Some(0))
            .ctx(|| format!("giving {} back to root", path.display()))?;
    }
    if md.mode() & 0o444 != 0o444 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .ctx(|| format!("sharing {} read-only", path.display()))?;
    }
    Ok(())
}

/// Gives `path` to the jailed `uid` alone (the VM's own overlay, which QEMU opens
/// read-write): owned by it, mode 0600.
pub(crate) fn give(path: &Path, uid: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .ctx(|| format!("giving {} to the jail's uid {uid}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .ctx(|| format!("making {} private", path.display()))
}

#[cfg(test)]
mod tests {
    //! The jail from the inside: a shell started in it as QEMU would be tries what an escaped
    //! guest would try.

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_jailed_process_reaches_nothing_it_was_not_given() {
        let host = Arc::new(JailHost::check().expect("the test host can jail (root, cgroups)"));
        let limits = Limits {
            memory_bytes: 256 << 20,
            pids: 64,
            millicores: 1000,
        };
        let slot = host.take_slot(limits).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let allowed = dir.path().join("allowed");
        let secret = dir.path().join("secret");
        let writable = dir.path().join("writable");
        std::fs::write(&allowed, "given\n").unwrap();
        std::fs::write(&secret, "host secret\n").unwrap();
        std::fs::write(&writable, "").unwrap();
        give(&writable, slot.qemu_uid()).unwrap();
        let mut view = View::system();
        view.binds.push((allowed.clone(), false));
        view.binds.push((writable.clone(), true));
        let plan = Plan::new(JailSpec {
            slot: &slot,
            uid: slot.qemu_uid(),
            view,
            new_net: true,
            groups: Vec::new(),
        })
        .unwrap();
        let log = dir.path().join("log");
        let script = format!(
            "exec 1>&2
             cat {allowed}
             cat {secret} || echo secret-hidden
             echo written > {writable} && echo writable-ok
             echo x > {allowed} || echo allowed-readonly
             touch /usr/x || echo usr-readonly
             touch /x || echo root-readonly
             id -u
             unshare -U true && echo UNSHARED || echo unshare-refused
             echo /proc/[0-9]*
             grep -c : /proc/net/dev
             ls /sys /etc/shadow /root /home 2>/dev/null || echo no-host-dirs
             cat /proc/sys/kernel/hostname",
            allowed = allowed.display(),
            secret = secret.display(),
            writable = writable.display(),
        );
        let child = crate::qemu::spawn_child(
            Path::new("/bin/sh"),
            &["sh".to_string(), "-c".to_string(), script],
            &[("PATH", "/usr/bin:/bin".to_string())],
            std::fs::File::create(&log).unwrap(),
            vec![slot.lock_fd()],
            false,
            true,
            Some(plan),
        )
        .await
        .unwrap();
        let pidfd = crate::qemu::PidFd::from_owned(child.pidfd).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(30), pidfd.wait())
            .await
            .expect("the jailed shell ends")
            .unwrap();
        let status = pidfd.reap();
        let out = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<&str> = out.lines().filter(|l| !l.contains(": ")).collect();
        assert!(status.success(), "{status:?}: {out}");
        assert_eq!(
            lines,
            [
                "given",
                "secret-hidden",
                "writable-ok",
                "allowed-readonly",
                "usr-readonly",
                "root-readonly",
                &slot.qemu_uid().to_string(),
                "unshare-refused",
                "/proc/1",
                "1",
                "no-host-dirs",
                "moat-jail",
            ],
            "{out}"
        );
        assert_eq!(std::fs::read_to_string(&writable).unwrap(), "written\n");
        assert_eq!(std::fs::read_to_string(&allowed).unwrap(), "given\n");
    }

    /// The daemon creates threads all the time (tokio's blocking pool). A jailed child cloned
    /// while another thread was being created used to wait forever in glibc's `setgroups`,
    /// which waits for every thread the parent had: QEMU never started and its sandbox hung.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_jailed_spawn_survives_threads_being_created_beside_it() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        let host = Arc::new(JailHost::check().expect("the test host can jail (root, cgroups)"));
        let slot = host
            .take_slot(Limits {
                memory_bytes: 64 << 20,
                pids: 16,
                millicores: 1000,
            })
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let churn = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::spawn(|| ()).join().unwrap();
                }
            })
        };
        let argv = ["true".to_string()];
        for i in 0..40 {
            let plan = Plan::new(JailSpec {
                slot: &slot,
                uid: slot.qemu_uid(),
                view: View::system(),
                new_net: true,
                groups: Vec::new(),
            })
            .unwrap();
            let spawned = crate::qemu::spawn_child(
                Path::new("/bin/true"),
                &argv,
                &[],
                std::fs::File::create("/dev/null").unwrap(),
                vec![slot.lock_fd()],
                false,
                true,
                Some(plan),
            );
            let child = tokio::time::timeout(Duration::from_secs(20), spawned)
                .await
                .unwrap_or_else(|_| panic!("jailed child {i} never reached exec"))
                .unwrap();
            let pidfd = crate::qemu::PidFd::from_owned(child.pidfd).unwrap();
            tokio::time::timeout(Duration::from_secs(20), pidfd.wait())
                .await
                .unwrap_or_else(|_| panic!("jailed child {i} never ended"))
                .unwrap();
            assert!(pidfd.reap().success(), "jailed child {i}");
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
    }

    #[test]
    fn the_filter_refuses_foreign_abis_and_every_listed_call() {
        let f = seccomp_filter();
        // Arch check, x32 check, two instructions per refused call, the final allow.
        assert_eq!(f.len(), 6 + 2 * SECCOMP_DENY.len() + 1);
        assert_eq!(f[1].k, AUDIT_ARCH_X86_64);
        assert_eq!(f[f.len() - 1].k, libc::SECCOMP_RET_ALLOW);
        for (i, (name, nr)) in SECCOMP_DENY.iter().enumerate() {
            assert_eq!(f[6 + 2 * i].k, *nr as u32, "{name}");
            assert_eq!(f[7 + 2 * i].k, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
        }
    }
}
