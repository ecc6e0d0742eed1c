//! Bad input on the wire, through the raw client: every malformed frame, before the startup
//! packet, at the password step or inside a session, gets one ErrorResponse (severity FATAL,
//! SQLSTATE 08P01, or 28000 for a startup packet without a user) and the connection is closed;
//! pgward keeps serving other sessions (one opened before the bad input and new ones) and never
//! panics. Also: the unix socket listener (server.unix_socket_dir) with peer credentials in the
//! audit log, and GSSENCRequest answered 'N' on a connection that then logs in normally.
//!
//! Not covered: SSLRequest answered 'N' followed by a plaintext startup — pgward always has a
//! TLS certificate (`server.tls_cert` is required and `serve` always answers 'S').

mod common;

use std::time::Duration;

use common::gateway::rec;
use common::raw::{self, Msg, RawConn, fe};
use common::{Login, Pgward, cluster, jwt, marker};

/// Where in the conversation the bad bytes are sent.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// First thing on a fresh connection.
    BeforeStartup,
    /// After a valid StartupMessage, when pgward has asked for the password (the token).
    AtPassword,
    /// In a logged-in session (after ReadyForQuery).
    InSession,
}

struct Case {
    name: &'static str,
    stage: Stage,
    bytes: Vec<u8>,
    sqlstate: &'static str,
}

fn case(name: &'static str, stage: Stage, bytes: Vec<u8>, sqlstate: &'static str) -> Case {
    Case {
        name,
        stage,
        bytes,
        sqlstate,
    }
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Bind of the unnamed statement whose parameter count says 3 but whose body holds only one
/// parameter (and nothing after it).
fn truncated_bind() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"\0\0"); // portal "", statement ""
    b.extend_from_slice(&0i16.to_be_bytes()); // no format codes
    b.extend_from_slice(&3i16.to_be_bytes()); // 3 parameters...
    b.extend_from_slice(&1i32.to_be_bytes()); // ...but only the first one follows
    b.extend_from_slice(b"1");
    fe::raw_msg(b'B', &b)
}

