//! Clients: how a test reaches a server (pgward or Postgres itself) — psql, tokio-postgres, and
//! the raw protocol client in [`super::raw`].

use std::future::Future;
use std::process::Command;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

use super::raw::{RawConn, RawError};
use super::{CmdOut, run_cmd, scrub_pg_env};

pub fn psql_bin() -> String {
    std::env::var("PGWARD_E2E_PSQL").unwrap_or_else(|_| "/usr/bin/psql".into())
}

/// Where and as whom to connect. `host` is an IP address or (starting with '/') a unix socket dir.
#[derive(Debug, Clone)]
pub struct Login {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The password: a token for pgward, the role's password for Postgres, None for trust.
    pub password: Option<String>,
    pub dbname: String,
    /// libpq sslmode for psql ("disable", "require", ...). tokio-postgres always uses NoTls.
    pub sslmode: String,
}

impl Login {
    pub fn new(host: &str, port: u16, user: &str, password: Option<&str>, dbname: &str) -> Login {
        Login {
            host: host.into(),
            port,
            user: user.into(),
            password: password.map(Into::into),
            dbname: dbname.into(),
            sslmode: "disable".into(),
        }
    }
    pub fn with_user(mut self, user: &str) -> Login {
        self.user = user.into();
        self
    }
    pub fn with_password(mut self, password: &str) -> Login {
        self.password = Some(password.into());
        self
    }
    pub fn with_db(mut self, db: &str) -> Login {
        self.dbname = db.into();
        self
    }
    pub fn with_sslmode(mut self, mode: &str) -> Login {
        self.sslmode = mode.into();
        self
    }
    pub fn is_unix(&self) -> bool {
        self.host.starts_with('/')
    }

    /// libpq connection string (password goes through PGPASSWORD, never the command line).
    pub fn conninfo(&self) -> String {
        fn q(v: &str) -> String {
            format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
        }
        let mut s = format!(
            "host={} port={} user={} dbname={} connect_timeout=15",
            q(&self.host),
            self.port,
            q(&self.user),
            q(&self.dbname)
        );
        if !self.is_unix() {
            s.push_str(&format!(" sslmode={}", q(&self.sslmode)));
        }
        s
    }

    /// Run psql with `-X -v ON_ERROR_STOP=1 -v VERBOSITY=verbose -At -w` plus `args`.
    /// VERBOSITY=verbose makes psql print SQLSTATEs ("ERROR:  22012: ..."); see
    /// [`CmdOut::sqlstates`]. Connection failures print no SQLSTATE (libpq limitation); use
    /// tokio-postgres for those.
    pub fn psql(&self, args: &[&str]) -> CmdOut {
        self.psql_with_stdin(args, None)
    }

    /// psql with data on its standard input (for `\copy ... from pstdin`).
    pub fn psql_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> CmdOut {
        let mut cmd = Command::new(psql_bin());
        scrub_pg_env(&mut cmd);
        match &self.password {
            Some(p) => cmd.env("PGPASSWORD", p),
            None => cmd.env_remove("PGPASSWORD"),
        };
        cmd.args([
            "-X",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            "VERBOSITY=verbose",
            "-At",
            "-w",
            "-d",
        ])
        .arg(self.conninfo())
        .args(args);
        let mut out = run_cmd(&mut cmd, stdin, Duration::from_secs(120));
        // Do not leak the password into panic messages via Debug of the command.
        if let Some(p) = &self.password {
            out.what = out.what.replace(p.as_str(), "<password>");
        }
        out
    }

    /// psql -c SQL.
    pub fn sql(&self, sql: &str) -> CmdOut {
        self.psql(&["-c", sql])
    }

    pub fn pg_config(&self) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .ssl_mode(tokio_postgres::config::SslMode::Disable)
            .connect_timeout(Duration::from_secs(15));
        if let Some(p) = &self.password {
            cfg.password(p.as_bytes());
        }
        cfg
    }

    /// tokio-postgres client; its connection is driven by a spawned task (needs a runtime).
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, conn) =
            within("tokio-postgres connect", self.pg_config().connect(NoTls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// tokio-postgres client whose notices and notifications are delivered on the receiver.
    pub async fn connect_with_messages(
        &self,
    ) -> Result<(Client, mpsc::UnboundedReceiver<AsyncMessage>), tokio_postgres::Error> {
        let (client, mut conn) =
            within("tokio-postgres connect", self.pg_config().connect(NoTls)).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Ok(m)) = std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                let _ = tx.send(m);
            }
        });
        Ok((client, rx))
    }

    /// The raw protocol client (plaintext; cleartext-password or trust authentication).
    pub fn raw(&self) -> Result<RawConn, RawError> {
        RawConn::connect(self, &[])
    }
    /// Raw client with extra startup parameters (e.g. client_encoding).
    pub fn raw_with(&self, params: &[(&str, &str)]) -> Result<RawConn, RawError> {
        RawConn::connect(self, params)
    }
}

/// The SQLSTATE of a tokio-postgres error that came from the server.
/// Run `select current_user` (simple protocol); Ok(user) or the error.
pub async fn current_user(c: &Client) -> Result<String, tokio_postgres::Error> {
    let msgs = within("select current_user", c.simple_query("select current_user")).await?;
    Ok(msgs
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(String::from),
            _ => None,
        })
        .unwrap_or_default())
}

pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.as_db_error().map(|d| d.code().code().to_string())
}

/// Await `fut`, panicking if it takes longer than 60 s (a hung gateway must fail the test,
/// not hang the suite). Not a performance assertion.
#[track_caller]
pub fn within<F: Future>(what: &str, fut: F) -> impl Future<Output = F::Output> {
    let what = what.to_string();
    let loc = std::panic::Location::caller();
    async move {
        match tokio::time::timeout(Duration::from_secs(60), fut).await {
            Ok(v) => v,
            Err(_) => panic!("timed out (60 s) at {loc}: {what}"),
        }
    }
}
