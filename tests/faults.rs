//! Faults from outside pgward, against a real PostgreSQL 15:
//!
//! - **Disk full.** The audit log lives on a small tmpfs the test mounts, and a filler file
//!   takes every free page: the log then has only the preallocated room of its live segment
//!   (`audit.segment_bytes`), which padded reads fill to within fewer bytes than any record
//!   takes (each read's records are written before the next read; the last one's padding is
//!   sized from what the others took). The next read is forwarded at once (hold-reply) and
//!   its record cannot be written: its session ends with FATAL 58030, none of its rows
//!   delivered. From then on every statement is refused before Postgres (ERROR 58030; its
//!   marker is absent from the server log, the rows read as superuser unchanged) and the
//!   sessions stay usable; pgward keeps running. Once the filler is removed, statements work
//!   again, in a fresh session and in the refused ones, and `audit verify` passes. Run with
//!   O_DIRECT batches (the default; tmpfs takes O_DIRECT on current kernels, and where it
//!   does not pgward falls back to the page cache) and with `audit.direct_io = false`.
//! - **Upstream restart.** pgward in front of a cluster of this binary's own that the test
//!   restarts (`pg_ctl restart -m fast`): the open sessions (idle, in a transaction, running a
//!   statement) get FATAL and are closed — no hang, no pgward crash — and the pooled upstream
//!   connections that died idle are discarded, never handed out: every new session works at
//!   its first statement. `audit verify` passes.
//! - **Slow client.** A client reads a result of about 100 MB a few KB at a time: Postgres
//!   ends up waiting to write (ClientWrite), pgward's peak memory grows by a few MiB at most,
//!   and another session is answered meanwhile; the whole result arrives in the end.
//! - **Soak.** Forty sessions run mixed statements (simple and extended protocol, reads,
//!   autocommit writes, transactions committed and rolled back, pipelines), each statement
//!   tagged uniquely in its text or its parameters. Every statement a client saw succeed has
//!   exactly one allowed statement record and one result record, every statement record of
//!   those sessions is one a client sent, the committed rows are exactly those of committed
//!   writes, and `audit verify` passes.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::gateway::rec;
use common::metrics::value as metric;
use common::raw::{self, Msg, RawConn, fe};
use common::rng::Rng;
use common::tmpfs::SmallFs;
use common::{
    Login, Pgward, cluster, free_port, jwt, marker, rand_hex, restartable_cluster, wait_for, within,
};
use serde_json::Value;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The SQLSTATE of every refusal for want of the audit log.
const AUDIT_UNAVAILABLE: &str = "58030";

// ---- helpers ----------------------------------------------------------------------------

