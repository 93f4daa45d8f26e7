//! Background processes: started in the guest, outliving the session that started them,
//! listed, signalled, waited for and their kept output read, behind the daemon's processes
//! routes. The guest side is `crates/agent/src/procs.rs`.

use std::time::Duration;

use moat_protocol::{channel, Event, ExecRequest, Message, ProcInfo, Request, PROC_LOG_RING};

use super::{
    extend_limited, guest_result, next_msg, sanitize, unexpected, with_deadline, AgentConn,
    ExitStatus, OP_TIMEOUT,
};
use crate::Error;

/// More background processes than this in one listing are refused rather than buffered.
const MAX_PROCS: usize = 100_000;

impl AgentConn {
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
}

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use moat_protocol::Decoder;
    use moat_protocol::{channel, Frame, Kind, Message, PROC_LOG_RING};
    use tokio::io::AsyncWriteExt;

    use crate::agent::tests::{exec_request, next_open, session};

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
