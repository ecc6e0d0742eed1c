//! A multi-host upstream, walked as libpq walks `host=a,b,c`: each new connection tries the
//! hosts in order until one accepts the login and is a server the session's
//! `target_session_attrs` allows (judged by [`ServerState`], the state the server reports at
//! login); a host that is down, refuses the login, or is the wrong kind of server is skipped.
//! `prefer-standby` walks once for a standby and falls back to the first other server it
//! reached (kept open meanwhile, so there is no second walk).
//!
//! The host a connection last landed on, per `target_session_attrs`, is remembered and tried
//! first next time: after a failover the first connect finds the new primary and later ones go
//! there directly. Nothing trusts the memory: every new connection is checked again, and a
//! pooled one is checked at checkout (see `pool`); a check that fails forgets it.
//!
//! Cancels: a CancelRequest must reach the server that runs the backend. The host of each
//! backend pgward logged in to is remembered by its (pid, key) — the last
//! [`BACKENDS_REMEMBERED`] logins, far more than live connections — and a cancel for a backend
//! not remembered goes to every host (only the server running that pid with that random key
//! acts on it).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{TargetSessionAttrs, UpstreamTls};
use crate::upstream::{self, Target, Upstream, UpstreamError};
use crate::upstream_state::ServerState;
use crate::wire::{self, BoxStream, WireError};

/// Logins whose host is remembered for cancels.
const BACKENDS_REMEMBERED: usize = 65_536;

/// No remembered host.
const NONE: usize = usize::MAX;

/// One `host`/`port` pair of the upstream: a TCP host, or a directory holding the server's
/// unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn describe(&self) -> String {
        if self.is_unix() {
            format!("{}/.s.PGSQL.{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub fn is_unix(&self) -> bool {
        self.host.starts_with('/')
    }

    /// Open a raw socket (no TLS, no startup) within `timeout`.
    pub(crate) async fn open_raw(&self, timeout: Duration) -> Result<BoxStream, UpstreamError> {
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
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(UpstreamError::Timeout(addr)),
            Ok(Err(source)) => Err(UpstreamError::Connect { addr, source }),
            Ok(Ok(s)) => Ok(s),
        }
    }

    /// Open a socket and negotiate TLS as `tls` says (never on a unix socket).
    pub(crate) async fn open(
        &self,
        tls: UpstreamTls,
        timeout: Duration,
    ) -> Result<BoxStream, UpstreamError> {
        let mut s = self.open_raw(timeout).await?;
        if tls == UpstreamTls::Disable || self.is_unix() {
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
                let tls = connector
                    .connect(name, s)
                    .await
                    .map_err(|e| UpstreamError::Tls(e.to_string()))?;
                Ok(Box::new(tls))
            }
            _ if tls == UpstreamTls::Require => Err(UpstreamError::Tls(
                "the database server does not accept TLS".into(),
            )),
            _ => Ok(s),
        }
    }
}

/// What the walks learn, shared by every clone of a [`Target`].
pub struct HostMemory {
    /// Per `target_session_attrs` (indexed by [`TargetSessionAttrs::index`]), the host the
    /// last connection landed on, or [`NONE`].
    landed: [AtomicUsize; TargetSessionAttrs::ALL.len()],
    /// The last `prefer-standby` walk found no standby and fell back to another server.
    no_standby: AtomicBool,
    backends: Mutex<Backends>,
}

/// The host of each recent login, by the backend's (pid, key); oldest first in `order`.
#[derive(Default)]
struct Backends {
    host: HashMap<(i32, i32), usize>,
    order: VecDeque<(i32, i32)>,
}

impl Default for HostMemory {
    fn default() -> Self {
        HostMemory {
            landed: std::array::from_fn(|_| AtomicUsize::new(NONE)),
            no_standby: AtomicBool::new(false),
            backends: Mutex::default(),
        }
    }
}

impl HostMemory {
    /// Host indexes in the order to try for `attrs`: the one last landed on, then the list.
    fn order(&self, attrs: TargetSessionAttrs, n: usize) -> Vec<usize> {
        let first = self.landed[attrs.index()].load(Ordering::Relaxed);
        let mut out = Vec::with_capacity(n);
        if first < n {
            out.push(first);
        }
        out.extend((0..n).filter(|&i| i != first));
        out
    }

    /// Remember where a connection for `attrs` landed; true if that is another host than the
    /// last one (a failover, as far as these sessions are concerned).
    fn landed_on(&self, attrs: TargetSessionAttrs, host: usize) -> bool {
        let before = self.landed[attrs.index()].swap(host, Ordering::Relaxed);
        before != host
    }

    /// A connection for `attrs` turned out not to fit (a pooled one at checkout): walk from
    /// the top of the list next time.
    pub fn forget(&self, attrs: TargetSessionAttrs) {
        self.landed[attrs.index()].store(NONE, Ordering::Relaxed);
    }

