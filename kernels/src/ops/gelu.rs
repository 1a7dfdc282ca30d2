use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};

use super::{dims1, f32_slice};
use crate::cpu;
#[cfg(feature = "cuda")]
use crate::cuda;

/// `gelu(x + bias)` with the erf form of GELU (PyTorch's default `gelu`).
///
/// Inputs: `x` f32 of any shape `[..., n]`, `bias` f32 `[n]`, both contiguous.
/// Output: f32, the shape of `x`. Element `i` of `x` gets `bias[i % n]`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BiasGelu;

impl BiasGelu {
    fn check(&self, x: &Layout, bias: &Layout) -> Result<()> {
        let n = dims1(self.name(), "bias", bias)?;
        if x.dims().last() != Some(&n) {
            bail!(
                "{}: x {:?} does not end in the bias size {n}",
                self.name(),
                x.dims()
            );
        }
        Ok(())
    }
}

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(l1, l2)?;
        let x = f32_slice(self.name(), s1, l1)?;
        let bias = f32_slice(self.name(), s2, l2)?;
        let mut out = Vec::new();
        cpu::bias_gelu(x, bias, &mut out)?;
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
        self.check(l1, l2)?;
        let x = cuda::f32_view(self.name(), s1, l1)?;
        let bias = cuda::f32_view(self.name(), s2, l2)?;
        let mut out = cuda::alloc_f32(s1, x.len())?;
        crate::cuda::bias_gelu(&s1.device.cuda_stream(), &x, &bias, &mut out)?;
        Ok((cuda::wrap(s1, out), l1.shape().clone()))
    }
}

/// Applies [`BiasGelu`].
pub fn bias_gelu(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&bias.contiguous()?, &BiasGelu)
}
