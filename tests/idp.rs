//! Tokens of real identity providers' shapes (Keycloak, Entra ID, Okta, Google; RS256 and ES256)
//! verified against keys pgward fetches over HTTPS from a provider on loopback — through OIDC
//! discovery or `auth.jwks_url`, trusting a test CA through `auth.jwks_ca`. The provider rotates
//! its keys (a token with the new key id makes pgward fetch at once), goes down (the last good
//! keys stay in use), or is never reached (every login refused). A token without `jti` is
//! revoked by the token itself (`pgward token revoke --token-file`).

mod common;
#[path = "idp_support.rs"]
mod support;

use std::time::Duration;

use common::gateway::rec;
use common::{Login, Pgward, PgwardBuilder, cluster, current_user, jwt, pgward_cli, wait_for};
use common::tls::TestCa;
use serde_json::{Value, json};
use support::{Idp, IdpKey, malleate_es256, token_file};

/// How long pgward may take to pick up what the provider publishes (a fact to wait for, not a
/// performance bound).
const PICKUP: Duration = Duration::from_secs(30);

/// A gateway whose `[auth]` takes keys from `idp` (`source`: "discovery" or "jwks_url"),
/// trusting `ca`, with `issuer`, `audience` and the claim settings `extra` (dotted key, value).
fn gateway(idp: &Idp, ca: &TestCa, source: &str, issuer: &str, audience: &str, extra: &[(&str, &str)]) -> Pgward {
    let mut b: PgwardBuilder = Pgward::builder()
        .unset("auth.jwks")
        .set("auth.issuer", issuer)
        .set("auth.audience", audience)
        .set("auth.jwks_ca", ca.ca_pem.display().to_string())
        .set("auth.jwks_min_refresh", "200ms");
    b = match source {
        "discovery" => b.set("auth.discovery", true),
        _ => b.set("auth.jwks_url", idp.jwks_url.as_str()),
    };
    for (k, v) in extra {
        b = b.set(&format!("auth.{k}"), *v);
    }
    b.start()
}


/// A login that must be refused: its SQLSTATE and message.
async fn refused(login: &Login) -> (String, String) {
    let e = login.connect().await.expect_err("the login should be refused");
    let db = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e}"));
    (db.code().code().to_string(), db.message().to_string())
}

/// The `login` record of the token with id `jti`.
fn login_record(pw: &Pgward, jti: &str) -> Value {
    let recs = pw.wait_audit("login record", |r| rec::login_by_jti(r, jti).is_some());
    rec::login_by_jti(&recs, jti).unwrap().clone()
}

/// What `serve` last wrote about its key fetches.
fn key_status(pw: &Pgward) -> Option<Value> {
    let text = std::fs::read_to_string(pw.dir.join("state/idp-keys.json")).ok()?;
    serde_json::from_str(&text).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycloak_es256_via_discovery_follows_a_key_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let (k1, k2) = (IdpKey::es256("kc-es-1"), IdpKey::es256("kc-es-2"));
    let idp = Idp::start(&ca, "/realms/acme", "/realms/acme/protocol/openid-connect/certs", &[&k1]);
    let db = cluster().create_database("idp_kc");
    let extra = [("username_claim", "preferred_username"), ("groups_claim", "/realm_access/roles")];
    let pw = gateway(&idp, &ca, "discovery", &idp.issuer, "pgward", &extra);
    let claims = |jti: &str| keycloak_claims(&idp.issuer, jti);

    let t1 = k1.sign(&claims("kc-1"));
    let client = pw.login("alice", &t1, &db).connect().await.expect("a Keycloak token logs in");
    assert!(!current_user(&client).await.unwrap().is_empty());
    let login = login_record(&pw, "kc-1");
    assert_eq!(login["user"], "alice", "the name is preferred_username, not the sub UUID: {login}");
    assert_eq!(rec::groups(&login), ["analysts", "offline_access"], "{login}");
    assert_eq!(idp.requests_for("/.well-known/openid-configuration"), 1, "one discovery at start");

    // A key the provider does not publish yet is refused...
    let t2 = k2.sign(&claims("kc-2"));
    let (code, msg) = refused(&pw.login("alice", &t2, &db)).await;
    assert_eq!((code.as_str(), msg.contains("unknown key id")), ("28P01", true), "{msg}");
    // ...until it does: the unknown key id makes pgward fetch again (no waiting for the timer,
    // which is at its default of 15 minutes), and the login that asked for the fetch waits for
    // it: the first token signed with the rotated-in key logs in.
    idp.publish(&[&k2]);
    let fetches = idp.requests_for("/realms/acme/protocol/openid-connect/certs");
    let first = pw.login("alice", &k2.sign(&claims("kc-2-first")), &db);
    first.connect().await.expect("the first token signed with the rotated-in key logs in");
    assert_eq!(idp.requests_for("/realms/acme/protocol/openid-connect/certs"), fetches + 1, "one fetch, asked for by that login");
    // The rotated-out key is gone with the new key set; the session opened with it goes on (a
    // token is checked for expiry and revocation on every statement, its signature at login).
    let (code, msg) = refused(&pw.login("alice", &k1.sign(&claims("kc-1b")), &db)).await;
    assert_eq!((code.as_str(), msg.contains("unknown key id")), ("28P01", true), "{msg}");
    assert!(!current_user(&client).await.unwrap().is_empty());
    let st = key_status(&pw).expect("serve writes its key status");
    assert_eq!(st["kids"], json!(["kc-es-2"]), "{st}");
    assert_eq!(st["source"], idp.jwks_url.as_str(), "{st}");
}

