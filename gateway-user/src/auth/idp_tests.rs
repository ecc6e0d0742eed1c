//! Tokens shaped like those of Keycloak, Entra ID, Okta and Google (their real claim sets,
//! RS256 or ES256), the claim settings of `[auth]` (`required_claims`, `username_claim`,
//! `groups_claim`), token ids of tokens without `jti`, and the validation of those settings.

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use super::*;
use crate::access::{Revocation, State};
use crate::config::AuthConfig;

const RSA_PEM: &str = include_str!("testdata/rsa-2048.pem");

/// `[auth]` with the test issuer and audience plus `extra` TOML lines.
fn auth(issuer: &str, audience: &str, extra: &str) -> AuthConfig {
    let text = format!(
        "issuer = {issuer:?}\naudience = {audience:?}\njwks = \"keys/jwks.json\"\nsigning_key = \"k.pem\"\nsigning_kid = \"k\"\n{extra}\n"
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("[auth] {text}: {e}"))
}

/// A signing key of `alg` (RS256 from the test RSA key, ES256 fresh) and the verifier that
/// knows it under `kid`.
fn key_and_verifier(alg: Algorithm, kid: &str, cfg: &AuthConfig) -> (EncodingKey, Verifier) {
    let key = match alg {
        Algorithm::RS256 => EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap(),
        Algorithm::ES256 => {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap()
        }
        other => panic!("no test key for {other:?}"),
    };
    let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
    jwk.common.key_id = Some(kid.into());
    let mut v = serde_json::to_value(&jwk).unwrap();
    // Providers publish keys without "alg" (Entra ID) and with "use": "sig".
    v.as_object_mut().unwrap().remove("alg");
    v["use"] = json!("sig");
    let jwks = json!({ "keys": [v] }).to_string();
    (key, Verifier::from_jwks(&jwks, Checks::from_config(cfg)).unwrap())
}

