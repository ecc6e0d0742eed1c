//! The key that signs checkpoints (see [`super::checkpoint`]): `audit.checkpoint_key`, a key
//! of its own (not the token key), read only by the writer.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::pkcs8::DecodePrivateKey as _;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use super::AuditError;
use crate::audit::chain;

/// Signs checkpoints with the gateway's Ed25519 checkpoint key.
pub struct CheckpointSigner {
    kid: String,
    key: SigningKey,
}

impl std::fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointSigner").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    pub fn new(kid: impl Into<String>, key: SigningKey) -> CheckpointSigner {
        CheckpointSigner { kid: kid.into(), key }
    }

    /// Load a PKCS#8 PEM Ed25519 private key (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem_file(path: &Path, kid: impl Into<String>) -> Result<CheckpointSigner, AuditError> {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| AuditError::Key { path: path.to_owned(), reason: e.to_string() })?;
        let key = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| AuditError::Key { path: path.to_owned(), reason: e.to_string() })?;
        Ok(CheckpointSigner::new(kid, key))
    }

    /// The key `audit.checkpoint_key` names, with kid `audit.checkpoint_kid`.
    pub fn from_config(cfg: &crate::config::Config) -> Result<CheckpointSigner, AuditError> {
        let unset = |key: &str| AuditError::Key {
            path: PathBuf::from(format!("audit.{key}")),
            reason: "not set: checkpoints need a key of their own (`pgward init` writes keys/checkpoint-key.pem and sets audit.checkpoint_key, audit.checkpoint_kid and audit.checkpoint_jwks)".into(),
        };
        let path = cfg.audit.checkpoint_key.as_ref().ok_or_else(|| unset("checkpoint_key"))?;
        let kid = cfg.audit.checkpoint_kid.clone().ok_or_else(|| unset("checkpoint_kid"))?;
        CheckpointSigner::from_pkcs8_pem_file(&cfg.resolve(path), kid)
    }

    /// Same as [`CheckpointSigner::from_pkcs8_pem_file`].
    pub fn from_pem_file(path: &Path, kid: impl Into<String>) -> Result<CheckpointSigner, AuditError> {
        CheckpointSigner::from_pkcs8_pem_file(path, kid)
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// base64url (no padding) Ed25519 signature over `pgward-checkpoint:{seq}:{hash}`.
    pub fn sign(&self, anchor_seq: u64, anchor_hash: &str) -> String {
        let msg = chain::checkpoint_message(anchor_seq, anchor_hash);
        let sig = self.key.sign(msg.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig.to_bytes())
    }
}
