//! Memory per idle session: open N sessions to pgward with a minimal raw Postgres client
//! (std TcpStream: StartupMessage, cleartext password = the token, one `select 1`), keep them
//! open and idle, and read pgward's RSS from /proc/<pid>/status before and after.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, Result, bail};

pub struct IdleReport {
    pub sessions: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub rss_closed_kib: u64,
    pub anon_before_kib: u64,
    pub anon_after_kib: u64,
    pub login_secs: f64,
}

impl IdleReport {
    pub fn per_session_kib(&self) -> f64 {
        (self.rss_after_kib as f64 - self.rss_before_kib as f64) / self.sessions.max(1) as f64
    }
    pub fn anon_per_session_kib(&self) -> f64 {
        (self.anon_after_kib as f64 - self.anon_before_kib as f64) / self.sessions.max(1) as f64
    }
}

/// `(VmRSS, RssAnon)` of a process in KiB.
pub fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> Option<u64> {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    match (field("VmRSS:"), field("RssAnon:")) {
        (Some(rss), Some(anon)) => Ok((rss, anon)),
        _ => bail!("no VmRSS/RssAnon in /proc/{pid}/status"),
    }
}

pub fn measure(pid: u32, port: u16, user: &str, password: &str, n: usize, interrupted: &dyn Fn() -> bool) -> Result<IdleReport> {
    // Warm up: the first sessions initialize lazily built state (TLS config, runtime threads,
    // allocator arenas) that is not per-session.
    for _ in 0..8 {
        let s = login(port, user, "app", password)?;
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(1000));
    let (rss_before_kib, anon_before_kib) = rss_kib(pid)?;

    let start = std::time::Instant::now();
    let mut open = Vec::with_capacity(n);
    for i in 0..n {
        if interrupted() {
            bail!("interrupted");
        }
        open.push(login(port, user, "app", password).with_context(|| format!("idle session {} of {n}", i + 1))?);
    }
    let login_secs = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(1500));
    let (rss_after_kib, anon_after_kib) = rss_kib(pid)?;

    for s in &mut open {
        let _ = s.write_all(&[b'X', 0, 0, 0, 4]); // Terminate
    }
    drop(open);
    std::thread::sleep(Duration::from_millis(1500));
    let (rss_closed_kib, _) = rss_kib(pid)?;
    Ok(IdleReport { sessions: n, rss_before_kib, rss_after_kib, rss_closed_kib, anon_before_kib, anon_after_kib, login_secs })
}

/// Log in (cleartext password only) and run `select 1`; returns the idle connection.
fn login(port: u16, user: &str, database: &str, password: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).with_context(|| format!("connecting to 127.0.0.1:{port}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;

    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes()); // protocol 3.0
    for (k, v) in [("user", user), ("database", database), ("application_name", "pgward-bench-idle")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut msg = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    msg.extend_from_slice(&body);
    s.write_all(&msg)?;

    let mut queried = false;
    loop {
        let (tag, body) = read_message(&mut s)?;
        match tag {
            b'R' => {
                let code = i32::from_be_bytes(body.get(..4).context("short authentication message")?.try_into()?);
                match code {
                    0 => {}
                    3 => s.write_all(&frame(b'p', &[password.as_bytes(), b"\0"].concat()))?,
                    other => bail!("the idle client only does cleartext passwords (server asked for auth method {other})"),
                }
            }
            b'E' => bail!("server error: {}", error_message(&body)),
            b'Z' if !queried => {
                s.write_all(&frame(b'Q', b"select 1\0"))?;
                queried = true;
            }
            b'Z' => return Ok(s),
            _ => {} // ParameterStatus, BackendKeyData, NoticeResponse, RowDescription, DataRow, ...
        }
    }
}

fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn read_message(s: &mut TcpStream) -> Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    s.read_exact(&mut head).context("reading from the server")?;
    let len = i32::from_be_bytes(head[1..5].try_into()?);
    if !(4..=1 << 24).contains(&len) {
        bail!("bad message length {len}");
    }
    let mut body = vec![0u8; len as usize - 4];
    s.read_exact(&mut body)?;
    Ok((head[0], body))
}

fn error_message(body: &[u8]) -> String {
    body.split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .filter(|f| f[0] == b'M' || f[0] == b'C')
        .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
