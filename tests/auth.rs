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

impl BadCase {
    fn new(name: &'static str, user: &'static str, password: String, sqlstate: &'static str, jti: Option<String>) -> Self {
        BadCase { name, user, password, sqlstate, jti }
    }
}

/// What the bad tokens are made from: the claims the gateway issues, its signing key and kid,
/// and a key it does not know.
struct Minter {
    base: Value,
    key: EdKey,
    kid: String,
    stranger: EdKey,
}

impl Minter {
    /// The issued claims with `edits` applied and a new jti, and that jti.
    fn fresh(&self, edits: Value) -> (Value, String) {
        let j = format!("bad-{}", common::rand_hex(16));
        let mut e = edits;
        e.as_object_mut().unwrap().insert("jti".into(), json!(j));
        (jwt::edit_claims(&self.base, e), j)
    }

    /// Signed with the gateway's own key: refused for what the claims say.
    fn own_key(&self, name: &'static str, user: &'static str, edits: Value, sqlstate: &'static str) -> BadCase {
        let (cl, j) = self.fresh(edits);
        BadCase::new(name, user, jwt::sign_eddsa(&cl, &self.kid, &self.key), sqlstate, Some(j))
    }
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
    let m = Minter {
        base,
        key: EdKey::from_pem_file(&pw.signing_key_path()),
        kid: pw.signing_kid(),
        stranger: EdKey::generate(),
    };

    // Control: our own signing of the issued claims (with a new jti) is accepted, so every
    // refusal below is due to what the case changes, not to how the test signs.
    let (claims, control_jti) = m.fresh(json!({}));
    let control = jwt::sign_eddsa(&claims, &m.kid, &m.key);
    let client = pw
        .login("alice", &control, &db)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("control token (re-signed issued claims) refused: {e}"));
    let one: i32 = client.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    drop(client);

    let mut cases = claim_cases(&m);
    cases.extend(signature_cases(&m));
    cases.extend(not_a_token_cases(&c.svc_password));

    let mut failures = try_logins(&pw, &db, &cases).await;
    failures.extend(check_login_failed_records(&pw, &cases, &control_jti));
    failures.extend(check_no_secrets(&pw, &cases, &control, &c.svc_password));
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Tokens signed with the gateway's key whose claims are wrong: out of their time, for another
/// audience or issuer, for another user.
fn claim_cases(m: &Minter) -> Vec<BadCase> {
    let now = jwt::now();
    vec![
        m.own_key("expired", "alice", json!({"iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}), "28P01"),
        m.own_key("not yet valid", "alice", json!({"iat": now, "nbf": now + 3600, "exp": now + 7200}), "28P01"),
        m.own_key("wrong aud", "alice", json!({"aud": "some-other-service"}), "28P01"),
        m.own_key("wrong iss", "alice", json!({"iss": "https://evil.example"}), "28P01"),
        m.own_key("sub differs from the startup user", "bob", json!({}), "28000"),
    ]
}

/// Tokens whose signature is not the gateway's: unknown kid, a stranger's key, a tampered
/// payload, `alg: none`, HS256 keyed with public material.
fn signature_cases(m: &Minter) -> Vec<BadCase> {
    let mut cases = Vec::new();
    let (cl, j) = m.fresh(json!({}));
    cases.push(BadCase::new("unknown kid", "alice", jwt::sign_eddsa(&cl, "no-such-kid", &m.stranger), "28P01", Some(j)));
    let (cl, j) = m.fresh(json!({}));
    cases.push(BadCase::new("known kid, stranger's key", "alice", jwt::sign_eddsa(&cl, &m.kid, &m.stranger), "28P01", Some(j)));
    {
        let (cl, _) = m.fresh(json!({}));
        let signed = jwt::sign_eddsa(&cl, &m.kid, &m.key);
        let (tampered, j) = m.fresh(json!({"groups": ["admin", "superusers"]}));
        cases.push(BadCase::new("tampered payload", "alice", jwt::with_payload(&signed, &tampered), "28P01", Some(j)));
    }
    let (cl, j) = m.fresh(json!({}));
    cases.push(BadCase::new("alg none", "alice", jwt::alg_none(&cl, &m.kid), "28P01", Some(j)));
    for (what, secret) in [
        (
            "HS256 keyed with the public key's JWK x",
            m.key.public_x().into_bytes(),
        ),
        (
            "HS256 keyed with the raw public key",
            m.key.public_raw().to_vec(),
        ),
        (
            "HS256 keyed with the public key PEM",
            m.key.public_pem().into_bytes(),
        ),
    ] {
        let (cl, j) = m.fresh(json!({}));
        cases.push(BadCase::new(what, "alice", jwt::sign_hs256(&cl, &m.kid, &secret), "28P01", Some(j)));
    }
    cases
}

/// Passwords that are not tokens; the startup user is unique to each and names its record.
fn not_a_token_cases(svc_password: &str) -> Vec<BadCase> {
    vec![
        BadCase::new("service role's real password, as the service role", "pgward_svc", svc_password.to_string(), "28P01", None),
        BadCase::new("service role's real password, as a user", "carol", svc_password.to_string(), "28P01", None),
        BadCase::new("not a JWT at all", "dave", "hunter2-not-a-token".into(), "28P01", None),
    ]
}

/// Every case's login is refused with its SQLSTATE (tokio-postgres) and psql gets nothing.
async fn try_logins(pw: &Pgward, db: &str, cases: &[BadCase]) -> Vec<String> {
    let mut failures = Vec::new();
    for case in cases {
        let login = pw.login(case.user, &case.password, db);
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
    failures
}

/// A login_failed record per case, carrying the token id, the SQLSTATE and the user, and no
/// login record for a refused token; the control token's login is there.
fn check_login_failed_records(pw: &Pgward, cases: &[BadCase], control_jti: &str) -> Vec<String> {
    let mut failures = Vec::new();
    // (Not panicking on timeout: the per-case report below says which records are missing.)
    let (_, recs) = pw.poll_audit(|recs| {
        cases.iter().filter_map(|c| c.jti.as_ref()).all(|j| {
            recs.iter()
                .any(|r| rec::kind(r) == "login_failed" && r["jti"].as_str() == Some(j))
        })
    });
    for case in cases {
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
    if rec::login_by_jti(&recs, control_jti).is_none() {
        failures.push("control token has no login record".into());
    }
    failures
}

/// Never the secret itself in the audit files: not a bad token, not its signature, not the
/// service password, not the control token.
fn check_no_secrets(pw: &Pgward, cases: &[BadCase], control: &str, svc_password: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let audit = pw.audit_bytes();
    let audit = String::from_utf8_lossy(&audit);
    let mut secrets: Vec<(String, String)> = vec![
        ("control token".into(), control.to_string()),
        (
            "control token signature".into(),
            jwt::signature_part(control).to_string(),
        ),
        ("service password".into(), svc_password.to_string()),
    ];
    for case in cases {
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
    failures
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
