//! The CUDA implementations of the fused ops against their CPU implementations (the reference),
//! on seeded random inputs of odd sizes, with empty / fully masked sequences; and the whole
//! embedding model on the GPU against sentence-transformers' reference embeddings.
//!
//! Without a CUDA device every test prints `SKIPPED: no CUDA device` to stderr and returns: that
//! is a skip, not a pass (`ops/gpu-check.sh` runs these on a GPU machine).
#![cfg(feature = "cuda")]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use fleet_kernels as k;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The GPU, or `None` after printing the skip notice.
fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIPPED: no CUDA device ({test}: {e})");
            None
        }
    }
}

fn rng(case: u64) -> StdRng {
    StdRng::seed_from_u64(0xc0da_0000 + case)
}

fn uniform(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

/// The same values as a CPU and a GPU tensor.
fn pair(v: &[f32], shape: &[usize], gpu: &Device) -> (Tensor, Tensor) {
    let cpu = Tensor::from_slice(v, shape, &Device::Cpu).expect("cpu tensor");
    let dev = cpu.to_device(gpu).expect("copy to the GPU");
    (cpu, dev)
}

fn pair_u32(v: &[u32], gpu: &Device) -> (Tensor, Tensor) {
    let cpu = Tensor::from_slice(v, v.len(), &Device::Cpu).expect("cpu tensor");
    let dev = cpu.to_device(gpu).expect("copy to the GPU");
    (cpu, dev)
}

fn cu_seqlens(lengths: &[usize]) -> Vec<u32> {
    let mut cu = vec![0u32];
    for &l in lengths {
        cu.push(cu[cu.len() - 1] + l as u32);
    }
    cu
}

/// Same shape, and `|gpu - cpu| <= tol * (1 + |cpu|)` everywhere.
fn assert_close(what: &str, cpu: &Tensor, gpu: &Tensor, tol: f32) {
    assert_eq!(cpu.dims(), gpu.dims(), "{what}: shapes");
    let a = cpu
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("cpu values");
    let b = gpu
        .flatten_all()
        .and_then(|t| t.to_device(&Device::Cpu))
        .and_then(|t| t.to_vec1::<f32>())
        .expect("gpu values");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            y.is_finite() && (x - y).abs() <= tol * (1.0 + x.abs()),
            "{what}: element {i}: cpu {x}, gpu {y}"
        );
    }
}

#[test]
fn bias_gelu_matches_cpu() {
    let Some(dev) = gpu("bias_gelu_matches_cpu") else {
        return;
    };
    for (case, shape) in [vec![1, 1], vec![7, 33], vec![3, 5, 384], vec![129, 1537]]
        .into_iter()
        .enumerate()
    {
        let mut r = rng(case as u64);
        let n = shape[shape.len() - 1];
        let len: usize = shape.iter().product();
        let (x, xg) = pair(&uniform(&mut r, len, -6.0, 6.0), &shape, &dev);
        let (b, bg) = pair(&uniform(&mut r, n, -1.0, 1.0), &[n], &dev);
        let want = k::bias_gelu(&x, &b).expect("cpu op");
        let got = k::bias_gelu(&xg, &bg).expect("cuda op");
        assert_close(&format!("bias_gelu {shape:?}"), &want, &got, 2e-6);
    }
}

#[test]
fn add_layer_norm_matches_cpu() {
    let Some(dev) = gpu("add_layer_norm_matches_cpu") else {
        return;
    };
    for (case, shape) in [vec![1, 1], vec![5, 384], vec![17, 1000], vec![2, 3, 129]]
        .into_iter()
        .enumerate()
    {
        let mut r = rng(10 + case as u64);
        let n = shape[shape.len() - 1];
        let len: usize = shape.iter().product();
        // An offset in the values, so that a one-pass variance would lose precision.
        let (x, xg) = pair(&uniform(&mut r, len, 2.0, 6.0), &shape, &dev);
        let (res, resg) = pair(&uniform(&mut r, len, -3.0, 3.0), &shape, &dev);
        let (p, pg) = pair(&uniform(&mut r, 2 * n, -1.5, 1.5), &[2, n], &dev);
        let want = k::add_layer_norm(&x, &res, &p, 1e-12).expect("cpu op");
        let got = k::add_layer_norm(&xg, &resg, &pg, 1e-12).expect("cuda op");
        assert_close(&format!("add_layer_norm {shape:?}"), &want, &got, 2e-5);
    }
}

