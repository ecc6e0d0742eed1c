//! The login phase of a session, after the token was verified: revocations and grants, the
//! startup parameters the policy decides, the upstream (from the pool or new, with the user's
//! role), the durable `login` record, and the client's AuthenticationOk.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::startup::{LEXICAL_SETTINGS, Login, PRESENTATION_PARAMS, startup_setting_sql};
use super::{Peer, Shared, fatal, now_unix};
use crate::access::{SessionCheck, SessionGrant};
use crate::audit::{Kind, Record};
use crate::auth::Identity;
use crate::pool::PoolKey;
use crate::sqlstate;
use crate::upstream::Upstream;
use crate::wire::{self, BoxStream};

/// A session that may start relaying: who it is, and both connections.
pub(super) struct LoggedIn {
    pub(super) identity: Identity,
    pub(super) policy_identity: Identity,
    pub(super) check: SessionCheck,
    pub(super) database: String,
    /// The client connection, and what it sent past its password.
    pub(super) stream: BoxStream,
    pub(super) buf: BytesMut,
    pub(super) upstream: Upstream,
    pub(super) pool_key: PoolKey,
    /// The BackendKeyData the client got.
    pub(super) cancel: (i32, i32),
    pub(super) watch: crate::param_watch::ParamWatch,
}

/// Refuse a login after the token was verified: `login_failed` record, FATAL to the client.
#[allow(clippy::too_many_arguments)]
pub(super) async fn refuse_login(
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
    // The message quotes the client's texts (user, database, encoding): escaped (`?`).
    tracing::info!(user = ?identity.user, code, msg = ?msg, "login refused");
    let mut rec = identity_record(Kind::LoginFailed, session, peer, identity, database);
    rec.rule = rule;
    rec.sqlstate = Some(code.to_string());
    rec.error = Some(crate::audit::param::error_text(&msg));
    let _ = shared.audit.append_durable(rec).await;
    fatal(stream, code, &msg).await;
}

/// A session-level record for a verified identity (login, login_failed after the token).
fn identity_record(kind: Kind, session: &str, peer: &Peer, identity: &Identity, database: &str) -> Record {
    Record {
        kind,
        session: Some(session.into()),
        user: Some(identity.user.as_str().into()),
        groups: Some(identity.groups.as_slice().into()),
        client: Some(peer.audit_client()),
        database: Some(database.into()),
        jti: Some(identity.jti.clone()),
        ..Default::default()
    }
}

/// Log a verified token in: None when the login was refused (audited, FATAL sent) or the
/// client went away.
pub(super) async fn login(shared: &Arc<Shared>, peer: &Peer, session: &str, mut login: Login) -> Option<LoggedIn> {
    // Revocations and grants: the generation is read before the snapshot, so anything
    // published after this check is seen by the session's first statement.
    let access_generation = shared.access.generation();
    let snap = shared.access.snapshot();
    let former = login.former_id.as_ref().map(|id| Identity { jti: id.clone(), ..login.identity.clone() });
    if let Some(why) = snap.token_revoked(&login.identity).or_else(|| former.and_then(|f| snap.revoked_in_state(&f))) {
        let msg = format!("pgward: token authentication failed for user \"{}\": {why}", login.identity.user);
        refuse_login(shared, &mut login.stream, session, peer, &login.identity, &login.database, sqlstate::INVALID_PASSWORD, msg, None)
            .await;
        return None;
    }
    let grant = snap.active_grant(&login.identity.user, now_unix()).and_then(SessionGrant::from_request);
    drop(snap);
    let policy_identity = policy_identity(shared, &login.identity, grant.as_ref());

    if let Some((code, msg, rule)) = refused_startup_setting(shared, &login, &policy_identity) {
        refuse_login(shared, &mut login.stream, session, peer, &login.identity, &login.database, code, msg, rule).await;
        return None;
    }

    // Upstream login with the service credential. application_name carries the real user so
    // Postgres's own logs and pg_stat_activity show who it is.
    let app_name = match login.app_name.as_deref() {
        Some(a) if !a.is_empty() => format!("pgward:{}:{}", login.identity.user, a),
        _ => format!("pgward:{}", login.identity.user),
    };
    let pool_key = PoolKey::new(&shared.target, &shared.cfg.upstream.user, &login.database, &login.params);
    let settings = startup_settings(&login.params);
    let Login { identity, database, mut stream, buf, .. } = login;
    // The identity's database role (policy groups → roles, or the grant's), set before the
    // client can act.
    let role = match &grant {
        Some(g) => Some(g.role.clone()),
        None => shared.policy.role_for(&identity),
    };
    // A pooled connection (reset at check-in) or a new one; either way named after this user
    // and with this user's role before the client can act.
    let up = shared
        .pool
        .acquire(&shared.target, &pool_key, shared.upstream_password.as_deref(), &app_name, role.as_deref())
        .await;
    let (up, reused) = match up {
        Ok(a) => (a.up, a.reused),
        Err(e) => {
            refuse_upstream(shared, &mut stream, session, peer, &identity, &database, e).await;
            return None;
        }
    };

    // The server must report the settings pgward parses SQL with.
    let watch = match crate::param_watch::ParamWatch::at_login(&up.params) {
        Ok(w) => w,
        Err(msg) => {
            let msg = format!("pgward: {msg}");
            refuse_login(shared, &mut stream, session, peer, &identity, &database, sqlstate::INSUFFICIENT_PRIVILEGE, msg, None).await;
            return None;
        }
    };

    // The database's function classes, before the first statement is decided.
    shared.fn_catalogs.ensure(shared, &database).await;

    // Write-ahead: the login is durable before the session can do anything.
    let mut login_rec = identity_record(Kind::Login, session, peer, &identity, &database);
    login_rec.meta = login_meta(shared, &identity, &policy_identity, grant.as_ref(), up.backend_pid, reused);
    if let (Some(serde_json::Value::Object(m)), Some(s)) = (login_rec.meta.as_mut(), settings) {
        m.insert("settings".into(), s);
    }
    if let Err(e) = shared.audit.append_durable(login_rec).await {
        tracing::error!(error = %e, "audit append failed; refusing login");
        fatal(&mut stream, sqlstate::IO_ERROR, "pgward: audit log unavailable, login refused (the cause is in pgward's log)").await;
        return None;
    }

    let (bytes, cancel) = hello(shared, &up);
    let (pid, key) = greet(shared, &mut stream, bytes, cancel).await?;
    tracing::info!(user = %identity.user, database = %database, "session started");
    Some(LoggedIn {
        check: SessionCheck::new(access_generation, grant, shared.cfg.auth.leeway_secs, now_unix()),
        identity,
        policy_identity,
        database,
        stream,
        buf,
        upstream: up,
        pool_key,
        cancel: (pid, key),
        watch,
    })
}

