//! Upstream session pooling: the service-role connection of a session that ended cleanly is
//! reset and kept for the next login that would have opened the same connection, so churn does
//! not pay a connect + SCRAM exchange per client.
//!
//! Safety rules (README, "Upstream pooling"):
//! - **Key.** A connection is only handed to a login with the same [`PoolKey`]: database,
//!   service user, upstream host/port/TLS mode, and every startup parameter pgward passed on
//!   (client_encoding, DateStyle, TimeZone, …, policy-allowed settings such as search_path) —
//!   those are the values `DISCARD ALL` resets the session to.
//! - **Check-in** only after a clean end, decided by the relay: the client left with Terminate
//!   (or EOF at a message boundary), the last ReadyForQuery said 'I', no response was pending,
//!   no extended-protocol message was waiting for its Sync (so no COPY and no implicit
//!   transaction either), and no CancelRequest was forwarded for the session. Anything else
//!   closes the connection (Postgres rolls back what was open).
//! - **Reset** at check-in, in a spawned task (off the next client's path): `RESET ROLE`, then
//!   `DISCARD ALL`, then a fresh `random()` seed (which `DISCARD ALL` keeps), as separate
//!   Queries, each verified to answer CommandComplete + ReadyForQuery 'I'
//!   ([`Upstream::reset`]); on any error or timeout the connection is closed.
//! - **Checkout**: expired connections are closed, a connection that has anything to read
//!   (the server spoke while idle: terminated, timed out, EOF) is closed, then one Query
//!   `SET application_name TO …; SET ROLE …` names the new user and sets their role. A
//!   pooled connection whose setup fails for any reason but a server error is closed and the
//!   next one (or a new connection) is tried.
//! - **Which server.** With several upstream hosts (`upstream_hosts`) a pooled connection must
//!   still be on a server the new session may use: after a failover the pool must never hand
//!   out a connection to a server that is now a standby or read-only. Checked at checkout, at
//!   no cost: the checkout Query's answer carries the server's current `in_hot_standby` and
//!   `default_transaction_read_only` (Postgres reports them again whenever they change, before
//!   the ReadyForQuery — see `upstream_state`), and a connection whose server does not fit the
//!   session's `target_session_attrs` is closed (`wrong_server`) and the host memory of the
//!   walk forgotten. A check on a timer instead would leave a window between a promotion and
//!   the next tick, and would cost queries on idle connections; the checkout check has no
//!   window and no cost. A demoted primary restarts (its connections end, and `is_quiet`
//!   finds them dead). Idle connections remember whether their server was a standby when
//!   pooled: sessions that need a primary skip those, and `prefer-standby` sessions take only
//!   those unless the last walk found no standby.
//! - Pooled connections log in with `application_name = 'pgward:'` (no user): that is what
//!   `DISCARD ALL` / `RESET ALL` returns it to, so a session never shows the previous user's
//!   name, and an idle pooled backend is recognisable in `pg_stat_activity`.
//!
//! Event loops (`server`): pgward runs one current-thread runtime per OS thread, and a socket
//! is driven by the reactor of the loop that registered it. A pooled plain TCP or unix socket
//! is taken out of its loop when it is pooled (after the reset, in the check-in task: tokio's
//! `into_std`, which deregisters it) and registered with the checking-out session's loop at
//! checkout, so a session's upstream I/O never needs another thread to wake it. A TLS stream
//! cannot move that way (its TLS state lives in the tokio stream): it stays registered with its
//! loop and is only handed out on that loop (the OS thread is the loop's identity;
//! `pool_max_idle` counts such connections per loop).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::config::{Config, TargetSessionAttrs, UpstreamTls};
use crate::metrics::METRICS;
use crate::upstream::{Target, Upstream, UpstreamError};
use crate::upstream_hosts;
use crate::upstream_state::ServerState;
use crate::wire::{self, BoxStream, StdStream, WireError};

/// `application_name` in the startup packet of connections that may be pooled.
pub const POOLED_APPLICATION_NAME: &str = "pgward:";

/// Why an upstream connection was closed instead of being pooled or reused.
#[derive(Debug, thiserror::Error)]
pub enum Discard {
    #[error("the session did not end cleanly (transaction open, responses pending, unsynced extended protocol, error, or no Terminate at a message boundary)")]
    Unclean,
    #[error("a CancelRequest was forwarded during the session")]
    Cancelled,
    #[error("reset failed: {0}")]
    Reset(UpstreamError),
    #[error("reset timed out")]
    ResetTimeout,
    #[error("taking the connection out of its event loop failed: {0}")]
    Detach(std::io::Error),
    #[error("the pool is full (upstream.pool_max_idle / pool_max_idle_total)")]
    Full,
    #[error("idle longer than upstream.pool_idle_timeout")]
    Expired,
    #[error("the server spoke or closed the connection while it was idle in the pool")]
    Dead,
    #[error("setting up the pooled connection for the new session failed: {0}")]
    Setup(UpstreamError),
    #[error("setting up the pooled connection for the new session timed out")]
    SetupTimeout,
    #[error("the server is not one the session may use (target_session_attrs {0})")]
    WrongServer(&'static str),
    #[error("pgward is shutting down")]
    Shutdown,
}

impl Discard {
    /// The metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            Discard::Unclean => "unclean",
            Discard::Cancelled => "cancelled",
            Discard::Reset(_) | Discard::ResetTimeout | Discard::Detach(_) => "reset_failed",
            Discard::Full => "full",
            Discard::Expired => "expired",
            Discard::Dead => "dead",
            Discard::Setup(_) | Discard::SetupTimeout => "setup_failed",
            Discard::WrongServer(_) => "wrong_server",
            Discard::Shutdown => "shutdown",
        }
    }
}

