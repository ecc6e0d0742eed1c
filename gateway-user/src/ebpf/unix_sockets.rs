//! The unix-socket check: a real Postgres socket reachable by other users bypasses pgward
//! (aya cannot attach cgroup/connect_unix), so `serve` refuses or warns at start.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::bail;

use super::discover;
use crate::config::{Config, UnixSocketCheck};
use crate::host::accounts::{Accounts, effective_uid};
use crate::host::reach;

/// Refuses (or warns, per `intercept.unix_socket_check`) when a user other than root, pgward's
/// user and the socket's owner (Postgres's user) can connect to a real Postgres unix socket:
/// such a user would bypass pgward. The sockets: every directory the upstream said it uses
/// (`found`) and every configured one. Checks directory search and socket write permission
/// along the whole path, from mode bits and the users and groups NSS knows (not ACLs).
pub fn check_unix_sockets(cfg: &Config, found: Option<&discover::Found>) -> anyhow::Result<()> {
    let ic = &cfg.intercept;
    if ic.unix_socket_check == UnixSocketCheck::Off {
        return Ok(());
    }
    let mut socks: Vec<PathBuf> = match &ic.upstream_socket_dirs {
        Some(d) => d.iter().map(|p| cfg.resolve(p)).collect(),
        None if cfg.upstream.host.starts_with('/') => vec![PathBuf::from(&cfg.upstream.host)],
        None => Vec::new(),
    }
    .into_iter()
    .map(|d| d.join(format!(".s.PGSQL.{}", cfg.upstream.port.first())))
    .collect();
    if let Some(f) = found {
        for d in &f.socket_dirs {
            let s = d.join(format!(".s.PGSQL.{}", f.port));
            if !socks.contains(&s) {
                socks.push(s);
            }
        }
    }
    if cfg.server.unix_socket_dir.is_none() {
        tracing::warn!("intercept: server.unix_socket_dir is not set; clients using the default unix socket path do not reach pgward");
    }
    let mut users = Accounts::load_nss();
    let me = effective_uid();
    for sock in socks {
        let problem = match fs::symlink_metadata(&sock) {
            Err(e) => {
                tracing::warn!(socket = %sock.display(), error = %e, "intercept: the real Postgres socket is not there; cannot check who can reach it");
                continue;
            }
            Ok(m) => {
                for gid in reach::path_groups(&sock) {
                    users.add_group(gid);
                }
                let allowed = [0, me, m.uid()];
                reach::reachable_by_others(&sock, true, &allowed, &users)
            }
        };
        let Some(who) = problem else {
            tracing::info!(socket = %sock.display(), "intercept: the real Postgres socket is private");
            continue;
        };
        let msg = format!(
            "intercept: the real Postgres socket {} can be reached by {who}, bypassing pgward; \
             move it into a directory only pgward's user can enter (e.g. mode 0700 or 0750 with a \
             group of pgward only)",
            sock.display()
        );
        match ic.unix_socket_check {
            UnixSocketCheck::Refuse => bail!("{msg} (intercept.unix_socket_check = \"refuse\")"),
            _ => tracing::warn!("{msg}"),
        }
    }
    Ok(())
}
