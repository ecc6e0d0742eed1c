//! Masking of result values, end to end: a real Postgres, the real pgward, psql, tokio-postgres
//! (binary results, prepared statements) and the raw protocol client. Every test that reads
//! masked data also scans every byte the client received for the raw values.
//!
//! psql and tokio-postgres connect through a small capturing TCP relay (`Capture`) so their
//! byte streams can be scanned too; the raw client keeps its own transcript.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::gateway::rec;
use common::raw::{self, Msg};
use common::{Login, Pgward, cluster, toml_set, within};

const POLICY: &str = r#"
version = 1

[defaults]
action = "allow"

[[mask]]
name = "cards"
columns = ["public.customers.card", "public.customers.cvv"]
detect = ["card"]
style = "keep_last"
keep = 4
except_groups = ["pii_readers"]

[[mask]]
name = "emails"
columns = ["public.customers.email"]
detect = ["email"]
style = "keep_last"
except_groups = ["pii_readers"]

[[mask]]
name = "ssn"
columns = ["*.*.ssn"]
detect = ["ssn"]
style = "hash"
except_groups = ["pii_readers"]

[[mask]]
name = "notes"
columns = ["public.customers.notes", "public.vault.secret"]
style = "null"
except_groups = ["pii_readers"]
"#;

/// Raw values that must never reach a masked client, in any form we can spell.
const CARDS: &[&str] = &["4242424242424242", "5555-5555-5555-4444", "5555555555554444", "378282246310005", "4000056655665556"];
const EMAILS: &[&str] = &["jane@example.com", "john.doe@corp.example.org", "amy@ex.io"];
const NOTES: &[&str] = &["secret-note-alpha", "secret-note-bravo", "secret-note-charlie"];
const SSNS: &[&str] = &["123-45-6789", "078-05-1120", "219-09-9999"];
/// First six digits of each card (what `substr(card, 1, 6)` gives).
const PREFIXES: &[&str] = &["424242", "555555", "378282"];

struct Env {
    pw: Pgward,
    db: String,
}

/// Best-effort masking (`strict = false` on every rule): results are masked, statements are
/// not refused.
fn env(prefix: &str) -> Env {
    env_with(prefix, &POLICY.replace("[[mask]]\n", "[[mask]]\nstrict = false\n"))
}

/// Strict masking (the default).
fn env_strict(prefix: &str) -> Env {
    env_with(prefix, POLICY)
}

fn env_with(prefix: &str, policy: &str) -> Env {
    let c = cluster();
    let db = c.create_database(prefix);
    c.fixture_table(
        &db,
        "customers",
        "id int primary key, name text, card text, email varchar(200), ssn text, notes text, cvv int",
        "(1, 'Jane Roe', '4242424242424242', 'jane@example.com', '123-45-6789', 'secret-note-alpha', 123), \
         (2, 'John Doe', '5555-5555-5555-4444', 'john.doe@corp.example.org', '078-05-1120', 'secret-note-bravo', 456), \
         (3, 'Amy Lee', '378282246310005', 'amy@ex.io', '219-09-9999', 'secret-note-charlie', 789)",
    );
    c.fixture_table(
        &db,
        "orders",
        "id int, customer_id int, memo text",
        "(10, 1, 'paid with 4000 0566 5566 5556 on 2024-01-05, receipt to amy@ex.io'), (11, 2, 'no card here')",
    );
    c.svc_sql(&db, "CREATE FUNCTION get_card(int) RETURNS text LANGUAGE sql AS 'SELECT card FROM customers WHERE id = $1'");
    c.svc_sql(&db, "CREATE VIEW customer_cards AS SELECT id, card FROM customers");
    c.svc_sql(&db, "CREATE TABLE loot (v text)");
    Env { pw: start_with(policy), db }
}

fn start_with(policy: &str) -> Pgward {
    let policy = policy.to_string();
    Pgward::builder()
        .with_dir(move |dir: &Path, t: &mut toml::Table| {
            std::fs::write(dir.join("mask-policy.toml"), &policy).unwrap();
            toml_set(t, "policy.files", vec![toml::Value::from("mask-policy.toml")]);
        })
        .start()
}

