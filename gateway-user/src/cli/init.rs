//! `pgward init`: write a working configuration directory.
//!
//! ```text
//! DIR/pgward.toml             the config (relative paths)
//! DIR/tls/cert.pem, key.pem   self-signed server certificate (key 0600)
//! DIR/keys/signing-key.pem    Ed25519 token signing key (0600)
//! DIR/keys/jwks.json          its public key
//! DIR/keys/checkpoint-key.pem Ed25519 audit checkpoint key, only for the writer (0400)
//! DIR/keys/checkpoint-jwks.json its public key (what `audit verify` checks against)
//! DIR/policies/default.toml   default policy
//! DIR/audit/                  audit log directory (0750)
//! DIR/upstream.password       copy of --upstream-password-file (0600), if given
//! ```

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::auth::write_file_mode;
use crate::config::{Config, UpstreamTls};

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

/// The default policy shipped with the binary (the repository's `policies/default.toml`).
const DEFAULT_POLICY: &str = include_str!("../../../policies/default.toml");

const CONFIG_FILE: &str = "pgward.toml";
const TLS_CERT: &str = "tls/cert.pem";
const TLS_KEY: &str = "tls/key.pem";
const KEYS_DIR: &str = "keys";
/// The checkpoint key and its public half (inside `KEYS_DIR`).
pub const CHECKPOINT_KEY_FILE: &str = "checkpoint-key.pem";
pub const CHECKPOINT_JWKS_FILE: &str = "checkpoint-jwks.json";
/// Mode of the checkpoint key: read by its owner (the service user after `install`) only.
pub const CHECKPOINT_KEY_MODE: u32 = 0o400;
const POLICY_FILE: &str = "policies/default.toml";
const AUDIT_DIR: &str = "audit";
const PASSWORD_FILE: &str = "upstream.password";

