//! Copies of durable audit records for the host's log pipeline: RFC 5424 syslog messages over
//! a unix datagram socket (`/dev/log`, journald's or rsyslog's), or JSON lines on stdout (for
//! journald when pgward runs as a systemd service). The hash-chained segment files stay the
//! record of truth; the export is best effort and never blocks or fails a statement: lines
//! are handed over after they are durable, on a bounded queue a separate thread drains.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::mpsc::{self, SyncSender, TrySendError};

pub use crate::config::ExportKind;

/// Queue depth in batches; beyond it batches are dropped (and counted), never waited for.
const QUEUE: usize = 1024;

/// Facility "auth" (4) is the usual home of security audit trails; severity "info" (6).
const PRI_AUTH_INFO: u8 = 4 * 8 + 6;

pub struct Exporter {
    tx: SyncSender<Vec<u8>>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").finish_non_exhaustive()
    }
}

impl Exporter {
    pub fn start(kind: ExportKind, syslog_socket: PathBuf) -> Option<Exporter> {
        if kind == ExportKind::None {
            return None;
        }
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
        let spawned = std::thread::Builder::new().name("pgward-audit-export".into()).spawn(move || {
            let host = hostname();
            let pid = std::process::id();
            let mut sock: Option<UnixDatagram> = None;
            let stdout = std::io::stdout();
            for batch in rx {
                for line in batch.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    match kind {
                        ExportKind::Stdout => {
                            let mut out = stdout.lock();
                            let _ = out.write_all(line);
                            let _ = out.write_all(b"\n");
                            let _ = out.flush();
                        }
                        ExportKind::Syslog => {
                            let msg = rfc5424(&host, pid, line);
                            if sock.is_none() {
                                sock = UnixDatagram::unbound().ok().filter(|s| s.connect(&syslog_socket).is_ok());
                            }
                            let sent = sock.as_ref().is_some_and(|s| s.send(&msg).is_ok());
                            if !sent {
                                // Reconnect on the next line (syslog daemon restarted, ...).
                                sock = None;
                            }
                        }
                        ExportKind::None => {}
                    }
                }
            }
        });
        match spawned {
            Ok(_) => Some(Exporter { tx }),
            Err(e) => {
                tracing::error!("audit export disabled: cannot start its thread: {e}");
                None
            }
        }
    }

    /// Hand over durable lines (never blocks).
    pub fn send(&self, lines: &[u8]) {
        match self.tx.try_send(lines.to_vec()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => tracing::warn!("audit export queue full; a batch was not exported"),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG` with the record's own `ts` as the
/// timestamp, MSGID = the record's kind, and the JSON record (hash included) as MSG.
pub fn rfc5424(host: &str, pid: u32, line: &[u8]) -> Vec<u8> {
    let v: Option<serde_json::Value> = serde_json::from_slice(line).ok();
    let field = |k: &str| v.as_ref().and_then(|v| v.get(k)).and_then(|x| x.as_str()).map(str::to_string);
    let ts = field("ts").unwrap_or_else(|| "-".into());
    let kind = field("kind").unwrap_or_else(|| "-".into());
    let mut msg = format!("<{PRI_AUTH_INFO}>1 {ts} {host} pgward {pid} {kind} - ").into_bytes();
    msg.extend_from_slice(line);
    msg
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rfc5424_header_carries_time_kind_and_the_whole_record() {
        let line = br#"{"seq":7,"ts":"2026-11-29T14:00:00.123456Z","prev_hash":"00","kind":"statement","sql":"select 1","hash":"ab"}"#;
        let msg = rfc5424("db1", 42, line);
        let text = String::from_utf8(msg).unwrap();
        assert_eq!(
            text,
            format!("<38>1 2026-11-29T14:00:00.123456Z db1 pgward 42 statement - {}", String::from_utf8_lossy(line))
        );
    }

    #[test]
    fn syslog_export_sends_one_datagram_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let ex = Exporter::start(ExportKind::Syslog, path).unwrap();
        ex.send(b"{\"seq\":1,\"ts\":\"t1\",\"kind\":\"login\"}\n{\"seq\":2,\"ts\":\"t2\",\"kind\":\"statement\"}\n");
        let mut buf = [0u8; 4096];
        let n = server.recv(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("<38>1 t1 "), "{}", String::from_utf8_lossy(&buf[..n]));
        let n = server.recv(&mut buf).unwrap();
        let second = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(second.contains(" statement - {\"seq\":2"), "{second}");
    }
}