/// Messages up to the next ReadyForQuery, or up to the end of the connection: (messages,
/// whether the connection ended).
fn recv_until_ready_or_eof(conn: &mut RawConn) -> (Vec<Msg>, bool) {
    let mut out = Vec::new();
    loop {
        match conn.recv() {
            Ok(m) => {
                let done = m.tag == b'Z';
                out.push(m);
                if done {
                    return (out, false);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return (out, true);
            }
            Err(e) => panic!(
                "reading from pgward: {e}; so far:\n{}",
                raw::describe_all(&out)
            ),
        }
    }
}

/// Severity and SQLSTATE of an ErrorResponse.
fn severity_and_code(m: &Msg) -> (String, String) {
    let f = m.fields();
    (
        f.get(&'S').cloned().unwrap_or_default(),
        f.get(&'C').cloned().unwrap_or_default(),
    )
}

/// `e` is pgward's refusal of a statement it could not audit: ERROR (the session goes on)
/// 58030.
#[track_caller]
fn assert_refused(e: &tokio_postgres::Error) {
    let db = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not an error from the server: {e}"));
    assert_eq!(
        (db.severity(), db.code().code()),
        ("ERROR", AUDIT_UNAVAILABLE),
        "{db:?}"
    );
}

/// The row count of `table` in `db`, read as superuser.
fn count_rows(c: &common::PgCluster, db: &str, table: &str) -> String {
    c.sql(db, &format!("SELECT count(*) FROM {table}"))
}

// ---- disk full --------------------------------------------------------------------------

/// The audit log's filesystem in the disk-full tests: room for the first segment and little
/// more, which the filler takes.
const FULL_FS_BYTES: u64 = 2 * MIB;
/// Segment size in the disk-full tests: the records of a few dozen padded statements fill one.
const FULL_SEGMENT_BYTES: u64 = 256 * KIB;
/// Padding of each statement that fills the segment.
const FILL_PAD: usize = 16 * 1024;
/// Padded statements by which the segment must be full: twice what it holds.
const MAX_FILL_STATEMENTS: usize = (2 * FULL_SEGMENT_BYTES / FILL_PAD as u64) as usize;
/// The segment is full when fewer bytes than this are left: less than any record takes (the
/// smallest, result and session_end records, take about 300).
const LEFTOVER_MAX: u64 = 150;
/// What the last read that fits aims to leave of the segment (its records' size varies by a
/// few bytes: digits of seq and duration).
const LEFTOVER_AIM: u64 = 75;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_statements_until_it_has_room() {
    audit_log_on_a_full_disk(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_statements_until_it_has_room_through_the_page_cache() {
    audit_log_on_a_full_disk(false).await;
}

/// A gateway whose audit log lives on `fs`, in segments of [`FULL_SEGMENT_BYTES`]. No
/// time-triggered checkpoint: the first batch the full disk refuses holds only what the test
/// sent.
fn on_the_small_disk(fs: &SmallFs) -> common::PgwardBuilder {
    Pgward::builder()
        .set("audit.dir", fs.path().join("audit").display().to_string())
        .set("audit.segment_bytes", FULL_SEGMENT_BYTES as i64)
        .set("audit.checkpoint_interval", "1h")
}

/// The disk-full scenario (see the module doc), with `audit.direct_io = direct_io`.
async fn audit_log_on_a_full_disk(direct_io: bool) {
    let c = cluster();
    let db = c.create_database("faults_disk_full");
    c.sql(&db, "CREATE TABLE t (v text); GRANT ALL ON t TO PUBLIC");
    // Declared before the gateway: dropped (unmounted) after it has stopped.
    let fs = SmallFs::mount(FULL_FS_BYTES);
    let mut pw = on_the_small_disk(&fs).set("audit.direct_io", direct_io).start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);

    // Sessions opened while the disk has room; a control row goes through.
    let writer = login.connect().await.unwrap();
    let reader = login.connect().await.unwrap();
    let extended = login.connect().await.unwrap();
    let mut filling = login.raw().expect("login");
    let control = marker("diskfull-control");
    within(
        "control",
        writer.simple_query(&format!("INSERT INTO t VALUES ('{control}')")),
    )
    .await
    .unwrap();
    assert_eq!(count_rows(c, &db, "t"), "1");
    // Its result record too is written before the disk fills.
    pw.wait_audit("the control statement's records", |r| {
        rec::statements_with(r, &control)
            .first()
            .is_some_and(|s| rec::result_for(r, s).is_some())
    });

    let free_before = fs.free_bytes();
    let (filler, filled) = fs.fill("filler");
    assert!(
        filled > 0 && fs.free_bytes() == 0,
        "the filler took {filled} of {free_before} free bytes and left {}",
        fs.free_bytes()
    );

    let msgs = fill_the_segment(&pw, &mut filling);
    // The refused read was forwarded while its record was flushed (whether its bytes reached
    // Postgres before the refusal is a race): its session ends with FATAL 58030, none of its
    // rows delivered.
    let err = raw::first_error(&msgs).expect("an error");
    assert_eq!(
        severity_and_code(err),
        ("FATAL".to_string(), AUDIT_UNAVAILABLE.to_string()),
        "the read whose record the full disk refused: {}",
        raw::describe_all(&msgs)
    );
    assert!(
        raw::rows(&msgs).is_empty(),
        "rows of an unrecorded read reached the client: {}",
        raw::describe_all(&msgs)
    );

    let refused = refused_while_full(&login, &writer, &reader, &extended).await;
    assert!(
        pw.is_running(),
        "pgward exited when the disk filled up:\n{}",
        pw.stderr_log()
    );
    let log = c.log_after_barrier();
    assert!(
        log.contains(&control),
        "the control statement is missing from the server log"
    );
    for m in &refused {
        assert!(
            !log.contains(m.as_str()),
            "{m} reached Postgres although it could not be audited"
        );
    }
    assert_eq!(
        count_rows(c, &db, "t"),
        "1",
        "rows of statements that could not be audited were committed"
    );

    // Room again: a fresh session works, and so do the sessions that were refused.
    std::fs::remove_file(&filler).unwrap();
    assert!(fs.free_bytes() > 0);
    works_again(c, &db, &pw, &login, &writer, &reader).await;
    pw.stop();
}

/// After the disk has room again: a fresh session works, so do the refused ones, and verify
/// passes.
async fn works_again(
    c: &common::PgCluster,
    db: &str,
    pw: &Pgward,
    login: &common::Login,
    writer: &tokio_postgres::Client,
    reader: &tokio_postgres::Client,
) {
    let fresh = login
        .connect()
        .await
        .expect("a new session once the disk has room");
    let after = marker("diskfull-after");
    within(
        "insert after",
        fresh.simple_query(&format!("INSERT INTO t VALUES ('{after}')")),
    )
    .await
    .expect("statements work again once the disk has room");
    let back = within(
        "read after",
        reader.query_one("SELECT count(*) FROM t WHERE v = $1", &[&after]),
    )
    .await
    .expect("a refused session works again");
    assert_eq!(back.get::<_, i64>(0), 1);
    within(
        "write after",
        writer.simple_query("INSERT INTO t VALUES ('writer-after')"),
    )
    .await
    .expect("the refused writer works again");
    assert_eq!(count_rows(c, db, "t"), "3");
    let (code, out) = pw.audit_verify();
    assert_eq!(code, 0, "audit verify after the disk was full: {out}");
}

/// [`fill_to_the_brim`], then one more read, whose record cannot be written: returns what it
/// got.
fn fill_the_segment(pw: &Pgward, conn: &mut RawConn) -> Vec<Msg> {
    let (tag, room) = fill_to_the_brim(pw, conn);
    let m = format!("{tag}-last");
    conn.send(&fe::query(&format!(
        "SELECT '{m}', '{}'",
        "y".repeat(KIB as usize)
    )))
    .unwrap();
    let (msgs, ended) = recv_until_ready_or_eof(conn);
    assert!(
        raw::first_error(&msgs).is_some(),
        "a read was answered with {room} bytes of room: {}",
        raw::describe_all(&msgs)
    );
    assert!(
        ended,
        "the session goes on after a read whose record was refused: {}",
        raw::describe_all(&msgs)
    );
    msgs
}

/// Fill the live audit segment with padded reads on `conn` until fewer than
/// [`LEFTOVER_MAX`] bytes of it are left; the disk being full, its preallocated room is all
/// the log has. Before each read every record of the previous one is written (so each batch is
/// one record), and the last read's padding is sized from what the earlier ones took. The log
/// refuses nothing yet; the next record will not fit. Returns the reads' marker and the room
/// left.
fn fill_to_the_brim(pw: &Pgward, conn: &mut RawConn) -> (String, u64) {
    let tag = marker("diskfull-fill");
    let dir = pw.audit_dir();
    let (mut len, alloc) = live_segment(&dir);
    assert_eq!(
        alloc, FULL_SEGMENT_BYTES,
        "the live segment is preallocated to audit.segment_bytes"
    );
    // What a read's records take besides its padding (measured).
    let mut overhead: Option<u64> = None;
    for i in 0..MAX_FILL_STATEMENTS {
        let room = alloc - len;
        let pad = match overhead {
            _ if room < LEFTOVER_MAX => break,
            None => FILL_PAD as u64,
            Some(o) if room >= FILL_PAD as u64 + 2 * o + 2 * KIB => FILL_PAD as u64,
            // The landing read: leaves about LEFTOVER_AIM bytes.
            Some(o) => room
                .checked_sub(o + LEFTOVER_AIM)
                .expect("room for the landing read"),
        };
        let m = format!("{tag}-{i:04}");
        let pad = "x".repeat(usize::try_from(pad).unwrap());
        conn.send(&fe::query(&format!("SELECT '{m}', '{pad}'")))
            .unwrap();
        let (msgs, _) = recv_until_ready_or_eof(conn);
        assert_eq!(
            raw::rows(&msgs),
            vec![vec![Some(m.clone()), Some(pad.clone())]],
            "a read while the segment had {room} bytes of room (padding sized from {overhead:?} bytes of records): {}",
            raw::describe_all(&msgs)
        );
        let quoted = format!("'{m}'");
        pw.wait_audit(&format!("the records of {m}"), |r| {
            rec::statements_with(r, &quoted)
                .first()
                .is_some_and(|s| rec::result_for(r, s).is_some())
        });
        let (now, _) = live_segment(&dir);
        overhead = Some(now - len - pad.len() as u64);
        len = now;
    }
    let room = alloc - len;
    eprintln!(
        "disk full: segment filled to {len} of {alloc} bytes ({overhead:?} bytes of records per read besides its padding)"
    );
    assert!(
        room < LEFTOVER_MAX,
        "the segment was not filled to within {LEFTOVER_MAX} bytes: {room} left"
    );
    (tag, room)
}

/// The live (newest) segment in `dir`: (content length up to the first NUL, file size).
fn live_segment(dir: &Path) -> (u64, u64) {
    let seg = common::files_under(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit-") && n.ends_with(".jsonl"))
        })
        .max()
        .unwrap_or_else(|| panic!("no audit segment in {}", dir.display()));
    let bytes = std::fs::read(&seg).unwrap_or_else(|e| panic!("{}: {e}", seg.display()));
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    (len as u64, bytes.len() as u64)
}

/// While the disk is full: autocommit writes, reads and extended queries on sessions opened
/// before are refused with ERROR 58030, and the sessions stay usable; a new session gets no
/// statement through. Returns the markers of everything refused.
async fn refused_while_full(
    login: &Login,
    writer: &tokio_postgres::Client,
    reader: &tokio_postgres::Client,
    extended: &tokio_postgres::Client,
) -> Vec<String> {
    let mut refused = Vec::new();
    for round in 0..2 {
        let m_write = marker(&format!("diskfull-write{round}"));
        let e = within(
            "write while full",
            writer.simple_query(&format!("INSERT INTO t VALUES ('{m_write}')")),
        )
        .await
        .expect_err("a write was answered although it could not be audited");
        assert_refused(&e);
        let m_read = marker(&format!("diskfull-read{round}"));
        let e = within(
            "read while full",
            reader.simple_query(&format!("SELECT '{m_read}'")),
        )
        .await
        .expect_err("a read was answered although it could not be audited");
        assert_refused(&e);
        let m_ext = marker(&format!("diskfull-extended{round}"));
        let e = within(
            "extended while full",
            extended.query(&format!("SELECT $1::text || '{m_ext}'"), &[&"x"]),
        )
        .await
        .expect_err("an extended query was answered although it could not be audited");
        assert_refused(&e);
        refused.extend([m_write, m_read, m_ext]);
    }
    for (what, client) in [
        ("writer", writer),
        ("reader", reader),
        ("extended", extended),
    ] {
        assert!(
            !client.is_closed(),
            "the {what} session was closed by a refusal (ERROR, not FATAL)"
        );
    }
    // A session opened now gets no statement through either (its login cannot be recorded).
    let m_new = marker("diskfull-new-session");
    if let Ok(client) = login.connect().await {
        let r = within(
            "new session while full",
            client.simple_query(&format!("SELECT '{m_new}'")),
        )
        .await;
        assert!(
            r.is_err(),
            "a session opened while the disk was full ran a statement: {r:?}"
        );
    }
    refused.push(m_new);
    refused
}

/// A BEGIN Postgres skips opens no block: after an extended-protocol error Postgres ignores
/// every message up to the Sync, a simple-query `BEGIN` included, so an INSERT sent after the
/// Sync in the same write autocommits. It must wait for its record like any autocommit write.
/// The segment full, that record is refused: the session ends with FATAL 58030 and the row
/// never exists (were the INSERT forwarded early, Postgres would have committed it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_a_begin_postgres_skipped_waits_for_its_record() {
    let c = cluster();
    let db = c.create_database("faults_skipped_begin");
    c.sql(&db, "CREATE TABLE t (v text); GRANT ALL ON t TO PUBLIC");
    let fs = SmallFs::mount(FULL_FS_BYTES);
    let mut pw = on_the_small_disk(&fs).start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);
    let mut filling = login.raw().expect("login");
    let mut attacker = login.raw().expect("login");
    let (filler, _) = fs.fill("filler");
    fill_to_the_brim(&pw, &mut filling);

    let m = marker("skipped-begin");
    let pipeline = [
        fe::parse("", "SELECT 1/0"),
        fe::bind_text("", "", &[]),
        fe::execute("", 0),
        fe::query("BEGIN"),
        fe::sync(),
        fe::query(&format!("INSERT INTO t VALUES ('{m}')")),
    ]
    .concat();
    attacker.send(&pipeline).unwrap();
    let msgs = attacker
        .read_until_eof(Duration::from_secs(30))
        .expect("the session ends");
    let fatal = msgs
        .iter()
        .find(|m| severity_and_code(m).0 == "FATAL")
        .unwrap_or_else(|| panic!("no FATAL: {}", raw::describe_all(&msgs)));
    assert_eq!(severity_and_code(fatal).1, AUDIT_UNAVAILABLE, "{}", fatal.describe());
    assert!(
        raw::tags(&msgs).iter().all(|t| !t.starts_with("INSERT")),
        "the INSERT was answered: {}",
        raw::describe_all(&msgs)
    );
    assert_eq!(
        c.sql(&db, &format!("SELECT count(*) FROM t WHERE v = '{m}'")),
        "0",
        "an autocommit INSERT was committed before its record was durable"
    );
    std::fs::remove_file(&filler).unwrap();
    pw.stop();
}

