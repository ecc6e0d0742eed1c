//! The startup phase of a session: SSL negotiation, the StartupMessage, the token, and which
//! startup parameters go upstream.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use super::login::refuse_login;
use super::{Peer, Shared, fatal};
use crate::audit::{Kind, Record};
use crate::auth::Identity;
use crate::sqlstate;
use crate::upstream;
use crate::wire::{self, BoxStream, StartupRequest, WireError};

pub(super) struct Login {
    pub(super) identity: Identity,
    pub(super) database: String,
    pub(super) stream: BoxStream,
    pub(super) buf: BytesMut,
    pub(super) app_name: Option<String>,
    /// Client startup parameters passed on to the upstream (client_encoding, DateStyle, ...).
    pub(super) params: Vec<(String, String)>,
    /// For a token without `jti`: the id older pgward versions gave it (the hash of the whole
    /// token, see [`crate::auth::former_token_hash`]), which revocations made by them name.
    pub(super) former_id: Option<String>,
}

/// Startup parameters never passed upstream: identity and connection routing are pgward's,
/// and `options` could carry `-c role=...` / `-c session_authorization=...`. Compared
/// case-insensitively, as Postgres compares setting names. `standard_conforming_strings` is
/// pgward's too: the policy parses SQL with it on.
pub(super) const STRIPPED_PARAMS: &[&str] = &[
    "user",
    "database",
    "options",
    "replication",
    "application_name",
    "role",
    "session_authorization",
    "standard_conforming_strings",
    "backslash_quote",
];

/// The settings pgward's parser reads SQL with, sent upstream at every login (so RESET and
/// `SET … TO DEFAULT` restore them, whatever the server's configuration says). The client's
/// own `client_encoding` stays when it is one pgward supports (checked before).
pub(super) const LEXICAL_SETTINGS: &[(&str, &str)] =
    &[("client_encoding", "UTF8"), ("standard_conforming_strings", "on"), ("backslash_quote", "safe_encoding")];

pub(super) fn with_lexical_settings(mut params: Vec<(String, String)>) -> Vec<(String, String)> {
    for (k, v) in LEXICAL_SETTINGS {
        if !params.iter().any(|(p, _)| p.eq_ignore_ascii_case(k)) {
            params.push((k.to_string(), v.to_string()));
        }
    }
    params
}

/// Startup settings that only change how values are presented; passed on without asking the
/// policy (drivers send them on every login). `client_encoding` is checked on its own.
pub(super) const PRESENTATION_PARAMS: &[&str] = &["client_encoding", "datestyle", "timezone", "intervalstyle", "extra_float_digits"];

/// `SET name TO 'value'` for a startup setting, for the policy to decide as if the client had
/// sent it; None for a name that is not a setting name.
pub(super) fn startup_setting_sql(name: &str, value: &str) -> Option<String> {
    let ok_part = |p: &str| {
        let mut c = p.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '$')
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|p| ok_part(p)) {
        return None;
    }
    Some(format!("SET {} TO '{}'", name.to_ascii_lowercase(), value.replace('\'', "''")))
}

