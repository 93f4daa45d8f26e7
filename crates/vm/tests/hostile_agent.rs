//! The host's real agent client (`AgentConn`, its file transfers) against an agent that lies
//! about file sizes and about where a transfer ends. The "agent" is played by this test over a
//! Unix socket pair, in the protocol's raw framing (docs/PROTOCOL.md): it answers the HELLO
//! like the real one, then lies, ignoring flow control where that is the lie. Nothing of the
//! host side is mocked. What must hold: the host never takes a size the guest reports as the
//! truth (it delivers the bytes that came, within bounded memory), a size no file can have is
//! an agent error, and a transfer that is cut or ends out of order is an error, never a
//! shorter file presented as whole; no call hangs.

use std::time::Duration;

use moat_protocol::mux::INITIAL_WINDOW;
use moat_protocol::{
    channel, Decoder, DirEntry, FileKind, FileStat, Frame, Hello, HelloAck, Kind, Message,
    PROTOCOL_VERSION,
};
use moat_vm::agent::AgentConn;
use moat_vm::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The guest end of a session: reads the host's frames, writes whatever the test wants.
struct EvilAgent {
    sock: UnixStream,
    dec: Decoder,
}

impl EvilAgent {
    /// Starts a session: the host's `connect` and the handshake, answered as the real agent
    /// would.
    async fn session() -> (AgentConn, EvilAgent) {
        let (host, guest) = UnixStream::pair().unwrap();
        let agent = tokio::spawn(async move {
            let mut evil = EvilAgent {
                sock: guest,
                dec: Decoder::new(),
            };
            let hello = evil.next_frame().await;
            let (nonce, _) = Hello::from_frame(&hello).unwrap();
            let ack = HelloAck {
                version: PROTOCOL_VERSION,
                agent_version: "liar".into(),
            };
            evil.send(ack.to_frame(&nonce)).await;
            evil
        });
        let conn = AgentConn::connect(host, Duration::from_secs(5))
            .await
            .unwrap();
        (conn, agent.await.unwrap())
    }

    async fn next_frame(&mut self) -> Frame {
        let mut buf = [0u8; 64 * 1024];
        loop {
            if let Some(f) = self.dec.next_frame().unwrap() {
                return f;
            }
            let n = self.sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "the host closed the session");
            self.dec.push(&buf[..n]);
        }
    }

    /// The id of the next stream the host opens (frames in between, such as credit, skipped).
    async fn next_open(&mut self) -> u32 {
        loop {
            let f = self.next_frame().await;
            if f.kind == Kind::Open {
                return f.stream;
            }
        }
    }

    async fn send(&mut self, f: Frame) {
        self.sock.write_all(&f.encode()).await.unwrap();
    }

    async fn msg(&mut self, id: u32, m: &Message) {
        self.send(Frame::new(id, Kind::Msg, serde_json::to_vec(m).unwrap()))
            .await;
    }

    async fn data(&mut self, id: u32, bytes: &[u8]) {
        self.send(Frame::data(id, channel::STDOUT, bytes)).await;
    }

    async fn eof(&mut self, id: u32) {
        self.send(Frame::new(id, Kind::Eof, vec![channel::STDOUT]))
            .await;
    }
}

fn file(size: u64) -> FileStat {
    FileStat {
        kind: FileKind::File,
        size,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
        link_target: None,
    }
}

/// Reads the whole file the way the daemon's download does, chunk by chunk.
async fn read_all(conn: &AgentConn, path: &str) -> Result<Vec<u8>, Error> {
    let mut reader = conn.read_file(path).await?;
    let mut out = Vec::new();
    while let Some(chunk) = reader.chunk().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Every call gets a bound: a hang is a failure of the host, not of the test.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("the host hangs on a lying agent")
}

