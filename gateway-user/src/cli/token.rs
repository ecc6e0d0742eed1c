//! `pgward token …`

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Print a signed JWT for USER on stdout (and nothing else).
    Issue(IssueArgs),
}

#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long)]
    pub user: String,
    /// Comma-separated groups.
    #[arg(long, value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Lifetime, e.g. 15m, 1h (default from the config).
    #[arg(long)]
    pub ttl: Option<String>,
}

pub fn run(_cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
