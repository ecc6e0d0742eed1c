//! Checks of the harness itself against the real PostgreSQL it starts (no pgward involved):
//! the cluster, logins (SCRAM over TCP, trust over the unix socket), fixtures, the server log,
//! the raw protocol client, and the hand-made tokens the auth tests rely on.

mod common;

use std::time::Duration;

use common::jwt::{self, EdKey};
use common::raw::{self, send_cancel_request};
use common::{cluster, marker, sqlstate, within};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_role_logs_in_with_scram_over_tcp() {
    let c = cluster();
    let db = c.create_database("harness_scram");
    let client = c
        .svc_tcp_login(&db)
        .connect()
        .await
        .expect("pgward_svc over TCP with its password");
    let row = within(
        "query",
        client.query_one("select current_user::text, current_database()::text", &[]),
    )
    .await
    .unwrap();
    assert_eq!(row.get::<_, String>(0), "pgward_svc");
    assert_eq!(row.get::<_, String>(1), db);

    // The password really is checked over TCP (scram-sha-256 in pg_hba), so a wrong one fails.
    let err = c
        .svc_tcp_login(&db)
        .with_password("not-the-password")
        .connect()
        .await;
    let Err(err) = err else {
        panic!("wrong password must be refused")
    };
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err}");
    // And the stored verifier is SCRAM.
    let v = c.sql(
        "postgres",
        "select left(rolpassword, 14) from pg_authid where rolname = 'pgward_svc'",
    );
    assert_eq!(v, "SCRAM-SHA-256$");
}