/// A startup packet whose last parameter value has no terminating NUL.
fn unterminated_startup(db: &str) -> Vec<u8> {
    let mut body = 196608i32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0alice\0database\0");
    body.extend_from_slice(db.as_bytes()); // no NUL, no final NUL
    let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

fn cases(db: &str) -> Vec<Case> {
    let mut v = session_cases();
    v.extend(startup_cases(db));
    v.extend(password_cases());
    v
}

/// Bad frames in a logged-in session.
fn session_cases() -> Vec<Case> {
    use Stage::*;
    vec![
        case(
            "frame length < 4",
            InSession,
            b"Q\0\0\0\x02".to_vec(),
            "08P01",
        ),
        case("frame length 0", InSession, b"S\0\0\0\0".to_vec(), "08P01"),
        case(
            "unknown message type 'z'",
            InSession,
            fe::raw_msg(b'z', b"hello\0"),
            "08P01",
        ),
        case(
            "truncated Bind (3 parameters announced, 1 present)",
            InSession,
            cat(&[
                &fe::parse("", "select $1::int, $2::int, $3::int"),
                &truncated_bind(),
                &fe::sync(),
            ]),
            "08P01",
        ),
        case(
            "oversized length field (0x7fffffff)",
            InSession,
            b"Q\x7f\xff\xff\xff".to_vec(),
            "08P01",
        ),
        case(
            "negative length field (0xffffffff)",
            InSession,
            b"Q\xff\xff\xff\xff".to_vec(),
            "08P01",
        ),
        // Postgres's own limit for a Sync (PQ_SMALL_MESSAGE_LIMIT), refused from the header.
        case(
            "Sync longer than Postgres's 10000-byte limit",
            InSession,
            cat(&[b"S", &20_000i32.to_be_bytes()]),
            "08P01",
        ),
        case(
            "Query string without terminator",
            InSession,
            fe::raw_msg(b'Q', b"select 1"),
            "08P01",
        ),
    ]
}

/// Bad bytes before or in the startup packet.
fn startup_cases(db: &str) -> Vec<Case> {
    use Stage::*;
    vec![
        case(
            "garbage before startup (an HTTP request)",
            BeforeStartup,
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
            "08P01",
        ),
        case(
            "startup packet length < 8",
            BeforeStartup,
            b"\0\0\0\x05\0".to_vec(),
            "08P01",
        ),
        case(
            "oversized startup packet length (16 MiB)",
            BeforeStartup,
            cat(&[b"\x01\0\0\0", &196608i32.to_be_bytes()]),
            "08P01",
        ),
        case(
            "startup packet with an unterminated parameter",
            BeforeStartup,
            unterminated_startup(db),
            "08P01",
        ),
        case(
            "startup packet with no user",
            BeforeStartup,
            fe::startup(&[("database", db)]),
            "28000",
        ),
        case(
            "startup packet with an empty user",
            BeforeStartup,
            fe::startup(&[("user", ""), ("database", db)]),
            "28000",
        ),
        // A plaintext StartupMessage sent together with the SSLRequest, before the server's
        // answer: accepting it would let a man in the middle inject a plaintext prefix
        // (CVE-2021-23214 in Postgres). Must be refused, not answered 'S'.
        case(
            "StartupMessage pipelined behind SSLRequest",
            BeforeStartup,
            cat(&[
                &fe::ssl_request(),
                &fe::startup(&[("user", "alice"), ("database", db)]),
            ]),
            "08P01",
        ),
    ]
}

/// Bad frames at the password step.
fn password_cases() -> Vec<Case> {
    use Stage::*;
    vec![
        case(
            "password frame length < 4",
            AtPassword,
            b"p\0\0\0\x02".to_vec(),
            "08P01",
        ),
        case(
            "Query instead of the password message",
            AtPassword,
            fe::query("select 1"),
            "08P01",
        ),
    ]
}

/// Play one case on a fresh connection; Err(problem) if pgward did not answer as it must.
fn play(login: &Login, c: &Case) -> Result<(), String> {
    let mut conn = match c.stage {
        Stage::BeforeStartup => RawConn::open(login).map_err(|e| format!("connect: {e}"))?,
        Stage::AtPassword => {
            let mut conn = RawConn::open(login).map_err(|e| format!("connect: {e}"))?;
            conn.send(&fe::startup(&[
                ("user", &login.user),
                ("database", &login.dbname),
            ]))
            .map_err(|e| format!("send startup: {e}"))?;
            let m = conn
                .recv()
                .map_err(|e| format!("no password request: {e}"))?;
            if m.tag != b'R' || m.body.get(..4) != Some(&3i32.to_be_bytes()[..]) {
                return Err(format!(
                    "expected AuthenticationCleartextPassword, got {}",
                    m.describe()
                ));
            }
            conn
        }
        Stage::InSession => login.raw().map_err(|e| format!("login: {e:?}"))?,
    };
    let seen = conn.received.len();
    conn.send(&c.bytes).map_err(|e| format!("send: {e}"))?;
    let msgs: Vec<Msg> = conn.read_until_eof(Duration::from_secs(30)).map_err(|e| {
        format!(
            "connection not closed within 30 s ({e}); received after the bad input: {:?}",
            String::from_utf8_lossy(&conn.received[seen..])
        )
    })?;
    let errors: Vec<&Msg> = msgs.iter().filter(|m| m.is_error()).collect();
    let [err] = errors[..] else {
        return Err(format!(
            "want exactly one ErrorResponse before the close, got:\n{}",
            raw::describe_all(&msgs)
        ));
    };
    let f = err.fields();
    if f.get(&'S').map(String::as_str) != Some("FATAL") {
        return Err(format!("severity is not FATAL: {f:?}"));
    }
    if err.sqlstate().as_deref() != Some(c.sqlstate) {
        return Err(format!(
            "SQLSTATE {:?}, want {}: {f:?}",
            err.sqlstate(),
            c.sqlstate
        ));
    }
    if msgs.last().map(|m| m.tag) != Some(b'E') {
        return Err(format!(
            "something followed the FATAL error:\n{}",
            raw::describe_all(&msgs)
        ));
    }
    // In a session, nothing but the error may be sent (no result of the bad batch).
    if matches!(c.stage, Stage::InSession) && msgs.len() != 1 {
        return Err(format!(
            "the bad frame's batch produced output:\n{}",
            raw::describe_all(&msgs)
        ));
    }
    Ok(())
}

/// A new session through `login` runs a query.
fn new_session_works(login: &Login) -> Result<(), String> {
    let mut conn = login.raw().map_err(|e| format!("login refused: {e:?}"))?;
    let m = marker("still-serving");
    let msgs = conn
        .simple_query(&format!("select '{m}'"))
        .map_err(|e| format!("query: {e}"))?;
    if raw::rows(&msgs) != vec![vec![Some(m)]] {
        return Err(format!("wrong answer: {}", raw::describe_all(&msgs)));
    }
    conn.terminate().map_err(|e| format!("terminate: {e}"))?;
    Ok(())
}

#[test]
fn malformed_input_gets_fatal_error_and_close_and_pgward_keeps_serving() {
    let c = cluster();
    let db = c.create_database("proto_bad");
    let mut pw = Pgward::start();
    let token = pw.token("alice", &[], "30m");
    let login = pw.login("alice", &token, &db);

    // A session that stays open through all the bad input next to it.
    let mut bystander = login.raw().expect("bystander login");
    let mut failures = Vec::new();
    for cs in cases(&db) {
        if let Err(e) = play(&login, &cs) {
            failures.push(format!("[{}] {e}", cs.name));
        }
        if let Err(e) = new_session_works(&login) {
            failures.push(format!(
                "[{}] afterwards, a new session failed: {e}",
                cs.name
            ));
        }
    }
    let m = marker("bystander");
    let msgs = bystander
        .simple_query(&format!("select '{m}'"))
        .expect("bystander session still answers");
    assert_eq!(raw::rows(&msgs), vec![vec![Some(m)]]);
    bystander.terminate().unwrap();

    assert!(pw.is_running(), "pgward exited:\n{}", pw.stderr_log());
    assert!(!pw.log_has_panic(), "pgward panicked:\n{}", pw.stderr_log());
    assert!(
        failures.is_empty(),
        "{} problem(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn bad_frames_in_a_session_end_it_with_an_audit_reason() {
    // The session that sent garbage is recorded as ended, with the protocol error as reason.
    let c = cluster();
    let db = c.create_database("proto_end");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let mut conn = pw.login("alice", &token, &db).raw().unwrap();
    conn.send(&fe::raw_msg(b'z', b"")).unwrap();
    let msgs = conn.read_until_eof(Duration::from_secs(30)).unwrap();
    assert_eq!(
        raw::first_error(&msgs)
            .and_then(|e| e.sqlstate())
            .as_deref(),
        Some("08P01")
    );
    let jti = jwt::jti_of(&token);
    let recs = pw.wait_audit("session_end of the session that sent a bad frame", |r| {
        rec::login_by_jti(r, &jti)
            .and_then(|l| l["session"].as_str())
            .is_some_and(|s| rec::has_session_end(r, s))
    });
    let session = rec::login_by_jti(&recs, &jti).unwrap()["session"]
        .as_str()
        .unwrap()
        .to_string();
    let end = rec::of_session(&recs, &session)
        .into_iter()
        .find(|r| rec::kind(r) == "session_end")
        .unwrap();
    assert!(
        end["error"].as_str().is_some_and(|e| e.contains("08P01")),
        "session_end must carry the protocol error: {end}"
    );
}

#[test]
fn gssenc_request_is_answered_n_and_the_session_continues() {
    let c = cluster();
    let db = c.create_database("proto_gss");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);
    let mut conn = RawConn::open(&login).unwrap();
    conn.send(&fe::gssenc_request()).unwrap();
    assert_eq!(conn.read_bytes(1).unwrap(), b"N", "GSSENCRequest answer");
    conn.startup(&login, &[])
        .expect("a normal login after the refused GSSENCRequest");
    let m = marker("after-gss");
    let msgs = conn.simple_query(&format!("select '{m}'")).unwrap();
    assert_eq!(raw::rows(&msgs), vec![vec![Some(m)]]);
    conn.terminate().unwrap();
    let jti = jwt::jti_of(&token);
    pw.wait_audit("login record after GSSENCRequest", |r| {
        rec::login_by_jti(r, &jti).is_some()
    });
}

#[test]
fn unix_socket_clients_are_audited_with_uid_and_pid() {
    let c = cluster();
    let db = c.create_database("proto_unix");
    let pw = Pgward::builder()
        .with_dir(|dir, t| {
            std::fs::create_dir_all(dir.join("sock")).unwrap();
            // Relative: resolved against the config's directory.
            common::toml_set(t, "server.unix_socket_dir", "sock");
        })
        .start();
    let sock_dir = pw.unix_socket_dir().unwrap();
    let sock = sock_dir.join(format!(".s.PGSQL.{}", pw.addr.port()));
    assert!(sock.exists(), "no socket at {}", sock.display());

    // Raw client: this very process is the peer.
    let token = pw.token("alice", &[], "15m");
    let login = pw.unix_login("alice", &token, &db);
    let mut conn = login.raw().expect("login over pgward's unix socket");
    let m = marker("unix-raw");
    let msgs = conn.simple_query(&format!("select '{m}'")).unwrap();
    assert_eq!(raw::rows(&msgs), vec![vec![Some(m)]]);
    conn.terminate().unwrap();

    // psql, as users would.
    let token2 = pw.token("alice", &[], "15m");
    let out = pw
        .unix_login("alice", &token2, &db)
        .sql("select 'unix-psql-ok'");
    assert_eq!(out.expect_ok(), "unix-psql-ok");

    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() } as u64;
    let (jti, jti2) = (jwt::jti_of(&token), jwt::jti_of(&token2));
    let recs = pw.wait_audit("login records of both unix socket sessions", |r| {
        rec::login_by_jti(r, &jti).is_some() && rec::login_by_jti(r, &jti2).is_some()
    });
    let raw_login = rec::login_by_jti(&recs, &jti).unwrap();
    assert_eq!(
        raw_login["client"]["uid"].as_u64(),
        Some(uid),
        "{raw_login}"
    );
    assert_eq!(
        raw_login["client"]["pid"].as_u64(),
        Some(std::process::id() as u64),
        "{raw_login}"
    );
    assert!(raw_login["client"].get("addr").is_none(), "{raw_login}");
    let psql_login = rec::login_by_jti(&recs, &jti2).unwrap();
    assert_eq!(
        psql_login["client"]["uid"].as_u64(),
        Some(uid),
        "{psql_login}"
    );
    let psql_pid = psql_login["client"]["pid"].as_u64().unwrap_or(0);
    assert!(
        psql_pid > 0 && psql_pid != std::process::id() as u64,
        "psql's own pid expected: {psql_login}"
    );
}

