//! Identity tokens: verify a JWT (the client's password) against the configured JWKS, and issue
//! tokens with the gateway's own signing key. Also signs/verifies audit checkpoints.

use crate::config::Config;

/// Who a session belongs to, from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: String,
    pub groups: Vec<String>,
    pub jti: String,
    /// Unix seconds.
    pub expires_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token is not acceptable (bad signature, expired, wrong aud/iss, unknown kid, ...).
    /// SQLSTATE 28P01.
    #[error("invalid token: {reason}")]
    InvalidToken { reason: String, jti: Option<String>, sub: Option<String> },
    /// Token is valid but the startup user is not its subject. SQLSTATE 28000.
    #[error("token subject {sub:?} does not match user {user:?}")]
    UserMismatch { sub: String, user: String, jti: String },
    /// Keys could not be loaded / key material problem (server side).
    #[error("key error: {0}")]
    Keys(String),
}

impl AuthError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            AuthError::InvalidToken { .. } => "28P01",
            AuthError::UserMismatch { .. } => "28000",
            AuthError::Keys(_) => "28000",
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

/// Verifies tokens against the JWKS from the config.
pub struct Verifier {
    _private: (),
}

impl Verifier {
    pub fn load(_cfg: &Config) -> Result<Verifier, AuthError> {
        Err(AuthError::Keys("not implemented".into()))
    }
    /// Verify `token` for a client that sent `startup_user` in its StartupMessage.
    pub fn verify(&self, _token: &str, _startup_user: &str) -> Result<Identity, AuthError> {
        Err(AuthError::Keys("not implemented".into()))
    }
}
