//! `pgward serve`: load keys, start the audit writer, listen (TCP and optionally a unix
//! socket), hand each connection to a session, shut down cleanly on SIGTERM/SIGINT.

use std::sync::Arc;

use anyhow::Context;

use crate::audit::{AuditHandle, WriterOptions};
use crate::auth::Verifier;
use crate::config::Config;
use crate::session::{self, Peer, Shared};
use crate::upstream::{CancelMap, Target};

/// pgward runs N single-threaded event loops (a current-thread tokio runtime each, on its own
/// OS thread; the first is the main thread, which also accepts). Connections are handed out
/// round-robin and stay on their loop: no work stealing, no cross-thread wakeups inside a
/// session — on a database host whose cores Postgres needs, that is measurably cheaper than
/// tokio's multi-thread scheduler.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    let n = match cfg.server.worker_threads {
        0 => auto_loops(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        n => n,
    };
    let mut loops = Vec::new();
    for i in 1..n {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("pgward-loop-{i}"))
            .stack_size(LOOP_STACK)
            .spawn(move || match tokio::runtime::Builder::new_current_thread().enable_all().thread_stack_size(LOOP_STACK).build() {
                Ok(rt) => {
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .context("starting an event loop thread")?;
        loops.push(rx.recv().context("event loop thread died")?.context("starting an event loop")?);
    }
    // The accepting loop too runs on a thread of known stack size (the main thread's is
    // whatever RLIMIT_STACK says).
    std::thread::Builder::new()
        .name("pgward-loop-0".into())
        .stack_size(LOOP_STACK)
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_stack_size(LOOP_STACK)
                .build()
                .context("starting the tokio runtime")?;
            rt.block_on(serve(cfg, loops))
        })
        .context("starting the accepting event loop")?
        .join()
        .map_err(|_| anyhow::anyhow!("the accepting event loop panicked"))?
}

/// Stack of each event loop thread and of the runtimes' blocking threads. Statements are
/// parsed and their trees walked on the loop that relays them (long ones on the blocking
/// pool); `policy::pgparse::MAX_NESTING` bounds their depth so that they need far less, and this
/// leaves a wide margin (only the pages a thread touches take memory).
const LOOP_STACK: usize = 64 << 20;

/// `worker_threads = 0`: one event loop per 4 cores, at least one. pgward shares the host
/// with Postgres, and one loop relays a pgbench select load at about half a core on 2 cores;
/// on small hosts a second loop only adds wakeups between the loops.
fn auto_loops(cores: usize) -> usize {
    (cores / 4).max(1)
}

/// Round-robin placement of sessions on the event loops (index 0 = the accepting loop).
struct Loops {
    others: Vec<tokio::runtime::Handle>,
    next: usize,
}

