//! The host side of the agent channel: the session handshake, the transport pump and typed
//! requests on top of the multiplexer.
//!
//! Everything that comes from the guest is hostile input. Frames are bounded by the decoder,
//! messages strictly typed by the protocol crate, and every request that should answer quickly
//! has a deadline, so a guest that lies, floods or stalls costs the host an error, never a hang.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moat_protocol::{
    channel, Decoder, DirEntry, Event, ExecRequest, FileStat, Frame, Hello, HelloAck, Kind,
    Message, Mux, ProcInfo, Refresh, Request, Role, Stream, StreamSender, NONCE_LEN, PROC_LOG_RING,
    PROTOCOL_VERSION,
};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::Error;

/// How long a request that does no real work (stat, mkdir, refresh…) may take in the guest.
/// Generous because a TCG guest is slow; a guest that takes longer is treated as hung.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace the guest gets beyond an exec's own timeout to report the kill.
const EXEC_TIMEOUT_GRACE: Duration = Duration::from_secs(10);

/// A live session with the agent of one VM.
#[derive(Debug)]
pub struct AgentConn {
    mux: Mux,
    agent_version: String,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for AgentConn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl AgentConn {
    /// Starts a session on `socket` (a connection to the VM's agent chardev): sends HELLO with
    /// a fresh nonce and skips everything the guest sends until the HELLO_ACK that carries that
    /// nonce, so stale bytes of an earlier session (or a restored snapshot) cannot confuse us.
    pub async fn connect(socket: UnixStream, deadline: Duration) -> Result<AgentConn, Error> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let (mut rd, mut wr) = socket.into_split();
        let hello = Hello {
            version: PROTOCOL_VERSION,
        }
        .to_frame(&nonce)
        .encode();
        let mut decoder = Decoder::new();
        let ack = tokio::time::timeout(deadline, async {
            // A reset or a closed socket both mean the VM went away during the handshake.
            wr.write_all(&hello).await.map_err(|_| Error::AgentGone)?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if decoder.resync(Kind::HelloAck, &nonce) {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => return Ok::<_, Error>(HelloAck::from_frame(&frame)?),
                        Ok(None) => {}
                        // A forged header in front of our nonce: skip past it and keep looking.
                        Err(_) => {
                            decoder.clear();
                            continue;
                        }
                    }
                }
                let n = rd.read(&mut buf).await.map_err(|_| Error::AgentGone)?;
                if n == 0 {
                    return Err(Error::AgentGone);
                }
                decoder.push(&buf[..n]);
            }
        })
        .await
        .map_err(|_| Error::AgentTimeout(deadline))??;
        let (_, ack) = ack;
        if ack.version != PROTOCOL_VERSION {
            return Err(Error::Agent(format!(
                "agent speaks protocol version {}, the host speaks {PROTOCOL_VERSION}; rebuild the \
                 guest assets (moat setup) so that the agent matches this host",
                ack.version
            )));
        }

        let (in_tx, in_rx) = mpsc::channel::<Frame>(256);
        let (out_tx, mut out_rx) = mpsc::channel::<Frame>(256);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                loop {
                    match decoder.next_frame() {
                        Ok(Some(frame)) => {
                            if in_tx.send(frame).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "guest broke the framing; closing the agent channel");
                            return;
                        }
                    }
                }
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => decoder.push(&buf[..n]),
                }
            }
        });
        let writer = tokio::spawn(async move {
            let mut bytes = Vec::with_capacity(256 * 1024);
            while let Some(frame) = out_rx.recv().await {
                bytes.clear();
                frame.encode_into(&mut bytes);
                // Batch what is already queued into one write.
                while bytes.len() < 192 * 1024 {
                    match out_rx.try_recv() {
                        Ok(f) => f.encode_into(&mut bytes),
                        Err(_) => break,
                    }
                }
                if wr.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        let (mux, mut accept) = Mux::new(Role::Host, in_rx, out_tx);
        // The guest may not open streams yet: refuse each one (dropping it sends a RESET).
        let refuser = tokio::spawn(async move {
            while let Some(incoming) = accept.recv().await {
                tracing::warn!(
                    stream = incoming.stream.id(),
                    "guest opened a stream; none are supported, resetting it"
                );
            }
        });
        Ok(AgentConn {
            mux,
            agent_version: ack.agent_version,
            tasks: vec![reader, writer, refuser],
        })
    }

    /// What the agent says its version is. Informational only: never trusted.
    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    pub fn is_closed(&self) -> bool {
        self.mux.is_closed()
    }

    async fn open(&self, request: &Request) -> Result<Stream, Error> {
        Ok(self.mux.open(request).await?)
    }

    /// A request whose only reply is one message, within [`OP_TIMEOUT`].
    async fn simple(&self, request: Request) -> Result<Message, Error> {
        let what = op_name(&request);
        let mut stream = self.open(&request).await?;
        let reply = with_deadline(what, OP_TIMEOUT, next_msg(&mut stream)).await?;
        stream.close();
        guest_result(reply)
    }

    /// Starts a process in the guest. With `request.pty` it runs on a terminal: it always
    /// has a stdin, and its stdout and stderr arrive merged as stdout.
    pub async fn exec(&self, request: ExecRequest) -> Result<Exec, Error> {
        let timeout = request.timeout_ms.map(Duration::from_millis);
        let wants_stdin = request.stdin || request.pty.is_some();
        let mut stream = self.open(&Request::Exec(request)).await?;
        let first = with_deadline("exec", OP_TIMEOUT, next_msg(&mut stream)).await?;
        let pid = match guest_result(first)? {
            Message::Started { pid } => pid,
            other => return Err(unexpected("exec", &other)),
        };
        let stdin = wants_stdin.then(|| Stdin {
            tx: stream.sender(),
        });
        Ok(Exec {
            pid,
            deadline: timeout.map(|t| tokio::time::Instant::now() + t + EXEC_TIMEOUT_GRACE),
            stdin,
            control: stream.sender(),
            stream: Some(stream),
            stdout_open: true,
            stderr_open: true,
        })
    }

    /// Runs a process to completion and collects its output (at most `limit` bytes of each).
    pub async fn exec_output(&self, request: ExecRequest, limit: usize) -> Result<Output, Error> {
        let mut exec = self.exec(request).await?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        loop {
            match exec.next().await? {
                ExecEvent::Stdout(d) => extend_limited(&mut stdout, &d, limit, "stdout")?,
                ExecEvent::Stderr(d) => extend_limited(&mut stderr, &d, limit, "stderr")?,
                ExecEvent::Exit(status) => {
                    return Ok(Output {
                        status,
                        stdout,
                        stderr,
                    })
                }
            }
        }
    }

    pub async fn stat(&self, path: &str) -> Result<FileStat, Error> {
        match self.simple(Request::Stat { path: path.into() }).await? {
            Message::Stat(st) => Ok(st),
            other => Err(unexpected("stat", &other)),
        }
    }

    pub async fn list(&self, path: &str) -> Result<Vec<DirEntry>, Error> {
        let mut stream = self.open(&Request::List { path: path.into() }).await?;
        let mut entries = Vec::new();
        loop {
            match guest_result(with_deadline("list", OP_TIMEOUT, next_msg(&mut stream)).await?)? {
                Message::Entries { entries: mut more } => {
                    if entries.len() + more.len() > MAX_LIST_ENTRIES {
                        return Err(Error::Agent(format!(
                            "directory listing of {path} exceeds {MAX_LIST_ENTRIES} entries"
                        )));
                    }
                    entries.append(&mut more);
                }
                Message::Done => break,
                other => return Err(unexpected("list", &other)),
            }
        }
        stream.close();
        Ok(entries)
    }

    pub async fn mkdir(&self, path: &str, parents: bool, mode: Option<u32>) -> Result<(), Error> {
        self.expect_done(Request::Mkdir {
            path: path.into(),
            parents,
            mode,
        })
        .await
    }

    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), Error> {
        self.expect_done(Request::Remove {
            path: path.into(),
            recursive,
        })
        .await
    }

    /// Sets the guest's wall clock to the host's, reseeds its RNG with host entropy and
    /// optionally renames it. Done after every boot and restore.
    pub async fn refresh(&self, hostname: Option<&str>) -> Result<(), Error> {
        let mut entropy = [0u8; 64];
        rand::rngs::OsRng.fill_bytes(&mut entropy);
        let unix_time_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        self.expect_done(Request::Refresh(Refresh {
            unix_time_ns,
            entropy_hex: hex::encode(entropy),
            hostname: hostname.map(str::to_string),
        }))
        .await
    }

    /// Asks the agent to stop writing, so that no frame is half-written when memory is saved.
    /// The agent stays quiet until the returned guard is released or a new session starts.
    pub async fn quiesce(&self) -> Result<Quiesced, Error> {
        let mut stream = self.open(&Request::Quiesce).await?;
        match guest_result(with_deadline("quiesce", OP_TIMEOUT, next_msg(&mut stream)).await?)? {
            Message::Quiesced => Ok(Quiesced { stream }),
            other => Err(unexpected("quiesce", &other)),
        }
    }

    /// Asks the guest to sync and power off. The VM exits soon after `Ok`.
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.expect_done(Request::Shutdown).await
    }

    /// Starts a background process that outlives this session; its output is kept in the
    /// guest (see [`AgentConn::proc_logs`]). `request` may ask for neither stdin nor a PTY.
    pub async fn proc_start(&self, request: ExecRequest) -> Result<ProcStarted, Error> {
        match self.simple(Request::ProcStart(request)).await? {
            Message::ProcStarted { id, pid } => Ok(ProcStarted {
                id: check_proc_id(id)?,
                pid,
            }),
            other => Err(unexpected("proc start", &other)),
        }
    }

    /// The guest's table of background processes: running ones and the newest finished ones.
    pub async fn proc_list(&self) -> Result<Vec<ProcInfo>, Error> {
        let mut stream = self.open(&Request::ProcList).await?;
        let mut procs = Vec::new();
        loop {
            let reply = with_deadline("proc list", OP_TIMEOUT, next_msg(&mut stream)).await?;
            match guest_result(reply)? {
                Message::Procs { procs: mut more } => {
                    if procs.len() + more.len() > MAX_PROCS {
                        return Err(Error::Agent(format!(
                            "the guest listed more than {MAX_PROCS} background processes"
                        )));
                    }
                    procs.append(&mut more);
                }
                Message::Done => break,
                other => return Err(unexpected("proc list", &other)),
            }
        }
        stream.close();
        Ok(procs)
    }

    /// Sends `signal` to a background process's group; 9 kills its whole tree.
    pub async fn proc_kill(&self, id: &str, signal: i32) -> Result<(), Error> {
        self.expect_done(Request::ProcKill {
            id: id.into(),
            signal,
        })
        .await
    }

    /// Waits up to `timeout` for a background process to end. A process still running then is
    /// an [`Error::Guest`] of kind [`moat_protocol::ErrorKind::Timeout`].
    pub async fn proc_wait(&self, id: &str, timeout: Duration) -> Result<ExitStatus, Error> {
        let request = Request::ProcWait {
            id: id.into(),
            timeout_ms: timeout.as_millis().try_into().unwrap_or(u64::MAX),
        };
        let mut stream = self.open(&request).await?;
        let deadline = timeout.saturating_add(OP_TIMEOUT);
        let reply = with_deadline("proc wait", deadline, next_msg(&mut stream)).await?;
        stream.close();
        match guest_result(reply)? {
            Message::Exited {
                code,
                signal,
                timed_out,
            } => Ok(ExitStatus {
                code,
                signal,
                timed_out,
            }),
            other => Err(unexpected("proc wait", &other)),
        }
    }

    /// What the guest kept of a background process's output: the newest bytes of each stream,
    /// at most [`PROC_LOG_RING`] of each (more from the guest is an error).
    pub async fn proc_logs(&self, id: &str) -> Result<ProcLogs, Error> {
        let mut stream = self.open(&Request::ProcLogs { id: id.into() }).await?;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let (mut stdout_open, mut stderr_open) = (true, true);
        loop {
            let ev =
                with_deadline("proc logs", OP_TIMEOUT, async { Ok(stream.recv().await) }).await?;
            match ev {
                Some(Event::Data { channel, data }) => match channel {
                    channel::STDOUT if stdout_open => {
                        extend_limited(&mut stdout, &data, PROC_LOG_RING, "logged stdout")?
                    }
                    channel::STDERR if stderr_open => {
                        extend_limited(&mut stderr, &data, PROC_LOG_RING, "logged stderr")?
                    }
                    c => return Err(Error::Agent(format!("guest sent logs on channel {c}"))),
                },
                Some(Event::Eof { channel }) => match channel {
                    channel::STDOUT => stdout_open = false,
                    channel::STDERR => stderr_open = false,
                    c => return Err(Error::Agent(format!("guest closed unknown channel {c}"))),
                },
                Some(Event::Msg(m)) => match guest_result(m)? {
                    Message::Done => break,
                    other => return Err(unexpected("proc logs", &other)),
                },
                Some(Event::Reset(why)) => {
                    return Err(Error::Agent(format!("the guest reset proc logs: {why}")))
                }
                None => return Err(Error::AgentGone),
            }
        }
        stream.close();
        Ok(ProcLogs { stdout, stderr })
    }

    async fn expect_done(&self, request: Request) -> Result<(), Error> {
        let what = op_name(&request);
        match self.simple(request).await? {
            Message::Done => Ok(()),
            other => Err(unexpected(what, &other)),
        }
    }

    /// Streams a file out of the guest.
    pub async fn read_file(&self, path: &str) -> Result<FileReader, Error> {
        let mut stream = self.open(&Request::ReadFile { path: path.into() }).await?;
        match guest_result(with_deadline("read", OP_TIMEOUT, next_msg(&mut stream)).await?)? {
            Message::Stat(stat) => Ok(FileReader {
                stat,
                stream: Some(stream),
            }),
            other => Err(unexpected("read", &other)),
        }
    }

    /// Streams `data` into a file in the guest, which replaces the file atomically once all of
    /// it arrived.
    pub async fn write_file<R: tokio::io::AsyncRead + Unpin>(
        &self,
        path: &str,
        mode: Option<u32>,
        make_parents: bool,
        mut data: R,
    ) -> Result<u64, Error> {
        let mut stream = self
            .open(&Request::WriteFile {
                path: path.into(),
                mode,
                make_parents,
            })
            .await?;
        let tx = stream.sender();
        let mut buf = vec![0u8; moat_protocol::frame::MAX_DATA_CHUNK];
        let send = async {
            let mut total = 0u64;
            loop {
                let n = data
                    .read(&mut buf)
                    .await
                    .map_err(|e| Error::io("reading the data to write", e))?;
                if n == 0 {
                    break;
                }
                tx.data(channel::STDIN, &buf[..n]).await?;
                total += n as u64;
            }
            tx.eof(channel::STDIN).await?;
            Ok::<_, Error>(total)
        };
        // The guest may fail early (say, a missing directory): watch for its answer while
        // sending, so that the real error wins over "stream reset".
        tokio::pin!(send);
        let (reply, total) = tokio::select! {
            r = &mut send => {
                let total = r?;
                (with_deadline("write", OP_TIMEOUT, next_msg(&mut stream)).await?, total)
            }
            m = next_msg(&mut stream) => (m?, 0),
        };
        stream.close();
        match guest_result(reply)? {
            Message::Done => Ok(total),
            other => Err(unexpected("write", &other)),
        }
    }
}

