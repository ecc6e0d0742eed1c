//! pgward's own login to the real Postgres (the service credential), with every method Postgres
//! offers: SCRAM-SHA-256 (the harness default), md5, trust, over a unix socket, and over TLS
//! (`upstream.tls = require|prefer`, against a second cluster with `ssl = on`). Also: the service
//! credential never reaches the client, and a wrong upstream password is an error for the client
//! (not a hang) plus a `login_failed` audit record.
//!
//! How each method is proven to be the one used: the role's stored verifier and a pg_hba line of
//! our own leave the server no other way to let it in, and the server log (log_connections)
//! names the method for pgward's own connection (found by its application_name "pgward:…").

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use common::gateway::rec;
use common::raw::{self, RawConn, RawError};
use common::{Login, PgCluster, Pgward, cluster, jwt, marker, rand_hex, sqlstate, tls_cluster};
use serde_json::Value;

/// Does `hay` contain `needle` as a byte sequence?
fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The server log's pid of the backend that logged `connection authorized: user=ROLE
/// database=DB application_name=pgward:…` (pgward's upstream connection for that database).
/// Needs log_connections = on.
fn pgward_backend_pid_in_log(log: &str, role: &str, db: &str) -> Option<String> {
    let needle =
        format!("connection authorized: user={role} database={db} application_name=pgward:");
    let line = log.lines().find(|l| l.contains(&needle))?;
    let start = line.find('[')? + 1;
    let end = start + line[start..].find(']')?;
    Some(line[start..end].to_string())
}

/// The log line in which backend `pid` says how it authenticated, if any.
fn authenticated_line<'a>(log: &'a str, pid: &str) -> Option<&'a str> {
    let tag = format!("[{pid}]");
    log.lines()
        .find(|l| l.contains(&tag) && l.contains("connection authenticated:"))
}

/// log_connections on (once per test binary): the server log then names each connection's
/// authentication method.
fn log_connections(c: &'static PgCluster) {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| c.alter_system("log_connections", "'on'"));
}

/// A role whose password is stored as md5, allowed from 127.0.0.1 by an `md5` pg_hba line that
/// comes before initdb's scram-sha-256 rule. Made once per test binary: (role, password).
fn md5_role() -> &'static (String, String) {
    static ROLE: OnceLock<(String, String)> = OnceLock::new();
    ROLE.get_or_init(|| {
        let c = cluster();
        let role = format!("pgw_md5_{}", rand_hex(8));
        let password = format!("md5pw-{}", rand_hex(20));
        let verifier = c.create_login_role(&role, Some(&password), "md5");
        assert!(
            verifier.starts_with("md5"),
            "password of {role} is not stored as md5: {verifier:?}"
        );
        c.prepend_hba_lines(&[&format!("host all {role} 127.0.0.1/32 md5")]);
        (role, password)
    })
}

/// Run `sql` through the gateway as user "alice" with psql; stdout lines.
#[track_caller]
fn through(pw: &Pgward, db: &str, sql: &str) -> Vec<String> {
    let token = pw.token("alice", &[], "15m");
    let out = pw.login("alice", &token, db).sql(sql);
    out.expect_ok().lines().map(String::from).collect()
}

// ---- login methods ------------------------------------------------------------------------

#[test]
fn scram_upstream_login_is_what_the_default_setup_uses() {
    let c = cluster();
    log_connections(c);
    let db = c.create_database("up_scram");
    let verifier = c.sql(
        "postgres",
        &format!(
            "select rolpassword from pg_authid where rolname = '{}'",
            c.svc_user
        ),
    );
    assert!(verifier.starts_with("SCRAM-SHA-256$"), "{verifier}");
    let pw = Pgward::start();
    assert_eq!(
        through(&pw, &db, "select current_user"),
        vec![c.svc_user.clone()]
    );
    let log = c.log_after_barrier();
    let pid = pgward_backend_pid_in_log(&log, &c.svc_user, &db)
        .unwrap_or_else(|| panic!("no connection-authorized line for pgward's backend on {db}"));
    let line =
        authenticated_line(&log, &pid).unwrap_or_else(|| panic!("backend {pid}: no auth line"));
    assert!(line.contains("method=scram-sha-256"), "{line}");
}

