//! Each fused CUDA kernel against the sequence of unfused candle CUDA ops it replaces, on the
//! same inputs (all-MiniLM-L6-v2 sizes: hidden 384, intermediate 1536, 12 heads). Needs a GPU;
//! without one it prints `SKIPPED: no CUDA device` and measures nothing.
//!
//! Build here with `ops/build-cuda.sh` (or `cargo bench -p fleet-kernels --features cuda
//! --no-run`), run on a GPU machine with `ops/gpu-check.sh`.

use candle_core::{D, Device, Result, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use fleet_kernels as k;

/// Tokens of a batch: 32 sequences of 128 tokens.
const TOKENS: usize = 4096;
const HIDDEN: usize = 384;
const INTER: usize = 1536;

fn bench(
    c: &mut Criterion,
    group: &str,
    dev: &Device,
    fused: impl Fn() -> Result<Tensor>,
    unfused: impl Fn() -> Result<Tensor>,
) {
    let mut g = c.benchmark_group(group);
    // Every iteration ends in a synchronize: launches are asynchronous.
    g.bench_function("fused", |b| {
        b.iter(|| {
            fused()
                .and_then(|t| dev.synchronize().map(|()| t))
                .expect("fused op")
        })
    });
    g.bench_function("unfused candle ops", |b| {
        b.iter(|| {
            unfused()
                .and_then(|t| dev.synchronize().map(|()| t))
                .expect("unfused ops")
        })
    });
    g.finish();
}

fn cuda_ops(c: &mut Criterion) {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED: no CUDA device ({e}); nothing measured");
            return;
        }
    };
    let inputs = (|| -> Result<_> {
        let x = Tensor::randn(0f32, 1.0, (TOKENS, INTER), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, INTER, &dev)?;
        let h = Tensor::randn(0f32, 1.0, (TOKENS, HIDDEN), &dev)?;
        let res = Tensor::randn(0f32, 1.0, (TOKENS, HIDDEN), &dev)?;
        let params = Tensor::randn(0f32, 1.0, (2, HIDDEN), &dev)?;
        let scores = Tensor::randn(0f32, 1.0, (32, 12, 128, 128), &dev)?;
        let lengths: Vec<u32> = (0..32u32).map(|i| 64 + 2 * i).collect();
        let cu: Vec<u32> = (0..=32u32).map(|i| i * 128).collect();
        Ok((x, bias, h, res, params, scores, lengths, cu))
    })();
    let (x, bias, h, res, params, scores, lengths, cu) = inputs.expect("bench inputs");

    bench(
        c,
        "bias_gelu 4096x1536",
        &dev,
        || k::bias_gelu(&x, &bias),
        || x.broadcast_add(&bias)?.gelu_erf(),
    );

    let (w, b) = (params.get(0).expect("weight"), params.get(1).expect("bias"));
    bench(
        c,
        "add_layer_norm 4096x384",
        &dev,
        || k::add_layer_norm(&h, &res, &params, 1e-12),
        || {
            let s = (&h + &res)?;
            let centered = s.broadcast_sub(&s.mean_keepdim(D::Minus1)?)?;
            let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
            centered
                .broadcast_div(&(var + 1e-12)?.sqrt()?)?
                .broadcast_mul(&w)?
                .broadcast_add(&b)
        },
    );

    let lengths_t = Tensor::new(lengths.as_slice(), &dev).expect("lengths");
    // The additive key mask the unfused path needs, built once (a model would build it per batch).
    let mask: Vec<f32> = lengths
        .iter()
        .flat_map(|&l| (0..128u32).map(move |j| if j < l { 0.0 } else { -1e30 }))
        .collect();
    let mask = Tensor::from_vec(mask, (32, 1, 1, 128), &dev).expect("mask");
    let scale = 1.0 / 8.0;
    bench(
        c,
        "scaled_masked_softmax 32x12x128x128",
        &dev,
        || k::scaled_masked_softmax(&scores, &lengths_t, scale),
        || {
            let s = scores.affine(f64::from(scale), 0.0)?.broadcast_add(&mask)?;
            let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        },
    );

    let cu_t = Tensor::new(cu.as_slice(), &dev).expect("cu_seqlens");
    let flags = Tensor::ones(32, candle_core::DType::U32, &dev).expect("flags");
    bench(
        c,
        "mean_pool_normalize 32x128x384",
        &dev,
        || k::mean_pool_normalize(&h, &cu_t, &flags),
        || {
            let means = cu
                .windows(2)
                .map(|w| {
                    h.narrow(0, w[0] as usize, (w[1] - w[0]) as usize)?
                        .mean_keepdim(0)
                })
                .collect::<Result<Vec<_>>>()?;
            let m = Tensor::cat(&means, 0)?;
            let norm = m.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
            m.broadcast_div(&norm)
        },
    );
}

criterion_group!(benches, cuda_ops);
criterion_main!(benches);
