use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::simd::simd_fn;
use super::{ShapeError, check_cu_seqlens, ensure, write_output};

/// Norm floor of the L2 normalisation, as `torch.nn.functional.normalize`.
const NORM_EPS: f64 = 1e-12;

/// Mean pooling over each sequence's rows, then L2 normalisation where asked.
///
/// * `hidden`: row-major `[T, dim]` in the varlen layout (see the crate docs).
/// * `cu_seqlens`: `[B + 1]` offsets into the rows.
/// * `normalize`: `[B]` flags, non-zero = divide the mean by `max(||mean||_2, 1e-12)`.
///
/// Writes `out` as row-major `[B, dim]`. An empty sequence (no rows: fully masked) gives zeros.
///
/// Sums are kept in `f64`: a pass over `T x dim` values is negligible next to the encoder.
pub fn mean_pool_normalize(
    hidden: &[f32],
    dim: usize,
    cu_seqlens: &[u32],
    normalize: &[u32],
    out: &mut Vec<f32>,
) -> Result<(), ShapeError> {
    ensure(dim > 0 && hidden.len().is_multiple_of(dim), || {
        format!(
            "mean_pool_normalize: {} values are not rows of {dim}",
            hidden.len()
        )
    })?;
    let batch = check_cu_seqlens(cu_seqlens, hidden.len() / dim)?;
    ensure(normalize.len() == batch, || {
        format!(
            "mean_pool_normalize: {batch} sequences but {} flags",
            normalize.len(),
        )
    })?;
    // SAFETY: one chunk of `dim` per sequence covers the output; `pool_one` writes all of it.
    unsafe {
        write_output(out, batch * dim, |out| {
            out.par_chunks_mut(dim).enumerate().for_each(|(b, o)| {
                let rows = &hidden[cu_seqlens[b] as usize * dim..cu_seqlens[b + 1] as usize * dim];
                pool_one(rows, normalize[b] != 0, o);
            });
        });
    }
    Ok(())
}

simd_fn! {
    fn pool_one(rows: &[f32], normalize: bool, out: &mut [MaybeUninit<f32>]) {
        let dim = out.len();
        let count = rows.len() / dim;
        if count == 0 {
            out.fill(MaybeUninit::new(0.0));
            return;
        }
        let mut acc = vec![0.0f64; dim];
        for row in rows.chunks_exact(dim) {
            for (a, &x) in acc.iter_mut().zip(row) {
                *a += f64::from(x);
            }
        }
        let inv_count = 1.0 / count as f64;
        let scale = if normalize {
            let norm = acc.iter().map(|a| (a * inv_count) * (a * inv_count)).sum::<f64>().sqrt();
            inv_count / norm.max(NORM_EPS)
        } else {
            inv_count
        };
        for (o, a) in out.iter_mut().zip(&acc) {
            o.write((a * scale) as f32);
        }
    }
}
