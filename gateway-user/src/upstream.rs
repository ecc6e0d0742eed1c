//! The real Postgres: connect (TCP or unix socket, optional TLS), log in with pgward's own
//! service credential (trust, cleartext, md5, SCRAM-SHA-256), collect the session parameters,
//! and forward CancelRequests. The client never sees the credential.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Config, UpstreamTls};
use crate::wire::{self, BoxStream, Reader, WireError};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the database at {addr}: {source}")]
    Connect { addr: String, source: std::io::Error },
    #[error("timed out connecting to the database at {0}")]
    Timeout(String),
    #[error("database server requires TLS setup that failed: {0}")]
    Tls(String),
    /// The server refused the login or the database; carries its SQLSTATE and message.
    #[error("{message}")]
    Server { code: String, message: String },
    #[error("database login needs a password but upstream.password_file is not set or unreadable")]
    NoPassword,
    #[error("database asked for an unsupported authentication method ({0})")]
    UnsupportedAuth(i32),
    #[error("protocol error talking to the database: {0}")]
    Wire(#[from] WireError),
    #[error("SCRAM: {0}")]
    Scram(String),
    /// A pooled connection's reset (`RESET ROLE`, `DISCARD ALL`) did not end as it must.
    #[error("resetting the connection: {0}")]
    Reset(String),
}

impl UpstreamError {
    /// SQLSTATE to hand the client: the server's own, or 08006 (connection failure).
    pub fn sqlstate(&self) -> &str {
        match self {
            UpstreamError::Server { code, .. } => code,
            _ => crate::sqlstate::CONNECTION_FAILURE,
        }
    }
}

/// A logged-in upstream connection, ready for queries.
pub struct Upstream {
    pub stream: BoxStream,
    /// Bytes already read past the first ReadyForQuery (normally empty).
    pub leftover: BytesMut,
    pub params: Vec<(String, String)>,
    pub backend_pid: i32,
    pub backend_key: i32,
    pub tx_status: u8,
}

/// Where to reach the upstream, for connects and cancels.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
    pub connect_timeout: Duration,
}

impl Target {
    pub fn from_config(cfg: &Config) -> Target {
        Target {
            host: cfg.upstream.host.clone(),
            port: cfg.upstream.port,
            tls: cfg.upstream.tls,
            connect_timeout: cfg.upstream.connect_timeout,
        }
    }

