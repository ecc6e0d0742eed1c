//! Postgres wire protocol v3 frames: reading whole messages as raw `Bytes`, the handful of
//! zero-copy decoders the session needs (Query, Parse, Bind, Execute, Close, CommandComplete,
//! ErrorResponse fields), and builders for the messages pgward itself sends (via pgwire's
//! message types). `wire` knows frames, not policy.

use std::borrow::Cow;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use pgwire::error::ErrorInfo;
use pgwire::messages::Message;
use pgwire::messages::response::ErrorResponse;
use tokio::io::{AsyncRead, AsyncReadExt};

/// A bidirectional byte stream (TCP, unix socket, or TLS over either).
pub trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    /// The plain socket under this stream, taken out of the event loop that registered it
    /// (tokio's `into_std`: deregistered from that loop's reactor, still non-blocking), so that
    /// another loop can adopt it with [`StdStream::into_tokio`]. `Err(self)`, unchanged, for a
    /// stream that cannot move that way (TLS: its state lives in the tokio stream; in-memory
    /// pipes). `Ok(Err(_))`: deregistering failed, and the socket is closed.
    fn into_std(self: Box<Self>) -> Result<std::io::Result<StdStream>, BoxStream>;

    /// The socket under a plaintext TCP or Unix stream, whose bytes go to the peer as they are
    /// written; None for TLS or in-memory streams.
    fn plain_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>>;
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> AsyncStream for T {
    fn into_std(self: Box<Self>) -> Result<std::io::Result<StdStream>, BoxStream> {
        let any: Box<dyn std::any::Any> = self;
        let any = match any.downcast::<tokio::net::TcpStream>() {
            Ok(s) => return Ok(tokio::net::TcpStream::into_std(*s).map(StdStream::Tcp)),
            Err(any) => any,
        };
        let any = match any.downcast::<tokio::net::UnixStream>() {
            Ok(s) => return Ok(tokio::net::UnixStream::into_std(*s).map(StdStream::Unix)),
            Err(any) => any,
        };
        // A boxed BoxStream: what is inside.
        let any = match any.downcast::<BoxStream>() {
            Ok(inner) => return (*inner).into_std(),
            Err(any) => any,
        };
        match any.downcast::<T>() {
            Ok(s) => Err(s),
            Err(_) => unreachable!("a Box<T> downcasts to T"),
        }
    }

    fn plain_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        let any: &dyn std::any::Any = self;
        if let Some(s) = any.downcast_ref::<tokio::net::TcpStream>() {
            return Some(s.as_fd());
        }
        if let Some(s) = any.downcast_ref::<tokio::net::UnixStream>() {
            return Some(s.as_fd());
        }
        any.downcast_ref::<BoxStream>().and_then(|inner| (**inner).plain_fd())
    }
}

