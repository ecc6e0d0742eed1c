//! Token verification against the current keys (a JWKS file, or the identity provider's keys
//! kept current by [`super::key_store::Refresher`]).
//!
//! `verify` does a cheap header pre-check (alg/kid) before any cryptography, so junk passwords
//! cost almost nothing, then the signature and the claims ([`Checks`]). It never waits: a key id
//! the current keys lack refuses the token and asks for a fetch of remote keys. A login uses
//! `verify_login`, which then waits (at most `LOGIN_KEY_WAIT`) for that fetch and verifies
//! again, so the first token signed with a provider's new key logs in.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use super::claims::{Checks, token_hash};
use super::jwks_fetch::Fetcher;
use super::key_store::{KeyStatus, KeyStore, Refresher};
use super::keyset::{KeySet, Strictness};
use super::{AuthError, Identity, now_secs};
use crate::config::Config;

/// Longest password we even try to parse as a token.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest jti/sub copied from an *unverified* payload into an error (audit only).
const MAX_UNVERIFIED_ID_LEN: usize = 200;
/// What a client is told while no remote keys were ever fetched (the cause is in the log).
const NO_KEYS_YET: &str =
    "the identity provider's token keys have not been fetched yet; logins are refused until they are (see pgward's log)";

/// Longest a login whose token names a key id the current keys lack waits for the fetch that
/// asks for (the refresher fetches no sooner than `auth.jwks_min_refresh` after the last one).
const LOGIN_KEY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Verifies tokens against the keys from the config.
pub struct Verifier {
    keys: Arc<KeyStore>,
    checks: Checks,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier").field("keys", &self.keys.current()).field("checks", &self.checks).finish()
    }
}

