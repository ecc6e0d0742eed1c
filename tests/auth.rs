//! Logging in through pgward: a token is the password. Good tokens get a session; every kind of
//! bad token is refused with the documented SQLSTATE, leaves a `login_failed` audit record with
//! the token's id, and never leaves the token itself in the audit files.

mod common;

use common::gateway::rec;
use common::jwt::{self, EdKey};
use common::{Login, Pgward, cluster, sqlstate, within};
use serde_json::{Value, json};

#[test]
fn good_token_logs_in_with_psql() {
    let c = cluster();
    let db = c.create_database("auth_psql");
    let pw = Pgward::start();
    let token = pw.token("alice", &["analysts"], "15m");
    let login = pw.login("alice", &token, &db);

    let out = login.psql(&[
        "-c",
        "select 1",
        "-c",
        "show application_name",
        "-c",
        "select current_database()",
    ]);
    let stdout = out.expect_ok();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", out.describe());
    assert_eq!(lines[0], "1");
    // The upstream session is pgward's service role, but Postgres' own views must say who it is.
    assert!(
        lines[1].contains("alice"),
        "application_name should name the real user, got {:?}",
        lines[1]
    );
    assert_eq!(lines[2], db, "the database the client asked for");

    let jti = jwt::jti_of(&token);
    let recs = pw.wait_audit("login record for the psql session", |r| {
        rec::login_by_jti(r, &jti).is_some()
    });
    let login_rec = rec::login_by_jti(&recs, &jti).unwrap();
    assert_eq!(login_rec["user"], "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn good_token_logs_in_with_tokio_postgres() {
    let c = cluster();
    let db = c.create_database("auth_tokio");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let client = pw
        .login("alice", &token, &db)
        .connect()
        .await
        .expect("login with a fresh token");
    let one: i32 = within("extended query", client.query_one("select 1", &[]))
        .await
        .unwrap()
        .get(0);
    assert_eq!(one, 1);
    let rows = within("simple query", client.simple_query("select 'simple-ok'"))
        .await
        .unwrap();
    assert!(
        rows.iter().any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(r) if r.get(0) == Some("simple-ok"))),
        "simple query result missing"
    );
}

/// One way a login can be wrong.
struct BadCase {
    name: &'static str,
    /// StartupMessage user.
    user: &'static str,
    password: String,
    /// Expected SQLSTATE.
    sqlstate: &'static str,
    /// jti the login_failed record must carry (None: the password is not a token; then the
    /// startup user is unique to the case and identifies its record).
    jti: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_sqlstate_and_audited_without_the_token() {
    let c = cluster();
    let db = c.create_database("auth_bad");
    let pw = Pgward::start();

    // A real token tells us the claims the gateway issues and expects (iss, aud, sub, exp, ...).
    let issued = pw.token("alice", &["analysts"], "15m");
    let (_, base) = jwt::decode_unverified(&issued);
    for claim in ["iss", "aud", "sub", "exp", "jti"] {
        assert!(
            base.get(claim).is_some(),
            "issued token lacks {claim}: {base}"
        );
    }
    let key = EdKey::from_pem_file(&pw.signing_key_path());
    let kid = pw.signing_kid();
    let stranger = EdKey::generate();
    let now = jwt::now();
    let fresh = |edits: Value| -> (Value, String) {
        let j = format!("bad-{}", common::rand_hex(16));
        let mut e = edits;
        e.as_object_mut().unwrap().insert("jti".into(), json!(j));
        (jwt::edit_claims(&base, e), j)
    };

    // Control: our own signing of the issued claims (with a new jti) is accepted, so every
    // refusal below is due to what the case changes, not to how the test signs.
    let (claims, control_jti) = fresh(json!({}));
    let control = jwt::sign_eddsa(&claims, &kid, &key);
    let client = pw
        .login("alice", &control, &db)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("control token (re-signed issued claims) refused: {e}"));
    let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    drop(client);

