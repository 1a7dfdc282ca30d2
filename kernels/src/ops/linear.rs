use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail,
};

use super::{dims1, dims2, f32_slice};
use crate::cpu;

/// `x · weightᵀ + bias`, PyTorch's `nn.Linear`.
///
/// Inputs, all f32 and contiguous:
/// * `x`: `[rows, in]`;
/// * `weight`: `[out, in]` (the layout in PyTorch checkpoints);
/// * `bias` (only as a [`CustomOp3`]): `[out]`.
///
/// Output: f32 `[rows, out]`. As a [`CustomOp2`] (`x`, `weight`) there is no bias. On CUDA
/// this is candle's cuBLAS sgemm, plus candle's broadcast add for the bias.
#[derive(Debug, Clone, Copy, Default)]
pub struct Linear;

impl Linear {
    /// `(rows, in_dim, out_dim)`, once the shapes of `x`, `weight` and the bias are checked.
    fn dims(&self, x: &Layout, w: &Layout, bias: Option<&Layout>) -> Result<(usize, usize, usize)> {
        let name = "linear";
        let (rows, in_dim) = dims2(name, "x", x)?;
        let (out_dim, w_in) = dims2(name, "weight", w)?;
        if w_in != in_dim {
            bail!("{name}: x is [{rows}, {in_dim}] but weight is [{out_dim}, {w_in}]");
        }
        if let Some(l) = bias
            && dims1(name, "bias", l)? != out_dim
        {
            bail!("{name}: bias {:?} for {out_dim} outputs", l.dims());
        }
        Ok((rows, in_dim, out_dim))
    }

    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "linear";
        let (rows, in_dim, out_dim) = self.dims(x.1, w.1, bias.map(|(_, l)| l))?;
        let bias = bias.map(|(s, l)| f32_slice(name, s, l)).transpose()?;
        let xs = f32_slice(name, x.0, x.1)?;
        let ws = f32_slice(name, w.0, w.1)?;
        let mut out = Vec::new();
        cpu::linear(xs, in_dim, ws, bias, &mut out)?;
        Ok((CpuStorage::F32(out), Shape::from((rows, out_dim))))
    }

    /// On CUDA: candle's own matmul (cuBLAS sgemm with the weight read transposed in place) and,
    /// with a bias, candle's broadcast add.
    #[cfg(feature = "cuda")]
    fn run_cuda(
        &self,
        x: (&candle_core::CudaStorage, &Layout),
        w: (&candle_core::CudaStorage, &Layout),
        bias: Option<(&candle_core::CudaStorage, &Layout)>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;

        let (rows, in_dim, out_dim) = self.dims(x.1, w.1, bias.map(|(_, l)| l))?;
        let wt = w.1.transpose(0, 1)?;
        let product = x.0.matmul(w.0, (1, rows, out_dim, in_dim), x.1, &wt)?;
        let shape = Shape::from((rows, out_dim));
        let out = match bias {
            Some((s, l)) => product.binary_impl::<candle_core::op::Add>(
                s,
                &Layout::contiguous(&shape),
                &l.broadcast_as(shape.clone())?,
            )?,
            None => product,
        };
        Ok((out, shape))
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), (s2, l2), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.run_cuda((s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
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
        self.run((s1, l1), (s2, l2), Some((s3, l3)))
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
        self.run_cuda((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

/// Applies [`Linear`], with or without a bias.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    match bias {
        Some(b) => x.apply_op3_no_bwd(&weight, &b.contiguous()?, &Linear),
        None => x.apply_op2_no_bwd(&weight, &Linear),
    }
}

/// [`Linear`] with weights rounded to bf16 and packed once ([`cpu::PackedLinear`], held by the
/// op): `x · weightᵀ (+ bias)` in the op's [`cpu::Bf16Mode`], on the CPU only (there is no CUDA
/// implementation; candle refuses the op on other devices).
///
/// Inputs: f32 contiguous `x` `[rows, in]` and, as a [`CustomOp2`], `bias` `[out]`. Output:
/// f32 `[rows, out]`.
#[derive(Debug, Clone)]
pub struct PackedLinearOp<'a>(pub &'a cpu::PackedLinear);

impl PackedLinearOp<'_> {
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let name = "packed_linear";
        let (rows, in_dim) = dims2(name, "x", x.1)?;
        if in_dim != self.0.in_dim() {
            bail!(
                "{name}: x is [{rows}, {in_dim}] but the weights take {} inputs",
                self.0.in_dim()
            );
        }
        let bias = bias
            .map(|(s, l)| {
                dims1(name, "bias", l)?;
                f32_slice(name, s, l)
            })
            .transpose()?;
        let mut out = Vec::new();
        self.0.forward(f32_slice(name, x.0, x.1)?, bias, &mut out)?;
        Ok((CpuStorage::F32(out), Shape::from((rows, self.0.out_dim()))))
    }
}

impl CustomOp1 for PackedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "packed_linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run((s, l), None)
    }
}

impl CustomOp2 for PackedLinearOp<'_> {
    fn name(&self) -> &'static str {
        "packed_linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), Some((s2, l2)))
    }
}

/// Applies [`PackedLinearOp`], with or without a bias.
pub fn packed_linear(
    x: &Tensor,
    weight: &cpu::PackedLinear,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    match bias {
        Some(b) => x.apply_op2_no_bwd(&b.contiguous()?, &PackedLinearOp(weight)),
        None => x.apply_op1_no_bwd(&PackedLinearOp(weight)),
    }
}