/// Everything that shapes an upstream backend at login. Two logins share connections only
/// when their keys are equal. Which host of a multi-host upstream a connection is on is not
/// part of it: checkout checks the server itself (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
    hosts: String,
    tls: UpstreamTls,
    /// Startup parameters passed on (name lower-cased, as Postgres compares them; sorted by
    /// name, keeping the client's order among repeats, since the last one wins).
    pub params: Vec<(String, String)>,
}

impl PoolKey {
    pub fn new(target: &Target, user: &str, database: &str, params: &[(String, String)]) -> PoolKey {
        let mut params: Vec<(String, String)> =
            params.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        PoolKey {
            database: database.to_string(),
            user: user.to_string(),
            hosts: target.describe(),
            tls: target.tls,
            params,
        }
    }
}

/// An upstream connection for a login, and whether it came from the pool.
pub struct Acquired {
    pub up: Upstream,
    pub reused: bool,
}

/// An idle connection's socket.
enum Parked {
    /// A plain TCP or unix socket out of any event loop (deregistered, non-blocking): the loop
    /// that checks it out registers it with its own reactor.
    Free(StdStream),
    /// A stream that cannot leave the loop that registered it (TLS): handed out only there.
    Local(BoxStream),
}

/// An idle pooled connection: an [`Upstream`] with its socket parked.
struct Idle {
    sock: Parked,
    /// The loop (its OS thread) a [`Parked::Local`] socket belongs to; None for a free one.
    home: Option<ThreadId>,
    since: Instant,
    /// Its server was a standby when it was pooled (None: the server does not report it).
    standby: Option<bool>,
    conn: Conn,
}

/// An [`Upstream`] but its stream.
struct Conn {
    leftover: BytesMut,
    params: Vec<(String, String)>,
    backend_pid: i32,
    backend_key: i32,
    tx_status: u8,
}

impl Conn {
    fn with_stream(self, stream: BoxStream) -> Upstream {
        let Conn { leftover, params, backend_pid, backend_key, tx_status } = self;
        Upstream { stream, leftover, params, backend_pid, backend_key, tx_status }
    }
}

impl Idle {
    /// Park a reset connection: a plain socket leaves the current event loop (it must be the
    /// one that registered it), anything else stays with it. An error: the socket is closed.
    fn park(up: Upstream) -> std::io::Result<Idle> {
        let standby = ServerState::from_params(&up.params).map(|s| s.in_recovery);
        let Upstream { stream, leftover, params, backend_pid, backend_key, tx_status } = up;
        let (sock, home) = match stream.into_std() {
            Ok(Ok(s)) => (Parked::Free(s), None),
            Ok(Err(e)) => return Err(e),
            Err(stream) => (Parked::Local(stream), Some(std::thread::current().id())),
        };
        let conn = Conn { leftover, params, backend_pid, backend_key, tx_status };
        Ok(Idle { sock, home, since: Instant::now(), standby, conn })
    }

    /// Whether a session with `attrs` should look at this connection (the last word is the
    /// check after the checkout Query): connections last seen on a standby are skipped by
    /// sessions that need a primary; `standby` sessions, and `prefer-standby` ones while a
    /// standby is reachable (`no_standby` false), take only connections last seen on one.
    fn may_suit(&self, attrs: TargetSessionAttrs, no_standby: bool) -> bool {
        match attrs {
            TargetSessionAttrs::ReadWrite | TargetSessionAttrs::Primary => self.standby != Some(true),
            TargetSessionAttrs::Standby => self.standby != Some(false),
            TargetSessionAttrs::PreferStandby => no_standby || self.standby != Some(false),
            TargetSessionAttrs::Any | TargetSessionAttrs::ReadOnly => true,
        }
    }

    /// Whether the event loop running on thread `here` may check this connection out.
    fn usable_on(&self, here: ThreadId) -> bool {
        self.home.is_none_or(|h| h == here)
    }
}

#[derive(Default)]
struct Inner {
    /// Per key, oldest first (checkout takes the newest it may use).
    idle: HashMap<PoolKey, Vec<Idle>>,
    total: usize,
}

pub struct Pool {
    enabled: bool,
    max_idle: usize,
    max_total: usize,
    idle_timeout: Duration,
    /// Bound on a reset or a checkout setup (a pooled server that does not answer is closed).
    op_timeout: Duration,
    inner: Mutex<Inner>,
}

impl Pool {
    pub fn from_config(cfg: &Config) -> Pool {
        let u = &cfg.upstream;
        Pool::new(u.pool, u.pool_max_idle, u.pool_max_idle_total, u.pool_idle_timeout, u.connect_timeout)
    }

