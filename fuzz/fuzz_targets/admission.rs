//! The dispatcher's admission of one signed job, `Validator::admit`, as it runs on every message:
//! the real validator over a fixed key store, on arbitrary payloads, subjects and clocks.
//!
//! Input: one flags byte, the clock (`now_ms`, 8 bytes little-endian), then the payload.
//!
//! - flags bit 0 clear: the payload is the envelope, as received. Every key id below holds the
//!   public key the committed seeds were signed with (RFC 8032 test 1), so a seed whose
//!   (unsigned) `key_id` the fuzzer rewrites still verifies, and reaches each key's state.
//! - flags bit 0 set: the payload is a job body, signed here with the test key under the key id
//!   picked by bits 3-5, so the fuzzer explores everything after the signature check (job
//!   decode, names, tenant and model rights, clock window, sizes), which it could not reach by
//!   mutating signed bytes. With bit 6 also set, the payload is not the body's bytes but the
//!   choices a job is built from (`built_job`: names, inputs, times relative to `now_ms`), so the
//!   checks after decoding are explored without the fuzzer having to write MessagePack.
//! - flags bits 1-2 pick the subject's model: the tenant's model, another served model, one
//!   that is not served, or the job's own `model`.
//!
//! Beyond "no crash", every outcome is compared with an independent evaluation of every check
//! admission makes (`expected_failures`), in whatever order: an admitted job passes all of them,
//! and its fields are those of the signed body; a refused job fails at least one, its code is the
//! code of one that fails, and it names the job's id and tenant only once the signature verified.
#![no_main]

use std::{sync::LazyLock, time::Duration};

use fleet_dispatcher::validate::{AdmissionLimits, Validator};
use fleet_keys::{KeyStore, Tenants};
use fleet_schemas::{
    CodecError, ENVELOPE_VERSION, ErrorCode, Job, SignedJob, SigningKey, decode, encode,
    validate_name,
};
use libfuzzer_sys::{
    arbitrary::{Result as Built, Unstructured},
    fuzz_target,
};

/// RFC 8032 test 1, the key of the committed test vectors and seeds.
const SECRET: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
/// RFC 8032 test 2: registered as `acme-other`, so the seeds' signature does not verify under it.
const OTHER_PUBLIC: &str = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
const MODEL: &str = "all-minilm-l6-v2";
const OTHER_MODEL: &str = "e5-small";
const SUBJECTS: [&str; 3] = [MODEL, OTHER_MODEL, "not-served"];
/// The key ids a signed-here job may name (flags bits 3-5).
const KEY_IDS: [&str; 8] = [
    "acme-1",
    "acme-window",
    "acme-future",
    "acme-old",
    "acme-revoked",
    "beta-1",
    "acme-other",
    "nobody",
];

/// acme may use only MODEL, beta every model. Every acme and beta key but `acme-other` is the
/// seeds' key, in a different state: no limits, a window around CREATED, not yet valid at
/// CREATED, expired at CREATED, revoked, another tenant's.
const TENANTS: &str = r#"
[[tenants]]
name = "acme"
models = ["all-minilm-l6-v2"]
rate_per_second = 1
burst = 1
keys = [
  { key_id = "acme-1", public_key = "@PUBLIC" },
  { key_id = "acme-window", public_key = "@PUBLIC", not_before = "2025-11-24T15:59:55Z", not_after = "2025-11-24T16:00:05Z" },
  { key_id = "acme-future", public_key = "@PUBLIC", not_before = "2025-11-24T16:00:10Z" },
  { key_id = "acme-old", public_key = "@PUBLIC", not_after = "2025-11-24T16:00:00Z" },
  { key_id = "acme-revoked", public_key = "@PUBLIC", revoked = true },
  { key_id = "acme-other", public_key = "@OTHER" },
]

[[tenants]]
name = "beta"
models = ["*"]
rate_per_second = 1
burst = 1
keys = [{ key_id = "beta-1", public_key = "@PUBLIC" }]
"#;

/// Small limits, so that inputs of a few KiB reach every size check.
fn limits() -> AdmissionLimits {
    AdmissionLimits {
        max_envelope_bytes: 2048,
        max_inputs: 4,
        max_input_bytes: 64,
        max_job_age: Duration::from_secs(60),
        max_clock_skew: Duration::from_secs(30),
    }
}

