//! pgward's Prometheus endpoint (`server.metrics_listen`), as the tests read it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The OpenMetrics text of `GET /metrics` on 127.0.0.1:`port`.
pub fn text(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of the sample line `name value` in `text` (`name` with its labels, e.g.
/// `x_total{reason="dead"}`).
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The value of sample `name` on pgward's metrics page on `port`; 0 when absent.
pub fn value(port: u16, name: &str) -> f64 {
    sample(&text(port), name).unwrap_or(0.0)
}
