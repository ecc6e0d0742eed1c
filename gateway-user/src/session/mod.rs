//! One client connection, start to end: startup (TLS, token; [`startup`]), the login ([`login`]:
//! access checks, startup parameters, the upstream), then the relay loop with write-ahead audit
//! (client frames in [`frontend`], server frames in [`backend`], batches held for durability in
//! [`held`]), and one shutdown path. This module owns the protocol state machine, not policy.
//!
//! Relay invariants (the durability contract, [`durability`]: no effect of a statement is
//! observable before its audit record is durable):
//! - Client frames are processed in batches (everything that arrived in one read). Frames that
//!   execute something (`Q`, `E`, `F`) get a `statement` record. Frames up to the first
//!   write-ahead one go upstream at once while their records are flushed; from it on the batch
//!   is held until every record of the session is durable. If the audit log refuses a record
//!   of a held frame, those frames are replaced by markers that fail upstream (so Postgres does
//!   the transaction/pipeline bookkeeping) and the resulting ErrorResponse is rewritten into
//!   pgward's own error; if it refuses one of a frame already sent, the session ends (FATAL
//!   58030) and Postgres rolls its open transaction back.
//! - Server bytes reach the client only once the records of every statement forwarded before
//!   them are durable ([`inflight`]); until then they wait, and the server is not read past
//!   the high-water mark.
//! - With a plaintext upstream and a writer thread (`fsync` = group or always), the audit writer
//!   sends a held batch upstream itself the moment its last record is durable ([`held::HeldSend`]),
//!   instead of waking this session's event loop to do it: one thread hop less per statement.
//!   Only when the whole batch is held and nothing else of the session is outstanding, and
//!   never after a failed sync; the session claims the batch back when told (sending whatever
//!   the writer could not), and before anything else of its own goes upstream. When the writer
//!   sent all of it, it does not wake the session either: the session claims the batch when
//!   Postgres answers or the client sends more, whichever comes first (client bytes read while
//!   the batch is still held wait, and the writer is then asked to tell).
//! - Every forwarded frame that expects an answer has a `Pending` entry in the protocol
//!   tracker; server answers pop them in order, which is how results are matched to statements.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::access::SessionCheck;
use crate::audit::{AuditHandle, Client, Kind, Record};
use crate::auth::{Identity, Verifier};
use crate::config::Config;
use crate::policy::Policy;
use crate::pool::PoolKey;
use crate::sqlstate;
use crate::upstream::{self, CancelMap, Target};
use crate::wire::{self, BoxStream};

mod backend;
mod copy_in;
mod durability;
mod frontend;
pub mod function_catalogs;
mod held;
mod inflight;
mod login;
mod marker;
mod sql_prepared;
mod startup;
mod tracked;

use held::Batch;
use inflight::{Failure, Inflight};
use login::LoggedIn;
use tracked::SessionTracker;

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
    pub access: Arc<crate::access::Access>,
    /// `[[mask]]` rules (see `mask`): applied to the results of sessions they cover.
    pub masks: Arc<crate::mask::MaskPolicy>,
    /// Idle upstream connections for reuse (see `pool`).
    pub pool: Arc<crate::pool::Pool>,
    /// Function catalogs for policy rules that name catalog function classes.
    pub fn_catalogs: self::function_catalogs::FunctionCatalogs,
    /// Room for large messages, shared by all sessions (`server.buffer_budget_bytes`).
    pub budget: wire::budget::Budget,
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
            Peer::Tcp(a, meta) => Client::Tcp { addr: a.to_string().into(), meta: meta.clone() },
            Peer::Unix { uid, pid } => Client::Unix { uid: *uid, pid: *pid },
        }
    }
}

