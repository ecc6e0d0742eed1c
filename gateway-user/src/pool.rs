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
//!   `DISCARD ALL`, as two Queries, each verified to answer CommandComplete + ReadyForQuery
//!   'I' ([`Upstream::reset`]); on any error or timeout the connection is closed.
//! - **Checkout**: expired connections are closed, a connection that has anything to read
//!   (the server spoke while idle: terminated, timed out, EOF) is closed, then one Query
//!   `SET application_name TO …; SET ROLE …` names the new user and sets their role. A
//!   pooled connection whose setup fails for any reason but a server error is closed and the
//!   next one (or a new connection) is tried.
//! - Pooled connections log in with `application_name = 'pgward:'` (no user): that is what
//!   `DISCARD ALL` / `RESET ALL` returns it to, so a session never shows the previous user's
//!   name, and an idle pooled backend is recognisable in `pg_stat_activity`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{Config, UpstreamTls};
use crate::metrics::METRICS;
use crate::upstream::{self, Target, Upstream, UpstreamError};

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
    #[error("pgward is shutting down")]
    Shutdown,
}

impl Discard {
    /// The metrics label.
    pub fn reason(&self) -> &'static str {
        match self {
            Discard::Unclean => "unclean",
            Discard::Cancelled => "cancelled",
            Discard::Reset(_) | Discard::ResetTimeout => "reset_failed",
            Discard::Full => "full",
            Discard::Expired => "expired",
            Discard::Dead => "dead",
            Discard::Setup(_) | Discard::SetupTimeout => "setup_failed",
            Discard::Shutdown => "shutdown",
        }
    }
}

/// Everything that shapes an upstream backend at login. Two logins share connections only
/// when their keys are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub database: String,
    pub user: String,
    host: String,
    port: u16,
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
            host: target.host.clone(),
            port: target.port,
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

struct Idle {
    up: Upstream,
    since: Instant,
}

#[derive(Default)]
struct Inner {
    /// Per key, oldest first (checkout takes the newest).
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
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Idle connections in the pool.
    pub fn idle(&self) -> usize {
        self.lock().total
    }

