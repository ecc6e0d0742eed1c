//! pgward's one configuration file (TOML). Relative paths are resolved against the directory
//! that holds the config file, so a directory written by `pgward init` can be moved as a whole.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("invalid config {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub audit: AuditConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Transparent eBPF interception of Postgres connections (off unless `enabled = true`).
    #[serde(default, skip_serializing_if = "InterceptConfig::is_default")]
    pub intercept: InterceptConfig,
    /// Token revocation and just-in-time access (`[access]`; every field has a default).
    #[serde(default, skip_serializing_if = "AccessConfig::is_default")]
    pub access: AccessConfig,
    /// Directory holding the config file; every relative path is resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// TCP listen address, e.g. "127.0.0.1:6432".
    pub listen: String,
    /// Optional directory in which pgward also listens on `.s.PGSQL.<port>` (unix socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_socket_dir: Option<PathBuf>,
    /// Port number used in the unix socket's file name; defaults to the TCP listen port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unix_socket_port: Option<u16>,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Accept a token without TLS when the client is on loopback or a unix socket.
    /// Tokens over plain TCP from any other address are always refused.
    #[serde(default = "default_true")]
    pub allow_plaintext_local: bool,
    /// Serve Prometheus metrics (`GET /metrics`) on this address, e.g. "127.0.0.1:9187".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Single-threaded event loops (current-thread runtimes, one OS thread each; 0 = one per
    /// 4 cores, at least one). Connections are placed round-robin and stay on their loop.
    #[serde(default)]
    pub worker_threads: usize,
    /// Time a client gets from connecting to a verified token (Postgres's
    /// `authentication_timeout`); the connection is then closed.
    #[serde(default = "default_startup_timeout", with = "humantime_serde_compat")]
    pub startup_timeout: Duration,
    /// Largest message (its length field, as Postgres counts it) pgward reads whole, from the
    /// client or, for a session that masks, from the server. Longer ones are refused from
    /// their header (FATAL 54000) before anything is buffered.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Bytes all sessions together may hold in messages larger than a session's own
    /// buffers; a session waiting for room stops reading (backpressure).
    #[serde(default = "default_buffer_budget_bytes")]
    pub buffer_budget_bytes: usize,
    /// Bytes one session may keep in named prepared statements and portals (their texts and
    /// bound values): a Parse, Bind or PREPARE that goes over it ends the session (FATAL 54000).
    #[serde(default = "default_max_session_state_bytes")]
    pub max_session_state_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    #[default]
    Disable,
    Prefer,
    Require,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Hostname/IP, or an absolute directory holding Postgres's unix socket; or several of
    /// them, comma-separated (libpq's multi-host form), tried in order for each new connection
    /// (see [`UpstreamConfig::endpoints`] and `upstream_hosts`).
    pub host: String,
    /// One port for every host, or a comma-separated string of one port per host.
    #[serde(default)]
    pub port: Ports,
    /// Which server of `host` a connection may use (libpq's `target_session_attrs`).
    #[serde(default, skip_serializing_if = "TargetSessionAttrs::is_any")]
    pub target_session_attrs: TargetSessionAttrs,
    /// Database roles (a policy group's `role`, or a just-in-time grant's) whose sessions
    /// connect with `standby_session_attrs` instead: read-only roles can be served by standbys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub standby_roles: Vec<String>,
    /// `target_session_attrs` for the sessions of `standby_roles`.
    #[serde(default = "default_standby_session_attrs", skip_serializing_if = "is_default_standby_session_attrs")]
    pub standby_session_attrs: TargetSessionAttrs,
    /// pgward's own (service) role on the real Postgres. Clients never see its credential.
    pub user: String,
    /// File holding the service role's password (first line). Optional for trust auth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Database used when the client does not name one.
    #[serde(default = "default_database")]
    pub default_database: String,
    #[serde(default)]
    pub tls: UpstreamTls,
    #[serde(default = "default_connect_timeout", with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// Session pooling: a cleanly ended session's upstream connection is reset (`RESET ROLE`,
    /// `DISCARD ALL`) and kept for the next login with the same database and startup settings.
    #[serde(default = "default_true")]
    pub pool: bool,
    /// Idle pooled connections kept per (database, startup settings).
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle: usize,
    /// Idle pooled connections kept in all.
    #[serde(default = "default_pool_max_idle_total")]
    pub pool_max_idle_total: usize,
    /// An idle pooled connection older than this is closed.
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde_compat")]
    pub pool_idle_timeout: Duration,
}