/// Above this many buffered bytes in one direction, stop reading the other side.
const HIGH_WATER: usize = 256 * 1024;
/// Time the last bytes to either side get to go out when the session ends.
const SHUTDOWN_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// Room reserved up front for bytes read from the client.
const CLIENT_READ_BUF: usize = 16 * 1024;
/// Room reserved up front for bytes read from the server.
const UPSTREAM_READ_BUF: usize = 64 * 1024;
/// Initial capacity of the buffer of bytes going to the client.
const CLIENT_WRITE_BUF: usize = 64 * 1024;
/// Initial capacity of the buffer of bytes going to the server.
const UPSTREAM_WRITE_BUF: usize = 16 * 1024;

fn new_session_id() -> String {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        return uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    }
    hex::encode(b)
}

use crate::host::clock::now_unix;

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
    tracing::Instrument::instrument(run(shared, stream, peer, session), span).await;
}

async fn run(shared: Arc<Shared>, stream: BoxStream, peer: Peer, session: String) {
    let limit = shared.cfg.server.startup_timeout;
    let started = match tokio::time::timeout(limit, startup::startup(&shared, stream, &peer, &session)).await {
        Ok(Some(l)) => l,
        Ok(None) => return,
        Err(_) => {
            tracing::info!("startup timed out");
            return;
        }
    };
    let Some(logged_in) = login::login(&shared, &peer, &session, started).await else { return };
    let (relay, io) = Relay::start(shared, session, &peer, logged_in).await;
    relay.run(io).await;
}

