use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};

use super::{dims2, f32_slice};
use crate::cpu;
#[cfg(feature = "cuda")]
use crate::cuda;

/// `layer_norm(x + residual) * weight + bias` over the last dimension, as `torch.nn.LayerNorm`
/// (biased variance, `eps` added to the variance).
///
/// Inputs, all f32 and contiguous:
/// * `x`: any shape `[..., n]`;
/// * `residual`: the shape of `x`;
/// * `params`: `[2, n]`, row 0 the weight (gamma), row 1 the bias (beta). Stacked because a
///   custom op takes at most three tensors; a model stacks them once at load time.
///
/// Output: f32, the shape of `x`.
#[derive(Debug, Clone, Copy)]
pub struct AddLayerNorm {
    pub eps: f32,
}

impl AddLayerNorm {
    /// The normalised width `n`, once the shapes are checked.
    fn hidden_size(&self, x: &Layout, residual: &Layout, params: &Layout) -> Result<usize> {
        let (two, n) = dims2(self.name(), "params", params)?;
        if two != 2 || x.dims().last() != Some(&n) || x.dims() != residual.dims() {
            bail!(
                "{}: x {:?}, residual {:?}, params {:?}: need x = residual = [.., n], params [2, n]",
                self.name(),
                x.dims(),
                residual.dims(),
                params.dims()
            );
        }
        Ok(n)
    }
}

impl CustomOp3 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "add-layer-norm"
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
        let n = self.hidden_size(l1, l2, l3)?;
        let x = f32_slice(self.name(), s1, l1)?;
        let residual = f32_slice(self.name(), s2, l2)?;
        let (weight, bias) = f32_slice(self.name(), s3, l3)?.split_at(n);
        let mut out = Vec::new();
        cpu::add_layer_norm(x, residual, weight, bias, self.eps, &mut out)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
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
        self.hidden_size(l1, l2, l3)?;
        let x = cuda::f32_view(self.name(), s1, l1)?;
        let residual = cuda::f32_view(self.name(), s2, l2)?;
        let params = cuda::f32_view(self.name(), s3, l3)?;
        let mut out = cuda::alloc_f32(s1, x.len())?;
        let stream = s1.device.cuda_stream();
        cuda::add_layer_norm(&stream, &x, &residual, &params, self.eps, &mut out)?;
        Ok((cuda::wrap(s1, out), l1.shape().clone()))
    }
}

/// Applies [`AddLayerNorm`].
pub fn add_layer_norm(x: &Tensor, residual: &Tensor, params: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &residual.contiguous()?,
        &params.contiguous()?,
        &AddLayerNorm { eps },
    )
}
