//! Fast tests on a tiny randomly initialised BERT that the test writes itself (weights,
//! config, tokenizer): the forward pass against a plain padded f64 implementation written here,
//! tokenizer limits, and typed errors for broken model directories.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use fleet_model::{EmbeddingModel, FailureKind, ModelError, Sequence};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

const VOCAB: [&str; 12] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "the", "a", "cat", "sat", "##s", "on",
];
const HIDDEN: usize = 8;
const HEADS: usize = 2;
const LAYERS: usize = 2;
const INTER: usize = 16;
const POSITIONS: usize = 16;
const MAX_SEQ: usize = 8;
const EPS: f64 = 1e-12;

/// The weights of the tiny model, by tensor name, as f32 values with shapes.
type Weights = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

fn random_weights(seed: u64) -> Weights {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut w = Weights::new();
    let mut put = |name: &str, shape: &[usize], lo: f32, hi: f32| {
        let n = shape.iter().product();
        let v = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
        w.insert(name.to_string(), (shape.to_vec(), v));
    };
    put(
        "embeddings.word_embeddings.weight",
        &[VOCAB.len(), HIDDEN],
        -1.0,
        1.0,
    );
    put(
        "embeddings.position_embeddings.weight",
        &[POSITIONS, HIDDEN],
        -0.5,
        0.5,
    );
    put(
        "embeddings.token_type_embeddings.weight",
        &[2, HIDDEN],
        -0.5,
        0.5,
    );
    put("embeddings.LayerNorm.weight", &[HIDDEN], 0.8, 1.2);
    put("embeddings.LayerNorm.bias", &[HIDDEN], -0.1, 0.1);
    for l in 0..LAYERS {
        let p = format!("encoder.layer.{l}");
        for (name, out, inp) in [
            ("attention.self.query", HIDDEN, HIDDEN),
            ("attention.self.key", HIDDEN, HIDDEN),
            ("attention.self.value", HIDDEN, HIDDEN),
            ("attention.output.dense", HIDDEN, HIDDEN),
            ("intermediate.dense", INTER, HIDDEN),
            ("output.dense", HIDDEN, INTER),
        ] {
            put(&format!("{p}.{name}.weight"), &[out, inp], -0.6, 0.6);
            put(&format!("{p}.{name}.bias"), &[out], -0.2, 0.2);
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            put(&format!("{p}.{name}.weight"), &[HIDDEN], 0.8, 1.2);
            put(&format!("{p}.{name}.bias"), &[HIDDEN], -0.1, 0.1);
        }
    }
    w
}

fn write_safetensors(path: &Path, weights: &Weights) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(k, (shape, v))| {
            let b = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (k.clone(), shape.clone(), b)
        })
        .collect();
    let views = bytes.iter().map(|(k, shape, b)| {
        (
            k.clone(),
            TensorView::new(Dtype::F32, shape.clone(), b).expect("tensor view"),
        )
    });
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

fn config() -> serde_json::Value {
    json!({
        "architectures": ["BertModel"], "model_type": "bert", "hidden_act": "gelu",
        "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS,
        "intermediate_size": INTER, "max_position_embeddings": POSITIONS,
        "type_vocab_size": 2, "vocab_size": VOCAB.len(), "layer_norm_eps": EPS,
        "position_embedding_type": "absolute"
    })
}

fn pooling() -> serde_json::Value {
    json!({
        "word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": false,
        "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false
    })
}

