//! Audit export for the host's log pipeline: with `audit.export = "syslog"` every durable record
//! also arrives as an RFC 5424 message on the syslog socket, carrying the record exactly as it
//! is in the hash-chained log; with "stdout" as a JSON line on pgward's stdout (journald).

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::{Pgward, cluster, marker};
use serde_json::Value;

#[test]
fn syslog_export_carries_each_record_as_rfc5424() {
    let db = cluster().create_database("export_syslog");
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("log");
    let syslog = UnixDatagram::bind(&sock_path).unwrap();
    syslog.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let pw = Pgward::builder()
        .set("audit.export", "syslog")
        .set("audit.syslog_socket", sock_path.to_str().unwrap())
        .start();
    let token = pw.token("alice", &["analysts"], "15m");
    let m = marker("exported");
    let out = pw.login("alice", &token, &db).psql(&["-c", &format!("select '{m}' as x")]);
    assert_eq!(out.code, Some(0), "{}", out.describe());

    // Collect datagrams until the statement carrying the marker arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 65536];
    while Instant::now() < deadline && !got.iter().any(|g| g.contains(&m)) {
        if let Ok(n) = syslog.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let msg = got
        .iter()
        .find(|g| g.contains(&m))
        .unwrap_or_else(|| panic!("no syslog message with the statement; got {got:#?}"));
    // <PRI>1 TS HOST pgward PID MSGID - JSON
    let parts: Vec<&str> = msg.splitn(8, ' ').collect();
    assert_eq!(parts.len(), 8, "{msg}");
    assert_eq!(parts[0], "<38>1", "facility auth, severity info, RFC 5424 version 1: {msg}");
    assert_eq!(parts[3], "pgward");
    assert_eq!(parts[5], "statement");
    let exported: Value = serde_json::from_str(parts[7]).unwrap();
    assert_eq!(parts[1], exported["ts"].as_str().unwrap(), "header timestamp is the record's ts");

    // The exported record is the stored one, hash and all.
    let stored = pw.wait_audit("the exported statement in the log", |r| {
        r.iter().any(|x| x["seq"] == exported["seq"])
    });
    let same = stored.iter().find(|x| x["seq"] == exported["seq"]).unwrap();
    assert_eq!(same, &exported);
    assert_eq!(exported["user"], "alice");
    assert!(got.iter().any(|g| g.split(' ').nth(5) == Some("login")), "login record exported too: {got:#?}");
}

#[test]
fn stdout_export_prints_json_lines() {
    let db = cluster().create_database("export_stdout");
    let pw = Pgward::builder().set("audit.export", "stdout").start();
    let token = pw.token("bob", &[], "15m");
    let m = marker("stdout-export");
    let out = pw.login("bob", &token, &db).psql(&["-c", &format!("select '{m}'")]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = pw.stderr_log();
        let line = log.lines().find(|l| l.starts_with('{') && l.contains(&m));
        if let Some(line) = line {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["kind"], "statement");
            assert_eq!(v["user"], "bob");
            assert_eq!(v["hash"].as_str().map(str::len), Some(64));
            break;
        }
        assert!(Instant::now() < deadline, "no JSON line with the statement on stdout:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
