//! Each precision mode keeps its accuracy contract ([`Precision::contract`]) against the
//! embeddings sentence-transformers gives (`fixtures/minilm_reference.json`), whatever the
//! batch. The bf16 modes need AVX512-BF16: on a CPU without it their tests print why they
//! skip, and `without_bf16.rs` checks what such a CPU does instead. Needs the real model
//! (`ops/fetch-model.sh`, or `FLEET_MODEL_DIR`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::Device;
use fleet_kernels::cpu::bf16_supported;
use fleet_model::{EmbeddingModel, Precision, Sequence};
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    text: String,
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

/// The model in `precision`, or `None` (after saying why) where this CPU cannot run it.
fn model(precision: Precision) -> Option<EmbeddingModel> {
    if matches!(precision, Precision::Bf16 | Precision::Bf16x3) && !bf16_supported() {
        eprintln!("skipped {precision}: this CPU lacks AVX512-BF16");
        return None;
    }
    let dir = model_dir();
    assert!(
        dir.join("model.safetensors").is_file(),
        "the real model is missing at {} (run ops/fetch-model.sh, or set FLEET_MODEL_DIR)",
        dir.display()
    );
    Some(
        EmbeddingModel::load_with_precision(&dir, &Device::Cpu, precision)
            .unwrap_or_else(|e| panic!("loading in {precision}: {e}")),
    )
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

fn tokenized(model: &EmbeddingModel) -> Vec<Vec<u32>> {
    fixture()
        .items
        .iter()
        .map(|it| model.tokenize(&it.text, true).expect("tokenize"))
        .collect()
}

/// The fixture through `precision`'s model, in one batch, then alone and in reverse order:
/// every vector within the mode's contract, and each one the same in every batch.
fn keeps_its_contract(precision: Precision) {
    let Some(model) = model(precision) else {
        return;
    };
    let contract = precision.contract();
    let ids = tokenized(&model);
    let all: Vec<Sequence<'_>> = ids.iter().map(|t| Sequence::normalized(t)).collect();
    let together = model.embed(&all).expect("batch");
    let (mut worst_cos, mut worst_diff) = (1.0f64, 0.0f32);
    for (it, v) in fixture().items.iter().zip(&together) {
        let (cos, diff) = (cosine(v, &it.embedding), max_abs_diff(v, &it.embedding));
        assert!(
            cos >= contract.min_cosine && diff <= contract.max_abs_diff,
            "{precision} on {:?}: cosine {cos}, max abs diff {diff}, contract {contract:?}",
            it.text
        );
        worst_cos = worst_cos.min(cos);
        worst_diff = worst_diff.max(diff);
    }
    eprintln!("{precision}: min cosine {worst_cos}, max abs diff {worst_diff:e}");

    let reversed: Vec<Sequence<'_>> = all.iter().rev().copied().collect();
    let backwards = model.embed(&reversed).expect("reversed batch");
    for (i, s) in all.iter().enumerate() {
        let alone = model.embed(std::slice::from_ref(s)).expect("alone");
        let d1 = max_abs_diff(&alone[0], &together[i]);
        let d2 = max_abs_diff(&alone[0], &backwards[all.len() - 1 - i]);
        assert!(
            d1 <= 1e-5 && d2 <= 1e-5,
            "{precision}, text {i}: diffs {d1}, {d2} between batches"
        );
    }

    // The candle-op path (what other devices take) runs the same packed weights.
    let ops = model.embed_with_tensor_ops(&all).expect("tensor ops");
    for (x, y) in together.iter().zip(&ops) {
        assert!(max_abs_diff(x, y) <= 1e-6);
    }
}

#[test]
fn f32_keeps_its_contract() {
    keeps_its_contract(Precision::F32);
}

#[test]
fn bf16_keeps_its_contract() {
    keeps_its_contract(Precision::Bf16);
}

#[test]
fn bf16x3_keeps_the_default_contract() {
    assert_eq!(
        Precision::Bf16x3.contract(),
        Precision::DEFAULT_CONTRACT,
        "the exact mode promises what f32 does"
    );
    keeps_its_contract(Precision::Bf16x3);
}

#[test]
fn auto_keeps_the_default_contract() {
    let Some(model) = model(Precision::Auto) else {
        return;
    };
    let chosen = model.precision();
    assert_ne!(chosen, Precision::Auto, "auto is resolved at load");
    assert_eq!(chosen.contract(), Precision::DEFAULT_CONTRACT);
    keeps_its_contract(chosen);
}

#[test]
fn bf16_is_not_f32() {
    // Guards the tests above against a bf16 mode that silently ran f32.
    let (Some(f32_model), Some(bf16_model)) = (model(Precision::F32), model(Precision::Bf16))
    else {
        return;
    };
    assert_eq!(bf16_model.precision(), Precision::Bf16);
    let ids = tokenized(&f32_model);
    let batch: Vec<Sequence<'_>> = ids.iter().map(|t| Sequence::normalized(t)).collect();
    let (a, b) = (
        f32_model.embed(&batch).expect("f32"),
        bf16_model.embed(&batch).expect("bf16"),
    );
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f32::max);
    assert!(diff > 1e-4, "bf16 gave f32's vectors (max diff {diff})");
}
