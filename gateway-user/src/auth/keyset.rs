//! A set of verification keys from one JWKS document (a file, or the identity provider's
//! answer): one [`DecodingKey`] and one [`Validation`] (allowing exactly the key's algorithm)
//! per `kid`, prepared once so verifying a token does no key parsing.

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use super::AuthError;
use super::claims::Checks;

/// Smallest RSA modulus accepted.
const MIN_RSA_BITS: usize = 2048;

/// What a key that cannot be used does to the whole key set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strictness {
    /// The set is refused (a JWKS file: its author should know).
    File,
    /// The key is skipped with a warning (an identity provider's set).
    Provider,
}

/// The keys of one JWKS, by `kid`.
pub struct KeySet {
    keys: HashMap<String, KeyEntry>,
}

pub(super) struct KeyEntry {
    pub alg: Algorithm,
    pub key: DecodingKey,
    pub validation: Validation,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySet").field("keys", &self.kids()).finish()
    }
}

impl KeySet {
    /// Parse JWKS text (`{"keys":[...]}`), with `checks` for the claims.
    ///
    /// Keys meant for encryption (`"use":"enc"`), keys without a `kid`, symmetric (`oct`) keys
    /// and unsupported key types/curves are skipped with a warning (identity providers publish
    /// such keys next to their signing keys). A malformed key of a supported type, a duplicate
    /// `kid`, or a declared `alg` that does not fit the key is an error with [`Strictness::File`]
    /// (the operator's file) and skipped with a warning with [`Strictness::Provider`] (one odd
    /// key of a provider must not cost every login). A JWKS with no usable key is an error.
    pub fn from_jwks(jwks_json: &str, checks: &Checks, strictness: Strictness) -> Result<KeySet, AuthError> {
        #[derive(Deserialize)]
        struct RawSet {
            keys: Vec<Value>,
        }
        let set: RawSet = serde_json::from_str(jwks_json)
            .map_err(|e| AuthError::Keys(format!("not a JWKS ({{\"keys\": [...]}}): {e}")))?;

        let mut keys = HashMap::new();
        for (i, raw) in set.keys.into_iter().enumerate() {
            let parsed = parse_key(i, raw, checks).and_then(|k| match k {
                Some((kid, _)) if keys.contains_key(&kid) => Err(AuthError::Keys(format!("duplicate kid {kid:?}"))),
                other => Ok(other),
            });
            match (parsed, strictness) {
                (Ok(Some((kid, entry))), _) => {
                    keys.insert(kid, entry);
                }
                (Ok(None), _) => {}
                (Err(e), Strictness::File) => return Err(e),
                (Err(e), Strictness::Provider) => tracing::warn!(index = i, error = %e, "skipping JWKS key"),
            }
        }
        if keys.is_empty() {
            return Err(AuthError::Keys("no usable signing key (RSA, EC or Ed25519 with a kid)".into()));
        }
        Ok(KeySet { keys })
    }

    pub(super) fn get(&self, kid: &str) -> Option<&KeyEntry> {
        self.keys.get(kid)
    }

    /// Key ids and their algorithms, sorted by kid.
    pub fn kids(&self) -> Vec<(String, Algorithm)> {
        let mut kids: Vec<(String, Algorithm)> = self.keys.iter().map(|(k, e)| (k.clone(), e.alg)).collect();
        kids.sort_by(|a, b| a.0.cmp(&b.0));
        kids
    }
}

/// One JWKS entry: `Ok(None)` for a key that is skipped.
fn parse_key(i: usize, raw: Value, checks: &Checks) -> Result<Option<(String, KeyEntry)>, AuthError> {
    let jwk: Jwk = match serde_json::from_value(raw) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(index = i, error = %e, "skipping unparseable JWKS entry");
            return Ok(None);
        }
    };
    let Some(kid) = jwk.common.key_id.clone().filter(|k| !k.is_empty()) else {
        tracing::warn!(index = i, "skipping JWKS key without kid");
        return Ok(None);
    };
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        tracing::debug!(kid, "skipping JWKS key with use=enc");
        return Ok(None);
    }
    let Some(alg) = key_algorithm(&jwk).map_err(|m| AuthError::Keys(format!("key {kid:?}: {m}")))? else {
        tracing::warn!(kid, "skipping JWKS key of unsupported type (only RSA, EC P-256/P-384, Ed25519)");
        return Ok(None);
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| AuthError::Keys(format!("key {kid:?}: {e}")))?;
    // Constructing the verifier parses the key (EC point / Ed25519 point); a dummy
    // verification surfaces a broken key now instead of on the first connection.
    jsonwebtoken::crypto::verify("AA", b"", &key, alg)
        .map_err(|e| AuthError::Keys(format!("key {kid:?} is unusable: {e}")))?;
    Ok(Some((kid, KeyEntry { alg, key, validation: checks.validation(alg) })))
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
            if bits < MIN_RSA_BITS {
                return Err(format!("RSA key too small ({bits} bits; need at least {MIN_RSA_BITS})"));
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

