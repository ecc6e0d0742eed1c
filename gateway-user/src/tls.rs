//! TLS server configuration (rustls) for client connections, and client config for upstream.
//!
//! Configs are built with an explicit ring provider (`builder_with_provider`), so no process-wide
//! rustls provider has to be installed.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS setup: {0}")]
    Setup(String),
}

/// ALPN protocol id for PostgreSQL (used by libpq 17+ and required for direct SSL).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Load cert + key named in the config into a rustls server config (no client certificates;
/// ALPN "postgresql" advertised).
pub fn server_config(cfg: &Config) -> Result<Arc<ServerConfig>, TlsError> {
    let cert_path = cfg.resolve(&cfg.server.tls_cert);
    let key_path = cfg.resolve(&cfg.server.tls_key);
    server_config_from_files(&cert_path, &key_path)
}

/// [`server_config`] from explicit PEM files: a certificate chain (leaf first) and its key
/// (PKCS#8, PKCS#1 or SEC1).
pub fn server_config_from_files(
    cert_path: &Path,
    key_path: &Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        TlsError::Setup(format!("cannot read private key {}: {e}", key_path.display()))
    })?;
    let mut sc = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            TlsError::Setup(format!(
                "certificate {} with key {}: {e}",
                cert_path.display(),
                key_path.display()
            ))
        })?;
    sc.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    Ok(Arc::new(sc))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |e: &dyn std::fmt::Display| {
        TlsError::Setup(format!("cannot read certificates {}: {e}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(&e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(&e))?;
    if certs.is_empty() {
        return Err(bad(&"no CERTIFICATE block found"));
    }
    Ok(certs)
}

/// Client config for TLS to the upstream Postgres.
///
/// * `ca_file = Some(pem)`: the server certificate must chain to one of those CA certificates
///   and match the host name (like libpq `sslmode=verify-full`).
/// * `ca_file = None`: **no certificate verification at all** — any certificate and any host
///   name are accepted (like libpq `sslmode=require`/`prefer`). The upstream is usually a local
///   Postgres with a self-signed certificate, so this buys encryption against passive
///   eavesdropping only; it does *not* protect against an active man in the middle. The
///   handshake signature is still checked against the presented certificate, which costs
///   nothing but proves nothing about who the server is.
pub fn client_config_insecure_or_roots(
    ca_file: Option<&Path>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let cc = match ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(path)? {
                roots.add(cert).map_err(|e| {
                    TlsError::Setup(format!("bad CA certificate in {}: {e}", path.display()))
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoServerVerification(provider())))
            .with_no_client_auth(),
    };
    Ok(Arc::new(cc))
}

/// The upstream client config for `upstream.tls = prefer|require`: the config has no CA
/// setting, so this is the unverified variant of [`client_config_insecure_or_roots`] (see the
/// caveat there). Built once and shared.
pub fn upstream_client_config() -> Arc<ClientConfig> {
    static CFG: OnceLock<Arc<ClientConfig>> = OnceLock::new();
    CFG.get_or_init(|| {
        // Cannot fail: the ring provider supports the safe default protocol versions.
        client_config_insecure_or_roots(None).expect("ring provider supports TLS 1.2/1.3")
    })
    .clone()
}

/// Accepts every server certificate (see [`client_config_insecure_or_roots`]).
#[derive(Debug)]
struct NoServerVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_cert(dir: &Path, sans: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// Drive a client and a server connection against each other in memory.
    fn handshake(
        client: &mut rustls::ClientConnection,
        server: &mut rustls::ServerConnection,
    ) -> Result<(), rustls::Error> {
        for _ in 0..20 {
            let mut buf = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                server.read_tls(&mut &buf[..]).unwrap();
                server.process_new_packets()?;
            }
            let mut buf = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut buf).unwrap();
            }
            if !buf.is_empty() {
                client.read_tls(&mut &buf[..]).unwrap();
                client.process_new_packets()?;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn insecure_client_talks_to_self_signed_server_with_alpn() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_cert(dir.path(), &["db.invalid"]);
        let server_cfg = server_config_from_files(&c, &k).unwrap();
        let mut client_cfg = (*client_config_insecure_or_roots(None).unwrap()).clone();
        client_cfg.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        // A name that is not in the certificate: still accepted (no verification).
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut client = rustls::ClientConnection::new(Arc::new(client_cfg), name).unwrap();
        let mut server = rustls::ServerConnection::new(server_cfg).unwrap();
        handshake(&mut client, &mut server).unwrap();
        assert_eq!(server.alpn_protocol(), Some(ALPN_POSTGRESQL));
        // The shared upstream config is the same kind.
        let _ = upstream_client_config();
    }

    #[test]
    fn roots_client_verifies_name() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_cert(dir.path(), &["localhost"]);
        let server_cfg = server_config_from_files(&c, &k).unwrap();
        let client_cfg = client_config_insecure_or_roots(Some(&c)).unwrap();
        let ok = ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(client_cfg.clone(), ok).unwrap();
        let mut server = rustls::ServerConnection::new(server_cfg.clone()).unwrap();
        handshake(&mut client, &mut server).unwrap();

        let wrong = ServerName::try_from("other.invalid").unwrap();
        let mut client = rustls::ClientConnection::new(client_cfg, wrong).unwrap();
        let mut server = rustls::ServerConnection::new(server_cfg).unwrap();
        assert!(handshake(&mut client, &mut server).is_err());
    }

    #[test]
    fn missing_or_mismatched_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = write_cert(dir.path(), &["localhost"]);
        let e = server_config_from_files(&dir.path().join("nope.pem"), &k).unwrap_err();
        assert!(e.to_string().contains("nope.pem"), "{e}");
        // A key that does not belong to the certificate.
        let other = rcgen::KeyPair::generate().unwrap();
        let k2 = dir.path().join("other.pem");
        std::fs::write(&k2, other.serialize_pem()).unwrap();
        assert!(server_config_from_files(&c, &k2).is_err());
        // A key file given as the certificate.
        let e = server_config_from_files(&k, &k).unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
    }
}
