//! Fused encoder ops for BERT-style models, as candle custom ops.
//!
//! Two layers:
//!
//! * [`cpu`]: the kernels themselves, on plain `f32` slices. They are the path the CPU worker
//!   runs (row-parallel with rayon, vectorised loops compiled for AVX-512 and for AVX2+FMA and
//!   picked at run time by what the CPU has, matrix products through the `gemm` crate, or in
//!   bf16 through [`cpu::PackedLinear`] where the CPU has AVX512-BF16) and the reference the
//!   CUDA kernels are tested against.
//! * [`ops`]: the same computations as candle [`CustomOp2`](candle_core::CustomOp2) /
//!   [`CustomOp3`](candle_core::CustomOp3) types plus small functions that apply them to
//!   [`Tensor`](candle_core::Tensor)s. Each op documents its tensor layout exactly; a CUDA
//!   implementation goes into the op's `cuda_fwd` (next to `cpu_fwd`, in `src/ops/*.rs`), with
//!   the device kernels in the feature-gated [`cuda`] module (feature `cuda`: CUDA C in
//!   `cuda/*.cu`, compiled by `build.rs` with nvcc, bound with bindgen, launched on the stream of
//!   candle's CUDA device). Matrix products run on candle's own CUDA backend (cuBLAS).
//!
//! Token-major "varlen" layout: the model does not pad. A batch of `B` sequences is stored as
//! `T = sum(len_b)` rows, sequence after sequence, described by `cu_seqlens`: a `u32` vector of
//! `B + 1` non-decreasing offsets with `cu_seqlens[0] == 0` and `cu_seqlens[B] == T`; sequence
//! `b` owns rows `cu_seqlens[b]..cu_seqlens[b + 1]` (possibly none).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod ops;

pub use ops::{
    AddLayerNorm, BiasGelu, Linear, MeanPoolNormalize, PackedLinearOp, ScaledMaskedSoftmax,
    VarlenAttention, add_layer_norm, bias_gelu, linear, mean_pool_normalize, packed_linear,
    scaled_masked_softmax, varlen_attention,
};
