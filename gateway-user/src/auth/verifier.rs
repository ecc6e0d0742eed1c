//! Token verification against a JWKS file.
//!
//! Everything that can be prepared is prepared at load time: one [`DecodingKey`] and one
//! [`Validation`] (allowing exactly the key's algorithm) per `kid`. `verify` then does a cheap
//! header pre-check (alg/kid) before any cryptography, so junk passwords cost almost nothing.

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use super::{AuthError, Identity, now_secs};
use crate::config::Config;

/// Longest password we even try to parse as a token.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest jti/sub copied from an *unverified* payload into an error (audit only).
const MAX_UNVERIFIED_ID_LEN: usize = 200;

/// Verifies tokens against the JWKS from the config.
pub struct Verifier {
    keys: HashMap<String, KeyEntry>,
    leeway: u64,
}

struct KeyEntry {
    alg: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kids: Vec<(&str, Algorithm)> =
            self.keys.iter().map(|(k, e)| (k.as_str(), e.alg)).collect();
        kids.sort_by(|a, b| a.0.cmp(b.0));
        f.debug_struct("Verifier").field("keys", &kids).field("leeway", &self.leeway).finish()
    }
}

/// The claims we read after the signature and the standard claims were checked. Everything is
/// a raw `Value` so a strange claim type gives a precise error instead of a generic JSON one.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<Value>,
    #[serde(default)]
    jti: Option<Value>,
    #[serde(default)]
    iat: Option<Value>,
    #[serde(default)]
    exp: Option<Value>,
    #[serde(default)]
    groups: Option<Value>,
}

