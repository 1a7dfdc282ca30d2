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

/// A tenant's secret key and the id the dispatcher knows its public half by.
pub struct SigningKey {
    pub key_id: String,
    inner: ed25519_dalek::SigningKey,
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

/// The on-disk form of a tenant's secret key (TOML, written with 0600 permissions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretKeyFile {
    pub tenant: String,
    pub key_id: String,
    /// 32 bytes, hex.
    pub secret_key: String,
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
