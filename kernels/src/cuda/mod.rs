//! The CUDA kernels of `cuda/*.cu` (compiled by `build.rs`), with safe launch wrappers over
//! cudarc device buffers, and the glue the ops' `cuda_fwd` use.
//!
//! Every wrapper checks the buffer lengths against the sizes before launching (a kernel reading
//! past a buffer is undefined behaviour, not an error), binds the stream's context to the calling
//! thread (the runtime API launches into the current context) and launches on the given stream,
//! the stream of candle's [`CudaDevice`](candle_core::CudaDevice). Launches are asynchronous.

use candle_core::{CudaStorage, Layout};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut};

#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    dead_code,
    unsafe_op_in_unsafe_fn,
    clippy::all
)]
mod sys {
    include!(concat!(env!("OUT_DIR"), "/fleet_kernels_sys.rs"));
}

pub use sys::FLEET_ATTENTION_MAX_HEAD_DIM;

/// A kernel refused its sizes, or its launch failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// Buffer lengths or sizes that do not fit together, found before launching.
    Shape {
        kernel: &'static str,
        message: String,
    },
    /// The launch function's `cudaError_t` (non-zero).
    Launch { kernel: &'static str, code: i32 },
    /// Making the stream's context current on this thread failed.
    Context {
        kernel: &'static str,
        message: String,
    },
}

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shape { kernel, message } => write!(f, "{kernel}: {message}"),
            Self::Launch { kernel, code } => {
                write!(f, "{kernel}: CUDA launch failed with cudaError_t {code}")
            }
            Self::Context { kernel, message } => {
                write!(f, "{kernel}: binding the CUDA context: {message}")
            }
        }
    }
}

impl std::error::Error for KernelError {}

impl From<KernelError> for candle_core::Error {
    fn from(e: KernelError) -> Self {
        candle_core::Error::Cuda(Box::new(e))
    }
}

fn ensure(
    kernel: &'static str,
    cond: bool,
    message: impl FnOnce() -> String,
) -> Result<(), KernelError> {
    if cond {
        Ok(())
    } else {
        Err(KernelError::Shape {
            kernel,
            message: message(),
        })
    }
}

fn to_u32(kernel: &'static str, what: &str, v: usize) -> Result<u32, KernelError> {
    u32::try_from(v).map_err(|_| KernelError::Shape {
        kernel,
        message: format!("{what} {v} does not fit in 32 bits"),
    })
}

fn bind(kernel: &'static str, stream: &CudaStream) -> Result<(), KernelError> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| KernelError::Context {
            kernel,
            message: e.to_string(),
        })
}

fn status(kernel: &'static str, code: i32) -> Result<(), KernelError> {
    if code == 0 {
        Ok(())
    } else {
        Err(KernelError::Launch { kernel, code })
    }
}

fn raw_stream(stream: &CudaStream) -> sys::cudaStream_t {
    // The driver's CUstream and the runtime's cudaStream_t are the same handle.
    stream.cu_stream() as sys::cudaStream_t
}

/// `out[r, c] = gelu(x[r, c] + bias[c])`, erf form; `x` and `out` are `rows x bias.len()`.
pub fn bias_gelu(
    stream: &CudaStream,
    x: &CudaView<'_, f32>,
    bias: &CudaView<'_, f32>,
    out: &mut CudaSlice<f32>,
) -> Result<(), KernelError> {
    const K: &str = "bias_gelu";
    let n = bias.len();
    ensure(K, n > 0, || "empty bias".into())?;
    ensure(K, x.len().is_multiple_of(n) && out.len() == x.len(), || {
        format!(
            "x {}, out {} values: need rows x {n} each",
            x.len(),
            out.len()
        )
    })?;
    let p = sys::FleetBiasGeluParams {
        rows: (x.len() / n) as u64,
        n: to_u32(K, "n", n)?,
    };
    bind(K, stream)?;
    let (xp, _x) = x.device_ptr(stream);
    let (bp, _b) = bias.device_ptr(stream);
    let (op, _o) = out.device_ptr_mut(stream);
    // SAFETY: the pointers are live device buffers of the lengths checked above, on `stream`'s
    // context; the guards keep cudarc's read/write events ordered around the launch.
    let code = unsafe {
        sys::fleet_bias_gelu_f32(
            xp as *const f32,
            bp as *const f32,
            op as *mut f32,
            p,
            raw_stream(stream),
        )
    };
    status(K, code)
}