/// A client whose client_encoding is LATIN1 — which pgward passes upstream — sends its query
/// text in LATIN1. Postgres runs `select 'café'` (é = 0xE9) and answers in LATIN1; so must
/// pgward, and its audit record keeps the text (non-UTF-8 bytes as Latin-1 code points).
/// The control runs the same bytes against Postgres itself.
#[test]
fn latin1_client_can_send_non_ascii_query_text() {
    let c = cluster();
    let db = c.create_database("proto_latin1");
    let query = fe::raw_msg(b'Q', b"select 'caf\xe9' as word\0");

    // Control: Postgres itself.
    let mut direct = c
        .svc_unix_login(&db)
        .raw_with(&[("client_encoding", "LATIN1")])
        .unwrap();
    direct.send(&query).unwrap();
    let msgs = direct.recv_until_ready().unwrap();
    let want = vec![vec![Some(b"caf\xe9".to_vec())]];
    let rows: Vec<_> = msgs.iter().filter_map(Msg::data_row).collect();
    assert_eq!(rows, want, "Postgres: {}", raw::describe_all(&msgs));
    direct.terminate().unwrap();

    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let mut conn = pw
        .login("alice", &token, &db)
        .raw_with(&[("client_encoding", "LATIN1")])
        .unwrap();
    assert_eq!(
        conn.params.get("client_encoding").map(String::as_str),
        Some("LATIN1")
    );
    conn.send(&query).unwrap();
    let msgs = conn.recv_until_ready().unwrap_or_else(|e| {
        panic!(
            "pgward ended the session instead of answering ({e}); it sent: {:?}",
            String::from_utf8_lossy(&conn.received)
        )
    });
    let rows: Vec<_> = msgs.iter().filter_map(Msg::data_row).collect();
    assert_eq!(rows, want, "through pgward: {}", raw::describe_all(&msgs));
    conn.terminate().unwrap();
    pw.wait_audit("statement with the LATIN1 text", |recs| {
        recs.iter().any(|r| r["kind"] == "statement" && r["sql"] == "select 'caf\u{e9}' as word")
    });
}