pub fn run(args: InitArgs) -> anyhow::Result<ExitCode> {
    let report = init(&args)?;
    eprint!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// Do the work of `pgward init`; returns the text to show the user.
fn init(args: &InitArgs) -> anyhow::Result<String> {
    let listen: SocketAddr = args.listen.parse().with_context(|| {
        format!(
            "--listen {:?} is not HOST:PORT with an IP address (e.g. 127.0.0.1:6432)",
            args.listen
        )
    })?;
    let up = parse_upstream_url(&args.upstream).context("--upstream")?;
    let password = match &args.upstream_password_file {
        None => None,
        Some(p) => Some(
            std::fs::read(p)
                .with_context(|| format!("cannot read --upstream-password-file {}", p.display()))?,
        ),
    };

    let dir = &args.dir;
    let config_path = dir.join(CONFIG_FILE);
    if config_path.exists() && !args.force {
        bail!(
            "{} already exists; use --force to overwrite it (this also replaces the TLS \
             certificate and the signing key)",
            config_path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut notes = Vec::new();

    // TLS certificate for clients.
    let sans = cert_names(listen);
    let (cert_pem, key_pem) = self_signed_cert(&sans)?;
    mkdir(&dir.join("tls"), 0o755)?;
    write(&dir.join(TLS_CERT), cert_pem.as_bytes(), 0o644)?;
    write(&dir.join(TLS_KEY), key_pem.as_bytes(), 0o600)?;

    // Token signing key.
    let kid = format!("pgward-{}", random_hex()?);
    crate::auth::generate_signing_key(&dir.join(KEYS_DIR), &kid)?;
    // Audit checkpoint key: a key of its own, so the token key cannot re-sign the log.
    let ckpt_kid = format!("pgward-ckpt-{}", random_hex()?);
    crate::auth::write_ed25519_key(
        &dir.join(KEYS_DIR).join(CHECKPOINT_KEY_FILE),
        &dir.join(KEYS_DIR).join(CHECKPOINT_JWKS_FILE),
        &ckpt_kid,
        CHECKPOINT_KEY_MODE,
    )?;

    // Audit log directory.
    let audit = dir.join(AUDIT_DIR);
    mkdir(&audit, 0o750)?;
    if std::fs::read_dir(&audit).map(|mut d| d.next().is_some()).unwrap_or(false) {
        notes.push(format!(
            "{} is not empty: checkpoints in it were signed with the previous checkpoint key, \
             which keys/checkpoint-jwks.json no longer contains",
            audit.display()
        ));
    }

    // Policy: an existing (possibly edited) policy file is kept.
    mkdir(&dir.join("policies"), 0o755)?;
    let policy = dir.join(POLICY_FILE);
    let policy_note = if policy.exists() {
        "default policy (existing file kept)"
    } else {
        write(&policy, DEFAULT_POLICY.as_bytes(), 0o644)?;
        "default policy (server files, programs and dynamic SQL for pgward_admins only)"
    };

    // Service role password.
    if let Some(pw) = &password {
        if pw.split(|b| *b == b'\n').next().is_none_or(|l| l.is_empty() || l == b"\r") {
            notes.push("the upstream password file's first line is empty".into());
        }
        write(&dir.join(PASSWORD_FILE), pw, 0o600)?;
    }

    // The config itself, last: a failed init leaves no config behind.
    let mut cfg = base_config(&args.listen, &up, &kid)?;
    cfg.audit.checkpoint_key = Some(PathBuf::from(KEYS_DIR).join(CHECKPOINT_KEY_FILE));
    cfg.audit.checkpoint_kid = Some(ckpt_kid);
    cfg.audit.checkpoint_jwks = Some(PathBuf::from(KEYS_DIR).join(CHECKPOINT_JWKS_FILE));
    cfg.upstream.password_file = password.as_ref().map(|_| PathBuf::from(PASSWORD_FILE));
    let body = toml::to_string_pretty(&cfg).context("cannot serialize the config")?;
    let text = format!(
        "# pgward configuration, written by `pgward init`.\n\
         # Relative paths are resolved against the directory holding this file.\n\n{body}"
    );
    write(&config_path, text.as_bytes(), 0o644)?;
    let loaded = Config::load(&config_path).context("the written config does not load (bug)")?;

    Ok(report(&loaded, &config_path, &sans, &kid, policy_note, password.is_some(), &notes))
}

/// The upstream described by `--upstream`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UpstreamUrl {
    user: String,
    /// Host name / IP, or an absolute socket directory.
    host: String,
    port: u16,
    database: Option<String>,
    tls: Option<UpstreamTls>,
}

/// `postgres[ql]://USER@HOST[:PORT][/DB][?sslmode=...]` or
/// `postgres[ql]://USER@[:PORT]/DB?host=/socket/dir`. Written by hand because the `url` crate
/// rejects the empty host of the socket form. A password in the URL is refused.
fn parse_upstream_url(s: &str) -> anyhow::Result<UpstreamUrl> {
    const FORMS: &str =
        "expected postgres://USER@HOST:PORT/DB or postgres://USER@/DB?host=/socket/dir";
    let lower = s.to_ascii_lowercase();
    let rest = ["postgres://", "postgresql://"]
        .iter()
        .find(|p| lower.starts_with(*p))
        .map(|p| &s[p.len()..])
        .with_context(|| format!("{s:?}: {FORMS}"))?;
    let (before_query, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match before_query.split_once('/') {
        Some((a, p)) => (a, p),
        None => (before_query, ""),
    };
    let Some((userinfo, hostport)) = authority.rsplit_once('@') else {
        bail!("{s:?} names no user: {FORMS}");
    };
    if userinfo.contains(':') {
        bail!(
            "the upstream URL must not contain a password; put it in a file and pass \
             --upstream-password-file FILE"
        );
    }
    let user = percent_decode(userinfo)?;
    if user.is_empty() {
        bail!("{s:?} names no user: {FORMS}");
    }

    // HOST[:PORT], [v6][:PORT], :PORT or empty.
    let (mut host, mut port_s): (String, Option<String>) = if let Some(v6) =
        hostport.strip_prefix('[')
    {
        let (h, after) = v6.split_once(']').with_context(|| format!("unclosed '[' in {s:?}"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').with_context(|| format!("bad host in {s:?}"))?),
        };
        (h.to_owned(), port.map(str::to_owned))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (percent_decode(h)?, Some(p.to_owned())),
            None => (percent_decode(hostport)?, None),
        }
    };
    let mut tls = None;
    if let Some(q) = query {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            match &*k {
                "host" => {
                    if !host.is_empty() {
                        bail!("{s:?} names the host twice (in the authority and in ?host=)");
                    }
                    host = v.into_owned();
                }
                "port" => port_s = Some(v.into_owned()),
                "sslmode" => {
                    tls = Some(match &*v {
                        "disable" => UpstreamTls::Disable,
                        "prefer" | "allow" => UpstreamTls::Prefer,
                        "require" => UpstreamTls::Require,
                        other => bail!(
                            "sslmode={other} is not supported (use disable, prefer or require; \
                             pgward does not verify the upstream certificate)"
                        ),
                    })
                }
                other => bail!(
                    "unsupported parameter {other:?} in {s:?} (supported: host, port, sslmode)"
                ),
            }
        }
    }
    if host.is_empty() {
        bail!("{s:?} names no host: {FORMS}");
    }
    if host.contains(',') {
        bail!("multiple upstream hosts are not supported");
    }
    if host.starts_with('.') || (host.contains('/') && !host.starts_with('/')) {
        bail!("socket directory {host:?} must be an absolute path");
    }
    let port = match port_s.as_deref() {
        None | Some("") => 5432,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => bail!("bad port {p:?} in {s:?}"),
        },
    };
    let database = percent_decode(path.trim_end_matches('/'))?;
    let database = (!database.is_empty()).then_some(database);
    Ok(UpstreamUrl { user, host, port, database, tls })
}

fn percent_decode(s: &str) -> anyhow::Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                bail!("bad percent-encoding in {s:?}");
            };
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).with_context(|| format!("{s:?} is not UTF-8 after percent-decoding"))
}

