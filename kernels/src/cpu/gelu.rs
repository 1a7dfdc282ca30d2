use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::simd::simd_fn;
use super::{ShapeError, ensure, math, new_output, rows_per_task};

/// `out[r, c] = gelu(x[r, c] + bias[c])` for row-major `x` of `rows x bias.len()`, with the erf
/// form of GELU (PyTorch's default).
pub fn bias_gelu(x: &[f32], bias: &[f32]) -> Result<Vec<f32>, ShapeError> {
    let n = bias.len();
    ensure(n > 0 && x.len().is_multiple_of(n), || {
        format!(
            "bias_gelu: x has {} values, bias {n}: need rows x {n}",
            x.len()
        )
    })?;
    let chunk = rows_per_task(n, 1 << 15) * n;
    // SAFETY: the chunks cover the output, and `bias_gelu_chunk` writes every element of each.
    Ok(unsafe {
        new_output(x.len(), |out| {
            out.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .for_each(|(o, x)| bias_gelu_chunk(x, bias, o));
        })
    })
}

simd_fn! {
    fn bias_gelu_chunk(x: &[f32], bias: &[f32], out: &mut [MaybeUninit<f32>]) {
        for (o, x) in out.chunks_exact_mut(bias.len()).zip(x.chunks_exact(bias.len())) {
            for ((o, &x), &b) in o.iter_mut().zip(x).zip(bias) {
                o.write(math::gelu(x + b));
            }
        }
    }
}
