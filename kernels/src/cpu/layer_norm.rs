use rayon::prelude::*;

use super::simd::simd_fn;
use super::{ShapeError, ensure, rows_per_task};

/// Lanes of the partial sums: wide enough for one AVX2 register pair, so the reductions
/// vectorise (float addition is not reassociated by the compiler on its own).
const LANES: usize = 16;

/// `out = layer_norm(x + residual) * weight + bias` over rows of `weight.len()` values
/// (row-major `x`, `residual`, `out`, all of the same length), with the biased variance and
/// `eps` inside the square root, as `torch.nn.LayerNorm`.
pub fn add_layer_norm(
    x: &[f32],
    residual: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<(), ShapeError> {
    let n = weight.len();
    ensure(n > 0 && bias.len() == n, || {
        format!(
            "add_layer_norm: weight has {n} values, bias {}; need the same, non-zero",
            bias.len()
        )
    })?;
    ensure(
        x.len().is_multiple_of(n) && residual.len() == x.len() && out.len() == x.len(),
        || {
            format!(
                "add_layer_norm: x {}, residual {}, out {} values; need rows x {n} each",
                x.len(),
                residual.len(),
                out.len()
            )
        },
    )?;
    let chunk = rows_per_task(n, 1 << 14) * n;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(residual.par_chunks(chunk)))
        .for_each(|(o, (x, r))| add_layer_norm_chunk(x, r, weight, bias, eps, o));
    Ok(())
}

simd_fn! {
    fn add_layer_norm_chunk(
        x: &[f32],
        residual: &[f32],
        weight: &[f32],
        bias: &[f32],
        eps: f32,
        out: &mut [f32],
    ) {
        let n = weight.len();
        for ((o, x), r) in out
            .chunks_exact_mut(n)
            .zip(x.chunks_exact(n))
            .zip(residual.chunks_exact(n))
        {
            // The sum goes to `o` first; the row then stays in L1 for the two passes below.
            for ((o, &x), &r) in o.iter_mut().zip(x).zip(r) {
                *o = x + r;
            }
            let mean = lane_sum(o, |v| v) / n as f32;
            let var = lane_sum(o, |v| (v - mean) * (v - mean)) / n as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((o, &w), &b) in o.iter_mut().zip(weight).zip(bias) {
                *o = (*o - mean) * inv * w + b;
            }
        }
    }
}

#[inline(always)]
fn lane_sum(v: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += f(x);
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
    acc.iter().sum::<f32>() + tail
}
