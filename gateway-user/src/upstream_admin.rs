//! pgward's own administrative connection to the real Postgres (service credential), for what
//! interception asks of the server at start: its socket settings and its client sessions.
//! Not a client session: never pooled, never relayed, closed when done.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;

use crate::config::Config;
use crate::upstream::{self, Target, Upstream, UpstreamError};
use crate::wire::{self, Reader, WireError};

/// `application_name` of the connection, so it is recognisable in pg_stat_activity and logs.
const APPLICATION_NAME: &str = "pgward:admin";

/// A text-format result: rows of nullable column values.
pub type Rows = Vec<Vec<Option<String>>>;

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
        let mut out = BytesMut::new();
        wire::query(&mut out, sql);
        self.up.stream.write_all(&out).await.map_err(WireError::Io)?;
        let mut rows = Vec::new();
        let mut failure = None;
        loop {
            let f = wire::read_frame(&mut self.up.stream, &mut self.up.leftover, wire::MAX_FRAME).await?;
            match f.tag {
                b'D' => rows.push(data_row(f.body())?),
                b'E' => {
                    let e = wire::decode_error(&f);
                    failure = Some(UpstreamError::Server { code: e.code, message: e.message });
                }
                b'Z' => return failure.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }

    pub async fn close(self) {
        self.up.close().await;
    }
}

fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, WireError> {
    let mut r = Reader::new(body);
    let n = r.i16()?;
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = r.i32()?;
        row.push(if len < 0 { None } else { Some(String::from_utf8_lossy(r.bytes(len as usize)?).into_owned()) });
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    #[test]
    fn data_rows_decode_nulls_and_text() {
        let mut body = Vec::new();
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert_eq!(super::data_row(&body).unwrap(), vec![None, Some("abc".to_string())]);
        assert!(super::data_row(&body[..7]).is_err(), "truncated");
    }
}
