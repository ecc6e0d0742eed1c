//! Bounded memory and time: a message longer than `server.max_message_bytes` is refused from
//! its header (FATAL 54000) without pgward buffering it, and other sessions go on; large
//! messages from several sessions at once wait for `server.buffer_budget_bytes` instead of
//! each taking memory (pgward's peak resident memory, VmHWM, stays within the budget plus a
//! margin, and every COPY completes); a large server row reaches a session that masks
//! nothing whatever `max_message_bytes` says (it is passed on in pieces, never held whole);
//! and a connection that sends nothing is closed after `server.startup_timeout`.

mod common;

use std::time::Duration;

use common::gateway::rec;
use common::raw::{self, RawConn, fe};
use common::{Pgward, cluster, jwt, marker, within};

const MIB: usize = 1 << 20;
const KIB: u64 = 1024;

/// The header of a message of type `tag` whose length field announces `len` bytes.
fn header(tag: u8, len: usize) -> Vec<u8> {
    let mut h = vec![tag];
    h.extend_from_slice(&(len as u32).to_be_bytes());
    h
}

#[test]
fn a_message_over_max_message_bytes_is_refused_from_its_header() {
    let c = cluster();
    let db = c.create_database("limits_max");
    let pw = Pgward::builder()
        .set("server.max_message_bytes", MIB as i64)
        .start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);
    let mut bystander = login.raw().expect("bystander login");
    let before = pw.memory_kib("VmHWM");

    // A Query announcing 200 MiB; its first 64 KiB follow the header.
    let mut conn = login.raw().expect("login");
    let mut start = header(b'Q', 200 * MIB);
    start.extend(std::iter::repeat_n(b'x', 64 * 1024));
    conn.send(&start).unwrap();
    let msgs = conn.read_until_eof(Duration::from_secs(30)).expect("pgward closes the connection");
    let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("no error: {}", raw::describe_all(&msgs)));
    let f = err.fields();
    assert_eq!(f.get(&'S').map(String::as_str), Some("FATAL"), "{f:?}");
    assert_eq!(err.sqlstate().as_deref(), Some("54000"), "{f:?}");
    assert!(f[&'M'].contains("max_message_bytes"), "the message names the limit: {f:?}");
    // The rest of the message finds nobody reading it: pgward closed the connection.
    let more = vec![b'x'; 32 * MIB];
    let pushed = conn.send(&more);
    assert!(pushed.is_err(), "32 MiB more were accepted by a connection pgward had closed");
    let grown = pw.memory_kib("VmHWM").saturating_sub(before);
    assert!(grown < 16 * KIB, "pgward's peak memory grew by {grown} KiB for a refused message");

    // The refusal is the session's recorded end; the other session is untouched.
    let jti = jwt::jti_of(&token);
    let recs = pw.wait_audit("session_end with 54000", |r| {
        rec::of_kind(r, "session_end")
            .iter()
            .any(|e| e["error"].as_str().is_some_and(|m| m.contains("54000")))
    });
    assert!(rec::login_by_jti(&recs, &jti).is_some());
    let m = marker("bystander");
    let rows = raw::rows(&bystander.simple_query(&format!("select '{m}'")).unwrap());
    assert_eq!(rows, vec![vec![Some(m)]]);
    bystander.terminate().unwrap();
}

/// One session copying one row of `row_len` bytes in a single CopyData message, sent in
/// 1 MiB pieces with a pause between them (so the sessions' messages overlap in time).
fn copy_one_big_row(login: &common::Login, row_len: usize) -> Result<String, String> {
    let mut conn = login.raw().map_err(|e| format!("login: {e:?}"))?;
    conn.send(&fe::query("copy big from stdin")).map_err(|e| e.to_string())?;
    let m = conn.recv().map_err(|e| e.to_string())?;
    if m.tag != b'G' {
        return Err(format!("no CopyInResponse: {}", m.describe()));
    }
    let mut row = vec![b'x'; row_len];
    row.push(b'\n');
    conn.send(&header(b'd', row.len() + 4)).map_err(|e| e.to_string())?;
    for piece in row.chunks(MIB) {
        conn.send(piece).map_err(|e| format!("sending the row: {e}"))?;
        std::thread::sleep(Duration::from_millis(20));
    }
    conn.send(b"c\0\0\0\x04").map_err(|e| e.to_string())?;
    let msgs = conn.recv_until_ready().map_err(|e| e.to_string())?;
    let tags = raw::tags(&msgs);
    if let Some(e) = raw::first_error(&msgs) {
        return Err(e.describe());
    }
    conn.terminate().map_err(|e| e.to_string())?;
    tags.into_iter().next().ok_or_else(|| "no CommandComplete".into())
}