/// 8 random hex digits (for key ids).
fn random_hex() -> anyhow::Result<String> {
    let mut rnd = [0u8; 4];
    getrandom::fill(&mut rnd).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(hex::encode(rnd))
}

/// A full config for the given listen address, upstream and signing kid, with every other
/// setting at its default (the defaults come from `config.rs` through deserialization).
fn base_config(listen: &str, up: &UpstreamUrl, kid: &str) -> anyhow::Result<Config> {
    let minimal = serde_json::json!({
        "server": { "listen": listen, "tls_cert": TLS_CERT, "tls_key": TLS_KEY },
        "upstream": { "host": up.host, "port": up.port, "user": up.user },
        "auth": {
            "issuer": "pgward",
            "audience": "pgward",
            "jwks": format!("{KEYS_DIR}/{}", crate::auth::JWKS_FILE),
            "signing_key": format!("{KEYS_DIR}/{}", crate::auth::SIGNING_KEY_FILE),
            "signing_kid": kid,
        },
        "audit": { "dir": AUDIT_DIR },
        "policy": { "files": [POLICY_FILE] },
    });
    let mut cfg: Config = serde_json::from_value(minimal).context("building the config")?;
    if let Some(db) = &up.database {
        cfg.upstream.default_database = db.clone();
    }
    if let Some(tls) = up.tls {
        cfg.upstream.tls = tls;
    }
    Ok(cfg)
}

/// Names the certificate is valid for: localhost, both loopback addresses, the listen
/// address (or, for a wildcard listen address, this machine's host name).
fn cert_names(listen: SocketAddr) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    let extra =
        if listen.ip().is_unspecified() { hostname() } else { Some(listen.ip().to_string()) };
    if let Some(n) = extra
        && !names.contains(&n)
    {
        names.push(n);
    }
    names
}

fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    let valid = !h.is_empty()
        && h.len() <= 253
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then(|| h.to_owned())
}

/// A self-signed ECDSA P-256 certificate valid from yesterday for ten years.
fn self_signed_cert(sans: &[String]) -> anyhow::Result<(String, String)> {
    use chrono::Datelike;
    let key = rcgen::KeyPair::generate().context("generating the TLS key")?;
    let mut params = rcgen::CertificateParams::new(sans.to_vec()).context("certificate names")?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "pgward");
    params.distinguished_name = dn;
    let today = chrono::Utc::now().date_naive();
    let from = today - chrono::Days::new(1);
    params.not_before = rcgen::date_time_ymd(from.year(), from.month() as u8, from.day() as u8);
    params.not_after =
        rcgen::date_time_ymd(today.year() + 10, today.month() as u8, today.day().min(28) as u8);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.self_signed(&key).context("signing the TLS certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn mkdir(p: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot chmod {}", p.display()))
}

fn write(p: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    write_file_mode(p, data, mode).with_context(|| format!("cannot write {}", p.display()))
}