/// `out = layer_norm(x + residual) * params[0] + params[1]` over rows of `n`; `params` is
/// `[2, n]`, `x`, `residual` and `out` are `rows x n`.
pub fn add_layer_norm(
    stream: &CudaStream,
    x: &CudaView<'_, f32>,
    residual: &CudaView<'_, f32>,
    params: &CudaView<'_, f32>,
    eps: f32,
    out: &mut CudaSlice<f32>,
) -> Result<(), KernelError> {
    const K: &str = "add_layer_norm";
    ensure(
        K,
        params.len() >= 2 && params.len().is_multiple_of(2),
        || format!("params has {} values: need [2, n]", params.len()),
    )?;
    let n = params.len() / 2;
    ensure(
        K,
        x.len().is_multiple_of(n) && residual.len() == x.len() && out.len() == x.len(),
        || {
            format!(
                "x {}, residual {}, out {} values: need rows x {n} each",
                x.len(),
                residual.len(),
                out.len()
            )
        },
    )?;
    let p = sys::FleetAddLayerNormParams {
        rows: (x.len() / n) as u64,
        n: to_u32(K, "n", n)?,
        eps,
    };
    bind(K, stream)?;
    let (xp, _x) = x.device_ptr(stream);
    let (rp, _r) = residual.device_ptr(stream);
    let (pp, _p) = params.device_ptr(stream);
    let (op, _o) = out.device_ptr_mut(stream);
    // SAFETY: as in `bias_gelu`.
    let code = unsafe {
        sys::fleet_add_layer_norm_f32(
            xp as *const f32,
            rp as *const f32,
            pp as *const f32,
            op as *mut f32,
            p,
            raw_stream(stream),
        )
    };
    status(K, code)
}

/// Scaled softmax over the last dimension of `scores` `[batch, heads, q_len, k_len]` (`dims`),
/// keys `j >= lengths[b]` masked to 0, fully masked rows all zeros.
pub fn scaled_masked_softmax(
    stream: &CudaStream,
    scores: &CudaView<'_, f32>,
    lengths: &CudaView<'_, u32>,
    dims: [usize; 4],
    scale: f32,
    out: &mut CudaSlice<f32>,
) -> Result<(), KernelError> {
    const K: &str = "scaled_masked_softmax";
    let [batch, heads, q_len, k_len] = dims;
    let total = batch
        .checked_mul(heads)
        .and_then(|v| v.checked_mul(q_len))
        .and_then(|v| v.checked_mul(k_len));
    ensure(
        K,
        total == Some(scores.len()) && out.len() == scores.len() && lengths.len() == batch,
        || {
            format!(
                "scores {}, out {} values, {} lengths for dims {dims:?}",
                scores.len(),
                out.len(),
                lengths.len()
            )
        },
    )?;
    let p = sys::FleetMaskedSoftmaxParams {
        batch: to_u32(K, "batch", batch)?,
        heads: to_u32(K, "heads", heads)?,
        q_len: to_u32(K, "q_len", q_len)?,
        k_len: to_u32(K, "k_len", k_len)?,
        scale,
    };
    bind(K, stream)?;
    let (sp, _s) = scores.device_ptr(stream);
    let (lp, _l) = lengths.device_ptr(stream);
    let (op, _o) = out.device_ptr_mut(stream);
    // SAFETY: as in `bias_gelu`; lengths larger than k_len are clamped by the kernel (the CPU op
    // refuses them; the op checks them on the host before calling, see `ops::softmax`).
    let code = unsafe {
        sys::fleet_scaled_masked_softmax_f32(
            sp as *const f32,
            lp as *const u32,
            op as *mut f32,
            p,
            raw_stream(stream),
        )
    };
    status(K, code)
}

/// Mean of each sequence's rows of `hidden` `[T, dim]`, L2-normalised where `normalize[b] != 0`;
/// `out` is `[B, dim]`. `cu_seqlens` (`[B + 1]`) must be valid offsets into the `T` rows: the
/// kernel reads the rows they name.
///
/// # Safety
///
/// `cu_seqlens` must hold `0 = cu[0] <= cu[1] <= .. <= cu[B] = T` (lives on the device, so it
/// cannot be checked here without a copy; the op checks a host copy first).
pub unsafe fn mean_pool_normalize(
    stream: &CudaStream,
    hidden: &CudaView<'_, f32>,
    dim: usize,
    cu_seqlens: &CudaView<'_, u32>,
    normalize: &CudaView<'_, u32>,
    out: &mut CudaSlice<f32>,
) -> Result<(), KernelError> {
    const K: &str = "mean_pool_normalize";
    let batch = normalize.len();
    ensure(
        K,
        dim > 0
            && hidden.len().is_multiple_of(dim)
            && cu_seqlens.len() == batch + 1
            && out.len() == batch * dim,
        || {
            format!(
                "hidden {} values of rows of {dim}, {} offsets, {batch} flags, out {}",
                hidden.len(),
                cu_seqlens.len(),
                out.len()
            )
        },
    )?;
    let p = sys::FleetMeanPoolParams {
        tokens: to_u32(K, "tokens", hidden.len() / dim)?,
        batch: to_u32(K, "batch", batch)?,
        dim: to_u32(K, "dim", dim)?,
    };
    bind(K, stream)?;
    let (hp, _h) = hidden.device_ptr(stream);
    let (cp, _c) = cu_seqlens.device_ptr(stream);
    let (np, _n) = normalize.device_ptr(stream);
    let (op, _o) = out.device_ptr_mut(stream);
    // SAFETY: as in `bias_gelu`, with the offsets valid by this function's contract.
    let code = unsafe {
        sys::fleet_mean_pool_normalize_f32(
            hp as *const f32,
            cp as *const u32,
            np as *const u32,
            op as *mut f32,
            p,
            raw_stream(stream),
        )
    };
    status(K, code)
}