fn tokenizer() -> serde_json::Value {
    let special = |id: usize| {
        json!({"id": id, "content": VOCAB[id], "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let vocab: serde_json::Map<String, serde_json::Value> = VOCAB
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let cls = json!({"SpecialToken": {"id": "[CLS]", "type_id": 0}});
    let sep = json!({"SpecialToken": {"id": "[SEP]", "type_id": 0}});
    json!({
        "version": "1.0",
        // Like the real file: padding and truncation switched on, which the model must undo.
        "truncation": {"max_length": 4, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 6}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": [special(0), special(1), special(2), special(3)],
        "normalizer": {"type": "BertNormalizer", "clean_text": true,
                       "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [cls, {"Sequence": {"id": "A", "type_id": 0}}, sep],
            "pair": [cls, {"Sequence": {"id": "A", "type_id": 0}}, sep,
                     {"Sequence": {"id": "B", "type_id": 1}}, sep],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab}
    })
}

fn write_json(path: &Path, v: &serde_json::Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).expect("json")).expect("write json");
}

/// Writes a complete tiny model directory.
fn tiny_model_dir(weights: &Weights) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let p = dir.path();
    write_json(&p.join("config.json"), &config());
    write_json(
        &p.join("sentence_bert_config.json"),
        &json!({"max_seq_length": MAX_SEQ}),
    );
    std::fs::create_dir(p.join("1_Pooling")).expect("mkdir");
    write_json(&p.join("1_Pooling").join("config.json"), &pooling());
    write_json(&p.join("tokenizer.json"), &tokenizer());
    write_safetensors(&p.join("model.safetensors"), weights);
    dir
}

fn load(dir: &Path) -> Result<EmbeddingModel, ModelError> {
    EmbeddingModel::load(dir, &Device::Cpu)
}

// ---- a plain f64 BERT, padded, as the reference for the unpadded forward pass ----

fn get<'a>(w: &'a Weights, name: &str) -> &'a [f32] {
    &w[name].1
}

fn linear(x: &[Vec<f64>], w: &[f32], b: &[f32]) -> Vec<Vec<f64>> {
    let (out, inp) = (b.len(), x[0].len());
    x.iter()
        .map(|row| {
            (0..out)
                .map(|o| {
                    f64::from(b[o])
                        + (0..inp)
                            .map(|i| row[i] * f64::from(w[o * inp + i]))
                            .sum::<f64>()
                })
                .collect()
        })
        .collect()
}

fn layer_norm(x: &[Vec<f64>], w: &[f32], b: &[f32]) -> Vec<Vec<f64>> {
    x.iter()
        .map(|row| {
            let n = row.len() as f64;
            let mean = row.iter().sum::<f64>() / n;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
            row.iter()
                .enumerate()
                .map(|(i, v)| (v - mean) / (var + EPS).sqrt() * f64::from(w[i]) + f64::from(b[i]))
                .collect()
        })
        .collect()
}

fn add(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p + q).collect())
        .collect()
}

