//! One client connection, start to end: startup (TLS, token), upstream login, then the relay
//! loop with write-ahead audit. This module owns the protocol state machine, not policy.
//!
//! Relay invariants:
//! - Client frames are processed in batches (everything that arrived in one read). Frames that
//!   execute something (`Q`, `E`, `F`) get a `statement` record; the batch goes upstream only
//!   once all its records are durable. If the audit append fails, those frames are replaced by
//!   markers that fail upstream (so Postgres does the transaction/pipeline bookkeeping) and
//!   the resulting ErrorResponse is rewritten into pgward's own error.
//! - With a plaintext upstream and a writer thread (`fsync` = group or always), the audit writer
//!   sends a held batch upstream itself the moment its last record is durable ([`HeldSend`]),
//!   instead of waking this session's event loop to do it: one thread hop less per statement.
//!   Only when nothing else is waiting to go upstream, and never after a failed sync; the
//!   session claims the batch back when told (sending whatever the writer could not), and
//!   before anything else of its own goes upstream. When the writer sent all of it, it does
//!   not wake the session either: the session claims the batch when Postgres answers or the
//!   client sends more, whichever comes first (client bytes read while the batch is still
//!   held wait, and the writer is then asked to tell).
//! - Every forwarded frame that expects an answer has a `Pending` entry; server answers pop
//!   them in order, which is how results are matched to statements.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::access::{Access, SessionCheck, SessionGrant};
use crate::audit::{AuditHandle, Client, Kind, Record};
use crate::auth::{Identity, Verifier};
use crate::config::Config;
use crate::host::clock::now_unix;
use crate::policy::{Policy, Verdict};
use crate::pool::PoolKey;
use crate::upstream::{self, CancelMap, Target};
use crate::wire::{self, BoxStream, Frame, WireError};

mod held;
mod startup;

use held::{Batch, HeldSend, append_unsent};
use startup::{LEXICAL_SETTINGS, Login, PRESENTATION_PARAMS, startup, startup_setting_sql};

/// Everything sessions share.
pub struct Shared {
    pub cfg: Arc<Config>,
    pub verifier: Verifier,
    pub audit: AuditHandle,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub cancels: CancelMap,
    pub policy: Policy,
    pub target: Target,
    pub upstream_password: Option<String>,
    /// Revocations and JIT grants (see `access`), checked at login and before every statement.
    pub access: Arc<Access>,
    /// `[[mask]]` rules (see `mask`): applied to the results of sessions they cover.
    pub masks: Arc<crate::mask::MaskPolicy>,
    /// Idle upstream connections for reuse (see `pool`).
    pub pool: Arc<crate::pool::Pool>,
    /// Function catalogs for policy rules that name catalog function classes.
    pub fn_catalogs: crate::policy_catalog::FunctionCatalogs,
}

/// Who is on the other end of an accepted socket.
#[derive(Debug, Clone)]
pub enum Peer {
    /// Address, and for intercepted connections what the kernel recorded (original
    /// destination, pid, uid, cgroup, ...).
    Tcp(SocketAddr, Option<Arc<serde_json::Value>>),
    Unix { uid: u32, pid: i32 },
}

impl Peer {
    fn is_local(&self) -> bool {
        match self {
            Peer::Tcp(a, _) => a.ip().is_loopback(),
            Peer::Unix { .. } => true,
        }
    }
    fn audit_client(&self) -> Client {
        match self {
            Peer::Tcp(a, meta) => Client::Tcp { addr: a.to_string(), meta: meta.clone() },
            Peer::Unix { uid, pid } => Client::Unix { uid: *uid, pid: *pid },
        }
    }
}

/// Above this many buffered bytes in one direction, stop reading the other side.
const HIGH_WATER: usize = 256 * 1024;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

fn new_session_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    }
    hex::encode(b)
}

/// Send a FATAL error to the client and flush (best effort).
async fn fatal<S: tokio::io::AsyncWrite + Unpin + ?Sized>(s: &mut S, code: &str, msg: &str) {
    let mut out = BytesMut::new();
    wire::error_response(&mut out, "FATAL", code, msg);
    let _ = s.write_all(&out).await;
    let _ = s.flush().await;
}

/// Entry point for an accepted connection.
pub async fn handle(shared: Arc<Shared>, stream: BoxStream, peer: Peer) {
    let session = new_session_id();
    let span = tracing::info_span!("session", id = %session);
    let _ = tracing::Instrument::instrument(run(shared, stream, peer, session), span).await;
}


/// Refuse a login after the token was verified: `login_failed` record, FATAL to the client.
#[allow(clippy::too_many_arguments)]
async fn refuse_login(
    shared: &Shared,
    stream: &mut BoxStream,
    session: &str,
    peer: &Peer,
    identity: &Identity,
    database: &str,
    code: &str,
    msg: String,
    rule: Option<String>,
) {
    tracing::info!(user = %identity.user, code, %msg, "login refused");
    let mut rec = identity_record(Kind::LoginFailed, session, peer, identity, database);
    rec.rule = rule;
    rec.sqlstate = Some(code.to_string());
    rec.error = Some(msg.clone());
    let _ = shared.audit.append_durable(rec).await;
    fatal(stream, code, &msg).await;
}

/// A session-level record for a verified identity (login, login_failed after the token).
fn identity_record(kind: Kind, session: &str, peer: &Peer, identity: &Identity, database: &str) -> Record {
    Record {
        kind,
        session: Some(session.to_string()),
        user: Some(identity.user.clone()),
        groups: Some(identity.groups.clone()),
        client: Some(peer.audit_client()),
        database: Some(database.to_string()),
        jti: Some(identity.jti.clone()),
        ..Default::default()
    }
}

