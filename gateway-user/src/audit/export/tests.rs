//! The exporter against real sockets: records come from the segment files, only up to the
//! durable seq, and a reconnect resends from the cursor.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::audit::chain;

/// A receiver that takes messages of any length (the datagram tests reach the socket's own limit).
const NO_LIMIT: usize = usize::MAX;

fn line(seq: u64, kind: &str) -> String {
    format!("{{\"seq\":{seq},\"ts\":\"t{seq}\",\"prev_hash\":\"00\",\"kind\":\"{kind}\",\"hash\":\"h{seq}\"}}\n")
}

fn append(dir: &Path, first: u64, seqs: std::ops::RangeInclusive<u64>) {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(chain::segment_name(first)))
        .expect("segment");
    for s in seqs {
        f.write_all(line(s, "statement").as_bytes()).expect("write");
    }
}

#[test]
fn rfc5424_header_carries_time_kind_and_the_whole_record() {
    let line = br#"{"seq":7,"ts":"2026-11-29T14:00:00.123456Z","prev_hash":"00","kind":"statement","sql":"select 1","hash":"ab"}"#;
    let msg = rfc5424("db1", 42, line);
    let text = String::from_utf8(msg).expect("utf8");
    assert_eq!(
        text,
        format!("<38>1 2026-11-29T14:00:00.123456Z db1 pgward 42 statement - {}", String::from_utf8_lossy(line))
    );
}

fn seq_of(msg: &str) -> u64 {
    let json = &msg[msg.find('{').expect("a JSON record")..];
    serde_json::from_str::<serde_json::Value>(json).expect("json")["seq"].as_u64().expect("seq")
}

/// A unix datagram receiver (what syslog's socket is) and an audit directory exporting to it.
struct DatagramSink {
    _dir: tempfile::TempDir,
    server: UnixDatagram,
    audit: std::path::PathBuf,
    settings: ExportSettings,
}

impl DatagramSink {
    fn new() -> DatagramSink {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock_path = dir.path().join("log");
        let server = UnixDatagram::bind(&sock_path).expect("bind");
        server.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let audit = dir.path().join("audit");
        std::fs::create_dir(&audit).expect("mkdir");
        let settings = ExportSettings { dir: audit.clone(), target: Target::Datagram(sock_path), max_message: NO_LIMIT };
        DatagramSink { _dir: dir, server, audit, settings }
    }
}

/// Only durable records leave, read from the segments (across a rotation), and a restarted
/// exporter continues after its cursor.
#[test]
fn datagrams_follow_the_durable_seq_and_resume_after_the_cursor() {
    let DatagramSink { _dir, server, audit, settings } = DatagramSink::new();
    append(&audit, 1, 1..=3);
    let ex = Exporter::start(settings.clone()).expect("start");
    ex.durable(2);
    let mut buf = vec![0u8; 4096];
    let mut recv = || {
        let n = server.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(seq_of(&recv()), 1);
    assert_eq!(seq_of(&recv()), 2);
    append(&audit, 4, 4..=5);
    ex.durable(5);
    assert_eq!((seq_of(&recv()), seq_of(&recv()), seq_of(&recv())), (3, 4, 5));
    drop(ex);
    let stored = std::fs::read_to_string(audit.join(CURSOR_FILE)).expect("cursor");
    assert!(stored.contains("\"seq\":5"), "{stored}");

    append(&audit, 4, 6..=6);
    let ex = Exporter::start(settings).expect("restart");
    ex.durable(6);
    let next = recv();
    assert_eq!(seq_of(&next), 6, "resumes after the cursor, nothing sent twice: {next}");
    assert!(next.starts_with("<38>1 t6 "), "{next}");
}

/// Read one octet-counted frame (`LEN SP MSG`).
fn frame(r: &mut impl BufRead) -> Option<String> {
    let mut len = Vec::new();
    if r.read_until(b' ', &mut len).ok()? == 0 {
        return None;
    }
    len.pop();
    let n: usize = std::str::from_utf8(&len).ok()?.parse().ok()?;
    let mut msg = vec![0u8; n];
    r.read_exact(&mut msg).ok()?;
    String::from_utf8(msg).ok()
}

/// A receiver that goes away: the records after the cursor are sent again on the next
/// connection, so each seq arrives, in order, copies only of what was not acknowledged.
#[test]
fn tcp_frames_are_octet_counted_and_a_lost_connection_resends_from_the_cursor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    append(dir.path(), 1, 1..=4);
    let ex =
        Exporter::start(ExportSettings { dir: dir.path().to_owned(), target: Target::Tcp { addr }, max_message: NO_LIMIT })
            .expect("start");
    ex.durable(4);
    let (conn, _) = listener.accept().expect("accept");
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut r = BufReader::new(conn);
    let mut got: Vec<u64> = (0..4).map(|_| seq_of(&frame(&mut r).expect("a frame"))).collect();
    assert_eq!(got, vec![1, 2, 3, 4]);
    drop(r); // the receiver restarts
    append(dir.path(), 1, 5..=6);
    ex.durable(6);
    let (conn, _) = listener.accept().expect("the exporter reconnects");
    conn.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut r = BufReader::new(conn);
    while got.last() != Some(&6) {
        got.push(seq_of(&frame(&mut r).expect("a frame")));
    }
    let mut firsts = got.clone();
    firsts.dedup();
    let unique: std::collections::BTreeSet<u64> = got.iter().copied().collect();
    assert_eq!(unique.into_iter().collect::<Vec<_>>(), (1..=6).collect::<Vec<_>>(), "every seq: {got:?}");
    assert!(got[4..].iter().all(|&s| s >= 5), "only records after the acknowledged 4 are sent again: {got:?}");
    assert!(got.windows(2).all(|w| w[1] > w[0] || w[1] >= 5), "in order: {got:?}");
}