/// Embeds one batch the textbook way: pad to the longest sequence, mask padded keys with a large
/// negative number, mean-pool over the attention mask.
fn reference_embed(w: &Weights, batch: &[(Vec<u32>, bool)]) -> Vec<Vec<f64>> {
    let max_len = batch.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let d = HIDDEN / HEADS;
    batch
        .iter()
        .map(|(ids, normalize)| {
            let mut padded = ids.clone();
            padded.resize(max_len, 0);
            let mask: Vec<bool> = (0..max_len).map(|i| i < ids.len()).collect();
            let emb = |name: &str, row: usize| -> Vec<f64> {
                get(w, name)[row * HIDDEN..(row + 1) * HIDDEN]
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect()
            };
            let x: Vec<Vec<f64>> = padded
                .iter()
                .enumerate()
                .map(|(pos, &id)| {
                    let a = emb("embeddings.word_embeddings.weight", id as usize);
                    let b = emb("embeddings.position_embeddings.weight", pos);
                    let c = emb("embeddings.token_type_embeddings.weight", 0);
                    (0..HIDDEN).map(|i| a[i] + b[i] + c[i]).collect()
                })
                .collect();
            let mut h = layer_norm(
                &x,
                get(w, "embeddings.LayerNorm.weight"),
                get(w, "embeddings.LayerNorm.bias"),
            );
            for l in 0..LAYERS {
                let p = |n: &str| format!("encoder.layer.{l}.{n}");
                let lin = |x: &[Vec<f64>], n: &str| {
                    linear(
                        x,
                        get(w, &p(&format!("{n}.weight"))),
                        get(w, &p(&format!("{n}.bias"))),
                    )
                };
                let (q, k, v) = (
                    lin(&h, "attention.self.query"),
                    lin(&h, "attention.self.key"),
                    lin(&h, "attention.self.value"),
                );
                let mut ctx = vec![vec![0.0; HIDDEN]; max_len];
                for head in 0..HEADS {
                    for i in 0..max_len {
                        let logits: Vec<f64> = (0..max_len)
                            .map(|j| {
                                let s: f64 = (0..d)
                                    .map(|e| q[i][head * d + e] * k[j][head * d + e])
                                    .sum::<f64>()
                                    / (d as f64).sqrt();
                                if mask[j] { s } else { s - 1e9 }
                            })
                            .collect();
                        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = logits.iter().map(|s| (s - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for c in 0..d {
                            ctx[i][head * d + c] =
                                (0..max_len).map(|j| e[j] / z * v[j][head * d + c]).sum();
                        }
                    }
                }
                let a = lin(&ctx, "attention.output.dense");
                let h1 = layer_norm(
                    &add(&a, &h),
                    get(w, &p("attention.output.LayerNorm.weight")),
                    get(w, &p("attention.output.LayerNorm.bias")),
                );
                let inter: Vec<Vec<f64>> = lin(&h1, "intermediate.dense")
                    .into_iter()
                    .map(|r| {
                        r.into_iter()
                            .map(|x| 0.5 * x * (1.0 + erf_f64(x / std::f64::consts::SQRT_2)))
                            .collect()
                    })
                    .collect();
                let o = lin(&inter, "output.dense");
                h = layer_norm(
                    &add(&o, &h1),
                    get(w, &p("output.LayerNorm.weight")),
                    get(w, &p("output.LayerNorm.bias")),
                );
            }
            let count = mask.iter().filter(|m| **m).count().max(1) as f64;
            let mut mean = vec![0.0; HIDDEN];
            for (row, _) in h.iter().zip(&mask).filter(|(_, m)| **m) {
                for (m, v) in mean.iter_mut().zip(row) {
                    *m += v / count;
                }
            }
            if *normalize {
                let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
                mean.iter_mut().for_each(|v| *v /= norm);
            }
            mean
        })
        .collect()
}

/// erf to f64 precision: Taylor series near 0, continued fraction for erfc further out.
fn erf_f64(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.5 {
        let (mut term, mut sum, mut n) = (a, a, 0.0);
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = exp(-a^2)/sqrt(pi) * 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...)))).
        let mut f = a;
        for k in (1..60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    r.copysign(x)
}

#[test]
fn reference_erf_is_accurate() {
    // Known values of erf.
    for (x, want) in [
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (3.0, 0.999_977_909_503_001_4),
    ] {
        assert!((erf_f64(x) - want).abs() < 1e-14 && (erf_f64(-x) + want).abs() < 1e-14);
    }
}

#[test]
fn tiny_model_matches_plain_f64_bert() {
    let weights = random_weights(7);
    let dir = tiny_model_dir(&weights);
    let model = load(dir.path()).expect("tiny model loads");
    assert_eq!(model.dimension(), HIDDEN);
    assert_eq!(model.max_tokens(), MAX_SEQ);
    let texts = [
        "hello world",
        "the cats sat on a",
        "",
        "Hello",
        "zebra hello",
    ];
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| model.tokenize(t, false).expect("tokenize"))
        .collect();
    assert_eq!(ids[0], vec![2, 4, 5, 3]);
    assert_eq!(ids[1], vec![2, 6, 8, 10, 9, 11, 7, 3], "word pieces");
    assert_eq!(ids[2], vec![2, 3], "empty text is [CLS] [SEP]");
    assert_eq!(ids[4], vec![2, 1, 4, 3], "unknown word is [UNK]");
    let batch: Vec<(Vec<u32>, bool)> = ids
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i % 2 == 0))
        .collect();
    let seqs: Vec<Sequence<'_>> = batch
        .iter()
        .map(|(t, n)| Sequence {
            token_ids: t,
            normalize: *n,
        })
        .collect();
    let got = model.embed(&seqs).expect("embed");
    let want = reference_embed(&weights, &batch);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        for (a, b) in g.iter().zip(w) {
            assert!((f64::from(*a) - b).abs() <= 1e-5, "text {i}: {a} vs {b}");
        }
    }
    // Alone, each sequence gives the same vector as inside the batch.
    for (s, g) in seqs.iter().zip(&got) {
        let alone = model.embed(std::slice::from_ref(s)).expect("alone");
        let diff = alone[0]
            .iter()
            .zip(g)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff <= 1e-6, "batch dependence {diff}");
    }
}