static VALIDATOR: LazyLock<Validator> = LazyLock::new(|| {
    let tenants = Tenants::from_toml(
        &TENANTS
            .replace("@PUBLIC", PUBLIC)
            .replace("@OTHER", OTHER_PUBLIC),
    )
    .expect("valid tenants");
    Validator::new(
        KeyStore::fixed(tenants),
        [MODEL.to_owned(), OTHER_MODEL.to_owned()],
        limits(),
    )
});

static SIGNERS: LazyLock<Vec<SigningKey>> = LazyLock::new(|| {
    KEY_IDS
        .iter()
        .map(|id| SigningKey::from_secret_hex(*id, SECRET).expect("valid secret"))
        .collect()
});

/// A job from the fuzzer's choices: each first choice (what an exhausted input gives) is the
/// valid one, so short inputs are admitted and mutations refuse them one check at a time.
fn built_job(u: &mut Unstructured, now_ms: u64) -> Built<Job> {
    let name = |u: &mut Unstructured, usual: &str| -> Built<String> {
        Ok(match u.int_in_range(0..=2u8)? {
            0 => usual.to_owned(),
            1 => format!("{usual}-{}", u.int_in_range(0..=99u8)?),
            _ => u.arbitrary()?,
        })
    };
    let job_id = name(u, "job-0001")?;
    let tenant = match u.int_in_range(0..=2u8)? {
        0 => "acme".to_owned(),
        1 => "beta".to_owned(),
        _ => u.arbitrary()?,
    };
    let model = match u.int_in_range(0..=2u8)? {
        0 => MODEL.to_owned(),
        1 => OTHER_MODEL.to_owned(),
        _ => u.arbitrary()?,
    };
    let count = u.int_in_range(0..=6usize)?;
    let mut inputs = Vec::with_capacity(count + 1);
    for _ in 0..=count {
        inputs.push(match u.int_in_range(0..=1u8)? {
            0 => "x".repeat(u.int_in_range(0..=80usize)?),
            _ => u.arbitrary()?,
        });
    }
    let mut job = Job::embed(job_id, tenant, model, inputs, now_ms);
    if let Some(task) = u.arbitrary::<Option<(bool, bool)>>()? {
        let (normalize, truncate) = task;
        let fleet_schemas::Task::Embed { inputs, .. } = job.task;
        job.task = fleet_schemas::Task::Embed {
            inputs,
            normalize,
            truncate,
        };
    }
    job.created_at_ms = now_ms.wrapping_add_signed(i64::from(u.arbitrary::<i32>()?));
    job.deadline_ms = u
        .arbitrary::<Option<i32>>()?
        .map(|offset| now_ms.wrapping_add_signed(i64::from(offset)));
    job.priority = u.arbitrary()?;
    job.meta = u.arbitrary()?;
    Ok(job)
}

fn codec_code(err: &CodecError) -> ErrorCode {
    match err {
        CodecError::TooLarge { .. } => ErrorCode::TooLarge,
        _ => ErrorCode::Malformed,
    }
}

/// What a check that passed the signature knows: the envelope and its decoded body.
struct Signed {
    envelope: SignedJob,
    job: Option<Job>,
}

