//! `pgward token …`

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::auth::{Signer, Verifier};
use crate::config::Config;

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Print a signed JWT for USER on stdout (and nothing else).
    Issue(IssueArgs),
    /// Revoke one token (--jti, or the token itself with --token-file) or every token of a user
    /// issued until now (--user). A running
    /// `serve` refuses them from its next look at the revocation file (within a second): live
    /// sessions end at their next statement, new logins are refused.
    Revoke(RevokeArgs),
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["jti", "user", "token_file"])))]
pub struct RevokeArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// The token's id (`jti`; audit records show it).
    #[arg(long)]
    pub jti: Option<String>,
    /// A file holding the token to revoke (`-`: stdin), e.g. one found leaked: its `jti`, or,
    /// for a token without one, `sha256:` and its hash (the id audit records show for it).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Every token of this user issued at or before now.
    #[arg(long)]
    pub user: Option<String>,
    /// Why (goes into the audit log).
    #[arg(long)]
    pub reason: Option<String>,
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

pub fn run(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Issue(args) => {
            let token = issue(&args)?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{token}").and_then(|_| out.flush()).context("cannot write the token")?;
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Revoke(args) => {
            let text = revoke(&args)?;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes()).and_then(|_| out.flush()).context("cannot write to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Append the revocation; the message for stdout.
fn revoke(args: &RevokeArgs) -> anyhow::Result<String> {
    let cfg = Config::load(&args.config)?;
    let from_token = args.token_file.as_deref().map(token_id_from_file).transpose()?;
    let jti = from_token.as_deref().or(args.jti.as_deref());
    let store = crate::access::Store::open(&cfg)?;
    let r = store.revoke(jti, args.user.as_deref(), args.reason.as_deref())?;
    let when = crate::access::rfc3339(r.at);
    Ok(match (&r.jti, &r.user) {
        (Some(j), _) => format!("revoked token {j} ({}, at {when})\n", r.id),
        (_, Some(u)) => format!("revoked every token of user {u} issued at or before {when} ({})\n", r.id),
        _ => format!("revoked ({}, at {when})\n", r.id),
    })
}

/// The id of the token in `path` (`-`: stdin), read without verifying it: whatever token an
/// operator holds can be revoked, also one already expired or signed by a retired key.
fn token_id_from_file(path: &std::path::Path) -> anyhow::Result<String> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("cannot read the token from stdin")?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
    };
    crate::auth::token_id(&text)
        .with_context(|| format!("{} does not hold a JWT (header.payload.signature)", path.display()))
}

/// The token for `pgward token issue` (everything except printing it).
fn issue(args: &IssueArgs) -> anyhow::Result<String> {
    let cfg = Config::load(&args.config)?;
    let ttl = resolve_ttl(args.ttl.as_deref(), &cfg)?;
    let user = args.user.trim();
    if user.is_empty() {
        bail!("--user must not be empty");
    }
    let groups: Vec<String> =
        args.groups.iter().map(|g| g.trim()).filter(|g| !g.is_empty()).map(str::to_owned).collect();

    let signer = Signer::load(&cfg)?;
    let token = signer.issue(user, &groups, ttl, &cfg.auth.issuer, &cfg.auth.audience)?;

    // The gateway verifies with auth.jwks; warn (on stderr) if that would not accept this
    // token, e.g. because the JWKS does not contain the signing key.
    if cfg.auth.remote_keys() {
        eprintln!(
            "pgward: warning: the gateway verifies tokens against the identity provider's keys (auth.jwks_url / auth.discovery) and will not accept this token"
        );
        return Ok(token);
    }
    match Verifier::load(&cfg).and_then(|v| v.verify(&token, user)) {
        Ok(_) => {}
        Err(e) => eprintln!("pgward: warning: the gateway would not accept this token: {e}"),
    }
    Ok(token)
}

fn resolve_ttl(arg: Option<&str>, cfg: &Config) -> anyhow::Result<Duration> {
    let ttl = match arg {
        None => cfg.auth.default_ttl,
        Some(s) => humantime::parse_duration(s.trim())
            .with_context(|| format!("--ttl {s:?} is not a duration (e.g. 15m, 1h)"))?,
    };
    if ttl < Duration::from_secs(1) {
        bail!("the token lifetime must be at least 1s (got {})", humantime::format_duration(ttl));
    }
    if ttl > cfg.auth.max_ttl {
        bail!(
            "the token lifetime {} exceeds auth.max_ttl = {} in the config",
            humantime::format_duration(ttl),
            humantime::format_duration(cfg.auth.max_ttl)
        );
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("conf");
        let init = crate::cli::init::InitArgs {
            dir: dir.clone(),
            listen: "127.0.0.1:6432".into(),
            upstream: "postgres://svc@/db?host=/tmp".into(),
            upstream_password_file: None,
            force: false,
        };
        crate::cli::init::run(init).unwrap();
        (tmp, dir.join("pgward.toml"))
    }

    fn args(config: &std::path::Path, ttl: Option<&str>) -> IssueArgs {
        IssueArgs {
            config: config.to_owned(),
            user: "alice".into(),
            groups: vec!["a".into(), " b ".into(), "".into()],
            ttl: ttl.map(Into::into),
        }
    }

    #[test]
    fn issue_and_ttl_limits() {
        let (_tmp, config) = setup();
        let cfg = Config::load(&config).unwrap();
        let verifier = Verifier::load(&cfg).unwrap();

        let token = issue(&args(&config, None)).unwrap();
        assert_eq!(token.split('.').count(), 3);
        let id = verifier.verify(&token, "alice").unwrap();
        assert_eq!(id.groups, vec!["a".to_string(), "b".to_string()]);
        let default_ttl = cfg.auth.default_ttl.as_secs() as i64;
        let now = chrono::Utc::now().timestamp();
        assert!((id.expires_at - now - default_ttl).abs() <= 2, "default ttl used");

        let id = verifier.verify(&issue(&args(&config, Some("1h"))).unwrap(), "alice").unwrap();
        assert!((id.expires_at - now - 3600).abs() <= 2);

        for (ttl, msg) in
            [("0s", "at least 1s"), ("13h", "exceeds auth.max_ttl"), ("soon", "not a duration")]
        {
            let e = format!("{:#}", issue(&args(&config, Some(ttl))).unwrap_err());
            assert!(e.contains(msg), "{ttl}: {e}");
        }
        let mut a = args(&config, None);
        a.user = " ".into();
        assert!(issue(&a).is_err());
    }
}