/// The announced size is a hint nobody relies on: fewer bytes, more bytes, or none of the
/// u64::MAX it claims, the host delivers exactly what came before a proper end.
#[tokio::test]
async fn read_sizes_that_lie_are_not_trusted() {
    let (conn, mut evil) = EvilAgent::session().await;
    let liar = tokio::spawn(async move {
        // Announced 10 bytes, sends 200 KiB.
        let id = evil.next_open().await;
        evil.msg(id, &Message::Stat(file(10))).await;
        for _ in 0..4 {
            evil.data(id, &[b'a'; 50 * 1024]).await;
        }
        evil.eof(id).await;
        evil.msg(id, &Message::Done).await;
        // Announced 1 MiB, sends 5 bytes.
        let id = evil.next_open().await;
        evil.msg(id, &Message::Stat(file(1 << 20))).await;
        evil.data(id, b"short").await;
        evil.eof(id).await;
        evil.msg(id, &Message::Done).await;
        // Announced the most a file can hold, sends 3 bytes.
        let id = evil.next_open().await;
        evil.msg(id, &Message::Stat(file(i64::MAX as u64))).await;
        evil.data(id, b"abc").await;
        evil.eof(id).await;
        evil.msg(id, &Message::Done).await;
        evil
    });
    let got = bounded(read_all(&conn, "/more")).await.unwrap();
    assert_eq!(got.len(), 200 * 1024);
    assert!(got.iter().all(|&b| b == b'a'));
    assert_eq!(bounded(read_all(&conn, "/less")).await.unwrap(), b"short");
    assert_eq!(bounded(read_all(&conn, "/huge")).await.unwrap(), b"abc");
    drop(liar.await.unwrap());
}

/// A size above i64::MAX cannot be a Linux file's (`off_t` is signed): the agent is lying,
/// and a stat, a listing or a read that carries one is refused, so that no caller (the API's
/// documented integer range, a client preallocating) ever sees it.
#[tokio::test]
async fn sizes_no_file_can_have_are_agent_errors() {
    let (conn, mut evil) = EvilAgent::session().await;
    let liar = tokio::spawn(async move {
        let id = evil.next_open().await;
        evil.msg(id, &Message::Stat(file(u64::MAX))).await;
        let id = evil.next_open().await;
        let entries = vec![
            DirEntry {
                name: "honest".into(),
                stat: file(3),
            },
            DirEntry {
                name: "liar".into(),
                stat: file(1 << 63),
            },
        ];
        evil.msg(id, &Message::Entries { entries }).await;
        evil.msg(id, &Message::Done).await;
        let id = evil.next_open().await;
        evil.msg(id, &Message::Stat(file(u64::MAX))).await;
        // An endless stream behind the lie would not be read.
        evil.data(id, b"never mind").await;
        evil
    });
    for err in [
        bounded(conn.stat("/x")).await.unwrap_err(),
        bounded(conn.list("/")).await.unwrap_err(),
        bounded(conn.read_file("/x")).await.unwrap_err(),
    ] {
        assert!(matches!(err, Error::Agent(_)), "{err:?}");
        assert!(err.to_string().contains("no file can have"), "{err}");
    }
    drop(liar.await.unwrap());
}

/// A stream that claims u64::MAX bytes and floods them with no regard for flow control, to
/// a host that is not reading yet: the host buffers at most one window, then resets the
/// stream, and the read ends in an error instead of growing memory or passing as complete.
#[tokio::test]
async fn an_endless_stream_past_the_window_is_cut_off() {
    let (conn, mut evil) = EvilAgent::session().await;
    let (flooded_tx, flooded_rx) = tokio::sync::oneshot::channel();
    let liar = tokio::spawn(async move {
        let id = evil.next_open().await;
        evil.msg(id, &Message::Stat(file(i64::MAX as u64))).await;
        let chunk = vec![b'z'; moat_protocol::frame::MAX_DATA_CHUNK];
        let mut sent = 0u64;
        while sent < 2 * u64::from(INITIAL_WINDOW) {
            evil.data(id, &chunk).await;
            sent += chunk.len() as u64;
        }
        flooded_tx.send(()).unwrap();
        // Keep the session open (and keep sending): the host must end it, not the liar.
        loop {
            let f = evil.next_frame().await;
            if f.kind == Kind::Reset && f.stream == id {
                return (evil, String::from_utf8_lossy(&f.payload).into_owned());
            }
        }
    });
    let mut reader = bounded(conn.read_file("/dev/endless")).await.unwrap();
    flooded_rx.await.unwrap();
    let mut got = 0usize;
    let err = loop {
        match bounded(reader.chunk()).await {
            Ok(Some(c)) => got += c.len(),
            Ok(None) => panic!("an overrun stream ended as a whole file after {got} bytes"),
            Err(e) => break e,
        }
    };
    assert!(got <= INITIAL_WINDOW as usize, "{got} bytes buffered");
    assert!(err.to_string().contains("flow-control window"), "{err}");
    let (_evil, why) = bounded(liar).await.unwrap();
    assert!(why.contains("flow-control window"), "{why}");
    // The session survives the cut stream.
    assert!(!conn.is_closed());
}