// ---- upstream: several hosts and which of them to use -------------------------------------

/// `upstream.target_session_attrs`, libpq's values: which server a new connection may use,
/// judged by what the server reports at login (`in_hot_standby`, `default_transaction_read_only`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TargetSessionAttrs {
    /// The first server that accepts the login.
    #[default]
    Any,
    /// A server that accepts writes: not in recovery, `default_transaction_read_only` off.
    ReadWrite,
    /// A server that does not accept writes by default (a standby, or a read-only primary).
    ReadOnly,
    /// A server not in recovery.
    Primary,
    /// A server in recovery (a hot standby).
    Standby,
    /// A standby if one is reachable, else any server.
    PreferStandby,
}

impl TargetSessionAttrs {
    fn is_any(&self) -> bool {
        *self == TargetSessionAttrs::Any
    }
}

fn default_standby_session_attrs() -> TargetSessionAttrs {
    TargetSessionAttrs::PreferStandby
}
fn is_default_standby_session_attrs(a: &TargetSessionAttrs) -> bool {
    *a == default_standby_session_attrs()
}

/// `upstream.port`: one port for every host (an integer), or one per host (libpq's list form, a
/// string: `"5432,5433"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports(pub Vec<u16>);

impl Default for Ports {
    fn default() -> Self {
        Ports(vec![default_pg_port()])
    }
}

impl Ports {
    /// The first port: the port of a single-host upstream.
    pub fn first(&self) -> u16 {
        self.0.first().copied().unwrap_or_else(default_pg_port)
    }
}

impl std::fmt::Display for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list: Vec<String> = self.0.iter().map(u16::to_string).collect();
        f.write_str(&list.join(","))
    }
}