/// Quote for a POSIX shell if needed.
fn sh(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-:=@,+".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn report(
    cfg: &Config,
    config_path: &Path,
    sans: &[String],
    kid: &str,
    policy_note: &str,
    has_password: bool,
    notes: &[String],
) -> String {
    let abs = config_path.canonicalize().unwrap_or_else(|_| config_path.to_owned());
    let conf = sh(&abs.to_string_lossy());
    let up = &cfg.upstream;
    let where_ = if up.host.starts_with('/') {
        format!("socket directory {} (port {})", up.host, up.port)
    } else {
        format!("{}:{}", up.host, up.port)
    };
    let listen = cfg.listen_addr();
    let connect_host = if listen.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        listen.ip().to_string()
    };

    let mut o = String::new();
    let _ = writeln!(o, "pgward init: wrote {}", cfg.base_dir.display());
    let mut line = |f: &str, what: &str| {
        let _ = writeln!(o, "  {f:<22}  {what}");
    };
    line(CONFIG_FILE, "configuration (paths in it are relative to it)");
    line(TLS_CERT, &format!("self-signed TLS certificate for {}", sans.join(", ")));
    line(TLS_KEY, "its private key (0600)");
    line(
        "keys/signing-key.pem",
        &format!("Ed25519 token + audit checkpoint signing key (0600), kid {kid}"),
    );
    line("keys/jwks.json", "public key(s) tokens are verified against");
    line(POLICY_FILE, policy_note);
    line("audit/", "audit log directory (0750)");
    if has_password {
        line(PASSWORD_FILE, "service role password (0600)");
    }
    let tls = match up.tls {
        UpstreamTls::Disable => "disable",
        UpstreamTls::Prefer => "prefer (certificate not verified)",
        UpstreamTls::Require => "require (certificate not verified)",
    };
    let _ = writeln!(
        o,
        "\nUpstream: role {:?} at {where_}, default database {:?}, TLS {tls}",
        up.user, up.default_database
    );
    if !has_password {
        let _ = writeln!(
            o,
            "  (no --upstream-password-file: pgward logs in without a password, i.e. trust/peer \
             auth; set upstream.password_file otherwise)"
        );
    }
    for n in notes {
        let _ = writeln!(o, "Note: {n}");
    }
    let _ = writeln!(o, "\nNext steps:");
    let _ = writeln!(o, "  1. Start the gateway:\n       pgward serve --config {conf}");
    let _ = writeln!(
        o,
        "  2. Issue a token (stdout gets only the token; default lifetime {}, max {}):\n       \
         TOKEN=$(pgward token issue --config {conf} --user alice --groups analysts)",
        humantime::format_duration(cfg.auth.default_ttl),
        humantime::format_duration(cfg.auth.max_ttl),
    );
    let _ = writeln!(
        o,
        "  3. Connect with the token as the password; the user name must be the token's subject:\n       \
         PGPASSWORD=\"$TOKEN\" psql \"host={connect_host} port={} user=alice dbname={} sslmode=require\"",
        listen.port(),
        up.default_database,
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Signer, Verifier};

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn args(dir: &Path, upstream: &str, pw: Option<PathBuf>, force: bool) -> InitArgs {
        InitArgs {
            dir: dir.to_owned(),
            listen: "127.0.0.1:6543".into(),
            upstream: upstream.into(),
            upstream_password_file: pw,
            force,
        }
    }

    /// The written directory works end to end: config loads, tokens issued by the Signer
    /// verify, the TLS config loads, and the certificate covers the advertised names.
    fn check_dir(dir: &Path) -> Config {
        let cfg = Config::load(&dir.join(CONFIG_FILE)).unwrap();
        assert_eq!(cfg.auth.issuer, "pgward");
        assert_eq!(cfg.auth.audience, "pgward");
        assert!(cfg.auth.signing_kid.starts_with("pgward-") && cfg.auth.signing_kid.len() == 15);
        assert_eq!(cfg.policy.files, vec![PathBuf::from(POLICY_FILE)]);
        assert!(cfg.server.tls_cert.is_relative() && cfg.auth.jwks.as_ref().unwrap().is_relative());

        let signer = Signer::load(&cfg).unwrap();
        let verifier = Verifier::load(&cfg).unwrap();
        let token = signer
            .issue(
                "alice",
                &["dba".into()],
                cfg.auth.default_ttl,
                &cfg.auth.issuer,
                &cfg.auth.audience,
            )
            .unwrap();
        let id = verifier.verify(&token, "alice").unwrap();
        assert_eq!(id.groups, vec!["dba".to_string()]);

        crate::tls::server_config(&cfg).unwrap();
        let cert: rustls_pki_types::CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_file(cfg.resolve(&cfg.server.tls_cert))
                .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.clone()).unwrap();
        let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        for name in ["localhost", "127.0.0.1", "::1"] {
            let sn = rustls_pki_types::ServerName::try_from(name).unwrap();
            use rustls::client::danger::ServerCertVerifier;
            v.verify_server_cert(&cert, &[], &sn, &[], rustls_pki_types::UnixTime::now())
                .unwrap_or_else(|e| panic!("certificate not valid for {name}: {e}"));
        }

        assert_eq!(mode(&cfg.resolve(&cfg.server.tls_key)), 0o600);
        assert_eq!(mode(&cfg.resolve(&cfg.auth.signing_key)), 0o600);
        // The checkpoint key is a key of its own, read-only for its owner, and its public
        // half (not the token JWKS) verifies checkpoints.
        let ckpt = cfg.resolve(cfg.audit.checkpoint_key.as_ref().unwrap());
        assert_eq!(mode(&ckpt), 0o400);
        let ckpt_kid = cfg.audit.checkpoint_kid.clone().unwrap();
        assert!(ckpt_kid.starts_with("pgward-ckpt-"), "{ckpt_kid}");
        let signer = crate::audit::CheckpointSigner::from_pkcs8_pem_file(&ckpt, ckpt_kid.clone()).unwrap();
        let ckpt_keys = crate::audit::verify::load_jwks_ed25519(&cfg.resolve(cfg.audit.checkpoint_jwks.as_ref().unwrap())).unwrap();
        assert_eq!(ckpt_keys.get(&ckpt_kid), Some(&signer.verifying_key()));
        let token_keys = crate::audit::verify::load_jwks_ed25519(&cfg.resolve(cfg.auth.jwks.as_ref().unwrap())).unwrap();
        assert!(token_keys.values().all(|k| *k != signer.verifying_key()), "not the token key");
        assert_eq!(mode(&cfg.resolve(&cfg.audit.dir)), 0o750);
        let policy = std::fs::read_to_string(dir.join(POLICY_FILE)).unwrap();
        assert_eq!(policy, DEFAULT_POLICY);
        toml::from_str::<toml::Table>(&policy).expect("default policy is valid TOML");
        cfg
    }

    #[test]
    fn init_tcp_url_with_password() {
        let tmp = tempfile::tempdir().unwrap();
        let pw = tmp.path().join("pw.txt");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let dir = tmp.path().join("conf");
        let out = init(&args(
            &dir,
            "postgres://svc@db.example:5433/app?sslmode=require",
            Some(pw),
            false,
        ))
        .unwrap();
        assert!(
            out.contains("pgward serve --config") && out.contains("pgward token issue"),
            "{out}"
        );
        let cfg = check_dir(&dir);
        assert_eq!(cfg.server.listen, "127.0.0.1:6543");
        assert_eq!(cfg.upstream.host, "db.example");
        assert_eq!(cfg.upstream.port.first(), 5433);
        assert_eq!(cfg.upstream.user, "svc");
        assert_eq!(cfg.upstream.default_database, "app");
        assert_eq!(cfg.upstream.tls, UpstreamTls::Require);
        assert_eq!(cfg.upstream.password_file, Some(PathBuf::from(PASSWORD_FILE)));
        assert_eq!(cfg.upstream_password().unwrap().as_deref(), Some("s3cret"));
        assert_eq!(mode(&dir.join(PASSWORD_FILE)), 0o600);
        // Session pooling is on by default and its limits are written out for the admin to see.
        assert!(cfg.upstream.pool);
        let text = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
        for key in ["pool = true", "pool_max_idle = 16", "pool_max_idle_total = 64", "pool_idle_timeout = \"1m\""] {
            assert!(text.contains(key), "{key:?} not in:\n{text}");
        }
    }

    #[test]
    fn init_socket_url_and_force() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("conf");
        init(&args(&dir, "postgresql://svc@/appdb?host=/var/run/postgresql", None, false)).unwrap();
        let cfg = check_dir(&dir);
        assert_eq!(cfg.upstream.host, "/var/run/postgresql");
        assert_eq!(cfg.upstream.port.first(), 5432);
        assert_eq!(cfg.upstream.default_database, "appdb");
        assert_eq!(cfg.upstream.tls, UpstreamTls::Disable);
        assert_eq!(cfg.upstream.password_file, None);
        assert!(!dir.join(PASSWORD_FILE).exists());

        // No silent overwrite.
        let e = init(&args(&dir, "postgres://svc@/x?host=/tmp", None, false)).unwrap_err();
        assert!(format!("{e:#}").contains("--force"), "{e:#}");
        assert_eq!(
            Config::load(&dir.join(CONFIG_FILE)).unwrap().upstream.default_database,
            "appdb"
        );

        // --force replaces config and keys, keeps an edited policy.
        std::fs::write(dir.join(POLICY_FILE), "# mine\n").unwrap();
        init(&args(&dir, "postgres://svc@/x?host=/tmp", None, true)).unwrap();
        let cfg2 = Config::load(&dir.join(CONFIG_FILE)).unwrap();
        assert_eq!(cfg2.upstream.default_database, "x");
        assert_ne!(cfg2.auth.signing_kid, cfg.auth.signing_kid);
        assert_eq!(std::fs::read_to_string(dir.join(POLICY_FILE)).unwrap(), "# mine\n");
    }

    #[test]
    fn init_rejects_bad_listen_and_missing_password_file() {
        let tmp = tempfile::tempdir().unwrap();
        let mut a = args(tmp.path(), "postgres://svc@h/db", None, false);
        a.listen = "localhost:6432".into();
        assert!(format!("{:#}", init(&a).unwrap_err()).contains("--listen"));
        let a = args(tmp.path(), "postgres://svc@h/db", Some(tmp.path().join("nope")), false);
        assert!(format!("{:#}", init(&a).unwrap_err()).contains("--upstream-password-file"));
        assert!(!tmp.path().join(CONFIG_FILE).exists());
    }

    #[test]
    fn upstream_urls() {
        let ok = |s: &str| parse_upstream_url(s).unwrap_or_else(|e| panic!("{s}: {e:#}"));
        let u = |user: &str, host: &str, port: u16, db: Option<&str>, tls: Option<UpstreamTls>| {
            UpstreamUrl {
                user: user.into(),
                host: host.into(),
                port,
                database: db.map(Into::into),
                tls,
            }
        };
        assert_eq!(ok("postgres://svc@db:5433/app"), u("svc", "db", 5433, Some("app"), None));
        assert_eq!(ok("postgresql://svc@db/app"), u("svc", "db", 5432, Some("app"), None));
        assert_eq!(ok("POSTGRES://svc@db"), u("svc", "db", 5432, None, None));
        assert_eq!(ok("postgres://svc@[::1]:6000/app"), u("svc", "::1", 6000, Some("app"), None));
        assert_eq!(
            ok("postgres://svc@/app?host=/run/pg"),
            u("svc", "/run/pg", 5432, Some("app"), None)
        );
        assert_eq!(
            ok("postgres://svc@:5499/app?host=%2Frun%2Fpg&sslmode=disable"),
            u("svc", "/run/pg", 5499, Some("app"), Some(UpstreamTls::Disable))
        );
        assert_eq!(ok("postgres://svc@/app?host=/run/pg&port=5400").port, 5400);
        assert_eq!(ok("postgres://s%40vc@db/my%20db"), u("s@vc", "db", 5432, Some("my db"), None));
        assert_eq!(ok("postgres://svc@db/app?sslmode=prefer").tls, Some(UpstreamTls::Prefer));

        let err = |s: &str| format!("{:#}", parse_upstream_url(s).unwrap_err());
        assert!(err("postgres://svc:hunter2@db/app").contains("--upstream-password-file"));
        assert!(!err("postgres://svc:hunter2@db/app").contains("hunter2"));
        assert!(err("postgres://db/app").contains("no user"));
        assert!(err("postgres://svc@/app").contains("no host"));
        assert!(err("mysql://svc@db/app").contains("expected postgres://"));
        assert!(err("postgres://svc@db:99999/app").contains("bad port"));
        assert!(err("postgres://svc@db/app?foo=1").contains("unsupported parameter"));
        assert!(err("postgres://svc@db/app?sslmode=verify-full").contains("sslmode"));
        assert!(err("postgres://svc@db/app?host=/x").contains("twice"));
        assert!(err("postgres://svc@/app?host=relative/dir").contains("absolute"));
    }
}