#[test]
fn tokenizer_limits_follow_max_seq_length() {
    let dir = tiny_model_dir(&random_weights(1));
    let model = load(dir.path()).expect("load");
    let text = "the cat sat on the world hello world";
    match model.tokenize(text, false) {
        Err(ModelError::TooLong { tokens, max }) => assert_eq!((tokens, max), (10, MAX_SEQ)),
        other => panic!("expected TooLong, got {other:?}"),
    }
    let cut = model.tokenize(text, true).expect("truncated");
    assert_eq!(
        cut,
        vec![2, 6, 8, 9, 11, 6, 5, 3],
        "first tokens kept, [SEP] last"
    );
    let short = model.tokenize("hello", false).expect("short");
    assert_eq!(short, vec![2, 4, 3], "no padding from tokenizer.json");
}

#[test]
fn embed_rejects_bad_token_ids_and_lengths() {
    let dir = tiny_model_dir(&random_weights(2));
    let model = load(dir.path()).expect("load");
    let bad = [2u32, 99, 3];
    let err = model
        .embed(&[Sequence {
            token_ids: &bad,
            normalize: true,
        }])
        .expect_err("id 99 is outside the vocabulary");
    assert!(matches!(err, ModelError::InvalidTokenId { id: 99, .. }));
    assert_eq!(
        err.kind(),
        FailureKind::Deterministic,
        "a retry fails alike"
    );
    let long = vec![4u32; MAX_SEQ + 1];
    let err = model
        .embed(&[Sequence {
            token_ids: &long,
            normalize: true,
        }])
        .expect_err("one token too many");
    assert!(matches!(
        err,
        ModelError::TooLong {
            tokens: 9,
            max: MAX_SEQ
        }
    ));
    assert_eq!(err.kind(), FailureKind::Deterministic);
    let empty: [u32; 0] = [];
    let out = model
        .embed(&[Sequence {
            token_ids: &empty,
            normalize: true,
        }])
        .expect("a sequence without tokens");
    assert!(out[0].iter().all(|v| *v == 0.0));
}

#[test]
fn missing_files_are_io_errors() {
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "config.json",
        "sentence_bert_config.json",
    ] {
        let dir = tiny_model_dir(&random_weights(3));
        std::fs::remove_file(dir.path().join(file)).expect("remove");
        match load(dir.path()) {
            Err(ModelError::Io { path, .. }) => assert!(path.ends_with(file)),
            Err(e) => panic!("{file}: expected Io, got {e}"),
            Ok(_) => panic!("{file}: loaded without it"),
        }
    }
}

#[test]
fn pooling_other_than_mean_is_refused() {
    for (key, value) in [
        ("pooling_mode_cls_token", true),
        ("pooling_mode_mean_tokens", false),
        ("pooling_mode_max_tokens", true),
    ] {
        let dir = tiny_model_dir(&random_weights(4));
        let mut p = pooling();
        p[key] = json!(value);
        write_json(&dir.path().join("1_Pooling").join("config.json"), &p);
        assert!(
            matches!(load(dir.path()), Err(ModelError::UnsupportedPooling { .. })),
            "{key} = {value}"
        );
    }
}

