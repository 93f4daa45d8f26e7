//! Framing: how bytes on the virtio-serial port become frames.
//!
//! ```text
//! u32 LE  len      length of everything after this field: 5 + payload length
//! u32 LE  stream   stream id (0 = the connection itself)
//! u8      kind     see [`Kind`]
//! [u8]    payload  len - 5 bytes
//! ```
//! The decoder never trusts `len`: anything above [`MAX_FRAME_LEN`] is a protocol error.

use crate::Error;

/// Largest value allowed in the `len` field (payload plus the stream and kind fields).
pub const MAX_FRAME_LEN: usize = 5 + MAX_PAYLOAD;
/// Largest payload of one frame.
pub const MAX_PAYLOAD: usize = 128 * 1024;
/// Largest chunk of stream data a sender puts in one DATA frame (payload minus the channel byte).
pub const MAX_DATA_CHUNK: usize = 64 * 1024;
/// Bytes that start the payload of HELLO and HELLO_ACK, so that a reader that lost its place can
/// find the start of a new session in the byte stream.
pub const SYNC_MAGIC: &[u8; 8] = b"MOATSYNC";
/// Length of the header in front of every payload.
pub const HEADER_LEN: usize = 9;

/// The kind of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Host → guest, stream 0: `SYNC_MAGIC`, 16-byte nonce, JSON [`crate::Hello`]. Starts a session.
    Hello = 1,
    /// Guest → host, stream 0: `SYNC_MAGIC`, the 16-byte nonce of the HELLO, JSON [`crate::HelloAck`].
    HelloAck = 2,
    /// Either side: opens `stream` with a JSON request.
    Open = 3,
    /// Either side: a JSON message on an open stream.
    Msg = 4,
    /// Either side: one channel byte, then stream data. Counted against the flow-control window.
    Data = 5,
    /// Either side: one channel byte; that channel of the stream has ended.
    Eof = 6,
    /// Either side: u32 LE; the sender may send this many more bytes of DATA on the stream.
    Window = 7,
    /// Either side: the stream is abandoned; UTF-8 reason. No more frames follow on it.
    Reset = 8,
    /// Guest → host, stream 0, empty: "a host is connected again". Ignored by the host; writing it
    /// is how the guest waits for a host, since a blocking write on the port only returns then.
    Announce = 9,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Open,
            4 => Kind::Msg,
            5 => Kind::Data,
            6 => Kind::Eof,
            7 => Kind::Window,
            8 => Kind::Reset,
            9 => Kind::Announce,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub stream: u32,
    pub kind: Kind,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(stream: u32, kind: Kind, payload: Vec<u8>) -> Frame {
        Frame {
            stream,
            kind,
            payload,
        }
    }

    /// A DATA frame: `channel` then `data`.
    pub fn data(stream: u32, channel: u8, data: &[u8]) -> Frame {
        let mut payload = Vec::with_capacity(1 + data.len());
        payload.push(channel);
        payload.extend_from_slice(data);
        Frame::new(stream, Kind::Data, payload)
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        debug_assert!(self.payload.len() <= MAX_PAYLOAD);
        let len = (5 + self.payload.len()) as u32;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&self.stream.to_le_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.payload);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.payload.len());
        self.encode_into(&mut out);
        out
    }
}