/// Claims of a Keycloak access token for alice (sub is a UUID; realm roles nested).
fn keycloak_claims(issuer: &str, jti: &str) -> Value {
    let t = jwt::now();
    json!({
        "exp": t + 300, "iat": t, "auth_time": t - 5, "jti": jti, "iss": issuer,
        "aud": ["pgward", "account"], "sub": "3f2c7a1e-5d2b-4c1e-9f3a-0a1b2c3d4e5f", "typ": "Bearer",
        "azp": "psql-cli", "session_state": "0c1d", "acr": "1", "sid": "0c1d",
        "realm_access": { "roles": ["analysts", "offline_access"] },
        "resource_access": { "account": { "roles": ["manage-account", "view-profile"] } },
        "scope": "openid email profile", "email_verified": true,
        "preferred_username": "alice", "email": "alice@example.test",
    })
}

/// Run a future to completion from the (blocking) test thread.
fn futures_block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entra_token_without_jti_is_revoked_by_the_token_itself() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let key = IdpKey::rs256("nOo3ZDrODXEK1jKWhXslHR_KXEg");
    let idp = Idp::start(&ca, "/tenant/v2.0", "/tenant/discovery/v2.0/keys", &[&key]);
    let db = cluster().create_database("idp_entra");
    // Entra ID's real issuer; the keys come from auth.jwks_url, so it need not be reachable.
    let tid = "72f988bf-86f1-41af-91ab-2d7cd011db47";
    let issuer = format!("https://login.microsoftonline.com/{tid}/v2.0");
    let aud = "6e74172b-be56-4843-9ff4-e66a39bb12e3";
    let extra = [("username_claim", "preferred_username"), ("groups_claim", "roles")];
    let pw = gateway(&idp, &ca, "jwks_url", &issuer, aud, &extra);
    let t = jwt::now();
    let claims = json!({
        "aud": aud, "iss": issuer, "iat": t, "nbf": t, "exp": t + 3600, "aio": "AWQAm/8TAAAA",
        "azp": "0a1b2c3d-1111-2222-3333-444455556666", "azpacr": "0", "name": "Bob Smith",
        "oid": "6e0d4a2b-1c3f-4e5a-8b7c-9d0e1f2a3b4c", "preferred_username": "bob@contoso.test",
        "rh": "0.AXEA", "roles": ["pgward.readers"], "scp": "access_as_user",
        "sub": "l3_roISQU222bULS9yi2k0XpqpOiMz5H3ZACo1GeXA", "tid": tid,
        "uti": "fqiBqXLPj0eQa82S-IYFAA", "ver": "2.0",
    });
    let token = key.sign(&claims);
    let login = pw.login("bob@contoso.test", &token, &db);
    let client = login.connect().await.expect("an Entra ID token logs in");
    assert!(!current_user(&client).await.unwrap().is_empty());

    // The operator holds the leaked token, not an id: revoking it by the token must hit the
    // id the audit log shows for it (the token's hash).
    let file = token_file(dir.path(), "leaked.jwt", &token);
    let out = pgward_cli(&["token", "revoke", "--config", pw.config_path.to_str().unwrap(), "--token-file", file.to_str().unwrap()]);
    assert!(out.success(), "{}", out.describe());
    let id = out.stdout.split_whitespace().nth(2).unwrap_or_default().to_string();
    assert!(id.starts_with("sha256:") && id.len() == 71, "revoked id: {}", out.describe());
    let rec = login_record(&pw, &id);
    assert_eq!(rec["user"], "bob@contoso.test", "{rec}");
    assert_eq!(rec::groups(&rec), ["pgward.readers"], "{rec}");

    // The live session ends at its next statement; the token cannot log in again.
    let recs = pw.wait_audit("the revoke record", |r| rec::of_kind(r, "revoke").iter().any(|x| x["jti"] == id.as_str()));
    assert!(!recs.is_empty());
    let e = wait_for("the revocation to reach the session", PICKUP, || {
        futures_block_on(current_user(&client)).err()
    });
    let db_err = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e}"));
    assert_eq!((db_err.severity(), db_err.code().code()), ("FATAL", "28P01"), "{e}");
    assert!(db_err.message().contains("revoked"), "{e}");
    let (code, msg) = refused(&login).await;
    assert_eq!((code.as_str(), msg.contains("revoked")), ("28P01", true), "{msg}");
}

