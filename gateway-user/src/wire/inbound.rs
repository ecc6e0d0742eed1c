//! One direction of a relayed session, cut into messages under bounded memory: a message's
//! length field is checked before its body is buffered (against Postgres's own limit for its
//! type and against `server.max_message_bytes`); a message larger than a session's own
//! buffers is read only once its size is charged to the gateway-wide [`Budget`] (until then
//! the session does not read that side); and a large server message pgward need not read
//! whole is passed on in pieces as it arrives, never buffered.
//!
//! Deadlock freedom: a direction waits for budget only while the session's other direction
//! holds and awaits none (otherwise it takes what is free now, or the session ends with
//! 53200). So every charge a session holds is given back by writing to a peer, which never
//! waits for budget; a wait within one direction, behind its own earlier message still
//! being written out, is the wait Postgres itself imposes on a client that does not read.

use std::future::Future;
use std::pin::Pin;

use bytes::{Buf, BytesMut};

use super::budget::{Budget, Charge, UNCHARGED_MESSAGE_BYTES};
use super::{Frame, WireError};

/// Postgres's limit on the length field of the client messages that carry data (Query,
/// Parse, Bind, FunctionCall, CopyData: `PQ_LARGE_MESSAGE_LIMIT`, 1 GB less 2), also applied
/// to whatever the server sends.
pub const PG_LARGE_MESSAGE_LIMIT: usize = 0x3fff_fffe;
/// Postgres's limit on the length field of every other client message (Sync, Execute,
/// Describe, Close, Flush, Terminate, CopyDone, CopyFail: `PQ_SMALL_MESSAGE_LIMIT`).
pub const PG_SMALL_MESSAGE_LIMIT: usize = 10_000;

/// Which peer a direction reads from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// The largest length field Postgres accepts for a client message of type `tag` (it checks
/// the type before it reads the body, as pgward does); Err for a type that does not exist.
pub fn client_message_limit(tag: u8) -> Result<usize, WireError> {
    match tag {
        b'Q' | b'F' | b'P' | b'B' | b'd' => Ok(PG_LARGE_MESSAGE_LIMIT),
        b'C' | b'D' | b'E' | b'H' | b'S' | b'X' | b'c' | b'f' => Ok(PG_SMALL_MESSAGE_LIMIT),
        other => Err(WireError::malformed(format!("invalid frontend message type {:?}", other as char))),
    }
}

/// Server messages pgward relays without reading them when the session masks nothing: these
/// are the ones that carry values of any size.
pub fn passes_unread(tag: u8) -> bool {
    matches!(tag, b'D' | b'd' | b'N' | b'A')
}

type Wait = Pin<Box<dyn Future<Output = Option<Charge>> + Send>>;

/// The reading state of one direction of a session.
pub struct Inbound {
    side: Side,
    /// `server.max_message_bytes`: the largest message read whole.
    max: usize,
    budget: Budget,
    /// Capacity the read buffer is given back after a large message.
    read_base: usize,
    /// Capacity the out buffer is given back once a large message has been written out.
    out_base: usize,
    /// The charge for the large message being read at the front of the read buffer.
    reading: Option<Charge>,
    /// Charges for large messages taken off the read buffer and not yet written out.
    out: Option<Charge>,
    /// The charge a large message at the front of the read buffer waits for.
    waiting: Option<Wait>,
    /// Bytes still to come of a message being passed on in pieces.
    passing: usize,
}

impl Inbound {
    pub fn new(side: Side, max: usize, budget: Budget, read_base: usize, out_base: usize) -> Inbound {
        Inbound { side, max, budget, read_base, out_base, reading: None, out: None, waiting: None, passing: 0 }
    }

    /// This direction holds or awaits budget.
    pub fn engaged(&self) -> bool {
        self.reading.is_some() || self.out.is_some() || self.waiting.is_some()
    }

    /// A large message waits for budget: this side must not be read until
    /// [`Inbound::budget`] resolves (and [`Inbound::granted`] is called).
    pub fn blocked(&self) -> bool {
        self.waiting.is_some()
    }

    /// Resolves with the awaited charge (never, when none is awaited). Cancel-safe: the
    /// request keeps its place in the queue until it is granted.
    pub async fn budget(&mut self) -> Option<Charge> {
        match self.waiting.as_mut() {
            Some(w) => w.await,
            None => std::future::pending().await,
        }
    }

    /// The awaited charge: room is made for the message at the front of `buf`.
    pub fn granted(&mut self, charge: Option<Charge>, buf: &mut BytesMut) -> Result<(), WireError> {
        self.waiting = None;
        match charge {
            Some(c) => {
                self.reserve_whole(buf, c);
                Ok(())
            }
            // Only a message larger than the whole budget is never granted, and the
            // configuration keeps `max_message_bytes` within the budget.
            None => Err(WireError::BudgetBusy { len: header(buf).map_or(0, |h| h.1) }),
        }
    }

