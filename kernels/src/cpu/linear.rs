use std::mem::MaybeUninit;

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::{ShapeError, ensure, write_output};

/// `x · weightᵀ (+ bias)`: `x` row-major `[rows, in_dim]`, `weight` row-major
/// `[out_dim, in_dim]` (PyTorch's `nn.Linear` layout, read in place: gemm packs it as it goes,
/// so no transposed copy is kept), `bias` `[out_dim]`; writes `out` as row-major `[rows, out_dim]`.
///
/// Runs on all of rayon's threads (gemm splits the product). With a bias the output is first
/// filled with it and gemm accumulates onto it, so the bias costs no extra pass over the
/// product; without one gemm writes the output without reading it.
pub fn linear(
    x: &[f32],
    in_dim: usize,
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut Vec<f32>,
) -> Result<(), ShapeError> {
    ensure(in_dim > 0 && x.len().is_multiple_of(in_dim), || {
        format!("linear: {} input values are not rows of {in_dim}", x.len())
    })?;
    ensure(weight.len().is_multiple_of(in_dim), || {
        format!(
            "linear: {} weight values are not rows of {in_dim}",
            weight.len()
        )
    })?;
    let rows = x.len() / in_dim;
    let out_dim = weight.len() / in_dim;
    if let Some(b) = bias {
        ensure(b.len() == out_dim, || {
            format!("linear: bias has {} values, need {out_dim}", b.len())
        })?;
    }
    if rows == 0 || out_dim == 0 {
        out.clear();
        return Ok(());
    }
    // SAFETY: with a bias every element is written by the fill, then read and written by gemm;
    // without one gemm writes every element of the `rows x out_dim` product (read_dst = false:
    // alpha is zero and dst is only written).
    unsafe {
        write_output(out, rows * out_dim, |out| {
            product(x, in_dim, weight, bias, out)
        })
    };
    Ok(())
}

fn product(
    x: &[f32],
    in_dim: usize,
    weight: &[f32],
    bias: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
) {
    let rows = x.len() / in_dim;
    let out_dim = weight.len() / in_dim;
    if let Some(b) = bias {
        out.par_chunks_mut(out_dim * 64).for_each(|c| {
            for r in c.chunks_exact_mut(out_dim) {
                for (o, &b) in r.iter_mut().zip(b) {
                    o.write(b);
                }
            }
        });
    }
    // SAFETY: the pointers and strides describe exactly the checked slices: `out` and `x` are
    // row-major with `out_dim` and `in_dim` columns, and `weight` read as an
    // `[in_dim, out_dim]` matrix has row stride 1 and column stride `in_dim`. `out` is borrowed
    // mutably, so it overlaps neither input.
    unsafe {
        gemm(
            rows,
            out_dim,
            in_dim,
            out.as_mut_ptr().cast::<f32>(),
            1,
            out_dim as isize,
            bias.is_some(),
            x.as_ptr(),
            1,
            in_dim as isize,
            weight.as_ptr(),
            in_dim as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
}