/// Startup phase: SSL negotiation, StartupMessage, token. Returns None when the connection is
/// finished (cancel request, refused login, client gone).
pub(super) async fn startup(shared: &Arc<Shared>, stream: BoxStream, peer: &Peer, session: &str) -> Option<Login> {
    let Opened { mut stream, mut buf, tls_on, version, params } = negotiate(shared, stream).await?;
    let mut hello = BytesMut::new();
    let StartupNames { user, database } = check_startup(&mut stream, &mut hello, version, &params).await?;
    let failed = |reason: String, code: &str, jti: Option<String>, sub: Option<String>| Record {
        kind: Kind::LoginFailed,
        session: Some(session.into()),
        user: Some(sub.unwrap_or_else(|| user.clone()).into()),
        client: Some(peer.audit_client()),
        database: Some(database.as_str().into()),
        jti,
        sqlstate: Some(code.to_string()),
        error: Some(reason),
        ..Default::default()
    };

    if !tls_on && !(peer.is_local() && shared.cfg.server.allow_plaintext_local) {
        let msg = "pgward accepts tokens only over TLS from this address (use sslmode=require)";
        let _ = shared.audit.append_durable(failed(msg.into(), sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, None, None)).await;
        fatal(&mut stream, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, &format!("pgward: {msg}")).await;
        return None;
    }
    let token = read_token(&mut stream, &mut buf, hello).await?;
    match shared.verifier.verify_login(&token, &user).await {
        Ok(identity) => {
            let app_name = params.iter().find(|(n, _)| n == "application_name").map(|(_, v)| v.clone());
            let params = upstream_params(&params);
            // pgward parses SQL as UTF-8: other client encodings would be converted by the
            // server into text pgward did not check.
            if let Some((_, enc)) = params
                .iter()
                .find(|(k, v)| k.eq_ignore_ascii_case("client_encoding") && !crate::policy::supported_client_encoding(v))
            {
                let msg = format!("pgward: client_encoding \"{enc}\" is not supported through pgward; use UTF8");
                refuse_login(shared, &mut stream, session, peer, &identity, &database, sqlstate::INVALID_PARAMETER_VALUE, msg, None).await;
                return None;
            }
            let params = with_lexical_settings(params);
            let former_id = crate::auth::former_token_hash(&identity, &token);
            Some(Login { identity, database, stream, buf, app_name, params, former_id })
        }
        Err(e) => {
            let code = e.sqlstate();
            // The startup user is the client's text: quoted and escaped (`?`), so a line
            // break or escape sequence in it cannot forge or hide lines of pgward's log.
            tracing::info!(user = ?user, error = %e, "login refused");
            let rec = failed(e.to_string(), code, e.jti().map(str::to_string), e.sub().map(str::to_string));
            let _ = shared.audit.append_durable(rec).await;
            let msg = match code {
                sqlstate::INVALID_PASSWORD => format!("pgward: token authentication failed for user \"{user}\": {e}"),
                _ => format!("pgward: {e}"),
            };
            fatal(&mut stream, code, &msg).await;
            None
        }
    }
}

/// A connection past its StartupMessage: the stream (TLS or not), bytes read past the
/// packet, and what the packet asked for.
struct Opened {
    stream: BoxStream,
    buf: BytesMut,
    tls_on: bool,
    version: u32,
    params: Vec<(String, String)>,
}

/// Read startup packets until the StartupMessage: SSLRequest answered with TLS (or 'N'
/// without a certificate), GSSENCRequest with 'N', a CancelRequest forwarded. None when the
/// connection is finished.
async fn negotiate(shared: &Arc<Shared>, mut stream: BoxStream) -> Option<Opened> {
    let mut buf = BytesMut::with_capacity(1024);
    let mut tls_on = false;
    loop {
        let pkt = match wire::read_startup_packet(&mut stream, &mut buf).await {
            Ok(p) => p,
            Err(WireError::Closed) => return None,
            Err(e) => {
                fatal(&mut stream, sqlstate::PROTOCOL_VIOLATION, &format!("pgward: invalid startup packet: {e}")).await;
                return None;
            }
        };
        match wire::parse_startup(&pkt) {
            Ok(StartupRequest::Ssl) => {
                if tls_on || !buf.is_empty() {
                    fatal(&mut stream, sqlstate::PROTOCOL_VIOLATION, "pgward: unexpected data around SSLRequest").await;
                    return None;
                }
                stream = match &shared.tls {
                    Some(acc) => {
                        tls_on = true;
                        start_tls(acc, stream).await?
                    }
                    None => {
                        stream.write_all(b"N").await.ok()?;
                        stream
                    }
                };
            }
            Ok(StartupRequest::GssEnc) => stream.write_all(b"N").await.ok()?,
            Ok(StartupRequest::Cancel { pid, key }) => {
                forward_cancel(shared, pid, key).await;
                return None;
            }
            Ok(StartupRequest::Startup { version, params }) => return Some(Opened { stream, buf, tls_on, version, params }),
            Err(e) => {
                fatal(&mut stream, sqlstate::PROTOCOL_VIOLATION, &format!("pgward: invalid startup packet: {e}")).await;
                return None;
            }
        }
    }
}

