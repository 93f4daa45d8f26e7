//! A multiplexer of bidirectional, flow-controlled streams over one frame channel.
//!
//! Both sides run the same code. Each side may open streams (host: odd ids, guest: even ids);
//! a stream carries MSG frames and DATA on numbered channels in both directions. DATA, MSG and
//! EOF frames count against the receiver's window ([`INITIAL_WINDOW`] per stream and direction,
//! each frame costing at least [`MIN_FRAME_COST`]), and the receiver returns credit with WINDOW
//! frames as its consumer takes events. A peer that sends past its window, or sends a malformed
//! message, gets its stream reset: its queue is bounded, so it can never make this side buffer
//! without limit.
//!
//! The mux does not own the transport: it reads frames from one channel and writes frames to
//! another, so the host (a Unix socket) and the guest (a virtio port with odd semantics) pump
//! bytes in their own way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};

use crate::frame::{Frame, Kind, MAX_DATA_CHUNK, MAX_PAYLOAD};
use crate::messages::Message;
use crate::Error;

/// Bytes a sender may have in flight on one stream before the receiver returns credit.
pub const INITIAL_WINDOW: u32 = 2 * 1024 * 1024;
/// The least a flow-controlled frame costs, so that tiny frames cannot flood a queue.
pub const MIN_FRAME_COST: u32 = 64;
/// Credit is returned in batches of at least this much.
const CREDIT_BATCH: u32 = INITIAL_WINDOW / 4;
/// Events one stream can hold: everything a well-behaved peer can have in flight.
const EVENT_QUEUE: usize = (INITIAL_WINDOW / MIN_FRAME_COST) as usize + 8;
/// Streams the peer opened that the application has not accepted yet.
const ACCEPT_QUEUE: usize = 256;
/// Streams the peer may keep open at once.
const MAX_PEER_STREAMS: usize = 4096;

fn cost(payload_len: usize) -> u32 {
    (payload_len as u32).max(MIN_FRAME_COST)
}

/// Which end of the connection this mux is. Decides the parity of stream ids it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Host,
    Guest,
}

/// Something that happened on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Data {
        channel: u8,
        data: Vec<u8>,
    },
    Eof {
        channel: u8,
    },
    Msg(Message),
    /// The peer (or this side, after a protocol violation by the peer) abandoned the stream.
    Reset(String),
}

/// A stream the peer opened, with the raw JSON of its request.
#[derive(Debug)]
pub struct Incoming {
    pub stream: Stream,
    pub request: Vec<u8>,
}

#[derive(Debug)]
enum Closed {
    Reset(String),
    Connection,
}

/// State shared between a stream's handle, its senders and the demux task.
#[derive(Debug)]
struct StreamShared {
    id: u32,
    inner: Mutex<StreamInner>,
    credit_changed: Notify,
}

#[derive(Debug)]
struct StreamInner {
    /// What this side may still send.
    send_credit: u64,
    /// What the peer may still send before this side grants more.
    recv_allowance: i64,
    closed: Option<Closed>,
}

impl StreamShared {
    fn lock(&self) -> MutexGuard<'_, StreamInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self, why: Closed) {
        let mut inner = self.lock();
        if inner.closed.is_none() {
            inner.closed = Some(why);
        }
        drop(inner);
        self.credit_changed.notify_waiters();
    }
}

#[derive(Debug)]
struct Slot {
    shared: Arc<StreamShared>,
    events: mpsc::Sender<(Event, u32)>,
}

#[derive(Debug)]
struct MuxState {
    streams: HashMap<u32, Slot>,
    next_id: u32,
    peer_streams: usize,
}

#[derive(Debug)]
struct MuxShared {
    role: Role,
    out: mpsc::Sender<Frame>,
    state: Mutex<MuxState>,
    closed: watch::Sender<bool>,
}

impl MuxShared {
    fn lock(&self) -> MutexGuard<'_, MuxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn owns(&self, id: u32) -> bool {
        (id % 2 == 1) == (self.role == Role::Host)
    }

    fn remove(&self, id: u32) {
        let mut state = self.lock();
        if state.streams.remove(&id).is_some() && !self.owns(id) {
            state.peer_streams -= 1;
        }
    }

    async fn send(&self, frame: Frame) -> Result<(), Error> {
        self.out.send(frame).await.map_err(|_| Error::Closed)
    }

    /// Sends a frame from a context that cannot wait (a destructor).
    fn send_now(&self, frame: Frame) {
        match self.out.try_send(frame) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(frame)) => {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let out = self.out.clone();
                    rt.spawn(async move { out.send(frame).await });
                }
            }
        }
    }
}