impl Loops {
    fn place_tcp(&mut self, shared: &Arc<Shared>, s: tokio::net::TcpStream, peer: Peer) {
        self.next = (self.next + 1) % (self.others.len() + 1);
        if self.next == 0 {
            tokio::spawn(session::handle(shared.clone(), Box::new(s), peer));
            return;
        }
        // Re-register the socket with the target loop's reactor.
        match s.into_std() {
            Ok(std) => {
                let shared = shared.clone();
                self.others[self.next - 1].spawn(async move {
                    match tokio::net::TcpStream::from_std(std) {
                        Ok(s) => session::handle(shared, Box::new(s), peer).await,
                        Err(e) => tracing::warn!(error = %e, "handing a connection to an event loop failed"),
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "handing a connection to an event loop failed"),
        }
    }
}

/// What `serve` runs besides the sessions: the audit writer, the access-state watcher, the
/// pool reaper.
struct Background {
    audit: AuditHandle,
    watcher: tokio::task::JoinHandle<()>,
    reaper: Option<tokio::task::JoinHandle<()>>,
    /// Keeps the identity provider's keys current (remote keys only).
    key_refresher: Option<tokio::task::JoinHandle<()>>,
}

async fn serve(cfg: Config, loops: Vec<tokio::runtime::Handle>) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let (shared, background) = start_shared(&cfg).await?;
    // Each event loop writes and syncs the audit batches its own sessions wait for.
    background.audit.flush_on_this_loop();
    for l in &loops {
        let a = background.audit.clone();
        l.spawn(async move { a.flush_on_this_loop() });
    }
    if let Some(m) = &cfg.server.metrics_listen {
        let l = tokio::net::TcpListener::bind(m.as_str()).await.with_context(|| format!("metrics: listening on {m}"))?;
        tracing::info!(addr = %m, "metrics on GET /metrics");
        tokio::spawn(crate::metrics::serve(cfg.clone(), l));
    }
    let addr = cfg.listen_addr();
    // [intercept]: pgward enters its own cgroup before it binds its listener; programs pinned
    // by an earlier run (the bind guard refuses pgward's port to everyone else) exempt it now.
    let entered = crate::ebpf::Intercept::enter(&cfg)?;
    let tcp = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
    tracing::info!(%addr, "pgward listening");
    // [intercept]: eBPF programs attached and pinned (or adopted from an earlier run), the real
    // Postgres's sockets checked, and the sessions older than the switch-on ended. When dropped
    // (below) the programs stay pinned: interception stays closed while pgward is stopped.
    let intercept = switch_on(&cfg, entered, &tcp, shared.upstream_password.as_deref(), &background.audit).await?;
    let unix = bind_unix(&cfg, addr.port())?;

    accept_until_signal(&shared, Loops { others: loops, next: 0 }, &tcp, unix.as_ref().map(|(l, _)| l)).await?;

    drop(intercept);
    background.watcher.abort();
    if let Some(r) = background.key_refresher {
        r.abort();
    }
    if let Some(r) = background.reaper {
        r.abort();
    }
    shared.pool.close_all().await;
    if let Some((_, path)) = &unix {
        let _ = std::fs::remove_file(path);
    }
    let a = background.audit.clone();
    let _ = tokio::task::spawn_blocking(move || a.shutdown()).await;
    Ok(())
}

/// Keys, TLS, the policy and masking rules, the audit writer, the access state: everything
/// sessions share, and the tasks that keep it current.
async fn start_shared(cfg: &Arc<Config>) -> anyhow::Result<(Arc<Shared>, Background)> {
    let tls = crate::tls::server_config(cfg).context("loading the TLS certificate")?;
    let upstream_password = cfg.upstream_password().context("reading upstream.password_file")?;
    let policy = crate::policy::Policy::load(cfg).context("loading the policy")?;
    tracing::info!(sources = ?policy.sources(), rules = policy.rule_names().count(), "policy loaded");

    let mut opts = WriterOptions::from_config(cfg).context("loading the checkpoint signing key")?;
    // [access] backend = "etcd": every durable checkpoint is anchored off the host as well.
    opts.on_checkpoint = crate::audit::anchor::start(cfg, opts.signer.as_ref());
    let audit = AuditHandle::start(opts).context("starting the audit log")?;

    // Revocations and JIT grants: read the state files, audit what the last run did not, then
    // watch them (sessions check the snapshot before every statement).
    let (mut watcher, access) =
        crate::access::Watcher::load(cfg, audit.clone()).await.context("loading the access state (revocations, grants)")?;
    watcher.tick().await;
    let watcher = tokio::spawn(watcher.run());
    // Token keys: the JWKS file, or the identity provider's (fetched now, then kept current by
    // a task on this runtime; after the state directory exists, which holds its status file).
    let (verifier, key_refresher) = Verifier::start(cfg).await.context("loading token keys")?;

    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        verifier,
        audit: audit.clone(),
        tls: Some(tokio_rustls::TlsAcceptor::from(tls)),
        cancels: CancelMap::default(),
        policy,
        target: Target::from_config(cfg),
        upstream_password,
        access,
        masks: crate::mask::load_for_serve(cfg).context("loading the masking rules")?,
        pool: Arc::new(crate::pool::Pool::from_config(cfg)),
        fn_catalogs: Default::default(),
        budget: crate::wire::budget::Budget::new(cfg.server.buffer_budget_bytes),
    });
    let reaper = shared.pool.enabled().then(|| tokio::spawn(shared.pool.clone().reaper()));
    Ok((shared, Background { audit, watcher, reaper, key_refresher }))
}