    /// Split the next whole message off `buf`, if it is all there. A message too large for
    /// the limits is refused from its length field alone; a large one gets its room only
    /// with a charge (taken now, or awaited: see [`Inbound::blocked`]). `other_engaged`: the
    /// session's other direction holds or awaits budget (this one may then not wait).
    pub fn next(&mut self, buf: &mut BytesMut, other_engaged: bool) -> Result<Option<Frame>, WireError> {
        let Some((tag, len)) = header(buf) else { return Ok(None) };
        self.check(tag, len)?;
        if buf.len() > len {
            let raw = buf.split_to(len + 1).freeze();
            if let Some(c) = self.reading.take() {
                self.hold(c);
                // The message keeps its allocation; the buffer goes on in a small one.
                let mut rest = BytesMut::with_capacity(self.read_base.max(buf.len()));
                rest.extend_from_slice(buf);
                *buf = rest;
            }
            return Ok(Some(Frame { tag, raw }));
        }
        if len <= UNCHARGED_MESSAGE_BYTES {
            buf.reserve(len + 1 - buf.len());
        } else if self.reading.is_none() && self.waiting.is_none() {
            match self.budget.try_charge(len) {
                Some(c) => self.reserve_whole(buf, c),
                None if other_engaged => return Err(WireError::BudgetBusy { len }),
                None => self.waiting = Some(Box::pin(self.budget.charge(len))),
            }
        }
        Ok(None)
    }

    /// Copy large server messages that pass unread (`whole(tag)` false) from `buf` to `out` as
    /// far as they have arrived; the rest of such a message follows on later calls. Stops at
    /// the first message to be read whole ([`Inbound::next`] takes it).
    pub fn pass(&mut self, buf: &mut BytesMut, out: &mut BytesMut, whole: impl Fn(u8) -> bool) {
        loop {
            if self.passing > 0 {
                let n = self.passing.min(buf.len());
                out.extend_from_slice(&buf[..n]);
                buf.advance(n);
                self.passing -= n;
                if self.passing > 0 {
                    return;
                }
            }
            if self.reading.is_some() || self.waiting.is_some() {
                return;
            }
            let Some((tag, len)) = header(buf) else { return };
            if len <= UNCHARGED_MESSAGE_BYTES || len > PG_LARGE_MESSAGE_LIMIT || whole(tag) {
                return;
            }
            self.passing = len + 1;
        }
    }

    /// Give back the charges of large messages once they are out: `idle` (none of them is
    /// still held elsewhere, e.g. in a batch waiting for its records) and `out` drained to
    /// at most what the session holds uncharged. `out` then goes on in a small allocation.
    pub fn settle(&mut self, out: &mut BytesMut, idle: bool) {
        if self.out.is_none() || !idle || out.len() > UNCHARGED_MESSAGE_BYTES {
            return;
        }
        let mut fresh = BytesMut::with_capacity(self.out_base.max(out.len()));
        fresh.extend_from_slice(out);
        *out = fresh;
        self.out = None;
    }

    fn check(&self, tag: u8, len: usize) -> Result<(), WireError> {
        if len < 4 {
            return Err(WireError::malformed(format!("message {:?} has length {len} < 4", tag as char)));
        }
        let limit = match self.side {
            Side::Client => client_message_limit(tag)?,
            Side::Server => PG_LARGE_MESSAGE_LIMIT,
        };
        if len > limit {
            return Err(WireError::malformed(format!(
                "message {:?} of {len} bytes exceeds the protocol's limit of {limit}",
                tag as char
            )));
        }
        if len > self.max {
            return Err(WireError::TooLarge { side: self.side, tag, len, max: self.max });
        }
        Ok(())
    }

    fn reserve_whole(&mut self, buf: &mut BytesMut, c: Charge) {
        if let Some((_, len)) = header(buf) {
            buf.reserve((len + 1).saturating_sub(buf.len()));
        }
        self.reading = Some(c);
    }

    fn hold(&mut self, c: Charge) {
        match &mut self.out {
            Some(o) => o.merge(c),
            None => self.out = Some(c),
        }
    }
}

