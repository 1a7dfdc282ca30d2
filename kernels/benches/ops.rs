//! Each fused op against the sequence of stock candle ops it replaces, on the same inputs:
//! a batch shaped like the worker's (32 sequences of 16 to 128 tokens, MiniLM sizes).
//!
//! cargo bench -p fleet-kernels --bench ops

use std::hint::black_box;
use std::time::Duration;

use candle_core::{D, Device, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HIDDEN: usize = 384;
const INTER: usize = 1536;
const HEADS: usize = 12;
const EPS: f64 = 1e-12;

struct Batch {
    lengths: Vec<usize>,
    tokens: usize,
    max_len: usize,
}

fn batch() -> Batch {
    // 32 lengths from 16 to 128, sorted as a length-sorting batcher would leave them mixed
    // within a small range; here spread wide on purpose, so padding costs the unfused path.
    let lengths: Vec<usize> = (0..32).map(|i| 16 + i * 112 / 31).collect();
    let tokens = lengths.iter().sum();
    let max_len = lengths.iter().copied().max().unwrap_or(0);
    Batch {
        lengths,
        tokens,
        max_len,
    }
}

fn random(rng: &mut StdRng, shape: &[usize], lo: f32, hi: f32) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).expect("tensor")
}

fn u32s(v: &[u32]) -> Tensor {
    Tensor::from_slice(v, v.len(), &Device::Cpu).expect("tensor")
}

fn cu_seqlens(b: &Batch) -> Tensor {
    let mut cu = vec![0u32];
    for &l in &b.lengths {
        cu.push(cu[cu.len() - 1] + l as u32);
    }
    u32s(&cu)
}

/// `[B, 1, 1, L]` additive key mask: 0 for real keys, a large negative number for padding.
fn additive_mask(b: &Batch) -> Tensor {
    let mut m = Vec::with_capacity(b.lengths.len() * b.max_len);
    for &l in &b.lengths {
        m.extend((0..b.max_len).map(|j| if j < l { 0.0f32 } else { -1e9 }));
    }
    Tensor::from_vec(m, (b.lengths.len(), 1, 1, b.max_len), &Device::Cpu).expect("mask")
}

/// Scatters unpadded `[T, n]` rows into a zero-padded `[B, L, n]` tensor.
fn pad(b: &Batch, x: &Tensor) -> Tensor {
    let mut rows = Vec::new();
    let mut start = 0;
    for &l in &b.lengths {
        let seq = x.narrow(0, start, l).expect("narrow");
        rows.push(seq.pad_with_zeros(0, 0, b.max_len - l).expect("pad"));
        start += l;
    }
    Tensor::stack(&rows, 0).expect("stack")
}

fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

