use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

use super::{dims1, dims2, f32_slice, u32_slice};
use crate::cpu;
#[cfg(feature = "cuda")]
use crate::cuda;

/// Mean pooling per sequence over unpadded rows, then per-sequence L2 normalisation.
///
/// Inputs, contiguous:
/// * `hidden`: f32 `[T, dim]`, the varlen layout (see the crate docs);
/// * `cu_seqlens`: u32 `[B + 1]`, sequence `b` is rows `cu[b]..cu[b + 1]`;
/// * `normalize`: u32 `[B]`, non-zero = L2-normalise sequence `b`'s mean.
///
/// Output: f32 `[B, dim]`, `out[b] = m_b / max(||m_b||, 1e-12)` if `normalize[b] != 0`, else
/// `m_b`, with `m_b` the mean of sequence `b`'s rows. "Masked" mean pooling of a padded batch is
/// this op on the unpadded rows (the mask's ones); a sequence with no rows (fully masked) gives
/// zeros, never NaN.
#[derive(Debug, Clone, Copy, Default)]
pub struct MeanPoolNormalize;

impl MeanPoolNormalize {
    /// `(rows, dim, batch)`, once the shapes are checked.
    fn dims(&self, hidden: &Layout, cu: &Layout, flags: &Layout) -> Result<(usize, usize, usize)> {
        let (rows, dim) = dims2(self.name(), "hidden", hidden)?;
        let cu_len = dims1(self.name(), "cu_seqlens", cu)?;
        let batch = dims1(self.name(), "normalize", flags)?;
        if cu_len != batch + 1 {
            bail!("{}: {cu_len} offsets for {batch} sequences", self.name());
        }
        Ok((rows, dim, batch))
    }
}

impl CustomOp3 for MeanPoolNormalize {
    fn name(&self) -> &'static str {
        "mean-pool-normalize"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, dim, batch) = self.dims(l1, l2, l3)?;
        let hidden = f32_slice(self.name(), s1, l1)?;
        let cu = u32_slice(self.name(), s2, l2)?;
        let flags = u32_slice(self.name(), s3, l3)?;
        let mut out = Vec::new();
        cpu::mean_pool_normalize(hidden, dim, cu, flags, &mut out)?;
        Ok((CpuStorage::F32(out), Shape::from((batch, dim))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, dim, batch) = self.dims(l1, l2, l3)?;
        // The kernel reads the rows the offsets name: they are checked on the host first.
        cpu::check_cu_seqlens(&cuda::u32_to_host(self.name(), s2, l2)?, rows)?;
        let hidden = cuda::f32_view(self.name(), s1, l1)?;
        let cu = cuda::u32_view(self.name(), s2, l2)?;
        let flags = cuda::u32_view(self.name(), s3, l3)?;
        let mut out = cuda::alloc_f32(s1, batch * dim)?;
        let stream = s1.device.cuda_stream();
        // SAFETY: the offsets were checked against the rows just above.
        unsafe { cuda::mean_pool_normalize(&stream, &hidden, dim, &cu, &flags, &mut out)? };
        Ok((cuda::wrap(s1, out), Shape::from((batch, dim))))
    }
}

/// Applies [`MeanPoolNormalize`].
pub fn mean_pool_normalize(
    hidden: &Tensor,
    cu_seqlens: &Tensor,
    normalize: &Tensor,
) -> Result<Tensor> {
    hidden.contiguous()?.apply_op3_no_bwd(
        &cu_seqlens.contiguous()?,
        &normalize.contiguous()?,
        &MeanPoolNormalize,
    )
}