impl Verifier {
    /// The keys named by `[auth]`: the JWKS file (relative to the config file), or one fetch of
    /// the identity provider's keys now (for the CLI; `serve` uses [`Verifier::start`]).
    pub fn load(cfg: &Config) -> Result<Verifier, AuthError> {
        let checks = Checks::from_config(&cfg.auth);
        let Some(fetcher) = Fetcher::from_config(cfg)? else {
            return Verifier::load_file(cfg, checks);
        };
        let fetched = std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start a runtime: {e}"))?;
                rt.block_on(fetcher.fetch())
            })
            .join()
            .unwrap_or_else(|_| Err("the fetch thread panicked".into()))
        })
        .map_err(|e| AuthError::Keys(format!("cannot fetch the identity provider's keys: {e}")))?;
        let keys = KeySet::from_jwks(&fetched.body, &checks, Strictness::Provider)
            .map_err(|e| AuthError::Keys(format!("JWKS {}: {e}", fetched.jwks_url)))?;
        Ok(Verifier { keys: Arc::new(KeyStore::fixed(keys, fetched.jwks_url)), checks })
    }

    /// For `serve`: the JWKS file, or the identity provider's keys — fetched once now (a
    /// failure is logged and every login refused until a fetch succeeds) and then kept current
    /// by a task on the current runtime, whose handle is returned.
    pub async fn start(cfg: &Config) -> Result<(Verifier, Option<tokio::task::JoinHandle<()>>), AuthError> {
        let checks = Checks::from_config(&cfg.auth);
        let Some(fetcher) = Fetcher::from_config(cfg)? else {
            return Ok((Verifier::load_file(cfg, checks)?, None));
        };
        let store = Arc::new(KeyStore::remote(fetcher.describe()));
        let status_dir = Some(crate::access::state_dir(cfg)).filter(|d| d.is_dir());
        let a = &cfg.auth;
        let refresher = Refresher::new(store.clone(), fetcher, checks.clone(), a.jwks_refresh, a.jwks_min_refresh, status_dir);
        let ok = refresher.refresh_once().await;
        let task = tokio::spawn(refresher.run(ok));
        Ok((Verifier { keys: store, checks }, Some(task)))
    }

    fn load_file(cfg: &Config, checks: Checks) -> Result<Verifier, AuthError> {
        let Some(file) = &cfg.auth.jwks else {
            return Err(AuthError::Keys("auth.jwks is not set".into()));
        };
        let path = cfg.resolve(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| AuthError::Keys(format!("cannot read JWKS {}: {e}", path.display())))?;
        let keys = KeySet::from_jwks(&text, &checks, Strictness::File).map_err(|e| match e {
            AuthError::Keys(m) => AuthError::Keys(format!("JWKS {}: {m}", path.display())),
            other => other,
        })?;
        Ok(Verifier { keys: Arc::new(KeyStore::fixed(keys, path.display().to_string())), checks })
    }

    /// A verifier from JWKS text (`{"keys":[...]}`) with `checks`.
    pub fn from_jwks(jwks_json: &str, checks: Checks) -> Result<Verifier, AuthError> {
        let keys = KeySet::from_jwks(jwks_json, &checks, Strictness::File)?;
        Ok(Verifier { keys: Arc::new(KeyStore::fixed(keys, "(inline)".into())), checks })
    }

    /// Where the keys came from and when (for `pgward doctor`).
    pub fn key_status(&self) -> KeyStatus {
        self.keys.status()
    }

    /// [`verify`](Self::verify) for a login: when the token names a key id the current remote
    /// keys lack (an identity provider that rotated its keys), wait for the fetch that asks for
    /// — at most `LOGIN_KEY_WAIT` — and verify once more. The session's own task waits; the
    /// event loop goes on.
    pub async fn verify_login(&self, token: &str, startup_user: &str) -> Result<Identity, AuthError> {
        let mut attempts = self.keys.attempts();
        let first = self.verify(token, startup_user);
        if first.is_ok() || !self.keys.is_remote() || !self.names_unknown_kid(token) {
            return first;
        }
        let before = *attempts.borrow_and_update();
        match tokio::time::timeout(LOGIN_KEY_WAIT, attempts.wait_for(|n| *n > before)).await {
            Ok(Ok(_)) => self.verify(token, startup_user),
            _ => first,
        }
    }

    /// Whether `token`'s header names a key id the current keys lack (or there are none yet).
    fn names_unknown_kid(&self, token: &str) -> bool {
        let kid = split_jwt(token.trim_ascii()).and_then(|p| decode_json_segment(p.header)).and_then(|h| match h.get("kid") {
            Some(Value::String(k)) if !k.is_empty() => Some(k.clone()),
            _ => None,
        });
        match (kid, self.keys.current()) {
            (Some(_), None) => true,
            (Some(kid), Some(keys)) => keys.get(&kid).is_none(),
            (None, _) => false,
        }
    }

    /// Verify `token` for a client that sent `startup_user` in its StartupMessage.
    pub fn verify(&self, token: &str, startup_user: &str) -> Result<Identity, AuthError> {
        let token = token.trim_ascii();
        let Some(parts) = split_jwt(token) else {
            return Err(invalid("password is not a valid token", None));
        };
        let Some(header) = decode_json_segment(parts.header) else {
            return Err(invalid("password is not a valid token", None));
        };
        let fail = |reason: &str| invalid(reason, Some(self.unverified_ids(parts.payload, token)));

        // Header pre-checks: decide on alg and key before touching any cryptography.
        let alg_name = match header.get("alg") {
            Some(Value::String(a)) => a.as_str(),
            _ => return Err(fail("token header has no alg")),
        };
        if alg_name.eq_ignore_ascii_case("none") {
            return Err(fail("unsigned token (alg none) rejected"));
        }
        if alg_name.to_ascii_uppercase().starts_with("HS") {
            // Never accept symmetric algorithms: HS256 with the *public* key as the secret is
            // the classic algorithm-confusion forgery.
            return Err(fail(&format!("symmetric algorithm {} rejected", printable(alg_name))));
        }
        let Ok(alg) = alg_name.parse::<Algorithm>() else {
            return Err(fail(&format!("unsupported algorithm {}", printable(alg_name))));
        };
        if header.contains_key("crit") {
            // RFC 7515 §4.1.11: a token whose critical extensions are not understood must be
            // refused, and pgward understands none.
            return Err(fail("critical header extensions (crit) are not supported"));
        }
        let kid = match header.get("kid") {
            Some(Value::String(k)) if !k.is_empty() => k.as_str(),
            _ => return Err(fail("token has no key id (kid)")),
        };
        let Some(keys) = self.keys.current() else {
            self.keys.unknown_kid();
            return Err(AuthError::Keys(NO_KEYS_YET.into()));
        };
        let Some(entry) = keys.get(kid) else {
            self.keys.unknown_kid();
            return Err(fail("unknown key id"));
        };
        if alg != entry.alg {
            return Err(fail(&format!("algorithm {alg:?} does not match key (expects {:?})", entry.alg)));
        }

        // Signature, then exp/nbf (with leeway), iss, aud; then the rest of the claims.
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &entry.key, &entry.validation)
            .map_err(|e| fail(&reason_for(&e)))?;
        let identity = self.checks.identity(&data.claims, token, now_secs()).map_err(|r| fail(&r))?;
        if identity.user != startup_user {
            return Err(AuthError::UserMismatch { sub: identity.user, user: startup_user.to_owned(), jti: identity.jti });
        }
        Ok(identity)
    }

    /// The token id and user name from an unverified payload, for the audit record of a failed
    /// login only.
    fn unverified_ids(&self, payload: &str, token: &str) -> (Option<String>, Option<String>) {
        let Some(claims) = decode_json_segment(payload) else {
            return (None, None);
        };
        let jti = match claims.get("jti") {
            Some(Value::String(s)) if !s.is_empty() => truncate(s, MAX_UNVERIFIED_ID_LEN),
            _ => token_hash(token),
        };
        let user = self.checks.user_claim(&claims).map(|u| truncate(u, MAX_UNVERIFIED_ID_LEN));
        (Some(jti), user)
    }
}