impl Serialize for Ports {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => s.serialize_u16(*one),
            _ => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Ports {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(u16),
            List(String),
        }
        match Form::deserialize(d)? {
            Form::One(p) => Ok(Ports(vec![p])),
            Form::List(s) => s
                .split(',')
                .map(|p| p.trim().parse::<u16>().map_err(|_| format!("upstream.port: {p:?} is not a port number")))
                .collect::<Result<Vec<u16>, String>>()
                .map(Ports)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl UpstreamConfig {
    /// `host` and `port` as (host, port) pairs, in order: libpq's rules — a single port applies
    /// to every host, otherwise there must be one port per host; no empty host.
    pub fn endpoints(&self) -> Result<Vec<(String, u16)>, String> {
        let hosts: Vec<&str> = self.host.split(',').map(str::trim).collect();
        if hosts.iter().any(|h| h.is_empty()) {
            return Err(format!("upstream.host {:?} has an empty entry", self.host));
        }
        let ports = &self.port.0;
        match ports.len() {
            1 => Ok(hosts.iter().map(|h| (h.to_string(), ports[0])).collect()),
            n if n == hosts.len() => Ok(hosts.iter().zip(ports).map(|(h, p)| (h.to_string(), *p)).collect()),
            n => Err(format!("upstream.port lists {n} ports for {} hosts (give one, or one per host)", hosts.len())),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub issuer: String,
    pub audience: String,
    /// JWKS file with the public keys tokens are verified against (`kid` selects). Exactly one
    /// of `jwks`, `jwks_url` and `discovery` names where the keys come from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<PathBuf>,
    /// Private key `pgward token issue` signs with (PKCS#8 PEM, Ed25519). Also signs audit
    /// checkpoints.
    pub signing_key: PathBuf,
    /// `kid` of the signing key in the JWKS.
    pub signing_kid: String,
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    #[serde(default = "default_ttl", with = "humantime_serde_compat")]
    pub default_ttl: Duration,
    /// Longest lifetime `pgward token issue` accepts.
    #[serde(default = "default_max_ttl", with = "humantime_serde_compat")]
    pub max_ttl: Duration,
    // Identity-provider interop (tokens of Keycloak, Entra ID, Okta, Google): where remote
    // keys come from, which claims a token must carry, which claims name the user and their
    // groups. Every one has a default that keeps a config written by `pgward init` working.
    /// `https://` URL of the provider's JWKS (e.g. Okta's `/oauth2/default/v1/keys`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Find the JWKS through OIDC discovery: `<issuer>/.well-known/openid-configuration`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub discovery: bool,
    /// PEM file of the CA certificates the provider's HTTPS certificate must chain to, instead
    /// of the system's trust store (a private CA, or a test CA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_ca: Option<PathBuf>,
    /// Remote keys are fetched again this often.
    #[serde(default = "default_jwks_refresh", with = "humantime_serde_compat", skip_serializing_if = "is_default_jwks_refresh")]
    pub jwks_refresh: Duration,
    /// A token naming a key id the cached keys lack makes pgward fetch the keys at once, but
    /// no sooner than this after the previous fetch (so junk key ids cannot flood the provider).
    #[serde(default = "default_jwks_min_refresh", with = "humantime_serde_compat", skip_serializing_if = "is_default_jwks_min_refresh")]
    pub jwks_min_refresh: Duration,
    /// Registered claims a token must carry besides `iss`, `aud` and the user claim: `exp`
    /// always, any of `iat`, `nbf`, `jti`. Present ones are validated either way.
    #[serde(default = "default_required_claims", skip_serializing_if = "is_default_required_claims")]
    pub required_claims: Vec<String>,
    /// The claim holding the name a user connects as: a top-level claim name (`sub`,
    /// `preferred_username`, `email`, `upn`) or a JSON pointer (`/ext/login`).
    #[serde(default = "default_username_claim", skip_serializing_if = "is_default_username_claim")]
    pub username_claim: String,
    /// JSON pointer (RFC 6901) to the user's groups: `/groups`, `/roles`,
    /// `/realm_access/roles`; a top-level claim name is taken as `/<name>`.
    #[serde(default = "default_groups_claim", skip_serializing_if = "is_default_groups_claim")]
    pub groups_claim: String,
}

/// `auth.jwks_refresh` when not set.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(15 * 60);
/// `auth.jwks_min_refresh` when not set.
pub const DEFAULT_JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);
/// Claims `auth.required_claims` may name.
pub const REQUIRABLE_CLAIMS: [&str; 4] = ["exp", "iat", "nbf", "jti"];

fn default_jwks_refresh() -> Duration {
    DEFAULT_JWKS_REFRESH
}
fn default_jwks_min_refresh() -> Duration {
    DEFAULT_JWKS_MIN_REFRESH
}
fn default_required_claims() -> Vec<String> {
    vec!["exp".into()]
}
fn default_username_claim() -> String {
    "sub".into()
}
fn default_groups_claim() -> String {
    "/groups".into()
}
fn is_default_jwks_refresh(d: &Duration) -> bool {
    *d == DEFAULT_JWKS_REFRESH
}
fn is_default_jwks_min_refresh(d: &Duration) -> bool {
    *d == DEFAULT_JWKS_MIN_REFRESH
}
fn is_default_required_claims(v: &[String]) -> bool {
    v == ["exp"]
}
fn is_default_username_claim(s: &str) -> bool {
    s == "sub"
}
fn is_default_groups_claim(s: &str) -> bool {
    s == "/groups"
}

impl AuthConfig {
    /// What is wrong with the identity-provider settings, if anything.
    fn idp_problem(&self) -> Option<String> {
        let issuer = &self.issuer;
        let sources = [self.jwks.is_some(), self.jwks_url.is_some(), self.discovery];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Some("set exactly one of auth.jwks (a file), auth.jwks_url, auth.discovery = true".into());
        }
        if let Some(u) = &self.jwks_url
            && !is_https_url(u)
        {
            return Some(format!("auth.jwks_url {u:?} is not an https:// URL"));
        }
        if self.discovery && !is_https_url(issuer) {
            return Some(format!("auth.discovery needs auth.issuer to be an https:// URL (got {issuer:?})"));
        }
        if self.jwks_refresh < Duration::from_secs(1) {
            return Some("auth.jwks_refresh must be at least 1s".into());
        }
        if !self.required_claims.iter().any(|c| c == "exp") {
            return Some("auth.required_claims must include \"exp\" (tokens without an end are never accepted)".into());
        }
        if let Some(c) = self.required_claims.iter().find(|c| !REQUIRABLE_CLAIMS.contains(&c.as_str())) {
            return Some(format!("auth.required_claims: {c:?} is not one of {REQUIRABLE_CLAIMS:?}"));
        }
        for (key, v) in [("auth.username_claim", &self.username_claim), ("auth.groups_claim", &self.groups_claim)] {
            if v.is_empty() || v == "/" {
                return Some(format!("{key} must name a claim"));
            }
        }
        None
    }

    /// Whether keys come from the identity provider over HTTPS (and not from a file).
    pub fn remote_keys(&self) -> bool {
        self.jwks_url.is_some() || self.discovery
    }
}

fn is_https_url(s: &str) -> bool {
    url::Url::parse(s).is_ok_and(|u| u.scheme() == "https" && u.host().is_some())
}

/// `audit.export`: where copies of durable audit records go (see `audit::export`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExportKind {
    #[default]
    None,
    /// RFC 5424 over the unix datagram socket `audit.syslog_socket`.
    Syslog,
    /// One JSON record per line on stdout.
    Stdout,
    /// RFC 5424 over TCP to `audit.syslog_address`, octet-counted (RFC 6587).
    #[serde(rename = "syslog-tcp")]
    SyslogTcp,
    /// Like `syslog-tcp`, over TLS (RFC 5425) verified against `audit.syslog_ca`.
    #[serde(rename = "syslog-tls")]
    SyslogTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// One fsync per record (slowest; for measurement).
    Always,
    /// Group commit: one fsync covers every record appended before it started; syncs are
    /// pipelined over `sync_threads` threads.
    #[default]
    Group,
    /// No fsync (records reach the page cache only). Not write-ahead durable.
    Off,
}

/// When a statement's record must be durable (docs/audit-log.md, "Durability").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Reads, and writes inside a transaction, go to Postgres while their records are made
    /// durable; every reply, and whatever can commit, waits for the records.
    #[default]
    HoldReply,
    /// Every statement waits for its record before it goes to Postgres.
    WriteAhead,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    pub dir: PathBuf,
    #[serde(default)]
    pub fsync: FsyncPolicy,
    /// "hold-reply" (default) or "write-ahead".
    #[serde(default)]
    pub durability: Durability,
    /// A signed checkpoint after this many records...
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// ...or after this long, whichever comes first (only when records were added).
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde_compat")]
    pub checkpoint_interval: Duration,
    /// Start a new segment file when the current one passes this size.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// With `fsync = "group"`: threads that write and fdatasync batches. More than one lets
    /// the next batch's sync start while the previous one is still in flight — but batches
    /// share the page being appended to, and a page under writeback is written again only
    /// after that write completes, so on one disk the second sync mostly waits anyway while
    /// batches get smaller: one thread gives more throughput for less CPU.
    #[serde(default = "default_sync_threads")]
    pub sync_threads: usize,
    /// With `fsync` group/always and one sync thread: write batches with O_DIRECT and then
    /// fdatasync (only a cache flush is left to it), instead of through the page cache: less
    /// latency and about half the CPU per durable batch. Falls back
    /// to the page cache (with a warning) where the filesystem refuses direct I/O.
    #[serde(default = "default_true")]
    pub direct_io: bool,
    /// Also copy every durable record to the host's log pipeline: "none", "syslog" (RFC 5424
    /// over `syslog_socket`) or "stdout" (JSON lines, for journald).
    #[serde(default, skip_serializing_if = "is_default_export")]
    pub export: ExportKind,
    #[serde(default = "default_syslog_socket", skip_serializing_if = "is_default_syslog_socket")]
    pub syslog_socket: PathBuf,
    /// `HOST:PORT` of the syslog receiver for `export = "syslog-tcp"` / `"syslog-tls"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog_address: Option<String>,
    /// PEM CA certificates the receiver's certificate must chain to (`syslog-tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog_ca: Option<PathBuf>,
    /// Name the receiver's certificate must carry (`syslog-tls`); default: the host part of
    /// `syslog_address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog_server_name: Option<String>,
    /// The longest syslog message the receiver takes whole (rsyslog: `maxMessageSize`). A
    /// record whose message would be longer — its size is the client's choice — is sent as a
    /// stub with its seq, kind and hash, which `verify --against` compares, instead of
    /// arriving cut.
    #[serde(default = "default_syslog_max_message", skip_serializing_if = "is_default_syslog_max_message")]
    pub syslog_max_message: usize,
    /// Private key (PKCS#8 PEM, Ed25519) that signs checkpoints: only the writer reads it.
    /// Separate from `auth.signing_key`, so a leaked token key cannot re-sign the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_key: Option<PathBuf>,
    /// `kid` written into checkpoints signed with `checkpoint_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_kid: Option<String>,
    /// JWKS holding the public half of `checkpoint_key` (what `audit verify` checks against).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_jwks: Option<PathBuf>,
}

