//! `pgward access …`: just-in-time access requests, approvals, the list, and withdrawal.
//!
//! The commands write to the `[access] backend` — the state files in `[access] state_dir`, or
//! etcd, shared by every gateway (see `crate::access`); each running `serve` notices within a
//! second, writes the audit records and applies the grant.
//! Exit status: 0 done, 1 refused (not allowed by the rules), 2 error.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::access::{AccessError, AccessRequest, Store, rfc3339};
use crate::host::clock::now_unix;
use crate::auth::{AuthError, Verifier};
use crate::config::Config;

#[derive(Debug, clap::Subcommand)]
pub enum AccessCommand {
    /// Ask for a database role for a while; prints the request id.
    Request(RequestArgs),
    /// Approve a request. Needs the approver's token (--token or PGWARD_TOKEN): its subject
    /// must be --approver, who must not be the requester and must be in an approver group.
    Approve(ApproveArgs),
    /// List requests and grants with their state (pending, active, expired, revoked, lapsed).
    List(ListArgs),
    /// Withdraw a pending request or end an active grant early (sessions using it end).
    Revoke(RevokeArgs),
}

#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Who needs the access (the token subject).
    #[arg(long)]
    pub user: String,
    /// The database role (one of [access] grantable_roles).
    #[arg(long)]
    pub role: String,
    /// How long the grant lasts once approved, e.g. 30m (at most [access] max_ttl).
    #[arg(long)]
    pub ttl: String,
    /// Why (goes into the audit log).
    #[arg(long)]
    pub reason: String,
}

#[derive(Debug, clap::Args)]
pub struct ApproveArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// The request id `access request` printed.
    pub id: String,
    /// The approver's user name (must be the subject of the token).
    #[arg(long)]
    pub approver: String,
    /// The approver's token (`-`: read it from stdin).
    #[arg(long, env = "PGWARD_TOKEN", hide_env_values = true)]
    pub token: String,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[arg(long)]
    pub config: PathBuf,
    /// Only requests of this user.
    #[arg(long)]
    pub user: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    #[arg(long)]
    pub config: PathBuf,
    pub id: String,
    #[arg(long)]
    pub reason: Option<String>,
}

pub fn run(cmd: AccessCommand) -> anyhow::Result<ExitCode> {
    let result = match cmd {
        AccessCommand::Request(a) => request(&a),
        AccessCommand::Approve(a) => approve(&a),
        AccessCommand::List(a) => list(&a),
        AccessCommand::Revoke(a) => revoke(&a),
    };
    match result {
        Ok(out) => {
            let mut o = std::io::stdout().lock();
            o.write_all(out.as_bytes()).and_then(|_| o.flush()).context("cannot write to stdout")?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => match e.downcast_ref::<AccessError>() {
            Some(AccessError::Refused(why)) => {
                eprintln!("pgward: refused: {why}");
                Ok(ExitCode::from(1))
            }
            _ => Err(e),
        },
    }
}

fn request(a: &RequestArgs) -> anyhow::Result<String> {
    let cfg = Config::load(&a.config)?;
    let ttl = humantime::parse_duration(a.ttl.trim())
        .with_context(|| format!("--ttl {:?} is not a duration (e.g. 30m, 2h)", a.ttl))?;
    if ttl < Duration::from_secs(1) {
        anyhow::bail!("--ttl must be at least 1s");
    }
    if ttl > cfg.access.max_ttl {
        return Err(AccessError::Refused(format!(
            "--ttl {} exceeds [access] max_ttl = {}",
            humantime::format_duration(ttl),
            humantime::format_duration(cfg.access.max_ttl)
        ))
        .into());
    }
    let store = Store::open(&cfg)?;
    let r = store.request(&a.user, &a.role, ttl, &a.reason)?;
    eprintln!(
        "pgward: request {} recorded: {} asks for role {} for {} (pending; approve with `pgward access approve {}`)",
        r.id,
        r.user,
        r.role,
        humantime::format_duration(Duration::from_secs(r.ttl_secs)),
        r.id
    );
    Ok(format!("{}\n", r.id))
}

fn approve(a: &ApproveArgs) -> anyhow::Result<String> {
    let cfg = Config::load(&a.config)?;
    let token = if a.token.trim() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("cannot read the token from stdin")?;
        s
    } else {
        a.token.clone()
    };
    let approver = a.approver.trim();
    let verifier = Verifier::load(&cfg)?;
    let identity = verifier.verify(token.trim(), approver).map_err(|e| match e {
        AuthError::UserMismatch { sub, .. } => {
            AccessError::Refused(format!("the token belongs to {sub:?}, not to the approver {approver:?}"))
        }
        AuthError::InvalidToken { reason, .. } => AccessError::Refused(format!("the approver's token is not valid: {reason}")),
        AuthError::Keys(m) => AccessError::Invalid(format!("cannot verify tokens: {m}")),
    })?;
    let store = Store::open(&cfg)?;
    let r = store.approve(a.id.trim(), &identity)?;
    let until = r.expires_at.map(rfc3339).unwrap_or_default();
    Ok(format!(
        "approved {}: {} may use role {} until {} (new sessions; serve applies it within a second)\n",
        r.id, r.user, r.role, until
    ))
}

fn revoke(a: &RevokeArgs) -> anyhow::Result<String> {
    let cfg = Config::load(&a.config)?;
    let store = Store::open(&cfg)?;
    let r = store.revoke_grant(a.id.trim(), a.reason.as_deref())?;
    Ok(format!("revoked {}: {}'s access to role {} (sessions using it end at their next statement)\n", r.id, r.user, r.role))
}

fn list(a: &ListArgs) -> anyhow::Result<String> {
    let cfg = Config::load(&a.config)?;
    let store = Store::open(&cfg)?;
    let state = store.load()?;
    let now = now_unix();
    let ttl = store.rules().request_ttl_secs;
    let items: Vec<&AccessRequest> =
        state.requests().iter().filter(|r| a.user.as_deref().is_none_or(|u| r.user == u)).collect();
    let mut out = String::new();
    if a.json {
        for r in items {
            let mut v = serde_json::to_value(r).context("encoding a request")?;
            if let Some(o) = v.as_object_mut() {
                o.insert("state".into(), r.state(now, ttl).as_str().into());
            }
            out.push_str(&v.to_string());
            out.push('\n');
        }
        return Ok(out);
    }
    if items.is_empty() {
        eprintln!("pgward: no access requests");
        return Ok(out);
    }
    out.push_str("ID                STATE    USER  ROLE  TTL  REQUESTED  APPROVER  EXPIRES  REASON\n");
    for r in items {
        out.push_str(&format!(
            "{}  {}  {}  {}  {}  {}  {}  {}  {}\n",
            r.id,
            r.state(now, ttl).as_str(),
            r.user,
            r.role,
            humantime::format_duration(Duration::from_secs(r.ttl_secs)),
            rfc3339(r.requested_at),
            r.approver.as_deref().unwrap_or("-"),
            r.expires_at.map(rfc3339).unwrap_or_else(|| "-".into()),
            r.reason.replace(['\n', '\r'], " "),
        ));
    }
    Ok(out)
}
