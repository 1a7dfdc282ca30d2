//! The checks a job passes under its key, in one place, so the dispatcher (at admission) and the
//! workers (before running it) decide alike.

use std::sync::Arc;

use fleet_schemas::{ErrorCode, Job, SignedJob, VerifyError};

use crate::{KeyRecord, KeyRefusal, KeyStore, Tenants};

/// Why a job may not be run under the key it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("no key is registered as {0:?}")]
    UnknownKey(String),
    #[error("key {key_id:?}: {source}")]
    BadSignature { key_id: String, source: VerifyError },
    #[error(transparent)]
    Key(#[from] KeyRefusal),
    #[error("key {key_id:?} speaks for tenant {key_tenant:?}, not {job_tenant:?}")]
    WrongTenant {
        key_id: String,
        key_tenant: String,
        job_tenant: String,
    },
    #[error("tenant {tenant:?} may not use model {model:?}")]
    Model { tenant: String, model: String },
}

impl Denied {
    /// The wire code: a key that is revoked, retired or not yet valid, like a key of another
    /// tenant or a model the tenant may not use, is `forbidden`.
    pub fn code(&self) -> ErrorCode {
        match self {
            Denied::UnknownKey(_) => ErrorCode::UnknownKey,
            Denied::BadSignature { .. } => ErrorCode::BadSignature,
            Denied::Key(_) | Denied::WrongTenant { .. } | Denied::Model { .. } => {
                ErrorCode::Forbidden
            }
        }
    }
}

impl KeyRecord {
    /// The envelope's signature over its exact body bytes, under this key.
    pub fn verify(&self, envelope: &SignedJob) -> Result<(), Denied> {
        self.public_key
            .verify(envelope)
            .map_err(|source| Denied::BadSignature {
                key_id: self.key_id.clone(),
                source,
            })
    }
}

impl Tenants {
    /// After the signature verified and the body decoded: the key may sign this job (see
    /// [`KeyRecord::check`]), for its own tenant, and that tenant may use the job's model.
    pub fn authorize(&self, key: &KeyRecord, job: &Job, now_ms: u64) -> Result<(), Denied> {
        if job.tenant != key.tenant {
            return Err(Denied::WrongTenant {
                key_id: key.key_id.clone(),
                key_tenant: key.tenant.clone(),
                job_tenant: job.tenant.clone(),
            });
        }
        key.check(job.created_at_ms, now_ms)?;
        let allowed = self
            .policy(&job.tenant)
            .is_some_and(|policy| policy.allows_model(&job.model));
        if !allowed {
            return Err(Denied::Model {
                tenant: job.tenant.clone(),
                model: job.model.clone(),
            });
        }
        Ok(())
    }
}

impl KeyStore {
    /// Looks up the envelope's key (an unknown id may start a reload, see [`KeyStore::key`])
    /// and verifies the signature. Decode the body only after this succeeded, then call
    /// [`KeyStore::authorize`].
    pub fn verify(&self, envelope: &SignedJob) -> Result<Arc<KeyRecord>, Denied> {
        let key = self
            .key(&envelope.key_id)
            .ok_or_else(|| Denied::UnknownKey(envelope.key_id.clone()))?;
        key.verify(envelope)?;
        Ok(key)
    }

    /// [`Tenants::authorize`] on the snapshot now served.
    pub fn authorize(&self, key: &KeyRecord, job: &Job, now_ms: u64) -> Result<(), Denied> {
        self.snapshot().authorize(key, job, now_ms)
    }
}

#[cfg(test)]
mod tests {
    use fleet_schemas::{SigningKey, decode, encode};

    use super::*;

    const JAN_2027: u64 = 1_798_761_600_000;

    fn tenants(acme: &SigningKey, beta: &SigningKey) -> Tenants {
        let text = format!(
            "[[tenants]]\nname = \"acme\"\nmodels = [\"m\"]\nrate_per_second = 1\nburst = 1\n\
             keys = [{{ key_id = \"{}\", public_key = \"{}\" }}]\n\
             [[tenants]]\nname = \"beta\"\nmodels = [\"*\"]\nrate_per_second = 1\nburst = 1\n\
             keys = [{{ key_id = \"{}\", public_key = \"{}\" }}]\n",
            acme.key_id,
            acme.verifying_key().to_hex(),
            beta.key_id,
            beta.verifying_key().to_hex(),
        );
        Tenants::from_toml(&text).expect("valid tenants")
    }

