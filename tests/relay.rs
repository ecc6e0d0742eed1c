//! Everything a client does over the wire must work through pgward as it does against Postgres:
//! simple and extended protocol, pipelining, COPY both ways, notices, LISTEN/NOTIFY, errors in
//! transactions, FunctionCall (large objects), Terminate, ParameterStatus and BackendKeyData.
//!
//! Each test gets a fresh database and its own pgward ([`common::Target`]). With
//! PGWARD_E2E_DIRECT=1 the same tests run against Postgres itself (the reference behaviour).

mod common;

use common::raw::{self, fe};
use common::{Target, cluster, marker, sqlstate, within};
use futures_util::{SinkExt, TryStreamExt, pin_mut};
use tokio_postgres::{AsyncMessage, SimpleQueryMessage};
use std::time::Duration;

fn simple_rows(msgs: &[SimpleQueryMessage]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(String::from)).collect())
            }
            _ => None,
        })
        .collect()
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

#[test]
fn simple_query_with_multi_statement_strings() {
    let t = Target::new("relay_simple");
    let login = t.login();
    let out =
        login.sql("create table m(i int); insert into m values (1), (2); select sum(i) from m");
    // psql 15 prints every statement's result of a multi-statement string.
    assert_eq!(out.expect_ok(), "CREATE TABLE\nINSERT 0 2\n3");

    // A multi-statement string is one implicit transaction: an error anywhere undoes all of it.
    let out = login.sql("insert into m values (10); select 1/0; insert into m values (11)");
    assert!(!out.success(), "{}", out.describe());
    assert_eq!(
        out.sqlstates(),
        vec!["22012".to_string()],
        "{}",
        out.describe()
    );
    assert_eq!(
        cluster().sql(&t.db, "select string_agg(i::text, ',' order by i) from m"),
        "1,2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_query_messages_via_tokio_postgres() {
    let t = Target::new("relay_simple_tp");
    let client = t.login().connect().await.unwrap();
    let msgs = within(
        "simple query",
        client.simple_query("select 1; select 2, 'two', null; select 'x' where false"),
    )
    .await
    .unwrap();
    assert_eq!(
        simple_rows(&msgs),
        vec![vec![s("1")], vec![s("2"), s("two"), None]]
    );
    let counts: Vec<u64> = msgs
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::CommandComplete(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(counts, vec![1, 1, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_protocol_params_named_statements_binary() {
    let t = Target::new("relay_extended");
    let client = t.login().connect().await.unwrap();
    // A named prepared statement, reused; tokio-postgres sends parameters in binary format.
    let stmt = within(
        "prepare",
        client.prepare("select $1::int4 * 2, $2::text || '!', $3::bytea, $4::float8, $5::int8, $6::int4 is null"),
    )
    .await
    .unwrap();
    for i in 0..5i32 {
        let text = format!("v{i}");
        let bytes = vec![0u8, 255, i as u8, b'\n'];
        let f = i as f64 + 0.5;
        let big = (1i64 << 40) + i as i64;
        let null: Option<i32> = if i % 2 == 0 { None } else { Some(i) };
        let row = within(
            "execute",
            client.query_one(&stmt, &[&i, &text, &bytes, &f, &big, &null]),
        )
        .await
        .unwrap();
        assert_eq!(row.get::<_, i32>(0), i * 2);
        assert_eq!(row.get::<_, String>(1), format!("v{i}!"));
        assert_eq!(row.get::<_, Vec<u8>>(2), bytes);
        assert_eq!(row.get::<_, f64>(3), f);
        assert_eq!(row.get::<_, i64>(4), big);
        assert_eq!(row.get::<_, bool>(5), null.is_none());
    }
    // Unnamed statement with a text parameter; many rows.
    let rows = within(
        "unnamed",
        client.query(
            "select g, $1::text from generate_series(1, 250) g",
            &[&"unnamed-param"],
        ),
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 250);
    assert_eq!(rows[249].get::<_, i32>(0), 250);
    assert_eq!(rows[0].get::<_, String>(1), "unnamed-param");

    // An execution error does not break the session or the prepared statement.
    let err = within("error", client.query_one("select 10 / $1::int4", &[&0i32]))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22012"), "{err}");
    let row = within(
        "after error",
        client.query_one(
            &stmt,
            &[&21i32, &"z", &vec![1u8], &1.0f64, &1i64, &Some(1i32)],
        ),
    )
    .await
    .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    // Parse errors are reported as such.
    let err = within("syntax", client.prepare("selec 1"))
        .await
        .unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("42601"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_on_one_client() {
    let t = Target::new("relay_pipeline");
    let client = t.login().connect().await.unwrap();
    let stmt = client
        .prepare("select $1::int4 + 1000, $2::text")
        .await
        .unwrap();
    // All 30 queries are written before the first answer is read (tokio-postgres pipelines
    // concurrently polled requests on one connection); answers must come back in order.
    let (client_ref, stmt_ref) = (&client, &stmt);
    let futs: Vec<_> = (0..30i32)
        .map(|i| async move {
            let label = format!("p{i}");
            client_ref.query_one(stmt_ref, &[&i, &label]).await
        })
        .collect();
    let rows = within("pipeline", futures_util::future::try_join_all(futs))
        .await
        .unwrap();
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.get::<_, i32>(0), 1000 + i as i32);
        assert_eq!(row.get::<_, String>(1), format!("p{i}"));
    }
    // An error in the middle of a pipeline fails only its own request.
    let (a, b, c) = within("pipeline with error", async {
        tokio::join!(
            client.query_one("select 1::int4", &[]),
            client.query_one("select 1/0", &[]),
            client.query_one("select 3::int4", &[])
        )
    })
    .await;
    assert_eq!(a.unwrap().get::<_, i32>(0), 1);
    assert_eq!(sqlstate(&b.unwrap_err()).as_deref(), Some("22012"));
    assert_eq!(c.unwrap().get::<_, i32>(0), 3);
}

#[test]
fn copy_from_and_to_with_psql() {
    let t = Target::new("relay_copy_psql");
    let c = cluster();
    c.fixture_table(&t.db, "items", "id int primary key, name text", "");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("items.csv");
    let mut csv = String::new();
    for i in 1..=500 {
        csv.push_str(&format!("{i},\"name, {i}\"\n"));
    }
    std::fs::write(&file, &csv).unwrap();
    let login = t.login();

    let out = login.psql(&[
        "-c",
        &format!("\\copy items from '{}' with (format csv)", file.display()),
    ]);
    assert_eq!(out.expect_ok(), "COPY 500");
    let out = login.psql_with_stdin(
        &["-c", "\\copy items from pstdin with (format csv)"],
        Some(b"1000,from stdin\n1001,\"with \"\"quotes\"\"\"\n"),
    );
    assert_eq!(out.expect_ok(), "COPY 2");
    assert_eq!(
        c.sql(&t.db, "select count(*), sum(id) from items"),
        "502|127251"
    );

    // Server-side COPY TO STDOUT through the gateway, and psql's \copy to a file.
    let out = login.sql(
        "copy (select id, name from items where id <= 500 order by id) to stdout with (format csv)",
    );
    assert_eq!(out.expect_ok() + "\n", csv);
    let back = dir.path().join("back.csv");
    let out = login.psql(&[
        "-c",
        &format!(
            "\\copy (select id, name from items order by id) to '{}' with (format csv)",
            back.display()
        ),
    ]);
    assert_eq!(out.expect_ok(), "COPY 502");
    let back = std::fs::read_to_string(back).unwrap();
    assert!(back.starts_with(&csv), "exported file differs");
    assert!(
        back.ends_with("1000,from stdin\n1001,\"with \"\"quotes\"\"\"\n"),
        "{back}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_with_tokio_postgres() {
    let t = Target::new("relay_copy_tp");
    cluster().fixture_table(&t.db, "t", "id int, v text", "");
    let client = t.login().connect().await.unwrap();

    let mut expected = String::new();
    let sink = within("copy_in", client.copy_in("copy t from stdin"))
        .await
        .unwrap();
    pin_mut!(sink);
    for chunk in 0..10 {
        let mut data = String::new();
        for i in chunk * 100..(chunk + 1) * 100 {
            data.push_str(&format!("{i}\tvalue {i}\n"));
        }
        expected.push_str(&data);
        within("copy data", sink.send(bytes::Bytes::from(data)))
            .await
            .unwrap();
    }
    let n = within("copy finish", sink.finish()).await.unwrap();
    assert_eq!(n, 1000);

    let stream = within(
        "copy_out",
        client.copy_out("copy (select id, v from t order by id) to stdout"),
    )
    .await
    .unwrap();
    let chunks: Vec<bytes::Bytes> = within("copy_out data", stream.try_collect()).await.unwrap();
    let got: Vec<u8> = chunks.concat();
    assert_eq!(String::from_utf8(got).unwrap(), expected);

    // Bad COPY data: the error reaches the client, nothing is loaded, the session goes on.
    let sink = within("copy_in bad", client.copy_in("copy t from stdin"))
        .await
        .unwrap();
    pin_mut!(sink);
    within(
        "bad data",
        sink.send(bytes::Bytes::from_static(b"1\tok\nnot-a-number\tx\n")),
    )
    .await
    .unwrap();
    let err = within("bad finish", sink.finish()).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22P02"), "{err}");
    let count: i64 = client
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notice_from_do_block_reaches_the_client() {
    let t = Target::new("relay_notice");
    let m = marker("relay-notice");
    let out = t
        .login()
        .sql(&format!("DO $$ BEGIN RAISE NOTICE '{m} %', 42; END $$"));
    out.expect_ok();
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("NOTICE:") && l.contains(&format!("{m} 42"))),
        "psql did not print the notice: {}",
        out.describe()
    );

    let (client, mut rx) = t.login().connect_with_messages().await.unwrap();
    let m = marker("relay-notice");
    within(
        "DO",
        client.batch_execute(&format!(
            "DO $$ BEGIN RAISE NOTICE '{m}'; RAISE WARNING 'w-{m}'; END $$"
        )),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match within("notice", rx.recv()).await {
            Some(AsyncMessage::Notice(n)) => {
                seen.push((n.severity().to_string(), n.message().to_string()))
            }
            Some(_) => {}
            None => panic!("connection closed before the notices arrived; got {seen:?}"),
        }
    }
    assert_eq!(
        seen,
        vec![
            ("NOTICE".to_string(), m.clone()),
            ("WARNING".to_string(), format!("w-{m}"))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_across_two_sessions() {
    let t = Target::new("relay_notify");
    let (listener, mut rx) = t.login().connect_with_messages().await.unwrap();
    within("LISTEN", listener.batch_execute("LISTEN relay_chan"))
        .await
        .unwrap();
    let notifier = t.login().connect().await.unwrap();

    // The listener is idle: the notification must be relayed without the client asking.
    let p1 = marker("payload");
    within(
        "NOTIFY",
        notifier.batch_execute(&format!("NOTIFY relay_chan, '{p1}'")),
    )
    .await
    .unwrap();
    let p2 = marker("payload");
    within(
        "pg_notify",
        notifier.query("select pg_notify('relay_chan', $1)", &[&p2]),
    )
    .await
    .unwrap();
    // Not delivered: another channel.
    within("other", notifier.batch_execute("NOTIFY other_chan, 'nope'"))
        .await
        .unwrap();

    let mut got = Vec::new();
    while got.len() < 2 {
        match within("notification", rx.recv()).await {
            Some(AsyncMessage::Notification(n)) => {
                got.push((n.channel().to_string(), n.payload().to_string()))
            }
            Some(_) => {}
            None => panic!("listener connection closed; got {got:?}"),
        }
    }
    assert_eq!(
        got,
        vec![
            ("relay_chan".to_string(), p1),
            ("relay_chan".to_string(), p2)
        ]
    );
    // Still a working session afterwards.
    let one: i32 = listener.query_one("select 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    assert!(
        rx.try_recv().is_err(),
        "unexpected extra message (other_chan must not be delivered)"
    );
}

#[test]
fn error_inside_transaction_then_commit_rolls_back() {
    let t = Target::new("relay_tx");
    let c = cluster();
    c.fixture_table(&t.db, "tx", "v text", "");
    let m = marker("tx-row");
    let mut conn = t.raw_login().raw().unwrap();
    let step = |conn: &mut raw::RawConn, sql: &str| conn.simple_query(sql).unwrap();

    assert_eq!(raw::tags(&step(&mut conn, "begin")), vec!["BEGIN"]);
    assert_eq!(
        raw::tags(&step(&mut conn, &format!("insert into tx values ('{m}')"))),
        vec!["INSERT 0 1"]
    );
    let msgs = step(&mut conn, "select 1/0");
    assert_eq!(
        raw::first_error(&msgs)
            .and_then(|e| e.sqlstate())
            .as_deref(),
        Some("22012")
    );
    assert_eq!(
        msgs.last().unwrap().body,
        b"E",
        "ReadyForQuery must report a failed transaction"
    );
    let msgs = step(&mut conn, "select 1");
    assert_eq!(
        raw::first_error(&msgs)
            .and_then(|e| e.sqlstate())
            .as_deref(),
        Some("25P02")
    );
    let msgs = step(&mut conn, "commit");
    assert_eq!(
        raw::tags(&msgs),
        vec!["ROLLBACK"],
        "{}",
        raw::describe_all(&msgs)
    );
    assert_eq!(msgs.last().unwrap().body, b"I");

    assert_eq!(
        c.sql(&t.db, &format!("select count(*) from tx where v = '{m}'")),
        "0"
    );
    let msgs = step(
        &mut conn,
        &format!("select count(*) from tx where v = '{m}'"),
    );
    assert_eq!(raw::rows(&msgs), vec![vec![s("0")]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_inside_extended_protocol_transaction_rolls_back() {
    let t = Target::new("relay_tx_ext");
    let c = cluster();
    c.fixture_table(&t.db, "tx", "v text", "");
    let m = marker("tx-ext-row");
    let mut client = t.login().connect().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.execute("insert into tx values ($1)", &[&m])
        .await
        .unwrap();
    let err = tx.query_one("select 1/0", &[]).await.unwrap_err();
    assert_eq!(sqlstate(&err).as_deref(), Some("22012"));
    let _ = tx.commit().await; // Postgres answers COMMIT of a failed transaction with ROLLBACK
    assert_eq!(
        c.sql(&t.db, &format!("select count(*) from tx where v = '{m}'")),
        "0"
    );
    let n: i64 = client
        .query_one("select count(*) from tx", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[test]
fn large_objects_via_function_call_protocol() {
    // psql's \lo_import / \lo_export use libpq's lo_* functions, which use the FunctionCall
    // ('F') message (PQfn), not SQL.
    let t = Target::new("relay_lo");
    let c = cluster();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("blob.bin");
    let dst = dir.path().join("blob.out");
    let mut x: u32 = 0x1234_5678;
    let data: Vec<u8> = (0..50_000)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect();
    std::fs::write(&src, &data).unwrap();
    let login = t.login();

    let out = login.psql(&["-c", &format!("\\lo_import '{}'", src.display())]);
    let stdout = out.expect_ok();
    let oid: u32 = stdout
        .strip_prefix("lo_import ")
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected \\lo_import output: {}", out.describe()));
    let out = login.psql(&["-c", &format!("\\lo_export {oid} '{}'", dst.display())]);
    out.expect_ok();
    assert_eq!(
        std::fs::read(&dst).unwrap(),
        data,
        "large object came back different"
    );
    assert_eq!(
        login
            .sql(&format!("select length(lo_get({oid}))"))
            .expect_ok(),
        "50000"
    );

    // Postgres logs fastpath calls (log_statement=all): they really went the FunctionCall way,
    // in this test's database.
    let log = c.log_after_barrier();
    for f in ["lo_open", "lowrite", "loread"] {
        assert!(
            log.lines().any(|l| l.contains(&format!("@{} ", t.db))
                && l.contains(&format!("fastpath function call: \"{f}\""))),
            "no fastpath call of {f} for {} in the server log",
            t.db
        );
    }
    login.sql(&format!("select lo_unlink({oid})")).expect_ok();
}

#[test]
fn terminate_ends_the_session() {
    let t = Target::new("relay_terminate");
    let mut conn = t.raw_login().raw().unwrap();
    assert_eq!(
        raw::rows(&conn.simple_query("select 'before-terminate'").unwrap()),
        vec![vec![s("before-terminate")]]
    );
    let after = conn
        .terminate()
        .expect("the server closes the connection after Terminate");
    assert!(
        after.is_empty(),
        "nothing may follow Terminate: {}",
        raw::describe_all(&after)
    );
}

#[test]
fn parameter_status_and_backend_key_data_reach_the_client() {
    let t = Target::new("relay_params");
    let mut conn = t.raw_login().raw().unwrap();
    let tags: Vec<u8> = conn.startup_msgs.iter().map(|m| m.tag).collect();
    let k = tags
        .iter()
        .position(|&t| t == b'K')
        .expect("BackendKeyData during startup");
    assert!(
        k < tags.len() - 1 && *tags.last().unwrap() == b'Z',
        "BackendKeyData must precede ReadyForQuery: {tags:?}"
    );
    assert!(conn.backend_key.is_some());

    let p = conn.params.clone();
    assert!(
        p.get("server_version").is_some_and(|v| v.starts_with("15")),
        "{p:?}"
    );
    assert_eq!(
        p.get("client_encoding").map(String::as_str),
        Some("UTF8"),
        "{p:?}"
    );
    assert_eq!(
        p.get("server_encoding").map(String::as_str),
        Some("UTF8"),
        "{p:?}"
    );
    assert_eq!(
        p.get("integer_datetimes").map(String::as_str),
        Some("on"),
        "{p:?}"
    );
    assert_eq!(
        p.get("standard_conforming_strings").map(String::as_str),
        Some("on"),
        "{p:?}"
    );
    let shown = raw::rows(&conn.simple_query("show server_version").unwrap());
    assert_eq!(shown, vec![vec![p.get("server_version").cloned()]]);

    // Changes during the session are reported as they happen.
    let msgs = conn
        .simple_query("set datestyle to 'German'; set application_name to 'relay-test'")
        .unwrap();
    let reported: Vec<(String, String)> =
        msgs.iter().filter_map(|m| m.parameter_status()).collect();
    assert!(
        reported.contains(&("DateStyle".into(), "German, DMY".into())),
        "{reported:?}"
    );
    assert!(
        reported.contains(&("application_name".into(), "relay-test".into())),
        "{reported:?}"
    );
    // The client encoding is fixed for the session (pgward reads SQL in it).
    let msgs = conn.simple_query("set client_encoding to 'LATIN1'").unwrap();
    let codes: Vec<String> = msgs.iter().filter_map(|m| m.sqlstate()).collect();
    assert_eq!(codes, vec!["42501".to_string()], "{}", raw::describe_all(&msgs));
}

#[test]
fn client_encoding_from_startup_is_honoured() {
    let t = Target::new("relay_encoding");
    let mut conn = t
        .raw_login()
        .raw_with(&[("client_encoding", "LATIN1")])
        .unwrap();
    assert_eq!(
        conn.params.get("client_encoding").map(String::as_str),
        Some("LATIN1")
    );
    let msgs = conn
        .simple_query("select convert_from('\\xc3a9'::bytea, 'UTF8')")
        .unwrap();
    let row = msgs.iter().find_map(|m| m.data_row()).expect("a row");
    assert_eq!(row, vec![Some(vec![0xE9u8])], "é must arrive in LATIN1");
}

#[test]
fn sync_without_anything_pending_and_flush_are_answered() {
    // Protocol corner cases real drivers produce: a bare Sync (answered by ReadyForQuery) and a
    // Parse + Flush (answered by ParseComplete before any Sync).
    let t = Target::new("relay_sync");
    let mut conn = t.raw_login().raw().unwrap();
    conn.send(&fe::sync()).unwrap();
    let msgs = conn.recv_until_ready().unwrap();
    assert_eq!(msgs.iter().map(|m| m.tag).collect::<Vec<_>>(), vec![b'Z']);

    let mut batch = fe::parse("s_flush", "select $1::text");
    batch.extend(fe::flush());
    conn.send(&batch).unwrap();
    let m = conn.recv().unwrap();
    assert_eq!(
        m.tag,
        b'1',
        "ParseComplete after Flush, got {}",
        m.describe()
    );
    let mut batch = fe::bind_text("", "s_flush", &[Some("flushed")]);
    batch.extend(fe::execute("", 0));
    batch.extend(fe::sync());
    conn.send(&batch).unwrap();
    let msgs = conn.recv_until_ready().unwrap();
    assert_eq!(
        raw::rows(&msgs),
        vec![vec![s("flushed")]],
        "{}",
        raw::describe_all(&msgs)
    );
}

#[test]
fn an_execute_whose_sync_comes_later_is_answered() {
    // Parse/Bind/Execute in one write, the Sync in a later one: Postgres answers only after
    // the Sync, so pgward must still read the client while the statement's batch is out
    // (the audit writer may have sent it without telling the session). Once with the Sync
    // right behind (usually while the record is still being made durable) and once well after.
    let t = Target::new("relay_late_sync");
    let mut conn = t.raw_login().raw().unwrap();
    for (i, pause) in [Duration::ZERO, Duration::from_millis(300)].into_iter().enumerate() {
        let mut batch = fe::parse("", "select $1::text");
        batch.extend(fe::bind_text("", "", &[Some(&format!("late {i}"))]));
        batch.extend(fe::execute("", 0));
        conn.send(&batch).unwrap();
        std::thread::sleep(pause);
        conn.send(&fe::sync()).unwrap();
        let msgs = conn.recv_until_ready().unwrap();
        assert_eq!(
            raw::rows(&msgs),
            vec![vec![s(&format!("late {i}"))]],
            "{}",
            raw::describe_all(&msgs)
        );
    }
}