    fn describe(&self) -> String {
        if self.is_unix() {
            format!("{}/.s.PGSQL.{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn is_unix(&self) -> bool {
        self.host.starts_with('/')
    }

    /// Open a raw socket (no TLS, no startup).
    async fn open_raw(&self) -> Result<BoxStream, UpstreamError> {
        let addr = self.describe();
        let fut = async {
            if self.is_unix() {
                let s = tokio::net::UnixStream::connect(&addr).await?;
                Ok::<BoxStream, std::io::Error>(Box::new(s))
            } else {
                let s = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
                s.set_nodelay(true)?;
                Ok::<BoxStream, std::io::Error>(Box::new(s))
            }
        };
        match tokio::time::timeout(self.connect_timeout, fut).await {
            Err(_) => Err(UpstreamError::Timeout(addr)),
            Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
            Ok(Ok(s)) => Ok(s),
        }
    }

    /// Open a socket and negotiate TLS per the config.
    async fn open(&self) -> Result<BoxStream, UpstreamError> {
        let mut s = self.open_raw().await?;
        if self.tls == UpstreamTls::Disable || self.is_unix() {
            return Ok(s);
        }
        let mut req = BytesMut::new();
        req.put_u32(8);
        req.put_u32(wire::SSL_REQUEST);
        s.write_all(&req).await.map_err(WireError::Io)?;
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await.map_err(WireError::Io)?;
        match answer[0] {
            b'S' => {
                let cfg = crate::tls::upstream_client_config();
                let connector = tokio_rustls::TlsConnector::from(cfg);
                let name = rustls_pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| UpstreamError::Tls(e.to_string()))?;
                let tls = connector.connect(name, s).await.map_err(|e| UpstreamError::Tls(e.to_string()))?;
                Ok(Box::new(tls))
            }
            _ if self.tls == UpstreamTls::Require => {
                Err(UpstreamError::Tls("the database server does not accept TLS".into()))
            }
            _ => Ok(s),
        }
    }
}

/// Connect and log in as the service role to `database`. `params` are extra startup
/// parameters (application_name, client_encoding, ...).
pub async fn connect(
    target: &Target,
    user: &str,
    password: Option<&str>,
    database: &str,
    params: &[(&str, &str)],
) -> Result<Upstream, UpstreamError> {
    let mut stream = target.open().await?;
    let mut startup: Vec<(&str, &str)> = vec![("user", user), ("database", database)];
    startup.extend_from_slice(params);
    let mut out = BytesMut::new();
    wire::startup_packet(&mut out, &startup);
    stream.write_all(&out).await.map_err(WireError::Io)?;

    let mut buf = BytesMut::with_capacity(8192);
    let mut scram: Option<ScramSha256> = None;
    let mut up_params = Vec::new();
    let mut pid = 0;
    let mut key = 0;
    loop {
        let f = wire::read_frame(&mut stream, &mut buf, wire::MAX_STARTUP_FRAME).await?;
        match f.tag {
            b'R' => {
                let mut r = Reader::new(f.body());
                let code = r.i32()?;
                if let Some(out) = auth_reply(code, &mut r, user, password, &mut scram)? {
                    stream.write_all(&out).await.map_err(WireError::Io)?;
                }
            }
            b'S' => {
                let mut r = Reader::new(f.body());
                let name = r.cstr()?.to_string();
                let value = r.cstr()?.to_string();
                up_params.push((name, value));
            }
            b'K' => {
                let mut r = Reader::new(f.body());
                pid = r.i32()?;
                key = r.i32()?;
            }
            b'E' => {
                let e = wire::decode_error(&f);
                return Err(UpstreamError::Server { code: e.code, message: e.message });
            }
            b'N' | b'v' => {}
            b'Z' => {
                let status = f.body().first().copied().unwrap_or(b'I');
                return Ok(Upstream {
                    stream,
                    leftover: buf,
                    params: up_params,
                    backend_pid: pid,
                    backend_key: key,
                    tx_status: status,
                });
            }
            other => {
                return Err(UpstreamError::Wire(WireError::malformed(format!(
                    "unexpected message {:?} during login",
                    other as char
                ))));
            }
        }
    }
}

/// Authentication request codes of the server's `AuthenticationXXX` messages.
const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT_PASSWORD: i32 = 3;
const AUTH_MD5_PASSWORD: i32 = 5;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

/// The answer to the server's authentication request `code` (its body after the code in `r`):
/// the message to send, or None when there is nothing to send (ok, SCRAM's final check).
/// `scram` carries the SCRAM exchange across its three requests.
fn auth_reply(
    code: i32,
    r: &mut Reader<'_>,
    user: &str,
    password: Option<&str>,
    scram: &mut Option<ScramSha256>,
) -> Result<Option<BytesMut>, UpstreamError> {
    let mut out = BytesMut::new();
    match code {
        AUTH_OK => return Ok(None),
        AUTH_CLEARTEXT_PASSWORD => {
            let pw = password.ok_or(UpstreamError::NoPassword)?;
            let mut body = BytesMut::new();
            body.put_slice(pw.as_bytes());
            body.put_u8(0);
            wire::message(&mut out, b'p', &body);
        }
        AUTH_MD5_PASSWORD => {
            let pw = password.ok_or(UpstreamError::NoPassword)?;
            let salt = r.bytes(4)?;
            let salt = [salt[0], salt[1], salt[2], salt[3]];
            let hash = postgres_protocol::authentication::md5_hash(user.as_bytes(), pw.as_bytes(), salt);
            let mut body = BytesMut::new();
            body.put_slice(hash.as_bytes());
            body.put_u8(0);
            wire::message(&mut out, b'p', &body);
        }
        AUTH_SASL => {
            let pw = password.ok_or(UpstreamError::NoPassword)?;
            let mut mechs = Vec::new();
            loop {
                let m = r.cstr()?;
                if m.is_empty() {
                    break;
                }
                mechs.push(m);
            }
            if !mechs.iter().any(|m| m == SCRAM_SHA_256) {
                return Err(UpstreamError::Scram(format!("server offers {mechs:?}, pgward supports {SCRAM_SHA_256}")));
            }
            let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
            let first = s.message();
            let mut body = BytesMut::new();
            body.put_slice(SCRAM_SHA_256.as_bytes());
            body.put_u8(0);
            body.put_i32(first.len() as i32);
            body.put_slice(first);
            wire::message(&mut out, b'p', &body);
            *scram = Some(s);
        }
        AUTH_SASL_CONTINUE => {
            let s = scram.as_mut().ok_or_else(|| UpstreamError::Scram("unexpected SASLContinue".into()))?;
            s.update(r.rest()).map_err(|e| UpstreamError::Scram(e.to_string()))?;
            wire::message(&mut out, b'p', s.message());
        }
        AUTH_SASL_FINAL => {
            let s = scram.as_mut().ok_or_else(|| UpstreamError::Scram("unexpected SASLFinal".into()))?;
            s.finish(r.rest()).map_err(|e| UpstreamError::Scram(e.to_string()))?;
            return Ok(None);
        }
        other => return Err(UpstreamError::UnsupportedAuth(other)),
    }
    Ok(Some(out))
}

impl Upstream {
    /// Run one statement of pgward's own (e.g. `SET ROLE`) before the client is attached;
    /// anything but success (an ErrorResponse) is an error carrying the server's SQLSTATE.
    pub async fn setup_query(&mut self, sql: &str) -> Result<(), UpstreamError> {
        let mut out = BytesMut::new();
        wire::query(&mut out, sql);
        self.stream.write_all(&out).await.map_err(WireError::Io)?;
        let mut failure = None;
        loop {
            let f = wire::read_frame(&mut self.stream, &mut self.leftover, wire::MAX_FRAME).await?;
            match f.tag {
                b'E' => {
                    let e = wire::decode_error(&f);
                    failure = Some(UpstreamError::Server { code: e.code, message: e.message });
                }
                b'S' => self.note_parameter_status(&f)?,
                b'Z' => {
                    self.tx_status = f.body().first().copied().unwrap_or(b'I');
                    return failure.map_or(Ok(()), Err);
                }
                _ => {}
            }
        }
    }
}

impl Upstream {
    /// Put the connection back to what a fresh login gives, for session pooling: `RESET ROLE`,
    /// then `DISCARD ALL` (temp tables, prepared statements, cursors, session settings back to
    /// the startup values, advisory locks, LISTEN, cached plans, sequences). Two Queries:
    /// `DISCARD ALL` refuses to run in a transaction block, and a multi-statement Query is one.
    /// Each must answer exactly CommandComplete + ReadyForQuery 'I' (ParameterStatus, notices
    /// and stray notifications of the previous session are read and dropped); anything else
    /// is an error and the connection must not be reused.
    pub async fn reset(&mut self) -> Result<(), UpstreamError> {
        self.expect_command("RESET ROLE", "RESET").await?;
        self.expect_command("DISCARD ALL", "DISCARD ALL").await
    }

