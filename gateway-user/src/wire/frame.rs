//! Framing: splitting whole tagged messages off a buffer as raw `Bytes`, and the errors a
//! malformed stream gives.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::sqlstate;

/// Largest message pgward reads from the server on its own connections (Postgres's own limit
/// is 1 GiB); relayed sessions are bounded by [`super::Inbound`].
pub const MAX_FRAME: usize = 1 << 30;
/// Largest tagged startup-phase message: the password (the token) and SASL messages, as
/// Postgres's `PG_MAX_AUTH_TOKEN_LENGTH`.
pub const MAX_STARTUP_FRAME: usize = 65_535;
/// Largest startup packet, as Postgres's `MAX_STARTUP_PACKET_LENGTH`.
pub const MAX_STARTUP_PACKET: usize = 10_000;

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
    /// A message longer than `server.max_message_bytes`, refused from its length field.
    #[error("{} message {:?} of {len} bytes is larger than pgward accepts ({max} bytes, server.max_message_bytes)", side_name(*side), *tag as char)]
    TooLarge { side: super::Side, tag: u8, len: usize, max: usize },
    /// The gateway's buffer budget has no room now for a message of `len` bytes, and the
    /// session may not wait for it (see [`super::Inbound`]).
    #[error("no room in the gateway's buffer budget for a message of {len} bytes (server.buffer_budget_bytes)")]
    BudgetBusy { len: usize },
}

fn side_name(side: super::Side) -> &'static str {
    match side {
        super::Side::Client => "client",
        super::Side::Server => "database server",
    }
}

impl WireError {
    pub fn malformed(msg: impl Into<String>) -> WireError {
        WireError::Malformed(msg.into())
    }
    /// The SQLSTATE a client gets for this error (the connection is then closed).
    pub fn sqlstate(&self) -> &'static str {
        match self {
            WireError::Encoding(_) => sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
            WireError::TooLarge { .. } => sqlstate::PROGRAM_LIMIT_EXCEEDED,
            WireError::BudgetBusy { .. } => sqlstate::OUT_OF_MEMORY,
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
            if !(8..=MAX_STARTUP_PACKET).contains(&len) {
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
