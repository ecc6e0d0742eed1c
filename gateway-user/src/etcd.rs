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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, GetOptions, GetResponse, Identity, TlsOptions, Txn, TxnResponse, WatchOptions,
    WatchStream,
};

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

/// The cluster: one client per member, made when first used. A request goes to the member
/// that answered last and, when that one fails or does not answer within `timeout`, to the
/// next — so a member that is down costs one failed attempt, not the request. (etcd's own
/// client balances over all members and keeps sending to a dead one.)
#[derive(Clone)]
pub struct Etcd {
    endpoints: Arc<Vec<String>>,
    options: ConnectOptions,
    clients: Arc<Mutex<Vec<Option<Client>>>>,
    current: Arc<AtomicUsize>,
    pub keys: Keys,
    pub timeout: Duration,
}

impl Etcd {
    /// The cluster of `[access.etcd]` (TLS for https endpoints, user/password when
    /// configured). Nothing is sent yet: the first request finds out whether it answers.
    pub async fn connect(cfg: &Config) -> Result<Etcd, EtcdError> {
        let e = cfg.access.etcd.as_ref().ok_or(EtcdError::NotConfigured)?;
        Self::connect_to(cfg, e, &e.endpoints).await
    }

    /// Like [`Etcd::connect`], to `endpoints` only (doctor asks each member on its own).
    pub async fn connect_to(cfg: &Config, e: &EtcdConfig, endpoints: &[String]) -> Result<Etcd, EtcdError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(e.timeout)
            .with_timeout(e.timeout)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, e.timeout)
            .with_keep_alive_while_idle(true);
        if let Some(tls) = tls_options(cfg, e)? {
            options = options.with_tls(tls);
        }
        if let (Some(user), Some(pw)) = (&e.user, &e.password_file) {
            let text = read(cfg, pw)?;
            let password = text.lines().next().unwrap_or("").to_string();
            options = options.with_user(user.clone(), password).with_auto_token_refresh(true);
        }
        Ok(Etcd {
            endpoints: Arc::new(endpoints.to_vec()),
            options,
            clients: Arc::new(Mutex::new(vec![None; endpoints.len()])),
            current: Arc::new(AtomicUsize::new(0)),
            keys: Keys::new(e),
            timeout: e.timeout,
        })
    }

    /// The client of member `i`, connecting it first if needed (with a user, connecting
    /// authenticates: a request).
    async fn member(&self, i: usize) -> Result<Client, EtcdError> {
        if let Some(c) = crate::lock(&self.clients).get(i).cloned().flatten() {
            return Ok(c);
        }
        let ep = &self.endpoints[i];
        let connect = Client::connect([ep.as_str()], Some(self.options.clone()));
        let c = match tokio::time::timeout(self.timeout, connect).await {
            Ok(r) => r.map_err(|source| EtcdError::Client { endpoints: ep.clone(), source })?,
            Err(_) => {
                return Err(EtcdError::Timeout { endpoints: ep.clone(), timeout: self.timeout });
            }
        };
        if let Some(slot) = crate::lock(&self.clients).get_mut(i) {
            *slot = Some(c.clone());
        }
        Ok(c)
    }

    /// Run `request` against one member after the other, starting with the one that answered
    /// last, until one answers; the last error if none does.
    pub async fn call<T, F, Fut>(&self, request: F) -> Result<T, EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.endpoints.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = EtcdError::NotConfigured;
        for k in 0..n {
            let i = (start + k) % n;
            let ep = &self.endpoints[i];
            let client = match self.member(i).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match tokio::time::timeout(self.timeout, request(client)).await {
                Ok(Ok(v)) => {
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(source)) => last = EtcdError::Client { endpoints: ep.clone(), source },
                Err(_) => last = EtcdError::Timeout { endpoints: ep.clone(), timeout: self.timeout },
            }
            tracing::debug!(endpoint = %ep, error = %last, "etcd member did not answer; trying the next");
        }
        Err(last)
    }

    /// A linearizable range read (failing over like [`Etcd::call`]).
    pub async fn get(&self, key: String, opts: Option<GetOptions>) -> Result<GetResponse, EtcdError> {
        self.call(|mut c| {
            let (key, opts) = (key.clone(), opts.clone());
            async move { c.get(key, opts).await }
        })
        .await
    }

    pub async fn txn(&self, txn: Txn) -> Result<TxnResponse, EtcdError> {
        self.call(|mut c| {
            let txn = txn.clone();
            async move { c.txn(txn).await }
        })
        .await
    }

    pub async fn watch(&self, key: String, opts: WatchOptions) -> Result<WatchStream, EtcdError> {
        self.call(|mut c| {
            let (key, opts) = (key.clone(), opts.clone());
            async move { c.watch(key, Some(opts)).await }
        })
        .await
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
