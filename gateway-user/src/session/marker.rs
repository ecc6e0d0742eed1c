//! Markers: messages that stand in for refused ones and fail inside Postgres, so that Postgres
//! itself aborts an open transaction or skips the rest of a pipeline exactly as after any
//! error. Their texts carry the session's nonce, so no client text can be mistaken for one.

use bytes::{BufMut, BytesMut};

use super::Relay;
use crate::wire::{self, Frame};

impl Relay {
    /// A Parse of `name` whose text fails to parse upstream, standing in for a denied Parse.
    pub(super) fn marker_parse(&self, name: &str) -> Frame {
        let mut body = BytesMut::new();
        body.put_slice(name.as_bytes());
        body.put_u8(0);
        body.put_slice(format!("pgward_refused_{} !", self.nonce).as_bytes());
        body.put_u8(0);
        body.put_i16(0);
        let mut b = BytesMut::new();
        wire::message(&mut b, b'P', &body);
        Frame { tag: b'P', raw: b.freeze() }
    }

    /// A query that fails to parse upstream, standing in for a refused statement.
    pub(super) fn marker_query(&self) -> Frame {
        let mut b = BytesMut::new();
        wire::query(&mut b, &format!("pgward_refused_{} !", self.nonce));
        Frame { tag: b'Q', raw: b.freeze() }
    }

    /// An Execute of a portal that does not exist, standing in for an Execute whose record
    /// the audit log could not take.
    pub(super) fn marker_execute(&self) -> Frame {
        let mut b = BytesMut::new();
        wire::execute(&mut b, &format!("pgward_refused_{}", self.nonce));
        Frame { tag: b'E', raw: b.freeze() }
    }

    /// A Bind of a statement that does not exist, standing in for a Bind whose record the
    /// audit log could not take or that the policy now refuses.
    pub(super) fn marker_bind(&self) -> Frame {
        let mut body = BytesMut::new();
        body.put_u8(0); // the unnamed portal
        body.put_slice(format!("pgward_refused_{}", self.nonce).as_bytes());
        body.put_u8(0);
        body.put_i16(0); // no parameter formats
        body.put_i16(0); // no parameters
        body.put_i16(0); // no result formats
        let mut b = BytesMut::new();
        wire::message(&mut b, b'B', &body);
        Frame { tag: b'B', raw: b.freeze() }
    }

    /// A FunctionCall of OID 0, which fails with "function with OID 0 does not exist".
    pub(super) fn marker_function_call(&self) -> Frame {
        let mut b = BytesMut::new();
        wire::message(&mut b, b'F', &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        Frame { tag: b'F', raw: b.freeze() }
    }
}