    /// Whether the last `prefer-standby` walk found no standby (its sessions may then take
    /// pooled connections to other servers, as a new connection would land there too).
    pub fn no_standby(&self) -> bool {
        self.no_standby.load(Ordering::Relaxed)
    }

    fn remember_backend(&self, pid: i32, key: i32, host: usize) {
        let mut b = crate::lock(&self.backends);
        if b.host.insert((pid, key), host).is_none() {
            b.order.push_back((pid, key));
        }
        while b.order.len() > BACKENDS_REMEMBERED {
            if let Some(old) = b.order.pop_front() {
                b.host.remove(&old);
            }
        }
    }

    fn backend_host(&self, pid: i32, key: i32) -> Option<usize> {
        crate::lock(&self.backends).host.get(&(pid, key)).copied()
    }
}

/// Why one host was not used.
enum Miss {
    Failed(UpstreamError),
    /// Reached and logged in, but not a server `attrs` accepts.
    WrongKind(ServerState),
}

/// Log in to the first host of `target` that fits `attrs` (see the module doc).
pub async fn connect(
    target: &Target,
    attrs: TargetSessionAttrs,
    user: &str,
    password: Option<&str>,
    database: &str,
    params: &[(&str, &str)],
) -> Result<Upstream, UpstreamError> {
    let hosts = &target.endpoints;
    let mut misses: Vec<(usize, Miss)> = Vec::new();
    let mut fallback: Option<(usize, Upstream)> = None;
    for i in target.memory.order(attrs, hosts.len()) {
        let ep = &hosts[i];
        let mut up = match upstream::login(
            ep,
            target.tls,
            target.connect_timeout,
            user,
            password,
            database,
            params,
        )
        .await
        {
            Ok(up) => up,
            Err(e) => {
                tracing::debug!(host = %ep.describe(), error = %e, "upstream host not used");
                misses.push((i, Miss::Failed(e)));
                continue;
            }
        };
        let state = match ServerState::of(&mut up).await {
            Ok(s) => s,
            Err(e) => {
                misses.push((i, Miss::Failed(e)));
                tokio::spawn(up.close());
                continue;
            }
        };
        if attrs.prefers(state) {
            if let Some((_, f)) = fallback.take() {
                tokio::spawn(f.close());
            }
            if attrs == TargetSessionAttrs::PreferStandby {
                target.memory.no_standby.store(false, Ordering::Relaxed);
            }
            return Ok(landed(target, attrs, i, up));
        }
        if attrs.accepts(state) && fallback.is_none() {
            fallback = Some((i, up));
        } else {
            tracing::debug!(host = %ep.describe(), ?state, wanted = attrs.name(), "upstream host is not the server wanted");
            misses.push((i, Miss::WrongKind(state)));
            tokio::spawn(up.close());
        }
    }
    if let Some((i, up)) = fallback {
        if attrs == TargetSessionAttrs::PreferStandby {
            target.memory.no_standby.store(true, Ordering::Relaxed);
        }
        return Ok(landed(target, attrs, i, up));
    }
    Err(walk_error(target, attrs, misses))
}

fn landed(target: &Target, attrs: TargetSessionAttrs, host: usize, up: Upstream) -> Upstream {
    if target.memory.landed_on(attrs, host) && target.endpoints.len() > 1 {
        tracing::info!(host = %target.endpoints[host].describe(), target_session_attrs = attrs.name(), "upstream: new connections go to this host");
    }
    target
        .memory
        .remember_backend(up.backend_pid, up.backend_key, host);
    up
}

/// The error for a walk that found no host: a single host's own error as it was; else the
/// first refusal by a server that is not just unavailable (a missing database, a refused
/// password — what the client must see), else a summary of every host.
fn walk_error(
    target: &Target,
    attrs: TargetSessionAttrs,
    mut misses: Vec<(usize, Miss)>,
) -> UpstreamError {
    if misses.len() == 1
        && let Some((_, Miss::Failed(_))) = misses.first()
        && let Some((_, Miss::Failed(e))) = misses.pop()
    {
        return e;
    }
    let refusal = misses.iter().position(|(_, m)| {
        matches!(m, Miss::Failed(UpstreamError::Server { code, .. }) if !code.starts_with(UNAVAILABLE_CLASS))
    });
    if let Some(at) = refusal
        && let (_, Miss::Failed(e)) = misses.swap_remove(at)
    {
        return e;
    }
    let tried: Vec<String> = misses
        .iter()
        .map(|(i, m)| {
            let what = match m {
                Miss::Failed(e) => e.to_string(),
                Miss::WrongKind(s) if s.in_recovery => "a standby".into(),
                Miss::WrongKind(s) if s.read_only => "a read-only primary".into(),
                Miss::WrongKind(_) => "a primary".into(),
            };
            format!("{}: {what}", target.endpoints[*i].describe())
        })
        .collect();
    UpstreamError::NoServer {
        wanted: attrs.name(),
        tried: tried.join("; "),
    }
}