    pub fn new(enabled: bool, max_idle: usize, max_total: usize, idle_timeout: Duration, op_timeout: Duration) -> Pool {
        Pool {
            enabled: enabled && max_idle > 0 && max_total > 0,
            max_idle,
            max_total,
            idle_timeout,
            op_timeout,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        crate::lock(&self.inner)
    }

    /// Idle connections in the pool.
    pub fn idle(&self) -> usize {
        self.lock().total
    }

    /// An upstream connection for a login to `key`, named after the user (`app_name`) and
    /// with the user's database role set (`role`, by `SET ROLE`): a pooled one if one is alive and
    /// on a server the session may use, else a new login as the service role. The session's
    /// `target_session_attrs` follow its role ([`Target::attrs_for`]). With pooling off,
    /// exactly the old path: a new connection with `app_name` in its startup packet, then
    /// `SET ROLE`.
    pub async fn acquire(
        &self,
        target: &Target,
        key: &PoolKey,
        password: Option<&str>,
        app_name: &str,
        role: Option<&str>,
    ) -> Result<Acquired, UpstreamError> {
        if let Some(r) = role {
            settable_role(r)?;
        }
        let attrs = target.attrs_for(role);
        if !self.enabled {
            let mut up = connect(target, attrs, key, password, app_name).await?;
            if let Some(r) = role {
                up.setup_query(&set_role_sql(r)).await?;
            }
            return Ok(Acquired { up, reused: false });
        }

        let setup = setup_sql(app_name, role);
        while let Some(idle) = self.take(key, attrs, target.memory.no_standby()) {
            let Some(mut up) = self.adopt(idle) else { continue };
            match tokio::time::timeout(self.op_timeout, up.setup_query(&setup)).await {
                Ok(Ok(())) if up.tx_status == b'I' => match self.fits(&mut up, attrs).await {
                    Ok(true) => {
                        METRICS.pool_hits.inc();
                        tracing::debug!(backend = up.backend_pid, "reusing a pooled upstream connection");
                        return Ok(Acquired { up, reused: true });
                    }
                    Ok(false) => {
                        target.memory.forget(attrs);
                        self.discard(up, Discard::WrongServer(attrs.name()));
                    }
                    Err(e) => self.discard(up, Discard::Setup(e)),
                },
                Ok(Ok(())) => {
                    let why = UpstreamError::Reset(format!("transaction status {:?} after setup", up.tx_status as char));
                    self.discard(up, Discard::Setup(why));
                }
                // The server answered (it is alive) and refused, e.g. the role is gone: a new
                // connection would get the same answer.
                Ok(Err(e @ UpstreamError::Server { .. })) => {
                    self.discard(up, Discard::Setup(UpstreamError::Reset(e.to_string())));
                    return Err(e);
                }
                Ok(Err(e)) => self.discard(up, Discard::Setup(e)),
                Err(_) => self.discard(up, Discard::SetupTimeout),
            }
        }
        METRICS.pool_misses.inc();
        let mut up = connect(target, attrs, key, password, POOLED_APPLICATION_NAME).await?;
        up.setup_query(&setup).await?;
        Ok(Acquired { up, reused: false })
    }

    /// Whether a checked-out connection's server (as its answer to the checkout Query just
    /// reported it) is one a session with `attrs` may use. A server that does not report its
    /// state is asked (bounded by the checkout timeout).
    async fn fits(&self, up: &mut Upstream, attrs: TargetSessionAttrs) -> Result<bool, UpstreamError> {
        if attrs == TargetSessionAttrs::Any {
            return Ok(true);
        }
        match tokio::time::timeout(self.op_timeout, ServerState::of(up)).await {
            Ok(state) => Ok(attrs.accepts(state?)),
            Err(_) => Err(UpstreamError::Reset("asking the server for its state timed out".into())),
        }
    }

    /// The newest idle connection for `key` that the current event loop may use (a free one,
    /// or a loop-local one of this loop) and that may suit `attrs` (a standby's first for
    /// `prefer-standby`; `no_standby`: see [`Idle::may_suit`]), closing the expired ones on
    /// the way.
    fn take(&self, key: &PoolKey, attrs: TargetSessionAttrs, no_standby: bool) -> Option<Idle> {
        let now = Instant::now();
        let here = std::thread::current().id();
        let (got, expired) = {
            let mut inner = self.lock();
            let list = inner.idle.get_mut(key)?;
            let n = list.iter().take_while(|i| now.duration_since(i.since) >= self.idle_timeout).count();
            let expired: Vec<Idle> = list.drain(..n).collect();
            let usable = |i: &Idle| i.usable_on(here) && i.may_suit(attrs, no_standby);
            let standby_first = match attrs {
                TargetSessionAttrs::PreferStandby => list.iter().rposition(|i| usable(i) && i.standby == Some(true)),
                _ => None,
            };
            let got = standby_first.or_else(|| list.iter().rposition(usable)).map(|at| list.remove(at));
            if list.is_empty() {
                inner.idle.remove(key);
            }
            inner.total -= expired.len() + usize::from(got.is_some());
            METRICS.pool_idle.set(inner.total as i64);
            (got, expired)
        };
        for i in expired {
            self.discard_idle(i, Discard::Expired);
        }
        got
    }

    /// Make a pooled connection the current event loop's, if it is still quiet (the server
    /// said nothing while it was idle): a free socket is peeked without blocking, then
    /// registered with this loop's reactor; a loop-local one (already this loop's) is polled
    /// once. A connection that is not quiet is closed (None).
    fn adopt(&self, idle: Idle) -> Option<Upstream> {
        let Idle { sock, conn, .. } = idle;
        match sock {
            Parked::Free(s) => {
                if !conn.leftover.is_empty() || !s.is_quiet() {
                    self.close_free(conn.backend_pid, s, Discard::Dead);
                    return None;
                }
                match s.into_tokio() {
                    Ok(stream) => Some(conn.with_stream(stream)),
                    Err(e) => {
                        // The socket was closed with the error.
                        self.not_pooled(conn.backend_pid, &Discard::Setup(UpstreamError::Wire(WireError::Io(e))));
                        None
                    }
                }
            }
            Parked::Local(stream) => {
                let mut up = conn.with_stream(stream);
                if up.is_quiet() {
                    Some(up)
                } else {
                    self.discard(up, Discard::Dead);
                    None
                }
            }
        }
    }

    /// A session ended: `up` is its upstream connection if the relay found the end clean
    /// (None: the relay closed it), `cancelled` whether a CancelRequest was forwarded for it.
    /// A clean connection is reset in a spawned task and then pooled.
    pub fn session_ended(self: &Arc<Self>, key: PoolKey, up: Option<Upstream>, cancelled: bool) {
        if !self.enabled {
            return;
        }
        match up {
            None => METRICS.pool_discard(Discard::Unclean.reason()),
            Some(up) if cancelled => self.discard(up, Discard::Cancelled),
            Some(up) => self.checkin(key, up),
        }
    }

    /// Reset `up` (spawned) and pool it if the reset succeeds.
    pub fn checkin(self: &Arc<Self>, key: PoolKey, mut up: Upstream) {
        let pool = self.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(pool.op_timeout, up.reset()).await {
                Ok(Ok(())) => pool.put(key, up),
                Ok(Err(e)) => pool.discard(up, Discard::Reset(e)),
                Err(_) => pool.discard(up, Discard::ResetTimeout),
            }
        });
    }

    /// Add a reset connection to the idle list (or close it when the pool is full). Called on
    /// the event loop `up` is registered with (the check-in task): a plain socket leaves it
    /// here, a TLS stream stays with it (see [`Idle::park`]).
    fn put(&self, key: PoolKey, up: Upstream) {
        let pid = up.backend_pid;
        let idle = match Idle::park(up) {
            Ok(idle) => idle,
            Err(e) => return self.not_pooled(pid, &Discard::Detach(e)),
        };
        let refused = {
            let mut inner = self.lock();
            // Per key (and, for loop-local connections, per loop).
            let n = inner.idle.get(&key).map_or(0, |l| l.iter().filter(|i| i.home == idle.home).count());
            if inner.total >= self.max_total || n >= self.max_idle {
                Some(idle)
            } else {
                tracing::debug!(backend = pid, loop_local = idle.home.is_some(), "upstream connection pooled");
                inner.idle.entry(key).or_default().push(idle);
                inner.total += 1;
                METRICS.pool_idle.set(inner.total as i64);
                None
            }
        };
        if let Some(idle) = refused {
            self.discard_idle(idle, Discard::Full);
        }
    }

    /// Count and log a connection that is not (or no longer) pooled.
    fn not_pooled(&self, backend_pid: i32, why: &Discard) {
        tracing::debug!(backend = backend_pid, reason = %why, "upstream connection not pooled");
        METRICS.pool_discard(why.reason());
    }

    /// Close a connection that is not (or no longer) pooled: counted, logged, Terminate sent
    /// in a spawned task.
    fn discard(&self, up: Upstream, why: Discard) {
        self.not_pooled(up.backend_pid, &why);
        tokio::spawn(up.close());
    }

    /// Close a free socket at once (no event loop needed): Terminate if the socket takes it
    /// without blocking, then shutdown. Counted and logged.
    fn close_free(&self, backend_pid: i32, s: StdStream, why: Discard) {
        self.not_pooled(backend_pid, &why);
        s.close_with(&terminate());
    }

    /// Close an idle connection: a free one at once, a loop-local one as [`Self::discard`] does.
    fn discard_idle(&self, idle: Idle, why: Discard) {
        match idle.sock {
            Parked::Free(s) => self.close_free(idle.conn.backend_pid, s, why),
            Parked::Local(stream) => self.discard(idle.conn.with_stream(stream), why),
        }
    }

    /// Close every idle connection older than `pool_idle_timeout`.
    pub fn reap(&self) {
        let now = Instant::now();
        let expired: Vec<Idle> = {
            let mut inner = self.lock();
            let mut out = Vec::new();
            inner.idle.retain(|_, list| {
                let n = list.iter().take_while(|i| now.duration_since(i.since) >= self.idle_timeout).count();
                out.extend(list.drain(..n));
                !list.is_empty()
            });
            inner.total -= out.len();
            METRICS.pool_idle.set(inner.total as i64);
            out
        };
        for i in expired {
            self.discard_idle(i, Discard::Expired);
        }
    }

    /// Reap expired connections periodically (runs until aborted).
    pub async fn reaper(self: Arc<Self>) {
        let every = (self.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(10));
        loop {
            tokio::time::sleep(every).await;
            self.reap();
        }
    }

    /// Close every idle connection (shutdown), waiting at most a couple of seconds.
    pub async fn close_all(&self) {
        let all: Vec<Idle> = {
            let mut inner = self.lock();
            inner.total = 0;
            METRICS.pool_idle.set(0);
            inner.idle.drain().flat_map(|(_, l)| l).collect()
        };
        let mut set = tokio::task::JoinSet::new();
        for i in all {
            METRICS.pool_discard(Discard::Shutdown.reason());
            match i.sock {
                Parked::Free(s) => s.close_with(&terminate()),
                Parked::Local(stream) => {
                    set.spawn(i.conn.with_stream(stream).close());
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), async { while set.join_next().await.is_some() {} }).await;
    }
}

