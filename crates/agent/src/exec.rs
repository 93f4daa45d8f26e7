//! The `Exec` request: run a process tree in its own session and cgroup (on pipes or on a
//! pseudo-terminal), stream its output, report how it ended.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moat_protocol::{
    channel, ErrorKind, Event, ExecRequest, Message, PtySize, Stream, StreamSender,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::boot::EXEC_CGROUP_ROOT;
use crate::procs::ProcTable;
use crate::pty::Pty;
use crate::reaper::{ExitStatus, Reaper};
use crate::sys::{check, kill_group, lock};
use crate::users;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// State shared by all execs.
#[derive(Clone)]
pub struct Execs {
    reaper: Reaper,
    next_cgroup: Arc<AtomicU64>,
    /// Exec cgroups still holding background processes; removed once they are empty.
    leftover_cgroups: Arc<Mutex<Vec<PathBuf>>>,
    /// Processes started with `ProcStart`; shared by all sessions.
    pub(crate) procs: Arc<Mutex<ProcTable>>,
}

impl Execs {
    pub fn new(reaper: Reaper) -> Execs {
        let leftover_cgroups: Arc<Mutex<Vec<PathBuf>>> = Arc::default();
        let leftovers = leftover_cgroups.clone();
        // A background process of a finished exec exits as our child (PID 1 inherits orphans).
        reaper.on_reap(move || {
            lock(&leftovers).retain(|dir| fs::remove_dir(dir).is_err());
        });
        Execs {
            reaper,
            next_cgroup: Arc::default(),
            leftover_cgroups,
            procs: Arc::default(),
        }
    }

    pub async fn run(&self, req: ExecRequest, mut stream: Stream) {
        let sender = stream.sender();
        let running = match self.start(&req, req.stdin) {
            Ok(r) => r,
            Err((kind, message)) => {
                let _ = sender.msg(&Message::Error { kind, message }).await;
                stream.close();
                return;
            }
        };
        let Running {
            pid,
            mut exit,
            io,
            cgroup,
        } = running;
        let mut attached = sender.msg(&Message::Started { pid }).await.is_ok();
        let (exited_tx, exited_rx) = watch::channel(false);
        let forward_to =
            |rx, channel| tokio::spawn(forward(rx, sender.clone(), channel, exited_rx.clone()));
        let (mut stdin, pty, out, err): (Option<Input>, _, _, _) = match io {
            Io::Pipes {
                stdin,
                stdout,
                stderr,
            } => (
                stdin.map(|s| Box::new(s) as Input),
                None,
                forward_to(Box::new(stdout) as Output, channel::STDOUT),
                Some(forward_to(Box::new(stderr), channel::STDERR)),
            ),
            Io::Pty(pty) => {
                // One merged output: stderr has nothing to say.
                if attached {
                    attached = sender.eof(channel::STDERR).await.is_ok();
                }
                let out = forward_to(Box::new(pty.clone()), channel::STDOUT);
                (Some(Box::new(pty.clone())), Some(pty), out, None)
            }
        };

        let kill_tree = || {
            if cgroup.as_ref().is_none_or(|c| c.kill().is_err()) {
                let _ = kill_group(pid, libc::SIGKILL);
            }
        };
        let mut pending: Option<(Vec<u8>, usize)> = None;
        let deadline = deadline_after(req.timeout_ms);
        let mut timed_out = false;
        let status = loop {
            tokio::select! {
                status = &mut exit => break status.unwrap_or(ExitStatus::Signal(libc::SIGKILL)),
                ev = stream.recv(), if attached && pending.is_none() => match ev {
                    Some(Event::Data { channel: channel::STDIN, data }) => {
                        if stdin.is_some() && !data.is_empty() {
                            pending = Some((data, 0));
                        }
                    }
                    Some(Event::Eof { channel: channel::STDIN }) => stdin = None,
                    Some(Event::Msg(Message::Signal { signal })) => {
                        let _ = kill_group(pid, signal);
                    }
                    Some(Event::Msg(Message::Resize { rows, cols })) => {
                        if let Some(pty) = &pty {
                            let _ = pty.resize(PtySize { rows, cols });
                        }
                    }
                    Some(Event::Reset(_)) => {
                        kill_tree();
                        attached = false;
                    }
                    // The session is gone: the process keeps running, its output is discarded.
                    None => attached = false,
                    Some(_) => {}
                },
                r = write_stdin(&mut stdin, &pending) => match r {
                    Ok(n) => {
                        if let Some((data, off)) = &mut pending {
                            *off += n;
                            if *off == data.len() {
                                pending = None;
                            }
                        }
                    }
                    // The process closed its stdin: drop what the host sends.
                    Err(_) => {
                        stdin = None;
                        pending = None;
                    }
                },
                _ = sleep_until(deadline), if !timed_out => {
                    timed_out = true;
                    kill_tree();
                }
            }
        };
        drop(stdin);
        let _ = exited_tx.send(true);
        let _ = out.await;
        if let Some(err) = err {
            let _ = err.await;
        }
        drop(pty);
        if attached {
            let (code, signal) = match status {
                ExitStatus::Code(c) => (Some(c), None),
                ExitStatus::Signal(s) => (None, Some(s)),
            };
            let _ = sender
                .msg(&Message::Exited {
                    code,
                    signal,
                    timed_out,
                })
                .await;
        }
        stream.close();
        self.release_cgroup(cgroup);
    }