/// Bytes that are not valid in the client's encoding (UTF8) are refused as Postgres would
/// refuse them — ERROR 22021, and the session goes on — without being forwarded (pgward
/// decides only on text it reads exactly as the server does).
#[test]
fn invalid_utf8_from_utf8_client_is_postgres_error_22021_and_session_continues() {
    let c = cluster();
    let db = c.create_database("proto_badutf8");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let mut conn = pw.login("alice", &token, &db).raw().unwrap();
    conn.send(&fe::raw_msg(b'Q', b"select '\xff\xfe\xc3'\0")).unwrap();
    let msgs = conn.recv_until_ready().unwrap();
    let codes: Vec<String> = msgs.iter().filter(|m| m.is_error()).filter_map(|m| m.sqlstate()).collect();
    assert_eq!(codes, vec!["22021".to_string()], "{}", raw::describe_all(&msgs));
    conn.send(&fe::raw_msg(b'Q', b"select 41 + 1\0")).unwrap();
    let msgs = conn.recv_until_ready().unwrap();
    let rows: Vec<_> = msgs.iter().filter_map(Msg::data_row).collect();
    assert_eq!(rows, vec![vec![Some(b"42".to_vec())]], "{}", raw::describe_all(&msgs));
    conn.terminate().unwrap();
}