async fn run(shared: Arc<Shared>, stream: BoxStream, peer: Peer, session: String) -> Option<()> {
    let mut login = match tokio::time::timeout(STARTUP_TIMEOUT, startup(&shared, stream, &peer, &session)).await {
        Ok(Some(l)) => l,
        Ok(None) => return None,
        Err(_) => {
            tracing::info!("startup timed out");
            return None;
        }
    };

    // Revocations and grants: the generation is read before the snapshot, so anything
    // published after this check is seen by the session's first statement.
    let access_generation = shared.access.generation();
    let snap = shared.access.snapshot();
    if let Some(why) = snap.token_revoked(&login.identity) {
        let msg = format!("pgward: token authentication failed for user \"{}\": {why}", login.identity.user);
        refuse_login(&shared, &mut login.stream, &session, &peer, &login.identity, &login.database, "28P01", msg, None).await;
        return None;
    }
    let grant = snap.active_grant(&login.identity.user, now_unix()).and_then(SessionGrant::from_request);
    drop(snap);
    // Under a grant, statements are decided as a member of the policy groups that have the
    // granted role (if any has it), not of the token's groups.
    let policy_identity = match &grant {
        Some(g) => {
            let groups = shared.policy.groups_with_role(&g.role);
            if groups.is_empty() { login.identity.clone() } else { Identity { groups, ..login.identity.clone() } }
        }
        None => login.identity.clone(),
    };

    // Startup settings other than presentation ones are decided like `SET name TO 'value'`.
    for (k, v) in &login.params {
        let pgwards = LEXICAL_SETTINGS.iter().any(|(p, _)| k.eq_ignore_ascii_case(p));
        if pgwards || PRESENTATION_PARAMS.iter().any(|p| k.eq_ignore_ascii_case(p)) {
            continue;
        }
        let refusal = match startup_setting_sql(k, v) {
            None => Some(("22023", format!("pgward: invalid startup parameter name \"{k}\""), None)),
            Some(sql) => {
                let v = shared.policy.decide(&policy_identity, &login.database, &sql, chrono::Utc::now());
                (!v.is_allowed()).then(|| {
                    let msg = format!(
                        "pgward: startup parameter \"{k}\" refused by policy rule \"{}\": {}",
                        v.rule, v.reason
                    );
                    ("42501", msg, Some(v.rule.clone()))
                })
            }
        };
        if let Some((code, msg, rule)) = refusal {
            refuse_login(&shared, &mut login.stream, &session, &peer, &login.identity, &login.database, code, msg, rule).await;
            return None;
        }
    }

    // Upstream login with the service credential. application_name carries the real user so
    // Postgres's own logs and pg_stat_activity show who it is.
    let app_name = match login.app_name.as_deref() {
        Some(a) if !a.is_empty() => format!("pgward:{}:{}", login.identity.user, a),
        _ => format!("pgward:{}", login.identity.user),
    };
    let pool_key = PoolKey::new(&shared.target, &shared.cfg.upstream.user, &login.database, &login.params);
    let Login { identity, database, mut stream, buf, .. } = login;
    // The identity's database role (policy groups → roles, or the grant's), set before the
    // client can act.
    let role_sql = match &grant {
        Some(g) => Some(format!("SET ROLE \"{}\"", g.role.replace('"', "\"\""))),
        None => shared.policy.set_role_sql(&identity),
    };
    // A pooled connection (reset at check-in) or a new one; either way named after this user
    // and with this user's role before the client can act.
    let up = shared
        .pool
        .acquire(&shared.target, &pool_key, shared.upstream_password.as_deref(), &app_name, role_sql.as_deref())
        .await;
    let (up, reused) = match up {
        Ok(a) => (a.up, a.reused),
        Err(e) => {
            tracing::warn!(error = %e, "upstream login failed");
            let mut rec = identity_record(Kind::LoginFailed, &session, &peer, &identity, &database);
            rec.sqlstate = Some(e.sqlstate().to_string());
            rec.error = Some(format!("upstream: {e}"));
            let _ = shared.audit.append_durable(rec).await;
            fatal(&mut stream, e.sqlstate(), &format!("pgward: {e}")).await;
            return None;
        }
    };

    // The server must report the settings pgward parses SQL with.
    let watch = match crate::param_watch::ParamWatch::at_login(&up.params) {
        Ok(w) => w,
        Err(msg) => {
            let msg = format!("pgward: {msg}");
            refuse_login(&shared, &mut stream, &session, &peer, &identity, &database, "42501", msg, None).await;
            return None;
        }
    };

    // The database's function classes, before the first statement is decided.
    shared.fn_catalogs.ensure(&shared, &database).await;

    // Write-ahead: the login is durable before the session can do anything.
    let mut login_rec = identity_record(Kind::Login, &session, &peer, &identity, &database);
    login_rec.meta = login_meta(&shared, &identity, &policy_identity, grant.as_ref(), up.backend_pid, reused);
    if let Err(e) = shared.audit.append_durable(login_rec).await {
        tracing::error!(error = %e, "audit append failed; refusing login");
        fatal(&mut stream, "58030", &format!("pgward: audit log unavailable, login refused: {e}")).await;
        return None;
    }

    let (pid, key) = shared.cancels.register(up.backend_pid, up.backend_key);
    let mut hello = BytesMut::new();
    wire::auth_ok(&mut hello);
    for (k, v) in &up.params {
        wire::parameter_status(&mut hello, k, v);
    }
    wire::backend_key_data(&mut hello, pid, key);
    wire::ready_for_query(&mut hello, up.tx_status);
    if stream.write_all(&hello).await.is_err() || stream.flush().await.is_err() {
        shared.cancels.remove(pid, key);
        return None;
    }
    tracing::info!(user = %identity.user, database = %database, "session started");

    let mask = crate::mask::relay::MaskRelay::start(
        &shared.masks,
        &identity,
        &database,
        crate::mask::catalog::Access {
            target: shared.target.clone(),
            user: shared.cfg.upstream.user.clone(),
            password: shared.upstream_password.clone(),
        },
        {
            let (shared, database) = (shared.clone(), database.clone());
            Arc::new(move || shared.policy.function_catalog(&database))
        },
    )
    .await
    .map(Box::new);
    let mut relay = Relay {
        mask,
        shared: shared.clone(),
        session: session.clone(),
        identity,
        policy_identity,
        check: SessionCheck::new(access_generation, grant, shared.cfg.auth.leeway_secs),
        sql_prepared: HashMap::new(),
        database,
        client: peer.audit_client(),
        stmts: HashMap::new(),
        portals: HashMap::new(),
        pending: VecDeque::new(),
        tx_status: up.tx_status,
        nonce: new_session_id(),
        terminated: false,
        end_reason: None,
        keep_upstream: shared.pool.enabled(),
        detach: false,
        unsynced: false,
        upstream_fd: None,
        analyzed: Vec::new(),
        watch,
        watch_violation: None,
    };
    let kept = relay.run(stream, buf, up.stream, up.leftover).await;
    let cancelled = shared.cancels.remove(pid, key);
    let kept = kept.map(|(stream, leftover)| upstream::Upstream {
        stream,
        leftover,
        params: up.params,
        backend_pid: up.backend_pid,
        backend_key: up.backend_key,
        tx_status: relay.tx_status,
    });
    shared.pool.session_ended(pool_key, kept, cancelled);

    let mut end = relay.record(Kind::SessionEnd);
    end.error = relay.end_reason.clone();
    shared.audit.append(end);
    tracing::info!(reason = relay.end_reason.as_deref().unwrap_or("client closed"), "session ended");
    Some(())
}

/// `meta` of the login record: the role the session got, the grant that gave it, and the
/// upstream backend (its pid, and whether the connection came from the pool).
fn login_meta(
    shared: &Shared,
    identity: &Identity,
    policy_identity: &Identity,
    grant: Option<&SessionGrant>,
    backend_pid: i32,
    reused: bool,
) -> Option<serde_json::Value> {
    let role = match grant {
        Some(g) => Some(g.role.clone()),
        None => shared.policy.role_for(identity),
    };
    let mut m = serde_json::Map::new();
    m.insert("upstream".into(), serde_json::json!({ "pid": backend_pid, "reused": reused }));
    if let Some(r) = role {
        m.insert("role".into(), r.into());
    }
    if let Some(g) = grant {
        m.insert("grant".into(), g.id.clone().into());
        m.insert("grant_expires".into(), crate::access::rfc3339(g.expires_at).into());
        if policy_identity.groups != identity.groups {
            m.insert("policy_groups".into(), policy_identity.groups.clone().into());
        }
    }
    Some(serde_json::Value::Object(m))
}

/// What a forwarded client frame is waiting for from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendKind {
    Parse,
    Bind,
    Describe,
    Close,
    Execute,
    Query,
    FunctionCall,
    Sync,
}

