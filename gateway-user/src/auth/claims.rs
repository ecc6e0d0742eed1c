//! The claims of an authentic token, read as RFC 7519 has them: which must be present, how the
//! present ones are checked, and where the user's name and groups are (`auth.username_claim`,
//! `auth.groups_claim`, so tokens of Keycloak, Entra ID, Okta and Google map as they are).
//!
//! The signature, `exp`, `nbf`, `iss` and `aud` are checked by `jsonwebtoken` with the
//! [`Validation`] built here; [`Checks::identity`] reads the rest once the token is authentic.

use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};
use sha2::Digest as _;

use super::Identity;
use crate::config::AuthConfig;

/// What a token id starts with when the token has no `jti`: the rest is the SHA-256 of the
/// token (hex), so a leaked token can be revoked by the token itself.
pub const TOKEN_HASH_PREFIX: &str = "sha256:";

/// How a token's claims are checked and mapped, from `[auth]`.
#[derive(Debug, Clone)]
pub struct Checks {
    issuer: String,
    audience: String,
    pub(super) leeway: u64,
    require_iat: bool,
    require_nbf: bool,
    require_jti: bool,
    /// JSON pointer to the user name.
    username: String,
    /// JSON pointer to the groups.
    groups: String,
}

/// An authentic token's claims that are not what `auth` expects, in words for the audit record.
pub type ClaimError = String;

impl Checks {
    pub fn from_config(auth: &AuthConfig) -> Checks {
        let required = |c: &str| auth.required_claims.iter().any(|r| r == c);
        Checks {
            issuer: auth.issuer.clone(),
            audience: auth.audience.clone(),
            leeway: auth.leeway_secs,
            require_iat: required("iat"),
            require_nbf: required("nbf"),
            require_jti: required("jti"),
            username: as_pointer(&auth.username_claim),
            groups: as_pointer(&auth.groups_claim),
        }
    }

    /// Checks with every claim required and the default mapping (`sub`, `/groups`): tokens as
    /// `pgward token issue` makes them.
    #[cfg(test)]
    pub fn strict(issuer: &str, audience: &str, leeway: u64) -> Checks {
        Checks {
            issuer: issuer.into(),
            audience: audience.into(),
            leeway,
            require_iat: true,
            require_nbf: true,
            require_jti: true,
            username: "/sub".into(),
            groups: "/groups".into(),
        }
    }

    /// The library's part for a key of algorithm `alg`: exactly that algorithm, `exp` (and
    /// `nbf` when present or required) with leeway, `iss` and `aud` (a string or an array
    /// holding the configured audience).
    pub fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.validate_aud = true;
        v.set_issuer(&[&self.issuer]);
        v.set_audience(&[&self.audience]);
        let mut required = vec!["exp", "iss", "aud"];
        if self.require_nbf {
            required.push("nbf");
        }
        v.set_required_spec_claims(&required);
        v
    }

    /// The user name as the claims give it, when it is a string (also for unverified claims,
    /// which name a failed login's user in its audit record).
    pub fn user_claim<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a str> {
        lookup(claims, &self.username).and_then(Value::as_str).filter(|s| !s.is_empty())
    }

    /// The session's identity from the claims of an authentic `token` (`now` in unix seconds).
    pub fn identity(&self, claims: &Map<String, Value>, token: &str, now: u64) -> Result<Identity, ClaimError> {
        if !matches!(claims.get("iss"), Some(Value::String(_))) {
            return Err("malformed claim iss".into());
        }
        let user = match lookup(claims, &self.username) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(format!("missing required claim {}", claim_name(&self.username)));
            }
            Some(_) => return Err(format!("malformed claim {} (must be a string)", claim_name(&self.username))),
        };
        let jti = match claims.get("jti") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            None | Some(Value::String(_)) if self.require_jti => return Err("missing required claim jti".into()),
            None | Some(Value::String(_)) => token_hash(token),
            Some(_) => return Err("malformed claim jti".into()),
        };
        let nbf = match claims.get("nbf") {
            None => None,
            Some(v) => Some(numeric_date(v).ok_or("malformed claim nbf")?),
        };
        let iat = match claims.get("iat") {
            None if self.require_iat => return Err("missing required claim iat".into()),
            None => None,
            Some(v) => Some(numeric_date(v).ok_or("malformed claim iat")?),
        };
        if iat.is_some_and(|t| t > now.saturating_add(self.leeway)) {
            return Err("token issued in the future".into());
        }
        let expires_at = claims.get("exp").and_then(numeric_date).ok_or("malformed claim exp")?;
        let groups = groups(lookup(claims, &self.groups), &self.groups)?;
        Ok(Identity {
            user,
            groups,
            jti,
            expires_at: to_i64(expires_at),
            // Without `iat` the token counts as issued at its `nbf`, or, with neither, before
            // any revocation of its user (a user revocation must not miss it).
            issued_at: iat.or(nbf).map_or(0, to_i64),
        })
    }
}