/// The answer to `sql` after a COPY episode: its rows, and the result record the audit log
/// matched to its statement (the tag says whether answers and statements are still paired).
fn query_after_copy(pw: &Pgward, conn: &mut RawConn, what: &str) {
    let m = marker(what);
    let msgs = conn.simple_query(&format!("SELECT '{m}' FROM generate_series(1, 3)")).unwrap();
    assert_eq!(raw::rows(&msgs).len(), 3, "{what}: {}", raw::describe_all(&msgs));
    pw.wait_audit(&format!("{what}: the result of the statement after the COPY"), |recs| {
        rec::statements_with(recs, &m)
            .first()
            .and_then(|s| rec::result_for(recs, s))
            .is_some_and(|r| rec::s(r, "tag") == Some("SELECT 3"))
    });
}

/// COPY FROM STDIN and the Syncs a client sends before its data (tokio-postgres sends one
/// right after the COPY's Execute): Postgres ignores such a Sync while it copies and answers
/// it when the COPY failed before it started. Either way the session's answers stay matched
/// to its statements; a statement sent in the middle of a COPY ends the session before
/// Postgres reads it.
#[test]
fn syncs_and_statements_sent_during_copy_from_stdin() {
    let c = cluster();
    let db = c.create_database("proto_copy_sync");
    c.fixture_table(&db, "t", "v text", "");
    c.svc_sql(&db, "CREATE VIEW v AS SELECT v FROM t");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);
    let mut conn = RawConn::connect(&login, &[]).unwrap();
    let copy_start = |sql: &str| {
        let mut b = fe::parse("", sql);
        b.extend(fe::bind_text("", "", &[]));
        b.extend(fe::execute("", 0));
        b.extend(fe::sync());
        b
    };

    // The COPY fails before it starts: the Sync is answered, as Postgres answers it.
    conn.send(&copy_start("COPY missing FROM STDIN")).unwrap();
    let msgs = conn.recv_until_ready().unwrap();
    assert_eq!(raw::first_error(&msgs).and_then(Msg::sqlstate).as_deref(), Some("42P01"), "{}", raw::describe_all(&msgs));
    query_after_copy(&pw, &mut conn, "copy-missing");

    // The COPY fails right after it started (a view): the Sync sent before it is not
    // answered, the one after the client's CopyDone is.
    conn.send(&copy_start("COPY v FROM STDIN")).unwrap();
    let mut msgs = vec![conn.recv().unwrap(), conn.recv().unwrap(), conn.recv().unwrap()];
    assert_eq!(msgs.iter().map(|m| m.tag).collect::<Vec<_>>(), b"12G", "{}", raw::describe_all(&msgs));
    let mut done = fe::raw_msg(b'd', b"x\n");
    done.extend(fe::raw_msg(b'c', b""));
    done.extend(fe::sync());
    conn.send(&done).unwrap();
    msgs.extend(conn.recv_until_ready().unwrap());
    assert_eq!(raw::first_error(&msgs).and_then(Msg::sqlstate).as_deref(), Some("42809"), "{}", raw::describe_all(&msgs));
    query_after_copy(&pw, &mut conn, "copy-view");

    // A statement in the middle of a COPY: FATAL 08P01, and Postgres never runs it.
    conn.send(&fe::query("COPY t FROM STDIN")).unwrap();
    assert_eq!(conn.recv().unwrap().tag, b'G');
    let mut mid = fe::raw_msg(b'd', b"kept\n");
    mid.extend(fe::query("INSERT INTO t VALUES ('sneaked')"));
    conn.send(&mid).unwrap();
    let msgs = conn.read_until_eof(Duration::from_secs(30)).unwrap();
    let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("no error: {}", raw::describe_all(&msgs)));
    assert_eq!((err.fields()[&'S'].as_str(), err.sqlstate().as_deref()), ("FATAL", Some("08P01")), "{}", raw::describe_all(&msgs));
    assert_eq!(c.sql(&db, "SELECT count(*) FROM t").trim(), "0", "neither the COPY nor the INSERT ran");
}