/// Listings larger than this are refused rather than buffered.
const MAX_LIST_ENTRIES: usize = 1_000_000;
/// More background processes than this in one listing are refused rather than buffered.
const MAX_PROCS: usize = 100_000;

/// A background process the guest started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStarted {
    /// The guest's id for it (`p1`, `p2`, …), checked to be of that form.
    pub id: String,
    /// Its pid in the guest (informational).
    pub pid: u32,
}

/// The output the guest kept of a background process.
#[derive(Debug, Clone, Default)]
pub struct ProcLogs {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Guest-assigned ids end up in URLs and file names: accept only `p` and a few digits.
fn check_proc_id(id: String) -> Result<String, Error> {
    let digits = id.strip_prefix('p').unwrap_or("");
    if (1..=20).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(id)
    } else {
        Err(Error::Agent(format!(
            "the guest named a process {:?}",
            sanitize(&id)
        )))
    }
}

fn op_name(r: &Request) -> &'static str {
    match r {
        Request::Exec(_) => "exec",
        Request::ReadFile { .. } => "read",
        Request::WriteFile { .. } => "write",
        Request::Stat { .. } => "stat",
        Request::List { .. } => "list",
        Request::Mkdir { .. } => "mkdir",
        Request::Remove { .. } => "remove",
        Request::Refresh(_) => "refresh",
        Request::Quiesce => "quiesce",
        Request::Shutdown => "shutdown",
        Request::ProcStart(_) => "proc start",
        Request::ProcList => "proc list",
        Request::ProcKill { .. } => "proc kill",
        Request::ProcWait { .. } => "proc wait",
        Request::ProcLogs { .. } => "proc logs",
    }
}

