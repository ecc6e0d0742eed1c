//! Issuing tokens with the gateway's own Ed25519 key, and creating that key.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::{AuthError, now_secs, write_file_mode};
use crate::config::Config;

/// File names written by [`generate_signing_key`].
pub const SIGNING_KEY_FILE: &str = "signing-key.pem";
pub const JWKS_FILE: &str = "jwks.json";

/// Absolute path of the PKCS#8 PEM signing key named in the config.
pub fn signing_key_pem_path(cfg: &Config) -> PathBuf {
    cfg.resolve(&cfg.auth.signing_key)
}

/// Issues EdDSA tokens with the configured signing key.
pub struct Signer {
    key: EncodingKey,
    kid: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("kid", &self.kid).finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct IssuedClaims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    groups: &'a [String],
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: String,
}

impl Signer {
    /// Load `auth.signing_key` (PKCS#8 PEM, Ed25519) with kid `auth.signing_kid`.
    pub fn load(cfg: &Config) -> Result<Signer, AuthError> {
        let path = signing_key_pem_path(cfg);
        let pem = std::fs::read_to_string(&path).map_err(|e| {
            AuthError::Keys(format!("cannot read signing key {}: {e}", path.display()))
        })?;
        Signer::from_pem(&pem, &cfg.auth.signing_kid)
            .map_err(|e| AuthError::Keys(format!("signing key {}: {e}", path.display())))
    }

    /// A signer from PKCS#8 PEM text of an Ed25519 private key.
    pub fn from_pem(pem: &str, kid: &str) -> Result<Signer, AuthError> {
        if kid.is_empty() {
            return Err(AuthError::Keys("signing kid is empty".into()));
        }
        // Parse with ed25519-dalek first: it checks the key properly (and the embedded public
        // key, if any), so a bad file fails here rather than at the first `issue`.
        ed25519_dalek::SigningKey::from_pkcs8_pem(pem)
            .map_err(|e| AuthError::Keys(format!("not a PKCS#8 Ed25519 private key: {e}")))?;
        let key = EncodingKey::from_ed_pem(pem.as_bytes())
            .map_err(|e| AuthError::Keys(format!("not a PKCS#8 Ed25519 private key: {e}")))?;
        Ok(Signer { key, kid: kid.to_owned() })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// A signed JWT for `user`: header `{alg: EdDSA, kid}`, claims iss, aud, sub, groups, iat,
    /// nbf (= iat), exp (= iat + ttl, whole seconds) and a fresh uuid v4 jti.
    pub fn issue(
        &self,
        user: &str,
        groups: &[String],
        ttl: Duration,
        issuer: &str,
        audience: &str,
    ) -> Result<String, AuthError> {
        if user.is_empty() {
            return Err(AuthError::Keys("cannot issue a token for an empty user name".into()));
        }
        if ttl.as_secs() == 0 {
            return Err(AuthError::Keys("token lifetime must be at least one second".into()));
        }
        let now = now_secs();
        let claims = IssuedClaims {
            iss: issuer,
            aud: audience,
            sub: user,
            groups,
            iat: now,
            nbf: now,
            exp: now.saturating_add(ttl.as_secs()),
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| AuthError::Keys(format!("signing failed: {e}")))
    }
}

/// Create a fresh Ed25519 key: `dir/signing-key.pem` (PKCS#8 v1 PEM, mode 0600) and
/// `dir/jwks.json` holding its public half as an OKP JWK with the given `kid`. Creates `dir`
/// if needed and overwrites existing files.
pub fn generate_signing_key(dir: &Path, kid: &str) -> Result<(), AuthError> {
    write_ed25519_key(&dir.join(SIGNING_KEY_FILE), &dir.join(JWKS_FILE), kid, 0o600)
}

/// Create a fresh Ed25519 key at `key_path` (PKCS#8 v1 PEM, mode `key_mode`) and a JWKS at
/// `jwks_path` holding its public half with the given `kid`. Creates the directories if needed
/// and overwrites existing files.
pub fn write_ed25519_key(key_path: &Path, jwks_path: &Path, kid: &str, key_mode: u32) -> Result<(), AuthError> {
    if kid.is_empty() {
        return Err(AuthError::Keys("kid must not be empty".into()));
    }
    let io = |what: &str, p: &Path, e: std::io::Error| {
        AuthError::Keys(format!("cannot write {what} {}: {e}", p.display()))
    };
    for dir in [key_path.parent(), jwks_path.parent()].into_iter().flatten() {
        std::fs::create_dir_all(dir).map_err(|e| io("directory", dir, e))?;
    }

    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|e| AuthError::Keys(format!("no randomness for a key: {e}")))?;
    let signing = ed25519_dalek::SigningKey::from_bytes(&secret);
    let public = signing.verifying_key().to_bytes();
    // PKCS#8 v1 (RFC 8410 without the optional public key): what `openssl genpkey -algorithm
    // ed25519` writes, readable by every PKCS#8 parser.
    let keypair = KeypairBytes { secret_key: secret, public_key: None };
    secret.fill(0);
    let pem = keypair
        .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map_err(|e| AuthError::Keys(format!("cannot encode key: {e}")))?;

    // Written owner-writable (also over an existing read-only key), then given its mode.
    write_file_mode(key_path, pem.as_bytes(), 0o600).map_err(|e| io("signing key", key_path, e))?;
    std::fs::set_permissions(key_path, std::fs::Permissions::from_mode(key_mode))
        .map_err(|e| io("signing key", key_path, e))?;

    let jwks = serde_json::json!({
        "keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "x": URL_SAFE_NO_PAD.encode(public),
            "kid": kid,
            "alg": "EdDSA",
            "use": "sig",
        }]
    });
    let mut text = serde_json::to_string_pretty(&jwks)
        .map_err(|e| AuthError::Keys(format!("cannot encode JWKS: {e}")))?;
    text.push('\n');
    write_file_mode(jwks_path, text.as_bytes(), 0o644).map_err(|e| io("JWKS", jwks_path, e))?;
    Ok(())
}
