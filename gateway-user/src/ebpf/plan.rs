//! What to steer where: redirect targets, protected and guarded addresses, and the bind
//! guard's ports, computed from the config (pure), and their kernel encodings (rule keys,
//! `PGW_CONFIG`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use anyhow::{Context, bail};
use gateway_common::{self as common, RuleKey};

use super::addr::{ip_words, mapped};
use super::discover;
use super::net::local_addresses;
use crate::config::Config;

/// Redirect targets and rules, computed from the config (pure, unit-tested).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    pub(super) protected: Vec<SocketAddr>,
    pub(super) guard: Vec<SocketAddr>,
    pub(super) redirect4: Option<SocketAddr>,
    pub(super) redirect6: Option<SocketAddr>,
}

impl Plan {
    /// `found`: where the upstream said it listens (its TCP port is guarded too).
    pub(super) fn new(cfg: &Config, listen: SocketAddr, found: Option<&discover::Found>) -> anyhow::Result<Plan> {
        let ic = &cfg.intercept;
        let parse = |s: &String| s.parse::<SocketAddr>().with_context(|| format!("intercept: {s:?} is not ADDR:PORT"));
        let protected = ic.protected.iter().map(parse).collect::<anyhow::Result<Vec<_>>>()?;
        let (d4, d6) = default_redirects(listen);
        let redirect4 = ic.redirect_to.as_ref().map(parse).transpose()?.or(d4);
        let redirect6 = ic.redirect_to6.as_ref().map(parse).transpose()?.or(d6);
        if let Some(r) = redirect4
            && !r.is_ipv4()
        {
            bail!("intercept.redirect_to must be an IPv4 ADDR:PORT, got {r}");
        }
        let guard = match &ic.guard {
            Some(g) => g.iter().map(parse).collect::<anyhow::Result<Vec<_>>>()?,
            None => default_guard(cfg, &local_addresses(), found),
        };
        let guard: Vec<SocketAddr> = guard.into_iter().filter(|g| !covers(&protected, g)).collect();
        if redirect4.is_none() && protected.iter().any(|p| p.is_ipv4()) {
            tracing::warn!("intercept: pgward has no IPv4 listener to redirect to; protected IPv4 connects will be refused");
        }
        Ok(Plan { protected, guard, redirect4, redirect6 })
    }

    pub(super) fn rule_entries(&self) -> Vec<(RuleKey, u32)> {
        let mut out: Vec<(RuleKey, u32)> = Vec::new();
        for (list, action) in [(&self.guard, common::ACTION_REFUSE), (&self.protected, common::ACTION_REDIRECT)] {
            for a in list {
                let key = rule_key(a);
                out.retain(|(k, _)| *k != key); // protected wins over guard
                out.push((key, action));
            }
        }
        out
    }

    /// The bind guard's ports: where protected connects land (the redirect targets) and
    /// pgward's listener.
    pub(super) fn bind_ports(&self, listen: SocketAddr) -> Vec<u16> {
        let mut out = vec![listen.port()];
        for p in [self.redirect4, self.redirect6].into_iter().flatten().map(|a| a.port()) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }

    pub(super) fn kernel_config(&self, netns_cookie: u64, gateway_cgroup_id: u64, exempt_uid: Option<u32>) -> common::Config {
        let mut c = common::Config {
            host_netns_cookie: netns_cookie,
            gateway_cgroup_id,
            exempt_uid: exempt_uid.unwrap_or(common::NO_UID),
            ..Default::default()
        };
        if let Some(SocketAddr::V4(a)) = self.redirect4 {
            c.redirect4_ip = u32::from_ne_bytes(a.ip().octets());
            c.redirect4_port = a.port() as u32;
        }
        if let Some(a) = self.redirect6 {
            c.redirect6_ip = ip_words(&mapped(a.ip()));
            c.redirect6_port = a.port() as u32;
        }
        c
    }
}