/// FETCH runs its cursor's query, which an earlier DECLARE gave: `nextval` there advances the
/// sequence when the FETCH runs, outside any transaction. The FETCH must wait for its record.
/// The segment full, that record is refused: the FETCH is refused (ERROR 58030) and the
/// sequence, read as superuser, was never advanced (were the FETCH forwarded early, it would
/// have been, for good: a rollback does not undo nextval).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_whose_cursor_calls_nextval_waits_for_its_record() {
    let c = cluster();
    let db = c.create_database("faults_fetch_nextval");
    c.sql(&db, "CREATE SEQUENCE s; GRANT ALL ON s TO PUBLIC");
    let fs = SmallFs::mount(FULL_FS_BYTES);
    let mut pw = on_the_small_disk(&fs).start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);
    let mut filling = login.raw().expect("login");
    let mut attacker = login.raw().expect("login");
    for sql in ["BEGIN", "DECLARE c CURSOR FOR SELECT nextval('s')"] {
        let msgs = attacker.simple_query(sql).expect("answered");
        assert!(raw::first_error(&msgs).is_none(), "{sql}: {}", raw::describe_all(&msgs));
    }
    let (filler, _) = fs.fill("filler");
    fill_to_the_brim(&pw, &mut filling);

    attacker.send(&fe::query("FETCH 1 FROM c")).unwrap();
    let (msgs, _) = recv_until_ready_or_eof(&mut attacker);
    assert_eq!(
        c.sql(&db, "SELECT is_called FROM s"),
        "f",
        "the FETCH advanced the sequence before its record was durable"
    );
    let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("answered: {}", raw::describe_all(&msgs)));
    assert_eq!(severity_and_code(err), ("ERROR".to_string(), AUDIT_UNAVAILABLE.to_string()), "{}", err.describe());
    assert!(raw::rows(&msgs).is_empty(), "rows of an unrecorded FETCH: {}", raw::describe_all(&msgs));
    std::fs::remove_file(&filler).unwrap();
    pw.stop();
}

