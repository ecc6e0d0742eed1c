//! The token keys (sign, then verify against the JWKS), the checkpoint key (only its owner
//! reads it; its signatures verify against the checkpoint JWKS) and the TLS certificate.

use std::os::unix::fs::MetadataExt;

use super::Ctx;
use super::report::{Check, Outcome, check};

pub(super) fn token_keys(cx: &Ctx) -> Check {
    let name = "token keys";
    let cfg = &cx.cfg;
    // With an identity provider's keys, `idp::provider_keys` checks those; here only that
    // pgward's own signing key signs (`pgward token issue`).
    let jwks_file = cfg.auth.jwks.as_ref().map(|p| cfg.resolve(p));
    let verifier = match &jwks_file {
        None => None,
        Some(path) => match crate::auth::Verifier::load(cfg) {
            Ok(v) => Some(v),
            Err(e) => {
                return check(
                    name,
                    Outcome::Fail,
                    format!("JWKS {}: {e}", path.display()),
                    Some("point auth.jwks at a JWKS file (pgward init writes keys/jwks.json)".into()),
                );
            }
        },
    };
    let key_path = cfg.resolve(&cfg.auth.signing_key);
    let signer = match crate::auth::Signer::load(cfg) {
        Ok(s) => s,
        Err(e) => return check(
            name,
            Outcome::Fail,
            format!("signing key {}: {e}", key_path.display()),
            Some(
                "auth.signing_key must be a PKCS#8 Ed25519 key (pgward init writes one); it signs tokens"
                    .into(),
            ),
        ),
    };
    if let Ok(m) = std::fs::metadata(&key_path)
        && m.mode() & 0o027 != 0
    {
        return check(
            name,
            Outcome::Fail,
            format!(
                "{} is {} (mode {:04o})",
                key_path.display(),
                if m.mode() & 0o007 != 0 { "readable by everyone" } else { "group-writable" },
                m.mode() & 0o7777
            ),
            Some(format!("chmod 0640 {} (owner root, group pgward)", key_path.display())),
        );
    }
    let token = match signer.issue(
        "pgward-doctor",
        &[],
        std::time::Duration::from_secs(60),
        &cfg.auth.issuer,
        &cfg.auth.audience,
    ) {
        Ok(t) => t,
        Err(e) => return check(name, Outcome::Fail, format!("cannot sign: {e}"), None),
    };
    let (Some(verifier), Some(path)) = (verifier, jwks_file) else {
        return check(
            name,
            Outcome::Pass,
            format!(
                "kid {} signs; tokens are verified against the identity provider's keys, so `pgward token issue` tokens are not accepted",
                cfg.auth.signing_kid
            ),
            None,
        );
    };
    if let Err(e) = verifier.verify(&token, "pgward-doctor") {
        return check(
            name,
            Outcome::Fail,
            format!("a token signed with kid {} does not verify: {e}", cfg.auth.signing_kid),
            Some(format!("put the signing key's public half (kid {}) into {}", cfg.auth.signing_kid, path.display())),
        );
    }
    check(
        name,
        Outcome::Pass,
        format!("kid {} signs; a token issued with it verifies against the JWKS", cfg.auth.signing_kid),
        None,
    )
}

pub(super) fn checkpoint_key(cx: &Ctx) -> Check {
    let name = "checkpoint key";
    let cfg = &cx.cfg;
    let signer = match crate::audit::CheckpointSigner::from_config(cfg) {
        Ok(s) => s,
        Err(e) => {
            return check(
                name,
                Outcome::Fail,
                e.to_string(),
                Some("run `pgward init` (or `pgward install`) to write keys/checkpoint-key.pem and its JWKS".into()),
            );
        }
    };
    if let Some(path) = cfg.audit.checkpoint_key.as_ref().map(|p| cfg.resolve(p))
        && let Ok(m) = std::fs::metadata(&path)
        && m.mode() & 0o077 != 0
    {
        return check(
            name,
            Outcome::Fail,
            format!("{} is readable or writable by others than its owner (mode {:04o})", path.display(), m.mode() & 0o7777),
            Some(format!("chmod 0400 {} (owner: the service user, which signs checkpoints)", path.display())),
        );
    }
    let Some(jwks) = cfg.audit.checkpoint_jwks.as_ref().map(|p| cfg.resolve(p)) else {
        return check(
            name,
            Outcome::Fail,
            "audit.checkpoint_jwks is not set",
            Some("point it at the key's public JWKS (pgward init writes keys/checkpoint-jwks.json)".into()),
        );
    };
    let keys = match crate::audit::verify::load_jwks_ed25519(&jwks) {
        Ok(k) => k,
        Err(e) => return check(name, Outcome::Fail, format!("checkpoint JWKS {}: {e}", jwks.display()), None),
    };
    if keys.get(signer.kid()) != Some(&signer.verifying_key()) {
        return check(
            name,
            Outcome::Fail,
            format!("{} does not publish the checkpoint key (kid {}): `audit verify` would refuse its checkpoints", jwks.display(), signer.kid()),
            Some("put the checkpoint key's public half into audit.checkpoint_jwks".into()),
        );
    }
    check(name, Outcome::Pass, format!("kid {} signs checkpoints; its JWKS publishes it", signer.kid()), None)
}

pub(super) fn tls(cx: &Ctx) -> Check {
    let name = "tls certificate";
    match crate::tls::server_config(&cx.cfg) {
        Ok(_) => {
            let key = cx.cfg.resolve(&cx.cfg.server.tls_key);
            if let Ok(m) = std::fs::metadata(&key)
                && m.mode() & 0o007 != 0
            {
                return check(name, Outcome::Fail, format!("{} is readable by everyone", key.display()), Some(format!("chmod 0640 {}", key.display())));
            }
            check(name, Outcome::Pass, format!("{} and its key load", cx.cfg.resolve(&cx.cfg.server.tls_cert).display()), None)
        }
        Err(e) => check(name, Outcome::Fail, format!("{e}"), Some("server.tls_cert / server.tls_key must be a PEM certificate chain and key (pgward init writes a self-signed pair)".into())),
    }
}
