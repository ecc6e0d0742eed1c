//! What the real Postgres says about where it listens: `unix_socket_directories`,
//! `listen_addresses` and `port`, asked at start with the service credential. The unix-socket
//! check and the TCP guard apply to what is found here, not only to what is configured.
//! `unix_socket_directories` is readable by superusers and members of `pg_read_all_settings`.

use std::path::PathBuf;

use anyhow::{Context, anyhow};

use crate::upstream_admin::AdminConn;

const QUERY: &str = "SELECT current_setting('unix_socket_directories'), \
                     current_setting('listen_addresses'), current_setting('port')";
/// The server's own view of its listening sockets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Found {
    /// Absolute directories holding `.s.PGSQL.<port>`.
    pub socket_dirs: Vec<PathBuf>,
    /// The other `unix_socket_directories` entries: abstract-namespace names (`@name`, which
    /// every process of the network namespace can connect to: no file, no permissions) and
    /// relative directories. The unix-socket check cannot prove any of them private.
    pub unchecked_socket_dirs: Vec<String>,
    /// As configured: `*`, host names or addresses (empty: no TCP at all).
    pub listen_addresses: Vec<String>,
    pub port: u16,
}

pub async fn discover(conn: &mut AdminConn) -> anyhow::Result<Found> {
    let rows = conn.query(QUERY).await.map_err(|e| {
        if e.sqlstate() == crate::sqlstate::INSUFFICIENT_PRIVILEGE {
            anyhow!(
                "intercept: the service role may not read unix_socket_directories ({e}); \
                 GRANT pg_read_all_settings TO <service role>"
            )
        } else {
            anyhow!("intercept: asking the upstream where it listens: {e}")
        }
    })?;
    let row = rows.first().context("intercept: the upstream returned no settings row")?;
    let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let port = get(2).trim().parse::<u16>().with_context(|| format!("intercept: upstream port {:?}", get(2)))?;
    let (socket_dirs, unchecked_socket_dirs) = socket_dirs(&get(0));
    Ok(Found { socket_dirs, unchecked_socket_dirs, listen_addresses: split_list(&get(1)), port })
}

/// Postgres's list syntax: comma-separated, optionally double-quoted entries.
fn split_list(s: &str) -> Vec<String> {
    s.split(',').map(|e| e.trim().trim_matches('"').to_string()).filter(|e| !e.is_empty()).collect()
}

/// (absolute directories, every other entry: `@abstract` names and relative paths).
fn socket_dirs(s: &str) -> (Vec<PathBuf>, Vec<String>) {
    let (abs, other): (Vec<String>, Vec<String>) = split_list(s).into_iter().partition(|d| d.starts_with('/'));
    (abs.into_iter().map(PathBuf::from).collect(), other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_lists_are_split_like_postgres() {
        let (abs, other) = socket_dirs("/var/run/postgresql, \"/tmp\", @abstract, sock");
        assert_eq!(abs, [PathBuf::from("/var/run/postgresql"), "/tmp".into()]);
        assert_eq!(other, ["@abstract", "sock"], "abstract and relative entries are kept, to be refused");
        assert_eq!(split_list("*"), ["*"]);
        assert!(split_list("").is_empty(), "listen_addresses = '' means no TCP");
        assert_eq!(split_list("localhost, 10.0.0.1"), ["localhost", "10.0.0.1"]);
    }
}