#[test]
fn psql_over_unix_socket_as_superuser_and_service_role() {
    let c = cluster();
    assert_eq!(c.sql("postgres", "select current_user"), "postgres");
    assert_eq!(
        c.sql(
            "postgres",
            "select rolsuper from pg_roles where rolname = 'pgward_svc'"
        ),
        "f"
    );
    let db = c.create_database("harness_psql");
    assert_eq!(c.svc_sql(&db, "select current_user"), "pgward_svc");
    // psql errors carry SQLSTATEs in our output helpers.
    let out = c.try_sql(&db, "select 1/0");
    assert_ne!(out.code, Some(0));
    assert_eq!(
        out.sqlstates(),
        vec!["22012".to_string()],
        "{}",
        out.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_belong_to_the_service_role_and_databases_are_isolated() {
    let c = cluster();
    let db1 = c.create_database("harness_iso");
    let db2 = c.create_database("harness_iso");
    assert_ne!(db1, db2);
    c.fixture_table(
        &db1,
        "items",
        "id int primary key, name text",
        "(1, 'a'), (2, 'b')",
    );
    assert_eq!(
        c.sql(
            &db1,
            "select tableowner from pg_tables where tablename = 'items'"
        ),
        "pgward_svc"
    );
    let client = c.svc_tcp_login(&db1).connect().await.unwrap();
    let n: i64 = client
        .query_one("select count(*) from items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let other = c.try_sql(&db2, "select count(*) from items");
    assert_eq!(
        other.sqlstates(),
        vec!["42P01".to_string()],
        "{}",
        other.describe()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_log_shows_statements_that_reached_postgres() {
    let c = cluster();
    let db = c.create_database("harness_log");
    let m = marker("harness-log");
    let client = c.svc_tcp_login(&db).connect().await.unwrap();
    client.simple_query(&format!("select '{m}'")).await.unwrap();
    assert!(
        c.wait_log_contains(&m, Duration::from_secs(10)),
        "statement not in the server log"
    );
    // The log line names user@database (log_line_prefix), so tests can attribute lines.
    let log = c.server_log();
    let line = log.lines().find(|l| l.contains(&m)).unwrap();
    assert!(line.contains(&format!("pgward_svc@{db} ")), "{line}");
    // A statement never sent is of course absent (the check the fail-closed test relies on).
    assert!(!c.log_after_barrier().contains(&marker("never-sent")));
}

#[test]
fn raw_client_speaks_the_protocol() {
    let c = cluster();
    let db = c.create_database("harness_raw");
    let login = c.svc_unix_login(&db);
    let mut conn = login.raw().expect("raw connect over the unix socket");
    assert!(
        conn.params["server_version"].starts_with("15"),
        "{:?}",
        conn.params
    );
    assert_eq!(conn.params["client_encoding"], "UTF8");
    assert!(conn.backend_key.is_some());

    let msgs = conn
        .simple_query("select 1 as a; select 'x', null")
        .unwrap();
    assert_eq!(
        raw::rows(&msgs),
        vec![
            vec![Some("1".to_string())],
            vec![Some("x".to_string()), None]
        ],
        "{}",
        raw::describe_all(&msgs)
    );
    assert_eq!(raw::tags(&msgs), vec!["SELECT 1", "SELECT 1"]);

    let msgs = conn
        .extended_query("select $1::int + 1, $2::text", &[Some("41"), None])
        .unwrap();
    assert_eq!(
        raw::rows(&msgs),
        vec![vec![Some("42".to_string()), None]],
        "{}",
        raw::describe_all(&msgs)
    );

    let msgs = conn.simple_query("select 1/0").unwrap();
    assert_eq!(
        raw::first_error(&msgs)
            .and_then(|m| m.sqlstate())
            .as_deref(),
        Some("22012")
    );

    // CancelRequest with the right keys cancels; wrong keys do not.
    let (pid, key) = conn.backend_key.unwrap();
    let m = marker("harness-cancel");
    conn.send(&raw::fe::query(&format!("select pg_sleep(3) -- {m}")))
        .unwrap();
    c.wait_active_query(&m);
    send_cancel_request(&login, pid, key.wrapping_add(1)).unwrap();
    let msgs = conn.recv_until_ready().unwrap();
    assert!(
        raw::first_error(&msgs).is_none(),
        "wrong key cancelled: {}",
        raw::describe_all(&msgs)
    );

    let m = marker("harness-cancel");
    conn.send(&raw::fe::query(&format!("select pg_sleep(30) -- {m}")))
        .unwrap();
    c.wait_active_query(&m);
    send_cancel_request(&login, pid, key).unwrap();
    let msgs = conn.recv_until_ready().unwrap();
    assert_eq!(
        raw::first_error(&msgs)
            .and_then(|m| m.sqlstate())
            .as_deref(),
        Some("57014")
    );

    let left = conn.terminate().expect("server closes after Terminate");
    assert!(left.is_empty(), "{}", raw::describe_all(&left));
}

/// The bad tokens in tests/auth.rs are bad for exactly the reason each case names: checked here
/// with jsonwebtoken's own verifier and a key of our own.
#[test]
fn hand_made_tokens_fail_for_the_intended_reason_only() {
    let key = EdKey::generate();
    let other = EdKey::generate();
    let (iss, aud, kid) = ("https://issuer.test", "pgward-test", "k1");
    let now = jwt::now();
    let base = json!({"iss": iss, "aud": aud, "sub": "alice", "iat": now, "nbf": now, "exp": now + 600, "jti": "j1", "groups": ["g"]});

    let verify = |token: &str| -> Result<serde_json::Value, jsonwebtoken::errors::ErrorKind> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.into_kind())?;
        if header.kid.as_deref() != Some(kid) {
            return Err(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat);
        }
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&[aud]);
        v.set_issuer(&[iss]);
        v.validate_nbf = true;
        v.leeway = 30;
        let dk = DecodingKey::from_ed_components(&key.public_x()).unwrap();
        jsonwebtoken::decode::<serde_json::Value>(token, &dk, &v)
            .map(|d| d.claims)
            .map_err(|e| e.into_kind())
    };

    let good = jwt::sign_eddsa(&base, kid, &key);
    assert_eq!(
        verify(&good).expect("control token verifies")["sub"],
        "alice"
    );
    assert_eq!(jwt::decode_unverified(&good).1, base);

    use jsonwebtoken::errors::ErrorKind as K;
    let expired = jwt::sign_eddsa(
        &jwt::edit_claims(
            &base,
            json!({"exp": now - 3600, "iat": now - 7200, "nbf": now - 7200}),
        ),
        kid,
        &key,
    );
    assert!(matches!(verify(&expired), Err(K::ExpiredSignature)));
    let future = jwt::sign_eddsa(
        &jwt::edit_claims(&base, json!({"nbf": now + 3600, "exp": now + 7200})),
        kid,
        &key,
    );
    assert!(matches!(verify(&future), Err(K::ImmatureSignature)));
    let aud_bad = jwt::sign_eddsa(
        &jwt::edit_claims(&base, json!({"aud": "someone-else"})),
        kid,
        &key,
    );
    assert!(matches!(verify(&aud_bad), Err(K::InvalidAudience)));
    let iss_bad = jwt::sign_eddsa(
        &jwt::edit_claims(&base, json!({"iss": "https://evil.test"})),
        kid,
        &key,
    );
    assert!(matches!(verify(&iss_bad), Err(K::InvalidIssuer)));
    let wrong_key = jwt::sign_eddsa(&base, kid, &other);
    assert!(matches!(verify(&wrong_key), Err(K::InvalidSignature)));
    let unknown_kid = jwt::sign_eddsa(&base, "no-such-kid", &key);
    assert!(verify(&unknown_kid).is_err());
    let tampered = jwt::with_payload(
        &good,
        &jwt::edit_claims(&base, json!({"groups": ["admin"]})),
    );
    assert!(matches!(verify(&tampered), Err(K::InvalidSignature)));
    let none = jwt::alg_none(&base, kid);
    assert!(verify(&none).is_err());
    assert!(none.ends_with('.'));
    for secret in [
        key.public_x().into_bytes(),
        key.public_raw().to_vec(),
        key.public_pem().into_bytes(),
    ] {
        let hs = jwt::sign_hs256(&base, kid, &secret);
        assert_eq!(jwt::decode_unverified(&hs).0["alg"], "HS256");
        assert!(verify(&hs).is_err());
    }
}
