//! Builders of the messages pgward sends itself (errors, authentication, startup, markers),
//! via pgwire's message types where it has them.

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::error::ErrorInfo;
use pgwire::messages::Message;
use pgwire::messages::response::ErrorResponse;

use super::{CANCEL_REQUEST, PROTOCOL_3_0};

// ---------------------------------------------------------------- builders

fn encode<M: Message>(m: M, out: &mut BytesMut) {
    // Encoding into a BytesMut cannot fail for these message types; keep the frame stream
    // intact even if it ever does (nothing half-written: encode into a scratch buffer).
    let mut tmp = BytesMut::new();
    if m.encode(&mut tmp).is_ok() {
        out.extend_from_slice(&tmp);
    }
}

/// ErrorResponse with severity ERROR or FATAL.
pub fn error_response(out: &mut BytesMut, severity: &str, code: &str, message: &str) {
    let info = ErrorInfo::new(severity.to_string(), code.to_string(), message.to_string());
    encode(ErrorResponse::from(info), out);
}

pub fn error_response_bytes(severity: &str, code: &str, message: &str) -> Bytes {
    let mut b = BytesMut::new();
    error_response(&mut b, severity, code, message);
    b.freeze()
}

pub fn auth_cleartext(out: &mut BytesMut) {
    encode(pgwire::messages::startup::Authentication::CleartextPassword, out);
}

pub fn auth_ok(out: &mut BytesMut) {
    encode(pgwire::messages::startup::Authentication::Ok, out);
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    encode(pgwire::messages::startup::ParameterStatus::new(name.into(), value.into()), out);
}

pub fn backend_key_data(out: &mut BytesMut, pid: i32, key: i32) {
    encode(
        pgwire::messages::startup::BackendKeyData::new(
            pid,
            pgwire::messages::startup::SecretKey::I32(key),
        ),
        out,
    );
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    out.put_u8(b'Z');
    out.put_u32(5);
    out.put_u8(status);
}

/// NegotiateProtocolVersion: the newest minor version we support (0) and options we ignore.
pub fn negotiate_protocol_version(out: &mut BytesMut, unsupported: &[String]) {
    let mut body = BytesMut::new();
    body.put_i32(PROTOCOL_3_0 as i32);
    body.put_i32(unsupported.len() as i32);
    for o in unsupported {
        body.put_slice(o.as_bytes());
        body.put_u8(0);
    }
    out.put_u8(b'v');
    out.put_u32(4 + body.len() as u32);
    out.put_slice(&body);
}

/// A tagged frontend/backend message from a body.
pub fn message(out: &mut BytesMut, tag: u8, body: &[u8]) {
    out.put_u8(tag);
    out.put_u32(4 + body.len() as u32);
    out.put_slice(body);
}

/// `Q` with the given text.
pub fn query(out: &mut BytesMut, sql: &str) {
    out.put_u8(b'Q');
    out.put_u32(4 + sql.len() as u32 + 1);
    out.put_slice(sql.as_bytes());
    out.put_u8(0);
}

/// `E` (Execute) of `portal`, all rows.
pub fn execute(out: &mut BytesMut, portal: &str) {
    out.put_u8(b'E');
    out.put_u32(4 + portal.len() as u32 + 1 + 4);
    out.put_slice(portal.as_bytes());
    out.put_u8(0);
    out.put_i32(0);
}

/// Startup packet (protocol 3.0) with the given parameters.
pub fn startup_packet(out: &mut BytesMut, params: &[(&str, &str)]) {
    let mut body = BytesMut::new();
    body.put_u32(PROTOCOL_3_0);
    for (k, v) in params {
        body.put_slice(k.as_bytes());
        body.put_u8(0);
        body.put_slice(v.as_bytes());
        body.put_u8(0);
    }
    body.put_u8(0);
    out.put_u32(4 + body.len() as u32);
    out.put_slice(&body);
}

pub fn cancel_request(out: &mut BytesMut, pid: i32, key: i32) {
    out.put_u32(16);
    out.put_u32(CANCEL_REQUEST);
    out.put_i32(pid);
    out.put_i32(key);
}