/// Why the relay loop ended.
enum End {
    Client,
    Upstream,
    Fatal(&'static str, String),
    /// Terminate with a clean upstream (pooling): close the client, keep the upstream.
    Detach,
}

/// The upstream connection's identity outside its socket: what goes back to the pool with it,
/// and the cancel key the client was given for it.
struct Checkout {
    pool_key: PoolKey,
    params: Vec<(String, String)>,
    backend_pid: i32,
    backend_key: i32,
    /// pgward's BackendKeyData given to the client (mapped to the upstream's in the cancel map).
    cancel: (i32, i32),
}

/// The two connections a relay starts with, and the bytes read from each past the login.
struct Io {
    client: BoxStream,
    cbuf: BytesMut,
    upstream: BoxStream,
    ubuf: BytesMut,
}

/// The session's fields of its audit records (see [`Relay::record`]).
struct RecordIds {
    session: Arc<str>,
    user: Arc<str>,
    groups: Arc<[String]>,
    database: Arc<str>,
}

struct Relay {
    shared: Arc<Shared>,
    /// Who the token says the user is (what the audit records carry).
    identity: Identity,
    /// Whom the policy decides for: `identity`, or under a JIT grant, with the policy groups
    /// that have the granted role.
    policy_identity: Identity,
    /// Token expiry, revocation, grant expiry: checked before every statement.
    check: SessionCheck,
    /// SQL-level `PREPARE name AS …` texts the server confirmed (name as Postgres folds it).
    sql_prepared: sql_prepared::SqlPrepared,
    database: String,
    client: Client,
    /// What every record of the session carries, shared by them (no copy per record).
    ids: RecordIds,
    /// Prepared statements, portals, the answers the server owes, the transaction status.
    tracker: SessionTracker,
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
    /// Masking state; None when no mask rule applies to the session (rows are never decoded).
    mask: Option<Box<crate::mask::relay::MaskRelay>>,
    /// A dup of the upstream socket for [`held::HeldSend`] (plaintext upstream, writer threads on).
    upstream_fd: Option<Arc<std::os::fd::OwnedFd>>,
    /// Long texts of the client bytes being processed, analyzed on the blocking pool
    /// ([`Relay::analyze_ahead`]).
    analyzed: Vec<(Arc<str>, crate::policy::Analysis)>,
    checkout: Checkout,
    /// The transaction state as projected from what was forwarded ([`durability`]).
    tx: durability::TxState,
    /// Records not yet known durable, and the replies held for them.
    inflight: Inflight,
    /// The highest seq of a record the session submitted.
    last_seq: u64,
    /// A COPY FROM STDIN under way, for the Syncs and messages the client sends during it.
    copy_in: copy_in::CopyIn,
    /// Message limits and budget charges of what the client sends, and of what the server sends.
    client_in: wire::Inbound,
    upstream_in: wire::Inbound,
}

impl Relay {
    /// The relay for a logged-in session, with masking set up for its identity.
    async fn start(shared: Arc<Shared>, session: String, peer: &Peer, l: LoggedIn) -> (Relay, Io) {
        let mask = crate::mask::relay::MaskRelay::start(
            &shared.masks,
            &l.identity,
            &l.database,
            crate::mask::catalog::Access {
                target: shared.target.clone(),
                user: shared.cfg.upstream.user.clone(),
                password: shared.upstream_password.clone(),
            },
            {
                let (shared, database) = (shared.clone(), l.database.clone());
                Arc::new(move || shared.policy.function_catalog(&database))
            },
        )
        .await
        .map(Box::new);
        let up = l.upstream;
        let (max, budget) = (shared.cfg.server.max_message_bytes, &shared.budget);
        let client_in = wire::Inbound::new(wire::Side::Client, max, budget.clone(), CLIENT_READ_BUF, UPSTREAM_WRITE_BUF);
        let upstream_in = wire::Inbound::new(wire::Side::Server, max, budget.clone(), UPSTREAM_READ_BUF, CLIENT_WRITE_BUF);
        let io = Io { client: l.stream, cbuf: l.buf, upstream: up.stream, ubuf: up.leftover };
        let ids = RecordIds {
            session: session.as_str().into(),
            user: l.identity.user.as_str().into(),
            groups: l.identity.groups.as_slice().into(),
            database: l.database.as_str().into(),
        };
        let relay = Relay {
            mask,
            keep_upstream: shared.pool.enabled(),
            shared,
            ids,
            identity: l.identity,
            policy_identity: l.policy_identity,
            check: l.check,
            sql_prepared: sql_prepared::SqlPrepared::default(),
            database: l.database,
            client: peer.audit_client(),
            tracker: SessionTracker::new(up.tx_status),
            nonce: new_session_id(),
            terminated: false,
            end_reason: None,
            detach: false,
            upstream_fd: None,
            analyzed: Vec::new(),
            watch: l.watch,
            watch_violation: None,
            tx: durability::TxState::default(),
            inflight: Inflight::default(),
            last_seq: 0,
            copy_in: copy_in::CopyIn::default(),
            client_in,
            upstream_in,
            checkout: Checkout {
                pool_key: l.pool_key,
                params: up.params,
                backend_pid: up.backend_pid,
                backend_key: up.backend_key,
                cancel: l.cancel,
            },
        };
        (relay, io)
    }

    fn record(&self, kind: Kind) -> Record {
        Record {
            kind,
            session: Some(self.ids.session.clone()),
            user: Some(self.ids.user.clone()),
            groups: Some(self.ids.groups.clone()),
            client: Some(self.client.clone()),
            database: Some(self.ids.database.clone()),
            ..Default::default()
        }
    }

    /// Relay until the session ends, then end it ([`Relay::shutdown`]).
    async fn run(mut self, io: Io) {
        let Io { client, cbuf, upstream, ubuf } = io;
        if self.shared.audit.runs_hooks() {
            self.upstream_fd = upstream.plain_fd().and_then(|fd| fd.try_clone_to_owned().ok()).map(Arc::new);
        }
        let (mut crd, mut cwr) = tokio::io::split(client);
        let (mut urd, mut uwr) = tokio::io::split(upstream);
        let mut p = Pumps::new(cbuf, ubuf);
        let mut end = self.login_leftover(&mut p);
        while end.is_none() {
            if let Err(e) = self.before_wait(&mut p).await {
                end = Some(e);
                break;
            }
            end = self.wait(&mut p, &mut crd, &mut cwr, &mut urd, &mut uwr).await;
        }

        // Nothing of the session's own may go upstream ahead of (or after) a held batch the
        // writer might still send: take it back first. Held replies are never delivered.
        let Pumps { cbuf, ubuf, cout, uout, batch, .. } = p;
        let batch_held = batch.is_some();
        drop(batch);
        self.inflight.drop_replies();
        let rest = Rest { cwr, cout, urd, uwr, ubuf, uout, cbuf_empty: cbuf.is_empty(), durable_pending: batch_held };
        // The loop only stops with an end set; a client end is the one that assumes least.
        self.shutdown(end.unwrap_or(End::Client), rest).await;
    }