impl Verifier {
    /// Load the JWKS named by `auth.jwks` (relative to the config file).
    pub fn load(cfg: &Config) -> Result<Verifier, AuthError> {
        let path = cfg.resolve(&cfg.auth.jwks);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| AuthError::Keys(format!("cannot read JWKS {}: {e}", path.display())))?;
        Verifier::from_jwks(&text, &cfg.auth.issuer, &cfg.auth.audience, cfg.auth.leeway_secs)
            .map_err(|e| match e {
                AuthError::Keys(m) => AuthError::Keys(format!("JWKS {}: {m}", path.display())),
                other => other,
            })
    }

    /// Build a verifier from JWKS text (`{"keys":[...]}`).
    ///
    /// Keys meant for encryption (`"use":"enc"`), keys without a `kid`, symmetric (`oct`) keys
    /// and unsupported key types/curves are skipped with a warning. A malformed key of a
    /// supported type, a duplicate `kid`, or a declared `alg` that does not fit the key is an
    /// error, as is a JWKS with no usable key.
    pub fn from_jwks(
        jwks_json: &str,
        issuer: &str,
        audience: &str,
        leeway_secs: u64,
    ) -> Result<Verifier, AuthError> {
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<Value>,
        }
        let set: RawSet = serde_json::from_str(jwks_json)
            .map_err(|e| AuthError::Keys(format!("not a JWKS ({{\"keys\": [...]}}): {e}")))?;

        let mut keys = HashMap::new();
        for (i, raw) in set.keys.into_iter().enumerate() {
            let jwk: Jwk = match serde_json::from_value(raw) {
                Ok(j) => j,
                Err(e) => {
                    tracing::warn!(index = i, error = %e, "skipping unparseable JWKS entry");
                    continue;
                }
            };
            let Some(kid) = jwk.common.key_id.clone().filter(|k| !k.is_empty()) else {
                tracing::warn!(index = i, "skipping JWKS key without kid");
                continue;
            };
            if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
                tracing::debug!(kid, "skipping JWKS key with use=enc");
                continue;
            }
            let Some(alg) =
                key_algorithm(&jwk).map_err(|m| AuthError::Keys(format!("key {kid:?}: {m}")))?
            else {
                tracing::warn!(
                    kid,
                    "skipping JWKS key of unsupported type (only RSA, EC P-256/P-384, Ed25519)"
                );
                continue;
            };
            let key = DecodingKey::from_jwk(&jwk)
                .map_err(|e| AuthError::Keys(format!("key {kid:?}: {e}")))?;
            // Constructing the verifier parses the key (EC point / Ed25519 point); a dummy
            // verification surfaces a broken key now instead of on the first connection.
            jsonwebtoken::crypto::verify("AA", b"", &key, alg)
                .map_err(|e| AuthError::Keys(format!("key {kid:?} is unusable: {e}")))?;

            let mut validation = Validation::new(alg);
            validation.leeway = leeway_secs;
            validation.validate_exp = true;
            validation.validate_nbf = true;
            validation.validate_aud = true;
            validation.set_issuer(&[issuer]);
            validation.set_audience(&[audience]);
            validation.set_required_spec_claims(&["exp", "nbf", "sub", "iss", "aud"]);

            if keys.insert(kid.clone(), KeyEntry { alg, key, validation }).is_some() {
                return Err(AuthError::Keys(format!("duplicate kid {kid:?}")));
            }
        }
        if keys.is_empty() {
            return Err(AuthError::Keys(
                "no usable signing key (RSA, EC or Ed25519 with a kid)".into(),
            ));
        }
        Ok(Verifier { keys, leeway: leeway_secs })
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
        let fail = |reason: &str| invalid(reason, Some(parts.payload));

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
        let kid = match header.get("kid") {
            Some(Value::String(k)) if !k.is_empty() => k.as_str(),
            _ => return Err(fail("token has no key id (kid)")),
        };
        let Some(entry) = self.keys.get(kid) else {
            return Err(fail("unknown key id"));
        };
        if alg != entry.alg {
            return Err(fail(&format!(
                "algorithm {alg:?} does not match key (expects {:?})",
                entry.alg
            )));
        }

        // Signature, then exp/nbf (with leeway), iss, aud, presence of sub/exp/nbf/iss/aud.
        let data = jsonwebtoken::decode::<Claims>(token, &entry.key, &entry.validation)
            .map_err(|e| fail(&reason_for(&e)))?;
        let claims = data.claims;

        // The rest of the required claims, now that the token is known to be authentic.
        let sub = match claims.sub {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => return Err(fail("missing required claim sub")),
        };
        let jti = match claims.jti {
            Some(Value::String(s)) if !s.is_empty() => s,
            Some(Value::String(_)) | None => return Err(fail("missing required claim jti")),
            Some(_) => return Err(fail("malformed claim jti")),
        };
        let iat = match claims.iat {
            None => return Err(fail("missing required claim iat")),
            Some(v) => numeric_date(&v).ok_or_else(|| fail("malformed claim iat"))?,
        };
        if iat > now_secs().saturating_add(self.leeway) {
            return Err(fail("token issued in the future"));
        }
        let expires_at = claims
            .exp
            .as_ref()
            .and_then(numeric_date)
            .ok_or_else(|| fail("malformed claim exp"))?;
        let groups = match claims.groups {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                let mut groups = Vec::with_capacity(items.len());
                for item in items {
                    match item {
                        Value::String(g) => groups.push(g),
                        _ => {
                            return Err(fail(
                                "malformed claim groups (must be an array of strings)",
                            ));
                        }
                    }
                }
                groups
            }
            Some(_) => return Err(fail("malformed claim groups (must be an array of strings)")),
        };

        if sub != startup_user {
            return Err(AuthError::UserMismatch { sub, user: startup_user.to_owned(), jti });
        }
        Ok(Identity {
            user: sub,
            groups,
            jti,
            expires_at: i64::try_from(expires_at).unwrap_or(i64::MAX),
            issued_at: i64::try_from(iat).unwrap_or(i64::MAX),
        })
    }
}