/// Send as much of `buf` as the socket takes now, without blocking (`MSG_DONTWAIT |
/// MSG_NOSIGNAL`): the number of bytes sent. Stops at a full send buffer or an error (which
/// the stream's owner then meets on its own next write).
pub fn send_now(fd: std::os::fd::BorrowedFd<'_>, buf: &[u8]) -> usize {
    use std::os::fd::AsRawFd;
    let mut off = 0;
    while off < buf.len() {
        let rest = &buf[off..];
        // SAFETY: send(2) from a live buffer of `rest.len()` bytes on an open socket.
        let n = unsafe {
            libc::send(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n > 0 {
            off += n as usize;
        } else if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        } else {
            break;
        }
    }
    off
}

pub type BoxStream = Box<dyn AsyncStream>;

/// A plain socket out of any event loop ([`AsyncStream::into_std`]): non-blocking, registered
/// with no reactor.
#[derive(Debug)]
pub enum StdStream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl StdStream {
    /// Register the socket with the current runtime's reactor: from now on the calling event
    /// loop drives it. Must be called from within a tokio runtime.
    pub fn into_tokio(self) -> std::io::Result<BoxStream> {
        Ok(match self {
            StdStream::Tcp(s) => Box::new(tokio::net::TcpStream::from_std(s)?),
            StdStream::Unix(s) => Box::new(tokio::net::UnixStream::from_std(s)?),
        })
    }

    /// Whether the peer has nothing for us right now: one non-blocking peek (`MSG_PEEK |
    /// MSG_DONTWAIT`), which consumes nothing. Would block: quiet. Data, EOF or an error: not.
    pub fn is_quiet(&self) -> bool {
        use std::os::fd::AsRawFd;
        let fd = match self {
            StdStream::Tcp(s) => s.as_raw_fd(),
            StdStream::Unix(s) => s.as_raw_fd(),
        };
        let mut byte = [0u8; 1];
        loop {
            // SAFETY: recv(2) into a live 1-byte buffer on a socket this value owns.
            let n = unsafe { libc::recv(fd, byte.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
            if n >= 0 {
                return false;
            }
            match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return true,
                _ => return false,
            }
        }
    }

    /// Write `bytes` if the socket takes them without blocking (best effort), then shut it
    /// down and close it.
    pub fn close_with(mut self, bytes: &[u8]) {
        use std::io::Write;
        let _ = match &mut self {
            StdStream::Tcp(s) => s.write(bytes).and_then(|_| s.shutdown(std::net::Shutdown::Both)),
            StdStream::Unix(s) => s.write(bytes).and_then(|_| s.shutdown(std::net::Shutdown::Both)),
        };
    }
}

/// Largest message pgward accepts from either side (Postgres's own limit is 1 GiB).
pub const MAX_FRAME: usize = 1 << 30;
/// Largest startup-phase message (startup packet, password, SASL).
pub const MAX_STARTUP_FRAME: usize = 64 * 1024;

pub const PROTOCOL_3_0: u32 = 196_608;
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;

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
            WireError::Encoding(_) => "22021",
            _ => "08P01",
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

/// Bytes of a protocol string as text. Clients may use any `client_encoding`, so strings are
/// not required to be UTF-8: valid UTF-8 is used as is; anything else is read byte for byte as
/// Latin-1 code points (lossless: each byte maps to one char, so the audit log keeps exactly
/// what was sent, and is exact for LATIN1 clients).
pub fn text(b: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(b) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(b.iter().map(|&c| c as char).collect()),
    }
}

/// An encoding name as Postgres compares them: case and punctuation ignored (`UTF-8` = `utf8`).
pub fn encoding_key(name: &str) -> String {
    name.chars().filter(|c| c.is_ascii_alphanumeric()).collect::<String>().to_ascii_lowercase()
}

/// The client encodings pgward decodes SQL text from exactly as a UTF-8 server converts it
/// before lexing: UTF8 (and SQL_ASCII, which such a server checks as UTF-8), and LATIN1
/// (each byte is the code point of the same value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientEncoding {
    Utf8,
    Latin1,
}

impl ClientEncoding {
    /// From a `client_encoding` value (case and punctuation ignored, as Postgres does).
    pub fn from_name(name: &str) -> Option<ClientEncoding> {
        match encoding_key(name).as_str() {
            "utf8" | "unicode" | "sqlascii" => Some(ClientEncoding::Utf8),
            "latin1" | "iso88591" => Some(ClientEncoding::Latin1),
            _ => None,
        }
    }

    /// The text the server will lex; Err with the offset of the first invalid byte.
    pub fn decode(self, b: &[u8]) -> Result<Cow<'_, str>, WireError> {
        match self {
            ClientEncoding::Utf8 => std::str::from_utf8(b).map(Cow::Borrowed).map_err(|e| WireError::Encoding(e.valid_up_to())),
            ClientEncoding::Latin1 => Ok(text(b)),
        }
    }
}

/// Cursor over a message body.
pub struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b }
    }
    pub fn remaining(&self) -> usize {
        self.b.len()
    }
    /// A NUL-terminated string, as text (see [`text`]).
    pub fn cstr(&mut self) -> Result<Cow<'a, str>, WireError> {
        let nul = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| WireError::malformed("string without terminator"))?;
        let s = text(&self.b[..nul]);
        self.b = &self.b[nul + 1..];
        Ok(s)
    }
    /// A NUL-terminated SQL text, decoded from the session's client encoding into the text
    /// the server lexes (no lossy fallback: pgward must not decide on text the server reads
    /// differently).
    pub fn sql(&mut self, enc: ClientEncoding) -> Result<Cow<'a, str>, WireError> {
        let nul = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or_else(|| WireError::malformed("string without terminator"))?;
        let s = enc.decode(&self.b[..nul])?;
        self.b = &self.b[nul + 1..];
        Ok(s)
    }
    /// The message must end here: bytes after its last field (a NUL inside a text, say)
    /// would be read one way by pgward and refused or read another way by the server.
    pub fn end(&self, what: &str) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::malformed(format!("{what} has {} bytes after its last field (a NUL inside its text?)", self.b.len())))
        }
    }
    pub fn u8(&mut self) -> Result<u8, WireError> {
        if self.b.is_empty() {
            return Err(WireError::malformed("message truncated"));
        }
        Ok(self.b.get_u8())
    }
    pub fn i16(&mut self) -> Result<i16, WireError> {
        if self.b.len() < 2 {
            return Err(WireError::malformed("message truncated"));
        }
        Ok(self.b.get_i16())
    }
    pub fn i32(&mut self) -> Result<i32, WireError> {
        if self.b.len() < 4 {
            return Err(WireError::malformed("message truncated"));
        }
        Ok(self.b.get_i32())
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::malformed("message truncated"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
}

// ---------------------------------------------------------------- client message decoders

/// `Q`: the query string, in the client's encoding, with nothing after its terminator.
pub fn decode_query(f: &Frame, enc: ClientEncoding) -> Result<Cow<'_, str>, WireError> {
    let mut r = Reader::new(f.body());
    let sql = r.sql(enc)?;
    r.end("Query")?;
    Ok(sql)
}

