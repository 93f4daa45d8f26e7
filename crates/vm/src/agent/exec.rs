//! Running a process in the guest and streaming its output and exit: `POST …/exec` and the
//! shell of the daemon, `moat run` and `moat exec`. The guest side is `crates/agent/src/exec.rs`.

use std::time::Duration;

use moat_protocol::{channel, Event, ExecRequest, Message, Request, Stream, StreamSender};

use super::{
    extend_limited, guest_result, next_msg, unexpected, with_deadline, AgentConn, OP_TIMEOUT,
};
use crate::Error;

/// Grace the guest gets beyond an exec's own timeout to report the kill.
const EXEC_TIMEOUT_GRACE: Duration = Duration::from_secs(10);

impl AgentConn {
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