async fn with_deadline<T>(
    what: &'static str,
    d: Duration,
    f: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| Error::Agent(format!("the guest did not answer {what} within {d:?}")))?
}

/// The next message on a stream; anything else where a message belongs is a guest error.
async fn next_msg(stream: &mut Stream) -> Result<Message, Error> {
    match stream.recv().await {
        Some(Event::Msg(m)) => Ok(m),
        Some(Event::Reset(why)) => Err(Error::Agent(format!("the guest reset the request: {why}"))),
        Some(other) => Err(Error::Agent(format!(
            "the guest sent {} where a reply belongs",
            event_name(&other)
        ))),
        None => Err(Error::AgentGone),
    }
}

fn event_name(e: &Event) -> &'static str {
    match e {
        Event::Data { .. } => "data",
        Event::Eof { .. } => "end-of-file",
        Event::Msg(_) => "a message",
        Event::Reset(_) => "a reset",
    }
}

fn guest_result(m: Message) -> Result<Message, Error> {
    match m {
        Message::Error { kind, message } => Err(Error::Guest {
            kind,
            message: sanitize(&message),
        }),
        other => Ok(other),
    }
}

fn unexpected(what: &str, m: &Message) -> Error {
    Error::Agent(format!(
        "the guest answered {what} with an unexpected {m:?}"
    ))
}