fn sign(alg: Algorithm, kid: &str, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn now() -> i64 {
    now_secs() as i64
}

#[test]
fn keycloak_access_token_es256_maps_preferred_username_and_realm_roles() {
    let iss = "https://kc.example.test/realms/acme";
    let cfg = auth(iss, "pgward", "username_claim = \"preferred_username\"\ngroups_claim = \"/realm_access/roles\"");
    let (key, v) = key_and_verifier(Algorithm::ES256, "kc-es-1", &cfg);
    let t = now();
    let claims = json!({
        "exp": t + 300, "iat": t, "auth_time": t - 5, "jti": "onrtac:4b1e-9a",
        "iss": iss, "aud": ["pgward", "account"], "sub": "3f2c7a1e-5d2b-4c1e-9f3a-0a1b2c3d4e5f",
        "typ": "Bearer", "azp": "psql-cli", "sid": "a1b2", "acr": "1",
        "realm_access": { "roles": ["offline_access", "analysts", "uma_authorization"] },
        "resource_access": { "account": { "roles": ["manage-account"] } },
        "scope": "openid profile email", "email_verified": true,
        "preferred_username": "alice", "email": "alice@example.test",
    });
    let token = sign(Algorithm::ES256, "kc-es-1", &claims, &key);
    let id = v.verify(&token, "alice").unwrap();
    assert_eq!(id.user, "alice");
    assert_eq!(id.groups, ["offline_access", "analysts", "uma_authorization"]);
    assert_eq!(id.jti, "onrtac:4b1e-9a");
    assert_eq!((id.issued_at, id.expires_at), (t, t + 300));
    // The subject (a UUID) is not the name a user connects as.
    assert!(matches!(v.verify(&token, "3f2c7a1e-5d2b-4c1e-9f3a-0a1b2c3d4e5f"), Err(AuthError::UserMismatch { .. })));
}

#[test]
fn entra_id_v1_token_rs256_without_jti_maps_upn_and_roles() {
    let iss = "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/";
    let aud = "api://pgward";
    let cfg = auth(iss, aud, "username_claim = \"upn\"\ngroups_claim = \"roles\"");
    let (key, v) = key_and_verifier(Algorithm::RS256, "nOo3ZDrODXEK1jKWhXslHR_KXEg", &cfg);
    let t = now();
    let claims = json!({
        "aud": aud, "iss": iss, "iat": t, "nbf": t, "exp": t + 3600,
        "acr": "1", "aio": "AVQAq/8TAAAA", "amr": ["pwd", "mfa"], "appid": "0a1b2c3d",
        "appidacr": "0", "family_name": "Smith", "given_name": "Bob", "ipaddr": "192.0.2.10",
        "name": "Bob Smith", "oid": "6e0d4a2b-1c3f-4e5a-8b7c-9d0e1f2a3b4c",
        "roles": ["pgward.readers", "pgward_admins"], "scp": "user_impersonation",
        "sub": "l3_roISQU222bULS9yi2k0XpqpOiMz5H3ZACo1GeXA", "tid": "72f988bf-86f1-41af-91ab-2d7cd011db47",
        "unique_name": "bob@contoso.test", "upn": "bob@contoso.test", "uti": "fqiBqXLPj0eQa82S-IYFAA", "ver": "1.0",
    });
    let token = sign(Algorithm::RS256, "nOo3ZDrODXEK1jKWhXslHR_KXEg", &claims, &key);
    let id = v.verify(&token, "bob@contoso.test").unwrap();
    assert_eq!(id.user, "bob@contoso.test");
    assert_eq!(id.groups, ["pgward.readers", "pgward_admins"]);
    // No jti: the token is named by its hash, which is also what revoking it by the token uses.
    assert_eq!(id.jti, token_hash(&token));
    assert!(id.jti.starts_with(TOKEN_HASH_PREFIX) && id.jti.len() == TOKEN_HASH_PREFIX.len() + 64);
    assert_eq!(token_id(&format!("  {token}\n")).as_deref(), Some(id.jti.as_str()));
    let mut state = State::default();
    assert_eq!(state.token_revoked(&id), None);
    state.apply_revocation(&Revocation {
        id: "rev-1".into(),
        at: t,
        jti: token_id(&token),
        user: None,
        reason: None,
        by_uid: 0,
    });
    assert!(state.token_revoked(&id).is_some(), "a revocation by the token's hash must hit it");
}

#[test]
fn okta_access_token_rs256_with_groups_claim() {
    let iss = "https://dev-123456.okta.test/oauth2/default";
    let cfg = auth(iss, "api://default", "");
    let (key, v) = key_and_verifier(Algorithm::RS256, "okta-1", &cfg);
    let t = now();
    let claims = json!({
        "ver": 1, "jti": "AT.n9dXNwXGrEvxL1Xz0pr8Y6RvCfKvk-CNnQWw", "iss": iss, "aud": "api://default",
        "iat": t, "exp": t + 3600, "cid": "0oa1b2c3d4", "uid": "00u1a2b3c4",
        "scp": ["openid", "profile"], "auth_time": t - 10, "sub": "carol@example.test",
        "groups": ["Everyone", "analysts"],
    });
    let token = sign(Algorithm::RS256, "okta-1", &claims, &key);
    let id = v.verify(&token, "carol@example.test").unwrap();
    assert_eq!((id.user.as_str(), id.jti.as_str()), ("carol@example.test", "AT.n9dXNwXGrEvxL1Xz0pr8Y6RvCfKvk-CNnQWw"));
    assert_eq!(id.groups, ["Everyone", "analysts"]);
}

#[test]
fn google_id_token_rs256_without_jti_and_nbf_maps_email() {
    let iss = "https://accounts.google.com";
    let client = "1234567890-abc.apps.googleusercontent.com";
    let cfg = auth(iss, client, "username_claim = \"email\"");
    let (key, v) = key_and_verifier(Algorithm::RS256, "6f7254101f56e41cf35c9926de84a2d552b4c6f1", &cfg);
    let t = now();
    let claims = json!({
        "iss": iss, "azp": client, "aud": client, "sub": "110169484474386276334",
        "hd": "example.test", "email": "dave@example.test", "email_verified": true,
        "at_hash": "X_B3Z3Fi4udZ2mf75RWo3w", "name": "Dave", "picture": "https://example.test/d.png",
        "given_name": "Dave", "locale": "en", "iat": t, "exp": t + 3600,
    });
    let token = sign(Algorithm::RS256, "6f7254101f56e41cf35c9926de84a2d552b4c6f1", &claims, &key);
    let id = v.verify(&token, "dave@example.test").unwrap();
    assert_eq!(id.user, "dave@example.test");
    assert!(id.groups.is_empty());
    assert_eq!(id.jti, token_hash(&token));
}

/// `auth.required_claims`: absent claims are refused only when required; present ones are
/// always checked; without `iat` a token counts as issued at its `nbf`, or at 0.
#[test]
fn required_claims_are_enforced_and_present_claims_checked() {
    let t = now();
    let base = json!({"iss": "i", "aud": "a", "sub": "alice", "exp": t + 60});
    let with = |edits: Value| {
        let mut c = base.clone();
        for (k, val) in edits.as_object().unwrap() {
            c[k] = val.clone();
        }
        c
    };
    let lax = auth("i", "a", "");
    let (key, v) = key_and_verifier(Algorithm::ES256, "k", &lax);
    let id = v.verify(&sign(Algorithm::ES256, "k", &base, &key), "alice").unwrap();
    assert_eq!(id.issued_at, 0, "neither iat nor nbf: issued before any user revocation");
    let id = v.verify(&sign(Algorithm::ES256, "k", &with(json!({"nbf": t - 5})), &key), "alice").unwrap();
    assert_eq!(id.issued_at, t - 5);
    let refused = |v: &Verifier, claims: Value| match v.verify(&sign(Algorithm::ES256, "k", &claims, &key), "alice") {
        Err(AuthError::InvalidToken { reason, .. }) => reason,
        other => panic!("{claims}: wanted a refusal, got {other:?}"),
    };
    assert_eq!(refused(&v, with(json!({"nbf": t + 3600}))), "token not yet valid");
    assert_eq!(refused(&v, with(json!({"iat": t + 3600}))), "token issued in the future");
    assert_eq!(refused(&v, with(json!({"iat": "yesterday"}))), "malformed claim iat");
    assert_eq!(refused(&v, with(json!({"jti": 7}))), "malformed claim jti");
    assert_eq!(refused(&v, with(json!({"exp": null}))), "missing required claim exp");
    assert_eq!(refused(&v, with(json!({"aud": ["x", "y"]}))), "wrong audience");
    assert_eq!(refused(&v, with(json!({"iss": ["i"]}))), "malformed claim iss");

    let strict = auth("i", "a", "required_claims = [\"exp\", \"iat\", \"nbf\", \"jti\"]");
    let v = Verifier::from_jwks(&jwks_of(&key_jwk(&key)), Checks::from_config(&strict)).unwrap();
    assert_eq!(refused(&v, with(json!({"nbf": t, "jti": "j"}))), "missing required claim iat");
    assert_eq!(refused(&v, with(json!({"iat": t, "jti": "j"}))), "missing required claim nbf");
    assert_eq!(refused(&v, with(json!({"iat": t, "nbf": t}))), "missing required claim jti");
    v.verify(&sign(Algorithm::ES256, "k", &with(json!({"iat": t, "nbf": t, "jti": "j"})), &key), "alice").unwrap();
}

/// A claim the settings point at that has the wrong type refuses the token: it never becomes
/// "no groups" or another user.
#[test]
fn malformed_user_and_group_claims_are_refused() {
    let t = now();
    let cfg = auth("i", "a", "username_claim = \"/ext/login\"\ngroups_claim = \"/realm_access/roles\"");
    let (key, v) = key_and_verifier(Algorithm::ES256, "k", &cfg);
    let claims = |ext: Value, roles: Value| {
        json!({"iss": "i", "aud": "a", "exp": t + 60, "ext": ext, "realm_access": {"roles": roles}})
    };
    let verify = |c: Value| v.verify(&sign(Algorithm::ES256, "k", &c, &key), "erin");
    let id = verify(claims(json!({"login": "erin"}), json!(["x"]))).unwrap();
    assert_eq!((id.user.as_str(), id.groups.as_slice()), ("erin", ["x".to_string()].as_slice()));
    for (c, want) in [
        (claims(json!({"login": 5}), json!([])), "malformed claim ext/login (must be a string)"),
        (claims(json!({}), json!([])), "missing required claim ext/login"),
        (claims(json!({"login": "erin"}), json!("x")), "malformed claim realm_access/roles (must be an array of strings)"),
        (claims(json!({"login": "erin"}), json!([1])), "malformed claim realm_access/roles (must be an array of strings)"),
    ] {
        match verify(c.clone()) {
            Err(AuthError::InvalidToken { reason, .. }) => assert_eq!(reason, want, "{c}"),
            other => panic!("{c}: wanted {want:?}, got {other:?}"),
        }
    }
}

#[test]
fn token_id_is_the_jti_or_the_hash_and_none_for_non_tokens() {
    let (key, _) = key_and_verifier(Algorithm::ES256, "k", &auth("i", "a", ""));
    let with_jti = sign(Algorithm::ES256, "k", &json!({"jti": "j-1", "exp": 1}), &key);
    assert_eq!(token_id(&with_jti).as_deref(), Some("j-1"));
    let without = sign(Algorithm::ES256, "k", &json!({"exp": 1}), &key);
    assert_eq!(token_id(&without), Some(token_hash(&without)));
    // Another signature of the same header and claims (ECDSA's (r, n - s), a re-signing) is the
    // same token: the id does not depend on the signature.
    let (signed, _) = without.rsplit_once('.').unwrap();
    assert_eq!(token_id(&format!("{signed}.AAAA")), token_id(&without));
    for junk in ["", "hunter2", "a.b", "a.b.c.d", "!!.??.--"] {
        assert_eq!(token_id(junk), None, "{junk:?}");
    }
}

/// Key sources and claim settings that cannot work are refused when the config is loaded.
#[test]
fn idp_settings_are_validated_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let load = |auth_extra: &str, jwks_line: &str, issuer: &str| {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:6432\"\ntls_cert = \"c\"\ntls_key = \"k\"\n[upstream]\nhost = \"/tmp\"\nuser = \"u\"\n\
             [auth]\nissuer = {issuer:?}\naudience = \"a\"\n{jwks_line}\nsigning_key = \"s\"\nsigning_kid = \"k\"\n{auth_extra}\n[audit]\ndir = \"audit\"\n"
        );
        let path = dir.path().join("pgward.toml");
        std::fs::write(&path, text).unwrap();
        crate::config::Config::load(&path).map(|_| ()).map_err(|e| e.to_string())
    };
    let https = "https://idp.example.test";
    load("", "jwks = \"j.json\"", "pgward").unwrap();
    load("jwks_url = \"https://idp.example.test/keys\"", "", "x").unwrap();
    load("discovery = true", "", https).unwrap();
    for (extra, jwks, issuer, want) in [
        ("", "", "x", "exactly one of"),
        ("jwks_url = \"https://idp.example.test/keys\"", "jwks = \"j.json\"", "x", "exactly one of"),
        ("jwks_url = \"http://idp.example.test/keys\"", "", "x", "not an https:// URL"),
        ("discovery = true", "", "idp.example.test", "auth.issuer to be an https:// URL"),
        ("required_claims = [\"iat\"]", "jwks = \"j.json\"", "x", "must include \"exp\""),
        ("required_claims = [\"exp\", \"azp\"]", "jwks = \"j.json\"", "x", "\"azp\" is not one of"),
        ("groups_claim = \"\"", "jwks = \"j.json\"", "x", "auth.groups_claim must name a claim"),
        ("jwks_urls = \"https://x\"", "jwks = \"j.json\"", "x", "unknown field"),
    ] {
        let err = load(extra, jwks, issuer).expect_err(extra);
        assert!(err.contains(want), "{extra} / {jwks}: {err}");
    }
}

