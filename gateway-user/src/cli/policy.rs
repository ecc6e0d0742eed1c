//! `pgward policy …`: dry-run decisions and policy validation.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};

use crate::auth::Identity;
use crate::config::Config;
use crate::policy::{Action, Policy, Verdict};

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Decide SQL for a user without running it: prints allow/deny, the rule and the statement
    /// class of each statement. Exit 0 = allow, 1 = deny.
    Check(CheckArgs),
    /// Load the policy files and print a summary (exit 0 if they are valid).
    Validate(ValidateArgs),
    /// Print the catalog query whose output `check --catalog` reads.
    CatalogSql,
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// pgward config; its policy.files are used (unless --policy is given).
    #[arg(long, required_unless_present = "policy")]
    pub config: Option<PathBuf>,
    /// Policy file(s) to use instead of the config's (repeatable, merged in order).
    #[arg(long)]
    pub policy: Vec<PathBuf>,
    #[arg(long)]
    pub user: String,
    /// Comma-separated groups.
    #[arg(long, value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Database (default: the config's upstream.default_database, else "postgres").
    #[arg(long)]
    pub database: Option<String>,
    /// Decide as of this time (RFC 3339, e.g. 2025-06-10T19:00:00Z) instead of now.
    #[arg(long)]
    pub at: Option<String>,
    /// A prepared statement the session knows, NAME=SQL (repeatable), for EXECUTE NAME.
    #[arg(long = "prepared", value_name = "NAME=SQL")]
    pub prepared: Vec<String>,
    /// The database's function catalog, for rules on catalog function classes (`@volatile`,
    /// `@dynamic_sql`, …): the output of the query in `pgward policy catalog-sql`, as
    /// `psql -At -F $'\t'` prints it. Without it such rules treat every function as in every
    /// class (as the gateway does until it has read the catalog).
    #[arg(long, value_name = "FILE")]
    pub catalog: Option<PathBuf>,
    /// Print the verdict as JSON.
    #[arg(long)]
    pub json: bool,
    /// The SQL (after `--`; several words are joined with spaces). `-` or nothing: stdin.
    #[arg(last = true)]
    pub sql: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    #[arg(long, required_unless_present = "policy")]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub policy: Vec<PathBuf>,
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check(mut args) => {
            if args.sql.is_empty() || args.sql == ["-"] {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).context("cannot read SQL from stdin")?;
                args.sql = vec![s];
            }
            let (code, text) = check(&args)?;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes()).and_then(|_| out.flush()).context("cannot write the verdict")?;
            Ok(ExitCode::from(code))
        }
        PolicyCommand::CatalogSql => {
            println!("{};", crate::policy::functions::CATALOG_SQL);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Validate(args) => {
            let (policy, _) = load(args.config.as_ref(), &args.policy)?;
            print!("{}", policy.describe());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The policy and the default database.
fn load(config: Option<&PathBuf>, files: &[PathBuf]) -> anyhow::Result<(Policy, String)> {
    let cfg = config.map(|c| Config::load(c)).transpose()?;
    let database = cfg.as_ref().map(|c| c.upstream.default_database.clone()).unwrap_or_else(|| "postgres".into());
    let policy = if !files.is_empty() {
        Policy::from_files(files)?
    } else {
        Policy::load(cfg.as_ref().expect("clap requires --config without --policy"))?
    };
    Ok((policy, database))
}

/// Exit code and output of `policy check` (everything but reading stdin and printing).
pub fn check(args: &CheckArgs) -> anyhow::Result<(u8, String)> {
    let (policy, default_db) = load(args.config.as_ref(), &args.policy)?;
    let user = args.user.trim();
    if user.is_empty() {
        bail!("--user must not be empty");
    }
    let identity = Identity {
        user: user.to_string(),
        groups: args.groups.iter().map(|g| g.trim()).filter(|g| !g.is_empty()).map(str::to_owned).collect(),
        jti: "policy-check".into(),
        expires_at: i64::MAX,
        issued_at: 0,
    };
    let database = args.database.clone().unwrap_or(default_db);
    let mut note = String::new();
    match &args.catalog {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let cat = crate::policy::functions::FunctionCatalog::from_tsv(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            policy.set_function_catalog(&database, cat);
        }
        None if policy.uses_function_classes() && !args.json => {
            note = "note: no --catalog: rules on catalog function classes treat every function as in every class\n".into();
        }
        None => {}
    }
    let now: DateTime<Utc> = match &args.at {
        None => Utc::now(),
        Some(s) => DateTime::parse_from_rfc3339(s.trim())
            .with_context(|| format!("--at {s:?} is not an RFC 3339 time (e.g. 2025-06-10T19:00:00Z)"))?
            .with_timezone(&Utc),
    };
    let mut prepared = Vec::new();
    for p in &args.prepared {
        let (name, sql) = p.split_once('=').with_context(|| format!("--prepared {p:?} is not NAME=SQL"))?;
        prepared.push((name.trim().to_string(), sql.to_string()));
    }
    let sql = args.sql.join(" ");
    let lookup = |n: &str| prepared.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone()).into_iter().collect::<Vec<_>>();
    let verdict = policy.decide_with_prepared(&identity, &database, &sql, now, &lookup);
    let mut text = if args.json { render_json(&verdict, &policy, &identity) } else { render(&verdict, &policy, &identity) };
    text.push_str(&note);
    Ok((if verdict.decision == Action::Allow { 0 } else { 1 }, text))
}

fn render(v: &Arc<Verdict>, policy: &Policy, identity: &Identity) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for (i, st) in v.statements.iter().enumerate() {
        let info = &st.info;
        let _ = writeln!(s, "statement {}: {:<5} class={:<11} rule={}", i + 1, st.decision, info.class(), st.rule);
        let _ = writeln!(s, "  {}", one_line(&info.text));
        let mut facts = Vec::new();
        let classes: Vec<&str> = info.classes.iter().map(|c| c.as_str()).collect();
        if classes.len() > 1 {
            facts.push(format!("classes: {}", classes.join(",")));
        }
        if !info.commands.is_empty() {
            facts.push(format!("commands: {}", info.commands.join(",")));
        }
        if !info.tables.is_empty() && !info.unparsable {
            facts.push(format!("tables: {}", join(&info.tables)));
        }
        if !info.functions.is_empty() {
            facts.push(format!("functions: {}", join(&info.functions)));
        }
        let mods: Vec<&str> = info.modifiers.iter().map(|m| m.as_str()).collect();
        if !mods.is_empty() {
            facts.push(format!("modifiers: {}", mods.join(",")));
        }
        if !facts.is_empty() {
            let _ = writeln!(s, "  {}", facts.join("  "));
        }
        if st.decision == Action::Deny && !st.reason.is_empty() {
            let _ = writeln!(s, "  reason: {}", st.reason);
        }
    }
    let _ = write!(s, "result: {} (rule {})", v.decision, v.rule);
    if v.statement_count == 0 {
        let _ = write!(s, ": no statements");
    }
    let _ = writeln!(s);
    if let Some(role) = policy.role_for(identity) {
        let _ = writeln!(s, "role after login: {role}");
    }
    s
}