/// Guest text shown to users: bounded and stripped of control characters.
fn sanitize(s: &str) -> String {
    s.chars()
        .take(1024)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

fn extend_limited(buf: &mut Vec<u8>, d: &[u8], limit: usize, what: &str) -> Result<(), Error> {
    if buf.len() + d.len() > limit {
        return Err(Error::Agent(format!("{what} exceeded {limit} bytes")));
    }
    buf.extend_from_slice(d);
    Ok(())
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
}

impl ExitStatus {
    /// The exit code a shell would report: the code, 128+N for signal N, 124 on timeout.
    pub fn shell_code(&self) -> i32 {
        if self.timed_out {
            124
        } else if let Some(s) = self.signal {
            128 + s
        } else {
            self.code.unwrap_or(255)
        }
    }
}

/// Output of a finished process.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// One thing a running process did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
}

/// A process running in the guest. Dropping it before the exit kills the process tree.
#[derive(Debug)]
pub struct Exec {
    pid: u32,
    deadline: Option<tokio::time::Instant>,
    stdin: Option<Stdin>,
    control: StreamSender,
    stream: Option<Stream>,
    stdout_open: bool,
    stderr_open: bool,
}

impl Exec {
    /// The pid in the guest, as the guest reports it (informational).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The stdin writer, once, when the exec was started with `stdin: true`.
    pub fn take_stdin(&mut self) -> Option<Stdin> {
        self.stdin.take()
    }