#[test]
fn large_messages_of_several_sessions_wait_for_the_buffer_budget() {
    const LIMIT: usize = 16 * MIB;
    const ROW: usize = 15 * MIB;
    const SESSIONS: usize = 4;
    let c = cluster();
    let db = c.create_database("limits_budget");
    c.fixture_table(&db, "big", "v text", "");
    // Room for one such message at a time: without the budget, four are buffered at once.
    let pw = Pgward::builder()
        .set("server.max_message_bytes", LIMIT as i64)
        .set("server.buffer_budget_bytes", LIMIT as i64)
        .start();
    let token = pw.token("alice", &["pgward_admins"], "15m");
    let login = pw.login("alice", &token, &db);
    // Sessions (and their first statement) cost memory of their own: warm up first.
    for _ in 0..SESSIONS {
        let mut s = login.raw().unwrap();
        s.simple_query("select 1").unwrap();
        s.terminate().unwrap();
    }
    let before = pw.memory_kib("VmHWM");

    let outcomes: Vec<Result<String, String>> = std::thread::scope(|s| {
        let copies: Vec<_> = (0..SESSIONS).map(|_| s.spawn(|| copy_one_big_row(&login, ROW))).collect();
        copies.into_iter().map(|h| h.join().expect("copy thread")).collect()
    });
    for o in &outcomes {
        assert_eq!(o.as_deref(), Ok("COPY 1"), "every session's COPY completes: {outcomes:?}");
    }
    let stored = c.sql(&db, "select count(*) || ' ' || sum(length(v)) from big");
    assert_eq!(stored, format!("{SESSIONS} {}", SESSIONS * ROW));

    // At most the budget in large messages, plus one message's copy on its way out and a
    // margin; four messages held at once would be 60 MiB and more.
    let grown = pw.memory_kib("VmHWM").saturating_sub(before);
    let bound = (2 * LIMIT + 8 * MIB) as u64 / 1024;
    assert!(grown < bound, "pgward's peak memory grew by {grown} KiB, over {bound} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_server_row_passes_through_in_pieces() {
    let c = cluster();
    let db = c.create_database("limits_row");
    let pw = Pgward::builder()
        .set("server.max_message_bytes", MIB as i64)
        .start();
    let token = pw.token("alice", &[], "15m");
    let client = pw.login("alice", &token, &db).connect().await.unwrap();
    // A DataRow of 8 MiB from the server: eight times what pgward would read whole.
    let row = within("a large row", client.query_one("select repeat('ab', 4 * 1024 * 1024)", &[]))
        .await
        .expect("the row arrives");
    let v: String = row.get(0);
    assert_eq!(v.len(), 8 * MIB);
    assert!(v.bytes().enumerate().all(|(i, b)| b == if i % 2 == 0 { b'a' } else { b'b' }));
    // The session goes on at a message boundary.
    let n: i32 = within("next", client.query_one("select 7", &[])).await.unwrap().get(0);
    assert_eq!(n, 7);
}

/// Masking reads every server message whole: one mask rule that applies to everyone.
const MASK_POLICY: &str = r#"
version = 1

[defaults]
action = "allow"

[[mask]]
name = "cards"
columns = ["public.cards.card"]
detect = ["card"]
style = "keep_last"
keep = 4
strict = false
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_masking_session_reads_large_rows_whole_within_the_limit() {
    let c = cluster();
    let db = c.create_database("limits_mask");
    c.fixture_table(&db, "cards", "card text", "('4242424242424242')");
    let pw = Pgward::builder()
        .set("server.max_message_bytes", MIB as i64)
        .with_dir(|dir: &std::path::Path, t: &mut toml::Table| {
            std::fs::write(dir.join("mask-policy.toml"), MASK_POLICY).unwrap();
            common::toml_set(t, "policy.files", vec![toml::Value::from("mask-policy.toml")]);
        })
        .start();
    let token = pw.token("sam", &["support"], "15m");
    let client = pw.login("sam", &token, &db).connect().await.unwrap();

    // 400 kB: over what a session holds uncharged, under the limit; masked as a whole.
    let sql = "select repeat('x', 400000) || ' 4242424242424242'";
    let v: String = within("a large row", client.query_one(sql, &[]))
        .await
        .expect("the row arrives")
        .get(0);
    assert_eq!(v.len(), 400_017);
    assert!(!v.contains("4242424242424242"), "the card number in a large row was not masked");
    assert!(v.ends_with("4242"), "masked as keep_last 4: {}", &v[v.len() - 20..]);

    // 2 MiB: over the limit, and masking cannot pass it on unread: the session ends.
    let e = within("a row over the limit", client.query_one("select repeat('y', 2 * 1024 * 1024)", &[]))
        .await
        .expect_err("a row pgward cannot hold whole is not relayed");
    assert_eq!(common::sqlstate(&e).as_deref(), Some("54000"), "{e}");
    assert!(client.is_closed() || within("after", client.simple_query("select 1")).await.is_err());
}

#[test]
fn a_connection_that_sends_nothing_is_closed_after_startup_timeout() {
    let pw = Pgward::builder().set("server.startup_timeout", "1s").start();
    let login = pw.login("alice", "unused", "postgres");
    let mut silent = RawConn::open(&login).unwrap();
    // Not a measure of the timeout: the close must come, within the read's 30 s bound.
    let msgs = silent
        .read_until_eof(Duration::from_secs(30))
        .expect("pgward closes a connection that never sends its startup packet");
    assert!(msgs.is_empty(), "{}", raw::describe_all(&msgs));
    // One that started but never sent its password is closed too.
    let mut halfway = RawConn::open(&login).unwrap();
    halfway.send(&fe::startup(&[("user", "alice"), ("database", "postgres")])).unwrap();
    let msgs = halfway.read_until_eof(Duration::from_secs(30)).expect("closed at the password step");
    assert!(msgs.iter().all(|m| !m.is_error()), "{}", raw::describe_all(&msgs));
    assert!(pw.stderr_log().contains("startup timed out"), "{}", pw.stderr_log());
}

/// Prepared statements and portals a session keeps are bounded by
/// `server.max_session_state_bytes`: closed ones stop counting; the Parse that goes over ends
/// the session (FATAL 54000, audited), and other sessions go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_a_session_keeps_are_bounded() {
    const STATE: i64 = 128 * 1024;
    let c = cluster();
    let db = c.create_database("limits_state");
    let pw = Pgward::builder()
        .set("server.max_message_bytes", 65536)
        .set("server.max_session_state_bytes", STATE)
        .start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);
    let bystander = login.connect().await.unwrap();
    let client = login.connect().await.unwrap();
    // Each text keeps ~10 KiB: twelve fit, fourteen do not.
    let text = |i: usize| format!("SELECT {i} /* {} */", "x".repeat(10 * 1024));

    // Prepared and closed again (tokio-postgres closes a statement when it is dropped): the
    // session never keeps more than a few at a time.
    for i in 0..30 {
        let st = within("prepare and close", client.prepare(&text(i))).await.unwrap();
        drop(st);
        within("a round trip", client.simple_query("SELECT 1")).await.unwrap();
    }

    // Kept: the one that goes over ends the session.
    let mut kept = Vec::new();
    let err = loop {
        let i = kept.len();
        assert!(i < 20, "{i} statements of 10 KiB kept with a limit of {STATE} bytes");
        match within("prepare", client.prepare(&text(i))).await {
            Ok(st) => kept.push(st),
            Err(e) => break e,
        }
    };
    assert!((11..=13).contains(&kept.len()), "kept {} statements", kept.len());
    assert_eq!(common::sqlstate(&err).as_deref(), Some("54000"), "{err}");
    assert!(client.simple_query("SELECT 1").await.is_err(), "the session is over");
    within("bystander", bystander.simple_query("SELECT 1")).await.expect("other sessions go on");
    let recs = pw.wait_audit("the session's end", |r| r.iter().any(|x| rec::kind(x) == "session_end" && x["error"].as_str().is_some_and(|e| e.starts_with("54000"))));
    assert!(recs.iter().any(|x| rec::kind(x) == "session_end"));
}
