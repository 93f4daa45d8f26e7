//! QEMU's stream-netdev framing (`-netdev stream`: each Ethernet frame preceded by its length
//! as a 4-byte big-endian integer, no virtio-net header) and the smoltcp device over it:
//! frames the guest sent wait in `rx` until the interface polls them, and frames the interface
//! sends are appended, already framed, to `tx` for the next write to QEMU.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Our MTU is 1500; frames up to this size (a VLAN tag's worth above 1514) are taken.
pub const MAX_FRAME: usize = 1518;
/// A length above this is not a frame QEMU would send: the stream is corrupt.
const MAX_LENGTH: usize = 1 << 17;

/// Takes the next complete frame off `buf`. `Ok(None)`: wait for more bytes. Frames longer
/// than [`MAX_FRAME`] are taken and returned empty, to be dropped.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<Bytes>, String> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 || len > MAX_LENGTH {
        return Err(format!(
            "frame length {len} from QEMU: the stream is corrupt"
        ));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    buf.advance(4);
    let frame = buf.split_to(len).freeze();
    Ok(Some(if len > MAX_FRAME { Bytes::new() } else { frame }))
}

/// Appends `frame` to `out` in stream framing.
pub fn put_frame(out: &mut Vec<u8>, frame: &[u8]) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

#[derive(Debug, Default)]
pub struct Device {
    pub rx: VecDeque<Bytes>,
    pub tx: Vec<u8>,
}

impl phy::Device for Device {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let frame = self.rx.pop_front()?;
        Some((RxToken(frame), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

pub struct RxToken(Bytes);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

pub struct TxToken<'a>(&'a mut Vec<u8>);

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let start = self.0.len();
        self.0.extend_from_slice(&(len as u32).to_be_bytes());
        self.0.resize(start + 4 + len, 0);
        f(&mut self.0[start + 4..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trip_and_partial_reads() {
        let mut out = Vec::new();
        put_frame(&mut out, &[1, 2, 3]);
        put_frame(&mut out, &[4; 60]);
        let mut buf = BytesMut::new();
        for (i, b) in out.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let got = take_frame(&mut buf).unwrap();
            match i {
                6 => assert_eq!(got.as_deref(), Some(&[1u8, 2, 3][..])),
                _ if i == out.len() - 1 => assert_eq!(got.unwrap().len(), 60),
                _ => assert!(got.is_none(), "byte {i}"),
            }
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn oversized_frames_are_dropped_and_corrupt_lengths_are_errors() {
        let mut out = Vec::new();
        put_frame(&mut out, &vec![0; MAX_FRAME + 1]);
        let mut buf = BytesMut::from(&out[..]);
        assert_eq!(take_frame(&mut buf).unwrap().unwrap().len(), 0);
        for len in [0u32, (MAX_LENGTH + 1) as u32, u32::MAX] {
            let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
            assert!(take_frame(&mut buf).is_err(), "{len}");
        }
    }
}