/// A token without `jti` is named by a hash; the holder of an ES256 token can re-sign it without
/// the key (ECDSA signatures are malleable: (r, n - s) verifies too). Revoking the token must
/// hold for every signature of the same header and claims, so the id must not depend on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es256_token_without_jti_stays_revoked_when_its_signature_is_malleated() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let key = IdpKey::es256("oidc-es-1");
    let idp = Idp::start(&ca, "/oidc", "/oidc/jwks", &[&key]);
    let db = cluster().create_database("idp_malleate");
    let pw = gateway(&idp, &ca, "jwks_url", &idp.issuer, "pgward", &[]);
    let t = jwt::now();
    let token = key.sign(&json!({"iss": idp.issuer, "aud": "pgward", "sub": "dave", "iat": t, "exp": t + 3600}));
    let twin = malleate_es256(&token);
    assert_ne!(twin, token);

    // Both signatures are valid: the twin logs in, and its audit id is the original's.
    let twin_login = pw.login("dave", &twin, &db);
    let client = twin_login.connect().await.expect("the malleated token is authentic");
    assert!(!current_user(&client).await.unwrap().is_empty());

    let file = token_file(dir.path(), "leaked.jwt", &token);
    let out = pgward_cli(&["token", "revoke", "--config", pw.config_path.to_str().unwrap(), "--token-file", file.to_str().unwrap()]);
    assert!(out.success(), "{}", out.describe());
    let id = out.stdout.split_whitespace().nth(2).unwrap_or_default().to_string();
    assert!(id.starts_with("sha256:"), "revoked id: {}", out.describe());
    let recs = pw.wait_audit("the twin's login record", |r| rec::of_kind(r, "login").iter().any(|x| x["user"] == "dave"));
    let twin_rec = rec::of_kind(&recs, "login").into_iter().find(|x| x["user"] == "dave").unwrap();
    assert_eq!(twin_rec["jti"], id.as_str(), "the twin's session must carry the id revoked for the original: {twin_rec}");
    pw.wait_audit("the revoke record", |r| rec::of_kind(r, "revoke").iter().any(|x| x["jti"] == id.as_str()));

    // The twin's live session ends, and neither signature logs in again.
    let e = wait_for("the revocation to reach the twin's session", PICKUP, || futures_block_on(current_user(&client)).err());
    let db_err = e.as_db_error().unwrap_or_else(|| panic!("not a server error: {e}"));
    assert_eq!((db_err.code().code(), db_err.message().contains("revoked")), ("28P01", true), "{e}");
    for (what, t) in [("original", &token), ("malleated", &twin)] {
        let (code, msg) = refused(&pw.login("dave", t, &db)).await;
        assert_eq!((code.as_str(), msg.contains("revoked")), ("28P01", true), "{what}: {msg}");
    }
}

