//! Identity tokens: verify a JWT (the client's password) against the configured keys, and issue
//! tokens with the gateway's own signing key.
//!
//! * [`Verifier`] — built once from `[auth]`; `verify` runs once per connection.
//! * `claims` — which claims a token must carry and how they map to an [`Identity`]
//!   (`auth.required_claims`, `auth.username_claim`, `auth.groups_claim`), and the token id.
//! * `keyset` — the keys of one JWKS document, prepared for verifying.
//! * `jwks_fetch` — an identity provider's JWKS over HTTPS (`auth.jwks_url`, OIDC discovery).
//! * `key_store` — the keys sessions read, and the task that keeps remote keys current.
//! * [`Signer`] — `pgward token issue`: EdDSA tokens signed with `auth.signing_key`.
//! * [`generate_signing_key`] — `pgward init`: a fresh Ed25519 key (PKCS#8 PEM) + its JWKS.
//!
//! The same Ed25519 key also signs audit checkpoints (the audit module reads the PEM and the
//! OKP entry of the JWKS itself).

mod claims;
mod jwks_fetch;
mod key_store;
mod keyset;
mod signer;
mod verifier;

use crate::sqlstate;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod idp_tests;

pub use signer::{JWKS_FILE, SIGNING_KEY_FILE, Signer, generate_signing_key, signing_key_pem_path, write_ed25519_key};
pub use claims::{Checks, TOKEN_HASH_PREFIX, former_token_hash, token_hash, token_id};
pub use key_store::{KEY_STATUS_FILE, KeyStatus};
pub use verifier::Verifier;

/// Who a session belongs to, from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The name the user connects as (`auth.username_claim`, `sub` by default).
    pub user: String,
    pub groups: Vec<String>,
    /// The token id: its `jti`, or `sha256:` and the SHA-256 of the token when it has none
    /// ([`token_id`]); revocations and audit records name tokens by it.
    pub jti: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// The token's `iat` (unix seconds; its `nbf` when it has no `iat`, 0 with neither): a
    /// revocation by user kills tokens issued at or before it.
    pub issued_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token is not acceptable (bad signature, expired, wrong aud/iss, unknown kid, ...).
    /// SQLSTATE 28P01. `jti`/`sub` are read from the *unverified* payload when possible, for the
    /// audit record only — never trust them for anything else.
    #[error("invalid token: {reason}")]
    InvalidToken { reason: String, jti: Option<String>, sub: Option<String> },
    /// Token is valid but the startup user is not its subject. SQLSTATE 28000.
    #[error("token user {sub:?} does not match user {user:?}")]
    UserMismatch { sub: String, user: String, jti: String },
    /// Keys could not be loaded / key material problem (server side).
    #[error("key error: {0}")]
    Keys(String),
}

impl AuthError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::InvalidToken { .. } => sqlstate::INVALID_PASSWORD,
            AuthError::UserMismatch { .. } | AuthError::Keys(_) => sqlstate::INVALID_AUTHORIZATION_SPECIFICATION,
        }
    }
    pub fn jti(&self) -> Option<&str> {
        match self {
            AuthError::InvalidToken { jti, .. } => jti.as_deref(),
            AuthError::UserMismatch { jti, .. } => Some(jti),
            AuthError::Keys(_) => None,
        }
    }
    pub fn sub(&self) -> Option<&str> {
        match self {
            AuthError::InvalidToken { sub, .. } => sub.as_deref(),
            AuthError::UserMismatch { sub, .. } => Some(sub),
            AuthError::Keys(_) => None,
        }
    }
}

/// Write `data` to `path` with permission bits `mode` (e.g. 0o600 for private keys). The file is
/// created with `mode` from the start; an existing file is narrowed to `mode` before it is
/// truncated, so secret bytes never sit in a file with looser permissions.
pub(crate) fn write_file_mode(
    path: &std::path::Path,
    data: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if path.exists() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Current Unix time in seconds, as token claims count it.
fn now_secs() -> u64 {
    crate::host::clock::now_unix().max(0) as u64
}