impl Env {
    fn login(&self, groups: &[&str]) -> Login {
        let token = self.pw.token("sam", groups, "30m");
        self.pw.login("sam", &token, &self.db)
    }
    fn support(&self) -> Login {
        self.login(&["support"])
    }
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Panic if any raw sensitive value occurs in `bytes`.
#[track_caller]
fn assert_no_leak(bytes: &[u8], what: &str) {
    for v in CARDS.iter().chain(EMAILS).chain(NOTES).chain(SSNS) {
        assert!(!contains(bytes, v), "{what}: the client received the raw value {v:?}\n{}", String::from_utf8_lossy(bytes));
    }
}

#[track_caller]
fn assert_no_prefix(bytes: &[u8], what: &str) {
    for v in PREFIXES {
        assert!(!contains(bytes, v), "{what}: the client received a card prefix {v:?}\n{}", String::from_utf8_lossy(bytes));
    }
}

fn text_rows(msgs: &[Msg]) -> Vec<Vec<Option<String>>> {
    raw::rows(msgs)
}

/// A TCP relay on 127.0.0.1 in front of `target` that records every byte sent to the client.
struct Capture {
    port: u16,
    received: Arc<Mutex<Vec<u8>>>,
    stop: Arc<AtomicBool>,
}

impl Capture {
    fn new(target: SocketAddr) -> Capture {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (rx, st) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        let Ok(server) = TcpStream::connect(target) else { continue };
                        let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        std::thread::spawn(move || {
                            let mut b = [0u8; 16384];
                            while let Ok(n) = c_in.read(&mut b) {
                                if n == 0 || s_out.write_all(&b[..n]).is_err() {
                                    break;
                                }
                            }
                            let _ = s_out.shutdown(std::net::Shutdown::Write);
                        });
                        let rx = rx.clone();
                        let (mut s_in, mut c_out) = (server, client);
                        std::thread::spawn(move || {
                            let mut b = [0u8; 16384];
                            while let Ok(n) = s_in.read(&mut b) {
                                if n == 0 {
                                    break;
                                }
                                rx.lock().unwrap().extend_from_slice(&b[..n]);
                                if c_out.write_all(&b[..n]).is_err() {
                                    break;
                                }
                            }
                            let _ = c_out.shutdown(std::net::Shutdown::Write);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Capture { port, received, stop }
    }
    fn login(&self, l: &Login) -> Login {
        let mut l = l.clone();
        l.port = self.port;
        l
    }
    fn bytes(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn gw_addr(l: &Login) -> SocketAddr {
    format!("{}:{}", l.host, l.port).parse().unwrap()
}

#[test]
fn simple_protocol_masks_columns_whatever_the_alias() {
    let e = env("mask_simple");
    let mut c = e.support().raw().expect("login");
    let msgs = c
        .simple_query("SELECT id, card, email, card AS x, c.card AS \"Y\", ssn, cvv, name FROM customers c ORDER BY id")
        .unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    let rows = text_rows(&msgs);
    assert_eq!(rows.len(), 3);
    let r0 = &rows[0];
    assert_eq!(r0[1].as_deref(), Some("************4242"));
    assert_eq!(r0[2].as_deref(), Some("j***@example.com"));
    assert_eq!(r0[3].as_deref(), Some("************4242"));
    assert_eq!(r0[4].as_deref(), Some("************4242"));
    assert!(r0[5].as_deref().is_some_and(|h| h.starts_with("h:") && h.len() == 18), "{r0:?}");
    assert_eq!(r0[6], None, "a masked int column is NULL");
    assert_eq!(r0[7].as_deref(), Some("Jane Roe"));
    assert_eq!(rows[1][1].as_deref(), Some("****-****-****-4444"));
    assert_eq!(rows[2][1].as_deref(), Some("***********0005"));
    // SELECT *, TABLE, a view's column
    for q in ["SELECT * FROM customers", "TABLE customers", "SELECT * FROM customer_cards", "SELECT card FROM public.customers WHERE id = 1"] {
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
        assert_eq!(text_rows(&msgs).len(), if q.contains("id = 1") { 1 } else { 3 }, "{q}");
    }
    // The keyed hash is stable (joins and counts still work).
    let a = c.simple_query("SELECT ssn FROM customers WHERE id = 2").unwrap();
    let b = c.simple_query("SELECT x.ssn FROM (SELECT ssn FROM customers) x WHERE true LIMIT 1 OFFSET 1").unwrap();
    assert_eq!(text_rows(&a)[0][0], text_rows(&b)[0][0]);
    assert_no_leak(&c.received, "simple protocol");
}

#[test]
fn derived_columns_do_not_leak() {
    let e = env("mask_derived");
    let mut c = e.support().raw().expect("login");
    let queries = [
        "SELECT upper(card) FROM customers",
        "SELECT card || '' FROM customers",
        "SELECT substr(card, 1, 6) FROM customers",
        "SELECT row_to_json(c) FROM customers c",
        "SELECT c::text FROM customers c",
        "SELECT c FROM customers c",
        "SELECT to_jsonb(c.*) FROM customers c",
        "SELECT string_agg(card, ',') FROM customers",
        "SELECT card || card FROM customers",
        "SELECT (SELECT card FROM customers ORDER BY id LIMIT 1)",
        "SELECT replace(card, '-', '') FROM customers",
        "SELECT lower(email), notes || '!' FROM customers",
        "SELECT array_agg(notes)::text FROM customers",
        "SELECT x FROM (SELECT concat(card, email) AS x FROM customers) s",
        "WITH t AS (SELECT card AS k FROM customers) SELECT k, 'x' || k FROM t",
        "SELECT card FROM customers UNION ALL SELECT 'nothing'",
        "SELECT json_agg(c) FROM customers c",
    ];
    for q in queries {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
        assert!(!text_rows(&msgs).is_empty(), "{q}");
        assert_no_leak(&c.received[before..], q);
        assert_no_prefix(&c.received[before..], q);
    }
    // Lineage: substr(card, 1, 6) is masked as a whole (no detector could know 6 digits).
    let msgs = c.simple_query("SELECT substr(card, 1, 6) AS bin FROM customers WHERE id = 1").unwrap();
    assert_eq!(text_rows(&msgs)[0][0].as_deref(), Some("******"));
    // Unmasked expressions stay as they are.
    let msgs = c.simple_query("SELECT upper(name), length(card) > 0 FROM customers WHERE id = 1").unwrap();
    assert_eq!(text_rows(&msgs)[0][0].as_deref(), Some("JANE ROE"));
    assert_no_leak(&c.received, "derived");
}

#[test]
fn content_detectors_catch_what_lineage_cannot_see() {
    let e = env("mask_content");
    let mut c = e.support().raw().expect("login");
    // A function's result (OID 0, no visible lineage) and free text in an unmasked column.
    let msgs = c.simple_query("SELECT get_card(1), get_card(2)").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    assert_eq!(text_rows(&msgs)[0][0].as_deref(), Some("************4242"));
    assert_eq!(text_rows(&msgs)[0][1].as_deref(), Some("****-****-****-4444"));
    let msgs = c.simple_query("SELECT memo FROM orders ORDER BY id").unwrap();
    let rows = text_rows(&msgs);
    assert_eq!(rows[0][0].as_deref(), Some("paid with **** **** **** 5556 on 2024-01-05, receipt to a***@ex.io"));
    assert_eq!(rows[1][0].as_deref(), Some("no card here"));
    // A literal card typed by the client is masked too (content, not lineage).
    let msgs = c.simple_query("SELECT '4242424242424242'::text AS lit, 4242424242424242::bigint AS n").unwrap();
    assert_eq!(text_rows(&msgs)[0][0].as_deref(), Some("************4242"));
    assert_eq!(text_rows(&msgs)[0][1], None, "a number that is a card becomes NULL");
    // Values inside error and notice texts.
    let msgs = c.simple_query("SELECT card::int FROM customers WHERE id = 1").unwrap();
    let err = raw::first_error(&msgs).expect("cast fails");
    assert_eq!(err.sqlstate().as_deref(), Some("22003"), "value … is out of range for type integer");
    assert!(err.fields()[&'M'].contains("************4242"), "{:?}", err.fields());
    let msgs = c.simple_query("DO $$BEGIN RAISE NOTICE 'mail %', (SELECT email FROM customers WHERE id = 3); END$$").unwrap();
    let notice = msgs.iter().find(|m| m.tag == b'N').expect("notice");
    assert_eq!(notice.fields()[&'M'], "mail a***@ex.io");
    assert_no_leak(&c.received, "content");
}

#[test]
fn views_over_masked_columns() {
    let e = env("mask_view");
    // Views created before pgward reads the catalog, one over another.
    let c0 = cluster();
    c0.svc_sql(&e.db, "CREATE VIEW customer_notes AS SELECT id, notes AS n, upper(name) AS who, substr(card, 1, 6) AS bin FROM customers");
    c0.svc_sql(&e.db, "CREATE VIEW customer_notes2 AS SELECT n AS m, who FROM customer_notes");
    let mut c = e.support().raw().expect("login");
    for q in [
        "SELECT n, who, bin FROM customer_notes ORDER BY id",
        "SELECT * FROM customer_notes ORDER BY id",
        "SELECT m FROM customer_notes2",
        "SELECT upper(n) FROM customer_notes",
        "SELECT v FROM customer_notes2 v",
    ] {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
        assert!(!text_rows(&msgs).is_empty(), "{q}");
        assert_no_leak(&c.received[before..], q);
        assert_no_prefix(&c.received[before..], q);
    }
    let msgs = c.simple_query("SELECT who, bin FROM customer_notes WHERE id = 1").unwrap();
    assert_eq!(text_rows(&msgs)[0], vec![Some("JANE ROE".into()), Some("******".into())]);
}

#[test]
fn exempt_group_sees_raw_values() {
    let e = env("mask_exempt");
    let mut c = e.login(&["support", "pii_readers"]).raw().expect("login");
    let msgs = c.simple_query("SELECT card, email, notes FROM customers WHERE id = 1").unwrap();
    assert_eq!(
        text_rows(&msgs)[0],
        vec![Some("4242424242424242".into()), Some("jane@example.com".into()), Some("secret-note-alpha".into())]
    );
}

#[test]
fn psql_through_a_capture_sees_only_masked_values() {
    let e = env("mask_psql");
    let login = e.support();
    let cap = Capture::new(gw_addr(&login));
    let out = cap
        .login(&login)
        .psql(&["-c", "SELECT card, email, upper(card) FROM customers ORDER BY id", "-c", "SELECT row_to_json(c) FROM customers c"]);
    let stdout = out.expect_ok();
    assert!(stdout.contains("************4242|j***@example.com|****************"), "{stdout}");
    assert_no_leak(stdout.as_bytes(), "psql stdout");
    assert_no_leak(&cap.bytes(), "psql stream");
    assert!(cap.bytes().len() > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_binary_prepared_and_extended() {
    let e = env("mask_binary");
    let login = e.support();
    let cap = Capture::new(gw_addr(&login));
    let client = cap.login(&login).connect().await.expect("connect");
    // Prepared in one round trip (Parse/Describe/Sync), executed later (Bind/Execute/Sync),
    // binary results.
    let stmt = within("prepare", client.prepare("SELECT id, card, email, upper(card), ssn, cvv, c::text AS whole, name FROM customers c ORDER BY id")).await.unwrap();
    for _ in 0..2 {
        let rows = within("query", client.query(&stmt, &[])).await.unwrap();
        assert_eq!(rows.len(), 3);
        let r = &rows[0];
        assert_eq!(r.get::<_, String>(1), "************4242");
        assert_eq!(r.get::<_, String>(2), "j***@example.com");
        assert_eq!(r.get::<_, String>(3), "****************");
        assert!(r.get::<_, String>(4).starts_with("h:"));
        assert_eq!(r.get::<_, Option<i32>>(5), None, "binary int4 of a masked column: NULL");
        // whole-row text of a table with a `null` rule's column (notes): NULL
        assert_eq!(r.get::<_, Option<String>>(6), None);
        assert_eq!(r.get::<_, String>(7), "Jane Roe");
    }
    // Parameters, the unnamed statement, a function (content detection in binary text).
    let rows = within("query", client.query("SELECT card, get_card($1) FROM customers WHERE id = $1", &[&2i32])).await.unwrap();
    assert_eq!(rows[0].get::<_, String>(0), "****-****-****-4444");
    assert_eq!(rows[0].get::<_, String>(1), "****-****-****-4444");
    // binary int8 holding a card number: NULL; jsonb with an email inside: masked in place.
    let rows = within(
        "query",
        client.query("SELECT 4242424242424242::int8, jsonb_build_object('e', 'amy@ex.io'), substr(card, 1, 6) FROM customers WHERE id = 1", &[]),
    )
    .await
    .unwrap();
    assert_eq!(rows[0].get::<_, Option<i64>>(0), None);
    assert_eq!(rows[0].get::<_, String>(2), "******");
    // The same statement's text through simple_query (text format).
    let msgs = within("simple", client.simple_query("SELECT substr(card, 1, 6) FROM customers")).await.unwrap();
    assert!(msgs.len() >= 4);
    drop(client);
    assert_no_leak(&cap.bytes(), "tokio-postgres stream");
    assert_no_prefix(&cap.bytes(), "tokio-postgres stream");
}

#[test]
fn copy_to_stdout_text_csv_binary() {
    let e = env("mask_copy");
    let mut c = e.support().raw().expect("login");
    let cases: &[(&str, &str)] = &[
        ("COPY customers TO STDOUT", "1\tJane Roe\t************4242\tj***@example.com\t"),
        ("COPY customers (id, card) TO STDOUT WITH (FORMAT csv, HEADER)", "1,************4242\n"),
        ("COPY (SELECT id, upper(card), notes FROM customers ORDER BY id) TO STDOUT WITH (FORMAT csv)", "1,****************,\n"),
        ("COPY (SELECT memo FROM orders ORDER BY id) TO STDOUT", "paid with **** **** **** 5556"),
        ("COPY customers TO STDOUT WITH (FORMAT binary)", "PGCOPY"),
        ("COPY (SELECT row_to_json(x) FROM (SELECT id, card FROM customers) x) TO STDOUT", "{\"**\":*,"),
        ("COPY (SELECT row_to_json(c) FROM customers c) TO STDOUT", "\\N\n"),
    ];
    for (q, expect) in cases {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
        let data: Vec<u8> = msgs.iter().filter(|m| m.tag == b'd').flat_map(|m| m.body.clone()).collect();
        assert!(contains(&data, expect), "{q}: {}", String::from_utf8_lossy(&data));
        assert_no_leak(&c.received[before..], q);
        assert_no_prefix(&c.received[before..], q);
        assert!(raw::tags(&msgs).iter().any(|t| t == "COPY 3" || t == "COPY 2"), "{q}: {:?}", raw::tags(&msgs));
    }
    // psql's COPY TO STDOUT, through the capture.
    let login = e.support();
    let cap = Capture::new(gw_addr(&login));
    let out = cap.login(&login).psql(&["-c", "COPY (SELECT card, email, ssn FROM customers) TO STDOUT WITH (FORMAT csv)"]);
    let stdout = out.expect_ok();
    assert!(stdout.contains("************4242,j***@example.com,h:"), "{stdout}");
    assert_no_leak(&cap.bytes(), "psql COPY");
}

#[test]
fn cursors_returning_and_extended_raw() {
    let e = env("mask_cursor");
    let mut c = e.support().raw().expect("login");
    let script = [
        "BEGIN",
        "DECLARE cur CURSOR FOR SELECT card AS k, upper(email) FROM customers ORDER BY id",
        "FETCH 2 FROM cur",
        "FETCH ALL FROM cur",
        "CLOSE cur",
        "COMMIT",
    ];
    let mut fetched = Vec::new();
    for q in script {
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
        fetched.extend(text_rows(&msgs));
    }
    assert_eq!(fetched.len(), 3);
    assert_eq!(fetched[0][0].as_deref(), Some("************4242"));
    assert_eq!(fetched[0][1].as_deref(), Some("****@*******.***"), "upper(email) is derived: full");
    let msgs = c
        .simple_query("UPDATE customers SET name = name WHERE id = 1 RETURNING card, upper(email), notes; INSERT INTO customers VALUES (4, 'New', '4000056655665556', 'new@example.com', '111-22-3333', 'n', 1) RETURNING *")
        .unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    let rows = text_rows(&msgs);
    assert_eq!(rows[0][0].as_deref(), Some("************4242"));
    assert_eq!(rows[0][2], None);
    assert_eq!(rows[1][2].as_deref(), Some("************5556"));
    // Extended protocol, text results, Describe portal in the same batch; and SQL PREPARE.
    let msgs = c.extended_query("SELECT card, $1::text FROM customers WHERE id = 2", &[Some("4242424242424242")]).unwrap();
    assert_eq!(text_rows(&msgs)[0][0].as_deref(), Some("****-****-****-4444"));
    assert_eq!(text_rows(&msgs)[0][1].as_deref(), Some("************4242"));
    let msgs = c.simple_query("PREPARE p AS SELECT upper(card) FROM customers; EXECUTE p").unwrap();
    assert_eq!(text_rows(&msgs).len(), 4);
    assert_no_leak(&c.received, "cursors/returning/extended");
    // A cursor fetched in portions with Execute's row limit (PortalSuspended).
    let mut batch = raw::fe::parse("s1", "SELECT card FROM customers ORDER BY id");
    batch.extend(raw::fe::bind_text("p1", "s1", &[]));
    batch.extend(raw::fe::describe_portal("p1"));
    batch.extend(raw::fe::execute("p1", 2));
    batch.extend(raw::fe::execute("p1", 0));
    batch.extend(raw::fe::sync());
    let before = c.received.len();
    c.send(&batch).unwrap();
    let msgs = c.recv_until_ready().unwrap();
    assert_eq!(text_rows(&msgs).len(), 4, "{}", raw::describe_all(&msgs));
    assert_no_leak(&c.received[before..], "portal suspended");
}

#[test]
fn many_rows_no_limit() {
    let e = env("mask_many");
    cluster().svc_sql(
        &e.db,
        "CREATE TABLE big AS SELECT g AS id, '4242424242424242'::text AS card, 'u' || g || '@example.com' AS email FROM generate_series(1, 30000) g",
    );
    // big.card is not a rule column: the content detectors catch every row.
    let mut c = e.support().raw().expect("login");
    let msgs = c.simple_query("SELECT id, card, email FROM big").unwrap();
    let rows = text_rows(&msgs);
    assert_eq!(rows.len(), 30000);
    assert!(rows.iter().all(|r| r[1].as_deref() == Some("************4242")));
    assert!(rows.iter().all(|r| r[2].as_deref().is_some_and(|v| v.starts_with("u***@"))));
    assert_no_leak(&c.received, "30k rows");
}

#[test]
fn audit_records_masked_columns_and_counts_not_values() {
    let e = env("mask_audit");
    let mut c = e.support().raw().expect("login");
    let msgs = c.simple_query("SELECT id, card, email, upper(card) AS u FROM customers ORDER BY id").unwrap();
    assert!(raw::first_error(&msgs).is_none());
    let recs = e.pw.wait_audit("result with masked columns", |r| {
        r.iter().any(|x| rec::kind(x) == "result" && x["meta"]["masked"].is_array())
    });
    let res = recs.iter().find(|x| rec::kind(x) == "result" && x["meta"]["masked"].is_array()).unwrap();
    let masked = res["meta"]["masked"].as_array().unwrap();
    let by_col = |name: &str| masked.iter().find(|m| m["column"] == name).unwrap_or_else(|| panic!("{name} in {res}"));
    assert_eq!(by_col("card")["values"], 3);
    assert_eq!(by_col("card")["rule"], "cards");
    assert_eq!(by_col("card")["style"], "keep_last");
    assert_eq!(by_col("email")["values"], 3);
    assert_eq!(by_col("u")["style"], "full");
    assert!(masked.iter().all(|m| m["column"] != "id"));
    assert_no_leak(&e.pw.audit_bytes(), "audit log");
    let (code, out) = e.pw.audit_verify();
    assert_eq!(code, 0, "{out}");
}

#[test]
fn catalog_follows_ddl() {
    let e = env("mask_ddl");
    let mut c = e.support().raw().expect("login");
    // `vault.secret` is a rule column of a table that does not exist yet.
    let msgs = c.simple_query("CREATE TABLE vault (id int, secret text); INSERT INTO vault VALUES (1, 'topsecret-vault-1')").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    // SELECT * gives lineage nothing by name; the table OID must be known.
    let msgs = c.simple_query("SELECT * FROM vault").unwrap();
    assert_eq!(text_rows(&msgs)[0][1], None, "{}", raw::describe_all(&msgs));
    // Drop and re-create under the same name (new OID), columns reordered.
    let msgs = c.simple_query("DROP TABLE vault; CREATE TABLE vault (secret text, id int); INSERT INTO vault VALUES ('topsecret-vault-2', 2)").unwrap();
    assert!(raw::first_error(&msgs).is_none());
    let msgs = c.simple_query("SELECT * FROM vault").unwrap();
    assert_eq!(text_rows(&msgs)[0][0], None);
    // The statement after the session's DDL waits for the catalog reload: the column is
    // matched by OID at once (the alias does not fool it, and `id` is not over-masked).
    let msgs = c.simple_query("SELECT v.* FROM vault v").unwrap();
    assert_eq!(text_rows(&msgs)[0], vec![None, Some("2".into())]);
    // A view the session creates is known to the next statement.
    let msgs = c.simple_query("CREATE VIEW vv AS SELECT secret AS s, id FROM vault").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    let msgs = c.simple_query("SELECT upper(x.s) FROM vv x").unwrap();
    assert_eq!(text_rows(&msgs)[0], vec![None], "{}", raw::describe_all(&msgs));
    assert!(!contains(&c.received, "topsecret-vault"));
}

/// Strict masking: what an analyst who wants raw values would try, refused with 42501 naming the
/// mask rule, the session usable after each, nothing raw on the wire, and nothing written
/// upstream.
#[test]
fn strict_masking_refuses_what_it_cannot_prove() {
    let e = env_strict("mask_strict");
    let mut c = e.support().raw().expect("login");
    let attacks = [
        ("SELECT pg_notify('ch', card) FROM customers", "cards"),
        ("SELECT set_config('application_name', card, false) FROM customers", "cards"),
        ("SELECT pg_advisory_lock(hashtext(card)) FROM customers", "cards"),
        ("SELECT * FROM customers c, jsonb_each_text(to_jsonb(c))", "cards"),
        ("SELECT regexp_split_to_table(card, '') FROM customers", "cards"),
        ("SELECT length(notes) FROM customers", "notes"),
        ("SELECT id FROM customers WHERE card LIKE '4242%'", "cards"),
        ("SELECT id FROM customers WHERE substr(card, 1, 1) = '4'", "cards"),
        ("SELECT id FROM customers ORDER BY ssn", "ssn"),
        ("SELECT id FROM customers GROUP BY card, id", "cards"),
        ("SELECT max(email) FROM customers", "emails"),
        ("SELECT card::int FROM customers", "cards"),
        ("SELECT ssn::jsonb FROM customers", "ssn"),
        ("SELECT U&\"c\\0061rd\" || '' FROM customers ORDER BY 1", "cards"),
        ("WITH RECURSIVE r(x) AS (SELECT card FROM customers UNION ALL SELECT substr(x, 2) FROM r WHERE x <> '') SELECT length(x) FROM r", "cards"),
        ("SELECT 1; SELECT md5(email) FROM customers", "emails"),
        ("INSERT INTO loot SELECT card FROM customers", "cards"),
        ("UPDATE customers SET name = card", "cards"),
        ("CREATE TABLE loot2 AS SELECT email FROM customers", "emails"),
        ("CREATE TEMP VIEW v AS SELECT card FROM customers", "cards"),
        ("COPY (SELECT notes FROM customers) TO STDOUT", "notes"),
        ("UPDATE customers SET name = name WHERE id = 1 RETURNING card", "cards"),
        ("SELECT card FROM customers INTERSECT SELECT name FROM customers", "cards"),
        ("SELECT count(*) FROM customers JOIN loot ON loot.v = customers.card", "cards"),
        ("DO $$BEGIN RAISE NOTICE '%', (SELECT card FROM customers LIMIT 1); END$$", "cards"),
        ("DO $$BEGIN EXECUTE 'SELECT 1'; END$$", "cards"),
        ("SELECT query_to_xml('SELECT card FROM customers', true, true, '')", "cards"),
        ("SELECT most_common_vals::text FROM pg_stats WHERE attname = 'card'", "cards"),
        // The prepared statement's output is masked; a table made from it would not be. (Two
        // checks refuse it — the prepared rows, and the new table's hash-rule column — and
        // either may name its rule.)
        ("PREPARE notes_of AS SELECT notes FROM customers", ""),
        ("CREATE TABLE loot3 AS EXECUTE notes_of", "mask:"),
    ];
    for (q, rule) in attacks {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        if rule.is_empty() {
            // A step the attack builds on, allowed.
            assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
            continue;
        }
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: not refused: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
        let m = &err.fields()[&'M'];
        assert!(m.contains("mask:") && m.contains(rule) && m.contains("strict masking"), "{q}: {m}");
        assert!(text_rows(&msgs).is_empty(), "{q}: rows came back");
        let ok = c.simple_query("SELECT 1").unwrap();
        assert!(raw::first_error(&ok).is_none(), "{q}: session unusable after the refusal");
        assert_no_leak(&c.received[before..], q);
    }
    // Nothing reached Postgres: no rows copied, no table created, no name overwritten.
    let pg = cluster();
    assert_eq!(pg.sql(&e.db, "SELECT count(*) FROM loot").trim(), "0");
    assert_eq!(pg.sql(&e.db, "SELECT count(*) FROM pg_class WHERE relname IN ('loot2', 'loot3')").trim(), "0");
    assert_eq!(pg.sql(&e.db, "SELECT count(*) FROM customers WHERE name = card").trim(), "0");
    // Refusals are audited as denials naming the mask rule.
    let recs = e.pw.audit_records();
    assert!(
        recs.iter().any(|r| r["decision"] == "deny" && r["rule"].as_str().is_some_and(|x| x.starts_with("mask:")) && r["sql"].as_str().is_some_and(|s| s.contains("pg_notify"))),
        "no denial record for pg_notify"
    );
}

/// Strict masking lets through what it can prove masked, and masks it.
#[test]
fn strict_masking_keeps_analyst_queries_working() {
    let e = env_strict("mask_strict_ok");
    let mut c = e.support().raw().expect("login");
    let queries = [
        ("SELECT id, name, card, email FROM customers ORDER BY id", 3),
        ("SELECT * FROM customers WHERE id = 1", 1),
        ("SELECT name FROM customers WHERE card = '4242424242424242'", 1),
        ("SELECT count(card), count(DISTINCT ssn) FROM customers", 1),
        ("SELECT upper(card), coalesce(email, '-') FROM customers", 3),
        ("SELECT name, count(*) FROM customers GROUP BY name", 3),
        ("SELECT id FROM customers WHERE card IS NOT NULL AND email IN ('amy@ex.io', 'x@y.z')", 1),
        ("SELECT x.k FROM (SELECT card AS k FROM customers) x", 3),
        ("SELECT k.card FROM customer_cards k WHERE id = 2", 1),
        ("SELECT get_card(1)", 1),
        ("SELECT memo FROM orders", 2),
    ];
    for (q, n) in queries {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
        assert_eq!(text_rows(&msgs).len(), n, "{q}");
        assert_no_leak(&c.received[before..], q);
    }
    let msgs = c.simple_query("SELECT card FROM customers WHERE card = '4242424242424242'").unwrap();
    assert_eq!(text_rows(&msgs)[0][0].as_deref(), Some("************4242"));
    // Extended protocol: refused at Parse, the pipeline goes on after Sync.
    let msgs = c.extended_query("SELECT length(card) FROM customers WHERE id = $1", &[Some("1")]).unwrap();
    assert_eq!(raw::first_error(&msgs).and_then(|e| e.sqlstate()).as_deref(), Some("42501"), "{}", raw::describe_all(&msgs));
    let msgs = c.extended_query("SELECT card FROM customers WHERE id = $1", &[Some("1")]).unwrap();
    assert_eq!(text_rows(&msgs)[0][0].as_deref(), Some("************4242"));
    // An exempt group is not subject to the rules at all.
    let mut x = e.login(&["support", "pii_readers"]).raw().expect("login");
    let msgs = x.simple_query("SELECT length(card) FROM customers WHERE id = 1").unwrap();
    assert_eq!(text_rows(&msgs)[0][0].as_deref(), Some("16"));
    assert_no_leak(&c.received, "strict analyst");
}

/// Best-effort masking still scrubs every message that carries values: notifications,
/// parameter status, every field of errors raised by PL/pgSQL, SSN-shaped values in any area.
#[test]
fn messages_other_than_rows_are_scrubbed() {
    let e = env("mask_messages");
    let mut c = e.support().raw().expect("login");
    let mut all = Vec::new();
    all.extend(c.simple_query("LISTEN ch").unwrap());
    all.extend(c.simple_query("SELECT pg_notify('ch', card) FROM customers WHERE id = 1").unwrap());
    assert!(all.iter().any(|m| m.tag == b'A'), "no notification: {}", raw::describe_all(&all));
    let msgs = c.simple_query("SELECT set_config('application_name', email, false) FROM customers WHERE id = 1").unwrap();
    assert!(msgs.iter().any(|m| m.tag == b'S'), "no ParameterStatus: {}", raw::describe_all(&msgs));
    let msgs = c
        .simple_query("DO $$BEGIN RAISE EXCEPTION 'x' USING COLUMN = (SELECT card FROM customers WHERE id = 2), TABLE = (SELECT email FROM customers WHERE id = 3), DETAIL = '912-34-5678'; END$$")
        .unwrap();
    let err = raw::first_error(&msgs).expect("raised");
    assert_eq!(err.sqlstate().as_deref(), Some("P0001"));
    assert!(!contains(&c.received, "912-34-5678"), "an SSN in a never-issued area reached the client");
    assert_no_leak(&c.received, "messages");
}

/// Lineage follows what the server did: the statement after another in one query string gets
/// its own lineage, and a DECLARE or Parse that failed does not replace what its name meant.
#[test]
fn lineage_follows_what_the_server_did() {
    let e = env_strict("mask_lineage_state");
    let mut c = e.support().raw().expect("login");
    // `notes` has no content detector: only lineage can mask upper(notes).
    let msgs = c.simple_query("SET application_name = 'a'; SELECT upper(notes) AS u FROM customers").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    assert_eq!(text_rows(&msgs).len(), 3);
    let msgs = c.simple_query("DECLARE h CURSOR WITH HOLD FOR SELECT upper(notes) FROM customers").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    let msgs = c.simple_query("DECLARE h CURSOR WITH HOLD FOR SELECT 'plain'::text").unwrap();
    assert_eq!(raw::first_error(&msgs).and_then(|e| e.sqlstate()).as_deref(), Some("42P03"), "{}", raw::describe_all(&msgs));
    let msgs = c.simple_query("FETCH ALL FROM h").unwrap();
    assert_eq!(text_rows(&msgs).len(), 3, "{}", raw::describe_all(&msgs));
    // A named statement, then a failed Parse of the same name.
    let mut batch = raw::fe::parse("s1", "SELECT upper(notes) FROM customers");
    batch.extend(raw::fe::sync());
    c.send(&batch).unwrap();
    let msgs = c.recv_until_ready().unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    let mut batch = raw::fe::parse("s1", "SELECT 'plain'::text");
    batch.extend(raw::fe::sync());
    c.send(&batch).unwrap();
    let msgs = c.recv_until_ready().unwrap();
    assert_eq!(raw::first_error(&msgs).and_then(|e| e.sqlstate()).as_deref(), Some("42P05"), "{}", raw::describe_all(&msgs));
    let mut batch = raw::fe::bind_text("", "s1", &[]);
    batch.extend(raw::fe::execute("", 0));
    batch.extend(raw::fe::sync());
    c.send(&batch).unwrap();
    let msgs = c.recv_until_ready().unwrap();
    assert_eq!(text_rows(&msgs).len(), 3, "{}", raw::describe_all(&msgs));
    assert!(!contains(&c.received, "SECRET-NOTE"), "upper(notes) reached the client unmasked");
    assert_no_leak(&c.received, "lineage state");
}

/// A table that inherits from a rule table (a partition, a child) holds the parent's data
/// under another name: its columns are masked and strict masking knows them.
#[test]
fn children_and_partitions_of_rule_tables() {
    let e = env_strict("mask_children");
    let pg = cluster();
    pg.svc_sql(&e.db, "CREATE TABLE customers_child () INHERITS (customers)");
    pg.svc_sql(&e.db, "INSERT INTO customers_child (id, name, card, notes) VALUES (9, 'Kid', '4000056655665556', 'secret-note-alpha')");
    pg.svc_sql(&e.db, "CREATE TABLE pv (k int, notes text) PARTITION BY RANGE (k)");
    pg.svc_sql(&e.db, "CREATE TABLE pv_1 PARTITION OF pv FOR VALUES FROM (0) TO (100)");
    pg.svc_sql(&e.db, "INSERT INTO pv VALUES (1, 'secret-note-bravo')");
    let policy = POLICY.replace("\"public.vault.secret\"", "\"public.vault.secret\", \"public.pv.notes\"");
    let e = Env { db: e.db.clone(), pw: { drop(e.pw); start_with(&policy) } };
    let mut c = e.support().raw().expect("login");
    for q in ["SELECT notes, card FROM customers_child", "SELECT * FROM pv_1", "SELECT upper(notes) FROM customers_child"] {
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
        assert_eq!(text_rows(&msgs).len(), 1, "{q}");
    }
    for q in ["SELECT length(notes) FROM customers_child", "SELECT id FROM pv_1 WHERE notes LIKE 'secret%'"] {
        let msgs = c.simple_query(q).unwrap();
        assert_eq!(raw::first_error(&msgs).and_then(|e| e.sqlstate()).as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
    }
    assert_no_leak(&c.received, "children");
}


/// A FunctionCall message with text arguments and a text result.
fn function_call(oid: i32, args: &[&str]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&oid.to_be_bytes());
    body.extend_from_slice(&1i16.to_be_bytes()); // one format code: text for all
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&(args.len() as i16).to_be_bytes());
    for a in args {
        body.extend_from_slice(&(a.len() as i32).to_be_bytes());
        body.extend_from_slice(a.as_bytes());
    }
    body.extend_from_slice(&0i16.to_be_bytes());
    raw::fe::raw_msg(b'F', &body)
}

/// Masked columns holding letters of other scripts, full-width digits or accented letters:
/// `full` and `keep_last` hide every character, not only ASCII letters and digits.
#[test]
fn non_ascii_values_of_masked_columns_are_hidden() {
    let e = env_strict("mask_unicode");
    let pg = cluster();
    pg.svc_sql(
        &e.db,
        "INSERT INTO customers (id, name, card, email) VALUES \
         (7, 'Ivan', '４２４２４２４２４２４２４２４２', 'иван@пример.рф'), (8, 'José', 'José Müller-Ⅻ', 'josé@exämple.com')",
    );
    let mut c = e.support().raw().expect("login");
    for q in ["SELECT card, email FROM customers WHERE id IN (7, 8)", "SELECT upper(card), email || '' FROM customers WHERE id IN (7, 8)"] {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
        assert_eq!(text_rows(&msgs).len(), 2, "{q}");
        let got = &c.received[before..];
        for raw_piece in ["４２４２４２", "иван", "пример", "José", "Müller", "josé", "exämple", "é", "ü"] {
            assert!(!contains(got, raw_piece), "{q}: {raw_piece:?} reached the client: {}", raw::describe_all(&msgs));
        }
    }
    let msgs = c.simple_query("SELECT card FROM customers WHERE id = 7").unwrap();
    assert_eq!(text_rows(&msgs)[0][0].as_deref(), Some("************４２４２"), "keep_last 4 of a full-width number");
}

/// A fastpath call names its function by OID and passes bytes: under strict masking it cannot
/// run SQL given as text (`query_to_xml`) or anything else but the large-object functions,
/// whatever the policy allows.
#[test]
fn fastpath_calls_are_refused_under_strict_masking() {
    let e = env_strict("mask_fastpath");
    let mut c = e.support().raw().expect("login");
    let sql = "select notes, encode(card::bytea, 'hex') as h from customers";
    c.send(&function_call(2924, &[sql, "t", "f", ""])).unwrap(); // pg_catalog.query_to_xml
    let msgs = c.recv_until_ready().unwrap();
    let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("query_to_xml ran: {}", raw::describe_all(&msgs)));
    assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{}", raw::describe_all(&msgs));
    assert!(err.fields()[&'M'].contains("mask:") && err.fields()[&'M'].contains("fastpath"), "{}", raw::describe_all(&msgs));
    assert!(!contains(&c.received, "secret-note") && !contains(&c.received, "34323432"), "values reached the client");
    // Large objects, which libpq reads and writes this way, still work.
    c.send(&function_call(957, &["393216"])).unwrap(); // lo_creat(INV_READ | INV_WRITE)
    let msgs = c.recv_until_ready().unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    assert!(msgs.iter().any(|m| m.tag == b'V'), "{}", raw::describe_all(&msgs));
    // The refusal is audited as a denial naming the mask rule.
    let recs = e.pw.wait_audit("fastpath denial", |r| {
        r.iter().any(|x| x["protocol"] == "function_call" && x["decision"] == "deny")
    });
    let denial = recs.iter().find(|x| x["protocol"] == "function_call" && x["decision"] == "deny").unwrap();
    assert!(denial["rule"].as_str().is_some_and(|r| r.starts_with("mask:")), "{denial}");
}

/// A `DECLARE` or `PREPARE` that was only parsed (extended protocol, never executed) names no
/// cursor or statement on the server: it must not replace what pgward knows the name runs.
#[test]
fn declare_and_prepare_parsed_but_not_run_keep_the_names_lineage() {
    let e = env_strict("mask_parse_names");
    let mut c = e.support().raw().expect("login");
    // `notes` has no content detector: only lineage masks upper(notes) and notes || ''.
    for q in [
        "DECLARE c CURSOR WITH HOLD FOR SELECT upper(notes), notes || '' FROM customers",
        "PREPARE p AS SELECT upper(notes), notes || '' FROM customers",
    ] {
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
    }
    for (name, q) in [
        ("x", "DECLARE c CURSOR WITH HOLD FOR SELECT 'plain'::text, 'p'::text"),
        ("y", "PREPARE p AS SELECT 'plain'::text, 'p'::text"),
    ] {
        let mut batch = raw::fe::parse(name, q);
        batch.extend(raw::fe::sync());
        c.send(&batch).unwrap();
        let msgs = c.recv_until_ready().unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
    }
    for q in ["FETCH ALL FROM c", "EXECUTE p"] {
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
        assert_eq!(text_rows(&msgs).len(), 3, "{q}: {}", raw::describe_all(&msgs));
    }
    // Executed, the parsed DECLARE does name the cursor: its plain values come back as they are.
    let mut batch = raw::fe::parse("z", "DECLARE d CURSOR WITH HOLD FOR SELECT 'plain'::text");
    batch.extend(raw::fe::bind_text("", "z", &[]));
    batch.extend(raw::fe::execute("", 0));
    batch.extend(raw::fe::sync());
    c.send(&batch).unwrap();
    let msgs = c.recv_until_ready().unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    let msgs = c.simple_query("FETCH ALL FROM d").unwrap();
    assert_eq!(text_rows(&msgs), vec![vec![Some("plain".to_string())]], "{}", raw::describe_all(&msgs));
    assert!(!contains(&c.received, "SECRET-NOTE"), "upper(notes) reached the client unmasked");
    assert_no_leak(&c.received, "parsed DECLARE/PREPARE");
}

/// Constraint violations echo the row (`Failing row contains (…)`, `Key (…)=(…)`), masked
/// columns included: in a session with column rules their DETAIL is withheld.
#[test]
fn constraint_errors_do_not_echo_masked_rows() {
    let e = env_strict("mask_constraint_detail");
    let pg = cluster();
    pg.svc_sql(&e.db, "CREATE UNIQUE INDEX ON customers (name, notes)");
    pg.svc_sql(&e.db, "ALTER TABLE customers ADD CONSTRAINT short_names CHECK (length(name) < 20)");
    pg.svc_sql(&e.db, "UPDATE customers SET notes = 'secret-note-alpha' WHERE id = 2");
    let mut c = e.support().raw().expect("login");
    for (q, code) in [
        ("UPDATE customers SET id = NULL WHERE id = 1", "23502"),
        ("UPDATE customers SET name = 'a name longer than twenty' WHERE id = 1", "23514"),
        ("UPDATE customers SET name = 'Jane Roe' WHERE id = 2", "23505"),
    ] {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: no error: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some(code), "{q}: {}", raw::describe_all(&msgs));
        assert!(err.fields().get(&'D').is_some_and(|d| d.contains("withheld")), "{q}: {}", raw::describe_all(&msgs));
        let got = &c.received[before..];
        assert!(!contains(got, "secret-note") && !contains(got, "123)"), "{q}: {}", raw::describe_all(&msgs));
        assert_no_leak(got, q);
    }
    // An exempt session still gets the server's detail.
    let mut x = e.login(&["support", "pii_readers"]).raw().expect("login");
    let msgs = x.simple_query("UPDATE customers SET id = NULL WHERE id = 1").unwrap();
    assert!(raw::first_error(&msgs).and_then(|e| e.fields().get(&'D').cloned()).is_some_and(|d| d.contains("Failing row contains")));
}

/// Each literal compared with a masked column is a guess. One statement can combine many:
/// scalar subqueries counting the rows that match different halves of a candidate list
/// name the matching candidate bit by bit. Strict masking bounds the guesses per statement.
#[test]
fn strict_masking_bounds_the_guesses_per_statement() {
    let e = env_strict("mask_guesses");
    let mut c = e.support().raw().expect("login");
    // 64 candidates for customer 1's card, the real one among them; column k counts the
    // rows matching the candidates whose index has bit k set.
    let candidates: Vec<String> = (0..64).map(|i| if i == 37 { "4242424242424242".to_string() } else { format!("5{i:015}") }).collect();
    let bits: Vec<String> = (0..6)
        .map(|k| {
            let half: Vec<String> = candidates.iter().enumerate().filter(|(i, _)| i >> k & 1 == 1).map(|(_, v)| format!("'{v}'")).collect();
            format!("(SELECT count(*) FROM customers WHERE id = 1 AND card IN ({})) AS b{k}", half.join(", "))
        })
        .collect();
    let q = format!("SELECT {}", bits.join(", "));
    let msgs = c.simple_query(&q).unwrap();
    let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("the bit-split guesses ran: {}", raw::describe_all(&msgs)));
    assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{}", raw::describe_all(&msgs));
    assert!(err.fields()[&'M'].contains("mask:cards") && err.fields()[&'M'].contains("guess"), "{}", raw::describe_all(&msgs));
    assert!(text_rows(&msgs).is_empty());
    // A short list still works.
    let msgs = c.simple_query("SELECT id FROM customers WHERE email IN ('amy@ex.io', 'x@y.z', 'jane@example.com') ORDER BY id").unwrap();
    assert_eq!(text_rows(&msgs), vec![vec![Some("1".to_string())], vec![Some("3".to_string())]], "{}", raw::describe_all(&msgs));
    assert_no_leak(&c.received, "guesses");
}

/// Value-preserving functions whose other arguments compare the value's characters: the
/// masked result's length or NULL would tell them apart. Refused; plain positions still work.
#[test]
fn value_functions_cannot_compare_characters() {
    let e = env_strict("mask_value_oracles");
    let mut c = e.support().raw().expect("login");
    for q in [
        // empty exactly when the second digit is 2
        "SELECT id, ltrim(substr(card, 2, 1), '2') FROM customers",
        "SELECT id, rtrim(notes, 'a') FROM customers",
        // NULL unless the card starts with 42
        "SELECT id, substring(card, '^42') FROM customers",
        "SELECT id, substring(card SIMILAR '42%' ESCAPE '#') FROM customers",
        // NULL exactly when card equals name
        "SELECT id, nullif(card, name) FROM customers",
    ] {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: not refused: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
        assert!(err.fields()[&'M'].contains("strict masking"), "{q}: {}", raw::describe_all(&msgs));
        assert!(text_rows(&msgs).is_empty(), "{q}");
        assert_no_leak(&c.received[before..], q);
    }
    let msgs = c.simple_query("SELECT substr(card, 1, 6), left(card, -4), btrim(email) FROM customers WHERE id = 1").unwrap();
    assert_eq!(text_rows(&msgs), vec![vec![Some("******".to_string()), Some("************".to_string()), Some("****@*******.***".to_string())]], "{}", raw::describe_all(&msgs));
}

/// A function or domain named like a built-in strict masking trusts (`initcap`, `text`),
/// reached through `search_path = public, pg_catalog`, would receive the masked value and
/// RAISE it — in the same query string as its CREATE, before pgward's catalog knows it, and
/// for a type at any time. Creating or renaming such objects is refused.
#[test]
fn functions_and_types_cannot_shadow_trusted_built_ins() {
    let e = env_strict("mask_shadow");
    let mut c = e.support().raw().expect("login");
    let peek = "CREATE FUNCTION public.peek(x text) RETURNS boolean LANGUAGE plpgsql AS $$BEGIN RAISE NOTICE 'peek %', x; RETURN true; END$$";
    let msgs = c.simple_query(peek).unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    for q in [
        "CREATE FUNCTION public.initcap(x text) RETURNS text LANGUAGE plpgsql AS $$BEGIN RAISE NOTICE 'leak %', x; RETURN x; END$$; \
         SET search_path = public, pg_catalog; SELECT initcap(notes) FROM customers",
        "CREATE DOMAIN public.text AS pg_catalog.text CHECK (public.peek(VALUE))",
        "CREATE DOMAIN public.t2 AS pg_catalog.text CHECK (public.peek(VALUE)); ALTER DOMAIN public.t2 RENAME TO text",
    ] {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: not refused: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
        assert!(err.fields()[&'M'].contains("built-in"), "{q}: {}", raw::describe_all(&msgs));
        assert!(!contains(&c.received[before..], "secret-note"), "{q}: {}", raw::describe_all(&msgs));
    }
    // Nothing of the refused strings ran, so the casts and calls below are the built-ins.
    let msgs = c.simple_query("SET search_path = public, pg_catalog; SELECT notes::text, initcap(notes) FROM customers").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    assert!(!msgs.iter().any(|m| m.tag == b'N'), "a notice came back: {}", raw::describe_all(&msgs));
    assert!(!contains(&c.received, "secret-note"), "a note reached the client");
    let pg = cluster();
    assert_eq!(pg.sql(&e.db, "SELECT count(*) FROM pg_type WHERE typname IN ('text', 't2') AND typnamespace = 'public'::regnamespace").trim(), "0");
}

/// Postgres ignores a Sync that arrives while it copies FROM STDIN (libraries send one right
/// after the COPY's Execute, tokio-postgres does), so such a Sync gets no ReadyForQuery. The
/// results of the statements after the COPY must still be matched to those statements and
/// masked: a row reaching the client unplanned would carry raw values.
#[test]
fn syncs_inside_copy_from_stdin_do_not_unmask_later_results() {
    let e = env_strict("mask_copy_sync");
    let mut c = e.support().raw().expect("login");
    // Simple protocol: a Sync inside the COPY, then the data.
    c.send(&raw::fe::query("COPY loot FROM STDIN")).unwrap();
    let g = c.recv().unwrap();
    assert_eq!(g.tag, b'G', "{}", g.describe());
    let mut copy = raw::fe::sync();
    copy.extend(raw::fe::raw_msg(b'd', b"one\n"));
    copy.extend(raw::fe::raw_msg(b'c', b""));
    c.send(&copy).unwrap();
    let msgs = c.recv_until_ready().unwrap();
    assert_eq!(raw::tags(&msgs), ["COPY 1"], "{}", raw::describe_all(&msgs));
    // Extended protocol the way tokio-postgres does it: Bind, Execute, Sync before the data.
    let mut start = raw::fe::parse("", "COPY loot FROM STDIN");
    start.extend(raw::fe::bind_text("", "", &[]));
    start.extend(raw::fe::execute("", 0));
    start.extend(raw::fe::sync());
    c.send(&start).unwrap();
    let (one, two) = (c.recv().unwrap(), c.recv().unwrap());
    let g = c.recv().unwrap();
    assert_eq!([one.tag, two.tag, g.tag], [b'1', b'2', b'G'], "{}", g.describe());
    let mut copy = raw::fe::raw_msg(b'd', b"two\n");
    copy.extend(raw::fe::raw_msg(b'c', b""));
    copy.extend(raw::fe::sync());
    c.send(&copy).unwrap();
    let msgs = c.recv_until_ready().unwrap();
    assert_eq!(raw::tags(&msgs), ["COPY 1"], "{}", raw::describe_all(&msgs));

    let before = c.received.len();
    let msgs = c.simple_query("SELECT notes, card FROM customers ORDER BY id").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    assert_eq!(text_rows(&msgs).len(), 3, "{}", raw::describe_all(&msgs));
    assert_no_leak(&c.received[before..], "after COPY with a Sync inside");
    let msgs = c.extended_query("SELECT notes FROM customers WHERE id = $1", &[Some("1")]).unwrap();
    assert_eq!(text_rows(&msgs), [[None]], "{}", raw::describe_all(&msgs));
    assert_no_leak(&c.received, "after COPY with a Sync inside");
    assert_eq!(cluster().sql(&e.db, "SELECT string_agg(v, ',' ORDER BY v) FROM loot").trim(), "one,two");
}

/// A cursor the session declared over a masked column is a portal any PL/pgSQL code can read
/// by name: a refcursor set to `'cc'` FETCHes its raw rows without the body naming the column
/// or its table, and RAISEs them or writes them to a table of its own. Strict masking refuses
/// bodies that FETCH; the cursor itself still returns masked rows.
#[test]
fn bodies_cannot_fetch_from_the_sessions_cursors() {
    let e = env_strict("mask_body_fetch");
    let mut c = e.support().raw().expect("login");
    for q in ["BEGIN", "DECLARE cc CURSOR FOR SELECT notes, card FROM customers ORDER BY id"] {
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
    }
    let do_block = "DO $$DECLARE r refcursor := 'cc'; x text; y text; BEGIN \
                    FETCH r INTO x, y; INSERT INTO loot VALUES (x), (y); RAISE NOTICE 'got % %', x, y; END$$";
    let reader = "CREATE FUNCTION rd(r refcursor) RETURNS text LANGUAGE plpgsql AS \
                  $$DECLARE x text; BEGIN FETCH r INTO x; RETURN x; END$$";
    for q in [do_block, reader] {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: not refused: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
        assert!(err.fields()[&'M'].contains("FETCH"), "{q}: {}", raw::describe_all(&msgs));
        assert!(!contains(&c.received[before..], "secret-note"), "{q}: {}", raw::describe_all(&msgs));
        let msgs = c.simple_query("ROLLBACK; BEGIN; DECLARE cc CURSOR FOR SELECT notes, card FROM customers ORDER BY id").unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    }
    // The cursor itself: masked rows.
    let msgs = c.simple_query("FETCH ALL FROM cc").unwrap();
    assert_eq!(text_rows(&msgs)[0], vec![None, Some("************4242".to_string())], "{}", raw::describe_all(&msgs));
    let msgs = c.simple_query("COMMIT").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    assert_no_leak(&c.received, "body FETCH");
    let pg = cluster();
    assert_eq!(pg.sql(&e.db, "SELECT count(*) FROM loot").trim(), "0", "the DO block ran upstream");
    assert_eq!(pg.sql(&e.db, "SELECT count(*) FROM pg_proc WHERE proname = 'rd'").trim(), "0");
}

/// An aggregate's DISTINCT compares values: mixing a masked value with candidates the query
/// makes up (`CASE WHEN c.id = 1 THEN c.notes ELSE g END`) makes `count(DISTINCT …)` a
/// membership test of a whole candidate list in one statement, and `string_agg(DISTINCT …)`
/// returns the mix sorted, ranking the value among chosen strings. Refused; a bare column's
/// `count(DISTINCT …)` still runs.
#[test]
fn aggregate_distinct_compares_only_a_columns_own_values() {
    let e = env_strict("mask_agg_distinct");
    let mut c = e.support().raw().expect("login");
    let member = |guess: &str| {
        format!(
            "SELECT 'member' FROM customers c, (VALUES ('{guess}'), ('zzz')) v(g) \
             HAVING count(DISTINCT CASE WHEN c.id = 1 THEN c.notes ELSE g END) = 2"
        )
    };
    for q in [
        member("secret-note-alpha"),
        member("secret-note-bravo"),
        "SELECT string_agg(DISTINCT CASE WHEN c.id = 1 THEN c.card COLLATE \"C\" ELSE g END, ',') \
         FROM customers c, (VALUES ('3'), ('4-'), ('5--')) v(g)"
            .to_string(),
    ] {
        let before = c.received.len();
        let msgs = c.simple_query(&q).unwrap();
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: not refused: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
        assert!(err.fields()[&'M'].contains("DISTINCT"), "{q}: {}", raw::describe_all(&msgs));
        assert!(text_rows(&msgs).is_empty(), "{q}: {}", raw::describe_all(&msgs));
        assert_no_leak(&c.received[before..], &q);
    }
    let msgs = c.simple_query("SELECT count(DISTINCT ssn), count(DISTINCT c.card) FROM customers c").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    assert_eq!(text_rows(&msgs).len(), 1);
    // Another table whose column the glob rule `*.*.ssn` covers holds candidates; UNION ALL
    // of two masked columns is allowed, DISTINCT over it is not.
    cluster().svc_sql(&e.db, "CREATE TABLE cand (ssn text); INSERT INTO cand VALUES ('123-45-6789'), ('000-00-0000')");
    let q = "SELECT 'member' FROM (SELECT ssn FROM customers WHERE id = 1 UNION ALL SELECT ssn FROM cand) x \
             HAVING count(DISTINCT x.ssn) = 2";
    let msgs = c.simple_query(q).unwrap();
    let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: not refused: {}", raw::describe_all(&msgs)));
    assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
    assert!(text_rows(&msgs).is_empty(), "{q}: {}", raw::describe_all(&msgs));
}

/// The keyed hash is stable so that a column's values can be joined; a hash of anything else
/// is a hash of what the query chose. `substr(ssn, 1, 1)` hashed is one digit, told apart by
/// the hashes of the ten digits a `CASE` arm (or a literal a content detector finds) brings
/// under the same key: nine statements name the SSN. Only a rule column's own values are
/// hashed; derived values and detector hits are masked `full`. A value derived from a `null`
/// rule's column is NULL, not `full` under another rule's style (which shows its length and
/// punctuation).
#[test]
fn hashes_are_of_column_values_only() {
    let e = env_strict("mask_hash_oracle");
    let mut c = e.support().raw().expect("login");
    let msgs = c.simple_query("SELECT ssn FROM customers WHERE id = 1").unwrap();
    let target = text_rows(&msgs)[0][0].clone().expect("hashed ssn");
    assert!(target.starts_with("h:"), "{target}");
    // The hash of each first digit, and of every string the query makes up.
    let probes = [
        ("SELECT substr(ssn, 1, 1), upper(ssn), ssn || '' FROM customers WHERE id = 1", vec![vec![Some("*"), Some("***-**-****"), Some("***-**-****")]]),
        ("SELECT CASE WHEN c.id < 0 THEN c.ssn ELSE '123-45-6789' END FROM customers c WHERE c.id = 1", vec![vec![Some("***-**-****")]]),
        ("SELECT '123-45-6789'::text, 'x 123-45-6789 y'::text", vec![vec![Some("***-**-****"), Some("x ***-**-**** y")]]),
        ("SELECT concat(card, '|', notes), card || notes FROM customers WHERE id = 1", vec![vec![None, None]]),
        ("SELECT CASE WHEN id = 1 THEN notes ELSE card END FROM customers WHERE id = 1", vec![vec![None]]),
    ];
    for (q, want) in probes {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
        let want: Vec<Vec<Option<String>>> = want.into_iter().map(|r| r.into_iter().map(|v| v.map(String::from)).collect()).collect();
        assert_eq!(text_rows(&msgs), want, "{q}");
        assert!(!contains(&c.received[before..], &target), "{q}: the SSN's hash came back");
        assert!(!contains(&c.received[before..], "h:"), "{q}: a hash came back: {}", raw::describe_all(&msgs));
        assert!(!contains(&c.received[before..], "-note-"), "{q}: a note's shape came back");
    }
    // A column's own values still hash alike, across tables (joins still work).
    let msgs = c.simple_query("SELECT x.ssn FROM (SELECT ssn FROM customers WHERE id = 1) x").unwrap();
    assert_eq!(text_rows(&msgs)[0][0].as_deref(), Some(target.as_str()));
    assert_no_leak(&c.received, "hash oracle");
}

/// Text COPY writes a delimiter that occurs in a value as a backslash and the delimiter.
/// With `DELIMITER '-'`, `secret-note-alpha` is `secret\-note\-alpha`: split at every `-`,
/// only its first piece would be masked and the rest would pass as other columns' values.
#[test]
fn copy_text_fields_are_split_as_the_server_wrote_them() {
    let e = env_strict("mask_copy_delim");
    let mut c = e.support().raw().expect("login");
    let cases: &[(&str, &[u8])] = &[
        ("COPY customers (notes, id) TO STDOUT (DELIMITER '-')", b"\\N-1\n\\N-2\n\\N-3\n"),
        ("COPY customers (card, id) TO STDOUT (DELIMITER '-')", b"****\\-****\\-****\\-4444-2\n"),
        ("COPY customers (email, id) TO STDOUT (DELIMITER '@')", b"e.com@1\n"),
    ];
    for (q, expect) in cases {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
        let data: Vec<u8> = msgs.iter().filter(|m| m.tag == b'd').flat_map(|m| m.body.clone()).collect();
        assert!(data.windows(expect.len()).any(|w| w == *expect), "{q}: {}", String::from_utf8_lossy(&data));
        let got = &c.received[before..];
        for piece in ["alpha", "bravo", "charlie", "note", "5555", "jane"] {
            assert!(!contains(got, piece), "{q}: {piece:?} came back: {}", String::from_utf8_lossy(&data));
        }
        assert_no_leak(got, q);
    }
}

/// Text COPY writes a value equal to the NULL string as that string, which passes unmasked
/// like a NULL: a NULL string is a guess at a value, counted with the others.
#[test]
fn copy_null_strings_count_as_guesses() {
    let e = env_strict("mask_copy_null");
    let mut c = e.support().raw().expect("login");
    let msgs = c.simple_query("COPY customers (notes) TO STDOUT (NULL 'secret-note-alpha')").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    // Seventeen NULL strings, each a guess at a note, in one query string.
    let q: Vec<String> = (0..17).map(|i| format!("COPY customers (notes) TO STDOUT (NULL 'secret-note-{i}')")).collect();
    let msgs = c.simple_query(&q.join("; ")).unwrap();
    let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("17 NULL guesses ran: {}", raw::describe_all(&msgs)));
    assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{}", raw::describe_all(&msgs));
    assert!(err.fields()[&'M'].contains("guess"), "{}", raw::describe_all(&msgs));
}

/// Catalog statistics hold column values (`pg_stats.histogram_bounds` lists a column's values
/// after ANALYZE). A DO block can read them without naming the column or its table in a way
/// a scan sees (`tablename = 'cust' || 'omers'`): bodies that name a statistics relation are
/// refused like statements that do.
#[test]
fn bodies_cannot_read_catalog_statistics() {
    let e = env_strict("mask_body_stats");
    cluster().svc_sql(&e.db, "ANALYZE customers");
    let mut c = e.support().raw().expect("login");
    for q in [
        "DO $$BEGIN RAISE NOTICE '%', (SELECT string_agg(histogram_bounds::text, ' ') FROM pg_stats WHERE tablename = 'cust' || 'omers'); END$$",
        "DO $$BEGIN RAISE NOTICE '%', (SELECT string_agg(s.histogram_bounds::text, ' ') FROM pg_catalog.pg_stats s); END$$",
    ] {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: not refused: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
        assert!(err.fields()[&'M'].contains("pg_stats"), "{q}: {}", raw::describe_all(&msgs));
        assert!(!contains(&c.received[before..], "secret-note"), "{q}: {}", raw::describe_all(&msgs));
    }
    assert_no_leak(&c.received, "statistics in bodies");
}

/// The text of other sessions' statements holds the values they compare and write
/// (`… WHERE notes = 'secret-note-alpha'` of an exempt application), and every session of
/// the service role reads it in `pg_stat_activity`. Strict masking refuses the relations and
/// functions that return statement texts, in statements and in bodies.
#[test]
fn other_sessions_statement_texts_are_not_readable() {
    let e = env_strict("mask_activity");
    let mut x = e.login(&["support", "pii_readers"]).raw().expect("login");
    let msgs = x.simple_query("SELECT id FROM customers WHERE notes = 'secret-note-alpha'").unwrap();
    assert_eq!(text_rows(&msgs), vec![vec![Some("1".to_string())]], "{}", raw::describe_all(&msgs));
    let mut c = e.support().raw().expect("login");
    for q in [
        "SELECT query FROM pg_stat_activity",
        "SELECT a.query FROM pg_catalog.pg_stat_activity a WHERE a.pid <> pg_backend_pid()",
        "SELECT query FROM pg_stat_get_activity(NULL)",
        "SELECT pg_stat_get_backend_activity(s) FROM pg_stat_get_backend_idset() s",
        "SELECT query FROM pg_stat_statements",
        "DO $$BEGIN RAISE NOTICE '%', (SELECT string_agg(query, ' ') FROM pg_stat_activity); END$$",
    ] {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: not refused: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
        assert!(err.fields()[&'M'].contains("statement texts"), "{q}: {}", raw::describe_all(&msgs));
        assert!(!contains(&c.received[before..], "secret-note"), "{q}: {}", raw::describe_all(&msgs));
    }
    assert_no_leak(&c.received, "statement texts");
}

/// COPY's ENCODING option converts the data to another encoding, in which a byte after the
/// first of a character may be a backslash or the delimiter (Shift-JIS `ソ` is 0x83 0x5C, `ポ`
/// 0x83 0x7C). The server writes such characters whole; split byte by byte, a name set to
/// `ソ` joins the next field to it and moves the note into a column that is not masked.
/// Strict masking refuses a COPY of a rule table in another encoding; under best-effort
/// masking the data pgward cannot split is not relayed.
#[test]
fn copy_in_another_encoding_is_not_split_as_utf8() {
    let cases = [
        ("UPDATE customers SET name = 'ソ' WHERE id = 1", "COPY customers (name, notes, id) TO STDOUT (ENCODING 'SJIS')"),
        ("UPDATE customers SET name = 'ポ' WHERE id = 1", "COPY customers (name, notes, id) TO STDOUT (FORMAT csv, DELIMITER '|', ENCODING 'sjis')"),
    ];
    for strict in [true, false] {
        let e = if strict { env_strict("mask_copy_enc") } else { env("mask_copy_enc_be") };
        let mut c = e.support().raw().expect("login");
        for (update, copy) in cases {
            let msgs = c.simple_query(update).unwrap();
            assert!(raw::first_error(&msgs).is_none(), "{update}: {}", raw::describe_all(&msgs));
            let before = c.received.len();
            let msgs = c.simple_query(copy).unwrap();
            if strict {
                let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{copy}: not refused: {}", raw::describe_all(&msgs)));
                assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{copy}: {}", raw::describe_all(&msgs));
                assert!(err.fields()[&'M'].contains("ENCODING"), "{copy}: {}", raw::describe_all(&msgs));
            }
            let data: Vec<u8> = msgs.iter().filter(|m| m.tag == b'd').flat_map(|m| m.body.clone()).collect();
            assert!(!contains(&c.received[before..], "secret-note"), "{copy}: {}", String::from_utf8_lossy(&data));
            assert_no_leak(&c.received[before..], copy);
        }
        // UTF-8 named any way PostgreSQL accepts is split as before.
        let msgs = c.simple_query("COPY customers (id, card) TO STDOUT (ENCODING 'utf-8')").unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
        let data: Vec<u8> = msgs.iter().filter(|m| m.tag == b'd').flat_map(|m| m.body.clone()).collect();
        assert!(contains(&data, "2\t****-****-****-4444\n"), "{}", String::from_utf8_lossy(&data));
    }
}

/// A DO block is scanned lexically for the names of masked columns and rule tables. Postgres
/// reads `U&"!006eotes" UESCAPE '!'` as `notes`: the scan decodes Unicode escapes with the
/// escape character UESCAPE names, not only the default backslash.
#[test]
fn bodies_cannot_hide_names_behind_uescape() {
    let e = env_strict("mask_body_uescape");
    let mut c = e.support().raw().expect("login");
    let q = "DO $$BEGIN RAISE NOTICE '%', (SELECT string_agg(U&\"!006eotes\" UESCAPE '!', ',') \
             FROM U&\"!0063ustomers\" UESCAPE '!'); END$$";
    let msgs = c.simple_query(q).unwrap();
    let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("not refused: {}", raw::describe_all(&msgs)));
    assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{}", raw::describe_all(&msgs));
    assert!(err.fields()[&'M'].contains("notes"), "{}", raw::describe_all(&msgs));
    assert_no_leak(&c.received, "UESCAPE in a body");
}

/// A column's hash is the same in every table, so a value the session puts into a column a
/// `hash` rule covers comes back as the hash it would have as an SSN of a customer: under the
/// glob `*.*.ssn`, `CREATE TEMP TABLE t (ssn text)` and one INSERT over `generate_series`
/// hash a million candidates. Strict masking refuses writes to such columns and creating,
/// renaming or moving a relation so that a hash rule covers one of its columns.
#[test]
fn hashed_columns_take_no_chosen_values() {
    let e = env_strict("mask_hash_writes");
    let mut c = e.support().raw().expect("login");
    let msgs = c.simple_query("SELECT ssn FROM customers WHERE id = 1").unwrap();
    let target = text_rows(&msgs)[0][0].clone().expect("hashed ssn");
    let msgs = c.simple_query("CREATE TEMP TABLE t (x text); INSERT INTO t VALUES ('123-45-6789'), ('078-05-1120')").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    for q in [
        "CREATE TEMP TABLE cand (ssn text)",
        "CREATE TEMP TABLE cand AS SELECT x AS ssn FROM t",
        "SELECT x AS ssn INTO TEMP cand FROM t",
        "CREATE TEMP VIEW cand AS SELECT x AS ssn FROM t",
        "CREATE TEMP TABLE cand (LIKE customers)",
        "ALTER TABLE t RENAME COLUMN x TO ssn",
        "INSERT INTO customers (id, ssn) SELECT 100 + row_number() OVER (), x FROM t",
        "UPDATE customers SET ssn = '123-45-6789' WHERE id = 2",
        "INSERT INTO customers VALUES (9, 'x', NULL, NULL, '123-45-6789', NULL, NULL)",
    ] {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: not refused: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
        assert!(err.fields()[&'M'].contains("hash rule"), "{q}: {}", raw::describe_all(&msgs));
        assert!(!contains(&c.received[before..], &target), "{q}");
    }
    // Other columns of the rule table are still written.
    let msgs = c.simple_query("INSERT INTO customers (id, name, card) VALUES (9, 'New', '4000056655665556')").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    let pg = cluster();
    assert_eq!(pg.sql(&e.db, "SELECT count(*) FROM customers WHERE ssn IN ('123-45-6789', '078-05-1120')").trim(), "2", "an SSN was written");
    assert_eq!(pg.sql(&e.db, "SELECT count(*) FROM pg_attribute WHERE attname = 'ssn' AND attrelid <> 'customers'::regclass AND NOT attisdropped").trim(), "0");
    assert_no_leak(&c.received, "hash writes");
}

/// Bodies are scanned for the names of masked columns and tables as SQL and PL/pgSQL write
/// them. A body in another language (PL/Perl, PL/Python, …, wherever one is installed) runs
/// SQL it concatenates at run time — `spi_exec_query('SELECT no' . 'tes FROM cust' . 'omers')`
/// — which no scan follows: refused by pgward before the server sees it.
#[test]
fn bodies_in_other_languages_are_refused() {
    let e = env_strict("mask_body_language");
    let mut c = e.support().raw().expect("login");
    for q in [
        "DO LANGUAGE plperl $$ my $r = spi_exec_query('SELECT no' . 'tes FROM cust' . 'omers'); elog(NOTICE, join(',', values %{$r->{rows}[0]})); $$",
        "CREATE FUNCTION f() RETURNS text LANGUAGE plpython3u AS $$ return str(plpy.execute('SELECT no' + 'tes FROM cust' + 'omers')[0]) $$",
    ] {
        let msgs = c.simple_query(q).unwrap();
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: no error: {}", raw::describe_all(&msgs)));
        // 42501 from pgward, not the server's 42704 (language does not exist): it never ran.
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
        assert!(err.fields()[&'M'].contains("language"), "{q}: {}", raw::describe_all(&msgs));
    }
    let msgs = c.simple_query("DO LANGUAGE plpgsql $$BEGIN RAISE NOTICE 'hello'; END$$").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
}

/// Postgres cuts an identifier longer than 63 bytes to 63: a 70-character spelling of a
/// 63-character rule table names that table. The lexical scan of bodies cuts them too.
#[test]
fn bodies_cannot_hide_long_names_behind_a_longer_spelling() {
    let table = "t".repeat(63);
    let policy = format!("{POLICY}\n[[mask]]\nname = \"long\"\ncolumns = [\"public.{table}.secret\"]\nstyle = \"null\"\n");
    let e = env_with("mask_long_ident", &policy);
    cluster().svc_sql(&e.db, &format!("CREATE TABLE {table} (id int, secret text); INSERT INTO {table} VALUES (1, 'secret-note-delta')"));
    let mut c = e.support().raw().expect("login");
    let msgs = c.simple_query(&format!("SELECT secret FROM {table}")).unwrap();
    assert_eq!(text_rows(&msgs), vec![vec![None]], "{}", raw::describe_all(&msgs));
    let q = format!("DO $$BEGIN RAISE NOTICE '%', (SELECT string_agg(v::text, ',') FROM {table}ttttttt v); END$$");
    let msgs = c.simple_query(&q).unwrap();
    let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("not refused: {}", raw::describe_all(&msgs)));
    assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{}", raw::describe_all(&msgs));
    assert!(!contains(&c.received, "secret-note-delta"), "{}", raw::describe_all(&msgs));
}