#[test]
fn scaled_masked_softmax_matches_cpu() {
    let Some(dev) = gpu("scaled_masked_softmax_matches_cpu") else {
        return;
    };
    let cases: [([usize; 4], Vec<u32>); 4] = [
        ([1, 1, 1, 1], vec![1]),
        ([2, 3, 5, 7], vec![0, 7]),
        ([3, 2, 17, 129], vec![129, 1, 0]),
        ([2, 12, 33, 300], vec![255, 300]),
    ];
    for (case, (dims, lengths)) in cases.into_iter().enumerate() {
        let mut r = rng(20 + case as u64);
        let len: usize = dims.iter().product();
        let (s, sg) = pair(&uniform(&mut r, len, -8.0, 8.0), &dims, &dev);
        let (l, lg) = pair_u32(&lengths, &dev);
        let want = k::scaled_masked_softmax(&s, &l, 0.17).expect("cpu op");
        let got = k::scaled_masked_softmax(&sg, &lg, 0.17).expect("cuda op");
        assert_close(&format!("softmax {dims:?} {lengths:?}"), &want, &got, 2e-6);
    }
    // Fully masked rows are exact zeros, as on the CPU.
    let (_, sg) = pair(&[1.0; 6], &[1, 1, 2, 3], &dev);
    let (_, lg) = pair_u32(&[0], &dev);
    let got = k::scaled_masked_softmax(&sg, &lg, 1.0)
        .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
        .expect("cuda op");
    assert_eq!(got, vec![0.0; 6]);
}

#[test]
fn scaled_masked_softmax_rejects_length_past_keys() {
    let Some(dev) = gpu("scaled_masked_softmax_rejects_length_past_keys") else {
        return;
    };
    let (_, sg) = pair(&[0.0; 4], &[1, 1, 1, 4], &dev);
    let (_, lg) = pair_u32(&[5], &dev);
    assert!(k::scaled_masked_softmax(&sg, &lg, 1.0).is_err());
}

#[test]
fn mean_pool_normalize_matches_cpu() {
    let Some(dev) = gpu("mean_pool_normalize_matches_cpu") else {
        return;
    };
    let cases: [(usize, Vec<usize>); 4] = [
        (1, vec![1]),
        (384, vec![3, 0, 17, 1, 0]),
        (1000, vec![256, 2, 129]),
        (7, vec![0, 0]),
    ];
    for (case, (dim, lengths)) in cases.into_iter().enumerate() {
        let mut r = rng(30 + case as u64);
        let rows: usize = lengths.iter().sum();
        let (h, hg) = pair(&uniform(&mut r, rows * dim, -2.0, 2.0), &[rows, dim], &dev);
        let (cu, cug) = pair_u32(&cu_seqlens(&lengths), &dev);
        let flags: Vec<u32> = (0..lengths.len()).map(|i| (i % 2 == 0) as u32).collect();
        let (f, fg) = pair_u32(&flags, &dev);
        let want = k::mean_pool_normalize(&h, &cu, &f).expect("cpu op");
        let got = k::mean_pool_normalize(&hg, &cug, &fg).expect("cuda op");
        assert_close(&format!("mean_pool {dim} {lengths:?}"), &want, &got, 1e-6);
    }
}

#[test]
fn mean_pool_normalize_rejects_bad_offsets() {
    let Some(dev) = gpu("mean_pool_normalize_rejects_bad_offsets") else {
        return;
    };
    let (_, hg) = pair(&[1.0; 6], &[3, 2], &dev);
    let (_, cug) = pair_u32(&[0, 4], &dev);
    let (_, fg) = pair_u32(&[1], &dev);
    assert!(k::mean_pool_normalize(&hg, &cug, &fg).is_err());
}

#[test]
fn varlen_attention_matches_cpu() {
    let Some(dev) = gpu("varlen_attention_matches_cpu") else {
        return;
    };
    let cases: [(usize, usize, Vec<usize>); 4] = [
        (1, 1, vec![1]),
        (12, 32, vec![7, 0, 33, 1, 256]),
        (3, 17, vec![5, 129]),
        (2, 128, vec![0, 65, 0]),
    ];
    for (case, (heads, head_dim, lengths)) in cases.into_iter().enumerate() {
        let mut r = rng(40 + case as u64);
        let rows: usize = lengths.iter().sum();
        let width = 3 * heads * head_dim;
        let (qkv, qkvg) = pair(
            &uniform(&mut r, rows * width, -2.0, 2.0),
            &[rows, width],
            &dev,
        );
        let (cu, cug) = pair_u32(&cu_seqlens(&lengths), &dev);
        let scale = 1.0 / (head_dim as f32).sqrt();
        let want = k::varlen_attention(&qkv, &cu, heads, scale).expect("cpu op");
        let got = k::varlen_attention(&qkvg, &cug, heads, scale).expect("cuda op");
        assert_close(
            &format!("attention {heads}x{head_dim} {lengths:?}"),
            &want,
            &got,
            2e-5,
        );
    }
}