/// Multi-head attention over varlen sequences from the fused `qkv` `[T, 3 * heads * head_dim]`;
/// `out` is `[T, heads * head_dim]`; `head_dim` at most [`FLEET_ATTENTION_MAX_HEAD_DIM`].
///
/// # Safety
///
/// `cu_seqlens` must be valid offsets into the `T` rows, as for [`mean_pool_normalize`].
pub unsafe fn varlen_attention(
    stream: &CudaStream,
    qkv: &CudaView<'_, f32>,
    cu_seqlens: &CudaView<'_, u32>,
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut CudaSlice<f32>,
) -> Result<(), KernelError> {
    const K: &str = "varlen_attention";
    let hidden = heads * head_dim;
    ensure(
        K,
        hidden > 0 && head_dim <= FLEET_ATTENTION_MAX_HEAD_DIM as usize,
        || format!("{heads} heads of {head_dim} (head_dim at most {FLEET_ATTENTION_MAX_HEAD_DIM})"),
    )?;
    ensure(
        K,
        out.len().is_multiple_of(hidden) && qkv.len() == 3 * out.len() && !cu_seqlens.is_empty(),
        || {
            format!(
                "qkv {}, out {} values, {} offsets for {heads} heads of {head_dim}",
                qkv.len(),
                out.len(),
                cu_seqlens.len()
            )
        },
    )?;
    let p = sys::FleetVarlenAttentionParams {
        tokens: to_u32(K, "tokens", out.len() / hidden)?,
        batch: to_u32(K, "batch", cu_seqlens.len() - 1)?,
        heads: to_u32(K, "heads", heads)?,
        head_dim: to_u32(K, "head_dim", head_dim)?,
        scale,
    };
    bind(K, stream)?;
    let (qp, _q) = qkv.device_ptr(stream);
    let (cp, _c) = cu_seqlens.device_ptr(stream);
    let (op, _o) = out.device_ptr_mut(stream);
    // SAFETY: as in `bias_gelu`, with the offsets valid by this function's contract.
    let code = unsafe {
        sys::fleet_varlen_attention_f32(
            qp as *const f32,
            cp as *const u32,
            op as *mut f32,
            p,
            raw_stream(stream),
        )
    };
    status(K, code)
}

/// The contiguous `f32` elements of a CUDA tensor, as a view from its layout's offset.
pub(crate) fn f32_view<'a>(
    op: &str,
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, f32>> {
    let (start, end) = offsets(op, l)?;
    Ok(s.as_cuda_slice::<f32>()?.slice(start..end))
}

/// The contiguous `u32` elements of a CUDA tensor.
pub(crate) fn u32_view<'a>(
    op: &str,
    s: &'a CudaStorage,
    l: &Layout,
) -> candle_core::Result<CudaView<'a, u32>> {
    let (start, end) = offsets(op, l)?;
    Ok(s.as_cuda_slice::<u32>()?.slice(start..end))
}

fn offsets(op: &str, l: &Layout) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: input must be contiguous")))
}

/// A copy of a small `u32` tensor on the host, for checks the kernels cannot make (offsets).
pub(crate) fn u32_to_host(op: &str, s: &CudaStorage, l: &Layout) -> candle_core::Result<Vec<u32>> {
    let view = u32_view(op, s, l)?;
    s.device.clone_dtoh(&view)
}

/// A new uninitialised `f32` buffer of `len` on the device of `s`, for a kernel that writes every
/// element.
pub(crate) fn alloc_f32(s: &CudaStorage, len: usize) -> candle_core::Result<CudaSlice<f32>> {
    // SAFETY: every kernel writes all `len` elements of its output before anything reads them.
    unsafe { s.device.alloc::<f32>(len) }
}

/// Wraps a kernel's output as candle storage on the device of `s`.
pub(crate) fn wrap(s: &CudaStorage, out: CudaSlice<f32>) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(out, s.device.clone())
}