/// A log that ends before the cursor lost records after they were exported: what is written
/// under those seqs now is sent too, not skipped.
#[test]
fn a_cursor_past_the_end_of_the_log_is_pulled_back() {
    let DatagramSink { _dir, server, audit, settings } = DatagramSink::new();
    let sink = format!("{{\"sink\":\"{}\",\"seq\":10}}\n", settings.sink_id());
    std::fs::write(audit.join(CURSOR_FILE), sink).expect("cursor");
    append(&audit, 1, 1..=3);
    let ex = Exporter::start(settings).expect("start");
    ex.log_opened(3);
    append(&audit, 1, 4..=4);
    ex.durable(4);
    let mut buf = vec![0u8; 4096];
    let n = server.recv(&mut buf).expect("a datagram");
    assert_eq!(seq_of(&String::from_utf8_lossy(&buf[..n])), 4);
}

/// A record larger than a datagram goes out as a stub with its seq and hash (and the export
/// goes on), which `verify --against` compares like a record.
#[test]
fn a_record_too_large_for_a_datagram_is_sent_as_a_stub() {
    let DatagramSink { _dir, server, audit, settings } = DatagramSink::new();
    let big = format!(
        "{{\"seq\":1,\"ts\":\"t1\",\"prev_hash\":\"00\",\"kind\":\"statement\",\"sql\":\"{}\",\"hash\":\"h1\"}}\n",
        "x".repeat(1 << 20)
    );
    let big_len = big.len() - 1;
    std::fs::write(audit.join(chain::segment_name(1)), big).expect("segment");
    append(&audit, 1, 2..=2);
    let ex = Exporter::start(settings).expect("start");
    ex.durable(2);
    let mut buf = vec![0u8; 65536];
    let n = server.recv(&mut buf).expect("the stub");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    let stub = &msg[msg.find('{').expect("json")..];
    // Byte for byte: `verify --against` finds a record in a copy by its leading `{"seq":`.
    assert_eq!(stub, format!("{{\"seq\":1,\"kind\":\"statement\",\"hash\":\"h1\",\"oversize\":{big_len}}}"));
    assert!(msg.starts_with("<38>1 - "), "{msg}");
    let n = server.recv(&mut buf).expect("the next record");
    assert_eq!(seq_of(&String::from_utf8_lossy(&buf[..n])), 2);
}

/// A segment file someone else put in the directory, empty and named for a seq inside the real
/// segment, neither stalls the export nor makes it skip the records the names lead past.
#[test]
fn a_planted_segment_name_does_not_make_the_export_skip_records() {
    let DatagramSink { _dir, server, audit, settings } = DatagramSink::new();
    append(&audit, 1, 1..=6);
    let sink = format!("{{\"sink\":\"{}\",\"seq\":2}}\n", settings.sink_id());
    std::fs::write(audit.join(CURSOR_FILE), &sink).expect("cursor");
    std::fs::write(audit.join(chain::segment_name(3)), b"").expect("planted segment");
    let ex = Exporter::start(settings.clone()).expect("start");
    ex.durable(6);
    let mut buf = vec![0u8; 4096];
    let mut recv = || {
        let n = server.recv(&mut buf).expect("a datagram");
        seq_of(&String::from_utf8_lossy(&buf[..n]))
    };
    assert_eq!((recv(), recv(), recv(), recv()), (3, 4, 5, 6), "nothing skipped, nothing stalled");
    // The writer goes on in its own segment, which the planted one's name follows.
    append(&audit, 1, 7..=7);
    ex.durable(7);
    assert_eq!(recv(), 7, "records after the planted name are read where they are");
    drop(ex);

    // Planted before a later segment: the records the names lead past are not skipped either.
    std::fs::write(audit.join(CURSOR_FILE), &sink).expect("cursor");
    append(&audit, 8, 8..=9);
    let ex = Exporter::start(settings).expect("restart");
    ex.durable(9);
    let got: Vec<u64> = (0..7).map(|_| recv()).collect();
    assert_eq!(got, vec![3, 4, 5, 6, 7, 8, 9]);
}
