//! The signed messages are read exactly as WIRE.md describes them: maps with str keys, each
//! key once and known, `bin` where it says bin, `str` where it says str, one message and no
//! bytes after it. Each test builds the MessagePack by hand so that one thing differs from a
//! valid message.

use std::collections::BTreeMap;

use fleet_schemas::{CodecError, DecodeError, Job, SignedJob, Task, WireType, decode};

const LIMIT: usize = 1 << 20;

type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

fn s(text: &str) -> Vec<u8> {
    rmp_serde::to_vec(text).expect("str")
}

fn b(bytes: &[u8]) -> Vec<u8> {
    rmp_serde::to_vec(serde_bytes::Bytes::new(bytes)).expect("bin")
}

fn u(v: u64) -> Vec<u8> {
    rmp_serde::to_vec(&v).expect("int")
}

fn map(pairs: &Pairs) -> Vec<u8> {
    assert!(pairs.len() < 16, "fixmap");
    let mut out = vec![0x80 | pairs.len() as u8];
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.extend_from_slice(v);
    }
    out
}

fn array(items: &[Vec<u8>]) -> Vec<u8> {
    assert!(items.len() < 16, "fixarray");
    let mut out = vec![0x90 | items.len() as u8];
    for item in items {
        out.extend_from_slice(item);
    }
    out
}

fn task_pairs() -> Pairs {
    vec![
        (s("kind"), s("embed")),
        (s("inputs"), array(&[s("hello"), s("world")])),
        (s("normalize"), vec![0xc3]),
        (s("truncate"), vec![0xc2]),
    ]
}

fn job_pairs() -> Pairs {
    vec![
        (s("job_id"), s("j-1")),
        (s("tenant"), s("acme")),
        (s("model"), s("m")),
        (s("task"), map(&task_pairs())),
        (s("priority"), u(3)),
        (s("created_at_ms"), u(1_764_000_000_000)),
        (s("deadline_ms"), vec![0xc0]),
        (s("meta"), map(&vec![(s("source"), s("test"))])),
    ]
}

fn envelope_pairs() -> Pairs {
    vec![
        (s("v"), u(1)),
        (s("key_id"), s("acme-1")),
        (s("signature"), b(&[7; 64])),
        (s("body"), b(b"job bytes")),
    ]
}

/// `pairs` with the value of `key` replaced.
fn with(mut pairs: Pairs, key: &str, value: Vec<u8>) -> Pairs {
    let slot = pairs
        .iter_mut()
        .find(|(k, _)| *k == s(key))
        .expect("key present");
    slot.1 = value;
    pairs
}

fn without(mut pairs: Pairs, key: &str) -> Pairs {
    pairs.retain(|(k, _)| *k != s(key));
    pairs
}

fn job_with_task(task: Pairs) -> Vec<u8> {
    map(&with(job_pairs(), "task", map(&task)))
}

fn refused_envelope(bytes: &[u8]) -> DecodeError {
    match decode::<SignedJob>(bytes, LIMIT) {
        Err(CodecError::Malformed(e)) => e,
        other => panic!("expected a refused envelope, got {other:?}"),
    }
}

fn refused_job(bytes: &[u8]) -> DecodeError {
    match decode::<Job>(bytes, LIMIT) {
        Err(CodecError::Malformed(e)) => e,
        other => panic!("expected a refused job, got {other:?}"),
    }
}

fn assert_wrong_type(e: DecodeError, field: &str, expected: WireType, found: WireType) {
    match e {
        DecodeError::WrongType {
            field: f,
            expected: x,
            found: y,
        } => assert_eq!((f, x, y), (field, expected, found)),
        other => panic!("expected {field} as {expected}, not {found}: got {other}"),
    }
}

