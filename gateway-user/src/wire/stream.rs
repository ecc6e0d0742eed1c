//! The byte streams sessions run on: TCP, unix sockets, TLS over either, and the plain socket
//! under them when there is one (for sends from another thread, and for moving a connection
//! between event loops).

/// A bidirectional byte stream (TCP, unix socket, or TLS over either).
pub trait AsyncStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    /// The plain socket under this stream, taken out of the event loop that registered it
    /// (tokio's `into_std`: deregistered from that loop's reactor, still non-blocking), so that
    /// another loop can adopt it with [`StdStream::into_tokio`]. `Err(self)`, unchanged, for a
    /// stream that cannot move that way (TLS: its state lives in the tokio stream; in-memory
    /// pipes). `Ok(Err(_))`: deregistering failed, and the socket is closed.
    fn into_std(self: Box<Self>) -> Result<std::io::Result<StdStream>, BoxStream>;

    /// The socket under a plaintext TCP or Unix stream, whose bytes go to the peer as they are
    /// written; None for TLS or in-memory streams.
    fn plain_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>>;
}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> AsyncStream for T {
    fn into_std(self: Box<Self>) -> Result<std::io::Result<StdStream>, BoxStream> {
        let any: Box<dyn std::any::Any> = self;
        let any = match any.downcast::<tokio::net::TcpStream>() {
            Ok(s) => return Ok(tokio::net::TcpStream::into_std(*s).map(StdStream::Tcp)),
            Err(any) => any,
        };
        let any = match any.downcast::<tokio::net::UnixStream>() {
            Ok(s) => return Ok(tokio::net::UnixStream::into_std(*s).map(StdStream::Unix)),
            Err(any) => any,
        };
        // A boxed BoxStream: what is inside.
        let any = match any.downcast::<BoxStream>() {
            Ok(inner) => return (*inner).into_std(),
            Err(any) => any,
        };
        match any.downcast::<T>() {
            Ok(s) => Err(s),
            Err(_) => unreachable!("a Box<T> downcasts to T"),
        }
    }

    fn plain_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        let any: &dyn std::any::Any = self;
        if let Some(s) = any.downcast_ref::<tokio::net::TcpStream>() {
            return Some(s.as_fd());
        }
        if let Some(s) = any.downcast_ref::<tokio::net::UnixStream>() {
            return Some(s.as_fd());
        }
        any.downcast_ref::<BoxStream>().and_then(|inner| (**inner).plain_fd())
    }
}

/// Send as much of `buf` as the socket takes now, without blocking (`MSG_DONTWAIT |
/// MSG_NOSIGNAL`): the number of bytes sent. Stops at a full send buffer or an error (which
/// the stream's owner then meets on its own next write).
pub fn send_now(fd: std::os::fd::BorrowedFd<'_>, buf: &[u8]) -> usize {
    use std::os::fd::AsRawFd;
    let mut off = 0;
    while off < buf.len() {
        let rest = &buf[off..];
        // SAFETY: send(2) from a live buffer of `rest.len()` bytes on an open socket.
        let n = unsafe {
            libc::send(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
        };
        if n > 0 {
            off += n as usize;
        } else if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        } else {
            break;
        }
    }
    off
}

pub type BoxStream = Box<dyn AsyncStream>;

/// A plain socket out of any event loop ([`AsyncStream::into_std`]): non-blocking, registered
/// with no reactor.
#[derive(Debug)]
pub enum StdStream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl StdStream {
    /// Register the socket with the current runtime's reactor: from now on the calling event
    /// loop drives it. Must be called from within a tokio runtime.
    pub fn into_tokio(self) -> std::io::Result<BoxStream> {
        Ok(match self {
            StdStream::Tcp(s) => Box::new(tokio::net::TcpStream::from_std(s)?),
            StdStream::Unix(s) => Box::new(tokio::net::UnixStream::from_std(s)?),
        })
    }

    /// Whether the peer has nothing for us right now: one non-blocking peek (`MSG_PEEK |
    /// MSG_DONTWAIT`), which consumes nothing. Would block: quiet. Data, EOF or an error: not.
    pub fn is_quiet(&self) -> bool {
        use std::os::fd::AsRawFd;
        let fd = match self {
            StdStream::Tcp(s) => s.as_raw_fd(),
            StdStream::Unix(s) => s.as_raw_fd(),
        };
        let mut byte = [0u8; 1];
        loop {
            // SAFETY: recv(2) into a live 1-byte buffer on a socket this value owns.
            let n = unsafe { libc::recv(fd, byte.as_mut_ptr().cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
            if n >= 0 {
                return false;
            }
            match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => return true,
                _ => return false,
            }
        }
    }

    /// Write `bytes` if the socket takes them without blocking (best effort), then shut it
    /// down and close it.
    pub fn close_with(mut self, bytes: &[u8]) {
        use std::io::Write;
        let _ = match &mut self {
            StdStream::Tcp(s) => s.write(bytes).and_then(|_| s.shutdown(std::net::Shutdown::Both)),
            StdStream::Unix(s) => s.write(bytes).and_then(|_| s.shutdown(std::net::Shutdown::Both)),
        };
    }
}
