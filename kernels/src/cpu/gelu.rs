use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::simd::simd_fn;
use super::{ShapeError, ensure, math, rows_per_task, write_output};

/// `out[r, c] = gelu(x[r, c] + bias[c])` for row-major `x` of `rows x bias.len()`, with the erf
/// form of GELU (PyTorch's default).
pub fn bias_gelu(x: &[f32], bias: &[f32], out: &mut Vec<f32>) -> Result<(), ShapeError> {
    let n = bias.len();
    ensure(n > 0 && x.len().is_multiple_of(n), || {
        format!(
            "bias_gelu: x has {} values, bias {n}: need rows x {n}",
            x.len()
        )
    })?;
    let chunk = rows_per_task(n, 1 << 15) * n;
    // SAFETY: the chunks cover the output, and `bias_gelu_chunk` writes every element of each.
    unsafe {
        write_output(out, x.len(), |out| {
            out.par_chunks_mut(chunk)
                .zip(x.par_chunks(chunk))
                .for_each(|(o, x)| bias_gelu_chunk(x, bias, o));
        });
    }
    Ok(())
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