/// Server `S` (ParameterStatus): (name, value); empty strings where the frame is short.
pub fn decode_parameter_status(f: &Frame) -> (String, String) {
    let mut r = Reader::new(f.body());
    let name = r.cstr().map(Cow::into_owned).unwrap_or_default();
    let value = r.cstr().map(Cow::into_owned).unwrap_or_default();
    (name, value)
}

/// `P`: (statement name, SQL text in the client's encoding).
pub fn decode_parse(f: &Frame, enc: ClientEncoding) -> Result<(Cow<'_, str>, Cow<'_, str>), WireError> {
    let mut r = Reader::new(f.body());
    let name = r.cstr()?;
    let sql = r.sql(enc)?;
    let n = r.i16()?;
    if n < 0 {
        return Err(WireError::malformed("Parse with negative parameter type count"));
    }
    r.bytes(n as usize * 4)?;
    r.end("Parse")?;
    Ok((name, sql))
}

/// A decoded `B`.
#[derive(Debug)]
pub struct Bind<'a> {
    pub portal: Cow<'a, str>,
    pub statement: Cow<'a, str>,
    /// One entry per parameter: None for SQL NULL, with its format (0 text, 1 binary).
    pub params: Vec<(i16, Option<&'a [u8]>)>,
}

pub fn decode_bind(f: &Frame) -> Result<Bind<'_>, WireError> {
    let mut r = Reader::new(f.body());
    let portal = r.cstr()?;
    let statement = r.cstr()?;
    let nfmt = r.i16()?;
    if nfmt < 0 {
        return Err(WireError::malformed("Bind with negative format count"));
    }
    let mut fmts = Vec::with_capacity(nfmt as usize);
    for _ in 0..nfmt {
        fmts.push(r.i16()?);
    }
    let nparams = r.i16()?;
    if nparams < 0 {
        return Err(WireError::malformed("Bind with negative parameter count"));
    }
    if !(fmts.len() <= 1 || fmts.len() == nparams as usize) {
        return Err(WireError::malformed("Bind format count does not match parameter count"));
    }
    let mut params = Vec::with_capacity(nparams as usize);
    for i in 0..nparams as usize {
        let fmt = match fmts.len() {
            0 => 0,
            1 => fmts[0],
            _ => fmts[i],
        };
        let len = r.i32()?;
        let v = if len < 0 { None } else { Some(r.bytes(len as usize)?) };
        params.push((fmt, v));
    }
    Ok(Bind { portal, statement, params })
}

/// Render a bound parameter for the audit log: text as is (lossy UTF-8), binary as `\x…` hex.
pub fn render_param(fmt: i16, v: Option<&[u8]>) -> Option<String> {
    v.map(|b| {
        if fmt == 0 {
            String::from_utf8_lossy(b).into_owned()
        } else {
            let mut s = String::with_capacity(2 + b.len() * 2);
            s.push_str("\\x");
            s.push_str(&hex::encode(b));
            s
        }
    })
}

/// `E`: portal name.
pub fn decode_execute(f: &Frame) -> Result<Cow<'_, str>, WireError> {
    let mut r = Reader::new(f.body());
    let portal = r.cstr()?;
    r.i32()?;
    Ok(portal)
}

/// `C` (Close) and `D` (Describe): ('S' or 'P', name).
pub fn decode_close_or_describe(f: &Frame) -> Result<(u8, Cow<'_, str>), WireError> {
    let mut r = Reader::new(f.body());
    let kind = r.u8()?;
    if kind != b'S' && kind != b'P' {
        return Err(WireError::malformed(format!("Close/Describe of unknown kind {:?}", kind as char)));
    }
    Ok((kind, r.cstr()?))
}

