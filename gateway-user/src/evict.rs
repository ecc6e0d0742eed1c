//! No session outlives the switch-on: when interception is attached (first start and every
//! restart), every client session on the real Postgres that did not come through this pgward
//! and that interception would now steer is ended (`pg_terminate_backend`; the service role
//! needs `pg_signal_backend` for sessions of other roles) and audited as `evicted`.
//!
//! Which sessions: pg_stat_activity's client backends except pgward's own administrative
//! connection (by backend pid: what the server says, nothing a client can spoof). It runs
//! before pgward accepts anything, so no session of this pgward exists yet. Each backend's
//! client is looked up from the backend's socket ([`procnet`]) when Postgres runs on this
//! host: a local process inside the intercepted cgroup, a client of another host, or one that
//! cannot be identified is ended; a local process outside the intercepted cgroup is left alone
//! (interception does not apply to it, so ending it would protect nothing). When Postgres is
//! on another host its backends cannot be inspected, and every client session is ended.

mod procnet;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::audit::{AuditHandle, Client, Kind, Record};
use crate::upstream_admin::{AdminConn, Rows};
use procnet::Peer;

/// How long pg_terminate_backend waits for each backend to be gone.
const TERMINATE_WAIT: Duration = Duration::from_secs(5);
const SESSIONS: &str = "SELECT pid, usename, application_name, host(client_addr), client_port, \
                        backend_start FROM pg_stat_activity \
                        WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()";

/// What interception covers, to tell the sessions it would have steered.
pub struct Scope {
    /// The cgroup the programs are attached to (absolute, under `cgroup_root`).
    pub cgroup: PathBuf,
    pub cgroup_root: PathBuf,
    /// Postgres runs on this host: its backends' sockets can be inspected.
    pub upstream_local: bool,
    /// The TCP port the server listens on (a backend's client socket is on it).
    pub port: u16,
}

/// One row of pg_stat_activity.
#[derive(Debug, Clone)]
struct Backend {
    pid: i32,
    user: Option<String>,
    application: Option<String>,
    client_addr: Option<String>,
    client_port: Option<i32>,
    backend_start: Option<String>,
}

/// A session to end, and why.
struct Eviction {
    backend: Backend,
    peer: Option<Peer>,
    /// The local client process that puts the session in scope, and its cgroup.
    client_pid: Option<u32>,
    cgroup: Option<String>,
}

/// End the sessions; returns how many were ended. Each is audited (durably) before it is
/// ended, also the ones the server refused to end.
pub async fn run(conn: &mut AdminConn, scope: &Scope, audit: &AuditHandle) -> anyhow::Result<usize> {
    let rows = conn.query(SESSIONS).await.map_err(|e| anyhow::anyhow!("evict: reading pg_stat_activity: {e}"))?;
    let own = conn.backend_pid();
    let mut ended = 0;
    for b in backends(&rows).into_iter().filter(|b| b.pid != own) {
        let Some(ev) = decide(b, scope) else { continue };
        let (terminated, error) = match terminate(conn, ev.backend.pid).await {
            Ok(t) => (t, None),
            Err(e) => (false, Some(e.to_string())),
        };
        let rec = record(&ev, terminated, error.as_deref());
        audit.append_durable(rec).await.map_err(|e| anyhow::anyhow!("evict: auditing: {e}"))?;
        if terminated {
            ended += 1;
            tracing::info!(pid = ev.backend.pid, user = ?ev.backend.user, application = ?ev.backend.application,
                client = ?client_text(&ev), "evicted a session that did not come through pgward");
        } else {
            tracing::error!(pid = ev.backend.pid, user = ?ev.backend.user, error = ?error,
                "could not end a session that did not come through pgward (the service role needs pg_signal_backend; superuser sessions cannot be ended by it)");
        }
    }
    tracing::info!("interception on: evicted {ended} sessions older than the switch-on that did not come through pgward");
    Ok(ended)
}

/// pg_terminate_backend, waiting (Postgres 14+) until the backend is gone.
async fn terminate(conn: &mut AdminConn, pid: i32) -> Result<bool, crate::upstream::UpstreamError> {
    let yes = |r: Rows| r.first().and_then(|row| row.first()).cloned().flatten().as_deref() == Some("t");
    match conn.query(&format!("SELECT pg_terminate_backend({pid}, {})", TERMINATE_WAIT.as_millis())).await {
        // Postgres before 14 has no timeout argument.
        Err(e) if e.sqlstate() == crate::sqlstate::UNDEFINED_FUNCTION => conn.query(&format!("SELECT pg_terminate_backend({pid})")).await.map(yes),
        r => r.map(yes),
    }
}

