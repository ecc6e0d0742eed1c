//! Table-driven tests for token verification and issuing.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePublicKey};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::*;
use crate::config::Config;

const RSA_PEM: &str = include_str!("testdata/rsa-2048.pem");
const RSA_PUB_PEM: &str = include_str!("testdata/rsa-2048.pub.pem");

const ED_KID: &str = "ed-1";
const RSA_KID: &str = "rsa-1";
const EC_KID: &str = "ec-1";

/// A config directory with an Ed25519 key from `generate_signing_key` plus an RSA and a P-256
/// key, all in one JWKS.
struct Fixture {
    _dir: tempfile::TempDir,
    cfg: Config,
    verifier: Verifier,
    ed: EncodingKey,
    ed_pem: String,
    ed_public_raw: Vec<u8>,
    rsa: EncodingKey,
    ec: EncodingKey,
    jwks_text: String,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    generate_signing_key(&keys, ED_KID).unwrap();
    let ed_pem = std::fs::read_to_string(keys.join("signing-key.pem")).unwrap();
    let ed = EncodingKey::from_ed_pem(ed_pem.as_bytes()).unwrap();

    let mut jwks: Value =
        serde_json::from_str(&std::fs::read_to_string(keys.join("jwks.json")).unwrap()).unwrap();
    let ed_public_raw = URL_SAFE_NO_PAD.decode(jwks["keys"][0]["x"].as_str().unwrap()).unwrap();

    let rsa = EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap();
    let mut rsa_jwk = Jwk::from_encoding_key(&rsa, Algorithm::RS256).unwrap();
    rsa_jwk.common.key_id = Some(RSA_KID.into());

    let ec_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let ec = EncodingKey::from_ec_pem(ec_pair.serialize_pem().as_bytes()).unwrap();
    let mut ec_jwk = Jwk::from_encoding_key(&ec, Algorithm::ES256).unwrap();
    ec_jwk.common.key_id = Some(EC_KID.into());

    let list = jwks["keys"].as_array_mut().unwrap();
    list.push(serde_json::to_value(&rsa_jwk).unwrap());
    list.push(serde_json::to_value(&ec_jwk).unwrap());
    let jwks_text = serde_json::to_string_pretty(&jwks).unwrap();
    std::fs::write(dir.path().join("jwks-multi.json"), &jwks_text).unwrap();

    let cfg = write_config(dir.path(), "jwks-multi.json");
    let verifier = Verifier::load(&cfg).unwrap();
    Fixture { _dir: dir, cfg, verifier, ed, ed_pem, ed_public_raw, rsa, ec, jwks_text }
}