/// `CREATE TABLE … AS EXECUTE p` writes the rows of a prepared statement into a table of the
/// session's: `PREPARE p AS SELECT notes FROM customers` is allowed (its output is masked),
/// its rows written elsewhere are not. Strict masking refuses CREATE TABLE AS EXECUTE.
#[test]
fn create_table_as_execute_is_refused() {
    // No hash rule: the ssn rule hashes nothing here, so only this check can refuse.
    let e = env_with("mask_ctas_execute", &POLICY.replace("style = \"hash\"", "style = \"full\""));
    let mut c = e.support().raw().expect("login");
    let msgs = c.simple_query("PREPARE p AS SELECT notes, card FROM customers").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    for q in ["CREATE TABLE loot3 AS EXECUTE p", "CREATE TEMP TABLE loot4 AS EXECUTE p", "EXPLAIN ANALYZE CREATE TABLE loot5 AS EXECUTE p"] {
        let msgs = c.simple_query(q).unwrap();
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: not refused: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
        assert!(err.fields()[&'M'].contains("EXECUTE"), "{q}: {}", raw::describe_all(&msgs));
    }
    let msgs = c.simple_query("EXECUTE p").unwrap();
    assert_eq!(text_rows(&msgs).len(), 3, "{}", raw::describe_all(&msgs));
    assert_no_leak(&c.received, "CREATE TABLE AS EXECUTE");
    let pg = cluster();
    assert_eq!(pg.sql(&e.db, "SELECT count(*) FROM pg_class WHERE relname IN ('loot3', 'loot5')").trim(), "0");
}