    /// An upstream connection for a login to `key`, named after the user (`app_name`) and
    /// with the user's role set (`role_sql`, a `SET ROLE …`): a pooled one if one is alive,
    /// else a new login as the service role. With pooling off, exactly the old path: a new
    /// connection with `app_name` in its startup packet, then `role_sql`.
    pub async fn acquire(
        &self,
        target: &Target,
        key: &PoolKey,
        password: Option<&str>,
        app_name: &str,
        role_sql: Option<&str>,
    ) -> Result<Acquired, UpstreamError> {
        if !self.enabled {
            let mut up = connect(target, key, password, app_name).await?;
            if let Some(sql) = role_sql {
                up.setup_query(sql).await?;
            }
            return Ok(Acquired { up, reused: false });
        }

        let setup = setup_sql(app_name, role_sql);
        while let Some(mut up) = self.take(key) {
            if !up.is_quiet() {
                self.discard(up, Discard::Dead);
                continue;
            }
            match tokio::time::timeout(self.op_timeout, up.setup_query(&setup)).await {
                Ok(Ok(())) if up.tx_status == b'I' => {
                    METRICS.pool_hits.inc();
                    tracing::debug!(backend = up.backend_pid, "reusing a pooled upstream connection");
                    return Ok(Acquired { up, reused: true });
                }
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
        let mut up = connect(target, key, password, POOLED_APPLICATION_NAME).await?;
        up.setup_query(&setup).await?;
        Ok(Acquired { up, reused: false })
    }

    /// The newest idle connection for `key`, closing the expired ones on the way.
    fn take(&self, key: &PoolKey) -> Option<Upstream> {
        let now = Instant::now();
        let (got, expired) = {
            let mut inner = self.lock();
            let list = inner.idle.get_mut(key)?;
            let n = list.iter().take_while(|i| now.duration_since(i.since) >= self.idle_timeout).count();
            let expired: Vec<Idle> = list.drain(..n).collect();
            let got = list.pop();
            if list.is_empty() {
                inner.idle.remove(key);
            }
            inner.total -= expired.len() + usize::from(got.is_some());
            METRICS.pool_idle.set(inner.total as i64);
            (got, expired)
        };
        for i in expired {
            self.discard(i.up, Discard::Expired);
        }
        got.map(|i| i.up)
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

    /// Add a reset connection to the idle list (or close it when the pool is full).
    fn put(&self, key: PoolKey, up: Upstream) {
        let refused = {
            let mut inner = self.lock();
            let n = inner.idle.get(&key).map_or(0, Vec::len);
            if inner.total >= self.max_total || n >= self.max_idle {
                Some(up)
            } else {
                tracing::debug!(backend = up.backend_pid, "upstream connection pooled");
                inner.idle.entry(key).or_default().push(Idle { up, since: Instant::now() });
                inner.total += 1;
                METRICS.pool_idle.set(inner.total as i64);
                None
            }
        };
        if let Some(up) = refused {
            self.discard(up, Discard::Full);
        }
    }

    /// Close a connection that is not (or no longer) pooled: counted, logged, Terminate sent
    /// in a spawned task.
    fn discard(&self, up: Upstream, why: Discard) {
        tracing::debug!(backend = up.backend_pid, reason = %why, "upstream connection not pooled");
        METRICS.pool_discard(why.reason());
        tokio::spawn(up.close());
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
            self.discard(i.up, Discard::Expired);
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
            set.spawn(i.up.close());
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), async { while set.join_next().await.is_some() {} }).await;
    }
}

/// A new login as the service role, with `application_name` and the key's startup parameters.
async fn connect(target: &Target, key: &PoolKey, password: Option<&str>, app: &str) -> Result<Upstream, UpstreamError> {
    let mut params: Vec<(&str, &str)> = vec![("application_name", app)];
    params.extend(key.params.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    upstream::connect(target, &key.user, password, &key.database, &params).await
}

/// The checkout Query: the user's application_name (as Postgres would store it from a startup
/// packet: printable ASCII, anything else as '?', so the literal is plain ASCII in every
/// client_encoding) in an escape string literal, then the role.
fn setup_sql(app_name: &str, role_sql: Option<&str>) -> String {
    let clean: String = app_name.chars().map(|c| if (' '..='~').contains(&c) { c } else { '?' }).collect();
    let lit = clean.replace('\\', "\\\\").replace('\'', "\\'");
    let mut sql = format!("SET application_name TO E'{lit}'");
    if let Some(r) = role_sql {
        sql.push_str("; ");
        sql.push_str(r);
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn target() -> Target {
        Target { host: "db".into(), port: 5432, tls: UpstreamTls::Disable, connect_timeout: Duration::from_secs(1) }
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
            setup_sql("pgward:o'neil:a\\b", Some("SET ROLE \"r\"")),
            "SET application_name TO E'pgward:o\\'neil:a\\\\b'; SET ROLE \"r\""
        );
        assert_eq!(setup_sql("pgward:zoë\n", None), "SET application_name TO E'pgward:zo??'");
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
    async fn reset_runs_two_queries_and_verifies_each() {
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
            srv
        });
        up.reset().await.unwrap();
        assert!(up.params.contains(&("is_superuser".into(), "off".into())));
        let _srv = server.await.unwrap();
        assert!(up.is_quiet(), "nothing left to read");
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
        assert_eq!(pool.take(&k1).map(|u| u.backend_pid), Some(2), "newest first");
        assert_eq!(pool.take(&k1).map(|u| u.backend_pid), Some(1));
        assert!(pool.take(&k1).is_none());
        assert_eq!(pool.take(&k2).map(|u| u.backend_pid), Some(10), "never another key's");
        assert_eq!(pool.idle(), 0);

        let short = Pool::new(true, 4, 4, Duration::from_millis(30), Duration::from_secs(1));
        let (up, s) = fake(20);
        peers.push(s);
        short.put(k1.clone(), up);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(short.take(&k1).is_none(), "expired on checkout");
        let (up, s) = fake(21);
        peers.push(s);
        short.put(k1.clone(), up);
        tokio::time::sleep(Duration::from_millis(60)).await;
        short.reap();
        assert_eq!(short.idle(), 0, "reaped");

        assert!(!Pool::new(true, 0, 4, Duration::from_secs(1), Duration::from_secs(1)).enabled());
        assert!(!Pool::new(false, 4, 4, Duration::from_secs(1), Duration::from_secs(1)).enabled());
    }
}