fn is_default_export(k: &ExportKind) -> bool {
    *k == ExportKind::None
}
/// rsyslog's default `maxMessageSize`.
pub const DEFAULT_SYSLOG_MAX_MESSAGE: usize = 8 * 1024;
/// Shorter than a stub's message: every record could only be sent as a stub.
pub const MIN_SYSLOG_MAX_MESSAGE: usize = 480;
fn default_syslog_max_message() -> usize {
    DEFAULT_SYSLOG_MAX_MESSAGE
}
fn is_default_syslog_max_message(n: &usize) -> bool {
    *n == DEFAULT_SYSLOG_MAX_MESSAGE
}
fn default_syslog_socket() -> PathBuf {
    PathBuf::from("/dev/log")
}
fn is_default_syslog_socket(p: &Path) -> bool {
    p == Path::new("/dev/log")
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default)]
    pub files: Vec<PathBuf>,
}

/// `[intercept]`: see src/ebpf.rs and the README. Every field has a default, so an existing
/// config without this section keeps loading (interception off).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InterceptConfig {
    pub enabled: bool,
    /// cgroup v2 directory the cgroup programs attach to (they apply to everything below it).
    /// Default: the root of the unified hierarchy (the cgroup2 mount).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// cgroup pgward moves itself into at start; its connects are exempt. Default:
    /// `<cgroup>/pgward-gateway`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_cgroup: Option<PathBuf>,
    /// Also exempt connects made by this uid (e.g. pgward's dedicated user). Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exempt_uid: Option<u32>,
    /// `ADDR:PORT` connections to these are steered into pgward; an unspecified address
    /// (`0.0.0.0`, `[::]`) means any address of that family.
    pub protected: Vec<String>,
    /// `ADDR:PORT` connections to these fail with EPERM (anyone but pgward). Default: the
    /// upstream's address (any local address on its port when the upstream is local), unless
    /// `protected` already covers it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<Vec<String>>,
    /// Where protected IPv4 / IPv6 connects go. Default: derived from `server.listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_to6: Option<String>,
    /// Attach sk_lookup to `netns`: connections from other hosts to a protected port reach pgward.
    pub sk_lookup: bool,
    pub netns: PathBuf,
    /// What `serve` does when users other than pgward / Postgres / root can reach the real
    /// Postgres unix socket: `refuse` (do not start), `warn`, `off`.
    pub unix_socket_check: UnixSocketCheck,
    /// Directories holding the real Postgres socket. Default: `upstream.host` when it is a
    /// directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_socket_dirs: Option<Vec<PathBuf>>,
    /// Where `serve` records what it attached, for `pgward status`.
    pub state_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnixSocketCheck {
    #[default]
    Refuse,
    Warn,
    Off,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        InterceptConfig {
            enabled: false,
            cgroup: None,
            gateway_cgroup: None,
            exempt_uid: None,
            protected: vec!["0.0.0.0:5432".into(), "[::]:5432".into()],
            guard: None,
            redirect_to: None,
            redirect_to6: None,
            sk_lookup: true,
            netns: PathBuf::from("/proc/self/ns/net"),
            unix_socket_check: UnixSocketCheck::Refuse,
            upstream_socket_dirs: None,
            state_file: PathBuf::from("intercept.state.json"),
        }
    }
}