/// A revocation made by an older pgward names a token without `jti` by the hash of the whole
/// token (signature included): after the upgrade, that token still cannot log in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_under_its_former_id_stays_revoked() {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let key = IdpKey::es256("oidc-es-former");
    let idp = Idp::start(&ca, "/oidc", "/oidc/jwks", &[&key]);
    let db = cluster().create_database("idp_former_id");
    let pw = gateway(&idp, &ca, "jwks_url", &idp.issuer, "pgward", &[]);
    let t = jwt::now();
    let token = key.sign(&json!({"iss": idp.issuer, "aud": "pgward", "sub": "erin", "iat": t, "exp": t + 3600}));
    let other = key.sign(&json!({"iss": idp.issuer, "aud": "pgward", "sub": "erin", "iat": t, "exp": t + 1800}));
    let former = format!("sha256:{}", hex::encode(sha2::Sha256::digest(token.as_bytes())));
    let out = pgward_cli(&["token", "revoke", "--config", pw.config_path.to_str().unwrap(), "--jti", &former]);
    assert!(out.success(), "{}", out.describe());
    pw.wait_audit("the revoke record", |r| rec::of_kind(r, "revoke").iter().any(|x| x["jti"] == former.as_str()));
    let (code, msg) = refused(&pw.login("erin", &token, &db)).await;
    assert_eq!((code.as_str(), msg.contains("revoked")), ("28P01", true), "{msg}");
    // Another token of the same user is not touched by it.
    let client = pw.login("erin", &other, &db).connect().await.expect("an unrevoked token logs in");
    assert!(!current_user(&client).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn okta_access_token_logs_in_with_its_groups() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let key = IdpKey::rs256("okta-rs-1");
    let idp = Idp::start(&ca, "/oauth2/default", "/oauth2/default/v1/keys", &[&key]);
    let db = cluster().create_database("idp_okta");
    let pw = gateway(&idp, &ca, "discovery", &idp.issuer, "api://default", &[]);
    let t = jwt::now();
    let token = key.sign(&json!({
        "ver": 1, "jti": "AT.n9dXNwXGrEvxL1Xz0pr8Y6RvCfKvk", "iss": idp.issuer, "aud": "api://default",
        "iat": t, "exp": t + 3600, "cid": "0oa1b2c3d4", "uid": "00u1a2b3c4", "scp": ["openid", "profile"],
        "auth_time": t - 10, "sub": "carol@example.test", "groups": ["Everyone", "analysts"],
    }));
    let client = pw.login("carol@example.test", &token, &db).connect().await.expect("an Okta token logs in");
    assert!(!current_user(&client).await.unwrap().is_empty());
    let rec = login_record(&pw, "AT.n9dXNwXGrEvxL1Xz0pr8Y6RvCfKvk");
    assert_eq!(rec::groups(&rec), ["Everyone", "analysts"], "{rec}");
    // Another audience is refused.
    let other = key.sign(&json!({"iss": idp.issuer, "aud": "api://other", "exp": t + 60, "sub": "carol@example.test"}));
    let (code, msg) = refused(&pw.login("carol@example.test", &other, &db)).await;
    assert_eq!((code.as_str(), msg.contains("wrong audience")), ("28P01", true), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_id_token_logs_in_by_email() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let key = IdpKey::rs256("6f7254101f56e41cf35c9926de84a2d552b4c6f1");
    let idp = Idp::start(&ca, "", "/oauth2/v3/certs", &[&key]);
    let db = cluster().create_database("idp_google");
    let client_id = "1234567890-abc.apps.googleusercontent.com";
    let pw = gateway(&idp, &ca, "discovery", &idp.issuer, client_id, &[("username_claim", "email")]);
    let t = jwt::now();
    // No jti and no nbf, as Google's ID tokens.
    let token = key.sign(&json!({
        "iss": idp.issuer, "azp": client_id, "aud": client_id, "sub": "110169484474386276334",
        "hd": "example.test", "email": "dave@example.test", "email_verified": true,
        "at_hash": "X_B3Z3Fi4udZ2mf75RWo3w", "name": "Dave", "given_name": "Dave", "locale": "en",
        "iat": t, "exp": t + 3600,
    }));
    let client = pw.login("dave@example.test", &token, &db).connect().await.expect("a Google ID token logs in");
    assert!(!current_user(&client).await.unwrap().is_empty());
    let (_, payload) = jwt::decode_unverified(&token);
    assert!(payload.get("jti").is_none());
    let rec = pw.wait_audit("login record", |r| rec::of_kind(r, "login").iter().any(|x| x["user"] == "dave@example.test"));
    let login = rec::of_kind(&rec, "login").into_iter().find(|x| x["user"] == "dave@example.test").unwrap().clone();
    assert!(login["jti"].as_str().is_some_and(|j| j.starts_with("sha256:")), "{login}");
    // The numeric subject is not the user.
    let (code, _) = refused(&pw.login("110169484474386276334", &token, &db)).await;
    assert_eq!(code, "28000");
}

/// A provider whose certificate does not chain to `auth.jwks_ca` is never trusted: no keys, so
/// every login is refused, and the log and `pgward doctor` say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_fetched_refuse_every_login() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, other_dir) = (TestCa::new(dir.path()), dir.path().join("other"));
    std::fs::create_dir_all(&other_dir).unwrap();
    let stranger_ca = TestCa::new(&other_dir);
    let key = IdpKey::rs256("k1");
    let idp = Idp::start(&ca, "/o", "/o/keys", &[&key]);
    let db = cluster().create_database("idp_never");
    let pw = gateway(&idp, &stranger_ca, "jwks_url", "https://idp.example.test/o", "pgward", &[]);
    let t = jwt::now();
    let token = key.sign(&json!({"iss": "https://idp.example.test/o", "aud": "pgward", "sub": "erin", "exp": t + 600}));
    let (code, msg) = refused(&pw.login("erin", &token, &db)).await;
    assert_eq!(code, "28000", "{msg}");
    assert!(msg.contains("have not been fetched"), "{msg}");
    let log = pw.stderr_log();
    assert!(log.contains("no keys yet, every login is refused") && log.contains("invalid peer certificate"), "{log}");
    let st = key_status(&pw).expect("status file");
    assert!(st["fetched_at"].is_null() && st["last_error"].as_str().is_some_and(|e| e.contains("certificate")), "{st}");
    let (status, detail) = doctor_check(&pw);
    assert_eq!(status, "fail", "{detail}");
    assert!(detail.contains(&idp.jwks_url) && detail.contains("certificate"), "{detail}");
}