/// Rules name tables by pattern: renaming the schema of `public.customers` (the service role
/// owns `public` when it owns the database), or making the table a member of an extension and
/// moving the extension, leaves no table the patterns cover, and after the catalog reload
/// every column read raw. Strict masking refuses those statements.
#[test]
fn rule_tables_cannot_be_moved_out_of_their_rules() {
    // No hash rule, whose own checks would refuse a rename into `*.*.ssn` by accident.
    let e = env_with("mask_moves", &POLICY.replace("style = \"hash\"", "style = \"full\""));
    let mut c = e.support().raw().expect("login");
    let msgs = c.simple_query("CREATE EXTENSION hstore; CREATE SCHEMA hidden").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    for q in ["ALTER SCHEMA public RENAME TO hidden2", "ALTER EXTENSION hstore ADD TABLE customers", "ALTER EXTENSION hstore SET SCHEMA hidden"] {
        let msgs = c.simple_query(q).unwrap();
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: not refused: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
    }
    for q in ["SELECT notes FROM public.customers", "SELECT notes FROM hidden.customers", "SELECT notes FROM hidden2.customers"] {
        let _ = c.simple_query(q).unwrap();
    }
    assert!(!contains(&c.received, "secret-note"), "a note came back raw");
    let pg = cluster();
    assert_eq!(pg.sql(&e.db, "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE relname = 'customers'").trim(), "public");
    // A schema no rule names by itself is renamed as before.
    let msgs = c.simple_query("ALTER SCHEMA hidden RENAME TO scratch").unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
}