/// One end of a multiplexed connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Mux {
    shared: Arc<MuxShared>,
    closed: watch::Receiver<bool>,
}

impl Mux {
    /// Starts a mux on the current tokio runtime. Frames from the peer arrive on `incoming`;
    /// frames for the peer go to `outgoing`. The mux ends when `incoming` closes; streams the
    /// peer opens come out of the returned receiver.
    pub fn new(
        role: Role,
        incoming: mpsc::Receiver<Frame>,
        outgoing: mpsc::Sender<Frame>,
    ) -> (Mux, mpsc::Receiver<Incoming>) {
        let (closed_tx, closed_rx) = watch::channel(false);
        let shared = Arc::new(MuxShared {
            role,
            out: outgoing,
            state: Mutex::new(MuxState {
                streams: HashMap::new(),
                next_id: if role == Role::Host { 1 } else { 2 },
                peer_streams: 0,
            }),
            closed: closed_tx,
        });
        let (accept_tx, accept_rx) = mpsc::channel(ACCEPT_QUEUE);
        tokio::spawn(demux(shared.clone(), incoming, accept_tx));
        (
            Mux {
                shared,
                closed: closed_rx,
            },
            accept_rx,
        )
    }

    /// Opens a stream with `request` as the OPEN payload.
    pub async fn open<R: Serialize>(&self, request: &R) -> Result<Stream, Error> {
        let payload = serde_json::to_vec(request)?;
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Protocol(format!(
                "request of {} bytes is larger than the {MAX_PAYLOAD}-byte frame limit",
                payload.len()
            )));
        }
        if self.is_closed() {
            return Err(Error::Closed);
        }
        let stream = {
            let mut state = self.shared.lock();
            let mut id = state.next_id;
            while id == 0 || state.streams.contains_key(&id) {
                id = id.wrapping_add(2);
            }
            state.next_id = id.wrapping_add(2);
            let (stream, slot) = new_stream(id, self.shared.clone());
            state.streams.insert(id, slot);
            stream
        };
        self.shared
            .send(Frame::new(stream.id(), Kind::Open, payload))
            .await?;
        Ok(stream)
    }

    /// True once the connection under this mux has ended.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Waits until the connection under this mux ends.
    pub async fn closed(&self) {
        let mut rx = self.closed.clone();
        // An error means the demux task is gone, which also means closed.
        let _ = rx.wait_for(|c| *c).await;
    }
}

fn new_stream(id: u32, mux: Arc<MuxShared>) -> (Stream, Slot) {
    let shared = Arc::new(StreamShared {
        id,
        inner: Mutex::new(StreamInner {
            send_credit: u64::from(INITIAL_WINDOW),
            recv_allowance: i64::from(INITIAL_WINDOW),
            closed: None,
        }),
        credit_changed: Notify::new(),
    });
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let stream = Stream {
        shared: shared.clone(),
        mux,
        events: rx,
        pending_credit: 0,
        finished: false,
        reported_close: false,
    };
    (stream, Slot { shared, events: tx })
}

async fn demux(
    mux: Arc<MuxShared>,
    mut incoming: mpsc::Receiver<Frame>,
    accept: mpsc::Sender<Incoming>,
) {
    while let Some(frame) = incoming.recv().await {
        handle_frame(&mux, frame, &accept).await;
    }
    let slots: Vec<Slot> = mux.lock().streams.drain().map(|(_, s)| s).collect();
    for slot in slots {
        slot.shared.close(Closed::Connection);
    }
    let _ = mux.closed.send(true);
}

/// Resets a stream because the peer broke the rules on it.
async fn violation(mux: &MuxShared, id: u32, why: String) {
    let slot = mux.lock().streams.get(&id).map(|s| s.shared.clone());
    mux.remove(id);
    if let Some(shared) = slot {
        shared.close(Closed::Reset(format!("protocol violation by peer: {why}")));
    }
    let _ = mux
        .send(Frame::new(id, Kind::Reset, why.into_bytes()))
        .await;
}

