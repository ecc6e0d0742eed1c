//! Prometheus metrics on a loopback port: counters follow what the audit log records (logins,
//! statements, policy denials, errors), and the audit fsync latency histogram fills.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Pgward, cluster};

fn get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of a sample line `name value`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

#[test]
fn metrics_count_logins_statements_denials_and_fsyncs() {
    let db = cluster().create_database("metrics");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let pw = Pgward::builder().set("server.metrics_listen", format!("127.0.0.1:{port}")).start();
    let token = pw.token("carol", &[], "15m");
    let login = pw.login("carol", &token, &db);
    assert_eq!(login.psql(&["-c", "select 1"]).code, Some(0));
    // Denied by the default policy's no-server-functions rule (carol is not a pgward_admin).
    let denied = login.psql(&["-c", "select pg_read_file('/etc/hostname')"]);
    assert_ne!(denied.code, Some(0));
    assert!(denied.sqlstates().contains(&"42501".to_string()), "{}", denied.describe());
    let failed = login.psql(&["-c", "select 1/0"]);
    assert_ne!(failed.code, Some(0));

    // Records are counted once durable; results ride along within ~100 ms.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let resp = get(port, "/metrics");
        assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
        let ok = sample(&resp, "pgward_statements_total").is_some_and(|v| v >= 3.0)
            && sample(&resp, "pgward_statement_errors_total").is_some_and(|v| v >= 1.0);
        if ok || Instant::now() > deadline {
            break resp;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(sample(&text, "pgward_logins_total").is_some_and(|v| v >= 3.0), "{text}");
    assert!(sample(&text, "pgward_statements_total").is_some_and(|v| v >= 3.0), "{text}");
    assert_eq!(sample(&text, "pgward_statements_denied_total"), Some(1.0), "{text}");
    assert!(sample(&text, "pgward_statement_errors_total").is_some_and(|v| v >= 1.0), "{text}");
    assert!(sample(&text, "pgward_audit_fsync_seconds_count").is_some_and(|v| v >= 1.0), "{text}");
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");

    let other = get(port, "/");
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
}