    /// Frames that arrived with the upstream's login.
    fn login_leftover(&mut self, p: &mut Pumps) -> Option<End> {
        if p.ubuf.is_empty() {
            return None;
        }
        let mut end = self.on_upstream_data(&mut p.ubuf, &mut p.cout).err();
        if let Some(msg) = self.watch_violation.take() {
            end = Some(End::Fatal(sqlstate::INSUFFICIENT_PRIVILEGE, format!("pgward: {msg}")));
        }
        end
    }

    /// Everything the loop does before it waits: budget given back, the client's bytes
    /// decided on, durability outcomes taken in; an end when the session is over.
    async fn before_wait(&mut self, p: &mut Pumps) -> Result<(), End> {
        // Large messages that have left pgward give their budget back.
        self.client_in.settle(&mut p.uout, p.batch.is_none());
        self.upstream_in.settle(&mut p.cout, !self.inflight.holding());
        if p.unread && p.batch.is_none() {
            p.unread = false;
            self.client_data(&mut p.cbuf, &mut p.uout, &mut p.batch, !p.client_eof).await?;
        }
        self.settle(&mut p.batch, &mut p.uout, &mut p.cout)?;
        if p.batch.is_none() {
            self.settle_copy_in(&mut p.uout);
        }
        if p.client_eof && p.batch.is_none() {
            return Err(End::Client);
        }
        if self.detach && p.uout.is_empty() && p.batch.is_none() {
            return Err(End::Detach);
        }
        Ok(())
    }

    /// Wait for the next thing to do and do it: bytes from either side, a record's outcome,
    /// room in the budget, a socket ready for the bytes waiting for it.
    async fn wait(
        &mut self,
        p: &mut Pumps,
        crd: &mut tokio::io::ReadHalf<BoxStream>,
        cwr: &mut tokio::io::WriteHalf<BoxStream>,
        urd: &mut tokio::io::ReadHalf<BoxStream>,
        uwr: &mut tokio::io::WriteHalf<BoxStream>,
    ) -> Option<End> {
        // While a batch is held the client is still read (once): the writer may have sent
        // the batch without waking this loop.
        let read_client = !p.client_eof && !self.terminated && !p.unread && p.uout.len() < HIGH_WATER && !self.client_in.blocked();
        let read_upstream = p.cout.len() + self.inflight.held_len() < HIGH_WATER && !self.upstream_in.blocked();
        let wait_records = p.batch.is_some() || self.inflight.holding();
        tokio::select! {
            r = crd.read_buf(&mut p.cbuf), if read_client => {
                if matches!(r, Ok(0) | Err(_)) {
                    p.client_eof = true;
                }
                // Claim a batch the writer sent; otherwise have it tell us.
                if p.batch.as_ref().is_some_and(Batch::sent_or_ask) {
                    self.claim_sent(&mut p.batch, &mut p.uout);
                }
                p.unread = true;
                None
            },
            r = urd.read_buf(&mut p.ubuf), if read_upstream => match r {
                Ok(0) | Err(_) => Some(End::Upstream),
                Ok(_) => self.upstream_read(p),
            },
            () = self.inflight.next(), if wait_records => None,
            // A large message got its room in the budget: reading that side goes on.
            c = self.client_in.budget(), if self.client_in.blocked() => {
                self.client_in.granted(c, &mut p.cbuf).err().map(|e| End::Fatal(e.sqlstate(), format!("pgward: {e}")))
            },
            c = self.upstream_in.budget(), if self.upstream_in.blocked() => {
                self.upstream_in.granted(c, &mut p.ubuf).err().map(|e| End::Fatal(e.sqlstate(), format!("pgward: {e}")))
            },
            r = cwr.write(&p.cout), if !p.cout.is_empty() => match r {
                Ok(0) | Err(_) => Some(End::Client),
                Ok(n) => {
                    let _ = p.cout.split_to(n);
                    (p.cout.is_empty() && cwr.flush().await.is_err()).then_some(End::Client)
                }
            },
            r = uwr.write(&p.uout), if !p.uout.is_empty() => match r {
                Ok(0) | Err(_) => Some(End::Upstream),
                Ok(n) => {
                    let _ = p.uout.split_to(n);
                    (p.uout.is_empty() && uwr.flush().await.is_err()).then_some(End::Upstream)
                }
            },
        }
    }