// ---- upstream restart -------------------------------------------------------------------

/// Sessions that end cleanly before the restart, leaving their upstream connections idle in
/// the pool.
const POOLED: usize = 3;

/// Each session open at an upstream restart is told (FATAL 57P01 / 08006) and closed: no hang.
fn each_open_session_is_told_and_closed(open: impl IntoIterator<Item = raw::RawConn>) {
    for (name, mut conn) in ["idle", "in a transaction", "running a statement"]
        .into_iter()
        .zip(open)
    {
        let msgs = conn
            .read_until_eof(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("the session {name} was not closed after the restart: {e}"));
        let errors: Vec<(String, String)> = msgs
            .iter()
            .filter(|m| m.is_error())
            .map(severity_and_code)
            .collect();
        eprintln!("upstream restart: the session {name} got {errors:?}");
        assert!(
            !errors.is_empty(),
            "the session {name} was closed without an error: {}",
            raw::describe_all(&msgs)
        );
        for (sev, code) in &errors {
            assert!(
                sev == "FATAL" && ["57P01", "08006"].contains(&code.as_str()),
                "the session {name} got {sev} {code}: {}",
                raw::describe_all(&msgs)
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_restart_ends_open_sessions_and_new_ones_work() {
    let c = restartable_cluster();
    let db = c.create_database("faults_restart");
    c.sql(&db, "CREATE TABLE r (v text); GRANT ALL ON r TO PUBLIC");
    let metrics_port = free_port();
    let mut pw = Pgward::builder_on(c)
        .set("server.metrics_listen", format!("127.0.0.1:{metrics_port}"))
        .start();

    let (tokens, open) = sessions_open_across_the_restart(&pw, &db);
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);
    fill_the_pool(&login, metrics_port);

    c.restart_fast();

    each_open_session_is_told_and_closed(open);
    assert!(
        pw.is_running() && !pw.log_has_panic(),
        "pgward did not survive the restart:\n{}",
        pw.stderr_log()
    );

    // New sessions, one after another, each working at its first statement: the pool hands
    // out no connection that died idle.
    for i in 0..=POOLED {
        let mut s = login
            .raw()
            .unwrap_or_else(|e| panic!("login {i} after the restart: {e:?}"));
        let m = marker("restart-new");
        let msgs = s.simple_query(&format!("SELECT '{m}'")).unwrap();
        assert_eq!(
            raw::rows(&msgs),
            vec![vec![Some(m)]],
            "session {i} after the restart: {}",
            raw::describe_all(&msgs)
        );
        s.terminate().unwrap();
    }
    let dead = metric(
        metrics_port,
        "pgward_upstream_pool_discards_total{reason=\"dead\"}",
    ) + metric(
        metrics_port,
        "pgward_upstream_pool_discards_total{reason=\"setup_failed\"}",
    );
    assert_eq!(
        dead, POOLED as f64,
        "every pooled connection the restart killed is discarded"
    );
    let client = login.connect().await.unwrap();
    within(
        "insert after the restart",
        client.simple_query("INSERT INTO r VALUES ('after')"),
    )
    .await
    .unwrap();
    assert_eq!(
        c.sql(&db, "SELECT string_agg(v, ',') FROM r"),
        "after",
        "the transaction open at the restart was rolled back"
    );

    // Each session's end is recorded, and the log verifies.
    let sessions: Vec<String> = {
        let recs = pw.audit_records();
        tokens
            .iter()
            .map(|t| {
                let l = rec::login_by_jti(&recs, &jwt::jti_of(t)).expect("login record");
                rec::s(l, "session").expect("session id").to_string()
            })
            .collect()
    };
    pw.wait_audit("the end of every session open at the restart", |r| {
        sessions.iter().all(|s| rec::has_session_end(r, s))
    });
    let (code, out) = pw.audit_verify();
    assert_eq!(code, 0, "audit verify after the upstream restart: {out}");
}

/// Sessions open across the restart: an idle one, one in a transaction (with a row of
/// marker `restart-tx…` written), one running a statement. Returns their tokens and
/// connections.
fn sessions_open_across_the_restart(pw: &Pgward, db: &str) -> (Vec<String>, Vec<RawConn>) {
    let tokens: Vec<String> = (0..3).map(|_| pw.token("alice", &[], "15m")).collect();
    let mut open: Vec<RawConn> = tokens
        .iter()
        .map(|t| pw.login("alice", t, db).raw().expect("login"))
        .collect();
    open[0].simple_query("SELECT 1").unwrap();
    let m_tx = marker("restart-tx");
    for sql in [
        "BEGIN".to_string(),
        format!("INSERT INTO r VALUES ('{m_tx}')"),
    ] {
        let msgs = open[1].simple_query(&sql).unwrap();
        assert!(
            raw::first_error(&msgs).is_none(),
            "{}",
            raw::describe_all(&msgs)
        );
    }
    let m_busy = marker("restart-busy");
    open[2]
        .send(&fe::query(&format!("SELECT pg_sleep(60), '{m_busy}'")))
        .unwrap();
    pw.cluster.wait_active_query(&m_busy);
    (tokens, open)
}

/// [`POOLED`] sessions open at once (one backend each) end cleanly: their upstream
/// connections wait idle in the pool.
fn fill_the_pool(login: &Login, metrics_port: u16) {
    let mut pooled: Vec<RawConn> = (0..POOLED).map(|_| login.raw().expect("login")).collect();
    for p in &mut pooled {
        p.simple_query("SELECT 1").unwrap();
    }
    for p in pooled {
        p.terminate().unwrap();
    }
    wait_for(
        "the pool to hold the clean sessions' connections",
        Duration::from_secs(20),
        || (metric(metrics_port, "pgward_upstream_pool_idle") == POOLED as f64).then_some(()),
    );
}

// ---- slow client ------------------------------------------------------------------------

/// Rows of the slow client's result and the bytes of each: about 100 MB, more than every
/// socket buffer on the way can hold (tcp_rmem allows up to 32 MiB per socket).
const SLOW_ROWS: usize = 25_000;
const SLOW_ROW_BYTES: usize = 4000;
/// The slow client reads one row (about 4 KB), then pauses this long.
const SLOW_PAUSE: Duration = Duration::from_millis(50);
/// Rows the slow client reads, slowly, between the two looks at the server.
const SLOW_MORE_ROWS: usize = 40;
/// What pgward's peak resident memory may grow by while relaying the result: a session's
/// buffers in flight (about 1.5 MiB) and a margin. Holding the result would be 100 MB.
const SLOW_GROWTH_BOUND_KIB: u64 = 8 * 1024;

#[test]
fn a_slow_client_holds_back_the_server_not_pgward_memory() {
    let c = cluster();
    let db = c.create_database("faults_slow_client");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let login = pw.login("alice", &token, &db);
    let mut bystander = login.raw().expect("bystander login");
    let mut slow = login.raw().expect("login");
    // Warm-up: a large result read at full speed, so the baseline holds what relaying one costs.
    let warm = slow
        .simple_query("SELECT repeat('w', 4000) FROM generate_series(1, 2000)")
        .unwrap();
    assert_eq!(raw::rows(&warm).len(), 2000);
    slow.received.clear();
    bystander.simple_query("SELECT 1").unwrap();
    let before = pw.memory_kib("VmHWM");

    let m = marker("slow-client");
    let sql = format!(
        "SELECT g, '{m}', repeat('x', {SLOW_ROW_BYTES}) FROM generate_series(1, {SLOW_ROWS}) g"
    );
    slow.send(&fe::query(&sql)).unwrap();
    let fast = AtomicBool::new(false);
    let rows_read = AtomicUsize::new(0);
    let (result, held_kib, read_then) = std::thread::scope(|s| {
        let reader = s.spawn(|| read_result(&mut slow, &fast, &rows_read));
        // Should the checks below fail, the reader finishes at full speed (the scope waits
        // for it).
        let _speed_up = SpeedUp(&fast);
        // Postgres waits to write: the client's slowness reached the server. It still does
        // once the client has read a few more rows slowly: pgward did not take the result off
        // the server meanwhile (it would have had the time to take all of it).
        wait_client_write(c, &m);
        let first = rows_read.load(Ordering::Relaxed);
        wait_for(
            "the slow client to read some more rows",
            Duration::from_secs(60),
            || (rows_read.load(Ordering::Relaxed) >= first + SLOW_MORE_ROWS).then_some(()),
        );
        wait_client_write(c, &m);
        let held_kib = pw.memory_kib("VmHWM").saturating_sub(before);
        // Another session is answered meanwhile, in either protocol.
        let b = marker("slow-bystander");
        let msgs = bystander.simple_query(&format!("SELECT '{b}'")).unwrap();
        assert_eq!(
            raw::rows(&msgs),
            vec![vec![Some(b.clone())]],
            "{}",
            raw::describe_all(&msgs)
        );
        let msgs = bystander
            .extended_query("SELECT $1::text || '-x'", &[Some(b.as_str())])
            .unwrap();
        assert_eq!(
            raw::rows(&msgs),
            vec![vec![Some(format!("{b}-x"))]],
            "{}",
            raw::describe_all(&msgs)
        );
        let read_then = rows_read.load(Ordering::Relaxed);
        fast.store(true, Ordering::Relaxed);
        (reader.join().expect("reader thread"), held_kib, read_then)
    });
    eprintln!(
        "slow client: {read_then} rows read when the server waited; peak memory grew by {held_kib} KiB"
    );
    assert!(
        read_then < SLOW_ROWS / 4,
        "the client had read {read_then} of {SLOW_ROWS} rows when the server waited: not slow"
    );
    assert!(
        held_kib < SLOW_GROWTH_BOUND_KIB,
        "pgward's peak memory grew by {held_kib} KiB while a slow client held back a {} MB result",
        SLOW_ROWS * SLOW_ROW_BYTES / 1_000_000
    );
    assert_eq!(
        result,
        (SLOW_ROWS, Some(format!("SELECT {SLOW_ROWS}"))),
        "the whole result arrives"
    );
    let grown = pw.memory_kib("VmHWM").saturating_sub(before);
    assert!(
        grown < SLOW_GROWTH_BOUND_KIB,
        "pgward's peak memory grew by {grown} KiB relaying the result"
    );
    slow.terminate().unwrap();
}

/// Wait (bounded) until the backend running the query marked `m` waits to write to its
/// client (pgward).
#[track_caller]
fn wait_client_write(c: &common::PgCluster, m: &str) {
    wait_for(
        "the server to wait writing the result (ClientWrite)",
        Duration::from_secs(30),
        || {
            let n = c.sql(
                "postgres",
                &format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'ClientWrite' \
                 AND position('{m}' in query) > 0 AND pid <> pg_backend_pid()"
                ),
            );
            (n == "1").then_some(())
        },
    );
}

/// Sets the flag on Drop: the slow reader goes on at full speed.
struct SpeedUp<'a>(&'a AtomicBool);

impl Drop for SpeedUp<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Read a simple query's result: one DataRow per `SLOW_PAUSE` until `fast` is set, then at
/// full speed. Returns (rows, command tag).
fn read_result(
    conn: &mut RawConn,
    fast: &AtomicBool,
    rows_read: &AtomicUsize,
) -> (usize, Option<String>) {
    let (mut rows, mut tag) = (0, None);
    loop {
        let m = conn.recv().expect("the result");
        match m.tag {
            b'D' => {
                rows += 1;
                rows_read.store(rows, Ordering::Relaxed);
                if !fast.load(Ordering::Relaxed) {
                    std::thread::sleep(SLOW_PAUSE);
                }
            }
            b'C' => tag = m.command_tag(),
            b'E' => panic!("the result failed: {}", m.describe()),
            b'Z' => return (rows, tag),
            _ => {}
        }
        // Keep no copy of what was read.
        conn.received.clear();
    }
}

// ---- soak -------------------------------------------------------------------------------

/// Concurrent sessions of the soak, and how long they run.
const SOAK_SESSIONS: usize = 40;
const SOAK_FOR: Duration = Duration::from_secs(15);
/// Operations each soak session must have completed (the load ran).
const SOAK_MIN_OPS: u64 = 5;
/// Seeds the sessions' choice of operations (session i: this × (i + 1)).
const SOAK_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// What one soak session sent: every statement's tag and whether the client saw it succeed,
/// the tags of the rows it committed, and the error that ended it early, if any.
#[derive(Default)]
struct SoakLog {
    sent: Vec<(String, bool)>,
    committed: Vec<String>,
    ops: u64,
    error: Option<String>,
}

impl SoakLog {
    /// Note the outcome of the statement tagged `tag`.
    fn note<T>(
        &mut self,
        tag: &str,
        r: Result<T, tokio_postgres::Error>,
    ) -> Result<T, tokio_postgres::Error> {
        self.sent.push((tag.to_string(), r.is_ok()));
        r
    }
}


/// Unique statement tags of one session: `<run>-<session>-<n>`, fixed width, so no tag
/// contains another.
struct Tags {
    run: String,
    session: usize,
    n: u32,
}

impl Tags {
    fn next(&mut self) -> String {
        self.n += 1;
        format!("{}-{:02}-{:06}", self.run, self.session, self.n)
    }
}

/// One operation of the soak: every statement it sends carries a tag of its own.
async fn soak_op(
    c: &tokio_postgres::Client,
    pick: u64,
    tags: &mut Tags,
    log: &mut SoakLog,
) -> Result<(), tokio_postgres::Error> {
    let ins = |t: &str| format!("INSERT INTO soak (tag) VALUES ('{t}')");
    const INS_PARAM: &str = "INSERT INTO soak (tag) VALUES ($1)";
    match pick % 8 {
        0 => {
            let t = tags.next();
            log.note(&t, c.simple_query(&ins(&t)).await)?;
            log.committed.push(t);
        }
        1 => {
            let t = tags.next();
            log.note(&t, c.execute(INS_PARAM, &[&t]).await)?;
            log.committed.push(t);
        }
        2 => {
            let t = tags.next();
            log.note(
                &t,
                c.simple_query(&format!("SELECT count(*) FROM soak WHERE tag <> '{t}'"))
                    .await,
            )?;
        }
        3 => {
            let t = tags.next();
            let row = log.note(
                &t,
                c.query_one("SELECT $1::text, count(*) FROM soak", &[&t])
                    .await,
            )?;
            assert_eq!(row.get::<_, String>(0), t, "a reply to another statement");
        }
        4 | 5 => {
            let (b, x, y, e) = (tags.next(), tags.next(), tags.next(), tags.next());
            log.note(&b, c.simple_query(&format!("BEGIN /* {b} */")).await)?;
            log.note(&x, c.simple_query(&ins(&x)).await)?;
            log.note(
                &y,
                c.execute("UPDATE soak SET n = n + 1 WHERE tag = $1", &[&y])
                    .await,
            )?;
            if pick % 8 == 4 {
                log.note(&e, c.simple_query(&format!("COMMIT /* {e} */")).await)?;
                log.committed.push(x);
            } else {
                log.note(&e, c.simple_query(&format!("ROLLBACK /* {e} */")).await)?;
            }
        }
        _ => {
            // Pipelined: three Executes in flight on one connection.
            let (x, y, z) = (tags.next(), tags.next(), tags.next());
            let (rx, ry, rz) = futures_util::future::join3(
                c.execute(INS_PARAM, &[&x]),
                c.execute(INS_PARAM, &[&y]),
                c.execute(INS_PARAM, &[&z]),
            )
            .await;
            for (t, r) in [(x, rx), (y, ry), (z, rz)] {
                log.note(&t, r)?;
                log.committed.push(t);
            }
        }
    }
    log.ops += 1;
    Ok(())
}

/// One soak session: operations until `until`; a failed statement ends it.
async fn soak_session(
    login: Login,
    session: usize,
    run: String,
    seed: u64,
    until: Instant,
) -> SoakLog {
    let mut log = SoakLog::default();
    let c = match login.connect().await {
        Ok(c) => c,
        Err(e) => {
            log.error = Some(format!("connect: {e}"));
            return log;
        }
    };
    let (mut rng, mut tags) = (Rng(seed), Tags { run, session, n: 0 });
    while Instant::now() < until {
        if let Err(e) = within(
            "a soak operation",
            soak_op(&c, rng.next(), &mut tags, &mut log),
        )
        .await
        {
            log.error = Some(e.to_string());
            break;
        }
    }
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soak_of_mixed_sessions_leaves_one_record_per_statement() {
    let c = cluster();
    let db = c.create_database("faults_soak");
    c.sql(&db, "CREATE TABLE soak (tag text PRIMARY KEY, n int NOT NULL DEFAULT 0); GRANT ALL ON soak TO PUBLIC");
    let pw = Pgward::start();
    let token = pw.token("soaker", &[], "30m");
    let login = pw.login("soaker", &token, &db);
    let run = rand_hex(10);
    let until = Instant::now() + SOAK_FOR;
    let tasks: Vec<_> = (0..SOAK_SESSIONS)
        .map(|s| {
            tokio::spawn(soak_session(
                login.clone(),
                s,
                run.clone(),
                SOAK_SEED.wrapping_mul(s as u64 + 1) | 1,
                until,
            ))
        })
        .collect();
    let mut logs = Vec::new();
    for t in tasks {
        logs.push(within("a soak session", t).await.expect("soak task"));
    }
    let failed: Vec<String> = logs
        .iter()
        .enumerate()
        .filter_map(|(i, l)| l.error.as_ref().map(|e| format!("session {i}: {e}")))
        .collect();
    assert!(failed.is_empty(), "soak sessions failed: {failed:?}");
    for (i, l) in logs.iter().enumerate() {
        assert!(
            l.ops >= SOAK_MIN_OPS,
            "soak session {i} completed only {} operations",
            l.ops
        );
    }

    let sent: HashSet<&str> = logs
        .iter()
        .flat_map(|l| l.sent.iter().map(|(t, _)| t.as_str()))
        .collect();
    let succeeded: Vec<&str> = logs
        .iter()
        .flat_map(|l| l.sent.iter().filter(|(_, ok)| *ok).map(|(t, _)| t.as_str()))
        .collect();
    assert_eq!(
        sent.len(),
        succeeded.len(),
        "every statement succeeded, and every tag is unique"
    );
    let ops: u64 = logs.iter().map(|l| l.ops).sum();
    eprintln!(
        "soak: {ops} operations, {} statements in {SOAK_SESSIONS} sessions",
        sent.len()
    );
    let jti = jwt::jti_of(&token);
    let recs = pw.wait_audit("a result record for every soak statement", |r| {
        soak_records(r, &jti).all_answered()
    });
    let index = soak_records(&recs, &jti);
    assert_eq!(
        index.sessions, SOAK_SESSIONS,
        "a login record per soak session"
    );
    check_soak_records(&index, &run, &sent, &succeeded);

    let committed: HashSet<String> = logs
        .iter()
        .flat_map(|l| l.committed.iter().cloned())
        .collect();
    let rows: HashSet<String> = c
        .sql(&db, "SELECT tag FROM soak")
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        rows.len(),
        committed.len(),
        "rows in the table vs rows committed by the clients"
    );
    assert!(
        rows == committed,
        "the table's rows are not those the clients committed"
    );
    let (code, out) = pw.audit_verify();
    assert_eq!(code, 0, "audit verify after the soak: {out}");
}

/// The soak sessions' statement records and their results.
struct SoakRecords<'a> {
    /// Login records with the soak token's id.
    sessions: usize,
    /// The statement records of those sessions.
    statements: Vec<&'a Value>,
    /// Result records per statement seq.
    results: HashMap<u64, Vec<&'a Value>>,
}