/// pgward's unix socket `<server.unix_socket_dir>/.s.PGSQL.<port>`, when configured (a stale
/// socket of an earlier run is replaced; anything else there is an error).
fn bind_unix(cfg: &Config, listen_port: u16) -> anyhow::Result<Option<(tokio::net::UnixListener, std::path::PathBuf)>> {
    let Some(dir) = &cfg.server.unix_socket_dir else { return Ok(None) };
    let port = cfg.server.unix_socket_port.unwrap_or(listen_port);
    let path = cfg.resolve(dir).join(format!(".s.PGSQL.{port}"));
    if path.exists() {
        // A stale socket from a previous run: only remove a socket, never a file.
        use std::os::unix::fs::FileTypeExt;
        if std::fs::symlink_metadata(&path).map(|m| m.file_type().is_socket()).unwrap_or(false) {
            let _ = std::fs::remove_file(&path);
        }
    }
    let l = tokio::net::UnixListener::bind(&path).with_context(|| format!("listening on {}", path.display()))?;
    // Anyone may connect; the token is the authentication.
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777));
    tracing::info!(path = %path.display(), "pgward listening on unix socket");
    Ok(Some((l, path)))
}

/// Hand every accepted connection to a session until SIGTERM or SIGINT.
async fn accept_until_signal(
    shared: &Arc<Shared>,
    mut loops: Loops,
    tcp: &tokio::net::TcpListener,
    unix: Option<&tokio::net::UnixListener>,
) -> anyhow::Result<()> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            r = tcp.accept() => match r {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    // Who connected, as the kernel saw it (redirected connections only); read
                    // once: the lookup consumes the kernel's record.
                    let meta = crate::ebpf::lookup_peer(&s).map(|m| {
                        let v = m.to_json();
                        // debug: the login record carries the same, and at connection-churn
                        // rates an info line per connection is a measurable cost.
                        tracing::debug!(%peer, meta = %v, "intercepted connection");
                        std::sync::Arc::new(v)
                    });
                    loops.place_tcp(shared, s, Peer::Tcp(peer, meta));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            },
            r = async { match unix { Some(l) => l.accept().await, None => std::future::pending().await } } => match r {
                Ok((s, _)) => {
                    let (uid, pid) = match s.peer_cred() {
                        Ok(c) => (c.uid(), c.pid().unwrap_or(0)),
                        Err(_) => (u32::MAX, 0),
                    };
                    tokio::spawn(session::handle(shared.clone(), Box::new(s), Peer::Unix { uid, pid }));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "unix accept failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            },
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok(()); }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(()); }
        }
    }
}

/// Pause after a failed accept (out of file descriptors, say) before the next one.
const ACCEPT_RETRY: std::time::Duration = std::time::Duration::from_millis(50);

/// Interception, when configured: adopt or load the programs, ask the upstream where it
/// listens, check its sockets and attach, then end the sessions that did not come through
/// pgward — all before the first accept.
async fn switch_on(
    cfg: &Config,
    entered: Option<crate::ebpf::Entered>,
    tcp: &tokio::net::TcpListener,
    password: Option<&str>,
    audit: &AuditHandle,
) -> anyhow::Result<Option<crate::ebpf::Intercept>> {
    let Some(entered) = entered else { return Ok(None) };
    let mut intercept = entered.prepare(cfg, tcp)?;
    let mut conn = crate::upstream_admin::AdminConn::open(cfg, password)
        .await
        .context("intercept: logging in to the upstream to ask where it listens and which sessions it has")?;
    let found = crate::ebpf::discover::discover(&mut conn).await?;
    tracing::info!(socket_dirs = ?found.socket_dirs, listen_addresses = ?found.listen_addresses, port = found.port, "intercept: the upstream listens here");
    intercept.finish(cfg, Some(&found))?;
    crate::evict::run(&mut conn, &intercept.scope(cfg, &found), audit).await?;
    conn.close().await;
    Ok(Some(intercept))
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_loop_per_four_cores() {
        let got: Vec<usize> = [1, 2, 3, 4, 7, 8, 16, 64].iter().map(|&c| super::auto_loops(c)).collect();
        assert_eq!(got, vec![1, 1, 1, 1, 1, 2, 4, 16]);
    }
}
