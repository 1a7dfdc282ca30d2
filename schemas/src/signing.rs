use ed25519_dalek::{Signature, Signer};
use serde::{Deserialize, Serialize};

use crate::{CodecError, ENVELOPE_VERSION, Job, SignedJob, encode};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key must be 64 hex characters (32 bytes): {0}")]
    BadHex(#[from] hex::FromHexError),
    #[error("key must be 32 bytes, got {0}")]
    BadLength(usize),
    #[error("not a valid Ed25519 public key")]
    InvalidPoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signature must be 64 bytes, got {0}")]
    BadLength(usize),
    #[error("signature does not verify over the body")]
    Mismatch,
}

fn key_bytes(hex_str: &str) -> Result<[u8; 32], KeyError> {
    let bytes = hex::decode(hex_str.trim())?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| KeyError::BadLength(len))
}

/// A tenant's secret key and the id the dispatcher knows its public half by. Its `Debug`
/// shows the key id and the public key, never the secret.
pub struct SigningKey {
    pub key_id: String,
    inner: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .field("public_key", &self.verifying_key().to_hex())
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    pub fn generate(key_id: impl Into<String>) -> Self {
        SigningKey {
            key_id: key_id.into(),
            inner: ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng),
        }
    }

    pub fn from_secret_bytes(key_id: impl Into<String>, secret: &[u8; 32]) -> Self {
        SigningKey {
            key_id: key_id.into(),
            inner: ed25519_dalek::SigningKey::from_bytes(secret),
        }
    }

    pub fn from_secret_hex(key_id: impl Into<String>, secret_hex: &str) -> Result<Self, KeyError> {
        Ok(Self::from_secret_bytes(key_id, &key_bytes(secret_hex)?))
    }

    pub fn secret_hex(&self) -> String {
        hex::encode(self.inner.to_bytes())
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey(self.inner.verifying_key())
    }

    /// Signs already-encoded body bytes into an envelope.
    pub fn sign_body(&self, body: Vec<u8>) -> SignedJob {
        let signature = self.inner.sign(&body).to_bytes().to_vec();
        SignedJob {
            v: ENVELOPE_VERSION,
            key_id: self.key_id.clone(),
            signature,
            body,
        }
    }

    /// Encodes the job as MessagePack and signs those exact bytes.
    pub fn sign_job(&self, job: &Job) -> Result<SignedJob, CodecError> {
        Ok(self.sign_body(encode(job)?))
    }
}

/// A registered public key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyingKey(ed25519_dalek::VerifyingKey);

impl VerifyingKey {
    pub fn from_hex(public_hex: &str) -> Result<Self, KeyError> {
        ed25519_dalek::VerifyingKey::from_bytes(&key_bytes(public_hex)?)
            .map(VerifyingKey)
            .map_err(|_| KeyError::InvalidPoint)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    /// Strict Ed25519 verification (RFC 8032 with canonical encodings and no small-order keys)
    /// of the envelope's signature over its exact body bytes.
    pub fn verify(&self, envelope: &SignedJob) -> Result<(), VerifyError> {
        let signature = Signature::from_slice(&envelope.signature)
            .map_err(|_| VerifyError::BadLength(envelope.signature.len()))?;
        self.0
            .verify_strict(&envelope.body, &signature)
            .map_err(|_| VerifyError::Mismatch)
    }
}

/// The on-disk form of a tenant's secret key (TOML, written with 0600 permissions). Its
/// `Debug` redacts the secret.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyFile {
    pub tenant: String,
    pub key_id: String,
    /// 32 bytes, hex.
    pub secret_key: String,
}

impl std::fmt::Debug for SecretKeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKeyFile")
            .field("tenant", &self.tenant)
            .field("key_id", &self.key_id)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

impl SecretKeyFile {
    pub fn signing_key(&self) -> Result<SigningKey, KeyError> {
        SigningKey::from_secret_hex(self.key_id.clone(), &self.secret_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flipped_bit_anywhere_fails_verification() {
        let key = SigningKey::generate("k1");
        let public = key.verifying_key();
        let envelope = key.sign_body(b"some job bytes".to_vec());
        assert_eq!(public.verify(&envelope), Ok(()));
        for i in 0..envelope.body.len() * 8 {
            let mut tampered = envelope.clone();
            tampered.body[i / 8] ^= 1 << (i % 8);
            assert_eq!(public.verify(&tampered), Err(VerifyError::Mismatch));
        }
        for i in 0..64 * 8 {
            let mut tampered = envelope.clone();
            tampered.signature[i / 8] ^= 1 << (i % 8);
            assert!(public.verify(&tampered).is_err());
        }
        let mut short = envelope.clone();
        short.signature.pop();
        assert_eq!(public.verify(&short), Err(VerifyError::BadLength(63)));
        let other = SigningKey::generate("k2").verifying_key();
        assert_eq!(other.verify(&envelope), Err(VerifyError::Mismatch));
    }

    /// Standard base64 with padding; the URL-safe and unpadded forms are derived from it.
    fn base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// Every printable form of `secret` a careless `Debug` would show.
    fn secret_forms(secret: &[u8; 32]) -> Vec<String> {
        let b64 = base64(secret);
        assert_eq!(base64(b"foob"), "Zm9vYg==", "the test's own base64");
        vec![
            hex::encode(secret),
            hex::encode_upper(secret),
            b64.clone(),
            b64.trim_end_matches('=').to_owned(),
            b64.replace('+', "-").replace('/', "_"),
            format!("{secret:?}"),
            format!("{:?}", secret.to_vec()),
        ]
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let key = SigningKey::generate("acme-1");
        let secret = key.inner.to_bytes();
        let file = SecretKeyFile {
            tenant: "acme".into(),
            key_id: key.key_id.clone(),
            secret_key: key.secret_hex(),
        };
        let shown = [
            format!("{key:?}"),
            format!("{key:#?}"),
            format!("{file:?}"),
            format!("{file:#?}"),
            format!("{:?}", file.signing_key().expect("valid file")),
        ];
        for text in &shown {
            for form in secret_forms(&secret) {
                assert!(!text.contains(&form), "{text} shows the secret as {form}");
            }
            assert!(text.contains("acme-1"), "the key id still helps: {text}");
        }
        assert!(
            shown[0].contains(&key.verifying_key().to_hex()),
            "{}",
            shown[0]
        );
        assert!(shown[2].contains("acme") && shown[2].contains("redacted"));
    }

    #[test]
    fn hex_round_trip_and_bad_keys() {
        let key = SigningKey::generate("k1");
        let again = SigningKey::from_secret_hex("k1", &key.secret_hex()).expect("valid hex");
        assert_eq!(key.verifying_key(), again.verifying_key());
        let public = key.verifying_key();
        assert_eq!(VerifyingKey::from_hex(&public.to_hex()).ok(), Some(public));
        assert!(matches!(
            VerifyingKey::from_hex("zz"),
            Err(KeyError::BadHex(_))
        ));
        assert!(matches!(
            VerifyingKey::from_hex("abcd"),
            Err(KeyError::BadLength(2))
        ));
    }
}