/// After one good fetch, an outage keeps the last good keys: logins go on, the failure is in
/// the status file and `pgward doctor` warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_provider_keeps_the_last_good_keys() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path());
    let key = IdpKey::es256("k1");
    let idp = Idp::start(&ca, "/o", "/o/keys", &[&key]);
    let db = cluster().create_database("idp_down");
    let pw = gateway(&idp, &ca, "jwks_url", "https://idp.example.test/o", "pgward", &[]);
    let t = jwt::now();
    let claims = json!({"iss": "https://idp.example.test/o", "aud": "pgward", "sub": "frank", "exp": t + 600});
    pw.login("frank", &key.sign(&claims), &db).connect().await.expect("logs in while the provider is up");
    let (status, detail) = doctor_check(&pw);
    assert_eq!(status, "pass", "{detail}");
    assert!(detail.contains("k1") && detail.contains("serve:"), "{detail}");

    idp.set_down(true);
    // A token with a key id pgward does not know makes it fetch (and fail).
    let stranger = IdpKey::es256("k-unknown");
    let (code, _) = refused(&pw.login("frank", &stranger.sign(&claims), &db)).await;
    assert_eq!(code, "28P01");
    let st = wait_for("serve to record the failed fetch", PICKUP, || {
        key_status(&pw).filter(|s| s["last_error"].as_str().is_some_and(|e| e.contains("503")))
    });
    assert_eq!(st["kids"], json!(["k1"]), "{st}");
    pw.login("frank", &key.sign(&claims), &db).connect().await.expect("the last good keys still verify");
    let (status, detail) = doctor_check(&pw);
    assert_eq!(status, "warn", "doctor's own fetch fails, serve has keys: {detail}");
    assert!(detail.contains("503") && detail.contains("k1"), "{detail}");
}

/// `pgward doctor --json`'s "identity provider keys" check: its result ("pass", "warn", …) and
/// detail.
fn doctor_check(pw: &Pgward) -> (String, String) {
    let out = pgward_cli(&["doctor", "--config", pw.config_path.to_str().unwrap(), "--json"]);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("doctor --json: {e}: {}", out.describe()));
    let c = v["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["check"] == "identity provider keys"))
        .unwrap_or_else(|| panic!("no identity provider check: {v}"));
    let detail = format!("{} {}", c["detail"].as_str().unwrap_or(""), c["fix"].as_str().unwrap_or(""));
    (c["result"].as_str().unwrap_or("").to_string(), detail)
}