    async fn expect_command(&mut self, sql: &str, tag: &str) -> Result<(), UpstreamError> {
        if self.tx_status != b'I' {
            return Err(UpstreamError::Reset(format!("transaction status {:?} before {sql}", self.tx_status as char)));
        }
        let mut out = BytesMut::new();
        wire::query(&mut out, sql);
        self.stream.write_all(&out).await.map_err(WireError::Io)?;
        self.stream.flush().await.map_err(WireError::Io)?;
        let mut completed = false;
        loop {
            let f = wire::read_frame(&mut self.stream, &mut self.leftover, wire::MAX_FRAME).await?;
            match f.tag {
                b'C' => {
                    let (t, _) = wire::decode_command_complete(&f)?;
                    if completed || t != tag {
                        return Err(UpstreamError::Reset(format!("{sql}: unexpected command tag {t:?}")));
                    }
                    completed = true;
                }
                b'S' => self.note_parameter_status(&f)?,
                b'N' | b'A' => {}
                b'E' => {
                    let e = wire::decode_error(&f);
                    return Err(UpstreamError::Server { code: e.code, message: e.message });
                }
                b'Z' => {
                    self.tx_status = f.body().first().copied().unwrap_or(0);
                    if !completed || self.tx_status != b'I' {
                        return Err(UpstreamError::Reset(format!(
                            "{sql}: ReadyForQuery {:?} (completed: {completed})",
                            self.tx_status as char
                        )));
                    }
                    return Ok(());
                }
                other => return Err(UpstreamError::Reset(format!("{sql}: unexpected message {:?}", other as char))),
            }
        }
    }

