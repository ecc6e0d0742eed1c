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

pub(super) fn connect(target: &Target, max_message: usize) -> io::Result<Box<dyn Sink>> {
    let header = Header::new(max_message);
    Ok(match target {
        Target::Stdout => Box::new(Stdout(io::BufWriter::new(io::stdout()))),
        Target::Datagram(path) => {
            let sock = UnixDatagram::unbound()?;
            sock.connect(path)?;
            Box::new(Datagram { sock, header })
        }
        Target::Tcp { addr } => Box::new(StreamSink::connect(addr, None, header)?),
        Target::Tls { addr, name, config } => {
            Box::new(StreamSink::connect(addr, Some((name.clone(), config.clone())), header)?)
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
        match self.sock.send(&self.header.message(line)?) {
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

/// `{"seq":…,"kind":…,"hash":…,"oversize":<bytes>}` for a stored line too large to send, in
/// that order: a copy's record is found by its leading `{"seq":` (a `json!` map would sort
/// the keys and put `hash` first).
pub(super) fn oversize_stub(line: &[u8]) -> Option<Vec<u8>> {
    #[derive(serde::Deserialize)]
    struct Head {
        seq: u64,
        kind: String,
        hash: String,
    }
    #[derive(serde::Serialize)]
    struct Stub<'a> {
        seq: u64,
        kind: &'a str,
        hash: &'a str,
        oversize: usize,
    }
    let h: Head = serde_json::from_slice(line).ok()?;
    serde_json::to_vec(&Stub { seq: h.seq, kind: &h.kind, hash: &h.hash, oversize: line.len() }).ok()
}

/// The HOSTNAME and PROCID of our syslog messages, and the longest message the receiver takes
/// whole.
pub(super) struct Header {
    pub(super) host: String,
    pub(super) pid: u32,
    max_message: usize,
}

impl Header {
    pub(super) fn new(max_message: usize) -> Header {
        Header { host: hostname(), pid: std::process::id(), max_message }
    }

    /// The syslog message for a stored line; a stub (see [`oversize_stub`]) when the record's
    /// message would be longer than the receiver takes whole: a receiver cuts it, and a cut
    /// record in the copy is no evidence at all, while the stub's hash is compared.
    pub(super) fn message(&self, line: &[u8]) -> io::Result<Vec<u8>> {
        let msg = rfc5424(&self.host, self.pid, line);
        if msg.len() <= self.max_message {
            return Ok(msg);
        }
        let stub = oversize_stub(line).ok_or_else(|| io::Error::other("a stored line that is not a record"))?;
        tracing::warn!(
            "audit export: a record of {} bytes is longer than audit.syslog_max_message ({}); sent as a stub",
            line.len(),
            self.max_message
        );
        Ok(rfc5424(&self.host, self.pid, &stub))
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