#[test]
fn the_hand_built_messages_are_valid() {
    let envelope: SignedJob = decode(&map(&envelope_pairs()), LIMIT).expect("valid envelope");
    assert_eq!(
        envelope,
        SignedJob {
            v: 1,
            key_id: "acme-1".into(),
            signature: vec![7; 64],
            body: b"job bytes".to_vec(),
        }
    );
    let job: Job = decode(&map(&job_pairs()), LIMIT).expect("valid job");
    assert_eq!(
        job.task,
        Task::Embed {
            inputs: vec!["hello".into(), "world".into()],
            normalize: true,
            truncate: false,
        }
    );
    assert_eq!((job.priority, job.deadline_ms), (3, None));
    assert_eq!(job.meta, BTreeMap::from([("source".into(), "test".into())]));
    // Keys in any order; optional keys may be left out.
    let mut minimal = without(
        without(without(job_pairs(), "priority"), "meta"),
        "deadline_ms",
    );
    minimal.reverse();
    let job: Job = decode(&map(&minimal), LIMIT).expect("minimal job");
    assert_eq!((job.priority, job.deadline_ms), (0, None));
    assert!(job.meta.is_empty());
    let defaults = job_with_task(without(without(task_pairs(), "normalize"), "truncate"));
    let job: Job = decode(&defaults, LIMIT).expect("task defaults");
    assert!(matches!(
        job.task,
        Task::Embed {
            normalize: true,
            truncate: true,
            ..
        }
    ));
}

#[test]
fn structures_sent_as_arrays_are_refused() {
    // What rmp-serde's positional `to_vec` writes: the values in field order, no keys.
    let positional: Vec<Vec<u8>> = envelope_pairs().into_iter().map(|(_, v)| v).collect();
    assert_wrong_type(
        refused_envelope(&array(&positional)),
        "SignedJob",
        WireType::Map,
        WireType::Array,
    );
    let positional: Vec<Vec<u8>> = job_pairs().into_iter().map(|(_, v)| v).collect();
    assert_wrong_type(
        refused_job(&array(&positional)),
        "Job",
        WireType::Map,
        WireType::Array,
    );
    let task: Vec<Vec<u8>> = task_pairs().into_iter().map(|(_, v)| v).collect();
    assert_wrong_type(
        refused_job(&map(&with(job_pairs(), "task", array(&task)))),
        "task",
        WireType::Map,
        WireType::Array,
    );
    let meta = array(&[s("source"), s("test")]);
    assert_wrong_type(
        refused_job(&map(&with(job_pairs(), "meta", meta))),
        "meta",
        WireType::Map,
        WireType::Array,
    );
}

#[test]
fn signature_or_body_as_str_is_refused() {
    let signature = "x".repeat(64);
    assert_wrong_type(
        refused_envelope(&map(&with(envelope_pairs(), "signature", s(&signature)))),
        "signature",
        WireType::Bin,
        WireType::Str,
    );
    assert_wrong_type(
        refused_envelope(&map(&with(envelope_pairs(), "body", s("job bytes")))),
        "body",
        WireType::Bin,
        WireType::Str,
    );
    // Nor as an array of byte values (serde's default for a Vec<u8>).
    let as_array = array(&[u(1), u(2)]);
    assert_wrong_type(
        refused_envelope(&map(&with(envelope_pairs(), "body", as_array))),
        "body",
        WireType::Bin,
        WireType::Array,
    );
}

#[test]
fn texts_sent_as_bin_are_refused() {
    assert_wrong_type(
        refused_envelope(&map(&with(envelope_pairs(), "key_id", b(b"acme-1")))),
        "key_id",
        WireType::Str,
        WireType::Bin,
    );
    for field in ["job_id", "tenant", "model"] {
        assert_wrong_type(
            refused_job(&map(&with(job_pairs(), field, b(b"text")))),
            field,
            WireType::Str,
            WireType::Bin,
        );
    }
    let inputs = array(&[s("hello"), b(b"world")]);
    assert_wrong_type(
        refused_job(&job_with_task(with(task_pairs(), "inputs", inputs))),
        "inputs[]",
        WireType::Str,
        WireType::Bin,
    );
    assert_wrong_type(
        refused_job(&job_with_task(with(task_pairs(), "kind", b(b"embed")))),
        "kind",
        WireType::Str,
        WireType::Bin,
    );
    let meta = map(&vec![(s("source"), b(b"test"))]);
    assert_wrong_type(
        refused_job(&map(&with(job_pairs(), "meta", meta))),
        "meta value",
        WireType::Str,
        WireType::Bin,
    );
}