/// (type, length field) of the message at the front of `buf`.
fn header(buf: &[u8]) -> Option<(u8, usize)> {
    let h = buf.get(..5)?;
    Some((h[0], u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn msg(tag: u8, body_len: usize) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body_len + 4) as u32).to_be_bytes());
        v.resize(5 + body_len, b'x');
        v
    }

    fn client(max: usize, budget: &Budget) -> Inbound {
        Inbound::new(Side::Client, max, budget.clone(), 16 * 1024, 16 * 1024)
    }

    #[test]
    fn a_message_over_the_limit_is_refused_from_its_header() {
        let budget = Budget::new(64 * MIB);
        let mut r = client(8 * MIB, &budget);
        let m = msg(b'Q', 8 * MIB);
        let mut buf = BytesMut::from(&m[..5]);
        let e = r.next(&mut buf, false).unwrap_err();
        assert!(matches!(e, WireError::TooLarge { len, .. } if len == 8 * MIB + 4), "{e:?}");
        assert_eq!(e.sqlstate(), crate::sqlstate::PROGRAM_LIMIT_EXCEEDED);
        assert!(buf.capacity() < MIB, "nothing was reserved for the body");
        assert_eq!(budget.available(), 64 * MIB);
    }

    #[test]
    fn postgres_limits_per_message_type() {
        let budget = Budget::new(64 * MIB);
        let mut r = client(64 * MIB, &budget);
        let mut sync = BytesMut::from(&msg(b'S', PG_SMALL_MESSAGE_LIMIT)[..5]);
        let e = r.next(&mut sync, false).unwrap_err();
        assert_eq!(e.sqlstate(), crate::sqlstate::PROTOCOL_VIOLATION, "{e}");
        let mut unknown = BytesMut::from(&msg(b'z', 100)[..5]);
        assert!(r.next(&mut unknown, false).unwrap_err().to_string().contains("invalid frontend message type"));
        let mut ok = BytesMut::from(&msg(b'S', 0)[..]);
        assert_eq!(r.next(&mut ok, false).unwrap().unwrap().tag, b'S');
    }

    #[test]
    fn a_large_message_is_charged_while_read_and_until_written_out() {
        let budget = Budget::new(10 * MIB);
        let mut r = client(8 * MIB, &budget);
        let m = msg(b'd', 3 * MIB);
        let mut buf = BytesMut::from(&m[..1000]);
        assert!(r.next(&mut buf, false).unwrap().is_none());
        assert_eq!(budget.available(), 10 * MIB - (3 * MIB + 4));
        assert!(buf.capacity() >= m.len(), "room for the whole message at once");
        buf.extend_from_slice(&m[1000..]);
        buf.extend_from_slice(&msg(b'S', 0));
        let f = r.next(&mut buf, false).unwrap().unwrap();
        assert_eq!(f.raw.len(), m.len());
        assert!(buf.capacity() < MIB, "the read buffer left the message's allocation");
        let mut out = BytesMut::new();
        out.extend_from_slice(&f.raw);
        drop(f);
        r.settle(&mut out, true);
        assert_eq!(budget.available(), 10 * MIB - (3 * MIB + 4), "still in the out buffer");
        out.clear();
        r.settle(&mut out, false);
        assert!(r.engaged(), "held elsewhere: not given back");
        r.settle(&mut out, true);
        assert_eq!(budget.available(), 10 * MIB);
        assert!(!r.engaged());
        assert_eq!(r.next(&mut buf, false).unwrap().unwrap().tag, b'S');
    }

    #[test]
    fn a_spent_budget_makes_the_reader_wait_or_refuses_when_waiting_could_deadlock() {
        let budget = Budget::new(4 * MIB);
        let hog = budget.try_charge(3 * MIB).unwrap();
        let m = msg(b'B', 2 * MIB);
        let mut r = client(4 * MIB, &budget);
        let mut buf = BytesMut::from(&m[..5]);
        assert!(r.next(&mut buf, true).unwrap_err().sqlstate() == crate::sqlstate::OUT_OF_MEMORY);
        let mut r = client(4 * MIB, &budget);
        assert!(r.next(&mut buf, false).unwrap().is_none());
        assert!(r.blocked());
        drop(hog);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let c = rt.block_on(r.budget());
        r.granted(c, &mut buf).unwrap();
        assert!(!r.blocked() && buf.capacity() >= m.len());
        buf.extend_from_slice(&m[5..]);
        assert_eq!(r.next(&mut buf, false).unwrap().unwrap().raw.len(), m.len());
    }

    #[test]
    fn large_server_messages_pass_in_pieces_unless_read_whole() {
        let budget = Budget::new(4 * MIB);
        let mut r = Inbound::new(Side::Server, MIB, budget.clone(), 64 * 1024, 64 * 1024);
        let row = msg(b'D', 3 * MIB);
        let mut out = BytesMut::new();
        let mut buf = BytesMut::from(&row[..100_000]);
        r.pass(&mut buf, &mut out, |_| false);
        assert!(buf.is_empty() && out.len() == 100_000);
        buf.extend_from_slice(&row[100_000..]);
        buf.extend_from_slice(&msg(b'C', 5));
        r.pass(&mut buf, &mut out, |_| false);
        assert_eq!(&out[..], &row[..]);
        assert_eq!(r.next(&mut buf, false).unwrap().unwrap().tag, b'C');
        assert_eq!(budget.available(), 4 * MIB, "nothing charged");
        // Read whole (masking): over max_message_bytes is refused.
        let mut buf = BytesMut::from(&row[..5]);
        r.pass(&mut buf, &mut out, |_| true);
        assert_eq!(buf.len(), 5);
        assert_eq!(r.next(&mut buf, false).unwrap_err().sqlstate(), crate::sqlstate::PROGRAM_LIMIT_EXCEEDED);
    }
}