#[derive(Debug)]
struct Pending {
    kind: PendKind,
    /// seq of the statement record (Execute/Query/FunctionCall), 0 if none.
    seq: u64,
    started: Instant,
    /// If set, the frame was replaced by a failing marker; rewrite its error into this.
    refusal: Option<(&'static str, String)>,
    /// Index into the batch's record receivers (before durability), usize::MAX if none.
    rec_idx: usize,
    /// What masking knows about this frame (statement lineage, portal, described statement).
    mask: crate::mask::relay::Tag,
}

impl Pending {
    fn new(kind: PendKind) -> Pending {
        Pending { kind, seq: 0, started: Instant::now(), refusal: None, rec_idx: usize::MAX, mask: Default::default() }
    }
    fn is_sync_point(&self) -> bool {
        matches!(self.kind, PendKind::Sync | PendKind::Query | PendKind::FunctionCall)
    }
}

/// A Parse the session forwarded: its text and the policy rule that allowed it.
#[derive(Debug, Clone)]
struct Prepared {
    sql: Arc<str>,
    rule: Arc<str>,
    unparsable: bool,
}

#[derive(Debug, Clone)]
struct Portal {
    stmt: Prepared,
    params: Vec<Option<String>>,
}

type DurableFuture = Pin<Box<dyn Future<Output = Result<Vec<u64>, String>> + Send>>;

enum End {
    Client,
    Upstream,
    Fatal(&'static str, String),
    /// Terminate with a clean upstream (pooling): close the client, keep the upstream.
    Detach,
}

struct Relay {
    shared: Arc<Shared>,
    session: String,
    /// Who the token says the user is (what the audit records carry).
    identity: Identity,
    /// Whom the policy decides for: `identity`, or under a JIT grant, with the policy groups
    /// that have the granted role.
    policy_identity: Identity,
    /// Token expiry, revocation, grant expiry: checked before every statement.
    check: SessionCheck,
    /// SQL-level `PREPARE name AS …` texts the session saw allowed (name as Postgres folds
    /// it); None once a name was prepared again with another text (which one Postgres kept is
    /// unknown, so `EXECUTE name` is then decided as an unknown prepared statement).
    sql_prepared: HashMap<String, Option<Arc<str>>>,
    database: String,
    client: Client,
    stmts: HashMap<String, Prepared>,
    portals: HashMap<String, Portal>,
    pending: VecDeque<Pending>,
    tx_status: u8,
    nonce: String,
    terminated: bool,
    /// What the server must keep reporting ([`crate::param_watch`]).
    watch: crate::param_watch::ParamWatch,
    /// A ParameterStatus that broke it: the session ends with this message.
    watch_violation: Option<String>,
    end_reason: Option<String>,
    /// Session pooling is on: a clean end hands the upstream connection back instead of
    /// closing it (Terminate is then not forwarded).
    keep_upstream: bool,
    /// The client sent Terminate while the upstream was clean: end and hand it back.
    detach: bool,
    /// An extended-protocol message was forwarded and its Sync not yet (the server may be
    /// inside an implicit transaction or a COPY): the connection is not clean.
    unsynced: bool,
    /// Masking state; None when no mask rule applies to the session (rows are never decoded).
    mask: Option<Box<crate::mask::relay::MaskRelay>>,
    /// A dup of the upstream socket for [`HeldSend`] (plaintext upstream, writer threads on).
    upstream_fd: Option<Arc<std::os::fd::OwnedFd>>,
    /// Long texts of the client bytes being processed, analyzed on the blocking pool
    /// ([`Relay::analyze_ahead`]).
    analyzed: Vec<(Arc<str>, crate::policy::Analysis)>,
}

/// Query and Parse texts at least this long that the policy has not analyzed yet are parsed
/// on tokio's blocking pool, not on the event loop: parsing costs in the order of a
/// microsecond per byte (a long multi-row INSERT would stall every other session on its
/// loop), while handing a text over costs two thread wakeups, too much for short texts.
const ANALYZE_AHEAD_BYTES: usize = 8 * 1024;

/// A complete Query or Parse frame (tag, whole message) whose body is [`ANALYZE_AHEAD_BYTES`]
/// or more: its text is worth analyzing off the loop ([`Relay::analyze_ahead`]).
fn is_long_text(tag: u8, raw: &[u8]) -> bool {
    raw.len() >= 5 + ANALYZE_AHEAD_BYTES && matches!(tag, b'Q' | b'P')
}

impl Relay {
    fn record(&self, kind: Kind) -> Record {
        Record {
            kind,
            session: Some(self.session.clone()),
            user: Some(self.identity.user.clone()),
            groups: Some(self.identity.groups.clone()),
            client: Some(self.client.clone()),
            database: Some(self.database.clone()),
            ..Default::default()
        }
    }

