//! Starting the QEMU binary: asking its version, binding the sockets it inherits, and forking
//! it with the right process attributes.
//!
//! Caveat: the parent-death signal fires when the *thread* that forked exits, not the
//! process. All QEMU processes are therefore forked from one dedicated, never-exiting thread
//! ("moat-qemu-spawner"), never from tokio's blocking pool whose threads come and go.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use tokio::net::UnixStream;

use super::QEMU_BIN;
use crate::error::IoContext;
use crate::{Error, Result};

/// `qemu-system-x86_64 --version`'s first line, e.g. `QEMU emulator version 7.2.22 (...)`.
/// Part of every snapshot's compatibility key.
pub fn qemu_version() -> Result<String> {
    let out = crate::util::run(
        std::process::Command::new(QEMU_BIN).arg("--version"),
        QEMU_BIN,
        "qemu-system-x86",
    )?;
    Ok(out.lines().next().unwrap_or_default().trim().to_string())
}

/// [`qemu_version`], remembered in the file `cache` for as long as the QEMU binary on PATH is
/// the same file (path, size, mtime, inode): asking QEMU costs ~80 ms, a fifth of a warm
/// `moat run`, and the answer only changes when QEMU is reinstalled.
pub fn qemu_version_cached(cache: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let binary = qemu_binary()?;
    let md = std::fs::metadata(&binary).ctx(|| format!("inspecting {}", binary.display()))?;
    let identity = format!(
        "{}|{}|{}.{}|{}",
        binary.display(),
        md.len(),
        md.mtime(),
        md.mtime_nsec(),
        md.ino()
    );
    if let Ok(bytes) = std::fs::read(cache) {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            if v["binary"] == identity.as_str() {
                if let Some(version) = v["version"].as_str() {
                    return Ok(version.to_string());
                }
            }
        }
    }
    let version = qemu_version()?;
    let record = serde_json::json!({ "binary": identity, "version": version });
    crate::util::write_atomic(cache, record.to_string().as_bytes())?;
    Ok(version)
}

/// The QEMU binary on PATH (the jail execs an absolute path: it has no PATH to search).
pub(crate) fn qemu_binary() -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(QEMU_BIN))
        .find(|p| p.is_file())
        .ok_or(Error::ToolMissing {
            tool: QEMU_BIN,
            package: "qemu-system-x86",
        })
}

type SpawnJob = Box<dyn FnOnce() + Send>;

/// The long-lived thread all QEMUs are forked from (see the module docs for why).
fn spawner() -> Result<std::sync::MutexGuard<'static, mpsc::Sender<SpawnJob>>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let m = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let spawned = std::thread::Builder::new()
            .name("moat-qemu-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the QEMU spawner thread: {e}");
        }
        Mutex::new(tx)
    });
    m.lock()
        .map_err(|_| Error::InvalidArgument("QEMU spawner lock poisoned".into()))
}

/// Binds a listening Unix socket at `path`, replacing a stale socket file.
pub(crate) fn bind(path: &Path) -> Result<UnixListener> {
    if path.as_os_str().len() >= 108 {
        return Err(Error::InvalidArgument(format!(
            "socket path {} is longer than the 107 bytes Unix sockets allow: use a shorter run/home directory",
            path.display()
        )));
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).ctx(|| format!("binding {}", path.display()))
}

/// Connects to one of our own listening sockets. The listener is already in the listen
/// state, so this completes at once (queued in the backlog until QEMU accepts).
pub(super) fn connect(path: &Path) -> Result<UnixStream> {
    let s = StdUnixStream::connect(path).ctx(|| format!("connecting to {}", path.display()))?;
    s.set_nonblocking(true)
        .ctx(|| format!("configuring {}", path.display()))?;
    UnixStream::from_std(s).ctx(|| format!("registering {}", path.display()))
}

/// A process [`spawn_child`] started: our child, watched and reaped through its pidfd.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: u32,
    pub pidfd: OwnedFd,
}