#[test]
fn md5_upstream_login() {
    let c = cluster();
    log_connections(c);
    let (role, password) = md5_role();
    let db = c.create_database("up_md5");

    // Control: the role gets in directly with its password over TCP (so the fixture is right),
    // and initdb's scram rule would not let an md5-stored password in: the md5 line is used.
    let direct = Login::new("127.0.0.1", c.port, role, Some(password), &db);
    assert_eq!(direct.sql("select current_user").expect_ok(), *role);

    let pw = Pgward::builder()
        .upstream_login(role, Some(password))
        .start();
    let rows = through(
        &pw,
        &db,
        "select current_user, session_user, current_setting('application_name')",
    );
    assert_eq!(rows.len(), 1, "{rows:?}");
    let cols: Vec<&str> = rows[0].split('|').collect();
    assert_eq!(cols[0], role.as_str(), "{rows:?}");
    assert_eq!(cols[1], role.as_str(), "{rows:?}");
    assert!(cols[2].starts_with("pgward:alice"), "{rows:?}");

    let log = c.log_after_barrier();
    let pid = pgward_backend_pid_in_log(&log, role, &db)
        .unwrap_or_else(|| panic!("no connection-authorized line for pgward's backend on {db}"));
    let line = authenticated_line(&log, &pid)
        .unwrap_or_else(|| panic!("backend {pid} (pgward's) logged no authentication line"));
    assert!(
        line.contains(&format!("identity=\"{role}\"")) && line.contains("method=md5"),
        "pgward's upstream login did not use md5: {line}"
    );
}

#[test]
fn trust_upstream_login_without_a_password_file() {
    let c = cluster();
    let role = format!("pgw_trust_{}", rand_hex(8));
    // No password at all: only trust can let this role in.
    assert_eq!(c.create_login_role(&role, None, "scram-sha-256"), "");
    c.prepend_hba_lines(&[&format!("host all {role} 127.0.0.1/32 trust")]);
    let db = c.create_database("up_trust");
    let direct = Login::new("127.0.0.1", c.port, &role, None, &db);
    assert_eq!(direct.sql("select current_user").expect_ok(), role);

    let pw = Pgward::builder().upstream_login(&role, None).start();
    assert!(
        pw.config()["upstream"].get("password_file").is_none(),
        "the gateway must run without upstream.password_file here"
    );
    assert_eq!(
        through(&pw, &db, "select current_user, 'trust-ok'"),
        vec![format!("{role}|trust-ok")]
    );
}

#[test]
fn upstream_over_the_unix_socket() {
    let c = cluster();
    let db = c.create_database("up_unix");
    let pw = Pgward::builder()
        .set("upstream.host", c.socket_dir.display().to_string())
        .set("upstream.port", c.port as i64)
        .start();
    // A unix-socket backend has no client address.
    assert_eq!(
        through(
            &pw,
            &db,
            "select inet_client_addr() is null, current_user, current_database()"
        ),
        vec![format!("t|{}|{db}", c.svc_user)]
    );
    // Control: the default (TCP) gateway's backend does have one.
    let tcp = Pgward::start();
    assert_eq!(
        through(&tcp, &db, "select host(inet_client_addr())"),
        vec!["127.0.0.1".to_string()]
    );
}

// ---- TLS ------------------------------------------------------------------------------------

const SSL_OF_MY_BACKEND: &str = "select ssl from pg_stat_ssl where pid = pg_backend_pid()";