/// Parse `sql` as statement `name`, bind and execute it, Sync: every answer.
fn parse_and_run(conn: &mut RawConn, name: &str, sql: &str) -> Vec<Msg> {
    let mut b = fe::parse(name, sql);
    b.extend(fe::bind_text("", name, &[]));
    b.extend(fe::execute("", 0));
    b.extend(fe::sync());
    conn.send(&b).unwrap();
    conn.recv_until_ready().unwrap()
}

/// A Parse of a name the session already has a statement under: Postgres refuses it (42P05)
/// and keeps the old statement. A Bind sent after the next Sync, before that answer is back,
/// binds the old statement — so the audit record of its Execute must carry the old text, not
/// the refused one. pgward refuses such a Parse itself; a statement deallocated (and only one
/// Postgres really deallocated) may be parsed again.
#[test]
fn a_parse_of_a_name_in_use_cannot_pass_for_the_statement_that_runs() {
    let c = cluster();
    let db = c.create_database("proto_dup_parse");
    c.fixture_table(&db, "t", "v text", "('a'), ('b'), ('c')");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);
    let mut conn = RawConn::connect(&login, &[]).unwrap();
    let innocent = marker("innocent");
    let swap = |name: &str| {
        let mut b = fe::parse(name, &format!("SELECT '{innocent}'"));
        b.extend(fe::sync());
        b.extend(fe::bind_text("", name, &[]));
        b.extend(fe::execute("", 0));
        b.extend(fe::sync());
        b
    };

    // A protocol-level statement, and one SQL PREPARE made (they share Postgres's namespace).
    let mut b = fe::parse("s1", "DELETE FROM t WHERE v = 'a'");
    b.extend(fe::sync());
    conn.send(&b).unwrap();
    conn.recv_until_ready().unwrap();
    assert!(raw::first_error(&conn.simple_query("PREPARE s2 AS DELETE FROM t WHERE v = 'b'").unwrap()).is_none());
    for name in ["s1", "s2"] {
        conn.send(&swap(name)).unwrap();
        let refused = conn.recv_until_ready().unwrap();
        let err = raw::first_error(&refused).unwrap_or_else(|| panic!("{name}: {}", raw::describe_all(&refused)));
        assert_eq!(err.sqlstate().as_deref(), Some("42P05"), "{name}: {}", raw::describe_all(&refused));
        let ran = conn.recv_until_ready().unwrap();
        assert_eq!(raw::tags(&ran), ["DELETE 1"], "{name}: {}", raw::describe_all(&ran));
    }
    assert_eq!(c.sql(&db, "SELECT string_agg(v, ',') FROM t").trim(), "c");
    let recs = pw.wait_audit("results of both DELETEs", |recs| {
        rec::of_kind(recs, "result").iter().filter(|r| rec::s(r, "tag") == Some("DELETE 1")).count() == 2
    });
    for r in rec::of_kind(&recs, "result").into_iter().filter(|r| rec::s(r, "tag") == Some("DELETE 1")) {
        let stmt = recs.iter().find(|s| rec::kind(s) == "statement" && rec::seq(s) == r["statement_seq"].as_u64().unwrap()).unwrap();
        // (A statement SQL PREPARE made is recorded as that PREPARE.)
        assert!(rec::s(stmt, "sql").is_some_and(|s| s.contains("DELETE FROM t WHERE")), "the DELETE is recorded as {stmt}");
    }

    // Postgres really deallocated s1: the name is free again. A DEALLOCATE that failed (in an
    // aborted transaction) leaves s2 in place, and a Parse of it is still refused.
    assert!(raw::first_error(&conn.simple_query("DEALLOCATE s1").unwrap()).is_none());
    let msgs = parse_and_run(&mut conn, "s1", "SELECT 1");
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    let msgs = conn.simple_query("BEGIN; SELECT 1/0; DEALLOCATE s2").unwrap();
    assert_eq!(raw::first_error(&msgs).and_then(Msg::sqlstate).as_deref(), Some("22012"));
    conn.simple_query("ROLLBACK").unwrap();
    let msgs = parse_and_run(&mut conn, "s2", "SELECT 2");
    assert_eq!(raw::first_error(&msgs).and_then(Msg::sqlstate).as_deref(), Some("42P05"), "{}", raw::describe_all(&msgs));
}