    /// Bytes read from the server. Nothing more reaches the client of a token that expired or
    /// was revoked (or of a grant that ended): not the rest of a long result, nor what an idle
    /// session receives without asking (notifications of a LISTEN).
    fn upstream_read(&mut self, p: &mut Pumps) -> Option<End> {
        if let Err(end) = self.check_token() {
            return Some(end);
        }
        // The writer sent the held batch and Postgres may already be answering it: its
        // pendings must be queued first.
        if p.batch.as_ref().is_some_and(Batch::was_sent) {
            self.claim_sent(&mut p.batch, &mut p.uout);
        }
        let mut end = self.server_data(&mut p.ubuf, &mut p.cout).err();
        if let Some(msg) = self.watch_violation.take() {
            end = Some(End::Fatal(sqlstate::INSUFFICIENT_PRIVILEGE, format!("pgward: {msg}")));
        }
        end
    }

    /// Decide on the client's complete frames: what may go upstream now goes into `uout`,
    /// the rest becomes the held `batch`.
    async fn client_data(&mut self, cbuf: &mut BytesMut, uout: &mut BytesMut, batch: &mut Option<Batch>, client_open: bool) -> Result<(), End> {
        if cbuf.is_empty() {
            return Ok(());
        }
        // After the session's own DDL: the next statement sees its effect on the masking
        // catalog.
        if let Some(m) = self.mask.as_mut()
            && m.ddl_pending()
        {
            m.refresh_after_ddl().await;
        }
        // Checked before building analyze_ahead's future: off the common path.
        if wire::complete_frames(cbuf).any(|(tag, raw)| frontend::is_long_text(tag, raw)) {
            self.analyze_ahead(cbuf).await;
        }
        let r = self.on_client_data(cbuf, uout, client_open);
        self.analyzed.clear();
        *batch = r?;
        Ok(())
    }

    /// Server bytes: to the client, or held until the records before them are durable.
    fn server_data(&mut self, ubuf: &mut BytesMut, cout: &mut BytesMut) -> Result<(), End> {
        self.inflight.poll_ready();
        if self.inflight.replies_ready() {
            return self.on_upstream_data(ubuf, cout);
        }
        let mut held = self.inflight.take_held();
        let r = self.on_upstream_data(ubuf, &mut held);
        self.inflight.put_held(held);
        r
    }