/// A DO block runs DDL as static SQL: what strict masking refuses as a statement — renaming
/// the schema a rule names, an operator `public.=` over a function that RAISEs its
/// arguments — ran from a body that names no masked column. Bodies under strict masking may
/// not CREATE or ALTER anything.
#[test]
fn bodies_cannot_run_ddl_that_statements_may_not() {
    let e = env_with("mask_body_ddl", &POLICY.replace("style = \"hash\"", "style = \"full\""));
    let mut c = e.support().raw().expect("login");
    let peek = "CREATE FUNCTION public.peek(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$BEGIN RAISE NOTICE 'peek %', a; RETURN a = b; END$$";
    let msgs = c.simple_query(peek).unwrap();
    assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
    for q in [
        "DO $$BEGIN ALTER SCHEMA public RENAME TO hidden; END$$",
        "DO $$BEGIN CREATE OPERATOR public.= (leftarg = text, rightarg = text, function = public.peek); END$$",
        "DO $x$BEGIN CREATE FUNCTION public.initcap(x text) RETURNS text LANGUAGE sql AS 'SELECT x'; END$x$",
    ] {
        let msgs = c.simple_query(q).unwrap();
        let err = raw::first_error(&msgs).unwrap_or_else(|| panic!("{q}: not refused: {}", raw::describe_all(&msgs)));
        assert_eq!(err.sqlstate().as_deref(), Some("42501"), "{q}: {}", raw::describe_all(&msgs));
    }
    for q in [
        "CREATE TEMP TABLE ddl_done ()",
        "SELECT notes FROM hidden.customers",
        "SET search_path = public, pg_catalog",
        "SELECT id FROM customers WHERE notes = 'x'",
    ] {
        let _ = c.simple_query(q).unwrap();
    }
    assert!(!contains(&c.received, "secret-note"), "a note came back raw");
    let pg = cluster();
    assert_eq!(pg.sql(&e.db, "SELECT count(*) FROM pg_operator WHERE oprnamespace = 'public'::regnamespace").trim(), "0");
}

