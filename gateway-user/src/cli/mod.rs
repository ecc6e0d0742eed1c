//! The `pgward` command line: one file per subcommand.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod access;
pub mod audit;
pub mod doctor;
pub mod init;
pub mod install;
pub mod intercept;
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
    /// Show the pinned interception programs, whether a gateway serves, and the counters.
    Status(status::StatusArgs),
    /// Interception admin: `detach` removes the pinned programs (audited).
    #[command(subcommand)]
    Intercept(intercept::InterceptCommand),
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
    /// Make this host a pgward appliance: system user, /etc/pgward, audit log, Postgres socket
    /// lockdown, sandboxed systemd unit (recorded for `uninstall`).
    Install(Box<install::InstallArgs>),
    /// Undo `pgward install` (the audit log is kept unless --purge).
    Uninstall(install::UninstallArgs),
    /// Check kernel, capabilities, cgroups, interception, socket lockdown, audit directory,
    /// clock and keys; a pass/fail table with fixes.
    Doctor(doctor::DoctorArgs),
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

/// Write `text` to stdout; a reader that went away (`pgward status | head -1`) ends the output
/// quietly instead of being an error (or, with println!, a panic).
pub fn print_quietly(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Entry point of the binary: parse, dispatch, turn errors into a message and exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Init(a) => init::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Status(a) => status::run(a),
        Command::Intercept(c) => intercept::run(c),
        Command::Token(c) => token::run(c),
        Command::Access(c) => access::run(c),
        Command::Audit(c) => audit::run(c),
        Command::Policy(c) => policy::run(c),
        Command::Install(a) => install::run_install(*a),
        Command::Uninstall(a) => install::run_uninstall(a),
        Command::Doctor(a) => doctor::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pgward: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