fn key_jwk(key: &EncodingKey) -> Value {
    let mut jwk = Jwk::from_encoding_key(key, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("k".into());
    serde_json::to_value(&jwk).unwrap()
}

fn jwks_of(jwk: &Value) -> String {
    json!({ "keys": [jwk] }).to_string()
}

/// One key a provider publishes that pgward cannot use (too small, duplicate kid) is skipped,
/// not a reason to refuse the provider's whole set; in a JWKS file it is an error.
#[test]
fn a_providers_unusable_key_is_skipped_a_files_is_an_error() {
    use super::keyset::{KeySet, Strictness};
    let cfg = auth("i", "a", "");
    let (key, _) = key_and_verifier(Algorithm::ES256, "k", &cfg);
    let good = key_jwk(&key);
    let small_rsa = json!({"kty": "RSA", "kid": "small", "use": "sig", "n": "AQAB", "e": "AQAB"});
    let text = json!({ "keys": [small_rsa, good, good] }).to_string();
    let checks = Checks::from_config(&cfg);
    let set = KeySet::from_jwks(&text, &checks, Strictness::Provider).unwrap();
    assert_eq!(set.kids(), [("k".to_string(), Algorithm::ES256)]);
    let e = KeySet::from_jwks(&text, &checks, Strictness::File).unwrap_err();
    assert!(e.to_string().contains("RSA key too small"), "{e}");
    let only_bad = json!({ "keys": [{"kty": "RSA", "kid": "small", "n": "AQAB", "e": "AQAB"}] }).to_string();
    assert!(KeySet::from_jwks(&only_bad, &checks, Strictness::Provider).is_err(), "no usable key at all");
}

/// RFC 7515: a token with critical header extensions pgward does not know is refused.
#[test]
fn critical_header_extensions_are_refused() {
    let cfg = auth("i", "a", "");
    let (key, v) = key_and_verifier(Algorithm::ES256, "k", &cfg);
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k".into());
    h.crit = Some(vec!["exp-policy".into()]);
    let token = jsonwebtoken::encode(&h, &json!({"iss": "i", "aud": "a", "sub": "u", "exp": now() + 60}), &key).unwrap();
    match v.verify(&token, "u") {
        Err(AuthError::InvalidToken { reason, .. }) => assert!(reason.contains("crit"), "{reason}"),
        other => panic!("wanted a refusal, got {other:?}"),
    }
}
