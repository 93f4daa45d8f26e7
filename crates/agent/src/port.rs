//! The virtio-serial port: one reader and one writer thread doing blocking I/O, and the session
//! rules on top of them.
//!
//! The port cannot be waited on for "a host is connected": while none is, `read()` returns 0 at
//! once and `poll()` always reports POLLIN|POLLHUP, but a blocking `write()` waits for the next
//! host. So after an EOF the reader writes an ANNOUNCE frame and blocks in that write until a
//! host comes, then reads again.
//!
//! Every HELLO starts a new session, at any time (a host that reconnects quickly leaves no EOF
//! behind). Outgoing frames carry the generation of the session that produced them; the writer
//! drops frames of older generations, so nothing of an old session follows a new HELLO_ACK.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use moat_protocol::{Decoder, Frame, Hello, HelloAck, Kind, PROTOCOL_VERSION};
use tokio::sync::mpsc;

use crate::sys::{console, lock};

/// Frames the reader may queue for a session's multiplexer before it stops reading the port.
const INCOMING_QUEUE: usize = 64;
/// The writer merges queued frames into writes of about this size.
const WRITE_BATCH: usize = 256 * 1024;

/// A session started by a HELLO: the frames the host sends in it.
pub struct Session {
    pub generation: u64,
    pub frames: mpsc::Receiver<Frame>,
}

/// Sends frames of one session generation to the writer thread. Unbounded on purpose: the
/// multiplexer's flow-control windows bound what is queued, and a paused (quiesced) writer must
/// never block the multiplexer, which has to keep reading to see the end of the quiesce.
pub type FrameSink = std_mpsc::Sender<(u64, Frame)>;

/// What the reader and writer threads share.
///
/// Two locks: `writing` is held across every write to the port (a write blocks while no host
/// is connected), `state` only briefly. So an EOF can end the session at once even while the
/// writer is stuck, and a HELLO_ACK, written under `writing` after the generation changed, is
/// never followed by a frame of the old session.
pub struct Port {
    file: File,
    writing: Mutex<()>,
    state: Mutex<WriterState>,
    unpaused: Condvar,
}

#[derive(Default)]
struct WriterState {
    generation: u64,
    /// A quiesce of `(generation, stream)`: the writer pauses after writing that stream's next
    /// MSG (`Quiesced`) until EOF or RESET arrives on the stream, or the session ends.
    quiesce: Option<(u64, u32)>,
    paused: bool,
}

impl Port {
    /// Starts the reader and writer threads. Sessions are delivered in order; frames for the
    /// writer go into the returned sink.
    pub fn start(
        file: File,
    ) -> io::Result<(Arc<Port>, mpsc::UnboundedReceiver<Session>, FrameSink)> {
        let port = Arc::new(Port {
            file,
            writing: Mutex::default(),
            state: Mutex::default(),
            unpaused: Condvar::new(),
        });
        let (sessions_tx, sessions_rx) = mpsc::unbounded_channel();
        let (sink, frames) = std_mpsc::channel();
        let p = port.clone();
        std::thread::Builder::new()
            .name("port-reader".into())
            .spawn(move || p.read_loop(sessions_tx))?;
        let p = port.clone();
        std::thread::Builder::new()
            .name("port-writer".into())
            .spawn(move || p.write_loop(frames))?;
        Ok((port, sessions_rx, sink))
    }