fn write_config(dir: &Path, jwks: &str) -> Config {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:6432"
tls_cert = "tls/cert.pem"
tls_key = "tls/key.pem"

[upstream]
host = "/tmp"
user = "pgward"

[auth]
issuer = "pgward"
audience = "pgward"
jwks = "{jwks}"
signing_key = "keys/signing-key.pem"
signing_kid = "{ED_KID}"
leeway_secs = 30
# The claims `pgward token issue` writes, all required (the default requires only exp).
required_claims = ["exp", "iat", "nbf", "jti"]

[audit]
dir = "audit"
"#
    );
    let path = dir.join("pgward.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

fn now() -> i64 {
    now_secs() as i64
}

/// Valid claims for `alice`; `overrides` replace fields, `null` removes them.
fn claims(overrides: Value) -> Value {
    let t = now();
    let mut c = json!({
        "iss": "pgward", "aud": "pgward", "sub": "alice",
        "groups": ["analysts", "dba"],
        "iat": t, "nbf": t, "exp": t + 600, "jti": "jti-1",
    });
    for (k, v) in overrides.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn b64json(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

#[derive(Debug)]
enum Want {
    Ok {
        groups: &'static [&'static str],
    },
    /// InvalidToken (28P01) with this exact reason; `ids` = jti/sub readable from the payload.
    Invalid {
        reason: &'static str,
        ids: bool,
    },
    /// UserMismatch (28000).
    Mismatch,
}

/// A case: its name, the password (token) given, the startup user, and what verifying must give.
type Case = (&'static str, String, &'static str, Want);

/// Verify each case's token for its user; check the identity, or the error, its SQLSTATE, the
/// ids read from the payload, and that the token is not in the message.
fn check_cases(f: &Fixture, cases: Vec<Case>) {
    let t = now();
    for (name, token, user, want) in cases {
        let got = f.verifier.verify(&token, user);
        match (&want, got) {
            (Want::Ok { groups }, Ok(id)) => {
                assert_eq!(id.user, user, "{name}");
                assert_eq!(
                    id.groups,
                    groups.iter().map(|g| g.to_string()).collect::<Vec<_>>(),
                    "{name}"
                );
                assert_eq!(id.jti, "jti-1", "{name}");
                assert!(id.expires_at > t - 60, "{name}");
            }
            (Want::Invalid { reason, ids }, Err(e @ AuthError::InvalidToken { .. })) => {
                assert_eq!(e.sqlstate(), "28P01", "{name}");
                let AuthError::InvalidToken { reason: got, .. } = &e else { unreachable!() };
                assert_eq!(got, reason, "{name}");
                if *ids {
                    // jti/sub come from the unverified payload, exactly as written there.
                    let payload: Value = serde_json::from_slice(
                        &URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap(),
                    )
                    .unwrap();
                    // A token without a jti is named by its hash.
                    let want_jti = payload["jti"].as_str().map(str::to_owned).unwrap_or_else(|| token_hash(&token));
                    assert_eq!(e.jti(), Some(want_jti.as_str()), "{name}");
                    assert_eq!(e.sub(), Some(user), "{name}: sub should be read from the payload");
                } else {
                    assert_eq!((e.jti(), e.sub()), (None, None), "{name}");
                }
                assert!(
                    !e.to_string().contains(&token) || token.is_empty(),
                    "{name}: token leaked"
                );
            }
            (Want::Mismatch, Err(e @ AuthError::UserMismatch { .. })) => {
                assert_eq!(e.sqlstate(), "28000", "{name}");
                assert_eq!(e.sub(), Some("alice"), "{name}");
                assert_eq!(e.jti(), Some("jti-1"), "{name}");
            }
            (want, got) => panic!("{name}: wanted {want:?}, got {got:?}"),
        }
    }
}

/// Valid tokens from every key type in the JWKS, and an expiry within the leeway.
#[test]
fn valid_tokens_verify_to_their_identity() {
    let f = fixture();
    let t = now();
    let good = sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({})), &f.ed);
    let cases: Vec<Case> = vec![
        ("good EdDSA", good.clone(), "alice", Want::Ok { groups: &["analysts", "dba"] }),
        (
            "good, trailing newline",
            format!("{good}\n"),
            "alice",
            Want::Ok { groups: &["analysts", "dba"] },
        ),
        (
            "good, no groups claim",
            sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({"groups": null})), &f.ed),
            "alice",
            Want::Ok { groups: &[] },
        ),
        (
            "good RS256 from multi-key JWKS",
            sign(Algorithm::RS256, Some(RSA_KID), &claims(json!({})), &f.rsa),
            "alice",
            Want::Ok { groups: &["analysts", "dba"] },
        ),
        (
            "good ES256 from multi-key JWKS",
            sign(Algorithm::ES256, Some(EC_KID), &claims(json!({})), &f.ec),
            "alice",
            Want::Ok { groups: &["analysts", "dba"] },
        ),
        (
            "expired but within leeway",
            sign(
                Algorithm::EdDSA,
                Some(ED_KID),
                &claims(json!({"exp": t - 10, "iat": t - 100, "nbf": t - 100})),
                &f.ed,
            ),
            "alice",
            Want::Ok { groups: &["analysts", "dba"] },
        ),
    ];
    check_cases(&f, cases);
}

