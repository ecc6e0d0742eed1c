//! Syslog over TCP (RFC 6587, octet counting: `LEN SP MSG`) and over TLS (RFC 5425, the same
//! framing inside TLS). Plain syslog has no application-level acknowledgement, so a record
//! counts as acknowledged when its bytes were flushed to the socket, the receiver's TCP stack
//! acknowledged them (the socket's send queue, `SIOCOUTQ`, is empty) and the receiver did not
//! reset the connection. A receiver that stops cleanly closes the connection after reading
//! what it was sent (Linux answers data that arrives at, or is unread in, a closed socket
//! with a reset, which the exporter sees as a failure and answers by sending everything after
//! the cursor again). What a receiving daemon had read but not yet stored when it was killed
//! is beyond what the protocol can tell; a receiver with a disk-assisted queue keeps it.

use std::io::{self, Read as _, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::{ClientConfig, ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;

use super::sink::{Header, Sink};

/// Connecting and the TLS handshake give up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A write the receiver does not take within this long fails (and the exporter reconnects).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `confirm` waits for the receiver's TCP acknowledgement before answering "not yet".
const CONFIRM_WAIT: Duration = Duration::from_secs(2);
/// Poll step while waiting for the acknowledgement, in milliseconds.
const CONFIRM_STEP_MS: i32 = 2;
/// Write buffer: many small records go out in few segments.
const WRITE_BUFFER: usize = 64 * 1024;

enum Conn {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => &s.sock,
        }
    }

    /// Consume what the receiver sent (syslog receivers send nothing but TLS housekeeping);
    /// true when it has closed its side of the connection.
    fn drain_incoming(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; 4096];
        match self {
            Conn::Plain(s) => Ok(s.read(&mut buf)? == 0),
            Conn::Tls(s) => {
                if s.conn.read_tls(&mut s.sock)? == 0 {
                    return Ok(true);
                }
                let state = s.conn.process_new_packets().map_err(io::Error::other)?;
                while s.conn.reader().read(&mut buf).is_ok_and(|n| n > 0) {}
                Ok(state.peer_has_closed())
            }
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

pub(super) struct StreamSink {
    out: io::BufWriter<Conn>,
    header: Header,
    /// The receiver closed its side: nothing more can be sent on this connection.
    closed: bool,
}

impl StreamSink {
    /// Connect to `addr` (and with `tls`, complete the handshake, so a certificate problem
    /// shows up here).
    pub(super) fn connect(
        addr: &str,
        tls: Option<(ServerName<'static>, Arc<ClientConfig>)>,
        header: Header,
    ) -> io::Result<StreamSink> {
        let tcp = connect_tcp(addr)?;
        tcp.set_nodelay(true)?;
        tcp.set_write_timeout(Some(WRITE_TIMEOUT))?;
        // Only bounds the handshake: later reads happen when poll says there is something.
        tcp.set_read_timeout(Some(CONNECT_TIMEOUT))?;
        let conn = match tls {
            None => Conn::Plain(tcp),
            Some((name, config)) => {
                let client = ClientConnection::new(config, name).map_err(io::Error::other)?;
                let mut s = StreamOwned::new(client, tcp);
                while s.conn.is_handshaking() {
                    s.conn.complete_io(&mut s.sock)?;
                }
                Conn::Tls(Box::new(s))
            }
        };
        Ok(StreamSink { out: io::BufWriter::with_capacity(WRITE_BUFFER, conn), header, closed: false })
    }

    fn fd(&self) -> RawFd {
        self.out.get_ref().tcp().as_raw_fd()
    }

    /// Whether the receiver closed its side of the connection (`Err` if it reset it or the
    /// socket has an error); consumes what it sent. Waits up to `wait_ms` for news.
    fn peer_closed(&mut self, wait_ms: i32) -> io::Result<bool> {
        let mut p = libc::pollfd { fd: self.fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, wait_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(e) };
        }
        if let Some(e) = self.out.get_ref().tcp().take_error()? {
            return Err(e);
        }
        if p.revents & libc::POLLERR != 0 {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "socket error"));
        }
        let mut closed = p.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0;
        if p.revents & libc::POLLIN != 0 {
            closed |= self.out.get_mut().drain_incoming()?;
        }
        Ok(closed)
    }

    /// Bytes written to the socket that the receiver's TCP has not acknowledged.
    fn unacknowledged(&self) -> io::Result<libc::c_int> {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one int.
        if unsafe { libc::ioctl(self.fd(), libc::TIOCOUTQ, &mut n) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n)
    }
}

fn connect_tcp(addr: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr} resolves to no address"));
    for a in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

impl Sink for StreamSink {
    fn send(&mut self, line: &[u8]) -> io::Result<()> {
        if self.closed {
            return Err(closed_error());
        }
        let msg = self.header.message(line)?;
        write!(self.out, "{} ", msg.len())?;
        self.out.write_all(&msg)
    }

    /// Acknowledged: the receiver's TCP took every byte (empty send queue) and did not reset
    /// the connection. A receiver that closed its side after that had read everything (a
    /// socket closed with unread data answers with a reset): the records count as delivered,
    /// and the next send reconnects.
    fn confirm(&mut self) -> io::Result<bool> {
        if self.closed {
            return Err(closed_error());
        }
        self.out.flush()?;
        let deadline = Instant::now() + CONFIRM_WAIT;
        loop {
            // The queue first: a reset that arrives after an empty queue was seen still
            // leaves what it acknowledged acknowledged.
            let queued = self.unacknowledged()?;
            let closed = self.peer_closed(0)?;
            if queued == 0 {
                self.closed = closed;
                return Ok(true);
            }
            if closed {
                return Err(closed_error());
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            if self.peer_closed(CONFIRM_STEP_MS)? {
                self.closed = true;
            }
        }
    }
}

fn closed_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "the receiver closed the connection")
}
