use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};

use super::{dims1, dims2, f32_slice, u32_slice};
use crate::cpu;
#[cfg(feature = "cuda")]
use crate::cuda;

/// Multi-head self-attention over unpadded ("varlen") sequences, from the fused QKV projection.
///
/// Inputs, contiguous:
/// * `qkv`: f32 `[T, 3 * heads * head_dim]`: row `t` is `[q_t | k_t | v_t]`, each
///   `heads * head_dim` wide with head `h` at columns `h * head_dim..(h + 1) * head_dim` of its
///   third (the output of one linear layer with the query, key and value weights stacked in
///   that order);
/// * `cu_seqlens`: u32 `[B + 1]`, `0 = cu[0] <= cu[1] <= .. <= cu[B] = T`; sequence `b` is rows
///   `cu[b]..cu[b + 1]`.
///
/// Output: f32 `[T, heads * head_dim]`; for token `t` of sequence `b` and head `h`:
/// `out[t, h*D..(h+1)*D] = sum_{j in cu[b]..cu[b+1]} p_tj v_j[h]`, with
/// `p_tj = softmax_j(scale * q_t[h] · k_j[h])` over the keys of the same sequence only.
/// No padding exists, so no row is ever fully masked; empty sequences own no rows.
///
#[derive(Debug, Clone, Copy)]
pub struct VarlenAttention {
    pub heads: usize,
    pub scale: f32,
}

impl VarlenAttention {
    /// `(tokens, head_dim)`, once the shapes are checked.
    fn dims(&self, qkv: &Layout, cu: &Layout) -> Result<(usize, usize)> {
        let (tokens, width) = dims2(self.name(), "qkv", qkv)?;
        if self.heads == 0 || width % (3 * self.heads) != 0 {
            bail!(
                "{}: qkv width {width} is not 3 x {} heads x head_dim",
                self.name(),
                self.heads
            );
        }
        dims1(self.name(), "cu_seqlens", cu)?;
        Ok((tokens, width / (3 * self.heads)))
    }
}

impl CustomOp2 for VarlenAttention {
    fn name(&self) -> &'static str {
        "varlen-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (tokens, head_dim) = self.dims(l1, l2)?;
        let qkv = f32_slice(self.name(), s1, l1)?;
        let cu = u32_slice(self.name(), s2, l2)?;
        let hidden = self.heads * head_dim;
        let mut out = Vec::new();
        cpu::varlen_attention(qkv, cu, self.heads, head_dim, self.scale, &mut out)?;
        Ok((CpuStorage::F32(out), Shape::from((tokens, hidden))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (tokens, head_dim) = self.dims(l1, l2)?;
        // The kernel reads the rows the offsets name: they are checked on the host first.
        cpu::check_cu_seqlens(&cuda::u32_to_host(self.name(), s2, l2)?, tokens)?;
        let hidden = self.heads * head_dim;
        let qkv = cuda::f32_view(self.name(), s1, l1)?;
        let cu = cuda::u32_view(self.name(), s2, l2)?;
        let mut out = cuda::alloc_f32(s1, tokens * hidden)?;
        let stream = s1.device.cuda_stream();
        // SAFETY: the offsets were checked against the rows just above.
        unsafe {
            cuda::varlen_attention(
                &stream, &qkv, &cu, self.heads, head_dim, self.scale, &mut out,
            )?
        };
        Ok((cuda::wrap(s1, out), Shape::from((tokens, hidden))))
    }
}

/// Applies [`VarlenAttention`].
pub fn varlen_attention(
    qkv: &Tensor,
    cu_seqlens: &Tensor,
    heads: usize,
    scale: f32,
) -> Result<Tensor> {
    qkv.contiguous()?
        .apply_op2_no_bwd(&cu_seqlens.contiguous()?, &VarlenAttention { heads, scale })
}