    /// Relay until the session ends. Returns the upstream connection (and bytes read past the
    /// last frame) when pooling is on and the session ended cleanly: the client sent
    /// Terminate or closed at a message boundary, no response is pending, no extended-protocol
    /// message waits for its Sync, and the last ReadyForQuery said idle. Otherwise the upstream
    /// is closed here (Postgres rolls back whatever was open).
    async fn run(&mut self, client: BoxStream, mut cbuf: BytesMut, upstream: BoxStream, mut ubuf: BytesMut) -> Option<(BoxStream, BytesMut)> {
        if self.shared.audit.runs_hooks() {
            self.upstream_fd = upstream.plain_fd().and_then(|fd| fd.try_clone_to_owned().ok()).map(Arc::new);
        }
        let (mut crd, mut cwr) = tokio::io::split(client);
        let (mut urd, mut uwr) = tokio::io::split(upstream);
        cbuf.reserve(16 * 1024);
        ubuf.reserve(64 * 1024);
        let mut cout = BytesMut::with_capacity(64 * 1024);
        let mut uout = BytesMut::with_capacity(16 * 1024);
        let mut batch: Option<Batch> = None;
        let mut durable: Option<DurableFuture> = None;
        let mut client_eof = false;
        // Client bytes (or its end) read while a batch was outstanding: dealt with once the
        // batch is released (their records come after its records).
        let mut unread = !cbuf.is_empty();

        let mut end: Option<End> = None;
        if !ubuf.is_empty() {
            // Frames that arrived with the upstream's login.
            self.on_upstream_data(&mut ubuf, &mut cout);
            if let Some(msg) = self.watch_violation.take() {
                end = Some(End::Fatal("42501", format!("pgward: {msg}")));
            }
        }

        while end.is_none() {
            if unread && durable.is_none() {
                unread = false;
                if !cbuf.is_empty() {
                    // Checked before building analyze_ahead's future: off the common path.
                    if wire::complete_frames(&cbuf).any(|(tag, raw)| is_long_text(tag, raw)) {
                        self.analyze_ahead(&cbuf).await;
                    }
                    let r = self.on_client_data(&mut cbuf, &mut uout, !client_eof);
                    self.analyzed.clear();
                    match r {
                        Ok(Some(mut b)) => {
                            durable = Some(Self::await_records(&mut b));
                            batch = Some(b);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            end = Some(e);
                            break;
                        }
                    }
                }
            }
            if client_eof && durable.is_none() {
                end = Some(End::Client);
                break;
            }
            if self.detach && uout.is_empty() && durable.is_none() {
                end = Some(End::Detach);
                break;
            }
            // While a batch is outstanding the client is still read (once): the writer may
            // have sent the batch without waking this loop.
            let read_client = !client_eof && !self.terminated && !unread && uout.len() < HIGH_WATER;
            let read_upstream = cout.len() < HIGH_WATER;
            tokio::select! {
                r = crd.read_buf(&mut cbuf), if read_client => {
                    if matches!(r, Ok(0) | Err(_)) {
                        client_eof = true;
                    }
                    // Claim a batch the writer sent; otherwise have it tell us.
                    if batch.as_ref().is_some_and(Batch::sent_or_ask)
                        && let (Some(f), Some(mut b)) = (durable.take(), batch.take())
                    {
                        let r = Self::claim_sent(f, &mut b).await;
                        self.release_batch(b, r, &mut uout);
                    }
                    unread = true;
                },
                r = urd.read_buf(&mut ubuf), if read_upstream => match r {
                    Ok(0) | Err(_) => end = Some(End::Upstream),
                    Ok(_) => {
                        // The writer sent the held batch and Postgres may already be answering
                        // it: its pendings must be queued first. Its records are durable, so
                        // the answer is (about to be) there.
                        if batch.as_ref().is_some_and(Batch::was_sent)
                            && let (Some(f), Some(mut b)) = (durable.take(), batch.take())
                        {
                            let r = Self::claim_sent(f, &mut b).await;
                            self.release_batch(b, r, &mut uout);
                        }
                        self.on_upstream_data(&mut ubuf, &mut cout);
                        if let Some(msg) = self.watch_violation.take() {
                            end = Some(End::Fatal("42501", format!("pgward: {msg}")));
                        }
                    }
                },
                r = async { match durable.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if durable.is_some() => {
                    durable = None;
                    if let Some(b) = batch.take() {
                        self.release_batch(b, r, &mut uout);
                    }
                },
                r = cwr.write(&cout), if !cout.is_empty() => match r {
                    Ok(0) | Err(_) => end = Some(End::Client),
                    Ok(n) => {
                        let _ = cout.split_to(n);
                        if cout.is_empty() && cwr.flush().await.is_err() { end = Some(End::Client); }
                    }
                },
                r = uwr.write(&uout), if !uout.is_empty() => match r {
                    Ok(0) | Err(_) => end = Some(End::Upstream),
                    Ok(n) => {
                        let _ = uout.split_to(n);
                        if uout.is_empty() && uwr.flush().await.is_err() { end = Some(End::Upstream); }
                    }
                },
            }
        }

        // Nothing of the session's own may go upstream ahead of (or after) a held batch the
        // writer might still send: take it back first.
        drop(batch);
        match end {
            Some(End::Detach) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = cwr.write_all(&cout).await;
                    let _ = cwr.shutdown().await;
                })
                .await;
                if self.upstream_clean() {
                    return Some((urd.unsplit(uwr), ubuf));
                }
                let mut t = BytesMut::new();
                wire::message(&mut t, b'X', &[]);
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = uwr.write_all(&t).await;
                    let _ = uwr.shutdown().await;
                })
                .await;
            }
            Some(End::Client)
                if self.keep_upstream
                    && (self.detach || !self.terminated)
                    && cbuf.is_empty()
                    && uout.is_empty()
                    && durable.is_none()
                    && self.upstream_clean() =>
            {
                // Gone at a message boundary with nothing outstanding: keep the upstream.
                if !self.terminated {
                    self.end_reason = Some("client disconnected without Terminate".into());
                }
                return Some((urd.unsplit(uwr), ubuf));
            }
            Some(End::Client) | None => {
                // Tell the upstream we are done (Terminate), best effort.
                let mut t = BytesMut::new();
                if !self.terminated {
                    wire::message(&mut t, b'X', &[]);
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = uwr.write_all(&uout).await;
                    let _ = uwr.write_all(&t).await;
                    let _ = uwr.shutdown().await;
                })
                .await;
                if !self.terminated {
                    self.end_reason = Some("client disconnected without Terminate".into());
                }
            }
            Some(End::Upstream) => {
                if !self.terminated {
                    wire::error_response(&mut cout, "FATAL", "08006", "pgward: connection to the database server was lost");
                    self.end_reason = Some("database connection lost".into());
                }
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = cwr.write_all(&cout).await;
                    let _ = cwr.shutdown().await;
                })
                .await;
            }
            Some(End::Fatal(code, msg)) => {
                tracing::info!(code, %msg, "ending session");
                wire::error_response(&mut cout, "FATAL", code, &msg);
                self.end_reason = Some(format!("{code}: {msg}"));
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = cwr.write_all(&cout).await;
                    let _ = cwr.shutdown().await;
                    let mut t = BytesMut::new();
                    wire::message(&mut t, b'X', &[]);
                    let _ = uwr.write_all(&t).await;
                })
                .await;
            }
        }
        None
    }

    /// Nothing outstanding upstream: no response pending, no unsynced extended-protocol
    /// message, idle (not in a transaction block or a failed one).
    fn upstream_clean(&self) -> bool {
        self.pending.is_empty() && !self.unsynced && self.tx_status == b'I'
    }

    /// Take back a batch the writer sent and collect its records' outcome. Its records are
    /// durable (the writer sends only then), so the outcome is there or about to be: a waiter
    /// the writer kept is told by the claim. The records are polled once with a no-op waker
    /// first, so that telling them does not schedule this task again for nothing.
    async fn claim_sent(mut f: DurableFuture, b: &mut Batch) -> Result<Vec<u64>, String> {
        let now = {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            let first = f.as_mut().poll(&mut cx);
            b.claim();
            match first {
                std::task::Poll::Ready(r) => Some(r),
                std::task::Poll::Pending => match f.as_mut().poll(&mut cx) {
                    std::task::Poll::Ready(r) => Some(r),
                    std::task::Poll::Pending => None,
                },
            }
        };
        match now {
            Some(r) => r,
            // The writer tells this waiter itself, any moment now.
            None => f.await,
        }
    }

    /// A future resolving once every record of the batch is durable (their seqs), or the
    /// first failure.
    fn await_records(b: &mut Batch) -> DurableFuture {
        let receivers = std::mem::take(&mut b.receivers);
        Box::pin(async move {
            let mut seqs = Vec::with_capacity(receivers.len());
            for r in receivers {
                match r.await {
                    Ok(Ok(seq)) => seqs.push(seq),
                    Ok(Err(e)) => return Err(e.to_string()),
                    Err(_) => return Err("the audit writer stopped".to_string()),
                }
            }
            Ok(seqs)
        })
    }

    /// Split the client's buffered bytes into frames and decide what to do with each.
    /// Frames without records go straight into `uout` when nothing is staged; otherwise a
    /// batch is returned that waits for durability.
    fn on_client_data(&mut self, cbuf: &mut BytesMut, uout: &mut BytesMut, client_open: bool) -> Result<Option<Batch>, End> {
        let mut batch = Batch::default();
        if let Err(e) = self.split_client_frames(cbuf, &mut batch) {
            // What was read before the bad frame is still audited (it never runs).
            self.submit_records(&mut batch, false, false);
            return Err(e);
        }
        if batch.records.is_empty() && batch.pendings.iter().all(|p| p.rec_idx == usize::MAX) {
            for (f, _) in &batch.frames {
                uout.extend_from_slice(&f.raw);
            }
            self.pending.extend(std::mem::take(&mut batch.pendings));
            return Ok(None);
        }
        // The writer may send the batch only if it would go out first.
        self.submit_records(&mut batch, uout.is_empty(), client_open);
        Ok(Some(batch))
    }

    fn split_client_frames(&mut self, cbuf: &mut BytesMut, batch: &mut Batch) -> Result<(), End> {
        loop {
            let f = match wire::split_frame(cbuf, wire::MAX_FRAME) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(End::Fatal("08P01", format!("pgward: {e}"))),
            };
            let before = batch.pendings.len();
            let peek = self.mask.is_some().then(|| f.clone());
            self.on_client_frame(f, batch)?;
            if let (Some(m), Some(f)) = (self.mask.as_mut(), peek) {
                let tag = m.on_client_frame(&f);
                if let Some(p) = batch.pendings[before..].last_mut() {
                    p.mask = tag;
                }
            }
            if self.terminated {
                break;
            }
        }
        Ok(())
    }

    /// Submit the batch's statement records in order. With `hold`, and a socket to send on, the
    /// last record carries a [`HeldSend`] of the batch's frames — unless an earlier record was
    /// refused at once (the later one could then be durable while it never is). `client_open`:
    /// the client may still send (so the writer may keep quiet, see [`HeldState`]).
    fn submit_records(&self, batch: &mut Batch, hold: bool, client_open: bool) {
        let n = batch.records.len();
        let mut all_queued = true;
        for (i, rec) in std::mem::take(&mut batch.records).into_iter().enumerate() {
            let held = match &self.upstream_fd {
                Some(fd) if hold && all_queued && i + 1 == n => {
                    let len = batch.frames.iter().map(|(f, _)| f.raw.len()).sum();
                    let mut bytes = BytesMut::with_capacity(len);
                    append_unsent(&batch.frames, 0, &mut bytes);
                    // Quiet only while the session still reads the client (which may owe
                    // the Sync that makes Postgres answer).
                    let quiet = client_open && !self.terminated;
                    Some(Arc::new(HeldSend::new(fd.clone(), bytes.freeze(), quiet)))
                }
                _ => None,
            };
            let hook = held.clone().map(|h| h as Arc<dyn crate::audit::OnDurable>);
            let (rx, queued) = self.shared.audit.submit_then(rec, hook);
            all_queued &= queued;
            if queued {
                batch.held = held;
            }
            batch.receivers.push(rx);
        }
    }

    /// Before any statement: the token is unexpired and not revoked, and a grant the session
    /// runs under is neither expired nor revoked. Otherwise the session ends (FATAL).
    fn check_token(&mut self) -> Result<(), End> {
        self.check
            .check(&self.shared.access, &self.identity, now_unix())
            .map_err(|r| End::Fatal(r.sqlstate(), r.to_string()))
    }

    /// The text `EXECUTE name` runs, if the session knows it: an SQL-level PREPARE, else a
    /// protocol-level Parse of that name (they share Postgres's namespace).
    fn lookup_prepared(&self, name: &str) -> Option<String> {
        match self.sql_prepared.get(name) {
            Some(Some(t)) => Some(t.to_string()),
            Some(None) => None,
            None => self.stmts.get(name).filter(|_| !name.is_empty()).map(|p| p.sql.to_string()),
        }
    }

    /// Remember the PREPAREs and DEALLOCATEs of an allowed (forwarded) query.
    fn note_prepared(&mut self, v: &Verdict) {
        for s in &v.statements {
            match prepared_note(&s.info) {
                Some(PreparedNote::Prepare(name, text)) => {
                    let known = self.stmts.get(&name).map(|p| p.sql.clone());
                    let e = self.sql_prepared.entry(name).or_insert_with(|| Some(text.clone()));
                    if e.as_deref() != Some(&*text) || known.is_some_and(|k| *k != *text) {
                        *e = None;
                    }
                }
                Some(PreparedNote::Deallocate(name)) => {
                    self.sql_prepared.remove(&name);
                }
                Some(PreparedNote::DeallocateAll) => self.sql_prepared.clear(),
                None => {}
            }
        }
    }

    fn on_client_frame(&mut self, f: Frame, batch: &mut Batch) -> Result<(), End> {
        let bad = |e: WireError| End::Fatal(e.sqlstate(), format!("pgward: {e}"));
        match f.tag {
            b'P' | b'B' | b'E' | b'D' | b'C' => self.unsynced = true,
            b'S' => self.unsynced = false,
            _ => {}
        }
        match f.tag {
            b'Q' => {
                self.check_token()?;
                let sql = match wire::decode_query(&f, self.watch.encoding()) {
                    Err(WireError::Encoding(at)) => {
                        self.refuse_undecodable(&f, at, batch);
                        return Ok(());
                    }
                    r => r.map_err(bad)?,
                };
                let mut rec = self.record(Kind::Statement);
                rec.protocol = Some("simple".into());
                let mut p = Pending::new(PendKind::Query);
                let verdict = self.strict_masking(&sql, self.decide(&sql));
                rec.sql = Some(sql.to_string());
                let allowed = Self::apply_verdict(&mut rec, &mut p, &verdict);
                if allowed {
                    self.note_prepared(&verdict);
                }
                let frame = if allowed { f } else { self.marker_query() };
                batch.push_statement(frame, rec, p);
            }
            b'P' => {
                self.check_token()?;
                let (name, sql) = match wire::decode_parse(&f, self.watch.encoding()) {
                    Err(WireError::Encoding(at)) => {
                        self.refuse_undecodable(&f, at, batch);
                        return Ok(());
                    }
                    r => r.map_err(bad)?,
                };
                let verdict = self.strict_masking(&sql, self.decide(&sql));
                if verdict.is_allowed() {
                    self.note_prepared(&verdict);
                    let prepared =
                        Prepared { sql: Arc::from(sql.as_ref()), rule: Arc::from(verdict.rule.as_str()), unparsable: verdict.unparsable };
                    self.stmts.insert(name.to_string(), prepared);
                    batch.frames.push((f, None));
                    batch.pendings.push(Pending::new(PendKind::Parse));
                } else {
                    // Denied at Parse: audited now (it will never execute), and the Parse is
                    // replaced by one that fails upstream so Postgres skips to Sync itself.
                    let mut rec = self.record(Kind::Statement);
                    rec.protocol = Some("extended".into());
                    rec.sql = Some(sql.to_string());
                    let mut p = Pending::new(PendKind::Parse);
                    Self::apply_verdict(&mut rec, &mut p, &verdict);
                    let marker = self.marker_parse(&name);
                    self.stmts.remove(name.as_ref());
                    batch.push_statement(marker, rec, p);
                }
            }
            b'B' => {
                let b = wire::decode_bind(&f).map_err(bad)?;
                let stmt = self.stmts.get(b.statement.as_ref()).cloned().unwrap_or_else(|| Prepared {
                    sql: Arc::from(""),
                    rule: Arc::from("unknown-statement"),
                    unparsable: false,
                });
                let params = b.params.iter().map(|(fmt, v)| wire::render_param(*fmt, *v)).collect();
                self.portals.insert(b.portal.to_string(), Portal { stmt, params });
                batch.frames.push((f, None));
                batch.pendings.push(Pending::new(PendKind::Bind));
            }
            b'E' => {
                self.check_token()?;
                let portal = wire::decode_execute(&f).map_err(bad)?;
                let mut rec = self.record(Kind::Statement);
                rec.protocol = Some("extended".into());
                rec.decision = Some("allow".into());
                match self.portals.get(portal.as_ref()) {
                    Some(p) => {
                        rec.sql = Some(p.stmt.sql.to_string());
                        rec.params = Some(p.params.clone());
                        rec.rule = Some(p.stmt.rule.to_string());
                        if p.stmt.unparsable {
                            rec.meta = Some(serde_json::json!({ "unparsable": true }));
                        }
                    }
                    // Postgres will answer 34000 (no such portal); nothing runs.
                    None => {
                        rec.sql = Some(String::new());
                        rec.rule = Some("unknown-portal".into());
                    }
                }
                let p = Pending::new(PendKind::Execute);
                batch.push_statement(f, rec, p);
            }
            b'D' => {
                wire::decode_close_or_describe(&f).map_err(bad)?;
                batch.frames.push((f, None));
                batch.pendings.push(Pending::new(PendKind::Describe));
            }
            b'C' => {
                let (kind, name) = wire::decode_close_or_describe(&f).map_err(bad)?;
                if kind == b'S' {
                    self.stmts.remove(name.as_ref());
                } else {
                    self.portals.remove(name.as_ref());
                }
                batch.frames.push((f, None));
                batch.pendings.push(Pending::new(PendKind::Close));
            }
            b'S' => {
                batch.frames.push((f, None));
                batch.pendings.push(Pending::new(PendKind::Sync));
            }
            b'H' | b'd' | b'c' | b'f' => batch.frames.push((f, None)),
            b'F' => {
                self.check_token()?;
                let (oid, args) = wire::decode_function_call(&f).map_err(bad)?;
                let mut rec = self.record(Kind::Statement);
                rec.protocol = Some("function_call".into());
                rec.sql = Some(format!("-- fastpath function call: oid {oid}"));
                rec.params = Some(args);
                let mut p = Pending::new(PendKind::FunctionCall);
                let verdict = self.shared.policy.decide_function_call(&self.policy_identity, &self.database, oid, chrono::Utc::now());
                let frame = if Self::apply_verdict(&mut rec, &mut p, &verdict) { f } else { self.marker_function_call() };
                batch.push_statement(frame, rec, p);
            }
            b'X' => {
                self.terminated = true;
                self.end_reason = None;
                // Pooling: a Terminate on its own, with nothing outstanding, is not forwarded;
                // the upstream goes back to the pool (reset there). Else Postgres gets it.
                if self.keep_upstream && batch.frames.is_empty() && batch.pendings.is_empty() && self.upstream_clean() {
                    self.detach = true;
                } else {
                    batch.frames.push((f, None));
                }
            }
            other => {
                return Err(End::Fatal("08P01", format!("pgward: invalid frontend message type {:?}", other as char)));
            }
        }
        Ok(())
    }

    /// The policy's verdict on a Query's or Parse's text, for this session's effective
    /// identity, with `EXECUTE name` resolved through the session's prepared statements.
    fn decide(&self, sql: &str) -> Arc<Verdict> {
        let lookup = |name: &str| self.lookup_prepared(name);
        let now = chrono::Utc::now();
        match self.analyzed.iter().find(|(text, _)| **text == *sql) {
            Some((_, a)) => self.shared.policy.decide_analyzed(a, &self.policy_identity, &self.database, now, &lookup),
            None => self.shared.policy.decide_with_prepared(&self.policy_identity, &self.database, sql, now, &lookup),
        }
    }

    /// A statement the policy allows may still be refused by strict masking (`mask::strict`):
    /// the verdict then names the mask rules and why.
    fn strict_masking(&mut self, sql: &str, verdict: Arc<Verdict>) -> Arc<Verdict> {
        if !verdict.is_allowed() {
            return verdict;
        }
        let Some(m) = self.mask.as_mut() else { return verdict };
        let Some(v) = m.strict_check(sql) else { return verdict };
        let (rule, reason) = m.refusal_message(&v);
        Arc::new(Verdict { decision: crate::policy::Action::Deny, rule, reason, ..(*verdict).clone() })
    }

    /// Analyze the long Query and Parse texts among the complete frames in `cbuf` that the
    /// policy would parse ([`ANALYZE_AHEAD_BYTES`]) on tokio's blocking pool, while this
    /// session waits and the loop relays the others; [`Relay::decide`] then decides them with
    /// that analysis. Frames are only peeked at: `on_client_data` reads them as always (and
    /// rejects what is malformed). A text whose analysis fails here is analyzed there.
    async fn analyze_ahead(&mut self, cbuf: &[u8]) {
        for (tag, raw) in wire::complete_frames(cbuf).filter(|&(tag, raw)| is_long_text(tag, raw)) {
            let f = Frame { tag, raw: Bytes::copy_from_slice(raw) };
            let text: Arc<str> = match tag {
                b'Q' => match wire::decode_query(&f, self.watch.encoding()) {
                    Ok(t) => Arc::from(t.as_ref()),
                    Err(_) => continue,
                },
                _ => match wire::decode_parse(&f, self.watch.encoding()) {
                    Ok((_, t)) => Arc::from(t.as_ref()),
                    Err(_) => continue,
                },
            };
            if self.analyzed.iter().any(|(t, _)| *t == text) || !self.shared.policy.would_parse(&text) {
                continue;
            }
            let (shared, t) = (self.shared.clone(), text.clone());
            if let Ok(a) = tokio::task::spawn_blocking(move || shared.policy.analysis(&t)).await {
                crate::metrics::METRICS.statements_analyzed_off_loop.inc();
                self.analyzed.push((text, a));
            }
        }
    }

    /// Put the verdict into the statement record; for a denial, set the pending's refusal
    /// (42501 naming the rule). Returns whether the statement may go upstream as sent.
    /// A Query or Parse whose text is not valid in the client's encoding: never decided on and
    /// never forwarded. In its place goes a marker that fails upstream, so Postgres does the
    /// transaction and pipeline bookkeeping; the client gets ERROR 22021, as from Postgres
    /// itself, and the session goes on. Audited as denied (`builtin:encoding`).
    fn refuse_undecodable(&mut self, f: &Frame, at: usize, batch: &mut Batch) {
        let (kind, name, raw) = if f.tag == b'Q' {
            (PendKind::Query, String::new(), f.body())
        } else {
            let mut r = wire::Reader::new(f.body());
            let name = r.cstr().map(|n| n.into_owned()).unwrap_or_default();
            (PendKind::Parse, name, r.rest())
        };
        let mut rec = self.record(Kind::Statement);
        rec.protocol = Some(if kind == PendKind::Query { "simple" } else { "extended" }.into());
        rec.sql = Some(String::from_utf8_lossy(raw.split(|&b| b == 0).next().unwrap_or(&[])).into_owned());
        rec.decision = Some("deny".into());
        rec.rule = Some("builtin:encoding".into());
        let mut p = Pending::new(kind);
        let enc = self.watch.encoding_name();
        p.refusal = Some((
            sqlstate::CHARACTER_NOT_IN_REPERTOIRE,
            format!("pgward: invalid byte sequence for encoding \"{enc}\" at byte {at} of the statement text"),
        ));
        let marker = if kind == PendKind::Query {
            self.marker_query()
        } else {
            self.stmts.remove(name.as_str());
            self.marker_parse(&name)
        };
        batch.push_statement(marker, rec, p);
    }

    fn apply_verdict(rec: &mut Record, p: &mut Pending, v: &Verdict) -> bool {
        rec.rule = Some(v.rule.clone());
        if v.unparsable {
            rec.meta = Some(serde_json::json!({ "unparsable": true }));
        }
        if v.is_allowed() {
            rec.decision = Some("allow".into());
            true
        } else {
            rec.decision = Some("deny".into());
            p.refusal = Some(("42501", format!("pgward: permission denied by policy rule \"{}\": {}", v.rule, v.reason)));
            false
        }
    }

    /// A Parse of `name` whose text fails to parse upstream, standing in for a denied Parse.
    fn marker_parse(&self, name: &str) -> Frame {
        use bytes::BufMut;
        let mut body = BytesMut::new();
        body.put_slice(name.as_bytes());
        body.put_u8(0);
        body.put_slice(format!("pgward_refused_{} !", self.nonce).as_bytes());
        body.put_u8(0);
        body.put_i16(0);
        let mut b = BytesMut::new();
        wire::message(&mut b, b'P', &body);
        Frame { tag: b'P', raw: b.freeze() }
    }

    /// A query that fails to parse upstream, standing in for a refused statement.
    fn marker_query(&self) -> Frame {
        let mut b = BytesMut::new();
        wire::query(&mut b, &format!("pgward_refused_{} !", self.nonce));
        Frame { tag: b'Q', raw: b.freeze() }
    }

    fn marker_execute(&self) -> Frame {
        let mut b = BytesMut::new();
        wire::execute(&mut b, &format!("pgward_refused_{}", self.nonce));
        Frame { tag: b'E', raw: b.freeze() }
    }

    fn marker_function_call(&self) -> Frame {
        // A FunctionCall of OID 0 fails with "function with OID 0 does not exist".
        let mut b = BytesMut::new();
        wire::message(&mut b, b'F', &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        Frame { tag: b'F', raw: b.freeze() }
    }

    /// The batch's records are durable (or failed): forward it.
    fn release_batch(&mut self, mut b: Batch, result: Result<Vec<u64>, String>, uout: &mut BytesMut) {
        let sent = b.claim();
        let frames = std::mem::take(&mut b.frames);
        let mut pendings = std::mem::take(&mut b.pendings);
        let result = match result {
            Err(e) if sent > 0 => {
                // Cannot happen (the writer sends only what is durable), but the frames are
                // upstream: account for them as sent.
                tracing::error!(error = %e, "audit reported a failure for a batch already sent upstream");
                Ok(Vec::new())
            }
            r => r,
        };
        match result {
            Ok(seqs) => {
                for p in pendings.iter_mut() {
                    if let Some(s) = seqs.get(p.rec_idx) {
                        p.seq = *s;
                    }
                    p.started = Instant::now();
                }
                append_unsent(&frames, sent, uout);
            }
            Err(e) => {
                tracing::error!(error = %e, "audit append failed; refusing statements");
                let msg = format!("pgward: audit log unavailable, statement refused: {e}");
                for (f, pi) in &frames {
                    match pi {
                        Some(i) => {
                            let marker = match f.tag {
                                b'Q' => self.marker_query(),
                                b'E' => self.marker_execute(),
                                b'P' => {
                                    let name = wire::decode_parse(f, self.watch.encoding()).map(|(n, _)| n.into_owned()).unwrap_or_default();
                                    self.marker_parse(&name)
                                }
                                _ => self.marker_function_call(),
                            };
                            if let Some(p) = pendings.get_mut(*i) {
                                p.refusal = Some(("58030", msg.clone()));
                            }
                            uout.extend_from_slice(&marker.raw);
                        }
                        None => uout.extend_from_slice(&f.raw),
                    }
                }
            }
        }
        self.pending.extend(pendings);
    }

    fn result_record(&self, p: &Pending, tag: Option<&str>, rows: Option<u64>, err: Option<(&str, &str)>) {
        let masked = self.mask.as_ref().and_then(|m| m.take_meta());
        if p.seq == 0 {
            return;
        }
        let mut rec = self.record(Kind::Result);
        rec.statement_seq = Some(p.seq);
        rec.tag = tag.map(str::to_string);
        rec.rows = rows;
        rec.duration_us = Some(p.started.elapsed().as_micros() as u64);
        if let Some((code, msg)) = err {
            rec.sqlstate = Some(code.to_string());
            rec.error = Some(msg.to_string());
        }
        // Which columns were masked and how many values (never the values).
        if let Some(meta) = masked {
            rec.meta = Some(meta);
        }
        self.shared.audit.append(rec);
    }

    /// Process complete server frames: bookkeeping, rewriting, and copying to `cout`.
    fn on_upstream_data(&mut self, ubuf: &mut BytesMut, cout: &mut BytesMut) {
        loop {
            // Pass-through fast path: scan headers in place and copy runs of frames we don't
            // need to look at.
            let f = match wire::split_frame(ubuf, wire::MAX_FRAME) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "malformed message from the database server");
                    wire::error_response(cout, "FATAL", "08P01", "pgward: malformed message from the database server");
                    ubuf.clear();
                    self.terminated = true;
                    break;
                }
            };
            let f = match self.mask.as_mut() {
                // None: a DataRow / CopyData rewritten into `cout`. Some: the frame to go on with
                // (an ErrorResponse / NoticeResponse may come back with detected values masked).
                Some(m) => match m.on_server_frame(f, self.pending.front().map(|p| &p.mask), cout) {
                    Some(f) => f,
                    None => continue,
                },
                None => f,
            };
            match f.tag {
                b'1' => self.pop_kind(PendKind::Parse),
                b'2' => self.pop_kind(PendKind::Bind),
                b'3' => self.pop_kind(PendKind::Close),
                b'n' | b'T' => {
                    if self.pending.front().is_some_and(|p| p.kind == PendKind::Describe) {
                        self.pending.pop_front();
                    }
                }
                b'C' | b'I' | b's' => {
                    let (tag, rows) = if f.tag == b'C' {
                        match wire::decode_command_complete(&f) {
                            Ok((t, r)) => (Some(t.into_owned()), r),
                            Err(_) => (None, None),
                        }
                    } else if f.tag == b'I' {
                        (Some("EMPTY".to_string()), None)
                    } else {
                        (Some("SUSPENDED".to_string()), None)
                    };
                    if tag.as_deref().is_some_and(crate::policy_catalog::changes_functions) {
                        self.shared.fn_catalogs.reload(&self.shared, &self.database);
                    }
                    if let Some(p) = self.pending.front() {
                        match p.kind {
                            PendKind::Execute => {
                                self.result_record(p, tag.as_deref(), rows, None);
                                self.pending.pop_front();
                            }
                            PendKind::Query => {
                                self.result_record(p, tag.as_deref(), rows, None);
                                if let Some(p) = self.pending.front_mut() {
                                    p.started = Instant::now();
                                }
                            }
                            _ => {}
                        }
                    }
                }
                b'V' => {
                    if let Some(p) = self.pending.front().filter(|p| p.kind == PendKind::FunctionCall) {
                        self.result_record(p, Some("FUNCTION CALL"), None, None);
                    }
                }
                b'E' => {
                    let e = wire::decode_error(&f);
                    let mut rewritten: Option<Bytes> = None;
                    if let Some(p) = self.pending.front() {
                        if let Some((code, msg)) = &p.refusal {
                            rewritten = Some(wire::error_response_bytes("ERROR", code, msg));
                            self.result_record(p, None, None, Some((code, msg)));
                        } else if matches!(p.kind, PendKind::Execute | PendKind::Query | PendKind::FunctionCall) {
                            self.result_record(p, None, None, Some((&e.code, &e.message)));
                        }
                        match p.kind {
                            PendKind::Query | PendKind::FunctionCall | PendKind::Sync => {}
                            _ => {
                                // Extended protocol: Postgres skips everything up to Sync.
                                self.pending.pop_front();
                                while let Some(q) = self.pending.front() {
                                    if q.is_sync_point() {
                                        break;
                                    }
                                    if q.kind == PendKind::Execute {
                                        self.result_record(q, None, None, Some(("", "not executed: an earlier message in the pipeline failed")));
                                    }
                                    self.pending.pop_front();
                                }
                            }
                        }
                    }
                    match rewritten {
                        Some(b) => cout.extend_from_slice(&b),
                        None => cout.extend_from_slice(&f.raw),
                    }
                    continue;
                }
                b'S' => {
                    let (name, value) = wire::decode_parameter_status(&f);
                    if let Err(msg) = self.watch.check(&name, &value) {
                        // Nothing after this report reaches the client; the relay loop ends
                        // the session before it forwards another statement.
                        tracing::error!(%msg, "server reported an unexpected setting; ending the session");
                        self.watch_violation = Some(msg);
                        ubuf.clear();
                        break;
                    }
                }
                b'Z' => {
                    self.tx_status = f.body().first().copied().unwrap_or(b'I');
                    while let Some(p) = self.pending.pop_front() {
                        if p.is_sync_point() {
                            break;
                        }
                        if p.kind == PendKind::Execute {
                            self.result_record(&p, None, None, Some(("", "not executed: an earlier message in the pipeline failed")));
                        }
                    }
                }
                _ => {}
            }
            cout.extend_from_slice(&f.raw);
        }
    }

    fn pop_kind(&mut self, kind: PendKind) {
        if self.pending.front().is_some_and(|p| p.kind == kind) {
            self.pending.pop_front();
        }
    }
}