impl InterceptConfig {
    fn is_default(&self) -> bool {
        *self == InterceptConfig::default()
    }
}

/// `[access]`: see src/access/ and the README ("Access and revocation").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Directory of `revoked.jsonl` and `access.jsonl` (written by the CLI, watched by serve).
    pub state_dir: PathBuf,
    /// Token groups whose members may approve JIT access requests.
    pub approver_groups: Vec<String>,
    /// Database roles a JIT request may ask for (none: JIT access is off).
    pub grantable_roles: Vec<String>,
    /// Longest grant.
    #[serde(with = "humantime_serde_compat")]
    pub max_ttl: Duration,
    /// A request not approved within this long lapses.
    #[serde(with = "humantime_serde_compat")]
    pub request_ttl: Duration,
    /// Where the access state lives: this host's files, or etcd (fleet-wide).
    pub backend: AccessBackend,
    /// With `backend = "etcd"`: how long after the last successful read of etcd new logins
    /// are still accepted on the last known state. Sessions already logged in keep running.
    #[serde(with = "humantime_serde_compat")]
    pub max_staleness: Duration,
    /// `[access.etcd]`: the cluster (used when `backend = "etcd"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdConfig>,
}

// ---- [access] backend = "etcd" ------------------------------------------------------------

/// Where revocations, access requests, approvals and grants live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessBackend {
    /// `revoked.jsonl` / `access.jsonl` in `state_dir`: one host.
    #[default]
    File,
    /// Keys under `[access.etcd] prefix`: every gateway of the fleet watches them.
    Etcd,
}