async fn handle_frame(mux: &Arc<MuxShared>, frame: Frame, accept: &mpsc::Sender<Incoming>) {
    let id = frame.stream;
    match frame.kind {
        // Session frames are handled by whoever pumps the transport.
        Kind::Hello | Kind::HelloAck | Kind::Announce => {}
        Kind::Open => {
            if id == 0 || mux.owns(id) {
                return violation(mux, id, format!("stream id {id} is not the peer's to open"))
                    .await;
            }
            let stream = {
                let mut state = mux.lock();
                if state.streams.contains_key(&id) {
                    None
                } else if state.peer_streams >= MAX_PEER_STREAMS {
                    Some(Err(()))
                } else {
                    let (stream, slot) = new_stream(id, mux.clone());
                    state.streams.insert(id, slot);
                    state.peer_streams += 1;
                    Some(Ok(stream))
                }
            };
            match stream {
                None => violation(mux, id, format!("stream {id} is already open")).await,
                Some(Err(())) => {
                    let _ = mux
                        .send(Frame::new(
                            id,
                            Kind::Reset,
                            b"too many open streams".to_vec(),
                        ))
                        .await;
                }
                Some(Ok(stream)) => {
                    let inc = Incoming {
                        stream,
                        request: frame.payload,
                    };
                    if let Err(mpsc::error::TrySendError::Full(inc)) = accept.try_send(inc) {
                        // Dropping the stream resets it.
                        drop(inc);
                    }
                }
            }
        }
        Kind::Data | Kind::Eof | Kind::Msg => {
            let Some((shared, events)) = mux
                .lock()
                .streams
                .get(&id)
                .map(|s| (s.shared.clone(), s.events.clone()))
            else {
                // Late frames for a stream this side already closed.
                return;
            };
            let c = cost(frame.payload.len());
            let overrun = {
                let mut inner = shared.lock();
                inner.recv_allowance -= i64::from(c);
                inner.recv_allowance < 0
            };
            if overrun {
                return violation(mux, id, "sent past the flow-control window".into()).await;
            }
            let event = match frame.kind {
                Kind::Data | Kind::Eof if frame.payload.is_empty() => {
                    return violation(mux, id, "missing channel byte".into()).await;
                }
                Kind::Data if frame.payload.len() > MAX_DATA_CHUNK + 1 => {
                    return violation(mux, id, "data chunk too large".into()).await;
                }
                Kind::Data => Event::Data {
                    channel: frame.payload[0],
                    data: frame.payload[1..].to_vec(),
                },
                Kind::Eof => Event::Eof {
                    channel: frame.payload[0],
                },
                _ => match serde_json::from_slice::<Message>(&frame.payload) {
                    Ok(m) => Event::Msg(m),
                    Err(e) => return violation(mux, id, format!("malformed message: {e}")).await,
                },
            };
            if events.try_send((event, c)).is_err() {
                // Full can only happen to a peer ignoring its window; closed means the handle
                // is gone and the stream with it.
                violation(mux, id, "event queue overflow".into()).await;
            }
        }
        Kind::Window => {
            let Ok(bytes) = <[u8; 4]>::try_from(frame.payload.as_slice()) else {
                return violation(mux, id, "malformed WINDOW frame".into()).await;
            };
            let shared = mux.lock().streams.get(&id).map(|s| s.shared.clone());
            if let Some(shared) = shared {
                let mut inner = shared.lock();
                inner.send_credit = inner
                    .send_credit
                    .saturating_add(u64::from(u32::from_le_bytes(bytes)))
                    .min(u64::from(u32::MAX));
                drop(inner);
                shared.credit_changed.notify_waiters();
            }
        }
        Kind::Reset => {
            let shared = mux.lock().streams.get(&id).map(|s| s.shared.clone());
            mux.remove(id);
            if let Some(shared) = shared {
                let reason =
                    String::from_utf8_lossy(&frame.payload[..frame.payload.len().min(1024)]);
                shared.close(Closed::Reset(reason.into_owned()));
            }
        }
    }
}

/// One stream: receive events here, send through [`Stream::sender`].
#[derive(Debug)]
pub struct Stream {
    shared: Arc<StreamShared>,
    mux: Arc<MuxShared>,
    events: mpsc::Receiver<(Event, u32)>,
    pending_credit: u32,
    finished: bool,
    reported_close: bool,
}

impl Stream {
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// The next event. `None` once the connection is gone (or after a reset was reported).
    /// Taking an event returns its cost to the peer as credit.
    pub async fn recv(&mut self) -> Option<Event> {
        if let Some((event, c)) = self.events.recv().await {
            self.pending_credit += c;
            if self.pending_credit >= CREDIT_BATCH {
                let grant = std::mem::take(&mut self.pending_credit);
                let open = {
                    let mut inner = self.shared.lock();
                    inner.recv_allowance += i64::from(grant);
                    inner.closed.is_none()
                };
                if open {
                    let frame = Frame::new(self.id(), Kind::Window, grant.to_le_bytes().to_vec());
                    let _ = self.mux.send(frame).await;
                }
            }
            return Some(event);
        }
        if self.reported_close {
            return None;
        }
        self.reported_close = true;
        match &self.shared.lock().closed {
            Some(Closed::Reset(why)) => Some(Event::Reset(why.clone())),
            _ => None,
        }
    }