    /// Removes an exec's cgroup, or leaves it to the reaper while background processes of the
    /// tree still live in it.
    pub(crate) fn release_cgroup(&self, cgroup: Option<ExecCgroup>) {
        if let Some(cg) = cgroup {
            if fs::remove_dir(&cg.dir).is_err() {
                lock(&self.leftover_cgroups).push(cg.dir);
            }
        }
    }

    /// Starts `req` on pipes, or on a new terminal when it asks for one (which implies input).
    /// Without `stdin` the process reads `/dev/null`.
    pub(crate) fn start(
        &self,
        req: &ExecRequest,
        stdin: bool,
    ) -> Result<Running, (ErrorKind, String)> {
        let Some(argv0) = req.argv.first() else {
            return Err((ErrorKind::InvalidInput, "argv is empty".into()));
        };
        let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
        let group = fs::read_to_string("/etc/group").unwrap_or_default();
        let ident = users::resolve(req.user.as_deref(), &passwd, &group)
            .map_err(|e| (ErrorKind::UnknownUser, e))?;
        let env: Vec<(&str, &str)> = req.env.iter().filter_map(|e| e.split_once('=')).collect();
        let cwd = match &req.cwd {
            Some(cwd) => {
                if !Path::new(cwd).is_dir() {
                    return Err((ErrorKind::NotFound, format!("{cwd}: no such directory")));
                }
                PathBuf::from(cwd)
            }
            None if Path::new(&ident.home).is_dir() => PathBuf::from(&ident.home),
            None => PathBuf::from("/"),
        };
        let path_var = env.iter().find(|(k, _)| *k == "PATH").map(|(_, v)| *v);
        let program = find_program(argv0, path_var, &cwd, is_executable).ok_or_else(|| {
            (
                ErrorKind::CommandNotFound,
                format!("{argv0}: command not found"),
            )
        })?;

        let mut cmd = Command::new(&program);
        cmd.arg0(argv0)
            .args(&req.argv[1..])
            .env_clear()
            .envs(env.iter().copied())
            .current_dir(&cwd);
        if !env.iter().any(|(k, _)| *k == "HOME") {
            cmd.env("HOME", &ident.home);
        }
        // TLS clients find the group's egress CA (trust.rs), and identity clients the
        // in-guest endpoint (net.rs), unless the exec sets these itself.
        for (k, v) in crate::trust::exec_env()
            .into_iter()
            .chain(crate::net::identity_env())
        {
            if !env.iter().any(|(e, _)| *e == k) {
                cmd.env(k, v);
            }
        }
        let other = |e: io::Error| (ErrorKind::Other, e.to_string());
        let ends = match req.pty {
            Some(size) => {
                if !env.iter().any(|(k, _)| *k == "TERM") {
                    cmd.env("TERM", "xterm-256color");
                }
                let (pty, slave) = Pty::open(size).map_err(other)?;
                let dup = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(other);
                cmd.stdin(dup(&slave)?)
                    .stdout(dup(&slave)?)
                    .stderr(Stdio::from(slave));
                ParentEnds::Pty(pty)
            }
            None => {
                let (stdout_rx, stdout_tx) = pipe_pair().map_err(other)?;
                let (stderr_rx, stderr_tx) = pipe_pair().map_err(other)?;
                let stdin = if stdin {
                    let (rx, tx) = pipe_pair().map_err(other)?;
                    cmd.stdin(Stdio::from(rx));
                    Some(tx)
                } else {
                    cmd.stdin(Stdio::null());
                    None
                };
                cmd.stdout(Stdio::from(stdout_tx))
                    .stderr(Stdio::from(stderr_tx));
                ParentEnds::Pipes {
                    stdin,
                    stdout: stdout_rx,
                    stderr: stderr_rx,
                }
            }
        };

        // Without cgroups the tree is still reachable through its process group.
        let cgroup = ExecCgroup::create(self.next_cgroup.fetch_add(1, Ordering::Relaxed)).ok();
        let setup = ChildSetup {
            cgroup_procs: cgroup.as_ref().map(|c| c.procs.as_raw_fd()),
            uid: ident.uid,
            gid: ident.gid,
            groups: ident.groups.clone(),
            controlling_tty: req.pty.is_some(),
        };
        // SAFETY: `child_setup` only makes async-signal-safe system calls on data prepared
        // before the fork.
        unsafe { cmd.pre_exec(move || setup.apply()) };
        let (child, exit) = self.reaper.spawn(&mut cmd).map_err(|e| {
            let kind = match e.raw_os_error() {
                Some(libc::ENOENT | libc::EACCES | libc::ENOEXEC) => ErrorKind::CommandNotFound,
                _ => ErrorKind::Other,
            };
            if let Some(cg) = &cgroup {
                let _ = fs::remove_dir(&cg.dir);
            }
            (kind, format!("{argv0}: {e}"))
        })?;
        // Close our copies of the child's ends, or we would never see EOF.
        drop(cmd);
        let receiver = |fd: OwnedFd| pipe::Receiver::from_owned_fd(fd).map_err(other);
        let io = match ends {
            ParentEnds::Pipes {
                stdin,
                stdout,
                stderr,
            } => Io::Pipes {
                stdin: stdin
                    .map(pipe::Sender::from_owned_fd)
                    .transpose()
                    .map_err(other)?,
                stdout: receiver(stdout)?,
                stderr: receiver(stderr)?,
            },
            ParentEnds::Pty(pty) => Io::Pty(pty),
        };
        Ok(Running {
            pid: child.id(),
            exit,
            io,
            cgroup,
        })
    }
}

