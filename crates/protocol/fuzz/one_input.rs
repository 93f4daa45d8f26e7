//! What one fuzz input must satisfy, shared by the libFuzzer targets (`fuzz_targets/*.rs`, run
//! by scripts/fuzz-protocol.sh) and the bounded smoke run in `cargo test`
//! (`tests/fuzz_smoke.rs`), so both exercise exactly the same entry points. Every byte here is
//! what a hostile guest (or, for requests, a confused host) could put on the agent channel.
//!
//! - [`frames`]: the bytes, cut into reads of sizes the input chooses, through the [`Decoder`]
//!   as both sides drive it (the guest resyncs on a HELLO after an error, the host on its
//!   nonce): no panic, no frame over the limit, what was decoded re-encodes to the same bytes,
//!   and nothing is buffered beyond what was pushed.
//! - [`messages`]: the bytes as each JSON message either side parses (requests, replies,
//!   handshakes): what parses re-serialises and parses to the same value.
//! - [`mux`]: the frames decoded from the bytes, fed to a host and to a guest multiplexer as
//!   the peer's, with a consumer on a stream the host opened: no panic, no hang, and the mux
//!   closes when the peer's frames end.

use std::time::Duration;

use moat_protocol::frame::{HEADER_LEN, MAX_PAYLOAD};
use moat_protocol::{Decoder, Frame, Hello, HelloAck, Kind, Message, Mux, Request, Role};
use tokio::sync::mpsc;

/// Decodes `data` as a peer's byte stream; an error names what broke.
pub fn frames(data: &[u8]) -> Result<(), String> {
    let Some((&shape, bytes)) = data.split_first() else {
        return Ok(());
    };
    // The read sizes: 1..=256 bytes, or everything at once.
    let chunk = if shape == 0 {
        bytes.len().max(1)
    } else {
        usize::from(shape)
    };
    for host in [true, false] {
        let mut dec = Decoder::new();
        let mut pushed = 0usize;
        for piece in bytes.chunks(chunk) {
            dec.push(piece);
            pushed += piece.len();
            loop {
                match dec.next_frame() {
                    Ok(Some(f)) => check_frame(&f)?,
                    Ok(None) => break,
                    Err(_) if host => {
                        // The host's handshake skips a forged header and looks on.
                        dec.clear();
                        break;
                    }
                    Err(_) => {
                        // The guest drops what it has and scans for the next HELLO.
                        if !dec.resync(Kind::Hello, b"") {
                            break;
                        }
                    }
                }
            }
            if dec.buffered() > pushed {
                return Err(format!(
                    "{} bytes buffered of {pushed} pushed",
                    dec.buffered()
                ));
            }
        }
    }
    Ok(())
}

fn check_frame(f: &Frame) -> Result<(), String> {
    if f.payload.len() > MAX_PAYLOAD {
        return Err(format!("a frame of {} bytes got through", f.payload.len()));
    }
    let bytes = f.encode();
    let mut again = Decoder::new();
    again.push(&bytes);
    match again.next_frame() {
        Ok(Some(g)) if &g == f && again.buffered() == 0 => {}
        other => return Err(format!("{f:?} re-decoded as {other:?}")),
    }
    if bytes.len() != HEADER_LEN + f.payload.len() {
        return Err("encoded length is off".to_string());
    }
    // Whatever the host or guest makes of a handshake frame, it must not panic.
    let _ = Hello::from_frame(f);
    let _ = HelloAck::from_frame(f);
    Ok(())
}

/// Parses `data` as every message type of the protocol.
pub fn messages(data: &[u8]) -> Result<(), String> {
    roundtrip::<Request>(data)?;
    roundtrip::<Message>(data)?;
    roundtrip::<Hello>(data)?;
    roundtrip::<HelloAck>(data)
}

fn roundtrip<T>(data: &[u8]) -> Result<(), String>
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let Ok(v) = serde_json::from_slice::<T>(data) else {
        return Ok(());
    };
    let text = serde_json::to_vec(&v).map_err(|e| format!("{v:?} does not serialise: {e}"))?;
    match serde_json::from_slice::<T>(&text) {
        Ok(w) if w == v => Ok(()),
        other => Err(format!(
            "{v:?} came back as {other:?} from {}",
            String::from_utf8_lossy(&text)
        )),
    }
}

/// Feeds the frames of `data` to a host and to a guest mux.
pub fn mux(data: &[u8]) -> Result<(), String> {
    let mut dec = Decoder::new();
    dec.push(data);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = dec.next_frame() {
        frames.push(f);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| e.to_string())?;
    for role in [Role::Host, Role::Guest] {
        let frames = frames.clone();
        rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(10), run_mux(role, frames))
                .await
                .map_err(|_| format!("the {role:?} mux hung"))?
        })?;
    }
    Ok(())
}

async fn run_mux(role: Role, frames: Vec<Frame>) -> Result<(), String> {
    let (in_tx, in_rx) = mpsc::channel(16);
    let (out_tx, mut out_rx) = mpsc::channel(16);
    let (mux, mut accept) = Mux::new(role, in_rx, out_tx);
    // The peer reads what the mux writes (a stalled reader is the transport's business).
    let drain = tokio::spawn(async move { while out_rx.recv().await.is_some() {} });
    // A stream this side opened, with a consumer that takes every event.
    let mut own = mux
        .open(&Request::Quiesce)
        .await
        .map_err(|e| e.to_string())?;
    let consumer = tokio::spawn(async move { while own.recv().await.is_some() {} });
    // Streams the peer opens are taken and read, as the guest serves them.
    let acceptor = tokio::spawn(async move {
        while let Some(mut inc) = accept.recv().await {
            let _ = serde_json::from_slice::<Request>(&inc.request);
            tokio::spawn(async move { while inc.stream.recv().await.is_some() {} });
        }
    });
    for f in frames {
        if in_tx.send(f).await.is_err() {
            return Err("the mux stopped reading".to_string());
        }
    }
    drop(in_tx);
    mux.closed().await;
    if mux.open(&Request::Quiesce).await.is_ok() {
        return Err("a closed mux opened a stream".to_string());
    }
    consumer.await.map_err(|e| e.to_string())?;
    acceptor.await.map_err(|e| e.to_string())?;
    drop(mux);
    drain.abort();
    Ok(())
}
