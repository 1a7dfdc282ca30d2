//! The fused ops as candle custom ops.
//!
//! Every op takes contiguous inputs (the helper functions call `contiguous()` first, which is
//! free for tensors that already are) and returns a new contiguous tensor. `cpu_fwd` calls the
//! kernels of [`crate::cpu`]; `cuda_fwd` is where the CUDA kernels go, with the same layouts.

mod attention;
mod gelu;
mod layer_norm;
mod linear;
mod pooling;
mod softmax;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, bail};

pub use attention::{VarlenAttention, varlen_attention};
pub use gelu::{BiasGelu, bias_gelu};
pub use layer_norm::{AddLayerNorm, add_layer_norm};
pub use linear::{Linear, PackedLinearOp, linear, packed_linear};
pub use pooling::{MeanPoolNormalize, mean_pool_normalize};
pub use softmax::{ScaledMaskedSoftmax, scaled_masked_softmax};

impl From<crate::cpu::ShapeError> for candle_core::Error {
    fn from(e: crate::cpu::ShapeError) -> Self {
        candle_core::Error::Msg(e.0)
    }
}

/// The `f32` values of a contiguous CPU tensor.
fn f32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => contiguous(op, v, l),
        other => bail!("{op}: expected f32, got {:?}", other.dtype()),
    }
}

/// The `u32` values of a contiguous CPU tensor.
fn u32_slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(v) => contiguous(op, v, l),
        other => bail!("{op}: expected u32, got {:?}", other.dtype()),
    }
}

fn contiguous<'a, T>(op: &str, v: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => bail!("{op}: input must be contiguous"),
    }
}

/// Checks that a tensor is rank 2 and returns its dims.
fn dims2(op: &str, what: &str, l: &Layout) -> Result<(usize, usize)> {
    match l.dims() {
        &[a, b] => Ok((a, b)),
        d => bail!("{op}: {what} must be rank 2, got {d:?}"),
    }
}

fn dims1(op: &str, what: &str, l: &Layout) -> Result<usize> {
    match l.dims() {
        &[a] => Ok(a),
        d => bail!("{op}: {what} must be rank 1, got {d:?}"),
    }
}