/// SQLSTATEs the session answers with itself.
mod sqlstate {
    pub const CHARACTER_NOT_IN_REPERTOIRE: &str = "22021";
}

/// What an allowed statement does to the session's SQL-level prepared statements.
#[derive(Debug, PartialEq, Eq)]
enum PreparedNote {
    /// Name (as Postgres folds it) and the PREPARE statement's text.
    Prepare(String, Arc<str>),
    Deallocate(String),
    DeallocateAll,
}

fn prepared_note(info: &crate::policy::StatementInfo) -> Option<PreparedNote> {
    use crate::policy::PreparedOp;
    match info.prepared.as_ref()? {
        PreparedOp::Prepare(name) => Some(PreparedNote::Prepare(name.clone(), Arc::from(info.text.as_str()))),
        PreparedOp::Deallocate(name) => Some(PreparedNote::Deallocate(name.clone())),
        PreparedOp::DeallocateAll => Some(PreparedNote::DeallocateAll),
    }
}

#[cfg(test)]
mod prepared_tests {
    use super::*;

    fn notes(sql: &str) -> Vec<Option<PreparedNote>> {
        crate::policy::analyze_sql(sql).iter().map(prepared_note).collect()
    }

    #[test]
    fn what_the_writer_did_not_send_follows_in_order() {
        let frame = |s: &str| (Frame { tag: b'Q', raw: Bytes::copy_from_slice(s.as_bytes()) }, None);
        let frames = vec![frame("abc"), frame("de"), frame("fghi")];
        for (sent, want) in
            [(0, "abcdefghi"), (1, "bcdefghi"), (3, "defghi"), (4, "efghi"), (5, "fghi"), (8, "i"), (9, ""), (12, "")]
        {
            let mut out = BytesMut::from(&b">"[..]);
            append_unsent(&frames, sent, &mut out);
            assert_eq!(&out[..], format!(">{want}").as_bytes(), "sent {sent}");
        }
    }

