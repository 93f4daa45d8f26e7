//! Starting the QEMU binary: asking its version, binding the sockets it inherits, and forking
//! it with the right process attributes.
//!
//! Caveat: the parent-death signal fires when the *thread* that forked exits, not the
//! process. All QEMU processes are therefore forked from one dedicated, never-exiting thread
//! ("moat-qemu-spawner"), never from tokio's blocking pool whose threads come and go.

use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream as StdUnixStream};
use std::path::Path;
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use tokio::net::UnixStream;
use tokio::process::{Child, Command};

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
    let binary = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(QEMU_BIN))
        .find(|p| p.is_file())
        .ok_or(Error::ToolMissing {
            tool: QEMU_BIN,
            package: "qemu-system-x86",
        })?;
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

/// Spawns `cmd` on the spawner thread, inside the caller's tokio runtime.
async fn spawn_on_spawner(mut cmd: Command) -> std::io::Result<Child> {
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: SpawnJob = Box::new(move || {
        let _guard = handle.enter();
        let _ = tx.send(cmd.spawn());
    });
    spawner()
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .send(job)
        .map_err(|_| std::io::Error::other("QEMU spawner thread is gone"))?;
    rx.await
        .map_err(|_| std::io::Error::other("QEMU spawner thread dropped the request"))?
}

/// Binds a listening Unix socket at `path`, replacing a stale socket file.
pub(super) fn bind(path: &Path) -> Result<UnixListener> {
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

/// Starts QEMU with `args` on the spawner thread, its stderr going to `stderr`. It inherits
/// the descriptors in `keep` (all others are close-on-exec); attached, it runs in its own
/// process group and dies with us, `detached` in a session of its own.
pub(super) async fn spawn(
    args: &[String],
    stderr: File,
    keep: Vec<RawFd>,
    detached: bool,
) -> Result<Child> {
    let mut cmd = Command::new(QEMU_BIN);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .kill_on_drop(!detached);
    if !detached {
        cmd.process_group(0);
    }
    let parent = std::process::id();
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (setsid, prctl, getppid, fcntl, _exit) on plain integers;
    // it allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            if detached {
                // A session of its own: no signal aimed at our terminal or group reaches it.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // moat died between fork and prctl: the signal will never come, so go now.
            if !detached && libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            for &fd in &keep {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    spawn_on_spawner(cmd).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::ToolMissing {
                tool: QEMU_BIN,
                package: "qemu-system-x86",
            }
        } else {
            Error::io(format!("starting {QEMU_BIN}"), e)
        }
    })
}
