//! `pgward serve`: run the gateway.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub config: PathBuf,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let cfg = crate::config::Config::load(&args.config)?;
    crate::server::run(cfg)?;
    Ok(ExitCode::SUCCESS)
}
