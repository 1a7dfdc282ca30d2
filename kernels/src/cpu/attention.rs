use std::cell::RefCell;

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::softmax::{ROW_LANES, softmax_lane_row};
use super::{ShapeError, check_cu_seqlens, ensure, write_output};

thread_local! {
    /// Scores of one (sequence, head): `len` rows of `len` rounded up to [`ROW_LANES`] floats,
    /// reused across tasks.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Output pointer shared by the tasks; each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: see `varlen_attention`: tasks write disjoint elements and the pointee outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method, so that closures capture the whole `Send` wrapper, not the raw pointer field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Multi-head self-attention over unpadded ("varlen") sequences.
///
/// * `qkv`: row-major `[T, 3 * heads * head_dim]`; row `t` holds the query of token `t` for
///   heads `0..heads` (`head_dim` values each), then its key likewise, then its value:
///   `q(t, h) = qkv[t, h * head_dim..]`, `k(t, h) = qkv[t, (heads + h) * head_dim..]`,
///   `v(t, h) = qkv[t, (2 * heads + h) * head_dim..]`. This is the output of one linear
///   layer whose weight is the query, key and value weights stacked.
/// * `cu_seqlens`: `[B + 1]` offsets (see the crate docs). A token attends to all tokens of
///   its own sequence and to nothing else, so no mask and no padding exist.
///
/// Writes `out` as row-major `[T, heads * head_dim]`, heads side by side like the input of BERT's
/// attention output projection:
/// `out(t, h) = sum_j softmax_j(scale * q(t, h) · k(j, h)) v(j, h)` over `j` in `t`'s sequence.
///
/// One task per (sequence, head) on rayon; within a task two single-threaded gemm calls and
/// a softmax with the semantics of [`super::scaled_softmax_row`].
pub fn varlen_attention(
    qkv: &[f32],
    cu_seqlens: &[u32],
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut Vec<f32>,
) -> Result<(), ShapeError> {
    let hidden = heads * head_dim;
    ensure(hidden > 0 && qkv.len().is_multiple_of(3 * hidden), || {
        format!(
            "varlen_attention: {} qkv values are not rows of 3 x {heads} x {head_dim}",
            qkv.len()
        )
    })?;
    let tokens = qkv.len() / (3 * hidden);
    check_cu_seqlens(cu_seqlens, tokens)?;
    // SAFETY: the sequences cover all `tokens` rows (checked by `check_cu_seqlens`) and every
    // (sequence, head) task writes all its rows' `head_dim` columns through gemm.
    unsafe {
        write_output(out, tokens * hidden, |out| {
            attend(qkv, cu_seqlens, heads, head_dim, scale, out);
        });
    }
    Ok(())
}

fn attend(
    qkv: &[f32],
    cu_seqlens: &[u32],
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [std::mem::MaybeUninit<f32>],
) {
    let hidden = heads * head_dim;
    let batch = cu_seqlens.len() - 1;
    let out_ptr = OutPtr(out.as_mut_ptr().cast::<f32>());
    let qkv_stride = 3 * hidden;
    (0..batch * heads).into_par_iter().for_each(|task| {
        let (b, h) = (task / heads, task % heads);
        let start = cu_seqlens[b] as usize;
        let len = cu_seqlens[b + 1] as usize - start;
        if len == 0 {
            return;
        }
        SCORES.with_borrow_mut(|scores| {
            // Rows padded to whole vectors; the padding holds -inf, so it gets probability ~0
            // and is never read by the second product (its k is `len`).
            let ld = len.next_multiple_of(ROW_LANES);
            scores.clear();
            scores.resize(len * ld, f32::NEG_INFINITY);
            let q = qkv[start * qkv_stride + h * head_dim..].as_ptr();
            let k = qkv[start * qkv_stride + (heads + h) * head_dim..].as_ptr();
            let v = qkv[start * qkv_stride + (2 * heads + h) * head_dim..].as_ptr();
            // SAFETY: rows `start..start + len` lie inside `qkv` (checked through cu_seqlens),
            // and each head's `head_dim` columns inside a row; `scores` holds `len` rows of
            // `ld >= len`.
            unsafe {
                gemm(
                    len,
                    len,
                    head_dim,
                    scores.as_mut_ptr(),
                    1,
                    ld as isize,
                    false,
                    q,
                    1,
                    qkv_stride as isize,
                    k,
                    qkv_stride as isize,
                    1,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
            // The scale is already applied (gemm's beta).
            for row in scores.chunks_exact_mut(ld) {
                softmax_lane_row(row);
            }
            // SAFETY: as above for `v` and `scores`; the destination is rows
            // `start..start + len`, columns `h * head_dim..(h + 1) * head_dim` of `out`, which
            // no other task writes, and `out` outlives the parallel loop. gemm writes it
            // without reading it (read_dst = false).
            unsafe {
                gemm(
                    len,
                    head_dim,
                    len,
                    out_ptr.get().add(start * hidden + h * head_dim),
                    1,
                    hidden as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    ld as isize,
                    v,
                    1,
                    qkv_stride as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                );
            }
        });
    });
}