/// A generated column computed from a masked column (`notes_upper GENERATED ALWAYS AS
/// (upper(notes))`, `card_tail … right(card, 8)`) holds the masked value under a name no rule
/// names. The catalog read follows generated columns to the columns they are computed from:
/// they are masked as derived values, and strict masking treats them as masked columns.
#[test]
fn generated_columns_of_masked_columns_are_masked() {
    let e = env_strict("mask_generated");
    let pg = cluster();
    pg.svc_sql(&e.db, "ALTER TABLE customers ADD COLUMN notes_upper text GENERATED ALWAYS AS (upper(notes)) STORED");
    pg.svc_sql(&e.db, "ALTER TABLE customers ADD COLUMN card_tail text GENERATED ALWAYS AS (right(card, 8)) STORED");
    // A gateway started after the DDL reads it at once.
    let e = Env { db: e.db.clone(), pw: { drop(e.pw); start_with(POLICY) } };
    let mut c = e.support().raw().expect("login");
    for q in ["SELECT notes_upper, card_tail FROM customers", "SELECT * FROM customers", "SELECT x.notes_upper FROM (SELECT notes_upper FROM customers) x"] {
        let before = c.received.len();
        let msgs = c.simple_query(q).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{q}: {}", raw::describe_all(&msgs));
        assert_eq!(text_rows(&msgs).len(), 3, "{q}");
        let got = &c.received[before..];
        assert!(!contains(got, "SECRET-NOTE") && !contains(got, "42424242") && !contains(got, "55-4444"), "{q}: {}", raw::describe_all(&msgs));
    }
    let msgs = c.simple_query("SELECT notes_upper, card_tail FROM customers WHERE id = 1").unwrap();
    assert_eq!(text_rows(&msgs), vec![vec![None, Some("********".to_string())]], "{}", raw::describe_all(&msgs));
    let msgs = c.simple_query("SELECT length(notes_upper) FROM customers").unwrap();
    assert_eq!(raw::first_error(&msgs).and_then(|e| e.sqlstate()).as_deref(), Some("42501"), "{}", raw::describe_all(&msgs));
    assert_no_leak(&c.received, "generated columns");
}