    /// Delivers a signal to the process.
    pub async fn signal(&self, signal: i32) -> Result<(), Error> {
        Ok(self.control.msg(&Message::Signal { signal }).await?)
    }

    /// Resizes the terminal of a PTY exec (ignored by the guest for one without).
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), Error> {
        Ok(self.control.msg(&Message::Resize { rows, cols }).await?)
    }

    /// The next output chunk or the exit. Output always comes before the exit.
    pub async fn next(&mut self) -> Result<ExecEvent, Error> {
        let Some(stream) = self.stream.as_mut() else {
            return Err(Error::Agent("exec already finished".into()));
        };
        loop {
            let ev = match self.deadline {
                Some(d) => tokio::time::timeout_at(d, stream.recv())
                    .await
                    .map_err(|_| {
                        Error::Agent("the guest did not end a timed-out process".into())
                    })?,
                None => stream.recv().await,
            };
            match ev {
                Some(Event::Data { channel, data }) => match channel {
                    channel::STDOUT if self.stdout_open => return Ok(ExecEvent::Stdout(data)),
                    channel::STDERR if self.stderr_open => return Ok(ExecEvent::Stderr(data)),
                    c => {
                        return Err(Error::Agent(format!(
                            "guest sent data on closed channel {c}"
                        )))
                    }
                },
                Some(Event::Eof { channel }) => match channel {
                    channel::STDOUT => self.stdout_open = false,
                    channel::STDERR => self.stderr_open = false,
                    c => return Err(Error::Agent(format!("guest closed unknown channel {c}"))),
                },
                Some(Event::Msg(m)) => match guest_result(m)? {
                    Message::Exited {
                        code,
                        signal,
                        timed_out,
                    } => {
                        if let Some(s) = self.stream.take() {
                            s.close();
                        }
                        return Ok(ExecEvent::Exit(ExitStatus {
                            code,
                            signal,
                            timed_out,
                        }));
                    }
                    other => return Err(unexpected("exec", &other)),
                },
                Some(Event::Reset(why)) => {
                    return Err(Error::Agent(format!("the guest reset the exec: {why}")))
                }
                None => return Err(Error::AgentGone),
            }
        }
    }
}

