//! pgward's own administrative connection to the real Postgres (service credential), for what
//! interception asks of the server at start: its socket settings and its client sessions.
//! Not a client session: never pooled, never relayed, closed when done.

use crate::config::Config;
pub use crate::upstream::Rows;
use crate::upstream::{self, Target, Upstream, UpstreamError};

/// `application_name` of the connection, so it is recognisable in pg_stat_activity and logs.
const APPLICATION_NAME: &str = "pgward:admin";

pub struct AdminConn {
    up: Upstream,
}

impl AdminConn {
    /// Log in as the service role to `upstream.default_database`.
    pub async fn open(cfg: &Config, password: Option<&str>) -> Result<AdminConn, UpstreamError> {
        let target = Target::from_config(cfg);
        let up = upstream::connect(
            &target,
            &cfg.upstream.user,
            password,
            &cfg.upstream.default_database,
            &[("application_name", APPLICATION_NAME)],
        )
        .await?;
        Ok(AdminConn { up })
    }

    /// The server's pid for this connection (never one to end).
    pub fn backend_pid(&self) -> i32 {
        self.up.backend_pid
    }

    /// Run one simple-protocol statement; its rows, or the server's error.
    pub async fn query(&mut self, sql: &str) -> Result<Rows, UpstreamError> {
        self.up.query_rows(sql).await
    }

    pub async fn close(self) {
        self.up.close().await;
    }
}