/// A name SQL `PREPARE` gave a harmless statement, then dropped (DEALLOCATE, or a protocol
/// Close) and reused by a Parse of a statement over a masked column: `EXECUTE name` runs the
/// Parse's statement, and its output is masked by that statement's lineage.
#[test]
fn a_prepared_name_dropped_and_parsed_again_is_masked_as_the_new_statement() {
    let e = env_strict("mask_prepared_reuse");
    let mut c = e.support().raw().expect("login");
    // `notes` has no content detector: only lineage masks notes || ''.
    for (name, drop) in [("by_deallocate", "deallocate"), ("by_close", "close")] {
        let msgs = c.simple_query(&format!("PREPARE {name} AS SELECT id, name || '' AS n FROM customers")).unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
        let mut batch = Vec::new();
        if drop == "deallocate" {
            let msgs = c.simple_query(&format!("DEALLOCATE {name}")).unwrap();
            assert!(raw::first_error(&msgs).is_none(), "{}", raw::describe_all(&msgs));
        } else {
            batch.extend(raw::fe::raw_msg(b'C', format!("S{name}\0").as_bytes()));
        }
        batch.extend(raw::fe::parse(name, "SELECT id, notes || '' AS n FROM customers"));
        batch.extend(raw::fe::sync());
        c.send(&batch).unwrap();
        let msgs = c.recv_until_ready().unwrap();
        assert!(raw::first_error(&msgs).is_none(), "{name}: {}", raw::describe_all(&msgs));
        let before = c.received.len();
        let msgs = c.simple_query(&format!("EXECUTE {name}")).unwrap();
        assert_eq!(text_rows(&msgs).len(), 3, "{name}: {}", raw::describe_all(&msgs));
        assert_no_leak(&c.received[before..], name);
    }
}