/// Expired or early tokens, wrong issuer or audience, missing or malformed claims, another user.
#[test]
fn tokens_outside_their_validity_or_claims_are_refused() {
    let f = fixture();
    let t = now();
    let good = sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({})), &f.ed);
    let cases: Vec<Case> = vec![
        (
            "expired",
            sign(
                Algorithm::EdDSA,
                Some(ED_KID),
                &claims(json!({"exp": t - 3600, "iat": t - 7200, "nbf": t - 7200})),
                &f.ed,
            ),
            "alice",
            Want::Invalid { reason: "token expired", ids: true },
        ),
        (
            "not yet valid",
            sign(
                Algorithm::EdDSA,
                Some(ED_KID),
                &claims(json!({"nbf": t + 3600, "exp": t + 7200})),
                &f.ed,
            ),
            "alice",
            Want::Invalid { reason: "token not yet valid", ids: true },
        ),
        (
            "issued in the future",
            sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({"iat": t + 3600})), &f.ed),
            "alice",
            Want::Invalid { reason: "token issued in the future", ids: true },
        ),
        (
            "wrong audience",
            sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({"aud": "someone-else"})), &f.ed),
            "alice",
            Want::Invalid { reason: "wrong audience", ids: true },
        ),
        (
            "wrong issuer",
            sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({"iss": "evil"})), &f.ed),
            "alice",
            Want::Invalid { reason: "wrong issuer", ids: true },
        ),
        (
            "missing aud",
            sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({"aud": null})), &f.ed),
            "alice",
            Want::Invalid { reason: "missing required claim aud", ids: true },
        ),
        (
            "missing jti",
            sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({"jti": null})), &f.ed),
            "alice",
            Want::Invalid { reason: "missing required claim jti", ids: true },
        ),
        (
            "missing iat",
            sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({"iat": null})), &f.ed),
            "alice",
            Want::Invalid { reason: "missing required claim iat", ids: true },
        ),
        (
            "missing nbf",
            sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({"nbf": null})), &f.ed),
            "alice",
            Want::Invalid { reason: "missing required claim nbf", ids: true },
        ),
        (
            "groups not a list of strings",
            sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({"groups": "dba"})), &f.ed),
            "alice",
            Want::Invalid {
                reason: "malformed claim groups (must be an array of strings)",
                ids: true,
            },
        ),
        ("sub is not the startup user", good.clone(), "bob", Want::Mismatch),
    ];
    check_cases(&f, cases);
}

/// Unknown or missing key ids, a tampered payload, and a signature by another key.
#[test]
fn tokens_with_an_unknown_key_or_a_bad_signature_are_refused() {
    let f = fixture();
    let good = sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({})), &f.ed);
    let tampered = {
        let parts: Vec<&str> = good.split('.').collect();
        let evil = b64json(&claims(json!({"sub": "admin", "groups": ["superuser"]})));
        format!("{}.{}.{}", parts[0], evil, parts[2])
    };
    let other_ed = {
        let dir = tempfile::tempdir().unwrap();
        generate_signing_key(dir.path(), ED_KID).unwrap();
        let pem = std::fs::read_to_string(dir.path().join("signing-key.pem")).unwrap();
        EncodingKey::from_ed_pem(pem.as_bytes()).unwrap()
    };
    let cases: Vec<Case> = vec![
        (
            "unknown kid",
            sign(Algorithm::EdDSA, Some("nope"), &claims(json!({})), &f.ed),
            "alice",
            Want::Invalid { reason: "unknown key id", ids: true },
        ),
        (
            "missing kid",
            sign(Algorithm::EdDSA, None, &claims(json!({})), &f.ed),
            "alice",
            Want::Invalid { reason: "token has no key id (kid)", ids: true },
        ),
        (
            "tampered payload",
            tampered,
            "admin",
            Want::Invalid { reason: "bad signature", ids: true },
        ),
        (
            "signed by another key with the same kid",
            sign(Algorithm::EdDSA, Some(ED_KID), &claims(json!({})), &other_ed),
            "alice",
            Want::Invalid { reason: "bad signature", ids: true },
        ),
    ];
    check_cases(&f, cases);
}