/// `F` (FunctionCall): the function's OID and its arguments rendered for the audit log.
pub fn decode_function_call(f: &Frame) -> Result<(i32, Vec<Option<String>>), WireError> {
    let mut r = Reader::new(f.body());
    let oid = r.i32()?;
    let nfmt = r.i16()?;
    if nfmt < 0 {
        return Err(WireError::malformed("FunctionCall with negative format count"));
    }
    let mut fmts = Vec::with_capacity(nfmt as usize);
    for _ in 0..nfmt {
        fmts.push(r.i16()?);
    }
    let nargs = r.i16()?;
    if nargs < 0 {
        return Err(WireError::malformed("FunctionCall with negative argument count"));
    }
    let mut args = Vec::with_capacity(nargs as usize);
    for i in 0..nargs as usize {
        let fmt = match fmts.len() {
            0 => 0,
            1 => fmts[0],
            _ => *fmts.get(i).ok_or_else(|| WireError::malformed("FunctionCall format count mismatch"))?,
        };
        let len = r.i32()?;
        let v = if len < 0 { None } else { Some(r.bytes(len as usize)?) };
        args.push(render_param(fmt, v));
    }
    r.i16()?;
    Ok((oid, args))
}

/// `p` during the startup phase: the password (the token).
pub fn decode_password(f: &Frame) -> Result<Cow<'_, str>, WireError> {
    if f.tag != b'p' {
        return Err(WireError::malformed(format!(
            "expected a password message, got {:?}",
            f.tag as char
        )));
    }
    Reader::new(f.body()).cstr()
}

// ---------------------------------------------------------------- server message decoders

/// `C` (CommandComplete) from the server: the tag and the row count it carries, if any.
pub fn decode_command_complete(f: &Frame) -> Result<(Cow<'_, str>, Option<u64>), WireError> {
    let tag = Reader::new(f.body()).cstr()?;
    let rows = tag.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok());
    // "INSERT 0 5", "SELECT 3", "UPDATE 2", "COPY 10", "FETCH 1", "MOVE 1"; others carry none.
    let counted = ["INSERT", "SELECT", "UPDATE", "DELETE", "COPY", "FETCH", "MOVE", "MERGE"];
    let is_counted = counted.contains(&tag.split(' ').next().unwrap_or(""));
    Ok((tag, if is_counted { rows } else { None }))
}