/// Writes to a process's stdin.
#[derive(Debug, Clone)]
pub struct Stdin {
    tx: StreamSender,
}

impl Stdin {
    pub async fn write(&self, data: &[u8]) -> Result<(), Error> {
        Ok(self.tx.data(channel::STDIN, data).await?)
    }

    pub async fn close(&self) -> Result<(), Error> {
        Ok(self.tx.eof(channel::STDIN).await?)
    }

    /// Resizes the terminal of a PTY exec, in order with the input written before it (a task
    /// that owns the input side need not share the [`Exec`]).
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), Error> {
        Ok(self.tx.msg(&Message::Resize { rows, cols }).await?)
    }
}

/// A file being read from the guest.
#[derive(Debug)]
pub struct FileReader {
    stat: FileStat,
    stream: Option<Stream>,
}

impl FileReader {
    /// The file's metadata as the guest reported it when it opened it (not trusted for sizes).
    pub fn stat(&self) -> &FileStat {
        &self.stat
    }

    /// The next chunk, or `None` at the end of the file.
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(None);
        };
        loop {
            match with_deadline("read", OP_TIMEOUT, async { Ok(stream.recv().await) }).await? {
                Some(Event::Data {
                    channel: channel::STDOUT,
                    data,
                }) => return Ok(Some(data)),
                Some(Event::Eof {
                    channel: channel::STDOUT,
                }) => {}
                Some(Event::Msg(m)) => {
                    let m = guest_result(m)?;
                    if m != Message::Done {
                        return Err(unexpected("read", &m));
                    }
                    if let Some(s) = self.stream.take() {
                        s.close();
                    }
                    return Ok(None);
                }
                Some(Event::Reset(why)) => {
                    return Err(Error::Agent(format!("the guest reset the read: {why}")))
                }
                Some(_) => return Err(Error::Agent("guest sent data on a wrong channel".into())),
                None => return Err(Error::AgentGone),
            }
        }
    }

    /// Copies the whole file into `out`; returns the byte count.
    pub async fn copy_to<W: tokio::io::AsyncWrite + Unpin>(
        mut self,
        out: &mut W,
    ) -> Result<u64, Error> {
        let mut n = 0u64;
        while let Some(chunk) = self.chunk().await? {
            out.write_all(&chunk)
                .await
                .map_err(|e| Error::io("writing the file read from the guest", e))?;
            n += chunk.len() as u64;
        }
        out.flush()
            .await
            .map_err(|e| Error::io("writing the file read from the guest", e))?;
        Ok(n)
    }
}