pub(super) struct JwtParts<'a> {
    pub header: &'a str,
    pub payload: &'a str,
}

/// `header.payload.signature` with base64url segments (the signature may be empty, as in
/// `alg: none` tokens, so those can be reported as such).
pub(super) fn split_jwt(token: &str) -> Option<JwtParts<'_>> {
    if token.is_empty() || token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let mut it = token.split('.');
    let (header, payload, signature) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || header.is_empty() || payload.is_empty() {
        return None;
    }
    let b64url = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !(b64url(header) && b64url(payload) && b64url(signature)) {
        return None;
    }
    Some(JwtParts { header, payload })
}

/// A base64url JSON object segment.
pub(super) fn decode_json_segment(seg: &str) -> Option<serde_json::Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(seg).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

fn invalid(reason: &str, ids: Option<(Option<String>, Option<String>)>) -> AuthError {
    let (jti, sub) = ids.unwrap_or((None, None));
    AuthError::InvalidToken { reason: reason.to_owned(), jti, sub }
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// An attacker-controlled header value, safe to put in a log line.
fn printable(s: &str) -> String {
    let t = truncate(s, 32);
    if t.bytes().all(|b| b.is_ascii_graphic()) { t } else { format!("{t:?}") }
}

fn reason_for(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature => "bad signature".into(),
        K::ExpiredSignature => "token expired".into(),
        K::ImmatureSignature => "token not yet valid".into(),
        K::InvalidAudience => "wrong audience".into(),
        K::InvalidIssuer => "wrong issuer".into(),
        K::InvalidSubject => "wrong subject".into(),
        K::MissingRequiredClaim(c) => format!("missing required claim {c}"),
        K::InvalidClaimFormat(c) => format!("malformed claim {c}"),
        K::InvalidAlgorithm | K::MissingAlgorithm => "algorithm not allowed for this key".into(),
        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => "malformed token".into(),
        _ => "token rejected".into(),
    }
}
