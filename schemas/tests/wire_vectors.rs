//! The committed test vectors in `tests/vectors.json` pin the wire format: a client written
//! from WIRE.md in any language must produce these exact bytes. The key pair is RFC 8032's
//! test 1, so the public key can be checked against the RFC as well.

use std::collections::BTreeMap;

use fleet_schemas::{Job, SignedJob, SigningKey, Task, VerifyingKey, decode, encode};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Vectors {
    secret_key: String,
    public_key: String,
    key_id: String,
    job_json: serde_json::Value,
    body_hex: String,
    signature_hex: String,
    envelope_hex: String,
}

const VECTORS_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors.json");
const RFC8032_TEST1_SECRET: &str =
    "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const RFC8032_TEST1_PUBLIC: &str =
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fn vector_job() -> Job {
    Job {
        job_id: "job-0001".into(),
        tenant: "acme".into(),
        model: "all-minilm-l6-v2".into(),
        task: Task::Embed {
            inputs: vec!["Hello, world!".into(), "Fleet embeds text.".into()],
            normalize: true,
            truncate: true,
        },
        priority: 0,
        created_at_ms: 1_764_000_000_000,
        deadline_ms: Some(1_764_000_060_000),
        meta: BTreeMap::from([("source".to_string(), "wire-spec".to_string())]),
    }
}

fn vectors_from_code() -> Vectors {
    let key = SigningKey::from_secret_hex("acme-1", RFC8032_TEST1_SECRET).expect("valid key");
    let job = vector_job();
    let envelope = key.sign_job(&job).expect("encodes");
    Vectors {
        secret_key: RFC8032_TEST1_SECRET.into(),
        public_key: key.verifying_key().to_hex(),
        key_id: key.key_id.clone(),
        job_json: serde_json::to_value(&job).expect("json"),
        body_hex: hex::encode(&envelope.body),
        signature_hex: hex::encode(&envelope.signature),
        envelope_hex: hex::encode(encode(&envelope).expect("encodes")),
    }
}

#[test]
fn committed_vectors_match_the_code() {
    let from_code = vectors_from_code();
    if std::env::var_os("FLEET_BLESS_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&from_code).expect("json");
        std::fs::write(VECTORS_PATH, text + "\n").expect("write vectors");
    }
    let committed: Vectors =
        serde_json::from_str(&std::fs::read_to_string(VECTORS_PATH).expect("vectors.json"))
            .expect("vectors.json parses");
    assert_eq!(committed.public_key, RFC8032_TEST1_PUBLIC);
    assert_eq!(committed, from_code);
}

#[test]
fn committed_envelope_decodes_and_verifies() {
    let committed: Vectors =
        serde_json::from_str(&std::fs::read_to_string(VECTORS_PATH).expect("vectors.json"))
            .expect("vectors.json parses");
    let envelope_bytes = hex::decode(&committed.envelope_hex).expect("hex");
    let envelope: SignedJob = decode(&envelope_bytes, 1 << 20).expect("envelope decodes");
    assert_eq!(envelope.v, 1);
    assert_eq!(envelope.key_id, committed.key_id);
    let public = VerifyingKey::from_hex(&committed.public_key).expect("public key");
    public.verify(&envelope).expect("signature verifies");
    let job: Job = decode(&envelope.body, 1 << 20).expect("job decodes");
    assert_eq!(job, vector_job());
    assert_eq!(
        serde_json::to_value(&job).expect("json"),
        committed.job_json
    );
}
