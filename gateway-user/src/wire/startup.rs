//! The startup-phase packets (no tag byte): StartupMessage, SSLRequest, GSSENCRequest and
//! CancelRequest.

use bytes::Buf;

use super::{Reader, WireError};

pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;

/// What a client opened the connection with.
#[derive(Debug)]
pub enum StartupRequest {
    Ssl,
    GssEnc,
    Cancel { pid: i32, key: i32 },
    Startup { version: u32, params: Vec<(String, String)> },
}

pub fn parse_startup(pkt: &[u8]) -> Result<StartupRequest, WireError> {
    let mut b = pkt.get(4..).ok_or_else(|| WireError::malformed("short startup packet"))?;
    if b.len() < 4 {
        return Err(WireError::malformed("short startup packet"));
    }
    let code = b.get_u32();
    match code {
        SSL_REQUEST => Ok(StartupRequest::Ssl),
        GSSENC_REQUEST => Ok(StartupRequest::GssEnc),
        CANCEL_REQUEST => {
            if b.len() < 8 {
                return Err(WireError::malformed("short CancelRequest"));
            }
            let pid = b.get_i32();
            let key = b.get_i32();
            Ok(StartupRequest::Cancel { pid, key })
        }
        version => {
            let mut params = Vec::new();
            let mut r = Reader::new(b);
            loop {
                let name = r.cstr()?;
                if name.is_empty() {
                    break;
                }
                let value = r.cstr()?;
                params.push((name.to_string(), value.to_string()));
            }
            Ok(StartupRequest::Startup { version, params })
        }
    }
}
