//! The `pgward` command line: one file per subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod access;
pub mod audit;
pub mod init;
pub mod policy;
pub mod serve;
pub mod status;
pub mod token;

#[derive(Debug, Parser)]
#[command(name = "pgward", version, about = "Token-authenticated, audited Postgres gateway")]
pub struct Cli {
    /// Log format: human (default on a TTY) or json.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Auto,
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a working configuration directory (config, TLS cert, token keys, audit dir).
    Init(init::InitArgs),
    /// Run the gateway.
    Serve(serve::ServeArgs),
    /// Show the attached interception programs and their counters.
    Status(status::StatusArgs),
    /// Issue and revoke tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Just-in-time access: request a role, approve, list, withdraw.
    #[command(subcommand)]
    Access(access::AccessCommand),
    /// Read, verify and replay the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Check SQL against the policy (dry run) and validate policy files.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
}

pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PGWARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal() && std::env::var_os("PGWARD_LOG_JSON").is_some(),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

/// Entry point of the binary: parse, dispatch, turn errors into a message and exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Init(a) => init::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Status(a) => status::run(a),
        Command::Token(c) => token::run(c),
        Command::Access(c) => access::run(c),
        Command::Audit(c) => audit::run(c),
        Command::Policy(c) => policy::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgward: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