/// The id of a token for revocation and audit records: its `jti`, or [`TOKEN_HASH_PREFIX`] and
/// the SHA-256 of its signed part when it has none ([`token_hash`]). Read without verifying
/// anything (the CLI's `token revoke --token`); `None` when `token` is not a JWS in compact form.
pub fn token_id(token: &str) -> Option<String> {
    let token = token.trim_ascii();
    let parts = super::verifier::split_jwt(token)?;
    let payload = super::verifier::decode_json_segment(parts.payload)?;
    Some(match payload.get("jti") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => token_hash(token),
    })
}

/// For a token without `jti` (its id is a [`token_hash`]): the id pgward gave it before ids
/// left the signature out — [`TOKEN_HASH_PREFIX`] + hex SHA-256 of the whole compact token —
/// so that a revocation recorded under that id still refuses the token's logins.
pub fn former_token_hash(identity: &super::Identity, token: &str) -> Option<String> {
    identity.jti.starts_with(TOKEN_HASH_PREFIX).then(|| {
        format!("{TOKEN_HASH_PREFIX}{}", hex::encode(sha2::Sha256::digest(token.trim_ascii().as_bytes())))
    })
}

/// [`TOKEN_HASH_PREFIX`] + hex SHA-256 of the compact token's signed part, `header.payload`
/// (the whole text when it has no signature part). The signature is left out because it is not
/// unique: an ECDSA signature (r, s) of ES256/ES384 can be turned into another valid one,
/// (r, n - s), without the key, and a provider may sign the same claims twice. An id over the
/// signature would let the holder of a revoked token log in again under a new id.
pub fn token_hash(token: &str) -> String {
    let signed = token.rsplit_once('.').map_or(token, |(signed, _signature)| signed);
    format!("{TOKEN_HASH_PREFIX}{}", hex::encode(sha2::Sha256::digest(signed.as_bytes())))
}

/// A claim setting as a JSON pointer: `/a/b` stays, a bare name `n` becomes `/n` (with `~` and
/// `/` escaped, so `cognito:groups` or a URL-named claim is one top-level claim).
fn as_pointer(setting: &str) -> String {
    if setting.starts_with('/') {
        setting.to_owned()
    } else {
        format!("/{}", setting.replace('~', "~0").replace('/', "~1"))
    }
}

/// The value at `pointer` in the claims object.
fn lookup<'a>(claims: &'a Map<String, Value>, pointer: &str) -> Option<&'a Value> {
    let (first, rest) = match pointer.strip_prefix('/')?.split_once('/') {
        Some((f, r)) => (f, Some(r)),
        None => (pointer.strip_prefix('/')?, None),
    };
    let top = claims.get(&unescape(first))?;
    match rest {
        None => Some(top),
        Some(r) => top.pointer(&format!("/{r}")),
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

/// A pointer as a claim name for messages: `/sub` → `sub`, `/realm_access/roles` →
/// `realm_access/roles`.
fn claim_name(pointer: &str) -> String {
    unescape(pointer.trim_start_matches('/'))
}

/// The groups claim: absent or null is no group, an array must hold only strings; anything
/// else refuses the token (a group list that cannot be read must not silently become "no
/// groups", or one group, when a policy decides by group).
fn groups(v: Option<&Value>, pointer: &str) -> Result<Vec<String>, ClaimError> {
    let bad = || format!("malformed claim {} (must be an array of strings)", claim_name(pointer));
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => {
            items.iter().map(|i| i.as_str().map(str::to_owned).ok_or_else(bad)).collect()
        }
        Some(_) => Err(bad()),
    }
}

/// A JWT NumericDate as whole seconds (non-negative).
pub(super) fn numeric_date(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64().filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64).map(|f| f as u64)
        }),
        _ => None,
    }
}

fn to_i64(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}
