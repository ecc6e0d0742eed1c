//! Parameters as values: tokio-postgres binds its parameters in binary, and the statement
//! record shows each one as Postgres prints it (checked against the server's own output for
//! the same value); a type pgward does not print is recorded as hex with its type OID, a
//! value whose type nobody told pgward (Parse without types, no Describe) as hex with OID 0,
//! and a long value as a prefix, its length and the SHA-256 the server computes for it.
//! `audit replay` shows them and `audit verify` passes.

mod common;

use std::error::Error;

use bytes::BytesMut;
use chrono::{NaiveDate, TimeZone, Utc};
use common::gateway::rec;
use common::raw::fe;
use common::{Pgward, cluster, marker, within};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// A binary value given as its bytes, for types tokio-postgres has no Rust type for
/// (numeric, interval, point, int4range).
#[derive(Debug)]
struct Binary(&'static str);

impl ToSql for Binary {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.extend_from_slice(&hex::decode(self.0)?);
        Ok(IsNull::No)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    to_sql_checked!();
}

/// One bound parameter: its SQL type, the value tokio-postgres binds, and what the record
/// must show.
struct Case {
    ty: &'static str,
    value: Box<dyn ToSql + Sync + Send>,
    recorded: Value,
}

fn case(
    ty: &'static str,
    value: impl ToSql + Sync + Send + 'static,
    recorded: impl Into<Value>,
) -> Case {
    Case {
        ty,
        value: Box::new(value),
        recorded: recorded.into(),
    }
}

/// `'text'` as an SQL literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn cases() -> Vec<Case> {
    let ts = NaiveDate::from_ymd_opt(1999, 12, 31)
        .unwrap()
        .and_hms_milli_opt(23, 59, 59, 500)
        .unwrap();
    let tstz = Utc.with_ymd_and_hms(1969, 7, 20, 20, 17, 40).unwrap();
    let uuid = uuid::Uuid::parse_str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap();
    vec![
        case("bool", true, "t"),
        case("int2", i16::MIN, "-32768"),
        case("int4", 4100i32, "4100"),
        case("int8", i64::MIN, "-9223372036854775808"),
        case("float4", 1.5f32, "1.5"),
        case("float4", 1_234_567f32, "1.234567e+06"),
        case("float8", 0.1f64, "0.1"),
        case("float8", 1e15f64, "1e+15"),
        case("float8", f64::NEG_INFINITY, "-Infinity"),
        // numeric -12.50 and 0.001 (ndigits, weight, sign, dscale, base-10000 digits)
        case("numeric", Binary("0002000040000002000c1388"), "-12.50"),
        case("numeric", Binary("0001ffff00000003000a"), "0.001"),
        case("text", "héllo \"w\" it's", "héllo \"w\" it's"),
        case("varchar", "x", "x"),
        case("bpchar", "ab  ", "ab  "),
        case("name", "relname", "relname"),
        case("bytea", vec![0u8, 0xff, 0x10], "\\x00ff10"),
        case("uuid", uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        case(
            "date",
            NaiveDate::from_ymd_opt(2024, 2, 29).unwrap(),
            "2024-02-29",
        ),
        case(
            "time",
            chrono::NaiveTime::from_hms_milli_opt(13, 5, 0, 250).unwrap(),
            "13:05:00.25",
        ),
        case("timestamp", ts, "1999-12-31 23:59:59.5"),
        case("timestamptz", tstz, "1969-07-20 20:17:40+00"),
        // interval 1 year 2 mons 3 days 04:05:06.5 (µs, days, months)
        case(
            "interval",
            Binary("000000036c9361a0000000030000000e"),
            "1 year 2 mons 3 days 04:05:06.5",
        ),
        case("json", json!({"b": [1, "x"]}), r#"{"b":[1,"x"]}"#),
        // jsonb: the JSON text as sent (Postgres prints it normalized, `{"b": [1, "x"]}`).
        case("jsonb", json!({"b": [1, "x"]}), r#"{"b":[1,"x"]}"#),
        case("int4[]", vec![Some(1i32), None, Some(3)], "{1,NULL,3}"),
        case(
            "text[]",
            vec!["x y", "", "NULL", "a\"b", "c\\d", "plain"],
            r#"{"x y","","NULL","a\"b","c\\d",plain}"#,
        ),
        case("bytea[]", vec![vec![0u8]], r#"{"\\x00"}"#),
        case("timestamptz[]", vec![tstz], r#"{"1969-07-20 20:17:40+00"}"#),
        case("float8[]", vec![1e20f64, 0.5], "{1e+20,0.5}"),
        case(
            "uuid[]",
            vec![uuid],
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
        ),
        // Types pgward does not print: hex with the type's OID.
        case(
            "point",
            Binary("3ff00000000000004000000000000000"),
            json!({"oid": 600, "hex": "\\x3ff00000000000004000000000000000"}),
        ),
        // int4range [1,5): flags (lower bound inclusive), then each bound's length and value.
        case(
            "int4range",
            Binary("0200000004000000010000000400000005"),
            json!({"oid": 3904, "hex": "\\x0200000004000000010000000400000005"}),
        ),
    ]
}

/// Each recorded text is what Postgres prints for the value that was bound: the server's
/// text output of the recorded text read back as the type is that same text (except jsonb,
/// recorded as sent and printed normalized), and the bound value equals it.
async fn postgres_prints_each_value_so(client: &tokio_postgres::Client, cases: &[Case]) {
    for c in cases {
        let Some(text) = c.recorded.as_str() else {
            continue;
        };
        let lit = format!("{}::{}", literal(text), c.ty);
        let rows = within(
            "server's text",
            client.simple_query(&format!("SELECT {lit}")),
        )
        .await
        .unwrap();
        let printed = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        if c.ty != "jsonb" {
            assert_eq!(
                printed.as_deref(),
                Some(text),
                "Postgres prints {lit} differently"
            );
        }
        let same: bool = within(
            "bound value",
            client.query_one(
                &format!("SELECT $1::{}::text = ({lit})::text", c.ty),
                &[&*c.value],
            ),
        )
        .await
        .unwrap()
        .get(0);
        assert!(same, "the bound {} value is not {text:?}", c.ty);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_parameters_are_recorded_as_postgres_prints_them() {
    let c = cluster();
    let db = c.create_database("audit_params");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let m = marker("audit-params");
    let m_long = marker("audit-params-long");
    let cases = cases();
    let long_text: String = "pgward ünïcode ".repeat(400);
    let long_bytes: Vec<u8> = (0..6000u32).map(|i| (i * 7) as u8).collect();
    let (server_text_sha, server_bytea_sha, server_bytea_len): (String, String, i32);
    {
        let client = pw.login("alice", &token, &db).connect().await.unwrap();
        client.batch_execute("SET TimeZone = 'UTC'").await.unwrap();
        let list: Vec<String> = cases
            .iter()
            .enumerate()
            .map(|(i, c)| format!("${}::{}", i + 1, c.ty))
            .collect();
        let sql = format!("SELECT {} -- {m}", list.join(", "));
        let params: Vec<&(dyn ToSql + Sync)> = cases
            .iter()
            .map(|c| &*c.value as &(dyn ToSql + Sync))
            .collect();
        let n = within("all the types", client.execute(&sql, &params))
            .await
            .unwrap();
        assert_eq!(n, 1);
        postgres_prints_each_value_so(&client, &cases).await;

        (server_text_sha, server_bytea_sha, server_bytea_len) = server_sha256(&client, &m_long, &long_text, &long_bytes).await;
    }

    let recs = pw.wait_audit("the statements with parameters", |r| {
        !rec::statements_with(r, &m).is_empty() && !rec::statements_with(r, &m_long).is_empty()
    });
    let st = rec::statements_with(&recs, &m)
        .into_iter()
        .find(|s| {
            s["sql"]
                .as_str()
                .is_some_and(|q| q.starts_with("SELECT $1"))
        })
        .unwrap();
    let want: Vec<Value> = cases.iter().map(|c| c.recorded.clone()).collect();
    assert_eq!(st["params"], Value::Array(want), "{st}");

    let st = rec::statements_with(&recs, &m_long)[0];
    let hex = format!("\\x{}", hex::encode(&long_bytes));
    long_values_are_prefix_length_and_hash(st, &long_text, &hex);
    assert_eq!(st["params"][0]["sha256"], server_text_sha, "the server's SHA-256 of the text");
    assert_eq!(st["params"][1]["sha256"], server_bytea_sha, "the server's SHA-256 of the bytea's text");
    assert_eq!(st["params"][1]["bytes"], server_bytea_len);

    // replay shows the values; the chain still verifies.
    let session = st["session"].as_str().unwrap();
    let out = pw.audit_replay(session, "max");
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    for shown in ["'4100'", "'1969-07-20 20:17:40+00'", "'\\x3ff00000000000004000000000000000' (oid 600)"] {
        assert!(out.stdout.contains(shown), "replay lacks {shown}: {}", out.stdout);
    }
    assert!(out.stdout.contains(&format!("({} bytes, sha256 {server_bytea_sha})", hex.len())), "{}", out.stdout);
    let (code, out) = pw.audit_verify();
    assert_eq!(code, 0, "{out}");
}

/// The SHA-256 Postgres computes over the long values' text (text; bytea), and the bytea
/// text's length.
async fn server_sha256(client: &tokio_postgres::Client, m_long: &str, long_text: &str, long_bytes: &[u8]) -> (String, String, i32) {
    let row = within(
        "long values",
        client.query_one(
            &format!(
                "SELECT encode(sha256(convert_to($1::text, 'UTF8')), 'hex'), \
                 encode(sha256(convert_to($2::bytea::text, 'UTF8')), 'hex'), \
                 octet_length($2::bytea::text) -- {m_long}"
            ),
            &[&long_text, &long_bytes],
        ),
    )
    .await
    .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// The long text and the long bytea (as `hex`) are recorded as prefix, length and SHA-256.
fn long_values_are_prefix_length_and_hash(st: &Value, long_text: &str, hex: &str) {
    let sha = |s: &[u8]| hex::encode(Sha256::digest(s));
    let text_prefix: String =
        long_text.char_indices().take_while(|(i, c)| i + c.len_utf8() <= 1024).map(|(_, c)| c).collect();
    assert_eq!(
        st["params"],
        json!([
            {"prefix": format!("{text_prefix}…"), "bytes": long_text.len(), "sha256": sha(long_text.as_bytes())},
            {"prefix": format!("{}…", &hex[..1024]), "bytes": hex.len(), "sha256": sha(hex.as_bytes())},
        ]),
        "{st}"
    );
}

/// Parse message declaring `types`.
fn parse_typed(sql: &str, types: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"\0");
    b.extend_from_slice(sql.as_bytes());
    b.push(0);
    b.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        b.extend_from_slice(&t.to_be_bytes());
    }
    fe::raw_msg(b'P', &b)
}

/// Bind of the unnamed statement with one binary parameter.
fn bind_binary(v: &[u8]) -> Vec<u8> {
    let mut b = b"\0\0".to_vec();
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&1i16.to_be_bytes());
    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
    b.extend_from_slice(v);
    b.extend_from_slice(&0i16.to_be_bytes());
    fe::raw_msg(b'B', &b)
}

/// Without a Describe, pgward knows a parameter's type only when the Parse declares it:
/// Parse/Bind/Execute/Sync in one go records a declared int4 as text, an undeclared one as
/// hex with OID 0, and bytes that are no int8 as hex with int8's OID.
#[test]
fn declared_types_without_describe_and_unknown_ones() {
    let c = cluster();
    let db = c.create_database("audit_params_raw");
    let pw = Pgward::start();
    let token = pw.token("alice", &[], "15m");
    let mut conn = pw.login("alice", &token, &db).raw().unwrap();
    let runs = [
        (
            marker("declared"),
            vec![23u32],
            4100i32.to_be_bytes().to_vec(),
            json!("4100"),
            "4101",
        ),
        (
            marker("undeclared"),
            vec![],
            4100i32.to_be_bytes().to_vec(),
            json!({"oid": 0, "hex": "\\x00001004"}),
            "4101",
        ),
    ];
    for (m, types, v, _, sum) in &runs {
        let mut batch = parse_typed(&format!("SELECT $1::int4 + 1 -- {m}"), types);
        batch.extend(bind_binary(v));
        batch.extend(fe::execute("", 0));
        batch.extend(fe::sync());
        conn.send(&batch).unwrap();
        let msgs = conn.recv_until_ready().unwrap();
        assert_eq!(common::raw::rows(&msgs), vec![vec![Some(sum.to_string())]]);
    }
    // Four bytes are no int8: Postgres refuses them (08P01, too short), the record keeps them
    // as hex.
    let m_bad = marker("bad-int8");
    let mut batch = parse_typed(&format!("SELECT $1 -- {m_bad}"), &[20]);
    batch.extend(bind_binary(&4100i32.to_be_bytes()));
    batch.extend(fe::execute("", 0));
    batch.extend(fe::sync());
    conn.send(&batch).unwrap();
    let msgs = conn.recv_until_ready().unwrap();
    assert_eq!(
        common::raw::first_error(&msgs)
            .and_then(|e| e.sqlstate())
            .as_deref(),
        Some("08P01"),
        "{msgs:?}"
    );
    conn.terminate().unwrap();

    let recs = pw.wait_audit("the raw statements", |r| {
        !rec::statements_with(r, &m_bad).is_empty()
    });
    for (m, _, _, recorded, _) in &runs {
        let st = rec::statements_with(&recs, m);
        assert_eq!(st.len(), 1, "{m}");
        assert_eq!(st[0]["params"], json!([recorded]), "{}", st[0]);
    }
    let st = rec::statements_with(&recs, &m_bad);
    assert_eq!(
        st[0]["params"],
        json!([{"oid": 20, "hex": "\\x00001004"}]),
        "{}",
        st[0]
    );
}
