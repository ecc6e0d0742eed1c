//! Building tokens by hand (good ones as a control, and bad ones for each way a token can be
//! wrong), with the jsonwebtoken crate and the gateway's own signing key.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey, EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

pub fn b64url(b: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(b)
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Header and claims of a JWT, without verifying anything.
#[track_caller]
pub fn decode_unverified(token: &str) -> (Value, Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWS compact token: {token:?}");
    let dec = |s: &str| -> Value {
        let bytes = URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .unwrap_or_else(|e| panic!("token part is not base64url: {e}"));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("token part is not JSON: {e}"))
    };
    (dec(parts[0]), dec(parts[1]))
}

/// The `jti` claim of a token.
pub fn jti_of(token: &str) -> String {
    decode_unverified(token).1["jti"]
        .as_str()
        .expect("token has a string jti")
        .to_string()
}

/// An Ed25519 key pair usable for signing (jsonwebtoken) and for deriving public forms.
pub struct EdKey {
    pub signing: SigningKey,
}

impl EdKey {
    /// From a PKCS#8 PEM file (pgward's keys/signing-key.pem).
    pub fn from_pem_file(path: &std::path::Path) -> EdKey {
        let pem = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let signing = SigningKey::from_pkcs8_pem(&pem)
            .unwrap_or_else(|e| panic!("{} is not an Ed25519 PKCS#8 PEM key: {e}", path.display()));
        EdKey { signing }
    }
    /// A fresh random key nobody knows.
    pub fn generate() -> EdKey {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("random bytes");
        EdKey {
            signing: SigningKey::from_bytes(&seed),
        }
    }
    pub fn encoding_key(&self) -> EncodingKey {
        let der = self.signing.to_pkcs8_der().expect("pkcs8 der");
        EncodingKey::from_ed_der(der.as_bytes())
    }
    /// Raw 32-byte public key.
    pub fn public_raw(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }
    /// The JWK "x" value (base64url of the raw public key).
    pub fn public_x(&self) -> String {
        b64url(&self.public_raw())
    }
    /// SubjectPublicKeyInfo PEM of the public key.
    pub fn public_pem(&self) -> String {
        self.signing
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("public pem")
    }
}

/// Sign `claims` with EdDSA and the given `kid`.
pub fn sign_eddsa(claims: &Value, kid: &str, key: &EdKey) -> String {
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(kid.to_string());
    jsonwebtoken::encode(&h, claims, &key.encoding_key()).expect("encode EdDSA")
}

/// Sign `claims` with HS256 using `secret` (the algorithm-confusion attack when the secret is
/// some public form of the real key).
pub fn sign_hs256(claims: &Value, kid: &str, secret: &[u8]) -> String {
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some(kid.to_string());
    let key = EncodingKey::from_secret(secret).expect("hmac key");
    jsonwebtoken::encode(&h, claims, &key).expect("encode HS256")
}

/// `{"alg":"none"}` token with an empty signature.
pub fn alg_none(claims: &Value, kid: &str) -> String {
    let h = json!({"alg": "none", "typ": "JWT", "kid": kid});
    format!(
        "{}.{}.",
        b64url(serde_json::to_vec(&h).unwrap().as_slice()),
        b64url(serde_json::to_vec(claims).unwrap().as_slice())
    )
}

/// Keep `token`'s header and signature but replace its payload with `claims`.
pub fn with_payload(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!(
        "{}.{}.{}",
        parts[0],
        b64url(serde_json::to_vec(claims).unwrap().as_slice()),
        parts[2]
    )
}

/// `base` with `edits` applied (a JSON object of claim -> new value; null removes the claim).
pub fn edit_claims(base: &Value, edits: Value) -> Value {
    let mut c = base.clone();
    let obj = c.as_object_mut().expect("claims object");
    for (k, v) in edits.as_object().expect("edits object") {
        if v.is_null() {
            obj.remove(k);
        } else {
            obj.insert(k.clone(), v.clone());
        }
    }
    c
}

/// The signature part of a token (what must never be logged either).
pub fn signature_part(token: &str) -> &str {
    token.rsplit('.').next().unwrap_or("")
}