/// SQLSTATE class 57 (operator intervention: shutting down, starting up, not accepting
/// connections in recovery): the server is unavailable, not refusing this login.
const UNAVAILABLE_CLASS: &str = "57";

/// Send a CancelRequest for the backend (pid, key) to the host it runs on, or to every host
/// when that is not remembered. Ok if one host took it.
pub async fn cancel(target: &Target, pid: i32, key: i32) -> Result<(), UpstreamError> {
    let hosts: Vec<&Endpoint> = match target.memory.backend_host(pid, key) {
        Some(i) if i < target.endpoints.len() => vec![&target.endpoints[i]],
        _ => target.endpoints.iter().collect(),
    };
    let mut last = None;
    let mut sent = false;
    for ep in hosts {
        match cancel_at(ep, target.connect_timeout, pid, key).await {
            Ok(()) => sent = true,
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) if !sent => Err(e),
        _ => Ok(()),
    }
}

/// A CancelRequest over a fresh plain connection (Postgres accepts them before TLS too).
async fn cancel_at(
    ep: &Endpoint,
    timeout: Duration,
    pid: i32,
    key: i32,
) -> Result<(), UpstreamError> {
    let mut s = ep.open_raw(timeout).await?;
    let mut out = BytesMut::new();
    wire::cancel_request(&mut out, pid, key);
    s.write_all(&out).await.map_err(WireError::Io)?;
    // Postgres closes the connection after reading the request.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut sink)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use TargetSessionAttrs as A;

    #[test]
    fn the_host_landed_on_is_tried_first_until_forgotten() {
        let m = HostMemory::default();
        assert_eq!(m.order(A::ReadWrite, 3), [0, 1, 2]);
        assert!(m.landed_on(A::ReadWrite, 2), "another host than before");
        assert!(!m.landed_on(A::ReadWrite, 2), "the same host");
        assert_eq!(m.order(A::ReadWrite, 3), [2, 0, 1]);
        assert_eq!(
            m.order(A::PreferStandby, 3),
            [0, 1, 2],
            "per target_session_attrs"
        );
        assert_eq!(
            m.order(A::ReadWrite, 2),
            [0, 1],
            "an index past the list is ignored"
        );
        m.forget(A::ReadWrite);
        assert_eq!(m.order(A::ReadWrite, 3), [0, 1, 2]);
    }

    #[test]
    fn backends_are_remembered_boundedly() {
        let m = HostMemory::default();
        m.remember_backend(10, 7, 1);
        assert_eq!(m.backend_host(10, 7), Some(1));
        assert_eq!(
            m.backend_host(10, 8),
            None,
            "the key is part of the identity"
        );
        for pid in 0..BACKENDS_REMEMBERED as i32 {
            m.remember_backend(1000 + pid, 1, 0);
        }
        assert_eq!(m.backend_host(10, 7), None, "the oldest is forgotten");
        assert_eq!(
            m.backend_host(1000 + BACKENDS_REMEMBERED as i32 - 1, 1),
            Some(0)
        );
        assert_eq!(crate::lock(&m.backends).host.len(), BACKENDS_REMEMBERED);
    }

    fn target(hosts: &[(&str, u16)]) -> Target {
        Target::new(
            hosts
                .iter()
                .map(|(h, p)| Endpoint {
                    host: h.to_string(),
                    port: *p,
                })
                .collect(),
            UpstreamTls::Disable,
            Duration::from_secs(1),
        )
    }

    #[test]
    fn one_host_keeps_its_own_error_and_refusals_win_over_unavailability() {
        let t = target(&[("a", 1)]);
        let refused = || UpstreamError::Server {
            code: "3D000".into(),
            message: "database \"x\" does not exist".into(),
        };
        let down = || UpstreamError::Timeout("a:1".into());
        assert!(matches!(
            walk_error(&t, A::Any, vec![(0, Miss::Failed(down()))]),
            UpstreamError::Timeout(_)
        ));
        let t = target(&[("a", 1), ("b", 2), ("c", 3)]);
        let starting = UpstreamError::Server {
            code: "57P03".into(),
            message: "starting up".into(),
        };
        let e = walk_error(
            &t,
            A::ReadWrite,
            vec![
                (0, Miss::Failed(starting)),
                (1, Miss::Failed(refused())),
                (2, Miss::Failed(down())),
            ],
        );
        assert_eq!(e.sqlstate(), "3D000");
        let standby = ServerState {
            in_recovery: true,
            read_only: true,
        };
        let e = walk_error(
            &t,
            A::ReadWrite,
            vec![(0, Miss::Failed(down())), (1, Miss::WrongKind(standby))],
        );
        assert_eq!(e.sqlstate(), crate::sqlstate::CONNECTION_FAILURE);
        let msg = e.to_string();
        assert!(
            msg.contains("read-write")
                && msg.contains("a:1: timed out")
                && msg.contains("b:2: a standby"),
            "{msg}"
        );
    }
}
