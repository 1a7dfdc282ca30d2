//! Admission as a specification: whatever bytes arrive, the answer is a typed rejection or an
//! admission, never a panic; only a correctly signed, in-policy job is admitted.

use fleet_dispatcher::validate::{AdmissionLimits, Validator};
use fleet_keys::{KeyStore, Tenants};
use fleet_schemas::{ErrorCode, Job, SigningKey, encode, now_ms};
use proptest::prelude::*;

fn validator(key: &SigningKey) -> Validator {
    let tenants = Tenants::from_toml(&format!(
        "[[tenants]]\nname = \"acme\"\nmodels = [\"m\"]\nrate_per_second = 1\nburst = 1\n\
         keys = [{{ key_id = \"{}\", public_key = \"{}\" }}]\n",
        key.key_id,
        key.verifying_key().to_hex()
    ))
    .expect("tenants");
    Validator::new(
        KeyStore::fixed(tenants),
        ["m".to_string()],
        AdmissionLimits::default(),
    )
}

fn job(inputs: Vec<String>) -> Job {
    Job::embed("j1", "acme", "m", inputs, now_ms())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Bytes nobody signed are refused at the envelope (unreadable, wrong version, unknown key,
    /// bad signature), never by a check that reads the job: nothing inside an unsigned body is
    /// trusted, or even read, so the rejection names no job or tenant.
    #[test]
    fn arbitrary_bytes_are_refused_before_the_job_is_read(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let key = SigningKey::generate("acme-1");
        let rejection = validator(&key).admit("m", &bytes, now_ms()).expect_err("random bytes are never a signed job");
        prop_assert!(
            matches!(
                rejection.code(),
                ErrorCode::Malformed
                    | ErrorCode::UnsupportedVersion
                    | ErrorCode::UnknownKey
                    | ErrorCode::BadSignature
            ),
            "{:?}",
            rejection
        );
        prop_assert_eq!(rejection.job_id, "");
        prop_assert_eq!(rejection.tenant, "");
    }

    #[test]
    fn a_corrupted_envelope_is_never_admitted(flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)) {
        let key = SigningKey::generate("acme-1");
        let original = job(vec!["text".into()]);
        let mut bytes = encode(&key.sign_job(&original).unwrap()).unwrap();
        for (index, mask) in flips {
            let i = index.index(bytes.len());
            bytes[i] ^= mask;
        }
        // Flips at the same place can cancel out; only then may the job be admitted.
        if let Ok(admitted) = validator(&key).admit("m", &bytes, now_ms()) {
            prop_assert_eq!(admitted.job, original);
        }
    }

    #[test]
    fn signed_in_policy_jobs_are_admitted(inputs in proptest::collection::vec(".{0,50}", 1..10)) {
        let key = SigningKey::generate("acme-1");
        let bytes = encode(&key.sign_job(&job(inputs.clone())).unwrap()).unwrap();
        let admitted = validator(&key).admit("m", &bytes, now_ms()).expect("admitted");
        prop_assert_eq!(admitted.job.task.inputs(), inputs.as_slice());
    }
}