/// pgward's listener as seen from IPv4 and IPv6 clients.
fn default_redirects(listen: SocketAddr) -> (Option<SocketAddr>, Option<SocketAddr>) {
    let port = listen.port();
    match listen.ip() {
        IpAddr::V4(ip) => {
            let ip = if ip.is_unspecified() { Ipv4Addr::LOCALHOST } else { ip };
            (Some((ip, port).into()), Some((ip.to_ipv6_mapped(), port).into()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            (Some((Ipv4Addr::LOCALHOST, port).into()), Some((Ipv6Addr::LOCALHOST, port).into()))
        }
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => (Some((v4, port).into()), Some((ip, port).into())),
            None => (None, Some((ip, port).into())),
        },
    }
}

/// The real upstream: any address on its port when it is local (a local Postgres listening on
/// `*` is reachable through every local address), else exactly — for every host of a
/// multi-host upstream. With `found` (what the server said): the port it really listens on,
/// also when the configured upstream is a unix socket, unless it listens on no TCP address at
/// all.
fn default_guard(cfg: &Config, local: &[IpAddr], found: Option<&discover::Found>) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    let mut push = |e: SocketAddr| {
        if !out.contains(&e) {
            out.push(e);
        }
    };
    let any = |port: u16| -> [SocketAddr; 2] { [(Ipv4Addr::UNSPECIFIED, port).into(), (Ipv6Addr::UNSPECIFIED, port).into()] };
    let listens_tcp = found.is_some_and(|f| !f.listen_addresses.is_empty());
    for (host, port) in cfg.upstream.endpoints().unwrap_or_default() {
        if host.starts_with('/') {
            // A unix-socket upstream is local: whatever TCP port it also has is guarded everywhere.
            if let Some(f) = found.filter(|_| listens_tcp) {
                any(f.port).into_iter().for_each(&mut push);
            }
            continue;
        }
        let addrs: Vec<SocketAddr> = match (host.as_str(), port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                tracing::warn!(host = %host, error = %e, "intercept: cannot resolve the upstream for the guard");
                continue;
            }
        };
        let ports: Vec<u16> = match found.filter(|_| listens_tcp) {
            Some(f) if f.port != port => vec![port, f.port],
            _ => vec![port],
        };
        for a in addrs {
            let ip = a.ip();
            for &port in &ports {
                if ip.is_loopback() || ip.is_unspecified() || local.contains(&ip) {
                    any(port).into_iter().for_each(&mut push);
                } else {
                    push(SocketAddr::new(ip, port));
                }
            }
        }
    }
    out
}

/// Whether a protected entry already matches `a` (same port; same address or "any").
fn covers(protected: &[SocketAddr], a: &SocketAddr) -> bool {
    let k = rule_key(a);
    protected.iter().any(|p| {
        let pk = rule_key(p);
        pk.family == k.family && pk.port == k.port && (pk.addr == [0; 4] || pk.addr == k.addr)
    })
}

fn rule_key(a: &SocketAddr) -> RuleKey {
    let port = a.port() as u32;
    match a.ip() {
        IpAddr::V4(ip) => RuleKey { family: 4, port, addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0] },
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => RuleKey { family: 4, port, addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0] },
            None => RuleKey { family: 6, port, addr: ip_words(&ip) },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::addr::words_octets;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:6432"
