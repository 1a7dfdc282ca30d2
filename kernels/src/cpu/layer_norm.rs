use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::simd::simd_fn;
use super::{ShapeError, ensure, rows_per_task, write_output};

/// Lanes of the partial sums: one AVX-512 register, so the reductions vectorise (float
/// addition is not reassociated by the compiler on its own).
const LANES: usize = 16;

/// `out = layer_norm(x + residual) * weight + bias` over rows of `weight.len()` values (row-major
/// `x` and `residual` of the same length), with the biased variance and `eps` inside the
/// square root, as `torch.nn.LayerNorm`.
pub fn add_layer_norm(
    x: &[f32],
    residual: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut Vec<f32>,
) -> Result<(), ShapeError> {
    let n = weight.len();
    ensure(n > 0 && bias.len() == n, || {
        format!(
            "add_layer_norm: weight has {n} values, bias {}; need the same, non-zero",
            bias.len()
        )
    })?;
    ensure(
        x.len().is_multiple_of(n) && residual.len() == x.len(),
        || {
            format!(
                "add_layer_norm: x {}, residual {} values; need rows x {n} each",
                x.len(),
                residual.len(),
            )
        },
    )?;
    let chunk = rows_per_task(n, 1 << 14) * n;
    // SAFETY: the chunks cover the output and `add_layer_norm_chunk` writes every element.
    unsafe {
        write_output(out, x.len(), |out| {
            out.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk).zip(residual.par_chunks(chunk)))
                .for_each(|(o, (x, r))| add_layer_norm_chunk(x, r, weight, bias, eps, o));
        });
    }
    Ok(())
}

simd_fn! {
    fn add_layer_norm_chunk(
        x: &[f32],
        residual: &[f32],
        weight: &[f32],
        bias: &[f32],
        eps: f32,
        out: &mut [MaybeUninit<f32>],
    ) {
        let n = weight.len();
        for ((o, x), r) in out
            .chunks_exact_mut(n)
            .zip(x.chunks_exact(n))
            .zip(residual.chunks_exact(n))
        {
            // Three passes over a row that stays in L1: sum, squared deviations, output.
            let mean = lane_sum(x, r, |v| v) / n as f32;
            let var = lane_sum(x, r, |v| (v - mean) * (v - mean)) / n as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((((o, &x), &r), &w), &b) in o.iter_mut().zip(x).zip(r).zip(weight).zip(bias) {
                o.write((x + r - mean) * inv * w + b);
            }
        }
    }
}

/// `sum_i f(x[i] + r[i])`, accumulated in `LANES` independent partial sums.
#[inline(always)]
fn lane_sum(x: &[f32], r: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (xc, rc) = (x.chunks_exact(LANES), r.chunks_exact(LANES));
    let tail: f32 = xc
        .remainder()
        .iter()
        .zip(rc.remainder())
        .map(|(&x, &r)| f(x + r))
        .sum();
    for (xs, rs) in xc.zip(rc) {
        for ((a, &x), &r) in acc.iter_mut().zip(xs).zip(rs) {
            *a += f(x + r);
        }
    }
    acc.iter().sum::<f32>() + tail
}