/// Fields of an ErrorResponse / NoticeResponse we care about.
#[derive(Debug, Default, Clone)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn decode_error(f: &Frame) -> ErrorFields {
    let mut out = ErrorFields::default();
    let mut r = Reader::new(f.body());
    while let Ok(kind) = r.u8() {
        if kind == 0 {
            break;
        }
        let Ok(v) = r.cstr() else { break };
        match kind {
            b'V' => out.severity = v.to_string(),
            b'S' if out.severity.is_empty() => out.severity = v.to_string(),
            b'C' => out.code = v.to_string(),
            b'M' => out.message = v.to_string(),
            _ => {}
        }
    }
    out
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_now_sends_what_fits_and_never_blocks_or_signals() {
        use std::io::Read as _;
        use std::os::fd::AsFd as _;
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        // Far more than a socket buffer holds: part goes, the call returns instead of waiting.
        let big = vec![7u8; 16 << 20];
        let n = send_now(a.as_fd(), &big);
        assert!(n > 0 && n < big.len(), "sent {n}");
        b.set_nonblocking(true).expect("nonblocking");
        let mut got = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match b.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
        assert_eq!(got, n, "the peer gets exactly what send_now reported");
        // A closed peer: nothing sent, no SIGPIPE (the test process would die of it).
        drop(b);
        assert_eq!(send_now(a.as_fd(), b"late"), 0);
    }

    fn frame(tag: u8, body: &[u8]) -> Frame {
        let mut b = BytesMut::new();
        message(&mut b, tag, body);
        split_frame(&mut b, MAX_FRAME).unwrap().unwrap()
    }

    #[test]
    fn complete_frames_peeks_whole_frames_and_stops_at_a_partial_or_bad_one() {
        let mut b = BytesMut::new();
        query(&mut b, "select 1");
        message(&mut b, b'S', b"");
        let two = b.len();
        let cases: &[(&[u8], Vec<u8>)] = &[
            (&b[..two], vec![b'Q', b'S']),
            (&b[..two - 1], vec![b'Q']),
            (b"", vec![]),
            (b"Q\0\0", vec![]),
            (b"Q\0\0\0\x02S\0\0\0\x04", vec![]),
        ];
        for (buf, tags) in cases {
            let got: Vec<u8> = complete_frames(buf).map(|(t, _)| t).collect();
            assert_eq!(&got, tags, "{buf:?}");
        }
        let frames: Vec<&[u8]> = complete_frames(&b).map(|(_, raw)| raw).collect();
        assert_eq!(frames.concat(), b.to_vec(), "each item is the whole message, header included");
    }

    #[test]
    fn split_waits_for_whole_frame_and_rejects_bad_lengths() {
        let mut b = BytesMut::from(&b"Q\0\0\0\x09sel"[..]);
        assert!(split_frame(&mut b, MAX_FRAME).unwrap().is_none());
        b.extend_from_slice(b"1\0");
        let f = split_frame(&mut b, MAX_FRAME).unwrap().unwrap();
        assert_eq!(decode_query(&f, ClientEncoding::Utf8).unwrap(), "sel1");
        assert!(b.is_empty());
        let mut bad = BytesMut::from(&b"Q\0\0\0\x02"[..]);
        assert!(matches!(split_frame(&mut bad, MAX_FRAME), Err(WireError::Malformed(_))));
        let mut huge = BytesMut::from(&b"Q\x7f\0\0\0"[..]);
        assert!(matches!(split_frame(&mut huge, 1 << 20), Err(WireError::Malformed(_))));
    }

    #[test]
    fn bind_decodes_text_binary_and_null() {
        let mut body = BytesMut::new();
        body.put_slice(b"p1\0s1\0");
        body.put_i16(2);
        body.put_i16(0);
        body.put_i16(1);
        body.put_i16(3);
        body.put_i32(2);
        body.put_slice(b"42");
        body.put_i32(2);
        body.put_slice(&[0xde, 0xad]);
        // third param uses... format count 2 != 3 params: malformed
        body.put_i32(-1);
        body.put_i16(0);
        let f = frame(b'B', &body);
        assert!(decode_bind(&f).is_err());

        let mut body = BytesMut::new();
        body.put_slice(b"\0s1\0");
        body.put_i16(1);
        body.put_i16(1);
        body.put_i16(2);
        body.put_i32(2);
        body.put_slice(&[0xde, 0xad]);
        body.put_i32(-1);
        body.put_i16(0);
        let f = frame(b'B', &body);
        let b = decode_bind(&f).unwrap();
        assert_eq!(b.portal, "");
        assert_eq!(b.statement, "s1");
        let rendered: Vec<_> = b.params.iter().map(|(f, v)| render_param(*f, *v)).collect();
        assert_eq!(rendered, vec![Some("\\xdead".to_string()), None]);
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        for tag in [b'P', b'B', b'E', b'C', b'F', b'Q'] {
            for body in [&b""[..], b"\0", b"a", b"a\0b", b"\0\0\xff\xff"] {
                let f = frame(tag, body);
                let _ = decode_parse(&f, ClientEncoding::Utf8);
                let _ = decode_bind(&f);
                let _ = decode_execute(&f);
                let _ = decode_close_or_describe(&f);
                let _ = decode_function_call(&f);
                let _ = decode_query(&f, ClientEncoding::Utf8);
                let _ = decode_error(&f);
            }
        }
    }

    #[test]
    fn command_complete_rows() {
        let f = frame(b'C', b"INSERT 0 5\0");
        assert_eq!(decode_command_complete(&f).unwrap(), ("INSERT 0 5".into(), Some(5)));
        let f = frame(b'C', b"CREATE TABLE\0");
        assert_eq!(decode_command_complete(&f).unwrap(), ("CREATE TABLE".into(), None));
    }

    #[test]
    fn startup_parses_params_and_special_requests() {
        let mut b = BytesMut::new();
        startup_packet(&mut b, &[("user", "alice"), ("database", "app")]);
        match parse_startup(&b).unwrap() {
            StartupRequest::Startup { version, params } => {
                assert_eq!(version, PROTOCOL_3_0);
                assert_eq!(params, vec![("user".into(), "alice".into()), ("database".into(), "app".into())]);
            }
            other => panic!("{other:?}"),
        }
        let mut c = BytesMut::new();
        cancel_request(&mut c, 7, -9);
        assert!(matches!(parse_startup(&c).unwrap(), StartupRequest::Cancel { pid: 7, key: -9 }));
    }

    #[test]
    fn error_response_roundtrip() {
        let b = error_response_bytes("ERROR", "42501", "denied by rule x");
        let mut bm = BytesMut::from(&b[..]);
        let f = split_frame(&mut bm, MAX_FRAME).unwrap().unwrap();
        assert_eq!(f.tag, b'E');
        let e = decode_error(&f);
        assert_eq!((e.severity.as_str(), e.code.as_str(), e.message.as_str()), ("ERROR", "42501", "denied by rule x"));
    }
}