#[test]
fn keys_must_be_str() {
    let mut pairs = envelope_pairs();
    pairs[0].0 = u(0);
    assert_wrong_type(
        refused_envelope(&map(&pairs)),
        "SignedJob key",
        WireType::Str,
        WireType::Int,
    );
    let mut pairs = job_pairs();
    pairs[0].0 = b(b"job_id");
    assert_wrong_type(
        refused_job(&map(&pairs)),
        "Job key",
        WireType::Str,
        WireType::Bin,
    );
    let mut task = task_pairs();
    task[1].0 = b(b"inputs");
    assert_wrong_type(
        refused_job(&job_with_task(task)),
        "task key",
        WireType::Str,
        WireType::Bin,
    );
    let meta = map(&vec![(u(1), s("test"))]);
    assert_wrong_type(
        refused_job(&map(&with(job_pairs(), "meta", meta))),
        "meta key",
        WireType::Str,
        WireType::Int,
    );
}

#[test]
fn unknown_keys_are_refused() {
    let mut pairs = envelope_pairs();
    pairs.push((s("extra"), u(1)));
    assert!(matches!(
        refused_envelope(&map(&pairs)),
        DecodeError::UnknownKey { map: "SignedJob", key } if key == "extra"
    ));
    let mut pairs = job_pairs();
    pairs.push((s("reply_to"), s("_INBOX.x")));
    assert!(matches!(
        refused_job(&map(&pairs)),
        DecodeError::UnknownKey { map: "Job", key } if key == "reply_to"
    ));
    let mut task = task_pairs();
    task.push((s("pooling"), s("cls")));
    assert!(matches!(
        refused_job(&job_with_task(task)),
        DecodeError::UnknownKey { map: "task", key } if key == "pooling"
    ));
    assert!(matches!(
        refused_job(&job_with_task(with(task_pairs(), "kind", s("rerank")))),
        DecodeError::UnknownTaskKind(kind) if kind == "rerank"
    ));
}

#[test]
fn a_key_given_twice_is_refused() {
    // Readers that keep the first and readers that keep the last would see different jobs.
    let mut pairs = envelope_pairs();
    pairs.push((s("body"), b(b"other job")));
    assert!(matches!(
        refused_envelope(&map(&pairs)),
        DecodeError::DuplicateKey { map: "SignedJob", key } if key == "body"
    ));
    let mut pairs = job_pairs();
    pairs.push((s("tenant"), s("globex")));
    assert!(matches!(
        refused_job(&map(&pairs)),
        DecodeError::DuplicateKey { map: "Job", key } if key == "tenant"
    ));
    let mut task = task_pairs();
    task.push((s("kind"), s("embed")));
    assert!(matches!(
        refused_job(&job_with_task(task)),
        DecodeError::DuplicateKey { map: "task", key } if key == "kind"
    ));
    let meta = map(&vec![(s("a"), s("1")), (s("a"), s("2"))]);
    assert!(matches!(
        refused_job(&map(&with(job_pairs(), "meta", meta))),
        DecodeError::DuplicateKey { map: "meta", key } if key == "a"
    ));
}

#[test]
fn required_keys_must_be_present() {
    for key in ["v", "key_id", "signature", "body"] {
        match refused_envelope(&map(&without(envelope_pairs(), key))) {
            DecodeError::MissingKey { map, key: k } => assert_eq!((map, k), ("SignedJob", key)),
            other => panic!("{key}: {other}"),
        }
    }
    for key in ["job_id", "tenant", "model", "task", "created_at_ms"] {
        match refused_job(&map(&without(job_pairs(), key))) {
            DecodeError::MissingKey { map, key: k } => assert_eq!((map, k), ("Job", key)),
            other => panic!("{key}: {other}"),
        }
    }
    for key in ["kind", "inputs"] {
        match refused_job(&job_with_task(without(task_pairs(), key))) {
            DecodeError::MissingKey { map, key: k } => assert_eq!((map, k), ("task", key)),
            other => panic!("{key}: {other}"),
        }
    }
}

#[test]
fn bytes_after_the_message_are_refused() {
    let mut envelope = map(&envelope_pairs());
    envelope.push(0xc0);
    assert!(matches!(
        refused_envelope(&envelope),
        DecodeError::TrailingBytes(1)
    ));
    let mut job = map(&job_pairs());
    job.extend_from_slice(&map(&job_pairs()));
    assert!(matches!(refused_job(&job), DecodeError::TrailingBytes(_)));
}