/// Starts `program` (QEMU, or the sandbox's network stack; an absolute path) with `argv`
/// (whose first element is what `ps` shows, and what moat itself looks for in
/// `/proc/<pid>/cmdline`) and
/// exactly the environment `env` on the spawner thread, its stdin and stdout on `/dev/null`
/// and its stderr going to `stderr`. It inherits the descriptors in `keep` and no other.
/// Attached, it runs in its own process group and dies with us; `detached`, in a session of
/// its own. With a `jail` [`Plan`](crate::jail::Plan) it starts in its new namespaces and
/// enters the jail before exec; any failure there is returned with the step that failed.
/// Without `huge_pages` it runs with transparent huge pages off (`PR_SET_THP_DISABLE`, kept
/// across exec), whatever it asks for with `madvise`.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn spawn_child(
    program: &Path,
    argv: &[String],
    env: &[(&str, String)],
    stderr: File,
    keep: Vec<RawFd>,
    detached: bool,
    huge_pages: bool,
    jail: Option<crate::jail::Plan>,
) -> std::io::Result<Spawned> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
    let prog =
        CString::new(program.as_os_str().as_bytes()).map_err(|_| invalid("NUL in program path"))?;
    let argv_c = argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| invalid("NUL in an argument")))
        .collect::<std::io::Result<Vec<_>>>()?;
    let env_c = env
        .iter()
        .map(|(k, v)| {
            CString::new(format!("{k}={v}")).map_err(|_| invalid("NUL in the environment"))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    if keep.iter().any(|&fd| fd < 3) {
        return Err(invalid(
            "an inherited descriptor is below 3 (is stdin closed?)",
        ));
    }
    let devnull = File::open("/dev/null")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: SpawnJob = Box::new(move || {
        let child = Child {
            prog,
            argv: argv_c,
            env: env_c,
            stderr,
            devnull,
            keep,
            detached,
            huge_pages,
            jail,
        };
        let _ = tx.send(child.spawn());
    });
    spawner()
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .send(job)
        .map_err(|_| std::io::Error::other("QEMU spawner thread is gone"))?;
    rx.await
        .map_err(|_| std::io::Error::other("QEMU spawner thread dropped the request"))?
}

/// Everything the child needs, allocated before the clone.
struct Child {
    prog: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    stderr: File,
    devnull: File,
    keep: Vec<RawFd>,
    detached: bool,
    huge_pages: bool,
    jail: Option<crate::jail::Plan>,
}

/// `struct clone_args` of clone3(2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// What a failed child writes to the error pipe: the step (a `&'static str` of this same
/// executable, so its address means the same in the parent) and errno.
#[repr(C)]
#[derive(Clone, Copy)]
struct ChildError {
    step_ptr: usize,
    step_len: usize,
    errno: i32,
}

impl Child {
    fn spawn(self) -> std::io::Result<Spawned> {
        let argv: Vec<*const libc::c_char> = self
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp: Vec<*const libc::c_char> = self
            .env
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        // Readable once we are gone: lets the child notice a parent that died before the
        // child could ask for its death signal (getppid is 0 in a new PID namespace).
        let me = super::pidfd::pidfd_open(std::process::id())?;
        let mut pipe = [0; 2];
        // SAFETY: pipe2(2) fills the two-element array on our stack.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and nothing else owns them.
        let (err_r, err_w) =
            unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
        let mut pidfd: libc::c_int = -1;
        let args = CloneArgs {
            flags: self.jail.as_ref().map_or(0, |j| j.clone_flags) | libc::CLONE_PIDFD as u64,
            pidfd: &mut pidfd as *mut libc::c_int as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..CloneArgs::default()
        };
        // SAFETY: clone3(2) with a valid clone_args of the size we pass and no new stack: like
        // fork, the child continues here on a copy of this thread's stack. The child runs
        // only `child_main`, which makes async-signal-safe system calls and never returns.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if pid == 0 {
            let e = self.child_main(&argv, &envp, me.as_raw_fd());
            // SAFETY: write(2) of a plain struct to the error pipe, then _exit(2).
            unsafe {
                libc::write(
                    err_w.as_raw_fd(),
                    (&e as *const ChildError).cast(),
                    std::mem::size_of::<ChildError>(),
                );
                libc::_exit(127);
            }
        }
        drop(err_w);
        // SAFETY: the kernel stored a new pidfd in `pidfd`; nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let mut e = ChildError {
            step_ptr: 0,
            step_len: 0,
            errno: 0,
        };
        let n = loop {
            // SAFETY: read(2) into a plain struct on our stack, at most its size.
            let n = unsafe {
                libc::read(
                    err_r.as_raw_fd(),
                    (&mut e as *mut ChildError).cast(),
                    std::mem::size_of::<ChildError>(),
                )
            };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break n;
        };
        if n == 0 {
            return Ok(Spawned {
                pid: pid as u32,
                pidfd,
            });
        }
        super::pidfd::reap_blocking(&pidfd);
        if n as usize != std::mem::size_of::<ChildError>() {
            return Err(std::io::Error::other("the child failed before exec"));
        }
        // SAFETY: the child copied a pointer and length of a `&'static str` of this very
        // executable (same mapping in parent and child); it points into our read-only data.
        let step = unsafe {
            std::str::from_utf8_unchecked(std::slice::from_raw_parts(
                e.step_ptr as *const u8,
                e.step_len,
            ))
        };
        let os = std::io::Error::from_raw_os_error(e.errno);
        Err(std::io::Error::new(os.kind(), format!("{step}: {os}")))
    }

    /// The child between clone and exec: async-signal-safe system calls only, on memory
    /// allocated before the clone. Returns only on failure.
    fn child_main(
        &self,
        argv: &[*const libc::c_char],
        envp: &[*const libc::c_char],
        parent: RawFd,
    ) -> ChildError {
        let fail = |step: &'static str, errno: i32| ChildError {
            step_ptr: step.as_ptr() as usize,
            step_len: step.len(),
            errno,
        };
        let last = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        // SAFETY: plain system calls on integers and on memory owned by `self`, `argv` and
        // `envp`, which the child's copy of the address space keeps alive.
        unsafe {
            if self.detached {
                // A session of its own: no signal aimed at our terminal or group reaches it.
                if libc::setsid() < 0 {
                    return fail("setsid", last());
                }
            } else if libc::setpgid(0, 0) != 0 {
                return fail("setpgid", last());
            }
            if let Some(plan) = &self.jail {
                if let Err((step, errno)) = plan.apply() {
                    return fail(step, errno);
                }
            }
            // After the jail's uid change, which clears the death signal.
            if !self.detached
                && libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
            {
                return fail("prctl(PR_SET_PDEATHSIG)", last());
            }
            let mut pfd = libc::pollfd {
                fd: parent,
                events: libc::POLLIN,
                revents: 0,
            };
            // moat died before the death signal was set: it will never come, so go now.
            if !self.detached && libc::poll(&mut pfd, 1, 0) > 0 {
                libc::_exit(1);
            }
            if !self.huge_pages && libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
                return fail("prctl(PR_SET_THP_DISABLE)", last());
            }
            // Rust ignores SIGPIPE; the child gets the default, and an empty signal mask.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            if libc::dup2(self.devnull.as_raw_fd(), 0) < 0
                || libc::dup2(self.devnull.as_raw_fd(), 1) < 0
                || libc::dup2(self.stderr.as_raw_fd(), 2) < 0
            {
                return fail("dup2", last());
            }
            // Nothing of ours leaks into the child but what it is given.
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                return fail("close_range", last());
            }
            for &fd in &self.keep {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return fail("keeping an inherited descriptor", last());
                }
            }
            libc::execve(self.prog.as_ptr(), argv.as_ptr(), envp.as_ptr());
            fail("exec", last())
        }
    }
}