    let mut cases: Vec<BadCase> = Vec::new();
    let mut add = |name, user, password: String, sqlstate, jti: Option<String>| {
        cases.push(BadCase {
            name,
            user,
            password,
            sqlstate,
            jti,
        })
    };
    let (cl, j) = fresh(json!({"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}));
    add(
        "expired",
        "alice",
        jwt::sign_eddsa(&cl, &kid, &key),
        "28P01",
        Some(j),
    );
    let (cl, j) = fresh(json!({"iat": now, "nbf": now + 3600, "exp": now + 7200}));
    add(
        "not yet valid",
        "alice",
        jwt::sign_eddsa(&cl, &kid, &key),
        "28P01",
        Some(j),
    );
    let (cl, j) = fresh(json!({"aud": "some-other-service"}));
    add(
        "wrong aud",
        "alice",
        jwt::sign_eddsa(&cl, &kid, &key),
        "28P01",
        Some(j),
    );
    let (cl, j) = fresh(json!({"iss": "https://evil.example"}));
    add(
        "wrong iss",
        "alice",
        jwt::sign_eddsa(&cl, &kid, &key),
        "28P01",
        Some(j),
    );
    let (cl, j) = fresh(json!({}));
    add(
        "unknown kid",
        "alice",
        jwt::sign_eddsa(&cl, "no-such-kid", &stranger),
        "28P01",
        Some(j),
    );
    let (cl, j) = fresh(json!({}));
    add(
        "known kid, stranger's key",
        "alice",
        jwt::sign_eddsa(&cl, &kid, &stranger),
        "28P01",
        Some(j),
    );
    {
        let (cl, _) = fresh(json!({}));
        let signed = jwt::sign_eddsa(&cl, &kid, &key);
        let (tampered, j) = fresh(json!({"groups": ["admin", "superusers"]}));
        add(
            "tampered payload",
            "alice",
            jwt::with_payload(&signed, &tampered),
            "28P01",
            Some(j),
        );
    }
    let (cl, j) = fresh(json!({}));
    add(
        "alg none",
        "alice",
        jwt::alg_none(&cl, &kid),
        "28P01",
        Some(j),
    );
    for (what, secret) in [
        (
            "HS256 keyed with the public key's JWK x",
            key.public_x().into_bytes(),
        ),
        (
            "HS256 keyed with the raw public key",
            key.public_raw().to_vec(),
        ),
        (
            "HS256 keyed with the public key PEM",
            key.public_pem().into_bytes(),
        ),
    ] {
        let (cl, j) = fresh(json!({}));
        add(
            what,
            "alice",
            jwt::sign_hs256(&cl, &kid, &secret),
            "28P01",
            Some(j),
        );
    }
    let (cl, j) = fresh(json!({}));
    add(
        "sub differs from the startup user",
        "bob",
        jwt::sign_eddsa(&cl, &kid, &key),
        "28000",
        Some(j),
    );
    add(
        "service role's real password, as the service role",
        "pgward_svc",
        c.svc_password.clone(),
        "28P01",
        None,
    );
    add(
        "service role's real password, as a user",
        "carol",
        c.svc_password.clone(),
        "28P01",
        None,
    );
    add(
        "not a JWT at all",
        "dave",
        "hunter2-not-a-token".into(),
        "28P01",
        None,
    );

    let mut failures = Vec::new();
    for case in &cases {
        let login = pw.login(case.user, &case.password, &db);
        // tokio-postgres: the SQLSTATE of the refusal.
        match login.connect().await {
            Ok(_) => failures.push(format!("[{}] login was accepted", case.name)),
            Err(e) => {
                let got = sqlstate(&e);
                if got.as_deref() != Some(case.sqlstate) {
                    failures.push(format!(
                        "[{}] expected SQLSTATE {}, got {:?}: {e}",
                        case.name, case.sqlstate, got
                    ));
                }
            }
        }
        // psql: what a person sees — a non-zero exit and no result.
        let out = login.sql("select 'should-not-run'");
        if out.success() || out.stdout.contains("should-not-run") {
            failures.push(format!("[{}] psql got in: {}", case.name, out.describe()));
        }
    }

    // Audit: a login_failed record per case, carrying the token id and the SQLSTATE.
    // (Not panicking on timeout: the per-case report below says which records are missing.)
    let (_, recs) = pw.poll_audit(|recs| {
        cases.iter().filter_map(|c| c.jti.as_ref()).all(|j| {
            recs.iter()
                .any(|r| rec::kind(r) == "login_failed" && r["jti"].as_str() == Some(j))
        })
    });
    for case in &cases {
        let failed: Vec<&Value> = rec::of_kind(&recs, "login_failed")
            .into_iter()
            .filter(|r| match &case.jti {
                Some(j) => r["jti"].as_str() == Some(j),
                None => r["user"].as_str() == Some(case.user),
            })
            .collect();
        if failed.is_empty() {
            failures.push(format!("[{}] no login_failed record", case.name));
            continue;
        }
        for r in &failed {
            if r["sqlstate"].as_str() != Some(case.sqlstate) {
                failures.push(format!(
                    "[{}] login_failed sqlstate {:?}, want {}: {r}",
                    case.name, r["sqlstate"], case.sqlstate
                ));
            }
            if !rec::mentions(r, case.user) {
                failures.push(format!(
                    "[{}] login_failed record does not name the startup user {}: {r}",
                    case.name, case.user
                ));
            }
            if case.name.starts_with("sub differs") && !rec::mentions(r, "alice") {
                failures.push(format!(
                    "[{}] login_failed record does not name the token subject: {r}",
                    case.name
                ));
            }
        }
        if let Some(j) = &case.jti
            && rec::login_by_jti(&recs, j).is_some()
        {
            failures.push(format!(
                "[{}] a successful login record exists for jti {j}",
                case.name
            ));
        }
    }
    // A successful login for the control token exists (so the absence checks above mean something).
    if rec::login_by_jti(&recs, &control_jti).is_none() {
        failures.push("control token has no login record".into());
    }

    // Never the secret itself: not a bad token, not its signature, not the service password,
    // not the control token.
    let audit = pw.audit_bytes();
    let audit = String::from_utf8_lossy(&audit);
    let mut secrets: Vec<(String, String)> = vec![
        ("control token".into(), control.clone()),
        (
            "control token signature".into(),
            jwt::signature_part(&control).to_string(),
        ),
        ("service password".into(), c.svc_password.clone()),
    ];
    for case in &cases {
        secrets.push((
            format!("[{}] password/token", case.name),
            case.password.clone(),
        ));
        let sig = jwt::signature_part(&case.password);
        if case.jti.is_some() && sig.len() >= 16 {
            secrets.push((format!("[{}] token signature", case.name), sig.to_string()));
        }
    }
    for (what, s) in secrets {
        if audit.contains(&s) {
            failures.push(format!("{what} appears in the audit files"));
        }
    }

    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn tls_login_with_sslmode_require() {
    let c = cluster();
    let db = c.create_database("auth_tls");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db).with_sslmode("require");
    let out = login.psql(&["-c", "\\conninfo", "-c", "select 'tls-ok'"]);
    let stdout = out.expect_ok();
    assert!(
        stdout.contains("SSL connection"),
        "psql did not report TLS: {}",
        out.describe()
    );
    assert!(stdout.lines().any(|l| l == "tls-ok"), "{}", out.describe());
}

#[test]
fn plaintext_token_refused_when_plaintext_local_is_off() {
    let c = cluster();
    let db = c.create_database("auth_plain");
    let pw = Pgward::builder()
        .set("server.allow_plaintext_local", false)
        .start();
    let token = pw.token("alice", &[], "15m");
    let login: Login = pw.login("alice", &token, &db);

    let plain = login
        .clone()
        .with_sslmode("disable")
        .sql("select 'plain-got-in'");
    assert!(
        !plain.success() && !plain.stdout.contains("plain-got-in"),
        "plaintext login accepted: {}",
        plain.describe()
    );

    // Control: the same token over TLS works, so the refusal above is about plaintext.
    let tls = login.with_sslmode("require").sql("select 'tls-got-in'");
    assert_eq!(tls.expect_ok(), "tls-got-in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_from_pgward_itself_is_refused() {
    // `token issue` with a lifetime shorter than the leeway is still valid now; instead, use a
    // gateway whose leeway is zero and a token that expires in one second, then wait it out.
    let c = cluster();
    let db = c.create_database("auth_exp");
    let pw = Pgward::builder().set("auth.leeway_secs", 0).start();
    let token = pw.token("alice", &[], "1s");
    let exp = jwt::decode_unverified(&token).1["exp"]
        .as_i64()
        .expect("exp");
    while jwt::now() <= exp + 1 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let err = pw.login("alice", &token, &db).connect().await;
    let Err(err) = err else {
        panic!("expired token must be refused")
    };
    assert_eq!(sqlstate(&err).as_deref(), Some("28P01"), "{err}");
}