#[test]
fn integers_of_any_width_are_read_by_value() {
    // uint 16 and int 8 holding small non-negative values are valid encodings of them.
    for priority in [
        vec![0xcd, 0x00, 0x05],
        vec![0xd0, 0x05],
        vec![0xd3, 0, 0, 0, 0, 0, 0, 0, 5],
    ] {
        let job: Job = decode(&map(&with(job_pairs(), "priority", priority)), LIMIT)
            .expect("priority 5 in another width");
        assert_eq!(job.priority, 5);
    }
    let job: Job = decode(&map(&with(job_pairs(), "deadline_ms", u(u64::MAX))), LIMIT)
        .expect("the largest deadline");
    assert_eq!(job.deadline_ms, Some(u64::MAX));
    for (bytes, value) in [
        (u(256), 256),
        (vec![0xff], -1),
        (vec![0xd1, 0x80, 0x00], -32768),
    ] {
        match refused_job(&map(&with(job_pairs(), "priority", bytes))) {
            DecodeError::OutOfRange { field, value: v } => {
                assert_eq!((field, v), ("priority", value))
            }
            other => panic!("{value}: {other}"),
        }
    }
    assert!(matches!(
        refused_envelope(&map(&with(envelope_pairs(), "v", u(257)))),
        DecodeError::OutOfRange {
            field: "v",
            value: 257
        }
    ));
    let float = rmp_serde::to_vec(&1.0e12f64).expect("float");
    assert_wrong_type(
        refused_job(&map(&with(job_pairs(), "created_at_ms", float))),
        "created_at_ms",
        WireType::Int,
        WireType::Float,
    );
    assert_wrong_type(
        refused_job(&map(&with(job_pairs(), "created_at_ms", vec![0xc0]))),
        "created_at_ms",
        WireType::Int,
        WireType::Nil,
    );
}

#[test]
fn flags_are_bool_only() {
    assert_wrong_type(
        refused_job(&job_with_task(with(task_pairs(), "normalize", u(1)))),
        "normalize",
        WireType::Bool,
        WireType::Int,
    );
    assert_wrong_type(
        refused_job(&job_with_task(with(task_pairs(), "truncate", vec![0xc0]))),
        "truncate",
        WireType::Bool,
        WireType::Nil,
    );
}

#[test]
fn str_must_be_utf8_and_lengths_must_fit() {
    let bad_utf8 = vec![0xa2, 0xc3, 0x28];
    assert!(matches!(
        refused_job(&map(&with(job_pairs(), "job_id", bad_utf8))),
        DecodeError::InvalidUtf8 { field: "job_id" }
    ));
    // An array 32 header announcing 4 billion inputs, and a str 32 announcing 4 GiB: refused as
    // truncated, with nothing allocated for them.
    let huge_array = vec![0xdd, 0xff, 0xff, 0xff, 0xff];
    let mut pairs = without(job_pairs(), "task");
    let task = vec![(s("kind"), s("embed")), (s("inputs"), huge_array)];
    pairs.push((s("task"), map(&task)));
    assert!(matches!(refused_job(&map(&pairs)), DecodeError::Truncated));
    let huge_str = vec![0xdb, 0xff, 0xff, 0xff, 0xff, b'a'];
    assert!(matches!(
        refused_envelope(&map(&with(envelope_pairs(), "key_id", huge_str))),
        DecodeError::Truncated
    ));
    assert!(matches!(refused_envelope(&[]), DecodeError::Truncated));
    assert_wrong_type(
        refused_envelope(&[0xc1]),
        "SignedJob",
        WireType::Map,
        WireType::Reserved,
    );
}

#[test]
fn error_messages_bound_what_the_sender_wrote() {
    let long_key = "k".repeat(10_000);
    let mut pairs = job_pairs();
    pairs.push((s(&long_key), u(1)));
    let message = CodecError::from(refused_job(&map(&pairs))).to_string();
    assert!(message.contains(&"k".repeat(64)), "{message}");
    assert!(message.len() < 200, "{} characters", message.len());
}