    fn note_parameter_status(&mut self, f: &wire::Frame) -> Result<(), UpstreamError> {
        let mut r = Reader::new(f.body());
        let name = r.cstr()?.into_owned();
        let value = r.cstr()?.into_owned();
        match self.params.iter_mut().find(|(k, _)| *k == name) {
            Some(p) => p.1 = value,
            None => self.params.push((name, value)),
        }
        Ok(())
    }

    /// Whether an idle connection is still quiet: nothing buffered and nothing to read right
    /// now (one non-blocking poll). A server that said anything while nobody asked (FATAL on
    /// `pg_terminate_backend` or `idle_session_timeout`, EOF, an error) has ended the session.
    pub fn is_quiet(&mut self) -> bool {
        use std::task::{Context, Poll, Waker};
        use tokio::io::{AsyncRead, ReadBuf};
        if !self.leftover.is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        let mut rb = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(Waker::noop());
        matches!(std::pin::Pin::new(&mut self.stream).poll_read(&mut cx, &mut rb), Poll::Pending)
    }

    /// Close the connection politely (Terminate, then shutdown; bounded, best effort).
    pub async fn close(mut self) {
        let mut t = BytesMut::new();
        wire::message(&mut t, b'X', &[]);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.stream.write_all(&t).await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }
}

/// Send a CancelRequest for (pid, key) to the upstream.
pub async fn cancel(target: &Target, pid: i32, key: i32) -> Result<(), UpstreamError> {
    // CancelRequests go over a fresh plain connection (Postgres accepts them before TLS too).
    let mut plain = target.clone();
    plain.tls = UpstreamTls::Disable;
    let mut s = plain.open_raw().await?;
    let mut out = BytesMut::new();
    wire::cancel_request(&mut out, pid, key);
    s.write_all(&out).await.map_err(WireError::Io)?;
    // Postgres closes the connection after reading the request.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
    Ok(())
}

/// pgward's own cancel keys handed to clients, mapped to the upstream's, and whether a
/// CancelRequest was forwarded under the key (such a connection is not pooled: the cancel may
/// reach the backend after the session ended, and must not hit the next user's query).
#[derive(Default, Clone)]
pub struct CancelMap {
    inner: Arc<Mutex<HashMap<(i32, i32), CancelEntry>>>,
}

struct CancelEntry {
    /// The upstream's (pid, key).
    upstream: (i32, i32),
    /// A CancelRequest was forwarded under this key.
    cancelled: bool,
}

impl CancelMap {
    /// Register an upstream (pid, key) and return the (pid, key) to give the client.
    pub fn register(&self, upstream_pid: i32, upstream_key: i32) -> (i32, i32) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let mut b = [0u8; 8];
            if getrandom::fill(&mut b).is_err() {
                // Fall back to a time-derived value; uniqueness is still checked below.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                b = (t as u64).to_le_bytes();
            }
            let pid = (i32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x3fff_ffff).max(1);
            let key = i32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            if let std::collections::hash_map::Entry::Vacant(e) = m.entry((pid, key)) {
                e.insert(CancelEntry { upstream: (upstream_pid, upstream_key), cancelled: false });
                return (pid, key);
            }
        }
    }

    /// The upstream (pid, key) to forward a CancelRequest to; marks the entry as cancelled.
    pub fn lookup(&self, pid: i32, key: i32) -> Option<(i32, i32)> {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.get_mut(&(pid, key)).map(|e| {
            e.cancelled = true;
            e.upstream
        })
    }

    /// Forget a session's key; true if a CancelRequest was forwarded under it.
    pub fn remove(&self, pid: i32, key: i32) -> bool {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&(pid, key)).is_some_and(|e| e.cancelled)
    }
}
