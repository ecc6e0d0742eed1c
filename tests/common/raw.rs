//! A minimal, blocking PostgreSQL v3 frontend, for facts that libpq and tokio-postgres hide:
//! BackendKeyData, every ParameterStatus, CancelRequest with chosen keys, Terminate, text-format
//! Bind parameters, the peer address the server saw. Plaintext only; cleartext-password (what
//! pgward asks for) or trust authentication.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::Login;

const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// One backend message: type byte and body (without the length word).
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

fn cstr(b: &[u8]) -> (String, &[u8]) {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let rest = if end < b.len() {
        &b[end + 1..]
    } else {
        &b[end..]
    };
    (String::from_utf8_lossy(&b[..end]).into_owned(), rest)
}

impl Msg {
    /// Fields of an ErrorResponse / NoticeResponse, by field type ('C' = SQLSTATE, 'M' = message).
    pub fn fields(&self) -> BTreeMap<char, String> {
        let mut out = BTreeMap::new();
        if self.tag != b'E' && self.tag != b'N' {
            return out;
        }
        let mut b = &self.body[..];
        while let Some((&t, rest)) = b.split_first() {
            if t == 0 {
                break;
            }
            let (v, rest) = cstr(rest);
            out.insert(t as char, v);
            b = rest;
        }
        out
    }
    pub fn is_error(&self) -> bool {
        self.tag == b'E'
    }
    pub fn sqlstate(&self) -> Option<String> {
        self.fields().get(&'C').cloned()
    }
    /// CommandComplete tag ("SELECT 1", "ROLLBACK").
    pub fn command_tag(&self) -> Option<String> {
        (self.tag == b'C').then(|| cstr(&self.body).0)
    }
    /// ParameterStatus (name, value).
    pub fn parameter_status(&self) -> Option<(String, String)> {
        if self.tag != b'S' {
            return None;
        }
        let (k, rest) = cstr(&self.body);
        let (v, _) = cstr(rest);
        Some((k, v))
    }
    /// DataRow columns (None = NULL), raw bytes.
    pub fn data_row(&self) -> Option<Vec<Option<Vec<u8>>>> {
        if self.tag != b'D' || self.body.len() < 2 {
            return None;
        }
        let n = i16::from_be_bytes([self.body[0], self.body[1]]) as usize;
        let mut b = &self.body[2..];
        let mut cols = Vec::with_capacity(n);
        for _ in 0..n {
            let len = i32::from_be_bytes(b[..4].try_into().ok()?);
            b = &b[4..];
            if len < 0 {
                cols.push(None);
            } else {
                let len = len as usize;
                cols.push(Some(b[..len].to_vec()));
                b = &b[len..];
            }
        }
        Some(cols)
    }
    /// NotificationResponse (channel, payload).
    pub fn notification(&self) -> Option<(String, String)> {
        if self.tag != b'A' || self.body.len() < 4 {
            return None;
        }
        let (ch, rest) = cstr(&self.body[4..]);
        let (payload, _) = cstr(rest);
        Some((ch, payload))
    }
    pub fn describe(&self) -> String {
        match self.tag {
            b'E' | b'N' => format!("{} {:?}", self.tag as char, self.fields()),
            b'C' => format!("C {:?}", self.command_tag().unwrap_or_default()),
            b'S' => format!("S {:?}", self.parameter_status().unwrap_or_default()),
            b'D' => format!("D {:?}", text_row(self)),
            t => format!("{} ({} bytes)", t as char, self.body.len()),
        }
    }
}

fn text_row(m: &Msg) -> Vec<Option<String>> {
    m.data_row()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.map(|v| String::from_utf8_lossy(&v).into_owned()))
        .collect()
}

/// All DataRows in `msgs` as text.
pub fn rows(msgs: &[Msg]) -> Vec<Vec<Option<String>>> {
    msgs.iter()
        .filter(|m| m.tag == b'D')
        .map(text_row)
        .collect()
}
/// The first ErrorResponse in `msgs`.
pub fn first_error(msgs: &[Msg]) -> Option<&Msg> {
    msgs.iter().find(|m| m.is_error())
}
/// All CommandComplete tags in `msgs`.
pub fn tags(msgs: &[Msg]) -> Vec<String> {
    msgs.iter().filter_map(Msg::command_tag).collect()
}
pub fn describe_all(msgs: &[Msg]) -> String {
    msgs.iter()
        .map(Msg::describe)
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Debug)]
pub enum RawError {
    Io(io::Error),
    /// The server refused (ErrorResponse during startup).
    Server(Msg),
    Protocol(String),
}

impl RawError {
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            RawError::Server(m) => m.sqlstate(),
            _ => None,
        }
    }
}

