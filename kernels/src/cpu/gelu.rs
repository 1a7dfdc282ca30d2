use rayon::prelude::*;

use super::simd::simd_fn;
use super::{ShapeError, ensure, math, rows_per_task};

/// `out[r, c] = gelu(x[r, c] + bias[c])` for row-major `x` and `out` of `rows x bias.len()`,
/// with the erf form of GELU (PyTorch's default).
pub fn bias_gelu(x: &[f32], bias: &[f32], out: &mut [f32]) -> Result<(), ShapeError> {
    let n = bias.len();
    ensure(n > 0, || "bias_gelu: empty bias".into())?;
    ensure(x.len().is_multiple_of(n) && out.len() == x.len(), || {
        format!(
            "bias_gelu: x has {} values, out {}, bias {n}: need rows x {n} each",
            x.len(),
            out.len()
        )
    })?;
    let chunk = rows_per_task(n, 1 << 15) * n;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, x)| bias_gelu_chunk(x, bias, o));
    Ok(())
}

simd_fn! {
    fn bias_gelu_chunk(x: &[f32], bias: &[f32], out: &mut [f32]) {
        for (o, x) in out.chunks_exact_mut(bias.len()).zip(x.chunks_exact(bias.len())) {
            for ((o, &x), &b) in o.iter_mut().zip(x).zip(bias) {
                *o = math::gelu(x + b);
            }
        }
    }
}
