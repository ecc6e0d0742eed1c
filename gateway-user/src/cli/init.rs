//! `pgward init`: write a working configuration directory.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Directory to write pgward.toml and everything it references into.
    #[arg(long)]
    pub dir: PathBuf,
    /// Address pgward listens on, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub listen: String,
    /// The real Postgres: postgres://USER@HOST:PORT/DB or postgres://USER@/DB?host=/socket/dir
    #[arg(long)]
    pub upstream: String,
    /// File holding the service role's password (copied into DIR, mode 0600).
    #[arg(long)]
    pub upstream_password_file: Option<PathBuf>,
    /// Overwrite an existing configuration.
    #[arg(long)]
    pub force: bool,
}

pub fn run(_args: InitArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