/// A Terminate message.
fn terminate() -> BytesMut {
    let mut t = BytesMut::new();
    wire::message(&mut t, b'X', &[]);
    t
}

/// A new login as the service role on a host that fits `attrs`, with `application_name` and
/// the key's startup parameters.
async fn connect(
    target: &Target,
    attrs: TargetSessionAttrs,
    key: &PoolKey,
    password: Option<&str>,
    app: &str,
) -> Result<Upstream, UpstreamError> {
    let mut params: Vec<(&str, &str)> = vec![("application_name", app)];
    params.extend(key.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    upstream_hosts::connect(target, attrs, &key.user, password, &key.database, &params).await
}

/// The name Postgres's `SET ROLE` does not look up: it reads `SET ROLE "none"` (quoted or not)
/// as `SET ROLE NONE`, back to the session user — the service role — and no role can be named
/// so (`CREATE ROLE` refuses it).
const SET_ROLE_NONE: &str = "none";

/// Refuse a role that `SET ROLE` would not switch to: a policy group or grant naming `none`
/// would otherwise run its sessions as the service role. Refused as Postgres refuses
/// `SET ROLE` to a role that does not exist (22023), before any connection is used.
fn settable_role(role: &str) -> Result<(), UpstreamError> {
    if role == SET_ROLE_NONE {
        return Err(UpstreamError::Server {
            code: crate::sqlstate::INVALID_PARAMETER_VALUE.to_string(),
            message: format!(
                "role \"{role}\" does not exist (Postgres reads SET ROLE \"{role}\" as SET ROLE NONE, the service role)"
            ),
        });
    }
    Ok(())
}

/// `SET ROLE "<role>"`: the role as a quoted identifier (used exactly as written, `"`
/// doubled).
pub fn set_role_sql(role: &str) -> String {
    format!("SET ROLE \"{}\"", role.replace('"', "\"\""))
}

/// The checkout Query: the user's application_name (as Postgres would store it from a startup
/// packet: printable ASCII, anything else as '?', so the literal is plain ASCII in every
/// client_encoding) in an escape string literal, then the role.
fn setup_sql(app_name: &str, role: Option<&str>) -> String {
    let clean: String = app_name.chars().map(|c| if (' '..='~').contains(&c) { c } else { '?' }).collect();
    let lit = clean.replace('\\', "\\\\").replace('\'', "\\'");
    let mut sql = format!("SET application_name TO E'{lit}'");
    if let Some(r) = role {
        sql.push_str("; ");
        sql.push_str(&set_role_sql(r));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    const A: TargetSessionAttrs = TargetSessionAttrs::Any;

    fn target() -> Target {
        Target::new(
            vec![crate::upstream::Endpoint { host: "db".into(), port: 5432 }],
            UpstreamTls::Disable,
            Duration::from_secs(1),
        )
    }

    fn kv(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn keys_separate_databases_settings_and_targets() {
        let t = target();
        let a = PoolKey::new(&t, "svc", "app", &kv(&[("TimeZone", "UTC"), ("client_encoding", "UTF8")]));
        let same = PoolKey::new(&t, "svc", "app", &kv(&[("client_encoding", "UTF8"), ("timezone", "UTC")]));
        assert_eq!(a, same, "order and case of names do not matter");
        assert_ne!(a, PoolKey::new(&t, "svc", "other", &kv(&[("TimeZone", "UTC"), ("client_encoding", "UTF8")])));
        assert_ne!(a, PoolKey::new(&t, "svc", "app", &kv(&[("TimeZone", "Europe/Paris"), ("client_encoding", "UTF8")])));
        assert_ne!(a, PoolKey::new(&t, "svc", "app", &kv(&[("TimeZone", "UTC")])));
        assert_ne!(a, PoolKey::new(&t, "svc2", "app", &kv(&[("TimeZone", "UTC"), ("client_encoding", "UTF8")])));
        let mut t2 = target();
        t2.tls = UpstreamTls::Require;
        let other_hosts = Target::new(
            vec![crate::upstream::Endpoint { host: "db2".into(), port: 5432 }],
            UpstreamTls::Disable,
            Duration::from_secs(1),
        );
        assert_ne!(a, PoolKey::new(&other_hosts, "svc", "app", &kv(&[("TimeZone", "UTC"), ("client_encoding", "UTF8")])));
        assert_ne!(a, PoolKey::new(&t2, "svc", "app", &kv(&[("TimeZone", "UTC"), ("client_encoding", "UTF8")])));
        // Repeats keep their order (the last one wins in Postgres).
        assert_ne!(
            PoolKey::new(&t, "svc", "app", &kv(&[("a", "1"), ("a", "2")])),
            PoolKey::new(&t, "svc", "app", &kv(&[("a", "2"), ("a", "1")]))
        );
    }

    #[test]
    fn setup_sql_escapes_and_sets_role_in_one_query() {
        assert_eq!(setup_sql("pgward:bob", None), "SET application_name TO E'pgward:bob'");
        assert_eq!(
            setup_sql("pgward:o'neil:a\\b", Some("r")),
            "SET application_name TO E'pgward:o\\'neil:a\\\\b'; SET ROLE \"r\""
        );
        assert_eq!(setup_sql("pgward:zoë\n", None), "SET application_name TO E'pgward:zo??'");
    }

    #[tokio::test]
    async fn a_role_set_role_reads_as_none_is_refused_before_any_connection() {
        let key = PoolKey::new(&target(), "svc", "a", &[]);
        for enabled in [true, false] {
            let pool = Pool::new(enabled, 4, 4, Duration::from_secs(60), Duration::from_secs(1));
            let err = match pool.acquire(&target(), &key, None, "pgward:u", Some("none")).await {
                Err(e) => e,
                Ok(_) => panic!("pool {enabled}: acquired a connection for role none"),
            };
            assert_eq!(err.sqlstate(), "22023", "pool {enabled}: {err}");
        }
        assert!(settable_role("NONE").is_ok(), "a real role (SET ROLE looks it up)");
        assert!(settable_role("none ").is_ok());
    }

    #[test]
    fn set_role_quotes_the_role() {
        assert_eq!(set_role_sql("analyst"), "SET ROLE \"analyst\"");
        assert_eq!(set_role_sql("a\"b"), "SET ROLE \"a\"\"b\"");
    }

    /// A fake backend whose server reported `in_hot_standby`.
    fn fake_on(pid: i32, standby: bool) -> (Upstream, DuplexStream) {
        let (mut up, srv) = fake(pid);
        let hot = if standby { "on" } else { "off" };
        up.params.push(("in_hot_standby".into(), hot.into()));
        up.params.push(("default_transaction_read_only".into(), hot.into()));
        (up, srv)
    }

    #[tokio::test]
    async fn take_matches_the_server_kind_to_the_session() {
        use TargetSessionAttrs as T;
        let k = PoolKey::new(&target(), "svc", "a", &[]);
        let pool = Pool::new(true, 8, 8, Duration::from_secs(60), Duration::from_secs(1));
        let mut peers = Vec::new();
        for (pid, standby) in [(1, true), (2, false), (3, true), (4, false)] {
            let (up, s) = fake_on(pid, standby);
            peers.push(s);
            pool.put(k.clone(), up);
        }
        let (up, s) = fake(5);
        peers.push(s);
        pool.put(k.clone(), up);
        let pid = |i: Option<Idle>| i.map(|i| i.conn.backend_pid);
        assert_eq!(pid(pool.take(&k, T::PreferStandby, false)), Some(3), "the newest standby connection first");
        assert_eq!(pid(pool.take(&k, T::ReadWrite, false)), Some(5), "unknown kind: checked after checkout");
        assert_eq!(pid(pool.take(&k, T::ReadWrite, false)), Some(4), "never a standby's");
        assert_eq!(pid(pool.take(&k, T::Standby, false)), Some(1));
        assert_eq!(pid(pool.take(&k, T::Standby, false)), None, "never a primary's");
        assert_eq!(pid(pool.take(&k, T::PreferStandby, false)), None, "not a primary's while a standby is reachable");
        assert_eq!(pid(pool.take(&k, T::PreferStandby, true)), Some(2), "a primary's when the walk found no standby");
    }

    /// A fake backend: the pool side gets an Upstream over a duplex pipe; the test plays the
    /// server on the other end.
    fn fake(pid: i32) -> (Upstream, DuplexStream) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let up = Upstream {
            stream: Box::new(a),
            leftover: BytesMut::new(),
            params: vec![("application_name".into(), "pgward:".into())],
            backend_pid: pid,
            backend_key: 7,
            tx_status: b'I',
        };
        (up, b)
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u8(tag);
        b.put_i32(body.len() as i32 + 4);
        b.put_slice(body);
        b.to_vec()
    }
    fn complete(tag: &str) -> Vec<u8> {
        msg(b'C', format!("{tag}\0").as_bytes())
    }
    fn ready(s: u8) -> Vec<u8> {
        msg(b'Z', &[s])
    }

    /// Read one Query from the fake server side; its SQL.
    async fn read_query(s: &mut DuplexStream) -> String {
        let mut hdr = [0u8; 5];
        s.read_exact(&mut hdr).await.unwrap();
        assert_eq!(hdr[0], b'Q');
        let len = i32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).await.unwrap();
        String::from_utf8(body[..body.len() - 1].to_vec()).unwrap()
    }

    #[tokio::test]
    async fn reset_runs_three_queries_and_verifies_each() {
        let (mut up, mut srv) = fake(1);
        let server = tokio::spawn(async move {
            assert_eq!(read_query(&mut srv).await, "RESET ROLE");
            let mut out = msg(b'S', b"is_superuser\0off\0");
            out.extend(complete("RESET"));
            out.extend(ready(b'I'));
            srv.write_all(&out).await.unwrap();
            assert_eq!(read_query(&mut srv).await, "DISCARD ALL");
            let mut out = msg(b'A', b"\0\0\0\x01chan\0payload\0");
            out.extend(msg(b'S', b"application_name\0pgward:\0"));
            out.extend(complete("DISCARD ALL"));
            out.extend(ready(b'I'));
            srv.write_all(&out).await.unwrap();
            let seed = read_query(&mut srv).await;
            let v: f64 = seed.strip_prefix("SET seed TO ").unwrap().parse().unwrap();
            assert!((-1.0..=1.0).contains(&v), "{seed}");
            srv.write_all(&[complete("SET"), ready(b'I')].concat()).await.unwrap();
            (srv, seed)
        });
        up.reset().await.unwrap();
        assert!(up.params.contains(&("is_superuser".into(), "off".into())));
        let (_srv, seed) = server.await.unwrap();
        assert!(up.is_quiet(), "nothing left to read");
        assert_ne!(crate::upstream::reseed_sql().unwrap(), seed, "a new seed each time");
    }

    #[tokio::test]
    async fn reset_fails_on_error_or_transaction_or_wrong_tag() {
        // DISCARD ALL refused (e.g. in a transaction block): error, and ReadyForQuery 'E'.
        for (answer, what) in [
            ([msg(b'E', b"SERROR\0C25001\0MDISCARD ALL cannot run inside a transaction block\0\0"), ready(b'E')].concat(), "error"),
            ([complete("DISCARD ALL"), ready(b'T')].concat(), "transaction"),
            ([complete("SELECT 1"), ready(b'I')].concat(), "tag"),
            (ready(b'I'), "no completion"),
        ] {
            let (mut up, mut srv) = fake(2);
            let server = tokio::spawn(async move {
                assert_eq!(read_query(&mut srv).await, "RESET ROLE");
                srv.write_all(&[complete("RESET"), ready(b'I')].concat()).await.unwrap();
                assert_eq!(read_query(&mut srv).await, "DISCARD ALL");
                srv.write_all(&answer).await.unwrap();
                srv
            });
            assert!(up.reset().await.is_err(), "{what}: reset must fail");
            let _ = server.await.unwrap();
        }
        // The new seed refused: the reset failed too (the old seed may still be in place).
        let (mut up, mut srv) = fake(2);
        let server = tokio::spawn(async move {
            for (sql, tag) in [("RESET ROLE", "RESET"), ("DISCARD ALL", "DISCARD ALL")] {
                assert_eq!(read_query(&mut srv).await, sql);
                srv.write_all(&[complete(tag), ready(b'I')].concat()).await.unwrap();
            }
            assert!(read_query(&mut srv).await.starts_with("SET seed TO "));
            srv.write_all(&[msg(b'E', b"SERROR\0C57014\0Mcanceling statement\0\0"), ready(b'I')].concat()).await.unwrap();
            srv
        });
        assert!(up.reset().await.is_err(), "seed: reset must fail");
        let _ = server.await.unwrap();
        // A connection not idle at check-in is never reset.
        let (mut up, _srv) = fake(3);
        up.tx_status = b'T';
        assert!(matches!(up.reset().await, Err(UpstreamError::Reset(_))));
    }

    #[tokio::test]
    async fn quiet_means_nothing_to_read() {
        let (mut up, mut srv) = fake(4);
        assert!(up.is_quiet());
        srv.write_all(&msg(b'E', b"SFATAL\0C57P01\0Mterminating connection due to administrator command\0\0")).await.unwrap();
        assert!(!up.is_quiet(), "a FATAL while idle");
        let (mut up, srv) = fake(5);
        drop(srv);
        assert!(!up.is_quiet(), "EOF");
    }

    #[tokio::test]
    async fn put_take_lifo_limits_and_expiry() {
        let t = target();
        let k1 = PoolKey::new(&t, "svc", "a", &[]);
        let k2 = PoolKey::new(&t, "svc", "b", &[]);
        let pool = Pool::new(true, 2, 3, Duration::from_secs(60), Duration::from_secs(1));
        let mut peers = Vec::new();
        for pid in 1..=3 {
            let (up, s) = fake(pid);
            peers.push(s);
            pool.put(k1.clone(), up);
        }
        assert_eq!(pool.idle(), 2, "per-key limit");
        let (up, s) = fake(10);
        peers.push(s);
        pool.put(k2.clone(), up);
        let (up, s) = fake(11);
        peers.push(s);
        pool.put(k2.clone(), up);
        assert_eq!(pool.idle(), 3, "total limit");
        assert_eq!(pool.take(&k1, A, false).map(|i| i.conn.backend_pid), Some(2), "newest first");
        assert_eq!(pool.take(&k1, A, false).map(|i| i.conn.backend_pid), Some(1));
        assert!(pool.take(&k1, A, false).is_none());
        assert_eq!(pool.take(&k2, A, false).map(|i| i.conn.backend_pid), Some(10), "never another key's");
        assert_eq!(pool.idle(), 0);

        let short = Pool::new(true, 4, 4, Duration::from_millis(30), Duration::from_secs(1));
        let (up, s) = fake(20);
        peers.push(s);
        short.put(k1.clone(), up);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(short.take(&k1, A, false).is_none(), "expired on checkout");
        let (up, s) = fake(21);
        peers.push(s);
        short.put(k1.clone(), up);
        tokio::time::sleep(Duration::from_millis(60)).await;
        short.reap();
        assert_eq!(short.idle(), 0, "reaped");

        assert!(!Pool::new(true, 0, 4, Duration::from_secs(1), Duration::from_secs(1)).enabled());
        assert!(!Pool::new(false, 4, 4, Duration::from_secs(1), Duration::from_secs(1)).enabled());
    }

    fn current_thread_rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// An Upstream over one end of a unix socket pair, registered with the current runtime;
    /// the other end (blocking std) plays the server.
    fn unix_upstream(pid: i32) -> (Upstream, std::os::unix::net::UnixStream) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let (mut up, _) = fake(pid);
        up.stream = Box::new(tokio::net::UnixStream::from_std(a).unwrap());
        (up, b)
    }

    #[test]
    fn only_plain_sockets_leave_their_event_loop() {
        current_thread_rt().block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let tcp = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let b: BoxStream = Box::new(tcp);
            assert!(matches!(b.into_std(), Ok(Ok(StdStream::Tcp(_)))));
            let (a, _b) = tokio::net::UnixStream::pair().unwrap();
            let b: BoxStream = Box::new(a);
            assert!(matches!(b.into_std(), Ok(Ok(StdStream::Unix(_)))));
            let (a, _b) = tokio::net::UnixStream::pair().unwrap();
            let inner: BoxStream = Box::new(a);
            let b: BoxStream = Box::new(inner);
            assert!(matches!(b.into_std(), Ok(Ok(StdStream::Unix(_)))), "a boxed box: what is inside");
            let (a, _b) = tokio::io::duplex(64);
            let b: BoxStream = Box::new(a);
            assert!(b.into_std().is_err(), "an in-memory pipe (like a TLS stream) cannot move");
        });
    }

    #[test]
    fn a_parked_plain_socket_is_peeked_without_consuming() {
        use std::io::{Read, Write};
        let rt = current_thread_rt();
        let (up, mut srv) = rt.block_on(async { unix_upstream(30) });
        let idle = rt.block_on(async { Idle::park(up) }).unwrap();
        assert!(idle.home.is_none(), "a plain socket belongs to no loop");
        let Parked::Free(s) = &idle.sock else { panic!("a plain socket is parked free") };
        assert!(s.is_quiet(), "nothing to read");
        srv.write_all(b"E").unwrap();
        assert!(!s.is_quiet(), "the server spoke");
        assert!(!s.is_quiet(), "still there: a peek consumes nothing");
        let Parked::Free(StdStream::Unix(mut u)) = idle.sock else { unreachable!() };
        u.set_nonblocking(false).unwrap();
        let mut b = [0u8; 1];
        u.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"E");
        u.set_nonblocking(true).unwrap();
        let s = StdStream::Unix(u);
        assert!(s.is_quiet());
        drop(srv);
        assert!(!s.is_quiet(), "EOF");
    }

    /// A plain connection pooled on runtime A is adopted by runtime B (another thread) after
    /// A was dropped — its reactor gone — and works there: B's reactor drives it.
    #[test]
    fn a_free_connection_is_adopted_by_the_checking_out_runtime() {
        use std::io::{Read, Write};
        let key = PoolKey::new(&target(), "svc", "a", &[]);
        let pool = Arc::new(Pool::new(true, 4, 4, Duration::from_secs(60), Duration::from_secs(5)));
        let rt_a = current_thread_rt();
        let mut srv = rt_a.block_on(async {
            let (up, srv) = unix_upstream(40);
            pool.put(key.clone(), up);
            srv
        });
        assert_eq!(pool.idle(), 1);
        drop(rt_a);

        let (p, k) = (pool.clone(), key.clone());
        let client = std::thread::spawn(move || {
            current_thread_rt().block_on(async move {
                let idle = p.take(&k, A, false).expect("a free connection is usable on any loop");
                let mut up = p.adopt(idle).expect("still quiet");
                // The server answers only after a while: the task must be woken by this
                // runtime's reactor.
                up.setup_query("SELECT 1").await.map(|()| up.backend_pid)
            })
        });
        let mut hdr = [0u8; 5];
        srv.read_exact(&mut hdr).unwrap();
        assert_eq!(hdr[0], b'Q');
        let mut body = vec![0u8; i32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize - 4];
        srv.read_exact(&mut body).unwrap();
        assert_eq!(body, b"SELECT 1\0");
        std::thread::sleep(Duration::from_millis(50));
        srv.write_all(&[complete("SELECT 1"), ready(b'I')].concat()).unwrap();
        assert_eq!(client.join().unwrap().unwrap(), 40);
    }

    /// A connection that cannot leave its loop (a pipe here, TLS in pgward) is only handed out
    /// on the loop (thread) that pooled it, and the per-key limit counts per loop for them.
    #[test]
    fn a_loop_local_connection_is_only_handed_out_on_its_loop() {
        let key = PoolKey::new(&target(), "svc", "a", &[]);
        let pool = Arc::new(Pool::new(true, 1, 4, Duration::from_secs(60), Duration::from_secs(5)));
        let rt = current_thread_rt();
        let _srv = rt.block_on(async {
            let (up, srv) = fake(50);
            pool.put(key.clone(), up);
            srv
        });
        let (p, k) = (pool.clone(), key.clone());
        let other = std::thread::spawn(move || {
            current_thread_rt().block_on(async move {
                let none = p.take(&k, A, false).is_none();
                let (up, srv) = fake(51);
                p.put(k.clone(), up);
                (none, srv, p.take(&k, A, false).map(|i| i.conn.backend_pid))
            })
        });
        let (none, _srv2, theirs) = other.join().unwrap();
        assert!(none, "another loop does not get it");
        assert_eq!(theirs, Some(51), "its own loop-local connection, pooled despite the per-key limit of 1");
        assert_eq!(pool.idle(), 1, "skipped, not closed");
        rt.block_on(async {
            assert_eq!(pool.take(&key, A, false).map(|i| i.conn.backend_pid), Some(50), "its own loop gets it");
        });
    }
}