    fn job(tenant: &str, model: &str, created_at_ms: u64) -> Job {
        Job::embed("j1", tenant, model, vec!["hi".into()], created_at_ms)
    }

    /// What a receiver does: verify, then decode the body, then authorize.
    fn admit(
        tenants: &Tenants,
        envelope: &SignedJob,
        now_ms: u64,
    ) -> Result<Arc<KeyRecord>, Denied> {
        let key = tenants
            .key(&envelope.key_id)
            .cloned()
            .ok_or_else(|| Denied::UnknownKey(envelope.key_id.clone()))?;
        key.verify(envelope)?;
        let job: Job = decode(&envelope.body, 1 << 20).expect("a signed body decodes");
        tenants.authorize(&key, &job, now_ms)?;
        Ok(key)
    }

    #[test]
    fn a_job_passes_only_under_a_valid_key_of_its_tenant_for_an_allowed_model() {
        let (acme, beta) = (
            SigningKey::generate("acme-1"),
            SigningKey::generate("beta-1"),
        );
        let tenants = tenants(&acme, &beta);
        let now = JAN_2027 + 1_000;
        let signed = |key: &SigningKey, job: &Job| key.sign_job(job).expect("sign");

        let ok = admit(&tenants, &signed(&acme, &job("acme", "m", now)), now).unwrap();
        assert_eq!(ok.tenant, "acme");
        assert!(admit(&tenants, &signed(&beta, &job("beta", "any", now)), now).is_ok());

        let deny = |envelope: SignedJob| admit(&tenants, &envelope, now).unwrap_err();
        let unknown = deny(signed(
            &SigningKey::generate("nobody"),
            &job("acme", "m", now),
        ));
        assert_eq!(unknown.code(), ErrorCode::UnknownKey);
        // Signed by another key under acme's key id.
        let mut forged = signed(&beta, &job("acme", "m", now));
        forged.key_id = "acme-1".into();
        assert_eq!(deny(forged).code(), ErrorCode::BadSignature);
        let mut zeros = signed(&acme, &job("acme", "m", now));
        zeros.signature = vec![0; 64];
        assert_eq!(deny(zeros).code(), ErrorCode::BadSignature);
        let mut tampered = signed(&acme, &job("acme", "m", now));
        tampered.body = encode(&job("acme", "m", now + 1)).unwrap();
        assert_eq!(deny(tampered).code(), ErrorCode::BadSignature);

        let other_tenant = deny(signed(&acme, &job("beta", "m", now)));
        assert!(
            matches!(other_tenant, Denied::WrongTenant { .. }),
            "{other_tenant}"
        );
        assert_eq!(other_tenant.code(), ErrorCode::Forbidden);
        let model = deny(signed(&acme, &job("acme", "other", now)));
        assert!(matches!(model, Denied::Model { .. }), "{model}");
        assert_eq!(model.code(), ErrorCode::Forbidden);
    }

    #[test]
    fn retired_and_revoked_keys_are_forbidden() {
        let old = SigningKey::generate("acme-old");
        let text = format!(
            "[[tenants]]\nname = \"acme\"\nmodels = [\"m\"]\nrate_per_second = 1\nburst = 1\n\
             keys = [{{ key_id = \"acme-old\", public_key = \"{}\", \
             not_after = \"2027-01-01T00:00:00Z\" }}]\n",
            old.verifying_key().to_hex()
        );
        let tenants = Tenants::from_toml(&text).unwrap();
        let later = JAN_2027 + 10_000;
        // Signed before the key's end and checked after it (queued): still good.
        let queued = old.sign_job(&job("acme", "m", JAN_2027 - 1)).unwrap();
        assert!(admit(&tenants, &queued, later).is_ok());
        let late = old.sign_job(&job("acme", "m", JAN_2027)).unwrap();
        let refused = admit(&tenants, &late, later).unwrap_err();
        assert!(
            matches!(refused, Denied::Key(KeyRefusal::Expired { .. })),
            "{refused}"
        );
        assert_eq!(refused.code(), ErrorCode::Forbidden);

        let revoked = Tenants::from_toml(&text.replace(" }]", ", revoked = true }]")).unwrap();
        let refused = admit(&revoked, &queued, later).unwrap_err();
        assert!(
            matches!(refused, Denied::Key(KeyRefusal::Revoked { .. })),
            "{refused}"
        );
    }
}