/// `[access.etcd]`: the etcd cluster (v3 API) holding the fleet's access state and the audit
/// checkpoint anchors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `["https://10.0.0.1:2379", "https://10.0.0.2:2379"]`.
    pub endpoints: Vec<String>,
    /// Key prefix of everything pgward stores.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// CA bundle (PEM) the servers' certificates are checked against (https endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), when etcd runs with `--client-cert-auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// etcd user (auth enabled); its password is the first line of `password_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Longest wait for one request (and for a connection).
    #[serde(default = "default_etcd_timeout", with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Write each durable audit checkpoint to etcd (`<prefix>/anchors/<node_name>/`).
    #[serde(default = "default_true")]
    pub anchors: bool,
    /// This gateway's name among the fleet's anchors (default: the host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

fn default_etcd_prefix() -> String {
    "/pgward".into()
}
/// `[access.etcd] timeout` when not set: well under the default staleness bound.
fn default_etcd_timeout() -> Duration {
    Duration::from_secs(2)
}
/// `[access] max_staleness` when not set.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(30);

impl EtcdConfig {
    /// `node_name`, or the host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".into())
        })
    }

    fn validate(&self) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err("access.etcd.endpoints is empty".into());
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') || self.prefix.len() < 2 {
            return Err(format!("access.etcd.prefix {:?} must start with '/' and not end with it", self.prefix));
        }
        let https = self.endpoints.iter().filter(|u| u.starts_with("https://")).count();
        let http = self.endpoints.iter().filter(|u| u.starts_with("http://")).count();
        if https + http != self.endpoints.len() || (https > 0 && http > 0) {
            return Err("access.etcd.endpoints must all be https://HOST:PORT (or all http://HOST:PORT)".into());
        }
        if https > 0 && self.ca_file.is_none() {
            return Err("access.etcd: https endpoints need ca_file (the CA that signed the etcd servers' certificates)".into());
        }
        if https == 0 && (self.ca_file.is_some() || self.cert_file.is_some()) {
            return Err("access.etcd: ca_file and cert_file need https:// endpoints".into());
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err("access.etcd: cert_file and key_file go together".into());
        }
        if self.user.is_some() != self.password_file.is_some() {
            return Err("access.etcd: user and password_file go together".into());
        }
        if self.timeout.is_zero() {
            return Err("access.etcd.timeout must be more than 0".into());
        }
        if self.node_name.as_deref().is_some_and(|n| n.is_empty() || n.contains('/')) {
            return Err("access.etcd.node_name must be non-empty and without '/'".into());
        }
        Ok(())
    }
}