/// Whom the policy decides for: under a grant, a member of the policy groups that have the
/// granted role (if any has it), not of the token's groups.
fn policy_identity(shared: &Shared, identity: &Identity, grant: Option<&SessionGrant>) -> Identity {
    match grant {
        Some(g) => {
            let groups = shared.policy.groups_with_role(&g.role);
            if groups.is_empty() { identity.clone() } else { Identity { groups, ..identity.clone() } }
        }
        None => identity.clone(),
    }
}

/// The upstream login failed: audited (durably, best effort) and told to the client.
async fn refuse_upstream(
    shared: &Shared,
    stream: &mut BoxStream,
    session: &str,
    peer: &Peer,
    identity: &Identity,
    database: &str,
    e: crate::upstream::UpstreamError,
) {
    tracing::warn!(error = %e, "upstream login failed");
    let mut rec = identity_record(Kind::LoginFailed, session, peer, identity, database);
    rec.sqlstate = Some(e.sqlstate().to_string());
    rec.error = Some(crate::audit::param::error_text(&format!("upstream: {e}")));
    let _ = shared.audit.append_durable(rec).await;
    fatal(stream, e.sqlstate(), &format!("pgward: {e}")).await;
}

/// AuthenticationOk, the server's parameters, pgward's cancel key for the session (registered
/// now) and ReadyForQuery: what lets the client act.
fn hello(shared: &Shared, up: &crate::upstream::Upstream) -> (BytesMut, (i32, i32)) {
    let (pid, key) = shared.cancels.register(up.backend_pid, up.backend_key);
    let mut hello = BytesMut::new();
    wire::auth_ok(&mut hello);
    for (k, v) in &up.params {
        wire::parameter_status(&mut hello, k, v);
    }
    wire::backend_key_data(&mut hello, pid, key);
    wire::ready_for_query(&mut hello, up.tx_status);
    (hello, (pid, key))
}

/// Send the [`hello`]; None (the cancel key withdrawn) if the client went away.
async fn greet(shared: &Shared, stream: &mut BoxStream, hello: BytesMut, (pid, key): (i32, i32)) -> Option<(i32, i32)> {
    if stream.write_all(&hello).await.is_err() || stream.flush().await.is_err() {
        shared.cancels.remove(pid, key);
        return None;
    }
    Some((pid, key))
}

/// The first startup setting the session may not have: (SQLSTATE, message, policy rule).
/// Settings other than presentation ones are decided like `SET name TO 'value'`.
fn refused_startup_setting(
    shared: &Shared,
    login: &Login,
    policy_identity: &Identity,
) -> Option<(&'static str, String, Option<String>)> {
    for (k, v) in &login.params {
        let pgwards = LEXICAL_SETTINGS.iter().any(|(p, _)| k.eq_ignore_ascii_case(p));
        if pgwards || PRESENTATION_PARAMS.iter().any(|p| k.eq_ignore_ascii_case(p)) {
            continue;
        }
        let refusal = match startup_setting_sql(k, v) {
            None => Some((sqlstate::INVALID_PARAMETER_VALUE, format!("pgward: invalid startup parameter name \"{k}\""), None)),
            Some(sql) => {
                let v = shared.policy.decide(policy_identity, &login.database, &sql, chrono::Utc::now());
                (!v.is_allowed()).then(|| {
                    let msg = format!(
                        "pgward: startup parameter \"{k}\" refused by policy rule \"{}\": {}",
                        v.rule, v.reason
                    );
                    (sqlstate::INSUFFICIENT_PRIVILEGE, msg, Some(v.rule.clone()))
                })
            }
        };
        if refusal.is_some() {
            return refusal;
        }
    }
    None
}

/// `meta.settings` of the login record: the startup parameters the session's upstream
/// connection was opened with, by name as the client sent them. They set the session's
/// settings as `SET` statements would (`search_path` decides which function a name calls), but
/// no statement record shows them. None when there are none.
fn startup_settings(params: &[(String, String)]) -> Option<serde_json::Value> {
    if params.is_empty() {
        return None;
    }
    let m: serde_json::Map<String, serde_json::Value> = params.iter().map(|(k, v)| (k.clone(), v.clone().into())).collect();
    Some(serde_json::Value::Object(m))
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
