//! Shared by tests/idp.rs (included with `#[path]`, not a test binary of its own).
//!
//! - [`Idp`]: an identity provider's key endpoints on a loopback HTTPS server (rustls, a
//!   certificate from a test CA made with rcgen): the OIDC discovery document under its
//!   issuer and the JWKS it names. The test swaps the published keys (rotation) and can make
//!   it answer 503 (an outage). Every request path is recorded.
//! - [`IdpKey`]: a signing key as a provider holds it (RS256 from the fixed test RSA key, or a
//!   fresh ES256 key), its public JWK as the provider publishes it, and tokens signed with it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::common::tls::TestCa;

/// The RSA key the unit tests sign with (2048 bits, PKCS#1).
const RSA_PEM: &str = include_str!("../gateway-user/src/auth/testdata/rsa-2048.pem");
/// Longest request head the server reads.
const MAX_HEAD: usize = 16 * 1024;
/// How long the server waits on a silent client.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the provider publishes and what it was asked.
#[derive(Default)]
struct State {
    jwks: Value,
    down: bool,
    requests: Vec<String>,
}

/// A loopback HTTPS server publishing an issuer's discovery document and JWKS.
pub struct Idp {
    /// `https://127.0.0.1:<port>`.
    pub base: String,
    /// `base` + the issuer path (e.g. `/realms/acme`).
    pub issuer: String,
    /// Where the JWKS is served.
    pub jwks_url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    port: u16,
    thread: Option<JoinHandle<()>>,
}

impl Idp {
    /// Serve with `ca`'s server certificate; the issuer is `base` + `issuer_path`, the JWKS at
    /// `base` + `jwks_path`, publishing `keys`.
    pub fn start(ca: &TestCa, issuer_path: &str, jwks_path: &str, keys: &[&IdpKey]) -> Idp {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the IdP port");
        let port = listener.local_addr().unwrap().port();
        let base = format!("https://127.0.0.1:{port}");
        let issuer = format!("{base}{issuer_path}");
        let jwks_url = format!("{base}{jwks_path}");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let tls = server_config(ca);
        let discovery = json!({
            "issuer": issuer,
            "authorization_endpoint": format!("{issuer}/protocol/openid-connect/auth"),
            "token_endpoint": format!("{issuer}/protocol/openid-connect/token"),
            "jwks_uri": jwks_url,
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        });
        let routes = Routes {
            discovery_path: format!("{issuer_path}/.well-known/openid-configuration"),
            discovery: discovery.to_string(),
            jwks_path: jwks_path.to_string(),
        };
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = conn {
                    serve_one(s, &tls, &routes, &st);
                }
            }
        });
        let idp = Idp { base, issuer, jwks_url, state, stop, port, thread: Some(thread) };
        idp.publish(keys);
        idp
    }

    /// Publish exactly `keys` (a rotation drops the keys not named).
    pub fn publish(&self, keys: &[&IdpKey]) {
        // Providers publish encryption keys and keys of types pgward skips next to signing keys.
        let mut list: Vec<Value> = keys.iter().map(|k| k.jwk.clone()).collect();
        list.push(json!({"kty": "RSA", "use": "enc", "kid": "enc-1", "n": "AQAB", "e": "AQAB", "alg": "RSA-OAEP"}));
        self.state.lock().unwrap().jwks = json!({ "keys": list });
    }

    /// Answer every request with 503 (`true`) or normally again.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    /// How many requests for `path` the server has seen.
    pub fn requests_for(&self, path_suffix: &str) -> usize {
        self.state.lock().unwrap().requests.iter().filter(|p| p.ends_with(path_suffix)).count()
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Routes {
    discovery_path: String,
    discovery: String,
    jwks_path: String,
}

fn server_config(ca: &TestCa) -> Arc<rustls::ServerConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&ca.cert_pem).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(&ca.key_pem).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    Arc::new(cfg)
}

/// One connection, one request, one answer, then close (`Connection: close`).
fn serve_one(sock: TcpStream, tls: &Arc<rustls::ServerConfig>, routes: &Routes, state: &Mutex<State>) {
    let _ = sock.set_read_timeout(Some(IO_TIMEOUT));
    let _ = sock.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(conn) = rustls::ServerConnection::new(tls.clone()) else { return };
    let mut stream = rustls::StreamOwned::new(conn, sock);
    let mut reader = BufReader::new(&mut stream);
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return, // the client gave up (e.g. refused our certificate)
            Ok(_) => {}
        }
        head.extend_from_slice(&line);
        if line == b"\r\n" || head.len() > MAX_HEAD {
            break;
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let (status, body) = {
        let mut st = state.lock().unwrap();
        st.requests.push(path.clone());
        if st.down {
            ("503 Service Unavailable", "{\"error\":\"temporarily_unavailable\"}".to_string())
        } else if path == routes.discovery_path {
            ("200 OK", routes.discovery.clone())
        } else if path == routes.jwks_path {
            ("200 OK", st.jwks.to_string())
        } else {
            ("404 Not Found", "{}".to_string())
        }
    };
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes());
    let _ = stream.flush();
    stream.conn.send_close_notify();
    let _ = stream.flush();
}

/// A provider's signing key.
pub struct IdpKey {
    pub kid: String,
    pub alg: Algorithm,
    key: EncodingKey,
    /// The public JWK as published (no `alg`, like Entra ID; `use: sig`).
    pub jwk: Value,
}

impl IdpKey {
    pub fn rs256(kid: &str) -> IdpKey {
        IdpKey::new(kid, Algorithm::RS256, EncodingKey::from_rsa_pem(RSA_PEM.as_bytes()).unwrap())
    }

    pub fn es256(kid: &str) -> IdpKey {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        IdpKey::new(kid, Algorithm::ES256, EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap())
    }

    fn new(kid: &str, alg: Algorithm, key: EncodingKey) -> IdpKey {
        let mut jwk = Jwk::from_encoding_key(&key, alg).unwrap();
        jwk.common.key_id = Some(kid.into());
        let mut v = serde_json::to_value(&jwk).unwrap();
        v.as_object_mut().unwrap().remove("alg");
        v["use"] = json!("sig");
        IdpKey { kid: kid.into(), alg, key, jwk: v }
    }

    /// `claims` signed with this key, `typ: JWT` and its `kid` in the header.
    pub fn sign(&self, claims: &Value) -> String {
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, claims, &self.key).unwrap()
    }
}

/// Write `token` to a 0600 file in `dir` (what an operator holding a leaked token has).
pub fn token_file(dir: &Path, name: &str, token: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, token).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// The order n of the P-256 group, big-endian.
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// The same ES256 token with its signature (r, s) replaced by (r, n - s): also a valid
/// signature of the same header and claims (ECDSA signatures are malleable), made without the
/// key — what the holder of a token can do to change its bytes.
pub fn malleate_es256(token: &str) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (signed, sig) = token.rsplit_once('.').expect("a compact JWS");
    let mut sig = URL_SAFE_NO_PAD.decode(sig).expect("a base64url signature");
    assert_eq!(sig.len(), 64, "an ES256 signature is r || s, 32 bytes each");
    let s: [u8; 32] = sig[32..].try_into().unwrap();
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = P256_ORDER[i] as i16 - s[i] as i16 - borrow;
        borrow = i16::from(d < 0);
        sig[32 + i] = d.rem_euclid(256) as u8;
    }
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&sig))
}