#[test]
fn tls_require_encrypts_the_upstream_connection() {
    let c = tls_cluster();
    let db = c.create_database("up_tls");
    assert_eq!(c.sql("postgres", "show ssl"), "on");

    let pw = Pgward::builder_on(c).set("upstream.tls", "require").start();
    assert_eq!(through(&pw, &db, SSL_OF_MY_BACKEND), vec!["t".to_string()]);
    // And the session works as usual over it.
    let m = marker("tls-rows");
    assert_eq!(
        through(
            &pw,
            &db,
            &format!("select '{m}' from generate_series(1, 3)")
        ),
        vec![m.clone(), m.clone(), m]
    );

    // Control: the same server without upstream TLS reports a plaintext backend.
    let plain = Pgward::builder_on(c).set("upstream.tls", "disable").start();
    assert_eq!(
        through(&plain, &db, SSL_OF_MY_BACKEND),
        vec!["f".to_string()]
    );
}

#[test]
fn tls_prefer_uses_tls_when_offered_and_plaintext_otherwise() {
    let tc = tls_cluster();
    let db = tc.create_database("up_prefer_tls");
    let pw = Pgward::builder_on(tc).set("upstream.tls", "prefer").start();
    assert_eq!(through(&pw, &db, SSL_OF_MY_BACKEND), vec!["t".to_string()]);

    let c = cluster();
    assert_eq!(c.sql("postgres", "show ssl"), "off");
    let db = c.create_database("up_prefer_plain");
    let pw = Pgward::builder().set("upstream.tls", "prefer").start();
    assert_eq!(through(&pw, &db, SSL_OF_MY_BACKEND), vec!["f".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_require_against_a_server_refusing_tls_is_a_clear_error() {
    let c = cluster();
    assert_eq!(c.sql("postgres", "show ssl"), "off");
    let db = c.create_database("up_tls_refused");
    let pw = Pgward::builder().set("upstream.tls", "require").start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);

    let err = match login.connect().await {
        Ok(_) => panic!("login succeeded although the upstream cannot do the required TLS"),
        Err(e) => e,
    };
    let db_err = err
        .as_db_error()
        .unwrap_or_else(|| panic!("client got no ErrorResponse, only: {err}"));
    assert_eq!(db_err.code().code(), "08006", "{db_err:?}");
    assert_eq!(db_err.severity(), "FATAL", "{db_err:?}");
    assert!(
        db_err.message().contains("TLS"),
        "the error must say TLS is the problem: {:?}",
        db_err.message()
    );

    // psql users see the same message.
    let out = login.sql("select 'must-not-run'");
    assert!(!out.success(), "{}", out.describe());
    assert!(out.stderr.contains("TLS"), "{}", out.describe());

    let jti = jwt::jti_of(&token);
    let recs = pw.wait_audit("login_failed for the TLS refusal", |r| {
        r.iter()
            .any(|x| rec::kind(x) == "login_failed" && x["jti"].as_str() == Some(jti.as_str()))
    });
    let failed: Vec<&Value> = rec::of_kind(&recs, "login_failed")
        .into_iter()
        .filter(|x| x["jti"].as_str() == Some(jti.as_str()))
        .collect();
    assert!(
        failed.iter().all(|x| x["sqlstate"] == "08006"),
        "{failed:?}"
    );
    assert!(
        rec::login_by_jti(&recs, &jti).is_none(),
        "a login record was written although the login failed"
    );
}

// ---- the credential stays with pgward -------------------------------------------------------

/// A raw session through `pw` that exercises the paths where pgward speaks for itself or relays
/// server text (startup, ParameterStatus, errors, notices, extended protocol), then ends.
/// Returns every byte the client received.
fn raw_session_bytes(pw: &Pgward, db: &str) -> Vec<u8> {
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, db);
    let mut conn = login.raw().expect("raw login through pgward");
    let m = marker("leak-scan");
    let msgs = conn
        .simple_query(&format!(
            "select '{m}', current_user, session_user, current_setting('application_name'); \
             show all"
        ))
        .unwrap();
    assert!(
        raw::first_error(&msgs).is_none(),
        "{}",
        raw::describe_all(&msgs)
    );
    let msgs = conn.simple_query("select 1/0").unwrap();
    assert_eq!(
        raw::first_error(&msgs)
            .and_then(|e| e.sqlstate())
            .as_deref(),
        Some("22012")
    );
    let msgs = conn
        .simple_query("do $$ begin raise notice 'n %', current_user; end $$")
        .unwrap();
    assert!(
        msgs.iter().any(|x| x.tag == b'N'),
        "{}",
        raw::describe_all(&msgs)
    );
    let msgs = conn
        .extended_query("select $1::text || current_user", &[Some("p-")])
        .unwrap();
    assert_eq!(raw::rows(&msgs).len(), 1, "{}", raw::describe_all(&msgs));
    // A statement that fails on a permission check naming the role.
    let _ = conn
        .simple_query("select rolpassword from pg_authid")
        .unwrap();
    conn.send(&raw::fe::terminate()).unwrap();
    conn.read_until_eof(Duration::from_secs(30))
        .expect("pgward closes the connection after Terminate");
    assert!(
        contains_bytes(&conn.received, m.as_bytes()),
        "the transcript lacks the marker the client selected: the scan would prove nothing"
    );
    conn.received
}

#[test]
fn service_credential_never_reaches_the_client() {
    let c = cluster();
    let db = c.create_database("up_leak");

    // SCRAM (default service role).
    let pw = Pgward::start();
    let bytes = raw_session_bytes(&pw, &db);
    assert!(
        !contains_bytes(&bytes, c.svc_password.as_bytes()),
        "the service password reached the client"
    );
    assert!(
        !contains_bytes(&pw.audit_bytes(), c.svc_password.as_bytes()),
        "the service password is in the audit log"
    );

    // md5: also the stored verifier md5(password || user), which is as good as the password.
    let (role, password) = md5_role();
    let pw = Pgward::builder()
        .upstream_login(role, Some(password))
        .start();
    let bytes = raw_session_bytes(&pw, &db);
    let verifier = postgres_protocol::password::md5(password.as_bytes(), role);
    for (what, secret) in [("password", password.as_str()), ("md5 verifier", &verifier)] {
        assert!(
            !contains_bytes(&bytes, secret.as_bytes()),
            "the md5 role's {what} reached the client"
        );
        assert!(
            !contains_bytes(&bytes, secret.trim_start_matches("md5").as_bytes()),
            "the md5 role's {what} (hex) reached the client"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_upstream_password_is_an_error_and_a_login_failed_record() {
    let c = cluster();
    let db = c.create_database("up_wrongpw");
    let wrong = format!("wrong-{}", rand_hex(20));
    let pw = Pgward::builder()
        .upstream_login(&c.svc_user, Some(&wrong))
        .start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);

    // Raw client: an ErrorResponse, then the connection is closed (no hang: bounded reads).
    let mut conn = RawConn::open(&login).unwrap();
    let err = match conn.startup(&login, &[]) {
        Ok(()) => panic!("session started with a wrong upstream password"),
        Err(RawError::Server(m)) => m,
        Err(e) => panic!("expected an ErrorResponse, got {e:?}"),
    };
    let f = err.fields();
    assert_eq!(f.get(&'S').map(String::as_str), Some("FATAL"), "{f:?}");
    assert_eq!(err.sqlstate().as_deref(), Some("28P01"), "{f:?}");
    assert!(
        f.get(&'M').is_some_and(|m| m.contains("pgward")),
        "the message must say it is pgward's upstream login that failed: {f:?}"
    );
    let after = conn
        .read_until_eof(Duration::from_secs(30))
        .expect("pgward must close the connection after the error");
    assert!(after.is_empty(), "{}", raw::describe_all(&after));
    for secret in [wrong.as_str(), c.svc_password.as_str()] {
        assert!(
            !contains_bytes(&conn.received, secret.as_bytes()),
            "a service password reached the client in the error"
        );
    }

    // tokio-postgres: the same, as a driver reports it.
    let e = match login.connect().await {
        Ok(_) => panic!("session started with a wrong upstream password"),
        Err(e) => e,
    };
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e}");

    // The server refused the service role's password (that is the reason, not something else).
    assert!(
        c.log_after_barrier().contains(&format!(
            "password authentication failed for user \"{}\"",
            c.svc_user
        )),
        "Postgres did not log a password failure for the service role"
    );

    let jti = jwt::jti_of(&token);
    let recs = pw.wait_audit("two login_failed records for the token", |r| {
        r.iter()
            .filter(|x| rec::kind(x) == "login_failed" && x["jti"].as_str() == Some(jti.as_str()))
            .count()
            >= 2
    });
    for r in rec::of_kind(&recs, "login_failed")
        .into_iter()
        .filter(|x| x["jti"].as_str() == Some(jti.as_str()))
    {
        assert_eq!(r["user"], "alice", "{r}");
        assert_eq!(r["database"].as_str(), Some(db.as_str()), "{r}");
        assert_eq!(r["sqlstate"], "28P01", "{r}");
        assert!(
            r["error"].as_str().is_some_and(|e| e.contains("upstream")),
            "{r}"
        );
        assert!(
            !rec::mentions(r, &wrong),
            "the password is in the audit record: {r}"
        );
    }
    assert!(
        rec::login_by_jti(&recs, &jti).is_none(),
        "a login record was written although the login failed"
    );
    assert!(
        !contains_bytes(&pw.audit_bytes(), wrong.as_bytes()),
        "the wrong password is in the audit log"
    );
}

// ---- an impostor on the upstream port ----------------------------------------------------------

/// How [`Impostor`] answers pgward's login.
#[derive(Clone, Copy, Debug)]
enum Ploy {
    /// AuthenticationCleartextPassword: the password itself, if pgward sends it.
    Cleartext,
    /// SCRAM-SHA-256 up to the client's proof, then AuthenticationOk without the server's
    /// signature (which needs the role's verifier, which the impostor lacks).
    ScramWithoutProof,
    /// AuthenticationOk at once, as a server trusting the connection would.
    Trust,
}

/// A process listening on the upstream's TCP port in Postgres's place (any local user can
/// while Postgres is stopped): it plays a server for each connection pgward opens, records
/// every byte pgward sends, and once "logged in" answers every query with a command tag.
struct Impostor {
    port: u16,
    received: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// Queries pgward ran on the impostor after it believed the login.
    queries: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Impostor {
    fn start(ploy: Ploy) -> Impostor {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let queries = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (r, q) = (received.clone(), queries.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (r, q) = (r.clone(), q.clone());
                std::thread::spawn(move || {
                    let _ = impostor_session(s, ploy, &r, &q);
                });
            }
        });
        Impostor { port, received, queries }
    }
}

fn impostor_session(
    mut s: std::net::TcpStream,
    ploy: Ploy,
    received: &std::sync::Mutex<Vec<u8>>,
    queries: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    // One message: (tag or 0 for a startup packet, body); every byte is recorded.
    let read_msg = |s: &mut std::net::TcpStream, tagged: bool| -> std::io::Result<(u8, Vec<u8>)> {
        let mut tag = [0u8; 1];
        if tagged {
            s.read_exact(&mut tag)?;
        }
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let n = (u32::from_be_bytes(len) as usize).saturating_sub(4).min(1 << 20);
        let mut body = vec![0u8; n];
        s.read_exact(&mut body)?;
        let mut all = received.lock().unwrap();
        all.extend_from_slice(&tag[..usize::from(tagged)]);
        all.extend_from_slice(&len);
        all.extend_from_slice(&body);
        Ok((tag[0], body))
    };
    let msg = |tag: u8, body: &[u8]| -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    };
    let auth = |code: u32, rest: &[u8]| msg(b'R', &[&code.to_be_bytes()[..], rest].concat());
    let (_, first) = read_msg(&mut s, false)?;
    if first.len() == 4 && u32::from_be_bytes(first[..4].try_into().unwrap()) == 80877103 {
        s.write_all(b"N")?; // SSLRequest: no TLS here
        read_msg(&mut s, false)?;
    }
    match ploy {
        Ploy::Cleartext => {
            s.write_all(&auth(3, &[]))?;
            read_msg(&mut s, true)?; // the password, if pgward sends it
        }
        Ploy::ScramWithoutProof => {
            s.write_all(&auth(10, b"SCRAM-SHA-256\0\0"))?;
            let (_, client_first) = read_msg(&mut s, true)?;
            // SASLInitialResponse: mechanism\0, i32 length, "n,,n=,r=<nonce>".
            let text = String::from_utf8_lossy(&client_first).into_owned();
            let nonce = text.rsplit("r=").next().unwrap_or_default().to_string();
            let server_first = format!("r={nonce}impostor,s=c2FsdHNhbHRzYWx0c2FsdA==,i=4096");
            s.write_all(&auth(11, server_first.as_bytes()))?;
            read_msg(&mut s, true)?; // client-final with the proof
        }
        Ploy::Trust => {}
    }
    s.write_all(&[auth(0, &[]), msg(b'K', &[0, 0, 0, 7, 0, 0, 0, 7]), msg(b'Z', b"I")].concat())?;
    loop {
        let (tag, _) = read_msg(&mut s, true)?;
        match tag {
            b'Q' => {
                queries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                s.write_all(&[msg(b'C', b"SET\0"), msg(b'Z', b"I")].concat())?;
            }
            b'X' => return Ok(()),
            _ => {}
        }
    }
}