    /// Take in the durability outcomes already there: release the held batch and the held
    /// replies whose records are durable, and resync the projected transaction state when
    /// nothing is outstanding.
    fn settle(&mut self, batch: &mut Option<Batch>, uout: &mut BytesMut, cout: &mut BytesMut) -> Result<(), End> {
        self.inflight.poll_ready();
        if let Some(f) = self.inflight.take_failure() {
            self.audit_failed(f, batch, uout)?;
            self.inflight.poll_ready();
        }
        if batch.as_ref().is_some_and(|b| self.inflight.confirmed(b.needs))
            && let Some(b) = batch.take()
        {
            self.release_batch(b, Ok(()), uout);
        }
        self.inflight.release_replies(cout);
        if batch.is_none() && self.tracker.front().is_none() {
            self.tx.ready(self.tracker.tx_status());
        }
        Ok(())
    }

    /// The writer sent the held batch (called only then: so every record of it, and before
    /// it, is durable): take it back and account for it as forwarded.
    fn claim_sent(&mut self, batch: &mut Option<Batch>, uout: &mut BytesMut) {
        let Some(b) = batch.take() else { return };
        self.inflight.durable_through(b.needs);
        self.release_batch(b, Ok(()), uout);
    }

    /// The audit log refused a record. Its statement (or one before it) already went
    /// upstream: the session ends (FATAL 58030), its held replies undelivered, and Postgres
    /// rolls back whatever was open. Otherwise the held batch's statements are refused.
    fn audit_failed(&mut self, f: Failure, batch: &mut Option<Batch>, uout: &mut BytesMut) -> Result<(), End> {
        match batch.take() {
            Some(b) if !f.forwarded => {
                self.inflight.clear();
                self.release_batch(b, Err(f.error), uout);
                Ok(())
            }
            b => {
                drop(b);
                tracing::error!(error = %f.error, "audit append failed for a statement already sent; ending the session");
                self.inflight.drop_replies();
                Err(End::Fatal(
                    sqlstate::IO_ERROR,
                    "pgward: audit log unavailable: the session is closed and its open transaction rolled back \
                     (the cause is in pgward's log)"
                        .into(),
                ))
            }
        }
    }

    /// Every way a session ends: the last bytes to the client and the server, the upstream
    /// back to the pool or closed, the cancel key withdrawn, the `session_end` record.
    async fn shutdown(mut self, end: End, rest: Rest) {
        let kept = self.close(end, rest).await;
        let mut end_rec = self.record(Kind::SessionEnd);
        end_rec.error = self.end_reason.as_deref().map(crate::audit::param::error_text);
        let Checkout { pool_key, params, backend_pid, backend_key, cancel } = self.checkout;
        let cancelled = self.shared.cancels.remove(cancel.0, cancel.1);
        let kept = kept.map(|(stream, leftover)| upstream::Upstream {
            stream,
            leftover,
            params,
            backend_pid,
            backend_key,
            tx_status: self.tracker.tx_status(),
        });
        self.shared.pool.session_ended(pool_key, kept, cancelled);
        self.shared.audit.append(end_rec);
        tracing::info!(reason = self.end_reason.as_deref().unwrap_or("client closed"), "session ended");
    }