/// The algorithm tokens signed by `jwk` must use, `Ok(None)` for keys we skip, `Err` for keys
/// that are broken or contradict themselves.
fn key_algorithm(jwk: &Jwk) -> Result<Option<Algorithm>, String> {
    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
        tracing::warn!("symmetric (oct) key in JWKS is ignored: HS* tokens are never accepted");
        return Ok(None);
    }
    let declared = jwk.common.key_algorithm;
    let declared_alg = match declared {
        None => None,
        Some(KeyAlgorithm::UNKNOWN_ALGORITHM) => return Err("unknown alg".into()),
        Some(ka) => match Algorithm::try_from(ka) {
            Ok(a) => Some(a),
            // RSA1_5 / RSA-OAEP: an encryption key without use=enc; not for us.
            Err(_) => return Ok(None),
        },
    };
    if declared_alg.is_some_and(|a| a.family() == jsonwebtoken::AlgorithmFamily::Hmac) {
        return Err(format!("symmetric alg {declared:?} is never accepted"));
    }
    let check = |natural: Algorithm, allowed: &[Algorithm]| -> Result<Option<Algorithm>, String> {
        match declared_alg {
            None => Ok(Some(natural)),
            Some(a) if allowed.contains(&a) => Ok(Some(a)),
            Some(a) => Err(format!("declared alg {a:?} does not fit the key type")),
        }
    };
    match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let n = b64(&p.n).ok_or("RSA modulus n is not base64url")?;
            let e = b64(&p.e).ok_or("RSA exponent e is not base64url")?;
            let bits = significant_bits(&n);
            if bits < 2048 {
                return Err(format!("RSA key too small ({bits} bits; need at least 2048)"));
            }
            if e.iter().all(|b| *b == 0) {
                return Err("RSA exponent is zero".into());
            }
            check(
                Algorithm::RS256,
                &[
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                    Algorithm::PS384,
                    Algorithm::PS512,
                ],
            )
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let (natural, len) = match p.curve {
                EllipticCurve::P256 => (Algorithm::ES256, 32),
                EllipticCurve::P384 => (Algorithm::ES384, 48),
                _ => return Ok(None),
            };
            let x = b64(&p.x).ok_or("EC x is not base64url")?;
            let y = b64(&p.y).ok_or("EC y is not base64url")?;
            if x.len() != len || y.len() != len {
                return Err(format!("EC coordinates must be {len} bytes"));
            }
            check(natural, &[natural])
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            if p.curve != EllipticCurve::Ed25519 {
                return Ok(None);
            }
            // Checked here: jsonwebtoken slices the key to 32 bytes and would panic on less.
            let x = b64(&p.x).ok_or("OKP x is not base64url")?;
            if x.len() != 32 {
                return Err("Ed25519 public key must be 32 bytes".into());
            }
            check(Algorithm::EdDSA, &[Algorithm::EdDSA])
        }
        _ => Ok(None),
    }
}

fn b64(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

fn significant_bits(be: &[u8]) -> usize {
    match be.iter().position(|b| *b != 0) {
        None => 0,
        Some(i) => (be.len() - i - 1) * 8 + (8 - be[i].leading_zeros() as usize),
    }
}

struct JwtParts<'a> {
    header: &'a str,
    payload: &'a str,
}

/// `header.payload.signature` with base64url segments (the signature may be empty, as in
/// `alg: none` tokens, so those can be reported as such).
fn split_jwt(token: &str) -> Option<JwtParts<'_>> {
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
fn decode_json_segment(seg: &str) -> Option<serde_json::Map<String, Value>> {
    let bytes = URL_SAFE_NO_PAD.decode(seg).ok()?;
    match serde_json::from_slice(&bytes).ok()? {
        Value::Object(m) => Some(m),
        _ => None,
    }
}

fn invalid(reason: &str, payload: Option<&str>) -> AuthError {
    let (jti, sub) = payload.map(unverified_ids).unwrap_or((None, None));
    AuthError::InvalidToken { reason: reason.to_owned(), jti, sub }
}

/// jti and sub from an unverified payload, for the audit record of a failed login only.
fn unverified_ids(payload: &str) -> (Option<String>, Option<String>) {
    let Some(claims) = decode_json_segment(payload) else {
        return (None, None);
    };
    let get = |name: &str| match claims.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Some(truncate(s, MAX_UNVERIFIED_ID_LEN)),
        _ => None,
    };
    (get("jti"), get("sub"))
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

/// A JWT NumericDate as whole seconds (non-negative).
fn numeric_date(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
                .map(|f| f as u64)
        }),
        _ => None,
    }
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