/// While Postgres is stopped, a local process can listen on its TCP port and wait for pgward's
/// next upstream login. pgward never sends it the service password in cleartext, and believes
/// no AuthenticationOk that did not come after the server proved it knows the password (SCRAM's
/// server signature) or at least asked for it: the client's login fails (08006), nothing runs
/// on the impostor, and the failure is audited.
#[test]
fn an_impostor_on_the_upstream_port_gets_neither_the_password_nor_the_session() {
    let c = cluster();
    for ploy in [Ploy::Cleartext, Ploy::ScramWithoutProof, Ploy::Trust] {
        let imp = Impostor::start(ploy);
        let pw = Pgward::builder().set("upstream.port", i64::from(imp.port)).start();
        let token = pw.token("alice", &[], "15m");
        let login = pw.login("alice", &token, "app");
        let mut conn = RawConn::open(&login).unwrap();
        let err = match conn.startup(&login, &[]) {
            Ok(()) => panic!("{ploy:?}: a session started on the impostor"),
            Err(RawError::Server(m)) => m,
            Err(e) => panic!("{ploy:?}: expected an ErrorResponse, got {e:?}"),
        };
        assert_eq!(err.sqlstate().as_deref(), Some("08006"), "{ploy:?}: {:?}", err.fields());
        assert!(
            err.fields().get(&'M').is_some_and(|m| m.contains("not trusted")),
            "{ploy:?}: {:?}",
            err.fields()
        );
        let jti = jwt::jti_of(&token);
        pw.wait_audit("login_failed", |r| r.iter().any(|x| rec::kind(x) == "login_failed" && x["jti"].as_str() == Some(jti.as_str())));
        drop(pw);
        let sent = imp.received.lock().unwrap().clone();
        assert!(!sent.is_empty(), "{ploy:?}: pgward never reached the impostor: the test would prove nothing");
        assert!(!contains_bytes(&sent, c.svc_password.as_bytes()), "{ploy:?}: the service password reached the impostor");
        assert_eq!(imp.queries.load(std::sync::atomic::Ordering::SeqCst), 0, "{ploy:?}: pgward ran statements on the impostor");
    }
}
