//! Query cancellation through pgward: the client's CancelRequest (sent to pgward's address with
//! the BackendKeyData pgward handed out) must cancel the running statement upstream; requests
//! with keys that belong to no session, or to another session, must change nothing.
//!
//! With PGWARD_E2E_DIRECT=1 these run against Postgres itself (the reference behaviour).

mod common;

use std::time::{Duration, Instant};

use common::raw::{self, fe, send_cancel_request};
use common::{Target, cluster, marker, sqlstate, within};
use tokio_postgres::NoTls;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_pg_sleep_30_within_2_seconds() {
    let t = Target::new("cancel_sleep");
    let client = t.login().connect().await.unwrap();
    let token = client.cancel_token();
    let m = marker("cancel-sleep");
    let sql = format!("select pg_sleep(30) -- {m}");
    let task = tokio::spawn(async move {
        let r = client.simple_query(&sql).await;
        (client, r)
    });
    let m2 = m.clone();
    tokio::task::spawn_blocking(move || cluster().wait_active_query(&m2))
        .await
        .unwrap();

    let start = Instant::now();
    within("cancel_query", token.cancel_query(NoTls))
        .await
        .expect("cancel request delivered");
    let (client, result) = within("cancelled statement", task).await.unwrap();
    let elapsed = start.elapsed();
    let err = result.expect_err("pg_sleep(30) must end with an error when cancelled");
    assert_eq!(sqlstate(&err).as_deref(), Some("57014"), "{err}");
    // The one timing requirement of the issue: cancellation takes effect within 2 s.
    assert!(elapsed < Duration::from_secs(2), "cancel took {elapsed:?}");
    // The statement is gone upstream and the session is usable.
    let m3 = m.clone();
    let active = tokio::task::spawn_blocking(move || cluster().active_queries(&m3))
        .await
        .unwrap();
    assert_eq!(
        active, 0,
        "the cancelled statement is still running in Postgres"
    );
    let one: i32 = within("after cancel", client.query_one("select 1", &[]))
        .await
        .unwrap()
        .get(0);
    assert_eq!(one, 1);
}

#[test]
fn cancel_requests_with_unknown_or_foreign_keys_are_ignored() {
    let t = Target::new("cancel_bogus");
    let c = cluster();
    let login = t.raw_login();
    let mut victim = login.raw().unwrap();
    let other = login.raw().unwrap();
    let (pid, key) = victim.backend_key.expect("BackendKeyData");
    let (other_pid, other_key) = other.backend_key.expect("BackendKeyData");
    assert_ne!(
        (pid, key),
        (other_pid, other_key),
        "two sessions got the same cancel keys"
    );

    // While the victim runs a statement, send CancelRequests that must not touch it.
    let m = marker("cancel-bogus");
    victim
        .send(&fe::query(&format!(
            "select pg_sleep(3), 'survived' -- {m}"
        )))
        .unwrap();
    c.wait_active_query(&m);
    let mut rnd = [0u8; 8];
    getrandom::fill(&mut rnd).unwrap();
    let bogus = [
        (
            "random keys",
            i32::from_be_bytes(rnd[..4].try_into().unwrap()),
            i32::from_be_bytes(rnd[4..].try_into().unwrap()),
        ),
        ("right pid, wrong key", pid, key ^ 0x5a5a_5a5a),
        ("wrong pid, right key", pid.wrapping_add(1), key),
        ("another session's keys", other_pid, other_key),
    ];
    for (what, p, k) in bogus {
        send_cancel_request(&login, p, k).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let msgs = victim.recv_until_ready().unwrap();
    assert!(
        raw::first_error(&msgs).is_none(),
        "a bogus CancelRequest cancelled the statement: {}",
        raw::describe_all(&msgs)
    );
    assert_eq!(
        raw::rows(&msgs),
        vec![vec![Some(String::new()), Some("survived".to_string())]]
    );

    // Control: the victim's own keys do cancel, so the requests above were understood and refused.
    let m = marker("cancel-real");
    victim
        .send(&fe::query(&format!("select pg_sleep(30) -- {m}")))
        .unwrap();
    c.wait_active_query(&m);
    send_cancel_request(&login, pid, key).unwrap();
    let msgs = victim.recv_until_ready().unwrap();
    assert_eq!(
        raw::first_error(&msgs)
            .and_then(|e| e.sqlstate())
            .as_deref(),
        Some("57014"),
        "{}",
        raw::describe_all(&msgs)
    );

    // The other session was never disturbed.
    let mut other = other;
    assert_eq!(
        raw::rows(&other.simple_query("select 'other-ok'").unwrap()),
        vec![vec![Some("other-ok".to_string())]]
    );
}
