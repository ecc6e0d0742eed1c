//! The sinks and what each counts as acknowledged: stdout — written and flushed; a unix
//! datagram socket — the datagram was accepted by the receiving socket; TCP and TLS — see
//! [`super::stream`].

use std::io::{self, Write as _};
use std::os::unix::net::UnixDatagram;

use super::settings::Target;
use super::stream::StreamSink;

/// Facility "auth" (4) is the usual home of security audit trails; severity "info" (6).
const PRI_AUTH_INFO: u8 = 4 * 8 + 6;

/// Where records go.
pub(super) trait Sink: Send {
    /// Hand over one stored record (its JSON line, without `\n`).
    fn send(&mut self, line: &[u8]) -> io::Result<()>;
    /// Whether everything sent so far is acknowledged (`Ok(false)`: not yet, ask again);
    /// `Err` when the connection is gone.
    fn confirm(&mut self) -> io::Result<bool>;
}

pub(super) fn connect(target: &Target) -> io::Result<Box<dyn Sink>> {
    Ok(match target {
        Target::Stdout => Box::new(Stdout(io::BufWriter::new(io::stdout()))),
        Target::Datagram(path) => {
            let sock = UnixDatagram::unbound()?;
            sock.connect(path)?;
            Box::new(Datagram { sock, header: Header::new() })
        }
        Target::Tcp { addr } => Box::new(StreamSink::connect(addr, None)?),
        Target::Tls { addr, name, config } => {
            Box::new(StreamSink::connect(addr, Some((name.clone(), config.clone())))?)
        }
    })
}

struct Stdout(io::BufWriter<io::Stdout>);

impl Sink for Stdout {
    fn send(&mut self, line: &[u8]) -> io::Result<()> {
        self.0.write_all(line)?;
        self.0.write_all(b"\n")
    }
    fn confirm(&mut self) -> io::Result<bool> {
        self.0.flush().map(|()| true)
    }
}

struct Datagram {
    sock: UnixDatagram,
    header: Header,
}

impl Sink for Datagram {
    /// A record larger than a datagram can carry (`EMSGSIZE`: SQL texts go up to 1 MiB) is
    /// sent as a stub with its `seq`, `kind`, `hash` and size, so the copy still shows it and
    /// `verify --against` still compares its hash; the record itself stays in the log.
    fn send(&mut self, line: &[u8]) -> io::Result<()> {
        match self.sock.send(&rfc5424(&self.header.host, self.header.pid, line)) {
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                let stub = oversize_stub(line).ok_or(e)?;
                tracing::warn!(
                    "audit export: a record of {} bytes is too large for a datagram; sent as a stub",
                    line.len()
                );
                self.sock.send(&rfc5424(&self.header.host, self.header.pid, &stub)).map(|_| ())
            }
            other => other.map(|_| ()),
        }
    }
    fn confirm(&mut self) -> io::Result<bool> {
        Ok(true)
    }
}

/// `{"seq":…,"kind":…,"hash":…,"oversize":<bytes>}` for a stored line too large to send.
pub(super) fn oversize_stub(line: &[u8]) -> Option<Vec<u8>> {
    #[derive(serde::Deserialize)]
    struct Head {
        seq: u64,
        kind: String,
        hash: String,
    }
    let h: Head = serde_json::from_slice(line).ok()?;
    let stub = serde_json::json!({ "seq": h.seq, "kind": h.kind, "hash": h.hash, "oversize": line.len() });
    serde_json::to_vec(&stub).ok()
}

/// The HOSTNAME and PROCID of our syslog messages.
pub(super) struct Header {
    pub(super) host: String,
    pub(super) pid: u32,
}

impl Header {
    pub(super) fn new() -> Header {
        Header { host: hostname(), pid: std::process::id() }
    }
}

/// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID SD MSG` with the record's own `ts` as the
/// timestamp, MSGID = the record's kind, and the JSON record (seq and hash included) as MSG.
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