impl AccessConfig {
    /// The `[access]` checks `Config::load` runs.
    fn validate(&self) -> Result<(), String> {
        match (&self.backend, &self.etcd) {
            (AccessBackend::Etcd, None) => Err("access.backend = \"etcd\" needs an [access.etcd] section".into()),
            (_, Some(e)) => e.validate(),
            _ => Ok(()),
        }?;
        if self.max_staleness.is_zero() {
            return Err("access.max_staleness must be more than 0".into());
        }
        Ok(())
    }

    /// `[access.etcd]` when the backend is etcd.
    pub fn etcd(&self) -> Option<&EtcdConfig> {
        self.etcd.as_ref().filter(|_| self.backend == AccessBackend::Etcd)
    }
}

// ---- end of [access] backend = "etcd" -----------------------------------------------------

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            state_dir: PathBuf::from("state"),
            approver_groups: Vec::new(),
            grantable_roles: Vec::new(),
            max_ttl: Duration::from_secs(8 * 3600),
            request_ttl: Duration::from_secs(24 * 3600),
            backend: AccessBackend::File,
            max_staleness: DEFAULT_MAX_STALENESS,
            etcd: None,
        }
    }
}

impl AccessConfig {
    fn is_default(&self) -> bool {
        *self == AccessConfig::default()
    }
}