    pub fn sender(&self) -> StreamSender {
        StreamSender {
            shared: self.shared.clone(),
            mux: self.mux.clone(),
        }
    }

    /// Ends the stream normally on this side: no RESET is sent.
    pub fn close(mut self) {
        self.finished = true;
        self.mux.remove(self.id());
        self.shared.close(Closed::Reset("stream closed".into()));
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let was_open = self.shared.lock().closed.is_none();
        self.mux.remove(self.id());
        self.shared.close(Closed::Reset("stream abandoned".into()));
        if was_open {
            self.mux.send_now(Frame::new(
                self.id(),
                Kind::Reset,
                b"stream abandoned".to_vec(),
            ));
        }
    }
}

/// The sending half of a stream. Clones send on the same stream.
#[derive(Debug, Clone)]
pub struct StreamSender {
    shared: Arc<StreamShared>,
    mux: Arc<MuxShared>,
}

impl StreamSender {
    pub fn id(&self) -> u32 {
        self.shared.id
    }

    /// Waits until `c` bytes of credit are available and takes them.
    async fn take_credit(&self, c: u32) -> Result<(), Error> {
        loop {
            let notified = self.shared.credit_changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut inner = self.shared.lock();
                match &inner.closed {
                    Some(Closed::Reset(why)) => return Err(Error::Reset(why.clone())),
                    Some(Closed::Connection) => return Err(Error::Closed),
                    None => {}
                }
                if inner.send_credit >= u64::from(c) {
                    inner.send_credit -= u64::from(c);
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    async fn send_counted(&self, frame: Frame) -> Result<(), Error> {
        self.take_credit(cost(frame.payload.len())).await?;
        self.mux.send(frame).await
    }

    pub async fn msg(&self, message: &Message) -> Result<(), Error> {
        let payload = serde_json::to_vec(message)?;
        if payload.len() > MAX_PAYLOAD {
            return Err(Error::Protocol(format!(
                "message of {} bytes is larger than the frame limit",
                payload.len()
            )));
        }
        self.send_counted(Frame::new(self.id(), Kind::Msg, payload))
            .await
    }

    /// Sends `data` on `channel`, in chunks, waiting for credit as needed.
    pub async fn data(&self, channel: u8, data: &[u8]) -> Result<(), Error> {
        for chunk in data.chunks(MAX_DATA_CHUNK) {
            self.send_counted(Frame::data(self.id(), channel, chunk))
                .await?;
        }
        Ok(())
    }

    pub async fn eof(&self, channel: u8) -> Result<(), Error> {
        self.send_counted(Frame::new(self.id(), Kind::Eof, vec![channel]))
            .await
    }

    /// Abandons the stream and tells the peer why.
    pub async fn reset(&self, reason: &str) {
        let was_open = self.shared.lock().closed.is_none();
        self.mux.remove(self.id());
        self.shared.close(Closed::Reset(reason.to_string()));
        if was_open {
            let _ = self
                .mux
                .send(Frame::new(
                    self.id(),
                    Kind::Reset,
                    reason.as_bytes().to_vec(),
                ))
                .await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{channel, Request};

    /// Two muxes wired back to back, as host and guest.
    fn pair() -> (
        (Mux, mpsc::Receiver<Incoming>),
        (Mux, mpsc::Receiver<Incoming>),
    ) {
        let (h2g_tx, h2g_rx) = mpsc::channel(64);
        let (g2h_tx, g2h_rx) = mpsc::channel(64);
        (
            Mux::new(Role::Host, g2h_rx, h2g_tx),
            Mux::new(Role::Guest, h2g_rx, g2h_tx),
        )
    }

    #[tokio::test]
    async fn request_reply_and_large_data_in_both_directions() {
        let ((host, _), (_guest, mut accept)) = pair();
        let total = 5 * INITIAL_WINDOW as usize + 12345;
        let guest_task = tokio::spawn(async move {
            let Incoming {
                mut stream,
                request,
            } = accept.recv().await.unwrap();
            let req: Request = serde_json::from_slice(&request).unwrap();
            assert_eq!(req, Request::Stat { path: "/x".into() });
            let mut got = 0usize;
            while let Some(ev) = stream.recv().await {
                match ev {
                    Event::Data { channel, data } => {
                        assert_eq!(channel, channel::STDIN);
                        assert!(data.iter().all(|b| *b == 0xab));
                        got += data.len();
                    }
                    Event::Eof { .. } => break,
                    other => panic!("unexpected {other:?}"),
                }
            }
            let tx = stream.sender();
            tx.data(channel::STDOUT, &vec![7u8; total]).await.unwrap();
            tx.eof(channel::STDOUT).await.unwrap();
            tx.msg(&Message::Done).await.unwrap();
            stream.close();
            got
        });
        let mut stream = host
            .open(&Request::Stat { path: "/x".into() })
            .await
            .unwrap();
        let tx = stream.sender();
        tx.data(channel::STDIN, &vec![0xab; total]).await.unwrap();
        tx.eof(channel::STDIN).await.unwrap();
        let mut got = 0;
        loop {
            match stream.recv().await.unwrap() {
                Event::Data { data, .. } => got += data.len(),
                Event::Eof { .. } => {}
                Event::Msg(Message::Done) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, total);
        assert_eq!(guest_task.await.unwrap(), total);
        stream.close();
    }

    #[tokio::test]
    async fn guest_can_open_streams_and_many_run_at_once() {
        let ((_host, mut host_accept), (guest, _)) = pair();
        let server = tokio::spawn(async move {
            while let Some(Incoming { stream, request }) = host_accept.recv().await {
                tokio::spawn(async move {
                    let tx = stream.sender();
                    tx.data(channel::STDOUT, &request).await.unwrap();
                    tx.msg(&Message::Done).await.unwrap();
                    stream.close();
                });
            }
        });
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let guest = guest.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = guest
                    .open(&Request::Stat {
                        path: format!("/{i}"),
                    })
                    .await
                    .unwrap();
                assert_eq!(s.id() % 2, 0, "guest streams have even ids");
                let Some(Event::Data { data, .. }) = s.recv().await else {
                    panic!()
                };
                let req: Request = serde_json::from_slice(&data).unwrap();
                assert_eq!(
                    req,
                    Request::Stat {
                        path: format!("/{i}")
                    }
                );
                assert_eq!(s.recv().await, Some(Event::Msg(Message::Done)));
                s.close();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        server.abort();
    }

    #[tokio::test]
    async fn dropping_a_stream_resets_it_for_the_peer() {
        let ((host, _), (_guest, mut accept)) = pair();
        let s = host.open(&Request::Quiesce).await.unwrap();
        let mut inc = accept.recv().await.unwrap();
        drop(s);
        assert!(matches!(inc.stream.recv().await, Some(Event::Reset(_))));
        assert_eq!(inc.stream.recv().await, None);
        assert!(matches!(
            inc.stream.sender().msg(&Message::Done).await,
            Err(Error::Reset(_))
        ));
    }

    /// A hostile peer that writes raw frames: past the window, garbage JSON, wrong ids.
    #[tokio::test]
    async fn hostile_peer_is_contained() {
        let (to_host_tx, to_host_rx) = mpsc::channel(1024);
        let (from_host_tx, mut from_host_rx) = mpsc::channel(1024);
        let (host, mut accept) = Mux::new(Role::Host, to_host_rx, from_host_tx);
        let mut stream = host.open(&Request::Quiesce).await.unwrap();
        let open = from_host_rx.recv().await.unwrap();
        assert_eq!(open.kind, Kind::Open);
        let id = open.stream;
        // Flood: far more data than the window allows, without waiting for credit.
        let chunk = vec![0u8; MAX_DATA_CHUNK];
        let sender = tokio::spawn(async move {
            for _ in 0..64 {
                if to_host_tx.send(Frame::data(id, 1, &chunk)).await.is_err() {
                    break;
                }
            }
            // An OPEN with a host-parity id and garbage JSON on an unknown stream.
            let _ = to_host_tx
                .send(Frame::new(3, Kind::Open, b"{}".to_vec()))
                .await;
            let _ = to_host_tx
                .send(Frame::new(99, Kind::Msg, b"garbage".to_vec()))
                .await;
            to_host_tx
        });
        let mut data = 0usize;
        let reason = loop {
            match stream.recv().await {
                Some(Event::Data { data: d, .. }) => data += d.len(),
                Some(Event::Reset(why)) => break why,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert!(reason.contains("flow-control window"), "{reason}");
        assert!(data <= INITIAL_WINDOW as usize);
        let to_host_tx = sender.await.unwrap();
        // The host answered the violations with RESETs and accepted nothing.
        let mut resets = 0;
        while let Ok(f) = from_host_rx.try_recv() {
            if f.kind == Kind::Reset {
                resets += 1;
            }
        }
        assert!(resets >= 2, "expected resets, got {resets}");
        assert!(accept.try_recv().is_err());
        drop(to_host_tx);
        host.closed().await;
        assert!(host.is_closed());
        assert!(matches!(
            host.open(&Request::Quiesce).await,
            Err(Error::Closed)
        ));
    }
}