pub(crate) struct Running {
    pub pid: u32,
    pub exit: tokio::sync::oneshot::Receiver<ExitStatus>,
    pub io: Io,
    pub cgroup: Option<ExecCgroup>,
}

/// The agent's ends of a child's standard streams.
pub(crate) enum Io {
    Pipes {
        stdin: Option<pipe::Sender>,
        stdout: pipe::Receiver,
        stderr: pipe::Receiver,
    },
    Pty(Pty),
}

type Input = Box<dyn AsyncWrite + Unpin + Send>;
type Output = Box<dyn ReadFd>;

/// An output the agent forwards: readable asynchronously, and drainable with raw reads.
pub(crate) trait ReadFd: AsyncRead + AsRawFd + Unpin + Send + Sync {}
impl<T: AsyncRead + AsRawFd + Unpin + Send + Sync> ReadFd for T {}

/// A fresh cgroup v2 per exec, so the whole tree can be killed at once with `cgroup.kill`.
pub(crate) struct ExecCgroup {
    dir: PathBuf,
    /// `cgroup.procs`, opened before the fork; the child writes "0" to it to join.
    procs: fs::File,
}

impl ExecCgroup {
    fn create(n: u64) -> io::Result<ExecCgroup> {
        let dir = Path::new(EXEC_CGROUP_ROOT).join(n.to_string());
        fs::create_dir(&dir)?;
        match fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
        {
            Ok(procs) => Ok(ExecCgroup { dir, procs }),
            Err(e) => {
                let _ = fs::remove_dir(&dir);
                Err(e)
            }
        }
    }

    pub fn kill(&self) -> io::Result<()> {
        fs::write(self.dir.join("cgroup.kill"), "1")
    }
}

/// Everything the child does between fork and exec, allocated before the fork.
struct ChildSetup {
    cgroup_procs: Option<RawFd>,
    uid: u32,
    gid: u32,
    groups: Vec<libc::gid_t>,
    /// Make stdin (a terminal slave) the controlling terminal of the new session.
    controlling_tty: bool,
}

