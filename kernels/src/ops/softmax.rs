use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};

use super::{dims1, f32_slice, u32_slice};
use crate::cpu;
#[cfg(feature = "cuda")]
use crate::cuda;

/// Scaled softmax over the last dimension of padded attention scores, keys masked by length.
///
/// Inputs, contiguous:
/// * `scores`: f32 `[batch, heads, q_len, k_len]`;
/// * `lengths`: u32 `[batch]`, each `<= k_len`: keys `j < lengths[b]` are real, the rest padding.
///
/// Output: f32 `[batch, heads, q_len, k_len]`,
/// `out[b, h, i, j] = exp(scale * s[b, h, i, j] - m) / sum_{j' < len_b} exp(scale * s[b, h, i, j'] - m)`
/// for `j < len_b` (`m` the row maximum of `scale * s` over real keys), `0` for `j >= len_b`.
/// A fully masked row (`lengths[b] == 0`) is all zeros, never NaN.
///
/// The unpadded model path does not call this op (it uses [`crate::VarlenAttention`], which
/// runs the same row kernel); it serves padded batches.
#[derive(Debug, Clone, Copy)]
pub struct ScaledMaskedSoftmax {
    pub scale: f32,
}

impl ScaledMaskedSoftmax {
    /// `[batch, heads, q_len, k_len]`, once the shapes are checked.
    fn dims(&self, scores: &Layout, lengths: &Layout) -> Result<[usize; 4]> {
        let dims: [usize; 4] = match scores.dims() {
            &[b, h, q, k] => [b, h, q, k],
            d => bail!("{}: scores must be rank 4, got {d:?}", self.name()),
        };
        if dims1(self.name(), "lengths", lengths)? != dims[0] {
            bail!(
                "{}: lengths {:?} for batch {}",
                self.name(),
                lengths.dims(),
                dims[0]
            );
        }
        Ok(dims)
    }
}

impl CustomOp2 for ScaledMaskedSoftmax {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(l1, l2)?;
        let scores = f32_slice(self.name(), s1, l1)?;
        let lengths = u32_slice(self.name(), s2, l2)?;
        let mut out = Vec::new();
        cpu::scaled_masked_softmax(scores, dims, lengths, self.scale, &mut out)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dims = self.dims(l1, l2)?;
        // The CPU op refuses a length above k_len; the same check needs the (batch-sized)
        // lengths on the host.
        if cuda::u32_to_host(self.name(), s2, l2)?
            .iter()
            .any(|&l| l as usize > dims[3])
        {
            bail!("{}: a length exceeds k_len {}", self.name(), dims[3]);
        }
        let scores = cuda::f32_view(self.name(), s1, l1)?;
        let lengths = cuda::u32_view(self.name(), s2, l2)?;
        let mut out = cuda::alloc_f32(s1, scores.len())?;
        let stream = s1.device.cuda_stream();
        cuda::scaled_masked_softmax(&stream, &scores, &lengths, dims, self.scale, &mut out)?;
        Ok((cuda::wrap(s1, out), l1.shape().clone()))
    }
}

/// Applies [`ScaledMaskedSoftmax`].
pub fn scaled_masked_softmax(scores: &Tensor, lengths: &Tensor, scale: f32) -> Result<Tensor> {
    scores
        .contiguous()?
        .apply_op2_no_bwd(&lengths.contiguous()?, &ScaledMaskedSoftmax { scale })
}
