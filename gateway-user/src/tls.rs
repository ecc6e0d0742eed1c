//! TLS server configuration (rustls) for client connections, and client config for upstream.

use std::sync::Arc;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// Load cert + key named in the config into a rustls server config.
pub fn server_config(_cfg: &Config) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    Err(TlsError::Setup("not implemented".into()))
}