impl ChildSetup {
    /// Runs in the forked child: async-signal-safe system calls only, no allocation.
    fn apply(&self) -> io::Result<()> {
        // SAFETY: plain system calls on integers and on memory owned by `self`, which the
        // child's copy of the address space keeps alive.
        unsafe {
            check(libc::setsid())?;
            if self.controlling_tty {
                check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            }
            if let Some(fd) = self.cgroup_procs {
                // Best effort: without the cgroup the process group still reaches the tree.
                libc::write(fd, b"0".as_ptr().cast(), 1);
            }
            check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
            check(libc::setgid(self.gid))?;
            check(libc::setuid(self.uid))?;
            for sig in 1..libc::SIGRTMAX() {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        }
        Ok(())
    }
}

/// A pipe whose ends are close-on-exec (the child's end gets dup2'ed onto 0/1/2 by std).
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the live array.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

async fn write_stdin(
    stdin: &mut Option<Input>,
    pending: &Option<(Vec<u8>, usize)>,
) -> io::Result<usize> {
    match (stdin, pending) {
        (Some(stdin), Some((data, off))) => stdin.write(&data[*off..]).await,
        _ => std::future::pending().await,
    }
}

/// The deadline of a `timeout_ms`; one too far to represent is no deadline.
pub(crate) fn deadline_after(timeout_ms: Option<u64>) -> Option<Instant> {
    timeout_ms.and_then(|ms| Instant::now().checked_add(Duration::from_millis(ms)))
}

pub(crate) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Forwards one output pipe to the stream. Once the main process has exited, everything it
/// wrote is already in the pipe: forward that, then end the channel even if background
/// processes still hold the pipe open. Whatever they (or a detached exec) write later is read
/// and discarded, so they never block on a full pipe.
async fn forward(
    mut rx: Output,
    sender: StreamSender,
    channel: u8,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; moat_protocol::frame::MAX_DATA_CHUNK];
    let mut live = true;
    loop {
        tokio::select! {
            biased;
            r = rx.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if live && sender.data(channel, &buf[..n]).await.is_err() {
                        live = false;
                    }
                }
            },
            () = wait_exited(&mut exited), if live => {
                let eof = drain(&rx, &mut buf, &sender, channel).await;
                let _ = sender.eof(channel).await;
                if !eof {
                    tokio::spawn(discard(rx));
                }
                return;
            }
        }
    }
    if live {
        let _ = sender.eof(channel).await;
    }
}

async fn wait_exited(exited: &mut watch::Receiver<bool>) {
    // An error means the exec task is gone, which only happens after the exit.
    let _ = exited.wait_for(|e| *e).await;
}

/// Forwards what is buffered in the pipe right now; true when the pipe hit EOF.
async fn drain(rx: &Output, buf: &mut [u8], sender: &StreamSender, channel: u8) -> bool {
    loop {
        // A raw read: tokio's try_read may report WouldBlock before it has seen readiness.
        // SAFETY: reads into `buf`, which is valid for `buf.len()` bytes.
        let n = unsafe { libc::read(rx.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match n {
            0 => return true,
            n if n < 0 => {
                return io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN);
            }
            n => {
                if sender.data(channel, &buf[..n as usize]).await.is_err() {
                    return false;
                }
            }
        }
    }
}

async fn discard(mut rx: Output) {
    let mut buf = vec![0u8; 16 * 1024];
    while matches!(rx.read(&mut buf).await, Ok(n) if n > 0) {}
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds the program to run: `argv0` itself when it contains a '/' (relative to `cwd`),
/// otherwise the first executable match in `path_var` (the default PATH when unset; an empty
/// element means the working directory, as in execvp).
fn find_program(
    argv0: &str,
    path_var: Option<&str>,
    cwd: &Path,
    is_exec: impl Fn(&Path) -> bool,
) -> Option<PathBuf> {
    if argv0.is_empty() {
        return None;
    }
    if argv0.contains('/') {
        let p = cwd.join(argv0);
        return is_exec(&p).then_some(p);
    }
    path_var
        .unwrap_or(DEFAULT_PATH)
        .split(':')
        .map(|dir| match dir {
            "" => cwd.join(argv0),
            dir => cwd.join(dir).join(argv0),
        })
        .find(|p| is_exec(p))
}

/// The parent's ends of a new process's stdio, before they become async [`Io`].
enum ParentEnds {
    Pty(Pty),
    Pipes {
        stdin: Option<OwnedFd>,
        stdout: OwnedFd,
        stderr: OwnedFd,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exists(paths: &'static [&'static str]) -> impl Fn(&Path) -> bool {
        move |p| paths.iter().any(|x| Path::new(x) == p)
    }

    #[test]
    fn path_lookup() {
        let cwd = Path::new("/work");
        let has = exists(&["/usr/bin/ls", "/bin/ls", "/work/tool", "/opt/x/run"]);
        assert_eq!(
            find_program("ls", Some("/usr/local/bin:/usr/bin:/bin"), cwd, &has),
            Some("/usr/bin/ls".into())
        );
        assert_eq!(
            find_program("ls", None, cwd, &has),
            Some("/usr/bin/ls".into())
        );
        assert_eq!(find_program("nope", None, cwd, &has), None);
        assert_eq!(find_program("", None, cwd, &has), None);
        // Slash: no PATH search, relative to the working directory.
        assert_eq!(
            find_program("./tool", Some("/bin"), cwd, &has),
            Some("/work/./tool".into())
        );
        assert_eq!(
            find_program("/opt/x/run", Some(""), cwd, &has),
            Some("/opt/x/run".into())
        );
        assert_eq!(find_program("tool", Some("/bin"), cwd, &has), None);
        // Empty element = working directory; relative elements are relative to it.
        assert_eq!(
            find_program("tool", Some("/bin:"), cwd, &has),
            Some("/work/tool".into())
        );
    }
}