/// Holds the agent quiet (see [`AgentConn::quiesce`]). Dropping it lets the agent talk again.
#[derive(Debug)]
pub struct Quiesced {
    stream: Stream,
}

impl Quiesced {
    /// Lets the agent write again, in the same session.
    pub async fn release(self) -> Result<(), Error> {
        self.stream.sender().eof(channel::STDIN).await?;
        self.stream.close();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The host side against a hostile "guest" played by the test over a socket pair.

    use super::*;
    use moat_protocol::frame::MAX_FRAME_LEN;

    /// Reads the host's HELLO and returns its nonce.
    async fn read_hello(guest: &mut UnixStream) -> [u8; NONCE_LEN] {
        let mut dec = Decoder::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = dec.next_frame().unwrap() {
                return Hello::from_frame(&f).unwrap().0;
            }
            let n = guest.read(&mut buf).await.unwrap();
            assert!(n > 0);
            dec.push(&buf[..n]);
        }
    }

    async fn ack(guest: &mut UnixStream, nonce: &[u8; NONCE_LEN], version: u32) {
        let f = HelloAck {
            version,
            agent_version: "evil".into(),
        }
        .to_frame(nonce);
        guest.write_all(&f.encode()).await.unwrap();
    }

    fn exec_request() -> ExecRequest {
        ExecRequest::new(&["true"], &[])
    }