/// Incremental decoder: feed it bytes as they arrive, take frames out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    /// Where [`Decoder::next_frame`] last failed: [`Decoder::resync`] must not land there
    /// again, or a forged header in front of the magic would stop the reader for good.
    failed_at: Option<usize>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
            self.failed_at = None;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.failed_at = self.failed_at.and_then(|f| f.checked_sub(self.start));
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed. After an error the decoder
    /// is unusable until [`Decoder::clear`] or [`Decoder::resync`].
    pub fn next_frame(&mut self) -> Result<Option<Frame>, Error> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if !(5..=MAX_FRAME_LEN).contains(&len) {
            self.failed_at = Some(self.start);
            return Err(Error::FrameLength(len));
        }
        let stream = u32::from_le_bytes([avail[4], avail[5], avail[6], avail[7]]);
        let Some(kind) = Kind::from_u8(avail[8]) else {
            self.failed_at = Some(self.start);
            return Err(Error::UnknownKind(avail[8]));
        };
        if avail.len() < 4 + len {
            return Ok(None);
        }
        let payload = avail[HEADER_LEN..4 + len].to_vec();
        self.start += 4 + len;
        Ok(Some(Frame {
            stream,
            kind,
            payload,
        }))
    }

    /// Drops everything buffered.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
        self.failed_at = None;
    }

    /// Skips ahead to the next frame of `kind` whose payload starts with [`SYNC_MAGIC`] (and
    /// then `prefix`), dropping everything before it. Returns false (keeping only a tail that
    /// could still become a match) when no such frame start is buffered yet. A frame start
    /// where [`Decoder::next_frame`] just failed (a forged header) is skipped.
    pub fn resync(&mut self, kind: Kind, prefix: &[u8]) -> bool {
        let mut needle = Vec::with_capacity(SYNC_MAGIC.len() + prefix.len());
        needle.extend_from_slice(SYNC_MAGIC);
        needle.extend_from_slice(prefix);
        let avail = &self.buf[self.start..];
        let failed = self.failed_at.map(|f| f.wrapping_sub(self.start));
        let mut from = 0;
        while let Some(pos) = find(&avail[from..], &needle).map(|p| p + from) {
            if pos >= HEADER_LEN && avail[pos - 1] == kind as u8 && failed != Some(pos - HEADER_LEN)
            {
                self.start += pos - HEADER_LEN;
                return true;
            }
            from = pos + 1;
        }
        // Keep enough to recognise a header and needle split across reads.
        let keep = (HEADER_LEN + needle.len()).min(avail.len());
        self.start = self.buf.len() - keep;
        false
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_byte_by_byte() {
        let frames = vec![
            Frame::new(0, Kind::Announce, vec![]),
            Frame::data(7, 1, b"hello"),
            Frame::new(u32::MAX, Kind::Window, 65536u32.to_le_bytes().to_vec()),
            Frame::new(3, Kind::Msg, vec![b'x'; MAX_PAYLOAD]),
        ];
        let mut bytes = Vec::new();
        for f in &frames {
            f.encode_into(&mut bytes);
        }
        let mut dec = Decoder::new();
        let mut out = Vec::new();
        for b in bytes {
            dec.push(&[b]);
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn oversized_length_is_rejected_before_buffering() {
        let mut dec = Decoder::new();
        dec.push(&(u32::MAX).to_le_bytes());
        dec.push(&[0, 0, 0, 0, Kind::Data as u8]);
        assert!(matches!(dec.next_frame(), Err(Error::FrameLength(_))));
    }

    #[test]
    fn short_length_and_unknown_kind_are_rejected() {
        let mut dec = Decoder::new();
        dec.push(&[4, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert!(matches!(dec.next_frame(), Err(Error::FrameLength(4))));
        let mut dec = Decoder::new();
        dec.push(&[5, 0, 0, 0, 0, 0, 0, 0, 0xee]);
        assert!(matches!(dec.next_frame(), Err(Error::UnknownKind(0xee))));
    }

    /// A HELLO whose header lies about its length: the reader that resyncs on it must move
    /// past it to the real one, not land on it forever (found by the `frames` fuzz target's
    /// smoke run: the agent's read loop spun without end).
    #[test]
    fn resync_moves_past_a_forged_header() {
        let mut forged = u32::MAX.to_le_bytes().to_vec();
        forged.extend_from_slice(&0u32.to_le_bytes());
        forged.push(Kind::Hello as u8);
        forged.extend_from_slice(SYNC_MAGIC);
        let mut payload = SYNC_MAGIC.to_vec();
        payload.extend_from_slice(&[7u8; 16]);
        let real = Frame::new(0, Kind::Hello, payload);
        let mut dec = Decoder::new();
        dec.push(&forged);
        dec.push(&real.encode());
        let mut steps = 0;
        let got = loop {
            steps += 1;
            assert!(steps < 10, "resync keeps landing on the forged header");
            if !dec.resync(Kind::Hello, b"") {
                break None;
            }
            match dec.next_frame() {
                Ok(f) => break f,
                Err(_) => continue,
            }
        };
        assert_eq!(got, Some(real));
    }

    #[test]
    fn resync_finds_hello_after_garbage() {
        let nonce = [9u8; 16];
        let mut payload = SYNC_MAGIC.to_vec();
        payload.extend_from_slice(&nonce);
        payload.extend_from_slice(b"{}");
        let hello = Frame::new(0, Kind::HelloAck, payload);
        let mut dec = Decoder::new();
        // A half frame from an earlier session, a decoy with the wrong nonce, then the real one.
        dec.push(&[200, 0, 0, 0, 1, 0, 0, 0, 5, 1, 2, 3]);
        let mut decoy = SYNC_MAGIC.to_vec();
        decoy.extend_from_slice(&[1u8; 16]);
        dec.push(&Frame::new(0, Kind::HelloAck, decoy).encode());
        let enc = hello.encode();
        dec.push(&enc[..10]);
        assert!(!dec.resync(Kind::HelloAck, &nonce));
        dec.push(&enc[10..]);
        assert!(dec.resync(Kind::HelloAck, &nonce));
        assert_eq!(dec.next_frame().unwrap(), Some(hello));
    }
}
