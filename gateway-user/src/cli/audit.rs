//! `pgward audit tail|verify|replay`

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Print audit records (optionally following new ones).
    Tail(TailArgs),
    /// Check the hash chain and checkpoint signatures; exit 1 naming the first bad record.
    Verify(VerifyArgs),
    /// Replay one session's statements and outcomes with the original timing scaled.
    Replay(ReplayArgs),
}

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Keep printing records as they are appended.
    #[arg(short = 'f', long)]
    pub follow: bool,
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub session: Option<String>,
    /// Only records at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Print the records exactly as stored, one JSON object per line.
    #[arg(long)]
    pub json: bool,
    /// Print only the last N records before following (default: all).
    #[arg(short = 'n', long)]
    pub lines: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Session id (as shown by `audit tail`).
    pub session: String,
    /// Speed factor (2 = twice as fast) or `max` for no waiting.
    #[arg(long, default_value = "1")]
    pub speed: String,
}

pub fn run(_cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
