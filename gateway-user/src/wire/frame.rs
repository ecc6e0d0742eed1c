//! Framing: splitting whole tagged messages off a buffer as raw `Bytes`, and the errors a
//! malformed stream gives.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::sqlstate;

/// Largest message pgward accepts from either side (Postgres's own limit is 1 GiB).
pub const MAX_FRAME: usize = 1 << 30;
/// Largest startup-phase message (startup packet, password, SASL).
pub const MAX_STARTUP_FRAME: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed message: {0}")]
    Malformed(String),
    /// SQL text that is not valid in the session's client encoding (byte offset).
    #[error("invalid byte sequence for encoding \"UTF8\" at byte {0} of the statement text")]
    Encoding(usize),
}

impl WireError {
    pub fn malformed(msg: impl Into<String>) -> WireError {
        WireError::Malformed(msg.into())
    }
    /// The SQLSTATE a client gets for this error (the connection is then closed).
    pub fn sqlstate(&self) -> &'static str {
        match self {
            WireError::Encoding(_) => sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
            _ => sqlstate::PROTOCOL_VIOLATION,
        }
    }
}

/// One whole protocol message: tag byte, length, body.
#[derive(Debug, Clone)]
pub struct Frame {
    pub tag: u8,
    /// The whole message including the 5-byte header.
    pub raw: Bytes,
}

impl Frame {
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Split one complete frame off the front of `buf`, if there is one.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len < 4 {
        return Err(WireError::malformed(format!("message {:?} has length {len} < 4", tag as char)));
    }
    if len > max {
        return Err(WireError::malformed(format!(
            "message {:?} of {len} bytes exceeds the limit of {max}",
            tag as char
        )));
    }
    if buf.len() < len + 1 {
        // Grow towards the announced size, but never pre-allocate more than 1 MiB on the
        // word of a peer.
        let want = (len + 1 - buf.len()).min(1 << 20);
        buf.reserve(want);
        return Ok(None);
    }
    let raw = buf.split_to(len + 1).freeze();
    Ok(Some(Frame { tag, raw }))
}

/// The complete frames at the front of `buf` as (tag, whole message), without taking them
/// off: it stops at the first frame that is incomplete or whose length is below 4
/// ([`split_frame`] is what reads them, and rejects what is malformed).
pub fn complete_frames(mut buf: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len < 4 || buf.len() - 1 < len {
            return None;
        }
        let (raw, rest) = buf.split_at(1 + len);
        buf = rest;
        Some((raw[0], raw))
    })
}

/// Read from `io` until one startup-phase message (no tag byte) is available.
pub async fn read_startup_packet<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
) -> Result<Bytes, WireError> {
    loop {
        if buf.len() >= 4 {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if !(8..=MAX_STARTUP_FRAME).contains(&len) {
                return Err(WireError::malformed(format!("startup packet length {len} is invalid")));
            }
            if buf.len() >= len {
                return Ok(buf.split_to(len).freeze());
            }
        }
        if io.read_buf(buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
}

/// Read one tagged frame during the startup phase (password, SASL messages).
pub async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Frame, WireError> {
    loop {
        if let Some(f) = split_frame(buf, max)? {
            return Ok(f);
        }
        if io.read_buf(buf).await? == 0 {
            return Err(WireError::Closed);
        }
    }
}
