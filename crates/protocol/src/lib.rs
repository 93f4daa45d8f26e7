//! The host↔guest protocol of moat: framing ([`frame`]), messages ([`messages`]) and a
//! multiplexer of flow-controlled bidirectional streams ([`mux`]) used by both sides.
//!
//! This crate is the only moat crate the guest agent links, and the host treats everything it
//! decodes from the guest as hostile: every length is bounded and every message strictly typed.
//! `docs/PROTOCOL.md` describes the wire format and the session rules.

pub mod frame;
pub mod link;
pub mod messages;
pub mod mux;

pub use frame::{Decoder, Frame, Kind};
pub use messages::*;
pub use mux::{Event, Incoming, Mux, Role, Stream, StreamSender};

/// Errors of the protocol layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("frame length {0} is outside the allowed range")]
    FrameLength(usize),
    #[error("unknown frame kind {0:#x}")]
    UnknownKind(u8),
    #[error("malformed JSON message")]
    Json(#[from] serde_json::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("stream was reset by the peer: {0}")]
    Reset(String),
    #[error("the connection to the peer is closed")]
    Closed,
}