    #[test]
    fn a_held_batch_claimed_first_is_never_sent() {
        let (a, mut b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let fd = Arc::new(std::os::fd::OwnedFd::from(a));
        let held = |s: &'static str, quiet: bool| HeldSend::new(fd.clone(), Bytes::from(s), quiet);
        use crate::audit::{OnDurable as _, Waiter};
        use std::io::Read as _;
        use tokio::sync::oneshot::error::TryRecvError;

        // Durable first, quiet: the writer sends it all and keeps the waiter untold; the
        // session's claim says what was sent and tells the waiter.
        let first = held("sent", true);
        let (w, mut rx) = Waiter::for_test(7);
        assert!(first.durable(w).is_none(), "kept");
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        assert!(first.sent_or_ask());
        assert_eq!(first.claim(), 4);
        assert_eq!(rx.try_recv().expect("told at the claim").expect("durable"), 7);
        let (w, _) = Waiter::for_test(8);
        assert!(first.durable(w).is_some(), "claimed: never again, the writer tells");

        // Not quiet (the client is gone), or asked to tell before the writer got to it: sent,
        // and the writer tells.
        for asked in [false, true] {
            let h = held("told", asked);
            if asked {
                assert!(!h.sent_or_ask(), "still held");
            }
            let (w, _) = Waiter::for_test(9);
            assert_eq!(h.durable(w).map(|w| w.seq()), Some(9));
            assert_eq!(h.claim(), 4);
        }

        // Claimed first (the session ended or was answered): nothing goes out, ever.
        let second = held("never", true);
        assert_eq!(second.claim(), 0);
        let (w, _) = Waiter::for_test(10);
        assert!(second.durable(w).is_some());
        // Every dup closed: the reader sees the end after what was sent.
        drop((fd, first, second));
        let mut got = Vec::new();
        b.read_to_end(&mut got).expect("read");
        assert_eq!(got, b"senttoldtold");
    }

    #[test]
    fn prepare_and_deallocate_names_are_folded() {
        let n = notes("PREPARE Q(int) AS SELECT $1; DEALLOCATE ALL; deallocate prepare \"X\"; EXECUTE q(1); PREPARE \"Mixed\" AS DELETE FROM t");
        assert!(matches!(&n[0], Some(PreparedNote::Prepare(name, text)) if name == "q" && text.contains("SELECT $1")), "{n:?}");
        assert_eq!(n[1], Some(PreparedNote::DeallocateAll));
        assert_eq!(n[2], Some(PreparedNote::Deallocate("X".into())));
        assert_eq!(n[3], None);
        assert!(matches!(&n[4], Some(PreparedNote::Prepare(name, _)) if name == "Mixed"), "{n:?}");
    }

    #[test]
    fn startup_settings_become_set_statements() {
        assert_eq!(startup_setting_sql("Search_Path", "a, b").as_deref(), Some("SET search_path TO 'a, b'"));
        assert_eq!(startup_setting_sql("myapp.x", "it's").as_deref(), Some("SET myapp.x TO 'it''s'"));
        assert_eq!(startup_setting_sql("a;b", "x"), None);
        assert_eq!(startup_setting_sql("a.b.c", "x"), None);
        assert_eq!(startup_setting_sql("", "x"), None);
    }
}