    /// Say goodbye on both sockets as the end requires. Returns the upstream connection (and
    /// bytes read past the last frame) when pooling is on and the session ended cleanly: the
    /// client sent Terminate or closed at a message boundary, no response is pending, no
    /// extended-protocol message waits for its Sync, and the last ReadyForQuery said idle.
    /// Otherwise the upstream is closed here (Postgres rolls back whatever was open).
    async fn close(&mut self, end: End, rest: Rest) -> Option<(BoxStream, BytesMut)> {
        let Rest { mut cwr, mut cout, urd, mut uwr, ubuf, uout, cbuf_empty, durable_pending } = rest;
        match end {
            End::Detach => {
                let _ = tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, async {
                    let _ = cwr.write_all(&cout).await;
                    let _ = cwr.shutdown().await;
                })
                .await;
                if self.tracker.is_clean() {
                    return Some((urd.unsplit(uwr), ubuf));
                }
                let _ = tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, async {
                    let _ = uwr.write_all(&terminate()).await;
                    let _ = uwr.shutdown().await;
                })
                .await;
            }
            End::Client
                if self.keep_upstream
                    && (self.detach || !self.terminated)
                    && cbuf_empty
                    && uout.is_empty()
                    && !durable_pending
                    && self.tracker.is_clean() =>
            {
                // Gone at a message boundary with nothing outstanding: keep the upstream.
                if !self.terminated {
                    self.end_reason = Some("client disconnected without Terminate".into());
                }
                return Some((urd.unsplit(uwr), ubuf));
            }
            End::Client => {
                // Tell the upstream we are done (Terminate), best effort.
                let t = if self.terminated { BytesMut::new() } else { terminate() };
                let _ = tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, async {
                    let _ = uwr.write_all(&uout).await;
                    let _ = uwr.write_all(&t).await;
                    let _ = uwr.shutdown().await;
                })
                .await;
                if !self.terminated {
                    self.end_reason = Some("client disconnected without Terminate".into());
                }
            }
            End::Upstream => {
                if !self.terminated {
                    wire::error_response(
                        &mut cout,
                        "FATAL",
                        sqlstate::CONNECTION_FAILURE,
                        "pgward: connection to the database server was lost",
                    );
                    self.end_reason = Some("database connection lost".into());
                }
                let _ = tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, async {
                    let _ = cwr.write_all(&cout).await;
                    let _ = cwr.shutdown().await;
                })
                .await;
            }
            End::Fatal(code, msg) => {
                tracing::info!(code, %msg, "ending session");
                wire::error_response(&mut cout, "FATAL", code, &msg);
                self.end_reason = Some(format!("{code}: {msg}"));
                let _ = tokio::time::timeout(SHUTDOWN_FLUSH_TIMEOUT, async {
                    let _ = cwr.write_all(&cout).await;
                    let _ = cwr.shutdown().await;
                    let _ = uwr.write_all(&terminate()).await;
                })
                .await;
            }
        }
        None
    }
}

/// The relay loop's buffers and where it stands.
struct Pumps {
    /// Bytes read from the client, not yet decided on.
    cbuf: BytesMut,
    /// Bytes read from the server, not yet processed.
    ubuf: BytesMut,
    /// Bytes going to the client.
    cout: BytesMut,
    /// Bytes going to the server.
    uout: BytesMut,
    /// Frames held until the session's records are durable.
    batch: Option<Batch>,
    client_eof: bool,
    /// Client bytes (or its end) read while a batch was held: dealt with once the batch is
    /// released (their records come after its records).
    unread: bool,
}

impl Pumps {
    fn new(mut cbuf: BytesMut, mut ubuf: BytesMut) -> Pumps {
        cbuf.reserve(CLIENT_READ_BUF);
        ubuf.reserve(UPSTREAM_READ_BUF);
        let unread = !cbuf.is_empty();
        Pumps {
            cbuf,
            ubuf,
            cout: BytesMut::with_capacity(CLIENT_WRITE_BUF),
            uout: BytesMut::with_capacity(UPSTREAM_WRITE_BUF),
            batch: None,
            client_eof: false,
            unread,
        }
    }
}

/// What the relay loop leaves for [`Relay::shutdown`]: the socket halves, the bytes not yet
/// written, and whether anything was still outstanding.
struct Rest {
    cwr: tokio::io::WriteHalf<BoxStream>,
    cout: BytesMut,
    urd: tokio::io::ReadHalf<BoxStream>,
    uwr: tokio::io::WriteHalf<BoxStream>,
    ubuf: BytesMut,
    uout: BytesMut,
    /// No client bytes were left unprocessed.
    cbuf_empty: bool,
    /// A batch was still waiting for its records to be durable.
    durable_pending: bool,
}

/// A Terminate message.
fn terminate() -> BytesMut {
    let mut t = BytesMut::new();
    wire::message(&mut t, b'X', &[]);
    t
}