fn default_true() -> bool {
    true
}
fn default_pg_port() -> u16 {
    5432
}
fn default_database() -> String {
    "postgres".into()
}
/// `server.startup_timeout` when not set: Postgres's `authentication_timeout` default.
fn default_startup_timeout() -> Duration {
    Duration::from_secs(60)
}
/// `server.max_message_bytes` when not set. Postgres accepts up to 1 GB, but through pgward a
/// message also becomes an audit record (a Bind's values hex-encoded), so that much per
/// connection is a denial of service; 64 MiB carries bytea values of documents and images,
/// and COPY is unaffected (clients send COPY data in chunks of 64 KiB or less).
fn default_max_message_bytes() -> usize {
    64 << 20
}
/// `server.buffer_budget_bytes` when not set: four messages of the default largest size.
fn default_buffer_budget_bytes() -> usize {
    256 << 20
}
/// `server.max_session_state_bytes` when not set: one message of the default largest size.
fn default_max_session_state_bytes() -> usize {
    64 << 20
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_pool_max_idle() -> usize {
    16
}
fn default_pool_max_idle_total() -> usize {
    64
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_leeway() -> u64 {
    30
}
fn default_ttl() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_max_ttl() -> Duration {
    Duration::from_secs(12 * 3600)
}
/// `audit.checkpoint_every` when not set.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 1000;
/// `audit.checkpoint_interval` when not set: records stay unanchored about this long.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

fn default_checkpoint_every() -> u64 {
    DEFAULT_CHECKPOINT_EVERY
}
fn default_checkpoint_interval() -> Duration {
    DEFAULT_CHECKPOINT_INTERVAL
}
fn default_sync_threads() -> usize {
    1
}

fn default_segment_bytes() -> u64 {
    64 * 1024 * 1024
}

/// Smallest `server.max_message_bytes`: room for a statement of some size.
const MIN_MESSAGE_LIMIT: usize = 64 * 1024;

/// (De)serialize a Duration as a humantime string ("15m", "10s").
mod humantime_serde_compat {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut cfg: Config = toml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        let base = path
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."));
        cfg.base_dir = base;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |msg: String| ConfigError::Invalid { path: path.to_owned(), msg };
        if self.server.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad(format!("server.listen {:?} is not HOST:PORT", self.server.listen)));
        }
        let endpoints = self.intercept.protected.iter().chain(self.intercept.guard.iter().flatten());
        for e in endpoints.chain(&self.intercept.redirect_to).chain(&self.intercept.redirect_to6) {
            if e.parse::<std::net::SocketAddr>().is_err() {
                return Err(bad(format!("intercept: {e:?} is not ADDR:PORT (e.g. 0.0.0.0:5432, [::]:5432)")));
            }
        }
        let s = &self.server;
        if !(MIN_MESSAGE_LIMIT..=crate::wire::PG_LARGE_MESSAGE_LIMIT).contains(&s.max_message_bytes) {
            return Err(bad(format!(
                "server.max_message_bytes must be between {MIN_MESSAGE_LIMIT} and {} (Postgres's own limit)",
                crate::wire::PG_LARGE_MESSAGE_LIMIT
            )));
        }
        if s.buffer_budget_bytes < s.max_message_bytes {
            return Err(bad("server.buffer_budget_bytes must be at least server.max_message_bytes".into()));
        }
        if s.max_session_state_bytes < s.max_message_bytes {
            return Err(bad("server.max_session_state_bytes must be at least server.max_message_bytes".into()));
        }
        if s.startup_timeout.is_zero() {
            return Err(bad("server.startup_timeout must be more than 0".into()));
        }
        if let Some(msg) = self.auth.idp_problem() {
            return Err(bad(msg));
        }
        self.upstream.endpoints().map_err(bad)?;
        if self.audit.syslog_max_message < MIN_SYSLOG_MAX_MESSAGE {
            return Err(bad(format!("audit.syslog_max_message must be at least {MIN_SYSLOG_MAX_MESSAGE}")));
        }
        if self.audit.checkpoint_every == 0 {
            return Err(bad("audit.checkpoint_every must be at least 1".into()));
        }
        self.access.validate().map_err(bad)?;
        Ok(())
    }

    /// Resolve a path from the config against the config file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() { p.to_owned() } else { self.base_dir.join(p) }
    }

    pub fn listen_addr(&self) -> std::net::SocketAddr {
        // validated in `load`
        self.server.listen.parse().unwrap_or_else(|_| ([127, 0, 0, 1], 6432).into())
    }

    /// The service role's password, if a password file is configured.
    pub fn upstream_password(&self) -> std::io::Result<Option<String>> {
        match &self.upstream.password_file {
            None => Ok(None),
            Some(p) => {
                let text = std::fs::read_to_string(self.resolve(p))?;
                Ok(Some(text.lines().next().unwrap_or("").to_string()))
            }
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod upstream_tests {
    use super::*;

    fn upstream(extra: &str) -> Result<UpstreamConfig, toml::de::Error> {
        toml::from_str(&format!("user = \"svc\"\n{extra}"))
    }

    #[test]
    fn hosts_and_ports_pair_up_as_in_libpq() {
        let u = upstream("host = \"a\"").unwrap();
        assert_eq!(u.endpoints().unwrap(), [("a".to_string(), 5432)]);
        assert!(u.port == Ports(vec![5432]) && u.target_session_attrs == TargetSessionAttrs::Any);
        let u = upstream("host = \"a, b,/run/pg\"\nport = 5433").unwrap();
        assert_eq!(u.endpoints().unwrap(), [("a".into(), 5433), ("b".into(), 5433), ("/run/pg".to_string(), 5433)]);
        let u = upstream("host = \"a,b\"\nport = \"5433,5434\"\ntarget_session_attrs = \"read-write\"").unwrap();
        assert_eq!(u.endpoints().unwrap(), [("a".to_string(), 5433), ("b".to_string(), 5434)]);
        assert_eq!(u.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert!(upstream("host = \"a,b,c\"\nport = \"1,2\"").unwrap().endpoints().unwrap_err().contains("2 ports for 3 hosts"));
        assert!(upstream("host = \"a,,b\"").unwrap().endpoints().unwrap_err().contains("empty entry"));
        assert!(upstream("host = \"a\"\nport = \"5432,x\"").is_err());
        assert!(upstream("host = \"a\"\nport = 70000").is_err());
    }

    #[test]
    fn ports_and_attrs_are_written_back_in_their_own_form() {
        let u = upstream("host = \"a,b\"\nport = \"1,2\"\nstandby_roles = [\"ro\"]").unwrap();
        let text = toml::to_string(&u).unwrap();
        assert!(text.contains("port = \"1,2\"") && text.contains("standby_roles = [\"ro\"]"), "{text}");
        assert!(!text.contains("target_session_attrs") && !text.contains("standby_session_attrs"), "defaults are not written: {text}");
        let one = toml::to_string(&upstream("host = \"a\"").unwrap()).unwrap();
        assert!(one.contains("port = 5432"), "{one}");
        let back: UpstreamConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.endpoints(), u.endpoints());
    }
}
