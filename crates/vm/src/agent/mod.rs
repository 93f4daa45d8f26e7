//! The host side of the agent channel: one session per VM (`session.rs`), and typed requests
//! on top of its multiplexer, one file per feature named like the guest's (`crates/agent/src/`)
//! and the daemon's routes: `exec.rs`, `files.rs`, `procs.rs`.
//!
//! Everything that comes from the guest is hostile input. Frames are bounded by the decoder,
//! messages strictly typed by the protocol crate, and every request that should answer quickly
//! has a deadline, so a guest that lies, floods or stalls costs the host an error, never a hang.
//! The reply checks every request shares live here.

mod exec;
mod files;
mod procs;
mod session;

use std::time::Duration;

use moat_protocol::{Event, Message, Request, Stream};

use crate::Error;

pub use exec::{Exec, ExecEvent, ExitStatus, Output, Stdin};
pub use files::FileReader;
pub use procs::{ProcLogs, ProcStarted};
pub use session::{AgentConn, Quiesced};

/// How long a request that does no real work (stat, mkdir, refresh…) may take in the guest.
/// Generous because a TCG guest is slow; a guest that takes longer is treated as hung.
pub const OP_TIMEOUT: Duration = Duration::from_secs(30);

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

#[cfg(test)]
mod tests {
    //! The host side against a hostile "guest" played by the test over a socket pair; the
    //! helpers that play it are shared with the tests of the other files.

    use moat_protocol::{
        channel, Decoder, ExecRequest, Frame, Hello, HelloAck, Kind, NONCE_LEN, PROTOCOL_VERSION,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    use super::*;

    /// Reads the host's HELLO and returns its nonce.
    pub(super) async fn read_hello(guest: &mut UnixStream) -> [u8; NONCE_LEN] {
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

    pub(super) async fn ack(guest: &mut UnixStream, nonce: &[u8; NONCE_LEN], version: u32) {
        let f = HelloAck {
            version,
            agent_version: "evil".into(),
        }
        .to_frame(nonce);
        guest.write_all(&f.encode()).await.unwrap();
    }

    pub(super) fn exec_request() -> ExecRequest {
        ExecRequest::new(&["true"], &[])
    }

    /// Starts a session and hands the test the guest end, already past the handshake.
    pub(super) async fn session() -> (AgentConn, UnixStream) {
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
    pub(super) async fn next_open(guest: &mut UnixStream, dec: &mut Decoder) -> u32 {
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
}