#[test]
fn wrong_or_missing_tensors_are_typed_errors() {
    let mut w = random_weights(5);
    let name = "encoder.layer.1.intermediate.dense.weight";
    w.insert(
        name.into(),
        (vec![INTER, HIDDEN + 1], vec![0.0; INTER * (HIDDEN + 1)]),
    );
    let dir = tiny_model_dir(&w);
    match load(dir.path()) {
        Err(ModelError::TensorShape {
            name: n,
            expected,
            actual,
        }) => {
            assert_eq!(n, name);
            assert_eq!(expected, vec![INTER, HIDDEN]);
            assert_eq!(actual, vec![INTER, HIDDEN + 1]);
        }
        other => panic!("expected TensorShape, got {:?}", other.err()),
    }
    let mut w = random_weights(5);
    w.remove("encoder.layer.0.attention.self.key.bias");
    let dir = tiny_model_dir(&w);
    assert!(matches!(
        load(dir.path()),
        Err(ModelError::MissingTensor { name }) if name == "encoder.layer.0.attention.self.key.bias"
    ));
}

#[test]
fn malformed_files_are_typed_errors() {
    let dir = tiny_model_dir(&random_weights(6));
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"not a safetensors file",
    )
    .expect("write");
    assert!(matches!(load(dir.path()), Err(ModelError::Config { .. })));

    let dir = tiny_model_dir(&random_weights(6));
    std::fs::write(dir.path().join("config.json"), b"{\"hidden_size\": ").expect("write");
    assert!(matches!(load(dir.path()), Err(ModelError::Config { .. })));

    let dir = tiny_model_dir(&random_weights(6));
    std::fs::write(dir.path().join("tokenizer.json"), b"{}").expect("write");
    assert!(matches!(
        load(dir.path()),
        Err(ModelError::TokenizerLoad { .. })
    ));

    let dir = tiny_model_dir(&random_weights(6));
    let mut c = config();
    c["hidden_act"] = json!("relu");
    write_json(&dir.path().join("config.json"), &c);
    assert!(matches!(load(dir.path()), Err(ModelError::Unsupported(_))));

    let dir = tiny_model_dir(&random_weights(6));
    write_json(
        &dir.path().join("sentence_bert_config.json"),
        &json!({"max_seq_length": POSITIONS + 1}),
    );
    assert!(matches!(load(dir.path()), Err(ModelError::Unsupported(_))));

    let dir = tiny_model_dir(&random_weights(6));
    let mut c = config();
    c["vocab_size"] = json!(3);
    write_json(&dir.path().join("config.json"), &c);
    assert!(matches!(
        load(dir.path()),
        Err(ModelError::Config { message, .. }) if message.contains("the model embeds 3")
    ));

    // [CLS] and [SEP] alone fill two tokens: no text would fit.
    let dir = tiny_model_dir(&random_weights(6));
    write_json(
        &dir.path().join("sentence_bert_config.json"),
        &json!({"max_seq_length": 2}),
    );
    assert!(matches!(
        load(dir.path()),
        Err(ModelError::TokenizerLoad { message, .. }) if message.contains("no room for text")
    ));
}

#[test]
fn slice_path_and_tensor_op_path_agree() {
    let weights = random_weights(8);
    let dir = tiny_model_dir(&weights);
    let model = load(dir.path()).expect("load");
    let ids: Vec<Vec<u32>> = ["hello world", "", "the cat sat on a"]
        .iter()
        .map(|t| model.tokenize(t, true).expect("tokenize"))
        .collect();
    let seqs: Vec<Sequence<'_>> = ids.iter().map(|t| Sequence::normalized(t)).collect();
    let a = model.embed(&seqs).expect("slices");
    let b = model.embed_with_tensor_ops(&seqs).expect("tensor ops");
    for (x, y) in a.iter().zip(&b) {
        for (p, q) in x.iter().zip(y) {
            assert!((p - q).abs() <= 1e-6, "{p} vs {q}");
        }
    }
}
