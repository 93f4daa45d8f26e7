//! Inbound connections: how the daemon reaches a port in the guest (port exposure and
//! port-forward) without the host kernel ever routing a guest packet. The stack inherits a
//! second listening Unix socket (`run/<id>/ports.sock`, beside the control socket); each
//! connection to it asks for one TCP connection to one guest port and, once the guest
//! accepted, *becomes* that connection's byte stream. One Unix connection per TCP connection
//! keeps flow control, half-closes and resets end to end with no multiplexing and no
//! descriptor passing, and a daemon that restarts just connects again.
//!
//! Protocol (version 1, the control channel's framing, see `control.rs`): the requester sends
//! one line `{"v":1,"type":"connect","port":P}`; the stack answers one line, `{"v":1,"type":
//! "ok"}` once the guest accepted (then raw bytes both ways; a shutdown of either side is the
//! other's end of stream) or `{"v":1,"type":"error","message":…}` and closes (nothing
//! listens, no answer within 5 s, the flow limit, or the stack not started yet).

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::control::{decode, encode, Reply};
use crate::stack::Inbound;
use crate::{Error, Result};

/// The longest request or answer line.
const MAX_LINE: usize = 1024;
/// How long a requester may take to send its line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests waiting for the stack's loop.
const QUEUE: usize = 64;

/// Requester → stack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Connect { port: u16 },
}

/// Opens a connection to the guest's `port` through the stack whose inbound socket is
/// `path`: the returned stream carries the connection's bytes. The error says why not
/// (`Error::Control` with the stack's message when the stack refused).
pub async fn connect(path: &Path, port: u16) -> Result<UnixStream> {
    let context = format!("the network stack's port socket {}", path.display());
    let mut s = UnixStream::connect(path)
        .await
        .map_err(|source| Error::Io {
            context: context.clone(),
            source,
        })?;
    s.write_all(encode(&Request::Connect { port }).as_bytes())
        .await
        .map_err(|source| Error::Io {
            context: context.clone(),
            source,
        })?;
    let line = read_line(&mut s).await.map_err(|source| Error::Io {
        context: context.clone(),
        source,
    })?;
    match line.as_deref().map(decode::<Reply>) {
        Some(Ok(Reply::Ok)) => Ok(s),
        Some(Ok(Reply::Error { message })) => Err(Error::Control(message)),
        Some(Ok(other)) => Err(Error::Control(format!("unexpected answer {other:?}"))),
        Some(Err(e)) => Err(Error::Control(e)),
        None => Err(Error::Control(
            "the network stack closed the connection without an answer".into(),
        )),
    }
}

/// One line, read a byte at a time so that nothing after it is consumed: the bytes after the
/// line belong to the connection. `None` at end of stream before any byte.
async fn read_line<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    loop {
        let mut b = [0u8];
        if s.read(&mut b).await? == 0 {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        if b[0] == b'\n' {
            return String::from_utf8(line)
                .map(Some)
                .map_err(|_| std::io::Error::other("a line that is not UTF-8"));
        }
        if line.len() == MAX_LINE {
            return Err(std::io::Error::other("a line longer than 1 KiB"));
        }
        line.push(b[0]);
    }
}

/// The stack's answer to a requester.
pub(crate) async fn answer<S: AsyncWrite + Unpin>(
    s: &mut S,
    r: std::result::Result<(), String>,
) -> std::io::Result<()> {
    let reply = match r {
        Ok(()) => Reply::Ok,
        Err(message) => Reply::Error { message },
    };
    s.write_all(encode(&reply).as_bytes()).await
}

/// Serves the inbound socket: each request goes to the stack's loop as an [`Inbound`] once
/// `started` is true; before that, and for a bad line, the requester gets an error. Runs
/// until the stack's process ends.
pub(crate) async fn serve(
    listener: UnixListener,
    started: watch::Receiver<bool>,
    to_stack: mpsc::Sender<Inbound>,
) {
    while let Ok((s, _)) = listener.accept().await {
        tokio::spawn(request(s, started.clone(), to_stack.clone()));
    }
}