/// Every way a read can stop short of its proper end (end-of-file, then done) is an error:
/// a reset, the agent gone, silence, done without end-of-file, data after end-of-file.
#[tokio::test]
async fn a_read_cut_short_is_an_error_never_a_whole_file() {
    let (conn, mut evil) = EvilAgent::session().await;
    let liar = tokio::spawn(async move {
        let id = evil.next_open().await;
        evil.msg(id, &Message::Stat(file(100))).await;
        evil.data(id, b"first half").await;
        evil.send(Frame::new(id, Kind::Reset, b"tired".to_vec()))
            .await;
        // "Done" with no end-of-file: a cut file passed off as whole.
        let id = evil.next_open().await;
        evil.msg(id, &Message::Stat(file(100))).await;
        evil.data(id, b"first half").await;
        evil.msg(id, &Message::Done).await;
        // More data after the end of the file.
        let id = evil.next_open().await;
        evil.msg(id, &Message::Stat(file(4))).await;
        evil.data(id, b"data").await;
        evil.eof(id).await;
        evil.data(id, b"more").await;
        evil.msg(id, &Message::Done).await;
        // Some data, then silence.
        let id = evil.next_open().await;
        evil.msg(id, &Message::Stat(file(100))).await;
        evil.data(id, b"first half").await;
        let silent = evil.next_open().await;
        // The last one: some data, then the agent is gone.
        evil.msg(silent, &Message::Stat(file(100))).await;
        evil.data(silent, b"first half").await;
        drop(evil);
    });
    let err = bounded(read_all(&conn, "/reset")).await.unwrap_err();
    assert!(err.to_string().contains("reset the read"), "{err}");
    let err = bounded(read_all(&conn, "/done")).await.unwrap_err();
    assert!(
        err.to_string().contains("before the end of the file"),
        "{err}"
    );
    let err = bounded(read_all(&conn, "/more")).await.unwrap_err();
    assert!(
        err.to_string().contains("after the end of the file"),
        "{err}"
    );

    let mut reader = bounded(conn.read_file("/silence")).await.unwrap();
    assert_eq!(reader.chunk().await.unwrap().unwrap(), b"first half");
    tokio::time::pause();
    let err = reader.chunk().await.unwrap_err();
    assert!(err.to_string().contains("did not answer"), "{err}");
    tokio::time::resume();

    let mut reader = bounded(conn.read_file("/gone")).await.unwrap();
    assert_eq!(reader.chunk().await.unwrap().unwrap(), b"first half");
    liar.await.unwrap();
    let err = bounded(reader.chunk()).await.unwrap_err();
    assert!(matches!(err, Error::AgentGone), "{err:?}");
}

/// An upload the agent acknowledges before it has all of it (here, before any of it): the
/// host must not report a written file.
#[tokio::test]
async fn a_write_acknowledged_before_its_data_is_refused() {
    let (conn, mut evil) = EvilAgent::session().await;
    let liar = tokio::spawn(async move {
        let id = evil.next_open().await;
        evil.msg(id, &Message::Done).await;
        evil
    });
    // More than a window of data: the host is still sending when the "done" arrives.
    let data = tokio::io::repeat(b'x').take(4 * u64::from(INITIAL_WINDOW));
    let err = bounded(conn.write_file("/up", None, false, data))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Agent(_)), "{err:?}");
    assert!(err.to_string().contains("before it had all"), "{err}");
    drop(liar.await.unwrap());
}