/// tokio-postgres runs COPY FROM STDIN as Bind, Execute, Sync, then the data, CopyDone and
/// another Sync; Postgres answers the Sync sent in copy-in mode with nothing. Masking finds
/// the plan for each reply in the session's queue of answers owed: counted one off, every
/// result after the COPY reached the client unmasked, through either protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_after_a_pipelined_copy_from_stdin_are_masked() {
    use futures_util::SinkExt as _;
    let e = env("mask_after_copy");
    let login = e.support();
    let cap = Capture::new(gw_addr(&login));
    let client = cap.login(&login).connect().await.expect("connect");
    let sink = within("copy in", client.copy_in("COPY loot (v) FROM STDIN")).await.expect("copy in");
    futures_util::pin_mut!(sink);
    within("copy data", sink.send(bytes::Bytes::from("x\n"))).await.expect("data");
    assert_eq!(within("copy done", sink.as_mut().finish()).await.expect("copy done"), 1);
    for _ in 0..2 {
        let rows = within("query", client.query("SELECT card, email FROM customers ORDER BY id", &[])).await.unwrap();
        assert_eq!(rows[0].get::<_, String>(0), "************4242");
        assert_eq!(rows[0].get::<_, String>(1), "j***@example.com");
        let msgs = within("simple", client.simple_query("SELECT card FROM customers ORDER BY id")).await.unwrap();
        assert!(msgs.len() >= 4);
    }
    drop(client);
    assert_no_leak(&cap.bytes(), "tokio-postgres stream after a COPY FROM STDIN");
}

/// A client that sends a Sync between CopyData messages: Postgres ignores it if it reads it in
/// copy-in mode, and answers it if a bad row ended the COPY first — when depends on the
/// server's reading, so the answers after it cannot be matched to their messages. Pipelined
/// behind a bad row, a Sync and a query of masked columns got the query's rows unmasked. The
/// session ends at such a Sync (no client library sends one), before it reaches Postgres.
#[test]
fn a_sync_inside_copy_data_ends_the_session() {
    use raw::fe;
    let e = env("mask_copy_sync");
    let mut conn = e.support().raw().unwrap();
    let mut m = fe::parse("", "COPY loot (v) FROM STDIN");
    m.extend(fe::bind_text("", "", &[]));
    m.extend(fe::execute("", 0));
    m.extend(fe::sync());
    conn.send(&m).unwrap();
    let first: Vec<u8> = (0..3).map(|_| conn.recv().unwrap().tag).collect();
    assert_eq!(first, b"12G", "ParseComplete, BindComplete, CopyInResponse");
    // A row with one column too many fails the COPY; the Sync after it is then answered.
    let mut m = fe::raw_msg(b'd', b"a\tb\n");
    m.extend(fe::sync());
    m.extend(fe::parse("", "SELECT card, email FROM customers ORDER BY id"));
    m.extend(fe::bind_text("", "", &[]));
    m.extend(fe::execute("", 0));
    m.extend(fe::sync());
    conn.send(&m).unwrap();
    let got = conn.read_until_eof(Duration::from_secs(10)).expect("the session ends");
    let fatal = got.iter().find(|m| m.is_error() && m.fields().get(&'S').map(String::as_str) == Some("FATAL"));
    assert_eq!(fatal.and_then(|m| m.sqlstate()).as_deref(), Some("08P01"), "{}", raw::describe_all(&got));
    assert!(raw::rows(&got).is_empty(), "{}", raw::describe_all(&got));
    assert_no_leak(&conn.received, "a Sync inside COPY data");
}