/// Answer an SSLRequest with 'S' and run the TLS handshake; None if it failed.
async fn start_tls(acc: &tokio_rustls::TlsAcceptor, mut stream: BoxStream) -> Option<BoxStream> {
    if stream.write_all(b"S").await.is_err() || stream.flush().await.is_err() {
        return None;
    }
    match acc.accept(stream).await {
        Ok(t) => Some(Box::new(t)),
        Err(e) => {
            tracing::info!(error = %e, "TLS handshake failed");
            None
        }
    }
}

/// A CancelRequest: pgward's key mapped to the upstream's; unknown keys are ignored silently.
async fn forward_cancel(shared: &Shared, pid: i32, key: i32) {
    let Some((upid, ukey)) = shared.cancels.lookup(pid, key) else {
        tracing::info!("cancel request with unknown key ignored");
        return;
    };
    match upstream::cancel(&shared.target, upid, ukey).await {
        Ok(()) => tracing::info!("cancel request forwarded"),
        Err(e) => tracing::warn!(error = %e, "forwarding cancel request failed"),
    }
}

/// Who a StartupMessage names.
struct StartupNames {
    user: String,
    database: String,
}

/// The StartupMessage's protocol version (a newer minor version or `_pq_.` options get a
/// NegotiateProtocolVersion into `hello`), user and database; FATAL and None for what pgward
/// does not serve.
async fn check_startup(stream: &mut BoxStream, hello: &mut BytesMut, version: u32, params: &[(String, String)]) -> Option<StartupNames> {
    if version >> 16 != 3 {
        let msg = format!("pgward: unsupported frontend protocol {}.{}", version >> 16, version & 0xffff);
        fatal(stream, sqlstate::FEATURE_NOT_SUPPORTED, &msg).await;
        return None;
    }
    let unsupported: Vec<String> = params.iter().filter(|(k, _)| k.starts_with("_pq_.")).map(|(k, _)| k.clone()).collect();
    if version & 0xffff != 0 || !unsupported.is_empty() {
        wire::negotiate_protocol_version(hello, &unsupported);
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = get("user").filter(|u| !u.is_empty()) else {
        fatal(stream, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, "pgward: no user name specified in the startup packet").await;
        return None;
    };
    let database = get("database").filter(|d| !d.is_empty()).unwrap_or_else(|| user.clone());
    if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        fatal(stream, sqlstate::INVALID_AUTHORIZATION_SPECIFICATION, "pgward: replication connections are not supported").await;
        return None;
    }
    Some(StartupNames { user, database })
}

/// Ask for the password (after what `hello` holds) and read it: the token. None when the
/// client hung up (psql does, to prompt for a password: not a failed login) or sent
/// something else (FATAL 08P01).
async fn read_token(stream: &mut BoxStream, buf: &mut BytesMut, mut hello: BytesMut) -> Option<String> {
    wire::auth_cleartext(&mut hello);
    if stream.write_all(&hello).await.is_err() || stream.flush().await.is_err() {
        return None;
    }
    let decoded = match wire::read_frame(stream, buf, wire::MAX_STARTUP_FRAME).await {
        Ok(frame) => wire::decode_password(&frame).map(|t| t.into_owned()),
        Err(WireError::Closed) => return None,
        Err(e) => Err(e),
    };
    match decoded {
        Ok(t) => Some(t),
        Err(e) => {
            fatal(stream, sqlstate::PROTOCOL_VIOLATION, &format!("pgward: {e}")).await;
            None
        }
    }
}

/// The client's startup parameters that may go upstream (see [`STRIPPED_PARAMS`]).
fn upstream_params(params: &[(String, String)]) -> Vec<(String, String)> {
    params
        .iter()
        .filter(|(k, _)| !STRIPPED_PARAMS.iter().any(|s| k.eq_ignore_ascii_case(s)) && !k.starts_with("_pq_."))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_settings_become_set_statements() {
        assert_eq!(startup_setting_sql("Search_Path", "a, b").as_deref(), Some("SET search_path TO 'a, b'"));
        assert_eq!(startup_setting_sql("myapp.x", "it's").as_deref(), Some("SET myapp.x TO 'it''s'"));
        assert_eq!(startup_setting_sql("a;b", "x"), None);
        assert_eq!(startup_setting_sql("a.b.c", "x"), None);
        assert_eq!(startup_setting_sql("", "x"), None);
    }
}
