//! Round trips for every message, and the codec's promise about hostile bytes: any byte
//! string decodes to a message or to an error, never a panic.

use std::collections::BTreeMap;

use fleet_schemas::{
    CodecError, ErrorBody, ErrorCode, Job, JobResult, Output, ResultStatus, SignedJob, SubmitReply,
    SubmitStatus, Task, Timings, decode, encode,
};
use proptest::prelude::*;

const LIMIT: usize = 1 << 20;

fn job_strategy() -> impl Strategy<Value = Job> {
    (
        "[A-Za-z0-9_-]{1,64}",
        "[a-z]{1,16}",
        proptest::collection::vec(any::<String>(), 0..5),
        any::<(bool, bool, u8, u64)>(),
        proptest::option::of(any::<u64>()),
        proptest::collection::btree_map("[a-z]{1,8}", any::<String>(), 0..3),
    )
        .prop_map(
            |(job_id, tenant, inputs, (normalize, truncate, priority, created), deadline, meta)| {
                Job {
                    job_id,
                    tenant,
                    model: "m".into(),
                    task: Task::Embed {
                        inputs,
                        normalize,
                        truncate,
                    },
                    priority,
                    created_at_ms: created,
                    deadline_ms: deadline,
                    meta,
                }
            },
        )
}

proptest! {
    #[test]
    fn jobs_round_trip(job in job_strategy()) {
        let bytes = encode(&job).unwrap();
        prop_assert_eq!(decode::<Job>(&bytes, LIMIT).unwrap(), job);
    }

    #[test]
    fn envelopes_round_trip(key_id in ".{0,40}", signature in proptest::collection::vec(any::<u8>(), 0..80), body in proptest::collection::vec(any::<u8>(), 0..300)) {
        let envelope = SignedJob { v: 1, key_id, signature, body };
        let bytes = encode(&envelope).unwrap();
        prop_assert_eq!(decode::<SignedJob>(&bytes, LIMIT).unwrap(), envelope);
    }

    #[test]
    fn results_round_trip(vectors in proptest::collection::vec(proptest::collection::vec(-1.0f32..1.0, 3), 0..4), code_index in 0..ErrorCode::ALL.len(), ok in any::<bool>()) {
        let result = JobResult {
            job_id: "j".into(),
            tenant: "t".into(),
            model: "m".into(),
            status: if ok { ResultStatus::Ok } else { ResultStatus::Failed },
            output: ok.then(|| Output::Embeddings { dims: 3, vectors: vectors.clone() }),
            error: (!ok).then(|| ErrorBody::new(ErrorCode::ALL[code_index], "why")),
            worker: "w".into(),
            timings: Timings { queue_ms: 1, inference_ms: 2 },
        };
        let bytes = encode(&result).unwrap();
        prop_assert_eq!(decode::<JobResult>(&bytes, LIMIT).unwrap(), result);
        let reply = SubmitReply { status: SubmitStatus::Accepted, job_id: "j".into(), stream_seq: Some(7), duplicate: ok, error: None, no_worker: !ok };
        prop_assert_eq!(decode::<SubmitReply>(&encode(&reply).unwrap(), LIMIT).unwrap(), reply);
    }

    #[test]
    fn any_bytes_decode_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<SignedJob>(&bytes, LIMIT);
        let _ = decode::<Job>(&bytes, LIMIT);
        let _ = decode::<JobResult>(&bytes, LIMIT);
    }
}

#[test]
fn oversized_input_is_refused_before_parsing() {
    let bytes = vec![0xc0; 11];
    assert!(matches!(
        decode::<SignedJob>(&bytes, 10),
        Err(CodecError::TooLarge { len: 11, max: 10 })
    ));
}

#[test]
fn unknown_envelope_fields_are_refused() {
    #[derive(serde::Serialize)]
    struct Extended {
        v: u8,
        key_id: String,
        #[serde(with = "serde_bytes")]
        signature: Vec<u8>,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        extra: u8,
    }
    let bytes = encode(&Extended {
        v: 1,
        key_id: "k".into(),
        signature: vec![],
        body: vec![],
        extra: 1,
    })
    .unwrap();
    assert!(matches!(
        decode::<SignedJob>(&bytes, LIMIT),
        Err(CodecError::Malformed(_))
    ));
}

#[test]
fn error_codes_have_stable_strings() {
    for code in ErrorCode::ALL {
        assert_eq!(code.as_str().parse::<ErrorCode>().unwrap(), code);
        let wire: String = decode(&encode(&code).unwrap(), LIMIT).unwrap();
        assert_eq!(wire, code.as_str());
    }
    let optional_defaults: Job = {
        #[derive(serde::Serialize)]
        struct Minimal {
            job_id: &'static str,
            tenant: &'static str,
            model: &'static str,
            task: BTreeMap<&'static str, serde_json::Value>,
            created_at_ms: u64,
        }
        let task = BTreeMap::from([
            ("kind", serde_json::json!("embed")),
            ("inputs", serde_json::json!(["x"])),
        ]);
        decode(
            &encode(&Minimal {
                job_id: "j",
                tenant: "t",
                model: "m",
                task,
                created_at_ms: 5,
            })
            .unwrap(),
            LIMIT,
        )
        .unwrap()
    };
    assert_eq!(
        optional_defaults.task,
        Task::Embed {
            inputs: vec!["x".into()],
            normalize: true,
            truncate: true
        }
    );
    assert_eq!(optional_defaults.deadline_ms, None);
}

/// `no_worker` came after the first readers of submit replies: false, it is left out, so the
/// reply is byte for byte what it was; true, a reader that does not know the key skips it.
#[test]
fn no_worker_is_a_key_added_to_the_submit_reply_that_older_readers_skip() {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct ReplyBeforeNoWorker {
        status: SubmitStatus,
        job_id: String,
        stream_seq: Option<u64>,
        duplicate: bool,
        error: Option<ErrorBody>,
    }
    let before = ReplyBeforeNoWorker {
        status: SubmitStatus::Accepted,
        job_id: "j-1".into(),
        stream_seq: Some(7),
        duplicate: false,
        error: None,
    };
    let mut reply = SubmitReply {
        status: SubmitStatus::Accepted,
        job_id: "j-1".into(),
        stream_seq: Some(7),
        duplicate: false,
        error: None,
        no_worker: false,
    };
    assert_eq!(encode(&reply).unwrap(), encode(&before).unwrap());
    reply.no_worker = true;
    let unserved = encode(&reply).unwrap();
    assert_eq!(
        decode::<ReplyBeforeNoWorker>(&unserved, LIMIT).unwrap(),
        before
    );
    assert!(decode::<SubmitReply>(&unserved, LIMIT).unwrap().no_worker);
}
