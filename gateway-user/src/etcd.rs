//! The connection to etcd (`[access.etcd]`) and the key layout pgward uses in it.
//!
//! Keys, under `prefix` (default `/pgward`):
//!
//! * `<prefix>/state/revoked/<id>` — one [`crate::access::Revocation`] (JSON), written once.
//! * `<prefix>/state/access/<20-digit seq>` — one [`crate::access::AccessEvent`] (JSON), in
//!   the order they were made; `<prefix>/access-seq` holds the last seq and serialises the
//!   writers (compare-and-swap), so every event is validated against all events before it.
//! * `<prefix>/anchors/<node name>/<20-digit seq>` — an audit checkpoint of that gateway's log
//!   (the `HEAD` JSON), see `audit::anchor`.
//!
//! Nothing pgward writes is ever modified or deleted by pgward.

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::{Config, EtcdConfig};

/// How often the client pings an idle connection (a dead member is noticed by then).
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("[access.etcd] is not configured")]
    NotConfigured,
    #[error("access.etcd: cannot read {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("etcd ({endpoints}): {source}")]
    Client { endpoints: String, source: etcd_client::Error },
    #[error("etcd ({endpoints}): no answer within {timeout:?}")]
    Timeout { endpoints: String, timeout: Duration },
    #[error("etcd: {0}")]
    Data(String),
}

/// Where the pieces live in etcd.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(cfg: &EtcdConfig) -> Keys {
        Keys { prefix: cfg.prefix.clone() }
    }
    /// Everything a gateway watches.
    pub fn state(&self) -> String {
        format!("{}/state/", self.prefix)
    }
    pub fn revoked_dir(&self) -> String {
        format!("{}/state/revoked/", self.prefix)
    }
    pub fn revoked(&self, id: &str) -> String {
        format!("{}{id}", self.revoked_dir())
    }
    pub fn access_dir(&self) -> String {
        format!("{}/state/access/", self.prefix)
    }
    pub fn access(&self, seq: u64) -> String {
        format!("{}{seq:020}", self.access_dir())
    }
    pub fn access_seq(&self) -> String {
        format!("{}/access-seq", self.prefix)
    }
    pub fn anchors_dir(&self, node: &str) -> String {
        format!("{}/anchors/{node}/", self.prefix)
    }
    pub fn anchor(&self, node: &str, seq: u64) -> String {
        format!("{}{seq:020}", self.anchors_dir(node))
    }
}

/// A connected client, with the settings every call needs.
#[derive(Clone)]
pub struct Etcd {
    pub client: Client,
    pub keys: Keys,
    pub timeout: Duration,
    endpoints: String,
}

impl Etcd {
    /// Connect with `[access.etcd]` (TLS when the endpoints are https or a CA/cert is given,
    /// user/password when configured). Without a user nothing is sent yet: the first request
    /// finds out whether the cluster answers.
    pub async fn connect(cfg: &Config) -> Result<Etcd, EtcdError> {
        let e = cfg.access.etcd.as_ref().ok_or(EtcdError::NotConfigured)?;
        Self::connect_to(cfg, e, &e.endpoints).await
    }

    /// Like [`Etcd::connect`], to `endpoints` only (doctor asks each member on its own).
    pub async fn connect_to(cfg: &Config, e: &EtcdConfig, endpoints: &[String]) -> Result<Etcd, EtcdError> {
        let names = endpoints.join(",");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(e.timeout)
            .with_timeout(e.timeout)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, e.timeout)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = tls_options(cfg, e)? {
            opts = opts.with_tls(tls);
        }
        if let (Some(user), Some(pw)) = (&e.user, &e.password_file) {
            let text = read(cfg, pw)?;
            let password = text.lines().next().unwrap_or("").to_string();
            opts = opts.with_user(user.clone(), password).with_auto_token_refresh(true);
        }
        let connect = Client::connect(endpoints, Some(opts));
        let client = match tokio::time::timeout(e.timeout, connect).await {
            Ok(r) => r.map_err(|source| EtcdError::Client { endpoints: names.clone(), source })?,
            Err(_) => return Err(EtcdError::Timeout { endpoints: names, timeout: e.timeout }),
        };
        Ok(Etcd { client, keys: Keys::new(e), timeout: e.timeout, endpoints: names })
    }

    /// Run one request with the configured timeout, naming the endpoints in the error.
    pub async fn call<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(|source| EtcdError::Client { endpoints: self.endpoints.clone(), source }),
            Err(_) => Err(EtcdError::Timeout { endpoints: self.endpoints.clone(), timeout: self.timeout }),
        }
    }
}

fn read(cfg: &Config, p: &std::path::Path) -> Result<String, EtcdError> {
    let path = cfg.resolve(p);
    std::fs::read_to_string(&path).map_err(|source| EtcdError::File { path: path.display().to_string(), source })
}

/// TLS settings for https endpoints (the config check makes them all https or all http).
fn tls_options(cfg: &Config, e: &EtcdConfig) -> Result<Option<TlsOptions>, EtcdError> {
    if !e.endpoints.iter().any(|u| u.starts_with("https://")) {
        return Ok(None);
    }
    let mut tls = TlsOptions::new();
    if let Some(ca) = &e.ca_file {
        tls = tls.ca_certificate(Certificate::from_pem(read(cfg, ca)?));
    }
    if let (Some(cert), Some(key)) = (&e.cert_file, &e.key_file) {
        tls = tls.identity(Identity::from_pem(read(cfg, cert)?, read(cfg, key)?));
    }
    Ok(Some(tls))
}

/// A current-thread runtime for the CLI's calls to etcd (the CLI is otherwise synchronous).
pub fn block_on<T>(fut: impl std::future::Future<Output = T>) -> std::io::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(rt.block_on(fut))
}
