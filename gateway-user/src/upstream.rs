//! The real Postgres: connect (TCP or unix socket, optional TLS; one host or several, see
//! `upstream_hosts`), log in with pgward's own service credential (trust, cleartext, md5,
//! SCRAM-SHA-256), collect the session parameters, and forward CancelRequests. The client never
//! sees the credential, and over TCP neither does a server that is not the real one
//! ([`AuthProgress`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use tokio::io::AsyncWriteExt;

use crate::config::{Config, TargetSessionAttrs, UpstreamTls};
pub use crate::upstream_hosts::Endpoint;
use crate::upstream_hosts::{self, HostMemory};
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
    /// The server's authentication could be an impostor's (see [`AuthProgress`]).
    #[error("the database server's authentication is not trusted: {0}")]
    Untrusted(&'static str),
    /// No host of the upstream is a server the session may use.
    #[error("no database server of the upstream is {wanted} (target_session_attrs); tried {tried}")]
    NoServer { wanted: &'static str, tried: String },
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

/// Where to reach the upstream, for connects and cancels: its hosts (one, or several tried in
/// order — see `upstream_hosts`), TLS mode, per-host connect timeout, and which server each
/// session may use. Clones share what the host walks learn.
#[derive(Clone)]
pub struct Target {
    pub endpoints: Arc<[Endpoint]>,
    pub tls: UpstreamTls,
    pub connect_timeout: Duration,
    /// `upstream.target_session_attrs`.
    pub attrs: TargetSessionAttrs,
    /// `upstream.standby_roles` and the attributes their sessions use.
    standby_roles: Arc<[String]>,
    standby_attrs: TargetSessionAttrs,
    pub(crate) memory: Arc<HostMemory>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("hosts", &self.describe()).field("attrs", &self.attrs.name()).finish()
    }
}

impl Target {
    /// Hosts tried in order, any server accepted, no standby routing.
    pub fn new(endpoints: Vec<Endpoint>, tls: UpstreamTls, connect_timeout: Duration) -> Target {
        Target {
            endpoints: endpoints.into(),
            tls,
            connect_timeout,
            attrs: TargetSessionAttrs::Any,
            standby_roles: Arc::new([]),
            standby_attrs: TargetSessionAttrs::PreferStandby,
            memory: Arc::default(),
        }
    }

    pub fn from_config(cfg: &Config) -> Target {
        let u = &cfg.upstream;
        // `Config::load` validated the list; a config built otherwise falls back to the first port.
        let pairs = u.endpoints().unwrap_or_else(|_| vec![(u.host.clone(), u.port.first())]);
        let endpoints = pairs.into_iter().map(|(host, port)| Endpoint { host, port }).collect();
        Target {
            attrs: u.target_session_attrs,
            standby_roles: u.standby_roles.clone().into(),
            standby_attrs: u.standby_session_attrs,
            ..Target::new(endpoints, u.tls, u.connect_timeout)
        }
    }

    /// The hosts, comma-separated, as `upstream.host` lists them (with their ports).
    pub fn describe(&self) -> String {
        self.endpoints.iter().map(Endpoint::describe).collect::<Vec<_>>().join(",")
    }

    /// The `target_session_attrs` for a session that runs as database role `role`.
    pub fn attrs_for(&self, role: Option<&str>) -> TargetSessionAttrs {
        match role {
            Some(r) if self.standby_roles.iter().any(|s| s == r) => self.standby_attrs,
            _ => self.attrs,
        }
    }
}

/// Connect and log in as the service role to `database`, on a host of `target` that fits its
/// `target_session_attrs`. `params` are extra startup parameters (application_name,
/// client_encoding, ...).
pub async fn connect(
    target: &Target,
    user: &str,
    password: Option<&str>,
    database: &str,
    params: &[(&str, &str)],
) -> Result<Upstream, UpstreamError> {
    upstream_hosts::connect(target, target.attrs, user, password, database, params).await
}

/// Connect to one host and log in as the service role to `database`.
pub(crate) async fn login(
    endpoint: &Endpoint,
    tls: UpstreamTls,
    connect_timeout: Duration,
    user: &str,
    password: Option<&str>,
    database: &str,
    params: &[(&str, &str)],
) -> Result<Upstream, UpstreamError> {
    let mut stream = endpoint.open(tls, connect_timeout).await?;
    let mut startup: Vec<(&str, &str)> = vec![("user", user), ("database", database)];
    startup.extend_from_slice(params);
    let mut out = BytesMut::new();
    wire::startup_packet(&mut out, &startup);
    stream.write_all(&out).await.map_err(WireError::Io)?;

    let mut buf = BytesMut::with_capacity(8192);
    let mut auth = AuthProgress { over_tcp: !endpoint.is_unix(), has_password: password.is_some(), ..AuthProgress::default() };
    let mut up_params = Vec::new();
    let mut pid = 0;
    let mut key = 0;
    loop {
        let f = wire::read_frame(&mut stream, &mut buf, wire::MAX_STARTUP_FRAME).await?;
        match f.tag {
            b'R' => {
                let mut r = Reader::new(f.body());
                let code = r.i32()?;
                if let Some(out) = auth_reply(code, &mut r, user, password, &mut auth)? {
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
                if !auth.ok {
                    return Err(UpstreamError::Untrusted("the server said it was ready before it let pgward in"));
                }
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

/// Where the service login stands, to tell the real server from an impostor listening on its
/// TCP port (while Postgres is stopped any local user may bind it; the connect guard keeps
/// others from dialling the real one, not from taking its place). Over TCP the upstream TLS
/// does not verify the server's certificate, so:
/// - the password is never sent in cleartext (an impostor asking for it would have it);
/// - a SCRAM exchange must end with the server's signature, which only a server holding the
///   role's verifier can compute, before AuthenticationOk is believed;
/// - with a password configured, a server that lets pgward in without asking for it is not
///   believed either (the real one asks: the password is configured because it does).
///
/// Over the unix socket (a directory only Postgres's user, pgward's and root may enter when
/// interception checks it) the server's word is taken.
#[derive(Default)]
struct AuthProgress {
    over_tcp: bool,
    has_password: bool,
    /// A SCRAM exchange under way (until the server's signature is verified).
    scram: Option<ScramSha256>,
    /// The server asked for the password, and for SCRAM proved it knows the verifier.
    challenged: bool,
    /// AuthenticationOk was received and believed.
    ok: bool,
}

impl AuthProgress {
    /// Whether AuthenticationOk may be believed now (see [`AuthProgress`]).
    fn accept_ok(&self) -> Result<(), UpstreamError> {
        if self.scram.is_some() {
            return Err(UpstreamError::Untrusted("the server ended the SCRAM exchange without proving it knows the password"));
        }
        if self.over_tcp && self.has_password && !self.challenged {
            return Err(UpstreamError::Untrusted(
                "the server let pgward in without asking for the password (if the server trusts pgward's connection, \
                 remove upstream.password_file)",
            ));
        }
        Ok(())
    }
}

/// The answer to the server's authentication request `code` (its body after the code in `r`):
/// the message to send, or None when there is nothing to send (ok, SCRAM's final check).
/// `auth` carries the exchange across requests.
fn auth_reply(
    code: i32,
    r: &mut Reader<'_>,
    user: &str,
    password: Option<&str>,
    auth: &mut AuthProgress,
) -> Result<Option<BytesMut>, UpstreamError> {
    let mut out = BytesMut::new();
    match code {
        AUTH_OK => {
            auth.accept_ok()?;
            auth.ok = true;
            return Ok(None);
        }
        AUTH_CLEARTEXT_PASSWORD if auth.over_tcp => {
            return Err(UpstreamError::Untrusted(
                "the server asked for the password in cleartext over TCP, which pgward never sends there \
                 (use scram-sha-256 in pg_hba.conf, or the unix socket)",
            ));
        }
        AUTH_CLEARTEXT_PASSWORD => {
            let pw = password.ok_or(UpstreamError::NoPassword)?;
            auth.challenged = true;
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
            auth.challenged = true;
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
            auth.scram = Some(s);
        }
        AUTH_SASL_CONTINUE => {
            let s = auth.scram.as_mut().ok_or_else(|| UpstreamError::Scram("unexpected SASLContinue".into()))?;
            s.update(r.rest()).map_err(|e| UpstreamError::Scram(e.to_string()))?;
            wire::message(&mut out, b'p', s.message());
        }
        AUTH_SASL_FINAL => {
            let mut s = auth.scram.take().ok_or_else(|| UpstreamError::Scram("unexpected SASLFinal".into()))?;
            s.finish(r.rest()).map_err(|e| UpstreamError::Scram(e.to_string()))?;
            auth.challenged = true;
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
        self.simple_query(sql, |_| Ok(())).await
    }
}

/// A text-format result: rows of nullable column values.
pub type Rows = Vec<Vec<Option<String>>>;

impl Upstream {
    /// Run one simple-protocol statement of pgward's own; its rows, or the server's error.
    pub async fn query_rows(&mut self, sql: &str) -> Result<Rows, UpstreamError> {
        let mut rows = Vec::new();
        self.simple_query(sql, |body| {
            rows.push(data_row(body)?);
            Ok(())
        })
        .await?;
        Ok(rows)
    }

    /// Send `sql` as a simple Query and read up to its ReadyForQuery: each DataRow's body to
    /// `on_row`, ParameterStatus noted, the transaction status kept; the server's error if it
    /// sent one.
    async fn simple_query(
        &mut self,
        sql: &str,
        mut on_row: impl FnMut(&[u8]) -> Result<(), UpstreamError>,
    ) -> Result<(), UpstreamError> {
        let mut out = BytesMut::new();
        wire::query(&mut out, sql);
        self.stream.write_all(&out).await.map_err(WireError::Io)?;
        let mut failure = None;
        loop {
            let f = wire::read_frame(&mut self.stream, &mut self.leftover, wire::MAX_FRAME).await?;
            match f.tag {
                b'D' => on_row(f.body())?,
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

/// `SET seed TO <random>`: the seed of `random()` is backend state that `DISCARD ALL` keeps
/// (`setseed()`, or `SET seed`, which `RESET ALL` skips), so a session that seeded it would
/// know every `random()` value of the next session on the backend. The new seed comes from
/// the OS's random source (an error if it fails: the connection is then not reused); 53
/// random bits, spread over the seed's range [-1, 1]. (`SHOW seed` answers "unavailable".)
pub(crate) fn reseed_sql() -> Result<String, UpstreamError> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).map_err(|e| UpstreamError::Reset(format!("no random seed: {e}")))?;
    let bits = u64::from_le_bytes(b) >> 11;
    let seed = bits as f64 / (1u64 << 53) as f64 * 2.0 - 1.0;
    Ok(format!("SET seed TO {seed}"))
}

/// A DataRow's text-format values.
fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, WireError> {
    let mut r = Reader::new(body);
    let n = r.i16()?;
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = r.i32()?;
        row.push(if len < 0 { None } else { Some(String::from_utf8_lossy(r.bytes(len as usize)?).into_owned()) });
    }
    Ok(row)
}

impl Upstream {
    /// Put the connection back to what a fresh login gives, for session pooling: `RESET ROLE`,
    /// then `DISCARD ALL` (temp tables, prepared statements, cursors, session settings back to
    /// the startup values, advisory locks, LISTEN, cached plans, sequences), then a fresh
    /// random seed ([`reseed_sql`]). Separate Queries: `DISCARD ALL` refuses to run in a
    /// transaction block, and a multi-statement Query is one. Each must answer exactly
    /// CommandComplete + ReadyForQuery 'I' (ParameterStatus, notices and stray notifications
    /// of the previous session are read and dropped); anything else is an error and the
    /// connection must not be reused.
    pub async fn reset(&mut self) -> Result<(), UpstreamError> {
        self.expect_command("RESET ROLE", "RESET").await?;
        self.expect_command("DISCARD ALL", "DISCARD ALL").await?;
        self.expect_command(&reseed_sql()?, "SET").await
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

/// Send a CancelRequest for (pid, key) to the upstream host that runs the backend.
pub async fn cancel(target: &Target, pid: i32, key: i32) -> Result<(), UpstreamError> {
    upstream_hosts::cancel(target, pid, key).await
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

#[cfg(test)]
mod tests {
    #[test]
    fn data_rows_decode_nulls_and_text() {
        let mut body = Vec::new();
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert_eq!(super::data_row(&body).unwrap(), vec![None, Some("abc".to_string())]);
        assert!(super::data_row(&body[..7]).is_err(), "truncated");
    }
}