/// `alg: none`, HMAC keyed with public material, and a header algorithm that does not fit the
/// key.
#[test]
fn tokens_with_a_wrong_algorithm_are_refused() {
    let f = fixture();
    let alg_none = format!(
        "{}.{}.",
        b64json(&json!({"alg": "none", "typ": "JWT", "kid": ED_KID})),
        b64json(&claims(json!({})))
    );
    let ed_public_pem = ed25519_dalek::SigningKey::from_pkcs8_pem(&f.ed_pem)
        .unwrap()
        .verifying_key()
        .to_public_key_pem(Default::default())
        .unwrap();
    let hs = |secret: &[u8], kid: &str| {
        sign(
            Algorithm::HS256,
            Some(kid),
            &claims(json!({})),
            &EncodingKey::from_secret(secret).unwrap(),
        )
    };
    let cases: Vec<Case> = vec![
        (
            "alg none",
            alg_none,
            "alice",
            Want::Invalid { reason: "unsigned token (alg none) rejected", ids: true },
        ),
        (
            "HS256 with the raw Ed25519 public key as secret",
            hs(&f.ed_public_raw, ED_KID),
            "alice",
            Want::Invalid { reason: "symmetric algorithm HS256 rejected", ids: true },
        ),
        (
            "HS256 with the Ed25519 public key PEM as secret",
            hs(ed_public_pem.as_bytes(), ED_KID),
            "alice",
            Want::Invalid { reason: "symmetric algorithm HS256 rejected", ids: true },
        ),
        (
            "HS256 with the JWKS text as secret",
            hs(f.jwks_text.as_bytes(), ED_KID),
            "alice",
            Want::Invalid { reason: "symmetric algorithm HS256 rejected", ids: true },
        ),
        (
            "HS256 with the RSA public key PEM as secret",
            hs(RSA_PUB_PEM.as_bytes(), RSA_KID),
            "alice",
            Want::Invalid { reason: "symmetric algorithm HS256 rejected", ids: true },
        ),
        (
            "ES256 header for the EdDSA key",
            sign(Algorithm::ES256, Some(ED_KID), &claims(json!({})), &f.ec),
            "alice",
            Want::Invalid {
                reason: "algorithm ES256 does not match key (expects EdDSA)",
                ids: true,
            },
        ),
        (
            "EdDSA header for the RSA key",
            sign(Algorithm::EdDSA, Some(RSA_KID), &claims(json!({})), &f.ed),
            "alice",
            Want::Invalid {
                reason: "algorithm EdDSA does not match key (expects RS256)",
                ids: true,
            },
        ),
    ];
    check_cases(&f, cases);
}

/// Passwords that are not tokens at all: nothing is read from them.
#[test]
fn passwords_that_are_not_tokens_are_refused() {
    let f = fixture();
    let cases: Vec<Case> = vec![
        (
            "plain password",
            "s3cret-service-password".into(),
            "alice",
            Want::Invalid { reason: "password is not a valid token", ids: false },
        ),
        (
            "three dots but not JSON",
            "abc.def.ghi".into(),
            "alice",
            Want::Invalid { reason: "password is not a valid token", ids: false },
        ),
        (
            "empty password",
            String::new(),
            "alice",
            Want::Invalid { reason: "password is not a valid token", ids: false },
        ),
    ];
    check_cases(&f, cases);
}

#[test]
fn signer_round_trip() {
    let f = fixture();
    let signer = Signer::load(&f.cfg).unwrap();
    assert_eq!(signer.kid(), ED_KID);
    let groups = vec!["ops".to_string()];
    let token =
        signer.issue("carol", &groups, Duration::from_secs(900), "pgward", "pgward").unwrap();

    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert_eq!(header.kid.as_deref(), Some(ED_KID));
    let payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').nth(1).unwrap()).unwrap())
            .unwrap();
    for claim in ["iss", "aud", "sub", "groups", "iat", "nbf", "exp", "jti"] {
        assert!(payload.get(claim).is_some(), "claim {claim} missing: {payload}");
    }
    assert_eq!(payload["exp"].as_i64().unwrap() - payload["iat"].as_i64().unwrap(), 900);
    let jti = payload["jti"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(jti).unwrap().get_version_num(), 4);

    let id = f.verifier.verify(&token, "carol").unwrap();
    assert_eq!(id.groups, groups);
    assert_eq!(id.jti, jti);
    assert_eq!(id.expires_at, payload["exp"].as_i64().unwrap());

    // Two tokens never share a jti.
    let again =
        signer.issue("carol", &groups, Duration::from_secs(900), "pgward", "pgward").unwrap();
    assert_ne!(f.verifier.verify(&again, "carol").unwrap().jti, id.jti);

    assert!(matches!(
        signer.issue("carol", &[], Duration::ZERO, "pgward", "pgward"),
        Err(AuthError::Keys(_))
    ));
    assert!(matches!(
        signer.issue("", &[], Duration::from_secs(60), "pgward", "pgward"),
        Err(AuthError::Keys(_))
    ));
    assert!(matches!(Signer::from_pem(RSA_PEM, "x"), Err(AuthError::Keys(_))));
}

