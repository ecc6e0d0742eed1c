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
/// along the whole path, from mode bits and the users and groups NSS knows (not ACLs). A
/// reported entry that is not an absolute path (an abstract `@name` socket, a relative
/// directory) is always a problem: nothing proves it private.
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
    let mut problems: Vec<String> = found.map(|f| f.unchecked_socket_dirs.iter().map(|d| unchecked_problem(d, f.port)).collect()).unwrap_or_default();
    let mut users = Accounts::load_nss();
    let me = effective_uid();
    for sock in socks {
        let problem = match fs::symlink_metadata(&sock) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(socket = %sock.display(), "intercept: the real Postgres socket is not there; cannot check who can reach it");
                continue;
            }
            // Neither there nor absent: who can reach it is unknown, so it counts as reachable.
            Err(e) => Some(format!("unknown users (pgward cannot inspect it: {e})")),
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
        problems.push(format!(
            "the real Postgres socket {} can be reached by {who}, bypassing pgward; \
             move it into a directory only pgward's user can enter (e.g. mode 0700 or 0750 with a \
             group of pgward only)",
            sock.display()
        ));
    }
    for p in problems {
        let msg = format!("intercept: {p}");
        match ic.unix_socket_check {
            UnixSocketCheck::Refuse => bail!("{msg} (intercept.unix_socket_check = \"refuse\")"),
            _ => tracing::warn!("{msg}"),
        }
    }
    Ok(())
}

/// Why a `unix_socket_directories` entry that is not an absolute path bypasses pgward: an
/// abstract-namespace socket has no file and no permissions (every process of the network
/// namespace can connect to it); a relative one lies below the data directory, which pgward
/// does not inspect.
fn unchecked_problem(entry: &str, port: u16) -> String {
    let sock = format!("{entry}/.s.PGSQL.{port}");
    if entry.starts_with('@') {
        format!(
            "the real Postgres socket {sock} is in the abstract namespace: every local user can reach it \
             (it has no file permissions), bypassing pgward; remove {entry:?} from the server's \
             unix_socket_directories"
        )
    } else {
        format!(
            "the real Postgres socket {sock} is relative to the data directory: pgward cannot check who \
             can reach it; give the server's unix_socket_directories as absolute paths"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abstract_and_relative_socket_entries_are_problems() {
        let a = unchecked_problem("@pg", 5432);
        assert!(a.contains("@pg/.s.PGSQL.5432") && a.contains("every local user"), "{a}");
        let r = unchecked_problem("sock", 5432);
        assert!(r.contains("sock/.s.PGSQL.5432") && r.contains("absolute paths"), "{r}");
    }
}