impl From<io::Error> for RawError {
    fn from(e: io::Error) -> Self {
        RawError::Io(e)
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn connect(login: &Login) -> io::Result<Stream> {
        if login.is_unix() {
            let path = format!("{}/.s.PGSQL.{}", login.host, login.port);
            let s = UnixStream::connect(path)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            Ok(Stream::Unix(s))
        } else {
            let addr: SocketAddr = format!("{}:{}", login.host, login.port)
                .parse()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))?;
            let s = TcpStream::connect_timeout(&addr, Duration::from_secs(15))?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.set_write_timeout(Some(IO_TIMEOUT))?;
            s.set_nodelay(true)?;
            Ok(Stream::Tcp(s))
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}
impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// Frontend message builders.
pub mod fe {
    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::with_capacity(body.len() + 5);
        v.push(tag);
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }
    fn cstr(v: &mut Vec<u8>, s: &str) {
        v.extend_from_slice(s.as_bytes());
        v.push(0);
    }
    pub fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = 196608i32.to_be_bytes().to_vec(); // protocol 3.0
        for (k, v) in params {
            cstr(&mut body, k);
            cstr(&mut body, v);
        }
        body.push(0);
        let mut out = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        out.extend_from_slice(&body);
        out
    }
    pub fn cancel_request(pid: i32, key: i32) -> Vec<u8> {
        let mut out = 16i32.to_be_bytes().to_vec();
        out.extend_from_slice(&80877102i32.to_be_bytes());
        out.extend_from_slice(&pid.to_be_bytes());
        out.extend_from_slice(&key.to_be_bytes());
        out
    }
    pub fn password(p: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, p);
        msg(b'p', &b)
    }
    pub fn query(sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, sql);
        msg(b'Q', &b)
    }
    pub fn parse(name: &str, sql: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, name);
        cstr(&mut b, sql);
        b.extend_from_slice(&0i16.to_be_bytes());
        msg(b'P', &b)
    }
    /// Bind with all parameters and results in text format.
    pub fn bind_text(portal: &str, stmt: &str, params: &[Option<&str>]) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        cstr(&mut b, stmt);
        b.extend_from_slice(&0i16.to_be_bytes()); // no format codes: all text
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            match p {
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    b.extend_from_slice(v.as_bytes());
                }
            }
        }
        b.extend_from_slice(&0i16.to_be_bytes()); // results: text
        msg(b'B', &b)
    }
    pub fn describe_portal(portal: &str) -> Vec<u8> {
        let mut b = vec![b'P'];
        cstr(&mut b, portal);
        msg(b'D', &b)
    }
    pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        b.extend_from_slice(&max_rows.to_be_bytes());
        msg(b'E', &b)
    }
    pub fn sync() -> Vec<u8> {
        msg(b'S', &[])
    }
    pub fn flush() -> Vec<u8> {
        msg(b'H', &[])
    }
    pub fn terminate() -> Vec<u8> {
        msg(b'X', &[])
    }
    /// Any tagged message with a raw body (for malformed input).
    pub fn raw_msg(tag: u8, body: &[u8]) -> Vec<u8> {
        msg(tag, body)
    }
    /// SSLRequest (8 bytes).
    pub fn ssl_request() -> Vec<u8> {
        let mut out = 8i32.to_be_bytes().to_vec();
        out.extend_from_slice(&80877103i32.to_be_bytes());
        out
    }
    /// GSSENCRequest (8 bytes).
    pub fn gssenc_request() -> Vec<u8> {
        let mut out = 8i32.to_be_bytes().to_vec();
        out.extend_from_slice(&80877104i32.to_be_bytes());
        out
    }
}

pub struct RawConn {
    stream: Stream,
    /// Every byte received from the server on this connection, in order (messages as read by
    /// `recv`, single bytes from `read_bytes`): for "never sent to the client" checks.
    pub received: Vec<u8>,
    /// ParameterStatus values, latest value wins (updated by every recv).
    pub params: BTreeMap<String, String>,
    /// (process id, secret key) from BackendKeyData.
    pub backend_key: Option<(i32, i32)>,
    /// Every message received during startup, in order.
    pub startup_msgs: Vec<Msg>,
    /// Our end of the TCP connection (what the server sees as the client address).
    pub local_addr: Option<SocketAddr>,
}

impl RawConn {
    /// Connect and complete startup + authentication up to the first ReadyForQuery.
    pub fn connect(login: &Login, extra: &[(&str, &str)]) -> Result<RawConn, RawError> {
        let mut c = RawConn::open(login)?;
        c.startup(login, extra)?;
        Ok(c)
    }

    /// Just the socket: nothing sent yet (for hand-made startup sequences).
    pub fn open(login: &Login) -> io::Result<RawConn> {
        let stream = Stream::connect(login)?;
        let local_addr = match &stream {
            Stream::Tcp(s) => s.local_addr().ok(),
            Stream::Unix(_) => None,
        };
        Ok(RawConn {
            stream,
            received: Vec::new(),
            params: BTreeMap::new(),
            backend_key: None,
            startup_msgs: Vec::new(),
            local_addr,
        })
    }