async fn request(
    mut s: UnixStream,
    started: watch::Receiver<bool>,
    to_stack: mpsc::Sender<Inbound>,
) {
    let line = match tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut s)).await {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => return drop(answer(&mut s, Err(e.to_string())).await),
        Err(_) => return drop(answer(&mut s, Err("no request within 5 s".into())).await),
    };
    let port = match decode::<Request>(&line) {
        Ok(Request::Connect { port }) => port,
        Err(e) => return drop(answer(&mut s, Err(e)).await),
    };
    if !*started.borrow() {
        let why = "the sandbox's network is not started yet (no policy was sent to its stack)";
        return drop(answer(&mut s, Err(why.into())).await);
    }
    if let Err(mpsc::error::SendError(req)) = to_stack.send(Inbound { port, stream: s }).await {
        let mut s = req.stream;
        let _ = answer(&mut s, Err("the network stack is stopping".into())).await;
    }
}

/// Sets up the inbound side of a stack: the task serving `listener`, the sender that marks
/// the stack started, and the receiver its loop takes requests from.
pub(crate) fn channel(listener: UnixListener) -> (watch::Sender<bool>, mpsc::Receiver<Inbound>) {
    let (started_tx, started_rx) = watch::channel(false);
    let (tx, rx) = mpsc::channel(QUEUE);
    tokio::spawn(serve(listener, started_rx, tx));
    (started_tx, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_shape_is_stable() {
        assert_eq!(
            encode(&Request::Connect { port: 8080 }),
            "{\"v\":1,\"type\":\"connect\",\"port\":8080}\n"
        );
        let e = decode::<Request>(r#"{"v":1,"type":"connect","port":70000}"#).unwrap_err();
        assert!(e.contains("70000"), "{e}");
        let e = decode::<Request>(r#"{"v":1,"type":"listen","port":80}"#).unwrap_err();
        assert!(e.contains("listen"), "{e}");
    }

    #[tokio::test]
    async fn a_line_is_read_without_taking_what_follows() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        a.write_all(b"{\"v\":1,\"type\":\"ok\"}\nHELLO")
            .await
            .unwrap();
        assert_eq!(
            read_line(&mut b).await.unwrap().as_deref(),
            Some("{\"v\":1,\"type\":\"ok\"}")
        );
        let mut rest = [0u8; 5];
        b.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"HELLO");
        a.write_all(&[b'x'; MAX_LINE + 1]).await.unwrap();
        assert!(
            read_line(&mut b).await.is_err(),
            "an endless line is refused"
        );
    }

    /// Before the stack is started, and for lines that are not a request, the requester gets
    /// an error that says why; nothing reaches the stack.
    #[tokio::test]
    async fn refusals_before_the_stack_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ports.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (started, mut rx) = channel(listener);
        let e = connect(&path, 8080).await.unwrap_err();
        assert!(e.to_string().contains("not started"), "{e}");

        started.send_replace(true);
        let mut s = UnixStream::connect(&path).await.unwrap();
        s.write_all(b"{\"v\":1,\"type\":\"connect\",\"port\":0x50}\n")
            .await
            .unwrap();
        let line = read_line(&mut s).await.unwrap().unwrap();
        assert!(
            matches!(decode::<Reply>(&line), Ok(Reply::Error { .. })),
            "{line}"
        );
        assert!(rx.try_recv().is_err());

        // A good request reaches the stack with its stream.
        let waiter = tokio::spawn(async move { connect(&path, 8080).await });
        let mut req = rx.recv().await.unwrap();
        assert_eq!(req.port, 8080);
        answer(&mut req.stream, Ok(())).await.unwrap();
        req.stream.write_all(b"bytes").await.unwrap();
        let mut s = waiter.await.unwrap().unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"bytes");
    }
}