    fn lock(&self) -> MutexGuard<'_, WriterState> {
        lock(&self.state)
    }

    /// Pauses the writer after the next MSG frame on `stream` of session `generation`.
    pub fn quiesce_after(&self, generation: u64, stream: u32) {
        let mut st = self.lock();
        if st.generation == generation {
            st.quiesce = Some((generation, stream));
        }
    }

    /// Ends the quiesce of `(generation, stream)`, if it is still the current one.
    pub fn resume(&self, generation: u64, stream: u32) {
        let mut st = self.lock();
        if st.quiesce == Some((generation, stream)) {
            st.quiesce = None;
            st.paused = false;
            self.unpaused.notify_all();
        }
    }

    /// Starts a new generation (frames of the old one are dropped from now on) and returns it.
    fn new_generation(&self) -> u64 {
        let mut st = self.lock();
        st.generation += 1;
        st.quiesce = None;
        st.paused = false;
        self.unpaused.notify_all();
        st.generation
    }

    fn lock_writing(&self) -> MutexGuard<'_, ()> {
        lock(&self.writing)
    }

    /// Writes while holding the `writing` lock (a proof of it is the first argument).
    fn write_locked(&self, _writing: &MutexGuard<'_, ()>, bytes: &[u8]) {
        if let Err(e) = (&self.file).write_all(bytes) {
            console(&format!("writing the agent port: {e}"));
        }
    }

    fn read_loop(&self, sessions: mpsc::UnboundedSender<Session>) {
        let mut buf = vec![0u8; 256 * 1024];
        let mut dec = Decoder::new();
        let mut resyncing = false;
        let mut session: Option<mpsc::Sender<Frame>> = None;
        let mut idle_eof = false;
        loop {
            let n = match (&self.file).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    console(&format!("reading the agent port: {e}"));
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if n == 0 {
                // No host: end the session and wait for the next host in a blocking write.
                session = None;
                dec.clear();
                resyncing = false;
                // EOF right after a successful announce: don't spin if writes stop blocking.
                if idle_eof {
                    std::thread::sleep(Duration::from_millis(10));
                }
                self.new_generation();
                let writing = self.lock_writing();
                self.write_locked(&writing, &Frame::new(0, Kind::Announce, vec![]).encode());
                idle_eof = true;
                continue;
            }
            idle_eof = false;
            dec.push(&buf[..n]);
            loop {
                if resyncing {
                    if !dec.resync(Kind::Hello, &[]) {
                        break;
                    }
                    resyncing = false;
                }
                let frame = match dec.next_frame() {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        console(&format!("bad frame from the host ({e}); waiting for HELLO"));
                        session = None;
                        self.new_generation();
                        resyncing = true;
                        continue;
                    }
                };
                if frame.kind == Kind::Hello {
                    match Hello::from_frame(&frame) {
                        Ok((nonce, _)) => session = Some(self.start_session(&nonce, &sessions)),
                        Err(e) => console(&format!("ignoring a bad HELLO: {e}")),
                    }
                    continue;
                }
                let Some(tx) = &session else { continue };
                if matches!(frame.kind, Kind::Eof | Kind::Reset) {
                    // Seen here too, so the end of a quiesce never waits on a stalled mux.
                    let generation = self.lock().generation;
                    self.resume(generation, frame.stream);
                }
                if tx.blocking_send(frame).is_err() {
                    session = None;
                }
            }
        }
    }

    fn start_session(
        &self,
        nonce: &[u8; moat_protocol::NONCE_LEN],
        sessions: &mpsc::UnboundedSender<Session>,
    ) -> mpsc::Sender<Frame> {
        // A new session also ends a quiesce of the old one.
        let generation = self.new_generation();
        let ack = HelloAck {
            version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        };
        let writing = self.lock_writing();
        self.write_locked(&writing, &ack.to_frame(nonce).encode());
        drop(writing);
        let (tx, rx) = mpsc::channel(INCOMING_QUEUE);
        let _ = sessions.send(Session {
            generation,
            frames: rx,
        });
        tx
    }

    fn write_loop(&self, frames: std_mpsc::Receiver<(u64, Frame)>) {
        let mut pending: VecDeque<(u64, Frame)> = VecDeque::new();
        let mut out = Vec::with_capacity(WRITE_BATCH + 64 * 1024);
        loop {
            if pending.is_empty() {
                match frames.recv() {
                    Ok(f) => pending.push_back(f),
                    Err(_) => return,
                }
            }
            let mut size: usize = pending.iter().map(|(_, f)| f.payload.len()).sum();
            while size < WRITE_BATCH {
                let Ok(f) = frames.try_recv() else { break };
                size += f.1.payload.len();
                pending.push_back(f);
            }
            self.wait_unpaused();
            let writing = self.lock_writing();
            let mut st = self.lock();
            while let Some((generation, frame)) = pending.pop_front() {
                if generation != st.generation {
                    continue;
                }
                frame.encode_into(&mut out);
                if frame.kind == Kind::Msg && st.quiesce == Some((generation, frame.stream)) {
                    // `Quiesced` is the last frame out; the rest waits for the resume.
                    st.paused = true;
                    break;
                }
            }
            drop(st);
            self.write_locked(&writing, &out);
            out.clear();
        }
    }

    fn wait_unpaused(&self) {
        let mut st = self.lock();
        while st.paused {
            st = self.unpaused.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}