#[test]
fn varlen_attention_rejects_wide_heads() {
    let Some(dev) = gpu("varlen_attention_rejects_wide_heads") else {
        return;
    };
    let head_dim = k::cuda::FLEET_ATTENTION_MAX_HEAD_DIM as usize + 1;
    let (_, qkvg) = pair(&vec![0.0; 2 * 3 * head_dim], &[2, 3 * head_dim], &dev);
    let (_, cug) = pair_u32(&[0, 2], &dev);
    assert!(k::varlen_attention(&qkvg, &cug, 1, 1.0).is_err());
}

#[test]
fn linear_matches_cpu() {
    let Some(dev) = gpu("linear_matches_cpu") else {
        return;
    };
    for (case, (rows, inp, out)) in [(1, 1, 1), (7, 384, 1152), (33, 1536, 384), (5, 17, 3)]
        .into_iter()
        .enumerate()
    {
        let mut r = rng(50 + case as u64);
        let (x, xg) = pair(&uniform(&mut r, rows * inp, -1.0, 1.0), &[rows, inp], &dev);
        let (w, wg) = pair(&uniform(&mut r, out * inp, -0.1, 0.1), &[out, inp], &dev);
        let (b, bg) = pair(&uniform(&mut r, out, -1.0, 1.0), &[out], &dev);
        let want = k::linear(&x, &w, Some(&b)).expect("cpu op");
        let got = k::linear(&xg, &wg, Some(&bg)).expect("cuda op");
        // cuBLAS may use TF32 or another summation order: looser than the element-wise ops.
        assert_close(&format!("linear {rows}x{inp}x{out}"), &want, &got, 1e-3);
        let want = k::linear(&x, &w, None).expect("cpu op");
        let got = k::linear(&xg, &wg, None).expect("cuda op");
        assert_close(
            &format!("linear {rows}x{inp}x{out} no bias"),
            &want,
            &got,
            1e-3,
        );
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The real model on the GPU against sentence-transformers, with the model test's tolerances.
/// Needs the model (`FLEET_MODEL_DIR`, default `<repo>/models/all-MiniLM-L6-v2`) and the
/// fixture (`FLEET_MINILM_REFERENCE`, default `<repo>/fixtures/minilm_reference.json`);
/// on a GPU machine without them this test fails, saying so.
#[test]
fn minilm_on_gpu_matches_sentence_transformers() {
    let Some(dev) = gpu("minilm_on_gpu_matches_sentence_transformers") else {
        return;
    };
    #[derive(serde::Deserialize)]
    struct Fixture {
        items: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        text: String,
        embedding: Vec<f32>,
    }
    let model_dir = std::env::var_os("FLEET_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models").join("all-MiniLM-L6-v2"));
    let fixture_path = std::env::var_os("FLEET_MINILM_REFERENCE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            workspace_root()
                .join("fixtures")
                .join("minilm_reference.json")
        });
    let bytes = std::fs::read(&fixture_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", fixture_path.display()));
    let fixture: Fixture = serde_json::from_slice(&bytes).expect("fixture parses");
    let model = fleet_model::EmbeddingModel::load(&model_dir, &dev)
        .unwrap_or_else(|e| panic!("loading {} on the GPU: {e}", model_dir.display()));
    let ids: Vec<Vec<u32>> = fixture
        .items
        .iter()
        .map(|it| model.tokenize(&it.text, true).expect("tokenize"))
        .collect();
    let batch: Vec<fleet_model::Sequence<'_>> = ids
        .iter()
        .map(|t| fleet_model::Sequence::normalized(t))
        .collect();
    let got = model.embed(&batch).expect("embed on the GPU");
    assert_eq!(got.len(), fixture.items.len());
    for (it, v) in fixture.items.iter().zip(&got) {
        assert_eq!(v.len(), it.embedding.len());
        let dot: f64 = v
            .iter()
            .zip(&it.embedding)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .sum();
        let na = v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
        let nb = it
            .embedding
            .iter()
            .map(|b| f64::from(*b).powi(2))
            .sum::<f64>()
            .sqrt();
        let cos = dot / (na * nb);
        let diff = v
            .iter()
            .zip(&it.embedding)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            cos >= 0.9999 && diff <= 1e-4,
            "{:?}: cosine {cos}, max abs diff {diff}",
            it.text
        );
    }
}