fn bench_ops(c: &mut Criterion) {
    let b = batch();
    let t = b.tokens;
    let mut rng = StdRng::seed_from_u64(42);

    let x = random(&mut rng, &[t, INTER], -4.0, 4.0);
    let bias = random(&mut rng, &[INTER], -1.0, 1.0);
    let mut g = c.benchmark_group("bias_gelu");
    g.bench_function("fused", |bn| {
        bn.iter(|| fleet_kernels::bias_gelu(black_box(&x), &bias).expect("op"))
    });
    g.bench_function("candle", |bn| {
        bn.iter(|| {
            black_box(&x)
                .broadcast_add(&bias)
                .and_then(|y| y.gelu_erf())
                .expect("op")
        })
    });
    g.finish();

    let x = random(&mut rng, &[t, HIDDEN], -3.0, 3.0);
    let r = random(&mut rng, &[t, HIDDEN], -3.0, 3.0);
    let w = random(&mut rng, &[HIDDEN], 0.5, 1.5);
    let bb = random(&mut rng, &[HIDDEN], -0.5, 0.5);
    let params = Tensor::stack(&[&w, &bb], 0).expect("stack");
    let mut g = c.benchmark_group("add_layer_norm");
    g.bench_function("fused", |bn| {
        bn.iter(|| {
            fleet_kernels::add_layer_norm(black_box(&x), &r, &params, EPS as f32).expect("op")
        })
    });
    g.bench_function("candle", |bn| {
        bn.iter(|| {
            let run = || -> candle_core::Result<Tensor> {
                let s = (black_box(&x) + &r)?;
                let c = s.broadcast_sub(&s.mean_keepdim(D::Minus1)?)?;
                let var = c.sqr()?.mean_keepdim(D::Minus1)?;
                c.broadcast_div(&(var + EPS)?.sqrt()?)?
                    .broadcast_mul(&w)?
                    .broadcast_add(&bb)
            };
            run().expect("op")
        })
    });
    g.finish();

    let scale = 1.0 / ((HIDDEN / HEADS) as f32).sqrt();
    let nb = b.lengths.len();
    let scores = random(&mut rng, &[nb, HEADS, b.max_len, b.max_len], -8.0, 8.0);
    let lengths: Vec<u32> = b.lengths.iter().map(|&l| l as u32).collect();
    let lengths = u32s(&lengths);
    let mask = additive_mask(&b);
    let mut g = c.benchmark_group("scaled_masked_softmax");
    g.bench_function("fused", |bn| {
        bn.iter(|| {
            fleet_kernels::scaled_masked_softmax(black_box(&scores), &lengths, scale).expect("op")
        })
    });
    g.bench_function("candle", |bn| {
        bn.iter(|| {
            (black_box(&scores) * f64::from(scale))
                .and_then(|s| s.broadcast_add(&mask))
                .and_then(|s| softmax_last(&s))
                .expect("op")
        })
    });
    g.finish();

    let qkv = random(&mut rng, &[t, 3 * HIDDEN], -1.0, 1.0);
    let cu = cu_seqlens(&b);
    let d = HIDDEN / HEADS;
    let mut g = c.benchmark_group("attention");
    g.bench_function("fused_varlen", |bn| {
        bn.iter(|| fleet_kernels::varlen_attention(black_box(&qkv), &cu, HEADS, scale).expect("op"))
    });
    g.bench_function("candle_padded", |bn| {
        bn.iter(|| {
            let run = || -> candle_core::Result<Tensor> {
                let padded = pad(&b, black_box(&qkv));
                let part = |i: usize| -> candle_core::Result<Tensor> {
                    padded
                        .narrow(2, i * HIDDEN, HIDDEN)?
                        .reshape((nb, b.max_len, HEADS, d))?
                        .transpose(1, 2)?
                        .contiguous()
                };
                let (q, k, v) = (part(0)?, part(1)?, part(2)?);
                let s = (q.matmul(&k.t()?)? * f64::from(scale))?.broadcast_add(&mask)?;
                let ctx = softmax_last(&s)?.matmul(&v)?;
                ctx.transpose(1, 2)?.reshape((nb, b.max_len, HIDDEN))
            };
            run().expect("op")
        })
    });
    g.finish();

    let hidden = random(&mut rng, &[t, HIDDEN], -2.0, 2.0);
    let flags = u32s(&vec![1; nb]);
    let padded = pad(&b, &hidden);
    let token_mask: Vec<f32> = b
        .lengths
        .iter()
        .flat_map(|&l| (0..b.max_len).map(move |j| if j < l { 1.0 } else { 0.0 }))
        .collect();
    let token_mask = Tensor::from_vec(token_mask, (nb, b.max_len, 1), &Device::Cpu).expect("mask");
    let mut g = c.benchmark_group("mean_pool_normalize");
    g.bench_function("fused", |bn| {
        bn.iter(|| fleet_kernels::mean_pool_normalize(black_box(&hidden), &cu, &flags).expect("op"))
    });
    g.bench_function("candle", |bn| {
        bn.iter(|| {
            let run = || -> candle_core::Result<Tensor> {
                let summed = black_box(&padded).broadcast_mul(&token_mask)?.sum(1)?;
                let mean = summed.broadcast_div(&token_mask.sum(1)?)?;
                let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
                mean.broadcast_div(&norm)
            };
            run().expect("op")
        })
    });
    g.finish();

    let x = random(&mut rng, &[t, HIDDEN], -1.0, 1.0);
    let w = random(&mut rng, &[INTER, HIDDEN], -0.1, 0.1);
    let bl = random(&mut rng, &[INTER], -0.1, 0.1);
    let mut g = c.benchmark_group("linear");
    g.bench_function("fused", |bn| {
        bn.iter(|| fleet_kernels::linear(black_box(&x), &w, Some(&bl)).expect("op"))
    });
    g.bench_function("candle", |bn| {
        bn.iter(|| {
            black_box(&x)
                .matmul(&w.t().expect("t"))
                .and_then(|y| y.broadcast_add(&bl))
                .expect("op")
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_ops
}
criterion_main!(benches);
