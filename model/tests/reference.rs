//! The real all-MiniLM-L6-v2 against the embeddings sentence-transformers gives
//! (`fixtures/minilm_reference.json`, made by `ops/make-reference.sh`). Needs the model: `ops/fetch-model.sh`, or
//! `FLEET_MODEL_DIR` pointing at a copy. Without it these tests fail, saying so.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use fleet_model::{EmbeddingModel, ModelError, ModelRuntime, OwnedSequence, Sequence};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    max_seq_length: usize,
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    text: String,
    tokens: usize,
    embedding: Vec<f32>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("model/ has a parent")
        .to_path_buf()
}

fn model_dir() -> PathBuf {
    std::env::var_os("FLEET_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models").join("all-MiniLM-L6-v2"))
}

fn model() -> &'static EmbeddingModel {
    static MODEL: OnceLock<EmbeddingModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = model_dir();
        assert!(
            dir.join("model.safetensors").is_file(),
            "the real model is missing at {} (run ops/fetch-model.sh, or set FLEET_MODEL_DIR)",
            dir.display()
        );
        EmbeddingModel::load(&dir, &Device::Cpu)
            .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
    })
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let path = workspace_root()
            .join("fixtures")
            .join("minilm_reference.json");
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_slice(&bytes).expect("fixture parses")
    })
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn tokenized() -> Vec<Vec<u32>> {
    fixture()
        .items
        .iter()
        .map(|it| model().tokenize(&it.text, true).expect("tokenize"))
        .collect()
}

#[test]
fn dimensions_match_the_model() {
    assert_eq!(model().max_tokens(), fixture().max_seq_length);
    assert_eq!(model().dimension(), 384);
}

#[test]
fn token_counts_match_sentence_transformers() {
    for (it, ids) in fixture().items.iter().zip(tokenized()) {
        assert_eq!(ids.len(), it.tokens, "token count of {:?}", it.text);
    }
    assert_eq!(model().tokenize("", false).expect("empty text").len(), 2);
}

#[test]
fn embeddings_match_sentence_transformers() {
    let ids = tokenized();
    let batch: Vec<Sequence<'_>> = ids.iter().map(|t| Sequence::normalized(t)).collect();
    let got = model().embed(&batch).expect("embed");
    assert_eq!(got.len(), fixture().items.len());
    for (it, v) in fixture().items.iter().zip(&got) {
        assert_eq!(v.len(), it.embedding.len());
        let (cos, diff) = (cosine(v, &it.embedding), max_abs_diff(v, &it.embedding));
        assert!(
            cos >= 0.9999 && diff <= 1e-4,
            "{:?}: cosine {cos}, max abs diff {diff}",
            it.text
        );
    }
}

#[test]
fn embedding_does_not_depend_on_batch_companions() {
    let ids = tokenized();
    let all: Vec<Sequence<'_>> = ids.iter().map(|t| Sequence::normalized(t)).collect();
    let together = model().embed(&all).expect("batch");
    // Reversed order mixes lengths differently again.
    let reversed: Vec<Sequence<'_>> = all.iter().rev().copied().collect();
    let backwards = model().embed(&reversed).expect("reversed batch");
    for (i, s) in all.iter().enumerate() {
        let alone = model().embed(std::slice::from_ref(s)).expect("alone");
        let d1 = max_abs_diff(&alone[0], &together[i]);
        let d2 = max_abs_diff(&alone[0], &backwards[all.len() - 1 - i]);
        assert!(d1 <= 1e-5 && d2 <= 1e-5, "text {i}: diffs {d1}, {d2}");
    }
}

#[test]
fn normalize_flag_is_per_input() {
    let ids = model()
        .tokenize("a small test sentence", true)
        .expect("tokenize");
    let batch = [
        Sequence {
            token_ids: &ids,
            normalize: false,
        },
        Sequence {
            token_ids: &ids,
            normalize: true,
        },
    ];
    let out = model().embed(&batch).expect("embed");
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm(&out[1]) - 1.0).abs() < 1e-5);
    assert!(
        (norm(&out[0]) - 1.0).abs() > 1e-3,
        "raw mean is not unit length"
    );
    let rescaled: Vec<f32> = out[0].iter().map(|x| x / norm(&out[0])).collect();
    assert!(max_abs_diff(&rescaled, &out[1]) <= 1e-6);
}

#[test]
fn too_long_text_is_refused_without_truncation() {
    let long = fixture()
        .items
        .iter()
        .find(|it| it.tokens == fixture().max_seq_length)
        .expect("the fixture holds a text at the limit");
    match model().tokenize(&long.text, false) {
        Err(ModelError::TooLong { tokens, max }) => {
            assert_eq!(max, 256);
            assert!(tokens > 256, "reported {tokens} tokens");
        }
        other => panic!("expected TooLong, got {other:?}"),
    }
    let too_long = vec![101u32; 257];
    let batch = [Sequence {
        token_ids: &too_long,
        normalize: true,
    }];
    assert!(matches!(
        model().embed(&batch),
        Err(ModelError::TooLong {
            tokens: 257,
            max: 256
        })
    ));
}

#[test]
fn empty_inputs_work() {
    assert!(model().embed(&[]).expect("empty batch").is_empty());
    let ids = model().tokenize("", true).expect("empty text");
    let out = model()
        .embed(&[Sequence {
            token_ids: &ids,
            normalize: true,
        }])
        .expect("embed empty text");
    let empty = fixture()
        .items
        .iter()
        .find(|it| it.text.is_empty())
        .expect("the fixture holds the empty text");
    assert!(max_abs_diff(&out[0], &empty.embedding) <= 1e-4);
}

#[test]
fn runtime_thread_gives_the_same_vectors() {
    let dir = model_dir();
    let handle = ModelRuntime::spawn(EmbeddingModel::load(&dir, &Device::Cpu).expect("load"), 2);
    let texts = [
        "first text",
        "",
        "a somewhat longer third text with more tokens",
    ];
    let batch: Vec<OwnedSequence> = texts
        .iter()
        .map(|t| OwnedSequence {
            token_ids: handle.tokenize(t, true).expect("tokenize"),
            normalize: true,
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let (a, b, empty) = rt.block_on(async {
        // Three requests in flight at once against a queue of two.
        let (a, b, empty) = tokio::join!(
            handle.embed(batch.clone()),
            handle.embed(batch[..1].to_vec()),
            handle.embed(Vec::new())
        );
        (a, b, empty)
    });
    let (a, b) = (a.expect("embed a"), b.expect("embed b"));
    assert!(empty.expect("empty batch").is_empty());
    let direct = model()
        .embed(
            &batch
                .iter()
                .map(|s| Sequence {
                    token_ids: &s.token_ids,
                    normalize: s.normalize,
                })
                .collect::<Vec<_>>(),
        )
        .expect("direct");
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&direct) {
        assert!(max_abs_diff(x, y) <= 1e-6);
    }
    assert!(max_abs_diff(&b[0], &direct[0]) <= 1e-5);
    assert_eq!(handle.dimension(), 384);
    assert_eq!(handle.max_tokens(), 256);
}

#[test]
fn slice_path_and_tensor_op_path_agree() {
    let ids = tokenized();
    let batch: Vec<Sequence<'_>> = ids.iter().map(|t| Sequence::normalized(t)).collect();
    let a = model().embed(&batch).expect("slices");
    let b = model().embed_with_tensor_ops(&batch).expect("tensor ops");
    for (x, y) in a.iter().zip(&b) {
        assert!(max_abs_diff(x, y) <= 1e-6);
    }
}