/// Every check admission makes, each evaluated on its own (none stops the others, except that
/// nothing in a body is looked at before its signature verified): the codes of those that fail,
/// and the verified envelope, if it verified. No failures: the job must be admitted. `signed_here`
/// is the key the target signed the payload with, if it did: then the signature is known to
/// verify exactly under that public key, and is not checked a second time (it costs most of a run).
fn expected_failures(
    subject: &str,
    payload: &[u8],
    now_ms: u64,
    signed_here: Option<&SigningKey>,
) -> (Vec<ErrorCode>, Option<Signed>) {
    let limits = limits();
    let mut failed = Vec::new();
    if subject != MODEL && subject != OTHER_MODEL {
        failed.push(ErrorCode::UnknownModel);
    }
    let envelope = match decode::<SignedJob>(payload, limits.max_envelope_bytes) {
        Ok(envelope) => envelope,
        Err(err) => {
            failed.push(codec_code(&err));
            return (failed, None);
        }
    };
    if envelope.v != ENVELOPE_VERSION {
        failed.push(ErrorCode::UnsupportedVersion);
    }
    let keys = VALIDATOR.keys();
    let Some(key) = keys.key(&envelope.key_id) else {
        failed.push(ErrorCode::UnknownKey);
        return (failed, None);
    };
    let verifies = match signed_here {
        Some(signer) => key.public_key == signer.verifying_key(),
        None => key.verify(&envelope).is_ok(),
    };
    if !verifies {
        failed.push(ErrorCode::BadSignature);
        return (failed, None);
    }
    let job = match decode::<Job>(&envelope.body, limits.max_envelope_bytes) {
        Ok(job) => job,
        Err(err) => {
            failed.push(codec_code(&err));
            return (
                failed,
                Some(Signed {
                    envelope,
                    job: None,
                }),
            );
        }
    };
    for name in [&job.job_id, &job.tenant, &job.model] {
        if validate_name("name", name).is_err() {
            failed.push(ErrorCode::Malformed);
        }
    }
    if job.model != subject {
        failed.push(ErrorCode::Malformed);
    }
    let allowed = keys
        .snapshot()
        .policy(&job.tenant)
        .is_some_and(|policy| policy.allows_model(&job.model));
    if job.tenant != key.tenant || key.check(job.created_at_ms, now_ms).is_err() || !allowed {
        failed.push(ErrorCode::Forbidden);
    }
    let age = limits.max_job_age.as_millis() as u64;
    let skew = limits.max_clock_skew.as_millis() as u64;
    if job.created_at_ms < now_ms.saturating_sub(age)
        || job.created_at_ms > now_ms.saturating_add(skew)
        || job.deadline_ms.is_some_and(|deadline| deadline <= now_ms)
    {
        failed.push(ErrorCode::Expired);
    }
    let inputs = job.task.inputs();
    if inputs.is_empty() {
        failed.push(ErrorCode::Malformed);
    }
    if inputs.len() > limits.max_inputs
        || inputs
            .iter()
            .any(|input| input.len() > limits.max_input_bytes)
    {
        failed.push(ErrorCode::TooLarge);
    }
    (
        failed,
        Some(Signed {
            envelope,
            job: Some(job),
        }),
    )
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((clock, body)) = rest.split_first_chunk::<8>() else {
        return;
    };
    let now_ms = u64::from_le_bytes(*clock);
    let signed_here = (flags & 1 == 1).then(|| &SIGNERS[usize::from(flags >> 3 & 7)]);
    let payload = match signed_here {
        None => body.to_vec(),
        Some(signer) => {
            let body = if flags & 1 << 6 == 0 {
                body.to_vec()
            } else {
                let Ok(job) = built_job(&mut Unstructured::new(body), now_ms) else {
                    return;
                };
                encode(&job).expect("a job encodes")
            };
            encode(&signer.sign_body(body)).expect("an envelope encodes")
        }
    };
    let subject = match usize::from(flags >> 1 & 3) {
        3 => decode::<SignedJob>(&payload, usize::MAX)
            .ok()
            .and_then(|envelope| decode::<Job>(&envelope.body, usize::MAX).ok())
            .map_or_else(|| MODEL.to_owned(), |job| job.model),
        pick => SUBJECTS[pick].to_owned(),
    };

    let outcome = VALIDATOR.admit(&subject, &payload, now_ms);
    let (failed, signed) = expected_failures(&subject, &payload, now_ms, signed_here);
    match outcome {
        Ok(admitted) => {
            assert!(
                failed.is_empty(),
                "admitted, but these checks fail: {failed:?}"
            );
            let Some(Signed {
                envelope,
                job: Some(job),
            }) = signed
            else {
                unreachable!("no failures means a verified, decoded body");
            };
            assert_eq!(admitted.job, job, "the admitted job is the signed body");
            assert_eq!(admitted.key_id, envelope.key_id);
            let key = VALIDATOR
                .keys()
                .key(&admitted.key_id)
                .expect("a registered key");
            assert_eq!(admitted.job.tenant, key.tenant, "the key's own tenant");
            assert_eq!(admitted.job.model, subject, "the subject's model");
            assert!(!key.revoked);
        }
        Err(rejection) => {
            let code = rejection.code();
            assert!(
                failed.contains(&code),
                "refused with {code:?} ({}), but the failing checks are {failed:?}",
                rejection.error.message
            );
            assert!(!rejection.error.message.is_empty(), "a refusal says why");
            if !rejection.job_id.is_empty() || !rejection.tenant.is_empty() {
                let Some(Signed { job: Some(job), .. }) = &signed else {
                    panic!("a refusal names {rejection:?} from a body that did not verify");
                };
                assert_eq!(
                    (&rejection.job_id, &rejection.tenant),
                    (&job.job_id, &job.tenant)
                );
            }
        }
    }
});