    /// Exactly `n` raw bytes (e.g. the one-byte answer to SSLRequest / GSSENCRequest).
    pub fn read_bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.stream.read_exact(&mut b)?;
        self.received.extend_from_slice(&b);
        Ok(b)
    }

    /// StartupMessage (user, database, `extra`) and authentication (cleartext password or
    /// trust) up to the first ReadyForQuery, on an opened connection.
    pub fn startup(&mut self, login: &Login, extra: &[(&str, &str)]) -> Result<(), RawError> {
        let c = self;
        let mut params = vec![
            ("user", login.user.as_str()),
            ("database", login.dbname.as_str()),
        ];
        params.extend_from_slice(extra);
        c.send(&fe::startup(&params))?;
        loop {
            let m = c.recv()?;
            c.startup_msgs.push(m.clone());
            match m.tag {
                b'R' => {
                    let code = i32::from_be_bytes(m.body[..4].try_into().unwrap());
                    match code {
                        0 => {}
                        3 => {
                            let p = login.password.clone().ok_or_else(|| {
                                RawError::Protocol("server asked for a password; none given".into())
                            })?;
                            c.send(&fe::password(&p))?;
                        }
                        other => {
                            return Err(RawError::Protocol(format!(
                                "unsupported authentication request {other} (raw client speaks cleartext/trust only)"
                            )));
                        }
                    }
                }
                b'K' => {
                    let pid = i32::from_be_bytes(m.body[..4].try_into().unwrap());
                    let key = i32::from_be_bytes(m.body[4..8].try_into().unwrap());
                    c.backend_key = Some((pid, key));
                }
                b'E' => return Err(RawError::Server(m)),
                b'Z' => return Ok(()),
                _ => {} // S handled in recv, N ignored
            }
        }
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Next backend message (ParameterStatus also updates `params`).
    pub fn recv(&mut self) -> io::Result<Msg> {
        let mut hdr = [0u8; 5];
        self.stream.read_exact(&mut hdr)?;
        let len = i32::from_be_bytes(hdr[1..5].try_into().unwrap());
        if !(4..=64 * 1024 * 1024).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad message length {len}"),
            ));
        }
        let mut body = vec![0u8; len as usize - 4];
        self.stream.read_exact(&mut body)?;
        self.received.extend_from_slice(&hdr);
        self.received.extend_from_slice(&body);
        let m = Msg { tag: hdr[0], body };
        if let Some((k, v)) = m.parameter_status() {
            self.params.insert(k, v);
        }
        Ok(m)
    }

    /// Messages up to and including the next ReadyForQuery.
    pub fn recv_until_ready(&mut self) -> io::Result<Vec<Msg>> {
        let mut out = Vec::new();
        loop {
            let m = self.recv()?;
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return Ok(out);
            }
        }
    }

    /// Simple query; all messages up to ReadyForQuery.
    pub fn simple_query(&mut self, sql: &str) -> io::Result<Vec<Msg>> {
        self.send(&fe::query(sql))?;
        self.recv_until_ready()
    }

    /// Unnamed statement + portal, text-format parameters (None = NULL), then Sync.
    pub fn extended_query(&mut self, sql: &str, params: &[Option<&str>]) -> io::Result<Vec<Msg>> {
        let mut batch = fe::parse("", sql);
        batch.extend(fe::bind_text("", "", params));
        batch.extend(fe::describe_portal(""));
        batch.extend(fe::execute("", 0));
        batch.extend(fe::sync());
        self.send(&batch)?;
        self.recv_until_ready()
    }

    /// Read (bounded by `timeout`) until the server closes the connection; Ok(messages read
    /// before EOF). Err(TimedOut/WouldBlock) if it stayed open.
    pub fn read_until_eof(&mut self, timeout: Duration) -> io::Result<Vec<Msg>> {
        match &self.stream {
            Stream::Tcp(s) => s.set_read_timeout(Some(timeout))?,
            Stream::Unix(s) => s.set_read_timeout(Some(timeout))?,
        }
        let mut msgs = Vec::new();
        loop {
            match self.recv() {
                Ok(m) => msgs.push(m),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(msgs),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(msgs),
                Err(e) => return Err(e),
            }
        }
    }

    /// Send Terminate and wait (bounded) for the server to close the connection.
    pub fn terminate(mut self) -> io::Result<Vec<Msg>> {
        self.send(&fe::terminate())?;
        self.read_until_eof(Duration::from_secs(30))
    }
}

/// Open a new connection to `login`'s server, send a CancelRequest with the given keys, and
/// wait (bounded) for the server to close it — it does so once it has handled the request.
pub fn send_cancel_request(login: &Login, pid: i32, key: i32) -> io::Result<()> {
    let mut s = Stream::connect(login)?;
    s.write_all(&fe::cancel_request(pid, key))?;
    s.flush()?;
    match &s {
        Stream::Tcp(t) => t.set_read_timeout(Some(Duration::from_secs(10)))?,
        Stream::Unix(u) => u.set_read_timeout(Some(Duration::from_secs(10)))?,
    }
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => continue, // servers send nothing here; ignore anything anyway
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            // Still open after 10 s: nothing more to learn from this socket.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}
