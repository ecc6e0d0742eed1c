//! Fetching an identity provider's JWKS over HTTPS: from `auth.jwks_url`, or through OIDC
//! discovery (`<issuer>/.well-known/openid-configuration`, whose `jwks_uri` names it).
//!
//! The HTTP client is reqwest on rustls with the ring provider (as the rest of pgward); it
//! speaks HTTPS only (also after redirects) and trusts `auth.jwks_ca` when set, otherwise the
//! system's trust store. Answers are bounded in time and size.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;

use super::AuthError;
use crate::config::Config;

/// Longest a whole request (connect, TLS, answer) may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest discovery document or JWKS read (real ones are a few KiB).
const MAX_BODY_BYTES: usize = 1 << 20;
/// Redirects followed (HTTPS only).
const MAX_REDIRECTS: usize = 3;
/// Where OIDC discovery finds the provider's metadata, below the issuer.
const DISCOVERY_PATH: &str = "/.well-known/openid-configuration";

/// Where the keys come from.
#[derive(Debug, Clone)]
enum Source {
    /// `auth.jwks_url`.
    Url(String),
    /// OIDC discovery from `auth.issuer`.
    Discovery { issuer: String },
}

/// Fetches the provider's JWKS.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    source: Source,
}

/// A JWKS as fetched, and the URL it came from.
#[derive(Debug)]
pub struct Fetched {
    pub jwks_url: String,
    pub body: String,
}

impl Fetcher {
    /// The fetcher for a config whose keys are remote (`None` for a JWKS file).
    pub fn from_config(cfg: &Config) -> Result<Option<Fetcher>, AuthError> {
        let auth = &cfg.auth;
        let source = match (&auth.jwks_url, auth.discovery) {
            (Some(u), _) => Source::Url(u.clone()),
            (None, true) => Source::Discovery { issuer: auth.issuer.clone() },
            (None, false) => return Ok(None),
        };
        let tls = tls_config(auth.jwks_ca.as_ref().map(|p| cfg.resolve(p)).as_deref())?;
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("pgward/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AuthError::Keys(format!("cannot set up the HTTPS client: {}", chain(&e))))?;
        Ok(Some(Fetcher { client, source }))
    }

    /// Where the keys come from, for logs and `pgward doctor`.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Url(u) => u.clone(),
            Source::Discovery { issuer } => format!("{}{DISCOVERY_PATH}", issuer.trim_end_matches('/')),
        }
    }

    /// Fetch the JWKS (after the discovery document, for discovery). The error says which
    /// request failed and why.
    pub async fn fetch(&self) -> Result<Fetched, String> {
        let jwks_url = match &self.source {
            Source::Url(u) => u.clone(),
            Source::Discovery { issuer } => self.discover(issuer).await?,
        };
        let body = self.get(&jwks_url).await?;
        Ok(Fetched { jwks_url, body })
    }

    /// The `jwks_uri` of the issuer's discovery document, which must name the same issuer.
    async fn discover(&self, issuer: &str) -> Result<String, String> {
        let url = format!("{}{DISCOVERY_PATH}", issuer.trim_end_matches('/'));
        let text = self.get(&url).await?;
        let doc: Value = serde_json::from_str(&text).map_err(|e| format!("{url}: not a JSON document: {e}"))?;
        match doc.get("issuer").and_then(Value::as_str) {
            Some(i) if i == issuer => {}
            other => {
                return Err(format!(
                    "{url}: the document is for issuer {other:?}, not {issuer:?} (auth.issuer must be the provider's issuer exactly)"
                ));
            }
        }
        let Some(jwks_uri) = doc.get("jwks_uri").and_then(Value::as_str) else {
            return Err(format!("{url}: the document has no jwks_uri"));
        };
        match url::Url::parse(jwks_uri) {
            Ok(u) if u.scheme() == "https" => Ok(jwks_uri.to_owned()),
            _ => Err(format!("{url}: jwks_uri {jwks_uri:?} is not an https:// URL")),
        }
    }

    /// GET `url`: the body of a 200 answer, at most [`MAX_BODY_BYTES`].
    async fn get(&self, url: &str) -> Result<String, String> {
        let mut resp = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("{url}: {}", chain(&e)))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {}", chain(&e)))? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(format!("{url}: the answer is larger than {MAX_BODY_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).map_err(|_| format!("{url}: the answer is not UTF-8"))
    }
}

/// rustls client config with the ring provider: the CAs in `ca` (PEM), or the system's.
fn tls_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, AuthError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| AuthError::Keys(format!("auth.jwks_ca {}: {e}", path.display())))?;
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| AuthError::Keys(format!("auth.jwks_ca {}: {e}", path.display())))?;
            }
            if roots.is_empty() {
                return Err(AuthError::Keys(format!("auth.jwks_ca {} holds no certificate", path.display())));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::warn!(error = %e, "reading the system's CA certificates");
            }
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(AuthError::Keys(
                    "no CA certificate in the system's trust store; set auth.jwks_ca".into(),
                ));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cc = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AuthError::Keys(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cc.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cc)
}

/// An error and its causes on one line ("error sending request: …: invalid peer certificate:
/// UnknownIssuer"): reqwest's own message alone rarely says what went wrong.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}