impl SoakRecords<'_> {
    fn all_answered(&self) -> bool {
        self.statements
            .iter()
            .all(|s| self.results.contains_key(&rec::seq(s)))
    }
}

fn soak_records<'a>(recs: &'a [Value], jti: &str) -> SoakRecords<'a> {
    let sessions: HashSet<&str> = recs
        .iter()
        .filter(|r| rec::kind(r) == "login" && r["jti"].as_str() == Some(jti))
        .filter_map(|r| rec::s(r, "session"))
        .collect();
    let of_soak = |r: &&Value| r["session"].as_str().is_some_and(|s| sessions.contains(s));
    let statements: Vec<&Value> = recs
        .iter()
        .filter(|r| rec::kind(r) == "statement")
        .filter(of_soak)
        .collect();
    let mut results: HashMap<u64, Vec<&Value>> = HashMap::new();
    for r in recs.iter().filter(|r| rec::kind(r) == "result") {
        if let Some(sq) = r["statement_seq"].as_u64() {
            results.entry(sq).or_default().push(r);
        }
    }
    SoakRecords {
        sessions: sessions.len(),
        statements,
        results,
    }
}

/// Every soak statement record is allowed and carries exactly one tag a client sent; every
/// tag a client saw succeed is on exactly one statement record, answered by exactly one
/// result record without an error.
fn check_soak_records(index: &SoakRecords, run: &str, sent: &HashSet<&str>, succeeded: &[&str]) {
    let tag_re = regex::Regex::new(&format!(r"{}-\d{{2}}-\d{{6}}", regex::escape(run))).unwrap();
    let mut by_tag: HashMap<String, Vec<&Value>> = HashMap::new();
    for &s in &index.statements {
        let mut texts: Vec<&str> = s["sql"].as_str().into_iter().collect();
        texts.extend(
            s["params"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str),
        );
        let tags: Vec<&str> = texts
            .iter()
            .flat_map(|t| tag_re.find_iter(t).map(|m| m.as_str()))
            .collect();
        assert_eq!(
            tags.len(),
            1,
            "a statement record that is not one statement a client sent: {s}"
        );
        assert!(
            sent.contains(tags[0]),
            "a statement record for a statement no client sent: {s}"
        );
        assert_eq!(s["decision"], "allow", "{s}");
        by_tag.entry(tags[0].to_string()).or_default().push(s);
    }
    assert_eq!(
        index.statements.len(),
        sent.len(),
        "statement records of the soak vs statements sent"
    );
    for t in succeeded {
        let stmts = by_tag.get(*t).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            stmts.len(),
            1,
            "statement records for {t}, which the client saw succeed: {stmts:?}"
        );
        let results = index
            .results
            .get(&rec::seq(stmts[0]))
            .map(Vec::as_slice)
            .unwrap_or_default();
        assert_eq!(results.len(), 1, "result records for {t}: {results:?}");
        assert!(
            results[0].get("sqlstate").is_none(),
            "the result of {t}, which succeeded, has an error: {}",
            results[0]
        );
    }
}
