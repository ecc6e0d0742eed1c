//! A throwaway certificate authority for tests that need TLS peers (syslog receivers, an
//! identity provider, etcd), made with rcgen.

use std::path::{Path, PathBuf};

/// A self-signed CA that signs leaf certificates.
pub struct TestAuthority {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl TestAuthority {
    /// A new CA whose certificate carries `common_name`.
    pub fn new(common_name: &str) -> TestAuthority {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA cert");
        TestAuthority { issuer: rcgen::Issuer::new(params, key), pem: cert.pem() }
    }

    /// The CA certificate (PEM).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A leaf certificate signed by this CA for `sans`, with `usages`: (certificate PEM, key
    /// PEM).
    pub fn leaf(
        &self,
        common_name: &str,
        sans: &[&str],
        usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let sans: Vec<String> = sans.iter().map(|s| (*s).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = usages;
        let cert = params.signed_by(&key, &self.issuer).expect("cert");
        (cert.pem(), key.serialize_pem())
    }
}

/// A CA and a server certificate for `127.0.0.1` / `localhost`, as PEM files.
pub struct TestCa {
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
}

impl TestCa {
    /// A CA and a server certificate for `127.0.0.1` / `localhost`, written to `dir`.
    pub fn new(dir: &Path) -> TestCa {
        let authority = TestAuthority::new("pgward test CA");
        let (cert, key) =
            authority.leaf("localhost", &["127.0.0.1", "localhost"], vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth]);
        let ca =
            TestCa { ca_pem: dir.join("ca.pem"), cert_pem: dir.join("server.pem"), key_pem: dir.join("server.key") };
        std::fs::write(&ca.ca_pem, authority.pem()).expect("write CA");
        std::fs::write(&ca.cert_pem, cert).expect("write cert");
        std::fs::write(&ca.key_pem, key).expect("write key");
        ca
    }
}
