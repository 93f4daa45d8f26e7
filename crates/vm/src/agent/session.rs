//! One session with the agent of one VM: the handshake that finds our HELLO_ACK among stale
//! bytes, the pump tasks between the socket and the multiplexer, and the requests about the
//! session and the guest as a whole (refresh, quiesce, shutdown). The guest side is
//! `crates/agent/src/port.rs` (the session) and `control.rs` (those requests).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moat_protocol::{
    channel, Decoder, Frame, Hello, HelloAck, Kind, Message, Mux, NetworkConfig, Refresh, Request,
    Role, Stream, NONCE_LEN, PROTOCOL_VERSION,
};
use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{guest_result, next_msg, op_name, unexpected, with_deadline, OP_TIMEOUT};
use crate::Error;

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
                        // A forged header in front of our nonce: the next resync skips it.
                        Err(_) => continue,
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
        // The guest decides how many it opens: logged at powers of two, so that a flood of
        // them costs the host's log a few lines, not one each.
        let refuser = tokio::spawn(async move {
            let mut refused: u64 = 0;
            while let Some(incoming) = accept.recv().await {
                refused += 1;
                if refused.is_power_of_two() {
                    tracing::warn!(
                        stream = incoming.stream.id(),
                        refused,
                        "guest opened a stream; none are supported, resetting it"
                    );
                }
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

    /// Ends the session and returns once its socket is closed, so that the VM's agent port
    /// is free for a new one; every request on it fails. Waiting matters: an aborted task
    /// drops its half of the socket only when the runtime next gets to it, and QEMU accepts
    /// no new client until it has seen the old one go.
    pub async fn close(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
            // Cancelled (or already finished): either way its future has been dropped.
            let _ = t.await;
        }
    }

    pub(super) async fn open(&self, request: &Request) -> Result<Stream, Error> {
        Ok(self.mux.open(request).await?)
    }

    /// A request whose only reply is one message, within [`OP_TIMEOUT`].
    pub(super) async fn simple(&self, request: Request) -> Result<Message, Error> {
        let what = op_name(&request);
        let mut stream = self.open(&request).await?;
        let reply = with_deadline(what, OP_TIMEOUT, next_msg(&mut stream)).await?;
        stream.close();
        guest_result(reply)
    }

    pub(super) async fn expect_done(&self, request: Request) -> Result<(), Error> {
        let what = op_name(&request);
        match self.simple(request).await? {
            Message::Done => Ok(()),
            other => Err(unexpected(what, &other)),
        }
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

    /// Configures the guest's network interface (idempotent). Done after every boot and
    /// restore.
    pub async fn configure_network(&self, config: NetworkConfig) -> Result<(), Error> {
        self.expect_done(Request::Network(config)).await
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
    use std::time::Duration;

    use moat_protocol::frame::MAX_FRAME_LEN;
    use moat_protocol::{Frame, Kind, NONCE_LEN, PROTOCOL_VERSION};
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    use super::AgentConn;
    use crate::agent::tests::{ack, exec_request, next_open, read_hello, session};
    use crate::Error;
    use moat_protocol::Decoder;

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

    /// Bytes that are not a message, then a frame of a kind that does not exist: each call
    /// fails with an error (no panic, no hang), and after the unknown kind the session is
    /// over, so later calls fail at once.
    #[tokio::test]
    async fn malformed_messages_and_unknown_kinds_become_errors() {
        let (conn, mut guest) = session().await;
        let g = tokio::spawn(async move {
            let mut dec = Decoder::new();
            let id = next_open(&mut guest, &mut dec).await;
            let junk = Frame::new(id, Kind::Msg, b"{not json at all".to_vec());
            guest.write_all(&junk.encode()).await.unwrap();
            let id = next_open(&mut guest, &mut dec).await;
            let mut frame = Frame::new(id, Kind::Msg, b"{}".to_vec()).encode();
            // The kind byte follows the 4-byte length and the 4-byte stream id.
            frame[8] = 0xee;
            guest.write_all(&frame).await.unwrap();
            guest
        });
        let err = conn.stat("/").await.unwrap_err();
        assert!(!err.to_string().is_empty());
        let err = tokio::time::timeout(Duration::from_secs(5), conn.stat("/"))
            .await
            .expect("the host hangs on an unknown frame kind")
            .unwrap_err();
        assert!(matches!(err, Error::AgentGone), "{err}");
        let err = tokio::time::timeout(Duration::from_secs(5), conn.exec(exec_request()))
            .await
            .expect("a call after the session ended hangs")
            .unwrap_err();
        assert!(matches!(err, Error::AgentGone), "{err}");
        drop(g.await.unwrap());
    }
}