#[test]
fn generated_key_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    generate_signing_key(dir.path(), "pgward-0123abcd").unwrap();
    let pem_path = dir.path().join("signing-key.pem");
    let mode = std::fs::metadata(&pem_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let pem = std::fs::read_to_string(&pem_path).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");
    let sk = ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).unwrap();

    let jwks: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("jwks.json")).unwrap())
            .unwrap();
    let key = &jwks["keys"][0];
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
    assert_eq!(key["kty"], "OKP");
    assert_eq!(key["crv"], "Ed25519");
    assert_eq!(key["kid"], "pgward-0123abcd");
    assert_eq!(key["alg"], "EdDSA");
    assert_eq!(key["use"], "sig");
    let x = URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap();
    assert_eq!(x, sk.verifying_key().to_bytes());

    // Regenerating replaces the key and keeps the mode.
    generate_signing_key(dir.path(), "pgward-0123abcd").unwrap();
    assert_ne!(std::fs::read_to_string(&pem_path).unwrap(), pem);
    assert_eq!(std::fs::metadata(&pem_path).unwrap().permissions().mode() & 0o777, 0o600);
}

#[test]
fn jwks_loading_rules() {
    let load = |keys: Value| {
        Verifier::from_jwks(&json!({ "keys": keys }).to_string(), Checks::strict("pgward", "pgward", 30))
    };
    let ed_x = URL_SAFE_NO_PAD
        .encode(ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]).verifying_key().to_bytes());
    let ed = |kid: &str| json!({"kty": "OKP", "crv": "Ed25519", "x": ed_x, "kid": kid});

    assert!(load(json!([ed("a")])).is_ok());
    // Symmetric keys are never used; a JWKS of only those has no usable key.
    let e = load(json!([{"kty": "oct", "k": "c2VjcmV0", "kid": "h", "alg": "HS256"}])).unwrap_err();
    assert!(e.to_string().contains("no usable"), "{e}");
    // ...but they don't spoil the other keys.
    let v = load(json!([ed("a"), {"kty": "oct", "k": "c2VjcmV0", "kid": "h"}])).unwrap();
    let hs = sign(
        Algorithm::HS256,
        Some("h"),
        &claims(json!({})),
        &EncodingKey::from_secret(b"secret").unwrap(),
    );
    assert!(matches!(v.verify(&hs, "alice"), Err(AuthError::InvalidToken { .. })));
    // Encryption keys and keys without kid are skipped.
    assert!(
        load(
            json!([ed("a"), {"kty": "OKP", "crv": "Ed25519", "x": ed_x, "kid": "e", "use": "enc"}])
        )
        .is_ok()
    );
    assert!(load(json!([{"kty": "OKP", "crv": "Ed25519", "x": ed_x}])).is_err());
    // Broken or self-contradicting keys are errors.
    assert!(load(json!([ed("a"), ed("a")])).unwrap_err().to_string().contains("duplicate"));
    assert!(load(json!([{"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "s"}])).is_err());
    assert!(
        load(json!([{"kty": "OKP", "crv": "Ed25519", "x": ed_x, "kid": "s", "alg": "HS256"}]))
            .is_err()
    );
    assert!(
        load(json!([{"kty": "OKP", "crv": "Ed25519", "x": ed_x, "kid": "s", "alg": "RS256"}]))
            .is_err()
    );
    let small_rsa =
        json!({"kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xC5u8; 64]), "e": "AQAB", "kid": "r"});
    assert!(load(json!([small_rsa])).unwrap_err().to_string().contains("too small"));
    assert!(load(json!([])).is_err());
    assert!(Verifier::from_jwks("not json", Checks::strict("i", "a", 0)).is_err());
}