fn render_json(v: &Arc<Verdict>, policy: &Policy, identity: &Identity) -> String {
    let statements: Vec<serde_json::Value> = v
        .statements
        .iter()
        .map(|st| {
            let i = &st.info;
            serde_json::json!({
                "decision": st.decision,
                "rule": st.rule,
                "reason": st.reason,
                "class": i.class(),
                "classes": i.classes.iter().collect::<Vec<_>>(),
                "commands": i.commands,
                "tables": i.tables.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                "schemas": i.schemas,
                "functions": i.functions.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
                "modifiers": i.modifiers.iter().collect::<Vec<_>>(),
                "unparsable": i.unparsable,
                "sql": i.text,
            })
        })
        .collect();
    let doc = serde_json::json!({
        "decision": v.decision,
        "rule": v.rule,
        "reason": v.reason,
        "classes": v.classes,
        "unparsable": v.unparsable,
        "statement_count": v.statement_count,
        "role": policy.role_for(identity),
        "statements": statements,
    });
    format!("{}\n", serde_json::to_string_pretty(&doc).unwrap_or_default())
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",")
}

fn one_line(s: &str) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > 200 { format!("{}…", s.chars().take(200).collect::<String>()) } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn repo_file(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
    }

    fn args(extra: &[&str]) -> CheckArgs {
        let mut argv = vec!["pgward", "policy", "check"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv).expect("arguments parse").command {
            crate::cli::Command::Policy(PolicyCommand::Check(a)) => a,
            other => panic!("not policy check: {other:?}"),
        }
    }

    #[test]
    fn catalog_file_for_function_classes() {
        let default = repo_file("policies/default.toml");
        let catalog = repo_file("gateway-user/src/policy/testdata/pg15_proc.tsv");
        let (p, c) = (default.to_str().unwrap(), catalog.to_str().unwrap());
        let base = ["--policy", p, "--user", "bob", "--groups", "staff", "--database", "app"];
        let with = |extra: &[&str], sql: &str| {
            let mut a: Vec<&str> = base.to_vec();
            a.extend_from_slice(extra);
            a.extend_from_slice(&["--", sql]);
            check(&args(&a)).unwrap()
        };
        let (code, text) = with(&[], "SELECT lower('x')");
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("note: no --catalog"), "{text}");
        let (code, text) = with(&["--catalog", c], "SELECT lower('x')");
        assert_eq!(code, 0, "{text}");
        let (code, text) = with(&["--catalog", c], "SELECT * FROM ts_stat('SELECT v FROM t')");
        assert_eq!(code, 1, "{text}");
        assert!(text.contains("no-dynamic-sql-functions"), "{text}");
    }

    /// `policies/example.toml`, and `--at` a fixed time so decisions do not depend on the clock.
    fn example_policy() -> (std::path::PathBuf, [&'static str; 2]) {
        (repo_file("policies/example.toml"), ["--at", "2025-06-10T12:00:00Z"])
    }

    #[test]
    fn an_allowed_statement_exits_0_naming_its_rule_and_role() {
        let (example, at) = example_policy();
        let p = example.to_str().unwrap();
        let a = args(
            &[
                &["--policy", p, "--user", "alice", "--groups", "analysts", "--database", "app"][..],
                &at,
                &["--", "SELECT * FROM orders"],
            ]
            .concat(),
        );
        let (code, out) = check(&a).unwrap();
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("statement 1: allow class=read"), "{out}");
        assert!(out.contains("rule=analysts-read"), "{out}");
        assert!(out.contains("result: allow (rule analysts-read)"), "{out}");
        assert!(out.contains("role after login: analyst_ro"), "{out}");
    }

    #[test]
    fn a_denied_statement_exits_1_with_its_class_and_modifiers() {
        let (example, at) = example_policy();
        let p = example.to_str().unwrap();
        let a = args(
            &[
                &["--policy", p, "--user", "alice", "--groups", "analysts,hr", "--database", "app"][..],
                &at,
                &["--", "SELECT 1;", "DELETE FROM orders"],
            ]
            .concat(),
        );
        let (code, out) = check(&a).unwrap();
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("statement 2: deny  class=write"), "{out}");
        assert!(out.contains("modifiers: no_where,multi_statement"), "{out}");
        assert!(out.contains("result: deny (rule analysts-single-statement)"), "{out}");
    }

    /// The engineers' change window, decided at the time `--at` gives.
    #[test]
    fn the_change_window_is_decided_at_the_given_time() {
        let (example, _) = example_policy();
        let p = example.to_str().unwrap();
        let a = args(&[
            "--policy",
            p,
            "--user",
            "bob",
            "--groups",
            "engineers",
            "--database",
            "app",
            "--at",
            "2025-06-10T19:00:00Z",
            "--",
            "CREATE TABLE t (id int)",
        ]);
        assert_eq!(check(&a).unwrap().0, 0);
        let a = args(&[
            "--policy",
            p,
            "--user",
            "bob",
            "--groups",
            "engineers",
            "--database",
            "app",
            "--at",
            "2025-06-10T12:00:00+00:00",
            "--",
            "CREATE TABLE t (id int)",
        ]);
        assert_eq!(check(&a).unwrap().0, 1);
    }

    #[test]
    fn execute_of_a_known_prepared_statement_is_decided_on_its_text() {
        let (example, at) = example_policy();
        let p = example.to_str().unwrap();
        let a = args(
            &[
                &[
                    "--policy",
                    p,
                    "--user",
                    "alice",
                    "--groups",
                    "analysts",
                    "--database",
                    "app",
                    "--prepared",
                    "q=SELECT * FROM orders",
                ][..],
                &at,
                &["--", "EXECUTE q"],
            ]
            .concat(),
        );
        assert_eq!(check(&a).unwrap().0, 0);
    }

    #[test]
    fn json_output_names_the_decision_rule_and_modifiers() {
        let (example, at) = example_policy();
        let p = example.to_str().unwrap();
        let a = args(
            &[
                &["--policy", p, "--user", "alice", "--groups", "analysts", "--database", "app", "--json"][..],
                &at,
                &["--", "SET ROLE postgres"],
            ]
            .concat(),
        );
        let (code, out) = check(&a).unwrap();
        assert_eq!(code, 1);
        let j: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(j["decision"], "deny");
        assert_eq!(j["rule"], "builtin:identity-change");
        assert_eq!(j["statements"][0]["class"], "session");
        assert_eq!(j["statements"][0]["modifiers"][0], "identity_change");
    }

    #[test]
    fn uses_the_configs_policy_files() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("pgward.toml");
        std::fs::write(
            &cfg,
            r#"
[server]
listen = "127.0.0.1:6432"
tls_cert = "tls/cert.pem"
tls_key = "tls/key.pem"
[upstream]
host = "127.0.0.1"
user = "svc"
default_database = "app"
[auth]
issuer = "i"
audience = "a"
jwks = "keys/jwks.json"
signing_key = "keys/signing.pem"
signing_kid = "k"
[audit]
dir = "audit"
[policy]
files = ["policies/default.toml"]
"#,
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("policies")).unwrap();
        std::fs::write(dir.path().join("policies/default.toml"), crate::policy::DEFAULT_POLICY_TOML).unwrap();
        let c = cfg.to_str().unwrap();
        let a = args(&["--config", c, "--user", "alice", "--", "SELECT 1"]);
        let (code, out) = check(&a).unwrap();
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("rule=default"), "{out}");
        let a = args(&["--config", c, "--user", "alice", "--groups", "x", "--", "COPY t TO PROGRAM 'id'"]);
        let (code, out) = check(&a).unwrap();
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("no-server-programs"), "{out}");
        let a = args(&["--config", c, "--user", "root", "--groups", "pgward_admins", "--", "COPY t TO PROGRAM 'id'"]);
        assert_eq!(check(&a).unwrap().0, 0);
        // Errors are errors (exit 2 from main), not verdicts.
        let a = args(&["--policy", "/nonexistent/policy.toml", "--user", "alice", "--", "SELECT 1"]);
        assert!(check(&a).unwrap_err().to_string().contains("/nonexistent/policy.toml"));
        let a = args(&["--config", c, "--user", "alice", "--at", "yesterday", "--", "SELECT 1"]);
        assert!(check(&a).is_err());
    }
}