tls_cert = "c.pem"
tls_key = "k.pem"
[upstream]
host = "127.0.0.1"
port = 5433
user = "svc"
[auth]
issuer = "i"
audience = "a"
jwks = "j"
signing_key = "k"
signing_kid = "kid"
[audit]
dir = "audit"
{extra}
"#
        );
        toml::from_str(&text).unwrap()
    }

    #[test]
    fn config_without_intercept_section_loads_with_defaults() {
        let c = cfg("");
        assert!(!c.intercept.enabled);
        assert_eq!(c.intercept.protected, ["0.0.0.0:5432", "[::]:5432"]);
        assert!(!c.to_toml().contains("[intercept]"), "default section is not written");
        let c = cfg("[intercept]\nenabled = true\n");
        assert!(c.intercept.enabled && c.to_toml().contains("[intercept]"));
    }

    #[test]
    fn redirect_targets_follow_the_listener() {
        let p = |s: &str| default_redirects(s.parse().unwrap());
        assert_eq!(p("127.0.0.1:6432"), (Some("127.0.0.1:6432".parse().unwrap()), Some("[::ffff:127.0.0.1]:6432".parse().unwrap())));
        assert_eq!(p("0.0.0.0:6432").0, Some("127.0.0.1:6432".parse().unwrap()));
        assert_eq!(p("[::]:6432"), (Some("127.0.0.1:6432".parse().unwrap()), Some("[::1]:6432".parse().unwrap())));
        assert_eq!(p("[::1]:6432"), (None, Some("[::1]:6432".parse().unwrap())));
    }

    #[test]
    fn guard_defaults_to_the_local_upstream_port_on_any_address() {
        let c = cfg("[intercept]\nenabled = true\n");
        let plan = Plan::new(&c, "127.0.0.1:6432".parse().unwrap(), None).unwrap();
        assert_eq!(plan.guard, ["0.0.0.0:5433".parse::<SocketAddr>().unwrap(), "[::]:5433".parse().unwrap()]);
        let rules = plan.rule_entries();
        assert_eq!(rules.len(), 4);
        let any5432 = RuleKey { family: 4, port: 5432, addr: [0; 4] };
        assert!(rules.contains(&(any5432, common::ACTION_REDIRECT)));
        assert!(rules.contains(&(RuleKey { family: 6, port: 5433, addr: [0; 4] }, common::ACTION_REFUSE)));
    }

    #[test]
    fn upstream_on_a_protected_port_is_not_guarded() {
        // The in-place layout: Postgres stays on the protected port; pgward is exempt.
        let mut c = cfg("[intercept]\nenabled = true\nprotected = [\"0.0.0.0:5433\", \"[::]:5433\"]\n");
        c.upstream.port = crate::config::Ports(vec![5433]);
        let plan = Plan::new(&c, "127.0.0.1:6432".parse().unwrap(), None).unwrap();
        assert!(plan.guard.is_empty(), "{:?}", plan.guard);
        c.upstream.host = "/var/run/postgresql".into();
        assert!(default_guard(&c, &[], None).is_empty());
        // ...but a TCP port the server says it listens on is guarded even then.
        let found = discover::Found { socket_dirs: vec![], unchecked_socket_dirs: vec![], listen_addresses: vec!["*".into()], port: 5499 };
        assert_eq!(default_guard(&c, &[], Some(&found)), ["0.0.0.0:5499".parse::<SocketAddr>().unwrap(), "[::]:5499".parse().unwrap()]);
        let no_tcp = discover::Found { listen_addresses: vec![], ..found };
        assert!(default_guard(&c, &[], Some(&no_tcp)).is_empty());
    }

    #[test]
    fn bind_guard_covers_the_listener_and_the_redirect_targets() {
        let c = cfg("[intercept]\nenabled = true\n");
        let listen: SocketAddr = "127.0.0.1:6432".parse().unwrap();
        assert_eq!(Plan::new(&c, listen, None).unwrap().bind_ports(listen), [6432]);
        let c = cfg("[intercept]\nenabled = true\nredirect_to = \"127.0.0.1:7000\"\n");
        assert_eq!(Plan::new(&c, listen, None).unwrap().bind_ports(listen), [6432, 7000]);
    }

    #[test]
    fn rule_keys_use_kernel_byte_order() {
        let k = rule_key(&"127.0.0.1:5432".parse().unwrap());
        assert_eq!(k.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(k.port, 5432);
        // v4-mapped IPv6 destinations are IPv4 rules.
        assert_eq!(rule_key(&"[::ffff:127.0.0.1]:5432".parse().unwrap()), k);
        let k6 = rule_key(&"[fd00::2]:5432".parse().unwrap());
        assert_eq!((k6.family, words_octets(&k6.addr)), (6, "fd00::2".parse::<Ipv6Addr>().unwrap().octets()));
        let c = Plan { protected: vec![], guard: vec![], redirect4: Some("127.0.0.1:6432".parse().unwrap()), redirect6: Some("[::ffff:127.0.0.1]:6432".parse().unwrap()) }
            .kernel_config(7, 9, None);
        assert_eq!((c.redirect4_ip.to_ne_bytes(), c.redirect4_port, c.exempt_uid), ([127, 0, 0, 1], 6432, common::NO_UID));
        assert_eq!(words_octets(&c.redirect6_ip)[10..], [0xff, 0xff, 127, 0, 0, 1]);
    }
}