fn backends(rows: &Rows) -> Vec<Backend> {
    rows.iter()
        .filter_map(|r| {
            let col = |i: usize| r.get(i).cloned().flatten();
            Some(Backend {
                pid: col(0)?.parse().ok()?,
                user: col(1),
                application: col(2).filter(|a| !a.is_empty()),
                client_addr: col(3),
                client_port: col(4).and_then(|p| p.parse().ok()),
                backend_start: col(5),
            })
        })
        .collect()
}

/// Some(eviction) when the session is in scope: a local client is left alone only when every
/// process holding its socket is known to be outside the intercepted cgroup (one inside could
/// have handed a copy to a process outside, e.g. a service manager's file-descriptor store).
fn decide(backend: Backend, scope: &Scope) -> Option<Eviction> {
    if !scope.upstream_local {
        return Some(Eviction { backend, peer: None, client_pid: None, cgroup: None });
    }
    let peer = procnet::backend_peer(backend.pid.max(0) as u32, scope.port);
    let Some(Peer::Local { pids, .. }) = &peer else {
        return Some(Eviction { backend, peer, client_pid: None, cgroup: None });
    };
    let holders: Vec<(u32, Option<String>)> = pids.iter().map(|&p| (p, crate::host::cgroup::cgroup_of(p))).collect();
    let inside = holders.iter().find(|(_, cg)| cg.as_deref().is_none_or(|cg| within(&scope.cgroup_root, cg, &scope.cgroup)));
    let (client_pid, cgroup) = inside.cloned()?;
    Some(Eviction { backend, peer, client_pid: Some(client_pid), cgroup })
}

/// Whether cgroup `rel` (as /proc/<pid>/cgroup shows it) is `cgroup` or below it.
fn within(root: &Path, rel: &str, cgroup: &Path) -> bool {
    root.join(rel.trim_start_matches('/')).starts_with(cgroup)
}

fn client_text(ev: &Eviction) -> Option<String> {
    match (&ev.peer, &ev.backend.client_addr, ev.backend.client_port) {
        (Some(Peer::Local { addr: Some(a), .. }) | Some(Peer::Remote { addr: a }), _, _) => Some(a.to_string()),
        (_, Some(a), Some(p)) if p >= 0 => Some(format!("{a}:{p}")),
        _ => None,
    }
}

fn record(ev: &Eviction, terminated: bool, error: Option<&str>) -> Record {
    let b = &ev.backend;
    let client_pid = ev.client_pid;
    let client = match (client_text(ev), client_pid) {
        (Some(addr), _) => Some(Client::Tcp { addr: addr.into(), meta: None }),
        (None, Some(pid)) => Some(Client::Unix { uid: uid_of(pid).unwrap_or(u32::MAX), pid: pid as i32 }),
        (None, None) => None,
    };
    let mut meta = json!({
        "pid": b.pid,
        "application_name": b.application,
        "backend_start": b.backend_start,
        "terminated": terminated,
    });
    if let Some(p) = client_pid {
        meta["client_pid"] = json!(p);
        meta["client_comm"] = json!(std::fs::read_to_string(format!("/proc/{p}/comm")).ok().map(|s| s.trim().to_string()));
    }
    if let Some(cg) = &ev.cgroup {
        meta["client_cgroup"] = json!(cg);
    }
    Record {
        kind: Kind::Evicted,
        user: b.user.as_deref().map(Into::into),
        client,
        error: error.map(str::to_string),
        meta: Some(meta),
        ..Record::default()
    }
}

fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_scope_is_the_subtree() {
        let root = Path::new("/sys/fs/cgroup/unified");
        let cg = root.join("pgwt-a");
        assert!(within(root, "/pgwt-a", &cg));
        assert!(within(root, "/pgwt-a/x/y", &cg));
        assert!(!within(root, "/pgwt-ab", &cg), "a sibling with a longer name is outside");
        assert!(!within(root, "/", &cg));
        assert!(within(root, "/anything", root), "the root covers everything");
    }

    #[test]
    fn rows_become_backends() {
        let rows: Rows = vec![
            vec![Some("42".into()), Some("svc".into()), Some("".into()), Some("127.0.0.1".into()), Some("5555".into()), None],
            vec![Some("not a pid".into())],
        ];
        let b = backends(&rows);
        assert_eq!(b.len(), 1);
        assert_eq!((b[0].pid, b[0].application.as_deref(), b[0].client_port), (42, None, Some(5555)));
    }
}
