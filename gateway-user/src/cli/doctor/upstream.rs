//! The real Postgres: listening on loopback only, so clients cannot reach it around pgward.

use std::net::{IpAddr, SocketAddr};

use super::Ctx;
use super::proc_net::{is_loopback, tcp_listeners};
use super::report::{Check, Outcome, check};

pub(super) fn postgres_loopback(cx: &Ctx) -> Check {
    let name = "postgres loopback";
    let up = &cx.cfg.upstream;
    if !up.host.starts_with('/') {
        let local = up.host == "localhost"
            || up
                .host
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<IpAddr>()
                .is_ok_and(|ip| is_loopback(ip) || ip.is_unspecified());
        if !local {
            return check(name, Outcome::Skip, format!("the upstream {} is on another host", up.host), None);
        }
    }
    // A local upstream is a single host: its port is the first (only) one.
    let port = up.port.first();
    let listeners: Vec<SocketAddr> = tcp_listeners().into_iter().map(|(a, _)| a).filter(|a| a.port() == port).collect();
    if listeners.is_empty() {
        return check(
            name,
            Outcome::Warn,
            format!("nothing listens on TCP port {port} (Postgres not running?)"),
            Some("start Postgres".into()),
        );
    }
    let open: Vec<String> = listeners.iter().filter(|a| !is_loopback(a.ip())).map(|a| a.to_string()).collect();
    if !open.is_empty() {
        return check(
            name,
            Outcome::Fail,
            format!("port {port} is listened on at {} (not loopback only)", open.join(", ")),
            Some(
                "listen_addresses = '127.0.0.1' in postgresql.conf (pgward install sets it), then restart Postgres"
                    .into(),
            ),
        );
    }
    let list: Vec<String> = listeners.iter().map(|a| a.to_string()).collect();
    check(name, Outcome::Pass, format!("port {port}: {} only", list.join(", ")), None)
}