    #[tokio::test]
    async fn garbage_without_ack_times_out() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let flood = tokio::spawn(async move {
            let junk = vec![0x5a; 64 * 1024];
            while guest.write_all(&junk).await.is_ok() {}
        });
        let err = AgentConn::connect(host, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::AgentTimeout(_)), "{err}");
        flood.abort();
    }

    #[tokio::test]
    async fn stale_bytes_and_forged_acks_are_skipped() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let g = tokio::spawn(async move {
            let nonce = read_hello(&mut guest).await;
            // Half a frame from "an earlier session", then an ACK for another nonce.
            guest
                .write_all(&[100, 0, 0, 0, 3, 0, 0, 0, 5, 1])
                .await
                .unwrap();
            ack(&mut guest, &[0u8; NONCE_LEN], PROTOCOL_VERSION).await;
            ack(&mut guest, &nonce, PROTOCOL_VERSION).await;
            guest
        });
        let conn = AgentConn::connect(host, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(conn.agent_version(), "evil");
        drop(g.await.unwrap());
    }

    #[tokio::test]
    async fn wrong_version_is_refused() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let g = tokio::spawn(async move {
            let nonce = read_hello(&mut guest).await;
            ack(&mut guest, &nonce, PROTOCOL_VERSION + 7).await;
            guest
        });
        let err = AgentConn::connect(host, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("protocol version"), "{err}");
        drop(g.await.unwrap());
    }

    /// Starts a session and hands the test the guest end, already past the handshake.
    async fn session() -> (AgentConn, UnixStream) {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let g = tokio::spawn(async move {
            let nonce = read_hello(&mut guest).await;
            ack(&mut guest, &nonce, PROTOCOL_VERSION).await;
            guest
        });
        let conn = AgentConn::connect(host, Duration::from_secs(5))
            .await
            .unwrap();
        (conn, g.await.unwrap())
    }

    /// Reads the next OPEN the host sends and returns its stream id.
    async fn next_open(guest: &mut UnixStream, dec: &mut Decoder) -> u32 {
        let mut buf = [0u8; 4096];
        loop {
            while let Some(f) = dec.next_frame().unwrap() {
                if f.kind == Kind::Open {
                    return f.stream;
                }
            }
            let n = guest.read(&mut buf).await.unwrap();
            assert!(n > 0);
            dec.push(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn oversized_frame_ends_the_session_instead_of_buffering() {
        let (conn, mut guest) = session().await;
        let g = tokio::spawn(async move {
            let mut dec = Decoder::new();
            let id = next_open(&mut guest, &mut dec).await;
            let mut header = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes().to_vec();
            header.extend_from_slice(&id.to_le_bytes());
            header.push(Kind::Data as u8);
            guest.write_all(&header).await.unwrap();
            guest
        });
        let err = conn.exec(exec_request()).await.unwrap_err();
        assert!(matches!(err, Error::AgentGone), "{err}");
        assert!(conn.is_closed());
        drop(g.await.unwrap());
    }

    #[tokio::test]
    async fn lies_and_silence_become_errors() {
        let (conn, mut guest) = session().await;
        let g = tokio::spawn(async move {
            let mut dec = Decoder::new();
            // Exec: claim a start, then write on the stdin channel, which is the host's.
            let id = next_open(&mut guest, &mut dec).await;
            let started = serde_json::to_vec(&Message::Started { pid: 1 }).unwrap();
            guest
                .write_all(&Frame::new(id, Kind::Msg, started).encode())
                .await
                .unwrap();
            guest
                .write_all(&Frame::data(id, channel::STDIN, b"x").encode())
                .await
                .unwrap();
            // Stat: answer with a message of the wrong type.
            let id = next_open(&mut guest, &mut dec).await;
            let wrong = serde_json::to_vec(&Message::Quiesced).unwrap();
            guest
                .write_all(&Frame::new(id, Kind::Msg, wrong).encode())
                .await
                .unwrap();
            // Mkdir: never answer.
            next_open(&mut guest, &mut dec).await;
            guest
        });
        let mut exec = conn.exec(exec_request()).await.unwrap();
        let err = exec.next().await.unwrap_err();
        assert!(err.to_string().contains("closed channel 0"), "{err}");
        let err = conn.stat("/").await.unwrap_err();
        assert!(err.to_string().contains("unexpected"), "{err}");
        tokio::time::pause();
        let err = conn.mkdir("/x", false, None).await.unwrap_err();
        assert!(err.to_string().contains("did not answer"), "{err}");
        drop(g.await.unwrap());
    }

    #[tokio::test]
    async fn hostile_process_replies_are_refused() {
        let (conn, mut guest) = session().await;
        let g = tokio::spawn(async move {
            let mut dec = Decoder::new();
            let reply = |id, m: &Message| Frame::new(id, Kind::Msg, serde_json::to_vec(m).unwrap());
            // ProcStart: an id meant to escape wherever the host puts it.
            let id = next_open(&mut guest, &mut dec).await;
            let started = Message::ProcStarted {
                id: "../../etc".into(),
                pid: 1,
            };
            guest
                .write_all(&reply(id, &started).encode())
                .await
                .unwrap();
            // ProcLogs: more than a ring can hold.
            let id = next_open(&mut guest, &mut dec).await;
            let chunk = vec![b'x'; moat_protocol::frame::MAX_DATA_CHUNK];
            for _ in 0..=PROC_LOG_RING / chunk.len() {
                let f = Frame::data(id, channel::STDOUT, &chunk);
                guest.write_all(&f.encode()).await.unwrap();
            }
            // ProcWait: an answer of the wrong type.
            let id = next_open(&mut guest, &mut dec).await;
            guest
                .write_all(&reply(id, &Message::Done).encode())
                .await
                .unwrap();
            // ProcList: entries, but never the end of the list.
            let id = next_open(&mut guest, &mut dec).await;
            let procs = Message::Procs { procs: vec![] };
            guest.write_all(&reply(id, &procs).encode()).await.unwrap();
            guest
        });
        let err = conn.proc_start(exec_request()).await.unwrap_err();
        assert!(err.to_string().contains("named a process"), "{err}");
        let err = conn.proc_logs("p1").await.unwrap_err();
        assert!(err.to_string().contains("exceeded"), "{err}");
        let err = conn.proc_wait("p1", Duration::ZERO).await.unwrap_err();
        assert!(err.to_string().contains("unexpected"), "{err}");
        tokio::time::pause();
        let err = conn.proc_list().await.unwrap_err();
        assert!(err.to_string().contains("did not answer"), "{err}");
        drop(g.await.unwrap());
    }
}
